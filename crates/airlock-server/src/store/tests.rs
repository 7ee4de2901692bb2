//! The store against a real SQLite database in a temporary directory.

use std::time::Duration;

use airlock_core::audit::{AuditAction, Event, Outcome};
use airlock_core::id::TokenId;
use airlock_core::operation::{OperationState, RefusalCode};
use airlock_core::token::{Secret, TokenKind};
use airlock_core::{ApplianceId, ApplianceIdentity, EnvironmentId, OperationId, TenantId, Timestamp, WorkspaceId};
use airlock_testkit::op_id;

use super::*;
use crate::authz::TenantScope;

fn now() -> Timestamp {
    Timestamp::from_unix_millis(1_800_000_000_000)
}

async fn store() -> (Store, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mac = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"test");
    (Store::open(dir.path(), true, mac).await.unwrap(), dir)
}

/// A tenant with one workspace, one environment and one appliance.
async fn tenant(store: &Store, n: u8) -> (TenantScope, WorkspaceId, EnvironmentId, ApplianceId) {
    let (t, w, e, a) = (
        TenantId::from_random([n; 16]),
        WorkspaceId::from_random([n + 1; 16]),
        EnvironmentId::from_random([n + 2; 16]),
        ApplianceId::from_random([n + 3; 16]),
    );
    let token = TokenId::from_random([n + 4; 16]);
    let scope = TenantScope::for_local_operator(t, token);
    let mut tx = store.write().await.unwrap();
    tx.create_tenant(t, &format!("t{n}"), now()).await.unwrap();
    tx.create_workspace(t, w, "default", now()).await.unwrap();
    tx.create_environment(&scope, w, e, "prod", now()).await.unwrap();
    let identity = ApplianceIdentity { trust_domain: "d".into(), tenant: t, environment: e, appliance: a };
    tx.insert_appliance(&identity, "1", ("00", now()), b"key", now()).await.unwrap();
    let secret = Secret::from_random(TokenKind::Join, [n; 32]);
    tx.create_join_token(&scope, e, TokenId::from_random([n + 5; 16]), &secret.hash(), now(), now()).await.unwrap();
    tx.commit().await.unwrap();
    (scope, w, e, a)
}

#[tokio::test]
async fn store_hides_other_tenants_rows() {
    let (store, _dir) = store().await;
    let (a, wa, ea, apl_a) = tenant(&store, 10).await;
    let (b, wb, eb, apl_b) = tenant(&store, 50).await;

    assert_eq!(store.list_workspaces(&a).await.unwrap().iter().map(|w| w.id).collect::<Vec<_>>(), vec![wa]);
    assert!(!store.workspace_exists(&a, wb).await.unwrap());
    assert!(store.list_environments(&a, wb).await.unwrap().is_empty());
    assert!(store.get_environment(&a, eb).await.unwrap().is_none());
    assert!(store.get_environment(&a, ea).await.unwrap().is_some());
    let listed: Vec<_> = store.list_appliances(&a, None).await.unwrap().iter().map(|r| r.id).collect();
    assert_eq!(listed, vec![apl_a]);
    assert!(store.list_appliances(&a, Some(eb)).await.unwrap().is_empty());
    assert!(store.get_appliance(&a, apl_b).await.unwrap().is_none());

    // Writes through A's scope cannot touch B's rows.
    let mut tx = store.write().await.unwrap();
    assert!(!tx.revoke_appliance(&a, apl_b, now()).await.unwrap());
    tx.record_renewal(&a, apl_b, ("ff", now()), Renewed::Replaced { presented: "00" }).await.unwrap();
    tx.record_seen(&a, apl_b, "evil", now()).await.unwrap();
    tx.commit().await.unwrap();
    let row = store.get_appliance(&b, apl_b).await.unwrap().unwrap();
    assert!(row.revoked_at.is_none());
    assert_eq!((row.cert_serial.as_str(), row.version.as_str()), ("00", "1"));
}

#[tokio::test]
async fn the_key_an_appliance_joined_with_retries_its_join_only_until_it_holds_a_certificate() {
    let (store, _dir) = store().await;
    let (a, _w, e, apl) = tenant(&store, 10).await;
    let tenant_id = a.tenant();
    let mut tx = store.write().await.unwrap();
    assert_eq!(tx.join_retry_environment(tenant_id, apl, b"key").await.unwrap(), Some(e));
    assert!(tx.platform_join_retry(tenant_id, e, b"key").await.unwrap().is_some());
    assert_eq!(tx.join_retry_environment(tenant_id, apl, b"other").await.unwrap(), None, "another key");
    // Answering a lost join again keeps the key on record: that answer may be lost too.
    tx.record_renewal(&a, apl, ("01", now()), Renewed::LostJoinAnswer).await.unwrap();
    assert_eq!(tx.join_retry_environment(tenant_id, apl, b"key").await.unwrap(), Some(e));
    // Once it renews (or recovers) it held its answer: the key it joined with retries nothing more.
    tx.record_renewal(&a, apl, ("02", now()), Renewed::Replaced { presented: "01" }).await.unwrap();
    assert_eq!(tx.join_retry_environment(tenant_id, apl, b"key").await.unwrap(), None);
    assert!(tx.platform_join_retry(tenant_id, e, b"key").await.unwrap().is_none());
    tx.commit().await.unwrap();
    let row = store.get_appliance(&a, apl).await.unwrap().unwrap();
    assert_eq!(row.cert_serial, "02");
}

async fn standing(store: &Store, scope: &TenantScope, id: ApplianceId, serial: &str) -> CertificateStanding {
    store.get_appliance(scope, id).await.unwrap().unwrap().certificate_standing(serial)
}

#[tokio::test]
async fn a_renewed_appliances_previous_certificate_serves_only_until_it_presents_the_new_one() {
    use CertificateStanding::{Current, Previous, Superseded};
    let (store, _dir) = store().await;
    let (a, _w, _e, apl) = tenant(&store, 10).await;
    assert_eq!(standing(&store, &a, apl, "00").await, Current { previous_live: false });
    let renew = |from: &'static str, to: &'static str| {
        let (store, a) = (&store, &a);
        async move {
            let mut tx = store.write().await.unwrap();
            tx.record_renewal(a, apl, (to, now()), Renewed::Replaced { presented: from }).await.unwrap();
            tx.commit().await.unwrap();
        }
    };
    renew("00", "01").await;
    assert_eq!(standing(&store, &a, apl, "01").await, Current { previous_live: true });
    assert_eq!(standing(&store, &a, apl, "00").await, Previous, "the answer may have been lost");
    // Presenting a certificate that is not the current one retires nothing.
    let retire = |serial: &'static str| {
        let (store, a) = (&store, &a);
        async move {
            let mut tx = store.write().await.unwrap();
            tx.retire_previous_certificate(a, apl, serial).await.unwrap();
            tx.commit().await.unwrap();
        }
    };
    retire("00").await;
    assert_eq!(standing(&store, &a, apl, "00").await, Previous);
    // It was lost: renewed again from "00", which is then replaced for good with the "01" it never got.
    renew("00", "02").await;
    assert_eq!(standing(&store, &a, apl, "01").await, Superseded);
    assert_eq!(standing(&store, &a, apl, "00").await, Superseded, "a previous certificate renews once");
    assert_eq!(standing(&store, &a, apl, "02").await, Current { previous_live: false });
    // Renewed from the current one, then presenting the new one retires the one it replaced.
    renew("02", "03").await;
    assert_eq!(standing(&store, &a, apl, "02").await, Previous);
    retire("03").await;
    assert_eq!(standing(&store, &a, apl, "02").await, Superseded, "a kept copy of the old one is worth nothing now");
    assert_eq!(standing(&store, &a, apl, "03").await, Current { previous_live: false });
}

fn operation_row(id: OperationId, w: WorkspaceId, e: EnvironmentId, a: ApplianceId) -> OperationRow {
    OperationRow {
        id,
        workspace_id: w,
        environment_id: e,
        appliance_id: a,
        template_name: "t".into(),
        template_sha256: "aa".into(),
        state: OperationState::AwaitingApproval,
        requested_by: "token:x".into(),
        requested_at: now(),
        updated_at: now(),
        request_digest: "bb".into(),
        command_sha256: "cc".into(),
        request_envelope: "{}".into(),
        control_plane_cert_pem: "pem".into(),
        approval_envelope: None,
        pre_approval_envelope: None,
        execution_envelope: None,
        appliance_cert_pem: None,
        appliance_attestation: None,
        release_envelope: None,
        exit_code: None,
        output_sha256: None,
        output_size: None,
        refusal_code: None,
        deny_code: None,
        refusal_reason: None,
        result_at: None,
        output_stored: false,
        output_salt_sealed: None,
    }
}

#[tokio::test]
async fn store_hides_other_tenants_templates_and_operations() {
    let (store, _dir) = store().await;
    let (a, wa, ea, apl_a) = tenant(&store, 10).await;
    let (b, wb, eb, apl_b) = tenant(&store, 50).await;
    let template = TemplateRow {
        workspace_id: wa,
        name: "t".into(),
        content_sha256: "aa".into(),
        manifest_toml: "m".into(),
        script: "s".into(),
        created_at: now(),
    };
    let mut tx = store.write().await.unwrap();
    assert!(tx.put_template(&a, wa, &template, now()).await.unwrap());
    assert!(tx.insert_operation(&a, &operation_row(op_id(1), wa, ea, apl_a)).await.unwrap());
    tx.commit().await.unwrap();

    assert_eq!(store.list_current_templates(&a, wa).await.unwrap().len(), 1);
    assert!(store.list_current_templates(&b, wa).await.unwrap().is_empty());
    assert!(store.current_template(&b, wa, "t").await.unwrap().is_none());
    assert!(store.template_version(&b, wa, "t", "aa").await.unwrap().is_none());
    assert!(store.get_operation(&b, op_id(1)).await.unwrap().is_none());
    assert!(store.list_operations(&b, None, None, None, 10).await.unwrap().is_empty());
    assert!(store.pending_operations(&b, apl_a, &PushFrom::Start, 10).await.unwrap().is_empty());
    assert_eq!(store.pending_operations(&a, apl_a, &PushFrom::Start, 10).await.unwrap().len(), 1);

    // Writes through B's scope cannot touch A's rows, not even by naming A's workspace.
    let mut tx = store.write().await.unwrap();
    assert!(!tx.set_approval(&b, op_id(1), "{}", OperationState::Approved, now()).await.unwrap());
    let update = ResultUpdate::refusal(OperationState::Refused, RefusalCode::Misbound, None, "x");
    assert!(!tx.record_result(&b, apl_a, op_id(1), &update, now()).await.unwrap());
    let other = TemplateRow { content_sha256: "evil".into(), ..template.clone() };
    assert!(tx.put_template(&b, wb, &other, now()).await.unwrap());
    assert!(!tx.put_template(&b, wa, &other, now()).await.unwrap());
    // An operation in B's tenant naming A's appliance, or A's environment: refused.
    assert!(!tx.insert_operation(&b, &operation_row(op_id(2), wb, eb, apl_a)).await.unwrap());
    assert!(!tx.insert_operation(&b, &operation_row(op_id(3), wb, ea, apl_b)).await.unwrap());
    assert!(tx.insert_operation(&b, &operation_row(op_id(4), wb, eb, apl_b)).await.unwrap());
    tx.commit().await.unwrap();
    assert!(store.get_operation(&a, op_id(4)).await.unwrap().is_none());
    let op = store.get_operation(&a, op_id(1)).await.unwrap().unwrap();
    assert_eq!((op.state.as_str(), op.approval_envelope, op.result_at), ("awaiting_approval", None, None));
    assert_eq!(store.current_template(&a, wa, "t").await.unwrap().unwrap().content_sha256, "aa");
}

#[tokio::test]
async fn an_operation_row_the_server_never_wrote_is_an_error_not_a_default() {
    let (store, _dir) = store().await;
    let (a, w, e, apl) = tenant(&store, 10).await;
    for (column, text) in [("state", "finished"), ("refusal_code", "too_early"), ("id", "op_1")] {
        let id = op_id(1);
        let mut tx = store.write().await.unwrap();
        assert!(tx.insert_operation(&a, &operation_row(id, w, e, apl)).await.unwrap());
        tx.commit().await.unwrap();
        let edit = format!("UPDATE operations SET {column} = $1 WHERE id = $2");
        sqlx::query(&edit).bind(text).bind(id.to_string()).execute(&store.pool).await.unwrap();
        let listed = store.list_operations(&a, None, None, None, 10).await;
        assert!(matches!(&listed, Err(StoreError::Corrupt(m)) if m.contains(column)), "{column}: {listed:?}");
        if column != "id" {
            let got = store.get_operation(&a, id).await;
            assert!(matches!(&got, Err(StoreError::Corrupt(m)) if m.contains(column)), "{column}: {got:?}");
        }
        sqlx::query("DELETE FROM operations").execute(&store.pool).await.unwrap();
    }
}

#[tokio::test]
async fn audit_chains_are_per_tenant_and_verify() {
    let (store, _dir) = store().await;
    let (a, ..) = tenant(&store, 10).await;
    let (b, ..) = tenant(&store, 50).await;
    for scope in [&a, &b, &a] {
        let mut tx = store.write().await.unwrap();
        let ev = Event {
            actor: scope.principal().actor(),
            action: AuditAction::TenantCreate.as_str().into(),
            workspace: None,
            target: None,
            outcome: Outcome::Success,
            detail: serde_json::Value::Null,
        };
        tx.audit(&scope.chain(), now(), ev).await.unwrap();
        tx.commit().await.unwrap();
    }
    let results = verify_all_chains(&store).await.unwrap();
    let count = |scope: &TenantScope| results.iter().find(|(c, _)| *c == scope.chain()).unwrap().1.clone().unwrap().seq;
    assert_eq!((count(&a), count(&b)), (2, 1));
}

#[tokio::test]
async fn dropped_write_transaction_changes_nothing() {
    let (store, _dir) = store().await;
    let (a, w, ..) = tenant(&store, 10).await;
    {
        let mut tx = store.write().await.unwrap();
        tx.create_environment(&a, w, EnvironmentId::from_random([99; 16]), "staging", now()).await.unwrap();
        // Dropped without commit, as the API does when a later step refuses the request.
    }
    assert_eq!(store.list_environments(&a, w).await.unwrap().len(), 1);
}

#[tokio::test]
async fn join_token_redeems_once() {
    let (store, _dir) = store().await;
    let (a, _, e, _) = tenant(&store, 10).await;
    let secret = Secret::from_random(TokenKind::Join, [7; 32]);
    let later = now().saturating_add(Duration::from_secs(60));
    let mut tx = store.write().await.unwrap();
    tx.create_join_token(&a, e, TokenId::from_random([8; 16]), &secret.hash(), now(), later).await.unwrap();
    let apl = ApplianceId::from_random([9; 16]);
    assert!(tx.redeem_join_token(&secret.hash(), apl, now()).await.unwrap().is_ok());
    assert_eq!(
        tx.redeem_join_token(&secret.hash(), apl, now()).await.unwrap().unwrap_err(),
        RedeemRefusal::AlreadyUsed { tenant: a.tenant(), by: Some(apl), expires_at: later }
    );
    let unknown = Secret::from_random(TokenKind::Join, [1; 32]);
    assert_eq!(tx.redeem_join_token(&unknown.hash(), apl, now()).await.unwrap().unwrap_err(), RedeemRefusal::Unknown);
}

/// Cached reads (`read_cache`) never outlive a write: a revocation, a last-seen batch and a
/// token's revocation are seen by the very next read, and a rolled-back write changes nothing.
#[tokio::test]
async fn cached_reads_see_the_next_committed_write() {
    let (store, _dir) = store().await;
    let (a, _, e, apl) = tenant(&store, 90).await;
    assert!(store.list_appliances(&a, Some(e)).await.unwrap()[0].revoked_at.is_none());

    let mut tx = store.write().await.unwrap();
    assert!(tx.revoke_appliance(&a, apl, now()).await.unwrap());
    drop(tx);
    assert!(store.list_appliances(&a, Some(e)).await.unwrap()[0].revoked_at.is_none(), "rolled back");

    let mut tx = store.write().await.unwrap();
    tx.record_seen(&a, apl, "2.0", now()).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(store.list_appliances(&a, Some(e)).await.unwrap()[0].version, "2.0");
    let mut tx = store.write().await.unwrap();
    assert!(tx.revoke_appliance(&a, apl, now()).await.unwrap());
    tx.commit().await.unwrap();
    assert!(store.list_appliances(&a, Some(e)).await.unwrap()[0].revoked_at.is_some());

    let secret = Secret::from_random(TokenKind::Api, [91; 32]);
    let mut tx = store.write().await.unwrap();
    let grants = crate::authz::Grants::token(crate::authz::Role::Owner, None, None, None);
    let token = NewToken {
        id: TokenId::from_random([92; 16]),
        hash: &secret.hash(),
        name: "ci",
        grants: &grants,
        created_by: None,
    };
    tx.create_api_token(a.tenant(), token, now()).await.unwrap();
    tx.commit().await.unwrap();
    assert!(store.api_token_by_hash(&secret.hash()).await.unwrap().is_some());
    let mut tx = store.write().await.unwrap();
    sqlx::query("UPDATE api_tokens SET revoked_at = 1").execute(&mut *tx.tx).await.unwrap();
    tx.commit().await.unwrap();
    assert!(store.api_token_by_hash(&secret.hash()).await.unwrap().is_none(), "a revoked token is refused at once");
}

#[tokio::test]
async fn tenant_admin_tokens_become_owner_tokens() {
    // A store at the schema before scoped tokens, holding a tenant-admin token.
    let dir = tempfile::tempdir().unwrap();
    let opts = SqliteConnectOptions::new().filename(dir.path().join(DB_FILE_NAME)).create_if_missing(true);
    let pool = SqlitePool::connect_with(opts).await.unwrap();
    sqlx::query("CREATE TABLE schema_migrations (version BIGINT PRIMARY KEY, description TEXT NOT NULL, applied_at BIGINT NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    for (version, description, sql) in MIGRATIONS.iter().filter(|m| m.0 < 16) {
        sqlx::raw_sql(sql).execute(&pool).await.unwrap();
        sqlx::query("INSERT INTO schema_migrations VALUES ($1, $2, 0)")
            .bind(version)
            .bind(description)
            .execute(&pool)
            .await
            .unwrap();
    }
    let secret = Secret::from_random(TokenKind::Api, [5; 32]);
    let tenant = TenantId::from_random([6; 16]);
    sqlx::query("INSERT INTO tenants (id, name, created_at) VALUES ($1, 'acme', 0)")
        .bind(tenant.to_string())
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO api_tokens (id, tenant_id, token_hash, name, role, created_at) VALUES ($1, $2, $3, 'old', 'tenant_admin', 0)")
        .bind(TokenId::from_random([7; 16]).to_string())
        .bind(tenant.to_string())
        .bind(secret.hash().0.as_slice())
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;

    let store = Store::open(dir.path(), false, ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"k")).await.unwrap();
    let token = store.api_token_by_hash(&secret.hash()).await.unwrap().unwrap();
    assert_eq!(token.grants, crate::authz::Grants::token(crate::authz::Role::Owner, None, None, None));
}

#[test]
fn an_audit_hash_does_not_depend_on_the_order_details_were_written_in() {
    // Cedar turns on serde_json's `preserve_order` in this build; the hash is the wire contract's (sorted keys) anyway,
    // so an appliance-only build, which sorts, verifies the same chain.
    let mut written_b_first = serde_json::Map::new();
    written_b_first.insert("b".into(), 1.into());
    written_b_first.insert("a".into(), serde_json::json!({ "z": 1, "y": [ { "d": 1, "c": 2 } ] }));
    let sorted: serde_json::Value = serde_json::from_str(r#"{"a":{"y":[{"c":2,"d":1}],"z":1},"b":1}"#).unwrap();
    let record = |detail: serde_json::Value| {
        let mut ev = Event {
            actor: "tok_x".into(),
            action: "x".into(),
            workspace: None,
            target: None,
            outcome: Outcome::Success,
            detail: serde_json::Value::Null,
        };
        ev.detail = detail;
        airlock_core::audit::Record::append("c", airlock_core::audit::Head::EMPTY, Timestamp::from_unix_millis(1), ev)
    };
    assert_eq!(record(serde_json::Value::Object(written_b_first)).hash, record(sorted).hash);
}

/// A Kubernetes token's id joins one appliance: that appliance may show it again (a renewal
/// before the kubelet refreshes the token), no other may; once the token expired the id is swept.
#[tokio::test]
async fn a_platform_token_id_is_spent_by_one_appliance_and_swept_once_expired() {
    use crate::platform_join::tokens::TokenId as PlatformTokenId;
    let (store, _dir) = store().await;
    let minute = Duration::from_secs(60);
    let token = PlatformTokenId { digest: "d1".into(), expires_at: now().saturating_add(minute) };
    let (a, b) = (ApplianceId::from_random([1; 16]), ApplianceId::from_random([2; 16]));
    let mut tx = store.write().await.unwrap();
    assert!(tx.spend_platform_token(&token, a, now()).await.unwrap());
    assert!(tx.spend_platform_token(&token, a, now()).await.unwrap(), "the same appliance may show it again");
    assert!(!tx.spend_platform_token(&token, b, now()).await.unwrap(), "another appliance may not");
    tx.commit().await.unwrap();
    let later = now().saturating_add(minute * 2);
    let mut tx = store.write().await.unwrap();
    // By now the token itself is refused as expired; its id no longer needs keeping.
    assert!(tx.spend_platform_token(&token, b, later).await.unwrap(), "swept once expired");
}

/// Migrations land out of number order when features are built in parallel (0018 landed before 0017 and 0019):
/// a store that already reached a higher version must still get the lower one it lacks, exactly once.
#[tokio::test]
async fn a_migration_numbered_below_the_newest_applied_one_is_still_applied() {
    let (store, dir) = store().await;
    // As a store made by the build that had 0018 but not 0017: without 0017's tables and its record.
    sqlx::raw_sql("DROP INDEX role_mappings_unique; DROP TABLE role_mappings; DROP TABLE idp_configs; DELETE FROM schema_migrations WHERE version = 17")
        .execute(&store.pool)
        .await
        .unwrap();
    store.close().await;
    let store = Store::open(dir.path(), false, ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"test")).await.unwrap();
    let applied: Vec<i64> = sqlx::query_scalar("SELECT version FROM schema_migrations ORDER BY version")
        .fetch_all(&store.pool)
        .await
        .unwrap();
    assert_eq!(applied, MIGRATIONS.iter().map(|m| m.0).collect::<Vec<_>>());
    let tables: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name IN ('idp_configs', 'role_mappings')",
    )
    .fetch_one(&store.pool)
    .await
    .unwrap();
    assert_eq!(tables, 2, "0017 was applied to a store already at a higher version");
    // And opened again, nothing is applied twice.
    store.close().await;
    Store::open(dir.path(), false, ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"test")).await.unwrap();
}

#[tokio::test]
async fn operations_name_their_signers_certificate_stored_once() {
    let (store, _dir) = store().await;
    let (a, w, e, apl) = tenant(&store, 10).await;
    let (b, wb, eb, apl_b) = tenant(&store, 50).await;
    let rotated =
        OperationRow { control_plane_cert_pem: "pem of the next key".into(), ..operation_row(op_id(3), w, e, apl) };
    let mut tx = store.write().await.unwrap();
    let batch = [operation_row(op_id(1), w, e, apl), operation_row(op_id(2), w, e, apl), rotated];
    assert_eq!(tx.insert_operations(&a, &batch).await.unwrap(), vec![true; 3]);
    assert!(tx.insert_operation(&b, &operation_row(op_id(4), wb, eb, apl_b)).await.unwrap());
    tx.commit().await.unwrap();
    let certs: Vec<(i64, String)> = sqlx::query_as("SELECT id, cert_pem FROM signer_certificates ORDER BY id")
        .fetch_all(&store.pool)
        .await
        .unwrap();
    assert_eq!(certs, vec![(1, "pem".to_owned()), (2, "pem of the next key".to_owned())], "each certificate once");
    let copies: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM operations WHERE control_plane_cert_pem <> ''")
        .fetch_one(&store.pool)
        .await
        .unwrap();
    assert_eq!(copies, 0, "no row carries its own copy");
    for (scope, id, pem) in [(&a, 1, "pem"), (&a, 2, "pem"), (&a, 3, "pem of the next key"), (&b, 4, "pem")] {
        assert_eq!(store.get_operation(scope, op_id(id)).await.unwrap().unwrap().control_plane_cert_pem, pem);
    }
    let listed = store.list_operations(&a, None, None, None, 10).await.unwrap();
    assert_eq!(listed.len(), 3);
    assert!(listed.iter().all(|op| op.control_plane_cert_pem.starts_with("pem")));

    // A row naming a certificate that is not there (the database edited with its foreign keys
    // off) is corrupt, not an empty certificate.
    let mut conn = store.pool.acquire().await.unwrap();
    sqlx::raw_sql(&format!(
        "PRAGMA foreign_keys = OFF; UPDATE operations SET signer_certificate_id = 99 WHERE id = '{}'; PRAGMA foreign_keys = ON;",
        op_id(1)
    ))
    .execute(&mut *conn)
    .await
    .unwrap();
    drop(conn);
    let got = store.get_operation(&a, op_id(1)).await;
    assert!(matches!(&got, Err(StoreError::Corrupt(m)) if m.contains("signer_certificate_id")), "{got:?}");
}

#[tokio::test]
async fn operations_stored_with_their_own_certificate_are_moved_to_one_copy() {
    // A store at the schema before migration 0027, holding operations signed under two keys
    // (their appliance not stored: only the operations matter here).
    let dir = tempfile::tempdir().unwrap();
    let opts =
        SqliteConnectOptions::new().filename(dir.path().join(DB_FILE_NAME)).create_if_missing(true).foreign_keys(false);
    let pool = SqlitePool::connect_with(opts).await.unwrap();
    sqlx::query("CREATE TABLE schema_migrations (version BIGINT PRIMARY KEY, description TEXT NOT NULL, applied_at BIGINT NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    for (version, description, sql) in MIGRATIONS.iter().filter(|m| m.0 < 27) {
        sqlx::raw_sql(sql).execute(&pool).await.unwrap();
        sqlx::query("INSERT INTO schema_migrations VALUES ($1, $2, 0)")
            .bind(version)
            .bind(description)
            .execute(&pool)
            .await
            .unwrap();
    }
    let (t, w, e, apl) = (
        TenantId::from_random([1; 16]),
        WorkspaceId::from_random([2; 16]),
        EnvironmentId::from_random([3; 16]),
        ApplianceId::from_random([4; 16]),
    );
    sqlx::raw_sql(&format!(
        "INSERT INTO tenants (id, name, created_at) VALUES ('{t}', 'acme', 0);
         INSERT INTO workspaces (id, tenant_id, name, created_at) VALUES ('{w}', '{t}', 'default', 0);
         INSERT INTO environments (id, tenant_id, workspace_id, name, created_at) VALUES ('{e}', '{t}', '{w}', 'prod', 0);"
    ))
    .execute(&pool)
    .await
    .unwrap();
    for (n, pem) in [(1, "old key's pem"), (2, "new key's pem"), (3, "old key's pem")] {
        sqlx::query(
            "INSERT INTO operations (id, tenant_id, workspace_id, environment_id, appliance_id, template_name,
                template_sha256, state, requested_by, requested_at, updated_at, request_digest, command_sha256,
                request_envelope, control_plane_cert_pem)
             VALUES ($1, $2, $3, $4, $5, 't', 'aa', 'awaiting_approval', 'token:x', 0, 0, 'bb', 'cc', '{}', $6)",
        )
        .bind(op_id(n).to_string())
        .bind(t.to_string())
        .bind(w.to_string())
        .bind(e.to_string())
        .bind(apl.to_string())
        .bind(pem)
        .execute(&pool)
        .await
        .unwrap();
    }
    pool.close().await;

    let store = Store::open(dir.path(), false, ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"k")).await.unwrap();
    let scope = TenantScope::for_local_operator(t, TokenId::from_random([5; 16]));
    for (n, pem) in [(1, "old key's pem"), (2, "new key's pem"), (3, "old key's pem")] {
        assert_eq!(store.get_operation(&scope, op_id(n)).await.unwrap().unwrap().control_plane_cert_pem, pem);
    }
    let (certs, copies): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT COUNT(*) FROM signer_certificates), (SELECT COUNT(*) FROM operations WHERE control_plane_cert_pem <> '')",
    )
    .fetch_one(&store.pool)
    .await
    .unwrap();
    assert_eq!((certs, copies), (2, 0));
}
