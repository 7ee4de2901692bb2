//! Persistence: one interface over the embedded SQLite database.
//!
//! Every call that touches tenant data takes a [`TenantScope`](crate::authz::TenantScope) and binds its tenant id in the query, so a caller cannot forget the filter.
//! The SQL is kept portable (numbered placeholders, BIGINT/TEXT/BLOB, no SQLite-only functions) so a PostgreSQL backend can slot in behind the same methods.
//! Values the server reads back are parsed into their types; a row holding something no version of the server wrote (an unknown state or code, a malformed id) is [`StoreError::Corrupt`], never a default.
//!
//! The write transaction: every write goes through [`WriteTx`], one transaction begun `IMMEDIATE` under a process-wide write lock.
//! A mutation and its audit record commit together or not at all, so nothing is done unaudited, and an audit chain never forks.
//! A dropped transaction rolls back, which is how a domain function refuses half way.
//! Every acknowledged write, audit records included, survives power loss (`synchronous = FULL`).
//! Audit records with no effect beside them (reads, refusals) are group committed by [`AuditWriter`]: many records, one transaction, one fsync, each caller answered once its own record is durable.

mod appliances;
mod artifacts;
mod audit;
mod audit_signing;
mod audit_writer;
mod ca;
mod deployments;
mod identity;
mod join_rules;
mod operations;
mod policies;
mod read_cache;
mod releases;
mod rollouts;
mod sessions;
mod templates;
mod tenancy;
#[cfg(test)]
mod tests;
mod tokens;

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use airlock_core::Timestamp;
use serde::Serialize;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

pub use appliances::{ApplianceRow, CertificateStanding, JoinVia, RenewalState, Renewed};
pub use artifacts::ArtifactRow;
pub use audit::{HeadTampered, VerifyOptions, verify_all_chains, verify_all_chains_with};
pub use audit_signing::{AUDIT_KEY_FILE_NAME, CHECKPOINT_FILE_NAME, Pruned, StoredAuditKey};
pub use audit_writer::{AuditAppendError, AuditWriter};
pub use ca::StoredCa;
pub use deployments::StoredDeploymentStatus;
pub use identity::{IdpConfigRow, RoleMappingRow};
pub use operations::{OperationRow, PENDING_STATES, PushFrom, PushKey, ReleaseUpdate, ResultUpdate};
pub use policies::{PolicyRow, PutPolicy};
pub use releases::{ReleaseKeyRow, ReleaseRow};
pub use rollouts::{RolloutCreator, RolloutRow, RolloutTargetRow, UnfinishedRollout};
pub use sessions::{NewSession, SessionKind, SessionRow, parse_roles, roles_text};
pub use templates::TemplateRow;
pub use tenancy::{Environment, RedeemRefusal, RedeemedJoin, Workspace};
pub use tokens::{NewToken, StoredCredential, TokenRow};

pub const DB_FILE_NAME: &str = "airlock.db";
/// Entries per read cache: tokens and appliance lists are a few hundred bytes to a few KiB each.
const READ_CACHE_ENTRIES: usize = 4096;

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
    (7, "output_salt", include_str!("../../migrations/0007_output_salt.sql")),
    (8, "appliance_attestation", include_str!("../../migrations/0008_appliance_attestation.sql")),
    (9, "appliance_execution_key", include_str!("../../migrations/0009_appliance_execution_key.sql")),
    (10, "audit_signing", include_str!("../../migrations/0010_audit_signing.sql")),
    (11, "releases", include_str!("../../migrations/0011_releases.sql")),
    (12, "artifacts", include_str!("../../migrations/0012_artifacts.sql")),
    (13, "deployment_status", include_str!("../../migrations/0013_deployment_status.sql")),
    (14, "rollouts", include_str!("../../migrations/0014_rollouts.sql")),
    (15, "deployment_log_tails", include_str!("../../migrations/0015_deployment_log_tails.sql")),
    (16, "token_scopes", include_str!("../../migrations/0016_token_scopes.sql")),
    (17, "identity", include_str!("../../migrations/0017_identity.sql")),
    (18, "join_rules", include_str!("../../migrations/0018_join_rules.sql")),
    (19, "user_sessions", include_str!("../../migrations/0019_user_sessions.sql")),
    (20, "gcp_k8s_join", include_str!("../../migrations/0020_gcp_k8s_join.sql")),
    (25, "rollout_creators", include_str!("../../migrations/0025_rollout_creators.sql")),
    (26, "session_id_tokens", include_str!("../../migrations/0026_session_id_tokens.sql")),
    (27, "signer_certificates", include_str!("../../migrations/0027_signer_certificates.sql")),
    (29, "k8s_rule_token_request", include_str!("../../migrations/0029_k8s_rule_token_request.sql")),
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
    #[error(transparent)]
    Audit(#[from] AuditAppendError),
}

pub struct Store {
    pool: SqlitePool,
    write_lock: tokio::sync::Mutex<()>,
    head_mac: ring::hmac::Key,
    pending_reads: std::sync::atomic::AtomicU64,
    policy_reads: std::sync::atomic::AtomicU64,
    /// Bumped by every committed write; the caches below hold reads of one generation.
    generation: read_cache::Generation,
    /// Bumped after every commit that changed an operation's state: the rollout driver skips
    /// rollouts none of whose operations can have moved since it last looked.
    operation_states: read_cache::Generation,
    /// Live API tokens by hash: authentication is on every request.
    api_tokens: read_cache::ReadCache<airlock_core::token::TokenHash, StoredCredential>,
    /// Appliance lists by tenant, environment filter and workspace filters (the scope's, the query's): the fleet view
    /// operators poll.
    appliance_lists: read_cache::ReadCache<ApplianceListKey, std::sync::Arc<Vec<ApplianceRow>>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Counts commits that changed an operation's state, bumped once each has landed: read it
    /// before reading operations, and an equal count later means none of them moved since.
    pub fn operation_states_version(&self) -> u64 {
        self.operation_states.current()
    }

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
            generation: Default::default(),
            operation_states: Default::default(),
            api_tokens: read_cache::ReadCache::new(READ_CACHE_ENTRIES),
            appliance_lists: read_cache::ReadCache::new(READ_CACHE_ENTRIES),
        })
    }

    /// Opens (creating if asked) the database in `data_dir` and applies pending migrations.
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
            generation: Default::default(),
            operation_states: Default::default(),
            api_tokens: read_cache::ReadCache::new(READ_CACHE_ENTRIES),
            appliance_lists: read_cache::ReadCache::new(READ_CACHE_ENTRIES),
        };
        store.migrate().await?;
        // Only a store from before epochs (it has no audit key yet) has heads to upgrade; after
        // that, an old-style head was put back from an older copy, and stays for verify to report.
        if store.load_audit_key().await?.is_none() {
            store.upgrade_head_macs().await?;
        }
        Ok(store)
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let _guard = self.write_lock.lock().await;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, description TEXT NOT NULL, applied_at BIGINT NOT NULL)",
        )
        .execute(&self.pool)
        .await?;
        let applied: std::collections::BTreeSet<i64> = sqlx::query("SELECT version FROM schema_migrations")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| r.try_get("version"))
            .collect::<Result<_, _>>()?;
        let current = applied.last().copied().unwrap_or(0);
        let known = MIGRATIONS.last().map_or(0, |m| m.0);
        if current > known {
            return Err(StoreError::SchemaTooNew { found: current, known });
        }
        // Every migration not yet applied, not only those past the newest applied: features are
        // built in parallel and may land out of number order (0018 before 0017), and a store
        // that reached 18 must still get 17.
        for (version, description, sql) in MIGRATIONS.iter().filter(|m| !applied.contains(&m.0)) {
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
        Ok(WriteTx { _guard: guard, tx, store: self, operation_states_changed: false })
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
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
}

/// A write transaction holding the store's write lock.
pub struct WriteTx<'a> {
    _guard: tokio::sync::MutexGuard<'a, ()>,
    tx: sqlx::Transaction<'static, sqlx::Sqlite>,
    store: &'a Store,
    /// Whether this transaction changed an operation's state (see [`Store::operation_states_version`]).
    operation_states_changed: bool,
}

impl WriteTx<'_> {
    /// Commits, then ends every cached read (`read_cache`) before the caller can answer anyone.
    pub async fn commit(self) -> Result<(), StoreError> {
        let store = self.store;
        let operation_states_changed = self.operation_states_changed;
        let committed = self.tx.commit().await;
        // Bumped whatever the outcome: a commit that failed late may still have landed.
        store.generation.bump();
        if operation_states_changed {
            store.operation_states.bump();
        }
        committed?;
        Ok(())
    }

    /// Commits a transaction that appended audit records and nothing else: no cached read
    /// returns audit records, so the caches stay (the group commit runs on every read).
    pub(crate) async fn commit_audit_only(self) -> Result<(), StoreError> {
        self.tx.commit().await?;
        Ok(())
    }

    /// Commits a transaction that changed only what no cached read returns (a token's last use), so the caches stay.
    pub(crate) async fn commit_uncached(self) -> Result<(), StoreError> {
        self.tx.commit().await?;
        Ok(())
    }
}

fn conflict(e: sqlx::Error, what: &'static str, name: &str) -> StoreError {
    match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::Conflict { what, name: name.to_owned() },
        _ => StoreError::Db(e),
    }
}

/// What an appliance list is cached by: its tenant, its environment filter, and its workspace filters (the scope's,
/// the query's).
type ApplianceListKey =
    (airlock_core::TenantId, Option<airlock_core::EnvironmentId>, [Option<airlock_core::WorkspaceId>; 2]);

/// A table whose rows belong to one workspace and are named by id in the API.
#[derive(Clone, Copy)]
enum WorkspaceTable {
    Operations,
    Rollouts,
    /// An appliance belongs to its environment's workspace.
    Appliances,
}

impl Store {
    /// The workspace of the row `id` of `table`, if the scope sees it (its tenant's, within its
    /// workspace if confined).
    async fn workspace_of_row(
        &self,
        table: WorkspaceTable,
        scope: &crate::authz::TenantScope,
        id: &str,
    ) -> Result<Option<airlock_core::WorkspaceId>, StoreError> {
        let sql = match table {
            WorkspaceTable::Operations => {
                "SELECT workspace_id FROM operations WHERE tenant_id = $1 AND id = $2 AND ($3 IS NULL OR workspace_id = $3)"
            }
            WorkspaceTable::Rollouts => {
                "SELECT workspace_id FROM rollouts WHERE tenant_id = $1 AND id = $2 AND ($3 IS NULL OR workspace_id = $3)"
            }
            WorkspaceTable::Appliances => {
                "SELECT e.workspace_id FROM appliances a JOIN environments e ON e.id = a.environment_id
                 WHERE a.tenant_id = $1 AND e.tenant_id = $1 AND a.id = $2 AND ($3 IS NULL OR e.workspace_id = $3)"
            }
        };
        let row = sqlx::query(sql)
            .bind(scope.tenant().to_string())
            .bind(id)
            .bind(scope.workspace().map(|w| w.to_string()))
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| parse_col(&r, "workspace_id")).transpose()
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
fn code_text<T: Serialize>(code: T) -> Result<String, StoreError> {
    match serde_json::to_value(code) {
        Ok(serde_json::Value::String(s)) => Ok(s),
        // Codes are unit enum variants, which serialize as strings; anything else is a bug.
        other => Err(StoreError::Corrupt(format!("a code does not serialise as a name: {other:?}"))),
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

impl Store {}

impl WriteTx<'_> {}
