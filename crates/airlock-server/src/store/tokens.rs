//! API tokens: what authentication looks up by hash (before a scope exists), and what token management lists, rotates and revokes (in a scope).
//!
//! Only SHA-256 hashes are stored (`airlock_core::token`). A rotation moves the current hash to `previous_token_hash`, valid until `previous_valid_until`.
//! Rows found by hash are cached until the next write (`read_cache`); a rotation or a revocation is a write, so the very next request sees it.
//! Last use is written in batches that bump no cache generation: no cached read returns it.

use std::net::IpAddr;

use airlock_core::id::TokenId;
use airlock_core::token::TokenHash;
use airlock_core::{TenantId, Timestamp, WorkspaceId};
use sqlx::Row;

use super::{Store, StoreError, WriteTx, opt_ts_col, parse_col, ts_col};
use crate::authz::{ApiToken, Grants, PermissionSet, Role, TenantScope};

/// A token row found by one of its hashes, with what authentication must still check against the clock.
#[derive(Clone, Debug)]
pub struct StoredCredential {
    pub token: ApiToken,
    pub revoked_at: Option<Timestamp>,
    /// Set when the hash presented is the secret a rotation replaced: it works until then.
    pub previous_valid_until: Option<Timestamp>,
    pub matched_previous: bool,
}

/// A token as token management lists it: never a secret or a hash.
#[derive(Clone, Debug)]
pub struct TokenRow {
    pub id: TokenId,
    pub name: String,
    pub grants: Grants,
    pub created_at: Timestamp,
    pub created_by: Option<String>,
    pub rotated_at: Option<Timestamp>,
    pub previous_valid_until: Option<Timestamp>,
    pub revoked_at: Option<Timestamp>,
    pub last_used_at: Option<Timestamp>,
    pub last_used_from: Option<String>,
}

/// A new token's stored form.
#[derive(Debug)]
pub struct NewToken<'a> {
    pub id: TokenId,
    pub hash: &'a TokenHash,
    pub name: &'a str,
    pub grants: &'a Grants,
    pub created_by: Option<&'a str>,
}

const COLUMNS: &str = "id, tenant_id, name, role, workspace_id, actions, expires_at, created_at, created_by, rotated_at, previous_valid_until, revoked_at, last_used_at, last_used_from";

fn grants_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<Grants, StoreError> {
    let role: Role = parse_col(r, "role")?;
    let workspace: Option<String> = r.try_get("workspace_id")?;
    let workspace: Option<WorkspaceId> = workspace
        .map(|w| w.parse())
        .transpose()
        .map_err(|e: airlock_core::id::IdParseError| StoreError::Corrupt(format!("column workspace_id: {e}")))?;
    let actions: Option<String> = r.try_get("actions")?;
    let actions = actions
        .map(|a| PermissionSet::parse_text(&a))
        .transpose()
        .map_err(|e| StoreError::Corrupt(format!("column actions: {e}")))?;
    Ok(Grants::token(role, workspace, actions, opt_ts_col(r, "expires_at")?))
}

fn token_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<ApiToken, StoreError> {
    Ok(ApiToken { id: parse_col(r, "id")?, tenant: parse_col(r, "tenant_id")?, grants: grants_from_row(r)? })
}

fn row_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<TokenRow, StoreError> {
    Ok(TokenRow {
        id: parse_col(r, "id")?,
        name: r.try_get("name")?,
        grants: grants_from_row(r)?,
        created_at: ts_col(r, "created_at")?,
        created_by: r.try_get("created_by")?,
        rotated_at: opt_ts_col(r, "rotated_at")?,
        previous_valid_until: opt_ts_col(r, "previous_valid_until")?,
        revoked_at: opt_ts_col(r, "revoked_at")?,
        last_used_at: opt_ts_col(r, "last_used_at")?,
        last_used_from: r.try_get("last_used_from")?,
    })
}

impl Store {
    /// The token with this hash, current or replaced by a rotation, revoked or not. Found rows are cached
    /// until the next write (a rotation or a revocation is one); unknown hashes are not, so guessing cannot fill the cache.
    pub async fn find_api_token(&self, hash: &TokenHash) -> Result<Option<StoredCredential>, StoreError> {
        let generation = self.generation.current();
        if let Some(found) = self.api_tokens.get(generation, hash) {
            return Ok(Some(found));
        }
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS}, token_hash = $1 AS is_current FROM api_tokens WHERE token_hash = $1 OR previous_token_hash = $1"
        ))
        .bind(hash.0.as_slice())
        .fetch_optional(&self.pool)
        .await?;
        let Some(r) = row else { return Ok(None) };
        let is_current: bool = r.try_get("is_current")?;
        let found = StoredCredential {
            token: token_from_row(&r)?,
            revoked_at: opt_ts_col(&r, "revoked_at")?,
            previous_valid_until: opt_ts_col(&r, "previous_valid_until")?,
            matched_previous: !is_current,
        };
        self.api_tokens.insert(generation, *hash, found.clone());
        Ok(Some(found))
    }

    /// The unrevoked token whose current secret has this hash (expiry is the caller's to check).
    pub async fn api_token_by_hash(&self, hash: &TokenHash) -> Result<Option<ApiToken>, StoreError> {
        Ok(self.find_api_token(hash).await?.filter(|c| c.revoked_at.is_none() && !c.matched_previous).map(|c| c.token))
    }

    /// An unrevoked API token by its id: what a rollout acts as after a restart.
    pub async fn api_token_by_id(&self, id: TokenId) -> Result<Option<ApiToken>, StoreError> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM api_tokens WHERE id = $1 AND revoked_at IS NULL"))
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(token_from_row).transpose()
    }

    /// Every token of the scope's tenant, newest first, revoked ones included (they say when).
    pub async fn list_api_tokens(&self, scope: &TenantScope) -> Result<Vec<TokenRow>, StoreError> {
        let rows =
            sqlx::query(&format!("SELECT {COLUMNS} FROM api_tokens WHERE tenant_id = $1 ORDER BY created_at DESC, id"))
                .bind(scope.tenant().to_string())
                .fetch_all(&self.pool)
                .await?;
        rows.iter().map(row_from_row).collect()
    }

    pub async fn get_api_token(&self, scope: &TenantScope, id: TokenId) -> Result<Option<TokenRow>, StoreError> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM api_tokens WHERE tenant_id = $1 AND id = $2"))
            .bind(scope.tenant().to_string())
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(row_from_row).transpose()
    }

    /// Writes a batch of last uses (time, source address). Nothing cached holds them, so no cache is emptied.
    pub async fn record_token_uses(&self, uses: &[(TokenId, Timestamp, Option<IpAddr>)]) -> Result<(), StoreError> {
        if uses.is_empty() {
            return Ok(());
        }
        let mut tx = self.write().await?;
        for (id, at, from) in uses {
            sqlx::query(
                "UPDATE api_tokens SET last_used_at = $1, last_used_from = $2 WHERE id = $3 AND (last_used_at IS NULL OR last_used_at < $1)",
            )
            .bind(at.unix_millis())
            .bind(from.map(|a| a.to_string()))
            .bind(id.to_string())
            .execute(&mut *tx.tx)
            .await?;
        }
        tx.commit_uncached().await
    }
}

impl WriteTx<'_> {
    /// Stores a new token for `tenant`. Offline administration (`server init`, `tenant create`) calls it before any
    /// principal exists; the API calls it from token creation, which has checked the creator's bounds.
    pub async fn create_api_token(
        &mut self,
        tenant: TenantId,
        token: NewToken<'_>,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let role = token.grants.role().ok_or_else(|| StoreError::Corrupt("a token holds one role".into()))?;
        sqlx::query(
            "INSERT INTO api_tokens (id, tenant_id, token_hash, name, role, workspace_id, actions, expires_at, created_by, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(token.id.to_string())
        .bind(tenant.to_string())
        .bind(token.hash.0.as_slice())
        .bind(token.name)
        .bind(role.as_str())
        .bind(token.grants.workspace.map(|w| w.to_string()))
        .bind(token.grants.actions.map(PermissionSet::to_text))
        .bind(token.grants.expires_at.map(Timestamp::unix_millis))
        .bind(token.created_by)
        .bind(now.unix_millis())
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    /// Gives a live token of the scope's tenant a new secret; the old one works until `previous_valid_until`
    /// (a grace of 0 ends it now). False if there is no such live token.
    pub async fn rotate_api_token(
        &mut self,
        scope: &TenantScope,
        id: TokenId,
        new_hash: &TokenHash,
        previous_valid_until: Timestamp,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE api_tokens SET previous_token_hash = token_hash, previous_valid_until = $1, token_hash = $2, rotated_at = $3
             WHERE tenant_id = $4 AND id = $5 AND revoked_at IS NULL",
        )
        .bind(previous_valid_until.unix_millis())
        .bind(new_hash.0.as_slice())
        .bind(now.unix_millis())
        .bind(scope.tenant().to_string())
        .bind(id.to_string())
        .execute(&mut *self.tx)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Revokes a token of the scope's tenant, both its secrets. False if there is no such unrevoked token.
    pub async fn revoke_api_token(
        &mut self,
        scope: &TenantScope,
        id: TokenId,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE api_tokens SET revoked_at = $1 WHERE tenant_id = $2 AND id = $3 AND revoked_at IS NULL",
        )
        .bind(now.unix_millis())
        .bind(scope.tenant().to_string())
        .bind(id.to_string())
        .execute(&mut *self.tx)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Revokes every unrevoked token `id` made, and every token those made, transitively; their ids.
    pub async fn revoke_api_tokens_made_by(
        &mut self,
        scope: &TenantScope,
        id: TokenId,
        now: Timestamp,
    ) -> Result<Vec<TokenId>, StoreError> {
        // `UNION` (not `UNION ALL`) ends the walk even if `created_by` ever formed a cycle.
        let rows = sqlx::query(
            "WITH RECURSIVE made(id) AS (
                 SELECT id FROM api_tokens WHERE tenant_id = $1 AND created_by = 'token:' || $2
                 UNION
                 SELECT t.id FROM api_tokens t JOIN made m ON t.created_by = 'token:' || m.id WHERE t.tenant_id = $1
             )
             UPDATE api_tokens SET revoked_at = $3
             WHERE tenant_id = $1 AND revoked_at IS NULL AND id IN (SELECT id FROM made)
             RETURNING id",
        )
        .bind(scope.tenant().to_string())
        .bind(id.to_string())
        .bind(now.unix_millis())
        .fetch_all(&mut *self.tx)
        .await?;
        rows.iter()
            .map(|r| {
                let text: String = r.try_get("id")?;
                text.parse().map_err(|_| StoreError::Corrupt(format!("token id `{text}`")))
            })
            .collect()
    }
}
