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
//! The tokio driver is [`crate::service::dhcp`].

pub mod proxy;
pub mod pxe;
pub mod server;
pub mod wire;
