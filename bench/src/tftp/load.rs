//! `netboot-bench tftp-load`: N concurrent TFTP clients fetching one file lock-step, as
//! iPXE does (RRQ with blksize and tsize, ACK 0 on OACK, ACK every block), all driven by
//! one tokio thread (epoll), each from its own UDP socket.
//!
//! A client retransmits its last packet (RRQ or ACK) when nothing new arrives within the
//! timeout and gives up after `--retries` retransmissions in a row. It checks every
//! byte against the expected content (generated from `--seed`, or read from `--expect`),
//! the size against tsize, and answers packets from any other transfer ID with ERROR 5
//! (RFC 1350 §4), which also ends the extra transfers some servers start for a
//! retransmitted RRQ.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::net::UdpSocket;

use super::wire::{self, Incoming};
use super::{DEFAULT_SEED, LoadReport, content};

/// Options of `tftp-load`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct LoadArgs {
    /// Server address (its listening port).
    #[arg(long)]
    pub(crate) server: SocketAddr,
    /// Concurrent clients, each with its own socket.
    #[arg(long, default_value_t = 100)]
    pub(crate) clients: usize,
    /// File to fetch.
    #[arg(long)]
    pub(crate) file: String,
    /// Expected size in bytes; the expected content is generated from --seed.
    #[arg(long, required_unless_present = "expect")]
    pub(crate) size: Option<usize>,
    /// Seed of the expected content (see `tftp-compare`, which writes such files).
    #[arg(long, default_value_t = DEFAULT_SEED)]
    pub(crate) seed: u64,
    /// Compare against this local file instead of generated content.
    #[arg(long, conflicts_with = "size")]
    pub(crate) expect: Option<PathBuf>,
    /// blksize to ask for (RFC 2348); iPXE asks for 1432.
    #[arg(long, default_value_t = 1432)]
    pub(crate) blksize: u16,
    /// windowsize to ask for (RFC 7440); not sent when absent, as iPXE does.
    #[arg(long)]
    pub(crate) windowsize: Option<u16>,
    /// Retransmission timeout of the client, milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub(crate) timeout_ms: u64,
    /// Retransmissions in a row before a client gives up.
    #[arg(long, default_value_t = 5)]
    pub(crate) retries: u32,
    /// Runtime threads driving the clients (1 or 2 is plenty).
    #[arg(long, default_value_t = 1)]
    pub(crate) threads: usize,
    /// Bind every client to 127.0.0.1 instead of one loopback address per client
    /// (127.100.x.y, like a boot storm of distinct machines).
    #[arg(long)]
    pub(crate) same_source: bool,
    /// Print the report as one JSON line on stdout (the summary always goes to stderr).
    #[arg(long)]
    pub(crate) json: bool,
}

/// How one client ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Failure {
    Timeout,
    ServerError(u16),
    Corrupt,
    WrongSize,
    Protocol,
    Io,
}

impl Failure {
    fn label(&self) -> String {
        match self {
            Self::Timeout => "timeout".into(),
            Self::ServerError(c) => format!("server_error_{c}"),
            Self::Corrupt => "corrupt".into(),
            Self::WrongSize => "wrong_size".into(),
            Self::Protocol => "protocol".into(),
            Self::Io => "io".into(),
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    retransmits: u64,
    duplicates: u64,
    stray: u64,
}

struct Outcome {
    result: Result<(), Failure>,
    latency: Duration,
    bytes: u64,
    blksize: usize,
    counters: Counters,
}

/// What every client shares.
struct Spec {
    server: SocketAddr,
    file: String,
    expected: Arc<[u8]>,
    blksize: u16,
    windowsize: Option<u16>,
    timeout: Duration,
    retries: u32,
}

/// The address client `i` binds to.
fn source(server: SocketAddr, i: usize, same: bool) -> anyhow::Result<SocketAddr> {
    let ip = match server.ip() {
        IpAddr::V4(v4) if v4.is_loopback() && !same => {
            anyhow::ensure!(i < 254 * 256, "at most {} clients", 254 * 256);
            let hi = u8::try_from(i / 254).context("client index")?;
            let lo = u8::try_from(i % 254 + 1).context("client index")?;
            IpAddr::V4(Ipv4Addr::new(127, 100, hi, lo))
        }
        IpAddr::V4(v4) if v4.is_loopback() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::from([0u16; 8]),
    };
    Ok(SocketAddr::new(ip, 0))
}

/// One client: fetches the file and checks it.
async fn fetch(sock: UdpSocket, spec: Arc<Spec>) -> Outcome {
    let start = Instant::now();
    let mut c = Counters::default();
    let mut blksize = 512usize;
    let mut bytes = 0u64;
    let result = fetch_inner(&sock, &spec, &mut c, &mut blksize, &mut bytes).await;
    Outcome {
        result,
        latency: start.elapsed(),
        bytes,
        blksize,
        counters: c,
    }
}

async fn fetch_inner(
    sock: &UdpSocket,
    spec: &Spec,
    c: &mut Counters,
    blksize: &mut usize,
    verified: &mut u64,
) -> Result<(), Failure> {
    let io = |_| Failure::Io;
    let mut options = vec![
        ("blksize", spec.blksize.to_string()),
        ("tsize", "0".to_owned()),
    ];
    if let Some(w) = spec.windowsize {
        options.push(("windowsize", w.to_string()));
    }
    let mut last: Vec<u8> = wire::rrq(&spec.file, &options);
    let mut dest = spec.server;
    sock.send_to(&last, dest).await.map_err(io)?;

    let expected = &spec.expected[..];
    let mut tid: Option<SocketAddr> = None;
    let mut window = 1usize;
    let mut started = false; // an OACK or the first DATA arrived
    let mut block: u16 = 0; // last block received in order
    let mut offset = 0usize;
    let mut in_window = 0usize;
    let mut reacked = false;
    let mut retries = 0u32;
    let mut deadline = Instant::now() + spec.timeout;
    let mut buf = vec![0u8; 65_536];
    loop {
        let received = tokio::time::timeout_at(deadline.into(), sock.recv_from(&mut buf[..])).await;
        let (n, from) = match received {
            Err(_elapsed) => {
                retries += 1;
                if retries > spec.retries {
                    if let Some(t) = tid {
                        let _ = sock.send_to(&wire::error(0, "timed out"), t).await;
                    }
                    return Err(Failure::Timeout);
                }
                c.retransmits += 1;
                sock.send_to(&last, dest).await.map_err(io)?;
                deadline = Instant::now() + spec.timeout;
                reacked = false;
                continue;
            }
            Ok(r) => r.map_err(io)?,
        };
        let server_tid = match tid {
            Some(t) if t == from => t,
            Some(_) => {
                c.stray += 1;
                let _ = sock
                    .send_to(&wire::error(5, "unknown transfer ID"), from)
                    .await;
                continue;
            }
            None if from.ip() == spec.server.ip() => {
                tid = Some(from);
                from
            }
            None => continue,
        };
        match wire::parse(&buf[..n]) {
            Some(Incoming::Oack(opts)) if !started || (block == 0 && offset == 0) => {
                if !started {
                    started = true;
                    for (name, value) in &opts {
                        let v: usize = value.parse().map_err(|_| Failure::Protocol)?;
                        match name.as_str() {
                            "blksize" if (8..=usize::from(spec.blksize)).contains(&v) => {
                                *blksize = v;
                            }
                            "windowsize" if spec.windowsize.is_some_and(|w| v <= w.into()) => {
                                window = v.max(1);
                            }
                            "tsize" if v == expected.len() => {}
                            "tsize" => {
                                let _ = sock.send_to(&wire::error(8, "bad tsize"), from).await;
                                return Err(Failure::WrongSize);
                            }
                            // Unrequested or out-of-range options: RFC 2347 says refuse.
                            _ => {
                                let _ = sock.send_to(&wire::error(8, "bad option"), from).await;
                                return Err(Failure::Protocol);
                            }
                        }
                    }
                } else {
                    c.duplicates += 1;
                }
                last = wire::ack(0).to_vec();
                dest = server_tid;
                sock.send_to(&last, dest).await.map_err(io)?;
                retries = 0;
                deadline = Instant::now() + spec.timeout;
            }
            Some(Incoming::Data(b, payload)) => {
                if !started {
                    // The server ignored our options: RFC 1350 defaults.
                    started = true;
                    *blksize = 512;
                    window = 1;
                }
                if b != block.wrapping_add(1) {
                    c.duplicates += 1;
                    if window == 1 || !reacked {
                        // A duplicate (our ACK was lost) or a gap in a window: ACK the
                        // last block received in order (RFC 7440 §4).
                        reacked = true;
                        in_window = 0;
                        last = wire::ack(block).to_vec();
                        dest = server_tid;
                        sock.send_to(&last, dest).await.map_err(io)?;
                    }
                    continue;
                }
                let end = offset + payload.len();
                if payload.len() > *blksize || end > expected.len() {
                    let _ = sock.send_to(&wire::error(0, "too much data"), from).await;
                    return Err(Failure::WrongSize);
                }
                if payload != &expected[offset..end] {
                    let _ = sock.send_to(&wire::error(0, "corrupt data"), from).await;
                    return Err(Failure::Corrupt);
                }
                offset = end;
                *verified = offset as u64;
                block = b;
                in_window += 1;
                retries = 0;
                reacked = false;
                deadline = Instant::now() + spec.timeout;
                if payload.len() < *blksize {
                    sock.send_to(&wire::ack(b), server_tid).await.map_err(io)?;
                    return if offset == expected.len() {
                        Ok(())
                    } else {
                        Err(Failure::WrongSize)
                    };
                }
                if in_window >= window {
                    in_window = 0;
                    last = wire::ack(b).to_vec();
                    dest = server_tid;
                    sock.send_to(&last, dest).await.map_err(io)?;
                }
            }
            Some(Incoming::Error(code, _msg)) => return Err(Failure::ServerError(code)),
            Some(Incoming::Oack(_) | Incoming::Other) | None => c.duplicates += 1,
        }
    }
}

/// `p`-th percentile (0..=100) of sorted values, nearest rank.
pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// CPU time (user + system) of process `pid` (`self` for this one) so far, seconds.
pub(crate) fn proc_cpu_seconds(pid: &str) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("stat format")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| f.get(i)?.parse::<u64>().ok())
        .sum();
    // USER_HZ is 100 on every Linux architecture this runs on.
    Ok(ticks as f64 / 100.0)
}

/// CPU time (user + system) this process used so far, seconds.
pub(crate) fn own_cpu_seconds() -> f64 {
    proc_cpu_seconds("self").unwrap_or(0.0)
}

/// Runs the clients and summarises them.
pub(crate) fn run(args: &LoadArgs) -> anyhow::Result<LoadReport> {
    anyhow::ensure!(args.clients > 0, "--clients must be at least 1");
    anyhow::ensure!(
        (8..=65464).contains(&args.blksize),
        "--blksize must be 8..=65464"
    );
    let expected: Arc<[u8]> = match (&args.expect, args.size) {
        (Some(p), _) => std::fs::read(p)
            .with_context(|| format!("reading {}", p.display()))?
            .into(),
        (None, Some(n)) => content(args.seed, n).into(),
        (None, None) => anyhow::bail!("give --size or --expect"),
    };
    let spec = Arc::new(Spec {
        server: args.server,
        file: args.file.clone(),
        expected,
        blksize: args.blksize,
        windowsize: args.windowsize,
        timeout: Duration::from_millis(args.timeout_ms.max(1)),
        retries: args.retries,
    });
    let runtime = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()
    }
    .context("starting the runtime")?;
    let cpu0 = own_cpu_seconds();
    let (outcomes, wall) = runtime.block_on(async {
        // Every socket first, so that the clients start together.
        let mut sockets = Vec::with_capacity(args.clients);
        for i in 0..args.clients {
            let addr = source(args.server, i, args.same_source)?;
            let s = UdpSocket::bind(addr)
                .await
                .with_context(|| format!("binding client {i} to {addr} (ulimit -n?)"))?;
            sockets.push(s);
        }
        let t0 = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for s in sockets {
            set.spawn(fetch(s, Arc::clone(&spec)));
        }
        let mut outcomes = Vec::with_capacity(args.clients);
        while let Some(o) = set.join_next().await {
            outcomes.push(o.context("client task")?);
        }
        anyhow::Ok((outcomes, t0.elapsed()))
    })?;
    let client_cpu_s = own_cpu_seconds() - cpu0;

    let mut r = LoadReport {
        clients: args.clients,
        wall_s: wall.as_secs_f64(),
        client_cpu_s,
        ..LoadReport::default()
    };
    let mut lat = Vec::new();
    for o in &outcomes {
        r.client_retransmits += o.counters.retransmits;
        r.duplicates += o.counters.duplicates;
        r.stray += o.counters.stray;
        *r.blksize.entry(o.blksize.to_string()).or_default() += 1;
        match &o.result {
            Ok(()) => {
                r.ok += 1;
                r.bytes += o.bytes;
                lat.push(o.latency.as_secs_f64());
            }
            Err(f) => {
                if matches!(f, Failure::Corrupt | Failure::WrongSize) {
                    r.corrupt += 1;
                }
                *r.failures.entry(f.label()).or_default() += 1;
            }
        }
    }
    lat.sort_by(f64::total_cmp);
    r.p50_s = percentile(&lat, 50.0);
    r.p99_s = percentile(&lat, 99.0);
    r.max_s = lat.last().copied().unwrap_or(0.0);
    r.goodput_mbs = r.bytes as f64 / 1e6 / r.wall_s.max(1e-9);
    Ok(r)
}

/// Human summary of a report.
pub(crate) fn summary(r: &LoadReport) -> String {
    let failures: BTreeMap<&str, usize> =
        r.failures.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    format!(
        "{} clients: {} ok, {} failed {:?}, {} corrupt; wall {:.3} s; latency p50 {:.3} s, p99 {:.3} s, max {:.3} s; goodput {:.1} MB/s; client retransmits {}, duplicates {}, stray {}; blksize {:?}; client CPU {:.2} s",
        r.clients,
        r.ok,
        r.clients - r.ok,
        failures,
        r.corrupt,
        r.wall_s,
        r.p50_s,
        r.p99_s,
        r.max_s,
        r.goodput_mbs,
        r.client_retransmits,
        r.duplicates,
        r.stray,
        r.blksize,
        r.client_cpu_s
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[3.0], 99.0), 3.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }

    /// netboot's TFTP service on 127.0.0.1 (its own runtime thread), serving `files`.
    struct Served {
        addr: SocketAddr,
        stop: tokio::sync::watch::Sender<bool>,
        thread: Option<std::thread::JoinHandle<()>>,
        dir: PathBuf,
    }

    impl Served {
        fn start(name: &str, files: &[(&str, Vec<u8>)]) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("netboot-bench-test-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("temp dir");
            for (f, data) in files {
                std::fs::write(dir.join(f), data).expect("write test file");
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind the server");
            let addr = sock.local_addr().expect("server address");
            let (stop, rx) = tokio::sync::watch::channel(false);
            let tftp = Arc::new(netboot_daemon::service::tftp::Tftp::new(
                &netboot_daemon::config::TftpConfig::default(),
                dir.clone(),
            ));
            // The daemon's default driver (io_uring, tokio where no ring can be set up).
            let thread = std::thread::spawn(move || {
                rt.block_on(async move {
                    let mut until = rx.clone();
                    let running = netboot_daemon::driver::start_tftp(
                        tftp,
                        sock,
                        netboot_daemon::config::TftpDriver::default(),
                        Duration::ZERO,
                        rx,
                    )
                    .expect("start the TFTP driver");
                    let _ = until.wait_for(|stop| *stop).await;
                    running.stop().await;
                });
            });
            Self {
                addr,
                stop,
                thread: Some(thread),
                dir,
            }
        }

        fn args(&self, file: &str, size: usize, clients: usize) -> LoadArgs {
            LoadArgs {
                server: self.addr,
                clients,
                file: file.into(),
                size: Some(size),
                seed: DEFAULT_SEED,
                expect: None,
                blksize: 1432,
                windowsize: None,
                timeout_ms: 500,
                retries: 4,
                threads: 1,
                same_source: false,
                json: false,
            }
        }
    }

    impl Drop for Served {
        fn drop(&mut self) {
            let _ = self.stop.send(true);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn fetches_and_verifies_against_netboot() {
        let size = 300_000;
        let mut bad = content(DEFAULT_SEED, size);
        bad[200_000] ^= 1;
        let s = Served::start(
            "verify",
            &[
                ("good.bin", content(DEFAULT_SEED, size)),
                ("bad.bin", bad),
                ("even.bin", content(DEFAULT_SEED, 1432 * 3)),
            ],
        );
        let r = run(&s.args("good.bin", size, 20)).expect("run");
        assert_eq!((r.ok, r.corrupt), (20, 0), "{}", summary(&r));
        assert_eq!(r.bytes, 20 * size as u64);
        assert_eq!(r.blksize.get("1432"), Some(&20));

        // A file that is an exact multiple of blksize ends with an empty block.
        let r = run(&s.args("even.bin", 1432 * 3, 2)).expect("run");
        assert_eq!(r.ok, 2, "{}", summary(&r));

        let mut windowed = s.args("good.bin", size, 3);
        windowed.windowsize = Some(16);
        let r = run(&windowed).expect("run");
        assert_eq!(r.ok, 3, "{}", summary(&r));

        // One flipped bit is caught; so is a size that does not match tsize.
        let r = run(&s.args("bad.bin", size, 2)).expect("run");
        assert_eq!((r.ok, r.corrupt), (0, 2), "{}", summary(&r));
        assert_eq!(r.failures.get("corrupt"), Some(&2));
        let r = run(&s.args("good.bin", size + 1, 1)).expect("run");
        assert_eq!(r.failures.get("wrong_size"), Some(&1), "{}", summary(&r));

        let r = run(&s.args("missing.bin", 10, 1)).expect("run");
        assert_eq!(
            r.failures.get("server_error_1"),
            Some(&1),
            "{}",
            summary(&r)
        );
    }

    #[test]
    fn gives_up_after_the_retries() {
        // Nobody answers on this port: the client retransmits its RRQ, then stops.
        let quiet = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let args = LoadArgs {
            server: quiet.local_addr().expect("address"),
            clients: 1,
            file: "x".into(),
            size: Some(1),
            seed: 1,
            expect: None,
            blksize: 512,
            windowsize: None,
            timeout_ms: 20,
            retries: 2,
            threads: 1,
            same_source: true,
            json: false,
        };
        let r = run(&args).expect("run");
        assert_eq!(r.failures.get("timeout"), Some(&1));
        assert_eq!(r.client_retransmits, 2);
        let mut buf = [0u8; 100];
        quiet.set_nonblocking(true).expect("nonblocking");
        let mut rrqs = 0;
        while quiet.recv(&mut buf).is_ok() {
            rrqs += 1;
        }
        assert_eq!(rrqs, 3, "the RRQ and two retransmissions");
    }

    #[test]
    fn clients_get_distinct_loopback_sources() {
        let server = SocketAddr::from(([127, 0, 0, 1], 69));
        assert_eq!(
            source(server, 0, false).expect("fits"),
            SocketAddr::from(([127, 100, 0, 1], 0))
        );
        assert_eq!(
            source(server, 254, false).expect("fits"),
            SocketAddr::from(([127, 100, 1, 1], 0))
        );
        assert_eq!(
            source(server, 999, true).expect("fits"),
            SocketAddr::from(([127, 0, 0, 1], 0))
        );
        assert!(source(server, 254 * 256, false).is_err());
    }
}
