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
    /// The iPXE features the client announced in option 175 (their sub-option codes, see
    /// [`IpxeFeature`]), in the order sent.
    pub ipxe_features: Vec<u8>,
}

/// Organisationally unique identifiers of Raspberry Pi boards' Ethernet MACs.
const RASPBERRY_PI_OUIS: &[[u8; 3]] = &[
    [0xb8, 0x27, 0xeb],
    [0xdc, 0xa6, 0x32],
    [0xe4, 0x5f, 0x01],
    [0x28, 0xcd, 0xc1],
    [0xd8, 0x3a, 0xdd],
    [0x2c, 0xcf, 0x67],
    [0x88, 0xa2, 0x9e],
];

/// Option 43 for a Raspberry Pi's network boot loader, which boots only from an offer whose
/// vendor options carry a PXE boot menu item named "Raspberry Pi Boot" (as dnsmasq's
/// `pxe-service=0,"Raspberry Pi Boot"` sends): discovery control 3 (no broadcast or
/// multicast discovery), boot menu item type 0, and a prompt with timeout 0.
pub const RASPBERRY_PI_OPTION_43: &[u8] = &[
    6, 1, 3, // PXE_DISCOVERY_CONTROL
    10, 4, 0, b'P', b'X', b'E', // PXE_MENU_PROMPT: timeout 0, "PXE"
    9, 20, 0, 0, 17, b'R', b'a', b's', b'p', b'b', b'e', b'r', b'r', b'y', b' ', b'P', b'i', b' ',
    b'B', b'o', b'o', b't', // PXE_BOOT_MENU: type 0, "Raspberry Pi Boot"
    255,
];

impl Client {
    /// A Raspberry Pi's boot loader: PXE firmware (BIOS architecture number) on a Raspberry
    /// Pi MAC. It fetches its files from the TFTP root itself and needs no boot file.
    pub fn is_raspberry_pi(&self) -> bool {
        self.vendor == Some(Vendor::Pxe)
            && !self.ipxe
            && self.arch.is_none_or(|a| a == ClientArch::BIOS)
            && RASPBERRY_PI_OUIS
                .iter()
                .any(|oui| self.mac.0[..3] == oui[..])
    }
}

/// An iPXE feature, as announced in the encapsulated option 175 (iPXE's
/// `include/ipxe/dhcp.h`: one sub-option per feature, value 1). An open registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpxeFeature(pub u8);

impl IpxeFeature {
    /// The features by the names operators write in `dhcp.ipxe_required_features`.
    const NAMES: &[(&str, u8)] = &[
        ("pxeext", 16),
        ("iscsi", 17),
        ("aoe", 18),
        ("http", 19),
        ("https", 20),
        ("tftp", 21),
        ("ftp", 22),
        ("dns", 23),
        ("bzimage", 24),
        ("multiboot", 25),
        ("slam", 26),
        ("srp", 27),
        ("nbi", 32),
        ("pxe", 33),
        ("elf", 34),
        ("comboot", 35),
        ("efi", 36),
        ("fcoe", 37),
        ("vlan", 38),
        ("menu", 39),
        ("sdi", 40),
        ("nfs", 41),
    ];

    /// Parses a feature name (`http`, `iscsi`, `srp`, ...) or its sub-option number.
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        Self::NAMES
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(s))
            .map(|&(_, c)| Self(c))
            .or_else(|| s.parse().ok().map(Self))
    }
}

/// The sub-options of an encapsulated option (`code, len, data` triples) that carry a
/// non-zero value; stops at the first truncated one.
fn encapsulated_flags(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = data;
    while let [code, rest_after_code @ ..] = rest {
        match *code {
            0 => rest = rest_after_code,
            255 => break,
            code => {
                let Some((&len, body)) = rest_after_code.split_first() else {
                    break;
                };
                let Some((value, after)) = body.split_at_checked(usize::from(len)) else {
                    break;
                };
                if value.iter().any(|&b| b != 0) {
                    out.push(code);
                }
                rest = after;
            }
        }
    }
    out
}

/// The client hardware address of `msg` as an Ethernet MAC (its first six bytes).
pub fn chaddr_mac(msg: &Message) -> Option<MacAddr> {
    let mac: [u8; 6] = msg.chaddr().get(..6)?.try_into().ok()?;
    Some(MacAddr(mac))
}

impl Client {
    /// Reads the PXE facts of `msg`; `None` for anything but an Ethernet client.
    pub fn from_message(msg: &Message) -> Option<Self> {
        let mac = chaddr_mac(msg)?;
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
        let ipxe_option = match opts.get(OptionCode::Unknown(175)) {
            Some(DhcpOption::Unknown(o)) => Some(encapsulated_flags(o.data())),
            _ => None,
        };
        let ipxe = user_class_ipxe || ipxe_option.is_some();
        let uuid = match opts.get(OptionCode::ClientMachineIdentifier) {
            Some(DhcpOption::ClientMachineIdentifier(u)) => Some(u.clone()),
            _ => None,
        };
        Some(Self {
            mac,
            arch,
            vendor,
            vendor_class,
            ipxe,
            uuid,
            ipxe_features: ipxe_option.unwrap_or_default(),
        })
    }
}
