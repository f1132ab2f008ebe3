//! The runner's environment: a network namespace of its own, one cgroup v2 per server
//! (to count the CPU of forked children too), child processes, and their cleanup.
//!
//! Everything created here carries the runner's PID in its name, is stopped by PID, and
//! is removed on drop, on error and on SIGINT/SIGTERM (the waits poll [`interrupted`]).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Whether SIGINT or SIGTERM arrived.
pub(crate) fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

/// Turns SIGINT and SIGTERM into [`interrupted`], so that cleanup runs.
pub(crate) fn catch_signals() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the signal runtime")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            rt.block_on(async {
                use tokio::signal::unix::{SignalKind, signal};
                let (Ok(mut int), Ok(mut term)) = (
                    signal(SignalKind::interrupt()),
                    signal(SignalKind::terminate()),
                ) else {
                    return;
                };
                loop {
                    tokio::select! {
                        _ = int.recv() => {}
                        _ = term.recv() => {}
                    }
                    eprintln!("netboot-bench: interrupted, cleaning up");
                    INTERRUPTED.store(true, Ordering::Relaxed);
                }
            });
        })
        .context("starting the signal thread")?;
    Ok(())
}

fn check_interrupt() -> anyhow::Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleeps, waking early on interruption.
pub(crate) fn pause(d: Duration) -> anyhow::Result<()> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        check_interrupt()?;
        std::thread::sleep((end - Instant::now()).min(Duration::from_millis(20)));
    }
    check_interrupt()
}

/// Whether we run as root (namespaces and cgroups need it).
pub(crate) fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|v| v.split_whitespace().nth(1))
            == Some("0")
    })
}

fn quiet(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Sends `signal` to one process by PID.
fn kill(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// A network namespace with only `lo`, deleted on drop.
#[derive(Debug)]
pub(crate) struct Netns {
    pub(crate) name: String,
}

impl Netns {
    pub(crate) fn create(name: String) -> anyhow::Result<Self> {
        quiet(Command::new("ip").args(["netns", "add", &name]))
            .context("creating the network namespace (needs root and iproute2)")?;
        let ns = Self { name };
        let ip = |args: &[&str]| quiet(Command::new("ip").args(["-n", &ns.name]).args(args));
        ip(&["link", "set", "lo", "up"])?;
        // glibc's AI_ADDRCONFIG ignores loopback, so with only `lo` getaddrinfo() finds no
        // IPv4 at all and tftpd-hpa cannot resolve `-a 127.0.0.1:port`. A veth pair inside
        // the namespace with a documentation address fixes that; no traffic goes there.
        ip(&[
            "link", "add", "nbb0", "type", "veth", "peer", "name", "nbb1",
        ])?;
        ip(&["addr", "add", "192.0.2.1/32", "dev", "nbb0"])?;
        ip(&["link", "set", "nbb0", "up"])?;
        ip(&["link", "set", "nbb1", "up"])?;
        Ok(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = quiet(Command::new("ip").args(["netns", "del", &self.name])) {
            eprintln!("netboot-bench: WARNING: {e:#}");
        }
    }
}

/// A cgroup v2 that accounts the CPU of a server and all its children.
#[derive(Debug)]
pub(crate) struct Cgroup {
    pub(crate) path: PathBuf,
}

/// Where cgroup v2 is mounted (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on hybrid
/// systems).
fn cgroup2_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(dir))
    })
}

impl Cgroup {
    pub(crate) fn create(name: &str) -> anyhow::Result<Self> {
        let root = cgroup2_root().context("no cgroup v2 hierarchy is mounted")?;
        let path = root.join(name);
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        let cg = Self { path };
        anyhow::ensure!(
            cg.path.join("cpu.stat").exists(),
            "{} has no cpu.stat",
            cg.path.display()
        );
        Ok(cg)
    }

    /// CPU used by the processes in the group since it was created, seconds.
    pub(crate) fn cpu_seconds(&self) -> anyhow::Result<f64> {
        let s = std::fs::read_to_string(self.path.join("cpu.stat"))
            .with_context(|| format!("reading {}/cpu.stat", self.path.display()))?;
        let usec: u64 = s
            .lines()
            .find_map(|l| l.strip_prefix("usage_usec "))
            .context("no usage_usec in cpu.stat")?
            .trim()
            .parse()
            .context("parsing usage_usec")?;
        Ok(usec as f64 / 1e6)
    }

    fn pids(&self) -> Vec<u32> {
        std::fs::read_to_string(self.path.join("cgroup.procs"))
            .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Whatever is left (children of a forking server) was started by us: stop each by PID.
        for round in 0..100 {
            let pids = self.pids();
            if pids.is_empty() {
                break;
            }
            for pid in pids {
                kill(pid, if round < 10 { "TERM" } else { "KILL" });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Err(e) = std::fs::remove_dir(&self.path) {
            eprintln!(
                "netboot-bench: WARNING: could not remove cgroup {}: {e}",
                self.path.display()
            );
        }
    }
}

/// Builds a command that joins `cgroup`, raises its open-file limit to the hard limit,
/// enters `netns`, then runs `program`.
pub(crate) fn command(cgroup: Option<&Cgroup>, netns: Option<&Netns>, program: &Path) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(r#"cg="$1"; shift; if [ -n "$cg" ]; then echo $$ > "$cg/cgroup.procs" || exit 97; fi; ulimit -n "$(ulimit -Hn)" 2>/dev/null; exec "$@""#)
        .arg("sh")
        .arg(cgroup.map(|c| c.path.as_os_str()).unwrap_or_default());
    if let Some(ns) = netns {
        c.args(["ip", "netns", "exec", &ns.name]);
    }
    c.arg(program);
    c.stdin(Stdio::null());
    // glibc writes fatal errors (e.g. a fortify abort) to the terminal unless told otherwise.
    c.env("LIBC_FATAL_STDERR_", "1");
    c
}

/// A long-running server process, stopped by PID on drop.
#[derive(Debug)]
pub(crate) struct Server {
    child: Child,
    name: String,
}

impl Server {
    pub(crate) fn spawn(name: &str, mut cmd: Command, log: &Path) -> anyhow::Result<Self> {
        let out =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone().context("cloning the log handle")?;
        let child = cmd
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        Ok(Self {
            child,
            name: name.to_owned(),
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it is still running.
    pub(crate) fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// How it ended, if it did.
    pub(crate) fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if !self.alive() {
            return;
        }
        kill(self.child.id(), "TERM");
        let end = Instant::now() + Duration::from_secs(3);
        while Instant::now() < end {
            if !self.alive() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        eprintln!(
            "netboot-bench: {} (pid {}) ignored SIGTERM, killing it",
            self.name,
            self.child.id()
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How a short-lived command ended.
#[derive(Debug)]
pub(crate) struct Finished {
    /// None when it was killed at the deadline.
    pub(crate) status: Option<ExitStatus>,
    pub(crate) elapsed: Duration,
    /// User and system CPU time the child used (from `wait4`).
    pub(crate) cpu: Duration,
    pub(crate) stdout: Vec<u8>,
    pub(crate) stderr: Vec<u8>,
}

/// Reaps `child` if it has ended, with the CPU time it used (`wait4`, which `try_wait`
/// does not expose). Once this has returned `Some`, the child must not be waited for or
/// signalled again.
fn reap(child: &Child) -> anyhow::Result<Option<(ExitStatus, Duration)>> {
    let pid = libc::pid_t::try_from(child.id()).context("child PID")?;
    let mut status = 0;
    // SAFETY: rusage is plain data that wait4 fills in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: status and usage are valid for writes; the PID is our unreaped child's.
    let r = unsafe { libc::wait4(pid, &raw mut status, libc::WNOHANG, &raw mut usage) };
    match r {
        0 => Ok(None),
        r if r == pid => {
            let tv = |t: libc::timeval| {
                Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
                    + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
            };
            Ok(Some((
                std::os::unix::process::ExitStatusExt::from_raw(status),
                tv(usage.ru_utime) + tv(usage.ru_stime),
            )))
        }
        _ => {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                return Ok(None);
            }
            Err(e).context("waiting for the child")
        }
    }
}

/// Runs `cmd` to completion, killing it after `limit`. The child is polled every
/// millisecond, so the elapsed time is exact to about 1 ms, and the kill can never hit a
/// reused PID (it is sent only while the child is unreaped).
pub(crate) fn run_timed(mut cmd: Command, limit: Duration) -> anyhow::Result<Finished> {
    let t0 = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let mut stdout = child.stdout.take().context("child stdout")?;
    let mut stderr = child.stderr.take().context("child stderr")?;
    let out_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stdout, &mut v);
        v
    });
    let err_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stderr, &mut v);
        v
    });
    let mut killed = false;
    let (status, elapsed, cpu) = loop {
        match reap(&child) {
            Ok(Some((st, cpu))) => break (st, t0.elapsed(), cpu),
            Ok(None) => {}
            Err(e) => {
                // Not reaped: std may still signal it.
                let _ = child.kill();
                return Err(e);
            }
        }
        if !killed && (t0.elapsed() > limit || interrupted()) {
            let _ = child.kill();
            killed = true;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    check_interrupt()?;
    Ok(Finished {
        status: (!killed).then_some(status),
        elapsed,
        cpu,
        stdout,
        stderr,
    })
}
