//! The control plane's audit signing key, the checkpoints it signs, and pruning behind them.
//!
//! A MAC'd head lives beside the chains it vouches for, under a key the server holds; whoever
//! can put the whole database back to an older copy, or delete a chain with its head, is not
//! stopped by it. A checkpoint (chain, seq, hash, time) signed with the audit key and kept
//! elsewhere is: `airlock audit verify --checkpoints` checks, with public keys only, that every
//! checkpointed chain still exists and still holds the checkpointed record at its seq.
//!
//! - The key is Ed25519, made at `init` (or at the first start of an older data directory); its
//!   private half is sealed under the KEK in the store, like the CA key, and its public half is
//!   published in `GET /v1/ca` and as `<data-dir>/audit-key.pub`. Making it is the first record
//!   of the `system` chain, so that chain must exist from then on.
//! - Checkpoints use the appliance's format (`airlock_core::audit::checkpoint`): one DSSE line
//!   each. `airlock audit checkpoint` writes them on demand; the server appends them to
//!   `<data-dir>/audit-checkpoints.jsonl` every interval and at shutdown (copy that file off the
//!   host, or run `airlock audit checkpoint --out` to a place the host cannot rewrite).
//! - Records of anonymous refusals on the `system` chain are kept for a retention window: each
//!   interval the older ones are pruned from the start of the chain, behind a signed checkpoint
//!   of the last one pruned, which becomes the chain's anchor (`audit.pruned` records it).

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use airlock_core::Timestamp;
use airlock_core::audit::checkpoint::{Checkpoint, CheckpointReason};
use airlock_core::audit::{AuditAction, Head, Outcome};
use airlock_core::customer_key::{CustomerPublicKey, CustomerSigningKey};
use ring::rand::{SecureRandom, SystemRandom};

use crate::ServerError;
use crate::clock::Clock;
use crate::keys::{Kek, KeyError};
use crate::state::{SYSTEM_CHAIN, event};
use crate::store::{AUDIT_KEY_FILE_NAME, CHECKPOINT_FILE_NAME, Pruned, Store, StoreError, StoredAuditKey};

const AUDIT_KEY_AAD: &[u8] = b"airlock audit signing key v1";
/// The server's checkpoint file is moved aside (to `….1`, replacing the one before) past this
/// size, so it cannot grow without bound; a newer checkpoint covers every older one of its chain.
const CHECKPOINT_FILE_MAX_BYTES: u64 = 64 << 20;

/// When the server checkpoints and prunes on its own.
#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    pub interval: Duration,
    /// Anonymous refusal records (the `system` chain) older than this are pruned.
    pub retention: Duration,
    /// And beyond this many, the oldest are pruned whatever their age: the refusal limiter lets
    /// through at most 20 a second per action, so a window alone would bound the chain only at
    /// tens of millions of records.
    pub max_records: u64,
}

impl Default for Schedule {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(3600),
            retention: Duration::from_secs(30 * 86_400),
            max_records: 1_000_000,
        }
    }
}

/// The audit signing key, unsealed.
pub struct AuditSigner {
    key: CustomerSigningKey,
    public_pem: String,
}

impl std::fmt::Debug for AuditSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditSigner").field("key_id", &self.key.public().key_id()).finish_non_exhaustive()
    }
}

impl AuditSigner {
    /// Loads the audit key from the store, or makes it and records that on the `system` chain.
    pub async fn load_or_create(store: &Store, kek: &Kek, now: Timestamp) -> Result<Self, ServerError> {
        if let Some(stored) = store.load_audit_key().await? {
            return Self::unseal(&stored, kek);
        }
        let mut seed = [0u8; 32];
        SystemRandom::new().fill(&mut seed).map_err(|_| KeyError::Random)?;
        let key = CustomerSigningKey::from_seed(seed);
        let public_pem = pem(key.public().to_pem())?;
        let key_sealed = kek.seal(pem(key.to_pem())?.as_bytes(), AUDIT_KEY_AAD)?;
        let mut tx = store.write().await?;
        tx.put_audit_key(&StoredAuditKey { public_pem: public_pem.clone(), key_sealed }, now).await?;
        let mut ev = event("system", AuditAction::AuditKeyCreate, Outcome::Success);
        ev.detail = serde_json::json!({ "key_id": key.public().key_id() });
        tx.audit(SYSTEM_CHAIN, now, ev).await?;
        tx.commit().await?;
        Ok(Self { key, public_pem })
    }

    /// The stored key, for the operator's tooling (`airlock audit checkpoint`).
    pub async fn load(store: &Store, kek: &Kek) -> Result<Self, ServerError> {
        let stored = store.load_audit_key().await?.ok_or_else(|| {
            ServerError::Config("the database holds no audit key yet; start the server once to make it".into())
        })?;
        Self::unseal(&stored, kek)
    }

    fn unseal(stored: &StoredAuditKey, kek: &Kek) -> Result<Self, ServerError> {
        let key_pem = String::from_utf8(kek.open(&stored.key_sealed, AUDIT_KEY_AAD)?)
            .map_err(|_| ServerError::Config("the stored audit key is not PEM".into()))?;
        let key = CustomerSigningKey::from_pem(&key_pem)
            .map_err(|e| ServerError::Config(format!("the stored audit key does not load: {e}")))?;
        let public_pem = pem(key.public().to_pem())?;
        if public_pem.trim() != stored.public_pem.trim() {
            return Err(ServerError::Config("the stored audit key's public half is not its own".into()));
        }
        Ok(Self { key, public_pem })
    }

    pub fn public_pem(&self) -> &str {
        &self.public_pem
    }

    pub fn public(&self) -> CustomerPublicKey {
        self.key.public()
    }

    /// Writes the public half to `<data-dir>/audit-key.pub` (replaced whole, world-readable).
    pub fn publish(&self, data_dir: &Path) -> Result<(), ServerError> {
        let path = data_dir.join(AUDIT_KEY_FILE_NAME);
        let tmp = data_dir.join(format!("{AUDIT_KEY_FILE_NAME}.tmp"));
        std::fs::write(&tmp, self.public_pem.as_bytes())
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|source| ServerError::DataDir { path, source })
    }

    pub fn sign(&self, chain: &str, head: Head, at: Timestamp, reason: CheckpointReason) -> String {
        Checkpoint::new(chain, head, at, reason).signed_line(&self.key)
    }

    /// One signed checkpoint line for every chain's current head.
    pub async fn checkpoint_all(
        &self,
        store: &Store,
        at: Timestamp,
        reason: CheckpointReason,
    ) -> Result<Vec<String>, StoreError> {
        let heads = store.audit_heads_now().await?;
        Ok(heads.into_iter().map(|(chain, head)| self.sign(&chain, head, at, reason)).collect())
    }

    /// Prunes `chain`'s records written before `cutoff` (and the oldest beyond `keep_at_most`),
    /// behind a signed checkpoint of the last one pruned, and records the prune on the chain
    /// itself (`audit.pruned`).
    pub async fn prune(
        &self,
        store: &Store,
        chain: &str,
        cutoff: Timestamp,
        keep_at_most: u64,
        now: Timestamp,
    ) -> Result<Option<Pruned>, StoreError> {
        let start = match store.audit_anchor(chain).await? {
            None => Head::EMPTY,
            Some(line) => {
                let cp = Checkpoint::from_line(&line, &self.public())
                    .map_err(|why| StoreError::Corrupt(format!("the anchor of audit chain {chain}: {why}")))?;
                Head { seq: cp.seq, hash: cp.hash }
            }
        };
        let mut tx = store.write().await?;
        let sign = |head: Head| self.sign(chain, head, now, CheckpointReason::Prune);
        let Some(pruned) = tx.prune_audit_before(chain, cutoff, keep_at_most, start, sign).await? else {
            return Ok(None);
        };
        let mut ev = event("system", AuditAction::AuditPruned, Outcome::Success);
        ev.detail = serde_json::json!({
            "through_seq": pruned.through.seq,
            "records": pruned.records,
            "before": cutoff,
        });
        tx.audit(chain, now, ev).await?;
        tx.commit().await?;
        Ok(Some(pruned))
    }
}

fn pem(r: Result<String, airlock_core::customer_key::KeyError>) -> Result<String, ServerError> {
    r.map_err(|e| ServerError::Config(format!("cannot encode the audit key: {e}")))
}

/// Appends `lines` to the checkpoint file and syncs it; moves a full file aside first.
pub fn append_lines(path: &Path, lines: &[String]) -> std::io::Result<()> {
    if std::fs::metadata(path).is_ok_and(|m| m.len() > CHECKPOINT_FILE_MAX_BYTES) {
        let mut aside = path.as_os_str().to_owned();
        aside.push(".1");
        std::fs::rename(path, aside)?;
    }
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    let mut text = String::new();
    for line in lines {
        text.push_str(line);
        text.push('\n');
    }
    file.write_all(text.as_bytes())?;
    file.sync_all()
}

/// One round of the server's own schedule: prune the `system` chain past its retention, then
/// checkpoint every chain to `<data-dir>/audit-checkpoints.jsonl`. Failures are logged: the
/// next round tries again.
pub async fn round(
    store: &Store,
    signer: &AuditSigner,
    clock: &dyn Clock,
    data_dir: &Path,
    schedule: &Schedule,
    reason: CheckpointReason,
) {
    let now = clock.now();
    let path = data_dir.join(CHECKPOINT_FILE_NAME);
    if reason == CheckpointReason::Periodic {
        let retention_ms = i64::try_from(schedule.retention.as_millis()).unwrap_or(i64::MAX);
        let cutoff = Timestamp::from_unix_millis(now.unix_millis().saturating_sub(retention_ms));
        match signer.prune(store, SYSTEM_CHAIN, cutoff, schedule.max_records, now).await {
            Ok(None) => {}
            // The prune's own checkpoint stays in the store as the chain's anchor, not in the
            // file: it is usually behind the chain's last checkpoint there (it ends before the
            // records kept), and a file's checkpoints of one chain only ever go forward.
            Ok(Some(pruned)) => {
                tracing::info!(
                    chain = SYSTEM_CHAIN,
                    records = pruned.records,
                    through_seq = pruned.through.seq,
                    "pruned audit records past their retention"
                );
            }
            Err(e) => tracing::error!(error = %e, chain = SYSTEM_CHAIN, "cannot prune the audit chain"),
        }
    }
    match signer.checkpoint_all(store, now, reason).await {
        Ok(lines) => {
            if let Err(e) = append_lines(&path, &lines) {
                tracing::error!(error = %e, path = %path.display(), "cannot write audit checkpoints");
            }
        }
        Err(e) => tracing::error!(error = %e, "cannot read the audit heads to checkpoint them"),
    }
}

/// Runs [`round`] every `schedule.interval` until `stop` turns true.
pub async fn run(
    store: Arc<Store>,
    signer: Arc<AuditSigner>,
    clock: Arc<dyn Clock>,
    data_dir: std::path::PathBuf,
    schedule: Schedule,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut ticks = tokio::time::interval(schedule.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {
                round(&store, &signer, clock.as_ref(), &data_dir, &schedule, CheckpointReason::Periodic).await;
            }
            _ = stop.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests;
