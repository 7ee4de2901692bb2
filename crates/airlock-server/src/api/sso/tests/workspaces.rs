//! A signed-in user whose roles are in several workspaces, none tenant-wide: each workspace's role applies to that
//! workspace and its environments, and to nothing else (`api::access` confines each request to the workspace it acts in).

use airlock_core::{TenantId, WorkspaceId};
use airlock_testkit::customer;
use http::{Method, StatusCode};
use serde_json::{Value, json};

use super::super::super::tests::{Api, api, assert_error};
use super::{Via, call_as, new_session, tenant};
use crate::authz::Role;

/// A further workspace of the fixture's tenant, with one environment made by the owner token: (workspace, environment).
async fn workspace_with_env(api: &Api, t: TenantId, name: &str) -> (WorkspaceId, String) {
    let ws = WorkspaceId::from_random(crate::state::random());
    let mut tx = api.state.store.write().await.unwrap();
    tx.create_workspace(t, ws, name, api.state.now()).await.unwrap();
    tx.commit().await.unwrap();
    let (s, v) = api.post(&format!("/v1/workspaces/{ws}/environments"), json!({ "name": name })).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    (ws, v["id"].as_str().unwrap().to_owned())
}

/// The owner token relays a customer policy for `env`, so reading it has something to show.
async fn relay_policy(api: &Api, env: &str) {
    let toml = format!("version = 1\nserial = 1\nenvironment = \"{env}\"\nphases = [\"observe\", \"deploy\"]\n");
    let envelope: Value = serde_json::from_str(&customer::signed_policy(&toml, &[1])).unwrap();
    let body = json!({ "envelope": envelope }).to_string();
    let (s, v) = api.call(Method::PUT, &format!("/v1/environments/{env}/policy"), Some(&api.token), Some(&body)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

fn deploy_body() -> Value {
    json!({ "release": "shop@9.9.9", "reason": "ticket 7" })
}

#[tokio::test]
async fn roles_in_several_workspaces_apply_each_in_its_own_workspace_and_its_environments() {
    let api = api().await;
    let t = tenant(&api).await;
    let a: WorkspaceId = api.workspace.parse().unwrap();
    let env_a = api.new_env("a-prod").await;
    let (b, env_b) = workspace_with_env(&api, t, "b").await;
    for env in [&env_a, &env_b] {
        relay_policy(&api, env).await;
    }
    // Deployer in A, viewer in B, nothing tenant-wide.
    let mia = new_session(&api, t, "mia", &[(Role::Deployer, Some(a)), (Role::Viewer, Some(b))], api.state.now()).await;

    // Reads in both workspaces and of both environments.
    for ws in [a, b] {
        let (s, _, v) =
            call_as(&api, Via::Cookie(&mia), Method::GET, &format!("/v1/workspaces/{ws}/environments"), None).await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }
    for env in [&env_a, &env_b] {
        let (s, _, v) =
            call_as(&api, Via::Cookie(&mia), Method::GET, &format!("/v1/environments/{env}/policy"), None).await;
        assert_eq!(s, StatusCode::OK, "reads {env}'s policy: {v}");
    }
    // A deploy in A's environment is hers to ask: past the gate, it fails only for want of an appliance there.
    let (s, _, v) = call_as(
        &api,
        Via::Cookie(&mia),
        Method::POST,
        &format!("/v1/environments/{env_a}/deployments"),
        Some(deploy_body()),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_error(&v, "bad_request", "no active appliance");
    // Her deployer role in A lends nothing in B, where she only views.
    let (s, _, v) = call_as(
        &api,
        Via::Cookie(&mia),
        Method::POST,
        &format!("/v1/environments/{env_b}/deployments"),
        Some(deploy_body()),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "a viewer in B deployed in B: {v}");
    assert_error(&v, "not_granted", "no role");
    let (s, _, v) = call_as(
        &api,
        Via::Cookie(&mia),
        Method::POST,
        &format!("/v1/workspaces/{b}/rollouts"),
        Some(json!({
            "release": "shop@9.9.9", "reason": "ticket 7"
        })),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    // Nothing tenant-wide.
    for path in ["/v1/appliances", "/v1/tokens"] {
        let (s, _, v) = call_as(&api, Via::Cookie(&mia), Method::GET, path, None).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{path}: {v}");
    }
}

#[tokio::test]
async fn a_deployer_of_one_workspace_cannot_act_in_another_and_learns_nothing_of_it() {
    let api = api().await;
    let t = tenant(&api).await;
    let a: WorkspaceId = api.workspace.parse().unwrap();
    let (b, env_b) = workspace_with_env(&api, t, "b").await;
    let (c, _) = workspace_with_env(&api, t, "c").await;
    relay_policy(&api, &env_b).await;
    // Deployer in A, operator in C: roles in several workspaces, none in B.
    let dan =
        new_session(&api, t, "dan", &[(Role::Deployer, Some(a)), (Role::Operator, Some(c))], api.state.now()).await;
    let unknown = airlock_core::EnvironmentId::from_random([7; 16]).to_string();
    let mut answers = Vec::new();
    for env in [&env_b, &unknown, &"not-an-id".to_owned()] {
        let (s, _, v) = call_as(
            &api,
            Via::Cookie(&dan),
            Method::POST,
            &format!("/v1/environments/{env}/deployments"),
            Some(deploy_body()),
        )
        .await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{env}: {v}");
        let (s, _, read) =
            call_as(&api, Via::Bearer(&dan), Method::GET, &format!("/v1/environments/{env}/policy"), None).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{env}: {read}");
        assert!(!read.to_string().contains("signatures"), "{read}");
        answers.push((v, read));
    }
    // B's environment answers exactly as one that does not exist: no hint that it is there.
    assert_eq!(answers[0], answers[1]);
    assert_eq!(answers[1], answers[2]);
    let (s, _, v) =
        call_as(&api, Via::Cookie(&dan), Method::GET, &format!("/v1/workspaces/{b}/environments"), None).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    // Another tenant's environment is no different.
    let dir = api._dir.path();
    let globex = crate::create_tenant(dir, &crate::keys::KekSource::default_for(dir), "globex", "default", &*api.clock)
        .await
        .unwrap();
    let foreign = {
        let scope = crate::authz::TenantScope::for_local_operator(
            globex.tenant,
            airlock_core::id::TokenId::from_random([1; 16]),
        );
        let env = airlock_core::EnvironmentId::from_random(crate::state::random());
        let mut tx = api.state.store.write().await.unwrap();
        tx.create_environment(&scope, globex.workspace, env, "theirs", api.state.now()).await.unwrap();
        tx.commit().await.unwrap();
        env.to_string()
    };
    let (s, _, v) = call_as(
        &api,
        Via::Cookie(&dan),
        Method::POST,
        &format!("/v1/environments/{foreign}/deployments"),
        Some(deploy_body()),
    )
    .await;
    assert_eq!((s, &v), (StatusCode::FORBIDDEN, &answers[0].0));
    // Each refusal is audited on her tenant's chain.
    let denied = api
        .audit_actions(&t.to_string())
        .await
        .into_iter()
        .filter(|(a, o)| a == airlock_core::audit::AuditAction::DeploymentRequest.as_str() && o == "denied")
        .count();
    assert_eq!(denied, 4);
}

#[test]
fn grants_within_a_workspace_keep_only_what_applies_there_and_confine_to_it() {
    let (a, b) = (WorkspaceId::from_random([1; 16]), WorkspaceId::from_random([2; 16]));
    let spanning =
        crate::authz::Grants::user(vec![(Role::Deployer, Some(a)), (Role::Viewer, Some(b)), (Role::Auditor, None)]);
    assert!(spanning.spans_workspaces());
    let in_a = spanning.within(a);
    assert_eq!(in_a.roles, vec![(Role::Deployer, Some(a)), (Role::Auditor, Some(a))]);
    assert_eq!(in_a.workspace, Some(a));
    assert!(!in_a.spans_workspaces());
    // Confined already, or tenant-wide only: nothing to confine.
    assert!(!crate::authz::Grants::user(vec![(Role::Deployer, Some(a))]).spans_workspaces());
    assert!(!crate::authz::Grants::user(vec![(Role::Admin, None)]).spans_workspaces());
    assert!(!crate::authz::Grants::token(Role::Viewer, Some(a), None, None).spans_workspaces());
}
