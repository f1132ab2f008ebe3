//! An iSCSI connection fed arbitrary bytes, first as a fresh connection, then in the middle
//! of a CHAP exchange (challenge sent, response expected), then after a valid login: the
//! decoder and the connection never panic, every PDU the target sends decodes again, and
//! no data segment it sends exceeds what the initiator declared.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use netboot_daemon::iscsi::chap::{self, Challenge, Credentials, Secret};
use netboot_daemon::iscsi::conn::{Connection, Refusal, Target, Targets};
use netboot_daemon::iscsi::pdu::{Decoder, Pdu, op};
use netboot_daemon::iscsi::scsi::{DeviceType, Lun, LunConfig, MemoryBacking};
use netboot_daemon::iscsi::text;

struct One(Arc<Lun>);

impl Targets for One {
    fn visible(&self, _: &str) -> Vec<String> {
        vec!["iqn.t:d".into(), "iqn.t:c".into()]
    }
    fn open(&self, name: &str, _: &str) -> Result<Target, Refusal> {
        let chap = match name {
            "iqn.t:d" => None,
            // Mutual CHAP.
            "iqn.t:c" => Some(Credentials {
                initiator: Secret { user: "u".into(), secret: SECRET.to_vec() },
                target: Some(Secret { user: "t".into(), secret: b"target-secret".to_vec() }),
            }),
            _ => return Err(Refusal::NotFound),
        };
        Ok(Target {
            name: name.into(),
            luns: vec![(0, Arc::clone(&self.0))],
            chap,
        })
    }
}

fn connection() -> Connection {
    let lun = Lun::new(
        LunConfig {
            device_type: DeviceType::Disk,
            read_only: false,
            block_size: 512,
            vendor: "N".into(),
            product: "P".into(),
            revision: "1".into(),
            serial: "s".into(),
            naa_id: 0x6000_0000_0000_0001,
            write_cache: true,
        },
        Arc::new(MemoryBacking::new(256 * 1024)),
    );
    Connection::new(Arc::new(One(Arc::new(lun))), "192.0.2.1:3260".into(), 1, CHALLENGE)
}

const SECRET: &[u8] = b"initiator-secret";
const CHALLENGE: Challenge = Challenge { id: 9, bytes: [0x5a; chap::CHALLENGE_LEN] };

/// Feeds `bytes` and checks everything the connection sends.
fn feed(c: &mut Connection, d: &mut Decoder, bytes: &[u8], max_send: usize) {
    for chunk in bytes.chunks(97) {
        d.extend(chunk);
        loop {
            let w = c.wire();
            d.max_data = w.max_data;
            d.header_digest = w.header_digest;
            d.data_digest = w.data_digest;
            match d.next_pdu() {
                Ok(Some(p)) => c.handle(p),
                Ok(None) => break,
                Err(_) => {
                    c.decode_failed(None);
                    return;
                }
            }
            while let Some(e) = c.poll_execute() {
                let r = e
                    .lun
                    .try_execute(&e.initiator, &e.cdb)
                    .unwrap_or_else(|| e.lun.execute(&e.initiator, &e.cdb, &e.data_out.contiguous()));
                c.complete(e.itt, r);
            }
            while let Some(o) = c.poll_transmit() {
                let mut wire = Vec::new();
                o.encode(&mut wire);
                let mut back = Decoder::new(1 << 24);
                back.header_digest = o.header_digest;
                back.data_digest = o.data_digest;
                back.extend(&wire);
                assert_eq!(back.next_pdu().expect("decodes").expect("whole"), {
                    let mut p = o.pdu.clone();
                    p.bhs[4] = (p.ahs.len() / 4) as u8;
                    let n = p.data.len() as u32;
                    p.bhs[5..8].copy_from_slice(&n.to_be_bytes()[1..]);
                    p
                });
                if o.pdu.opcode() == op::DATA_IN {
                    assert!(o.pdu.data.len() <= max_send.max(512));
                }
            }
            if c.is_closing() {
                return;
            }
        }
    }
}

fn login_pdu(flags: u8, keys: &[(&str, &str)]) -> Vec<u8> {
    let mut p = Pdu::new(op::LOGIN);
    p.bhs[0] |= 0x40;
    p.set_flags(flags);
    let pairs: Vec<(String, String)> = keys.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect();
    p.data = text::encode(&pairs).into();
    let mut out = Vec::new();
    p.encode(false, false, &mut out);
    out
}

fuzz_target!(|data: &[u8]| {
    // A fresh connection: whatever arrives first.
    let mut c = connection();
    let mut d = Decoder::new(8192);
    feed(&mut c, &mut d, data, 8192);

    // A logged-in connection (8 KiB segments, no digests), then the same bytes.
    let mut c = connection();
    let mut d = Decoder::new(8192);
    let mut login = login_pdu(0x81, &[("InitiatorName", "iqn.i:x"), ("TargetName", "iqn.t:d"), ("AuthMethod", "None")]);
    login.extend(login_pdu(0x87, &[("MaxRecvDataSegmentLength", "8192"), ("ImmediateData", "Yes"), ("InitialR2T", "No")]));
    feed(&mut c, &mut d, &login, 8192);
    feed(&mut c, &mut d, data, 8192);

    // A CHAP login: the challenge went out, the bytes take the place of the response.
    let mut c = connection();
    let mut d = Decoder::new(8192);
    let mut login = login_pdu(0x81, &[("InitiatorName", "iqn.i:x"), ("TargetName", "iqn.t:c"), ("AuthMethod", "CHAP,None")]);
    login.extend(login_pdu(0x81, &[("CHAP_A", "5")]));
    feed(&mut c, &mut d, &login, 8192);
    feed(&mut c, &mut d, data, 8192);

    // A completed mutual CHAP login, then the same bytes.
    let mut c = connection();
    let mut d = Decoder::new(8192);
    let response = chap::encode_binary(&chap::response(CHALLENGE.id, SECRET, &CHALLENGE.bytes));
    login.extend(login_pdu(0x81, &[("CHAP_N", "u"), ("CHAP_R", &response), ("CHAP_I", "1"), ("CHAP_C", "0x0102030405060708")]));
    login.extend(login_pdu(0x87, &[("MaxRecvDataSegmentLength", "8192")]));
    feed(&mut c, &mut d, &login, 8192);
    assert!(!c.is_closing(), "the CHAP login succeeds");
    feed(&mut c, &mut d, data, 8192);
});
