//! Admission of read requests arriving on port 69 (sans-IO).
//!
//! [`Server::handle_request`] turns a datagram into a [`Decision`]: start a transfer,
//! answer with an ERROR, or drop it. It enforces the session limits, refuses writes, and
//! keeps a retransmitted RRQ from starting a second transfer: while a transfer to a
//! client port runs, and for a short while after it completed, a request from that port
//! with the very same bytes is dropped (every peer server starts a new transfer for each
//! duplicate, which is how a boot storm wedges them). Any other request is new: after a
//! transfer the client aborted (a tsize probe ended with ERROR 8) or that failed (file not
//! found, timed out), the next request from that port starts at once, whatever it asks.
//! While a transfer to the port runs, a different request waits for its end (dropped; the
//! client sends it again): there is one transfer per client port.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use super::wire::{ErrorCode, Mode, Packet, Request, error_packet};

/// Session limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Transfers at once, all clients together.
    pub max_sessions: usize,
    /// Transfers at once from one client address.
    pub per_client: usize,
    /// How long a completed transfer still absorbs copies of its request.
    pub linger: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_sessions: 2000,
            per_client: 8,
            linger: Duration::from_secs(5),
        }
    }
}

/// A read request that was admitted, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    /// The client's transfer ID (address and port).
    pub peer: SocketAddr,
    /// The requested file name, normalised: `\` became `/`; not yet jailed.
    pub filename: String,
    /// Transfer mode (octet or netascii).
    pub mode: Mode,
    /// Options as sent.
    pub options: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Admitted {
    /// The request as a borrowed [`Request`], for [`super::transfer::negotiate`].
    pub fn as_request(&self) -> Request<'_> {
        Request {
            filename: self.filename.as_bytes(),
            mode: self.mode,
            options: self
                .options
                .iter()
                .map(|(n, v)| (n.as_slice(), v.as_slice()))
                .collect(),
        }
    }
}

/// Why a datagram was dropped without an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drop {
    /// Not a TFTP packet.
    Malformed,
    /// A retransmission (the same bytes) of a request that is being (or was just) served.
    Duplicate,
    /// Another request from a client port that has a transfer running (one per port).
    Busy,
    /// A packet that has no business on port 69 (DATA, ACK, ...).
    Unexpected,
}

impl Drop {
    /// Label for the dropped-packets counter.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::Duplicate => "duplicate",
            Self::Busy => "busy",
            Self::Unexpected => "unexpected",
        }
    }
}

/// What to do with a datagram that arrived on the listening port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Open the file and start a transfer; report its end with [`Server::finished`].
    Start(Admitted),
    /// Send this ERROR packet to the client and forget the request.
    Refuse {
        /// The ERROR packet.
        packet: Vec<u8>,
        /// Label for the refusals counter.
        reason: &'static str,
    },
    /// Ignore the datagram.
    Drop(Drop),
}

/// Admission state: who is being served.
#[derive(Debug, Default)]
pub struct Server {
    limits: Limits,
    /// Running transfers by client port, with the request that started each.
    active: HashMap<SocketAddr, Vec<u8>>,
    per_ip: HashMap<IpAddr, usize>,
    /// The request of the last transfer to each client port that completed, and when,
    /// for `linger` after its end.
    recent: HashMap<SocketAddr, (Vec<u8>, Instant)>,
    /// When `recent` is next swept of entries older than `linger`.
    next_sweep: Option<Instant>,
}

impl Server {
    /// A server with these limits.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            ..Self::default()
        }
    }

    /// Transfers running now.
    pub fn active(&self) -> usize {
        self.active.len()
    }

    /// Decides what to do with a datagram from `peer` to the listening port.
    pub fn handle_request(&mut self, now: Instant, peer: SocketAddr, datagram: &[u8]) -> Decision {
        let req = match Packet::parse(datagram) {
            Ok(Packet::Rrq(r)) => r,
            Ok(Packet::Wrq(_)) => {
                return Decision::Refuse {
                    packet: error_packet(ErrorCode::ACCESS_VIOLATION, "this server is read-only"),
                    reason: "write",
                };
            }
            Ok(_) => return Decision::Drop(Drop::Unexpected),
            Err(_) => return Decision::Drop(Drop::Malformed),
        };
        let Ok(name) = std::str::from_utf8(req.filename) else {
            return Decision::Refuse {
                packet: error_packet(ErrorCode::FILE_NOT_FOUND, "file not found"),
                reason: "name",
            };
        };
        let filename = name.replace('\\', "/");
        match req.mode {
            Mode::Octet | Mode::Netascii => {}
            Mode::Mail | Mode::Unknown => {
                return Decision::Refuse {
                    packet: error_packet(ErrorCode::ILLEGAL_OPERATION, "unsupported mode"),
                    reason: "mode",
                };
            }
        }
        if let Some(live) = self.active.get(&peer) {
            return Decision::Drop(if live.as_slice() == datagram {
                Drop::Duplicate
            } else {
                Drop::Busy
            });
        }
        let lingering = self.recent.get(&peer).is_some_and(|(rrq, at)| {
            rrq.as_slice() == datagram && now.saturating_duration_since(*at) < self.limits.linger
        });
        if lingering {
            return Decision::Drop(Drop::Duplicate);
        }
        if self.active.len() >= self.limits.max_sessions {
            return Decision::Refuse {
                packet: error_packet(ErrorCode::UNDEFINED, "server busy, try again"),
                reason: "busy",
            };
        }
        let n = self.per_ip.entry(peer.ip()).or_insert(0);
        if *n >= self.limits.per_client {
            return Decision::Refuse {
                packet: error_packet(ErrorCode::UNDEFINED, "too many transfers from this client"),
                reason: "per_client",
            };
        }
        *n += 1;
        self.active.insert(peer, datagram.to_vec());
        Decision::Start(Admitted {
            peer,
            filename,
            mode: req.mode,
            options: req
                .options
                .iter()
                .map(|(n, v)| (n.to_vec(), v.to_vec()))
                .collect(),
        })
    }

    /// Records that the transfer to `peer` ended; `completed` when the client
    /// acknowledged all of it. Only a completed transfer absorbs late copies of its
    /// request: after an abort or a failure the same request is a new attempt.
    pub fn finished(&mut self, now: Instant, peer: SocketAddr, completed: bool) {
        if let Some(rrq) = self.active.remove(&peer) {
            if let Some(n) = self.per_ip.get_mut(&peer.ip()) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.per_ip.remove(&peer.ip());
                }
            }
            if completed {
                self.recent.insert(peer, (rrq, now));
            } else {
                self.recent.remove(&peer);
            }
        }
        // Sweep at most once per `linger`, not on every request: a storm must not make
        // admission quadratic.
        if self.next_sweep.is_none_or(|at| now >= at) {
            let linger = self.limits.linger;
            self.recent
                .retain(|_, (_, at)| now.saturating_duration_since(*at) < linger);
            self.next_sweep = Some(now + linger);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tftp::wire::{Opcode, emit_request};

    fn rrq(name: &str, mode: &str) -> Vec<u8> {
        let mut b = vec![0u8; 200];
        let n =
            emit_request(&mut b, Opcode::RRQ, name, mode, &[("blksize", "1432")]).expect("fits");
        b.truncate(n);
        b
    }

    fn peer(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 5], port))
    }

    #[test]
    fn duplicate_requests_do_not_start_a_second_transfer() {
        let t0 = Instant::now();
        let mut s = Server::new(Limits::default());
        let Decision::Start(a) =
            s.handle_request(t0, peer(2000), &rrq("boot\\x64\\wdsnbp.com", "octet"))
        else {
            panic!("admitted")
        };
        assert_eq!(a.filename, "boot/x64/wdsnbp.com");
        assert_eq!(a.as_request().option("blksize"), Some(&b"1432"[..]));
        assert_eq!(
            s.handle_request(t0, peer(2000), &rrq("boot\\x64\\wdsnbp.com", "octet")),
            Decision::Drop(Drop::Duplicate)
        );
        s.finished(t0, peer(2000), true);
        assert_eq!(s.active(), 0);
        let later = t0 + Duration::from_secs(1);
        assert_eq!(
            s.handle_request(later, peer(2000), &rrq("boot\\x64\\wdsnbp.com", "octet")),
            Decision::Drop(Drop::Duplicate),
            "a late retransmission after the end is absorbed too"
        );
        assert!(matches!(
            s.handle_request(later, peer(2000), &rrq("other", "octet")),
            Decision::Start(_)
        ));
        let much_later = t0 + Duration::from_secs(60);
        s.finished(much_later, peer(2000), true);
        assert!(matches!(
            s.handle_request(
                much_later + Duration::from_secs(6),
                peer(2000),
                &rrq("boot/x64/wdsnbp.com", "octet")
            ),
            Decision::Start(_)
        ));
    }

    fn rrq_with(name: &str, options: &[(&str, &str)]) -> Vec<u8> {
        let mut b = vec![0u8; 200];
        let n = emit_request(&mut b, Opcode::RRQ, name, "octet", options).expect("fits");
        b.truncate(n);
        b
    }

    #[test]
    fn only_an_identical_request_is_a_duplicate_and_only_after_success() {
        let t0 = Instant::now();
        let mut s = Server::new(Limits::default());
        let probe = rrq_with("ipxe.efi", &[("tsize", "0"), ("blksize", "1468")]);
        let fetch = rrq_with("ipxe.efi", &[("blksize", "1468"), ("windowsize", "4")]);
        // EDK2's way: a tsize probe, aborted by the client with ERROR 8, then the real
        // request from the same port with other options.
        assert!(matches!(
            s.handle_request(t0, peer(3000), &probe),
            Decision::Start(_)
        ));
        assert_eq!(
            s.handle_request(t0, peer(3000), &probe),
            Decision::Drop(Drop::Duplicate)
        );
        assert_eq!(
            s.handle_request(t0, peer(3000), &fetch),
            Decision::Drop(Drop::Busy),
            "another request while one runs for that port waits for its end"
        );
        s.finished(t0, peer(3000), false);
        assert!(
            matches!(s.handle_request(t0, peer(3000), &fetch), Decision::Start(_)),
            "no linger after a transfer the client aborted"
        );
        assert!(
            matches!(
                s.handle_request(t0, peer(3000), &probe),
                Decision::Drop(Drop::Busy)
            ),
            "and the probe's retransmission is not taken for a new request while it runs"
        );
        s.finished(t0, peer(3000), true);
        let soon = t0 + Duration::from_secs(1);
        assert_eq!(
            s.handle_request(soon, peer(3000), &fetch),
            Decision::Drop(Drop::Duplicate),
            "a late copy of a request that was served is absorbed"
        );
        assert!(
            matches!(
                s.handle_request(soon, peer(3000), &probe),
                Decision::Start(_)
            ),
            "a different request from the same port is not"
        );
        // A refused or failed transfer (file not found, timed out) leaves nothing behind:
        // the same request again is a new attempt.
        s.finished(soon, peer(3000), false);
        assert!(matches!(
            s.handle_request(soon, peer(3000), &probe),
            Decision::Start(_)
        ));
    }

    #[test]
    fn limits_refuse_cleanly_and_writes_are_refused() {
        let t0 = Instant::now();
        let mut s = Server::new(Limits {
            max_sessions: 3,
            per_client: 2,
            linger: Duration::from_secs(5),
        });
        assert!(matches!(
            s.handle_request(t0, peer(1), &rrq("a", "octet")),
            Decision::Start(_)
        ));
        assert!(matches!(
            s.handle_request(t0, peer(2), &rrq("a", "octet")),
            Decision::Start(_)
        ));
        assert!(matches!(
            s.handle_request(t0, peer(3), &rrq("a", "octet")),
            Decision::Refuse {
                reason: "per_client",
                ..
            }
        ));
        let other = SocketAddr::from(([10, 0, 0, 6], 1));
        assert!(matches!(
            s.handle_request(t0, other, &rrq("a", "octet")),
            Decision::Start(_)
        ));
        let third = SocketAddr::from(([10, 0, 0, 7], 1));
        let Decision::Refuse {
            packet,
            reason: "busy",
        } = s.handle_request(t0, third, &rrq("a", "octet"))
        else {
            panic!("busy")
        };
        assert!(matches!(
            Packet::parse(&packet),
            Ok(Packet::Error {
                code: ErrorCode::UNDEFINED,
                ..
            })
        ));
        let mut w = vec![0u8; 100];
        let n = emit_request(&mut w, Opcode::WRQ, "x", "octet", &[]).expect("fits");
        let Decision::Refuse {
            packet,
            reason: "write",
        } = s.handle_request(t0, third, &w[..n])
        else {
            panic!("wrq")
        };
        assert!(matches!(
            Packet::parse(&packet),
            Ok(Packet::Error {
                code: ErrorCode::ACCESS_VIOLATION,
                ..
            })
        ));
        assert!(matches!(
            s.handle_request(t0, third, &rrq("a", "mail")),
            Decision::Refuse { reason: "mode", .. }
        ));
        assert_eq!(
            s.handle_request(t0, third, b"\0\x04\0\x01"),
            Decision::Drop(Drop::Unexpected)
        );
        assert_eq!(
            s.handle_request(t0, third, b"\xff"),
            Decision::Drop(Drop::Malformed)
        );
    }
}
