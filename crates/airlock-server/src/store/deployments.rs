//! The latest deployment status each appliance reported (one row per appliance, replaced).

use airlock_core::{ApplianceId, Timestamp};
use sqlx::Row;

use super::{Store, StoreError, WriteTx};
use crate::authz::TenantScope;
use crate::deployments::DeploymentStatusView;

impl Store {
    /// The appliance's latest report, if it is the tenant's and has reported.
    pub async fn deployment_status(
        &self,
        scope: &TenantScope,
        appliance: ApplianceId,
    ) -> Result<Option<DeploymentStatusView>, StoreError> {
        let row = sqlx::query("SELECT status FROM deployment_status WHERE tenant_id = $1 AND appliance_id = $2")
            .bind(scope.tenant().to_string())
            .bind(appliance.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| {
            let json: String = r.try_get("status")?;
            serde_json::from_str(&json)
                .map_err(|e| StoreError::Corrupt(format!("deployment_status of {appliance}: {e}")))
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
        at: Timestamp,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO deployment_status (appliance_id, tenant_id, status, reported_at)
             SELECT id, tenant_id, $3, $4 FROM appliances WHERE id = $1 AND tenant_id = $2
             ON CONFLICT (appliance_id) DO UPDATE SET status = excluded.status, reported_at = excluded.reported_at",
        )
        .bind(appliance.to_string())
        .bind(scope.tenant().to_string())
        .bind(status_json)
        .bind(at.unix_millis())
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }
}
