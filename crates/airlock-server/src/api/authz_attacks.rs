//! An attacker's tests of the API's authorization (issue 15): each names a way past the gate,
//! the store's scoping or the token rules, and holds the server to refusing it.

use airlock_testkit::customer;
use http::{Method, StatusCode};
use serde_json::{Value, json};

use super::tests::{Api, api, tenant_of};

impl Api {
    /// A second workspace of the fixture's tenant, with one environment: (workspace, environment).
    async fn other_workspace_with_env(&self) -> (String, String) {
        let tenant: airlock_core::TenantId = tenant_of(self).await.parse().unwrap();
        let ws = airlock_core::WorkspaceId::from_random(crate::state::random());
        let mut tx = self.state.store.write().await.unwrap();
        tx.create_workspace(tenant, ws, "other", self.state.now()).await.unwrap();
        tx.commit().await.unwrap();
        let (s, v) = self.post(&format!("/v1/workspaces/{ws}/environments"), json!({ "name": "theirs" })).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        (ws.to_string(), v["id"].as_str().unwrap().to_owned())
    }

    /// A token made by the fixture's owner token: its secret and id.
    async fn token(&self, body: Value) -> (String, String) {
        let (s, v) = self.post("/v1/tokens", body).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        (v["token"].as_str().unwrap().to_owned(), v["details"]["id"].as_str().unwrap().to_owned())
    }
}

/// A customer policy for `env`, signed by customer key 1.
fn signed_policy(env: &str) -> Value {
    let toml = format!("version = 1\nserial = 1\nenvironment = \"{env}\"\nphases = [\"observe\", \"deploy\"]\n");
    serde_json::from_str(&customer::signed_policy(&toml, &[1])).unwrap()
}

/// A token confined to workspace A reaches an environment of workspace B only through the environment's own id;
/// the store must resolve that id within A, as it does for join tokens and operation requests.
#[tokio::test]
async fn a_workspace_token_reads_no_policy_of_another_workspaces_environment() {
    let api = api().await;
    let (_, theirs) = api.other_workspace_with_env().await;
    let path = format!("/v1/environments/{theirs}/policy");
    let (s, v) = api
        .call(Method::PUT, &path, Some(&api.token), Some(&json!({ "envelope": signed_policy(&theirs) }).to_string()))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");

    let (viewer, _) = api
        .token(json!({ "name": "ws-a viewer", "role": "viewer", "workspace_id": api.workspace, "expires_in": "1d" }))
        .await;
    // The same token on a join token for that environment: not found, as it should be.
    let (admin, _) = api
        .token(json!({ "name": "ws-a admin", "role": "admin", "workspace_id": api.workspace, "expires_in": "1d" }))
        .await;
    let (s, _) =
        api.call(Method::POST, &format!("/v1/environments/{theirs}/join-tokens"), Some(&admin), Some("{}")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // The policy of that environment: must be just as invisible.
    let (s, v) = api.call(Method::GET, &path, Some(&viewer), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "a token of workspace A read workspace B's policy: {v}");
    assert!(!v.to_string().contains("signatures"), "{v}");
}

/// Rotation demands that the rotator hold what the token holds; revocation, which ends a credential, demands nothing
/// beyond `tokens:manage`, so an admin token (even one listing only `tokens:manage`) revokes every owner token.
#[tokio::test]
async fn an_admin_token_cannot_revoke_an_owner_token() {
    let api = api().await;
    let (narrow_admin, _) = api
        .token(json!({ "name": "token janitor", "role": "admin", "actions": ["tokens:manage"], "expires_in": "1d" }))
        .await;
    let (owner, owner_id) = api.token(json!({ "name": "second owner", "role": "owner", "expires_in": "30d" })).await;
    // Rotating it is refused, rightly: the admin would learn an owner's secret.
    let (s, v) =
        api.call(Method::POST, &format!("/v1/tokens/{owner_id}/rotate"), Some(&narrow_admin), Some("{}")).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    // Revoking it must be refused the same way.
    let (s, v) = api.call(Method::DELETE, &format!("/v1/tokens/{owner_id}"), Some(&narrow_admin), None).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "an admin token listing only tokens:manage revoked an owner token: {v}");
    assert_eq!(v["error"]["code"], "forbidden", "{v}");
    let (s, _) = api.call(Method::GET, "/v1/workspaces", Some(&owner), None).await;
    assert_eq!(s, StatusCode::OK, "the owner token must still work");
    // A token it holds no less than, and itself: revoked.
    let (_, viewer_id) = api.token(json!({ "name": "viewer", "role": "viewer", "expires_in": "30d" })).await;
    let (s, v) = api.call(Method::DELETE, &format!("/v1/tokens/{viewer_id}"), Some(&narrow_admin), None).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "the viewer reads what the narrow admin cannot: {v}");
    let (admin, _) = api.token(json!({ "name": "admin", "role": "admin", "expires_in": "1d" })).await;
    let (s, v) = api.call(Method::DELETE, &format!("/v1/tokens/{viewer_id}"), Some(&admin), None).await;
    assert_eq!(s, StatusCode::OK, "an admin ends a viewer's token, though the token outlives it: {v}");
    let narrow_id = api
        .call(Method::GET, "/v1/tokens", Some(&api.token), None)
        .await
        .1
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "token janitor")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (s, v) = api.call(Method::DELETE, &format!("/v1/tokens/{narrow_id}"), Some(&narrow_admin), None).await;
    assert_eq!(s, StatusCode::OK, "a token revokes itself: {v}");
}

/// A stolen token mints tokens of its own before it is found; revoking it must end those too (and theirs), or the
/// revocation is a formality. Tokens made by others are untouched.
#[tokio::test]
async fn revoking_a_token_revokes_the_tokens_it_made() {
    let api = api().await;
    let (stolen, stolen_id) = api.token(json!({ "name": "stolen", "role": "admin", "expires_in": "30d" })).await;
    let (bystander, _) = api.token(json!({ "name": "bystander", "role": "admin", "expires_in": "30d" })).await;
    let mint = |by: String, name: &'static str| {
        let api = &api;
        async move {
            let body = json!({ "name": name, "role": "viewer", "expires_in": "7d" }).to_string();
            let (s, v) = api.call(Method::POST, "/v1/tokens", Some(&by), Some(&body)).await;
            assert_eq!(s, StatusCode::CREATED, "{v}");
            (v["token"].as_str().unwrap().to_owned(), v["details"]["id"].as_str().unwrap().to_owned())
        }
    };
    let (child, child_id) = mint(stolen.clone(), "child").await;
    let admin_child = json!({ "name": "admin child", "role": "admin", "expires_in": "7d" }).to_string();
    let (s, v) = api.call(Method::POST, "/v1/tokens", Some(&stolen), Some(&admin_child)).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (admin_child, admin_child_id) =
        (v["token"].as_str().unwrap().to_owned(), v["details"]["id"].as_str().unwrap().to_owned());
    let (grandchild, grandchild_id) = mint(admin_child.clone(), "grandchild").await;
    let (unrelated, _) = mint(bystander.clone(), "unrelated").await;

    let (s, v) = api.call(Method::DELETE, &format!("/v1/tokens/{stolen_id}"), Some(&api.token), None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let mut also: Vec<&str> = v["also_revoked"].as_array().unwrap().iter().map(|x| x.as_str().unwrap()).collect();
    also.sort_unstable();
    let mut want = vec![child_id.as_str(), admin_child_id.as_str(), grandchild_id.as_str()];
    want.sort_unstable();
    assert_eq!(also, want, "{v}");
    for (name, secret) in
        [("stolen", &stolen), ("child", &child), ("admin child", &admin_child), ("grandchild", &grandchild)]
    {
        let (s, v) = api.call(Method::GET, "/v1/workspaces", Some(secret), None).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{name} still works after its maker was revoked: {v}");
    }
    for (name, secret) in [("bystander", &bystander), ("unrelated", &unrelated)] {
        let (s, v) = api.call(Method::GET, "/v1/workspaces", Some(secret), None).await;
        assert_eq!(s, StatusCode::OK, "{name} was made by another token and must still work: {v}");
    }
    // Revoked again: nothing left to revoke, and the answer says so.
    let (s, _) = api.call(Method::DELETE, &format!("/v1/tokens/{stolen_id}"), Some(&api.token), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

/// An AWS account id is no secret: a tenant that names another tenant's account in a join rule would make that
/// tenant's appliances ambiguous (refused at join) or, added first, have them join its own environment. First claim
/// wins; the same tenant may name its account in several environments.
#[tokio::test]
async fn a_tenant_may_name_another_tenants_platform_identity_and_blocks_nothing_by_it() {
    // Account ids are no secret: a first claim on one would let any tenant lock another out of its own account (or,
    // before joins were pinned, capture its appliances). Rules of several tenants may name the same account; a join
    // is judged by the rules of the tenant it pins only (`platform_join::tests::another_tenants_rule_for_the_same_
    // account_captures_nothing`, and end to end in `crates/airlock/tests/platform_join.rs`).
    let api = api().await;
    let env_a = api.new_env("a").await;
    let rule = |account: &str| json!({ "aws": { "account": account } }).to_string();
    let path = |env: &str| format!("/v1/environments/{env}/join-rules");
    let (s, v) = api.call(Method::POST, &path(&env_a), Some(&api.token), Some(&rule("123456789012"))).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let env_a2 = api.new_env("a2").await;
    let (s, v) = api.call(Method::POST, &path(&env_a2), Some(&api.token), Some(&rule("123456789012"))).await;
    assert_eq!(s, StatusCode::CREATED, "the same tenant names its account again: {v}");

    let dir = api._dir.path();
    let other = crate::create_tenant(dir, &crate::keys::KekSource::default_for(dir), "globex", "default", &*api.clock)
        .await
        .unwrap();
    let b = other.admin_token.expose();
    let body = json!({ "name": "b" }).to_string();
    let (s, v) =
        api.call(Method::POST, &format!("/v1/workspaces/{}/environments", other.workspace), Some(b), Some(&body)).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let env_b = v["id"].as_str().unwrap().to_owned();
    let (s, v) = api.call(Method::POST, &path(&env_b), Some(b), Some(&rule("123456789012"))).await;
    assert_eq!(s, StatusCode::CREATED, "tenant B names tenant A's account, which gives it nothing: {v}");
    assert!(!v.to_string().contains(&env_a), "no hint of A's environments: {v}");
    // Nor does B's rule block A from naming its account in another environment.
    let env_a3 = api.new_env("a3").await;
    let (s, v) = api.call(Method::POST, &path(&env_a3), Some(&api.token), Some(&rule("123456789012"))).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    // Each tenant sees its own rules only.
    let (s, v) = api.call(Method::GET, &path(&env_b), Some(&api.token), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "A cannot read B's environment's rules: {v}");
}
