//! The page handlers and their templates.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt as _;
use std::path::Path as FsPath;

use askama::Template;
use axum::extract::{OriginalUri, Path, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Redirect, Response};

use super::view::{
    Chart, SPARK_H, SPARK_W, Shell, Size, Step, iso, latest_boot, spark_points, url_path,
};
use super::{VERSION, static_prefix};
use crate::api::inventory::parse_mac;
use crate::api::{ApiError, AppState, Auth, blocking};
use crate::store::{
    Arch, AuditEntry, AuditQuery, BootEvent, BootPolicy, BootProfile, Device, DeviceQuery,
    DeviceSort, EventQuery, Image, Installer, InstallerKind, PageQuery, ProfileKind, Role,
    Settings, Store, UnknownDevice, User,
};
use crate::time::Timestamp;

/// Devices seen within this many minutes count as active.
const ACTIVE_MINUTES: i64 = 10;

/// Renders a template, or a plain error page when rendering fails.
fn render(t: &impl Template) -> Response {
    match t.render() {
        Ok(html) => Html(html).into_response(),
        Err(error) => {
            tracing::error!(%error, "rendering a page failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "the page could not be rendered",
            )
                .into_response()
        }
    }
}

/// A page's answer when it cannot be shown.
pub(super) struct PageError(Response);

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        self.0
    }
}

impl From<ApiError> for PageError {
    fn from(e: ApiError) -> Self {
        let page = ErrorPage {
            status: e.status().as_u16(),
            reason: e.status().canonical_reason().unwrap_or("error"),
            message: e.message().to_owned(),
            assets: static_prefix(),
        };
        let mut res = render(&page);
        *res.status_mut() = e.status();
        Self(res)
    }
}

type PageResult = Result<Response, PageError>;

/// A plain error page.
#[derive(Template)]
#[template(path = "web/error.html")]
struct ErrorPage {
    status: u16,
    reason: &'static str,
    message: String,
    assets: String,
}

/// The logged-in caller, or a redirect to setup (no administrator yet) or login.
async fn gate(
    state: &AppState,
    auth: Result<Auth, ApiError>,
    uri: &OriginalUri,
    title: &str,
    nav: &'static str,
) -> Result<Shell, PageError> {
    match auth {
        Ok(a) => Ok(Shell {
            title: title.to_owned(),
            nav,
            username: a.username,
            role: a.role,
            can_write: a.role.allows(Role::Operator),
            is_admin: a.role.allows(Role::Admin),
            assets: static_prefix(),
            version: VERSION,
        }),
        Err(e) if e.status() == StatusCode::UNAUTHORIZED => {
            let needs_setup = blocking(state, |s| s.needs_setup()).await?;
            let to = if needs_setup {
                "/ui/setup".to_owned()
            } else {
                let next = uri.0.path();
                format!("/ui/login?next={}", next.replace(['&', '?', '#', '%'], ""))
            };
            Err(PageError(Redirect::to(&to).into_response()))
        }
        Err(e) => Err(e.into()),
    }
}

fn forbidden(what: &str) -> PageError {
    ApiError::forbidden(format!("{what} is for administrators")).into()
}

// Login and setup.

/// The login page.
#[derive(Template)]
#[template(path = "web/login.html")]
struct LoginPage {
    assets: String,
    version: &'static str,
}

/// `GET /ui/login`.
pub(super) async fn login(State(state): State<AppState>) -> PageResult {
    if blocking(&state, |s| s.needs_setup()).await? {
        return Ok(Redirect::to("/ui/setup").into_response());
    }
    Ok(render(&LoginPage {
        assets: static_prefix(),
        version: VERSION,
    }))
}

/// The first-run setup page.
#[derive(Template)]
#[template(path = "web/setup.html")]
struct SetupPage {
    assets: String,
    version: &'static str,
    min_password: usize,
}

/// `GET /ui/setup`: only while no administrator exists.
pub(super) async fn setup(State(state): State<AppState>) -> PageResult {
    if !blocking(&state, |s| s.needs_setup()).await? {
        return Ok(Redirect::to("/ui/login").into_response());
    }
    Ok(render(&SetupPage {
        assets: static_prefix(),
        version: VERSION,
        min_password: crate::auth::MIN_PASSWORD_LEN,
    }))
}

// Shared rows.

/// A boot event as shown.
pub(super) struct EventRow {
    at: String,
    mac: String,
    source: String,
    kind: String,
    detail: String,
    ip: String,
}

impl From<&BootEvent> for EventRow {
    fn from(e: &BootEvent) -> Self {
        Self {
            at: e.at.to_string(),
            mac: e.mac.to_string(),
            source: e.source.to_string(),
            kind: e.kind.clone(),
            detail: e.detail.clone(),
            ip: e.ip.clone().unwrap_or_default(),
        }
    }
}

/// A device as shown in the list.
pub(super) struct DeviceRow {
    mac: String,
    name: String,
    arch: String,
    enabled: bool,
    active: bool,
    policy: String,
    image: String,
    profile: String,
    last_seen: String,
    last_ip: String,
    /// Bytes per second from and to it now, all services; none without accounting.
    rate: Option<Size>,
}

fn device_row(d: &Device, now: Timestamp) -> DeviceRow {
    DeviceRow {
        mac: d.mac.to_string(),
        name: d.name.clone(),
        arch: d.arch.to_string(),
        enabled: d.enabled,
        active: is_active(d.last_seen, now),
        policy: d.boot_policy.to_string(),
        image: d.image.clone().unwrap_or_default(),
        profile: d.profile.clone().unwrap_or_default(),
        last_seen: iso(d.last_seen),
        last_ip: d.last_ip.clone().unwrap_or_default(),
        rate: None,
    }
}

fn is_active(last_seen: Option<Timestamp>, now: Timestamp) -> bool {
    last_seen.is_some_and(|t| t >= now.add_secs(-ACTIVE_MINUTES * 60))
}

fn all_devices(s: &dyn Store) -> crate::store::Result<crate::store::Page<Device>> {
    s.list_devices(&DeviceQuery {
        sort: DeviceSort::Name,
        page: PageQuery {
            limit: 1000,
            offset: 0,
        },
        ..DeviceQuery::default()
    })
}

/// An image with what its file occupies.
pub(super) struct ImageRow {
    name: String,
    size: Size,
    /// The size in whole GiB, rounded up (the smallest the grow form offers).
    size_gib: u64,
    /// Blocks the sparse file occupies; none while the file does not exist yet (it is
    /// created on the first iSCSI login).
    allocated: Option<Size>,
    description: String,
    linked_mac: String,
    cloned_from: String,
    created_at: String,
    /// Live iSCSI sessions: initiator and address.
    sessions: Vec<(String, String)>,
}

fn image_rows(images: &[Image], dir: &FsPath) -> Vec<ImageRow> {
    images
        .iter()
        .map(|i| ImageRow {
            name: i.name.clone(),
            size: Size(i.size_bytes),
            size_gib: i.size_bytes.div_ceil(1 << 30),
            allocated: std::fs::metadata(dir.join(format!("{}.img", i.name)))
                .ok()
                .map(|m| Size(m.blocks() * 512)),
            description: i.description.clone(),
            linked_mac: i.linked_mac.map(|m| m.to_string()).unwrap_or_default(),
            cloned_from: i.cloned_from.clone().unwrap_or_default(),
            created_at: iso(Some(i.created_at)),
            sessions: Vec::new(),
        })
        .collect()
}

// Dashboard.

/// One service's throughput as the dashboard shows it.
pub(super) struct ThroughputRow {
    service: &'static str,
    rx_rate: Size,
    tx_rate: Size,
    rx: Size,
    tx: Size,
    rx_points: String,
    tx_points: String,
}

fn throughput_rows(services: &[crate::service::accounting::ServiceFigures]) -> Vec<ThroughputRow> {
    services
        .iter()
        .map(|f| {
            let (rx_points, tx_points) = spark_points(&f.rx_history, &f.tx_history, 60);
            ThroughputRow {
                service: f.service,
                rx_rate: Size(f.rx_bytes_per_second.round() as u64),
                tx_rate: Size(f.tx_bytes_per_second.round() as u64),
                rx: Size(f.rx_bytes),
                tx: Size(f.tx_bytes),
                rx_points,
                tx_points,
            }
        })
        .collect()
}

/// The dashboard.
#[derive(Template)]
#[template(path = "web/dashboard.html")]
struct DashboardPage {
    shell: Shell,
    /// `ebpf`, `userspace` or `none`.
    traffic_source: &'static str,
    /// Why there are no figures, or what they leave out.
    traffic_note: String,
    throughput: Vec<ThroughputRow>,
    spark_w: f64,
    spark_h: f64,
    devices_total: u64,
    devices_active: usize,
    active_minutes: i64,
    unknown: u64,
    images_total: usize,
    images_linked: usize,
    installers: usize,
    images_apparent: Size,
    images_allocated: Size,
    images_without_file: usize,
    installers_size: Size,
    recent: Vec<DeviceRow>,
    events: Vec<EventRow>,
    chart: Chart,
}

/// `GET /ui/`.
pub(super) async fn dashboard(
    State(state): State<AppState>,
    auth: Result<Auth, ApiError>,
    uri: OriginalUri,
) -> PageResult {
    let shell = gate(&state, auth, &uri, "Dashboard", "dashboard").await?;
    let now = Timestamp::now();
    let (devices, unknown, images, installers, events, day) = blocking(&state, move |s| {
        let devices = all_devices(s)?;
        let (_, unknown) = s.device_counts()?;
        let day = s.list_events(&EventQuery {
            since: Some(now.add_secs(-24 * 3600)),
            limit: 1000,
            ..EventQuery::default()
        })?;
        let events = s.list_events(&EventQuery {
            limit: 15,
            ..EventQuery::default()
        })?;
        Ok((
            devices,
            unknown,
            s.list_images()?,
            s.list_installers()?,
            events.items,
            day.items,
        ))
    })
    .await?;
    let dir = state.paths().images.clone();
    let images_shown = tokio::task::spawn_blocking(move || image_rows(&images, &dir))
        .await
        .map_err(ApiError::internal)?;
    let traffic = crate::api::metrics::services_traffic(&state).await?;
    let mut recent: Vec<&Device> = devices.items.iter().collect();
    recent.sort_by_key(|d| std::cmp::Reverse(d.last_seen));
    let times: Vec<Timestamp> = day.iter().map(|e| e.at).collect();
    let page = DashboardPage {
        shell,
        traffic_source: traffic.source,
        traffic_note: traffic.warnings.join("; "),
        throughput: throughput_rows(&traffic.services),
        spark_w: SPARK_W,
        spark_h: SPARK_H,
        devices_total: devices.total,
        devices_active: devices
            .items
            .iter()
            .filter(|d| is_active(d.last_seen, now))
            .count(),
        active_minutes: ACTIVE_MINUTES,
        unknown,
        images_total: images_shown.len(),
        images_linked: images_shown
            .iter()
            .filter(|i| !i.linked_mac.is_empty())
            .count(),
        installers: installers.len(),
        images_apparent: Size(images_shown.iter().map(|i| i.size.0).sum()),
        images_allocated: Size(
            images_shown
                .iter()
                .filter_map(|i| i.allocated.map(|a| a.0))
                .sum(),
        ),
        images_without_file: images_shown
            .iter()
            .filter(|i| i.allocated.is_none())
            .count(),
        installers_size: Size(installers.iter().map(|i| i.size_bytes).sum()),
        recent: recent.iter().take(8).map(|d| device_row(d, now)).collect(),
        events: events.iter().map(EventRow::from).collect(),
        chart: Chart::per_hour(&times, now, 24),
    };
    Ok(render(&page))
}

// Devices.

/// The device list.
#[derive(Template)]
#[template(path = "web/devices.html")]
struct DevicesPage {
    shell: Shell,
    /// Where the rates come from: `ebpf`, `userspace` or `none`.
    rate_source: &'static str,
    devices: Vec<DeviceRow>,
    total: u64,
    archs: Vec<&'static str>,
    policies: Vec<&'static str>,
    images: Vec<String>,
}

/// `GET /ui/devices`.
pub(super) async fn devices(
    State(state): State<AppState>,
    auth: Result<Auth, ApiError>,
    uri: OriginalUri,
) -> PageResult {
    let shell = gate(&state, auth, &uri, "Devices", "devices").await?;
    let now = Timestamp::now();
    let (devices, images) = blocking(&state, |s| Ok((all_devices(s)?, s.list_images()?))).await?;
    let rates = state.traffic().map(|t| t.device_rates());
    Ok(render(&DevicesPage {
        shell,
        rate_source: state.traffic().map_or("none", |t| t.counters().source()),
        devices: devices
            .items
            .iter()
            .map(|d| DeviceRow {
                rate: rates.as_ref().map(|r| {
                    let (rx, tx) = r.get(&d.mac).copied().unwrap_or_default();
                    Size((rx + tx).round() as u64)
                }),
                ..device_row(d, now)
            })
            .collect(),
        total: devices.total,
        archs: Arch::ALL.iter().map(|a| a.as_str()).collect(),
        policies: BootPolicy::ALL.iter().map(|p| p.as_str()).collect(),
        images: free_images(&images, None),
    }))
}

/// Names of the images a device may link: unlinked ones, and the one it has.
fn free_images(images: &[Image], mac: Option<crate::mac::MacAddr>) -> Vec<String> {
    images
        .iter()
        .filter(|i| i.linked_mac.is_none() || i.linked_mac == mac)
        .map(|i| i.name.clone())
        .collect()
}

/// One device.
#[derive(Template)]
#[template(path = "web/device.html")]
struct DevicePage {
    shell: Shell,
    d: DeviceRow,
    notes: String,
    first_seen: String,
    created_at: String,
    policies: Vec<&'static str>,
    archs: Vec<&'static str>,
    images: Vec<String>,
    profiles: Vec<String>,
    events: Vec<EventRow>,
    chart: Chart,
    /// The latest boot's steps, when a boot was seen.
    boot: Option<Vec<Step>>,
    /// Its installer logs: (name, URL-encoded name, size, modified).
    logs: Vec<(String, String, Size, String)>,
    /// Where they are looked for, relative to `paths.logs`.
    logs_folder: String,
}

/// `GET /ui/devices/{mac}`.
pub(super) async fn device(
    State(state): State<AppState>,
    auth: Result<Auth, ApiError>,
    uri: OriginalUri,
    Path(mac): Path<String>,
) -> PageResult {
    let shell = gate(&state, auth, &uri, "Device", "devices").await?;
    let mac = parse_mac(&mac)?;
    let now = Timestamp::now();
    let (device, images, profiles, events, day) = blocking(&state, move |s| {
        let day = s.list_events(&EventQuery {
            mac: Some(mac),
            since: Some(now.add_secs(-24 * 3600)),
            limit: 1000,
            ..EventQuery::default()
        })?;
        let events = s.list_events(&EventQuery {
            mac: Some(mac),
            limit: 50,
            ..EventQuery::default()
        })?;
        Ok((
            s.get_device(mac)?,
            s.list_images()?,
            s.list_profiles()?,
            events.items,
            day.items,
        ))
    })
    .await?;
    let times: Vec<Timestamp> = day.iter().map(|e| e.at).collect();
    let st = state.clone();
    let logs = tokio::task::spawn_blocking(move || crate::api::logs::list(&st, mac))
        .await
        .map_err(ApiError::internal)?;
    let mut shell = shell;
    shell.title = format!("Device {}", device.name);
    Ok(render(&DevicePage {
        shell,
        d: device_row(&device, now),
        notes: device.notes.clone(),
        first_seen: iso(device.first_seen),
        created_at: iso(Some(device.created_at)),
        policies: BootPolicy::ALL.iter().map(|p| p.as_str()).collect(),
        archs: Arch::ALL.iter().map(|a| a.as_str()).collect(),
        images: free_images(&images, Some(device.mac)),
        profiles: profiles.iter().map(|p| p.name.clone()).collect(),
        boot: latest_boot(&events),
        logs: logs
            .into_iter()
            .map(|l| {
                let href = url_path(&l.name);
                (l.name, href, Size(l.size_bytes), iso(l.modified_at))
            })
            .collect(),
        logs_folder: crate::api::logs::folder_name(mac),
        events: events.iter().map(EventRow::from).collect(),
        chart: Chart::per_hour(&times, now, 24),
    }))
}

/// Unknown devices.
#[derive(Template)]
#[template(path = "web/unknown.html")]
struct UnknownPage {
    shell: Shell,
    unknown: Vec<UnknownRow>,
    archs: Vec<&'static str>,
    policies: Vec<&'static str>,
    images: Vec<String>,
    profiles: Vec<String>,
}

/// An unknown device as shown.
pub(super) struct UnknownRow {
    mac: String,
    arch: String,
    vendor_class: String,
    last_ip: String,
    first_seen: String,
    last_seen: String,
    seen_count: u64,
}

impl From<&UnknownDevice> for UnknownRow {
    fn from(u: &UnknownDevice) -> Self {
        Self {
            mac: u.mac.to_string(),
            arch: u.arch.to_string(),
            vendor_class: u.vendor_class.clone().unwrap_or_default(),
            last_ip: u.last_ip.clone().unwrap_or_default(),
            first_seen: iso(Some(u.first_seen)),
            last_seen: iso(Some(u.last_seen)),
            seen_count: u.seen_count,
        }
    }
}

/// `GET /ui/unknown`.
pub(super) async fn unknown(
    State(state): State<AppState>,
    auth: Result<Auth, ApiError>,
    uri: OriginalUri,
) -> PageResult {
    let shell = gate(&state, auth, &uri, "Unknown devices", "unknown").await?;
    let (unknown, images, profiles) = blocking(&state, |s| {
        Ok((
            s.list_unknown_devices(&PageQuery {
                limit: 1000,
                offset: 0,
            })?,
            s.list_images()?,
            s.list_profiles()?,
        ))
    })
    .await?;
    Ok(render(&UnknownPage {
        shell,
        unknown: unknown.items.iter().map(UnknownRow::from).collect(),
        archs: Arch::ALL.iter().map(|a| a.as_str()).collect(),
        policies: BootPolicy::ALL.iter().map(|p| p.as_str()).collect(),
        images: free_images(&images, None),
        profiles: profiles.iter().map(|p| p.name.clone()).collect(),
    }))
}

/// Disk images.
#[derive(Template)]
#[template(path = "web/images.html")]
struct ImagesPage {
    shell: Shell,
    /// Whether the iSCSI target runs (live sessions are known).
    iscsi: bool,
    images: Vec<ImageRow>,
    /// Devices without an image, for linking: (MAC, name).
    devices: Vec<(String, String)>,
    /// Device names by MAC.
    names: HashMap<String, String>,
}

impl ImagesPage {
    fn name_of<'a>(&'a self, mac: &'a str) -> &'a str {
        self.names.get(mac).map_or(mac, String::as_str)
    }
}

/// `GET /ui/images`.
pub(super) async fn images(
    State(state): State<AppState>,
    auth: Result<Auth, ApiError>,
    uri: OriginalUri,
) -> PageResult {
    let shell = gate(&state, auth, &uri, "Disk images", "images").await?;
    let (images, devices) = blocking(&state, |s| Ok((s.list_images()?, all_devices(s)?))).await?;
    let dir = state.paths().images.clone();
    let mut rows = tokio::task::spawn_blocking(move || image_rows(&images, &dir))
        .await
        .map_err(ApiError::internal)?;
    for r in &mut rows {
        r.sessions = crate::api::images::live_sessions(&state, &r.name)
            .into_iter()
            .map(|s| (s.initiator, s.peer))
            .collect();
    }
    Ok(render(&ImagesPage {
        shell,
        iscsi: state.iscsi().is_some(),
        images: rows,
        devices: devices
            .items
            .iter()
            .filter(|d| d.image.is_none())
            .map(|d| (d.mac.to_string(), d.name.clone()))
            .collect(),
        names: devices
            .items
            .iter()
            .map(|d| (d.mac.to_string(), d.name.clone()))
            .collect(),
    }))
}

/// Installer media: a folder of the installers directory, and the records.
#[derive(Template)]
#[template(path = "web/installers.html")]
struct InstallersPage {
    shell: Shell,
    /// The folder shown, relative to the installers directory (`""`: the directory).
    folder: String,
    /// The breadcrumb above it: (name, URL-encoded path), the directory first.
    crumbs: Vec<(String, String)>,
    entries: Vec<EntryRow>,
    /// Sum of the files and folders shown, when every size is known.
    folder_size: Option<Size>,
    installers: Vec<InstallerRow>,
    total: Size,
    kinds: Vec<&'static str>,
}

/// A file or folder as shown.
pub(super) struct EntryRow {
    name: String,
    path: String,
    href: String,
    is_folder: bool,
    size: Option<Size>,
    items: u64,
    modified: String,
    /// The installer record's name, if the path has one.
    record_name: String,
    /// Its kind.
    record_kind: String,
}

/// An installer as shown.
pub(super) struct InstallerRow {
    id: i64,
    name: String,
    path: String,
    href: String,
    kind: String,
    arch: String,
    size: Size,
    created_at: String,
}

impl From<&Installer> for InstallerRow {
    fn from(i: &Installer) -> Self {
        Self {
            id: i.id,
            name: i.name.clone(),
            path: i.path.clone(),
            href: url_path(&i.path),
            kind: i.kind.to_string(),
            arch: i.arch.map(|a| a.to_string()).unwrap_or_default(),
            size: Size(i.size_bytes),
            created_at: iso(Some(i.created_at)),
        }
    }
}

/// Query of the installers page.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct FolderQuery {
    /// The folder, relative to the installers directory.
    path: String,
}

/// `GET /ui/installers?path=`.
pub(super) async fn installers(
    State(state): State<AppState>,
    auth: Result<Auth, ApiError>,
    uri: OriginalUri,
    crate::api::Query(q): crate::api::Query<FolderQuery>,
) -> PageResult {
    let shell = gate(&state, auth, &uri, "Installers", "installers").await?;
    let rel = crate::api::folders::relative(&q.path)?;
    let list = blocking(&state, |s| s.list_installers()).await?;
    let records = crate::api::folders::records_by_path(&list);
    let root = state.paths().installers.clone();
    let r = rel.clone();
    let folder =
        tokio::task::spawn_blocking(move || crate::api::folders::list(&root, &r, &records))
            .await
            .map_err(ApiError::internal)??;
    let by_id: HashMap<i64, &Installer> = list.iter().map(|i| (i.id, i)).collect();
    let mut crumbs = vec![("installers".to_owned(), String::new())];
    let mut at = String::new();
    for part in rel.split('/').filter(|p| !p.is_empty()) {
        if !at.is_empty() {
            at.push('/');
        }
        at.push_str(part);
        crumbs.push((part.to_owned(), url_path(&at)));
    }
    let entries: Vec<EntryRow> = folder
        .entries
        .iter()
        .map(|e| {
            let record = e.installer_id.and_then(|id| by_id.get(&id));
            EntryRow {
                name: e.name.clone(),
                href: url_path(&e.path),
                path: e.path.clone(),
                is_folder: e.kind == crate::api::folders::EntryKind::Folder,
                size: e.size_bytes.map(Size),
                items: e.items.unwrap_or(0),
                modified: iso(e.modified_at),
                record_name: record.map(|i| i.name.clone()).unwrap_or_default(),
                record_kind: record.map(|i| i.kind.to_string()).unwrap_or_default(),
            }
        })
        .collect();
    let folder_size = entries
        .iter()
        .map(|e| e.size.map(|s| s.0))
        .sum::<Option<u64>>()
        .map(Size);
    Ok(render(&InstallersPage {
        shell,
        folder: rel,
        crumbs,
        entries,
        folder_size,
        total: Size(list.iter().map(|i| i.size_bytes).sum()),
        installers: list.iter().map(InstallerRow::from).collect(),
        kinds: InstallerKind::ALL.iter().map(|k| k.as_str()).collect(),
    }))
}

/// The caller's own account.
#[derive(Template)]
#[template(path = "web/account.html")]
struct AccountPage {
    shell: Shell,
    min_password: usize,
}

/// `GET /ui/account`: who is logged in, and the form to change one's password.
pub(super) async fn account(
    State(state): State<AppState>,
    auth: Result<Auth, ApiError>,
    uri: OriginalUri,
) -> PageResult {
    let shell = gate(&state, auth, &uri, "Your account", "account").await?;
    Ok(render(&AccountPage {
        shell,
        min_password: crate::auth::MIN_PASSWORD_LEN,
    }))
}

/// Boot profiles.
#[derive(Template)]
#[template(path = "web/profiles.html")]
struct ProfilesPage {
    shell: Shell,
    profiles: Vec<BootProfile>,
    kinds: Vec<&'static str>,
    archs: Vec<&'static str>,
}

/// `GET /ui/profiles`.
pub(super) async fn profiles(
    State(state): State<AppState>,
    auth: Result<Auth, ApiError>,
    uri: OriginalUri,
) -> PageResult {
    let shell = gate(&state, auth, &uri, "Boot profiles", "profiles").await?;
    let profiles = blocking(&state, |s| s.list_profiles()).await?;
    Ok(render(&ProfilesPage {
        shell,
        profiles,
        kinds: ProfileKind::ALL.iter().map(|k| k.as_str()).collect(),
        archs: Arch::ALL.iter().map(|a| a.as_str()).collect(),
    }))
}

/// One row of the lease table.
struct LeaseRow {
    ip: String,
    mac: String,
    hostname: Option<String>,
    state: &'static str,
    active: bool,
    /// RFC 3339, shown in the browser's time zone.
    expires: String,
}

/// The DHCP server's leases.
#[derive(Template)]
#[template(path = "web/leases.html")]
struct LeasesPage {
    shell: Shell,
    mode: &'static str,
    active: usize,
    leases: Vec<LeaseRow>,
}

/// `GET /ui/leases`.
pub(super) async fn leases(
    State(state): State<AppState>,
    auth: Result<Auth, ApiError>,
    uri: OriginalUri,
) -> PageResult {
    let shell = gate(&state, auth, &uri, "DHCP leases", "leases").await?;
    let table = crate::api::dhcp::lease_table(&state);
    let mode = table.mode;
    let leases: Vec<LeaseRow> = table
        .leases
        .into_iter()
        .map(|l| LeaseRow {
            state: if l.active { l.state } else { "expired" },
            expires: Timestamp(i64::try_from(l.expires.saturating_mul(1000)).unwrap_or(i64::MAX))
                .to_string(),
            ip: l.ip,
            mac: l.mac,
            hostname: l.hostname,
            active: l.active,
        })
        .collect();
    let active = leases.iter().filter(|l| l.active).count();
    Ok(render(&LeasesPage {
        shell,
        mode,
        active,
        leases,
    }))
}

/// Run-time settings.
#[derive(Template)]
#[template(path = "web/settings.html")]
struct SettingsPage {
    shell: Shell,
    s: Settings,
    policies: Vec<&'static str>,
    /// `iscsi.iqn_prefix`, shown: the configuration sets it, not this page.
    iqn_prefix: String,
}

/// `GET /ui/settings`.
pub(super) async fn settings(
    State(state): State<AppState>,
    auth: Result<Auth, ApiError>,
    uri: OriginalUri,
) -> PageResult {
    let shell = gate(&state, auth, &uri, "Settings", "settings").await?;
    let s = blocking(&state, |s| s.get_settings()).await?;
    Ok(render(&SettingsPage {
        shell,
        s,
        policies: BootPolicy::ALL.iter().map(|p| p.as_str()).collect(),
        iqn_prefix: state.config().iscsi.iqn_prefix.clone(),
    }))
}

/// Users, tokens and the audit log.
#[derive(Template)]
#[template(path = "web/admin.html")]
struct AdminPage {
    shell: Shell,
    users: Vec<User>,
    tokens: Vec<TokenRow>,
    audit: Vec<AuditRow>,
    roles: Vec<&'static str>,
}

/// A token as shown.
pub(super) struct TokenRow {
    id: i64,
    name: String,
    owner: String,
    role: String,
    created_at: String,
    expires_at: String,
    last_used_at: String,
}

/// An audit entry as shown.
pub(super) struct AuditRow {
    at: String,
    actor: String,
    via: String,
    ip: String,
    action: String,
    target: String,
    detail: String,
}

impl From<&AuditEntry> for AuditRow {
    fn from(a: &AuditEntry) -> Self {
        Self {
            at: iso(Some(a.at)),
            actor: a.actor.clone(),
            via: a.via.clone(),
            ip: a.ip.clone().unwrap_or_default(),
            action: a.action.clone(),
            target: a.target.clone(),
            detail: if a.detail.is_null() {
                String::new()
            } else {
                a.detail.to_string()
            },
        }
    }
}

/// `GET /ui/admin` (administrators).
pub(super) async fn admin(
    State(state): State<AppState>,
    auth: Result<Auth, ApiError>,
    uri: OriginalUri,
) -> PageResult {
    let shell = gate(&state, auth, &uri, "Administration", "admin").await?;
    if !shell.is_admin {
        return Err(forbidden("administration"));
    }
    let (users, tokens, audit) = blocking(&state, |s| {
        Ok((
            s.list_users()?,
            s.list_tokens(None)?,
            s.list_audit(&AuditQuery {
                limit: 100,
                ..AuditQuery::default()
            })?,
        ))
    })
    .await?;
    Ok(render(&AdminPage {
        shell,
        users,
        tokens: tokens
            .iter()
            .map(|t| TokenRow {
                id: t.id,
                name: t.name.clone(),
                owner: t.owner.clone(),
                role: t.role.to_string(),
                created_at: iso(Some(t.created_at)),
                expires_at: iso(t.expires_at),
                last_used_at: iso(t.last_used_at),
            })
            .collect(),
        audit: audit.items.iter().map(AuditRow::from).collect(),
        roles: Role::ALL.iter().map(|r| r.as_str()).collect(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shell(role: Role) -> Shell {
        Shell {
            title: "<title>".into(),
            nav: "devices",
            username: "<b>admin</b>".into(),
            role,
            can_write: role.allows(Role::Operator),
            is_admin: role.allows(Role::Admin),
            assets: "/ui/static/0".into(),
            version: "0",
        }
    }

    const HOSTILE: &str = "<script>alert(1)</script>\"'&";

    fn hostile_row() -> DeviceRow {
        DeviceRow {
            mac: "52:54:00:12:34:56".into(),
            name: HOSTILE.into(),
            arch: "bios".into(),
            enabled: true,
            active: false,
            policy: "menu".into(),
            image: HOSTILE.into(),
            profile: String::new(),
            last_seen: String::new(),
            last_ip: "\"><img src=x onerror=alert(1)>".into(),
            rate: None,
        }
    }

    fn assert_escaped(html: &str) {
        assert!(
            !html.contains("<script>alert"),
            "raw script tag in:\n{html}"
        );
        assert!(
            !html.contains("<img src=x"),
            "raw attribute breakout in:\n{html}"
        );
        assert!(!html.contains("<b>admin</b>"), "raw user name in:\n{html}");
        assert!(
            html.contains("&#60;script&#62;alert(1)&#60;/script&#62;"),
            "no escaped name in:\n{html}"
        );
    }

    #[test]
    fn device_list_escapes_hostile_names() {
        let page = DevicesPage {
            shell: shell(Role::Operator),
            rate_source: "none",
            devices: vec![hostile_row()],
            total: 1,
            archs: vec!["bios"],
            policies: vec!["menu"],
            images: vec![HOSTILE.into()],
        };
        assert_escaped(&page.render().expect("renders"));
    }

    #[test]
    fn device_page_escapes_hostile_fields_and_events() {
        let page = DevicePage {
            shell: shell(Role::Admin),
            d: hostile_row(),
            notes: HOSTILE.into(),
            first_seen: String::new(),
            created_at: String::new(),
            policies: vec!["menu"],
            archs: vec!["bios"],
            images: vec![HOSTILE.into()],
            profiles: vec![],
            events: vec![EventRow {
                at: "2026-01-01T00:00:00Z".into(),
                mac: "52:54:00:12:34:56".into(),
                source: "api".into(),
                kind: "x".into(),
                detail: HOSTILE.into(),
                ip: String::new(),
            }],
            chart: Chart::per_hour(&[], Timestamp(0), 24),
            boot: None,
            logs: vec![(HOSTILE.into(), "x".into(), Size(1), String::new())],
            logs_folder: String::new(),
        };
        assert_escaped(&page.render().expect("renders"));
    }

    #[test]
    fn viewers_get_no_write_controls() {
        let page = DevicePage {
            shell: shell(Role::Viewer),
            d: hostile_row(),
            notes: String::new(),
            first_seen: String::new(),
            created_at: String::new(),
            policies: vec!["menu"],
            archs: vec!["bios"],
            images: vec![],
            profiles: vec![],
            events: vec![],
            chart: Chart::per_hour(&[], Timestamp(0), 24),
            boot: None,
            logs: vec![(HOSTILE.into(), "x".into(), Size(1), String::new())],
            logs_folder: String::new(),
        };
        let html = page.render().expect("renders");
        assert!(
            !html.contains("data-api"),
            "write control for a viewer:\n{html}"
        );
    }

    #[test]
    fn unknown_devices_escape_what_the_network_sent() {
        // The vendor class comes straight from a DHCP packet.
        let page = UnknownPage {
            shell: shell(Role::Operator),
            unknown: vec![UnknownRow {
                mac: "52:54:00:12:34:56".into(),
                arch: "bios".into(),
                vendor_class: HOSTILE.into(),
                last_ip: "\"><img src=x onerror=alert(1)>".into(),
                first_seen: String::new(),
                last_seen: String::new(),
                seen_count: 1,
            }],
            archs: vec!["bios"],
            policies: vec!["menu"],
            images: vec![HOSTILE.into()],
            profiles: vec![HOSTILE.into()],
        };
        let html = page.render().expect("renders");
        assert!(!html.contains("<script>alert"), "{html}");
        assert!(!html.contains("<img src=x"), "{html}");
    }

    #[test]
    fn audit_entries_are_escaped() {
        let page = AdminPage {
            shell: shell(Role::Admin),
            users: vec![],
            tokens: vec![],
            audit: vec![AuditRow {
                at: String::new(),
                actor: HOSTILE.into(),
                via: "session".into(),
                ip: String::new(),
                action: "device.update".into(),
                target: HOSTILE.into(),
                detail: serde_json::json!({ "name": HOSTILE }).to_string(),
            }],
            roles: vec!["viewer"],
        };
        assert_escaped(&page.render().expect("renders"));
    }
}
