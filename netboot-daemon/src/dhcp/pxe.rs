//! Facts about a PXE client from its DHCP request.

use dhcproto::v4::{DhcpOption, Message, OptionCode};

use crate::mac::MacAddr;
use crate::store::Arch;

/// Client system architecture (RFC 4578 §2.1, IANA "Processor Architecture Types").
/// An open registry: unknown values are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientArch(pub u16);

impl ClientArch {
    /// x86 BIOS.
    pub const BIOS: Self = Self(0);
    /// x86 UEFI (32-bit).
    pub const EFI_IA32: Self = Self(6);
    /// x64 UEFI.
    pub const EFI_X64: Self = Self(7);
    /// EFI BC, used by some x64 firmware for x64 UEFI.
    pub const EFI_BC: Self = Self(9);
    /// ARM 32-bit UEFI.
    pub const EFI_ARM32: Self = Self(10);
    /// ARM 64-bit UEFI.
    pub const EFI_ARM64: Self = Self(11);
    /// x86 UEFI HTTP Boot.
    pub const EFI_IA32_HTTP: Self = Self(15);
    /// x64 UEFI HTTP Boot.
    pub const EFI_X64_HTTP: Self = Self(16);
    /// ARM 32-bit UEFI HTTP Boot.
    pub const EFI_ARM32_HTTP: Self = Self(18);
    /// ARM 64-bit UEFI HTTP Boot.
    pub const EFI_ARM64_HTTP: Self = Self(19);

    /// The inventory's firmware type for this architecture, if we boot it.
    pub fn arch(self) -> Option<Arch> {
        Some(match self {
            Self::BIOS => Arch::BiosX86,
            Self::EFI_IA32 => Arch::UefiX86,
            Self::EFI_X64 | Self::EFI_BC => Arch::UefiX64,
            Self::EFI_ARM64 => Arch::UefiArm64,
            Self::EFI_X64_HTTP => Arch::UefiHttpX64,
            Self::EFI_ARM64_HTTP => Arch::UefiHttpArm64,
            _ => return None,
        })
    }
}

/// Which PXE vendor class a client announced (option 60).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vendor {
    /// `PXEClient...`: firmware PXE (or iPXE).
    Pxe,
    /// `HTTPClient...`: UEFI HTTP Boot.
    Http,
}

/// What a DHCP request tells about a network-booting client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    /// Hardware address.
    pub mac: MacAddr,
    /// Option 93, when present (the first value if several).
    pub arch: Option<ClientArch>,
    /// Option 60 class, when it is a PXE one.
    pub vendor: Option<Vendor>,
    /// Option 60 as sent, for the inventory.
    pub vendor_class: Option<String>,
    /// The request comes from iPXE (user class `iPXE` or option 175 present).
    pub ipxe: bool,
    /// Option 97 (client machine identifier, the UUID), to echo.
    pub uuid: Option<Vec<u8>>,
}

impl Client {
    /// Reads the PXE facts of `msg`; `None` for anything but an Ethernet client.
    pub fn from_message(msg: &Message) -> Option<Self> {
        let chaddr = msg.chaddr();
        let mac: [u8; 6] = chaddr.get(..6)?.try_into().ok()?;
        let opts = msg.opts();
        let arch = match opts.get(OptionCode::ClientSystemArchitecture) {
            Some(DhcpOption::ClientSystemArchitecture(a)) => Some(ClientArch(u16::from(*a))),
            _ => None,
        };
        let vendor_class = match opts.get(OptionCode::ClassIdentifier) {
            Some(DhcpOption::ClassIdentifier(v)) => Some(
                String::from_utf8_lossy(v)
                    .chars()
                    .take(128)
                    .collect::<String>(),
            ),
            _ => None,
        };
        let vendor = vendor_class.as_deref().and_then(|v| {
            if v.starts_with("PXEClient") {
                Some(Vendor::Pxe)
            } else if v.starts_with("HTTPClient") {
                Some(Vendor::Http)
            } else {
                None
            }
        });
        let user_class_ipxe = match opts.get(OptionCode::UserClass) {
            // iPXE sends the bare string; RFC 3004 clients prefix each class with its length.
            Some(DhcpOption::UserClass(v)) => v.windows(4).any(|w| w == b"iPXE"),
            _ => false,
        };
        let ipxe = user_class_ipxe || opts.get(OptionCode::Unknown(175)).is_some();
        let uuid = match opts.get(OptionCode::ClientMachineIdentifier) {
            Some(DhcpOption::ClientMachineIdentifier(u)) => Some(u.clone()),
            _ => None,
        };
        Some(Self {
            mac: MacAddr(mac),
            arch,
            vendor,
            vendor_class,
            ipxe,
            uuid,
        })
    }
}
