//! The proxyDHCP service on tokio: one pair of sockets (ports 67 and 4011) per boot
//! interface, bound to the interface so that each reply names the right server address.
//!
//! All decisions are the core's ([`crate::dhcp::proxy`]); this module receives, sends,
//! records what it saw in the store and counts.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dhcproto::v4::{Decodable as _, Decoder, Encodable as _, Encoder, Message};
use netboot_common::PORT_DHCP_SERVER;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tokio::sync::watch;

use crate::bindings::{Bindings, Source as BindingSource};
use crate::dhcp::proxy::{self, BootFiles, Context, Destination, Port};
use crate::metrics::{Exposition, Kind};
use crate::service::timeline;
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
    /// Requests left to the real DHCP server (not PXE, other message types).
    pub ignored: AtomicU64,
}

/// The sockets of one boot interface.
#[derive(Debug)]
pub struct Listener {
    /// Interface name.
    pub iface: String,
    /// Our IPv4 address on it.
    pub ip: Ipv4Addr,
    dhcp: UdpSocket,
    pxe: UdpSocket,
}

fn udp_socket(iface: &str, port: u16) -> io::Result<UdpSocket> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_address(true)?;
    s.set_broadcast(true)?;
    s.bind_device(Some(iface.as_bytes()))?;
    s.set_nonblocking(true)?;
    s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into())?;
    UdpSocket::from_std(s.into())
}

/// Binds ports 67 and 4011 on each interface in `ifaces` (all up, non-loopback IPv4
/// interfaces when empty), in the calling thread's network namespace. Interfaces that
/// cannot be bound are reported and skipped.
pub fn bind(ifaces: &[String], dhcp_port: u16, pxe_port: u16) -> io::Result<Vec<Listener>> {
    let addrs = if_addrs::get_if_addrs()?;
    let mut out = Vec::new();
    for a in addrs {
        let if_addrs::IfAddr::V4(v4) = &a.addr else {
            continue;
        };
        let wanted = if ifaces.is_empty() {
            !a.is_loopback() && a.is_oper_up()
        } else {
            ifaces.contains(&a.name)
        };
        if !wanted || out.iter().any(|l: &Listener| l.iface == a.name) {
            continue;
        }
        match (
            udp_socket(&a.name, dhcp_port),
            udp_socket(&a.name, pxe_port),
        ) {
            (Ok(dhcp), Ok(pxe)) => out.push(Listener {
                iface: a.name.clone(),
                ip: v4.ip,
                dhcp,
                pxe,
            }),
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(iface = %a.name, error = %e, "proxyDHCP cannot listen on this interface")
            }
        }
    }
    Ok(out)
}

/// The proxyDHCP service.
pub struct ProxyDhcp {
    store: Arc<dyn Store>,
    http_port: u16,
    files: BootFiles,
    client_port: u16,
    bindings: Option<Arc<Bindings>>,
    /// Counters.
    pub stats: Stats,
}

impl std::fmt::Debug for ProxyDhcp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyDhcp")
            .field("http_port", &self.http_port)
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl ProxyDhcp {
    /// A service that points iPXE at `http_port` and firmware at `files`. Replies to
    /// broadcasting clients go to `client_port` (68 except in tests).
    pub fn new(store: Arc<dyn Store>, http_port: u16, files: BootFiles, client_port: u16) -> Self {
        Self {
            store,
            http_port,
            files,
            client_port,
            bindings: None,
            stats: Stats::default(),
        }
    }

    /// Writes the service's metric families.
    pub fn write_metrics(&self, e: &mut Exposition) {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let st = &self.stats;
        e.family("netboot_dhcp_datagrams", Kind::Counter, None, "Datagrams on the proxyDHCP ports (67, 4011) by what became of them: answered, ignored (not PXE or not for proxyDHCP, left to the DHCP server), malformed.");
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
            "Datagrams received on the proxyDHCP ports.",
        );
        e.counter("netboot_dhcp_received_datagrams", &[], load(&st.received));
    }

    /// Records the client address → MAC bindings this service learns into `bindings`.
    #[must_use]
    pub fn with_bindings(mut self, bindings: Arc<Bindings>) -> Self {
        self.bindings = Some(bindings);
        self
    }

    /// Serves every listener until `shutdown` turns true.
    pub async fn serve(self: Arc<Self>, listeners: Vec<Listener>, shutdown: watch::Receiver<bool>) {
        let mut tasks = tokio::task::JoinSet::new();
        for l in listeners {
            let l = Arc::new(l);
            for port in [Port::Dhcp, Port::Pxe] {
                let (this, l, mut stop) = (Arc::clone(&self), Arc::clone(&l), shutdown.clone());
                tasks.spawn(async move {
                    tokio::select! {
                        () = this.receive_loop(&l, port) => {}
                        _ = stop.changed() => {}
                    }
                });
            }
        }
        while tasks.join_next().await.is_some() {}
    }

    async fn receive_loop(&self, l: &Listener, port: Port) {
        let socket = match port {
            Port::Dhcp => &l.dhcp,
            Port::Pxe => &l.pxe,
        };
        let mut buf = vec![0u8; 1500];
        let ctx = Context {
            server: l.ip,
            http_port: self.http_port,
            files: self.files.clone(),
        };
        loop {
            let (n, from) = match socket.recv_from(&mut buf).await {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(error = %e, "dhcp receive error");
                    continue;
                }
            };
            self.stats.received.fetch_add(1, Ordering::Relaxed);
            let Ok(msg) = Message::decode(&mut Decoder::new(&buf[..n])) else {
                self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let reply = match proxy::handle(&msg, port, &ctx) {
                Ok(r) => r,
                Err(why) => {
                    self.stats.ignored.fetch_add(1, Ordering::Relaxed);
                    tracing::trace!(?why, iface = %l.iface, "dhcp request left to the DHCP server");
                    continue;
                }
            };
            if let (Some(b), SocketAddr::V4(source)) = (&self.bindings, from)
                && let Some(ip) = proxy::client_address(&msg, *source.ip())
            {
                b.learn(
                    ip.into(),
                    reply.client.mac,
                    BindingSource::Dhcp,
                    Timestamp::now(),
                );
            }
            let mut out = Vec::with_capacity(600);
            if reply.message.encode(&mut Encoder::new(&mut out)).is_err() {
                continue;
            }
            let to = match reply.to {
                Destination::Relay(relay) => {
                    SocketAddr::V4(SocketAddrV4::new(relay, PORT_DHCP_SERVER))
                }
                Destination::Source => from,
                Destination::Broadcast => {
                    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::BROADCAST, self.client_port))
                }
            };
            match socket.send_to(&out, to).await {
                Ok(_) => {
                    self.stats.replies.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => tracing::debug!(error = %e, %to, "dhcp send failed"),
            }
            tracing::debug!(mac = %reply.client.mac, iface = %l.iface, file = %reply.boot_file, "proxyDHCP answered");
            self.record(&reply, l).await;
        }
    }

    /// Records the client as seen and puts the exchange on its timeline.
    async fn record(&self, reply: &proxy::Reply, l: &Listener) {
        let c = &reply.client;
        let detail = format!(
            "proxyDHCP on {}: {} (arch {}), boot file {}",
            l.iface,
            if c.ipxe { "iPXE" } else { "firmware" },
            c.arch.map_or_else(|| "-".to_owned(), |a| a.0.to_string()),
            reply.boot_file
        );
        let kind = if reply.is_ack() {
            "dhcp_pxe_ack"
        } else {
            "dhcp_proxy_offer"
        };
        let at = Timestamp::now();
        let sighting = Sighting {
            mac: c.mac,
            at,
            arch: c.arch.and_then(crate::dhcp::pxe::ClientArch::arch),
            ip: None,
            vendor_class: c.vendor_class.clone(),
        };
        let event = NewBootEvent {
            mac: c.mac,
            at,
            source: EventSource::Dhcp,
            kind: kind.into(),
            detail,
            ip: None,
        };
        timeline::record(Arc::clone(&self.store), sighting, event).await;
    }
}
