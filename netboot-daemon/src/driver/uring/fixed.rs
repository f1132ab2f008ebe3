//! Registered buffers (`IORING_REGISTER_BUFFERS`) for the iSCSI ring: one anonymous
//! mapping cut into equal slots, registered once as buffer 0, so that a `READ_FIXED` into
//! a slot skips the per-request pinning and mapping of user memory the plain `READ` does.
//! The slot the read went into then is the Data-In as it is ([`FilledSlot`], handed to the
//! core through [`bytes::Bytes::from_owner`]): the core cuts it into segments and the send
//! goes out of it, no copy anywhere in the target.
//!
//! Ownership: a [`Slot`] is handed to one request at a time; it goes back to the free
//! list when dropped, which happens after the read's CQE (the `FileOp` owns it until then)
//! and after the last PDU naming its bytes was sent (the `Bytes` own it until then). The
//! mapping lives while the pool or any slot holds it; the driver drops the ring, which
//! unregisters it, before the pool.

use std::io;
use std::sync::{Arc, Mutex, PoisonError};

use io_uring::Submitter;

use super::mapping::Mapping;

/// The index every slot's request names: the whole mapping is one registered buffer.
pub(super) const BUF_INDEX: u16 = 0;

/// The registered slots and the list of the free ones. Each slot's bytes belong to the
/// one [`Slot`] holding its index; the mapping is unmapped when the last holder is gone (no
/// request and no `Bytes` use it any more).
pub(super) struct FixedBufs {
    region: Arc<Mapping>,
    free: Arc<Mutex<Vec<u32>>>,
    slot_size: usize,
}

impl std::fmt::Debug for FixedBufs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FixedBufs")
            .field("bytes", &self.region.len())
            .field("slot_size", &self.slot_size)
            .finish_non_exhaustive()
    }
}

impl FixedBufs {
    /// Maps `slots` slots of `slot_size` bytes and registers them with the ring.
    ///
    /// Fails where the kernel refuses to pin that much memory (`RLIMIT_MEMLOCK` without
    /// `CAP_IPC_LOCK`): the caller tries less, or does without.
    pub(super) fn register(
        submitter: &Submitter<'_>,
        slots: u32,
        slot_size: usize,
    ) -> io::Result<Self> {
        let len = (slots as usize)
            .checked_mul(slot_size)
            .filter(|&l| l > 0)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        let region = Arc::new(Mapping::new(len)?);
        let iov = libc::iovec {
            iov_base: region.as_ptr().cast(),
            iov_len: len,
        };
        // SAFETY: the iovec names the mapping just made, which `region` keeps mapped for
        // as long as the ring may use it (the driver drops the ring first).
        unsafe { submitter.register_buffers(&[iov]) }?;
        Ok(Self {
            region,
            free: Arc::new(Mutex::new((0..slots).rev().collect())),
            slot_size,
        })
    }

    /// A free slot, if there is one.
    pub(super) fn take(&self) -> Option<Slot> {
        let idx = self
            .free
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()?;
        Some(Slot {
            region: Arc::clone(&self.region),
            free: Arc::clone(&self.free),
            idx,
            size: self.slot_size,
        })
    }
}

/// One slot, held by one request or one Data-In at a time.
pub(super) struct Slot {
    region: Arc<Mapping>,
    free: Arc<Mutex<Vec<u32>>>,
    idx: u32,
    size: usize,
}

impl Slot {
    /// The slot's first byte (inside registered buffer [`BUF_INDEX`]).
    pub(super) fn ptr(&self) -> *mut u8 {
        // SAFETY: `idx < slots`, so the offset is inside the mapping.
        unsafe { self.region.as_ptr().add(self.idx as usize * self.size) }
    }

    /// Sets `range` of the slot to zero.
    pub(super) fn zero(&mut self, range: std::ops::Range<usize>) {
        let end = range.end.min(self.size);
        let start = range.start.min(end);
        // SAFETY: inside this slot, which `&mut self` holds exclusively (no request is
        // in flight on it while the driver calls this).
        unsafe { self.ptr().add(start).write_bytes(0, end - start) };
    }

    /// The slot with its first `len` bytes filled, as the bytes of a Data-In.
    pub(super) fn filled(self, len: usize) -> FilledSlot {
        FilledSlot {
            len: len.min(self.size),
            slot: self,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.free
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(self.idx);
    }
}

/// A slot a read filled: its bytes, for [`bytes::Bytes::from_owner`].
pub(super) struct FilledSlot {
    slot: Slot,
    len: usize,
}

impl AsRef<[u8]> for FilledSlot {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: the read that filled the first `len` bytes completed before this was
        // made, and nothing writes the slot while this holds it.
        unsafe { std::slice::from_raw_parts(self.slot.ptr(), self.len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_distinct_and_come_back_when_dropped() {
        let ring = io_uring::IoUring::new(4).expect("a ring");
        let Ok(bufs) = FixedBufs::register(&ring.submitter(), 3, 4096) else {
            eprintln!("SKIPPED: this kernel refuses to register 12 KiB of buffers");
            return;
        };
        let a = bufs.take().expect("slot a");
        let b = bufs.take().expect("slot b");
        let c = bufs.take().expect("slot c");
        assert!(bufs.take().is_none(), "three slots, three taken");
        let mut ptrs = [a.ptr() as usize, b.ptr() as usize, c.ptr() as usize];
        ptrs.sort_unstable();
        assert!(ptrs.windows(2).all(|w| w[1] - w[0] == 4096));
        let mut a = a;
        a.zero(0..4096);
        // SAFETY: the slot is ours and was just zeroed.
        unsafe { a.ptr().write(7) };
        let bytes = bytes::Bytes::from_owner(a.filled(2));
        assert_eq!(&bytes[..], &[7, 0]);
        drop(b);
        let _b = bufs.take().expect("a dropped slot is free again");
        assert!(bufs.take().is_none());
        drop(bytes);
        let _a = bufs.take().expect("so is one whose bytes are gone");
        assert!(bufs.take().is_none());
        drop(c);
    }

    #[test]
    fn a_fixed_read_fills_the_slot_with_the_file() {
        use std::io::Write as _;
        use std::os::fd::AsRawFd as _;
        let mut ring = io_uring::IoUring::new(4).expect("a ring");
        let Ok(bufs) = FixedBufs::register(&ring.submitter(), 2, 8192) else {
            eprintln!("SKIPPED: this kernel refuses to register 16 KiB of buffers");
            return;
        };
        // SAFETY: memfd_create(2) with a NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"fixed-read".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
        // SAFETY: a fresh descriptor that nothing else owns.
        let mut file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let content: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        file.write_all(&content).expect("write");
        let _first = bufs.take().expect("slot");
        let slot = bufs.take().expect("the second slot");
        let sqe = io_uring::opcode::ReadFixed::new(
            io_uring::types::Fd(file.as_raw_fd()),
            slot.ptr(),
            5000,
            BUF_INDEX,
        )
        .offset(1000)
        .build();
        // SAFETY: the slot and the file outlive the request, which completes below.
        unsafe { ring.submission().push(&sqe) }.expect("room");
        ring.submit_and_wait(1).expect("submit");
        let res = ring.completion().next().expect("a CQE").result();
        assert_eq!(res, 5000);
        let bytes = bytes::Bytes::from_owner(slot.filled(5000));
        assert!(bytes[..] == content[1000..6000]);
    }
}
