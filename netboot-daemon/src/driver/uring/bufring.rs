//! A provided-buffer ring (`IORING_REGISTER_PBUF_RING`, Linux 5.19): a group of equal
//! buffers from which the kernel picks one for each datagram a multishot receive
//! delivers. The CQE names the buffer (`IORING_CQE_F_BUFFER`); the driver reads it and
//! gives it back with [`BufRing::recycle`], then [`BufRing::publish`] once per batch.
//!
//! Ownership: a buffer belongs to the kernel from the moment its entry is published until
//! a CQE names it, then to the driver until it is recycled. The memory (one anonymous
//! mapping: the ring entries, then the buffers) lives until [`BufRing`] is dropped, which
//! the driver does only after every request that could select a buffer has completed and
//! the group is unregistered (see `Driver::shutdown`).

use std::io;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::Submitter;
use io_uring::types::BufRingEntry;

use super::mapping::Mapping;

/// One registered buffer group.
pub(super) struct BufRing {
    /// The ring entries, then the buffers; unmapped when dropped, which the driver does
    /// only when the kernel can no longer use it (see the module doc).
    map: Mapping,
    entries: u16,
    buf_size: usize,
    bufs_offset: usize,
    tail: u16,
    bgid: u16,
}

impl std::fmt::Debug for BufRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufRing")
            .field("bgid", &self.bgid)
            .field("entries", &self.entries)
            .field("buf_size", &self.buf_size)
            .finish_non_exhaustive()
    }
}

impl BufRing {
    /// Maps `entries` (a power of two) buffers of `buf_size` bytes, hands them all to the
    /// kernel and registers them as group `bgid`.
    pub(super) fn new(
        submitter: &Submitter<'_>,
        bgid: u16,
        entries: u16,
        buf_size: usize,
    ) -> io::Result<Self> {
        if !entries.is_power_of_two() || entries > 32768 || buf_size == 0 {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        let ring_bytes = usize::from(entries) * size_of::<BufRingEntry>();
        let bufs_offset = ring_bytes.next_multiple_of(64);
        let map = Mapping::new(bufs_offset + usize::from(entries) * buf_size)?;
        let mut ring = Self {
            map,
            entries,
            buf_size,
            bufs_offset,
            tail: 0,
            bgid,
        };
        for bid in 0..entries {
            ring.recycle(bid);
        }
        ring.publish();
        // SAFETY: the entries start at a page boundary (a fresh mapping), there are
        // `entries` of them, and the mapping outlives the registration: it goes with the
        // group, which the driver drops only after unregistering it with no request left.
        unsafe {
            submitter.register_buf_ring_with_flags(ring.map.as_ptr() as u64, entries, bgid, 0)?;
        }
        Ok(ring)
    }

    /// The buffer group ID.
    pub(super) fn bgid(&self) -> u16 {
        self.bgid
    }

    /// The first `len` bytes of buffer `bid`, which a CQE has just handed to the driver.
    pub(super) fn get(&self, bid: u16, len: usize) -> &[u8] {
        if bid >= self.entries {
            return &[];
        }
        let len = len.min(self.buf_size);
        // SAFETY: `bid < entries`, so the range lies inside the mapping; a CQE named this
        // buffer, so the kernel has finished writing it and will not touch it again
        // until `recycle` publishes it, which needs `&mut self` and so ends this borrow.
        unsafe {
            std::slice::from_raw_parts(
                self.map
                    .as_ptr()
                    .add(self.bufs_offset + usize::from(bid) * self.buf_size),
                len,
            )
        }
    }

    /// Gives buffer `bid` back to the kernel (visible after [`BufRing::publish`]).
    pub(super) fn recycle(&mut self, bid: u16) {
        if bid >= self.entries {
            return;
        }
        let slot = usize::from(self.tail & (self.entries - 1));
        let addr =
            self.map.as_ptr() as u64 + (self.bufs_offset + usize::from(bid) * self.buf_size) as u64;
        // SAFETY: `slot < entries`, inside the mapping. The kernel only reads entries
        // between its head and the published tail; at most `entries` buffers exist and
        // this one is not in the ring, so the slot at our tail is not among them. The
        // setters write `addr`, `len` and `bid` only, never `resv`, which in entry 0 is
        // the shared tail.
        unsafe {
            let entry = &mut *self.map.as_ptr().cast::<BufRingEntry>().add(slot);
            entry.set_addr(addr);
            entry.set_len(u32::try_from(self.buf_size).unwrap_or(u32::MAX));
            entry.set_bid(bid);
        }
        self.tail = self.tail.wrapping_add(1);
    }

    /// Publishes the recycled buffers to the kernel.
    pub(super) fn publish(&mut self) {
        // SAFETY: the tail is the `resv` field of entry 0, inside the mapping and aligned
        // for a u16; the kernel reads it with an acquire load, so a release store makes
        // the entries written before it visible.
        unsafe {
            let tail = BufRingEntry::tail(self.map.as_ptr().cast::<BufRingEntry>());
            AtomicU16::from_ptr(tail.cast_mut()).store(self.tail, Ordering::Release);
        }
    }
}
