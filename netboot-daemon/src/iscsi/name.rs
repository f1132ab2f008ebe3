//! iSCSI names (RFC 7143 section 4.2.7): the target name of each image, the one mapping
//! that the boot scripts, SendTargets, logins and image management share, and how names
//! an initiator sends are compared.
//!
//! An image name may hold capitals and `_` (`Win11_Base`); an iSCSI name may not: RFC 3722's
//! stringprep profile folds case, and `iqn.` names use lower-case letters, digits, `-`,
//! `.` and `:`. So the target of an image is `<prefix>:<part(name)>` ([`image_target`]),
//! and two images whose names differ only in case or in `_` against `-` would have the same
//! target: the store refuses the second ([`same_target`]).

/// `s` in IQN characters: lower case, and `-` for anything but letters, digits, `-`, `.`.
pub fn part(s: &str) -> String {
    s.chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '.') {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// The target name of image `image` under `prefix` (`iscsi.iqn_prefix`).
pub fn image_target(prefix: &str, image: &str) -> String {
    format!("{prefix}:{}", part(image))
}

/// Whether images `a` and `b` have the same target name.
pub fn same_target(a: &str, b: &str) -> bool {
    part(a) == part(b)
}

/// A name as the target compares it: RFC 3722 maps upper case to lower case (netbootd's
/// own names are ASCII, so ASCII folding is the whole mapping for them).
pub fn fold(name: &str) -> String {
    name.to_ascii_lowercase()
}

/// Whether `prefix` is an `iqn.` naming authority as RFC 7143 section 4.2.7.2 writes it:
/// `iqn.`, a year and month (`yyyy-mm`), `.` and a reversed domain name in lower-case
/// letters, digits, `.` and `-`; at most 200 bytes, so that an image's target name stays
/// within the 223 bytes of an iSCSI name.
pub fn valid_prefix(prefix: &str) -> bool {
    prefix.len() <= 200
        && prefix.strip_prefix("iqn.").is_some_and(|rest| {
            let b = rest.as_bytes();
            b.len() > 8
                && b[..4].iter().all(u8::is_ascii_digit)
                && b[4] == b'-'
                && b[5..7].iter().all(u8::is_ascii_digit)
                && b[7] == b'.'
                && rest[8..]
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-')
        })
}

/// The longest iSCSI name (RFC 7143 section 4.2.7.1), in bytes.
pub const MAX_LEN: usize = 223;

/// Whether `name`, case-folded ([`fold`]), is an iSCSI name in one of RFC 7143 section
/// 4.2.7's types, in ASCII: `iqn.yyyy-mm.<reversed domain>[:<anything>]` of lower-case
/// letters, digits, `-`, `.` and `:`, `eui.` and 16 hex digits, or `naa.` and 16 or 32 hex
/// digits; at most [`MAX_LEN`] bytes.
pub fn valid(name: &str) -> bool {
    let name = fold(name);
    if name.len() > MAX_LEN {
        return false;
    }
    let hex = |s: &str, lens: &[usize]| {
        lens.contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit())
    };
    if let Some(id) = name.strip_prefix("eui.") {
        return hex(id, &[16]);
    }
    if let Some(id) = name.strip_prefix("naa.") {
        return hex(id, &[16, 32]);
    }
    let (authority, rest) = name.split_once(':').unwrap_or((&name, ""));
    valid_prefix(authority)
        && rest.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.' | b':')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_targets_are_iqn_characters() {
        let p = "iqn.2026-01.org.netboot";
        assert_eq!(
            image_target(p, "Win11_Base"),
            "iqn.2026-01.org.netboot:win11-base"
        );
        assert_eq!(
            image_target(p, "disk-1.x"),
            "iqn.2026-01.org.netboot:disk-1.x"
        );
        assert!(same_target("Win11_Base", "win11-base"));
        assert!(same_target("Win11_Base", "WIN11_BASE"));
        assert!(!same_target("Win11_Base", "win11base"));
        assert_eq!(
            fold("IQN.2026-01.Org.Netboot:Win11-Base"),
            image_target(p, "win11_base")
        );
    }

    #[test]
    fn prefixes_are_iqn_naming_authorities() {
        assert!(valid_prefix("iqn.2026-01.org.netboot"));
        assert!(valid_prefix("iqn.2026-02.org.example.lab"));
        for bad in [
            "",
            "iqn.2026-01",
            "iqn.2026-01.",
            "iqn.26-01.org.x",
            "iqn.2026-01.Org.x",
            "iqn.2026-01.org.x:y",
            "eui.0123456789abcdef",
            "iqn.2026-01.org_x",
        ] {
            assert!(!valid_prefix(bad), "{bad:?}");
        }
        assert!(!valid_prefix(&format!("iqn.2026-01.{}", "a".repeat(200))));
    }

    #[test]
    fn iscsi_names_of_the_three_types() {
        for good in [
            "iqn.1991-05.com.microsoft:pc12.lab.example",
            "IQN.1991-05.com.Microsoft:PC12",
            "iqn.2010-04.org.ipxe:525400123456",
            "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test",
            "iqn.2026-01.org.netboot",
            "eui.02004567A425678D",
            "naa.52004567BA64678D",
            "naa.62004567BA64678D0123456789ABCDEF",
        ] {
            assert!(valid(good), "{good:?}");
        }
        for bad in [
            "",
            "not an iqn",
            "iqn.x",
            "iqn.1991-05.com.microsoft:a b",
            "iqn.1991-05.com.microsoft:a_b",
            "iqn.1991-05:pc",
            "eui.0200",
            "naa.52004567BA64678DXX",
            "pc12",
        ] {
            assert!(!valid(bad), "{bad:?}");
        }
        let long = format!("iqn.2026-01.org.netboot:{}", "a".repeat(MAX_LEN));
        assert!(!valid(&long));
    }
}
