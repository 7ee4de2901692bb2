//! Identity-provider groups mapped to roles, tenant-wide or in one workspace; a user's roles are what their groups map to at sign-in.
//!
//! A mapping never grants more than its maker holds on the same place (as a token never holds more than its creator), and only an owner maps a group to owner; removing a mapping needs the same.
//! A tenant holds at most [`MAX_MAPPINGS`].

use airlock_core::WorkspaceId;
use airlock_core::audit::{AuditAction, Outcome};
use airlock_core::id::RoleMappingId;

use crate::authz::{ApiPrincipal, Grants, Role, Target, TenantScope};
use crate::state::{AppState, event, random};
use crate::store::{RoleMappingRow, StoreError};

pub const MAX_MAPPINGS: usize = 256;
/// Groups read from one ID token at most; the rest are ignored (a provider sending thousands is misconfigured).
pub const MAX_GROUPS: usize = 256;
const MAX_GROUP_LEN: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum MappingError {
    #[error("group must be 1–256 printable characters")]
    Group,
    #[error("no workspace {0} in your tenant")]
    NoWorkspace(WorkspaceId),
    #[error("no role mapping {0} in your tenant")]
    NoMapping(RoleMappingId),
    #[error("a tenant holds at most {MAX_MAPPINGS} role mappings")]
    TooMany,
    #[error("a mapping cannot grant more than the principal that makes or removes it: {0}")]
    ExceedsMaker(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Whether `group` is a name a mapping may hold.
pub fn valid_group(group: &str) -> bool {
    !group.is_empty() && group.chars().count() <= MAX_GROUP_LEN && !group.chars().any(char::is_control)
}

/// Refuses a mapping to `role` on `workspace` that would grant more than `scope` holds there.
fn within_maker(
    state: &AppState,
    scope: &TenantScope,
    role: Role,
    workspace: Option<WorkspaceId>,
) -> Result<(), MappingError> {
    let maker = scope.grants().ok_or_else(|| MappingError::ExceedsMaker("only an API principal maps groups".into()))?;
    if role == Role::Owner && !maker.roles.iter().any(|(r, ws)| *r == Role::Owner && ws.is_none()) {
        return Err(MappingError::ExceedsMaker("only an owner maps a group to owner".into()));
    }
    let ws_text = workspace.map(|w| w.to_string());
    let target = ws_text.as_deref().map_or(Target::Tenant, Target::Workspace);
    let maker_id = scope.principal().actor();
    let theirs = state.authz.permissions(scope.tenant(), &ApiPrincipal { id: &maker_id, grants: maker }, target);
    let mapped = Grants::token(role, workspace, None, None);
    let mine = state.authz.permissions(scope.tenant(), &ApiPrincipal { id: "mapping", grants: &mapped }, target);
    if !mine.is_subset(theirs) {
        let extra: Vec<_> = mine.iter().filter(|p| !theirs.contains(*p)).map(|p| p.as_str()).collect();
        return Err(MappingError::ExceedsMaker(format!("it would grant {}", extra.join(", "))));
    }
    Ok(())
}

pub async fn add(
    state: &AppState,
    scope: &TenantScope,
    group: &str,
    role: Role,
    workspace: Option<WorkspaceId>,
) -> Result<RoleMappingRow, MappingError> {
    if !valid_group(group) {
        return Err(MappingError::Group);
    }
    if let Some(ws) = workspace
        && !state.store.workspace_exists(scope, ws).await?
    {
        return Err(MappingError::NoWorkspace(ws));
    }
    within_maker(state, scope, role, workspace)?;
    let now = state.now();
    let actor = scope.principal().actor();
    let row = RoleMappingRow {
        id: RoleMappingId::from_random(random()),
        group: group.to_owned(),
        role,
        workspace,
        created_at: now,
        created_by: actor.clone(),
    };
    let mut tx = state.store.write().await?;
    if tx.count_role_mappings(scope).await? >= MAX_MAPPINGS {
        return Err(MappingError::TooMany);
    }
    tx.add_role_mapping(scope, &row).await?;
    let mut ev = event(actor, AuditAction::RoleMappingAdd, Outcome::Success);
    ev.target = Some(row.id.to_string());
    ev.workspace = workspace.map(|w| w.to_string());
    ev.detail = serde_json::json!({ "group": row.group, "role": role.as_str() });
    tx.audit(&scope.chain(), now, ev).await?;
    tx.commit().await?;
    Ok(row)
}

pub async fn list(state: &AppState, scope: &TenantScope) -> Result<Vec<RoleMappingRow>, MappingError> {
    Ok(state.store.list_role_mappings(scope).await?)
}

pub async fn remove(state: &AppState, scope: &TenantScope, id: RoleMappingId) -> Result<(), MappingError> {
    let row = state.store.role_mapping(scope, id).await?.ok_or(MappingError::NoMapping(id))?;
    within_maker(state, scope, row.role, row.workspace)?;
    let now = state.now();
    let mut tx = state.store.write().await?;
    if !tx.remove_role_mapping(scope, id).await? {
        return Err(MappingError::NoMapping(id));
    }
    let mut ev = event(scope.principal().actor(), AuditAction::RoleMappingRemove, Outcome::Success);
    ev.target = Some(id.to_string());
    ev.workspace = row.workspace.map(|w| w.to_string());
    ev.detail = serde_json::json!({ "group": row.group, "role": row.role.as_str() });
    tx.audit(&scope.chain(), now, ev).await?;
    tx.commit().await?;
    Ok(())
}

/// The roles `groups` map to, each once, in mapping order.
pub fn roles_for_groups(mappings: &[RoleMappingRow], groups: &[String]) -> Vec<(Role, Option<WorkspaceId>)> {
    let mut roles = Vec::new();
    for m in mappings {
        if groups.contains(&m.group) && !roles.contains(&(m.role, m.workspace)) {
            roles.push((m.role, m.workspace));
        }
    }
    roles
}
