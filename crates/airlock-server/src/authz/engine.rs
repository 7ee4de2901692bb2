//! The one authorization decision: Cedar policies (`policies/*.cedar`), validated against `policies/airlock.cedarschema`.
//!
//! Built once at server start ([`Engine::load`] refuses an invalid policy set), with the only entities a decision reads (the actions and their groups).
//! What a principal holds for the request's resource travels in the request's context, so a decision builds no entity: a context of a few values, and one evaluation.
//! The answer is a [`Decision`], never text: a refusal names its [`DenyReason`], read from the `@reason` annotation of the `forbid` that decided it.

use std::collections::HashMap;
use std::str::FromStr;

use cedar_policy::{
    Authorizer, Context, Entities, EntityId, EntityTypeName, EntityUid, PolicyId, PolicySet, RestrictedExpression,
    Schema, ValidationMode, Validator,
};

use super::Grants;
use super::actions::{Permission, PermissionSet, ResourceKind};
use airlock_core::TenantId;

pub const SCHEMA: &str = include_str!("../../policies/airlock.cedarschema");
/// The policy files, by name: every one is loaded and validated.
pub const POLICIES: &[(&str, &str)] = &[
    ("roles.cedar", include_str!("../../policies/roles.cedar")),
    ("token_scope.cedar", include_str!("../../policies/token_scope.cedar")),
];

/// The outcome of one authorization decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Permit,
    Deny(DenyReason),
}

/// Why a request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum DenyReason {
    /// A list across workspaces asked of the tenant by a principal holding no role tenant-wide: it lists a workspace
    /// of its by naming it (`?workspace=`).
    WorkspaceRequired,
    /// The token is confined to another workspace, or the action is tenant-wide.
    OutsideTokenWorkspace,
    /// The token's action list does not include the permission.
    OutsideTokenActions,
    /// No role the principal holds here grants the permission (default deny).
    NotGranted,
    /// The principal is not one that acts on the API (an appliance, the control plane itself).
    NotAnApiPrincipal,
    /// The route has no entry in the action table: a bug, refused rather than guessed.
    UnmappedRoute,
    /// The engine could not evaluate the request (it is refused, and logged).
    EngineError,
}

impl DenyReason {
    /// The stable code the API answers with and the audit records.
    pub const fn code(self) -> &'static str {
        match self {
            DenyReason::WorkspaceRequired => "workspace_required",
            DenyReason::NotGranted => "not_granted",
            DenyReason::OutsideTokenActions => "outside_token_actions",
            DenyReason::OutsideTokenWorkspace => "outside_token_workspace",
            DenyReason::NotAnApiPrincipal => "not_an_api_principal",
            DenyReason::UnmappedRoute => "unmapped_route",
            DenyReason::EngineError => "authorization_error",
        }
    }

    fn from_annotation(text: &str) -> Option<Self> {
        [DenyReason::WorkspaceRequired, DenyReason::OutsideTokenActions, DenyReason::OutsideTokenWorkspace]
            .into_iter()
            .find(|r| r.code() == text)
    }
}

/// What a request acts on, as named in its path before any handler work.
#[derive(Clone, Copy, Debug)]
pub enum Target<'a> {
    Tenant,
    /// A workspace id as the path gave it (checked by the handler; a malformed one is simply no workspace of the token's).
    Workspace(&'a str),
    Environment(&'a str),
    /// An operation id as the path gave it (a malformed or unknown one is simply not found in the principal's workspace).
    Operation(&'a str),
    /// A rollout id as the path gave it, likewise.
    Rollout(&'a str),
    /// An appliance id as the path gave it, likewise.
    Appliance(&'a str),
}

impl Target<'_> {
    pub fn kind(&self) -> ResourceKind {
        match self {
            Target::Tenant => ResourceKind::Tenant,
            Target::Workspace(_) => ResourceKind::Workspace,
            Target::Environment(_) => ResourceKind::Environment,
            Target::Operation(_) => ResourceKind::Operation,
            Target::Rollout(_) => ResourceKind::Rollout,
            Target::Appliance(_) => ResourceKind::Appliance,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineLoadError {
    #[error("the Cedar schema does not parse: {0}")]
    Schema(String),
    #[error("the Cedar policy file {file} does not parse: {message}")]
    Policy { file: &'static str, message: String },
    #[error("the Cedar policies do not validate against the schema: {0}")]
    Invalid(String),
    #[error("the Cedar policy {0} has a @reason no refusal is named by")]
    UnknownReason(String),
}

/// The schema, the policies and the authorizer, built once.
pub struct Engine {
    schema: Schema,
    policies: PolicySet,
    authorizer: Authorizer,
    /// The refusal each `forbid` policy stands for.
    reasons: HashMap<PolicyId, DenyReason>,
    /// `Airlock::Action::"<permission>"`, one per permission, built once.
    actions: Vec<EntityUid>,
    /// The action entities and their groups, from the schema: all a decision reads from the entity store.
    entities: Entities,
    types: EntityTypes,
    /// Recent decisions: a decision is a pure function of its inputs (the policies do not change while the server runs).
    memo: std::sync::Mutex<HashMap<MemoKey, (Grants, Decision)>>,
}

/// What a decision is remembered by; the grants are compared on a hit, so a token whose grants changed is decided again.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct MemoKey {
    kind: PrincipalKind,
    tenant: TenantId,
    principal: String,
    permission: Permission,
    target: (ResourceKind, String),
}

/// Decisions remembered at most; a full memo starts over (a miss costs one evaluation).
const MEMO_ENTRIES: usize = 16 * 1024;

struct EntityTypes {
    tenant: EntityTypeName,
    workspace: EntityTypeName,
    environment: EntityTypeName,
    operation: EntityTypeName,
    rollout: EntityTypeName,
    appliance: EntityTypeName,
    token: EntityTypeName,
    user: EntityTypeName,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("policies", &self.policies.policies().count()).finish_non_exhaustive()
    }
}

impl Engine {
    /// Parses the schema and the policies, and validates the policies against the schema (strict mode).
    pub fn load() -> Result<Self, EngineLoadError> {
        Self::load_from(SCHEMA, POLICIES)
    }

    /// [`Engine::load`] over a given schema and policy files (tests feed it broken ones).
    pub fn load_from(schema: &str, files: &[(&'static str, &str)]) -> Result<Self, EngineLoadError> {
        let (schema, _warnings) =
            Schema::from_cedarschema_str(schema).map_err(|e| EngineLoadError::Schema(format!("{e:?}")))?;
        let mut policies = PolicySet::new();
        let mut reasons = HashMap::new();
        for (file, text) in files {
            let parsed =
                PolicySet::from_str(text).map_err(|e| EngineLoadError::Policy { file, message: format!("{e:?}") })?;
            for policy in parsed.policies() {
                // Policies are named by their `@id`, so a refusal's reason and a log line name the same policy.
                let id = policy.annotation("id").map_or_else(|| policy.id().clone(), PolicyId::new);
                let policy = policy.new_id(id.clone());
                if let Some(reason) = policy.annotation("reason") {
                    let reason = DenyReason::from_annotation(reason)
                        .ok_or_else(|| EngineLoadError::UnknownReason(id.to_string()))?;
                    reasons.insert(id.clone(), reason);
                }
                policies.add(policy).map_err(|e| EngineLoadError::Policy { file, message: e.to_string() })?;
            }
        }
        let validation = Validator::new(schema.clone()).validate(&policies, ValidationMode::Strict);
        if !validation.validation_passed() {
            let errors: Vec<String> = validation.validation_errors().map(|e| e.to_string()).collect();
            return Err(EngineLoadError::Invalid(errors.join("; ")));
        }
        let entities = schema.action_entities().map_err(|e| EngineLoadError::Schema(e.to_string()))?;
        let type_name = |name: &str| EntityTypeName::from_str(name).map_err(|e| EngineLoadError::Schema(e.to_string()));
        let types = EntityTypes {
            tenant: type_name("Airlock::Tenant")?,
            workspace: type_name("Airlock::Workspace")?,
            environment: type_name("Airlock::Environment")?,
            operation: type_name("Airlock::Operation")?,
            rollout: type_name("Airlock::Rollout")?,
            appliance: type_name("Airlock::Appliance")?,
            token: type_name("Airlock::Token")?,
            user: type_name("Airlock::User")?,
        };
        let action_type = type_name("Airlock::Action")?;
        let actions = Permission::ALL
            .iter()
            .map(|p| EntityUid::from_type_name_and_id(action_type.clone(), EntityId::new(p.as_str())))
            .collect();
        Ok(Self {
            schema,
            policies,
            authorizer: Authorizer::new(),
            reasons,
            actions,
            entities,
            types,
            memo: Default::default(),
        })
    }

    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    /// Decides whether `principal` may exercise `permission` on `target` in `tenant`.
    pub fn decide(
        &self,
        tenant: TenantId,
        principal: &ApiPrincipal<'_>,
        permission: Permission,
        target: Target<'_>,
    ) -> Decision {
        match self.request(tenant, principal, permission, target) {
            Ok(request) => self.evaluate(&request),
            Err(e) => {
                tracing::error!(error = %e, "cannot build an authorization request");
                Decision::Deny(DenyReason::EngineError)
            }
        }
    }

    /// [`Engine::decide`], remembered: the API's gate asks the same question of every request a token makes.
    pub fn decide_remembered(
        &self,
        tenant: TenantId,
        principal: &ApiPrincipal<'_>,
        permission: Permission,
        target: Target<'_>,
    ) -> Decision {
        self.decide_remembered_as(PrincipalKind::Token, tenant, principal, permission, target)
    }

    /// [`Engine::decide_remembered`] for a principal of `kind` (a token, or a signed-in user's session).
    pub fn decide_remembered_as(
        &self,
        kind: PrincipalKind,
        tenant: TenantId,
        principal: &ApiPrincipal<'_>,
        permission: Permission,
        target: Target<'_>,
    ) -> Decision {
        let id = match target {
            Target::Tenant => "",
            Target::Workspace(id)
            | Target::Environment(id)
            | Target::Operation(id)
            | Target::Rollout(id)
            | Target::Appliance(id) => id,
        };
        let key = MemoKey {
            kind,
            tenant,
            principal: principal.id.to_owned(),
            permission,
            target: (target.kind(), id.to_owned()),
        };
        {
            let memo = self.memo.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((grants, decision)) = memo.get(&key)
                && grants == principal.grants
            {
                return *decision;
            }
        }
        let decision = match self.request_as(kind, tenant, principal, permission, target) {
            Ok(request) => self.evaluate(&request),
            Err(e) => {
                tracing::error!(error = %e, "cannot build an authorization request");
                Decision::Deny(DenyReason::EngineError)
            }
        };
        let mut memo = self.memo.lock().unwrap_or_else(|e| e.into_inner());
        if memo.len() >= MEMO_ENTRIES {
            memo.clear();
        }
        memo.insert(key, (principal.grants.clone(), decision));
        decision
    }

    /// Every permission `principal` holds on `target`: what a token it creates may list at most.
    pub fn permissions(&self, tenant: TenantId, principal: &ApiPrincipal<'_>, target: Target<'_>) -> PermissionSet {
        Permission::ALL
            .iter()
            .copied()
            .filter(|p| self.decide(tenant, principal, *p, target) == Decision::Permit)
            .collect()
    }

    fn evaluate(&self, request: &cedar_policy::Request) -> Decision {
        let response = self.authorizer.is_authorized(request, &self.policies, &self.entities);
        match response.decision() {
            cedar_policy::Decision::Allow => Decision::Permit,
            cedar_policy::Decision::Deny => {
                let mut errors = response.diagnostics().errors().peekable();
                if errors.peek().is_some() {
                    // A policy that errs is skipped, so a failing `forbid` could turn into a permit elsewhere;
                    // here the answer is already deny, and an error is a bug to see.
                    for e in errors {
                        tracing::error!(error = %e, "a Cedar policy failed to evaluate");
                    }
                }
                // Several forbids can apply; the answer names the same one each time (the first in `DenyReason`'s order).
                let reason = response.diagnostics().reason().filter_map(|id| self.reasons.get(id).copied()).min();
                Decision::Deny(reason.unwrap_or(DenyReason::NotGranted))
            }
        }
    }

    pub(crate) fn request(
        &self,
        tenant: TenantId,
        principal: &ApiPrincipal<'_>,
        permission: Permission,
        target: Target<'_>,
    ) -> Result<cedar_policy::Request, String> {
        self.request_as(PrincipalKind::Token, tenant, principal, permission, target)
    }

    fn request_as(
        &self,
        kind: PrincipalKind,
        tenant: TenantId,
        principal: &ApiPrincipal<'_>,
        permission: Permission,
        target: Target<'_>,
    ) -> Result<cedar_policy::Request, String> {
        let resource = match target {
            Target::Tenant => {
                EntityUid::from_type_name_and_id(self.types.tenant.clone(), EntityId::new(tenant.to_string()))
            }
            Target::Workspace(id) => EntityUid::from_type_name_and_id(self.types.workspace.clone(), EntityId::new(id)),
            Target::Environment(id) => {
                EntityUid::from_type_name_and_id(self.types.environment.clone(), EntityId::new(id))
            }
            Target::Operation(id) => EntityUid::from_type_name_and_id(self.types.operation.clone(), EntityId::new(id)),
            Target::Rollout(id) => EntityUid::from_type_name_and_id(self.types.rollout.clone(), EntityId::new(id)),
            Target::Appliance(id) => EntityUid::from_type_name_and_id(self.types.appliance.clone(), EntityId::new(id)),
        };
        let grants = principal.grants;
        let string = |s: &str| RestrictedExpression::new_string(s.to_owned());
        let mut context = Vec::with_capacity(4);
        context.push(("permission".to_owned(), string(permission.as_str())));
        context.push((
            "roles".to_owned(),
            RestrictedExpression::new_set(grants.roles_for(target).map(|r| string(r.as_str()))),
        ));
        if let Some(actions) = grants.actions {
            let list = RestrictedExpression::new_set(actions.iter().map(|p| string(p.as_str())));
            context.push(("action_scope".to_owned(), list));
        }
        if let Some(ws) = grants.workspace {
            let uid = EntityUid::from_type_name_and_id(self.types.workspace.clone(), EntityId::new(ws.to_string()));
            context.push(("workspace_scope".to_owned(), RestrictedExpression::new_entity_uid(uid)));
        }
        let context = Context::from_pairs(context).map_err(|e| e.to_string())?;
        let principal_type = match kind {
            PrincipalKind::Token => &self.types.token,
            PrincipalKind::User => &self.types.user,
        };
        let principal = EntityUid::from_type_name_and_id(principal_type.clone(), EntityId::new(principal.id));
        let action = self.actions[permission as usize].clone();
        cedar_policy::Request::new(principal, action, resource, context, None).map_err(|e| e.to_string())
    }
}

/// What kind of principal asks: the Cedar entity type of the request's principal (`Token` or `User`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PrincipalKind {
    Token,
    User,
}

/// An API principal as the engine sees it: its id (for logs) and what it holds.
#[derive(Clone, Copy, Debug)]
pub struct ApiPrincipal<'a> {
    pub id: &'a str,
    pub grants: &'a Grants,
}
