//! The latest deployment status each appliance reported (one row per appliance, replaced).

use airlock_core::{ApplianceId, Timestamp};
use sqlx::Row;

use super::{Store, StoreError, WriteTx};
use crate::authz::TenantScope;
use crate::deployments::DeploymentStatusView;

/// An appliance's latest report as stored: the status without its log tails, and those
/// sealed (opened by [`crate::deployments::status`]).
#[derive(Debug)]
pub struct StoredDeploymentStatus {
    pub view: DeploymentStatusView,
    pub log_tails_sealed: Option<Vec<u8>>,
}

impl Store {
    /// The appliance's latest report, if it is the tenant's (within the scope's workspace if confined) and has reported.
    pub async fn deployment_status(
        &self,
        scope: &TenantScope,
        appliance: ApplianceId,
    ) -> Result<Option<StoredDeploymentStatus>, StoreError> {
        let row = sqlx::query(
            "SELECT status, log_tails_sealed FROM deployment_status WHERE tenant_id = $1 AND appliance_id = $2
               AND ($3 IS NULL OR appliance_id IN (SELECT a.id FROM appliances a JOIN environments e ON e.id = a.environment_id
                                                   WHERE a.tenant_id = $1 AND e.workspace_id = $3))",
        )
        .bind(scope.tenant().to_string())
        .bind(appliance.to_string())
        .bind(scope.workspace().map(|w| w.to_string()))
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            let json: String = r.try_get("status")?;
            let view = serde_json::from_str(&json)
                .map_err(|e| StoreError::Corrupt(format!("deployment_status of {appliance}: {e}")))?;
            Ok(StoredDeploymentStatus { view, log_tails_sealed: r.try_get("log_tails_sealed")? })
        })
        .transpose()
    }
}

impl WriteTx<'_> {
    /// Replaces the appliance's report; nothing is written for an appliance not the tenant's.
    pub async fn put_deployment_status(
        &mut self,
        scope: &TenantScope,
        appliance: ApplianceId,
        status_json: &str,
        log_tails_sealed: Option<&[u8]>,
        at: Timestamp,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO deployment_status (appliance_id, tenant_id, status, reported_at, log_tails_sealed)
             SELECT id, tenant_id, $3, $4, $5 FROM appliances WHERE id = $1 AND tenant_id = $2
             ON CONFLICT (appliance_id) DO UPDATE SET status = excluded.status, reported_at = excluded.reported_at,
               log_tails_sealed = excluded.log_tails_sealed",
        )
        .bind(appliance.to_string())
        .bind(scope.tenant().to_string())
        .bind(status_json)
        .bind(at.unix_millis())
        .bind(log_tails_sealed)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }
}
