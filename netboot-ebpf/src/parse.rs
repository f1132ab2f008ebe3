//! Bounds-checked header access and service classification.
//!
//! Every read goes through [`load`], i.e. `bpf_skb_load_bytes` into a fixed-size stack
//! value, which works for non-linear skbs and which the verifier accepts (a `load_bytes`
//! into a slice fails on 6.18 with "invalid zero-sized read").
//! Headers that are missing or malformed are data, not errors: the frame is then
//! counted as [`SERVICE_OTHER`].

use aya_ebpf::programs::TcContext;
use netboot_common::{
    PORT_DHCP_CLIENT, PORT_DHCP_SERVER, PORT_HTTP, PORT_HTTP_ALT, PORT_ISCSI, PORT_PXE_PROXY,
    PORT_TFTP, SERVICE_DHCP, SERVICE_HTTP, SERVICE_ISCSI, SERVICE_OTHER, SERVICE_TFTP,
};

/// Ethernet header length (IEEE 802.3 clause 3.1.1).
const ETH_HLEN: usize = 14;
/// Offset of the destination MAC.
pub(crate) const ETH_DST: usize = 0;
/// Offset of the source MAC.
pub(crate) const ETH_SRC: usize = 6;
/// Offset of the EtherType.
const ETH_TYPE: usize = 12;
/// Length of one VLAN tag (IEEE 802.1Q clause 9).
pub(crate) const VLAN_HLEN: usize = 4;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

/// IPv4 header fields (RFC 791 section 3.1), as offsets from the start of the header.
mod ipv4 {
    pub(super) const VERSION_IHL: usize = 0;
    pub(super) const FLAGS_FRAGMENT: usize = 6;
    pub(super) const PROTOCOL: usize = 9;
    pub(super) const MIN_LEN: usize = 20;
    /// Fragment offset bits of the flags/fragment field.
    pub(super) const FRAGMENT_MASK: u16 = 0x1fff;
}

/// IPv6 header fields (RFC 8200 section 3), as offsets from the start of the header.
mod ipv6 {
    pub(super) const NEXT_HEADER: usize = 6;
    pub(super) const LEN: usize = 40;
}

/// Reads a `T` at `offset` from the start of the frame.
#[inline(always)]
pub(crate) fn load<T>(ctx: &TcContext, offset: usize) -> Option<T> {
    ctx.load::<T>(offset).ok()
}

/// Reads the big-endian `u16` at `offset`.
#[inline(always)]
fn load_be16(ctx: &TcContext, offset: usize) -> Option<u16> {
    load::<[u8; 2]>(ctx, offset).map(u16::from_be_bytes)
}

/// Classifies the frame into one of the `SERVICE_*` constants.
///
/// Parses Ethernet with at most one VLAN tag in the data, then IPv4 or IPv6, then the TCP or
/// UDP ports. A tag the kernel already moved into `skb->vlan_tci` (always at ingress) is no
/// longer in the data, so a QinQ frame's inner tag is the one seen here.
#[inline(always)]
pub(crate) fn service(ctx: &TcContext) -> u8 {
    let Some(mut ethertype) = load_be16(ctx, ETH_TYPE) else {
        return SERVICE_OTHER;
    };
    let mut l3 = ETH_HLEN;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        let Some(inner) = load_be16(ctx, ETH_TYPE + VLAN_HLEN) else {
            return SERVICE_OTHER;
        };
        ethertype = inner;
        l3 += VLAN_HLEN;
    }
    let l4 = match ethertype {
        ETH_P_IP => ipv4_l4(ctx, l3),
        ETH_P_IPV6 => ipv6_l4(ctx, l3),
        _ => None,
    };
    let Some((protocol, l4)) = l4 else {
        return SERVICE_OTHER;
    };
    match load::<[u8; 4]>(ctx, l4) {
        Some([s0, s1, d0, d1]) => classify(
            protocol,
            u16::from_be_bytes([s0, s1]),
            u16::from_be_bytes([d0, d1]),
        ),
        None => SERVICE_OTHER,
    }
}

/// Returns the protocol and the L4 offset of an unfragmented (or first-fragment) IPv4 packet.
#[inline(always)]
fn ipv4_l4(ctx: &TcContext, l3: usize) -> Option<(u8, usize)> {
    let version_ihl = load::<u8>(ctx, l3 + ipv4::VERSION_IHL)?;
    if version_ihl >> 4 != 4 {
        return None;
    }
    let header_len = usize::from(version_ihl & 0x0f) * 4;
    if header_len < ipv4::MIN_LEN {
        return None;
    }
    // Later fragments carry no L4 header.
    if load_be16(ctx, l3 + ipv4::FLAGS_FRAGMENT)? & ipv4::FRAGMENT_MASK != 0 {
        return None;
    }
    let protocol = load::<u8>(ctx, l3 + ipv4::PROTOCOL)?;
    Some((protocol, l3 + header_len))
}

/// Returns the protocol and the L4 offset of an IPv6 packet whose first header is TCP or UDP.
///
/// Extension headers are not walked; such packets are [`SERVICE_OTHER`].
#[inline(always)]
fn ipv6_l4(ctx: &TcContext, l3: usize) -> Option<(u8, usize)> {
    let protocol = load::<u8>(ctx, l3 + ipv6::NEXT_HEADER)?;
    Some((protocol, l3 + ipv6::LEN))
}

/// Maps an IP protocol and its ports to a `SERVICE_*` constant; either port may match.
#[inline(always)]
pub(crate) fn classify(protocol: u8, src_port: u16, dst_port: u16) -> u8 {
    let either = |port: u16| src_port == port || dst_port == port;
    match protocol {
        IPPROTO_UDP => {
            if either(PORT_DHCP_SERVER) || either(PORT_DHCP_CLIENT) || either(PORT_PXE_PROXY) {
                SERVICE_DHCP
            } else if either(PORT_TFTP) {
                SERVICE_TFTP
            } else {
                SERVICE_OTHER
            }
        }
        IPPROTO_TCP => {
            if either(PORT_ISCSI) {
                SERVICE_ISCSI
            } else if either(PORT_HTTP) || either(PORT_HTTP_ALT) {
                SERVICE_HTTP
            } else {
                SERVICE_OTHER
            }
        }
        _ => SERVICE_OTHER,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_map_to_services() {
        assert_eq!(classify(IPPROTO_UDP, 68, 67), SERVICE_DHCP);
        assert_eq!(classify(IPPROTO_UDP, 67, 68), SERVICE_DHCP);
        assert_eq!(classify(IPPROTO_UDP, 40000, 4011), SERVICE_DHCP);
        assert_eq!(classify(IPPROTO_UDP, 40000, 69), SERVICE_TFTP);
        assert_eq!(classify(IPPROTO_UDP, 69, 40000), SERVICE_TFTP);
        assert_eq!(classify(IPPROTO_TCP, 50000, 3260), SERVICE_ISCSI);
        assert_eq!(classify(IPPROTO_TCP, 3260, 50000), SERVICE_ISCSI);
        assert_eq!(classify(IPPROTO_TCP, 50000, 80), SERVICE_HTTP);
        assert_eq!(classify(IPPROTO_TCP, 8080, 50000), SERVICE_HTTP);
    }

    #[test]
    fn unrelated_traffic_is_other() {
        // Right port, wrong protocol.
        assert_eq!(classify(IPPROTO_TCP, 50000, 69), SERVICE_OTHER);
        assert_eq!(classify(IPPROTO_UDP, 50000, 3260), SERVICE_OTHER);
        assert_eq!(classify(IPPROTO_UDP, 50000, 53), SERVICE_OTHER);
        // ICMP.
        assert_eq!(classify(1, 0, 0), SERVICE_OTHER);
    }
}
