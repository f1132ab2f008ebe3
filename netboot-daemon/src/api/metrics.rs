//! `/metrics` for Prometheus (open, like every exporter: it reveals counts, not
//! inventory) and the TFTP transfer listing under `/api/v1`.

use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use super::{AppState, Auth, VERSION, blocking};
use crate::metrics::{Exposition, Format, Kind};
use crate::service::tftp::TransferRecord;

/// The daemon's metrics, as OpenMetrics when the scraper asks for it (Prometheus does),
/// otherwise in the Prometheus text format.
pub(super) async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let format = Format::from_accept(
        headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default(),
    );
    let inventory = blocking(&state, |s| s.device_counts()).await;
    let mut e = Exposition::new(format);
    e.family("netboot_build", Kind::Info, None, "The running netbootd.");
    e.info("netboot_build", &[("version", VERSION)]);
    if let Ok((devices, unknown)) = inventory {
        e.family(
            "netboot_devices",
            Kind::Gauge,
            None,
            "Devices in the inventory: registered, and seen but not registered.",
        );
        e.gauge(
            "netboot_devices",
            &[("state", "registered")],
            devices as f64,
        );
        e.gauge("netboot_devices", &[("state", "unknown")], unknown as f64);
    }
    if let Some(dhcp) = state.dhcp() {
        dhcp.write_metrics(&mut e);
    }
    if let Some(tftp) = state.tftp() {
        tftp.write_metrics(&mut e);
    }
    e.family(
        "netboot_accounting",
        Kind::Info,
        None,
        "Where the per-client figures come from: ebpf (exact, from the kernel), or none (eBPF accounting is off or could not load; see the log).",
    );
    let source = if state.accounting().is_some() {
        "ebpf"
    } else {
        "none"
    };
    e.info("netboot_accounting", &[("source", source)]);
    if let Some(acc) = state.accounting().cloned() {
        let max_macs = state.config().ebpf.metrics_max_macs;
        // Map reads are syscalls: off the async workers.
        let written = tokio::task::spawn_blocking(move || {
            let mut part = Exposition::new(format);
            crate::service::accounting::write_metrics(&acc, &mut part, max_macs);
            part.into_body()
        })
        .await;
        match written {
            Ok(body) => e.append(&body),
            Err(error) => tracing::warn!(%error, "writing the eBPF metrics failed"),
        }
    }
    ([(header::CONTENT_TYPE, format.content_type())], e.finish()).into_response()
}

/// Running and recent TFTP transfers.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct TftpTransfers {
    /// Whether the TFTP server runs.
    enabled: bool,
    /// Transfers running now, oldest first; `duration_ms` is the time so far.
    active: Vec<TransferRecord>,
    /// The most recent ended transfers (up to 256), newest first.
    recent: Vec<TransferRecord>,
}

/// Running and recent TFTP transfers: client, file, negotiated options, the transfer's
/// own server socket, bytes, outcome.
#[utoipa::path(get, path = "/api/v1/tftp/transfers", tag = "tftp",
    responses((status = 200, body = TftpTransfers)))]
pub(super) async fn tftp_transfers(
    State(state): State<AppState>,
    _auth: Auth,
) -> axum::Json<TftpTransfers> {
    let tftp = state.tftp();
    let (active, recent) = tftp.map(|t| t.transfers_snapshot()).unwrap_or_default();
    axum::Json(TftpTransfers {
        enabled: tftp.is_some(),
        active,
        recent,
    })
}
