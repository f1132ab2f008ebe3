//! proxyDHCP decisions for the clients that matter: BIOS and UEFI firmware, iPXE, UEFI
//! HTTP Boot, ARM64, and ordinary DHCP clients that must be left alone. Messages go
//! through dhcproto's encoder and decoder both ways, as on the wire.

use dhcproto::v4::{Architecture, Decodable, Decoder, Encodable, Encoder, UnknownOption};

use super::*;
use dhcproto::v4::OptionCode;

use crate::net::RecvMeta;
use std::net::SocketAddrV4;

const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);

fn ctx() -> Context {
    Context {
        http_port: 8080,
        files: BootFiles::default(),
        ipxe_required: vec![],
    }
}

/// How `req` reaches `port` on an interface whose address is `SERVER`: unicast from the
/// client's address (`ciaddr`, or the one it has by then on 4011), else broadcast from
/// 0.0.0.0.
fn at(req: &Message, port: Port) -> Meta<'static> {
    let client = match (req.ciaddr(), port) {
        (ci, _) if !ci.is_unspecified() => Some(ci),
        (_, Port::Pxe) => Some(Ipv4Addr::new(10, 0, 0, 50)),
        (_, Port::Dhcp) => None,
    };
    let recv = match client {
        Some(ip) => RecvMeta {
            ifindex: 2,
            src: SocketAddrV4::new(ip, 68),
            dst: SERVER,
        },
        None => RecvMeta {
            ifindex: 2,
            src: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68),
            dst: Ipv4Addr::BROADCAST,
        },
    };
    Meta {
        recv,
        iface: "eth0",
        addrs: &[SERVER],
    }
}

/// The core's answer to `req` arriving on `port` as [`at`] says.
fn handle(req: &Message, port: Port, ctx: &Context) -> Result<Reply, Ignored> {
    super::handle(req, port, &at(req, port), ctx)
}

/// A request as firmware builds it, encoded and decoded again.
fn request(
    kind: MessageType,
    vendor: Option<&str>,
    arch: Option<u16>,
    extra: &[DhcpOption],
) -> Message {
    let mut m = Message::default();
    m.set_xid(0x1234_5678)
        .set_chaddr(&[0x52, 0x54, 0, 0x12, 0x34, 0x56])
        .set_flags(Flags::default().set_broadcast());
    let o = m.opts_mut();
    o.insert(DhcpOption::MessageType(kind));
    if let Some(v) = vendor {
        o.insert(DhcpOption::ClassIdentifier(v.as_bytes().to_vec()));
    }
    if let Some(a) = arch {
        o.insert(DhcpOption::ClientSystemArchitecture(Architecture::from(a)));
    }
    o.insert(DhcpOption::ClientMachineIdentifier(vec![0; 17]));
    for e in extra {
        o.insert(e.clone());
    }
    round_trip(&m)
}

fn round_trip(m: &Message) -> Message {
    let mut buf = Vec::new();
    m.encode(&mut Encoder::new(&mut buf)).expect("encode");
    Message::decode(&mut Decoder::new(&buf)).expect("decode")
}

fn file_of(r: &Reply) -> String {
    let m = round_trip(&r.message);
    assert_eq!(m.opcode(), Opcode::BootReply);
    assert_eq!(m.xid(), 0x1234_5678);
    assert_eq!(
        m.yiaddr(),
        Ipv4Addr::UNSPECIFIED,
        "proxyDHCP never hands out addresses"
    );
    assert_eq!(m.siaddr(), Ipv4Addr::new(10, 0, 0, 1));
    assert!(
        matches!(m.opts().get(OptionCode::ServerIdentifier), Some(DhcpOption::ServerIdentifier(ip)) if *ip == Ipv4Addr::new(10, 0, 0, 1))
    );
    assert!(
        matches!(
            m.opts().get(OptionCode::ClientMachineIdentifier),
            Some(DhcpOption::ClientMachineIdentifier(_))
        ),
        "UUID echoed"
    );
    // The fixed `file` field is NUL-terminated on the wire.
    let fname = m
        .fname_str()
        .expect("fname")
        .expect("utf8")
        .trim_end_matches('\0')
        .to_owned();
    assert!(
        matches!(m.opts().get(OptionCode::BootfileName), Some(DhcpOption::BootfileName(b)) if *b == fname.as_bytes())
    );
    fname
}

#[test]
fn firmware_gets_the_ipxe_binary_for_its_architecture() {
    let cases = [
        ("PXEClient:Arch:00000:UNDI:002001", 0, "undionly.kpxe"),
        ("PXEClient:Arch:00007:UNDI:003016", 7, "ipxe.efi"),
        ("PXEClient:Arch:00009:UNDI:003016", 9, "ipxe.efi"),
        ("PXEClient:Arch:00011:UNDI:003000", 11, "ipxe-arm64.efi"),
    ];
    for (vendor, arch, want) in cases {
        let r = handle(
            &request(MessageType::Discover, Some(vendor), Some(arch), &[]),
            Port::Dhcp,
            &ctx(),
        )
        .expect("answered");
        assert!(matches!(
            r.message.opts().msg_type(),
            Some(MessageType::Offer)
        ));
        assert_eq!(file_of(&r), want, "{vendor}");
        assert!(
            matches!(r.message.opts().get(OptionCode::VendorExtensions), Some(DhcpOption::VendorExtensions(v)) if v == &vec![6, 1, 8, 255])
        );
        assert!(r.broadcast);
        let r = handle(
            &request(MessageType::Request, Some(vendor), Some(arch), &[]),
            Port::Pxe,
            &ctx(),
        )
        .expect("ack");
        assert!(matches!(
            r.message.opts().msg_type(),
            Some(MessageType::Ack)
        ));
        assert_eq!(file_of(&r), want);
    }
}

#[test]
fn ipxe_gets_its_script_url_and_never_ipxe_again() {
    let user_class = DhcpOption::UserClass(b"iPXE".to_vec());
    let r = handle(
        &request(
            MessageType::Discover,
            Some("PXEClient:Arch:00000:UNDI:002001"),
            Some(0),
            &[user_class],
        ),
        Port::Dhcp,
        &ctx(),
    )
    .expect("answered");
    assert_eq!(file_of(&r), "http://10.0.0.1:8080/boot/ipxe");
    assert!(r.client.ipxe);
    let opt175 = DhcpOption::Unknown(UnknownOption::new(OptionCode::Unknown(175), vec![19, 1, 1]));
    let r = handle(
        &request(
            MessageType::Discover,
            Some("PXEClient:Arch:00007:UNDI:003016"),
            Some(7),
            &[opt175],
        ),
        Port::Dhcp,
        &ctx(),
    )
    .expect("answered");
    assert_eq!(file_of(&r), "http://10.0.0.1:8080/boot/ipxe");
}

#[test]
fn uefi_http_boot_gets_a_url() {
    let r = handle(
        &request(
            MessageType::Discover,
            Some("HTTPClient:Arch:00016:UNDI:003001"),
            Some(16),
            &[],
        ),
        Port::Dhcp,
        &ctx(),
    )
    .expect("answered");
    assert_eq!(file_of(&r), "http://10.0.0.1:8080/files/tftp/ipxe.efi");
    assert!(
        matches!(r.message.opts().get(OptionCode::ClassIdentifier), Some(DhcpOption::ClassIdentifier(v)) if v == b"HTTPClient")
    );
    assert!(r.message.opts().get(OptionCode::VendorExtensions).is_none());
}

#[test]
fn ordinary_clients_and_other_messages_are_left_to_the_real_server() {
    let c = ctx();
    assert_eq!(
        handle(
            &request(MessageType::Discover, None, None, &[]),
            Port::Dhcp,
            &c
        )
        .unwrap_err(),
        Ignored::NotPxe
    );
    assert_eq!(
        handle(
            &request(MessageType::Discover, Some("MSFT 5.0"), None, &[]),
            Port::Dhcp,
            &c
        )
        .unwrap_err(),
        Ignored::NotPxe
    );
    let pxe = Some("PXEClient:Arch:00000:UNDI:002001");
    assert_eq!(
        handle(
            &request(MessageType::Request, pxe, Some(0), &[]),
            Port::Dhcp,
            &c
        )
        .unwrap_err(),
        Ignored::MessageType
    );
    assert_eq!(
        handle(
            &request(MessageType::Release, pxe, Some(0), &[]),
            Port::Pxe,
            &c
        )
        .unwrap_err(),
        Ignored::MessageType
    );
    assert_eq!(
        handle(
            &request(
                MessageType::Discover,
                Some("PXEClient:Arch:00010"),
                Some(10),
                &[]
            ),
            Port::Dhcp,
            &c
        )
        .unwrap_err(),
        Ignored::Arch
    );
    let mut reply = request(MessageType::Discover, pxe, Some(0), &[]);
    reply.set_opcode(Opcode::BootReply);
    assert_eq!(
        handle(&reply, Port::Dhcp, &c).unwrap_err(),
        Ignored::NotARequest
    );
}

#[test]
fn client_facts_are_read_for_the_inventory() {
    let m = request(
        MessageType::Discover,
        Some("PXEClient:Arch:00007:UNDI:003016"),
        Some(7),
        &[],
    );
    let c = Client::from_message(&m).expect("client");
    assert_eq!(c.mac.to_string(), "52:54:00:12:34:56");
    assert_eq!(
        c.arch.and_then(ClientArch::arch),
        Some(crate::store::Arch::UefiX64)
    );
    assert_eq!(c.vendor, Some(Vendor::Pxe));
    assert!(!c.ipxe);
}

#[test]
fn replies_go_to_the_relay_the_client_or_the_link() {
    let pxe = Some("PXEClient:Arch:00007:UNDI:003016");
    let discover = request(MessageType::Discover, pxe, Some(7), &[]);
    let r = handle(&discover, Port::Dhcp, &ctx()).expect("offer");
    assert_eq!((r.to, r.is_ack()), (Destination::Broadcast, false));
    let r = handle(
        &request(MessageType::Request, pxe, Some(7), &[]),
        Port::Pxe,
        &ctx(),
    )
    .expect("ack");
    assert_eq!((r.to, r.is_ack()), (Destination::Source, true));
    // An INFORM on 4011 is answered with an ACK too.
    let r = handle(
        &request(MessageType::Inform, pxe, Some(7), &[]),
        Port::Pxe,
        &ctx(),
    )
    .expect("ack");
    assert!(r.is_ack());
    let relay = Ipv4Addr::new(10, 9, 0, 1);
    let mut relayed = discover.clone();
    relayed.set_giaddr(relay);
    let r = handle(&relayed, Port::Dhcp, &ctx()).expect("offer");
    assert_eq!(r.to, Destination::Relay(relay));

    // The client's own address: ciaddr, else the source unless relayed.
    let source = Ipv4Addr::new(10, 0, 0, 50);
    assert_eq!(client_address(&discover, source), Some(source));
    assert_eq!(client_address(&discover, Ipv4Addr::UNSPECIFIED), None);
    assert_eq!(client_address(&relayed, relay), None);
    let mut with_ciaddr = discover;
    with_ciaddr.set_ciaddr(Ipv4Addr::new(10, 0, 0, 77));
    assert_eq!(
        client_address(&with_ciaddr, source),
        Some(Ipv4Addr::new(10, 0, 0, 77))
    );
    assert_eq!(
        handle(&with_ciaddr, Port::Dhcp, &ctx()).expect("offer").to,
        Destination::Source
    );
}

#[test]
fn a_raspberry_pi_gets_the_pi_boot_menu_and_no_file() {
    let mut m = request(
        MessageType::Discover,
        Some("PXEClient:Arch:00000:UNDI:002001"),
        Some(0),
        &[],
    );
    m.set_chaddr(&[0xe4, 0x5f, 0x01, 0xaa, 0xbb, 0xcc]);
    let r = handle(&round_trip(&m), Port::Dhcp, &ctx()).expect("answered");
    let reply = round_trip(&r.message);
    let Some(DhcpOption::VendorExtensions(v43)) = reply.opts().get(OptionCode::VendorExtensions)
    else {
        panic!("no option 43");
    };
    assert!(v43.windows(17).any(|w| w == b"Raspberry Pi Boot"));
    assert!(reply.opts().get(OptionCode::BootfileName).is_none());
    assert_eq!(r.boot_file, "");
}

#[test]
fn the_server_address_is_the_one_the_request_reached() {
    let pxe = Some("PXEClient:Arch:00007:UNDI:003016");
    let req = request(MessageType::Request, pxe, Some(7), &[]);
    let second = Ipv4Addr::new(10, 0, 1, 1);
    let addrs = [SERVER, second];
    let mut meta = Meta {
        addrs: &addrs,
        ..at(&req, Port::Pxe)
    };
    // Sent to the interface's second address: that is the server in the answer.
    meta.recv.dst = second;
    let r = super::handle(&req, Port::Pxe, &meta, &ctx()).expect("ack");
    assert_eq!(r.message.siaddr(), second);
    assert!(
        matches!(r.message.opts().get(OptionCode::ServerIdentifier), Some(DhcpOption::ServerIdentifier(ip)) if *ip == second)
    );
    assert_eq!(r.to, Destination::Source);
    // Broadcast: the primary address.
    meta.recv.dst = Ipv4Addr::BROADCAST;
    let r = super::handle(&req, Port::Pxe, &meta, &ctx()).expect("ack");
    assert_eq!(r.message.siaddr(), SERVER);
    // A client without an address yet (source 0.0.0.0) is answered by broadcast: there
    // is nowhere to unicast to.
    meta.recv.src = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68);
    let r = super::handle(&req, Port::Pxe, &meta, &ctx()).expect("ack");
    assert_eq!(r.to, Destination::Broadcast);
}
