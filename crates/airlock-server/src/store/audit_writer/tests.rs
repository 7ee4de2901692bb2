//! The group-commit writer against a real SQLite database in a temporary directory.

use airlock_core::audit::{AuditAction, Outcome};

use super::*;
use crate::state::event;

async fn writer() -> (Arc<Store>, AuditWriter, AuditMetrics, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mac = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"test");
    let store = Arc::new(Store::open(dir.path(), true, mac).await.unwrap());
    let metrics = AuditMetrics::default();
    (store.clone(), AuditWriter::spawn(store, metrics.clone()), metrics, dir)
}

fn read(task: usize, n: usize) -> Event {
    let mut ev = event("tok_test", AuditAction::OperationManifest, Outcome::Success);
    ev.detail = serde_json::json!({ "task": task, "n": n });
    ev
}

fn at() -> Timestamp {
    Timestamp::from_unix_millis(1_800_000_000_000)
}

/// The chain's records as (task, n), after checking the whole chain verifies.
async fn committed(store: &Store, chain: &str) -> Vec<(u64, u64)> {
    let chains = crate::store::verify_all_chains(store).await.unwrap();
    for (c, result) in &chains {
        assert!(result.is_ok(), "chain {c}: {result:?}");
    }
    let records = store.audit_records(chain).await.unwrap();
    records
        .into_iter()
        .map(|r| {
            let r = r.unwrap();
            (r.event.detail["task"].as_u64().unwrap(), r.event.detail["n"].as_u64().unwrap())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_are_all_committed_in_order_in_shared_batches() {
    let (store, writer, metrics, _dir) = writer().await;
    let writer = Arc::new(writer);
    const TASKS: usize = 64;
    const EACH: usize = 40;
    const CHAINS: [&str; 3] = ["ten_a", "ten_b", "system"];
    let mut handles = Vec::new();
    for task in 0..TASKS {
        let writer = writer.clone();
        handles.push(tokio::spawn(async move {
            for n in 0..EACH {
                // Every other record is a routine read that does not wait; its order within the
                // task still holds, because one task's queue sends are ordered.
                let chain = CHAINS[task % CHAINS.len()];
                if n % 2 == 0 {
                    writer.append(chain, at(), read(task, n)).await.unwrap();
                } else {
                    writer.enqueue(chain, at(), read(task, n)).await.unwrap();
                }
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    writer.flush().await;
    let mut total = 0;
    for (i, chain) in CHAINS.iter().enumerate() {
        let records = committed(&store, chain).await;
        total += records.len();
        for task in (i..TASKS).step_by(CHAINS.len()) {
            let ns: Vec<u64> = records.iter().filter(|r| r.0 == task as u64).map(|r| r.1).collect();
            assert_eq!(ns, (0..EACH as u64).collect::<Vec<_>>(), "task {task} out of order");
        }
    }
    assert_eq!(total, TASKS * EACH);
    assert_eq!(metrics.records.get(), (TASKS * EACH) as u64);
    // The point of the writer: far fewer commits than records.
    assert!(metrics.commits.get() < (TASKS * EACH / 4) as u64, "{} commits", metrics.commits.get());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_batch_fails_every_waiter_writes_nothing_and_counts_queued_reads() {
    let (store, writer, metrics, _dir) = writer().await;
    writer.append("ten_a", at(), read(0, 0)).await.unwrap();
    // A real failure inside the batch's transaction, from the database itself.
    sqlx::raw_sql(
        "CREATE TRIGGER fail_audit BEFORE INSERT ON audit_events BEGIN SELECT RAISE(ABORT, 'injected'); END;",
    )
    .execute(&store.pool)
    .await
    .unwrap();
    let writer = Arc::new(writer);
    let waiters: Vec<_> = (1..=32)
        .map(|task| {
            let writer = writer.clone();
            tokio::spawn(async move { writer.append("ten_a", at(), read(task, 0)).await })
        })
        .collect();
    writer.enqueue("ten_a", at(), read(99, 0)).await.unwrap();
    for w in waiters {
        let err = w.await.unwrap().unwrap_err();
        assert!(matches!(err, AuditAppendError::BatchFailed(_)), "{err}");
        assert!(err.to_string().contains("injected"), "{err}");
    }
    writer.flush().await;
    assert_eq!(metrics.queued_records_lost.get(), 1);
    // Nothing of the failed batches was written, and the chain still verifies.
    assert_eq!(committed(&store, "ten_a").await, vec![(0, 0)]);
    sqlx::raw_sql("DROP TRIGGER fail_audit").execute(&store.pool).await.unwrap();
    writer.append("ten_a", at(), read(1, 1)).await.unwrap();
    assert_eq!(committed(&store, "ten_a").await, vec![(0, 0), (1, 1)]);
}

#[tokio::test]
async fn a_writer_that_stopped_refuses_rather_than_drops() {
    let (_store, writer, _metrics, _dir) = writer().await;
    let (tx, rx) = mpsc::channel(1);
    drop(rx);
    let stopped = AuditWriter { tx };
    assert!(matches!(stopped.append("ten_a", at(), read(0, 0)).await, Err(AuditAppendError::Stopped)));
    assert!(matches!(stopped.enqueue("ten_a", at(), read(0, 0)).await, Err(AuditAppendError::Stopped)));
    writer.append("ten_a", at(), read(0, 0)).await.unwrap();
}

#[tokio::test]
async fn repeated_routine_reads_in_a_batch_become_one_record_that_counts_them_and_durable_ones_never_do() {
    let (store, writer, metrics, _dir) = writer().await;
    let writer = Arc::new(writer);
    // Queued before the writer runs (one thread): one batch.
    for _ in 0..10 {
        writer.enqueue("ten_a", at(), read(7, 7)).await.unwrap();
    }
    writer.enqueue("ten_a", at(), read(8, 8)).await.unwrap();
    writer.enqueue("ten_b", at(), read(7, 7)).await.unwrap();
    let durable: Vec<_> = (0..3)
        .map(|_| {
            let writer = writer.clone();
            tokio::spawn(async move { writer.append("ten_a", at(), read(9, 9)).await })
        })
        .collect();
    for d in durable {
        d.await.unwrap().unwrap();
    }
    writer.flush().await;
    let a = store.audit_records("ten_a").await.unwrap();
    let details: Vec<serde_json::Value> = a.into_iter().map(|r| r.unwrap().event.detail).collect();
    assert_eq!(details[0], serde_json::json!({ "task": 7, "n": 7, "repeated": 10 }));
    assert_eq!(details[1], serde_json::json!({ "task": 8, "n": 8 }));
    assert_eq!(details.iter().filter(|d| **d == serde_json::json!({ "task": 9, "n": 9 })).count(), 3);
    assert_eq!(details.len(), 5);
    // Another chain's identical read is its own record.
    assert_eq!(committed(&store, "ten_b").await, vec![(7, 7)]);
    assert_eq!(metrics.queued_records_lost.get(), 0);
}
