//! A device's installer logs (WinPE's `setupact.log`, `setuperr.log`, ...): the files in
//! `paths.logs/<aa-bb-cc-dd-ee-ff>/`, listed and downloaded under a login.
//!
//! netbootd itself does not write there yet (the WinPE upload belongs to the Windows boot
//! flow); whatever puts a device's logs in its folder makes them visible here. Names are
//! plain file names: no `/`, no leading `.`; the folder is jailed.

use std::io::Read as _;
use std::path::PathBuf;

use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use super::error::ApiError;
use super::folders::modified;
use super::inventory::parse_mac;
use super::{AppState, Auth};
use crate::jail;
use crate::mac::MacAddr;
use crate::time::Timestamp;

/// Largest log shown or downloaded: 64 MiB.
const MAX_LOG_BYTES: u64 = 64 << 20;

/// One log file of a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub(crate) struct LogFile {
    /// File name.
    pub(crate) name: String,
    /// Size.
    pub(crate) size_bytes: u64,
    /// Last modification.
    #[schema(value_type = Option<String>)]
    pub(crate) modified_at: Option<Timestamp>,
}

/// The name of `mac`'s log folder: `aa-bb-cc-dd-ee-ff`.
pub(crate) fn folder_name(mac: MacAddr) -> String {
    mac.to_hexhyp()
}

/// The folder of `mac`'s logs under `paths.logs`.
fn folder(state: &AppState, mac: MacAddr) -> PathBuf {
    state.paths().logs.join(folder_name(mac))
}

fn plain(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && !name.contains(['/', '\\'])
        && !name.chars().any(char::is_control)
}

/// `mac`'s log files, newest first (blocking); none when its folder does not exist.
pub(crate) fn list(state: &AppState, mac: MacAddr) -> Vec<LogFile> {
    let Ok(dir) = std::fs::read_dir(folder(state, mac)) else {
        return Vec::new();
    };
    let mut out: Vec<LogFile> = dir
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str().filter(|n| plain(n))?.to_owned();
            // Regular files only: a symlink could point anywhere.
            let meta = e.metadata().ok().filter(std::fs::Metadata::is_file)?;
            Some(LogFile {
                name,
                size_bytes: meta.len(),
                modified_at: modified(&meta),
            })
        })
        .collect();
    out.sort_by(|a, b| {
        b.modified_at
            .cmp(&a.modified_at)
            .then_with(|| a.name.cmp(&b.name))
    });
    out
}

/// The device's installer logs (WinPE's setupact.log and the like), newest first.
#[utoipa::path(get, path = "/api/v1/devices/{mac}/logs", tag = "devices",
    params(("mac" = String, Path)), responses((status = 200, body = Vec<LogFile>), (status = 400)))]
pub(super) async fn list_logs(
    State(state): State<AppState>,
    _auth: Auth,
    Path(mac): Path<String>,
) -> Result<axum::Json<Vec<LogFile>>, ApiError> {
    let mac = parse_mac(&mac)?;
    let logs = tokio::task::spawn_blocking(move || list(&state, mac))
        .await
        .map_err(ApiError::internal)?;
    Ok(axum::Json(logs))
}

/// One of the device's installer logs, as text.
#[utoipa::path(get, path = "/api/v1/devices/{mac}/logs/{name}", tag = "devices",
    params(("mac" = String, Path), ("name" = String, Path)),
    responses((status = 200, content_type = "text/plain"), (status = 404), (status = 422)))]
pub(super) async fn get_log(
    State(state): State<AppState>,
    _auth: Auth,
    Path((mac, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let mac = parse_mac(&mac)?;
    if !plain(&name) {
        return Err(ApiError::unprocessable(
            "log names are plain file names, not starting with '.'",
        ));
    }
    let dir = folder(&state, mac);
    let n = name.clone();
    let body = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, ApiError> {
        let missing = || ApiError::not_found(format!("no log {n:?} for this device"));
        let (_, mut file, meta) = jail::open(&dir, &n).map_err(|_| missing())?;
        // Only the folder's own files, not what a symlink in it points to.
        if std::fs::symlink_metadata(dir.join(&n))
            .map_err(|_| missing())?
            .is_symlink()
        {
            return Err(missing());
        }
        if meta.len() > MAX_LOG_BYTES {
            return Err(ApiError::unprocessable("the log is larger than 64 MiB"));
        }
        let mut body = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
        file.read_to_end(&mut body).map_err(ApiError::internal)?;
        Ok(body)
    })
    .await
    .map_err(ApiError::internal)??;
    let disposition = format!(
        "attachment; filename=\"{}-{}\"",
        mac.to_hexraw(),
        name.chars()
            .map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            })
            .collect::<String>()
    );
    Ok((
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8".to_owned()),
            (header::CONTENT_DISPOSITION, disposition),
        ],
        body,
    )
        .into_response())
}
