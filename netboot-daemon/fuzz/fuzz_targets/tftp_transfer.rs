//! A transfer fed an arbitrary sequence of events: it never panics, every packet it
//! sends parses, DATA blocks are never larger than negotiated and carry the file's bytes.
#![no_main]

use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use netboot_daemon::tftp::transfer::{Config, Negotiated, Transfer};
use netboot_daemon::tftp::wire::{Mode, Packet, emit_ack};

#[derive(Debug, Arbitrary)]
enum Input {
    Ack(u16),
    AckNext,
    Datagram(Vec<u8>),
    Advance(u16),
    Timeout,
    ShortRead,
    /// The next read returns at most this many bytes (a block then spans reads).
    PartialRead(u8),
}

#[derive(Debug, Arbitrary)]
struct Case {
    size: u16,
    blksize: u16,
    windowsize: u8,
    oack: bool,
    netascii: bool,
    inputs: Vec<Input>,
}

fuzz_target!(|c: Case| {
    let t0 = Instant::now();
    let blksize = c.blksize.clamp(8, 2048);
    let neg = Negotiated {
        blksize,
        windowsize: u16::from(c.windowsize.max(1)),
        timeout: Duration::from_secs(1),
        oack: if c.oack { vec![("blksize", blksize.to_string())] } else { Vec::new() },
    };
    let file: Vec<u8> = (0..c.size).map(|i| (i % 251) as u8).collect();
    let mode = if c.netascii { Mode::Netascii } else { Mode::Octet };
    let cfg = Config { max_retries: 3, ..Config::default() };
    let mut t = Transfer::new(&neg, mode, file.len() as u64, &cfg);
    let mut now = t0;
    let mut buf = vec![0u8; t.buffer_len()];
    let mut last_data: u16 = 0;
    let mut short_read = false;
    let mut partial: Option<usize> = None;
    for input in c.inputs {
        while let Some(r) = t.poll_read() {
            let start = (r.offset as usize).min(file.len());
            let mut end = start.saturating_add(r.len).min(file.len());
            if short_read {
                end = start;
                short_read = false;
            } else if let Some(p) = partial.take() {
                end = end.min(start + p.max(1));
            }
            t.handle_read(Ok(Bytes::copy_from_slice(&file[start..end])));
        }
        while let Some(n) = t.poll_transmit(now, &mut buf) {
            match Packet::parse(&buf[..n]).expect("the transfer emits valid packets") {
                Packet::Data { block, data } => {
                    assert!(data.len() <= usize::from(blksize));
                    if !c.netascii {
                        // Block numbers wrap; within the first 65535 blocks they are exact.
                        let off = (usize::from(block).saturating_sub(1)) * usize::from(blksize);
                        if block != 0 && off <= file.len() {
                            assert_eq!(data, &file[off..(off + data.len()).min(file.len())]);
                        }
                    }
                    last_data = block;
                }
                Packet::Oack { .. } | Packet::Error { .. } => {}
                other => panic!("unexpected packet {other:?}"),
            }
        }
        if t.poll_event().is_some() {
            assert!(t.is_closed());
        }
        match input {
            Input::Ack(b) => {
                let mut a = [0u8; 4];
                emit_ack(&mut a, b).expect("fits");
                t.handle_datagram(&a);
            }
            Input::AckNext => {
                let mut a = [0u8; 4];
                emit_ack(&mut a, last_data).expect("fits");
                t.handle_datagram(&a);
            }
            Input::Datagram(d) => t.handle_datagram(&d),
            Input::Advance(ms) => now += Duration::from_millis(u64::from(ms)),
            Input::Timeout => {
                if let Some(d) = t.poll_timeout() {
                    now = now.max(d);
                    t.handle_timeout(now);
                }
            }
            Input::ShortRead => short_read = true,
            Input::PartialRead(n) => partial = Some(usize::from(n)),
        }
    }
});
