//! Rollouts and their targets (one per appliance), with every state a rollout's driver needs to
//! carry on after a restart.

use airlock_core::id::{SessionId, TokenId};
use airlock_core::operation::OperationState;
use airlock_core::{ApplianceId, EnvironmentId, OperationId, RolloutId, Timestamp, WorkspaceId};
use sqlx::Row;

use super::sessions::{parse_roles, roles_text};
use super::{Store, StoreError, WriteTx, code_col, code_text, parse_col, ts_col};
use crate::authz::{Role, TenantScope};
use crate::rollouts::{RolloutState, TargetState};

#[derive(Clone, Debug)]
pub struct RolloutRow {
    pub id: RolloutId,
    pub tenant_id: airlock_core::TenantId,
    pub workspace_id: WorkspaceId,
    pub release_digest: String,
    pub release_name: String,
    pub release_version: String,
    pub concurrency: u32,
    pub max_failures: u32,
    pub reason: String,
    pub created_by: RolloutCreator,
    pub state: RolloutState,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

/// Who created a rollout, and so whose authority its driver acts with (`crate::rollouts`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RolloutCreator {
    /// An API token, looked up again at every round: revoked or expired, it halts the rollout.
    Token(TokenId),
    /// A signed-in user: the session the rollout was created in and that session's roles as they applied in the
    /// rollout's workspace, a snapshot; an admin ending the user's sessions after the creation halts it.
    User { subject: String, session: SessionId, roles: Vec<(Role, Option<WorkspaceId>)> },
}

impl RolloutCreator {
    /// The stored columns: `creator_kind`, `created_by`, `creator_session`, `creator_roles`.
    fn columns(&self) -> (&'static str, String, Option<String>, Option<String>) {
        match self {
            RolloutCreator::Token(id) => ("token", id.to_string(), None, None),
            RolloutCreator::User { subject, session, roles } => {
                ("user", subject.clone(), Some(session.to_string()), Some(roles_text(roles)))
            }
        }
    }

    /// Read back strictly: a kind this build does not know, or a user without its session and roles, is corrupt.
    fn from_row(row: &sqlx::sqlite::SqliteRow) -> Result<Self, StoreError> {
        let kind: String = row.try_get("creator_kind")?;
        let session: Option<String> = row.try_get("creator_session")?;
        let roles: Option<String> = row.try_get("creator_roles")?;
        match (kind.as_str(), session, roles) {
            ("token", None, None) => Ok(RolloutCreator::Token(parse_col(row, "created_by")?)),
            ("user", Some(session), Some(roles)) => Ok(RolloutCreator::User {
                subject: row.try_get("created_by")?,
                session: session.parse().map_err(|e| StoreError::Corrupt(format!("rollouts.creator_session: {e}")))?,
                roles: parse_roles(&roles).map_err(|e| StoreError::Corrupt(format!("rollouts.creator_roles: {e}")))?,
            }),
            _ => Err(StoreError::Corrupt("rollouts.creator_kind".into())),
        }
    }
}

/// A rollout the driver visits: enough to make its creator's scope before reading anything else of it.
#[derive(Clone, Debug)]
pub struct UnfinishedRollout {
    pub id: RolloutId,
    pub tenant: airlock_core::TenantId,
    pub created_at: Timestamp,
    pub creator: RolloutCreator,
}

#[derive(Clone, Debug)]
pub struct RolloutTargetRow {
    pub position: u32,
    pub environment_id: EnvironmentId,
    pub appliance_id: ApplianceId,
    pub operation_id: Option<OperationId>,
    pub state: TargetState,
    pub detail: String,
    pub updated_at: Timestamp,
}

/// Rows per multi-row INSERT: 9 parameters each, far below SQLite's limit of 32,766.
const INSERT_ROWS: usize = 512;

const ROLLOUT_COLUMNS: &str = "id, tenant_id, workspace_id, release_digest, release_name, release_version, concurrency, \
     max_failures, reason, creator_kind, created_by, creator_session, creator_roles, state, created_at, updated_at";
const TARGET_COLUMNS: &str = "position, environment_id, appliance_id, operation_id, state, detail, updated_at";

impl Store {
    /// A rollout of the tenant's, within the scope's workspace if it is confined to one (another's is not found).
    pub async fn rollout(&self, scope: &TenantScope, id: RolloutId) -> Result<Option<RolloutRow>, StoreError> {
        let sql = format!(
            "SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE tenant_id = $1 AND id = $2 AND ($3 IS NULL OR workspace_id = $3)"
        );
        let row = sqlx::query(&sql)
            .bind(scope.tenant().to_string())
            .bind(id.to_string())
            .bind(scope.workspace().map(|w| w.to_string()))
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(rollout_from_row).transpose()
    }

    /// The workspace of a rollout the scope sees: what the API's gate confines a user whose roles span workspaces to.
    pub async fn rollout_workspace(
        &self,
        scope: &TenantScope,
        id: RolloutId,
    ) -> Result<Option<WorkspaceId>, StoreError> {
        self.workspace_of_row(super::WorkspaceTable::Rollouts, scope, &id.to_string()).await
    }

    /// A workspace's rollouts, newest first.
    pub async fn list_rollouts(&self, scope: &TenantScope, ws: WorkspaceId) -> Result<Vec<RolloutRow>, StoreError> {
        let sql = format!(
            "SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE tenant_id = $1 AND workspace_id = $2 ORDER BY created_at DESC, id"
        );
        let rows =
            sqlx::query(&sql).bind(scope.tenant().to_string()).bind(ws.to_string()).fetch_all(&self.pool).await?;
        rows.iter().map(rollout_from_row).collect()
    }

    /// A rollout's targets, in order.
    pub async fn rollout_targets(
        &self,
        scope: &TenantScope,
        id: RolloutId,
    ) -> Result<Vec<RolloutTargetRow>, StoreError> {
        let sql = format!(
            "SELECT {TARGET_COLUMNS} FROM rollout_targets WHERE tenant_id = $1 AND rollout_id = $2 ORDER BY position"
        );
        let rows =
            sqlx::query(&sql).bind(scope.tenant().to_string()).bind(id.to_string()).fetch_all(&self.pool).await?;
        rows.iter().map(target_from_row).collect()
    }

    /// The state and exit code of every operation a rollout's targets requested, in one read
    /// (the driver refreshes thousands of targets a round).
    pub async fn rollout_operation_states(
        &self,
        scope: &TenantScope,
        id: RolloutId,
    ) -> Result<std::collections::HashMap<OperationId, (OperationState, Option<i64>)>, StoreError> {
        let rows = sqlx::query(
            // CROSS JOIN keeps SQLite's loop order: the rollout's targets, then each one's
            // operation by primary key (not every operation of the tenant for each target).
            "SELECT o.id, o.state, o.exit_code FROM rollout_targets t CROSS JOIN operations o
             WHERE t.tenant_id = $1 AND t.rollout_id = $2 AND o.id = t.operation_id AND o.tenant_id = $1",
        )
        .bind(scope.tenant().to_string())
        .bind(id.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| Ok((parse_col(r, "id")?, (parse_col(r, "state")?, r.try_get("exit_code")?)))).collect()
    }

    /// The tenant a rollout belongs to (for the driver's own records).
    pub async fn rollout_tenant(&self, id: RolloutId) -> Result<Option<airlock_core::TenantId>, StoreError> {
        let row = sqlx::query("SELECT tenant_id FROM rollouts WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| parse_col(&r, "tenant_id")).transpose()
    }

    /// Every rollout, in every tenant, that may still have work: what the driver visits. (The
    /// driver then acts on each through a scope made from its creator.)
    pub async fn unfinished_rollouts(&self) -> Result<Vec<UnfinishedRollout>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, tenant_id, created_at, creator_kind, created_by, creator_session, creator_roles FROM rollouts
             WHERE state IN ('running', 'halting') ORDER BY created_at",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(UnfinishedRollout {
                    id: parse_col(r, "id")?,
                    tenant: parse_col(r, "tenant_id")?,
                    created_at: ts_col(r, "created_at")?,
                    creator: RolloutCreator::from_row(r)?,
                })
            })
            .collect()
    }
}

impl WriteTx<'_> {
    /// Stores a new rollout and its targets.
    pub async fn insert_rollout(
        &mut self,
        scope: &TenantScope,
        r: &RolloutRow,
        targets: &[RolloutTargetRow],
    ) -> Result<(), StoreError> {
        let (creator_kind, created_by, creator_session, creator_roles) = r.created_by.columns();
        sqlx::query(
            "INSERT INTO rollouts (id, tenant_id, workspace_id, release_digest, release_name, release_version,
                concurrency, max_failures, reason, creator_kind, created_by, creator_session, creator_roles, state,
                created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)",
        )
        .bind(r.id.to_string())
        .bind(scope.tenant().to_string())
        .bind(r.workspace_id.to_string())
        .bind(&r.release_digest)
        .bind(&r.release_name)
        .bind(&r.release_version)
        .bind(i64::from(r.concurrency))
        .bind(i64::from(r.max_failures))
        .bind(&r.reason)
        .bind(creator_kind)
        .bind(created_by)
        .bind(creator_session)
        .bind(creator_roles)
        .bind(code_text(r.state)?)
        .bind(r.created_at.unix_millis())
        .bind(r.updated_at.unix_millis())
        .execute(&mut *self.tx)
        .await?;
        self.put_rollout_targets(scope, r.id, targets.iter()).await
    }

    /// Writes a target (insert or replace).
    pub async fn put_rollout_target(
        &mut self,
        scope: &TenantScope,
        rollout: RolloutId,
        t: &RolloutTargetRow,
    ) -> Result<(), StoreError> {
        self.put_rollout_targets(scope, rollout, std::iter::once(t)).await
    }

    /// Writes targets (insert or replace), with a few multi-row statements rather than one per
    /// target: each statement is a round trip to SQLite's worker thread, and a round of a large
    /// rollout writes thousands.
    pub async fn put_rollout_targets<'t>(
        &mut self,
        scope: &TenantScope,
        rollout: RolloutId,
        targets: impl Iterator<Item = &'t RolloutTargetRow>,
    ) -> Result<(), StoreError> {
        let (rollout, tenant) = (rollout.to_string(), scope.tenant().to_string());
        let rows = targets.map(|t| Ok((t, code_text(t.state)?))).collect::<Result<Vec<_>, StoreError>>()?;
        for chunk in rows.chunks(INSERT_ROWS) {
            let mut insert = sqlx::QueryBuilder::new(
                "INSERT INTO rollout_targets (rollout_id, tenant_id, position, environment_id, appliance_id,
                    operation_id, state, detail, updated_at) ",
            );
            insert.push_values(chunk, |mut row, (t, state)| {
                row.push_bind(rollout.as_str())
                    .push_bind(tenant.as_str())
                    .push_bind(i64::from(t.position))
                    .push_bind(t.environment_id.to_string())
                    .push_bind(t.appliance_id.to_string())
                    .push_bind(t.operation_id.map(|o| o.to_string()))
                    .push_bind(state.clone())
                    .push_bind(t.detail.as_str())
                    .push_bind(t.updated_at.unix_millis());
            });
            insert.push(
                " ON CONFLICT (rollout_id, position) DO UPDATE SET operation_id = excluded.operation_id,
                    state = excluded.state, detail = excluded.detail, updated_at = excluded.updated_at",
            );
            insert.build().execute(&mut *self.tx).await?;
        }
        Ok(())
    }

    /// Sets a rollout's state.
    pub async fn set_rollout_state(
        &mut self,
        scope: &TenantScope,
        id: RolloutId,
        state: RolloutState,
        at: Timestamp,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE rollouts SET state = $3, updated_at = $4 WHERE tenant_id = $1 AND id = $2")
            .bind(scope.tenant().to_string())
            .bind(id.to_string())
            .bind(code_text(state)?)
            .bind(at.unix_millis())
            .execute(&mut *self.tx)
            .await?;
        Ok(())
    }
}

fn rollout_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<RolloutRow, StoreError> {
    let small = |col: &str| -> Result<u32, StoreError> {
        let v: i64 = row.try_get(col)?;
        u32::try_from(v).map_err(|_| StoreError::Corrupt(format!("rollouts.{col}")))
    };
    Ok(RolloutRow {
        id: parse_col(row, "id")?,
        tenant_id: parse_col(row, "tenant_id")?,
        workspace_id: parse_col(row, "workspace_id")?,
        release_digest: row.try_get("release_digest")?,
        release_name: row.try_get("release_name")?,
        release_version: row.try_get("release_version")?,
        concurrency: small("concurrency")?,
        max_failures: small("max_failures")?,
        reason: row.try_get("reason")?,
        created_by: RolloutCreator::from_row(row)?,
        state: code_col(row, "state")?.ok_or_else(|| StoreError::Corrupt("rollouts.state".into()))?,
        created_at: ts_col(row, "created_at")?,
        updated_at: ts_col(row, "updated_at")?,
    })
}

fn target_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<RolloutTargetRow, StoreError> {
    let position: i64 = row.try_get("position")?;
    let operation: Option<String> = row.try_get("operation_id")?;
    Ok(RolloutTargetRow {
        position: u32::try_from(position).map_err(|_| StoreError::Corrupt("rollout_targets.position".into()))?,
        environment_id: parse_col(row, "environment_id")?,
        appliance_id: parse_col(row, "appliance_id")?,
        operation_id: operation
            .map(|o| o.parse().map_err(|e| StoreError::Corrupt(format!("rollout_targets.operation_id: {e}"))))
            .transpose()?,
        state: code_col(row, "state")?.ok_or_else(|| StoreError::Corrupt("rollout_targets.state".into()))?,
        detail: row.try_get("detail")?,
        updated_at: ts_col(row, "updated_at")?,
    })
}
