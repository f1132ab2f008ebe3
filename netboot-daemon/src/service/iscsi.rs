//! The iSCSI target service: targets from the store's images, with their access control,
//! the accept loop, and the tokio driver (the io_uring one, the default, is
//! [`crate::driver::uring::iscsi`]; [`IscsiRunner::start`] picks one from `iscsi.driver`).
//!
//! Every image in the store is a target named `<iscsi.iqn_prefix>:<image>`, the image
//! name in IQN characters ([`name::image_target`], the mapping the boot scripts use too:
//! `Win11_Base` is `...:win11-base`; names are compared case-folded), with one disk
//! LUN (0) backed by `<images>/<image>.img`, a sparse file created at the image's size when
//! it does not exist yet. An image accepts an initiator whose name carries the MAC of the
//! device the image is linked to as its last token (in any common spelling; the boot
//! scripts set `...:initiator:aa-bb-cc-dd-ee-ff`), one of that device's own initiator
//! names (`initiators`, set through the device's API), or one listed in `iscsi.allow`;
//! discovery shows each initiator only what it may use.
//! When that device has CHAP credentials, its image's target requires CHAP (mutual when
//! the device has a target secret too); each connection gets a fresh random challenge.
//!
//! Every installer of kind `iso` is a shared read-only target
//! `<iscsi.iqn_prefix>:installer:<name>` (see [`installer_targets`]) with one CD-ROM LUN
//! of 2048-byte blocks over the ISO file (opened read-only, inside `paths.installers`);
//! every initiator may log in to it and sees it in discovery, and writes end in DATA
//! PROTECT.
//!
//! The tokio driver runs one task per connection: it reads into the decoder's buffer, feeds
//! the PDUs to [`Connection`], runs the commands in order (reads of page-cached data
//! right away with [`Lun::try_execute`], everything else in one batch per round on the
//! blocking pool) and writes all queued responses with one vectored write, large Data-In
//! segments straight from the buffer the read filled. Logical units are shared between sessions, so reservations and the write
//! cache setting are per image.
//!
//! [`Sessions`] lists the live sessions by target, so that image management can refuse
//! to rename or delete an image in use, end its sessions (a forced delete), and hold a
//! target while it changes its file: a login that completes on a held target is dropped.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::IoSlice;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;
use utoipa::ToSchema;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use crate::bindings::{Bindings, Source as BindingSource};
use crate::config::{IscsiConfig, IscsiDriver};
use crate::ebpf::Service;
use crate::iscsi::chap;
use crate::iscsi::conn::{Connection, Login, Refusal, SessionEvent, Target, Targets};
use crate::iscsi::conn::{FileSegment, Outgoing};
use crate::iscsi::file::FileBacking;
use crate::iscsi::name;
use crate::iscsi::pdu::{DecodeError, Decoder, encode_padding, encode_trailer};
use crate::iscsi::scsi::{DeviceType, Lun, LunConfig};
use crate::mac::MacAddr;
use crate::metrics::{DurationHistogram, Exposition, Kind};
use crate::service::tally::{Counted, Tally};
use crate::service::tftp::KernelBytes;
use crate::store::{
    ChapCredentials, EventSource, Image, Installer, InstallerKind, NewBootEvent, Store,
};
use crate::time::Timestamp;

/// A live normal session, as [`Sessions::on`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveSession {
    /// The initiator's iSCSI name.
    pub initiator: String,
    /// Its address.
    pub peer: SocketAddr,
}

/// What the target itself counted on one connection, from its first byte: the figures
/// the eBPF accounting's count of the same TCP connection is checked against.
#[derive(Debug, Default)]
pub struct ConnStats {
    /// Bytes read from the initiator (its PDUs, digests included).
    pub rx_bytes: AtomicU64,
    /// Bytes written to it.
    pub tx_bytes: AtomicU64,
    /// Of `tx_bytes`, Data-In bytes that went from the image file to the socket through
    /// pipes (splice), never copied by the target.
    pub spliced_bytes: AtomicU64,
    /// Bytes the backing file was read into the ring's registered buffers (the io_uring
    /// driver's `READ_FIXED`), each sent from there as Data-In without a copy.
    pub fixed_bytes: AtomicU64,
    /// Bytes of large reads sent straight from the page cache through a mapping of the
    /// image (the io_uring driver: no read into a buffer, one copy into the socket).
    pub mapped_bytes: AtomicU64,
    /// SCSI commands completed.
    pub commands: AtomicU64,
    /// Each command, from the core handing it out to its result.
    pub latency: DurationHistogram,
}

impl ConnStats {
    /// Counts a command the core handed out at `handed` and that has its result now.
    pub(crate) fn completed(&self, handed: Instant) {
        self.commands.fetch_add(1, Ordering::Relaxed);
        self.latency.record(handed.elapsed());
    }
}

/// A normal session as the API shows it: who, on which connection, and what the target
/// counted; once it ended, what the kernel counted on the same connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct SessionRecord {
    /// Increasing identifier, unique while the daemon runs.
    pub id: u64,
    /// The initiator's iSCSI name.
    pub initiator: String,
    /// The target.
    pub target: String,
    /// The initiator's address and port.
    #[schema(value_type = String)]
    pub client: SocketAddr,
    /// The target's address and port.
    #[schema(value_type = String)]
    pub server: SocketAddr,
    /// When the connection's login completed.
    #[schema(value_type = String)]
    pub started_at: Timestamp,
    /// When it ended.
    #[schema(value_type = Option<String>)]
    pub ended_at: Option<Timestamp>,
    /// TCP payload bytes from the initiator, by the target's own count (login included).
    pub rx_bytes: u64,
    /// TCP payload bytes to the initiator, by the target's own count.
    pub tx_bytes: u64,
    /// Of `tx_bytes`, the Data-In bytes sent from the image file through pipes (splice),
    /// without copies in the target (the io_uring driver, without data digests).
    pub spliced_bytes: u64,
    /// Bytes of reads the target made into the io_uring ring's registered buffers (small
    /// reads; sent from there as Data-In without a copy).
    pub fixed_bytes: u64,
    /// Bytes of large reads the target sent straight from the page cache through a
    /// mapping of the image (one copy, into the socket).
    pub mapped_bytes: u64,
    /// SCSI commands completed.
    pub commands: u64,
    /// Median command latency, microseconds.
    pub latency_p50_us: Option<u64>,
    /// 99th percentile command latency, microseconds.
    pub latency_p99_us: Option<u64>,
    /// The connection as the eBPF accounting counted it, joined shortly after the end
    /// (absent without eBPF accounting or when the initiator is not on a counted
    /// interface); `tx_payload`/`rx_payload` equal `tx_bytes`/`rx_bytes` above.
    pub kernel: Option<KernelBytes>,
}

/// Ended sessions kept for the API.
const RECENT_SESSIONS: usize = 256;

struct LiveEntry {
    target: String,
    session: LiveSession,
    server: SocketAddr,
    started_at: Timestamp,
    stats: Arc<ConnStats>,
    end: Ender,
}

/// How [`Sessions::end`] ends one connection (its driver's way of being told).
pub(crate) type Ender = Box<dyn Fn() + Send + Sync>;

impl std::fmt::Debug for LiveEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveEntry")
            .field("target", &self.target)
            .field("session", &self.session)
            .finish_non_exhaustive()
    }
}

impl LiveEntry {
    fn record(&self, id: u64, ended_at: Option<Timestamp>) -> SessionRecord {
        let us = |q| {
            self.stats
                .latency
                .quantile(q)
                .map(|d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        };
        SessionRecord {
            id,
            initiator: self.session.initiator.clone(),
            target: self.target.clone(),
            client: self.session.peer,
            server: self.server,
            started_at: self.started_at,
            ended_at,
            rx_bytes: self.stats.rx_bytes.load(Ordering::Relaxed),
            tx_bytes: self.stats.tx_bytes.load(Ordering::Relaxed),
            spliced_bytes: self.stats.spliced_bytes.load(Ordering::Relaxed),
            fixed_bytes: self.stats.fixed_bytes.load(Ordering::Relaxed),
            mapped_bytes: self.stats.mapped_bytes.load(Ordering::Relaxed),
            commands: self.stats.commands.load(Ordering::Relaxed),
            latency_p50_us: us(0.5),
            latency_p99_us: us(0.99),
            kernel: None,
        }
    }
}

/// The live normal sessions by target name, and the targets held by image management.
#[derive(Debug, Default)]
pub struct Sessions {
    inner: Mutex<SessionsInner>,
}

#[derive(Debug, Default)]
struct SessionsInner {
    next: u64,
    live: HashMap<u64, LiveEntry>,
    recent: VecDeque<SessionRecord>,
    held: HashSet<String>,
    /// What the sessions that ended moved, for the counters of `/metrics`.
    ended: Totals,
}

/// Bytes and commands of normal sessions, by the target's own count.
#[derive(Debug, Default, Clone, Copy)]
struct Totals {
    rx_bytes: u64,
    tx_bytes: u64,
    commands: u64,
}

impl Totals {
    fn add(&mut self, stats: &ConnStats) {
        self.rx_bytes += stats.rx_bytes.load(Ordering::Relaxed);
        self.tx_bytes += stats.tx_bytes.load(Ordering::Relaxed);
        self.commands += stats.commands.load(Ordering::Relaxed);
    }
}

/// A target held by [`Sessions::hold`]; released on drop.
#[derive(Debug)]
pub struct Hold {
    sessions: Arc<Sessions>,
    target: String,
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.sessions.lock().held.remove(&self.target);
    }
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, SessionsInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a session that completed its login; `None` (drop the connection) while the
    /// target is held.
    pub(crate) fn register(
        &self,
        target: &str,
        session: LiveSession,
        server: SocketAddr,
        stats: Arc<ConnStats>,
        end: Ender,
    ) -> Option<u64> {
        let mut s = self.lock();
        if s.held.contains(target) {
            return None;
        }
        s.next += 1;
        let id = s.next;
        s.live.insert(
            id,
            LiveEntry {
                target: target.to_owned(),
                session,
                server,
                started_at: Timestamp::now(),
                stats,
                end,
            },
        );
        Some(id)
    }

    /// Ends a session: its final figures go to the recent ones.
    pub(crate) fn unregister(&self, id: u64) {
        let mut s = self.lock();
        if let Some(e) = s.live.remove(&id) {
            s.ended.add(&e.stats);
            if s.recent.len() == RECENT_SESSIONS {
                s.recent.pop_front();
            }
            s.recent.push_back(e.record(id, Some(Timestamp::now())));
        }
    }

    /// Writes the target's metric families: sessions now and since the start, and what
    /// they moved (ended sessions and the live ones so far, so the counters only grow).
    pub fn write_metrics(&self, e: &mut Exposition) {
        let s = self.lock();
        let mut all = s.ended;
        for entry in s.live.values() {
            all.add(&entry.stats);
        }
        e.family(
            "netboot_iscsi_sessions",
            Kind::Gauge,
            None,
            "iSCSI normal sessions logged in now.",
        );
        e.gauge("netboot_iscsi_sessions", &[], s.live.len() as f64);
        e.family(
            "netboot_iscsi_logins",
            Kind::Counter,
            None,
            "iSCSI normal sessions that completed their login since the start.",
        );
        e.counter("netboot_iscsi_logins", &[], s.next);
        e.family(
            "netboot_iscsi_bytes",
            Kind::Counter,
            Some("bytes"),
            "TCP payload bytes of iSCSI normal sessions by the target's own count (login included): rx from the initiators, tx to them.",
        );
        e.counter("netboot_iscsi_bytes", &[("direction", "rx")], all.rx_bytes);
        e.counter("netboot_iscsi_bytes", &[("direction", "tx")], all.tx_bytes);
        e.family(
            "netboot_iscsi_commands",
            Kind::Counter,
            None,
            "SCSI commands the target completed in normal sessions.",
        );
        e.counter("netboot_iscsi_commands", &[], all.commands);
    }

    /// Live sessions (oldest first) and the recent ended ones (newest first).
    pub fn records(&self) -> (Vec<SessionRecord>, Vec<SessionRecord>) {
        let s = self.lock();
        let mut live: Vec<SessionRecord> =
            s.live.iter().map(|(id, e)| e.record(*id, None)).collect();
        live.sort_by_key(|r| r.id);
        (live, s.recent.iter().rev().cloned().collect())
    }

    /// Sessions that ended in the last `window` without kernel figures yet: (id, client,
    /// server).
    pub fn awaiting_kernel_bytes(&self, window: Duration) -> Vec<(u64, SocketAddr, SocketAddr)> {
        let since = Timestamp::now().0 - i64::try_from(window.as_millis()).unwrap_or(i64::MAX);
        self.lock()
            .recent
            .iter()
            .filter(|r| r.kernel.is_none() && r.ended_at.is_some_and(|t| t.0 >= since))
            .map(|r| (r.id, r.client, r.server))
            .collect()
    }

    /// Attaches the kernel's figures to an ended session.
    pub fn set_kernel_bytes(&self, id: u64, kernel: KernelBytes) {
        if let Some(r) = self.lock().recent.iter_mut().find(|r| r.id == id) {
            r.kernel = Some(kernel);
        }
    }

    /// The live sessions on `target`.
    pub fn on(&self, target: &str) -> Vec<LiveSession> {
        self.lock()
            .live
            .values()
            .filter(|e| e.target == target)
            .map(|e| e.session.clone())
            .collect()
    }

    /// Holds `target` (logins to it are dropped) and returns the sessions live at that
    /// moment; `None` if it is held already (another change is under way).
    pub fn hold(self: &Arc<Self>, target: &str) -> Option<(Hold, Vec<LiveSession>)> {
        let mut s = self.lock();
        if !s.held.insert(target.to_owned()) {
            return None;
        }
        let live = s
            .live
            .values()
            .filter(|e| e.target == target)
            .map(|e| e.session.clone())
            .collect();
        Some((
            Hold {
                sessions: Arc::clone(self),
                target: target.to_owned(),
            },
            live,
        ))
    }

    /// Ends every session on `target` (their connections close) and waits up to
    /// `timeout` for them to go; returns whether none is left.
    pub fn end(&self, target: &str, timeout: Duration) -> bool {
        for e in self.lock().live.values() {
            if e.target == target {
                (e.end)();
            }
        }
        let until = Instant::now() + timeout;
        loop {
            if self.on(target).is_empty() {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Targets from the store's images.
pub struct StoreTargets {
    store: Arc<dyn Store>,
    sessions: Arc<Sessions>,
    bindings: Option<Arc<Bindings>>,
    images: PathBuf,
    /// Where installer media live (`paths.installers`); `None`: no installer targets.
    installers: Option<PathBuf>,
    prefix: String,
    allow: Vec<String>,
    /// Open logical units by image name.
    luns: Mutex<HashMap<String, Arc<Lun>>>,
}

impl std::fmt::Debug for StoreTargets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreTargets")
            .field("images", &self.images)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl StoreTargets {
    /// Targets for the images in `store`, files under `images`.
    pub fn new(store: Arc<dyn Store>, images: PathBuf, cfg: &IscsiConfig) -> Self {
        Self {
            store,
            sessions: Arc::default(),
            bindings: None,
            images,
            installers: None,
            prefix: cfg.iqn_prefix.clone(),
            allow: cfg.allow.clone(),
            luns: Mutex::new(HashMap::new()),
        }
    }

    /// Learns IP → MAC bindings from logins whose initiator name carries the MAC of the
    /// device the image is linked to.
    #[must_use]
    pub fn with_bindings(mut self, bindings: Arc<Bindings>) -> Self {
        self.bindings = Some(bindings);
        self
    }

    /// Serves the ISO installers under `root` as read-only CD-ROM targets.
    #[must_use]
    pub fn with_installers(mut self, root: PathBuf) -> Self {
        self.installers = Some(root);
        self
    }

    /// The installer targets: (target name, path under the installers directory).
    fn installer_targets(&self) -> Vec<(String, String)> {
        if self.installers.is_none() {
            return Vec::new();
        }
        match self.store.list_installers() {
            Ok(list) => installer_targets(&list)
                .into_iter()
                .map(|(name, path)| (format!("{}:installer:{name}", self.prefix), path))
                .collect(),
            Err(error) => {
                tracing::warn!(%error, "iSCSI cannot list installers");
                Vec::new()
            }
        }
    }

    /// Opens an installer target: a read-only CD-ROM LUN over the ISO file. Each login
    /// opens the file anew, so a replaced ISO is served from the next login on.
    fn open_installer(&self, name: &str) -> Result<Target, Refusal> {
        let root = self.installers.as_ref().ok_or(Refusal::NotFound)?;
        let (_, path) = self
            .installer_targets()
            .into_iter()
            .find(|(n, _)| n == name)
            .ok_or(Refusal::NotFound)?;
        let (_, file, _) = crate::jail::open(root, &path).map_err(|error| {
            tracing::warn!(target = name, %error, "iSCSI installer target cannot open its ISO");
            Refusal::Unavailable
        })?;
        let lun = Lun::new(
            LunConfig {
                device_type: DeviceType::CdRom,
                read_only: true,
                block_size: 2048,
                vendor: "NETBOOT".into(),
                product: "installer DVD".into(),
                revision: crate::api::VERSION.chars().take(4).collect(),
                serial: name.rsplit(':').next().unwrap_or(name).to_owned(),
                naa_id: naa_id(name),
                write_cache: false,
            },
            Arc::new(FileBacking::new(file, true)),
        );
        Ok(Target {
            name: name.to_owned(),
            luns: vec![(0, Arc::new(lun))],
            chap: None,
        })
    }

    /// The target name of an image ([`name::image_target`], as the boot scripts name it).
    pub fn target_name(&self, image: &str) -> String {
        name::image_target(&self.prefix, image)
    }

    /// The image whose target is `target` (a name as the initiator sent it: compared
    /// case-folded). `None` when there is none, and when two images' names would both
    /// give it (the store refuses that; only a database written before can hold it).
    fn image_of(&self, target: &str) -> Option<Image> {
        let target = name::fold(target);
        let part = target
            .strip_prefix(&self.prefix)
            .and_then(|rest| rest.strip_prefix(':'))?;
        let images = match self.store.list_images() {
            Ok(images) => images,
            Err(error) => {
                tracing::warn!(%error, "iSCSI cannot list images");
                return None;
            }
        };
        let mut matching = images.into_iter().filter(|i| name::part(&i.name) == part);
        let image = matching.next()?;
        if let Some(other) = matching.next() {
            tracing::warn!(
                target,
                image = %image.name,
                other = %other.name,
                "iSCSI target refused: two images have its name; rename one"
            );
            return None;
        }
        Some(image)
    }

    /// The live sessions (for [`serve`] and image management).
    pub fn sessions(&self) -> &Arc<Sessions> {
        &self.sessions
    }

    /// Tells the initiators of `image`'s open logical unit, if any, that its capacity
    /// changed (after its file grew).
    pub fn capacity_changed(&self, image: &str) {
        if let Some(lun) = self
            .luns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(image)
        {
            lun.capacity_changed();
        }
    }

    /// Closes the cached logical unit of `image` (its file), after a rename or delete;
    /// the next login opens the file by its name again.
    pub fn forget(&self, image: &str) {
        self.luns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(image);
    }

    /// Whether `initiator` may use `image`: it is on `iscsi.allow`, or it is bound to the
    /// device the image is linked to ([`Self::bound`]).
    fn allowed(&self, image: &Image, initiator: &str) -> bool {
        self.allow.iter().any(|a| a == initiator)
            || image
                .linked_mac
                .is_some_and(|mac| self.bound(mac, initiator))
    }

    /// Whether `initiator` is the device `mac`'s: its name carries the MAC (as the boot
    /// scripts set it), or the device lists it among its initiator names (compared
    /// case-folded).
    fn bound(&self, mac: MacAddr, initiator: &str) -> bool {
        if initiator_carries(initiator, mac) {
            return true;
        }
        match self.store.get_device(mac) {
            Ok(d) => d.initiators.contains(&name::fold(initiator)),
            Err(error) => {
                tracing::warn!(%mac, %error, "iSCSI cannot read the device's initiator names");
                false
            }
        }
    }

    fn lun(&self, image: &Image) -> std::io::Result<Arc<Lun>> {
        let mut luns = self.luns.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(l) = luns.get(&image.name) {
            return Ok(Arc::clone(l));
        }
        let path = self.images.join(format!("{}.img", image.name));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        if file.metadata()?.len() < image.size_bytes {
            // Sparse: no blocks are allocated until written.
            file.set_len(image.size_bytes)?;
        }
        let lun = Arc::new(Lun::new(
            LunConfig {
                device_type: DeviceType::Disk,
                read_only: false,
                block_size: 512,
                vendor: "NETBOOT".into(),
                product: "disk image".into(),
                revision: crate::api::VERSION.chars().take(4).collect(),
                serial: image.name.clone(),
                naa_id: naa_id(&image.name),
                write_cache: true,
            },
            Arc::new(FileBacking::new(file, false)),
        ));
        luns.insert(image.name.clone(), Arc::clone(&lun));
        Ok(lun)
    }
}

impl Targets for StoreTargets {
    fn visible(&self, initiator: &str) -> Vec<String> {
        let mut names = match self.store.list_images() {
            Ok(images) => images
                .iter()
                .filter(|i| self.allowed(i, initiator))
                .map(|i| self.target_name(&i.name))
                .collect(),
            Err(error) => {
                tracing::warn!(%error, "iSCSI discovery cannot list images");
                Vec::new()
            }
        };
        // Installer media are shared and read-only: every initiator sees them.
        names.extend(self.installer_targets().into_iter().map(|(n, _)| n));
        names
    }

    fn open(&self, target: &str, initiator: &str) -> Result<Target, Refusal> {
        let folded = name::fold(target);
        if folded.starts_with(&format!("{}:installer:", self.prefix)) {
            return self.open_installer(&folded);
        }
        let image = self.image_of(target).ok_or(Refusal::NotFound)?;
        // The target's own spelling, as discovery and image management name it.
        let canonical = self.target_name(&image.name);
        if !self.allowed(&image, initiator) {
            tracing::warn!(
                target = %canonical,
                initiator,
                "iSCSI login refused: initiator not allowed"
            );
            return Err(Refusal::NotAllowed);
        }
        let chap = match image.linked_mac {
            Some(mac) => self.store.device_chap(mac).map_err(|error| {
                tracing::warn!(target = %canonical, %error, "iSCSI target cannot read its CHAP");
                Refusal::Unavailable
            })?,
            None => None,
        };
        let lun = self.lun(&image).map_err(|error| {
            tracing::warn!(target = %canonical, %error, "iSCSI target cannot open its image");
            Refusal::Unavailable
        })?;
        Ok(Target {
            name: canonical,
            luns: vec![(0, lun)],
            chap: chap.map(|c| chap_credentials(&c)),
        })
    }

    /// Puts logins and their ends on the timeline of the device the image is linked to,
    /// and binds the initiator's address to that device when the initiator is the
    /// device's (its name carries the MAC, or the device lists it).
    fn session(&self, event: SessionEvent, login: &Login) {
        let Some(name) = login.target.as_deref() else {
            return;
        };
        let Some(image) = self.image_of(name) else {
            return;
        };
        let Some(mac) = image.linked_mac else {
            return;
        };
        let at = Timestamp::now();
        let ip = login.peer.map(|p| p.ip());
        if event == SessionEvent::Started
            && self.bound(mac, &login.initiator)
            && let (Some(b), Some(ip)) = (&self.bindings, ip)
        {
            b.learn(ip, mac, BindingSource::Iscsi, at);
        }
        let (kind, verb) = match event {
            SessionEvent::Started => ("iscsi_login", "logged in to"),
            SessionEvent::Ended => ("iscsi_logout", "left"),
        };
        let ev = NewBootEvent {
            mac,
            at,
            source: EventSource::Iscsi,
            kind: kind.into(),
            detail: format!("{} {verb} {name}", login.initiator),
            ip: ip.map(|i| i.to_string()),
        };
        if let Err(error) = self.store.add_event(&ev) {
            tracing::warn!(%error, kind, "recording an iSCSI event failed");
        }
    }
}

/// The ISO installers as targets: (last part of the target name, path). The name is the
/// installer's display name in IQN characters ([`name::part`]: lower-case letters, digits, `-`, `.`;
/// everything else becomes `-`, a `.iso` suffix goes); when two installers come out the
/// same, the later ones (by id) get `-<id>` appended.
pub fn installer_targets(installers: &[Installer]) -> Vec<(String, String)> {
    let mut isos: Vec<&Installer> = installers
        .iter()
        .filter(|i| i.kind == InstallerKind::Iso)
        .collect();
    isos.sort_by_key(|i| i.id);
    let mut taken = HashSet::new();
    let mut out = Vec::new();
    for i in isos {
        let part = name::part(&i.name);
        let stem = part.strip_suffix(".iso").unwrap_or(&part);
        // No runs of `-`, none at either end.
        let mut name = stem
            .split('-')
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join("-");
        if name.is_empty() {
            name = "iso".into();
        }
        if !taken.insert(name.clone()) {
            name = format!("{name}-{}", i.id);
            taken.insert(name.clone());
        }
        out.push((name, i.path.clone()));
    }
    out
}

/// A device's CHAP as the login needs it.
fn chap_credentials(c: &ChapCredentials) -> chap::Credentials {
    chap::Credentials {
        initiator: chap::Secret {
            user: c.user.clone(),
            secret: c.secret.as_bytes().to_vec(),
        },
        target: c
            .target_user
            .as_ref()
            .zip(c.target_secret.as_ref())
            .map(|(user, secret)| chap::Secret {
                user: user.clone(),
                secret: secret.as_bytes().to_vec(),
            }),
    }
}

/// Whether an initiator name carries `mac` as its last token: everything after the last
/// `:` in a spelling [`MacAddr`] reads (`aa-bb-cc-dd-ee-ff`, as the boot scripts set it,
/// [`crate::boot::ipxe::initiator_iqn`]; `aabbccddeeff`; `aabb.ccdd.eeff`), or its last
/// six `:`-separated parts (`...:aa:bb:cc:dd:ee:ff`). A MAC elsewhere in the name, or hex
/// digits that merely contain it, do not count.
fn initiator_carries(initiator: &str, mac: MacAddr) -> bool {
    let last = initiator.rsplit(':').next().unwrap_or_default();
    if last.parse::<MacAddr>() == Ok(mac) {
        return true;
    }
    let mut parts = initiator.rsplitn(7, ':');
    let six: Vec<&str> = parts.by_ref().take(6).collect();
    // Exactly six parts after a separator, each two digits (MacAddr checks the groups).
    parts.next().is_some()
        && six.len() == 6
        && six
            .iter()
            .rev()
            .copied()
            .collect::<Vec<_>>()
            .join(":")
            .parse::<MacAddr>()
            == Ok(mac)
}

/// A stable NAA identifier for an image: NAA 6 (IEEE registered extended) with a locally
/// administered company ID, and the name's FNV-1a hash as vendor-specific bits.
fn naa_id(name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (0x6u64 << 60) | (0x02_6e_62u64 << 36) | (h & 0xf_ffff_ffff)
}

/// The driver that runs the accepted connections.
#[derive(Debug)]
pub enum IscsiRunner {
    /// Every connection on one io_uring ([`crate::driver::uring::iscsi`]).
    Uring(crate::driver::uring::iscsi::Handle),
    /// One tokio task per connection.
    Tokio,
}

impl IscsiRunner {
    /// Starts the driver `choice` (the io_uring one with `uring`); when the io_uring
    /// driver cannot be set up (old kernel, io_uring disabled by sysctl or seccomp), warns
    /// and falls back to tokio.
    pub fn start(
        choice: IscsiDriver,
        uring: crate::driver::uring::iscsi::Options,
        targets: &Arc<dyn Targets>,
        sessions: &Arc<Sessions>,
    ) -> Self {
        match choice {
            IscsiDriver::Uring => {
                match crate::driver::uring::iscsi::spawn(
                    Arc::clone(targets),
                    Arc::clone(sessions),
                    uring,
                ) {
                    Ok(handle) => Self::Uring(handle),
                    Err(error) => {
                        tracing::warn!(%error, "io_uring unavailable for iSCSI; using the tokio driver");
                        Self::Tokio
                    }
                }
            }
            IscsiDriver::Tokio => Self::Tokio,
        }
    }

    /// Which driver runs.
    pub fn kind(&self) -> IscsiDriver {
        match self {
            Self::Uring(_) => IscsiDriver::Uring,
            Self::Tokio => IscsiDriver::Tokio,
        }
    }
}

/// Accepts connections until `stop` turns true, and runs them on `runner`. Stopping the
/// io_uring driver closes its connections; tokio connection tasks run on until the
/// runtime ends.
pub async fn serve(
    listener: TcpListener,
    targets: Arc<dyn Targets>,
    sessions: Arc<Sessions>,
    tally: Option<Arc<Tally>>,
    (runner, login_timeout): (IscsiRunner, Option<Duration>),
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let tsih = Arc::new(AtomicU16::new(1));
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.changed() => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(error) => {
                tracing::warn!(%error, "iSCSI accept failed");
                continue;
            }
        };
        let local = stream
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 3260)));
        let mut handle = tsih.fetch_add(1, Ordering::Relaxed);
        if handle == 0 {
            handle = tsih.fetch_add(1, Ordering::Relaxed);
        }
        // A fresh CHAP challenge per connection, from the thread-local CSPRNG.
        let challenge = chap::Challenge {
            id: rand::random(),
            bytes: rand::random(),
        };
        let conn = Connection::new(Arc::clone(&targets), portal(local), handle, challenge);
        let login_deadline = login_timeout.map(|t| Instant::now() + t);
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%peer, %error, "TCP_NODELAY");
        }
        if let IscsiRunner::Uring(ring) = &runner {
            match stream.into_std() {
                Ok(stream) => ring.add(crate::driver::uring::iscsi::NewConn::new(
                    stream,
                    (peer, local),
                    conn,
                    tally.as_ref(),
                    login_deadline,
                )),
                Err(error) => tracing::debug!(%peer, %error, "iSCSI socket handover"),
            }
            continue;
        }
        let targets = Arc::clone(&targets);
        let sessions = Arc::clone(&sessions);
        // Without eBPF, the connection's bytes count for its initiator in userspace.
        let stream = Counted::new(stream, tally.as_ref(), Service::Iscsi, peer, local);
        tokio::spawn(async move {
            let mut conn = conn;
            let mut login = None;
            let mut live = None;
            if let Err(error) = run(
                stream,
                &mut conn,
                (peer, local),
                (&targets, &sessions),
                (&mut login, &mut live),
                login_deadline,
            )
            .await
            {
                tracing::debug!(%peer, %error, "iSCSI connection ended");
            }
            if let Some(id) = live {
                sessions.unregister(id);
            }
            conn.end();
            if let Some(login) = login {
                tracing::info!(initiator = %login.initiator, target = ?login.target, %peer, "iSCSI session ended");
                notify(&targets, SessionEvent::Ended, login).await;
            }
        });
    }
    if let IscsiRunner::Uring(ring) = runner {
        let _ = tokio::task::spawn_blocking(move || ring.stop()).await;
    }
}

/// `address:port` as SendTargets writes it (IPv6 in brackets).
pub(crate) fn portal(addr: SocketAddr) -> String {
    match addr {
        SocketAddr::V4(a) => a.to_string(),
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(v4) => format!("{v4}:{}", a.port()),
            None => format!("[{}]:{}", a.ip(), a.port()),
        },
    }
}

/// Tells the targets of a session event, on the blocking pool (it writes to the store).
async fn notify(targets: &Arc<dyn Targets>, event: SessionEvent, login: Login) {
    let targets = Arc::clone(targets);
    let _ = tokio::task::spawn_blocking(move || targets.session(event, &login)).await;
}

async fn run(
    mut stream: Counted<TcpStream>,
    conn: &mut Connection,
    (peer, local): (SocketAddr, SocketAddr),
    (targets, sessions): (&Arc<dyn Targets>, &Sessions),
    (login, live): (&mut Option<Login>, &mut Option<u64>),
    login_deadline: Option<Instant>,
) -> std::io::Result<()> {
    let mut end: Option<Arc<Notify>> = None;
    let stats = Arc::new(ConnStats::default());
    let wire = conn.wire();
    let mut decoder = Decoder::new(wire.max_data);
    let mut out = Outbox::default();
    loop {
        // Run what is ready, in order: reads of cached data right here, the rest (and
        // everything after the first of them, so nothing overtakes) in one batch on the
        // blocking pool; then send everything queued.
        let mut batch = Vec::new();
        while let Some(exec) = conn.poll_execute() {
            let handed = Instant::now();
            if batch.is_empty()
                && let Some(result) = exec.lun.try_execute(&exec.initiator, &exec.cdb)
            {
                conn.complete(exec.itt, result);
                stats.completed(handed);
                continue;
            }
            batch.push((handed, exec));
        }
        if !batch.is_empty() {
            let results = tokio::task::spawn_blocking(move || {
                batch
                    .into_iter()
                    .map(|(handed, e)| {
                        let result = e
                            .lun
                            .execute(&e.initiator, &e.cdb, &e.data_out.contiguous());
                        (handed, e.itt, result)
                    })
                    .collect::<Vec<_>>()
            })
            .await
            .map_err(std::io::Error::other)?;
            for (handed, itt, result) in results {
                conn.complete(itt, result);
                stats.completed(handed);
            }
        }
        if let Some(mut l) = conn.take_login() {
            l.peer = Some(peer);
            if let Some(target) = &l.target {
                let session = LiveSession {
                    initiator: l.initiator.clone(),
                    peer,
                };
                let e = Arc::new(Notify::new());
                let notify_end = Arc::clone(&e);
                let ender: Ender = Box::new(move || notify_end.notify_one());
                let Some(id) = sessions.register(target, session, local, Arc::clone(&stats), ender)
                else {
                    tracing::info!(initiator = %l.initiator, %target, %peer, "iSCSI login dropped: the image is being changed");
                    return Ok(());
                };
                *live = Some(id);
                end = Some(e);
            }
            tracing::info!(initiator = %l.initiator, target = ?l.target, %peer, "iSCSI session started");
            notify(targets, SessionEvent::Started, l.clone()).await;
            *login = Some(l);
        }
        while let Some(o) = conn.poll_transmit() {
            out.push(o);
        }
        let sent = out.send(&mut stream).await?;
        stats.tx_bytes.fetch_add(sent, Ordering::Relaxed);
        if conn.is_closing() {
            let (initiator, target) = conn.nexus();
            tracing::debug!(initiator, target, "iSCSI connection closed");
            return Ok(());
        }
        let ended = async {
            match &end {
                Some(e) => e.notified().await,
                None => std::future::pending().await,
            }
        };
        let login_expires = async {
            match login_deadline.filter(|_| conn.is_logging_in()) {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        let rx = decoder.room(READ_MIN, READ_CHUNK);
        let n = tokio::select! {
            n = stream.read_buf(rx) => n?,
            () = ended => {
                tracing::info!(%peer, "iSCSI session ended by image management");
                return Ok(());
            }
            () = login_expires => {
                tracing::debug!(%peer, "iSCSI login timed out: connection closed");
                return Ok(());
            }
        };
        if n == 0 {
            return Ok(());
        }
        stats.rx_bytes.fetch_add(n as u64, Ordering::Relaxed);
        loop {
            let wire = conn.wire();
            decoder.max_data = wire.max_data;
            decoder.header_digest = wire.header_digest;
            decoder.data_digest = wire.data_digest;
            match decoder.next_pdu() {
                Ok(Some(pdu)) => conn.handle(pdu),
                Ok(None) => break,
                Err(DecodeError::DataDigest { bhs }) => conn.decode_failed(Some(&bhs)),
                Err(error) => {
                    tracing::debug!(%error, "iSCSI connection dropped: malformed PDU");
                    conn.decode_failed(None);
                    break;
                }
            }
        }
    }
}

/// Bytes a connection asks the socket for at a time.
const READ_CHUNK: usize = 256 * 1024;
/// A read has room for at least this many bytes (the decoder's buffer grows by
/// [`READ_CHUNK`] when it has less).
const READ_MIN: usize = 64 * 1024;
/// Data segments up to this size are copied next to their header; larger ones are
/// written from where they are (one vectored write for everything queued).
const COPY_DATA_BELOW: usize = 2048;

/// The PDUs queued for one write: headers, trailers and small data segments in `frame`,
/// large data segments where the core left them.
#[derive(Default)]
pub(crate) struct Outbox {
    pdus: Vec<Outgoing>,
    frame: Vec<u8>,
    /// Pieces in order: a range of `frame`, or the data segment of `pdus[i]`.
    pieces: Vec<Piece>,
}

enum Piece {
    Frame(std::ops::Range<usize>),
    Data(usize),
    /// The file segment of `pdus[i]`, which the driver sends from where it staged it.
    File(usize),
}

/// A stretch of an [`Outbox`] that goes to the socket one way.
pub(crate) enum Run {
    /// Bytes in memory, as (pointer, length) pairs for an iovec: they stay valid while
    /// the outbox is neither changed nor dropped.
    Bytes(Vec<libc::iovec>),
    /// A data segment staged from the backing file.
    File(FileSegment),
}

impl Outbox {
    /// Whether nothing is queued.
    pub(crate) fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// The queued PDUs in order, as runs of bytes in memory between the file segments.
    pub(crate) fn runs(&self) -> Vec<Run> {
        let mut runs = Vec::new();
        let mut iov = Vec::new();
        for p in &self.pieces {
            let b: &[u8] = match p {
                Piece::Frame(r) => &self.frame[r.clone()],
                Piece::Data(i) => &self.pdus[*i].pdu.data,
                Piece::File(i) => {
                    if !iov.is_empty() {
                        runs.push(Run::Bytes(std::mem::take(&mut iov)));
                    }
                    if let Some(f) = &self.pdus[*i].file {
                        runs.push(Run::File(f.clone()));
                    }
                    continue;
                }
            };
            iov.push(libc::iovec {
                iov_base: b.as_ptr().cast_mut().cast(),
                iov_len: b.len(),
            });
        }
        if !iov.is_empty() {
            runs.push(Run::Bytes(iov));
        }
        runs
    }

    pub(crate) fn push(&mut self, o: Outgoing) {
        let data = &o.pdu.data;
        let mut start = self.frame.len();
        o.pdu
            .encode_header(o.data_len(), o.header_digest, &mut self.frame);
        if o.file.is_some() {
            // invariant: the core makes file segments only without data digests.
            self.frame_piece(start);
            self.pieces.push(Piece::File(self.pdus.len()));
            start = self.frame.len();
            encode_padding(o.data_len(), &mut self.frame);
            self.frame_piece(start);
            self.pdus.push(o);
            return;
        }
        if data.len() < COPY_DATA_BELOW {
            // Header, data and trailer: one piece.
            self.frame.extend_from_slice(data);
        } else {
            self.frame_piece(start);
            self.pieces.push(Piece::Data(self.pdus.len()));
            start = self.frame.len();
        }
        encode_trailer(data, o.data_digest, &mut self.frame);
        self.frame_piece(start);
        self.pdus.push(o);
    }

    /// Adds `frame[start..]` to the pieces, merged with a frame piece just before it.
    fn frame_piece(&mut self, start: usize) {
        let end = self.frame.len();
        if let Some(Piece::Frame(r)) = self.pieces.last_mut()
            && r.end == start
        {
            r.end = end;
        } else if end > start {
            self.pieces.push(Piece::Frame(start..end));
        }
    }

    /// Writes everything queued (vectored, resumed after partial writes), then empties;
    /// returns the bytes written.
    async fn send(&mut self, stream: &mut Counted<TcpStream>) -> std::io::Result<u64> {
        let mut total = 0u64;
        let mut slices = Vec::with_capacity(self.pieces.len());
        for p in &self.pieces {
            slices.push(match p {
                Piece::Frame(r) => IoSlice::new(&self.frame[r.clone()]),
                Piece::Data(i) => IoSlice::new(&self.pdus[*i].pdu.data),
                // invariant: this driver never stages reads, so no core result has a
                // file segment; refuse rather than send a PDU without its data.
                Piece::File(_) => return Err(std::io::ErrorKind::Unsupported.into()),
            });
        }
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            let n = stream.write_vectored(rest).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            total += n as u64;
            IoSlice::advance_slices(&mut rest, n);
        }
        drop(slices);
        self.pieces.clear();
        self.pdus.clear();
        self.frame.clear();
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initiator_names_carry_macs_in_any_spelling() {
        let mac: MacAddr = "52:54:00:12:34:56".parse().expect("mac");
        assert!(initiator_carries(
            "iqn.2026-01.org.netboot:client:52-54-00-12-34-56",
            mac
        ));
        assert!(initiator_carries("iqn.2010-04.org.ipxe:525400123456", mac));
        assert!(initiator_carries("iqn.x:52:54:00:12:34:56", mac));
        assert!(initiator_carries("iqn.x:5254.0012.3456", mac));
        assert!(initiator_carries("IQN.X:52-54-00-12-34-56", mac));
        assert!(!initiator_carries("iqn.x:52:54:00:12:34:57", mac));
    }

    /// The MAC is a whole token of the name, not any run of its hex digits: the `e` of
    /// "ipxe" followed by another device's hexraw MAC is not this device's.
    #[test]
    fn initiator_names_carry_a_mac_only_as_a_whole_token() {
        let other: MacAddr = "e5:25:40:01:23:45".parse().expect("mac");
        let mac: MacAddr = "52:54:00:12:34:56".parse().expect("mac");
        for name in [
            "iqn.2010-04.org.ipxe:525400123456",
            "iqn.2026-01.org.netboot:initiator:52-54-00-12-34-56",
            "iqn.x:52:54:00:12:34:56",
        ] {
            assert!(initiator_carries(name, mac), "{name}");
            assert!(!initiator_carries(name, other), "{name} carries {other}");
        }
        for name in [
            // The MAC in the middle, or as part of a longer token.
            "iqn.x:52-54-00-12-34-56:disk",
            "iqn.x:pc-525400123456",
            "iqn.x:5254001234567",
            "iqn.x:0:52:54:00:12:34:56:0",
            "iqn.2010-04.org.ipxe:52540012345",
        ] {
            assert!(!initiator_carries(name, mac), "{name}");
        }
    }

    #[test]
    fn installer_target_names_are_iqn_safe_and_unique() {
        let at = Timestamp(0);
        let inst = |id, name: &str, kind| Installer {
            id,
            path: format!("isos/{id}.iso"),
            name: name.into(),
            kind,
            arch: None,
            size_bytes: 0,
            description: String::new(),
            created_at: at,
            updated_at: at,
        };
        let list = [
            inst(3, "Debian 12 (netinst).iso", InstallerKind::Iso),
            inst(1, "debian_12 netinst", InstallerKind::Iso),
            inst(2, "Windows 11", InstallerKind::Windows),
            inst(4, "???", InstallerKind::Iso),
        ];
        assert_eq!(
            installer_targets(&list),
            vec![
                ("debian-12-netinst".into(), "isos/1.iso".into()),
                ("debian-12-netinst-3".into(), "isos/3.iso".into()),
                ("iso".into(), "isos/4.iso".into()),
            ]
        );
    }

    #[test]
    fn the_outbox_writes_the_bytes_encode_writes() {
        use crate::iscsi::pdu::{Pdu, op};
        let mut outbox = Outbox::default();
        let mut want = Vec::new();
        let mut queue = Vec::new();
        for (len, digests) in [
            (0, false),
            (5, true),
            (4096, false),
            (3001, true),
            (10, false),
        ] {
            let mut pdu = Pdu::new(op::DATA_IN);
            pdu.data = vec![len as u8; len].into();
            queue.push(Outgoing {
                pdu,
                file: None,
                header_digest: digests,
                data_digest: digests,
            });
        }
        // Two parts of one shared buffer, as a multi-PDU Data-In sends them.
        let buf = bytes::Bytes::from((0..10_000u32).map(|i| i as u8).collect::<Vec<u8>>());
        for range in [0..4998, 4998..10_000] {
            let mut pdu = Pdu::new(op::DATA_IN);
            pdu.data = buf.slice(range);
            queue.push(Outgoing {
                pdu,
                file: None,
                header_digest: false,
                data_digest: true,
            });
        }
        for o in queue {
            o.encode(&mut want);
            outbox.push(o);
        }
        let got = piece_bytes(&outbox);
        assert!(got == want, "the pieces differ from the encoded PDUs");
        assert!(
            outbox.pieces.len() < 2 * 7,
            "small PDUs share pieces: {}",
            outbox.pieces.len()
        );
    }

    /// The bytes the outbox's pieces stand for, in order; a file segment's come from its
    /// holder, which the tests make a `Vec<u8>` of the file's bytes.
    fn piece_bytes(outbox: &Outbox) -> Vec<u8> {
        outbox
            .pieces
            .iter()
            .flat_map(|p| match p {
                Piece::Frame(r) => outbox.frame[r.clone()].to_vec(),
                Piece::Data(i) => outbox.pdus[*i].pdu.data.to_vec(),
                Piece::File(i) => {
                    let f = outbox.pdus[*i].file.as_ref().expect("a file segment");
                    let held = Arc::clone(&f.data.holder)
                        .downcast::<Vec<u8>>()
                        .expect("the test's holder");
                    held[f.range.clone()].to_vec()
                }
            })
            .collect()
    }

    /// File segments become runs of their own, between runs of bytes that carry the
    /// headers, padding and other PDUs: the runs in order are the bytes `encode` writes for
    /// the same PDUs with their data in memory.
    #[test]
    fn the_outbox_runs_put_file_segments_between_their_headers() {
        use crate::iscsi::conn::FileSegment;
        use crate::iscsi::pdu::{Pdu, op};
        use crate::iscsi::scsi::FileData;
        let bytes: Arc<Vec<u8>> = Arc::new((0..20_000u32).map(|i| (i * 7) as u8).collect());
        let read = FileData {
            offset: 1 << 20,
            len: bytes.len(),
            holder: Arc::clone(&bytes) as Arc<dyn std::any::Any + Send + Sync>,
        };
        let mut outbox = Outbox::default();
        let mut want = Vec::new();
        // A small PDU, then a read cut into segments (one of a length that needs padding),
        // then a response.
        let mut first = Pdu::new(op::NOP_IN);
        first.data = vec![1, 2, 3].into();
        let mut queue = vec![(first, None)];
        for range in [0..8192, 8192..12_289, 12_289..20_000] {
            let mut p = Pdu::new(op::DATA_IN);
            p.set_u32(40, range.start as u32);
            queue.push((p, Some(range)));
        }
        queue.push((Pdu::new(op::SCSI_RESPONSE), None));
        for (pdu, range) in queue {
            let mut plain = pdu.clone();
            let file = range.map(|range| {
                plain.data = bytes[range.clone()].to_vec().into();
                FileSegment {
                    data: read.clone(),
                    range,
                }
            });
            Outgoing {
                pdu: plain,
                file: None,
                header_digest: true,
                data_digest: false,
            }
            .encode(&mut want);
            outbox.push(Outgoing {
                pdu,
                file,
                header_digest: true,
                data_digest: false,
            });
        }
        let runs = outbox.runs();
        let kinds: Vec<bool> = runs.iter().map(|r| matches!(r, Run::File(_))).collect();
        assert_eq!(kinds, [false, true, false, true, false, true, false]);
        let got = piece_bytes(&outbox);
        // The runs cover the same bytes: the file runs' ranges and the byte runs' iovecs.
        let run_len: usize = runs
            .iter()
            .map(|r| match r {
                Run::Bytes(iov) => iov.iter().map(|v| v.iov_len).sum(),
                Run::File(f) => f.range.len(),
            })
            .sum();
        assert_eq!(run_len, want.len());
        assert!(got == want, "the runs differ from the encoded PDUs");
    }

    #[test]
    fn naa_ids_are_stable_and_distinct() {
        assert_eq!(naa_id("win11"), naa_id("win11"));
        assert_ne!(naa_id("win11"), naa_id("win10"));
        assert_eq!(naa_id("x") >> 60, 6);
    }

    #[test]
    fn portals_bracket_ipv6() {
        assert_eq!(
            portal("10.0.0.1:3260".parse().expect("addr")),
            "10.0.0.1:3260"
        );
        assert_eq!(
            portal("[fd00::1]:3260".parse().expect("addr")),
            "[fd00::1]:3260"
        );
        assert_eq!(
            portal("[::ffff:10.0.0.1]:3260".parse().expect("addr")),
            "10.0.0.1:3260"
        );
    }
}
