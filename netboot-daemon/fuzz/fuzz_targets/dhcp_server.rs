//! The DHCP cores fed arbitrary datagrams: each input is a sequence of records
//! `[time step: u8][length: u8][payload]`. A payload starting with an even byte is a raw
//! datagram; one starting with an odd byte describes a request of one of four clients
//! (message type, requested address, `ciaddr`, server identifier, relay), built with
//! dhcproto, with the rest of the payload spliced in as raw options, so that the server's
//! state machine is reached with real sequences. Every datagram that `dhcp::wire` decodes goes to
//! the proxy core on both ports and to the server core; nothing panics, every reply
//! encodes, and the server never acknowledges an address to a client while another
//! client's lease on it runs.
#![no_main]

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};

use dhcproto::v4::{Encodable, Encoder, Message, MessageType};
use libfuzzer_sys::fuzz_target;
use netboot_daemon::dhcp::proxy::{self, BootFiles, Context, Port};
use netboot_daemon::dhcp::pxe::IpxeFeature;
use netboot_daemon::dhcp::server::{Config, Meta, Pool, Reservation, Server};
use netboot_daemon::dhcp::{RecvMeta, wire};

const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);

fn encodes(m: &Message) {
    let mut out = Vec::new();
    m.encode(&mut Encoder::new(&mut out)).expect("a reply always encodes");
}

/// A request from client `who % 4`, as described by the fuzz input.
fn build(ty: u8, who: u8, req: u8, ci: u8, sid: u8, relay: u8, extra: &[u8]) -> Vec<u8> {
    use dhcproto::v4::DhcpOption;
    let mut m = Message::default();
    m.set_xid(u32::from(who)).set_chaddr(&[2, 0, 0, 0, 0, who % 4 + 1]);
    let net = if relay & 1 == 1 { [10, 1, 0] } else { [10, 0, 0] };
    let addr = |last: u8| Ipv4Addr::new(net[0], net[1], net[2], last % 16);
    if relay & 1 == 1 {
        m.set_giaddr(Ipv4Addr::new(10, 1, 0, 1));
    }
    if ci != 0 {
        m.set_ciaddr(addr(ci));
    }
    let o = m.opts_mut();
    o.insert(DhcpOption::MessageType(MessageType::from(ty % 9)));
    if req != 0 {
        o.insert(DhcpOption::RequestedIpAddress(addr(req)));
    }
    match sid % 3 {
        1 => {
            o.insert(DhcpOption::ServerIdentifier(SERVER));
        }
        2 => {
            o.insert(DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 0, 0, 2)));
        }
        _ => {}
    }
    let mut out = Vec::new();
    m.encode(&mut Encoder::new(&mut out)).expect("a request encodes");
    if let Some(end) = out.iter().rposition(|&b| b == 255) {
        out.splice(end..end, extra.iter().copied());
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let ctx = Context {
        http_port: 8080,
        files: BootFiles::default(),
        ipxe_required: vec![IpxeFeature(27)],
    };
    let mut server = Server::new(Config {
        pools: vec![
            Pool {
                network: Ipv4Addr::new(10, 0, 0, 0),
                prefix: 24,
                first: Ipv4Addr::new(10, 0, 0, 10),
                last: Ipv4Addr::new(10, 0, 0, 13),
                router: Some(SERVER),
                dns: vec![],
                domain: Some("fuzz".into()),
                lease_secs: 120,
                interface: None,
            },
            Pool {
                network: Ipv4Addr::new(10, 1, 0, 0),
                prefix: 16,
                first: Ipv4Addr::new(10, 1, 0, 10),
                last: Ipv4Addr::new(10, 1, 0, 11),
                router: None,
                dns: vec![],
                domain: None,
                lease_secs: 60,
                interface: None,
            },
        ],
        reservations: vec![Reservation {
            mac: "02:00:00:00:00:01".parse().expect("mac"),
            ip: Ipv4Addr::new(10, 0, 0, 5),
            hostname: None,
        }],
        offer_secs: 10,
        decline_secs: 30,
    });
    let addrs = [SERVER];
    let mut now = 1_800_000_000u64;
    // address -> (chaddr, lease end) of every ACK given
    let mut acked: HashMap<Ipv4Addr, (Vec<u8>, u64)> = HashMap::new();
    let client = |m: &Message| m.chaddr().get(..6).map(<[u8]>::to_vec).unwrap_or_default();
    let mut rest = data;
    while let [step, len, tail @ ..] = rest {
        let Some((dgram, after)) = tail.split_at_checked(usize::from(*len)) else { break };
        rest = after;
        now += u64::from(*step);
        server.expire(now);
        while server.poll_event().is_some() {}
        let bytes = match dgram {
            [kind, ty, who, req, ci, sid, relay, extra @ ..] if kind & 1 == 1 => {
                build(*ty, *who, *req, *ci, *sid, *relay, extra)
            }
            [_, raw @ ..] => raw.to_vec(),
            [] => continue,
        };
        let Ok(msg) = wire::decode(&bytes) else { continue };
        // As the datagram would arrive: from the relay, from the client's address, or
        // broadcast from 0.0.0.0.
        let (gi, ci) = (msg.giaddr(), msg.ciaddr());
        let recv = match (gi.is_unspecified(), ci.is_unspecified()) {
            (false, _) => RecvMeta { ifindex: 2, src: SocketAddrV4::new(gi, 67), dst: SERVER },
            (true, false) => RecvMeta { ifindex: 2, src: SocketAddrV4::new(ci, 68), dst: SERVER },
            (true, true) => RecvMeta {
                ifindex: 2,
                src: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68),
                dst: Ipv4Addr::BROADCAST,
            },
        };
        let meta = Meta { recv, iface: "eth0", addrs: &addrs };
        for port in [Port::Dhcp, Port::Pxe] {
            if let Ok(r) = proxy::handle(&msg, port, &meta, &ctx) {
                encodes(&r.message);
            }
        }
        if matches!(msg.opts().msg_type(), Some(MessageType::Release | MessageType::Decline)) {
            // The holder gives its address up (the server checks that it is the holder).
            for (holder, until) in acked.values_mut() {
                if *holder == client(&msg) {
                    *until = (*until).min(now);
                }
            }
        }
        let Ok(Some(reply)) = server.handle(now, &msg, &meta, &ctx) else { continue };
        encodes(&reply.message);
        if reply.message.opts().msg_type() == Some(MessageType::Ack)
            && let Some(ip) = reply.ip
        {
            if let Some((holder, until)) = acked.get(&ip) {
                assert!(
                    *holder == client(&msg) || *until <= now,
                    "{ip} acknowledged to {:?} while {holder:?} holds it until {until} (now {now})",
                    msg.chaddr()
                );
            }
            for (other, entry) in &mut acked {
                if *other != ip && entry.0 == client(&msg) {
                    entry.1 = entry.1.min(now);
                }
            }
            let lease = reply.message.opts().get(dhcproto::v4::OptionCode::AddressLeaseTime);
            let secs = match lease {
                Some(dhcproto::v4::DhcpOption::AddressLeaseTime(s)) => u64::from(*s),
                _ => 0,
            };
            acked.insert(ip, (client(&msg), now + secs));
        }
    }
});
