//! Send buffers with the `msghdr` the kernel reads, the `UDP_SEGMENT` control message
//! (UDP GSO, Linux 4.18), socket addresses in and out of their C form, and the path MTU.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::AsRawFd as _;

use crate::tftp::transfer::Datagram;

/// A `UDP_SEGMENT` control message: the segment size of a GSO send.
#[repr(C)]
struct GsoCmsg {
    hdr: libc::cmsghdr,
    segment: u16,
    pad: [u8; 6],
}

// SAFETY: CMSG_LEN and CMSG_SPACE are pure arithmetic on their argument.
const GSO_CMSG_LEN: usize = unsafe { libc::CMSG_LEN(size_of::<u16>() as u32) } as usize;
// SAFETY: as above.
const GSO_CMSG_SPACE: usize = unsafe { libc::CMSG_SPACE(size_of::<u16>() as u32) } as usize;
// SAFETY: as above.
const CMSG_DATA_OFFSET: usize = unsafe { libc::CMSG_LEN(0) } as usize;
const _: () = assert!(std::mem::offset_of!(GsoCmsg, segment) == CMSG_DATA_OFFSET);
const _: () = assert!(size_of::<GsoCmsg>() >= GSO_CMSG_SPACE);

/// One send: a datagram, or a train of equal datagrams (the last may be shorter) sent with
/// UDP GSO. Boxed, so that the pointers in `msg` stay valid while the box moves; the
/// driver keeps it until the send's CQE. Each datagram is its header and a body shared
/// with the file data (one iovec each): the kernel copies the file bytes straight from
/// the buffers they were read into.
pub(super) struct SendBuf {
    /// The datagrams (GSO: back to back).
    pub(super) datagrams: Vec<Datagram>,
    iovs: Vec<libc::iovec>,
    msg: libc::msghdr,
    cmsg: GsoCmsg,
    v4: libc::sockaddr_in,
    v6: libc::sockaddr_in6,
}

impl std::fmt::Debug for SendBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendBuf")
            .field("datagrams", &self.datagrams.len())
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}

impl SendBuf {
    pub(super) fn new() -> Box<Self> {
        Box::new(Self {
            datagrams: Vec::new(),
            iovs: Vec::new(),
            msg: libc::msghdr {
                msg_name: std::ptr::null_mut(),
                msg_namelen: 0,
                msg_iov: std::ptr::null_mut(),
                msg_iovlen: 0,
                msg_control: std::ptr::null_mut(),
                msg_controllen: 0,
                msg_flags: 0,
            },
            cmsg: GsoCmsg {
                hdr: libc::cmsghdr {
                    cmsg_len: GSO_CMSG_LEN as _,
                    cmsg_level: libc::SOL_UDP,
                    cmsg_type: libc::UDP_SEGMENT,
                },
                segment: 0,
                pad: [0; 6],
            },
            v4: libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr { s_addr: 0 },
                sin_zero: [0; 8],
            },
            v6: libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: 0,
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr { s6_addr: [0; 16] },
                sin6_scope_id: 0,
            },
        })
    }

    /// Bytes in all the datagrams.
    pub(super) fn len(&self) -> usize {
        self.datagrams.iter().map(Datagram::len).sum()
    }

    /// Empties it for reuse, releasing the file data it shared.
    pub(super) fn clear(&mut self) {
        self.datagrams.clear();
        self.iovs.clear();
    }

    /// Fills in the `msghdr` for sending the datagrams to `to` (`None` on a connected
    /// socket), as GSO segments of `gso` bytes when set, and returns it. The datagrams
    /// must not change until the send completes.
    pub(super) fn prepare(
        &mut self,
        to: Option<SocketAddr>,
        gso: Option<u16>,
    ) -> *const libc::msghdr {
        self.iovs.clear();
        for d in &self.datagrams {
            for part in [d.head(), &d.body()[..]] {
                if !part.is_empty() {
                    // The kernel only reads through it.
                    self.iovs.push(libc::iovec {
                        iov_base: part.as_ptr().cast_mut().cast(),
                        iov_len: part.len(),
                    });
                }
            }
        }
        self.msg.msg_iov = self.iovs.as_mut_ptr();
        self.msg.msg_iovlen = self.iovs.len();
        match to {
            None => {
                self.msg.msg_name = std::ptr::null_mut();
                self.msg.msg_namelen = 0;
            }
            Some(SocketAddr::V4(a)) => {
                self.v4.sin_port = a.port().to_be();
                self.v4.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
                self.msg.msg_name = (&raw mut self.v4).cast();
                self.msg.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
            }
            Some(SocketAddr::V6(a)) => {
                self.v6.sin6_port = a.port().to_be();
                self.v6.sin6_flowinfo = a.flowinfo().to_be();
                self.v6.sin6_addr.s6_addr = a.ip().octets();
                self.v6.sin6_scope_id = a.scope_id();
                self.msg.msg_name = (&raw mut self.v6).cast();
                self.msg.msg_namelen = size_of::<libc::sockaddr_in6>() as libc::socklen_t;
            }
        }
        match gso {
            Some(segment) => {
                self.cmsg.segment = segment;
                self.msg.msg_control = (&raw mut self.cmsg).cast();
                self.msg.msg_controllen = GSO_CMSG_SPACE as _;
            }
            None => {
                self.msg.msg_control = std::ptr::null_mut();
                self.msg.msg_controllen = 0;
            }
        }
        &raw const self.msg
    }
}

/// Room for the peer's address in a multishot `recvmsg` buffer.
pub(super) const NAME_LEN: u32 = size_of::<libc::sockaddr_in6>() as u32;

/// A `msghdr` template for a multishot `recvmsg` on the listening socket: only the name
/// and control lengths count.
pub(super) fn recv_template() -> Box<libc::msghdr> {
    Box::new(libc::msghdr {
        msg_name: std::ptr::null_mut(),
        msg_namelen: NAME_LEN,
        msg_iov: std::ptr::null_mut(),
        msg_iovlen: 0,
        msg_control: std::ptr::null_mut(),
        msg_controllen: 0,
        msg_flags: 0,
    })
}

/// Reads a `sockaddr_in` or `sockaddr_in6` from its bytes.
pub(super) fn parse_sockaddr(b: &[u8]) -> Option<SocketAddr> {
    let family = i32::from(u16::from_ne_bytes(b.get(..2)?.try_into().ok()?));
    let port = u16::from_be_bytes(b.get(2..4)?.try_into().ok()?);
    if family == libc::AF_INET {
        let ip: [u8; 4] = b.get(4..8)?.try_into().ok()?;
        Some(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(ip), port)))
    } else if family == libc::AF_INET6 {
        let flowinfo = u32::from_be_bytes(b.get(4..8)?.try_into().ok()?);
        let ip: [u8; 16] = b.get(8..24)?.try_into().ok()?;
        let scope = u32::from_ne_bytes(b.get(24..28)?.try_into().ok()?);
        Some(SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::from(ip),
            port,
            flowinfo,
            scope,
        )))
    } else {
        None
    }
}

/// The largest UDP payload that fits the path MTU of a connected socket without IP
/// fragmentation (the kernel refuses GSO segments larger than that with `EINVAL`).
pub(super) fn max_unfragmented_payload(socket: &UdpSocket) -> io::Result<usize> {
    let v6 = socket.local_addr()?.is_ipv6();
    let (level, name, headers) = if v6 {
        (libc::IPPROTO_IPV6, libc::IPV6_MTU, 40 + 8)
    } else {
        (libc::IPPROTO_IP, libc::IP_MTU, 20 + 8)
    };
    let mut mtu: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `mtu` and `len` are valid for writes and `len` is the size of `mtu`; the fd
    // is open for the duration of the call.
    let r = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&raw mut mtu).cast(),
            &raw mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(mtu).unwrap_or(0).saturating_sub(headers))
}

/// Sets `SO_NO_CHECK` (send without UDP checksums) on a socket.
pub(super) fn set_no_udp_checksum(socket: &UdpSocket) -> io::Result<()> {
    crate::net::set_int_option(socket.as_raw_fd(), libc::SOL_SOCKET, libc::SO_NO_CHECK, 1)
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    #[test]
    fn a_send_carries_each_datagram_s_header_and_body_in_order() {
        let rx = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let tx = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let file = Bytes::from(b"0123456789abcdef".to_vec());
        let mut b = SendBuf::new();
        b.datagrams
            .push(Datagram::whole(Bytes::from_static(b"whole")));
        // Two DATA datagrams sharing one file buffer, the second with an empty body.
        let mut t = {
            use crate::tftp::transfer::{Config, Negotiated, Transfer};
            use crate::tftp::wire::Mode;
            let neg = Negotiated {
                blksize: 8,
                windowsize: 4,
                timeout: std::time::Duration::from_secs(1),
                oack: Vec::new(),
            };
            Transfer::new(&neg, Mode::Octet, 16, &Config::default())
        };
        assert!(t.poll_read().is_some());
        t.handle_read(Ok(file.clone()));
        let now = std::time::Instant::now();
        while let Some(d) = t.poll_datagram(now) {
            b.datagrams.push(d);
        }
        assert_eq!(
            b.datagrams.len(),
            4,
            "whole, blocks 1 and 2, and the empty block 3"
        );
        assert_eq!(b.len(), 5 + 12 + 12 + 4);
        let msg = b.prepare(Some(rx.local_addr().expect("addr")), None);
        // Without GSO the datagrams go as one: their bytes back to back.
        // SAFETY: `msg` points into `b`, which outlives the call.
        let n = unsafe { libc::sendmsg(tx.as_raw_fd(), msg, 0) };
        assert_eq!(usize::try_from(n).ok(), Some(b.len()));
        let mut got = [0u8; 64];
        let n = rx.recv(&mut got).expect("recv");
        assert_eq!(
            &got[..n],
            &b"whole\0\x03\0\x0101234567\0\x03\0\x0289abcdef\0\x03\0\x03"[..]
        );
        drop(t);
        b.clear();
        assert_eq!(b.len(), 0);
        assert!(file.is_unique(), "clearing releases the shared file data");
    }

    #[test]
    fn socket_addresses_round_trip_through_their_c_form() {
        for addr in [
            "10.1.2.3:69".parse::<SocketAddr>().expect("v4"),
            "[fe80::1%3]:4011".parse().expect("v6"),
        ] {
            let mut b = SendBuf::new();
            let msg = b.prepare(Some(addr), None);
            assert!(!msg.is_null());
            let bytes: Vec<u8> = match addr {
                SocketAddr::V4(_) => {
                    let s = &b.v4;
                    let mut v = s.sin_family.to_ne_bytes().to_vec();
                    v.extend(s.sin_port.to_ne_bytes());
                    v.extend(s.sin_addr.s_addr.to_ne_bytes());
                    v
                }
                SocketAddr::V6(_) => {
                    let s = &b.v6;
                    let mut v = s.sin6_family.to_ne_bytes().to_vec();
                    v.extend(s.sin6_port.to_ne_bytes());
                    v.extend(s.sin6_flowinfo.to_ne_bytes());
                    v.extend(s.sin6_addr.s6_addr);
                    v.extend(s.sin6_scope_id.to_ne_bytes());
                    v
                }
            };
            assert_eq!(parse_sockaddr(&bytes), Some(addr));
        }
        assert_eq!(parse_sockaddr(&[0; 3]), None);
    }

    #[test]
    fn loopback_allows_large_gso_segments() {
        let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
        s.connect("127.0.0.1:9").expect("connect");
        assert!(max_unfragmented_payload(&s).expect("mtu") >= 1472);
    }
}
