//! Tenancy: the environments of a workspace, and the single-use tokens that join appliances to them.
//!
//! Tenants and workspaces are made offline, by `airlock server init` and `tenant create`.
//! A join token is shown once; only its hash is stored.

use std::time::Duration;

use airlock_core::audit::{AuditAction, Outcome};
use airlock_core::id::TokenId;
use airlock_core::token::{Secret, TokenKind};
use airlock_core::{ApplianceId, EnvironmentId, OperationId, RolloutId, Timestamp, WorkspaceId};

use crate::authz::{Target, TenantScope};
use crate::state::{AppState, event, random};
use crate::store::{Environment, StoreError};

/// The longest a join token may live.
pub const MAX_JOIN_TOKEN_TTL: Duration = Duration::from_secs(86_400);

#[derive(Debug, thiserror::Error)]
pub enum TenancyError {
    #[error("name must be 1–64 characters of letters, digits, `-`, `_` or `.`")]
    Name,
    #[error("ttl_seconds must be between 1 and 86400")]
    Ttl,
    #[error("no workspace {0} in your tenant")]
    NoWorkspace(WorkspaceId),
    #[error("no environment {0} in your tenant")]
    NoEnvironment(EnvironmentId),
    /// Includes a name already taken ([`StoreError::Conflict`]).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Creates an environment (one customer deployment) named `name` in `workspace`.
pub async fn create_environment(
    state: &AppState,
    scope: &TenantScope,
    workspace: WorkspaceId,
    name: &str,
) -> Result<Environment, TenancyError> {
    validate_name(name)?;
    if !state.store.workspace_exists(scope, workspace).await? {
        return Err(TenancyError::NoWorkspace(workspace));
    }
    let id = EnvironmentId::from_random(random());
    let now = state.now();
    let mut tx = state.store.write().await?;
    let env = tx.create_environment(scope, workspace, id, name, now).await?;
    let mut ev = event(scope.principal().actor(), AuditAction::EnvironmentCreate, Outcome::Success);
    ev.workspace = Some(workspace.to_string());
    ev.target = Some(id.to_string());
    ev.detail = serde_json::json!({ "name": name });
    tx.audit(&scope.chain(), now, ev).await?;
    tx.commit().await?;
    Ok(env)
}

/// A join token just made. Its secret is shown once; only its hash is stored.
#[derive(Debug)]
pub struct IssuedJoinToken {
    pub secret: Secret,
    pub environment: EnvironmentId,
    pub expires_at: Timestamp,
}

/// Makes a single-use join token for `environment`, living `ttl` (the server's default when
/// none is given).
pub async fn create_join_token(
    state: &AppState,
    scope: &TenantScope,
    environment: EnvironmentId,
    ttl: Option<Duration>,
) -> Result<IssuedJoinToken, TenancyError> {
    let ttl = ttl.unwrap_or(state.join_token_ttl);
    if ttl.is_zero() || ttl > MAX_JOIN_TOKEN_TTL {
        return Err(TenancyError::Ttl);
    }
    let env = state.store.get_environment(scope, environment).await?.ok_or(TenancyError::NoEnvironment(environment))?;
    let secret = Secret::from_random(TokenKind::Join, random());
    let token_id = TokenId::from_random(random());
    let now = state.now();
    let expires_at = now.saturating_add(ttl);
    let mut tx = state.store.write().await?;
    tx.create_join_token(scope, env.id, token_id, &secret.hash(), now, expires_at).await?;
    let mut ev = event(scope.principal().actor(), AuditAction::JoinTokenCreate, Outcome::Success);
    ev.target = Some(env.id.to_string());
    ev.workspace = Some(env.workspace_id.to_string());
    ev.detail = serde_json::json!({ "join_token": token_id.to_string(), "expires_at": expires_at.to_string() });
    tx.audit(&scope.chain(), now, ev).await?;
    tx.commit().await?;
    Ok(IssuedJoinToken { secret, environment: env.id, expires_at })
}

/// The workspace a request acts in, as far as its path (or a list's query) says: the workspace it names, or the
/// workspace of the environment, operation, rollout or appliance it names (one lookup in the scope's tenant). `None`
/// for a tenant-wide request, or a resource not found, whether missing, malformed or another tenant's (then only
/// tenant-wide roles apply to it, and each of those gets the same answer). The API's gate confines a user whose roles
/// span workspaces to it before deciding.
pub async fn workspace_of(
    state: &AppState,
    scope: &TenantScope,
    target: Target<'_>,
) -> Result<Option<WorkspaceId>, StoreError> {
    match target {
        Target::Tenant => Ok(None),
        Target::Workspace(id) => Ok(id.parse().ok()),
        Target::Environment(id) => match id.parse::<EnvironmentId>() {
            Ok(env) => Ok(state.store.get_environment(scope, env).await?.map(|e| e.workspace_id)),
            Err(_) => Ok(None),
        },
        Target::Operation(id) => match id.parse::<OperationId>() {
            Ok(op) => state.store.operation_workspace(scope, op).await,
            Err(_) => Ok(None),
        },
        Target::Rollout(id) => match id.parse::<RolloutId>() {
            Ok(rollout) => state.store.rollout_workspace(scope, rollout).await,
            Err(_) => Ok(None),
        },
        Target::Appliance(id) => match id.parse::<ApplianceId>() {
            Ok(appliance) => state.store.appliance_workspace(scope, appliance).await,
            Err(_) => Ok(None),
        },
    }
}

fn validate_name(name: &str) -> Result<(), TenancyError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok { Ok(()) } else { Err(TenancyError::Name) }
}
