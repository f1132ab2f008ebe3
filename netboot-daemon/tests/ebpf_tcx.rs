//! Privileged end-to-end test of the eBPF accounting over a veth pair between two namespaces.
//!
//! It loads the embedded object, attaches it with TCX to the server end of the veth (from the
//! host namespace, through `in_netns`), sends known raw Ethernet frames with AF_PACKET sockets
//! in both directions, and checks that every (MAC, direction, service) row equals what was sent
//! and that the sums over all rows equal the veth's own rx/tx counter deltas exactly.
//! A second copy with room for only two entries checks that the frames it cannot keep are
//! counted as overflow, so that its rows plus its overflow again equal the veth's counters.
//! A second test does the same with the netlink/clsact fallback and checks that detaching from
//! the host namespace removes the filters inside the server namespace.
//!
//! Needs root, iproute2 (`ip`, `tc`) and a build with the eBPF object (not `AYA_BUILD_SKIP=1`).
//! Without them it prints a loud SKIPPED line, except under `CI=true`, where it fails.
//! Network traffic stays inside the namespaces each test creates; a guard deletes them (and so
//! the veth pair) even when the test panics. No sleeps: asynchronous counts are polled.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::process::Command;
use std::time::{Duration, Instant};

use netboot_common::Counters;
use netboot_daemon::ebpf::{
    Accounting, AttachMode, Direction, EbpfError, MacCounters, Options, Protocol, RouterReason,
    Service, ServicePort, in_netns,
};
use netboot_daemon::mac::MacAddr;

mod common;

use common::{Veth, netns_path, privileged};

const SRV_MAC: [u8; 6] = [0x02, 0x6e, 0x62, 0x00, 0x00, 0x01];
const CLI_MAC: [u8; 6] = [0x02, 0x6e, 0x62, 0x00, 0x00, 0x02];
/// Ingress sources (clients) and the unicast destination they send to, which is not the
/// server veth's MAC, so the server's stack drops the frames without answering.
const MAC_A: [u8; 6] = [0x02, 0x6e, 0x62, 0x00, 0x00, 0x0a];
const MAC_B: [u8; 6] = [0x02, 0x6e, 0x62, 0x00, 0x00, 0x0b];
const MAC_C: [u8; 6] = [0x02, 0x6e, 0x62, 0x00, 0x00, 0x0c];
const ELSEWHERE: [u8; 6] = [0x02, 0x6e, 0x62, 0x00, 0x00, 0xee];
/// Egress destinations (clients).
const MAC_D: [u8; 6] = [0x02, 0x6e, 0x62, 0x00, 0x00, 0x0d];
const MAC_E: [u8; 6] = [0x02, 0x6e, 0x62, 0x00, 0x00, 0x0e];
/// A router, and clients behind it.
const MAC_R: [u8; 6] = [0x02, 0x6e, 0x62, 0x00, 0x00, 0x5a];
const MAC_X: [u8; 6] = [0x02, 0x6e, 0x62, 0x00, 0x01, 0x01];
const MAC_Y: [u8; 6] = [0x02, 0x6e, 0x62, 0x00, 0x01, 0x02];
const MAC_Z: [u8; 6] = [0x02, 0x6e, 0x62, 0x00, 0x01, 0x03];

/// How long to wait for the kernel to run the ingress program on frames already counted by
/// the veth (ingress runs from the receive backlog, possibly after `sendto` returned).
const POLL_LIMIT: Duration = Duration::from_secs(10);

#[test]
fn tcx_counts_equal_what_was_sent_and_the_veth_counters() {
    let Some(accounting) = load_or_skip(1024) else {
        return;
    };

    let topo = Topology::create('t');
    let mode = in_netns(&topo.srv_path(), || accounting.attach(&topo.srv_if))
        .expect("enter the server namespace")
        .expect("attach to the server veth");
    assert_eq!(mode, AttachMode::Tcx, "TCX is expected on this kernel");

    // Room for two entries: A and B fill it, C and everything sent by the server overflow.
    let small = Accounting::load(&Options::new(2)).expect("load the eBPF object again");
    let small_mode = in_netns(&topo.srv_path(), || small.attach(&topo.srv_if))
        .expect("enter the server namespace")
        .expect("attach the small copy");
    assert_eq!(small_mode, AttachMode::Tcx);
    eprintln!("attached with {mode} to {} in {}", topo.srv_if, topo.srv_ns);

    let if_before = topo.srv_stats();
    let map_before = rows(&accounting);
    let small_before = rows(&small);
    let overflow_before = small.error_counters().expect("read errors").mac_full;

    // Ingress: client frames arrive at the server veth. A and B first, so that they are the
    // two entries the small table keeps.
    let a = Flow {
        mac: MAC_A,
        direction: Direction::Ingress,
        service: Service::Dhcp,
        frames: 37,
        frame: ipv4(ELSEWHERE, MAC_A, None, UDP, 68, 67, 100),
    };
    let b = Flow {
        mac: MAC_B,
        direction: Direction::Ingress,
        service: Service::Iscsi,
        frames: 53,
        frame: ipv6_tcp(ELSEWHERE, MAC_B, 50_000, 3260, 300),
    };
    send(&topo.cli_path(), &topo.cli_if, &[&a, &b]);
    let mut sent = totals(&[&a, &b]);
    wait_for(&accounting, sent, &map_before, Counters::default());
    wait_for(&small, sent, &small_before, overflow_before);

    // C's frames carry an 802.1Q tag, which the receive path moves out of the data before TC
    // runs; the veth counted the tagged frame, and so must the program.
    let c = Flow {
        mac: MAC_C,
        direction: Direction::Ingress,
        service: Service::Tftp,
        frames: 11,
        frame: ipv4(ELSEWHERE, MAC_C, Some(7), UDP, 40_000, 69, 200),
    };
    send(&topo.cli_path(), &topo.cli_if, &[&c]);
    let ingress_sent = totals(&[&a, &b, &c]);

    // Egress: the server veth sends to clients D (TFTP, and non-IP frames) and E (tagged HTTP).
    let d_tftp = Flow {
        mac: MAC_D,
        direction: Direction::Egress,
        service: Service::Tftp,
        frames: 29,
        frame: ipv4(MAC_D, SRV_MAC, None, UDP, 69, 40_000, 150),
    };
    let d_other = Flow {
        mac: MAC_D,
        direction: Direction::Egress,
        service: Service::Other,
        frames: 5,
        frame: raw(MAC_D, SRV_MAC, 0x88b5, 60),
    };
    let e = Flow {
        mac: MAC_E,
        direction: Direction::Egress,
        service: Service::Http,
        frames: 41,
        frame: ipv4(MAC_E, SRV_MAC, Some(42), TCP, 8080, 50_001, 250),
    };
    send(&topo.srv_path(), &topo.srv_if, &[&d_tftp, &d_other, &e]);
    let egress_sent = totals(&[&d_tftp, &d_other, &e]);
    sent = add(ingress_sent, egress_sent);
    wait_for(&accounting, sent, &map_before, Counters::default());
    wait_for(&small, sent, &small_before, overflow_before);

    let if_delta = topo.srv_stats() - if_before;
    let map = delta(&rows(&accounting), &map_before);
    let small_rows = delta(&rows(&small), &small_before);
    let overflow = small.error_counters().expect("read errors").mac_full;
    let overflow = (
        overflow.packets - overflow_before.packets,
        overflow.bytes - overflow_before.bytes,
    );

    eprintln!(
        "veth {}: rx {} frames / {} bytes, tx {} frames / {} bytes",
        topo.srv_if, if_delta.rx_packets, if_delta.rx_bytes, if_delta.tx_packets, if_delta.tx_bytes
    );
    for ((mac, direction, service), (packets, bytes)) in &map {
        eprintln!("map {mac} {direction} {service}: {packets} frames / {bytes} bytes");
    }

    // Every row is exactly what was sent, and there are no other rows.
    let flows = [&a, &b, &c, &d_tftp, &d_other, &e];
    let expected = expected_rows(&flows);
    assert_eq!(map, expected, "per-client rows differ from what was sent");

    // The sums over all rows are exactly the veth's own counters.
    let (rx, tx) = (sum(&map, Direction::Ingress), sum(&map, Direction::Egress));
    eprintln!(
        "map sums: rx {} frames / {} bytes, tx {} frames / {} bytes",
        rx.0, rx.1, tx.0, tx.1
    );
    assert_eq!(rx, ingress_sent, "ingress sum differs from what was sent");
    assert_eq!(tx, egress_sent, "egress sum differs from what was sent");
    assert_eq!(
        rx,
        (if_delta.rx_packets, if_delta.rx_bytes),
        "ingress sum != veth rx"
    );
    assert_eq!(
        tx,
        (if_delta.tx_packets, if_delta.tx_bytes),
        "egress sum != veth tx"
    );
    assert_eq!(
        accounting.error_counters().expect("read errors"),
        Default::default(),
        "no frame may go uncounted in the big table"
    );

    // The small table kept the first two clients; everything else is counted as overflow,
    // so its rows plus its overflow are again exactly the veth's counters.
    let small_expected = expected_rows(&[&a, &b]);
    eprintln!(
        "small table: {} rows, overflow {} frames / {} bytes",
        small_rows.len(),
        overflow.0,
        overflow.1
    );
    assert_eq!(small_rows, small_expected, "the small table's rows");
    let overflowed = add(totals(&[&c]), egress_sent);
    assert_eq!(overflow, overflowed, "overflow is everything but A and B");
    assert_eq!(
        small
            .error_counters()
            .expect("read overflow")
            .mac_full
            .packets
            - overflow_before.packets,
        overflowed.0
    );
    let small_all = add(
        sum(&small_rows, Direction::Ingress),
        sum(&small_rows, Direction::Egress),
    );
    assert_eq!(
        add(small_all, overflow),
        (
            if_delta.rx_packets + if_delta.tx_packets,
            if_delta.rx_bytes + if_delta.tx_bytes
        ),
        "small table rows plus overflow != veth rx + tx"
    );

    accounting.detach_all();
    small.detach_all();
}

/// A broadcast the server host sends (as proxyDHCP offers are) is counted once, as sent and
/// unattributed: the copy the kernel loops back to the host's own receive path (without an
/// Ethernet header) never crossed the wire and must not become a "client" made of IP
/// header bytes.
#[test]
fn the_hosts_own_broadcasts_are_counted_once() {
    let Some(accounting) = load_or_skip(1024) else {
        return;
    };
    let topo = Topology::create('b');
    common::ip(&[
        "-n",
        &topo.srv_ns,
        "addr",
        "add",
        "10.79.0.1/24",
        "dev",
        &topo.srv_if,
    ]);
    in_netns(&topo.srv_path(), || accounting.attach(&topo.srv_if))
        .expect("enter the server namespace")
        .expect("attach to the server veth");
    let if_before = topo.srv_stats();
    let map_before = rows(&accounting);
    let unattributed = |a: &Accounting| -> (u64, u64) {
        a.unattributed()
            .expect("read UNATTRIBUTED")
            .iter()
            .map(|u| (u.packets, u.bytes))
            .fold((0, 0), add)
    };
    let un_before = unattributed(&accounting);

    const BROADCASTS: u64 = 25;
    let dev = topo.srv_if.clone();
    in_netns(&topo.srv_path(), || -> io::Result<()> {
        let s = common::broadcast_socket(&dev)?;
        let to = std::net::SocketAddr::from(([255, 255, 255, 255], 68));
        for _ in 0..BROADCASTS {
            s.send_to(&[0u8; 300], &to.into())?;
        }
        Ok(())
    })
    .expect("enter the server namespace")
    .expect("send broadcasts");
    // A client frame after them: once it is counted, the receive backlog that held the
    // looped-back copies has run too.
    let marker = Flow {
        mac: MAC_A,
        direction: Direction::Ingress,
        service: Service::Dhcp,
        frames: 1,
        frame: ipv4(ELSEWHERE, MAC_A, None, UDP, 68, 67, 100),
    };
    send(&topo.cli_path(), &topo.cli_if, &[&marker]);
    wait_for(
        &accounting,
        marker.totals(),
        &map_before,
        Counters::default(),
    );

    let map = delta(&rows(&accounting), &map_before);
    assert_eq!(
        map,
        expected_rows(&[&marker]),
        "the only client row is the marker's"
    );
    let un = unattributed(&accounting);
    let un_delta = (un.0 - un_before.0, un.1 - un_before.1);
    let if_delta = topo.srv_stats() - if_before;
    assert_eq!(
        if_delta.tx_packets, BROADCASTS,
        "the veth sent the broadcasts"
    );
    assert_eq!(
        un_delta,
        (if_delta.tx_packets, if_delta.tx_bytes),
        "the broadcasts are counted once, as sent"
    );
    assert_eq!(
        add(
            sum(&map, Direction::Ingress),
            add(sum(&map, Direction::Egress), un_delta)
        ),
        (
            if_delta.rx_packets + if_delta.tx_packets,
            if_delta.rx_bytes + if_delta.tx_bytes
        ),
        "rows plus unattributed == veth rx + tx"
    );
    accounting.detach_all();
}

/// The clsact fallback: filters attached inside the server namespace count exactly too, and
/// `detach_all` called from the host namespace really removes them (aya alone would send the
/// netlink request in the caller's namespace and leave them behind).
#[test]
fn netlink_filters_count_and_are_detached_in_their_namespace() {
    let Some(accounting) = load_or_skip(64) else {
        return;
    };
    let topo = Topology::create('n');
    in_netns(&topo.srv_path(), || {
        accounting.attach_with_mode(&topo.srv_if, AttachMode::Netlink)
    })
    .expect("enter the server namespace")
    .expect("attach with netlink");
    let filters = topo.srv_filters();
    eprintln!("netlink filters on {}: {filters:?}", topo.srv_if);
    assert_eq!(
        filters,
        ["tc_egress", "tc_ingress"],
        "one filter per direction"
    );

    let if_before = topo.srv_stats();
    let before = rows(&accounting);
    let a = Flow {
        mac: MAC_A,
        direction: Direction::Ingress,
        service: Service::Http,
        frames: 17,
        frame: ipv4(ELSEWHERE, MAC_A, None, TCP, 50_002, 80, 120),
    };
    let d = Flow {
        mac: MAC_D,
        direction: Direction::Egress,
        service: Service::Dhcp,
        frames: 19,
        frame: ipv4(MAC_D, SRV_MAC, None, UDP, 4011, 68, 342),
    };
    send(&topo.cli_path(), &topo.cli_if, &[&a]);
    send(&topo.srv_path(), &topo.srv_if, &[&d]);
    let sent = totals(&[&a, &d]);
    wait_for(&accounting, sent, &before, Counters::default());
    let if_delta = topo.srv_stats() - if_before;
    let map = delta(&rows(&accounting), &before);
    eprintln!(
        "netlink: veth rx {} / {} bytes, tx {} / {} bytes; map {map:?}",
        if_delta.rx_packets, if_delta.rx_bytes, if_delta.tx_packets, if_delta.tx_bytes
    );
    let expected = expected_rows(&[&a, &d]);
    assert_eq!(map, expected);
    assert_eq!(
        sum(&map, Direction::Ingress),
        (if_delta.rx_packets, if_delta.rx_bytes)
    );
    assert_eq!(
        sum(&map, Direction::Egress),
        (if_delta.tx_packets, if_delta.tx_bytes)
    );

    // From the host namespace, as a daemon would at shutdown.
    accounting.detach_all();
    assert_eq!(
        topo.srv_filters(),
        Vec::<String>::new(),
        "filters left behind"
    );
}

/// How the kernel side finds a frame's client beyond the frame's own MAC: the DHCP `chaddr`
/// (and the relay that forwarded the request becomes a router), the daemon's IP → MAC
/// bindings for a router's frames (and a binding that moves moves the bytes from then on),
/// an on-link host's own MAC even when it uses a bound address, a registered transfer port,
/// and the unattributed bucket for group addresses and a router's unbound traffic.
/// Every byte lands in exactly one bucket, and the connection rows hold the L4 payload.
#[test]
fn clients_are_found_by_chaddr_binding_and_router() {
    let Some(accounting) = load_or_skip(1024) else {
        return;
    };
    let topo = Topology::create('a');
    in_netns(&topo.srv_path(), || accounting.attach(&topo.srv_if))
        .expect("enter the server namespace")
        .expect("attach to the server veth");
    accounting
        .set_port(ServicePort {
            protocol: Protocol::Udp,
            port: 40_000,
            service: Service::Tftp,
        })
        .expect("register a transfer port");
    let if_before = topo.srv_stats();
    let (server_ip, relay_ip) = ([10, 9, 0, 100], [10, 9, 0, 1]);
    let (bound_ip, unbound_ip) = ([10, 9, 1, 5], [10, 9, 1, 6]);

    // A relayed DHCP request arrives from the router, for MAC_Y.
    let relayed = Flow {
        mac: MAC_Y,
        direction: Direction::Ingress,
        service: Service::Dhcp,
        frames: 3,
        frame: ipv4_addr(
            (ELSEWHERE, MAC_R),
            (relay_ip, server_ip),
            (UDP, 67, 67),
            342,
            &bootp_request(relay_ip, MAC_Y),
        ),
    };
    send(&topo.cli_path(), &topo.cli_if, &[&relayed]);
    poll(|| accounting.routers().expect("read ROUTERS").len() == 1);
    assert_eq!(
        accounting.routers().expect("read ROUTERS"),
        [(MacAddr(MAC_R), RouterReason::DhcpRelay)],
        "the relay is known as a router"
    );

    // A routed client the daemon bound, one it did not, TFTP on the transfer port, and a
    // broadcast.
    accounting
        .bind(std::net::Ipv4Addr::from(bound_ip).into(), MacAddr(MAC_X))
        .expect("bind");
    let http = |from: [u8; 4], port: u16| {
        ipv4_addr(
            (ELSEWHERE, MAC_R),
            (from, server_ip),
            (TCP, port, 80),
            300,
            &[],
        )
    };
    let bound = Flow {
        mac: MAC_X,
        direction: Direction::Ingress,
        service: Service::Http,
        frames: 7,
        frame: http(bound_ip, 50_000),
    };
    let unbound_frames = 5;
    let unbound = Flow {
        mac: ELSEWHERE, // not counted under any MAC
        direction: Direction::Ingress,
        service: Service::Http,
        frames: unbound_frames,
        frame: http(unbound_ip, 50_001),
    };
    let transfer = Flow {
        mac: MAC_D,
        direction: Direction::Egress,
        service: Service::Tftp,
        frames: 9,
        frame: ipv4_addr(
            (MAC_D, SRV_MAC),
            (server_ip, [10, 9, 0, 7]),
            (UDP, 40_000, 2_000),
            600,
            &[],
        ),
    };
    let broadcast = Flow {
        mac: [0xff; 6],
        direction: Direction::Egress,
        service: Service::Other,
        frames: 4,
        frame: raw([0xff; 6], SRV_MAC, 0x88b5, 80),
    };
    send(&topo.cli_path(), &topo.cli_if, &[&bound, &unbound]);
    send(&topo.srv_path(), &topo.srv_if, &[&transfer, &broadcast]);

    // The address moves to MAC_Z: from now on its bytes are MAC_Z's.
    accounting
        .bind(std::net::Ipv4Addr::from(bound_ip).into(), MacAddr(MAC_Z))
        .expect("rebind");
    let moved = Flow {
        mac: MAC_Z,
        direction: Direction::Ingress,
        service: Service::Http,
        frames: 2,
        frame: http(bound_ip, 50_000),
    };
    send(&topo.cli_path(), &topo.cli_if, &[&moved]);

    // An on-link client that uses the bound address is still itself.
    let on_link = Flow {
        mac: MAC_E,
        direction: Direction::Ingress,
        service: Service::Http,
        frames: 6,
        frame: ipv4_addr(
            (ELSEWHERE, MAC_E),
            (bound_ip, server_ip),
            (TCP, 50_002, 80),
            200,
            &[],
        ),
    };
    send(&topo.cli_path(), &topo.cli_if, &[&on_link]);

    let all = [
        &relayed, &bound, &unbound, &transfer, &broadcast, &moved, &on_link,
    ];
    let want = totals(&all);
    poll(|| add(all_rows(&accounting), unattributed_total(&accounting)) == want);
    let if_delta = topo.srv_stats() - if_before;

    let map = rows(&accounting);
    assert_eq!(
        map,
        expected_rows(&[&relayed, &bound, &transfer, &moved, &on_link]),
        "client rows"
    );
    let unattributed: BTreeMap<(Direction, Service), (u64, u64)> = accounting
        .unattributed()
        .expect("read UNATTRIBUTED")
        .into_iter()
        .map(|r| ((r.direction, r.service), (r.packets, r.bytes)))
        .collect();
    assert_eq!(
        unattributed,
        BTreeMap::from([
            ((Direction::Ingress, Service::Http), unbound.totals()),
            ((Direction::Egress, Service::Other), broadcast.totals()),
        ]),
        "unattributed rows"
    );
    assert_eq!(
        add(sum(&map, Direction::Ingress), unbound.totals()),
        (if_delta.rx_packets, if_delta.rx_bytes),
        "ingress: client rows + unattributed != veth rx"
    );
    assert_eq!(
        add(sum(&map, Direction::Egress), broadcast.totals()),
        (if_delta.tx_packets, if_delta.tx_bytes),
        "egress: client rows + unattributed != veth tx"
    );

    // Connection rows: wire bytes and payload (frame minus Ethernet, IPv4 and L4 headers).
    let sock = |ip: [u8; 4], port: u16| std::net::SocketAddr::from((ip, port));
    let http_flow = accounting
        .flow(Protocol::Tcp, sock(bound_ip, 50_000), sock(server_ip, 80))
        .expect("read FLOWS")
        .expect("the bound client's connection is counted");
    assert_eq!(http_flow.rx_packets, bound.frames + moved.frames);
    assert_eq!(http_flow.rx_bytes, bound.totals().1 + moved.totals().1);
    assert_eq!(
        http_flow.rx_payload,
        (bound.frames + moved.frames) * (300 - 14 - 20 - 20)
    );
    assert_eq!(http_flow.tx_packets, 0);
    let tftp_flow = accounting
        .flow(
            Protocol::Udp,
            sock([10, 9, 0, 7], 2_000),
            sock(server_ip, 40_000),
        )
        .expect("read FLOWS")
        .expect("the transfer is counted");
    assert_eq!(
        (
            tftp_flow.tx_packets,
            tftp_flow.tx_bytes,
            tftp_flow.tx_payload
        ),
        (9, transfer.totals().1, 9 * (600 - 14 - 20 - 8))
    );
    assert_eq!(
        accounting.flows().expect("read FLOWS").len(),
        4,
        "one row per connection: bound, unbound, on-link, transfer"
    );
    assert_eq!(
        accounting.error_counters().expect("read errors"),
        Default::default()
    );
    accounting.detach_all();
}

/// Loads the eBPF object with room for `max_macs` clients, or says why the test is
/// skipped (no privilege or tools, or built without the object).
fn load_or_skip(max_macs: u32) -> Option<Accounting> {
    if let Err(why) = can_run() {
        skip(&why);
        return None;
    }
    match Accounting::load(&Options::new(max_macs)) {
        Ok(accounting) => Some(accounting),
        Err(EbpfError::NotBuilt) => {
            skip("built with AYA_BUILD_SKIP=1, no eBPF object");
            None
        }
        Err(e) => panic!("load the eBPF object: {e:?}"),
    }
}

/// The rows the map must hold for `flows`: each flow's totals under its key.
fn expected_rows(flows: &[&Flow]) -> Table {
    flows
        .iter()
        .map(|f| ((MacAddr(f.mac), f.direction, f.service), f.totals()))
        .collect()
}

/// Reports why the test cannot run: loudly, and as a failure under `CI=true`.
fn skip(why: &str) {
    common::skip("ebpf_tcx (needs root, iproute2 and the eBPF object)", why);
}

/// Why the test cannot run here, if it cannot.
fn can_run() -> Result<(), String> {
    privileged(&["ip", "tc"])
}

/// The test's two namespaces and veth pair, with IPv6 off and no IPv4 address: the only
/// frames on the veth are the test's own.
struct Topology(Veth);

impl std::ops::Deref for Topology {
    type Target = Veth;

    fn deref(&self) -> &Veth {
        &self.0
    }
}

impl Topology {
    /// `tag` tells apart the topologies of tests running at the same time.
    fn create(tag: char) -> Self {
        let topo = Self(Veth::create(
            "nbt",
            tag,
            &MacAddr(SRV_MAC).to_string(),
            &MacAddr(CLI_MAC).to_string(),
            true,
        ));
        for (ns, iface) in [(&topo.srv_ns, &topo.srv_if), (&topo.cli_ns, &topo.cli_if)] {
            let ipv6_off = in_netns(&netns_path(ns), || {
                std::fs::read_to_string(format!("/proc/sys/net/ipv6/conf/{iface}/disable_ipv6"))
            })
            .expect("enter the namespace")
            .expect("read disable_ipv6");
            assert_eq!(ipv6_off.trim(), "1", "IPv6 must be off on {iface}");
        }
        topo
    }

    /// Names of the BPF filters on the server veth's clsact qdisc, sorted.
    fn srv_filters(&self) -> Vec<String> {
        let mut names = Vec::new();
        for parent in ["ingress", "egress"] {
            let out = Command::new("tc")
                .args([
                    "-n",
                    &self.srv_ns,
                    "-j",
                    "filter",
                    "show",
                    "dev",
                    &self.srv_if,
                    parent,
                ])
                .output()
                .expect("run tc filter show");
            assert!(
                out.status.success(),
                "tc: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            if out.stdout.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let json: serde_json::Value =
                serde_json::from_slice(&out.stdout).expect("tc -j output");
            for filter in json.as_array().expect("a list of filters") {
                if let Some(name) = filter["options"]["bpf_name"].as_str() {
                    names.push(name.to_owned());
                }
            }
        }
        names.sort();
        names
    }

    /// The server veth's own counters, read with `ip -s` inside its namespace
    /// (this process's /sys shows the host namespace's interfaces).
    fn srv_stats(&self) -> IfStats {
        let out = Command::new("ip")
            .args([
                "-n",
                &self.srv_ns,
                "-j",
                "-s",
                "link",
                "show",
                "dev",
                &self.srv_if,
            ])
            .output()
            .expect("run ip -s link");
        assert!(
            out.status.success(),
            "ip -s link: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j output");
        let stats = &json[0]["stats64"];
        let field = |dir: &str, what: &str| {
            stats[dir][what]
                .as_u64()
                .unwrap_or_else(|| panic!("no stats64.{dir}.{what} in {json}"))
        };
        IfStats {
            rx_packets: field("rx", "packets"),
            rx_bytes: field("rx", "bytes"),
            tx_packets: field("tx", "packets"),
            tx_bytes: field("tx", "bytes"),
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct IfStats {
    rx_packets: u64,
    rx_bytes: u64,
    tx_packets: u64,
    tx_bytes: u64,
}

impl std::ops::Sub for IfStats {
    type Output = Self;

    fn sub(self, before: Self) -> Self {
        Self {
            rx_packets: self.rx_packets - before.rx_packets,
            rx_bytes: self.rx_bytes - before.rx_bytes,
            tx_packets: self.tx_packets - before.tx_packets,
            tx_bytes: self.tx_bytes - before.tx_bytes,
        }
    }
}

/// Frames of one (client, direction, service): `frames` copies of `frame`.
struct Flow {
    mac: [u8; 6],
    direction: Direction,
    service: Service,
    frames: u64,
    frame: Vec<u8>,
}

impl Flow {
    fn totals(&self) -> (u64, u64) {
        let len = u64::try_from(self.frame.len()).expect("frame length fits u64");
        (self.frames, self.frames * len)
    }
}

fn totals(flows: &[&Flow]) -> (u64, u64) {
    flows.iter().map(|f| f.totals()).fold((0, 0), add)
}

type Key = (MacAddr, Direction, Service);
type Table = BTreeMap<Key, (u64, u64)>;

fn rows(accounting: &Accounting) -> Table {
    accounting
        .mac_counters()
        .expect("read MAC_STATS")
        .into_iter()
        .map(
            |MacCounters {
                 mac,
                 direction,
                 service,
                 packets,
                 bytes,
                 ..
             }| { ((mac, direction, service), (packets, bytes)) },
        )
        .collect()
}

/// Rows that changed since `before`, with their increase.
fn delta(after: &Table, before: &Table) -> Table {
    after
        .iter()
        .filter_map(|(key, &(packets, bytes))| {
            let (p0, b0) = before.get(key).copied().unwrap_or_default();
            (packets != p0 || bytes != b0).then_some((*key, (packets - p0, bytes - b0)))
        })
        .collect()
}

fn sum(table: &Table, direction: Direction) -> (u64, u64) {
    table
        .iter()
        .filter(|((_, d, _), _)| *d == direction)
        .fold((0, 0), |acc, (_, v)| add(acc, *v))
}

/// Polls until the rows plus the overflow have grown by `want` since `before`/`overflow_before`.
///
/// The veth counts a frame when the sender's `sendto` hands it over; the ingress program runs
/// when the receive backlog is processed, which may be after `sendto` returned.
fn wait_for(accounting: &Accounting, want: (u64, u64), before: &Table, overflow_before: Counters) {
    let deadline = Instant::now() + POLL_LIMIT;
    loop {
        let table = delta(&rows(accounting), before);
        let overflow = accounting.error_counters().expect("read errors").mac_full;
        let got = add(
            add(
                sum(&table, Direction::Ingress),
                sum(&table, Direction::Egress),
            ),
            (
                overflow.packets - overflow_before.packets,
                overflow.bytes - overflow_before.bytes,
            ),
        );
        if got >= want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "counted {got:?} of {want:?} after {POLL_LIMIT:?}"
        );
        std::thread::yield_now();
    }
}

fn add(a: (u64, u64), b: (u64, u64)) -> (u64, u64) {
    (a.0 + b.0, a.1 + b.1)
}

/// Sends every flow's frames from `iface` in the namespace at `netns`, on a thread of its own
/// that enters the namespace, so the test's thread never switches.
fn send(netns: &std::path::Path, iface: &str, flows: &[&Flow]) {
    std::thread::scope(|s| {
        s.spawn(|| {
            in_netns(netns, || {
                let socket = PacketSocket::open(iface).expect("open an AF_PACKET socket");
                for flow in flows {
                    for _ in 0..flow.frames {
                        socket.send(&flow.frame);
                    }
                }
            })
            .expect("enter the sender's namespace");
        })
        .join()
        .expect("sender thread");
    });
}

/// A raw AF_PACKET socket bound to nothing, sending on one interface.
struct PacketSocket {
    fd: OwnedFd,
    ifindex: i32,
}

impl PacketSocket {
    fn open(iface: &str) -> io::Result<Self> {
        // SAFETY: socket(2) with constant arguments; the result is checked before use.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let name = CString::new(iface)?;
        // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            return Err(io::Error::last_os_error());
        }
        let ifindex = i32::try_from(ifindex).expect("ifindex fits i32");
        Ok(Self { fd, ifindex })
    }

    /// Sends one complete Ethernet frame (no FCS) and checks that all of it went out.
    fn send(&self, frame: &[u8]) {
        // SAFETY: sockaddr_ll is plain integers, for which all-zero is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = u16::try_from(libc::AF_PACKET).expect("AF_PACKET fits u16");
        addr.sll_ifindex = self.ifindex;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        let addr_len = u32::try_from(size_of::<libc::sockaddr_ll>()).expect("fits u32");
        // SAFETY: the buffer and length describe `frame`, and `addr`/`addr_len` describe a valid
        // sockaddr_ll; all outlive the call.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const addr).cast(),
                addr_len,
            )
        };
        assert_eq!(
            usize::try_from(sent)
                .map_err(|_| io::Error::last_os_error())
                .expect("sendto"),
            frame.len(),
            "short send"
        );
    }
}

const TCP: u8 = 6;
const UDP: u8 = 17;

/// Ethernet header, with an optional 802.1Q tag, for `ethertype`.
fn ethernet(dst: [u8; 6], src: [u8; 6], vlan: Option<u16>, ethertype: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(1514);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    if let Some(vid) = vlan {
        f.extend_from_slice(&0x8100u16.to_be_bytes());
        f.extend_from_slice(&vid.to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// The first bytes of a TCP or UDP header: ports, then zeros (TCP with data offset 5).
fn l4(protocol: u8, src_port: u16, dst_port: u16) -> Vec<u8> {
    let mut h = Vec::with_capacity(20);
    h.extend_from_slice(&src_port.to_be_bytes());
    h.extend_from_slice(&dst_port.to_be_bytes());
    if protocol == TCP {
        h.extend_from_slice(&[0; 8]);
        h.extend_from_slice(&[0x50, 0x10, 0xff, 0xff, 0, 0, 0, 0]);
    } else {
        h.extend_from_slice(&[0; 4]);
    }
    h
}

/// An IPv4 frame of exactly `len` bytes to or from the given ports.
fn ipv4(
    dst: [u8; 6],
    src: [u8; 6],
    vlan: Option<u16>,
    protocol: u8,
    src_port: u16,
    dst_port: u16,
    len: usize,
) -> Vec<u8> {
    ipv4_frame(
        (dst, src),
        vlan,
        ([192, 0, 2, 1], [192, 0, 2, 2]),
        (protocol, src_port, dst_port),
        len,
        &[],
    )
}

/// An untagged IPv4 frame of exactly `len` bytes between the given MACs (dst, src),
/// addresses (src, dst) and ports (protocol, src, dst), whose L4 payload starts with `payload`.
fn ipv4_addr(
    macs: ([u8; 6], [u8; 6]),
    ips: ([u8; 4], [u8; 4]),
    ports: (u8, u16, u16),
    len: usize,
    payload: &[u8],
) -> Vec<u8> {
    ipv4_frame(macs, None, ips, ports, len, payload)
}

fn ipv4_frame(
    (dst, src): ([u8; 6], [u8; 6]),
    vlan: Option<u16>,
    (src_ip, dst_ip): ([u8; 4], [u8; 4]),
    (protocol, src_port, dst_port): (u8, u16, u16),
    len: usize,
    payload: &[u8],
) -> Vec<u8> {
    let mut f = ethernet(dst, src, vlan, 0x0800);
    let ip_len = u16::try_from(len - f.len()).expect("frame fits one IPv4 packet");
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&ip_len.to_be_bytes());
    f.extend_from_slice(&[0, 0, 0x40, 0, 64, protocol, 0, 0]);
    f.extend_from_slice(&src_ip);
    f.extend_from_slice(&dst_ip);
    let mut l4 = l4(protocol, src_port, dst_port);
    if protocol == UDP {
        let udp_len = u16::try_from(len - f.len()).expect("fits");
        l4[4..6].copy_from_slice(&udp_len.to_be_bytes());
    }
    f.extend_from_slice(&l4);
    f.extend_from_slice(payload);
    f.resize(len, 0xa5);
    f
}

/// The fixed BOOTP header of a relayed DHCP request (RFC 2131 section 2) for `chaddr`.
fn bootp_request(giaddr: [u8; 4], chaddr: [u8; 6]) -> Vec<u8> {
    let mut b = vec![1, 1, 6, 1]; // op BOOTREQUEST, htype Ethernet, hlen 6, hops 1
    b.extend_from_slice(&[0x12, 0x34, 0x56, 0x78, 0, 0, 0, 0]); // xid, secs, flags
    b.extend_from_slice(&[0; 12]); // ciaddr, yiaddr, siaddr
    b.extend_from_slice(&giaddr);
    b.extend_from_slice(&chaddr);
    b.extend_from_slice(&[0; 10]);
    b
}

/// Polls `done` until it holds, for at most [`POLL_LIMIT`].
fn poll(mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + POLL_LIMIT;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "not reached after {POLL_LIMIT:?}"
        );
        std::thread::yield_now();
    }
}

/// Frames and bytes over all client rows.
fn all_rows(accounting: &Accounting) -> (u64, u64) {
    let map = rows(accounting);
    add(sum(&map, Direction::Ingress), sum(&map, Direction::Egress))
}

/// Frames and bytes over all unattributed rows.
fn unattributed_total(accounting: &Accounting) -> (u64, u64) {
    accounting
        .unattributed()
        .expect("read UNATTRIBUTED")
        .iter()
        .fold((0, 0), |acc, r| add(acc, (r.packets, r.bytes)))
}

/// An IPv6 TCP frame of exactly `len` bytes.
fn ipv6_tcp(dst: [u8; 6], src: [u8; 6], src_port: u16, dst_port: u16, len: usize) -> Vec<u8> {
    let mut f = ethernet(dst, src, None, 0x86dd);
    let payload_len = u16::try_from(len - f.len() - 40).expect("frame fits one IPv6 packet");
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&payload_len.to_be_bytes());
    f.extend_from_slice(&[TCP, 64]);
    let mut addr = [0u8; 16];
    addr[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
    addr[15] = 1;
    f.extend_from_slice(&addr);
    addr[15] = 2;
    f.extend_from_slice(&addr);
    f.extend_from_slice(&l4(TCP, src_port, dst_port));
    f.resize(len, 0xa5);
    f
}

/// A non-IP frame of exactly `len` bytes (0x88b5 is the IEEE local experimental EtherType).
fn raw(dst: [u8; 6], src: [u8; 6], ethertype: u16, len: usize) -> Vec<u8> {
    let mut f = ethernet(dst, src, None, ethertype);
    f.resize(len, 0xa5);
    f
}
