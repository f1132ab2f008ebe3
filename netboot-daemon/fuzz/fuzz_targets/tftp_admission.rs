//! Admission fed arbitrary datagrams from arbitrary peers and transfer ends: it never
//! panics and never admits more transfers than its limits allow.
#![no_main]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use netboot_daemon::tftp::server::{Decision, Limits, Server};

#[derive(Debug, Arbitrary)]
enum Input {
    Datagram { ip: u8, port: u8, data: Vec<u8> },
    Finished { ip: u8, port: u8, completed: bool },
    Advance(u16),
}

fuzz_target!(|inputs: Vec<Input>| {
    let limits = Limits { max_sessions: 16, per_client: 3, linger: Duration::from_secs(2) };
    let mut s = Server::new(limits);
    let mut now = Instant::now();
    let peer = |ip: u8, port: u8| SocketAddr::from(([10, 0, 0, ip % 8], 1000 + u16::from(port % 8)));
    for input in inputs {
        match input {
            Input::Datagram { ip, port, data } => {
                if let Decision::Start(a) = s.handle_request(now, peer(ip, port), &data) {
                    assert_eq!(a.peer, peer(ip, port));
                    assert!(!a.filename.contains('\\'));
                }
            }
            Input::Finished { ip, port, completed } => s.finished(now, peer(ip, port), completed),
            Input::Advance(ms) => now += Duration::from_millis(u64::from(ms)),
        }
        assert!(s.active() <= limits.max_sessions);
    }
});
