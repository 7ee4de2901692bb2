//! Persistence: one interface over the embedded SQLite database.
//!
//! Every call that touches tenant data takes a [`TenantScope`] and binds its tenant id in
//! the query, so a caller cannot forget the filter. The SQL is kept portable (numbered
//! placeholders, BIGINT/TEXT/BLOB, no SQLite-only functions) so a PostgreSQL backend can slot
//! in behind the same methods.
//!
//! Writes go through [`WriteTx`]: one transaction that holds the process-wide write lock, so
//! a mutation and its audit record commit together or not at all, and audit chains never fork.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use airlock_core::audit::{self, ChainHash, Event, Head, Record};
use airlock_core::grant::DenyCode;
use airlock_core::id::TokenId;
use airlock_core::operation::{OperationState, RefusalCode};
use airlock_core::token::TokenHash;
use airlock_core::{ApplianceId, ApplianceIdentity, EnvironmentId, OperationId, TenantId, Timestamp, WorkspaceId};
use serde::Serialize;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

use crate::authz::{Role, TenantScope};

pub const DB_FILE_NAME: &str = "airlock.db";

/// Versioned migrations, applied in order inside one transaction each. Embedded so the binary
/// carries its schema. (Hand-rolled rather than `sqlx::migrate!` to avoid building sqlx's
/// proc-macro stack and a second SQLite for the host; the bookkeeping is a dozen lines.)
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "init", include_str!("../../migrations/0001_init.sql")),
    (2, "previous_serial", include_str!("../../migrations/0002_previous_serial.sql")),
    (3, "join_key", include_str!("../../migrations/0003_join_key.sql")),
    (4, "operations", include_str!("../../migrations/0004_operations.sql")),
    (5, "policies", include_str!("../../migrations/0005_policies.sql")),
    (6, "refusal_codes", include_str!("../../migrations/0006_refusal_codes.sql")),
];

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("{what} `{name}` already exists")]
    Conflict { what: &'static str, name: String },
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("the database schema is version {found}, newer than this build understands ({known}); upgrade airlock")]
    SchemaTooNew { found: i64, known: i64 },
}

#[derive(Clone, Debug, Serialize)]
pub struct Workspace {
    pub id: WorkspaceId,
    pub name: String,
    pub created_at: Timestamp,
}

#[derive(Clone, Debug, Serialize)]
pub struct Environment {
    pub id: EnvironmentId,
    pub workspace_id: WorkspaceId,
    pub name: String,
    pub created_at: Timestamp,
}

#[derive(Clone, Debug)]
pub struct ApplianceRow {
    pub id: ApplianceId,
    pub environment_id: EnvironmentId,
    pub joined_at: Timestamp,
    pub version: String,
    pub cert_serial: String,
    pub cert_not_after: Timestamp,
    pub last_seen_at: Option<Timestamp>,
    pub revoked_at: Option<Timestamp>,
}

/// What an authenticated API token stands for, before authorization builds a scope from it.
#[derive(Clone, Debug)]
pub struct ApiTokenRow {
    pub id: TokenId,
    pub tenant: TenantId,
    pub role: Role,
}

/// A join token just spent: the environment it admits to.
#[derive(Clone, Debug)]
pub struct RedeemedJoin {
    pub token: TokenId,
    pub tenant: TenantId,
    pub environment: EnvironmentId,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RedeemRefusal {
    Unknown,
    /// `by` is the appliance that spent it; `expires_at` bounds a retry of that same join.
    AlreadyUsed {
        tenant: TenantId,
        by: Option<ApplianceId>,
        expires_at: Timestamp,
    },
    Expired {
        tenant: TenantId,
        expired_at: Timestamp,
    },
}

#[derive(Clone, Debug)]
pub struct RenewalState {
    pub current_serial: String,
    pub previous_serial: Option<String>,
    pub revoked: bool,
}

pub struct StoredCa {
    pub trust_domain: String,
    pub cert_pem: String,
    pub key_sealed: Vec<u8>,
}

pub struct Store {
    pool: SqlitePool,
    write_lock: tokio::sync::Mutex<()>,
    head_mac: ring::hmac::Key,
    pending_reads: std::sync::atomic::AtomicU64,
    policy_reads: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (creating if asked) the database in `data_dir` and applies pending migrations.
    /// Opens the database read-only and without migrating, for verifying it as evidence.
    pub async fn open_read_only(data_dir: &Path, head_mac: ring::hmac::Key) -> Result<Self, StoreError> {
        let opts = SqliteConnectOptions::new().filename(data_dir.join(DB_FILE_NAME)).read_only(true);
        let pool = SqlitePoolOptions::new().max_connections(2).connect_with(opts).await?;
        Ok(Self {
            pool,
            write_lock: tokio::sync::Mutex::new(()),
            head_mac,
            pending_reads: Default::default(),
            policy_reads: Default::default(),
        })
    }

    pub async fn open(data_dir: &Path, create: bool, head_mac: ring::hmac::Key) -> Result<Self, StoreError> {
        let opts = SqliteConnectOptions::new()
            .filename(data_dir.join(DB_FILE_NAME))
            .create_if_missing(create)
            .journal_mode(SqliteJournalMode::Wal)
            // Every acknowledged write, audit records included, survives power loss.
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new().max_connections(8).connect_with(opts).await?;
        let store = Self {
            pool,
            write_lock: tokio::sync::Mutex::new(()),
            head_mac,
            pending_reads: Default::default(),
            policy_reads: Default::default(),
        };
        store.migrate().await?;
        Ok(store)
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let _guard = self.write_lock.lock().await;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, description TEXT NOT NULL, applied_at BIGINT NOT NULL)",
        )
        .execute(&self.pool)
        .await?;
        let current: i64 = sqlx::query("SELECT COALESCE(MAX(version), 0) AS v FROM schema_migrations")
            .fetch_one(&self.pool)
            .await?
            .try_get("v")?;
        let known = MIGRATIONS.last().map_or(0, |m| m.0);
        if current > known {
            return Err(StoreError::SchemaTooNew { found: current, known });
        }
        for (version, description, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
            let mut tx = self.pool.begin().await?;
            sqlx::raw_sql(sql).execute(&mut *tx).await?;
            sqlx::query("INSERT INTO schema_migrations (version, description, applied_at) VALUES ($1, $2, $3)")
                .bind(version)
                .bind(description)
                .bind(0_i64)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        }
        Ok(())
    }

    /// Starts a write transaction; it holds the write lock until committed or dropped.
    pub async fn write(&self) -> Result<WriteTx<'_>, StoreError> {
        let guard = self.write_lock.lock().await;
        // IMMEDIATE: the database write lock is taken here, where SQLite's busy timeout
        // applies. A dropped transaction rolls back on its connection's worker a moment later;
        // a deferred transaction on another connection that read first and then tried to
        // write in that moment would fail at once with SQLITE_BUSY instead of waiting.
        let tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        Ok(WriteTx { _guard: guard, tx, store: self })
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    // ---- authentication lookups (run before a scope exists) ----

    pub async fn api_token_by_hash(&self, hash: &TokenHash) -> Result<Option<ApiTokenRow>, StoreError> {
        let row =
            sqlx::query("SELECT id, tenant_id, role FROM api_tokens WHERE token_hash = $1 AND revoked_at IS NULL")
                .bind(hash.0.as_slice())
                .fetch_optional(&self.pool)
                .await?;
        row.map(|r| {
            Ok(ApiTokenRow {
                id: parse_col(&r, "id")?,
                tenant: parse_col(&r, "tenant_id")?,
                role: parse_col(&r, "role")?,
            })
        })
        .transpose()
    }

    pub async fn join_token_known(&self, hash: &TokenHash) -> Result<bool, StoreError> {
        let row = sqlx::query("SELECT 1 AS one FROM join_tokens WHERE token_hash = $1")
            .bind(hash.0.as_slice())
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.is_some())
    }

    pub async fn load_ca(&self) -> Result<Option<StoredCa>, StoreError> {
        let row = sqlx::query("SELECT trust_domain, cert_pem, key_sealed FROM ca WHERE id = 1")
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| {
            Ok(StoredCa {
                trust_domain: r.try_get("trust_domain")?,
                cert_pem: r.try_get("cert_pem")?,
                key_sealed: r.try_get("key_sealed")?,
            })
        })
        .transpose()
    }

    /// Every revoked appliance, across tenants: the gateway refuses their handshakes.
    pub async fn revoked_appliances(&self) -> Result<Vec<ApplianceId>, StoreError> {
        let rows = sqlx::query("SELECT id FROM appliances WHERE revoked_at IS NOT NULL").fetch_all(&self.pool).await?;
        rows.iter().map(|r| parse_col(r, "id")).collect()
    }

    /// Every appliance, across tenants, with an operation still waiting for its final
    /// result: the gateway pushes operations at connect only to these.
    pub async fn appliances_with_pending_operations(&self) -> Result<Vec<ApplianceId>, StoreError> {
        let rows = sqlx::query(
            "SELECT DISTINCT appliance_id FROM operations WHERE result_at IS NULL AND state IN ($1, $2, $3)",
        )
        .bind(PENDING_STATES[0].as_str())
        .bind(PENDING_STATES[1].as_str())
        .bind(PENDING_STATES[2].as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| parse_col(r, "appliance_id")).collect()
    }

    /// Every environment, across tenants, with a relayed policy.
    pub async fn environments_with_policy(&self) -> Result<Vec<EnvironmentId>, StoreError> {
        let rows = sqlx::query("SELECT environment_id FROM environment_policies").fetch_all(&self.pool).await?;
        rows.iter().map(|r| parse_col(r, "environment_id")).collect()
    }

    /// How many times pending operations and environment policies were read (tests count
    /// the reads a connect costs).
    #[cfg(test)]
    pub fn push_reads(&self) -> (u64, u64) {
        (
            self.pending_reads.load(std::sync::atomic::Ordering::Relaxed),
            self.policy_reads.load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    // ---- tenant-scoped reads ----

    pub async fn list_workspaces(&self, scope: &TenantScope) -> Result<Vec<Workspace>, StoreError> {
        let rows =
            sqlx::query("SELECT id, name, created_at FROM workspaces WHERE tenant_id = $1 ORDER BY created_at, id")
                .bind(scope.tenant().to_string())
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|r| {
                Ok(Workspace {
                    id: parse_col(r, "id")?,
                    name: r.try_get("name")?,
                    created_at: ts_col(r, "created_at")?,
                })
            })
            .collect()
    }

    pub async fn workspace_exists(&self, scope: &TenantScope, ws: WorkspaceId) -> Result<bool, StoreError> {
        let row = sqlx::query("SELECT 1 AS one FROM workspaces WHERE tenant_id = $1 AND id = $2")
            .bind(scope.tenant().to_string())
            .bind(ws.to_string())
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.is_some())
    }

    pub async fn list_environments(
        &self,
        scope: &TenantScope,
        ws: WorkspaceId,
    ) -> Result<Vec<Environment>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, workspace_id, name, created_at FROM environments WHERE tenant_id = $1 AND workspace_id = $2 ORDER BY created_at, id",
        )
        .bind(scope.tenant().to_string())
        .bind(ws.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(env_from_row).collect()
    }

    pub async fn get_environment(
        &self,
        scope: &TenantScope,
        env: EnvironmentId,
    ) -> Result<Option<Environment>, StoreError> {
        let row =
            sqlx::query("SELECT id, workspace_id, name, created_at FROM environments WHERE tenant_id = $1 AND id = $2")
                .bind(scope.tenant().to_string())
                .bind(env.to_string())
                .fetch_optional(&self.pool)
                .await?;
        row.as_ref().map(env_from_row).transpose()
    }

    pub async fn list_appliances(
        &self,
        scope: &TenantScope,
        env: Option<EnvironmentId>,
    ) -> Result<Vec<ApplianceRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, environment_id, joined_at, version, cert_serial, cert_not_after, last_seen_at, revoked_at
             FROM appliances WHERE tenant_id = $1 AND ($2 IS NULL OR environment_id = $2) ORDER BY joined_at, id",
        )
        .bind(scope.tenant().to_string())
        .bind(env.map(|e| e.to_string()))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(appliance_from_row).collect()
    }

    pub async fn get_appliance(
        &self,
        scope: &TenantScope,
        id: ApplianceId,
    ) -> Result<Option<ApplianceRow>, StoreError> {
        let row = sqlx::query(
            "SELECT id, environment_id, joined_at, version, cert_serial, cert_not_after, last_seen_at, revoked_at
             FROM appliances WHERE tenant_id = $1 AND id = $2",
        )
        .bind(scope.tenant().to_string())
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(appliance_from_row).transpose()
    }

    // ---- audit ----

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
            .is_some_and(|m| ring::hmac::verify(&self.head_mac, &head_mac_input(chain, &head), &m).is_ok());
        Ok(Some(if ok { Ok(head) } else { Err(HeadTampered) }))
    }
}

/// The recorded chain head's MAC does not verify: the head row was rewritten.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadTampered;

/// A write transaction holding the store's write lock.
pub struct WriteTx<'a> {
    _guard: tokio::sync::MutexGuard<'a, ()>,
    tx: sqlx::Transaction<'static, sqlx::Sqlite>,
    store: &'a Store,
}

impl WriteTx<'_> {
    pub async fn commit(self) -> Result<(), StoreError> {
        self.tx.commit().await?;
        Ok(())
    }

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
        let mac = ring::hmac::sign(&self.store.head_mac, &head_mac_input(chain, &new_head));
        sqlx::query(
            "INSERT INTO audit_heads (chain, seq, hash, mac) VALUES ($1, $2, $3, $4)
             ON CONFLICT (chain) DO UPDATE SET seq = excluded.seq, hash = excluded.hash, mac = excluded.mac",
        )
        .bind(chain)
        .bind(seq)
        .bind(new_head.hash.to_hex())
        .bind(data_encoding::HEXLOWER.encode(mac.as_ref()))
        .execute(&mut *self.tx)
        .await?;
        Ok(record)
    }

    // ---- bootstrap (offline administration, before any principal exists) ----

    pub async fn put_ca(&mut self, ca: &StoredCa, now: Timestamp) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO ca (id, trust_domain, cert_pem, key_sealed, created_at) VALUES (1, $1, $2, $3, $4)")
            .bind(&ca.trust_domain)
            .bind(&ca.cert_pem)
            .bind(&ca.key_sealed)
            .bind(now.unix_millis())
            .execute(&mut *self.tx)
            .await?;
        Ok(())
    }

    pub async fn create_tenant(&mut self, id: TenantId, name: &str, now: Timestamp) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO tenants (id, name, created_at) VALUES ($1, $2, $3)")
            .bind(id.to_string())
            .bind(name)
            .bind(now.unix_millis())
            .execute(&mut *self.tx)
            .await
            .map_err(|e| conflict(e, "tenant", name))?;
        Ok(())
    }

    pub async fn create_workspace(
        &mut self,
        tenant: TenantId,
        id: WorkspaceId,
        name: &str,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO workspaces (id, tenant_id, name, created_at) VALUES ($1, $2, $3, $4)")
            .bind(id.to_string())
            .bind(tenant.to_string())
            .bind(name)
            .bind(now.unix_millis())
            .execute(&mut *self.tx)
            .await
            .map_err(|e| conflict(e, "workspace", name))?;
        Ok(())
    }

    pub async fn create_api_token(
        &mut self,
        tenant: TenantId,
        id: TokenId,
        hash: &TokenHash,
        name: &str,
        role: Role,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO api_tokens (id, tenant_id, token_hash, name, role, created_at) VALUES ($1, $2, $3, $4, $5, $6)")
            .bind(id.to_string())
            .bind(tenant.to_string())
            .bind(hash.0.as_slice())
            .bind(name)
            .bind(role.as_str())
            .bind(now.unix_millis())
            .execute(&mut *self.tx)
            .await?;
        Ok(())
    }

    // ---- tenant-scoped writes ----

    pub async fn create_environment(
        &mut self,
        scope: &TenantScope,
        ws: WorkspaceId,
        id: EnvironmentId,
        name: &str,
        now: Timestamp,
    ) -> Result<Environment, StoreError> {
        sqlx::query(
            "INSERT INTO environments (id, tenant_id, workspace_id, name, created_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(id.to_string())
        .bind(scope.tenant().to_string())
        .bind(ws.to_string())
        .bind(name)
        .bind(now.unix_millis())
        .execute(&mut *self.tx)
        .await
        .map_err(|e| conflict(e, "environment", name))?;
        Ok(Environment { id, workspace_id: ws, name: name.to_owned(), created_at: now })
    }

    pub async fn create_join_token(
        &mut self,
        scope: &TenantScope,
        env: EnvironmentId,
        id: TokenId,
        hash: &TokenHash,
        now: Timestamp,
        expires_at: Timestamp,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO join_tokens (id, tenant_id, environment_id, token_hash, created_by, created_at, expires_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(id.to_string())
        .bind(scope.tenant().to_string())
        .bind(env.to_string())
        .bind(hash.0.as_slice())
        .bind(scope.principal().actor())
        .bind(now.unix_millis())
        .bind(expires_at.unix_millis())
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    /// Spends a join token. The token row is the scope here: it names the tenant and environment.
    pub async fn redeem_join_token(
        &mut self,
        hash: &TokenHash,
        appliance: ApplianceId,
        now: Timestamp,
    ) -> Result<Result<RedeemedJoin, RedeemRefusal>, StoreError> {
        let row = sqlx::query(
            "SELECT id, tenant_id, environment_id, expires_at, used_at, used_by FROM join_tokens WHERE token_hash = $1",
        )
        .bind(hash.0.as_slice())
        .fetch_optional(&mut *self.tx)
        .await?;
        let Some(row) = row else { return Ok(Err(RedeemRefusal::Unknown)) };
        let tenant: TenantId = parse_col(&row, "tenant_id")?;
        let used_at: Option<i64> = row.try_get("used_at")?;
        let expires_at = ts_col(&row, "expires_at")?;
        if used_at.is_some() {
            let by: Option<String> = row.try_get("used_by")?;
            let by = by.and_then(|b| b.parse().ok());
            return Ok(Err(RedeemRefusal::AlreadyUsed { tenant, by, expires_at }));
        }
        if now >= expires_at {
            return Ok(Err(RedeemRefusal::Expired { tenant, expired_at: expires_at }));
        }
        let token: TokenId = parse_col(&row, "id")?;
        let done = sqlx::query("UPDATE join_tokens SET used_at = $1, used_by = $2 WHERE id = $3 AND used_at IS NULL")
            .bind(now.unix_millis())
            .bind(appliance.to_string())
            .bind(token.to_string())
            .execute(&mut *self.tx)
            .await?;
        if done.rows_affected() != 1 {
            return Ok(Err(RedeemRefusal::AlreadyUsed { tenant, by: None, expires_at }));
        }
        Ok(Ok(RedeemedJoin { token, tenant, environment: parse_col(&row, "environment_id")? }))
    }

    /// The environment of `appliance` if it joined with `join_key` and is not revoked: the
    /// only case in which a spent join token may be presented again.
    pub async fn join_retry_environment(
        &mut self,
        tenant: TenantId,
        appliance: ApplianceId,
        join_key: &[u8],
    ) -> Result<Option<EnvironmentId>, StoreError> {
        let row = sqlx::query(
            "SELECT environment_id FROM appliances WHERE tenant_id = $1 AND id = $2 AND join_key = $3 AND revoked_at IS NULL",
        )
        .bind(tenant.to_string())
        .bind(appliance.to_string())
        .bind(join_key)
        .fetch_optional(&mut *self.tx)
        .await?;
        row.map(|r| parse_col(&r, "environment_id")).transpose()
    }

    pub async fn insert_appliance(
        &mut self,
        identity: &ApplianceIdentity,
        version: &str,
        cert: (&str, Timestamp),
        join_key: &[u8],
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let (serial, not_after) = cert;
        sqlx::query(
            "INSERT INTO appliances (id, tenant_id, environment_id, joined_at, version, cert_serial, cert_not_after, join_key)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(identity.appliance.to_string())
        .bind(identity.tenant.to_string())
        .bind(identity.environment.to_string())
        .bind(now.unix_millis())
        .bind(version)
        .bind(serial)
        .bind(not_after.unix_millis())
        .bind(join_key)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    /// The serials a renewal may be presented with, and whether the appliance is revoked.
    pub async fn renewal_state(
        &mut self,
        scope: &TenantScope,
        id: ApplianceId,
    ) -> Result<Option<RenewalState>, StoreError> {
        let row = sqlx::query(
            "SELECT cert_serial, previous_serial, revoked_at FROM appliances WHERE tenant_id = $1 AND id = $2",
        )
        .bind(scope.tenant().to_string())
        .bind(id.to_string())
        .fetch_optional(&mut *self.tx)
        .await?;
        row.map(|r| {
            let revoked_at: Option<i64> = r.try_get("revoked_at")?;
            Ok(RenewalState {
                current_serial: r.try_get("cert_serial")?,
                previous_serial: r.try_get("previous_serial")?,
                revoked: revoked_at.is_some(),
            })
        })
        .transpose()
    }

    pub async fn record_renewal(
        &mut self,
        scope: &TenantScope,
        id: ApplianceId,
        serial: &str,
        not_after: Timestamp,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE appliances SET previous_serial = cert_serial, cert_serial = $1, cert_not_after = $2 WHERE tenant_id = $3 AND id = $4",
        )
            .bind(serial)
            .bind(not_after.unix_millis())
            .bind(scope.tenant().to_string())
            .bind(id.to_string())
            .execute(&mut *self.tx)
            .await?;
        Ok(())
    }

    pub async fn record_seen(
        &mut self,
        scope: &TenantScope,
        id: ApplianceId,
        version: &str,
        at: Timestamp,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE appliances SET version = COALESCE(NULLIF($1, ''), version), last_seen_at = $2 WHERE tenant_id = $3 AND id = $4",
        )
            .bind(version)
            .bind(at.unix_millis())
            .bind(scope.tenant().to_string())
            .bind(id.to_string())
            .execute(&mut *self.tx)
            .await?;
        Ok(())
    }

    /// Marks an appliance revoked. Returns false if it does not exist in this tenant.
    pub async fn revoke_appliance(
        &mut self,
        scope: &TenantScope,
        id: ApplianceId,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        let done =
            sqlx::query("UPDATE appliances SET revoked_at = COALESCE(revoked_at, $1) WHERE tenant_id = $2 AND id = $3")
                .bind(now.unix_millis())
                .bind(scope.tenant().to_string())
                .bind(id.to_string())
                .execute(&mut *self.tx)
                .await?;
        Ok(done.rows_affected() == 1)
    }
}

// ---------- templates and operations ----------

/// One stored version of a template.
#[derive(Clone, Debug)]
pub struct TemplateRow {
    pub workspace_id: WorkspaceId,
    pub name: String,
    pub content_sha256: String,
    pub manifest_toml: String,
    pub script: String,
    pub created_at: Timestamp,
}

/// An operation as stored. The request's details live in its signed envelope.
#[derive(Clone, Debug)]
pub struct OperationRow {
    pub id: OperationId,
    pub workspace_id: WorkspaceId,
    pub environment_id: EnvironmentId,
    pub appliance_id: ApplianceId,
    pub template_name: String,
    pub template_sha256: String,
    pub state: OperationState,
    pub requested_by: String,
    pub requested_at: Timestamp,
    pub updated_at: Timestamp,
    pub request_digest: String,
    pub command_sha256: String,
    pub request_envelope: String,
    pub control_plane_cert_pem: String,
    pub approval_envelope: Option<String>,
    pub pre_approval_envelope: Option<String>,
    pub execution_envelope: Option<String>,
    pub appliance_cert_pem: Option<String>,
    pub release_envelope: Option<String>,
    pub exit_code: Option<i64>,
    pub output_sha256: Option<String>,
    pub output_size: Option<i64>,
    /// Why the appliance refused it, as it coded it (absent for refusals recorded before
    /// codes were kept).
    pub refusal_code: Option<RefusalCode>,
    /// Which policy check denied it, when `refusal_code` is `Denied`.
    pub deny_code: Option<DenyCode>,
    /// The appliance's explanation, for people.
    pub refusal_reason: Option<String>,
    pub result_at: Option<Timestamp>,
    pub output_stored: bool,
}

/// What an appliance's verified result changes on an operation.
#[derive(Clone, Debug)]
pub struct ResultUpdate<'a> {
    pub state: OperationState,
    pub execution_envelope: Option<&'a str>,
    pub appliance_cert_pem: Option<&'a str>,
    pub pre_approval_envelope: Option<&'a str>,
    pub exit_code: Option<i64>,
    pub output_sha256: Option<&'a str>,
    pub output_size: Option<i64>,
    pub refusal_code: Option<RefusalCode>,
    pub deny_code: Option<DenyCode>,
    pub refusal_reason: Option<&'a str>,
}

impl<'a> ResultUpdate<'a> {
    /// A refusal: the new state and why, nothing executed.
    pub fn refusal(state: OperationState, code: RefusalCode, deny: Option<DenyCode>, reason: &'a str) -> Self {
        Self {
            state,
            execution_envelope: None,
            appliance_cert_pem: None,
            pre_approval_envelope: None,
            exit_code: None,
            output_sha256: None,
            output_size: None,
            refusal_code: Some(code),
            deny_code: deny,
            refusal_reason: Some(reason),
        }
    }
}

/// What the customer's release decision changes on an operation.
#[derive(Clone, Debug)]
pub struct ReleaseUpdate<'a> {
    pub state: OperationState,
    pub release_envelope: Option<&'a str>,
    pub output_sealed: Option<&'a [u8]>,
}

const TEMPLATE_COLUMNS: &str = "workspace_id, name, content_sha256, manifest_toml, script, created_at";
const OPERATION_COLUMNS: &str = "id, workspace_id, environment_id, appliance_id, template_name, template_sha256, state,
    requested_by, requested_at, updated_at, request_digest, command_sha256, request_envelope, control_plane_cert_pem,
    approval_envelope, pre_approval_envelope, execution_envelope, appliance_cert_pem, release_envelope, exit_code,
    output_sha256, output_size, refusal_code, deny_code, refusal_reason, result_at,
    CASE WHEN output_sealed IS NULL THEN 0 ELSE 1 END AS output_stored";

/// The states in which an operation still waits for the appliance's final result.
pub const PENDING_STATES: [OperationState; 3] =
    [OperationState::AwaitingApproval, OperationState::Approved, OperationState::Denied];

/// Where an operation comes in the order instructions are pushed: decided (approved or
/// denied) before awaiting approval, so a backlog of requests nobody approved yet cannot hold
/// back an approved one; then oldest first. Must agree with [`Store::pending_operations`].
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PushKey {
    pub awaiting: bool,
    pub requested_at: Timestamp,
    pub id: OperationId,
}

impl PushKey {
    pub fn of(op: &OperationRow) -> Self {
        Self { awaiting: op.state == OperationState::AwaitingApproval, requested_at: op.requested_at, id: op.id }
    }
}

/// Where a push of pending instructions starts: from the first, or after a given operation.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum PushFrom {
    Start,
    After(PushKey),
}

impl Store {
    /// The current version of every template in a workspace, by name.
    pub async fn list_current_templates(
        &self,
        scope: &TenantScope,
        ws: WorkspaceId,
    ) -> Result<Vec<TemplateRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT t.workspace_id, t.name, t.content_sha256, t.manifest_toml, t.script, t.created_at
             FROM template_current c JOIN templates t
               ON t.workspace_id = c.workspace_id AND t.name = c.name AND t.content_sha256 = c.content_sha256
             WHERE c.tenant_id = $1 AND t.tenant_id = $1 AND c.workspace_id = $2 ORDER BY c.name",
        )
        .bind(scope.tenant().to_string())
        .bind(ws.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(template_from_row).collect()
    }

    /// The current version of one template.
    pub async fn current_template(
        &self,
        scope: &TenantScope,
        ws: WorkspaceId,
        name: &str,
    ) -> Result<Option<TemplateRow>, StoreError> {
        let row = sqlx::query(
            "SELECT t.workspace_id, t.name, t.content_sha256, t.manifest_toml, t.script, t.created_at
             FROM template_current c JOIN templates t
               ON t.workspace_id = c.workspace_id AND t.name = c.name AND t.content_sha256 = c.content_sha256
             WHERE c.tenant_id = $1 AND t.tenant_id = $1 AND c.workspace_id = $2 AND c.name = $3",
        )
        .bind(scope.tenant().to_string())
        .bind(ws.to_string())
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(template_from_row).transpose()
    }

    /// One stored version of a template, by content hash (old versions stay resolvable).
    pub async fn template_version(
        &self,
        scope: &TenantScope,
        ws: WorkspaceId,
        name: &str,
        content_sha256: &str,
    ) -> Result<Option<TemplateRow>, StoreError> {
        let sql = format!(
            "SELECT {TEMPLATE_COLUMNS} FROM templates WHERE tenant_id = $1 AND workspace_id = $2 AND name = $3 AND content_sha256 = $4"
        );
        let row = sqlx::query(&sql)
            .bind(scope.tenant().to_string())
            .bind(ws.to_string())
            .bind(name)
            .bind(content_sha256)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(template_from_row).transpose()
    }

    pub async fn get_operation(
        &self,
        scope: &TenantScope,
        id: OperationId,
    ) -> Result<Option<OperationRow>, StoreError> {
        let sql = format!("SELECT {OPERATION_COLUMNS} FROM operations WHERE tenant_id = $1 AND id = $2");
        let row =
            sqlx::query(&sql).bind(scope.tenant().to_string()).bind(id.to_string()).fetch_optional(&self.pool).await?;
        row.as_ref().map(operation_from_row).transpose()
    }

    /// Operations of the tenant, newest first, optionally by state and environment.
    pub async fn list_operations(
        &self,
        scope: &TenantScope,
        state: Option<OperationState>,
        env: Option<EnvironmentId>,
        limit: i64,
    ) -> Result<Vec<OperationRow>, StoreError> {
        let sql = format!(
            "SELECT {OPERATION_COLUMNS} FROM operations
             WHERE tenant_id = $1 AND ($2 IS NULL OR state = $2) AND ($3 IS NULL OR environment_id = $3)
             ORDER BY requested_at DESC, id DESC LIMIT $4"
        );
        let rows = sqlx::query(&sql)
            .bind(scope.tenant().to_string())
            .bind(state.map(OperationState::as_str))
            .bind(env.map(|e| e.to_string()))
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(operation_from_row).collect()
    }

    /// Operations of one appliance still waiting for its final result, in push order
    /// ([`PushKey`]), from `from` on, at most `limit`.
    pub async fn pending_operations(
        &self,
        scope: &TenantScope,
        appliance: ApplianceId,
        from: &PushFrom,
        limit: i64,
    ) -> Result<Vec<OperationRow>, StoreError> {
        self.pending_reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let sql = format!(
            "SELECT {OPERATION_COLUMNS} FROM operations
             WHERE tenant_id = $1 AND appliance_id = $2 AND result_at IS NULL AND state IN ($3, $4, $5)
               AND ($6 = 0 OR (CASE WHEN state = $3 THEN 1 ELSE 0 END, requested_at, id) > ($7, $8, $9))
             ORDER BY CASE WHEN state = $3 THEN 1 ELSE 0 END, requested_at, id LIMIT $10"
        );
        let after = match from {
            PushFrom::Start => None,
            PushFrom::After(k) => Some(k),
        };
        let rows = sqlx::query(&sql)
            .bind(scope.tenant().to_string())
            .bind(appliance.to_string())
            .bind(PENDING_STATES[0].as_str())
            .bind(PENDING_STATES[1].as_str())
            .bind(PENDING_STATES[2].as_str())
            .bind(i64::from(after.is_some()))
            .bind(after.map_or(0, |k| i64::from(k.awaiting)))
            .bind(after.map_or(0, |k| k.requested_at.unix_millis()))
            .bind(after.map_or(String::new(), |k| k.id.to_string()))
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(operation_from_row).collect()
    }

    /// The sealed released output of an operation, if any.
    pub async fn sealed_output(&self, scope: &TenantScope, id: OperationId) -> Result<Option<Vec<u8>>, StoreError> {
        let row = sqlx::query("SELECT output_sealed FROM operations WHERE tenant_id = $1 AND id = $2")
            .bind(scope.tenant().to_string())
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some(r) => Ok(r.try_get("output_sealed")?),
            None => Ok(None),
        }
    }
}

impl WriteTx<'_> {
    /// The current version of a template, read under the write lock.
    pub async fn current_template_sha(
        &mut self,
        scope: &TenantScope,
        ws: WorkspaceId,
        name: &str,
    ) -> Result<Option<String>, StoreError> {
        let row = sqlx::query(
            "SELECT content_sha256 FROM template_current WHERE tenant_id = $1 AND workspace_id = $2 AND name = $3",
        )
        .bind(scope.tenant().to_string())
        .bind(ws.to_string())
        .bind(name)
        .fetch_optional(&mut *self.tx)
        .await?;
        row.map(|r| Ok(r.try_get("content_sha256")?)).transpose()
    }

    /// Stores a template version (a no-op if this exact content is stored) and makes it current.
    /// False if the workspace is not the tenant's.
    pub async fn put_template(
        &mut self,
        scope: &TenantScope,
        ws: WorkspaceId,
        t: &TemplateRow,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        let owned = sqlx::query("SELECT 1 AS one FROM workspaces WHERE tenant_id = $1 AND id = $2")
            .bind(scope.tenant().to_string())
            .bind(ws.to_string())
            .fetch_optional(&mut *self.tx)
            .await?;
        if owned.is_none() {
            return Ok(false);
        }
        sqlx::query(
            "INSERT INTO templates (tenant_id, workspace_id, name, content_sha256, manifest_toml, script, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (workspace_id, name, content_sha256) DO NOTHING",
        )
        .bind(scope.tenant().to_string())
        .bind(ws.to_string())
        .bind(&t.name)
        .bind(&t.content_sha256)
        .bind(&t.manifest_toml)
        .bind(&t.script)
        .bind(now.unix_millis())
        .execute(&mut *self.tx)
        .await?;
        sqlx::query(
            "INSERT INTO template_current (tenant_id, workspace_id, name, content_sha256, updated_at)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (workspace_id, name) DO UPDATE SET content_sha256 = excluded.content_sha256, updated_at = excluded.updated_at
             WHERE template_current.tenant_id = excluded.tenant_id",
        )
        .bind(scope.tenant().to_string())
        .bind(ws.to_string())
        .bind(&t.name)
        .bind(&t.content_sha256)
        .bind(now.unix_millis())
        .execute(&mut *self.tx)
        .await?;
        Ok(true)
    }

    /// Inserts an operation. False if its appliance is not the tenant's, in that environment.
    pub async fn insert_operation(&mut self, scope: &TenantScope, op: &OperationRow) -> Result<bool, StoreError> {
        let owned = sqlx::query(
            "SELECT 1 AS one FROM appliances a JOIN environments e ON e.id = a.environment_id
             WHERE a.tenant_id = $1 AND e.tenant_id = $1 AND a.id = $2 AND e.id = $3 AND e.workspace_id = $4",
        )
        .bind(scope.tenant().to_string())
        .bind(op.appliance_id.to_string())
        .bind(op.environment_id.to_string())
        .bind(op.workspace_id.to_string())
        .fetch_optional(&mut *self.tx)
        .await?;
        if owned.is_none() {
            return Ok(false);
        }
        sqlx::query(
            "INSERT INTO operations (id, tenant_id, workspace_id, environment_id, appliance_id, template_name,
                template_sha256, state, requested_by, requested_at, updated_at, request_digest, command_sha256,
                request_envelope, control_plane_cert_pem)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
        )
        .bind(op.id.to_string())
        .bind(scope.tenant().to_string())
        .bind(op.workspace_id.to_string())
        .bind(op.environment_id.to_string())
        .bind(op.appliance_id.to_string())
        .bind(&op.template_name)
        .bind(&op.template_sha256)
        .bind(op.state.as_str())
        .bind(&op.requested_by)
        .bind(op.requested_at.unix_millis())
        .bind(op.updated_at.unix_millis())
        .bind(&op.request_digest)
        .bind(&op.command_sha256)
        .bind(&op.request_envelope)
        .bind(&op.control_plane_cert_pem)
        .execute(&mut *self.tx)
        .await
        .map_err(|e| conflict(e, "operation", &op.id.to_string()))?;
        Ok(true)
    }

    /// An operation, read under the write lock so a check and its update cannot interleave.
    pub async fn operation(
        &mut self,
        scope: &TenantScope,
        id: OperationId,
    ) -> Result<Option<OperationRow>, StoreError> {
        let sql = format!("SELECT {OPERATION_COLUMNS} FROM operations WHERE tenant_id = $1 AND id = $2");
        let row = sqlx::query(&sql)
            .bind(scope.tenant().to_string())
            .bind(id.to_string())
            .fetch_optional(&mut *self.tx)
            .await?;
        row.as_ref().map(operation_from_row).transpose()
    }

    /// Records a relayed approval (or denial). Only from `awaiting_approval`; false otherwise.
    pub async fn set_approval(
        &mut self,
        scope: &TenantScope,
        id: OperationId,
        envelope_json: &str,
        state: OperationState,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE operations SET approval_envelope = $1, state = $2, updated_at = $3
             WHERE tenant_id = $4 AND id = $5 AND state = $6 AND approval_envelope IS NULL",
        )
        .bind(envelope_json)
        .bind(state.as_str())
        .bind(now.unix_millis())
        .bind(scope.tenant().to_string())
        .bind(id.to_string())
        .bind(OperationState::AwaitingApproval.as_str())
        .execute(&mut *self.tx)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Records the appliance's final result for an operation of this appliance.
    pub async fn record_result(
        &mut self,
        scope: &TenantScope,
        appliance: ApplianceId,
        id: OperationId,
        r: &ResultUpdate<'_>,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE operations SET state = $1, execution_envelope = $2, appliance_cert_pem = $3,
                pre_approval_envelope = $4, exit_code = $5, output_sha256 = $6, output_size = $7,
                refusal_reason = $8, result_at = $9, updated_at = $9, refusal_code = $13, deny_code = $14
             WHERE tenant_id = $10 AND appliance_id = $11 AND id = $12 AND result_at IS NULL",
        )
        .bind(r.state.as_str())
        .bind(r.execution_envelope)
        .bind(r.appliance_cert_pem)
        .bind(r.pre_approval_envelope)
        .bind(r.exit_code)
        .bind(r.output_sha256)
        .bind(r.output_size)
        .bind(r.refusal_reason)
        .bind(now.unix_millis())
        .bind(scope.tenant().to_string())
        .bind(appliance.to_string())
        .bind(id.to_string())
        .bind(r.refusal_code.map(code_text))
        .bind(r.deny_code.map(code_text))
        .execute(&mut *self.tx)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Records the customer's release decision and the sealed output (if released).
    pub async fn record_release(
        &mut self,
        scope: &TenantScope,
        appliance: ApplianceId,
        id: OperationId,
        release: &ReleaseUpdate<'_>,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE operations SET state = $1, release_envelope = $2, output_sealed = $3, updated_at = $4
             WHERE tenant_id = $5 AND appliance_id = $6 AND id = $7 AND state IN ($8, $9)",
        )
        .bind(release.state.as_str())
        .bind(release.release_envelope)
        .bind(release.output_sealed)
        .bind(now.unix_millis())
        .bind(scope.tenant().to_string())
        .bind(appliance.to_string())
        .bind(id.to_string())
        .bind(OperationState::Executed.as_str())
        .bind(OperationState::Cancelled.as_str())
        .execute(&mut *self.tx)
        .await?;
        Ok(done.rows_affected() == 1)
    }
}

fn template_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<TemplateRow, StoreError> {
    Ok(TemplateRow {
        workspace_id: parse_col(r, "workspace_id")?,
        name: r.try_get("name")?,
        content_sha256: r.try_get("content_sha256")?,
        manifest_toml: r.try_get("manifest_toml")?,
        script: r.try_get("script")?,
        created_at: ts_col(r, "created_at")?,
    })
}

fn operation_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<OperationRow, StoreError> {
    let stored: i64 = r.try_get("output_stored")?;
    Ok(OperationRow {
        id: parse_col(r, "id")?,
        workspace_id: parse_col(r, "workspace_id")?,
        environment_id: parse_col(r, "environment_id")?,
        appliance_id: parse_col(r, "appliance_id")?,
        template_name: r.try_get("template_name")?,
        template_sha256: r.try_get("template_sha256")?,
        state: parse_col(r, "state")?,
        requested_by: r.try_get("requested_by")?,
        requested_at: ts_col(r, "requested_at")?,
        updated_at: ts_col(r, "updated_at")?,
        request_digest: r.try_get("request_digest")?,
        command_sha256: r.try_get("command_sha256")?,
        request_envelope: r.try_get("request_envelope")?,
        control_plane_cert_pem: r.try_get("control_plane_cert_pem")?,
        approval_envelope: r.try_get("approval_envelope")?,
        pre_approval_envelope: r.try_get("pre_approval_envelope")?,
        execution_envelope: r.try_get("execution_envelope")?,
        appliance_cert_pem: r.try_get("appliance_cert_pem")?,
        release_envelope: r.try_get("release_envelope")?,
        exit_code: r.try_get("exit_code")?,
        output_sha256: r.try_get("output_sha256")?,
        output_size: r.try_get("output_size")?,
        refusal_code: code_col(r, "refusal_code")?,
        deny_code: code_col(r, "deny_code")?,
        refusal_reason: r.try_get("refusal_reason")?,
        result_at: opt_ts_col(r, "result_at")?,
        output_stored: stored != 0,
    })
}

fn head_mac_input(chain: &str, head: &Head) -> Vec<u8> {
    format!("airlock-audit-head-v1\n{chain}\n{}\n{}", head.seq, head.hash.to_hex()).into_bytes()
}

fn conflict(e: sqlx::Error, what: &'static str, name: &str) -> StoreError {
    match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::Conflict { what, name: name.to_owned() },
        _ => StoreError::Db(e),
    }
}

fn parse_col<T: FromStr>(row: &sqlx::sqlite::SqliteRow, col: &str) -> Result<T, StoreError>
where
    T::Err: std::fmt::Display,
{
    let s: String = row.try_get(col)?;
    s.parse().map_err(|e: T::Err| StoreError::Corrupt(format!("column {col}: {e}")))
}

/// A code's stored text: its serde (snake_case) name, as the API shows it.
fn code_text<T: Serialize>(code: T) -> String {
    match serde_json::to_value(code) {
        Ok(serde_json::Value::String(s)) => s,
        // Codes are unit enum variants, which serialize as strings.
        _ => String::new(),
    }
}

/// A stored code; a name this build does not know is corruption, never a default.
fn code_col<T: serde::de::DeserializeOwned>(row: &sqlx::sqlite::SqliteRow, col: &str) -> Result<Option<T>, StoreError> {
    let text: Option<String> = row.try_get(col)?;
    text.map(|t| {
        serde_json::from_value(serde_json::Value::String(t.clone())).map_err(|_| {
            StoreError::Corrupt(format!("column {col}: unknown code `{}`", t.chars().take(40).collect::<String>()))
        })
    })
    .transpose()
}

fn ts_col(row: &sqlx::sqlite::SqliteRow, col: &str) -> Result<Timestamp, StoreError> {
    Ok(Timestamp::from_unix_millis(row.try_get(col)?))
}

fn opt_ts_col(row: &sqlx::sqlite::SqliteRow, col: &str) -> Result<Option<Timestamp>, StoreError> {
    let v: Option<i64> = row.try_get(col)?;
    Ok(v.map(Timestamp::from_unix_millis))
}

fn env_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<Environment, StoreError> {
    Ok(Environment {
        id: parse_col(r, "id")?,
        workspace_id: parse_col(r, "workspace_id")?,
        name: r.try_get("name")?,
        created_at: ts_col(r, "created_at")?,
    })
}

fn appliance_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<ApplianceRow, StoreError> {
    Ok(ApplianceRow {
        id: parse_col(r, "id")?,
        environment_id: parse_col(r, "environment_id")?,
        joined_at: ts_col(r, "joined_at")?,
        version: r.try_get("version")?,
        cert_serial: r.try_get("cert_serial")?,
        cert_not_after: ts_col(r, "cert_not_after")?,
        last_seen_at: opt_ts_col(r, "last_seen_at")?,
        revoked_at: opt_ts_col(r, "revoked_at")?,
    })
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

/// The customer policy last relayed to an environment, stored unchanged.
#[derive(Clone, Debug)]
pub struct PolicyRow {
    pub environment_id: EnvironmentId,
    pub serial: u64,
    /// SHA-256 (hex) of the signed policy TOML.
    pub policy_sha256: String,
    /// The DSSE envelope, JSON.
    pub envelope: String,
    pub relayed_by: String,
    pub relayed_at: Timestamp,
}

/// What became of a relayed policy.
#[derive(Debug, PartialEq, Eq)]
pub enum PutPolicy {
    Stored,
    /// The environment is not the tenant's.
    NoEnvironment,
    /// A policy with this serial or a later one is stored.
    NotNewer {
        stored: u64,
    },
}

const POLICY_COLUMNS: &str = "environment_id, serial, policy_sha256, envelope, relayed_by, relayed_at";

fn policy_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<PolicyRow, StoreError> {
    let serial: i64 = r.try_get("serial")?;
    Ok(PolicyRow {
        environment_id: parse_col(r, "environment_id")?,
        serial: u64::try_from(serial).map_err(|_| StoreError::Corrupt("policy serial".into()))?,
        policy_sha256: r.try_get("policy_sha256")?,
        envelope: r.try_get("envelope")?,
        relayed_by: r.try_get("relayed_by")?,
        relayed_at: ts_col(r, "relayed_at")?,
    })
}

impl Store {
    /// The policy last relayed to `env`, if `env` is the tenant's and has one.
    pub async fn environment_policy(
        &self,
        scope: &TenantScope,
        env: EnvironmentId,
    ) -> Result<Option<PolicyRow>, StoreError> {
        self.policy_reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let sql =
            format!("SELECT {POLICY_COLUMNS} FROM environment_policies WHERE tenant_id = $1 AND environment_id = $2");
        let row =
            sqlx::query(&sql).bind(scope.tenant().to_string()).bind(env.to_string()).fetch_optional(&self.pool).await?;
        row.as_ref().map(policy_from_row).transpose()
    }
}

impl WriteTx<'_> {
    /// Stores `policy` for its environment if the environment is the tenant's and the serial
    /// is strictly greater than the stored one's.
    pub async fn put_policy(&mut self, scope: &TenantScope, policy: &PolicyRow) -> Result<PutPolicy, StoreError> {
        let env = policy.environment_id.to_string();
        let owned = sqlx::query("SELECT 1 AS one FROM environments WHERE tenant_id = $1 AND id = $2")
            .bind(scope.tenant().to_string())
            .bind(&env)
            .fetch_optional(&mut *self.tx)
            .await?;
        if owned.is_none() {
            return Ok(PutPolicy::NoEnvironment);
        }
        let serial = i64::try_from(policy.serial)
            .map_err(|_| StoreError::Corrupt("a policy serial beyond 2^63 cannot be stored".into()))?;
        let stored =
            sqlx::query("SELECT serial FROM environment_policies WHERE tenant_id = $1 AND environment_id = $2")
                .bind(scope.tenant().to_string())
                .bind(&env)
                .fetch_optional(&mut *self.tx)
                .await?;
        if let Some(row) = stored {
            let stored: i64 = row.try_get("serial")?;
            if stored >= serial {
                return Ok(PutPolicy::NotNewer { stored: u64::try_from(stored).unwrap_or(0) });
            }
        }
        sqlx::query(
            "INSERT INTO environment_policies (environment_id, tenant_id, serial, policy_sha256, envelope, relayed_by, relayed_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (environment_id) DO UPDATE SET serial = excluded.serial,
               policy_sha256 = excluded.policy_sha256, envelope = excluded.envelope,
               relayed_by = excluded.relayed_by, relayed_at = excluded.relayed_at
             WHERE environment_policies.tenant_id = excluded.tenant_id",
        )
        .bind(&env)
        .bind(scope.tenant().to_string())
        .bind(serial)
        .bind(&policy.policy_sha256)
        .bind(&policy.envelope)
        .bind(&policy.relayed_by)
        .bind(policy.relayed_at.unix_millis())
        .execute(&mut *self.tx)
        .await?;
        Ok(PutPolicy::Stored)
    }
}

#[cfg(test)]
mod tests {
    use airlock_core::audit::Outcome;
    use airlock_core::token::{Secret, TokenKind};
    use airlock_testkit::op_id;

    use super::*;

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
        let listed: Vec<_> = store.list_appliances(&a, None).await.unwrap().into_iter().map(|r| r.id).collect();
        assert_eq!(listed, vec![apl_a]);
        assert!(store.list_appliances(&a, Some(eb)).await.unwrap().is_empty());
        assert!(store.get_appliance(&a, apl_b).await.unwrap().is_none());

        // Writes through A's scope cannot touch B's rows.
        let mut tx = store.write().await.unwrap();
        assert!(!tx.revoke_appliance(&a, apl_b, now()).await.unwrap());
        tx.record_renewal(&a, apl_b, "ff", now()).await.unwrap();
        tx.record_seen(&a, apl_b, "evil", now()).await.unwrap();
        tx.commit().await.unwrap();
        let row = store.get_appliance(&b, apl_b).await.unwrap().unwrap();
        assert!(row.revoked_at.is_none());
        assert_eq!((row.cert_serial.as_str(), row.version.as_str()), ("00", "1"));
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
            release_envelope: None,
            exit_code: None,
            output_sha256: None,
            output_size: None,
            refusal_code: None,
            deny_code: None,
            refusal_reason: None,
            result_at: None,
            output_stored: false,
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
        assert!(store.list_operations(&b, None, None, 10).await.unwrap().is_empty());
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
            let listed = store.list_operations(&a, None, None, 10).await;
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
                action: "test".into(),
                workspace: None,
                target: None,
                outcome: Outcome::Success,
                detail: serde_json::Value::Null,
            };
            tx.audit(&scope.chain(), now(), ev).await.unwrap();
            tx.commit().await.unwrap();
        }
        let results = verify_all_chains(&store).await.unwrap();
        let count =
            |scope: &TenantScope| results.iter().find(|(c, _)| *c == scope.chain()).unwrap().1.clone().unwrap().seq;
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
        assert_eq!(
            tx.redeem_join_token(&unknown.hash(), apl, now()).await.unwrap().unwrap_err(),
            RedeemRefusal::Unknown
        );
    }
}
