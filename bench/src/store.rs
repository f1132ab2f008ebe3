//! `netboot-bench store [--events N] [--rounds R]`: the boot-event path of the store
//! (every DHCP, TFTP, HTTP and iSCSI step of every client writes one event): inserts
//! per second with per-device retention, and the latency of the newest-first page that
//! the UI's live view reads, on a WAL file database in a temporary directory.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use netboot_daemon::mac::MacAddr;
use netboot_daemon::store::{
    Audit, EventQuery, EventSource, NewBootEvent, Settings, Sqlite, Store,
};
use netboot_daemon::time::Timestamp;

/// Options of `store`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct StoreArgs {
    /// Events inserted per round.
    #[arg(long, default_value_t = 20_000)]
    events: usize,
    /// Rounds (the median is reported).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

pub(crate) fn run(args: &StoreArgs) -> anyhow::Result<()> {
    let events = args.events;
    let rounds = args.rounds.max(1);
    let dir = std::env::temp_dir().join(format!("netboot-bench-{}", std::process::id()));
    let mut insert = Vec::new();
    let mut page = Vec::new();
    for round in 0..rounds {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let s = Sqlite::open(&dir.join("bench.db"))?;
        let settings = Settings {
            events_per_device: 50,
            ..Settings::default()
        };
        s.put_settings(&Audit::system(), &settings)?;
        let t = Instant::now();
        let mut for_device_7 = 0u64;
        for i in 0..events {
            let n = u8::try_from(i % 200).context("device index")?;
            for_device_7 += u64::from(n == 7);
            let ev = NewBootEvent {
                mac: MacAddr([2, 0, 0, 0, 0, n]),
                at: Timestamp::now(),
                source: EventSource::Tftp,
                kind: "tftp_block".into(),
                detail: format!("event {i}"),
                ip: None,
            };
            s.add_event(&ev)?;
        }
        insert.push(t.elapsed() / u32::try_from(events).context("events")?);
        let t = Instant::now();
        let q = EventQuery {
            mac: Some(MacAddr([2, 0, 0, 0, 0, 7])),
            limit: 50,
            ..EventQuery::default()
        };
        let p = s.list_events(&q)?;
        page.push(t.elapsed());
        let kept = for_device_7.min(50);
        anyhow::ensure!(
            p.total == kept,
            "retention kept {} events, expected {kept}",
            p.total
        );
        eprintln!(
            "round {round}: insert {:?}/event, page {:?}",
            insert[round], page[round]
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    let ins = median(insert);
    eprintln!(
        "store: {events} events x {rounds} rounds: median {ins:?} per insert ({:.0} events/s), newest-first page of 50 in {:?}",
        1.0 / ins.as_secs_f64(),
        median(page)
    );
    Ok(())
}
