//! Who may act on which tenant's data, and what they may do there.
//!
//! A [`TenantScope`] is proof that a principal was authenticated for one tenant.
//! Only this module constructs one; it is neither `Clone` nor `Deserialize`, so it cannot be copied across requests or forged from input.
//! Every tenant-data store call demands one, and binds its tenant id in the SQL; a scope confined to a workspace also confines the store's workspace lookups ([`TenantScope::workspace`]).
//! What a principal may do is one Cedar decision ([`engine::Engine`], default deny) over the one action table ([`actions::Action::spec`]), made before any handler work (`api::access`).

pub mod actions;
pub mod engine;
#[cfg(test)]
mod tests;

use std::str::FromStr;

use airlock_core::id::{SessionId, TokenId};
use airlock_core::{ApplianceId, ApplianceIdentity, TenantId, Timestamp, WorkspaceId};

pub use actions::{Action, Permission, PermissionSet, ResourceKind};
pub use engine::{ApiPrincipal, Decision, DenyReason, Engine, PrincipalKind, Target};

/// An API token as stored, before authorization builds a scope from it.
#[derive(Clone, Debug)]
pub struct ApiToken {
    pub id: TokenId,
    pub tenant: TenantId,
    pub grants: Grants,
}

/// What a principal holds: roles, and for a scoped token its action list and workspace.
/// A signed-in user carries the same, its roles mapped from identity-provider groups at sign-in ([`Grants::user`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grants {
    /// Each role held, tenant-wide (`None`) or in one workspace.
    pub roles: Vec<(Role, Option<WorkspaceId>)>,
    /// A token's explicit permissions; `None` for a principal with no list (it gets what its roles give).
    pub actions: Option<PermissionSet>,
    /// A token confined to one workspace.
    pub workspace: Option<WorkspaceId>,
    /// When the credential stops working; `None` only for owner tokens made at the console (`server init`, `tenant create`) or before scopes existed.
    pub expires_at: Option<Timestamp>,
}

impl Grants {
    /// A token's grants: one role, in its workspace if it has one.
    pub fn token(
        role: Role,
        workspace: Option<WorkspaceId>,
        actions: Option<PermissionSet>,
        expires_at: Option<Timestamp>,
    ) -> Self {
        Self { roles: vec![(role, workspace)], actions, workspace, expires_at }
    }

    /// A signed-in user's grants: the roles its groups map to. Roles all held in one workspace confine the user to it,
    /// as a workspace token is confined (the store then resolves environments within it).
    pub fn user(roles: Vec<(Role, Option<WorkspaceId>)>) -> Self {
        let mut places = roles.iter().map(|(_, ws)| *ws);
        let workspace = match places.next() {
            Some(Some(first)) if places.all(|ws| ws == Some(first)) => Some(first),
            _ => None,
        };
        Self { roles, actions: None, workspace, expires_at: None }
    }

    /// Whether these grants hold roles in particular workspaces without being confined to one: a signed-in user whose
    /// roles are in several workspaces, or some in one and some tenant-wide. Such a user's request is confined to the
    /// workspace it acts in before it is decided ([`TenantScope::within_workspace`]).
    pub fn spans_workspaces(&self) -> bool {
        self.workspace.is_none() && self.roles.iter().any(|(_, ws)| ws.is_some())
    }

    /// These grants as they apply in `ws`, confined to it: every role held tenant-wide or in `ws`, now held in `ws`.
    pub fn within(&self, ws: WorkspaceId) -> Self {
        let roles =
            self.roles.iter().filter(|(_, held_in)| held_in.is_none_or(|h| h == ws)).map(|(r, _)| (*r, Some(ws)));
        Self { roles: roles.collect(), actions: self.actions, workspace: Some(ws), expires_at: self.expires_at }
    }

    /// The roles that apply on `target`: tenant-wide roles, and roles held in its workspace.
    /// A workspace role counts on an environment, an operation, a rollout or an appliance only for a principal confined
    /// to that workspace, since the store resolves them within the scope's workspace; their paths name no workspace, so
    /// a user whose roles span workspaces is first confined to the resource's (`api::access`, `tenancy::workspace_of`).
    pub fn roles_for<'a>(&'a self, target: Target<'a>) -> impl Iterator<Item = Role> + 'a {
        self.roles
            .iter()
            .filter(move |(_, held_in)| match (held_in, target) {
                (None, _) => true,
                (Some(ws), Target::Workspace(id)) => ws.to_string() == id,
                (
                    Some(ws),
                    Target::Environment(_) | Target::Operation(_) | Target::Rollout(_) | Target::Appliance(_),
                ) => self.workspace == Some(*ws),
                (Some(_), Target::Tenant) => false,
            })
            .map(|(role, _)| *role)
    }

    /// The role a token holds (its first; a token holds one).
    pub fn role(&self) -> Option<Role> {
        self.roles.first().map(|(r, _)| *r)
    }
}

/// Roles. What each may do is decided in `policies/roles.cedar`; default deny.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Everything in the tenant.
    Owner,
    /// Everything in the tenant but making owners.
    Admin,
    /// Deploy phase: releases, artifacts, rollouts, deployments; and reads.
    Deployer,
    /// Operate phase: operation requests, release tasks, approvals relayed; and reads.
    Operator,
    /// Reads, except the audit log.
    Viewer,
    /// The audit log only.
    Auditor,
}

impl Role {
    pub const ALL: &'static [Role] =
        &[Role::Owner, Role::Admin, Role::Deployer, Role::Operator, Role::Viewer, Role::Auditor];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Admin => "admin",
            Role::Deployer => "deployer",
            Role::Operator => "operator",
            Role::Viewer => "viewer",
            Role::Auditor => "auditor",
        }
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL.iter().copied().find(|r| r.as_str() == s).ok_or_else(|| {
            format!(
                "unknown role `{}`; roles: owner, admin, deployer, operator, viewer, auditor",
                s.chars().take(32).collect::<String>()
            )
        })
    }
}

/// An authenticated actor.
#[derive(Debug, PartialEq, Eq)]
pub enum Principal {
    ApiToken {
        id: TokenId,
        grants: Grants,
    },
    Appliance(ApplianceId),
    /// A person signed in through the tenant's identity provider: the session, the subject the provider named,
    /// when they last authenticated there, and the roles mapped from their groups at sign-in.
    User {
        subject: String,
        session: SessionId,
        auth_time: Timestamp,
        grants: Grants,
    },
    /// The control plane itself, for what it records on no one's behalf (a rollout halted
    /// because its creator's token was revoked). It is permitted no action.
    System,
}

impl Principal {
    /// How the audit log names this principal.
    pub fn actor(&self) -> String {
        match self {
            Principal::ApiToken { id, .. } => format!("token:{id}"),
            Principal::User { subject, .. } => format!("user:{subject}"),
            Principal::Appliance(id) => format!("appliance:{id}"),
            Principal::System => "system".to_owned(),
        }
    }
}

#[derive(Debug)]
pub struct TenantScope {
    tenant: TenantId,
    principal: Principal,
}

impl TenantScope {
    pub fn tenant(&self) -> TenantId {
        self.tenant
    }

    pub fn principal(&self) -> &Principal {
        &self.principal
    }

    /// The audit chain this scope's events belong to.
    pub fn chain(&self) -> String {
        self.tenant.to_string()
    }

    /// An API token found in the store, not revoked.
    pub(crate) fn for_api_token(row: ApiToken) -> Self {
        Self { tenant: row.tenant, principal: Principal::ApiToken { id: row.id, grants: row.grants } }
    }

    /// A live session of a signed-in user (not ended, within its idle and absolute timeouts).
    pub(crate) fn for_session(
        tenant: TenantId,
        session: SessionId,
        subject: String,
        auth_time: Timestamp,
        grants: Grants,
    ) -> Self {
        Self { tenant, principal: Principal::User { subject, session, auth_time, grants } }
    }

    /// An appliance whose certificate chained to our CA and is neither expired nor revoked.
    pub(crate) fn for_appliance(identity: &ApplianceIdentity) -> Self {
        Self { tenant: identity.tenant, principal: Principal::Appliance(identity.appliance) }
    }

    /// A rollout's driver, acting with the authority of the (unrevoked) token that created it.
    pub(crate) fn for_rollout(creator: ApiToken) -> Self {
        Self::for_api_token(creator)
    }

    /// A rollout's driver, acting with the roles of the session a user created it in (a snapshot, as they applied in
    /// its workspace). Its `auth_time` is the rollout's creation: the driver exercises nothing that steps up.
    pub(crate) fn for_user_rollout(
        tenant: TenantId,
        subject: String,
        session: SessionId,
        roles: Vec<(Role, Option<WorkspaceId>)>,
        created_at: Timestamp,
    ) -> Self {
        Self::for_session(tenant, session, subject, created_at, Grants::user(roles))
    }

    /// This scope for one request acting in workspace `ws` (one the path names, or an environment's): a user whose roles
    /// span workspaces is confined to `ws` with the roles that apply there, so the decision and the store see only it.
    /// Any other scope is returned as it is.
    pub(crate) fn within_workspace(self, ws: WorkspaceId) -> Self {
        match self.principal {
            Principal::User { subject, session, auth_time, grants } if grants.spans_workspaces() => Self {
                tenant: self.tenant,
                principal: Principal::User { subject, session, auth_time, grants: grants.within(ws) },
            },
            principal => Self { tenant: self.tenant, principal },
        }
    }

    /// Whether this is a user whose roles span workspaces ([`Grants::spans_workspaces`]).
    pub fn spans_workspaces(&self) -> bool {
        matches!(&self.principal, Principal::User { grants, .. } if grants.spans_workspaces())
    }

    /// The control plane recording in `tenant` on no one's behalf.
    pub(crate) fn for_system(tenant: TenantId) -> Self {
        Self { tenant, principal: Principal::System }
    }

    /// The operator at the console of the data directory (`airlock server init`, `tenant create`).
    pub(crate) fn for_local_operator(tenant: TenantId, token: TokenId) -> Self {
        Self {
            tenant,
            principal: Principal::ApiToken { id: token, grants: Grants::token(Role::Owner, None, None, None) },
        }
    }

    /// The workspace this scope is confined to, if any: store lookups of workspaces and environments see no other.
    pub fn workspace(&self) -> Option<WorkspaceId> {
        match &self.principal {
            Principal::ApiToken { grants, .. } | Principal::User { grants, .. } => grants.workspace,
            Principal::Appliance(_) | Principal::System => None,
        }
    }

    /// The grants of an API principal.
    pub fn grants(&self) -> Option<&Grants> {
        match &self.principal {
            Principal::ApiToken { grants, .. } | Principal::User { grants, .. } => Some(grants),
            Principal::Appliance(_) | Principal::System => None,
        }
    }

    /// The one decision: whether this principal may perform `action` on `target` in its tenant.
    pub fn decide(&self, engine: &Engine, action: Action, target: Target<'_>) -> Decision {
        match &self.principal {
            Principal::ApiToken { id, grants } => {
                let id = id.to_string();
                engine.decide_remembered(self.tenant, &ApiPrincipal { id: &id, grants }, action.permission(), target)
            }
            Principal::User { session, grants, .. } => {
                let id = session.to_string();
                let principal = ApiPrincipal { id: &id, grants };
                engine.decide_remembered_as(PrincipalKind::User, self.tenant, &principal, action.permission(), target)
            }
            Principal::Appliance(_) | Principal::System => Decision::Deny(DenyReason::NotAnApiPrincipal),
        }
    }
}
