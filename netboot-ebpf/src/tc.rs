//! The TC/TCX classifiers: count every frame per (client MAC, interface, direction, service),
//! or as unattributed, and TFTP, HTTP and iSCSI packets per connection.
//!
//! Both programs are attached either as TCX links (kernel 6.6 and later) or as
//! direct-action filters on a clsact qdisc, and both always return `TC_ACT_UNSPEC`
//! (-1, which TCX reads as `TCX_NEXT`): they observe and never change a packet's fate.
//! How a frame's client is found is described in `netboot-common`'s crate documentation.
#![allow(
    clippy::needless_borrows_for_generic_args,
    reason = "the flow key and binding address are passed by reference on purpose: by value they would be copied to the 512-byte BPF stack"
)]

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST, TC_ACT_UNSPEC},
    helpers::bpf_ktime_get_coarse_ns,
    macros::classifier,
    programs::TcContext,
};
use aya_log_ebpf::debug;
use netboot_common::{
    Counters, EGRESS, FlowCounters, FlowKey, INGRESS, IpKey, METHOD_BINDING, METHOD_CHADDR,
    METHOD_L2, MacKey, ROUTER_DHCP_RELAY, SERVICE_DHCP, SERVICE_HTTP, SERVICE_ISCSI, SERVICE_OTHER,
    SERVICE_TFTP, port_index,
};

use crate::{
    keys,
    maps::{
        BINDINGS, Error, FLOWS, HAVE_ROUTERS, MAC_STATS, PORTS, ROUTERS, SCRATCH, Scratch,
        UNATTRIBUTED, record_error,
    },
    parse::{self, Frame, L4, VLAN_HLEN},
};

/// `E2BIG`: what a hash map update returns when the map is full.
const E2BIG: i32 = 7;
/// `EEXIST`: what a `BPF_NOEXIST` update returns when the key is already there.
const EEXIST: i32 = 17;

/// `PACKET_LOOPBACK` (linux/if_packet.h): a copy of a frame this host sent (a broadcast or
/// multicast it also delivers to itself), handed to the receive path without its Ethernet
/// header.
const PACKET_LOOPBACK: u32 = 5;

/// Counts a received frame. The host's looped-back copies of its own broadcasts never
/// crossed the wire (the egress hook counted the frame that did); they start at the IP
/// header, so reading them as Ethernet would invent a client MAC from IP header bytes.
#[classifier]
fn tc_ingress(ctx: TcContext) -> i32 {
    // SAFETY: as in `vlan_tag`; `pkt_type` is a readable `__sk_buff` field.
    let pkt_type = unsafe { (*ctx.skb.skb).pkt_type };
    if pkt_type != PACKET_LOOPBACK {
        count(&ctx, INGRESS);
    }
    TC_ACT_UNSPEC
}

/// Counts a sent frame.
#[classifier]
fn tc_egress(ctx: TcContext) -> i32 {
    count(&ctx, EGRESS);
    TC_ACT_UNSPEC
}

/// The 802.1Q tag a frame carries on the wire but not in its data: the kernel or the NIC
/// moved it into `skb->vlan_tci` (always the case at ingress: the receive path untags before
/// TC runs, while the interface counted the tagged frame).
///
/// A frame adds to the counters the frame as on the wire, without FCS: `skb->len` plus this
/// tag; a GSO/GRO super-packet adds each of its segments (see [`parse::wire`]), as the NIC
/// (or the tap, or a veth without GSO) sends or received them.
#[inline(always)]
fn vlan_tag(ctx: &TcContext) -> u64 {
    // SAFETY: `ctx.skb.skb` is the context pointer the kernel passed to this program, valid for
    // the whole run; `vlan_present` is a readable `__sk_buff` field (the verifier checks it).
    let vlan_present = unsafe { (*ctx.skb.skb).vlan_present };
    if vlan_present == 0 {
        0
    } else {
        VLAN_HLEN as u64
    }
}

/// The interface the program runs on.
#[inline(always)]
fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: as in `vlan_tag`; `ifindex` is a readable `__sk_buff` field.
    unsafe { (*ctx.skb.skb).ifindex }
}

#[inline(always)]
fn count(ctx: &TcContext, direction: u8) {
    let tag = vlan_tag(ctx);
    let skb_bytes = u64::from(ctx.len()) + tag;
    let ifindex = ifindex(ctx);
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        // A one-entry per-CPU array always has entry 0; this is for the verifier.
        return;
    };
    // SAFETY: this CPU's entry of a per-CPU array, valid while the program runs; TC programs
    // run with migration and bottom halves disabled, so nothing else uses it concurrently.
    let scratch = unsafe { &mut *scratch };
    let Some(frame) = parse::frame(ctx, direction == INGRESS) else {
        // Shorter than an Ethernet header: nobody's frame.
        unattributed(ifindex, direction, SERVICE_OTHER, 1, skb_bytes);
        return;
    };
    let (packets, bytes) = match &frame.l4 {
        Some(l4) => parse::wire(skb_bytes, tag, l4.segments, l4.headers),
        None => (1, skb_bytes),
    };
    let service = match &frame.l4 {
        Some(l4) if l4.ports => service(l4),
        _ => SERVICE_OTHER,
    };
    let client = client(ctx, &frame, &mut scratch.flow, service, direction);
    match client {
        Some((mac, method)) => {
            let key = keys::mac_key(mac, direction, service, ifindex, method);
            if let Err(err) = add(ctx, key, packets, bytes) {
                record_error(err, packets, bytes);
            }
        }
        None => unattributed(ifindex, direction, service, packets, bytes),
    }
    if let Some(l4) = &frame.l4
        && (service == SERVICE_TFTP || service == SERVICE_HTTP || service == SERVICE_ISCSI)
        && parse::fill_key(ctx, l4, direction == INGRESS, &mut scratch.flow).is_some()
    {
        scratch.flow.service = service;
        keys::clear_pad(&mut scratch.flow);
        scratch.flow.ifindex = ifindex;
        let mac = client.map_or([0; 6], |(mac, _)| mac);
        if let Err(err) = add_flow(scratch, l4.payload, direction, packets, bytes, mac) {
            record_error(err, packets, bytes);
        }
    }
}

/// The service of a packet: its server-side port (this host's) in [`PORTS`]. Every service
/// port is this host's, so the client's port is not looked up.
#[inline(always)]
fn service(l4: &L4) -> u8 {
    let Some(index) = port_index(l4.protocol, l4.server_port) else {
        return SERVICE_OTHER;
    };
    match PORTS.get(index) {
        Some(&value) if value != 0 => value - 1,
        _ => SERVICE_OTHER,
    }
}

/// The frame's client and how it was found (a `METHOD_*`), in the order described in
/// `netboot-common`, or `None` (unattributed).
#[inline(always)]
fn client(
    ctx: &TcContext,
    frame: &Frame,
    flow: &mut FlowKey,
    service: u8,
    direction: u8,
) -> Option<([u8; 6], u8)> {
    if let Some(l4) = &frame.l4
        && service == SERVICE_DHCP
        && let Some(bootp) = parse::bootp(ctx, l4)
    {
        if bootp.relayed && direction == INGRESS {
            learn_router(frame.l2_client);
        }
        if let Some(chaddr) = bootp.chaddr {
            return Some((chaddr, METHOD_CHADDR));
        }
    }
    // A unicast frame from or to a host on the link is that host's, whatever address it
    // uses: an address that moved to another MAC cannot mislead this.
    let mac = frame.l2_client;
    if !parse::is_group(&mac) && !is_router(mac) {
        return Some((mac, METHOD_L2));
    }
    // A router's frame (or a group-addressed one) belongs to the client its IP address is
    // bound to.
    if let Some(l4) = &frame.l4
        && parse::fill_key(ctx, l4, direction == INGRESS, flow).is_some()
    {
        // `IpKey` is `repr(C)` around one `[u8; 16]`, so the client address is one.
        let ip = (&raw const flow.client).cast::<IpKey>();
        // SAFETY: see above; `ip` points into this CPU's scratch entry. The value is copied
        // out at once; a concurrent update by the daemon replaces the whole 8-byte value,
        // and either the old or the new binding is a valid answer.
        if let Some(binding) = unsafe { BINDINGS.get(&*ip) } {
            return Some((binding.mac, METHOD_BINDING));
        }
    }
    None
}

/// Whether `mac` is a router's; no hash lookup while there are no routers.
#[inline(always)]
fn is_router(mac: [u8; 6]) -> bool {
    if HAVE_ROUTERS.get(0).is_none_or(|&n| n == 0) {
        return false;
    }
    // SAFETY: only the presence of the key is used.
    unsafe { ROUTERS.get(keys::mac_only(mac)) }.is_some()
}

/// Records `mac` as a router: it relays DHCP, so the clients behind it share its MAC.
#[inline(always)]
fn learn_router(mac: [u8; 6]) {
    match ROUTERS.insert(
        keys::mac_only(mac),
        ROUTER_DHCP_RELAY,
        u64::from(BPF_NOEXIST),
    ) {
        Ok(()) => {
            if let Some(flag) = HAVE_ROUTERS.get_ptr_mut(0) {
                // SAFETY: slot 0 of a one-slot array, valid while the program runs; a plain
                // store of a constant, so concurrent writers agree.
                unsafe { *flag = 1 };
            }
        }
        Err(err) if err == -EEXIST => {}
        Err(_) => record_error(Error::RoutersFull, 1, 0),
    }
}

/// Adds a packet's frames to a client's row.
#[inline(always)]
fn add(ctx: &TcContext, key: MacKey, packets: u64, bytes: u64) -> Result<(), Error> {
    if let Some(counters) = MAC_STATS.get_ptr_mut(key) {
        // SAFETY: the pointer is this CPU's value of a per-CPU hash map entry, valid while the
        // program runs (entries are deleted only by the daemon, and an RCU grace period keeps
        // a deleted value alive until the program returns). TC programs run with migration
        // and bottom halves disabled, so nothing else writes this value concurrently.
        unsafe {
            (*counters).packets += packets;
            (*counters).bytes += bytes;
        }
        return Ok(());
    }
    // A new client. With BPF_ANY, if another CPU inserted the same key since the lookup,
    // the update only writes this CPU's value, which is still zero, so nothing is lost.
    let first = Counters { packets, bytes };
    match MAC_STATS.insert(key, first, u64::from(BPF_ANY)) {
        Ok(()) => {
            debug!(
                ctx,
                "new client {:mac} ifindex {} direction {} service {}",
                key.mac,
                key.ifindex,
                key.direction,
                key.service
            );
            Ok(())
        }
        Err(err) if err == -E2BIG => Err(Error::MacFull),
        Err(_) => Err(Error::MapUpdate),
    }
}

/// Adds a packet's frames to its interface's unattributed row.
#[inline(always)]
fn unattributed(ifindex: u32, direction: u8, service: u8, packets: u64, bytes: u64) {
    let key = keys::if_key(ifindex, direction, service);
    if let Some(counters) = UNATTRIBUTED.get_ptr_mut(key) {
        // SAFETY: as in `add`.
        unsafe {
            (*counters).packets += packets;
            (*counters).bytes += bytes;
        }
        return;
    }
    let first = Counters { packets, bytes };
    if UNATTRIBUTED.insert(key, first, u64::from(BPF_ANY)).is_err() {
        // Sized for every interface, direction and service, so this means a kernel failure.
        record_error(Error::MapUpdate, packets, bytes);
    }
}

/// Adds a packet's frames to the connection in `scratch.flow`.
#[inline(always)]
fn add_flow(
    scratch: &mut Scratch,
    payload: u64,
    direction: u8,
    packets: u64,
    bytes: u64,
    mac: [u8; 6],
) -> Result<(), Error> {
    // The tick-based monotonic clock: the same base as CLOCK_MONOTONIC, a few milliseconds
    // coarse, which is plenty for "last seen", and without the TSC read of
    // `bpf_ktime_get_ns` (a tenth of a TCP segment's run time in a VM).
    // SAFETY: reading the clock has no preconditions.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if let Some(flow) = FLOWS.get_ptr_mut(&scratch.flow) {
        // SAFETY: as in `add`.
        unsafe {
            if direction == INGRESS {
                (*flow).rx_packets += packets;
                (*flow).rx_bytes += bytes;
                (*flow).rx_payload += payload;
            } else {
                (*flow).tx_packets += packets;
                (*flow).tx_bytes += bytes;
                (*flow).tx_payload += payload;
            }
            (*flow).last_seen_ns = now;
            (*flow).mac = mac;
        }
        return Ok(());
    }
    let first = &mut scratch.first;
    *first = FlowCounters {
        last_seen_ns: now,
        mac,
        ..FlowCounters::default()
    };
    if direction == INGRESS {
        first.rx_packets = packets;
        first.rx_bytes = bytes;
        first.rx_payload = payload;
    } else {
        first.tx_packets = packets;
        first.tx_bytes = bytes;
        first.tx_payload = payload;
    }
    match FLOWS.insert(&scratch.flow, &scratch.first, u64::from(BPF_ANY)) {
        Ok(()) => Ok(()),
        Err(err) if err == -E2BIG => Err(Error::FlowFull),
        Err(_) => Err(Error::MapUpdate),
    }
}
