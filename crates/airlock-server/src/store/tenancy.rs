//! Tenants, workspaces, environments and the tokens that act on them: what `airlock server init` and the API create, and what authentication looks up before a scope exists.

use airlock_core::id::TokenId;
use airlock_core::token::TokenHash;
use airlock_core::{ApplianceId, EnvironmentId, TenantId, Timestamp, WorkspaceId};
use serde::Serialize;
use sqlx::Row;

use super::{Store, StoreError, WriteTx, conflict, parse_col, ts_col};
use crate::authz::TenantScope;

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

impl Store {
    pub async fn join_token_known(&self, hash: &TokenHash) -> Result<bool, StoreError> {
        let row = sqlx::query("SELECT 1 AS one FROM join_tokens WHERE token_hash = $1")
            .bind(hash.0.as_slice())
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.is_some())
    }

    pub async fn list_workspaces(&self, scope: &TenantScope) -> Result<Vec<Workspace>, StoreError> {
        // A scope confined to one workspace lists that one.
        let rows = sqlx::query(
            "SELECT id, name, created_at FROM workspaces WHERE tenant_id = $1 AND ($2 IS NULL OR id = $2) ORDER BY created_at, id",
        )
        .bind(scope.tenant().to_string())
        .bind(scope.workspace().map(|w| w.to_string()))
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

    /// Whether the workspace exists for this scope: in its tenant, and its workspace if it is confined to one.
    pub async fn workspace_exists(&self, scope: &TenantScope, ws: WorkspaceId) -> Result<bool, StoreError> {
        if scope.workspace().is_some_and(|own| own != ws) {
            return Ok(false);
        }
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
        // A scope confined to one workspace sees no environment of another: it is not found, so its existence does not leak.
        let row = sqlx::query(
            "SELECT id, workspace_id, name, created_at FROM environments WHERE tenant_id = $1 AND id = $2 AND ($3 IS NULL OR workspace_id = $3)",
        )
        .bind(scope.tenant().to_string())
        .bind(env.to_string())
        .bind(scope.workspace().map(|w| w.to_string()))
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(env_from_row).transpose()
    }
}

impl WriteTx<'_> {
    // ---- bootstrap (offline administration, before any principal exists) ----

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

    // ---- tenant-scoped ----

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
            let by = by
                .map(|b| b.parse())
                .transpose()
                .map_err(|e: airlock_core::id::IdParseError| StoreError::Corrupt(format!("column used_by: {e}")))?;
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
}

fn env_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<Environment, StoreError> {
    Ok(Environment {
        id: parse_col(r, "id")?,
        workspace_id: parse_col(r, "workspace_id")?,
        name: r.try_get("name")?,
        created_at: ts_col(r, "created_at")?,
    })
}
