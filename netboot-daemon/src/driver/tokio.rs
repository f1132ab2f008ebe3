//! The TFTP driver on tokio: one task per transfer, each with its own connected socket.
//!
//! It serves development, tests and the fallback when io_uring is not available
//! ([`super::uring`] is the default). The shared, non-I/O parts are in
//! [`crate::service::tftp`].

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::Instrument as _;

use crate::driver::reply_address;
use crate::service::tftp::{
    Opened, Outcome, Request, Source, Tftp, send_error_ends_transfer, transfer_ip,
};
use crate::tftp::server::Admitted;
use crate::tftp::transfer::Event;
use crate::tftp::wire::is_request;

/// Serves requests arriving on `listener` until `shutdown` turns true; running transfers
/// are then abandoned.
pub async fn serve(tftp: Arc<Tftp>, listener: UdpSocket, mut shutdown: watch::Receiver<bool>) {
    let listener = Arc::new(listener);
    let local_ip = listener
        .local_addr()
        .map_or(IpAddr::from([0, 0, 0, 0]), transfer_ip);
    let mut transfers = JoinSet::new();
    // Single-port mode: where the listener's datagrams for running transfers go, by client
    // address, with the number of the transfer that owns the entry.
    let mut routes: HashMap<SocketAddr, (u64, mpsc::Sender<Vec<u8>>)> = HashMap::new();
    let mut next_id = 0u64;
    let mut buf = vec![0u8; 2048];
    loop {
        tokio::select! {
            r = listener.recv_from(&mut buf) => {
                let (n, peer) = match r {
                    Ok(x) => x,
                    Err(error) => {
                        // ICMP errors from earlier replies surface here; they are not fatal.
                        tracing::debug!(%error, "tftp listener receive error");
                        continue;
                    }
                };
                if let Some((_, route)) = routes.get(&peer)
                    && !is_request(&buf[..n])
                {
                    // A full queue loses the datagram, as a full socket buffer would.
                    let _ = route.try_send(buf[..n].to_vec());
                    continue;
                }
                match tftp.handle_request(Instant::now(), peer, &buf[..n]) {
                    Request::Start(req) => {
                        let span = tracing::debug_span!("tftp", %peer, file = %req.filename);
                        let tftp = Arc::clone(&tftp);
                        let listener = Arc::clone(&listener);
                        next_id += 1;
                        let id = next_id;
                        let inbox = tftp.single_port().then(|| {
                            let (tx, rx) = mpsc::channel(ROUTE_QUEUE);
                            routes.insert(peer, (id, tx));
                            rx
                        });
                        transfers.spawn(
                            async move {
                                let outcome =
                                    run_transfer(&tftp, local_ip, &req, &listener, inbox).await;
                                tftp.finished(Instant::now(), req.peer, outcome);
                                (req.peer, id)
                            }
                            .instrument(span),
                        );
                    }
                    Request::Reply(packet) => {
                        let _ = listener.send_to(&packet, peer).await;
                    }
                    Request::Ignore => {}
                }
            }
            Some(ended) = transfers.join_next(), if !transfers.is_empty() => {
                // The client may have started its next transfer already: only the ended
                // transfer's own route goes.
                if let Ok((peer, id)) = ended
                    && routes.get(&peer).is_some_and(|(owner, _)| *owner == id)
                {
                    routes.remove(&peer);
                }
            }
            _ = shutdown.changed() => break,
        }
    }
    transfers.abort_all();
    while transfers.join_next().await.is_some() {}
}

/// Opens the file on the blocking pool; reads a file meant for the cache whole.
async fn open(
    tftp: &Arc<Tftp>,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    filename: &str,
) -> Result<Source, Vec<u8>> {
    let t = Arc::clone(tftp);
    let name = filename.to_owned();
    let opened = tokio::task::spawn_blocking(move || t.open(peer, local, &name))
        .await
        .map_err(|_| Vec::new())??;
    let Opened { source, fill } = opened;
    let Some(fill) = fill else {
        return Ok(source);
    };
    let len = usize::try_from(fill.len()).unwrap_or(0);
    let read = tokio::task::spawn_blocking(move || {
        read_at(fill.file(), 0, len).map(|data| {
            fill.read(data.len());
            fill.finish(data)
        })
    })
    .await;
    // A file that could not be read whole is sent from disk, like a large one.
    Ok(match read {
        Ok(Ok(Some(data))) => {
            // Sent from memory, as the transfers that find it in the cache are.
            tftp.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
            Source::Memory(data)
        }
        _ => source,
    })
}

/// Reads up to `len` bytes at `offset` (fewer only at end of file).
fn read_at(file: &std::fs::File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt as _;
    let mut v = vec![0u8; len];
    let mut got = 0;
    while got < v.len() {
        match file.read_at(&mut v[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    v.truncate(got);
    Ok(v)
}

/// Datagrams a single-port transfer's queue holds before the serving loop drops more.
const ROUTE_QUEUE: usize = 64;

/// Where a transfer's datagrams come from and go to.
enum Endpoint {
    /// Its own socket, connected to the client.
    Own(UdpSocket),
    /// Single-port mode: the listener, and what the serving loop routes to the transfer.
    Shared {
        listener: Arc<UdpSocket>,
        peer: SocketAddr,
        inbox: mpsc::Receiver<Vec<u8>>,
    },
}

impl Endpoint {
    async fn send(&self, data: &[u8]) -> io::Result<usize> {
        match self {
            Self::Own(s) => s.send(data).await,
            Self::Shared { listener, peer, .. } => listener.send_to(data, *peer).await,
        }
    }

    /// The next datagram (cancel-safe, for `select!`).
    async fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Own(s) => s.recv(buf).await,
            Self::Shared { inbox, .. } => match inbox.recv().await {
                Some(d) => {
                    let n = d.len().min(buf.len());
                    buf[..n].copy_from_slice(&d[..n]);
                    Ok(n)
                }
                // The serving loop has stopped; it aborts this task.
                None => std::future::pending().await,
            },
        }
    }
}

async fn run_transfer(
    tftp: &Arc<Tftp>,
    local_ip: IpAddr,
    req: &Admitted,
    listener: &Arc<UdpSocket>,
    inbox: Option<mpsc::Receiver<Vec<u8>>>,
) -> Outcome {
    // The transfer's own socket first: its address is the one the client reaches us at,
    // which a generated file may name. In single-port mode that is the listener's port at
    // the address the kernel answers this client from.
    let (socket, local) = match inbox {
        Some(inbox) => {
            let local = listener
                .local_addr()
                .ok()
                .map(|l| reply_address(l, req.peer));
            let shared = Endpoint::Shared {
                listener: Arc::clone(listener),
                peer: req.peer,
                inbox,
            };
            (shared, local)
        }
        None => match bind_connected(local_ip, req.peer).await {
            Ok(s) => {
                let local = s.local_addr().ok();
                (Endpoint::Own(s), local)
            }
            Err(e) => return Outcome::Io(e),
        },
    };
    let source = match open(tftp, req.peer, local, &req.filename).await {
        Ok(s) => s,
        Err(packet) => {
            if !packet.is_empty() {
                let _ = listener.send_to(&packet, req.peer).await;
            }
            return Outcome::Refused;
        }
    };
    match drive(tftp, socket, local, req, source).await {
        Ok(ev) => Outcome::Event(ev),
        Err(e) => Outcome::Io(e),
    }
}

async fn bind_connected(local_ip: IpAddr, peer: SocketAddr) -> io::Result<UdpSocket> {
    let socket = UdpSocket::bind(SocketAddr::new(local_ip, 0)).await?;
    socket.connect(peer).await?;
    Ok(socket)
}

async fn drive(
    tftp: &Tftp,
    mut socket: Endpoint,
    local: Option<SocketAddr>,
    req: &Admitted,
    mut source: Source,
) -> io::Result<Event> {
    let mut t = tftp.new_transfer(req, &source, local);
    let mut out = vec![0u8; t.buffer_len()];
    let mut inp = vec![0u8; 1024];
    loop {
        while let Some((file, r)) = source.feed(&mut t) {
            let data = tokio::task::spawn_blocking(move || read_at(&file, r.offset, r.len))
                .await
                .map_err(io::Error::other)?;
            if let Ok(d) = &data {
                tftp.stats
                    .file_read_bytes
                    .fetch_add(d.len() as u64, Ordering::Relaxed);
            }
            t.handle_read(data.map(Bytes::from).map_err(|_| ()));
        }
        while let Some(n) = t.poll_transmit(Instant::now(), &mut out) {
            if let Err(e) = socket.send(&out[..n]).await {
                if e.raw_os_error().is_some_and(send_error_ends_transfer) {
                    return Err(e);
                }
                tracing::debug!(error = %e, "tftp send failed");
            }
        }
        if let Some(ev) = t.poll_event() {
            return Ok(ev);
        }
        let deadline = t.poll_timeout();
        tokio::select! {
            r = socket.recv(&mut inp) => {
                // ECONNREFUSED: the client's port is gone (ICMP port unreachable).
                let n = r?;
                t.handle_datagram(&inp[..n]);
            }
            () = sleep_until(deadline) => t.handle_timeout(Instant::now()),
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}
