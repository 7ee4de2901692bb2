//! Customer policies relayed to environments: the latest one of each, stored unchanged.

use airlock_core::{EnvironmentId, Timestamp};
use sqlx::Row;

use super::{Store, StoreError, WriteTx, parse_col, ts_col};
use crate::authz::TenantScope;

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
    /// Every environment, across tenants, with a relayed policy.
    pub async fn environments_with_policy(&self) -> Result<Vec<EnvironmentId>, StoreError> {
        let rows = sqlx::query("SELECT environment_id FROM environment_policies").fetch_all(&self.pool).await?;
        rows.iter().map(|r| parse_col(r, "environment_id")).collect()
    }

    /// The policy last relayed to `env`, if `env` is the tenant's and has one.
    pub async fn environment_policy(
        &self,
        scope: &TenantScope,
        env: EnvironmentId,
    ) -> Result<Option<PolicyRow>, StoreError> {
        self.policy_reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // A scope confined to one workspace sees no policy of another workspace's environment, as with the environment itself.
        let sql = format!(
            "SELECT {POLICY_COLUMNS} FROM environment_policies WHERE tenant_id = $1 AND environment_id = $2
               AND ($3 IS NULL OR environment_id IN (SELECT id FROM environments WHERE tenant_id = $1 AND workspace_id = $3))"
        );
        let row = sqlx::query(&sql)
            .bind(scope.tenant().to_string())
            .bind(env.to_string())
            .bind(scope.workspace().map(|w| w.to_string()))
            .fetch_optional(&self.pool)
            .await?;
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
                let stored = u64::try_from(stored)
                    .map_err(|_| StoreError::Corrupt(format!("column serial: {stored} is negative")))?;
                return Ok(PutPolicy::NotNewer { stored });
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
