//! The `netbootd` binary as a user runs it: no arguments but a port, in an empty
//! directory; then SIGTERM or SIGINT.

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};

use serde_json::Value;

mod common;

use common::{TestDir, version_file};

struct Daemon {
    child: Child,
    lines: std::io::Lines<BufReader<std::process::ChildStderr>>,
    dir: TestDir,
    /// Log records before the "listening" line.
    startup: Vec<Value>,
}

impl Daemon {
    /// Starts netbootd in a fresh directory and waits for its "listening" line.
    fn start(tag: &str, extra_env: &[(&str, &str)]) -> (Self, String) {
        Self::start_in(
            TestDir::new(&format!("daemon-{tag}")),
            None,
            "127.0.0.1",
            extra_env,
        )
    }

    /// Starts netbootd in `dir`, in the network namespace `netns` if given, listening on
    /// `host`.
    fn start_in(
        dir: TestDir,
        netns: Option<&str>,
        host: &str,
        extra_env: &[(&str, &str)],
    ) -> (Self, String) {
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_netbootd")]);
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_netbootd")),
        };
        let listen = format!("{host}:0");
        cmd.args([
            "--listen",
            &listen,
            "--tftp-listen",
            &listen,
            "--log-format",
            "json",
        ])
        .current_dir(dir.path())
        .env_remove("RUST_LOG")
        // proxyDHCP would listen on the host's interfaces.
        .env("NETBOOT_DHCP_MODE", "off")
        // iSCSI would listen on 0.0.0.0:3260.
        .env("NETBOOT_ISCSI_LISTEN", "127.0.0.1:0")
        // eBPF maps would be pinned in the host's /sys/fs/bpf/netboot.
        .env("NETBOOT_EBPF_PIN_DIR", "")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn netbootd");
        let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let mut startup = Vec::new();
        let addr = loop {
            let line = lines
                .next()
                .expect("netbootd exited before listening")
                .expect("read");
            let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
            if v["message"] == "netbootd listening" {
                break v["addr"].as_str().expect("addr field").to_owned();
            }
            startup.push(v);
        };
        (
            Self {
                child,
                lines,
                dir,
                startup,
            },
            addr,
        )
    }

    /// Whether a startup record of `level` has a message containing `text`.
    fn logged(&self, level: &str, text: &str) -> bool {
        self.startup
            .iter()
            .any(|v| v["level"] == level && v["message"].as_str().is_some_and(|m| m.contains(text)))
    }

    /// A field of the startup record with `message`.
    fn startup_field(&self, message: &str, field: &str) -> String {
        self.startup
            .iter()
            .find(|v| v["message"] == message)
            .and_then(|v| v[field].as_str())
            .unwrap_or_else(|| panic!("no {field} in {message:?}: {:?}", self.startup))
            .to_owned()
    }

    /// The TFTP listener's address, from the startup log.
    fn tftp_addr(&self) -> std::net::SocketAddr {
        self.startup_field("TFTP listening", "addr")
            .parse()
            .expect("TFTP address")
    }

    fn signal(&mut self, sig: &str) -> Vec<Value> {
        signal(self.child.id(), sig);
        let rest: Vec<Value> = self
            .lines
            .by_ref()
            .map_while(Result::ok)
            .filter_map(|l| serde_json::from_str(&l).ok())
            .collect();
        let status = self.child.wait().expect("wait");
        assert!(status.success(), "netbootd exited with {status}");
        rest
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn curl(url: &str) -> String {
    common::curl_ok(&[url])
}

#[test]
fn starts_on_defaults_and_stops_on_sigterm() {
    let (mut d, addr) = Daemon::start("term", &[]);
    let data = d.dir.path().join("netboot-data");
    for sub in ["netboot.db", "tftp", "images", "installers", "logs"] {
        assert!(data.join(sub).exists(), "{sub} created in ./netboot-data");
    }
    let v: Value =
        serde_json::from_str(&curl(&format!("http://{addr}/api/v1/version"))).expect("json");
    assert_eq!(v["version"], version_file());
    let h: Value =
        serde_json::from_str(&curl(&format!("http://{addr}/api/v1/health"))).expect("json");
    assert_eq!(h["status"], "ok");
    let rest = d.signal("-TERM");
    let messages: Vec<&str> = rest.iter().filter_map(|v| v["message"].as_str()).collect();
    assert!(
        messages.contains(&"SIGTERM received, shutting down"),
        "{messages:?}"
    );
    assert!(messages.contains(&"netbootd stopped"), "{messages:?}");
}

#[test]
fn stops_on_sigint_and_keeps_its_data() {
    let (mut d, addr) = Daemon::start("int", &[("IMAGES_PATH", "disks")]);
    assert!(
        d.dir.path().join("netboot-data/disks").is_dir(),
        "the original system's IMAGES_PATH is honoured"
    );
    let status: Value =
        serde_json::from_str(&curl(&format!("http://{addr}/api/v1/auth/status"))).expect("json");
    assert_eq!(status["needs_setup"], true);
    let rest = d.signal("-INT");
    assert!(
        rest.iter()
            .any(|v| v["message"] == "SIGINT received, shutting down")
    );
    assert!(d.dir.path().join("netboot-data/netboot.db").exists());
}

#[test]
fn a_bad_configuration_is_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("netboot-daemon-badcfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let cfg = dir.join("netboot.toml");
    std::fs::write(&cfg, "[http]\nlisten = \"0.0.0.0:8080\"\nport = 80\n").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_netbootd"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .expect("run");
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("configuration error") && err.contains("port") && err.contains("netboot.toml"),
        "{err}"
    );
}

#[test]
fn runs_on_when_ebpf_accounting_cannot_attach() {
    let (mut d, addr) = Daemon::start("ebpf", &[("NETBOOT_EBPF_INTERFACES", "nbt-absent0")]);
    let v: Value =
        serde_json::from_str(&curl(&format!("http://{addr}/api/v1/version"))).expect("json");
    assert_eq!(v["name"], "netboot");
    assert!(
        d.logged("WARN", "eBPF accounting"),
        "a warning says accounting is off: {:?}",
        d.startup
    );
    assert!(
        d.logged("WARN", "counted in userspace"),
        "and that figures are counted in userspace: {:?}",
        d.startup
    );
    let rest = d.signal("-TERM");
    assert!(rest.iter().any(|v| v["message"] == "netbootd stopped"));
}

/// A network namespace whose loopback interface carries the server's and a client's
/// address outside 127.0.0.0/8 (bindings ignore loopback addresses); deleted on drop.
struct Netns(String);

impl Netns {
    fn create(tag: &str) -> Self {
        let ns = Self(format!("nbu-{tag}-{}", std::process::id()));
        common::ip(&["netns", "add", &ns.0]);
        common::ip(&["-n", &ns.0, "link", "set", "lo", "up"]);
        for a in ["10.77.0.1/32", "10.77.0.2/32"] {
            common::ip(&["-n", &ns.0, "addr", "add", a, "dev", "lo"]);
        }
        ns
    }

    /// What curl, from 10.77.0.2, says it moved: (bytes received, bytes sent).
    fn curl_counts(&self, args: &[&str]) -> (u64, u64) {
        let mut all = vec![
            "--interface",
            "10.77.0.2",
            "-o",
            "/dev/null",
            "-w",
            "%{size_header} %{size_download} %{size_request} %{size_upload}",
        ];
        all.extend_from_slice(args);
        let n: Vec<u64> = self
            .curl(&all)
            .split_whitespace()
            .map(|v| v.parse().expect("count"))
            .collect();
        (n[0] + n[1], n[2] + n[3])
    }

    fn curl(&self, args: &[&str]) -> String {
        common::curl_ok_in(&self.0, args)
    }

    /// Creates the first administrator of the daemon at `base` and keeps its session
    /// cookie in the file `jar`.
    fn set_up_admin(&self, base: &str, jar: &str) {
        self.curl(&[
            "-c",
            jar,
            "-H",
            "content-type: application/json",
            "-d",
            r#"{"username":"admin","password":"admin-pass-1"}"#,
            &format!("{base}/api/v1/auth/setup"),
        ]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _status = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Without the eBPF program (no `ebpf.interfaces`), netbootd counts what its own servers
/// move, per client, labelled `source="userspace"`: the HTTP bytes of a client equal what
/// curl says it sent and received, its TFTP transfer is on the same MAC, the API says
/// where the figures come from, and the totals outlive a restart.
#[test]
fn counts_in_userspace_without_ebpf_and_keeps_the_totals_across_a_restart() {
    const TEST: &str = "counts_in_userspace_without_ebpf_and_keeps_the_totals_across_a_restart";
    if let Err(why) = common::privileged(&["ip", "curl"]) {
        common::skip(TEST, &why);
        return;
    }
    let ns = Netns::create("u");
    let dir = TestDir::new("daemon-userspace");
    let data = dir.path().join("netboot-data");
    std::fs::create_dir_all(data.join("installers")).expect("mkdir");
    std::fs::create_dir_all(data.join("tftp")).expect("mkdir");
    // Not all zeroes, so no layer could shortcut it.
    let big: Vec<u8> = (0..3 * 1024 * 1024 + 123)
        .map(|i: u32| (i % 251) as u8)
        .collect();
    std::fs::write(data.join("installers/big.iso"), &big).expect("write");
    std::fs::write(data.join("tftp/pxe.bin"), &big[..200_000]).expect("write");
    let env = [("NETBOOT_EBPF_INTERFACES", "")];
    let (mut d, addr) = Daemon::start_in(dir, Some(&ns.0), "10.77.0.1", &env);
    // No interfaces configured is a choice: said at start-up, not warned about.
    assert!(
        d.logged("INFO", "counted in userspace"),
        "the log says figures are counted in userspace: {:?}",
        d.startup
    );
    let mac = "52:54:00:77:00:02";

    // The download carries the MAC, which binds 10.77.0.2 to it.
    let (mut rx_http, mut tx_http) = (0, 0);
    let (got, sent) =
        ns.curl_counts(&[&format!("http://{addr}/files/installers/big.iso?mac={mac}")]);
    assert!(
        got > big.len() as u64,
        "curl got the file and headers: {got}"
    );
    tx_http += got;
    rx_http += sent;
    let (got, sent) = ns.curl_counts(&[
        "-r",
        "0-999",
        &format!("http://{addr}/files/installers/big.iso"),
    ]);
    tx_http += got;
    rx_http += sent;
    let tftp_port = d.tftp_addr().port().to_string();
    let tftp = ns.curl(&[
        "--interface",
        "10.77.0.2",
        "-o",
        "/dev/null",
        "-w",
        "%{size_download}",
        &format!("tftp://10.77.0.1:{tftp_port}/pxe.bin"),
    ]);
    assert_eq!(tftp, "200000");

    // The scrape comes from 10.77.0.1, an address bound to no MAC.
    let scrape = || common::Samples::parse(&ns.curl(&[&format!("http://{addr}/metrics")]));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let samples = loop {
        let s = scrape();
        let http = |dir| {
            s.sum(
                "netboot_client_bytes_total",
                &[
                    ("mac", mac),
                    ("service", "http"),
                    ("direction", dir),
                    ("source", "userspace"),
                ],
            )
        };
        let tftp_tx = s.sum(
            "netboot_client_bytes_total",
            &[("mac", mac), ("service", "tftp"), ("direction", "tx")],
        );
        if (http("tx"), http("rx")) == (tx_http, rx_http) && tftp_tx > 0 {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "HTTP bytes of {mac}: tx {} rx {} (curl: {tx_http} {rx_http}), TFTP tx {tftp_tx}",
            http("tx"),
            http("rx")
        );
        std::thread::yield_now();
    };
    assert_eq!(
        samples.sum("netboot_accounting_info", &[("source", "userspace")]),
        1
    );
    // 200 000 bytes in 512-byte blocks: 391 DATA packets of 4 + payload bytes, an OACK
    // if curl asked for options; one ACK (4 bytes) per DATA packet back.
    let blocks = 200_000 / 512 + 1;
    let tftp_tx = samples.sum(
        "netboot_client_bytes_total",
        &[("mac", mac), ("service", "tftp"), ("direction", "tx")],
    );
    let tftp_rx = samples.sum(
        "netboot_client_bytes_total",
        &[("mac", mac), ("service", "tftp"), ("direction", "rx")],
    );
    assert!(
        (200_000 + 4 * blocks..200_000 + 4 * blocks + 100).contains(&tftp_tx),
        "TFTP tx {tftp_tx}"
    );
    assert!(
        (4 * blocks..4 * blocks + 100).contains(&tftp_rx),
        "TFTP rx {tftp_rx}"
    );
    let tftp_packets = samples.sum(
        "netboot_client_packets_total",
        &[("mac", mac), ("service", "tftp"), ("direction", "tx")],
    );
    assert!(
        (blocks..=blocks + 1).contains(&tftp_packets),
        "TFTP datagrams {tftp_packets}"
    );

    // The API says where the figures come from, after a login.
    let base = format!("http://{addr}");
    let jar = d.dir.path().join("cookies");
    let jar = jar.to_str().expect("utf8 path");
    ns.set_up_admin(&base, jar);
    let metrics = |ns: &Netns, base: &str| -> Value {
        serde_json::from_str(&ns.curl(&[
            "-b",
            jar,
            &format!("{base}/api/v1/devices/{mac}/metrics"),
        ]))
        .expect("json")
    };
    let m = metrics(&ns, &base);
    assert_eq!(m["source"], "userspace", "{m}");
    assert!(
        m["warnings"][0]
            .as_str()
            .is_some_and(|w| w.contains("userspace")),
        "{m}"
    );
    let total = |v: &Value, key: &str, service: &str, dir: &str| {
        v[key]
            .as_array()
            .expect("array")
            .iter()
            .filter(|t| t["service"] == service && t["direction"] == dir)
            .map(|t| t["bytes"].as_u64().expect("bytes"))
            .sum::<u64>()
    };
    assert_eq!(total(&m, "totals", "http", "tx"), tx_http, "{m}");
    assert_eq!(total(&m, "lifetime", "http", "tx"), tx_http, "{m}");
    assert_eq!(total(&m, "lifetime", "tftp", "tx"), tftp_tx, "{m}");

    // SIGTERM saves the totals; the next run starts its counters at zero but keeps them.
    let rest = d.signal("-TERM");
    assert!(rest.iter().any(|v| v["message"] == "netbootd stopped"));
    let dir = std::mem::replace(&mut d.dir, TestDir::new("daemon-userspace-spare"));
    drop(d);
    let (d2, addr) = Daemon::start_in(dir, Some(&ns.0), "10.77.0.1", &env);
    let m = metrics(&ns, &format!("http://{addr}"));
    assert_eq!(
        total(&m, "totals", "http", "tx"),
        0,
        "counters start again: {m}"
    );
    assert_eq!(total(&m, "lifetime", "http", "tx"), tx_http, "{m}");
    assert_eq!(total(&m, "lifetime", "http", "rx"), rx_http, "{m}");
    assert_eq!(total(&m, "lifetime", "tftp", "tx"), tftp_tx, "{m}");
    drop(d2);
}

/// Without the eBPF program, a real iSCSI initiator's bytes count in userspace for the
/// device its initiator name carries: `netboot_client_bytes_total{service="iscsi"}` of the
/// MAC equals, exactly, the target's own figures of that initiator's connections in
/// `GET /api/v1/iscsi/sessions`, and the device's metrics show the same.
#[test]
fn counts_iscsi_in_userspace_exactly_as_the_target_counts_it() {
    const TEST: &str = "counts_iscsi_in_userspace_exactly_as_the_target_counts_it";
    if let Err(why) = common::privileged(&["ip", "curl"]) {
        common::skip(TEST, &why);
        return;
    }
    for tool in ["iscsi-inq", "iscsi-readcapacity16", "qemu-img", "qemu-io"] {
        if !common::have(tool) {
            common::skip(TEST, &format!("{tool} is not installed"));
            return;
        }
    }
    let ns = Netns::create("i");
    // The target listens on 10.77.0.4; connections to it leave from 10.77.0.3 (the local
    // route's preferred source), an address only the iSCSI login binds to the device.
    for a in ["10.77.0.3/32", "10.77.0.4/32"] {
        common::ip(&["-n", &ns.0, "addr", "add", a, "dev", "lo"]);
    }
    common::ip(&[
        "-n",
        &ns.0,
        "route",
        "replace",
        "local",
        "10.77.0.4",
        "dev",
        "lo",
        "table",
        "local",
        "src",
        "10.77.0.3",
    ]);
    let env = [
        ("NETBOOT_EBPF_INTERFACES", ""),
        ("NETBOOT_ISCSI_LISTEN", "10.77.0.4:0"),
    ];
    let dir = TestDir::new("daemon-userspace-iscsi");
    let (d, addr) = Daemon::start_in(dir, Some(&ns.0), "10.77.0.1", &env);
    let portal = d.startup_field("iSCSI listening", "addr");
    let base = format!("http://{addr}");
    let jar = d.dir.path().join("cookies");
    let jar = jar.to_str().expect("utf8 path");
    ns.set_up_admin(&base, jar);
    let api = |method: &str, path: &str, body: &str| {
        ns.curl(&[
            "-b",
            jar,
            "-X",
            method,
            "-H",
            "content-type: application/json",
            "-d",
            body,
            &format!("{base}{path}"),
        ])
    };
    let mac = "52:54:00:77:00:05";
    api(
        "POST",
        "/api/v1/images",
        r#"{"name":"acct","size_bytes":16777216}"#,
    );
    api("POST", "/api/v1/devices", &format!(r#"{{"mac":"{mac}"}}"#));
    api(
        "PATCH",
        &format!("/api/v1/devices/{mac}"),
        r#"{"image":"acct"}"#,
    );

    // The initiator name iPXE gives the device: the MAC without separators.
    let initiator = "iqn.2010-04.org.ipxe:525400770005";
    let iqn = "iqn.2026-01.org.netboot:acct";
    let url = format!("iscsi://{portal}/{iqn}/0");
    let opts = format!(
        "driver=iscsi,transport=tcp,portal={portal},target={iqn},lun=0,initiator-name={initiator}"
    );
    let src = d.dir.path().join("src.raw");
    let data: Vec<u8> = (0..(2u32 << 20) + 4096)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    std::fs::write(&src, &data).expect("write source");
    let src = src.to_str().expect("utf8");
    let runs: [Vec<&str>; 4] = [
        vec!["iscsi-inq", "-i", initiator, &url],
        vec!["iscsi-readcapacity16", "-i", initiator, &url],
        vec![
            "qemu-img",
            "convert",
            "-n",
            "-f",
            "raw",
            "--target-image-opts",
            src,
            &opts,
        ],
        vec!["qemu-io", "--image-opts", "-c", "read -v 0 64k", &opts],
    ];
    for args in &runs {
        let out = Command::new("ip")
            .args(["netns", "exec", &ns.0])
            .arg("timeout")
            .arg("60")
            .args(args)
            .output()
            .expect("run the initiator");
        assert!(
            out.status.success(),
            "{args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // Once every connection of the initiator ended, the metrics equal the target's count.
    let sessions_total = || -> (usize, usize, u64, u64) {
        let v: Value =
            serde_json::from_str(&ns.curl(&["-b", jar, &format!("{base}/api/v1/iscsi/sessions")]))
                .expect("json");
        let mine = |key: &str| -> Vec<Value> {
            v[key]
                .as_array()
                .expect("array")
                .iter()
                .filter(|s| s["initiator"] == initiator)
                .cloned()
                .collect()
        };
        let (active, recent) = (mine("active"), mine("recent"));
        let sum = |f: &str| recent.iter().map(|s| s[f].as_u64().expect(f)).sum::<u64>();
        (active.len(), recent.len(), sum("rx_bytes"), sum("tx_bytes"))
    };
    let scrape = || common::Samples::parse(&ns.curl(&[&format!("{base}/metrics")]));
    let counted = |s: &common::Samples, dir: &str| {
        s.sum(
            "netboot_client_bytes_total",
            &[
                ("mac", mac),
                ("service", "iscsi"),
                ("direction", dir),
                ("source", "userspace"),
            ],
        )
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let (rx, tx) = loop {
        let (active, ended, rx, tx) = sessions_total();
        let s = scrape();
        let (m_rx, m_tx) = (counted(&s, "rx"), counted(&s, "tx"));
        if active == 0 && ended == runs.len() && (m_rx, m_tx) == (rx, tx) {
            break (rx, tx);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{active} live and {ended} ended sessions of {initiator}, target's count rx {rx} \
             tx {tx}, metrics of {mac} rx {m_rx} tx {m_tx}"
        );
        std::thread::yield_now();
    };
    eprintln!("{mac}: iSCSI rx {rx} tx {tx}, as the target counted them");
    assert!(rx > data.len() as u64, "the written bytes are in: {rx}");
    assert!(tx > 64 << 10, "the read bytes are out: {tx}");

    // The device's metrics say the same, and where the figures come from.
    let m: Value = serde_json::from_str(&ns.curl(&[
        "-b",
        jar,
        &format!("{base}/api/v1/devices/{mac}/metrics"),
    ]))
    .expect("json");
    assert_eq!(m["source"], "userspace", "{m}");
    let total = |key: &str, dir: &str| {
        m[key]
            .as_array()
            .expect("array")
            .iter()
            .filter(|t| t["service"] == "iscsi" && t["direction"] == dir)
            .map(|t| t["bytes"].as_u64().expect("bytes"))
            .sum::<u64>()
    };
    assert_eq!(
        (total("totals", "rx"), total("totals", "tx")),
        (rx, tx),
        "{m}"
    );
    drop(d);
}

/// Sends `sig` (`-STOP`, `-CONT`) to the process `pid` with kill(1).
fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("kill");
    assert!(ok.success(), "kill {sig} {pid}");
}

/// The drops counted on the UDP socket bound to 127.0.0.1:`port` (the last column of
/// `/proc/net/udp`).
fn udp_drops(port: u16) -> u64 {
    let local = format!("0100007F:{port:04X}");
    let table = std::fs::read_to_string("/proc/net/udp").expect("read /proc/net/udp");
    table
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.get(1) == Some(&local.as_str()))
        .and_then(|f| f.last().and_then(|d| d.parse().ok()))
        .unwrap_or_else(|| panic!("no UDP socket on {local} in:\n{table}"))
}

/// A boot storm's RRQs arrive at once. While netbootd is stopped (SIGSTOP), 600 of them
/// queue on its listener; the kernel's default receive buffer (212,992 bytes) would hold
/// about 250 and drop the rest, leaving those clients to wait out their retransmission
/// timeout. The listener asks for room for `tftp.max_sessions` RRQs, so none is dropped
/// and every client gets its answer to its first RRQ. On both drivers.
#[test]
fn a_burst_of_rrqs_queues_on_the_listener_without_drops() {
    // Fewer than net.core.netdev_max_backlog (1000): loopback's own queue never drops.
    const CLIENTS: usize = 600;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        let msg =
            "SKIPPED: a receive buffer beyond net.core.rmem_max needs CAP_NET_ADMIN (run as root)";
        assert!(std::env::var_os("CI").is_none(), "{msg}");
        eprintln!("{msg}");
        return;
    }
    // One socket per client, and a few more for the test itself.
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: lim is valid for writes.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) },
        0
    );
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: lim is a valid rlimit.
    assert_eq!(
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim) },
        0
    );

    for driver in ["uring", "tokio"] {
        let dir = TestDir::new(&format!("daemon-rrq-burst-{driver}"));
        let cfg = dir.path().join("burst.toml");
        std::fs::write(&cfg, format!("[tftp]\ndriver = \"{driver}\"\n")).expect("config");
        let cfg = cfg.display().to_string();
        let (d, _) = Daemon::start_in(dir, None, "127.0.0.1", &[("NETBOOT_CONFIG", &cfg)]);
        let tftp = d.tftp_addr();
        let running = d.startup_field("TFTP listening", "driver");
        assert!(
            running.eq_ignore_ascii_case(driver),
            "{running} runs, not {driver}"
        );
        // Each from its own loopback address, like a rack of machines (the per-client
        // limit is per address).
        let clients: Vec<std::net::UdpSocket> = (0..CLIENTS)
            .map(|i| {
                let ip = std::net::Ipv4Addr::new(127, 101, (i / 250) as u8, (i % 250 + 1) as u8);
                std::net::UdpSocket::bind((ip, 0)).expect("bind a client")
            })
            .collect();
        let drops_before = udp_drops(tftp.port());

        let kill = |sig: &str| signal(d.child.id(), sig);
        kill("-STOP");
        let rrq = b"\x00\x01absent.bin\x00octet\x00";
        for s in &clients {
            s.send_to(rrq, tftp).expect("send an RRQ");
        }
        kill("-CONT");

        // Every client's first RRQ is answered: the file does not exist, so with ERROR 1.
        // All within one deadline: a dropped RRQ is never answered.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut answered = 0;
        let mut unanswered = Vec::new();
        let mut buf = [0u8; 600];
        for (i, s) in clients.iter().enumerate() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            s.set_read_timeout(Some(left.max(std::time::Duration::from_millis(1))))
                .expect("timeout");
            match s.recv_from(&mut buf) {
                Ok((n, _)) if buf[..n].starts_with(b"\x00\x05\x00\x01") => answered += 1,
                Ok((n, _)) => panic!("{driver}: client {i}: unexpected answer {:?}", &buf[..n]),
                Err(_) => unanswered.push(i),
            }
        }
        let drops = udp_drops(tftp.port()) - drops_before;
        assert_eq!(drops, 0, "{driver}: RRQs dropped by the listener");
        assert_eq!(
            answered, CLIENTS,
            "{driver}: clients without an answer to their only RRQ: {unanswered:?}"
        );
        drop(d);
    }
}

/// A client's last ACK and its next RRQ from the same port often arrive together (EDK2's
/// tsize probe ends with an ERROR and the real RRQ follows at once). Both are queued while
/// netbootd is stopped (SIGSTOP), so they reach it in one go: the RRQ must find the first
/// transfer ended and start the second at once, not be dropped as a duplicate of a busy
/// one (the client would then wait for its own retry). With a port per transfer and in
/// single-port mode; io_uring driver.
#[test]
fn the_next_rrq_right_after_the_last_ack_starts_at_once() {
    for single_port in ["false", "true"] {
        let (d, _) = Daemon::start(
            &format!("next-rrq-{single_port}"),
            &[("NETBOOT_TFTP_SINGLE_PORT", single_port)],
        );
        let tftp = d.tftp_addr();
        let root = d.dir.path().join("netboot-data/tftp");
        std::fs::write(root.join("first"), b"one block").expect("write");
        std::fs::write(root.join("second"), b"another block").expect("write");
        let client = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        client
            .set_read_timeout(Some(std::time::Duration::from_secs(3)))
            .expect("timeout");
        let mut buf = [0u8; 600];
        client
            .send_to(b"\x00\x01first\x00octet\x00", tftp)
            .expect("RRQ");
        let (n, transfer) = client.recv_from(&mut buf).expect("DATA 1");
        assert_eq!(&buf[..n], b"\x00\x03\x00\x01one block");

        let kill = |sig: &str| signal(d.child.id(), sig);
        kill("-STOP");
        client
            .send_to(b"\x00\x04\x00\x01", transfer)
            .expect("last ACK");
        client
            .send_to(b"\x00\x01second\x00octet\x00", tftp)
            .expect("next RRQ");
        kill("-CONT");
        let (n, _) = client
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("single_port={single_port}: no DATA for the next RRQ: {e}"));
        assert_eq!(
            &buf[..n],
            b"\x00\x03\x00\x01another block",
            "single_port={single_port}"
        );
        drop(d);
    }
}
