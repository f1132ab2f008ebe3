//! The REST API through `Router::oneshot` over an in-memory store, and through a real
//! listening socket driven by curl.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use http_body_util::BodyExt as _;
use netboot_daemon::api::{self, AppState};
use netboot_daemon::config::Validated;
use netboot_daemon::store::{Sighting, Sqlite, Store};
use netboot_daemon::time::Timestamp;
use serde_json::{Value, json};
use tower::ServiceExt as _;

mod common;

use common::{Served, TestDir, http_only_config, version_file};

fn config(dir: &TestDir) -> Validated {
    http_only_config(dir.path())
}

/// An API over an in-memory store, called through `oneshot`.
struct App {
    router: Router,
    store: Arc<dyn Store>,
    cfg: Validated,
    _dir: TestDir,
}

/// Credentials for a request.
#[derive(Clone, Copy)]
enum As<'a> {
    Anonymous,
    Cookie(&'a str),
    Bearer(&'a str),
}

struct Res {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
}

impl App {
    fn new() -> Self {
        let dir = TestDir::new("api-oneshot");
        let cfg = config(&dir);
        let store: Arc<dyn Store> = Arc::new(Sqlite::in_memory().expect("store"));
        let router = api::router(AppState::new(Arc::clone(&store), cfg.clone()));
        Self {
            router,
            store,
            cfg,
            _dir: dir,
        }
    }

    async fn get(&self, uri: &str, who: As<'_>) -> Res {
        self.call(Method::GET, uri, who, None).await
    }

    async fn post(&self, uri: &str, who: As<'_>, body: Value) -> Res {
        self.call(Method::POST, uri, who, Some(body)).await
    }

    async fn patch(&self, uri: &str, who: As<'_>, body: Value) -> Res {
        self.call(Method::PATCH, uri, who, Some(body)).await
    }

    async fn delete(&self, uri: &str, who: As<'_>) -> Res {
        self.call(Method::DELETE, uri, who, None).await
    }

    async fn call(&self, method: Method, uri: &str, who: As<'_>, body: Option<Value>) -> Res {
        self.call_from(method, uri, who, body, "127.0.0.1:40000", &[])
            .await
    }

    async fn call_from(
        &self,
        method: Method,
        uri: &str,
        who: As<'_>,
        body: Option<Value>,
        peer: &str,
        extra: &[(&str, &str)],
    ) -> Res {
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::HOST, "netboot.test");
        match who {
            As::Anonymous => {}
            As::Cookie(c) => {
                req = req.header(header::COOKIE, format!("{}={c}", api::SESSION_COOKIE))
            }
            As::Bearer(t) => req = req.header(header::AUTHORIZATION, format!("Bearer {t}")),
        }
        for (k, v) in extra {
            req = req.header(*k, *v);
        }
        let body = match body {
            Some(v) => {
                req = req.header(header::CONTENT_TYPE, "application/json");
                Body::from(v.to_string())
            }
            None => Body::empty(),
        };
        let mut req = req.body(body).expect("request");
        let peer: SocketAddr = peer.parse().expect("peer");
        req.extensions_mut().insert(ConnectInfo(peer));
        let res = self.router.clone().oneshot(req).await.expect("infallible");
        let status = res.status();
        let headers = res.headers().clone();
        let bytes = res.into_body().collect().await.expect("body").to_bytes();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("JSON body")
        };
        Res {
            status,
            headers,
            body,
        }
    }

    /// Runs first-run setup and returns the admin's session secret.
    async fn setup_admin(&self) -> String {
        let r = self
            .post(
                "/api/v1/auth/setup",
                As::Anonymous,
                json!({"username": "admin", "password": "admin-pass-1"}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
        session_from(&r.headers)
    }

    /// Creates a user with `role` and logs them in.
    async fn user(&self, admin: &str, name: &str, role: &str) -> String {
        let r = self
            .post(
                "/api/v1/users",
                As::Cookie(admin),
                json!({"username": name, "password": "user-pass-1", "role": role}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
        self.login(name, "user-pass-1").await
    }

    async fn login(&self, name: &str, password: &str) -> String {
        let r = self
            .post(
                "/api/v1/auth/login",
                As::Anonymous,
                json!({"username": name, "password": password}),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        session_from(&r.headers)
    }

    async fn audit(&self, admin: &str) -> Vec<Value> {
        let r = self
            .get("/api/v1/audit?limit=1000", As::Cookie(admin))
            .await;
        assert_eq!(r.status, StatusCode::OK);
        r.body["items"].as_array().expect("items").clone()
    }
}

fn session_from(headers: &HeaderMap) -> String {
    let c = headers
        .get(header::SET_COOKIE)
        .expect("Set-Cookie")
        .to_str()
        .expect("ascii");
    assert!(
        c.contains("HttpOnly") && c.contains("SameSite=Strict") && c.contains("Path=/"),
        "{c}"
    );
    c.split(';')
        .next()
        .and_then(|kv| kv.split_once('='))
        .map(|(_, v)| v.to_owned())
        .expect("cookie value")
}

/// Every state-changing route with a body that would be valid for an admin.
fn writes() -> Vec<(Method, &'static str, Option<Value>)> {
    vec![
        (
            Method::POST,
            "/api/v1/devices",
            Some(json!({"mac": "02:00:00:00:00:99"})),
        ),
        (
            Method::PATCH,
            "/api/v1/devices/02:00:00:00:00:01",
            Some(json!({"name": "x"})),
        ),
        (Method::DELETE, "/api/v1/devices/02:00:00:00:00:01", None),
        (
            Method::POST,
            "/api/v1/unknown-devices/02:00:00:00:00:02/register",
            Some(json!({})),
        ),
        (
            Method::DELETE,
            "/api/v1/unknown-devices/02:00:00:00:00:02",
            None,
        ),
        (
            Method::POST,
            "/api/v1/images",
            Some(json!({"name": "disk9", "size_bytes": 1048576})),
        ),
        (
            Method::PATCH,
            "/api/v1/images/disk1",
            Some(json!({"description": "d"})),
        ),
        (Method::DELETE, "/api/v1/images/disk1", None),
        (
            Method::POST,
            "/api/v1/installers",
            Some(json!({"path": "debian.iso", "kind": "iso"})),
        ),
        (
            Method::PATCH,
            "/api/v1/installers/1",
            Some(json!({"name": "n"})),
        ),
        (Method::DELETE, "/api/v1/installers/1", None),
        (
            Method::POST,
            "/api/v1/installers/folders",
            Some(json!({"path": "win11"})),
        ),
        (Method::DELETE, "/api/v1/installers/files/debian.iso", None),
        (
            Method::POST,
            "/api/v1/profiles",
            Some(json!({"name": "p9", "kind": "linux"})),
        ),
        (
            Method::PATCH,
            "/api/v1/profiles/p1",
            Some(json!({"cmdline": "quiet"})),
        ),
        (Method::DELETE, "/api/v1/profiles/p1", None),
        (
            Method::POST,
            "/api/v1/events",
            Some(json!({"mac": "02:00:00:00:00:01", "kind": "note"})),
        ),
        (
            Method::PATCH,
            "/api/v1/settings",
            Some(json!({"menu_timeout_secs": 5})),
        ),
        (
            Method::POST,
            "/api/v1/users",
            Some(json!({"username": "u9", "password": "password9", "role": "viewer"})),
        ),
        (
            Method::PATCH,
            "/api/v1/users/someone",
            Some(json!({"enabled": false})),
        ),
        (Method::DELETE, "/api/v1/users/someone", None),
        (Method::POST, "/api/v1/tokens", Some(json!({"name": "t"}))),
        (Method::DELETE, "/api/v1/tokens/1", None),
        (Method::POST, "/api/v1/auth/logout", None),
        (
            Method::POST,
            "/api/v1/auth/password",
            Some(json!({"current_password": "x", "new_password": "yyyyyyyy"})),
        ),
    ]
}

#[tokio::test]
async fn unauthenticated_writes_are_401() {
    let app = App::new();
    app.setup_admin().await;
    for (method, uri, body) in writes() {
        let r = app.call(method.clone(), uri, As::Anonymous, body).await;
        assert_eq!(
            r.status,
            StatusCode::UNAUTHORIZED,
            "{method} {uri}: {}",
            r.body
        );
        assert_eq!(r.body["error"]["code"], "unauthorized");
    }
    // A forged or unknown token is no better.
    let r = app
        .post(
            "/api/v1/devices",
            As::Bearer("nbt_forged"),
            json!({"mac": "02:00:00:00:00:98"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = app
        .post(
            "/api/v1/devices",
            As::Cookie("forged"),
            json!({"mac": "02:00:00:00:00:98"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn reads_need_a_login_but_version_health_and_status_do_not() {
    let app = App::new();
    for uri in [
        "/api/v1/version",
        "/api/v1/health",
        "/api/v1/auth/status",
        "/api/v1/openapi.json",
    ] {
        assert_eq!(
            app.get(uri, As::Anonymous).await.status,
            StatusCode::OK,
            "{uri}"
        );
    }
    for uri in [
        "/api/v1/devices",
        "/api/v1/images",
        "/api/v1/events",
        "/api/v1/settings",
        "/api/v1/unknown-devices",
        "/api/v1/devices/52:54:00:00:00:01/metrics",
        "/api/v1/accounting/attribution",
        "/api/v1/accounting/services",
        "/api/v1/installers/folder",
        "/api/v1/installers/folder?path=win",
    ] {
        assert_eq!(
            app.get(uri, As::Anonymous).await.status,
            StatusCode::UNAUTHORIZED,
            "{uri}"
        );
    }
}

/// Without eBPF accounting a device's metrics say so instead of showing numbers, and the
/// attribution debug view is not there.
#[tokio::test]
async fn device_metrics_without_accounting_say_why() {
    let app = App::new();
    let admin = app.setup_admin().await;
    let r = app
        .get(
            "/api/v1/devices/52-54-00-00-00-01/metrics",
            As::Cookie(&admin),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["mac"], "52:54:00:00:00:01");
    assert_eq!(r.body["source"], "none");
    assert!(r.body.get("totals").is_none(), "no numbers: {}", r.body);
    let warning = r.body["warnings"][0].as_str().expect("a warning");
    assert!(warning.contains("not running"), "{warning}");
    let r = app
        .get("/api/v1/devices/not-a-mac/metrics", As::Cookie(&admin))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = app
        .get("/api/v1/accounting/attribution", As::Cookie(&admin))
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    // The per-service throughput says the same, with no figures at all.
    let r = app
        .get("/api/v1/accounting/services", As::Cookie(&admin))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["source"], "none");
    assert_eq!(r.body["services"], json!([]));
    assert_eq!(r.body["warnings"][0].as_str(), Some(warning));
    assert_eq!(r.body["sample_secs"], 5);
}

/// The installers directory as folders: listing with sizes, making folders, deleting
/// files (with their record) and empty folders; nothing outside the directory is reached,
/// and every change is audited.
#[tokio::test]
async fn installer_folders_list_make_and_delete_inside_the_jail() {
    let app = App::new();
    let admin = app.setup_admin().await;
    let viewer = app.user(&admin, "vera", "viewer").await;
    let root = app.cfg.paths.installers.clone();
    std::fs::create_dir_all(root.join("win/sources")).expect("mkdir");
    std::fs::write(root.join("win/sources/boot.wim"), vec![7u8; 5000]).expect("write");
    std::fs::write(root.join("win/setup.exe"), vec![7u8; 1000]).expect("write");
    std::fs::write(root.join("debian.iso"), vec![1u8; 4096]).expect("write");
    std::fs::write(root.join(".debian.iso.0001.upload"), b"partial").expect("write");
    let outside = root.parent().expect("parent").join("outside-secret");
    std::fs::write(&outside, b"secret").expect("write");
    std::os::unix::fs::symlink(&outside, root.join("escape")).expect("symlink");
    let r = app
        .post(
            "/api/v1/installers",
            As::Cookie(&admin),
            json!({"path": "debian.iso", "kind": "iso", "name": "Debian"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let record = r.body["id"].as_i64().expect("id");

    // Viewers may browse: folders first, sizes in bytes, no dotfiles, no escaping links.
    let r = app
        .get("/api/v1/installers/folder", As::Cookie(&viewer))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["path"], "");
    let entries = r.body["entries"].as_array().expect("entries");
    let names: Vec<&str> = entries.iter().filter_map(|e| e["name"].as_str()).collect();
    assert_eq!(names, ["win", "debian.iso"], "{}", r.body);
    assert_eq!(entries[0]["kind"], "folder");
    assert_eq!(entries[0]["size_bytes"], 6000);
    assert_eq!(entries[0]["items"], 2);
    assert_eq!(entries[1]["kind"], "file");
    assert_eq!(entries[1]["size_bytes"], 4096);
    assert_eq!(entries[1]["installer_id"], record);
    let r = app
        .get("/api/v1/installers/folder?path=win/", As::Cookie(&viewer))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["path"], "win");
    assert_eq!(r.body["entries"][0]["path"], "win/sources");
    assert_eq!(r.body["entries"][1]["path"], "win/setup.exe");
    for (path, status) in [
        ("..", StatusCode::UNPROCESSABLE_ENTITY),
        ("win/../..", StatusCode::UNPROCESSABLE_ENTITY),
        ("escape", StatusCode::UNPROCESSABLE_ENTITY),
        (".hidden", StatusCode::UNPROCESSABLE_ENTITY),
        ("missing", StatusCode::NOT_FOUND),
        ("debian.iso", StatusCode::NOT_FOUND),
    ] {
        let r = app
            .get(
                &format!("/api/v1/installers/folder?path={path}"),
                As::Cookie(&viewer),
            )
            .await;
        assert_eq!(r.status, status, "{path}: {}", r.body);
    }

    // Viewers change nothing.
    let r = app
        .post(
            "/api/v1/installers/folders",
            As::Cookie(&viewer),
            json!({"path": "x"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = app
        .delete("/api/v1/installers/files/debian.iso", As::Cookie(&viewer))
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(root.join("debian.iso").exists());

    // Folders: made inside an existing folder, never twice, never outside.
    let r = app
        .post(
            "/api/v1/installers/folders",
            As::Cookie(&admin),
            json!({"path": "win/drivers"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(r.body["path"], "win/drivers");
    assert!(root.join("win/drivers").is_dir());
    for (path, status) in [
        ("win/drivers", StatusCode::CONFLICT),
        ("nope/sub", StatusCode::NOT_FOUND),
        ("../evil", StatusCode::UNPROCESSABLE_ENTITY),
        ("escape/sub", StatusCode::UNPROCESSABLE_ENTITY),
        (".cache", StatusCode::UNPROCESSABLE_ENTITY),
        ("", StatusCode::UNPROCESSABLE_ENTITY),
    ] {
        let r = app
            .post(
                "/api/v1/installers/folders",
                As::Cookie(&admin),
                json!({ "path": path }),
            )
            .await;
        assert_eq!(r.status, status, "{path:?}: {}", r.body);
    }

    // Deleting: a file goes with its record; a folder only when empty; a symlink that
    // points outside is removed as a link, its target stays.
    let r = app
        .delete("/api/v1/installers/files/win", As::Cookie(&admin))
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    let r = app
        .delete("/api/v1/installers/files/win/drivers", As::Cookie(&admin))
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.body);
    assert!(!root.join("win/drivers").exists());
    let r = app
        .delete("/api/v1/installers/files/debian.iso", As::Cookie(&admin))
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.body);
    assert!(!root.join("debian.iso").exists());
    let r = app
        .get(&format!("/api/v1/installers/{record}"), As::Cookie(&admin))
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "the record went with it");
    let r = app
        .delete("/api/v1/installers/files/escape", As::Cookie(&admin))
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.body);
    assert!(outside.exists(), "the link's target stays");
    for (path, status) in [
        ("debian.iso", StatusCode::NOT_FOUND),
        ("..%2Foutside-secret", StatusCode::UNPROCESSABLE_ENTITY),
        (".debian.iso.0001.upload", StatusCode::UNPROCESSABLE_ENTITY),
    ] {
        let r = app
            .delete(
                &format!("/api/v1/installers/files/{path}"),
                As::Cookie(&admin),
            )
            .await;
        assert_eq!(r.status, status, "{path}: {}", r.body);
    }
    assert!(outside.exists() && root.join(".debian.iso.0001.upload").exists());

    let audit = app.audit(&admin).await;
    let actions: Vec<(&str, &str)> = audit
        .iter()
        .filter_map(|e| Some((e["action"].as_str()?, e["target"].as_str()?)))
        .collect();
    for want in [
        ("installer.folder_create", "win/drivers"),
        ("installer.file_delete", "win/drivers"),
        ("installer.file_delete", "debian.iso"),
        ("installer.delete", "debian.iso"),
        ("installer.file_delete", "escape"),
    ] {
        assert!(actions.contains(&want), "{want:?} not audited: {actions:?}");
    }
}

/// A device's installer logs: the files in its folder of the logs directory, newest
/// first, downloaded as text under a login; nothing outside the folder is reachable.
#[tokio::test]
async fn device_logs_are_listed_and_downloaded_from_their_folder() {
    let app = App::new();
    let admin = app.setup_admin().await;
    let viewer = app.user(&admin, "vera", "viewer").await;
    let dir = app.cfg.paths.logs.join("52-54-00-00-00-01");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(
        dir.join("setupact.log"),
        "2026-11-26 Info  [setup.exe] ok\n",
    )
    .expect("write");
    std::fs::write(dir.join(".partial"), "x").expect("write");
    std::fs::write(app.cfg.paths.logs.join("secret"), "x").expect("write");
    std::os::unix::fs::symlink(app.cfg.paths.logs.join("secret"), dir.join("link.log"))
        .expect("symlink");
    let r = app
        .get(
            "/api/v1/devices/52-54-00-00-00-01/logs",
            As::Cookie(&viewer),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let names: Vec<&str> = r
        .body
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|l| l["name"].as_str())
        .collect();
    assert_eq!(names, ["setupact.log"], "no dotfiles, no symlinks");
    assert_eq!(r.body[0]["size_bytes"], 32);
    let res = app
        .router
        .clone()
        .oneshot(
            Request::get("/api/v1/devices/525400000001/logs/setupact.log")
                .header(header::COOKIE, format!("{}={viewer}", api::SESSION_COOKIE))
                .body(Body::empty())
                .expect("request"),
        )
        .await
        .expect("infallible");
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        res.headers()[header::CONTENT_DISPOSITION],
        "attachment; filename=\"525400000001-setupact.log\""
    );
    let body = res.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(&body[..], b"2026-11-26 Info  [setup.exe] ok\n");
    for (name, status) in [
        ("link.log", StatusCode::NOT_FOUND),
        ("missing.log", StatusCode::NOT_FOUND),
        (".partial", StatusCode::UNPROCESSABLE_ENTITY),
        ("..%2Fsecret", StatusCode::UNPROCESSABLE_ENTITY),
    ] {
        let r = app
            .get(
                &format!("/api/v1/devices/52:54:00:00:00:01/logs/{name}"),
                As::Cookie(&viewer),
            )
            .await;
        assert_eq!(r.status, status, "{name}: {}", r.body);
    }
    let r = app
        .get(
            "/api/v1/devices/52:54:00:00:00:02/logs",
            As::Cookie(&viewer),
        )
        .await;
    assert_eq!(r.body, json!([]), "no folder, no logs");
    let r = app
        .get("/api/v1/devices/52:54:00:00:00:01/logs", As::Anonymous)
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}

/// Users change their own password with the current one: their other sessions end, the
/// one they change it from stays, the old password stops working, and it is audited.
#[tokio::test]
async fn users_change_their_own_password() {
    let app = App::new();
    let admin = app.setup_admin().await;
    let here = app.user(&admin, "otto", "operator").await;
    let elsewhere = app.login("otto", "user-pass-1").await;
    let change =
        |current: &str, new: &str| json!({"current_password": current, "new_password": new});
    let r = app
        .post(
            "/api/v1/auth/password",
            As::Cookie(&here),
            change("wrong-password", "new-pass-123"),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    let r = app
        .post(
            "/api/v1/auth/password",
            As::Cookie(&here),
            change("user-pass-1", "short"),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.body);
    let r = app
        .post(
            "/api/v1/auth/password",
            As::Cookie(&here),
            change("user-pass-1", "new-pass-123"),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.body);
    assert!(
        r.headers.get(header::SET_COOKIE).is_none(),
        "the session stays: no cookie is cleared"
    );
    assert_eq!(
        app.get("/api/v1/auth/me", As::Cookie(&here)).await.status,
        StatusCode::OK,
        "the session the change came from stays"
    );
    assert_eq!(
        app.get("/api/v1/auth/me", As::Cookie(&elsewhere))
            .await
            .status,
        StatusCode::UNAUTHORIZED,
        "other sessions end"
    );
    let r = app
        .post(
            "/api/v1/auth/login",
            As::Anonymous,
            json!({"username": "otto", "password": "user-pass-1"}),
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::UNAUTHORIZED,
        "the old password is gone"
    );
    app.login("otto", "new-pass-123").await;
    // Another user's session is untouched.
    assert_eq!(
        app.get("/api/v1/auth/me", As::Cookie(&admin)).await.status,
        StatusCode::OK
    );
    let audit = app.audit(&admin).await;
    let by = |action: &str| {
        audit
            .iter()
            .find(|e| e["action"] == action && e["target"] == "otto")
            .cloned()
    };
    let failed = by("auth.password_change_failed").expect("the wrong attempt is audited");
    assert_eq!(failed["actor"], "otto");
    let changed = by("user.update").expect("the change is audited");
    assert_eq!(changed["actor"], "otto");
    assert_eq!(changed["detail"]["password"], "changed");
    assert!(!changed["detail"].to_string().contains("argon2"));
}

#[tokio::test]
async fn viewers_cannot_write_and_operators_cannot_administer() {
    let app = App::new();
    let admin = app.setup_admin().await;
    let viewer = app.user(&admin, "vera", "viewer").await;
    let operator = app.user(&admin, "otto", "operator").await;
    let admin_only = ["/api/v1/settings", "/api/v1/users"];
    for (method, uri, body) in writes() {
        if uri.starts_with("/api/v1/tokens") || uri.starts_with("/api/v1/auth/") {
            continue; // Every role manages its own tokens and session.
        }
        let r = app
            .call(method.clone(), uri, As::Cookie(&viewer), body.clone())
            .await;
        assert_eq!(
            r.status,
            StatusCode::FORBIDDEN,
            "viewer {method} {uri}: {}",
            r.body
        );
        if admin_only.iter().any(|p| uri.starts_with(p)) {
            let r = app
                .call(method.clone(), uri, As::Cookie(&operator), body)
                .await;
            assert_eq!(
                r.status,
                StatusCode::FORBIDDEN,
                "operator {method} {uri}: {}",
                r.body
            );
        }
    }
    assert_eq!(
        app.get("/api/v1/audit", As::Cookie(&operator)).await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        app.get("/api/v1/devices", As::Cookie(&viewer)).await.status,
        StatusCode::OK
    );
    // A viewer cannot mint a token with more rights than their own.
    let r = app
        .post(
            "/api/v1/tokens",
            As::Cookie(&viewer),
            json!({"name": "x", "role": "admin"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    // Nothing the refused calls tried is in the inventory.
    let r = app.get("/api/v1/devices", As::Cookie(&admin)).await;
    assert_eq!(r.body["total"], 0);
}

#[tokio::test]
async fn admin_and_token_writes_succeed_and_are_audited() {
    let app = App::new();
    let admin = app.setup_admin().await;
    let r = app
        .post(
            "/api/v1/devices",
            As::Cookie(&admin),
            json!({"mac": "02-00-00-00-00-01", "name": "rack1-node1"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(r.body["mac"], "02:00:00:00:00:01");

    let r = app
        .post(
            "/api/v1/tokens",
            As::Cookie(&admin),
            json!({"name": "ansible", "role": "operator"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let secret = r.body["secret"].as_str().expect("secret").to_owned();
    let token_id = r.body["token"]["id"].as_i64().expect("id");
    assert!(secret.starts_with("nbt_"));
    assert!(
        r.body["token"].get("secret_hash").is_none(),
        "the hash is never shown"
    );

    let r = app
        .patch(
            "/api/v1/devices/020000000001",
            As::Bearer(&secret),
            json!({"boot_policy": "local"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["boot_policy"], "local");
    // The token is an operator: administration stays closed to it.
    let r = app
        .patch(
            "/api/v1/settings",
            As::Bearer(&secret),
            json!({"menu_timeout_secs": 3}),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);

    let audit = app.audit(&admin).await;
    let find = |action: &str| audit.iter().find(|e| e["action"] == action).cloned();
    let create = find("device.create").expect("device.create audited");
    assert_eq!(
        (create["actor"].as_str(), create["via"].as_str()),
        (Some("admin"), Some("session"))
    );
    assert_eq!(create["target"], "02:00:00:00:00:01");
    assert_eq!(create["ip"], "127.0.0.1");
    let update = find("device.update").expect("device.update audited");
    assert_eq!(update["actor"], "admin");
    assert_eq!(update["via"], format!("token:{token_id}"));
    assert_eq!(update["detail"]["boot_policy"], json!(["menu", "local"]));
    assert!(
        find("token.create").is_some()
            && find("auth.login").is_some()
            && find("user.create").is_some()
    );

    // Revoked tokens stop working.
    let r = app
        .delete(&format!("/api/v1/tokens/{token_id}"), As::Cookie(&admin))
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = app.get("/api/v1/devices", As::Bearer(&secret)).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn setup_only_while_no_admin_exists() {
    let app = App::new();
    let r = app.get("/api/v1/auth/status", As::Anonymous).await;
    assert_eq!(r.body["needs_setup"], true);
    let admin = app.setup_admin().await;
    let r = app
        .post(
            "/api/v1/auth/setup",
            As::Anonymous,
            json!({"username": "mallory", "password": "mallory-pass"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    let r = app.get("/api/v1/auth/status", As::Cookie(&admin)).await;
    assert_eq!(r.body["needs_setup"], false);
    assert_eq!(r.body["user"]["username"], "admin");
    // The last administrator can neither be deleted nor demoted.
    let r = app.delete("/api/v1/users/admin", As::Cookie(&admin)).await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    let r = app
        .patch(
            "/api/v1/users/admin",
            As::Cookie(&admin),
            json!({"role": "viewer"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
}

#[tokio::test]
async fn failed_logins_are_uniform_throttled_and_audited() {
    let app = App::new();
    let admin = app.setup_admin().await;
    let bad = |user: &'static str| json!({"username": user, "password": "wrong-password"});
    let unknown = app
        .post("/api/v1/auth/login", As::Anonymous, bad("nobody"))
        .await;
    let wrong = app
        .call_from(
            Method::POST,
            "/api/v1/auth/login",
            As::Anonymous,
            Some(bad("admin")),
            "10.9.9.9:1",
            &[],
        )
        .await;
    assert_eq!(unknown.status, StatusCode::UNAUTHORIZED);
    assert_eq!(unknown.body, wrong.body, "no user enumeration");
    // Four more failures for admin from other addresses: the user name locks.
    for i in 0..4 {
        let peer = format!("10.9.9.{}:1", 10 + i);
        let r = app
            .call_from(
                Method::POST,
                "/api/v1/auth/login",
                As::Anonymous,
                Some(bad("admin")),
                &peer,
                &[],
            )
            .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "attempt {i}");
    }
    let r = app
        .call_from(
            Method::POST,
            "/api/v1/auth/login",
            As::Anonymous,
            Some(json!({"username": "admin", "password": "admin-pass-1"})),
            "10.9.9.99:1",
            &[],
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::TOO_MANY_REQUESTS,
        "even the right password waits: {}",
        r.body
    );
    let retry: u64 = r.headers[header::RETRY_AFTER]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=60).contains(&retry), "{retry}");
    let audit = app.audit(&admin).await;
    assert_eq!(
        audit
            .iter()
            .filter(|e| e["action"] == "auth.login_failed")
            .count(),
        6
    );
}

#[tokio::test]
async fn mac_spellings_are_one_device() {
    let app = App::new();
    let admin = app.setup_admin().await;
    let r = app
        .post(
            "/api/v1/devices",
            As::Cookie(&admin),
            json!({"mac": "AA-BB-CC-00-11-22"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    for spelling in [
        "aa:bb:cc:00:11:22",
        "aabbcc001122",
        "AA-BB-CC-00-11-22",
        "aabb.cc00.1122",
    ] {
        let r = app
            .get(&format!("/api/v1/devices/{spelling}"), As::Cookie(&admin))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{spelling}");
        assert_eq!(r.body["mac"], "aa:bb:cc:00:11:22");
        let r = app
            .post(
                "/api/v1/devices",
                As::Cookie(&admin),
                json!({"mac": spelling}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CONFLICT, "{spelling}");
    }
    let r = app.get("/api/v1/devices", As::Cookie(&admin)).await;
    assert_eq!(r.body["total"], 1);
    let r = app
        .get("/api/v1/devices/aa:bb:cc", As::Cookie(&admin))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.body["error"]["code"], "bad_request");
}

#[tokio::test]
async fn cookie_writes_from_another_origin_are_refused() {
    let app = App::new();
    let admin = app.setup_admin().await;
    let body = Some(json!({"mac": "02:00:00:00:00:05"}));
    let r = app
        .call_from(
            Method::POST,
            "/api/v1/devices",
            As::Cookie(&admin),
            body.clone(),
            "127.0.0.1:1",
            &[("origin", "https://evil.example")],
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = app
        .call_from(
            Method::POST,
            "/api/v1/devices",
            As::Cookie(&admin),
            body,
            "127.0.0.1:1",
            &[("origin", "http://netboot.test")],
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
}

#[tokio::test]
async fn errors_are_json_with_the_right_status() {
    let app = App::new();
    let admin = app.setup_admin().await;
    let r = app.get("/api/v1/nope", As::Anonymous).await;
    assert_eq!(
        (r.status, r.body["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );
    let r = app
        .post(
            "/api/v1/devices",
            As::Cookie(&admin),
            json!({"mac": "02:00:00:00:00:01", "colour": "red"}),
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "unknown fields are refused: {}",
        r.body
    );
    let r = app
        .get("/api/v1/devices/02:00:00:00:00:07", As::Cookie(&admin))
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = app
        .get("/api/v1/devices?sort=colour", As::Cookie(&admin))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = app
        .post(
            "/api/v1/images",
            As::Cookie(&admin),
            json!({"name": "../etc", "size_bytes": 512}),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    let r = app
        .post(
            "/api/v1/installers",
            As::Cookie(&admin),
            json!({"path": "../../etc/passwd", "kind": "iso"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        !r.body
            .to_string()
            .contains(app.cfg.paths.installers.to_str().expect("utf8")),
        "no server paths leak"
    );
}

#[tokio::test]
async fn images_link_to_one_device_and_cannot_be_deleted_while_linked() {
    let app = App::new();
    let admin = app.setup_admin().await;
    let a = As::Cookie(&admin);
    assert_eq!(
        app.post(
            "/api/v1/images",
            a,
            json!({"name": "win11", "size_bytes": 64u64 << 30})
        )
        .await
        .status,
        StatusCode::CREATED
    );
    for mac in ["02:00:00:00:00:01", "02:00:00:00:00:02"] {
        assert_eq!(
            app.post("/api/v1/devices", a, json!({"mac": mac}))
                .await
                .status,
            StatusCode::CREATED
        );
    }
    let r = app
        .patch(
            "/api/v1/devices/02:00:00:00:00:01",
            a,
            json!({"image": "win11"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = app
        .patch(
            "/api/v1/devices/02:00:00:00:00:02",
            a,
            json!({"image": "win11"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    let r = app.get("/api/v1/images/win11", a).await;
    assert_eq!(r.body["linked_mac"], "02:00:00:00:00:01");
    assert_eq!(
        app.delete("/api/v1/images/win11", a).await.status,
        StatusCode::CONFLICT
    );
    let r = app
        .patch("/api/v1/images/win11", a, json!({"size_bytes": 1u64 << 30}))
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "no shrinking");
    let r = app
        .patch(
            "/api/v1/devices/02:00:00:00:00:01",
            a,
            json!({"image": null}),
        )
        .await;
    assert_eq!(r.body["image"], Value::Null);
    assert_eq!(
        app.delete("/api/v1/images/win11", a).await.status,
        StatusCode::NO_CONTENT
    );
}

#[tokio::test]
async fn unknown_devices_register_into_the_inventory() {
    let app = App::new();
    let admin = app.setup_admin().await;
    let mac = "52:54:00:aa:bb:cc".parse().expect("mac");
    let store = Arc::clone(&app.store);
    let sighting = Sighting {
        mac,
        at: Timestamp::now(),
        arch: Some(netboot_daemon::store::Arch::UefiX64),
        ip: Some("10.0.0.7".into()),
        vendor_class: Some("PXEClient:Arch:00007:UNDI:003016".into()),
    };
    tokio::task::spawn_blocking(move || store.record_sighting(&sighting))
        .await
        .expect("join")
        .expect("sighting");
    let r = app.get("/api/v1/unknown-devices", As::Cookie(&admin)).await;
    assert_eq!(r.body["total"], 1);
    assert_eq!(r.body["items"][0]["arch"], "uefi_x64");
    let r = app
        .post(
            "/api/v1/unknown-devices/525400AABBCC/register",
            As::Cookie(&admin),
            json!({}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(r.body["name"], "uefi_x64-aabbcc");
    assert_eq!(r.body["last_ip"], "10.0.0.7");
    let r = app.get("/api/v1/unknown-devices", As::Cookie(&admin)).await;
    assert_eq!(r.body["total"], 0);
    let r = app
        .post(
            "/api/v1/unknown-devices/02:00:00:00:00:09/register",
            As::Cookie(&admin),
            json!({}),
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::NOT_FOUND,
        "only seen clients register this way"
    );
}

#[tokio::test]
async fn events_filter_paginate_and_keep_a_per_device_history() {
    let app = App::new();
    let admin = app.setup_admin().await;
    let a = As::Cookie(&admin);
    let r = app
        .patch("/api/v1/settings", a, json!({"events_per_device": 10}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    for i in 0..25 {
        let r = app
            .post(
                "/api/v1/events",
                a,
                json!({"mac": "02:00:00:00:00:01", "kind": "note", "detail": format!("n{i}")}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    }
    for kind in ["dhcp_offer", "note", "note"] {
        app.post(
            "/api/v1/events",
            a,
            json!({"mac": "02:00:00:00:00:02", "kind": kind}),
        )
        .await;
    }
    // The noisy device keeps its 10 newest; the quiet one keeps all of its 3.
    let r = app
        .get("/api/v1/devices/020000000001/events?limit=4", a)
        .await;
    assert_eq!(r.body["total"], 10);
    let first: Vec<_> = r.body["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|e| e["detail"].clone())
        .collect();
    assert_eq!(
        first,
        [json!("n24"), json!("n23"), json!("n22"), json!("n21")]
    );
    let cursor = r.body["next_cursor"].as_i64().expect("more pages");
    let r = app
        .get(
            &format!("/api/v1/devices/020000000001/events?limit=4&before={cursor}"),
            a,
        )
        .await;
    assert_eq!(r.body["items"][0]["detail"], "n20");
    let r = app
        .get("/api/v1/events?mac=02:00:00:00:00:02&kind=note", a)
        .await;
    assert_eq!(r.body["total"], 2);
    assert_eq!(r.body["next_cursor"], Value::Null);
    let r = app
        .get("/api/v1/events?since=2000-01-01T00:00:00Z&source=api", a)
        .await;
    assert_eq!(r.body["total"], 13);
    let r = app.get("/api/v1/events?since=yesterday", a).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn health_reports_a_missing_data_directory() {
    let app = App::new();
    let r = app.get("/api/v1/health", As::Anonymous).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    std::fs::remove_dir(&app.cfg.paths.logs).expect("remove logs dir");
    let r = app.get("/api/v1/health", As::Anonymous).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    let failing: Vec<_> = r.body["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .filter(|c| c["ok"] == false)
        .collect();
    assert_eq!(failing.len(), 1);
    assert_eq!(failing[0]["name"], "dir:logs");
}

#[tokio::test]
async fn the_openapi_document_covers_the_routes() {
    let app = App::new();
    let admin = app.setup_admin().await;
    let r = app.get("/api/v1/openapi.json", As::Anonymous).await;
    assert_eq!(r.body["info"]["version"], api::VERSION);
    let paths = r.body["paths"].as_object().expect("paths");
    assert!(paths.len() >= 25, "{} paths", paths.len());
    // A device's CHAP: set through the PATCH, shown as names and "set"/"not set".
    let schemas = &r.body["components"]["schemas"];
    assert!(
        schemas["DevicePatch"]["properties"]["chap"].is_object(),
        "{schemas}"
    );
    assert!(
        schemas["Device"]["properties"]["chap"].is_object(),
        "{schemas}"
    );
    for schema in ["Device", "DevicePatch", "NewDevice"] {
        assert!(
            schemas[schema]["properties"]["initiators"].is_object(),
            "{schema}: {schemas}"
        );
    }
    for field in ["user", "secret", "target_user", "target_secret"] {
        assert!(
            schemas["ChapCredentials"]["properties"][field].is_object(),
            "{field}"
        );
        assert!(
            schemas["ChapSummary"]["properties"][field].is_object(),
            "{field}"
        );
    }
    // Every documented operation is routed: none answers 404 for a missing route or 405.
    for (path, ops) in paths {
        let concrete = path
            .replace("{mac}", "02:00:00:00:00:01")
            .replace("{name}", "x")
            .replace("{id}", "1")
            .replace("{username}", "admin");
        for method in ops.as_object().expect("ops").keys() {
            let m: Method = method.to_uppercase().parse().expect("method");
            let r = app
                .call(m.clone(), &concrete, As::Cookie(&admin), Some(json!({})))
                .await;
            assert_ne!(r.status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
            if r.status == StatusCode::NOT_FOUND {
                assert_ne!(
                    r.body["error"]["message"], "no such API endpoint",
                    "{method} {path} is not routed"
                );
            }
        }
    }
}

/// The daemon on a real socket, driven by curl.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_socket_with_curl() {
    let dir = TestDir::new("api-socket");
    let served = Served::start(config(&dir)).await;
    let base = served.base.clone();
    let jar = dir.0.join("cookies");
    let curl = |args: Vec<String>| async move {
        let out = tokio::process::Command::new("curl")
            .args(["-sS", "-w", "\n%{http_code}"])
            .args(args)
            .output()
            .await
            .expect("curl runs");
        assert!(
            out.status.success(),
            "curl failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).expect("utf8");
        let (body, code) = text.rsplit_once('\n').expect("status line");
        (code.parse::<u16>().expect("code"), body.to_owned())
    };
    let s = |x: &str| x.to_owned();
    let (code, body) = curl(vec![format!("{base}/api/v1/version")]).await;
    assert_eq!(code, 200);
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["version"], version_file());

    let json_hdr = s("content-type: application/json");
    let dev = s(r#"{"mac":"AA-BB-CC-DD-EE-01"}"#);
    let (code, _) = curl(vec![
        s("-X"),
        s("POST"),
        s("-H"),
        json_hdr.clone(),
        s("-d"),
        dev.clone(),
        format!("{base}/api/v1/devices"),
    ])
    .await;
    assert_eq!(code, 401);
    let (code, _) = curl(vec![
        s("-c"),
        jar.display().to_string(),
        s("-H"),
        json_hdr.clone(),
        s("-d"),
        s(r#"{"username":"admin","password":"admin-pass-1"}"#),
        format!("{base}/api/v1/auth/setup"),
    ])
    .await;
    assert_eq!(code, 201);
    let (code, body) = curl(vec![
        s("-b"),
        jar.display().to_string(),
        s("-H"),
        json_hdr.clone(),
        s("-d"),
        dev,
        format!("{base}/api/v1/devices"),
    ])
    .await;
    assert_eq!(code, 201, "{body}");
    let (code, body) = curl(vec![
        s("-b"),
        jar.display().to_string(),
        format!("{base}/api/v1/audit?action=device."),
    ])
    .await;
    assert_eq!(code, 200);
    let audit: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(audit["items"][0]["target"], "aa:bb:cc:dd:ee:01");
    assert_eq!(audit["items"][0]["actor"], "admin");

    served.stop().await;
}
