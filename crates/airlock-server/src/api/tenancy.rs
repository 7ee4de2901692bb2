//! Workspaces, environments and join tokens under `/v1`.

use std::sync::Arc;
use std::time::Duration;

use airlock_core::audit::Outcome;
use airlock_core::id::TokenId;
use airlock_core::token::{Secret, TokenKind};
use airlock_core::{EnvironmentId, WorkspaceId};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{ApiError, ApiJson, Authed, ErrorBody, audited, authorize, parse_id};
use crate::authz::Action;
use crate::state::{AppState, event, random};

#[derive(Serialize, Deserialize, ToSchema)]
pub struct WorkspaceView {
    pub id: String,
    pub name: String,
    pub created_at: String,
}

/// List the workspaces of the caller's tenant.
#[utoipa::path(get, path = "/v1/workspaces", security(("bearer" = [])),
    responses((status = 200, body = Vec<WorkspaceView>), (status = 401, body = ErrorBody)))]
pub(super) async fn list_workspaces(
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
pub(super) async fn list_environments(
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
pub(super) async fn create_environment(
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
pub(super) async fn create_join_token(
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
