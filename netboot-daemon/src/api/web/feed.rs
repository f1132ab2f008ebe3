//! Live boot events for the browser: one tail of the store's event log, broadcast to
//! every open page over Server-Sent Events.
//!
//! Boot events are written by many services straight into the store, so the feed tails
//! the store rather than hooking each writer: while at least one page listens, one task
//! reads the newest events every [`POLL`] and broadcasts those it has not sent. With no
//! listener the task ends, so an idle daemon does no work for the UI.

use std::convert::Infallible;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::{Stream, StreamExt as _};
use serde::Deserialize;
use tokio::sync::{broadcast, watch};

use crate::api::inventory::parse_mac;
use crate::api::{ApiError, AppState, Auth, blocking};
use crate::mac::MacAddr;
use crate::store::{BootEvent, EventQuery};

/// How often the tail reads the store while a page listens.
const POLL: Duration = Duration::from_millis(500);

/// Events buffered per listener; a listener that falls further behind skips ahead.
const BACKLOG: usize = 256;

/// Rows the tail reads first on each poll.
const QUICK: u32 = 16;

/// The broadcast of new boot events.
#[derive(Debug)]
pub struct Feed {
    tx: broadcast::Sender<BootEvent>,
    /// Whether the tail task runs. Checked and set together with subscribing, so that a
    /// subscriber never misses a starting or ending task.
    running: Mutex<bool>,
    /// Set when the daemon stops: every stream ends, so that graceful shutdown does not
    /// wait for pages that would listen for ever.
    closed: watch::Sender<bool>,
}

impl Default for Feed {
    fn default() -> Self {
        Self {
            tx: broadcast::channel(BACKLOG).0,
            running: Mutex::new(false),
            closed: watch::channel(false).0,
        }
    }
}

impl AppState {
    /// Ends the live event streams of the web UI (and refuses new ones): call it when
    /// the daemon begins to shut down, before waiting for open connections.
    pub fn end_live_streams(&self) {
        self.0.feed.closed.send_replace(true);
    }
}

impl Feed {
    /// Subscribes to events newer than `since`, starting the tail when it does not run.
    fn subscribe(&self, state: &AppState, since: i64) -> broadcast::Receiver<BootEvent> {
        let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        let rx = self.tx.subscribe();
        if !*running {
            *running = true;
            tokio::spawn(tail(state.clone(), since));
        }
        rx
    }
}

/// The newest events, newest first.
async fn newest(state: &AppState, limit: u32) -> Result<Vec<BootEvent>, ApiError> {
    let q = EventQuery {
        limit,
        ..EventQuery::default()
    };
    Ok(blocking(state, move |s| s.list_events(&q)).await?.items)
}

/// Broadcasts the events after `last`, oldest first, every [`POLL`] until nobody listens.
async fn tail(state: AppState, mut last: i64) {
    let feed = &state.0.feed;
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        {
            let mut running = feed.running.lock().unwrap_or_else(PoisonError::into_inner);
            if feed.tx.receiver_count() == 0 {
                *running = false;
                return;
            }
        }
        // Usually a few rows cover what is new; read further back only when they do not.
        let mut items = Vec::new();
        for limit in [QUICK, BACKLOG as u32] {
            items = match newest(&state, limit).await {
                Ok(items) => items,
                Err(error) => {
                    tracing::warn!(?error, "the live event feed cannot read the store");
                    Vec::new()
                }
            };
            let covered =
                items.len() < limit as usize || items.last().is_some_and(|e| e.id <= last);
            if covered {
                break;
            }
        }
        let since = last;
        for ev in items.into_iter().rev().filter(|e| e.id > since) {
            last = ev.id;
            // No receiver left is not an error: the next tick ends the task.
            let _ = feed.tx.send(ev);
        }
    }
}

/// Query of the event stream.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct StreamParams {
    /// Only this device's events.
    mac: Option<String>,
}

/// `GET /ui/events`: new boot events as Server-Sent Events (`event: boot`, `id:` the
/// event id, JSON data as in the API), all devices or one (`?mac=`). A browser that
/// reconnects with `Last-Event-ID` first gets what it missed (up to [`BACKLOG`]).
pub(super) async fn stream(
    State(state): State<AppState>,
    _auth: Auth,
    headers: HeaderMap,
    Query(p): Query<StreamParams>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let only: Option<MacAddr> = p.mac.as_deref().map(parse_mac).transpose()?;
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i64>().ok());
    let recent = newest(&state, if resume.is_some() { BACKLOG as u32 } else { 1 }).await?;
    let now = recent.first().map_or(0, |e| e.id);
    let missed: Vec<BootEvent> = match resume {
        Some(since) => recent.into_iter().rev().filter(|e| e.id > since).collect(),
        None => Vec::new(),
    };
    let rx = state.0.feed.subscribe(&state, now);
    let wanted = move |ev: &BootEvent| only.is_none_or(|m| m == ev.mac);
    let boot = |ev: &BootEvent| {
        let data = serde_json::to_string(ev).unwrap_or_default();
        Ok(Event::default()
            .event("boot")
            .id(ev.id.to_string())
            .data(data))
    };
    // A first comment tells the page (and any proxy) at once that the stream is open.
    let backlog: Vec<Result<Event, Infallible>> =
        std::iter::once(Ok(Event::default().comment("live")))
            .chain(missed.iter().filter(|e| wanted(e)).map(boot))
            .collect();
    let live = futures_util::stream::unfold((rx, now), move |(mut rx, mut last)| async move {
        loop {
            match rx.recv().await {
                // Events the backlog already carried are skipped.
                Ok(ev) if ev.id > last && wanted(&ev) => {
                    last = ev.id;
                    return Some((boot(&ev), (rx, last)));
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    let note = Event::default().event("lagged").data(n.to_string());
                    return Some((Ok(note), (rx, last)));
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    let mut closed = state.0.feed.closed.subscribe();
    let ended = async move {
        let _ = closed.wait_for(|c| *c).await;
    };
    let events = futures_util::stream::iter(backlog)
        .chain(live)
        .take_until(ended);
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::config::Config;
    use crate::store::{EventSource, NewBootEvent, Sqlite, Store};
    use crate::time::Timestamp;

    fn event(mac: &str, kind: &str) -> NewBootEvent {
        NewBootEvent {
            mac: mac.parse().expect("mac"),
            at: Timestamp::now(),
            source: EventSource::Api,
            kind: kind.into(),
            detail: String::new(),
            ip: None,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn new_events_reach_every_listener_and_the_tail_stops_when_nobody_listens() {
        let store: Arc<dyn Store> = Arc::new(Sqlite::in_memory().expect("store"));
        let old = store
            .add_event(&event("52:54:00:00:00:01", "before"))
            .expect("event");
        let state = AppState::new(
            Arc::clone(&store),
            Config::default().validate().expect("config"),
        );
        let feed = &state.0.feed;
        let mut a = feed.subscribe(&state, old.id);
        let mut b = feed.subscribe(&state, old.id);
        let new = store
            .add_event(&event("52:54:00:00:00:02", "after"))
            .expect("event");
        for rx in [&mut a, &mut b] {
            let got = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("an event within 10 s")
                .expect("open channel");
            assert_eq!(got, new, "only events after the subscription, each once");
        }
        // A burst larger than one quick read arrives whole and in order.
        let burst: Vec<BootEvent> = (0..40)
            .map(|i| {
                store
                    .add_event(&event("52:54:00:00:00:03", &format!("burst_{i}")))
                    .expect("event")
            })
            .collect();
        for want in &burst {
            let got = tokio::time::timeout(Duration::from_secs(10), a.recv())
                .await
                .expect("an event within 10 s")
                .expect("open channel");
            assert_eq!(&got, want);
        }
        drop((a, b));
        let stopped = async {
            while *feed.running.lock().unwrap_or_else(PoisonError::into_inner) {
                tokio::time::sleep(POLL).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), stopped)
            .await
            .expect("the tail ends without listeners");
    }
}
