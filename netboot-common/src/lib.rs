//! Types and constants shared between netboot's eBPF programs and the daemon.
//!
//! Everything here is read by the kernel and by userspace, so it is plain data:
//! `#[repr(C)]` `Copy` structs with explicit padding, and integer constants.
//! There is no logic, no `bool`, no `Option` and no Rust enum in a map key or value.
//! A const assertion pins the size and alignment of every shared type.
//!
//! The `user` feature adds the `aya::Pod` impls that the daemon needs to read the maps.
//!
//! # Attribution
//!
//! Every frame the programs see lands in exactly one bucket: a client's row of
//! [`MAC_STATS`], or the interface's row of [`UNATTRIBUTED`] (or, when a map is full,
//! an [`ERRORS`] slot). The client is, in this order:
//! 1. for DHCP (IPv4 BOOTP with a 6-byte Ethernet `chaddr`): the `chaddr` in the packet;
//! 2. the frame's own MAC (source on ingress, destination on egress) when it is unicast and
//!    not a router's ([`ROUTERS`]: the kernel side adds the sender of every relayed DHCP
//!    request, the daemon adds configured routers). A host on the link is identified by its
//!    MAC whatever address it uses, so an address that moves between hosts misleads nothing;
//! 3. for a router's (or a group-addressed) frame: the MAC the daemon bound to the client's
//!    IP address in [`BINDINGS`] (the source address on ingress, the destination on egress);
//! 4. nobody: the frame is counted in [`UNATTRIBUTED`].
//!
//! The service is found by this host's port in [`PORTS`], which the
//! daemon fills from its configuration and with each TFTP transfer's own server port.
//! TFTP, HTTP and iSCSI packets are also counted per connection in [`FLOWS`].
//!
//! # Versions
//!
//! The daemon pins the maps so that counters survive its restart. Any change to a map's
//! name, key, value or meaning must bump [`LAYOUT_VERSION`], which names the pin directory,
//! so that a new daemon never reuses maps of an older layout.
#![no_std]
#![warn(missing_docs)]

use core::mem::{align_of, size_of};

/// Version of the map layout; part of the pin directory's name (see the crate documentation).
pub const LAYOUT_VERSION: u32 = 5;

/// Name of the per-CPU hash map of per-client counters, keyed by [`MacKey`], valued [`Counters`].
///
/// The map is a plain (never LRU) per-CPU hash, so a full map refuses new clients
/// and counts them in [`ERRORS`] slot [`ERROR_MAC_FULL`] instead of evicting old ones.
pub const MAC_STATS: &str = "MAC_STATS";
/// Name of the per-CPU hash map of frames no client could be found for, keyed by [`IfKey`],
/// valued [`Counters`].
pub const UNATTRIBUTED: &str = "UNATTRIBUTED";
/// Name of the per-CPU array of error counters, indexed by the `ERROR_*` constants, valued [`Counters`].
pub const ERRORS: &str = "ERRORS";
/// Name of the hash map of IP → MAC bindings, keyed by [`IpKey`], valued [`BindingValue`].
/// Written by the daemon only.
pub const BINDINGS: &str = "BINDINGS";
/// Name of the hash map of router MACs, keyed by [`MacOnly`], valued `u8` (a [`ROUTER_*`](ROUTER_DHCP_RELAY) reason).
pub const ROUTERS: &str = "ROUTERS";
/// Name of the array of service ports, indexed by [`port_index`], valued `u8`: 0 for no
/// service, else a `SERVICE_*` constant plus one. Written by the daemon only.
/// An array (one lookup is an inlined index) rather than a hash: it is read for every packet.
pub const PORTS: &str = "PORTS";
/// Name of the one-slot array whose `u32` is non-zero once [`ROUTERS`] holds a router, so
/// that frames skip the router lookup until then.
pub const HAVE_ROUTERS: &str = "HAVE_ROUTERS";
/// Name of the per-CPU hash map of per-connection counters, keyed by [`FlowKey`], valued [`FlowCounters`].
pub const FLOWS: &str = "FLOWS";

/// Default capacity of [`MAC_STATS`]; the daemon overrides it from its configuration.
///
/// Every client uses one entry per interface, direction and service it talks.
pub const DEFAULT_MAX_MACS: u32 = 16384;
/// Default capacity of [`FLOWS`]; the daemon overrides it from its configuration.
pub const DEFAULT_MAX_FLOWS: u32 = 65536;
/// Default capacity of [`BINDINGS`]; the daemon overrides it from its configuration.
pub const DEFAULT_MAX_BINDINGS: u32 = 65536;
/// Capacity of [`UNATTRIBUTED`]: interfaces × 2 directions × services.
pub const MAX_UNATTRIBUTED: u32 = 4096;
/// Capacity of [`ROUTERS`].
pub const MAX_ROUTERS: u32 = 1024;
/// Capacity of [`PORTS`]: every UDP and every TCP port.
pub const MAX_PORTS: u32 = 2 * 65536;

/// The [`PORTS`] slot of a port of `protocol`; `None` for protocols other than TCP and UDP.
#[inline(always)]
pub const fn port_index(protocol: u8, port: u16) -> Option<u32> {
    match protocol {
        IPPROTO_UDP => Some(port as u32),
        IPPROTO_TCP => Some(65536 + port as u32),
        _ => None,
    }
}

/// [`ERRORS`] slot: a frame could not be counted because [`MAC_STATS`] is full.
pub const ERROR_MAC_FULL: u32 = 0;
/// [`ERRORS`] slot: updating [`MAC_STATS`] or [`UNATTRIBUTED`] failed for another reason than a full map.
pub const ERROR_MAP_UPDATE: u32 = 1;
/// [`ERRORS`] slot: a frame's connection could not be counted because [`FLOWS`] is full.
/// The frame itself is still counted per client; this slot is not part of the reconciliation.
pub const ERROR_FLOW_FULL: u32 = 2;
/// [`ERRORS`] slot: a router could not be recorded because [`ROUTERS`] is full.
/// The frame itself is still counted; this slot is not part of the reconciliation.
pub const ERROR_ROUTERS_FULL: u32 = 3;
/// Number of slots in [`ERRORS`].
pub const ERROR_SLOTS: u32 = 4;

/// A direction: the frame was received by the interface.
pub const INGRESS: u8 = 0;
/// A direction: the frame was sent by the interface.
pub const EGRESS: u8 = 1;

/// [`MacKey::service`]: DHCP or PXE proxyDHCP.
pub const SERVICE_DHCP: u8 = 0;
/// [`MacKey::service`]: TFTP requests on port 69 and the transfers on their own server ports.
pub const SERVICE_TFTP: u8 = 1;
/// [`MacKey::service`]: HTTP.
pub const SERVICE_HTTP: u8 = 2;
/// [`MacKey::service`]: iSCSI.
pub const SERVICE_ISCSI: u8 = 3;
/// [`MacKey::service`]: everything else, including non-IP frames (ARP, LLDP) and IP fragments.
pub const SERVICE_OTHER: u8 = 4;

/// [`ROUTERS`] value: the MAC sent a relayed DHCP request (non-zero `giaddr`).
pub const ROUTER_DHCP_RELAY: u8 = 1;
/// [`ROUTERS`] value: the daemon's configuration names the MAC as a router.
pub const ROUTER_CONFIGURED: u8 = 2;

/// IP protocol number of TCP, as in [`FlowKey::protocol`].
pub const IPPROTO_TCP: u8 = 6;
/// IP protocol number of UDP, as in [`FlowKey::protocol`].
pub const IPPROTO_UDP: u8 = 17;

/// DHCP server port (RFC 2131 section 4.1).
pub const PORT_DHCP_SERVER: u16 = 67;
/// DHCP client port (RFC 2131 section 4.1).
pub const PORT_DHCP_CLIENT: u16 = 68;
/// PXE proxyDHCP port (PXE 2.1 specification, RFC 4578).
pub const PORT_PXE_PROXY: u16 = 4011;
/// TFTP server port (RFC 1350 section 4).
pub const PORT_TFTP: u16 = 69;
/// iSCSI target port (RFC 7143 section 13.1).
pub const PORT_ISCSI: u16 = 3260;

/// [`MacKey::method`]: the client was found by the `chaddr` of a DHCP packet.
pub const METHOD_CHADDR: u8 = 0;
/// [`MacKey::method`]: the client was found by the frame's own MAC.
pub const METHOD_L2: u8 = 1;
/// [`MacKey::method`]: the client was found by the binding of its IP address.
pub const METHOD_BINDING: u8 = 2;

/// Key of [`MAC_STATS`]: one client, on one interface, in one direction, of one service,
/// found one way.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MacKey {
    /// The client's MAC (see the crate documentation for how it is found).
    pub mac: [u8; 6],
    /// [`INGRESS`] or [`EGRESS`].
    pub direction: u8,
    /// One of the `SERVICE_*` constants.
    pub service: u8,
    /// The interface's index in its network namespace.
    pub ifindex: u32,
    /// How the client was found: one of the `METHOD_*` constants.
    pub method: u8,
    /// Always zero.
    pub pad: [u8; 3],
}

/// Key of [`UNATTRIBUTED`]: one interface, one direction, one service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IfKey {
    /// The interface's index in its network namespace.
    pub ifindex: u32,
    /// [`INGRESS`] or [`EGRESS`].
    pub direction: u8,
    /// One of the `SERVICE_*` constants.
    pub service: u8,
    /// Always zero.
    pub pad: [u8; 2],
}

/// Key of [`BINDINGS`]: an IPv6 address, or an IPv4 address mapped into IPv6 (`::ffff:a.b.c.d`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IpKey {
    /// The address in network byte order.
    pub addr: [u8; 16],
}

/// Value of [`BINDINGS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BindingValue {
    /// The client the address belongs to.
    pub mac: [u8; 6],
    /// Always zero.
    pub pad: [u8; 2],
}

/// Key of [`ROUTERS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MacOnly {
    /// The router's MAC.
    pub mac: [u8; 6],
    /// Always zero.
    pub pad: [u8; 2],
}

/// Key of [`FLOWS`]: one connection (TCP) or socket pair (UDP) on one interface.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// The client's address (IPv4 mapped into IPv6), network byte order.
    pub client: [u8; 16],
    /// The server's address (IPv4 mapped into IPv6), network byte order.
    pub server: [u8; 16],
    /// The client's port, host byte order.
    pub client_port: u16,
    /// The server's port, host byte order.
    pub server_port: u16,
    /// [`IPPROTO_TCP`] or [`IPPROTO_UDP`].
    pub protocol: u8,
    /// One of the `SERVICE_*` constants.
    pub service: u8,
    /// Always zero.
    pub pad: [u8; 2],
    /// The interface's index in its network namespace.
    pub ifindex: u32,
}

/// Value of [`MAC_STATS`], [`UNATTRIBUTED`] and [`ERRORS`]: frames and bytes.
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

/// Value of [`FLOWS`]: one connection's frames, wire bytes and L4 payload bytes, per direction.
///
/// Payload is what the sockets sent and received as it crossed the interface: the UDP
/// payload, or the TCP segment data (so TCP retransmissions count again).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowCounters {
    /// Frames from the client.
    pub rx_packets: u64,
    /// Wire bytes from the client, as in [`Counters::bytes`].
    pub rx_bytes: u64,
    /// L4 payload bytes from the client.
    pub rx_payload: u64,
    /// Frames to the client.
    pub tx_packets: u64,
    /// Wire bytes to the client.
    pub tx_bytes: u64,
    /// L4 payload bytes to the client.
    pub tx_payload: u64,
    /// `bpf_ktime_get_coarse_ns` (CLOCK_MONOTONIC, a few milliseconds coarse) of the last
    /// frame this CPU counted.
    pub last_seen_ns: u64,
    /// The client the last frame this CPU counted was attributed to; zero if none.
    pub mac: [u8; 6],
    /// Always zero.
    pub pad: [u8; 2],
}

const _: () = {
    assert!(size_of::<MacKey>() == 16);
    assert!(align_of::<MacKey>() == 4);
    assert!(size_of::<IfKey>() == 8);
    assert!(size_of::<IpKey>() == 16);
    assert!(size_of::<BindingValue>() == 8);
    assert!(size_of::<MacOnly>() == 8);
    assert!(size_of::<FlowKey>() == 44);
    assert!(align_of::<FlowKey>() == 4);
    assert!(size_of::<Counters>() == 16);
    assert!(align_of::<Counters>() == 8);
    assert!(size_of::<FlowCounters>() == 64);
    assert!(ERROR_MAC_FULL < ERROR_SLOTS);
    assert!(ERROR_MAP_UPDATE < ERROR_SLOTS);
    assert!(ERROR_FLOW_FULL < ERROR_SLOTS);
    assert!(ERROR_ROUTERS_FULL < ERROR_SLOTS);
    // Kernel map names hold at most 15 bytes plus the terminating NUL.
    assert!(MAC_STATS.len() < 16);
    assert!(UNATTRIBUTED.len() < 16);
    assert!(ERRORS.len() < 16);
    assert!(BINDINGS.len() < 16);
    assert!(ROUTERS.len() < 16);
    assert!(PORTS.len() < 16);
    assert!(HAVE_ROUTERS.len() < 16);
    assert!(FLOWS.len() < 16);
};

/// Marks the shared types as plain old data for aya (userspace only).
#[cfg(feature = "user")]
macro_rules! pod {
    ($($t:ty),*) => {$(
        // SAFETY: the type is `repr(C)`, `Copy`, has no padding (its size is asserted above
        // to equal the sum of its fields) and every bit pattern is valid.
        unsafe impl aya::Pod for $t {}
    )*};
}
#[cfg(feature = "user")]
pod!(
    MacKey,
    IfKey,
    IpKey,
    BindingValue,
    MacOnly,
    FlowKey,
    Counters,
    FlowCounters
);
