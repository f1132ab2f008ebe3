//! Any datagram: parsing never panics; a parsed request negotiates sane values.
#![no_main]

use libfuzzer_sys::fuzz_target;
use netboot_daemon::tftp::transfer::{Config, negotiate};
use netboot_daemon::tftp::wire::Packet;

fuzz_target!(|data: &[u8]| {
    if let Ok(Packet::Rrq(req) | Packet::Wrq(req)) = Packet::parse(data) {
        let cfg = Config::default();
        let n = negotiate(&req, &cfg, Some(data.len() as u64));
        assert!((8..=cfg.max_blksize).contains(&n.blksize) || n.blksize == 512);
        assert!((1..=cfg.max_windowsize).contains(&n.windowsize));
        assert!(n.oack.len() <= 4, "each option is answered at most once");
    }
});
