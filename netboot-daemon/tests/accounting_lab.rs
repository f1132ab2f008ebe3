//! Privileged end-to-end test of the eBPF accounting with the real daemon and real clients.
//!
//! The lab (created and deleted by the test, IPv6 off and static neighbours everywhere, so
//! the only frames are the clients' own):
//! - `srv`: netbootd, run with `nsenter --net` (so it keeps the host's bpffs), counting on
//!   its veth `s0`; `lan`: the veth's other end, the parent of the clients' macvlans;
//! - 48 clients, each a macvlan with its own MAC in its own namespace; half fetch a file
//!   with tftp-hpa, half with tftp-hpa and curl;
//! - two more clients that hold the same address one after the other (the first one's
//!   requests carry its MAC, so netbootd binds the address to it before it moves);
//! - a router namespace (its MAC configured in `ebpf.routers`) with three routed clients
//!   behind it, which make netbootd bind their addresses with an HTTP request that carries
//!   their MAC, then fetch over TFTP and HTTP.
//!
//! Then, from `/metrics` (scraped over loopback inside `srv`, so the scrape is not counted):
//! on `s0`, client bytes + unattributed bytes + uncounted bytes == the interface's own
//! counters; each on-link client's rows equal its own interface's counters exactly (so no
//! byte landed on another MAC); the routed clients' rows plus the unattributed bytes equal the
//! router's counters, and nothing is counted under the router's MAC; every TFTP transfer's
//! kernel payload equals the server's own count. `promtool check metrics` accepts the scrape
//! and a real Prometheus server scraping netbootd returns a client's series through its query
//! API. Finally netbootd is stopped (nothing may count while it is down: the programs detach),
//! traffic is sent, and a restarted netbootd continues exactly the pinned counters.
//!
//! Needs root, iproute2, nsenter, tftp-hpa, curl and a build with the eBPF object; without
//! them it prints a loud SKIPPED line, except under `CI=true`, where it fails.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;

use common::{Log, TestDir, Veth, have, ip, netns_path, privileged};

const SRV_IP: &str = "10.77.0.100";
const SRV_MAC: &str = "02:6c:00:00:00:01";
const LAN_MAC: &str = "02:6c:00:00:00:02";
const ROUTER_MAC: &str = "02:6c:00:00:00:fe";
const ROUTER_IP: &str = "10.77.0.1";
/// Clients on the link, each with its own address.
const DIRECT: usize = 48;
/// Clients behind the router.
const ROUTED: usize = 3;
/// The address the last two on-link clients hold one after the other.
const SHARED_IP: &str = "10.77.0.90";
const FILE_LEN: usize = 200_000;
const HTTP_PORT: u16 = 8080;
/// How long the counters may take to settle after the clients are done (trailing FINs).
const SETTLE: Duration = Duration::from_secs(20);
/// `ebpf.install_stall_secs` in the lab.
const STALL_SECS: u64 = 6;
/// What the installing client writes to its iSCSI disk.
const DISK_WRITE: usize = 4 << 20;

#[test]
fn every_byte_lands_on_its_clients_mac_and_survives_a_restart() {
    if let Err(why) = privileged(&["ip", "nsenter", "curl"]).and_then(|()| {
        match ["tftp", "ethtool"].into_iter().find(|t| !have(t)) {
            None => Ok(()),
            Some(t) => Err(format!("{t} is not installed")),
        }
    }) {
        skip(&why);
        return;
    }
    let lab = Lab::create();
    let dir = TestDir::new("lab");
    let file: Vec<u8> = (0..FILE_LEN).map(|i| (i * 7 % 251) as u8).collect();
    let data = dir.path().join("data");
    std::fs::create_dir_all(data.join("tftp")).expect("mkdir");
    std::fs::write(data.join("tftp/payload.bin"), &file).expect("write payload");
    let pins = PinDir(PathBuf::from(format!(
        "/sys/fs/bpf/netboot-lab-{}",
        std::process::id()
    )));
    let config = dir.path().join("netboot.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {data:?}\n\
             [http]\nlisten = \"0.0.0.0:{HTTP_PORT}\"\n\
             [dhcp]\nmode = \"off\"\n\
             [tftp]\nlisten = \"0.0.0.0:69\"\n\
             [iscsi]\nlisten = \"0.0.0.0:3260\"\n\
             [ebpf]\ninterfaces = [\"s0\"]\nrouters = [\"{ROUTER_MAC}\"]\npin_dir = {:?}\ninstall_stall_secs = {STALL_SECS}\n",
            pins.0
        ),
    )
    .expect("write config");

    let Some(mut daemon) = Daemon::start(&lab, &config) else {
        return;
    };
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).expect("mkdir");

    // Routed clients: an HTTP request that carries the MAC binds the address first.
    for c in &lab.routed {
        lab.run(
            &c.ns,
            "curl",
            &[
                "-sS",
                "--fail",
                "-o",
                "/dev/null",
                &format!("http://{SRV_IP}:{HTTP_PORT}/boot/ipxe/device?mac={}", c.mac),
            ],
        );
    }
    // Everybody fetches at once; on-link clients with even index also over HTTP.
    let mut jobs = Vec::new();
    for (i, c) in lab.direct.iter().chain(&lab.routed).enumerate() {
        let target = out.join(format!("tftp-{i}"));
        jobs.push((
            target.clone(),
            lab.tftp(
                &c.ns,
                &format!("{}/payload.bin", c.mac.replace(':', "-")),
                &target,
            ),
        ));
        if i % 2 == 0 {
            let target = out.join(format!("http-{i}"));
            jobs.push((
                target.clone(),
                lab.spawn(
                    &c.ns,
                    "curl",
                    &[
                        "-sS",
                        "--fail",
                        "-o",
                        target.to_str().expect("utf8"),
                        &format!("http://{SRV_IP}:{HTTP_PORT}/files/tftp/payload.bin"),
                    ],
                ),
            ));
        }
    }
    for (target, job) in jobs {
        wait_ok(job);
        assert_eq!(
            std::fs::read(&target).expect("downloaded"),
            file,
            "{}",
            target.display()
        );
    }
    // The shared address: the first holder's request carries its MAC (so it is bound), then
    // the address moves to the second holder, whose request does not.
    let [first, second] = &lab.shared;
    let target = out.join("shared-1");
    wait_ok(lab.tftp(
        &first.ns,
        &format!("{}/payload.bin", first.mac.replace(':', "-")),
        &target,
    ));
    lab.move_shared_address();
    let target = out.join("shared-2");
    wait_ok(lab.tftp(&second.ns, "payload.bin", &target));
    assert_eq!(std::fs::read(&target).expect("downloaded"), file);

    // iSCSI: a routed client writes its disk with qemu's iSCSI driver, logging in with an
    // initiator name that carries its MAC (as iPXE's do); the bytes land on its MAC, and the
    // install watch sees it start writing, then stall.
    let cookie = lab.login(dir.path());
    let installer = &lab.routed[0];
    let disk = iscsi_write(&lab, &cookie, installer, dir.path());

    // Reconciliation, once the trailing segments are through.
    let deadline = Instant::now() + SETTLE;
    let metrics = loop {
        let m = Metrics::scrape(&lab);
        let s0 = lab.stats(&lab.srv_ns(), "s0");
        let rx = m.client_total("rx") + m.unattributed("rx") + m.uncounted();
        let tx = m.client_total("tx") + m.unattributed("tx");
        if rx == s0.rx_bytes && tx == s0.tx_bytes && m.iface("s0", "rx") == s0.rx_bytes {
            eprintln!(
                "s0: rx {} = clients {} + unattributed {} + uncounted {}; tx {} = clients {} + unattributed {}",
                s0.rx_bytes,
                m.client_total("rx"),
                m.unattributed("rx"),
                m.uncounted(),
                s0.tx_bytes,
                m.client_total("tx"),
                m.unattributed("tx")
            );
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "s0 never reconciled: rx {rx} vs {}, tx {tx} vs {}",
            s0.rx_bytes,
            s0.tx_bytes
        );
        std::thread::yield_now();
    };
    assert_eq!(metrics.uncounted(), 0, "nothing may overflow");

    // Every on-link client's rows are exactly its own interface's counters.
    let macs: Vec<&str> = metrics.macs();
    assert!(
        macs.len() >= 50,
        "at least 50 client MACs, got {}",
        macs.len()
    );
    for c in lab.direct.iter().chain(&lab.shared) {
        let own = lab.stats(&c.ns, &c.iface);
        assert_eq!(
            (metrics.client(&c.mac, "rx"), metrics.client(&c.mac, "tx")),
            (own.tx_bytes, own.rx_bytes),
            "{} (rows rx/tx vs its interface's tx/rx)",
            c.mac
        );
    }
    // Routed clients: their rows plus the unattributed bytes are the router's traffic,
    // each has bytes of its own, and the router has none.
    let router = lab.stats(&lab.router_ns(), "mvr");
    let routed_rx: u64 = lab
        .routed
        .iter()
        .map(|c| metrics.client(&c.mac, "rx"))
        .sum();
    let routed_tx: u64 = lab
        .routed
        .iter()
        .map(|c| metrics.client(&c.mac, "tx"))
        .sum();
    assert_eq!(routed_rx + metrics.unattributed("rx"), router.tx_bytes);
    assert_eq!(routed_tx + metrics.unattributed("tx"), router.rx_bytes);
    for c in &lab.routed {
        let own = lab.stats(&c.ns, &c.iface);
        let (rx, tx) = (metrics.client(&c.mac, "rx"), metrics.client(&c.mac, "tx"));
        assert!(
            rx > FILE_LEN as u64 / 100
                && tx > FILE_LEN as u64
                && rx <= own.tx_bytes
                && tx <= own.rx_bytes,
            "routed {}: rows {rx}/{tx}, own {}/{}",
            c.mac,
            own.tx_bytes,
            own.rx_bytes
        );
    }
    assert_eq!(
        metrics.client(ROUTER_MAC, "rx"),
        0,
        "nothing is the router's"
    );
    assert_eq!(
        metrics.client(ROUTER_MAC, "tx"),
        0,
        "nothing is the router's"
    );

    // Per transfer: the kernel's payload counts equal the server's own.
    let transfers = loop {
        let list = lab.api(&cookie, "/api/v1/tftp/transfers");
        let recent = list["recent"].as_array().expect("recent").clone();
        if recent.len() == DIRECT + ROUTED + 2 && recent.iter().all(|t| !t["kernel"].is_null()) {
            break recent;
        }
        assert!(
            Instant::now() < deadline + SETTLE,
            "transfers without kernel figures: {list}"
        );
        std::thread::yield_now();
    };
    for t in &transfers {
        assert_eq!(t["state"], "done", "{t}");
        let k = &t["kernel"];
        assert_eq!(k["tx_payload"], t["sent_bytes"], "{t}");
        assert_eq!(k["rx_payload"], t["received_bytes"], "{t}");
    }

    // Per iSCSI session (qemu-img's, from the routed installer): the kernel's payload of
    // its connection equals what the target itself read and wrote, login included.
    let session = loop {
        let list = lab.api(&cookie, "/api/v1/iscsi/sessions");
        let done: Vec<Value> = list["recent"]
            .as_array()
            .expect("recent")
            .iter()
            .filter(|s| {
                s["initiator"]
                    .as_str()
                    .is_some_and(|i| i.starts_with("iqn.2010-04.org.ipxe:"))
            })
            .cloned()
            .collect();
        if let [one] = &done[..]
            && !one["kernel"].is_null()
        {
            break one.clone();
        }
        assert!(
            Instant::now() < deadline + SETTLE,
            "the iSCSI session has no kernel figures: {list}"
        );
        std::thread::yield_now();
    };
    let k = &session["kernel"];
    assert!(
        session["rx_bytes"].as_u64() > Some(DISK_WRITE as u64),
        "the target read the written data: {session}"
    );
    assert!(session["commands"].as_u64() > Some(0), "{session}");
    // The kernel counts payload on the wire, the target the stream it read: a segment the
    // sender retransmitted (a veth backlog drop on a loaded machine) is on the wire twice.
    // Without retransmissions the two are equal; with them the kernel is ahead by at most
    // the retransmitted segments.
    for (field, kernel_field, sender) in [
        ("rx_bytes", "rx_payload", installer.ns.clone()),
        ("tx_bytes", "tx_payload", lab.srv_ns()),
    ] {
        let (ours, kernel) = (
            session[field].as_u64().expect("target count"),
            k[kernel_field].as_u64().expect("kernel count"),
        );
        let retrans = lab.tcp_retransmitted_segments(&sender);
        if retrans == 0 {
            assert_eq!(
                kernel, ours,
                "{field}, no retransmission in {sender}: {session}"
            );
        } else {
            eprintln!(
                "accounting lab: {sender} retransmitted {retrans} TCP segments; the kernel's {kernel_field} may exceed the target's {field} by that much"
            );
            assert!(
                (ours..=ours + retrans * 1500).contains(&kernel),
                "{field} with {retrans} retransmitted segments: {session}"
            );
        }
    }

    // The per-device view agrees with /metrics, and lists the HTTP connection of a client
    // that fetched over HTTP (index 0 did).
    let c0 = &lab.direct[0];
    let device = lab.api(&cookie, &format!("/api/v1/devices/{}/metrics", c0.mac));
    assert_eq!(device["source"], "ebpf", "{device}");
    let total = |dir: &str| -> u64 {
        device["totals"]
            .as_array()
            .expect("totals")
            .iter()
            .filter(|t| t["direction"] == dir)
            .map(|t| t["bytes"].as_u64().expect("bytes"))
            .sum()
    };
    assert_eq!(
        (total("rx"), total("tx")),
        (metrics.client(&c0.mac, "rx"), metrics.client(&c0.mac, "tx")),
        "{device}"
    );
    let http = device["sessions"]
        .as_array()
        .expect("sessions")
        .iter()
        .find(|s| s["service"] == "http")
        .unwrap_or_else(|| panic!("no HTTP session in {device}"));
    assert!(
        http["tx_payload"].as_u64().expect("tx_payload") > FILE_LEN as u64,
        "{http}"
    );
    // Attribution: on-link clients by their own MAC, routed ones by a binding the kernel uses.
    install_is_watched(&lab, &cookie, installer, disk, &metrics, &|| {
        daemon.log.text()
    });

    let attribution = lab.api(&cookie, "/api/v1/accounting/attribution");
    let methods = |mac: &str| -> Vec<String> {
        attribution["clients"]
            .as_array()
            .expect("clients")
            .iter()
            .find(|c| c["mac"] == mac)
            .unwrap_or_else(|| panic!("{mac} not in {attribution}"))["methods"]
            .as_array()
            .expect("methods")
            .iter()
            .map(|m| m["method"].as_str().expect("method").to_owned())
            .collect()
    };
    assert_eq!(methods(&c0.mac), ["l2"]);
    for c in &lab.routed {
        assert_eq!(methods(&c.mac), ["binding"]);
        let client = attribution["clients"]
            .as_array()
            .expect("clients")
            .iter()
            .find(|x| x["mac"] == c.mac.as_str())
            .expect("routed client");
        assert_eq!(client["bindings"][0]["in_kernel"], true, "{client}");
    }
    assert_eq!(
        attribution["routers"],
        serde_json::json!([{"mac": ROUTER_MAC, "reason": "configured"}])
    );

    common::promtool(&metrics.text);
    prometheus_returns_a_client_series(&lab, dir.path(), &lab.direct[0].mac, &metrics);

    // Stop: nothing may be counted while netbootd is down; restarted, it continues the
    // pinned counters exactly.
    let before = Metrics::scrape(&lab);
    daemon.stop();
    let c0 = &lab.direct[0];
    let refused = lab.spawn(
        &c0.ns,
        "curl",
        &[
            "-sS",
            "--max-time",
            "5",
            &format!("http://{SRV_IP}:{HTTP_PORT}/"),
        ],
    );
    let status = refused.wait_with_output().expect("curl");
    assert!(!status.status.success(), "nothing listens while stopped");
    let Some(mut daemon) = Daemon::start(&lab, &config) else {
        panic!("netbootd restarted without accounting");
    };
    let after = Metrics::scrape(&lab);
    for mac in before.macs() {
        for dir in ["rx", "tx"] {
            assert_eq!(
                after.client(mac, dir),
                before.client(mac, dir),
                "{mac} {dir}: counted while stopped, or lost in the restart"
            );
        }
    }
    lab.run(
        &c0.ns,
        "curl",
        &[
            "-sS",
            "--fail",
            "-o",
            "/dev/null",
            &format!("http://{SRV_IP}:{HTTP_PORT}/api/v1/version"),
        ],
    );
    let deadline = Instant::now() + SETTLE;
    while Metrics::scrape(&lab).client(&c0.mac, "rx") <= before.client(&c0.mac, "rx") {
        assert!(Instant::now() < deadline, "not counting after the restart");
        std::thread::yield_now();
    }
    daemon.stop();
}

/// Reports loudly that the test cannot run, and fails under `CI=true`.
fn skip(why: &str) {
    common::skip(
        "accounting_lab (needs root, iproute2, nsenter, tftp-hpa, curl and the eBPF object)",
        why,
    );
}

/// One client: its namespace, interface and MAC.
struct Client {
    ns: String,
    iface: String,
    mac: String,
}

/// The lab's namespaces; dropping it deletes them all.
struct Lab {
    veth: Veth,
    prefix: String,
    direct: Vec<Client>,
    shared: [Client; 2],
    routed: Vec<Client>,
    extra_ns: Vec<String>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in &self.extra_ns {
            let _status = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Stats {
    rx_bytes: u64,
    tx_bytes: u64,
}

impl Lab {
    fn create() -> Self {
        let veth = Veth::create("nbl", 'l', SRV_MAC, LAN_MAC, true);
        let prefix = format!("nbl-{}", std::process::id());
        let mut lab = Self {
            veth,
            prefix,
            direct: Vec::new(),
            shared: [
                Client {
                    ns: String::new(),
                    iface: String::new(),
                    mac: String::new(),
                },
                Client {
                    ns: String::new(),
                    iface: String::new(),
                    mac: String::new(),
                },
            ],
            routed: Vec::new(),
            extra_ns: Vec::new(),
        };
        let srv = lab.srv_ns();
        ip(&[
            "-n",
            &srv,
            "link",
            "set",
            "dev",
            &lab.veth.srv_if,
            "name",
            "s0",
        ]);
        ip(&[
            "-n",
            &srv,
            "addr",
            "add",
            &format!("{SRV_IP}/24"),
            "dev",
            "s0",
        ]);
        ip(&["-n", &srv, "link", "set", "dev", "s0", "up"]);
        ip(&["-n", &srv, "link", "set", "dev", "lo", "up"]);
        // As a NIC's counters count the frames on the wire, the link's ends count segments:
        // without segmentation offload, the kernel cuts every TCP and UDP GSO packet into
        // its frames before the veth counts them (the program at s0 still sees the GSO
        // packets the server sends, and must count their frames).
        no_segmentation_offload(&srv, "s0", true);
        no_segmentation_offload(&lab.veth.cli_ns, &lab.veth.cli_if, true);

        for i in 0..DIRECT {
            let client = lab.on_link(i, Some(&format!("10.77.0.{}", 10 + i)));
            lab.direct.push(client);
        }
        let first = lab.on_link(DIRECT, Some(SHARED_IP));
        let second = lab.on_link(DIRECT + 1, None);
        lab.shared = [first, second];

        // The router: a macvlan on the link, and one routed /24 per client behind it.
        let rtr = lab.new_ns("rtr");
        lab.macvlan("mvr", ROUTER_MAC, &rtr);
        ip(&[
            "-n",
            &rtr,
            "addr",
            "add",
            &format!("{ROUTER_IP}/24"),
            "dev",
            "mvr",
        ]);
        ip(&["-n", &rtr, "link", "set", "dev", "mvr", "up"]);
        neigh(&rtr, SRV_IP, SRV_MAC, "mvr");
        neigh(&srv, ROUTER_IP, ROUTER_MAC, "s0");
        ip(&["-n", &srv, "route", "add", "10.78.0.0/16", "via", ROUTER_IP]);
        sysctl(&rtr, "/proc/sys/net/ipv4/ip_forward", "1");
        for j in 0..ROUTED {
            let ns = lab.new_ns(&format!("r{j}"));
            let (mac, gw_mac) = (
                format!("02:6c:00:00:02:{j:02x}"),
                format!("02:6c:00:00:03:{j:02x}"),
            );
            let side = format!("rv{j}");
            ip(&[
                "link", "add", &side, "netns", &rtr, "address", &gw_mac, "type", "veth", "peer",
                "name", "eth0", "netns", &ns, "address", &mac,
            ]);
            ip(&[
                "-n",
                &rtr,
                "addr",
                "add",
                &format!("10.78.{j}.1/24"),
                "dev",
                &side,
            ]);
            ip(&["-n", &rtr, "link", "set", "dev", &side, "up"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("10.78.{j}.2/24"),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &ns, "link", "set", "dev", "eth0", "up"]);
            ip(&["-n", &ns, "link", "set", "dev", "lo", "up"]);
            // The router's macvlan counts what it forwards as packets, not frames (its
            // segmentation offload cannot be turned off): the client sends frames only.
            no_segmentation_offload(&ns, "eth0", false);
            ip(&[
                "-n",
                &ns,
                "route",
                "add",
                "default",
                "via",
                &format!("10.78.{j}.1"),
            ]);
            neigh(&ns, &format!("10.78.{j}.1"), &gw_mac, "eth0");
            neigh(&rtr, &format!("10.78.{j}.2"), &mac, &side);
            lab.routed.push(Client {
                ns,
                iface: "eth0".into(),
                mac,
            });
        }
        lab
    }

    fn srv_ns(&self) -> String {
        self.veth.srv_ns.clone()
    }

    fn router_ns(&self) -> String {
        format!("{}-rtr", self.prefix)
    }

    /// A namespace with IPv6 off, deleted with the lab.
    fn new_ns(&mut self, name: &str) -> String {
        let ns = format!("{}-{name}", self.prefix);
        ip(&["netns", "add", &ns]);
        self.extra_ns.push(ns.clone());
        for conf in ["all", "default"] {
            sysctl(
                &ns,
                &format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6"),
                "1",
            );
        }
        ns
    }

    /// A macvlan on the link with `mac`, moved into `ns`.
    fn macvlan(&self, name: &str, mac: &str, ns: &str) {
        let lan = &self.veth.cli_ns;
        ip(&[
            "-n",
            lan,
            "link",
            "add",
            "link",
            &self.veth.cli_if,
            "name",
            name,
            "address",
            mac,
            "type",
            "macvlan",
            "mode",
            "bridge",
        ]);
        ip(&["-n", lan, "link", "set", "dev", name, "netns", ns]);
    }

    /// On-link client `i`, with `addr` if given.
    fn on_link(&mut self, i: usize, addr: Option<&str>) -> Client {
        let ns = self.new_ns(&format!("c{i}"));
        let mac = format!("02:6c:00:00:01:{i:02x}");
        let iface = format!("mv{i}");
        self.macvlan(&iface, &mac, &ns);
        ip(&["-n", &ns, "link", "set", "dev", "lo", "up"]);
        if let Some(addr) = addr {
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                &iface,
            ]);
            ip(&["-n", &ns, "link", "set", "dev", &iface, "up"]);
            neigh(&ns, SRV_IP, SRV_MAC, &iface);
            neigh(&self.srv_ns(), addr, &mac, "s0");
        }
        Client { ns, iface, mac }
    }

    /// Takes the shared address from the first holder and gives it to the second.
    fn move_shared_address(&self) {
        let [first, second] = &self.shared;
        ip(&["-n", &first.ns, "link", "set", "dev", &first.iface, "down"]);
        ip(&["-n", &first.ns, "addr", "flush", "dev", &first.iface]);
        ip(&[
            "-n",
            &second.ns,
            "addr",
            "add",
            &format!("{SHARED_IP}/24"),
            "dev",
            &second.iface,
        ]);
        ip(&["-n", &second.ns, "link", "set", "dev", &second.iface, "up"]);
        neigh(&second.ns, SRV_IP, SRV_MAC, &second.iface);
        neigh(&self.srv_ns(), SHARED_IP, &second.mac, "s0");
    }

    /// Starts `program` inside `ns`.
    fn spawn(&self, ns: &str, program: &str, args: &[&str]) -> Child {
        Command::new("ip")
            .args(["netns", "exec", ns, program])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {program} in {ns}: {e}"))
    }

    /// tftp-hpa inside `ns` fetching `remote` from netbootd into `target`.
    fn tftp(&self, ns: &str, remote: &str, target: &Path) -> Child {
        let target = target.to_str().expect("utf8");
        self.spawn(
            ns,
            "tftp",
            &["-m", "binary", SRV_IP, "-c", "get", remote, target],
        )
    }

    /// Runs `program` inside `ns` and fails the test if it fails.
    fn run(&self, ns: &str, program: &str, args: &[&str]) -> String {
        wait_ok(self.spawn(ns, program, args))
    }

    /// TCP segments retransmitted in `ns` so far (`RetransSegs` of its `/proc/net/snmp`).
    fn tcp_retransmitted_segments(&self, ns: &str) -> u64 {
        let snmp = self.run(ns, "cat", &["/proc/net/snmp"]);
        let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
        let (names, values) = (
            tcp.next().expect("Tcp header"),
            tcp.next().expect("Tcp values"),
        );
        names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(n, _)| *n == "RetransSegs")
            .and_then(|(_, v)| v.parse().ok())
            .expect("RetransSegs")
    }

    /// An interface's own counters, inside its namespace.
    fn stats(&self, ns: &str, iface: &str) -> Stats {
        let out = self.run(ns, "ip", &["-j", "-s", "link", "show", "dev", iface]);
        let json: Value = serde_json::from_str(&out).expect("ip -j output");
        let field = |dir: &str| {
            json[0]["stats64"][dir]["bytes"]
                .as_u64()
                .unwrap_or_else(|| panic!("no stats64.{dir}.bytes in {json}"))
        };
        Stats {
            rx_bytes: field("rx"),
            tx_bytes: field("tx"),
        }
    }

    /// Sets up the administrator and returns the cookie jar of its session.
    fn login(&self, dir: &Path) -> PathBuf {
        let jar = dir.join("cookies");
        self.run(
            &self.srv_ns(),
            "curl",
            &[
                "-sS",
                "--fail",
                "-c",
                jar.to_str().expect("utf8"),
                "-H",
                "content-type: application/json",
                "-d",
                r#"{"username":"admin","password":"admin-pass-1"}"#,
                &format!("http://127.0.0.1:{HTTP_PORT}/api/v1/auth/setup"),
            ],
        );
        jar
    }

    /// GETs an API path over loopback inside `srv`.
    fn api(&self, jar: &Path, path: &str) -> Value {
        let out = self.run(
            &self.srv_ns(),
            "curl",
            &[
                "-sS",
                "--fail",
                "-b",
                jar.to_str().expect("utf8"),
                &format!("http://127.0.0.1:{HTTP_PORT}{path}"),
            ],
        );
        serde_json::from_str(&out).expect("JSON")
    }
}

/// Links a new image to `c` and writes [`DISK_WRITE`] bytes to it over iSCSI from `c`'s
/// namespace; returns the image's name.
fn iscsi_write(lab: &Lab, jar: &Path, c: &Client, dir: &Path) -> &'static str {
    let post = |path: &str, body: &str| {
        lab.run(
            &lab.srv_ns(),
            "curl",
            &[
                "-sS",
                "--fail-with-body",
                "-b",
                jar.to_str().expect("utf8"),
                "-H",
                "content-type: application/json",
                "-d",
                body,
                &format!("http://127.0.0.1:{HTTP_PORT}{path}"),
            ],
        )
    };
    post(
        "/api/v1/images",
        r#"{"name":"lab-disk","size_bytes":67108864}"#,
    );
    post(
        "/api/v1/devices",
        &format!(
            r#"{{"mac":"{}","name":"installer","boot_policy":"iscsi","image":"lab-disk"}}"#,
            c.mac
        ),
    );
    let src = dir.join("disk-src.raw");
    let data: Vec<u8> = (0..DISK_WRITE).map(|i| (i * 31 % 253) as u8).collect();
    std::fs::write(&src, &data).expect("write source");
    let initiator = format!("iqn.2010-04.org.ipxe:{}", c.mac.replace(':', ""));
    let target = format!(
        "driver=iscsi,transport=tcp,portal={SRV_IP}:3260,target=iqn.2026-01.org.netboot:lab-disk,lun=0,initiator-name={initiator}"
    );
    lab.run(
        &c.ns,
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "--target-image-opts",
            src.to_str().expect("utf8"),
            &target,
        ],
    );
    "lab-disk"
}

/// The device's iSCSI bytes are on its MAC, its metrics show it writing, and with no more
/// writes the install watch reports it stalled, on its boot events too.
fn install_is_watched(
    lab: &Lab,
    jar: &Path,
    c: &Client,
    disk: &str,
    metrics: &Metrics,
    log: &dyn Fn() -> String,
) {
    let iscsi_rx = metrics.client_service(&c.mac, "iscsi", "rx");
    assert!(
        iscsi_rx > DISK_WRITE as u64,
        "the {DISK_WRITE} bytes written to {disk} are on {}: {iscsi_rx}",
        c.mac
    );
    let deadline = Instant::now() + Duration::from_secs(STALL_SECS * 3 + 15);
    let events = loop {
        let ev = lab.api(
            jar,
            &format!("/api/v1/devices/{}/events?source=system", c.mac),
        );
        let kinds: Vec<String> = ev["items"]
            .as_array()
            .expect("items")
            .iter()
            .filter_map(|e| e["kind"].as_str().map(str::to_owned))
            .collect();
        if kinds.iter().any(|k| k == "install_stalled") {
            break kinds;
        }
        assert!(
            Instant::now() < deadline,
            "no install_stalled event: {ev}\nnetbootd's log:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    // Newest first: stalled after writing.
    assert_eq!(events, ["install_stalled", "install_writing"], "{events:?}");
    let device = lab.api(jar, &format!("/api/v1/devices/{}/metrics", c.mac));
    let install = &device["install"];
    assert_eq!(install["phase"], "stalled", "{device}");
    assert!(
        install["written_bytes"].as_u64().expect("written") >= DISK_WRITE as u64,
        "{device}"
    );
}

/// A permanent neighbour entry: no ARP on the link.
fn neigh(ns: &str, addr: &str, mac: &str, dev: &str) {
    ip(&[
        "-n",
        ns,
        "neigh",
        "replace",
        addr,
        "lladdr",
        mac,
        "dev",
        dev,
        "nud",
        "permanent",
    ]);
}

/// Writes a sysctl inside `ns`.
/// Turns off TCP and UDP segmentation offload on `dev` in `ns` (the stack still builds GSO
/// packets; they are segmented in software just before the device), and with `gso` false
/// generic segmentation too (the stack sends frame-sized packets only).
fn no_segmentation_offload(ns: &str, dev: &str, gso: bool) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "ethtool", "-K", dev])
        .args(["tso", "off", "tx-udp-segmentation", "off"])
        .args(if gso { &[][..] } else { &["gso", "off"][..] })
        .output()
        .expect("run ethtool");
    assert!(
        out.status.success(),
        "ethtool -K {dev}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sysctl(ns: &str, path: &str, value: &str) {
    netboot_daemon::ebpf::in_netns(&netns_path(ns), || {
        std::fs::write(path, value).unwrap_or_else(|e| panic!("write {path}: {e}"));
    })
    .expect("enter the namespace");
}

/// Waits for `child` and fails the test if it failed; returns its stdout.
fn wait_ok(child: Child) -> String {
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf8")
}

/// The pin directory, removed (unpinning the maps) at the end.
struct PinDir(PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// netbootd inside the lab's server namespace.
struct Daemon {
    child: Child,
    log: Log,
}

impl Daemon {
    /// Starts netbootd and waits until it listens; `None` (after a loud skip) when it runs
    /// without eBPF accounting because the binary has no eBPF object.
    fn start(lab: &Lab, config: &Path) -> Option<Self> {
        let mut child = Command::new("nsenter")
            .arg(format!("--net={}", netns_path(&lab.srv_ns()).display()))
            .arg("--")
            .arg(env!("CARGO_BIN_EXE_netbootd"))
            .args([
                "--config",
                config.to_str().expect("utf8"),
                "--log-format",
                "json",
            ])
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn netbootd");
        let log = Log::follow(&mut child);
        let daemon = Self { child, log };
        if daemon.log.started_with("AYA_BUILD_SKIP") {
            skip("netbootd was built without its eBPF object");
            return None;
        }
        assert!(
            daemon.log.started_with("eBPF accounting attached"),
            "accounting did not attach:\n{}",
            daemon.log.text()
        );
        Some(daemon)
    }

    /// SIGTERM, and a clean exit.
    fn stop(&mut self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(ok.success());
        let status = self.child.wait().expect("wait");
        assert!(
            status.success(),
            "netbootd exited with {status}:\n{}",
            self.log.text()
        );
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One scrape of `/metrics` (Prometheus text), over loopback inside `srv`.
struct Metrics {
    text: String,
    samples: common::Samples,
}

impl Metrics {
    fn scrape(lab: &Lab) -> Self {
        let text = lab.run(
            &lab.srv_ns(),
            "curl",
            &[
                "-sS",
                "--fail",
                &format!("http://127.0.0.1:{HTTP_PORT}/metrics"),
            ],
        );
        let samples = common::Samples::parse(&text);
        Self { text, samples }
    }

    fn sum(&self, name: &str, filter: &[(&str, &str)]) -> u64 {
        self.samples.sum(name, filter)
    }

    fn client(&self, mac: &str, direction: &str) -> u64 {
        self.sum(
            "netboot_client_bytes_total",
            &[("mac", mac), ("direction", direction)],
        )
    }

    fn client_service(&self, mac: &str, service: &str, direction: &str) -> u64 {
        self.sum(
            "netboot_client_bytes_total",
            &[("mac", mac), ("service", service), ("direction", direction)],
        )
    }

    fn client_total(&self, direction: &str) -> u64 {
        self.sum("netboot_client_bytes_total", &[("direction", direction)])
    }

    fn unattributed(&self, direction: &str) -> u64 {
        self.sum(
            "netboot_unattributed_bytes_total",
            &[("direction", direction)],
        )
    }

    fn uncounted(&self) -> u64 {
        self.sum("netboot_ebpf_uncounted_bytes_total", &[])
    }

    fn iface(&self, iface: &str, direction: &str) -> u64 {
        self.sum(
            "netboot_interface_bytes_total",
            &[("interface", iface), ("direction", direction)],
        )
    }

    fn macs(&self) -> Vec<&str> {
        let macs: std::collections::BTreeSet<&str> = self
            .samples
            .0
            .keys()
            .filter(|(n, _)| n == "netboot_client_bytes_total")
            .filter_map(|(_, l)| l.get("mac").map(String::as_str))
            .collect();
        macs.into_iter().collect()
    }
}

/// A real Prometheus server (Debian's, next to promtool) inside `srv` scrapes netbootd; its
/// query API must return `mac`'s series with the value netbootd served.
fn prometheus_returns_a_client_series(lab: &Lab, dir: &Path, mac: &str, metrics: &Metrics) {
    let promtool = std::env::var("NETBOOT_PROMTOOL").unwrap_or_else(|_| "promtool".into());
    let server = Path::new(&promtool).with_file_name("prometheus");
    if !server.is_file() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "prometheus is needed under CI=true (cargo xtask test fetches it)"
        );
        eprintln!("SKIPPED: no prometheus next to promtool (cargo xtask test fetches it)");
        return;
    }
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: netboot\n    static_configs:\n      - targets: ['127.0.0.1:{HTTP_PORT}']\n"
        ),
    )
    .expect("write prometheus.yml");
    let mut prometheus = KillOnDrop(
        Command::new("ip")
            .args(["netns", "exec", &lab.srv_ns()])
            .arg(&server)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg("--web.listen-address=127.0.0.1:9090")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn prometheus"),
    );
    let query =
        format!("netboot_client_bytes_total{{mac=\"{mac}\",service=\"tftp\",direction=\"tx\"}}");
    let want = metrics.sum(
        "netboot_client_bytes_total",
        &[("mac", mac), ("service", "tftp"), ("direction", "tx")],
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = Command::new("ip")
            .args(["netns", "exec", &lab.srv_ns(), "curl", "-sS", "--get"])
            .args(["--data-urlencode", &format!("query={query}")])
            .arg("http://127.0.0.1:9090/api/v1/query")
            .output()
            .expect("curl");
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        if let Some(value) = v["data"]["result"][0]["value"][1].as_str() {
            assert_eq!(
                value.parse::<u64>().expect("a number"),
                want,
                "Prometheus' value of {query}"
            );
            eprintln!("Prometheus returned {query} = {value}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never returned {query}: {v}"
        );
        assert!(
            prometheus.0.try_wait().expect("poll prometheus").is_none(),
            "prometheus exited"
        );
        std::thread::yield_now();
    }
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
