//! `dhcp-compare`: netbootd's DHCP server against dnsmasq, with Kea's `perfdhcp` as the
//! load generator (DISCOVER-OFFER-REQUEST-ACK exchanges from many simulated clients).
//!
//! Each run gets a fresh pair of network namespaces joined by a veth (server side
//! 10.66.0.1/16, perfdhcp on the other side), a fresh data directory (so every lease is
//! new and written to the server's lease store), and a cgroup v2 that counts the
//! server's CPU. Servers alternate within each repetition; results are medians.
//!
//! Two scenarios: a fixed offered rate (the server keeps up: drops and latency matter)
//! and a saturating rate (what the server sustains and what each lease costs in CPU).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::tftp::sandbox::{
    Cgroup, Server, catch_signals, command, interrupted, is_root, run_timed,
};

/// Options of `dhcp-compare`.
#[derive(Debug, clap::Args)]
pub(crate) struct CompareArgs {
    /// A short smoke run for CI: one repetition of 3 s at 300 exchanges/s, 2000 clients.
    #[arg(long)]
    quick: bool,
    /// Repetitions (medians are reported).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Seconds of load per run.
    #[arg(long, default_value_t = 10)]
    seconds: u32,
    /// Offered rate of the fixed-rate scenario, exchanges per second.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Offered rate of the saturating scenario.
    #[arg(long, default_value_t = 20000)]
    max_rate: u32,
    /// Distinct simulated clients (MAC addresses).
    #[arg(long, default_value_t = 20000)]
    clients: u32,
    /// The netbootd binary (default: target/release/netbootd).
    #[arg(long)]
    netbootd: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Peer {
    Netboot,
    Dnsmasq,
}

impl Peer {
    fn name(self) -> &'static str {
        match self {
            Self::Netboot => "netboot",
            Self::Dnsmasq => "dnsmasq",
        }
    }
}

/// One perfdhcp run, as it reports it.
#[derive(Debug, Clone, Default)]
struct Run {
    /// Achieved 4-way exchanges per second.
    rate: f64,
    discover_sent: u64,
    offers: u64,
    requests: u64,
    acks: u64,
    /// Average DISCOVER→OFFER and REQUEST→ACK delays, ms.
    do_delay_ms: f64,
    ra_delay_ms: f64,
    /// Server CPU during the run, seconds.
    cpu_s: f64,
}

impl Run {
    /// Share of DISCOVERs that ended in an ACK.
    fn completion(&self) -> f64 {
        if self.discover_sent == 0 {
            0.0
        } else {
            self.acks as f64 / self.discover_sent as f64
        }
    }

    /// Server CPU per thousand acknowledged leases, ms.
    fn cpu_ms_per_1000(&self) -> f64 {
        if self.acks == 0 {
            f64::NAN
        } else {
            self.cpu_s * 1e6 / self.acks as f64
        }
    }
}

/// Reads perfdhcp's report.
fn parse(out: &str) -> anyhow::Result<Run> {
    let mut r = Run::default();
    let mut section = "";
    for line in out.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("Rate: ") {
            r.rate = rest
                .split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .context("perfdhcp's rate")?;
        } else if line.starts_with("***Statistics for: DISCOVER-OFFER") {
            section = "do";
        } else if line.starts_with("***Statistics for: REQUEST-ACK") {
            section = "ra";
        } else if let Some((k, v)) = line.split_once(": ") {
            let num = |v: &str| {
                v.split_whitespace()
                    .next()
                    .and_then(|x| x.parse::<f64>().ok())
            };
            match (section, k) {
                ("do", "sent packets") => r.discover_sent = num(v).unwrap_or(0.0) as u64,
                ("do", "received packets") => r.offers = num(v).unwrap_or(0.0) as u64,
                ("ra", "sent packets") => r.requests = num(v).unwrap_or(0.0) as u64,
                ("ra", "received packets") => r.acks = num(v).unwrap_or(0.0) as u64,
                ("do", "avg delay") => r.do_delay_ms = num(v).unwrap_or(f64::NAN),
                ("ra", "avg delay") => r.ra_delay_ms = num(v).unwrap_or(f64::NAN),
                _ => {}
            }
        }
    }
    if r.discover_sent == 0 {
        bail!("perfdhcp reported no DISCOVER sent:\n{out}");
    }
    Ok(r)
}

/// Two namespaces and a veth; deleted on drop.
struct Lab {
    srv: String,
    cli: String,
    srv_if: String,
    cli_if: String,
}

impl Lab {
    fn create(tag: &str) -> anyhow::Result<Self> {
        let pid = std::process::id();
        let lab = Self {
            srv: format!("nbdh-s-{pid}-{tag}"),
            cli: format!("nbdh-c-{pid}-{tag}"),
            srv_if: format!("nbdhs{pid}"),
            cli_if: format!("nbdhc{pid}"),
        };
        let ip = |args: &[&str]| -> anyhow::Result<()> {
            let st = Command::new("ip")
                .args(args)
                .status()
                .context("running ip")?;
            anyhow::ensure!(st.success(), "ip {} failed", args.join(" "));
            Ok(())
        };
        ip(&["netns", "add", &lab.srv])?;
        ip(&["netns", "add", &lab.cli])?;
        ip(&[
            "link",
            "add",
            &lab.srv_if,
            "netns",
            &lab.srv,
            "type",
            "veth",
            "peer",
            "name",
            &lab.cli_if,
            "netns",
            &lab.cli,
        ])?;
        ip(&[
            "-n",
            &lab.srv,
            "addr",
            "add",
            "10.66.0.1/16",
            "dev",
            &lab.srv_if,
        ])?;
        // perfdhcp sends from an address of its interface (its clients are simulated).
        ip(&[
            "-n",
            &lab.cli,
            "addr",
            "add",
            "10.66.0.2/16",
            "dev",
            &lab.cli_if,
        ])?;
        for (ns, dev) in [(&lab.srv, &lab.srv_if), (&lab.cli, &lab.cli_if)] {
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        Ok(lab)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in [&self.srv, &self.cli] {
            let _status = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Starts `peer` in the lab's server namespace and waits until it serves.
fn start(
    peer: Peer,
    lab: &Lab,
    cg: &Cgroup,
    dir: &Path,
    netbootd: &Path,
) -> anyhow::Result<Server> {
    let log = dir.join(format!("{}.log", peer.name()));
    let (cmd, ready) = match peer {
        Peer::Netboot => {
            let cfg = dir.join("netboot.toml");
            std::fs::write(
                &cfg,
                format!(
                    r#"data_dir = "{data}"
[http]
listen = "127.0.0.1:0"
[log]
level = "warn,netboot_daemon::daemon=info"
[tftp]
enabled = false
[iscsi]
enabled = false
[dhcp]
mode = "server"
interfaces = ["{iface}"]
[[dhcp.subnets]]
network = "10.66.0.0/16"
range = ["10.66.1.0", "10.66.250.255"]
router = "10.66.0.1"
lease_secs = 3600
"#,
                    data = dir.join("data").display(),
                    iface = lab.srv_if
                ),
            )
            .context("writing netbootd's configuration")?;
            let mut c = command(Some(cg), None, Path::new("ip"));
            c.args(["netns", "exec", &lab.srv])
                .arg(netbootd)
                .arg("--config")
                .arg(&cfg);
            c.env_remove("NETBOOT_CONFIG");
            (c, "listening (ports 67 and 4011)")
        }
        Peer::Dnsmasq => {
            let mut c = command(Some(cg), None, Path::new("ip"));
            c.args(["netns", "exec", &lab.srv, "dnsmasq"]).args([
                "-k",
                "--conf-file=/dev/null",
                "--port=0",
                &format!("--interface={}", lab.srv_if),
                "--bind-interfaces",
                "--dhcp-range=10.66.1.0,10.66.250.255,255.255.0.0,1h",
                "--dhcp-option=3,10.66.0.1",
                "--dhcp-authoritative",
                "--no-ping",
                "--dhcp-lease-max=1000000",
                "--quiet-dhcp",
                "--log-facility=-",
            ]);
            c.arg(format!(
                "--dhcp-leasefile={}",
                dir.join("dnsmasq.leases").display()
            ));
            c.arg(format!("--pid-file={}", dir.join("dnsmasq.pid").display()));
            (c, "sockets bound exclusively")
        }
    };
    let mut server = Server::spawn(peer.name(), cmd, &log)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains(ready) {
            return Ok(server);
        }
        if !server.alive() || Instant::now() > deadline || interrupted() {
            bail!("{} did not start; its log:\n{text}", peer.name());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn one_run(
    peer: Peer,
    rate: u32,
    seconds: u32,
    clients: u32,
    netbootd: &Path,
    tag: &str,
) -> anyhow::Result<Run> {
    let lab = Lab::create(tag)?;
    let dir = std::env::temp_dir().join(format!("nb-dhcp-bench-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("data")).context("creating the run directory")?;
    let cg = Cgroup::create(&format!("nb-dhcp-bench-{}-{tag}", std::process::id()))?;
    let server = start(peer, &lab, &cg, &dir, netbootd)?;
    let cpu0 = cg.cpu_seconds()?;
    let mut perf = Command::new("ip");
    perf.args([
        "netns",
        "exec",
        &lab.cli,
        "perfdhcp",
        "-4",
        "-l",
        &lab.cli_if,
    ])
    .args([
        "-r",
        &rate.to_string(),
        "-R",
        &clients.to_string(),
        "-p",
        &seconds.to_string(),
    ]);
    let fin = run_timed(perf, Duration::from_secs(u64::from(seconds) + 30))?;
    let cpu1 = cg.cpu_seconds()?;
    drop(server);
    drop(cg);
    drop(lab);
    let _ = std::fs::remove_dir_all(&dir);
    let out = String::from_utf8_lossy(&fin.stdout);
    let mut run = parse(&out)
        .with_context(|| format!("{}: {}", peer.name(), String::from_utf8_lossy(&fin.stderr)))?;
    run.cpu_s = cpu1 - cpu0;
    Ok(run)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs the comparison; `Ok(false)` when netbootd lost leases in the smoke run.
pub(crate) fn run(a: &CompareArgs) -> anyhow::Result<bool> {
    if !is_root() {
        bail!("dhcp-compare needs root (network namespaces, cgroups)");
    }
    for tool in ["perfdhcp", "dnsmasq"] {
        let found = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            bail!(
                "{tool} is not installed (Debian packages kea-admin and dnsmasq-base; `cargo xtask setup` installs them)"
            );
        }
    }
    catch_signals()?;
    let netbootd = a.netbootd.clone().unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/netbootd")
    });
    anyhow::ensure!(
        netbootd.exists(),
        "{} is missing: cargo build --release -p netboot-daemon --bin netbootd",
        netbootd.display()
    );
    let (reps, seconds, clients) = if a.quick {
        (1, 3, 2000)
    } else {
        (a.reps, a.seconds, a.clients)
    };
    let scenarios: Vec<(&str, u32)> = if a.quick {
        vec![("fixed", 300)]
    } else {
        vec![("fixed", a.rate), ("saturating", a.max_rate)]
    };
    eprintln!(
        "dhcp-compare: {reps} repetition(s), {seconds} s each, {clients} clients, kernel {}",
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    let mut ok = true;
    for (name, rate) in scenarios {
        let mut results: Vec<(Peer, Vec<Run>)> =
            vec![(Peer::Netboot, vec![]), (Peer::Dnsmasq, vec![])];
        for rep in 0..reps {
            // Alternate which server goes first.
            let order = if rep % 2 == 0 { [0, 1] } else { [1, 0] };
            for i in order {
                let peer = results[i].0;
                let tag = format!("{name}{rep}{}", peer.name().chars().next().unwrap_or('x'));
                let r = one_run(peer, rate, seconds, clients, &netbootd, &tag)?;
                eprintln!(
                    "dhcp-compare: {name} {} rep {rep}: {:.0} exchanges/s, {} of {} DISCOVERs acknowledged, delays {:.2}/{:.2} ms, CPU {:.2} s",
                    peer.name(),
                    r.rate,
                    r.acks,
                    r.discover_sent,
                    r.do_delay_ms,
                    r.ra_delay_ms,
                    r.cpu_s
                );
                results[i].1.push(r);
            }
        }
        #[allow(clippy::print_stdout, reason = "the table is the report")]
        {
            println!(
                "\n#### {name}: perfdhcp -r {rate} -R {clients} -p {seconds} ({reps} runs, medians)\n"
            );
            println!(
                "| server | exchanges/s | DISCOVERs acknowledged | DISCOVER→OFFER ms | REQUEST→ACK ms | server CPU s | CPU ms per 1000 leases |"
            );
            println!("|---|---|---|---|---|---|---|");
            for (peer, runs) in &results {
                let m = |f: &dyn Fn(&Run) -> f64| median(runs.iter().map(f).collect());
                println!(
                    "| {} | {:.0} | {:.1} % | {:.2} | {:.2} | {:.2} | {:.0} |",
                    peer.name(),
                    m(&|r| r.rate),
                    m(&|r| r.completion() * 100.0),
                    m(&|r| r.do_delay_ms),
                    m(&|r| r.ra_delay_ms),
                    m(&|r| r.cpu_s),
                    m(&|r| r.cpu_ms_per_1000()),
                );
            }
            let get = |p: Peer, f: &dyn Fn(&Run) -> f64| {
                results
                    .iter()
                    .find(|(q, _)| *q == p)
                    .map_or(f64::NAN, |(_, runs)| median(runs.iter().map(f).collect()))
            };
            println!(
                "\nnetboot/dnsmasq: exchanges/s {:.2}, CPU per lease {:.2}",
                get(Peer::Netboot, &|r| r.rate) / get(Peer::Dnsmasq, &|r| r.rate),
                get(Peer::Netboot, &|r| r.cpu_ms_per_1000())
                    / get(Peer::Dnsmasq, &|r| r.cpu_ms_per_1000()),
            );
        }
        if a.quick {
            let nb = &results[0].1;
            // At 300 exchanges/s a server that keeps up acknowledges nearly every DISCOVER;
            // perfdhcp's last second of requests may still be in flight when it stops.
            if nb.iter().any(|r| r.completion() < 0.9) {
                eprintln!(
                    "dhcp-compare: FAILED: netboot acknowledged fewer than 90 % of the DISCOVERs at 300/s"
                );
                ok = false;
            }
        }
    }
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perfdhcp_reports_are_read() {
        let out = "Rate: 155.777 4-way exchanges/second, expected rate: 2000\n\n***Malformed Packets***\nMalformed packets: 0\n***Statistics for: DISCOVER-OFFER***\nsent packets: 9999\nreceived packets: 1072\ndrops: 8927\n\nmin delay: 0.304 ms\navg delay: 312.756 ms\n***Statistics for: REQUEST-ACK***\nsent packets: 1072\nreceived packets: 779\navg delay: 288.028 ms\n";
        let r = parse(out).expect("parses");
        assert_eq!(
            (r.discover_sent, r.offers, r.requests, r.acks),
            (9999, 1072, 1072, 779)
        );
        assert!((r.rate - 155.777).abs() < 1e-9);
        assert!((r.do_delay_ms - 312.756).abs() < 1e-9);
        assert!((r.ra_delay_ms - 288.028).abs() < 1e-9);
        assert!(parse("nothing").is_err());
    }
}
