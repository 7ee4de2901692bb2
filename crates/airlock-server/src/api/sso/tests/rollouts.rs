//! Rollouts created by a signed-in user: the driver acts with the roles of the session that created them, an admin
//! ending the user's sessions afterwards halts them (audited), the user's own logout does not; a token's are unchanged.

use std::time::Duration;

use airlock_core::audit::AuditAction;
use airlock_core::customer_key::CustomerSigningKey;
use airlock_core::release::{ReleaseStatement, sign_release};
use airlock_core::{RolloutId, TenantId, WorkspaceId};
use http::{Method, StatusCode};
use serde_json::{Value, json};

use super::super::super::tests::{Api, api, csr};
use super::{Via, call_as, new_session, tenant};
use crate::authz::{Role, TenantScope};
use crate::rollouts::RolloutState;
use crate::store::RolloutCreator;

/// The fixture's workspace with one environment of two joined appliances and a signed release `shop@1.0.0`.
async fn deployable(api: &Api) -> String {
    let env = api.new_env("prod").await;
    for _ in 0..2 {
        let token = api.join_token(&env).await;
        let (s, v) = api.join(&token, &csr()).await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }
    let key = CustomerSigningKey::from_seed([9; 32]);
    let (s, v) = api
        .post(
            &format!("/v1/workspaces/{}/release-keys", api.workspace),
            json!({ "public_key_pem": key.public().to_pem().unwrap() }),
        )
        .await;
    assert!(s.is_success(), "{v}");
    let manifest = "name = \"shop\"\nversion = \"1.0.0\"\n\n[[service]]\nname = \"web\"\ncommand = \"/bin/sleep\"\nargs = [\"infinity\"]\n";
    let statement = ReleaseStatement::new(manifest, Vec::new()).unwrap();
    let envelope: Value = serde_json::from_str(&sign_release(&statement, &key).to_json()).unwrap();
    let (s, v) = api.post(&format!("/v1/workspaces/{}/releases", api.workspace), json!({ "envelope": envelope })).await;
    assert!(s.is_success(), "{v}");
    env
}

fn rollout_body() -> Value {
    json!({ "release": "shop@1.0.0", "concurrency": 1, "reason": "ship it" })
}

async fn create_as(api: &Api, via: Via<'_>) -> RolloutId {
    let (s, _, v) =
        call_as(api, via, Method::POST, &format!("/v1/workspaces/{}/rollouts", api.workspace), Some(rollout_body()))
            .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["deploying"], 1, "{v}");
    v["id"].as_str().unwrap().parse().unwrap()
}

async fn state_of(api: &Api, t: TenantId, id: RolloutId) -> RolloutState {
    api.state.store.rollout(&TenantScope::for_system(t), id).await.unwrap().unwrap().state
}

/// The reasons of the `rollout_halted` records of `id`, by actor.
async fn halts(api: &Api, t: TenantId, id: RolloutId) -> Vec<(String, Value)> {
    api.state.audit_writer.flush().await;
    let records = api.state.store.audit_records(&t.to_string()).await.unwrap();
    records
        .into_iter()
        .map(Result::unwrap)
        .filter(|r| r.event.action == AuditAction::RolloutHalted.as_str() && r.event.target == Some(id.to_string()))
        .map(|r| (r.event.actor, r.event.detail["why"].clone()))
        .collect()
}

#[tokio::test]
async fn a_signed_in_deployer_creates_a_rollout_with_the_roles_of_their_session_and_it_outlives_their_logout() {
    let api = api().await;
    let t = tenant(&api).await;
    deployable(&api).await;
    let ws: WorkspaceId = api.workspace.parse().unwrap();
    // A viewer may not.
    let vic = new_session(&api, t, "vic", &[(Role::Viewer, None)], api.state.now()).await;
    let path = format!("/v1/workspaces/{}/rollouts", api.workspace);
    let (s, _, v) = call_as(&api, Via::Cookie(&vic), Method::POST, &path, Some(rollout_body())).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");

    // A deployer, tenant-wide for reads and in this workspace for deploys: the rollout keeps what applied here.
    let other = WorkspaceId::from_random([4; 16]);
    let roles = [(Role::Viewer, None), (Role::Deployer, Some(ws)), (Role::Operator, Some(other))];
    let dave = new_session(&api, t, "dave", &roles, api.state.now()).await;
    let id = create_as(&api, Via::Cookie(&dave)).await;
    let row = api.state.store.rollout(&TenantScope::for_system(t), id).await.unwrap().unwrap();
    let RolloutCreator::User { subject, roles, .. } = &row.created_by else { panic!("{:?}", row.created_by) };
    assert_eq!(subject, "dave");
    assert_eq!(roles, &vec![(Role::Viewer, Some(ws)), (Role::Deployer, Some(ws))]);
    // The user is named as the creator, and as the requester of the deploy the first round made.
    api.state.audit_writer.flush().await;
    let records = api.state.store.audit_records(&t.to_string()).await.unwrap();
    for action in [AuditAction::RolloutCreate, AuditAction::DeploymentRequest] {
        assert!(
            records.iter().flatten().any(|r| r.event.action == action.as_str() && r.event.actor == "user:dave"),
            "{action:?}"
        );
    }

    // Their logout ends the session, not the rollout.
    let (s, _, v) = call_as(&api, Via::Cookie(&dave), Method::POST, "/v1/auth/logout", None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    api.clock.advance(Duration::from_secs(13 * 3600));
    crate::rollouts::round(&api.state).await.unwrap();
    assert_eq!(state_of(&api, t, id).await, RolloutState::Running);
    assert!(halts(&api, t, id).await.is_empty());
}

#[tokio::test]
async fn an_admin_ending_a_users_sessions_halts_the_rollouts_they_made_before_and_it_is_audited() {
    let api = api().await;
    let t = tenant(&api).await;
    deployable(&api).await;
    let dave = new_session(&api, t, "dave", &[(Role::Deployer, None)], api.state.now()).await;
    let erin = new_session(&api, t, "erin", &[(Role::Deployer, None)], api.state.now()).await;
    let daves = create_as(&api, Via::Bearer(&dave)).await;
    let erins = create_as(&api, Via::Cookie(&erin)).await;

    api.clock.advance(Duration::from_secs(5));
    let (s, v) = api.post("/v1/users/dave/end-sessions", json!({})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    crate::rollouts::round(&api.state).await.unwrap();
    assert_eq!(state_of(&api, t, daves).await, RolloutState::Halted);
    assert_eq!(halts(&api, t, daves).await, vec![("system".to_owned(), json!("creator_sessions_ended"))]);
    // Another user's rollout runs on.
    assert_eq!(state_of(&api, t, erins).await, RolloutState::Running);

    // What Dave starts after signing in again is not under the old cut-off.
    api.clock.advance(Duration::from_secs(5));
    let again = new_session(&api, t, "dave", &[(Role::Deployer, None)], api.state.now()).await;
    let later = create_as(&api, Via::Cookie(&again)).await;
    crate::rollouts::round(&api.state).await.unwrap();
    assert_eq!(state_of(&api, t, later).await, RolloutState::Running);
    // A cut-off is kept even when no session was live, and never moves back.
    let (s, _, _) = call_as(&api, Via::Cookie(&again), Method::POST, "/v1/auth/logout", None).await;
    assert_eq!(s, StatusCode::OK);
    api.clock.advance(Duration::from_secs(5));
    let (s, v) = api.post("/v1/users/dave/end-sessions", json!({})).await;
    assert_eq!((s, v["sessions_ended"].clone()), (StatusCode::OK, json!(0)), "{v}");
    crate::rollouts::round(&api.state).await.unwrap();
    assert_eq!(state_of(&api, t, later).await, RolloutState::Halted);
    assert_eq!(state_of(&api, t, erins).await, RolloutState::Running);
}

#[tokio::test]
async fn a_tokens_rollout_runs_until_the_token_is_revoked() {
    let api = api().await;
    let t = tenant(&api).await;
    deployable(&api).await;
    let (s, v) = api.post("/v1/tokens", json!({ "name": "ci", "role": "deployer", "expires_in": "1d" })).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (secret, token_id) = (v["token"].as_str().unwrap().to_owned(), v["details"]["id"].as_str().unwrap().to_owned());
    let id = create_as(&api, Via::Bearer(&secret)).await;
    let row = api.state.store.rollout(&TenantScope::for_system(t), id).await.unwrap().unwrap();
    assert_eq!(row.created_by, RolloutCreator::Token(token_id.parse().unwrap()));
    // Ending sessions of a user of the same name as nothing in particular changes nothing for a token.
    let (s, _) = api.post(&format!("/v1/users/{token_id}/end-sessions"), json!({})).await;
    assert_eq!(s, StatusCode::OK);
    crate::rollouts::round(&api.state).await.unwrap();
    assert_eq!(state_of(&api, t, id).await, RolloutState::Running);
    let (s, v) = api.call(Method::DELETE, &format!("/v1/tokens/{token_id}"), Some(&api.token), None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    crate::rollouts::round(&api.state).await.unwrap();
    assert_eq!(state_of(&api, t, id).await, RolloutState::Halted);
    assert_eq!(halts(&api, t, id).await, vec![("system".to_owned(), json!("creator_token_revoked"))]);
}

#[tokio::test]
async fn a_rollout_row_with_an_unknown_or_incomplete_creator_is_refused_as_corrupt() {
    let api = api().await;
    let t = tenant(&api).await;
    deployable(&api).await;
    let dave = new_session(&api, t, "dave", &[(Role::Deployer, None)], api.state.now()).await;
    let id = create_as(&api, Via::Cookie(&dave)).await;
    use sqlx::ConnectOptions;
    let db = api._dir.path().join(crate::store::DB_FILE_NAME);
    let mut conn = sqlx::sqlite::SqliteConnectOptions::new().filename(db).connect().await.unwrap();
    for (sql, what) in [
        ("UPDATE rollouts SET creator_kind = 'robot'", "unknown kind"),
        ("UPDATE rollouts SET creator_kind = 'user', creator_roles = NULL", "a user without roles"),
        ("UPDATE rollouts SET creator_kind = 'token', creator_roles = 'owner'", "a token with roles"),
    ] {
        sqlx::raw_sql(sql).execute(&mut conn).await.unwrap();
        let read = api.state.store.rollout(&TenantScope::for_system(t), id).await;
        assert!(matches!(read, Err(crate::store::StoreError::Corrupt(_))), "{what}: {read:?}");
    }
}
