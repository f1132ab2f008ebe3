//! The backing of a disk image: a sparse raw file, read and written with `pread`/`pwrite`,
//! made durable with `fdatasync`, deallocated with `fallocate(PUNCH_HOLE)`.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::FileExt as _;

use super::scsi::Backing;

/// A sparse image file.
#[derive(Debug)]
pub struct FileBacking {
    file: File,
    read_only: bool,
}

impl FileBacking {
    /// Wraps an open file (opened read-write unless `read_only`).
    pub fn new(file: File, read_only: bool) -> Self {
        Self { file, read_only }
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

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from(io::ErrorKind::PermissionDenied));
        }
        self.file.write_all_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn unmap(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from(io::ErrorKind::PermissionDenied));
        }
        let (Ok(off), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        // SAFETY: fallocate(2) on a file descriptor that `self.file` keeps open; it touches
        // no memory of ours.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                len,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
            // A filesystem without holes: write zeros instead, so the range reads as zeros.
            let zeros = vec![0u8; 1 << 20];
            let mut at = offset;
            let end = offset + len as u64;
            while at < end {
                let n = ((end - at) as usize).min(zeros.len());
                self.file.write_all_at(&zeros[..n], at)?;
                at += n as u64;
            }
            return Ok(());
        }
        Err(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let mut past = [0xff; 16];
        b.read_at(&mut past, (1 << 20) - 8)
            .expect("read past the end");
        assert_eq!(past, [0; 16]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
