//! Golden-file tests of every policy and menu, and escaping of hostile names.
//! `UPDATE_GOLDEN=1 cargo test -p netboot-daemon boot::` rewrites the files.

use std::path::PathBuf;

use super::*;
use crate::store::ChapSummary;
use crate::time::Timestamp;

fn golden(name: &str, got: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("src/boot/testdata")
        .join(format!("{name}.ipxe"));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, got).expect("write golden file");
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run with UPDATE_GOLDEN=1 to create it)",
            path.display()
        )
    });
    assert!(
        got == want,
        "{name}: generated script differs from {}:\n{got}",
        path.display()
    );
}

fn device(policy: BootPolicy, image: Option<&str>, profile: Option<&str>) -> Device {
    Device {
        mac: "52:54:00:12:34:56".parse().expect("mac"),
        name: "rack1-node1".into(),
        arch: Arch::UefiX64,
        enabled: true,
        boot_policy: policy,
        image: image.map(Into::into),
        profile: profile.map(Into::into),
        notes: String::new(),
        created_at: Timestamp(0),
        updated_at: Timestamp(0),
        first_seen: None,
        last_seen: None,
        last_ip: None,
        chap: ChapSummary::NONE,
        initiators: Vec::new(),
    }
}

fn profile(kind: ProfileKind) -> BootProfile {
    BootProfile {
        name: "debian-12".into(),
        kind,
        arch: None,
        kernel: Some(match kind {
            ProfileKind::Windows => "wimboot".into(),
            _ => "debian/12/linux".into(),
        }),
        initrd: vec!["debian/12/initrd.gz".into()],
        cmdline: "auto=true priority=critical url=http://10.0.0.1/preseed.cfg BOOTIF=01-${net0/mac:hexhyp}".into(),
        iso: Some(match kind {
            ProfileKind::Windows => "win11".into(),
            _ => "isos/debian 12 (netinst).iso".into(),
        }),
        description: String::new(),
        created_at: Timestamp(0),
        updated_at: Timestamp(0),
    }
}

fn plan<'a>(
    device: Option<&'a Device>,
    profile: Option<&'a BootProfile>,
    settings: &'a Settings,
    efi: bool,
) -> Plan<'a> {
    Plan {
        base: "http://10.0.0.1:8080",
        mac: "52:54:00:12:34:56".parse().expect("mac"),
        device,
        profile,
        iscsi_host: "10.0.0.1",
        chap: None,
        settings,
        iqn_prefix: "iqn.2026-01.org.netboot",
        efi,
        version: "0.1.0",
        registration: None,
        profiles: &[],
    }
}

#[test]
fn unregistered_client() {
    let s = Settings::default();
    golden("unregistered", &device_script(&plan(None, None, &s, false)));
}

#[test]
fn unregistered_client_may_register_from_the_console() {
    let s = Settings {
        allow_console_registration: true,
        ..Settings::default()
    };
    let profiles = [profile(ProfileKind::Linux), profile(ProfileKind::Windows)];
    let script = device_script(&Plan {
        registration: Some("00112233445566778899aabbccddeeff"),
        profiles: &profiles,
        ..plan(None, None, &s, true)
    });
    golden("unregistered-console", &script);
    assert!(script.contains(
        "chain http://10.0.0.1:8080/boot/ipxe/register?mac=${net0/mac:hexhyp}&token=00112233445566778899aabbccddeeff&platform=${platform}&name=${nb_name:uristring}&disk_gib=${nb_disk:uristring} || goto failed"
    ));
}

#[test]
fn menu_offers_the_installers_browser() {
    let s = Settings::default();
    let d = device(BootPolicy::Menu, None, None);
    let mut linux = profile(ProfileKind::Linux);
    linux.description = "Debian 12 netinst".into();
    let mut iso = profile(ProfileKind::Iso);
    iso.name = "rescue".into();
    let profiles = [linux, iso];
    golden(
        "menu-installers",
        &device_script(&Plan {
            profiles: &profiles,
            ..plan(Some(&d), None, &s, true)
        }),
    );
}

#[test]
fn disabled_device_boots_locally() {
    let s = Settings::default();
    let mut d = device(BootPolicy::Menu, None, None);
    d.enabled = false;
    golden("disabled", &device_script(&plan(Some(&d), None, &s, false)));
}

#[test]
fn menu_with_disk_and_profile() {
    let s = Settings {
        menu_timeout_secs: 5,
        ..Settings::default()
    };
    let d = device(BootPolicy::Menu, Some("win11-rack1"), Some("debian-12"));
    let p = profile(ProfileKind::Linux);
    golden(
        "menu-bios",
        &device_script(&plan(Some(&d), Some(&p), &s, false)),
    );
}

#[test]
fn iscsi_policy() {
    let s = Settings::default();
    let d = device(BootPolicy::Iscsi, Some("win11-rack1"), None);
    golden("iscsi", &device_script(&plan(Some(&d), None, &s, true)));
}

#[test]
fn iscsi_with_mutual_chap_sets_the_credentials_before_sanboot() {
    let s = Settings::default();
    let d = device(BootPolicy::Iscsi, Some("win11-rack1"), None);
    let chap = ChapCredentials {
        user: "rack1-node1".into(),
        secret: "initiator-secret".into(),
        target_user: Some("netboot".into()),
        target_secret: Some("target-secret-1".into()),
    };
    let script = device_script(&Plan {
        chap: Some(&chap),
        ..plan(Some(&d), None, &s, true)
    });
    golden("iscsi-chap", &script);
    let at = |l: &str| {
        script
            .find(l)
            .unwrap_or_else(|| panic!("{l} missing:\n{script}"))
    };
    assert!(at("set password initiator-secret") < at("sanboot iscsi:"));
    assert!(at("set reverse-password target-secret-1") < at("sanboot iscsi:"));
    // One-way CHAP sets no reverse pair.
    let one_way = ChapCredentials {
        target_user: None,
        target_secret: None,
        ..chap
    };
    let script = device_script(&Plan {
        chap: Some(&one_way),
        ..plan(Some(&d), None, &s, true)
    });
    assert!(script.contains("set username rack1-node1\n") && !script.contains("reverse"));
}

#[test]
fn chap_values_cannot_expand_settings_or_end_the_command() {
    assert_eq!(chap_value("abc-DEF_1.2~:+=/!*,^@"), "abc-DEF_1.2~:+=/!*,^@");
    assert_eq!(chap_value("a b${x}\"'c;#|&\n"), "abxc");
}

#[test]
fn linux_profile_bios_and_efi() {
    let s = Settings::default();
    let d = device(BootPolicy::Profile, None, Some("debian-12"));
    let p = profile(ProfileKind::Linux);
    golden(
        "linux-bios",
        &device_script(&plan(Some(&d), Some(&p), &s, false)),
    );
    golden(
        "linux-efi",
        &device_script(&plan(Some(&d), Some(&p), &s, true)),
    );
}

#[test]
fn iso_and_windows_profiles() {
    let s = Settings::default();
    let d = device(BootPolicy::Profile, None, Some("debian-12"));
    golden(
        "iso",
        &device_script(&plan(Some(&d), Some(&profile(ProfileKind::Iso)), &s, false)),
    );
    golden(
        "windows",
        &device_script(&plan(
            Some(&d),
            Some(&profile(ProfileKind::Windows)),
            &s,
            true,
        )),
    );
}

#[test]
fn local_shell_and_info_policies() {
    let s = Settings::default();
    for (policy, name) in [
        (BootPolicy::Local, "local"),
        (BootPolicy::Shell, "shell"),
        (BootPolicy::Info, "info"),
    ] {
        let d = device(policy, None, None);
        golden(name, &device_script(&plan(Some(&d), None, &s, false)));
    }
}

#[test]
fn bootstrap() {
    golden("bootstrap", &bootstrap_script("http://10.0.0.1:8080"));
}

#[test]
fn hostile_names_cannot_inject_commands() {
    let s = Settings::default();
    let mut d = device(BootPolicy::Menu, Some("img"), Some("p"));
    d.name = "evil ${root-path} || shell\nchain http://x/ && \"quote' #hash Ünïcødé…".into();
    let mut p = profile(ProfileKind::Iso);
    p.name = "x$(y)|z".into();
    p.iso = Some("../a b/${x}&y.iso".into());
    p.cmdline = "quiet\nshell || reboot && x".into();
    let profiles = [p.clone()];
    let script = device_script(&Plan {
        profiles: &profiles,
        ..plan(Some(&d), Some(&p), &s, false)
    });
    assert!(
        script.contains(":installers"),
        "the browser lists the hostile profile too"
    );
    for line in script.lines() {
        // The only settings expansions and operators are the generator's own.
        let ours = [
            "${net0/",
            "${next-server}",
            "${platform}",
            "${buildarch}",
            "${manufacturer}",
            "${product}",
            "${selected}",
        ];
        let mut rest = line.to_owned();
        for o in ours {
            rest = rest.replace(o, "");
        }
        assert!(!rest.contains("${"), "unexpected expansion in {line:?}");
        assert_eq!(
            line.matches("||").count(),
            usize::from(line.contains(" || goto") || line.ends_with(" ||")),
            "{line:?}"
        );
        assert!(!line.contains("&&"), "{line:?}");
    }
    assert_eq!(
        text(&d.name, 200),
        "evil __root-path_ __ shell_chain http://x/ __ _quote_ _hash Unicode..."
    );
    assert!(script.contains(&format!(
        "menu netboot 0.1.0 - {} (${{net0/mac}})",
        text(&d.name, 48)
    )));
    assert!(
        script.contains("/files/installers/../a%20b/%24%7Bx%7D%26y.iso?mac=${net0/mac:hexhyp}")
    );
    assert_eq!(text("a\u{0}b\u{7f}c\td", 10), "a_b_c_d");
    assert_eq!(cmdline("a\nb || c && d"), "a b c d");
}

#[test]
fn iqns_carry_the_mac_and_are_valid() {
    assert_eq!(
        image_target("iqn.2026-01.org.netboot", "Win11_Rack1"),
        "iqn.2026-01.org.netboot:win11-rack1"
    );
    assert_eq!(
        initiator_iqn(
            "iqn.2026-01.org.netboot",
            "52:54:00:12:34:56".parse().expect("mac")
        ),
        "iqn.2026-01.org.netboot:initiator:52-54-00-12-34-56"
    );
    assert_eq!(arch_from_ipxe("efi", "arm64"), Some(Arch::UefiArm64));
    assert_eq!(arch_from_ipxe("pcbios", "i386"), Some(Arch::BiosX86));
}
