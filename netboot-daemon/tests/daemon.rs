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
        let dir = TestDir::new(&format!("daemon-{tag}"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_netbootd"));
        cmd.args([
            "--listen",
            "127.0.0.1:0",
            "--tftp-listen",
            "127.0.0.1:0",
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

    fn signal(&mut self, sig: &str) -> Vec<Value> {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(ok.success());
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
    let warned = d.startup.iter().any(|v| {
        v["level"] == "WARN"
            && v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("eBPF accounting"))
    });
    assert!(warned, "a warning says accounting is off: {:?}", d.startup);
    let rest = d.signal("-TERM");
    assert!(rest.iter().any(|v| v["message"] == "netbootd stopped"));
}
