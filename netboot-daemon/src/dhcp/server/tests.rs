//! The server's decisions for DORA, reservations, renewals, INIT-REBOOT, release,
//! decline, relays, INFORM and PXE clients. Every message goes through dhcproto's
//! encoder and decoder, as on the wire.

use dhcproto::v4::{Architecture, Decodable, Decoder, Encodable, Encoder, UnknownOption, relay};
use proptest::prelude::*;

use super::*;
use crate::dhcp::proxy::BootFiles;
use crate::dhcp::pxe::IpxeFeature;
use crate::net::RecvMeta;
use std::net::SocketAddrV4;

const SERVER: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 1);
const NOW: u64 = 1_800_000_000;

fn pool() -> Pool {
    Pool {
        network: Ipv4Addr::new(10, 9, 0, 0),
        prefix: 24,
        first: Ipv4Addr::new(10, 9, 0, 100),
        last: Ipv4Addr::new(10, 9, 0, 109),
        router: Some(Ipv4Addr::new(10, 9, 0, 254)),
        dns: vec![Ipv4Addr::new(10, 9, 0, 53)],
        domain: Some("lab.example".into()),
        lease_secs: 3600,
        interface: None,
    }
}

fn relayed_pool() -> Pool {
    Pool {
        network: Ipv4Addr::new(10, 20, 0, 0),
        prefix: 16,
        first: Ipv4Addr::new(10, 20, 1, 0),
        last: Ipv4Addr::new(10, 20, 1, 255),
        router: Some(Ipv4Addr::new(10, 20, 0, 1)),
        dns: vec![],
        domain: None,
        lease_secs: 600,
        interface: None,
    }
}

fn server() -> Server {
    Server::new(Config {
        pools: vec![pool(), relayed_pool()],
        reservations: vec![Reservation {
            mac: mac(0xee),
            ip: Ipv4Addr::new(10, 9, 0, 10),
            hostname: Some("build-01".into()),
        }],
        offer_secs: 60,
        decline_secs: 600,
    })
}

/// How `m` reaches the server on br0, whose address is `SERVER`: broadcast from 0.0.0.0
/// until the client has an address (`ciaddr`), then unicast from it; from the relay
/// when relayed.
fn meta_for(m: &Message) -> Meta<'static> {
    let (ci, gi) = (m.ciaddr(), m.giaddr());
    let recv = if !gi.is_unspecified() {
        RecvMeta {
            ifindex: 2,
            src: SocketAddrV4::new(gi, 67),
            dst: SERVER,
        }
    } else if !ci.is_unspecified() {
        RecvMeta {
            ifindex: 2,
            src: SocketAddrV4::new(ci, 68),
            dst: SERVER,
        }
    } else {
        RecvMeta {
            ifindex: 2,
            src: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68),
            dst: Ipv4Addr::BROADCAST,
        }
    };
    Meta {
        recv,
        iface: "br0",
        addrs: &[SERVER],
    }
}

fn pxe() -> proxy::Context {
    proxy::Context {
        http_port: 8080,
        files: BootFiles::default(),
        ipxe_required: vec![],
    }
}

fn mac(last: u8) -> MacAddr {
    MacAddr([0x52, 0x54, 0, 0, 0, last])
}

fn round_trip(m: &Message) -> Message {
    let mut buf = Vec::new();
    m.encode(&mut Encoder::new(&mut buf)).expect("encode");
    Message::decode(&mut Decoder::new(&buf)).expect("decode")
}

fn msg(kind: MessageType, client: MacAddr, opts: &[DhcpOption]) -> Message {
    let mut m = Message::default();
    m.set_xid(0xabcd_0000 | u32::from(client.0[5]))
        .set_chaddr(&client.0);
    m.opts_mut().insert(DhcpOption::MessageType(kind));
    for o in opts {
        m.opts_mut().insert(o.clone());
    }
    round_trip(&m)
}

fn handle(s: &mut Server, now: u64, m: &Message) -> Result<Option<Reply>, Ignored> {
    s.handle(now, m, &meta_for(m), &pxe()).map(|r| {
        r.map(|mut r| {
            r.message = round_trip(&r.message);
            r
        })
    })
}

fn reply(s: &mut Server, now: u64, m: &Message) -> Reply {
    handle(s, now, m).expect("answered").expect("a reply")
}

/// DISCOVER then REQUEST (selecting): the address acknowledged.
fn dora(s: &mut Server, now: u64, client: MacAddr) -> Ipv4Addr {
    let offer = reply(s, now, &msg(MessageType::Discover, client, &[]));
    assert_eq!(offer.kind(), Some(MessageType::Offer));
    let ip = offer.message.yiaddr();
    let ack = reply(
        s,
        now,
        &msg(
            MessageType::Request,
            client,
            &[
                DhcpOption::ServerIdentifier(SERVER),
                DhcpOption::RequestedIpAddress(ip),
            ],
        ),
    );
    assert_eq!(ack.kind(), Some(MessageType::Ack));
    assert_eq!(ack.message.yiaddr(), ip);
    ip
}

fn events(s: &mut Server) -> Vec<LeaseEvent> {
    std::iter::from_fn(|| s.poll_event()).collect()
}

#[test]
fn dora_hands_out_an_address_of_the_range_with_the_pools_options() {
    let mut s = server();
    let offer = reply(&mut s, NOW, &msg(MessageType::Discover, mac(1), &[]));
    let ip = offer.message.yiaddr();
    assert!(pool().in_range(ip), "{ip}");
    assert_eq!(offer.to, Destination::Broadcast);
    assert!(offer.message.flags().broadcast());
    let o = offer.message.opts();
    assert_eq!(
        o.get(OptionCode::ServerIdentifier),
        Some(&DhcpOption::ServerIdentifier(SERVER))
    );
    assert_eq!(
        o.get(OptionCode::SubnetMask),
        Some(&DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0)))
    );
    assert_eq!(
        o.get(OptionCode::Router),
        Some(&DhcpOption::Router(vec![Ipv4Addr::new(10, 9, 0, 254)]))
    );
    assert_eq!(
        o.get(OptionCode::DomainNameServer),
        Some(&DhcpOption::DomainNameServer(vec![Ipv4Addr::new(
            10, 9, 0, 53
        )]))
    );
    assert_eq!(
        o.get(OptionCode::DomainName),
        Some(&DhcpOption::DomainName("lab.example".into()))
    );
    assert_eq!(
        o.get(OptionCode::BroadcastAddr),
        Some(&DhcpOption::BroadcastAddr(Ipv4Addr::new(10, 9, 0, 255)))
    );
    assert_eq!(
        o.get(OptionCode::AddressLeaseTime),
        Some(&DhcpOption::AddressLeaseTime(3600))
    );
    assert_eq!(o.get(OptionCode::Renewal), Some(&DhcpOption::Renewal(1800)));
    assert_eq!(
        o.get(OptionCode::Rebinding),
        Some(&DhcpOption::Rebinding(3150))
    );
    assert!(
        o.get(OptionCode::BootfileName).is_none(),
        "no boot file for a plain client"
    );
    assert!(events(&mut s).is_empty(), "an offer is not persisted");

    let acked = dora(&mut s, NOW, mac(1));
    assert_eq!(acked, ip, "the client gets what it was offered");
    assert_eq!(
        events(&mut s),
        vec![LeaseEvent::Saved(Lease {
            ip,
            mac: mac(1),
            expires: NOW + 3600,
            state: LeaseState::Bound,
            hostname: None,
        })]
    );
}

#[test]
fn clients_get_distinct_addresses_and_keep_theirs() {
    let mut s = server();
    let ips: Vec<Ipv4Addr> = (1..=10).map(|i| dora(&mut s, NOW, mac(i))).collect();
    let mut unique = ips.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 10, "{ips:?}");
    // The pool has 10 addresses: an 11th client gets nothing.
    assert_eq!(
        handle(&mut s, NOW, &msg(MessageType::Discover, mac(11), &[])),
        Err(Ignored::PoolExhausted)
    );
    // A client that comes back is offered its address again.
    let again = reply(&mut s, NOW + 5, &msg(MessageType::Discover, mac(3), &[]));
    assert_eq!(again.message.yiaddr(), ips[2]);
}

#[test]
fn a_reservation_gives_its_address_and_host_name() {
    let mut s = server();
    let offer = reply(&mut s, NOW, &msg(MessageType::Discover, mac(0xee), &[]));
    assert_eq!(offer.message.yiaddr(), Ipv4Addr::new(10, 9, 0, 10));
    assert_eq!(
        offer.message.opts().get(OptionCode::Hostname),
        Some(&DhcpOption::Hostname("build-01".into()))
    );
    // Nobody else gets the reserved address, even asking for it.
    let other = reply(
        &mut s,
        NOW,
        &msg(
            MessageType::Discover,
            mac(1),
            &[DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 9, 0, 10))],
        ),
    );
    assert_ne!(other.message.yiaddr(), Ipv4Addr::new(10, 9, 0, 10));
    let nak = reply(
        &mut s,
        NOW,
        &msg(
            MessageType::Request,
            mac(2),
            &[DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 9, 0, 10))],
        ),
    );
    assert_eq!(nak.kind(), Some(MessageType::Nak));
}

#[test]
fn a_requested_free_address_is_offered() {
    let mut s = server();
    let want = Ipv4Addr::new(10, 9, 0, 107);
    let offer = reply(
        &mut s,
        NOW,
        &msg(
            MessageType::Discover,
            mac(1),
            &[DhcpOption::RequestedIpAddress(want)],
        ),
    );
    assert_eq!(offer.message.yiaddr(), want);
    // Outside the range it is not.
    let outside = Ipv4Addr::new(10, 9, 0, 20);
    let offer = reply(
        &mut s,
        NOW,
        &msg(
            MessageType::Discover,
            mac(2),
            &[DhcpOption::RequestedIpAddress(outside)],
        ),
    );
    assert_ne!(offer.message.yiaddr(), outside);
}

#[test]
fn selecting_another_server_withdraws_our_offer() {
    let mut s = Server::new(Config {
        pools: vec![Pool {
            last: Ipv4Addr::new(10, 9, 0, 100),
            ..pool()
        }],
        reservations: vec![],
        offer_secs: 60,
        decline_secs: 600,
    });
    let offer = reply(&mut s, NOW, &msg(MessageType::Discover, mac(1), &[]));
    assert_eq!(
        handle(&mut s, NOW, &msg(MessageType::Discover, mac(2), &[])),
        Err(Ignored::PoolExhausted),
        "the only address is held for the first client's offer"
    );
    let other = Ipv4Addr::new(10, 9, 0, 2);
    assert_eq!(
        handle(
            &mut s,
            NOW,
            &msg(
                MessageType::Request,
                mac(1),
                &[
                    DhcpOption::ServerIdentifier(other),
                    DhcpOption::RequestedIpAddress(offer.message.yiaddr())
                ]
            )
        ),
        Err(Ignored::OtherServer)
    );
    assert_eq!(
        reply(&mut s, NOW, &msg(MessageType::Discover, mac(2), &[]))
            .message
            .yiaddr(),
        offer.message.yiaddr()
    );
}

#[test]
fn an_offer_nobody_takes_lapses() {
    let mut s = Server::new(Config {
        pools: vec![Pool {
            last: Ipv4Addr::new(10, 9, 0, 100),
            ..pool()
        }],
        reservations: vec![],
        offer_secs: 60,
        decline_secs: 600,
    });
    reply(&mut s, NOW, &msg(MessageType::Discover, mac(1), &[]));
    s.expire(NOW + 59);
    assert_eq!(
        handle(&mut s, NOW + 59, &msg(MessageType::Discover, mac(2), &[])),
        Err(Ignored::PoolExhausted)
    );
    s.expire(NOW + 60);
    assert!(s.leases().is_empty());
    assert!(handle(&mut s, NOW + 60, &msg(MessageType::Discover, mac(2), &[])).is_ok());
}

#[test]
fn init_reboot_acks_the_clients_own_address_and_naks_the_rest() {
    let mut s = server();
    let ip = dora(&mut s, NOW, mac(1));
    let reboot = |m: MacAddr, ip: Ipv4Addr| {
        msg(
            MessageType::Request,
            m,
            &[DhcpOption::RequestedIpAddress(ip)],
        )
    };
    let ack = reply(&mut s, NOW + 100, &reboot(mac(1), ip));
    assert_eq!(ack.kind(), Some(MessageType::Ack));
    assert_eq!(ack.message.yiaddr(), ip);
    // Someone else's address: NAK, broadcast.
    let nak = reply(&mut s, NOW + 100, &reboot(mac(2), ip));
    assert_eq!(nak.kind(), Some(MessageType::Nak));
    assert_eq!(nak.to, Destination::Broadcast);
    assert_eq!(nak.message.yiaddr(), Ipv4Addr::UNSPECIFIED);
    // A client that moved from another network: NAK.
    let nak = reply(
        &mut s,
        NOW + 100,
        &reboot(mac(3), Ipv4Addr::new(192, 168, 1, 5)),
    );
    assert_eq!(nak.kind(), Some(MessageType::Nak));
    assert_eq!(
        nak.message.opts().get(OptionCode::Message),
        Some(&DhcpOption::Message("wrong network".into()))
    );
    // A free address of the range that a client still believes it has (say, after a
    // reinstall of the server): acknowledged.
    let free = Ipv4Addr::new(10, 9, 0, 109);
    let free = if free == ip {
        Ipv4Addr::new(10, 9, 0, 108)
    } else {
        free
    };
    assert_eq!(
        reply(&mut s, NOW + 100, &reboot(mac(4), free)).kind(),
        Some(MessageType::Ack)
    );
}

#[test]
fn renewing_extends_the_lease_and_answers_the_client_directly() {
    let mut s = server();
    let ip = dora(&mut s, NOW, mac(1));
    events(&mut s);
    let mut renew = Message::default();
    renew.set_xid(7).set_chaddr(&mac(1).0).set_ciaddr(ip);
    renew
        .opts_mut()
        .insert(DhcpOption::MessageType(MessageType::Request));
    let ack = reply(&mut s, NOW + 1800, &round_trip(&renew));
    assert_eq!(ack.kind(), Some(MessageType::Ack));
    assert_eq!(
        ack.to,
        Destination::Source,
        "unicast to the renewing client"
    );
    assert!(!ack.message.flags().broadcast());
    assert_eq!(ack.message.ciaddr(), ip);
    assert_eq!(
        events(&mut s),
        vec![LeaseEvent::Saved(Lease {
            ip,
            mac: mac(1),
            expires: NOW + 1800 + 3600,
            state: LeaseState::Bound,
            hostname: None,
        })]
    );
}

#[test]
fn an_expired_lease_goes_to_the_next_client_only_when_nothing_else_is_free() {
    let mut s = Server::new(Config {
        pools: vec![Pool {
            last: Ipv4Addr::new(10, 9, 0, 100),
            ..pool()
        }],
        reservations: vec![],
        offer_secs: 60,
        decline_secs: 600,
    });
    let ip = dora(&mut s, NOW, mac(1));
    assert_eq!(
        handle(&mut s, NOW + 3599, &msg(MessageType::Discover, mac(2), &[])),
        Err(Ignored::PoolExhausted)
    );
    assert_eq!(dora(&mut s, NOW + 3600, mac(2)), ip);
    // The first client's renewal is now refused.
    let mut renew = Message::default();
    renew.set_xid(1).set_chaddr(&mac(1).0).set_ciaddr(ip);
    renew
        .opts_mut()
        .insert(DhcpOption::MessageType(MessageType::Request));
    assert_eq!(
        reply(&mut s, NOW + 3700, &round_trip(&renew)).kind(),
        Some(MessageType::Nak)
    );
}

#[test]
fn a_released_address_stays_the_clients_until_someone_needs_it() {
    let mut s = Server::new(Config {
        pools: vec![Pool {
            last: Ipv4Addr::new(10, 9, 0, 100),
            ..pool()
        }],
        reservations: vec![],
        offer_secs: 60,
        decline_secs: 600,
    });
    let ip = dora(&mut s, NOW, mac(1));
    events(&mut s);
    let mut release = Message::default();
    release.set_xid(2).set_chaddr(&mac(1).0).set_ciaddr(ip);
    release
        .opts_mut()
        .insert(DhcpOption::MessageType(MessageType::Release));
    assert_eq!(handle(&mut s, NOW + 10, &round_trip(&release)), Ok(None));
    let saved = events(&mut s);
    assert!(
        matches!(&saved[..], [LeaseEvent::Saved(l)] if l.expires == NOW + 10 && l.state == LeaseState::Bound),
        "{saved:?}"
    );
    assert_eq!(
        dora(&mut s, NOW + 20, mac(2)),
        ip,
        "free for another client now"
    );
}

#[test]
fn a_declined_address_is_held_back_then_reused() {
    let mut s = Server::new(Config {
        pools: vec![Pool {
            last: Ipv4Addr::new(10, 9, 0, 101),
            ..pool()
        }],
        reservations: vec![],
        offer_secs: 60,
        decline_secs: 600,
    });
    let ip = dora(&mut s, NOW, mac(1));
    events(&mut s);
    let decline = msg(
        MessageType::Decline,
        mac(1),
        &[DhcpOption::RequestedIpAddress(ip)],
    );
    assert_eq!(handle(&mut s, NOW, &decline), Ok(None));
    assert!(
        matches!(&events(&mut s)[..], [LeaseEvent::Saved(l)] if l.state == LeaseState::Declined)
    );
    // The client gets the other address; the declined one is nobody's for 10 minutes.
    let next = dora(&mut s, NOW + 1, mac(1));
    assert_ne!(next, ip);
    assert_eq!(
        handle(&mut s, NOW + 2, &msg(MessageType::Discover, mac(2), &[])),
        Err(Ignored::PoolExhausted)
    );
    s.expire(NOW + 600);
    assert!(events(&mut s).contains(&LeaseEvent::Removed(ip)));
    assert_eq!(dora(&mut s, NOW + 600, mac(2)), ip);
}

#[test]
fn a_declined_offer_from_another_client_is_ignored() {
    let mut s = server();
    let ip = dora(&mut s, NOW, mac(1));
    events(&mut s);
    let decline = msg(
        MessageType::Decline,
        mac(2),
        &[DhcpOption::RequestedIpAddress(ip)],
    );
    assert_eq!(handle(&mut s, NOW, &decline), Ok(None));
    assert!(
        events(&mut s).is_empty(),
        "only the holder can decline its address"
    );
}

#[test]
fn relayed_requests_use_the_relays_subnet_and_get_option_82_back() {
    let mut s = server();
    let mut info = relay::RelayAgentInformation::default();
    info.insert(relay::RelayInfo::AgentCircuitId(b"ge-0/0/7".to_vec()));
    let mut m = Message::default();
    m.set_xid(9)
        .set_hops(1)
        .set_giaddr(Ipv4Addr::new(10, 20, 0, 1))
        .set_chaddr(&mac(5).0);
    m.opts_mut()
        .insert(DhcpOption::MessageType(MessageType::Discover));
    m.opts_mut()
        .insert(DhcpOption::RelayAgentInformation(info.clone()));
    let offer = reply(&mut s, NOW, &round_trip(&m));
    assert!(relayed_pool().in_range(offer.message.yiaddr()));
    assert_eq!(offer.to, Destination::Relay(Ipv4Addr::new(10, 20, 0, 1)));
    assert_eq!(offer.message.giaddr(), Ipv4Addr::new(10, 20, 0, 1));
    assert_eq!(
        offer.message.opts().get(OptionCode::RelayAgentInformation),
        Some(&DhcpOption::RelayAgentInformation(info))
    );
    assert_eq!(
        offer.message.opts().get(OptionCode::Router),
        Some(&DhcpOption::Router(vec![Ipv4Addr::new(10, 20, 0, 1)]))
    );
    // A relay of a subnet we do not serve gets nothing.
    m.set_giaddr(Ipv4Addr::new(172, 16, 0, 1));
    assert_eq!(handle(&mut s, NOW, &round_trip(&m)), Err(Ignored::NoPool));
}

#[test]
fn a_pool_bound_to_an_interface_serves_that_interface() {
    let mut s = Server::new(Config {
        pools: vec![Pool {
            interface: Some("eth7".into()),
            ..relayed_pool()
        }],
        reservations: vec![],
        offer_secs: 60,
        decline_secs: 600,
    });
    let m = msg(MessageType::Discover, mac(1), &[]);
    assert_eq!(
        s.handle(NOW, &m, &meta_for(&m), &pxe()),
        Err(Ignored::NoPool)
    );
    let eth7 = Meta {
        iface: "eth7",
        ..meta_for(&m)
    };
    let offer = s
        .handle(NOW, &m, &eth7, &pxe())
        .expect("ok")
        .expect("offer");
    assert!(relayed_pool().in_range(offer.message.yiaddr()));
}

#[test]
fn inform_gets_the_options_but_no_address_or_lease() {
    let mut s = server();
    let mut m = Message::default();
    m.set_xid(3)
        .set_chaddr(&mac(8).0)
        .set_ciaddr(Ipv4Addr::new(10, 9, 0, 30));
    m.opts_mut()
        .insert(DhcpOption::MessageType(MessageType::Inform));
    let ack = reply(&mut s, NOW, &round_trip(&m));
    assert_eq!(ack.kind(), Some(MessageType::Ack));
    assert_eq!(ack.message.yiaddr(), Ipv4Addr::UNSPECIFIED);
    assert_eq!(ack.to, Destination::Source);
    assert!(
        ack.message
            .opts()
            .get(OptionCode::AddressLeaseTime)
            .is_none()
    );
    assert!(ack.message.opts().get(OptionCode::Router).is_some());
    assert!(s.leases().is_empty());
}

#[test]
fn pxe_clients_get_their_boot_file_and_ipxe_is_told_not_to_wait_for_proxies() {
    let mut s = server();
    let firmware = msg(
        MessageType::Discover,
        mac(1),
        &[
            DhcpOption::ClassIdentifier(b"PXEClient:Arch:00007:UNDI:003016".to_vec()),
            DhcpOption::ClientSystemArchitecture(Architecture::from(7)),
        ],
    );
    let offer = reply(&mut s, NOW, &firmware);
    assert_eq!(offer.boot_file.as_deref(), Some("ipxe.efi"));
    assert_eq!(offer.message.siaddr(), SERVER);
    assert_eq!(
        offer
            .message
            .fname_str()
            .and_then(Result::ok)
            .map(|f| f.trim_end_matches('\0')),
        Some("ipxe.efi")
    );
    assert_eq!(
        offer.message.opts().get(OptionCode::ClassIdentifier),
        Some(&DhcpOption::ClassIdentifier(b"PXEClient".to_vec()))
    );
    assert!(offer.message.opts().get(OptionCode::Unknown(175)).is_none());

    let ipxe_opts = |features: &[u8]| {
        let mut enc = Vec::new();
        for f in features {
            enc.extend([*f, 1, 1]);
        }
        vec![
            DhcpOption::ClassIdentifier(b"PXEClient:Arch:00000:UNDI:002001".to_vec()),
            DhcpOption::UserClass(b"iPXE".to_vec()),
            DhcpOption::Unknown(UnknownOption::new(OptionCode::Unknown(175), enc)),
        ]
    };
    // iPXE with HTTP but without SRP, like qemu's NIC option ROM.
    let rom = msg(MessageType::Discover, mac(2), &ipxe_opts(&[19, 17, 23]));
    let offer = reply(&mut s, NOW, &rom);
    assert_eq!(
        offer.boot_file.as_deref(),
        Some("http://10.9.0.1:8080/boot/ipxe")
    );
    assert_eq!(
        offer.message.opts().get(OptionCode::Unknown(175)),
        Some(&DhcpOption::Unknown(UnknownOption::new(
            OptionCode::Unknown(175),
            vec![176, 1, 1]
        )))
    );
    // With SRP required, the ROM chains to the full iPXE build; the full build, which
    // announces SRP, gets its script.
    let strict = proxy::Context {
        ipxe_required: vec![IpxeFeature::parse("srp").expect("known")],
        ..pxe()
    };
    let offer = s
        .handle(NOW, &rom, &meta_for(&rom), &strict)
        .expect("ok")
        .expect("offer");
    assert_eq!(offer.boot_file.as_deref(), Some("undionly.kpxe"));
    let full = msg(MessageType::Discover, mac(2), &ipxe_opts(&[19, 17, 27]));
    let offer = s
        .handle(NOW, &full, &meta_for(&full), &strict)
        .expect("ok")
        .expect("offer");
    assert_eq!(
        offer.boot_file.as_deref(),
        Some("http://10.9.0.1:8080/boot/ipxe")
    );
}

#[test]
fn restore_keeps_leases_of_the_pools_and_drops_the_rest() {
    let mut s = server();
    let kept = Lease {
        ip: Ipv4Addr::new(10, 9, 0, 105),
        mac: mac(1),
        expires: NOW + 100,
        state: LeaseState::Bound,
        hostname: Some("pc1".into()),
    };
    let gone = Lease {
        ip: Ipv4Addr::new(192, 168, 7, 7),
        ..kept.clone()
    };
    s.restore([kept.clone(), gone]);
    assert_eq!(s.leases(), vec![kept.clone()]);
    assert_eq!(
        events(&mut s),
        vec![LeaseEvent::Removed(Ipv4Addr::new(192, 168, 7, 7))]
    );
    // The restored client is offered its address again.
    assert_eq!(
        reply(&mut s, NOW, &msg(MessageType::Discover, mac(1), &[]))
            .message
            .yiaddr(),
        kept.ip
    );
}

#[test]
fn requests_that_are_not_for_a_server_are_ignored() {
    let mut s = server();
    let mut offer = msg(MessageType::Offer, mac(1), &[]);
    assert_eq!(handle(&mut s, NOW, &offer), Err(Ignored::MessageType));
    offer.set_opcode(Opcode::BootReply);
    assert_eq!(handle(&mut s, NOW, &offer), Err(Ignored::NotARequest));
    let mut none = Message::default();
    none.set_chaddr(&mac(1).0);
    assert_eq!(handle(&mut s, NOW, &none), Err(Ignored::NotARequest));
    // INIT-REBOOT without the address it wants.
    assert_eq!(
        handle(&mut s, NOW, &msg(MessageType::Request, mac(1), &[])),
        Err(Ignored::NoRequestedAddress)
    );
}

#[test]
fn hostile_host_names_are_cleaned() {
    let mut s = server();
    let m = msg(
        MessageType::Discover,
        mac(1),
        &[DhcpOption::Hostname("pc1;reboot\n<b>".into())],
    );
    let offer = reply(&mut s, NOW, &m);
    assert_eq!(
        offer.message.opts().get(OptionCode::Hostname),
        Some(&DhcpOption::Hostname("pc1rebootb".into()))
    );
}

#[derive(Debug, Clone)]
enum Step {
    Discover(u8),
    Select(u8),
    Reboot(u8, u8),
    Renew(u8, u8),
    Release(u8, u8),
    Decline(u8, u8),
    Wait(u16),
}

fn step() -> impl Strategy<Value = Step> {
    let c = 0u8..6;
    let a = 95u8..112;
    prop_oneof![
        c.clone().prop_map(Step::Discover),
        c.clone().prop_map(Step::Select),
        (c.clone(), a.clone()).prop_map(|(c, a)| Step::Reboot(c, a)),
        (c.clone(), a.clone()).prop_map(|(c, a)| Step::Renew(c, a)),
        (c.clone(), a.clone()).prop_map(|(c, a)| Step::Release(c, a)),
        (c, a).prop_map(|(c, a)| Step::Decline(c, a)),
        (0u16..400).prop_map(Step::Wait),
    ]
}

proptest! {
    /// Whatever clients send, no address is ever acknowledged to two clients whose leases
    /// overlap, and every acknowledged address is in the range.
    #[test]
    fn no_address_is_acknowledged_to_two_clients_at_once(steps in proptest::collection::vec(step(), 1..80)) {
        let mut s = Server::new(Config {
            pools: vec![Pool { lease_secs: 300, last: Ipv4Addr::new(10, 9, 0, 103), ..pool() }],
            reservations: vec![],
            offer_secs: 30,
            decline_secs: 120,
        });
        let mut now = NOW;
        let mut offered: HashMap<u8, Ipv4Addr> = HashMap::new();
        // address -> (client, lease end) for every ACK seen
        let mut acked: HashMap<Ipv4Addr, (u8, u64)> = HashMap::new();
        for st in steps {
            let (client, m) = match st {
                Step::Wait(secs) => { now += u64::from(secs); s.expire(now); continue; }
                Step::Discover(c) => (c, msg(MessageType::Discover, mac(c), &[])),
                Step::Select(c) => {
                    let Some(&ip) = offered.get(&c) else { continue };
                    (c, msg(MessageType::Request, mac(c), &[DhcpOption::ServerIdentifier(SERVER), DhcpOption::RequestedIpAddress(ip)]))
                }
                Step::Reboot(c, a) => (c, msg(MessageType::Request, mac(c), &[DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 9, 0, a))])),
                Step::Renew(c, a) | Step::Release(c, a) => {
                    let kind = if matches!(st, Step::Renew(..)) { MessageType::Request } else { MessageType::Release };
                    let mut m = Message::default();
                    m.set_xid(1).set_chaddr(&mac(c).0).set_ciaddr(Ipv4Addr::new(10, 9, 0, a));
                    m.opts_mut().insert(DhcpOption::MessageType(kind));
                    (c, round_trip(&m))
                }
                Step::Decline(c, a) => (c, msg(MessageType::Decline, mac(c), &[DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 9, 0, a))])),
            };
            if matches!(st, Step::Release(..)) {
                let ip = m.ciaddr();
                if acked.get(&ip).is_some_and(|&(holder, _)| holder == client) {
                    acked.insert(ip, (client, now));
                }
            }
            if matches!(st, Step::Decline(..)) {
                // The client says the address is unusable: it no longer holds it.
                let ip = Ipv4Addr::new(10, 9, 0, match st { Step::Decline(_, a) => a, _ => 0 });
                if acked.get(&ip).is_some_and(|&(holder, _)| holder == client) {
                    acked.insert(ip, (client, now));
                }
            }
            let Ok(Some(r)) = handle(&mut s, now, &m) else { continue };
            match r.kind() {
                Some(MessageType::Offer) => { offered.insert(client, r.message.yiaddr()); }
                Some(MessageType::Ack) => {
                    let ip = r.message.yiaddr();
                    prop_assert!(pool().in_range(ip), "{ip} acknowledged outside the range");
                    if let Some(&(holder, until)) = acked.get(&ip) {
                        prop_assert!(holder == client || until <= now,
                            "{ip} acknowledged to client {client} while client {holder} holds it until {until} (now {now})");
                    }
                    // A client holds one address: any other it held is given up.
                    for (other, entry) in &mut acked {
                        if *other != ip && entry.0 == client {
                            entry.1 = entry.1.min(now);
                        }
                    }
                    acked.insert(ip, (client, now + 300));
                }
                _ => {}
            }
        }
    }
}

#[test]
fn a_raspberry_pi_gets_its_vendor_options_and_no_boot_file() {
    let mut s = server();
    let pi = MacAddr([0xdc, 0xa6, 0x32, 0x01, 0x02, 0x03]);
    let discover = msg(
        MessageType::Discover,
        pi,
        &[
            DhcpOption::ClassIdentifier(b"PXEClient:Arch:00000:UNDI:002001".to_vec()),
            DhcpOption::ClientSystemArchitecture(Architecture::from(0)),
        ],
    );
    let offer = reply(&mut s, NOW, &discover);
    assert!(pool().in_range(offer.message.yiaddr()));
    assert_eq!(offer.boot_file, None);
    assert_eq!(offer.message.siaddr(), SERVER);
    let o = offer.message.opts();
    let Some(DhcpOption::VendorExtensions(v43)) = o.get(OptionCode::VendorExtensions) else {
        panic!("no option 43: {o:?}");
    };
    assert!(
        v43.windows(17).any(|w| w == b"Raspberry Pi Boot"),
        "{v43:?}"
    );
    assert!(o.get(OptionCode::BootfileName).is_none());
    assert_eq!(
        o.get(OptionCode::TFTPServerName),
        Some(&DhcpOption::TFTPServerName(b"10.9.0.1".to_vec()))
    );
    // The same firmware on another board's MAC is an ordinary BIOS PXE client.
    let pc = msg(
        MessageType::Discover,
        mac(9),
        &[
            DhcpOption::ClassIdentifier(b"PXEClient:Arch:00000:UNDI:002001".to_vec()),
            DhcpOption::ClientSystemArchitecture(Architecture::from(0)),
        ],
    );
    assert_eq!(
        reply(&mut s, NOW, &pc).boot_file.as_deref(),
        Some("undionly.kpxe")
    );
}

#[test]
fn a_renewal_to_a_second_address_is_answered_from_it_and_unicast() {
    let mut s = server();
    let ip = dora(&mut s, NOW, mac(0x31));
    // br0 has a second address; the client renews by unicast to it.
    let second = Ipv4Addr::new(10, 9, 0, 2);
    let addrs = [SERVER, second];
    let mut renew = msg(MessageType::Request, mac(0x31), &[]);
    renew.set_ciaddr(ip);
    let mut meta = Meta {
        addrs: &addrs,
        ..meta_for(&renew)
    };
    meta.recv.dst = second;
    let ack = s
        .handle(NOW + 10, &renew, &meta, &pxe())
        .expect("ok")
        .expect("ack");
    assert_eq!(ack.kind(), Some(MessageType::Ack));
    assert_eq!(ack.to, Destination::Source);
    assert_eq!(
        ack.message.opts().get(OptionCode::ServerIdentifier),
        Some(&DhcpOption::ServerIdentifier(second))
    );
    // The same request from 0.0.0.0 cannot be unicast back: it is broadcast.
    meta.recv.src = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68);
    let ack = s
        .handle(NOW + 20, &renew, &meta, &pxe())
        .expect("ok")
        .expect("ack");
    assert_eq!(ack.to, Destination::Broadcast);
}

#[test]
fn a_pool_is_chosen_by_the_ingress_interface_then_by_its_address() {
    let other = Pool {
        network: Ipv4Addr::new(10, 8, 0, 0),
        prefix: 24,
        first: Ipv4Addr::new(10, 8, 0, 100),
        last: Ipv4Addr::new(10, 8, 0, 109),
        interface: Some("eth8".into()),
        ..pool()
    };
    let mut s = Server::new(Config {
        pools: vec![pool(), other.clone()],
        reservations: vec![],
        offer_secs: 60,
        decline_secs: 600,
    });
    let m = msg(MessageType::Discover, mac(0x41), &[]);
    // On br0 (address 10.9.0.1): the pool holding the address.
    let offer = s
        .handle(NOW, &m, &meta_for(&m), &pxe())
        .expect("ok")
        .expect("offer");
    assert!(pool().in_range(offer.message.yiaddr()));
    // On eth8, whatever its address: the pool naming it, and its address as server.
    let eth8_addrs = [Ipv4Addr::new(192, 168, 8, 1)];
    let m = msg(MessageType::Discover, mac(0x42), &[]);
    let eth8 = Meta {
        iface: "eth8",
        addrs: &eth8_addrs,
        ..meta_for(&m)
    };
    let offer = s
        .handle(NOW, &m, &eth8, &pxe())
        .expect("ok")
        .expect("offer");
    assert!(other.in_range(offer.message.yiaddr()));
    assert_eq!(
        offer.message.opts().get(OptionCode::ServerIdentifier),
        Some(&DhcpOption::ServerIdentifier(eth8_addrs[0]))
    );
}

/// Found by the `dhcp_server` fuzz target: an offer on another subnet took the client's
/// running lease back into the pool, and the next client was acknowledged its address.
#[test]
fn an_offer_elsewhere_leaves_the_clients_lease_its_own_until_it_is_bound_again() {
    let mut s = server();
    let relayed = |kind, client: MacAddr, opts: &[DhcpOption]| {
        let mut m = msg(kind, client, opts);
        m.set_giaddr(Ipv4Addr::new(10, 20, 0, 1));
        round_trip(&m)
    };
    // Client 1 holds an address of the relayed subnet.
    let offer = reply(&mut s, NOW, &relayed(MessageType::Discover, mac(1), &[]));
    let held = offer.message.yiaddr();
    let request = [
        DhcpOption::ServerIdentifier(SERVER),
        DhcpOption::RequestedIpAddress(held),
    ];
    let ack = reply(
        &mut s,
        NOW,
        &relayed(MessageType::Request, mac(1), &request),
    );
    assert_eq!(ack.kind(), Some(MessageType::Ack));
    // Then it shows up on the local subnet and is offered an address there.
    let local = reply(&mut s, NOW + 1, &msg(MessageType::Discover, mac(1), &[]));
    assert!(pool().in_range(local.message.yiaddr()));
    // Its lease on the relayed subnet still runs: client 2 cannot have that address.
    let want = [DhcpOption::RequestedIpAddress(held)];
    let other = reply(
        &mut s,
        NOW + 2,
        &relayed(MessageType::Discover, mac(2), &want),
    );
    assert_ne!(other.message.yiaddr(), held);
    let take = [
        DhcpOption::ServerIdentifier(SERVER),
        DhcpOption::RequestedIpAddress(held),
    ];
    let nak = reply(
        &mut s,
        NOW + 2,
        &relayed(MessageType::Request, mac(2), &take),
    );
    assert_eq!(nak.kind(), Some(MessageType::Nak));
    // Once client 1 is bound on the local subnet, its old address is free again.
    events(&mut s);
    let local_ip = local.message.yiaddr();
    let bind = [
        DhcpOption::ServerIdentifier(SERVER),
        DhcpOption::RequestedIpAddress(local_ip),
    ];
    let ack = reply(&mut s, NOW + 3, &msg(MessageType::Request, mac(1), &bind));
    assert_eq!(ack.kind(), Some(MessageType::Ack));
    assert!(events(&mut s).contains(&LeaseEvent::Removed(held)));
    let offer = reply(
        &mut s,
        NOW + 4,
        &relayed(MessageType::Discover, mac(3), &want),
    );
    assert_eq!(offer.message.yiaddr(), held, "a new client may have it");
}
