//! The TFTP service on tokio: the listening socket, one connected socket per transfer
//! (its own port, RFC 1350 TID), the path jail and a cache of hot files.
//!
//! All protocol decisions are the core's ([`crate::tftp`]); this module only moves bytes
//! between sockets, files and the core, and keeps the counters.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::Instrument as _;

use crate::config::TftpConfig;
use crate::jail::{self, JailError};
use crate::tftp::server::{Admitted, Decision, Limits, Server, error_packet};
use crate::tftp::transfer::{self, Event, Transfer};
use crate::tftp::wire::{ErrorCode, Mode};

/// Counters of the TFTP service.
#[derive(Debug, Default)]
pub struct Stats {
    /// Transfers started.
    pub started: AtomicU64,
    /// Transfers the client acknowledged completely.
    pub completed: AtomicU64,
    /// Transfers abandoned (timeout, client error, client gone, read error).
    pub failed: AtomicU64,
    /// File bytes acknowledged by clients.
    pub bytes: AtomicU64,
    /// Requests answered with an ERROR (missing file, jail, limits, writes, modes).
    pub refused: AtomicU64,
    /// Datagrams dropped on the listening port (malformed, duplicate, unexpected).
    pub dropped: AtomicU64,
    /// Served from the in-memory cache.
    pub cache_hits: AtomicU64,
}

/// The bytes of a file being sent.
#[derive(Debug, Clone)]
enum Source {
    Memory(Arc<[u8]>),
    File(Arc<std::fs::File>, u64),
}

impl Source {
    fn len(&self) -> u64 {
        match self {
            Self::Memory(b) => b.len() as u64,
            Self::File(_, len) => *len,
        }
    }
}

struct Cached {
    modified: SystemTime,
    data: Arc<[u8]>,
    last_used: Instant,
}

/// Whole files kept in memory: iPXE binaries and kernels are fetched by every client.
struct FileCache {
    max_file: u64,
    max_total: u64,
    entries: Mutex<HashMap<PathBuf, Cached>>,
}

impl FileCache {
    fn get(&self, path: &Path, meta: &std::fs::Metadata) -> Option<Arc<[u8]>> {
        let modified = meta.modified().ok()?;
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let e = entries.get_mut(path)?;
        if e.modified == modified && e.data.len() as u64 == meta.len() {
            e.last_used = Instant::now();
            Some(Arc::clone(&e.data))
        } else {
            entries.remove(path);
            None
        }
    }

    fn insert(&self, path: PathBuf, modified: SystemTime, data: Arc<[u8]>) {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries.insert(
            path,
            Cached {
                modified,
                data,
                last_used: Instant::now(),
            },
        );
        let mut total: u64 = entries.values().map(|e| e.data.len() as u64).sum();
        while total > self.max_total {
            let Some(oldest) = entries
                .iter()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(p, _)| p.clone())
            else {
                break;
            };
            if let Some(e) = entries.remove(&oldest) {
                total -= e.data.len() as u64;
            }
        }
    }
}

/// Why a request could not be opened, as the client will hear it.
#[derive(Debug)]
enum OpenError {
    NotFound,
    Denied,
}

/// The TFTP service.
pub struct Tftp {
    root: PathBuf,
    core: transfer::Config,
    admission: Mutex<Server>,
    cache: FileCache,
    case_insensitive: bool,
    /// Counters.
    pub stats: Stats,
}

impl std::fmt::Debug for Tftp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tftp")
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

impl Tftp {
    /// A service serving `root` as configured.
    pub fn new(cfg: &TftpConfig, root: PathBuf) -> Self {
        let core = transfer::Config {
            max_blksize: cfg.max_blksize,
            max_windowsize: cfg.max_windowsize,
            default_timeout: Duration::from_millis(u64::from(cfg.timeout_ms)),
            max_retries: cfg.max_retries,
            ..transfer::Config::default()
        };
        let limits = Limits {
            max_sessions: cfg.max_sessions,
            per_client: cfg.per_client,
            ..Limits::default()
        };
        Self {
            root,
            core,
            admission: Mutex::new(Server::new(limits)),
            cache: FileCache {
                max_file: cfg.cache_file_max_mib << 20,
                max_total: cfg.cache_total_mib << 20,
                entries: Mutex::new(HashMap::new()),
            },
            case_insensitive: cfg.case_insensitive,
            stats: Stats::default(),
        }
    }

    fn admission(&self) -> std::sync::MutexGuard<'_, Server> {
        self.admission
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Serves requests arriving on `listener` until `shutdown` turns true; running
    /// transfers are then abandoned.
    pub async fn serve(self: Arc<Self>, listener: UdpSocket, mut shutdown: watch::Receiver<bool>) {
        let listener = Arc::new(listener);
        let local_ip = match listener.local_addr() {
            Ok(a) if !a.ip().is_unspecified() => a.ip(),
            Ok(a) if a.is_ipv6() => IpAddr::from([0u16; 8]),
            _ => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        };
        let mut transfers = JoinSet::new();
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
                    let decision = self.admission().handle_request(Instant::now(), peer, &buf[..n]);
                    match decision {
                        Decision::Start(req) => {
                            self.stats.started.fetch_add(1, Ordering::Relaxed);
                            let span = tracing::debug_span!("tftp", %peer, file = %req.filename);
                            let this = Arc::clone(&self);
                            let listener = Arc::clone(&listener);
                            transfers.spawn(async move { this.transfer(local_ip, req, &listener).await }.instrument(span));
                        }
                        Decision::Refuse { packet, reason } => {
                            self.stats.refused.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(%peer, reason, "tftp request refused");
                            let _ = listener.send_to(&packet, peer).await;
                        }
                        Decision::Drop(why) => {
                            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                            tracing::trace!(%peer, reason = why.as_str(), "tftp datagram dropped");
                        }
                    }
                }
                Some(_) = transfers.join_next(), if !transfers.is_empty() => {}
                _ = shutdown.changed() => break,
            }
        }
        transfers.abort_all();
        while transfers.join_next().await.is_some() {}
    }

    /// Resolves a request inside the root and opens it.
    async fn open(&self, filename: &str) -> Result<Source, OpenError> {
        let root = self.root.clone();
        let name = filename.to_owned();
        let ci = self.case_insensitive;
        let resolved = tokio::task::spawn_blocking(
            move || -> Result<(PathBuf, std::fs::File, std::fs::Metadata), OpenError> {
                let path = match jail::resolve(&root, &name) {
                    Ok(p) => p,
                    Err(JailError::NotFound) if ci => resolve_case_insensitive(&root, &name)?,
                    Err(JailError::NotFound) => return Err(OpenError::NotFound),
                    Err(_) => return Err(OpenError::Denied),
                };
                let file = std::fs::File::open(&path).map_err(|_| OpenError::NotFound)?;
                let meta = file.metadata().map_err(|_| OpenError::NotFound)?;
                if !meta.is_file() {
                    return Err(OpenError::NotFound);
                }
                Ok((path, file, meta))
            },
        )
        .await
        .map_err(|_| OpenError::NotFound)??;
        let (path, file, meta) = resolved;
        if meta.len() <= self.cache.max_file {
            if let Some(data) = self.cache.get(&path, &meta) {
                self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
                return Ok(Source::Memory(data));
            }
            let len = meta.len();
            let data = tokio::task::spawn_blocking(move || {
                use std::io::Read as _;
                let mut v = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
                (&file).read_to_end(&mut v).map(|_| v)
            })
            .await
            .map_err(|_| OpenError::NotFound)?
            .map_err(|_| OpenError::NotFound)?;
            let data: Arc<[u8]> = data.into();
            if let Ok(modified) = meta.modified() {
                self.cache.insert(path, modified, Arc::clone(&data));
            }
            return Ok(Source::Memory(data));
        }
        Ok(Source::File(Arc::new(file), meta.len()))
    }

    async fn transfer(&self, local_ip: IpAddr, req: Admitted, listener: &UdpSocket) {
        let peer = req.peer;
        let outcome = self.run_transfer(local_ip, &req, listener).await;
        let now = Instant::now();
        self.admission().finished(now, peer);
        match outcome {
            Ok(Event::Done(s)) => {
                self.stats.completed.fetch_add(1, Ordering::Relaxed);
                self.stats.bytes.fetch_add(s.bytes, Ordering::Relaxed);
                tracing::debug!(
                    bytes = s.bytes,
                    packets = s.packets,
                    retransmits = s.retransmits,
                    ms = s.duration.as_millis() as u64,
                    "tftp transfer done"
                );
            }
            Ok(Event::Failed(why, s)) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                self.stats.bytes.fetch_add(s.bytes, Ordering::Relaxed);
                tracing::debug!(?why, bytes = s.bytes, "tftp transfer failed");
            }
            Err(error) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%error, "tftp transfer ended");
            }
        }
    }

    async fn run_transfer(
        &self,
        local_ip: IpAddr,
        req: &Admitted,
        listener: &UdpSocket,
    ) -> io::Result<Event> {
        let source = match self.open(&req.filename).await {
            Ok(s) => s,
            Err(e) => {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                let (code, msg) = match e {
                    OpenError::NotFound => (ErrorCode::FILE_NOT_FOUND, "file not found"),
                    OpenError::Denied => (ErrorCode::ACCESS_VIOLATION, "access violation"),
                };
                listener.send_to(&error_packet(code, msg), req.peer).await?;
                return Err(io::Error::new(io::ErrorKind::NotFound, msg));
            }
        };
        let size = source.len();
        let neg = transfer::negotiate(
            &req.as_request(),
            &self.core,
            (req.mode == Mode::Octet).then_some(size),
        );
        let socket = UdpSocket::bind(SocketAddr::new(local_ip, 0)).await?;
        socket.connect(req.peer).await?;
        let mut t = Transfer::new(Instant::now(), &neg, req.mode, Some(size), &self.core);
        let mut out = vec![0u8; t.buffer_len()];
        let mut inp = vec![0u8; 1024];
        loop {
            while let Some(r) = t.poll_read() {
                match &source {
                    Source::Memory(data) => {
                        let start = usize::try_from(r.offset)
                            .unwrap_or(usize::MAX)
                            .min(data.len());
                        let end = start.saturating_add(r.len).min(data.len());
                        t.handle_read(Instant::now(), Ok(&data[start..end]));
                    }
                    Source::File(file, _) => {
                        let file = Arc::clone(file);
                        let data = tokio::task::spawn_blocking(move || {
                            use std::os::unix::fs::FileExt as _;
                            let mut v = vec![0u8; r.len];
                            let mut got = 0;
                            while got < v.len() {
                                match file.read_at(&mut v[got..], r.offset + got as u64) {
                                    Ok(0) => break,
                                    Ok(n) => got += n,
                                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                                    Err(e) => return Err(e),
                                }
                            }
                            v.truncate(got);
                            Ok(v)
                        })
                        .await
                        .map_err(io::Error::other)?;
                        t.handle_read(Instant::now(), data.as_deref().map_err(|_| ()));
                    }
                }
            }
            while let Some(n) = t.poll_transmit(Instant::now(), &mut out) {
                socket.send(&out[..n]).await?;
            }
            if let Some(ev) = t.poll_event() {
                return Ok(ev);
            }
            let deadline = t.poll_timeout();
            tokio::select! {
                r = socket.recv(&mut inp) => {
                    // ECONNREFUSED: the client's port is gone (ICMP port unreachable).
                    let n = r?;
                    t.handle_datagram(Instant::now(), &inp[..n]);
                }
                () = sleep_until(deadline) => t.handle_timeout(Instant::now()),
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// Finds `name` under `root` comparing each component case-insensitively (for clients
/// that ask for `PXELINUX.0` or `Boot\BCD`), then jails the result.
fn resolve_case_insensitive(root: &Path, name: &str) -> Result<PathBuf, OpenError> {
    let rel = jail::normalise(name).map_err(|_| OpenError::Denied)?;
    let mut found = String::new();
    let mut dir = root.to_path_buf();
    for part in rel.split('/') {
        let entry = std::fs::read_dir(&dir)
            .map_err(|_| OpenError::NotFound)?
            .filter_map(Result::ok)
            .find(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|n| n.eq_ignore_ascii_case(part))
            })
            .ok_or(OpenError::NotFound)?;
        let n = entry
            .file_name()
            .to_str()
            .ok_or(OpenError::NotFound)?
            .to_owned();
        dir.push(&n);
        if !found.is_empty() {
            found.push('/');
        }
        found.push_str(&n);
    }
    jail::resolve(root, &found).map_err(|e| match e {
        JailError::NotFound => OpenError::NotFound,
        _ => OpenError::Denied,
    })
}
