//! Rows behind the audit's signed checkpoints: the audit signing key, and the anchor where a
//! pruned chain now starts.
//!
//! The mechanism itself (making and unsealing the key, writing checkpoints, deciding when to
//! prune) lives in [`crate::audit_checkpoints`]; this file only reads and writes rows.

use airlock_core::Timestamp;
use airlock_core::audit::{self, Head, Record};
use sqlx::Row;

use super::{Store, StoreError, WriteTx};

/// The audit key's public half in the data directory, beside the database.
pub const AUDIT_KEY_FILE_NAME: &str = "audit-key.pub";
/// Where the server appends its own checkpoints, one signed line each.
pub const CHECKPOINT_FILE_NAME: &str = "audit-checkpoints.jsonl";

/// The audit signing key as stored: the public half in the clear, the private half sealed.
pub struct StoredAuditKey {
    pub public_pem: String,
    pub key_sealed: Vec<u8>,
}

/// What a prune removed, and the head it left as the chain's new start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pruned {
    pub through: Head,
    pub records: u64,
    /// The signed checkpoint of `through`, kept as the chain's anchor.
    pub checkpoint_line: String,
}

impl Store {
    pub async fn load_audit_key(&self) -> Result<Option<StoredAuditKey>, StoreError> {
        let row =
            sqlx::query("SELECT public_pem, key_sealed FROM audit_key WHERE id = 1").fetch_optional(&self.pool).await?;
        row.map(|r| Ok(StoredAuditKey { public_pem: r.try_get("public_pem")?, key_sealed: r.try_get("key_sealed")? }))
            .transpose()
    }

    /// The signed checkpoint line a pruned chain starts from, if it was pruned.
    pub async fn audit_anchor(&self, chain: &str) -> Result<Option<String>, StoreError> {
        let row = sqlx::query("SELECT checkpoint FROM audit_anchors WHERE chain = $1")
            .bind(chain)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| Ok(r.try_get("checkpoint")?)).transpose()
    }

    /// Every chain's recorded head as it is now, each checked against its MAC: a checkpoint
    /// signed over a rewritten head would vouch for whatever was cut off behind it.
    pub async fn audit_heads_now(&self) -> Result<Vec<(String, Head)>, StoreError> {
        let chains: Vec<String> =
            sqlx::query_scalar("SELECT chain FROM audit_heads ORDER BY chain").fetch_all(&self.pool).await?;
        let mut heads = Vec::with_capacity(chains.len());
        for chain in chains {
            match self.audit_head(&chain, true).await? {
                Some(Ok(head)) => heads.push((chain, head)),
                Some(Err(super::HeadTampered)) => {
                    return Err(StoreError::Corrupt(format!(
                        "audit chain {chain}: its recorded head fails its MAC (the store was edited); no checkpoint is signed"
                    )));
                }
                None => {}
            }
        }
        Ok(heads)
    }
}

impl WriteTx<'_> {
    pub async fn put_audit_key(&mut self, key: &StoredAuditKey, now: Timestamp) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO audit_key (id, public_pem, key_sealed, created_at) VALUES (1, $1, $2, $3)")
            .bind(&key.public_pem)
            .bind(&key.key_sealed)
            .bind(now.unix_millis())
            .execute(&mut *self.tx)
            .await?;
        Ok(())
    }

    /// Removes the records at the start of `chain` written before `cutoff` (up to the first one
    /// at or after it), and any beyond the newest `keep_at_most`, once `sign` has made the
    /// checkpoint of the last one removed; that checkpoint becomes the chain's anchor. The
    /// records removed are verified first (from the previous anchor, `start`), so a prune never
    /// launders an edit. `None`: nothing to prune.
    pub async fn prune_audit_before(
        &mut self,
        chain: &str,
        cutoff: Timestamp,
        keep_at_most: u64,
        start: Head,
        sign: impl FnOnce(Head) -> String,
    ) -> Result<Option<Pruned>, StoreError> {
        let first_kept: Option<i64> =
            sqlx::query("SELECT MIN(seq) AS s FROM audit_events WHERE chain = $1 AND at >= $2")
                .bind(chain)
                .bind(cutoff.unix_millis())
                .fetch_one(&mut *self.tx)
                .await?
                .try_get("s")?;
        let last: Option<i64> = sqlx::query("SELECT MAX(seq) AS s FROM audit_events WHERE chain = $1")
            .bind(chain)
            .fetch_one(&mut *self.tx)
            .await?
            .try_get("s")?;
        let Some(last) = last else { return Ok(None) };
        let by_time = first_kept.map_or(last, |kept| kept - 1);
        let by_count = last.saturating_sub(i64::try_from(keep_at_most).unwrap_or(i64::MAX));
        let through = by_time.max(by_count);
        let rows = sqlx::query("SELECT record FROM audit_events WHERE chain = $1 AND seq <= $2 ORDER BY seq")
            .bind(chain)
            .bind(through)
            .fetch_all(&mut *self.tx)
            .await?;
        if rows.is_empty() {
            return Ok(None);
        }
        let records = rows
            .iter()
            .map(|r| {
                let text: String = r.try_get("record")?;
                serde_json::from_str::<Record>(&text)
                    .map_err(|_| StoreError::Corrupt(format!("audit chain {chain}: a record to prune does not parse")))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        let through = audit::verify_chain_from(chain, start, &records, None).map_err(|e| {
            StoreError::Corrupt(format!("audit chain {chain} does not verify, so it is not pruned: {e}"))
        })?;
        let checkpoint_line = sign(through);
        let seq = i64::try_from(through.seq).map_err(|_| StoreError::Corrupt("audit seq overflow".into()))?;
        sqlx::query(
            "INSERT INTO audit_anchors (chain, seq, hash, checkpoint) VALUES ($1, $2, $3, $4)
             ON CONFLICT (chain) DO UPDATE SET seq = excluded.seq, hash = excluded.hash, checkpoint = excluded.checkpoint",
        )
        .bind(chain)
        .bind(seq)
        .bind(through.hash.to_hex())
        .bind(&checkpoint_line)
        .execute(&mut *self.tx)
        .await?;
        let deleted = sqlx::query("DELETE FROM audit_events WHERE chain = $1 AND seq <= $2")
            .bind(chain)
            .bind(seq)
            .execute(&mut *self.tx)
            .await?
            .rows_affected();
        Ok(Some(Pruned { through, records: deleted, checkpoint_line }))
    }
}
