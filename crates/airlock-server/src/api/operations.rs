//! Templates and signed operations under `/v1`: push and list templates, request operations,
//! relay the customer's approvals, and read manifests and released output.
//!
//! The control plane signs what the vendor asks for and relays what the customer signs; it
//! cannot approve anything itself (it holds no customer key).

use std::collections::BTreeMap;
use std::sync::Arc;

use airlock_core::audit::Outcome;
use airlock_core::dsse::Envelope;
use airlock_core::grant::{ApprovalDecision, DenyCode, OperationRequest};
use airlock_core::operation::{Manifest, OperationState, RefusalCode, RequestStatement};
use airlock_core::policy::Phase;
use airlock_core::template::{RenderedCommand, Template, VarType};
use airlock_core::{ApplianceId, EnvironmentId, OperationId, Timestamp, WorkspaceId};
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{ApiError, ApiJson, Authed, ErrorBody, audited, authorize, parse_id};
use crate::authz::{Action, TenantScope};
use crate::operations::{self, check_approval, stored_envelope, stored_request};
use crate::state::{AppState, event, random};
use crate::store::{OperationRow, StoreError, TemplateRow};

/// Largest `template.toml` accepted.
const MAX_MANIFEST_BYTES: usize = 64 * 1024;
/// Largest script accepted.
const MAX_SCRIPT_BYTES: usize = 256 * 1024;
/// Longest reason an operator may give for a request.
const MAX_REASON_CHARS: usize = 1000;
/// Most operations one list returns (newest first).
const MAX_LIST: i64 = 1000;

fn internal(message: &str) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
}

fn conflict(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::CONFLICT, "conflict", message)
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
    #[schema(value_type = String)]
    pub phase: Phase,
    pub data_tags: Vec<String>,
    pub description: String,
    pub variables: Vec<VariableView>,
    /// Unix milliseconds.
    #[schema(value_type = i64)]
    pub created_at: Timestamp,
}

impl TemplateView {
    fn from_row(row: &TemplateRow) -> Result<Self, ApiError> {
        let t = Template::new(&row.manifest_toml, &row.script)
            .map_err(|e| StoreError::Corrupt(format!("template {}: {e}", row.name)))?;
        let m = t.manifest();
        Ok(Self {
            workspace: row.workspace_id.to_string(),
            name: m.name.clone(),
            content_sha256: t.content_sha256().to_owned(),
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
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn push_template(
    State(state): State<Arc<AppState>>,
    Authed(scope): Authed,
    Path(workspace): Path<String>,
    body: Result<ApiJson<PushTemplate>, ApiError>,
) -> Result<(StatusCode, Json<TemplateView>), ApiError> {
    authorize(&state, &scope, Action::PushTemplate, Some(workspace.clone())).await?;
    let mut ev = event(scope.principal().actor(), Action::PushTemplate.audit_action(), Outcome::Success);
    ev.workspace = Some(workspace.clone());
    let checked = async {
        let ApiJson(body) = body?;
        let ws: WorkspaceId = parse_id(&workspace)?;
        if body.manifest_toml.len() > MAX_MANIFEST_BYTES || body.script.len() > MAX_SCRIPT_BYTES {
            return Err(ApiError::bad_request(format!(
                "template.toml may be at most {MAX_MANIFEST_BYTES} bytes and the script {MAX_SCRIPT_BYTES}"
            )));
        }
        let t = Template::new(&body.manifest_toml, &body.script).map_err(|e| ApiError::bad_request(e.to_string()))?;
        if !state.store.workspace_exists(&scope, ws).await? {
            return Err(ApiError::not_found(format!("no workspace {ws} in your tenant")));
        }
        Ok((ws, t, body))
    }
    .await;
    let (ws, t, body) = match checked {
        Ok(v) => v,
        Err(e) => return audited(&state, &scope, ev, Err(e)).await,
    };
    let now = state.now();
    let name = t.manifest().name.clone();
    let sha = t.content_sha256().to_owned();
    ev.target = Some(name.clone());
    let row = TemplateRow {
        workspace_id: ws,
        name: name.clone(),
        content_sha256: sha.clone(),
        manifest_toml: body.manifest_toml,
        script: body.script,
        created_at: now,
    };
    let mut tx = state.store.write().await?;
    let previous = tx.current_template_sha(&scope, ws, &name).await?;
    if previous.as_deref() == Some(sha.as_str()) {
        drop(tx);
        ev.detail = serde_json::json!({ "content_sha256": sha, "unchanged": true });
        let result = async {
            let stored = state.store.template_version(&scope, ws, &name, &sha).await?.unwrap_or(row);
            Ok((StatusCode::OK, Json(TemplateView::from_row(&stored)?)))
        }
        .await;
        return audited(&state, &scope, ev, result).await;
    }
    if !tx.put_template(&scope, ws, &row, now).await? {
        drop(tx);
        return audited(&state, &scope, ev, Err(ApiError::not_found(format!("no workspace {ws} in your tenant"))))
            .await;
    }
    ev.detail = serde_json::json!({
        "content_sha256": sha,
        "previous_sha256": previous,
        "phase": t.manifest().phase,
        "data_tags": t.manifest().data_tags,
    });
    tx.audit(&scope.chain(), now, ev).await?;
    tx.commit().await?;
    tracing::info!(template = %name, content_sha256 = %sha, "template pushed");
    // Content pushed before keeps its first creation time.
    let stored = state.store.template_version(&scope, ws, &name, &sha).await?.unwrap_or(row);
    Ok((StatusCode::CREATED, Json(TemplateView::from_row(&stored)?)))
}

/// List the current version of every template in a workspace.
#[utoipa::path(get, path = "/v1/workspaces/{workspace}/templates", security(("bearer" = [])),
    params(("workspace" = String, Path, description = "workspace id (wsp_…)")),
    responses((status = 200, body = TemplateList), (status = 404, body = ErrorBody)))]
pub(super) async fn list_templates(
    State(state): State<Arc<AppState>>,
    Authed(scope): Authed,
    Path(workspace): Path<String>,
) -> Result<Json<TemplateList>, ApiError> {
    authorize(&state, &scope, Action::ListTemplates, Some(workspace.clone())).await?;
    let result = async {
        let ws: WorkspaceId = parse_id(&workspace)?;
        if !state.store.workspace_exists(&scope, ws).await? {
            return Err(ApiError::not_found(format!("no workspace {ws} in your tenant")));
        }
        let rows = state.store.list_current_templates(&scope, ws).await?;
        Ok(TemplateList { templates: rows.iter().map(TemplateView::from_row).collect::<Result<_, _>>()? })
    }
    .await;
    let mut ev = event(scope.principal().actor(), Action::ListTemplates.audit_action(), Outcome::Success);
    ev.workspace = Some(workspace);
    audited(&state, &scope, ev, result).await.map(Json)
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

#[derive(Serialize, Deserialize, ToSchema)]
pub struct OperationView {
    #[schema(value_type = String)]
    pub id: OperationId,
    pub environment: String,
    pub appliance: String,
    pub template: String,
    pub template_sha256: String,
    #[schema(value_type = String)]
    pub phase: Phase,
    pub data_tags: Vec<String>,
    pub vars: BTreeMap<String, String>,
    pub reason: String,
    pub requested_by: String,
    /// Unix milliseconds.
    #[schema(value_type = i64)]
    pub requested_at: Timestamp,
    #[schema(value_type = String)]
    pub state: OperationState,
    /// Why the appliance did not run it (`airlock_core::operation::RefusalCode`, snake_case).
    #[schema(value_type = Option<String>)]
    pub refusal_code: Option<RefusalCode>,
    /// Which policy check denied it, when `refusal_code` is `denied`.
    #[schema(value_type = Option<String>)]
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
    /// The customer's approval or denial, as relayed (a DSSE envelope).
    #[schema(value_type = Option<Object>)]
    pub approval: Option<Envelope>,
    pub exit_code: Option<i64>,
    pub output_sha256: Option<String>,
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
            approval: stored_envelope(op, op.approval_envelope.as_deref())?,
            exit_code: op.exit_code,
            output_sha256: op.output_sha256.clone(),
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
    responses((status = 201, body = OperationView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn request_operation(
    State(state): State<Arc<AppState>>,
    Authed(scope): Authed,
    Path(environment): Path<String>,
    body: Result<ApiJson<RequestOperation>, ApiError>,
) -> Result<(StatusCode, Json<OperationView>), ApiError> {
    authorize(&state, &scope, Action::RequestOperation, Some(environment.clone())).await?;
    let mut ev = event(scope.principal().actor(), Action::RequestOperation.audit_action(), Outcome::Success);
    ev.target = Some(environment.clone());
    let checked = async {
        let ApiJson(body) = body?;
        let env_id: EnvironmentId = parse_id(&environment)?;
        let reason = body.reason.trim().to_owned();
        if reason.is_empty() || reason.chars().count() > MAX_REASON_CHARS || reason.chars().any(char::is_control) {
            return Err(ApiError::bad_request(format!(
                "reason must be 1–{MAX_REASON_CHARS} characters without control characters; the customer reads it"
            )));
        }
        let env = state
            .store
            .get_environment(&scope, env_id)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("no environment {env_id} in your tenant")))?;
        let active: Vec<ApplianceId> = state
            .store
            .list_appliances(&scope, Some(env.id))
            .await?
            .into_iter()
            .filter(|a| a.revoked_at.is_none())
            .map(|a| a.id)
            .collect();
        let appliance = match &body.appliance {
            Some(a) => {
                let id: ApplianceId = parse_id(a)?;
                if !active.contains(&id) {
                    return Err(ApiError::bad_request(format!(
                        "appliance {id} is not an active appliance of environment {env_id}"
                    )));
                }
                id
            }
            None => match active.as_slice() {
                [one] => *one,
                [] => {
                    return Err(ApiError::bad_request(format!(
                        "environment {env_id} has no active appliance; join one first"
                    )));
                }
                _ => {
                    return Err(ApiError::bad_request(format!(
                        "environment {env_id} has several appliances; name one with `appliance`"
                    )));
                }
            },
        };
        let row = state.store.current_template(&scope, env.workspace_id, &body.template).await?.ok_or_else(|| {
            ApiError::bad_request(format!(
                "no template `{}` in workspace {}; push it with `airlock template push`",
                body.template.chars().take(64).collect::<String>(),
                env.workspace_id
            ))
        })?;
        let template = Template::new(&row.manifest_toml, &row.script)
            .map_err(|e| StoreError::Corrupt(format!("template {}: {e}", row.name)))?;
        let command = template.render(&body.vars).map_err(|e| ApiError::bad_request(e.to_string()))?;
        Ok((env, appliance, template, command, body.vars, reason))
    }
    .await;
    let (env, appliance, template, command, vars, reason) = match checked {
        Ok(v) => v,
        Err(e) => return audited(&state, &scope, ev, Err(e)).await,
    };
    let now = state.now();
    let id = OperationId::from_random(random());
    let m = template.manifest();
    let request = OperationRequest {
        id,
        appliance,
        kind: m.name.clone(),
        phase: m.phase,
        data_tags: m.data_tags.clone(),
        args: vars,
        command_sha256: command.sha256(),
    };
    let statement = RequestStatement {
        request: request.clone(),
        command,
        reason: reason.clone(),
        requested_by: scope.principal().actor(),
        requested_at: now,
        tenant: scope.tenant(),
        environment: env.id,
    };
    let envelope = state.ops_signer.sign_request(&statement).map_err(|e| {
        tracing::error!(error = %e, "cannot sign an operation request");
        internal("the control plane could not sign the request; retry later")
    })?;
    let row = OperationRow {
        id,
        workspace_id: env.workspace_id,
        environment_id: env.id,
        appliance_id: appliance,
        template_name: m.name.clone(),
        template_sha256: template.content_sha256().to_owned(),
        state: OperationState::AwaitingApproval,
        requested_by: statement.requested_by.clone(),
        requested_at: now,
        updated_at: now,
        request_digest: request.digest_hex(),
        command_sha256: request.command_sha256.clone(),
        request_envelope: envelope.to_json(),
        control_plane_cert_pem: state.ops_signer.cert_pem().to_owned(),
        approval_envelope: None,
        pre_approval_envelope: None,
        execution_envelope: None,
        appliance_cert_pem: None,
        release_envelope: None,
        exit_code: None,
        output_sha256: None,
        output_size: None,
        refusal_code: None,
        deny_code: None,
        refusal_reason: None,
        result_at: None,
        output_stored: false,
    };
    let mut tx = state.store.write().await?;
    if !tx.insert_operation(&scope, &row).await? {
        drop(tx);
        let e = ApiError::bad_request(format!(
            "appliance {appliance} is not an active appliance of environment {}",
            env.id
        ));
        return audited(&state, &scope, ev, Err(e)).await;
    }
    ev.target = Some(id.to_string());
    ev.workspace = Some(env.workspace_id.to_string());
    ev.detail = serde_json::json!({
        "environment": env.id.to_string(),
        "appliance": appliance.to_string(),
        "template": row.template_name,
        "template_sha256": row.template_sha256,
        "phase": request.phase,
        "data_tags": request.data_tags,
        "command_sha256": row.command_sha256,
        "request_digest": row.request_digest,
        "reason": reason,
    });
    tx.audit(&scope.chain(), now, ev).await?;
    tx.commit().await?;
    // And after it: a push that read the store before the commit may have dropped the entry.
    state.push.index().operation_may_be_pending(appliance);
    tracing::info!(operation = %id, %appliance, template = %row.template_name, "operation requested");
    state.push.operations(&scope, appliance, Some(id)).await;
    Ok((StatusCode::CREATED, Json(OperationView::from_row(&row)?)))
}

#[derive(Deserialize)]
pub(super) struct OperationQuery {
    state: Option<String>,
    environment: Option<String>,
}

/// List operations, newest first (at most 1000).
#[utoipa::path(get, path = "/v1/operations", security(("bearer" = [])),
    params(("state" = Option<String>, Query, description = "only operations in this state"),
        ("environment" = Option<String>, Query, description = "only this environment (env_…)")),
    responses((status = 200, body = OperationList), (status = 400, body = ErrorBody)))]
pub(super) async fn list_operations(
    State(state): State<Arc<AppState>>,
    Authed(scope): Authed,
    query: Result<Query<OperationQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<OperationList>, ApiError> {
    authorize(&state, &scope, Action::ListOperations, None).await?;
    let result = async {
        let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
        let st = q.state.as_deref().map(parse_state).transpose()?;
        let env = q.environment.as_deref().map(parse_id::<EnvironmentId>).transpose()?;
        let rows = state.store.list_operations(&scope, st, env, MAX_LIST).await?;
        Ok(OperationList { operations: rows.iter().map(OperationView::from_row).collect::<Result<_, _>>()? })
    }
    .await;
    let ev = event(scope.principal().actor(), Action::ListOperations.audit_action(), Outcome::Success);
    audited(&state, &scope, ev, result).await.map(Json)
}

/// An operation state named in a query.
fn parse_state(s: &str) -> Result<OperationState, ApiError> {
    s.parse::<OperationState>().map_err(|e| {
        let names: Vec<_> = OperationState::ALL.iter().map(|st| st.as_str()).collect();
        ApiError::bad_request(format!("{e}; use one of {}", names.join(", ")))
    })
}

/// The operation, or 404 if it is not in the caller's tenant.
async fn find(state: &AppState, scope: &TenantScope, id: &str) -> Result<OperationRow, ApiError> {
    let Ok(id) = id.parse::<OperationId>() else {
        return Err(ApiError::bad_request("an operation id is `op_` followed by 32 hex digits"));
    };
    state
        .store
        .get_operation(scope, id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no operation {id} in your tenant")))
}

/// One operation.
#[utoipa::path(get, path = "/v1/operations/{id}", security(("bearer" = [])),
    params(("id" = String, Path, description = "operation id (op_…)")),
    responses((status = 200, body = OperationView), (status = 404, body = ErrorBody)))]
pub(super) async fn get_operation(
    State(state): State<Arc<AppState>>,
    Authed(scope): Authed,
    Path(id): Path<String>,
) -> Result<Json<OperationView>, ApiError> {
    authorize(&state, &scope, Action::GetOperation, Some(id.clone())).await?;
    let result = async { OperationView::from_row(&find(&state, &scope, &id).await?) }.await;
    let mut ev = event(scope.principal().actor(), Action::GetOperation.audit_action(), Outcome::Success);
    ev.target = Some(id);
    audited(&state, &scope, ev, result).await.map(Json)
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RelayApproval {
    /// The customer's signed grant (a DSSE envelope), as a JSON object.
    #[schema(value_type = Object)]
    pub envelope: serde_json::Value,
}

/// Relay the customer's approval (or denial). The control plane checks its structure and that
/// it binds this request, stores it unchanged and sends it to the appliance, which verifies
/// the signatures against the customer keys it pinned.
#[utoipa::path(post, path = "/v1/operations/{id}/approval", security(("bearer" = [])),
    params(("id" = String, Path, description = "operation id (op_…)")),
    request_body = RelayApproval,
    responses((status = 200, body = OperationView), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(super) async fn relay_approval(
    State(state): State<Arc<AppState>>,
    Authed(scope): Authed,
    Path(id): Path<String>,
    body: Result<ApiJson<RelayApproval>, ApiError>,
) -> Result<Json<OperationView>, ApiError> {
    authorize(&state, &scope, Action::RelayApproval, Some(id.clone())).await?;
    let mut ev = event(scope.principal().actor(), Action::RelayApproval.audit_action(), Outcome::Success);
    ev.target = Some(id.clone());
    let checked = async {
        let ApiJson(body) = body?;
        let op = find(&state, &scope, &id).await?;
        if body.envelope.to_string().len() > operations::MAX_ENVELOPE_BYTES {
            return Err(ApiError::bad_request(format!(
                "the envelope is larger than {} bytes",
                operations::MAX_ENVELOPE_BYTES
            )));
        }
        let envelope: Envelope = serde_json::from_value(body.envelope)
            .map_err(|e| ApiError::bad_request(format!("the envelope is not a DSSE envelope: {e}")))?;
        let request = stored_request(&op)?;
        let grant = check_approval(&envelope, &op, &request).map_err(|e| ApiError::bad_request(e.to_string()))?;
        if op.state != OperationState::AwaitingApproval || op.approval_envelope.is_some() {
            return Err(conflict(format!(
                "operation {id} is {}; an approval is relayed only while it awaits approval",
                op.state
            )));
        }
        Ok((op, envelope, grant))
    }
    .await;
    let (op, envelope, grant) = match checked {
        Ok(v) => v,
        Err(e) => return audited(&state, &scope, ev, Err(e)).await,
    };
    let now = state.now();
    let new_state = match grant.decision {
        ApprovalDecision::Approve => OperationState::Approved,
        ApprovalDecision::Deny => OperationState::Denied,
    };
    state.push.index().operation_may_be_pending(op.appliance_id);
    let mut tx = state.store.write().await?;
    if !tx.set_approval(&scope, op.id, &envelope.to_json(), new_state, now).await? {
        drop(tx);
        let e = conflict(format!("operation {id} no longer awaits approval"));
        return audited(&state, &scope, ev, Err(e)).await;
    }
    ev.detail = serde_json::json!({
        "decision": grant.decision,
        "approver": grant.approver,
        "grant_digest": grant.digest_hex(),
        "not_before": grant.not_before,
        "not_after": grant.not_after,
        "signatures": envelope.signatures.len(),
    });
    tx.audit(&scope.chain(), now, ev).await?;
    tx.commit().await?;
    // And after it: a push that read the store before the commit may have dropped the entry.
    state.push.index().operation_may_be_pending(op.appliance_id);
    tracing::info!(operation = %id, decision = ?grant.decision, "approval relayed");
    state.push.operations(&scope, op.appliance_id, Some(op.id)).await;
    let op = find(&state, &scope, &id).await?;
    Ok(Json(OperationView::from_row(&op)?))
}

/// The operation's manifest: every signed statement stored for it, with the certificates
/// that verify them (`airlock_core::operation::Manifest`).
#[utoipa::path(get, path = "/v1/operations/{id}/manifest", security(("bearer" = [])),
    params(("id" = String, Path, description = "operation id (op_…)")),
    responses((status = 200, body = Object, description = "the manifest"), (status = 404, body = ErrorBody)))]
pub(super) async fn get_manifest(
    State(state): State<Arc<AppState>>,
    Authed(scope): Authed,
    Path(id): Path<String>,
) -> Result<Json<Manifest>, ApiError> {
    authorize(&state, &scope, Action::GetManifest, Some(id.clone())).await?;
    let result = async {
        let op = find(&state, &scope, &id).await?;
        let request = stored_envelope(&op, Some(&op.request_envelope))?
            .ok_or_else(|| StoreError::Corrupt(format!("operation {id} has no request")))?;
        let mut m = Manifest::new(op.id, request, op.control_plane_cert_pem.clone());
        m.approval = stored_envelope(&op, op.approval_envelope.as_deref())?;
        m.pre_approval = stored_envelope(&op, op.pre_approval_envelope.as_deref())?;
        m.execution = stored_envelope(&op, op.execution_envelope.as_deref())?;
        m.appliance_certificate = op.appliance_cert_pem.clone();
        m.release = stored_envelope(&op, op.release_envelope.as_deref())?;
        Ok(m)
    }
    .await;
    let mut ev = event(scope.principal().actor(), Action::GetManifest.audit_action(), Outcome::Success);
    ev.target = Some(id);
    audited(&state, &scope, ev, result).await.map(Json)
}

/// The released output bytes; 404 until the customer released them.
#[utoipa::path(get, path = "/v1/operations/{id}/output", security(("bearer" = [])),
    params(("id" = String, Path, description = "operation id (op_…)")),
    responses((status = 200, description = "the released output", content_type = "application/octet-stream"),
        (status = 404, body = ErrorBody)))]
pub(super) async fn get_output(
    State(state): State<Arc<AppState>>,
    Authed(scope): Authed,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    authorize(&state, &scope, Action::GetOutput, Some(id.clone())).await?;
    let mut ev = event(scope.principal().actor(), Action::GetOutput.audit_action(), Outcome::Success);
    ev.target = Some(id.clone());
    let result = async {
        let op = find(&state, &scope, &id).await?;
        let not_released = || ApiError::not_found(format!("operation {id} has no released output ({})", op.state));
        if op.state != OperationState::Released {
            return Err(not_released());
        }
        let sealed = state.store.sealed_output(&scope, op.id).await?.ok_or_else(not_released)?;
        let bytes = operations::open_output(&state, &scope, op.id, &sealed).map_err(|e| {
            tracing::error!(error = %e, operation = %id, "cannot open sealed output");
            internal("the stored output could not be opened with the key-encryption key")
        })?;
        Ok((op, bytes))
    }
    .await;
    let (op, bytes) = match result {
        Ok(v) => v,
        Err(e) => return audited(&state, &scope, ev, Err(e)).await,
    };
    // Digest and size only: never the output.
    ev.detail = serde_json::json!({ "output_sha256": op.output_sha256, "output_size": op.output_size });
    audited(&state, &scope, ev, Ok(())).await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}
