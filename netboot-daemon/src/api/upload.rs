//! Streamed upload of installer media into the installers directory.
//!
//! The body goes to a hidden temporary file beside the target, and only a complete upload
//! is linked to its final name (never over an existing file); the media are then
//! recorded as an installer. The path is jailed like every other installer path.

use std::path::{Path as FsPath, PathBuf};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use futures_util::StreamExt as _;
use serde::Deserialize;
use tokio::io::AsyncWriteExt as _;
use utoipa::IntoParams;

use super::error::{ApiError, Query};
use super::{AppState, Auth, blocking};
use crate::jail::{self, JailError};
use crate::store::{Arch, Installer, InstallerKind, NewInstaller, Role};

/// Largest upload accepted: 64 GiB.
const MAX_UPLOAD_BYTES: u64 = 64 << 30;

/// Metadata of an uploaded installer.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub(super) struct UploadParams {
    /// Kind of media.
    kind: InstallerKind,
    /// Display name; defaults to the file name.
    #[serde(default)]
    name: Option<String>,
    /// Firmware it is for.
    #[serde(default)]
    arch: Option<Arch>,
}

/// Where an upload goes: its final path and its temporary file.
struct Target {
    rel: String,
    path: PathBuf,
    temp: PathBuf,
}

/// Resolves the upload path inside the installers directory: the parent must exist inside
/// it, the file must not, and the file name is plain (not hidden).
fn target(root: &FsPath, raw: &str) -> Result<Target, ApiError> {
    let refuse = |e: JailError| {
        ApiError::unprocessable(format!("path {raw:?}: {e} in the installers directory"))
    };
    let rel = jail::normalise(raw).map_err(refuse)?;
    let (parent, file) = rel.rsplit_once('/').unwrap_or(("", rel.as_str()));
    if file.starts_with('.') || file.chars().any(char::is_control) {
        return Err(ApiError::unprocessable(
            "file names must not start with '.' or contain control characters",
        ));
    }
    let root = root.canonicalize().map_err(ApiError::internal)?;
    let dir = if parent.is_empty() {
        root
    } else {
        jail::resolve_in(&root, parent).map_err(refuse)?
    };
    if !dir.is_dir() {
        return Err(ApiError::unprocessable(format!(
            "path {raw:?}: the folder does not exist in the installers directory"
        )));
    }
    let path = dir.join(file);
    if path.symlink_metadata().is_ok() {
        return Err(ApiError::conflict(format!("{rel:?} exists already")));
    }
    let temp = dir.join(format!(
        ".{file}.{}.upload",
        hex::encode(rand::random::<[u8; 8]>())
    ));
    Ok(Target { rel, path, temp })
}

/// Writes the body to `temp`, at most [`MAX_UPLOAD_BYTES`]; returns the size.
async fn write_body(temp: &FsPath, body: Body) -> Result<u64, ApiError> {
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(temp)
        .await
        .map_err(ApiError::internal)?;
    let mut stream = body.into_data_stream();
    let mut size = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::bad_request(format!("upload aborted: {e}")))?;
        size += chunk.len() as u64;
        if size > MAX_UPLOAD_BYTES {
            return Err(ApiError::unprocessable("uploads are at most 64 GiB"));
        }
        file.write_all(&chunk).await.map_err(ApiError::internal)?;
    }
    file.sync_all().await.map_err(ApiError::internal)?;
    Ok(size)
}

/// Uploads installer media (operator): the request body is the file, streamed to disk.
/// The file appears under its name only when complete, and is then recorded as an
/// installer.
#[utoipa::path(put, path = "/api/v1/installers/files/{path}", tag = "installers",
    params(("path" = String, Path, description = "Path relative to the installers directory; its folder must exist"), UploadParams),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 201, body = Installer), (status = 409, description = "the file exists"), (status = 422)))]
pub(super) async fn upload_installer(
    State(state): State<AppState>,
    auth: Auth,
    Path(raw): Path<String>,
    Query(p): Query<UploadParams>,
    body: Body,
) -> Result<(StatusCode, axum::Json<Installer>), ApiError> {
    auth.require(Role::Operator)?;
    if let Some(n) = &p.name
        && (n.chars().count() > 200 || n.chars().any(char::is_control))
    {
        return Err(ApiError::unprocessable(
            "name: at most 200 characters, no control characters",
        ));
    }
    let root = state.paths().installers.clone();
    let t = tokio::task::spawn_blocking(move || target(&root, &raw))
        .await
        .map_err(ApiError::internal)??;
    let written = write_body(&t.temp, body).await;
    // A hard link never replaces an existing file, unlike rename.
    let linked = match written {
        Ok(size) => tokio::fs::hard_link(&t.temp, &t.path)
            .await
            .map(|()| size)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    ApiError::conflict(format!("{:?} exists already", t.rel))
                } else {
                    ApiError::internal(e)
                }
            }),
        Err(e) => Err(e),
    };
    if let Err(error) = tokio::fs::remove_file(&t.temp).await {
        tracing::warn!(%error, "removing an upload's temporary file failed");
    }
    let size = linked?;
    tracing::info!(path = %t.rel, size, user = %auth.username, "installer uploaded");
    let new = NewInstaller {
        path: t.rel,
        name: p.name,
        kind: p.kind,
        arch: p.arch,
        description: String::new(),
        size_bytes: size,
    };
    let a = auth.audit();
    Ok((
        StatusCode::CREATED,
        axum::Json(blocking(&state, move |s| s.create_installer(&a, &new)).await?),
    ))
}
