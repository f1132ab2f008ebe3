//! Types and constants shared between netboot's eBPF programs and the daemon.
//!
//! Everything here is read by the kernel and by userspace, so it is plain data:
//! `#[repr(C)]` `Copy` structs with explicit padding, and integer constants.
//! There is no logic, no `bool`, no `Option` and no Rust enum in a map key or value.
//! A const assertion pins the size and alignment of every shared type.
//!
//! The `user` feature adds the `aya::Pod` impls that the daemon needs to read the maps.
//!
//! Key types: [`MacKey`] and [`Counters`] for the per-client map [`MAC_STATS`],
//! and the error slots of [`ERRORS`].
#![no_std]
#![warn(missing_docs)]

use core::mem::{align_of, size_of};

/// Name of the per-CPU hash map of per-client counters, keyed by [`MacKey`], valued [`Counters`].
///
/// The map is a plain (never LRU) per-CPU hash, so a full map refuses new clients
/// and counts them in [`ERRORS`] slot [`ERROR_MAP_FULL`] instead of evicting old ones.
pub const MAC_STATS: &str = "MAC_STATS";

/// Name of the per-CPU array of error counters, indexed by the `ERROR_*` constants, valued [`Counters`].
pub const ERRORS: &str = "ERRORS";

/// Default capacity of [`MAC_STATS`]; the daemon overrides it from its configuration.
///
/// Every client uses one entry per direction and service it talks.
pub const DEFAULT_MAX_MACS: u32 = 16384;

/// [`ERRORS`] slot: a frame could not be counted because [`MAC_STATS`] is full.
pub const ERROR_MAP_FULL: u32 = 0;
/// [`ERRORS`] slot: updating [`MAC_STATS`] failed for another reason than a full map.
pub const ERROR_MAP_UPDATE: u32 = 1;
/// [`ERRORS`] slot: the frame was too short to hold an Ethernet header.
pub const ERROR_TRUNCATED: u32 = 2;
/// Number of slots in [`ERRORS`].
pub const ERROR_SLOTS: u32 = 3;

/// [`MacKey::direction`]: the frame was received by the interface; the key is its source MAC.
pub const INGRESS: u8 = 0;
/// [`MacKey::direction`]: the frame was sent by the interface; the key is its destination MAC.
pub const EGRESS: u8 = 1;

/// [`MacKey::service`]: DHCP or PXE proxyDHCP (UDP 67, 68 or 4011, either port).
pub const SERVICE_DHCP: u8 = 0;
/// [`MacKey::service`]: TFTP requests (UDP 69, either port).
///
/// Transfers continue on ephemeral ports (RFC 1350 TIDs) and are counted as [`SERVICE_OTHER`] for now.
pub const SERVICE_TFTP: u8 = 1;
/// [`MacKey::service`]: HTTP (TCP 80 or 8080, either port).
pub const SERVICE_HTTP: u8 = 2;
/// [`MacKey::service`]: iSCSI (TCP 3260, either port).
pub const SERVICE_ISCSI: u8 = 3;
/// [`MacKey::service`]: everything else, including non-IP frames (ARP, LLDP) and IP fragments.
pub const SERVICE_OTHER: u8 = 4;

/// DHCP server port (RFC 2131 section 4.1).
pub const PORT_DHCP_SERVER: u16 = 67;
/// DHCP client port (RFC 2131 section 4.1).
pub const PORT_DHCP_CLIENT: u16 = 68;
/// PXE proxyDHCP port (PXE 2.1 specification, RFC 4578).
pub const PORT_PXE_PROXY: u16 = 4011;
/// TFTP server port (RFC 1350 section 4).
pub const PORT_TFTP: u16 = 69;
/// HTTP port.
pub const PORT_HTTP: u16 = 80;
/// Alternative HTTP port, the daemon's default listener.
pub const PORT_HTTP_ALT: u16 = 8080;
/// iSCSI target port (RFC 7143 section 13.1).
pub const PORT_ISCSI: u16 = 3260;

/// Key of [`MAC_STATS`]: one client, one direction, one service.
///
/// Eight bytes with alignment 1, so there is no padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MacKey {
    /// The client's MAC: the source MAC on ingress, the destination MAC on egress.
    pub mac: [u8; 6],
    /// [`INGRESS`] or [`EGRESS`].
    pub direction: u8,
    /// One of the `SERVICE_*` constants.
    pub service: u8,
}

/// Value of [`MAC_STATS`] and [`ERRORS`]: frames and bytes.
///
/// Bytes are the frame as on the wire without FCS: `skb->len` (Ethernet header through
/// payload), plus 4 when an 802.1Q tag was moved out of the data into `skb->vlan_tci`
/// (at ingress the kernel always does that before TC runs). That is what the interface's own
/// `rx_bytes`/`tx_bytes` count, except that a veth counts a *sent* frame whose tag is still
/// offloaded (e.g. from a VLAN device on top of it) without the tag.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Frames (TC invocations; a GSO/GRO super-packet counts once).
    pub packets: u64,
    /// Bytes, see the type's documentation.
    pub bytes: u64,
}

const _: () = {
    assert!(size_of::<MacKey>() == 8);
    assert!(align_of::<MacKey>() == 1);
    assert!(size_of::<Counters>() == 16);
    assert!(align_of::<Counters>() == 8);
    assert!(ERROR_MAP_FULL < ERROR_SLOTS);
    assert!(ERROR_MAP_UPDATE < ERROR_SLOTS);
    assert!(ERROR_TRUNCATED < ERROR_SLOTS);
    // Kernel map names hold at most 15 bytes plus the terminating NUL.
    assert!(MAC_STATS.len() < 16);
    assert!(ERRORS.len() < 16);
};

// SAFETY: `MacKey` is `repr(C)`, `Copy`, has no padding (asserted above) and every bit pattern is valid.
#[cfg(feature = "user")]
unsafe impl aya::Pod for MacKey {}
// SAFETY: `Counters` is `repr(C)`, `Copy`, has no padding (asserted above) and every bit pattern is valid.
#[cfg(feature = "user")]
unsafe impl aya::Pod for Counters {}
