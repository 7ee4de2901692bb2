//! Vendor releases: a workspace's release-signing keys and the releases pushed into it. A
//! release row is written once and never updated (releases are immutable).

use airlock_core::{Timestamp, WorkspaceId};
use sqlx::Row;

use super::{Store, StoreError, WriteTx, parse_col, ts_col};
use crate::authz::TenantScope;

/// One release-signing key of a workspace (its public half).
#[derive(Clone, Debug)]
pub struct ReleaseKeyRow {
    pub workspace_id: WorkspaceId,
    pub key_id: String,
    pub public_pem: String,
    pub created_at: Timestamp,
    pub revoked_at: Option<Timestamp>,
}

/// One stored release.
#[derive(Clone, Debug)]
pub struct ReleaseRow {
    pub workspace_id: WorkspaceId,
    pub name: String,
    pub version: String,
    /// `VerifiedRelease::digest()`.
    pub digest: String,
    pub artifacts: u64,
    /// The DSSE envelope as pushed (JSON).
    pub envelope: String,
    pub pushed_by: String,
    pub pushed_at: Timestamp,
}

const KEY_COLUMNS: &str = "workspace_id, key_id, public_pem, created_at, revoked_at";
const RELEASE_COLUMNS: &str = "workspace_id, name, version, digest, artifacts, envelope, pushed_by, pushed_at";

impl Store {
    /// A workspace's release keys, revoked ones included, oldest first.
    pub async fn list_release_keys(
        &self,
        scope: &TenantScope,
        ws: WorkspaceId,
    ) -> Result<Vec<ReleaseKeyRow>, StoreError> {
        let sql = format!(
            "SELECT {KEY_COLUMNS} FROM release_keys WHERE tenant_id = $1 AND workspace_id = $2 ORDER BY created_at, key_id"
        );
        let rows =
            sqlx::query(&sql).bind(scope.tenant().to_string()).bind(ws.to_string()).fetch_all(&self.pool).await?;
        rows.iter().map(key_from_row).collect()
    }

    /// A workspace's releases, by name then push time.
    pub async fn list_releases(&self, scope: &TenantScope, ws: WorkspaceId) -> Result<Vec<ReleaseRow>, StoreError> {
        let sql = format!(
            "SELECT {RELEASE_COLUMNS} FROM releases WHERE tenant_id = $1 AND workspace_id = $2 ORDER BY name, pushed_at, version"
        );
        let rows =
            sqlx::query(&sql).bind(scope.tenant().to_string()).bind(ws.to_string()).fetch_all(&self.pool).await?;
        rows.iter().map(release_from_row).collect()
    }
}

impl WriteTx<'_> {
    /// Adds a release key; false if the workspace is not the tenant's. Adding a key the
    /// workspace holds is a `Conflict`.
    pub async fn add_release_key(&mut self, scope: &TenantScope, key: &ReleaseKeyRow) -> Result<bool, StoreError> {
        if !self.owns_workspace(scope, key.workspace_id).await? {
            return Ok(false);
        }
        let done = sqlx::query(
            "INSERT INTO release_keys (tenant_id, workspace_id, key_id, public_pem, created_at, revoked_at)
             VALUES ($1, $2, $3, $4, $5, NULL) ON CONFLICT DO NOTHING",
        )
        .bind(scope.tenant().to_string())
        .bind(key.workspace_id.to_string())
        .bind(&key.key_id)
        .bind(&key.public_pem)
        .bind(key.created_at.unix_millis())
        .execute(&mut *self.tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::Conflict { what: "release key", name: key.key_id.clone() });
        }
        Ok(true)
    }

    /// Revokes a release key (once: its first revocation time stays); `None` if the workspace
    /// has no such key.
    pub async fn revoke_release_key(
        &mut self,
        scope: &TenantScope,
        ws: WorkspaceId,
        key_id: &str,
        at: Timestamp,
    ) -> Result<Option<ReleaseKeyRow>, StoreError> {
        sqlx::query(
            "UPDATE release_keys SET revoked_at = $4
             WHERE tenant_id = $1 AND workspace_id = $2 AND key_id = $3 AND revoked_at IS NULL",
        )
        .bind(scope.tenant().to_string())
        .bind(ws.to_string())
        .bind(key_id)
        .bind(at.unix_millis())
        .execute(&mut *self.tx)
        .await?;
        let sql = format!(
            "SELECT {KEY_COLUMNS} FROM release_keys WHERE tenant_id = $1 AND workspace_id = $2 AND key_id = $3"
        );
        let row = sqlx::query(&sql)
            .bind(scope.tenant().to_string())
            .bind(ws.to_string())
            .bind(key_id)
            .fetch_optional(&mut *self.tx)
            .await?;
        row.as_ref().map(key_from_row).transpose()
    }

    /// The release stored under this name and version, read under the write lock.
    pub async fn release(
        &mut self,
        scope: &TenantScope,
        ws: WorkspaceId,
        name: &str,
        version: &str,
    ) -> Result<Option<ReleaseRow>, StoreError> {
        let sql = format!(
            "SELECT {RELEASE_COLUMNS} FROM releases WHERE tenant_id = $1 AND workspace_id = $2 AND name = $3 AND version = $4"
        );
        let row = sqlx::query(&sql)
            .bind(scope.tenant().to_string())
            .bind(ws.to_string())
            .bind(name)
            .bind(version)
            .fetch_optional(&mut *self.tx)
            .await?;
        row.as_ref().map(release_from_row).transpose()
    }

    /// Stores a new release; false if the workspace is not the tenant's. A name and version
    /// stored before is a `Conflict` (the caller compares digests first).
    pub async fn insert_release(&mut self, scope: &TenantScope, r: &ReleaseRow) -> Result<bool, StoreError> {
        if !self.owns_workspace(scope, r.workspace_id).await? {
            return Ok(false);
        }
        let done = sqlx::query(
            "INSERT INTO releases (tenant_id, workspace_id, name, version, digest, artifacts, envelope, pushed_by, pushed_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT DO NOTHING",
        )
        .bind(scope.tenant().to_string())
        .bind(r.workspace_id.to_string())
        .bind(&r.name)
        .bind(&r.version)
        .bind(&r.digest)
        .bind(i64::try_from(r.artifacts).unwrap_or(i64::MAX))
        .bind(&r.envelope)
        .bind(&r.pushed_by)
        .bind(r.pushed_at.unix_millis())
        .execute(&mut *self.tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::Conflict { what: "release", name: format!("{} {}", r.name, r.version) });
        }
        Ok(true)
    }

    async fn owns_workspace(&mut self, scope: &TenantScope, ws: WorkspaceId) -> Result<bool, StoreError> {
        let owned = sqlx::query("SELECT 1 AS one FROM workspaces WHERE tenant_id = $1 AND id = $2")
            .bind(scope.tenant().to_string())
            .bind(ws.to_string())
            .fetch_optional(&mut *self.tx)
            .await?;
        Ok(owned.is_some())
    }
}

fn key_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<ReleaseKeyRow, StoreError> {
    Ok(ReleaseKeyRow {
        workspace_id: parse_col(row, "workspace_id")?,
        key_id: row.try_get("key_id")?,
        public_pem: row.try_get("public_pem")?,
        created_at: ts_col(row, "created_at")?,
        revoked_at: super::opt_ts_col(row, "revoked_at")?,
    })
}

fn release_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<ReleaseRow, StoreError> {
    let artifacts: i64 = row.try_get("artifacts")?;
    Ok(ReleaseRow {
        workspace_id: parse_col(row, "workspace_id")?,
        name: row.try_get("name")?,
        version: row.try_get("version")?,
        digest: row.try_get("digest")?,
        artifacts: u64::try_from(artifacts).map_err(|_| StoreError::Corrupt("releases.artifacts".into()))?,
        envelope: row.try_get("envelope")?,
        pushed_by: row.try_get("pushed_by")?,
        pushed_at: ts_col(row, "pushed_at")?,
    })
}

impl Store {
    /// The release a deploy names, by digest or by name and version.
    pub async fn find_release(
        &self,
        scope: &TenantScope,
        ws: WorkspaceId,
        selector: &crate::releases::ReleaseSelector,
    ) -> Result<Option<ReleaseRow>, StoreError> {
        use crate::releases::ReleaseSelector;
        let base = format!("SELECT {RELEASE_COLUMNS} FROM releases WHERE tenant_id = $1 AND workspace_id = $2");
        let query = match selector {
            ReleaseSelector::Digest(digest) => {
                let sql = format!("{base} AND digest = $3");
                let q = sqlx::query(&sql).bind(scope.tenant().to_string()).bind(ws.to_string()).bind(digest);
                q.fetch_optional(&self.pool).await?
            }
            ReleaseSelector::Version { name, version } => {
                let sql = format!("{base} AND name = $3 AND version = $4");
                let q = sqlx::query(&sql).bind(scope.tenant().to_string()).bind(ws.to_string());
                q.bind(name).bind(version).fetch_optional(&self.pool).await?
            }
        };
        query.as_ref().map(release_from_row).transpose()
    }
}
