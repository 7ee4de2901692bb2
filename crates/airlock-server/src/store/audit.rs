//! The audit chains: appending in a write transaction, reading back, and verifying.

use airlock_core::Timestamp;
use airlock_core::audit::{self, ChainHash, Event, Head, Record};
use sqlx::Row;

use super::{Store, StoreError, WriteTx};

impl Store {
    /// The names of all audit chains: every tenant has one (created with the tenant), plus any
    /// chain that has records or a head. Deriving the list from `tenants` too means deleting
    /// a chain's rows and head does not make it vanish from verification.
    pub async fn audit_chains(&self) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query(
            "SELECT id AS chain FROM tenants UNION SELECT chain FROM audit_events UNION SELECT chain FROM audit_heads ORDER BY chain",
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

    /// The head the writer recorded, if its MAC checks out.
    pub async fn audit_head(&self, chain: &str) -> Result<Option<Result<Head, HeadTampered>>, StoreError> {
        let row = sqlx::query("SELECT seq, hash, mac FROM audit_heads WHERE chain = $1")
            .bind(chain)
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let seq: i64 = row.try_get("seq")?;
        let hash: String = row.try_get("hash")?;
        let mac: String = row.try_get("mac")?;
        let (Some(hash), Ok(seq)) = (ChainHash::from_hex(&hash), u64::try_from(seq)) else {
            return Ok(Some(Err(HeadTampered)));
        };
        let head = Head { seq, hash };
        let ok = data_encoding::HEXLOWER
            .decode(mac.as_bytes())
            .ok()
            .is_some_and(|m| head.mac_verifies(&self.head_mac, chain, &m));
        Ok(Some(if ok { Ok(head) } else { Err(HeadTampered) }))
    }
}

/// The recorded chain head's MAC does not verify: the head row was rewritten.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadTampered;

impl WriteTx<'_> {
    /// Appends `event` to `chain` in this transaction.
    pub async fn audit(&mut self, chain: &str, at: Timestamp, event: Event) -> Result<Record, StoreError> {
        let row = sqlx::query("SELECT seq, hash FROM audit_heads WHERE chain = $1")
            .bind(chain)
            .fetch_optional(&mut *self.tx)
            .await?;
        let head = match row {
            None => Head::EMPTY,
            Some(r) => {
                let seq: i64 = r.try_get("seq")?;
                let hash: String = r.try_get("hash")?;
                Head {
                    seq: u64::try_from(seq).map_err(|_| StoreError::Corrupt("audit head seq".into()))?,
                    hash: ChainHash::from_hex(&hash).ok_or_else(|| StoreError::Corrupt("audit head hash".into()))?,
                }
            }
        };
        let record = Record::append(chain, head, at, event);
        let json = serde_json::to_string(&record).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let new_head = record.head();
        let seq = i64::try_from(record.seq).map_err(|_| StoreError::Corrupt("audit seq overflow".into()))?;
        sqlx::query("INSERT INTO audit_events (chain, seq, at, record) VALUES ($1, $2, $3, $4)")
            .bind(chain)
            .bind(seq)
            .bind(at.unix_millis())
            .bind(json)
            .execute(&mut *self.tx)
            .await?;
        let mac = new_head.mac(&self.store.head_mac, chain);
        sqlx::query(
            "INSERT INTO audit_heads (chain, seq, hash, mac) VALUES ($1, $2, $3, $4)
             ON CONFLICT (chain) DO UPDATE SET seq = excluded.seq, hash = excluded.hash, mac = excluded.mac",
        )
        .bind(chain)
        .bind(seq)
        .bind(new_head.hash.to_hex())
        .bind(data_encoding::HEXLOWER.encode(&mac))
        .execute(&mut *self.tx)
        .await?;
        Ok(record)
    }
}

/// Verifies every audit chain in the store. Returns per-chain results.
pub async fn verify_all_chains(store: &Store) -> Result<Vec<(String, Result<Head, String>)>, StoreError> {
    let mut out = Vec::new();
    for chain in store.audit_chains().await? {
        let rows = store.audit_records(&chain).await?;
        let mut records = Vec::with_capacity(rows.len());
        let mut bad_row = None;
        for row in rows {
            match row {
                Ok(r) => records.push(r),
                Err(seq) => {
                    bad_row = Some(seq);
                    break;
                }
            }
        }
        let result = if let Some(seq) = bad_row {
            match audit::verify_chain(&chain, &records, None) {
                Err(e) => Err(e.to_string()),
                Ok(_) => {
                    Err(format!("record seq {seq}: stored record is not in canonical form: the record was edited"))
                }
            }
        } else {
            match store.audit_head(&chain).await? {
                Some(Err(HeadTampered)) => Err("the recorded chain head fails its MAC: the head was rewritten".into()),
                Some(Ok(anchor)) => audit::verify_chain(&chain, &records, Some(anchor)).map_err(|e| e.to_string()),
                // Every append writes the head in the same transaction, so a chain without one
                // had its head deleted; without the anchor a re-hashed chain would verify.
                None => Err("the chain's recorded head is missing: it was deleted".into()),
            }
        };
        out.push((chain, result));
    }
    Ok(out)
}
