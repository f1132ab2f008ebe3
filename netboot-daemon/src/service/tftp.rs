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

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::mpsc;
use utoipa::ToSchema;

use crate::bindings::{Bindings, Source as BindingSource};
use crate::config::TftpConfig;
use crate::ebpf::{Direction, Service};
use crate::jail::{self, JailError};
use crate::mac::MacAddr;
use crate::metrics::{DurationHistogram, Exposition, Kind};
use crate::service::tally::Tally;
use crate::tftp::server::{Admitted, Decision, Limits, Server};
use crate::tftp::transfer::{self, Event, Failure, ReadRequest, Transfer};
use crate::tftp::wire::{ErrorCode, Mode, error_packet};
use crate::time::Timestamp;

/// Counters of the TFTP service.
#[derive(Debug, Default)]
pub struct Stats {
    /// Transfers started: admitted, and their file opened (or generated).
    pub started: AtomicU64,
    /// File bytes acknowledged by clients.
    pub bytes: AtomicU64,
    /// Requests answered with an ERROR (missing file, jail, limits, writes, modes).
    pub refused: AtomicU64,
    /// Datagrams dropped on the listening port (malformed, duplicate, unexpected).
    pub dropped: AtomicU64,
    /// Served from the in-memory cache (from the start, or from when another transfer
    /// filled it while this one was running).
    pub cache_hits: AtomicU64,
    /// File bytes read from disk (or the page cache) for transfers and for filling the
    /// cache.
    pub file_read_bytes: AtomicU64,
    /// Sends that carried several datagrams at once with UDP GSO (io_uring driver).
    pub gso_sends: AtomicU64,
    /// Datagrams sent inside those GSO sends.
    pub gso_segments: AtomicU64,
    /// Ended transfers by how they ended (indexed by [`TransferState::index`]).
    outcomes: [AtomicU64; TransferState::ENDED.len()],
    /// DATA packets sent (retransmissions included).
    pub packets: AtomicU64,
    /// DATA and OACK packets sent again.
    pub retransmits: AtomicU64,
    /// Transfer records the observer could not take (its queue was full).
    pub records_dropped: AtomicU64,
    /// Durations of completed transfers.
    pub duration: DurationHistogram,
}

impl Stats {
    /// Ended transfers that ended in `state`.
    pub fn ended(&self, state: TransferState) -> u64 {
        self.outcomes[state.index()].load(Ordering::Relaxed)
    }

    /// Transfers the client acknowledged completely.
    pub fn completed(&self) -> u64 {
        self.ended(TransferState::Done)
    }

    /// Transfers that ended any other way (refused, timed out, client error or gone,
    /// read error).
    pub fn failed(&self) -> u64 {
        TransferState::ENDED
            .iter()
            .filter(|s| **s != TransferState::Done)
            .map(|s| self.ended(*s))
            .sum()
    }
}

/// Where a transfer is, or how it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TransferState {
    /// Still sending.
    Running,
    /// The client acknowledged the last block.
    Done,
    /// No acknowledgement after the last retry.
    TimedOut,
    /// The client sent an ERROR.
    ClientError,
    /// The file became shorter while it was being sent.
    FileChanged,
    /// Reading the file failed.
    ReadFailed,
    /// The file was missing or outside the root (ERROR sent).
    Refused,
    /// The transfer's socket failed (e.g. the client's port is gone).
    IoError,
}

impl TransferState {
    /// The states a transfer ends in.
    pub const ENDED: [Self; 7] = [
        Self::Done,
        Self::TimedOut,
        Self::ClientError,
        Self::FileChanged,
        Self::ReadFailed,
        Self::Refused,
        Self::IoError,
    ];

    fn index(self) -> usize {
        Self::ENDED.iter().position(|s| *s == self).unwrap_or(0)
    }

    /// The name used in the API and as the `outcome` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Done => "done",
            Self::TimedOut => "timed_out",
            Self::ClientError => "client_error",
            Self::FileChanged => "file_changed",
            Self::ReadFailed => "read_failed",
            Self::Refused => "refused",
            Self::IoError => "io_error",
        }
    }
}

/// One TFTP transfer as an operator sees it: who asked for what, what was negotiated,
/// and, once it ended, how it went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct TransferRecord {
    /// Increasing identifier, unique while the daemon runs.
    pub id: u64,
    /// The client's address and port (its transfer ID).
    #[schema(value_type = String)]
    pub client: SocketAddr,
    /// The server side of the transfer: its own socket, on an ephemeral port. With
    /// `client` it is the flow's 4-tuple, under which the kernel counts its bytes.
    #[schema(value_type = Option<String>)]
    pub server: Option<SocketAddr>,
    /// The file as requested (`\` turned into `/`).
    pub file: String,
    /// `octet` or `netascii`.
    pub mode: String,
    /// Negotiated block size (512 until negotiated).
    pub blksize: u16,
    /// Negotiated window size (1 is lock-step).
    pub windowsize: u16,
    /// The file's size, once opened.
    pub size: Option<u64>,
    /// When the request arrived.
    #[schema(value_type = String)]
    pub started_at: Timestamp,
    /// Where it is, or how it ended.
    pub state: TransferState,
    /// What went wrong, when something did.
    pub detail: Option<String>,
    /// File bytes the client acknowledged.
    pub bytes: u64,
    /// DATA packets sent, retransmissions included.
    pub packets: u64,
    /// DATA and OACK packets sent again.
    pub retransmits: u64,
    /// From the request to the end, once ended.
    pub duration_ms: Option<u64>,
    /// UDP payload bytes the transfer's socket sent (OACK, DATA with retransmissions,
    /// ERROR), by the server's own count.
    pub sent_bytes: u64,
    /// UDP payload bytes the transfer's socket received and handled, by the server's own count.
    pub received_bytes: u64,
    /// The transfer's traffic as the kernel counted it on the accounting interfaces,
    /// filled in shortly after the end (absent without eBPF accounting, or when the client
    /// is reached through an interface that is not counted).
    pub kernel: Option<KernelBytes>,
}

/// A transfer's traffic as the eBPF accounting counted it, on the wire and as UDP payload.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, ToSchema)]
pub struct KernelBytes {
    /// Frames sent to the client.
    pub tx_packets: u64,
    /// Wire bytes sent to the client (Ethernet header through payload).
    pub tx_bytes: u64,
    /// UDP payload bytes sent to the client; equals `sent_bytes` when nothing was lost
    /// inside this host.
    pub tx_payload: u64,
    /// Frames received from the client.
    pub rx_packets: u64,
    /// Wire bytes received from the client.
    pub rx_bytes: u64,
    /// UDP payload bytes received from the client.
    pub rx_payload: u64,
}

/// Told when a transfer's own server socket starts and stops carrying TFTP, so that the
/// eBPF accounting classifies its packets as TFTP.
pub trait TransferPorts: Send + Sync {
    /// The transfer socket bound at `server` carries a transfer from now on.
    fn opened(&self, server: SocketAddr);
    /// The transfer on `server` ended.
    fn closed(&self, server: SocketAddr);
}

/// How many ended transfers [`Tftp::transfers`] keeps.
const RECENT_TRANSFERS: usize = 256;
/// How many ended transfers wait for the observer before new ones are dropped.
const OBSERVER_QUEUE: usize = 4096;

#[derive(Default)]
struct Transfers {
    next_id: u64,
    /// Running transfers by client address (admission allows one per address and port).
    active: HashMap<SocketAddr, (TransferRecord, Instant)>,
    recent: VecDeque<TransferRecord>,
}

/// The bytes of a file being sent.
#[derive(Debug, Clone)]
pub(crate) enum Source {
    /// The whole file, in memory (from the cache): transfers send slices of it.
    Memory(Bytes),
    /// An open file and its length at open time, and, for a file small enough for the
    /// cache, where to find it once another transfer has filled the cache.
    File(Arc<File>, u64, Option<CacheWatch>),
}

impl Source {
    /// Length of the file.
    pub(crate) fn len(&self) -> u64 {
        match self {
            Self::Memory(b) => b.len() as u64,
            Self::File(_, len, _) => *len,
        }
    }

    /// Answers the reads `t` asks for from memory; returns the read the driver must do
    /// from the file, if any (the core has at most one outstanding and asks again after).
    ///
    /// A file that has gone into the cache since the transfer opened it is sent from
    /// there from its next read on: in a boot storm every transfer starts before the
    /// first has read the file, and would otherwise read all of it on its own.
    pub(crate) fn feed(&mut self, t: &mut Transfer) -> Option<(Arc<File>, ReadRequest)> {
        while let Some(r) = t.poll_read() {
            if let Self::File(_, _, Some(watch)) = self
                && let Some(data) = watch.get()
            {
                *self = Self::Memory(data);
            }
            match self {
                Self::Memory(data) => t.handle_read(Ok(slice_of(data, r))),
                Self::File(file, _, _) => return Some((Arc::clone(file), r)),
            }
        }
        None
    }
}

/// The bytes `r` asks for out of `data` (fewer at the end, empty past it), shared.
pub(crate) fn slice_of(data: &Bytes, r: ReadRequest) -> Bytes {
    let start = usize::try_from(r.offset)
        .unwrap_or(usize::MAX)
        .min(data.len());
    let end = start.saturating_add(r.len).min(data.len());
    data.slice(start..end)
}

/// Which version of a file: its inode, its modification and change times and its
/// length. A file replaced by another (a new inode) or written in place (a new ctime,
/// which no one can set back) is another version, even with the same mtime and length
/// (`cp -p`, `rsync -t`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileVersion {
    dev: u64,
    ino: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    len: u64,
}

impl FileVersion {
    fn of(meta: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt as _;
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
            len: meta.len(),
        }
    }
}

struct Cached {
    version: FileVersion,
    data: Bytes,
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

    /// Whether a file of `len` bytes may go into the cache: not larger than a cached file
    /// may be, and small enough to stay in it.
    fn takes(&self, len: u64) -> bool {
        len <= self.max_file.min(self.max_total)
    }

    /// At an open of the file at `path`, now at `version`: the cached file if it is that
    /// version (a cached entry of another version is dropped: the file has changed), else
    /// whether this open is the one to fill the cache (no other fill of the path runs).
    fn open(&self, path: &Path, version: FileVersion) -> Result<Bytes, bool> {
        let mut state = self.lock();
        match state.entries.get_mut(path) {
            Some(e) if e.version == version => {
                e.last_used = Instant::now();
                return Ok(e.data.clone());
            }
            Some(_) => {
                state.entries.remove(path);
            }
            None => {}
        }
        Err(state.filling.insert(path.to_path_buf()))
    }

    /// The cached file at `path` if it is `version`; nothing is dropped (a transfer of an
    /// older version must not evict the file as it is now).
    fn get(&self, path: &Path, version: FileVersion) -> Option<Bytes> {
        let mut state = self.lock();
        let e = state.entries.get_mut(path)?;
        (e.version == version).then(|| {
            e.last_used = Instant::now();
            e.data.clone()
        })
    }

    fn insert(&self, path: PathBuf, version: FileVersion, data: Bytes) {
        let mut state = self.lock();
        state.entries.insert(
            path,
            Cached {
                version,
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

/// One version of one file ([`FileVersion`], at open time) and the cache it may be in.
#[derive(Clone)]
pub(crate) struct CachedVersion {
    cache: Arc<FileCache>,
    path: Arc<Path>,
    version: FileVersion,
    stats: Arc<Stats>,
}

impl std::fmt::Debug for CachedVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedVersion")
            .field("path", &self.path)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// The right to read a file whole into the cache, with the open file to read: one
/// transfer's open gets it, the others opened meanwhile watch for the result
/// ([`CacheWatch`]). The driver reads the file at once, apart from the transfer's own
/// reads. Dropping it unfinished lets a later open fill the cache.
#[derive(Debug)]
pub(crate) struct CacheFill(CachedVersion, Arc<File>);

impl CacheFill {
    /// The file's length at open time: how much to read.
    pub(crate) fn len(&self) -> u64 {
        self.0.version.len
    }

    /// The file to read.
    pub(crate) fn file(&self) -> &Arc<File> {
        &self.1
    }

    /// Counts `n` bytes read for the fill.
    pub(crate) fn read(&self, n: usize) {
        self.0
            .stats
            .file_read_bytes
            .fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Puts the file, read whole, into the cache and returns it; `None` (and nothing
    /// cached) if `data` is not as long as the file was at open time, or the file changed
    /// while it was read (another version now: the bytes may be a mix).
    pub(crate) fn finish(self, data: Vec<u8>) -> Option<Bytes> {
        let v = &self.0;
        let now = self.1.metadata().ok().map(|m| FileVersion::of(&m));
        if data.len() as u64 != v.version.len || now != Some(v.version) {
            return None;
        }
        let data = Bytes::from(data);
        v.cache
            .insert(v.path.to_path_buf(), v.version, data.clone());
        Some(data)
    }
}

/// Where a transfer finds its file in the cache once another has put it there: the
/// version it opened, or none.
#[derive(Debug, Clone)]
pub(crate) struct CacheWatch(CachedVersion);

impl CacheWatch {
    /// The file from the cache, if it is there now (counted as a cache hit).
    fn get(&self) -> Option<Bytes> {
        let v = &self.0;
        let data = v.cache.get(&v.path, v.version)?;
        v.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
        Some(data)
    }
}

impl Drop for CacheFill {
    fn drop(&mut self) {
        self.0.cache.lock().filling.remove(&*self.0.path);
    }
}

/// A file opened for a transfer.
#[derive(Debug)]
pub(crate) struct Opened {
    /// Where its bytes come from.
    pub(crate) source: Source,
    /// Set when the file is small enough for the cache, not yet in it, and no other
    /// transfer is filling it: the driver reads the file whole into it.
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

/// Files the daemon generates per client instead of reading them from the root (the
/// boot flow's iPXE script). Called on the driver's thread: it must not block for long.
pub trait VirtualFiles: Send + Sync {
    /// The content of `path` (relative, `/`-separated, any MAC directory removed) for the
    /// client at `client`, whose MAC is `mac` when known, reaching this host at `server`;
    /// `None` when `path` is not one.
    fn generate(
        &self,
        client: SocketAddr,
        server: Option<IpAddr>,
        mac: Option<MacAddr>,
        path: &str,
    ) -> Option<Vec<u8>>;
}

/// Splits a leading MAC directory off a normalised path: `52-54-00-12-34-56/ipxe.efi`
/// (any MAC spelling, and PXELINUX's `01-` hardware-type prefix) gives the MAC and
/// `ipxe.efi`.
pub fn split_mac_dir(path: &str) -> Option<(MacAddr, &str)> {
    let (first, rest) = path.split_once('/')?;
    let first = first
        .strip_prefix("01-")
        .filter(|f| f.len() == 17)
        .unwrap_or(first);
    let mac = first.parse::<MacAddr>().ok()?;
    (!rest.is_empty()).then_some((mac, rest))
}

/// `rest` under `mac`'s directory, by the directory's documented name:
/// `aa-bb-cc-dd-ee-ff/rest`.
pub fn mac_path(mac: MacAddr, rest: &str) -> String {
    format!("{}/{rest}", mac.to_hexhyp())
}

/// The TFTP service.
pub struct Tftp {
    /// The served directory, canonical (resolved once, not per request).
    root: PathBuf,
    /// The served directory as configured: clients may name files by it (`/srv/tftp/..`).
    configured_root: PathBuf,
    core: transfer::Config,
    admission: Mutex<Server>,
    /// `tftp.max_sessions`, for sizing the listener's receive buffer.
    max_sessions: usize,
    /// `tftp.single_port`: transfers are served from the listening socket.
    single_port: bool,
    cache: Arc<FileCache>,
    case_insensitive: bool,
    transfers: Mutex<Transfers>,
    observer: std::sync::OnceLock<mpsc::Sender<TransferRecord>>,
    virtual_files: Option<Arc<dyn VirtualFiles>>,
    bindings: Option<Arc<Bindings>>,
    ports: std::sync::OnceLock<Arc<dyn TransferPorts>>,
    /// Counts each ended transfer for its client when the eBPF program does not.
    tally: std::sync::OnceLock<Arc<Tally>>,
    /// Counters.
    pub stats: Arc<Stats>,
}

impl std::fmt::Debug for Tftp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tftp")
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

impl Tftp {
    /// Whether transfers are served from the listening socket (`tftp.single_port`), told
    /// apart by the client's address and port, instead of each from a socket of its own.
    pub fn single_port(&self) -> bool {
        self.single_port
    }

    /// The receive buffer the listening socket should have: room for an RRQ from every
    /// transfer the limits admit, all arriving at once (a boot storm), at 2 KiB of kernel
    /// memory each (a datagram's truesize on a typical NIC), from 256 KiB to 64 MiB.
    /// Smaller, a burst overflows it: the kernel drops the RRQs that do not fit, and
    /// their clients wait out their retransmission timeout.
    pub fn listener_receive_buffer(&self) -> usize {
        self.max_sessions
            .saturating_mul(2048)
            .clamp(256 << 10, 64 << 20)
    }

    /// A service serving `root` (an existing directory) as configured.
    pub fn new(cfg: &TftpConfig, root: PathBuf) -> Self {
        let core = transfer::Config {
            max_blksize: cfg.max_blksize,
            max_windowsize: cfg.max_windowsize,
            default_timeout: Duration::from_millis(u64::from(cfg.timeout_ms)),
            max_retries: cfg.max_retries,
            max_idle: Duration::from_secs(u64::from(cfg.max_idle_secs)),
            ..transfer::Config::default()
        };
        let limits = Limits {
            max_sessions: cfg.max_sessions,
            per_client: cfg.per_client,
            ..Limits::default()
        };
        Self {
            // Created before the service starts; if it is not there yet, requests fail
            // with "file not found" until it is, as before.
            root: root.canonicalize().unwrap_or_else(|_| root.clone()),
            configured_root: root,
            core,
            admission: Mutex::new(Server::new(limits)),
            max_sessions: cfg.max_sessions,
            single_port: cfg.single_port,
            cache: Arc::new(FileCache {
                max_file: cfg.cache_file_max_mib << 20,
                max_total: cfg.cache_total_mib << 20,
                state: Mutex::new(CacheState::default()),
            }),
            case_insensitive: cfg.case_insensitive,
            transfers: Mutex::new(Transfers::default()),
            observer: std::sync::OnceLock::new(),
            virtual_files: None,
            bindings: None,
            ports: std::sync::OnceLock::new(),
            tally: std::sync::OnceLock::new(),
            stats: Arc::default(),
        }
    }

    /// Serves the files `files` generates (when no real file has the name).
    #[must_use]
    pub fn with_virtual_files(mut self, files: Arc<dyn VirtualFiles>) -> Self {
        self.virtual_files = Some(files);
        self
    }

    /// Resolves clients' MACs through `bindings` for virtual files, and records the MACs
    /// that request paths carry.
    #[must_use]
    pub fn with_bindings(mut self, bindings: Arc<Bindings>) -> Self {
        self.bindings = Some(bindings);
        self
    }

    /// Tells `ports` of every transfer socket from now on. Only the first call counts.
    pub fn set_transfer_ports(&self, ports: Arc<dyn TransferPorts>) {
        let _ = self.ports.set(ports);
    }

    /// Counts every transfer's datagrams for its client in `tally` when it ends. Only the
    /// first call counts.
    pub fn set_tally(&self, tally: Arc<Tally>) {
        let _ = self.tally.set(tally);
    }

    /// Ended transfers from the last `window` that have a server socket but no kernel
    /// figures yet: (id, client, server).
    pub fn awaiting_kernel_bytes(&self, window: Duration) -> Vec<(u64, SocketAddr, SocketAddr)> {
        let now = Timestamp::now();
        self.transfers()
            .recent
            .iter()
            .filter(|r| r.kernel.is_none())
            .filter(|r| {
                let ended = r.started_at.as_millis() + r.duration_ms.unwrap_or(0) as i64;
                now.as_millis() - ended <= window.as_millis() as i64
            })
            .filter_map(|r| r.server.map(|s| (r.id, r.client, s)))
            .collect()
    }

    /// Attaches the kernel's figures to the ended transfer `id`.
    pub fn set_kernel_bytes(&self, id: u64, kernel: KernelBytes) {
        if let Some(r) = self.transfers().recent.iter_mut().find(|r| r.id == id) {
            r.kernel = Some(kernel);
        }
    }

    /// Every transfer that ends from now on, for the boot timeline. Only the first call
    /// gets a receiver. When the receiver falls behind, records are dropped and counted.
    pub fn observe(&self) -> Option<mpsc::Receiver<TransferRecord>> {
        let (tx, rx) = mpsc::channel(OBSERVER_QUEUE);
        self.observer.set(tx).ok().map(|()| rx)
    }

    fn transfers(&self) -> MutexGuard<'_, Transfers> {
        self.transfers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The running transfers and the most recent ended ones (newest first).
    pub fn transfers_snapshot(&self) -> (Vec<TransferRecord>, Vec<TransferRecord>) {
        let now = Instant::now();
        let t = self.transfers();
        let mut active: Vec<TransferRecord> = t
            .active
            .values()
            .map(|(r, started)| TransferRecord {
                duration_ms: Some(now.saturating_duration_since(*started).as_millis() as u64),
                ..r.clone()
            })
            .collect();
        active.sort_by_key(|r| r.id);
        (active, t.recent.iter().rev().cloned().collect())
    }

    /// Writes the service's metric families.
    pub fn write_metrics(&self, e: &mut Exposition) {
        let st = &self.stats;
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        e.family("netboot_tftp_requests", Kind::Counter, None, "Requests on the TFTP port by what became of them, each counted once: started a transfer (admitted and its file opened), refused with an ERROR (limits, writes, bad modes, missing files, the jail), dropped (malformed, duplicate).");
        e.counter(
            "netboot_tftp_requests",
            &[("result", "started")],
            load(&st.started),
        );
        e.counter(
            "netboot_tftp_requests",
            &[("result", "refused")],
            load(&st.refused),
        );
        e.counter(
            "netboot_tftp_requests",
            &[("result", "dropped")],
            load(&st.dropped),
        );
        e.family(
            "netboot_tftp_transfers",
            Kind::Counter,
            None,
            "Ended TFTP transfers by outcome.",
        );
        for state in TransferState::ENDED {
            e.counter(
                "netboot_tftp_transfers",
                &[("outcome", state.as_str())],
                st.ended(state),
            );
        }
        e.family(
            "netboot_tftp_active_transfers",
            Kind::Gauge,
            None,
            "TFTP transfers running now.",
        );
        e.gauge(
            "netboot_tftp_active_transfers",
            &[],
            self.transfers().active.len() as f64,
        );
        e.family(
            "netboot_tftp_sent_bytes",
            Kind::Counter,
            Some("bytes"),
            "File bytes TFTP clients acknowledged (ended transfers).",
        );
        e.counter("netboot_tftp_sent_bytes", &[], load(&st.bytes));
        e.family(
            "netboot_tftp_data_packets",
            Kind::Counter,
            None,
            "DATA packets sent by ended transfers, retransmissions included.",
        );
        e.counter("netboot_tftp_data_packets", &[], load(&st.packets));
        e.family(
            "netboot_tftp_retransmits",
            Kind::Counter,
            None,
            "DATA and OACK packets sent again after a timeout.",
        );
        e.counter("netboot_tftp_retransmits", &[], load(&st.retransmits));
        e.family(
            "netboot_tftp_cache_hits",
            Kind::Counter,
            None,
            "Transfers sent from the in-memory file cache, from their start or from when it was filled.",
        );
        e.counter("netboot_tftp_cache_hits", &[], load(&st.cache_hits));
        e.family(
            "netboot_tftp_file_read_bytes",
            Kind::Counter,
            Some("bytes"),
            "File bytes read from disk or the page cache, for transfers and to fill the cache.",
        );
        e.counter(
            "netboot_tftp_file_read_bytes",
            &[],
            load(&st.file_read_bytes),
        );
        e.family(
            "netboot_tftp_gso_sends",
            Kind::Counter,
            None,
            "Sends that carried several datagrams with UDP GSO.",
        );
        e.counter("netboot_tftp_gso_sends", &[], load(&st.gso_sends));
        e.family(
            "netboot_tftp_gso_segments",
            Kind::Counter,
            None,
            "Datagrams sent inside GSO sends.",
        );
        e.counter("netboot_tftp_gso_segments", &[], load(&st.gso_segments));
        e.family(
            "netboot_tftp_records_dropped",
            Kind::Counter,
            None,
            "Transfer records not put on the boot timeline because its queue was full.",
        );
        e.counter(
            "netboot_tftp_records_dropped",
            &[],
            load(&st.records_dropped),
        );
        e.family(
            "netboot_tftp_transfer_duration_seconds",
            Kind::Histogram,
            Some("seconds"),
            "Duration of completed TFTP transfers, from the request to the last acknowledgement.",
        );
        st.duration
            .write(e, "netboot_tftp_transfer_duration_seconds", &[]);
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
                // Counted as started or refused once its file is open, or is not (`open`).
                let mut t = self.transfers();
                t.next_id += 1;
                let record = TransferRecord {
                    id: t.next_id,
                    client: peer,
                    server: None,
                    file: req.filename.clone(),
                    mode: match req.mode {
                        Mode::Netascii => "netascii",
                        // Admission starts transfers only in octet and netascii.
                        Mode::Octet | Mode::Mail | Mode::Unknown => "octet",
                    }
                    .to_owned(),
                    blksize: 512,
                    windowsize: 1,
                    size: None,
                    started_at: Timestamp::now(),
                    state: TransferState::Running,
                    detail: None,
                    bytes: 0,
                    packets: 0,
                    retransmits: 0,
                    duration_ms: None,
                    sent_bytes: 0,
                    received_bytes: 0,
                    kernel: None,
                };
                t.active.insert(peer, (record, now));
                drop(t);
                Request::Start(req)
            }
            Decision::Refuse { packet, reason } => {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%peer, reason, "tftp request refused");
                // In single-port mode the ERROR would leave from the port of the client's
                // running transfer, and end it: the refusal goes unanswered instead.
                if self.single_port && self.transfers().active.contains_key(&peer) {
                    Request::Ignore
                } else {
                    Request::Reply(packet)
                }
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
    /// client. Counts the request as started or refused, once: an admitted request whose
    /// file is missing is a refusal, not a transfer.
    /// `local` is the transfer socket's address, the one the client reaches us at.
    pub(crate) fn open(
        &self,
        peer: SocketAddr,
        local: Option<SocketAddr>,
        filename: &str,
    ) -> Result<Opened, Vec<u8>> {
        let opened = self.open_file(peer, local, filename);
        let counter = if opened.is_ok() {
            &self.stats.started
        } else {
            &self.stats.refused
        };
        counter.fetch_add(1, Ordering::Relaxed);
        opened
    }

    fn open_file(
        &self,
        peer: SocketAddr,
        local: Option<SocketAddr>,
        filename: &str,
    ) -> Result<Opened, Vec<u8>> {
        // An absolute path is read from the root (GRUB, configurations for tftpd-hpa).
        let rooted = jail::normalise_rooted(filename, &[&self.root, &self.configured_root]);
        let absolute = rooted.as_ref().is_ok_and(|r| r.absolute);
        let rel = rooted.map(|r| r.rel);
        let mac_dir = rel.as_deref().ok().and_then(split_mac_dir);
        if let (Some((mac, _)), Some(b)) = (mac_dir, &self.bindings) {
            b.learn(peer.ip(), mac, BindingSource::Tftp, Timestamp::now());
        }
        // The path as asked (a per-device file under <root>/<mac>/), else under the MAC
        // directory's documented name (`aa-bb-cc-dd-ee-ff`, whatever spelling the client
        // used), else without the MAC directory, else a generated file.
        let mut found = match &rel {
            Ok(rel) => self.resolve(rel),
            Err(_) => Err(OpenError::Denied),
        };
        if let (Err(OpenError::NotFound), Some((mac, rest)), Ok(rel)) = (&found, mac_dir, &rel) {
            let canonical = mac_path(mac, rest);
            if canonical != *rel {
                found = self.resolve(&canonical);
            }
        }
        if let (Err(OpenError::NotFound), Some((_, rest))) = (&found, mac_dir) {
            found = self.resolve(rest);
        }
        if let (Err(OpenError::NotFound), Some(files), Ok(rel)) =
            (&found, &self.virtual_files, &rel)
        {
            let (mac, rest) = match mac_dir {
                Some((mac, rest)) => (Some(mac), rest),
                None => (
                    self.bindings
                        .as_ref()
                        .and_then(|b| b.lookup(peer.ip()))
                        .map(|b| b.mac),
                    rel.as_str(),
                ),
            };
            if let Some(data) = files.generate(peer, local.map(|a| a.ip()), mac, rest) {
                return Ok(Opened {
                    source: Source::Memory(data.into()),
                    fill: None,
                });
            }
        }
        let (path, file, meta) = found.map_err(|e| {
            let (code, msg) = match e {
                // An absolute path that names no file in the root may name one outside
                // it: refused as such, whether or not it exists there.
                OpenError::NotFound if absolute => {
                    (ErrorCode::ACCESS_VIOLATION, "access violation")
                }
                OpenError::NotFound => (ErrorCode::FILE_NOT_FOUND, "file not found"),
                OpenError::Denied => (ErrorCode::ACCESS_VIOLATION, "access violation"),
                OpenError::NotAFile => (ErrorCode::ACCESS_VIOLATION, "not a regular file"),
            };
            if let Some((r, _)) = self.transfers().active.get_mut(&peer) {
                r.detail = Some(msg.to_owned());
            }
            error_packet(code, msg)
        })?;
        let len = meta.len();
        let file = Arc::new(file);
        if !self.cache.takes(len) {
            return Ok(Opened {
                source: Source::File(file, len, None),
                fill: None,
            });
        }
        let version = FileVersion::of(&meta);
        let filling = match self.cache.open(&path, version) {
            Ok(data) => {
                self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
                return Ok(Opened {
                    source: Source::Memory(data),
                    fill: None,
                });
            }
            Err(filling) => filling,
        };
        let version = CachedVersion {
            cache: Arc::clone(&self.cache),
            path: path.into(),
            version,
            stats: Arc::clone(&self.stats),
        };
        Ok(Opened {
            fill: filling.then(|| CacheFill(version.clone(), Arc::clone(&file))),
            source: Source::File(file, len, Some(CacheWatch(version))),
        })
    }

    /// Opens the normalised `rel` inside the root (case-insensitively as a fallback when
    /// configured).
    fn resolve(&self, rel: &str) -> Result<(PathBuf, File, std::fs::Metadata), OpenError> {
        match jail::open_in(&self.root, rel) {
            Err(JailError::NotFound) if self.case_insensitive => {
                let found = find_case_insensitive(&self.root, rel)?;
                jail::open_in(&self.root, &found).map_err(OpenError::from)
            }
            r => r.map_err(OpenError::from),
        }
    }

    /// Negotiates the options of `req` and starts its transfer of `source` from the
    /// transfer's own socket, bound at `local`.
    pub(crate) fn new_transfer(
        &self,
        req: &Admitted,
        source: &Source,
        local: Option<SocketAddr>,
    ) -> Transfer {
        let size = source.len();
        let neg = transfer::negotiate(&req.as_request(), &self.core, Some(size));
        // In single-port mode the listening port is the service's own, registered for
        // as long as TFTP runs.
        if let (Some(local), Some(ports), false) = (local, self.ports.get(), self.single_port) {
            ports.opened(local);
        }
        if let Some((r, _)) = self.transfers().active.get_mut(&req.peer) {
            r.server = local;
            r.blksize = neg.blksize;
            r.windowsize = neg.windowsize;
            r.size = Some(size);
        }
        Transfer::new(&neg, req.mode, size, &self.core)
    }

    /// Records the end of the transfer to `peer` (admitted by [`Tftp::handle_request`]).
    pub(crate) fn finished(&self, now: Instant, peer: SocketAddr, outcome: Outcome) {
        let completed = matches!(outcome, Outcome::Event(Event::Done(_)));
        self.admission().finished(now, peer, completed);
        let (state, summary, detail) = match outcome {
            Outcome::Event(Event::Done(s)) => (TransferState::Done, s, None),
            Outcome::Event(Event::Failed(why, s)) => {
                let (state, detail) = match why {
                    Failure::TimedOut => (TransferState::TimedOut, None),
                    Failure::ClientError(code) => (
                        TransferState::ClientError,
                        Some(format!("client sent ERROR {}", code.0)),
                    ),
                    Failure::FileChanged => (TransferState::FileChanged, None),
                    Failure::ReadFailed => (TransferState::ReadFailed, None),
                };
                (state, s, detail)
            }
            Outcome::Refused => (TransferState::Refused, transfer::Summary::default(), None),
            Outcome::Io(error) => (
                TransferState::IoError,
                transfer::Summary::default(),
                Some(error.to_string()),
            ),
        };
        let mut t = self.transfers();
        let active = t.active.remove(&peer);
        // From the request on the listening port (the open included) to the end.
        let elapsed = active.as_ref().map_or(Duration::ZERO, |(_, started)| {
            now.saturating_duration_since(*started)
        });
        let st = &self.stats;
        if state == TransferState::Done {
            st.duration.record(elapsed);
        }
        st.outcomes[state.index()].fetch_add(1, Ordering::Relaxed);
        st.bytes.fetch_add(summary.bytes, Ordering::Relaxed);
        st.packets.fetch_add(summary.packets, Ordering::Relaxed);
        st.retransmits
            .fetch_add(summary.retransmits, Ordering::Relaxed);
        tracing::debug!(
            outcome = state.as_str(),
            detail = detail.as_deref().unwrap_or(""),
            bytes = summary.bytes,
            packets = summary.packets,
            retransmits = summary.retransmits,
            ms = elapsed.as_millis() as u64,
            "tftp transfer ended"
        );
        let Some((mut record, _)) = active else {
            return;
        };
        record.sent_bytes = summary.sent_bytes;
        record.received_bytes = summary.received_bytes;
        record.state = state;
        record.detail = detail.or(record.detail);
        record.bytes = summary.bytes;
        record.packets = summary.packets;
        record.retransmits = summary.retransmits;
        record.duration_ms = Some(elapsed.as_millis() as u64);
        if t.recent.len() == RECENT_TRANSFERS {
            t.recent.pop_front();
        }
        t.recent.push_back(record.clone());
        drop(t);
        // A map update (a syscall): not under the transfers lock.
        if let (Some(server), Some(ports), false) =
            (record.server, self.ports.get(), self.single_port)
        {
            ports.closed(server);
        }
        if let Some(tally) = self.tally.get() {
            let ip = record.client.ip();
            tally.count_ip(
                ip,
                Service::Tftp,
                Direction::Egress,
                summary.sent_datagrams,
                summary.sent_bytes,
            );
            tally.count_ip(
                ip,
                Service::Tftp,
                Direction::Ingress,
                summary.received_datagrams,
                summary.received_bytes,
            );
        }
        if let Some(tx) = self.observer.get()
            && tx.try_send(record).is_err()
        {
            st.records_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Whether a failed send (`errno`) ends the transfer: only when the client's port is
/// gone (`ECONNREFUSED`, from an ICMP port unreachable). Any other error counts as a
/// datagram lost on the wire, which the transfer's timer retransmits. Both drivers
/// follow this one rule.
pub(crate) fn send_error_ends_transfer(errno: i32) -> bool {
    errno == libc::ECONNREFUSED
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
    /// A directory, a FIFO, a device: never served.
    NotAFile,
}

impl From<JailError> for OpenError {
    fn from(e: JailError) -> Self {
        match e {
            JailError::NotFound => Self::NotFound,
            JailError::NotAFile => Self::NotAFile,
            _ => Self::Denied,
        }
    }
}

/// Finds the normalised `rel` under `root` comparing each component case-insensitively
/// (for clients that ask for `PXELINUX.0` or `Boot\BCD`); the caller jails the result.
fn find_case_insensitive(root: &Path, rel: &str) -> Result<String, OpenError> {
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
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file rewritten in place with its old length and mtime (`cp -p`, `rsync -t`) is
    /// another version: the cache does not serve the old bytes for it, and a fill during
    /// which the file changed caches nothing.
    #[test]
    fn the_cache_tells_versions_apart_by_more_than_mtime_and_length() {
        let dir =
            std::env::temp_dir().join(format!("netboot-cache-version-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join("kernel");
        std::fs::write(&path, b"old contents").expect("write");
        let tftp = Tftp::new(&TftpConfig::default(), dir.clone());
        let peer: SocketAddr = "127.0.0.1:1000".parse().expect("addr");
        let open = || tftp.open(peer, None, "kernel").expect("open");

        let first = open();
        let (Source::File(_, _, Some(_)), Some(fill)) = (&first.source, first.fill) else {
            panic!("a cacheable file opened for a fill");
        };
        let cached = fill.finish(b"old contents".to_vec()).expect("cached");
        assert_eq!(&cached[..], b"old contents");
        assert!(
            matches!(open().source, Source::Memory(ref d) if &d[..] == b"old contents"),
            "served from the cache"
        );

        let mtime = std::fs::metadata(&path)
            .and_then(|m| m.modified())
            .expect("mtime");
        std::fs::write(&path, b"new contents").expect("rewrite");
        File::options()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_modified(mtime))
            .expect("set the old mtime back");
        let after = open();
        assert!(
            !matches!(after.source, Source::Memory(_)),
            "the old bytes are not served for the rewritten file: {after:?}"
        );

        // A fill whose file changes before it is done is not cached.
        let Some(fill) = after.fill else {
            panic!("the rewritten file opened for a fill");
        };
        std::fs::write(&path, b"newer content").expect("rewrite again");
        assert!(fill.finish(b"new contents".to_vec()).is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn mac_directories_are_recognised_in_every_spelling() {
        let mac: MacAddr = "52:54:00:aa:bb:cc".parse().expect("mac");
        for path in [
            "52:54:00:aa:bb:cc/ipxe.efi",
            "52-54-00-AA-BB-CC/ipxe.efi",
            "525400aabbcc/ipxe.efi",
            "01-52-54-00-aa-bb-cc/ipxe.efi",
        ] {
            assert_eq!(split_mac_dir(path), Some((mac, "ipxe.efi")), "{path}");
        }
        assert_eq!(
            split_mac_dir("52-54-00-aa-bb-cc/efi/boot.ipxe"),
            Some((mac, "efi/boot.ipxe"))
        );
        assert_eq!(
            mac_path(mac, "efi/ipxe.efi"),
            "52-54-00-aa-bb-cc/efi/ipxe.efi"
        );
        for path in [
            "ipxe.efi",
            "52-54-00-aa-bb-cc/",
            "efi/ipxe.efi",
            "52-54-00-aa-bb/x",
            "01-525400aabbcc/x",
        ] {
            assert_eq!(split_mac_dir(path), None, "{path}");
        }
    }
}
