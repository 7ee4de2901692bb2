//! Templates and signed operations under `/v1`: push and list templates, request operations, relay the customer's approvals, and read manifests and released output.
//!
//! The control plane signs what the vendor asks for and relays what the customer signs; it cannot approve anything itself (it holds no customer key).
//! The work is done by [`crate::operations`]; these handlers map its typed errors to statuses.

use std::collections::BTreeMap;
use std::sync::Arc;

use airlock_core::audit::Outcome;
use airlock_core::dsse::Envelope;
use airlock_core::grant::{DenyCode, OperationRequest};
use airlock_core::operation::{
    ExecutionStatement, Manifest, OperationState, OutputCommitment, RefusalCode, RequestStatement,
};
use airlock_core::policy::Phase;
use airlock_core::template::{RenderedCommand, TemplateError, TemplateManifest, VarType};
use airlock_core::{EnvironmentId, OperationId, Timestamp, WorkspaceId};
use axum::Json;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{ApiError, ApiJson, ApiPath, Authed, ErrorBody, ReadAudit, audited, parse_id, refused};
use crate::authz::{Action, TenantScope};
use crate::operations::{
    self, NewOperation, OutputError, PushTemplateError, RelayError, RequestError, Requested, stored_envelope,
    stored_request,
};
use crate::releases::DeployableError;
use crate::state::{AppState, event};
use crate::store::{OperationRow, StoreError, TemplateRow};

/// Most operations one list returns (newest first).
const MAX_LIST: i64 = 1000;

impl From<PushTemplateError> for ApiError {
    fn from(e: PushTemplateError) -> Self {
        match e {
            PushTemplateError::Invalid(TemplateError::Limit(_)) => ApiError::limit_exceeded(e.to_string()),
            PushTemplateError::Invalid(_) => ApiError::bad_request(e.to_string()),
            PushTemplateError::NoWorkspace(_) => ApiError::not_found(e.to_string()),
            PushTemplateError::Interrupted(_) => ApiError::unavailable(e.to_string()),
            PushTemplateError::Store(e) => e.into(),
        }
    }
}

impl From<RequestError> for ApiError {
    fn from(e: RequestError) -> Self {
        match e {
            RequestError::NoEnvironment(_) => ApiError::not_found(e.to_string()),
            RequestError::Render(TemplateError::Limit(_)) => ApiError::limit_exceeded(e.to_string()),
            RequestError::Reason
            | RequestError::NotActive { .. }
            | RequestError::NoAppliance(_)
            | RequestError::SeveralAppliances(_)
            | RequestError::NoTemplate { .. }
            | RequestError::Render(_) => ApiError::bad_request(e.to_string()),
            RequestError::Release(DeployableError::NoRelease(..)) | RequestError::NoTask { .. } => {
                ApiError::not_found(e.to_string())
            }
            RequestError::Release(DeployableError::NoLongerVerifies(..)) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "unverified", e.to_string())
            }
            RequestError::Release(DeployableError::Interrupted) => ApiError::unavailable(e.to_string()),
            RequestError::Release(DeployableError::Store(e)) => e.into(),
            RequestError::Sign => ApiError::internal(e.to_string()),
            RequestError::Store(e) => e.into(),
        }
    }
}

impl From<RelayError> for ApiError {
    fn from(e: RelayError) -> Self {
        match e {
            RelayError::NoOperation(_) => ApiError::not_found(e.to_string()),
            RelayError::TooLarge | RelayError::NotAnEnvelope(_) | RelayError::Approval(_) => {
                ApiError::bad_request(e.to_string())
            }
            RelayError::NotAwaiting { .. } => ApiError::conflict(e.to_string()),
            RelayError::Store(e) => e.into(),
        }
    }
}

impl From<OutputError> for ApiError {
    fn from(e: OutputError) -> Self {
        match e {
            OutputError::NoOperation(_) | OutputError::NotReleased { .. } => ApiError::not_found(e.to_string()),
            OutputError::Unseal(ref why) => {
                tracing::error!(error = %why, "cannot open sealed output");
                ApiError::internal(e.to_string())
            }
            OutputError::Store(e) => e.into(),
        }
    }
}

// ---------- templates ----------

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PushTemplate {
    /// The template's `template.toml`.
    pub manifest_toml: String,
    /// The script its `body` names.
    pub script: String,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct VariableView {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub pattern: Option<String>,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct TemplateView {
    pub workspace: String,
    pub name: String,
    pub content_sha256: String,
    pub phase: Phase,
    pub data_tags: Vec<String>,
    pub description: String,
    pub variables: Vec<VariableView>,
    /// Unix milliseconds.
    #[schema(value_type = i64)]
    pub created_at: Timestamp,
}

impl TemplateView {
    /// The view of a stored template: its manifest only (no pattern is compiled to show it)
    /// and the content hash stored beside it when it was pushed.
    fn from_row(row: &TemplateRow) -> Result<Self, ApiError> {
        let m = TemplateManifest::parse(&row.manifest_toml)
            .map_err(|e| StoreError::Corrupt(format!("template {}: {e}", row.name)))?;
        Ok(Self {
            workspace: row.workspace_id.to_string(),
            name: m.name.clone(),
            content_sha256: row.content_sha256.clone(),
            phase: m.phase,
            data_tags: m.data_tags.iter().cloned().collect(),
            description: m.description.clone(),
            variables: m
                .variables
                .iter()
                .map(|v| VariableView {
                    name: v.name.clone(),
                    kind: match v.kind {
                        VarType::String => "string",
                        VarType::Integer => "integer",
                        VarType::Boolean => "boolean",
                    }
                    .to_owned(),
                    pattern: v.pattern.clone(),
                })
                .collect(),
            created_at: row.created_at,
        })
    }
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct TemplateList {
    pub templates: Vec<TemplateView>,
}

/// Push a template (its `template.toml` and script). A new content becomes the current
/// version; older versions stay stored by content hash. The same content again changes nothing.
#[utoipa::path(post, path = "/v1/workspaces/{workspace}/templates", security(("bearer" = [])),
    params(("workspace" = String, Path, description = "workspace id (wsp_…)")),
    request_body = PushTemplate,
    responses((status = 201, body = TemplateView, description = "new current version"),
        (status = 200, body = TemplateView, description = "unchanged"),
        (status = 422, body = ErrorBody, description = "over a template limit (`limit_exceeded`): size, variables, data tags or a pattern's length or compiled size")))]
pub(super) async fn push_template(
    State(state): State<Arc<AppState>>,
    Authed(scope): Authed,
    ApiPath(workspace): ApiPath<String>,
    body: Result<ApiJson<PushTemplate>, ApiError>,
) -> Result<(StatusCode, Json<TemplateView>), ApiError> {
    let result = async {
        let ApiJson(body) = body?;
        let ws: WorkspaceId = parse_id(&workspace)?;
        let pushed = operations::push_template(&state, &scope, ws, body.manifest_toml, body.script).await?;
        let status = if pushed.changed { StatusCode::CREATED } else { StatusCode::OK };
        Ok((status, Json(TemplateView::from_row(&pushed.row)?)))
    }
    .await;
    let mut ev = event(scope.principal().actor(), Action::PushTemplate.audit_action(), Outcome::Success);
    ev.workspace = Some(workspace);
    refused(&state, &scope, ev, result).await
}

/// List the current version of every template in a workspace.
#[utoipa::path(get, path = "/v1/workspaces/{workspace}/templates", security(("bearer" = [])),
    params(("workspace" = String, Path, description = "workspace id (wsp_…)")),
    responses((status = 200, body = TemplateList)))]
pub(super) async fn list_templates(
    State(state): State<Arc<AppState>>,
    Authed(scope): Authed,
    ApiPath(workspace): ApiPath<String>,
) -> Result<Json<TemplateList>, ApiError> {
    let result = async {
        let ws: WorkspaceId = parse_id(&workspace)?;
        if !state.store.workspace_exists(&scope, ws).await? {
            return Err(ApiError::not_found(format!("no workspace {ws} in your tenant")));
        }
        let rows = state.store.list_current_templates(&scope, ws).await?;
        // Up to 64 KiB of TOML per template, as many templates as the workspace holds: parsed
        // on the blocking pool, not on the workers that answer everyone else.
        let templates =
            tokio::task::spawn_blocking(move || rows.iter().map(TemplateView::from_row).collect::<Result<Vec<_>, _>>())
                .await
                .map_err(|_| ApiError::unavailable("listing the templates did not finish; retry"))??;
        Ok(TemplateList { templates })
    }
    .await;
    let mut ev = event(scope.principal().actor(), Action::ListTemplates.audit_action(), Outcome::Success);
    ev.workspace = Some(workspace);
    audited(&state, &scope, ReadAudit::Access, ev, result).await.map(Json)
}

// ---------- operations ----------

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RequestOperation {
    /// Template name; its current version is rendered.
    pub template: String,
    #[serde(default)]
    pub vars: BTreeMap<String, String>,
    /// Why, shown to the customer and signed into the request.
    pub reason: String,
    /// Appliance id (apl_…); defaults to the environment's only active appliance.
    pub appliance: Option<String>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RequestDeployment {
    /// The release: `NAME@VERSION`, or its digest (64 hex digits).
    pub release: String,
    /// Why, shown to the customer and signed into the request.
    pub reason: String,
    /// Appliance id (apl_…); defaults to the environment's only active appliance.
    pub appliance: Option<String>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RequestTask {
    /// The release: `NAME@VERSION`, or its digest; it must be the release running on the appliance.
    pub release: String,
    /// One of the release's `[[task]]` names (e.g. `migrate`).
    pub task: String,
    /// Why, shown to the customer and signed into the request.
    pub reason: String,
    /// Appliance id (apl_…); defaults to the environment's only active appliance.
    pub appliance: Option<String>,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct OperationView {
    #[schema(value_type = String)]
    pub id: OperationId,
    pub environment: String,
    pub appliance: String,
    pub template: String,
    pub template_sha256: String,
    pub phase: Phase,
    pub data_tags: Vec<String>,
    pub vars: BTreeMap<String, String>,
    pub reason: String,
    pub requested_by: String,
    /// Unix milliseconds.
    #[schema(value_type = i64)]
    pub requested_at: Timestamp,
    pub state: OperationState,
    /// Why the appliance did not run it (`airlock_core::operation::RefusalCode`, snake_case).
    pub refusal_code: Option<RefusalCode>,
    /// Which policy check denied it, when `refusal_code` is `denied`.
    pub deny_code: Option<DenyCode>,
    /// The appliance's explanation, for people.
    pub refusal_reason: Option<String>,
    /// What the customer approves (its digest is `request_digest`).
    #[schema(value_type = Object)]
    pub request: OperationRequest,
    pub request_digest: String,
    #[schema(value_type = Object)]
    pub command: RenderedCommand,
    pub command_sha256: String,
    /// The request as the control plane signed it (a DSSE envelope of a `RequestStatement`):
    /// the customer's CLI verifies it against the pinned CA and reviews what it says.
    pub signed_request: Envelope,
    /// The certificate of the operations key that signed `signed_request` (PEM).
    pub control_plane_certificate: String,
    /// The customer's approval or denial, as relayed (a DSSE envelope).
    pub approval: Option<Envelope>,
    pub exit_code: Option<i64>,
    /// What the appliance's signed execution commits to about the output: `{"salted": {"digest",
    /// "size"}}`, `"secret"` (nothing: not even a size), or for executions signed before salts
    /// `{"legacy_unsalted": {"sha256", "size"}}`.
    #[schema(value_type = Option<Object>)]
    pub output_commitment: Option<OutputCommitment>,
    pub output_size: Option<i64>,
    pub output_released: bool,
    /// Unix milliseconds.
    #[schema(value_type = i64)]
    pub updated_at: Timestamp,
}

impl OperationView {
    fn from_row(op: &OperationRow) -> Result<Self, ApiError> {
        let RequestStatement { request, command, reason, requested_by, requested_at, .. } = stored_request(op)?;
        Ok(Self {
            id: op.id,
            environment: op.environment_id.to_string(),
            appliance: op.appliance_id.to_string(),
            template: op.template_name.clone(),
            template_sha256: op.template_sha256.clone(),
            phase: request.phase,
            data_tags: request.data_tags.iter().cloned().collect(),
            vars: request.args.clone(),
            reason,
            requested_by,
            requested_at,
            state: op.state,
            refusal_code: op.refusal_code,
            deny_code: op.deny_code,
            refusal_reason: op.refusal_reason.clone(),
            request_digest: request.digest_hex(),
            command_sha256: request.command_sha256.clone(),
            request,
            command,
            signed_request: stored_envelope(op, Some(op.request_envelope.as_str()))?
                .ok_or_else(|| StoreError::Corrupt(format!("operation {} has no request envelope", op.id)))?,
            control_plane_certificate: op.control_plane_cert_pem.clone(),
            approval: stored_envelope(op, op.approval_envelope.as_deref())?,
            exit_code: op.exit_code,
            output_commitment: stored_envelope(op, op.execution_envelope.as_deref())?
                .map(|env| serde_json::from_slice::<ExecutionStatement>(&env.payload))
                .transpose()
                .map_err(|e| StoreError::Corrupt(format!("operation {} execution statement: {e}", op.id)))?
                .map(|e| e.output_commitment),
            output_size: op.output_size,
            output_released: op.output_stored,
            updated_at: op.updated_at,
        })
    }
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct OperationList {
    pub operations: Vec<OperationView>,
}

/// Request an operation: renders the current template version with `vars`, signs the request
/// with the control plane's operations key, and sends it to the appliance if connected.
#[utoipa::path(post, path = "/v1/environments/{environment}/operations", security(("bearer" = [])),
    params(("environment" = String, Path, description = "environment id (env_…)")),
    request_body = RequestOperation,
    responses((status = 201, body = OperationView),
        (status = 422, body = ErrorBody, description = "the current template version is over a template limit (`limit_exceeded`)"),
        (status = 500, body = ErrorBody, description = "the control plane could not sign the request")))]
pub(super) async fn request_operation(
    State(state): State<Arc<AppState>>,
    Authed(scope): Authed,
    ApiPath(environment): ApiPath<String>,
    body: Result<ApiJson<RequestOperation>, ApiError>,
) -> Result<(StatusCode, Json<OperationView>), ApiError> {
    let result = async {
        let ApiJson(body) = body?;
        let new = NewOperation {
            environment: parse_id(&environment)?,
            what: Requested::Template { name: body.template, vars: body.vars },
            reason: body.reason,
            appliance: body.appliance.as_deref().map(parse_id).transpose()?,
            id: None,
        };
        let row = operations::request(&state, &scope, new).await?;
        Ok((StatusCode::CREATED, Json(OperationView::from_row(&row)?)))
    }
    .await;
    let mut ev = event(scope.principal().actor(), Action::RequestOperation.audit_action(), Outcome::Success);
    ev.target = Some(environment);
    refused(&state, &scope, ev, result).await
}

#[derive(Deserialize)]
pub(super) struct OperationQuery {
    state: Option<String>,
    environment: Option<String>,
    /// Read by the gate too (`access::ListingQuery`): the list is decided on this workspace.
    workspace: Option<String>,
}

/// List operations, newest first (at most 1000): the tenant's, or one workspace's. A principal holding roles only in
/// workspaces (a workspace token) names one of its own.
#[utoipa::path(get, path = "/v1/operations", security(("bearer" = [])),
    params(("state" = Option<String>, Query, description = "only operations in this state"),
        ("environment" = Option<String>, Query, description = "only this environment (env_…)"),
        ("workspace" = Option<String>, Query, description = "only this workspace (wsp_…); required of a principal whose roles are all in workspaces")),
    responses((status = 200, body = OperationList),
        (status = 403, body = ErrorBody, description = "no role here grants it; `workspace_required`: name a workspace of yours"),
        (status = 404, body = ErrorBody, description = "no such workspace in your tenant")))]
pub(super) async fn list_operations(
    State(state): State<Arc<AppState>>,
    Authed(scope): Authed,
    query: Result<Query<OperationQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<OperationList>, ApiError> {
    let result = async {
        let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
        let st = q.state.as_deref().map(parse_state).transpose()?;
        let env = q.environment.as_deref().map(parse_id::<EnvironmentId>).transpose()?;
        let ws = q.workspace.as_deref().map(parse_id::<WorkspaceId>).transpose()?;
        if let Some(ws) = ws
            && !state.store.workspace_exists(&scope, ws).await?
        {
            return Err(ApiError::not_found(format!("no workspace {ws} in your tenant")));
        }
        let rows = state.store.list_operations(&scope, st, env, ws, MAX_LIST).await?;
        Ok(OperationList { operations: rows.iter().map(OperationView::from_row).collect::<Result<_, _>>()? })
    }
    .await;
    let ev = event(scope.principal().actor(), Action::ListOperations.audit_action(), Outcome::Success);
    audited(&state, &scope, ReadAudit::Access, ev, result).await.map(Json)
}

/// An operation state named in a query.
fn parse_state(s: &str) -> Result<OperationState, ApiError> {
    s.parse::<OperationState>().map_err(|e| {
        let names: Vec<_> = OperationState::ALL.iter().map(|st| st.as_str()).collect();
        ApiError::bad_request(format!("{e}; use one of {}", names.join(", ")))
    })
}

/// An operation id from a path.
fn parse_operation_id(id: &str) -> Result<OperationId, ApiError> {
    id.parse().map_err(|_| ApiError::bad_request("an operation id is `op_` followed by 32 hex digits"))
}

/// The operation, or 404 if it is not in the caller's tenant.
async fn find(state: &AppState, scope: &TenantScope, id: &str) -> Result<OperationRow, ApiError> {
    let id = parse_operation_id(id)?;
    state
        .store
        .get_operation(scope, id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no operation {id} in your tenant")))
}

/// One operation.
#[utoipa::path(get, path = "/v1/operations/{id}", security(("bearer" = [])),
    params(("id" = String, Path, description = "operation id (op_…)")),
    responses((status = 200, body = OperationView)))]
pub(super) async fn get_operation(
    State(state): State<Arc<AppState>>,
    Authed(scope): Authed,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<OperationView>, ApiError> {
    let result = async { OperationView::from_row(&find(&state, &scope, &id).await?) }.await;
    let mut ev = event(scope.principal().actor(), Action::GetOperation.audit_action(), Outcome::Success);
    ev.target = Some(id);
    audited(&state, &scope, ReadAudit::Access, ev, result).await.map(Json)
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RelayApproval {
    /// The customer's signed grant (a DSSE envelope), as a JSON object.
    #[schema(value_type = Envelope)]
    pub envelope: serde_json::Value,
}

/// Relay the customer's approval (or denial). The control plane checks its structure and that
/// it binds this request, stores it unchanged and sends it to the appliance, which verifies
/// the signatures against the customer keys it pinned.
#[utoipa::path(post, path = "/v1/operations/{id}/approval", security(("bearer" = [])),
    params(("id" = String, Path, description = "operation id (op_…)")),
    request_body = RelayApproval,
    responses((status = 200, body = OperationView),
        (status = 409, body = ErrorBody, description = "the operation no longer awaits approval")))]
pub(super) async fn relay_approval(
    State(state): State<Arc<AppState>>,
    Authed(scope): Authed,
    ApiPath(id): ApiPath<String>,
    body: Result<ApiJson<RelayApproval>, ApiError>,
) -> Result<Json<OperationView>, ApiError> {
    let result = async {
        let ApiJson(body) = body?;
        let op = operations::relay_approval(&state, &scope, parse_operation_id(&id)?, body.envelope).await?;
        Ok(Json(OperationView::from_row(&op)?))
    }
    .await;
    let mut ev = event(scope.principal().actor(), Action::RelayApproval.audit_action(), Outcome::Success);
    ev.target = Some(id);
    refused(&state, &scope, ev, result).await
}

/// The operation's manifest: every signed statement stored for it, with the certificates
/// that verify them (`airlock_core::operation::Manifest`).
#[utoipa::path(get, path = "/v1/operations/{id}/manifest", security(("bearer" = [])),
    params(("id" = String, Path, description = "operation id (op_…)")),
    responses((status = 200, body = Object, description = "the manifest"),
        (status = 500, body = ErrorBody, description = "stored output cannot be opened")))]
pub(super) async fn get_manifest(
    State(state): State<Arc<AppState>>,
    Authed(scope): Authed,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Manifest>, ApiError> {
    let result = async { Ok(operations::manifest(&state.kek, &scope, &find(&state, &scope, &id).await?)?) }.await;
    let mut ev = event(scope.principal().actor(), Action::GetManifest.audit_action(), Outcome::Success);
    ev.target = Some(id);
    audited(&state, &scope, ReadAudit::Durable, ev, result).await.map(Json)
}

/// The released output bytes; 404 until the customer released them.
#[utoipa::path(get, path = "/v1/operations/{id}/output", security(("bearer" = [])),
    params(("id" = String, Path, description = "operation id (op_…)")),
    responses((status = 200, description = "the released output", content_type = "application/octet-stream"),
        (status = 500, body = ErrorBody, description = "stored output cannot be opened")))]
pub(super) async fn get_output(
    State(state): State<Arc<AppState>>,
    Authed(scope): Authed,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let mut ev = event(scope.principal().actor(), Action::GetOutput.audit_action(), Outcome::Success);
    ev.target = Some(id.clone());
    let result = async { Ok(operations::released_output(&state, &scope, parse_operation_id(&id)?).await?) }.await;
    let (op, bytes) = match result {
        Ok(v) => v,
        Err(e) => return audited(&state, &scope, ReadAudit::Durable, ev, Err(e)).await,
    };
    // Digest and size only: never the output.
    ev.detail = serde_json::json!({ "output_digest": op.output_sha256, "output_size": op.output_size });
    audited(&state, &scope, ReadAudit::Durable, ev, Ok(())).await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

/// Deploy a release: a Deploy-phase operation of kind `deploy` whose signed arguments bind the
/// release digest. The release is verified again with the workspace's unrevoked keys; the
/// customer's approval, a pre-approval or a standing window decides on the appliance, exactly
/// as for other operations.
#[utoipa::path(post, path = "/v1/environments/{environment}/deployments", security(("bearer" = [])),
    params(("environment" = String, Path, description = "environment id (env_…)")),
    request_body = RequestDeployment,
    responses((status = 201, body = OperationView),
        (status = 404, body = ErrorBody, description = "no such environment or release"),
        (status = 422, body = ErrorBody, description = "the release no longer verifies with the workspace's unrevoked keys"),
        (status = 500, body = ErrorBody, description = "the control plane could not sign the request")))]
pub(super) async fn request_deployment(
    State(state): State<Arc<AppState>>,
    Authed(scope): Authed,
    ApiPath(environment): ApiPath<String>,
    body: Result<ApiJson<RequestDeployment>, ApiError>,
) -> Result<(StatusCode, Json<OperationView>), ApiError> {
    let result = async {
        let ApiJson(body) = body?;
        let what = Requested::Deploy(body.release.parse().map_err(ApiError::bad_request)?);
        request_of(&state, &scope, &environment, what, body.reason, body.appliance.as_deref()).await
    }
    .await;
    let mut ev = event(scope.principal().actor(), Action::RequestDeployment.audit_action(), Outcome::Success);
    ev.target = Some(environment);
    refused(&state, &scope, ev, result).await
}

/// Run a task of a release (e.g. `migrate`): an Operate-phase operation of kind
/// `release-task` whose signed arguments bind the release digest and name the task. The
/// appliance runs it boxed in that release's directory, only if that release runs there.
#[utoipa::path(post, path = "/v1/environments/{environment}/tasks", security(("bearer" = [])),
    params(("environment" = String, Path, description = "environment id (env_…)")),
    request_body = RequestTask,
    responses((status = 201, body = OperationView),
        (status = 404, body = ErrorBody, description = "no such environment, release or task"),
        (status = 422, body = ErrorBody, description = "the release no longer verifies with the workspace's unrevoked keys"),
        (status = 500, body = ErrorBody, description = "the control plane could not sign the request")))]
pub(super) async fn request_task(
    State(state): State<Arc<AppState>>,
    Authed(scope): Authed,
    ApiPath(environment): ApiPath<String>,
    body: Result<ApiJson<RequestTask>, ApiError>,
) -> Result<(StatusCode, Json<OperationView>), ApiError> {
    let result = async {
        let ApiJson(body) = body?;
        let release = body.release.parse().map_err(ApiError::bad_request)?;
        let what = Requested::Task { release, task: body.task };
        request_of(&state, &scope, &environment, what, body.reason, body.appliance.as_deref()).await
    }
    .await;
    let mut ev = event(scope.principal().actor(), Action::RequestReleaseTask.audit_action(), Outcome::Success);
    ev.target = Some(environment);
    refused(&state, &scope, ev, result).await
}

/// Requests `what` in `environment` (for `appliance`, or its only one): the operation as created.
async fn request_of(
    state: &AppState,
    scope: &TenantScope,
    environment: &str,
    what: Requested,
    reason: String,
    appliance: Option<&str>,
) -> Result<(StatusCode, Json<OperationView>), ApiError> {
    let new = NewOperation {
        environment: parse_id(environment)?,
        what,
        reason,
        appliance: appliance.map(parse_id).transpose()?,
        id: None,
    };
    let row = operations::request(state, scope, new).await?;
    Ok((StatusCode::CREATED, Json(OperationView::from_row(&row)?)))
}
