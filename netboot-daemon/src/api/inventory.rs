//! Devices, unknown devices, images, installers and boot profiles.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Deserialize;
use utoipa::IntoParams;

use super::error::{ApiError, Json, Query};
use super::{AppState, Auth, blocking};
use crate::jail::{self, JailError};
use crate::mac::MacAddr;
use crate::store::{
    BootProfile, Device, DevicePatch, DeviceQuery, DeviceSort, Image, ImagePatch, Installer,
    InstallerPatch, NewDevice, NewImage, NewInstaller, NewProfile, Page, PageQuery, ProfilePatch,
    Role, UnknownDevice,
};

/// Parses a MAC from a path segment.
pub(super) fn parse_mac(s: &str) -> Result<MacAddr, ApiError> {
    s.parse()
        .map_err(|e| ApiError::bad_request(format!("{s:?} is not a MAC address: {e}")))
}

/// Checks an image or profile name: 1-64 of letters, digits, `.`, `_`, `-`, not starting
/// with `.` or `-` (it becomes a file name and part of an IQN); `adopt` is reserved.
pub(super) fn check_name(what: &str, name: &str) -> Result<(), ApiError> {
    use crate::service::images::{plain_name, valid_name};
    if what == "image" && name == "adopt" {
        return Err(ApiError::unprocessable(
            "\"adopt\" is reserved (POST /api/v1/images/adopt)",
        ));
    }
    if plain_name(name) && (what != "image" || valid_name(name)) {
        Ok(())
    } else {
        Err(ApiError::unprocessable(format!(
            "{what} names are 1-64 letters, digits, '.', '_' or '-', not starting with '.' or '-'"
        )))
    }
}

fn check_text(what: &str, s: &str, max: usize) -> Result<(), ApiError> {
    if s.chars().count() > max || s.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
        return Err(ApiError::unprocessable(format!(
            "{what}: at most {max} characters, no control characters"
        )));
    }
    Ok(())
}

fn check_device_fields(name: Option<&str>, notes: Option<&str>) -> Result<(), ApiError> {
    if let Some(n) = name {
        check_text("name", n, 100)?;
    }
    if let Some(n) = notes {
        check_text("notes", n, 4000)?;
    }
    Ok(())
}

/// A device's initiator names as the store keeps them (checked and case-folded), or 422.
fn check_initiators(names: Option<&[String]>) -> Result<Option<Vec<String>>, ApiError> {
    names
        .map(crate::store::initiator_names)
        .transpose()
        .map_err(|e| ApiError::unprocessable(format!("initiators: {e}")))
}

/// Query of the device list.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(default, deny_unknown_fields)]
pub struct DeviceListParams {
    /// Substring of name, MAC, notes, image or last IP.
    pub search: Option<String>,
    /// Only enabled (`true`) or disabled (`false`) devices.
    pub enabled: Option<bool>,
    /// `name` (default), `mac`, `last_seen` or `created_at`.
    pub sort: Option<DeviceSort>,
    /// `asc` (default) or `desc`.
    pub order: Option<String>,
    /// Page size, 1-1000 (default 100).
    pub limit: Option<u32>,
    /// Records to skip.
    pub offset: Option<u32>,
}

/// Lists devices.
#[utoipa::path(get, path = "/api/v1/devices", tag = "devices", params(DeviceListParams),
    responses((status = 200, body = Page<Device>)))]
pub(super) async fn list_devices(
    State(state): State<AppState>,
    _auth: Auth,
    Query(p): Query<DeviceListParams>,
) -> Result<axum::Json<Page<Device>>, ApiError> {
    let desc = match p.order.as_deref() {
        None | Some("asc") => false,
        Some("desc") => true,
        Some(o) => {
            return Err(ApiError::bad_request(format!(
                "order must be asc or desc, not {o:?}"
            )));
        }
    };
    let q = DeviceQuery {
        search: p.search,
        enabled: p.enabled,
        sort: p.sort.unwrap_or_default(),
        desc,
        page: PageQuery {
            limit: p.limit.unwrap_or(100),
            offset: p.offset.unwrap_or(0),
        },
    };
    Ok(axum::Json(
        blocking(&state, move |s| s.list_devices(&q)).await?,
    ))
}

/// One device.
#[utoipa::path(get, path = "/api/v1/devices/{mac}", tag = "devices", params(("mac" = String, Path)),
    responses((status = 200, body = Device), (status = 404)))]
pub(super) async fn get_device(
    State(state): State<AppState>,
    _auth: Auth,
    Path(mac): Path<String>,
) -> Result<axum::Json<Device>, ApiError> {
    let mac = parse_mac(&mac)?;
    Ok(axum::Json(
        blocking(&state, move |s| s.get_device(mac)).await?,
    ))
}

/// Registers a device (operator).
#[utoipa::path(post, path = "/api/v1/devices", tag = "devices", request_body = NewDevice,
    responses((status = 201, body = Device), (status = 409)))]
pub(super) async fn create_device(
    State(state): State<AppState>,
    auth: Auth,
    Json(mut new): Json<NewDevice>,
) -> Result<(StatusCode, axum::Json<Device>), ApiError> {
    auth.require(Role::Operator)?;
    check_device_fields(new.name.as_deref(), new.notes.as_deref())?;
    new.initiators = check_initiators(new.initiators.as_deref())?;
    if new.mac.is_multicast() || new.mac == MacAddr::ZERO {
        return Err(ApiError::unprocessable(
            "a device needs a unicast MAC address",
        ));
    }
    let a = auth.audit();
    Ok((
        StatusCode::CREATED,
        axum::Json(blocking(&state, move |s| s.create_device(&a, &new)).await?),
    ))
}

/// Changes a device (operator). `image: null` unlinks the image; `chap` sets the CHAP its
/// image's target requires (`null` removes it); secrets are audited as changed, never shown;
/// `initiators` replaces the iSCSI initiator names its image's target accepts besides one
/// that carries its MAC (`[]` removes them).
#[utoipa::path(patch, path = "/api/v1/devices/{mac}", tag = "devices", params(("mac" = String, Path)),
    request_body = DevicePatch, responses((status = 200, body = Device), (status = 404), (status = 409)))]
pub(super) async fn update_device(
    State(state): State<AppState>,
    auth: Auth,
    Path(mac): Path<String>,
    Json(mut patch): Json<DevicePatch>,
) -> Result<axum::Json<Device>, ApiError> {
    auth.require(Role::Operator)?;
    let mac = parse_mac(&mac)?;
    check_device_fields(patch.name.as_deref(), patch.notes.as_deref())?;
    patch.initiators = check_initiators(patch.initiators.as_deref())?;
    if let Some(Some(chap)) = &patch.chap {
        chap.validate()
            .map_err(|e| ApiError::unprocessable(e.to_string()))?;
    }
    let a = auth.audit();
    Ok(axum::Json(
        blocking(&state, move |s| s.update_device(&a, mac, &patch)).await?,
    ))
}

/// Deletes a device (operator).
#[utoipa::path(delete, path = "/api/v1/devices/{mac}", tag = "devices", params(("mac" = String, Path)),
    responses((status = 204), (status = 404)))]
pub(super) async fn delete_device(
    State(state): State<AppState>,
    auth: Auth,
    Path(mac): Path<String>,
) -> Result<StatusCode, ApiError> {
    auth.require(Role::Operator)?;
    let mac = parse_mac(&mac)?;
    let a = auth.audit();
    blocking(&state, move |s| s.delete_device(&a, mac)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Lists clients that booted from us but are not registered.
#[utoipa::path(get, path = "/api/v1/unknown-devices", tag = "devices", params(PageQuery),
    responses((status = 200, body = Page<UnknownDevice>)))]
pub(super) async fn list_unknown(
    State(state): State<AppState>,
    _auth: Auth,
    Query(page): Query<PageQuery>,
) -> Result<axum::Json<Page<UnknownDevice>>, ApiError> {
    Ok(axum::Json(
        blocking(&state, move |s| s.list_unknown_devices(&page)).await?,
    ))
}

/// Registration of an unknown device; every field is optional.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct RegisterBody {
    /// Name; defaults to `<arch>-<last six hex digits>`.
    pub name: Option<String>,
    /// Firmware type; defaults to what was seen.
    pub arch: Option<crate::store::Arch>,
    /// Boot policy; defaults to the settings' default.
    pub boot_policy: Option<crate::store::BootPolicy>,
    /// Image to link.
    pub image: Option<String>,
    /// Profile to link.
    pub profile: Option<String>,
    /// Free text.
    pub notes: Option<String>,
}

/// Registers an unknown device as a device (operator).
#[utoipa::path(post, path = "/api/v1/unknown-devices/{mac}/register", tag = "devices", params(("mac" = String, Path)),
    request_body = RegisterBody, responses((status = 201, body = Device), (status = 404), (status = 409)))]
pub(super) async fn register_unknown(
    State(state): State<AppState>,
    auth: Auth,
    Path(mac): Path<String>,
    Json(body): Json<RegisterBody>,
) -> Result<(StatusCode, axum::Json<Device>), ApiError> {
    auth.require(Role::Operator)?;
    let mac = parse_mac(&mac)?;
    check_device_fields(body.name.as_deref(), body.notes.as_deref())?;
    let a = auth.audit();
    let dev = blocking(&state, move |s| {
        // Only clients that were actually seen can be registered through this path.
        s.get_unknown_device(mac)?;
        let new = NewDevice {
            mac,
            name: body.name,
            arch: body.arch,
            enabled: None,
            boot_policy: body.boot_policy,
            image: body.image,
            profile: body.profile,
            notes: body.notes,
            initiators: None,
        };
        s.create_device(&a, &new)
    })
    .await?;
    Ok((StatusCode::CREATED, axum::Json(dev)))
}

/// Forgets an unknown device (operator).
#[utoipa::path(delete, path = "/api/v1/unknown-devices/{mac}", tag = "devices", params(("mac" = String, Path)),
    responses((status = 204), (status = 404)))]
pub(super) async fn delete_unknown(
    State(state): State<AppState>,
    auth: Auth,
    Path(mac): Path<String>,
) -> Result<StatusCode, ApiError> {
    auth.require(Role::Operator)?;
    let mac = parse_mac(&mac)?;
    let a = auth.audit();
    blocking(&state, move |s| s.delete_unknown_device(&a, mac)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Largest image accepted: 64 TiB.
const MAX_IMAGE_BYTES: u64 = 64 << 40;

fn check_size(size: u64) -> Result<(), ApiError> {
    if size == 0 || !size.is_multiple_of(512) || size > MAX_IMAGE_BYTES {
        return Err(ApiError::unprocessable(
            "size_bytes must be a non-zero multiple of 512, at most 64 TiB",
        ));
    }
    Ok(())
}

/// Lists disk images.
#[utoipa::path(get, path = "/api/v1/images", tag = "images", responses((status = 200, body = Vec<Image>)))]
pub(super) async fn list_images(
    State(state): State<AppState>,
    _auth: Auth,
) -> Result<axum::Json<Vec<Image>>, ApiError> {
    Ok(axum::Json(blocking(&state, |s| s.list_images()).await?))
}

/// One image.
#[utoipa::path(get, path = "/api/v1/images/{name}", tag = "images", params(("name" = String, Path)),
    responses((status = 200, body = Image), (status = 404)))]
pub(super) async fn get_image(
    State(state): State<AppState>,
    _auth: Auth,
    Path(name): Path<String>,
) -> Result<axum::Json<Image>, ApiError> {
    Ok(axum::Json(
        blocking(&state, move |s| s.get_image(&name)).await?,
    ))
}

/// Records a disk image (operator).
#[utoipa::path(post, path = "/api/v1/images", tag = "images", request_body = NewImage,
    responses((status = 201, body = Image), (status = 409), (status = 422)))]
pub(super) async fn create_image(
    State(state): State<AppState>,
    auth: Auth,
    Json(new): Json<NewImage>,
) -> Result<(StatusCode, axum::Json<Image>), ApiError> {
    auth.require(Role::Operator)?;
    check_name("image", &new.name)?;
    check_size(new.size_bytes)?;
    check_text("description", &new.description, 1000)?;
    let a = auth.audit();
    Ok((
        StatusCode::CREATED,
        axum::Json(blocking(&state, move |s| s.create_image(&a, &new)).await?),
    ))
}

/// Changes an image's description or grows it (operator).
#[utoipa::path(patch, path = "/api/v1/images/{name}", tag = "images", params(("name" = String, Path)),
    request_body = ImagePatch, responses((status = 200, body = Image), (status = 404), (status = 422)))]
pub(super) async fn update_image(
    State(state): State<AppState>,
    auth: Auth,
    Path(name): Path<String>,
    Json(patch): Json<ImagePatch>,
) -> Result<axum::Json<Image>, ApiError> {
    auth.require(Role::Operator)?;
    if let Some(d) = &patch.description {
        check_text("description", d, 1000)?;
    }
    if let Some(size) = patch.size_bytes {
        check_size(size)?;
    }
    let a = auth.audit();
    let ops = std::sync::Arc::clone(state.image_ops());
    let iscsi = state.iscsi().cloned();
    let img = blocking(&state, move |s| {
        let _files = ops.lock_files();
        let before = s.get_image(&name)?;
        if patch.size_bytes.is_some_and(|n| n < before.size_bytes) {
            return Ok(Err(ApiError::unprocessable(
                "images can grow but not shrink",
            )));
        }
        let after = s.update_image(&a, &name, &patch)?;
        if after.size_bytes > before.size_bytes {
            // The file grows now (sparse), so that a live session sees the new capacity.
            let path = crate::service::images::image_path(ops.dir(), &name);
            if let Ok(f) = std::fs::OpenOptions::new().write(true).open(&path)
                && f.metadata().is_ok_and(|m| m.len() < after.size_bytes)
                && let Err(error) = f.set_len(after.size_bytes)
            {
                tracing::warn!(%error, image = %name, "growing the image file failed; the next login grows it");
            }
            if let Some(t) = &iscsi {
                t.capacity_changed(&name);
            }
        }
        Ok(Ok(after))
    })
    .await??;
    Ok(axum::Json(img))
}

/// Lists installer media.
#[utoipa::path(get, path = "/api/v1/installers", tag = "installers", responses((status = 200, body = Vec<Installer>)))]
pub(super) async fn list_installers(
    State(state): State<AppState>,
    _auth: Auth,
) -> Result<axum::Json<Vec<Installer>>, ApiError> {
    Ok(axum::Json(blocking(&state, |s| s.list_installers()).await?))
}

/// One installer.
#[utoipa::path(get, path = "/api/v1/installers/{id}", tag = "installers", params(("id" = i64, Path)),
    responses((status = 200, body = Installer), (status = 404)))]
pub(super) async fn get_installer(
    State(state): State<AppState>,
    _auth: Auth,
    Path(id): Path<i64>,
) -> Result<axum::Json<Installer>, ApiError> {
    Ok(axum::Json(
        blocking(&state, move |s| s.get_installer(id)).await?,
    ))
}

/// Records installer media that exist under the installers directory (operator).
#[utoipa::path(post, path = "/api/v1/installers", tag = "installers", request_body = NewInstaller,
    responses((status = 201, body = Installer), (status = 409), (status = 422)))]
pub(super) async fn create_installer(
    State(state): State<AppState>,
    auth: Auth,
    Json(mut new): Json<NewInstaller>,
) -> Result<(StatusCode, axum::Json<Installer>), ApiError> {
    auth.require(Role::Operator)?;
    if let Some(n) = &new.name {
        check_text("name", n, 200)?;
    }
    check_text("description", &new.description, 1000)?;
    let root = state.paths().installers.clone();
    let raw = new.path.clone();
    let (rel, size) = tokio::task::spawn_blocking(move || -> Result<(String, u64), JailError> {
        let rel = jail::normalise(&raw)?;
        let full = jail::resolve(&root, &rel)?;
        let meta = std::fs::metadata(&full).map_err(|_| JailError::NotFound)?;
        Ok((rel, if meta.is_file() { meta.len() } else { 0 }))
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(|e| {
        ApiError::unprocessable(format!(
            "path {:?}: {e} in the installers directory",
            new.path
        ))
    })?;
    new.path = rel;
    new.size_bytes = size;
    let a = auth.audit();
    Ok((
        StatusCode::CREATED,
        axum::Json(blocking(&state, move |s| s.create_installer(&a, &new)).await?),
    ))
}

/// Changes installer metadata (operator).
#[utoipa::path(patch, path = "/api/v1/installers/{id}", tag = "installers", params(("id" = i64, Path)),
    request_body = InstallerPatch, responses((status = 200, body = Installer), (status = 404)))]
pub(super) async fn update_installer(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<i64>,
    Json(patch): Json<InstallerPatch>,
) -> Result<axum::Json<Installer>, ApiError> {
    auth.require(Role::Operator)?;
    if let Some(n) = &patch.name {
        check_text("name", n, 200)?;
    }
    if let Some(d) = &patch.description {
        check_text("description", d, 1000)?;
    }
    let a = auth.audit();
    Ok(axum::Json(
        blocking(&state, move |s| s.update_installer(&a, id, &patch)).await?,
    ))
}

/// Deletes an installer record (operator); the file stays.
#[utoipa::path(delete, path = "/api/v1/installers/{id}", tag = "installers", params(("id" = i64, Path)),
    responses((status = 204), (status = 404)))]
pub(super) async fn delete_installer(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<i64>,
) -> Result<StatusCode, ApiError> {
    auth.require(Role::Operator)?;
    let a = auth.audit();
    blocking(&state, move |s| s.delete_installer(&a, id)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Lists boot profiles.
#[utoipa::path(get, path = "/api/v1/profiles", tag = "profiles", responses((status = 200, body = Vec<BootProfile>)))]
pub(super) async fn list_profiles(
    State(state): State<AppState>,
    _auth: Auth,
) -> Result<axum::Json<Vec<BootProfile>>, ApiError> {
    Ok(axum::Json(blocking(&state, |s| s.list_profiles()).await?))
}

/// One boot profile.
#[utoipa::path(get, path = "/api/v1/profiles/{name}", tag = "profiles", params(("name" = String, Path)),
    responses((status = 200, body = BootProfile), (status = 404)))]
pub(super) async fn get_profile(
    State(state): State<AppState>,
    _auth: Auth,
    Path(name): Path<String>,
) -> Result<axum::Json<BootProfile>, ApiError> {
    Ok(axum::Json(
        blocking(&state, move |s| s.get_profile(&name)).await?,
    ))
}

fn check_profile_paths<'a>(paths: impl IntoIterator<Item = &'a str>) -> Result<(), ApiError> {
    for p in paths {
        jail::normalise(p).map_err(|e| ApiError::unprocessable(format!("path {p:?}: {e}")))?;
    }
    Ok(())
}

/// Creates a boot profile (operator).
#[utoipa::path(post, path = "/api/v1/profiles", tag = "profiles", request_body = NewProfile,
    responses((status = 201, body = BootProfile), (status = 409), (status = 422)))]
pub(super) async fn create_profile(
    State(state): State<AppState>,
    auth: Auth,
    Json(new): Json<NewProfile>,
) -> Result<(StatusCode, axum::Json<BootProfile>), ApiError> {
    auth.require(Role::Operator)?;
    check_name("profile", &new.name)?;
    check_text("cmdline", &new.cmdline, 4000)?;
    check_text("description", &new.description, 1000)?;
    check_profile_paths(
        new.kernel
            .iter()
            .chain(new.iso.iter())
            .chain(new.initrd.iter())
            .map(String::as_str),
    )?;
    let a = auth.audit();
    Ok((
        StatusCode::CREATED,
        axum::Json(blocking(&state, move |s| s.create_profile(&a, &new)).await?),
    ))
}

/// Changes a boot profile (operator).
#[utoipa::path(patch, path = "/api/v1/profiles/{name}", tag = "profiles", params(("name" = String, Path)),
    request_body = ProfilePatch, responses((status = 200, body = BootProfile), (status = 404)))]
pub(super) async fn update_profile(
    State(state): State<AppState>,
    auth: Auth,
    Path(name): Path<String>,
    Json(patch): Json<ProfilePatch>,
) -> Result<axum::Json<BootProfile>, ApiError> {
    auth.require(Role::Operator)?;
    if let Some(c) = &patch.cmdline {
        check_text("cmdline", c, 4000)?;
    }
    if let Some(d) = &patch.description {
        check_text("description", d, 1000)?;
    }
    let kernel = patch.kernel.iter().flatten();
    let iso = patch.iso.iter().flatten();
    check_profile_paths(
        kernel
            .chain(iso)
            .chain(patch.initrd.iter().flatten())
            .map(String::as_str),
    )?;
    let a = auth.audit();
    Ok(axum::Json(
        blocking(&state, move |s| s.update_profile(&a, &name, &patch)).await?,
    ))
}

/// Deletes a boot profile (operator); refused while a device uses it.
#[utoipa::path(delete, path = "/api/v1/profiles/{name}", tag = "profiles", params(("name" = String, Path)),
    responses((status = 204), (status = 404), (status = 409)))]
pub(super) async fn delete_profile(
    State(state): State<AppState>,
    auth: Auth,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    auth.require(Role::Operator)?;
    let a = auth.audit();
    blocking(&state, move |s| s.delete_profile(&a, &name)).await?;
    Ok(StatusCode::NO_CONTENT)
}
