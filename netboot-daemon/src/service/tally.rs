//! Userspace accounting: what netbootd's own servers moved, per client, when the eBPF
//! program is not loaded (no `ebpf.interfaces`, no privilege, a kernel that refuses it).
//!
//! The servers report what crossed their sockets: DHCP datagrams under the request's
//! `chaddr`, TFTP transfers when they end, and HTTP and iSCSI connections as their bytes
//! move (through [`Counted`], flushed at least every [`FLUSH_BYTES`] and every
//! [`FLUSH_EVERY`]). A client address is turned into a MAC through the daemon's
//! [`Bindings`] (DHCP leases, MACs in request paths, iSCSI initiator names) and, for
//! on-link clients, the kernel's neighbour table; bytes of an address with neither are
//! unattributed. A connection looks its client up at each flush until it is found (the
//! neighbour table, a file read, only at the first), and keeps it from then on, so the
//! data path reads no file once the client is known. For its first
//! [`ATTRIBUTION_GRACE`] it keeps bytes it cannot attribute yet instead of flushing them
//! as unattributed: the binding that names its client may come from the connection's own
//! first request (an iSCSI login), learned a moment later on another thread.
//!
//! These are socket payload bytes (UDP payload, TCP stream bytes), not wire bytes: no
//! Ethernet, IP or TCP headers, no retransmitted TCP segments, nothing netbootd did not
//! itself send or receive. Every figure built from them says `source="userspace"`.
//! Packets are datagrams for the UDP services; TCP has no packets a socket can see, so
//! HTTP and iSCSI rows count 0 packets.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::bindings::{self, Bindings};
use crate::ebpf::{Direction, MacCounters, Method, Service, UnattributedCounters};
use crate::mac::MacAddr;

/// A connection's bytes are added to the client's row at least this often...
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// ...and whenever this many have accumulated, once the client is known or the
/// connection is older than this; until then, and at its end, bytes wait for the client.
pub const FLUSH_BYTES: u64 = 256 * 1024;
/// How long a new connection's bytes wait for a binding before they count as unattributed.
pub const ATTRIBUTION_GRACE: Duration = Duration::from_secs(5);

type Key = (MacAddr, Method, Service, Direction);

/// Frames and bytes.
#[derive(Debug, Clone, Copy, Default)]
struct Pair {
    packets: u64,
    bytes: u64,
}

impl Pair {
    fn add(&mut self, packets: u64, bytes: u64) {
        self.packets = self.packets.saturating_add(packets);
        self.bytes = self.bytes.saturating_add(bytes);
    }
}

/// One open TCP connection as the tally knows it.
#[derive(Debug, Clone, Copy)]
pub struct Connection {
    /// `http` or `iscsi`.
    pub service: Service,
    /// The client's address and port.
    pub client: SocketAddr,
    /// netbootd's address and port.
    pub server: SocketAddr,
    /// The client, once its address could be attributed.
    pub mac: Option<MacAddr>,
    /// Stream bytes from the client, flushed so far.
    pub rx_bytes: u64,
    /// Stream bytes to the client, flushed so far.
    pub tx_bytes: u64,
    /// When bytes last moved.
    pub last: Instant,
}

/// The userspace counters (see the module documentation).
#[derive(Debug)]
pub struct Tally {
    bindings: Arc<Bindings>,
    rows: Mutex<HashMap<Key, Pair>>,
    unattributed: Mutex<HashMap<(Service, Direction), Pair>>,
    connections: Mutex<HashMap<u64, Connection>>,
    next_connection: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Tally {
    /// Counters that attribute addresses through `bindings`.
    pub fn new(bindings: Arc<Bindings>) -> Self {
        Self {
            bindings,
            rows: Mutex::new(HashMap::new()),
            unattributed: Mutex::new(HashMap::new()),
            connections: Mutex::new(HashMap::new()),
            next_connection: AtomicU64::new(1),
        }
    }

    /// Counts traffic of the client whose hardware address the packet itself carries
    /// (a DHCP `chaddr`).
    pub fn count_mac(
        &self,
        mac: MacAddr,
        service: Service,
        direction: Direction,
        packets: u64,
        bytes: u64,
    ) {
        lock(&self.rows)
            .entry((mac, Method::Chaddr, service, direction))
            .or_default()
            .add(packets, bytes);
    }

    /// Counts traffic of the client at `ip`; returns the MAC it was attributed to.
    pub fn count_ip(
        &self,
        ip: IpAddr,
        service: Service,
        direction: Direction,
        packets: u64,
        bytes: u64,
    ) -> Option<MacAddr> {
        let found = self.attribute(ip, true);
        self.add(found, service, direction, packets, bytes);
        found.map(|(mac, _)| mac)
    }

    /// The client at `ip`: its learned binding, else, with `neighbours`, the kernel's
    /// neighbour table.
    fn attribute(&self, ip: IpAddr, neighbours: bool) -> Option<(MacAddr, Method)> {
        let binding = if neighbours {
            self.bindings.lookup(ip)
        } else {
            self.bindings.learned(ip)
        };
        binding.map(|b| {
            let method = match b.source {
                // The neighbour table: the client is on-link, its frames carry its MAC.
                bindings::Source::Neighbour => Method::L2,
                _ => Method::Binding,
            };
            (b.mac, method)
        })
    }

    fn add(
        &self,
        found: Option<(MacAddr, Method)>,
        service: Service,
        direction: Direction,
        packets: u64,
        bytes: u64,
    ) {
        if packets == 0 && bytes == 0 {
            return;
        }
        match found {
            Some((mac, method)) => lock(&self.rows)
                .entry((mac, method, service, direction))
                .or_default()
                .add(packets, bytes),
            None => lock(&self.unattributed)
                .entry((service, direction))
                .or_default()
                .add(packets, bytes),
        }
    }

    /// Every client row, in the kernel table's shape (interface index 0: all of them).
    pub fn rows(&self) -> Vec<MacCounters> {
        lock(&self.rows)
            .iter()
            .map(|(&(mac, method, service, direction), p)| MacCounters {
                mac,
                method,
                ifindex: 0,
                direction,
                service,
                packets: p.packets,
                bytes: p.bytes,
            })
            .collect()
    }

    /// Bytes of addresses no MAC could be found for (interface index 0).
    pub fn unattributed(&self) -> Vec<UnattributedCounters> {
        lock(&self.unattributed)
            .iter()
            .map(|(&(service, direction), p)| UnattributedCounters {
                ifindex: 0,
                direction,
                service,
                packets: p.packets,
                bytes: p.bytes,
            })
            .collect()
    }

    /// The open connections.
    pub fn connections(&self) -> Vec<Connection> {
        lock(&self.connections).values().copied().collect()
    }

    fn open(&self, service: Service, client: SocketAddr, server: SocketAddr) -> u64 {
        let id = self.next_connection.fetch_add(1, Ordering::Relaxed);
        lock(&self.connections).insert(
            id,
            Connection {
                service,
                client,
                server,
                mac: None,
                rx_bytes: 0,
                tx_bytes: 0,
                last: Instant::now(),
            },
        );
        id
    }

    /// Adds a connection's pending bytes: to the rows of its client `found` and to its own
    /// figures.
    fn flush(&self, id: u64, service: Service, found: Option<(MacAddr, Method)>, rx: u64, tx: u64) {
        self.add(found, service, Direction::Ingress, 0, rx);
        self.add(found, service, Direction::Egress, 0, tx);
        if let Some(c) = lock(&self.connections).get_mut(&id) {
            c.mac = found.map(|(mac, _)| mac);
            c.rx_bytes += rx;
            c.tx_bytes += tx;
            c.last = Instant::now();
        }
    }

    fn close(&self, id: u64) {
        lock(&self.connections).remove(&id);
    }
}

/// A TCP stream whose bytes are counted for its client (see the module documentation).
/// Without a tally it only passes the bytes through.
#[derive(Debug)]
pub struct Counted<S> {
    inner: S,
    meter: Option<Meter>,
}

#[derive(Debug)]
struct Meter {
    tally: Arc<Tally>,
    id: u64,
    service: Service,
    client: IpAddr,
    /// The client once found; looked up at each flush until then (so that a binding
    /// learned from the connection's own request counts).
    found: Option<(MacAddr, Method)>,
    /// Whether the neighbour table was read for it already.
    neighbours_read: bool,
    rx: u64,
    tx: u64,
    flushed: Instant,
    opened: Instant,
}

impl Meter {
    fn moved(&mut self, rx: usize, tx: usize) {
        self.rx += rx as u64;
        self.tx += tx as u64;
        if self.rx + self.tx >= FLUSH_BYTES || self.flushed.elapsed() >= FLUSH_EVERY {
            self.flush(false);
        }
    }

    /// Adds the pending bytes to the client's row; before the connection's `end`, bytes
    /// of a client not found yet wait while the connection is younger than
    /// [`ATTRIBUTION_GRACE`].
    fn flush(&mut self, end: bool) {
        self.flushed = Instant::now();
        if self.rx + self.tx == 0 {
            return;
        }
        if self.found.is_none() {
            self.found = self.tally.attribute(self.client, !self.neighbours_read);
            self.neighbours_read = true;
        }
        if self.found.is_none() && !end && self.opened.elapsed() < ATTRIBUTION_GRACE {
            return;
        }
        self.tally
            .flush(self.id, self.service, self.found, self.rx, self.tx);
        self.rx = 0;
        self.tx = 0;
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        self.flush(true);
        self.tally.close(self.id);
    }
}

impl<S> Counted<S> {
    /// `inner`, a connection of `service` between `client` and `server`, counted in
    /// `tally` when there is one.
    pub fn new(
        inner: S,
        tally: Option<&Arc<Tally>>,
        service: Service,
        client: SocketAddr,
        server: SocketAddr,
    ) -> Self {
        let meter = tally.map(|tally| Meter {
            id: tally.open(service, client, server),
            tally: Arc::clone(tally),
            service,
            client: client.ip(),
            found: None,
            neighbours_read: false,
            rx: 0,
            tx: 0,
            flushed: Instant::now(),
            opened: Instant::now(),
        });
        Self { inner, meter }
    }

    /// The stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Counts bytes that moved on the connection outside the `AsyncRead`/`AsyncWrite`
    /// methods: a driver that does its own socket I/O (io_uring) keeps a `Counted<()>`
    /// per connection and reports each completed receive and send here.
    pub fn moved(&mut self, rx: usize, tx: usize) {
        if let Some(m) = &mut self.meter {
            m.moved(rx, tx);
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let (Poll::Ready(Ok(())), Some(m)) = (&r, &mut this.meter) {
            m.moved(buf.filled().len() - before, 0);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let (Poll::Ready(Ok(n)), Some(m)) = (&r, &mut this.meter) {
            m.moved(0, *n);
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let (Poll::Ready(Ok(n)), Some(m)) = (&r, &mut this.meter) {
            m.moved(0, *n);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// The HTTP listener: every accepted connection is [`Counted`] as `http`.
#[derive(Debug)]
pub struct CountedListener {
    inner: tokio::net::TcpListener,
    tally: Option<Arc<Tally>>,
}

impl CountedListener {
    /// Counts the connections of `inner` in `tally`, when there is one.
    pub fn new(inner: tokio::net::TcpListener, tally: Option<Arc<Tally>>) -> Self {
        Self { inner, tally }
    }
}

impl axum::serve::Listener for CountedListener {
    type Io = Counted<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, peer)) => {
                    let local = stream.local_addr().unwrap_or(peer);
                    let io = Counted::new(stream, self.tally.as_ref(), Service::Http, peer, local);
                    return (io, peer);
                }
                // As axum's own TcpListener: per-connection errors (the peer reset before
                // the accept) are skipped; running out of descriptors is waited out.
                Err(error) => {
                    tracing::debug!(%error, "HTTP accept failed");
                    if !matches!(
                        error.kind(),
                        io::ErrorKind::ConnectionRefused
                            | io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::ConnectionReset
                    ) {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::Timestamp;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn mac(last: u8) -> MacAddr {
        MacAddr([2, 0, 0, 0, 0, last])
    }

    #[test]
    fn addresses_are_attributed_through_bindings_or_left_unattributed() {
        let bindings = Arc::new(Bindings::default());
        let ip: IpAddr = "192.0.2.10".parse().expect("ip");
        bindings.learn(ip, mac(1), bindings::Source::Dhcp, Timestamp::now());
        let t = Tally::new(Arc::clone(&bindings));
        assert_eq!(
            t.count_ip(ip, Service::Tftp, Direction::Egress, 3, 1500),
            Some(mac(1))
        );
        t.count_mac(mac(2), Service::Dhcp, Direction::Ingress, 1, 300);
        // TEST-NET-3 is in no binding and in no neighbour table.
        let stranger: IpAddr = "203.0.113.7".parse().expect("ip");
        assert_eq!(
            t.count_ip(stranger, Service::Http, Direction::Ingress, 0, 77),
            None
        );
        let mut rows = t.rows();
        rows.sort_by_key(|r| r.mac);
        assert_eq!(rows.len(), 2);
        assert_eq!(
            (rows[0].mac, rows[0].method, rows[0].packets, rows[0].bytes),
            (mac(1), Method::Binding, 3, 1500)
        );
        assert_eq!(
            (rows[1].mac, rows[1].method, rows[1].bytes),
            (mac(2), Method::Chaddr, 300)
        );
        let u = t.unattributed();
        assert_eq!(u.len(), 1);
        assert_eq!((u[0].service, u[0].bytes), (Service::Http, 77));
    }

    #[tokio::test]
    async fn a_counted_stream_counts_both_directions_and_leaves_the_table_when_dropped() {
        let bindings = Arc::new(Bindings::default());
        let tally = Arc::new(Tally::new(Arc::clone(&bindings)));
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let client: SocketAddr = "192.0.2.20:40000".parse().expect("addr");
        let server: SocketAddr = "192.0.2.1:80".parse().expect("addr");
        bindings.learn(
            client.ip(),
            mac(3),
            bindings::Source::Http,
            Timestamp::now(),
        );
        let mut s = Counted::new(a, Some(&tally), Service::Http, client, server);
        assert_eq!(tally.connections().len(), 1);
        b.write_all(&[7u8; 1000]).await.expect("write");
        let mut got = [0u8; 1000];
        s.read_exact(&mut got).await.expect("read");
        // More than FLUSH_BYTES: flushed while the connection is open.
        let big = vec![1u8; FLUSH_BYTES as usize + 10];
        s.write_all(&big).await.expect("write");
        let c = tally.connections()[0];
        assert_eq!(c.mac, Some(mac(3)));
        assert_eq!(c.rx_bytes + c.tx_bytes, 1000 + big.len() as u64);
        drop(s);
        assert!(tally.connections().is_empty());
        let rows = tally.rows();
        let sum = |d| {
            rows.iter()
                .filter(|r| r.direction == d)
                .map(|r| r.bytes)
                .sum::<u64>()
        };
        assert_eq!(sum(Direction::Ingress), 1000);
        assert_eq!(sum(Direction::Egress), big.len() as u64);
    }
}
