//! The web UI under `/ui/`: server-rendered HTML pages, their CSS and a little JavaScript,
//! and live boot events over Server-Sent Events.
//!
//! Pages are askama templates (`netboot-daemon/templates/web/`), rendered from the store
//! with the caller's role: write controls are left out for roles that may not use them
//! (the API refuses them anyway). Every change a page makes goes through the
//! authenticated `/api/v1` endpoints with `fetch()` and JSON, so the session cookie's
//! CSRF rules hold for the UI as for any client; no GET here changes anything.
//! Assets are compiled into the binary and served under a path carrying the version,
//! so a new release is never shown with old CSS or JavaScript.
//!
//! **Invariant:** every value from the store or a client reaches HTML through askama's
//! escaping; no template uses the `safe` filter on such a value.

mod feed;
mod pages;
mod view;

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;

pub use self::feed::Feed;
use super::{AppState, VERSION};

/// The CSS, compiled in.
const APP_CSS: &str = include_str!("static/app.css");
/// The JavaScript, compiled in.
const APP_JS: &str = include_str!("static/app.js");
/// The icon, compiled in.
const ICON_SVG: &str = include_str!("static/icon.svg");

/// The path prefix of the static assets: it carries the version, so that browsers may
/// cache them for good.
fn static_prefix() -> String {
    format!("/ui/static/{VERSION}")
}

/// `GET /ui/static/{version}/{file}`: an embedded asset.
async fn asset(Path((version, file)): Path<(String, String)>) -> Response {
    let (body, kind) = match file.as_str() {
        "app.css" => (APP_CSS, "text/css; charset=utf-8"),
        "app.js" => (APP_JS, "text/javascript; charset=utf-8"),
        "icon.svg" => (ICON_SVG, "image/svg+xml"),
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    // An old version's URL still gets the current asset, but not for long.
    let cache = if version == VERSION {
        "public, max-age=31536000, immutable"
    } else {
        "no-cache"
    };
    (
        [(header::CONTENT_TYPE, kind), (header::CACHE_CONTROL, cache)],
        body,
    )
        .into_response()
}

/// The `/` and `/ui/` routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(|| async { Redirect::to("/ui/") }))
        .route("/ui", get(|| async { Redirect::to("/ui/") }))
        .route("/ui/", get(pages::dashboard))
        .route("/ui/login", get(pages::login))
        .route("/ui/setup", get(pages::setup))
        .route("/ui/devices", get(pages::devices))
        .route("/ui/devices/{mac}", get(pages::device))
        .route("/ui/unknown", get(pages::unknown))
        .route("/ui/images", get(pages::images))
        .route("/ui/installers", get(pages::installers))
        .route("/ui/profiles", get(pages::profiles))
        .route("/ui/leases", get(pages::leases))
        .route("/ui/settings", get(pages::settings))
        .route("/ui/admin", get(pages::admin))
        .route("/ui/account", get(pages::account))
        .route("/ui/events", get(feed::stream))
        .route("/ui/static/{version}/{file}", get(asset))
        .layer(axum::middleware::map_response(security_headers))
        .with_state(state)
}

/// The policy of every UI response: our own scripts, styles and connections only (so
/// that markup slipped into a page could run nothing), no framing, no sniffing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
    connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

/// Adds the security headers to a UI response; pages are never stored by caches (they
/// show live inventory to a logged-in user).
async fn security_headers(mut res: Response) -> Response {
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    res
}
