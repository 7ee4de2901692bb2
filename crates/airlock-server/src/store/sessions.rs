//! Signed-in users' sessions (`crate::sso::sessions`): found by the hash of their secret before a scope exists, ended in a scope.
//!
//! Only the SHA-256 of a session secret is stored. Sessions are not cached: ending one is a write the very next request reads.

use airlock_core::id::SessionId;
use airlock_core::token::TokenHash;
use airlock_core::{TenantId, Timestamp, WorkspaceId};
use sqlx::Row;

use super::{Store, StoreError, WriteTx, opt_ts_col, parse_col, ts_col};
use crate::authz::{Role, TenantScope};

/// How the session's secret is held: a browser's cookie, or the CLI's bearer credential.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionKind {
    Browser,
    Cli,
}

impl SessionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionKind::Browser => "browser",
            SessionKind::Cli => "cli",
        }
    }
}

impl std::str::FromStr for SessionKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "browser" => Ok(SessionKind::Browser),
            "cli" => Ok(SessionKind::Cli),
            other => Err(format!("unknown session kind `{}`", other.chars().take(20).collect::<String>())),
        }
    }
}

/// A session as stored (never its secret).
#[derive(Clone, Debug)]
pub struct SessionRow {
    pub id: SessionId,
    pub tenant: TenantId,
    pub subject: String,
    pub email: Option<String>,
    pub roles: Vec<(Role, Option<WorkspaceId>)>,
    pub kind: SessionKind,
    pub auth_time: Timestamp,
    pub created_at: Timestamp,
    pub last_seen_at: Timestamp,
    pub ended_at: Option<Timestamp>,
}

/// A new session's stored form.
#[derive(Debug)]
pub struct NewSession<'a> {
    pub id: SessionId,
    pub hash: &'a TokenHash,
    pub subject: &'a str,
    pub email: Option<&'a str>,
    pub roles: &'a [(Role, Option<WorkspaceId>)],
    pub kind: SessionKind,
    pub auth_time: Timestamp,
    /// The ID token it was opened with, sealed ([`crate::sso::login`]); for the provider's logout.
    pub id_token_sealed: Option<&'a [u8]>,
}

/// Roles as stored: `role` or `role@wsp_…`, space separated.
pub fn roles_text(roles: &[(Role, Option<WorkspaceId>)]) -> String {
    roles
        .iter()
        .map(|(r, ws)| match ws {
            Some(ws) => format!("{}@{ws}", r.as_str()),
            None => r.as_str().to_owned(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn parse_roles(text: &str) -> Result<Vec<(Role, Option<WorkspaceId>)>, String> {
    text.split(' ')
        .filter(|s| !s.is_empty())
        .map(|item| match item.split_once('@') {
            Some((role, ws)) => {
                Ok((role.parse()?, Some(ws.parse().map_err(|e: airlock_core::id::IdParseError| e.to_string())?)))
            }
            None => Ok((item.parse()?, None)),
        })
        .collect()
}

const COLUMNS: &str = "id, tenant_id, subject, email, roles, kind, auth_time, created_at, last_seen_at, ended_at";

fn session_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<SessionRow, StoreError> {
    let roles: String = r.try_get("roles")?;
    Ok(SessionRow {
        id: parse_col(r, "id")?,
        tenant: parse_col(r, "tenant_id")?,
        subject: r.try_get("subject")?,
        email: r.try_get("email")?,
        roles: parse_roles(&roles).map_err(|e| StoreError::Corrupt(format!("column roles: {e}")))?,
        kind: parse_col(r, "kind")?,
        auth_time: ts_col(r, "auth_time")?,
        created_at: ts_col(r, "created_at")?,
        last_seen_at: ts_col(r, "last_seen_at")?,
        ended_at: opt_ts_col(r, "ended_at")?,
    })
}

impl Store {
    /// The session whose secret has this hash, ended or not (timeouts are the caller's to check against the clock).
    pub async fn find_session(&self, hash: &TokenHash) -> Result<Option<SessionRow>, StoreError> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM user_sessions WHERE secret_hash = $1"))
            .bind(hash.0.as_slice())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(session_from_row).transpose()
    }

    /// Notes a live session's last use. Nothing cached holds it, so no cache is emptied.
    pub async fn touch_session(&self, id: SessionId, now: Timestamp) -> Result<(), StoreError> {
        let mut tx = self.write().await?;
        sqlx::query(
            "UPDATE user_sessions SET last_seen_at = $1 WHERE id = $2 AND ended_at IS NULL AND last_seen_at < $1",
        )
        .bind(now.unix_millis())
        .bind(id.to_string())
        .execute(&mut *tx.tx)
        .await?;
        tx.commit_uncached().await
    }

    /// The sealed ID token a session of the scope's tenant was opened with, if it kept one.
    pub async fn session_id_token(&self, scope: &TenantScope, id: SessionId) -> Result<Option<Vec<u8>>, StoreError> {
        let row = sqlx::query("SELECT id_token_sealed FROM user_sessions WHERE tenant_id = $1 AND id = $2")
            .bind(scope.tenant().to_string())
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get::<Option<Vec<u8>>, _>("id_token_sealed")).transpose()?.flatten())
    }

    /// When an admin last ended `subject`'s sessions in the scope's tenant, if ever.
    pub async fn session_cut_off(&self, scope: &TenantScope, subject: &str) -> Result<Option<Timestamp>, StoreError> {
        let row = sqlx::query("SELECT cut_off_at FROM user_session_cutoffs WHERE tenant_id = $1 AND subject = $2")
            .bind(scope.tenant().to_string())
            .bind(subject)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| ts_col(&r, "cut_off_at")).transpose()
    }
}

impl WriteTx<'_> {
    pub async fn create_session(
        &mut self,
        scope: &TenantScope,
        s: NewSession<'_>,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO user_sessions (id, tenant_id, secret_hash, subject, email, roles, kind, auth_time, created_at, last_seen_at,
                id_token_sealed)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9, $10)",
        )
        .bind(s.id.to_string())
        .bind(scope.tenant().to_string())
        .bind(s.hash.0.as_slice())
        .bind(s.subject)
        .bind(s.email)
        .bind(roles_text(s.roles))
        .bind(s.kind.as_str())
        .bind(s.auth_time.unix_millis())
        .bind(now.unix_millis())
        .bind(s.id_token_sealed)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    /// Ends one live session of the scope's tenant; false if it had already ended.
    pub async fn end_session(
        &mut self,
        scope: &TenantScope,
        id: SessionId,
        reason: &str,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE user_sessions SET ended_at = $1, end_reason = $2 WHERE tenant_id = $3 AND id = $4 AND ended_at IS NULL",
        )
        .bind(now.unix_millis())
        .bind(reason)
        .bind(scope.tenant().to_string())
        .bind(id.to_string())
        .execute(&mut *self.tx)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Ends every live session of `subject` in the scope's tenant; how many.
    pub async fn end_user_sessions(
        &mut self,
        scope: &TenantScope,
        subject: &str,
        reason: &str,
        now: Timestamp,
    ) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "UPDATE user_sessions SET ended_at = $1, end_reason = $2 WHERE tenant_id = $3 AND subject = $4 AND ended_at IS NULL",
        )
        .bind(now.unix_millis())
        .bind(reason)
        .bind(scope.tenant().to_string())
        .bind(subject)
        .execute(&mut *self.tx)
        .await?;
        Ok(done.rows_affected())
    }

    /// Records that `subject`'s authority was cut off at `now` (an admin ended their sessions), whether or not a session
    /// was live: what the user set going before then (a rollout) reads it and stops. Never moves back.
    pub async fn cut_off_user_sessions(
        &mut self,
        scope: &TenantScope,
        subject: &str,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO user_session_cutoffs (tenant_id, subject, cut_off_at) VALUES ($1, $2, $3)
             ON CONFLICT (tenant_id, subject) DO UPDATE SET cut_off_at = MAX(cut_off_at, excluded.cut_off_at)",
        )
        .bind(scope.tenant().to_string())
        .bind(subject)
        .bind(now.unix_millis())
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }
}
