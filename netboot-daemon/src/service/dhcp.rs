//! The DHCP service on tokio: one socket on port 67 and one on 4011, bound to
//! `0.0.0.0`, for every boot interface. Each datagram's `IP_PKTINFO` ([`crate::net`])
//! names the interface it came in on, which picks the interface's configuration (and
//! drops datagrams from other interfaces), and the address it was sent to; broadcast
//! replies leave through the interface the request came in on, and every reply leaves
//! from our address on it.
//!
//! All decisions are the cores': [`crate::dhcp::proxy`] in proxy mode (and on port 4011
//! in both modes), [`crate::dhcp::server`] on port 67 in server mode. This module
//! receives, sends, persists the server's lease changes (write-behind, batched), records
//! what it saw in the store and counts.

use crate::ebpf::{Direction, Service};
use crate::service::tally::Tally;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use dhcproto::v4::{Encodable as _, Encoder, Message};
use netboot_common::PORT_DHCP_SERVER;
use tokio::sync::{mpsc, watch};

use crate::bindings::{Bindings, Source as BindingSource};
use dhcproto::v4::MessageType;

use crate::dhcp::Meta;
use crate::dhcp::proxy::{self, BootFiles, Context, Destination, Port};
use crate::dhcp::pxe::{Client, IpxeFeature, chaddr_mac};
use crate::dhcp::server::{self, Lease, LeaseEvent, Server};
use crate::metrics::{Exposition, Kind};
use crate::net::{Egress, PktinfoSocket};
use crate::store::{EventSource, NewBootEvent, Sighting, Store};
use crate::time::Timestamp;

/// Counters of the DHCP service.
#[derive(Debug, Default)]
pub struct Stats {
    /// Datagrams received.
    pub received: AtomicU64,
    /// Replies sent.
    pub replies: AtomicU64,
    /// Datagrams that were not DHCP.
    pub malformed: AtomicU64,
    /// Datagrams that came in on an interface that is not a boot interface.
    pub unknown_interface: AtomicU64,
    /// Requests left to the real DHCP server (not PXE, other message types), or that
    /// get no answer in server mode (no pool, pool exhausted, another server chosen).
    pub ignored: AtomicU64,
    /// Server mode: DHCPNAKs sent.
    pub naks: AtomicU64,
    /// Server mode: addresses acknowledged.
    pub acks: AtomicU64,
    /// Server mode: DHCPRELEASE and DHCPDECLINE received from the holder.
    pub releases: AtomicU64,
    /// Server mode: lease changes that could not be written to the store.
    pub persist_errors: AtomicU64,
    /// Sightings and boot events not recorded because the recorder was behind.
    pub records_dropped: AtomicU64,
}

/// Sightings and boot events waiting for the recorder; beyond this the service drops
/// them (and counts) rather than slow down answering.
const RECORD_QUEUE: usize = 16_384;
/// Records written per store transaction at most.
const RECORD_BATCH: usize = 512;
/// How long the recorder gathers records after the first before it writes them.
const RECORD_WINDOW: Duration = Duration::from_millis(25);

/// A boot interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// Its index (what `IP_PKTINFO` names).
    pub index: u32,
    /// Its name.
    pub name: String,
    /// Our IPv4 addresses on it, the primary (first listed by the kernel) first.
    pub addrs: Vec<Ipv4Addr>,
}

/// The DHCP sockets, ports 67 and 4011 on `0.0.0.0`, and the boot interfaces they serve.
#[derive(Debug)]
pub struct Listeners {
    /// The boot interfaces: datagrams from any other interface are dropped.
    pub interfaces: Vec<Interface>,
    dhcp: PktinfoSocket,
    pxe: PktinfoSocket,
}

impl Listeners {
    fn interface(&self, index: u32) -> Option<&Interface> {
        self.interfaces.iter().find(|i| i.index == index)
    }
}

/// The boot interfaces: those in `names` that have IPv4 (all up, non-loopback IPv4
/// interfaces when `names` is empty), in the calling thread's network namespace.
pub fn interfaces(names: &[String]) -> io::Result<Vec<Interface>> {
    let mut out: Vec<Interface> = Vec::new();
    for a in if_addrs::get_if_addrs()? {
        let if_addrs::IfAddr::V4(v4) = &a.addr else {
            continue;
        };
        let wanted = if names.is_empty() {
            !a.is_loopback() && a.is_oper_up()
        } else {
            names.contains(&a.name)
        };
        let Some(index) = a.index.filter(|_| wanted) else {
            continue;
        };
        match out.iter_mut().find(|i| i.index == index) {
            Some(i) => i.addrs.push(v4.ip),
            None => out.push(Interface {
                index,
                name: a.name.clone(),
                addrs: vec![v4.ip],
            }),
        }
    }
    for name in names {
        if !out.iter().any(|i| &i.name == name) {
            tracing::warn!(iface = %name, "DHCP boot interface missing or without IPv4; not served");
        }
    }
    Ok(out)
}

/// Binds ports 67 and 4011 (`dhcp_port`, `pxe_port`) on `0.0.0.0` for the boot
/// interfaces `names` (see [`interfaces`]), in the calling thread's network namespace.
/// Must run inside a tokio runtime.
pub fn bind(names: &[String], dhcp_port: u16, pxe_port: u16) -> io::Result<Listeners> {
    let interfaces = interfaces(names)?;
    Ok(Listeners {
        interfaces,
        dhcp: PktinfoSocket::bind(dhcp_port)?,
        pxe: PktinfoSocket::bind(pxe_port)?,
    })
}

/// What the service does in server mode.
struct ServerMode {
    core: Mutex<Server>,
    /// Lease changes on their way to the store.
    persist: mpsc::UnboundedSender<Vec<LeaseEvent>>,
    persist_rx: Mutex<Option<mpsc::UnboundedReceiver<Vec<LeaseEvent>>>>,
}

impl ServerMode {
    /// Runs `f` on the core and sends the lease changes it queued to the persistence
    /// task, under one lock.
    fn with_core<T>(&self, f: impl FnOnce(&mut Server) -> T) -> T {
        let mut core = self.core.lock().unwrap_or_else(PoisonError::into_inner);
        let out = f(&mut core);
        let events: Vec<LeaseEvent> = std::iter::from_fn(|| core.poll_event()).collect();
        drop(core);
        if !events.is_empty() {
            // The receiver lives as long as the service runs; after shutdown nothing is
            // left to write them.
            let _ = self.persist.send(events);
        }
        out
    }
}

/// An answer from either core, as the driver sends and records it.
struct Answer {
    message: Message,
    to: Destination,
    client: Client,
    boot_file: Option<String>,
    /// The address acknowledged (server mode).
    ip: Option<Ipv4Addr>,
    /// The timeline event kind.
    kind: &'static str,
}

/// The DHCP service: proxyDHCP or full server.
pub struct DhcpService {
    store: Arc<dyn Store>,
    http_port: u16,
    files: BootFiles,
    ipxe_required: Vec<IpxeFeature>,
    client_port: u16,
    bindings: Option<Arc<Bindings>>,
    tally: Option<Arc<Tally>>,
    server: Option<ServerMode>,
    records: mpsc::Sender<(Sighting, NewBootEvent)>,
    records_rx: Mutex<Option<mpsc::Receiver<(Sighting, NewBootEvent)>>>,
    /// Counters.
    pub stats: Stats,
}

impl std::fmt::Debug for DhcpService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DhcpService")
            .field("http_port", &self.http_port)
            .field("files", &self.files)
            .field("server_mode", &self.server.is_some())
            .finish_non_exhaustive()
    }
}

impl DhcpService {
    /// A proxyDHCP service that points iPXE at `http_port` and firmware at `files`.
    /// Replies to broadcasting clients go to `client_port` (68 except in tests).
    pub fn new(store: Arc<dyn Store>, http_port: u16, files: BootFiles, client_port: u16) -> Self {
        let (records, records_rx) = mpsc::channel(RECORD_QUEUE);
        Self {
            store,
            http_port,
            files,
            ipxe_required: Vec::new(),
            client_port,
            bindings: None,
            tally: None,
            server: None,
            records,
            records_rx: Mutex::new(Some(records_rx)),
            stats: Stats::default(),
        }
    }

    /// Counts every request and reply under the client's `chaddr` in `tally` (when the
    /// eBPF program does not count).
    #[must_use]
    pub fn with_tally(mut self, tally: Option<Arc<Tally>>) -> Self {
        self.tally = tally;
        self
    }

    /// iPXE clients lacking one of `features` get the firmware boot file.
    #[must_use]
    pub fn with_ipxe_required(mut self, features: Vec<IpxeFeature>) -> Self {
        self.ipxe_required = features;
        self
    }

    /// Makes this the DHCP server of `config`'s pools, with the leases in the store.
    pub fn with_server(mut self, config: server::Config) -> Result<Self, crate::store::StoreError> {
        let mut core = Server::new(config);
        core.restore(self.store.list_leases()?);
        let (tx, rx) = mpsc::unbounded_channel();
        let mode = ServerMode {
            core: Mutex::new(core),
            persist: tx,
            persist_rx: Mutex::new(Some(rx)),
        };
        self.server = Some(mode);
        self.drain_lease_events();
        Ok(self)
    }

    /// The lease table (server mode), in address order; `None` in proxy mode.
    pub fn leases(&self) -> Option<Vec<Lease>> {
        let mode = self.server.as_ref()?;
        Some(
            mode.core
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .leases(),
        )
    }

    /// Sends the core's pending lease changes to the persistence task.
    fn drain_lease_events(&self) {
        if let Some(mode) = &self.server {
            mode.with_core(|_| ());
        }
    }

    /// Writes the service's metric families.
    pub fn write_metrics(&self, e: &mut Exposition) {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let st = &self.stats;
        e.family("netboot_dhcp_datagrams", Kind::Counter, None, "Datagrams on the DHCP ports (67, 4011) by what became of them: answered, ignored (proxy mode: not PXE, left to the DHCP server; server mode: no pool, pool exhausted, another server chosen), malformed.");
        e.counter(
            "netboot_dhcp_datagrams",
            &[("result", "answered")],
            load(&st.replies),
        );
        e.counter(
            "netboot_dhcp_datagrams",
            &[("result", "ignored")],
            load(&st.ignored),
        );
        e.counter(
            "netboot_dhcp_datagrams",
            &[("result", "malformed")],
            load(&st.malformed),
        );
        e.family(
            "netboot_dhcp_received_datagrams",
            Kind::Counter,
            None,
            "Datagrams received on the DHCP ports.",
        );
        e.counter("netboot_dhcp_received_datagrams", &[], load(&st.received));
        e.family(
            "netboot_dhcp_dropped_datagrams",
            Kind::Counter,
            None,
            "Datagrams on the DHCP ports dropped before decoding, by reason: unknown_interface (it came in on an interface that is not a boot interface).",
        );
        e.counter(
            "netboot_dhcp_dropped_datagrams",
            &[("reason", "unknown_interface")],
            load(&st.unknown_interface),
        );
        e.family(
            "netboot_dhcp_records_dropped",
            Kind::Counter,
            None,
            "Client sightings and boot events not recorded because the store was behind (the answers were sent).",
        );
        e.counter(
            "netboot_dhcp_records_dropped",
            &[],
            load(&st.records_dropped),
        );
        let Some(mode) = &self.server else { return };
        e.family(
            "netboot_dhcp_server_messages",
            Kind::Counter,
            None,
            "Server mode: DHCPACKs of an address, DHCPNAKs, and releases and declines from the lease holder.",
        );
        e.counter(
            "netboot_dhcp_server_messages",
            &[("type", "ack")],
            load(&st.acks),
        );
        e.counter(
            "netboot_dhcp_server_messages",
            &[("type", "nak")],
            load(&st.naks),
        );
        e.counter(
            "netboot_dhcp_server_messages",
            &[("type", "release_or_decline")],
            load(&st.releases),
        );
        e.family(
            "netboot_dhcp_lease_write_errors",
            Kind::Counter,
            None,
            "Server mode: batches of lease changes the store refused (the in-memory table stays authoritative).",
        );
        e.counter(
            "netboot_dhcp_lease_write_errors",
            &[],
            load(&st.persist_errors),
        );
        let now = Timestamp::now().unix_secs();
        let (bound, offered, declined, expired) = mode
            .core
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .counts(now);
        e.family(
            "netboot_dhcp_leases",
            Kind::Gauge,
            None,
            "Server mode: leases by state (expired: ended or released, the address still remembered for its client).",
        );
        for (state, n) in [
            ("bound", bound),
            ("offered", offered),
            ("declined", declined),
            ("expired", expired),
        ] {
            e.gauge("netboot_dhcp_leases", &[("state", state)], n as f64);
        }
    }

    /// Records the client address → MAC bindings this service learns into `bindings`.
    #[must_use]
    pub fn with_bindings(mut self, bindings: Arc<Bindings>) -> Self {
        self.bindings = Some(bindings);
        self
    }

    /// Serves both ports until `shutdown` turns true.
    pub async fn serve(self: Arc<Self>, listeners: Listeners, shutdown: watch::Receiver<bool>) {
        let mut tasks = tokio::task::JoinSet::new();
        let l = Arc::new(listeners);
        for port in [Port::Dhcp, Port::Pxe] {
            let (this, l, mut stop) = (Arc::clone(&self), Arc::clone(&l), shutdown.clone());
            tasks.spawn(async move {
                tokio::select! {
                    () = this.receive_loop(&l, port) => {}
                    _ = stop.changed() => {}
                }
            });
        }
        let persist = self.server.as_ref().and_then(|m| {
            m.persist_rx
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take()
        });
        if let Some(rx) = persist {
            tasks.spawn(Arc::clone(&self).lease_keeper(rx, shutdown.clone()));
        }
        let records = self
            .records_rx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(rx) = records {
            tasks.spawn(Arc::clone(&self).recorder(rx, shutdown.clone()));
        }
        while tasks.join_next().await.is_some() {}
    }

    /// Server mode: expires stale offers and declines every 10 s and writes lease
    /// changes to the store, batching whatever queued up meanwhile; at shutdown, writes
    /// what is left and ends.
    async fn lease_keeper(
        self: Arc<Self>,
        mut rx: mpsc::UnboundedReceiver<Vec<LeaseEvent>>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(Duration::from_secs(10));
        loop {
            let mut batch = tokio::select! {
                _ = tick.tick() => {
                    if let Some(mode) = &self.server {
                        mode.with_core(|c| c.expire(Timestamp::now().unix_secs()));
                    }
                    continue;
                }
                Some(batch) = rx.recv() => batch,
                _ = stop.changed() => {
                    self.drain_lease_events();
                    let mut rest = Vec::new();
                    while let Ok(more) = rx.try_recv() {
                        rest.extend(more);
                    }
                    if !rest.is_empty() {
                        self.write_leases(rest).await;
                    }
                    return;
                }
            };
            let window = tokio::time::Instant::now() + RECORD_WINDOW;
            while let Ok(Some(more)) = tokio::time::timeout_at(window, rx.recv()).await {
                batch.extend(more);
            }
            self.write_leases(batch).await;
        }
    }

    /// Writes sightings and boot events to the store in batches, off the answering path;
    /// at shutdown, writes what is queued and ends.
    async fn recorder(
        self: Arc<Self>,
        mut rx: mpsc::Receiver<(Sighting, NewBootEvent)>,
        mut stop: watch::Receiver<bool>,
    ) {
        loop {
            let first = tokio::select! {
                Some(item) = rx.recv() => item,
                _ = stop.changed() => {
                    rx.close();
                    let mut rest = Vec::new();
                    while let Ok(item) = rx.try_recv() {
                        rest.push(item);
                    }
                    for chunk in rest.chunks(RECORD_BATCH) {
                        self.write_records(chunk.to_vec()).await;
                    }
                    return;
                }
            };
            // Gather what arrives in the next moment too: one transaction for a burst
            // instead of one per answer.
            let mut batch = vec![first];
            let window = tokio::time::Instant::now() + RECORD_WINDOW;
            while batch.len() < RECORD_BATCH {
                match tokio::time::timeout_at(window, rx.recv()).await {
                    Ok(Some(item)) => batch.push(item),
                    Ok(None) | Err(_) => break,
                }
            }
            self.write_records(batch).await;
        }
    }

    async fn write_records(&self, batch: Vec<(Sighting, NewBootEvent)>) {
        let store = Arc::clone(&self.store);
        let n = batch.len();
        match tokio::task::spawn_blocking(move || store.record_batch(&batch)).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, records = n, "recording DHCP clients failed"),
            Err(error) => tracing::warn!(%error, "the DHCP recorder panicked"),
        }
    }

    async fn write_leases(&self, batch: Vec<LeaseEvent>) {
        let store = Arc::clone(&self.store);
        let n = batch.len();
        match tokio::task::spawn_blocking(move || store.apply_lease_changes(&batch)).await {
            Ok(Ok(())) => tracing::trace!(changes = n, "DHCP leases written"),
            Ok(Err(error)) => {
                self.stats.persist_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(%error, changes = n, "writing DHCP leases");
            }
            Err(error) => {
                self.stats.persist_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(%error, "DHCP lease writer panicked");
            }
        }
    }

    /// Decides the answer to one datagram; `None` when there is none to send.
    fn decide(&self, msg: &Message, port: Port, ctx: &Context, meta: &Meta<'_>) -> Option<Answer> {
        let from_server = match (&self.server, port) {
            (Some(mode), Port::Dhcp) => {
                Some(mode.with_core(|c| c.handle(Timestamp::now().unix_secs(), msg, meta, ctx)))
            }
            _ => None,
        };
        match from_server {
            Some(Ok(Some(r))) => {
                let kind = match r.kind() {
                    Some(MessageType::Offer) => "dhcp_offer",
                    Some(MessageType::Nak) => {
                        self.stats.naks.fetch_add(1, Ordering::Relaxed);
                        "dhcp_nak"
                    }
                    _ if r.ip.is_some() => {
                        self.stats.acks.fetch_add(1, Ordering::Relaxed);
                        "dhcp_ack"
                    }
                    _ => "dhcp_inform",
                };
                Some(Answer {
                    message: r.message,
                    to: r.to,
                    client: r.client,
                    boot_file: r.boot_file,
                    ip: r.ip,
                    kind,
                })
            }
            Some(Ok(None)) => {
                self.stats.releases.fetch_add(1, Ordering::Relaxed);
                None
            }
            Some(Err(why)) => {
                self.stats.ignored.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(?why, iface = %meta.iface, "DHCP request not answered");
                None
            }
            None => match proxy::handle(msg, port, meta, ctx) {
                Ok(r) => {
                    let kind = if r.is_ack() {
                        "dhcp_pxe_ack"
                    } else {
                        "dhcp_proxy_offer"
                    };
                    Some(Answer {
                        message: r.message,
                        to: r.to,
                        client: r.client,
                        boot_file: Some(r.boot_file),
                        ip: None,
                        kind,
                    })
                }
                Err(why) => {
                    self.stats.ignored.fetch_add(1, Ordering::Relaxed);
                    tracing::trace!(?why, iface = %meta.iface, "dhcp request left to the DHCP server");
                    None
                }
            },
        }
    }

    async fn receive_loop(&self, l: &Listeners, port: Port) {
        let socket = match port {
            Port::Dhcp => &l.dhcp,
            Port::Pxe => &l.pxe,
        };
        let mut buf = vec![0u8; 1500];
        let mut out = Vec::with_capacity(600);
        let ctx = Context {
            http_port: self.http_port,
            files: self.files.clone(),
            ipxe_required: self.ipxe_required.clone(),
        };
        loop {
            let (n, recv) = match socket.recv(&mut buf).await {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(error = %e, "dhcp receive error");
                    continue;
                }
            };
            self.stats.received.fetch_add(1, Ordering::Relaxed);
            let Some(iface) = l.interface(recv.ifindex) else {
                self.stats.unknown_interface.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(ifindex = recv.ifindex, from = %recv.src, "DHCP datagram from an interface that is not a boot interface dropped");
                continue;
            };
            let meta = Meta {
                recv,
                iface: &iface.name,
                addrs: &iface.addrs,
            };
            let msg = match crate::dhcp::wire::decode(&buf[..n]) {
                Ok(m) => m,
                Err(why) => {
                    self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(?why, from = %recv.src, iface = %iface.name, "malformed DHCP datagram dropped");
                    continue;
                }
            };
            if let Some(t) = &self.tally
                && let Some(mac) = chaddr_mac(&msg)
            {
                t.count_mac(mac, Service::Dhcp, Direction::Ingress, 1, n as u64);
            }
            let Some(answer) = self.decide(&msg, port, &ctx, &meta) else {
                continue;
            };
            if let Some(b) = &self.bindings {
                let ip = answer
                    .ip
                    .filter(|_| answer.kind == "dhcp_ack")
                    .or_else(|| proxy::client_address(&msg, *recv.src.ip()));
                if let Some(ip) = ip {
                    b.learn(
                        ip.into(),
                        answer.client.mac,
                        BindingSource::Dhcp,
                        Timestamp::now(),
                    );
                }
            }
            out.clear();
            if answer.message.encode(&mut Encoder::new(&mut out)).is_err() {
                continue;
            }
            let (to, egress) = route(answer.to, &meta, self.client_port);
            match socket.send(&out, to, egress).await {
                Ok(_) => {
                    self.stats.replies.fetch_add(1, Ordering::Relaxed);
                    if let Some(t) = &self.tally {
                        t.count_mac(
                            answer.client.mac,
                            Service::Dhcp,
                            Direction::Egress,
                            1,
                            out.len() as u64,
                        );
                    }
                }
                Err(e) => tracing::debug!(error = %e, %to, iface = %iface.name, "dhcp send failed"),
            }
            tracing::debug!(mac = %answer.client.mac, iface = %iface.name, kind = answer.kind, ip = ?answer.ip, file = ?answer.boot_file, "DHCP answered");
            self.record(&answer, &iface.name);
        }
    }

    /// Queues the client's sighting and the exchange's boot event for the recorder.
    fn record(&self, a: &Answer, iface: &str) {
        let c = &a.client;
        let mut detail = format!(
            "{} on {}: {} (arch {})",
            a.kind.trim_start_matches("dhcp_").replace('_', " "),
            iface,
            if c.ipxe {
                "iPXE"
            } else if c.vendor.is_some() {
                "firmware"
            } else {
                "client"
            },
            c.arch.map_or_else(|| "-".to_owned(), |a| a.0.to_string()),
        );
        if let Some(ip) = a.ip {
            detail.push_str(&format!(", address {ip}"));
        }
        if let Some(f) = &a.boot_file {
            detail.push_str(&format!(", boot file {f}"));
        }
        let at = Timestamp::now();
        let ip =
            a.ip.filter(|_| a.kind == "dhcp_ack")
                .map(|ip| ip.to_string());
        let sighting = Sighting {
            mac: c.mac,
            at,
            arch: c.arch.and_then(crate::dhcp::pxe::ClientArch::arch),
            ip: ip.clone(),
            vendor_class: c.vendor_class.clone(),
        };
        let event = NewBootEvent {
            mac: c.mac,
            at,
            source: EventSource::Dhcp,
            kind: a.kind.into(),
            detail,
            ip,
        };
        if self.records.try_send((sighting, event)).is_err() {
            self.stats.records_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Where a reply goes and how it leaves, for the core's `to` and the request's `meta`.
/// Every reply leaves from our address in the exchange ([`Meta::server`]). A broadcast
/// leaves through the interface the request came in on: with one socket for every
/// interface nothing else would choose it. A unicast reply (to the client's address, or
/// to the relay on the server port) follows the routing table, which knows the way to
/// a renewing client or a relay behind a router better than the ingress interface does.
fn route(to: Destination, meta: &Meta<'_>, client_port: u16) -> (SocketAddrV4, Egress) {
    let src = meta.server();
    match to {
        Destination::Relay(relay) => (
            SocketAddrV4::new(relay, PORT_DHCP_SERVER),
            Egress { ifindex: 0, src },
        ),
        Destination::Source => (meta.recv.src, Egress { ifindex: 0, src }),
        Destination::Broadcast => (
            SocketAddrV4::new(Ipv4Addr::BROADCAST, client_port),
            Egress {
                ifindex: meta.recv.ifindex,
                src,
            },
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::RecvMeta;

    #[test]
    fn broadcasts_leave_through_the_ingress_interface_unicasts_by_route() {
        let addrs = [Ipv4Addr::new(10, 1, 0, 1), Ipv4Addr::new(10, 1, 1, 1)];
        let meta = Meta {
            recv: RecvMeta {
                ifindex: 7,
                src: SocketAddrV4::new(Ipv4Addr::new(10, 1, 1, 50), 68),
                dst: addrs[1],
            },
            iface: "eth1",
            addrs: &addrs,
        };
        let from_second = |ifindex| Egress {
            ifindex,
            src: addrs[1],
        };
        assert_eq!(
            route(Destination::Broadcast, &meta, 68),
            (SocketAddrV4::new(Ipv4Addr::BROADCAST, 68), from_second(7))
        );
        assert_eq!(
            route(Destination::Source, &meta, 68),
            (meta.recv.src, from_second(0))
        );
        let relay = Ipv4Addr::new(10, 50, 0, 1);
        assert_eq!(
            route(Destination::Relay(relay), &meta, 68),
            (SocketAddrV4::new(relay, 67), from_second(0))
        );
    }
}
