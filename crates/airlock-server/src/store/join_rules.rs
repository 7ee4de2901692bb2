//! Join rules: which platform identity joins which environment (`crate::platform_join::rules`).

use airlock_core::EnvironmentId;
use airlock_core::id::JoinRuleId;
use sqlx::Row;

use super::{Store, StoreError, WriteTx, parse_col, ts_col};
use crate::authz::TenantScope;
use crate::platform_join::rules::{AwsRule, GcpRule, JoinRule, K8sRule, RuleSpec};
use crate::platform_join::tokens::TokenId;

/// Candidate rules read for one AWS account, GCP project or Kubernetes issuer at a join; more
/// than this is refused as ambiguous rather than read without bound.
const MAX_CANDIDATE_RULES: i64 = 1000;

const COLUMNS: &str = "id, tenant_id, environment_id, method, aws_account, aws_arn_pattern, gcp_project, \
    gcp_service_account, k8s_issuer, k8s_namespace, k8s_service_account, k8s_require_token_request, created_at";

/// Token ids swept per spend: the table shrinks as fast as it grows, without one long delete.
const TOKEN_ID_SWEEP: i64 = 100;

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
        "gcp" => {
            let project: Option<String> = r.try_get("gcp_project")?;
            let account: Option<String> = r.try_get("gcp_service_account")?;
            let (Some(project), Some(account)) = (project, account) else {
                return Err(StoreError::Corrupt("join rule: a GCP rule without its project or account".into()));
            };
            RuleSpec::Gcp(GcpRule::new(&project, &account).map_err(|e| StoreError::Corrupt(format!("join rule: {e}")))?)
        }
        "k8s" => {
            let issuer: Option<String> = r.try_get("k8s_issuer")?;
            let namespace: Option<String> = r.try_get("k8s_namespace")?;
            let account: Option<String> = r.try_get("k8s_service_account")?;
            let require_token_request: bool = r.try_get("k8s_require_token_request")?;
            let (Some(issuer), Some(namespace), Some(account)) = (issuer, namespace, account) else {
                return Err(StoreError::Corrupt("join rule: a Kubernetes rule without its issuer or account".into()));
            };
            RuleSpec::K8s(
                K8sRule::new(&issuer, &format!("{namespace}/{account}"))
                    .map_err(|e| StoreError::Corrupt(format!("join rule: {e}")))?
                    .requiring_token_request(require_token_request),
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

    /// Every tenant's GCP rules for `project`.
    pub async fn gcp_join_rules_for_project(&self, project: &str) -> Result<Vec<JoinRule>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM join_rules WHERE method = 'gcp' AND gcp_project = $1 ORDER BY created_at, id LIMIT $2"
        ))
        .bind(project)
        .bind(MAX_CANDIDATE_RULES)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(rule_from_row).collect()
    }

    /// Every tenant's Kubernetes rules naming `issuer`: none means the issuer is not asked at all.
    pub async fn k8s_join_rules_for_issuer(&self, issuer: &str) -> Result<Vec<JoinRule>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM join_rules WHERE method = 'k8s' AND k8s_issuer = $1 ORDER BY created_at, id LIMIT $2"
        ))
        .bind(issuer)
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

/// An appliance that joined with a platform identity, as a join asked again with its key finds it.
#[derive(Debug, Clone)]
pub struct PlatformJoined {
    pub appliance: airlock_core::ApplianceId,
    pub joined_at: airlock_core::Timestamp,
    /// The identity it joined as (`PlatformIdentity::matched`), if a platform join recorded one.
    pub identity: Option<String>,
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
        let (mut aws_account, mut aws_pattern, mut gcp_project, mut gcp_account) = (None, None, None, None);
        let (mut k8s_issuer, mut k8s_namespace, mut k8s_account, mut k8s_require_token_request) =
            (None, None, None, false);
        match &rule.spec {
            RuleSpec::Aws(aws) => (aws_account, aws_pattern) = (Some(aws.account()), aws.arn_pattern()),
            RuleSpec::Gcp(gcp) => (gcp_project, gcp_account) = (Some(gcp.project()), Some(gcp.service_account())),
            RuleSpec::K8s(k8s) => {
                (k8s_issuer, k8s_namespace, k8s_account, k8s_require_token_request) = (
                    Some(k8s.issuer()),
                    Some(k8s.namespace()),
                    Some(k8s.service_account()),
                    k8s.requires_token_request(),
                );
            }
        }
        sqlx::query(
            "INSERT INTO join_rules (id, tenant_id, environment_id, method, aws_account, aws_arn_pattern, gcp_project,
                 gcp_service_account, k8s_issuer, k8s_namespace, k8s_service_account, k8s_require_token_request,
                 created_at, created_by)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
        )
        .bind(rule.id.to_string())
        .bind(scope.tenant().to_string())
        .bind(rule.environment.to_string())
        .bind(rule.spec.method())
        .bind(aws_account)
        .bind(aws_pattern)
        .bind(gcp_project)
        .bind(gcp_account)
        .bind(k8s_issuer)
        .bind(k8s_namespace)
        .bind(k8s_account)
        .bind(k8s_require_token_request)
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

    /// The appliance of `env` that joined with `join_key` and is not revoked, when it joined and
    /// as whom: a platform join asked again with the same key may be a join whose answer was lost
    /// (`appliances::join` decides).
    pub async fn platform_join_retry(
        &mut self,
        tenant: airlock_core::TenantId,
        env: EnvironmentId,
        join_key: &[u8],
    ) -> Result<Option<PlatformJoined>, StoreError> {
        let row = sqlx::query(
            "SELECT id, joined_at, join_identity FROM appliances
             WHERE tenant_id = $1 AND environment_id = $2 AND join_key = $3 AND revoked_at IS NULL",
        )
        .bind(tenant.to_string())
        .bind(env.to_string())
        .bind(join_key)
        .fetch_optional(&mut *self.tx)
        .await?;
        row.map(|r| {
            Ok(PlatformJoined {
                appliance: parse_col(&r, "id")?,
                joined_at: ts_col(&r, "joined_at")?,
                identity: r.try_get("join_identity")?,
            })
        })
        .transpose()
    }

    /// Spends a Kubernetes token's id for `appliance`: false when another appliance used it.
    /// The same appliance may show it again (a retried join, a renewal before the kubelet
    /// refreshed the token). Expired ids are swept as ids are spent, a few at a time.
    pub async fn spend_platform_token(
        &mut self,
        token: &TokenId,
        appliance: airlock_core::ApplianceId,
        now: airlock_core::Timestamp,
    ) -> Result<bool, StoreError> {
        sqlx::query(
            "DELETE FROM platform_token_ids WHERE digest IN
                 (SELECT digest FROM platform_token_ids WHERE expires_at <= $1 ORDER BY expires_at LIMIT $2)",
        )
        .bind(now.unix_millis())
        .bind(TOKEN_ID_SWEEP)
        .execute(&mut *self.tx)
        .await?;
        let used: Option<String> = sqlx::query("SELECT appliance_id FROM platform_token_ids WHERE digest = $1")
            .bind(&token.digest)
            .fetch_optional(&mut *self.tx)
            .await?
            .map(|r| r.try_get("appliance_id"))
            .transpose()?;
        match used {
            Some(by) => Ok(by == appliance.to_string()),
            None => {
                sqlx::query("INSERT INTO platform_token_ids (digest, appliance_id, expires_at) VALUES ($1, $2, $3)")
                    .bind(&token.digest)
                    .bind(appliance.to_string())
                    .bind(token.expires_at.unix_millis())
                    .execute(&mut *self.tx)
                    .await?;
                Ok(true)
            }
        }
    }
}
