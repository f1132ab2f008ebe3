//! Startup configuration: one typed tree from a TOML file, environment variables and a
//! few command-line flags, validated once at startup.
//!
//! Precedence, lowest first: built-in defaults, the file (`--config`, `NETBOOT_CONFIG`),
//! environment variables, flags. Relative paths are resolved against `data_dir`.
//! The original system's variable names (`IMAGES_PATH`, `OS_INSTALLERS_PATH`, ...) are
//! accepted as aliases; see [`ENV_VARS`].

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::dhcp::proxy::BootFiles;
use crate::dhcp::pxe::IpxeFeature;
use crate::dhcp::server;
use crate::ebpf::RunTimeStats;
use crate::mac::MacAddr;

/// The sample configuration shipped in `docs/netboot.toml`; a test parses it.
pub const SAMPLE: &str = include_str!("../../docs/netboot.toml");

/// Configuration errors, reported before anything starts.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown or mistyped keys.
    #[error("parsing {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// An environment variable has a value of the wrong form.
    #[error("environment variable {var}={value:?}: {why}")]
    Env {
        /// The variable.
        var: String,
        /// Its value.
        value: String,
        /// What was expected.
        why: &'static str,
    },
    /// A value is out of range.
    #[error("{field}: {why}")]
    Invalid {
        /// The field, in TOML dotted form.
        field: &'static str,
        /// What is wrong.
        why: String,
    },
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the database, TFTP root, images, installers and logs live.
    pub data_dir: PathBuf,
    /// The address clients use to reach this server in boot scripts and iSCSI portals.
    /// Defaults to the address of the interface a request arrived on.
    pub boot_server_ip: Option<IpAddr>,
    /// HTTP: API, web UI, boot scripts and files.
    pub http: HttpConfig,
    /// Directory layout inside `data_dir` (or absolute).
    pub paths: PathsConfig,
    /// Authentication.
    pub auth: AuthConfig,
    /// DHCP for PXE clients.
    pub dhcp: DhcpConfig,
    /// TFTP server.
    pub tftp: TftpConfig,
    /// iSCSI target.
    pub iscsi: IscsiConfig,
    /// eBPF accounting.
    pub ebpf: EbpfConfig,
    /// Logging.
    pub log: LogConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./netboot-data"),
            boot_server_ip: None,
            http: HttpConfig::default(),
            paths: PathsConfig::default(),
            auth: AuthConfig::default(),
            dhcp: DhcpConfig::default(),
            tftp: TftpConfig::default(),
            iscsi: IscsiConfig::default(),
            ebpf: EbpfConfig::default(),
            log: LogConfig::default(),
        }
    }
}

/// HTTP listener settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Listening address.
    pub listen: SocketAddr,
    /// Mark cookies `Secure` (set when a TLS proxy fronts netbootd).
    pub secure_cookies: bool,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            secure_cookies: false,
        }
    }
}

/// Directories; relative ones are inside `data_dir`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PathsConfig {
    /// The SQLite database file.
    pub database: PathBuf,
    /// TFTP root (iPXE binaries).
    pub tftp: PathBuf,
    /// iSCSI disk images.
    pub images: PathBuf,
    /// Installer media (ISOs, kernels, WinPE).
    pub installers: PathBuf,
    /// Per-device logs uploaded by installers (WinPE).
    pub logs: PathBuf,
}

impl Default for PathsConfig {
    fn default() -> Self {
        Self {
            database: "netboot.db".into(),
            tftp: "tftp".into(),
            images: "images".into(),
            installers: "installers".into(),
            logs: "logs".into(),
        }
    }
}

/// Authentication settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Lifetime of a login session, in minutes.
    pub session_minutes: u32,
    /// Failed logins per user name or client address before a lock-out.
    pub max_failures: u32,
    /// Lock-out after too many failures, in seconds (doubles on each further failure).
    pub lockout_secs: u32,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            session_minutes: 24 * 60,
            max_failures: 5,
            lockout_secs: 60,
        }
    }
}

impl AuthConfig {
    /// Session lifetime.
    pub fn session_ttl(&self) -> Duration {
        Duration::from_secs(u64::from(self.session_minutes) * 60)
    }
}

/// What the DHCP service does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DhcpMode {
    /// No DHCP at all.
    Off,
    /// proxyDHCP: answer PXE clients with the boot file only, next to an existing DHCP
    /// server that hands out addresses.
    Proxy,
    /// The DHCP server of the boot network: addresses from `dhcp.subnets`, with the boot
    /// file in the same offer (no proxyDHCP needed).
    Server,
}

/// One subnet served in `server` mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DhcpSubnet {
    /// The subnet, `10.0.0.0/24`.
    pub network: String,
    /// First and last address handed out, inside the subnet.
    pub range: [Ipv4Addr; 2],
    /// Default gateway for the clients.
    #[serde(default)]
    pub router: Option<Ipv4Addr>,
    /// DNS servers for the clients.
    #[serde(default)]
    pub dns: Vec<Ipv4Addr>,
    /// Domain name for the clients.
    #[serde(default)]
    pub domain: String,
    /// Lease time in seconds.
    #[serde(default = "default_lease_secs")]
    pub lease_secs: u32,
    /// The interface whose clients this subnet serves. Empty: the subnet that holds the
    /// interface's own address, or the relay's (`giaddr`) for relayed requests.
    #[serde(default)]
    pub interface: String,
}

fn default_lease_secs() -> u32 {
    3600
}

/// A fixed address in `server` mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DhcpReservation {
    /// The client's MAC.
    pub mac: MacAddr,
    /// Its address, inside one of the subnets.
    pub ip: Ipv4Addr,
    /// Host name sent to it.
    #[serde(default)]
    pub hostname: String,
}

/// DHCP settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DhcpConfig {
    /// `proxy`, `server` or `off`.
    pub mode: DhcpMode,
    /// Boot interfaces; empty means every interface that is up and has IPv4.
    pub interfaces: Vec<String>,
    /// iPXE binary for x86 BIOS firmware, in the TFTP root.
    pub bios_file: String,
    /// iPXE binary for x64 UEFI firmware.
    pub uefi_x64_file: String,
    /// iPXE binary for 32-bit x86 UEFI firmware ("" for none).
    pub uefi_ia32_file: String,
    /// iPXE binary for ARM64 UEFI firmware ("" for none).
    pub uefi_arm64_file: String,
    /// iPXE clients that do not announce all of these features (names such as `http`,
    /// `https`, `iscsi`, `srp`, or option 175 sub-option numbers) get the firmware boot
    /// file, the full iPXE build, instead of their script: a limited iPXE (a NIC option
    /// ROM) chains to the full one. List only features the full build has.
    pub ipxe_required_features: Vec<String>,
    /// `server` mode: the subnets handed out.
    pub subnets: Vec<DhcpSubnet>,
    /// `server` mode: fixed addresses.
    pub reservations: Vec<DhcpReservation>,
    /// `server` mode: how long an offered address is held, in seconds.
    pub offer_secs: u32,
    /// `server` mode: how long a declined address (another host uses it) is held back.
    pub decline_secs: u32,
}

impl Default for DhcpConfig {
    fn default() -> Self {
        let files = BootFiles::default();
        Self {
            mode: DhcpMode::Proxy,
            interfaces: Vec::new(),
            bios_file: files.bios,
            uefi_x64_file: files.uefi_x64,
            uefi_ia32_file: files.uefi_ia32.unwrap_or_default(),
            uefi_arm64_file: files.uefi_arm64.unwrap_or_default(),
            ipxe_required_features: Vec::new(),
            subnets: Vec::new(),
            reservations: Vec::new(),
            offer_secs: 60,
            decline_secs: 600,
        }
    }
}

impl DhcpConfig {
    /// The firmware boot files ("" is none).
    pub fn boot_files(&self) -> BootFiles {
        let opt = |s: &str| (!s.is_empty()).then(|| s.to_owned());
        BootFiles {
            bios: self.bios_file.clone(),
            uefi_x64: self.uefi_x64_file.clone(),
            uefi_ia32: opt(&self.uefi_ia32_file),
            uefi_arm64: opt(&self.uefi_arm64_file),
        }
    }

    /// `ipxe_required_features` as feature codes.
    pub fn ipxe_required(&self) -> Result<Vec<IpxeFeature>, ConfigError> {
        self.ipxe_required_features
            .iter()
            .map(|f| {
                IpxeFeature::parse(f).ok_or_else(|| ConfigError::Invalid {
                    field: "dhcp.ipxe_required_features",
                    why: format!(
                        "{f:?} is not an iPXE feature name (http, https, iscsi, srp, ...) or number"
                    ),
                })
            })
            .collect()
    }

    /// The server-mode pools and reservations, checked.
    pub fn server(&self) -> Result<server::Config, ConfigError> {
        let invalid = |field: &'static str, why: String| ConfigError::Invalid { field, why };
        let mut pools = Vec::new();
        for sub in &self.subnets {
            let (net, prefix) = sub
                .network
                .split_once('/')
                .and_then(|(a, p)| Some((a.parse::<Ipv4Addr>().ok()?, p.parse::<u8>().ok()?)))
                .filter(|&(_, p)| (8..=30).contains(&p))
                .ok_or_else(|| {
                    invalid(
                        "dhcp.subnets.network",
                        format!("{:?} is not an IPv4 network with a prefix of 8 to 30 bits (10.0.0.0/24)", sub.network),
                    )
                })?;
            let pool = server::Pool {
                network: net,
                prefix,
                first: sub.range[0],
                last: sub.range[1],
                router: sub.router,
                dns: sub.dns.clone(),
                domain: (!sub.domain.is_empty()).then(|| sub.domain.clone()),
                lease_secs: sub.lease_secs,
                interface: (!sub.interface.is_empty()).then(|| sub.interface.clone()),
            };
            if !pool.contains(pool.first)
                || !pool.contains(pool.last)
                || u32::from(pool.first) > u32::from(pool.last)
            {
                return Err(invalid(
                    "dhcp.subnets.range",
                    format!(
                        "{} - {} is not an ascending range inside {}",
                        pool.first, pool.last, sub.network
                    ),
                ));
            }
            if sub.lease_secs < 60 {
                return Err(invalid(
                    "dhcp.subnets.lease_secs",
                    "must be at least 60".into(),
                ));
            }
            if pools
                .iter()
                .any(|p: &server::Pool| p.contains(pool.network) || pool.contains(p.network))
            {
                return Err(invalid(
                    "dhcp.subnets",
                    format!("{} overlaps another subnet", sub.network),
                ));
            }
            pools.push(pool);
        }
        let mut reservations = Vec::new();
        for r in &self.reservations {
            if !pools.iter().any(|p| p.contains(r.ip)) {
                return Err(invalid(
                    "dhcp.reservations",
                    format!("{} ({}) is in no subnet", r.ip, r.mac),
                ));
            }
            if reservations
                .iter()
                .any(|o: &server::Reservation| o.ip == r.ip || o.mac == r.mac)
            {
                return Err(invalid(
                    "dhcp.reservations",
                    format!("{} or {} is reserved twice", r.ip, r.mac),
                ));
            }
            reservations.push(server::Reservation {
                mac: r.mac,
                ip: r.ip,
                hostname: (!r.hostname.is_empty()).then(|| r.hostname.clone()),
            });
        }
        if self.mode == DhcpMode::Server && pools.is_empty() {
            return Err(invalid(
                "dhcp.subnets",
                "server mode needs at least one subnet".into(),
            ));
        }
        if self.offer_secs == 0 || self.decline_secs == 0 {
            return Err(invalid(
                "dhcp",
                "offer_secs and decline_secs must be at least 1".into(),
            ));
        }
        Ok(server::Config {
            pools,
            reservations,
            offer_secs: self.offer_secs,
            decline_secs: self.decline_secs,
        })
    }
}

/// Upper bound of `busy_poll_us`: a millisecond is far beyond any loopback or LAN round
/// trip a spin could catch.
pub const MAX_BUSY_POLL_US: u32 = 1000;

/// Upper bound of `iscsi.dead_peer_secs`: half of it is the keepalive idle time, which
/// the kernel caps at 32767 seconds.
pub const MAX_DEAD_PEER_SECS: u32 = 65_534;

/// iSCSI target settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IscsiConfig {
    /// Serve iSCSI at all.
    pub enabled: bool,
    /// Listening address (3260 is the iSCSI port).
    pub listen: SocketAddr,
    /// Target names are `<iqn_prefix>:<image>`, the image name in IQN characters (lower
    /// case, `_` as `-`: [`crate::iscsi::name::image_target`]), in the boot scripts as at
    /// the target (RFC 7143 section 4.2.7.2: `iqn.YYYY-MM.` and a reversed domain you own).
    pub iqn_prefix: String,
    /// Initiator names that may use every image (installers, tests). Otherwise an image
    /// accepts only initiators whose name ends in the MAC of the device it is linked to, and
    /// the initiator names that device lists (`initiators`).
    pub allow: Vec<String>,
    /// Which driver runs the connections: io_uring (falls back to tokio when a ring cannot
    /// be set up) or tokio.
    pub driver: IscsiDriver,
    /// io_uring driver: microseconds to spin for the next completion before sleeping.
    /// Saves a sleeping CPU's wake-up per command at queue depth 1 (iPXE's `sanboot`)
    /// at the price of a busy core while initiators are active; 0: never spin.
    pub busy_poll_us: u32,
    /// io_uring driver: send the Data-In of reads of 64 KiB and more from the page cache
    /// through pipes (splice, no copy in the target, the work on the kernel's io-wq
    /// threads) instead of reading into a buffer and sending that from the ring's thread.
    pub splice_reads: bool,
    /// io_uring driver: send the Data-In of reads of 64 KiB and more whose pages are all
    /// in the page cache straight from there (a read-only mapping of the image, copied
    /// once, into the socket) instead of reading them into a buffer first; reads of
    /// pages not in memory, and connections with data digests, read as before.
    pub mapped_reads: bool,
    /// TCP congestion control of the iSCSI connections, e.g. `"cubic"` or `"reno"`
    /// (`setsockopt(TCP_CONGESTION)` on the listening socket, which its connections
    /// inherit); empty: the system's (`net.ipv4.tcp_congestion_control`). An algorithm the
    /// kernel lacks, or one an unprivileged netbootd may not use
    /// (`net.ipv4.tcp_allowed_congestion_control`), stops the start with an error.
    pub tcp_congestion: String,
    /// Seconds after which the connection of an initiator that has stopped answering
    /// (switched off, cable pulled) is closed and its session ends: TCP keepalive probes
    /// start after half of it idle and three probes share the rest, and data left
    /// unacknowledged that long ends the connection too (`TCP_USER_TIMEOUT`). Set on the
    /// listening socket, which its connections inherit. 0: never (no keepalive).
    pub dead_peer_secs: u32,
    /// Seconds a connection has to complete its login (RFC 7143 section 6.3 leaves the
    /// time to the target); one that has not by then is closed, so that connections that
    /// never log in cannot pile up. 0: no limit.
    pub login_timeout_secs: u32,
}

/// The iSCSI driver (`iscsi.driver`, `NETBOOT_ISCSI_DRIVER`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IscsiDriver {
    /// One io_uring on a dedicated thread (`crate::driver::uring::iscsi`).
    #[default]
    Uring,
    /// One tokio task per connection (`crate::service::iscsi`).
    Tokio,
}

impl std::str::FromStr for IscsiDriver {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "uring" => Ok(Self::Uring),
            "tokio" => Ok(Self::Tokio),
            _ => Err(()),
        }
    }
}

impl IscsiConfig {
    /// `login_timeout_secs` as a duration; `None`: no limit.
    pub fn login_timeout(&self) -> Option<Duration> {
        (self.login_timeout_secs > 0).then(|| Duration::from_secs(self.login_timeout_secs.into()))
    }

    /// `busy_poll_us` as a duration.
    pub fn busy_poll(&self) -> Duration {
        Duration::from_micros(u64::from(self.busy_poll_us))
    }
}

impl Default for IscsiConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([0, 0, 0, 0], 3260)),
            iqn_prefix: "iqn.2026-01.org.netboot".into(),
            allow: Vec::new(),
            driver: IscsiDriver::Uring,
            busy_poll_us: 0,
            splice_reads: false,
            mapped_reads: true,
            tcp_congestion: String::new(),
            dead_peer_secs: 120,
            login_timeout_secs: 30,
        }
    }
}

/// TFTP server settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TftpConfig {
    /// Serve TFTP at all.
    pub enabled: bool,
    /// Listening address (port 69 for PXE firmware).
    pub listen: SocketAddr,
    /// Largest blksize granted (RFC 2348); larger requests are clamped.
    pub max_blksize: u16,
    /// Largest windowsize granted (RFC 7440); larger requests are clamped.
    pub max_windowsize: u16,
    /// Retransmission timeout when the client asks for none, in milliseconds.
    pub timeout_ms: u32,
    /// Retransmissions of a window before a transfer is abandoned.
    pub max_retries: u32,
    /// Seconds a transfer waits at most for its client to acknowledge something before it
    /// is abandoned, whatever timeout the client negotiated (RFC 2349 allows 255 s, which
    /// with backoff and retries would keep a dead transfer for hours).
    pub max_idle_secs: u32,
    /// Transfers at once.
    pub max_sessions: usize,
    /// Transfers at once from one client address.
    pub per_client: usize,
    /// Match file names case-insensitively when the exact name does not exist.
    pub case_insensitive: bool,
    /// Serve every transfer from the listening port instead of a port of its own (RFC
    /// 1350's transfer ID), as dnsmasq's `tftp-single-port` does: for a server behind NAT
    /// or a firewall that forwards only that port (a container with a mapped port).
    /// Transfers are told apart by the client's address and port; windows go without UDP
    /// GSO, and a vanished client is noticed by its timeout, not by an ICMP error.
    pub single_port: bool,
    /// Files up to this size (MiB) are kept in memory once read.
    pub cache_file_max_mib: u64,
    /// Memory for cached files (MiB).
    pub cache_total_mib: u64,
    /// Which driver runs TFTP: io_uring (falls back to tokio when a ring cannot be set
    /// up) or tokio.
    pub driver: TftpDriver,
    /// io_uring driver: microseconds to spin for the next completion before sleeping.
    /// Saves a sleeping CPU's wake-up per block of a lock-step transfer at the price of a
    /// busy core while transfers run; 0: never spin.
    pub busy_poll_us: u32,
    /// Name of the iPXE script netbootd generates for TFTP clients (also under a MAC
    /// directory, `<mac>/boot.ipxe`); a real file of that name wins. Empty: none.
    pub ipxe_script: String,
}

/// The TFTP driver (`tftp.driver`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TftpDriver {
    /// One io_uring on a dedicated thread (`crate::driver::uring`).
    #[default]
    Uring,
    /// tokio tasks (`crate::driver::tokio`).
    Tokio,
}

impl TftpConfig {
    /// `busy_poll_us` as a duration.
    pub fn busy_poll(&self) -> Duration {
        Duration::from_micros(u64::from(self.busy_poll_us))
    }
}

impl Default for TftpConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([0, 0, 0, 0], 69)),
            max_blksize: crate::tftp::transfer::MAX_BLKSIZE,
            max_windowsize: 64,
            timeout_ms: 1000,
            max_retries: 5,
            max_idle_secs: 120,
            max_sessions: 2000,
            per_client: 8,
            case_insensitive: false,
            single_port: false,
            cache_file_max_mib: 64,
            cache_total_mib: 512,
            driver: TftpDriver::Uring,
            busy_poll_us: 0,
            ipxe_script: "boot.ipxe".to_owned(),
        }
    }
}

/// eBPF accounting settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EbpfConfig {
    /// Boot interfaces to count on; empty means accounting is off.
    pub interfaces: Vec<String>,
    /// Capacity of the per-MAC counter map (entries, i.e. MAC × interface × service × direction).
    pub max_entries: u32,
    /// Capacity of the per-connection map (TFTP transfers, HTTP and iSCSI connections).
    pub max_flows: u32,
    /// Capacity of the IP → MAC binding map.
    pub max_bindings: u32,
    /// MACs of routers in front of routed clients (relays of DHCP are found automatically):
    /// their frames count for the client the IP address is bound to, never for the router.
    pub routers: Vec<MacAddr>,
    /// Directory in bpffs where the counter maps are pinned, so that counters survive a
    /// restart of the daemon (bpffs is mounted at /sys/fs/bpf if needed); empty: no pinning.
    pub pin_dir: PathBuf,
    /// At most this many MACs get their own series in `/metrics`; the rest are summed
    /// under `mac="other"`. Devices in the inventory come first.
    pub metrics_max_macs: usize,
    /// A device whose iSCSI writes make no progress for this many seconds is reported
    /// stalled (a boot event and `install.phase` in its metrics); writes again: resumed.
    pub install_stall_secs: u64,
    /// When the kernel measures the programs' run time
    /// (`netboot_ebpf_program_run_seconds_total`): `sampled` (one second in every minute),
    /// `always` (about 60 ns more per frame) or `off`.
    pub run_time_stats: RunTimeStats,
}

impl Default for EbpfConfig {
    fn default() -> Self {
        Self {
            interfaces: Vec::new(),
            max_entries: netboot_common::DEFAULT_MAX_MACS,
            max_flows: netboot_common::DEFAULT_MAX_FLOWS,
            max_bindings: netboot_common::DEFAULT_MAX_BINDINGS,
            routers: Vec::new(),
            pin_dir: PathBuf::from("/sys/fs/bpf/netboot"),
            metrics_max_macs: 10_000,
            install_stall_secs: 300,
            run_time_stats: RunTimeStats::Sampled,
        }
    }
}

/// Log output settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A `tracing` filter, e.g. `info` or `netboot_daemon=debug,info`.
    pub level: String,
    /// `text` for people, `json` for log collectors.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// One environment variable, its aliases and what it sets.
#[derive(Debug)]
pub struct EnvVar {
    /// The netboot name.
    pub name: &'static str,
    /// Names from the system we replace, also accepted.
    pub aliases: &'static [&'static str],
    /// What it sets.
    pub help: &'static str,
}

/// Every environment variable netbootd reads (the README's table is checked against it).
pub const ENV_VARS: &[EnvVar] = &[
    EnvVar {
        name: "NETBOOT_CONFIG",
        aliases: &[],
        help: "configuration file (same as --config)",
    },
    EnvVar {
        name: "NETBOOT_DATA_DIR",
        aliases: &["DATA_PATH"],
        help: "data_dir",
    },
    EnvVar {
        name: "NETBOOT_BOOT_SERVER_IP",
        aliases: &["BOOT_SERVER_IP"],
        help: "boot_server_ip",
    },
    EnvVar {
        name: "NETBOOT_HTTP_LISTEN",
        aliases: &[],
        help: "http.listen (address:port)",
    },
    EnvVar {
        name: "NETBOOT_HTTP_PORT",
        aliases: &["API_PORT"],
        help: "port of http.listen",
    },
    EnvVar {
        name: "NETBOOT_DHCP_MODE",
        aliases: &[],
        help: "dhcp.mode (proxy or off)",
    },
    EnvVar {
        name: "NETBOOT_DHCP_INTERFACES",
        aliases: &[],
        help: "dhcp.interfaces (comma-separated)",
    },
    EnvVar {
        name: "NETBOOT_ISCSI_LISTEN",
        aliases: &[],
        help: "iscsi.listen (address:port)",
    },
    EnvVar {
        name: "NETBOOT_ISCSI_DRIVER",
        aliases: &[],
        help: "iscsi.driver (uring or tokio)",
    },
    EnvVar {
        name: "NETBOOT_ISCSI_BUSY_POLL_US",
        aliases: &[],
        help: "iscsi.busy_poll_us (microseconds)",
    },
    EnvVar {
        name: "NETBOOT_ISCSI_TCP_CONGESTION",
        aliases: &[],
        help: "iscsi.tcp_congestion (a TCP congestion control, e.g. cubic)",
    },
    EnvVar {
        name: "NETBOOT_ISCSI_DEAD_PEER_SECS",
        aliases: &[],
        help: "iscsi.dead_peer_secs (seconds; 0: never)",
    },
    EnvVar {
        name: "NETBOOT_TFTP_BUSY_POLL_US",
        aliases: &[],
        help: "tftp.busy_poll_us (microseconds)",
    },
    EnvVar {
        name: "NETBOOT_TFTP_LISTEN",
        aliases: &[],
        help: "tftp.listen (address:port)",
    },
    EnvVar {
        name: "NETBOOT_TFTP_SINGLE_PORT",
        aliases: &[],
        help: "tftp.single_port (true or false)",
    },
    EnvVar {
        name: "NETBOOT_TFTP_PORT",
        aliases: &["TFTP_PORT"],
        help: "port of tftp.listen",
    },
    EnvVar {
        name: "NETBOOT_DATABASE",
        aliases: &[],
        help: "paths.database",
    },
    EnvVar {
        name: "NETBOOT_TFTP_DIR",
        aliases: &["TFTP_ROOT"],
        help: "paths.tftp",
    },
    EnvVar {
        name: "NETBOOT_IMAGES_DIR",
        aliases: &["IMAGES_PATH"],
        help: "paths.images",
    },
    EnvVar {
        name: "NETBOOT_INSTALLERS_DIR",
        aliases: &["OS_INSTALLERS_PATH"],
        help: "paths.installers",
    },
    EnvVar {
        name: "NETBOOT_LOGS_DIR",
        aliases: &["WINPE_LOGS_PATH"],
        help: "paths.logs",
    },
    EnvVar {
        name: "NETBOOT_SESSION_MINUTES",
        aliases: &["AUTH_TOKEN_EXPIRE_MINUTES"],
        help: "auth.session_minutes",
    },
    EnvVar {
        name: "NETBOOT_EBPF_INTERFACES",
        aliases: &[],
        help: "ebpf.interfaces (comma-separated)",
    },
    EnvVar {
        name: "NETBOOT_EBPF_PIN_DIR",
        aliases: &[],
        help: "ebpf.pin_dir (empty: no pinning)",
    },
    EnvVar {
        name: "NETBOOT_INSTALL_STALL_SECS",
        aliases: &["INSTALL_STALL_THRESHOLD_SECONDS"],
        help: "ebpf.install_stall_secs",
    },
    EnvVar {
        name: "NETBOOT_LOG",
        aliases: &["LOG_LEVEL"],
        help: "log.level",
    },
    EnvVar {
        name: "NETBOOT_LOG_FORMAT",
        aliases: &[],
        help: "log.format (text or json)",
    },
];

/// Looks a variable up by its name and aliases. The original system's Unraid template
/// defines `BOOT_SERVER_IP` with a trailing tab and its docs with a trailing space, so
/// those spellings are accepted too.
fn lookup(env: &dyn Fn(&str) -> Option<String>, name: &str) -> Option<(String, String)> {
    let var = ENV_VARS
        .iter()
        .find(|v| v.name == name)
        .expect("invariant: every variable apply_env reads is listed in ENV_VARS");
    std::iter::once(var.name)
        .chain(var.aliases.iter().copied())
        .find_map(|n| {
            [n.to_owned(), format!("{n} "), format!("{n}\t")]
                .into_iter()
                .find_map(|k| env(&k).map(|v| (k.trim_end().to_owned(), v.trim().to_owned())))
        })
}

/// A comma-separated list, blanks dropped.
fn list(v: &str) -> Vec<String> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// One of the named `choices`.
fn choice<T: Copy>(
    var: String,
    value: String,
    choices: &[(&str, T)],
    why: &'static str,
) -> Result<T, ConfigError> {
    choices
        .iter()
        .find(|(name, _)| *name == value)
        .map(|(_, v)| *v)
        .ok_or(ConfigError::Env { var, value, why })
}

fn parse_env<T: std::str::FromStr>(
    var: String,
    value: String,
    why: &'static str,
) -> Result<T, ConfigError> {
    value
        .parse()
        .map_err(|_| ConfigError::Env { var, value, why })
}

impl Config {
    /// Reads a configuration file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text, path)
    }

    /// Parses TOML text (`origin` names it in errors).
    pub fn from_toml(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_owned(),
            message: e.to_string(),
        })
    }

    /// Applies environment variables read through `env` (injected for tests).
    pub fn apply_env(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some((_, v)) = lookup(env, "NETBOOT_DATA_DIR") {
            self.data_dir = v.into();
        }
        if let Some((k, v)) = lookup(env, "NETBOOT_BOOT_SERVER_IP") {
            self.boot_server_ip = Some(parse_env(k, v, "expected an IP address")?);
        }
        if let Some((k, v)) = lookup(env, "NETBOOT_HTTP_LISTEN") {
            self.http.listen = parse_env(k, v, "expected address:port, e.g. 0.0.0.0:8080")?;
        }
        if let Some((k, v)) = lookup(env, "NETBOOT_HTTP_PORT") {
            self.http
                .listen
                .set_port(parse_env(k, v, "expected a port number")?);
        }
        if let Some((k, v)) = lookup(env, "NETBOOT_DHCP_MODE") {
            self.dhcp.mode = choice(
                k,
                v,
                &[
                    ("proxy", DhcpMode::Proxy),
                    ("server", DhcpMode::Server),
                    ("off", DhcpMode::Off),
                ],
                "expected proxy, server or off",
            )?;
        }
        if let Some((_, v)) = lookup(env, "NETBOOT_DHCP_INTERFACES") {
            self.dhcp.interfaces = list(&v);
        }
        if let Some((k, v)) = lookup(env, "NETBOOT_ISCSI_LISTEN") {
            self.iscsi.listen = parse_env(k, v, "expected address:port, e.g. 0.0.0.0:3260")?;
        }
        if let Some((k, v)) = lookup(env, "NETBOOT_ISCSI_DRIVER") {
            self.iscsi.driver = parse_env(k, v, "expected uring or tokio")?;
        }
        if let Some((k, v)) = lookup(env, "NETBOOT_ISCSI_BUSY_POLL_US") {
            self.iscsi.busy_poll_us = parse_env(k, v, "expected microseconds, e.g. 50")?;
        }
        if let Some((_, v)) = lookup(env, "NETBOOT_ISCSI_TCP_CONGESTION") {
            self.iscsi.tcp_congestion = v.to_owned();
        }
        if let Some((k, v)) = lookup(env, "NETBOOT_ISCSI_DEAD_PEER_SECS") {
            self.iscsi.dead_peer_secs = parse_env(k, v, "expected seconds, e.g. 120")?;
        }
        if let Some((k, v)) = lookup(env, "NETBOOT_TFTP_BUSY_POLL_US") {
            self.tftp.busy_poll_us = parse_env(k, v, "expected microseconds, e.g. 50")?;
        }
        if let Some((k, v)) = lookup(env, "NETBOOT_TFTP_LISTEN") {
            self.tftp.listen = parse_env(k, v, "expected address:port, e.g. 0.0.0.0:69")?;
        }
        if let Some((k, v)) = lookup(env, "NETBOOT_TFTP_SINGLE_PORT") {
            self.tftp.single_port = parse_env(k, v, "expected true or false")?;
        }
        if let Some((k, v)) = lookup(env, "NETBOOT_TFTP_PORT") {
            self.tftp
                .listen
                .set_port(parse_env(k, v, "expected a port number")?);
        }
        for (name, field) in [
            ("NETBOOT_DATABASE", &mut self.paths.database),
            ("NETBOOT_TFTP_DIR", &mut self.paths.tftp),
            ("NETBOOT_IMAGES_DIR", &mut self.paths.images),
            ("NETBOOT_INSTALLERS_DIR", &mut self.paths.installers),
            ("NETBOOT_LOGS_DIR", &mut self.paths.logs),
        ] {
            if let Some((_, v)) = lookup(env, name) {
                *field = v.into();
            }
        }
        if let Some((k, v)) = lookup(env, "NETBOOT_SESSION_MINUTES") {
            self.auth.session_minutes = parse_env(k, v, "expected minutes")?;
        }
        if let Some((_, v)) = lookup(env, "NETBOOT_EBPF_INTERFACES") {
            self.ebpf.interfaces = list(&v);
        }
        if let Some((_, v)) = lookup(env, "NETBOOT_EBPF_PIN_DIR") {
            self.ebpf.pin_dir = v.into();
        }
        if let Some((k, v)) = lookup(env, "NETBOOT_INSTALL_STALL_SECS") {
            self.ebpf.install_stall_secs = parse_env(k, v, "expected seconds")?;
        }
        if let Some((_, v)) = lookup(env, "NETBOOT_LOG") {
            self.log.level = v;
        }
        if let Some((k, v)) = lookup(env, "NETBOOT_LOG_FORMAT") {
            self.log.format = choice(
                k,
                v,
                &[("text", LogFormat::Text), ("json", LogFormat::Json)],
                "expected text or json",
            )?;
        }
        Ok(())
    }

    /// Checks ranges and resolves paths.
    pub fn validate(self) -> Result<Validated, ConfigError> {
        if self.auth.session_minutes == 0 {
            return Err(ConfigError::Invalid {
                field: "auth.session_minutes",
                why: "must be at least 1".into(),
            });
        }
        if self.auth.max_failures == 0 {
            return Err(ConfigError::Invalid {
                field: "auth.max_failures",
                why: "must be at least 1".into(),
            });
        }
        if !(8..=65464).contains(&self.tftp.max_blksize) {
            return Err(ConfigError::Invalid {
                field: "tftp.max_blksize",
                why: "must be 8 to 65464 (RFC 2348)".into(),
            });
        }
        if self.tftp.max_windowsize == 0
            || self.tftp.timeout_ms == 0
            || self.tftp.max_sessions == 0
            || self.tftp.max_idle_secs == 0
        {
            return Err(ConfigError::Invalid {
                field: "tftp",
                why:
                    "max_windowsize, timeout_ms, max_idle_secs and max_sessions must be at least 1"
                        .into(),
            });
        }
        for (field, us) in [
            ("tftp.busy_poll_us", self.tftp.busy_poll_us),
            ("iscsi.busy_poll_us", self.iscsi.busy_poll_us),
        ] {
            if us > MAX_BUSY_POLL_US {
                return Err(ConfigError::Invalid {
                    field,
                    why: format!(
                        "must be at most {MAX_BUSY_POLL_US} (a spin longer than a round trip \
                         only burns the core)"
                    ),
                });
            }
        }
        if !crate::iscsi::name::valid_prefix(&self.iscsi.iqn_prefix) {
            return Err(ConfigError::Invalid {
                field: "iscsi.iqn_prefix",
                why: format!(
                    "{:?} is not an iqn. naming authority like iqn.2026-01.org.example \
                     (lower-case letters, digits, '.' and '-'; at most 200 bytes)",
                    self.iscsi.iqn_prefix
                ),
            });
        }
        let cc = &self.iscsi.tcp_congestion;
        if cc.len() > 15 || !cc.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(ConfigError::Invalid {
                field: "iscsi.tcp_congestion",
                why: format!(
                    "{cc:?} is not a TCP congestion control name (such as cubic, reno or bbr: \
                     at most 15 letters, digits or underscores)"
                ),
            });
        }
        if !(self.iscsi.dead_peer_secs == 0
            || (3..=MAX_DEAD_PEER_SECS).contains(&self.iscsi.dead_peer_secs))
        {
            return Err(ConfigError::Invalid {
                field: "iscsi.dead_peer_secs",
                why: format!(
                    "must be 0 (never) or 3 to {MAX_DEAD_PEER_SECS} seconds (a keepalive probe \
                     every second at the least, the kernel's keepalive idle time at the most)"
                ),
            });
        }
        if self.ebpf.max_entries < 64 || self.ebpf.max_flows < 64 || self.ebpf.max_bindings < 64 {
            return Err(ConfigError::Invalid {
                field: "ebpf",
                why: "max_entries, max_flows and max_bindings must be at least 64".into(),
            });
        }
        self.dhcp.ipxe_required()?;
        self.dhcp.server()?;
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return Err(ConfigError::Invalid {
                field: "log.level",
                why: e.to_string(),
            });
        }
        let resolve = |p: &Path| {
            if p.is_absolute() {
                p.to_owned()
            } else {
                self.data_dir.join(p)
            }
        };
        let paths = Paths {
            database: resolve(&self.paths.database),
            tftp: resolve(&self.paths.tftp),
            images: resolve(&self.paths.images),
            installers: resolve(&self.paths.installers),
            logs: resolve(&self.paths.logs),
        };
        Ok(Validated {
            paths,
            config: self,
        })
    }
}

/// Resolved directory layout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Paths {
    /// SQLite file.
    pub database: PathBuf,
    /// TFTP root.
    pub tftp: PathBuf,
    /// Disk images.
    pub images: PathBuf,
    /// Installer media.
    pub installers: PathBuf,
    /// Uploaded logs.
    pub logs: PathBuf,
}

impl Paths {
    /// The directories the daemon creates and the health check verifies.
    pub fn dirs(&self) -> [(&'static str, &Path); 4] {
        [
            ("tftp", &self.tftp),
            ("images", &self.images),
            ("installers", &self.installers),
            ("logs", &self.logs),
        ]
    }
}

/// A configuration that passed validation.
#[derive(Debug, Clone)]
pub struct Validated {
    /// The configuration as given.
    pub config: Config,
    /// Paths resolved against `data_dir`.
    pub paths: Paths,
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn sample_config_parses_and_equals_the_defaults() {
        let c = Config::from_toml(SAMPLE, Path::new("docs/netboot.toml")).expect("sample parses");
        assert_eq!(
            c,
            Config::default(),
            "docs/netboot.toml documents the defaults"
        );
        c.validate().expect("sample validates");
    }

    #[test]
    fn unknown_keys_are_errors_with_a_location() {
        let e = Config::from_toml(
            "[http]\nlisten = \"0.0.0.0:80\"\nlisen = 1\n",
            Path::new("x.toml"),
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("x.toml") && msg.contains("lisen"), "{msg}");
    }

    #[test]
    fn environment_overrides_file_and_aliases_work() {
        let mut c = Config::from_toml(
            "data_dir = \"/srv/nb\"\n[http]\nlisten = \"127.0.0.1:9000\"\n",
            Path::new("f"),
        )
        .expect("parse");
        c.apply_env(&env(&[
            ("IMAGES_PATH", "/iscsi-images"),
            ("BOOT_SERVER_IP\t", " 10.0.0.5 "),
            ("API_PORT", "9100"),
            ("NETBOOT_EBPF_INTERFACES", "eth0, eth1,"),
        ]))
        .expect("env applies");
        assert_eq!(c.boot_server_ip, Some("10.0.0.5".parse().expect("ip")));
        assert_eq!(c.http.listen, "127.0.0.1:9100".parse().expect("addr"));
        assert_eq!(c.ebpf.interfaces, ["eth0", "eth1"]);
        let v = c.validate().expect("valid");
        assert_eq!(v.paths.images, PathBuf::from("/iscsi-images"));
        assert_eq!(v.paths.database, PathBuf::from("/srv/nb/netboot.db"));
    }

    #[test]
    fn busy_polls_come_from_the_environment_and_are_bounded() {
        let mut c = Config::default();
        c.apply_env(&env(&[
            ("NETBOOT_TFTP_BUSY_POLL_US", "50"),
            ("NETBOOT_ISCSI_BUSY_POLL_US", "1000"),
        ]))
        .expect("env applies");
        assert_eq!((c.tftp.busy_poll_us, c.iscsi.busy_poll_us), (50, 1000));
        assert!(c.clone().validate().is_ok());
        let e = c
            .clone()
            .apply_env(&env(&[("NETBOOT_TFTP_BUSY_POLL_US", "-1")]))
            .unwrap_err();
        assert!(e.to_string().contains("NETBOOT_TFTP_BUSY_POLL_US"), "{e}");
        c.tftp.busy_poll_us = MAX_BUSY_POLL_US + 1;
        assert_eq!(refused_field(c), "tftp.busy_poll_us");
    }

    /// The field `validate` refuses `c` for; a panic when it accepts `c` or fails
    /// another way.
    fn refused_field(c: Config) -> &'static str {
        match c.validate() {
            Err(ConfigError::Invalid { field, .. }) => field,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_iscsi_congestion_control_comes_from_the_environment_and_is_a_name() {
        let mut c = Config::default();
        assert_eq!(c.iscsi.tcp_congestion, "", "the system's by default");
        c.apply_env(&env(&[("NETBOOT_ISCSI_TCP_CONGESTION", "reno")]))
            .expect("env applies");
        assert_eq!(c.iscsi.tcp_congestion, "reno");
        assert!(c.clone().validate().is_ok());
        for bad in ["reno; rm", "a_name_longer_than_15", "cubic\n"] {
            let mut b = c.clone();
            b.iscsi.tcp_congestion = bad.into();
            assert_eq!(refused_field(b), "iscsi.tcp_congestion", "{bad:?}");
        }
    }

    #[test]
    fn the_dead_peer_time_comes_from_the_environment_and_is_bounded() {
        let mut c = Config::default();
        assert_eq!(c.iscsi.dead_peer_secs, 120);
        c.apply_env(&env(&[("NETBOOT_ISCSI_DEAD_PEER_SECS", "0")]))
            .expect("env applies");
        assert_eq!(c.iscsi.dead_peer_secs, 0, "0: never");
        assert!(c.clone().validate().is_ok());
        for (secs, ok) in [
            (1, false),
            (2, false),
            (3, true),
            (MAX_DEAD_PEER_SECS, true),
        ] {
            let mut b = c.clone();
            b.iscsi.dead_peer_secs = secs;
            assert_eq!(b.validate().is_ok(), ok, "{secs}");
        }
        let mut b = c.clone();
        b.iscsi.dead_peer_secs = MAX_DEAD_PEER_SECS + 1;
        assert_eq!(refused_field(b), "iscsi.dead_peer_secs");
        assert!(
            c.apply_env(&env(&[("NETBOOT_ISCSI_DEAD_PEER_SECS", "soon")]))
                .is_err()
        );
    }

    #[test]
    fn the_iqn_prefix_is_a_naming_authority() {
        let mut c = Config::default();
        c.iscsi.iqn_prefix = "iqn.2026-02.org.example.lab".into();
        assert!(c.clone().validate().is_ok());
        for bad in [
            "iqn.2026-02.Org.Example",
            "example.org",
            "iqn.2026-02.org.x:y",
        ] {
            c.iscsi.iqn_prefix = bad.into();
            assert_eq!(refused_field(c.clone()), "iscsi.iqn_prefix", "{bad:?}");
        }
    }

    #[test]
    fn the_netboot_name_wins_over_an_alias() {
        let mut c = Config::default();
        c.apply_env(&env(&[("NETBOOT_IMAGES_DIR", "/a"), ("IMAGES_PATH", "/b")]))
            .expect("env");
        assert_eq!(c.paths.images, PathBuf::from("/a"));
    }

    #[test]
    fn dhcp_server_subnets_are_checked() {
        let parse = |extra: &str| {
            Config::from_toml(
                &format!("[dhcp]\nmode = \"server\"\n{extra}"),
                Path::new("t.toml"),
            )
            .expect("parses")
            .validate()
        };
        let subnet = |network: &str, range: &str| {
            format!("[[dhcp.subnets]]\nnetwork = \"{network}\"\nrange = {range}\n")
        };
        let ok = subnet("10.1.0.0/24", r#"["10.1.0.100", "10.1.0.200"]"#);
        let v = parse(&format!(
            "{ok}[[dhcp.reservations]]\nmac = \"52-54-00-00-00-01\"\nip = \"10.1.0.5\"\n"
        ))
        .expect("valid");
        let pools = v.config.dhcp.server().expect("server config");
        assert_eq!(pools.pools[0].mask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(pools.pools[0].lease_secs, 3600);
        assert_eq!(pools.reservations[0].ip, Ipv4Addr::new(10, 1, 0, 5));
        for (bad, field) in [
            (String::new(), "dhcp.subnets"),
            (
                subnet("10.1.0.0", r#"["10.1.0.1", "10.1.0.2"]"#),
                "dhcp.subnets.network",
            ),
            (
                subnet("10.1.0.0/31", r#"["10.1.0.1", "10.1.0.1"]"#),
                "dhcp.subnets.network",
            ),
            (
                subnet("10.1.0.0/24", r#"["10.1.0.100", "10.1.1.5"]"#),
                "dhcp.subnets.range",
            ),
            (
                subnet("10.1.0.0/24", r#"["10.1.0.200", "10.1.0.100"]"#),
                "dhcp.subnets.range",
            ),
            (
                format!(
                    "{ok}{}",
                    subnet("10.1.0.128/25", r#"["10.1.0.130", "10.1.0.140"]"#)
                ),
                "dhcp.subnets",
            ),
            (
                format!(
                    "{ok}[[dhcp.reservations]]\nmac = \"52:54:00:00:00:01\"\nip = \"10.2.0.5\"\n"
                ),
                "dhcp.reservations",
            ),
            (
                format!("ipxe_required_features = [\"warp\"]\n{ok}"),
                "dhcp.ipxe_required_features",
            ),
        ] {
            match parse(&bad) {
                Err(ConfigError::Invalid { field: f, .. }) => assert_eq!(f, field, "{bad}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[test]
    fn bad_environment_values_name_the_variable() {
        let mut c = Config::default();
        let e = c
            .apply_env(&env(&[("BOOT_SERVER_IP", "not-an-ip")]))
            .unwrap_err();
        assert!(
            e.to_string().contains("BOOT_SERVER_IP=\"not-an-ip\""),
            "{e}"
        );
        let e = Config {
            log: LogConfig {
                level: "info,[".into(),
                ..LogConfig::default()
            },
            ..Config::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.to_string().starts_with("log.level"), "{e}");
    }
}
