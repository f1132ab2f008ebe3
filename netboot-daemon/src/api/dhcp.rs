//! The DHCP server's lease table.

use axum::extract::State;
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use super::auth::Auth;

/// One lease.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct LeaseView {
    /// The address.
    pub(super) ip: String,
    /// The client holding it, or that held it last.
    pub(super) mac: String,
    /// `offered`, `bound` or `declined`.
    pub(super) state: &'static str,
    /// End of the lease (or of the offer, or of the decline's hold), seconds since the
    /// Unix epoch.
    pub(super) expires: u64,
    /// Whether the lease still keeps the address from other clients.
    pub(super) active: bool,
    /// The host name the client sent, or its reservation's.
    pub(super) hostname: Option<String>,
}

/// The lease table and the mode it belongs to.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct Leases {
    /// `server`, `proxy` or `off`. Only `server` has leases.
    pub(super) mode: &'static str,
    /// In address order.
    pub(super) leases: Vec<LeaseView>,
}

/// The DHCP server's leases (server mode), in address order, including expired leases
/// whose address is still remembered for its client.
#[utoipa::path(get, path = "/api/v1/dhcp/leases", tag = "dhcp",
    responses((status = 200, body = Leases)))]
pub(super) async fn leases(State(state): State<AppState>, _auth: Auth) -> axum::Json<Leases> {
    axum::Json(lease_table(&state))
}

/// The DHCP mode and its leases at this moment (for the API and the web UI's page).
pub(super) fn lease_table(state: &AppState) -> Leases {
    let now = crate::time::Timestamp::now().unix_secs();
    let table = state.dhcp().and_then(|d| d.leases());
    let mode = match (state.dhcp(), &table) {
        (_, Some(_)) => "server",
        (Some(_), None) => "proxy",
        (None, _) => "off",
    };
    let leases = table
        .unwrap_or_default()
        .into_iter()
        .map(|l| LeaseView {
            ip: l.ip.to_string(),
            mac: l.mac.to_string(),
            state: l.state.as_str(),
            expires: l.expires,
            active: l.active(now),
            hostname: l.hostname,
        })
        .collect();
    Leases { mode, leases }
}
