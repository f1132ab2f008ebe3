//! `netboot-bench iscsi-compare`: netbootd's iSCSI target side by side with tgtd (Debian
//! `tgt`) and the raw backing file under fio, in one run.
//!
//! - one image file (sparse, then filled with pseudo-random bytes and left in the page
//!   cache) is netbootd's image, tgtd's LUN 1 (file backing store) and fio's file, so all
//!   three read and write the same bytes;
//! - the load comes from [`initiator`], an iSCSI initiator of our own (Debian's fio has no
//!   libiscsi engine): READ(10)/WRITE(10), N tagged commands in flight, every command's
//!   latency in an HDR histogram; workloads: 4 KiB random read and write at QD1 and QD32,
//!   1 MiB sequential read and write at QD8;
//! - libiscsi's `iscsi-perf -m 32 -b 8 -r` (4 KiB random read, QD32) cross-checks one
//!   workload with a real initiator;
//! - for sequential reads, a plain TCP pair on loopback ([`tcp_pair`]: a sender that
//!   writes the image from a mapping of it, a receiver that reads it) measures what one
//!   loopback connection carries on this machine, the ceiling of any target over TCP;
//! - the servers are interleaved (the order rotates each repetition) and the tables
//!   report medians; the target's CPU is utime + stime from `/proc/PID/stat`.
//!
//! netbootd runs from its release build with its own data directory and an ephemeral
//! port; tgtd with its own control socket (`tgtd -C N`, N = our PID) and port, stopped by
//! deleting its LUN, target and system through `tgtadm` and then, if still running, by PID.
//! Without root or without tgtd, tgtd is skipped loudly.

mod initiator;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use hdrhistogram::Histogram;

use crate::tftp::load::proc_cpu_seconds;
use crate::tftp::sandbox::{self, Server, interrupted};
use initiator::Session;

/// The initiator name the load generator and iscsi-perf log in with.
const INITIATOR: &str = "iqn.2026-01.org.netboot:bench";
const IMAGE: &str = "bench";
const TGT_IQN: &str = "iqn.2026-01.org.netboot.bench:tgt";

/// Options of `iscsi-compare`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct CompareArgs {
    /// CI smoke: 64 MiB image, 2 s per workload, one repetition.
    #[arg(long)]
    quick: bool,
    /// Repetitions (default 3; 1 with --quick).
    #[arg(long)]
    reps: Option<usize>,
    /// Measured seconds per workload and server (default 8; 2 with --quick).
    #[arg(long)]
    seconds: Option<f64>,
    /// Image size in MiB (default 1024; 64 with --quick).
    #[arg(long)]
    size_mib: Option<u64>,
    /// Workloads to run (default: all).
    #[arg(long, value_delimiter = ',')]
    workloads: Vec<String>,
    /// Skip the raw-file fio runs.
    #[arg(long)]
    no_fio: bool,
    /// netbootd binary; by default it is built with cargo next to this binary.
    #[arg(long)]
    netbootd: Option<PathBuf>,
    /// Directory for scratch files (default: the cargo target dir).
    #[arg(long)]
    work_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pattern {
    RandRead,
    RandWrite,
    SeqRead,
    SeqWrite,
}

impl Pattern {
    fn writes(self) -> bool {
        matches!(self, Self::RandWrite | Self::SeqWrite)
    }
    fn fio(self) -> &'static str {
        match self {
            Self::RandRead => "randread",
            Self::RandWrite => "randwrite",
            Self::SeqRead => "read",
            Self::SeqWrite => "write",
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Workload {
    name: &'static str,
    pattern: Pattern,
    bs: usize,
    qd: usize,
}

const WORKLOADS: [Workload; 6] = [
    Workload {
        name: "4k-randread-qd1",
        pattern: Pattern::RandRead,
        bs: 4096,
        qd: 1,
    },
    Workload {
        name: "4k-randread-qd32",
        pattern: Pattern::RandRead,
        bs: 4096,
        qd: 32,
    },
    Workload {
        name: "4k-randwrite-qd1",
        pattern: Pattern::RandWrite,
        bs: 4096,
        qd: 1,
    },
    Workload {
        name: "4k-randwrite-qd32",
        pattern: Pattern::RandWrite,
        bs: 4096,
        qd: 32,
    },
    Workload {
        name: "1m-seqread-qd8",
        pattern: Pattern::SeqRead,
        bs: 1 << 20,
        qd: 8,
    },
    Workload {
        name: "1m-seqwrite-qd8",
        pattern: Pattern::SeqWrite,
        bs: 1 << 20,
        qd: 8,
    },
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Who {
    Netboot,
    Tgtd,
    FioUring,
    FioPsync,
    TcpPair,
}

impl Who {
    fn name(self) -> &'static str {
        match self {
            Self::Netboot => "netbootd",
            Self::Tgtd => "tgtd",
            Self::FioUring => "raw fio io_uring",
            Self::FioPsync => "raw fio psync (QD1)",
            Self::TcpPair => "plain TCP pair",
        }
    }
}

/// One measured run.
#[derive(Debug, Clone, Copy, Default)]
struct Measure {
    iops: f64,
    mbs: f64,
    p50_us: f64,
    p99_us: f64,
    /// Target CPU (utime + stime) over the measured interval, seconds.
    cpu_s: f64,
    secs: f64,
}

impl Measure {
    fn cpu_pct(&self) -> f64 {
        self.cpu_s / self.secs * 100.0
    }
    fn cpu_us_per_io(&self) -> f64 {
        self.cpu_s * 1e6 / (self.iops * self.secs)
    }
}

fn say(msg: impl AsRef<str>) {
    eprintln!("iscsi-compare: {}", msg.as_ref());
}

fn loud(msg: impl AsRef<str>) {
    eprintln!("iscsi-compare: ************************************************************");
    eprintln!("iscsi-compare: SKIPPED: {}", msg.as_ref());
    eprintln!("iscsi-compare: ************************************************************");
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success())
}

/// utime + stime of a process (all its threads), seconds.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    proc_cpu_seconds(&pid.to_string())
}

/// A free TCP port on loopback (bound and released).
fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("binding a probe port")?;
    Ok(l.local_addr()?.port())
}

/// A figure for the report with as many decimals as its second field, or a dash where
/// there is none (NaN: a server that did not run, the CPU of raw fio, which has no target
/// process).
struct Fig(f64, usize);

impl std::fmt::Display for Fig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_finite() {
            write!(f, "{:.*}", self.1, self.0)
        } else {
            f.write_str("–")
        }
    }
}

/// The median of the finite values; NaN when there is none.
fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    crate::tftp::compare::median(&mut v).unwrap_or(f64::NAN)
}

/// splitmix64.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn fill_random(buf: &mut [u8], seed: u64) {
    for (i, c) in buf.chunks_mut(8).enumerate() {
        let w = mix(seed ^ (i as u64)).to_le_bytes();
        c.copy_from_slice(&w[..c.len()]);
    }
}

/// Fills the image with pseudo-random bytes (1 MiB at a time) and makes it durable, so
/// that no writeback runs during the measurements; the pages stay cached.
fn fill_image(path: &Path, size: u64) -> anyhow::Result<()> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    f.set_len(size)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < size {
        fill_random(&mut buf, at);
        let n = (size - at).min(buf.len() as u64) as usize;
        f.write_all_at(&buf[..n], at)?;
        at += n as u64;
    }
    f.sync_all()?;
    Ok(())
}

// ------------------------------------------------------------------ servers

/// netbootd with its own data directory, one image, iSCSI on an ephemeral port.
struct Netbootd {
    server: Server,
    iscsi: String,
    image: PathBuf,
}

impl Netbootd {
    fn start(bin: &Path, dir: &Path, size: u64) -> anyhow::Result<Self> {
        let cfg = dir.join("netboot.toml");
        std::fs::write(
            &cfg,
            format!(
                "data_dir = \"{}\"\n[http]\nlisten = \"127.0.0.1:0\"\n[log]\nlevel = \"warn,netboot_daemon::daemon=info\"\n\
                 [dhcp]\nmode = \"off\"\n[tftp]\nenabled = false\n\
                 [iscsi]\nlisten = \"127.0.0.1:0\"\nallow = [\"{INITIATOR}\"]\n",
                dir.join("data").display()
            ),
        )
        .context("writing netbootd's configuration")?;
        let log = dir.join("netbootd.log");
        let mut c = Command::new(bin);
        c.arg("--config")
            .arg(&cfg)
            .args(["--log-format", "json"])
            .env_remove("NETBOOT_CONFIG")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null());
        let mut server = Server::spawn("netbootd", c, &log)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let (http, iscsi) = loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let field = |msg: &str| {
                text.lines()
                    .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                    .find(|v| v["message"] == msg || v["fields"]["message"] == msg)
                    .and_then(|v| {
                        v["addr"]
                            .as_str()
                            .or_else(|| v["fields"]["addr"].as_str())
                            .map(str::to_owned)
                    })
            };
            if let (Some(h), Some(i)) = (field("netbootd listening"), field("iSCSI listening")) {
                break (h, i);
            }
            if !server.alive() || Instant::now() > deadline || interrupted() {
                bail!("netbootd did not start; its log:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let jar = dir.join("cookies");
        let jar = jar.to_string_lossy();
        curl(&[
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "-d",
            r#"{"username":"admin","password":"bench-pass-1"}"#,
            "-c",
            &jar,
            &format!("http://{http}/api/v1/auth/setup"),
        ])?;
        curl(&[
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "-b",
            &jar,
            "-d",
            &format!(r#"{{"name":"{IMAGE}","size_bytes":{size}}}"#),
            &format!("http://{http}/api/v1/images"),
        ])?;
        let image = dir.join("data").join("images").join(format!("{IMAGE}.img"));
        if !image.exists() {
            std::fs::File::create(&image)
                .with_context(|| format!("creating {}", image.display()))?;
        }
        Ok(Self {
            server,
            iscsi,
            image,
        })
    }
}

fn curl(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("curl")
        .args(["-sS", "--fail", "--max-time", "30"])
        .args(args)
        .output()
        .context("running curl")?;
    ensure!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// tgtd with its own control socket and port, one target with LUN 1 on `file`.
struct Tgtd {
    server: Server,
    n: u32,
    portal: String,
}

impl Tgtd {
    fn start(dir: &Path, file: &Path) -> anyhow::Result<Self> {
        let n = std::process::id();
        let port = free_port()?;
        let portal = format!("127.0.0.1:{port}");
        let mut c = Command::new("tgtd");
        c.args(["-f", "-C", &n.to_string(), "--iscsi"])
            .arg(format!("portal={portal}"))
            .stdin(Stdio::null());
        let server = Server::spawn("tgtd", c, &dir.join("tgtd.log"))?;
        let mut t = Self { server, n, portal };
        let deadline = Instant::now() + Duration::from_secs(10);
        while t.adm(&["--mode", "system", "--op", "show"]).is_err() {
            if !t.server.alive() || Instant::now() > deadline || interrupted() {
                bail!(
                    "tgtd did not start: {}",
                    std::fs::read_to_string(dir.join("tgtd.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        t.adm(&[
            "--mode",
            "target",
            "--op",
            "new",
            "--tid",
            "1",
            "--targetname",
            TGT_IQN,
        ])?;
        t.adm(&[
            "--mode",
            "logicalunit",
            "--op",
            "new",
            "--tid",
            "1",
            "--lun",
            "1",
            "-b",
            &file.to_string_lossy(),
        ])?;
        t.adm(&[
            "--mode", "target", "--op", "bind", "--tid", "1", "-I", "ALL",
        ])?;
        Ok(t)
    }

    fn adm(&self, args: &[&str]) -> anyhow::Result<()> {
        let out = Command::new("tgtadm")
            .args(["-C", &self.n.to_string(), "--lld", "iscsi"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running tgtadm")?;
        ensure!(
            out.status.success(),
            "tgtadm {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }
}

impl Drop for Tgtd {
    fn drop(&mut self) {
        // tgtd ignores SIGTERM while targets exist: delete them, then the system.
        let _ = self.adm(&[
            "--mode",
            "logicalunit",
            "--op",
            "delete",
            "--tid",
            "1",
            "--lun",
            "1",
        ]);
        let _ = self.adm(&["--mode", "target", "--op", "delete", "--tid", "1"]);
        let _ = self.adm(&["--mode", "system", "--op", "delete"]);
        let deadline = Instant::now() + Duration::from_secs(3);
        while self.server.alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        // `self.server` is dropped next: stopped by PID if it is still running.
        for f in [
            format!("/var/run/tgtd/socket.{}", self.n),
            format!("/var/run/tgtd/socket.{}.lock", self.n),
        ] {
            let _ = std::fs::remove_file(f);
        }
    }
}

// ------------------------------------------------------------------ load

/// Writes a block and reads it back through the target.
fn check_data(addr: &str, target: &str, lun: u16, size: u64) -> anyhow::Result<()> {
    let mut s = Session::login(addr, target, INITIATOR, lun, 1)?;
    let mut block = vec![0u8; 64 << 10];
    fill_random(&mut block, 0xc0ff_ee00 ^ u64::from(lun));
    let at = (size / 2) & !4095;
    s.write(0, at, &block, 0, block.len());
    s.flush()?;
    let d = s.next_done(&block)?;
    ensure!(d.status == 0, "{target}: WRITE(10) status {:#x}", d.status);
    s.capture = Some(vec![0u8; block.len()]);
    s.read(0, at, block.len());
    s.flush()?;
    let d = s.next_done(&block)?;
    ensure!(d.status == 0, "{target}: READ(10) status {:#x}", d.status);
    ensure!(
        s.capture.as_deref() == Some(&block[..]),
        "{target}: the block read back differs from the block written"
    );
    s.logout();
    Ok(())
}

/// Runs `w` against a target for `ramp` + `secs`; `pid` is the target's process.
fn load(
    addr: &str,
    target: &str,
    lun: u16,
    w: Workload,
    size: u64,
    (ramp, secs): (Duration, Duration),
    pid: u32,
) -> anyhow::Result<Measure> {
    let mut s = Session::login(addr, target, INITIATOR, lun, w.qd)?;
    let mut payload = vec![0u8; w.bs * w.qd];
    fill_random(&mut payload, 0x5eed);
    let blocks = size / w.bs as u64;
    let mut rng = mix(u64::from(std::process::id()) ^ size);
    let mut seq = 0u64;
    let mut next_offset = |pattern: Pattern| -> u64 {
        match pattern {
            Pattern::RandRead | Pattern::RandWrite => {
                rng = mix(rng);
                (rng % blocks) * w.bs as u64
            }
            Pattern::SeqRead | Pattern::SeqWrite => {
                let o = (seq % blocks) * w.bs as u64;
                seq += 1;
                o
            }
        }
    };
    let mut hist =
        Histogram::<u64>::new_with_bounds(1, 120_000_000_000, 3).context("histogram bounds")?;
    let mut started = vec![Instant::now(); w.qd];
    let issue = |s: &mut Session, tag: usize, off: u64, started: &mut [Instant]| {
        started[tag] = Instant::now();
        if w.pattern.writes() {
            s.write(tag as u32, off, &payload, tag * w.bs, w.bs);
        } else {
            s.read(tag as u32, off, w.bs);
        }
    };
    let t0 = Instant::now();
    let measure_from = t0 + ramp;
    let end = measure_from + secs;
    let mut in_flight = 0usize;
    let mut waiting: Vec<usize> = Vec::new();
    for tag in 0..w.qd {
        if s.window_open() {
            issue(&mut s, tag, next_offset(w.pattern), &mut started);
            in_flight += 1;
        } else {
            waiting.push(tag);
        }
    }
    s.flush()?;
    let mut measuring = false;
    let (mut cpu0, mut t_measure, mut done_n) = (0.0, t0, 0u64);
    let mut cpu1 = 0.0;
    let mut t_end = None;
    while in_flight > 0 {
        let d = s.next_done(&payload)?;
        let now = Instant::now();
        let tag = d.tag as usize;
        ensure!(tag < w.qd, "completion for unknown tag {tag}");
        ensure!(
            d.status == 0,
            "{target}: {} command failed with status {:#x}",
            w.name,
            d.status
        );
        in_flight -= 1;
        if !measuring && now >= measure_from {
            measuring = true;
            cpu0 = cpu_seconds(pid)?;
            t_measure = now;
        }
        if measuring && t_end.is_none() {
            hist.record((now - started[tag]).as_nanos() as u64)
                .context("recording a latency")?;
            done_n += 1;
        }
        if t_end.is_none() && now >= end {
            t_end = Some(now);
            cpu1 = cpu_seconds(pid)?;
        }
        if t_end.is_none() && !interrupted() {
            waiting.push(tag);
            while let Some(&t) = waiting.last() {
                if !s.window_open() {
                    break;
                }
                waiting.pop();
                issue(&mut s, t, next_offset(w.pattern), &mut started);
                in_flight += 1;
            }
            s.flush()?;
        }
    }
    if interrupted() {
        bail!("interrupted");
    }
    s.logout();
    let t_end = t_end.context("the run ended early")?;
    let elapsed = (t_end - t_measure).as_secs_f64();
    let iops = done_n as f64 / elapsed;
    Ok(Measure {
        iops,
        mbs: iops * w.bs as f64 / 1e6,
        p50_us: hist.value_at_quantile(0.50) as f64 / 1e3,
        p99_us: hist.value_at_quantile(0.99) as f64 / 1e3,
        cpu_s: cpu1 - cpu0,
        secs: elapsed,
    })
}

/// What one loopback TCP connection carries on this machine, the ceiling of any target
/// over TCP: a sender thread writes the image into the connection `w.bs` bytes at a time
/// from a read-only shared mapping of it (one copy, into the socket, as netbootd's mapped
/// reads), and this thread reads `w.bs` bytes at a time into one buffer (as the initiator
/// reads a data segment) and checks the first bytes of each against the file. No
/// commands, no headers, no queue depth. The CPU columns are the sender thread's. The
/// sender uses the congestion control that `NETBOOT_ISCSI_TCP_CONGESTION` gives netbootd.
fn tcp_pair(
    w: Workload,
    file: &Path,
    (ramp, secs): (Duration, Duration),
) -> anyhow::Result<Measure> {
    use std::io::Read as _;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let map = Arc::new(Mapping::of(file)?);
    ensure!(map.len() >= w.bs, "the image is smaller than one IO");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding the pair")?;
    // The congestion control netbootd is given (its connections inherit it from the
    // listener), so that the pair carries what netbootd's connections could.
    if let Some(cc) = std::env::var("NETBOOT_ISCSI_TCP_CONGESTION")
        .ok()
        .filter(|c| !c.is_empty())
    {
        use std::os::fd::AsRawFd as _;
        // SAFETY: a valid socket; the option value is the name's bytes and their length.
        let rc = unsafe {
            libc::setsockopt(
                listener.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_CONGESTION,
                cc.as_ptr().cast(),
                libc::socklen_t::try_from(cc.len())?,
            )
        };
        ensure!(
            rc == 0,
            "TCP_CONGESTION {cc:?} on the pair: {}",
            std::io::Error::last_os_error()
        );
    }
    let addr = listener.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let sender = {
        let (map, stop) = (Arc::clone(&map), Arc::clone(&stop));
        std::thread::spawn(move || -> anyhow::Result<()> {
            // SAFETY: gettid has no preconditions.
            let _ = tid_tx.send(unsafe { libc::gettid() });
            let (mut s, _) = listener.accept().context("accepting the pair")?;
            s.set_nodelay(true)?;
            let mut at = 0;
            while !stop.load(Ordering::Relaxed) {
                if at + w.bs > map.len() {
                    at = 0;
                }
                if let Err(e) = s.write_all(&map.bytes()[at..at + w.bs]) {
                    // The receiver hangs up when it has measured.
                    return if stop.load(Ordering::Relaxed) {
                        Ok(())
                    } else {
                        Err(e).context("sending")
                    };
                }
                at += w.bs;
            }
            Ok(())
        })
    };
    let task = format!("{}/task/{}", std::process::id(), tid_rx.recv()?);
    let mut rx = std::net::TcpStream::connect(addr).context("connecting the pair")?;
    rx.set_nodelay(true)?;
    let mut buf = vec![0u8; w.bs];
    let mut at = 0;
    let mut count = 0u64;
    let start = Instant::now();
    let mut window: Option<(Instant, u64, f64)> = None;
    let result = loop {
        rx.read_exact(&mut buf).context("receiving")?;
        if at + w.bs > map.len() {
            at = 0;
        }
        ensure!(
            buf[..64] == map.bytes()[at..at + 64],
            "the pair received bytes that are not the file's at offset {at}"
        );
        at += w.bs;
        count += 1;
        let now = Instant::now();
        match window {
            None if now - start >= ramp => {
                window = Some((now, count, proc_cpu_seconds(&task)?));
            }
            Some((t0, c0, cpu0)) if now - t0 >= secs => {
                let elapsed = (now - t0).as_secs_f64();
                let iops = (count - c0) as f64 / elapsed;
                break Measure {
                    iops,
                    mbs: iops * w.bs as f64 / 1e6,
                    // A stream has no per-IO latency.
                    p50_us: f64::NAN,
                    p99_us: f64::NAN,
                    cpu_s: proc_cpu_seconds(&task)? - cpu0,
                    secs: elapsed,
                };
            }
            _ => {}
        }
    };
    stop.store(true, Ordering::Relaxed);
    drop(rx);
    sender
        .join()
        .map_err(|_| anyhow::anyhow!("the pair's sender panicked"))??;
    Ok(result)
}

/// A read-only shared mapping of a whole file.
struct Mapping {
    ptr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is read-only and lives until drop; `&[u8]` views of it may be shared.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn of(path: &Path) -> anyhow::Result<Self> {
        use std::os::fd::AsRawFd as _;
        let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let len = usize::try_from(f.metadata()?.len())?;
        ensure!(len > 0, "{} is empty", path.display());
        // SAFETY: a fresh read-only mapping of an open file; checked for MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                f.as_raw_fd(),
                0,
            )
        };
        ensure!(
            ptr != libc::MAP_FAILED,
            "mapping {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
        Ok(Self { ptr, len })
    }

    fn len(&self) -> usize {
        self.len
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr` maps `len` readable bytes until drop. The benchmark does not
        // truncate the image while the pair runs.
        unsafe { std::slice::from_raw_parts(self.ptr.cast::<u8>(), self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `of`, unmapped once.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

/// fio on the raw file: `engine` io_uring (at the workload's queue depth) or psync.
fn fio(
    engine: &str,
    w: Workload,
    file: &Path,
    size: u64,
    (ramp, secs): (Duration, Duration),
) -> anyhow::Result<Measure> {
    let qd = if engine == "psync" { 1 } else { w.qd };
    let out = Command::new("fio")
        .args([
            "--name=raw",
            &format!("--rw={}", w.pattern.fio()),
            &format!("--bs={}", w.bs),
            &format!("--iodepth={qd}"),
            &format!("--ioengine={engine}"),
            &format!("--size={size}"),
            "--invalidate=0",
            "--time_based",
            &format!("--runtime={}ms", secs.as_millis()),
            &format!("--ramp_time={}ms", ramp.as_millis()),
            "--output-format=json",
        ])
        .arg(format!("--filename={}", file.display()))
        .stdin(Stdio::null())
        .output()
        .context("running fio")?;
    ensure!(
        out.status.success(),
        "fio failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("fio's JSON output")?;
    let job = &v["jobs"][0];
    let side = if w.pattern.writes() {
        &job["write"]
    } else {
        &job["read"]
    };
    let f = |x: &serde_json::Value| x.as_f64().unwrap_or(f64::NAN);
    let runtime = f(&job["job_runtime"]) / 1e3;
    let iops = f(&side["iops"]);
    let pct = |q: &str| f(&side["clat_ns"]["percentile"][q]) / 1e3;
    Ok(Measure {
        iops,
        mbs: f(&side["bw_bytes"]) / 1e6,
        p50_us: pct("50.000000"),
        p99_us: pct("99.000000"),
        // No target process: the CPU columns stay empty for the raw file.
        cpu_s: f64::NAN,
        secs: runtime,
    })
}

/// libiscsi's iscsi-perf, 4 KiB random read at QD32: (IOPS, target CPU seconds, seconds).
fn iscsi_perf(url: &str, secs: u64, pid: u32) -> anyhow::Result<(f64, f64, f64)> {
    let cpu0 = cpu_seconds(pid)?;
    let t0 = Instant::now();
    let out = Command::new("timeout")
        .arg((secs + 30).to_string())
        .args(["iscsi-perf", "-m", "32", "-b", "8", "-r", "-t"])
        .arg(secs.to_string())
        .args(["-i", INITIATOR, url])
        .stdin(Stdio::null())
        .output()
        .context("running iscsi-perf")?;
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid)? - cpu0;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "iscsi-perf failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((parse_iscsi_perf(&text)?, cpu, elapsed))
}

/// The last "iops average N" of iscsi-perf's report.
fn parse_iscsi_perf(text: &str) -> anyhow::Result<f64> {
    text.rmatch_indices("iops average ")
        .next()
        .and_then(|(i, m)| text[i + m.len()..].split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .context("no \"iops average\" in iscsi-perf's output")
}

// ------------------------------------------------------------------ runner

struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the comparison; `Ok(false)` when netbootd failed a check.
pub(crate) fn run(a: &CompareArgs) -> anyhow::Result<bool> {
    sandbox::catch_signals()?;
    let reps = a.reps.unwrap_or(if a.quick { 1 } else { 3 }).max(1);
    let secs = a.seconds.unwrap_or(if a.quick { 2.0 } else { 8.0 });
    let ramp = Duration::from_secs_f64(if a.quick { 0.5 } else { 1.0 });
    let dur = Duration::from_secs_f64(secs);
    let size = a.size_mib.unwrap_or(if a.quick { 64 } else { 1024 }) << 20;
    let workloads: Vec<Workload> = WORKLOADS
        .into_iter()
        .filter(|w| a.workloads.is_empty() || a.workloads.iter().any(|n| n == w.name))
        .collect();
    ensure!(
        !workloads.is_empty(),
        "no such workload; known: {}",
        WORKLOADS.map(|w| w.name).join(", ")
    );
    let netbootd = crate::tftp::compare::netbootd(a.netbootd.as_ref())?;
    let work = match &a.work_dir {
        Some(d) => d.clone(),
        None => crate::tftp::compare::target_dir()?,
    };
    let dir = work
        .join("iscsi-bench")
        .join(format!("run-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let _scratch = Scratch(dir.clone());

    let machine = crate::tftp::compare::machine();
    say(format!(
        "{reps} repetition(s), {secs} s per run (+{} s ramp), image {} MiB; {machine}",
        ramp.as_secs_f64(),
        size >> 20
    ));

    let nb = Netbootd::start(&netbootd, &dir, size)?;
    say(format!("filling {} with random data", nb.image.display()));
    fill_image(&nb.image, size)?;
    let nb_target = format!("iqn.2026-01.org.netboot:{IMAGE}");
    check_data(&nb.iscsi, &nb_target, 0, size).context("netbootd's data check")?;

    let tgtd = if !sandbox::is_root() {
        loud("tgtd needs root (its control socket is under /var/run/tgtd)");
        None
    } else if !have("tgtd") || !have("tgtadm") {
        loud("tgtd is not installed (Debian package tgt; `cargo xtask setup` installs it)");
        None
    } else {
        let t = Tgtd::start(&dir, &nb.image)?;
        check_data(&t.portal, TGT_IQN, 1, size).context("tgtd's data check")?;
        Some(t)
    };
    let fio_ok = !a.no_fio && have("fio");
    if !a.no_fio && !fio_ok {
        loud("fio is not installed: no raw-file upper bound");
    }

    let mut who = vec![Who::Netboot];
    if tgtd.is_some() {
        who.push(Who::Tgtd);
    }
    if fio_ok {
        who.extend([Who::FioUring, Who::FioPsync]);
    }
    who.push(Who::TcpPair);
    let mut results: BTreeMap<(usize, Who), Vec<Measure>> = BTreeMap::new();
    for rep in 0..reps {
        for (wi, w) in workloads.iter().enumerate() {
            let mut order = who.clone();
            order.rotate_left((rep + wi) % who.len());
            for &x in &order {
                if x == Who::TcpPair && w.pattern != Pattern::SeqRead {
                    continue;
                }
                let m = match x {
                    Who::Netboot => load(
                        &nb.iscsi,
                        &nb_target,
                        0,
                        *w,
                        size,
                        (ramp, dur),
                        nb.server.pid(),
                    ),
                    Who::Tgtd => {
                        let t = tgtd.as_ref().context("tgtd")?;
                        load(&t.portal, TGT_IQN, 1, *w, size, (ramp, dur), t.server.pid())
                    }
                    Who::FioUring => fio("io_uring", *w, &nb.image, size, (ramp, dur)),
                    Who::FioPsync => fio("psync", *w, &nb.image, size, (ramp, dur)),
                    Who::TcpPair => tcp_pair(*w, &nb.image, (ramp, dur)),
                }
                .with_context(|| format!("{} {}", x.name(), w.name))?;
                say(format!(
                    "rep {rep} {} {}: {:.0} IOPS, {:.1} MB/s, p50 {} us, p99 {} us, CPU {} % ({} us/IO)",
                    w.name,
                    x.name(),
                    m.iops,
                    m.mbs,
                    Fig(m.p50_us, 0),
                    Fig(m.p99_us, 0),
                    Fig(m.cpu_pct(), 0),
                    Fig(m.cpu_us_per_io(), 1)
                ));
                results.entry((wi, x)).or_default().push(m);
            }
        }
    }

    // The real-initiator cross-check: iscsi-perf, 4 KiB random read at QD32.
    let mut perf_rows = Vec::new();
    if have("iscsi-perf") {
        let psecs = secs.ceil() as u64;
        let mut targets = vec![(
            Who::Netboot,
            format!("iscsi://{}/{nb_target}/0", nb.iscsi),
            nb.server.pid(),
        )];
        if let Some(t) = &tgtd {
            targets.push((
                Who::Tgtd,
                format!("iscsi://{}/{TGT_IQN}/1", t.portal),
                t.server.pid(),
            ));
        }
        for rep in 0..reps {
            for (x, url, pid) in &targets {
                let (iops, cpu, el) = iscsi_perf(url, psecs, *pid)
                    .with_context(|| format!("iscsi-perf against {}", x.name()))?;
                say(format!(
                    "rep {rep} iscsi-perf -m 32 -b 8 -r {}: {iops:.0} IOPS, CPU {:.0} %",
                    x.name(),
                    cpu / el * 100.0
                ));
                perf_rows.push((*x, iops, cpu / el * 100.0));
            }
        }
    } else {
        loud(
            "iscsi-perf is not installed (Debian package libiscsi-bin): no real-initiator cross-check",
        );
    }

    report(&workloads, &who, &results, &perf_rows, reps, secs, &machine)?;
    let nb_ok = workloads.iter().enumerate().all(|(wi, _)| {
        results
            .get(&(wi, Who::Netboot))
            .is_some_and(|v| v.iter().all(|m| m.iops > 0.0))
    });
    if !nb_ok {
        say("FAILED: netbootd completed no IO in some run");
    }
    Ok(nb_ok)
}

#[allow(clippy::print_stdout, reason = "the tables are the report")]
fn report(
    workloads: &[Workload],
    who: &[Who],
    results: &BTreeMap<(usize, Who), Vec<Measure>>,
    perf_rows: &[(Who, f64, f64)],
    reps: usize,
    secs: f64,
    machine: &str,
) -> anyhow::Result<()> {
    let med = |wi: usize, x: Who, f: &dyn Fn(&Measure) -> f64| {
        results
            .get(&(wi, x))
            .map_or(f64::NAN, |v| median(v.iter().map(f).collect()))
    };
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "\n### iSCSI: {reps} run(s) of {secs} s per workload, medians\n\n{machine}\n"
    )?;
    writeln!(
        out,
        "| workload | server | IOPS | MB/s | p50 us | p99 us | target CPU % | CPU us/IO |"
    )?;
    writeln!(out, "|---|---|---|---|---|---|---|---|")?;
    for (wi, w) in workloads.iter().enumerate() {
        for &x in who {
            writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                w.name,
                x.name(),
                Fig(med(wi, x, &|m| m.iops), 0),
                Fig(med(wi, x, &|m| m.mbs), 1),
                Fig(med(wi, x, &|m| m.p50_us), 0),
                Fig(med(wi, x, &|m| m.p99_us), 0),
                Fig(med(wi, x, &|m| m.cpu_pct()), 0),
                Fig(med(wi, x, &|m| m.cpu_us_per_io()), 1),
            )?;
        }
    }
    writeln!(
        out,
        "\n| workload | netbootd / tgtd (IOPS) | netbootd / raw io_uring | netbootd / raw psync | CPU per IO netbootd / tgtd | netbootd / plain TCP pair | plain TCP pair / raw io_uring |"
    )?;
    writeln!(out, "|---|---|---|---|---|---|---|")?;
    for (wi, w) in workloads.iter().enumerate() {
        let nb = med(wi, Who::Netboot, &|m| m.iops);
        let r = |x: Who| Fig(nb / med(wi, x, &|m| m.iops), 2);
        writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} |",
            w.name,
            r(Who::Tgtd),
            r(Who::FioUring),
            r(Who::FioPsync),
            Fig(
                med(wi, Who::Netboot, &|m| m.cpu_us_per_io())
                    / med(wi, Who::Tgtd, &|m| m.cpu_us_per_io()),
                2
            ),
            r(Who::TcpPair),
            Fig(
                med(wi, Who::TcpPair, &|m| m.iops) / med(wi, Who::FioUring, &|m| m.iops),
                2
            ),
        )?;
    }
    if !perf_rows.is_empty() {
        writeln!(
            out,
            "\n| iscsi-perf -m 32 -b 8 -r (4 KiB random read, QD32) | IOPS | target CPU % |"
        )?;
        writeln!(out, "|---|---|---|")?;
        for x in [Who::Netboot, Who::Tgtd] {
            let rows: Vec<_> = perf_rows.iter().filter(|r| r.0 == x).collect();
            if rows.is_empty() {
                continue;
            }
            writeln!(
                out,
                "| {} | {:.0} | {:.0} |",
                x.name(),
                median(rows.iter().map(|r| r.1).collect()),
                median(rows.iter().map(|r| r.2).collect()),
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iscsi_perf_reports_are_read() {
        let t = "00:00:01 - lba 1, iops current 24960 (97 MB/s), iops average 27037 (105 MB/s), in_flight 32, busy 0        iops average 27625 (107 MB/s)   \n\nfinished.\n";
        assert!((parse_iscsi_perf(t).expect("parses") - 27625.0).abs() < 1e-9);
        assert!(parse_iscsi_perf("nothing").is_err());
    }

    #[test]
    fn own_cpu_time_is_read() {
        let mut x = 0u64;
        for i in 0..3_000_000u64 {
            x = x.wrapping_add(mix(i));
        }
        assert_ne!(x, 1);
        assert!(cpu_seconds(std::process::id()).expect("stat") >= 0.0);
    }

    #[test]
    fn medians() {
        assert!((median(vec![3.0, 1.0, 2.0]) - 2.0).abs() < 1e-12);
        assert!((median(vec![4.0, 1.0, 2.0, 3.0]) - 2.5).abs() < 1e-12);
        assert!(median(vec![]).is_nan());
    }
}
