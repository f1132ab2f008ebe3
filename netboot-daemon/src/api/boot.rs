//! What booting clients fetch over HTTP: the iPXE bootstrap and device scripts, and the
//! installer files (kernels, initrds, ISOs, WinPE) with HEAD and byte ranges.
//!
//! These routes are open: firmware cannot log in. They only read, except that a request
//! is recorded as a sighting and a boot event of the client that made it.

use std::io::SeekFrom;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get};
use serde::Deserialize;
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};

use super::auth::ClientIp;
use super::error::{ApiError, Query};
use super::inventory::parse_mac;
use super::{AppState, VERSION, blocking};
use crate::bindings::Source as BindingSource;
use crate::boot::ipxe::{self, Plan};
use crate::jail::{self, JailError};
use crate::mac::MacAddr;
use crate::store::{EventSource, NewBootEvent, Sighting, StoreError};
use crate::time::Timestamp;

/// `http://host[:port]` as the client addressed us, and the bare host for other services.
fn base_url(state: &AppState, headers: &HeaderMap) -> (String, String) {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            !h.is_empty()
                && h.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '-' | '[' | ']'))
        })
        .map(str::to_owned)
        .unwrap_or_else(|| {
            let ip = state
                .config()
                .boot_server_ip
                .unwrap_or(IpAddr::from([127, 0, 0, 1]));
            // IPv6 in brackets.
            SocketAddr::new(ip, state.config().http.listen.port()).to_string()
        });
    let bare = match host.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) && !h.ends_with(':') => {
            h.to_owned()
        }
        _ => host.clone(),
    };
    let iscsi_host = state
        .config()
        .boot_server_ip
        .map_or(bare, |ip| ip.to_string());
    (format!("http://{host}"), iscsi_host)
}

fn script(body: String) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/plain; charset=us-ascii"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

/// The first script iPXE fetches: it chains to the device script with the client's MAC.
pub(super) async fn bootstrap(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let (base, _) = base_url(&state, &headers);
    script(ipxe::bootstrap_script(&base))
}

/// Facts iPXE reports about itself.
#[derive(Debug, Deserialize)]
pub(super) struct DeviceParams {
    mac: String,
    #[serde(default)]
    platform: Option<String>,
    #[serde(default)]
    arch: Option<String>,
}

/// The script of one client, following its device's boot policy.
pub(super) async fn device_script(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    Query(p): Query<DeviceParams>,
) -> Result<Response, ApiError> {
    let mac = parse_mac(&p.mac)?;
    let platform = p.platform.unwrap_or_default();
    let arch = ipxe::arch_from_ipxe(&platform, p.arch.as_deref().unwrap_or_default());
    let efi = platform == "efi";
    let (base, iscsi_host) = base_url(&state, &headers);
    if let Some(addr) = ip.as_deref().and_then(|i| i.parse().ok()) {
        state
            .bindings()
            .learn(addr, mac, BindingSource::Http, Timestamp::now());
    }
    let (device, profile, settings, profiles, chap) = blocking(&state, move |s| {
        let now = Timestamp::now();
        s.record_sighting(&Sighting {
            mac,
            at: now,
            arch,
            ip: ip.clone(),
            vendor_class: None,
        })?;
        let device = match s.get_device(mac) {
            Ok(d) => Some(d),
            Err(StoreError::NotFound { .. }) => None,
            Err(e) => return Err(e),
        };
        let profile = match device.as_ref().and_then(|d| d.profile.clone()) {
            Some(name) => Some(s.get_profile(&name)?),
            None => None,
        };
        let settings = s.get_settings()?;
        let chap = match &device {
            Some(d) if d.image.is_some() => s.device_chap(mac)?,
            _ => None,
        };
        let detail = match &device {
            Some(d) => format!(
                "iPXE script ({} firmware), policy {}",
                if efi { "EFI" } else { "BIOS" },
                d.boot_policy
            ),
            None => "iPXE script for an unregistered client".to_owned(),
        };
        let ev = NewBootEvent {
            mac,
            at: now,
            source: EventSource::Http,
            kind: "ipxe_script".into(),
            detail,
            ip,
        };
        s.add_event(&ev)?;
        // The installers browser: for devices, and for unregistered clients that may
        // register from the console.
        let browse = device.is_some() || settings.allow_console_registration;
        let profiles = if browse {
            s.list_profiles()?
        } else {
            Vec::new()
        };
        Ok((device, profile, settings, profiles, chap))
    })
    .await?;
    let token =
        (device.is_none() && settings.allow_console_registration).then(|| registration_token(mac));
    let plan = Plan {
        base: &base,
        mac,
        device: device.as_ref(),
        profile: profile.as_ref(),
        iscsi_host: &iscsi_host,
        chap: chap.as_ref(),
        settings: &settings,
        iqn_prefix: &state.config().iscsi.iqn_prefix,
        efi,
        version: VERSION,
        registration: token.as_deref(),
        profiles: &profiles,
    };
    Ok(script(ipxe::device_script(&plan)))
}

/// The token an unregistered client's registration request must carry: a keyed hash of
/// its MAC under a key drawn when netbootd starts. Only the script served to that MAC
/// holds it, so a web page cannot make a browser register devices behind the operator's
/// back, and a client cannot register another MAC.
fn registration_token(mac: MacAddr) -> String {
    use sha2::{Digest as _, Sha256};
    static KEY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let key = KEY.get_or_init(crate::auth::new_secret);
    let mut h = Sha256::new();
    h.update(key.as_bytes());
    h.update(mac.0);
    hex::encode(&h.finalize()[..16])
}

/// What the console registration sends (typed at the iPXE prompt).
#[derive(Debug, Deserialize)]
pub(super) struct RegisterParams {
    mac: String,
    token: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    platform: Option<String>,
    /// Size of a new iSCSI disk to create and link, GiB; absent or empty for none.
    #[serde(default)]
    disk_gib: Option<String>,
}

/// Largest disk the console may create, GiB.
const CONSOLE_DISK_MAX_GIB: u64 = 16 * 1024;

/// Registers an unknown client from its boot console, when the settings allow it: a
/// device with the default boot policy, or with a new sparse iSCSI disk linked (policy
/// `iscsi`). Answers with a script that says what happened and chains to the client's
/// new script. Audited as `console`.
pub(super) async fn register(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    Query(p): Query<RegisterParams>,
) -> Result<Response, ApiError> {
    let mac = parse_mac(&p.mac)?;
    let (base, _) = base_url(&state, &headers);
    let back = |msg: &str| script(ipxe::registration_answer(&base, msg));
    if p.token != registration_token(mac) {
        return Err(ApiError::forbidden(
            "not a registration token for this MAC: use the boot menu netbootd served to it",
        ));
    }
    let name = p.name.trim().to_owned();
    let disk_gib = match p.disk_gib.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(g) => match g.parse::<u64>() {
            Ok(n) if (1..=CONSOLE_DISK_MAX_GIB).contains(&n) => Some(n),
            _ => {
                return Ok(back(&format!(
                    "Registration refused: the disk size must be 1 to {CONSOLE_DISK_MAX_GIB} GiB."
                )));
            }
        },
    };
    let arch = ipxe::arch_from_ipxe(p.platform.as_deref().unwrap_or_default(), "");
    let audit = crate::store::Audit {
        actor: "console".into(),
        via: "boot console".into(),
        ip: ip.clone(),
    };
    let outcome = blocking(&state, move |s| {
        let settings = s.get_settings()?;
        if !settings.allow_console_registration {
            return Ok(Err(
                "Registration from the console is off (settings: allow_console_registration)."
                    .to_owned(),
            ));
        }
        if s.get_device(mac).is_ok() {
            return Ok(Err("This client is registered already.".to_owned()));
        }
        let device_name = if name.is_empty() {
            format!("pxe-{}", mac.to_hexraw())
        } else {
            name.chars().filter(|c| !c.is_control()).take(100).collect()
        };
        let image = match disk_gib {
            Some(gib) => {
                let image_name = format!("disk-{}", mac.to_hexraw());
                s.create_image(
                    &audit,
                    &crate::store::NewImage {
                        name: image_name.clone(),
                        size_bytes: gib << 30,
                        description: format!("created from the boot console of {mac}"),
                        cloned_from: None,
                    },
                )?;
                Some(image_name)
            }
            None => None,
        };
        let boot_policy = if image.is_some() {
            Some(crate::store::BootPolicy::Iscsi)
        } else {
            Some(settings.default_boot_policy)
        };
        let device = s.create_device(
            &audit,
            &crate::store::NewDevice {
                mac,
                name: Some(device_name),
                arch,
                enabled: Some(true),
                boot_policy,
                image,
                profile: None,
                notes: Some("registered from the boot console".into()),
                initiators: None,
            },
        )?;
        Ok(Ok(device))
    })
    .await?;
    Ok(match outcome {
        Ok(d) => back(&format!(
            "Registered as {}{}.",
            d.name,
            d.image
                .as_deref()
                .map(|i| format!(" with the iSCSI disk {i}"))
                .unwrap_or_default()
        )),
        Err(why) => back(&why),
    })
}

/// The MAC a file request may carry (added by the generated scripts).
#[derive(Debug, Default, Deserialize)]
pub(super) struct FileParams {
    #[serde(default)]
    mac: Option<String>,
}

fn content_type(path: &Path) -> &'static str {
    match path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("iso") => "application/x-iso9660-image",
        Some("efi") => "application/efi",
        Some("ipxe" | "txt" | "cfg" | "cmd" | "ini" | "sh" | "ks" | "seed") => {
            "text/plain; charset=utf-8"
        }
        Some("xml") => "application/xml",
        Some("json") => "application/json",
        Some("gz" | "tgz") => "application/gzip",
        Some("xz") => "application/x-xz",
        _ => "application/octet-stream",
    }
}

/// A single byte range of a file of `size` bytes (RFC 9110 §14.1.2). `Ok(None)` means
/// the header is absent or not one we honour (several ranges): send the whole file.
fn parse_range(headers: &HeaderMap, size: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(v) = headers.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return Ok(None);
    };
    let Some(spec) = v.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let (a, b) = spec.split_once('-').ok_or(())?;
    let (a, b) = (a.trim(), b.trim());
    let range = if a.is_empty() {
        let n: u64 = b.parse().map_err(|_| ())?;
        if n == 0 || size == 0 {
            return Err(());
        }
        (size.saturating_sub(n), size - 1)
    } else {
        let start: u64 = a.parse().map_err(|_| ())?;
        let end = if b.is_empty() {
            size.saturating_sub(1)
        } else {
            b.parse::<u64>()
                .map_err(|_| ())?
                .min(size.saturating_sub(1))
        };
        if start >= size || end < start {
            return Err(());
        }
        (start, end)
    };
    Ok(Some(range))
}

/// The directories served over HTTP.
#[derive(Debug, Clone, Copy)]
pub(super) enum FileRoot {
    /// Installer media: kernels, initrds, ISOs, WinPE.
    Installers,
    /// The TFTP root (UEFI HTTP Boot fetches iPXE this way).
    Tftp,
}

/// The route serving the files under `root`, with `Range` and `HEAD`.
pub(super) fn file_route(root: FileRoot) -> MethodRouter<AppState> {
    get(
        move |State(state): State<AppState>,
              method: Method,
              ip: ClientIp,
              UrlPath(path): UrlPath<String>,
              Query(p): Query<FileParams>,
              headers: HeaderMap| async move {
            let dir = match root {
                FileRoot::Installers => state.paths().installers.clone(),
                FileRoot::Tftp => state.paths().tftp.clone(),
            };
            // A HEAD (iPXE's sanboot asks for the size first) is not a download.
            let record = method != Method::HEAD;
            serve_file(&state, dir, path, p, ip, &headers, record).await
        },
    )
}

async fn serve_file(
    state: &AppState,
    root: PathBuf,
    path: String,
    p: FileParams,
    ClientIp(ip): ClientIp,
    headers: &HeaderMap,
    record: bool,
) -> Result<Response, ApiError> {
    let opened = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || jail::open(&root, &path))
            .await
            .map_err(ApiError::internal)?
    };
    let (full, file, meta) = match opened {
        Ok(f) => f,
        Err(JailError::NotFound | JailError::NotAFile) => {
            return Err(ApiError::not_found("no such file"));
        }
        Err(_) => return Err(ApiError::forbidden("path outside the served directory")),
    };
    let mut file = tokio::fs::File::from_std(file);
    let size = meta.len();
    let Ok(range) = parse_range(headers, size) else {
        let mut res = StatusCode::RANGE_NOT_SATISFIABLE.into_response();
        if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
            res.headers_mut().insert(header::CONTENT_RANGE, v);
        }
        return Ok(res);
    };

    // The first request of a download goes on the device's timeline (not every range of
    // an ISO that iPXE reads block by block), without holding up the download; the MAC it
    // carries binds the client's address.
    let mac = p.mac.as_deref().and_then(|m| m.parse::<MacAddr>().ok());
    if let Some(mac) = mac.filter(|_| record && range.is_none_or(|(start, _)| start == 0)) {
        if let Some(addr) = ip.as_deref().and_then(|i| i.parse().ok()) {
            state
                .bindings()
                .learn(addr, mac, BindingSource::Http, Timestamp::now());
        }
        let ev = NewBootEvent {
            mac,
            at: Timestamp::now(),
            source: EventSource::Http,
            kind: "http_file".into(),
            detail: format!("HTTP {path} ({size} bytes)"),
            ip,
        };
        let state = state.clone();
        tokio::spawn(async move {
            if let Err(e) = blocking(&state, move |s| s.add_event(&ev)).await {
                tracing::warn!(status = %e.status(), "recording a file download failed");
            }
        });
    }
    let (status, start, len) = match range {
        Some((a, b)) => (StatusCode::PARTIAL_CONTENT, a, b - a + 1),
        None => (StatusCode::OK, 0, size),
    };
    if start > 0 {
        file.seek(SeekFrom::Start(start))
            .await
            .map_err(ApiError::internal)?;
    }
    let body = Body::from_stream(tokio_util::io::ReaderStream::with_capacity(
        file.take(len),
        256 * 1024,
    ));
    let mut res = Response::new(body);
    *res.status_mut() = status;
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(content_type(&full)),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if let Some(v) =
        range.and_then(|(a, b)| HeaderValue::from_str(&format!("bytes {a}-{b}/{size}")).ok())
    {
        h.insert(header::CONTENT_RANGE, v);
    }
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(v: &str, size: u64) -> Result<Option<(u64, u64)>, ()> {
        let mut h = HeaderMap::new();
        h.insert(header::RANGE, HeaderValue::from_str(v).expect("ascii"));
        parse_range(&h, size)
    }

    #[test]
    fn ranges() {
        assert_eq!(range("bytes=0-99", 1000), Ok(Some((0, 99))));
        assert_eq!(range("bytes=900-", 1000), Ok(Some((900, 999))));
        assert_eq!(range("bytes=-100", 1000), Ok(Some((900, 999))));
        assert_eq!(range("bytes=0-5000", 1000), Ok(Some((0, 999))));
        assert_eq!(range("bytes=1000-", 1000), Err(()));
        assert_eq!(range("bytes=5-4", 1000), Err(()));
        assert_eq!(range("bytes=a-b", 1000), Err(()));
        assert_eq!(range("bytes=0-1,5-6", 1000), Ok(None));
        assert_eq!(range("items=0-1", 1000), Ok(None));
        assert_eq!(parse_range(&HeaderMap::new(), 1000), Ok(None));
    }
}
