//! Text keys (RFC 7143 sections 6 and 13): `key=value` pairs separated by NUL bytes, and
//! the target's side of the negotiation of each key.
//!
//! [`parse`] splits a data segment into pairs (a pair split across PDUs is joined by the
//! caller, which concatenates the segments of one sequence first). [`Negotiation`] holds
//! the operational parameters of a connection and answers each offered key with the
//! value the RFC's rule for that key gives (the lower of the two numbers, the OR or AND of
//! two booleans, the first acceptable value of a list), `Irrelevant` where the session
//! type makes a key meaningless, and `NotUnderstood` for keys it does not know.

use std::fmt::Write as _;

/// Splits a text data segment into `(key, value)` pairs; `None` if a pair has no `=` or
/// is not UTF-8 (the caller answers with a login or text error).
pub fn parse(data: &[u8]) -> Option<Vec<(String, String)>> {
    let mut pairs = Vec::new();
    for item in data.split(|&b| b == 0).filter(|i| !i.is_empty()) {
        let text = std::str::from_utf8(item).ok()?;
        let (k, v) = text.split_once('=')?;
        pairs.push((k.to_owned(), v.to_owned()));
    }
    Some(pairs)
}

/// Encodes pairs as a text data segment.
pub fn encode(pairs: &[(String, String)]) -> Vec<u8> {
    let mut out = String::new();
    for (k, v) in pairs {
        let _ = write!(out, "{k}={v}\0");
    }
    out.into_bytes()
}

/// The operational parameters of a connection and its session, as negotiated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params {
    /// CRC32C on headers.
    pub header_digest: bool,
    /// CRC32C on data segments.
    pub data_digest: bool,
    /// The initiator waits for an R2T before sending any data.
    pub initial_r2t: bool,
    /// The initiator may send data with the command.
    pub immediate_data: bool,
    /// Largest data segment the initiator accepts (its declaration).
    pub max_send_data: u32,
    /// Largest data segment this target accepts (its declaration).
    pub max_recv_data: u32,
    /// Largest solicited or unsolicited sequence.
    pub max_burst: u32,
    /// Largest unsolicited data of one command.
    pub first_burst: u32,
    /// Outstanding R2Ts per task.
    pub max_outstanding_r2t: u32,
    /// Always 0: this target does no error recovery beyond the session level.
    pub error_recovery_level: u32,
    /// Seconds (logout response).
    pub default_time2wait: u32,
    /// Seconds (logout response).
    pub default_time2retain: u32,
}

/// This target's own limit for data segments it receives.
pub const TARGET_MAX_RECV_DATA: u32 = 262_144;
/// This target's largest burst (RFC 7143 allows up to 2^24 - 1).
pub const TARGET_MAX_BURST: u32 = 1_048_576;

impl Default for Params {
    /// The RFC 7143 section 13 defaults.
    fn default() -> Self {
        Self {
            header_digest: false,
            data_digest: false,
            initial_r2t: true,
            immediate_data: true,
            max_send_data: 8192,
            max_recv_data: 8192,
            max_burst: 262_144,
            first_burst: 65_536,
            max_outstanding_r2t: 1,
            error_recovery_level: 0,
            default_time2wait: 2,
            default_time2retain: 20,
        }
    }
}

/// Negotiation state of one login.
#[derive(Debug, Default)]
pub struct Negotiation {
    /// The values so far.
    pub params: Params,
    /// Whether this target already declared its MaxRecvDataSegmentLength.
    declared_recv: bool,
}

impl Negotiation {
    /// Answers the operational keys of one login or text request; the answers go in the
    /// response in the order of the offers. `discovery` marks keys that only matter for
    /// normal sessions as irrelevant.
    pub fn answer(
        &mut self,
        offers: &[(String, String)],
        discovery: bool,
    ) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (key, value) in offers {
            if let Some(answer) = self.answer_one(key, value, discovery) {
                out.push((key.clone(), answer));
            }
        }
        if !self.declared_recv {
            self.declared_recv = true;
            self.params.max_recv_data = TARGET_MAX_RECV_DATA;
            out.push((
                "MaxRecvDataSegmentLength".into(),
                TARGET_MAX_RECV_DATA.to_string(),
            ));
        }
        out
    }

    /// The answer to one offered key: `None` when no answer is due (keys of the login
    /// stages, declarations), `Reject` for a value that is not valid for the key.
    fn answer_one(&mut self, key: &str, value: &str, discovery: bool) -> Option<String> {
        match key {
            // Handled by the login stages, not negotiated here.
            "InitiatorName"
            | "InitiatorAlias"
            | "TargetName"
            | "SessionType"
            | "AuthMethod"
            | "TargetAlias"
            | "TargetAddress"
            | "TargetPortalGroupTag" => None,
            "MaxRecvDataSegmentLength" => {
                // Declarative: the initiator's limit for what it receives; no answer.
                if let Some(n) = number(value) {
                    self.params.max_send_data = n.clamp(512, 16_777_215);
                    None
                } else {
                    Some("Reject".to_owned())
                }
            }
            _ => Some(
                self.negotiate(key, value, discovery)
                    .unwrap_or_else(|| "Reject".to_owned()),
            ),
        }
    }

    /// The negotiated value of a key, `None` if the offered value is invalid.
    fn negotiate(&mut self, key: &str, value: &str, discovery: bool) -> Option<String> {
        let p = &mut self.params;
        let normal_only = |v: String| {
            if discovery {
                "Irrelevant".to_owned()
            } else {
                v
            }
        };
        Some(match key {
            "HeaderDigest" => {
                p.header_digest = pick_digest(value)?;
                digest_name(p.header_digest)
            }
            "DataDigest" => {
                p.data_digest = pick_digest(value)?;
                digest_name(p.data_digest)
            }
            "MaxConnections" => number(value).map(|_| "1".to_owned())?,
            "InitialR2T" => {
                p.initial_r2t = boolean(value)?;
                normal_only(yes_no(p.initial_r2t))
            }
            "ImmediateData" => {
                p.immediate_data = boolean(value)? && p.immediate_data;
                normal_only(yes_no(p.immediate_data))
            }
            "MaxBurstLength" => {
                p.max_burst = number(value)?.clamp(512, TARGET_MAX_BURST);
                normal_only(p.max_burst.to_string())
            }
            "FirstBurstLength" => {
                p.first_burst = number(value)?.clamp(512, TARGET_MAX_BURST);
                normal_only(p.first_burst.to_string())
            }
            "MaxOutstandingR2T" => {
                p.max_outstanding_r2t = number(value)?.clamp(1, 16);
                normal_only(p.max_outstanding_r2t.to_string())
            }
            "DefaultTime2Wait" => {
                p.default_time2wait = number(value)?.min(3600);
                p.default_time2wait.to_string()
            }
            "DefaultTime2Retain" => {
                // ErrorRecoveryLevel 0: nothing to retain.
                number(value)?;
                p.default_time2retain = 0;
                "0".to_owned()
            }
            "DataPDUInOrder" | "DataSequenceInOrder" => {
                boolean(value)?;
                // This target sends in order whatever was offered (OR with Yes).
                "Yes".to_owned()
            }
            "ErrorRecoveryLevel" => {
                number(value)?;
                "0".to_owned()
            }
            "IFMarker" | "OFMarker" => "No".to_owned(),
            "IFMarkInt" | "OFMarkInt" => "Irrelevant".to_owned(),
            _ => "NotUnderstood".to_owned(),
        })
    }

    /// Finishes the negotiation: FirstBurstLength cannot exceed MaxBurstLength.
    pub fn finish(&mut self) -> Params {
        let p = &mut self.params;
        p.first_burst = p.first_burst.min(p.max_burst);
        p.clone()
    }
}

/// The first value of a digest list this target supports.
fn pick_digest(list: &str) -> Option<bool> {
    list.split(',').find_map(|d| match d {
        "None" => Some(false),
        "CRC32C" => Some(true),
        _ => None,
    })
}

fn digest_name(crc: bool) -> String {
    if crc { "CRC32C" } else { "None" }.to_owned()
}

fn yes_no(b: bool) -> String {
    if b { "Yes" } else { "No" }.to_owned()
}

fn boolean(v: &str) -> Option<bool> {
    match v {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

/// A decimal or `0x` hexadecimal number (RFC 7143 section 6.1).
fn number(v: &str) -> Option<u32> {
    match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => v.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(s: &[(&str, &str)]) -> Vec<(String, String)> {
        s.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect()
    }

    #[test]
    fn parse_and_encode_round_trip() {
        let p = pairs(&[("InitiatorName", "iqn.x:y"), ("SessionType", "Normal")]);
        assert_eq!(parse(&encode(&p)), Some(p));
        assert_eq!(parse(b"NoEquals\0"), None);
        assert_eq!(parse(b"\0\0"), Some(Vec::new()));
    }

    #[test]
    fn ipxe_conservative_offer_is_accepted_as_offered() {
        let mut n = Negotiation::default();
        let answers = n.answer(
            &pairs(&[
                ("HeaderDigest", "None"),
                ("DataDigest", "None"),
                ("MaxConnections", "1"),
                ("InitialR2T", "Yes"),
                ("ImmediateData", "No"),
                ("MaxRecvDataSegmentLength", "8192"),
                ("MaxBurstLength", "262144"),
                ("FirstBurstLength", "65536"),
                ("DefaultTime2Wait", "0"),
                ("DefaultTime2Retain", "0"),
                ("MaxOutstandingR2T", "1"),
                ("DataPDUInOrder", "Yes"),
                ("DataSequenceInOrder", "Yes"),
                ("ErrorRecoveryLevel", "0"),
                ("X-com.example.Vendor", "1"),
            ]),
            false,
        );
        let p = n.finish();
        assert!(!p.immediate_data && p.initial_r2t);
        assert_eq!(p.max_send_data, 8192);
        assert_eq!(p.max_recv_data, TARGET_MAX_RECV_DATA);
        assert!(answers.contains(&("ImmediateData".into(), "No".into())));
        assert!(answers.contains(&("X-com.example.Vendor".into(), "NotUnderstood".into())));
        assert!(answers.contains(&(
            "MaxRecvDataSegmentLength".into(),
            TARGET_MAX_RECV_DATA.to_string()
        )));
        assert!(
            !answers
                .iter()
                .any(|(k, v)| k == "MaxRecvDataSegmentLength" && v == "8192"),
            "the initiator's declaration is not answered"
        );
    }

    #[test]
    fn numbers_take_the_minimum_and_lists_the_first_supported() {
        let mut n = Negotiation::default();
        let a = n.answer(
            &pairs(&[
                ("HeaderDigest", "CRC32C,None"),
                ("DataDigest", "Foo,None"),
                ("MaxBurstLength", "0x1000000"),
                ("FirstBurstLength", "2097152"),
            ]),
            false,
        );
        let p = n.finish();
        assert!(p.header_digest && !p.data_digest);
        assert_eq!(p.max_burst, TARGET_MAX_BURST);
        assert_eq!(p.first_burst, TARGET_MAX_BURST);
        assert!(a.contains(&("HeaderDigest".into(), "CRC32C".into())));
    }

    #[test]
    fn discovery_sessions_mark_normal_keys_irrelevant_and_bad_values_are_rejected() {
        let mut n = Negotiation::default();
        let a = n.answer(
            &pairs(&[("InitialR2T", "Yes"), ("MaxBurstLength", "lots")]),
            true,
        );
        assert!(a.contains(&("InitialR2T".into(), "Irrelevant".into())));
        assert!(a.contains(&("MaxBurstLength".into(), "Reject".into())));
    }
}
