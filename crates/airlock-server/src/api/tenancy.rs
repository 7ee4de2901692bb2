//! Workspaces, environments and join tokens under `/v1`.

use std::sync::Arc;
use std::time::Duration;

use airlock_core::WorkspaceId;
use airlock_core::audit::Outcome;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{ApiError, ApiJson, ApiPath, Authed, ErrorBody, ReadAudit, audited, parse_id, refused};
use crate::authz::Action;
use crate::state::{AppState, event};
use crate::tenancy::{self, TenancyError};

#[derive(Serialize, Deserialize, ToSchema)]
pub struct WorkspaceView {
    pub id: String,
    pub name: String,
    pub created_at: String,
}

/// List the workspaces of the caller's tenant.
#[utoipa::path(get, path = "/v1/workspaces", security(("bearer" = [])),
    responses((status = 200, body = Vec<WorkspaceView>)))]
pub(super) async fn list_workspaces(
    State(state): State<Arc<AppState>>,
    Authed(scope): Authed,
) -> Result<Json<Vec<WorkspaceView>>, ApiError> {
    let result = state.store.list_workspaces(&scope).await.map_err(ApiError::from).map(|ws| {
        ws.into_iter()
            .map(|w| WorkspaceView { id: w.id.to_string(), name: w.name, created_at: w.created_at.to_string() })
            .collect()
    });
    let ev = event(scope.principal().actor(), Action::ListWorkspaces.audit_action(), Outcome::Success);
    audited(&state, &scope, ReadAudit::Access, ev, result).await.map(Json)
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
    responses((status = 200, body = Vec<EnvironmentView>)))]
pub(super) async fn list_environments(
    State(state): State<Arc<AppState>>,
    Authed(scope): Authed,
    ApiPath(workspace): ApiPath<String>,
) -> Result<Json<Vec<EnvironmentView>>, ApiError> {
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
    audited(&state, &scope, ReadAudit::Access, ev, result).await.map(Json)
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateEnvironment {
    /// 1–64 characters: letters, digits, `-`, `_`, `.` (`tenancy::validate_name`).
    #[schema(pattern = "^[A-Za-z0-9._-]{1,64}$")]
    pub name: String,
}

/// Create an environment (one customer deployment) in a workspace.
#[utoipa::path(post, path = "/v1/workspaces/{workspace}/environments", security(("bearer" = [])),
    params(("workspace" = String, Path, description = "workspace id (wsp_…)")),
    request_body = CreateEnvironment,
    responses((status = 201, body = EnvironmentView),
        (status = 409, body = ErrorBody, description = "the workspace has an environment of that name")))]
pub(super) async fn create_environment(
    State(state): State<Arc<AppState>>,
    Authed(scope): Authed,
    ApiPath(workspace): ApiPath<String>,
    body: Result<ApiJson<CreateEnvironment>, ApiError>,
) -> Result<(StatusCode, Json<EnvironmentView>), ApiError> {
    let result = async {
        let ApiJson(body) = body?;
        let env = tenancy::create_environment(&state, &scope, parse_id(&workspace)?, &body.name).await?;
        Ok((StatusCode::CREATED, Json(env.into())))
    }
    .await;
    let mut ev = event(scope.principal().actor(), Action::CreateEnvironment.audit_action(), Outcome::Success);
    ev.workspace = Some(workspace);
    refused(&state, &scope, ev, result).await
}

#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct CreateJoinToken {
    /// Lifetime in seconds; default 900 (15 minutes), at most 86400 (`MAX_JOIN_TOKEN_TTL`).
    #[schema(minimum = 1, maximum = 86400)]
    pub ttl_seconds: Option<u64>,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct JoinTokenView {
    /// The token in clear. Shown once; only its hash is stored.
    pub token: String,
    pub environment_id: String,
    pub expires_at: String,
}

/// Create a single-use join token for an environment.
#[utoipa::path(post, path = "/v1/environments/{environment}/join-tokens", security(("bearer" = [])),
    params(("environment" = String, Path, description = "environment id (env_…)")),
    request_body = CreateJoinToken,
    responses((status = 201, body = JoinTokenView)))]
pub(super) async fn create_join_token(
    State(state): State<Arc<AppState>>,
    Authed(scope): Authed,
    ApiPath(environment): ApiPath<String>,
    body: Result<ApiJson<CreateJoinToken>, ApiError>,
) -> Result<(StatusCode, Json<JoinTokenView>), ApiError> {
    let result = async {
        let ApiJson(body) = body?;
        let ttl = body.ttl_seconds.map(Duration::from_secs);
        let issued = tenancy::create_join_token(&state, &scope, parse_id(&environment)?, ttl).await?;
        let view = JoinTokenView {
            token: issued.secret.expose().to_owned(),
            environment_id: issued.environment.to_string(),
            expires_at: issued.expires_at.to_string(),
        };
        Ok((StatusCode::CREATED, Json(view)))
    }
    .await;
    let mut ev = event(scope.principal().actor(), Action::CreateJoinToken.audit_action(), Outcome::Success);
    ev.target = Some(environment);
    refused(&state, &scope, ev, result).await
}

impl From<TenancyError> for ApiError {
    fn from(e: TenancyError) -> Self {
        match e {
            TenancyError::Name | TenancyError::Ttl => ApiError::bad_request(e.to_string()),
            TenancyError::NoWorkspace(_) | TenancyError::NoEnvironment(_) => ApiError::not_found(e.to_string()),
            TenancyError::Store(e) => e.into(),
        }
    }
}
