//! An anonymous private mapping: memory the kernel uses through a ring (provided-buffer
//! rings, registered buffers), page-aligned, unmapped when dropped.

use std::io;
use std::ptr::NonNull;

/// `len` bytes of anonymous memory, zeroed, page-aligned.
pub(super) struct Mapping {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: plain memory; who may touch which part of it is for its owner to decide (each
// user documents it), and `&Mapping` gives access to nothing by itself.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes.
    pub(super) fn new(len: usize) -> io::Result<Self> {
        if len == 0 {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        // SAFETY: an anonymous private mapping: no file, no fixed address; the kernel
        // checks the arguments and the result is checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(p.cast::<u8>()).ok_or_else(io::Error::last_os_error)?;
        Ok(Self { base, len })
    }

    /// The first byte.
    pub(super) fn as_ptr(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    /// Bytes mapped.
    pub(super) fn len(&self) -> usize {
        self.len
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` are the mapping made in `new`, unmapped once; its owners
        // drop it only when no request can use it any more (see theirs).
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}
