//! Bounds-checked header access: Ethernet (with one 802.1Q/802.1ad tag), IPv4, IPv6, TCP,
//! UDP and the fixed BOOTP header of DHCP.
//!
//! Every read goes through [`load`]: a direct read when the bytes are in the skb's linear
//! data (the common case, and about ten times cheaper than a helper call), else
//! `bpf_skb_load_bytes` into a fixed-size stack value, which works for non-linear skbs and
//! which the verifier accepts (a `load_bytes` into a slice fails on 6.18 with "invalid
//! zero-sized read").
//! Headers that are missing or malformed are data, not errors: such a frame has no [`L4`]
//! part and is counted as `SERVICE_OTHER` under its L2 client.

use core::mem::MaybeUninit;

use aya_ebpf::{helpers::bpf_skb_load_bytes, programs::TcContext};
use netboot_common::{FlowKey, IPPROTO_TCP, IPPROTO_UDP};

use crate::keys::set_mapped;

/// Ethernet header length (IEEE 802.3 clause 3.1.1).
const ETH_HLEN: usize = 14;
/// Offset of the destination MAC.
const ETH_DST: usize = 0;
/// Offset of the source MAC.
const ETH_SRC: usize = 6;
/// Offset of the EtherType.
const ETH_TYPE: usize = 12;
/// Length of one VLAN tag (IEEE 802.1Q clause 9).
pub(crate) const VLAN_HLEN: usize = 4;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;

/// IPv4 header fields (RFC 791 section 3.1), as offsets from the start of the header.
mod ipv4 {
    pub(super) const VERSION_IHL: usize = 0;
    pub(super) const TOTAL_LENGTH: usize = 2;
    pub(super) const FLAGS_FRAGMENT: usize = 6;
    /// TTL, then protocol.
    pub(super) const TTL_PROTOCOL: usize = 8;
    pub(super) const SRC: usize = 12;
    pub(super) const DST: usize = 16;
    pub(super) const MIN_LEN: usize = 20;
    /// Fragment offset bits of the flags/fragment field.
    pub(super) const FRAGMENT_MASK: u16 = 0x1fff;
}

/// IPv6 header fields (RFC 8200 section 3), as offsets from the start of the header.
mod ipv6 {
    pub(super) const PAYLOAD_LENGTH: usize = 4;
    pub(super) const NEXT_HEADER: usize = 6;
    pub(super) const SRC: usize = 8;
    pub(super) const DST: usize = 24;
    pub(super) const LEN: usize = 40;
}

/// UDP header length (RFC 768).
const UDP_HLEN: usize = 8;
/// Offset of TCP's data offset field (RFC 9293 section 3.1).
const TCP_DATA_OFFSET: usize = 12;
/// Minimum TCP header length.
const TCP_MIN_HLEN: usize = 20;

/// BOOTP fields (RFC 2131 section 2), as offsets from the start of the UDP payload.
mod bootp {
    /// op, htype, hlen, hops.
    pub(super) const OP_HTYPE_HLEN: usize = 0;
    pub(super) const GIADDR: usize = 24;
    pub(super) const CHADDR: usize = 28;
    /// `htype` of Ethernet (RFC 1700, ARP hardware types).
    pub(super) const HTYPE_ETHERNET: u8 = 1;
    pub(super) const HLEN_ETHERNET: u8 = 6;
    /// `op` of a client's request.
    pub(super) const BOOTREQUEST: u8 = 1;
}

/// Reads a `T` at `offset` from the start of the frame.
#[inline(always)]
pub(crate) fn load<T>(ctx: &TcContext, offset: usize) -> Option<T> {
    let (start, end) = (ctx.data(), ctx.data_end());
    // For one byte LLVM rewrites the check as `start + offset < end`, from which the
    // verifier derives no readable range; single bytes take the helper (read pairs instead).
    if size_of::<T>() > 1 && start + offset + size_of::<T>() <= end {
        // SAFETY: the bytes lie inside the skb's linear data (checked above, and checked
        // again by the verifier); `T` is plain bytes, read unaligned.
        return Some(unsafe { core::ptr::read_unaligned((start + offset) as *const T) });
    }
    // The helper writes into an 8-aligned stack slot: LLVM, allowed misaligned accesses
    // (netboot-ebpf's build.rs), would otherwise copy a byte array out of the slot with wide
    // loads at odd stack offsets, which the verifier refuses ("misaligned stack access").
    let mut slot = Aligned(MaybeUninit::<T>::uninit());
    // SAFETY: the helper writes at most `size_of::<T>()` bytes into `slot`, which lives for
    // the call; `ctx.skb.skb` is the context the kernel passed to the program.
    let ret = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            offset as u32,
            (&raw mut slot.0).cast(),
            size_of::<T>() as u32,
        )
    };
    // SAFETY: a return of 0 means every byte of `slot` was written; `T` is plain bytes.
    (ret == 0).then(|| unsafe { slot.0.assume_init() })
}

/// A stack slot aligned for 8-byte loads, whatever `T`'s own alignment.
#[repr(C, align(8))]
struct Aligned<T>(MaybeUninit<T>);

/// Reads the big-endian `u16` at `offset`.
#[inline(always)]
fn load_be16(ctx: &TcContext, offset: usize) -> Option<u16> {
    load::<[u8; 2]>(ctx, offset).map(u16::from_be_bytes)
}

/// What the programs need to know of a frame beyond its addresses and ports, which
/// [`frame`] writes into the caller's [`FlowKey`] (kept off the 512-byte BPF stack).
pub(crate) struct Frame {
    /// The client side's MAC: the source MAC on ingress, the destination MAC on egress.
    pub(crate) l2_client: [u8; 6],
    /// The transport part, if the frame is an unfragmented (or first-fragment) IPv4 packet,
    /// or an IPv6 packet whose first header is TCP or UDP.
    pub(crate) l4: Option<L4>,
}

/// The transport part of a frame; [`fill_key`] writes it and the addresses into a [`FlowKey`].
#[derive(Clone, Copy)]
pub(crate) struct L4 {
    /// The IP protocol (IPv6: the first next header).
    pub(crate) protocol: u8,
    /// The client's port, when [`L4::ports`].
    pub(crate) client_port: u16,
    /// The server's (this host's) port, when [`L4::ports`].
    pub(crate) server_port: u16,
    /// L4 payload bytes (UDP payload or TCP segment data); for a GSO/GRO super-packet, of all
    /// its segments. Zero for protocols other than TCP and UDP.
    pub(crate) payload: u64,
    /// Offset of the IP header in the frame.
    pub(crate) l3: u32,
    /// Offset of the L4 header in the frame.
    pub(crate) offset: u32,
    /// Whether the packet is IPv4.
    pub(crate) ipv4: bool,
    /// Whether the ports were read (TCP or UDP).
    pub(crate) ports: bool,
    /// Frames on the wire: `gso_segs` of a GSO/GRO super-packet, else 1.
    pub(crate) segments: u32,
    /// Bytes before the payload (Ethernet through L4 header), which every segment of a
    /// super-packet carries.
    pub(crate) headers: u64,
}

impl L4 {
    /// The transport part of a single packet whose ports are not read yet
    /// ([`with_ports`] completes it).
    #[inline(always)]
    fn new(protocol: u8, l3: usize, offset: usize, ipv4: bool) -> Self {
        Self {
            protocol,
            client_port: 0,
            server_port: 0,
            payload: 0,
            l3: l3 as u32,
            offset: offset as u32,
            ipv4,
            ports: false,
            segments: 1,
            headers: 0,
        }
    }
}

/// Parses the frame, seen from the server: the client is the sender of a received frame and
/// the receiver of a sent one. The addresses are not read here: most frames need only the
/// MAC, protocol and ports, and [`fill_key`] reads them for the frames that need them.
/// `None` if the frame is shorter than an Ethernet header.
#[inline(always)]
pub(crate) fn frame(ctx: &TcContext, ingress: bool) -> Option<Frame> {
    if let Some(frame) = fast(ctx, ingress) {
        return Some(frame);
    }
    let l2_client = load::<[u8; 6]>(ctx, if ingress { ETH_SRC } else { ETH_DST })?;
    Some(Frame {
        l2_client,
        l4: l4(ctx, ingress),
    })
}

/// Bytes [`fast`] needs in the linear data: Ethernet, an IPv4 header without options, and
/// a TCP header without options (a UDP header and the start of its payload).
const FAST_LEN: usize = ETH_HLEN + ipv4::MIN_LEN + TCP_MIN_HLEN;

/// [`frame`] for the common case, with one bounds check: an untagged IPv4 frame without IP
/// options carrying TCP or UDP, not a later fragment, with [`FAST_LEN`] bytes in the linear
/// data. `None` for anything else, which the general path then parses (to the same result
/// for the frames this one accepts).
#[inline(always)]
fn fast(ctx: &TcContext, ingress: bool) -> Option<Frame> {
    const L3: usize = ETH_HLEN;
    const L4_OFFSET: usize = ETH_HLEN + ipv4::MIN_LEN;
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + FAST_LEN > end {
        return None;
    }
    // SAFETY (every read below): the offset plus the size read is at most `FAST_LEN`, and
    // the check above put `FAST_LEN` bytes inside the skb's linear data; the verifier checks
    // the same. The types read are plain bytes, read unaligned.
    let read = |offset: usize| -> [u8; 2] {
        // SAFETY: as above.
        unsafe { core::ptr::read_unaligned((start + offset) as *const [u8; 2]) }
    };
    if u16::from_be_bytes(read(ETH_TYPE)) != ETH_P_IP {
        return None;
    }
    let [version_ihl, _tos] = read(L3 + ipv4::VERSION_IHL);
    // Version 4, a 20-byte header.
    if version_ihl != 0x45 {
        return None;
    }
    if u16::from_be_bytes(read(L3 + ipv4::FLAGS_FRAGMENT)) & ipv4::FRAGMENT_MASK != 0 {
        return None;
    }
    let [_ttl, protocol] = read(L3 + ipv4::TTL_PROTOCOL);
    let header_len = match protocol {
        IPPROTO_UDP => UDP_HLEN,
        IPPROTO_TCP => {
            let [offset_byte, _flags] = read(L4_OFFSET + TCP_DATA_OFFSET);
            let data_offset = usize::from(offset_byte >> 4) * 4;
            if data_offset < TCP_MIN_HLEN {
                return None;
            }
            data_offset
        }
        _ => return None,
    };
    // SAFETY: as above.
    let (l2_client, ports) = unsafe {
        (
            core::ptr::read_unaligned(
                (start + if ingress { ETH_SRC } else { ETH_DST }) as *const [u8; 6],
            ),
            core::ptr::read_unaligned((start + L4_OFFSET) as *const [u8; 4]),
        )
    };
    let total = u64::from(u16::from_be_bytes(read(L3 + ipv4::TOTAL_LENGTH)));
    let mut l4 = L4::new(protocol, L3, L4_OFFSET, true);
    with_ports(
        ctx,
        &mut l4,
        ingress,
        ports,
        total.saturating_sub(ipv4::MIN_LEN as u64),
        header_len,
    );
    Some(Frame {
        l2_client,
        l4: Some(l4),
    })
}

#[inline(always)]
fn l4(ctx: &TcContext, ingress: bool) -> Option<L4> {
    let mut ethertype = load_be16(ctx, ETH_TYPE)?;
    let mut l3 = ETH_HLEN;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        ethertype = load_be16(ctx, ETH_TYPE + VLAN_HLEN)?;
        l3 += VLAN_HLEN;
    }
    let ipv4 = ethertype == ETH_P_IP;
    let ip = match ethertype {
        ETH_P_IP => ipv4_header(ctx, l3)?,
        ETH_P_IPV6 => ipv6_header(ctx, l3)?,
        _ => return None,
    };
    let mut l4 = L4::new(ip.protocol, l3, ip.l4, ipv4);
    let header_len = match ip.protocol {
        IPPROTO_UDP => UDP_HLEN,
        IPPROTO_TCP => {
            let [offset_byte, _flags] = load::<[u8; 2]>(ctx, ip.l4 + TCP_DATA_OFFSET)?;
            let data_offset = usize::from(offset_byte >> 4) * 4;
            if data_offset < TCP_MIN_HLEN {
                return Some(l4);
            }
            data_offset
        }
        _ => return Some(l4),
    };
    let ports = load::<[u8; 4]>(ctx, ip.l4)?;
    with_ports(ctx, &mut l4, ingress, ports, ip.payload_len, header_len);
    Some(l4)
}

/// Completes `l4` of a TCP or UDP packet with the first four bytes of its header (the
/// ports), the IP header's payload length and the L4 header's length.
#[inline(always)]
fn with_ports(
    ctx: &TcContext,
    l4: &mut L4,
    ingress: bool,
    [s0, s1, d0, d1]: [u8; 4],
    ip_payload: u64,
    header_len: usize,
) {
    let (src_port, dst_port) = (u16::from_be_bytes([s0, s1]), u16::from_be_bytes([d0, d1]));
    (l4.client_port, l4.server_port) = if ingress {
        (src_port, dst_port)
    } else {
        (dst_port, src_port)
    };
    l4.ports = true;
    // SAFETY: `ctx.skb.skb` is the context pointer the kernel passed to this program, valid for
    // the whole run; `gso_segs` is a readable `__sk_buff` field (the verifier checks it).
    let gso_segs = unsafe { (*ctx.skb.skb).gso_segs };
    let offset = l4.offset as usize;
    l4.payload = payload_len(
        ip_payload,
        gso_segs,
        u64::from(ctx.len()),
        offset,
        header_len,
    );
    if gso_segs > 1 {
        l4.segments = gso_segs;
        l4.headers = (offset + header_len) as u64;
    }
}

/// The fields of an IP header the programs use besides the addresses.
struct IpHeader {
    protocol: u8,
    /// Offset of the L4 header.
    l4: usize,
    /// The header's own count of the bytes after it (0 when unknown, e.g. BIG TCP).
    payload_len: u64,
}

/// An unfragmented (or first-fragment) IPv4 header (its addresses are read by [`fill_key`]).
#[inline(always)]
fn ipv4_header(ctx: &TcContext, l3: usize) -> Option<IpHeader> {
    let [version_ihl, _tos] = load::<[u8; 2]>(ctx, l3 + ipv4::VERSION_IHL)?;
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
    let total = u64::from(load_be16(ctx, l3 + ipv4::TOTAL_LENGTH)?);
    let [_ttl, protocol] = load::<[u8; 2]>(ctx, l3 + ipv4::TTL_PROTOCOL)?;
    Some(IpHeader {
        protocol,
        l4: l3 + header_len,
        payload_len: total.saturating_sub(header_len as u64),
    })
}

/// An IPv6 header; extension headers are not walked (the protocol is then not TCP or UDP).
/// Its addresses are read by [`fill_key`].
#[inline(always)]
fn ipv6_header(ctx: &TcContext, l3: usize) -> Option<IpHeader> {
    Some(IpHeader {
        protocol: load::<[u8; 2]>(ctx, l3 + ipv6::NEXT_HEADER)?[0],
        l4: l3 + ipv6::LEN,
        payload_len: u64::from(load_be16(ctx, l3 + ipv6::PAYLOAD_LENGTH)?),
    })
}

/// Writes the protocol, the ports (meaningful only when [`L4::ports`]) and the client and
/// server address (IPv4 mapped into IPv6) of a frame with an [`L4`] part into `key`, whose
/// other fields it leaves alone; `None` only if the address bytes cannot be read.
#[inline(always)]
pub(crate) fn fill_key(ctx: &TcContext, l4: &L4, ingress: bool, key: &mut FlowKey) -> Option<()> {
    key.protocol = l4.protocol;
    key.client_port = l4.client_port;
    key.server_port = l4.server_port;
    let l3 = l4.l3 as usize;
    if l4.ipv4 {
        let (client, server) = if ingress {
            (ipv4::SRC, ipv4::DST)
        } else {
            (ipv4::DST, ipv4::SRC)
        };
        set_mapped(&mut key.client, load::<[u8; 4]>(ctx, l3 + client)?);
        set_mapped(&mut key.server, load::<[u8; 4]>(ctx, l3 + server)?);
    } else {
        let (client, server) = if ingress {
            (ipv6::SRC, ipv6::DST)
        } else {
            (ipv6::DST, ipv6::SRC)
        };
        key.client = load::<[u8; 16]>(ctx, l3 + client)?;
        key.server = load::<[u8; 16]>(ctx, l3 + server)?;
    }
    Some(())
}

/// What a DHCP packet says about its client.
pub(crate) struct Bootp {
    /// `chaddr`, if `htype`/`hlen` say it is an Ethernet address.
    pub(crate) chaddr: Option<[u8; 6]>,
    /// Whether this is a request (`op` BOOTREQUEST) from an Ethernet client with `giaddr`
    /// set, i.e. one a relay agent forwarded.
    pub(crate) relayed: bool,
}

/// Reads the fixed BOOTP header of an IPv4 UDP packet.
#[inline(always)]
pub(crate) fn bootp(ctx: &TcContext, l4: &L4) -> Option<Bootp> {
    if !l4.ipv4 || l4.protocol != IPPROTO_UDP {
        return None;
    }
    let base = l4.offset as usize + UDP_HLEN;
    let [op, htype, hlen, _hops] = load::<[u8; 4]>(ctx, base + bootp::OP_HTYPE_HLEN)?;
    if htype != bootp::HTYPE_ETHERNET || hlen != bootp::HLEN_ETHERNET {
        return Some(Bootp {
            chaddr: None,
            relayed: false,
        });
    }
    let giaddr = load::<[u8; 4]>(ctx, base + bootp::GIADDR)?;
    Some(Bootp {
        chaddr: Some(load::<[u8; 6]>(ctx, base + bootp::CHADDR)?),
        relayed: op == bootp::BOOTREQUEST && giaddr != [0; 4],
    })
}

/// The L4 payload of a packet.
///
/// For a single packet, the IP header's length (which excludes Ethernet padding of short
/// frames) minus the L4 header. For a GSO/GRO super-packet (`gso_segs > 1`), or when the IP
/// length is 0 (BIG TCP), the bytes after the L4 header in the skb, which then hold the
/// payload of all segments.
#[inline(always)]
pub(crate) fn payload_len(
    ip_payload: u64,
    gso_segs: u32,
    frame_len: u64,
    l4_offset: usize,
    l4_header: usize,
) -> u64 {
    let headers = (l4_offset + l4_header) as u64;
    if gso_segs > 1 || ip_payload == 0 {
        frame_len.saturating_sub(headers)
    } else {
        ip_payload.saturating_sub(l4_header as u64)
    }
}

/// The frames and wire bytes of a packet of `bytes` (as [`crate::tc`] counts one frame:
/// `skb->len` plus a VLAN tag kept out of the data, `tag`): a GSO/GRO super-packet is
/// `segments` frames on the wire, each with its own copy of the `headers` and tag.
#[inline(always)]
pub(crate) fn wire(bytes: u64, tag: u64, segments: u32, headers: u64) -> (u64, u64) {
    if segments > 1 {
        let extra = u64::from(segments - 1) * (headers + tag);
        (u64::from(segments), bytes + extra)
    } else {
        (1, bytes)
    }
}

/// Whether a MAC is a group (broadcast or multicast) address (IEEE 802, I/G bit).
#[inline(always)]
pub(crate) fn is_group(mac: &[u8; 6]) -> bool {
    mac[0] & 1 != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_excludes_headers_and_ethernet_padding() {
        // A 4-byte TFTP ACK in a 60-byte padded frame: IPv4 total 32, header 20.
        assert_eq!(payload_len(12, 1, 60, 34, UDP_HLEN), 4);
        // gso_segs 0 (not a GSO skb) is a single packet too.
        assert_eq!(payload_len(12, 0, 60, 34, UDP_HLEN), 4);
    }

    #[test]
    fn a_super_packet_is_its_segments_on_the_wire() {
        // 10 TCP segments of 1448 bytes: one skb of 14 + 20 + 32 + 14 480 bytes.
        let headers = 14 + 20 + 32;
        let skb = headers + 14_480;
        assert_eq!(wire(skb, 0, 10, headers), (10, 10 * (headers + 1448)));
        // With a VLAN tag outside the data, every frame carries it.
        assert_eq!(
            wire(skb + 4, 4, 10, headers),
            (10, 10 * (headers + 4 + 1448))
        );
        // Not a super-packet: the frame as it is.
        assert_eq!(wire(60, 0, 1, 0), (1, 60));
    }

    #[test]
    fn super_packets_count_every_segment() {
        // Three 1468-byte UDP segments in one GSO skb: the header's length is unreliable.
        let frame = 14 + 20 + 8 + 3 * 1468;
        assert_eq!(payload_len(1, 3, frame, 34, UDP_HLEN), 3 * 1468);
        // BIG TCP: IPv4 total length 0.
        assert_eq!(payload_len(0, 1, 14 + 20 + 32 + 100, 34, 32), 100);
    }

    #[test]
    fn group_addresses() {
        assert!(is_group(&[0xff; 6]));
        assert!(is_group(&[0x01, 0x00, 0x5e, 0, 0, 1]));
        assert!(is_group(&[0x33, 0x33, 0, 0, 0, 1]));
        assert!(!is_group(&[0x02, 0x6e, 0x62, 0, 0, 1]));
    }
}
