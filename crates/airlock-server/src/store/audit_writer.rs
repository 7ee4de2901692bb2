//! Group commit for audit records that have no state change to commit with them: reads, refusals and no-op pushes.
//!
//! Callers queue `(chain, time, event)`; one task takes whatever has queued up (at most [`MAX_BATCH`]), appends it in queue order in one [`WriteTx`], and commits once: one fsync for the whole batch.
//! Each chain's run in a batch costs a few statements, not three per record (`WriteTx::audit_run`); like [`WriteTx::audit`] it appends only after a head whose MAC checks out, and MACs the head it leaves.
//! [`AuditWriter::append`] answers only once its own record's batch has committed, so nothing acknowledged is lost; a batch that fails fails every waiter in it, and none of its records is written.
//! [`AuditWriter::enqueue`] returns once the record is queued (routine reads, see `api::ReadAudit`; repeats of one read within a batch become one record that counts them, `RepeatedReads`): a crash can lose at most the records not yet committed, and a failed batch counts its queued records in `airlock_audit_queued_records_lost_total` and logs them.
//! Order: the writer appends under the store's write lock, like every mutation, so a chain is strictly ordered; records are appended in queue order within each chain, so by the time an append is acknowledged, everything queued before it was committed (or, in a failed batch, refused and counted).
//! Back-pressure: the queue holds [`QUEUE_CAPACITY`] records; a caller finding it full waits for room, so the queue never grows without bound (anonymous refusals are rate limited before they get here, `state::RefusalLimiter`).

use std::sync::Arc;

use airlock_core::Timestamp;
use airlock_core::audit::{Event, Record};
use tokio::sync::{mpsc, oneshot};

use super::{Store, StoreError, WriteTx};
use crate::metrics::AuditMetrics;

/// At most this many records share one transaction.
pub(crate) const MAX_BATCH: usize = 4096;
/// Records queued and not yet taken by the writer; a full queue makes callers wait.
pub(crate) const QUEUE_CAPACITY: usize = 4 * MAX_BATCH;

/// Why a record was not made durable.
#[derive(Clone, Debug, thiserror::Error)]
pub enum AuditAppendError {
    /// The batch's transaction failed; nothing in it was written.
    #[error("the audit batch failed to commit: {0}")]
    BatchFailed(Arc<str>),
    /// The writer task is gone (the server is stopping).
    #[error("the audit writer has stopped")]
    Stopped,
}

type Ack = oneshot::Sender<Result<(), AuditAppendError>>;

// An append is the message sent on every audited read; boxing its event would cost an allocation each, to shrink
// the rare `Flush`. (serde_json's `preserve_order`, which Cedar turns on, makes `Event` larger.)
#[allow(clippy::large_enum_variant)]
enum Msg {
    Append {
        chain: String,
        at: Timestamp,
        event: Event,
        ack: Option<Ack>,
    },
    /// Answered once everything queued before it is committed or failed.
    Flush(oneshot::Sender<()>),
}

/// The queue into the one audit writer task. Cheap to share behind the application state.
#[derive(Debug)]
pub struct AuditWriter {
    tx: mpsc::Sender<Msg>,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Msg::Append { .. } => "Append",
            Msg::Flush(_) => "Flush",
        })
    }
}

impl AuditWriter {
    /// Starts the writer task over `store`. It ends when the last `AuditWriter` is dropped.
    pub fn spawn(store: Arc<Store>, metrics: AuditMetrics) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        tokio::spawn(run(store, rx, metrics));
        Self { tx }
    }

    /// Appends `event` to `chain` and returns once it is durable (committed with its batch).
    pub async fn append(&self, chain: &str, at: Timestamp, event: Event) -> Result<(), AuditAppendError> {
        let (ack, done) = oneshot::channel();
        let msg = Msg::Append { chain: chain.to_owned(), at, event, ack: Some(ack) };
        self.tx.send(msg).await.map_err(|_| AuditAppendError::Stopped)?;
        done.await.unwrap_or(Err(AuditAppendError::Stopped))
    }

    /// Queues `event` for `chain` and returns without waiting for the commit. The error says
    /// the record could not be queued (the writer stopped); the caller logs and counts it.
    pub async fn enqueue(&self, chain: &str, at: Timestamp, event: Event) -> Result<(), AuditAppendError> {
        let msg = Msg::Append { chain: chain.to_owned(), at, event, ack: None };
        self.tx.send(msg).await.map_err(|_| AuditAppendError::Stopped)
    }

    /// Returns once everything queued before this call is committed (or failed and counted).
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Msg::Flush(done)).await.is_ok() {
            let _ = wait.await;
        }
    }
}

/// How long a batch of routine reads only waits for more before it commits: a steady stream of
/// reads then costs a commit (and an fsync) every few milliseconds, not one per read. A durable
/// append or a flush arriving meanwhile ends the wait at once.
const ROUTINE_LINGER: std::time::Duration = std::time::Duration::from_millis(5);

async fn run(store: Arc<Store>, mut rx: mpsc::Receiver<Msg>, metrics: AuditMetrics) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let routine = |msgs: &[Msg]| msgs.iter().all(|m| matches!(m, Msg::Append { ack: None, .. }));
        if routine(&batch) {
            let deadline = tokio::time::Instant::now() + ROUTINE_LINGER;
            while batch.len() < MAX_BATCH {
                let before = batch.len();
                // `recv_many` is cancel safe: a timeout loses no message.
                match tokio::time::timeout_at(deadline, rx.recv_many(&mut batch, MAX_BATCH - before)).await {
                    Ok(n) if n > 0 && routine(&batch[before..]) => {}
                    _ => break,
                }
            }
        }
        commit_batch(&store, batch.drain(..), &metrics).await;
    }
}

/// Writes one batch in one transaction and answers everyone in it with the same outcome.
async fn commit_batch(store: &Store, batch: impl Iterator<Item = Msg>, metrics: &AuditMetrics) {
    let mut records = Vec::new();
    let mut waiters = Vec::new();
    let mut flushes = Vec::new();
    let mut queued = 0_u64;
    let mut reads = RepeatedReads::default();
    for msg in batch {
        match msg {
            Msg::Append { chain, at, event, ack: Some(ack) } => {
                records.push((chain, at, event));
                waiters.push(ack);
            }
            Msg::Append { chain, at, event, ack: None } => {
                queued += 1;
                reads.push(&mut records, chain, at, event);
            }
            Msg::Flush(f) => flushes.push(f),
        }
    }
    reads.finish(&mut records);
    let count = records.len();
    let outcome = if records.is_empty() {
        Ok(())
    } else {
        match write(store, records).await {
            Ok(()) => {
                metrics.commits.inc();
                metrics.records.inc_by(count as u64);
                Ok(())
            }
            Err(e) => {
                metrics.queued_records_lost.inc_by(queued);
                tracing::error!(error = %e, records = count, waiting = waiters.len(), queued_lost = queued,
                    "audit batch failed: its waiting requests are refused and its queued read records are lost");
                Err(AuditAppendError::BatchFailed(e.to_string().into()))
            }
        }
    };
    for w in waiters {
        // A waiter that went away (its request was cancelled) needs no answer.
        let _ = w.send(outcome.clone());
    }
    for f in flushes {
        let _ = f.send(());
    }
}

/// Routine reads ([`AuditWriter::enqueue`]) that repeat one another within a batch (the same
/// chain, actor, action, target, outcome and detail: a dashboard polling a list) become one
/// record, at the first one's place and time, whose detail says how many it stands for
/// (`"repeated": n`). Durable reads ([`AuditWriter::append`]) are never folded: each is its own.
#[derive(Default)]
struct RepeatedReads {
    /// Each distinct read's place in the batch's records, and how many times it came.
    seen: std::collections::HashMap<(String, String), (usize, u64)>,
}

impl RepeatedReads {
    fn push(&mut self, records: &mut Vec<(String, Timestamp, Event)>, chain: String, at: Timestamp, event: Event) {
        let Ok(key) = serde_json::to_string(&event) else {
            records.push((chain, at, event));
            return;
        };
        match self.seen.entry((chain, key)) {
            std::collections::hash_map::Entry::Occupied(mut e) => e.get_mut().1 += 1,
            std::collections::hash_map::Entry::Vacant(e) => {
                let chain = e.key().0.clone();
                e.insert((records.len(), 1));
                records.push((chain, at, event));
            }
        }
    }

    fn finish(self, records: &mut [(String, Timestamp, Event)]) {
        for (place, count) in self.seen.into_values() {
            if count < 2 {
                continue;
            }
            let detail = &mut records[place].2.detail;
            match detail {
                serde_json::Value::Object(map) => {
                    map.insert("repeated".into(), count.into());
                }
                serde_json::Value::Null => *detail = serde_json::json!({ "repeated": count }),
                other => {
                    let inner = std::mem::take(other);
                    *other = serde_json::json!({ "detail": inner, "repeated": count });
                }
            }
        }
    }
}

async fn write(store: &Store, records: Vec<(String, Timestamp, Event)>) -> Result<(), StoreError> {
    let mut tx: WriteTx<'_> = store.write().await?;
    for (chain, run) in by_chain(records) {
        tx.audit_run(&chain, run).await?;
    }
    tx.commit_audit_only().await
}

/// The batch split by chain, each chain's records in queue order, chains in order of first
/// appearance. Chains are independent, so only the order within each one matters.
fn by_chain(records: Vec<(String, Timestamp, Event)>) -> Vec<(String, Vec<(Timestamp, Event)>)> {
    let mut index = std::collections::HashMap::new();
    let mut runs: Vec<(String, Vec<(Timestamp, Event)>)> = Vec::new();
    for (chain, at, event) in records {
        let i = *index.entry(chain.clone()).or_insert_with(|| {
            runs.push((chain, Vec::new()));
            runs.len() - 1
        });
        runs[i].1.push((at, event));
    }
    runs
}

/// Rows per multi-row INSERT: 4 parameters each, far below SQLite's limit of 32,766.
const INSERT_ROWS: usize = 512;

impl WriteTx<'_> {
    /// Appends `events` to `chain` in order in this transaction, as a run (see
    /// [`Self::audit_run`]): a batch of requests committed together, one record each.
    pub async fn audit_all(&mut self, chain: &str, at: Timestamp, events: Vec<Event>) -> Result<(), StoreError> {
        self.audit_run(chain, events.into_iter().map(|e| (at, e)).collect()).await
    }

    /// Appends a run of records to one chain in this transaction, with a few statements for the
    /// whole run rather than three per record (each statement is a round trip to SQLite's
    /// worker thread, which is what bounds a batch).
    ///
    /// The run is chained in memory from the head ([`WriteTx::audit_head_for_append`], which
    /// checks its MAC, as [`WriteTx::audit`] does), inserted together, and the head moved past it
    /// once ([`WriteTx::put_head`], MAC'd); the transaction commits all of it or none.
    async fn audit_run(&mut self, chain: &str, run: Vec<(Timestamp, Event)>) -> Result<(), StoreError> {
        let Some(last_at) = run.last().map(|(at, _)| *at) else { return Ok(()) };
        let mut head = self.audit_head_for_append(chain).await?;
        let records: Vec<Record> = run
            .into_iter()
            .map(|(at, event)| {
                let record = Record::append(chain, head, at, event);
                head = record.head();
                record
            })
            .collect();
        let rows = records
            .iter()
            .map(|r| {
                let seq = i64::try_from(r.seq).map_err(|_| StoreError::Corrupt("audit seq overflow".into()))?;
                let json = serde_json::to_string(r).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                Ok((seq, r.at.unix_millis(), json))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        for chunk in rows.chunks(INSERT_ROWS) {
            let mut insert = sqlx::QueryBuilder::new("INSERT INTO audit_events (chain, seq, at, record) ");
            insert.push_values(chunk, |mut row, (seq, at, json)| {
                row.push_bind(chain).push_bind(*seq).push_bind(*at).push_bind(json.as_str());
            });
            insert.build().execute(&mut *self.tx).await?;
        }
        self.put_head(chain, head, last_at).await
    }
}

#[cfg(test)]
mod tests;
