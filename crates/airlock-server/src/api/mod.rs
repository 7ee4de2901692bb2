//! The HTTPS JSON API under `/v1`, plus health, readiness and metrics.
//!
//! Trust boundary: [`Authed`] turns a bearer token into a [`TenantScope`]; handlers check the
//! scope permits their [`Action`] and pass it to the store. Every call is audited: mutations
//! in the same transaction as their effect, reads and refusals in their own.

use std::sync::Arc;
use std::time::Duration;

use airlock_core::audit::{AuditAction, Event, Outcome};
use airlock_core::id::TokenId;
use airlock_core::token::{Secret, TokenKind};
use airlock_core::{ApplianceId, ApplianceIdentity, EnvironmentId, WorkspaceId};
use airlock_proto::join::{JoinRequest, JoinResponse};
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::{OpenApi, ToSchema};

use crate::authz::{Action, TenantScope};
use crate::metrics::HttpLabels;
use crate::state::{AppState, SYSTEM_CHAIN, event, random};
use crate::store::{RedeemRefusal, StoreError};

/// The API router. Tests drive it in memory with `tower::ServiceExt::oneshot`.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/ca", get(get_ca))
        .route(airlock_proto::join::JOIN_PATH, post(join))
        .route("/v1/workspaces", get(list_workspaces))
        .route("/v1/workspaces/{workspace}/environments", get(list_environments).post(create_environment))
        .route("/v1/environments/{environment}/join-tokens", post(create_join_token))
        .route("/v1/appliances", get(list_appliances))
        .route("/v1/appliances/{appliance}/revoke", post(revoke_appliance))
        .route("/v1/workspaces/{workspace}/templates", get(operations::list_templates).post(operations::push_template))
        .route("/v1/environments/{environment}/operations", post(operations::request_operation))
        .route("/v1/environments/{environment}/policy", get(policy::get_policy).put(policy::relay_policy))
        .route("/v1/operations", get(operations::list_operations))
        .route("/v1/operations/{id}", get(operations::get_operation))
        .route("/v1/operations/{id}/approval", post(operations::relay_approval))
        .route("/v1/operations/{id}/manifest", get(operations::get_manifest))
        .route("/v1/operations/{id}/output", get(operations::get_output))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(state.clone(), count_responses))
        .with_state(state)
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Airlock control plane API", description = "Tenants, workspaces, environments, appliances, templates and signed operations."),
    paths(get_ca, join, list_workspaces, list_environments, create_environment, create_join_token, list_appliances, revoke_appliance,
        operations::push_template, operations::list_templates, operations::request_operation, operations::list_operations, operations::get_operation,
        operations::relay_approval, operations::get_manifest, operations::get_output, policy::relay_policy, policy::get_policy),
    components(schemas(ErrorBody, ErrorDetail, CaInfo, JoinRequest, JoinResponse, WorkspaceView, EnvironmentView,
        CreateEnvironment, CreateJoinToken, JoinTokenView, ApplianceView, ApplianceList,
        operations::PushTemplate, operations::TemplateView, operations::VariableView, operations::TemplateList, operations::RequestOperation,
        operations::OperationView, operations::OperationList, operations::RelayApproval, policy::RelayPolicy, policy::PolicyView)),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

// ---------- errors ----------

/// Every error the API returns: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    code: &'static str,
    message: String,
}

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into() }
    }
    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
    fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthenticated", message)
    }
    fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }
    fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }
    fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
    fn outcome(&self) -> Outcome {
        match self.status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Outcome::Denied,
            _ => Outcome::Error,
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict { .. } => Self::new(StatusCode::CONFLICT, "conflict", e.to_string()),
            other => {
                tracing::error!(error = %other, "store error");
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "the control plane store failed; retry later")
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, Json(ErrorBody { error: ErrorDetail { code: self.code, message: self.message } }))
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

/// A JSON body whose rejection is an [`ApiError`], so malformed input gets our error shape.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(rej) => Err(match rej {
                JsonRejection::MissingJsonContentType(_) => ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported_media_type",
                    "send the body as JSON with `content-type: application/json`",
                ),
                other => ApiError::bad_request(format!("malformed request body: {}", other.body_text())),
            }),
        }
    }
}

/// An authenticated caller. Failed authentication is audited on the system chain.
pub struct Authed(pub TenantScope);

impl FromRequestParts<Arc<AppState>> for Authed {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, ApiError> {
        let path = parts.uri.path().to_owned();
        let refuse = |why: &'static str| async move {
            let mut ev = event("anonymous", AuditAction::ApiAuthenticate, Outcome::Denied);
            ev.detail = serde_json::json!({ "reason": why, "path": path.chars().take(200).collect::<String>() });
            state.audit_refusal(SYSTEM_CHAIN, ev).await;
            ApiError::unauthorized(format!("{why}; send `Authorization: Bearer airlock_at_…`"))
        };
        let Some(value) = parts.headers.get(header::AUTHORIZATION) else {
            return Err(refuse("missing bearer token").await);
        };
        let Some(text) = value.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")) else {
            return Err(refuse("malformed authorization header").await);
        };
        let Ok(secret) = Secret::parse(TokenKind::Api, text) else {
            return Err(refuse("malformed API token").await);
        };
        match state.store.api_token_by_hash(&secret.hash()).await? {
            Some(row) => Ok(Authed(TenantScope::for_api_token(row))),
            None => Err(refuse("unknown or revoked API token").await),
        }
    }
}

/// Checks `action` is allowed and audits the refusal if not.
async fn authorize(
    state: &AppState,
    scope: &TenantScope,
    action: Action,
    target: Option<String>,
) -> Result<(), ApiError> {
    if scope.permits(action) {
        return Ok(());
    }
    let mut ev = event(scope.principal().actor(), action.audit_action(), Outcome::Denied);
    ev.target = target;
    state.audit_refusal(&scope.chain(), ev).await;
    Err(ApiError::forbidden(format!("this token may not perform {}", action.as_str())))
}

/// Audits a read or a refused call in the caller's chain and passes the result through.
async fn audited<T>(
    state: &AppState,
    scope: &TenantScope,
    mut ev: Event,
    result: Result<T, ApiError>,
) -> Result<T, ApiError> {
    if let Err(e) = &result {
        ev.outcome = e.outcome();
        // Messages about malformed input can quote that input; the audit keeps only the kind.
        ev.detail = if e.code == "bad_request" {
            serde_json::json!({ "error": e.code })
        } else {
            serde_json::json!({ "error": e.code, "message": e.message })
        };
    }
    state.audit(&scope.chain(), ev).await?;
    result
}

/// Passes a mutation's result through, auditing it in the caller's chain if it failed (a
/// mutation that succeeded committed its own audit record with its effect).
async fn refused<T>(
    state: &AppState,
    scope: &TenantScope,
    ev: Event,
    result: Result<T, ApiError>,
) -> Result<T, ApiError> {
    match result {
        Ok(v) => Ok(v),
        Err(e) => audited(state, scope, ev, Err(e)).await,
    }
}

fn parse_id<T: std::str::FromStr>(s: &str) -> Result<T, ApiError>
where
    T::Err: std::fmt::Display,
{
    s.parse().map_err(|e: T::Err| ApiError::bad_request(e.to_string()))
}

// ---------- unauthenticated ----------

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    match state.store.ping().await {
        Ok(()) => Json(serde_json::json!({ "status": "ready" })).into_response(),
        Err(_) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", "store unavailable").into_response(),
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], state.metrics.render())
        .into_response()
}

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route; see /v1/openapi.json")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed on this route")
}

async fn count_responses(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    state.metrics.http_responses.get_or_create(&HttpLabels { status: resp.status().as_u16() }).inc();
    resp
}

#[derive(Serialize, ToSchema)]
pub struct CaInfo {
    certificate_pem: String,
    fingerprint: String,
}

/// The control plane CA certificate. Public; compare its fingerprint with the one you pinned.
#[utoipa::path(get, path = "/v1/ca", responses((status = 200, body = CaInfo)))]
async fn get_ca(State(state): State<Arc<AppState>>) -> Json<CaInfo> {
    Json(CaInfo { certificate_pem: state.ca.cert_pem().to_owned(), fingerprint: state.ca.fingerprint().to_string() })
}

/// Exchange a single-use join token and a CSR for an appliance certificate.
#[utoipa::path(post, path = "/v1/join", request_body = JoinRequest,
    responses((status = 200, body = JoinResponse), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
async fn join(
    State(state): State<Arc<AppState>>,
    ApiJson(req): ApiJson<JoinRequest>,
) -> Result<Json<JoinResponse>, ApiError> {
    let now = state.now();
    let refuse = |chain: String, why: String, status: StatusCode| {
        let state = state.clone();
        async move {
            let mut ev = event("anonymous", AuditAction::ApplianceJoin, Outcome::Denied);
            ev.detail = serde_json::json!({ "reason": why });
            state.audit_refusal(&chain, ev).await;
            ApiError::new(
                status,
                if status == StatusCode::BAD_REQUEST { "bad_request" } else { "unauthenticated" },
                why,
            )
        }
    };
    let secret = match Secret::parse(TokenKind::Join, &req.join_token) {
        Ok(s) => s,
        Err(e) => return Err(refuse(SYSTEM_CHAIN.into(), e.to_string(), StatusCode::UNAUTHORIZED).await),
    };
    // An unknown token is refused without taking the write lock, so guessing costs nothing
    // but a read.
    if !state.store.join_token_known(&secret.hash()).await? {
        return Err(refuse(SYSTEM_CHAIN.into(), "unknown join token".into(), StatusCode::UNAUTHORIZED).await);
    }
    // The CSR's self-signature proves possession of its key; checked before anything is spent.
    let join_key = match crate::ca::csr_public_key(&req.csr_pem) {
        Ok(k) => k,
        Err(e) => return Err(refuse(SYSTEM_CHAIN.into(), format!("CSR refused: {e}"), StatusCode::BAD_REQUEST).await),
    };
    let fresh = ApplianceId::from_random(random());
    let mut tx = state.store.write().await?;
    let redeemed = tx.redeem_join_token(&secret.hash(), fresh, now).await?;
    // The same appliance asking again with the same key, while the token would still be
    // valid, is a join whose response was lost: answer it again instead of stranding it.
    let retry = match &redeemed {
        Err(RedeemRefusal::AlreadyUsed { tenant, by: Some(by), expires_at }) if now < *expires_at => {
            tx.join_retry_environment(*tenant, *by, &join_key).await?.map(|env| (*tenant, env, *by))
        }
        _ => None,
    };
    let trust_domain = state.ca.trust_domain().to_owned();
    let (identity, token, retried) = match (redeemed, retry) {
        (Ok(r), _) => {
            let identity =
                ApplianceIdentity { trust_domain, tenant: r.tenant, environment: r.environment, appliance: fresh };
            (identity, Some(r.token), false)
        }
        (Err(_), Some((tenant, environment, appliance))) => {
            (ApplianceIdentity { trust_domain, tenant, environment, appliance }, None, true)
        }
        (Err(refusal), None) => {
            drop(tx);
            let (chain, why) = match refusal {
                RedeemRefusal::Unknown => (SYSTEM_CHAIN.to_owned(), "unknown join token".to_owned()),
                RedeemRefusal::AlreadyUsed { tenant, .. } => (
                    tenant.to_string(),
                    "join token was already used; issue a new one with `airlock env join-token`".to_owned(),
                ),
                RedeemRefusal::Expired { tenant, expired_at } => (
                    tenant.to_string(),
                    format!("join token expired at {expired_at}; issue a new one with `airlock env join-token`"),
                ),
            };
            return Err(refuse(chain, why, StatusCode::UNAUTHORIZED).await);
        }
    };
    let appliance = identity.appliance;
    let issued = match state.ca.sign_join_csr(&req.csr_pem, &identity, now, state.appliance_cert_lifetime) {
        Ok(i) => i,
        Err(e) => {
            // Rolling back leaves the token unspent: a bad CSR should not burn it.
            drop(tx);
            return Err(refuse(identity.tenant.to_string(), format!("CSR refused: {e}"), StatusCode::BAD_REQUEST).await);
        }
    };
    let version: String = req.version.chars().filter(|c| !c.is_control()).take(64).collect();
    if retried {
        tx.record_renewal(&TenantScope::for_appliance(&identity), appliance, &issued.serial, issued.not_after).await?;
    } else {
        tx.insert_appliance(&identity, &version, (&issued.serial, issued.not_after), &join_key, now).await?;
    }
    let mut ev = event(format!("appliance:{appliance}"), AuditAction::ApplianceJoin, Outcome::Success);
    ev.target = Some(appliance.to_string());
    ev.detail = serde_json::json!({
        "environment": identity.environment.to_string(),
        "join_token": token.map(|t| t.to_string()),
        "retry_of_lost_response": retried,
        "serial": issued.serial,
        "not_after": issued.not_after.to_string(),
    });
    tx.audit(&identity.tenant.to_string(), now, ev).await?;
    tx.commit().await?;
    state.metrics.joins.inc();
    tracing::info!(%appliance, environment = %identity.environment, retried, "appliance joined");
    Ok(Json(JoinResponse {
        appliance_id: appliance.to_string(),
        identity: identity.uri(),
        certificate_pem: issued.pem,
        ca_certificate_pem: state.ca.cert_pem().to_owned(),
        gateway_endpoint: state.gateway_endpoint.clone(),
        gateway_server_name: state.gateway_server_name.clone(),
        not_after: issued.not_after.to_string(),
    }))
}

// ---------- authenticated ----------

#[derive(Serialize, Deserialize, ToSchema)]
pub struct WorkspaceView {
    pub id: String,
    pub name: String,
    pub created_at: String,
}

/// List the workspaces of the caller's tenant.
#[utoipa::path(get, path = "/v1/workspaces", security(("bearer" = [])),
    responses((status = 200, body = Vec<WorkspaceView>), (status = 401, body = ErrorBody)))]
async fn list_workspaces(
    State(state): State<Arc<AppState>>,
    Authed(scope): Authed,
) -> Result<Json<Vec<WorkspaceView>>, ApiError> {
    authorize(&state, &scope, Action::ListWorkspaces, None).await?;
    let result = state.store.list_workspaces(&scope).await.map_err(ApiError::from).map(|ws| {
        ws.into_iter()
            .map(|w| WorkspaceView { id: w.id.to_string(), name: w.name, created_at: w.created_at.to_string() })
            .collect()
    });
    let ev = event(scope.principal().actor(), Action::ListWorkspaces.audit_action(), Outcome::Success);
    audited(&state, &scope, ev, result).await.map(Json)
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct EnvironmentView {
    pub id: String,
    pub workspace_id: String,
    pub name: String,
    pub created_at: String,
}

impl From<crate::store::Environment> for EnvironmentView {
    fn from(e: crate::store::Environment) -> Self {
        Self {
            id: e.id.to_string(),
            workspace_id: e.workspace_id.to_string(),
            name: e.name,
            created_at: e.created_at.to_string(),
        }
    }
}

/// List the environments of a workspace.
#[utoipa::path(get, path = "/v1/workspaces/{workspace}/environments", security(("bearer" = [])),
    params(("workspace" = String, Path, description = "workspace id (wsp_…)")),
    responses((status = 200, body = Vec<EnvironmentView>), (status = 404, body = ErrorBody)))]
async fn list_environments(
    State(state): State<Arc<AppState>>,
    Authed(scope): Authed,
    Path(workspace): Path<String>,
) -> Result<Json<Vec<EnvironmentView>>, ApiError> {
    authorize(&state, &scope, Action::ListEnvironments, Some(workspace.clone())).await?;
    let result = async {
        let ws: WorkspaceId = parse_id(&workspace)?;
        if !state.store.workspace_exists(&scope, ws).await? {
            return Err(ApiError::not_found(format!("no workspace {ws} in your tenant")));
        }
        Ok(state.store.list_environments(&scope, ws).await?.into_iter().map(EnvironmentView::from).collect())
    }
    .await;
    let mut ev = event(scope.principal().actor(), Action::ListEnvironments.audit_action(), Outcome::Success);
    ev.workspace = Some(workspace);
    audited(&state, &scope, ev, result).await.map(Json)
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateEnvironment {
    /// 1–64 characters: letters, digits, `-`, `_`, `.`.
    pub name: String,
}

/// Create an environment (one customer deployment) in a workspace.
#[utoipa::path(post, path = "/v1/workspaces/{workspace}/environments", security(("bearer" = [])),
    params(("workspace" = String, Path, description = "workspace id (wsp_…)")),
    request_body = CreateEnvironment,
    responses((status = 201, body = EnvironmentView), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn create_environment(
    State(state): State<Arc<AppState>>,
    Authed(scope): Authed,
    Path(workspace): Path<String>,
    body: Result<ApiJson<CreateEnvironment>, ApiError>,
) -> Result<(StatusCode, Json<EnvironmentView>), ApiError> {
    authorize(&state, &scope, Action::CreateEnvironment, Some(workspace.clone())).await?;
    let mut ev = event(scope.principal().actor(), Action::CreateEnvironment.audit_action(), Outcome::Success);
    ev.workspace = Some(workspace.clone());
    let checked = async {
        let ApiJson(body) = body?;
        let ws: WorkspaceId = parse_id(&workspace)?;
        validate_name(&body.name)?;
        if !state.store.workspace_exists(&scope, ws).await? {
            return Err(ApiError::not_found(format!("no workspace {ws} in your tenant")));
        }
        Ok((ws, body.name))
    }
    .await;
    let (ws, name) = match checked {
        Ok(v) => v,
        Err(e) => return audited(&state, &scope, ev, Err(e)).await,
    };
    let id = EnvironmentId::from_random(random());
    let now = state.now();
    let mut tx = state.store.write().await?;
    let env = match tx.create_environment(&scope, ws, id, &name, now).await {
        Ok(env) => env,
        Err(e) => {
            drop(tx);
            return audited(&state, &scope, ev, Err(e.into())).await;
        }
    };
    ev.target = Some(id.to_string());
    ev.detail = serde_json::json!({ "name": name });
    tx.audit(&scope.chain(), now, ev).await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(env.into())))
}

#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct CreateJoinToken {
    /// Lifetime in seconds; default 900 (15 minutes), at most 86400.
    pub ttl_seconds: Option<u64>,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct JoinTokenView {
    /// The token in clear. Shown once; only its hash is stored.
    pub token: String,
    pub environment_id: String,
    pub expires_at: String,
}

const MAX_JOIN_TOKEN_TTL: Duration = Duration::from_secs(86_400);

/// Create a single-use join token for an environment.
#[utoipa::path(post, path = "/v1/environments/{environment}/join-tokens", security(("bearer" = [])),
    params(("environment" = String, Path, description = "environment id (env_…)")),
    request_body = CreateJoinToken,
    responses((status = 201, body = JoinTokenView), (status = 404, body = ErrorBody)))]
async fn create_join_token(
    State(state): State<Arc<AppState>>,
    Authed(scope): Authed,
    Path(environment): Path<String>,
    body: Result<ApiJson<CreateJoinToken>, ApiError>,
) -> Result<(StatusCode, Json<JoinTokenView>), ApiError> {
    authorize(&state, &scope, Action::CreateJoinToken, Some(environment.clone())).await?;
    let mut ev = event(scope.principal().actor(), Action::CreateJoinToken.audit_action(), Outcome::Success);
    ev.target = Some(environment.clone());
    let checked = async {
        let ApiJson(body) = body?;
        let env_id: EnvironmentId = parse_id(&environment)?;
        let ttl = body.ttl_seconds.map_or(state.join_token_ttl, Duration::from_secs);
        if ttl.is_zero() || ttl > MAX_JOIN_TOKEN_TTL {
            return Err(ApiError::bad_request("ttl_seconds must be between 1 and 86400"));
        }
        let env = state
            .store
            .get_environment(&scope, env_id)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("no environment {env_id} in your tenant")))?;
        Ok((env, ttl))
    }
    .await;
    let (env, ttl) = match checked {
        Ok(v) => v,
        Err(e) => return audited(&state, &scope, ev, Err(e)).await,
    };
    let secret = Secret::from_random(TokenKind::Join, random());
    let token_id = TokenId::from_random(random());
    let now = state.now();
    let expires_at = now.saturating_add(ttl);
    let mut tx = state.store.write().await?;
    tx.create_join_token(&scope, env.id, token_id, &secret.hash(), now, expires_at).await?;
    ev.workspace = Some(env.workspace_id.to_string());
    ev.detail = serde_json::json!({ "join_token": token_id.to_string(), "expires_at": expires_at.to_string() });
    tx.audit(&scope.chain(), now, ev).await?;
    tx.commit().await?;
    Ok((
        StatusCode::CREATED,
        Json(JoinTokenView {
            token: secret.expose().to_owned(),
            environment_id: env.id.to_string(),
            expires_at: expires_at.to_string(),
        }),
    ))
}

#[derive(Serialize, Deserialize, ToSchema, Clone)]
pub struct ApplianceView {
    pub id: String,
    pub environment_id: String,
    pub connected: bool,
    pub revoked: bool,
    pub version: String,
    pub healthy: Option<bool>,
    pub last_heartbeat: Option<String>,
    pub cert_serial: String,
    pub cert_not_after: String,
    pub joined_at: String,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct ApplianceList {
    pub appliances: Vec<ApplianceView>,
}

#[derive(Deserialize)]
pub struct ApplianceQuery {
    environment: Option<String>,
}

/// List appliances, with live status merged from the gateway.
#[utoipa::path(get, path = "/v1/appliances", security(("bearer" = [])),
    params(("environment" = Option<String>, Query, description = "only this environment (env_…)")),
    responses((status = 200, body = ApplianceList)))]
async fn list_appliances(
    State(state): State<Arc<AppState>>,
    Authed(scope): Authed,
    query: Result<Query<ApplianceQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<ApplianceList>, ApiError> {
    authorize(&state, &scope, Action::ListAppliances, None).await?;
    let result = async {
        let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
        let env = q.environment.as_deref().map(parse_id::<EnvironmentId>).transpose()?;
        let rows = state.store.list_appliances(&scope, env).await?;
        let appliances = rows
            .into_iter()
            .map(|r| {
                let live = state.registry.status(&r.id);
                ApplianceView {
                    id: r.id.to_string(),
                    environment_id: r.environment_id.to_string(),
                    connected: live.is_some(),
                    revoked: r.revoked_at.is_some(),
                    version: live.as_ref().map_or(r.version.clone(), |l| l.version.clone()),
                    healthy: live.as_ref().map(|l| l.healthy),
                    last_heartbeat: live.as_ref().map(|l| l.last_heartbeat).or(r.last_seen_at).map(|t| t.to_string()),
                    cert_serial: live.as_ref().map_or(r.cert_serial.clone(), |l| l.cert_serial.clone()),
                    cert_not_after: live.as_ref().map_or(r.cert_not_after, |l| l.cert_not_after).to_string(),
                    joined_at: r.joined_at.to_string(),
                }
            })
            .collect();
        Ok(ApplianceList { appliances })
    }
    .await;
    let ev = event(scope.principal().actor(), Action::ListAppliances.audit_action(), Outcome::Success);
    audited(&state, &scope, ev, result).await.map(Json)
}

/// Revoke an appliance: its live stream closes at once and its certificates are refused.
#[utoipa::path(post, path = "/v1/appliances/{appliance}/revoke", security(("bearer" = [])),
    params(("appliance" = String, Path, description = "appliance id (apl_…)")),
    responses((status = 200, body = ApplianceView), (status = 404, body = ErrorBody)))]
async fn revoke_appliance(
    State(state): State<Arc<AppState>>,
    Authed(scope): Authed,
    Path(appliance): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    authorize(&state, &scope, Action::RevokeAppliance, Some(appliance.clone())).await?;
    let mut ev = event(scope.principal().actor(), Action::RevokeAppliance.audit_action(), Outcome::Success);
    ev.target = Some(appliance.clone());
    let id: ApplianceId = match parse_id(&appliance) {
        Ok(id) => id,
        Err(e) => return audited(&state, &scope, ev, Err(e)).await,
    };
    let now = state.now();
    let mut tx = state.store.write().await?;
    if !tx.revoke_appliance(&scope, id, now).await? {
        drop(tx);
        return audited(&state, &scope, ev, Err(ApiError::not_found(format!("no appliance {id} in your tenant"))))
            .await;
    }
    // Refuse new handshakes and streams from before the commit returns (so no window opens
    // between commit and enforcement), but end the live stream only once the revocation is
    // durably recorded: a revocation that fails to commit must not have taken effect.
    state.revoked.insert(id);
    let was_connected = state.registry.status(&id).is_some();
    ev.detail = serde_json::json!({ "was_connected": was_connected });
    let committed = async {
        tx.audit(&scope.chain(), now, ev).await?;
        tx.commit().await
    }
    .await;
    if let Err(e) = committed {
        state.revoked.remove(&id);
        return Err(e.into());
    }
    state.registry.kick(id, crate::registry::Kick::Revoked);
    tracing::info!(appliance = %id, was_connected, "appliance revoked");
    Ok(Json(serde_json::json!({ "id": id.to_string(), "revoked": true, "was_connected": was_connected })))
}

fn validate_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request("name must be 1–64 characters of letters, digits, `-`, `_` or `.`"))
    }
}

pub mod operations;
pub mod policy;

#[cfg(test)]
mod tests;
