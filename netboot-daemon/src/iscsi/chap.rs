//! CHAP for iSCSI logins (RFC 1994; RFC 7143 section 12.1.3): the credentials a target
//! requires, the MD5 response, and the binary values the keys carry.
//!
//! The response to a challenge is `MD5(CHAP_I || secret || CHAP_C)` (RFC 1994 section
//! 4.1, algorithm 5). Binary values are `0x` hexadecimal or `0b` base64 (RFC 7143 section
//! 6.1); this target sends hexadecimal, as every initiator it serves does.
//!
//! Nothing here draws random numbers: the connection gets its challenge from the driver.

use base64::Engine as _;
use md5::{Digest as _, Md5};

/// The only CHAP algorithm this target offers: MD5 (RFC 1994, IANA PPP algorithm 5).
pub const ALGORITHM_MD5: &str = "5";
/// Length of this target's challenges, in bytes (RFC 7143 section 12.1.3 asks for at least
/// the length of the hash, 16 bytes for MD5).
pub const CHALLENGE_LEN: usize = 16;
/// Largest binary value accepted from an initiator (RFC 7143 section 12.1.3: 1024 bytes).
pub const MAX_BINARY: usize = 1024;

/// One side's CHAP name and secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    /// The name sent as `CHAP_N`.
    pub user: String,
    /// The shared secret.
    pub secret: Vec<u8>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secret")
            .field("user", &self.user)
            .field("secret", &"<hidden>")
            .finish()
    }
}

/// The CHAP a target requires: the initiator must prove `initiator`; if the initiator asks
/// the target to prove itself (mutual CHAP), the target answers with `target`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// What the initiator must know.
    pub initiator: Secret,
    /// What this target answers an initiator's challenge with; `None`: no mutual CHAP,
    /// an initiator that asks for it is refused.
    pub target: Option<Secret>,
}

/// This target's challenge for one login: identifier and challenge bytes, drawn by the
/// driver from a cryptographic random source.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Challenge {
    /// `CHAP_I`.
    pub id: u8,
    /// `CHAP_C`.
    pub bytes: [u8; CHALLENGE_LEN],
}

impl std::fmt::Debug for Challenge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Challenge").finish_non_exhaustive()
    }
}

/// The CHAP MD5 response (RFC 1994 section 4.1): `MD5(id || secret || challenge)`.
pub fn response(id: u8, secret: &[u8], challenge: &[u8]) -> [u8; 16] {
    let mut h = Md5::new();
    h.update([id]);
    h.update(secret);
    h.update(challenge);
    h.finalize().into()
}

/// Compares two responses in time independent of where they differ.
pub fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Decodes a binary value (RFC 7143 section 6.1): `0x`/`0X` and hexadecimal digits (an odd
/// count has an implied leading zero), or `0b`/`0B` and base64. `None` if it is neither,
/// is empty, or is longer than [`MAX_BINARY`] bytes.
pub fn decode_binary(value: &str) -> Option<Vec<u8>> {
    let (prefix, rest) = (value.get(..2)?, value.get(2..)?);
    let bytes = match prefix {
        "0x" | "0X" => {
            if rest.len() > 2 * MAX_BINARY {
                return None;
            }
            let padded;
            let digits = if rest.len() % 2 == 1 {
                padded = format!("0{rest}");
                padded.as_str()
            } else {
                rest
            };
            hex::decode(digits).ok()?
        }
        "0b" | "0B" => {
            if rest.len() > MAX_BINARY.div_ceil(3) * 4 {
                return None;
            }
            base64::engine::general_purpose::STANDARD
                .decode(rest)
                .ok()?
        }
        _ => return None,
    };
    (!bytes.is_empty() && bytes.len() <= MAX_BINARY).then_some(bytes)
}

/// Encodes bytes as a hexadecimal binary value (`0x...`).
pub fn encode_binary(bytes: &[u8]) -> String {
    format!("0x{}", hex::encode(bytes))
}

/// A CHAP identifier (`CHAP_I`): a decimal or `0x` number from 0 to 255.
pub fn decode_id(value: &str) -> Option<u8> {
    match value
        .strip_prefix("0x")
        .or_else(|| value.strip_prefix("0X"))
    {
        Some(h) => u8::from_str_radix(h, 16).ok(),
        None => value.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_responses_match_independent_vectors() {
        // RFC 1321 appendix A.5: MD5("abc") — id 'a', secret "b", challenge "c".
        assert_eq!(
            hex::encode(response(b'a', b"b", b"c")),
            "900150983cd24fb0d6963f7d28e17f72"
        );
        // RFC 1321 A.5: MD5("message digest"), split as id 'm', secret, challenge.
        assert_eq!(
            hex::encode(response(b'm', b"essage ", b"digest")),
            "f96b697d7cb7938d525a2f31aaf161d0"
        );
        // An iSCSI-shaped case: id 0x01, a 12-byte secret, challenge 00..0f (computed with
        // Python's hashlib.md5(b"\x01" + secret + bytes(range(16)))).
        let challenge: Vec<u8> = (0u8..16).collect();
        assert_eq!(
            hex::encode(response(1, b"secret-12345", &challenge)),
            "b27bd3bb962b70aa0bc50878a9ee1e38"
        );
    }

    #[test]
    fn binary_values_are_hex_or_base64() {
        assert_eq!(decode_binary("0x0102ff"), Some(vec![1, 2, 0xff]));
        assert_eq!(decode_binary("0X102"), Some(vec![1, 2]), "odd count");
        assert_eq!(decode_binary("0bAQL/"), Some(vec![1, 2, 0xff]));
        for bad in ["", "0x", "0b", "12", "0xzz", "0b***", "x0"] {
            assert_eq!(decode_binary(bad), None, "{bad:?}");
        }
        let long = format!("0x{}", "00".repeat(MAX_BINARY + 1));
        assert_eq!(decode_binary(&long), None);
        assert_eq!(encode_binary(&[0xab, 1]), "0xab01");
        assert_eq!(decode_id("7"), Some(7));
        assert_eq!(decode_id("0xff"), Some(255));
        assert_eq!(decode_id("256"), None);
    }

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let s = Secret {
            user: "u".into(),
            secret: b"very-secret-value".to_vec(),
        };
        assert!(!format!("{s:?}").contains("very-secret"));
    }
}
