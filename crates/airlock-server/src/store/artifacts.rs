//! Release artifacts: which workspace holds which blob (the bytes are on disk, shared, see
//! [`crate::artifacts`]), and which blobs each release names. Rows are written once, never
//! updated; every read binds the caller's tenant.

use airlock_core::{Timestamp, WorkspaceId};
use sqlx::Row;

use super::{Store, StoreError, WriteTx, parse_col, ts_col};
use crate::authz::TenantScope;

/// One artifact a workspace holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArtifactRow {
    pub workspace_id: WorkspaceId,
    /// Lowercase hex SHA-256.
    pub sha256: String,
    pub size: u64,
    pub created_at: Timestamp,
}

impl Store {
    /// The artifact with this digest in the workspace, if its bytes were uploaded there.
    pub async fn artifact(
        &self,
        scope: &TenantScope,
        ws: WorkspaceId,
        sha256: &str,
    ) -> Result<Option<ArtifactRow>, StoreError> {
        let row = sqlx::query(
            "SELECT workspace_id, sha256, size, created_at FROM artifacts
             WHERE tenant_id = $1 AND workspace_id = $2 AND sha256 = $3",
        )
        .bind(scope.tenant().to_string())
        .bind(ws.to_string())
        .bind(sha256)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(artifact_from_row).transpose()
    }

    /// How many bytes of artifacts the workspace holds (what its quota counts).
    pub async fn workspace_artifact_bytes(&self, scope: &TenantScope, ws: WorkspaceId) -> Result<u64, StoreError> {
        let used: i64 = sqlx::query_scalar(
            "SELECT COALESCE(SUM(size), 0) FROM artifacts WHERE tenant_id = $1 AND workspace_id = $2",
        )
        .bind(scope.tenant().to_string())
        .bind(ws.to_string())
        .fetch_one(&self.pool)
        .await?;
        u64::try_from(used).map_err(|_| StoreError::Corrupt("artifact sizes".into()))
    }

    /// Of `digests`, those the workspace does not hold, in the order given.
    pub async fn missing_artifacts(
        &self,
        scope: &TenantScope,
        ws: WorkspaceId,
        digests: &[&str],
    ) -> Result<Vec<String>, StoreError> {
        let mut missing = Vec::new();
        for d in digests {
            if self.artifact(scope, ws, d).await?.is_none() {
                missing.push((*d).to_owned());
            }
        }
        Ok(missing)
    }

    /// The artifact with this digest if a release of the workspace names it: what an appliance of
    /// that workspace may fetch.
    pub async fn released_artifact(
        &self,
        scope: &TenantScope,
        ws: WorkspaceId,
        sha256: &str,
    ) -> Result<Option<ArtifactRow>, StoreError> {
        let row = sqlx::query(
            "SELECT a.workspace_id, a.sha256, a.size, a.created_at FROM artifacts a
             WHERE a.tenant_id = $1 AND a.workspace_id = $2 AND a.sha256 = $3
               AND EXISTS (SELECT 1 FROM release_artifacts r
                           WHERE r.tenant_id = a.tenant_id AND r.workspace_id = a.workspace_id AND r.sha256 = a.sha256)",
        )
        .bind(scope.tenant().to_string())
        .bind(ws.to_string())
        .bind(sha256)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(artifact_from_row).transpose()
    }
}

impl WriteTx<'_> {
    /// Records that the workspace holds an artifact, if the workspace's artifacts with it stay
    /// within `quota` bytes; false if a row was there already (another upload of the same bytes
    /// won) or it would not fit, in which case nothing changed.
    pub async fn insert_artifact(
        &mut self,
        scope: &TenantScope,
        a: &ArtifactRow,
        quota: u64,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "INSERT INTO artifacts (tenant_id, workspace_id, sha256, size, created_at)
             SELECT $1, $2, $3, $4, $5 WHERE EXISTS (SELECT 1 FROM workspaces WHERE tenant_id = $1 AND id = $2)
               AND (SELECT COALESCE(SUM(size), 0) FROM artifacts WHERE tenant_id = $1 AND workspace_id = $2) + $4 <= $6
             ON CONFLICT DO NOTHING",
        )
        .bind(scope.tenant().to_string())
        .bind(a.workspace_id.to_string())
        .bind(&a.sha256)
        .bind(i64::try_from(a.size).map_err(|_| StoreError::Corrupt("artifact size".into()))?)
        .bind(a.created_at.unix_millis())
        .bind(i64::try_from(quota).unwrap_or(i64::MAX))
        .execute(&mut *self.tx)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Records the artifacts a release names, with the release.
    pub async fn insert_release_artifacts(
        &mut self,
        scope: &TenantScope,
        ws: WorkspaceId,
        name: &str,
        version: &str,
        digests: &[&str],
    ) -> Result<(), StoreError> {
        for d in digests {
            sqlx::query(
                "INSERT INTO release_artifacts (tenant_id, workspace_id, name, version, sha256)
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            )
            .bind(scope.tenant().to_string())
            .bind(ws.to_string())
            .bind(name)
            .bind(version)
            .bind(d)
            .execute(&mut *self.tx)
            .await?;
        }
        Ok(())
    }
}

fn artifact_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<ArtifactRow, StoreError> {
    let size: i64 = row.try_get("size")?;
    Ok(ArtifactRow {
        workspace_id: parse_col(row, "workspace_id")?,
        sha256: row.try_get("sha256")?,
        size: u64::try_from(size).map_err(|_| StoreError::Corrupt("artifacts.size".into()))?,
        created_at: ts_col(row, "created_at")?,
    })
}
