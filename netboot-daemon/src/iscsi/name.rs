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
}
