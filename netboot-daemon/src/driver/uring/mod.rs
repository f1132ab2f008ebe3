//! The TFTP driver on io_uring: one ring on one dedicated thread serves every transfer.
//! The iSCSI driver has its own ring and thread: [`iscsi`].
//!
//! Ring layout (all on one `IoUring`, one `io_uring_enter` per loop iteration):
//! - the listening socket: one multishot `RECVMSG` on buffer group 0 (2 KiB buffers; the
//!   peer's address comes with each datagram);
//! - one UDP socket per transfer (its own port, the RFC 1350 TID), `connect()`ed to the
//!   client: one multishot `RECV` on buffer group 1 (small buffers: ACKs are 4 bytes).
//!   An ICMP port unreachable ends it with `ECONNREFUSED`, which ends the transfer;
//! - `SENDMSG` for every datagram the transfers emit in an iteration, all submitted with
//!   the next wait; a run of equal-sized datagrams from one transfer (a window) goes as one
//!   `SENDMSG` with a `UDP_SEGMENT` control message (UDP GSO). A lock-step transfer's
//!   datagram goes with `MSG_DONTWAIT` and `IOSQE_CQE_SKIP_SUCCESS`: the kernel sends it
//!   while it takes the submission, posts a CQE only when it fails, and never arms a poll
//!   for it, so the loop makes one `io_uring_enter` per block (submit the DATA, wait for
//!   the ACK) instead of two;
//! - `READ` for file data of files that are not in memory (never a blocking read on this
//!   thread); a file small enough for the cache that is not in it yet is read whole
//!   into it by its own `READ`s (4 MiB each, queued after the iteration's sends), apart
//!   from the transfer that opened it, and every transfer of the file sends from the cache
//!   from its next read on;
//! - a `POLL_ADD` on a pipe whose write end the [`Handle`] holds: dropping it stops the
//!   loop;
//! - timers live in user space: a binary heap of the transfers' deadlines; the wait
//!   carries a timeout (`IORING_ENTER_EXT_ARG`) up to the earliest one.
//!
//! Buffer ownership: receive buffers belong to the kernel's provided-buffer rings
//! ([`bufring`]) until a CQE hands one over, and are given back in the same iteration.
//! Every `SENDMSG` owns a boxed [`msg::SendBuf`] (data, iovec, msghdr, control message),
//! every `READ` its `Vec` and an `Arc` of the file, in the `ops` slab until their CQE,
//! whatever happens to the transfer meanwhile. A send without a success CQE has finished
//! with the `io_uring_enter` that submits it (`MSG_DONTWAIT` makes a full socket buffer
//! a failure, not a wait), so its buffer is kept in `sent` only until then. Sockets of
//! ended transfers are closed only after the submission that names them. At shutdown
//! every request is cancelled and awaited before any buffer is freed.
//!
//! The driver makes no protocol decision: it feeds [`crate::tftp::transfer::Transfer`]
//! and carries out its outputs; admission, files, the cache and counters are
//! [`crate::service::tftp::Tftp`]'s.

mod bufring;
mod fixed;
pub mod iscsi;
mod mapping;
mod msg;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::fs::File;
use std::io::{self, PipeReader, PipeWriter};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd as _, RawFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use io_uring::types::{CancelBuilder, Fd, RecvMsgOut, SubmitArgs, Timespec};
use io_uring::{IoUring, Probe, cqueue, opcode, squeue};
use slab::Slab;

use self::bufring::BufRing;
use self::msg::SendBuf;
use crate::driver::reply_address;
use crate::service::tftp::{
    CacheFill, Outcome, Request, Source, Tftp, send_error_ends_transfer, transfer_ip,
};
use crate::tftp::server::Admitted;
use crate::tftp::transfer::{Datagram, ReadRequest, Transfer};
use crate::tftp::wire::is_request;

const SQ_ENTRIES: u32 = 1024;
const CQ_ENTRIES: u32 = 8192;
const LISTEN_GROUP: u16 = 0;
const LISTEN_BUFS: u16 = 128;
/// In single-port mode every ACK comes in on the listener too.
const LISTEN_BUFS_SINGLE_PORT: u16 = 1024;
const LISTEN_BUF_SIZE: usize = 2048;
const SESSION_GROUP: u16 = 1;
const SESSION_BUFS: u16 = 4096;
const SESSION_BUF_SIZE: usize = 128;
/// Datagrams per GSO send (the kernel's `UDP_MAX_SEGMENTS` was 64 before 5.15).
const GSO_MAX_SEGMENTS: usize = 64;
/// Bytes per GSO send: the largest UDP payload over IPv4.
const GSO_MAX_BYTES: usize = 65_507;
/// Bytes per read that fills the cache: the kernel copies a read from the page cache
/// while it takes the submission, and the sends queued after it wait for that copy.
const FILL_CHUNK: usize = 4 << 20;
/// Idle send buffers kept for reuse.
const POOL_MAX: usize = 256;
/// Receives on the listener that may fail in a row before the driver gives up.
const MAX_LISTEN_FAILURES: u32 = 1000;
/// How long shutdown waits for cancelled requests.
const DRAIN_LIMIT: Duration = Duration::from_secs(2);

/// What a CQE's `user_data` refers to: the tag in the top byte, then a 24-bit generation
/// and a 32-bit slab index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Tag {
    Stop = 1,
    Listen = 2,
    Recv = 3,
    Op = 4,
    Cancel = 5,
    /// A send without a success CQE ([`Driver::send_lock_step`]); the index and generation
    /// are its transfer's. Not counted in `inflight`: it has ended when the submission
    /// returns.
    Sent = 6,
}

fn user_data(tag: Tag, idx: usize, generation: u32) -> u64 {
    (tag as u64) << 56 | (u64::from(generation) & 0xff_ffff) << 32 | (idx as u64 & 0xffff_ffff)
}

fn split_user_data(ud: u64) -> (u8, usize, u32) {
    (
        (ud >> 56) as u8,
        (ud & 0xffff_ffff) as usize,
        ((ud >> 32) & 0xff_ffff) as u32,
    )
}

/// A transfer: which slab slot and which occupant of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Key {
    idx: usize,
    generation: u32,
}

struct Session {
    generation: u32,
    peer: SocketAddr,
    /// The transfer's own socket, connected to the peer; none in single-port mode, where
    /// the transfer sends from the listener to `peer`.
    socket: Option<UdpSocket>,
    transfer: Transfer,
    source: Source,
    /// The chunks read for this transfer, oldest first, whose memory the next reads reuse
    /// once the transfer and every send have let go of them.
    reads: VecDeque<Bytes>,
    recv_armed: bool,
    /// Largest datagram that may go in a GSO train to this peer (path MTU); 0: none.
    gso_max: usize,
    /// The earliest deadline of this transfer in the timer heap.
    timer: Option<Instant>,
    dirty: bool,
    span: tracing::Span,
}

impl Session {
    /// Queues the transfer (`key`) in `dirty` for [`Driver::service`] in this iteration,
    /// once.
    fn mark_dirty(&mut self, key: Key, dirty: &mut Vec<Key>) {
        if !self.dirty {
            self.dirty = true;
            dirty.push(key);
        }
    }

    /// Where the transfer's datagrams go: its own connected socket, or in single-port
    /// mode the `listener`, addressed to the peer.
    fn endpoint(&self, listener: RawFd) -> (RawFd, Option<SocketAddr>) {
        match &self.socket {
            Some(socket) => (socket.as_raw_fd(), None),
            None => (listener, Some(self.peer)),
        }
    }
}

/// A request in flight that owns memory the kernel uses.
enum Op {
    Send {
        owner: Option<Key>,
        buf: Box<SendBuf>,
        gso: Option<u16>,
    },
    Read {
        owner: Key,
        buf: BytesMut,
        _file: Arc<File>,
    },
    /// A read of a whole file (which `fill` holds open) for the cache; `buf` has the
    /// file's length as capacity and holds what has been read so far.
    Fill { fill: CacheFill, buf: Vec<u8> },
}

/// Whether the kernel takes UDP GSO sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gso {
    Untested,
    Works,
    Off,
}

/// The io_uring driver could not start; the listener is handed back for a fallback.
#[derive(Debug)]
pub struct SpawnError {
    /// Why.
    pub error: io::Error,
    /// The listening socket, unused.
    pub listener: UdpSocket,
}

/// The running driver's thread. Stopping (or dropping) it stops the loop, abandons the
/// running transfers and joins the thread.
#[derive(Debug)]
pub struct Handle {
    stop: Option<PipeWriter>,
    thread: Option<JoinHandle<()>>,
}

impl Handle {
    /// Stops the driver and waits for its thread.
    pub fn stop(self) {}
}

impl Drop for Handle {
    fn drop(&mut self) {
        // Closing the write end wakes the ring's poll on the read end.
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts the driver on its own thread, serving requests that arrive on `listener`.
/// Fails (returning the listener) when the ring cannot be set up: io_uring disabled,
/// or a kernel older than 6.0 (multishot receive, provided-buffer rings). `busy_poll`:
/// how long the loop spins for a completion before it sleeps ([`poll_completions`]);
/// zero: never.
pub fn spawn(
    tftp: Arc<Tftp>,
    listener: UdpSocket,
    busy_poll: Duration,
) -> Result<Handle, SpawnError> {
    let opts = Options {
        busy_poll,
        ..Options::default()
    };
    spawn_inner(tftp, listener, opts)
}

/// Knobs of the driver.
#[derive(Debug, Clone, Copy, Default)]
struct Options {
    /// Spin this long for a completion before sleeping (`tftp.busy_poll_us`).
    busy_poll: Duration,
    /// Tests only: set `SO_NO_CHECK` on transfer sockets. The kernel then refuses every GSO
    /// send with `EINVAL`, which exercises the fallback to single datagrams.
    no_udp_checksum: bool,
}

fn spawn_inner(tftp: Arc<Tftp>, listener: UdpSocket, opts: Options) -> Result<Handle, SpawnError> {
    let spare = match listener.try_clone() {
        Ok(s) => s,
        Err(error) => return Err(SpawnError { error, listener }),
    };
    let fail = |error: io::Error, listener: UdpSocket| SpawnError { error, listener };
    let (stop_rx, stop_tx) = match io::pipe() {
        Ok(p) => p,
        Err(e) => return Err(fail(e, spare)),
    };
    let name = format!(
        "tftp-ring-{}",
        listener.local_addr().map_or(0, |a| a.port())
    );
    match start_ring_thread(
        name,
        "TFTP io_uring driver failed; TFTP is stopped",
        move || Driver::new(tftp, listener, stop_rx, opts),
    ) {
        Ok(thread) => Ok(Handle {
            stop: Some(stop_tx),
            thread: Some(thread),
        }),
        Err(e) => Err(fail(e, spare)),
    }
}

/// A driver that [`start_ring_thread`] runs on its own thread.
pub(super) trait RingDriver {
    /// Runs until stopped, or fails.
    fn run(&mut self) -> io::Result<()>;
    /// Closes everything and waits for the ring's requests.
    fn shutdown(self);
}

/// Starts a thread named `name` that builds its driver with `make`, runs it, logs `failed`
/// if it fails, and shuts it down. Returns once the driver is built, or why it could not be
/// (the thread has then ended).
pub(super) fn start_ring_thread<D: RingDriver>(
    name: String,
    failed: &'static str,
    make: impl FnOnce() -> io::Result<D> + Send + 'static,
) -> io::Result<JoinHandle<()>> {
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
    let thread = std::thread::Builder::new().name(name).spawn(move || {
        let mut driver = match make() {
            Ok(d) => d,
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return;
            }
        };
        let _ = ready_tx.send(Ok(()));
        if let Err(error) = driver.run() {
            tracing::error!(%error, "{failed}");
        }
        driver.shutdown();
    })?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(thread),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(_) => {
            let _ = thread.join();
            Err(io::Error::other("io_uring thread ended"))
        }
    }
}

/// A ring of `sq` submission and `cq` completion entries that supports every opcode of
/// `ops` (code, name for the error), or why not; with the kernel's probe of its opcodes,
/// for the ones a driver can do without.
pub(super) fn ring_for(sq: u32, cq: u32, ops: &[(u8, &str)]) -> io::Result<(IoUring, Probe)> {
    // Deferred task work suits one thread that owns the ring (Linux 6.1); without it the
    // ring still works.
    // The task-run flag lets a busy-poll ([`poll_completions`]) see deferred completions
    // without entering the kernel.
    let ring = IoUring::builder()
        .setup_cqsize(cq)
        .setup_submit_all()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_taskrun_flag()
        .build(sq)
        .or_else(|_| IoUring::builder().setup_cqsize(cq).build(sq))?;
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    if let Some((_, name)) = ops.iter().find(|(code, _)| !probe.is_supported(*code)) {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("io_uring lacks {name}"),
        ));
    }
    Ok((ring, probe))
}

/// Submits what is queued on `ring`, then spins for up to `budget` until a completion is
/// ready, running the deferred task work the kernel flags (`IORING_SQ_TASKRUN`: a socket
/// became readable, a read finished). True when one is: the caller then need not sleep.
///
/// The caller's wait would otherwise sleep in `io_uring_enter`. On a VM whose idle vCPU
/// halts, waking it costs tens of microseconds, more than a loopback round trip: a
/// lock-step peer (TFTP without a window, an iSCSI initiator at queue depth 1) pays that
/// per exchange. Spinning trades a core's time for that latency, which is why it is
/// opt-in (`busy_poll_us`) and bounded.
pub(super) fn poll_completions(ring: &mut IoUring, budget: Duration) -> io::Result<bool> {
    if budget.is_zero() {
        return Ok(false);
    }
    ring.submit()?;
    let until = Instant::now() + budget;
    loop {
        if !ring.completion().is_empty() {
            return Ok(true);
        }
        if ring.submission().taskrun() {
            // Runs the deferred work, which posts its completions.
            ring.submit()?;
            continue;
        }
        if Instant::now() >= until {
            return Ok(false);
        }
        std::hint::spin_loop();
    }
}

/// Queues an SQE on `ring`, flushing the submission queue once if it is full, and counts
/// it in `inflight`; false if there was no room.
///
/// # Safety
///
/// Every buffer and descriptor the entry points to must stay valid, and unmoved, until
/// the request's last CQE.
pub(super) unsafe fn push_counted(
    ring: &mut IoUring,
    inflight: &mut usize,
    sqe: &squeue::Entry,
) -> bool {
    // SAFETY: the caller's guarantee, passed on.
    let pushed = unsafe { push(ring, sqe) };
    if pushed {
        *inflight += 1;
    }
    pushed
}

/// Queues an SQE on `ring`, flushing the submission queue once if it is full; false if
/// there was no room. Not counted: for a request that has no CQE to wait for at shutdown.
///
/// # Safety
///
/// As for [`push_counted`].
unsafe fn push(ring: &mut IoUring, sqe: &squeue::Entry) -> bool {
    for attempt in 0..2 {
        // SAFETY: the caller guarantees what the entry points to (see above).
        if unsafe { ring.submission().push(sqe) }.is_ok() {
            return true;
        }
        if attempt == 0 {
            let _ = ring.submit();
        }
    }
    tracing::debug!("io_uring submission queue full");
    false
}

/// At shutdown: cancels every request on `ring` (the cancellation tagged `cancel_tag`) and
/// reaps completions until the `inflight` requests are done (a multishot request ends with
/// its last CQE, the one without `IORING_CQE_F_MORE`) or `limit` has passed. What is still
/// in `inflight` afterwards may yet use its memory.
pub(super) fn cancel_and_drain(
    ring: &mut IoUring,
    inflight: &mut usize,
    cancel_tag: u64,
    limit: Duration,
) {
    let sqe = opcode::AsyncCancel2::new(CancelBuilder::any())
        .build()
        .user_data(cancel_tag);
    // SAFETY: a cancellation points at no memory.
    unsafe { push_counted(ring, inflight, &sqe) };
    let deadline = Instant::now() + limit;
    while *inflight > 0 && Instant::now() < deadline {
        let ts = Timespec::from(Duration::from_millis(50));
        let args = SubmitArgs::new().timespec(&ts);
        let _ = ring.submitter().submit_with_args(1, &args);
        let ended = ring
            .completion()
            .filter(|c| !cqueue::more(c.flags()))
            .count();
        *inflight = inflight.saturating_sub(ended);
    }
}

struct Driver {
    // Declared first, so dropped first: the ring goes before any memory it used.
    ring: IoUring,
    tftp: Arc<Tftp>,
    listener: UdpSocket,
    local_ip: IpAddr,
    stop: PipeReader,
    listen_msg: Box<libc::msghdr>,
    listen_armed: bool,
    /// Receives on the listener that ended in an error since the last datagram.
    listen_failures: u32,
    listen_bufs: BufRing,
    session_bufs: BufRing,
    sessions: Slab<Session>,
    /// Requests that came in on the listener in this iteration, handled once the
    /// transfers' input has been.
    requests: Vec<(SocketAddr, Vec<u8>)>,
    /// Cache fills whose next read is to be queued after this iteration's sends.
    fills: Vec<(CacheFill, Vec<u8>)>,
    /// Single-port mode (`tftp.single_port`): the running transfers by client address, to
    /// which the listener's datagrams other than requests go.
    by_peer: Option<HashMap<SocketAddr, Key>>,
    next_generation: u32,
    ops: Slab<Op>,
    #[allow(
        clippy::vec_box,
        reason = "the kernel reads through pointers into each SendBuf: it must not move"
    )]
    pool: Vec<Box<SendBuf>>,
    timers: BinaryHeap<Reverse<(Instant, usize, u32)>>,
    dirty: Vec<Key>,
    rearm: Vec<Key>,
    to_close: Vec<UdpSocket>,
    /// Buffers of sends without a success CQE, until the submission that carries them.
    #[allow(clippy::vec_box, reason = "as for `pool`")]
    sent: Vec<Box<SendBuf>>,
    /// Whether the kernel takes `IOSQE_CQE_SKIP_SUCCESS` (Linux 5.17).
    skip_cqe: bool,
    /// Submitted requests whose last CQE has not arrived.
    inflight: usize,
    gso: Gso,
    opts: Options,
    stopping: bool,
    scratch: Vec<u8>,
}

impl Driver {
    fn new(
        tftp: Arc<Tftp>,
        listener: UdpSocket,
        stop: PipeReader,
        opts: Options,
    ) -> io::Result<Self> {
        // SEND_ZC came with Linux 6.0, as did multishot receive, which a probe cannot see.
        let (ring, _) = ring_for(
            SQ_ENTRIES,
            CQ_ENTRIES,
            &[
                (opcode::SendMsg::CODE, "SENDMSG"),
                (opcode::RecvMsg::CODE, "RECVMSG"),
                (opcode::Recv::CODE, "RECV"),
                (opcode::Read::CODE, "READ"),
                (opcode::PollAdd::CODE, "POLL_ADD"),
                (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
                (opcode::SendZc::CODE, "SEND_ZC (Linux 6.0)"),
            ],
        )?;
        if !ring.params().is_feature_ext_arg() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "io_uring without IORING_FEAT_EXT_ARG",
            ));
        }
        let listen_bufs = BufRing::new(
            &ring.submitter(),
            LISTEN_GROUP,
            if tftp.single_port() {
                LISTEN_BUFS_SINGLE_PORT
            } else {
                LISTEN_BUFS
            },
            LISTEN_BUF_SIZE,
        )?;
        let session_bufs = match BufRing::new(
            &ring.submitter(),
            SESSION_GROUP,
            SESSION_BUFS,
            SESSION_BUF_SIZE,
        ) {
            Ok(b) => b,
            Err(e) => {
                let _ = ring.submitter().unregister_buf_ring(LISTEN_GROUP);
                return Err(e);
            }
        };
        let local_ip = transfer_ip(listener.local_addr()?);
        let skip_cqe = ring.params().is_feature_skip_cqe_on_success();
        let by_peer = tftp.single_port().then(HashMap::new);
        Ok(Self {
            ring,
            tftp,
            listener,
            local_ip,
            stop,
            listen_msg: msg::recv_template(),
            listen_armed: false,
            listen_failures: 0,
            listen_bufs,
            session_bufs,
            sessions: Slab::new(),
            requests: Vec::new(),
            fills: Vec::new(),
            by_peer,
            next_generation: 0,
            ops: Slab::new(),
            pool: Vec::new(),
            timers: BinaryHeap::new(),
            dirty: Vec::new(),
            rearm: Vec::new(),
            to_close: Vec::new(),
            sent: Vec::new(),
            skip_cqe,
            inflight: 0,
            gso: Gso::Untested,
            opts,
            stopping: false,
            scratch: Vec::new(),
        })
    }

    /// Queues an SQE ([`push_counted`]).
    ///
    /// # Safety
    ///
    /// As for [`push_counted`].
    unsafe fn push(&mut self, sqe: &squeue::Entry) -> bool {
        // SAFETY: the caller's guarantee, passed on.
        unsafe { push_counted(&mut self.ring, &mut self.inflight, sqe) }
    }

    fn arm_stop(&mut self) -> io::Result<()> {
        let sqe = opcode::PollAdd::new(Fd(self.stop.as_raw_fd()), libc::POLLIN as u32)
            .build()
            .user_data(user_data(Tag::Stop, 0, 0));
        // SAFETY: a poll points at no memory; the pipe lives as long as the driver.
        if unsafe { self.push(&sqe) } {
            Ok(())
        } else {
            Err(io::Error::other("cannot queue the stop poll"))
        }
    }

    fn arm_listener(&mut self) {
        let sqe = opcode::RecvMsgMulti::new(
            Fd(self.listener.as_raw_fd()),
            &raw const *self.listen_msg,
            self.listen_bufs.bgid(),
        )
        .build()
        .user_data(user_data(Tag::Listen, 0, 0));
        // SAFETY: the msghdr is boxed in the driver and never changes; the buffers are the
        // registered group; the socket lives as long as the driver.
        self.listen_armed = unsafe { self.push(&sqe) };
    }

    fn arm_recv(&mut self, key: Key) {
        let Some(s) = self
            .sessions
            .get(key.idx)
            .filter(|s| s.generation == key.generation)
        else {
            return;
        };
        let Some(socket) = &s.socket else {
            return; // Single-port mode: its datagrams come through the listener.
        };
        if s.recv_armed {
            return;
        }
        let sqe = opcode::RecvMulti::new(Fd(socket.as_raw_fd()), self.session_bufs.bgid())
            .build()
            .user_data(user_data(Tag::Recv, key.idx, key.generation));
        // SAFETY: the buffers are the registered group; the socket is closed only after
        // the submission that cancels this request.
        let armed = unsafe { self.push(&sqe) };
        if let Some(s) = self.sessions.get_mut(key.idx) {
            s.recv_armed = armed;
        }
        if !armed {
            self.rearm.push(key);
        }
    }

    /// Submits what is queued and waits for a completion or the earliest timer (spinning
    /// first for up to `busy_poll`, see [`poll_completions`]).
    fn wait(&mut self) -> io::Result<()> {
        let deadline = self.timers.peek().map(|Reverse((at, _, _))| *at);
        let spin = self.opts.busy_poll;
        let budget = match deadline {
            Some(at) if !spin.is_zero() => spin.min(at.saturating_duration_since(Instant::now())),
            _ => spin,
        };
        let r = match poll_completions(&mut self.ring, budget) {
            Ok(true) => return Ok(()),
            Ok(false) => self.sleep(deadline),
            Err(e) => Err(e),
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

    /// Submits what is queued and sleeps until a completion or `deadline`.
    fn sleep(&mut self, deadline: Option<Instant>) -> io::Result<usize> {
        match deadline {
            None => self.ring.submit_and_wait(1),
            Some(at) => {
                let left = at.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    self.ring.submit()
                } else {
                    let ts = Timespec::from(left);
                    let args = SubmitArgs::new().timespec(&ts);
                    self.ring.submitter().submit_with_args(1, &args)
                }
            }
        }
    }

    fn complete(&mut self, now: Instant, ud: u64, res: i32, flags: u32) {
        let more = cqueue::more(flags);
        let (tag, idx, generation) = split_user_data(ud);
        if !more && tag != Tag::Sent as u8 {
            self.inflight = self.inflight.saturating_sub(1);
        }
        match tag {
            t if t == Tag::Stop as u8 => self.stopping = true,
            t if t == Tag::Listen as u8 => self.on_listen(res, flags, more),
            t if t == Tag::Recv as u8 => {
                self.on_recv(now, Key { idx, generation }, res, flags, more)
            }
            t if t == Tag::Op as u8 => self.on_op(now, idx, res),
            t if t == Tag::Sent as u8 && res < 0 => {
                self.on_send_error(now, Some(Key { idx, generation }), -res);
            }
            _ => {}
        }
    }

    fn on_listen(&mut self, res: i32, flags: u32, more: bool) {
        if let Some(bid) = cqueue::buffer_select(flags) {
            let mut datagram = std::mem::take(&mut self.scratch);
            datagram.clear();
            let mut peer = None;
            if let Ok(len) = usize::try_from(res) {
                let buf = self.listen_bufs.get(bid, len);
                if let Ok(out) = RecvMsgOut::parse(buf, &self.listen_msg)
                    && !out.is_name_data_truncated()
                {
                    peer = msg::parse_sockaddr(out.name_data());
                    datagram.extend_from_slice(out.payload_data());
                }
            }
            self.listen_bufs.recycle(bid);
            if let Some(peer) = peer {
                self.listen_failures = 0;
                match self.by_peer.as_ref().and_then(|m| m.get(&peer)) {
                    Some(&key) if !is_request(&datagram) => {
                        self.on_datagram(key, &datagram);
                    }
                    // After the transfers' input of this iteration: a client's last ACK
                    // or ERROR and its next RRQ often arrive together, and the RRQ must
                    // find that transfer ended, not busy.
                    _ => self.requests.push((peer, datagram.clone())),
                }
            }
            self.scratch = datagram;
        }
        if !more {
            self.listen_armed = false;
            if res < 0 && res != -libc::ENOBUFS {
                self.listen_failures += 1;
                tracing::debug!(
                    error = %io::Error::from_raw_os_error(-res),
                    "tftp listener receive ended"
                );
            }
        }
    }

    fn on_request(&mut self, now: Instant, peer: SocketAddr, datagram: &[u8]) {
        match self.tftp.handle_request(now, peer, datagram) {
            Request::Start(req) => self.start(now, req),
            Request::Reply(packet) => self.send_listener(peer, &packet),
            Request::Ignore => {}
        }
    }

    /// Services the transfers that had input or timed out, until none is left.
    fn service_dirty(&mut self, now: Instant) {
        while !self.dirty.is_empty() {
            let mut batch = std::mem::take(&mut self.dirty);
            for &key in &batch {
                self.service(key, now);
            }
            batch.clear();
            if self.dirty.is_empty() {
                self.dirty = batch;
            }
        }
    }

    fn start(&mut self, now: Instant, req: Admitted) {
        let peer = req.peer;
        let span = tracing::debug_span!("tftp", %peer, file = %req.filename);
        let entered = span.enter();
        // The transfer's own socket first: its address is the one the client reaches us
        // at, which a generated file may name. In single-port mode that is the listener's
        // port at the address the kernel answers this client from.
        let socket = if self.by_peer.is_some() {
            None
        } else {
            match UdpSocket::bind(SocketAddr::new(self.local_ip, 0))
                .and_then(|s| s.connect(peer).map(|()| s))
            {
                Ok(s) => Some(s),
                Err(e) => {
                    self.tftp.finished(now, peer, Outcome::Io(e));
                    return;
                }
            }
        };
        let local = match &socket {
            Some(s) => s.local_addr().ok(),
            None => self
                .listener
                .local_addr()
                .ok()
                .map(|l| reply_address(l, peer)),
        };
        let opened = match self.tftp.open(peer, local, &req.filename) {
            Ok(o) => o,
            Err(packet) => {
                self.send_listener(peer, &packet);
                self.tftp.finished(now, peer, Outcome::Refused);
                return;
            }
        };
        if self.opts.no_udp_checksum
            && let Some(s) = &socket
        {
            let _ = msg::set_no_udp_checksum(s);
        }
        // Without a connected socket there is no path MTU to size GSO trains by.
        let gso_max = socket
            .as_ref()
            .map_or(0, |s| msg::max_unfragmented_payload(s).unwrap_or(0));
        let transfer = self.tftp.new_transfer(&req, &opened.source, local);
        drop(entered);
        let generation = self.next_generation;
        self.next_generation = (generation + 1) & 0xff_ffff;
        let idx = self.sessions.insert(Session {
            generation,
            peer,
            socket,
            transfer,
            source: opened.source,
            reads: VecDeque::new(),
            recv_armed: false,
            gso_max,
            timer: None,
            dirty: true,
            span,
        });
        let key = Key { idx, generation };
        self.dirty.push(key);
        if let Some(m) = &mut self.by_peer {
            m.insert(peer, key);
        }
        self.arm_recv(key);
        if let Some(fill) = opened.fill {
            let len = usize::try_from(fill.len()).unwrap_or(usize::MAX);
            self.fill(fill, Vec::with_capacity(len));
        }
    }

    /// Queues the next read of a file for the cache into `buf` (what it holds is the
    /// start of the file, its capacity the file's length), [`FILL_CHUNK`] at a time, apart
    /// from any transfer: the transfers of the file find it in the cache at their next
    /// read ([`Source::feed`]). The reads go after the iteration's sends
    /// ([`Driver::submit_fills`]).
    fn fill(&mut self, fill: CacheFill, buf: Vec<u8>) {
        if fill_left(&fill, &buf) == 0 {
            fill.finish(buf);
        } else {
            self.fills.push((fill, buf));
        }
    }

    /// Submits the cache fills' reads queued in this iteration, after its sends: the
    /// kernel copies a read from the page cache while it takes the submission, and no
    /// DATA should wait for that.
    fn submit_fills(&mut self) {
        for (fill, buf) in std::mem::take(&mut self.fills) {
            self.submit_fill(fill, buf);
        }
    }

    fn submit_fill(&mut self, fill: CacheFill, mut buf: Vec<u8>) {
        let have = buf.len();
        let left = fill_left(&fill, &buf).min(FILL_CHUNK);
        let len = u32::try_from(left).unwrap_or(u32::MAX);
        let sqe = opcode::Read::new(
            Fd(fill.file().as_raw_fd()),
            buf.spare_capacity_mut().as_mut_ptr().cast(),
            len,
        )
        .offset(have as u64)
        .build();
        let entry = self.ops.vacant_entry();
        let idx = entry.key();
        let sqe = sqe.user_data(user_data(Tag::Op, idx, 0));
        entry.insert(Op::Fill { fill, buf });
        // SAFETY: the Vec's heap block (`left` bytes of spare capacity after `have`) and
        // the file (held by the fill) are owned by the op in `ops` until this request's CQE; moving the Vec
        // does not move its heap block, and nothing resizes it meanwhile.
        if !unsafe { self.push(&sqe) } {
            // Dropping the fill lets a later open try again.
            self.ops.try_remove(idx);
        }
    }

    /// Single-port mode: a datagram for a running transfer that came in on the listener.
    fn on_datagram(&mut self, key: Key, datagram: &[u8]) {
        if let Some(s) = self
            .sessions
            .get_mut(key.idx)
            .filter(|s| s.generation == key.generation)
        {
            s.transfer.handle_datagram(datagram);
            s.mark_dirty(key, &mut self.dirty);
        }
    }

    fn on_recv(&mut self, now: Instant, key: Key, res: i32, flags: u32, more: bool) {
        let bid = cqueue::buffer_select(flags);
        let session = self
            .sessions
            .get_mut(key.idx)
            .filter(|s| s.generation == key.generation);
        let Some(s) = session else {
            if let Some(bid) = bid {
                self.session_bufs.recycle(bid);
            }
            return;
        };
        if let (Some(bid), Ok(len)) = (bid, usize::try_from(res)) {
            s.transfer.handle_datagram(self.session_bufs.get(bid, len));
            s.mark_dirty(key, &mut self.dirty);
        }
        if let Some(bid) = bid {
            self.session_bufs.recycle(bid);
        }
        if more {
            return;
        }
        s.recv_armed = false;
        match -res {
            libc::ENOBUFS | libc::ECANCELED => self.rearm.push(key),
            e if e > 0 => self.end(now, key, Outcome::Io(io::Error::from_raw_os_error(e))),
            _ => self.rearm.push(key),
        }
    }

    fn on_op(&mut self, now: Instant, idx: usize, res: i32) {
        let Some(op) = self.ops.try_remove(idx) else {
            return;
        };
        match op {
            Op::Send { owner, buf, gso } => {
                if res >= 0 {
                    if gso.is_some() {
                        self.gso = Gso::Works;
                        let st = &self.tftp.stats;
                        st.gso_sends.fetch_add(1, Ordering::Relaxed);
                        st.gso_segments
                            .fetch_add(buf.datagrams.len() as u64, Ordering::Relaxed);
                    }
                    self.recycle(buf);
                    return;
                }
                let err = -res;
                match (gso, owner) {
                    (Some(_), Some(owner)) if err == libc::EIO || err == libc::EINVAL => {
                        if self.gso == Gso::Untested {
                            self.gso = Gso::Off;
                            tracing::warn!(
                                error = %io::Error::from_raw_os_error(err),
                                "the kernel refuses UDP GSO; TFTP sends datagrams one by one"
                            );
                        } else {
                            tracing::debug!(error = %io::Error::from_raw_os_error(err), "GSO send refused");
                        }
                        if let Some(s) = self.sessions.get_mut(owner.idx)
                            && s.generation == owner.generation
                        {
                            s.gso_max = 0;
                        }
                        self.resend_singly(owner, &buf);
                        self.recycle(buf);
                    }
                    _ => {
                        self.recycle(buf);
                        self.on_send_error(now, owner, err);
                    }
                }
            }
            Op::Read { owner, mut buf, .. } => {
                let Some(s) = self
                    .sessions
                    .get_mut(owner.idx)
                    .filter(|s| s.generation == owner.generation)
                else {
                    return;
                };
                let data = match usize::try_from(res) {
                    Ok(n) if n <= buf.capacity() => {
                        self.tftp
                            .stats
                            .file_read_bytes
                            .fetch_add(n as u64, Ordering::Relaxed);
                        // SAFETY: the kernel wrote the first `n` bytes of the buffer's
                        // spare capacity (the read asked for at most its capacity), and
                        // `buf` was empty.
                        unsafe { buf.set_len(n) };
                        let chunk = buf.freeze();
                        s.reads.push_back(chunk.clone());
                        Ok(chunk)
                    }
                    _ => Err(()),
                };
                if data.is_err() {
                    tracing::debug!(parent: &s.span, error = %io::Error::from_raw_os_error(-res), "tftp file read failed");
                }
                s.transfer.handle_read(data);
                s.mark_dirty(owner, &mut self.dirty);
            }
            Op::Fill { fill, mut buf } => {
                let left = fill_left(&fill, &buf).min(FILL_CHUNK);
                match usize::try_from(res) {
                    Ok(n) if n > 0 && n <= left => {
                        fill.read(n);
                        // SAFETY: the kernel wrote `n` bytes of the spare capacity after
                        // the `len` bytes already there (it asked for at most `left`).
                        unsafe { buf.set_len(buf.len() + n) };
                        self.fill(fill, buf);
                    }
                    // The file ended early (it shrank) or could not be read: no cache
                    // entry; dropping the fill lets a later open try again.
                    _ => {
                        tracing::debug!(res, "tftp cache fill abandoned");
                    }
                }
            }
        }
    }

    /// A send failed with `err`: the end of the transfer for a socket error, otherwise a
    /// datagram lost like one on the wire, which the transfer retransmits.
    fn on_send_error(&mut self, now: Instant, owner: Option<Key>, err: i32) {
        match owner {
            Some(owner) if send_error_ends_transfer(err) => {
                self.end(now, owner, Outcome::Io(io::Error::from_raw_os_error(err)));
            }
            _ => tracing::debug!(error = %io::Error::from_raw_os_error(err), "tftp send failed"),
        }
    }

    fn recycle(&mut self, mut buf: Box<SendBuf>) {
        buf.clear();
        if self.pool.len() < POOL_MAX {
            self.pool.push(buf);
        }
    }

    fn take_buf(&mut self) -> Box<SendBuf> {
        self.pool.pop().unwrap_or_else(SendBuf::new)
    }

    /// Sends a GSO train the kernel refused as separate datagrams.
    fn resend_singly(&mut self, owner: Key, train: &SendBuf) {
        let Some((fd, to)) = self.endpoint_of(owner) else {
            return;
        };
        for d in &train.datagrams {
            let mut b = self.take_buf();
            b.datagrams.push(d.clone());
            self.send(Some(owner), fd, b, to, None);
        }
    }

    fn endpoint_of(&self, key: Key) -> Option<(RawFd, Option<SocketAddr>)> {
        self.sessions
            .get(key.idx)
            .filter(|s| s.generation == key.generation)
            .map(|s| s.endpoint(self.listener.as_raw_fd()))
    }

    /// Queues a `SENDMSG` of `buf` on `fd` (to `to` when not connected).
    fn send(
        &mut self,
        owner: Option<Key>,
        fd: RawFd,
        mut buf: Box<SendBuf>,
        to: Option<SocketAddr>,
        gso: Option<u16>,
    ) {
        let msg = buf.prepare(to, gso);
        let entry = self.ops.vacant_entry();
        let sqe = opcode::SendMsg::new(Fd(fd), msg)
            .build()
            .user_data(user_data(Tag::Op, entry.key(), 0));
        let idx = entry.key();
        entry.insert(Op::Send { owner, buf, gso });
        // SAFETY: the msghdr, iovec, control message, address and data are in the boxed
        // SendBuf, which stays in `ops` (moving the box does not move them) until this
        // request's CQE; `fd` is the listener or a transfer socket, closed only after the
        // submission of this entry.
        if !unsafe { self.push(&sqe) }
            && let Some(Op::Send { buf, .. }) = self.ops.try_remove(idx)
        {
            self.recycle(buf);
        }
    }

    /// Queues a lock-step transfer's datagram as a `SENDMSG` that the kernel completes
    /// while it takes the submission and that posts a CQE only on failure (`EAGAIN` from a
    /// full socket buffer included: with one datagram in flight that is a loss like any
    /// other). Without `IOSQE_CQE_SKIP_SUCCESS`, a plain [`Driver::send`].
    fn send_lock_step(&mut self, owner: Key, fd: RawFd, mut buf: Box<SendBuf>) {
        if !self.skip_cqe {
            self.send(Some(owner), fd, buf, None, None);
            return;
        }
        let msg = buf.prepare(None, None);
        let sqe = opcode::SendMsg::new(Fd(fd), msg)
            .flags(libc::MSG_DONTWAIT as u32)
            .build()
            .flags(squeue::Flags::SKIP_SUCCESS)
            .user_data(user_data(Tag::Sent, owner.idx, owner.generation));
        // Not in `inflight`: no CQE comes when it succeeds, and it is over by shutdown.
        // SAFETY: the SendBuf (msghdr, iovec, data) moves into `sent`, which keeps it until
        // the submission queue has been emptied by an `io_uring_enter`; with MSG_DONTWAIT
        // the kernel has finished with it by then (it neither waits for room nor hands the
        // request to a worker). The socket is closed only after that submission too.
        if unsafe { push(&mut self.ring, &sqe) } {
            self.sent.push(buf);
        } else {
            self.recycle(buf);
        }
    }

    fn send_listener(&mut self, peer: SocketAddr, packet: &[u8]) {
        if packet.is_empty() {
            return;
        }
        let mut b = self.take_buf();
        b.datagrams
            .push(Datagram::whole(Bytes::copy_from_slice(packet)));
        let fd = self.listener.as_raw_fd();
        self.send(None, fd, b, Some(peer), None);
    }

    /// Feeds a transfer that had input and carries out what it asks for.
    fn service(&mut self, key: Key, now: Instant) {
        let Some(s) = self
            .sessions
            .get_mut(key.idx)
            .filter(|s| s.generation == key.generation)
        else {
            return;
        };
        s.dirty = false;
        let read = s.source.feed(&mut s.transfer);
        // The read is queued after the sends: the kernel takes the SQEs in order, and a
        // block must not wait for the copy of the blocks after it.
        self.transmit(key, now);
        if let Some((file, r)) = read {
            self.read(key, file, r);
        }
        let Some(s) = self.sessions.get_mut(key.idx) else {
            return;
        };
        if let Some(ev) = s.transfer.poll_event() {
            self.end(now, key, Outcome::Event(ev));
            return;
        }
        if let Some(at) = s.transfer.poll_timeout()
            && s.timer.is_none_or(|t| at < t)
        {
            s.timer = Some(at);
            self.timers.push(Reverse((at, key.idx, key.generation)));
        }
    }

    fn read(&mut self, key: Key, file: Arc<File>, r: ReadRequest) {
        let Some(s) = self.sessions.get_mut(key.idx) else {
            return;
        };
        let mut buf = read_buffer(&mut s.reads);
        buf.reserve(r.len);
        let len = u32::try_from(r.len).unwrap_or(u32::MAX);
        let sqe = opcode::Read::new(Fd(file.as_raw_fd()), buf.as_mut_ptr(), len)
            .offset(r.offset)
            .build();
        let entry = self.ops.vacant_entry();
        let idx = entry.key();
        let sqe = sqe.user_data(user_data(Tag::Op, idx, 0));
        entry.insert(Op::Read {
            owner: key,
            buf,
            _file: file,
        });
        // SAFETY: the buffer's heap block (at least `len` bytes of spare capacity) and the
        // file are owned by the op in `ops` until this request's CQE; moving the BytesMut
        // does not move its heap block, and nothing resizes it meanwhile.
        if !unsafe { self.push(&sqe) } {
            if let Some(s) = self.sessions.get_mut(key.idx) {
                s.transfer.handle_read(Err(()));
            }
            self.ops.try_remove(idx);
        }
    }

    /// Drains the transfer's datagrams into sends: runs of equal size become GSO trains.
    fn transmit(&mut self, key: Key, now: Instant) {
        let listener = self.listener.as_raw_fd();
        loop {
            let mut buf = self.take_buf();
            let gso_on = self.gso != Gso::Off;
            let Some(s) = self.sessions.get_mut(key.idx) else {
                self.recycle(buf);
                return;
            };
            let (fd, to) = s.endpoint(listener);
            let max_seg = if gso_on { s.gso_max } else { 0 };
            let lock_step = s.transfer.window() == 1;
            let Some(train) = fill_train(&mut s.transfer, now, &mut buf.datagrams, max_seg) else {
                self.recycle(buf);
                return;
            };
            // On the shared listener (single-port mode) a full send buffer must not lose
            // a block: that send waits for room, with a CQE.
            if lock_step && train.gso.is_none() && train.spill.is_none() && to.is_none() {
                self.send_lock_step(key, fd, buf);
                continue;
            }
            let spill = train.spill.map(|d| {
                let mut b = self.take_buf();
                b.datagrams.push(d);
                b
            });
            self.send(Some(key), fd, buf, to, train.gso);
            if let Some(b) = spill {
                self.send(Some(key), fd, b, to, None);
            }
        }
    }

    fn run_timers(&mut self, now: Instant) {
        while let Some(&Reverse((at, idx, generation))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            let key = Key { idx, generation };
            let Some(s) = self
                .sessions
                .get_mut(idx)
                .filter(|s| s.generation == generation && s.timer == Some(at))
            else {
                continue; // Stale: the transfer ended or has an earlier entry.
            };
            s.timer = None;
            s.transfer.handle_timeout(now);
            s.mark_dirty(key, &mut self.dirty);
        }
    }

    /// Ends a transfer: cancels its receive and closes its socket after the next submit.
    fn end(&mut self, now: Instant, key: Key, outcome: Outcome) {
        if self
            .sessions
            .get(key.idx)
            .is_none_or(|s| s.generation != key.generation)
        {
            return;
        }
        let s = self.sessions.remove(key.idx);
        if s.recv_armed {
            let sqe = opcode::AsyncCancel::new(user_data(Tag::Recv, key.idx, key.generation))
                .build()
                .user_data(user_data(Tag::Cancel, 0, 0));
            // SAFETY: a cancellation points at no memory.
            unsafe { self.push(&sqe) };
        }
        s.span.in_scope(|| self.tftp.finished(now, s.peer, outcome));
        if let Some(m) = &mut self.by_peer {
            m.remove(&s.peer);
        }
        if let Some(socket) = s.socket {
            self.to_close.push(socket);
        }
    }
}

/// Bytes of the file a cache fill still has to read: `buf` holds the ones read, and its
/// capacity is at least the file's length.
fn fill_left(fill: &CacheFill, buf: &[u8]) -> usize {
    usize::try_from(fill.len())
        .unwrap_or(usize::MAX)
        .saturating_sub(buf.len())
}

/// A run of datagrams collected by [`fill_train`].
#[derive(Debug, Clone, PartialEq, Eq)]
struct Train {
    /// Size of each datagram but the last, which may be shorter.
    segment: usize,
    /// Datagrams in the train.
    segments: usize,
    /// One more datagram, longer than `segment`, that must go on its own.
    spill: Option<Datagram>,
    /// The UDP GSO segment size when the train holds several datagrams.
    gso: Option<u16>,
}

/// Drains the transfer's next datagrams into `out`: one, or, when `max_seg` allows GSO
/// for the first one's size, every following datagram of the same size (the last may be
/// shorter) up to the GSO limits. No protocol knowledge: only sizes count.
fn fill_train(
    t: &mut Transfer,
    now: Instant,
    out: &mut Vec<Datagram>,
    max_seg: usize,
) -> Option<Train> {
    out.clear();
    let first = t.poll_datagram(now)?;
    let n = first.len();
    out.push(first);
    let mut train = Train {
        segment: n,
        segments: 1,
        spill: None,
        gso: None,
    };
    let Some(seg) = u16::try_from(n).ok().filter(|_| n > 0 && n <= max_seg) else {
        return Some(train);
    };
    while train.segments < GSO_MAX_SEGMENTS && (train.segments + 1) * n <= GSO_MAX_BYTES {
        let Some(d) = t.poll_datagram(now) else {
            break;
        };
        let m = d.len();
        if m > n {
            train.spill = Some(d);
            break;
        }
        out.push(d);
        train.segments += 1;
        if m < n {
            break;
        }
    }
    train.gso = (train.segments > 1).then_some(seg);
    Some(train)
}

/// How many chunks read for a transfer are kept for their memory.
const KEPT_READS: usize = 4;

/// An empty buffer for the next read: the memory of the oldest chunk read before, once
/// nothing shares it any more (the transfer has had it acknowledged and its sends have
/// completed), or a new one.
fn read_buffer(reads: &mut VecDeque<Bytes>) -> BytesMut {
    if reads.front().is_some_and(Bytes::is_unique)
        && let Some(Ok(mut b)) = reads.pop_front().map(Bytes::try_into_mut)
    {
        b.clear();
        return b;
    }
    while reads.len() >= KEPT_READS {
        reads.pop_front();
    }
    BytesMut::new()
}

impl RingDriver for Driver {
    fn run(&mut self) -> io::Result<()> {
        self.arm_stop()?;
        self.arm_listener();
        let mut cqes: Vec<(u64, i32, u32)> = Vec::with_capacity(CQ_ENTRIES as usize);
        loop {
            self.wait()?;
            if self.ring.submission().is_empty() {
                // Every SQE that named these sockets has reached the kernel, which holds
                // its own reference to the file from then on; the sends without a success
                // CQE have been carried out.
                self.to_close.clear();
                for buf in std::mem::take(&mut self.sent) {
                    self.recycle(buf);
                }
            }
            cqes.clear();
            cqes.extend(
                self.ring
                    .completion()
                    .map(|c| (c.user_data(), c.result(), c.flags())),
            );
            let now = Instant::now();
            for &(ud, res, flags) in &cqes {
                self.complete(now, ud, res, flags);
            }
            self.listen_bufs.publish();
            self.session_bufs.publish();
            if self.stopping {
                return Ok(());
            }
            self.run_timers(now);
            self.service_dirty(now);
            for (peer, datagram) in std::mem::take(&mut self.requests) {
                self.on_request(now, peer, &datagram);
            }
            self.service_dirty(now);
            for key in std::mem::take(&mut self.rearm) {
                self.arm_recv(key);
            }
            self.submit_fills();
            if !self.listen_armed {
                if self.listen_failures > MAX_LISTEN_FAILURES {
                    return Err(io::Error::other("the TFTP listener keeps failing"));
                }
                self.arm_listener();
            }
        }
    }

    /// Cancels every request and waits for all of them, so that no buffer is freed
    /// while the kernel may still use it. Running transfers are abandoned.
    fn shutdown(mut self) {
        cancel_and_drain(
            &mut self.ring,
            &mut self.inflight,
            user_data(Tag::Cancel, 0, 0),
            DRAIN_LIMIT,
        );
        if self.inflight > 0 {
            tracing::warn!(
                requests = self.inflight,
                "io_uring requests still running at shutdown; leaking their buffers"
            );
            let Self {
                ring,
                listen_bufs,
                session_bufs,
                ops,
                ..
            } = self;
            drop(ring);
            std::mem::forget(listen_bufs);
            std::mem::forget(session_bufs);
            std::mem::forget(ops);
            return;
        }
        let _ = self.ring.submitter().unregister_buf_ring(LISTEN_GROUP);
        let _ = self.ring.submitter().unregister_buf_ring(SESSION_GROUP);
        tracing::debug!("TFTP io_uring driver stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tftp::transfer::{Config, negotiate};
    use crate::tftp::wire::{Mode, Opcode, Packet, emit_request};

    fn transfer(blksize: u16, window: u16, size: usize) -> (Transfer, Vec<u8>) {
        let mut b = vec![0u8; 200];
        let n = emit_request(
            &mut b,
            Opcode::RRQ,
            "f",
            "octet",
            &[
                ("blksize", &blksize.to_string()),
                ("windowsize", &window.to_string()),
            ],
        )
        .expect("fits");
        let Ok(Packet::Rrq(req)) = Packet::parse(&b[..n]) else {
            panic!("rrq")
        };
        let cfg = Config::default();
        let neg = negotiate(&req, &cfg, Some(size as u64));
        let now = Instant::now();
        let mut t = Transfer::new(&neg, Mode::Octet, size as u64, &cfg);
        let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let mut out = vec![0u8; t.buffer_len()];
        // OACK, then ACK 0.
        assert!(t.poll_transmit(now, &mut out).is_some());
        t.handle_datagram(&[0, 4, 0, 0]);
        assert!(Source::Memory(data.clone().into()).feed(&mut t).is_none());
        (t, data)
    }

    #[test]
    fn a_window_becomes_gso_trains_within_the_limits() {
        let (mut t, data) = transfer(1468, 64, 1468 * 100 + 10);
        let now = Instant::now();
        let mut buf = Vec::new();
        let a = fill_train(&mut t, now, &mut buf, 65_000).expect("first train");
        assert_eq!(a.segment, 1472);
        assert_eq!(a.segments, GSO_MAX_BYTES / 1472, "44 datagrams fit 64 KiB");
        assert_eq!(buf.len(), a.segments);
        assert!(buf.iter().all(|d| d.len() == 1472));
        assert_eq!(buf[0].head(), &[0, 3, 0, 1]);
        assert_eq!(&buf[0].body()[..], &data[..1468]);
        assert_eq!(buf[1].head(), &[0, 3, 0, 2]);
        assert_eq!(&buf[1].body()[..], &data[1468..2 * 1468]);
        let b = fill_train(&mut t, now, &mut buf, 65_000).expect("rest of the window");
        assert_eq!(b.segments, 64 - 44);
        assert!(
            fill_train(&mut t, now, &mut buf, 65_000).is_none(),
            "window full"
        );
    }

    #[test]
    fn without_gso_room_datagrams_go_one_by_one_and_short_ones_end_a_train() {
        let (mut t, _) = transfer(512, 4, 512 * 2 + 100);
        let now = Instant::now();
        let mut buf = Vec::new();
        let one = fill_train(&mut t, now, &mut buf, 100).expect("datagram");
        assert_eq!((one.segment, one.segments), (516, 1));
        let rest = fill_train(&mut t, now, &mut buf, 65_000).expect("train");
        assert_eq!((rest.segment, rest.segments, rest.spill), (516, 2, None));
        let lens: Vec<usize> = buf.iter().map(Datagram::len).collect();
        assert_eq!(lens, [516, 104], "the short last block ends the train");
    }

    /// A windowed read by hand: RRQ, ACK 0 after the OACK, one ACK per window.
    fn fetch_windowed(server: SocketAddr, name: &str, blksize: usize, window: u16) -> Vec<u8> {
        let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
        sock.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let rrq = format!("\0\x01{name}\0octet\0blksize\0{blksize}\0windowsize\0{window}\0");
        sock.send_to(rrq.as_bytes(), server).expect("RRQ");
        let mut buf = vec![0u8; blksize + 4];
        let (_, peer) = sock.recv_from(&mut buf).expect("OACK");
        assert_eq!(&buf[..2], &[0, 6]);
        sock.connect(peer).expect("connect");
        sock.send(&[0, 4, 0, 0]).expect("ACK 0");
        let mut out = Vec::new();
        let mut expect: u16 = 1;
        let mut in_window = 0;
        loop {
            let n = sock.recv(&mut buf).expect("DATA");
            assert_eq!(&buf[..2], &[0, 3]);
            if u16::from_be_bytes([buf[2], buf[3]]) != expect {
                continue;
            }
            out.extend_from_slice(&buf[4..n]);
            expect = expect.wrapping_add(1);
            in_window += 1;
            let last = n < blksize + 4;
            if last || in_window == window {
                sock.send(&[0, 4, buf[2], buf[3]]).expect("ACK");
                in_window = 0;
            }
            if last {
                return out;
            }
        }
    }

    #[test]
    fn when_the_kernel_refuses_gso_windows_go_as_single_datagrams() {
        let dir = std::env::temp_dir().join(format!("netboot-uring-nogso-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let want: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 253) as u8).collect();
        std::fs::write(dir.join("f.bin"), &want).expect("write");
        let tftp = Arc::new(Tftp::new(
            &crate::config::TftpConfig::default(),
            dir.clone(),
        ));
        let listener = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let opts = Options {
            no_udp_checksum: true,
            ..Options::default()
        };
        let handle = spawn_inner(Arc::clone(&tftp), listener, opts).expect("ring");
        assert_eq!(fetch_windowed(addr, "f.bin", 1468, 16), want);
        assert_eq!(
            fetch_windowed(addr, "f.bin", 512, 8),
            want,
            "and again, GSO off"
        );
        handle.stop();
        assert_eq!(tftp.stats.gso_sends.load(Ordering::Relaxed), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn user_data_round_trips() {
        let ud = user_data(Tag::Recv, 123_456, 0xab_cdef);
        assert_eq!(split_user_data(ud), (Tag::Recv as u8, 123_456, 0xab_cdef));
    }

    #[test]
    fn a_busy_poll_returns_once_a_datagram_arrives_and_gives_up_without_one() {
        let Ok((mut ring, _)) = ring_for(8, 16, &[(opcode::Recv::CODE, "RECV")]) else {
            eprintln!("SKIPPED: no io_uring here");
            return;
        };
        let rx = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let tx = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let mut buf = [0u8; 16];
        let sqe = opcode::Recv::new(Fd(rx.as_raw_fd()), buf.as_mut_ptr(), 16)
            .build()
            .user_data(7);
        // SAFETY: `buf` and the socket outlive the ring's use of them: the request completes
        // (asserted) before either goes.
        unsafe { ring.submission().push(&sqe) }.expect("room");

        // Nothing to receive: the spin submits the receive, which waits, and gives up.
        let t0 = Instant::now();
        assert!(!poll_completions(&mut ring, Duration::from_millis(5)).expect("poll"));
        assert!(t0.elapsed() >= Duration::from_millis(5));
        assert!(!poll_completions(&mut ring, Duration::ZERO).expect("poll"));

        // The datagram arrives from another thread, before or during the spin, while no
        // one waits on the ring: only the deferred task work the kernel flags delivers it.
        // Without the flag the spin would run its full 10 s and return false.
        let peer = rx.local_addr().expect("addr");
        let sender = std::thread::spawn(move || tx.send_to(b"ping", peer).expect("send"));
        let t0 = Instant::now();
        assert!(poll_completions(&mut ring, Duration::from_secs(10)).expect("poll"));
        assert!(t0.elapsed() < Duration::from_secs(5));
        sender.join().expect("sender");
        let cqe = ring
            .completion()
            .next()
            .map(|c| (c.user_data(), c.result()));
        assert_eq!(cqe, Some((7, 4)));
        assert_eq!(&buf[..4], b"ping");
    }
}
