//! The few TFTP packets a reading client needs (RFC 1350, options RFC 2347-2349, 7440).
//!
//! Written independently of the daemon's `tftp::wire` on purpose: the load generator is
//! the oracle that checks the server, so it must not share the server's parser.

/// Opcodes (RFC 1350 §5, RFC 2347 for OACK).
const RRQ: u16 = 1;
const DATA: u16 = 3;
const ACK: u16 = 4;
const ERROR: u16 = 5;
const OACK: u16 = 6;

/// A packet the client receives.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Incoming<'a> {
    /// DATA: block number and payload.
    Data(u16, &'a [u8]),
    /// OACK: the granted options, names lowercased.
    Oack(Vec<(String, String)>),
    /// ERROR: code and message.
    Error(u16, String),
    /// Anything else (a server has no reason to send RRQ, WRQ or ACK to a reader).
    Other,
}

/// Parses a datagram sent by the server; `None` when it is too short to be TFTP.
pub(crate) fn parse(b: &[u8]) -> Option<Incoming<'_>> {
    let op = u16::from_be_bytes([*b.first()?, *b.get(1)?]);
    let rest = &b[2..];
    Some(match op {
        DATA => {
            let block = u16::from_be_bytes([*rest.first()?, *rest.get(1)?]);
            Incoming::Data(block, &rest[2..])
        }
        OACK => {
            let mut fields = rest.split(|&c| c == 0);
            let mut opts = Vec::new();
            // A well-formed OACK ends with a NUL, so the last split piece is empty.
            while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
                if name.is_empty() {
                    break;
                }
                opts.push((
                    String::from_utf8_lossy(name).to_ascii_lowercase(),
                    String::from_utf8_lossy(value).into_owned(),
                ));
            }
            Incoming::Oack(opts)
        }
        ERROR => {
            let code = u16::from_be_bytes([*rest.first()?, *rest.get(1)?]);
            let msg = rest[2..].split(|&c| c == 0).next().unwrap_or_default();
            Incoming::Error(code, String::from_utf8_lossy(msg).into_owned())
        }
        _ => Incoming::Other,
    })
}

/// A read request in octet mode with the given options.
pub(crate) fn rrq(file: &str, options: &[(&str, String)]) -> Vec<u8> {
    let mut b = Vec::with_capacity(64 + file.len());
    b.extend_from_slice(&RRQ.to_be_bytes());
    for s in [file, "octet"] {
        b.extend_from_slice(s.as_bytes());
        b.push(0);
    }
    for (name, value) in options {
        b.extend_from_slice(name.as_bytes());
        b.push(0);
        b.extend_from_slice(value.as_bytes());
        b.push(0);
    }
    b
}

/// An ACK of `block`.
pub(crate) fn ack(block: u16) -> [u8; 4] {
    let [o0, o1] = ACK.to_be_bytes();
    let [b0, b1] = block.to_be_bytes();
    [o0, o1, b0, b1]
}

/// An ERROR packet.
pub(crate) fn error(code: u16, msg: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(5 + msg.len());
    b.extend_from_slice(&ERROR.to_be_bytes());
    b.extend_from_slice(&code.to_be_bytes());
    b.extend_from_slice(msg.as_bytes());
    b.push(0);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_round_trip_by_hand() {
        let r = rrq(
            "f1M.bin",
            &[("blksize", "1432".into()), ("tsize", "0".into())],
        );
        assert_eq!(r, b"\0\x01f1M.bin\0octet\0blksize\x001432\0tsize\x000\0");
        assert_eq!(ack(0x0102), [0, 4, 1, 2]);
        assert_eq!(error(5, "x"), b"\0\x05\0\x05x\0");
        assert_eq!(
            parse(b"\0\x03\xff\xfeabc"),
            Some(Incoming::Data(0xfffe, b"abc"))
        );
        assert_eq!(
            parse(b"\0\x06BLKSIZE\x001432\0tsize\x00100\0"),
            Some(Incoming::Oack(vec![
                ("blksize".into(), "1432".into()),
                ("tsize".into(), "100".into())
            ]))
        );
        assert_eq!(
            parse(b"\0\x05\0\x01not found\0"),
            Some(Incoming::Error(1, "not found".into()))
        );
        assert_eq!(parse(b"\0"), None);
        assert_eq!(parse(b"\0\x03\0"), None);
        assert_eq!(parse(b"\0\x04\0\x01"), Some(Incoming::Other));
    }
}
