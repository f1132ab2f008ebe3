//! Image files: what image management does beside the store to `<images>/<name>.img`.
//!
//! - copies: `ioctl(FICLONE)` first (a reflink, instant), otherwise a background copy of
//!   the data extents only ([`crate::iscsi::file::copy_sparse`]), into a hidden
//!   `.<name>.img.part` that becomes `<name>.img` and a store record (with `cloned_from`)
//!   only when it is complete; its progress is an [`Operation`]. A reflink is a
//!   point-in-time clone: with initiators writing to the source it is crash-consistent.
//!   The sparse copy lists the extents once and reads them over time, so writes made
//!   while it runs may be partly in it, and it is not even crash-consistent then; the
//!   operation's note says so when the source had live sessions at the start;
//! - adoption: `*.img` files without a record become images (size from the file,
//!   `image.adopt` in the audit log), at start-up and on request.
//!
//! One lock ([`ImageOps::files`]) serialises every change of image files with its record
//! (a copy's completion, rename, delete, adoption), so a file and its record never
//! disagree for another change to see.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde::Serialize;
use utoipa::ToSchema;

use crate::store::{Audit, ConflictReason, Image, NewImage, Store, StoreError};
use crate::time::Timestamp;

/// What live sessions on the source mean for a reflink (the operation's note).
const LIVE_REFLINK: &str =
    ": the reflink is a point-in-time clone, crash-consistent, like a disk after a power cut";
/// What live sessions on the source mean for a sparse copy (the operation's note).
const LIVE_SPARSE: &str = ": the sparse copy reads the image over time while they may write, so it can hold blocks from different moments and is not crash-consistent; for a consistent copy, copy the image while no initiator writes to it";

/// Finished operations kept for `GET /api/v1/operations`.
const KEEP_FINISHED: usize = 64;

/// Whether `name` is a valid image name: 1-64 letters, digits, `.`, `_`, `-`, not
/// starting with `.` or `-` (it becomes a file name and part of an IQN), and not `adopt`
/// (`/api/v1/images/adopt` is an action).
pub fn valid_name(name: &str) -> bool {
    name != "adopt" && plain_name(name)
}

/// 1-64 letters, digits, `.`, `_`, `-`, not starting with `.` or `-` (image and profile
/// names).
pub fn plain_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && !name.starts_with(['.', '-'])
}

/// The file of image `name` (a valid name: no separator, no leading dot, so it stays in
/// `dir`).
pub fn image_path(dir: &Path, name: &str) -> PathBuf {
    debug_assert!(valid_name(name));
    dir.join(format!("{name}.img"))
}

/// State of an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OperationState {
    /// Under way.
    Running,
    /// Complete; the new image exists.
    Done,
    /// Failed; see `error`. Nothing was created.
    Failed,
}

/// How a copy is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CopyMethod {
    /// `ioctl(FICLONE)`: the copy shares the source's blocks until either is written.
    Reflink,
    /// A background copy of the data extents (holes and zero blocks stay unallocated).
    Sparse,
}

/// A background operation on an image (a copy), as the API reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Operation {
    /// Identifier, for `GET /api/v1/operations/{id}`.
    pub id: u64,
    /// `copy`.
    pub kind: String,
    /// The source image.
    pub image: String,
    /// The image being made.
    pub target: String,
    /// Running, done or failed.
    pub state: OperationState,
    /// Reflink or sparse copy; `null` until decided.
    pub method: Option<CopyMethod>,
    /// Bytes of the image handled (holes count as handled).
    pub bytes_done: u64,
    /// The image's size.
    pub bytes_total: u64,
    /// Live iSCSI sessions on the source when the copy started: a reflink is then
    /// crash-consistent (what a power cut would have left), a sparse copy not even that
    /// (see `note`).
    pub live_sessions: usize,
    /// A note for people (crash consistency, the outcome).
    pub note: String,
    /// Why it failed.
    pub error: Option<String>,
    /// Start.
    #[schema(value_type = String)]
    pub started_at: Timestamp,
    /// End.
    #[schema(value_type = Option<String>)]
    pub finished_at: Option<Timestamp>,
}

struct Running {
    view: Mutex<Operation>,
    done: AtomicU64,
}

impl Running {
    fn view(&self) -> Operation {
        let mut v = self
            .view
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if v.state == OperationState::Running {
            v.bytes_done = self.done.load(Ordering::Relaxed);
        }
        v
    }

    fn update(&self, f: impl FnOnce(&mut Operation)) {
        f(&mut self.view.lock().unwrap_or_else(PoisonError::into_inner));
    }
}

/// Image file operations: the images directory, the lock over file changes and the
/// operations.
pub struct ImageOps {
    dir: PathBuf,
    files: Mutex<()>,
    ops: Mutex<VecDeque<Arc<Running>>>,
    next: AtomicU64,
}

impl std::fmt::Debug for ImageOps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageOps")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// Why a copy could not start.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// The source does not exist.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The new name is taken (by a record, a file or a running copy).
    #[error("{0}")]
    Conflict(String),
}

impl ImageOps {
    /// Operations on the image files in `dir`.
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            files: Mutex::new(()),
            ops: Mutex::new(VecDeque::new()),
            next: AtomicU64::new(1),
        }
    }

    /// The images directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Takes the lock over image file changes (blocking).
    pub fn lock_files(&self) -> MutexGuard<'_, ()> {
        self.files.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn ops(&self) -> MutexGuard<'_, VecDeque<Arc<Running>>> {
        self.ops.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every operation, newest first.
    pub fn list(&self) -> Vec<Operation> {
        self.ops().iter().rev().map(|r| r.view()).collect()
    }

    /// One operation.
    pub fn get(&self, id: u64) -> Option<Operation> {
        self.ops()
            .iter()
            .find(|r| r.view().id == id)
            .map(|r| r.view())
    }

    /// A running copy that reads or makes `image`, if any (rename and delete wait for it).
    pub fn busy(&self, image: &str) -> Option<Operation> {
        self.ops()
            .iter()
            .map(|r| r.view())
            .find(|v| v.state == OperationState::Running && (v.image == image || v.target == image))
    }

    /// Starts copying image `source` to a new image `target` on a thread of its own;
    /// `live_sessions` is how many iSCSI sessions use the source now. Blocking.
    pub fn start_copy(
        self: &Arc<Self>,
        store: Arc<dyn Store>,
        audit: Audit,
        source: &str,
        target: &str,
        live_sessions: usize,
    ) -> Result<Operation, CopyError> {
        let src = store.get_image(source)?;
        let running = {
            let _files = self.lock_files();
            match store.get_image(target) {
                Ok(_) => {
                    return Err(CopyError::Conflict(format!(
                        "image {target:?} already exists"
                    )));
                }
                Err(StoreError::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
            // The store refuses it at the end too; say so before copying.
            if let Some(other) = store
                .list_images()?
                .into_iter()
                .find(|i| crate::iscsi::name::same_target(&i.name, target))
            {
                return Err(StoreError::Conflict(ConflictReason::SameTarget {
                    image: target.to_owned(),
                    other: other.name,
                })
                .into());
            }
            if image_path(&self.dir, target).symlink_metadata().is_ok() {
                return Err(CopyError::Conflict(format!(
                    "a file {target}.img exists in the images directory without a record; adopt it (POST /api/v1/images/adopt) or remove it"
                )));
            }
            let mut ops = self.ops();
            if ops
                .iter()
                .any(|r| r.view().state == OperationState::Running && r.view().target == target)
            {
                return Err(CopyError::Conflict(format!(
                    "a copy to {target:?} is already running"
                )));
            }
            let id = self.next.fetch_add(1, Ordering::Relaxed);
            // What that means for the copy is added once the method is known.
            let note = if live_sessions > 0 {
                format!("{source} has {live_sessions} live iSCSI session(s)")
            } else {
                String::new()
            };
            let running = Arc::new(Running {
                view: Mutex::new(Operation {
                    id,
                    kind: "copy".into(),
                    image: source.into(),
                    target: target.into(),
                    state: OperationState::Running,
                    method: None,
                    bytes_done: 0,
                    bytes_total: src.size_bytes,
                    live_sessions,
                    note,
                    error: None,
                    started_at: Timestamp::now(),
                    finished_at: None,
                }),
                done: AtomicU64::new(0),
            });
            ops.push_back(Arc::clone(&running));
            let finished = ops
                .iter()
                .filter(|r| r.view().state != OperationState::Running)
                .count();
            if finished > KEEP_FINISHED
                && let Some(i) = ops
                    .iter()
                    .position(|r| r.view().state != OperationState::Running)
            {
                ops.remove(i);
            }
            running
        };
        let view = running.view();
        let me = Arc::clone(self);
        let thread = std::thread::Builder::new()
            .name(format!("copy-{}", view.id))
            .spawn(move || me.run_copy(&running, store.as_ref(), &audit, &src));
        if let Err(e) = thread {
            tracing::error!(error = %e, "cannot start a copy thread");
        }
        Ok(view)
    }

    fn run_copy(&self, op: &Running, store: &dyn Store, audit: &Audit, src: &Image) {
        let target = op.view().target;
        let part = self.dir.join(format!(".{target}.img.part"));
        let result = self.copy_file(op, src, &part).and_then(|()| {
            let _files = self.lock_files();
            let dest = image_path(&self.dir, &target);
            if dest.symlink_metadata().is_ok() {
                return Err(format!("a file {target}.img appeared during the copy"));
            }
            std::fs::rename(&part, &dest).map_err(|e| format!("renaming the copy: {e}"))?;
            let new = NewImage {
                name: target.clone(),
                size_bytes: src.size_bytes,
                description: src.description.clone(),
                cloned_from: Some(src.name.clone()),
            };
            store.create_image(audit, &new).map_err(|e| {
                let _ = std::fs::remove_file(&dest);
                format!("recording the copy: {e}")
            })
        });
        let _ = std::fs::remove_file(&part);
        let now = Timestamp::now();
        match result {
            Ok(img) => {
                tracing::info!(source = %src.name, image = %img.name, "image copied");
                op.update(|v| {
                    v.state = OperationState::Done;
                    v.bytes_done = v.bytes_total;
                    v.finished_at = Some(now);
                });
            }
            Err(error) => {
                tracing::warn!(source = %src.name, image = %target, %error, "image copy failed");
                op.update(|v| {
                    v.state = OperationState::Failed;
                    v.bytes_done = op.done.load(Ordering::Relaxed);
                    v.error = Some(error);
                    v.finished_at = Some(now);
                });
            }
        }
    }

    /// Copies the source's file to `part`: reflink, else the sparse copy; a source
    /// without a file yet (never logged in to) gives an empty sparse file.
    fn copy_file(&self, op: &Running, src: &Image, part: &Path) -> Result<(), String> {
        let _ = std::fs::remove_file(part);
        let dst = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(part)
            .map_err(|e| format!("creating the copy: {e}"))?;
        let source = match crate::jail::resolve(&self.dir, &format!("{}.img", src.name)) {
            Ok(path) => {
                Some(std::fs::File::open(path).map_err(|e| format!("opening the source: {e}"))?)
            }
            Err(crate::jail::JailError::NotFound) => None,
            Err(e) => return Err(format!("the source file: {e}")),
        };
        let total = src.size_bytes;
        let Some(source) = source else {
            op.update(|v| v.method = Some(CopyMethod::Sparse));
            return dst
                .set_len(total)
                .map_err(|e| format!("sizing the copy: {e}"));
        };
        let source_len = source
            .metadata()
            .map_err(|e| format!("the source file: {e}"))?
            .len();
        if crate::iscsi::file::reflink(&source, &dst).is_ok() {
            op.update(|v| {
                v.method = Some(CopyMethod::Reflink);
                if v.live_sessions > 0 {
                    v.note.push_str(LIVE_REFLINK);
                }
            });
            if source_len != total {
                dst.set_len(total)
                    .map_err(|e| format!("sizing the copy: {e}"))?;
            }
            op.done.store(total, Ordering::Relaxed);
            return dst.sync_all().map_err(|e| format!("syncing the copy: {e}"));
        }
        op.update(|v| {
            v.method = Some(CopyMethod::Sparse);
            if v.live_sessions > 0 {
                v.note.push_str(LIVE_SPARSE);
            }
        });
        crate::iscsi::file::copy_sparse(&source, &dst, total, &mut |at| {
            op.done.store(at, Ordering::Relaxed);
            true
        })
        .map_err(|e| format!("copying: {e}"))
    }

    /// Records every `*.img` file in the images directory that has no record (regular
    /// files with a valid name; symlinks are left alone). Takes the file lock. Blocking.
    pub fn adopt(&self, store: &dyn Store, audit: &Audit) -> Result<Vec<Image>, StoreError> {
        let _files = self.lock_files();
        adopt(&self.dir, store, audit)
    }
}

/// Removes the `.<name>.img.part` files of copies that a stop interrupted (start-up only:
/// no copy runs yet).
pub fn remove_stale_parts(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.filter_map(Result::ok) {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.')
            && name.ends_with(".img.part")
            && e.path().symlink_metadata().is_ok_and(|m| m.is_file())
        {
            match std::fs::remove_file(e.path()) {
                Ok(()) => {
                    tracing::info!(file = %name, "removed the part of an interrupted image copy")
                }
                Err(error) => {
                    tracing::warn!(file = %name, %error, "cannot remove the part of an interrupted image copy")
                }
            }
        }
    }
}

/// [`ImageOps::adopt`] without the lock, for start-up (nothing else runs yet).
pub fn adopt(dir: &Path, store: &dyn Store, audit: &Audit) -> Result<Vec<Image>, StoreError> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(Vec::new());
    };
    let mut files: Vec<(String, u64)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let stem = name.strip_suffix(".img")?.to_owned();
            let meta = e.path().symlink_metadata().ok()?;
            (meta.is_file() && valid_name(&stem)).then_some((stem, meta.len()))
        })
        .collect();
    files.sort();
    let mut adopted = Vec::new();
    for (name, len) in files {
        match store.get_image(&name) {
            Ok(_) => continue,
            Err(StoreError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
        if len == 0 {
            tracing::warn!(image = %name, "not adopting an empty image file");
            continue;
        }
        let new = NewImage {
            name: name.clone(),
            size_bytes: len.div_ceil(512) * 512,
            description: format!("adopted from {name}.img"),
            cloned_from: None,
        };
        let img = match store.adopt_image(audit, &new) {
            Ok(img) => img,
            Err(StoreError::Conflict(why @ ConflictReason::SameTarget { .. })) => {
                tracing::warn!(image = %name, %why, "not adopting an image file");
                continue;
            }
            Err(e) => return Err(e),
        };
        tracing::info!(image = %img.name, size = img.size_bytes, "adopted an image file without a record");
        adopted.push(img);
    }
    Ok(adopted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_create_rules() {
        for ok in ["win11", "a", "base.v2", "x_y-z", &"a".repeat(64)] {
            assert!(valid_name(ok), "{ok:?}");
        }
        for bad in [
            "",
            "adopt",
            ".hidden",
            "-x",
            "a/b",
            "../x",
            "a b",
            &"a".repeat(65),
            "é",
        ] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn orphans_are_adopted_once_and_symlinks_are_not() {
        let dir = std::env::temp_dir().join(format!("netboot-adopt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("orphan.img"), [1u8; 1000]).expect("write");
        std::fs::write(dir.join(".hidden.img"), [1u8; 512]).expect("write");
        std::fs::write(dir.join(".cut.img.part"), [1u8; 512]).expect("write");
        std::fs::write(dir.join("notes.txt"), b"x").expect("write");
        std::os::unix::fs::symlink("/etc/hostname", dir.join("link.img")).expect("symlink");
        let store = crate::store::Sqlite::in_memory().expect("store");
        let got = adopt(&dir, &store, &Audit::system()).expect("adopt");
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].name, "orphan");
        assert_eq!(got[0].size_bytes, 1024, "rounded up to whole sectors");
        assert!(
            adopt(&dir, &store, &Audit::system())
                .expect("again")
                .is_empty()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
