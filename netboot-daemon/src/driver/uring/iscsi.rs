//! The iSCSI driver on io_uring: one ring on one dedicated thread runs every connection.
//!
//! Accepting stays on tokio ([`crate::service::iscsi::serve`]): a connection is accepted
//! once and lives long, so the accept rate does not matter, and the accept loop already
//! owns what a new connection needs (its TSIH, its CHAP challenge, its tally counter, the
//! stop watch). It hands the socket over with [`Handle::add`] (a channel and an eventfd
//! the ring reads).
//!
//! Ring layout (all on one `IoUring`, one `io_uring_enter` per loop iteration):
//! - per connection, one `RECV` at a time straight into the PDU decoder's spare capacity;
//! - per connection, one `SENDMSG` at a time carrying every PDU queued since the last one
//!   (headers and small segments copied into one frame, Data-In segments sent from the
//!   buffer the backing file was read into; `MSG_NOSIGNAL`), resumed after partial sends;
//! - the backing file's `READ`, `WRITE` and `FSYNC(DATASYNC)` for READ, WRITE and
//!   SYNCHRONIZE CACHE ([`crate::iscsi::scsi::Lun::stage`]): a read fills a fresh
//!   buffer that becomes the Data-In as it is (no copy); a write is made durable with an
//!   fdatasync before its completion when FUA or WCE=0 asks for it;
//! - a `READ` of an eventfd: new connections, results of commands run off the ring, and
//!   sessions ended by image management arrive through a channel and this wakes the ring.
//!
//! Several commands of one connection run at once; one waits for an earlier one only
//! when they conflict (overlapping ranges where one writes, a flush after a write), and
//! the commands whose medium I/O the LUN does itself (VERIFY, WRITE SAME, UNMAP, COMPARE
//! AND WRITE) run alone, on a short-lived thread, in order.
//!
//! Buffer ownership: a connection (its decoder buffer, the receive's target) lives until
//! every request naming it has completed: closing it shuts the socket down (which ends
//! its receive and send) and waits. Every send owns its boxed outbox, iovecs and msghdr,
//! every file request its buffer and an `Arc` of the LUN that keeps the file open, in the
//! `ops` slab until their CQE.
//!
//! The driver makes no protocol decision: it feeds [`Connection`] and carries out its
//! outputs; sessions, counters and session events are the service's
//! ([`crate::service::iscsi`]).

use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::sync::mpsc;
use std::sync::{Arc, atomic::Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use io_uring::types::{CancelBuilder, Fd, FsyncFlags, SubmitArgs, Timespec};
use io_uring::{IoUring, opcode, squeue};
use slab::Slab;

use crate::ebpf::Service;
use crate::iscsi::conn::{Connection, Exec, Login, SessionEvent, Targets};
use crate::iscsi::pdu::{DecodeError, Decoder};
use crate::iscsi::scsi::{Lun, ScsiResult, Staged, StagedIo};
use crate::service::iscsi::{ConnStats, Ender, LiveSession, Outbox, Sessions};
use crate::service::tally::{Counted, Tally};

const SQ_ENTRIES: u32 = 512;
const CQ_ENTRIES: u32 = 4096;
/// Bytes a receive asks the socket for at most.
const READ_CHUNK: usize = 256 * 1024;
/// iovecs per `SENDMSG` (the kernel's `UIO_MAXIOV`).
const IOV_MAX: usize = 1024;
/// How long shutdown waits for the connections' requests.
const DRAIN_LIMIT: Duration = Duration::from_secs(5);

const TAG_WAKE: u64 = 1 << 56;
const TAG_OP: u64 = 2 << 56;
const TAG_CANCEL: u64 = 3 << 56;

/// A connection: which slab slot and which occupant of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Key {
    idx: usize,
    generation: u32,
}

/// A connection accepted by the tokio accept loop, for the ring.
pub(crate) struct NewConn {
    /// The socket (`TCP_NODELAY` set).
    pub stream: TcpStream,
    /// The initiator's address.
    pub peer: SocketAddr,
    /// The target's address.
    pub local: SocketAddr,
    /// The protocol core for it.
    pub core: Connection,
    /// Its bytes, for the userspace tally.
    pub counted: Counted<()>,
}

impl NewConn {
    /// A connection counted in `tally` when there is one.
    pub(crate) fn new(
        stream: TcpStream,
        (peer, local): (SocketAddr, SocketAddr),
        core: Connection,
        tally: Option<&Arc<Tally>>,
    ) -> Self {
        Self {
            stream,
            peer,
            local,
            core,
            counted: Counted::new((), tally, Service::Iscsi, peer, local),
        }
    }
}

enum Msg {
    Conn(Box<NewConn>),
    /// Image management ends the connection's session.
    End(Key),
    /// A command run off the ring finished.
    Done {
        key: Key,
        seq: u64,
        itt: u32,
        handed: Instant,
        result: ScsiResult,
    },
    Stop,
}

/// The channel into the ring and the eventfd that wakes it.
#[derive(Clone)]
struct Chan {
    tx: mpsc::Sender<Msg>,
    wake: Arc<OwnedFd>,
}

impl Chan {
    fn send(&self, msg: Msg) {
        if self.tx.send(msg).is_ok() {
            let one: u64 = 1;
            // SAFETY: write(2) of 8 bytes from a live u64 to an eventfd this `Arc` keeps open.
            let _ = unsafe {
                libc::write(
                    self.wake.as_raw_fd(),
                    (&raw const one).cast(),
                    size_of::<u64>(),
                )
            };
        }
    }
}

/// The running driver. Stopping (or dropping) it closes every connection (their
/// sessions end as on a lost connection) and joins its threads.
pub struct Handle {
    chan: Chan,
    thread: Option<JoinHandle<()>>,
    notifier: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle").finish_non_exhaustive()
    }
}

impl Handle {
    /// Hands an accepted connection to the ring.
    pub(crate) fn add(&self, conn: NewConn) {
        self.chan.send(Msg::Conn(Box::new(conn)));
    }

    /// Stops the driver and waits for its threads.
    pub fn stop(self) {}
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.chan.send(Msg::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(t) = self.notifier.take() {
            let _ = t.join();
        }
    }
}

/// Starts the driver on its own thread. Fails when the ring cannot be set up (io_uring
/// disabled, or a kernel without the operations it uses).
pub fn spawn(targets: Arc<dyn Targets>, sessions: Arc<Sessions>) -> io::Result<Handle> {
    // SAFETY: eventfd(2) with valid flags; a non-negative result is a new descriptor we own.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor owned by nothing else.
    let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
    let (tx, rx) = mpsc::channel();
    let chan = Chan {
        tx,
        wake: Arc::clone(&wake),
    };
    // Session events write to the store: one thread runs them, in order.
    let (events, events_rx) = mpsc::channel::<(SessionEvent, Login)>();
    let notifier = std::thread::Builder::new()
        .name("iscsi-events".into())
        .spawn(move || {
            for (event, login) in events_rx {
                targets.session(event, &login);
            }
        })?;
    let ring_chan = chan.clone();
    let thread = super::start_ring_thread(
        "iscsi-ring".into(),
        "iSCSI io_uring driver failed; iSCSI connections are stopped",
        move || Driver::new(rx, ring_chan, wake, sessions, events),
    )?;
    Ok(Handle {
        chan,
        thread: Some(thread),
        notifier: Some(notifier),
    })
}

/// What a running or waiting command does to the medium, for ordering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Flush,
    /// Runs alone: nothing else of the connection runs at the same time.
    Barrier,
}

struct Active {
    seq: u64,
    kind: Kind,
    range: std::ops::Range<u64>,
}

impl Active {
    /// Whether a command `kind` over `range` must wait for this one.
    fn blocks(&self, kind: Kind, range: &std::ops::Range<u64>) -> bool {
        let overlap = self.range.start < range.end && range.start < self.range.end;
        match (kind, self.kind) {
            (Kind::Barrier, _) | (_, Kind::Barrier) => true,
            (Kind::Flush, Kind::Write) => true,
            (Kind::Write, Kind::Read | Kind::Write) | (Kind::Read, Kind::Write) => overlap,
            _ => false,
        }
    }
}

/// A staged command waiting for its turn.
struct Planned {
    itt: u32,
    lun: Arc<Lun>,
    handed: Instant,
    work: Work,
}

enum Work {
    /// File I/O on the ring; the Data-Out of a write.
    Io(StagedIo, Vec<u8>),
    /// [`Lun::execute`] off the ring.
    Blocking(Exec),
}

impl Planned {
    fn kind(&self) -> (Kind, std::ops::Range<u64>) {
        match &self.work {
            Work::Io(StagedIo::Read { offset, len, .. }, _) => {
                (Kind::Read, *offset..offset + *len as u64)
            }
            Work::Io(StagedIo::Write { offset, len, .. }, _) => {
                (Kind::Write, *offset..offset + *len as u64)
            }
            Work::Io(StagedIo::Flush { .. }, _) => (Kind::Flush, 0..u64::MAX),
            Work::Blocking(_) => (Kind::Barrier, 0..u64::MAX),
        }
    }
}

struct Conn {
    generation: u32,
    stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    core: Connection,
    decoder: Decoder,
    stats: Arc<ConnStats>,
    counted: Counted<()>,
    login: Option<Login>,
    live: Option<u64>,
    recv_armed: bool,
    sending: bool,
    out: Outbox,
    waiting: VecDeque<Planned>,
    active: Vec<Active>,
    next_seq: u64,
    /// Requests on the ring and commands off it that name this connection.
    ops: usize,
    closing: bool,
    span: tracing::Span,
}

/// A request in flight that owns memory the kernel uses.
enum Op {
    Recv {
        key: Key,
    },
    Send {
        key: Key,
        out: Box<Outbox>,
        iov: Vec<libc::iovec>,
        /// The first iovec not sent completely.
        at: usize,
        msg: Box<libc::msghdr>,
    },
    File(Box<FileOp>),
}

struct FileOp {
    key: Key,
    seq: u64,
    itt: u32,
    handed: Instant,
    lun: Arc<Lun>,
    io: StagedIo,
    /// Read: filled up to `done`; write: the data.
    buf: Vec<u8>,
    done: usize,
    /// The transfer is done: the fdatasync is what runs.
    syncing: bool,
}

struct Driver {
    // Declared first, so dropped first: the ring goes before any memory it used.
    ring: IoUring,
    rx: mpsc::Receiver<Msg>,
    chan: Chan,
    wake: Arc<OwnedFd>,
    wake_buf: Box<u64>,
    wake_armed: bool,
    conns: Slab<Conn>,
    next_generation: u32,
    ops: Slab<Op>,
    inflight: usize,
    dirty: Vec<Key>,
    sessions: Arc<Sessions>,
    events: mpsc::Sender<(SessionEvent, Login)>,
    stopping: Option<Instant>,
}

impl Driver {
    fn new(
        rx: mpsc::Receiver<Msg>,
        chan: Chan,
        wake: Arc<OwnedFd>,
        sessions: Arc<Sessions>,
        events: mpsc::Sender<(SessionEvent, Login)>,
    ) -> io::Result<Self> {
        let ring = super::ring_for(
            SQ_ENTRIES,
            CQ_ENTRIES,
            &[
                (opcode::Recv::CODE, "RECV"),
                (opcode::SendMsg::CODE, "SENDMSG"),
                (opcode::Read::CODE, "READ"),
                (opcode::Write::CODE, "WRITE"),
                (opcode::Fsync::CODE, "FSYNC"),
                (opcode::AsyncCancel2::CODE, "ASYNC_CANCEL"),
            ],
        )?;
        Ok(Self {
            ring,
            rx,
            chan,
            wake,
            wake_buf: Box::new(0),
            wake_armed: false,
            conns: Slab::new(),
            next_generation: 0,
            ops: Slab::new(),
            inflight: 0,
            dirty: Vec::new(),
            sessions,
            events,
            stopping: None,
        })
    }

    /// Queues an SQE, flushing the submission queue once if it is full.
    ///
    /// # Safety
    ///
    /// Every buffer and descriptor the entry points to must stay valid, and unmoved, until
    /// the request's CQE.
    unsafe fn push(&mut self, sqe: &squeue::Entry) -> bool {
        for attempt in 0..2 {
            // SAFETY: the caller guarantees what the entry points to (see above).
            if unsafe { self.ring.submission().push(sqe) }.is_ok() {
                self.inflight += 1;
                return true;
            }
            if attempt == 0 {
                let _ = self.ring.submit();
            }
        }
        false
    }

    fn arm_wake(&mut self) -> io::Result<()> {
        let sqe = opcode::Read::new(
            Fd(self.wake.as_raw_fd()),
            (&raw mut *self.wake_buf).cast(),
            8,
        )
        .build()
        .user_data(TAG_WAKE);
        // SAFETY: the boxed counter and the eventfd live as long as the driver.
        self.wake_armed = unsafe { self.push(&sqe) };
        if self.wake_armed {
            Ok(())
        } else {
            Err(io::Error::other("cannot queue the eventfd read"))
        }
    }

    fn conn(&mut self, key: Key) -> Option<&mut Conn> {
        conn_of(&mut self.conns, key)
    }

    fn mark(&mut self, key: Key) {
        self.dirty.push(key);
    }

    /// Submits what is queued and waits for a completion (while stopping, at most 50 ms).
    fn wait(&mut self) -> io::Result<()> {
        let r = if self.stopping.is_some() {
            let ts = Timespec::from(Duration::from_millis(50));
            let args = SubmitArgs::new().timespec(&ts);
            self.ring.submitter().submit_with_args(1, &args)
        } else {
            self.ring.submit_and_wait(1)
        };
        match r {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn drain_messages(&mut self) {
        while let Ok(msg) = self.rx.try_recv() {
            match msg {
                Msg::Conn(nc) => self.add(*nc),
                Msg::End(key) => {
                    if let Some(c) = self.conn(key)
                        && !c.closing
                    {
                        let _enter = c.span.clone().entered();
                        tracing::info!(peer = %c.peer, "iSCSI session ended by image management");
                        self.close(key);
                    }
                }
                Msg::Done {
                    key,
                    seq,
                    itt,
                    handed,
                    result,
                } => {
                    if let Some(c) = self.conn(key) {
                        c.ops -= 1;
                        c.active.retain(|a| a.seq != seq);
                        c.core.complete(itt, result);
                        c.stats.completed(handed);
                        self.mark(key);
                    }
                }
                Msg::Stop => {
                    self.stopping = Some(Instant::now());
                    let keys: Vec<Key> = self
                        .conns
                        .iter()
                        .map(|(idx, c)| Key {
                            idx,
                            generation: c.generation,
                        })
                        .collect();
                    for key in keys {
                        self.close(key);
                    }
                }
            }
        }
    }

    fn add(&mut self, nc: NewConn) {
        if self.stopping.is_some() {
            return;
        }
        let NewConn {
            stream,
            peer,
            local,
            core,
            counted,
        } = nc;
        if let Err(error) = stream.set_nonblocking(false) {
            tracing::debug!(%peer, %error, "iSCSI socket mode");
        }
        self.next_generation = self.next_generation.wrapping_add(1) & 0xff_ffff;
        let generation = self.next_generation;
        let decoder = Decoder::new(core.wire().max_data);
        let idx = self.conns.insert(Conn {
            generation,
            stream,
            peer,
            local,
            core,
            decoder,
            stats: Arc::new(ConnStats::default()),
            counted,
            login: None,
            live: None,
            recv_armed: false,
            sending: false,
            out: Outbox::default(),
            waiting: VecDeque::new(),
            active: Vec::new(),
            next_seq: 0,
            ops: 0,
            closing: false,
            span: tracing::debug_span!("iscsi", %peer),
        });
        self.mark(Key { idx, generation });
    }

    /// Runs what the core asks for: commands, the login, sends, the next receive.
    fn service(&mut self, key: Key) {
        let chan = self.chan.clone();
        let Some(c) = self.conn(key) else {
            return;
        };
        if c.closing {
            self.finish_if_idle(key);
            return;
        }
        self.run_commands(key);
        let Some(c) = conn_of(&mut self.conns, key) else {
            return;
        };
        if let Some(mut l) = c.core.take_login() {
            l.peer = Some(c.peer);
            if let Some(target) = &l.target {
                let session = LiveSession {
                    initiator: l.initiator.clone(),
                    peer: c.peer,
                };
                let ender: Ender = Box::new(move || chan.send(Msg::End(key)));
                match self
                    .sessions
                    .register(target, session, c.local, Arc::clone(&c.stats), ender)
                {
                    Some(id) => c.live = Some(id),
                    None => {
                        tracing::info!(initiator = %l.initiator, %target, peer = %c.peer, "iSCSI login dropped: the image is being changed");
                        self.close(key);
                        return;
                    }
                }
            }
            tracing::info!(initiator = %l.initiator, target = ?l.target, peer = %c.peer, "iSCSI session started");
            let _ = self.events.send((SessionEvent::Started, l.clone()));
            c.login = Some(l);
        }
        while let Some(o) = c.core.poll_transmit() {
            c.out.push(o);
        }
        if !c.sending && !c.out.is_empty() {
            self.send(key);
        }
        let Some(c) = self.conn(key) else {
            return;
        };
        if c.core.is_closing() {
            if !c.sending {
                let (initiator, target) = c.core.nexus();
                tracing::debug!(initiator, target, "iSCSI connection closed");
                self.close(key);
            }
            return;
        }
        if !c.recv_armed {
            self.recv(key);
        }
    }

    /// Stages the core's new commands and starts those whose turn it is.
    fn run_commands(&mut self, key: Key) {
        loop {
            let Some(c) = self.conn(key) else {
                return;
            };
            // Start waiting commands in order while they conflict with nothing running.
            if let Some(front) = c.waiting.front() {
                let (kind, range) = front.kind();
                if c.active.iter().all(|a| !a.blocks(kind, &range)) {
                    let p = c.waiting.pop_front().expect("invariant: front exists");
                    let seq = c.next_seq;
                    c.next_seq += 1;
                    c.active.push(Active { seq, kind, range });
                    self.start(key, seq, p);
                    continue;
                }
            }
            // Nothing is staged past a command that runs alone, which may change what
            // the ones after it see.
            let barrier = c
                .waiting
                .iter()
                .any(|p| matches!(p.work, Work::Blocking(_)))
                || c.active.iter().any(|a| a.kind == Kind::Barrier);
            if barrier {
                return;
            }
            let Some(exec) = c.core.poll_execute() else {
                return;
            };
            let handed = Instant::now();
            match exec.lun.stage(&exec.initiator, &exec.cdb, &exec.data_out) {
                Staged::Done(result) => {
                    c.core.complete(exec.itt, result);
                    c.stats.completed(handed);
                }
                Staged::Io(io) => {
                    let mut data = exec.data_out;
                    match io {
                        StagedIo::Write { len, .. } => data.truncate(len),
                        _ => data = Vec::new(),
                    }
                    c.waiting.push_back(Planned {
                        itt: exec.itt,
                        lun: exec.lun,
                        handed,
                        work: Work::Io(io, data),
                    });
                }
                Staged::Blocking => c.waiting.push_back(Planned {
                    itt: exec.itt,
                    lun: Arc::clone(&exec.lun),
                    handed,
                    work: Work::Blocking(exec),
                }),
            }
        }
    }

    fn start(&mut self, key: Key, seq: u64, p: Planned) {
        match p.work {
            Work::Io(io, data) => {
                let buf = match io {
                    StagedIo::Read { len, .. } => Vec::with_capacity(len),
                    _ => data,
                };
                let op = FileOp {
                    key,
                    seq,
                    itt: p.itt,
                    handed: p.handed,
                    lun: p.lun,
                    io,
                    buf,
                    done: 0,
                    syncing: matches!(io, StagedIo::Flush { .. }),
                };
                self.submit_file(Box::new(op));
            }
            Work::Blocking(exec) => {
                let chan = self.chan.clone();
                let itt = p.itt;
                let handed = p.handed;
                let run = move || {
                    let result = exec.lun.execute(&exec.initiator, &exec.cdb, &exec.data_out);
                    chan.send(Msg::Done {
                        key,
                        seq,
                        itt,
                        handed,
                        result,
                    });
                };
                if let Some(c) = self.conn(key) {
                    c.ops += 1;
                }
                // A command that does its own medium I/O (rare: VERIFY, WRITE SAME, UNMAP,
                // COMPARE AND WRITE) blocks; it gets a thread of its own.
                let spawned = std::thread::Builder::new()
                    .name("iscsi-exec".into())
                    .spawn(run);
                if let Err(error) = spawned {
                    tracing::warn!(%error, "iSCSI cannot start a command thread; the connection ends");
                    if let Some(c) = self.conn(key) {
                        c.ops -= 1;
                    }
                    self.close(key);
                }
            }
        }
    }

    /// Submits the next step of a file request, or finishes it.
    fn submit_file(&mut self, mut op: Box<FileOp>) {
        let Some(fd) = op.lun.file().map(std::os::fd::AsRawFd::as_raw_fd) else {
            // invariant: a LUN stages I/O only when its backing has a file.
            self.finish_file(op, Err(io::ErrorKind::Unsupported.into()));
            return;
        };
        let key = op.key;
        let entry = self.ops.vacant_entry();
        let ud = TAG_OP | entry.key() as u64;
        let file = Fd(fd);
        // The whole allocation: a read fills its spare capacity, a write sends its bytes.
        let base = op.buf.as_mut_ptr();
        let sqe = if op.syncing {
            opcode::Fsync::new(file).flags(FsyncFlags::DATASYNC).build()
        } else {
            match op.io {
                StagedIo::Read { offset, len, .. } => opcode::Read::new(
                    file,
                    // SAFETY: `done` is at most the capacity (`len`).
                    unsafe { base.add(op.done) },
                    (len - op.done) as u32,
                )
                .offset(offset + op.done as u64)
                .build(),
                StagedIo::Write { offset, .. } => opcode::Write::new(
                    file,
                    // SAFETY: `done` is at most the length.
                    unsafe { base.add(op.done) }.cast_const(),
                    (op.buf.len() - op.done) as u32,
                )
                .offset(offset + op.done as u64)
                .build(),
                StagedIo::Flush { .. } => {
                    opcode::Fsync::new(file).flags(FsyncFlags::DATASYNC).build()
                }
            }
        }
        .user_data(ud);
        entry.insert(Op::File(op));
        // SAFETY: the buffer is owned by the boxed FileOp in the ops slab until the CQE
        // (the Box's heap and the Vec's heap do not move); the LUN it holds keeps the
        // file open.
        if unsafe { self.push(&sqe) } {
            if let Some(c) = self.conn(key) {
                c.ops += 1;
            }
        } else if let Some(Op::File(op)) = self.ops.try_remove((ud & 0xffff_ffff) as usize) {
            self.finish_file(op, Err(io::Error::other("io_uring submission queue full")));
        }
    }

    #[allow(
        clippy::boxed_local,
        reason = "the op arrives boxed from the slab; unboxing it to call this is a move for nothing"
    )]
    fn finish_file(&mut self, op: Box<FileOp>, result: io::Result<()>) {
        let FileOp {
            key,
            seq,
            itt,
            handed,
            lun,
            io,
            buf,
            ..
        } = *op;
        let result = lun.finish_staged(&io, result.map(|()| buf));
        if let Some(c) = self.conn(key) {
            c.active.retain(|a| a.seq != seq);
            c.core.complete(itt, result);
            c.stats.completed(handed);
            self.mark(key);
        }
    }

    fn on_op(&mut self, idx: usize, res: i32) {
        let Some(op) = self.ops.try_remove(idx) else {
            return;
        };
        let key = match &op {
            Op::Recv { key } | Op::Send { key, .. } => *key,
            Op::File(f) => f.key,
        };
        if let Some(c) = self.conn(key) {
            c.ops -= 1;
        }
        match op {
            Op::Recv { key } => self.on_recv(key, res),
            Op::Send {
                key,
                out,
                iov,
                at,
                msg,
            } => self.on_send(key, res, (out, iov, at, msg)),
            Op::File(f) => self.on_file(f, res),
        }
        self.mark(key);
    }

    fn on_file(&mut self, mut op: Box<FileOp>, res: i32) {
        if res < 0 {
            if matches!(-res, libc::EINTR | libc::EAGAIN) {
                self.submit_file(op);
            } else {
                self.finish_file(op, Err(io::Error::from_raw_os_error(-res)));
            }
            return;
        }
        let n = res as usize;
        if op.syncing {
            self.finish_file(op, Ok(()));
            return;
        }
        match op.io {
            StagedIo::Read { len, .. } => {
                if n == 0 {
                    // Past the end of the file: zeros, as FileBacking::read_at.
                    op.buf.resize(len, 0);
                    op.done = len;
                } else {
                    op.done += n;
                    // SAFETY: the kernel initialised the `n` bytes after `len()`.
                    unsafe { op.buf.set_len(op.done) };
                }
                if op.done < len {
                    self.submit_file(op);
                } else {
                    self.finish_file(op, Ok(()));
                }
            }
            StagedIo::Write { flush, .. } => {
                if n == 0 {
                    self.finish_file(op, Err(io::ErrorKind::WriteZero.into()));
                    return;
                }
                op.done += n;
                if op.done < op.buf.len() {
                    self.submit_file(op);
                } else if flush {
                    op.syncing = true;
                    self.submit_file(op);
                } else {
                    self.finish_file(op, Ok(()));
                }
            }
            StagedIo::Flush { .. } => self.finish_file(op, Ok(())),
        }
    }

    fn recv(&mut self, key: Key) {
        let Some(c) = self.conn(key) else {
            return;
        };
        let fd = c.stream.as_raw_fd();
        let buf = c.decoder.buffer();
        buf.reserve(READ_CHUNK);
        let spare = (buf.capacity() - buf.len()).min(u32::MAX as usize);
        // SAFETY: `len()` is within the allocation.
        let ptr = unsafe { buf.as_mut_ptr().add(buf.len()) };
        let entry = self.ops.vacant_entry();
        let sqe = opcode::Recv::new(Fd(fd), ptr, spare as u32)
            .build()
            .user_data(TAG_OP | entry.key() as u64);
        let idx = entry.key();
        entry.insert(Op::Recv { key });
        // SAFETY: the decoder's buffer is neither touched nor reallocated until this
        // receive's CQE (only its completion reads the decoder), and the connection, with
        // its socket, lives until every request naming it has completed.
        if unsafe { self.push(&sqe) } {
            if let Some(c) = self.conn(key) {
                c.ops += 1;
                c.recv_armed = true;
            }
        } else {
            self.ops.remove(idx);
            self.close(key);
        }
    }

    fn on_recv(&mut self, key: Key, res: i32) {
        let Some(c) = self.conn(key) else {
            return;
        };
        c.recv_armed = false;
        if c.closing {
            return;
        }
        if res < 0 && matches!(-res, libc::EINTR | libc::EAGAIN) {
            return;
        }
        if res <= 0 {
            if res < 0 {
                let error = io::Error::from_raw_os_error(-res);
                tracing::debug!(peer = %c.peer, %error, "iSCSI connection ended");
            }
            self.close(key);
            return;
        }
        let n = res as usize;
        let buf = c.decoder.buffer();
        // SAFETY: the kernel initialised `n` bytes of the spare capacity it was given.
        unsafe { buf.set_len(buf.len() + n) };
        c.stats.rx_bytes.fetch_add(n as u64, Ordering::Relaxed);
        c.counted.moved(n, 0);
        loop {
            let wire = c.core.wire();
            c.decoder.max_data = wire.max_data;
            c.decoder.header_digest = wire.header_digest;
            c.decoder.data_digest = wire.data_digest;
            match c.decoder.next_pdu() {
                Ok(Some(pdu)) => c.core.handle(pdu),
                Ok(None) => break,
                Err(DecodeError::DataDigest { bhs }) => c.core.decode_failed(Some(&bhs)),
                Err(error) => {
                    tracing::warn!(%error, "iSCSI connection dropped: malformed PDU");
                    c.core.decode_failed(None);
                    break;
                }
            }
        }
    }

    fn send(&mut self, key: Key) {
        let Some(c) = self.conn(key) else {
            return;
        };
        let out = Box::new(std::mem::take(&mut c.out));
        let iov = out.iovecs();
        self.submit_send(key, (out, iov, 0, Box::new(zeroed_msghdr())));
    }

    #[allow(
        clippy::type_complexity,
        reason = "the parts of Op::Send, moved in and out"
    )]
    fn submit_send(
        &mut self,
        key: Key,
        (out, mut iov, at, mut msg): (Box<Outbox>, Vec<libc::iovec>, usize, Box<libc::msghdr>),
    ) {
        let Some(c) = self.conn(key) else {
            return;
        };
        let fd = c.stream.as_raw_fd();
        let rest = &mut iov[at..];
        msg.msg_iov = rest.as_mut_ptr();
        msg.msg_iovlen = rest.len().min(IOV_MAX);
        let entry = self.ops.vacant_entry();
        let sqe = opcode::SendMsg::new(Fd(fd), &raw const *msg)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build()
            .user_data(TAG_OP | entry.key() as u64);
        let idx = entry.key();
        entry.insert(Op::Send {
            key,
            out,
            iov,
            at,
            msg,
        });
        // SAFETY: the msghdr, the iovecs and the bytes they point to (the boxed outbox's
        // buffers and the shared Data-In buffers it holds) are owned by the op in the
        // slab until the CQE; none of their heap allocations moves.
        if unsafe { self.push(&sqe) } {
            if let Some(c) = self.conn(key) {
                c.ops += 1;
                c.sending = true;
            }
        } else {
            self.ops.remove(idx);
            self.close(key);
        }
    }

    #[allow(
        clippy::type_complexity,
        reason = "the parts of Op::Send, moved in and out"
    )]
    fn on_send(
        &mut self,
        key: Key,
        res: i32,
        (out, mut iov, mut at, msg): (Box<Outbox>, Vec<libc::iovec>, usize, Box<libc::msghdr>),
    ) {
        let Some(c) = self.conn(key) else {
            return;
        };
        c.sending = false;
        if c.closing {
            return;
        }
        if res < 0 && matches!(-res, libc::EINTR | libc::EAGAIN) {
            self.submit_send(key, (out, iov, at, msg));
            return;
        }
        if res <= 0 {
            let error = if res < 0 {
                io::Error::from_raw_os_error(-res)
            } else {
                io::ErrorKind::WriteZero.into()
            };
            tracing::debug!(peer = %c.peer, %error, "iSCSI connection ended");
            self.close(key);
            return;
        }
        let mut n = res as usize;
        c.stats.tx_bytes.fetch_add(n as u64, Ordering::Relaxed);
        c.counted.moved(0, n);
        while at < iov.len() && n >= iov[at].iov_len {
            n -= iov[at].iov_len;
            at += 1;
        }
        if at < iov.len() {
            let v = &mut iov[at];
            // SAFETY: `n` is less than this iovec's length: still inside its buffer.
            v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
            v.iov_len -= n;
            self.submit_send(key, (out, iov, at, msg));
        }
    }

    /// Ends a connection: no more receives; the socket is shut down so that its requests
    /// end; it goes once none is left.
    fn close(&mut self, key: Key) {
        let Some(c) = self.conn(key) else {
            return;
        };
        if !c.closing {
            c.closing = true;
            let _ = c.stream.shutdown(std::net::Shutdown::Both);
        }
        self.mark(key);
    }

    fn finish_if_idle(&mut self, key: Key) {
        let Some(c) = self.conn(key) else {
            return;
        };
        if c.ops > 0 {
            return;
        }
        let mut c = self.conns.remove(key.idx);
        if let Some(id) = c.live {
            self.sessions.unregister(id);
        }
        c.core.end();
        if let Some(login) = c.login.take() {
            tracing::info!(initiator = %login.initiator, target = ?login.target, peer = %c.peer, "iSCSI session ended");
            let _ = self.events.send((SessionEvent::Ended, login));
        }
        // Dropping the counter flushes the connection's last bytes to the tally; dropping
        // the stream closes the socket.
    }
}

fn zeroed_msghdr() -> libc::msghdr {
    // SAFETY: msghdr is plain data for which all zeros is valid (no name, no control).
    unsafe { std::mem::zeroed() }
}

fn conn_of(conns: &mut Slab<Conn>, key: Key) -> Option<&mut Conn> {
    conns
        .get_mut(key.idx)
        .filter(|c| c.generation == key.generation)
}

impl super::RingDriver for Driver {
    fn run(&mut self) -> io::Result<()> {
        self.arm_wake()?;
        let mut cqes: Vec<(u64, i32)> = Vec::with_capacity(CQ_ENTRIES as usize);
        loop {
            if let Some(since) = self.stopping {
                if self.conns.is_empty() {
                    return Ok(());
                }
                if since.elapsed() > DRAIN_LIMIT {
                    return Err(io::Error::other("connections did not close in time"));
                }
            }
            self.wait()?;
            cqes.clear();
            cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            for &(ud, res) in &cqes {
                self.inflight = self.inflight.saturating_sub(1);
                match ud & (0xff << 56) {
                    TAG_WAKE => {
                        self.wake_armed = false;
                        self.drain_messages();
                    }
                    TAG_OP => self.on_op((ud & 0xffff_ffff) as usize, res),
                    _ => {}
                }
            }
            while let Some(key) = self.dirty.pop() {
                self.service(key);
            }
            if !self.wake_armed {
                self.arm_wake()?;
            }
        }
    }

    /// Cancels what is left and waits for it before any buffer is freed.
    fn shutdown(mut self) {
        let sqe = opcode::AsyncCancel2::new(CancelBuilder::any())
            .build()
            .user_data(TAG_CANCEL);
        // SAFETY: a cancellation points at no memory.
        unsafe { self.push(&sqe) };
        let limit = Instant::now() + DRAIN_LIMIT;
        while self.inflight > 0 && Instant::now() < limit {
            let ts = Timespec::from(Duration::from_millis(50));
            let args = SubmitArgs::new().timespec(&ts);
            let _ = self.ring.submitter().submit_with_args(1, &args);
            let done = self.ring.completion().count();
            self.inflight = self.inflight.saturating_sub(done);
        }
        if self.inflight > 0 {
            tracing::warn!(
                requests = self.inflight,
                "io_uring requests still running at shutdown; leaking their buffers"
            );
            let Self {
                ring, ops, conns, ..
            } = self;
            drop(ring);
            std::mem::forget(ops);
            std::mem::forget(conns);
            return;
        }
        for (_, c) in &mut self.conns {
            if let Some(id) = c.live {
                self.sessions.unregister(id);
            }
            c.core.end();
            if let Some(login) = c.login.take() {
                let _ = self.events.send((SessionEvent::Ended, login));
            }
        }
        tracing::debug!("iSCSI io_uring driver stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn active(kind: Kind, range: std::ops::Range<u64>) -> Active {
        Active {
            seq: 0,
            kind,
            range,
        }
    }

    #[test]
    fn commands_wait_only_for_the_running_ones_they_conflict_with() {
        let read = active(Kind::Read, 0..4096);
        let write = active(Kind::Write, 4096..8192);
        // Reads share; a write waits for an overlapping read and the other way round.
        assert!(!read.blocks(Kind::Read, &(0..4096)));
        assert!(read.blocks(Kind::Write, &(2048..6144)));
        assert!(
            !read.blocks(Kind::Write, &(4096..8192)),
            "adjacent, not overlapping"
        );
        assert!(write.blocks(Kind::Read, &(8191..8192)));
        assert!(write.blocks(Kind::Write, &(0..4097)));
        assert!(!write.blocks(Kind::Read, &(0..4096)));
        // A flush waits for every running write, not for reads.
        assert!(write.blocks(Kind::Flush, &(0..u64::MAX)));
        assert!(!read.blocks(Kind::Flush, &(0..u64::MAX)));
        // A command that runs alone waits for everything, and everything for it.
        assert!(read.blocks(Kind::Barrier, &(0..u64::MAX)));
        let barrier = active(Kind::Barrier, 0..u64::MAX);
        assert!(barrier.blocks(Kind::Read, &(0..1)));
    }
}
