//! The decision, table by table: the policies validate, every action's request fits the schema, each role gets what `roles.cedar` says and no more, and a scoped token gets the intersection of its role and its scope.

use std::time::{Duration, Instant};

use airlock_core::{TenantId, WorkspaceId};

use super::engine::{POLICIES, SCHEMA};
use super::*;

const ACTIONS: &[Action] = &[
    Action::ListWorkspaces,
    Action::ListEnvironments,
    Action::CreateEnvironment,
    Action::CreateJoinToken,
    Action::ListAppliances,
    Action::RevokeAppliance,
    Action::GetDeploymentStatus,
    Action::PushTemplate,
    Action::ListTemplates,
    Action::RequestOperation,
    Action::RequestDeployment,
    Action::RequestReleaseTask,
    Action::CreateRollout,
    Action::GetRollout,
    Action::ListRollouts,
    Action::ListOperations,
    Action::GetOperation,
    Action::RelayApproval,
    Action::GetManifest,
    Action::GetOutput,
    Action::RelayPolicy,
    Action::GetPolicy,
    Action::AddReleaseKey,
    Action::ListReleaseKeys,
    Action::RevokeReleaseKey,
    Action::PushRelease,
    Action::ListReleases,
    Action::UploadArtifact,
    Action::GetArtifact,
    Action::DownloadArtifact,
    Action::ReadMetrics,
    Action::ListTokens,
    Action::CreateToken,
    Action::RotateToken,
    Action::RevokeToken,
];

fn tenant() -> TenantId {
    TenantId::from_random([1; 16])
}

fn ws(n: u8) -> WorkspaceId {
    WorkspaceId::from_random([n; 16])
}

fn engine() -> Engine {
    Engine::load().expect("the policies validate against the schema")
}

/// A target of the action's kind, in workspace `ws(1)` where it names one.
fn target_of(action: Action, ws_text: &str) -> Target<'_> {
    match action.resource_kind() {
        ResourceKind::Tenant => Target::Tenant,
        ResourceKind::Workspace => Target::Workspace(ws_text),
        ResourceKind::Environment => Target::Environment("env_x"),
        ResourceKind::Operation => Target::Operation("op_x"),
        ResourceKind::Rollout => Target::Rollout("rol_x"),
        ResourceKind::Appliance => Target::Appliance("apl_x"),
        ResourceKind::Listing => Target::Tenant,
    }
}

fn decide(e: &Engine, grants: &Grants, action: Action) -> Decision {
    let w = ws(1).to_string();
    e.decide(tenant(), &ApiPrincipal { id: "tok_test", grants }, action.permission(), target_of(action, &w))
}

fn permitted(e: &Engine, grants: &Grants) -> std::collections::BTreeSet<Permission> {
    ACTIONS.iter().filter(|a| decide(e, grants, **a) == Decision::Permit).map(|a| a.permission()).collect()
}

#[test]
fn the_policies_validate_and_a_policy_off_the_schema_is_refused() {
    engine();
    let bad = [("bad.cedar", r#"permit (principal, action, resource) when { principal.no_such_attribute == "x" };"#)];
    assert!(matches!(Engine::load_from(SCHEMA, &bad), Err(engine::EngineLoadError::Invalid(_))));
    let unparsable = [("bad.cedar", "permit (principal, action, resource")];
    assert!(matches!(Engine::load_from(SCHEMA, &unparsable), Err(engine::EngineLoadError::Policy { .. })));
    let unknown_reason = [(
        "bad.cedar",
        r#"@reason("because") forbid (principal, action, resource) when { principal.roles.contains("x") };"#,
    )];
    assert!(matches!(Engine::load_from(SCHEMA, &unknown_reason), Err(engine::EngineLoadError::UnknownReason(_))));
    assert!(POLICIES.len() >= 2);
}

#[test]
fn every_action_is_one_schema_action_whose_request_fits_the_schema() {
    let e = engine();
    let w = ws(1).to_string();
    let grants = Grants::token(Role::Viewer, Some(ws(1)), Some(PermissionSet::empty()), None);
    for action in ACTIONS {
        let request = e
            .request(
                tenant(),
                &ApiPrincipal { id: "tok_test", grants: &grants },
                action.permission(),
                target_of(*action, &w),
            )
            .unwrap();
        // The same request, checked against the schema: the action exists, takes this resource type and this context.
        let checked = cedar_policy::Request::new(
            request.principal().unwrap().clone(),
            request.action().unwrap().clone(),
            request.resource().unwrap().clone(),
            request.context().unwrap().clone(),
            Some(e.schema()),
        );
        assert!(checked.is_ok(), "{action:?}: {checked:?}");
        // A list across workspaces is asked of the workspace its query names, too.
        if action.resource_kind() == ResourceKind::Listing {
            let principal = ApiPrincipal { id: "tok_test", grants: &grants };
            let request = e.request(tenant(), &principal, action.permission(), Target::Workspace(&w)).unwrap();
            let checked = cedar_policy::Request::new(
                request.principal().unwrap().clone(),
                request.action().unwrap().clone(),
                request.resource().unwrap().clone(),
                request.context().unwrap().clone(),
                Some(e.schema()),
            );
            assert!(checked.is_ok(), "{action:?} on a workspace: {checked:?}");
        }
    }
    for p in Permission::ALL {
        assert_eq!(p.as_str().parse::<Permission>(), Ok(*p));
    }
}

#[test]
fn each_role_gets_its_capability_groups_and_nothing_else() {
    use Permission as P;
    let e = engine();
    let role = |r| Grants::token(r, None, None, None);
    let all = permitted(&e, &role(Role::Owner));
    assert_eq!(all.len(), ACTIONS.iter().map(|a| a.permission()).collect::<std::collections::BTreeSet<_>>().len());
    assert_eq!(permitted(&e, &role(Role::Admin)).len(), all.len());

    let deployer = permitted(&e, &role(Role::Deployer));
    for p in [P::ReleasesWrite, P::ArtifactsWrite, P::RolloutsWrite, P::DeploymentsCreate, P::EnvironmentsRead] {
        assert!(deployer.contains(&p), "{p}");
    }
    for p in [P::OperationsRequest, P::TasksRequest, P::TokensManage, P::PoliciesWrite, P::ReleaseKeysWrite] {
        assert!(!deployer.contains(&p), "{p}");
    }

    let operator = permitted(&e, &role(Role::Operator));
    for p in [P::OperationsRequest, P::TasksRequest, P::OperationsApprove, P::TemplatesWrite, P::OperationsRead] {
        assert!(operator.contains(&p), "{p}");
    }
    for p in [P::ReleasesWrite, P::DeploymentsCreate, P::TokensManage, P::AppliancesRevoke] {
        assert!(!operator.contains(&p), "{p}");
    }

    let viewer = permitted(&e, &role(Role::Viewer));
    assert!(viewer.iter().all(|p| p.as_str().ends_with(":read")), "{viewer:?}");
    assert!(viewer.contains(&P::WorkspacesRead) && !viewer.contains(&P::AuditRead));
    // The server's counters span every tenant: not for a tenant's readers, deployers or operators.
    for reader in [&viewer, &deployer, &operator] {
        assert!(!reader.contains(&P::MetricsRead), "{reader:?}");
    }

    // The auditor reads the audit log only: every API action is refused, by default deny.
    let auditor = role(Role::Auditor);
    for action in ACTIONS {
        assert_eq!(decide(&e, &auditor, *action), Decision::Deny(DenyReason::NotGranted), "{action:?}");
    }
    let audit = e.decide(tenant(), &ApiPrincipal { id: "a", grants: &auditor }, P::AuditRead, Target::Tenant);
    assert_eq!(audit, Decision::Permit);
}

#[test]
fn a_scoped_token_gets_its_role_within_its_actions_and_workspace() {
    let e = engine();
    let (own, other) = (ws(1).to_string(), ws(2).to_string());
    let actions: PermissionSet = [Permission::ReleasesRead, Permission::ReleasesWrite].into_iter().collect();
    let grants = Grants::token(Role::Deployer, Some(ws(1)), Some(actions), None);
    let p = ApiPrincipal { id: "tok_scoped", grants: &grants };
    assert_eq!(e.decide(tenant(), &p, Permission::ReleasesWrite, Target::Workspace(&own)), Decision::Permit);
    assert_eq!(
        e.decide(tenant(), &p, Permission::ReleasesWrite, Target::Workspace(&other)),
        Decision::Deny(DenyReason::OutsideTokenWorkspace)
    );
    assert_eq!(
        e.decide(tenant(), &p, Permission::ArtifactsWrite, Target::Workspace(&own)),
        Decision::Deny(DenyReason::OutsideTokenActions)
    );
    assert_eq!(
        e.decide(tenant(), &p, Permission::WorkspacesRead, Target::Tenant),
        Decision::Deny(DenyReason::OutsideTokenWorkspace),
        "when several forbids apply, the refusal named is always the same"
    );
    // In its action list but not its role's: default deny still holds.
    let wider: PermissionSet = [Permission::TokensManage].into_iter().collect();
    let grants = Grants::token(Role::Viewer, None, Some(wider), None);
    let p = ApiPrincipal { id: "tok_viewer", grants: &grants };
    assert_eq!(
        e.decide(tenant(), &p, Permission::TokensManage, Target::Tenant),
        Decision::Deny(DenyReason::NotGranted)
    );
    // A workspace token does nothing tenant-wide, even with the role for it.
    let grants = Grants::token(Role::Admin, Some(ws(1)), None, None);
    let p = ApiPrincipal { id: "tok_ws_admin", grants: &grants };
    assert_eq!(
        e.decide(tenant(), &p, Permission::TokensManage, Target::Tenant),
        Decision::Deny(DenyReason::OutsideTokenWorkspace)
    );
    assert_eq!(e.decide(tenant(), &p, Permission::OperationsRequest, Target::Environment("env_x")), Decision::Permit);
    // An operation or a rollout is a resource of its workspace (the store resolves it within the token's), not
    // tenant-wide: the workspace token acts on it with its role.
    for (permission, target) in [
        (Permission::OperationsApprove, Target::Operation("op_x")),
        (Permission::OperationsOutput, Target::Operation("op_x")),
        (Permission::RolloutsRead, Target::Rollout("rol_x")),
    ] {
        assert_eq!(e.decide(tenant(), &p, permission, target), Decision::Permit, "{permission}");
    }
}

#[test]
fn a_workspace_principal_acts_on_its_appliances_and_lists_its_own_workspace_by_naming_it() {
    let e = engine();
    let (own, other) = (ws(1).to_string(), ws(2).to_string());
    let admin = Grants::token(Role::Admin, Some(ws(1)), None, None);
    let p = ApiPrincipal { id: "tok_ws_admin", grants: &admin };
    // An appliance is a resource of its workspace (the store resolves it within the token's): revoking one is an
    // administrator's, now grantable per workspace.
    for permission in [Permission::AppliancesRevoke, Permission::DeploymentsRead] {
        assert_eq!(e.decide(tenant(), &p, permission, Target::Appliance("apl_x")), Decision::Permit, "{permission}");
    }
    let viewer = Grants::token(Role::Viewer, Some(ws(1)), None, None);
    let v = ApiPrincipal { id: "tok_ws_viewer", grants: &viewer };
    assert_eq!(e.decide(tenant(), &v, Permission::DeploymentsRead, Target::Appliance("apl_x")), Decision::Permit);
    assert_eq!(
        e.decide(tenant(), &v, Permission::AppliancesRevoke, Target::Appliance("apl_x")),
        Decision::Deny(DenyReason::NotGranted)
    );
    // The lists across workspaces: its own workspace's when it names it, another's refused as any workspace route
    // refuses it, and the tenant's refused with the one thing to do about it.
    for permission in [Permission::AppliancesRead, Permission::OperationsRead] {
        for who in [&p, &v] {
            assert_eq!(e.decide(tenant(), who, permission, Target::Workspace(&own)), Decision::Permit);
            assert_eq!(
                e.decide(tenant(), who, permission, Target::Workspace(&other)),
                Decision::Deny(DenyReason::OutsideTokenWorkspace)
            );
            assert_eq!(
                e.decide(tenant(), who, permission, Target::Tenant),
                Decision::Deny(DenyReason::WorkspaceRequired),
                "{permission}"
            );
        }
    }
    // A user whose roles are in several workspaces holds none tenant-wide: told the same.
    let spread = Grants::user(vec![(Role::Viewer, Some(ws(1))), (Role::Operator, Some(ws(2)))]);
    let u = ApiPrincipal { id: "ses_spread", grants: &spread };
    assert_eq!(
        e.decide(tenant(), &u, Permission::OperationsRead, Target::Tenant),
        Decision::Deny(DenyReason::WorkspaceRequired)
    );
    // A tenant-wide role decides the tenant's list as before: a viewer lists, an auditor is refused by default deny.
    for (role, expect) in [(Role::Viewer, Decision::Permit), (Role::Auditor, Decision::Deny(DenyReason::NotGranted))] {
        let grants = Grants::token(role, None, None, None);
        let t = ApiPrincipal { id: "tok_tenant", grants: &grants };
        assert_eq!(e.decide(tenant(), &t, Permission::AppliancesRead, Target::Tenant), expect, "{role:?}");
    }
    // Only the lists: any other tenant-wide action by a workspace principal stays outside its workspace.
    assert_eq!(
        e.decide(tenant(), &p, Permission::WorkspacesRead, Target::Tenant),
        Decision::Deny(DenyReason::OutsideTokenWorkspace)
    );
}

#[test]
fn appliances_and_the_system_act_on_no_api_route() {
    let e = engine();
    let system = TenantScope::for_system(tenant());
    assert_eq!(
        system.decide(&e, Action::ListWorkspaces, Target::Tenant),
        Decision::Deny(DenyReason::NotAnApiPrincipal)
    );
}

#[test]
fn a_decision_is_fast() {
    // The benchmark (`airlock-bench authz`) measures p50/p99; this only guards against an order-of-magnitude slip.
    let e = engine();
    let actions: PermissionSet = [Permission::ReleasesRead].into_iter().collect();
    let grants = Grants::token(Role::Deployer, Some(ws(1)), Some(actions), None);
    let w = ws(1).to_string();
    let p = ApiPrincipal { id: "tok_scoped", grants: &grants };
    let started = Instant::now();
    for _ in 0..1000 {
        assert_eq!(e.decide(tenant(), &p, Permission::ReleasesRead, Target::Workspace(&w)), Decision::Permit);
    }
    assert!(started.elapsed() < Duration::from_secs(2), "1000 decisions took {:?}", started.elapsed());
}

#[test]
fn a_remembered_decision_is_taken_again_when_the_grants_change() {
    let e = engine();
    let w = ws(1).to_string();
    let viewer = Grants::token(Role::Viewer, None, None, None);
    let p = ApiPrincipal { id: "tok_same", grants: &viewer };
    assert_eq!(
        e.decide_remembered(tenant(), &p, Permission::ReleasesWrite, Target::Workspace(&w)),
        Decision::Deny(DenyReason::NotGranted)
    );
    let deployer = Grants::token(Role::Deployer, None, None, None);
    let p = ApiPrincipal { id: "tok_same", grants: &deployer };
    assert_eq!(e.decide_remembered(tenant(), &p, Permission::ReleasesWrite, Target::Workspace(&w)), Decision::Permit);
    let other = ws(2).to_string();
    let confined = Grants::token(Role::Deployer, Some(ws(1)), None, None);
    let p = ApiPrincipal { id: "tok_same", grants: &confined };
    assert_eq!(e.decide_remembered(tenant(), &p, Permission::ReleasesWrite, Target::Workspace(&w)), Decision::Permit);
    assert_eq!(
        e.decide_remembered(tenant(), &p, Permission::ReleasesWrite, Target::Workspace(&other)),
        Decision::Deny(DenyReason::OutsideTokenWorkspace)
    );
}
