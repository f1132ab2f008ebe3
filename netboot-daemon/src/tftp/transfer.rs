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

use std::collections::VecDeque;
use std::time::{Duration, Instant};

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
    read_chunk: usize,
    netascii: bool,
    oack: Option<Vec<u8>>,
    state: State,
    // The outgoing stream (after netascii translation) from `buf_start`.
    buf: VecDeque<u8>,
    buf_start: u64,
    src_pos: u64,
    src_size: u64,
    read_pending: bool,
    // Windows: `base` is the first unacknowledged block, `next` the next to transmit.
    base: u64,
    next: u64,
    oack_sent: bool,
    rewound_at: u64,
    retries: u32,
    rto: Duration,
    deadline: Option<Instant>,
    summary: Summary,
    error_out: Option<Vec<u8>>,
    events: VecDeque<Event>,
}

impl Transfer {
    /// Starts a transfer of a source of `size` bytes negotiated as `neg`, in `mode`
    /// (octet or netascii).
    pub fn new(neg: &Negotiated, mode: Mode, size: u64, cfg: &Config) -> Self {
        let oack = (!neg.oack.is_empty()).then(|| {
            let mut b = vec![0u8; 512];
            let n = wire::emit_oack(&mut b, &neg.oack).unwrap_or(0);
            b.truncate(n);
            b
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
            read_chunk: cfg.read_chunk,
            netascii: mode == Mode::Netascii,
            oack,
            state,
            buf: VecDeque::new(),
            buf_start: 0,
            src_pos: 0,
            src_size: size,
            read_pending: false,
            base: 1,
            next: 1,
            oack_sent: false,
            rewound_at: 0,
            retries: 0,
            rto: neg.timeout,
            deadline: None,
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

    /// The buffer size [`Transfer::poll_transmit`] needs: a DATA packet, an OACK or an
    /// ERROR, whichever is largest.
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
            Some(self.buf_start + self.buf.len() as u64)
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
        self.error_out = Some(packet);
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
        if acked < self.base {
            // A repeated ACK of the previous window. In lock-step this is the Sorcerer's
            // Apprentice case: ignore it. With a window, the client lost the window's first
            // block and tells us once: resume at once, but only once per window.
            if self.window > 1 && self.next > self.base && self.rewound_at != self.base {
                self.rewound_at = self.base;
                self.summary.retransmits += self.next - self.base;
                self.next = self.base;
                self.deadline = None;
            }
            return;
        }
        let (_, end) = self.block_range(acked);
        let acked_bytes = end.min(self.stream_len().unwrap_or(u64::MAX));
        let drop = usize::try_from(acked_bytes.saturating_sub(self.buf_start))
            .unwrap_or(usize::MAX)
            .min(self.buf.len());
        self.buf.drain(..drop);
        self.buf_start += drop as u64;
        self.summary.bytes = acked_bytes;
        self.base = acked + 1;
        self.retries = 0;
        self.rto = self.base_rto;
        self.deadline = None;
        if self.last_block() == Some(acked) {
            self.finish(None);
            return;
        }
        if self.next > self.base {
            // Part of the window was lost: resume after the last acknowledged block.
            self.summary.retransmits += self.next - self.base;
            self.next = self.base;
        }
    }

    /// Handles file data for the last [`ReadRequest`]; fewer bytes than asked means end
    /// of file. `Err` aborts the transfer.
    pub fn handle_read(&mut self, data: Result<&[u8], ()>) {
        self.read_pending = false;
        if self.state == State::Closed {
            return;
        }
        let Ok(data) = data else {
            self.fail_with_error(Failure::ReadFailed, ErrorCode::UNDEFINED, "read error");
            return;
        };
        if self.netascii {
            for &c in data {
                match c {
                    b'\n' => self.buf.extend([b'\r', b'\n']),
                    b'\r' => self.buf.extend([b'\r', 0]),
                    c => self.buf.push_back(c),
                }
            }
        } else {
            self.buf.extend(data);
        }
        self.src_pos += data.len() as u64;
        if data.is_empty() && !self.src_eof() {
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
        if self.retries > self.max_retries {
            self.fail_with_error(Failure::TimedOut, ErrorCode::UNDEFINED, "timed out");
            return;
        }
        self.rto = (self.rto * 2).min(self.base_rto * 8);
        match self.state {
            State::ExpectOackAck => {
                self.oack_sent = false;
                self.summary.retransmits += 1;
            }
            State::Sending => {
                self.summary.retransmits += self.next - self.base;
                self.next = self.base;
            }
            State::Closed => {}
        }
    }

    /// The file data needed next, if any (at most one read is outstanding). It asks for
    /// the window and one block more, so that the read of the next block runs while the
    /// client acknowledges this one rather than after.
    pub fn poll_read(&mut self) -> Option<ReadRequest> {
        if self.read_pending || self.src_eof() || self.state == State::Closed {
            return None;
        }
        let want_end = (self.base + self.window) * self.blksize as u64 + 1;
        let have_end = self.buf_start + self.buf.len() as u64;
        if have_end >= want_end {
            return None;
        }
        // Not past the end: `src_eof` is false, so at least one byte remains.
        let len = usize::try_from(want_end - have_end)
            .unwrap_or(usize::MAX)
            .max(self.read_chunk)
            .min(usize::try_from(self.src_size - self.src_pos).unwrap_or(usize::MAX));
        self.read_pending = true;
        Some(ReadRequest {
            offset: self.src_pos,
            len,
        })
    }

    /// Writes the next packet to send into `buf` (at least [`Transfer::buffer_len`]
    /// bytes); returns its length.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<usize> {
        if let Some(e) = self.error_out.take() {
            // Already in `sent_bytes` (see `fail_with_error`).
            let b = buf.get_mut(..e.len())?;
            b.copy_from_slice(&e);
            return Some(e.len());
        }
        match self.state {
            State::Closed => None,
            State::ExpectOackAck => {
                if self.oack_sent {
                    return None;
                }
                let oack = self.oack.as_deref()?;
                buf.get_mut(..oack.len())?.copy_from_slice(oack);
                self.oack_sent = true;
                self.summary.sent_bytes += oack.len() as u64;
                self.summary.sent_datagrams += 1;
                self.deadline = Some(now + self.rto);
                Some(oack.len())
            }
            State::Sending => {
                let window_end = self.base + self.window;
                let last = self.last_block();
                if self.next >= window_end || last.is_some_and(|l| self.next > l) {
                    return None;
                }
                let (start, end) = self.block_range(self.next);
                let have_end = self.buf_start + self.buf.len() as u64;
                let end = match self.stream_len() {
                    Some(len) => end.min(len),
                    None if have_end >= end => end,
                    None => return None, // Waiting for data.
                };
                if have_end < end {
                    return None;
                }
                let len = usize::try_from(end - start).unwrap_or(0);
                let from = usize::try_from(start - self.buf_start).unwrap_or(0);
                let out = buf.get_mut(..4 + len)?;
                wire::emit_data_header(out, (self.next & 0xffff) as u16)?;
                copy_out(&self.buf, from, &mut out[4..])?;
                self.next += 1;
                self.summary.packets += 1;
                self.summary.sent_bytes += 4 + len as u64;
                self.summary.sent_datagrams += 1;
                if self.next >= window_end || last.is_some_and(|l| self.next > l) {
                    self.deadline = Some(now + self.rto);
                }
                Some(4 + len)
            }
        }
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

/// Copies `out.len()` bytes of `buf` from `from` into `out`, without making `buf`
/// contiguous (that would move the whole buffer whenever it wraps). None when `buf` is
/// too short.
fn copy_out(buf: &VecDeque<u8>, from: usize, out: &mut [u8]) -> Option<()> {
    let end = from.checked_add(out.len())?;
    let (a, b) = buf.as_slices();
    if end <= a.len() {
        out.copy_from_slice(a.get(from..end)?);
    } else if from >= a.len() {
        out.copy_from_slice(b.get(from - a.len()..end - a.len())?);
    } else {
        let (head, tail) = out.split_at_mut(a.len() - from);
        head.copy_from_slice(&a[from..]);
        tail.copy_from_slice(b.get(..end - a.len())?);
    }
    Some(())
}

#[cfg(test)]
mod tests;
