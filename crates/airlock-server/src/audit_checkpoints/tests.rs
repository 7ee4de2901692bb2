//! The audit key, checkpoints and pruning against a real data directory (SQLite on disk).

use airlock_core::audit::Record;
use airlock_core::audit::checkpoint::read_lines;
use airlock_core::customer_key::CustomerSigningKey;

use super::*;
use crate::clock::ManualClock;
use crate::keys::KekSource;
use crate::store::{VerifyOptions, verify_all_chains_with};

struct Fixture {
    dir: tempfile::TempDir,
    store: Store,
    signer: AuditSigner,
    clock: Arc<ManualClock>,
    tenant: String,
}

fn t0() -> Timestamp {
    Timestamp::from_unix_millis(1_800_000_000_000)
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(t0());
    let kek = KekSource::default_for(dir.path());
    let boot = crate::init(dir.path(), &kek, "airlock.test", "acme", "main", clock.as_ref()).await.unwrap();
    let kek = kek.load().unwrap();
    let store = Store::open(dir.path(), false, kek.audit_mac_key()).await.unwrap();
    let signer = AuditSigner::load(&store, &kek).await.unwrap();
    Fixture { dir, store, signer, clock, tenant: boot.tenant.to_string() }
}

impl Fixture {
    /// An anonymous refusal on the `system` chain, at the clock's time.
    async fn refusal(&self, n: u32) {
        let mut tx = self.store.write().await.unwrap();
        let mut ev = event("anonymous", AuditAction::ApiAuthenticate, Outcome::Denied);
        ev.detail = serde_json::json!({ "n": n });
        tx.audit(SYSTEM_CHAIN, self.clock.now(), ev).await.unwrap();
        tx.commit().await.unwrap();
    }

    /// Runs SQL on the database file over a connection of its own, as an intruder would.
    async fn sql(&self, sql: &str) {
        sqlx::raw_sql(sql).execute(&mut self.conn().await).await.unwrap();
    }

    async fn conn(&self) -> sqlx::SqliteConnection {
        use sqlx::ConnectOptions;
        let db = self.dir.path().join(crate::store::DB_FILE_NAME);
        sqlx::sqlite::SqliteConnectOptions::new().filename(db).connect().await.unwrap()
    }

    async fn checkpoint(&self) -> Vec<(usize, Checkpoint)> {
        let lines =
            self.signer.checkpoint_all(&self.store, self.clock.now(), CheckpointReason::Requested).await.unwrap();
        read_lines(lines.iter().map(String::as_str), &self.signer.public()).unwrap()
    }

    /// Verifies as `airlock audit verify` does: with the audit key, and these checkpoints.
    async fn verify(
        &self,
        checkpoints: &[(usize, Checkpoint)],
        head_macs: bool,
    ) -> Vec<(String, Result<Head, String>)> {
        let options =
            VerifyOptions { head_macs, audit_key: Some(self.signer.public()), checkpoints: checkpoints.to_vec() };
        verify_all_chains_with(&self.store, &options).await.unwrap()
    }
}

fn result<'a>(results: &'a [(String, Result<Head, String>)], chain: &str) -> &'a Result<Head, String> {
    &results.iter().find(|(c, _)| c == chain).unwrap_or_else(|| panic!("chain {chain} not verified: {results:?}")).1
}

fn all_ok(results: &[(String, Result<Head, String>)]) {
    for (chain, r) in results {
        assert!(r.is_ok(), "chain {chain}: {r:?}");
    }
}

#[tokio::test]
async fn init_makes_the_audit_key_publishes_it_and_starts_the_system_chain() {
    let f = fixture().await;
    let published = std::fs::read_to_string(f.dir.path().join(AUDIT_KEY_FILE_NAME)).unwrap();
    assert_eq!(published, f.signer.public_pem());
    let system = f.store.audit_records(SYSTEM_CHAIN).await.unwrap();
    let first = system[0].as_ref().unwrap();
    assert_eq!(first.event.action, AuditAction::AuditKeyCreate.as_str());
    assert_eq!(first.event.detail["key_id"], f.signer.public().key_id());
    // Loading again finds the same key, and writes no second record.
    let kek = KekSource::default_for(f.dir.path()).load().unwrap();
    let again = AuditSigner::load_or_create(&f.store, &kek, f.clock.now()).await.unwrap();
    assert_eq!(again.public_pem(), f.signer.public_pem());
    assert_eq!(f.store.audit_records(SYSTEM_CHAIN).await.unwrap().len(), 1);
    // Another KEK cannot unseal it.
    let other = KekSource::Env("22".repeat(32)).load().unwrap();
    assert!(AuditSigner::load(&f.store, &other).await.is_err());
    all_ok(&f.verify(&[], true).await);
}

#[tokio::test]
async fn a_deleted_system_chain_fails_verification_and_is_named() {
    let f = fixture().await;
    f.refusal(1).await;
    f.sql("DELETE FROM audit_events WHERE chain = 'system'; DELETE FROM audit_heads WHERE chain = 'system';").await;
    let results = f.verify(&[], true).await;
    let err = result(&results, SYSTEM_CHAIN).clone().unwrap_err();
    assert!(err.contains("chain `system` is missing"), "{err}");
    // The tenant's chain is untouched and still verifies.
    assert!(result(&results, &f.tenant).is_ok());
}

#[tokio::test]
async fn a_deleted_tenant_chain_fails_verification_and_is_named() {
    let f = fixture().await;
    let cps = f.checkpoint().await;
    let chain = f.tenant.clone();
    f.sql(&format!(
        "DELETE FROM audit_events WHERE chain = '{chain}'; DELETE FROM audit_heads WHERE chain = '{chain}';"
    ))
    .await;
    for checkpoints in [&[][..], &cps[..]] {
        let results = f.verify(checkpoints, true).await;
        let err = result(&results, &chain).clone().unwrap_err();
        assert!(err.contains(&format!("chain `{chain}` is missing")), "{err}");
    }
}

#[tokio::test]
async fn truncation_with_a_rewritten_head_is_caught_by_a_checkpoint_without_the_kek() {
    let f = fixture().await;
    for n in 0..5 {
        f.refusal(n).await;
    }
    let cps = f.checkpoint().await;
    all_ok(&f.verify(&cps, false).await);
    // Remove the last two records and move the head back to match, as someone without the
    // KEK would (the MAC is then not checked: the verifier has no KEK either).
    let kept = f.store.audit_records(SYSTEM_CHAIN).await.unwrap()[3].clone().unwrap();
    f.sql(&format!(
        "DELETE FROM audit_events WHERE chain = 'system' AND seq > 4;
         UPDATE audit_heads SET seq = 4, hash = '{}' WHERE chain = 'system';",
        kept.hash.to_hex()
    ))
    .await;
    assert!(f.verify(&[], false).await.iter().all(|(_, r)| r.is_ok()), "without checkpoints the cut is invisible");
    let results = f.verify(&cps, false).await;
    let err = result(&results, SYSTEM_CHAIN).clone().unwrap_err();
    assert!(err.contains("truncation"), "{err}");
}

#[tokio::test]
async fn a_checkpoint_from_another_key_is_refused() {
    let f = fixture().await;
    let forger = CustomerSigningKey::from_seed([9; 32]);
    let line = Checkpoint::new(SYSTEM_CHAIN, Head::EMPTY, t0(), CheckpointReason::Requested).signed_line(&forger);
    let err = read_lines([line.as_str()], &f.signer.public()).unwrap_err();
    assert!(err.to_string().contains("signed with another key"), "{err}");
}

#[tokio::test]
async fn pruning_removes_old_refusals_behind_a_signed_anchor_and_the_chain_still_verifies() {
    let f = fixture().await;
    for n in 0..4 {
        f.refusal(n).await;
    }
    let before = f.checkpoint().await;
    f.clock.advance(Duration::from_secs(40 * 86_400));
    f.refusal(100).await;
    // A round prunes what is past the retention (everything but the last refusal), keeps the
    // prune's checkpoint as the chain's anchor, and writes every chain's checkpoint to the
    // data directory's file.
    round(&f.store, &f.signer, f.clock.as_ref(), f.dir.path(), &Schedule::default(), CheckpointReason::Periodic).await;
    let system: Vec<Record> =
        f.store.audit_records(SYSTEM_CHAIN).await.unwrap().into_iter().map(Result::unwrap).collect();
    let actions: Vec<&str> = system.iter().map(|r| r.event.action.as_str()).collect();
    assert_eq!(actions, ["api.authenticate", "audit.pruned"], "the key record and four refusals are pruned");
    assert_eq!(system[0].seq, 6);
    assert_eq!(system[1].event.detail["through_seq"], 5);
    let file = std::fs::read_to_string(f.dir.path().join(CHECKPOINT_FILE_NAME)).unwrap();
    let after = read_lines(file.lines(), &f.signer.public()).unwrap();
    let anchor = f.store.audit_anchor(SYSTEM_CHAIN).await.unwrap().unwrap();
    let anchor = Checkpoint::from_line(&anchor, &f.signer.public()).unwrap();
    assert_eq!((anchor.reason, anchor.seq), (CheckpointReason::Prune, 5));
    assert_eq!(after.iter().find(|(_, cp)| cp.chain == SYSTEM_CHAIN).unwrap().1.seq, 7);
    // Verifies from the anchor, against checkpoints from before and after the prune.
    let mut all = before.clone();
    all.extend(after.iter().map(|(line, cp)| (line + before.len(), cp.clone())));
    all_ok(&f.verify(&all, true).await);
    all_ok(&f.verify(&all, false).await);

    // The anchor needs the audit key; one signed by another key, or moved, is refused.
    let no_key = VerifyOptions { head_macs: true, audit_key: None, checkpoints: Vec::new() };
    let results = verify_all_chains_with(&f.store, &no_key).await.unwrap();
    assert!(result(&results, SYSTEM_CHAIN).as_ref().unwrap_err().contains("without the audit key"));
    let forged = Checkpoint::new(SYSTEM_CHAIN, system[0].head(), t0(), CheckpointReason::Prune)
        .signed_line(&CustomerSigningKey::from_seed([9; 32]));
    f.sql(&format!("UPDATE audit_anchors SET checkpoint = '{forged}' WHERE chain = 'system'")).await;
    let err = result(&f.verify(&[], true).await, SYSTEM_CHAIN).clone().unwrap_err();
    assert!(err.contains("anchor"), "{err}");
}

#[tokio::test]
async fn records_removed_after_a_prune_anchor_are_still_caught() {
    let f = fixture().await;
    for n in 0..3 {
        f.refusal(n).await;
    }
    f.clock.advance(Duration::from_secs(40 * 86_400));
    for n in 10..13 {
        f.refusal(n).await;
    }
    f.signer.prune(&f.store, SYSTEM_CHAIN, f.clock.now(), u64::MAX, f.clock.now()).await.unwrap().unwrap();
    all_ok(&f.verify(&[], true).await);
    // Deleting the first record kept after the anchor breaks the link to it.
    f.sql("DELETE FROM audit_events WHERE chain = 'system' AND seq = (SELECT MIN(seq) FROM audit_events WHERE chain = 'system')")
        .await;
    assert!(result(&f.verify(&[], true).await, SYSTEM_CHAIN).is_err());
}

#[tokio::test]
async fn a_prune_refuses_an_edited_prefix() {
    let f = fixture().await;
    f.refusal(1).await;
    f.clock.advance(Duration::from_secs(40 * 86_400));
    f.refusal(2).await;
    f.sql("UPDATE audit_events SET record = replace(record, '\"denied\"', '\"success\"') WHERE chain = 'system' AND seq = 2")
        .await;
    let err = f.signer.prune(&f.store, SYSTEM_CHAIN, f.clock.now(), u64::MAX, f.clock.now()).await.unwrap_err();
    assert!(err.to_string().contains("not pruned"), "{err}");
    assert_eq!(f.store.audit_records(SYSTEM_CHAIN).await.unwrap().len(), 3, "nothing was removed");
}

#[tokio::test]
async fn anonymous_refusals_cannot_grow_the_system_chain_past_the_retention() {
    let f = fixture().await;
    let schedule = Schedule { retention: Duration::from_secs(86_400), ..Schedule::default() };
    for day in 0..10 {
        for n in 0..20 {
            f.refusal(day * 100 + n).await;
        }
        f.clock.advance(Duration::from_secs(86_400 + 1));
        round(&f.store, &f.signer, f.clock.as_ref(), f.dir.path(), &schedule, CheckpointReason::Periodic).await;
    }
    let kept = f.store.audit_records(SYSTEM_CHAIN).await.unwrap().len();
    assert!(kept <= 21, "only the last window and the prune record are kept: {kept}");
    let anchors: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM audit_anchors").fetch_one(&mut f.conn().await).await.unwrap();
    assert_eq!(anchors, 1, "one anchor per chain, replaced at each prune");
    all_ok(&f.verify(&[], true).await);
}

#[tokio::test]
async fn old_head_macs_are_upgraded_at_open_and_a_head_put_back_the_old_way_fails() {
    let f = fixture().await;
    f.refusal(1).await;
    let kek = KekSource::default_for(f.dir.path()).load().unwrap();
    let key = kek.audit_mac_key();
    // Make the system head look as a store before epochs left it: MAC'd the v1 way, epoch 0.
    let Some(Ok(head)) = f.store.audit_head(SYSTEM_CHAIN, true).await.unwrap() else { panic!("a verified head") };
    let v1 = data_encoding::HEXLOWER.encode(&head.mac(&key, SYSTEM_CHAIN));
    let put_back = format!("UPDATE audit_heads SET mac = '{v1}', epoch = 0, at = 0 WHERE chain = 'system'");
    f.sql(&put_back).await;
    // Once the store has an audit key, it has upgraded its heads: an epoch-0 head was put back.
    let err = result(&f.verify(&[], true).await, SYSTEM_CHAIN).clone().unwrap_err();
    assert!(err.contains("fails its MAC"), "{err}");
    // Reopening a store that has its audit key leaves such a head as found: it was put back.
    f.store.close().await;
    let store = Store::open(f.dir.path(), false, kek.audit_mac_key()).await.unwrap();
    let epoch: i64 = sqlx::query_scalar("SELECT epoch FROM audit_heads WHERE chain = 'system'")
        .fetch_one(&mut f.conn().await)
        .await
        .unwrap();
    assert_eq!(epoch, 0, "a put-back head is not upgraded once the store has its audit key");
    let mut tx = store.write().await.unwrap();
    let refused = tx.audit(SYSTEM_CHAIN, t0(), event("system", AuditAction::TenantCreate, Outcome::Success)).await;
    let err = refused.unwrap_err().to_string();
    assert!(err.contains("fails its MAC"), "nothing is appended over a put-back head: {err}");
    drop(tx);
    store.close().await;
    // A store from before epochs (no audit key yet) upgrades, when opened for writing, every
    // head whose old MAC verifies.
    f.sql("DELETE FROM audit_key").await;
    let store = Store::open(f.dir.path(), false, kek.audit_mac_key()).await.unwrap();
    let (epoch, at): (i64, i64) = sqlx::query_as("SELECT epoch, at FROM audit_heads WHERE chain = 'system'")
        .fetch_one(&mut f.conn().await)
        .await
        .unwrap();
    assert!(epoch > 0 && at == t0().unix_millis(), "epoch {epoch}, at {at}");
    assert!(store.audit_head(SYSTEM_CHAIN, true).await.unwrap().unwrap().is_ok());
    // Epochs only go up: the next write takes one above every head's.
    let max: i64 =
        sqlx::query_scalar("SELECT MAX(epoch) FROM audit_heads").fetch_one(&mut f.conn().await).await.unwrap();
    let mut tx = store.write().await.unwrap();
    tx.audit(&f.tenant, t0(), event("system", AuditAction::TenantCreate, Outcome::Success)).await.unwrap();
    tx.commit().await.unwrap();
    let tenant_epoch: i64 = sqlx::query_scalar(&format!("SELECT epoch FROM audit_heads WHERE chain = '{}'", f.tenant))
        .fetch_one(&mut f.conn().await)
        .await
        .unwrap();
    assert_eq!(tenant_epoch, max + 1);
}

#[tokio::test]
async fn a_flood_within_the_retention_is_cut_to_the_newest_records() {
    let f = fixture().await;
    for n in 0..30 {
        f.refusal(n).await;
    }
    let schedule = Schedule { max_records: 10, ..Schedule::default() };
    round(&f.store, &f.signer, f.clock.as_ref(), f.dir.path(), &schedule, CheckpointReason::Periodic).await;
    let system: Vec<Record> =
        f.store.audit_records(SYSTEM_CHAIN).await.unwrap().into_iter().map(Result::unwrap).collect();
    // Seq 1 is the key's creation, 2..=31 the refusals: the newest 10 are kept, then the prune.
    assert_eq!(system.first().unwrap().seq, 22);
    assert_eq!(system.len(), 11);
    assert_eq!(system.last().unwrap().event.action, AuditAction::AuditPruned.as_str());
    all_ok(&f.verify(&[], true).await);
}

#[tokio::test]
async fn a_periodic_checkpoint_planted_as_an_anchor_does_not_excuse_a_cut_start() {
    let f = fixture().await;
    for n in 0..5 {
        f.refusal(n).await;
    }
    // Every chain's latest checkpoint is in the server's file beside the store: whoever can
    // edit the store can copy one into `audit_anchors` and delete the records behind it.
    for chain in [f.tenant.clone(), SYSTEM_CHAIN.to_owned()] {
        let Some(Ok(head)) = f.store.audit_head(&chain, true).await.unwrap() else { panic!("a head for {chain}") };
        let line = f.signer.sign(&chain, head, f.clock.now(), CheckpointReason::Periodic);
        f.sql(&format!(
            "INSERT OR REPLACE INTO audit_anchors (chain, seq, hash, checkpoint) VALUES ('{chain}', {}, '{}', '{line}');
             DELETE FROM audit_events WHERE chain = '{chain}' AND seq <= {};",
            head.seq,
            head.hash.to_hex(),
            head.seq
        ))
        .await;
        let err = result(&f.verify(&[], true).await, &chain).clone().unwrap_err();
        assert!(err.contains("not a prune's"), "{chain}: {err}");
    }
}

#[tokio::test]
async fn records_cut_off_the_end_behind_a_rewritten_head_stop_appends_and_checkpoints() {
    let f = fixture().await;
    for n in 0..5 {
        f.refusal(n).await;
    }
    // Without the KEK an intruder cannot MAC the head they point back; the next append (which
    // would MAC it anew) and the next checkpoint (which would vouch for it) both refuse.
    let Some(Ok(head)) = f.store.audit_head(SYSTEM_CHAIN, true).await.unwrap() else { panic!("a head") };
    let back = f.store.audit_records(SYSTEM_CHAIN).await.unwrap()[2].clone().unwrap().head();
    f.sql(&format!(
        "DELETE FROM audit_events WHERE chain = 'system' AND seq > {};
         UPDATE audit_heads SET seq = {}, hash = '{}' WHERE chain = 'system';",
        back.seq,
        back.seq,
        back.hash.to_hex()
    ))
    .await;
    assert!(head.seq > back.seq);
    let mut tx = f.store.write().await.unwrap();
    let err = tx.audit(SYSTEM_CHAIN, f.clock.now(), event("x", AuditAction::ApiAuthenticate, Outcome::Denied)).await;
    assert!(err.unwrap_err().to_string().contains("fails its MAC"));
    drop(tx);
    let err = f.signer.checkpoint_all(&f.store, f.clock.now(), CheckpointReason::Periodic).await.unwrap_err();
    assert!(err.to_string().contains("system"), "{err}");
    let err = result(&f.verify(&[], true).await, SYSTEM_CHAIN).clone().unwrap_err();
    assert!(err.contains("fails its MAC"), "{err}");
}
