//! Every map of the eBPF object, and the error type whose failures they count.
//!
//! Map names are defined once in `netboot-common`; the const assertions below keep the
//! `#[map(name = ...)]` literals (which must be literals) equal to them. None of these maps
//! is LRU: a full map refuses new entries and the refusal is counted, nothing is evicted.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap},
};
use netboot_common::{
    BindingValue, Counters, DEFAULT_MAX_BINDINGS, DEFAULT_MAX_FLOWS, DEFAULT_MAX_MACS,
    ERROR_FLOW_FULL, ERROR_MAC_FULL, ERROR_MAP_UPDATE, ERROR_ROUTERS_FULL, ERROR_SLOTS,
    FlowCounters, FlowKey, IfKey, IpKey, MAX_PORTS, MAX_ROUTERS, MAX_UNATTRIBUTED, MacKey, MacOnly,
};

/// Per-client counters; see [`netboot_common::MAC_STATS`].
///
/// The daemon sets the capacity at load time; [`DEFAULT_MAX_MACS`] is only the fallback.
#[map(name = "MAC_STATS")]
pub(crate) static MAC_STATS: PerCpuHashMap<MacKey, Counters> =
    PerCpuHashMap::with_max_entries(DEFAULT_MAX_MACS, 0);

/// Frames no client could be found for; see [`netboot_common::UNATTRIBUTED`].
#[map(name = "UNATTRIBUTED")]
pub(crate) static UNATTRIBUTED: PerCpuHashMap<IfKey, Counters> =
    PerCpuHashMap::with_max_entries(MAX_UNATTRIBUTED, 0);

/// Frames or connections that could not be counted, by [`Error`]; see [`netboot_common::ERRORS`].
#[map(name = "ERRORS")]
pub(crate) static ERRORS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(ERROR_SLOTS, 0);

/// IP → MAC bindings written by the daemon; see [`netboot_common::BINDINGS`].
#[map(name = "BINDINGS")]
pub(crate) static BINDINGS: HashMap<IpKey, BindingValue> =
    HashMap::with_max_entries(DEFAULT_MAX_BINDINGS, 0);

/// Router MACs; see [`netboot_common::ROUTERS`].
#[map(name = "ROUTERS")]
pub(crate) static ROUTERS: HashMap<MacOnly, u8> = HashMap::with_max_entries(MAX_ROUTERS, 0);

/// Service ports written by the daemon; see [`netboot_common::PORTS`].
#[map(name = "PORTS")]
pub(crate) static PORTS: Array<u8> = Array::with_max_entries(MAX_PORTS, 0);

/// Whether [`ROUTERS`] holds anything; see [`netboot_common::HAVE_ROUTERS`].
#[map(name = "HAVE_ROUTERS")]
pub(crate) static HAVE_ROUTERS: Array<u32> = Array::with_max_entries(1, 0);

/// Per-connection counters; see [`netboot_common::FLOWS`].
#[map(name = "FLOWS")]
pub(crate) static FLOWS: PerCpuHashMap<FlowKey, FlowCounters> =
    PerCpuHashMap::with_max_entries(DEFAULT_MAX_FLOWS, 0);

/// Per-CPU working memory for the values too large for the 512-byte BPF stack.
#[repr(C)]
pub(crate) struct Scratch {
    /// The frame's connection, filled by `parse::frame`.
    pub(crate) flow: FlowKey,
    /// A new connection's first counters.
    pub(crate) first: FlowCounters,
}

/// One [`Scratch`] per CPU; the daemon never reads it.
#[map(name = "SCRATCH")]
pub(crate) static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

const _: () = {
    assert!(str_eq(netboot_common::MAC_STATS, "MAC_STATS"));
    assert!(str_eq(netboot_common::UNATTRIBUTED, "UNATTRIBUTED"));
    assert!(str_eq(netboot_common::ERRORS, "ERRORS"));
    assert!(str_eq(netboot_common::BINDINGS, "BINDINGS"));
    assert!(str_eq(netboot_common::ROUTERS, "ROUTERS"));
    assert!(str_eq(netboot_common::PORTS, "PORTS"));
    assert!(str_eq(netboot_common::HAVE_ROUTERS, "HAVE_ROUTERS"));
    assert!(str_eq(netboot_common::FLOWS, "FLOWS"));
};

/// Why a frame or connection could not be counted; the discriminant is its slot in [`ERRORS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Error {
    /// [`MAC_STATS`] is full; the frame's client is new and has no entry.
    MacFull = ERROR_MAC_FULL,
    /// Updating [`MAC_STATS`] or [`UNATTRIBUTED`] failed for another reason.
    MapUpdate = ERROR_MAP_UPDATE,
    /// [`FLOWS`] is full; the connection is new and has no entry.
    FlowFull = ERROR_FLOW_FULL,
    /// [`ROUTERS`] is full; a relay could not be recorded.
    RoutersFull = ERROR_ROUTERS_FULL,
}

// The error travels in one register.
const _: () = assert!(size_of::<Error>() == size_of::<u32>());

/// Counts one frame of `bytes` bytes in the [`ERRORS`] slot of `err`.
#[inline(always)]
pub(crate) fn record_error(err: Error, packets: u64, bytes: u64) {
    if let Some(counters) = ERRORS.get_ptr_mut(err as u32) {
        // SAFETY: the pointer is this CPU's slot of a per-CPU array, valid while the program
        // runs. TC programs run with migration and bottom halves disabled, so nothing else
        // touches this slot concurrently.
        unsafe {
            (*counters).packets += packets;
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
