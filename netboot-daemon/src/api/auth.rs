//! Authentication: the [`Auth`] extractor, login and first-run setup, users and API
//! tokens.
//!
//! Browsers hold an HttpOnly, `SameSite=Strict` session cookie; automation sends
//! `Authorization: Bearer nbt_...`. Cookie-authenticated writes must also come from our
//! own origin (checked on `Origin` when the browser sends it) and carry JSON, which a
//! cross-site form cannot send; together with SameSite this closes CSRF.

use std::net::SocketAddr;
use std::time::Instant;

use axum::extract::{ConnectInfo, FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, Json};
use super::{AppState, blocking};
use crate::auth::{self as creds, MIN_PASSWORD_LEN, TOKEN_PREFIX};
use crate::store::{
    ApiToken, Audit, NewSession, NewToken, NewUser, Role, StoreError, User, UserPatch,
};
use crate::time::Timestamp;

/// Name of the session cookie.
pub const SESSION_COOKIE: &str = "netboot_session";

/// How the caller authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Via {
    /// A browser session; the hash of its cookie secret.
    Session(String),
    /// An API token.
    Token(i64),
}

/// An authenticated caller. Extracting it answers 401 when there are no valid
/// credentials.
#[derive(Debug, Clone)]
pub struct Auth {
    /// The user.
    pub username: String,
    /// Effective role (a token's role, capped by its owner's current role).
    pub role: Role,
    /// Session or token.
    pub via: Via,
    /// Client address.
    pub ip: Option<String>,
}

impl Auth {
    /// Refuses with 403 unless the caller's role includes `role`.
    pub fn require(&self, role: Role) -> Result<(), ApiError> {
        if self.role.allows(role) {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "this needs the {role} role; you are {}",
                self.role
            )))
        }
    }

    /// The audit identity of this caller.
    pub fn audit(&self) -> Audit {
        let via = match &self.via {
            Via::Session(_) => "session".to_owned(),
            Via::Token(id) => format!("token:{id}"),
        };
        Audit {
            actor: self.username.clone(),
            via,
            ip: self.ip.clone(),
        }
    }
}

fn client_ip(parts: &Parts) -> Option<String> {
    parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip().to_string())
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| kv.trim().strip_prefix(name)?.strip_prefix('='))
}

/// Checks that a cookie-authenticated write comes from a page we served.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        // Non-browser clients and same-origin GETs send none; browsers send one on
        // every cross-origin and every non-GET request.
        return true;
    };
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    origin
        .split_once("://")
        .is_some_and(|(_, rest)| rest == host)
}

/// Authenticates a request, if it carries credentials.
async fn authenticate(
    state: &AppState,
    headers: &HeaderMap,
    method: &Method,
    ip: Option<String>,
) -> Result<Option<Auth>, ApiError> {
    let now = Timestamp::now();
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        let bearer = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| t.starts_with(TOKEN_PREFIX))
            .ok_or_else(ApiError::unauthorized)?;
        let hash = creds::secret_hash(bearer);
        let found = blocking(state, move |s| s.authenticate_token(&hash, now)).await?;
        let (token, user) = found.ok_or_else(ApiError::unauthorized)?;
        let role = if user.role.allows(token.role) {
            token.role
        } else {
            user.role
        };
        return Ok(Some(Auth {
            username: user.username,
            role,
            via: Via::Token(token.id),
            ip,
        }));
    }
    let Some(secret) = cookie(headers, SESSION_COOKIE) else {
        return Ok(None);
    };
    let hash = creds::secret_hash(secret);
    let h = hash.clone();
    let Some((_, user)) = blocking(state, move |s| s.get_session(&h, now)).await? else {
        return Ok(None);
    };
    if !method.is_safe() && !same_origin(headers) {
        return Err(ApiError::forbidden("cross-origin request refused"));
    }
    Ok(Some(Auth {
        username: user.username,
        role: user.role,
        via: Via::Session(hash),
        ip,
    }))
}

impl FromRequestParts<AppState> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let ip = client_ip(parts);
        authenticate(state, &parts.headers, &parts.method, ip)
            .await?
            .ok_or_else(ApiError::unauthorized)
    }
}

/// The caller's address, when the request came over a socket.
#[derive(Debug, Clone)]
pub struct ClientIp(pub Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for ClientIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self(client_ip(parts)))
    }
}

fn session_cookie(state: &AppState, secret: &str, max_age_secs: u64) -> HeaderValue {
    let secure = if state.config().http.secure_cookies {
        "; Secure"
    } else {
        ""
    };
    let v = format!(
        "{SESSION_COOKIE}={secret}; HttpOnly; SameSite=Strict; Path=/; Max-Age={max_age_secs}{secure}"
    );
    HeaderValue::from_str(&v)
        .unwrap_or_else(|_| HeaderValue::from_static("netboot_session=; Max-Age=0; Path=/"))
}

/// Whether setup is needed and who the caller is.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuthStatus {
    /// True until the first administrator exists.
    pub needs_setup: bool,
    /// The caller, if authenticated.
    pub user: Option<Me>,
}

/// The authenticated caller.
#[derive(Debug, Serialize, ToSchema)]
pub struct Me {
    /// User name.
    pub username: String,
    /// Effective role.
    pub role: Role,
    /// `session` or `token:<id>`.
    pub via: String,
}

impl From<&Auth> for Me {
    fn from(a: &Auth) -> Self {
        Self {
            username: a.username.clone(),
            role: a.role,
            via: a.audit().via,
        }
    }
}

/// Tells whether first-run setup is open and who the caller is.
#[utoipa::path(get, path = "/api/v1/auth/status", tag = "auth", responses((status = 200, body = AuthStatus)))]
pub(super) async fn status(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    method: Method,
    headers: HeaderMap,
) -> Result<axum::Json<AuthStatus>, ApiError> {
    let needs_setup = blocking(&state, |s| s.needs_setup()).await?;
    let user = authenticate(&state, &headers, &method, ip)
        .await
        .ok()
        .flatten();
    Ok(axum::Json(AuthStatus {
        needs_setup,
        user: user.as_ref().map(Me::from),
    }))
}

/// User name and password.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    /// User name.
    pub username: String,
    /// Password.
    pub password: String,
}

/// A new login session.
#[derive(Debug, Serialize, ToSchema)]
pub struct LoginResponse {
    /// User name.
    pub username: String,
    /// Role.
    pub role: Role,
    /// When the session cookie expires.
    #[schema(value_type = String)]
    pub expires_at: Timestamp,
}

async fn start_session(
    state: &AppState,
    user: &User,
    ip: Option<String>,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let secret = creds::new_secret();
    let ttl = state.config().auth.session_ttl();
    let now = Timestamp::now();
    let ttl_secs = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
    let session = NewSession {
        token_hash: creds::secret_hash(&secret),
        username: user.username.clone(),
        created_at: now,
        expires_at: now.add_secs(ttl_secs),
        ip: ip.clone(),
        user_agent: headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.chars().take(200).collect()),
    };
    let expires_at = session.expires_at;
    let audit = Audit {
        actor: user.username.clone(),
        via: "session".into(),
        ip,
    };
    blocking(state, move |s| s.create_session(&audit, &session)).await?;
    let body = LoginResponse {
        username: user.username.clone(),
        role: user.role,
        expires_at,
    };
    let mut res = axum::Json(body).into_response();
    res.headers_mut().insert(
        header::SET_COOKIE,
        session_cookie(state, &secret, ttl.as_secs()),
    );
    Ok(res)
}

fn check_new_password(password: &str) -> Result<(), ApiError> {
    if password.chars().count() < MIN_PASSWORD_LEN {
        return Err(ApiError::unprocessable(format!(
            "passwords need at least {MIN_PASSWORD_LEN} characters"
        )));
    }
    Ok(())
}

async fn hash(password: String) -> Result<String, ApiError> {
    tokio::task::spawn_blocking(move || creds::hash_password(&password))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)
}

/// Creates the first administrator and logs them in. Only while no administrator exists.
#[utoipa::path(post, path = "/api/v1/auth/setup", tag = "auth", request_body = Credentials,
    responses((status = 201, body = LoginResponse), (status = 409, description = "setup is complete")))]
pub(super) async fn setup(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    Json(body): Json<Credentials>,
) -> Result<Response, ApiError> {
    if !creds::valid_username(&body.username) {
        return Err(ApiError::unprocessable(
            "user names are 1-64 letters, digits, '.', '_', '-' or '@'",
        ));
    }
    check_new_password(&body.password)?;
    if !blocking(&state, |s| s.needs_setup()).await? {
        return Err(ApiError::conflict(
            "setup is complete: an administrator exists",
        ));
    }
    let password_hash = hash(body.password).await?;
    let (name, ip2) = (body.username.clone(), ip.clone());
    let user = blocking(&state, move |s| {
        s.create_first_admin(&name, &password_hash, ip2.as_deref())
    })
    .await?;
    tracing::info!(user = %user.username, "first administrator created");
    let mut res = start_session(&state, &user, ip, &headers).await?;
    *res.status_mut() = StatusCode::CREATED;
    Ok(res)
}

/// Logs in; answers with a session cookie.
#[utoipa::path(post, path = "/api/v1/auth/login", tag = "auth", request_body = Credentials,
    responses((status = 200, body = LoginResponse), (status = 401), (status = 429, description = "throttled")))]
pub(super) async fn login(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    Json(body): Json<Credentials>,
) -> Result<Response, ApiError> {
    let username: String = body.username.chars().take(64).collect();
    let user_key = format!("user:{}", username.to_lowercase());
    let ip_key = format!("ip:{}", ip.as_deref().unwrap_or("local"));
    let keys = [user_key.as_str(), ip_key.as_str()];
    if let Some(wait) = state.throttle().check(&keys, Instant::now()) {
        return Err(ApiError::too_many_requests(wait));
    }
    let name = username.clone();
    let found = match blocking(&state, move |s| s.get_user_credentials(&name)).await {
        Ok(found) => Some(found),
        Err(e) if e.status() == StatusCode::NOT_FOUND => None,
        Err(e) => return Err(e),
    };
    let phc = found
        .as_ref()
        .map_or_else(|| creds::dummy_hash().to_owned(), |(_, h)| h.clone());
    let password = body.password;
    let ok = tokio::task::spawn_blocking(move || creds::verify_password(&password, &phc))
        .await
        .map_err(ApiError::internal)?;
    match found {
        Some((user, _)) if ok && user.enabled => {
            state.throttle().succeed(&user_key);
            start_session(&state, &user, ip, &headers).await
        }
        _ => {
            state.throttle().fail(&keys, Instant::now());
            let audit = Audit {
                actor: username.clone(),
                via: "login".into(),
                ip,
            };
            blocking(&state, move |s| {
                s.record_audit(
                    &audit,
                    "auth.login_failed",
                    &username,
                    &serde_json::Value::Null,
                )
            })
            .await?;
            Err(ApiError::bad_credentials())
        }
    }
}

/// Ends the caller's session.
#[utoipa::path(post, path = "/api/v1/auth/logout", tag = "auth", responses((status = 204), (status = 401)))]
pub(super) async fn logout(
    State(state): State<AppState>,
    auth: Auth,
) -> Result<Response, ApiError> {
    if let Via::Session(hash) = &auth.via {
        let (a, h) = (auth.audit(), hash.clone());
        blocking(&state, move |s| s.delete_session(&a, &h)).await?;
    }
    let mut res = StatusCode::NO_CONTENT.into_response();
    res.headers_mut()
        .insert(header::SET_COOKIE, session_cookie(&state, "", 0));
    Ok(res)
}

/// The authenticated caller.
#[utoipa::path(get, path = "/api/v1/auth/me", tag = "auth", responses((status = 200, body = Me), (status = 401)))]
pub(super) async fn me(auth: Auth) -> axum::Json<Me> {
    axum::Json(Me::from(&auth))
}

/// A password change.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PasswordChange {
    /// The current password.
    pub current_password: String,
    /// The new password (at least 8 characters).
    pub new_password: String,
}

/// Changes the caller's own password (the current one is required). Every other session
/// of the caller ends; the session the change comes from stays logged in.
#[utoipa::path(post, path = "/api/v1/auth/password", tag = "auth", request_body = PasswordChange,
    responses((status = 204), (status = 401), (status = 403, description = "the current password is wrong"), (status = 422)))]
pub(super) async fn change_password(
    State(state): State<AppState>,
    auth: Auth,
    Json(body): Json<PasswordChange>,
) -> Result<Response, ApiError> {
    check_new_password(&body.new_password)?;
    // Guessing the current password from a stolen session is throttled like logins.
    let user_key = format!("user:{}", auth.username.to_lowercase());
    if let Some(wait) = state.throttle().check(&[user_key.as_str()], Instant::now()) {
        return Err(ApiError::too_many_requests(wait));
    }
    let name = auth.username.clone();
    let (_, phc) = blocking(&state, move |s| s.get_user_credentials(&name)).await?;
    let current = body.current_password;
    let ok = tokio::task::spawn_blocking(move || creds::verify_password(&current, &phc))
        .await
        .map_err(ApiError::internal)?;
    if !ok {
        state.throttle().fail(&[user_key.as_str()], Instant::now());
        let (a, name) = (auth.audit(), auth.username.clone());
        blocking(&state, move |s| {
            s.record_audit(
                &a,
                "auth.password_change_failed",
                &name,
                &serde_json::Value::Null,
            )
        })
        .await?;
        return Err(ApiError::forbidden("the current password is wrong"));
    }
    state.throttle().succeed(&user_key);
    let patch = UserPatch {
        password_hash: Some(hash(body.new_password).await?),
        keep_session: match &auth.via {
            Via::Session(hash) => Some(hash.clone()),
            Via::Token(_) => None,
        },
        ..UserPatch::default()
    };
    let (a, name) = (auth.audit(), auth.username.clone());
    blocking(&state, move |s| s.update_user(&a, &name, &patch)).await?;
    tracing::info!(user = %auth.username, "password changed");
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Lists users (admin).
#[utoipa::path(get, path = "/api/v1/users", tag = "users", responses((status = 200, body = Vec<User>), (status = 403)))]
pub(super) async fn list_users(
    State(state): State<AppState>,
    auth: Auth,
) -> Result<axum::Json<Vec<User>>, ApiError> {
    auth.require(Role::Admin)?;
    Ok(axum::Json(blocking(&state, |s| s.list_users()).await?))
}

/// A new user.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewUserBody {
    /// User name.
    pub username: String,
    /// Initial password.
    pub password: String,
    /// Role.
    pub role: Role,
}

/// Creates a user (admin).
#[utoipa::path(post, path = "/api/v1/users", tag = "users", request_body = NewUserBody,
    responses((status = 201, body = User), (status = 409)))]
pub(super) async fn create_user(
    State(state): State<AppState>,
    auth: Auth,
    Json(body): Json<NewUserBody>,
) -> Result<(StatusCode, axum::Json<User>), ApiError> {
    auth.require(Role::Admin)?;
    if !creds::valid_username(&body.username) {
        return Err(ApiError::unprocessable(
            "user names are 1-64 letters, digits, '.', '_', '-' or '@'",
        ));
    }
    check_new_password(&body.password)?;
    let new = NewUser {
        username: body.username,
        role: body.role,
        password_hash: hash(body.password).await?,
    };
    let a = auth.audit();
    let user = blocking(&state, move |s| s.create_user(&a, &new)).await?;
    Ok((StatusCode::CREATED, axum::Json(user)))
}

/// A change to a user.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserPatchBody {
    /// New role.
    #[serde(default)]
    pub role: Option<Role>,
    /// Enable or disable.
    #[serde(default)]
    pub enabled: Option<bool>,
    /// New password.
    #[serde(default)]
    pub password: Option<String>,
}

/// Changes a user's role, enabled flag or password (admin). Their sessions end.
#[utoipa::path(patch, path = "/api/v1/users/{username}", tag = "users", request_body = UserPatchBody,
    params(("username" = String, Path)), responses((status = 200, body = User), (status = 404), (status = 409)))]
pub(super) async fn update_user(
    State(state): State<AppState>,
    auth: Auth,
    Path(username): Path<String>,
    Json(body): Json<UserPatchBody>,
) -> Result<axum::Json<User>, ApiError> {
    auth.require(Role::Admin)?;
    let password_hash = match body.password {
        Some(p) => {
            check_new_password(&p)?;
            Some(hash(p).await?)
        }
        None => None,
    };
    let patch = UserPatch {
        role: body.role,
        enabled: body.enabled,
        password_hash,
        keep_session: None,
    };
    let a = auth.audit();
    Ok(axum::Json(
        blocking(&state, move |s| s.update_user(&a, &username, &patch)).await?,
    ))
}

/// Deletes a user with their sessions and tokens (admin). The last administrator stays.
#[utoipa::path(delete, path = "/api/v1/users/{username}", tag = "users", params(("username" = String, Path)),
    responses((status = 204), (status = 404), (status = 409)))]
pub(super) async fn delete_user(
    State(state): State<AppState>,
    auth: Auth,
    Path(username): Path<String>,
) -> Result<StatusCode, ApiError> {
    auth.require(Role::Admin)?;
    let a = auth.audit();
    blocking(&state, move |s| s.delete_user(&a, &username)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Lists API tokens: an administrator's call lists all, anyone else's their own.
#[utoipa::path(get, path = "/api/v1/tokens", tag = "tokens", responses((status = 200, body = Vec<ApiToken>)))]
pub(super) async fn list_tokens(
    State(state): State<AppState>,
    auth: Auth,
) -> Result<axum::Json<Vec<ApiToken>>, ApiError> {
    let owner = (!auth.role.allows(Role::Admin)).then(|| auth.username.clone());
    Ok(axum::Json(
        blocking(&state, move |s| s.list_tokens(owner.as_deref())).await?,
    ))
}

/// A new API token.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewTokenBody {
    /// What it is for.
    pub name: String,
    /// Its role; at most, and by default, the caller's.
    #[serde(default)]
    pub role: Option<Role>,
    /// Lifetime in days; none for no expiry.
    #[serde(default)]
    pub expires_in_days: Option<u32>,
}

/// A created token with its secret, shown this once.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedToken {
    /// The token's record.
    pub token: ApiToken,
    /// Send as `Authorization: Bearer <secret>`. Not retrievable later.
    pub secret: String,
}

/// Creates an API token acting as the caller.
#[utoipa::path(post, path = "/api/v1/tokens", tag = "tokens", request_body = NewTokenBody,
    responses((status = 201, body = CreatedToken), (status = 403)))]
pub(super) async fn create_token(
    State(state): State<AppState>,
    auth: Auth,
    Json(body): Json<NewTokenBody>,
) -> Result<(StatusCode, axum::Json<CreatedToken>), ApiError> {
    let role = body.role.unwrap_or(auth.role);
    auth.require(role)?;
    let name = body.name.trim();
    if name.is_empty() || name.len() > 100 {
        return Err(ApiError::unprocessable(
            "a token needs a name of 1-100 characters",
        ));
    }
    let secret = format!("{TOKEN_PREFIX}{}", creds::new_secret());
    let new = NewToken {
        name: name.to_owned(),
        owner: auth.username.clone(),
        role,
        secret_hash: creds::secret_hash(&secret),
        expires_at: body
            .expires_in_days
            .map(|d| Timestamp::now().add_secs(i64::from(d) * 86_400)),
    };
    let a = auth.audit();
    let token = blocking(&state, move |s| s.create_token(&a, &new)).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(CreatedToken { token, secret }),
    ))
}

/// Revokes an API token (its owner or an administrator).
#[utoipa::path(delete, path = "/api/v1/tokens/{id}", tag = "tokens", params(("id" = i64, Path)),
    responses((status = 204), (status = 404)))]
pub(super) async fn delete_token(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<i64>,
) -> Result<StatusCode, ApiError> {
    let token = blocking(&state, move |s| s.get_token(id)).await?;
    if token.owner != auth.username {
        // Do not reveal other users' token ids to non-administrators.
        auth.require(Role::Admin).map_err(|_| {
            ApiError::from(StoreError::NotFound {
                kind: "token",
                key: id.to_string(),
            })
        })?;
    }
    let a = auth.audit();
    blocking(&state, move |s| s.delete_token(&a, id)).await?;
    Ok(StatusCode::NO_CONTENT)
}
