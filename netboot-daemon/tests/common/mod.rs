//! Helpers shared by the integration tests: scratch directories, a configuration that
//! stays on loopback, the daemon served in-process, and tool checks.
#![allow(dead_code, reason = "each test binary uses a subset")]

use std::path::{Path, PathBuf};
use std::process::Command;

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
