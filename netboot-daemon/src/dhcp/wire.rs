//! Decoding a datagram from the network into a dhcproto [`Message`], safely.
//!
//! dhcproto trusts the length of a few options: it `debug_assert!`s the length of
//! options 80, 94 and 152–155 and subtracts from the length of options 81 and 151, so a
//! short option panics a debug build (found by the `dhcp_server` fuzz target). Before
//! handing a datagram to it, [`decode`] walks the option area itself (RFC 2131 §3, RFC
//! 2132 §2): every option must fit in the datagram, and those options must have the
//! length their RFC gives, counted over each run of instances that follow each other,
//! which dhcproto joins into one (RFC 3396; two 4-byte instances of option 153 made an
//! 8-byte one, found by the same fuzz target), and only over such runs (an empty option
//! 81 before another option, then a long one, still reached it as an empty one). Anything
//! else is malformed and dropped.

use dhcproto::v4::{Decodable as _, Decoder, Message};

/// Fixed BOOTP header (RFC 2131 §2) before the magic cookie.
const HEADER: usize = 236;
/// The DHCP magic cookie (RFC 2131 §3).
const COOKIE: [u8; 4] = [99, 130, 83, 99];

/// Why a datagram was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    /// Shorter than the header and cookie, or a wrong cookie.
    Header,
    /// An option runs past the end of the datagram.
    Truncated,
    /// An option's length is not the one its RFC fixes.
    OptionLength(u8),
    /// dhcproto refused it.
    Decode,
}

/// The length an option must have, for the options whose length dhcproto trusts.
fn length_ok(code: u8, len: usize) -> bool {
    match code {
        // RFC 4039 Rapid Commit: empty.
        80 => len == 0,
        // RFC 4702 Client FQDN: flags, two rcodes, then the name.
        81 => len >= 3,
        // RFC 4578 §2.2 Client Network Interface Identifier: type, major, minor.
        94 => len == 3,
        // RFC 6926 §6.2.2 status code: the code, then a message.
        151 => len >= 1,
        // RFC 6926 §6.2.3–6.2.6: 32-bit times.
        152..=155 => len == 4,
        _ => true,
    }
}

/// Checks the option area and decodes the datagram.
pub fn decode(datagram: &[u8]) -> Result<Message, Malformed> {
    let options = datagram
        .get(HEADER..)
        .and_then(|rest| rest.strip_prefix(&COOKIE))
        .ok_or(Malformed::Header)?;
    let mut rest = options;
    // The option being read and its length so far: dhcproto joins the instances of an
    // option that follow each other directly (RFC 3396) and decodes each run as one.
    let mut run: Option<(u8, usize)> = None;
    let check = |run: Option<(u8, usize)>| match run {
        Some((code, len)) if !length_ok(code, len) => Err(Malformed::OptionLength(code)),
        _ => Ok(()),
    };
    while let [code, after_code @ ..] = rest {
        match *code {
            0 => {
                check(run.take())?;
                rest = after_code;
            }
            255 => break,
            code => {
                let (&len, body) = after_code.split_first().ok_or(Malformed::Truncated)?;
                let len = usize::from(len);
                let (_, after) = body.split_at_checked(len).ok_or(Malformed::Truncated)?;
                run = match run {
                    Some((c, sum)) if c == code => Some((code, sum + len)),
                    other => {
                        check(other)?;
                        Some((code, len))
                    }
                };
                rest = after;
            }
        }
    }
    check(run)?;
    Message::decode(&mut Decoder::new(datagram)).map_err(|_| Malformed::Decode)
}

#[cfg(test)]
mod tests {
    use dhcproto::v4::{DhcpOption, Encodable as _, Encoder, MessageType};

    use super::*;

    fn request_with(extra: &[u8]) -> Vec<u8> {
        let mut m = Message::default();
        m.set_chaddr(&[2, 0, 0, 0, 0, 1]);
        m.opts_mut()
            .insert(DhcpOption::MessageType(MessageType::Discover));
        let mut buf = Vec::new();
        m.encode(&mut Encoder::new(&mut buf)).expect("encode");
        // Put `extra` before the end option.
        let end = buf.iter().rposition(|&b| b == 255).expect("end option");
        buf.splice(end..end, extra.iter().copied());
        buf
    }

    #[test]
    fn a_well_formed_request_decodes() {
        let m = decode(&request_with(&[94, 3, 1, 2, 0])).expect("decodes");
        assert_eq!(m.opts().msg_type(), Some(MessageType::Discover));
        // One option in two instances that follow each other (RFC 3396).
        let m = decode(&request_with(&[94, 2, 1, 2, 94, 1, 0])).expect("decodes");
        assert_eq!(
            m.opts()
                .get(dhcproto::v4::OptionCode::ClientNetworkInterface),
            Some(&DhcpOption::ClientNetworkInterface(1, 2, 0))
        );
    }

    #[test]
    fn options_with_a_wrong_length_are_refused_before_dhcproto_sees_them() {
        for (opt, code) in [
            (&[80u8, 1, 0][..], 80),
            (&[81, 2, 0, 0], 81),
            (&[94, 2, 1, 2], 94),
            (&[151, 0], 151),
            (&[152, 1, 0], 152),
            (&[155, 5, 0, 0, 0, 0, 0], 155),
            // Instances that follow each other are one option of their lengths together
            // (RFC 3396); others are separate options, each with its own length.
            (&[153, 4, 0, 0, 0, 1, 153, 4, 0, 0, 0, 2], 153),
            (&[94, 2, 1, 2, 94, 2, 0, 0], 94),
            (
                &[81, 0, 49, 0, 81, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                81,
            ),
            (&[81, 1, 0, 0, 81, 2, 0, 0], 81),
        ] {
            assert_eq!(
                decode(&request_with(opt)),
                Err(Malformed::OptionLength(code)),
                "{opt:?}"
            );
        }
    }

    #[test]
    fn truncated_datagrams_are_refused() {
        let ok = request_with(&[]);
        assert_eq!(decode(&ok[..100]), Err(Malformed::Header));
        let mut bad_cookie = ok.clone();
        bad_cookie[HEADER] = 0;
        assert_eq!(decode(&bad_cookie), Err(Malformed::Header));
        // An option whose length runs past the end.
        let mut cut = ok[..HEADER + 4].to_vec();
        cut.extend([60, 9, b'P', b'X']);
        assert_eq!(decode(&cut), Err(Malformed::Truncated));
    }
}
