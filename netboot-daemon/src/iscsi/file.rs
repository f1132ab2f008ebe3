//! The backing of a disk image: a sparse raw file, read and written with `pread`/`pwrite`
//! (and `preadv2(RWF_NOWAIT)` for reads that must not block: page-cache hits only),
//! made durable with `fdatasync`, deallocated with `fallocate(PUNCH_HOLE)`; and copies of
//! image files that keep them sparse: [`reflink`] (`ioctl(FICLONE)`, the blocks are
//! shared) and [`copy_sparse`] (only the data extents, found with `SEEK_DATA`/`SEEK_HOLE`,
//! and within them only the blocks that are not all zeros).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::FileExt as _;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;

use super::scsi::{Backing, write_zeros_with};

/// A sparse image file.
#[derive(Debug)]
pub struct FileBacking {
    file: File,
    read_only: bool,
    /// A read-only view of the file for [`Backing::mapped`], made on first use and made
    /// again when the file has grown past it.
    map: Mutex<Option<Arc<FileMap>>>,
}

impl FileBacking {
    /// Wraps an open file (opened read-write unless `read_only`).
    pub fn new(file: File, read_only: bool) -> Self {
        Self {
            file,
            read_only,
            map: Mutex::new(None),
        }
    }
}

/// A shared, read-only mapping of a whole file. Nothing in this process reads it: its
/// pages go to sockets in `sendmsg`, which the kernel copies from (a page of a file
/// truncated meanwhile fails the send with EFAULT, where a read here would be a SIGBUS).
/// Writes through the file descriptor show in it at once (one page cache).
#[derive(Debug)]
struct FileMap {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value until it is dropped; the
// pointer is never written through, and read only by the kernel.
unsafe impl Send for FileMap {}
// SAFETY: as above; `&FileMap` only hands out the address and the length.
unsafe impl Sync for FileMap {}

/// The page size the mappings and `mincore(2)` work in.
const MAP_PAGE: usize = 4096;

impl FileMap {
    /// Maps the first `len` bytes of `file` (more than 0).
    fn new(file: &File, len: usize) -> io::Result<Self> {
        if len == 0 {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        // SAFETY: a new mapping at an address the kernel picks, of a descriptor that is
        // open for the duration of the call; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = std::ptr::NonNull::new(ptr.cast()).ok_or_else(io::Error::last_os_error)?;
        Ok(Self { ptr, len })
    }

    /// True when every page of `offset..offset + len` is in the page cache now
    /// (`mincore(2)`), so that sending them does not wait for the disk.
    fn resident(&self, offset: usize, len: usize) -> bool {
        let start = offset / MAP_PAGE * MAP_PAGE;
        let end = offset.saturating_add(len).min(self.len);
        if end <= start {
            return false;
        }
        // A MiB of pages per call, on the stack: this runs for every large read.
        let mut pages = [0u8; 256];
        let step = pages.len() * MAP_PAGE;
        (start..end).step_by(step).all(|at| {
            let n = (end - at).min(step);
            // SAFETY: `at` is page-aligned and `at..at + n` lies inside the mapping;
            // mincore writes one byte per page of it, at most `pages.len()`, into `pages`.
            let rc =
                unsafe { libc::mincore(self.ptr.as_ptr().add(at).cast(), n, pages.as_mut_ptr()) };
            rc == 0 && pages[..n.div_ceil(MAP_PAGE)].iter().all(|b| b & 1 == 1)
        })
    }
}

impl Drop for FileMap {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once; no view of it outlives this
        // value (each holds an `Arc` of it).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// A range of a [`FileMap`], the owner of the `Bytes` that [`Backing::mapped`] returns.
struct MapView {
    map: Arc<FileMap>,
    offset: usize,
    len: usize,
}

impl AsRef<[u8]> for MapView {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `offset..offset + len` lies inside the mapping (checked in `mapped`),
        // which lives as long as `self.map`. The slice only carries the address and the
        // length to an iovec: nothing in this process reads it (see `FileMap`).
        unsafe { std::slice::from_raw_parts(self.map.ptr.as_ptr().add(self.offset), self.len) }
    }
}

impl Backing for FileBacking {
    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        // Past the end of the file (an image that was grown in the store but not on disk
        // yet cannot happen: the file is sized first) reads as zeros.
        let mut done = 0;
        while done < buf.len() {
            let n = self.file.read_at(&mut buf[done..], offset + done as u64)?;
            if n == 0 {
                buf[done..].fill(0);
                break;
            }
            done += n;
        }
        Ok(())
    }

    fn read_at_nowait(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let off =
            i64::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: preadv2(2) writes at most `iov_len` bytes into `buf`, which is borrowed
        // mutably for the call; the descriptor is kept open by `self.file`.
        let n = unsafe {
            libc::preadv2(
                self.file.as_raw_fd(),
                &raw const iov,
                1,
                off,
                libc::RWF_NOWAIT,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            // EAGAIN: not all in the page cache; EOPNOTSUPP: no RWF_NOWAIT here.
            return Err(match e.raw_os_error() {
                Some(libc::EAGAIN | libc::EOPNOTSUPP) => io::ErrorKind::WouldBlock.into(),
                _ => e,
            });
        }
        if n as usize != buf.len() {
            // Partly cached, or the end of the file: the blocking read handles both.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(())
    }

    fn mapped(&self, offset: u64, len: usize) -> Option<Bytes> {
        let offset = usize::try_from(offset).ok()?;
        let end = offset.checked_add(len)?;
        let map = {
            let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
            if map.as_ref().is_none_or(|m| end > m.len) {
                let file_len = usize::try_from(self.file.metadata().ok()?.len()).ok()?;
                if end > file_len {
                    return None;
                }
                *map = Some(Arc::new(FileMap::new(&self.file, file_len).ok()?));
            }
            Arc::clone(map.as_ref()?)
        };
        if !map.resident(offset, len) {
            return None;
        }
        Some(Bytes::from_owner(MapView { map, offset, len }))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from(io::ErrorKind::PermissionDenied));
        }
        self.file.write_all_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn extent(&self, offset: u64, len: u64) -> io::Result<(bool, u64)> {
        match seek(&self.file, offset, libc::SEEK_DATA) {
            Ok(Some(data)) if data <= offset => {
                let hole = seek(&self.file, offset, libc::SEEK_HOLE)?.unwrap_or(len);
                Ok((true, hole.min(len)))
            }
            Ok(Some(data)) => Ok((false, data.min(len))),
            // No data at or after `offset` (ENXIO, also past the end of a short file).
            Ok(None) => Ok((false, len)),
            // A filesystem that does not report holes: all allocated.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok((true, len)),
            Err(e) => Err(e),
        }
    }

    fn file(&self) -> Option<&File> {
        Some(&self.file)
    }

    fn unmap(&self, offset: u64, len: u64) -> io::Result<()> {
        self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.fallocate(
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    }
}

impl FileBacking {
    /// fallocate(2) with `mode` (a hole punch or a zeroed range: either way the range
    /// reads as zeros afterwards); on a filesystem without that mode, zeros are written.
    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from(io::ErrorKind::PermissionDenied));
        }
        let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        // SAFETY: fallocate(2) on a file descriptor that `self.file` keeps open; it touches
        // no memory of ours.
        let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, n) };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
            return write_zeros_with(offset, len, |zeros, at| self.file.write_all_at(zeros, at));
        }
        Err(e)
    }
}

/// Makes `dst` share all of `src`'s blocks (`ioctl(FICLONE)`, a reflink): instant and
/// without extra space. Fails with `EOPNOTSUPP`, `EXDEV` or `EINVAL` where the filesystem
/// cannot (ext4, tmpfs, two filesystems); the caller then copies.
pub fn reflink(src: &File, dst: &File) -> io::Result<()> {
    // SAFETY: FICLONE takes the source descriptor as its integer argument; both
    // descriptors are kept open by the `File`s for the call, and no memory is passed.
    let rc = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `lseek(fd, offset, whence)` for `SEEK_DATA`/`SEEK_HOLE`: `Ok(None)` past the last data
/// (`ENXIO`).
fn seek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let off = i64::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: lseek(2) on a descriptor that `file` keeps open; no memory is passed.
    let rc = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if rc >= 0 {
        return Ok(Some(rc as u64));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENXIO) {
        Ok(None)
    } else {
        Err(e)
    }
}

/// The data extents of `file` below `len`, as `(start, end)` pairs; the whole range when
/// the filesystem does not report holes.
pub fn data_extents(file: &File, len: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < len {
        let start = match seek(file, at, libc::SEEK_DATA) {
            Ok(Some(s)) if s < len => s,
            Ok(_) => break,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && at == 0 => {
                return Ok(vec![(0, len)]);
            }
            Err(e) => return Err(e),
        };
        let end = seek(file, start, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        out.push((start, end));
        at = end;
    }
    Ok(out)
}

/// Block size of the zero check in [`copy_sparse`]: a filesystem block.
const ZERO_BLOCK: usize = 4096;
/// Read size of [`copy_sparse`].
const COPY_CHUNK: usize = 1 << 20;

/// Copies the first `len` bytes of `src` to `dst`, which becomes exactly `len` bytes long:
/// only the data extents are read, and of those only the 4 KiB blocks that are not all
/// zeros are written, so `dst` allocates no more blocks than `src`. `progress` is called
/// with the offset reached (holes count as done) and stops the copy by returning `false`
/// (an `Interrupted` error). `dst` is made durable before this returns.
pub fn copy_sparse(
    src: &File,
    dst: &File,
    len: u64,
    progress: &mut dyn FnMut(u64) -> bool,
) -> io::Result<()> {
    dst.set_len(0)?;
    dst.set_len(len)?;
    let src_len = src.metadata()?.len().min(len);
    let mut buf = vec![0u8; COPY_CHUNK];
    for (start, end) in data_extents(src, src_len)? {
        let mut at = start;
        while at < end {
            let n = ((end - at) as usize).min(COPY_CHUNK);
            let chunk = &mut buf[..n];
            src.read_exact_at(chunk, at)?;
            // Write each run of blocks that are not all zeros.
            let mut run: Option<usize> = None;
            for (i, block) in chunk.chunks(ZERO_BLOCK).enumerate() {
                let zero = block.iter().all(|&b| b == 0);
                match (zero, run) {
                    (false, None) => run = Some(i * ZERO_BLOCK),
                    (true, Some(from)) => {
                        dst.write_all_at(&chunk[from..i * ZERO_BLOCK], at + from as u64)?;
                        run = None;
                    }
                    _ => {}
                }
            }
            if let Some(from) = run {
                dst.write_all_at(&chunk[from..], at + from as u64)?;
            }
            at += n as u64;
            if !progress(at) {
                return Err(io::Error::from(io::ErrorKind::Interrupted));
            }
        }
    }
    dst.sync_all()?;
    progress(len);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt as _;

    fn scratch(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("netboot-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        dir
    }

    fn rw(path: &std::path::Path) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .expect("open")
    }

    #[test]
    fn sparse_copies_are_identical_and_allocate_no_more_than_the_source() {
        let dir = scratch("sparse-copy");
        let src = rw(&dir.join("src"));
        let len: u64 = 64 << 20;
        src.set_len(len).expect("size");
        // Data at the start, in the middle (crossing a chunk boundary), a block of zeros
        // that is allocated, and the last block.
        src.write_all_at(&[0x11; 10_000], 0).expect("write");
        src.write_all_at(&vec![0x22; 3 << 20], (20 << 20) - 4096)
            .expect("write");
        src.write_all_at(&[0; 1 << 20], 40 << 20).expect("zeros");
        src.write_all_at(&[0x33; 512], len - 512).expect("write");
        src.sync_all().expect("sync");
        let dst = rw(&dir.join("dst"));
        let mut seen = Vec::new();
        copy_sparse(&src, &dst, len, &mut |at| {
            seen.push(at);
            true
        })
        .expect("copy");
        assert_eq!(seen.last(), Some(&len), "progress ends at the size");
        assert!(seen.windows(2).all(|w| w[0] <= w[1]), "progress only grows");
        assert_eq!(dst.metadata().expect("meta").len(), len);
        let a = std::fs::read(dir.join("src")).expect("read");
        let b = std::fs::read(dir.join("dst")).expect("read");
        assert!(a == b, "the copy differs from the source");
        let (sa, sb) = (
            src.metadata().expect("meta").blocks(),
            dst.metadata().expect("meta").blocks(),
        );
        assert!(sb <= sa, "copy allocates {sb} blocks, source {sa}");
        assert!(sb < (len / 512) / 4, "the copy is sparse: {sb} blocks");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn sparse_copy_of_a_short_file_extends_it_and_can_be_stopped() {
        let dir = scratch("sparse-short");
        let src = rw(&dir.join("src"));
        src.write_all_at(&[7; 4 << 20], 0).expect("write");
        let dst = rw(&dir.join("dst"));
        copy_sparse(&src, &dst, 8 << 20, &mut |_| true).expect("copy");
        let b = std::fs::read(dir.join("dst")).expect("read");
        assert_eq!(b.len(), 8 << 20);
        assert!(b[..4 << 20].iter().all(|&x| x == 7) && b[4 << 20..].iter().all(|&x| x == 0));
        let e = copy_sparse(&src, &dst, 8 << 20, &mut |_| false).expect_err("stopped");
        assert_eq!(e.kind(), io::ErrorKind::Interrupted);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn data_extents_skip_holes() {
        let dir = scratch("extents");
        let f = rw(&dir.join("f"));
        f.set_len(16 << 20).expect("size");
        f.write_all_at(&[1; 4096], 8 << 20).expect("write");
        let ext = data_extents(&f, 16 << 20).expect("extents");
        let total: u64 = ext.iter().map(|(s, e)| e - s).sum();
        assert!(total < 16 << 20, "holes are skipped: {ext:?}");
        assert!(
            ext.iter()
                .any(|&(s, e)| s <= 8 << 20 && e >= (8 << 20) + 4096)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn extents_tell_holes_from_data() {
        let dir = scratch("extent");
        let f = rw(&dir.join("f"));
        let len = 16 << 20;
        f.set_len(len).expect("size");
        f.write_all_at(&[1; 4096], 8 << 20).expect("write");
        let b = FileBacking::new(f, false);
        let (mapped, end) = b.extent(0, len).expect("extent");
        assert!(!mapped && end <= 8 << 20 && end > 0, "a hole first: {end}");
        let (mapped, end) = b.extent(8 << 20, len).expect("extent");
        assert!(
            mapped && end >= (8 << 20) + 4096 && end <= len,
            "then data: {end}"
        );
        assert_eq!(b.extent(len - 512, len).expect("extent"), (false, len));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn holes_read_as_zeros_and_the_size_stays() {
        let dir = std::env::temp_dir().join(format!("netboot-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join("img");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("create");
        f.set_len(1 << 20).expect("size");
        let b = FileBacking::new(f, false);
        b.write_at(&[0xab; 8192], 4096).expect("write");
        b.unmap(4096, 4096).expect("punch");
        let mut buf = vec![0xff; 8192];
        b.read_at(&mut buf, 4096).expect("read");
        assert!(buf[..4096].iter().all(|&x| x == 0));
        assert!(buf[4096..].iter().all(|&x| x == 0xab));
        assert_eq!(b.len().expect("len"), 1 << 20);
        // A cached range reads without blocking; past the end it would block (the
        // blocking read fills zeros).
        let mut cached = vec![0u8; 8192];
        match b.read_at_nowait(&mut cached, 4096) {
            Ok(()) => assert!(cached[4096..].iter().all(|&x| x == 0xab)),
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::WouldBlock),
        }
        let mut tail = [0xff; 16];
        assert_eq!(
            b.read_at_nowait(&mut tail, (1 << 20) - 8)
                .expect_err("short")
                .kind(),
            io::ErrorKind::WouldBlock
        );
        let mut past = [0xff; 16];
        b.read_at(&mut past, (1 << 20) - 8)
            .expect("read past the end");
        assert_eq!(past, [0; 16]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
