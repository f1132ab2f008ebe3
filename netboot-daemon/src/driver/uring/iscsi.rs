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
//! - per connection, one send at a time carrying every PDU queued since the last one, as
//!   one chain of linked requests: `SENDMSG` for the bytes in memory (headers and small
//!   segments copied into one frame, Data-In segments sent from the buffer the backing
//!   file was read into; `MSG_NOSIGNAL`) and `SPLICE` pipe -> socket for the segments of a
//!   spliced read, resumed from the first byte not sent after a short one;
//! - the backing file's `READ`, `WRITE` and `FSYNC(DATASYNC)` for READ, WRITE and
//!   SYNCHRONIZE CACHE ([`crate::iscsi::scsi::Lun::stage`]): a read of up to
//!   [`FIXED_SLOT`] bytes is a `READ_FIXED` into a slot of the ring's registered buffers
//!   ([`super::fixed`]; a plain `READ` into a fresh buffer when every slot is taken or the
//!   kernel would not register them), and that slot or buffer becomes the Data-In as it
//!   is (no copy); a write is made durable with an fdatasync before its completion when
//!   FUA or WCE=0 asks for it;
//! - the splice path: a read of [`SPLICE_MIN`] bytes or more whose Data-In the core
//!   takes as file data (no data digest, [`Exec::file_data_in`]) is a `SPLICE` file ->
//!   pipes instead (page references, no copy) and goes to the core as
//!   [`FileData`] once all of it is in the pipes, so that a read error still ends the
//!   command before any of its Data-In is sent; the end of the file, a kernel without
//!   `SPLICE` or a connection without a free pipe fall back to the copying read;
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
//! every file request its buffer (or its pipes) and an `Arc` of the LUN that keeps the file
//! open, in the `ops` slab until their CQE (a send's chain: until its last CQE). The pipes
//! of a spliced read live as long as a PDU of it is queued or being sent.
//!
//! The driver makes no protocol decision: it feeds [`Connection`] and carries out its
//! outputs; sessions, counters and session events are the service's
//! ([`crate::service::iscsi`]).

use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use io_uring::types::{Fd, FsyncFlags, SubmitArgs, Timespec};
use io_uring::{IoUring, opcode, squeue};
use slab::Slab;

use super::fixed::{self, FixedBufs, Slot};
use crate::ebpf::Service;
use crate::iscsi::conn::{Connection, Exec, Login, SessionEvent, Targets};
use crate::iscsi::pdu::{DecodeError, Decoder};
use crate::iscsi::scsi::{DataOut, FileData, Lun, ScsiResult, Staged, StagedIo};
use crate::service::iscsi::{ConnStats, Ender, LiveSession, Outbox, Run, Sessions};
use crate::service::tally::{Counted, Tally};

const SQ_ENTRIES: u32 = 512;
const CQ_ENTRIES: u32 = 4096;
/// Bytes a receive asks the socket for at most.
const READ_CHUNK: usize = 256 * 1024;
/// A receive has room for at least this many bytes (the decoder's buffer grows by
/// [`READ_CHUNK`] when it has less).
const READ_MIN: usize = 64 * 1024;
/// iovecs per `SENDMSG` (the kernel's `UIO_MAXIOV`).
const IOV_MAX: usize = 1024;
/// How long shutdown waits for the connections' requests.
const DRAIN_LIMIT: Duration = Duration::from_secs(5);
/// Bytes each pipe of the splice path is asked to hold (`F_SETPIPE_SZ`; the kernel's
/// default `pipe-max-size`); a read larger than a pipe takes several.
const PIPE_BYTES: usize = 1 << 20;
/// Pipes a connection has at most (two descriptors each), idle or holding reads; a read
/// that finds none left is read and copied.
const MAX_PIPES: usize = 16;
/// A pipe buffer holds at most one page of a file.
const PAGE: usize = 4096;
/// Requests in one send's chain at most.
const MAX_CHAIN: usize = 64;
/// Reads smaller than this are read and copied: for them the trips of two splices through
/// the kernel's workers cost more than the copies.
const SPLICE_MIN: usize = 64 * 1024;
/// Bytes in one slot of the registered buffers: reads up to this size go into one (larger
/// reads are spliced, or read into a buffer of their own).
const FIXED_SLOT: usize = SPLICE_MIN;
/// Slots registered at most (8 MiB, the default `RLIMIT_MEMLOCK` of an unprivileged user
/// on Debian 12); a kernel that refuses that many gets fewer.
const FIXED_SLOTS: u32 = 128;
/// Fewer slots than this are not worth registering.
const FIXED_SLOTS_MIN: u32 = 8;

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
    /// When it is closed unless its login is complete (`iscsi.login_timeout_secs`).
    pub login_deadline: Option<Instant>,
}

impl NewConn {
    /// A connection counted in `tally` when there is one.
    pub(crate) fn new(
        stream: TcpStream,
        (peer, local): (SocketAddr, SocketAddr),
        core: Connection,
        tally: Option<&Arc<Tally>>,
        login_deadline: Option<Instant>,
    ) -> Self {
        Self {
            stream,
            peer,
            local,
            core,
            counted: Counted::new((), tally, Service::Iscsi, peer, local),
            login_deadline,
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

/// How the driver runs (from `[iscsi]`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// How long the loop spins for a completion before it sleeps
    /// ([`super::poll_completions`]); zero: never.
    pub busy_poll: Duration,
    /// Send the Data-In of reads of 64 KiB and more from the page cache through pipes
    /// (`SPLICE`, done by io-wq workers) instead of reading it into a buffer and sending
    /// that (`iscsi.splice_reads`).
    pub splice_reads: bool,
    /// Send the Data-In of reads of 64 KiB and more whose pages are all in the page cache
    /// straight from there, through a mapping of the image, without reading them into a
    /// buffer (`iscsi.mapped_reads`); not with `splice_reads`.
    pub mapped_reads: bool,
}

/// Starts the driver on its own thread. Fails when the ring cannot be set up (io_uring
/// disabled, or a kernel without the operations it uses).
pub fn spawn(
    targets: Arc<dyn Targets>,
    sessions: Arc<Sessions>,
    opts: Options,
) -> io::Result<Handle> {
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
    let (events, events_rx) = mpsc::channel::<SessionMsg>();
    let notifier = std::thread::Builder::new()
        .name("iscsi-events".into())
        .spawn(move || {
            for (event, login, counted) in events_rx {
                targets.session(event, &login);
                // The connection's last bytes go to the tally only now, after its login
                // event bound the initiator's address to its device.
                drop(counted);
            }
        })?;
    let ring_chan = chan.clone();
    let thread = super::start_ring_thread(
        "iscsi-ring".into(),
        "iSCSI io_uring driver failed; iSCSI connections are stopped",
        move || Driver::new(rx, ring_chan, wake, sessions, events, opts),
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

/// A session event for the events thread, with the connection's counter when it ended.
type SessionMsg = (SessionEvent, Login, Option<Counted<()>>);

/// A staged command waiting for its turn.
struct Planned {
    itt: u32,
    lun: Arc<Lun>,
    handed: Instant,
    /// The core takes this read's Data-In as [`FileData`].
    file_data_in: bool,
    work: Work,
}

enum Work {
    /// File I/O on the ring; the Data-Out of a write.
    Io(StagedIo, DataOut),
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
    /// Empty pipes for the splice path, closed with the connection.
    pipes: PipePool,
    waiting: VecDeque<Planned>,
    active: Vec<Active>,
    next_seq: u64,
    /// Requests on the ring and commands off it that name this connection.
    ops: usize,
    closing: bool,
    span: tracing::Span,
}

impl Conn {
    /// Command `seq` (tag `itt`, handed out at `handed`) ended with `result`: it stops
    /// blocking the commands that conflict with it, and its response goes to the core.
    /// The caller marks the connection for service.
    fn finish(&mut self, seq: u64, itt: u32, handed: Instant, result: ScsiResult) {
        self.active.retain(|a| a.seq != seq);
        self.core.complete(itt, result);
        self.stats.completed(handed);
    }
}

/// A request in flight that owns memory the kernel uses.
enum Op {
    Recv { key: Key },
    Send(Box<SendOp>),
    File(Box<FileOp>),
}

/// One connection's send: the PDUs queued since the last one, as one chain of linked
/// requests (`IOSQE_IO_LINK`, so they run in order, one after the other, without a trip
/// through this thread): bytes in memory with `SENDMSG`, file segments with a `SPLICE`
/// from each pipe that holds a part of them. A short or failed request ends the chain (the
/// kernel cancels the rest); once every request of it has completed the send goes on from
/// the first byte not sent, with a new chain.
struct SendOp {
    key: Key,
    /// Owns the bytes the runs point to.
    #[allow(
        dead_code,
        reason = "never read: it keeps the bytes the runs point to until the last CQE"
    )]
    out: Outbox,
    runs: Vec<Run>,
    /// The run being sent.
    run: usize,
    /// In a run of bytes, the first iovec not sent completely; in a file segment, the
    /// bytes of it sent.
    at: usize,
    /// The chain in flight: each request's length and, once completed, its result.
    steps: Vec<(usize, Option<i32>)>,
    /// The msghdr of each `SENDMSG` of the chain (allocated once, never moved while it
    /// is in flight).
    msgs: Vec<libc::msghdr>,
    /// Requests of the chain without their completion yet.
    pending: usize,
}

/// One pipe of the splice path.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Pipe buffers (each holds at most a page of the file).
    slots: usize,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let mut fds = [0; 2];
        // SAFETY: pipe2(2) writes two descriptors into the array it is given.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors are fresh and owned by nothing else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // A smaller pipe (F_SETPIPE_SZ refused) still works: reads take more of them.
        // SAFETY: fcntl(2) on a descriptor we own, with integer arguments.
        unsafe {
            libc::fcntl(
                write.as_raw_fd(),
                libc::F_SETPIPE_SZ,
                PIPE_BYTES as libc::c_int,
            )
        };
        // SAFETY: as above.
        let size = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) };
        if size < PAGE as libc::c_int {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            read,
            write,
            slots: size as usize / PAGE,
        })
    }
}

/// A connection's pipes: the idle ones, and how many it has in all.
#[derive(Default)]
struct Pipes {
    idle: Vec<Pipe>,
    open: usize,
}

type PipePool = Arc<Mutex<Pipes>>;

/// A pipe holding bytes `start..start + len` of a spliced read.
struct Filled {
    pipe: Pipe,
    start: usize,
    len: usize,
    /// Pipe buffers used at most (each splice of `n` bytes at file offset `o` takes at
    /// most the pages it spans).
    used: usize,
    /// Bytes spliced on to the socket.
    drained: AtomicUsize,
}

/// A read spliced from the file into pipes: the holder of its [`FileData`]. Dropping it
/// gives the pipes that were drained back to the connection's pool and closes the others
/// (bytes the core cut off, or a connection that ended before they were sent).
struct Spliced {
    pipes: Vec<Filled>,
    pool: PipePool,
}

impl Spliced {
    fn new(pool: PipePool) -> Self {
        Self {
            pipes: Vec::new(),
            pool,
        }
    }

    /// The pipe the next bytes (`at` of the read, at file offset `file_at`) go to, and how
    /// many of them it surely has room for; a new pipe when the last one is full.
    fn room(&mut self, at: usize, file_at: u64) -> io::Result<(&Filled, usize)> {
        let head = file_at as usize % PAGE;
        let fits = |f: &Filled| {
            (f.pipe.slots - f.used)
                .saturating_mul(PAGE)
                .saturating_sub(head)
        };
        if self.pipes.last().is_none_or(|f| fits(f) == 0) {
            let mut pool = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
            let pipe = match pool.idle.pop() {
                Some(p) => p,
                None if pool.open < MAX_PIPES => {
                    let p = Pipe::new()?;
                    pool.open += 1;
                    p
                }
                None => return Err(io::Error::from_raw_os_error(libc::EMFILE)),
            };
            drop(pool);
            self.pipes.push(Filled {
                pipe,
                start: at,
                len: 0,
                used: 0,
                drained: AtomicUsize::new(0),
            });
        }
        let last = self
            .pipes
            .last()
            .expect("invariant: a pipe was just added if none was");
        let room = fits(last);
        if room == 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        Ok((last, room))
    }

    /// `n` bytes at file offset `file_at` went into the last pipe.
    fn filled(&mut self, n: usize, file_at: u64) {
        if let Some(f) = self.pipes.last_mut() {
            f.len += n;
            f.used += (file_at as usize % PAGE + n).div_ceil(PAGE);
        }
    }

    /// The last pipe took no more (the kernel found it full): the next bytes go to a new one.
    fn seal(&mut self) -> bool {
        match self.pipes.last_mut() {
            Some(f) if f.len > 0 => {
                f.used = f.pipe.slots;
                true
            }
            _ => false,
        }
    }

    /// The pipe holding byte `at` of the read and how many bytes of `at..end` it holds.
    fn segment(&self, at: usize, end: usize) -> Option<(&Filled, usize)> {
        let f = self
            .pipes
            .iter()
            .find(|f| f.start <= at && at < f.start + f.len)?;
        Some((f, end.min(f.start + f.len) - at))
    }
}

impl Drop for Spliced {
    fn drop(&mut self) {
        let mut pool = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
        for f in self.pipes.drain(..) {
            if f.drained.load(Ordering::Relaxed) == f.len {
                pool.idle.push(f.pipe);
            } else {
                // Bytes the core cut off are still in it: closed.
                pool.open -= 1;
            }
        }
    }
}

struct FileOp {
    key: Key,
    seq: u64,
    itt: u32,
    handed: Instant,
    lun: Arc<Lun>,
    io: StagedIo,
    /// Read: filled up to `done`.
    buf: Vec<u8>,
    /// Write: the data, as the connection received it.
    data: DataOut,
    /// Write: the iovecs of the `WRITEV` in flight (its segments from `done` on).
    iov: Vec<libc::iovec>,
    /// A read on the splice path: the pipes its bytes go to instead of `buf`.
    spliced: Option<Spliced>,
    /// A read into a registered buffer: the slot its bytes go to instead of `buf`.
    slot: Option<Slot>,
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
    events: mpsc::Sender<SessionMsg>,
    stopping: Option<Instant>,
    /// Connections with a login deadline, earliest first (every connection gets the same
    /// timeout, so in the order they came); checked once it passes.
    login_deadlines: VecDeque<(Instant, Key)>,
    /// The kernel has `IORING_OP_SPLICE`: reads whose Data-In the core takes as
    /// [`FileData`] go file -> pipe -> socket.
    splice: bool,
    /// Large reads of cached pages go to the socket through a mapping of the image
    /// (`iscsi.mapped_reads`).
    map_reads: bool,
    /// The registered buffers small reads go into, when the kernel registered them.
    fixed: Option<FixedBufs>,
    /// Spin this long for a completion before sleeping (`iscsi.busy_poll_us`).
    busy_poll: Duration,
}

impl Driver {
    fn new(
        rx: mpsc::Receiver<Msg>,
        chan: Chan,
        wake: Arc<OwnedFd>,
        sessions: Arc<Sessions>,
        events: mpsc::Sender<SessionMsg>,
        opts: Options,
    ) -> io::Result<Self> {
        let (ring, probe) = super::ring_for(
            SQ_ENTRIES,
            CQ_ENTRIES,
            &[
                (opcode::Recv::CODE, "RECV"),
                (opcode::SendMsg::CODE, "SENDMSG"),
                (opcode::Read::CODE, "READ"),
                (opcode::Writev::CODE, "WRITEV"),
                (opcode::Fsync::CODE, "FSYNC"),
                (opcode::AsyncCancel2::CODE, "ASYNC_CANCEL"),
            ],
        )?;
        let splice = opts.splice_reads && probe.is_supported(opcode::Splice::CODE);
        if opts.splice_reads && !splice {
            tracing::info!("io_uring lacks SPLICE: iSCSI Data-In is read and copied");
        }
        let fixed = if probe.is_supported(opcode::ReadFixed::CODE) {
            register_fixed(&ring)
        } else {
            tracing::info!("io_uring lacks READ_FIXED: iSCSI reads go into plain buffers");
            None
        };
        Ok(Self {
            splice,
            map_reads: opts.mapped_reads,
            fixed,
            busy_poll: opts.busy_poll,
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
            login_deadlines: VecDeque::new(),
        })
    }

    /// Queues an SQE ([`super::push_counted`]).
    ///
    /// # Safety
    ///
    /// Every buffer and descriptor the entry points to must stay valid, and unmoved, until
    /// the request's CQE.
    unsafe fn push(&mut self, sqe: &squeue::Entry) -> bool {
        // SAFETY: the caller's guarantee, passed on.
        unsafe { super::push_counted(&mut self.ring, &mut self.inflight, sqe) }
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

    /// Submits what is queued and waits for a completion (while stopping, at most 50 ms;
    /// otherwise spinning first for up to `busy_poll`).
    fn wait(&mut self) -> io::Result<()> {
        let limit = if self.stopping.is_some() {
            Some(Duration::from_millis(50))
        } else {
            self.login_deadlines
                .front()
                .map(|(d, _)| d.saturating_duration_since(Instant::now()))
        };
        let r = if let Some(limit) = limit {
            let ts = Timespec::from(limit.max(Duration::from_millis(1)));
            let args = SubmitArgs::new().timespec(&ts);
            self.ring.submitter().submit_with_args(1, &args)
        } else {
            match super::poll_completions(&mut self.ring, self.busy_poll) {
                Ok(true) => return Ok(()),
                Ok(false) => self.ring.submit_and_wait(1),
                Err(e) => Err(e),
            }
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
                        c.finish(seq, itt, handed, result);
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
            login_deadline,
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
            pipes: PipePool::default(),
            waiting: VecDeque::new(),
            active: Vec::new(),
            next_seq: 0,
            ops: 0,
            closing: false,
            span: tracing::debug_span!("iscsi", %peer),
        });
        let key = Key { idx, generation };
        if let Some(d) = login_deadline {
            self.login_deadlines.push_back((d, key));
        }
        self.mark(key);
    }

    /// Closes the connections whose login deadline has passed before their login
    /// completed.
    fn expire_logins(&mut self) {
        let now = Instant::now();
        while let Some(&(d, key)) = self.login_deadlines.front() {
            if d > now {
                break;
            }
            self.login_deadlines.pop_front();
            if let Some(c) = self.conn(key)
                && !c.closing
                && c.core.is_logging_in()
            {
                let _enter = c.span.clone().entered();
                tracing::debug!(peer = %c.peer, "iSCSI login timed out: connection closed");
                self.close(key);
            }
        }
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
            let _ = self.events.send((SessionEvent::Started, l.clone(), None));
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
                        _ => data = DataOut::new(),
                    }
                    c.waiting.push_back(Planned {
                        itt: exec.itt,
                        lun: exec.lun,
                        handed,
                        file_data_in: exec.file_data_in,
                        work: Work::Io(io, data),
                    });
                }
                Staged::Blocking => c.waiting.push_back(Planned {
                    itt: exec.itt,
                    lun: Arc::clone(&exec.lun),
                    handed,
                    file_data_in: false,
                    work: Work::Blocking(exec),
                }),
            }
        }
    }

    fn start(&mut self, key: Key, seq: u64, p: Planned) {
        match p.work {
            // A large read whose Data-In nothing here reads (no data digest) and whose
            // pages are all in the page cache: sent from there, with no read at all.
            Work::Io(io @ StagedIo::Read { offset, len, .. }, _)
                if self.map_reads
                    && p.file_data_in
                    && !self.splice
                    && len >= SPLICE_MIN
                    && let Some(bytes) = p.lun.mapped(offset, len) =>
            {
                let result = p.lun.finish_staged(&io, Ok(bytes));
                if let Some(c) = self.conn(key) {
                    c.stats
                        .mapped_bytes
                        .fetch_add(len as u64, Ordering::Relaxed);
                    c.finish(seq, p.itt, p.handed, result);
                    self.mark(key);
                }
            }
            Work::Io(io, data) => {
                // A read whose Data-In the core takes as file data goes through pipes.
                let splice = p.file_data_in && self.splice;
                let spliced = match (io, self.conn(key)) {
                    (StagedIo::Read { len, .. }, Some(c)) if splice && len >= SPLICE_MIN => {
                        Some(Spliced::new(Arc::clone(&c.pipes)))
                    }
                    _ => None,
                };
                // A small read goes into a registered buffer while one is free.
                let slot = match io {
                    StagedIo::Read { len, .. } if spliced.is_none() && len <= FIXED_SLOT => {
                        self.fixed.as_ref().and_then(FixedBufs::take)
                    }
                    _ => None,
                };
                let buf = match io {
                    StagedIo::Read { len, .. } if spliced.is_none() && slot.is_none() => {
                        Vec::with_capacity(len)
                    }
                    _ => Vec::new(),
                };
                let op = FileOp {
                    data,
                    iov: Vec::new(),
                    spliced,
                    slot,
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
                    let result =
                        exec.lun
                            .execute(&exec.initiator, &exec.cdb, &exec.data_out.contiguous());
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
        // The splice path: the next bytes into a pipe (never more than it has room for,
        // and without blocking on a full one, which nothing would drain).
        let mut spliced = None;
        if let (Some(sp), StagedIo::Read { offset, len, .. }) = (&mut op.spliced, op.io) {
            let file_at = offset + op.done as u64;
            match sp.room(op.done, file_at) {
                Ok((f, room)) => {
                    spliced = Some(
                        opcode::Splice::new(
                            Fd(fd),
                            file_at as i64,
                            Fd(f.pipe.write.as_raw_fd()),
                            -1,
                            (len - op.done).min(room) as u32,
                        )
                        .flags(libc::SPLICE_F_NONBLOCK)
                        .build(),
                    );
                }
                Err(error) => {
                    tracing::debug!(%error, "iSCSI read cannot use pipes; copying it");
                    to_copy(&mut op);
                }
            }
        }
        let entry = self.ops.vacant_entry();
        let ud = TAG_OP | entry.key() as u64;
        let file = Fd(fd);
        // The whole allocation: a read fills its spare capacity, a write sends its bytes.
        let base = op.buf.as_mut_ptr();
        let sqe = if let Some(sqe) = spliced {
            sqe
        } else if op.syncing {
            opcode::Fsync::new(file).flags(FsyncFlags::DATASYNC).build()
        } else {
            match op.io {
                StagedIo::Read { offset, len, .. } => {
                    let (at, n) = (offset + op.done as u64, (len - op.done) as u32);
                    match &op.slot {
                        // SAFETY: `done` is at most `len`, which fits in the slot.
                        Some(slot) => {
                            let to = unsafe { slot.ptr().add(op.done) };
                            opcode::ReadFixed::new(file, to, n, fixed::BUF_INDEX)
                                .offset(at)
                                .build()
                        }
                        // SAFETY: `done` is at most the capacity (`len`).
                        None => opcode::Read::new(file, unsafe { base.add(op.done) }, n)
                            .offset(at)
                            .build(),
                    }
                }
                StagedIo::Write { offset, .. } => {
                    // The segments as they arrived, from the first byte not written.
                    op.iov = iovecs_from(&op.data, op.done);
                    opcode::Writev::new(file, op.iov.as_ptr(), op.iov.len() as u32)
                        .offset(offset + op.done as u64)
                        .build()
                }
                StagedIo::Flush { .. } => {
                    opcode::Fsync::new(file).flags(FsyncFlags::DATASYNC).build()
                }
            }
        }
        .user_data(ud);
        entry.insert(Op::File(op));
        // SAFETY: the buffer (or the pipes, or the registered slot, or a write's segments and
        // their iovecs) is owned by the boxed FileOp in the ops slab until the CQE (the Box's
        // heap and the Vecs' and the Bytes' heaps do not move; the slot's mapping stays while
        // the slot is held); the LUN it holds keeps the file open.
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
            spliced,
            slot,
            done,
            ..
        } = *op;
        let fixed = slot.is_some() && result.is_ok();
        let result = match (spliced, slot, io) {
            (Some(sp), _, StagedIo::Read { offset, len, .. }) => lun.finish_staged_file(
                &io,
                result.map(|()| FileData {
                    offset,
                    len,
                    holder: Arc::new(sp),
                }),
            ),
            (None, Some(slot), _) => lun.finish_staged(
                &io,
                result.map(|()| bytes::Bytes::from_owner(slot.filled(done))),
            ),
            _ => lun.finish_staged(&io, result.map(|()| buf)),
        };
        if let Some(c) = self.conn(key) {
            if fixed {
                c.stats
                    .fixed_bytes
                    .fetch_add(done as u64, Ordering::Relaxed);
            }
            c.finish(seq, itt, handed, result);
            self.mark(key);
        }
    }

    fn on_op(&mut self, idx: usize, step: usize, res: i32) {
        if matches!(self.ops.get(idx), Some(Op::Send(_))) {
            self.on_send_step(idx, step, res);
            return;
        }
        let Some(op) = self.ops.try_remove(idx) else {
            return;
        };
        let key = match &op {
            Op::Recv { key } => *key,
            Op::File(f) => f.key,
            Op::Send(_) => unreachable!("invariant: sends complete through on_send_step"),
        };
        if let Some(c) = self.conn(key) {
            c.ops -= 1;
        }
        match op {
            Op::Recv { key } => self.on_recv(key, res),
            Op::Send(_) => {}
            Op::File(f) => self.on_file(f, res),
        }
        self.mark(key);
    }

    fn on_file(&mut self, mut op: Box<FileOp>, res: i32) {
        if let (Some(sp), StagedIo::Read { offset, len, .. }) = (&mut op.spliced, op.io) {
            let file_at = offset + op.done as u64;
            match res {
                n if n > 0 => {
                    sp.filled(n as usize, file_at);
                    op.done += n as usize;
                    if op.done < len {
                        self.submit_file(op);
                    } else {
                        self.finish_file(op, Ok(()));
                    }
                }
                n if -n == libc::EINTR => self.submit_file(op),
                // The pipe is full: the rest goes to another one.
                n if -n == libc::EAGAIN && sp.seal() => self.submit_file(op),
                // The end of the file (the core reads zeros past it), or a file or kernel
                // the splice does not serve: the copying read does it all again.
                n if n == 0
                    || matches!(
                        -n,
                        libc::EAGAIN | libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS
                    ) =>
                {
                    tracing::debug!(res, "iSCSI read cannot be spliced; copying it");
                    to_copy(&mut op);
                    self.submit_file(op);
                }
                n => self.finish_file(op, Err(io::Error::from_raw_os_error(-n))),
            }
            return;
        }
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
                match (&mut op.slot, n) {
                    // Past the end of the file: zeros, as FileBacking::read_at.
                    (Some(slot), 0) => slot.zero(op.done..len),
                    (None, 0) => op.buf.resize(len, 0),
                    // SAFETY: the kernel initialised the `n` bytes after `len()`.
                    (None, _) => unsafe { op.buf.set_len(op.done + n) },
                    (Some(_), _) => {}
                }
                op.done = if n == 0 { len } else { op.done + n };
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
                if op.done < op.data.len() {
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
        let buf = c.decoder.room(READ_MIN, READ_CHUNK);
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
                    tracing::debug!(%error, "iSCSI connection dropped: malformed PDU");
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
        let out = std::mem::take(&mut c.out);
        let runs = out.runs();
        self.submit_send(Box::new(SendOp {
            key,
            out,
            runs,
            run: 0,
            at: 0,
            steps: Vec::new(),
            msgs: Vec::with_capacity(MAX_CHAIN),
            pending: 0,
        }));
    }

    /// Submits the rest of a send (from its current run and position) as one chain of
    /// linked requests, at most [`MAX_CHAIN`] of them.
    fn submit_send(&mut self, mut s: Box<SendOp>) {
        let key = s.key;
        let Some(c) = self.conn(key) else {
            return;
        };
        let fd = Fd(c.stream.as_raw_fd());
        s.steps.clear();
        s.msgs.clear();
        let mut sqes = Vec::new();
        let (mut run, mut at) = (s.run, s.at);
        let SendOp {
            runs, steps, msgs, ..
        } = &mut *s;
        while run < runs.len() && sqes.len() < MAX_CHAIN {
            match &mut runs[run] {
                Run::Bytes(iov) => {
                    let rest = &mut iov[at..];
                    let n = rest.len().min(IOV_MAX);
                    let mut msg = zeroed_msghdr();
                    msg.msg_iov = rest.as_mut_ptr();
                    msg.msg_iovlen = n;
                    msgs.push(msg);
                    let m = msgs.last().expect("invariant: just pushed");
                    sqes.push(Step::Send(
                        opcode::SendMsg::new(fd, &raw const *m),
                        rest[..n].iter().map(|v| v.iov_len).sum::<usize>(),
                    ));
                    at += n;
                    if at == iov.len() {
                        run += 1;
                        at = 0;
                    }
                }
                Run::File(f) => {
                    let pos = f.range.start + at;
                    let holder: &(dyn std::any::Any + Send + Sync) = &*f.data.holder;
                    let Some((pipe, n)) = holder
                        .downcast_ref::<Spliced>()
                        .and_then(|sp| sp.segment(pos, f.range.end))
                    else {
                        // invariant: file segments come from this driver's spliced reads,
                        // sent in order; if not, the connection cannot go on.
                        tracing::warn!("iSCSI Data-In segment without its pipe; connection closed");
                        self.close(key);
                        return;
                    };
                    sqes.push(Step::Splice(pipe.pipe.read.as_raw_fd(), n));
                    at += n;
                    if at == f.range.len() {
                        run += 1;
                        at = 0;
                    }
                }
            }
            let len = match sqes.last() {
                Some(Step::Send(_, len) | Step::Splice(_, len)) => *len,
                None => 0,
            };
            steps.push((len, None));
        }
        let last_of_send = run == runs.len();
        // The whole chain goes into the submission queue at once: a chain cut by a full
        // queue would run as two chains, in any order.
        {
            let sq = self.ring.submission();
            let free = sq.capacity() - sq.len();
            drop(sq);
            if free < sqes.len() {
                let _ = self.ring.submit();
            }
        }
        let idx = self.ops.vacant_entry().key();
        let count = sqes.len();
        let mut pushed = 0;
        for (i, step) in sqes.into_iter().enumerate() {
            let last = i + 1 == count;
            // More bytes follow this request: let the socket hold a partial segment for them.
            let more = !(last && last_of_send);
            let sqe = match step {
                Step::Send(op, _) => {
                    let flags = libc::MSG_NOSIGNAL | if more { libc::MSG_MORE } else { 0 };
                    op.flags(flags as u32).build()
                }
                Step::Splice(pipe, n) => opcode::Splice::new(Fd(pipe), -1, fd, -1, n as u32)
                    .flags(if more { libc::SPLICE_F_MORE } else { 0 })
                    .build(),
            };
            let sqe = if last {
                sqe
            } else {
                sqe.flags(squeue::Flags::IO_LINK)
            }
            .user_data(TAG_OP | ((i as u64) << 32) | idx as u64);
            // SAFETY: the msghdrs, the iovecs and the bytes they point to (the outbox's
            // buffers and the shared Data-In buffers it holds), and the pipes of the file
            // segments, are owned by the boxed op in the slab until its last CQE; none of
            // their heap allocations moves (`msgs` was allocated for MAX_CHAIN entries);
            // the connection keeps the socket open until its last request completed.
            if !unsafe { self.push(&sqe) } {
                break;
            }
            pushed += 1;
        }
        s.pending = pushed;
        if pushed > 0 {
            if let Some(c) = self.conn(key) {
                c.ops += pushed;
                c.sending = true;
            }
            let placed = self.ops.insert(Op::Send(s));
            debug_assert_eq!(placed, idx);
        }
        if pushed < count {
            // The queue was full even after a submit: the chain is incomplete.
            self.close(key);
        }
    }

    /// A request of a send completed; the send goes on once its whole chain has.
    fn on_send_step(&mut self, idx: usize, step: usize, res: i32) {
        let Some(Op::Send(s)) = self.ops.get_mut(idx) else {
            return;
        };
        let key = s.key;
        if let Some(st) = s.steps.get_mut(step) {
            st.1 = Some(res);
        }
        s.pending = s.pending.saturating_sub(1);
        let done = s.pending == 0;
        if let Some(c) = self.conn(key) {
            c.ops -= 1;
        }
        if done && let Some(Op::Send(s)) = self.ops.try_remove(idx) {
            self.on_send(s);
        }
        self.mark(key);
    }

    fn on_send(&mut self, mut s: Box<SendOp>) {
        let key = s.key;
        let Some(c) = self.conn(key) else {
            return;
        };
        c.sending = false;
        if c.closing {
            return;
        }
        let SendOp {
            runs,
            run,
            at,
            steps,
            ..
        } = &mut *s;
        for &(len, res) in steps.iter() {
            let res = res.unwrap_or(-libc::ECANCELED);
            if res < 0 && matches!(-res, libc::EINTR | libc::EAGAIN | libc::ECANCELED) {
                break;
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
            let sent = n;
            c.stats.tx_bytes.fetch_add(n as u64, Ordering::Relaxed);
            c.counted.moved(0, n);
            let done = match &mut runs[*run] {
                Run::Bytes(iov) => {
                    while *at < iov.len() && n >= iov[*at].iov_len {
                        n -= iov[*at].iov_len;
                        *at += 1;
                    }
                    if *at < iov.len() {
                        let v = &mut iov[*at];
                        // SAFETY: `n` is less than this iovec's length: still inside its
                        // buffer.
                        v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
                        v.iov_len -= n;
                    }
                    *at == iov.len()
                }
                Run::File(f) => {
                    c.stats.spliced_bytes.fetch_add(n as u64, Ordering::Relaxed);
                    let holder: &(dyn std::any::Any + Send + Sync) = &*f.data.holder;
                    if let Some((pipe, _)) = holder
                        .downcast_ref::<Spliced>()
                        .and_then(|sp| sp.segment(f.range.start + *at, f.range.end))
                    {
                        pipe.drained.fetch_add(n, Ordering::Relaxed);
                    }
                    *at += n;
                    *at >= f.range.len()
                }
            };
            if done {
                *run += 1;
                *at = 0;
            }
            if sent < len {
                // Short: the kernel cancelled the rest of the chain.
                break;
            }
        }
        if s.run < s.runs.len() {
            self.submit_send(s);
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
            // The counter goes with the event: its last flush must come after the login's
            // binding, which the events thread makes (a short session could end first).
            let _ = self
                .events
                .send((SessionEvent::Ended, login, Some(c.counted)));
        }
        // Dropping the stream closes the socket (and a counter still here flushes the
        // connection's last bytes to the tally).
    }
}

/// iovecs for `data` from byte `from` on, at most [`IOV_MAX`] (a short write goes on
/// from where it stopped).
fn iovecs_from(data: &DataOut, from: usize) -> Vec<libc::iovec> {
    let mut iov = Vec::new();
    let mut at = 0;
    for s in data.segments() {
        let end = at + s.len();
        if end > from {
            let skip = from.saturating_sub(at);
            iov.push(libc::iovec {
                iov_base: s[skip..].as_ptr().cast_mut().cast(),
                iov_len: s.len() - skip,
            });
            if iov.len() == IOV_MAX {
                break;
            }
        }
        at = end;
    }
    iov
}

/// Turns a read on the splice path into a copying read, from its start (what went into
/// pipes is dropped with them).
fn to_copy(op: &mut FileOp) {
    if let StagedIo::Read { len, .. } = op.io {
        op.spliced = None;
        op.done = 0;
        op.buf = Vec::with_capacity(len);
    }
}

/// A request of a send's chain before it is built.
enum Step {
    /// `SENDMSG` of this many bytes.
    Send(opcode::SendMsg, usize),
    /// `SPLICE` of this many bytes from this pipe to the socket.
    Splice(std::os::fd::RawFd, usize),
}

/// The ring's registered buffers: [`FIXED_SLOTS`] slots, or fewer where the kernel will
/// not pin that much memory for this user, or none (reads then use plain buffers).
fn register_fixed(ring: &IoUring) -> Option<FixedBufs> {
    let mut slots = FIXED_SLOTS;
    loop {
        match FixedBufs::register(&ring.submitter(), slots, FIXED_SLOT) {
            Ok(bufs) => {
                tracing::debug!(slots, slot_bytes = FIXED_SLOT, "iSCSI registered buffers");
                return Some(bufs);
            }
            Err(e) if slots / 2 >= FIXED_SLOTS_MIN && e.raw_os_error() == Some(libc::ENOMEM) => {
                slots /= 2;
            }
            Err(error) => {
                tracing::info!(%error, "io_uring would not register buffers: iSCSI reads go into plain buffers");
                return None;
            }
        }
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
                    TAG_OP => self.on_op(
                        (ud & 0xffff_ffff) as usize,
                        ((ud >> 32) & 0xff_ffff) as usize,
                        res,
                    ),
                    _ => {}
                }
            }
            self.expire_logins();
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
        super::cancel_and_drain(&mut self.ring, &mut self.inflight, TAG_CANCEL, DRAIN_LIMIT);
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
                let _ = self.events.send((SessionEvent::Ended, login, None));
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
