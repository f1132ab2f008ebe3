//! The boot timeline: what the services observed, put on the device it was for.

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::bindings::Bindings;
use crate::mac::MacAddr;
use crate::service::tftp::{TransferRecord, TransferState};
use crate::store::{self, EventSource, NewBootEvent, Sighting, Store};
use crate::time::Timestamp;

/// Records a client as seen and puts `event` on its timeline (blocking: the store).
pub(crate) fn record_blocking(
    store: &dyn Store,
    sighting: &Sighting,
    event: &NewBootEvent,
) -> store::Result<()> {
    store.record_sighting(sighting)?;
    store.add_event(event).map(|_| ())
}

/// Puts each ended TFTP transfer on the timeline of the device it was for: the client's
/// address is resolved to a MAC through the bindings (DHCP, HTTP, neighbour table).
/// Transfers of clients whose MAC is unknown stay in the TFTP transfer list only.
pub async fn record_tftp_transfers(
    store: Arc<dyn Store>,
    bindings: Arc<Bindings>,
    mut records: mpsc::Receiver<TransferRecord>,
) {
    while let Some(r) = records.recv().await {
        let (store, bindings) = (Arc::clone(&store), Arc::clone(&bindings));
        // The lookup may read the kernel's neighbour table: blocking too.
        let res = tokio::task::spawn_blocking(move || {
            let Some(binding) = bindings.lookup(r.client.ip()) else {
                tracing::debug!(client = %r.client, file = %r.file, "TFTP transfer of a client whose MAC is unknown");
                return Ok(());
            };
            let at = Timestamp::now();
            let sighting = Sighting {
                mac: binding.mac,
                at,
                arch: None,
                ip: Some(r.client.ip().to_string()),
                vendor_class: None,
            };
            record_blocking(store.as_ref(), &sighting, &tftp_event(binding.mac, at, &r))
        })
        .await;
        if let Ok(Err(error)) = res {
            tracing::warn!(%error, "recording a TFTP transfer failed");
        }
    }
}

/// The boot event of an ended TFTP transfer.
fn tftp_event(mac: MacAddr, at: Timestamp, r: &TransferRecord) -> NewBootEvent {
    let kind = match r.state {
        TransferState::Done => "tftp_done",
        TransferState::Refused => "tftp_refused",
        _ => "tftp_failed",
    };
    let mut detail = format!(
        "{} ({}): {} bytes in {} ms, blksize {}, windowsize {}",
        r.file,
        r.state.as_str(),
        r.bytes,
        r.duration_ms.unwrap_or(0),
        r.blksize,
        r.windowsize
    );
    if r.retransmits > 0 {
        detail.push_str(&format!(", {} retransmits", r.retransmits));
    }
    if let Some(server) = r.server {
        detail.push_str(&format!(", server port {}", server.port()));
    }
    if let Some(why) = &r.detail {
        detail.push_str(&format!(": {why}"));
    }
    NewBootEvent {
        mac,
        at,
        source: EventSource::Tftp,
        kind: kind.into(),
        detail,
        ip: Some(r.client.ip().to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bindings::Source;
    use crate::store::{EventQuery, PageQuery, Sqlite};

    fn record(id: u64, client: &str, state: TransferState) -> TransferRecord {
        TransferRecord {
            id,
            client: client.parse().expect("addr"),
            server: Some("192.0.2.1:40123".parse().expect("addr")),
            file: "ipxe.efi".into(),
            mode: "octet".into(),
            blksize: 1468,
            windowsize: 4,
            size: Some(1_048_576),
            started_at: Timestamp(1),
            state,
            detail: None,
            bytes: if state == TransferState::Done {
                1_048_576
            } else {
                0
            },
            packets: 715,
            retransmits: 2,
            duration_ms: Some(420),
            sent_bytes: 1_052_000,
            received_bytes: 2_860,
            kernel: None,
        }
    }

    #[tokio::test]
    async fn transfers_land_on_the_timeline_of_the_bound_mac_only() {
        let store: Arc<dyn Store> = Arc::new(Sqlite::in_memory().expect("store"));
        let bindings = Arc::new(Bindings::default());
        let mac: MacAddr = "52:54:00:12:34:56".parse().expect("mac");
        bindings.learn(
            "192.0.2.10".parse().expect("ip"),
            mac,
            Source::Dhcp,
            Timestamp::now(),
        );
        let (tx, rx) = mpsc::channel(8);
        tx.send(record(1, "192.0.2.10:2070", TransferState::Done))
            .await
            .expect("send");
        tx.send(record(2, "192.0.2.10:2071", TransferState::TimedOut))
            .await
            .expect("send");
        // 192.0.2.99 is neither bound nor in this machine's neighbour table.
        tx.send(record(3, "192.0.2.99:2072", TransferState::Done))
            .await
            .expect("send");
        drop(tx);
        record_tftp_transfers(Arc::clone(&store), bindings, rx).await;

        let events = store
            .list_events(&EventQuery {
                limit: 10,
                ..EventQuery::default()
            })
            .expect("events");
        let kinds: Vec<(&str, MacAddr)> = events
            .items
            .iter()
            .map(|e| (e.kind.as_str(), e.mac))
            .collect();
        assert_eq!(
            kinds,
            vec![("tftp_failed", mac), ("tftp_done", mac)],
            "newest first"
        );
        let done = &events.items[1];
        assert_eq!(done.source, EventSource::Tftp);
        assert_eq!(done.ip.as_deref(), Some("192.0.2.10"));
        assert_eq!(
            done.detail,
            "ipxe.efi (done): 1048576 bytes in 420 ms, blksize 1468, windowsize 4, 2 retransmits, server port 40123"
        );
        // The client was not registered: it is now an unknown device.
        let unknown = store
            .list_unknown_devices(&PageQuery {
                limit: 10,
                offset: 0,
            })
            .expect("unknown");
        assert_eq!(
            unknown.items.iter().map(|u| u.mac).collect::<Vec<_>>(),
            vec![mac]
        );
    }
}
