//! DHCP for PXE (RFC 2131/2132, RFC 4578, PXE 2.1), as a sans-IO core over dhcproto's
//! wire format.
//!
//! - [`pxe`]: what a request says about its client: architecture (option 93), vendor
//!   class (`PXEClient` / `HTTPClient`), iPXE (user class or option 175);
//! - [`proxy`]: proxyDHCP answers (ports 67 and 4011) next to an existing DHCP server:
//!   boot server and boot file only, never an address;
//! - [`server`]: the full DHCP server: pools, reservations and the lease table, with
//!   the same PXE boot fields in its offers;
//! - [`wire`]: decoding a datagram, with the option lengths checked first.
//!
//! Both cores learn where a request came in from a [`Meta`]: the datagram's
//! [`RecvMeta`] (ingress interface, source, destination) and the boot interface its
//! index names. The tokio driver is [`crate::service::dhcp`].

use std::net::Ipv4Addr;

pub use crate::net::RecvMeta;

pub mod proxy;
pub mod pxe;
pub mod server;
pub mod wire;

/// Where a request came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta<'a> {
    /// How the datagram arrived.
    pub recv: RecvMeta,
    /// The name of the interface `recv.ifindex` (server-mode pools may name it).
    pub iface: &'a str,
    /// Our IPv4 addresses on that interface, the primary first.
    pub addrs: &'a [Ipv4Addr],
}

impl Meta<'_> {
    /// Our address in this exchange (server identifier, `siaddr`, the host of boot
    /// URLs, the source of the reply): the address the request was sent to when it is
    /// one of the interface's (a renewing client, a relay, a PXE request on port 4011),
    /// else the interface's primary address (a broadcast).
    pub fn server(&self) -> Ipv4Addr {
        if self.addrs.contains(&self.recv.dst) {
            self.recv.dst
        } else {
            self.addrs.first().copied().unwrap_or(Ipv4Addr::UNSPECIFIED)
        }
    }

    /// True when the datagram has a source address to answer to (a client without an
    /// address yet sends from 0.0.0.0).
    pub fn has_source(&self) -> bool {
        !self.recv.src.ip().is_unspecified()
    }
}
