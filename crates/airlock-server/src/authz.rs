//! Who may act on which tenant's data.
//!
//! A [`TenantScope`] is proof that a principal was authenticated for one tenant.
//! Only this module constructs one; it is neither `Clone` nor `Deserialize`, so it cannot be copied across requests or forged from input.
//! Every tenant-data store call demands one, and binds its tenant id in the SQL.
//! Authorisation is default deny: [`TenantScope::permits`] allows only what a role is granted, and every API route maps onto one [`Action`].

use std::str::FromStr;

use airlock_core::audit::AuditAction;
use airlock_core::id::TokenId;
use airlock_core::{ApplianceId, ApplianceIdentity, TenantId};

/// What an authenticated API token stands for, before authorization builds a scope from it.
#[derive(Clone, Debug)]
pub struct ApiToken {
    pub id: TokenId,
    pub tenant: TenantId,
    pub role: Role,
}

/// Roles an API token can carry. Default deny: anything not granted here is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Full control of one tenant.
    TenantAdmin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::TenantAdmin => "tenant_admin",
        }
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tenant_admin" => Ok(Role::TenantAdmin),
            other => Err(format!("unknown role `{other}`")),
        }
    }
}

/// An authenticated actor.
#[derive(Debug, PartialEq, Eq)]
pub enum Principal {
    ApiToken {
        id: TokenId,
        role: Role,
    },
    Appliance(ApplianceId),
    /// The control plane itself, for what it records on no one's behalf (a rollout halted
    /// because its creator's token was revoked). It is permitted no action.
    System,
}

impl Principal {
    /// How the audit log names this principal.
    pub fn actor(&self) -> String {
        match self {
            Principal::ApiToken { id, .. } => format!("token:{id}"),
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
        Self { tenant: row.tenant, principal: Principal::ApiToken { id: row.id, role: row.role } }
    }

    /// An appliance whose certificate chained to our CA and is neither expired nor revoked.
    pub(crate) fn for_appliance(identity: &ApplianceIdentity) -> Self {
        Self { tenant: identity.tenant, principal: Principal::Appliance(identity.appliance) }
    }

    /// A rollout's driver, acting with the authority of the (unrevoked) token that created it.
    pub(crate) fn for_rollout(creator: ApiToken) -> Self {
        Self::for_api_token(creator)
    }

    /// The control plane recording in `tenant` on no one's behalf.
    pub(crate) fn for_system(tenant: TenantId) -> Self {
        Self { tenant, principal: Principal::System }
    }

    /// The operator at the console of the data directory (`airlock server init`, `tenant create`).
    pub(crate) fn for_local_operator(tenant: TenantId, token: TokenId) -> Self {
        Self { tenant, principal: Principal::ApiToken { id: token, role: Role::TenantAdmin } }
    }

    /// Whether this principal may perform `action` in its tenant.
    pub fn permits(&self, action: Action) -> bool {
        match (&self.principal, action) {
            (Principal::ApiToken { role: Role::TenantAdmin, .. }, _) => true,
            (Principal::Appliance(_) | Principal::System, _) => false,
        }
    }
}

/// Every API action, named; routes map onto these one to one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    ListWorkspaces,
    ListEnvironments,
    CreateEnvironment,
    CreateJoinToken,
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
}

impl Action {
    /// The audit action a call of this kind is recorded as.
    pub fn audit_action(self) -> AuditAction {
        match self {
            Action::ListWorkspaces => AuditAction::WorkspaceList,
            Action::ListEnvironments => AuditAction::EnvironmentList,
            Action::CreateEnvironment => AuditAction::EnvironmentCreate,
            Action::CreateJoinToken => AuditAction::JoinTokenCreate,
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
        }
    }

    pub fn as_str(self) -> &'static str {
        self.audit_action().as_str()
    }
}
