//! The TC/TCX classifiers: count every frame per (client MAC, direction, service).
//!
//! Both programs are attached either as TCX links (kernel 6.6 and later) or as
//! direct-action filters on a clsact qdisc, and both always return `TC_ACT_UNSPEC`
//! (-1, which TCX reads as `TCX_NEXT`): they observe and never change a packet's fate.

use aya_ebpf::{
    bindings::{BPF_ANY, TC_ACT_UNSPEC},
    macros::classifier,
    programs::TcContext,
};
use aya_log_ebpf::debug;
use netboot_common::{Counters, EGRESS, INGRESS, MacKey};

use crate::{
    maps::{Error, MAC_STATS, record_error},
    parse::{self, ETH_DST, ETH_SRC, VLAN_HLEN},
};

/// `E2BIG`: what a hash map update returns when the map is full.
const E2BIG: i32 = 7;

/// Counts a received frame under its source MAC.
#[classifier]
fn tc_ingress(ctx: TcContext) -> i32 {
    if let Err(err) = try_count(&ctx, INGRESS) {
        record_error(err, frame_bytes(&ctx));
    }
    TC_ACT_UNSPEC
}

/// Counts a sent frame under its destination MAC.
#[classifier]
fn tc_egress(ctx: TcContext) -> i32 {
    if let Err(err) = try_count(&ctx, EGRESS) {
        record_error(err, frame_bytes(&ctx));
    }
    TC_ACT_UNSPEC
}

/// The bytes a frame adds to the counters: the frame as on the wire, without FCS.
///
/// That is `skb->len`, plus the 802.1Q tag when the kernel or the NIC moved it out of the data
/// into `skb->vlan_tci` (always the case at ingress: the receive path untags before TC runs,
/// while the interface counted the tagged frame).
#[inline(always)]
fn frame_bytes(ctx: &TcContext) -> u64 {
    // SAFETY: `ctx.skb.skb` is the context pointer the kernel passed to this program, valid for
    // the whole run; `vlan_present` is a readable `__sk_buff` field (the verifier checks it).
    let vlan_present = unsafe { (*ctx.skb.skb).vlan_present };
    let tag = if vlan_present == 0 {
        0
    } else {
        VLAN_HLEN as u64
    };
    u64::from(ctx.len()) + tag
}

#[inline(always)]
fn try_count(ctx: &TcContext, direction: u8) -> Result<(), Error> {
    let mac_offset = if direction == INGRESS {
        ETH_SRC
    } else {
        ETH_DST
    };
    let mac = parse::load::<[u8; 6]>(ctx, mac_offset).ok_or(Error::Truncated)?;
    let key = MacKey {
        mac,
        direction,
        service: parse::service(ctx),
    };
    let bytes = frame_bytes(ctx);

    if let Some(counters) = MAC_STATS.get_ptr_mut(key) {
        // SAFETY: the pointer is this CPU's value of a per-CPU hash map entry, valid while the
        // program runs (entries are never deleted by the kernel side). TC programs run with
        // migration and bottom halves disabled, so nothing else writes this value concurrently.
        unsafe {
            (*counters).packets += 1;
            (*counters).bytes += bytes;
        }
        return Ok(());
    }

    // A new client. With BPF_ANY, if another CPU inserted the same key since the lookup,
    // the update only writes this CPU's value, which is still zero, so nothing is lost.
    let first = Counters { packets: 1, bytes };
    match MAC_STATS.insert(key, first, u64::from(BPF_ANY)) {
        Ok(()) => {
            debug!(
                ctx,
                "new client {:mac} direction {} service {}", mac, direction, key.service
            );
            Ok(())
        }
        Err(err) if err == -E2BIG => Err(Error::MapFull),
        Err(_) => Err(Error::MapUpdate),
    }
}
