//! Image management beyond the record: copy, rename, delete with the file, adoption of
//! orphan files, and the operations (copies) they start.
//!
//! Rename and delete are refused (409) while the image has a live iSCSI session (a
//! forced delete ends the sessions first) or while a copy reads or makes it. Every change
//! holds the image's target, so a login that completes meanwhile is dropped.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, Json, Query};
use super::inventory::check_name;
use super::{AppState, Auth, blocking};
use crate::service::images::{CopyError, ImageOps, Operation, image_path};
use crate::service::iscsi::{Hold, LiveSession, StoreTargets};
use crate::store::{Audit, ConflictReason, Image, Role, Store, StoreError};

/// How long a forced delete waits for the image's sessions to end.
const END_SESSIONS_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The new name of a copy or rename.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NameBody {
    /// The new image name (the rules of creation).
    pub name: String,
}

/// Query of `DELETE /api/v1/images/{name}`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(default, deny_unknown_fields)]
pub struct DeleteParams {
    /// End the image's live iSCSI sessions first, instead of refusing.
    pub force: bool,
}

/// Runs `f` on the blocking pool with the store, the image operations and the iSCSI
/// target.
async fn on_files<T, F>(state: &AppState, f: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce(&dyn Store, &Arc<ImageOps>, Option<&StoreTargets>) -> Result<T, ApiError>
        + Send
        + 'static,
{
    let store = state.store_arc();
    let ops = Arc::clone(state.image_ops());
    let iscsi = state.iscsi().cloned();
    tokio::task::spawn_blocking(move || f(store.as_ref(), &ops, iscsi.as_deref()))
        .await
        .map_err(ApiError::internal)?
}

/// A live iSCSI session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub(crate) struct SessionView {
    /// The initiator's iSCSI name.
    pub(crate) initiator: String,
    /// Its address and port.
    pub(crate) peer: String,
}

/// An image's live iSCSI sessions.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ImageSessions {
    /// Whether the iSCSI target runs.
    iscsi: bool,
    /// The image's target name, when it does.
    target: Option<String>,
    /// The sessions logged in to it now.
    sessions: Vec<SessionView>,
}

/// The live sessions on `image` (none while the iSCSI target does not run).
pub(crate) fn live_sessions(state: &AppState, image: &str) -> Vec<SessionView> {
    state.iscsi().map_or_else(Vec::new, |t| {
        t.sessions()
            .on(&t.target_name(image))
            .into_iter()
            .map(|s| SessionView {
                initiator: s.initiator,
                peer: s.peer.to_string(),
            })
            .collect()
    })
}

/// The image's live iSCSI sessions: which initiators are logged in to it now, from where.
#[utoipa::path(get, path = "/api/v1/images/{name}/sessions", tag = "images", params(("name" = String, Path)),
    responses((status = 200, body = ImageSessions), (status = 404)))]
pub(super) async fn image_sessions(
    State(state): State<AppState>,
    _auth: Auth,
    Path(name): Path<String>,
) -> Result<axum::Json<ImageSessions>, ApiError> {
    let n = name.clone();
    blocking(&state, move |s| s.get_image(&n)).await?;
    Ok(axum::Json(ImageSessions {
        iscsi: state.iscsi().is_some(),
        target: state.iscsi().map(|t| t.target_name(&name)),
        sessions: live_sessions(&state, &name),
    }))
}

fn sessions_text(live: &[LiveSession]) -> String {
    live.iter()
        .map(|s| format!("{} from {}", s.initiator, s.peer.ip()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Holds the image's target (no iSCSI: nothing to hold) and returns its live sessions.
fn hold(
    iscsi: Option<&StoreTargets>,
    image: &str,
) -> Result<(Option<Hold>, Vec<LiveSession>), ApiError> {
    let Some(t) = iscsi else {
        return Ok((None, Vec::new()));
    };
    let (hold, live) = t.sessions().hold(&t.target_name(image)).ok_or_else(|| {
        ApiError::conflict(format!(
            "image {image:?} is being changed by another request; try again"
        ))
    })?;
    Ok((Some(hold), live))
}

fn not_busy(ops: &ImageOps, image: &str) -> Result<(), ApiError> {
    match ops.busy(image) {
        Some(op) => Err(ApiError::conflict(format!(
            "image {image:?} is in use by copy operation {} ({} to {}); wait until it ends",
            op.id, op.image, op.target
        ))),
        None => Ok(()),
    }
}

/// Copies an image (operator): a reflink where the filesystem can, otherwise a sparse
/// background copy. Answers 202 with the operation; the new image appears (with
/// `cloned_from`) when the operation is `done`. A reflink is a point-in-time clone: a
/// source that initiators write to is copied crash-consistent. The sparse copy reads the
/// source over time, so what is written to it meanwhile may be partly in the copy: it is
/// consistent only when nothing writes to the source while it runs. The operation's note
/// says which, when the source had live sessions at the start.
#[utoipa::path(post, path = "/api/v1/images/{name}/copy", tag = "images", params(("name" = String, Path)),
    request_body = NameBody, responses((status = 202, body = Operation), (status = 404), (status = 409), (status = 422)))]
pub(super) async fn copy_image(
    State(state): State<AppState>,
    auth: Auth,
    Path(name): Path<String>,
    Json(body): Json<NameBody>,
) -> Result<
    (
        StatusCode,
        [(header::HeaderName, String); 1],
        axum::Json<Operation>,
    ),
    ApiError,
> {
    auth.require(Role::Operator)?;
    check_name("image", &body.name)?;
    let audit = auth.audit();
    let live = state
        .iscsi()
        .map_or(0, |t| t.sessions().on(&t.target_name(&name)).len());
    let store = state.store_arc();
    let ops = Arc::clone(state.image_ops());
    let op =
        tokio::task::spawn_blocking(move || ops.start_copy(store, audit, &name, &body.name, live))
            .await
            .map_err(ApiError::internal)?
            .map_err(|e| match e {
                CopyError::Store(e) => ApiError::from(e),
                CopyError::Conflict(m) => ApiError::conflict(m),
            })?;
    let location = format!("/api/v1/operations/{}", op.id);
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        axum::Json(op),
    ))
}

/// Renames an image and its file (operator; `rename(2)`); the device link stays.
/// Refused while the image has a live iSCSI session or a copy uses it.
#[utoipa::path(post, path = "/api/v1/images/{name}/rename", tag = "images", params(("name" = String, Path)),
    request_body = NameBody, responses((status = 200, body = Image), (status = 404), (status = 409), (status = 422)))]
pub(super) async fn rename_image(
    State(state): State<AppState>,
    auth: Auth,
    Path(name): Path<String>,
    Json(body): Json<NameBody>,
) -> Result<axum::Json<Image>, ApiError> {
    auth.require(Role::Operator)?;
    check_name("image", &body.name)?;
    let a = auth.audit();
    let img = on_files(&state, move |store, ops, iscsi| {
        let _files = ops.lock_files();
        store.get_image(&name)?;
        let new = body.name;
        if new == name {
            return Err(ApiError::conflict(format!("image {name:?} has that name already")));
        }
        not_busy(ops, &name)?;
        not_busy(ops, &new)?;
        let (_hold, live) = hold(iscsi, &name)?;
        if !live.is_empty() {
            return Err(ApiError::conflict(format!(
                "image {name:?} has {} live iSCSI session(s) ({}); log them out first",
                live.len(),
                sessions_text(&live)
            )));
        }
        let (from, to) = (image_path(ops.dir(), &name), image_path(ops.dir(), &new));
        if to.symlink_metadata().is_ok() {
            return Err(ApiError::conflict(format!(
                "a file {new}.img exists in the images directory without a record; adopt or remove it first"
            )));
        }
        let moved = match std::fs::rename(&from, &to) {
            Ok(()) => true,
            // No file yet: the first login creates it under the new name.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(ApiError::internal(format!("renaming {}: {e}", from.display()))),
        };
        match store.rename_image(&a, &name, &new) {
            Ok(img) => {
                if let Some(t) = iscsi {
                    t.forget(&name);
                }
                Ok(img)
            }
            Err(e) => {
                if moved && let Err(back) = std::fs::rename(&to, &from) {
                    tracing::error!(error = %back, image = %name, "renaming the image file back failed");
                }
                Err(e.into())
            }
        }
    })
    .await?;
    Ok(axum::Json(img))
}

/// Deletes an image record and its file (operator). Refused while a device links it or
/// a copy uses it, and while it has live iSCSI sessions unless `force=true`, which ends
/// them first (the initiators see their connection drop).
#[utoipa::path(delete, path = "/api/v1/images/{name}", tag = "images", params(("name" = String, Path), DeleteParams),
    responses((status = 204), (status = 404), (status = 409)))]
pub(super) async fn delete_image(
    State(state): State<AppState>,
    auth: Auth,
    Path(name): Path<String>,
    Query(q): Query<DeleteParams>,
) -> Result<StatusCode, ApiError> {
    auth.require(Role::Operator)?;
    let a = auth.audit();
    on_files(&state, move |store, ops, iscsi| {
        let _files = ops.lock_files();
        let img = store.get_image(&name)?;
        if let Some(mac) = img.linked_mac {
            return Err(StoreError::Conflict(ConflictReason::InUse {
                kind: "image",
                key: name,
                by: mac.to_string(),
            })
            .into());
        }
        not_busy(ops, &name)?;
        let (_hold, live) = hold(iscsi, &name)?;
        if !live.is_empty() {
            if !q.force {
                return Err(ApiError::conflict(format!(
                    "image {name:?} has {} live iSCSI session(s) ({}); log them out, or delete with ?force=true to end them",
                    live.len(),
                    sessions_text(&live)
                )));
            }
            if let Some(t) = iscsi {
                end_sessions(store, &a, t, &name, &live)?;
            }
        }
        store.delete_image(&a, &name)?;
        if let Some(t) = iscsi {
            t.forget(&name);
        }
        let path = image_path(ops.dir(), &name);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ApiError::internal(format!(
                "the record of {name:?} is deleted, but not its file {}: {e}",
                path.display()
            ))),
        }
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Ends the image's sessions for a forced delete, with an audit entry naming them.
fn end_sessions(
    store: &dyn Store,
    a: &Audit,
    t: &StoreTargets,
    name: &str,
    live: &[LiveSession],
) -> Result<(), ApiError> {
    let target = t.target_name(name);
    if !t.sessions().end(&target, END_SESSIONS_WAIT) {
        return Err(ApiError::conflict(format!(
            "the iSCSI sessions of {name:?} did not end within {} s; nothing was deleted",
            END_SESSIONS_WAIT.as_secs()
        )));
    }
    let detail = serde_json::json!({
        "target": target,
        "sessions": live.iter().map(|s| serde_json::json!({
            "initiator": s.initiator, "peer": s.peer.to_string()
        })).collect::<Vec<_>>(),
    });
    store.record_audit(a, "image.end_sessions", name, &detail)?;
    Ok(())
}

/// Records every `*.img` file in the images directory that has no record (operator);
/// the size comes from the file. Start-up does the same. Answers the adopted images.
#[utoipa::path(post, path = "/api/v1/images/adopt", tag = "images",
    responses((status = 200, body = Vec<Image>)))]
pub(super) async fn adopt_images(
    State(state): State<AppState>,
    auth: Auth,
) -> Result<axum::Json<Vec<Image>>, ApiError> {
    auth.require(Role::Operator)?;
    let a = auth.audit();
    let adopted = on_files(&state, move |store, ops, _| Ok(ops.adopt(store, &a)?)).await?;
    Ok(axum::Json(adopted))
}

/// Image operations (copies), running and the last finished ones, newest first.
#[utoipa::path(get, path = "/api/v1/operations", tag = "images",
    responses((status = 200, body = Vec<Operation>)))]
pub(super) async fn list_operations(
    State(state): State<AppState>,
    _auth: Auth,
) -> axum::Json<Vec<Operation>> {
    axum::Json(state.image_ops().list())
}

/// One image operation: state, bytes done and total.
#[utoipa::path(get, path = "/api/v1/operations/{id}", tag = "images", params(("id" = u64, Path)),
    responses((status = 200, body = Operation), (status = 404)))]
pub(super) async fn get_operation(
    State(state): State<AppState>,
    _auth: Auth,
    Path(id): Path<u64>,
) -> Result<axum::Json<Operation>, ApiError> {
    state
        .image_ops()
        .get(id)
        .map(axum::Json)
        .ok_or_else(|| ApiError::not_found(format!("operation {id} not found")))
}
