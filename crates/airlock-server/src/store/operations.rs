//! Operations: the signed request, its relayed approval, the appliance's result and the customer's release, and the order in which the pending ones are pushed.

use std::collections::{HashMap, HashSet};

use airlock_core::grant::DenyCode;
use airlock_core::operation::{OperationState, RefusalCode};
use airlock_core::{ApplianceId, EnvironmentId, OperationId, Timestamp, WorkspaceId};
use sqlx::Row;

use super::{Store, StoreError, WorkspaceTable, WriteTx, code_col, code_text, conflict, opt_ts_col, parse_col, ts_col};
use crate::authz::TenantScope;

/// An operation as stored. The request's details live in its signed envelope.
#[derive(Clone, Debug)]
pub struct OperationRow {
    pub id: OperationId,
    pub workspace_id: WorkspaceId,
    pub environment_id: EnvironmentId,
    pub appliance_id: ApplianceId,
    pub template_name: String,
    pub template_sha256: String,
    pub state: OperationState,
    pub requested_by: String,
    pub requested_at: Timestamp,
    pub updated_at: Timestamp,
    pub request_digest: String,
    pub command_sha256: String,
    pub request_envelope: String,
    pub control_plane_cert_pem: String,
    pub approval_envelope: Option<String>,
    pub pre_approval_envelope: Option<String>,
    pub execution_envelope: Option<String>,
    pub appliance_cert_pem: Option<String>,
    /// The customer's attestation of the execution key that signed `execution_envelope`.
    pub appliance_attestation: Option<String>,
    pub release_envelope: Option<String>,
    pub exit_code: Option<i64>,
    /// The digest the signed execution names: its salted output commitment or, for one signed
    /// before salts, the output's plain SHA-256 (the execution envelope says which). None for
    /// secret output, which is committed to with nothing.
    pub output_sha256: Option<String>,
    pub output_size: Option<i64>,
    /// Why the appliance refused it, as it coded it (absent for refusals recorded before
    /// codes were kept).
    pub refusal_code: Option<RefusalCode>,
    /// Which policy check denied it, when `refusal_code` is `Denied`.
    pub deny_code: Option<DenyCode>,
    /// The appliance's explanation, for people.
    pub refusal_reason: Option<String>,
    pub result_at: Option<Timestamp>,
    pub output_stored: bool,
    /// The released output's salt, sealed under the KEK (absent before release, and for
    /// executions signed before salts).
    pub output_salt_sealed: Option<Vec<u8>>,
}

/// What an appliance's verified result changes on an operation.
#[derive(Clone, Debug)]
pub struct ResultUpdate<'a> {
    pub state: OperationState,
    pub execution_envelope: Option<&'a str>,
    pub appliance_cert_pem: Option<&'a str>,
    pub appliance_attestation: Option<&'a str>,
    pub pre_approval_envelope: Option<&'a str>,
    pub exit_code: Option<i64>,
    pub output_sha256: Option<&'a str>,
    pub output_size: Option<i64>,
    pub refusal_code: Option<RefusalCode>,
    pub deny_code: Option<DenyCode>,
    pub refusal_reason: Option<&'a str>,
}

impl<'a> ResultUpdate<'a> {
    /// A refusal: the new state and why, nothing executed.
    pub fn refusal(state: OperationState, code: RefusalCode, deny: Option<DenyCode>, reason: &'a str) -> Self {
        Self {
            state,
            execution_envelope: None,
            appliance_cert_pem: None,
            appliance_attestation: None,
            pre_approval_envelope: None,
            exit_code: None,
            output_sha256: None,
            output_size: None,
            refusal_code: Some(code),
            deny_code: deny,
            refusal_reason: Some(reason),
        }
    }
}

/// What the customer's release decision changes on an operation.
#[derive(Clone, Debug)]
pub struct ReleaseUpdate<'a> {
    pub state: OperationState,
    pub release_envelope: Option<&'a str>,
    pub output_sealed: Option<&'a [u8]>,
    pub output_salt_sealed: Option<&'a [u8]>,
}

/// The signer's certificate is stored once ([`WriteTx::signer_certificate_id`]); a row written
/// before that (none are left after migration 0027, but the column stays) carries its own.
const OPERATION_COLUMNS: &str = "id, workspace_id, environment_id, appliance_id, template_name, template_sha256, state,
    requested_by, requested_at, updated_at, request_digest, command_sha256, request_envelope,
    CASE WHEN signer_certificate_id IS NULL THEN control_plane_cert_pem
      ELSE (SELECT c.cert_pem FROM signer_certificates c WHERE c.id = operations.signer_certificate_id)
    END AS control_plane_cert_pem,
    approval_envelope, pre_approval_envelope, execution_envelope, appliance_cert_pem, release_envelope, exit_code,
    output_sha256, output_size, refusal_code, deny_code, refusal_reason, result_at,
    CASE WHEN output_sealed IS NULL THEN 0 ELSE 1 END AS output_stored, output_salt_sealed, appliance_attestation";

/// Rows per multi-row INSERT: 16 parameters each, far below SQLite's limit of 32,766.
const INSERT_ROWS: usize = 256;

/// The states in which an operation still waits for the appliance's final result.
pub const PENDING_STATES: [OperationState; 3] =
    [OperationState::AwaitingApproval, OperationState::Approved, OperationState::Denied];

/// Where an operation comes in the order instructions are pushed: decided (approved or
/// denied) before awaiting approval, so a backlog of requests nobody approved yet cannot hold
/// back an approved one; then oldest first. Must agree with [`Store::pending_operations`].
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PushKey {
    pub awaiting: bool,
    pub requested_at: Timestamp,
    pub id: OperationId,
}

impl PushKey {
    pub fn of(op: &OperationRow) -> Self {
        Self { awaiting: op.state == OperationState::AwaitingApproval, requested_at: op.requested_at, id: op.id }
    }
}

/// Where a push of pending instructions starts: from the first, or after a given operation.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum PushFrom {
    Start,
    After(PushKey),
}

impl Store {
    /// Every appliance, across tenants, with an operation still waiting for its final
    /// result: the gateway pushes operations at connect only to these.
    pub async fn appliances_with_pending_operations(&self) -> Result<Vec<ApplianceId>, StoreError> {
        let rows = sqlx::query(
            "SELECT DISTINCT appliance_id FROM operations WHERE result_at IS NULL AND state IN ($1, $2, $3)",
        )
        .bind(PENDING_STATES[0].as_str())
        .bind(PENDING_STATES[1].as_str())
        .bind(PENDING_STATES[2].as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| parse_col(r, "appliance_id")).collect()
    }

    pub async fn get_operation(
        &self,
        scope: &TenantScope,
        id: OperationId,
    ) -> Result<Option<OperationRow>, StoreError> {
        // A scope confined to one workspace sees no operation of another: it is not found, so its existence does not leak.
        let sql = format!(
            "SELECT {OPERATION_COLUMNS} FROM operations WHERE tenant_id = $1 AND id = $2 AND ($3 IS NULL OR workspace_id = $3)"
        );
        let row = sqlx::query(&sql)
            .bind(scope.tenant().to_string())
            .bind(id.to_string())
            .bind(scope.workspace().map(|w| w.to_string()))
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(operation_from_row).transpose()
    }

    /// The workspace of an operation the scope sees (its tenant's, within its workspace if confined): what the API's
    /// gate confines a user whose roles span workspaces to before deciding on an operation.
    pub async fn operation_workspace(
        &self,
        scope: &TenantScope,
        id: OperationId,
    ) -> Result<Option<WorkspaceId>, StoreError> {
        self.workspace_of_row(WorkspaceTable::Operations, scope, &id.to_string()).await
    }

    /// An operation's appliance, state and whether it has its final result: all an answer that
    /// changes nothing (`AWAITING_APPROVAL`) is checked against, without reading its envelopes.
    pub async fn operation_status(
        &self,
        scope: &TenantScope,
        id: OperationId,
    ) -> Result<Option<(ApplianceId, OperationState, bool)>, StoreError> {
        let row = sqlx::query(
            "SELECT appliance_id, state, result_at IS NOT NULL AS final FROM operations
             WHERE tenant_id = $1 AND id = $2 AND ($3 IS NULL OR workspace_id = $3)",
        )
        .bind(scope.tenant().to_string())
        .bind(id.to_string())
        .bind(scope.workspace().map(|w| w.to_string()))
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| Ok((parse_col(&r, "appliance_id")?, parse_col(&r, "state")?, r.try_get::<bool, _>("final")?)))
            .transpose()
    }

    /// Operations of the tenant (within the scope's workspace if it is confined to one), newest first, optionally by
    /// state, environment and workspace (a list's `workspace` query parameter: a scope confined to another sees none).
    pub async fn list_operations(
        &self,
        scope: &TenantScope,
        state: Option<OperationState>,
        env: Option<EnvironmentId>,
        ws: Option<WorkspaceId>,
        limit: i64,
    ) -> Result<Vec<OperationRow>, StoreError> {
        let sql = format!(
            "SELECT {OPERATION_COLUMNS} FROM operations
             WHERE tenant_id = $1 AND ($2 IS NULL OR state = $2) AND ($3 IS NULL OR environment_id = $3)
               AND ($5 IS NULL OR workspace_id = $5) AND ($6 IS NULL OR workspace_id = $6)
             ORDER BY requested_at DESC, id DESC LIMIT $4"
        );
        let rows = sqlx::query(&sql)
            .bind(scope.tenant().to_string())
            .bind(state.map(OperationState::as_str))
            .bind(env.map(|e| e.to_string()))
            .bind(limit)
            .bind(scope.workspace().map(|w| w.to_string()))
            .bind(ws.map(|w| w.to_string()))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(operation_from_row).collect()
    }

    /// Operations of one appliance still waiting for its final result, in push order
    /// ([`PushKey`]), from `from` on, at most `limit`.
    pub async fn pending_operations(
        &self,
        scope: &TenantScope,
        appliance: ApplianceId,
        from: &PushFrom,
        limit: i64,
    ) -> Result<Vec<OperationRow>, StoreError> {
        self.pending_reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let sql = format!(
            "SELECT {OPERATION_COLUMNS} FROM operations
             WHERE tenant_id = $1 AND appliance_id = $2 AND result_at IS NULL AND state IN ($3, $4, $5)
               AND ($6 = 0 OR (CASE WHEN state = $3 THEN 1 ELSE 0 END, requested_at, id) > ($7, $8, $9))
             ORDER BY CASE WHEN state = $3 THEN 1 ELSE 0 END, requested_at, id LIMIT $10"
        );
        let after = match from {
            PushFrom::Start => None,
            PushFrom::After(k) => Some(k),
        };
        let rows = sqlx::query(&sql)
            .bind(scope.tenant().to_string())
            .bind(appliance.to_string())
            .bind(PENDING_STATES[0].as_str())
            .bind(PENDING_STATES[1].as_str())
            .bind(PENDING_STATES[2].as_str())
            .bind(i64::from(after.is_some()))
            .bind(after.map_or(0, |k| i64::from(k.awaiting)))
            .bind(after.map_or(0, |k| k.requested_at.unix_millis()))
            .bind(after.map_or(String::new(), |k| k.id.to_string()))
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(operation_from_row).collect()
    }

    /// The sealed released output of an operation, if any.
    pub async fn sealed_output(&self, scope: &TenantScope, id: OperationId) -> Result<Option<Vec<u8>>, StoreError> {
        let row = sqlx::query(
            "SELECT output_sealed FROM operations WHERE tenant_id = $1 AND id = $2 AND ($3 IS NULL OR workspace_id = $3)",
        )
        .bind(scope.tenant().to_string())
        .bind(id.to_string())
        .bind(scope.workspace().map(|w| w.to_string()))
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some(r) => Ok(r.try_get("output_sealed")?),
            None => Ok(None),
        }
    }
}

impl WriteTx<'_> {
    /// Inserts an operation. False if its appliance is not the tenant's, in that environment.
    pub async fn insert_operation(&mut self, scope: &TenantScope, op: &OperationRow) -> Result<bool, StoreError> {
        Ok(self.insert_operations(scope, std::slice::from_ref(op)).await?.first().copied().unwrap_or(false))
    }

    /// Inserts operations (a batch of requests), each only if its appliance is the tenant's, in
    /// that environment of that workspace: false for those that are not (nothing inserted).
    pub async fn insert_operations(
        &mut self,
        scope: &TenantScope,
        ops: &[OperationRow],
    ) -> Result<Vec<bool>, StoreError> {
        /// From this many operations of one environment, its appliances are read at once
        /// rather than looked up one by one.
        const READ_ALL_FROM: usize = 32;
        let mut groups: HashMap<(EnvironmentId, WorkspaceId), usize> = HashMap::new();
        for op in ops {
            *groups.entry((op.environment_id, op.workspace_id)).or_default() += 1;
        }
        let mut owned: HashMap<(EnvironmentId, WorkspaceId), HashSet<ApplianceId>> = HashMap::new();
        for (&(env, ws), _) in groups.iter().filter(|(_, n)| **n >= READ_ALL_FROM) {
            let rows = sqlx::query(
                "SELECT a.id FROM appliances a JOIN environments e ON e.id = a.environment_id
                 WHERE a.tenant_id = $1 AND e.tenant_id = $1 AND e.id = $2 AND e.workspace_id = $3",
            )
            .bind(scope.tenant().to_string())
            .bind(env.to_string())
            .bind(ws.to_string())
            .fetch_all(&mut *self.tx)
            .await?;
            let ids = rows.iter().map(|r| parse_col(r, "id")).collect::<Result<_, StoreError>>()?;
            owned.insert((env, ws), ids);
        }
        let mut inserted = Vec::with_capacity(ops.len());
        for op in ops {
            let is_owned = match owned.get(&(op.environment_id, op.workspace_id)) {
                Some(ids) => ids.contains(&op.appliance_id),
                None => self.owns(scope, op).await?,
            };
            inserted.push(is_owned);
        }
        let rows: Vec<&OperationRow> = ops.iter().zip(&inserted).filter(|(_, ok)| **ok).map(|(op, _)| op).collect();
        // A few multi-row statements rather than one per operation: each statement is a round
        // trip to SQLite's worker thread, which is what bounds a batch.
        let tenant = scope.tenant().to_string();
        // Each signer's certificate once (a batch has one), by id.
        let mut certificates: HashMap<&str, i64> = HashMap::new();
        for op in &rows {
            if !certificates.contains_key(op.control_plane_cert_pem.as_str()) {
                let id = self.signer_certificate_id(&op.control_plane_cert_pem).await?;
                certificates.insert(op.control_plane_cert_pem.as_str(), id);
            }
        }
        for chunk in rows.chunks(INSERT_ROWS) {
            let mut insert = sqlx::QueryBuilder::new(
                "INSERT INTO operations (id, tenant_id, workspace_id, environment_id, appliance_id, template_name,
                    template_sha256, state, requested_by, requested_at, updated_at, request_digest, command_sha256,
                    request_envelope, control_plane_cert_pem, signer_certificate_id) ",
            );
            insert.push_values(chunk, |mut row, op| {
                row.push_bind(op.id.to_string())
                    .push_bind(tenant.as_str())
                    .push_bind(op.workspace_id.to_string())
                    .push_bind(op.environment_id.to_string())
                    .push_bind(op.appliance_id.to_string())
                    .push_bind(op.template_name.as_str())
                    .push_bind(op.template_sha256.as_str())
                    .push_bind(op.state.as_str())
                    .push_bind(op.requested_by.as_str())
                    .push_bind(op.requested_at.unix_millis())
                    .push_bind(op.updated_at.unix_millis())
                    .push_bind(op.request_digest.as_str())
                    .push_bind(op.command_sha256.as_str())
                    .push_bind(op.request_envelope.as_str())
                    .push_bind("")
                    .push_bind(certificates.get(op.control_plane_cert_pem.as_str()).copied());
            });
            let first = chunk.first().map(|op| op.id.to_string()).unwrap_or_default();
            insert.build().execute(&mut *self.tx).await.map_err(|e| conflict(e, "operation", &first))?;
        }
        Ok(inserted)
    }

    /// The id of a signer's certificate, stored first if it is new (the next id after the largest,
    /// under the write lock).
    async fn signer_certificate_id(&mut self, cert_pem: &str) -> Result<i64, StoreError> {
        let known: Option<i64> = sqlx::query_scalar("SELECT id FROM signer_certificates WHERE cert_pem = $1")
            .bind(cert_pem)
            .fetch_optional(&mut *self.tx)
            .await?;
        if let Some(id) = known {
            return Ok(id);
        }
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO signer_certificates (id, cert_pem)
             SELECT COALESCE(MAX(id), 0) + 1, $1 FROM signer_certificates RETURNING id",
        )
        .bind(cert_pem)
        .fetch_one(&mut *self.tx)
        .await?;
        Ok(id)
    }

    /// Whether `op`'s appliance is the tenant's, in its environment and workspace.
    async fn owns(&mut self, scope: &TenantScope, op: &OperationRow) -> Result<bool, StoreError> {
        let owned = sqlx::query(
            "SELECT 1 AS one FROM appliances a JOIN environments e ON e.id = a.environment_id
             WHERE a.tenant_id = $1 AND e.tenant_id = $1 AND a.id = $2 AND e.id = $3 AND e.workspace_id = $4",
        )
        .bind(scope.tenant().to_string())
        .bind(op.appliance_id.to_string())
        .bind(op.environment_id.to_string())
        .bind(op.workspace_id.to_string())
        .fetch_optional(&mut *self.tx)
        .await?;
        Ok(owned.is_some())
    }

    /// An operation, read under the write lock so a check and its update cannot interleave.
    pub async fn operation(
        &mut self,
        scope: &TenantScope,
        id: OperationId,
    ) -> Result<Option<OperationRow>, StoreError> {
        let sql = format!(
            "SELECT {OPERATION_COLUMNS} FROM operations WHERE tenant_id = $1 AND id = $2 AND ($3 IS NULL OR workspace_id = $3)"
        );
        let row = sqlx::query(&sql)
            .bind(scope.tenant().to_string())
            .bind(id.to_string())
            .bind(scope.workspace().map(|w| w.to_string()))
            .fetch_optional(&mut *self.tx)
            .await?;
        row.as_ref().map(operation_from_row).transpose()
    }

    /// Records a relayed approval (or denial). Only from `awaiting_approval`; false otherwise.
    pub async fn set_approval(
        &mut self,
        scope: &TenantScope,
        id: OperationId,
        envelope_json: &str,
        state: OperationState,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE operations SET approval_envelope = $1, state = $2, updated_at = $3
             WHERE tenant_id = $4 AND id = $5 AND state = $6 AND approval_envelope IS NULL
               AND ($7 IS NULL OR workspace_id = $7)",
        )
        .bind(envelope_json)
        .bind(state.as_str())
        .bind(now.unix_millis())
        .bind(scope.tenant().to_string())
        .bind(id.to_string())
        .bind(OperationState::AwaitingApproval.as_str())
        .bind(scope.workspace().map(|w| w.to_string()))
        .execute(&mut *self.tx)
        .await?;
        let changed = done.rows_affected() == 1;
        self.operation_states_changed |= changed;
        Ok(changed)
    }

    /// Records the appliance's final result for an operation of this appliance.
    pub async fn record_result(
        &mut self,
        scope: &TenantScope,
        appliance: ApplianceId,
        id: OperationId,
        r: &ResultUpdate<'_>,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE operations SET state = $1, execution_envelope = $2, appliance_cert_pem = $3,
                pre_approval_envelope = $4, exit_code = $5, output_sha256 = $6, output_size = $7,
                refusal_reason = $8, result_at = $9, updated_at = $9, refusal_code = $13, deny_code = $14,
                appliance_attestation = $15
             WHERE tenant_id = $10 AND appliance_id = $11 AND id = $12 AND result_at IS NULL",
        )
        .bind(r.state.as_str())
        .bind(r.execution_envelope)
        .bind(r.appliance_cert_pem)
        .bind(r.pre_approval_envelope)
        .bind(r.exit_code)
        .bind(r.output_sha256)
        .bind(r.output_size)
        .bind(r.refusal_reason)
        .bind(now.unix_millis())
        .bind(scope.tenant().to_string())
        .bind(appliance.to_string())
        .bind(id.to_string())
        .bind(r.refusal_code.map(code_text).transpose()?)
        .bind(r.deny_code.map(code_text).transpose()?)
        .bind(r.appliance_attestation)
        .execute(&mut *self.tx)
        .await?;
        let changed = done.rows_affected() == 1;
        self.operation_states_changed |= changed;
        Ok(changed)
    }

    /// Records the customer's release decision and the sealed output (if released).
    pub async fn record_release(
        &mut self,
        scope: &TenantScope,
        appliance: ApplianceId,
        id: OperationId,
        release: &ReleaseUpdate<'_>,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE operations SET state = $1, release_envelope = $2, output_sealed = $3, output_salt_sealed = $4,
             updated_at = $5
             WHERE tenant_id = $6 AND appliance_id = $7 AND id = $8 AND state IN ($9, $10)",
        )
        .bind(release.state.as_str())
        .bind(release.release_envelope)
        .bind(release.output_sealed)
        .bind(release.output_salt_sealed)
        .bind(now.unix_millis())
        .bind(scope.tenant().to_string())
        .bind(appliance.to_string())
        .bind(id.to_string())
        .bind(OperationState::Executed.as_str())
        .bind(OperationState::Cancelled.as_str())
        .execute(&mut *self.tx)
        .await?;
        let changed = done.rows_affected() == 1;
        self.operation_states_changed |= changed;
        Ok(changed)
    }
}

fn operation_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<OperationRow, StoreError> {
    let stored: i64 = r.try_get("output_stored")?;
    Ok(OperationRow {
        id: parse_col(r, "id")?,
        workspace_id: parse_col(r, "workspace_id")?,
        environment_id: parse_col(r, "environment_id")?,
        appliance_id: parse_col(r, "appliance_id")?,
        template_name: r.try_get("template_name")?,
        template_sha256: r.try_get("template_sha256")?,
        state: parse_col(r, "state")?,
        requested_by: r.try_get("requested_by")?,
        requested_at: ts_col(r, "requested_at")?,
        updated_at: ts_col(r, "updated_at")?,
        request_digest: r.try_get("request_digest")?,
        command_sha256: r.try_get("command_sha256")?,
        request_envelope: r.try_get("request_envelope")?,
        control_plane_cert_pem: r
            .try_get::<Option<String>, _>("control_plane_cert_pem")?
            .ok_or_else(|| StoreError::Corrupt("operations.signer_certificate_id names no certificate".into()))?,
        approval_envelope: r.try_get("approval_envelope")?,
        pre_approval_envelope: r.try_get("pre_approval_envelope")?,
        execution_envelope: r.try_get("execution_envelope")?,
        appliance_cert_pem: r.try_get("appliance_cert_pem")?,
        appliance_attestation: r.try_get("appliance_attestation")?,
        release_envelope: r.try_get("release_envelope")?,
        exit_code: r.try_get("exit_code")?,
        output_sha256: r.try_get("output_sha256")?,
        output_size: r.try_get("output_size")?,
        refusal_code: code_col(r, "refusal_code")?,
        deny_code: code_col(r, "deny_code")?,
        refusal_reason: r.try_get("refusal_reason")?,
        result_at: opt_ts_col(r, "result_at")?,
        output_stored: stored != 0,
        output_salt_sealed: r.try_get("output_salt_sealed")?,
    })
}
