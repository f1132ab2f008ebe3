//! Deterministic simulation of transfers against a model client over a lossy,
//! duplicating, reordering network with a virtual clock.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};

use super::*;
use crate::tftp::wire::{Opcode, emit_ack, emit_request};

/// A client as RFC 7440 §4 describes it: ACK every `window` blocks or the last one; on a
/// gap, ACK the last block received in order; on silence, repeat the last ACK.
struct Client {
    blksize: usize,
    window: u64,
    expected: u64,
    since_ack: u64,
    data: Vec<u8>,
    done: bool,
    last_ack: Option<u16>,
    last_heard: Instant,
}

impl Client {
    fn on_packet(&mut self, now: Instant, p: &[u8]) -> Option<u16> {
        self.last_heard = now;
        match Packet::parse(p).expect("server sends valid packets") {
            Packet::Oack { .. } => {
                if self.expected == 1 {
                    self.last_ack = Some(0);
                    return Some(0);
                }
                None
            }
            Packet::Data { block, data } => {
                if self.done {
                    return self.last_ack;
                }
                if block == (self.expected & 0xffff) as u16 {
                    self.data.extend_from_slice(data);
                    self.expected += 1;
                    self.since_ack += 1;
                    if data.len() < self.blksize {
                        self.done = true;
                    }
                    if self.done || self.since_ack >= self.window {
                        self.since_ack = 0;
                        let b = ((self.expected - 1) & 0xffff) as u16;
                        self.last_ack = Some(b);
                        return Some(b);
                    }
                    None
                } else {
                    // Out of order: acknowledge the last block received in order.
                    self.since_ack = 0;
                    let b = ((self.expected - 1) & 0xffff) as u16;
                    self.last_ack = Some(b);
                    Some(b)
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

struct Net {
    rng: StdRng,
    loss: f64,
    dup: f64,
    jitter_us: u64,
    /// DATA packets lost on top of `loss`, by their number in the order sent (from 1).
    lose_data: Vec<u64>,
    /// ACKs duplicated on top of `dup`, by their number in the order sent (from 1).
    dup_acks: Vec<u64>,
    data_sent: u64,
    acks_sent: u64,
    /// Packets lost and packets duplicated so far, both directions.
    lost: u64,
    duplicated: u64,
}

impl Net {
    fn new(seed: u64, loss: f64, dup: f64, jitter_us: u64) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
            loss,
            dup,
            jitter_us,
            lose_data: Vec::new(),
            dup_acks: Vec::new(),
            data_sent: 0,
            acks_sent: 0,
            lost: 0,
            duplicated: 0,
        }
    }

    /// Delivery times of a packet (`data`: to the client, else an ACK) sent at `now`:
    /// none (lost), one, or two (duplicated).
    fn deliveries(&mut self, now: Instant, data: bool) -> Vec<Instant> {
        let (lose, dup) = if data {
            self.data_sent += 1;
            (self.lose_data.contains(&self.data_sent), false)
        } else {
            self.acks_sent += 1;
            (false, self.dup_acks.contains(&self.acks_sent))
        };
        let mut out = Vec::new();
        if lose || self.rng.random_bool(self.loss) {
            self.lost += 1;
            return out;
        }
        out.push(now + Duration::from_micros(50 + self.rng.random_range(0..=self.jitter_us)));
        if dup || self.rng.random_bool(self.dup) {
            self.duplicated += 1;
            out.push(
                now + Duration::from_micros(
                    50 + self.rng.random_range(0..=self.jitter_us * 3 + 100),
                ),
            );
        }
        out
    }
}

struct Outcome {
    event: Event,
    received: Vec<u8>,
    client_done: bool,
}

/// What a request without options gets, but with this block and window size (the
/// transfer's own choice in the tests; no OACK, 1 s timeout).
fn without_options(blksize: u16, windowsize: u16) -> Negotiated {
    Negotiated {
        blksize,
        windowsize,
        timeout: Duration::from_secs(1),
        oack: Vec::new(),
    }
}

fn file(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

fn run(
    source: &[u8],
    mode: Mode,
    options: &[(&str, &str)],
    net: &mut Net,
    cfg: &Config,
) -> Outcome {
    let t0 = Instant::now();
    let mut rq = vec![0u8; 512];
    let n = emit_request(
        &mut rq,
        Opcode::RRQ,
        "f",
        if mode == Mode::Netascii {
            "netascii"
        } else {
            "octet"
        },
        options,
    )
    .expect("request fits");
    let Ok(Packet::Rrq(req)) = Packet::parse(&rq[..n]) else {
        panic!("rrq")
    };
    let size = Some(source.len() as u64);
    let neg = negotiate(&req, cfg, size);
    let mut t = Transfer::new(&neg, mode, source.len() as u64, cfg);
    let mut client = Client {
        blksize: usize::from(neg.blksize),
        window: u64::from(neg.windowsize),
        expected: 1,
        since_ack: 0,
        data: Vec::new(),
        done: false,
        last_ack: None,
        last_heard: t0,
    };
    // In-flight packets keyed by (delivery time, sequence): to the client or to the server.
    let mut to_client: BTreeMap<(Instant, u64), Vec<u8>> = BTreeMap::new();
    let mut to_server: BTreeMap<(Instant, u64), Vec<u8>> = BTreeMap::new();
    let mut seq = 0u64;
    let mut now = t0;
    let mut buf = vec![0u8; t.buffer_len()];
    let client_timeout = Duration::from_millis(1500);
    for _step in 0..2_000_000 {
        // Server side: serve reads, transmit.
        while let Some(r) = t.poll_read() {
            let start = usize::try_from(r.offset).expect("offset");
            let end = (start + r.len).min(source.len());
            t.handle_read(Ok(Bytes::copy_from_slice(&source[start..end])));
        }
        while let Some(n) = t.poll_transmit(now, &mut buf) {
            let data = Packet::parse(&buf[..n]).is_ok_and(|p| matches!(p, Packet::Data { .. }));
            for at in net.deliveries(now, data) {
                seq += 1;
                to_client.insert((at, seq), buf[..n].to_vec());
            }
        }
        if let Some(ev) = t.poll_event() {
            // Let the client drain what is in flight so its view is complete.
            for (_, p) in std::mem::take(&mut to_client) {
                client.on_packet(now, &p);
            }
            return Outcome {
                event: ev,
                received: client.data,
                client_done: client.done,
            };
        }
        // Next thing to happen on the virtual clock.
        let next_client = to_client.keys().next().map(|k| k.0);
        let next_server = to_server.keys().next().map(|k| k.0);
        let client_timer = (!client.done).then(|| client.last_heard + client_timeout);
        let next = [next_client, next_server, t.poll_timeout(), client_timer]
            .into_iter()
            .flatten()
            .min()
            .expect("something pending");
        now = now.max(next);
        if next_client == Some(next) {
            let (_, p) = to_client.pop_first().expect("packet");
            if let Some(ack) = client.on_packet(now, &p) {
                let mut a = [0u8; 4];
                emit_ack(&mut a, ack).expect("ack");
                for at in net.deliveries(now, false) {
                    seq += 1;
                    to_server.insert((at, seq), a.to_vec());
                }
            }
        } else if next_server == Some(next) {
            let (_, p) = to_server.pop_first().expect("packet");
            t.handle_datagram(&p);
        } else if t.poll_timeout() == Some(next) {
            t.handle_timeout(now);
        } else {
            // Client timer: repeat the last ACK (RRQ retransmission is out of scope here).
            client.last_heard = now;
            if let Some(ack) = client.last_ack {
                let mut a = [0u8; 4];
                emit_ack(&mut a, ack).expect("ack");
                for at in net.deliveries(now, false) {
                    seq += 1;
                    to_server.insert((at, seq), a.to_vec());
                }
            }
        }
    }
    panic!("simulation did not finish");
}

fn clean() -> Net {
    Net::new(1, 0.0, 0.0, 0)
}

fn assert_done(o: &Outcome, want: &[u8]) {
    match &o.event {
        Event::Done(s) => assert_eq!(s.bytes, want.len() as u64),
        other => panic!("transfer failed: {other:?}"),
    }
    assert!(o.client_done);
    assert!(
        o.received == want,
        "received {} bytes, want {}",
        o.received.len(),
        want.len()
    );
}

#[test]
fn lock_step_without_options_sends_512_byte_blocks() {
    for len in [0, 1, 511, 512, 513, 1024, 5000] {
        let f = file(len);
        let o = run(&f, Mode::Octet, &[], &mut clean(), &Config::default());
        assert_done(&o, &f);
        let Event::Done(s) = o.event else {
            unreachable!()
        };
        assert_eq!(
            s.packets,
            len as u64 / 512 + 1,
            "len {len}: a multiple of 512 ends with an empty block"
        );
        assert_eq!(s.retransmits, 0);
    }
}

#[test]
fn options_are_negotiated_clamped_or_ignored() {
    let cfg = Config {
        max_blksize: 1468,
        max_windowsize: 16,
        ..Config::default()
    };
    let req_with = |opts: &[(&str, &str)], mode: &str| {
        let mut b = vec![0u8; 300];
        let n = emit_request(&mut b, Opcode::RRQ, "f", mode, opts).expect("fits");
        b.truncate(n);
        b
    };
    let neg = |b: &[u8]| {
        let Ok(Packet::Rrq(r)) = Packet::parse(b) else {
            panic!()
        };
        negotiate(&r, &cfg, Some(1000))
    };
    let n = neg(&req_with(
        &[
            ("BlkSize", "65464"),
            ("windowsize", "64"),
            ("tsize", "0"),
            ("timeout", "3"),
            ("x-vendor", "1"),
        ],
        "octet",
    ));
    assert_eq!(
        (n.blksize, n.windowsize, n.timeout),
        (1468, 16, Duration::from_secs(3))
    );
    let names: Vec<_> = n.oack.iter().map(|(k, v)| format!("{k}={v}")).collect();
    assert_eq!(
        names,
        ["blksize=1468", "windowsize=16", "tsize=1000", "timeout=3"]
    );
    let n = neg(&req_with(
        &[
            ("blksize", "7"),
            ("timeout", "0"),
            ("windowsize", "0"),
            ("blksize", "1024"),
        ],
        "octet",
    ));
    assert_eq!(
        (n.blksize, n.windowsize),
        (1024, 1),
        "invalid values are ignored; the next occurrence counts"
    );
    let n = neg(&req_with(&[("tsize", "0")], "netascii"));
    assert!(
        n.oack.is_empty(),
        "no tsize in netascii: the translated size is unknown"
    );
}

#[test]
fn windowed_transfers_with_rollover_are_exact() {
    // 70000 blocks of 8 bytes: the block number wraps past 65535.
    let f = file(8 * 70_000 + 3);
    let cfg = Config::default();
    let o = run(
        &f,
        Mode::Octet,
        &[("blksize", "8"), ("windowsize", "16")],
        &mut clean(),
        &cfg,
    );
    assert_done(&o, &f);
    let f = file(100_000);
    let o = run(
        &f,
        Mode::Octet,
        &[("blksize", "1468"), ("windowsize", "64"), ("tsize", "0")],
        &mut clean(),
        &cfg,
    );
    assert_done(&o, &f);
}

#[test]
fn netascii_translates_line_ends() {
    let src = b"line one\nline two\r\nbare cr\r end\n".repeat(40);
    let o = run(&src, Mode::Netascii, &[], &mut clean(), &Config::default());
    assert_done(&o, &to_netascii(&src));
}

fn to_netascii(src: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for &c in src {
        match c {
            b'\n' => out.extend_from_slice(b"\r\n"),
            b'\r' => out.extend_from_slice(b"\r\0"),
            c => out.push(c),
        }
    }
    out
}

#[test]
fn loss_duplication_and_reordering_never_corrupt_a_transfer() {
    let cfg = Config {
        max_retries: 50,
        ..Config::default()
    };
    for seed in 0..40 {
        for (opts, len) in [
            (&[][..], 20_000),
            (&[("blksize", "1432")][..], 60_000),
            (&[("blksize", "1468"), ("windowsize", "4")][..], 120_000),
            (&[("blksize", "512"), ("windowsize", "64")][..], 150_000),
        ] {
            let mut net = Net::new(seed, 0.05, 0.05, 400);
            let f = file(len);
            let o = run(&f, Mode::Octet, opts, &mut net, &cfg);
            assert_done(&o, &f);
        }
    }
}

#[test]
fn duplicate_acks_do_not_cause_retransmissions_in_lock_step() {
    // Sorcerer's Apprentice: every ACK duplicated, nothing lost, no retransmission.
    let mut net = Net::new(7, 0.0, 1.0, 0);
    let f = file(50_000);
    let o = run(
        &f,
        Mode::Octet,
        &[("blksize", "1432")],
        &mut net,
        &Config::default(),
    );
    assert_done(&o, &f);
    let Event::Done(s) = o.event else {
        unreachable!()
    };
    assert_eq!(s.retransmits, 0);
    assert_eq!(s.packets, 50_000 / 1432 + 1);
}

/// DATA packets the transfer sent, retransmissions included.
fn data_packets(o: &Outcome) -> u64 {
    match &o.event {
        Event::Done(s) | Event::Failed(_, s) => s.packets,
    }
}

/// A windowed transfer of `blocks` full blocks of 1468 bytes and a short one.
fn windowed(blocks: u64, window: u64, net: &mut Net) -> (Outcome, u64) {
    let f = file(1468 * usize::try_from(blocks).expect("blocks") + 100);
    let window = window.to_string();
    let o = run(
        &f,
        Mode::Octet,
        &[("blksize", "1468"), ("windowsize", &window)],
        net,
        &Config::default(),
    );
    assert_done(&o, &f);
    (o, blocks + 1)
}

#[test]
fn one_lost_block_costs_at_most_one_window() {
    // The model client acknowledges every block that arrives out of order (EDK2 does much
    // the same), so a window resent after a loss must not make the copies of later blocks
    // look like new losses: each loss is paid for once, with at most a window.
    for window in [4u64, 16, 64] {
        for lost in [1, 2, window / 2 + 1, window, window + 1, 300] {
            let mut net = clean();
            net.lose_data = vec![lost];
            let (o, blocks) = windowed(1000, window, &mut net);
            let sent = data_packets(&o);
            assert!(
                sent <= blocks + window,
                "windowsize {window}, DATA #{lost} lost: {sent} DATA for {blocks} blocks"
            );
        }
    }
}

#[test]
fn one_duplicated_ack_costs_at_most_one_window() {
    for window in [4u64, 16, 64] {
        for dup in [1, 2, 5, 20] {
            let mut net = clean();
            net.dup_acks = vec![dup];
            let (o, blocks) = windowed(1000, window, &mut net);
            let sent = data_packets(&o);
            assert!(
                sent <= blocks + window,
                "windowsize {window}, ACK #{dup} duplicated: {sent} DATA for {blocks} blocks"
            );
        }
    }
}

#[test]
fn retransmissions_stay_within_two_windows_per_loss_or_duplicate() {
    // The audit's case (20 MB at blksize 1468, 0.05 % loss: windowsize 16 sent 122 212
    // DATA for 13 624 blocks) at a quarter of the size, and a lossier network.
    for (loss, dup) in [(0.0005, 0.0005), (0.01, 0.01)] {
        for window in [4u64, 16, 64] {
            for seed in 0..3 {
                let mut net = Net::new(seed, loss, dup, 0);
                let (o, blocks) = windowed(3400, window, &mut net);
                let sent = data_packets(&o);
                let events = net.lost + net.duplicated;
                assert!(
                    sent <= blocks + events * window * 2,
                    "loss {loss}, dup {dup}, windowsize {window}, seed {seed}: {sent} DATA \
                     for {blocks} blocks with {} lost and {} duplicated packets",
                    net.lost,
                    net.duplicated
                );
            }
        }
    }
}

#[test]
fn a_stale_partial_ack_keeps_the_timer_armed() {
    // Three blocks in a window of four, all sent, then sent again after a timeout. An ACK
    // of block 1 may answer the first copies, so it moves the window without a rewind;
    // blocks 2 and 3 are still unacknowledged and nothing is left to send: the timer
    // must stay armed, or the transfer waits forever.
    let t0 = Instant::now();
    let neg = without_options(512, 4);
    let f = file(1200);
    let mut t = Transfer::new(&neg, Mode::Octet, f.len() as u64, &Config::default());
    let r = t.poll_read().expect("read");
    t.handle_read(Ok(Bytes::copy_from_slice(&f[..r.len.min(f.len())])));
    let mut buf = [0u8; 516];
    let mut sent = 0;
    while t.poll_transmit(t0, &mut buf).is_some() {
        sent += 1;
    }
    assert_eq!(sent, 3);
    let d = t.poll_timeout().expect("armed");
    t.handle_timeout(d);
    while t.poll_transmit(d, &mut buf).is_some() {
        sent += 1;
    }
    assert_eq!(sent, 6, "the window again");
    t.handle_datagram(b"\0\x04\0\x01");
    assert!(t.poll_transmit(d, &mut buf).is_none(), "no rewind");
    let again = t.poll_timeout().expect("the timer is armed again");
    t.handle_timeout(again);
    let n = t.poll_transmit(again, &mut buf).expect("block 2 again");
    assert_eq!(&buf[..4], &[0, 3, 0, 2]);
    assert_eq!(&buf[4..n], &f[512..1024]);
}

#[test]
fn a_silent_client_times_out_after_the_retry_limit() {
    let t0 = Instant::now();
    let cfg = Config {
        max_retries: 3,
        ..Config::default()
    };
    let neg = without_options(512, 1);
    let mut t = Transfer::new(&neg, Mode::Octet, 2000, &cfg);
    let mut buf = [0u8; 516];
    let mut now = t0;
    let mut sends = 0;
    let mut timeouts = Vec::new();
    loop {
        if let Some(r) = t.poll_read() {
            t.handle_read(Ok(vec![1u8; r.len].into()));
        }
        while let Some(n) = t.poll_transmit(now, &mut buf) {
            if Packet::parse(&buf[..n]).is_ok_and(|p| matches!(p, Packet::Data { .. })) {
                sends += 1;
            }
        }
        if let Some(ev) = t.poll_event() {
            assert!(matches!(ev, Event::Failed(Failure::TimedOut, _)), "{ev:?}");
            break;
        }
        let d = t.poll_timeout().expect("armed");
        timeouts.push(d - now);
        now = d;
        t.handle_timeout(now);
    }
    assert_eq!(sends, 4, "the first send and three retries");
    assert_eq!(
        timeouts,
        [1, 2, 4, 8].map(Duration::from_secs),
        "exponential backoff"
    );
    assert!(t.is_closed());
}

/// Runs `t` against a client that never answers; the time from `t0` to its end, and how
/// it ended.
fn silent_client(t: &mut Transfer, t0: Instant) -> (Duration, Event) {
    let mut buf = vec![0u8; t.buffer_len()];
    let mut now = t0;
    loop {
        if let Some(r) = t.poll_read() {
            t.handle_read(Ok(vec![1u8; r.len].into()));
        }
        while t.poll_transmit(now, &mut buf).is_some() {}
        if let Some(ev) = t.poll_event() {
            return (now - t0, ev);
        }
        now = t.poll_timeout().expect("armed");
        t.handle_timeout(now);
    }
}

#[test]
fn no_transfer_waits_for_its_client_longer_than_the_idle_cap() {
    // timeout 255 with backoff to 8 × 255 s and 5 retries would keep the transfer for
    // 255 + 510 + 1020 + 2040 × 3 s, more than two hours.
    let t0 = Instant::now();
    let cfg = Config {
        max_idle: Duration::from_secs(120),
        ..Config::default()
    };
    let mut rq = vec![0u8; 100];
    let n = emit_request(&mut rq, Opcode::RRQ, "f", "octet", &[("timeout", "255")]).expect("fits");
    let Ok(Packet::Rrq(req)) = Packet::parse(&rq[..n]) else {
        panic!("rrq")
    };
    let neg = negotiate(&req, &cfg, Some(100_000));
    assert_eq!(neg.timeout, Duration::from_secs(255));
    let mut t = Transfer::new(&neg, Mode::Octet, 100_000, &cfg);
    let (waited, ev) = silent_client(&mut t, t0);
    assert!(matches!(ev, Event::Failed(Failure::TimedOut, _)), "{ev:?}");
    assert_eq!(waited, cfg.max_idle, "abandoned at the cap");
    // With a short timeout the retries run out first, as before.
    let neg = without_options(512, 4);
    let mut t = Transfer::new(&neg, Mode::Octet, 100_000, &cfg);
    let (waited, _) = silent_client(&mut t, t0);
    assert_eq!(waited, Duration::from_secs(1 + 2 + 4 + 8 + 8 + 8));
    // The cap is on waiting, not on the transfer: a slow client that answers each block
    // after 100 s (within its 255 s timeout) gets the whole file.
    let neg = Negotiated {
        timeout: Duration::from_secs(255),
        ..without_options(512, 1)
    };
    let f = file(2000);
    let mut t = Transfer::new(&neg, Mode::Octet, f.len() as u64, &cfg);
    let mut buf = [0u8; 516];
    let mut now = t0;
    let mut got = Vec::new();
    let done = loop {
        while let Some(r) = t.poll_read() {
            let start = usize::try_from(r.offset).expect("offset");
            let end = (start + r.len).min(f.len());
            t.handle_read(Ok(Bytes::copy_from_slice(&f[start..end])));
        }
        let n = t.poll_transmit(now, &mut buf).expect("DATA");
        got.extend_from_slice(&buf[4..n]);
        now += Duration::from_secs(100);
        t.handle_timeout(now);
        t.handle_datagram(&[0, 4, buf[2], buf[3]]);
        if let Some(ev) = t.poll_event() {
            break ev;
        }
    };
    assert!(matches!(done, Event::Done(_)), "{done:?}");
    assert_eq!(got, f);
}

#[test]
fn a_file_that_shrinks_aborts_with_an_error() {
    let t0 = Instant::now();
    let cfg = Config::default();
    let neg = without_options(512, 1);
    let mut t = Transfer::new(&neg, Mode::Octet, 10_000, &cfg);
    let r = t.poll_read().expect("read");
    assert_eq!(r.offset, 0);
    t.handle_read(Ok(Bytes::new()));
    let mut buf = [0u8; 516];
    let n = t.poll_transmit(t0, &mut buf).expect("error packet");
    assert!(matches!(
        Packet::parse(&buf[..n]),
        Ok(Packet::Error {
            code: ErrorCode::UNDEFINED,
            ..
        })
    ));
    assert!(matches!(
        t.poll_event(),
        Some(Event::Failed(Failure::FileChanged, _))
    ));
}

#[test]
fn a_client_error_ends_the_transfer() {
    let t0 = Instant::now();
    let neg = Negotiated {
        blksize: 512,
        windowsize: 1,
        timeout: Duration::from_secs(1),
        oack: vec![("tsize", "9".into())],
    };
    let mut t = Transfer::new(&neg, Mode::Octet, 9, &Config::default());
    let mut buf = [0u8; 516];
    assert!(t.poll_transmit(t0, &mut buf).is_some(), "OACK");
    t.handle_datagram(b"\0\x05\0\x08option refused\0");
    assert!(matches!(
        t.poll_event(),
        Some(Event::Failed(
            Failure::ClientError(ErrorCode::BAD_OPTIONS),
            _
        ))
    ));
    assert!(t.poll_transmit(t0, &mut buf).is_none());
}

#[test]
fn the_next_block_is_read_while_the_client_acknowledges_this_one() {
    let t0 = Instant::now();
    let cfg = Config {
        read_chunk: 1024,
        ..Config::default()
    };
    let neg = without_options(1024, 1);
    let f = file(8192);
    let mut t = Transfer::new(&neg, Mode::Octet, f.len() as u64, &cfg);
    let mut buf = [0u8; 1028];
    let mut at = 0;
    for block in 1..=3usize {
        while let Some(r) = t.poll_read() {
            assert_eq!(r.offset, at as u64);
            let end = (at + r.len).min(f.len());
            t.handle_read(Ok(Bytes::copy_from_slice(&f[at..end])));
            at = end;
        }
        // Block `block` goes out with the next one (and a byte more: is it the last?)
        // already in hand, so that the next read does not wait for this ACK.
        assert!(
            at > (block + 1) * 1024,
            "block {block}: read only {at} bytes"
        );
        assert!(
            at <= (block + 2) * 1024 + cfg.read_chunk,
            "block {block}: read {at} bytes, more than a block ahead"
        );
        let n = t.poll_transmit(t0, &mut buf).expect("data");
        assert_eq!(&buf[4..n], &f[(block - 1) * 1024..block * 1024]);
        let mut ack = [0u8; 4];
        let n = emit_ack(&mut ack, block as u16).expect("ack");
        t.handle_datagram(&ack[..n]);
    }
}

#[test]
fn blocks_are_slices_of_the_data_read_not_copies() {
    let t0 = Instant::now();
    let neg = without_options(1000, 4);
    let f = Bytes::from(file(10_000));
    let mut t = Transfer::new(&neg, Mode::Octet, f.len() as u64, &Config::default());
    let r = t.poll_read().expect("read");
    let (start, end) = (usize::try_from(r.offset).expect("offset"), r.len);
    t.handle_read(Ok(f.slice(start..start + end)));
    let f_range = f.as_ptr_range();
    for block in 1..=4usize {
        let d = t.poll_datagram(t0).expect("data");
        assert_eq!(d.head(), &[0, 3, 0, block as u8]);
        assert_eq!(d.body(), &f[(block - 1) * 1000..block * 1000]);
        let body = d.body().as_ptr_range();
        assert!(
            f_range.contains(&body.start) && body.end <= f_range.end,
            "block {block} was copied out of the data read"
        );
    }
    assert!(t.poll_datagram(t0).is_none(), "the window is full");
}

#[test]
fn reads_end_on_block_boundaries_even_after_a_short_read() {
    let neg = without_options(1000, 1);
    let cfg = Config {
        read_chunk: 2500,
        ..Config::default()
    };
    let f = file(100_000);
    let mut t = Transfer::new(&neg, Mode::Octet, f.len() as u64, &cfg);
    let r = t.poll_read().expect("read");
    assert_eq!(
        (r.offset, r.len),
        (0, 3000),
        "2500 bytes, up to a block boundary"
    );
    t.handle_read(Ok(Bytes::copy_from_slice(&f[..1234]))); // short
    let r = t.poll_read().expect("the rest");
    assert_eq!(r.offset, 1234);
    assert_eq!((r.offset + r.len as u64) % 1000, 0, "{r:?} ends mid-block");
}

#[test]
fn blocks_that_span_short_reads_come_out_intact() {
    let t0 = Instant::now();
    for netascii in [false, true] {
        let neg = without_options(512, 8);
        let mut f = file(20_000);
        if netascii {
            f.iter_mut().step_by(37).for_each(|b| *b = b'\n');
        }
        let mode = if netascii {
            Mode::Netascii
        } else {
            Mode::Octet
        };
        let want = if netascii { to_netascii(&f) } else { f.clone() };
        let mut t = Transfer::new(&neg, mode, f.len() as u64, &Config::default());
        // Reads come back in pieces of 1, 7, 300 and 1100 bytes, in turn.
        let mut pieces = [1usize, 7, 300, 1100].into_iter().cycle();
        let mut got = Vec::new();
        let mut block = 0u16;
        for _ in 0..10_000 {
            while let Some(r) = t.poll_read() {
                let start = usize::try_from(r.offset).expect("offset");
                let end = (start + r.len.min(pieces.next().expect("cycle"))).min(f.len());
                t.handle_read(Ok(Bytes::copy_from_slice(&f[start..end])));
            }
            let Some(d) = t.poll_datagram(t0) else {
                if t.is_closed() {
                    break;
                }
                let mut ack = [0u8; 4];
                emit_ack(&mut ack, block).expect("ack");
                t.handle_datagram(&ack);
                continue;
            };
            block = u16::from_be_bytes([d.head()[2], d.head()[3]]);
            got.extend_from_slice(d.body());
            assert!(d.body().len() <= 512);
        }
        assert!(matches!(t.poll_event(), Some(Event::Done(_))));
        assert_eq!(got, want, "netascii {netascii}");
    }
}
