//! Last-seen bookkeeping, batched.
//!
//! When a stream ends, the appliance's version and last heartbeat go to the database.
//! Doing that as one durable transaction per stream would make a mass disconnect (a control plane restart, a network partition) a queue of thousands of fsyncs.
//! Here one task drains whatever has queued up into a single transaction, and falls back to one at a time if the batch fails.
//! Shutdown waits for the session tasks to finish and flushes the writer before the store closes, so nothing queued is lost.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use airlock_core::{ApplianceId, Timestamp};
use tokio::sync::{mpsc, oneshot};

use crate::authz::TenantScope;
use crate::store::Store;

const MAX_BATCH: usize = 2048;

pub struct SeenUpdate {
    pub scope: TenantScope,
    pub appliance: ApplianceId,
    pub version: String,
    pub at: Timestamp,
}

enum Msg {
    Update(SeenUpdate),
    Flush(oneshot::Sender<()>),
}

#[derive(Debug)]
pub struct SeenWriter {
    tx: mpsc::UnboundedSender<Msg>,
    /// Session tasks that may still send an update; shutdown waits for zero.
    sessions: Arc<AtomicUsize>,
}

/// Held by a session task; dropping it tells shutdown the task can no longer send an update.
pub struct SessionGuard(Arc<AtomicUsize>);

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl SeenWriter {
    pub fn spawn(store: Arc<Store>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(store, rx));
        Self { tx, sessions: Arc::new(AtomicUsize::new(0)) }
    }

    pub fn session(&self) -> SessionGuard {
        self.sessions.fetch_add(1, Ordering::AcqRel);
        SessionGuard(self.sessions.clone())
    }

    pub fn live_sessions(&self) -> usize {
        self.sessions.load(Ordering::Acquire)
    }

    pub fn record(&self, update: SeenUpdate) {
        if self.tx.send(Msg::Update(update)).is_err() {
            tracing::error!("last-seen writer stopped; an update was dropped");
        }
    }

    /// Returns once everything queued before this call is committed (or failed and logged).
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Msg::Flush(done)).is_ok() {
            let _ = wait.await;
        }
    }
}

async fn run(store: Arc<Store>, mut rx: mpsc::UnboundedReceiver<Msg>) {
    while let Some(first) = rx.recv().await {
        let mut updates = Vec::new();
        let mut flushes = Vec::new();
        let mut next = Some(first);
        while let Some(msg) = next {
            match msg {
                Msg::Update(u) => updates.push(u),
                Msg::Flush(f) => flushes.push(f),
            }
            next = if updates.len() < MAX_BATCH { rx.try_recv().ok() } else { None };
        }
        if !updates.is_empty()
            && let Err(e) = write(&store, &updates).await
        {
            // One bad update must not cost the whole batch: fall back to one at a time.
            tracing::warn!(error = %e, count = updates.len(), "batched last-seen write failed; retrying one by one");
            for u in updates.chunks(1) {
                if let Err(e) = write(&store, u).await {
                    tracing::error!(error = %e, appliance = %u[0].appliance, "cannot record last-seen");
                }
            }
        }
        for f in flushes {
            let _ = f.send(());
        }
    }
}

async fn write(store: &Store, updates: &[SeenUpdate]) -> Result<(), crate::store::StoreError> {
    let mut tx = store.write().await?;
    for u in updates {
        tx.record_seen(&u.scope, u.appliance, &u.version, u.at).await?;
    }
    tx.commit().await
}
