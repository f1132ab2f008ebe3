//! The iSCSI target against real initiators: libiscsi's tools (`iscsi-ls`, `iscsi-inq`,
//! `iscsi-test-cu`) and qemu's iSCSI block driver (`qemu-img`).
//!
//! netbootd runs as a user runs it, on loopback with an ephemeral port; images are created
//! through the API. Needs libiscsi-bin and qemu-utils with qemu-block-extra (`cargo xtask
//! test` installs them); without them each test prints a loud SKIPPED line, except under
//! `CI=true`, where it fails.

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
                 driver = \"{driver}\"\n",
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
    let d = Daemon::start("qemu");
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
    let (ok, out) = run(
        "curl",
        &[
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "PATCH",
            "-H",
            "content-type: application/json",
            "-b",
            &d.cookie,
            "-d",
            r#"{"chap":{"user":"pc9","secret":"short"}}"#,
            &format!("http://{}/api/v1/devices/{mac}", d.http),
        ],
    );
    assert!(ok && out == "422", "{out}");

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

/// libiscsi's conformance suites that must pass, each in its own process: every suite of
/// iscsi-test-cu 1.19 except two with a known failure (see docs/compliance.md):
/// SCSI.Sanitize and iSCSI.iSCSIdatasn.
const SUITES: &[&str] = &[
    "SCSI.CompareAndWrite",
    "SCSI.ExtendedCopy",
    "SCSI.GetLBAStatus",
    "SCSI.Inquiry",
    "SCSI.Mandatory",
    "SCSI.ModeSense6",
    "SCSI.NoMedia",
    "SCSI.OrWrite",
    "SCSI.Prefetch10",
    "SCSI.Prefetch16",
    "SCSI.PreventAllow",
    "SCSI.PrinReadKeys",
    "SCSI.PrinServiceactionRange",
    "SCSI.PrinReportCapabilities",
    "SCSI.ProutRegister",
    "SCSI.ProutReserve",
    "SCSI.ProutClear",
    "SCSI.ProutPreempt",
    "SCSI.Read6",
    "SCSI.Read10",
    "SCSI.Read12",
    "SCSI.Read16",
    "SCSI.ReadCapacity10",
    "SCSI.ReadCapacity16",
    "SCSI.ReadDefectData10",
    "SCSI.ReadDefectData12",
    "SCSI.ReadOnly",
    "SCSI.ReceiveCopyResults",
    "SCSI.ReportSupportedOpcodes",
    "SCSI.Reserve6",
    "SCSI.StartStopUnit",
    "SCSI.TestUnitReady",
    "SCSI.Unmap",
    "SCSI.Verify10",
    "SCSI.Verify12",
    "SCSI.Verify16",
    "SCSI.Write10",
    "SCSI.Write12",
    "SCSI.Write16",
    "SCSI.WriteAtomic16",
    "SCSI.WriteSame10",
    "SCSI.WriteSame16",
    "SCSI.WriteVerify10",
    "SCSI.WriteVerify12",
    "SCSI.WriteVerify16",
    "SCSI.MultipathIO",
    "iSCSI.iSCSIcmdsn",
    "iSCSI.iSCSIResiduals",
    "iSCSI.iSCSITMF",
];

#[test]
fn libiscsi_conformance_suites_pass() {
    conformance("uring");
}

/// The tokio driver, the fallback when a ring cannot be set up, passes the same suites.
#[test]
fn libiscsi_conformance_suites_pass_on_the_tokio_driver() {
    conformance("tokio");
}

fn conformance(driver: &str) {
    if !tools(&["iscsi-test-cu"]) {
        return;
    }
    let d = Daemon::start_with(&format!("conformance-{driver}"), driver);
    let url = d.image("conformance", 128 << 20);
    let mut failed = Vec::new();
    let mut skipped = 0;
    for suite in SUITES {
        let (_, out) = run(
            "iscsi-test-cu",
            &["-d", "-S", &format!("--test={suite}"), &url, &url],
        );
        let summary = out
            .lines()
            .find(|l| l.trim_start().starts_with("tests"))
            .unwrap_or("")
            .to_owned();
        skipped += out.matches("[SKIPPED]").count();
        // "tests  N  N  passed  failed  inactive"
        let fields: Vec<u64> = summary
            .split_whitespace()
            .filter_map(|f| f.parse().ok())
            .collect();
        let ok = fields.len() >= 4 && fields[3] == 0 && fields[2] > 0;
        eprintln!("{suite}: {summary}");
        if !ok {
            failed.push(format!("{suite}: {out}"));
        }
    }
    eprintln!("{} suites, {skipped} tests skipped", SUITES.len());
    assert!(
        failed.is_empty(),
        "failing suites:\n{}\n--- netbootd log ---\n{}",
        failed.join("\n"),
        d.log()
    );
}
