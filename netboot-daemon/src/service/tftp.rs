//! The TFTP service: what both TFTP drivers share and that is not I/O.
//!
//! [`Tftp`] holds the admission state ([`crate::tftp::server::Server`]), resolves and opens
//! files inside the served directory (the path jail, optional case-insensitive lookup),
//! keeps a cache of hot files in memory, builds the [`Transfer`] of each admitted request
//! and keeps the counters ([`Stats`]). The drivers own the sockets, the file reads and the
//! timers: [`crate::driver::tokio`] (tokio tasks) and [`crate::driver::uring`] (one
//! io_uring on a dedicated thread).
//!
//! All protocol decisions are the core's ([`crate::tftp`]); this module and the drivers
//! only move bytes between sockets, files and the core, and count.
//!
//! A driver's call order for one request: [`Tftp::handle_request`] on the datagram that
//! arrived on the listening port; on [`Request::Start`], [`Tftp::open`] (blocking: jail,
//! `open`, `fstat`, cache lookup), then [`Tftp::new_transfer`]; feed the transfer, and at
//! its end call [`Tftp::finished`] exactly once.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use crate::config::TftpConfig;
use crate::jail::{self, JailError};
use crate::tftp::server::{Admitted, Decision, Limits, Server, error_packet};
use crate::tftp::transfer::{self, Event, ReadRequest, Transfer};
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
    /// Sends that carried several datagrams at once with UDP GSO (io_uring driver).
    pub gso_sends: AtomicU64,
    /// Datagrams sent inside those GSO sends.
    pub gso_segments: AtomicU64,
}

/// The bytes of a file being sent.
#[derive(Debug, Clone)]
pub(crate) enum Source {
    /// The whole file, in memory (from the cache).
    Memory(Arc<[u8]>),
    /// An open file and its length at open time.
    File(Arc<File>, u64),
}

impl Source {
    /// Length of the file.
    pub(crate) fn len(&self) -> u64 {
        match self {
            Self::Memory(b) => b.len() as u64,
            Self::File(_, len) => *len,
        }
    }
}

/// The bytes `r` asks for out of `data` (fewer at the end, empty past it).
pub(crate) fn slice_of(data: &[u8], r: ReadRequest) -> &[u8] {
    let start = usize::try_from(r.offset)
        .unwrap_or(usize::MAX)
        .min(data.len());
    let end = start.saturating_add(r.len).min(data.len());
    &data[start..end]
}

struct Cached {
    modified: SystemTime,
    data: Arc<[u8]>,
    last_used: Instant,
}

#[derive(Default)]
struct CacheState {
    entries: HashMap<PathBuf, Cached>,
    /// Files being read into the cache right now, so that one reader fills each.
    filling: HashSet<PathBuf>,
}

/// Whole files kept in memory: iPXE binaries and kernels are fetched by every client.
struct FileCache {
    max_file: u64,
    max_total: u64,
    state: Mutex<CacheState>,
}

impl FileCache {
    fn lock(&self) -> MutexGuard<'_, CacheState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn get(&self, path: &Path, meta: &std::fs::Metadata) -> Option<Arc<[u8]>> {
        let modified = meta.modified().ok()?;
        let mut state = self.lock();
        let e = state.entries.get_mut(path)?;
        if e.modified == modified && e.data.len() as u64 == meta.len() {
            e.last_used = Instant::now();
            Some(Arc::clone(&e.data))
        } else {
            state.entries.remove(path);
            None
        }
    }

    fn insert(&self, path: PathBuf, modified: SystemTime, data: Arc<[u8]>) {
        let mut state = self.lock();
        state.entries.insert(
            path,
            Cached {
                modified,
                data,
                last_used: Instant::now(),
            },
        );
        let mut total: u64 = state.entries.values().map(|e| e.data.len() as u64).sum();
        while total > self.max_total {
            let Some(oldest) = state
                .entries
                .iter()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(p, _)| p.clone())
            else {
                break;
            };
            if let Some(e) = state.entries.remove(&oldest) {
                total -= e.data.len() as u64;
            }
        }
    }
}

/// A file that is being read for a transfer and will go into the cache once all of it
/// has been read in order. Dropping it unfinished lets another transfer fill the cache.
pub(crate) struct CacheFill {
    cache: Arc<FileCache>,
    path: PathBuf,
    modified: SystemTime,
    len: u64,
    data: Vec<u8>,
}

impl std::fmt::Debug for CacheFill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheFill")
            .field("len", &self.len)
            .field("have", &self.data.len())
            .finish_non_exhaustive()
    }
}

impl CacheFill {
    /// The file's length at open time.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Records the bytes read at `offset`; false if they do not continue what was
    /// collected (then the fill is useless and should be dropped).
    pub(crate) fn push(&mut self, offset: u64, bytes: &[u8]) -> bool {
        if offset != self.data.len() as u64
            || self.data.len() as u64 + bytes.len() as u64 > self.len
        {
            return false;
        }
        self.data.extend_from_slice(bytes);
        true
    }

    /// True once the whole file has been collected.
    pub(crate) fn is_complete(&self) -> bool {
        self.data.len() as u64 == self.len
    }

    /// Puts the collected file into the cache (if complete) and returns it.
    pub(crate) fn finish(mut self) -> Option<Arc<[u8]>> {
        if !self.is_complete() {
            return None;
        }
        let data: Arc<[u8]> = std::mem::take(&mut self.data).into();
        self.cache
            .insert(self.path.clone(), self.modified, Arc::clone(&data));
        Some(data)
    }
}

impl Drop for CacheFill {
    fn drop(&mut self) {
        self.cache.lock().filling.remove(&self.path);
    }
}

/// A file opened for a transfer.
#[derive(Debug)]
pub(crate) struct Opened {
    /// Where its bytes come from.
    pub(crate) source: Source,
    /// Set when the file is small enough for the cache, not yet in it, and no other
    /// transfer is filling it: the driver collects what it reads into it.
    pub(crate) fill: Option<CacheFill>,
}

/// What a driver does with a datagram that arrived on the listening port (already
/// counted and logged).
#[derive(Debug)]
pub(crate) enum Request {
    /// Open the file ([`Tftp::open`]) and start a transfer; call [`Tftp::finished`] at
    /// its end.
    Start(Admitted),
    /// Send this ERROR packet to the sender from the listening port.
    Reply(Vec<u8>),
    /// Nothing to do.
    Ignore,
}

/// How a transfer ended, as the driver saw it.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// The core finished it.
    Event(Event),
    /// The file could not be opened (the ERROR was sent and counted).
    Refused,
    /// The socket failed (e.g. `ECONNREFUSED`: the client's port is gone).
    Io(io::Error),
}

/// The TFTP service.
pub struct Tftp {
    root: PathBuf,
    core: transfer::Config,
    admission: Mutex<Server>,
    cache: Arc<FileCache>,
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
            cache: Arc::new(FileCache {
                max_file: cfg.cache_file_max_mib << 20,
                max_total: cfg.cache_total_mib << 20,
                state: Mutex::new(CacheState::default()),
            }),
            case_insensitive: cfg.case_insensitive,
            stats: Stats::default(),
        }
    }

    fn admission(&self) -> MutexGuard<'_, Server> {
        self.admission
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs admission on a datagram from `peer` to the listening port, and counts.
    pub(crate) fn handle_request(
        &self,
        now: Instant,
        peer: SocketAddr,
        datagram: &[u8],
    ) -> Request {
        let decision = self.admission().handle_request(now, peer, datagram);
        match decision {
            Decision::Start(req) => {
                self.stats.started.fetch_add(1, Ordering::Relaxed);
                Request::Start(req)
            }
            Decision::Refuse { packet, reason } => {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%peer, reason, "tftp request refused");
                Request::Reply(packet)
            }
            Decision::Drop(why) => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::trace!(%peer, reason = why.as_str(), "tftp datagram dropped");
                Request::Ignore
            }
        }
    }

    /// Resolves a request inside the root and opens it (blocking: path lookup, `open`,
    /// `fstat`, no file data is read). On failure the returned ERROR packet is for the
    /// client, and the refusal is counted.
    pub(crate) fn open(&self, filename: &str) -> Result<Opened, Vec<u8>> {
        let (path, file, meta) = self.resolve(filename).map_err(|e| {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            let (code, msg) = match e {
                OpenError::NotFound => (ErrorCode::FILE_NOT_FOUND, "file not found"),
                OpenError::Denied => (ErrorCode::ACCESS_VIOLATION, "access violation"),
            };
            error_packet(code, msg)
        })?;
        let len = meta.len();
        let file = Source::File(Arc::new(file), len);
        if len > self.cache.max_file {
            return Ok(Opened {
                source: file,
                fill: None,
            });
        }
        if let Some(data) = self.cache.get(&path, &meta) {
            self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(Opened {
                source: Source::Memory(data),
                fill: None,
            });
        }
        let fill = match meta.modified() {
            Ok(modified) if self.cache.lock().filling.insert(path.clone()) => Some(CacheFill {
                cache: Arc::clone(&self.cache),
                path,
                modified,
                len,
                data: Vec::with_capacity(usize::try_from(len).unwrap_or(0)),
            }),
            _ => None,
        };
        Ok(Opened { source: file, fill })
    }

    fn resolve(&self, name: &str) -> Result<(PathBuf, File, std::fs::Metadata), OpenError> {
        let path = match jail::resolve(&self.root, name) {
            Ok(p) => p,
            Err(JailError::NotFound) if self.case_insensitive => {
                resolve_case_insensitive(&self.root, name)?
            }
            Err(JailError::NotFound) => return Err(OpenError::NotFound),
            Err(_) => return Err(OpenError::Denied),
        };
        let file = File::open(&path).map_err(|_| OpenError::NotFound)?;
        let meta = file.metadata().map_err(|_| OpenError::NotFound)?;
        if !meta.is_file() {
            return Err(OpenError::NotFound);
        }
        Ok((path, file, meta))
    }

    /// Negotiates the options of `req` and starts its transfer of `source`.
    pub(crate) fn new_transfer(&self, now: Instant, req: &Admitted, source: &Source) -> Transfer {
        let size = source.len();
        let neg = transfer::negotiate(
            &req.as_request(),
            &self.core,
            (req.mode == Mode::Octet).then_some(size),
        );
        Transfer::new(now, &neg, req.mode, Some(size), &self.core)
    }

    /// Records the end of the transfer to `peer` (admitted by [`Tftp::handle_request`]).
    pub(crate) fn finished(&self, now: Instant, peer: SocketAddr, outcome: Outcome) {
        self.admission().finished(now, peer);
        match outcome {
            Outcome::Event(Event::Done(s)) => {
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
            Outcome::Event(Event::Failed(why, s)) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                self.stats.bytes.fetch_add(s.bytes, Ordering::Relaxed);
                tracing::debug!(?why, bytes = s.bytes, "tftp transfer failed");
            }
            Outcome::Refused => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("tftp transfer refused");
            }
            Outcome::Io(error) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%error, "tftp transfer ended");
            }
        }
    }
}

/// The address transfer sockets bind to: the listener's, unless it is a wildcard.
pub(crate) fn transfer_ip(listener: SocketAddr) -> IpAddr {
    match listener {
        a if !a.ip().is_unspecified() => a.ip(),
        SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    }
}

/// Why a request could not be opened, as the client will hear it.
#[derive(Debug)]
enum OpenError {
    NotFound,
    Denied,
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
