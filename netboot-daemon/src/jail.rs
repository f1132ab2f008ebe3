//! Path jail: resolves a client-supplied relative path inside a root directory, so that
//! nothing escapes it: not `..`, not absolute paths, not symlinks pointing outside.
//! [`normalise_rooted`] reads an absolute TFTP path as one inside the root instead.
//! Errors never reveal server paths.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Component, Path, PathBuf};

/// Why a path was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JailError {
    /// Empty, absolute, or containing `..`, NUL or a drive prefix.
    #[error("path is not a plain relative path")]
    NotRelative,
    /// The path resolves outside the root (through a symlink).
    #[error("path leaves the served directory")]
    Escapes,
    /// Nothing exists at that path.
    #[error("no such file")]
    NotFound,
    /// Something that is not a regular file (a directory, a FIFO, a device) is there.
    #[error("not a regular file")]
    NotAFile,
}

/// Normalises a client path: `\` becomes `/`, empty and `.` components are dropped;
/// absolute paths, `..`, NUL and Windows drive prefixes are refused.
pub fn normalise(raw: &str) -> Result<String, JailError> {
    if raw.contains('\0') {
        return Err(JailError::NotRelative);
    }
    let unified = raw.replace('\\', "/");
    if unified.starts_with('/') {
        return Err(JailError::NotRelative);
    }
    let mut parts = Vec::new();
    for c in Path::new(&unified).components() {
        match c {
            Component::Normal(p) => parts.push(p.to_str().ok_or(JailError::NotRelative)?),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(JailError::NotRelative);
            }
        }
    }
    let drive = |c: &str| c.len() == 2 && c.as_bytes()[0].is_ascii_alphabetic() && c.ends_with(':');
    if parts.first().is_none_or(|c| drive(c)) {
        return Err(JailError::NotRelative);
    }
    Ok(parts.join("/"))
}

/// A client path that may be absolute, made relative to the root (TFTP: configurations
/// written for tftpd-hpa or dnsmasq, and GRUB, whose prefix is `/boot/grub`, ask for
/// `/boot/grub/x86_64-efi/normal.mod` or, as tftpd-hpa without `-s` reads them, for
/// `/srv/tftp/pxelinux.0`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rooted {
    /// The path relative to the root, [`normalise`]d.
    pub rel: String,
    /// Whether the client wrote an absolute path. Such a path that names no file in the
    /// root is refused as one outside it, not reported missing.
    pub absolute: bool,
}

/// Normalises a client path like [`normalise`], but reads a leading `/` (or `\`) as the
/// root: the path is made relative by removing one of `roots` (the root's own absolute
/// path, as configured and canonical) when it starts with it, else the leading
/// separators. `..` stays refused, also right after the root's path.
pub fn normalise_rooted(raw: &str, roots: &[&Path]) -> Result<Rooted, JailError> {
    if raw.contains('\0') {
        return Err(JailError::NotRelative);
    }
    let unified = raw.replace('\\', "/");
    if !unified.starts_with('/') {
        return normalise(&unified).map(|rel| Rooted {
            rel,
            absolute: false,
        });
    }
    // Component by component: `/srv/tftpx/a` does not start with `/srv/tftp`.
    let inside = roots
        .iter()
        .filter(|r| r.is_absolute())
        .find_map(|r| Path::new(&unified).strip_prefix(r).ok())
        .and_then(Path::to_str)
        .unwrap_or(&unified);
    normalise(inside.trim_start_matches('/')).map(|rel| Rooted {
        rel,
        absolute: true,
    })
}

/// Resolves `raw` inside `root` to an existing path, following symlinks only while they
/// stay inside `root`.
pub fn resolve(root: &Path, raw: &str) -> Result<PathBuf, JailError> {
    let rel = normalise(raw)?;
    let root = root.canonicalize().map_err(|_| JailError::NotFound)?;
    resolve_in(&root, &rel)
}

/// [`resolve`] for a root that is already canonical and a path already [`normalise`]d
/// (callers that serve many requests do both once).
pub fn resolve_in(canonical_root: &Path, rel: &str) -> Result<PathBuf, JailError> {
    let full = canonical_root
        .join(rel)
        .canonicalize()
        .map_err(|_| JailError::NotFound)?;
    if full.starts_with(canonical_root) {
        Ok(full)
    } else {
        Err(JailError::Escapes)
    }
}

/// Opens the regular file at the normalised `rel` inside `canonical_root`: its path, the
/// open file and its metadata. Anything but a regular file is `NotAFile`.
///
/// It blocks only on the file system, never on the file: the open is non-blocking (the
/// io_uring TFTP driver opens files on its ring's thread, and opening a FIFO for reading
/// otherwise waits for a writer), and the file is checked with `fstat` before anything
/// reads it. The last component is not followed: the path is canonical, so a symlink
/// there now was put there since it was checked.
pub fn open_in(
    canonical_root: &Path,
    rel: &str,
) -> Result<(PathBuf, File, std::fs::Metadata), JailError> {
    let path = resolve_in(canonical_root, rel)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_NOCTTY)
        .open(&path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => JailError::Escapes,
            _ => JailError::NotFound,
        })?;
    let meta = file.metadata().map_err(|_| JailError::NotFound)?;
    if !meta.is_file() {
        return Err(JailError::NotAFile);
    }
    set_blocking(&file).map_err(|_| JailError::NotFound)?;
    Ok((path, file, meta))
}

/// Clears `O_NONBLOCK`, which was only for the open: io_uring fails reads of a
/// non-blocking file with `EAGAIN` on file systems that cannot read asynchronously,
/// instead of waiting for the disk.
#[allow(unsafe_code, reason = "fcntl(2); the block has a SAFETY comment")]
fn set_blocking(file: &File) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: fcntl(2) with F_GETFL and F_SETFL takes and returns integers only, on a
    // descriptor that `file` keeps open for the duration of both calls.
    let rc = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 {
            flags
        } else {
            libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK)
        }
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// [`open_in`] for a client path under a root given as configured.
pub fn open(root: &Path, raw: &str) -> Result<(PathBuf, File, std::fs::Metadata), JailError> {
    let rel = normalise(raw)?;
    let root = root.canonicalize().map_err(|_| JailError::NotFound)?;
    open_in(&root, &rel)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_and_refuses_escapes() {
        assert_eq!(
            normalise("win\\sources\\boot.wim"),
            Ok("win/sources/boot.wim".into())
        );
        assert_eq!(normalise("./a//b/."), Ok("a/b".into()));
        for bad in [
            "",
            ".",
            "/etc/passwd",
            "a/../../b",
            "..",
            "C:/x",
            "\\\\srv\\x",
            "a\0b",
        ] {
            assert_eq!(normalise(bad), Err(JailError::NotRelative), "{bad:?}");
        }
    }

    #[test]
    fn absolute_paths_are_read_from_the_root() {
        let root = Path::new("/srv/tftp");
        let canonical = Path::new("/data/tftp");
        let rooted = |raw| normalise_rooted(raw, &[root, canonical]);
        let abs = |rel: &str| {
            Ok(Rooted {
                rel: rel.into(),
                absolute: true,
            })
        };
        assert_eq!(
            rooted("boot\\bcd"),
            Ok(Rooted {
                rel: "boot/bcd".into(),
                absolute: false
            })
        );
        assert_eq!(
            rooted("/boot/grub/x86_64-efi/normal.mod"),
            abs("boot/grub/x86_64-efi/normal.mod")
        );
        assert_eq!(rooted("/srv/tftp/pxelinux.0"), abs("pxelinux.0"));
        assert_eq!(rooted("/data/tftp/pxelinux.0"), abs("pxelinux.0"));
        assert_eq!(rooted("//srv//tftp/./a"), abs("a"));
        assert_eq!(rooted("\\Boot\\BCD"), abs("Boot/BCD"));
        assert_eq!(rooted("/srv/tftpx/a"), abs("srv/tftpx/a"));
        assert_eq!(
            rooted("/etc/passwd"),
            abs("etc/passwd"),
            "inside the root, where it is not: refused by the caller"
        );
        for bad in [
            "/",
            "/srv/tftp",
            "/../etc/passwd",
            "/srv/tftp/../secret",
            "/srv/tftp/a/../../b",
            "/a\0b",
        ] {
            assert_eq!(rooted(bad), Err(JailError::NotRelative), "{bad:?}");
        }
        assert_eq!(
            normalise_rooted("/srv/tftp/x", &[Path::new("srv/tftp")]),
            abs("srv/tftp/x"),
            "a relative root is no prefix"
        );
    }

    #[test]
    fn symlinks_out_of_the_root_are_refused() {
        let dir = std::env::temp_dir().join(format!("netboot-jail-{}", std::process::id()));
        let root = dir.join("root");
        std::fs::create_dir_all(root.join("sub")).expect("mkdir");
        std::fs::write(dir.join("secret"), b"x").expect("write");
        std::fs::write(root.join("sub/ok.iso"), b"x").expect("write");
        std::os::unix::fs::symlink(dir.join("secret"), root.join("link")).expect("symlink");
        std::os::unix::fs::symlink("sub/ok.iso", root.join("inside")).expect("symlink");
        assert!(resolve(&root, "sub/ok.iso").is_ok());
        assert!(resolve(&root, "inside").is_ok());
        assert_eq!(resolve(&root, "link"), Err(JailError::Escapes));
        assert_eq!(resolve(&root, "missing"), Err(JailError::NotFound));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn only_regular_files_open_and_a_fifo_does_not_block() {
        let dir = std::env::temp_dir().join(format!("netboot-jail-open-{}", std::process::id()));
        let root = dir.join("root");
        std::fs::create_dir_all(root.join("sub")).expect("mkdir");
        std::fs::write(root.join("file"), b"x").expect("write");
        let made = std::process::Command::new("mkfifo")
            .arg(root.join("fifo"))
            .status()
            .expect("run mkfifo");
        assert!(made.success());
        let root = root.canonicalize().expect("canonical");
        // Without a writer, a blocking open of the FIFO would never return.
        assert_eq!(open_in(&root, "fifo").err(), Some(JailError::NotAFile));
        assert_eq!(open_in(&root, "sub").err(), Some(JailError::NotAFile));
        let (_, file, meta) = open_in(&root, "file").expect("a regular file");
        assert_eq!(meta.len(), 1);
        // Reads of the open file block as usual (the flag was only for the open).
        let fdinfo = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", file.as_raw_fd()))
            .expect("fdinfo");
        let flags = fdinfo
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|f| i32::from_str_radix(f.trim(), 8).ok())
            .expect("flags");
        assert_eq!(flags & libc::O_NONBLOCK, 0, "flags {flags:o}");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    proptest::proptest! {
        #[test]
        fn normalised_paths_never_escape(raw in "[a-z./\\\\:]{0,30}") {
            if let Ok(p) = normalise(&raw) {
                proptest::prop_assert!(!p.starts_with('/'));
                proptest::prop_assert!(p.split('/').all(|c| !c.is_empty() && c != ".." && c != "."));
                proptest::prop_assert_eq!(normalise(&p), Ok(p.clone()), "idempotent");
            }
        }

        #[test]
        fn rooted_paths_never_escape(raw in "[a-z./\\\\:]{0,30}") {
            if let Ok(r) = normalise_rooted(&raw, &[Path::new("/a/b")]) {
                proptest::prop_assert!(!r.rel.starts_with('/'));
                proptest::prop_assert!(r.rel.split('/').all(|c| !c.is_empty() && c != ".." && c != "."));
            }
        }
    }
}
