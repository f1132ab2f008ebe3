//! The installers directory as folders: listing one, making one, deleting a file or an
//! empty folder. Uploads are in [`super::upload`].
//!
//! Every path is a client path resolved through the [`jail`]: nothing outside
//! `paths.installers` is listed, made or deleted, and symlinks are listed only while they
//! stay inside it. Names starting with `.` are neither listed nor accepted (running
//! uploads are hidden temporary files).

use std::collections::HashMap;
use std::path::{Path as FsPath, PathBuf};
use std::time::UNIX_EPOCH;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, Json, Query};
use super::{AppState, Auth, blocking};
use crate::jail::{self, JailError};
use crate::store::{Installer, Role};
use crate::time::Timestamp;

/// Files and folders a folder's size is summed over at most; beyond, it is not shown.
const SIZE_BUDGET: usize = 20_000;

/// A client path inside the installers directory, normalised; `""` is the directory
/// itself. Hidden components and control characters are refused.
pub(crate) fn relative(raw: &str) -> Result<String, ApiError> {
    let trimmed = raw.trim_matches('/');
    if trimmed.is_empty() {
        return Ok(String::new());
    }
    let rel = jail::normalise(trimmed).map_err(|e| refused(raw, e))?;
    if rel
        .split('/')
        .any(|c| c.starts_with('.') || c.chars().any(char::is_control))
    {
        return Err(ApiError::unprocessable(format!(
            "path {raw:?}: names must not start with '.' or contain control characters"
        )));
    }
    Ok(rel)
}

fn refused(raw: &str, e: JailError) -> ApiError {
    match e {
        JailError::NotFound => ApiError::not_found(format!(
            "path {raw:?}: no such file or folder in the installers directory"
        )),
        e => ApiError::unprocessable(format!("path {raw:?}: {e} in the installers directory")),
    }
}

/// The canonical installers directory and the folder `rel` in it (blocking).
fn folder_in(root: &FsPath, rel: &str) -> Result<(PathBuf, PathBuf), ApiError> {
    let root = root.canonicalize().map_err(ApiError::internal)?;
    if rel.is_empty() {
        return Ok((root.clone(), root));
    }
    let dir = jail::resolve_in(&root, rel).map_err(|e| refused(rel, e))?;
    if !dir.is_dir() {
        return Err(ApiError::not_found(format!(
            "{rel:?} is not a folder in the installers directory"
        )));
    }
    Ok((root, dir))
}

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub(crate) enum EntryKind {
    /// A folder.
    Folder,
    /// A file.
    File,
}

/// One file or folder.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub(crate) struct FolderEntry {
    /// Its name.
    pub(crate) name: String,
    /// Its path relative to the installers directory (`/`-separated).
    pub(crate) path: String,
    /// File or folder.
    pub(crate) kind: EntryKind,
    /// A file's size; a folder's is the sum of the files in it (none when it holds more
    /// than 20000 entries).
    pub(crate) size_bytes: Option<u64>,
    /// A folder's entries (hidden ones not counted).
    pub(crate) items: Option<u64>,
    /// Last modification.
    #[schema(value_type = Option<String>)]
    pub(crate) modified_at: Option<Timestamp>,
    /// The installer record of this path, if any.
    pub(crate) installer_id: Option<i64>,
}

/// A folder of the installers directory.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub(crate) struct Folder {
    /// Its path relative to the installers directory; `""` for the directory itself.
    pub(crate) path: String,
    /// Folders first, then files, each by name.
    pub(crate) entries: Vec<FolderEntry>,
}

/// A file's last modification, if the file system keeps it.
pub(super) fn modified(meta: &std::fs::Metadata) -> Option<Timestamp> {
    let d = meta.modified().ok()?.duration_since(UNIX_EPOCH).ok()?;
    Some(Timestamp(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)))
}

/// Sum of the file sizes under `dir` without following symlinks, and its visible
/// entries; the sum is `None` when the walk exceeds `budget` entries.
fn tree_size(dir: &FsPath, budget: &mut usize) -> Option<u64> {
    let mut sum = 0u64;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        *budget = budget.checked_sub(1)?;
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_dir() {
            sum = sum.saturating_add(tree_size(&entry.path(), budget)?);
        } else if meta.is_file() {
            sum = sum.saturating_add(meta.len());
        }
    }
    Some(sum)
}

fn visible(name: &std::ffi::OsStr) -> Option<String> {
    name.to_str()
        .filter(|n| !n.starts_with('.') && !n.chars().any(char::is_control))
        .map(str::to_owned)
}

/// Lists the folder `rel` of the installers directory at `root` (blocking); `records`
/// maps paths to installer record ids.
pub(crate) fn list(
    root: &FsPath,
    rel: &str,
    records: &HashMap<String, i64>,
) -> Result<Folder, ApiError> {
    let (root, dir) = folder_in(root, rel)?;
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(&dir)
        .map_err(ApiError::internal)?
        .flatten()
    {
        let Some(name) = visible(&entry.file_name()) else {
            continue;
        };
        let path = if rel.is_empty() {
            name.clone()
        } else {
            format!("{rel}/{name}")
        };
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        // A symlink is followed only while it stays inside the directory.
        let target = if kind.is_symlink() {
            match jail::resolve_in(&root, &path) {
                Ok(p) => p,
                Err(_) => continue,
            }
        } else {
            entry.path()
        };
        let Ok(meta) = std::fs::metadata(&target) else {
            continue;
        };
        let (kind, size_bytes, items) = if meta.is_dir() {
            let items = std::fs::read_dir(&target).map_or(0, |d| {
                d.flatten()
                    .filter(|e| visible(&e.file_name()).is_some())
                    .count() as u64
            });
            let mut budget = SIZE_BUDGET;
            (
                EntryKind::Folder,
                tree_size(&target, &mut budget),
                Some(items),
            )
        } else if meta.is_file() {
            (EntryKind::File, Some(meta.len()), None)
        } else {
            continue;
        };
        entries.push(FolderEntry {
            installer_id: records.get(&path).copied(),
            name,
            path,
            kind,
            size_bytes,
            items,
            modified_at: modified(&meta),
        });
    }
    entries.sort_by(|a, b| {
        (a.kind != EntryKind::Folder)
            .cmp(&(b.kind != EntryKind::Folder))
            .then_with(|| a.name.to_lowercase().cmp(&b.name.to_lowercase()))
            .then_with(|| a.name.cmp(&b.name))
    });
    Ok(Folder {
        path: rel.to_owned(),
        entries,
    })
}

/// The installer records by path.
pub(crate) fn records_by_path(installers: &[Installer]) -> HashMap<String, i64> {
    installers.iter().map(|i| (i.path.clone(), i.id)).collect()
}

/// Which folder to list.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(default, deny_unknown_fields)]
pub(super) struct FolderParams {
    /// Path relative to the installers directory; empty for the directory itself.
    path: String,
}

/// Lists a folder of the installers directory: its files and folders with sizes and
/// times, and the installer record of each path that has one.
#[utoipa::path(get, path = "/api/v1/installers/folder", tag = "installers", params(FolderParams),
    responses((status = 200, body = Folder), (status = 404, description = "no such folder"), (status = 422)))]
pub(super) async fn list_folder(
    State(state): State<AppState>,
    _auth: Auth,
    Query(p): Query<FolderParams>,
) -> Result<axum::Json<Folder>, ApiError> {
    let rel = relative(&p.path)?;
    let records = records_by_path(&blocking(&state, |s| s.list_installers()).await?);
    let root = state.paths().installers.clone();
    let folder = tokio::task::spawn_blocking(move || list(&root, &rel, &records))
        .await
        .map_err(ApiError::internal)??;
    Ok(axum::Json(folder))
}

/// A new folder.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewFolder {
    /// Path relative to the installers directory; its parent must exist.
    pub(crate) path: String,
}

/// Makes a folder in the installers directory (operator); its parent must exist.
#[utoipa::path(post, path = "/api/v1/installers/folders", tag = "installers", request_body = NewFolder,
    responses((status = 201, body = FolderEntry), (status = 409, description = "it exists"), (status = 422)))]
pub(super) async fn create_folder(
    State(state): State<AppState>,
    auth: Auth,
    Json(body): Json<NewFolder>,
) -> Result<(StatusCode, axum::Json<FolderEntry>), ApiError> {
    auth.require(Role::Operator)?;
    let rel = relative(&body.path)?;
    if rel.is_empty() {
        return Err(ApiError::unprocessable("a folder needs a name"));
    }
    let root = state.paths().installers.clone();
    let r = rel.clone();
    let made = tokio::task::spawn_blocking(move || -> Result<FolderEntry, ApiError> {
        let (parent, name) = r.rsplit_once('/').unwrap_or(("", r.as_str()));
        let (_, dir) = folder_in(&root, parent)?;
        let path = dir.join(name);
        std::fs::create_dir(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                ApiError::conflict(format!("{r:?} exists already"))
            } else {
                ApiError::internal(e)
            }
        })?;
        let meta = std::fs::metadata(&path).map_err(ApiError::internal)?;
        Ok(FolderEntry {
            name: name.to_owned(),
            path: r.clone(),
            kind: EntryKind::Folder,
            size_bytes: Some(0),
            items: Some(0),
            modified_at: modified(&meta),
            installer_id: None,
        })
    })
    .await
    .map_err(ApiError::internal)??;
    let a = auth.audit();
    blocking(&state, move |s| {
        s.record_audit(
            &a,
            "installer.folder_create",
            &rel,
            &serde_json::Value::Null,
        )
    })
    .await?;
    tracing::info!(path = %made.path, user = %auth.username, "installer folder made");
    Ok((StatusCode::CREATED, axum::Json(made)))
}

/// Deletes a file or an empty folder of the installers directory (operator), and the
/// installer record of that path if there is one.
#[utoipa::path(delete, path = "/api/v1/installers/files/{path}", tag = "installers",
    params(("path" = String, Path, description = "Path relative to the installers directory")),
    responses((status = 204), (status = 404), (status = 409, description = "the folder is not empty"), (status = 422)))]
pub(super) async fn delete_file(
    State(state): State<AppState>,
    auth: Auth,
    Path(raw): Path<String>,
) -> Result<StatusCode, ApiError> {
    auth.require(Role::Operator)?;
    let rel = relative(&raw)?;
    if rel.is_empty() {
        return Err(ApiError::unprocessable(
            "the installers directory itself cannot be deleted",
        ));
    }
    let root = state.paths().installers.clone();
    let r = rel.clone();
    let (kind, size) = tokio::task::spawn_blocking(move || -> Result<_, ApiError> {
        let (parent, name) = r.rsplit_once('/').unwrap_or(("", r.as_str()));
        let (_, dir) = folder_in(&root, parent)?;
        let path = dir.join(name);
        // The entry itself, not what a symlink points to: deleting a link removes the link.
        let meta = std::fs::symlink_metadata(&path).map_err(|_| {
            ApiError::not_found(format!("{r:?}: no such file in the installers directory"))
        })?;
        if meta.is_dir() {
            std::fs::remove_dir(&path).map_err(|e| {
                if e.kind() == std::io::ErrorKind::DirectoryNotEmpty {
                    ApiError::conflict(format!(
                        "the folder {r:?} is not empty: delete what it holds first"
                    ))
                } else {
                    ApiError::internal(e)
                }
            })?;
            Ok(("folder", 0))
        } else {
            std::fs::remove_file(&path).map_err(ApiError::internal)?;
            Ok(("file", meta.len()))
        }
    })
    .await
    .map_err(ApiError::internal)??;
    let a = auth.audit();
    let r = rel.clone();
    blocking(&state, move |s| {
        s.record_audit(
            &a,
            "installer.file_delete",
            &r,
            &serde_json::json!({ "kind": kind, "size_bytes": size }),
        )?;
        for i in s.list_installers()?.into_iter().filter(|i| i.path == r) {
            s.delete_installer(&a, i.id)?;
        }
        Ok(())
    })
    .await?;
    tracing::info!(path = %rel, kind, size, user = %auth.username, "installer file deleted");
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_paths_are_relative_and_visible() {
        assert_eq!(relative("").expect("root"), "");
        assert_eq!(relative("/").expect("root"), "");
        assert_eq!(relative("win/11/").expect("ok"), "win/11");
        assert_eq!(relative("win\\11").expect("ok"), "win/11");
        for bad in [
            "../etc",
            "a/../../b",
            "a/.hidden",
            ".upload",
            "a\u{7}b",
            "C:/x",
        ] {
            assert!(relative(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn listing_sums_folders_hides_dotfiles_and_escaping_links() {
        let base = std::env::temp_dir().join(format!("netboot-folders-{}", std::process::id()));
        let root = base.join("root");
        std::fs::create_dir_all(root.join("win/sources")).expect("mkdir");
        std::fs::write(root.join("win/sources/boot.wim"), vec![0u8; 3000]).expect("write");
        std::fs::write(root.join("win/setup.exe"), vec![0u8; 100]).expect("write");
        std::fs::write(root.join("a.iso"), vec![0u8; 10]).expect("write");
        std::fs::write(root.join(".a.iso.1234.upload"), b"x").expect("write");
        std::fs::write(base.join("secret"), b"x").expect("write");
        std::os::unix::fs::symlink(base.join("secret"), root.join("out")).expect("symlink");
        std::os::unix::fs::symlink("a.iso", root.join("in.iso")).expect("symlink");
        let records = HashMap::from([("a.iso".to_owned(), 7)]);
        let top = list(&root, "", &records).expect("list");
        let names: Vec<&str> = top.entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            ["win", "a.iso", "in.iso"],
            "folders first, no dotfiles"
        );
        assert_eq!(top.entries[0].size_bytes, Some(3100));
        assert_eq!(top.entries[0].items, Some(2));
        assert_eq!(top.entries[1].installer_id, Some(7));
        assert_eq!(top.entries[2].size_bytes, Some(10));
        let win = list(&root, "win", &records).expect("list");
        assert_eq!(win.entries[0].path, "win/sources");
        assert!(list(&root, "missing", &records).is_err());
        assert!(list(&root, "a.iso", &records).is_err(), "not a folder");
        std::fs::remove_dir_all(&base).expect("cleanup");
    }
}
