//! Templates: every version ever pushed, by content hash, and the one that is current.

use airlock_core::{Timestamp, WorkspaceId};
use sqlx::Row;

use super::{Store, StoreError, WriteTx, parse_col, ts_col};
use crate::authz::TenantScope;

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

const TEMPLATE_COLUMNS: &str = "workspace_id, name, content_sha256, manifest_toml, script, created_at";

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
