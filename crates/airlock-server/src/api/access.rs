//! The one authorization path: every request is matched to its route's entry in [`ROUTES`] and, unless the route is public, authenticated and decided before any handler work.
//!
//! A route with no entry is refused with 403 and logged as a bug (a test walks the router so none ships).
//! The decision is Cedar's ([`crate::authz::Engine`]) on the action's permission and the resource its path names; a handler gets its [`TenantScope`] through [`Authed`] only once it is permitted.
//! A caller is an API token (`Authorization: Bearer airlock_at_…`) or a signed-in user's session: the `__Host-airlock_session` cookie, or the CLI's `Authorization: Bearer airlock_ss_…`.
//! A cookie-authenticated unsafe request (not GET or HEAD) must show it comes from this server's own pages: `Origin` equal to the public URL, or `x-airlock-csrf: 1` (which a cross-site form cannot send); else 403 `csrf_refused`, before the session is even looked up.
//! A user whose roles span workspaces is confined, before the decision, to the workspace the request acts in: the one its path (or a list's query) names, or that of the environment, operation, rollout or appliance it names, looked up in the tenant (`TenantScope::within_workspace`); a workspace role then counts there and nowhere else.
//! An operation, a rollout or an appliance named by id is a resource of its workspace: a principal confined to a workspace (a workspace token, a user whose roles are all in one) is decided on it with its workspace roles, and the store resolves the id within that workspace, so another workspace's is answered as a missing one (404).
//! A list across workspaces (`/v1/appliances`, `/v1/operations`) is decided on the workspace its `workspace` query parameter names, read as its handler reads it, else on the tenant; a principal with no role tenant-wide is refused the latter as `workspace_required`.
//! Step-up: a session exercising identity or token management needs a sign-in within the tenant's `max_age`, else 401 `reauthentication_required` with `x-airlock-login` naming the login URL.
//! Refusals are audited (rate limited, `AppState::audit_refusal`): failed authentication on the token's tenant chain if the secret named a known token, else on the system chain; a denied action on the caller's chain.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use airlock_core::audit::{AuditAction, Outcome};
use axum::extract::{FromRequestParts, MatchedPath, Query, RawPathParams, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::ApiError;
use crate::authn::{AuthnRefusal, Refused};
use std::time::Duration;

use airlock_core::token::TokenKind;

use crate::authz::{Action, Decision, DenyReason, Principal, ResourceKind, Target, TenantScope};
use crate::state::{AppState, SYSTEM_CHAIN, event};

/// Who may call a route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Anyone: health, the CA, the OpenAPI document, an appliance's join (its join token is its credential).
    Public,
    /// An authenticated principal permitted the action.
    Api(Action),
    /// Any authenticated principal, acting on its own credential only (its session: shown, ended); no action to decide.
    Own,
}

/// Every route: method, path as registered, and who may call it.
pub const ROUTES: &[(Method, &str, Access)] = &[
    (Method::GET, "/healthz", Access::Public),
    (Method::GET, "/readyz", Access::Public),
    (Method::GET, "/metrics", Access::Api(Action::ReadMetrics)),
    (Method::GET, "/v1/openapi.json", Access::Public),
    (Method::GET, "/v1/ca", Access::Public),
    (Method::POST, "/v1/join", Access::Public),
    (Method::POST, "/v1/join/challenge", Access::Public),
    (Method::GET, "/v1/workspaces", Access::Api(Action::ListWorkspaces)),
    (Method::GET, "/v1/workspaces/{workspace}/environments", Access::Api(Action::ListEnvironments)),
    (Method::POST, "/v1/workspaces/{workspace}/environments", Access::Api(Action::CreateEnvironment)),
    (Method::POST, "/v1/environments/{environment}/join-tokens", Access::Api(Action::CreateJoinToken)),
    (Method::GET, "/v1/environments/{environment}/join-rules", Access::Api(Action::ListJoinRules)),
    (Method::POST, "/v1/environments/{environment}/join-rules", Access::Api(Action::AddJoinRule)),
    (Method::DELETE, "/v1/environments/{environment}/join-rules/{rule}", Access::Api(Action::RemoveJoinRule)),
    (Method::GET, "/v1/appliances", Access::Api(Action::ListAppliances)),
    (Method::POST, "/v1/appliances/{appliance}/revoke", Access::Api(Action::RevokeAppliance)),
    (Method::GET, "/v1/appliances/{appliance}/deployment", Access::Api(Action::GetDeploymentStatus)),
    (Method::GET, "/v1/workspaces/{workspace}/templates", Access::Api(Action::ListTemplates)),
    (Method::POST, "/v1/workspaces/{workspace}/templates", Access::Api(Action::PushTemplate)),
    (Method::POST, "/v1/environments/{environment}/operations", Access::Api(Action::RequestOperation)),
    (Method::POST, "/v1/environments/{environment}/deployments", Access::Api(Action::RequestDeployment)),
    (Method::POST, "/v1/environments/{environment}/tasks", Access::Api(Action::RequestReleaseTask)),
    (Method::GET, "/v1/workspaces/{workspace}/rollouts", Access::Api(Action::ListRollouts)),
    (Method::POST, "/v1/workspaces/{workspace}/rollouts", Access::Api(Action::CreateRollout)),
    (Method::GET, "/v1/rollouts/{rollout}", Access::Api(Action::GetRollout)),
    (Method::GET, "/v1/environments/{environment}/policy", Access::Api(Action::GetPolicy)),
    (Method::PUT, "/v1/environments/{environment}/policy", Access::Api(Action::RelayPolicy)),
    (Method::GET, "/v1/workspaces/{workspace}/release-keys", Access::Api(Action::ListReleaseKeys)),
    (Method::POST, "/v1/workspaces/{workspace}/release-keys", Access::Api(Action::AddReleaseKey)),
    (Method::POST, "/v1/workspaces/{workspace}/release-keys/{key_id}/revoke", Access::Api(Action::RevokeReleaseKey)),
    (Method::GET, "/v1/workspaces/{workspace}/releases", Access::Api(Action::ListReleases)),
    (Method::POST, "/v1/workspaces/{workspace}/releases", Access::Api(Action::PushRelease)),
    (Method::GET, "/v1/workspaces/{workspace}/artifacts/{sha256}", Access::Api(Action::GetArtifact)),
    (Method::PUT, "/v1/workspaces/{workspace}/artifacts/{sha256}", Access::Api(Action::UploadArtifact)),
    (Method::GET, "/v1/workspaces/{workspace}/artifacts/{sha256}/bytes", Access::Api(Action::DownloadArtifact)),
    (Method::GET, "/v1/operations", Access::Api(Action::ListOperations)),
    (Method::GET, "/v1/operations/{id}", Access::Api(Action::GetOperation)),
    (Method::POST, "/v1/operations/{id}/approval", Access::Api(Action::RelayApproval)),
    (Method::GET, "/v1/operations/{id}/manifest", Access::Api(Action::GetManifest)),
    (Method::GET, "/v1/operations/{id}/output", Access::Api(Action::GetOutput)),
    (Method::GET, "/v1/tokens", Access::Api(Action::ListTokens)),
    (Method::POST, "/v1/tokens", Access::Api(Action::CreateToken)),
    (Method::POST, "/v1/tokens/{token}/rotate", Access::Api(Action::RotateToken)),
    (Method::DELETE, "/v1/tokens/{token}", Access::Api(Action::RevokeToken)),
    (Method::GET, "/v1/idp", Access::Api(Action::GetIdp)),
    (Method::PUT, "/v1/idp", Access::Api(Action::SetIdp)),
    (Method::GET, "/v1/role-mappings", Access::Api(Action::ListRoleMappings)),
    (Method::POST, "/v1/role-mappings", Access::Api(Action::AddRoleMapping)),
    (Method::DELETE, "/v1/role-mappings/{mapping}", Access::Api(Action::RemoveRoleMapping)),
    (Method::POST, "/v1/users/{subject}/end-sessions", Access::Api(Action::EndUserSessions)),
    // Sign-in: anyone may start one (rate limited, bounded) and come back from the provider; the callback's state and
    // pre-login cookie are its credential.
    (Method::GET, "/v1/auth/login", Access::Public),
    (Method::GET, "/v1/auth/callback", Access::Public),
    (Method::POST, "/v1/auth/cli/exchange", Access::Public),
    (Method::GET, "/v1/auth/session", Access::Own),
    (Method::POST, "/v1/auth/logout", Access::Own),
];

/// The entry for `method` on the route registered as `path`. `HEAD` is answered by a `GET` route.
pub fn route_access(method: &Method, path: &str) -> Option<Access> {
    let method = if method == Method::HEAD { &Method::GET } else { method };
    ROUTES.iter().find(|(m, p, _)| m == method && *p == path).map(|(_, _, a)| *a)
}

/// The source address of a request, put there by the listener (absent in in-memory tests).
#[derive(Clone, Copy, Debug)]
pub struct ClientAddr(pub IpAddr);

/// A permitted request's scope, handed once to [`Authed`].
#[derive(Clone)]
struct Admitted(Arc<Mutex<Option<TenantScope>>>);

/// The permitted caller's scope. Only [`gate`] admits one, after the decision.
pub struct Authed(pub TenantScope);

impl FromRequestParts<Arc<AppState>> for Authed {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, _state: &Arc<AppState>) -> Result<Self, ApiError> {
        let scope =
            parts.extensions.get::<Admitted>().and_then(|a| a.0.lock().unwrap_or_else(|e| e.into_inner()).take());
        scope.map(Authed).ok_or_else(|| {
            tracing::error!(path = %parts.uri.path(), "a handler asked for a caller on a request the gate did not admit");
            ApiError::internal("the request was not authorized")
        })
    }
}

/// Matches, authenticates and decides; see the module documentation.
pub(super) async fn gate(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let Some(route) = req.extensions().get::<MatchedPath>().map(|m| m.as_str().to_owned()) else {
        // No route matched: the 404 fallback answers.
        return next.run(req).await;
    };
    let access = match route_access(req.method(), &route) {
        Some(access) => access,
        // Another method of a known route: 405, answered here and not by passing the request on, so a handler
        // registered under a method the table lacks is never reached unauthenticated.
        None if ROUTES.iter().any(|(_, p, _)| *p == route) => return super::method_not_allowed_response(),
        None => {
            tracing::error!(method = %req.method(), route, "a route has no entry in the action table; refused (a bug)");
            return forbidden(DenyReason::UnmappedRoute);
        }
    };
    let action = match access {
        Access::Public => return next.run(req).await,
        Access::Api(action) => Some(action),
        Access::Own => None,
    };
    let (mut parts, body) = req.into_parts();
    let from = parts.extensions.get::<ClientAddr>().map(|a| a.0);
    let now = state.now();
    let authenticated = match credential(&parts) {
        Credential::Cookie(secret) => {
            if !same_origin(&state, &parts) {
                return csrf_refused(&state, parts.uri.path()).await;
            }
            state.authn.authenticate_session(&state.store, secret, state.sso.limits, from, now).await
        }
        Credential::SessionBearer(secret) => {
            state.authn.authenticate_session(&state.store, secret, state.sso.limits, from, now).await
        }
        Credential::Header(authorization) => state.authn.authenticate(&state.store, authorization, from, now).await,
    };
    let scope = match authenticated {
        Ok(Ok(scope)) => scope,
        Ok(Err(refused)) => return refuse_authentication(&state, refused, parts.uri.path()).await,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let Some(action) = action else {
        parts.extensions.insert(Admitted(Arc::new(Mutex::new(Some(scope)))));
        return next.run(Request::from_parts(parts, body)).await;
    };
    // A parameter that is not UTF-8 once decoded names no resource: decided as the empty id (no workspace of a token's),
    // and the handler answers 400 for it.
    let params = RawPathParams::from_request_parts(&mut parts, &state).await;
    let param = |name: &str| match &params {
        Ok(ps) => ps.iter().find(|(k, _)| *k == name).map(|(_, v)| v),
        Err(_) => Some(""),
    };
    // Only a list reads the query, so no other request pays for parsing it.
    let listed = match action.resource_kind() {
        ResourceKind::Listing => Some(Query::<ListingQuery>::try_from_uri(&parts.uri).map(|Query(q)| q)),
        _ => None,
    };
    let target = match action.resource_kind() {
        ResourceKind::Tenant => Some(Target::Tenant),
        ResourceKind::Workspace => param("workspace").map(Target::Workspace),
        ResourceKind::Environment => param("environment").map(Target::Environment),
        ResourceKind::Operation => param("id").map(Target::Operation),
        ResourceKind::Rollout => param("rollout").map(Target::Rollout),
        ResourceKind::Appliance => param("appliance").map(Target::Appliance),
        // A query that does not parse names no workspace of anyone's (its handler answers 400 for it).
        ResourceKind::Listing => match &listed {
            Some(Ok(ListingQuery { workspace: Some(ws) })) => Some(Target::Workspace(ws)),
            Some(Ok(ListingQuery { workspace: None })) => Some(Target::Tenant),
            Some(Err(_)) | None => Some(Target::Workspace("")),
        },
    };
    // A user whose roles span workspaces acts in one per request: the one its path or query names, or its
    // environment's, operation's, rollout's or appliance's (one lookup; a resource not found leaves only tenant-wide
    // roles, so a missing id, a malformed one, another tenant's and one of a workspace the user holds no role in are
    // answered alike).
    let scope = match target {
        Some(target) if scope.spans_workspaces() => match crate::tenancy::workspace_of(&state, &scope, target).await {
            Ok(Some(ws)) => scope.within_workspace(ws),
            Ok(None) => scope,
            Err(e) => return ApiError::from(e).into_response(),
        },
        _ => scope,
    };
    let decision = match target {
        Some(target) => scope.decide(&state.authz, action, target),
        None => {
            tracing::error!(route, ?action, "the action's resource is not in its route's path; refused (a bug)");
            Decision::Deny(DenyReason::UnmappedRoute)
        }
    };
    if let Decision::Deny(reason) = decision {
        let mut ev = event(scope.principal().actor(), action.audit_action(), Outcome::Denied);
        ev.target = Some(parts.uri.path().chars().take(200).collect());
        ev.detail = serde_json::json!({ "reason": reason.code(), "permission": action.permission().as_str() });
        state.audit_refusal(&scope.chain(), ev).await;
        return forbidden(reason);
    }
    if let Some(refusal) = step_up(&state, &scope, action, now).await {
        return refusal;
    }
    parts.extensions.insert(Admitted(Arc::new(Mutex::new(Some(scope)))));
    next.run(Request::from_parts(parts, body)).await
}

/// The query parameter a list across workspaces ([`ResourceKind::Listing`]) is narrowed by; its handler's query has the
/// same field, parsed by the same extractor, and the store confines the list to the scope's workspace besides.
#[derive(serde::Deserialize)]
struct ListingQuery {
    workspace: Option<String>,
}

fn forbidden(reason: DenyReason) -> Response {
    let message = match reason {
        DenyReason::WorkspaceRequired => {
            "this principal holds roles only in workspaces: name one with the `workspace` query parameter (`?workspace=wsp_…`) to list its own"
        }
        DenyReason::NotGranted => "no role of this principal grants this action here",
        DenyReason::OutsideTokenActions => "this token's action list does not include this action",
        DenyReason::OutsideTokenWorkspace => {
            "this token is confined to another workspace, or the action is tenant-wide"
        }
        DenyReason::NotAnApiPrincipal => "this principal does not act on the API",
        DenyReason::UnmappedRoute => "this route has no authorization entry (a server bug); refused",
        DenyReason::EngineError => "the authorization decision failed; refused",
    };
    ApiError::new(StatusCode::FORBIDDEN, reason.code(), message).into_response()
}

async fn refuse_authentication(state: &AppState, refused: Refused, path: &str) -> Response {
    let mut ev = event("anonymous", AuditAction::ApiAuthenticate, Outcome::Denied);
    ev.detail =
        serde_json::json!({ "reason": refused.refusal.code(), "path": path.chars().take(200).collect::<String>() });
    let chain = match &refused.known {
        Some((tenant, actor)) => {
            ev.actor = actor.clone();
            tenant.to_string()
        }
        None => SYSTEM_CHAIN.to_owned(),
    };
    state.audit_refusal(&chain, ev).await;
    match refused.refusal {
        AuthnRefusal::RateLimited { retry_after } => {
            let mut resp =
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", refused.refusal.message()).into_response();
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(retry_after.as_secs().max(1)));
            resp
        }
        other => ApiError::unauthorized(format!(
            "{}; send `Authorization: Bearer airlock_at_…`, or sign in at /v1/auth/login",
            other.message()
        ))
        .into_response(),
    }
}

/// The credential a request presents: a bearer header (an API token, or anything else, which `authn` refuses), a
/// session as a bearer (the CLI), or the session cookie (a browser). A bearer header wins over a cookie.
enum Credential<'a> {
    Header(Option<&'a [u8]>),
    SessionBearer(&'a str),
    Cookie(&'a str),
}

fn credential(parts: &Parts) -> Credential<'_> {
    let authorization = parts.headers.get(header::AUTHORIZATION).map(HeaderValue::as_bytes);
    match authorization {
        Some(value) => match std::str::from_utf8(value).ok().and_then(|v| v.strip_prefix("Bearer ")) {
            Some(text) if text.starts_with(TokenKind::Session.prefix()) => Credential::SessionBearer(text),
            _ => Credential::Header(Some(value)),
        },
        None => match crate::sso::cookie(&parts.headers, crate::sso::SESSION_COOKIE) {
            Some(secret) => Credential::Cookie(secret),
            None => Credential::Header(None),
        },
    }
}

/// Whether a cookie-authenticated request may proceed: a safe method, or `Origin` is this server, or the CSRF header is set.
fn same_origin(state: &AppState, parts: &Parts) -> bool {
    if parts.method == Method::GET || parts.method == Method::HEAD {
        return true;
    }
    let origin = parts.headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    if origin.is_some_and(|o| o == state.sso.public_url) {
        return true;
    }
    parts.headers.get(crate::sso::CSRF_HEADER).is_some_and(|v| v.as_bytes() == b"1")
}

async fn csrf_refused(state: &AppState, path: &str) -> Response {
    let mut ev = event("anonymous", AuditAction::ApiAuthenticate, Outcome::Denied);
    ev.detail = serde_json::json!({ "reason": "csrf_refused", "path": path.chars().take(200).collect::<String>() });
    state.audit_refusal(SYSTEM_CHAIN, ev).await;
    let message = "a request authenticated by the session cookie must come from this server's pages: send `Origin` (this server's URL) or `x-airlock-csrf: 1`";
    ApiError::new(StatusCode::FORBIDDEN, "csrf_refused", message).into_response()
}

/// A session exercising identity or token management whose sign-in is older than the tenant's `max_age`: 401
/// `reauthentication_required`, and where to sign in again.
async fn step_up(
    state: &AppState,
    scope: &TenantScope,
    action: Action,
    now: airlock_core::Timestamp,
) -> Option<Response> {
    let Principal::User { auth_time, .. } = scope.principal() else { return None };
    if !crate::sso::sessions::needs_step_up(action.permission()) {
        return None;
    }
    let max_age = match state.store.idp_config(scope).await {
        Ok(config) => config.and_then(|c| c.max_age_seconds)?,
        Err(e) => return Some(ApiError::from(e).into_response()),
    };
    if crate::sso::sessions::recent_enough(*auth_time, Duration::from_secs(max_age), now) {
        return None;
    }
    let mut ev = event(scope.principal().actor(), action.audit_action(), Outcome::Denied);
    ev.detail =
        serde_json::json!({ "reason": "reauthentication_required", "permission": action.permission().as_str() });
    state.audit_refusal(&scope.chain(), ev).await;
    let login = format!("/v1/auth/login?tenant={}&max_age={max_age}", scope.tenant());
    let message = format!("this action needs a sign-in within the last {max_age} s; sign in again at {login}");
    let mut resp = ApiError::new(StatusCode::UNAUTHORIZED, "reauthentication_required", message).into_response();
    if let Ok(value) = HeaderValue::from_str(&login) {
        resp.headers_mut().insert(crate::sso::LOGIN_HEADER, value);
    }
    Some(resp)
}

#[cfg(test)]
mod tests;
