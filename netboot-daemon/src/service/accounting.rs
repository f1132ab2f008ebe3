//! The daemon's side of the eBPF accounting: feeding the kernel maps (bindings, TFTP
//! transfer ports), joining kernel flow counts to TFTP transfers, keeping the flow table
//! small, current rates ([`Traffic`]), the per-device view of the API, and the `/metrics`
//! families.
//!
//! The kernel side counts; this module only reads, labels and joins. MAC series in
//! `/metrics` are bounded: the `max_macs` clients with the most bytes get their own series,
//! the rest are summed under `mac="other"`, so a scrape stays small however many
//! addresses cross the interfaces.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;
use utoipa::ToSchema;

use crate::bindings::{BindingSink, Bindings};
use crate::ebpf::{
    Accounting, Direction, MacCounters, Method, Protocol, Service, ServicePort,
    UnattributedCounters, add_flow_counters,
};
use crate::mac::MacAddr;
use crate::metrics::{Exposition, Kind};
use crate::service::install::{self, Watch};
use crate::service::iscsi::Sessions;
use crate::service::tally::Tally;
use crate::service::tftp::{KernelBytes, Tftp, TransferPorts};
use crate::store::{EventSource, NewBootEvent, Store, TrafficTotal};
use netboot_common::FlowCounters;

/// How often kernel logs are forwarded and ended transfers are joined to their flows.
const TICK: Duration = Duration::from_secs(1);
/// How long after its end a transfer's kernel figures are looked for.
const JOIN_WINDOW: Duration = Duration::from_secs(30);
/// Connections idle this long leave the flow table (their bytes stay in the client rows).
const FLOW_IDLE: Duration = Duration::from_secs(600);
/// How often idle connections are looked for, in ticks.
const SWEEP_EVERY: u32 = 60;
/// How often rates are sampled, in ticks.
const RATE_EVERY: u32 = 5;
/// How often rates are sampled, in seconds.
pub const SAMPLE_SECS: u64 = RATE_EVERY as u64 * TICK.as_secs();
/// How often the per-device totals are saved, in ticks.
const FOLD_EVERY: u32 = 60;
/// Connections seen this recently are a device's active sessions.
const ACTIVE: Duration = Duration::from_secs(30);
/// Aggregate rate samples kept for the dashboard: five minutes at one per [`RATE_EVERY`]
/// ticks.
const HISTORY: usize = 60;

/// Where the per-client figures come from.
#[derive(Debug)]
pub enum Counters {
    /// The eBPF program's kernel tables: exact wire bytes.
    Kernel(Arc<Accounting>),
    /// netbootd's own servers (see [`crate::service::tally`]), because the eBPF program
    /// is not loaded, for the reason given.
    Userspace {
        /// The counters.
        tally: Arc<Tally>,
        /// Why the kernel does not count.
        why: String,
    },
}

impl Counters {
    /// `ebpf` or `userspace`: the `source` of every figure.
    pub const fn source(&self) -> &'static str {
        match self {
            Self::Kernel(_) => "ebpf",
            Self::Userspace { .. } => "userspace",
        }
    }

    /// The userspace counters, when they are the source.
    pub fn tally(&self) -> Option<&Arc<Tally>> {
        match self {
            Self::Kernel(_) => None,
            Self::Userspace { tally, .. } => Some(tally),
        }
    }

    /// Every client row.
    pub fn rows(&self) -> Result<Vec<MacCounters>, crate::ebpf::EbpfError> {
        match self {
            Self::Kernel(acc) => acc.mac_counters(),
            Self::Userspace { tally, .. } => Ok(tally.rows()),
        }
    }

    /// Bytes no client could be found for.
    pub fn unattributed(&self) -> Result<Vec<UnattributedCounters>, crate::ebpf::EbpfError> {
        match self {
            Self::Kernel(acc) => acc.unattributed(),
            Self::Userspace { tally, .. } => Ok(tally.unattributed()),
        }
    }

    /// What an operator should know about the figures.
    pub fn warnings(&self) -> Vec<String> {
        match self {
            Self::Kernel(_) => Vec::new(),
            Self::Userspace { why, .. } => vec![format!(
                "{why}; the figures are counted in userspace by netbootd's own servers: socket payload bytes (no protocol headers, no traffic netbootd did not send or receive itself), TFTP transfers when they end"
            )],
        }
    }
}

/// The accounting as the API sees it: the counters and the current rates.
pub struct Traffic {
    counters: Counters,
    rates: Mutex<Rates>,
    install: Mutex<Watch>,
    folded: Mutex<Option<HashMap<RowKey, Folded>>>,
}

/// A persisted total and the counter value it last took in.
#[derive(Debug, Clone, Copy, Default)]
struct Folded {
    packets: u64,
    bytes: u64,
    seen_packets: u64,
    seen_bytes: u64,
}

impl Folded {
    /// What `counter` (packets, bytes) adds: what came since the last fold, or all of it
    /// when the counter went back (it started again).
    fn pending(&self, counter: (u64, u64)) -> (u64, u64) {
        if counter.0 >= self.seen_packets && counter.1 >= self.seen_bytes {
            (counter.0 - self.seen_packets, counter.1 - self.seen_bytes)
        } else {
            counter
        }
    }
}

impl std::fmt::Debug for Traffic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Traffic")
            .field("source", &self.counters.source())
            .finish_non_exhaustive()
    }
}

type RowKey = (MacAddr, Service, Direction);

#[derive(Default)]
struct Rates {
    /// The last sample: when, and bytes per row.
    last: Option<(Instant, HashMap<RowKey, u64>)>,
    /// Bytes per second per row between the last two samples.
    current: HashMap<RowKey, f64>,
    /// The rates of each service, all clients and unattributed traffic together.
    services: ServiceRates,
    /// Each device's rates (from it, to it) of the last [`HISTORY`] samples, oldest
    /// first; only devices with traffic in that window.
    devices: HashMap<MacAddr, VecDeque<(f64, f64)>>,
}

/// Adds one sample of the per-row rates `current` to each device's history: devices
/// without traffic get a zero, and a device whose window holds only zeros is dropped.
fn record_devices(
    devices: &mut HashMap<MacAddr, VecDeque<(f64, f64)>>,
    current: &HashMap<RowKey, f64>,
) {
    let mut now: HashMap<MacAddr, (f64, f64)> = HashMap::new();
    for ((mac, _, direction), rate) in current {
        let e = now.entry(*mac).or_default();
        match direction {
            Direction::Ingress => e.0 += rate,
            Direction::Egress => e.1 += rate,
        }
    }
    let macs: HashSet<MacAddr> = devices.keys().chain(now.keys()).copied().collect();
    for mac in macs {
        let h = devices.entry(mac).or_default();
        if h.len() == HISTORY {
            h.pop_front();
        }
        h.push_back(now.get(&mac).copied().unwrap_or_default());
    }
    devices.retain(|_, h| h.iter().any(|(rx, tx)| *rx > 0.0 || *tx > 0.0));
}

/// Bytes per second of a counter that reads `now`, `secs` after it read `before` (none:
/// it did not exist then).
fn rate(now: u64, before: Option<u64>, secs: f64) -> f64 {
    now.saturating_sub(before.unwrap_or(0)) as f64 / secs
}

/// Bytes per service name and direction.
type ServiceBytes = BTreeMap<(&'static str, Direction), u64>;

/// Each service's bytes over all clients plus the unattributed bytes: all the traffic of
/// that service the eBPF program counted on the boot interfaces.
fn service_bytes(
    clients: impl Iterator<Item = (Service, Direction, u64)>,
    unattributed: impl Iterator<Item = (Service, Direction, u64)>,
) -> ServiceBytes {
    let mut out = ServiceBytes::new();
    for (service, direction, bytes) in clients.chain(unattributed) {
        let e = out.entry((service.as_str(), direction)).or_default();
        *e = e.saturating_add(bytes);
    }
    out
}

/// The aggregate rate of each service, sampled with the per-device rates, and the last
/// [`HISTORY`] samples of it.
#[derive(Debug, Default)]
struct ServiceRates {
    last: Option<(Instant, ServiceBytes)>,
    /// Rates per sample, oldest first: bytes per second per service and direction.
    history: VecDeque<BTreeMap<(&'static str, Direction), f64>>,
}

impl ServiceRates {
    /// Adds a sample of the byte counts `bytes` taken at `now`.
    fn record(&mut self, now: Instant, bytes: ServiceBytes) {
        if let Some((then, before)) = &self.last {
            let secs = now.duration_since(*then).as_secs_f64();
            if secs > 0.0 {
                let rates = bytes
                    .iter()
                    .map(|(k, v)| (*k, rate(*v, before.get(k).copied(), secs)))
                    .collect();
                if self.history.len() == HISTORY {
                    self.history.pop_front();
                }
                self.history.push_back(rates);
            }
        }
        self.last = Some((now, bytes));
    }

    /// Each service's figures from the current byte counts `bytes`: the known services
    /// always, in a fixed order, then any other the counters name.
    fn figures(&self, bytes: &ServiceBytes) -> Vec<ServiceFigures> {
        let mut names: Vec<&'static str> = Service::KNOWN.iter().map(|s| s.as_str()).collect();
        for (name, _) in bytes.keys() {
            if !names.contains(name) {
                names.push(name);
            }
        }
        let rate = |sample: &BTreeMap<(&'static str, Direction), f64>, k| {
            sample.get(&k).copied().unwrap_or(0.0)
        };
        names
            .into_iter()
            .map(|name| {
                let (rx, tx) = ((name, Direction::Ingress), (name, Direction::Egress));
                let now = self.history.back();
                ServiceFigures {
                    service: name,
                    rx_bytes: bytes.get(&rx).copied().unwrap_or(0),
                    tx_bytes: bytes.get(&tx).copied().unwrap_or(0),
                    rx_bytes_per_second: now.map_or(0.0, |s| rate(s, rx)),
                    tx_bytes_per_second: now.map_or(0.0, |s| rate(s, tx)),
                    rx_history: self.history.iter().map(|s| rate(s, rx)).collect(),
                    tx_history: self.history.iter().map(|s| rate(s, tx)).collect(),
                }
            })
            .collect()
    }
}

impl Traffic {
    /// The API's view of `counters`; devices whose iSCSI writes make no progress for
    /// `stall_secs` are reported stalled.
    pub fn new(counters: Counters, stall_secs: u64) -> Self {
        let mut watch = Watch::new(stall_secs);
        // Counters pinned by an earlier run are the install watch's baseline.
        if let Ok(rows) = counters.rows() {
            watch.prime(
                crate::time::Timestamp::now().unix_secs(),
                &iscsi_totals(
                    rows.iter()
                        .map(|r| ((r.mac, r.service, r.direction), r.bytes)),
                ),
            );
        }
        Self {
            counters,
            rates: Mutex::new(Rates::default()),
            install: Mutex::new(watch),
            folded: Mutex::new(None),
        }
    }

    /// Where the figures come from.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The kernel tables, when the eBPF program counts.
    pub fn accounting(&self) -> Option<&Arc<Accounting>> {
        match &self.counters {
            Counters::Kernel(acc) => Some(acc),
            Counters::Userspace { .. } => None,
        }
    }

    /// Reads the client rows, updates the rates and feeds each device's iSCSI totals to
    /// the install watch; returns the install changes (blocking: map reads are syscalls).
    pub fn sample(&self) -> Vec<(MacAddr, install::Change)> {
        let Ok(rows) = self.per_row() else {
            return Vec::new();
        };
        let now = Instant::now();
        let bytes: HashMap<RowKey, u64> = rows.into_iter().map(|(k, (_, b))| (k, b)).collect();
        let services = service_bytes(
            bytes.iter().map(|((_, s, d), b)| (*s, *d, *b)),
            self.counters
                .unattributed()
                .unwrap_or_default()
                .into_iter()
                .map(|r| (r.service, r.direction, r.bytes)),
        );
        let totals = iscsi_totals(bytes.iter().map(|(k, b)| (*k, *b)));
        let changes = self
            .install
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .round(crate::time::Timestamp::now().unix_secs(), &totals);
        let mut rates = self.rates.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((then, before)) = &rates.last {
            let secs = now.duration_since(*then).as_secs_f64();
            if secs > 0.0 {
                rates.current = bytes
                    .iter()
                    .map(|(k, v)| (*k, rate(*v, before.get(k).copied(), secs)))
                    .filter(|(_, r)| *r > 0.0)
                    .collect();
                let Rates {
                    current, devices, ..
                } = &mut *rates;
                record_devices(devices, current);
            }
        }
        rates.last = Some((now, bytes));
        rates.services.record(now, services);
        changes
    }

    /// The persisted totals of this source, read from `store` on first use. Counters that
    /// start at zero with this run (userspace ones, eBPF maps not pinned before) have
    /// nothing in them yet that a fold took in.
    fn folded<'a>(
        &self,
        slot: &'a mut Option<HashMap<RowKey, Folded>>,
        store: &dyn Store,
    ) -> Result<&'a mut HashMap<RowKey, Folded>, crate::store::StoreError> {
        if slot.is_none() {
            let resumed = match &self.counters {
                Counters::Kernel(acc) => acc.resumed(),
                Counters::Userspace { .. } => false,
            };
            let source = self.counters.source();
            let mut map = HashMap::new();
            for t in store.list_traffic(None)? {
                if t.source != source {
                    continue;
                }
                let (Some(service), Some(direction)) =
                    (Service::parse(&t.service), Direction::parse(&t.direction))
                else {
                    continue;
                };
                let (seen_packets, seen_bytes) = if resumed {
                    (t.seen_packets, t.seen_bytes)
                } else {
                    (0, 0)
                };
                map.insert(
                    (t.mac, service, direction),
                    Folded {
                        packets: t.packets,
                        bytes: t.bytes,
                        seen_packets,
                        seen_bytes,
                    },
                );
            }
            *slot = Some(map);
        }
        Ok(slot.get_or_insert_default())
    }

    /// The counters per device, service and direction: (packets, bytes).
    fn per_row(&self) -> Result<HashMap<RowKey, (u64, u64)>, crate::ebpf::EbpfError> {
        let mut out: HashMap<RowKey, (u64, u64)> = HashMap::new();
        for r in self.counters.rows()? {
            let v = out.entry((r.mac, r.service, r.direction)).or_default();
            v.0 += r.packets;
            v.1 += r.bytes;
        }
        Ok(out)
    }

    /// Adds what the counters gained since the last fold to the persisted per-device
    /// totals; returns how many rows changed. Runs every minute and at shutdown.
    pub fn fold(&self, store: &dyn Store) -> Result<usize, FoldError> {
        let rows = self.per_row()?;
        let mut slot = self.folded.lock().unwrap_or_else(PoisonError::into_inner);
        let folded = self.folded(&mut slot, store)?;
        let now = crate::time::Timestamp::now();
        let mut changed = Vec::new();
        for (key, counter) in rows {
            let f = folded.entry(key).or_default();
            let (dp, db) = f.pending(counter);
            if dp == 0 && db == 0 && (f.seen_packets, f.seen_bytes) == counter {
                continue;
            }
            f.packets = f.packets.saturating_add(dp);
            f.bytes = f.bytes.saturating_add(db);
            (f.seen_packets, f.seen_bytes) = counter;
            changed.push(TrafficTotal {
                mac: key.0,
                service: key.1.as_str().to_owned(),
                direction: key.2.as_str().to_owned(),
                source: self.counters.source().to_owned(),
                packets: f.packets,
                bytes: f.bytes,
                seen_packets: f.seen_packets,
                seen_bytes: f.seen_bytes,
                updated: now,
            });
        }
        store.save_traffic(&changed)?;
        Ok(changed.len())
    }

    /// One device's totals of all time: what the store holds plus what the counters
    /// gained since the last fold.
    pub fn lifetime(
        &self,
        mac: MacAddr,
        store: &dyn Store,
    ) -> Result<Vec<LifetimeTotal>, FoldError> {
        self.lifetime_of(mac, &self.per_row()?, store)
    }

    /// [`Traffic::lifetime`] from counters already read.
    fn lifetime_of(
        &self,
        mac: MacAddr,
        rows: &HashMap<RowKey, (u64, u64)>,
        store: &dyn Store,
    ) -> Result<Vec<LifetimeTotal>, FoldError> {
        let mut slot = self.folded.lock().unwrap_or_else(PoisonError::into_inner);
        let folded = self.folded(&mut slot, store)?;
        let mut keys: Vec<RowKey> = folded
            .keys()
            .chain(rows.keys())
            .filter(|k| k.0 == mac)
            .copied()
            .collect();
        keys.sort();
        keys.dedup();
        Ok(keys
            .into_iter()
            .map(|key| {
                let f = folded.get(&key).copied().unwrap_or_default();
                let (dp, db) = rows.get(&key).map_or((0, 0), |c| f.pending(*c));
                LifetimeTotal {
                    service: key.1.as_str(),
                    direction: key.2.as_str(),
                    packets: f.packets.saturating_add(dp),
                    bytes: f.bytes.saturating_add(db),
                    source: self.counters.source(),
                }
            })
            .collect())
    }

    /// Each device's rates at the last sample (from it, to it; all services), for the
    /// devices with traffic in the last five minutes (no map reads).
    pub fn device_rates(&self) -> HashMap<MacAddr, (f64, f64)> {
        let rates = self.rates.lock().unwrap_or_else(PoisonError::into_inner);
        rates
            .devices
            .iter()
            .filter_map(|(mac, h)| Some((*mac, *h.back()?)))
            .collect()
    }

    /// Each service's bytes and rates over all clients and the unattributed traffic, with
    /// the recent rates (blocking: map reads are syscalls).
    pub fn services(&self) -> Result<Vec<ServiceFigures>, crate::ebpf::EbpfError> {
        let bytes = service_bytes(
            self.counters
                .rows()?
                .into_iter()
                .map(|r| (r.service, r.direction, r.bytes)),
            self.counters
                .unattributed()?
                .into_iter()
                .map(|r| (r.service, r.direction, r.bytes)),
        );
        let rates = self.rates.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(rates.services.figures(&bytes))
    }

    /// One device's figures (totals, rates and active sessions) and its totals of all
    /// time (see [`Traffic::lifetime`]), from one read of the counters.
    pub fn device(
        &self,
        mac: MacAddr,
        store: &dyn Store,
    ) -> Result<(DeviceTraffic, Vec<LifetimeTotal>), FoldError> {
        let rows = self.per_row()?;
        let lifetime = self.lifetime_of(mac, &rows, store)?;
        let source = self.counters.source();
        let totals: BTreeMap<(Service, Direction), (u64, u64)> = rows
            .into_iter()
            .filter(|((m, ..), _)| *m == mac)
            .map(|((_, service, direction), v)| ((service, direction), v))
            .collect();
        let rates = self.rates.lock().unwrap_or_else(PoisonError::into_inner);
        let totals = totals
            .into_iter()
            .map(|((service, direction), (packets, bytes))| ServiceTotal {
                service: service.as_str(),
                direction: direction.as_str(),
                packets,
                bytes,
                bytes_per_second: rates
                    .current
                    .get(&(mac, service, direction))
                    .copied()
                    .unwrap_or(0.0),
                source,
            })
            .collect();
        let history = rates.devices.get(&mac);
        let rx_history = history.map_or_else(Vec::new, |h| h.iter().map(|r| r.0).collect());
        let tx_history = history.map_or_else(Vec::new, |h| h.iter().map(|r| r.1).collect());
        drop(rates);
        let sessions = match &self.counters {
            Counters::Kernel(acc) => acc
                .flows()?
                .into_iter()
                .filter(|f| f.mac() == Some(mac) && f.idle() < ACTIVE)
                .map(|f| Session {
                    protocol: f.protocol.as_str(),
                    service: f.service.as_str(),
                    client: f.client,
                    server: f.server,
                    rx_bytes: f.counters.rx_bytes,
                    tx_bytes: f.counters.tx_bytes,
                    rx_payload: f.counters.rx_payload,
                    tx_payload: f.counters.tx_payload,
                    idle_ms: f.idle().as_millis() as u64,
                    source,
                })
                .collect(),
            Counters::Userspace { tally, .. } => tally
                .connections()
                .into_iter()
                .filter(|c| c.mac == Some(mac) && c.last.elapsed() < ACTIVE)
                .map(|c| Session {
                    protocol: "tcp",
                    service: c.service.as_str(),
                    client: c.client,
                    server: c.server,
                    rx_bytes: c.rx_bytes,
                    tx_bytes: c.tx_bytes,
                    rx_payload: c.rx_bytes,
                    tx_payload: c.tx_bytes,
                    idle_ms: c.last.elapsed().as_millis() as u64,
                    source,
                })
                .collect(),
        };
        let install = self
            .install
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .status(mac);
        Ok((
            DeviceTraffic {
                totals,
                rx_history,
                tx_history,
                sessions,
                install,
            },
            lifetime,
        ))
    }

    /// How the bytes of each client (or only `only`) were attributed.
    pub fn attribution(
        &self,
        bindings: &Bindings,
        only: Option<MacAddr>,
    ) -> Result<Attribution, crate::ebpf::EbpfError> {
        let mut per: BTreeMap<MacAddr, BTreeMap<Method, (u64, u64)>> = BTreeMap::new();
        for r in self.counters.rows()? {
            if only.is_some_and(|m| m != r.mac) {
                continue;
            }
            let v = per.entry(r.mac).or_default().entry(r.method).or_default();
            v.0 += r.packets;
            v.1 += r.bytes;
        }
        let kernel: HashMap<IpAddr, MacAddr> = match &self.counters {
            Counters::Kernel(acc) => acc.bindings()?.into_iter().collect(),
            Counters::Userspace { .. } => HashMap::new(),
        };
        let learned = bindings.all();
        let clients = per
            .into_iter()
            .map(|(mac, methods)| ClientAttribution {
                mac,
                methods: methods
                    .into_iter()
                    .map(|(m, (packets, bytes))| MethodTotal {
                        method: m.as_str(),
                        packets,
                        bytes,
                    })
                    .collect(),
                bindings: learned
                    .iter()
                    .filter(|(_, b)| b.mac == mac)
                    .map(|(ip, b)| BindingView {
                        ip: *ip,
                        since: b.since,
                        learned_from: b.source.as_str(),
                        in_kernel: kernel.get(ip) == Some(&mac),
                    })
                    .collect(),
            })
            .collect();
        let (routers, interfaces) = match &self.counters {
            Counters::Kernel(acc) => (acc.routers()?, acc.interfaces()),
            Counters::Userspace { .. } => (Vec::new(), Vec::new()),
        };
        let routers = routers
            .into_iter()
            .map(|(mac, reason)| RouterView {
                mac,
                reason: match reason {
                    crate::ebpf::RouterReason::DhcpRelay => "dhcp_relay",
                    crate::ebpf::RouterReason::Configured => "configured",
                    crate::ebpf::RouterReason::Unknown(_) => "unknown",
                },
            })
            .collect();
        let unattributed = self
            .counters
            .unattributed()?
            .into_iter()
            .map(|r| UnattributedView {
                interface: interface_name(&interfaces, r.ifindex),
                service: r.service.as_str(),
                direction: r.direction.as_str(),
                packets: r.packets,
                bytes: r.bytes,
            })
            .collect();
        Ok(Attribution {
            source: self.counters.source(),
            clients,
            routers,
            unattributed,
        })
    }
}

/// One device's traffic (`GET /api/v1/devices/{mac}/metrics`).
#[derive(Debug, Serialize, ToSchema)]
pub struct DeviceTraffic {
    /// Per service and direction, since the counters were created.
    pub totals: Vec<ServiceTotal>,
    /// Bytes per second from the device, all services, of each recent sample (5 s apart,
    /// at most five minutes), oldest first; empty when it had no traffic in that time.
    pub rx_history: Vec<f64>,
    /// Bytes per second to the device, as `rx_history`.
    pub tx_history: Vec<f64>,
    /// Connections (TFTP transfers, HTTP and iSCSI connections) seen in the last 30 s.
    pub sessions: Vec<Session>,
    /// Install progress on its iSCSI disk, once it has written (see [`install`]).
    pub install: Option<install::Status>,
}

/// Why a fold failed.
#[derive(Debug, thiserror::Error)]
pub enum FoldError {
    /// Reading the counters.
    #[error("reading the counters: {0}")]
    Counters(#[from] crate::ebpf::EbpfError),
    /// Reading or writing the totals.
    #[error("the stored totals: {0}")]
    Store(#[from] crate::store::StoreError),
}

/// A device's bytes of one service in one direction, of all time.
#[derive(Debug, Serialize, ToSchema)]
pub struct LifetimeTotal {
    /// `dhcp`, `tftp`, `http`, `iscsi` or `other`.
    pub service: &'static str,
    /// `rx` (from the device) or `tx` (to it).
    pub direction: &'static str,
    /// Frames.
    pub packets: u64,
    /// Bytes.
    pub bytes: u64,
    /// `ebpf` or `userspace`: totals of the other source, from runs without (or with)
    /// the eBPF program, are kept apart and not shown.
    pub source: &'static str,
}

/// One service's traffic over all clients (`GET /api/v1/accounting/services`).
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ServiceFigures {
    /// `dhcp`, `tftp`, `http`, `iscsi` or `other`.
    pub service: &'static str,
    /// Bytes received from clients since the counters were created (wire bytes with
    /// eBPF, socket payload bytes in userspace).
    pub rx_bytes: u64,
    /// Bytes sent to clients.
    pub tx_bytes: u64,
    /// Received bytes per second between the last two samples (every 5 s).
    pub rx_bytes_per_second: f64,
    /// Sent bytes per second between the last two samples.
    pub tx_bytes_per_second: f64,
    /// Received bytes per second of each recent sample, oldest first (5 s apart, at most
    /// five minutes).
    pub rx_history: Vec<f64>,
    /// Sent bytes per second of each recent sample, oldest first.
    pub tx_history: Vec<f64>,
}

/// A device's bytes of one service in one direction.
#[derive(Debug, Serialize, ToSchema)]
pub struct ServiceTotal {
    /// `dhcp`, `tftp`, `http`, `iscsi` or `other`.
    pub service: &'static str,
    /// `rx` (from the device) or `tx` (to it).
    pub direction: &'static str,
    /// Frames.
    pub packets: u64,
    /// Wire bytes (Ethernet header through payload).
    pub bytes: u64,
    /// Over the last few seconds (sampled every 5 s).
    pub bytes_per_second: f64,
    /// Where the figure comes from: `ebpf`.
    pub source: &'static str,
}

/// One connection of a device.
#[derive(Debug, Serialize, ToSchema)]
pub struct Session {
    /// `tcp` or `udp`.
    pub protocol: &'static str,
    /// `tftp`, `http` or `iscsi`.
    pub service: &'static str,
    /// The device's address and port.
    #[schema(value_type = String)]
    pub client: SocketAddr,
    /// netbootd's address and port.
    #[schema(value_type = String)]
    pub server: SocketAddr,
    /// Wire bytes from the device.
    pub rx_bytes: u64,
    /// Wire bytes to the device.
    pub tx_bytes: u64,
    /// L4 payload bytes from the device.
    pub rx_payload: u64,
    /// L4 payload bytes to the device.
    pub tx_payload: u64,
    /// Since the connection's last frame.
    pub idle_ms: u64,
    /// `ebpf`.
    pub source: &'static str,
}

/// How bytes were attributed (`GET /api/v1/accounting/attribution`).
#[derive(Debug, Serialize, ToSchema)]
pub struct Attribution {
    /// `ebpf` or `userspace`.
    pub source: &'static str,
    /// Per client MAC.
    pub clients: Vec<ClientAttribution>,
    /// MACs whose frames count for the client their IP address is bound to.
    pub routers: Vec<RouterView>,
    /// Bytes no client could be found for.
    pub unattributed: Vec<UnattributedView>,
}

/// How one client's bytes were attributed.
#[derive(Debug, Serialize, ToSchema)]
pub struct ClientAttribution {
    /// The client.
    #[schema(value_type = String)]
    pub mac: MacAddr,
    /// Bytes per method: `chaddr` (DHCP packets), `l2` (the frame's own MAC; in
    /// userspace, an address in the neighbour table), `binding` (a router's frame, or in
    /// userspace any address, by the client's IP address).
    pub methods: Vec<MethodTotal>,
    /// The addresses bound to this client.
    pub bindings: Vec<BindingView>,
}

/// Bytes attributed one way.
#[derive(Debug, Serialize, ToSchema)]
pub struct MethodTotal {
    /// `chaddr`, `l2` or `binding`.
    pub method: &'static str,
    /// Frames.
    pub packets: u64,
    /// Wire bytes.
    pub bytes: u64,
}

/// An IP → MAC binding.
#[derive(Debug, Serialize, ToSchema)]
pub struct BindingView {
    /// The address.
    #[schema(value_type = String)]
    pub ip: IpAddr,
    /// When it was learned or last confirmed.
    #[schema(value_type = String)]
    pub since: crate::time::Timestamp,
    /// `dhcp`, `http`, `tftp` or `neighbour`.
    pub learned_from: &'static str,
    /// Whether the kernel side uses it now.
    pub in_kernel: bool,
}

/// A router.
#[derive(Debug, Serialize, ToSchema)]
pub struct RouterView {
    /// Its MAC.
    #[schema(value_type = String)]
    pub mac: MacAddr,
    /// `dhcp_relay` (it relayed a DHCP request) or `configured`.
    pub reason: &'static str,
}

/// Unattributed bytes of one interface, service and direction.
#[derive(Debug, Serialize, ToSchema)]
pub struct UnattributedView {
    /// The interface.
    pub interface: String,
    /// The service.
    pub service: &'static str,
    /// `rx` or `tx`.
    pub direction: &'static str,
    /// Frames.
    pub packets: u64,
    /// Wire bytes.
    pub bytes: u64,
}

impl BindingSink for Accounting {
    fn bound(&self, ip: IpAddr, mac: MacAddr) {
        if let Err(error) = self.bind(ip, mac) {
            tracing::warn!(%ip, %mac, %error, "cannot write the binding to the kernel");
        }
    }

    fn unbound(&self, ip: IpAddr) {
        if let Err(error) = self.unbind(ip) {
            tracing::warn!(%ip, %error, "cannot remove the binding from the kernel");
        }
    }
}

impl TransferPorts for Accounting {
    fn opened(&self, server: SocketAddr) {
        let port = ServicePort {
            protocol: Protocol::Udp,
            port: server.port(),
            service: Service::Tftp,
        };
        if let Err(error) = self.set_port(port) {
            tracing::warn!(%server, %error, "cannot register the TFTP transfer port");
        }
    }

    fn closed(&self, server: SocketAddr) {
        if let Err(error) = self.remove_port(Protocol::Udp, server.port()) {
            tracing::warn!(%server, %error, "cannot unregister the TFTP transfer port");
        }
    }
}

/// Runs until aborted: forwards kernel logs, joins ended TFTP transfers and iSCSI sessions
/// to their kernel counts, samples rates and sweeps idle connections.
pub async fn run(
    traffic: Arc<Traffic>,
    (tftp, iscsi): (Option<Arc<Tftp>>, Option<Arc<Sessions>>),
    store: Arc<dyn Store>,
) {
    let mut tick = tokio::time::interval(TICK);
    let mut ticks = 0u32;
    loop {
        tick.tick().await;
        ticks = ticks.wrapping_add(1);
        let traffic = Arc::clone(&traffic);
        let tftp = tftp.clone();
        let iscsi = iscsi.clone();
        let sweep = ticks.is_multiple_of(SWEEP_EVERY);
        let sample = ticks.is_multiple_of(RATE_EVERY);
        let fold = ticks.is_multiple_of(FOLD_EVERY);
        let store = Arc::clone(&store);
        let done = tokio::task::spawn_blocking(move || {
            let acc = traffic.accounting();
            if fold {
                match traffic.fold(store.as_ref()) {
                    Ok(n) => tracing::trace!(rows = n, "traffic totals folded"),
                    Err(error) => tracing::warn!(%error, "saving the traffic totals failed"),
                }
            }
            if sample {
                for (mac, change) in traffic.sample() {
                    tracing::info!(%mac, kind = change.kind(), detail = %change.detail(), "install progress");
                    let ev = NewBootEvent {
                        mac,
                        at: crate::time::Timestamp::now(),
                        source: EventSource::System,
                        kind: change.kind().into(),
                        detail: change.detail(),
                        ip: None,
                    };
                    if let Err(error) = store.add_event(&ev) {
                        tracing::warn!(%error, "recording an install event failed");
                    }
                }
            }
            let Some(acc) = acc else {
                return;
            };
            acc.drain_logs();
            acc.sample_run_time(ticks);
            if let Some(tftp) = &tftp {
                join_tftp(acc, tftp);
            }
            if let Some(iscsi) = &iscsi {
                join_iscsi(acc, iscsi);
            }
            if sweep {
                sweep_flows(acc);
            }
        })
        .await;
        if let Err(error) = done {
            tracing::warn!(%error, "eBPF accounting task failed");
        }
    }
}

/// Each device's iSCSI bytes from `rows`: (MAC, from the device, to the device).
fn iscsi_totals(rows: impl Iterator<Item = (RowKey, u64)>) -> Vec<(MacAddr, u64, u64)> {
    let mut iscsi: BTreeMap<MacAddr, (u64, u64)> = BTreeMap::new();
    for ((mac, service, direction), b) in rows {
        if service == Service::Iscsi {
            let e = iscsi.entry(mac).or_default();
            match direction {
                Direction::Ingress => e.0 += b,
                Direction::Egress => e.1 += b,
            }
        }
    }
    iscsi.into_iter().map(|(mac, (w, r))| (mac, w, r)).collect()
}

/// Attaches the kernel's figures to TFTP transfers that ended in the last [`JOIN_WINDOW`],
/// and removes their connections from the flow table.
pub fn join_tftp(acc: &Accounting, tftp: &Tftp) {
    // In single-port mode transfers share the listening port: a client that starts a
    // second transfer from the same port (EDK2's tsize probe, then the real one) has one
    // flow row for both, which cannot be split between them. The per-client counters
    // still count every byte.
    if tftp.single_port() {
        return;
    }
    join(
        acc,
        Protocol::Udp,
        tftp.awaiting_kernel_bytes(JOIN_WINDOW),
        |id, k| {
            tftp.set_kernel_bytes(id, k);
        },
    );
}

/// Attaches the kernel's figures to iSCSI sessions that ended in the last
/// [`JOIN_WINDOW`], and removes their connections from the flow table.
pub fn join_iscsi(acc: &Accounting, sessions: &Sessions) {
    join(
        acc,
        Protocol::Tcp,
        sessions.awaiting_kernel_bytes(JOIN_WINDOW),
        |id, k| {
            sessions.set_kernel_bytes(id, k);
        },
    );
}

/// For each ended session (id, client, server) of `protocol`: sums its connection rows
/// (one per interface that saw it), hands the sum to `set` and removes the rows.
fn join(
    acc: &Accounting,
    protocol: Protocol,
    waiting: Vec<(u64, SocketAddr, SocketAddr)>,
    set: impl Fn(u64, KernelBytes),
) {
    if waiting.is_empty() {
        return;
    }
    let flows = match acc.flows() {
        Ok(f) => f,
        Err(error) => {
            tracing::warn!(%error, "cannot read the eBPF flow table");
            return;
        }
    };
    for (id, client, server) in waiting {
        let mut total: Option<FlowCounters> = None;
        for flow in &flows {
            if flow.protocol == protocol
                && same_ip(flow.client.ip(), client.ip())
                && flow.client.port() == client.port()
                && flow.server.port() == server.port()
                && (server.ip().is_unspecified() || same_ip(flow.server.ip(), server.ip()))
            {
                add_flow_counters(total.get_or_insert_default(), &flow.counters);
                if let Err(error) = acc.remove_flow(flow) {
                    tracing::debug!(%error, "cannot remove a joined flow");
                }
            }
        }
        if let Some(c) = total {
            set(
                id,
                KernelBytes {
                    tx_packets: c.tx_packets,
                    tx_bytes: c.tx_bytes,
                    tx_payload: c.tx_payload,
                    rx_packets: c.rx_packets,
                    rx_bytes: c.rx_bytes,
                    rx_payload: c.rx_payload,
                },
            );
        }
    }
}

fn same_ip(a: IpAddr, b: IpAddr) -> bool {
    a.to_canonical() == b.to_canonical()
}

fn sweep_flows(acc: &Accounting) {
    match acc.remove_flows_idle_for(FLOW_IDLE) {
        Ok(0) => {}
        Ok(n) => tracing::debug!(removed = n, "idle connections left the eBPF flow table"),
        Err(error) => tracing::warn!(%error, "cannot sweep the eBPF flow table"),
    }
}

/// The name of the accounting interface `ifindex`; `any` for userspace figures, which
/// belong to no interface.
fn interface_name(interfaces: &[crate::ebpf::Attached], ifindex: u32) -> String {
    if ifindex == 0 {
        return "any".to_owned();
    }
    interfaces
        .iter()
        .find(|a| a.ifindex == ifindex)
        .map_or_else(|| format!("ifindex{ifindex}"), |a| a.name.clone())
}

/// An interface's own counters, from `/proc/thread-self/net/dev` (the calling thread's
/// network namespace).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InterfaceCounters {
    /// Bytes received.
    pub rx_bytes: u64,
    /// Frames received.
    pub rx_packets: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Frames sent.
    pub tx_packets: u64,
}

/// Reads `name`'s counters from the text of `/proc/net/dev`.
pub fn interface_counters(proc_net_dev: &str, name: &str) -> Option<InterfaceCounters> {
    proc_net_dev.lines().skip(2).find_map(|line| {
        let (iface, rest) = line.split_once(':')?;
        if iface.trim() != name {
            return None;
        }
        let f: Vec<u64> = rest
            .split_whitespace()
            .map(|v| v.parse().ok())
            .collect::<Option<_>>()?;
        Some(InterfaceCounters {
            rx_bytes: *f.first()?,
            rx_packets: *f.get(1)?,
            tx_bytes: *f.get(8)?,
            tx_packets: *f.get(9)?,
        })
    })
}

/// Writes the accounting families. `max_macs` bounds the MAC series (see the module
/// documentation).
pub fn write_metrics(counters: &Counters, e: &mut Exposition, max_macs: usize) {
    let rows = match counters.rows() {
        Ok(r) => r,
        Err(error) => {
            tracing::warn!(%error, "cannot read the eBPF client table");
            return;
        }
    };
    let source = counters.source();
    let interfaces = match counters {
        Counters::Kernel(acc) => acc.interfaces(),
        Counters::Userspace { .. } => Vec::new(),
    };
    let name_of = |ifindex: u32| interface_name(&interfaces, ifindex);

    // Per MAC, summed over interfaces; the biggest `max_macs` keep their label.
    type Row = BTreeMap<(Service, Direction), (u64, u64)>;
    let mut per_mac: HashMap<MacAddr, Row> = HashMap::new();
    for r in &rows {
        let v = per_mac
            .entry(r.mac)
            .or_default()
            .entry((r.service, r.direction))
            .or_default();
        v.0 += r.packets;
        v.1 += r.bytes;
    }
    let mut macs: Vec<(MacAddr, u64)> = per_mac
        .iter()
        .map(|(mac, row)| (*mac, row.values().map(|v| v.1).sum()))
        .collect();
    macs.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut other: Row = BTreeMap::new();
    let mut labelled: Vec<(String, Row)> = Vec::new();
    for (i, (mac, _)) in macs.iter().enumerate() {
        let row = per_mac.remove(mac).unwrap_or_default();
        if i < max_macs {
            labelled.push((mac.to_string(), row));
        } else {
            for (k, v) in row {
                let o = other.entry(k).or_default();
                o.0 += v.0;
                o.1 += v.1;
            }
        }
    }
    if !other.is_empty() {
        labelled.push(("other".to_owned(), other));
    }
    for (family, help, pick) in [
        (
            "netboot_client_bytes",
            "Bytes per client MAC, service and direction. source=\"ebpf\": wire bytes (Ethernet header through payload, no FCS) counted by the eBPF program on the boot interfaces; source=\"userspace\": socket payload bytes counted by netbootd's servers (eBPF not loaded). mac=\"other\" sums the clients beyond ebpf.metrics_max_macs.",
            1usize,
        ),
        (
            "netboot_client_packets",
            "Frames per client MAC, service and direction, counted by the eBPF program (source=\"ebpf\"), or datagrams of the UDP services counted by netbootd (source=\"userspace\"; 0 for TCP services).",
            0,
        ),
    ] {
        e.family(
            family,
            Kind::Counter,
            family.ends_with("bytes").then_some("bytes"),
            help,
        );
        for (mac, row) in &labelled {
            for ((service, direction), v) in row {
                let value = if pick == 1 { v.1 } else { v.0 };
                e.counter(
                    family,
                    &[
                        ("mac", mac),
                        ("service", service.as_str()),
                        ("direction", direction.as_str()),
                        ("source", source),
                    ],
                    value,
                );
            }
        }
    }

    if let Ok(unattributed) = counters.unattributed() {
        e.family(
            "netboot_unattributed_bytes",
            Kind::Counter,
            Some("bytes"),
            "Bytes no client could be found for (group addresses, routers' own traffic without a binding), per interface (interface=\"any\" for userspace figures), service and direction.",
        );
        for r in &unattributed {
            e.counter(
                "netboot_unattributed_bytes",
                &[
                    ("interface", &name_of(r.ifindex)),
                    ("service", r.service.as_str()),
                    ("direction", r.direction.as_str()),
                ],
                r.bytes,
            );
        }
        e.family(
            "netboot_unattributed_packets",
            Kind::Counter,
            None,
            "Frames no client could be found for, per interface, service and direction.",
        );
        for r in &unattributed {
            e.counter(
                "netboot_unattributed_packets",
                &[
                    ("interface", &name_of(r.ifindex)),
                    ("service", r.service.as_str()),
                    ("direction", r.direction.as_str()),
                ],
                r.packets,
            );
        }
    }

    // The rest describes the kernel side.
    let Counters::Kernel(acc) = counters else {
        return;
    };
    let dev = std::fs::read_to_string("/proc/thread-self/net/dev").unwrap_or_default();
    e.family(
        "netboot_interface_bytes",
        Kind::Counter,
        Some("bytes"),
        "The accounting interfaces' own byte counters, for reconciliation: per interface, the client bytes plus the unattributed bytes plus the uncounted bytes equal these (from the attach on).",
    );
    for a in &interfaces {
        if let Some(c) = interface_counters(&dev, &a.name) {
            e.counter(
                "netboot_interface_bytes",
                &[("interface", &a.name), ("direction", "rx")],
                c.rx_bytes,
            );
            e.counter(
                "netboot_interface_bytes",
                &[("interface", &a.name), ("direction", "tx")],
                c.tx_bytes,
            );
        }
    }

    if let Ok(errors) = acc.error_counters() {
        e.family(
            "netboot_ebpf_uncounted_bytes",
            Kind::Counter,
            Some("bytes"),
            "Wire bytes the eBPF program could not count per client: the client table was full (raise ebpf.max_entries) or an update failed.",
        );
        e.counter(
            "netboot_ebpf_uncounted_bytes",
            &[("reason", "table_full")],
            errors.mac_full.bytes,
        );
        e.counter(
            "netboot_ebpf_uncounted_bytes",
            &[("reason", "update_failed")],
            errors.map_update.bytes,
        );
        e.family(
            "netboot_ebpf_overflow",
            Kind::Counter,
            None,
            "Packets that found an eBPF table full, by table. Non-zero means lost detail: raise the table's size.",
        );
        for (table, c) in [
            ("clients", errors.mac_full),
            ("flows", errors.flow_full),
            ("routers", errors.routers_full),
        ] {
            e.counter("netboot_ebpf_overflow", &[("table", table)], c.packets);
        }
    }
    if let Ok(fill) = acc.fill(Some(rows.len())) {
        e.family(
            "netboot_ebpf_map_entries",
            Kind::Gauge,
            None,
            "Entries in use in each eBPF map.",
        );
        for f in &fill {
            e.gauge(
                "netboot_ebpf_map_entries",
                &[("map", f.map)],
                f.entries as f64,
            );
        }
        e.family(
            "netboot_ebpf_map_capacity",
            Kind::Gauge,
            None,
            "Capacity of each eBPF map.",
        );
        for f in &fill {
            e.gauge(
                "netboot_ebpf_map_capacity",
                &[("map", f.map)],
                f.capacity as f64,
            );
        }
    }
    if let Ok(stats) = acc.program_stats() {
        e.family(
            "netboot_ebpf_program_run_seconds",
            Kind::Counter,
            Some("seconds"),
            "Time spent in the eBPF accounting programs, as the kernel measures it while its run-time statistics are on (ebpf.run_time_stats: always, or one second in every minute when sampled).",
        );
        for s in &stats {
            e.counter_f64(
                "netboot_ebpf_program_run_seconds",
                &[("program", s.program)],
                s.run_time.as_secs_f64(),
            );
        }
        e.family(
            "netboot_ebpf_program_runs",
            Kind::Counter,
            None,
            "Runs of the eBPF accounting programs (one per frame) while the kernel's run-time statistics are on; run seconds / runs is the cost of a run.",
        );
        for s in &stats {
            e.counter(
                "netboot_ebpf_program_runs",
                &[("program", s.program)],
                s.run_count,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bindings::Bindings;
    use crate::store::Sqlite;

    fn userspace() -> (Arc<Tally>, Traffic) {
        let tally = Arc::new(Tally::new(Arc::new(Bindings::default())));
        let counters = Counters::Userspace {
            tally: Arc::clone(&tally),
            why: "test".into(),
        };
        (tally, Traffic::new(counters, 60))
    }

    const MAC: MacAddr = MacAddr([2, 0, 0, 0, 0, 9]);

    fn lifetime_bytes(t: &Traffic, store: &dyn Store) -> u64 {
        t.lifetime(MAC, store)
            .expect("lifetime")
            .iter()
            .filter(|l| l.service == "dhcp" && l.direction == "rx")
            .map(|l| l.bytes)
            .sum()
    }

    #[test]
    fn folds_add_only_what_came_since_and_a_new_run_starts_from_the_saved_totals() {
        let store = Sqlite::in_memory().expect("store");
        let (tally, t) = userspace();
        tally.count_mac(MAC, Service::Dhcp, Direction::Ingress, 1, 300);
        assert_eq!(
            lifetime_bytes(&t, &store),
            300,
            "not folded yet, still shown"
        );
        assert_eq!(t.fold(&store).expect("fold"), 1);
        assert_eq!(t.fold(&store).expect("fold"), 0, "nothing new");
        tally.count_mac(MAC, Service::Dhcp, Direction::Ingress, 1, 200);
        assert_eq!(t.fold(&store).expect("fold"), 1);
        assert_eq!(lifetime_bytes(&t, &store), 500);
        let saved = store.list_traffic(Some(MAC)).expect("list");
        assert_eq!(saved.len(), 1);
        assert_eq!(
            (saved[0].bytes, saved[0].seen_bytes, saved[0].packets),
            (500, 500, 2)
        );

        // The next run's userspace counters start at zero: what they count adds up.
        let (tally, t) = userspace();
        assert_eq!(lifetime_bytes(&t, &store), 500);
        tally.count_mac(MAC, Service::Dhcp, Direction::Ingress, 1, 100);
        assert_eq!(lifetime_bytes(&t, &store), 600);
        t.fold(&store).expect("fold");
        assert_eq!(store.list_traffic(Some(MAC)).expect("list")[0].bytes, 600);
    }

    #[test]
    fn a_counter_that_went_back_started_again() {
        let f = Folded {
            packets: 10,
            bytes: 1000,
            seen_packets: 10,
            seen_bytes: 1000,
        };
        assert_eq!(f.pending((12, 1100)), (2, 100));
        assert_eq!(f.pending((3, 90)), (3, 90));
    }

    #[test]
    fn service_rates_sum_clients_and_unattributed_and_keep_a_history() {
        use Direction::{Egress, Ingress};
        let bytes = |tftp_tx: u64, iscsi_rx: u64| {
            service_bytes(
                [
                    (Service::Tftp, Egress, tftp_tx),
                    (Service::Tftp, Egress, 1000),
                    (Service::Iscsi, Ingress, iscsi_rx),
                ]
                .into_iter(),
                [
                    (Service::Tftp, Egress, 500),
                    (Service::Unknown(9), Ingress, 7),
                ]
                .into_iter(),
            )
        };
        let mut r = ServiceRates::default();
        let t0 = Instant::now();
        r.record(t0, bytes(0, 0));
        let first = r.figures(&bytes(0, 0));
        let names: Vec<&str> = first.iter().map(|f| f.service).collect();
        assert_eq!(names, ["dhcp", "tftp", "http", "iscsi", "other", "unknown"]);
        assert_eq!(first[1].tx_bytes, 1500, "clients plus unattributed");
        assert!(first[1].tx_history.is_empty(), "one sample is no rate yet");
        for i in 1..=HISTORY as u64 + 3 {
            let now = bytes(10_000 * i, 5_000 * i);
            r.record(t0 + Duration::from_secs(5 * i), now);
        }
        let f = r.figures(&bytes(0, 0));
        assert!((f[1].tx_bytes_per_second - 2000.0).abs() < 1e-6);
        assert!((f[3].rx_bytes_per_second - 1000.0).abs() < 1e-6);
        assert_eq!(f[1].tx_history.len(), HISTORY, "bounded");
        assert!(f[0].rx_history.iter().all(|v| *v == 0.0));
    }

    #[test]
    fn device_histories_are_bounded_and_forget_quiet_devices() {
        let (a, b): (MacAddr, MacAddr) = (
            "52:54:00:00:00:0a".parse().expect("mac"),
            "52:54:00:00:00:0b".parse().expect("mac"),
        );
        let mut devices = HashMap::new();
        let busy = HashMap::from([
            ((a, Service::Iscsi, Direction::Ingress), 100.0),
            ((a, Service::Tftp, Direction::Egress), 10.0),
            ((a, Service::Iscsi, Direction::Egress), 5.0),
            ((b, Service::Http, Direction::Egress), 1.0),
        ]);
        record_devices(&mut devices, &busy);
        assert_eq!(devices[&a], [(100.0, 15.0)]);
        let only_a = HashMap::from([((a, Service::Iscsi, Direction::Ingress), 1.0)]);
        for _ in 0..HISTORY {
            record_devices(&mut devices, &only_a);
        }
        assert_eq!(devices[&a].len(), HISTORY, "bounded");
        assert!(!devices.contains_key(&b), "a quiet window is forgotten");
        for _ in 0..HISTORY {
            record_devices(&mut devices, &HashMap::new());
        }
        assert!(devices.is_empty());
    }

    #[test]
    fn interface_counters_are_read_from_proc_net_dev() {
        let dev = "Inter-|   Receive                                                |  Transmit\n \
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
 lo:    1000      10    0    0    0     0          0         0     1000      10    0    0    0     0       0          0\n  \
nb0: 123456     789    0    0    0     0          0         0   654321     987    0    0    0     0       0          0\n";
        assert_eq!(
            interface_counters(dev, "nb0"),
            Some(InterfaceCounters {
                rx_bytes: 123_456,
                rx_packets: 789,
                tx_bytes: 654_321,
                tx_packets: 987,
            })
        );
        assert_eq!(interface_counters(dev, "nb"), None);
    }
}
