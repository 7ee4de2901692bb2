//! Appliances: what joined, with which certificate, when last seen, and whether revoked.

use airlock_core::{ApplianceId, ApplianceIdentity, EnvironmentId, TenantId, Timestamp, WorkspaceId};
use sqlx::Row;

use super::{Store, StoreError, WriteTx, opt_ts_col, parse_col, ts_col};
use crate::authz::TenantScope;

#[derive(Clone, Debug)]
pub struct ApplianceRow {
    pub id: ApplianceId,
    pub environment_id: EnvironmentId,
    pub joined_at: Timestamp,
    pub version: String,
    pub cert_serial: String,
    /// The certificate the current one replaced, while still usable ([`CertificateStanding::Previous`]).
    pub previous_serial: Option<String>,
    pub cert_not_after: Timestamp,
    pub last_seen_at: Option<Timestamp>,
    pub revoked_at: Option<Timestamp>,
    /// The customer's attestation of its execution key (a DSSE envelope, JSON), as it last
    /// sent it in its Hello, checked to name it (`crate::attestation`).
    pub execution_key_attestation: Option<String>,
    /// How it joined (`join_token`, `aws_sts`), and the platform identity and rule matched.
    pub join_method: String,
    pub join_identity: Option<String>,
    pub join_rule_id: Option<String>,
}

/// How an appliance joined, as recorded with it.
#[derive(Clone, Copy, Debug)]
pub struct JoinVia<'a> {
    /// `join_token`, `aws_sts`, `gcp_identity` or `k8s_token`.
    pub method: &'static str,
    /// The platform identity matched (`crate::platform_join::rules::PlatformIdentity::matched`); none for a token join.
    pub identity: Option<&'a str>,
    pub rule: Option<airlock_core::id::JoinRuleId>,
}

#[derive(Clone, Debug)]
pub struct RenewalState {
    pub current_serial: String,
    pub previous_serial: Option<String>,
    pub revoked: bool,
    /// How it last joined (`join_token`, `aws_sts`, ...), and the platform identity it was matched as.
    pub join_method: String,
    pub join_identity: Option<String>,
    /// When the current certificate expires.
    pub current_not_after: Timestamp,
}

impl Store {
    /// Every revoked appliance, across tenants: the gateway refuses their handshakes.
    pub async fn revoked_appliances(&self) -> Result<Vec<ApplianceId>, StoreError> {
        let rows = sqlx::query("SELECT id FROM appliances WHERE revoked_at IS NOT NULL").fetch_all(&self.pool).await?;
        rows.iter().map(|r| parse_col(r, "id")).collect()
    }

    /// The scope's appliances (within its workspace if it is confined to one), of `env` if given.
    pub async fn list_appliances(
        &self,
        scope: &TenantScope,
        env: Option<EnvironmentId>,
    ) -> Result<std::sync::Arc<Vec<ApplianceRow>>, StoreError> {
        self.list_appliances_in(scope, env, None).await
    }

    /// [`Store::list_appliances`], of the workspace `ws` too if given (a list's `workspace` query parameter): a
    /// scope confined to another workspace sees none.
    pub async fn list_appliances_in(
        &self,
        scope: &TenantScope,
        env: Option<EnvironmentId>,
        ws: Option<WorkspaceId>,
    ) -> Result<std::sync::Arc<Vec<ApplianceRow>>, StoreError> {
        let generation = self.generation.current();
        let key = (scope.tenant(), env, [scope.workspace(), ws]);
        if let Some(rows) = self.appliance_lists.get(generation, &key) {
            return Ok(rows);
        }
        let rows = sqlx::query(
            "SELECT id, environment_id, joined_at, version, cert_serial, previous_serial, cert_not_after, last_seen_at, revoked_at,
                    execution_key_attestation, join_method, join_identity, join_rule_id
             FROM appliances WHERE tenant_id = $1 AND ($2 IS NULL OR environment_id = $2)
               AND ($3 IS NULL OR environment_id IN (SELECT id FROM environments WHERE tenant_id = $1 AND workspace_id = $3))
               AND ($4 IS NULL OR environment_id IN (SELECT id FROM environments WHERE tenant_id = $1 AND workspace_id = $4))
             ORDER BY joined_at, id",
        )
        .bind(scope.tenant().to_string())
        .bind(env.map(|e| e.to_string()))
        .bind(scope.workspace().map(|w| w.to_string()))
        .bind(ws.map(|w| w.to_string()))
        .fetch_all(&self.pool)
        .await?;
        let rows = std::sync::Arc::new(rows.iter().map(appliance_from_row).collect::<Result<Vec<_>, _>>()?);
        self.appliance_lists.insert(generation, key, rows.clone());
        Ok(rows)
    }

    /// An appliance of the tenant's, within the scope's workspace if it is confined to one (another's is not found,
    /// so its existence does not leak).
    pub async fn get_appliance(
        &self,
        scope: &TenantScope,
        id: ApplianceId,
    ) -> Result<Option<ApplianceRow>, StoreError> {
        let row = sqlx::query(
            "SELECT id, environment_id, joined_at, version, cert_serial, previous_serial, cert_not_after, last_seen_at, revoked_at,
                    execution_key_attestation, join_method, join_identity, join_rule_id
             FROM appliances WHERE tenant_id = $1 AND id = $2
               AND ($3 IS NULL OR environment_id IN (SELECT id FROM environments WHERE tenant_id = $1 AND workspace_id = $3))",
        )
        .bind(scope.tenant().to_string())
        .bind(id.to_string())
        .bind(scope.workspace().map(|w| w.to_string()))
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(appliance_from_row).transpose()
    }

    /// The workspace of an appliance the scope sees (its environment's): what the API's gate confines a user whose
    /// roles span workspaces to before deciding on an appliance.
    pub async fn appliance_workspace(
        &self,
        scope: &TenantScope,
        id: ApplianceId,
    ) -> Result<Option<WorkspaceId>, StoreError> {
        self.workspace_of_row(super::WorkspaceTable::Appliances, scope, &id.to_string()).await
    }
}

/// What a new certificate for an existing appliance answers, which decides what of its earlier keys and
/// certificates may still be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewed<'a> {
    /// A join asked again with its key and identity: its answer may not have arrived, so that key stays on record
    /// for another retry.
    LostJoinAnswer,
    /// A certificate replaced, by a renewal over the stream or a recovery, with the one whose serial is `presented`.
    /// The appliance held a certificate, so its join's answer reached it, and the key it joined with retries nothing
    /// from now on (otherwise whoever kept that key could ask the join again after the key changed). The certificate
    /// presented stays usable as the previous one until the appliance presents the new one
    /// ([`WriteTx::retire_previous_certificate`]), as this answer may be lost. Presented as the previous one (that
    /// answer was lost), it is replaced once and for all: neither it nor the current one it never received stays
    /// usable, so a previous certificate renews once, not over and over (a copy of it would mint certificates).
    Replaced { presented: &'a str },
}

/// How a certificate stands for the appliance it names (its serial against the stored ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertificateStanding {
    /// The newest; `previous_live` when the one it replaced is still usable (the appliance has not presented this
    /// one yet).
    Current { previous_live: bool },
    /// The one the current one replaced: its appliance may not have received the renewal's answer.
    Previous,
    /// Older, or never this appliance's.
    Superseded,
}

impl ApplianceRow {
    pub fn certificate_standing(&self, serial: &str) -> CertificateStanding {
        if serial == self.cert_serial {
            CertificateStanding::Current { previous_live: self.previous_serial.is_some() }
        } else if self.previous_serial.as_deref() == Some(serial) {
            CertificateStanding::Previous
        } else {
            CertificateStanding::Superseded
        }
    }
}

impl WriteTx<'_> {
    /// The environment of `appliance` if it joined with `join_key` and is not revoked: the
    /// only case in which a spent join token may be presented again.
    pub async fn join_retry_environment(
        &mut self,
        tenant: TenantId,
        appliance: ApplianceId,
        join_key: &[u8],
    ) -> Result<Option<EnvironmentId>, StoreError> {
        let row = sqlx::query(
            "SELECT environment_id FROM appliances WHERE tenant_id = $1 AND id = $2 AND join_key = $3 AND revoked_at IS NULL",
        )
        .bind(tenant.to_string())
        .bind(appliance.to_string())
        .bind(join_key)
        .fetch_optional(&mut *self.tx)
        .await?;
        row.map(|r| parse_col(&r, "environment_id")).transpose()
    }

    pub async fn insert_appliance(
        &mut self,
        identity: &ApplianceIdentity,
        version: &str,
        cert: (&str, Timestamp),
        join_key: &[u8],
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let (serial, not_after) = cert;
        sqlx::query(
            "INSERT INTO appliances (id, tenant_id, environment_id, joined_at, version, cert_serial, cert_not_after, join_key)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(identity.appliance.to_string())
        .bind(identity.tenant.to_string())
        .bind(identity.environment.to_string())
        .bind(now.unix_millis())
        .bind(version)
        .bind(serial)
        .bind(not_after.unix_millis())
        .bind(join_key)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    /// Records how `identity` joined (a token join is the column's default).
    pub async fn record_join_via(&mut self, identity: &ApplianceIdentity, via: JoinVia<'_>) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE appliances SET join_method = $1, join_identity = $2, join_rule_id = $3 WHERE tenant_id = $4 AND id = $5",
        )
        .bind(via.method)
        .bind(via.identity)
        .bind(via.rule.map(|r| r.to_string()))
        .bind(identity.tenant.to_string())
        .bind(identity.appliance.to_string())
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    /// The serials a renewal may be presented with, and whether the appliance is revoked.
    pub async fn renewal_state(
        &mut self,
        scope: &TenantScope,
        id: ApplianceId,
    ) -> Result<Option<RenewalState>, StoreError> {
        let row = sqlx::query(
            "SELECT cert_serial, previous_serial, revoked_at, join_method, join_identity, cert_not_after FROM appliances \
             WHERE tenant_id = $1 AND id = $2",
        )
        .bind(scope.tenant().to_string())
        .bind(id.to_string())
        .fetch_optional(&mut *self.tx)
        .await?;
        row.map(|r| {
            let revoked_at: Option<i64> = r.try_get("revoked_at")?;
            Ok(RenewalState {
                current_serial: r.try_get("cert_serial")?,
                previous_serial: r.try_get("previous_serial")?,
                revoked: revoked_at.is_some(),
                join_method: r.try_get("join_method")?,
                join_identity: r.try_get("join_identity")?,
                current_not_after: ts_col(&r, "cert_not_after")?,
            })
        })
        .transpose()
    }

    pub async fn record_renewal(
        &mut self,
        scope: &TenantScope,
        id: ApplianceId,
        issued: (&str, Timestamp),
        of: Renewed<'_>,
    ) -> Result<(), StoreError> {
        let (serial, not_after) = issued;
        // `$5` is the serial the replaced certificate was presented with; a lost join answer has none.
        let sql = match of {
            Renewed::LostJoinAnswer => {
                "UPDATE appliances SET previous_serial = cert_serial, cert_serial = $1, cert_not_after = $2 \
                 WHERE tenant_id = $3 AND id = $4"
            }
            Renewed::Replaced { .. } => {
                "UPDATE appliances SET \
                 previous_serial = CASE WHEN cert_serial = $5 THEN cert_serial ELSE NULL END, \
                 cert_serial = $1, cert_not_after = $2, join_key = NULL WHERE tenant_id = $3 AND id = $4"
            }
        };
        let mut query = sqlx::query(sql)
            .bind(serial)
            .bind(not_after.unix_millis())
            .bind(scope.tenant().to_string())
            .bind(id.to_string());
        if let Renewed::Replaced { presented } = of {
            query = query.bind(presented);
        }
        query.execute(&mut *self.tx).await?;
        Ok(())
    }

    /// The appliance presented its current certificate `serial`: so it holds it, and the one it replaced is no
    /// longer usable by anyone (a copy of it and its key, kept by someone, opens no session and renews nothing).
    pub async fn retire_previous_certificate(
        &mut self,
        scope: &TenantScope,
        id: ApplianceId,
        serial: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE appliances SET previous_serial = NULL WHERE tenant_id = $1 AND id = $2 AND cert_serial = $3",
        )
        .bind(scope.tenant().to_string())
        .bind(id.to_string())
        .bind(serial)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    pub async fn record_seen(
        &mut self,
        scope: &TenantScope,
        id: ApplianceId,
        version: &str,
        at: Timestamp,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE appliances SET version = COALESCE(NULLIF($1, ''), version), last_seen_at = $2 WHERE tenant_id = $3 AND id = $4",
        )
            .bind(version)
            .bind(at.unix_millis())
            .bind(scope.tenant().to_string())
            .bind(id.to_string())
            .execute(&mut *self.tx)
            .await?;
        Ok(())
    }

    /// Replaces the appliance's stored execution key attestation (`None` clears it).
    pub async fn record_execution_key_attestation(
        &mut self,
        scope: &TenantScope,
        id: ApplianceId,
        attestation_json: Option<&str>,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE appliances SET execution_key_attestation = $1 WHERE tenant_id = $2 AND id = $3")
            .bind(attestation_json)
            .bind(scope.tenant().to_string())
            .bind(id.to_string())
            .execute(&mut *self.tx)
            .await?;
        Ok(())
    }

    /// Marks an appliance revoked. Returns false if it does not exist in this tenant (within the scope's workspace if
    /// it is confined to one).
    pub async fn revoke_appliance(
        &mut self,
        scope: &TenantScope,
        id: ApplianceId,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE appliances SET revoked_at = COALESCE(revoked_at, $1) WHERE tenant_id = $2 AND id = $3
               AND ($4 IS NULL OR environment_id IN (SELECT id FROM environments WHERE tenant_id = $2 AND workspace_id = $4))",
        )
        .bind(now.unix_millis())
        .bind(scope.tenant().to_string())
        .bind(id.to_string())
        .bind(scope.workspace().map(|w| w.to_string()))
        .execute(&mut *self.tx)
        .await?;
        Ok(done.rows_affected() == 1)
    }
}

fn appliance_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<ApplianceRow, StoreError> {
    Ok(ApplianceRow {
        id: parse_col(r, "id")?,
        environment_id: parse_col(r, "environment_id")?,
        joined_at: ts_col(r, "joined_at")?,
        version: r.try_get("version")?,
        cert_serial: r.try_get("cert_serial")?,
        previous_serial: r.try_get("previous_serial")?,
        cert_not_after: ts_col(r, "cert_not_after")?,
        last_seen_at: opt_ts_col(r, "last_seen_at")?,
        revoked_at: opt_ts_col(r, "revoked_at")?,
        execution_key_attestation: r.try_get("execution_key_attestation")?,
        join_method: r.try_get("join_method")?,
        join_identity: r.try_get("join_identity")?,
        join_rule_id: r.try_get("join_rule_id")?,
    })
}
