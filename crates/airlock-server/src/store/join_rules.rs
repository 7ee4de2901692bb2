//! Join rules: which platform identity joins which environment (`crate::platform_join::rules`).

use airlock_core::EnvironmentId;
use airlock_core::id::JoinRuleId;
use sqlx::Row;

use super::{Store, StoreError, WriteTx, parse_col, ts_col};
use crate::authz::TenantScope;
use crate::platform_join::rules::{AwsRule, JoinRule, RuleSpec};

/// Candidate rules read for one AWS account at a join; more than this is refused as ambiguous
/// rather than read without bound.
const MAX_CANDIDATE_RULES: i64 = 1000;

const COLUMNS: &str = "id, tenant_id, environment_id, method, aws_account, aws_arn_pattern, created_at";

fn rule_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<JoinRule, StoreError> {
    let method: String = r.try_get("method")?;
    let spec = match method.as_str() {
        "aws" => {
            let account: Option<String> = r.try_get("aws_account")?;
            let pattern: Option<String> = r.try_get("aws_arn_pattern")?;
            let account =
                account.ok_or_else(|| StoreError::Corrupt("join rule: an AWS rule without an account".into()))?;
            RuleSpec::Aws(
                AwsRule::new(&account, pattern.as_deref())
                    .map_err(|e| StoreError::Corrupt(format!("join rule: {e}")))?,
            )
        }
        other => return Err(StoreError::Corrupt(format!("join rule: unknown method `{other}`"))),
    };
    Ok(JoinRule {
        id: parse_col(r, "id")?,
        tenant: parse_col(r, "tenant_id")?,
        environment: parse_col(r, "environment_id")?,
        spec,
        created_at: ts_col(r, "created_at")?,
    })
}

impl Store {
    pub async fn list_join_rules(&self, scope: &TenantScope, env: EnvironmentId) -> Result<Vec<JoinRule>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM join_rules WHERE tenant_id = $1 AND environment_id = $2 ORDER BY created_at, id"
        ))
        .bind(scope.tenant().to_string())
        .bind(env.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(rule_from_row).collect()
    }

    /// Every tenant's AWS rules for `account`: a join has no tenant until a rule names one.
    pub async fn aws_join_rules_for_account(&self, account: &str) -> Result<Vec<JoinRule>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM join_rules WHERE method = 'aws' AND aws_account = $1 ORDER BY created_at, id LIMIT $2"
        ))
        .bind(account)
        .bind(MAX_CANDIDATE_RULES)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(rule_from_row).collect()
    }

    /// Rule `id` of the scope's tenant, if it still exists.
    pub async fn join_rule(&self, scope: &TenantScope, id: JoinRuleId) -> Result<Option<JoinRule>, StoreError> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM join_rules WHERE tenant_id = $1 AND id = $2"))
            .bind(scope.tenant().to_string())
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(rule_from_row).transpose()
    }
}

impl WriteTx<'_> {
    pub async fn count_join_rules(&mut self, scope: &TenantScope, env: EnvironmentId) -> Result<usize, StoreError> {
        let n: i64 = sqlx::query("SELECT COUNT(*) AS n FROM join_rules WHERE tenant_id = $1 AND environment_id = $2")
            .bind(scope.tenant().to_string())
            .bind(env.to_string())
            .fetch_one(&mut *self.tx)
            .await?
            .try_get("n")?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    pub async fn insert_join_rule(
        &mut self,
        scope: &TenantScope,
        rule: &JoinRule,
        created_by: &str,
    ) -> Result<(), StoreError> {
        let RuleSpec::Aws(aws) = &rule.spec;
        sqlx::query(
            "INSERT INTO join_rules (id, tenant_id, environment_id, method, aws_account, aws_arn_pattern, created_at, created_by)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(rule.id.to_string())
        .bind(scope.tenant().to_string())
        .bind(rule.environment.to_string())
        .bind(rule.spec.method())
        .bind(aws.account())
        .bind(aws.arn_pattern())
        .bind(rule.created_at.unix_millis())
        .bind(created_by)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    /// Removes rule `id` of `env`; false when there is none.
    pub async fn delete_join_rule(
        &mut self,
        scope: &TenantScope,
        env: EnvironmentId,
        id: JoinRuleId,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM join_rules WHERE tenant_id = $1 AND environment_id = $2 AND id = $3")
            .bind(scope.tenant().to_string())
            .bind(env.to_string())
            .bind(id.to_string())
            .execute(&mut *self.tx)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// The appliance of `env` that joined with `join_key` and is not revoked: a platform join
    /// asked again with the same key is a join whose answer was lost.
    pub async fn platform_join_retry(
        &mut self,
        tenant: airlock_core::TenantId,
        env: EnvironmentId,
        join_key: &[u8],
    ) -> Result<Option<airlock_core::ApplianceId>, StoreError> {
        let row = sqlx::query(
            "SELECT id FROM appliances WHERE tenant_id = $1 AND environment_id = $2 AND join_key = $3 AND revoked_at IS NULL",
        )
        .bind(tenant.to_string())
        .bind(env.to_string())
        .bind(join_key)
        .fetch_optional(&mut *self.tx)
        .await?;
        row.map(|r| parse_col(&r, "id")).transpose()
    }
}
