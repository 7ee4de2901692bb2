//! The HTTPS JSON API under `/v1`, plus health, readiness and metrics.
//!
//! Trust boundary: [`access`] matches each request to its route's entry in the one route table, authenticates it and makes the one authorization decision before any handler runs; a handler gets its [`TenantScope`] through [`Authed`].
//! Handlers are thin: they parse the path and body, call one domain function and map its typed result to a status and a body ([`ApiError`]).
//! Every call is audited: a mutation in the same transaction as its effect (the domain function writes it), a read or a refusal through the group-commit writer (`audited`, `refused`).
//! What a read records is decided at its route, as a [`ReadAudit`]: a read of something sensitive (held output, a manifest) is answered only after its record is durable; a routine list or status read queues its record and is answered at once, and the next group commit writes it.
//! Build the router with [`router`]; the tests drive it in memory.
//! Routes come from one list (`routes`): a handler's `#[utoipa::path]` both registers and documents it, and [`contract`] completes the [`document`] with what the extractors imply, so the document is exact (schemathesis checks it against a real server).

pub mod access;
pub mod appliances;
pub mod artifacts;
mod contract;
mod error;
pub mod operations;
pub mod policy;
pub mod releases;
pub mod rollouts;
pub mod sso;
pub mod tenancy;
pub mod tokens;

use std::sync::{Arc, LazyLock};

use airlock_core::audit::Event;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::Serialize;
use utoipa::{OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use access::{Authed, ClientAddr};
pub use appliances::{ApplianceList, ApplianceQuery, ApplianceView};
pub use error::{ApiError, ApiJson, ApiPath, ErrorBody, ErrorDetail};
pub use tenancy::{CreateEnvironment, CreateJoinToken, EnvironmentView, JoinTokenView, WorkspaceView};

use crate::authz::TenantScope;
use crate::metrics::HttpLabels;
use crate::state::AppState;

/// Every route, from one list: each handler's `#[utoipa::path]` both registers it with axum and
/// documents it, so the router and [`document`] cannot disagree on a path or a method.
fn routes() -> (Router<Arc<AppState>>, utoipa::openapi::OpenApi) {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics))
        .routes(routes!(openapi))
        .routes(routes!(get_ca))
        .routes(routes!(appliances::join))
        .routes(routes!(appliances::join_challenge))
        .routes(routes!(appliances::list_join_rules, appliances::add_join_rule))
        .routes(routes!(appliances::remove_join_rule))
        .routes(routes!(tenancy::list_workspaces))
        .routes(routes!(tenancy::list_environments, tenancy::create_environment))
        .routes(routes!(tenancy::create_join_token))
        .routes(routes!(appliances::list_appliances))
        .routes(routes!(appliances::revoke_appliance))
        .routes(routes!(operations::list_templates, operations::push_template))
        .routes(routes!(operations::request_operation))
        .routes(routes!(operations::request_deployment))
        .routes(routes!(operations::request_task))
        .routes(routes!(appliances::get_deployment_status))
        .routes(routes!(rollouts::list_rollouts, rollouts::create_rollout))
        .routes(routes!(rollouts::get_rollout))
        .routes(routes!(policy::get_policy, policy::relay_policy))
        .routes(routes!(releases::list_release_keys, releases::add_release_key))
        .routes(routes!(releases::revoke_release_key))
        .routes(routes!(releases::list_releases, releases::push_release))
        .routes(routes!(artifacts::get_artifact, artifacts::put_artifact))
        .routes(routes!(artifacts::download_artifact))
        .routes(routes!(operations::list_operations))
        .routes(routes!(operations::get_operation))
        .routes(routes!(operations::relay_approval))
        .routes(routes!(operations::get_manifest))
        .routes(routes!(operations::get_output))
        .routes(routes!(tokens::list_tokens, tokens::create_token))
        .routes(routes!(tokens::rotate_token))
        .routes(routes!(tokens::revoke_token))
        .routes(routes!(sso::get_idp, sso::set_idp))
        .routes(routes!(sso::list_role_mappings, sso::add_role_mapping))
        .routes(routes!(sso::remove_role_mapping))
        .routes(routes!(sso::end_user_sessions))
        .routes(routes!(sso::login))
        .routes(routes!(sso::callback))
        .routes(routes!(sso::cli_exchange))
        .routes(routes!(sso::session))
        .routes(routes!(sso::logout))
        .split_for_parts()
}

/// The API router. Tests drive it in memory with `tower::ServiceExt::oneshot`.
pub fn router(state: Arc<AppState>) -> Router {
    routes()
        .0
        // Runs on matched routes only, where the route's entry and path parameters are known.
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), access::gate))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn(limit_body))
        // Replaced by `limit_body`'s per-route limits.
        .layer(axum::extract::DefaultBodyLimit::disable())
        .layer(axum::middleware::from_fn_with_state(state.clone(), count_responses))
        .with_state(state)
}

/// The largest body `POST /v1/join` takes: a CSR and a join token, or a signed STS request with
/// a session token, are a few KiB.
pub const JOIN_BODY_LIMIT: usize = 16 * 1024;
/// The largest body any other route takes: a template at core's caps, even with every byte of its
/// manifest and script escaped in JSON (`\u00XX`, six bytes each), with room to spare (about 2 MiB).
pub const BODY_LIMIT: usize =
    (airlock_core::template::MAX_MANIFEST_BYTES + airlock_core::template::MAX_SCRIPT_BYTES) * 6 + 64 * 1024;

/// The body limit of a route; the join route is the one anyone may call, so it takes the least.
/// An artifact upload is bounded by its handler instead, under the server's own artifact limit
/// (`crate::artifacts`), since it streams to disk rather than into memory.
fn body_limit(path: &str) -> usize {
    if path == "/v1/join" || path == "/v1/join/challenge" {
        JOIN_BODY_LIMIT
    } else if is_artifact_upload(path) {
        usize::MAX
    } else {
        BODY_LIMIT
    }
}

/// `/v1/workspaces/{workspace}/artifacts/{sha256}`, whatever the method (only `PUT` takes a body).
fn is_artifact_upload(path: &str) -> bool {
    let mut parts = path.split('/');
    matches!(
        (parts.next(), parts.next(), parts.next(), parts.next(), parts.next(), parts.next(), parts.next()),
        (Some(""), Some("v1"), Some("workspaces"), Some(_), Some("artifacts"), Some(_), None)
    )
}

/// Refuses a body past its route's limit with 413, before reading it when its length is declared, and
/// otherwise as soon as the bytes read pass the limit ([`ApiJson`] maps the read error to 413).
async fn limit_body(req: Request, next: Next) -> Response {
    let limit = body_limit(req.uri().path());
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", "the request body is too large")
            .into_response();
    }
    let req = req.map(|body| axum::body::Body::new(http_body_util::Limited::new(body, limit)));
    next.run(req).await
}

/// What a request that was not read and answered within the request deadline gets (`crate::https`).
pub(crate) fn request_timeout() -> Response {
    let mut resp = ApiError::new(
        StatusCode::REQUEST_TIMEOUT,
        "request_timeout",
        "the request was not received and answered in time",
    )
    .into_response();
    resp.headers_mut().insert(header::CONNECTION, header::HeaderValue::from_static("close"));
    resp
}

/// How long after the last shed connection `/readyz` still reports shedding.
const SHEDDING_WINDOW: std::time::Duration = std::time::Duration::from_secs(10);

/// The OpenAPI document served at `/v1/openapi.json`: the routes' annotations, completed by
/// [`contract::complete`] with what every route's extractors imply.
pub fn document() -> utoipa::openapi::OpenApi {
    let mut doc = routes().1;
    contract::complete(&mut doc);
    doc
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Airlock control plane API", description = "Tenants, workspaces, environments, appliances, templates and signed operations."),
    components(schemas(ErrorBody, ErrorDetail)),
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

/// What `/healthz` answers: `{"status": "ok"}`.
#[derive(Serialize, ToSchema)]
pub struct Health {
    #[schema(inline)]
    status: Alive,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
enum Alive {
    Ok,
}

/// What `/readyz` answers when ready: `{"status": "ready"}`.
#[derive(Serialize, ToSchema)]
pub struct Readiness {
    #[schema(inline)]
    status: Ready,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
enum Ready {
    Ready,
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", responses((status = 200, body = Health)))]
async fn healthz() -> Json<Health> {
    Json(Health { status: Alive::Ok })
}

/// Readiness: the store answers and no listener is shedding connections; 503 (`not_ready` when the store
/// does not answer, `shedding` when a listener's pool was full, refusing or evicting a connection for room, in
/// the last 10 s; one address at its own cap does not count).
#[utoipa::path(get, path = "/readyz",
    responses((status = 200, body = Readiness), (status = 503, body = ErrorBody, description = "not ready, or shedding load")))]
async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.metrics.connections.shedding_within(SHEDDING_WINDOW) {
        let message = "shedding connections: a listener is at its connection cap; see airlock_shed_connections_total";
        return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shedding", message).into_response();
    }
    match state.store.ping().await {
        Ok(()) => Json(Readiness { status: Ready::Ready }).into_response(),
        Err(_) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", "store unavailable").into_response(),
    }
}

/// Prometheus metrics in OpenMetrics text. They count fleet-wide (every tenant's appliances and
/// requests), so any valid API token is required.
#[utoipa::path(get, path = "/metrics", security(("bearer" = [])),
    responses((status = 200, body = String, content_type = "application/openmetrics-text")))]
async fn metrics(State(state): State<Arc<AppState>>, _caller: Authed) -> Response {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], state.metrics.render())
        .into_response()
}

/// This document.
#[utoipa::path(get, path = "/v1/openapi.json",
    responses((status = 200, body = Object, description = "OpenAPI 3.1"), (status = 500, body = ErrorBody)))]
async fn openapi() -> Response {
    // Built once: anyone may ask for it, so each request costs a copy of bytes and no more.
    static DOCUMENT: LazyLock<Option<Vec<u8>>> = LazyLock::new(|| serde_json::to_vec(&document()).ok());
    match DOCUMENT.as_ref() {
        Some(bytes) => ([(header::CONTENT_TYPE, "application/json")], bytes.as_slice()).into_response(),
        None => ApiError::internal("cannot serialise the OpenAPI document").into_response(),
    }
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route; see /v1/openapi.json")
}

/// The 405 answer, for the router's fallback and the gate alike.
pub(super) fn method_not_allowed_response() -> Response {
    IntoResponse::into_response(method_not_allowed_error())
}

async fn method_not_allowed() -> ApiError {
    method_not_allowed_error()
}

fn method_not_allowed_error() -> ApiError {
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
    /// The audit signing key's public half (Ed25519, PEM): checks the audit checkpoints
    /// (`airlock audit verify --checkpoints FILE --key FILE`).
    audit_key: String,
}

/// The control plane CA certificate. Public; compare its fingerprint with the one you pinned.
#[utoipa::path(get, path = "/v1/ca", responses((status = 200, body = CaInfo)))]
async fn get_ca(State(state): State<Arc<AppState>>) -> Json<CaInfo> {
    Json(CaInfo {
        certificate_pem: state.ca.cert_pem().to_owned(),
        fingerprint: state.ca.fingerprint().to_string(),
        audit_key: state.audit_key_pem.clone(),
    })
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod authz_attacks;
