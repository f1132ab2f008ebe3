//! Every map of the eBPF object, and the error type whose failures they count.
//!
//! Map names are defined once in `netboot-common`; the const assertions below keep the
//! `#[map(name = ...)]` literals (which must be literals) equal to them.

use aya_ebpf::{
    macros::map,
    maps::{PerCpuArray, PerCpuHashMap},
};
use netboot_common::{
    Counters, DEFAULT_MAX_MACS, ERROR_MAP_FULL, ERROR_MAP_UPDATE, ERROR_SLOTS, ERROR_TRUNCATED,
    MacKey,
};

/// Per-client counters; see [`netboot_common::MAC_STATS`]. Never LRU: counters are meant to be exact.
///
/// The daemon sets the capacity at load time; [`DEFAULT_MAX_MACS`] is only the fallback.
#[map(name = "MAC_STATS")]
pub(crate) static MAC_STATS: PerCpuHashMap<MacKey, Counters> =
    PerCpuHashMap::with_max_entries(DEFAULT_MAX_MACS, 0);

/// Frames that could not be counted in [`MAC_STATS`], by [`Error`]; see [`netboot_common::ERRORS`].
#[map(name = "ERRORS")]
pub(crate) static ERRORS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(ERROR_SLOTS, 0);

const _: () = {
    assert!(str_eq(netboot_common::MAC_STATS, "MAC_STATS"));
    assert!(str_eq(netboot_common::ERRORS, "ERRORS"));
};

/// Why a frame could not be counted; the discriminant is its slot in [`ERRORS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Error {
    /// [`MAC_STATS`] is full; the frame's client is new and has no entry.
    MapFull = ERROR_MAP_FULL,
    /// Updating [`MAC_STATS`] failed for another reason.
    MapUpdate = ERROR_MAP_UPDATE,
    /// The frame is shorter than an Ethernet header.
    Truncated = ERROR_TRUNCATED,
}

// The error travels in one register.
const _: () = assert!(size_of::<Error>() == size_of::<u32>());

/// Counts one frame of `bytes` bytes in the [`ERRORS`] slot of `err`.
#[inline(always)]
pub(crate) fn record_error(err: Error, bytes: u64) {
    if let Some(counters) = ERRORS.get_ptr_mut(err as u32) {
        // SAFETY: the pointer is this CPU's slot of a per-CPU array, valid while the program
        // runs. TC programs run with migration and bottom halves disabled, so nothing else
        // touches this slot concurrently.
        unsafe {
            (*counters).packets += 1;
            (*counters).bytes += bytes;
        }
    }
}

const fn str_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}
