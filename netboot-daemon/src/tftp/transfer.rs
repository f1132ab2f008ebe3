//! One read transfer as a sans-IO state machine (RFC 1350, 2347-2349, 7440).
//!
//! Call order, as in quinn-proto: feed inputs with [`Transfer::handle_datagram`],
//! [`Transfer::handle_read`] and [`Transfer::handle_timeout`]; after each input drain
//! [`Transfer::poll_read`] (file data to fetch), [`Transfer::poll_transmit`] (packets to
//! send, until `None`), [`Transfer::poll_event`], and arm a timer for
//! [`Transfer::poll_timeout`]. The transfer never reads a clock, a file or a socket.
//!
//! Sorcerer's Apprentice avoidance (RFC 1350 errata, RFC 1123 §4.2.3.1): a duplicate ACK
//! never triggers a retransmission; only the timer or (with windowsize > 1) an ACK that
//! acknowledges part of the window does, and then the window resumes from the block after
//! the last acknowledged one (RFC 7440 §4).
//!
//! With windows, an ACK that answers a block sent twice says nothing about loss: clients
//! acknowledge every block that arrives out of order (EDK2 does, like RFC 7440's
//! receiver), so a resent window that the client partly had comes back as ACKs that look
//! like "the next window's first block was lost". Acting on them resends the next window
//! too, and so on for the rest of the transfer. So, as TCP NewReno does with its
//! `recover` point (RFC 6582 §3.2), an ACK of a block that had already been sent when the
//! last rewind happened never rewinds again; it still moves the window on. Each loss or
//! duplicate then costs about one window, and the timer covers what is left.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::{Buf as _, Bytes};

use super::wire::{self, ErrorCode, Mode, Packet, Request};

/// Largest blksize (RFC 2348: 65464 = 65535 - 20 - 8 - 4 - 39 of slack used by everyone).
pub const MAX_BLKSIZE: u16 = 65464;

/// Limits and defaults of the transfers.
#[derive(Debug, Clone)]
pub struct Config {
    /// Largest blksize granted; larger requests are clamped to it.
    pub max_blksize: u16,
    /// Largest windowsize granted; larger requests are clamped to it.
    pub max_windowsize: u16,
    /// Retransmission timeout when the client asks for none.
    pub default_timeout: Duration,
    /// Retransmissions of one window before the transfer is abandoned.
    pub max_retries: u32,
    /// The longest a transfer waits for its client to acknowledge something, whatever
    /// timeout it negotiated (255 s with backoff and retries would be over two hours).
    pub max_idle: Duration,
    /// Bytes fetched per file read (at least one window is always fetched).
    pub read_chunk: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_blksize: MAX_BLKSIZE,
            max_windowsize: 64,
            default_timeout: Duration::from_secs(1),
            max_retries: 5,
            max_idle: Duration::from_secs(120),
            read_chunk: 256 * 1024,
        }
    }
}

/// What was negotiated for a transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// Block size.
    pub blksize: u16,
    /// Window size (1 is lock-step).
    pub windowsize: u16,
    /// Retransmission timeout.
    pub timeout: Duration,
    /// The OACK to send, empty when no option was accepted (then DATA 1 goes first).
    pub oack: Vec<(&'static str, String)>,
}

fn number(v: &[u8]) -> Option<u64> {
    std::str::from_utf8(v).ok()?.trim().parse().ok()
}

/// Negotiates the options of `req` (RFC 2347 §4): unknown and invalid options are
/// ignored, blksize and windowsize are clamped to the configured maxima, tsize is
/// answered in octet mode when the size is known.
pub fn negotiate(req: &Request<'_>, cfg: &Config, size: Option<u64>) -> Negotiated {
    let mut n = Negotiated {
        blksize: 512,
        windowsize: 1,
        timeout: cfg.default_timeout,
        oack: Vec::new(),
    };
    for (name, value) in &req.options {
        let Ok(name) = std::str::from_utf8(name) else {
            continue;
        };
        let name = name.to_ascii_lowercase();
        if n.oack.iter().any(|(k, _)| *k == name) {
            continue; // The first occurrence wins.
        }
        match (name.as_str(), number(value)) {
            ("blksize", Some(v)) if v >= 8 => {
                n.blksize = u16::try_from(v)
                    .unwrap_or(u16::MAX)
                    .min(cfg.max_blksize.max(8));
                n.oack.push(("blksize", n.blksize.to_string()));
            }
            ("windowsize", Some(v)) if v >= 1 => {
                n.windowsize = u16::try_from(v)
                    .unwrap_or(u16::MAX)
                    .min(cfg.max_windowsize.max(1));
                n.oack.push(("windowsize", n.windowsize.to_string()));
            }
            ("timeout", Some(v)) if (1..=255).contains(&v) => {
                n.timeout = Duration::from_secs(v);
                n.oack.push(("timeout", v.to_string()));
            }
            ("tsize", Some(_)) if req.mode == Mode::Octet => {
                if let Some(size) = size {
                    n.oack.push(("tsize", size.to_string()));
                }
            }
            _ => {}
        }
    }
    n
}

/// A request for file data: bytes `offset..offset + len` of the source file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadRequest {
    /// Source offset.
    pub offset: u64,
    /// Bytes wanted; fewer means end of file.
    pub len: usize,
}

/// How a transfer ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The client acknowledged the last block.
    Done(Summary),
    /// The transfer was abandoned.
    Failed(Failure, Summary),
}

/// Figures of a finished transfer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// File bytes the client acknowledged (after netascii translation).
    pub bytes: u64,
    /// DATA packets sent, retransmissions included.
    pub packets: u64,
    /// DATA and OACK packets sent again.
    pub retransmits: u64,
    /// UDP payload bytes of every datagram this transfer sent (OACK, DATA with
    /// retransmissions, a final ERROR): what the kernel sees leave the transfer's socket.
    pub sent_bytes: u64,
    /// UDP payload bytes of every datagram the transfer handled until it ended.
    pub received_bytes: u64,
    /// Datagrams counted in `sent_bytes`.
    pub sent_datagrams: u64,
    /// Datagrams counted in `received_bytes`.
    pub received_datagrams: u64,
}

/// Why a transfer failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// No acknowledgement after the last retry.
    TimedOut,
    /// The client sent an ERROR.
    ClientError(ErrorCode),
    /// The file became shorter while it was being sent.
    FileChanged,
    /// Reading the file failed.
    ReadFailed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// OACK sent (or to be sent); waiting for ACK 0.
    ExpectOackAck,
    /// Sending windows; waiting for ACKs.
    Sending,
    /// Finished; nothing more to do.
    Closed,
}

/// One read transfer.
#[derive(Debug)]
pub struct Transfer {
    blksize: usize,
    window: u64,
    base_rto: Duration,
    max_retries: u32,
    max_idle: Duration,
    read_chunk: usize,
    netascii: bool,
    oack: Option<Bytes>,
    state: State,
    // The outgoing stream (after netascii translation) from `buf_start`, as the chunks
    // the reads delivered (`buf_len` bytes in all): blocks are slices of them, not copies.
    buf: VecDeque<Bytes>,
    buf_len: u64,
    buf_start: u64,
    src_pos: u64,
    src_size: u64,
    read_pending: bool,
    // Windows: `base` is the first unacknowledged block, `next` the next to transmit.
    base: u64,
    next: u64,
    oack_sent: bool,
    // One past the highest block ever sent.
    high: u64,
    // `high` when the window last went back: an ACK of a block below it may answer a copy
    // of a block the client already had, so it never makes the window go back again.
    resent_below: u64,
    retries: u32,
    rto: Duration,
    deadline: Option<Instant>,
    // When the transfer began to wait for the client (its first packet since the client
    // last acknowledged something); None while it is not waiting.
    waiting_since: Option<Instant>,
    summary: Summary,
    error_out: Option<Bytes>,
    events: VecDeque<Event>,
}

/// A datagram to send: a header of up to four bytes and a body that shares the file data
/// the transfer was given (a DATA block is never copied on its way to the socket). OACK
/// and ERROR packets are a body alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datagram {
    head: [u8; 4],
    head_len: u8,
    body: Bytes,
}

impl Datagram {
    /// A packet built whole (OACK, ERROR).
    pub fn whole(packet: Bytes) -> Self {
        Self {
            head: [0; 4],
            head_len: 0,
            body: packet,
        }
    }

    fn data(block: u16, body: Bytes) -> Self {
        let mut head = [0u8; 4];
        let head_len = wire::emit_data_header(&mut head, block).unwrap_or(0);
        Self {
            head,
            head_len: head_len as u8,
            body,
        }
    }

    /// The bytes before the body (the DATA header), possibly none.
    pub fn head(&self) -> &[u8] {
        &self.head[..usize::from(self.head_len)]
    }

    /// The rest of the datagram.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// Length of the whole datagram.
    pub fn len(&self) -> usize {
        usize::from(self.head_len) + self.body.len()
    }

    /// True for a datagram without bytes (never produced by a transfer).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies the whole datagram to the start of `buf`; its length, or None when `buf`
    /// is too short.
    pub fn copy_to(&self, buf: &mut [u8]) -> Option<usize> {
        let (head, body) = buf.get_mut(..self.len())?.split_at_mut(self.head().len());
        head.copy_from_slice(self.head());
        body.copy_from_slice(&self.body);
        Some(self.len())
    }
}

impl Transfer {
    /// Starts a transfer of a source of `size` bytes negotiated as `neg`, in `mode`
    /// (octet or netascii).
    pub fn new(neg: &Negotiated, mode: Mode, size: u64, cfg: &Config) -> Self {
        let oack = (!neg.oack.is_empty()).then(|| {
            let mut b = vec![0u8; 512];
            let n = wire::emit_oack(&mut b, &neg.oack).unwrap_or(0);
            b.truncate(n);
            Bytes::from(b)
        });
        let state = if oack.is_some() {
            State::ExpectOackAck
        } else {
            State::Sending
        };
        Self {
            blksize: usize::from(neg.blksize),
            window: u64::from(neg.windowsize.max(1)),
            base_rto: neg.timeout,
            max_retries: cfg.max_retries,
            max_idle: cfg.max_idle,
            read_chunk: cfg.read_chunk,
            netascii: mode == Mode::Netascii,
            oack,
            state,
            buf: VecDeque::new(),
            buf_len: 0,
            buf_start: 0,
            src_pos: 0,
            src_size: size,
            read_pending: false,
            base: 1,
            next: 1,
            oack_sent: false,
            high: 1,
            resent_below: 0,
            retries: 0,
            rto: neg.timeout,
            deadline: None,
            waiting_since: None,
            summary: Summary::default(),
            error_out: None,
            events: VecDeque::new(),
        }
    }

    /// The negotiated window (RFC 7440): 1 for lock-step.
    pub fn window(&self) -> u64 {
        self.window
    }

    /// True once the transfer has ended (its event is queued).
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// The buffer size [`Transfer::poll_transmit`] needs and the longest
    /// [`Transfer::poll_datagram`] returns: a DATA packet, an OACK or an ERROR, whichever
    /// is largest.
    pub fn buffer_len(&self) -> usize {
        (self.blksize + 4).max(516)
    }

    /// True once the whole source has been read.
    fn src_eof(&self) -> bool {
        self.src_pos >= self.src_size
    }

    /// Stream length once known (octet: the file size; netascii: at end of file).
    fn stream_len(&self) -> Option<u64> {
        if self.src_eof() {
            Some(self.buf_start + self.buf_len)
        } else {
            None
        }
    }

    /// Index of the final block, once known.
    fn last_block(&self) -> Option<u64> {
        self.stream_len().map(|len| len / self.blksize as u64 + 1)
    }

    fn block_range(&self, block: u64) -> (u64, u64) {
        let start = (block - 1) * self.blksize as u64;
        (start, start + self.blksize as u64)
    }

    fn finish(&mut self, failure: Option<Failure>) {
        self.state = State::Closed;
        self.deadline = None;
        let s = self.summary.clone();
        self.events.push_back(match failure {
            None => Event::Done(s),
            Some(f) => Event::Failed(f, s),
        });
    }

    fn fail_with_error(&mut self, failure: Failure, code: ErrorCode, msg: &str) {
        let packet = wire::error_packet(code, msg);
        // Counted now: the summary is taken at the end, before the driver sends the ERROR.
        self.summary.sent_bytes += packet.len() as u64;
        self.summary.sent_datagrams += 1;
        self.error_out = Some(packet.into());
        self.finish(Some(failure));
    }

    /// Handles a datagram from the client's transfer port.
    pub fn handle_datagram(&mut self, datagram: &[u8]) {
        if self.state == State::Closed {
            return;
        }
        self.summary.received_bytes += datagram.len() as u64;
        self.summary.received_datagrams += 1;
        match Packet::parse(datagram) {
            Ok(Packet::Ack { block }) => self.handle_ack(block),
            Ok(Packet::Error { code, .. }) => self.finish(Some(Failure::ClientError(code))),
            // Anything else on a read transfer is ignored (and counted by the driver).
            Ok(_) | Err(_) => {}
        }
    }

    fn handle_ack(&mut self, block: u16) {
        if self.state == State::ExpectOackAck {
            if block == 0 && self.oack_sent {
                self.state = State::Sending;
                self.retries = 0;
                self.rto = self.base_rto;
                self.deadline = None;
                self.waiting_since = None;
            }
            return;
        }
        // The acknowledged block is the one in [base - 1, next - 1] with these low 16 bits.
        let Some(acked) = (self.base - 1..self.next)
            .rev()
            .find(|b| (*b & 0xffff) as u16 == block)
        else {
            return; // Stale or bogus: ignore.
        };
        // Whether this ACK can tell of a loss: not when it may answer a copy of a block
        // that was sent again (see the module documentation).
        let fresh = acked >= self.resent_below;
        if acked < self.base {
            // A repeated ACK of the previous window. In lock-step this is the Sorcerer's
            // Apprentice case: ignore it. With a window, the client lost the window's first
            // block: resume at once (the rewind makes every later copy of this ACK stale).
            if self.window > 1 && self.next > self.base && fresh {
                self.rewind();
                self.deadline = None;
            }
            return;
        }
        let (_, end) = self.block_range(acked);
        let acked_bytes = end.min(self.stream_len().unwrap_or(u64::MAX));
        self.drop_front(acked_bytes.saturating_sub(self.buf_start));
        self.summary.bytes = acked_bytes;
        self.base = acked + 1;
        self.retries = 0;
        self.rto = self.base_rto;
        self.deadline = None;
        self.waiting_since = None;
        if self.last_block() == Some(acked) {
            self.finish(None);
            return;
        }
        if self.next > self.base && fresh {
            // Part of the window was lost: resume after the last acknowledged block.
            self.rewind();
        }
        // Otherwise the rest stays in flight and the window slides on; the timer is armed
        // again by `poll_datagram`.
    }

    /// Sends again from the first unacknowledged block; ACKs of blocks sent so far can no
    /// longer tell of a loss.
    fn rewind(&mut self) {
        self.summary.retransmits += self.next - self.base;
        self.next = self.base;
        self.resent_below = self.high;
    }

    /// Forgets the first `n` bytes of the stream (the client has them).
    fn drop_front(&mut self, n: u64) {
        let mut n = n.min(self.buf_len);
        self.buf_start += n;
        self.buf_len -= n;
        while n > 0 {
            let Some(front) = self.buf.front_mut() else {
                break;
            };
            match usize::try_from(n) {
                Ok(k) if k < front.len() => {
                    front.advance(k);
                    break;
                }
                _ => {
                    n -= front.len() as u64;
                    self.buf.pop_front();
                }
            }
        }
    }

    /// The stream's bytes `from..from + len` (relative to `buf_start`): a slice of one
    /// chunk, or a copy when they span chunks (only after short reads or in netascii,
    /// since reads end on block boundaries). None when they are not all there.
    fn stream_slice(&self, from: u64, len: usize) -> Option<Bytes> {
        let end = from.checked_add(len as u64)?;
        if end > self.buf_len {
            return None;
        }
        let mut at = 0u64;
        let mut chunks = self.buf.iter();
        for c in chunks.by_ref() {
            let c_end = at + c.len() as u64;
            if from < c_end {
                let start = usize::try_from(from - at).ok()?;
                if end <= c_end {
                    return Some(c.slice(start..start + len));
                }
                let mut v = Vec::with_capacity(len);
                v.extend_from_slice(&c[start..]);
                for c in chunks {
                    let rest = len - v.len();
                    v.extend_from_slice(&c[..rest.min(c.len())]);
                    if v.len() == len {
                        break;
                    }
                }
                return (v.len() == len).then(|| v.into());
            }
            at = c_end;
        }
        (len == 0).then(Bytes::new)
    }

    /// Handles file data for the last [`ReadRequest`]; fewer bytes than asked means end
    /// of file. `Err` aborts the transfer. The bytes are kept as they are (in octet
    /// mode) and sent as slices of them.
    pub fn handle_read(&mut self, data: Result<Bytes, ()>) {
        self.read_pending = false;
        if self.state == State::Closed {
            return;
        }
        let Ok(data) = data else {
            self.fail_with_error(Failure::ReadFailed, ErrorCode::UNDEFINED, "read error");
            return;
        };
        let read = data.len() as u64;
        let chunk = if self.netascii {
            let mut out = Vec::with_capacity(data.len() + data.len() / 16);
            for &c in &data {
                match c {
                    b'\n' => out.extend([b'\r', b'\n']),
                    b'\r' => out.extend([b'\r', 0]),
                    c => out.push(c),
                }
            }
            Bytes::from(out)
        } else {
            data
        };
        if !chunk.is_empty() {
            self.buf_len += chunk.len() as u64;
            self.buf.push_back(chunk);
        }
        self.src_pos += read;
        if read == 0 && !self.src_eof() {
            self.fail_with_error(
                Failure::FileChanged,
                ErrorCode::UNDEFINED,
                "file changed during transfer",
            );
        }
    }

    /// Handles the timer set by [`Transfer::poll_timeout`].
    pub fn handle_timeout(&mut self, now: Instant) {
        let Some(deadline) = self.deadline else {
            return;
        };
        if now < deadline || self.state == State::Closed {
            return;
        }
        self.deadline = None;
        self.retries += 1;
        let idle_over = self
            .waiting_since
            .is_some_and(|since| now.saturating_duration_since(since) >= self.max_idle);
        if self.retries > self.max_retries || idle_over {
            self.fail_with_error(Failure::TimedOut, ErrorCode::UNDEFINED, "timed out");
            return;
        }
        self.rto = (self.rto * 2).min(self.base_rto * 8);
        match self.state {
            State::ExpectOackAck => {
                self.oack_sent = false;
                self.summary.retransmits += 1;
            }
            State::Sending => self.rewind(),
            State::Closed => {}
        }
    }

    /// The file data needed next, if any (at most one read is outstanding). It asks for
    /// the window and one block more, so that the read of the next block runs while the
    /// client acknowledges this one rather than after, and for whole blocks, so that a
    /// block is one slice of one read.
    pub fn poll_read(&mut self) -> Option<ReadRequest> {
        if self.read_pending || self.src_eof() || self.state == State::Closed {
            return None;
        }
        let want_end = (self.base + self.window) * self.blksize as u64 + 1;
        let have_end = self.buf_start + self.buf_len;
        if have_end >= want_end {
            return None;
        }
        // Not past the end: `src_eof` is false, so at least one byte remains.
        let want = (want_end - have_end).max(self.read_chunk as u64);
        // Up to a block boundary of the source, even after a short read.
        let blk = self.blksize as u64;
        let end = (self.src_pos.saturating_add(want))
            .div_ceil(blk)
            .saturating_mul(blk)
            .min(self.src_size);
        let len = usize::try_from(end - self.src_pos).unwrap_or(usize::MAX);
        self.read_pending = true;
        Some(ReadRequest {
            offset: self.src_pos,
            len,
        })
    }

    /// Writes the next packet to send into `buf`, which must hold
    /// [`Transfer::buffer_len`] bytes; returns its length. A copying
    /// [`Transfer::poll_datagram`]: a shorter `buf` loses the packet, like the wire.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<usize> {
        self.poll_datagram(now)?.copy_to(buf)
    }

    /// The next packet to send, its file data shared with what [`Transfer::handle_read`]
    /// was given.
    pub fn poll_datagram(&mut self, now: Instant) -> Option<Datagram> {
        if let Some(e) = self.error_out.take() {
            // Already in `sent_bytes` (see `fail_with_error`).
            return Some(Datagram::whole(e));
        }
        match self.state {
            State::Closed => None,
            State::ExpectOackAck => {
                if self.oack_sent {
                    return None;
                }
                let oack = self.oack.clone()?;
                self.oack_sent = true;
                self.summary.sent_bytes += oack.len() as u64;
                self.summary.sent_datagrams += 1;
                self.arm(now);
                Some(Datagram::whole(oack))
            }
            State::Sending => {
                let window_end = self.base + self.window;
                let last = self.last_block();
                if self.next >= window_end || last.is_some_and(|l| self.next > l) {
                    // Blocks in flight and nothing more to send (an ACK moved the window
                    // without a rewind): wait for the rest, not forever.
                    if self.next > self.base && self.deadline.is_none() {
                        self.arm(now);
                    }
                    return None;
                }
                let (start, end) = self.block_range(self.next);
                let end = match self.stream_len() {
                    Some(len) => end.min(len),
                    None => end,
                };
                let len = usize::try_from(end - start).unwrap_or(0);
                // None while the block's data is still being read.
                let body = self.stream_slice(start.checked_sub(self.buf_start)?, len)?;
                let d = Datagram::data((self.next & 0xffff) as u16, body);
                self.next += 1;
                self.high = self.high.max(self.next);
                self.summary.packets += 1;
                self.summary.sent_bytes += d.len() as u64;
                self.summary.sent_datagrams += 1;
                if self.next >= window_end || last.is_some_and(|l| self.next > l) {
                    self.arm(now);
                }
                Some(d)
            }
        }
    }

    /// Arms the retransmission timer: `rto` from now, but never past `max_idle` since the
    /// transfer began to wait for its client.
    fn arm(&mut self, now: Instant) {
        let since = *self.waiting_since.get_or_insert(now);
        self.deadline = Some((now + self.rto).min(since + self.max_idle));
    }

    /// When [`Transfer::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadline
    }

    /// How the transfer ended, once.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }
}

#[cfg(test)]
mod tests;
