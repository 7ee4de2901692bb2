//! Scoped API tokens: created, listed, rotated and revoked by owners and admins (`tokens:manage`), each change audited with its effect.
//!
//! A token never holds more than its creator: its role is one the creator could grant (only an owner makes owners), its permissions (what its role and action list allow) are a subset of the creator's on the same workspace, its workspace is within the creator's, and it expires no later than the creator.
//! The secret is shown once (`airlock_at_…`, so secret scanners find it); only its SHA-256 is stored.
//! A rotation issues a new secret and keeps the old one working for the grace it is given (default none); a revocation ends both at once.
//! Rotating or revoking a token needs at least what it holds (only an owner ends an owner's token).

use std::time::Duration;

use airlock_core::audit::{AuditAction, Outcome};
use airlock_core::id::TokenId;
use airlock_core::token::{Secret, TokenKind};
use airlock_core::{Timestamp, WorkspaceId};

use crate::authz::{ApiPrincipal, Grants, PermissionSet, Role, Target, TenantScope};
use crate::state::{AppState, event, random};
use crate::store::{NewToken, StoreError, TokenRow};

/// The longest a token may live.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(365 * 86_400);
/// The longest a rotated secret may keep working.
pub const MAX_ROTATION_GRACE: Duration = Duration::from_secs(7 * 86_400);

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("name must be 1–100 printable characters")]
    Name,
    #[error("expiry must be between 1 second and 365 days")]
    Lifetime,
    #[error("grace must be at most 7 days")]
    Grace,
    #[error("no workspace {0} in your tenant")]
    NoWorkspace(WorkspaceId),
    #[error("no token {0} in your tenant")]
    NoToken(TokenId),
    #[error("the action list names {0}, which role `{1}` does not grant")]
    ActionOutsideRole(String, &'static str),
    /// The new, rotated or revoked token holds more than the principal acting on it; the text says what.
    #[error("a token cannot hold more than the principal that makes, rotates or revokes it: {0}")]
    ExceedsCreator(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a token is asked to be.
#[derive(Debug)]
pub struct NewTokenRequest {
    pub name: String,
    pub role: Role,
    pub workspace: Option<WorkspaceId>,
    pub actions: Option<PermissionSet>,
    pub lifetime: Duration,
}

/// A token just made or rotated: its secret is shown once.
#[derive(Debug)]
pub struct Issued {
    pub secret: Secret,
    pub token: TokenRow,
}

fn target(workspace: &Option<String>) -> Target<'_> {
    workspace.as_deref().map_or(Target::Tenant, Target::Workspace)
}

/// Refuses `grants` (on `workspace`) if they exceed what `scope` holds there, or outlive it.
fn within_creator(state: &AppState, scope: &TenantScope, grants: &Grants) -> Result<(), TokenError> {
    holds_at_least(state, scope, grants)?;
    let creator =
        scope.grants().ok_or_else(|| TokenError::ExceedsCreator("only an API principal makes tokens".into()))?;
    if let Some(creator_expiry) = creator.expires_at
        && grants.expires_at.is_none_or(|t| t > creator_expiry)
    {
        return Err(TokenError::ExceedsCreator(format!("it must expire by {creator_expiry}")));
    }
    Ok(())
}

/// Refuses `grants` (on `workspace`) if they exceed what `scope` holds there: its permissions, an owner role, its workspace.
fn holds_at_least(state: &AppState, scope: &TenantScope, grants: &Grants) -> Result<(), TokenError> {
    let creator =
        scope.grants().ok_or_else(|| TokenError::ExceedsCreator("only an API principal makes tokens".into()))?;
    let tenant = scope.tenant();
    let ws_text = grants.workspace.map(|w| w.to_string());
    let target = target(&ws_text);
    let creator_id = scope.principal().actor();
    let theirs = state.authz.permissions(tenant, &ApiPrincipal { id: &creator_id, grants: creator }, target);
    let mine = state.authz.permissions(tenant, &ApiPrincipal { id: "new", grants }, target);
    if !mine.is_subset(theirs) {
        let extra: Vec<_> = mine.iter().filter(|p| !theirs.contains(*p)).map(|p| p.as_str()).collect();
        return Err(TokenError::ExceedsCreator(format!("it would be permitted {}", extra.join(", "))));
    }
    if grants.role() == Some(Role::Owner) && !creator.roles.iter().any(|(r, ws)| *r == Role::Owner && ws.is_none()) {
        return Err(TokenError::ExceedsCreator("only an owner makes, rotates or revokes owner tokens".into()));
    }
    if let Some(own) = creator.workspace
        && grants.workspace != Some(own)
    {
        return Err(TokenError::ExceedsCreator(format!("its workspace must be {own}")));
    }
    Ok(())
}

pub async fn create(state: &AppState, scope: &TenantScope, req: NewTokenRequest) -> Result<Issued, TokenError> {
    let name = req.name.trim();
    if name.is_empty() || name.chars().count() > 100 || name.chars().any(char::is_control) {
        return Err(TokenError::Name);
    }
    if req.lifetime.is_zero() || req.lifetime > MAX_TOKEN_LIFETIME {
        return Err(TokenError::Lifetime);
    }
    if let Some(ws) = req.workspace
        && !state.store.workspace_exists(scope, ws).await?
    {
        return Err(TokenError::NoWorkspace(ws));
    }
    let now = state.now();
    let grants = Grants::token(req.role, req.workspace, req.actions, Some(now.saturating_add(req.lifetime)));
    if let Some(actions) = req.actions {
        // An action the role does not grant would never be permitted; refuse it rather than store a list that misleads.
        let role_only = Grants::token(req.role, req.workspace, None, grants.expires_at);
        let ws_text = req.workspace.map(|w| w.to_string());
        let by_role =
            state.authz.permissions(scope.tenant(), &ApiPrincipal { id: "new", grants: &role_only }, target(&ws_text));
        if let Some(p) = actions.iter().find(|p| !by_role.contains(*p)) {
            return Err(TokenError::ActionOutsideRole(p.as_str().to_owned(), req.role.as_str()));
        }
    }
    within_creator(state, scope, &grants)?;
    let id = TokenId::from_random(random());
    let secret = Secret::from_random(TokenKind::Api, random());
    let actor = scope.principal().actor();
    let mut tx = state.store.write().await?;
    let new = NewToken { id, hash: &secret.hash(), name, grants: &grants, created_by: Some(&actor) };
    tx.create_api_token(scope.tenant(), new, now).await?;
    let mut ev = event(actor.clone(), AuditAction::TokenCreate, Outcome::Success);
    ev.target = Some(id.to_string());
    ev.workspace = req.workspace.map(|w| w.to_string());
    ev.detail = serde_json::json!({
        "name": name,
        "role": req.role.as_str(),
        "actions": req.actions.map(PermissionSet::to_text),
        "expires_at": grants.expires_at.map(|t| t.to_string()),
    });
    tx.audit(&scope.chain(), now, ev).await?;
    tx.commit().await?;
    let token = TokenRow {
        id,
        name: name.to_owned(),
        grants,
        created_at: now,
        created_by: Some(actor),
        rotated_at: None,
        previous_valid_until: None,
        revoked_at: None,
        last_used_at: None,
        last_used_from: None,
    };
    Ok(Issued { secret, token })
}

/// Every token of the tenant, with last uses not yet written folded in.
pub async fn list(state: &AppState, scope: &TenantScope) -> Result<Vec<TokenRow>, TokenError> {
    let mut rows = state.store.list_api_tokens(scope).await?;
    for row in &mut rows {
        if let Some((at, from)) = state.authn.usage.pending(row.id)
            && row.last_used_at.is_none_or(|t| t < at)
        {
            row.last_used_at = Some(at);
            row.last_used_from = from.map(|a| a.to_string());
        }
    }
    Ok(rows)
}

/// A new secret for a live token; the old one works for `grace` more. The rotator must hold at least what the token holds,
/// since it learns the new secret.
pub async fn rotate(state: &AppState, scope: &TenantScope, id: TokenId, grace: Duration) -> Result<Issued, TokenError> {
    if grace > MAX_ROTATION_GRACE {
        return Err(TokenError::Grace);
    }
    let Some(mut token) = state.store.get_api_token(scope, id).await?.filter(|t| t.revoked_at.is_none()) else {
        return Err(TokenError::NoToken(id));
    };
    within_creator(state, scope, &token.grants)?;
    let now = state.now();
    let valid_until = now.saturating_add(grace);
    let secret = Secret::from_random(TokenKind::Api, random());
    let mut tx = state.store.write().await?;
    if !tx.rotate_api_token(scope, id, &secret.hash(), valid_until, now).await? {
        return Err(TokenError::NoToken(id));
    }
    let mut ev = event(scope.principal().actor(), AuditAction::TokenRotate, Outcome::Success);
    ev.target = Some(id.to_string());
    ev.detail = serde_json::json!({ "previous_valid_until": valid_until.to_string() });
    tx.audit(&scope.chain(), now, ev).await?;
    tx.commit().await?;
    token.rotated_at = Some(now);
    token.previous_valid_until = Some(valid_until);
    Ok(Issued { secret, token })
}

/// Revokes a token: the very next request with either of its secrets is refused.
/// The tokens it made, and theirs, are revoked with it, each audited: whoever stole a token cannot outlast its
/// revocation with tokens it minted (they hold no more than it did, so the revoker may end them too).
/// The revoker must hold at least what the token holds (a token may always revoke itself), so an admin ends no owner's
/// token; unlike rotation, the token may outlive the revoker.
pub async fn revoke(state: &AppState, scope: &TenantScope, id: TokenId) -> Result<Revoked, TokenError> {
    let Some(token) = state.store.get_api_token(scope, id).await?.filter(|t| t.revoked_at.is_none()) else {
        return Err(TokenError::NoToken(id));
    };
    let itself = matches!(scope.principal(), crate::authz::Principal::ApiToken { id: own, .. } if *own == id);
    if !itself {
        holds_at_least(state, scope, &token.grants)?;
    }
    let now = state.now();
    let mut tx = state.store.write().await?;
    if !tx.revoke_api_token(scope, id, now).await? {
        return Err(TokenError::NoToken(id));
    }
    let made = tx.revoke_api_tokens_made_by(scope, id, now).await?;
    let mut ev = event(scope.principal().actor(), AuditAction::TokenRevoke, Outcome::Success);
    ev.target = Some(id.to_string());
    if !made.is_empty() {
        ev.detail = serde_json::json!({ "also_revoked": made.len() });
    }
    tx.audit(&scope.chain(), now, ev).await?;
    for child in &made {
        let mut ev = event(scope.principal().actor(), AuditAction::TokenRevoke, Outcome::Success);
        ev.target = Some(child.to_string());
        ev.detail = serde_json::json!({ "made_by_revoked": id.to_string() });
        tx.audit(&scope.chain(), now, ev).await?;
    }
    tx.commit().await?;
    Ok(Revoked { at: now, also_revoked: made })
}

/// A revocation's effect.
#[derive(Debug)]
pub struct Revoked {
    pub at: Timestamp,
    /// The tokens it made, and theirs, revoked with it.
    pub also_revoked: Vec<TokenId>,
}
