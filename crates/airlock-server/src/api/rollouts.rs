//! `/v1/workspaces/{workspace}/rollouts` and `/v1/rollouts/{rollout}`: one release deployed to
//! many appliances, a few at a time, halted past a failure threshold (see [`crate::rollouts`]).

use std::sync::Arc;

use airlock_core::audit::Outcome;
use airlock_core::{RolloutId, Timestamp, WorkspaceId};
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{ApiError, ApiJson, ApiPath, Authed, ErrorBody, ReadAudit, audited, parse_id, refused};
use crate::authz::{Action, TenantScope};
use crate::releases::DeployableError;
use crate::rollouts::{NewRollout, RolloutError, RolloutState, TargetState};
use crate::state::{AppState, event};
use crate::store::{RolloutRow, RolloutTargetRow, StoreError};

impl From<RolloutError> for ApiError {
    fn from(e: RolloutError) -> Self {
        match e {
            RolloutError::Concurrency
            | RolloutError::Reason
            | RolloutError::NoTargets
            | RolloutError::TooManyTargets
            | RolloutError::NotAnApiPrincipal => ApiError::bad_request(e.to_string()),
            RolloutError::NoEnvironment(_) | RolloutError::NoWorkspace(_) => ApiError::not_found(e.to_string()),
            RolloutError::Release(DeployableError::NoRelease(..)) => ApiError::not_found(e.to_string()),
            RolloutError::Release(DeployableError::NoLongerVerifies(..)) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "unverified", e.to_string())
            }
            RolloutError::Release(DeployableError::Interrupted) => ApiError::unavailable(e.to_string()),
            RolloutError::Release(DeployableError::Store(e)) | RolloutError::Store(e) => e.into(),
        }
    }
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRollout {
    /// The release: `NAME@VERSION`, or its digest.
    pub release: String,
    /// Environment ids (env_…); every environment of the workspace when absent or empty.
    #[serde(default)]
    pub environments: Vec<String>,
    /// Deploys at once (a deploy waiting for its customer's approval holds a slot); default 1.
    #[serde(default = "one")]
    #[schema(minimum = 1, maximum = 10000)]
    pub concurrency: u32,
    /// Failed deploys tolerated; one more halts the rollout. Default 0.
    #[serde(default)]
    pub max_failures: u32,
    /// Why, shown to every customer and signed into each deploy.
    pub reason: String,
}

fn one() -> u32 {
    1
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct RolloutTargetView {
    pub environment: String,
    pub appliance: String,
    pub operation: Option<String>,
    pub state: TargetState,
    /// Why a target failed before its deploy was requested (empty otherwise).
    pub detail: String,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct RolloutView {
    pub id: String,
    pub workspace: String,
    pub release_digest: String,
    pub release_name: String,
    pub release_version: String,
    pub concurrency: u32,
    pub max_failures: u32,
    pub reason: String,
    pub state: RolloutState,
    pub total: usize,
    pub pending: usize,
    pub deploying: usize,
    pub succeeded: usize,
    pub failed: usize,
    pub targets: Vec<RolloutTargetView>,
    #[schema(value_type = i64)]
    pub created_at: Timestamp,
    #[schema(value_type = i64)]
    pub updated_at: Timestamp,
}

async fn view(state: &AppState, scope: &TenantScope, r: &RolloutRow) -> Result<RolloutView, StoreError> {
    let targets = state.store.rollout_targets(scope, r.id).await?;
    Ok(view_of(r, &targets))
}

/// A rollout with its targets as given.
fn view_of(r: &RolloutRow, targets: &[RolloutTargetRow]) -> RolloutView {
    let count = |s: TargetState| targets.iter().filter(|t| t.state == s).count();
    RolloutView {
        id: r.id.to_string(),
        workspace: r.workspace_id.to_string(),
        release_digest: r.release_digest.clone(),
        release_name: r.release_name.clone(),
        release_version: r.release_version.clone(),
        concurrency: r.concurrency,
        max_failures: r.max_failures,
        reason: r.reason.clone(),
        state: r.state,
        total: targets.len(),
        pending: count(TargetState::Pending),
        deploying: count(TargetState::Deploying),
        succeeded: count(TargetState::Succeeded),
        failed: count(TargetState::Failed),
        targets: targets
            .iter()
            .map(|t| RolloutTargetView {
                environment: t.environment_id.to_string(),
                appliance: t.appliance_id.to_string(),
                operation: t.operation_id.map(|o| o.to_string()),
                state: t.state,
                detail: t.detail.clone(),
            })
            .collect(),
        created_at: r.created_at,
        updated_at: r.updated_at,
    }
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct RolloutList {
    pub rollouts: Vec<RolloutView>,
}

/// Start a rollout: the release is deployed to every active appliance of the chosen
/// environments, `concurrency` at a time, each as an ordinary deploy its customer decides
/// about; more than `max_failures` failed deploys halt it. It carries on after a restart.
#[utoipa::path(post, path = "/v1/workspaces/{workspace}/rollouts", security(("bearer" = [])),
    params(("workspace" = String, Path, description = "workspace id (wsp_…)")),
    request_body = CreateRollout,
    responses((status = 201, body = RolloutView),
        (status = 404, body = ErrorBody, description = "no such workspace, environment or release"),
        (status = 422, body = ErrorBody, description = "the release no longer verifies with the workspace's unrevoked keys")))]
pub(super) async fn create_rollout(
    State(state): State<Arc<AppState>>,
    Authed(scope): Authed,
    ApiPath(workspace): ApiPath<String>,
    body: Result<ApiJson<CreateRollout>, ApiError>,
) -> Result<(StatusCode, Json<RolloutView>), ApiError> {
    let result = async {
        let ApiJson(body) = body?;
        let ws: WorkspaceId = parse_id(&workspace)?;
        let new = NewRollout {
            workspace: ws,
            release: body.release.parse().map_err(ApiError::bad_request)?,
            environments: body.environments.iter().map(|e| parse_id(e)).collect::<Result<_, _>>()?,
            concurrency: body.concurrency,
            max_failures: body.max_failures,
            reason: body.reason,
        };
        // Created and its first round driven now rather than at the next tick; answered with
        // the targets as that round left them, not read back.
        let (row, targets) = crate::rollouts::create(&state, &scope, new).await?;
        Ok((StatusCode::CREATED, Json(view_of(&row, &targets))))
    }
    .await;
    let mut ev = event(scope.principal().actor(), Action::CreateRollout.audit_action(), Outcome::Success);
    ev.workspace = Some(workspace);
    refused(&state, &scope, ev, result).await
}

/// A workspace's rollouts, newest first.
#[utoipa::path(get, path = "/v1/workspaces/{workspace}/rollouts", security(("bearer" = [])),
    params(("workspace" = String, Path, description = "workspace id (wsp_…)")),
    responses((status = 200, body = RolloutList)))]
pub(super) async fn list_rollouts(
    State(state): State<Arc<AppState>>,
    Authed(scope): Authed,
    ApiPath(workspace): ApiPath<String>,
) -> Result<Json<RolloutList>, ApiError> {
    let result = async {
        let ws: WorkspaceId = parse_id(&workspace)?;
        if !state.store.workspace_exists(&scope, ws).await? {
            return Err(ApiError::not_found(format!("no workspace {ws} in your tenant")));
        }
        let mut rollouts = Vec::new();
        for r in state.store.list_rollouts(&scope, ws).await? {
            rollouts.push(view(&state, &scope, &r).await?);
        }
        Ok(RolloutList { rollouts })
    }
    .await;
    let mut ev = event(scope.principal().actor(), Action::ListRollouts.audit_action(), Outcome::Success);
    ev.workspace = Some(workspace);
    audited(&state, &scope, ReadAudit::Access, ev, result).await.map(Json)
}

/// One rollout, with every target.
#[utoipa::path(get, path = "/v1/rollouts/{rollout}", security(("bearer" = [])),
    params(("rollout" = String, Path, description = "rollout id (rol_…)")),
    responses((status = 200, body = RolloutView),
        (status = 404, body = ErrorBody, description = "no such rollout in your tenant")))]
pub(super) async fn get_rollout(
    State(state): State<Arc<AppState>>,
    Authed(scope): Authed,
    ApiPath(rollout): ApiPath<String>,
) -> Result<Json<RolloutView>, ApiError> {
    let result = async {
        let id: RolloutId = parse_id(&rollout)?;
        let row = state
            .store
            .rollout(&scope, id)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("no rollout {id} in your tenant")))?;
        Ok(view(&state, &scope, &row).await?)
    }
    .await;
    let mut ev = event(scope.principal().actor(), Action::GetRollout.audit_action(), Outcome::Success);
    ev.target = Some(rollout);
    audited(&state, &scope, ReadAudit::Access, ev, result).await.map(Json)
}
