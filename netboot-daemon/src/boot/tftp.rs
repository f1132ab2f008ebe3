//! The iPXE script netbootd generates for clients that fetch it over TFTP (for example
//! behind a DHCP server configured with `boot.ipxe` as iPXE's boot file): it chains to
//! the device's script over HTTP, where the boot policy is decided.

use std::net::{IpAddr, SocketAddr, UdpSocket};

use crate::boot::ipxe;
use crate::mac::MacAddr;
use crate::service::tftp::VirtualFiles;

/// Generates `tftp.ipxe_script` (and `<mac>/<ipxe_script>`).
#[derive(Debug, Clone)]
pub struct BootScripts {
    /// The script's file name, compared case-insensitively.
    pub name: String,
    /// The address clients reach the HTTP server at; when unset, the address this host
    /// uses towards the client.
    pub server_ip: Option<IpAddr>,
    /// The HTTP port.
    pub http_port: u16,
}

impl VirtualFiles for BootScripts {
    fn generate(&self, client: SocketAddr, _mac: Option<MacAddr>, path: &str) -> Option<Vec<u8>> {
        if self.name.is_empty() || !path.eq_ignore_ascii_case(&self.name) {
            return None;
        }
        let ip = self.server_ip.or_else(|| source_address(client))?;
        let host = match ip {
            IpAddr::V6(v6) => format!("[{v6}]"),
            IpAddr::V4(v4) => v4.to_string(),
        };
        // iPXE fills in its own MAC (`${net0/mac}`): the script is the same for all.
        Some(ipxe::bootstrap_script(&format!("http://{host}:{}", self.http_port)).into_bytes())
    }
}

/// The local address the kernel picks to reach `client` (a connected UDP socket; no
/// packet is sent).
fn source_address(client: SocketAddr) -> Option<IpAddr> {
    let bind: SocketAddr = match client {
        SocketAddr::V4(_) => ([0, 0, 0, 0], 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let s = UdpSocket::bind(bind).ok()?;
    s.connect(client).ok()?;
    s.local_addr().ok().map(|a| a.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_configured_name_is_generated_and_it_points_at_this_host() {
        let scripts = BootScripts {
            name: "boot.ipxe".into(),
            server_ip: None,
            http_port: 8080,
        };
        let client: SocketAddr = "127.0.0.1:2070".parse().expect("addr");
        let text = String::from_utf8(scripts.generate(client, None, "BOOT.iPXE").expect("script"))
            .expect("ASCII");
        assert!(text.starts_with("#!ipxe\n"), "{text}");
        assert!(
            text.contains("chain http://127.0.0.1:8080/boot/ipxe/device?mac=${net0/mac:hexhyp}"),
            "{text}"
        );
        assert!(scripts.generate(client, None, "ipxe.efi").is_none());
        let pinned = BootScripts {
            server_ip: Some("192.0.2.1".parse().expect("ip")),
            ..scripts.clone()
        };
        let text = String::from_utf8(pinned.generate(client, None, "boot.ipxe").expect("script"))
            .expect("ASCII");
        assert!(
            text.contains("http://192.0.2.1:8080/boot/ipxe/device"),
            "{text}"
        );
        let off = BootScripts {
            name: String::new(),
            ..scripts
        };
        assert!(off.generate(client, None, "boot.ipxe").is_none());
    }
}
