//! Signed-in users (`crate::sso`): the tenant's identity provider (`/v1/idp`), group-to-role mappings (`/v1/role-mappings`), ending a user's sessions, and sign-in itself (`/v1/auth/…`).
//!
//! Provider, mappings and ending sessions are owner/admin only (`identity:manage`), always audited.
//! `login`, `callback` and the CLI's `cli/exchange` are public: a login is bounded and rate limited per address, and a callback's credential is its state with the pre-login cookie bound to it.
//! `session` and `logout` act on the caller's own session.

use std::sync::Arc;
use std::time::Duration;

use airlock_core::TenantId;
use airlock_core::audit::Outcome;
use airlock_core::id::RoleMappingId;
use axum::Json;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{ApiError, ApiJson, ApiPath, Authed, ClientAddr, ReadAudit, audited, parse_id, refused};
use crate::authn::FailureKey;
use crate::authz::{Action, Principal, Role};
use crate::sso::idp::{IdpError, IdpSettings, IdpView};
use crate::sso::login::{self, Begin, Callback, Finished, LoginRefusal};
use crate::sso::mappings::{self, MappingError};
use crate::sso::pending::CliLogin;
use crate::sso::{LOGIN_COOKIE, LOGIN_TTL, SESSION_COOKIE, cookie, set_cookie};
use crate::state::{AppState, event};
use crate::store::RoleMappingRow;

#[derive(Serialize, Deserialize, ToSchema)]
pub struct IdpConfigView {
    pub issuer: String,
    pub client_id: String,
    /// Always true: the client secret is sealed at rest and never shown.
    pub client_secret_set: bool,
    pub scopes: Vec<String>,
    /// The ID-token claim that lists the user's groups.
    pub groups_claim: String,
    /// Sign-ins whose `amr`/`acr` show no second factor are refused.
    pub require_mfa: bool,
    /// Identity and token management by a session need a sign-in at most this many seconds old.
    pub max_age: Option<u64>,
    /// Register this redirect URI with the provider.
    pub redirect_uri: String,
    pub updated_at: String,
    pub updated_by: String,
}

impl From<IdpView> for IdpConfigView {
    fn from(v: IdpView) -> Self {
        Self {
            issuer: v.issuer,
            client_id: v.client_id,
            client_secret_set: true,
            scopes: v.scopes,
            groups_claim: v.groups_claim,
            require_mfa: v.require_mfa,
            max_age: v.max_age_seconds,
            redirect_uri: v.redirect_uri,
            updated_at: v.updated_at.to_string(),
            updated_by: v.updated_by,
        }
    }
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetIdp {
    /// The provider's issuer URL (https); its discovery is fetched to check it.
    pub issuer: String,
    pub client_id: String,
    /// Required the first time; absent: keep the one set before. Never shown again.
    pub client_secret: Option<String>,
    /// Default `openid email profile`; must include `openid`.
    pub scopes: Option<Vec<String>>,
    /// Default `groups`.
    pub groups_claim: Option<String>,
    /// Default false.
    pub require_mfa: Option<bool>,
    /// Seconds (at most 7 days); absent: no step-up.
    pub max_age: Option<u64>,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct RoleMappingView {
    pub id: String,
    pub group: String,
    pub role: String,
    /// Absent: the whole tenant.
    pub workspace_id: Option<String>,
    pub created_at: String,
    pub created_by: String,
}

impl From<RoleMappingRow> for RoleMappingView {
    fn from(m: RoleMappingRow) -> Self {
        Self {
            id: m.id.to_string(),
            group: m.group,
            role: m.role.as_str().to_owned(),
            workspace_id: m.workspace.map(|w| w.to_string()),
            created_at: m.created_at.to_string(),
            created_by: m.created_by,
        }
    }
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddRoleMapping {
    /// The group as the provider's groups claim names it.
    pub group: String,
    /// owner, admin, deployer, operator, viewer or auditor.
    pub role: String,
    /// Only in this workspace (wsp_…); absent: the whole tenant.
    pub workspace_id: Option<String>,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct RemovedRoleMappingView {
    pub id: String,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct EndedSessionsView {
    pub subject: String,
    pub sessions_ended: u64,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct RoleView {
    pub role: String,
    /// Absent: the whole tenant.
    pub workspace_id: Option<String>,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct SessionView {
    pub tenant_id: String,
    /// `user:<subject>`, or `token:<id>` for an API token.
    pub principal: String,
    pub subject: Option<String>,
    pub session_id: Option<String>,
    pub auth_time: Option<String>,
    pub roles: Vec<RoleView>,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct LoggedOutView {
    pub ended: bool,
    /// Where to send the browser so the provider's own session ends too (its `end_session_endpoint`, with
    /// `id_token_hint` and `post_logout_redirect_uri`); absent when the provider names none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_logout_url: Option<String>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CliExchange {
    /// The one-time code the callback sent the CLI's loopback.
    pub code: String,
    /// The PKCE verifier of the challenge the CLI sent with its login.
    pub verifier: String,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct CliSessionView {
    /// The session credential (`airlock_ss_…`), sent as `Authorization: Bearer`. Shown once.
    pub session: String,
}

#[derive(Deserialize)]
pub struct LoginQuery {
    tenant: String,
    return_to: Option<String>,
    max_age: Option<u64>,
    cli_redirect: Option<String>,
    cli_challenge: Option<String>,
}

#[derive(Deserialize)]
pub struct CallbackQuery {
    state: Option<String>,
    code: Option<String>,
    error: Option<String>,
    iss: Option<String>,
}

/// Show the tenant's identity provider (never its client secret).
#[utoipa::path(get, path = "/v1/idp", security(("bearer" = [])),
    responses((status = 200, body = IdpConfigView),
        (status = 404, body = super::ErrorBody, description = "no identity provider is set for this tenant")))]
pub(super) async fn get_idp(
    State(state): State<Arc<AppState>>,
    Authed(scope): Authed,
) -> Result<Json<IdpConfigView>, ApiError> {
    let result = crate::sso::idp::show(&state, &scope).await.map_err(ApiError::from).map(IdpConfigView::from);
    let ev = event(scope.principal().actor(), Action::GetIdp.audit_action(), Outcome::Success);
    audited(&state, &scope, ReadAudit::Durable, ev, result).await.map(Json)
}

/// Set the tenant's identity provider; its discovery is fetched first.
#[utoipa::path(put, path = "/v1/idp", security(("bearer" = [])),
    request_body = SetIdp,
    responses((status = 200, body = IdpConfigView),
        (status = 422, body = super::ErrorBody, description = "the issuer's discovery cannot be fetched or used")))]
pub(super) async fn set_idp(
    State(state): State<Arc<AppState>>,
    Authed(scope): Authed,
    body: Result<ApiJson<SetIdp>, ApiError>,
) -> Result<Json<IdpConfigView>, ApiError> {
    let result = async {
        let ApiJson(body) = body?;
        let settings = IdpSettings {
            issuer: body.issuer,
            client_id: body.client_id,
            client_secret: body.client_secret,
            scopes: body.scopes.unwrap_or_else(|| ["openid", "email", "profile"].map(str::to_owned).to_vec()),
            groups_claim: body.groups_claim.unwrap_or_else(|| "groups".to_owned()),
            require_mfa: body.require_mfa.unwrap_or(false),
            max_age: body.max_age.map(Duration::from_secs),
        };
        Ok(Json(crate::sso::idp::set(&state, &scope, settings).await?.into()))
    }
    .await;
    let ev = event(scope.principal().actor(), Action::SetIdp.audit_action(), Outcome::Success);
    refused(&state, &scope, ev, result).await
}

/// List the tenant's group-to-role mappings.
#[utoipa::path(get, path = "/v1/role-mappings", security(("bearer" = [])),
    responses((status = 200, body = Vec<RoleMappingView>)))]
pub(super) async fn list_role_mappings(
    State(state): State<Arc<AppState>>,
    Authed(scope): Authed,
) -> Result<Json<Vec<RoleMappingView>>, ApiError> {
    let result = mappings::list(&state, &scope)
        .await
        .map_err(ApiError::from)
        .map(|rows| rows.into_iter().map(RoleMappingView::from).collect());
    let ev = event(scope.principal().actor(), Action::ListRoleMappings.audit_action(), Outcome::Success);
    audited(&state, &scope, ReadAudit::Durable, ev, result).await.map(Json)
}

/// Map an identity-provider group to a role, tenant-wide or in one workspace. It takes effect at each user's next sign-in.
#[utoipa::path(post, path = "/v1/role-mappings", security(("bearer" = [])),
    request_body = AddRoleMapping,
    responses((status = 201, body = RoleMappingView), (status = 409, body = super::ErrorBody, description = "the same mapping exists"),
        (status = 422, body = super::ErrorBody, description = "the tenant holds the most mappings it may")))]
pub(super) async fn add_role_mapping(
    State(state): State<Arc<AppState>>,
    Authed(scope): Authed,
    body: Result<ApiJson<AddRoleMapping>, ApiError>,
) -> Result<(StatusCode, Json<RoleMappingView>), ApiError> {
    let result = async {
        let ApiJson(body) = body?;
        let role: Role = body.role.parse().map_err(ApiError::bad_request)?;
        let workspace = body.workspace_id.as_deref().map(parse_id).transpose()?;
        let row = mappings::add(&state, &scope, &body.group, role, workspace).await?;
        Ok((StatusCode::CREATED, Json(row.into())))
    }
    .await;
    let ev = event(scope.principal().actor(), Action::AddRoleMapping.audit_action(), Outcome::Success);
    refused(&state, &scope, ev, result).await
}

/// Remove a group-to-role mapping. Sessions keep the roles they were given until they end.
#[utoipa::path(delete, path = "/v1/role-mappings/{mapping}", security(("bearer" = [])),
    params(("mapping" = String, Path, description = "role mapping id (rmp_…)")),
    responses((status = 200, body = RemovedRoleMappingView)))]
pub(super) async fn remove_role_mapping(
    State(state): State<Arc<AppState>>,
    Authed(scope): Authed,
    ApiPath(mapping): ApiPath<String>,
) -> Result<Json<RemovedRoleMappingView>, ApiError> {
    let result = async {
        let id: RoleMappingId = parse_id(&mapping)?;
        mappings::remove(&state, &scope, id).await?;
        Ok(Json(RemovedRoleMappingView { id: id.to_string() }))
    }
    .await;
    let mut ev = event(scope.principal().actor(), Action::RemoveRoleMapping.audit_action(), Outcome::Success);
    ev.target = Some(mapping.chars().take(64).collect());
    refused(&state, &scope, ev, result).await
}

/// End every session of one user at once; their next request is refused. Their next sign-in takes the provider's groups afresh.
#[utoipa::path(post, path = "/v1/users/{subject}/end-sessions", security(("bearer" = [])),
    params(("subject" = String, Path, description = "the user's subject (`sub`) at the identity provider")),
    responses((status = 200, body = EndedSessionsView)))]
pub(super) async fn end_user_sessions(
    State(state): State<Arc<AppState>>,
    Authed(scope): Authed,
    ApiPath(subject): ApiPath<String>,
) -> Result<Json<EndedSessionsView>, ApiError> {
    let result = async {
        if subject.is_empty() || subject.chars().count() > 255 || subject.chars().any(char::is_control) {
            return Err(ApiError::bad_request("subject must be 1–255 printable characters"));
        }
        let ended = crate::sso::sessions::end_user_sessions(&state, &scope, &subject).await?;
        Ok(Json(EndedSessionsView { subject: subject.clone(), sessions_ended: ended }))
    }
    .await;
    let mut ev = event(scope.principal().actor(), Action::EndUserSessions.audit_action(), Outcome::Success);
    ev.target = Some(format!("user:{}", subject.chars().take(255).collect::<String>()));
    refused(&state, &scope, ev, result).await
}

/// Start a sign-in: redirects to the tenant's identity provider (code flow, PKCE S256, state, nonce) and sets a
/// short-lived pre-login cookie. With `cli_redirect` and `cli_challenge` (`airlock login`), the callback hands the CLI's loopback a one-time code.
#[utoipa::path(get, path = "/v1/auth/login",
    params(("tenant" = String, Query, description = "tenant id (ten_…)"),
        ("return_to" = Option<String>, Query, description = "a path on this server to go to after signing in"),
        ("max_age" = Option<u64>, Query, description = "step-up: sign in again unless the provider's sign-in is at most this many seconds old"),
        ("cli_redirect" = Option<String>, Query, description = "the CLI's loopback URL (http://127.0.0.1:<port>/…)"),
        ("cli_challenge" = Option<String>, Query, description = "the CLI's PKCE S256 challenge")),
    responses((status = 302, description = "to the identity provider"),
        (status = 404, body = super::ErrorBody, description = "no identity provider for this tenant"),
        (status = 429, body = super::ErrorBody, headers(("Retry-After" = u64, description = "seconds until a start may succeed")),
            description = "too many login starts from this address (`rate_limited`), or too many logins in progress (`sign_in_busy`, whichever share is full: its address's, its network's, the tenant's or the server's)"),
        (status = 502, body = super::ErrorBody, description = "the identity provider cannot be used"),
        (status = 503, body = super::ErrorBody, description = "the store failed")))]
pub(super) async fn login(
    State(state): State<Arc<AppState>>,
    from: Option<axum::Extension<ClientAddr>>,
    query: Result<Query<LoginQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let from = from.map(|a| a.0.0);
    let started = async {
        // An address whose sign-ins (or token authentications) keep failing starts no more until its window ends.
        if let Some(retry_after) =
            from.and_then(|ip| state.authn.failures.blocked(FailureKey::Address(ip), state.now()))
        {
            return Err(LoginRefusal::RateLimited(retry_after).into());
        }
        let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
        let tenant: TenantId = parse_id(&q.tenant)?;
        let cli = match (q.cli_redirect, q.cli_challenge) {
            (Some(redirect), Some(challenge)) => Some(CliLogin { redirect, challenge }),
            (None, None) => None,
            _ => return Err(ApiError::bad_request("cli_redirect and cli_challenge go together").into()),
        };
        let begin = Begin { tenant, return_to: q.return_to, max_age: q.max_age, cli };
        login::begin(&state, begin, from).await.map_err(StartError::from)
    }
    .await;
    match started {
        Ok(started) => {
            let mut resp = redirect(StatusCode::FOUND, &started.authorize_url);
            add_cookie(&mut resp, &set_cookie(LOGIN_COOKIE, &started.cookie, LOGIN_TTL));
            resp
        }
        Err(StartError::Refused(refusal)) => {
            let retry_after = match &refusal {
                LoginRefusal::RateLimited(after) | LoginRefusal::Busy { retry_after: after, .. } => Some(*after),
                _ => None,
            };
            let mut resp = ApiError::from(refusal).into_response();
            if let Some(after) = retry_after {
                resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(after.as_secs().max(1)));
            }
            resp
        }
        Err(StartError::Api(e)) => e.into_response(),
    }
}

/// Why a sign-in did not start: a typed refusal (its status, code and any `Retry-After` mapped here), or a request the
/// API refused before it reached the sign-in.
enum StartError {
    Refused(LoginRefusal),
    Api(ApiError),
}

impl From<LoginRefusal> for StartError {
    fn from(r: LoginRefusal) -> Self {
        StartError::Refused(r)
    }
}

impl From<ApiError> for StartError {
    fn from(e: ApiError) -> Self {
        StartError::Api(e)
    }
}

/// The identity provider's redirect back: the login is finished and a session opened (cookie `__Host-airlock_session`),
/// or refused with a reason; for a CLI login, the browser goes on to the CLI's loopback with a one-time code.
#[utoipa::path(get, path = "/v1/auth/callback",
    params(("state" = String, Query, description = "the login's state"),
        ("code" = Option<String>, Query, description = "the authorization code"),
        ("error" = Option<String>, Query, description = "the provider's refusal"),
        ("iss" = Option<String>, Query, description = "the provider's issuer (RFC 9207), checked when sent")),
    responses((status = 302, description = "to the CLI's loopback with a one-time code"),
        (status = 303, description = "signed in: to `return_to`, with the session cookie"),
        (status = 400, body = super::ErrorBody, description = "no such login in progress, or not from this browser"),
        (status = 401, body = super::ErrorBody, description = "the provider or its ID token refused"),
        (status = 403, body = super::ErrorBody, description = "MFA required, or the groups map to no role"),
        (status = 404, body = super::ErrorBody, description = "the tenant has no identity provider any more"),
        (status = 500, body = super::ErrorBody),
        (status = 502, body = super::ErrorBody, description = "the identity provider cannot be used")))]
pub(super) async fn callback(
    State(state): State<Arc<AppState>>,
    from: Option<axum::Extension<ClientAddr>>,
    headers: HeaderMap,
    query: Result<Query<CallbackQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let q = match query {
        Ok(Query(q)) => q,
        Err(e) => return ApiError::bad_request(e.body_text()).into_response(),
    };
    let bounded = |v: &Option<String>, max: usize| v.as_ref().is_none_or(|s| s.len() <= max);
    let Some(login_state) = q.state.filter(|s| !s.is_empty() && s.len() <= 128) else {
        return ApiError::bad_request("the callback has no usable state").into_response();
    };
    if !bounded(&q.code, 4096) || !bounded(&q.error, 256) || !bounded(&q.iss, 512) {
        return ApiError::bad_request("the callback's code or error is too long").into_response();
    }
    let cb = Callback { state: login_state, code: q.code, error: q.error, iss: q.iss };
    let login_cookie = cookie(&headers, LOGIN_COOKIE);
    let finished = login::finish(&state, cb, login_cookie).await;
    let clear_login = set_cookie(LOGIN_COOKIE, "", Duration::ZERO);
    match finished {
        Ok((Finished::Browser { secret, return_to }, _)) => {
            let mut resp = redirect(StatusCode::SEE_OTHER, return_to.as_deref().unwrap_or("/v1/auth/session"));
            add_cookie(&mut resp, &set_cookie(SESSION_COOKIE, secret.expose(), state.sso.limits.absolute));
            add_cookie(&mut resp, &clear_login);
            resp
        }
        Ok((Finished::Cli { redirect: to }, _)) => {
            let mut resp = redirect(StatusCode::FOUND, &to);
            add_cookie(&mut resp, &clear_login);
            resp
        }
        Err(refused) => {
            // A failed sign-in counts against its address as a failed token authentication does (`authn::FailureLimiter`).
            if let Some(axum::Extension(ClientAddr(ip))) = from {
                state.authn.failures.fail(FailureKey::Address(ip), state.now());
            }
            login::audit_refusal(&state, &refused).await;
            ApiError::from(refused.refusal).into_response()
        }
    }
}

/// The CLI's last step of `airlock login`: its one-time code and PKCE verifier for the session credential.
#[utoipa::path(post, path = "/v1/auth/cli/exchange",
    request_body = CliExchange,
    responses((status = 200, body = CliSessionView),
        (status = 401, body = super::ErrorBody, description = "unknown, used or expired code, or a wrong verifier")))]
pub(super) async fn cli_exchange(
    State(state): State<Arc<AppState>>,
    body: Result<ApiJson<CliExchange>, ApiError>,
) -> Result<Json<CliSessionView>, ApiError> {
    let ApiJson(body) = body?;
    if body.code.len() > 128 || body.verifier.len() > 128 {
        return Err(ApiError::bad_request("code and verifier are at most 128 characters"));
    }
    let secret = login::exchange_cli_code(&state, &body.code, &body.verifier).ok_or_else(|| {
        ApiError::unauthorized("unknown, used or expired code, or a wrong verifier; run `airlock login` again")
    })?;
    Ok(Json(CliSessionView { session: secret.expose().to_owned() }))
}

/// Who is signed in: the session's subject, when they signed in at the provider, and the roles their groups map to here.
#[utoipa::path(get, path = "/v1/auth/session", security(("bearer" = [])),
    responses((status = 200, body = SessionView)))]
pub(super) async fn session(Authed(scope): Authed) -> Json<SessionView> {
    let roles = scope
        .grants()
        .map(|g| {
            g.roles
                .iter()
                .map(|(r, ws)| RoleView { role: r.as_str().to_owned(), workspace_id: ws.map(|w| w.to_string()) })
                .collect()
        })
        .unwrap_or_default();
    let (subject, session_id, auth_time) = match scope.principal() {
        Principal::User { subject, session, auth_time, .. } => {
            (Some(subject.clone()), Some(session.to_string()), Some(auth_time.to_string()))
        }
        _ => (None, None, None),
    };
    Json(SessionView {
        tenant_id: scope.tenant().to_string(),
        principal: scope.principal().actor(),
        subject,
        session_id,
        auth_time,
        roles,
    })
}

/// Sign out: the session ends at once, and the cookie is cleared. When the provider has an `end_session_endpoint`, the
/// answer names where to send the browser so the provider's session ends too.
#[utoipa::path(post, path = "/v1/auth/logout", security(("bearer" = [])),
    responses((status = 200, body = LoggedOutView),
        (status = 400, body = super::ErrorBody, description = "the caller is an API token, not a session")))]
pub(super) async fn logout(State(state): State<Arc<AppState>>, Authed(scope): Authed) -> Response {
    if !matches!(scope.principal(), Principal::User { .. }) {
        return ApiError::bad_request("only a session signs out; revoke an API token with `airlock token revoke`")
            .into_response();
    }
    match crate::sso::sessions::logout(&state, &scope).await {
        Ok(ended) => {
            let provider_logout_url =
                if ended { crate::sso::sessions::provider_logout_url(&state, &scope).await } else { None };
            let mut resp = Json(LoggedOutView { ended, provider_logout_url }).into_response();
            add_cookie(&mut resp, &set_cookie(SESSION_COOKIE, "", Duration::ZERO));
            resp
        }
        Err(e) => ApiError::from(e).into_response(),
    }
}

fn redirect(status: StatusCode, to: &str) -> Response {
    let mut resp = status.into_response();
    match HeaderValue::from_str(to) {
        Ok(v) => {
            resp.headers_mut().insert(header::LOCATION, v);
            resp
        }
        Err(_) => ApiError::internal("a redirect is not a valid header").into_response(),
    }
}

fn add_cookie(resp: &mut Response, cookie: &str) {
    if let Ok(v) = HeaderValue::from_str(cookie) {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
}

impl From<LoginRefusal> for ApiError {
    fn from(e: LoginRefusal) -> Self {
        let status = match &e {
            LoginRefusal::BadRequest(_)
            | LoginRefusal::UnknownState
            | LoginRefusal::CookieMismatch
            | LoginRefusal::Expired => StatusCode::BAD_REQUEST,
            LoginRefusal::NoProvider => StatusCode::NOT_FOUND,
            // Both say when to retry (`Retry-After`, set by the login handler): a crowded table frees a place when its
            // oldest login expires, so this is a wait, like a rate limit, not the server failing.
            LoginRefusal::RateLimited(_) | LoginRefusal::Busy { .. } => StatusCode::TOO_MANY_REQUESTS,
            LoginRefusal::ProviderRefused(_)
            | LoginRefusal::ProviderChanged
            | LoginRefusal::IssuerMismatch
            | LoginRefusal::CodeRejected
            | LoginRefusal::IdToken(_)
            | LoginRefusal::NonceMismatch
            | LoginRefusal::BadClaims(_)
            | LoginRefusal::NotRecent => StatusCode::UNAUTHORIZED,
            LoginRefusal::MfaRequired | LoginRefusal::NoRole => StatusCode::FORBIDDEN,
            LoginRefusal::ProviderUnavailable(_) => StatusCode::BAD_GATEWAY,
            LoginRefusal::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            LoginRefusal::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        if let LoginRefusal::Store(e) = e {
            return e.into();
        }
        if let LoginRefusal::Internal(why) = &e {
            tracing::error!(error = %why, "a sign-in failed");
            return ApiError::internal("the sign-in failed on the server");
        }
        ApiError::new(status, e.code(), e.to_string())
    }
}

impl From<IdpError> for ApiError {
    fn from(e: IdpError) -> Self {
        match e {
            IdpError::Invalid(_) => ApiError::bad_request(e.to_string()),
            IdpError::NotOwner => ApiError::forbidden(e.to_string()),
            IdpError::NotConfigured => ApiError::not_found(e.to_string()),
            IdpError::Discovery(_) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "idp_unusable", e.to_string()),
            IdpError::Key(why) => {
                tracing::error!(error = %why, "the identity provider's client secret");
                ApiError::internal("cannot seal or open the client secret")
            }
            IdpError::Store(e) => e.into(),
        }
    }
}

impl From<MappingError> for ApiError {
    fn from(e: MappingError) -> Self {
        match e {
            MappingError::Group => ApiError::bad_request(e.to_string()),
            MappingError::NoWorkspace(_) | MappingError::NoMapping(_) => ApiError::not_found(e.to_string()),
            MappingError::TooMany => ApiError::limit_exceeded(e.to_string()),
            MappingError::ExceedsMaker(_) => ApiError::forbidden(e.to_string()),
            MappingError::Store(e) => e.into(),
        }
    }
}

#[cfg(test)]
pub(super) mod tests;
