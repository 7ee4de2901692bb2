//! The audit chains: appending in a write transaction, reading back, and verifying.

use airlock_core::Timestamp;
use airlock_core::audit::checkpoint::{self, Checkpoint};
use airlock_core::audit::{self, ChainHash, EpochHead, Event, Head, Record};
use airlock_core::customer_key::CustomerPublicKey;
use sqlx::Row;

use super::{Store, StoreError, WriteTx};
use crate::state::SYSTEM_CHAIN;

impl Store {
    /// The names of all audit chains: every tenant has one (created with the tenant), plus any
    /// chain that has records or a head. Deriving the list from `tenants` too means deleting
    /// a chain's rows and head does not make it vanish from verification.
    pub async fn audit_chains(&self) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query(
            "SELECT id AS chain FROM tenants UNION SELECT chain FROM audit_events UNION SELECT chain FROM audit_heads UNION SELECT chain FROM audit_anchors ORDER BY chain",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| Ok(r.try_get("chain")?)).collect()
    }

    /// One chain's records in stored order. A row whose JSON does not parse is reported as an
    /// edit of that sequence number.
    pub async fn audit_records(&self, chain: &str) -> Result<Vec<Result<Record, i64>>, StoreError> {
        let rows = sqlx::query("SELECT seq, record FROM audit_events WHERE chain = $1 ORDER BY seq")
            .bind(chain)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                let seq: i64 = r.try_get("seq")?;
                let text: String = r.try_get("record")?;
                // The stored text must be exactly the canonical encoding of what it parses to:
                // otherwise fields could be added that verification (which re-encodes) ignores.
                let parsed = serde_json::from_str::<Record>(&text)
                    .ok()
                    .filter(|rec| serde_json::to_string(rec).is_ok_and(|canon| canon == text));
                Ok(parsed.ok_or(seq))
            })
            .collect()
    }

    /// The head the writer recorded, if its MAC checks out (or unchecked, without `check_mac`).
    pub async fn audit_head(
        &self,
        chain: &str,
        check_mac: bool,
    ) -> Result<Option<Result<Head, HeadTampered>>, StoreError> {
        let row = sqlx::query("SELECT seq, hash, mac, epoch, at FROM audit_heads WHERE chain = $1")
            .bind(chain)
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let seq: i64 = row.try_get("seq")?;
        let hash: String = row.try_get("hash")?;
        let mac: String = row.try_get("mac")?;
        let epoch: i64 = row.try_get("epoch")?;
        let at: i64 = row.try_get("at")?;
        let (Some(hash), Ok(seq), Ok(epoch)) = (ChainHash::from_hex(&hash), u64::try_from(seq), u64::try_from(epoch))
        else {
            return Ok(Some(Err(HeadTampered)));
        };
        let head = Head { seq, hash };
        if !check_mac {
            return Ok(Some(Ok(head)));
        }
        let Ok(mac) = data_encoding::HEXLOWER.decode(mac.as_bytes()) else { return Ok(Some(Err(HeadTampered))) };
        let ok = if epoch == 0 {
            // A head MAC'd the old way (no epoch, no time) is only believed in a store that has
            // not been opened by this version: opening upgrades every head and makes the audit
            // key, so afterwards an epoch-0 head was put back from an older copy.
            self.load_audit_key().await?.is_none() && head.mac_verifies(&self.head_mac, chain, &mac)
        } else {
            let stamped = EpochHead { head, epoch, at: Timestamp::from_unix_millis(at) };
            stamped.mac_verifies(&self.head_mac, chain, &mac)
        };
        Ok(Some(if ok { Ok(head) } else { Err(HeadTampered) }))
    }

    /// Re-MACs every head still MAC'd the old way (epoch 0) with an epoch and the time of its
    /// last record, if its old MAC verifies; one that does not is left for verification to
    /// report. Runs when a store without an audit key yet opens for writing.
    pub(super) async fn upgrade_head_macs(&self) -> Result<(), StoreError> {
        let mut tx = self.write().await?;
        let rows = sqlx::query(
            "SELECT h.chain, h.seq, h.hash, h.mac, e.at FROM audit_heads h
             LEFT JOIN audit_events e ON e.chain = h.chain AND e.seq = h.seq
             WHERE h.epoch = 0 ORDER BY h.chain",
        )
        .fetch_all(&mut *tx.tx)
        .await?;
        for row in rows {
            let chain: String = row.try_get("chain")?;
            let seq: i64 = row.try_get("seq")?;
            let hash: String = row.try_get("hash")?;
            let mac: String = row.try_get("mac")?;
            let at: Option<i64> = row.try_get("at")?;
            let (Some(hash), Ok(useq), Ok(mac)) =
                (ChainHash::from_hex(&hash), u64::try_from(seq), data_encoding::HEXLOWER.decode(mac.as_bytes()))
            else {
                continue;
            };
            let head = Head { seq: useq, hash };
            if !head.mac_verifies(&self.head_mac, &chain, &mac) {
                tracing::warn!(
                    chain,
                    "an audit head fails its MAC; left as found for `airlock audit verify` to report"
                );
                continue;
            }
            tx.put_head(&chain, head, Timestamp::from_unix_millis(at.unwrap_or(0))).await?;
        }
        tx.commit().await
    }
}

/// The recorded chain head's MAC does not verify: the head row was rewritten.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadTampered;

impl WriteTx<'_> {
    /// Appends `event` to `chain` in this transaction.
    pub async fn audit(&mut self, chain: &str, at: Timestamp, event: Event) -> Result<Record, StoreError> {
        let head = self.audit_head_for_append(chain).await?;
        let record = Record::append(chain, head, at, event);
        let json = serde_json::to_string(&record).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let seq = i64::try_from(record.seq).map_err(|_| StoreError::Corrupt("audit seq overflow".into()))?;
        sqlx::query("INSERT INTO audit_events (chain, seq, at, record) VALUES ($1, $2, $3, $4)")
            .bind(chain)
            .bind(seq)
            .bind(at.unix_millis())
            .bind(json)
            .execute(&mut *self.tx)
            .await?;
        self.put_head(chain, record.head(), at).await?;
        Ok(record)
    }

    /// `chain`'s head, to append after: refused if its MAC fails. Appending over a rewritten head
    /// (records cut off the end, the head pointed back) would re-MAC it and hide the cut.
    pub(super) async fn audit_head_for_append(&mut self, chain: &str) -> Result<Head, StoreError> {
        let row = sqlx::query("SELECT seq, hash, mac, epoch, at FROM audit_heads WHERE chain = $1")
            .bind(chain)
            .fetch_optional(&mut *self.tx)
            .await?;
        let Some(r) = row else { return Ok(Head::EMPTY) };
        let tampered = || {
            StoreError::Corrupt(format!(
                "audit chain {chain}: its recorded head fails its MAC (the store was edited); nothing is appended to it"
            ))
        };
        let (seq, hash, mac, epoch, at): (i64, String, String, i64, i64) =
            (r.try_get("seq")?, r.try_get("hash")?, r.try_get("mac")?, r.try_get("epoch")?, r.try_get("at")?);
        let (Some(hash), Ok(seq), Ok(epoch), Ok(mac)) = (
            ChainHash::from_hex(&hash),
            u64::try_from(seq),
            u64::try_from(epoch),
            data_encoding::HEXLOWER.decode(mac.as_bytes()),
        ) else {
            return Err(tampered());
        };
        let head = Head { seq, hash };
        // Epoch 0 is a head MAC'd the old way: believed only in a store from before epochs (no
        // audit key yet); afterwards it was put back from an older copy, and appending over it
        // would re-MAC the rollback away.
        let ok = if epoch == 0 {
            let has_key: bool =
                sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM audit_key)").fetch_one(&mut *self.tx).await?;
            !has_key && head.mac_verifies(&self.store.head_mac, chain, &mac)
        } else {
            EpochHead { head, epoch, at: Timestamp::from_unix_millis(at) }.mac_verifies(
                &self.store.head_mac,
                chain,
                &mac,
            )
        };
        if ok { Ok(head) } else { Err(tampered()) }
    }

    /// Records `head` as `chain`'s head, MAC'd with the next epoch and `at` ([`EpochHead`]).
    pub(super) async fn put_head(&mut self, chain: &str, head: Head, at: Timestamp) -> Result<(), StoreError> {
        let epoch: i64 = sqlx::query("SELECT COALESCE(MAX(epoch), 0) + 1 AS e FROM audit_heads")
            .fetch_one(&mut *self.tx)
            .await?
            .try_get("e")?;
        let stamped = EpochHead {
            head,
            epoch: u64::try_from(epoch).map_err(|_| StoreError::Corrupt("audit head epoch".into()))?,
            at,
        };
        let mac = stamped.mac(&self.store.head_mac, chain);
        let seq = i64::try_from(head.seq).map_err(|_| StoreError::Corrupt("audit seq overflow".into()))?;
        sqlx::query(
            "INSERT INTO audit_heads (chain, seq, hash, mac, epoch, at) VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (chain) DO UPDATE SET seq = excluded.seq, hash = excluded.hash, mac = excluded.mac,
               epoch = excluded.epoch, at = excluded.at",
        )
        .bind(chain)
        .bind(seq)
        .bind(head.hash.to_hex())
        .bind(data_encoding::HEXLOWER.encode(&mac))
        .bind(epoch)
        .bind(at.unix_millis())
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }
}

/// What verification checks beyond the chains themselves.
#[derive(Debug, Default)]
pub struct VerifyOptions {
    /// Check each recorded head's MAC (needs the KEK). Without it a head row is still compared
    /// with its chain, but a rewritten head row goes unnoticed: give checkpoints.
    pub head_macs: bool,
    /// The audit key's public half: checks the anchors of pruned chains, and the `system`
    /// chain must then exist (the key's creation is its first record).
    pub audit_key: Option<CustomerPublicKey>,
    /// Signed checkpoints (1-based line, checkpoint), in file order, for any chains: each
    /// chain must reach every one of its checkpoints with the checkpointed record.
    pub checkpoints: Vec<(usize, Checkpoint)>,
}

/// Verifies every audit chain the store lists, checking head MACs. Returns per-chain results.
pub async fn verify_all_chains(store: &Store) -> Result<Vec<(String, Result<Head, String>)>, StoreError> {
    verify_all_chains_with(store, &VerifyOptions { head_macs: true, ..VerifyOptions::default() }).await
}

/// Verifies every audit chain in the store: those the store lists, `system` (when there is an
/// audit key), and every chain a checkpoint names. Returns per-chain results.
pub async fn verify_all_chains_with(
    store: &Store,
    options: &VerifyOptions,
) -> Result<Vec<(String, Result<Head, String>)>, StoreError> {
    let mut chains: std::collections::BTreeSet<String> = store.audit_chains().await?.into_iter().collect();
    if options.audit_key.is_some() {
        chains.insert(SYSTEM_CHAIN.to_owned());
    }
    chains.extend(options.checkpoints.iter().map(|(_, cp)| cp.chain.clone()));
    let mut out = Vec::new();
    for chain in chains {
        let result = verify_one(store, &chain, options).await?;
        out.push((chain, result));
    }
    Ok(out)
}

/// How many times a chain's reads are taken again when a running server appended to (or pruned) it meanwhile.
const CONSISTENT_READ_TRIES: usize = 20;

async fn verify_one(store: &Store, chain: &str, options: &VerifyOptions) -> Result<Result<Head, String>, StoreError> {
    // The records, anchor and head are read in separate statements, and a running server may append between them
    // (each append writes its record and the head in one transaction; a prune writes the anchor and deletes records):
    // they are a consistent view only if the head and anchor read after the records are those read before.
    let head_and_anchor = async || -> Result<_, StoreError> {
        Ok((store.audit_head(chain, options.head_macs).await?, store.audit_anchor(chain).await?))
    };
    let mut before = head_and_anchor().await?;
    let mut tries = 1;
    let (rows, (head, anchor_line)) = loop {
        let rows = store.audit_records(chain).await?;
        let after = head_and_anchor().await?;
        if after == before || tries == CONSISTENT_READ_TRIES {
            break (rows, after);
        }
        (before, tries) = (after, tries + 1);
    };
    let mut records = Vec::with_capacity(rows.len());
    for row in rows {
        match row {
            Ok(r) => records.push(r),
            Err(seq) => {
                return Ok(match audit::verify_chain(chain, &records, None) {
                    Err(e) => Err(e.to_string()),
                    Ok(_) => {
                        Err(format!("record seq {seq}: stored record is not in canonical form: the record was edited"))
                    }
                });
            }
        }
    }
    if records.is_empty() && anchor_line.is_none() && head.is_none() {
        return Ok(Err(format!("chain `{chain}` is missing: its records were deleted and its head is missing too")));
    }
    // A pruned chain starts at its anchor: a checkpoint the audit key signed when it pruned.
    let start = match anchor_line {
        None => Head::EMPTY,
        Some(line) => match anchor_head(chain, &line, options.audit_key.as_ref(), &records) {
            Ok(start) => start,
            Err(why) => return Ok(Err(why)),
        },
    };
    let verified = match head {
        Some(Err(HeadTampered)) => Err("the recorded chain head fails its MAC: the head was rewritten".into()),
        Some(Ok(anchor)) => audit::verify_chain_from(chain, start, &records, Some(anchor)).map_err(|e| e.to_string()),
        // Every append writes the head in the same transaction, so a chain without one
        // had its head deleted; without the anchor a re-hashed chain would verify.
        None => Err("the chain's recorded head is missing: it was deleted".into()),
    };
    let Ok(head) = verified else { return Ok(verified) };
    let mine: Vec<(usize, Checkpoint)> =
        options.checkpoints.iter().filter(|(_, cp)| cp.chain == chain).cloned().collect();
    Ok(checkpoint::check_chain_against(start, &records, &mine).map(|_| head).map_err(|e| e.to_string()))
}

/// The start of a pruned chain: its anchor, believed only as what a prune leaves. Any other
/// checkpoint the audit key signed (the server's periodic ones are in a file beside the store)
/// would otherwise let whoever can write the store cut any chain's start and call it pruned.
fn anchor_head(chain: &str, line: &str, key: Option<&CustomerPublicKey>, records: &[Record]) -> Result<Head, String> {
    let key = key.ok_or_else(|| {
        "the chain was pruned, and its anchor cannot be checked without the audit key's public half".to_owned()
    })?;
    let cp = Checkpoint::from_line(line, key).map_err(|why| format!("the anchor of the pruned chain: {why}"))?;
    if cp.chain != chain {
        return Err(format!("the anchor of the pruned chain is for chain `{}`", cp.chain));
    }
    // Only `system` is pruned, and only behind a checkpoint made for the prune.
    if chain != SYSTEM_CHAIN || cp.reason != checkpoint::CheckpointReason::Prune {
        return Err(format!(
            "chain `{chain}` has an anchor that is not a prune's: its records before seq {} were deleted",
            cp.seq
        ));
    }
    // The prune records itself after its anchor, in the records kept.
    let recorded = records.iter().any(|r| {
        r.event.action == audit::AuditAction::AuditPruned.as_str()
            && r.event.detail["through_seq"].as_u64() == Some(cp.seq)
    });
    if !recorded {
        return Err(format!(
            "the anchor at seq {} has no `audit.pruned` record after it: its records were deleted, not pruned",
            cp.seq
        ));
    }
    Ok(Head { seq: cp.seq, hash: cp.hash })
}
