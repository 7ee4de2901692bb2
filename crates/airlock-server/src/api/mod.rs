//! The HTTPS JSON API under `/v1`, plus health, readiness and metrics.
//!
//! Trust boundary: [`Authed`] turns a bearer token into a [`TenantScope`]; each handler checks that the scope permits its [`Action`] before anything else.
//! Handlers are thin: they authorise, parse the path and body, call one domain function and map its typed result to a status and a body ([`ApiError`]).
//! Every call is audited: a mutation in the same transaction as its effect (the domain function writes it), a read or a refusal through the group-commit writer (`audited`, `refused`).
//! What a read records is decided at its route, as a [`ReadAudit`]: a read of something sensitive (held output, a manifest) is answered only after its record is durable; a routine list or status read queues its record and is answered at once, and the next group commit writes it.
//! Build the router with [`router`]; the tests drive it in memory.

pub mod appliances;
mod error;
pub mod operations;
pub mod policy;
pub mod tenancy;

use std::sync::Arc;

use airlock_core::audit::{AuditAction, Event, Outcome};
use airlock_core::token::{Secret, TokenKind};
use airlock_proto::join::{JoinRequest, JoinResponse};
use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use utoipa::{OpenApi, ToSchema};

pub use appliances::{ApplianceList, ApplianceQuery, ApplianceView};
pub use error::{ApiError, ApiJson, ErrorBody, ErrorDetail};
pub use tenancy::{CreateEnvironment, CreateJoinToken, EnvironmentView, JoinTokenView, WorkspaceView};

use crate::authz::{Action, TenantScope};
use crate::metrics::HttpLabels;
use crate::state::{AppState, SYSTEM_CHAIN, event};

/// The API router. Tests drive it in memory with `tower::ServiceExt::oneshot`.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/ca", get(get_ca))
        .route(airlock_proto::join::JOIN_PATH, post(appliances::join))
        .route("/v1/workspaces", get(tenancy::list_workspaces))
        .route(
            "/v1/workspaces/{workspace}/environments",
            get(tenancy::list_environments).post(tenancy::create_environment),
        )
        .route("/v1/environments/{environment}/join-tokens", post(tenancy::create_join_token))
        .route("/v1/appliances", get(appliances::list_appliances))
        .route("/v1/appliances/{appliance}/revoke", post(appliances::revoke_appliance))
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
    paths(get_ca, appliances::join, tenancy::list_workspaces, tenancy::list_environments, tenancy::create_environment,
        tenancy::create_join_token, appliances::list_appliances, appliances::revoke_appliance,
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

/// An authenticated caller. Failed authentication is audited on the system chain.
///
/// A valid token costs one indexed read and no write; only a refusal writes (rate limited).
/// Verified tokens are not cached: no path revokes an API token through the server yet, so
/// a cache could not be cleared when one is revoked (BENCHMARKS.md measures the read).
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

/// How a read route waits on its audit record; each route names one.
///
/// A read of sensitive data waits until its record is durable, so no one reads it
/// unrecorded even across a crash. A routine list or status read, the bulk of API traffic,
/// queues its record for the next group commit: a crash can lose the records of reads
/// answered in the last moments before it (the writer commits whatever is queued as soon as
/// it can, so that is about one batch), never a mutation's nor a sensitive read's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ReadAudit {
    /// Held output, manifests: answered after the record's fsync.
    Durable,
    /// Lists and status: answered once the record is queued.
    Access,
}

/// Audits a read or a refused call in the caller's chain and passes the result through.
async fn audited<T>(
    state: &AppState,
    scope: &TenantScope,
    kind: ReadAudit,
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
    match kind {
        ReadAudit::Durable => state.audit(&scope.chain(), ev).await?,
        ReadAudit::Access => state.audit_access(&scope.chain(), ev).await,
    }
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
        Err(e) => audited(state, scope, ReadAudit::Durable, ev, Err(e)).await,
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

#[cfg(test)]
mod tests;
