//! Exact per-client traffic accounting with eBPF: load, attach, read the maps.
//!
//! The eBPF object (crate `netboot-ebpf`, built by this crate's build.rs) is embedded in the
//! binary. [`Accounting::load`] loads it and verifies its two TC programs, [`Accounting::attach`]
//! attaches them to an interface's ingress and egress (TCX links, or a clsact qdisc on kernels
//! before 6.6), and [`Accounting::mac_counters`] reads the per-client counters, summing the
//! per-CPU values.
//!
//! Counts are wire bytes as the interface counts them (`skb->len`: Ethernet header through
//! payload, no FCS), per (client MAC, [`Direction`], [`Service`]). The client MAC is the source
//! MAC of received frames and the destination MAC of sent frames, so routed clients appear
//! under their router's MAC.
//!
//! To attach to an interface in another network namespace, call [`Accounting::attach`] inside
//! [`in_netns`]. Do not run the daemon under `ip netns exec`, which remounts `/sys` and hides the
//! host's bpffs.
//!
//! This module does no pinning: the programs detach when [`Accounting`] is dropped.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd as _, AsRawFd as _, BorrowedFd};
use std::path::Path;

use aya::maps::{MapError, PerCpuArray, PerCpuHashMap, PerCpuValues};
use aya::programs::tc::{self, NlOptions, SchedClassifierLinkId, TcAttachOptions};
use aya::programs::{LinkOrder, ProgramError, SchedClassifier, TcAttachType, TcError};
use aya::{Ebpf, EbpfLoader};
use aya_log::EbpfLogger;
use netboot_common::{
    Counters, EGRESS, ERROR_MAP_FULL, ERROR_MAP_UPDATE, ERROR_TRUNCATED, ERRORS, INGRESS,
    MAC_STATS, MacKey, SERVICE_DHCP, SERVICE_HTTP, SERVICE_ISCSI, SERVICE_OTHER, SERVICE_TFTP,
};

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

/// The calling thread's network namespace.
const THREAD_NETNS: &str = "/proc/thread-self/ns/net";

/// Why loading, attaching or reading the accounting programs failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EbpfError {
    /// The binary was built with `AYA_BUILD_SKIP=1` and holds no eBPF object.
    #[error(
        "netbootd was built without eBPF (AYA_BUILD_SKIP=1), so per-client accounting is unavailable"
    )]
    NotBuilt,
    /// `max_macs` was zero.
    #[error("the per-client table needs room for at least one entry")]
    ZeroMaxMacs,
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
    /// Entering or leaving a network namespace, or opening the current one, failed.
    #[error("switching network namespaces")]
    Netns(#[source] io::Error),
    /// The object lacks a map this module expects.
    #[error("eBPF map {0} is missing from the object")]
    MissingMap(&'static str),
    /// Reading a map failed.
    #[error("reading eBPF map {map}")]
    Map {
        /// The map's name.
        map: &'static str,
        /// What aya reported.
        #[source]
        source: Box<MapError>,
    },
    /// A key in the per-client map has a direction the kernel side never writes.
    #[error("eBPF map {MAC_STATS} holds an unknown direction {0}")]
    UnknownDirection(u8),
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

/// The service a frame belongs to, classified by the kernel side from its ports.
///
/// DHCP: UDP 67, 68 or 4011; TFTP: UDP 69; HTTP: TCP 80 or 8080; iSCSI: TCP 3260
/// (either port). Everything else, including non-IP frames, is [`Service::Other`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Service {
    /// DHCP and PXE proxyDHCP.
    Dhcp,
    /// TFTP requests to port 69 (transfers on ephemeral ports are [`Service::Other`] for now).
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

    /// The value of `MacKey::service` in the kernel map (the kernel side writes it).
    #[cfg(test)]
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

/// The counters of one (client, direction, service), summed over all CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MacCounters {
    /// The client's MAC.
    pub mac: MacAddr,
    /// Received from or sent to the client.
    pub direction: Direction,
    /// The service class.
    pub service: Service,
    /// Frames.
    pub packets: u64,
    /// Bytes, Ethernet header included, FCS excluded.
    pub bytes: u64,
}

/// Frames the kernel side could not count per client, by reason, summed over all CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ErrorCounters {
    /// The per-client table was full (see [`Accounting::load`]'s `max_macs`).
    pub map_full: Counters,
    /// Updating the per-client table failed for another reason.
    pub map_update: Counters,
    /// The frame was shorter than an Ethernet header.
    pub truncated: Counters,
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

/// The loaded accounting programs and their attachments.
///
/// Dropping it detaches everything (see [`Accounting::detach_all`]).
pub struct Accounting {
    links: Vec<AttachedLink>,
    logger: Option<EbpfLogger<KernelLog>>,
    ebpf: Ebpf,
}

impl fmt::Debug for Accounting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Accounting")
            .field("links", &self.links.len())
            .field("logger", &self.logger.is_some())
            .finish_non_exhaustive()
    }
}

impl Accounting {
    /// Loads the embedded object with room for `max_macs` (client, direction, service)
    /// entries, and loads both programs into the kernel (running the verifier).
    ///
    /// A client that talks several services in both directions uses several entries.
    /// Frames of clients that do not fit are counted in [`ErrorCounters::map_full`].
    /// Kernel log lines are forwarded to `tracing` by [`Accounting::drain_logs`]; failing to
    /// set that up is logged as a warning, not an error.
    pub fn load(max_macs: u32) -> Result<Self, EbpfError> {
        let object = object();
        if object.is_empty() {
            return Err(EbpfError::NotBuilt);
        }
        if max_macs == 0 {
            return Err(EbpfError::ZeroMaxMacs);
        }
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(MAC_STATS, max_macs)
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
        Ok(Self {
            links: Vec::new(),
            logger,
            ebpf,
        })
    }

    /// Attaches accounting to `iface`'s ingress and egress: TCX first, and a clsact
    /// qdisc with direct-action filters if TCX fails (kernels before 6.6).
    ///
    /// The interface is looked up in the calling thread's network namespace; wrap the call
    /// in [`in_netns`] for another one. On error nothing stays attached to `iface` from this call.
    pub fn attach(&mut self, iface: &str) -> Result<AttachMode, EbpfError> {
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
    pub fn attach_with_mode(&mut self, iface: &str, mode: AttachMode) -> Result<(), EbpfError> {
        self.attach_with(iface, mode)
    }

    fn attach_with(&mut self, iface: &str, mode: AttachMode) -> Result<(), EbpfError> {
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

        let mut attached = Vec::with_capacity(PROGRAMS.len());
        for (program, attach_type, direction) in PROGRAMS {
            match self.attach_one(iface, mode, netns.as_ref(), program, attach_type, direction) {
                Ok(link) => attached.push(link),
                Err(error) => {
                    // Undo the half-done attach, so the caller can retry or fall back.
                    for link in attached {
                        detach_link(&mut self.ebpf, link);
                    }
                    return Err(error);
                }
            }
        }
        self.links.extend(attached);
        Ok(())
    }

    fn attach_one(
        &mut self,
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
        let id = classifier(&mut self.ebpf, program)?
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

    /// Detaches every program from every interface. Failures are logged, not returned:
    /// this also runs on drop, and there is nothing a caller could do differently.
    pub fn detach_all(&mut self) {
        for link in std::mem::take(&mut self.links) {
            detach_link(&mut self.ebpf, link);
        }
    }

    /// The per-client counters, one row per (MAC, direction, service), summed over all CPUs.
    pub fn mac_counters(&self) -> Result<Vec<MacCounters>, EbpfError> {
        let map = self
            .ebpf
            .map(MAC_STATS)
            .ok_or(EbpfError::MissingMap(MAC_STATS))?;
        let map =
            PerCpuHashMap::<_, MacKey, Counters>::try_from(map).map_err(map_error(MAC_STATS))?;
        let mut rows = Vec::new();
        for entry in map.iter() {
            let (key, per_cpu) = entry.map_err(map_error(MAC_STATS))?;
            let direction = Direction::from_raw(key.direction)
                .ok_or(EbpfError::UnknownDirection(key.direction))?;
            let total = sum(&per_cpu);
            rows.push(MacCounters {
                mac: MacAddr(key.mac),
                direction,
                service: Service::from_raw(key.service),
                packets: total.packets,
                bytes: total.bytes,
            });
        }
        Ok(rows)
    }

    /// Frames not counted per client, by reason.
    pub fn error_counters(&self) -> Result<ErrorCounters, EbpfError> {
        let map = self.ebpf.map(ERRORS).ok_or(EbpfError::MissingMap(ERRORS))?;
        let map = PerCpuArray::<_, Counters>::try_from(map).map_err(map_error(ERRORS))?;
        let slot = |index: u32| {
            map.get(&index, 0)
                .map(|per_cpu| sum(&per_cpu))
                .map_err(map_error(ERRORS))
        };
        Ok(ErrorCounters {
            map_full: slot(ERROR_MAP_FULL)?,
            map_update: slot(ERROR_MAP_UPDATE)?,
            truncated: slot(ERROR_TRUNCATED)?,
        })
    }

    /// Forwards pending kernel log lines to `tracing` (target `netboot_daemon::ebpf::kernel`);
    /// call it periodically.
    pub fn drain_logs(&mut self) {
        if let Some(logger) = &mut self.logger {
            logger.flush();
        }
    }
}

impl Drop for Accounting {
    fn drop(&mut self) {
        self.detach_all();
    }
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

/// Runs `f` with the calling thread switched into the network namespace at `netns_path`
/// (e.g. `/var/run/netns/NAME` or `/proc/PID/ns/net`), then switches back.
///
/// Only this thread changes namespace. Sockets and interface lookups made inside `f` belong
/// to the target namespace; file descriptors opened there keep working after the switch back.
/// The switch back also happens when `f` panics; if it fails then, the process aborts rather
/// than leave a thread in the wrong namespace. If it fails after `f` returned normally (for
/// example because `f` dropped `CAP_SYS_ADMIN`), the error is returned and the thread stays
/// in the target namespace: treat that as fatal.
pub fn in_netns<T>(netns_path: &Path, f: impl FnOnce() -> T) -> io::Result<T> {
    let target = File::open(netns_path)?;
    enter_netns(target.as_fd(), f)
}

fn enter_netns<T>(target: BorrowedFd<'_>, f: impl FnOnce() -> T) -> io::Result<T> {
    let original = File::open(THREAD_NETNS)?;
    setns_net(target)?;
    let restore = RestoreNetns(Some(original));
    let value = f();
    restore.finish()?;
    Ok(value)
}

/// Switches the thread back to its original namespace, also when unwinding.
struct RestoreNetns(Option<File>);

impl RestoreNetns {
    fn finish(mut self) -> io::Result<()> {
        let original = self.0.take().expect("invariant: restored only once");
        setns_net(original.as_fd())
    }
}

impl Drop for RestoreNetns {
    fn drop(&mut self) {
        if let Some(original) = self.0.take()
            && let Err(error) = setns_net(original.as_fd())
        {
            tracing::error!(%error, "cannot return to the original network namespace; aborting");
            std::process::abort();
        }
    }
}

fn setns_net(netns: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: `setns` takes a file descriptor, valid for the duration of the borrow, and only
    // changes the calling thread's network namespace; it touches no memory of ours.
    let rc = unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
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

    #[test]
    fn in_netns_returns_to_the_original_namespace() {
        let before = std::fs::read_link(THREAD_NETNS).expect("read own netns");
        // Entering our own namespace needs CAP_SYS_ADMIN; without it the call fails cleanly.
        match in_netns(Path::new(THREAD_NETNS), || 42) {
            Ok(v) => assert_eq!(v, 42),
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}"),
        }
        assert_eq!(
            std::fs::read_link(THREAD_NETNS).expect("read own netns"),
            before
        );
    }
}
