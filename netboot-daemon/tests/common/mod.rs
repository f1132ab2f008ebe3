//! Helpers shared by the integration tests: scratch directories, a configuration that
//! stays on loopback, the daemon served in-process, and tool checks.
#![allow(dead_code, reason = "each test binary uses a subset")]

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};

use netboot_daemon::config::{Config, DhcpMode, Validated};

/// A scratch directory under the system's temp dir, removed on drop (also when a test
/// fails).
pub(crate) struct TestDir(pub(crate) PathBuf);

impl TestDir {
    /// A fresh, empty directory; `tag` names the test.
    pub(crate) fn new(tag: &str) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("netboot-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create test dir");
        Self(p)
    }

    /// The directory.
    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The default configuration with its data in `data_dir` (directories created), HTTP
/// only: TFTP and proxyDHCP off, so that a test never binds port 69 or the host's
/// interfaces.
pub(crate) fn http_only_config(data_dir: &Path) -> Validated {
    let mut cfg = Config {
        data_dir: data_dir.to_path_buf(),
        ..Config::default()
    };
    cfg.tftp.enabled = false;
    cfg.iscsi.enabled = false;
    cfg.dhcp.mode = DhcpMode::Off;
    let cfg = cfg.validate().expect("valid config");
    netboot_daemon::daemon::prepare_dirs(&cfg).expect("dirs");
    cfg
}

/// `daemon::serve` on 127.0.0.1 in this process.
pub(crate) struct Served {
    /// `http://127.0.0.1:PORT`.
    pub(crate) base: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Served {
    /// Serves `cfg` on an ephemeral loopback port.
    pub(crate) async fn start(cfg: Validated) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(netboot_daemon::daemon::serve(cfg, listener, async {
            let _ = stopped.await;
        }));
        Self {
            base,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stops the daemon and checks that it shut down cleanly.
    pub(crate) async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            s.send(()).expect("server alive");
        }
        if let Some(t) = self.task.take() {
            t.await.expect("join").expect("clean shutdown");
        }
    }
}

/// The content of the repository's VERSION file.
pub(crate) fn version_file() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../VERSION"))
        .expect("VERSION")
        .trim()
        .to_owned()
}

/// Whether `tool` is on PATH.
pub(crate) fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Runs `ip` with `args` and fails the test if it fails.
pub(crate) fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The path `ip netns` gives a namespace.
pub(crate) fn netns_path(name: &str) -> PathBuf {
    PathBuf::from("/var/run/netns").join(name)
}

/// Why a privileged test cannot run here (not root, or one of `tools` missing), if it
/// cannot.
pub(crate) fn privileged(tools: &[&str]) -> Result<(), String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Err(format!("not root (euid {euid})"));
    }
    for tool in tools {
        match Command::new(tool).arg("-V").output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => return Err(format!("`{tool} -V` failed: {}", out.status)),
            Err(e) => return Err(format!("`{tool}` not found: {e}")),
        }
    }
    Ok(())
}

/// Reports loudly that `test` cannot run, and fails under `CI=true`. The banner goes to
/// the process's stderr directly, past the test harness's output capture, so that a plain
/// `cargo test` shows it too.
pub(crate) fn skip(test: &str, why: &str) {
    use std::io::Write as _;
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{test} cannot run under CI=true: {why}"
    );
    let bar = "********************************************************************";
    let _ = writeln!(
        std::io::stderr().lock(),
        "\n{bar}\n*** SKIPPED: {test}: {why}\n{bar}\n"
    );
}

/// Two network namespaces joined by a veth pair, with the given MACs, up; dropping it
/// deletes both namespaces (and so the pair), also after a panic.
pub(crate) struct Veth {
    pub(crate) srv_ns: String,
    pub(crate) cli_ns: String,
    pub(crate) srv_if: String,
    pub(crate) cli_if: String,
}

impl Veth {
    /// Names start with `prefix` (three letters) and end with `tag`, which tells apart
    /// pairs of tests running at the same time. With `ipv6_off`, IPv6 is disabled in both
    /// namespaces before the veth exists, so no background frames (router or neighbour
    /// solicitations, MLD reports) appear on it.
    pub(crate) fn create(
        prefix: &str,
        tag: char,
        srv_mac: &str,
        cli_mac: &str,
        ipv6_off: bool,
    ) -> Self {
        let pid = std::process::id();
        // The guard exists before anything is created, so a failure halfway cleans up too.
        let v = Self {
            srv_ns: format!("{prefix}-srv-{pid}-{tag}"),
            cli_ns: format!("{prefix}-cli-{pid}-{tag}"),
            srv_if: format!("{prefix}s{pid}{tag}"),
            cli_if: format!("{prefix}c{pid}{tag}"),
        };
        for ns in [&v.srv_ns, &v.cli_ns] {
            ip(&["netns", "add", ns]);
            if ipv6_off {
                netboot_daemon::ebpf::in_netns(&netns_path(ns), || {
                    for conf in ["all", "default"] {
                        let path = format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6");
                        std::fs::write(&path, "1").unwrap_or_else(|e| panic!("write {path}: {e}"));
                    }
                })
                .expect("enter the new namespace");
            }
        }
        ip(&[
            "link", "add", &v.srv_if, "netns", &v.srv_ns, "type", "veth", "peer", "name",
            &v.cli_if, "netns", &v.cli_ns,
        ]);
        for (ns, iface, mac) in [
            (&v.srv_ns, &v.srv_if, srv_mac),
            (&v.cli_ns, &v.cli_if, cli_mac),
        ] {
            ip(&["-n", ns, "link", "set", "dev", iface, "address", mac, "up"]);
        }
        v
    }

    /// The server namespace's path.
    pub(crate) fn srv_path(&self) -> PathBuf {
        netns_path(&self.srv_ns)
    }

    /// The client namespace's path.
    pub(crate) fn cli_path(&self) -> PathBuf {
        netns_path(&self.cli_ns)
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        for ns in [&self.srv_ns, &self.cli_ns] {
            // It may not exist if creation failed early; nothing to report then.
            let _status = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// The JSON log of a netbootd child (started with `--log-format json` and stderr piped).
pub(crate) struct Log {
    /// Lines up to and including the "netbootd listening" line, parsed.
    pub(crate) startup: Vec<serde_json::Value>,
    /// Every line, the later ones added by a thread as they come.
    pub(crate) all: Arc<Mutex<Vec<String>>>,
}

impl Log {
    /// Reads `child`'s stderr until netbootd listens (failing the test if it exits
    /// first), then keeps collecting it on a thread.
    pub(crate) fn follow(child: &mut Child) -> Self {
        let mut lines = BufReader::new(child.stderr.take().expect("stderr piped")).lines();
        let mut text = Vec::new();
        let mut startup = Vec::new();
        loop {
            let Some(Ok(line)) = lines.next() else {
                let _ = child.wait();
                panic!("netbootd exited before listening:\n{}", text.join("\n"));
            };
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            text.push(line);
            let done = v["message"] == "netbootd listening";
            startup.push(v);
            if done {
                break;
            }
        }
        let all = Arc::new(Mutex::new(text));
        let sink = Arc::clone(&all);
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                sink.lock().expect("log").push(line);
            }
        });
        Self { startup, all }
    }

    /// The `field` of the first startup record whose message is `message`.
    pub(crate) fn field(&self, message: &str, field: &str) -> Option<String> {
        self.startup
            .iter()
            .find(|v| v["message"] == message)
            .and_then(|v| v[field].as_str().map(str::to_owned))
    }

    /// Whether a startup line contains `text`.
    pub(crate) fn started_with(&self, text: &str) -> bool {
        self.startup.iter().any(|v| v.to_string().contains(text))
    }

    /// Everything so far, for failure messages.
    pub(crate) fn text(&self) -> String {
        self.all.lock().expect("log").join("\n")
    }
}

/// `curl -sS --fail ARGS`: the body, failing the test on any error.
pub(crate) fn curl_ok(args: &[&str]) -> String {
    checked_curl(Command::new("curl"), args)
}

/// [`curl_ok`] in the network namespace `ns`.
#[allow(dead_code, reason = "each test binary uses its part of common")]
pub(crate) fn curl_ok_in(ns: &str, args: &[&str]) -> String {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, "curl"]);
    checked_curl(c, args)
}

fn checked_curl(mut curl: Command, args: &[&str]) -> String {
    let out = curl
        .args(["-sS", "--fail"])
        .args(args)
        .output()
        .expect("curl");
    assert!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf8")
}

/// The samples of a Prometheus text scrape: (family, labels) → value.
#[allow(dead_code, reason = "each test binary uses its part of common")]
pub(crate) struct Samples(
    pub(crate) std::collections::BTreeMap<(String, std::collections::BTreeMap<String, String>), f64>,
);

#[allow(dead_code, reason = "each test binary uses its part of common")]
impl Samples {
    /// Parses the text exposition (label values without commas or escaped quotes, as
    /// netbootd's are).
    pub(crate) fn parse(text: &str) -> Self {
        let mut samples = std::collections::BTreeMap::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (series, value) = line.rsplit_once(' ').expect("sample line");
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split(',')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once('=').expect("label");
                    (k.to_owned(), v.trim_matches('"').to_owned())
                })
                .collect();
            samples.insert(
                (name.to_owned(), labels),
                value.parse().expect("sample value"),
            );
        }
        Self(samples)
    }

    /// The sum of the samples of `name` whose labels include `filter`.
    pub(crate) fn sum(&self, name: &str, filter: &[(&str, &str)]) -> u64 {
        self.0
            .iter()
            .filter(|((n, labels), _)| {
                n == name
                    && filter
                        .iter()
                        .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, v)| *v as u64)
            .sum()
    }
}

/// A UDP socket that may broadcast, bound to the interface `dev` (call it inside the
/// interface's namespace).
#[allow(dead_code, reason = "each test binary uses its part of common")]
pub(crate) fn broadcast_socket(dev: &str) -> std::io::Result<socket2::Socket> {
    let s = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    s.set_broadcast(true)?;
    s.bind_device(Some(dev.as_bytes()))?;
    Ok(s)
}

/// Starts netbootd as a child in `dir` with the configuration `dir/netboot.toml`, its
/// JSON log on stderr followed.
#[allow(dead_code, reason = "each test binary uses its part of common")]
pub(crate) fn spawn_netbootd(dir: &Path) -> (Child, Log) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_netbootd"))
        .args(["--config", "netboot.toml", "--log-format", "json"])
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn netbootd");
    let log = Log::follow(&mut child);
    (child, log)
}

/// `promtool check metrics` (from PATH or `NETBOOT_PROMTOOL`) accepts the scrape.
pub(crate) fn promtool(text: &str) {
    let promtool = std::env::var("NETBOOT_PROMTOOL").unwrap_or_else(|_| "promtool".into());
    let Ok(mut child) = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "promtool is needed under CI=true (cargo xtask test fetches it)"
        );
        eprintln!("SKIPPED: promtool not found (cargo xtask test fetches it)");
        return;
    };
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), text.as_bytes())
        .expect("feed promtool");
    let out = child.wait_with_output().expect("promtool");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool check metrics:\n{report}"
    );
}
