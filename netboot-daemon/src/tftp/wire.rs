//! TFTP packets (RFC 1350 §5, options RFC 2347 §2).
//!
//! [`Packet::parse`] borrows from the datagram and never panics: every length is checked
//! before it is used. The `emit_*` functions write into a caller's buffer and return the
//! number of bytes written, or `None` when the buffer is too small; they never panic
//! either.

use std::fmt;

/// Opcodes (RFC 1350 §5, RFC 2347 §2). An open registry: unknown values are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opcode(pub u16);

impl Opcode {
    /// Read request.
    pub const RRQ: Self = Self(1);
    /// Write request.
    pub const WRQ: Self = Self(2);
    /// Data.
    pub const DATA: Self = Self(3);
    /// Acknowledgement.
    pub const ACK: Self = Self(4);
    /// Error.
    pub const ERROR: Self = Self(5);
    /// Option acknowledgement (RFC 2347).
    pub const OACK: Self = Self(6);
}

/// Error codes (RFC 1350 §5, RFC 2347 §2). An open registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorCode(pub u16);

impl ErrorCode {
    /// Not defined; see the message.
    pub const UNDEFINED: Self = Self(0);
    /// File not found.
    pub const FILE_NOT_FOUND: Self = Self(1);
    /// Access violation.
    pub const ACCESS_VIOLATION: Self = Self(2);
    /// Disk full.
    pub const DISK_FULL: Self = Self(3);
    /// Illegal TFTP operation.
    pub const ILLEGAL_OPERATION: Self = Self(4);
    /// Unknown transfer ID.
    pub const UNKNOWN_TID: Self = Self(5);
    /// File already exists.
    pub const FILE_EXISTS: Self = Self(6);
    /// No such user.
    pub const NO_SUCH_USER: Self = Self(7);
    /// Option negotiation refused (RFC 2347).
    pub const BAD_OPTIONS: Self = Self(8);
}

/// Transfer mode (RFC 1350 §1). `mail` is obsolete and refused by the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Raw bytes.
    Octet,
    /// NVT ASCII: LF becomes CR LF and CR becomes CR NUL on the wire.
    Netascii,
    /// Obsolete mail mode.
    Mail,
    /// Anything else.
    Unknown,
}

impl Mode {
    fn parse(s: &[u8]) -> Self {
        if s.eq_ignore_ascii_case(b"octet") {
            Self::Octet
        } else if s.eq_ignore_ascii_case(b"netascii") {
            Self::Netascii
        } else if s.eq_ignore_ascii_case(b"mail") {
            Self::Mail
        } else {
            Self::Unknown
        }
    }
}

/// A read or write request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request<'a> {
    /// The file name as sent (not yet normalised or jailed).
    pub filename: &'a [u8],
    /// Transfer mode.
    pub mode: Mode,
    /// Options in the order sent: `(name, value)`, both raw.
    pub options: Options<'a>,
}

impl Request<'_> {
    /// The value of an option, by case-insensitive name; the first occurrence wins.
    pub fn option(&self, name: &str) -> Option<&[u8]> {
        self.options
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| *v)
    }
}

/// A parsed TFTP packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet<'a> {
    /// Read request.
    Rrq(Request<'a>),
    /// Write request.
    Wrq(Request<'a>),
    /// A data block.
    Data {
        /// Block number (wraps at 65535).
        block: u16,
        /// Payload.
        data: &'a [u8],
    },
    /// Acknowledgement of a block (0 acknowledges an OACK).
    Ack {
        /// Block number.
        block: u16,
    },
    /// An error from the peer.
    Error {
        /// Error code.
        code: ErrorCode,
        /// Message (raw; may lack its terminator).
        message: &'a [u8],
    },
    /// Option acknowledgement.
    Oack {
        /// Options granted.
        options: Options<'a>,
    },
}

/// Why a datagram is not a TFTP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Shorter than its fixed part.
    #[error("packet too short")]
    Truncated,
    /// A string is not NUL-terminated.
    #[error("unterminated string")]
    Unterminated,
    /// An opcode we do not know.
    #[error("unknown opcode {0}")]
    UnknownOpcode(u16),
    /// An option has a name but no value.
    #[error("option without value")]
    DanglingOption,
    /// Empty file name.
    #[error("empty file name")]
    EmptyFilename,
}

/// Splits off one NUL-terminated string.
fn cstr(b: &[u8]) -> Result<(&[u8], &[u8]), Error> {
    let nul = b.iter().position(|&c| c == 0).ok_or(Error::Unterminated)?;
    Ok((&b[..nul], &b[nul + 1..]))
}

/// Option `(name, value)` pairs, raw, in the order sent.
pub type Options<'a> = Vec<(&'a [u8], &'a [u8])>;

fn options(mut rest: &[u8]) -> Result<Options<'_>, Error> {
    let mut out = Vec::new();
    // Some PXE ROMs pad requests with NULs: trailing zero bytes are not an option.
    while rest.iter().any(|&c| c != 0) {
        let (name, r) = cstr(rest)?;
        let (value, r) = cstr(r).map_err(|_| Error::DanglingOption)?;
        out.push((name, value));
        rest = r;
    }
    Ok(out)
}

impl<'a> Packet<'a> {
    /// Parses a datagram.
    pub fn parse(b: &'a [u8]) -> Result<Self, Error> {
        if b.len() < 2 {
            return Err(Error::Truncated);
        }
        let op = Opcode(u16::from_be_bytes([b[0], b[1]]));
        let body = &b[2..];
        match op {
            Opcode::RRQ | Opcode::WRQ => {
                let (filename, r) = cstr(body)?;
                if filename.is_empty() {
                    return Err(Error::EmptyFilename);
                }
                let (mode, r) = cstr(r)?;
                let req = Request {
                    filename,
                    mode: Mode::parse(mode),
                    options: options(r)?,
                };
                Ok(if op == Opcode::RRQ {
                    Self::Rrq(req)
                } else {
                    Self::Wrq(req)
                })
            }
            Opcode::DATA => match body {
                [h, l, data @ ..] => Ok(Self::Data {
                    block: u16::from_be_bytes([*h, *l]),
                    data,
                }),
                _ => Err(Error::Truncated),
            },
            Opcode::ACK => match body {
                // Trailing bytes after the block number are tolerated (some clients pad).
                [h, l, ..] => Ok(Self::Ack {
                    block: u16::from_be_bytes([*h, *l]),
                }),
                _ => Err(Error::Truncated),
            },
            Opcode::ERROR => match body {
                [h, l, msg @ ..] => {
                    let message = msg.iter().position(|&c| c == 0).map_or(msg, |n| &msg[..n]);
                    Ok(Self::Error {
                        code: ErrorCode(u16::from_be_bytes([*h, *l])),
                        message,
                    })
                }
                _ => Err(Error::Truncated),
            },
            Opcode::OACK => Ok(Self::Oack {
                options: options(body)?,
            }),
            Opcode(other) => Err(Error::UnknownOpcode(other)),
        }
    }
}

/// Writes an opcode and a block number into `buf[..4]`.
fn emit_block(buf: &mut [u8], op: Opcode, block: u16) -> Option<usize> {
    let h = buf.get_mut(..4)?;
    h[..2].copy_from_slice(&op.0.to_be_bytes());
    h[2..].copy_from_slice(&block.to_be_bytes());
    Some(4)
}

/// Whether a datagram is a request (RRQ or WRQ), by its opcode alone.
pub fn is_request(datagram: &[u8]) -> bool {
    datagram
        .get(..2)
        .map(|b| Opcode(u16::from_be_bytes([b[0], b[1]])))
        .is_some_and(|op| op == Opcode::RRQ || op == Opcode::WRQ)
}

/// Writes a DATA header (opcode and block number) into `buf[..4]`.
pub fn emit_data_header(buf: &mut [u8], block: u16) -> Option<usize> {
    emit_block(buf, Opcode::DATA, block)
}

/// Writes an ACK.
pub fn emit_ack(buf: &mut [u8], block: u16) -> Option<usize> {
    emit_block(buf, Opcode::ACK, block)
}

/// A writer that refuses to overflow its buffer.
struct Writer<'b> {
    buf: &'b mut [u8],
    len: usize,
}

impl Writer<'_> {
    fn put(&mut self, b: &[u8]) -> Option<()> {
        let end = self.len.checked_add(b.len())?;
        self.buf.get_mut(self.len..end)?.copy_from_slice(b);
        self.len = end;
        Some(())
    }

    /// A string and its terminating NUL.
    fn cstr(&mut self, s: &str) -> Option<()> {
        self.put(s.as_bytes())?;
        self.put(&[0])
    }
}

/// Writes an ERROR packet. The message is truncated to fit and never contains a NUL.
pub fn emit_error(buf: &mut [u8], code: ErrorCode, message: &str) -> Option<usize> {
    let mut w = Writer { buf, len: 0 };
    w.put(&Opcode::ERROR.0.to_be_bytes())?;
    w.put(&code.0.to_be_bytes())?;
    let room = w.buf.len().checked_sub(w.len + 1)?;
    for c in message.bytes().filter(|&c| c != 0).take(room) {
        w.put(&[c])?;
    }
    w.put(&[0])?;
    Some(w.len)
}

/// An ERROR packet, sized to fit `message`.
pub fn error_packet(code: ErrorCode, message: &str) -> Vec<u8> {
    let mut b = vec![0u8; 5 + message.len()];
    let n = emit_error(&mut b, code, message).unwrap_or(0);
    b.truncate(n);
    b
}

/// Writes an OACK with `options` as `name\0value\0` pairs.
pub fn emit_oack(buf: &mut [u8], options: &[(&str, String)]) -> Option<usize> {
    let mut w = Writer { buf, len: 0 };
    w.put(&Opcode::OACK.0.to_be_bytes())?;
    for (name, value) in options {
        w.cstr(name)?;
        w.cstr(value)?;
    }
    Some(w.len)
}

/// Writes a request (used by tests and fuzzing; the load generator has its own encoder).
pub fn emit_request(
    buf: &mut [u8],
    op: Opcode,
    filename: &str,
    mode: &str,
    options: &[(&str, &str)],
) -> Option<usize> {
    let mut w = Writer { buf, len: 0 };
    w.put(&op.0.to_be_bytes())?;
    w.cstr(filename)?;
    w.cstr(mode)?;
    for (n, v) in options {
        w.cstr(n)?;
        w.cstr(v)?;
    }
    Some(w.len)
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_told_by_their_opcode() {
        assert!(is_request(b"\x00\x01f\x00octet\x00"));
        assert!(is_request(b"\x00\x02f\x00octet\x00"));
        for other in [
            &b"\x00\x04\x00\x01"[..],
            b"\x00\x05\x00\x00x\x00",
            b"\x00",
            b"",
        ] {
            assert!(!is_request(other), "{other:?}");
        }
    }

    #[test]
    fn parses_an_ipxe_style_rrq() {
        let mut b = [0xa5u8; 128];
        let n = emit_request(
            &mut b,
            Opcode::RRQ,
            "undionly.kpxe",
            "octet",
            &[("blksize", "1432"), ("tsize", "0")],
        )
        .expect("fits");
        let Packet::Rrq(r) = Packet::parse(&b[..n]).expect("parses") else {
            panic!("not an RRQ")
        };
        assert_eq!(r.filename, b"undionly.kpxe");
        assert_eq!(r.mode, Mode::Octet);
        assert_eq!(r.option("BLKSIZE"), Some(&b"1432"[..]));
        assert_eq!(r.option("tsize"), Some(&b"0"[..]));
        assert_eq!(r.option("windowsize"), None);
    }

    #[test]
    fn tolerates_nul_padding_and_refuses_malformed_requests() {
        let p = Packet::parse(b"\0\x01f\0NETASCII\0\0\0\0").expect("padded RRQ");
        assert!(
            matches!(p, Packet::Rrq(Request { mode: Mode::Netascii, ref options, .. }) if options.is_empty())
        );
        assert_eq!(Packet::parse(b"\0\x01"), Err(Error::Unterminated));
        assert_eq!(Packet::parse(b"\0\x01\0octet\0"), Err(Error::EmptyFilename));
        assert_eq!(
            Packet::parse(b"\0\x01f\0octet\0blksize\0"),
            Err(Error::DanglingOption)
        );
        assert_eq!(Packet::parse(b"\0\x01f\0octet"), Err(Error::Unterminated));
        assert_eq!(Packet::parse(b"\0\x09"), Err(Error::UnknownOpcode(9)));
        assert_eq!(Packet::parse(b"\0"), Err(Error::Truncated));
        assert_eq!(Packet::parse(b"\0\x04\0"), Err(Error::Truncated));
    }

    #[test]
    fn emits_into_exact_buffers_and_refuses_short_ones() {
        let mut b = [0xa5u8; 4];
        assert_eq!(emit_ack(&mut b, 0x1234), Some(4));
        assert_eq!(Packet::parse(&b), Ok(Packet::Ack { block: 0x1234 }));
        assert_eq!(emit_ack(&mut b[..3], 1), None);
        let mut b = [0xa5u8; 10];
        let n =
            emit_error(&mut b, ErrorCode::FILE_NOT_FOUND, "no such file here").expect("truncates");
        assert_eq!(n, 10);
        assert_eq!(
            Packet::parse(&b[..n]),
            Ok(Packet::Error {
                code: ErrorCode::FILE_NOT_FOUND,
                message: b"no su"
            })
        );
        let mut b = [0xa5u8; 16];
        let opts = [
            ("blksize", "1468".to_owned()),
            ("tsize", "1048576".to_owned()),
        ];
        assert_eq!(emit_oack(&mut b, &opts), None, "does not fit");
        let mut b = [0xa5u8; 64];
        let n = emit_oack(&mut b, &opts).expect("fits");
        let Packet::Oack { options } = Packet::parse(&b[..n]).expect("parses") else {
            panic!()
        };
        assert_eq!(
            options,
            [
                (&b"blksize"[..], &b"1468"[..]),
                (&b"tsize"[..], &b"1048576"[..])
            ]
        );
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(b in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let _ = Packet::parse(&b);
        }

        #[test]
        fn requests_round_trip(name in "[a-zA-Z0-9/._-]{1,60}", blk in 8u32..70000, win in 1u32..100) {
            let (blk, win) = (blk.to_string(), win.to_string());
            let mut b = vec![0u8; 200];
            let n = emit_request(&mut b, Opcode::RRQ, &name, "octet", &[("blksize", &blk), ("windowsize", &win)])
                .expect("fits");
            let Ok(Packet::Rrq(r)) = Packet::parse(&b[..n]) else { panic!("round trip") };
            proptest::prop_assert_eq!(r.filename, name.as_bytes());
            proptest::prop_assert_eq!(r.option("blksize"), Some(blk.as_bytes()));
            proptest::prop_assert_eq!(r.option("windowsize"), Some(win.as_bytes()));
        }
    }
}
