//! `netboot-bench tftp-compare`: netbootd and the peer servers side by side.
//!
//! As root, every server runs in one network namespace that the runner creates (its own
//! `lo`; dnsmasq needs port 69) and deletes, each in a cgroup v2 of its own whose
//! `cpu.stat` gives the server's CPU including forked children (tftpd-hpa forks per
//! transfer). Without root only netbootd runs, on the host's loopback, with its CPU from
//! `/proc/<pid>/stat`, and the peers are reported as skipped.
//!
//! Scenarios, each repeated with the servers taken in a rotating order per repetition so
//! that background load falls on all of them alike:
//! - `single`: one file (100 MiB; 4 MiB with `--quick`) with the atftp client at blksize
//!   512, 1432, 1468 and 65464;
//! - `window`: the same at blksize 1468 with windowsize 4, 16 and 64 (netboot and atftpd
//!   only: tftpd-hpa and dnsmasq 2.90 do not implement RFC 7440);
//! - `storm`: N clients (1000; 50 with `--quick`) each fetching 1 MiB lock-step at
//!   blksize 1432 with [`super::load`].
//!
//! The Markdown report goes to stdout, progress to stderr, raw samples to a JSON-lines
//! file. The exit status is non-zero when any netboot transfer failed or was corrupted.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde::Serialize;

use super::load::{own_cpu_seconds, proc_cpu_seconds};
use super::peers::{self, Binaries, Kind, Launch};
use super::sandbox::{self, Cgroup, Netns, Server, command, pause, run_timed};
use super::{DEFAULT_SEED, LoadReport, content};

/// Block sizes of the single-transfer scenario (lock-step).
const SINGLE_BLKSIZES: [u16; 4] = [512, 1432, 1468, 65464];
/// Window sizes of the windowed scenario, at [`WINDOW_BLKSIZE`].
const WINDOWS: [u16; 3] = [4, 16, 64];
/// Block size of the windowed scenario.
const WINDOW_BLKSIZE: u16 = 1468;

/// Options of `tftp-compare`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct CompareArgs {
    /// CI smoke: 4 MiB file, 50 clients, one repetition; fails on any netboot failure.
    #[arg(long)]
    quick: bool,
    /// Repetitions (default 3; 1 with --quick).
    #[arg(long)]
    reps: Option<usize>,
    /// Scenarios to run.
    #[arg(long, value_delimiter = ',', default_value = "single,window,storm")]
    scenarios: Vec<Scenario>,
    /// Servers to run (netboot always runs).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "tftpd-hpa,atftpd,dnsmasq"
    )]
    peers: Vec<String>,
    /// Size of the single-transfer file in MiB (default 100; 4 with --quick).
    #[arg(long)]
    size_mib: Option<usize>,
    /// Clients of the storm scenario (default 1000; 50 with --quick).
    #[arg(long)]
    clients: Option<usize>,
    /// Keep the peers' default session limits (dnsmasq --tftp-max 50, atftpd
    /// --maxthread 100) instead of raising them to 1000.
    #[arg(long)]
    peer_defaults: bool,
    /// Download tftpd-hpa, atftpd, libwrap0 and atftp with `apt-get download` into the
    /// cache under target/ and extract them there (nothing is installed), then run.
    #[arg(long)]
    fetch_peers: bool,
    /// netbootd binary; by default it is built with cargo next to this binary.
    #[arg(long)]
    netbootd: Option<PathBuf>,
    /// Directory for the peer cache and scratch files (default: the cargo target dir).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Write the raw samples here (JSON lines); default under the work dir.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Scenario {
    Single,
    Window,
    Storm,
}

/// One measurement.
#[derive(Debug, Clone, Serialize)]

struct Sample {
    scenario: &'static str,
    server: &'static str,
    rep: usize,
    blksize: u16,
    windowsize: Option<u16>,
    clients: usize,
    ok: bool,
    wall_s: f64,
    mbs: f64,
    server_cpu_s: f64,
    /// CPU time of the atftp client (single and window scenarios).
    #[serde(skip_serializing_if = "Option::is_none")]
    client_cpu_s: Option<f64>,
    note: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    load: Option<LoadReport>,
}

/// How the CPU of a server is read.
#[derive(Debug)]
enum CpuMeter {
    Cgroup(Cgroup),
    /// `/proc/<pid>/stat` (no children; netbootd has none).
    Pid(u32),
}

impl CpuMeter {
    fn seconds(&self) -> anyhow::Result<f64> {
        match self {
            Self::Cgroup(c) => c.cpu_seconds(),
            Self::Pid(pid) => proc_cpu_seconds(&pid.to_string()),
        }
    }
}

/// A running server. Fields drop in order: the process first, then its cgroup.
#[derive(Debug)]
struct Running {
    kind: Kind,
    process: Server,
    cpu: CpuMeter,
    addr: SocketAddr,
    log: PathBuf,
}

/// A directory removed on drop.
#[derive(Debug)]
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            eprintln!(
                "tftp-compare: WARNING: could not remove {}: {e}",
                self.0.display()
            );
        }
    }
}

/// What starting a server needs.
#[derive(Debug)]
struct Ctx<'a> {
    bins: &'a Binaries,
    netbootd: &'a Path,
    netns: Option<&'a Netns>,
    root: PathBuf,
    logs: PathBuf,
    raise_limits: bool,
}

struct Plan {
    reps: usize,
    size: usize,
    clients: usize,
    single_limit: Duration,
    storm_limit: Duration,
    settle: Duration,
}

fn say(msg: impl AsRef<str>) {
    eprintln!("tftp-compare: {}", msg.as_ref());
}

fn banner(label: &str, msg: &str) {
    eprintln!("tftp-compare: ************************************************************");
    eprintln!("tftp-compare: {label}: {msg}");
    eprintln!("tftp-compare: ************************************************************");
}

/// Something is left out of the comparison, said so that nobody misses it.
fn loud(msg: impl AsRef<str>) {
    banner("SKIPPED", msg.as_ref());
}

pub(crate) fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        f64::midpoint(v[n / 2 - 1], v[n / 2])
    })
}

/// The cargo target directory this binary lives in (`target/<profile>/netboot-bench`).
pub(crate) fn target_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating this binary")?;
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .context("this binary is not inside a cargo target directory; use --work-dir")
}

/// netbootd: the given path, or built by cargo (same profile as this binary) next to it.
pub(crate) fn netbootd(given: Option<&PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        anyhow::ensure!(p.is_file(), "{} does not exist", p.display());
        return Ok(p.clone());
    }
    let exe = std::env::current_exe().context("locating this binary")?;
    let path = exe.with_file_name("netbootd");
    if let Some(cargo) = std::env::var_os("CARGO") {
        let mut c = Command::new(cargo);
        c.args([
            "build",
            "--locked",
            "--quiet",
            "-p",
            "netboot-daemon",
            "--bin",
            "netbootd",
        ]);
        if !cfg!(debug_assertions) {
            c.arg("--release");
        }
        say(format!("building netbootd: {c:?}"));
        let st = c.status().context("running cargo build")?;
        anyhow::ensure!(st.success(), "building netbootd failed");
    }
    anyhow::ensure!(
        path.is_file(),
        "{} does not exist: build it with `cargo build --release -p netboot-daemon --bin netbootd`, or pass --netbootd",
        path.display()
    );
    Ok(path)
}

fn write_file(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    std::fs::write(path, data).with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
        .with_context(|| format!("chmod {}", path.display()))
}

fn make_dir(path: &Path, mode: u32) -> anyhow::Result<()> {
    std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}

fn tail(path: &Path) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(8)..].join("\n")
}

/// Runs one `tftp-load` in the namespace and parses its JSON report.
fn load(
    netns: Option<&Netns>,
    server: SocketAddr,
    file: &str,
    size: usize,
    clients: usize,
    extra: &[&str],
    limit: Duration,
) -> anyhow::Result<LoadReport> {
    let exe = std::env::current_exe().context("locating this binary")?;
    let mut c = command(None, netns, &exe);
    c.args(["tftp-load", "--json", "--server"])
        .arg(server.to_string())
        .args(["--file", file, "--size"])
        .arg(size.to_string())
        .arg("--clients")
        .arg(clients.to_string())
        .args(["--seed", &DEFAULT_SEED.to_string()])
        .args(extra);
    let fin = run_timed(c, limit)?;
    let stderr = String::from_utf8_lossy(&fin.stderr);
    // tftp-load exits with 1 when a client failed; its report still counts.
    let line = String::from_utf8_lossy(&fin.stdout);
    match (fin.status, serde_json::from_str::<LoadReport>(line.trim())) {
        (Some(_), Ok(r)) => Ok(r),
        (status, _) => bail!(
            "tftp-load ended with {status:?} after {:.1} s without a report: {}",
            fin.elapsed.as_secs_f64(),
            stderr.trim()
        ),
    }
}

/// Starts the process of `kind` in `cgroup`, listening on `addr`.
fn spawn(
    kind: Kind,
    ctx: &Ctx<'_>,
    cgroup: Option<&Cgroup>,
    addr: SocketAddr,
) -> anyhow::Result<(Server, PathBuf)> {
    let launch = Launch {
        netns: ctx.netns,
        cgroup,
        root: &ctx.root,
        logs: &ctx.logs,
        addr,
        raise_limits: ctx.raise_limits,
    };
    let cmd = peers::server_command(kind, ctx.bins, ctx.netbootd, &launch)?;
    let log = ctx.logs.join(format!("{}.out", kind.name()));
    say(format!("starting {}: {cmd:?}", kind.name()));
    Ok((Server::spawn(kind.name(), cmd, &log)?, log))
}

/// Waits until the server at `addr` serves a small file.
fn probe(
    kind: Kind,
    ctx: &Ctx<'_>,
    process: &mut Server,
    addr: SocketAddr,
    log: &Path,
) -> anyhow::Result<()> {
    let probe = load(
        ctx.netns,
        addr,
        "probe.bin",
        PROBE_SIZE,
        1,
        &["--timeout-ms", "200", "--retries", "25"],
        Duration::from_secs(20),
    );
    match probe {
        Ok(r) if r.ok == 1 => {}
        Ok(r) => bail!(
            "{} does not serve files: {} (log: {})",
            kind.name(),
            super::load::summary(&r),
            tail(log)
        ),
        Err(e) => bail!(
            "{} does not serve files: {e:#} (log: {})",
            kind.name(),
            tail(log)
        ),
    }
    anyhow::ensure!(process.alive(), "{} exited: {}", kind.name(), tail(log));
    Ok(())
}

/// Starts `kind` and waits until it serves a small file.
fn start(kind: Kind, ctx: &Ctx<'_>) -> anyhow::Result<Running> {
    let (cgroup, addr) = if let Some(ns) = ctx.netns {
        let cg = match Cgroup::create(&format!("{}-{}", ns.name, kind.name())) {
            Ok(cg) => Some(cg),
            Err(e) => {
                banner(
                    "WARNING",
                    &format!(
                        "no cgroup v2 ({e:#}): {} CPU from /proc/<pid>/stat, which misses forked children (tftpd-hpa)",
                        kind.name()
                    ),
                );
                None
            }
        };
        (cg, SocketAddr::from(([127, 0, 0, 1], kind.port())))
    } else {
        // The host's loopback: any free port.
        let s = std::net::UdpSocket::bind("127.0.0.1:0").context("finding a free port")?;
        (None, s.local_addr().context("reading the free port")?)
    };
    let (mut process, log) = spawn(kind, ctx, cgroup.as_ref(), addr)?;
    let cpu = match cgroup {
        Some(cg) => CpuMeter::Cgroup(cg),
        None => CpuMeter::Pid(process.pid()),
    };
    probe(kind, ctx, &mut process, addr, &log)?;
    Ok(Running {
        kind,
        process,
        cpu,
        addr,
        log,
    })
}

/// How the server ended, with its last log line, if it has exited.
fn exit_note(s: &mut Running) -> Option<String> {
    let st = s.process.exit_status()?;
    Some(format!(
        "{st}: {}",
        tail(&s.log).lines().last().unwrap_or_default()
    ))
}

/// A note when the server died during the last measurement.
fn died(s: &mut Running) -> String {
    exit_note(s).map_or_else(String::new, |why| {
        format!(" SERVER DIED during this run ({why})")
    })
}

/// Restarts a server that died (atftpd aborts beyond 1024 descriptors); returns a note.
fn ensure_running(s: &mut Running, ctx: &Ctx<'_>) -> anyhow::Result<String> {
    let Some(why) = exit_note(s) else {
        return Ok(String::new());
    };
    say(format!(
        "WARNING: {} had exited ({why}); restarting it",
        s.kind.name()
    ));
    let cgroup = match &s.cpu {
        CpuMeter::Cgroup(c) => Some(c),
        CpuMeter::Pid(_) => None,
    };
    let (mut process, log) = spawn(s.kind, ctx, cgroup, s.addr)?;
    // Keep the old log: it says why the server died.
    let _ = std::fs::rename(
        &s.log,
        s.log.with_extension(format!("died-{}", s.process.pid())),
    );
    probe(s.kind, ctx, &mut process, s.addr, &log)?;
    if let CpuMeter::Pid(pid) = &mut s.cpu {
        *pid = process.pid();
    }
    s.process = process;
    s.log = log;
    Ok(format!("restarted after the previous run ({why})"))
}

const PROBE_SIZE: usize = 3000;
const STORM_SIZE: usize = 1 << 20;

/// How one atftp download went.
struct SingleRun {
    ok: bool,
    wall_s: f64,
    server_cpu_s: f64,
    client_cpu_s: f64,
    note: String,
}

/// One atftp download of `big.bin`, verified against `expected`.
fn single(
    netns: Option<&Netns>,
    atftp: &Path,
    s: &Running,
    (blksize, windowsize): (u16, Option<u16>),
    expected: &[u8],
    limit: Duration,
    outputs: &Path,
) -> anyhow::Result<SingleRun> {
    let out = outputs.join(format!("{}.bin", s.kind.name()));
    let _ = std::fs::remove_file(&out);
    let mut c = command(None, netns, atftp);
    c.args(["-g", "-r", "big.bin", "-l"])
        .arg(&out)
        .args(["--option", &format!("blksize {blksize}")]);
    if let Some(w) = windowsize {
        c.args(["--option", &format!("windowsize {w}")]);
    }
    c.arg(s.addr.ip().to_string())
        .arg(s.addr.port().to_string());
    let cpu0 = s.cpu.seconds()?;
    let fin = run_timed(c, limit)?;
    let cpu = s.cpu.seconds()? - cpu0;
    let got = std::fs::read(&out).unwrap_or_default();
    let _ = std::fs::remove_file(&out);
    let mut note = String::new();
    let ok = match fin.status {
        None => {
            note = format!("killed after {} s", limit.as_secs());
            false
        }
        Some(st) if !st.success() => {
            note = format!(
                "atftp {st}: {}",
                String::from_utf8_lossy(&fin.stderr).trim()
            );
            false
        }
        Some(_) if got.len() != expected.len() => {
            note = format!("got {} bytes, expected {}", got.len(), expected.len());
            false
        }
        Some(_) if got != expected => {
            let at = got.iter().zip(expected).position(|(a, b)| a != b);
            note = format!("CORRUPT: first wrong byte at {at:?}");
            false
        }
        Some(_) => true,
    };
    Ok(SingleRun {
        ok,
        wall_s: fin.elapsed.as_secs_f64(),
        server_cpu_s: cpu,
        client_cpu_s: fin.cpu.as_secs_f64(),
        note,
    })
}

/// Machine description for the report.
pub(crate) fn machine() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    format!(
        "kernel {}, CPU {cpu}, {cores} cores, load average at start {}",
        kernel.trim(),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    )
}

fn versions(bins: &Binaries, cache: &Path) -> String {
    let mut v = Vec::new();
    if let Ok(rd) = std::fs::read_dir(cache.join("debs")) {
        let mut debs: Vec<String> = rd
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".deb"))
            .collect();
        debs.sort();
        v.extend(debs);
    }
    if let Some(d) = &bins.dnsmasq
        && let Ok(o) = Command::new(d).arg("--version").output()
        && let Some(l) = String::from_utf8_lossy(&o.stdout).lines().next()
    {
        v.push(l.to_owned());
    }
    v.join(", ")
}

/// Runs the comparison; returns the process exit status.
pub(crate) fn run(args: &CompareArgs) -> anyhow::Result<bool> {
    sandbox::catch_signals()?;
    let t_start = std::time::Instant::now();
    let work = match &args.work_dir {
        Some(d) => d.clone(),
        None => target_dir()?,
    };
    let cache = work.join("tftp-peers");
    if args.fetch_peers {
        peers::fetch(&cache)?;
    }
    let plan = Plan {
        reps: args.reps.unwrap_or(if args.quick { 1 } else { 3 }).max(1),
        size: args.size_mib.unwrap_or(if args.quick { 4 } else { 100 }) << 20,
        clients: args.clients.unwrap_or(if args.quick { 50 } else { 1000 }),
        single_limit: Duration::from_secs(if args.quick { 20 } else { 300 }),
        storm_limit: Duration::from_secs(if args.quick { 40 } else { 600 }),
        settle: Duration::from_millis(if args.quick { 100 } else { 1000 }),
    };
    let netbootd = netbootd(args.netbootd.as_ref())?;
    let bins = Binaries::find(&cache);
    let root_user = sandbox::is_root();

    // Which servers run.
    let mut kinds = vec![Kind::Netboot];
    for name in &args.peers {
        let Some(kind) = Kind::ALL.into_iter().find(|k| k.name() == name) else {
            bail!("unknown peer {name:?} (tftpd-hpa, atftpd, dnsmasq)");
        };
        if kind == Kind::Netboot || kinds.contains(&kind) {
            continue;
        }
        if !root_user {
            loud(format!(
                "{name}: not root, so no network namespace (dnsmasq needs port 69) and no cgroup; run as root to compare with the peers"
            ));
        } else if bins.server(kind).is_none() {
            loud(format!(
                "{name} not found; get it with: {}",
                Binaries::how_to_get(kind, &cache)
            ));
        } else {
            kinds.push(kind);
        }
    }
    let wants_atftp = args
        .scenarios
        .iter()
        .any(|s| matches!(s, Scenario::Single | Scenario::Window));
    if wants_atftp && bins.atftp.is_none() {
        loud(format!(
            "the atftp client is missing, so the single-transfer scenarios are skipped; get it with apt-get install -y atftp, or {}",
            Binaries::how_to_get(Kind::Atftpd, &cache)
        ));
    }

    // Scratch space, namespace, files.
    let pid = std::process::id();
    let scratch_dir = work.join("tftp-bench").join(format!("run-{pid}"));
    let _ = std::fs::remove_dir_all(&scratch_dir);
    make_dir(&scratch_dir, 0o755)?;
    // Dropped last: locals drop in reverse order (servers, namespace, outputs, scratch).
    let _scratch = Scratch(scratch_dir.clone());
    let root = scratch_dir.join("data").join("tftp");
    make_dir(&root, 0o755)?;
    make_dir(&scratch_dir.join("logs"), 0o755)?;
    // atftp writes its downloads to tmpfs when there is one, so disk speed stays out.
    let shm = Path::new("/dev/shm");
    let outputs_dir = if shm.is_dir() {
        shm.join(format!("netboot-bench-{pid}"))
    } else {
        scratch_dir.join("out")
    };
    make_dir(&outputs_dir, 0o700)?;
    let _outputs = (outputs_dir != scratch_dir.join("out")).then(|| Scratch(outputs_dir.clone()));
    let netns = if root_user {
        match Netns::create(format!("nbbench-{pid}")) {
            Ok(ns) => Some(ns),
            Err(e) => {
                loud(format!(
                    "no network namespace ({e:#}): netboot runs alone on the host's loopback"
                ));
                kinds.retain(|k| *k == Kind::Netboot);
                None
            }
        }
    } else {
        loud("not root: netboot runs alone on the host's loopback, CPU from /proc/<pid>/stat");
        None
    };
    let big = content(DEFAULT_SEED, plan.size);
    write_file(&root.join("big.bin"), &big)?;
    write_file(&root.join("f1M.bin"), &content(DEFAULT_SEED, STORM_SIZE))?;
    write_file(&root.join("probe.bin"), &content(DEFAULT_SEED, PROBE_SIZE))?;

    let header = format!(
        "machine: {}\npeers: {}\nrepetitions: {}, single-transfer file {} MiB, storm {} clients x 1 MiB, peer limits {}",
        machine(),
        versions(&bins, &cache),
        plan.reps,
        plan.size >> 20,
        plan.clients,
        if args.peer_defaults {
            "default (dnsmasq --tftp-max 50, atftpd --maxthread 100)"
        } else {
            "raised (dnsmasq --tftp-max=1000, atftpd --maxthread 1000)"
        }
    );
    say(&header);

    let ctx = Ctx {
        bins: &bins,
        netbootd: &netbootd,
        netns: netns.as_ref(),
        root: root.clone(),
        logs: scratch_dir.join("logs"),
        raise_limits: !args.peer_defaults,
    };
    let mut servers: Vec<Running> = Vec::new();
    for kind in kinds {
        match start(kind, &ctx) {
            Ok(r) => servers.push(r),
            Err(e) if kind == Kind::Netboot => return Err(e.context("netbootd did not start")),
            Err(e) => loud(format!("{} failed to start: {e:#}", kind.name())),
        }
    }

    let mut samples: Vec<Sample> = Vec::new();
    let n = servers.len();
    for rep in 0..plan.reps {
        let order: Vec<usize> = (0..n).map(|i| (i + rep) % n).collect();
        if wants_atftp && let Some(atftp) = &bins.atftp {
            let mut configs: Vec<(u16, Option<u16>)> = Vec::new();
            if args.scenarios.contains(&Scenario::Single) {
                configs.extend(SINGLE_BLKSIZES.map(|b| (b, None)));
            }
            if args.scenarios.contains(&Scenario::Window) {
                configs.extend(WINDOWS.map(|w| (WINDOW_BLKSIZE, Some(w))));
            }
            for &(blksize, windowsize) in &configs {
                for &i in &order {
                    let s = &mut servers[i];
                    if windowsize.is_some() && !s.kind.windowsize() {
                        continue;
                    }
                    let restarted = ensure_running(s, &ctx)?;
                    let SingleRun {
                        ok,
                        wall_s: wall,
                        server_cpu_s: cpu,
                        client_cpu_s: client_cpu,
                        mut note,
                    } = single(
                        ctx.netns,
                        atftp,
                        s,
                        (blksize, windowsize),
                        &big,
                        plan.single_limit,
                        &outputs_dir,
                    )?;
                    note.push_str(&restarted);
                    note.push_str(&died(s));
                    let mbs = plan.size as f64 / 1e6 / wall;
                    say(format!(
                        "rep {rep} single {} blksize {blksize} window {windowsize:?}: {} {wall:.2} s, {mbs:.1} MB/s, server CPU {cpu:.2} s, client CPU {client_cpu:.2} s {note}",
                        s.kind.name(),
                        if ok { "ok" } else { "FAILED" },
                    ));
                    samples.push(Sample {
                        scenario: if windowsize.is_some() {
                            "window"
                        } else {
                            "single"
                        },
                        server: s.kind.name(),
                        rep,
                        blksize,
                        windowsize,
                        clients: 1,
                        ok,
                        wall_s: wall,
                        mbs,
                        server_cpu_s: cpu,
                        client_cpu_s: Some(client_cpu),
                        note,
                        load: None,
                    });
                    pause(plan.settle / 4)?;
                }
            }
        }
        if args.scenarios.contains(&Scenario::Storm) {
            for &i in &order {
                let s = &mut servers[i];
                let restarted = ensure_running(s, &ctx)?;
                let cpu0 = s.cpu.seconds()?;
                let r = load(
                    ctx.netns,
                    s.addr,
                    "f1M.bin",
                    STORM_SIZE,
                    plan.clients,
                    &["--blksize", "1432"],
                    plan.storm_limit,
                );
                let cpu = s.cpu.seconds()? - cpu0;
                let restarted = restarted + &died(s);
                let (ok, wall, mbs, note, load) = match r {
                    Ok(r) => {
                        say(format!(
                            "rep {rep} storm {}: {}; server CPU {cpu:.2} s",
                            s.kind.name(),
                            super::load::summary(&r)
                        ));
                        (
                            r.ok == r.clients,
                            r.wall_s,
                            r.goodput_mbs,
                            restarted,
                            Some(r),
                        )
                    }
                    Err(e) => {
                        say(format!("rep {rep} storm {}: FAILED {e:#}", s.kind.name()));
                        (false, 0.0, 0.0, format!("{restarted} {e:#}"), None)
                    }
                };
                samples.push(Sample {
                    scenario: "storm",
                    server: s.kind.name(),
                    rep,
                    blksize: 1432,
                    windowsize: None,
                    clients: plan.clients,
                    ok,
                    wall_s: wall,
                    mbs,
                    server_cpu_s: cpu,
                    client_cpu_s: None,
                    note,
                    load,
                });
                // Let the servers drop what is left of the storm before the next one.
                pause(plan.settle * 2)?;
            }
        }
    }

    for s in &mut servers {
        if !s.process.alive() {
            say(format!(
                "WARNING: {} exited during the run: {}",
                s.kind.name(),
                tail(&s.log)
            ));
        }
    }

    // Raw samples.
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| work.join("tftp-bench").join(format!("results-{pid}.jsonl")));
    let mut jsonl = String::new();
    for s in &samples {
        jsonl.push_str(&serde_json::to_string(s).context("encoding a sample")?);
        jsonl.push('\n');
    }
    std::fs::write(&out, jsonl).with_context(|| format!("writing {}", out.display()))?;
    say(format!("raw samples in {}", out.display()));

    let servers: Vec<Kind> = {
        let mut k: Vec<Kind> = servers.iter().map(|s| s.kind).collect();
        k.sort();
        k
    };
    let report = report(&header, &plan, &servers, &samples, args);
    #[allow(
        clippy::print_stdout,
        reason = "the Markdown report is this command's output"
    )]
    {
        println!("{report}");
    }

    let netboot_bad: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.server == Kind::Netboot.name() && !s.ok)
        .collect();
    let corrupt = samples
        .iter()
        .filter(|s| s.server == Kind::Netboot.name())
        .any(|s| s.note.contains("CORRUPT") || s.load.as_ref().is_some_and(|l| l.corrupt > 0));
    drop(servers);
    say(format!(
        "done in {:.1} s (runner CPU {:.1} s)",
        t_start.elapsed().as_secs_f64(),
        own_cpu_seconds()
    ));
    if !netboot_bad.is_empty() {
        say(format!(
            "FAIL: {} netboot measurement(s) had failed transfers{}",
            netboot_bad.len(),
            if corrupt {
                ", some with CORRUPTED bytes"
            } else {
                ""
            }
        ));
        return Ok(false);
    }
    Ok(true)
}

/// A cell: median [min–max] of the successful samples, and how many failed.
fn cell(v: &[f64], failed: usize, digits: usize) -> String {
    let mut sorted = v.to_vec();
    let Some(m) = median(&mut sorted) else {
        return if failed > 0 {
            "failed".to_owned()
        } else {
            "–".to_owned()
        };
    };
    let mut s = format!("{m:.digits$}");
    if sorted.len() > 1 {
        let (lo, hi) = (sorted[0], sorted[sorted.len() - 1]);
        let _ = write!(s, " [{lo:.digits$}–{hi:.digits$}]");
    }
    if failed > 0 {
        let _ = write!(s, " ({failed} failed)");
    }
    s
}

/// One figure of a sample, if it has it.
type Metric = fn(&Sample) -> Option<f64>;

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "–".to_owned(),
    }
}

fn report(
    header: &str,
    plan: &Plan,
    servers: &[Kind],
    samples: &[Sample],
    args: &CompareArgs,
) -> String {
    let mut r = String::new();
    let _ = writeln!(r, "<!-- {} -->", header.replace('\n', "; "));
    let pick = |scenario: &str, server: Kind, b: u16, w: Option<u16>| -> Vec<&Sample> {
        samples
            .iter()
            .filter(|s| {
                s.scenario == scenario
                    && s.server == server.name()
                    && s.blksize == b
                    && s.windowsize == w
            })
            .collect()
    };
    let med = |v: &[&Sample], f: Metric| -> Option<f64> {
        let mut x: Vec<f64> = v.iter().filter(|s| s.ok).filter_map(|s| f(s)).collect();
        median(&mut x)
    };
    let single_like = |r: &mut String,
                       scenario: &str,
                       title: &str,
                       rows: &[(u16, Option<u16>)],
                       cols: &[Kind]| {
        if !samples.iter().any(|s| s.scenario == scenario) {
            return;
        }
        let cols_peers: Vec<Kind> = cols
            .iter()
            .copied()
            .filter(|k| *k != Kind::Netboot)
            .collect();
        let wall: Metric = |s| Some(s.wall_s);
        let client: Metric = |s| s.client_cpu_s;
        for (what, unit, f, digits) in [
            ("throughput", "MB/s", (|s| Some(s.mbs)) as Metric, 1usize),
            (
                "server CPU per transfer",
                "s",
                |s: &Sample| Some(s.server_cpu_s),
                3,
            ),
            ("atftp client CPU per transfer", "s", client, 3),
        ] {
            let throughput = what == "throughput";
            let _ = writeln!(
                r,
                "\n**{title}: {what}, {unit}, median [min–max] of {} run(s)**\n",
                plan.reps
            );
            let mut head = "| blksize | window |".to_owned();
            let mut sep = "|---|---|".to_owned();
            for k in cols {
                let _ = write!(head, " {} |", k.name());
                sep.push_str("---|");
            }
            for k in &cols_peers {
                let _ = write!(head, " netboot/{} |", k.name());
                sep.push_str("---|");
            }
            if throughput {
                // The client is one process: netboot's transfer cannot take less wall time
                // than the client's own CPU time in it, which caps the ratio any server
                // could show against this peer with this client.
                for k in &cols_peers {
                    let _ = write!(head, " ceiling set by the client, netboot/{} |", k.name());
                    sep.push_str("---|");
                }
            }
            let _ = writeln!(r, "{head}\n{sep}");
            for &(b, w) in rows {
                let mut line = format!(
                    "| {b} | {} |",
                    w.map_or("1 (lock-step)".to_owned(), |w| w.to_string())
                );
                for &k in cols {
                    let v = pick(scenario, k, b, w);
                    let ok: Vec<f64> = v.iter().filter(|s| s.ok).filter_map(|s| f(s)).collect();
                    let failed = v.iter().filter(|s| !s.ok).count();
                    let _ = write!(line, " {} |", cell(&ok, failed, digits));
                }
                let nb = med(&pick(scenario, Kind::Netboot, b, w), f);
                for &k in &cols_peers {
                    let _ = write!(line, " {} |", ratio(nb, med(&pick(scenario, k, b, w), f)));
                }
                if throughput {
                    let floor = med(&pick(scenario, Kind::Netboot, b, w), client);
                    for &k in &cols_peers {
                        let peer = med(&pick(scenario, k, b, w), wall);
                        let _ = write!(line, " {} |", ratio(peer, floor));
                    }
                }
                let _ = writeln!(r, "{line}");
            }
        }
    };
    let rows: Vec<(u16, Option<u16>)> = SINGLE_BLKSIZES.map(|b| (b, None)).to_vec();
    single_like(
        &mut r,
        "single",
        &format!("One {} MiB file, atftp client", plan.size >> 20),
        &rows,
        servers,
    );
    let wcols: Vec<Kind> = servers.iter().copied().filter(|k| k.windowsize()).collect();
    let rows: Vec<(u16, Option<u16>)> = WINDOWS.map(|w| (WINDOW_BLKSIZE, Some(w))).to_vec();
    single_like(
        &mut r,
        "window",
        &format!(
            "One {} MiB file, atftp client, windowsize (RFC 7440)",
            plan.size >> 20
        ),
        &rows,
        &wcols,
    );

    if samples.iter().any(|s| s.scenario == "storm") {
        let _ = writeln!(
            r,
            "\n**Storm: {} clients x 1 MiB, lock-step, blksize 1432 (tftp-load), median [min–max] of {} run(s); peer limits {}**\n",
            plan.clients,
            plan.reps,
            if args.peer_defaults {
                "default"
            } else {
                "raised to 1000"
            }
        );
        let _ = writeln!(
            r,
            "| server | failed clients per run | wall s | client p50 s | client p99 s | goodput MB/s | server CPU s | CPU ms per completed transfer | wall netboot/peer (runs without failures) | CPU netboot/peer (same) |"
        );
        let _ = writeln!(r, "|---|---|---|---|---|---|---|---|---|---|");
        let storm = |k: Kind| -> Vec<&Sample> {
            samples
                .iter()
                .filter(|s| s.scenario == "storm" && s.server == k.name())
                .collect()
        };
        // A storm run with failed clients still shows its figures (the failures are their
        // own column), but only runs in which every client succeeded enter the ratios.
        let all = |v: &[&Sample], f: fn(&Sample) -> f64| -> Vec<f64> {
            v.iter()
                .filter(|s| s.load.is_some())
                .map(|s| f(s))
                .collect()
        };
        let clean = |v: &[&Sample], f: fn(&Sample) -> f64| -> Vec<f64> {
            v.iter().filter(|s| s.ok).map(|s| f(s)).collect()
        };
        let nb = storm(Kind::Netboot);
        let mut nb_wall = clean(&nb, |s| s.wall_s);
        let mut nb_cpu = clean(&nb, |s| s.server_cpu_s);
        let (nb_wall, nb_cpu) = (median(&mut nb_wall), median(&mut nb_cpu));
        for &k in servers {
            let v = storm(k);
            let failed: Vec<String> = v
                .iter()
                .map(|s| match &s.load {
                    Some(l) if l.clients == l.ok => "0".to_owned(),
                    Some(l) => format!("{} {:?}", l.clients - l.ok, l.failures),
                    None => "run failed".to_owned(),
                })
                .collect();
            // Latencies exist only for runs in which some client succeeded.
            let lf = |f: fn(&LoadReport) -> f64| -> Vec<f64> {
                v.iter()
                    .filter_map(|s| s.load.as_ref().filter(|l| l.ok > 0).map(f))
                    .collect()
            };
            let wall = all(&v, |s| s.wall_s);
            let cpu = all(&v, |s| s.server_cpu_s);
            let per: Vec<f64> = v
                .iter()
                .filter_map(|s| {
                    let ok = s.load.as_ref()?.ok;
                    (ok > 0).then(|| s.server_cpu_s * 1000.0 / ok as f64)
                })
                .collect();
            let (ratio_wall, ratio_cpu) = if k == Kind::Netboot {
                ("–".to_owned(), "–".to_owned())
            } else {
                (
                    ratio(nb_wall, median(&mut clean(&v, |s| s.wall_s))),
                    ratio(nb_cpu, median(&mut clean(&v, |s| s.server_cpu_s))),
                )
            };
            let _ = writeln!(
                r,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {ratio_wall} | {ratio_cpu} |",
                k.name(),
                failed.join(", "),
                cell(&wall, 0, 2),
                cell(&lf(|l| l.p50_s), 0, 2),
                cell(&lf(|l| l.p99_s), 0, 2),
                cell(&lf(|l| l.goodput_mbs), 0, 1),
                cell(&cpu, 0, 2),
                cell(&per, 0, 2),
            );
        }
        let mut gen_cpu: Vec<f64> = samples
            .iter()
            .filter_map(|s| s.load.as_ref().map(|l| l.client_cpu_s))
            .collect();
        let _ = writeln!(
            r,
            "\nLoad generator CPU per storm run, median: {:.2} s (one thread).",
            median(&mut gen_cpu).unwrap_or(0.0)
        );
        // The generator is one thread, so no storm ends sooner than the generator's own CPU
        // time in it: that bounds the wall-time ratio any server could show here.
        let mut nb_gen = clean(&storm(Kind::Netboot), |s| {
            s.load.as_ref().map_or(0.0, |l| l.client_cpu_s)
        });
        let nb_gen = median(&mut nb_gen);
        for &k in servers.iter().filter(|k| **k != Kind::Netboot) {
            let peer = median(&mut clean(&storm(k), |s| s.wall_s));
            let _ = writeln!(
                r,
                "Floor of wall netboot/{} set by the load generator (its CPU time in netboot's runs over {}'s wall time): {}.",
                k.name(),
                k.name(),
                ratio(nb_gen, peer)
            );
        }
    }
    let notes: Vec<String> = samples
        .iter()
        .filter(|s| !s.note.trim().is_empty())
        .map(|s| {
            format!(
                "- rep {} {} {} blksize {}{}: {}",
                s.rep,
                s.scenario,
                s.server,
                s.blksize,
                s.windowsize
                    .map_or(String::new(), |w| format!(" window {w}")),
                s.note.trim()
            )
        })
        .collect();
    if !notes.is_empty() {
        let _ = writeln!(r, "\nNotes:\n\n{}", notes.join("\n"));
    }
    r
}
