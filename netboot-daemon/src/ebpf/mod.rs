//! Exact per-client traffic accounting with eBPF: load, attach, feed and read the maps.
//!
//! The eBPF object (crate `netboot-ebpf`, built by this crate's build.rs) is embedded in the
//! binary. [`Accounting::load`] loads it and verifies its two TC programs, [`Accounting::attach`]
//! attaches them to an interface's ingress and egress (TCX links, or a clsact qdisc on kernels
//! before 6.6), and the readers ([`Accounting::mac_counters`], [`Accounting::unattributed`],
//! [`Accounting::flows`], ...) sum the per-CPU values.
//!
//! Counts are wire bytes as the interface counts them (`skb->len`: Ethernet header through
//! payload, no FCS), per (client MAC, interface, [`Direction`], [`Service`]). How the kernel
//! side finds a frame's client (DHCP `chaddr`, then the [bindings](Accounting::bind) the daemon
//! writes, then the frame's own MAC unless it is a router's) and what it cannot attribute is
//! described in `netboot-common`. Every frame lands in exactly one bucket, so for every
//! interface the client rows plus the unattributed rows plus the overflow equal the
//! interface's own counters.
//!
//! With [`Options::pin_dir`] the counter maps are pinned in bpffs (mounted if needed) under a
//! directory named after the map layout version, so a restarted daemon continues the same
//! counters. The programs themselves are never pinned: they detach when [`Accounting`] is
//! dropped or [`Accounting::detach_all`] runs.
//!
//! To attach to an interface in another network namespace, call [`Accounting::attach`] inside
//! [`in_netns`]. Do not run the daemon under `ip netns exec`, which remounts `/sys` and hides the
//! host's bpffs.

mod netns;

use std::ffi::CString;
use std::fmt;
use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd as _, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuHashMap, PerCpuValues};
use aya::programs::tc::{self, NlOptions, SchedClassifierLinkId, TcAttachOptions};
use aya::programs::{LinkOrder, ProgramError, SchedClassifier, TcAttachType, TcError};
use aya::{Ebpf, EbpfLoader};
use aya_log::EbpfLogger;
use netboot_common::{
    BINDINGS, BindingValue, Counters, EGRESS, ERROR_FLOW_FULL, ERROR_MAC_FULL, ERROR_MAP_UPDATE,
    ERROR_ROUTERS_FULL, ERRORS, FLOWS, FlowCounters, FlowKey, HAVE_ROUTERS, INGRESS, IPPROTO_TCP,
    IPPROTO_UDP, IfKey, IpKey, LAYOUT_VERSION, MAC_STATS, MAX_PORTS, MAX_ROUTERS, MAX_UNATTRIBUTED,
    METHOD_BINDING, METHOD_CHADDR, METHOD_L2, MacKey, MacOnly, PORT_DHCP_CLIENT, PORT_DHCP_SERVER,
    PORT_ISCSI, PORT_PXE_PROXY, PORT_TFTP, PORTS, ROUTER_CONFIGURED, ROUTER_DHCP_RELAY, ROUTERS,
    SERVICE_DHCP, SERVICE_HTTP, SERVICE_ISCSI, SERVICE_OTHER, SERVICE_TFTP, UNATTRIBUTED,
};

pub use netns::in_netns;
use netns::{THREAD_NETNS, enter_netns};

use crate::mac::MacAddr;

/// The eBPF object built by build.rs; empty when built with `AYA_BUILD_SKIP=1`.
fn object() -> &'static [u8] {
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/netboot-ebpf"))
}

/// The programs in the object, where they attach, and what they count.
const PROGRAMS: [(&str, TcAttachType, Direction); 2] = [
    ("tc_ingress", TcAttachType::Ingress, Direction::Ingress),
    ("tc_egress", TcAttachType::Egress, Direction::Egress),
];

/// The maps pinned with [`Options::pin_dir`]: the counters and what attribution depends on.
/// `PORTS` is not among them: it is rebuilt from the configuration and the running transfers.
const PINNED_MAPS: [&str; 6] = [MAC_STATS, UNATTRIBUTED, ERRORS, FLOWS, BINDINGS, ROUTERS];

/// `BPF_FS_MAGIC` from `linux/magic.h`: the `f_type` of a mounted bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Why loading, attaching or reading the accounting programs failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EbpfError {
    /// The binary was built with `AYA_BUILD_SKIP=1` and holds no eBPF object.
    #[error(
        "netbootd was built without eBPF (AYA_BUILD_SKIP=1), so per-client accounting is unavailable"
    )]
    NotBuilt,
    /// A map capacity was zero.
    #[error("the eBPF map {0} needs room for at least one entry")]
    ZeroCapacity(&'static str),
    /// Mounting bpffs or creating the pin directory failed.
    #[error("preparing the pin directory {path}")]
    PinDir {
        /// The directory.
        path: PathBuf,
        /// What failed.
        #[source]
        source: io::Error,
    },
    /// Parsing the object or creating its maps failed.
    #[error("loading the eBPF object")]
    Load(#[source] Box<aya::EbpfError>),
    /// The object lacks a program this module expects.
    #[error("eBPF program {0} is missing from the object")]
    MissingProgram(&'static str),
    /// The kernel refused a program (verifier) or it has the wrong type.
    #[error("loading eBPF program {program}")]
    Program {
        /// The program's name.
        program: &'static str,
        /// What aya reported.
        #[source]
        source: Box<ProgramError>,
    },
    /// Adding the clsact qdisc for a netlink attach failed.
    #[error("adding a clsact qdisc to {iface}")]
    Qdisc {
        /// The interface.
        iface: String,
        /// What aya reported.
        #[source]
        source: Box<TcError>,
    },
    /// Attaching a program to an interface failed.
    #[error("attaching {direction} accounting to {iface} with {mode}")]
    Attach {
        /// The interface.
        iface: String,
        /// The attach mode that was tried.
        mode: AttachMode,
        /// Which of the two programs failed.
        direction: Direction,
        /// What aya reported.
        #[source]
        source: Box<ProgramError>,
    },
    /// The interface does not exist (in the calling thread's namespace).
    #[error("no interface {0}")]
    NoInterface(String),
    /// Entering or leaving a network namespace, or opening the current one, failed.
    #[error("switching network namespaces")]
    Netns(#[source] io::Error),
    /// The object lacks a map this module expects.
    #[error("eBPF map {0} is missing from the object")]
    MissingMap(&'static str),
    /// Reading or writing a map failed.
    #[error("eBPF map {map}")]
    Map {
        /// The map's name.
        map: &'static str,
        /// What aya reported.
        #[source]
        source: Box<MapError>,
    },
    /// A key in a counter map has a direction the kernel side never writes.
    #[error("eBPF map {0} holds an unknown direction {1}")]
    UnknownDirection(&'static str, u8),
    /// `BPF_PROG_TEST_RUN` failed.
    #[error("test run of eBPF program {program}")]
    TestRun {
        /// The program's name.
        program: &'static str,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
}

/// How the programs were attached to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AttachMode {
    /// TCX links (kernel 6.6 and later); they detach when their file descriptor closes.
    Tcx,
    /// Direct-action filters on a clsact qdisc, for older kernels.
    Netlink,
}

impl AttachMode {
    /// A short lower-case name: `tcx` or `netlink`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Tcx => "tcx",
            Self::Netlink => "netlink",
        }
    }
}

impl fmt::Display for AttachMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which way a frame crossed the interface, seen from the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// Received from the client; counted under the frame's source MAC.
    Ingress,
    /// Sent to the client; counted under the frame's destination MAC.
    Egress,
}

impl Direction {
    /// The metric label: `rx` or `tx`, as in the interface's own counters.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Ingress => "rx",
            Self::Egress => "tx",
        }
    }

    /// The direction of a label written by [`Direction::as_str`].
    pub fn parse(label: &str) -> Option<Self> {
        [Self::Ingress, Self::Egress]
            .into_iter()
            .find(|d| d.as_str() == label)
    }

    /// The value of `MacKey::direction` in the kernel map (the kernel side writes it).
    #[cfg(test)]
    const fn to_raw(self) -> u8 {
        match self {
            Self::Ingress => INGRESS,
            Self::Egress => EGRESS,
        }
    }

    /// Reads `MacKey::direction`; `None` for a value the kernel side never writes.
    pub const fn from_raw(raw: u8) -> Option<Self> {
        match raw {
            INGRESS => Some(Self::Ingress),
            EGRESS => Some(Self::Egress),
            _ => None,
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The service a frame belongs to, classified by the kernel side from its ports, as the
/// daemon registered them ([`Options::ports`], [`Accounting::set_port`]): the server side's
/// port first, then the client side's. Everything else, including non-IP frames, is
/// [`Service::Other`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Service {
    /// DHCP and PXE proxyDHCP.
    Dhcp,
    /// TFTP: requests to port 69, and each transfer on its own server port.
    Tftp,
    /// HTTP.
    Http,
    /// iSCSI.
    Iscsi,
    /// Any other traffic.
    Other,
    /// A class this daemon does not know (a newer eBPF object).
    Unknown(u8),
}

impl Service {
    /// The metric label.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Dhcp => "dhcp",
            Self::Tftp => "tftp",
            Self::Http => "http",
            Self::Iscsi => "iscsi",
            Self::Other => "other",
            Self::Unknown(_) => "unknown",
        }
    }

    /// The service of a label written by [`Service::as_str`] (not `unknown`).
    pub fn parse(label: &str) -> Option<Self> {
        Self::KNOWN.into_iter().find(|s| s.as_str() == label)
    }

    /// The services this daemon classifies, in the order it shows them.
    pub const KNOWN: [Self; 5] = [Self::Dhcp, Self::Tftp, Self::Http, Self::Iscsi, Self::Other];

    /// The value of `MacKey::service` in the kernel maps.
    const fn to_raw(self) -> u8 {
        match self {
            Self::Dhcp => SERVICE_DHCP,
            Self::Tftp => SERVICE_TFTP,
            Self::Http => SERVICE_HTTP,
            Self::Iscsi => SERVICE_ISCSI,
            Self::Other => SERVICE_OTHER,
            Self::Unknown(raw) => raw,
        }
    }

    /// Reads `MacKey::service`.
    pub const fn from_raw(raw: u8) -> Self {
        match raw {
            SERVICE_DHCP => Self::Dhcp,
            SERVICE_TFTP => Self::Tftp,
            SERVICE_HTTP => Self::Http,
            SERVICE_ISCSI => Self::Iscsi,
            SERVICE_OTHER => Self::Other,
            other => Self::Unknown(other),
        }
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A transport protocol of a [`ServicePort`] or a [`Flow`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    const fn to_raw(self) -> u8 {
        match self {
            Self::Tcp => IPPROTO_TCP,
            Self::Udp => IPPROTO_UDP,
        }
    }

    const fn from_raw(raw: u8) -> Option<Self> {
        match raw {
            IPPROTO_TCP => Some(Self::Tcp),
            IPPROTO_UDP => Some(Self::Udp),
            _ => None,
        }
    }

    /// `tcp` or `udp`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

/// A port of this host that carries a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServicePort {
    /// TCP or UDP.
    pub protocol: Protocol,
    /// The port.
    pub port: u16,
    /// What it carries.
    pub service: Service,
}

impl ServicePort {
    /// The ports of DHCP (67, 68, 4011), TFTP (69 and the given ports: a listener on
    /// another port, which in single-port mode carries all of its transfers), the given
    /// HTTP ports, and the given iSCSI ports (3260 when empty).
    pub fn standard(tftp: &[u16], http: &[u16], iscsi: &[u16]) -> Vec<Self> {
        let udp = |port, service| Self {
            protocol: Protocol::Udp,
            port,
            service,
        };
        let tcp = |port, service| Self {
            protocol: Protocol::Tcp,
            port,
            service,
        };
        let mut ports = vec![
            udp(PORT_DHCP_SERVER, Service::Dhcp),
            udp(PORT_DHCP_CLIENT, Service::Dhcp),
            udp(PORT_PXE_PROXY, Service::Dhcp),
            udp(PORT_TFTP, Service::Tftp),
        ];
        ports.extend(
            tftp.iter()
                .filter(|&&p| p != PORT_TFTP)
                .map(|&p| udp(p, Service::Tftp)),
        );
        ports.extend(http.iter().map(|&p| tcp(p, Service::Http)));
        if iscsi.is_empty() {
            ports.push(tcp(PORT_ISCSI, Service::Iscsi));
        }
        ports.extend(iscsi.iter().map(|&p| tcp(p, Service::Iscsi)));
        ports
    }
}

/// What [`Accounting::load`] sets up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// Capacity of the per-client table: (client, interface, direction, service) rows.
    pub max_macs: u32,
    /// Capacity of the per-connection table.
    pub max_flows: u32,
    /// Capacity of the IP → MAC binding table.
    pub max_bindings: u32,
    /// The service ports; see [`ServicePort::standard`].
    pub ports: Vec<ServicePort>,
    /// MACs of routers: frames from or to them count for the client their IP address is
    /// bound to, or as unattributed, never for the router. Relays of DHCP are found by the
    /// kernel side itself.
    pub routers: Vec<MacAddr>,
    /// Where to pin the counter maps (a directory in bpffs, which is mounted at
    /// `/sys/fs/bpf` if needed); `None` keeps them in this process only.
    pub pin_dir: Option<PathBuf>,
    /// When the kernel measures the programs' run time.
    pub run_time_stats: RunTimeStats,
}

/// When the kernel measures the programs' run time (`BPF_STATS_RUN_TIME`, which adds two
/// clock reads to every run of every BPF program on the host while it is on: about 60 ns
/// per frame here, a third of the accounting program's own cost).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunTimeStats {
    /// Never: the run-time figures stay at zero.
    Off,
    /// One second in every [`RunTimeStats::SAMPLE_EVERY`]: the figures count the runs of
    /// those seconds only, and their ratio is the cost of a run.
    #[default]
    Sampled,
    /// Always, from load on: every run is measured.
    Always,
}

impl RunTimeStats {
    /// The sampling period, in seconds, of [`RunTimeStats::Sampled`].
    pub const SAMPLE_EVERY: u32 = 60;

    /// Its name in the configuration.
    pub fn name(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Sampled => "sampled",
            Self::Always => "always",
        }
    }
}

impl Options {
    /// Room for `max_macs` client rows, the default flow and binding capacities, the
    /// standard ports with HTTP on 80 and 8080, no routers, no pinning.
    pub fn new(max_macs: u32) -> Self {
        Self {
            max_macs,
            max_flows: netboot_common::DEFAULT_MAX_FLOWS,
            max_bindings: netboot_common::DEFAULT_MAX_BINDINGS,
            ports: ServicePort::standard(&[], &[80, 8080], &[]),
            routers: Vec::new(),
            pin_dir: None,
            run_time_stats: RunTimeStats::Always,
        }
    }
}

/// How the kernel side found a frame's client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Method {
    /// The `chaddr` of a DHCP packet.
    Chaddr,
    /// The frame's own MAC (an on-link host).
    L2,
    /// The binding of the client's IP address (a router's frame).
    Binding,
    /// A value this daemon does not know.
    Unknown(u8),
}

impl Method {
    /// `chaddr`, `l2`, `binding` or `unknown`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Chaddr => "chaddr",
            Self::L2 => "l2",
            Self::Binding => "binding",
            Self::Unknown(_) => "unknown",
        }
    }

    const fn from_raw(raw: u8) -> Self {
        match raw {
            METHOD_CHADDR => Self::Chaddr,
            METHOD_L2 => Self::L2,
            METHOD_BINDING => Self::Binding,
            other => Self::Unknown(other),
        }
    }
}

/// The counters of one (client, interface, direction, service, method), summed over all CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MacCounters {
    /// The client's MAC.
    pub mac: MacAddr,
    /// How the kernel side found the client.
    pub method: Method,
    /// The interface's index (in the namespace it was attached in).
    pub ifindex: u32,
    /// Received from or sent to the client.
    pub direction: Direction,
    /// The service class.
    pub service: Service,
    /// Frames.
    pub packets: u64,
    /// Bytes, Ethernet header included, FCS excluded.
    pub bytes: u64,
}

/// Frames of one (interface, direction, service) that no client could be found for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnattributedCounters {
    /// The interface's index.
    pub ifindex: u32,
    /// Received or sent.
    pub direction: Direction,
    /// The service class.
    pub service: Service,
    /// Frames.
    pub packets: u64,
    /// Bytes, as in [`MacCounters::bytes`].
    pub bytes: u64,
}

/// One connection's counters, summed over all CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    /// The client's address and port.
    pub client: SocketAddr,
    /// This host's address and port.
    pub server: SocketAddr,
    /// TCP or UDP.
    pub protocol: Protocol,
    /// The service class.
    pub service: Service,
    /// The interface's index.
    pub ifindex: u32,
    /// Frames, wire bytes and payload per direction; `last_seen_ns` is the latest over CPUs
    /// (CLOCK_MONOTONIC), and `mac` the client of the latest frame.
    pub counters: FlowCounters,
}

impl Flow {
    /// The client the connection's latest frame was attributed to, if any.
    pub fn mac(&self) -> Option<MacAddr> {
        (self.counters.mac != [0; 6]).then_some(MacAddr(self.counters.mac))
    }

    /// How long ago its latest frame was seen.
    pub fn idle(&self) -> Duration {
        Duration::from_nanos(monotonic_ns().saturating_sub(self.counters.last_seen_ns))
    }
}

/// What the kernel side could not count, summed over all CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ErrorCounters {
    /// Frames not counted because the per-client table was full ([`Options::max_macs`]).
    pub mac_full: Counters,
    /// Frames not counted because a table update failed for another reason.
    pub map_update: Counters,
    /// Packets whose connection was not counted because the flow table was full (the
    /// frames themselves are counted per client).
    pub flow_full: Counters,
    /// Relays that could not be recorded as routers (the table holds 1024).
    pub routers_full: Counters,
}

/// Why a MAC is treated as a router.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouterReason {
    /// It relayed a DHCP request (found by the kernel side).
    DhcpRelay,
    /// The configuration says so.
    Configured,
    /// A value this daemon does not know.
    Unknown(u8),
}

/// How full a kernel table is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapFill {
    /// The map's name.
    pub map: &'static str,
    /// Entries in use.
    pub entries: u64,
    /// Capacity.
    pub capacity: u64,
}

/// A program's cumulative run time, as the kernel measures it while `BPF_STATS_RUN_TIME` is
/// enabled (from load on).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProgramStats {
    /// `tc_ingress` or `tc_egress`.
    pub program: &'static str,
    /// Total time spent in the program.
    pub run_time: Duration,
    /// Number of runs.
    pub run_count: u64,
}

/// An interface the programs are attached to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attached {
    /// Its name.
    pub name: String,
    /// Its index (in the namespace it was attached in).
    pub ifindex: u32,
    /// How.
    pub mode: AttachMode,
}

/// One attached program.
struct AttachedLink {
    iface: String,
    program: &'static str,
    id: SchedClassifierLinkId,
    /// For netlink filters, the namespace they were attached in. aya detaches them with a
    /// netlink request in the *current* namespace, so detaching must switch back to it.
    netns: Option<File>,
}

/// The loaded object and its attachments.
struct Programs {
    ebpf: Ebpf,
    links: Vec<AttachedLink>,
    interfaces: Vec<Attached>,
    logger: Option<EbpfLogger<KernelLog>>,
}

/// The maps, taken out of the object so that they can be used from any thread.
struct Maps {
    macs: PerCpuHashMap<MapData, MacKey, Counters>,
    unattributed: PerCpuHashMap<MapData, IfKey, Counters>,
    errors: PerCpuArray<MapData, Counters>,
    flows: Mutex<PerCpuHashMap<MapData, FlowKey, FlowCounters>>,
    bindings: Mutex<HashMap<MapData, IpKey, BindingValue>>,
    routers: Mutex<HashMap<MapData, MacOnly, u8>>,
    /// The kernel's port array, and the ports set in it (for the fill figure).
    ports: Mutex<(Array<MapData, u8>, std::collections::HashSet<u32>)>,
    have_routers: Mutex<Array<MapData, u32>>,
    capacity: [(&'static str, u32); 7],
}

/// The loaded accounting programs, their maps and attachments. Shareable between threads.
///
/// Dropping it detaches everything (see [`Accounting::detach_all`]).
pub struct Accounting {
    programs: Mutex<Programs>,
    maps: Maps,
    pinned: Option<PathBuf>,
    resumed: bool,
    /// Keeps `BPF_STATS_RUN_TIME` enabled while it is open; see [`Accounting::start_measuring`].
    stats: Mutex<Option<OwnedFd>>,
    /// When run time is measured: [`Options::run_time_stats`], or `Off` if it cannot be.
    run_time_stats: RunTimeStats,
}

impl fmt::Debug for Accounting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Accounting")
            .field("pinned", &self.pinned)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Accounting {
    /// Loads the embedded object with the capacities, ports and routers of `options`, and
    /// loads both programs into the kernel (running the verifier).
    ///
    /// With [`Options::pin_dir`], the counter maps are reused from (or pinned to)
    /// `<pin_dir>/v<layout version>/`. Kernel log lines are forwarded to `tracing` by
    /// [`Accounting::drain_logs`]; failing to set that up, or to enable run-time statistics,
    /// is logged as a warning, not an error.
    pub fn load(options: &Options) -> Result<Self, EbpfError> {
        let object = object();
        if object.is_empty() {
            return Err(EbpfError::NotBuilt);
        }
        let capacity = [
            (MAC_STATS, options.max_macs),
            (UNATTRIBUTED, MAX_UNATTRIBUTED),
            (FLOWS, options.max_flows),
            (BINDINGS, options.max_bindings),
            (ROUTERS, MAX_ROUTERS),
            (PORTS, MAX_PORTS),
            (ERRORS, netboot_common::ERROR_SLOTS),
        ];
        if let Some((name, _)) = capacity.iter().find(|(_, n)| *n == 0) {
            return Err(EbpfError::ZeroCapacity(name));
        }
        let pinned = options
            .pin_dir
            .as_deref()
            .map(prepare_pin_dir)
            .transpose()?;
        // The client counters go on from an earlier run when their pin is there.
        let resumed = pinned
            .as_deref()
            .is_some_and(|dir| dir.join(MAC_STATS).exists());
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(MAC_STATS, options.max_macs)
            .map_max_entries(FLOWS, options.max_flows)
            .map_max_entries(BINDINGS, options.max_bindings);
        if let Some(dir) = &pinned {
            for name in PINNED_MAPS {
                loader.map_pin_path(name, dir.join(name));
            }
        }
        let mut ebpf = loader
            .load(object)
            .map_err(|e| EbpfError::Load(Box::new(e)))?;

        // Before the programs load: the logger owns the log map's fd from here on.
        let logger = match EbpfLogger::init_with_logger(&mut ebpf, KernelLog) {
            Ok(logger) => Some(logger),
            Err(error) => {
                tracing::warn!(%error, "eBPF log forwarding is unavailable");
                None
            }
        };
        for (program, _, _) in PROGRAMS {
            classifier(&mut ebpf, program)?
                .load()
                .map_err(|source| EbpfError::Program {
                    program,
                    source: Box::new(source),
                })?;
        }
        let maps = Maps {
            macs: typed(take(&mut ebpf, MAC_STATS)?, MAC_STATS)?,
            unattributed: typed(take(&mut ebpf, UNATTRIBUTED)?, UNATTRIBUTED)?,
            errors: typed(take(&mut ebpf, ERRORS)?, ERRORS)?,
            flows: Mutex::new(typed(take(&mut ebpf, FLOWS)?, FLOWS)?),
            bindings: Mutex::new(typed(take(&mut ebpf, BINDINGS)?, BINDINGS)?),
            routers: Mutex::new(typed(take(&mut ebpf, ROUTERS)?, ROUTERS)?),
            ports: Mutex::new((
                typed(take(&mut ebpf, PORTS)?, PORTS)?,
                std::collections::HashSet::new(),
            )),
            have_routers: Mutex::new(typed(take(&mut ebpf, HAVE_ROUTERS)?, HAVE_ROUTERS)?),
            capacity,
        };
        let mut acc = Self {
            programs: Mutex::new(Programs {
                ebpf,
                links: Vec::new(),
                interfaces: Vec::new(),
                logger,
            }),
            maps,
            pinned,
            resumed,
            stats: Mutex::new(None),
            run_time_stats: options.run_time_stats,
        };
        if acc.run_time_stats != RunTimeStats::Off {
            // Sampled: tried once here, so that a kernel without them is said at start-up.
            let tried = acc.start_measuring();
            if acc.run_time_stats == RunTimeStats::Sampled {
                acc.stop_measuring();
            }
            if let Err(error) = tried {
                tracing::warn!(%error, "eBPF program run-time statistics are unavailable");
                acc.run_time_stats = RunTimeStats::Off;
            }
        }
        for port in &options.ports {
            acc.set_port(*port)?;
        }
        for mac in &options.routers {
            let key = MacOnly {
                mac: mac.0,
                pad: [0; 2],
            };
            lock(&acc.maps.routers)
                .insert(key, ROUTER_CONFIGURED, 0)
                .map_err(map_error(ROUTERS))?;
            lock(&acc.maps.have_routers)
                .set(0, 1, 0)
                .map_err(map_error(HAVE_ROUTERS))?;
        }
        Ok(acc)
    }

    /// Whether the client counters were pinned by an earlier run and go on from there
    /// (otherwise they started at zero with this load).
    pub fn resumed(&self) -> bool {
        self.resumed
    }

    /// The directory the counter maps are pinned in, if any.
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pinned.as_deref()
    }

    /// Attaches accounting to `iface`'s ingress and egress: TCX first, and a clsact
    /// qdisc with direct-action filters if TCX fails (kernels before 6.6).
    ///
    /// The interface is looked up in the calling thread's network namespace; wrap the call
    /// in [`in_netns`] for another one. On error nothing stays attached to `iface` from this call.
    pub fn attach(&self, iface: &str) -> Result<AttachMode, EbpfError> {
        match self.attach_with(iface, AttachMode::Tcx) {
            Ok(()) => Ok(AttachMode::Tcx),
            Err(error) => {
                tracing::warn!(iface, %error, "TCX attach failed, falling back to a clsact qdisc");
                self.attach_with(iface, AttachMode::Netlink)?;
                Ok(AttachMode::Netlink)
            }
        }
    }

    /// Attaches like [`Accounting::attach`], but only with `mode`, without fallback.
    ///
    /// For tests and for operators who must avoid one of the modes.
    pub fn attach_with_mode(&self, iface: &str, mode: AttachMode) -> Result<(), EbpfError> {
        self.attach_with(iface, mode)
    }

    fn attach_with(&self, iface: &str, mode: AttachMode) -> Result<(), EbpfError> {
        let ifindex = ifindex(iface)?;
        let netns = match mode {
            AttachMode::Tcx => None,
            AttachMode::Netlink => {
                match tc::qdisc_add_clsact(iface) {
                    Ok(()) => {}
                    Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
                    Err(source) => {
                        return Err(EbpfError::Qdisc {
                            iface: iface.to_owned(),
                            source: Box::new(source),
                        });
                    }
                }
                Some(File::open(THREAD_NETNS).map_err(EbpfError::Netns)?)
            }
        };

        let mut p = lock(&self.programs);
        let mut attached = Vec::with_capacity(PROGRAMS.len());
        for (program, attach_type, direction) in PROGRAMS {
            match attach_one(
                &mut p.ebpf,
                iface,
                mode,
                netns.as_ref(),
                program,
                attach_type,
                direction,
            ) {
                Ok(link) => attached.push(link),
                Err(error) => {
                    // Undo the half-done attach, so the caller can retry or fall back.
                    for link in attached {
                        detach_link(&mut p.ebpf, link);
                    }
                    return Err(error);
                }
            }
        }
        p.links.extend(attached);
        p.interfaces.push(Attached {
            name: iface.to_owned(),
            ifindex,
            mode,
        });
        Ok(())
    }

    /// The interfaces the programs are attached to.
    pub fn interfaces(&self) -> Vec<Attached> {
        lock(&self.programs).interfaces.clone()
    }

    /// Detaches every program from every interface. Failures are logged, not returned:
    /// this also runs on drop, and there is nothing a caller could do differently.
    pub fn detach_all(&self) {
        let mut p = lock(&self.programs);
        for link in std::mem::take(&mut p.links) {
            detach_link(&mut p.ebpf, link);
        }
        p.interfaces.clear();
    }

    /// The per-client counters, one row per (MAC, interface, direction, service).
    pub fn mac_counters(&self) -> Result<Vec<MacCounters>, EbpfError> {
        let mut rows = Vec::new();
        for entry in self.maps.macs.iter() {
            let (key, per_cpu) = entry.map_err(map_error(MAC_STATS))?;
            let total = sum(&per_cpu);
            rows.push(MacCounters {
                mac: MacAddr(key.mac),
                method: Method::from_raw(key.method),
                ifindex: key.ifindex,
                direction: direction(MAC_STATS, key.direction)?,
                service: Service::from_raw(key.service),
                packets: total.packets,
                bytes: total.bytes,
            });
        }
        Ok(rows)
    }

    /// Frames no client could be found for, one row per (interface, direction, service).
    pub fn unattributed(&self) -> Result<Vec<UnattributedCounters>, EbpfError> {
        let mut rows = Vec::new();
        for entry in self.maps.unattributed.iter() {
            let (key, per_cpu) = entry.map_err(map_error(UNATTRIBUTED))?;
            let total = sum(&per_cpu);
            rows.push(UnattributedCounters {
                ifindex: key.ifindex,
                direction: direction(UNATTRIBUTED, key.direction)?,
                service: Service::from_raw(key.service),
                packets: total.packets,
                bytes: total.bytes,
            });
        }
        Ok(rows)
    }

    /// What the kernel side could not count.
    pub fn error_counters(&self) -> Result<ErrorCounters, EbpfError> {
        let slot = |index: u32| {
            self.maps
                .errors
                .get(&index, 0)
                .map(|per_cpu| sum(&per_cpu))
                .map_err(map_error(ERRORS))
        };
        Ok(ErrorCounters {
            mac_full: slot(ERROR_MAC_FULL)?,
            map_update: slot(ERROR_MAP_UPDATE)?,
            flow_full: slot(ERROR_FLOW_FULL)?,
            routers_full: slot(ERROR_ROUTERS_FULL)?,
        })
    }

    /// Every counted TFTP, HTTP and iSCSI connection.
    pub fn flows(&self) -> Result<Vec<Flow>, EbpfError> {
        let map = lock(&self.maps.flows);
        let mut rows = Vec::new();
        for entry in map.iter() {
            let (key, per_cpu) = entry.map_err(map_error(FLOWS))?;
            if let Some(flow) = flow_row(&key, &per_cpu) {
                rows.push(flow);
            }
        }
        Ok(rows)
    }

    /// The counters of the connection between `client` and `server` (this host), summed
    /// over the interfaces it crossed; `None` if the kernel side saw none of its packets.
    pub fn flow(
        &self,
        protocol: Protocol,
        client: SocketAddr,
        server: SocketAddr,
    ) -> Result<Option<FlowCounters>, EbpfError> {
        let (client_ip, server_ip) = (mapped(client.ip()), mapped(server.ip()));
        let mut found: Option<FlowCounters> = None;
        for flow in self.flows()? {
            if flow.protocol == protocol
                && mapped(flow.client.ip()) == client_ip
                && flow.client.port() == client.port()
                && mapped(flow.server.ip()) == server_ip
                && flow.server.port() == server.port()
            {
                let total = found.get_or_insert_with(FlowCounters::default);
                add_flow_counters(total, &flow.counters);
            }
        }
        Ok(found)
    }

    /// Removes one connection's row (e.g. once its figures were joined to its session).
    pub fn remove_flow(&self, flow: &Flow) -> Result<(), EbpfError> {
        let key = FlowKey {
            client: mapped(flow.client.ip()).octets(),
            server: mapped(flow.server.ip()).octets(),
            client_port: flow.client.port(),
            server_port: flow.server.port(),
            protocol: flow.protocol.to_raw(),
            service: flow.service.to_raw(),
            pad: [0; 2],
            ifindex: flow.ifindex,
        };
        match lock(&self.maps.flows).remove(&key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_error(FLOWS)(e)),
        }
    }

    /// Removes every connection that has been idle for `idle` or longer; returns how many.
    /// Per-client totals are unaffected: they are kept per client.
    pub fn remove_flows_idle_for(&self, idle: Duration) -> Result<usize, EbpfError> {
        let before_ns = monotonic_ns().saturating_sub(idle.as_nanos() as u64);
        let mut map = lock(&self.maps.flows);
        let mut idle = Vec::new();
        for entry in map.iter() {
            let (key, per_cpu) = entry.map_err(map_error(FLOWS))?;
            let last = per_cpu.iter().map(|c| c.last_seen_ns).max().unwrap_or(0);
            if last < before_ns {
                idle.push(key);
            }
        }
        for key in &idle {
            match map.remove(key) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_error(FLOWS)(e)),
            }
        }
        Ok(idle.len())
    }

    /// Makes the kernel side count frames from and to `ip` for `mac` (replacing an earlier
    /// binding of `ip`).
    pub fn bind(&self, ip: IpAddr, mac: MacAddr) -> Result<(), EbpfError> {
        let value = BindingValue {
            mac: mac.0,
            pad: [0; 2],
        };
        lock(&self.maps.bindings)
            .insert(ip_key(ip), value, 0)
            .map_err(map_error(BINDINGS))
    }

    /// Removes the binding of `ip`, if any.
    pub fn unbind(&self, ip: IpAddr) -> Result<(), EbpfError> {
        match lock(&self.maps.bindings).remove(&ip_key(ip)) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_error(BINDINGS)(e)),
        }
    }

    /// The bindings the kernel side uses.
    pub fn bindings(&self) -> Result<Vec<(IpAddr, MacAddr)>, EbpfError> {
        let map = lock(&self.maps.bindings);
        map.iter()
            .map(|entry| {
                let (key, value) = entry.map_err(map_error(BINDINGS))?;
                Ok((unmapped(key.addr), MacAddr(value.mac)))
            })
            .collect()
    }

    /// The MACs treated as routers, and why.
    pub fn routers(&self) -> Result<Vec<(MacAddr, RouterReason)>, EbpfError> {
        let map = lock(&self.maps.routers);
        map.iter()
            .map(|entry| {
                let (key, reason) = entry.map_err(map_error(ROUTERS))?;
                let reason = match reason {
                    ROUTER_DHCP_RELAY => RouterReason::DhcpRelay,
                    ROUTER_CONFIGURED => RouterReason::Configured,
                    other => RouterReason::Unknown(other),
                };
                Ok((MacAddr(key.mac), reason))
            })
            .collect()
    }

    /// Registers a port of this host as carrying `port.service` (e.g. a TFTP transfer's
    /// own socket, for the transfer's lifetime).
    pub fn set_port(&self, port: ServicePort) -> Result<(), EbpfError> {
        let index = port_slot(port.protocol, port.port);
        let mut ports = lock(&self.maps.ports);
        ports
            .0
            .set(index, port.service.to_raw() + 1, 0)
            .map_err(map_error(PORTS))?;
        ports.1.insert(index);
        Ok(())
    }

    /// Forgets a port registered with [`Accounting::set_port`].
    pub fn remove_port(&self, protocol: Protocol, port: u16) -> Result<(), EbpfError> {
        let index = port_slot(protocol, port);
        let mut ports = lock(&self.maps.ports);
        ports.0.set(index, 0, 0).map_err(map_error(PORTS))?;
        ports.1.remove(&index);
        Ok(())
    }

    /// How full each table is. `client_rows` is the number of rows of the per-client
    /// table, which a caller that just read them passes instead of having every key read
    /// again (one syscall each); `None` counts them.
    pub fn fill(&self, client_rows: Option<usize>) -> Result<Vec<MapFill>, EbpfError> {
        let count = |name: &'static str, n: Result<usize, MapError>| {
            n.map(|entries| MapFill {
                map: name,
                entries: entries as u64,
                capacity: u64::from(
                    self.maps
                        .capacity
                        .iter()
                        .find(|(m, _)| *m == name)
                        .map_or(0, |(_, c)| *c),
                ),
            })
            .map_err(map_error(name))
        };
        Ok(vec![
            count(
                MAC_STATS,
                client_rows.map_or_else(|| entries(self.maps.macs.keys()), Ok),
            )?,
            count(UNATTRIBUTED, entries(self.maps.unattributed.keys()))?,
            count(FLOWS, entries(lock(&self.maps.flows).keys()))?,
            count(BINDINGS, entries(lock(&self.maps.bindings).keys()))?,
            count(ROUTERS, entries(lock(&self.maps.routers).keys()))?,
            count(PORTS, Ok(lock(&self.maps.ports).1.len()))?,
        ])
    }

    /// Turns the kernel's measurement of program run time on (see [`RunTimeStats`]). It is
    /// global: while any process keeps it on, every BPF program on the host is timed.
    pub fn start_measuring(&self) -> io::Result<()> {
        let mut stats = lock(&self.stats);
        if stats.is_none() {
            *stats =
                Some(aya::sys::enable_stats(aya::sys::Stats::RunTime).map_err(|e| e.io_error)?);
        }
        Ok(())
    }

    /// Turns this process's measurement of program run time off.
    pub fn stop_measuring(&self) {
        *lock(&self.stats) = None;
    }

    /// Runs `direction`'s program `repeat` times on `frame` in the kernel
    /// (`BPF_PROG_TEST_RUN`, on the loopback device of the calling thread's namespace) and
    /// returns the mean time of a run, as the kernel measured it around its loop. Each run
    /// counts the frame in the maps like a real one.
    pub fn test_run(
        &self,
        direction: Direction,
        frame: &[u8],
        repeat: u32,
    ) -> Result<Duration, EbpfError> {
        let program = PROGRAMS
            .iter()
            .find(|(_, _, d)| *d == direction)
            .map_or("tc_ingress", |(name, _, _)| name);
        let mut p = lock(&self.programs);
        let classifier = classifier(&mut p.ebpf, program)?;
        let fd = classifier.fd().map_err(|source| EbpfError::Program {
            program,
            source: Box::new(source),
        })?;
        let fail = |source| EbpfError::TestRun { program, source };
        let size =
            u32::try_from(frame.len()).map_err(|_| fail(io::ErrorKind::InvalidInput.into()))?;
        // The `test` member of `union bpf_attr` (linux/bpf.h), up to `batch_size`.
        #[repr(C)]
        #[derive(Default)]
        struct TestRun {
            prog_fd: u32,
            retval: u32,
            data_size_in: u32,
            data_size_out: u32,
            data_in: u64,
            data_out: u64,
            repeat: u32,
            duration: u32,
            ctx_size_in: u32,
            ctx_size_out: u32,
            ctx_in: u64,
            ctx_out: u64,
            flags: u32,
            cpu: u32,
            batch_size: u32,
            pad: u32,
        }
        let mut attr = TestRun {
            prog_fd: u32::try_from(std::os::fd::AsRawFd::as_raw_fd(&fd.as_fd()))
                .map_err(|_| fail(io::ErrorKind::InvalidInput.into()))?,
            data_size_in: size,
            data_in: frame.as_ptr() as u64,
            repeat,
            ..TestRun::default()
        };
        const BPF_PROG_TEST_RUN: libc::c_long = 10;
        // SAFETY: `attr` is a valid `bpf_attr` prefix of the size passed (the kernel zero-fills
        // the rest); `data_in` points to `frame`, which outlives the call; no output buffers
        // are given. The kernel writes `retval` and `duration` into `attr`.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_TEST_RUN,
                &raw mut attr,
                size_of::<TestRun>(),
            )
        };
        if rc < 0 {
            return Err(fail(io::Error::last_os_error()));
        }
        Ok(Duration::from_nanos(u64::from(attr.duration)))
    }

    /// For [`RunTimeStats::Sampled`], called once a second with a running count: measures
    /// run time during the second after each multiple of [`RunTimeStats::SAMPLE_EVERY`].
    pub fn sample_run_time(&self, second: u32) {
        if self.run_time_stats == RunTimeStats::Sampled {
            if !second.is_multiple_of(RunTimeStats::SAMPLE_EVERY) {
                self.stop_measuring();
            } else if let Err(error) = self.start_measuring() {
                tracing::debug!(%error, "eBPF run-time statistics could not be turned on");
            }
        }
    }

    /// When run time is measured (`Off` when the kernel refused at load).
    pub fn run_time_stats(&self) -> RunTimeStats {
        self.run_time_stats
    }

    /// The programs' run time and run count while run-time statistics were on (see
    /// [`Accounting::start_measuring`]).
    pub fn program_stats(&self) -> Result<Vec<ProgramStats>, EbpfError> {
        let mut p = lock(&self.programs);
        PROGRAMS
            .iter()
            .map(|&(program, _, _)| {
                let info = classifier(&mut p.ebpf, program)?.info().map_err(|source| {
                    EbpfError::Program {
                        program,
                        source: Box::new(source),
                    }
                })?;
                Ok(ProgramStats {
                    program,
                    run_time: info.run_time(),
                    run_count: info.run_count(),
                })
            })
            .collect()
    }

    /// Forwards pending kernel log lines to `tracing` (target `netboot_daemon::ebpf::kernel`);
    /// call it periodically.
    pub fn drain_logs(&self) {
        if let Some(logger) = &mut lock(&self.programs).logger {
            logger.flush();
        }
    }
}

impl Drop for Accounting {
    fn drop(&mut self) {
        self.detach_all();
    }
}

/// Mounts bpffs at `/sys/fs/bpf` if `dir` is below it and nothing is mounted there, then
/// creates `<dir>/v<LAYOUT_VERSION>` and returns it.
fn prepare_pin_dir(dir: &Path) -> Result<PathBuf, EbpfError> {
    let fail = |source| EbpfError::PinDir {
        path: dir.to_owned(),
        source,
    };
    let bpffs = Path::new("/sys/fs/bpf");
    if dir.starts_with(bpffs) && !is_bpffs(bpffs) {
        mount_bpffs(bpffs).map_err(fail)?;
        tracing::info!("mounted bpffs at /sys/fs/bpf");
    }
    let versioned = dir.join(format!("v{LAYOUT_VERSION}"));
    std::fs::create_dir_all(&versioned).map_err(fail)?;
    Ok(versioned)
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: `statfs` writes into the zeroed struct we pass and reads the NUL-terminated path.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &raw mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

fn mount_bpffs(path: &Path) -> io::Result<()> {
    let target = CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    // SAFETY: every argument is a NUL-terminated string that outlives the call, or null.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn ifindex(iface: &str) -> Result<u32, EbpfError> {
    let name = CString::new(iface).map_err(|_| EbpfError::NoInterface(iface.to_owned()))?;
    // SAFETY: `if_nametoindex` reads the NUL-terminated name and nothing else.
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => Err(EbpfError::NoInterface(iface.to_owned())),
        index => Ok(index),
    }
}

fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<Map, EbpfError> {
    ebpf.take_map(name).ok_or(EbpfError::MissingMap(name))
}

fn typed<T: TryFrom<Map, Error = MapError>>(map: Map, name: &'static str) -> Result<T, EbpfError> {
    T::try_from(map).map_err(map_error(name))
}

fn direction(map: &'static str, raw: u8) -> Result<Direction, EbpfError> {
    Direction::from_raw(raw).ok_or(EbpfError::UnknownDirection(map, raw))
}

fn flow_row(key: &FlowKey, per_cpu: &PerCpuValues<FlowCounters>) -> Option<Flow> {
    let mut counters = FlowCounters::default();
    for c in per_cpu.iter() {
        add_flow_counters(&mut counters, c);
    }
    Some(Flow {
        client: SocketAddr::new(unmapped(key.client), key.client_port),
        server: SocketAddr::new(unmapped(key.server), key.server_port),
        protocol: Protocol::from_raw(key.protocol)?,
        service: Service::from_raw(key.service),
        ifindex: key.ifindex,
        counters,
    })
}

/// How many keys a map holds (one syscall per key).
fn entries<K>(mut keys: impl Iterator<Item = Result<K, MapError>>) -> Result<usize, MapError> {
    keys.try_fold(0, |n, k| k.map(|_| n + 1))
}

/// Adds `c` to `total`: counts add up, `last_seen_ns` and `mac` are the latest.
pub fn add_flow_counters(total: &mut FlowCounters, c: &FlowCounters) {
    if c.mac != [0; 6] && (total.mac == [0; 6] || c.last_seen_ns >= total.last_seen_ns) {
        total.mac = c.mac;
    }
    total.rx_packets += c.rx_packets;
    total.rx_bytes += c.rx_bytes;
    total.rx_payload += c.rx_payload;
    total.tx_packets += c.tx_packets;
    total.tx_bytes += c.tx_bytes;
    total.tx_payload += c.tx_payload;
    total.last_seen_ns = total.last_seen_ns.max(c.last_seen_ns);
}

/// The `PORTS` slot of a port.
fn port_slot(protocol: Protocol, port: u16) -> u32 {
    netboot_common::port_index(protocol.to_raw(), port)
        .expect("invariant: Protocol is TCP or UDP, which have slots")
}

/// CLOCK_MONOTONIC in nanoseconds, the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `clock_gettime` only writes into the struct we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// An address as the kernel side keys it: IPv6, with IPv4 mapped (`::ffff:a.b.c.d`).
fn mapped(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

fn ip_key(ip: IpAddr) -> IpKey {
    IpKey {
        addr: mapped(ip).octets(),
    }
}

/// The inverse of [`mapped`].
fn unmapped(addr: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(addr);
    v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
}

fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    program: &'static str,
) -> Result<&'a mut SchedClassifier, EbpfError> {
    ebpf.program_mut(program)
        .ok_or(EbpfError::MissingProgram(program))?
        .try_into()
        .map_err(|source| EbpfError::Program {
            program,
            source: Box::new(source),
        })
}

fn attach_one(
    ebpf: &mut Ebpf,
    iface: &str,
    mode: AttachMode,
    netns: Option<&File>,
    program: &'static str,
    attach_type: TcAttachType,
    direction: Direction,
) -> Result<AttachedLink, EbpfError> {
    // Everything fallible comes before the attach, so an attached link is never lost.
    let netns = netns
        .map(File::try_clone)
        .transpose()
        .map_err(EbpfError::Netns)?;
    let options = match mode {
        AttachMode::Tcx => TcAttachOptions::TcxOrder(LinkOrder::default()),
        AttachMode::Netlink => TcAttachOptions::Netlink(NlOptions::default()),
    };
    let id = classifier(ebpf, program)?
        .attach_with_options(iface, attach_type, options)
        .map_err(|source| EbpfError::Attach {
            iface: iface.to_owned(),
            mode,
            direction,
            source: Box::new(source),
        })?;
    Ok(AttachedLink {
        iface: iface.to_owned(),
        program,
        id,
        netns,
    })
}

/// Detaches one link, in the namespace it was attached in; failures are logged.
fn detach_link(ebpf: &mut Ebpf, link: AttachedLink) {
    let AttachedLink {
        iface,
        program,
        id,
        netns,
    } = link;
    let outcome = match classifier(ebpf, program) {
        Err(error) => Err(error.to_string()),
        Ok(p) => match &netns {
            None => p.detach(id).map_err(|e| e.to_string()),
            Some(netns) => match enter_netns(netns.as_fd(), || p.detach(id)) {
                Ok(detached) => detached.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            },
        },
    };
    if let Err(error) = outcome {
        tracing::warn!(%iface, program, %error, "detaching eBPF accounting failed");
    }
}

fn map_error(map: &'static str) -> impl Fn(MapError) -> EbpfError {
    move |source| EbpfError::Map {
        map,
        source: Box::new(source),
    }
}

fn sum(per_cpu: &PerCpuValues<Counters>) -> Counters {
    per_cpu.iter().fold(Counters::default(), |acc, c| Counters {
        packets: acc.packets.wrapping_add(c.packets),
        bytes: acc.bytes.wrapping_add(c.bytes),
    })
}

/// Forwards aya-log records from the kernel side to `tracing`.
struct KernelLog;

impl log::Log for KernelLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let message = record.args();
        let origin = record.target();
        match record.level() {
            log::Level::Error => {
                tracing::error!(target: "netboot_daemon::ebpf::kernel", origin, %message);
            }
            log::Level::Warn => {
                tracing::warn!(target: "netboot_daemon::ebpf::kernel", origin, %message);
            }
            log::Level::Info => {
                tracing::info!(target: "netboot_daemon::ebpf::kernel", origin, %message);
            }
            log::Level::Debug => {
                tracing::debug!(target: "netboot_daemon::ebpf::kernel", origin, %message);
            }
            log::Level::Trace => {
                tracing::trace!(target: "netboot_daemon::ebpf::kernel", origin, %message);
            }
        }
    }

    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directions_round_trip_and_label_like_interface_counters() {
        for d in [Direction::Ingress, Direction::Egress] {
            assert_eq!(Direction::from_raw(d.to_raw()), Some(d));
        }
        assert_eq!(Direction::from_raw(INGRESS), Some(Direction::Ingress));
        assert_eq!(Direction::from_raw(EGRESS), Some(Direction::Egress));
        assert_eq!(Direction::from_raw(2), None);
        assert_eq!(Direction::Ingress.as_str(), "rx");
        assert_eq!(Direction::Egress.to_string(), "tx");
    }

    #[test]
    fn services_round_trip_and_keep_unknown_values() {
        let known = [
            (SERVICE_DHCP, Service::Dhcp, "dhcp"),
            (SERVICE_TFTP, Service::Tftp, "tftp"),
            (SERVICE_HTTP, Service::Http, "http"),
            (SERVICE_ISCSI, Service::Iscsi, "iscsi"),
            (SERVICE_OTHER, Service::Other, "other"),
        ];
        for (raw, service, label) in known {
            assert_eq!(Service::from_raw(raw), service);
            assert_eq!(service.to_raw(), raw);
            assert_eq!(service.as_str(), label);
        }
        assert_eq!(Service::from_raw(200), Service::Unknown(200));
        assert_eq!(Service::Unknown(200).to_raw(), 200);
        assert_eq!(Service::Unknown(200).to_string(), "unknown");
    }

    #[test]
    fn per_cpu_values_are_summed() {
        let per_cpu = PerCpuValues::try_from(vec![
            Counters {
                packets: 1,
                bytes: 100,
            },
            Counters {
                packets: 2,
                bytes: 300,
            },
        ])
        .expect("two CPUs");
        assert_eq!(
            sum(&per_cpu),
            Counters {
                packets: 3,
                bytes: 400
            }
        );
    }
}
