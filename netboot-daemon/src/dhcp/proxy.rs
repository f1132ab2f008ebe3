//! proxyDHCP (PXE 2.1 §2.2.5): answers PXE clients with the boot server and boot file,
//! next to a DHCP server that hands out the addresses.
//!
//! A DHCPDISCOVER on port 67 from a `PXEClient`/`HTTPClient` gets a DHCPOFFER without an
//! address; a DHCPREQUEST on port 4011 gets a DHCPACK. Both carry the boot file:
//! - firmware PXE: the stock iPXE binary for its architecture, over TFTP;
//! - iPXE itself: the HTTP URL of its script, so it never loads iPXE again (no loop);
//! - UEFI HTTP Boot: the iPXE EFI binary as an HTTP URL.
//!
//! Option 43 sets PXE discovery control to 8 ("boot the file in this offer"), so firmware
//! does not wait for boot server discovery.

use std::net::Ipv4Addr;

use dhcproto::v4::{DhcpOption, Flags, Message, MessageType, Opcode};

use super::Meta;
use super::pxe::{Client, ClientArch, IpxeFeature, Vendor};

/// Boot files for firmware PXE, relative to the TFTP root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootFiles {
    /// x86 BIOS (undionly.kpxe or ipxe.pxe).
    pub bios: String,
    /// x64 UEFI (ipxe.efi or snponly.efi).
    pub uefi_x64: String,
    /// x86 32-bit UEFI.
    pub uefi_ia32: Option<String>,
    /// ARM64 UEFI.
    pub uefi_arm64: Option<String>,
}

impl Default for BootFiles {
    fn default() -> Self {
        Self {
            bios: "undionly.kpxe".into(),
            uefi_x64: "ipxe.efi".into(),
            uefi_ia32: None,
            uefi_arm64: Some("ipxe-arm64.efi".into()),
        }
    }
}

/// What the replies offer, whichever interface a request arrived on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Context {
    /// HTTP port of netbootd.
    pub http_port: u16,
    /// Firmware boot files.
    pub files: BootFiles,
    /// iPXE clients that do not announce all of these features get the firmware boot
    /// file (the full iPXE build) instead of their script: a limited iPXE, such as a NIC
    /// option ROM, chains to the full one. Only features the full build has may be listed,
    /// or it would chain to itself.
    pub ipxe_required: Vec<IpxeFeature>,
}

/// The port a request arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    /// 67: DHCPDISCOVER (and DHCPREQUEST meant for the real server).
    Dhcp,
    /// 4011: PXE boot server DHCPREQUEST.
    Pxe,
}

/// Why a request got no answer (counted by the driver).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ignored {
    /// Not a BOOTREQUEST, or not Ethernet.
    NotARequest,
    /// Not a PXE or HTTP Boot client.
    NotPxe,
    /// A message type proxyDHCP does not answer on this port.
    MessageType,
    /// An architecture we have no boot file for.
    Arch,
}

/// Where a reply goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// To the relay agent that forwarded the request (`giaddr`), on the server port.
    Relay(Ipv4Addr),
    /// Back to where the request came from: a client that has its address (a request on
    /// port 4011, or with `ciaddr` set) and sent from it.
    Source,
    /// Broadcast on the client port (the client has no address yet).
    Broadcast,
}

/// A reply to send, and what the request told about the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The message.
    pub message: Message,
    /// Where to send it.
    pub to: Destination,
    /// The broadcast flag is set in the reply (the client has no address yet, or asked
    /// for it).
    pub broadcast: bool,
    /// The client.
    pub client: Client,
    /// The boot file offered.
    pub boot_file: String,
}

/// The boot file for a client that reached us at `server`, or `None` if there is
/// nothing to boot it with.
pub fn boot_file(client: &Client, ctx: &Context, server: Ipv4Addr) -> Option<String> {
    let http = format!("http://{server}:{}", ctx.http_port);
    let capable = ctx
        .ipxe_required
        .iter()
        .all(|f| client.ipxe_features.contains(&f.0));
    if client.ipxe && capable {
        return Some(format!("{http}/boot/ipxe"));
    }
    let arch = client.arch.unwrap_or(ClientArch::BIOS);
    let file = match arch {
        ClientArch::BIOS => Some(ctx.files.bios.clone()),
        ClientArch::EFI_X64 | ClientArch::EFI_BC | ClientArch::EFI_X64_HTTP => {
            Some(ctx.files.uefi_x64.clone())
        }
        ClientArch::EFI_IA32 | ClientArch::EFI_IA32_HTTP => ctx.files.uefi_ia32.clone(),
        ClientArch::EFI_ARM64 | ClientArch::EFI_ARM64_HTTP => ctx.files.uefi_arm64.clone(),
        _ => None,
    }?;
    if client.vendor == Some(Vendor::Http) {
        Some(format!("{http}/files/tftp/{file}"))
    } else {
        Some(file)
    }
}

/// The address a request shows its client has, if any: `ciaddr`, else the datagram's
/// `source` when the request did not come through a relay.
pub fn client_address(req: &Message, source: Ipv4Addr) -> Option<Ipv4Addr> {
    match req.ciaddr() {
        ip if !ip.is_unspecified() => Some(ip),
        _ if req.giaddr().is_unspecified() && !source.is_unspecified() => Some(source),
        _ => None,
    }
}

impl Reply {
    /// True for a DHCPACK (port 4011), false for a DHCPOFFER.
    pub fn is_ack(&self) -> bool {
        self.message.opts().msg_type() == Some(MessageType::Ack)
    }
}

/// A BOOTREPLY with the fixed fields every reply copies from its request (RFC 2131 §4.3,
/// table 3): `htype`, `xid`, `flags`, `chaddr`, `giaddr`.
pub(super) fn reply_header(req: &Message) -> Message {
    let mut m = Message::default();
    m.set_opcode(Opcode::BootReply)
        .set_htype(req.htype())
        .set_xid(req.xid())
        .set_flags(req.flags())
        .set_chaddr(req.chaddr())
        .set_giaddr(req.giaddr());
    m
}

/// Decides the proxyDHCP answer to `req`, which arrived on `port` as `meta` says.
pub fn handle(req: &Message, port: Port, meta: &Meta<'_>, ctx: &Context) -> Result<Reply, Ignored> {
    if req.opcode() != Opcode::BootRequest {
        return Err(Ignored::NotARequest);
    }
    let client = Client::from_message(req).ok_or(Ignored::NotARequest)?;
    let vendor = client.vendor.ok_or(Ignored::NotPxe)?;
    let reply_type = match (req.opts().msg_type(), port) {
        (Some(MessageType::Discover), Port::Dhcp) => MessageType::Offer,
        (Some(MessageType::Request), Port::Pxe) => MessageType::Ack,
        // Requests on 4011 may also come as DISCOVER-less INFORMs from some firmware.
        (Some(MessageType::Inform), Port::Pxe) => MessageType::Ack,
        _ => return Err(Ignored::MessageType),
    };
    let server = meta.server();
    let pi = client.is_raspberry_pi();
    // A Raspberry Pi's loader fetches its own files from the TFTP root: no boot file.
    let file = if pi {
        String::new()
    } else {
        boot_file(&client, ctx, server).ok_or(Ignored::Arch)?
    };

    let mut m = reply_header(req);
    m.set_siaddr(server).set_fname_str(&file);
    let opts = m.opts_mut();
    opts.insert(DhcpOption::MessageType(reply_type));
    opts.insert(DhcpOption::ServerIdentifier(server));
    opts.insert(DhcpOption::ClassIdentifier(match vendor {
        Vendor::Pxe => b"PXEClient".to_vec(),
        Vendor::Http => b"HTTPClient".to_vec(),
    }));
    if let Some(uuid) = &client.uuid {
        opts.insert(DhcpOption::ClientMachineIdentifier(uuid.clone()));
    }
    if vendor == Vendor::Pxe {
        // PXE_DISCOVERY_CONTROL (sub-option 6) = 8: use the boot file in this reply.
        opts.insert(DhcpOption::VendorExtensions(if pi {
            super::pxe::RASPBERRY_PI_OPTION_43.to_vec()
        } else {
            vec![6, 1, 8, 255]
        }));
        opts.insert(DhcpOption::TFTPServerName(server.to_string().into_bytes()));
    }
    if !file.is_empty() {
        opts.insert(DhcpOption::BootfileName(file.clone().into_bytes()));
    }
    let broadcast = req.flags().broadcast() || req.ciaddr().is_unspecified();
    if broadcast {
        m.set_flags(Flags::default().set_broadcast());
    }
    let to = if !req.giaddr().is_unspecified() {
        Destination::Relay(req.giaddr())
    } else if (port == Port::Pxe || !req.ciaddr().is_unspecified()) && meta.has_source() {
        Destination::Source
    } else {
        Destination::Broadcast
    };
    Ok(Reply {
        message: m,
        to,
        broadcast,
        client,
        boot_file: file,
    })
}

#[cfg(test)]
mod tests;
