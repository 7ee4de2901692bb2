//! The one table of API actions: each [`Action`] names its permission (the string a scoped token lists and the Cedar action id) and the kind of resource it acts on.
//!
//! Routes map onto actions in `api::access::ROUTES`; a test walks the router so none is forgotten.

use std::fmt;
use std::str::FromStr;

use airlock_core::audit::AuditAction;

/// What an action acts on, as far as its path says before any handler work.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ResourceKind {
    /// The tenant as a whole (a list across workspaces, tokens, a resource found by its own id).
    Tenant,
    /// The workspace the path names (`{workspace}`).
    Workspace,
    /// The environment the path names (`{environment}`); the store confines it to the principal's workspace when it resolves it.
    Environment,
    /// The operation the path names (`{id}`), a resource of its environment's workspace: the gate confines a user whose
    /// roles span workspaces to the operation's, and the store resolves it within the principal's workspace.
    Operation,
    /// The rollout the path names (`{rollout}`), a resource of its workspace, resolved as an operation is.
    Rollout,
    /// The appliance the path names (`{appliance}`), a resource of its environment's workspace, resolved as an
    /// operation is.
    Appliance,
    /// A list across the tenant's workspaces that its `workspace` query parameter narrows to one: decided on that
    /// workspace when the query names one, else on the tenant (where a principal of one workspace has no role).
    Listing,
}

/// Every permission a role can grant or a scoped token can list. The text is the Cedar action id (`policies/airlock.cedarschema`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Permission {
    WorkspacesRead,
    EnvironmentsRead,
    EnvironmentsWrite,
    AppliancesRead,
    AppliancesEnroll,
    AppliancesRevoke,
    DeploymentsRead,
    DeploymentsCreate,
    TemplatesRead,
    TemplatesWrite,
    OperationsRead,
    OperationsRequest,
    OperationsApprove,
    OperationsOutput,
    TasksRequest,
    RolloutsRead,
    RolloutsWrite,
    PoliciesRead,
    PoliciesWrite,
    ReleaseKeysRead,
    ReleaseKeysWrite,
    ReleasesRead,
    ReleasesWrite,
    ArtifactsRead,
    ArtifactsWrite,
    MetricsRead,
    AuditRead,
    TokensManage,
    IdentityManage,
}

impl Permission {
    pub const ALL: &'static [Permission] = &[
        Permission::WorkspacesRead,
        Permission::EnvironmentsRead,
        Permission::EnvironmentsWrite,
        Permission::AppliancesRead,
        Permission::AppliancesEnroll,
        Permission::AppliancesRevoke,
        Permission::DeploymentsRead,
        Permission::DeploymentsCreate,
        Permission::TemplatesRead,
        Permission::TemplatesWrite,
        Permission::OperationsRead,
        Permission::OperationsRequest,
        Permission::OperationsApprove,
        Permission::OperationsOutput,
        Permission::TasksRequest,
        Permission::RolloutsRead,
        Permission::RolloutsWrite,
        Permission::PoliciesRead,
        Permission::PoliciesWrite,
        Permission::ReleaseKeysRead,
        Permission::ReleaseKeysWrite,
        Permission::ReleasesRead,
        Permission::ReleasesWrite,
        Permission::ArtifactsRead,
        Permission::ArtifactsWrite,
        Permission::MetricsRead,
        Permission::AuditRead,
        Permission::TokensManage,
        Permission::IdentityManage,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Permission::WorkspacesRead => "workspaces:read",
            Permission::EnvironmentsRead => "environments:read",
            Permission::EnvironmentsWrite => "environments:write",
            Permission::AppliancesRead => "appliances:read",
            Permission::AppliancesEnroll => "appliances:enroll",
            Permission::AppliancesRevoke => "appliances:revoke",
            Permission::DeploymentsRead => "deployments:read",
            Permission::DeploymentsCreate => "deployments:create",
            Permission::TemplatesRead => "templates:read",
            Permission::TemplatesWrite => "templates:write",
            Permission::OperationsRead => "operations:read",
            Permission::OperationsRequest => "operations:request",
            Permission::OperationsApprove => "operations:approve",
            Permission::OperationsOutput => "operations:output",
            Permission::TasksRequest => "tasks:request",
            Permission::RolloutsRead => "rollouts:read",
            Permission::RolloutsWrite => "rollouts:write",
            Permission::PoliciesRead => "policies:read",
            Permission::PoliciesWrite => "policies:write",
            Permission::ReleaseKeysRead => "release_keys:read",
            Permission::ReleaseKeysWrite => "release_keys:write",
            Permission::ReleasesRead => "releases:read",
            Permission::ReleasesWrite => "releases:write",
            Permission::ArtifactsRead => "artifacts:read",
            Permission::ArtifactsWrite => "artifacts:write",
            Permission::MetricsRead => "metrics:read",
            Permission::AuditRead => "audit:read",
            Permission::TokensManage => "tokens:manage",
            Permission::IdentityManage => "identity:manage",
        }
    }

    const fn bit(self) -> u64 {
        1 << (self as u32)
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Permission {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Permission::ALL
            .iter()
            .copied()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| format!("unknown action `{}`", s.chars().take(64).collect::<String>()))
    }
}

/// A set of permissions: a scoped token's action list, or what a principal holds.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct PermissionSet(u64);

impl PermissionSet {
    pub const fn empty() -> Self {
        Self(0)
    }

    pub fn insert(&mut self, p: Permission) {
        self.0 |= p.bit();
    }

    pub fn contains(self, p: Permission) -> bool {
        self.0 & p.bit() != 0
    }

    pub fn is_subset(self, of: PermissionSet) -> bool {
        self.0 & !of.0 == 0
    }

    pub fn iter(self) -> impl Iterator<Item = Permission> {
        Permission::ALL.iter().copied().filter(move |p| self.contains(*p))
    }

    /// The list as stored and shown: permission strings, space separated, in table order.
    pub fn to_text(self) -> String {
        self.iter().map(Permission::as_str).collect::<Vec<_>>().join(" ")
    }

    /// Parses a space- or comma-separated list; an unknown name is an error, never ignored.
    pub fn parse_text(text: &str) -> Result<Self, String> {
        text.split([' ', ',']).filter(|s| !s.is_empty()).map(str::parse).collect()
    }
}

impl FromIterator<Permission> for PermissionSet {
    fn from_iter<I: IntoIterator<Item = Permission>>(iter: I) -> Self {
        let mut set = Self::empty();
        for p in iter {
            set.insert(p);
        }
        set
    }
}

impl fmt::Debug for PermissionSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter().map(Permission::as_str)).finish()
    }
}

/// Every API action, named; routes map onto these one to one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    ListWorkspaces,
    ListEnvironments,
    CreateEnvironment,
    CreateJoinToken,
    // Join rules (platform-identity join): enrolment, like join tokens.
    AddJoinRule,
    ListJoinRules,
    RemoveJoinRule,
    ListAppliances,
    RevokeAppliance,
    GetDeploymentStatus,
    PushTemplate,
    ListTemplates,
    RequestOperation,
    RequestDeployment,
    RequestReleaseTask,
    CreateRollout,
    GetRollout,
    ListRollouts,
    ListOperations,
    GetOperation,
    RelayApproval,
    GetManifest,
    GetOutput,
    RelayPolicy,
    GetPolicy,
    AddReleaseKey,
    ListReleaseKeys,
    RevokeReleaseKey,
    PushRelease,
    ListReleases,
    UploadArtifact,
    GetArtifact,
    DownloadArtifact,
    ReadMetrics,
    ListTokens,
    CreateToken,
    RotateToken,
    RevokeToken,
    // Signed-in users: the tenant's identity provider, its group-to-role mappings, a user's sessions.
    GetIdp,
    SetIdp,
    ListRoleMappings,
    AddRoleMapping,
    RemoveRoleMapping,
    EndUserSessions,
}

impl Action {
    /// The table: each action's permission and the kind of resource its path names.
    pub const fn spec(self) -> (Permission, ResourceKind) {
        use Permission as P;
        use ResourceKind::{Appliance, Environment, Listing, Operation, Rollout, Tenant, Workspace};
        match self {
            Action::ListWorkspaces => (P::WorkspacesRead, Tenant),
            Action::ListEnvironments => (P::EnvironmentsRead, Workspace),
            Action::CreateEnvironment => (P::EnvironmentsWrite, Workspace),
            Action::CreateJoinToken => (P::AppliancesEnroll, Environment),
            Action::AddJoinRule | Action::ListJoinRules | Action::RemoveJoinRule => (P::AppliancesEnroll, Environment),
            Action::ListAppliances => (P::AppliancesRead, Listing),
            Action::RevokeAppliance => (P::AppliancesRevoke, Appliance),
            Action::GetDeploymentStatus => (P::DeploymentsRead, Appliance),
            Action::PushTemplate => (P::TemplatesWrite, Workspace),
            Action::ListTemplates => (P::TemplatesRead, Workspace),
            Action::RequestOperation => (P::OperationsRequest, Environment),
            Action::RequestDeployment => (P::DeploymentsCreate, Environment),
            Action::RequestReleaseTask => (P::TasksRequest, Environment),
            Action::CreateRollout => (P::RolloutsWrite, Workspace),
            Action::GetRollout => (P::RolloutsRead, Rollout),
            Action::ListRollouts => (P::RolloutsRead, Workspace),
            Action::ListOperations => (P::OperationsRead, Listing),
            Action::GetOperation => (P::OperationsRead, Operation),
            Action::RelayApproval => (P::OperationsApprove, Operation),
            Action::GetManifest => (P::OperationsRead, Operation),
            Action::GetOutput => (P::OperationsOutput, Operation),
            Action::RelayPolicy => (P::PoliciesWrite, Environment),
            Action::GetPolicy => (P::PoliciesRead, Environment),
            Action::AddReleaseKey => (P::ReleaseKeysWrite, Workspace),
            Action::ListReleaseKeys => (P::ReleaseKeysRead, Workspace),
            Action::RevokeReleaseKey => (P::ReleaseKeysWrite, Workspace),
            Action::PushRelease => (P::ReleasesWrite, Workspace),
            Action::ListReleases => (P::ReleasesRead, Workspace),
            Action::UploadArtifact => (P::ArtifactsWrite, Workspace),
            Action::GetArtifact => (P::ArtifactsRead, Workspace),
            Action::DownloadArtifact => (P::ArtifactsRead, Workspace),
            Action::ReadMetrics => (P::MetricsRead, Tenant),
            Action::ListTokens => (P::TokensManage, Tenant),
            Action::CreateToken => (P::TokensManage, Tenant),
            Action::RotateToken => (P::TokensManage, Tenant),
            Action::RevokeToken => (P::TokensManage, Tenant),
            Action::GetIdp
            | Action::SetIdp
            | Action::ListRoleMappings
            | Action::AddRoleMapping
            | Action::RemoveRoleMapping
            | Action::EndUserSessions => (P::IdentityManage, Tenant),
        }
    }

    pub const fn permission(self) -> Permission {
        self.spec().0
    }

    pub const fn resource_kind(self) -> ResourceKind {
        self.spec().1
    }

    /// The audit action a call of this kind is recorded as.
    pub fn audit_action(self) -> AuditAction {
        match self {
            Action::ListWorkspaces => AuditAction::WorkspaceList,
            Action::ListEnvironments => AuditAction::EnvironmentList,
            Action::CreateEnvironment => AuditAction::EnvironmentCreate,
            Action::CreateJoinToken => AuditAction::JoinTokenCreate,
            Action::AddJoinRule => AuditAction::JoinRuleAdd,
            Action::ListJoinRules => AuditAction::JoinRuleList,
            Action::RemoveJoinRule => AuditAction::JoinRuleRemove,
            Action::ListAppliances => AuditAction::ApplianceList,
            Action::RevokeAppliance => AuditAction::ApplianceRevoke,
            Action::GetDeploymentStatus => AuditAction::DeploymentGet,
            Action::PushTemplate => AuditAction::TemplatePush,
            Action::ListTemplates => AuditAction::TemplateList,
            Action::RequestOperation => AuditAction::OperationRequest,
            Action::RequestDeployment => AuditAction::DeploymentRequest,
            Action::RequestReleaseTask => AuditAction::ReleaseTaskRequest,
            Action::CreateRollout => AuditAction::RolloutCreate,
            Action::GetRollout => AuditAction::RolloutGet,
            Action::ListRollouts => AuditAction::RolloutList,
            Action::ListOperations => AuditAction::OperationList,
            Action::GetOperation => AuditAction::OperationGet,
            Action::RelayApproval => AuditAction::OperationApprovalRelayed,
            Action::GetManifest => AuditAction::OperationManifest,
            Action::GetOutput => AuditAction::OperationOutputDownload,
            Action::RelayPolicy => AuditAction::PolicyRelayed,
            Action::GetPolicy => AuditAction::PolicyGet,
            Action::AddReleaseKey => AuditAction::ReleaseKeyAdd,
            Action::ListReleaseKeys => AuditAction::ReleaseKeyList,
            Action::RevokeReleaseKey => AuditAction::ReleaseKeyRevoke,
            Action::PushRelease => AuditAction::ReleasePush,
            Action::ListReleases => AuditAction::ReleaseList,
            // Artifacts belong to releases; core has no audit actions of their own for them yet,
            // so their records name the artifact in their target (`artifact:<sha256>`).
            Action::UploadArtifact => AuditAction::ReleasePush,
            Action::GetArtifact | Action::DownloadArtifact => AuditAction::ReleaseList,
            Action::ReadMetrics => AuditAction::MetricsRead,
            Action::ListTokens => AuditAction::TokenList,
            Action::CreateToken => AuditAction::TokenCreate,
            Action::RotateToken => AuditAction::TokenRotate,
            Action::RevokeToken => AuditAction::TokenRevoke,
            Action::GetIdp => AuditAction::IdpGet,
            Action::SetIdp => AuditAction::IdpSet,
            Action::ListRoleMappings => AuditAction::RoleMappingList,
            Action::AddRoleMapping => AuditAction::RoleMappingAdd,
            Action::RemoveRoleMapping => AuditAction::RoleMappingRemove,
            Action::EndUserSessions => AuditAction::UserSessionsEnd,
        }
    }

    pub fn as_str(self) -> &'static str {
        self.audit_action().as_str()
    }
}
