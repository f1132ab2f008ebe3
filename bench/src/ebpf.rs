//! eBPF accounting benchmarks (root):
//!
//! - `ebpf-overhead`: TCP and small-UDP throughput over a veth between two network
//!   namespaces, with and without the accounting programs attached to the receiving end,
//!   in interleaved rounds (the median of each round's with/without ratio); then, attached,
//!   with the kernel's run-time statistics on, which give the programs' own run time per packet (the daemon's default samples
//!   them one second in every minute, so the plain "with" is what it costs); and TCP once
//!   more as one long stream, the programs attached and detached in alternating slices of
//!   it (without, with, with, without, ...), the median of each neighbouring pair's ratio:
//!   no connection setup or slow start in it, and load that drifts over seconds cancels
//!   within a pair of quarter-second slices;
//! - `ebpf-scrape`: the `/metrics` families of the accounting with 10 000 client MACs in the
//!   kernel table (frames from 10 000 source MACs are sent first), median time to write them.
//!
//! Sender and receiver threads are pinned to one CPU: on these 2-vCPU machines an unpinned
//! veth stream reorders packets and its throughput swings by a factor of several.

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use netboot_daemon::ebpf::{Accounting, Direction, Options, RunTimeStats, in_netns};
use netboot_daemon::mac::MacAddr;
use netboot_daemon::metrics::{Exposition, Format};

/// Options of `ebpf-overhead`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct OverheadArgs {
    /// Rounds; each runs every test once without and once with the programs (the order
    /// alternates between rounds).
    #[arg(long, default_value_t = 6)]
    rounds: usize,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Pairs of slices in the paired TCP measurement (one stream, the programs attached in
    /// one slice of each pair).
    #[arg(long, default_value_t = 120)]
    pairs: usize,
    /// Milliseconds per slice of the paired TCP measurement.
    #[arg(long, default_value_t = 250)]
    slice_ms: u64,
    /// A smoke run: 2 rounds of 0.5 s, 8 pairs of slices.
    #[arg(long)]
    quick: bool,
}

/// Options of `ebpf-cost`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct CostArgs {
    /// Runs per measurement (each kind of frame is measured 5 times; the median is shown).
    #[arg(long, default_value_t = 1_000_000)]
    repeat: u32,
    /// A smoke run: 50 000 runs per measurement.
    #[arg(long)]
    quick: bool,
}

/// Options of `ebpf-scrape`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ScrapeArgs {
    /// Client MACs in the kernel table.
    #[arg(long, default_value_t = 10_000)]
    macs: u32,
    /// Timed scrapes (the median is reported).
    #[arg(long, default_value_t = 9)]
    rounds: usize,
}

const SRV_IP: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 1);
const CLI_IP: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 2);
const SRV_MAC: &str = "02:6e:62:88:00:01";
const CLI_MAC: &str = "02:6e:62:88:00:02";
/// UDP payload of the small-datagram test: a TFTP ACK is 4 bytes, a DHCP packet ~300.
const SMALL: usize = 64;

/// Two namespaces joined by a veth pair, deleted on drop.
struct Pair {
    srv: String,
    cli: String,
}

impl Pair {
    fn create(tag: &str) -> anyhow::Result<Self> {
        let pid = std::process::id();
        let pair = Self {
            srv: format!("nbe-{tag}-srv-{pid}"),
            cli: format!("nbe-{tag}-cli-{pid}"),
        };
        for ns in [&pair.srv, &pair.cli] {
            ip(&["netns", "add", ns]).context("creating namespaces (needs root and iproute2)")?;
            in_netns(&netns_path(ns), || {
                for conf in ["all", "default"] {
                    std::fs::write(format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6"), "1")?;
                }
                Ok::<_, std::io::Error>(())
            })??;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        ip(&[
            "link", "add", "s0", "netns", &pair.srv, "address", SRV_MAC, "type", "veth", "peer",
            "name", "c0", "netns", &pair.cli, "address", CLI_MAC,
        ])?;
        for (ns, dev, addr) in [(&pair.srv, "s0", SRV_IP), (&pair.cli, "c0", CLI_IP)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        ip(&[
            "-n",
            &pair.cli,
            "neigh",
            "replace",
            &SRV_IP.to_string(),
            "lladdr",
            SRV_MAC,
            "dev",
            "c0",
            "nud",
            "permanent",
        ])?;
        ip(&[
            "-n",
            &pair.srv,
            "neigh",
            "replace",
            &CLI_IP.to_string(),
            "lladdr",
            CLI_MAC,
            "dev",
            "s0",
            "nud",
            "permanent",
        ])?;
        Ok(pair)
    }

    fn srv_path(&self) -> PathBuf {
        netns_path(&self.srv)
    }

    fn cli_path(&self) -> PathBuf {
        netns_path(&self.cli)
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for ns in [&self.srv, &self.cli] {
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("ebpf bench: WARNING: {e:#}");
            }
        }
    }
}

fn netns_path(name: &str) -> PathBuf {
    Path::new("/var/run/netns").join(name)
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Pins the calling thread to `cpu`.
fn pin_to(cpu: usize) {
    // SAFETY: the cpu_set_t is zeroed, set through the libc macro, and read by the call.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set);
    }
}

fn last_cpu() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get() - 1)
}

/// One TCP stream client → server for `secs`; returns bits per second at the receiver.
fn tcp_once(pair: &Pair, secs: f64) -> anyhow::Result<f64> {
    let listener = in_netns(&pair.srv_path(), || {
        TcpListener::bind(SocketAddrV4::new(SRV_IP, 0))
    })??;
    let port = listener.local_addr()?.port();
    let stream = in_netns(&pair.cli_path(), || {
        TcpStream::connect(SocketAddrV4::new(SRV_IP, port))
    })??;
    let cpu = last_cpu();
    let receiver = std::thread::spawn(move || -> std::io::Result<(u64, Duration)> {
        pin_to(cpu);
        let (mut conn, _) = listener.accept()?;
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        let mut start = None;
        loop {
            let n = conn.read(&mut buf)?;
            if n == 0 {
                break;
            }
            start.get_or_insert_with(Instant::now);
            total += n as u64;
        }
        Ok((total, start.map_or(Duration::ZERO, |s| s.elapsed())))
    });
    pin_to(cpu);
    let mut stream = stream;
    let buf = vec![0xa5u8; 64 * 1024];
    let until = Instant::now() + Duration::from_secs_f64(secs);
    while Instant::now() < until {
        stream.write_all(&buf)?;
    }
    stream.shutdown(std::net::Shutdown::Write)?;
    drop(stream);
    let (bytes, took) = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))??;
    ensure!(!took.is_zero(), "nothing received");
    Ok(bytes as f64 * 8.0 / took.as_secs_f64())
}

/// Small UDP datagrams client → server for `secs`; returns datagrams per second received.
fn udp_once(pair: &Pair, secs: f64) -> anyhow::Result<f64> {
    let server = in_netns(&pair.srv_path(), || {
        UdpSocket::bind(SocketAddrV4::new(SRV_IP, 0))
    })??;
    let port = server.local_addr()?.port();
    let client = in_netns(&pair.cli_path(), || {
        UdpSocket::bind(SocketAddrV4::new(CLI_IP, 0))
    })??;
    client.connect(SocketAddrV4::new(SRV_IP, port))?;
    server.set_read_timeout(Some(Duration::from_millis(200)))?;
    let cpu = last_cpu();
    let receiver = std::thread::spawn(move || -> (u64, Duration) {
        pin_to(cpu);
        let mut buf = [0u8; 2048];
        let mut n = 0u64;
        let mut first: Option<Instant> = None;
        let mut last = Instant::now();
        while server.recv(&mut buf).is_ok() {
            first.get_or_insert_with(Instant::now);
            last = Instant::now();
            n += 1;
        }
        (n, first.map_or(Duration::ZERO, |f| last - f))
    });
    pin_to(cpu);
    let payload = [0x5au8; SMALL];
    let until = Instant::now() + Duration::from_secs_f64(secs);
    while Instant::now() < until {
        // A full socket buffer drops the datagram, which is what the receiver measures.
        let _ = client.send(&payload);
    }
    let (n, took) = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))?;
    ensure!(!took.is_zero(), "nothing received");
    Ok(n as f64 / took.as_secs_f64())
}

/// One TCP stream client → server, the programs attached to the server's end in every
/// other slice of `slice` (the pattern without, with, with, without repeats, so a trend
/// over time favours neither); returns the with/without ratio of each neighbouring pair of
/// slices. A first slice, not counted, lets the stream leave slow start.
fn tcp_paired(
    pair: &Pair,
    acc: &Accounting,
    pairs: usize,
    slice: Duration,
) -> anyhow::Result<Vec<f64>> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let listener = in_netns(&pair.srv_path(), || {
        TcpListener::bind(SocketAddrV4::new(SRV_IP, 0))
    })??;
    let port = listener.local_addr()?.port();
    let mut stream = in_netns(&pair.cli_path(), || {
        TcpStream::connect(SocketAddrV4::new(SRV_IP, port))
    })??;
    let cpu = last_cpu();
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let receiver = {
        let received = Arc::clone(&received);
        std::thread::spawn(move || -> std::io::Result<()> {
            pin_to(cpu);
            let (mut conn, _) = listener.accept()?;
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = conn.read(&mut buf)?;
                if n == 0 {
                    return Ok(());
                }
                received.fetch_add(n as u64, Ordering::Relaxed);
            }
        })
    };
    let sender = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || -> std::io::Result<()> {
            pin_to(cpu);
            let buf = vec![0xa5u8; 64 * 1024];
            while !stop.load(Ordering::Relaxed) {
                stream.write_all(&buf)?;
            }
            stream.shutdown(std::net::Shutdown::Write)
        })
    };
    // This thread only switches and samples: off the streams' CPU.
    pin_to(0);
    let mut attached = false;
    let mut rates: Vec<(bool, f64)> = Vec::with_capacity(2 * pairs);
    let measured = (|| -> anyhow::Result<()> {
        std::thread::sleep(slice);
        for i in 0..2 * pairs {
            let with = matches!(i % 4, 1 | 2);
            if with && !attached {
                in_netns(&pair.srv_path(), || acc.attach("s0"))??;
                attached = true;
            } else if !with && attached {
                acc.detach_all();
                attached = false;
            }
            let (b0, t0) = (received.load(Ordering::Relaxed), Instant::now());
            std::thread::sleep(slice);
            let (b1, t1) = (received.load(Ordering::Relaxed), Instant::now());
            rates.push((with, (b1 - b0) as f64 * 8.0 / (t1 - t0).as_secs_f64()));
        }
        Ok(())
    })();
    if attached {
        acc.detach_all();
    }
    stop.store(true, Ordering::Relaxed);
    let sent = sender
        .join()
        .map_err(|_| anyhow::anyhow!("sender panicked"))?;
    let got = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))?;
    measured?;
    sent?;
    got?;
    let mut ratios = Vec::with_capacity(pairs);
    for p in rates.chunks_exact(2) {
        let (with, without) = if p[0].0 {
            (p[0].1, p[1].1)
        } else {
            (p[1].1, p[0].1)
        };
        ensure!(
            without > 0.0,
            "a slice without the programs received nothing"
        );
        ratios.push(with / without);
    }
    Ok(ratios)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub(crate) fn overhead(args: &OverheadArgs) -> anyhow::Result<bool> {
    let (rounds, secs, pairs) = if args.quick {
        (2, 0.5, 8)
    } else {
        (args.rounds.max(1), args.seconds, args.pairs.max(1))
    };
    let slice = Duration::from_millis(args.slice_ms.max(10));
    let pair = Pair::create("o")?;
    // As the daemon runs by default (`ebpf.run_time_stats = "sampled"`, off 59 s in 60):
    // run-time statistics off while throughput is compared; on in a third measurement.
    let options = Options {
        run_time_stats: RunTimeStats::Off,
        ..Options::new(4096)
    };
    let acc = Accounting::load(&options).context("loading the eBPF object")?;
    // Without, with, and with run-time statistics on.
    let mut tcp: [Vec<f64>; 3] = Default::default();
    let mut udp: [Vec<f64>; 3] = Default::default();
    let (mut run_time, mut runs) = (Duration::ZERO, 0u64);
    for round in 0..rounds {
        let order = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for with in order {
            if !with {
                tcp[0].push(tcp_once(&pair, secs)?);
                udp[0].push(udp_once(&pair, secs)?);
                continue;
            }
            in_netns(&pair.srv_path(), || acc.attach("s0"))??;
            tcp[1].push(tcp_once(&pair, secs)?);
            udp[1].push(udp_once(&pair, secs)?);
            acc.start_measuring()
                .context("turning the kernel's run-time statistics on")?;
            let before = acc.program_stats()?;
            tcp[2].push(tcp_once(&pair, secs)?);
            udp[2].push(udp_once(&pair, secs)?);
            let after = acc.program_stats()?;
            acc.stop_measuring();
            for (a, b) in after.iter().zip(&before) {
                run_time += a.run_time.saturating_sub(b.run_time);
                runs += a.run_count - b.run_count;
            }
            acc.detach_all();
        }
        eprintln!(
            "ebpf-overhead: round {}/{rounds}: TCP {:.2} / {:.2} / {:.2} Gbit/s, UDP {SMALL} B {:.0} / {:.0} / {:.0} kpps (without / with / with run-time statistics)",
            round + 1,
            tcp[0][round] / 1e9,
            tcp[1][round] / 1e9,
            tcp[2][round] / 1e9,
            udp[0][round] / 1e3,
            udp[1][round] / 1e3,
            udp[2][round] / 1e3,
        );
    }
    // Each round measures every condition back to back, so the ratio within a round is
    // free of the load drifting between rounds (other work shares the machine); the
    // result is the median of the rounds' ratios.
    let ratio = |v: &[Vec<f64>; 3], with: usize| {
        let mut r: Vec<f64> = v[with].iter().zip(&v[0]).map(|(w, o)| w / o).collect();
        median(&mut r)
    };
    let (tr1, tr2, ur1, ur2) = (
        ratio(&tcp, 1),
        ratio(&tcp, 2),
        ratio(&udp, 1),
        ratio(&udp, 2),
    );
    let [t0, t1, t2] = tcp.map(|mut v| median(&mut v));
    let [u0, u1, u2] = udp.map(|mut v| median(&mut v));
    let per_packet = if runs == 0 {
        0.0
    } else {
        run_time.as_nanos() as f64 / runs as f64
    };
    let mut paired = tcp_paired(&pair, &acc, pairs, slice)?;
    let paired_median = median(&mut paired);
    let (lo, hi) = (paired[paired.len() / 4], paired[paired.len() * 3 / 4]);
    eprintln!(
        "ebpf-overhead: {rounds} interleaved rounds of {secs} s; with/without is the median of the rounds' ratios:\n  \
         TCP: with/without {tr1:.3}, with run-time statistics {tr2:.3} (medians: without {:.2} Gbit/s, with {:.2}, with statistics {:.2})\n  \
         UDP {SMALL}-byte datagrams: with/without {ur1:.3}, with run-time statistics {ur2:.3} (medians: without {:.0} pps, with {:.0}, with statistics {:.0})\n  \
         program run time: {per_packet:.0} ns per packet over {runs} runs (kernel BPF stats)\n  \
         TCP, one stream in {pairs} pairs of {} ms slices, attached in one of each: with/without {paired_median:.3} (median of the pairs' ratios; quartiles {lo:.3}, {hi:.3})",
        t0 / 1e9,
        t1 / 1e9,
        t2 / 1e9,
        u0,
        u1,
        u2,
        slice.as_millis(),
    );
    if runs == 0 {
        bail!("the programs never ran while attached");
    }
    Ok(true)
}

/// An Ethernet frame between [`CLI_MAC`]/[`CLI_IP`] and [`SRV_MAC`]/[`SRV_IP`] as the
/// server's interface sees it, optionally 802.1Q-tagged (VLAN 10) inside the data.
struct Frame {
    to_server: bool,
    vlan: bool,
    protocol: u8,
    client_port: u16,
    server_port: u16,
    payload: Vec<u8>,
}

impl Frame {
    fn bytes(&self) -> Vec<u8> {
        let mac = |m: &str| m.parse::<MacAddr>().map_or([0; 6], |m| m.0);
        let (src_mac, dst_mac, src_ip, dst_ip, src_port, dst_port) = if self.to_server {
            (
                CLI_MAC,
                SRV_MAC,
                CLI_IP,
                SRV_IP,
                self.client_port,
                self.server_port,
            )
        } else {
            (
                SRV_MAC,
                CLI_MAC,
                SRV_IP,
                CLI_IP,
                self.server_port,
                self.client_port,
            )
        };
        let mut f = mac(dst_mac).to_vec();
        f.extend(mac(src_mac));
        if self.vlan {
            f.extend([0x81, 0x00, 0x00, 10]);
        }
        f.extend([0x08, 0x00]);
        let l4_len = if self.protocol == libc::IPPROTO_UDP as u8 {
            8
        } else {
            20
        } + self.payload.len();
        let total = u16::try_from(20 + l4_len).unwrap_or(u16::MAX);
        let mut ip = vec![0x45, 0];
        ip.extend(total.to_be_bytes());
        ip.extend([0, 1, 0x40, 0, 64, self.protocol, 0, 0]);
        ip.extend(src_ip.octets());
        ip.extend(dst_ip.octets());
        let sum = !ip
            .chunks(2)
            .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
            .fold(0u32, |a, b| {
                let s = a + b;
                (s & 0xffff) + (s >> 16)
            }) as u16;
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        f.extend(ip);
        f.extend(src_port.to_be_bytes());
        f.extend(dst_port.to_be_bytes());
        if self.protocol == libc::IPPROTO_UDP as u8 {
            f.extend(u16::try_from(l4_len).unwrap_or(u16::MAX).to_be_bytes());
            f.extend([0, 0]);
        } else {
            // seq, ack, data offset 5, PSH|ACK, window, checksum, urgent pointer.
            f.extend([0, 0, 0, 1, 0, 0, 0, 1, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]);
        }
        f.extend(&self.payload);
        f
    }
}

/// The kinds of frames `ebpf-cost` times: (what, frame).
fn cost_frames() -> Vec<(&'static str, Frame)> {
    let udp = libc::IPPROTO_UDP as u8;
    let tcp = libc::IPPROTO_TCP as u8;
    let frame = |to_server, protocol, server_port, payload: Vec<u8>| Frame {
        to_server,
        vlan: false,
        protocol,
        client_port: 40_000,
        server_port,
        payload,
    };
    // A DHCPDISCOVER's fixed BOOTP header: op 1, Ethernet, chaddr = the client's MAC.
    let mut bootp = vec![0u8; 300];
    bootp[..4].copy_from_slice(&[1, 1, 6, 0]);
    bootp[28..34].copy_from_slice(&[0x02, 0x6e, 0x62, 0x88, 0x00, 0x02]);
    let mut dhcp = frame(true, udp, 67, bootp);
    dhcp.client_port = 68;
    vec![
        (
            "UDP, 64-byte payload, no service port (other)",
            frame(true, udp, 40_001, vec![0x5a; SMALL]),
        ),
        (
            "the same, 802.1Q-tagged in the data",
            Frame {
                vlan: true,
                ..frame(true, udp, 40_001, vec![0x5a; SMALL])
            },
        ),
        ("DHCPDISCOVER to 67 (client from chaddr)", dhcp),
        (
            "TFTP RRQ to 69 (connection row too)",
            frame(true, udp, 69, b"\0\x01pxe.bin\0octet\0".to_vec()),
        ),
        (
            "TCP segment to HTTP 8080, 1448 B",
            frame(true, tcp, 8080, vec![0x5a; 1448]),
        ),
        (
            "TCP segment to iSCSI 3260, 1448 B",
            frame(true, tcp, 3260, vec![0x5a; 1448]),
        ),
    ]
}

/// Each kind of frame through the ingress program in the kernel (`BPF_PROG_TEST_RUN`):
/// the program's own cost, without TCX dispatch, run-time statistics or the network stack.
pub(crate) fn cost(args: &CostArgs) -> anyhow::Result<bool> {
    let repeat = if args.quick {
        50_000
    } else {
        args.repeat.max(1)
    };
    let options = Options {
        run_time_stats: RunTimeStats::Off,
        ..Options::new(4096)
    };
    let acc = Accounting::load(&options).context("loading the eBPF object")?;
    let mut table = String::from("| frame | ns per run (median of 5) |\n|---|---|\n");
    for (what, frame) in cost_frames() {
        let bytes = frame.bytes();
        let mut runs = (0..5)
            .map(|_| {
                acc.test_run(Direction::Ingress, &bytes, repeat)
                    .map(|d| d.as_nanos() as f64)
            })
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("test run of: {what}"))?;
        let ns = median(&mut runs);
        eprintln!("ebpf-cost: {what}: {ns:.0} ns");
        table.push_str(&format!("| {what} | {ns:.0} |\n"));
    }
    // The frames must have been counted as what they are, or the figures time something else.
    let rows = acc.mac_counters()?;
    let services: std::collections::BTreeSet<_> = rows.iter().map(|r| r.service.as_str()).collect();
    ensure!(
        ["dhcp", "http", "iscsi", "other", "tftp"]
            .iter()
            .all(|s| services.contains(s)),
        "the test frames were not counted as expected: services {services:?}"
    );
    #[allow(clippy::print_stdout, reason = "the table is the requested output")]
    {
        print!("{table}");
    }
    Ok(true)
}

/// A raw AF_PACKET socket sending on one interface (of the namespace it was opened in).
struct PacketSocket {
    fd: OwnedFd,
    ifindex: i32,
}

impl PacketSocket {
    fn open(iface: &str) -> std::io::Result<Self> {
        // SAFETY: socket(2) with constant arguments; the result is checked before use.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let name = std::ffi::CString::new(iface)?;
        // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self {
            fd,
            ifindex: i32::try_from(ifindex).map_err(std::io::Error::other)?,
        })
    }

    fn send(&self, frame: &[u8]) -> std::io::Result<()> {
        // SAFETY: sockaddr_ll is plain integers, for which all-zero is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = self.ifindex;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: the buffer and length describe `frame`, and `addr` is a valid sockaddr_ll;
        // all outlive the call.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if sent < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

pub(crate) fn scrape(args: &ScrapeArgs) -> anyhow::Result<bool> {
    let pair = Pair::create("s")?;
    // Each client sends one kind of frame in one direction: one row each.
    let acc = std::sync::Arc::new(
        Accounting::load(&Options::new(args.macs.max(64) * 2))
            .context("loading the eBPF object")?,
    );
    in_netns(&pair.srv_path(), || acc.attach("s0"))??;
    let macs = args.macs;
    in_netns(&pair.cli_path(), || -> std::io::Result<()> {
        let socket = PacketSocket::open("c0")?;
        let dst: [u8; 6] = [0x02, 0x6e, 0x62, 0x88, 0x00, 0x01];
        for i in 0..macs {
            let [_, b, c, d] = i.to_be_bytes();
            let mut frame = Vec::with_capacity(64);
            frame.extend_from_slice(&dst);
            frame.extend_from_slice(&[0x02, 0x6e, 0x63, b, c, d]);
            // The IEEE local experimental EtherType: counted as `other`, answered by nobody.
            frame.extend_from_slice(&0x88b5u16.to_be_bytes());
            frame.resize(60, 0);
            socket.send(&frame)?;
        }
        Ok(())
    })??;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let rows = acc.mac_counters()?.len() as u32;
        if rows >= macs {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "only {rows} of {macs} clients counted"
        );
        std::thread::yield_now();
    }
    let counters =
        netboot_daemon::service::accounting::Counters::Kernel(std::sync::Arc::clone(&acc));
    let mut times = Vec::new();
    let mut size = 0;
    for _ in 0..args.rounds.max(1) {
        let start = Instant::now();
        let mut e = Exposition::new(Format::OpenMetrics);
        netboot_daemon::service::accounting::write_metrics(&counters, &mut e, macs as usize);
        let text = e.finish();
        times.push(start.elapsed().as_secs_f64() * 1e3);
        size = text.len();
    }
    let m = median(&mut times);
    eprintln!(
        "ebpf-scrape: {macs} client MACs: the accounting families ({size} bytes of OpenMetrics) in {m:.1} ms (median of {}; min {:.1}, max {:.1})",
        times.len(),
        times[0],
        times[times.len() - 1]
    );
    Ok(m < 50.0)
}
