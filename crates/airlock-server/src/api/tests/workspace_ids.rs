//! Operations, rollouts and appliances named by id are resources of their workspace: a principal of one workspace (a
//! workspace token, a user whose roles are all there, a user whose roles span workspaces) acts on its own workspace's,
//! and gets for another workspace's exactly the answer it gets for a missing id or another tenant's.
//! The lists across workspaces (`/v1/appliances`, `/v1/operations`) are its own workspace's when it names it.

use airlock_core::id::TokenId;
use airlock_core::{RolloutId, TenantId, WorkspaceId};
use http::{Method, StatusCode};
use serde_json::{Value, json};

use super::super::sso::tests::{Via, call_as, new_session};
use super::{Api, SCRIPT, TEMPLATE, api, assert_error, csr, grant_for, tenant_of};
use crate::authz::{Role, TenantScope};
use crate::rollouts::RolloutState;
use crate::store::{RolloutCreator, RolloutRow};

/// An operation requested by `token` in `ws` (template pushed, an environment with one joined appliance).
async fn operation_in(api: &Api, token: &str, ws: &str) -> Value {
    let call = |method: Method, path: String, body: Value| async move {
        let (s, v) = api.call(method, &path, Some(token), Some(&body.to_string())).await;
        assert!(s.is_success(), "{path}: {s} {v}");
        v
    };
    call(
        Method::POST,
        format!("/v1/workspaces/{ws}/templates"),
        json!({ "manifest_toml": TEMPLATE, "script": SCRIPT }),
    )
    .await;
    let env = call(Method::POST, format!("/v1/workspaces/{ws}/environments"), json!({ "name": "prod" })).await;
    let env = env["id"].as_str().unwrap().to_owned();
    let join = call(Method::POST, format!("/v1/environments/{env}/join-tokens"), json!({})).await;
    let (s, v) = api.join(join["token"].as_str().unwrap(), &csr()).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let body = json!({ "template": "restart-service", "vars": { "service": "api" }, "reason": "ticket 42" });
    call(Method::POST, format!("/v1/environments/{env}/operations"), body).await
}

async fn new_workspace(api: &Api, t: TenantId, name: &str) -> WorkspaceId {
    let ws = WorkspaceId::from_random(crate::state::random());
    let mut tx = api.state.store.write().await.unwrap();
    tx.create_workspace(t, ws, name, api.state.now()).await.unwrap();
    tx.commit().await.unwrap();
    ws
}

/// A finished rollout of `ws`, stored as the API stores one (its driver has nothing left to do).
async fn rollout_in(api: &Api, t: TenantId, ws: WorkspaceId) -> RolloutId {
    let id = RolloutId::from_random(crate::state::random());
    let now = api.state.now();
    let row = RolloutRow {
        id,
        tenant_id: t,
        workspace_id: ws,
        release_digest: "0".repeat(64),
        release_name: "shop".into(),
        release_version: "1.0.0".into(),
        concurrency: 1,
        max_failures: 0,
        reason: "ship it".into(),
        created_by: RolloutCreator::Token(TokenId::from_random([1; 16])),
        state: RolloutState::Completed,
        created_at: now,
        updated_at: now,
    };
    let mut tx = api.state.store.write().await.unwrap();
    tx.insert_rollout(&TenantScope::for_system(t), &row, &[]).await.unwrap();
    tx.commit().await.unwrap();
    id
}

/// The answer with the id the caller sent taken out: what tells one refusal from another.
fn without(v: &Value, id: &str) -> String {
    v.to_string().replace(id, "<id>")
}

struct Fixture {
    api: Api,
    t: TenantId,
    a: WorkspaceId,
    b: WorkspaceId,
    /// Another tenant's workspace.
    g: WorkspaceId,
    op_a: Value,
    /// Operation ids that are not A's: B's, another tenant's, one never made.
    others: [String; 3],
    /// The appliance A's operation went to, and appliance ids that are not A's, likewise.
    appliance_a: String,
    other_appliances: [String; 3],
    rollout_a: RolloutId,
    /// Rollout ids that are not A's, likewise.
    other_rollouts: [String; 3],
}

async fn fixture() -> Fixture {
    let api = api().await;
    let t: TenantId = tenant_of(&api).await.parse().unwrap();
    let a: WorkspaceId = api.workspace.parse().unwrap();
    let b = new_workspace(&api, t, "b").await;
    let op_a = operation_in(&api, &api.token, &api.workspace).await;
    let op_b = operation_in(&api, &api.token, &b.to_string()).await;
    let dir = api._dir.path();
    let globex = crate::create_tenant(dir, &crate::keys::KekSource::default_for(dir), "globex", "default", &*api.clock)
        .await
        .unwrap();
    let op_g = operation_in(&api, globex.admin_token.expose(), &globex.workspace.to_string()).await;
    let missing = airlock_testkit::op_id(9).to_string();
    let others = [op_b["id"].as_str().unwrap().to_owned(), op_g["id"].as_str().unwrap().to_owned(), missing];
    let rollout_a = rollout_in(&api, t, a).await;
    let rollout_b = rollout_in(&api, t, b).await;
    let rollout_g = rollout_in(&api, globex.tenant, globex.workspace).await;
    let other_rollouts = [rollout_b.to_string(), rollout_g.to_string(), RolloutId::from_random([9; 16]).to_string()];
    let appliance = |op: &Value| op["appliance"].as_str().unwrap().to_owned();
    let appliance_a = appliance(&op_a);
    let other_appliances =
        [appliance(&op_b), appliance(&op_g), airlock_core::ApplianceId::from_random([9; 16]).to_string()];
    Fixture {
        api,
        t,
        a,
        b,
        g: globex.workspace,
        op_a,
        others,
        appliance_a,
        other_appliances,
        rollout_a,
        other_rollouts,
    }
}

/// GET `path` as `who`: (status, body).
async fn get(api: &Api, who: Via<'_>, path: &str) -> (StatusCode, Value) {
    let (s, _, v) = call_as(api, who, Method::GET, path, None).await;
    (s, v)
}

/// Every read of an operation by id, and a rollout's, as `who`: A's answer, and each other id's, all alike
/// (`expect` for every other id, the same body once the id is taken out).
async fn reads_only_its_own(f: &Fixture, who: Via<'_>, expect: StatusCode) {
    let op_a = f.op_a["id"].as_str().unwrap();
    for suffix in ["", "/manifest"] {
        let (s, v) = get(&f.api, who, &format!("/v1/operations/{op_a}{suffix}")).await;
        assert_eq!(s, StatusCode::OK, "A's operation{suffix}: {v}");
        let mut answers = Vec::new();
        for id in &f.others {
            let (s, v) = get(&f.api, who, &format!("/v1/operations/{id}{suffix}")).await;
            assert_eq!(s, expect, "{id}{suffix}: {v}");
            assert!(!v.to_string().contains("awaiting_approval"), "{v}");
            answers.push(without(&v, id));
        }
        assert!(answers.windows(2).all(|w| w[0] == w[1]), "{answers:?}");
    }
    let (s, v) = get(&f.api, who, &format!("/v1/rollouts/{}", f.rollout_a)).await;
    assert_eq!(s, StatusCode::OK, "A's rollout: {v}");
    let mut answers = Vec::new();
    for id in &f.other_rollouts {
        let (s, v) = get(&f.api, who, &format!("/v1/rollouts/{id}")).await;
        assert_eq!(s, expect, "{id}: {v}");
        answers.push(without(&v, id));
    }
    assert!(answers.windows(2).all(|w| w[0] == w[1]), "{answers:?}");
}

/// The output of A's operation, past the gate (an operator may read it): not released yet, a 404 of its own kind;
/// every other id's answer is `expect`, alike.
async fn output_is_its_to_read(f: &Fixture, who: Via<'_>, expect: StatusCode) {
    let op_a = f.op_a["id"].as_str().unwrap();
    let (s, v) = get(&f.api, who, &format!("/v1/operations/{op_a}/output")).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("released"), "{v}");
    let mut answers = Vec::new();
    for id in &f.others {
        let (s, v) = get(&f.api, who, &format!("/v1/operations/{id}/output")).await;
        assert_eq!(s, expect, "{id}: {v}");
        answers.push(without(&v, id));
    }
    assert!(answers.windows(2).all(|w| w[0] == w[1]), "{answers:?}");
}

#[tokio::test]
async fn a_workspace_token_reads_and_approves_its_workspaces_operations_and_no_others() {
    let f = fixture().await;
    let (s, v) = f
        .api
        .call(
            Method::POST,
            "/v1/tokens",
            Some(&f.api.token),
            Some(
                &json!({ "name": "ops", "role": "operator", "workspace_id": f.a.to_string(), "expires_in": "1d" })
                    .to_string(),
            ),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let token = v["token"].as_str().unwrap().to_owned();
    reads_only_its_own(&f, Via::Bearer(&token), StatusCode::NOT_FOUND).await;
    output_is_its_to_read(&f, Via::Bearer(&token), StatusCode::NOT_FOUND).await;
    // It relays its workspace's approval; another workspace's operation is not found, and stays as it was.
    let approve = |op: &Value| json!({ "envelope": grant_for(op, |_| {}) });
    let op_a = f.op_a["id"].as_str().unwrap();
    let (s, _, v) = call_as(
        &f.api,
        Via::Bearer(&token),
        Method::POST,
        &format!("/v1/operations/{op_a}/approval"),
        Some(approve(&f.op_a)),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["state"], "approved", "{v}");
    let op_b = &f.others[0];
    let (_, b) = f.api.get(&format!("/v1/operations/{op_b}")).await;
    let (s, _, v) = call_as(
        &f.api,
        Via::Bearer(&token),
        Method::POST,
        &format!("/v1/operations/{op_b}/approval"),
        Some(approve(&b)),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    let (_, after) = f.api.get(&format!("/v1/operations/{op_b}")).await;
    assert_eq!(after["state"], "awaiting_approval");
    // The list of every operation is tenant-wide: not for a workspace token, which is told to name its workspace.
    let (s, v) = get(&f.api, Via::Bearer(&token), "/v1/operations").await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert_error(&v, "workspace_required", "`workspace` query parameter");
}

#[tokio::test]
async fn a_user_whose_roles_are_in_one_workspace_acts_on_its_operations_only() {
    let f = fixture().await;
    let dee = new_session(&f.api, f.t, "dee", &[(Role::Deployer, Some(f.a))], f.api.state.now()).await;
    reads_only_its_own(&f, Via::Cookie(&dee), StatusCode::NOT_FOUND).await;
    // A deployer does not relay approvals, even in its workspace.
    let op_a = f.op_a["id"].as_str().unwrap();
    let body = json!({ "envelope": grant_for(&f.op_a, |_| {}) });
    let (s, _, v) =
        call_as(&f.api, Via::Cookie(&dee), Method::POST, &format!("/v1/operations/{op_a}/approval"), Some(body)).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert_error(&v, "not_granted", "no role");
    // Nor reads released output, an Operate-phase permission.
    let (s, _, v) =
        call_as(&f.api, Via::Cookie(&dee), Method::GET, &format!("/v1/operations/{op_a}/output"), None).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
}

#[tokio::test]
async fn a_user_whose_roles_span_workspaces_acts_on_an_operation_with_the_roles_of_its_workspace() {
    let f = fixture().await;
    let c = new_workspace(&f.api, f.t, "c").await;
    // Operator in A, viewer in C, nothing in B nor tenant-wide.
    let ola =
        new_session(&f.api, f.t, "ola", &[(Role::Operator, Some(f.a)), (Role::Viewer, Some(c))], f.api.state.now())
            .await;
    reads_only_its_own(&f, Via::Cookie(&ola), StatusCode::FORBIDDEN).await;
    output_is_its_to_read(&f, Via::Cookie(&ola), StatusCode::FORBIDDEN).await;
    // A malformed id is refused as a missing one.
    let (s, v) = get(&f.api, Via::Cookie(&ola), "/v1/operations/not-an-id").await;
    let (s2, v2) = get(&f.api, Via::Cookie(&ola), &format!("/v1/operations/{}", f.others[2])).await;
    assert_eq!((s, without(&v, "not-an-id")), (s2, without(&v2, &f.others[2])));
    assert_error(&v, "not_granted", "no role");
    let op_a = f.op_a["id"].as_str().unwrap();
    let body = json!({ "envelope": grant_for(&f.op_a, |_| {}) });
    let (s, _, v) =
        call_as(&f.api, Via::Cookie(&ola), Method::POST, &format!("/v1/operations/{op_a}/approval"), Some(body)).await;
    assert_eq!(s, StatusCode::OK, "the operator in A relays A's approval: {v}");
    // Each refusal is audited on the tenant's chain.
    let denied = f
        .api
        .audit_actions(&f.t.to_string())
        .await
        .into_iter()
        .filter(|(a, o)| a == airlock_core::audit::AuditAction::OperationGet.as_str() && o == "denied")
        .count();
    assert!(denied >= 3, "{denied}");
}

#[tokio::test]
async fn tenant_wide_principals_act_on_every_workspaces_operations_as_before() {
    let f = fixture().await;
    let vic = new_session(&f.api, f.t, "vic", &[(Role::Viewer, None)], f.api.state.now()).await;
    let (s, v) = f
        .api
        .call(
            Method::POST,
            "/v1/tokens",
            Some(&f.api.token),
            Some(&json!({ "name": "read", "role": "viewer", "expires_in": "1d" }).to_string()),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let token = v["token"].as_str().unwrap().to_owned();
    for who in [Via::Cookie(&vic), Via::Bearer(&token), Via::Bearer(&f.api.token)] {
        let op_a = f.op_a["id"].as_str().unwrap();
        for path in [format!("/v1/operations/{op_a}"), format!("/v1/operations/{}", f.others[0])] {
            let (s, v) = get(&f.api, who, &path).await;
            assert_eq!(s, StatusCode::OK, "{path}: {v}");
        }
        let (s, v) = get(&f.api, who, &format!("/v1/rollouts/{}", f.other_rollouts[0])).await;
        assert_eq!(s, StatusCode::OK, "B's rollout: {v}");
        // Another tenant's is not found.
        for path in [format!("/v1/operations/{}", f.others[1]), format!("/v1/rollouts/{}", f.other_rollouts[1])] {
            let (s, v) = get(&f.api, who, &path).await;
            assert_eq!(s, StatusCode::NOT_FOUND, "{path}: {v}");
        }
        let (s, v) = get(&f.api, who, "/v1/operations").await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v["operations"].as_array().unwrap().len(), 2, "{v}");
    }
}

/// A token of `role` confined to workspace A, made by the tenant's owner.
async fn workspace_token(f: &Fixture, role: &str) -> String {
    let body = json!({ "name": role, "role": role, "workspace_id": f.a.to_string(), "expires_in": "1d" });
    let (s, v) = f.api.call(Method::POST, "/v1/tokens", Some(&f.api.token), Some(&body.to_string())).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    v["token"].as_str().unwrap().to_owned()
}

/// The `id` of each item of the list under `key`.
fn ids(v: &Value, key: &str) -> Vec<String> {
    v[key].as_array().unwrap_or_else(|| panic!("{v}")).iter().map(|x| x["id"].as_str().unwrap().to_owned()).collect()
}

/// A's appliance's deployment, as `who`: past the gate and found (it has not reported yet, a 404 of its own kind);
/// every other appliance id's answer is `expect`, alike.
async fn reads_only_its_own_appliance(f: &Fixture, who: Via<'_>, expect: StatusCode) {
    let (s, v) = get(&f.api, who, &format!("/v1/appliances/{}/deployment", f.appliance_a)).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("not reported"), "{v}");
    let mut answers = Vec::new();
    for id in &f.other_appliances {
        let (s, v) = get(&f.api, who, &format!("/v1/appliances/{id}/deployment")).await;
        assert_eq!(s, expect, "{id}: {v}");
        assert!(!v.to_string().contains("reported"), "{v}");
        answers.push(without(&v, id));
    }
    assert!(answers.windows(2).all(|w| w[0] == w[1]), "{answers:?}");
}

/// Revoking each appliance that is not A's, as `who`: `expect`, alike, and B's appliance stays unrevoked.
async fn revokes_no_other_appliance(f: &Fixture, who: Via<'_>, expect: StatusCode) {
    let mut answers = Vec::new();
    for id in &f.other_appliances {
        let path = format!("/v1/appliances/{id}/revoke");
        let (s, _, v) = call_as(&f.api, who, Method::POST, &path, Some(json!({}))).await;
        assert_eq!(s, expect, "{id}: {v}");
        answers.push(without(&v, id));
    }
    assert!(answers.windows(2).all(|w| w[0] == w[1]), "{answers:?}");
    let (_, v) = f.api.get("/v1/appliances").await;
    assert!(v["appliances"].as_array().unwrap().iter().all(|a| a["revoked"] == false), "{v}");
}

/// The lists across workspaces, as `who`: A's by naming it (only A's), another workspace's and another tenant's
/// refused alike with `other`, and the tenant's (no `workspace`) refused as `workspace_required`.
async fn lists_only_its_own_workspace(f: &Fixture, who: Via<'_>, other: &str) {
    let (a, b, g) = (f.a.to_string(), f.b.to_string(), f.g.to_string());
    let (s, v) = get(&f.api, who, &format!("/v1/appliances?workspace={a}")).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(ids(&v, "appliances"), std::slice::from_ref(&f.appliance_a));
    let (s, v) = get(&f.api, who, &format!("/v1/operations?workspace={a}&state=awaiting_approval")).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(ids(&v, "operations"), [f.op_a["id"].as_str().unwrap().to_owned()]);
    for list in ["/v1/appliances", "/v1/operations"] {
        let (s, from_b) = get(&f.api, who, &format!("{list}?workspace={b}")).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{from_b}");
        assert_eq!(from_b["error"]["code"], other, "{from_b}");
        let (s, from_g) = get(&f.api, who, &format!("{list}?workspace={g}")).await;
        assert_eq!((s, without(&from_g, &g)), (StatusCode::FORBIDDEN, without(&from_b, &b)));
        let (s, v) = get(&f.api, who, list).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
        assert_error(&v, "workspace_required", "`workspace` query parameter");
        // A query the gate and the handler could read apart (the parameter twice) is refused, never widened.
        let (s, v) = get(&f.api, who, &format!("{list}?workspace={a}&workspace={b}")).await;
        assert!(s == StatusCode::FORBIDDEN || s == StatusCode::BAD_REQUEST, "{s} {v}");
    }
}

#[tokio::test]
async fn a_workspace_token_lists_reads_and_revokes_its_workspaces_appliances_and_no_others() {
    let f = fixture().await;
    let admin = workspace_token(&f, "admin").await;
    reads_only_its_own_appliance(&f, Via::Bearer(&admin), StatusCode::NOT_FOUND).await;
    revokes_no_other_appliance(&f, Via::Bearer(&admin), StatusCode::NOT_FOUND).await;
    lists_only_its_own_workspace(&f, Via::Bearer(&admin), "outside_token_workspace").await;
    // Revoking stays an administrator's: a viewer of A reads A's appliances and revokes none.
    let viewer = workspace_token(&f, "viewer").await;
    lists_only_its_own_workspace(&f, Via::Bearer(&viewer), "outside_token_workspace").await;
    let revoke_a = format!("/v1/appliances/{}/revoke", f.appliance_a);
    let (s, _, v) = call_as(&f.api, Via::Bearer(&viewer), Method::POST, &revoke_a, Some(json!({}))).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert_error(&v, "not_granted", "no role");
    // A's admin revokes A's appliance, audited on the tenant's chain.
    let (s, _, v) = call_as(&f.api, Via::Bearer(&admin), Method::POST, &revoke_a, Some(json!({}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["revoked"], true, "{v}");
    let (_, v) = f.api.get("/v1/appliances").await;
    let revoked: Vec<_> = v["appliances"].as_array().unwrap().iter().filter(|a| a["revoked"] == true).collect();
    assert_eq!(revoked.len(), 1, "{v}");
    assert_eq!(revoked[0]["id"], f.appliance_a.as_str());
    let revokes = f.api.audit_actions(&f.t.to_string()).await;
    let revokes = revokes.iter().filter(|(a, _)| a == "appliance.revoke").map(|(_, o)| o.as_str()).collect::<Vec<_>>();
    assert!(revokes.contains(&"success") && revokes.contains(&"denied"), "{revokes:?}");
}

#[tokio::test]
async fn a_user_of_workspaces_acts_on_its_appliances_with_the_roles_of_their_workspace() {
    let f = fixture().await;
    // Confined: admin in A alone.
    let ada = new_session(&f.api, f.t, "ada", &[(Role::Admin, Some(f.a))], f.api.state.now()).await;
    reads_only_its_own_appliance(&f, Via::Cookie(&ada), StatusCode::NOT_FOUND).await;
    revokes_no_other_appliance(&f, Via::Cookie(&ada), StatusCode::NOT_FOUND).await;
    lists_only_its_own_workspace(&f, Via::Cookie(&ada), "outside_token_workspace").await;
    // Spanning: operator in A, admin in C, nothing in B nor tenant-wide. The gate confines it to the appliance's
    // workspace; B's, another tenant's and a missing one are refused alike (it holds no role where they are).
    let c = new_workspace(&f.api, f.t, "c").await;
    let ola =
        new_session(&f.api, f.t, "ola", &[(Role::Operator, Some(f.a)), (Role::Admin, Some(c))], f.api.state.now())
            .await;
    reads_only_its_own_appliance(&f, Via::Cookie(&ola), StatusCode::FORBIDDEN).await;
    revokes_no_other_appliance(&f, Via::Cookie(&ola), StatusCode::FORBIDDEN).await;
    lists_only_its_own_workspace(&f, Via::Cookie(&ola), "not_granted").await;
    // An admin in C is no admin in A: A's appliance is not its to revoke.
    let revoke_a = format!("/v1/appliances/{}/revoke", f.appliance_a);
    let (s, _, v) = call_as(&f.api, Via::Cookie(&ola), Method::POST, &revoke_a, Some(json!({}))).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert_error(&v, "not_granted", "no role");
    let (s, _, v) = call_as(&f.api, Via::Cookie(&ada), Method::POST, &revoke_a, Some(json!({}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

#[tokio::test]
async fn a_tenant_wide_principal_lists_every_workspace_or_the_one_it_names() {
    let f = fixture().await;
    let (a, b) = (f.a.to_string(), f.b.to_string());
    let (s, v) = f.api.get("/v1/appliances").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(ids(&v, "appliances").len(), 2, "{v}");
    let (s, v) = f.api.get(&format!("/v1/appliances?workspace={b}")).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(ids(&v, "appliances"), f.other_appliances[..1]);
    let (s, v) = f.api.get(&format!("/v1/operations?workspace={b}")).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(ids(&v, "operations"), f.others[..1]);
    // With an environment of another workspace: nothing, not that environment's.
    let env_a = f.op_a["environment"].as_str().unwrap();
    let (s, v) = f.api.get(&format!("/v1/operations?workspace={b}&environment={env_a}")).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(ids(&v, "operations").is_empty(), "{v}");
    // Another tenant's workspace is as missing as one never made; a malformed id is a bad request.
    for list in ["/v1/appliances", "/v1/operations"] {
        let (s, v) = f.api.get(&format!("{list}?workspace={}", f.g)).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
        let missing = WorkspaceId::from_random([9; 16]);
        let (s2, v2) = f.api.get(&format!("{list}?workspace={missing}")).await;
        assert_eq!((s, without(&v, &f.g.to_string())), (s2, without(&v2, &missing.to_string())));
        let (s, v) = f.api.get(&format!("{list}?workspace=nope")).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        let (s, v) = f.api.get(&format!("{list}?workspace={a}&workspace={b}")).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    }
}
