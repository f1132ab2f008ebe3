//! Records kept by the store, and the inputs that create or change them.

use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize};
use utoipa::ToSchema;

use crate::mac::MacAddr;
use crate::time::Timestamp;

/// Defines a closed enum stored and shown as a fixed string.
macro_rules! str_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $v:ident = $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
        pub enum $name {
            $($(#[$vm])* #[serde(rename = $s)] $v),+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [Self] = &[$(Self::$v),+];

            /// The stored and displayed name.
            pub const fn as_str(self) -> &'static str {
                match self { $(Self::$v => $s),+ }
            }
        }

        impl FromStr for $name {
            type Err = UnknownVariant;
            fn from_str(s: &str) -> Result<Self, UnknownVariant> {
                match s {
                    $($s => Ok(Self::$v),)+
                    _ => Err(UnknownVariant { kind: stringify!($name) }),
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

/// A string did not name any value of a closed enum.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind}")]
pub struct UnknownVariant {
    /// The enum's name.
    pub kind: &'static str,
}

str_enum! {
    /// What firmware a client boots with, as far as we know it.
    Arch {
        /// Not yet seen or not recognisable.
        Unknown = "unknown",
        /// Legacy BIOS PXE (option 93 value 0).
        BiosX86 = "bios",
        /// 32-bit x86 UEFI.
        UefiX86 = "uefi_x86",
        /// x86-64 UEFI PXE.
        UefiX64 = "uefi_x64",
        /// ARM64 UEFI PXE.
        UefiArm64 = "uefi_arm64",
        /// x86-64 UEFI HTTP Boot.
        UefiHttpX64 = "uefi_http_x64",
        /// ARM64 UEFI HTTP Boot.
        UefiHttpArm64 = "uefi_http_arm64",
        /// Raspberry Pi network boot.
        RaspberryPi = "rpi",
    }
}

str_enum! {
    /// What a device does when it network-boots.
    BootPolicy {
        /// Show the boot menu, with the settings' default and timeout.
        Menu = "menu",
        /// Boot the linked iSCSI disk image.
        Iscsi = "iscsi",
        /// Run the linked boot profile (Linux installer, ISO, Windows setup).
        Profile = "profile",
        /// Exit to the local disk.
        Local = "local",
        /// Drop to the iPXE shell.
        Shell = "shell",
        /// Show device information, then the menu.
        Info = "info",
    }
}

str_enum! {
    /// A user's rights. Each role has the rights of the ones before it.
    Role {
        /// Reads everything except users, tokens of others and the audit log.
        Viewer = "viewer",
        /// Also changes devices, images, installers, profiles and events.
        Operator = "operator",
        /// Also manages users, tokens, settings and reads the audit log.
        Admin = "admin",
    }
}

impl Role {
    const fn rank(self) -> u8 {
        match self {
            Self::Viewer => 0,
            Self::Operator => 1,
            Self::Admin => 2,
        }
    }

    /// True when this role has at least the rights of `other`.
    pub const fn allows(self, other: Self) -> bool {
        self.rank() >= other.rank()
    }
}

str_enum! {
    /// What kind of installer media a record describes.
    InstallerKind {
        /// A bootable ISO image (sanboot over HTTP, or a CD-ROM LUN).
        Iso = "iso",
        /// A Linux kernel/initrd tree.
        Linux = "linux",
        /// Windows setup media (WinPE, install.wim).
        Windows = "windows",
        /// Anything else (firmware, tools).
        Other = "other",
    }
}

str_enum! {
    /// What a boot profile boots.
    ProfileKind {
        /// A Linux kernel with initrds and a command line.
        Linux = "linux",
        /// An ISO image booted with `sanboot` over HTTP.
        Iso = "iso",
        /// Windows setup through wimboot and WinPE.
        Windows = "windows",
    }
}

str_enum! {
    /// Which part of netbootd saw a boot event.
    EventSource {
        /// The DHCP/proxyDHCP server.
        Dhcp = "dhcp",
        /// The TFTP server.
        Tftp = "tftp",
        /// HTTP: boot scripts and files.
        Http = "http",
        /// The iSCSI target.
        Iscsi = "iscsi",
        /// The REST API or the web UI.
        Api = "api",
        /// The daemon itself (accounting, stall detection).
        System = "system",
    }
}

/// Deserializes a field that distinguishes "absent" (`None`) from `null` (`Some(None)`).
pub(crate) fn double_option<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// One page of a listing.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Page<T> {
    /// The records on this page.
    pub items: Vec<T>,
    /// How many records match the filter in all.
    pub total: u64,
    /// Pass as `before` to get the next page (cursor listings only).
    pub next_cursor: Option<i64>,
}

/// Offset pagination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema, utoipa::IntoParams)]
#[serde(default)]
pub struct PageQuery {
    /// Maximum records to return (1..=1000).
    pub limit: u32,
    /// Records to skip.
    pub offset: u32,
}

impl Default for PageQuery {
    fn default() -> Self {
        Self {
            limit: 100,
            offset: 0,
        }
    }
}

/// A registered device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Device {
    /// The device's MAC address, lower-case and colon-separated.
    #[schema(value_type = String, example = "52:54:00:12:34:56")]
    pub mac: MacAddr,
    /// A name for people.
    pub name: String,
    /// Firmware type.
    pub arch: Arch,
    /// Disabled devices get no boot offer.
    pub enabled: bool,
    /// What the device boots.
    pub boot_policy: BootPolicy,
    /// The linked disk image, if any.
    pub image: Option<String>,
    /// The linked boot profile, if any.
    pub profile: Option<String>,
    /// Free text.
    pub notes: String,
    /// When it was registered.
    #[schema(value_type = String)]
    pub created_at: Timestamp,
    /// When it was last changed.
    #[schema(value_type = String)]
    pub updated_at: Timestamp,
    /// When it first showed up on the network.
    #[schema(value_type = Option<String>)]
    pub first_seen: Option<Timestamp>,
    /// When it last showed up on the network.
    #[schema(value_type = Option<String>)]
    pub last_seen: Option<Timestamp>,
    /// The address it last used.
    pub last_ip: Option<String>,
    /// CHAP its image's target requires (names only; secrets are never shown).
    pub chap: ChapSummary,
    /// iSCSI initiator names (IQNs) that its image's target accepts besides an initiator
    /// whose name carries the device's MAC (case-folded).
    pub initiators: Vec<String>,
}

/// Most initiator names a device lists.
pub const MAX_INITIATORS: usize = 16;

/// Why a device's initiator names were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InitiatorsError {
    /// Not an iSCSI name.
    #[error(
        "{0:?} is not an iSCSI name (iqn.yyyy-mm.reversed.domain[:anything], eui. or naa. with hex digits; lower-case letters, digits, '-', '.', ':'; at most 223 bytes)"
    )]
    NotAnIscsiName(String),
    /// The same name twice (names are compared case-folded).
    #[error("{0:?} is listed twice")]
    Repeated(String),
    /// More than [`MAX_INITIATORS`].
    #[error("at most {MAX_INITIATORS} initiator names")]
    TooMany,
}

/// A device's initiator names as the store keeps them: each an iSCSI name
/// ([`crate::iscsi::name::valid`]), case-folded ([`crate::iscsi::name::fold`]: RFC 3722
/// compares names that way), no name twice, at most [`MAX_INITIATORS`].
pub fn initiator_names(names: &[String]) -> Result<Vec<String>, InitiatorsError> {
    use crate::iscsi::name;
    if names.len() > MAX_INITIATORS {
        return Err(InitiatorsError::TooMany);
    }
    let mut out: Vec<String> = Vec::with_capacity(names.len());
    for n in names {
        if !name::valid(n) {
            return Err(InitiatorsError::NotAnIscsiName(n.clone()));
        }
        let folded = name::fold(n);
        if out.contains(&folded) {
            return Err(InitiatorsError::Repeated(n.clone()));
        }
        out.push(folded);
    }
    Ok(out)
}

/// Whether a CHAP secret is stored; the secret itself is never shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
pub enum SecretState {
    /// A secret is stored.
    #[serde(rename = "set")]
    Set,
    /// No secret.
    #[serde(rename = "not set")]
    NotSet,
}

/// A device's CHAP as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct ChapSummary {
    /// The name the device's initiator logs in with (`CHAP_N`); `null`: no CHAP, the
    /// target takes AuthMethod=None.
    pub user: Option<String>,
    /// Its secret.
    pub secret: SecretState,
    /// For mutual CHAP: the name the target answers with.
    pub target_user: Option<String>,
    /// The target's secret.
    pub target_secret: SecretState,
}

impl ChapSummary {
    /// No CHAP.
    pub const NONE: Self = Self {
        user: None,
        secret: SecretState::NotSet,
        target_user: None,
        target_secret: SecretState::NotSet,
    };
}

/// A device's CHAP credentials: with them set, the target of the device's image
/// requires CHAP (RFC 7143 section 12.1.3), and the device's boot script hands them to
/// iPXE. Secrets are 12 to 64 characters (RFC 3720 section 8.2.1 asks for at least 96
/// bits; Windows' initiator takes at most 16); names and secrets use letters, digits and
/// `-._~:+=/!*,^@`, so that they need no quoting in iPXE scripts and URLs.
#[derive(Clone, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChapCredentials {
    /// The name the initiator sends (`CHAP_N`), 1-64 characters.
    pub user: String,
    /// The secret the initiator proves it knows.
    pub secret: String,
    /// Mutual CHAP: the name the target answers with.
    #[serde(default)]
    pub target_user: Option<String>,
    /// Mutual CHAP: the target's secret (different from the initiator's).
    #[serde(default)]
    pub target_secret: Option<String>,
}

impl std::fmt::Debug for ChapCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChapCredentials")
            .field("user", &self.user)
            .field("target_user", &self.target_user)
            .finish_non_exhaustive()
    }
}

/// Why CHAP credentials were refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChapError {
    /// A name is empty, too long or has a character outside the allowed set.
    #[error("CHAP names are 1-64 of letters, digits and -._~:+=/!*,^@")]
    BadName,
    /// A secret is too short, too long or has a character outside the allowed set.
    #[error("CHAP secrets are 12-64 of letters, digits and -._~:+=/!*,^@")]
    BadSecret,
    /// Only one of the target's name and secret.
    #[error("mutual CHAP needs both target_user and target_secret")]
    HalfMutual,
    /// The same secret in both directions (RFC 7143 section 12.1.3 forbids it).
    #[error("the target's secret must differ from the initiator's")]
    SameSecret,
}

/// Whether `c` may appear in a CHAP name or secret.
pub const fn chap_char(c: char) -> bool {
    c.is_ascii_alphanumeric()
        || matches!(
            c,
            '-' | '.' | '_' | '~' | ':' | '+' | '=' | '/' | '!' | '*' | ',' | '^' | '@'
        )
}

impl ChapCredentials {
    /// Checks lengths, characters and the mutual pair.
    pub fn validate(&self) -> Result<(), ChapError> {
        let name_ok = |n: &str| (1..=64).contains(&n.len()) && n.chars().all(chap_char);
        let secret_ok = |n: &str| (12..=64).contains(&n.len()) && n.chars().all(chap_char);
        if !name_ok(&self.user) {
            return Err(ChapError::BadName);
        }
        if !secret_ok(&self.secret) {
            return Err(ChapError::BadSecret);
        }
        match (&self.target_user, &self.target_secret) {
            (None, None) => Ok(()),
            (Some(u), Some(s)) => {
                if !name_ok(u) {
                    Err(ChapError::BadName)
                } else if !secret_ok(s) {
                    Err(ChapError::BadSecret)
                } else if *s == self.secret {
                    Err(ChapError::SameSecret)
                } else {
                    Ok(())
                }
            }
            _ => Err(ChapError::HalfMutual),
        }
    }

    /// What the API shows of them.
    pub fn summary(&self) -> ChapSummary {
        ChapSummary {
            user: Some(self.user.clone()),
            secret: SecretState::Set,
            target_user: self.target_user.clone(),
            target_secret: if self.target_secret.is_some() {
                SecretState::Set
            } else {
                SecretState::NotSet
            },
        }
    }
}

/// Input for registering a device.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewDevice {
    /// MAC address in any common spelling.
    #[schema(value_type = String, example = "52-54-00-12-34-56")]
    pub mac: MacAddr,
    /// Defaults to `<arch>-<last six hex digits>`.
    #[serde(default)]
    pub name: Option<String>,
    /// Defaults to what was seen on the network, else `unknown`.
    #[serde(default)]
    pub arch: Option<Arch>,
    /// Defaults to true.
    #[serde(default)]
    pub enabled: Option<bool>,
    /// Defaults to the settings' default boot policy.
    #[serde(default)]
    pub boot_policy: Option<BootPolicy>,
    /// Disk image to link.
    #[serde(default)]
    pub image: Option<String>,
    /// Boot profile to link.
    #[serde(default)]
    pub profile: Option<String>,
    /// Free text.
    #[serde(default)]
    pub notes: Option<String>,
    /// iSCSI initiator names its image's target accepts besides one that carries its
    /// MAC (see [`initiator_names`]).
    #[serde(default)]
    pub initiators: Option<Vec<String>>,
}

/// A change to a device; absent fields stay, `null` clears a link.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DevicePatch {
    /// New name.
    #[serde(default)]
    pub name: Option<String>,
    /// New firmware type.
    #[serde(default)]
    pub arch: Option<Arch>,
    /// Enable or disable.
    #[serde(default)]
    pub enabled: Option<bool>,
    /// New boot policy.
    #[serde(default)]
    pub boot_policy: Option<BootPolicy>,
    /// Link an image, or `null` to unlink.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>)]
    pub image: Option<Option<String>>,
    /// Link a profile, or `null` to unlink.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>)]
    pub profile: Option<Option<String>>,
    /// New notes.
    #[serde(default)]
    pub notes: Option<String>,
    /// Set CHAP credentials (the image's target then requires CHAP), or `null` to remove
    /// them. Audited without the secrets.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<ChapCredentials>)]
    pub chap: Option<Option<ChapCredentials>>,
    /// Replace the iSCSI initiator names its image's target accepts besides one that
    /// carries its MAC (`[]`: none; see [`initiator_names`]).
    #[serde(default)]
    pub initiators: Option<Vec<String>>,
}

/// Sort order of the device list.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeviceSort {
    /// By name.
    #[default]
    Name,
    /// By MAC address.
    Mac,
    /// By last network sighting.
    LastSeen,
    /// By registration time.
    CreatedAt,
}

/// Filters for the device list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceQuery {
    /// Substring of name, MAC, notes, image or last IP (case-insensitive).
    pub search: Option<String>,
    /// Only enabled or disabled devices.
    pub enabled: Option<bool>,
    /// Sort key.
    pub sort: DeviceSort,
    /// Descending order.
    pub desc: bool,
    /// Paging.
    pub page: PageQuery,
}

/// A client seen on the network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sighting {
    /// Its MAC address.
    pub mac: MacAddr,
    /// When.
    pub at: Timestamp,
    /// Firmware type, if the request told.
    pub arch: Option<Arch>,
    /// Its address, if known.
    pub ip: Option<String>,
    /// DHCP vendor class, if any.
    pub vendor_class: Option<String>,
}

/// Whether a sighting matched a registered device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SightingOutcome {
    /// A registered device.
    Known,
    /// Not registered; `first` is true when it was never seen before.
    Unknown {
        /// First sighting of this MAC.
        first: bool,
    },
}

/// A client that booted from us but is not registered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct UnknownDevice {
    /// MAC address.
    #[schema(value_type = String)]
    pub mac: MacAddr,
    /// Firmware type last seen.
    pub arch: Arch,
    /// DHCP vendor class last seen.
    pub vendor_class: Option<String>,
    /// Last address.
    pub last_ip: Option<String>,
    /// First sighting.
    #[schema(value_type = String)]
    pub first_seen: Timestamp,
    /// Last sighting.
    #[schema(value_type = String)]
    pub last_seen: Timestamp,
    /// How many times it was seen.
    pub seen_count: u64,
}

/// A disk image served over iSCSI.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Image {
    /// Name; also the file stem and the last part of the target IQN.
    pub name: String,
    /// Size the initiator sees.
    pub size_bytes: u64,
    /// Free text.
    pub description: String,
    /// The image this one was cloned from.
    pub cloned_from: Option<String>,
    /// The device the image is linked to.
    #[schema(value_type = Option<String>)]
    pub linked_mac: Option<MacAddr>,
    /// Creation time.
    #[schema(value_type = String)]
    pub created_at: Timestamp,
    /// Last change.
    #[schema(value_type = String)]
    pub updated_at: Timestamp,
}

/// Input for recording an image.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewImage {
    /// Name: letters, digits, `.`, `_`, `-`; at most 64 characters.
    pub name: String,
    /// Size in bytes, a multiple of 512.
    pub size_bytes: u64,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Origin of a clone.
    #[serde(default)]
    pub cloned_from: Option<String>,
}

/// A change to an image's metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImagePatch {
    /// New description.
    #[serde(default)]
    pub description: Option<String>,
    /// New size (grow only).
    #[serde(default)]
    pub size_bytes: Option<u64>,
}

/// Installer media under the installers directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Installer {
    /// Identifier.
    pub id: i64,
    /// Path relative to the installers directory, `/`-separated.
    pub path: String,
    /// Display name.
    pub name: String,
    /// Kind of media.
    pub kind: InstallerKind,
    /// Firmware it is for, if specific.
    pub arch: Option<Arch>,
    /// Size of the file (or tree) when recorded.
    pub size_bytes: u64,
    /// Free text.
    pub description: String,
    /// Creation time.
    #[schema(value_type = String)]
    pub created_at: Timestamp,
    /// Last change.
    #[schema(value_type = String)]
    pub updated_at: Timestamp,
}

/// Input for recording installer media.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewInstaller {
    /// Path relative to the installers directory.
    pub path: String,
    /// Display name; defaults to the file name.
    #[serde(default)]
    pub name: Option<String>,
    /// Kind of media.
    pub kind: InstallerKind,
    /// Firmware it is for.
    #[serde(default)]
    pub arch: Option<Arch>,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Filled in by the API from the file; ignored on input.
    #[serde(skip)]
    pub size_bytes: u64,
}

/// A change to installer metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InstallerPatch {
    /// New display name.
    #[serde(default)]
    pub name: Option<String>,
    /// New kind.
    #[serde(default)]
    pub kind: Option<InstallerKind>,
    /// New firmware restriction, `null` for any.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<Arch>)]
    pub arch: Option<Option<Arch>>,
    /// New description.
    #[serde(default)]
    pub description: Option<String>,
}

/// What to boot: a Linux kernel, an ISO, or Windows setup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct BootProfile {
    /// Name.
    pub name: String,
    /// What it boots.
    pub kind: ProfileKind,
    /// Firmware it is for, if specific.
    pub arch: Option<Arch>,
    /// Kernel path (Linux) or wimboot (Windows), relative to the installers directory.
    pub kernel: Option<String>,
    /// Initrds, in order.
    pub initrd: Vec<String>,
    /// Kernel command line.
    pub cmdline: String,
    /// ISO path (ISO profiles) or Windows media folder.
    pub iso: Option<String>,
    /// Free text.
    pub description: String,
    /// Creation time.
    #[schema(value_type = String)]
    pub created_at: Timestamp,
    /// Last change.
    #[schema(value_type = String)]
    pub updated_at: Timestamp,
}

/// Input for creating a boot profile.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewProfile {
    /// Name: letters, digits, `.`, `_`, `-`.
    pub name: String,
    /// What it boots.
    pub kind: ProfileKind,
    /// Firmware it is for.
    #[serde(default)]
    pub arch: Option<Arch>,
    /// Kernel or wimboot path.
    #[serde(default)]
    pub kernel: Option<String>,
    /// Initrds.
    #[serde(default)]
    pub initrd: Vec<String>,
    /// Kernel command line.
    #[serde(default)]
    pub cmdline: String,
    /// ISO or media folder.
    #[serde(default)]
    pub iso: Option<String>,
    /// Free text.
    #[serde(default)]
    pub description: String,
}

/// A change to a boot profile.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProfilePatch {
    /// New firmware restriction, `null` for any.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<Arch>)]
    pub arch: Option<Option<Arch>>,
    /// New kernel, `null` for none.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>)]
    pub kernel: Option<Option<String>>,
    /// New initrds.
    #[serde(default)]
    pub initrd: Option<Vec<String>>,
    /// New command line.
    #[serde(default)]
    pub cmdline: Option<String>,
    /// New ISO, `null` for none.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>)]
    pub iso: Option<Option<String>>,
    /// New description.
    #[serde(default)]
    pub description: Option<String>,
}

/// Something that happened while a device booted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct BootEvent {
    /// Increasing identifier; the pagination cursor.
    pub id: i64,
    /// The device.
    #[schema(value_type = String)]
    pub mac: MacAddr,
    /// When it happened.
    #[schema(value_type = String)]
    pub at: Timestamp,
    /// Which service saw it.
    pub source: EventSource,
    /// Event name, e.g. `dhcp_offer`, `tftp_done`, `iscsi_login`.
    pub kind: String,
    /// Human-readable detail.
    pub detail: String,
    /// The client address, if known.
    pub ip: Option<String>,
}

/// Input for a boot event.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewBootEvent {
    /// The device.
    #[schema(value_type = String)]
    pub mac: MacAddr,
    /// When; the API sets it to the time of the request.
    #[serde(skip, default)]
    pub at: Timestamp,
    /// Which service saw it; the API sets `api`.
    #[serde(skip, default = "api_source")]
    pub source: EventSource,
    /// Event name: lower-case letters, digits and `_`.
    pub kind: String,
    /// Human-readable detail.
    #[serde(default)]
    pub detail: String,
    /// The client address, if known.
    #[serde(default)]
    pub ip: Option<String>,
}

const fn api_source() -> EventSource {
    EventSource::Api
}

/// Filters for the boot event listing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventQuery {
    /// Only this device.
    pub mac: Option<MacAddr>,
    /// Only this event name.
    pub kind: Option<String>,
    /// Only this source.
    pub source: Option<EventSource>,
    /// At or after this time.
    pub since: Option<Timestamp>,
    /// Before this time.
    pub until: Option<Timestamp>,
    /// Cursor: events with a smaller id.
    pub before: Option<i64>,
    /// Page size.
    pub limit: u32,
}

/// Daemon-wide settings changed at run time (not the startup configuration).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Whether an unknown device may register itself and create a disk from the boot
    /// console.
    pub allow_console_registration: bool,
    /// Seconds the boot menu waits before it takes the default entry.
    pub menu_timeout_secs: u32,
    /// The boot policy of newly registered devices.
    pub default_boot_policy: BootPolicy,
    /// Boot events kept per device (oldest removed first).
    pub events_per_device: u32,
    /// Boot events older than this many days are removed.
    pub event_max_age_days: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            allow_console_registration: false,
            menu_timeout_secs: 10,
            default_boot_policy: BootPolicy::Menu,
            events_per_device: 1000,
            event_max_age_days: 30,
        }
    }
}

/// A user account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct User {
    /// Login name.
    pub username: String,
    /// Rights.
    pub role: Role,
    /// Disabled users cannot log in and their tokens stop working.
    pub enabled: bool,
    /// Creation time.
    #[schema(value_type = String)]
    pub created_at: Timestamp,
    /// Last successful login.
    #[schema(value_type = Option<String>)]
    pub last_login: Option<Timestamp>,
}

/// Input for creating a user (the password already hashed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewUser {
    /// Login name.
    pub username: String,
    /// Rights.
    pub role: Role,
    /// argon2id PHC string.
    pub password_hash: String,
}

/// A change to a user (the password already hashed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserPatch {
    /// New role.
    pub role: Option<Role>,
    /// Enable or disable.
    pub enabled: Option<bool>,
    /// New argon2id PHC string.
    pub password_hash: Option<String>,
    /// The one session (hash of its secret) that survives the change: the caller's own,
    /// when users change their own password. Every other session of the user ends.
    pub keep_session: Option<String>,
}

/// A login session (the cookie's secret is stored only as a hash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSession {
    /// SHA-256 of the cookie secret, hex.
    pub token_hash: String,
    /// Owner.
    pub username: String,
    /// Creation time.
    pub created_at: Timestamp,
    /// Expiry.
    pub expires_at: Timestamp,
    /// Client address.
    pub ip: Option<String>,
    /// Client User-Agent.
    pub user_agent: Option<String>,
}

/// A live session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// Owner.
    pub username: String,
    /// Creation time.
    pub created_at: Timestamp,
    /// Expiry.
    pub expires_at: Timestamp,
}

/// Input for an API token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewToken {
    /// What it is for.
    pub name: String,
    /// The user it acts as.
    pub owner: String,
    /// Its rights, at most the owner's.
    pub role: Role,
    /// SHA-256 of the secret, hex.
    pub secret_hash: String,
    /// Expiry, if any.
    pub expires_at: Option<Timestamp>,
}

/// An API token for automation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct ApiToken {
    /// Identifier.
    pub id: i64,
    /// What it is for.
    pub name: String,
    /// The user it acts as.
    pub owner: String,
    /// Its rights (never more than the owner's current role).
    pub role: Role,
    /// Creation time.
    #[schema(value_type = String)]
    pub created_at: Timestamp,
    /// Expiry.
    #[schema(value_type = Option<String>)]
    pub expires_at: Option<Timestamp>,
    /// Last use.
    #[schema(value_type = Option<String>)]
    pub last_used_at: Option<Timestamp>,
}

/// One audit log entry.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct AuditEntry {
    /// Increasing identifier; the pagination cursor.
    pub id: i64,
    /// When.
    #[schema(value_type = String)]
    pub at: Timestamp,
    /// Who (user name or `system`).
    pub actor: String,
    /// How they authenticated.
    pub via: String,
    /// From where.
    pub ip: Option<String>,
    /// What, e.g. `device.create`.
    pub action: String,
    /// On what, e.g. the MAC or image name.
    pub target: String,
    /// The change, as JSON.
    #[schema(value_type = Object)]
    pub detail: serde_json::Value,
}

/// Filters for the audit log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditQuery {
    /// Only this actor.
    pub actor: Option<String>,
    /// Only actions starting with this (`device.` or `device.create`).
    pub action: Option<String>,
    /// Only this target.
    pub target: Option<String>,
    /// Cursor: entries with a smaller id.
    pub before: Option<i64>,
    /// Page size.
    pub limit: u32,
}

/// A device's persisted traffic of one service, direction and source (see
/// `service::accounting::Traffic::fold`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrafficTotal {
    /// The device.
    pub mac: MacAddr,
    /// `dhcp`, `tftp`, `http`, `iscsi` or `other`.
    pub service: String,
    /// `rx` (from the device) or `tx` (to it).
    pub direction: String,
    /// `ebpf` or `userspace`.
    pub source: String,
    /// Frames (datagrams for userspace figures), all time.
    pub packets: u64,
    /// Bytes, all time.
    pub bytes: u64,
    /// The counter's frames at the last fold.
    pub seen_packets: u64,
    /// The counter's bytes at the last fold.
    pub seen_bytes: u64,
    /// When the row was last folded.
    pub updated: Timestamp,
}
