//! Version, health, boot events, settings and the audit log.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, Json, Query};
use super::inventory::parse_mac;
use super::{AppState, Auth, blocking};
use crate::store::{
    AuditEntry, AuditQuery, BootEvent, EventQuery, EventSource, NewBootEvent, Page, Role, Settings,
};
use crate::time::Timestamp;

/// The release version: the content of the repository's `VERSION` file.
pub const VERSION: &str = include_str!("../../../VERSION").trim_ascii();

/// Name and version.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct VersionInfo {
    /// Always `netboot`.
    pub name: String,
    /// The release version.
    pub version: String,
}

/// The daemon's name and version.
#[utoipa::path(get, path = "/api/v1/version", tag = "system", responses((status = 200, body = VersionInfo)))]
pub(super) async fn version() -> axum::Json<VersionInfo> {
    axum::Json(VersionInfo {
        name: "netboot".into(),
        version: VERSION.into(),
    })
}

/// One health check.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// Whether it passed.
    pub ok: bool,
    /// What was found.
    pub detail: String,
}

/// Result of the health checks.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// `ok` or `failing`.
    pub status: String,
    /// Each check.
    pub checks: Vec<Check>,
}

/// Runs the health checks: the store takes a write, the data directories exist and
/// are directories. 200 when all pass, 503 otherwise.
#[utoipa::path(get, path = "/api/v1/health", tag = "system",
    responses((status = 200, body = Health), (status = 503, body = Health)))]
pub(super) async fn health(State(state): State<AppState>) -> Response {
    let mut checks = Vec::new();
    let store = state.store_arc();
    let write = tokio::task::spawn_blocking(move || store.check_writable()).await;
    checks.push(match write {
        Ok(Ok(())) => Check {
            name: "store".into(),
            ok: true,
            detail: "writable".into(),
        },
        Ok(Err(e)) => Check {
            name: "store".into(),
            ok: false,
            detail: e.to_string(),
        },
        Err(e) => Check {
            name: "store".into(),
            ok: false,
            detail: e.to_string(),
        },
    });
    for (name, dir) in state.paths().dirs() {
        let (ok, detail) = match tokio::fs::metadata(dir).await {
            Ok(m) if m.is_dir() => (true, "present".to_owned()),
            Ok(_) => (false, "not a directory".to_owned()),
            Err(e) => (false, e.kind().to_string()),
        };
        checks.push(Check {
            name: format!("dir:{name}"),
            ok,
            detail,
        });
    }
    let ok = checks.iter().all(|c| c.ok);
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = Health {
        status: if ok { "ok" } else { "failing" }.into(),
        checks,
    };
    (status, axum::Json(body)).into_response()
}

/// Filters of the boot event listing.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(default, deny_unknown_fields)]
pub struct EventParams {
    /// Only this device (any MAC spelling).
    pub mac: Option<String>,
    /// Only this event name.
    pub kind: Option<String>,
    /// Only this source (`dhcp`, `tftp`, `http`, `iscsi`, `api`, `system`).
    pub source: Option<EventSource>,
    /// RFC 3339: at or after.
    pub since: Option<String>,
    /// RFC 3339: before.
    pub until: Option<String>,
    /// Cursor from `next_cursor`.
    pub before: Option<i64>,
    /// Page size, 1-1000 (default 100).
    pub limit: Option<u32>,
}

fn parse_time(field: &str, v: Option<String>) -> Result<Option<Timestamp>, ApiError> {
    v.map(|s| {
        Timestamp::parse_rfc3339(&s).ok_or_else(|| {
            ApiError::bad_request(format!(
                "{field} must be an RFC 3339 time, e.g. 2026-11-25T21:00:00Z"
            ))
        })
    })
    .transpose()
}

fn event_query(p: EventParams, mac: Option<String>) -> Result<EventQuery, ApiError> {
    Ok(EventQuery {
        mac: mac.or(p.mac).as_deref().map(parse_mac).transpose()?,
        kind: p.kind,
        source: p.source,
        since: parse_time("since", p.since)?,
        until: parse_time("until", p.until)?,
        before: p.before,
        limit: p.limit.unwrap_or(100),
    })
}

/// Boot events of all devices, newest first.
#[utoipa::path(get, path = "/api/v1/events", tag = "events", params(EventParams),
    responses((status = 200, body = Page<BootEvent>)))]
pub(super) async fn list_events(
    State(state): State<AppState>,
    _auth: Auth,
    Query(p): Query<EventParams>,
) -> Result<axum::Json<Page<BootEvent>>, ApiError> {
    let q = event_query(p, None)?;
    Ok(axum::Json(
        blocking(&state, move |s| s.list_events(&q)).await?,
    ))
}

/// Boot events of one device, newest first.
#[utoipa::path(get, path = "/api/v1/devices/{mac}/events", tag = "events", params(("mac" = String, Path), EventParams),
    responses((status = 200, body = Page<BootEvent>)))]
pub(super) async fn device_events(
    State(state): State<AppState>,
    _auth: Auth,
    Path(mac): Path<String>,
    Query(p): Query<EventParams>,
) -> Result<axum::Json<Page<BootEvent>>, ApiError> {
    let q = event_query(p, Some(mac))?;
    Ok(axum::Json(
        blocking(&state, move |s| s.list_events(&q)).await?,
    ))
}

/// Records a boot event by hand or from a script (operator).
#[utoipa::path(post, path = "/api/v1/events", tag = "events", request_body = NewBootEvent,
    responses((status = 201, body = BootEvent), (status = 422)))]
pub(super) async fn create_event(
    State(state): State<AppState>,
    auth: Auth,
    Json(mut ev): Json<NewBootEvent>,
) -> Result<(StatusCode, axum::Json<BootEvent>), ApiError> {
    auth.require(Role::Operator)?;
    let kind_ok = (1..=64).contains(&ev.kind.len())
        && ev
            .kind
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.');
    if !kind_ok {
        return Err(ApiError::unprocessable(
            "kind: 1-64 of a-z, 0-9, '_' and '.'",
        ));
    }
    if ev.detail.chars().count() > 2000 {
        return Err(ApiError::unprocessable("detail: at most 2000 characters"));
    }
    if let Some(ip) = &ev.ip {
        ip.parse::<std::net::IpAddr>()
            .map_err(|_| ApiError::unprocessable("ip must be an IP address"))?;
    }
    ev.at = Timestamp::now();
    ev.source = EventSource::Api;
    let ev = blocking(&state, move |s| s.add_event(&ev)).await?;
    Ok((StatusCode::CREATED, axum::Json(ev)))
}

/// The run-time settings.
#[utoipa::path(get, path = "/api/v1/settings", tag = "settings", responses((status = 200, body = Settings)))]
pub(super) async fn get_settings(
    State(state): State<AppState>,
    _auth: Auth,
) -> Result<axum::Json<Settings>, ApiError> {
    Ok(axum::Json(blocking(&state, |s| s.get_settings()).await?))
}

fn check_settings(s: &Settings) -> Result<(), ApiError> {
    if s.menu_timeout_secs > 3600 {
        return Err(ApiError::unprocessable("menu_timeout_secs: at most 3600"));
    }
    if !(10..=100_000).contains(&s.events_per_device) {
        return Err(ApiError::unprocessable("events_per_device: 10 to 100000"));
    }
    if !(1..=3650).contains(&s.event_max_age_days) {
        return Err(ApiError::unprocessable("event_max_age_days: 1 to 3650"));
    }
    Ok(())
}

/// Changes settings (admin): the body is a partial settings object.
#[utoipa::path(patch, path = "/api/v1/settings", tag = "settings", request_body = Object,
    responses((status = 200, body = Settings), (status = 422)))]
pub(super) async fn patch_settings(
    State(state): State<AppState>,
    auth: Auth,
    Json(patch): Json<serde_json::Map<String, Value>>,
) -> Result<axum::Json<Settings>, ApiError> {
    auth.require(Role::Admin)?;
    if patch.contains_key("iqn_prefix") {
        // One source: the target serves the configuration's prefix, and the boot scripts
        // must name the targets it serves.
        return Err(ApiError::unprocessable(
            "iqn_prefix is the configuration's iscsi.iqn_prefix; change it there and restart",
        ));
    }
    let a = auth.audit();
    let out = blocking(&state, move |s| {
        let current = s.get_settings()?;
        let Value::Object(mut merged) = serde_json::to_value(&current).unwrap_or_default() else {
            return Ok(Err(ApiError::internal(
                "settings do not serialise to an object",
            )));
        };
        merged.extend(patch);
        let new: Settings = match serde_json::from_value(Value::Object(merged)) {
            Ok(n) => n,
            Err(e) => return Ok(Err(ApiError::unprocessable(e.to_string()))),
        };
        if let Err(e) = check_settings(&new) {
            return Ok(Err(e));
        }
        s.put_settings(&a, &new).map(Ok)
    })
    .await??;
    Ok(axum::Json(out))
}

/// Filters of the audit log.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(default, deny_unknown_fields)]
pub struct AuditParams {
    /// Only this actor.
    pub actor: Option<String>,
    /// Only actions with this prefix (`device.`).
    pub action: Option<String>,
    /// Only this target.
    pub target: Option<String>,
    /// Cursor from `next_cursor`.
    pub before: Option<i64>,
    /// Page size, 1-1000 (default 100).
    pub limit: Option<u32>,
}

/// The audit log, newest first (admin).
#[utoipa::path(get, path = "/api/v1/audit", tag = "audit", params(AuditParams),
    responses((status = 200, body = Page<AuditEntry>), (status = 403)))]
pub(super) async fn list_audit(
    State(state): State<AppState>,
    auth: Auth,
    Query(p): Query<AuditParams>,
) -> Result<axum::Json<Page<AuditEntry>>, ApiError> {
    auth.require(Role::Admin)?;
    let q = AuditQuery {
        actor: p.actor,
        action: p.action,
        target: p.target,
        before: p.before,
        limit: p.limit.unwrap_or(100),
    };
    Ok(axum::Json(
        blocking(&state, move |s| s.list_audit(&q)).await?,
    ))
}
