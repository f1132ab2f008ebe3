//! MAC addresses, normalised to one textual form.
//!
//! Clients, firmware and operators spell the same address in many ways:
//! `AA-BB-CC-DD-EE-FF` (Windows), `aa:bb:cc:dd:ee:ff` (Linux, iPXE `${net0/mac}`),
//! `aabbccddeeff` (iPXE `${mac:hexraw}`, the original system's WinPE uploads) and
//! `aabb.ccdd.eeff` (Cisco).
//! [`MacAddr`] accepts all of them and always prints lower-case, colon-separated,
//! so that one device is one row whatever spelling reached us.

use std::fmt;
use std::str::FromStr;

/// A 48-bit IEEE 802 MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

/// Why a string is not a MAC address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseMacError {
    /// The string does not hold exactly twelve hex digits.
    #[error("a MAC address has 12 hex digits, got {0}")]
    DigitCount(usize),
    /// A character is neither a hex digit nor an accepted separator.
    #[error("unexpected character {0:?} in MAC address")]
    BadChar(char),
    /// Separators are mixed or misplaced (`aa:bb-cc...`, `a:abb...`).
    #[error("separators in a MAC address must be consistent")]
    BadSeparators,
}

impl MacAddr {
    /// The all-zero address.
    pub const ZERO: Self = Self([0; 6]);

    /// The six octets.
    pub const fn octets(self) -> [u8; 6] {
        self.0
    }

    /// Twelve lower-case hex digits without separators, as iPXE's `${mac:hexraw}`.
    pub fn to_hexraw(self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Lower-case hex digits with hyphens, `aa-bb-cc-dd-ee-ff`, as iPXE's
    /// `${mac:hexhyp}`: the name of a device's directories (TFTP, logs).
    pub fn to_hexhyp(self) -> String {
        self.to_string().replace(':', "-")
    }

    /// True for a group (multicast or broadcast) address.
    pub const fn is_multicast(self) -> bool {
        self.0[0] & 1 == 1
    }
}

impl FromStr for MacAddr {
    type Err = ParseMacError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let mut digits = [0u8; 12];
        let mut n = 0usize;
        let mut sep: Option<char> = None;
        // Positions (in digits) after which a separator appeared.
        let mut group_ends = Vec::with_capacity(5);
        for c in s.chars() {
            match c {
                ':' | '-' | '.' => {
                    if sep.is_some_and(|p| p != c) {
                        return Err(ParseMacError::BadSeparators);
                    }
                    sep = Some(c);
                    group_ends.push(n);
                }
                _ => {
                    let v = c.to_digit(16).ok_or(ParseMacError::BadChar(c))?;
                    if n < 12 {
                        digits[n] = u8::try_from(v).expect("invariant: a hex digit fits in u8");
                    }
                    n += 1;
                }
            }
        }
        if n != 12 {
            return Err(ParseMacError::DigitCount(n));
        }
        if let Some(sep) = sep {
            let expected: &[usize] = if sep == '.' {
                &[4, 8]
            } else {
                &[2, 4, 6, 8, 10]
            };
            if group_ends != expected {
                return Err(ParseMacError::BadSeparators);
            }
        }
        let mut out = [0u8; 6];
        for (i, o) in out.iter_mut().enumerate() {
            *o = (digits[2 * i] << 4) | digits[2 * i + 1];
        }
        Ok(Self(out))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl From<[u8; 6]> for MacAddr {
    fn from(octets: [u8; 6]) -> Self {
        Self(octets)
    }
}

impl serde::Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_common_spelling_is_one_address() {
        let want = MacAddr([0xaa, 0xbb, 0xcc, 0x0d, 0xee, 0xff]);
        for s in [
            "AA-BB-CC-0D-EE-FF",
            "aa:bb:cc:0d:ee:ff",
            "aabbcc0deeff",
            "AABB.CC0D.EEFF",
            "  aa:BB:cc:0D:ee:ff\n",
        ] {
            assert_eq!(s.parse::<MacAddr>(), Ok(want), "{s}");
        }
        assert_eq!(want.to_string(), "aa:bb:cc:0d:ee:ff");
        assert_eq!(want.to_hexraw(), "aabbcc0deeff");
    }

    #[test]
    fn malformed_addresses_are_refused() {
        for (s, e) in [
            ("aa:bb:cc:dd:ee", ParseMacError::DigitCount(10)),
            ("aa:bb:cc:dd:ee:ff:00", ParseMacError::DigitCount(14)),
            ("aa:bb-cc:dd:ee:ff", ParseMacError::BadSeparators),
            ("aab:bcc:dd:ee:ff", ParseMacError::BadSeparators),
            ("gg:bb:cc:dd:ee:ff", ParseMacError::BadChar('g')),
            ("", ParseMacError::DigitCount(0)),
        ] {
            assert_eq!(s.parse::<MacAddr>(), Err(e), "{s}");
        }
    }

    #[test]
    fn serde_round_trip_normalises() {
        let m: MacAddr = serde_json::from_str("\"AA-BB-CC-DD-EE-01\"").expect("parse");
        assert_eq!(
            serde_json::to_string(&m).expect("emit"),
            "\"aa:bb:cc:dd:ee:01\""
        );
        assert!(MacAddr([1, 0, 0, 0, 0, 0]).is_multicast());
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(s in ".{0,40}") {
            let _ = s.parse::<MacAddr>();
        }

        #[test]
        fn every_spelling_round_trips(octets in proptest::array::uniform6(0u8..), upper: bool, style in 0usize..4) {
            let m = MacAddr(octets);
            let raw = m.to_hexraw();
            let text = match style {
                0 => m.to_string(),
                1 => m.to_string().replace(':', "-"),
                2 => raw,
                _ => format!("{}.{}.{}", &raw[..4], &raw[4..8], &raw[8..]),
            };
            let text = if upper { text.to_uppercase() } else { text };
            proptest::prop_assert_eq!(text.parse::<MacAddr>(), Ok(m));
        }
    }
}
