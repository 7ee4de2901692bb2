//! The batched request path ([`request_many`]) and a rollout's batched round, on a real store
//! set up through the API.

use std::sync::Arc;

use airlock_core::customer_key::CustomerSigningKey;
use airlock_core::operation::{REQUEST_PAYLOAD_TYPE, verify_certified_envelope};
use airlock_core::release::{ReleaseStatement, sign_release};
use airlock_core::{ApplianceId, EnvironmentId, OperationId, Timestamp};
use axum::body::Body;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

use super::*;
use crate::clock::{Clock, ManualClock};
use crate::keys::KekSource;
use crate::rollouts::TargetState;

const TEMPLATE: &str = r#"
name = "restart-service"
description = "Restart one service"
phase = "operate"
data_tags = ["service:restart"]
body = "restart.sh"

[[variables]]
name = "service"
pattern = "[a-z][a-z0-9-]{0,40}"
"#;
const SCRIPT: &str = "#!/bin/sh\nsystemctl restart \"$AIRLOCK_VAR_SERVICE\"\n";

struct Fixture {
    state: Arc<AppState>,
    token: String,
    workspace: String,
    scope: TenantScope,
    dir: tempfile::TempDir,
    clock: Arc<ManualClock>,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(Timestamp::from_unix_millis(1_800_000_000_000));
    let boot = crate::init(dir.path(), &KekSource::default_for(dir.path()), "airlock.test", "acme", "default", &*clock)
        .await
        .unwrap();
    let state = crate::test_state(dir.path(), clock.clone()).await;
    let row = state.store.api_token_by_hash(&boot.admin_token.hash()).await.unwrap().unwrap();
    Fixture {
        state,
        token: boot.admin_token.expose().to_owned(),
        workspace: boot.workspace.to_string(),
        scope: TenantScope::for_api_token(row),
        dir,
        clock,
    }
}

impl Fixture {
    async fn call(&self, method: Method, path: &str, token: Option<&str>, body: Value) -> (StatusCode, Value) {
        let mut req = Request::builder().method(method).uri(path).header("content-type", "application/json");
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = req.body(Body::from(body.to_string())).unwrap();
        let resp = crate::api::router(self.state.clone()).oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        let (s, v) = self.call(Method::POST, path, Some(&self.token), body).await;
        assert!(s.is_success(), "{path}: {s} {v}");
        v
    }

    /// An environment with `n` joined appliances.
    async fn env_with(&self, name: &str, n: usize) -> (EnvironmentId, Vec<ApplianceId>) {
        let env = self.post(&format!("/v1/workspaces/{}/environments", self.workspace), json!({ "name": name })).await;
        let env = env["id"].as_str().unwrap().to_owned();
        let mut appliances = Vec::new();
        for _ in 0..n {
            let token = self.post(&format!("/v1/environments/{env}/join-tokens"), json!({})).await;
            let csr = rcgen::CertificateParams::default()
                .serialize_request(&rcgen::KeyPair::generate().unwrap())
                .unwrap()
                .pem()
                .unwrap();
            let body = json!({ "join_token": token["token"], "csr_pem": csr, "version": "test" });
            let (s, joined) = self.call(Method::POST, "/v1/join", None, body).await;
            assert_eq!(s, StatusCode::OK, "{joined}");
            appliances.push(joined["appliance_id"].as_str().unwrap().parse().unwrap());
        }
        (env.parse().unwrap(), appliances)
    }

    async fn push_template(&self) {
        let body = json!({ "manifest_toml": TEMPLATE, "script": SCRIPT });
        self.post(&format!("/v1/workspaces/{}/templates", self.workspace), body).await;
    }

    /// Operation requests recorded in the tenant's audit chain, by the operation they name.
    async fn requests_audited(&self) -> Vec<String> {
        let records = self.state.store.audit_records(&self.scope.chain()).await.unwrap();
        records
            .into_iter()
            .map(Result::unwrap)
            .filter(|r| {
                r.event.action == AuditAction::OperationRequest.as_str()
                    || r.event.action == AuditAction::DeploymentRequest.as_str()
            })
            .map(|r| r.event.target.unwrap())
            .collect()
    }

    /// Fails every insert into `table` until the returned trigger is dropped.
    async fn fail_inserts(&self, table: &str) -> sqlx::SqliteConnection {
        use sqlx::ConnectOptions;
        let db = self.dir.path().join(crate::store::DB_FILE_NAME);
        let mut conn = sqlx::sqlite::SqliteConnectOptions::new().filename(db).connect().await.unwrap();
        let sql =
            format!("CREATE TRIGGER fail_{table} BEFORE INSERT ON {table} BEGIN SELECT RAISE(ABORT, 'injected'); END;");
        sqlx::raw_sql(&sql).execute(&mut conn).await.unwrap();
        conn
    }
}

fn template() -> Requested {
    Requested::Template { name: "restart-service".into(), vars: [("service".to_owned(), "api".to_owned())].into() }
}

fn targets(env: EnvironmentId, appliances: &[ApplianceId]) -> Vec<Target> {
    appliances
        .iter()
        .map(|&appliance| Target { environment: env, appliance, id: OperationId::from_random(random()) })
        .collect()
}

#[tokio::test]
async fn a_batch_stores_every_operation_signed_with_its_own_audit_record() {
    let f = fixture().await;
    f.push_template().await;
    let (env, appliances) = f.env_with("prod", 3).await;
    let targets = targets(env, &appliances);
    let made = request_many(&f.state, &f.scope, template(), "ticket 7: restart".into(), &targets).await.unwrap();
    assert_eq!(made.len(), 3);
    for (t, row) in targets.iter().zip(made) {
        let row = row.unwrap();
        assert_eq!((row.id, row.appliance_id), (t.id, t.appliance));
        let stored = f.state.store.get_operation(&f.scope, t.id).await.unwrap().expect("stored");
        // Each is its own request, signed for its own appliance.
        let statement = crate::operations::stored_request(&stored).unwrap();
        assert_eq!((statement.request.id, statement.request.appliance), (t.id, t.appliance));
        let envelope = Envelope::from_json(stored.request_envelope.as_bytes()).unwrap();
        let ca_der = f.state.ca.cert_der().as_ref().to_vec();
        verify_certified_envelope(
            &envelope,
            REQUEST_PAYLOAD_TYPE,
            &stored.control_plane_cert_pem,
            &ca_der,
            f.clock.now(),
        )
        .unwrap();
    }
    let mut audited = f.requests_audited().await;
    audited.sort();
    let mut ids: Vec<String> = targets.iter().map(|t| t.id.to_string()).collect();
    ids.sort();
    assert_eq!(audited, ids, "one audit record per operation");
    for (chain, verified) in crate::store::verify_all_chains(&f.state.store).await.unwrap() {
        assert!(verified.is_ok(), "{chain}: {verified:?}");
    }
}

#[tokio::test]
async fn a_batch_is_scoped_to_the_tenant_and_fails_foreign_or_revoked_targets_alone() {
    let f = fixture().await;
    f.push_template().await;
    let (env, appliances) = f.env_with("prod", 3).await;
    let (other_env, other) = f.env_with("stage", 1).await;
    // The third appliance is revoked; one target names an appliance of another environment.
    let (s, v) =
        f.call(Method::POST, &format!("/v1/appliances/{}/revoke", appliances[2]), Some(&f.token), json!({})).await;
    assert!(s.is_success(), "{v}");
    let mut batch = targets(env, &appliances);
    batch.extend(targets(env, &other));
    let made = request_many(&f.state, &f.scope, template(), "ticket 7".into(), &batch).await.unwrap();
    assert!(made[0].is_ok() && made[1].is_ok());
    assert!(matches!(made[2], Err(RequestError::NotActive { .. })), "revoked: {:?}", made[2]);
    assert!(matches!(made[3], Err(RequestError::NotActive { .. })), "other environment: {:?}", made[3]);
    assert_eq!(f.requests_audited().await.len(), 2);

    // Another tenant's scope sees none of these environments: nothing is stored for it.
    let dir = f.dir.path();
    let globex = crate::create_tenant(dir, &KekSource::default_for(dir), "globex", "default", &*f.clock).await.unwrap();
    let row = f.state.store.api_token_by_hash(&globex.admin_token.hash()).await.unwrap().unwrap();
    let foreign = TenantScope::for_api_token(row);
    let batch = targets(other_env, &other);
    let made = request_many(&f.state, &foreign, template(), "ticket 7".into(), &batch).await.unwrap();
    assert!(made.iter().all(|r| matches!(r, Err(RequestError::NoEnvironment(_)))), "{made:?}");
    assert!(f.state.store.get_operation(&f.scope, batch[0].id).await.unwrap().is_none());
    assert!(f.state.store.get_operation(&foreign, batch[0].id).await.unwrap().is_none());
    // Bad input fails the whole batch before anything is stored.
    let e = request_many(&f.state, &f.scope, template(), " \n ".into(), &batch).await.unwrap_err();
    assert!(matches!(e, RequestError::Reason), "{e:?}");
}

#[tokio::test]
async fn a_failed_commit_stores_no_operation_nor_audit_record() {
    let f = fixture().await;
    f.push_template().await;
    let (env, appliances) = f.env_with("prod", 2).await;
    let batch = targets(env, &appliances);
    let conn = f.fail_inserts("audit_events").await;
    let e = request_many(&f.state, &f.scope, template(), "ticket 7".into(), &batch).await.unwrap_err();
    assert!(matches!(e, RequestError::Store(StoreError::Db(_))), "{e:?}");
    drop(conn);
    for t in &batch {
        assert!(f.state.store.get_operation(&f.scope, t.id).await.unwrap().is_none(), "rolled back");
    }
    assert!(f.requests_audited().await.is_empty());
}

#[tokio::test]
async fn a_rollout_round_requests_every_start_at_once_and_after_a_failed_commit_asks_again_under_the_same_ids() {
    let f = fixture().await;
    let (env, appliances) = f.env_with("prod", 4).await;
    let key = CustomerSigningKey::from_seed([9; 32]);
    let pem = key.public().to_pem().unwrap();
    f.post(&format!("/v1/workspaces/{}/release-keys", f.workspace), json!({ "public_key_pem": pem })).await;
    let manifest = "name = \"shop\"\nversion = \"1.0.0\"\n\n[[service]]\nname = \"web\"\ncommand = \"/bin/sleep\"\nargs = [\"infinity\"]\n";
    let statement = ReleaseStatement::new(manifest, Vec::new()).unwrap();
    let envelope: Value = serde_json::from_str(&sign_release(&statement, &key).to_json()).unwrap();
    f.post(&format!("/v1/workspaces/{}/releases", f.workspace), json!({ "envelope": envelope })).await;

    // The first round's requests cannot be committed: the targets keep their recorded ids and
    // no operation exists.
    let mut conn = f.fail_inserts("operations").await;
    let body =
        json!({ "release": "shop@1.0.0", "environments": [env.to_string()], "concurrency": 4, "reason": "ship it" });
    let rollout = f.post(&format!("/v1/workspaces/{}/rollouts", f.workspace), body).await;
    let id: airlock_core::RolloutId = rollout["id"].as_str().unwrap().parse().unwrap();
    let first = f.state.store.rollout_targets(&f.scope, id).await.unwrap();
    assert_eq!(first.len(), 4);
    for t in &first {
        assert_eq!(t.state, TargetState::Deploying);
        let op = t.operation_id.expect("recorded before the request");
        assert!(f.state.store.get_operation(&f.scope, op).await.unwrap().is_none());
    }
    assert!(f.requests_audited().await.is_empty());
    sqlx::raw_sql("DROP TRIGGER fail_operations").execute(&mut conn).await.unwrap();

    // The next round requests them again, under the same ids, all in one batch.
    crate::rollouts::drive(&f.state, &f.scope, id).await.unwrap();
    let again = f.state.store.rollout_targets(&f.scope, id).await.unwrap();
    for (before, after) in first.iter().zip(&again) {
        assert_eq!(before.operation_id, after.operation_id, "the same operation, never a second one");
        assert_eq!(after.state, TargetState::Deploying);
        let op = f.state.store.get_operation(&f.scope, after.operation_id.unwrap()).await.unwrap().unwrap();
        assert!(appliances.contains(&op.appliance_id));
        assert_eq!(op.template_name, deploy::DEPLOY_KIND);
    }
    assert_eq!(f.requests_audited().await.len(), 4);
    // A further round changes nothing: every target is in flight with its operation.
    crate::rollouts::drive(&f.state, &f.scope, id).await.unwrap();
    assert_eq!(f.requests_audited().await.len(), 4);
}

#[tokio::test]
async fn batch_inserts_check_every_appliance_whether_looked_up_one_by_one_or_all_at_once() {
    let f = fixture().await;
    f.push_template().await;
    let (env, appliances) = f.env_with("prod", 1).await;
    let (_, other) = f.env_with("stage", 1).await;
    let made =
        request_many(&f.state, &f.scope, template(), "ticket 7".into(), &targets(env, &appliances)).await.unwrap();
    let row = made.into_iter().next().unwrap().unwrap();
    let dir = f.dir.path();
    let globex = crate::create_tenant(dir, &KekSource::default_for(dir), "globex", "default", &*f.clock).await.unwrap();
    let foreign =
        TenantScope::for_api_token(f.state.store.api_token_by_hash(&globex.admin_token.hash()).await.unwrap().unwrap());
    // One at a time, and past the size from which the environment's appliances are read at
    // once: the last names an appliance of another environment and is not inserted.
    for n in [2_usize, 40] {
        let rows: Vec<OperationRow> = (0..n)
            .map(|i| {
                let mut r = row.clone();
                r.id = OperationId::from_random(random());
                if i == n - 1 {
                    r.appliance_id = other[0];
                }
                r
            })
            .collect();
        let mut tx = f.state.store.write().await.unwrap();
        assert_eq!(tx.insert_operations(&foreign, &rows).await.unwrap(), vec![false; n], "another tenant's");
        let inserted = tx.insert_operations(&f.scope, &rows).await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(inserted, (0..n).map(|i| i != n - 1).collect::<Vec<_>>());
        for (r, ok) in rows.iter().zip(inserted) {
            assert_eq!(f.state.store.get_operation(&f.scope, r.id).await.unwrap().is_some(), ok);
        }
    }
}
