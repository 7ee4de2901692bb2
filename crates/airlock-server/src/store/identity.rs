//! Each tenant's identity provider (its client secret sealed, `crate::sso::idp`) and the mappings of its groups to roles (`crate::sso::mappings`).
//!
//! Read in a scope: by identity management, and at sign-in in the tenant the login names (`TenantScope::for_system`).

use airlock_core::id::RoleMappingId;
use airlock_core::{Timestamp, WorkspaceId};
use sqlx::Row;

use super::{Store, StoreError, WriteTx, conflict, parse_col, ts_col};
use crate::authz::{Role, TenantScope};

/// A tenant's identity-provider configuration as stored; the client secret only sealed.
#[derive(Clone, Debug)]
pub struct IdpConfigRow {
    pub issuer: String,
    pub client_id: String,
    pub client_secret_sealed: Vec<u8>,
    pub scopes: Vec<String>,
    pub groups_claim: String,
    pub require_mfa: bool,
    pub max_age_seconds: Option<u64>,
    pub updated_at: Timestamp,
    pub updated_by: String,
}

/// One group mapped to one role, tenant-wide or in one workspace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoleMappingRow {
    pub id: RoleMappingId,
    pub group: String,
    pub role: Role,
    pub workspace: Option<WorkspaceId>,
    pub created_at: Timestamp,
    pub created_by: String,
}

fn idp_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<IdpConfigRow, StoreError> {
    let scopes: String = r.try_get("scopes")?;
    let require_mfa: i64 = r.try_get("require_mfa")?;
    let max_age: Option<i64> = r.try_get("max_age_seconds")?;
    let max_age_seconds = max_age
        .map(u64::try_from)
        .transpose()
        .map_err(|_| StoreError::Corrupt("column max_age_seconds: negative".into()))?;
    Ok(IdpConfigRow {
        issuer: r.try_get("issuer")?,
        client_id: r.try_get("client_id")?,
        client_secret_sealed: r.try_get("client_secret_sealed")?,
        scopes: scopes.split(' ').filter(|s| !s.is_empty()).map(str::to_owned).collect(),
        groups_claim: r.try_get("groups_claim")?,
        require_mfa: require_mfa != 0,
        max_age_seconds,
        updated_at: ts_col(r, "updated_at")?,
        updated_by: r.try_get("updated_by")?,
    })
}

fn mapping_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<RoleMappingRow, StoreError> {
    let workspace: Option<String> = r.try_get("workspace_id")?;
    let workspace = workspace
        .map(|w| w.parse())
        .transpose()
        .map_err(|e: airlock_core::id::IdParseError| StoreError::Corrupt(format!("column workspace_id: {e}")))?;
    Ok(RoleMappingRow {
        id: parse_col(r, "id")?,
        group: r.try_get("idp_group")?,
        role: parse_col(r, "role")?,
        workspace,
        created_at: ts_col(r, "created_at")?,
        created_by: r.try_get("created_by")?,
    })
}

const MAPPING_COLUMNS: &str = "id, idp_group, role, workspace_id, created_at, created_by";

impl Store {
    pub async fn idp_config(&self, scope: &TenantScope) -> Result<Option<IdpConfigRow>, StoreError> {
        let row = sqlx::query(
            "SELECT issuer, client_id, client_secret_sealed, scopes, groups_claim, require_mfa, max_age_seconds, updated_at, updated_by
             FROM idp_configs WHERE tenant_id = $1",
        )
        .bind(scope.tenant().to_string())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(idp_from_row).transpose()
    }

    /// Every mapping of the scope's tenant, oldest first.
    pub async fn list_role_mappings(&self, scope: &TenantScope) -> Result<Vec<RoleMappingRow>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {MAPPING_COLUMNS} FROM role_mappings WHERE tenant_id = $1 ORDER BY created_at, id"
        ))
        .bind(scope.tenant().to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(mapping_from_row).collect()
    }

    pub async fn role_mapping(
        &self,
        scope: &TenantScope,
        id: RoleMappingId,
    ) -> Result<Option<RoleMappingRow>, StoreError> {
        let row = sqlx::query(&format!("SELECT {MAPPING_COLUMNS} FROM role_mappings WHERE tenant_id = $1 AND id = $2"))
            .bind(scope.tenant().to_string())
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(mapping_from_row).transpose()
    }
}

impl WriteTx<'_> {
    /// Sets (creates or replaces) the scope's tenant's identity provider.
    pub async fn put_idp_config(&mut self, scope: &TenantScope, c: &IdpConfigRow) -> Result<(), StoreError> {
        let max_age = c
            .max_age_seconds
            .map(i64::try_from)
            .transpose()
            .map_err(|_| StoreError::Corrupt("max_age_seconds out of range".into()))?;
        sqlx::query(
            "INSERT INTO idp_configs (tenant_id, issuer, client_id, client_secret_sealed, scopes, groups_claim, require_mfa, max_age_seconds, updated_at, updated_by)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
             ON CONFLICT (tenant_id) DO UPDATE SET issuer = excluded.issuer, client_id = excluded.client_id,
               client_secret_sealed = excluded.client_secret_sealed, scopes = excluded.scopes, groups_claim = excluded.groups_claim,
               require_mfa = excluded.require_mfa, max_age_seconds = excluded.max_age_seconds,
               updated_at = excluded.updated_at, updated_by = excluded.updated_by",
        )
        .bind(scope.tenant().to_string())
        .bind(&c.issuer)
        .bind(&c.client_id)
        .bind(c.client_secret_sealed.as_slice())
        .bind(c.scopes.join(" "))
        .bind(&c.groups_claim)
        .bind(i64::from(c.require_mfa))
        .bind(max_age)
        .bind(c.updated_at.unix_millis())
        .bind(&c.updated_by)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    pub async fn count_role_mappings(&mut self, scope: &TenantScope) -> Result<usize, StoreError> {
        let n: i64 = sqlx::query("SELECT COUNT(*) AS n FROM role_mappings WHERE tenant_id = $1")
            .bind(scope.tenant().to_string())
            .fetch_one(&mut *self.tx)
            .await?
            .try_get("n")?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    /// Adds a mapping; the same group, role and place twice is a conflict.
    pub async fn add_role_mapping(&mut self, scope: &TenantScope, m: &RoleMappingRow) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO role_mappings (id, tenant_id, idp_group, role, workspace_id, created_at, created_by)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(m.id.to_string())
        .bind(scope.tenant().to_string())
        .bind(&m.group)
        .bind(m.role.as_str())
        .bind(m.workspace.map(|w| w.to_string()))
        .bind(m.created_at.unix_millis())
        .bind(&m.created_by)
        .execute(&mut *self.tx)
        .await
        .map_err(|e| conflict(e, "role mapping", &format!("{} → {}", m.group, m.role.as_str())))?;
        Ok(())
    }

    /// Removes a mapping of the scope's tenant; false if there is none.
    pub async fn remove_role_mapping(&mut self, scope: &TenantScope, id: RoleMappingId) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM role_mappings WHERE tenant_id = $1 AND id = $2")
            .bind(scope.tenant().to_string())
            .bind(id.to_string())
            .execute(&mut *self.tx)
            .await?;
        Ok(done.rows_affected() == 1)
    }
}
