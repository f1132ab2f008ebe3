//! `/metrics` for Prometheus (open, like every exporter: it reveals counts, not
//! inventory) and the TFTP transfer listing under `/api/v1`.

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use super::error::ApiError;
use super::inventory::parse_mac;
use super::{AppState, Auth, VERSION, blocking};
use crate::metrics::{Exposition, Format, Kind};
use crate::service::accounting::{Attribution, DeviceTraffic, LifetimeTotal, ServiceFigures};
use crate::service::iscsi::SessionRecord;
use crate::service::tftp::TransferRecord;

/// Without the daemon's services (tests of the API alone) there is no accounting.
const NOT_RUNNING: &str = "per-client accounting is not running";

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
    if let Some(iscsi) = state.iscsi() {
        iscsi.sessions().write_metrics(&mut e);
    }
    e.family(
        "netboot_accounting",
        Kind::Info,
        None,
        "Where the per-client figures come from: ebpf (exact wire bytes, from the kernel), userspace (the eBPF program could not load or no ebpf.interfaces are configured: socket payload bytes counted by netbootd's servers; see the log), or none.",
    );
    let traffic = state.traffic().cloned();
    let source = traffic.as_ref().map_or("none", |t| t.counters().source());
    e.info("netboot_accounting", &[("source", source)]);
    if let Some(traffic) = traffic {
        let max_macs = state.config().ebpf.metrics_max_macs;
        // Map reads are syscalls: off the async workers.
        let written = tokio::task::spawn_blocking(move || {
            let mut part = Exposition::new(format);
            crate::service::accounting::write_metrics(traffic.counters(), &mut part, max_macs);
            part.into_body()
        })
        .await;
        match written {
            Ok(body) => e.append(&body),
            Err(error) => tracing::warn!(%error, "writing the accounting metrics failed"),
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

/// Live and recent iSCSI sessions.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct IscsiSessions {
    /// Whether the iSCSI target runs.
    enabled: bool,
    /// Sessions logged in now, oldest first, with their figures so far.
    active: Vec<SessionRecord>,
    /// The most recent ended sessions (up to 256), newest first; `kernel` is filled in
    /// shortly after the end.
    recent: Vec<SessionRecord>,
}

/// Live and recent iSCSI normal sessions: initiator, target, the connection's addresses,
/// bytes and commands by the target's own count, command latency, and the kernel's count
/// of the same connection once it ended.
#[utoipa::path(get, path = "/api/v1/iscsi/sessions", tag = "iscsi",
    responses((status = 200, body = IscsiSessions)))]
pub(super) async fn iscsi_sessions(
    State(state): State<AppState>,
    _auth: Auth,
) -> axum::Json<IscsiSessions> {
    let iscsi = state.iscsi();
    let (active, recent) = iscsi.map(|t| t.sessions().records()).unwrap_or_default();
    axum::Json(IscsiSessions {
        enabled: iscsi.is_some(),
        active,
        recent,
    })
}

/// One device's traffic and where the figures come from.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct DeviceMetrics {
    /// The device.
    mac: String,
    /// `ebpf` (exact wire bytes, from the kernel), `userspace` (socket payload bytes
    /// counted by netbootd's servers because the eBPF program is not loaded; see
    /// `warnings`) or `none`.
    source: &'static str,
    /// Why figures are missing or incomplete.
    warnings: Vec<String>,
    /// Totals of all time per service and direction, kept in the store (they outlive
    /// the counters: a reboot empties the kernel's, a restart the userspace ones).
    lifetime: Vec<LifetimeTotal>,
    /// Totals, rates and active sessions (empty without accounting).
    #[serde(flatten)]
    traffic: Option<DeviceTraffic>,
}

/// A device's bytes per service and direction (wire bytes as its interface counts them),
/// current rates, and its active connections with their bytes; each figure says its source.
#[utoipa::path(get, path = "/api/v1/devices/{mac}/metrics", tag = "metrics",
    params(("mac" = String, Path, description = "The device's MAC, in any common spelling")),
    responses((status = 200, body = DeviceMetrics), (status = 400, description = "not a MAC")))]
pub(super) async fn device_metrics(
    State(state): State<AppState>,
    _auth: Auth,
    Path(mac): Path<String>,
) -> Result<axum::Json<DeviceMetrics>, ApiError> {
    let mac = parse_mac(&mac)?;
    let Some(traffic) = state.traffic().cloned() else {
        return Ok(axum::Json(DeviceMetrics {
            mac: mac.to_string(),
            source: "none",
            warnings: vec![NOT_RUNNING.to_owned()],
            lifetime: Vec::new(),
            traffic: None,
        }));
    };
    let source = traffic.counters().source();
    let warnings = traffic.counters().warnings();
    let store = state.store_arc();
    let (read, lifetime) = tokio::task::spawn_blocking(move || traffic.device(mac, store.as_ref()))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| ApiError::internal(format!("reading the device's traffic: {e}")))?;
    Ok(axum::Json(DeviceMetrics {
        mac: mac.to_string(),
        source,
        warnings,
        lifetime,
        traffic: Some(read),
    }))
}

/// The traffic of each service over all clients.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ServicesTraffic {
    /// `ebpf` (exact wire bytes, from the kernel), `userspace` (socket payload bytes
    /// counted by netbootd's servers because the eBPF program is not loaded; see
    /// `warnings`) or `none`.
    pub(crate) source: &'static str,
    /// Why figures are missing or what they leave out.
    pub(crate) warnings: Vec<String>,
    /// Seconds between rate samples.
    pub(crate) sample_secs: u64,
    /// Per service (empty without accounting).
    pub(crate) services: Vec<ServiceFigures>,
}

/// The traffic of each service, as the dashboard shows it (blocking reads off the async
/// workers).
pub(crate) async fn services_traffic(state: &AppState) -> Result<ServicesTraffic, ApiError> {
    let Some(traffic) = state.traffic().cloned() else {
        return Ok(ServicesTraffic {
            source: "none",
            warnings: vec![NOT_RUNNING.to_owned()],
            sample_secs: crate::service::accounting::SAMPLE_SECS,
            services: Vec::new(),
        });
    };
    let source = traffic.counters().source();
    let warnings = traffic.counters().warnings();
    let services = tokio::task::spawn_blocking(move || traffic.services())
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| ApiError::internal(format!("reading the counters: {e}")))?;
    Ok(ServicesTraffic {
        source,
        warnings,
        sample_secs: crate::service::accounting::SAMPLE_SECS,
        services,
    })
}

/// Each service's bytes (all clients and the unattributed traffic: wire bytes on the boot
/// interfaces with eBPF, socket payload bytes in userspace), current rates and the rates
/// of the last five minutes, with the figures' source.
#[utoipa::path(get, path = "/api/v1/accounting/services", tag = "metrics",
    responses((status = 200, body = ServicesTraffic)))]
pub(super) async fn services(
    State(state): State<AppState>,
    _auth: Auth,
) -> Result<axum::Json<ServicesTraffic>, ApiError> {
    Ok(axum::Json(services_traffic(&state).await?))
}

/// Query of [`attribution`].
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
pub(super) struct AttributionQuery {
    /// Only this client.
    mac: Option<String>,
}

/// For debugging the accounting: for each client MAC, its bytes by how they were
/// attributed (DHCP `chaddr`, the frame's own MAC, or the binding of its address, with the
/// bindings and since when), the routers, and what could not be attributed.
#[utoipa::path(get, path = "/api/v1/accounting/attribution", tag = "metrics",
    params(AttributionQuery),
    responses((status = 200, body = Attribution), (status = 404, description = "eBPF accounting is not running")))]
pub(super) async fn attribution(
    State(state): State<AppState>,
    _auth: Auth,
    Query(q): Query<AttributionQuery>,
) -> Result<axum::Json<Attribution>, ApiError> {
    let only = q.mac.as_deref().map(parse_mac).transpose()?;
    let Some(traffic) = state.traffic().cloned() else {
        return Err(ApiError::not_found(NOT_RUNNING.to_owned()));
    };
    let st = state.clone();
    tokio::task::spawn_blocking(move || traffic.attribution(st.bindings(), only))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map(axum::Json)
        .map_err(|e| ApiError::internal(format!("reading the eBPF tables: {e}")))
}
