//! Socket details the protocol cores never see: UDP sockets that learn, for every
//! datagram, the interface it came in on and the address it was sent to (`IP_PKTINFO`,
//! ip(7)), and that choose the outgoing interface and the source address of each reply.
//!
//! With them, one socket bound to `0.0.0.0` serves several interfaces: the driver maps
//! [`RecvMeta::ifindex`] to the interface's configuration, and a broadcast reply leaves
//! through the interface its request came in on ([`Egress::ifindex`]) from our address
//! on it ([`Egress::src`]), without `SO_BINDTODEVICE`.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsFd, AsRawFd as _};

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// How a datagram arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecvMeta {
    /// The index of the interface it came in on (0: the kernel did not say).
    pub ifindex: u32,
    /// Its source address and port.
    pub src: SocketAddrV4,
    /// The destination address of its IP header: one of ours, or a broadcast or
    /// multicast address.
    pub dst: Ipv4Addr,
}

/// How a datagram leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Egress {
    /// The interface to send it through; 0 lets the routing table choose.
    pub ifindex: u32,
    /// Its source address; unspecified lets the kernel choose.
    pub src: Ipv4Addr,
}

/// Sets the `c_int` socket option `level`/`opt` of `fd` to `value` (the options socket2
/// does not cover).
pub(crate) fn set_int_option(
    fd: std::os::fd::RawFd,
    level: libc::c_int,
    opt: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `value` is a c_int that outlives the call, and its size is passed with it;
    // an fd that is not a socket makes the call fail, nothing else.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Asks for a receive buffer of `bytes` on `socket` and returns the size the kernel
/// granted (`SO_RCVBUF` as read back: the kernel doubles the request for its overhead).
///
/// `SO_RCVBUFFORCE` goes past `net.core.rmem_max` (212,992 bytes on a stock kernel) and
/// needs `CAP_NET_ADMIN`; without it, `SO_RCVBUF` gets at most `rmem_max`. A listener that
/// a burst of requests reaches at once (a boot storm's RRQs) needs room for all of them:
/// a datagram that finds the buffer full is dropped, and its client waits out its
/// retransmission timeout.
pub fn raise_receive_buffer(socket: &impl AsFd, bytes: usize) -> usize {
    let s = SockRef::from(socket);
    if force_buffer(socket, libc::SO_RCVBUFFORCE, bytes).is_err() {
        let _ = s.set_recv_buffer_size(bytes);
    }
    s.recv_buffer_size().unwrap_or(0)
}

/// [`raise_receive_buffer`] for the send buffer (`SO_SNDBUFFORCE`, `SO_SNDBUF`,
/// `net.core.wmem_max`): for a socket that many transfers send from at once.
pub fn raise_send_buffer(socket: &impl AsFd, bytes: usize) -> usize {
    let s = SockRef::from(socket);
    if force_buffer(socket, libc::SO_SNDBUFFORCE, bytes).is_err() {
        let _ = s.set_send_buffer_size(bytes);
    }
    s.send_buffer_size().unwrap_or(0)
}

fn force_buffer(socket: &impl AsFd, opt: libc::c_int, bytes: usize) -> io::Result<()> {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    set_int_option(socket.as_fd().as_raw_fd(), libc::SOL_SOCKET, opt, value)
}

/// An `IP_PKTINFO` control message.
#[repr(C)]
struct PktinfoCmsg {
    hdr: libc::cmsghdr,
    info: libc::in_pktinfo,
}

// SAFETY: CMSG_LEN and CMSG_SPACE are pure arithmetic on their argument.
const PKTINFO_CMSG_LEN: usize =
    unsafe { libc::CMSG_LEN(size_of::<libc::in_pktinfo>() as u32) } as usize;
// SAFETY: as above.
const PKTINFO_CMSG_SPACE: usize =
    unsafe { libc::CMSG_SPACE(size_of::<libc::in_pktinfo>() as u32) } as usize;
// SAFETY: as above.
const CMSG_DATA_OFFSET: usize = unsafe { libc::CMSG_LEN(0) } as usize;
const _: () = assert!(std::mem::offset_of!(PktinfoCmsg, info) == CMSG_DATA_OFFSET);
const _: () = assert!(size_of::<PktinfoCmsg>() >= PKTINFO_CMSG_SPACE);

/// Room for the control messages of a receive: `IP_PKTINFO`, and more than enough for
/// any other the socket does not ask for. Aligned for `cmsghdr`.
#[repr(C, align(8))]
struct ControlBuf([u8; 128]);
const _: () = assert!(align_of::<ControlBuf>() >= align_of::<libc::cmsghdr>());
const _: () = assert!(size_of::<ControlBuf>() >= PKTINFO_CMSG_SPACE);

/// A nonblocking IPv4 UDP socket with `IP_PKTINFO` on, registered with tokio.
#[derive(Debug)]
pub struct PktinfoSocket {
    fd: AsyncFd<Socket>,
}

impl PktinfoSocket {
    /// Binds `0.0.0.0:port` with `SO_REUSEADDR` (another DHCP server on the host may hold
    /// the port too), `SO_BROADCAST` and `IP_PKTINFO`, in the calling thread's network
    /// namespace. Must run inside a tokio runtime.
    pub fn bind(port: u16) -> io::Result<Self> {
        let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
        s.set_reuse_address(true)?;
        s.set_broadcast(true)?;
        set_int_option(s.as_raw_fd(), libc::IPPROTO_IP, libc::IP_PKTINFO, 1)?;
        s.set_nonblocking(true)?;
        s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into())?;
        // SAFETY: the Socket owns its fd: it stays open, and as_raw_fd returns it, until
        // the AsyncFd that owns the Socket is dropped.
        let fd = unsafe { AsyncFd::register(s) }?;
        Ok(Self { fd })
    }

    /// The port the socket is bound to.
    pub fn local_port(&self) -> io::Result<u16> {
        let addr = self.fd.get_ref().local_addr()?;
        addr.as_socket().map(|a| a.port()).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, "not an internet socket address")
        })
    }

    /// Receives one datagram into `buf` (a longer one is cut to `buf`'s length) and
    /// says how it arrived.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<(usize, RecvMeta)> {
        self.fd
            .async_io(Interest::READABLE, |s| recv_pktinfo(s, buf))
            .await
    }

    /// Sends `data` to `to` the way `egress` says.
    pub async fn send(&self, data: &[u8], to: SocketAddrV4, egress: Egress) -> io::Result<usize> {
        self.fd
            .async_io(Interest::WRITABLE, |s| send_pktinfo(s, data, to, egress))
            .await
    }
}

fn sockaddr_in(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: in_addr(*a.ip()),
        sin_zero: [0; 8],
    }
}

fn in_addr(ip: Ipv4Addr) -> libc::in_addr {
    // `s_addr` holds the address in network order, i.e. its octets as they are.
    libc::in_addr {
        s_addr: u32::from_ne_bytes(ip.octets()),
    }
}

fn ipv4(a: libc::in_addr) -> Ipv4Addr {
    Ipv4Addr::from(a.s_addr.to_ne_bytes())
}

fn recv_pktinfo(s: &Socket, buf: &mut [u8]) -> io::Result<(usize, RecvMeta)> {
    let mut name = sockaddr_in(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
    let mut control = ControlBuf([0; 128]);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut msg = libc::msghdr {
        msg_name: (&raw mut name).cast(),
        msg_namelen: size_of::<libc::sockaddr_in>() as libc::socklen_t,
        msg_iov: &raw mut iov,
        msg_iovlen: 1,
        msg_control: (&raw mut control).cast(),
        msg_controllen: size_of::<ControlBuf>() as _,
        msg_flags: 0,
    };
    // SAFETY: every pointer in `msg` points to a live local (or `buf`) of the length
    // given beside it, for the duration of the call.
    let n = unsafe { libc::recvmsg(s.as_raw_fd(), &raw mut msg, 0) };
    let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
    let src = if i32::from(name.sin_family) == libc::AF_INET {
        SocketAddrV4::new(ipv4(name.sin_addr), u16::from_be(name.sin_port))
    } else {
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)
    };
    let mut meta = RecvMeta {
        ifindex: 0,
        src,
        dst: Ipv4Addr::UNSPECIFIED,
    };
    // SAFETY: `msg` is the header recvmsg filled: `msg_control` points to `control` and
    // `msg_controllen` is what the kernel wrote into it, so the CMSG_* walk stays inside.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&raw const msg) };
    while !cmsg.is_null() {
        // SAFETY: a non-null header from CMSG_FIRSTHDR/CMSG_NXTHDR lies inside `control`,
        // which is aligned for cmsghdr.
        let hdr = unsafe { &*cmsg };
        if hdr.cmsg_level == libc::IPPROTO_IP
            && hdr.cmsg_type == libc::IP_PKTINFO
            && hdr.cmsg_len >= PKTINFO_CMSG_LEN as _
        {
            // SAFETY: the header says its data holds a whole in_pktinfo; the read is
            // unaligned because CMSG_DATA promises no alignment for the payload type.
            let info: libc::in_pktinfo =
                unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast()) };
            meta.ifindex = u32::try_from(info.ipi_ifindex).unwrap_or(0);
            meta.dst = ipv4(info.ipi_addr);
        }
        // SAFETY: as for CMSG_FIRSTHDR; `cmsg` is the current, valid header.
        cmsg = unsafe { libc::CMSG_NXTHDR(&raw const msg, cmsg) };
    }
    Ok((n.min(buf.len()), meta))
}

fn send_pktinfo(s: &Socket, data: &[u8], to: SocketAddrV4, egress: Egress) -> io::Result<usize> {
    let mut name = sockaddr_in(to);
    let mut iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    let mut cmsg = PktinfoCmsg {
        hdr: libc::cmsghdr {
            cmsg_len: PKTINFO_CMSG_LEN as _,
            cmsg_level: libc::IPPROTO_IP,
            cmsg_type: libc::IP_PKTINFO,
        },
        info: libc::in_pktinfo {
            ipi_ifindex: libc::c_int::try_from(egress.ifindex).unwrap_or(0),
            ipi_spec_dst: in_addr(egress.src),
            ipi_addr: in_addr(Ipv4Addr::UNSPECIFIED),
        },
    };
    let plain = egress.ifindex == 0 && egress.src.is_unspecified();
    let msg = libc::msghdr {
        msg_name: (&raw mut name).cast(),
        msg_namelen: size_of::<libc::sockaddr_in>() as libc::socklen_t,
        msg_iov: &raw mut iov,
        msg_iovlen: 1,
        msg_control: if plain {
            std::ptr::null_mut()
        } else {
            (&raw mut cmsg).cast()
        },
        msg_controllen: if plain { 0 } else { PKTINFO_CMSG_SPACE as _ },
        msg_flags: 0,
    };
    // SAFETY: every pointer in `msg` points to a live local (or `data`, which the kernel
    // only reads) of the length given beside it, for the duration of the call.
    let n = unsafe { libc::sendmsg(s.as_raw_fd(), &raw const msg, 0) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On loopback: the receiver learns lo's index and the destination address; the
    /// reply's source is the address the egress names, not the one routing would pick.
    #[tokio::test]
    async fn pktinfo_names_the_interface_and_addresses_both_ways() {
        let a = PktinfoSocket::bind(0).expect("bind a");
        let b = PktinfoSocket::bind(0).expect("bind b");
        let (pa, pb) = (a.local_port().expect("port"), b.local_port().expect("port"));
        let lo = if_addrs::get_if_addrs()
            .expect("interfaces")
            .into_iter()
            .find(|i| i.is_loopback())
            .and_then(|i| i.index)
            .expect("lo has an index");
        // 127.0.0.2 is ours too (all of 127/8 is on lo), so it can be a source.
        let sent = a
            .send(
                b"ping",
                SocketAddrV4::new(Ipv4Addr::LOCALHOST, pb),
                Egress {
                    ifindex: 0,
                    src: Ipv4Addr::new(127, 0, 0, 2),
                },
            )
            .await
            .expect("send");
        assert_eq!(sent, 4);
        let mut buf = [0u8; 16];
        let (n, meta) = b.recv(&mut buf).await.expect("recv");
        assert_eq!(&buf[..n], b"ping");
        assert_eq!(
            meta,
            RecvMeta {
                ifindex: lo,
                src: SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 2), pa),
                dst: Ipv4Addr::LOCALHOST,
            }
        );
        // Without a control message: the kernel's choices. A datagram longer than the
        // buffer is cut to it.
        b.send(
            b"pong, and more",
            SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 3), pa),
            Egress {
                ifindex: 0,
                src: Ipv4Addr::UNSPECIFIED,
            },
        )
        .await
        .expect("send");
        let mut small = [0u8; 4];
        let (n, meta) = a.recv(&mut small).await.expect("recv");
        assert_eq!(
            (&small[..n], meta.dst),
            (&b"pong"[..], Ipv4Addr::new(127, 0, 0, 3))
        );
        assert_eq!(meta.ifindex, lo);
    }
}
