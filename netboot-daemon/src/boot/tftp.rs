//! The iPXE script netbootd generates for clients that fetch it over TFTP (for example
//! behind a DHCP server configured with `boot.ipxe` as iPXE's boot file): it chains to
//! the device's script over HTTP, where the boot policy is decided.

use std::net::{IpAddr, SocketAddr};

use crate::boot::ipxe;
use crate::mac::MacAddr;
use crate::service::tftp::VirtualFiles;

/// Generates `tftp.ipxe_script` (and `<mac>/<ipxe_script>`).
#[derive(Debug, Clone)]
pub struct BootScripts {
    /// The script's file name, compared case-insensitively.
    pub name: String,
    /// The address clients reach the HTTP server at; when unset, the address the client
    /// reached the TFTP server at.
    pub server_ip: Option<IpAddr>,
    /// The HTTP port.
    pub http_port: u16,
}

impl VirtualFiles for BootScripts {
    fn generate(
        &self,
        _client: SocketAddr,
        server: Option<IpAddr>,
        _mac: Option<MacAddr>,
        path: &str,
    ) -> Option<Vec<u8>> {
        if self.name.is_empty() || !path.eq_ignore_ascii_case(&self.name) {
            return None;
        }
        let ip = self.server_ip.or(server)?;
        // iPXE fills in its own MAC (`${net0/mac}`): the script is the same for all.
        Some(ipxe::bootstrap_script(&ipxe::http_base(ip, self.http_port)).into_bytes())
    }
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
        let here = Some(IpAddr::from([127, 0, 0, 1]));
        let text = String::from_utf8(
            scripts
                .generate(client, here, None, "BOOT.iPXE")
                .expect("script"),
        )
        .expect("ASCII");
        assert!(text.starts_with("#!ipxe\n"), "{text}");
        assert!(
            text.contains("chain http://127.0.0.1:8080/boot/ipxe/device?mac=${net0/mac:hexhyp}"),
            "{text}"
        );
        assert!(scripts.generate(client, here, None, "ipxe.efi").is_none());
        let pinned = BootScripts {
            server_ip: Some("192.0.2.1".parse().expect("ip")),
            ..scripts.clone()
        };
        let text = String::from_utf8(
            pinned
                .generate(client, here, None, "boot.ipxe")
                .expect("script"),
        )
        .expect("ASCII");
        assert!(
            text.contains("http://192.0.2.1:8080/boot/ipxe/device"),
            "{text}"
        );
        let v6 = BootScripts {
            server_ip: Some("2001:db8::1".parse().expect("ip")),
            ..scripts.clone()
        };
        let text = String::from_utf8(
            v6.generate(client, here, None, "boot.ipxe")
                .expect("script"),
        )
        .expect("ASCII");
        assert!(
            text.contains("http://[2001:db8::1]:8080/boot/ipxe/device"),
            "{text}"
        );
        let off = BootScripts {
            name: String::new(),
            ..scripts
        };
        assert!(off.generate(client, here, None, "boot.ipxe").is_none());
    }
}
