//! The HTTP API under `/api/v1`: axum router, handlers, authentication and the OpenAPI
//! document (`/api/v1/openapi.json`).
//!
//! **Invariant:** every handler of a method other than GET or HEAD extracts [`Auth`] and
//! checks a role before it changes anything; GET handlers change nothing but the
//! last-use times of the caller's own session or token.

mod auth;
mod boot;
mod dhcp;
mod error;
#[allow(
    unused_qualifications,
    reason = "utoipa's path macro expands `params(T)` into qualified paths"
)]
mod folders;
#[allow(
    unused_qualifications,
    reason = "utoipa's path macro expands `params(T)` into qualified paths"
)]
mod images;
#[allow(
    unused_qualifications,
    reason = "utoipa's path macro expands `params(T)` into qualified paths"
)]
mod inventory;
mod logs;
mod metrics;
#[allow(
    unused_qualifications,
    reason = "utoipa's path macro expands `params(T)` into qualified paths"
)]
mod system;
#[allow(
    unused_qualifications,
    reason = "utoipa's path macro expands `params(T)` into qualified paths"
)]
mod upload;
pub mod web;

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::extract::{MatchedPath, Request};
use axum::routing::{get, post};
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;

pub use self::auth::{
    Auth, AuthStatus, ClientIp, CreatedToken, Credentials, LoginResponse, Me, NewTokenBody,
    NewUserBody, PasswordChange, SESSION_COOKIE, UserPatchBody, Via,
};
pub use self::error::{ApiError, ErrorBody, ErrorDetail, Json, Query};
pub use self::images::{DeleteParams, NameBody};
pub use self::inventory::{DeviceListParams, RegisterBody};
pub use self::system::{AuditParams, Check, EventParams, Health, VERSION, VersionInfo};
use crate::auth::LoginThrottle;
use crate::bindings::Bindings;
use crate::config::{Config, Paths, Validated};
use crate::service::dhcp::DhcpService;
use crate::service::tftp::Tftp;
use crate::store::Store;

/// Shared state of all handlers.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

struct Inner {
    store: Arc<dyn Store>,
    config: Validated,
    throttle: Mutex<LoginThrottle>,
    services: Services,
    feed: web::Feed,
    images: Arc<crate::service::images::ImageOps>,
}

/// The running services the API reports on, and what they share with it.
#[derive(Debug, Clone, Default)]
pub struct Services {
    /// The TFTP service, when it runs (transfers, metrics).
    pub tftp: Option<Arc<Tftp>>,
    /// The proxyDHCP service, when it runs (metrics).
    pub dhcp: Option<Arc<DhcpService>>,
    /// Client address → MAC bindings (the boot routes learn them).
    pub bindings: Arc<Bindings>,
    /// The per-client accounting: the eBPF program's, or netbootd's own when it could
    /// not load (absent only in tests of the API alone).
    pub traffic: Option<Arc<crate::service::accounting::Traffic>>,
    /// The iSCSI target, when it runs (live sessions of images).
    pub iscsi: Option<Arc<crate::service::iscsi::StoreTargets>>,
}

impl AppState {
    /// State over a store and a validated configuration.
    pub fn new(store: Arc<dyn Store>, config: Validated) -> Self {
        Self::with_services(store, config, Services::default())
    }

    /// State over a store, a configuration and the running services.
    pub fn with_services(store: Arc<dyn Store>, config: Validated, services: Services) -> Self {
        let auth = &config.config.auth;
        let throttle = LoginThrottle::new(
            auth.max_failures,
            Duration::from_secs(u64::from(auth.lockout_secs)),
        );
        let images = Arc::new(crate::service::images::ImageOps::new(
            config.paths.images.clone(),
        ));
        Self(Arc::new(Inner {
            images,
            store,
            config,
            throttle: Mutex::new(throttle),
            services,
            feed: web::Feed::default(),
        }))
    }

    fn store_arc(&self) -> Arc<dyn Store> {
        Arc::clone(&self.0.store)
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.0.config.config
    }

    /// Resolved paths.
    pub fn paths(&self) -> &Paths {
        &self.0.config.paths
    }

    /// The TFTP service, when it runs.
    pub fn tftp(&self) -> Option<&Arc<Tftp>> {
        self.0.services.tftp.as_ref()
    }

    /// The proxyDHCP service, when it runs.
    pub fn dhcp(&self) -> Option<&Arc<DhcpService>> {
        self.0.services.dhcp.as_ref()
    }

    /// The eBPF accounting, when it is loaded and attached.
    pub fn traffic(&self) -> Option<&Arc<crate::service::accounting::Traffic>> {
        self.0.services.traffic.as_ref()
    }

    /// The iSCSI target, when it runs.
    pub fn iscsi(&self) -> Option<&Arc<crate::service::iscsi::StoreTargets>> {
        self.0.services.iscsi.as_ref()
    }

    /// Image file operations (copies, adoption) and their lock.
    pub fn image_ops(&self) -> &Arc<crate::service::images::ImageOps> {
        &self.0.images
    }

    /// Client address → MAC bindings.
    pub fn bindings(&self) -> &Bindings {
        &self.0.services.bindings
    }

    fn throttle(&self) -> MutexGuard<'_, LoginThrottle> {
        self.0
            .throttle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Runs a store call on the blocking pool.
pub(crate) async fn blocking<T, F>(state: &AppState, f: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce(&dyn Store) -> crate::store::Result<T> + Send + 'static,
{
    let store = state.store_arc();
    tokio::task::spawn_blocking(move || f(store.as_ref()))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::from)
}

/// The OpenAPI description of the API.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "netboot API",
        description = "REST API of netbootd. Reads need a viewer, changes an operator; users, tokens of others, settings and the audit log an admin. Authenticate with the session cookie from /api/v1/auth/login or `Authorization: Bearer nbt_...`."
    ),
    paths(
        system::version,
        system::health,
        auth::status,
        auth::setup,
        auth::login,
        auth::logout,
        auth::me,
        auth::change_password,
        auth::list_users,
        auth::create_user,
        auth::update_user,
        auth::delete_user,
        auth::list_tokens,
        auth::create_token,
        auth::delete_token,
        inventory::list_devices,
        inventory::get_device,
        inventory::create_device,
        inventory::update_device,
        inventory::delete_device,
        logs::list_logs,
        logs::get_log,
        inventory::list_unknown,
        inventory::register_unknown,
        inventory::delete_unknown,
        inventory::list_images,
        inventory::get_image,
        inventory::create_image,
        inventory::update_image,
        images::delete_image,
        images::copy_image,
        images::image_sessions,
        images::rename_image,
        images::adopt_images,
        images::list_operations,
        images::get_operation,
        inventory::list_installers,
        inventory::get_installer,
        inventory::create_installer,
        inventory::update_installer,
        inventory::delete_installer,
        upload::upload_installer,
        folders::list_folder,
        folders::create_folder,
        folders::delete_file,
        inventory::list_profiles,
        inventory::get_profile,
        inventory::create_profile,
        inventory::update_profile,
        inventory::delete_profile,
        system::list_events,
        system::device_events,
        system::create_event,
        system::get_settings,
        system::patch_settings,
        system::list_audit,
        metrics::tftp_transfers,
        metrics::iscsi_sessions,
        metrics::device_metrics,
        metrics::attribution,
        metrics::services,
        dhcp::leases,
    ),
    components(schemas(ErrorBody))
)]
pub struct ApiDoc;

async fn openapi() -> axum::Json<utoipa::openapi::OpenApi> {
    let mut doc = ApiDoc::openapi();
    doc.info.version = VERSION.to_owned();
    axum::Json(doc)
}

async fn api_not_found() -> ApiError {
    ApiError::not_found("no such API endpoint")
}

/// The `/api/v1` routes.
pub fn router(state: AppState) -> Router {
    use inventory as inv;
    let api = Router::new()
        .route("/version", get(system::version))
        .route("/health", get(system::health))
        .route("/openapi.json", get(openapi))
        .route("/auth/status", get(auth::status))
        .route("/auth/setup", post(auth::setup))
        .route("/auth/login", post(auth::login))
        .route("/auth/logout", post(auth::logout))
        .route("/auth/me", get(auth::me))
        .route("/auth/password", post(auth::change_password))
        .route("/users", get(auth::list_users).post(auth::create_user))
        .route(
            "/users/{username}",
            axum::routing::patch(auth::update_user).delete(auth::delete_user),
        )
        .route("/tokens", get(auth::list_tokens).post(auth::create_token))
        .route("/tokens/{id}", axum::routing::delete(auth::delete_token))
        .route("/devices", get(inv::list_devices).post(inv::create_device))
        .route(
            "/devices/{mac}",
            get(inv::get_device)
                .patch(inv::update_device)
                .delete(inv::delete_device),
        )
        .route("/devices/{mac}/events", get(system::device_events))
        .route("/devices/{mac}/logs", get(logs::list_logs))
        .route("/devices/{mac}/logs/{name}", get(logs::get_log))
        .route("/unknown-devices", get(inv::list_unknown))
        .route(
            "/unknown-devices/{mac}",
            axum::routing::delete(inv::delete_unknown),
        )
        .route(
            "/unknown-devices/{mac}/register",
            post(inv::register_unknown),
        )
        .route("/images", get(inv::list_images).post(inv::create_image))
        .route(
            "/images/{name}",
            get(inv::get_image)
                .patch(inv::update_image)
                .delete(images::delete_image),
        )
        .route("/images/adopt", post(images::adopt_images))
        .route("/images/{name}/copy", post(images::copy_image))
        .route("/images/{name}/sessions", get(images::image_sessions))
        .route("/images/{name}/rename", post(images::rename_image))
        .route("/operations", get(images::list_operations))
        .route("/operations/{id}", get(images::get_operation))
        .route(
            "/installers",
            get(inv::list_installers).post(inv::create_installer),
        )
        .route(
            "/installers/{id}",
            get(inv::get_installer)
                .patch(inv::update_installer)
                .delete(inv::delete_installer),
        )
        .route("/installers/folder", get(folders::list_folder))
        .route("/installers/folders", post(folders::create_folder))
        .route(
            "/installers/files/{*path}",
            axum::routing::put(upload::upload_installer).delete(folders::delete_file),
        )
        .route(
            "/profiles",
            get(inv::list_profiles).post(inv::create_profile),
        )
        .route(
            "/profiles/{name}",
            get(inv::get_profile)
                .patch(inv::update_profile)
                .delete(inv::delete_profile),
        )
        .route(
            "/events",
            get(system::list_events).post(system::create_event),
        )
        .route(
            "/settings",
            get(system::get_settings).patch(system::patch_settings),
        )
        .route("/audit", get(system::list_audit))
        .route("/tftp/transfers", get(metrics::tftp_transfers))
        .route("/iscsi/sessions", get(metrics::iscsi_sessions))
        .route("/dhcp/leases", get(dhcp::leases))
        .route("/devices/{mac}/metrics", get(metrics::device_metrics))
        .route("/accounting/attribution", get(metrics::attribution))
        .route("/accounting/services", get(metrics::services))
        .fallback(api_not_found)
        .with_state(state.clone());
    let boot = Router::new()
        .route("/boot/ipxe", get(boot::bootstrap))
        .route("/boot/ipxe/device", get(boot::device_script))
        .route("/boot/ipxe/register", get(boot::register))
        .route(
            "/files/installers/{*path}",
            boot::file_route(boot::FileRoot::Installers),
        )
        .route(
            "/files/tftp/{*path}",
            boot::file_route(boot::FileRoot::Tftp),
        )
        .route("/metrics", get(metrics::metrics))
        .with_state(state.clone());
    Router::new()
        .nest("/api/v1", api)
        .merge(boot)
        .merge(web::router(state))
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
            let route = req
                .extensions()
                .get::<MatchedPath>()
                .map_or("unmatched", MatchedPath::as_str);
            tracing::debug_span!("http", method = %req.method(), route)
        }))
}
