//! The iSCSI target against real initiators: libiscsi's tools (`iscsi-ls`, `iscsi-inq`,
//! `iscsi-test-cu`) and qemu's iSCSI block driver (`qemu-img`, `qemu-io`), and against a
//! raw initiator of the test's own for what they cannot send (digests, malformed PDUs).
//!
//! netbootd runs as a user runs it, on loopback with an ephemeral port; images are created
//! through the API. Needs libiscsi-bin and qemu-utils with qemu-block-extra (`cargo xtask
//! test` installs them); without them each test prints a loud SKIPPED line, except under
//! `CI=true`, where it fails.

use std::collections::BTreeMap;
use std::process::{Child, Command};

mod common;

use common::{Log, TestDir, have};

/// The initiator names libiscsi's conformance suite logs in with, and one for the tools.
const TEST_INITIATORS: [&str; 3] = [
    "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test",
    "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test-2",
    "iqn.2026-01.org.netboot:test-tools",
];
/// qemu's default initiator name.
const QEMU_INITIATOR: &str = "iqn.2008-11.org.linux-kvm";
const PREFIX: &str = "iqn.2026-01.org.netboot";

/// netbootd with iSCSI on 127.0.0.1 and an administrator session.
struct Daemon {
    child: Child,
    dir: TestDir,
    http: String,
    iscsi: String,
    cookie: String,
    log: Log,
}

impl Daemon {
    /// netbootd with its default iSCSI driver (io_uring), checked to be the one running.
    fn start(tag: &str) -> Self {
        Self::start_with(tag, "uring")
    }

    /// netbootd with `iscsi.driver = driver`.
    fn start_with(tag: &str, driver: &str) -> Self {
        Self::start_configured(tag, driver, "")
    }

    /// netbootd with `iscsi.driver = driver` and `extra` lines in its `[iscsi]` section.
    fn start_configured(tag: &str, driver: &str, extra: &str) -> Self {
        let dir = TestDir::new(&format!("iscsi-{tag}"));
        let config = dir.path().join("netboot.toml");
        let allow: Vec<String> = TEST_INITIATORS
            .iter()
            .chain(&[QEMU_INITIATOR])
            .map(|s| format!("{s:?}"))
            .collect();
        std::fs::write(
            &config,
            format!(
                "data_dir = \"data\"\n[http]\nlisten = \"127.0.0.1:0\"\n[dhcp]\nmode = \"off\"\n\
                 [tftp]\nenabled = false\n[iscsi]\nlisten = \"127.0.0.1:0\"\nallow = [{}]\n\
                 driver = \"{driver}\"\n{extra}",
                allow.join(", ")
            ),
        )
        .expect("write config");
        let (child, log) = common::spawn_netbootd(dir.path());
        let http = log
            .field("netbootd listening", "addr")
            .expect("HTTP address");
        let iscsi = log
            .field("iSCSI listening", "addr")
            .unwrap_or_else(|| panic!("no iSCSI listener:\n{}", log.text()));
        let running = log.field("iSCSI listening", "driver");
        assert_eq!(
            running.map(|d| d.to_lowercase()).as_deref(),
            Some(driver),
            "the iSCSI driver asked for runs:\n{}",
            log.text()
        );
        let mut d = Self {
            child,
            dir,
            http,
            iscsi,
            cookie: String::new(),
            log,
        };
        let out = d.curl(&[
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "-d",
            r#"{"username":"admin","password":"admin-pass-1"}"#,
            "-c",
            "-",
            &format!("http://{}/api/v1/auth/setup", d.http),
        ]);
        d.cookie = out
            .lines()
            .find_map(|l| {
                l.split('\t')
                    .nth(6)
                    .filter(|_| l.contains("netboot_session"))
            })
            .map(|v| format!("netboot_session={v}"))
            .unwrap_or_else(|| panic!("no session cookie in {out}"));
        d
    }

    fn curl(&self, args: &[&str]) -> String {
        common::curl_ok(args)
    }

    /// Creates an image of `size` bytes through the API; returns its target URL.
    fn image(&self, name: &str, size: u64) -> String {
        self.api(
            "POST",
            "/api/v1/images",
            &format!(r#"{{"name":"{name}","size_bytes":{size}}}"#),
        );
        format!("iscsi://{}/{PREFIX}:{name}/0", self.iscsi)
    }

    fn log(&self) -> String {
        self.log.text()
    }

    /// An authenticated API call with a JSON body; returns the response body.
    fn api(&self, method: &str, path: &str, body: &str) -> String {
        self.curl(&[
            "-X",
            method,
            "-H",
            "content-type: application/json",
            "-b",
            &self.cookie,
            "-d",
            body,
            &format!("http://{}{path}", self.http),
        ])
    }

    fn get(&self, path: &str) -> String {
        self.curl(&["-b", &self.cookie, &format!("http://{}{path}", self.http)])
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether the tools are here; a loud skip (a failure under CI=true) if not.
fn tools(needed: &[&str]) -> bool {
    for tool in needed {
        if !have(tool) {
            common::skip(
                "iscsi (needs libiscsi-bin and qemu-utils with qemu-block-extra)",
                &format!("{tool} is not installed (cargo xtask setup installs it)"),
            );
            return false;
        }
    }
    true
}

fn run(program: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new("timeout")
        .arg("120")
        .arg(program)
        .args(args)
        .output()
        .expect("run");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `qemu-img convert` of the raw image `from` to the raw image `to`; into the existing
/// image (`-n`) when `to` is an iSCSI URL (qemu cannot create a target).
fn qemu_convert(from: &str, to: &str) -> (bool, String) {
    let mut args = vec!["convert"];
    if to.starts_with("iscsi://") {
        args.push("-n");
    }
    args.extend(["-f", "raw", "-O", "raw", from, to]);
    run("qemu-img", &args)
}

#[test]
fn discovery_shows_each_initiator_only_its_targets_and_inquiry_works() {
    if !tools(&["iscsi-ls", "iscsi-inq"]) {
        return;
    }
    let d = Daemon::start("discovery");
    let url = d.image("disk1", 64 << 20);
    let portal = format!("iscsi://{}", d.iscsi);
    let (ok, out) = run("iscsi-ls", &["-i", TEST_INITIATORS[2], "-s", &portal]);
    assert!(ok, "iscsi-ls: {out}\n{}", d.log());
    assert!(
        out.contains(&format!("{PREFIX}:disk1")) && out.contains("DIRECT_ACCESS"),
        "iscsi-ls: {out}"
    );
    let (ok, out) = run(
        "iscsi-ls",
        &["-i", "iqn.2026-01.org.example:stranger", "-s", &portal],
    );
    assert!(ok, "{out}");
    assert!(!out.contains("disk1"), "a stranger sees no targets: {out}");
    // A stranger cannot log in either.
    let (ok, out) = run(
        "iscsi-inq",
        &["-i", "iqn.2026-01.org.example:stranger", &url],
    );
    assert!(!ok, "a stranger logged in: {out}");

    let (ok, out) = run("iscsi-inq", &["-i", TEST_INITIATORS[2], &url]);
    assert!(ok, "iscsi-inq: {out}\n{}", d.log());
    assert!(out.contains("NETBOOT"), "{out}");
    let (ok, out) = run(
        "iscsi-inq",
        &["-i", TEST_INITIATORS[2], "-e", "1", "-c", "128", &url],
    );
    assert!(
        ok && out.contains("disk1"),
        "unit serial number page: {out}"
    );
}

/// An image linked to a device takes the initiator whose name carries the device's MAC
/// (not on the allow list), and the login and its end land on the device's timeline.
#[test]
fn the_linked_device_logs_in_and_its_timeline_shows_it() {
    if !tools(&["iscsi-inq"]) {
        return;
    }
    let d = Daemon::start("linked");
    let url = d.image("pc7", 16 << 20);
    let mac = "52:54:00:ab:cd:07";
    d.api("POST", "/api/v1/devices", &format!(r#"{{"mac":"{mac}"}}"#));
    d.api(
        "PATCH",
        &format!("/api/v1/devices/{mac}"),
        r#"{"image":"pc7"}"#,
    );
    // The name iPXE gives: the MAC without separators.
    let initiator = "iqn.2010-04.org.ipxe:525400abcd07";
    let (ok, out) = run("iscsi-inq", &["-i", initiator, &url]);
    assert!(ok, "the linked device cannot log in: {out}\n{}", d.log());
    let (ok, _) = run(
        "iscsi-inq",
        &["-i", "iqn.2010-04.org.ipxe:525400abcd08", &url],
    );
    assert!(!ok, "another device logged in");
    let events = |kind: &str| {
        d.get(&format!("/api/v1/devices/{mac}/events"))
            .matches(kind)
            .count()
    };
    // The logout is recorded when the connection ends, just after iscsi-inq exits.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while events("iscsi_logout") == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no iscsi_logout event:\n{}",
            d.log()
        );
        std::thread::yield_now();
    }
    assert_eq!(events("iscsi_login"), 1);
}

/// A device's explicit initiator names: its image's target takes a listed IQN (one that
/// neither carries the MAC nor is on `iscsi.allow`), in discovery and at login, and
/// refuses another with status 02/02 (authorization failure). The API validates the list
/// and shows it.
#[test]
fn a_device_admits_the_initiator_names_listed_on_it() {
    if !tools(&["iscsi-ls", "iscsi-inq"]) {
        return;
    }
    let d = Daemon::start("initiators");
    let url = d.image("pc12", 16 << 20);
    let mac = "52:54:00:ab:cd:12";
    let listed = "iqn.1991-05.com.microsoft:pc12.lab.example";
    let other = "iqn.1991-05.com.microsoft:pc13.lab.example";
    d.api("POST", "/api/v1/devices", &format!(r#"{{"mac":"{mac}"}}"#));
    for bad in [
        r#"["not an iqn"]"#,
        r#"["iqn.1991-05.com.microsoft:a b"]"#,
        r#"["iqn.x"]"#,
        r#""iqn.1991-05.com.microsoft:pc12""#,
    ] {
        assert_eq!(
            api_status(
                &d,
                "PATCH",
                &format!("/api/v1/devices/{mac}"),
                &format!(r#"{{"initiators":{bad}}}"#)
            ),
            "422",
            "{bad}"
        );
    }
    let device = d.api(
        "PATCH",
        &format!("/api/v1/devices/{mac}"),
        // Names are case-insensitive (RFC 3722): stored folded.
        r#"{"image":"pc12","initiators":["IQN.1991-05.com.Microsoft:PC12.lab.example"]}"#,
    );
    assert!(
        device.contains(&format!(r#""initiators":["{listed}"]"#)),
        "{device}"
    );
    let portal = format!("iscsi://{}", d.iscsi);
    let (ok, out) = run("iscsi-ls", &["-i", listed, "-s", &portal]);
    assert!(
        ok && out.contains(&format!("{PREFIX}:pc12")),
        "discovery: {out}\n{}",
        d.log()
    );
    let (ok, out) = run("iscsi-inq", &["-i", listed, &url]);
    assert!(ok, "the listed initiator logs in: {out}\n{}", d.log());
    let (ok, out) = run("iscsi-ls", &["-i", other, "-s", &portal]);
    assert!(ok && !out.contains("pc12"), "another sees nothing: {out}");
    let (ok, out) = run("iscsi-inq", &["-i", other, &url]);
    assert!(
        !ok && out.contains("Authorization failure"),
        "another initiator is refused, 02/02: {out}"
    );
    // The list is the device's: cleared, the name is refused too.
    d.api(
        "PATCH",
        &format!("/api/v1/devices/{mac}"),
        r#"{"initiators":[]}"#,
    );
    let (ok, out) = run("iscsi-inq", &["-i", listed, &url]);
    assert!(!ok, "the cleared name logged in: {out}");
}

/// HTTP status of an authenticated API call.
fn api_status(d: &Daemon, method: &str, path: &str, body: &str) -> String {
    let (ok, out) = run(
        "curl",
        &[
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            method,
            "-H",
            "content-type: application/json",
            "-b",
            &d.cookie,
            "-d",
            body,
            &format!("http://{}{path}", d.http),
        ],
    );
    assert!(ok, "curl: {out}");
    out
}

/// An image whose name has capitals and `_` (which an IQN cannot hold) boots: the target
/// its boot script names is exactly the one SendTargets lists to the initiator the script
/// sets, and that initiator logs in to it. The prefix is the configuration's
/// (`iscsi.iqn_prefix`), which the settings cannot change behind the target's back, and
/// a name whose target would be another image's is refused.
#[test]
fn the_boot_script_names_the_target_that_discovery_lists() {
    if !tools(&["iscsi-ls", "iscsi-inq"]) {
        return;
    }
    let prefix = "iqn.2026-02.org.example.lab";
    let d = Daemon::start_configured(
        "iqn-names",
        "uring",
        &format!("iqn_prefix = \"{prefix}\"\n"),
    );
    d.image("Win11_Base", 16 << 20);
    let mac = "52:54:00:ab:cd:11";
    d.api("POST", "/api/v1/devices", &format!(r#"{{"mac":"{mac}"}}"#));
    d.api(
        "PATCH",
        &format!("/api/v1/devices/{mac}"),
        r#"{"image":"Win11_Base","boot_policy":"iscsi"}"#,
    );
    assert_eq!(
        api_status(
            &d,
            "PATCH",
            "/api/v1/settings",
            r#"{"iqn_prefix":"iqn.2026-03.org.elsewhere"}"#
        ),
        "422",
        "the settings cannot change the target names"
    );
    let script = d.curl(&[&format!(
        "http://{}/boot/ipxe/device?mac={}&platform=efi&arch=x86_64",
        d.http,
        mac.replace(':', "-")
    )]);
    let value = |key: &str| {
        script
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key:?} in the script:\n{script}"))
            .to_owned()
    };
    let initiator = value("set initiator-iqn ");
    let sanboot = value("sanboot iscsi:");
    let target = sanboot
        .split(' ')
        .next()
        .and_then(|uri| uri.rsplit("::::").next())
        .expect("the sanboot URI's target")
        .to_owned();
    assert_eq!(target, format!("{prefix}:win11-base"), "{script}");
    let (ok, out) = run(
        "iscsi-ls",
        &["-i", &initiator, "-s", &format!("iscsi://{}", d.iscsi)],
    );
    assert!(ok, "iscsi-ls: {out}\n{}", d.log());
    let listed: Vec<&str> = out
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Target:"))
        .map(|t| t.split_whitespace().next().unwrap_or(""))
        .collect();
    assert_eq!(listed, [target.as_str()], "SendTargets: {out}");
    let url = format!("iscsi://{}/{target}/0", d.iscsi);
    let (ok, out) = run(
        "iscsi-inq",
        &["-i", &initiator, "-e", "1", "-c", "128", &url],
    );
    assert!(
        ok && out.contains("Win11_Base"),
        "the script's initiator logs in to the script's target: {out}\n{}",
        d.log()
    );
    // Another image whose target name would be the same is refused, created or renamed.
    let clash = r#"{"name":"win11-base","size_bytes":1048576}"#;
    assert_eq!(api_status(&d, "POST", "/api/v1/images", clash), "409");
    d.api(
        "POST",
        "/api/v1/images",
        r#"{"name":"other","size_bytes":1048576}"#,
    );
    assert_eq!(
        api_status(
            &d,
            "POST",
            "/api/v1/images/other/rename",
            r#"{"name":"WIN11_base"}"#
        ),
        "409"
    );
    // Renaming the image itself to another spelling keeps its target.
    assert_eq!(
        api_status(
            &d,
            "POST",
            "/api/v1/images/Win11_Base/rename",
            r#"{"name":"win11_BASE"}"#
        ),
        "200"
    );
    let (ok, out) = run("iscsi-inq", &["-i", &initiator, &url]);
    assert!(ok, "after the rename: {out}\n{}", d.log());
}

/// qemu writes an image through the target and reads it back identical; everything it was
/// told is written is in the image file after `kill -9` of the daemon.
#[test]
fn qemu_writes_and_reads_back_an_image_that_survives_kill_9() {
    if !tools(&["qemu-img"]) {
        return;
    }
    let (ok, formats) = run("qemu-img", &["--help"]);
    if !ok || !formats.contains("iscsi") {
        common::skip(
            "iscsi (qemu's iSCSI driver is in qemu-block-extra)",
            "qemu-img has no iscsi driver",
        );
        return;
    }
    // The io_uring driver busy-polls here: qemu's requests are then taken by the spin
    // rather than by a wake-up, and every acknowledged write must still be on disk.
    let d = Daemon::start_configured("qemu", "uring", "busy_poll_us = 100\n");
    let url = d.image("disk2", 32 << 20);
    let src = d.dir.path().join("src.raw");
    let data: Vec<u8> = (0..(6u32 << 20) + 4096)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&src, &data).expect("write source");
    let src = src.to_str().expect("utf8");
    let (ok, out) = qemu_convert(src, &url);
    assert!(ok, "qemu-img convert: {out}\n{}", d.log());
    let (ok, out) = run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", src, &url],
    );
    assert!(ok && out.contains("identical"), "qemu-img compare: {out}");
    // Every acknowledged write is in the image file: kill -9 the daemon, then read it.
    let mut d = d;
    d.child.kill().expect("kill -9 netbootd");
    d.child.wait().expect("reap netbootd");
    let file = std::fs::read(d.dir.path().join("data/images/disk2.img")).expect("image file");
    assert_eq!(&file[..data.len()], &data[..]);
    assert_eq!(file.len(), 32 << 20);
}

/// CHAP secrets of the device in the CHAP test.
const INITIATOR_SECRET: &str = "initiator-secret";
const TARGET_SECRET: &str = "target-secret-1";

/// A device with mutual CHAP: its image's target takes libiscsi and qemu only with the
/// right secret, refuses a login without CHAP, and libiscsi itself refuses a target that
/// answers its challenge with the wrong secret. The API shows only that secrets are set,
/// and the audit log says they changed without them.
#[test]
fn chap_guards_the_image_of_a_device_that_has_it() {
    if !tools(&["iscsi-inq", "qemu-img"]) {
        return;
    }
    let d = Daemon::start("chap");
    let url = d.image("pc9", 16 << 20);
    let mac = "52:54:00:ab:cd:09";
    d.api("POST", "/api/v1/devices", &format!(r#"{{"mac":"{mac}"}}"#));
    let device = d.api(
        "PATCH",
        &format!("/api/v1/devices/{mac}"),
        &format!(
            r#"{{"image":"pc9","chap":{{"user":"pc9","secret":"{INITIATOR_SECRET}","target_user":"netboot","target_secret":"{TARGET_SECRET}"}}}}"#
        ),
    );
    assert!(
        device.contains(
            r#""chap":{"user":"pc9","secret":"set","target_user":"netboot","target_secret":"set"}"#
        ),
        "{device}"
    );
    let shown = d.get(&format!("/api/v1/devices/{mac}"))
        + &d.get("/api/v1/devices")
        + &d.get("/api/v1/audit");
    assert!(
        shown.contains("chap_secrets"),
        "the change is audited: {shown}"
    );
    for secret in [INITIATOR_SECRET, TARGET_SECRET] {
        assert!(!shown.contains(secret), "a secret is shown: {shown}");
    }
    // Short secrets are refused.
    let status = api_status(
        &d,
        "PATCH",
        &format!("/api/v1/devices/{mac}"),
        r#"{"chap":{"user":"pc9","secret":"short"}}"#,
    );
    assert_eq!(status, "422");

    let initiator = TEST_INITIATORS[2];
    let with = |user: &str, secret: &str, tail: &str| {
        url.replacen("iscsi://", &format!("iscsi://{user}%{secret}@"), 1) + tail
    };
    let (ok, out) = run(
        "iscsi-inq",
        &["-i", initiator, &with("pc9", INITIATOR_SECRET, "")],
    );
    assert!(
        ok && out.contains("NETBOOT"),
        "the right secret: {out}\n{}",
        d.log()
    );
    let (ok, out) = run(
        "iscsi-inq",
        &["-i", initiator, &with("pc9", "wrong-secret-12", "")],
    );
    assert!(
        !ok && out.contains("Authentication failure"),
        "a wrong secret: {out}"
    );
    let (ok, out) = run(
        "iscsi-inq",
        &["-i", initiator, &with("pc8", INITIATOR_SECRET, "")],
    );
    assert!(
        !ok && out.contains("Authentication failure"),
        "a wrong name: {out}"
    );
    let (ok, out) = run("iscsi-inq", &["-i", initiator, &url]);
    assert!(
        !ok && out.contains("Authentication failure"),
        "no CHAP: {out}"
    );
    // Mutual: libiscsi checks the target's answer to its own challenge.
    let mutual = |secret: &str| format!("?target_user=netboot&target_password={secret}");
    let (ok, out) = run(
        "iscsi-inq",
        &[
            "-i",
            initiator,
            &with("pc9", INITIATOR_SECRET, &mutual(TARGET_SECRET)),
        ],
    );
    assert!(
        ok && out.contains("NETBOOT"),
        "mutual CHAP: {out}\n{}",
        d.log()
    );
    let (ok, out) = run(
        "iscsi-inq",
        &[
            "-i",
            initiator,
            &with("pc9", INITIATOR_SECRET, &mutual("other-secret-99")),
        ],
    );
    assert!(
        !ok && out.contains("Invalid CHAP_R response from the target"),
        "the initiator must refuse a target with the wrong secret: {out}"
    );

    // qemu writes and reads the image through a CHAP login.
    let src = d.dir.path().join("chap.raw");
    let data: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    std::fs::write(&src, &data).expect("write source");
    let src = src.to_str().expect("utf8");
    let chap_url = with("pc9", INITIATOR_SECRET, "");
    let (ok, out) = qemu_convert(src, &chap_url);
    assert!(ok, "qemu-img convert with CHAP: {out}\n{}", d.log());
    let read = d.dir.path().join("chap-back.raw");
    let (ok, out) = qemu_convert(&chap_url, read.to_str().expect("utf8"));
    assert!(ok, "qemu-img read with CHAP: {out}");
    assert_eq!(
        &std::fs::read(&read).expect("read back")[..data.len()],
        &data[..]
    );
    let (ok, _) = run("qemu-img", &["info", &with("pc9", "wrong-secret-12", "")]);
    assert!(!ok, "qemu logged in with a wrong secret");

    // Without CHAP the image takes AuthMethod=None again.
    d.api(
        "PATCH",
        &format!("/api/v1/devices/{mac}"),
        r#"{"chap":null}"#,
    );
    let (ok, out) = run("iscsi-inq", &["-i", initiator, &url]);
    assert!(ok, "CHAP removed: {out}");
}

/// An ISO installer is a shared read-only CD-ROM target: any initiator finds it in
/// discovery and logs in, it is a DVD of 2048-byte blocks, reads are byte-identical to
/// the file, and a write ends in DATA PROTECT.
#[test]
fn installer_isos_are_shared_read_only_cdroms() {
    if !tools(&[
        "iscsi-ls",
        "iscsi-inq",
        "iscsi-readcapacity16",
        "qemu-img",
        "qemu-io",
    ]) {
        return;
    }
    let d = Daemon::start("installer");
    let dir = d.dir.path().join("data/installers/isos");
    std::fs::create_dir_all(&dir).expect("installers dir");
    let iso: Vec<u8> = (0..(3u32 << 20) + 2048 * 7)
        .map(|i| (i.wrapping_mul(2_246_822_519) >> 9) as u8)
        .collect();
    std::fs::write(dir.join("rescue.iso"), &iso).expect("write ISO");
    d.api(
        "POST",
        "/api/v1/installers",
        r#"{"path":"isos/rescue.iso","kind":"iso","name":"Rescue (x86_64).iso"}"#,
    );
    let target = format!("{PREFIX}:installer:rescue-x86-64");
    let url = format!("iscsi://{}/{target}/0", d.iscsi);
    let stranger = "iqn.2026-01.org.example:any-pc";
    let (ok, out) = run(
        "iscsi-ls",
        &["-i", stranger, "-s", &format!("iscsi://{}", d.iscsi)],
    );
    assert!(ok && out.contains(&target), "discovery: {out}\n{}", d.log());
    let (ok, out) = run("iscsi-inq", &["-i", stranger, &url]);
    assert!(ok, "iscsi-inq: {out}\n{}", d.log());
    // libiscsi names peripheral device type 0x05 (CD/DVD) "MMC".
    assert!(
        out.contains("Peripheral Device Type:MMC"),
        "a CD-ROM: {out}"
    );
    let (ok, out) = run("iscsi-readcapacity16", &["-i", stranger, &url]);
    assert!(ok, "iscsi-readcapacity16: {out}");
    assert!(out.contains("LOGICAL BLOCK LENGTH IN BYTES:2048"), "{out}");
    assert!(out.contains(&format!("Total size:{}", iso.len())), "{out}");
    let copy = d.dir.path().join("copy.iso");
    let (ok, out) = qemu_convert(&url, copy.to_str().expect("utf8"));
    assert!(ok, "qemu-img convert: {out}\n{}", d.log());
    assert!(
        std::fs::read(&copy).expect("copy") == iso,
        "the copy differs from the ISO"
    );
    // A write reaches the LUN and ends in DATA PROTECT, which qemu reports as EACCES.
    let (_, out) = run("qemu-io", &["-f", "raw", "-c", "write -P 0x55 0 4k", &url]);
    assert!(
        out.contains("write failed: Permission denied"),
        "qemu-io write: {out}\n{}",
        d.log()
    );
    assert_eq!(std::fs::read(dir.join("rescue.iso")).expect("ISO"), iso);
}

/// The families of iscsi-test-cu whose suites netbootd claims: every suite of these must
/// end without a failure (docs/compliance.md).
const CLAIMED_FAMILIES: [&str; 2] = ["SCSI", "iSCSI"];

/// Tests that fail against a target that answers as SBC-4 says, because of the test
/// itself, with the line of its verbose output that shows it. `GetLBAStatus.UnmapSingle`
/// (libiscsi 1.19, test_get_lba_status_unmap_single.c) asks GET LBA STATUS for LBA i + 1
/// and wants the first descriptor to start at i + LBPPB: with 8 logical blocks per physical
/// block (READ CAPACITY(16) LBPPBE 3, netbootd's 4 KiB physical blocks) that descriptor
/// would not contain the LBA asked for, which SBC-4 5.8.1 requires. It fails against tgtd
/// too. The comparison fails when this list is wrong either way.
const TEST_BUGS: &[(&str, &str)] = &[(
    "SCSI.GetLBAStatus.UnmapSingle",
    "Send GET_LBA_STATUS (Expecting SUCCESS) LBA:9 alloc_len:24",
)];

/// How one libiscsi test ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Pass,
    /// Reported as passed by CUnit with a `[SKIPPED]` line.
    Skip,
    /// FAILED, or no result at all (the suite crashed or timed out).
    Fail,
}

impl Outcome {
    fn name(self) -> &'static str {
        match self {
            Self::Pass => "PASS",
            Self::Skip => "SKIP",
            Self::Fail => "FAIL",
        }
    }
}

/// The suites of the claimed families, from `iscsi-test-cu --list`.
fn claimed_suites() -> Vec<String> {
    let (ok, out) = run("iscsi-test-cu", &["--list"]);
    assert!(ok, "iscsi-test-cu --list: {out}");
    let suites: Vec<String> = out
        .lines()
        .map(str::trim)
        .filter(|l| {
            let mut parts = l.split('.');
            CLAIMED_FAMILIES.contains(&parts.next().unwrap_or("")) && parts.count() == 1
        })
        .map(str::to_owned)
        .collect();
    assert!(suites.len() >= 51, "suites: {suites:?}");
    suites
}

/// Runs every suite against `url`, each in its own process (a fresh login), with the same
/// URL as the second (multipath) path; returns each test's outcome by its full name.
fn conformance(url: &str, suites: &[String]) -> BTreeMap<String, Outcome> {
    let mut results = BTreeMap::new();
    for suite in suites {
        let (_, out) = run(
            "iscsi-test-cu",
            &["-d", "-S", &format!("--test={suite}"), url, url],
        );
        let family = suite.split('.').next().unwrap_or("");
        let before = results.len();
        parse_cunit(family, &out, &mut results);
        assert!(results.len() > before, "no test ran in {suite}:\n{out}");
    }
    results
}

/// Reads CUnit's text: `Suite: S`, then per test `  Test: T ...` followed by its log lines
/// (libiscsi's own lines are indented) and CUnit's verdict, `passed` or `FAILED`, right
/// after the `...` or at the start of a line. A test with a `[SKIPPED]` line before its
/// verdict was skipped; a test without a verdict failed.
fn parse_cunit(family: &str, out: &str, into: &mut BTreeMap<String, Outcome>) {
    let mut suite = "";
    let mut current: Option<(String, Outcome, bool)> = None;
    let mut close = |current: &mut Option<(String, Outcome, bool)>| {
        if let Some((name, outcome, _)) = current.take() {
            into.insert(name, outcome);
        }
    };
    for line in out.lines() {
        if let Some(s) = line.strip_prefix("Suite: ") {
            close(&mut current);
            suite = s.trim();
            continue;
        }
        let rest = if let Some(t) = line.strip_prefix("  Test: ") {
            close(&mut current);
            let (test, rest) = t.split_once(" ...").unwrap_or((t, ""));
            current = Some((
                format!("{family}.{suite}.{}", test.trim()),
                Outcome::Fail,
                false,
            ));
            rest
        } else if line.starts_with("Run Summary:") {
            close(&mut current);
            continue;
        } else {
            line
        };
        let Some((_, outcome, decided)) = current.as_mut() else {
            continue;
        };
        if *decided {
            continue;
        }
        if rest.starts_with("passed") {
            *decided = true;
            if *outcome != Outcome::Skip {
                *outcome = Outcome::Pass;
            }
        } else if rest.starts_with("FAILED") {
            *decided = true;
            *outcome = Outcome::Fail;
        } else if rest.contains("[SKIPPED]") {
            *outcome = Outcome::Skip;
        }
    }
    close(&mut current);
}

fn count(results: &BTreeMap<String, Outcome>, which: Outcome) -> usize {
    results.values().filter(|o| **o == which).count()
}

/// tgtd (Debian's `tgt`) with its own control socket (`-C N`) and portal, one target whose
/// LUN 1 is a sparse file with thin provisioning on; stopped through tgtadm, then by PID.
struct Tgtd {
    child: Child,
    control: String,
    portal: String,
}

const TGT_IQN: &str = "iqn.2026-01.org.netboot:tgtd-baseline";

impl Tgtd {
    /// Why tgtd cannot run here, if it cannot.
    fn unavailable() -> Option<String> {
        if !have("tgtd") || !have("tgtadm") {
            return Some("tgtd is not installed (Debian package tgt)".into());
        }
        common::privileged(&[]).err()
    }

    fn start(dir: &std::path::Path) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let portal = format!("127.0.0.1:{port}");
        let control = std::process::id().to_string();
        let log = std::fs::File::create(dir.join("tgtd.log")).expect("tgtd.log");
        let child = Command::new("tgtd")
            .args(["-f", "-C", &control, "--iscsi"])
            .arg(format!("portal={portal}"))
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn tgtd");
        let mut t = Self {
            child,
            control,
            portal,
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !t.adm(&["--mode", "system", "--op", "show"]).0 {
            assert!(
                std::time::Instant::now() < deadline && t.child.try_wait().ok().flatten().is_none(),
                "tgtd did not start: {}",
                std::fs::read_to_string(dir.join("tgtd.log")).unwrap_or_default()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let file = dir.join("tgtd-lun1.img");
        std::fs::File::create(&file)
            .and_then(|f| f.set_len(128 << 20))
            .expect("LUN file");
        for args in [
            vec![
                "--mode",
                "target",
                "--op",
                "new",
                "--tid",
                "1",
                "--targetname",
                TGT_IQN,
            ],
            vec![
                "--mode",
                "logicalunit",
                "--op",
                "new",
                "--tid",
                "1",
                "--lun",
                "1",
                "-b",
                file.to_str().expect("utf8"),
            ],
            vec![
                "--mode",
                "logicalunit",
                "--op",
                "update",
                "--tid",
                "1",
                "--lun",
                "1",
                "--params",
                "thin_provisioning=1",
            ],
            vec![
                "--mode", "target", "--op", "bind", "--tid", "1", "-I", "ALL",
            ],
        ] {
            let (ok, out) = t.adm(&args);
            assert!(ok, "tgtadm {args:?}: {out}");
        }
        t
    }

    fn url(&self) -> String {
        format!("iscsi://{}/{TGT_IQN}/1", self.portal)
    }

    fn adm(&self, args: &[&str]) -> (bool, String) {
        let mut all = vec!["-C", &self.control, "--lld", "iscsi"];
        all.extend_from_slice(args);
        run("tgtadm", &all)
    }
}

impl Drop for Tgtd {
    fn drop(&mut self) {
        // tgtd ignores SIGTERM while targets exist: delete them, then the system.
        let lun = [
            "--mode",
            "logicalunit",
            "--op",
            "delete",
            "--tid",
            "1",
            "--lun",
            "1",
        ];
        let _ = self.adm(&lun);
        let _ = self.adm(&["--mode", "target", "--op", "delete", "--tid", "1"]);
        let _ = self.adm(&["--mode", "system", "--op", "delete"]);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        while self.child.try_wait().ok().flatten().is_none() && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        for f in ["", ".lock"] {
            let _ = std::fs::remove_file(format!("/var/run/tgtd/socket.{}{f}", self.control));
        }
    }
}

/// libiscsi's conformance suite against netbootd, every suite of the claimed families in
/// its own process: no test may fail. Then the same suites against tgtd when it can run
/// here (a loud skip otherwise): every test that passes against tgtd must pass against
/// netbootd; only the [`TEST_BUGS`] fail, against both. The per-test table of both runs is written to
/// `target/tmp/libiscsi-conformance.md` (the source of docs/libiscsi-tgtd-baseline.md).
#[test]
fn libiscsi_conformance_suites_pass() {
    conformance_on("uring", true);
}

/// The tokio driver, the fallback when a ring cannot be set up, passes the same suites
/// (the comparison with tgtd runs once, above).
#[test]
fn libiscsi_conformance_suites_pass_on_the_tokio_driver() {
    conformance_on("tokio", false);
}

/// Runs the claimed suites against netbootd on `driver`, then, if `against_tgtd`, against
/// tgtd, and compares them test by test.
fn conformance_on(driver: &str, against_tgtd: bool) {
    if !tools(&["iscsi-test-cu"]) {
        return;
    }
    let suites = claimed_suites();
    let d = Daemon::start_with(&format!("conformance-{driver}"), driver);
    let url = d.image("conformance", 128 << 20);
    let ours = conformance(&url, &suites);
    let failed: Vec<&str> = ours
        .iter()
        .filter(|(_, o)| **o == Outcome::Fail)
        .map(|(t, _)| t.as_str())
        .collect();
    eprintln!(
        "netbootd: {} suites, {} tests: {} pass, {} skip, {} fail",
        suites.len(),
        ours.len(),
        count(&ours, Outcome::Pass),
        count(&ours, Outcome::Skip),
        failed.len()
    );
    let bugs: Vec<&str> = TEST_BUGS.iter().map(|(t, _)| *t).collect();
    assert_eq!(
        failed,
        bugs,
        "failing tests (but the TEST_BUGS)\n--- netbootd log ---\n{}",
        d.log()
    );
    for (test, shows) in TEST_BUGS {
        // The test fails where the bug is: at the descriptor for LBA i + 1.
        let (_, out) = run(
            "iscsi-test-cu",
            &["-d", "-V", &format!("--test={test}"), &url, &url],
        );
        let at = out
            .find(shows)
            .unwrap_or_else(|| panic!("{test}: no {shows:?} in\n{out}"));
        assert!(
            out[at..].contains("lba offset in first descriptor does not"),
            "{test} fails for another reason than TEST_BUGS says:\n{out}"
        );
    }
    drop(d);
    if !against_tgtd {
        return;
    }
    if let Some(why) = Tgtd::unavailable() {
        common::skip("libiscsi conformance: the tgtd baseline", &why);
        return;
    }
    let dir = TestDir::new("iscsi-tgtd");
    let tgtd = Tgtd::start(dir.path());
    let theirs = conformance(&tgtd.url(), &suites);
    drop(tgtd);
    eprintln!(
        "tgtd: {} tests: {} pass, {} skip, {} fail",
        theirs.len(),
        count(&theirs, Outcome::Pass),
        count(&theirs, Outcome::Skip),
        count(&theirs, Outcome::Fail)
    );
    let mut table = String::from("| test | tgtd | netbootd |\n|---|---|---|\n");
    for (test, o) in &theirs {
        let mine = ours.get(test).map_or("absent", |m| m.name());
        table.push_str(&format!("| {test} | {} | {mine} |\n", o.name()));
    }
    let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("libiscsi-conformance.md");
    std::fs::write(&out, &table).expect("write the table");
    eprintln!("per-test table: {}", out.display());
    assert_eq!(
        theirs.keys().collect::<Vec<_>>(),
        ours.keys().collect::<Vec<_>>(),
        "both runs list the same tests"
    );
    let gaps: Vec<&str> = theirs
        .iter()
        .filter(|(t, o)| **o == Outcome::Pass && ours.get(*t) != Some(&Outcome::Pass))
        .map(|(t, _)| t.as_str())
        .collect();
    assert!(
        gaps.is_empty(),
        "tests that pass against tgtd but not against netbootd: {gaps:?}"
    );
    for (test, _) in TEST_BUGS {
        assert_eq!(
            theirs.get(*test),
            Some(&Outcome::Fail),
            "{test} fails against tgtd too"
        );
    }
}

/// CRC32C (Castagnoli, reflected), bit by bit: the test's own, not the target's.
fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A bare-bones initiator written from RFC 7143 for what libiscsi and qemu cannot do:
/// negotiate DataDigest=CRC32C. It counts every byte both ways.
struct RawInitiator {
    stream: std::net::TcpStream,
    data_digest: bool,
    /// The MaxRecvDataSegmentLength the target declared (RFC 7143 section 13.12: 8192
    /// when it declares none): the longest data segment it takes.
    target_max_data: usize,
    stat_sn: u32,
    cmd_sn: u32,
    sent: u64,
    received: u64,
}

/// A PDU as received: its BHS and data segment (digest checked and removed).
struct RawPdu {
    bhs: [u8; 48],
    data: Vec<u8>,
}

impl RawPdu {
    fn u32_at(&self, at: usize) -> u32 {
        u32::from_be_bytes(self.bhs[at..at + 4].try_into().expect("4 bytes"))
    }
}

impl RawInitiator {
    fn login(addr: &str, initiator: &str, target: &str, data_digest: &str) -> Self {
        let stream = std::net::TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(30)))
            .expect("timeout");
        let mut me = Self {
            stream,
            data_digest: false,
            target_max_data: 8192,
            stat_sn: 0,
            cmd_sn: 1,
            sent: 0,
            received: 0,
        };
        let stages: [(u8, Vec<(&str, &str)>); 2] = [
            (
                0x81, // T, security -> operational
                vec![
                    ("InitiatorName", initiator),
                    ("TargetName", target),
                    ("SessionType", "Normal"),
                    ("AuthMethod", "None"),
                ],
            ),
            (
                0x87, // T, operational -> full feature
                vec![
                    ("HeaderDigest", "None"),
                    ("DataDigest", data_digest),
                    ("MaxRecvDataSegmentLength", "65536"),
                    ("InitialR2T", "Yes"),
                    ("ImmediateData", "No"),
                    ("MaxBurstLength", "16776192"),
                    ("FirstBurstLength", "65536"),
                ],
            ),
        ];
        for (flags, keys) in stages {
            let mut bhs = [0u8; 48];
            bhs[0] = 0x43;
            bhs[1] = flags;
            bhs[8..14].copy_from_slice(&[0x80, 0, 0x12, 0x34, 0, 1]);
            bhs[16..20].copy_from_slice(&1u32.to_be_bytes());
            bhs[24..28].copy_from_slice(&1u32.to_be_bytes());
            bhs[28..32].copy_from_slice(&me.stat_sn.to_be_bytes());
            let text: Vec<u8> = keys
                .iter()
                .flat_map(|(k, v)| format!("{k}={v}\0").into_bytes())
                .collect();
            me.send(bhs, &text);
            let r = me.next();
            assert_eq!(r.bhs[0] & 0x3f, 0x23, "a login response");
            assert_eq!((r.bhs[36], r.bhs[37]), (0, 0), "login status");
            assert_eq!(r.bhs[1], flags, "the target goes to the next stage");
            me.stat_sn = r.u32_at(24).wrapping_add(1);
            let answer = String::from_utf8_lossy(&r.data).into_owned();
            if answer.contains("DataDigest=CRC32C") {
                me.data_digest = true;
            }
            if let Some(n) = answer
                .split('\0')
                .find_map(|kv| kv.strip_prefix("MaxRecvDataSegmentLength="))
            {
                me.target_max_data = n.parse().expect("a number");
            }
        }
        assert_eq!(
            me.data_digest,
            data_digest == "CRC32C",
            "DataDigest negotiated"
        );
        me
    }

    /// Sends a PDU with `data` (padded; digested when negotiated).
    fn send(&mut self, mut bhs: [u8; 48], data: &[u8]) {
        use std::io::Write as _;
        let len = u32::try_from(data.len()).expect("small");
        bhs[5..8].copy_from_slice(&len.to_be_bytes()[1..]);
        let mut out = bhs.to_vec();
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(4), 0);
        if self.data_digest && !data.is_empty() {
            out.extend_from_slice(&crc32c(&out[48..]).to_le_bytes());
        }
        self.stream.write_all(&out).expect("send");
        self.sent += out.len() as u64;
    }

    /// The next PDU, its data digest checked when negotiated.
    fn next(&mut self) -> RawPdu {
        use std::io::Read as _;
        let mut bhs = [0u8; 48];
        self.stream.read_exact(&mut bhs).expect("a BHS");
        assert_eq!(bhs[4], 0, "no AHS");
        let len = u32::from_be_bytes([0, bhs[5], bhs[6], bhs[7]]) as usize;
        let digest = if self.data_digest && len > 0 { 4 } else { 0 };
        let mut rest = vec![0u8; len.next_multiple_of(4) + digest];
        self.stream.read_exact(&mut rest).expect("a data segment");
        self.received += (48 + rest.len()) as u64;
        if digest > 0 {
            let (padded, crc) = rest.split_at(rest.len() - 4);
            assert_eq!(
                crc32c(padded).to_le_bytes(),
                crc,
                "data digest of opcode {:#x}",
                bhs[0] & 0x3f
            );
        }
        rest.truncate(len);
        RawPdu { bhs, data: rest }
    }

    /// READ(10)s of (LBA, blocks, expected length) at once; returns each one's Data-In (in
    /// buffer-offset order, DataSN checked) and residual count, after its GOOD status.
    fn reads(&mut self, reads: &[(u32, u16, u32)]) -> Vec<(Vec<u8>, u32)> {
        for (i, &(lba, blocks, edtl)) in reads.iter().enumerate() {
            let mut bhs = [0u8; 48];
            bhs[0] = 0x01;
            bhs[1] = 0x80 | 0x40 | 0x01; // F, R, SIMPLE
            bhs[16..20].copy_from_slice(&(100 + i as u32).to_be_bytes());
            bhs[20..24].copy_from_slice(&edtl.to_be_bytes());
            bhs[24..28].copy_from_slice(&self.cmd_sn.to_be_bytes());
            self.cmd_sn += 1;
            bhs[28..32].copy_from_slice(&self.stat_sn.to_be_bytes());
            bhs[32] = 0x28;
            bhs[34..38].copy_from_slice(&lba.to_be_bytes());
            bhs[39..41].copy_from_slice(&blocks.to_be_bytes());
            self.send(bhs, &[]);
        }
        let mut got: Vec<Option<(Vec<u8>, u32)>> = vec![None; reads.len()];
        let mut data: Vec<Vec<u8>> = vec![Vec::new(); reads.len()];
        let mut data_sn = vec![0u32; reads.len()];
        while got.iter().any(Option::is_none) {
            let p = self.next();
            let i = (p.u32_at(16) - 100) as usize;
            let status = match p.bhs[0] & 0x3f {
                0x25 => {
                    assert_eq!(p.u32_at(36), data_sn[i], "DataSN of read {i}");
                    data_sn[i] += 1;
                    assert_eq!(p.u32_at(40) as usize, data[i].len(), "buffer offset");
                    data[i].extend_from_slice(&p.data);
                    (p.bhs[1] & 0x01 == 0x01).then_some(p.bhs[3])
                }
                0x21 => Some(p.bhs[3]),
                other => panic!("unexpected opcode {other:#x}"),
            };
            if let Some(status) = status {
                self.stat_sn = p.u32_at(24).wrapping_add(1);
                assert_eq!(status, 0, "GOOD for read {i}");
                got[i] = Some((std::mem::take(&mut data[i]), p.u32_at(44)));
            }
        }
        got.into_iter().map(|g| g.expect("every read")).collect()
    }

    /// Logs out; returns the bytes sent and received on the connection.
    fn logout(mut self) -> (u64, u64) {
        let mut bhs = [0u8; 48];
        bhs[0] = 0x46;
        bhs[1] = 0x80;
        bhs[16..20].copy_from_slice(&7u32.to_be_bytes());
        bhs[24..28].copy_from_slice(&self.cmd_sn.to_be_bytes());
        bhs[28..32].copy_from_slice(&self.stat_sn.to_be_bytes());
        self.send(bhs, &[]);
        let r = self.next();
        assert_eq!(r.bhs[0] & 0x3f, 0x26, "a logout response");
        (self.sent, self.received)
    }
}

/// Reads are byte-exact on every Data-In path of the io_uring driver: by default the bytes
/// are read into a buffer and sent from it (registered buffers under 64 KiB); with
/// `splice_reads` and without data digests the file's pages of reads of 64 KiB and more
/// go to the socket through pipes; with DataDigest=CRC32C the bytes are always read and
/// copied (the digest needs them). Several reads run at once: aligned and not, the
/// largest transfer (several pipes), one cut short by its expected length, the last
/// block. The target's own byte counts equal what the initiator counted.
#[test]
fn reads_are_byte_exact_with_and_without_data_digests() {
    reads_are_byte_exact(false);
}

/// `iscsi.tcp_congestion` is the congestion control of the target's side of every
/// connection (as `ss` reports it), and one the kernel lacks stops the start, naming it.
#[test]
fn iscsi_connections_use_the_configured_congestion_control() {
    if !have("ss") {
        panic!("ss (iproute2) is missing: apt-get install iproute2");
    }
    let system = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control")
        .expect("the system's congestion control");
    // reno is always built in; take cubic when reno already is the default.
    let want = if system.trim() == "reno" {
        "cubic"
    } else {
        "reno"
    };
    let d = Daemon::start_configured(
        &format!("cc-{want}"),
        "uring",
        &format!("tcp_congestion = \"{want}\"\n"),
    );
    let conn = std::net::TcpStream::connect(&d.iscsi).expect("connect");
    let port = d.iscsi.rsplit(':').next().expect("port");
    let out = Command::new("ss")
        .args([
            "-tni",
            "state",
            "established",
            &format!("( sport = :{port} )"),
        ])
        .output()
        .expect("ss");
    let text = String::from_utf8_lossy(&out.stdout);
    let local = conn.peer_addr().expect("peer").to_string();
    assert!(
        text.contains(&local),
        "no connection on {local} in:\n{text}"
    );
    assert!(
        text.split_whitespace().any(|w| w == want),
        "the target's side of the connection does not use {want} (the system's is {}):\n{text}",
        system.trim()
    );
    drop(conn);

    let dir = TestDir::new("iscsi-cc-missing");
    std::fs::write(
        dir.path().join("netboot.toml"),
        "data_dir = \"data\"\n[http]\nlisten = \"127.0.0.1:0\"\n[dhcp]\nmode = \"off\"\n\
         [tftp]\nenabled = false\n[iscsi]\nlisten = \"127.0.0.1:0\"\n\
         tcp_congestion = \"nosuchcc\"\n",
    )
    .expect("write config");
    // Under timeout(1): a netbootd that started anyway must not hang the test.
    let out = Command::new("timeout")
        .args([
            "30",
            env!("CARGO_BIN_EXE_netbootd"),
            "--config",
            "netboot.toml",
        ])
        .current_dir(dir.path())
        .env_remove("RUST_LOG")
        .output()
        .expect("run netbootd");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "netbootd started with nosuchcc:\n{err}"
    );
    assert!(
        err.contains("iscsi.tcp_congestion") && err.contains("nosuchcc"),
        "the error names the setting:\n{err}"
    );
}

/// An initiator that vanishes without a word (no FIN, no RST: a machine switched off) is
/// found out within `iscsi.dead_peer_secs` and its session ends; the idle connection of a
/// live initiator stays. The vanished socket is put in TCP repair mode and closed, which
/// discards it silently; the target's next keepalive probe then meets no socket.
#[test]
fn a_vanished_initiator_s_session_ends_after_dead_peer_secs() {
    vanished_initiator("uring");
}

/// The same on the tokio driver.
#[test]
fn a_vanished_initiator_s_session_ends_after_dead_peer_secs_on_the_tokio_driver() {
    vanished_initiator("tokio");
}

fn vanished_initiator(driver: &str) {
    use std::os::fd::AsRawFd as _;
    use std::time::{Duration, Instant};

    const SECS: u64 = 4;
    let d = Daemon::start_configured(
        &format!("dead-peer-{driver}"),
        driver,
        &format!("dead_peer_secs = {SECS}\n"),
    );
    d.image("deadpeer", 1 << 20);
    let target = format!("{PREFIX}:deadpeer");
    let sessions = || -> (Vec<String>, Vec<String>) {
        let v: serde_json::Value =
            serde_json::from_str(&d.get("/api/v1/iscsi/sessions")).expect("json");
        let names = |k: &str| -> Vec<String> {
            v[k].as_array()
                .unwrap_or_else(|| panic!("{k} in {v}"))
                .iter()
                .map(|s| s["initiator"].as_str().unwrap_or_default().to_owned())
                .collect()
        };
        (names("active"), names("recent"))
    };
    let [gone, stays, _] = TEST_INITIATORS;
    let vanishing = RawInitiator::login(&d.iscsi, gone, &target, "None");
    let mut live = RawInitiator::login(&d.iscsi, stays, &target, "None");
    let deadline = Instant::now() + Duration::from_secs(10);
    while sessions().0.len() < 2 {
        assert!(Instant::now() < deadline, "two sessions: {:?}", sessions());
        std::thread::sleep(Duration::from_millis(20));
    }
    let fd = vanishing.stream.as_raw_fd();
    let set = |option: libc::c_int, name: &str| {
        let on: libc::c_int = 1;
        // SAFETY: a valid socket and an int option.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_TCP,
                option,
                (&raw const on).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "{name}: {}", std::io::Error::last_os_error());
    };
    // The login response's delayed ACK goes now: the target has nothing left to
    // retransmit, so only a keepalive probe can find the vanished peer.
    set(libc::TCP_QUICKACK, "TCP_QUICKACK");
    set(libc::TCP_REPAIR, "TCP_REPAIR");
    let vanished = Instant::now();
    drop(vanishing);
    let deadline = vanished + Duration::from_secs(SECS + 10);
    loop {
        let (active, recent) = sessions();
        if recent.iter().any(|i| i == gone) {
            assert!(!active.iter().any(|i| i == gone), "{active:?}");
            assert!(
                active.iter().any(|i| i == stays),
                "the idle live session stays: {active:?}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the vanished initiator's session is still there {:?} later: {active:?}",
            vanished.elapsed()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = vanished.elapsed();
    assert!(
        took >= Duration::from_secs(SECS / 2),
        "ended after {took:?}, before the keepalive idle time:\n{}",
        d.log()
    );
    // The live session still works after its idle time.
    let got = live.reads(&[(0, 8, 4096)]);
    assert_eq!(got[0].0, vec![0u8; 4096]);
}

/// A connection that does not complete its login within `iscsi.login_timeout_secs` is
/// closed: one that sends nothing, and one that stops in the middle of its login. A
/// session that logged in at the same time keeps working after the deadline.
#[test]
fn connections_that_do_not_log_in_in_time_are_closed() {
    login_timeout("uring");
}

/// The same on the tokio driver.
#[test]
fn connections_that_do_not_log_in_in_time_are_closed_on_the_tokio_driver() {
    login_timeout("tokio");
}

fn login_timeout(driver: &str) {
    use std::io::{Read as _, Write as _};
    use std::time::{Duration, Instant};

    const SECS: u64 = 2;
    let d = Daemon::start_configured(
        &format!("login-timeout-{driver}"),
        driver,
        &format!("login_timeout_secs = {SECS}\n"),
    );
    d.image("slow", 1 << 20);
    let target = format!("{PREFIX}:slow");
    let started = Instant::now();
    let mut silent = std::net::TcpStream::connect(&d.iscsi).expect("connect");
    let mut halfway = std::net::TcpStream::connect(&d.iscsi).expect("connect");
    // The first login request, whose answer asks for the next stage; no second one.
    let text = format!(
        "InitiatorName={}\0TargetName={target}\0SessionType=Normal\0AuthMethod=None\0",
        TEST_INITIATORS[0]
    );
    let mut bhs = [0u8; 48];
    bhs[0] = 0x43;
    bhs[1] = 0x01; // security negotiation, no transit
    bhs[5..8].copy_from_slice(&u32::try_from(text.len()).expect("short").to_be_bytes()[1..]);
    bhs[8..14].copy_from_slice(&[0x80, 0, 0x12, 0x34, 0, 2]);
    let mut pdu = bhs.to_vec();
    pdu.extend_from_slice(text.as_bytes());
    pdu.resize(pdu.len().next_multiple_of(4), 0);
    halfway.write_all(&pdu).expect("login request");
    let mut live = RawInitiator::login(&d.iscsi, TEST_INITIATORS[1], &target, "None");
    for (name, conn) in [("silent", &mut silent), ("halfway", &mut halfway)] {
        conn.set_read_timeout(Some(Duration::from_secs(SECS + 10)))
            .expect("timeout");
        let mut buf = [0u8; 4096];
        let closed = loop {
            match conn.read(&mut buf) {
                Ok(0) => break true,
                // The login response to the first request.
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
                Err(e) => panic!("{name}: not closed: {e}"),
            }
        };
        assert!(closed);
        let after = started.elapsed();
        assert!(
            after >= Duration::from_secs(SECS) - Duration::from_millis(100),
            "{name} closed after {after:?}, before the deadline"
        );
    }
    let got = live.reads(&[(0, 8, 4096)]);
    assert_eq!(got[0].0, vec![0u8; 4096], "the logged-in session reads on");
}

/// The target's own figures reach `/metrics`: sessions now and since the start, and the
/// bytes and commands of an ended and a live session, equal to what the initiator itself
/// sent and received; `promtool check metrics` accepts the scrape.
#[test]
fn the_target_s_figures_are_exposed_as_metrics() {
    use std::time::{Duration, Instant};

    let d = Daemon::start("metrics");
    d.image("metrics", 4 << 20);
    let target = format!("{PREFIX}:metrics");
    let sample = |text: &str, name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
            .parse()
            .unwrap_or_else(|e| panic!("{name}: {e}"))
    };
    let commands = |recent_or_active: &str| -> u64 {
        let v: serde_json::Value =
            serde_json::from_str(&d.get("/api/v1/iscsi/sessions")).expect("json");
        v[recent_or_active]
            .as_array()
            .expect("sessions")
            .iter()
            .map(|r| r["commands"].as_u64().expect("commands"))
            .sum()
    };
    let mut first = RawInitiator::login(&d.iscsi, TEST_INITIATORS[0], &target, "None");
    first.reads(&[(0, 64, 32768), (64, 8, 4096)]);
    let (first_sent, first_received) = first.logout();
    let deadline = Instant::now() + Duration::from_secs(10);
    while commands("recent") < 2 {
        assert!(Instant::now() < deadline, "the first session did not end");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut second = RawInitiator::login(&d.iscsi, TEST_INITIATORS[1], &target, "None");
    second.reads(&[(8, 16, 8192)]);
    let text = d.get("/metrics");
    assert_eq!(sample(&text, "netboot_iscsi_sessions"), 1, "{text}");
    assert_eq!(sample(&text, "netboot_iscsi_logins_total"), 2);
    assert_eq!(
        sample(&text, "netboot_iscsi_bytes_total{direction=\"rx\"}"),
        first_sent + second.sent,
        "the bytes the initiators sent"
    );
    assert_eq!(
        sample(&text, "netboot_iscsi_bytes_total{direction=\"tx\"}"),
        first_received + second.received,
        "the bytes the initiators received"
    );
    assert_eq!(
        sample(&text, "netboot_iscsi_commands_total"),
        commands("recent") + commands("active")
    );
    assert_eq!(commands("recent") + commands("active"), 3);
    common::promtool(&text);
}

/// The same with `splice_reads`.
#[test]
fn spliced_reads_are_byte_exact_with_and_without_data_digests() {
    reads_are_byte_exact(true);
}

/// Drops the file's pages from the page cache (they must be clean and mapped by no one),
/// and checks that they are gone.
fn evict_from_page_cache(path: &std::path::Path) {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .expect("fsync the image");
    // GNU dd: `iflag=nocache count=0` drops the whole file from the page cache.
    let dropped = Command::new("dd")
        .arg(format!("if={}", path.display()))
        .args(["iflag=nocache", "count=0", "status=none"])
        .status()
        .expect("run dd");
    assert!(dropped.success(), "dd iflag=nocache: {dropped}");
    // util-linux fincore: the bytes of the file in the page cache, and its size.
    let out = Command::new("fincore")
        .args(["--bytes", "--noheadings", "--raw", "--output", "RES,SIZE"])
        .arg(path)
        .output()
        .expect("run fincore (util-linux)");
    let text = String::from_utf8_lossy(&out.stdout);
    let figures: Vec<u64> = text
        .split_whitespace()
        .map(|f| f.parse().expect("fincore prints bytes"))
        .collect();
    let [cached, size] = figures[..] else {
        panic!("fincore printed {text:?}");
    };
    assert!(
        cached * 10 < size,
        "the test needs the image out of the page cache: {cached} of {size} bytes stayed"
    );
}

fn reads_are_byte_exact(splice: bool) {
    let d = Daemon::start_configured(
        &format!("digests-splice-{splice}"),
        "uring",
        &format!("splice_reads = {splice}\n"),
    );
    d.image("exact", 24 << 20);
    let image: Vec<u8> = (0..24u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 9) as u8)
        .collect();
    {
        use std::os::unix::fs::FileExt as _;
        // The target creates the file at the first login, or takes the one there.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(d.dir.path().join("data/images/exact.img"))
            .expect("the image file");
        f.write_all_at(&image, 0).expect("fill the image");
    }
    let blocks = (24u32 << 20) / 512;
    let reads: [(u32, u16, u32); 5] = [
        (0, 2048, 1 << 20),
        (1, 16384, 8 << 20),
        (8000, 8, 4096),
        (33, 64, 16384),
        (blocks - 1, 1, 512),
    ];
    let target = format!("{PREFIX}:exact");
    let initiator = TEST_INITIATORS[2];
    let image_path = d.dir.path().join("data/images/exact.img");
    for digest in ["None", "CRC32C"] {
        let mut i = RawInitiator::login(&d.iscsi, initiator, &target, digest);
        for pass in 0..2 {
            if digest == "None" && pass == 0 {
                // The first reads find nothing in the page cache: they read the file.
                evict_from_page_cache(&image_path);
            }
            let got = i.reads(&reads);
            for (&(lba, n, edtl), (data, residual)) in reads.iter().zip(got) {
                let at = lba as usize * 512;
                let len = usize::from(n) * 512;
                let want = &image[at..at + len.min(edtl as usize)];
                assert!(data == want, "{digest}: read at LBA {lba} differs");
                assert_eq!(residual as usize, len.saturating_sub(edtl as usize));
            }
        }
        let (sent, received) = i.logout();
        // The session, once ended, shows what the target counted.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let record = loop {
            let v: serde_json::Value =
                serde_json::from_str(&d.get("/api/v1/iscsi/sessions")).expect("json");
            let ended: Vec<serde_json::Value> = v["recent"]
                .as_array()
                .expect("recent")
                .iter()
                .filter(|s| s["initiator"] == initiator)
                .cloned()
                .collect();
            let want = if digest == "None" { 1 } else { 2 };
            if ended.len() == want {
                break ended
                    .into_iter()
                    .max_by_key(|s| s["id"].as_u64())
                    .expect("a session");
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the session did not end: {v}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        assert_eq!(record["rx_bytes"], sent, "{digest}: {record}");
        assert_eq!(record["tx_bytes"], received, "{digest}: {record}");
        let spliced = record["spliced_bytes"].as_u64().expect("spliced_bytes");
        if digest == "None" && splice {
            // Reads of 64 KiB and more are spliced; smaller ones are cheaper copied.
            let data: u64 = reads
                .iter()
                .filter(|&&(_, n, _)| n >= 128)
                .map(|&(_, n, edtl)| u64::from(n).min(u64::from(edtl) / 512) * 512)
                .sum();
            assert_eq!(spliced, 2 * data, "the large reads spliced: {record}");
        } else {
            assert_eq!(
                spliced, 0,
                "without splice_reads or with data digests nothing is spliced: {record}"
            );
        }
        // Without splice_reads and digests, reads of 64 KiB and more whose pages are in
        // the page cache (the second pass) are sent from there, whole.
        let large: u64 = reads
            .iter()
            .filter(|&&(_, n, _)| n >= 128)
            .map(|&(_, n, _)| u64::from(n) * 512)
            .sum();
        let mapped = if digest == "None" && !splice {
            large
        } else {
            0
        };
        assert_eq!(
            record["mapped_bytes"].as_u64(),
            Some(mapped),
            "{digest}: the cached large reads went from the page cache: {record}"
        );
        // Reads under 64 KiB go into the ring's registered buffers (whole reads, past the
        // initiator's expected length too), with and without digests.
        let fixed: u64 = reads
            .iter()
            .filter(|&&(_, n, _)| n < 128)
            .map(|&(_, n, _)| u64::from(n) * 512)
            .sum();
        assert_eq!(
            record["fixed_bytes"].as_u64(),
            Some(2 * fixed),
            "the small reads went into registered buffers: {record}"
        );
    }
}

/// What the target answered a raw connection.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    /// A Reject PDU (opcode 0x3f): its reason (RFC 7143 section 11.17.1) and the header
    /// it carries back.
    Reject { reason: u8, header: Vec<u8> },
    /// Another PDU, by opcode.
    Pdu(u8),
    /// The target closed the connection (an orderly end or a reset).
    Closed,
}

/// How long a raw connection waits for the target's answer before the test fails.
const ANSWER_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// The target's next answer on `stream`, within [`ANSWER_DEADLINE`]: a PDU (without
/// digests), or the end of the connection.
fn answer(stream: &mut std::net::TcpStream) -> Answer {
    use std::io::{ErrorKind, Read as _};
    stream
        .set_read_timeout(Some(ANSWER_DEADLINE))
        .expect("read timeout");
    let mut bhs = [0u8; 48];
    match stream.read_exact(&mut bhs) {
        Ok(()) => {}
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset
            ) =>
        {
            return Answer::Closed;
        }
        Err(e) => panic!("no answer within {ANSWER_DEADLINE:?}: {e}"),
    }
    let len = u32::from_be_bytes([0, bhs[5], bhs[6], bhs[7]]) as usize;
    let mut data = vec![0u8; len.next_multiple_of(4)];
    stream.read_exact(&mut data).expect("the data segment");
    data.truncate(len);
    match bhs[0] & 0x3f {
        0x3f => Answer::Reject {
            reason: bhs[2],
            header: data,
        },
        op => Answer::Pdu(op),
    }
}

/// Writes `bytes`, ignoring a failure: a target that closes the connection on the first
/// bytes of a malformed PDU may reset it before the rest is written.
fn write_lenient(stream: &mut std::net::TcpStream, bytes: &[u8]) {
    use std::io::Write as _;
    let _ = stream.write_all(bytes);
}

/// qemu-io as an interactive initiator: one session, held open, driven one command at a
/// time on its stdin (it reads a line only when its stdin becomes readable, so a command is
/// sent once the previous one answered); its reads check every byte against the pattern
/// written (`-P`).
struct QemuIo {
    child: Child,
    stdin: std::process::ChildStdin,
    lines: std::sync::mpsc::Receiver<String>,
}

/// The byte pattern of MiB `i` of the steady image.
fn pattern_of(i: usize) -> u8 {
    0x11 + i as u8 * 7
}

/// MiBs of the steady image.
const STEADY_MIB: usize = 16;

impl QemuIo {
    fn start(url: &str) -> Self {
        use std::process::Stdio;
        // Line-buffered: qemu-io writes its results with stdio, into a pipe here.
        let mut child = Command::new("stdbuf")
            .args(["-oL", "qemu-io", "-f", "raw", url])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn qemu-io");
        let (tx, lines) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        for out in [
            Box::new(stdout) as Box<dyn std::io::Read + Send>,
            Box::new(stderr),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                use std::io::BufRead as _;
                for line in std::io::BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        let stdin = child.stdin.take().expect("stdin");
        Self {
            child,
            stdin,
            lines,
        }
    }

    /// Runs one command and waits for its result, the line that contains `done`; fails
    /// on a line that reports a failure (an I/O error, a byte that differs from the
    /// pattern) and after a minute.
    fn run(&mut self, command: &str, done: &str) {
        use std::io::Write as _;
        writeln!(self.stdin, "{command}").expect("a qemu-io command");
        self.stdin.flush().expect("flush");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let mut log = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = match self.lines.recv_timeout(left) {
                Ok(l) => l,
                Err(e) => panic!(
                    "qemu-io {command:?}: no {done:?} ({e}):\n{}",
                    log.join("\n")
                ),
            };
            assert!(
                !line.contains("failed") && !line.contains("error"),
                "qemu-io {command:?}: {line}\n{}",
                log.join("\n")
            );
            if line.contains(done) {
                return;
            }
            log.push(line);
        }
    }

    fn write_mib(&mut self, i: usize) {
        self.run(
            &format!("write -P {} {i}M 1M", pattern_of(i)),
            "wrote 1048576/1048576 bytes",
        );
    }

    /// Reads MiB `i`, every byte checked against its pattern.
    fn read_mib(&mut self, i: usize) {
        self.run(
            &format!("read -P {} {i}M 1M", pattern_of(i)),
            "read 1048576/1048576 bytes",
        );
    }

    fn quit(mut self) {
        use std::io::Write as _;
        writeln!(self.stdin, "quit").expect("quit");
        drop(self.stdin);
        let status = self.child.wait().expect("qemu-io exits");
        assert!(status.success(), "qemu-io: {status}");
    }
}

/// A qemu-io session that reads the steady image round and round on a thread of its
/// own, until told to stop; it reports each read done.
struct Reader {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    done: std::sync::mpsc::Receiver<usize>,
    count: usize,
    thread: std::thread::JoinHandle<usize>,
}

impl Reader {
    fn start(mut q: QemuIo) -> Self {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (tx, done) = std::sync::mpsc::channel();
        let halt = std::sync::Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut n = 0;
            while !halt.load(Ordering::Relaxed) {
                q.read_mib(n % STEADY_MIB);
                n += 1;
                let _ = tx.send(n);
            }
            q.quit();
            n
        });
        Self {
            stop,
            done,
            count: 0,
            thread,
        }
    }

    /// Waits until the session has done `more` reads more than when last asked: reads
    /// that overlapped what the test did since, and one that began after it.
    fn advance(&mut self, more: usize) {
        let want = self.count + more;
        while self.count < want {
            match self.done.recv_timeout(std::time::Duration::from_secs(60)) {
                Ok(n) => self.count = n,
                // The thread's own panic, printed above, says why.
                Err(e) => panic!(
                    "the reading session stopped after {} reads: {e}",
                    self.count
                ),
            }
        }
    }

    fn stop(self) -> usize {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().expect("the reading session")
    }
}

/// A SCSI Command PDU: READ(10) of one block at LBA 0 (F, R, SIMPLE), no data.
fn read10_bhs(cmd_sn: u32, exp_stat_sn: u32) -> [u8; 48] {
    let mut bhs = [0u8; 48];
    bhs[0] = 0x01;
    bhs[1] = 0x80 | 0x40 | 0x01;
    bhs[16..20].copy_from_slice(&0x51u32.to_be_bytes());
    bhs[20..24].copy_from_slice(&512u32.to_be_bytes());
    bhs[24..28].copy_from_slice(&cmd_sn.to_be_bytes());
    bhs[28..32].copy_from_slice(&exp_stat_sn.to_be_bytes());
    bhs[32] = 0x28;
    bhs[39..41].copy_from_slice(&1u16.to_be_bytes());
    bhs
}

/// Malformed PDU streams get a Reject or a closed connection, and the target keeps
/// serving: while qemu-io keeps reading an image byte-exactly in one session, raw
/// connections send (a) garbage (an HTTP request, then bytes from a PRNG), (b) a PDU of
/// an opcode no initiator sends after a good login, (c) a PDU whose DataSegmentLength
/// exceeds the MaxRecvDataSegmentLength the target declared, (d) a SCSI command before
/// any login. Each gets its answer within [`ANSWER_DEADLINE`]; afterwards the session's
/// reads are still exact, a new login reads the image, and netbootd still runs.
#[test]
fn malformed_pdu_streams_are_refused_and_the_target_keeps_serving() {
    malformed_pdu_streams("uring");
}

/// The same on the tokio driver.
#[test]
fn malformed_pdu_streams_are_refused_on_the_tokio_driver() {
    malformed_pdu_streams("tokio");
}

fn malformed_pdu_streams(driver: &str) {
    if !tools(&["qemu-io"]) {
        return;
    }
    let mut d = Daemon::start_with(&format!("malformed-{driver}"), driver);
    let url = d.image("steady", (STEADY_MIB as u64) << 20);
    let target = format!("{PREFIX}:steady");
    let mut q = QemuIo::start(&url);
    for i in 0..STEADY_MIB {
        q.write_mib(i);
    }
    let mut reads = Reader::start(q);
    reads.advance(1);
    let connect = || std::net::TcpStream::connect(&d.iscsi).expect("connect");

    // (a) Garbage: a client that speaks another protocol, and noise. Neither is a Login
    // request, the only PDU a connection may start with (RFC 7143 section 6.3: the
    // target terminates the connection).
    let http = b"GET / HTTP/1.1\r\nHost: netboot\r\nUser-Agent: curl/8.5\r\nAccept: */*\r\n\r\n";
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut noise: Vec<u8> = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    noise[0] = 0x3e; // not a Login request (0x03, 0x43)
    for garbage in [&http[..], &noise[..]] {
        let mut c = connect();
        write_lenient(&mut c, garbage);
        assert_eq!(answer(&mut c), Answer::Closed, "garbage:\n{}", d.log());
        reads.advance(2);
    }

    // (b) After a good login, a PDU with an opcode no initiator sends (0x0f is reserved,
    // RFC 7143 section 11.1.1): Reject, reason "Command not supported" (0x05), carrying
    // its header; the session goes on (a NOP-Out gets its NOP-In) and logs out.
    let mut i = RawInitiator::login(&d.iscsi, TEST_INITIATORS[2], &target, "None");
    let mut unknown = [0u8; 48];
    unknown[0] = 0x0f;
    unknown[1] = 0x80;
    unknown[16..20].copy_from_slice(&0x66u32.to_be_bytes());
    unknown[24..28].copy_from_slice(&i.cmd_sn.to_be_bytes());
    unknown[28..32].copy_from_slice(&i.stat_sn.to_be_bytes());
    i.send(unknown, &[]);
    assert_eq!(
        answer(&mut i.stream),
        Answer::Reject {
            reason: 0x05,
            header: unknown.to_vec()
        },
        "an unknown opcode:\n{}",
        d.log()
    );
    let mut nop = [0u8; 48];
    nop[0] = 0x40; // NOP-Out, immediate
    nop[1] = 0x80;
    nop[16..20].copy_from_slice(&0x67u32.to_be_bytes());
    nop[20..24].copy_from_slice(&u32::MAX.to_be_bytes());
    nop[24..28].copy_from_slice(&i.cmd_sn.to_be_bytes());
    nop[28..32].copy_from_slice(&(i.stat_sn + 1).to_be_bytes());
    i.send(nop, &[]);
    let ping = i.next();
    assert_eq!(
        (ping.bhs[0] & 0x3f, ping.u32_at(16)),
        (0x20, 0x67),
        "NOP-In"
    );
    i.stat_sn = ping.u32_at(24);
    i.logout();
    reads.advance(2);

    // (c) A data segment longer than the target's MaxRecvDataSegmentLength: the target
    // cannot take it, nor find the next PDU without reading it; it closes the connection.
    let mut i = RawInitiator::login(&d.iscsi, TEST_INITIATORS[2], &target, "None");
    let long = i.target_max_data + 4;
    let mut big = [0u8; 48];
    big[0] = 0x40; // NOP-Out with ping data, immediate
    big[1] = 0x80;
    big[5..8].copy_from_slice(&u32::try_from(long).expect("small").to_be_bytes()[1..]);
    big[16..20].copy_from_slice(&0x68u32.to_be_bytes());
    big[20..24].copy_from_slice(&u32::MAX.to_be_bytes());
    big[24..28].copy_from_slice(&i.cmd_sn.to_be_bytes());
    big[28..32].copy_from_slice(&i.stat_sn.to_be_bytes());
    let mut pdu = big.to_vec();
    pdu.resize(48 + long, 0x5a);
    write_lenient(&mut i.stream, &pdu);
    assert_eq!(
        answer(&mut i.stream),
        Answer::Closed,
        "a data segment of {long} bytes (limit {}):\n{}",
        i.target_max_data,
        d.log()
    );
    reads.advance(2);

    // (d) A SCSI command before any login (RFC 7143 section 6.3): the connection ends.
    let mut c = connect();
    write_lenient(&mut c, &read10_bhs(1, 0));
    assert_eq!(answer(&mut c), Answer::Closed, "a command before login");
    reads.advance(2);

    // The target still serves: the session read on, exactly, and a new login reads.
    assert!(reads.stop() >= 9, "the session's reads");
    let mut i = RawInitiator::login(&d.iscsi, TEST_INITIATORS[2], &target, "None");
    let got = i.reads(&[(0, 2048, 1 << 20), (2048 * 15, 2048, 1 << 20)]);
    assert!(got[0].0.iter().all(|&b| b == pattern_of(0)), "MiB 0");
    assert!(got[1].0.iter().all(|&b| b == pattern_of(15)), "MiB 15");
    i.logout();
    assert!(
        d.child.try_wait().expect("netbootd status").is_none(),
        "netbootd still runs:\n{}",
        d.log()
    );
}
