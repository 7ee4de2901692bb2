//! Joining with platform-native identity instead of a pre-shared token (AWS today).
//!
//! An appliance first asks for a challenge (`POST /v1/join/challenge`, anonymous and bounded:
//! [`challenges`]), then proves its identity with a platform-signed statement that carries it:
//! for AWS a SigV4-signed `sts:GetCallerIdentity` request ([`aws`]), whose signed headers hold
//! the challenge and this control plane's CA fingerprint. [`verify_aws`] checks the request
//! without I/O, spends the challenge (the first answer takes it, so neither a challenge nor a
//! proof is accepted twice), forwards the request to an allow-listed STS endpoint, and matches
//! the identity AWS names against every environment's [`rules`]: exactly one environment must
//! accept it. `appliances::join` then issues the certificate as for a token join.
//!
//! Replay window: a proof is good for one join, within the challenge's 60 s; SigV4's own
//! 15-minute date window is not relied on.
//!
//! At each renewal an AWS-joined appliance proves its identity again ([`recheck_at_renewal`]):
//! the challenge is derived from the CSR's new key (`airlock_proto::join::renewal_challenge`),
//! and a rule of its own environment must still accept it, or the renewal is refused and audited.

pub mod aws;
pub mod challenges;
pub mod rules;

use airlock_proto::join::AwsStsProof;

use self::aws::{AwsRefusal, StsAllowList, StsClient};
use self::challenges::{ChallengeRefusal, Challenges};
use self::rules::{AwsIdentity, RuleMatch};
use crate::state::AppState;
use crate::store::StoreError;

/// What a running control plane holds for platform joins.
#[derive(Debug)]
pub struct PlatformJoin {
    pub challenges: Challenges,
    pub sts_allow: StsAllowList,
    pub sts: StsClient,
}

impl PlatformJoin {
    pub fn new(sts_endpoints: &[String]) -> Result<Self, String> {
        Ok(Self {
            challenges: Challenges::default(),
            sts_allow: StsAllowList::new(sts_endpoints)?,
            sts: StsClient::new(aws::STS_TIMEOUT)?,
        })
    }
}

/// A platform identity that one environment's rules accept.
#[derive(Debug, Clone)]
pub struct PlatformMatch {
    pub tenant: airlock_core::TenantId,
    pub environment: airlock_core::EnvironmentId,
    pub rule: airlock_core::id::JoinRuleId,
    pub identity: AwsIdentity,
}

/// Why a platform proof did not join anything: a code for programs and the audit, a reason for people.
#[derive(Debug, Clone)]
pub enum PlatformRefusal {
    Challenge(ChallengeRefusal),
    Aws(AwsRefusal),
    /// AWS named this identity, and no environment's rule accepts it.
    NoRule(AwsIdentity),
    /// Rules of several environments accept it.
    SeveralEnvironments(AwsIdentity, usize),
}

impl PlatformRefusal {
    pub fn code(&self) -> &'static str {
        match self {
            Self::Challenge(ChallengeRefusal::Unknown) => "challenge_unknown",
            Self::Challenge(ChallengeRefusal::Expired) => "challenge_expired",
            Self::Aws(a) => a.code(),
            Self::NoRule(_) => "no_matching_rule",
            Self::SeveralEnvironments(..) => "several_environments",
        }
    }

    pub fn reason(&self) -> String {
        match self {
            Self::Challenge(ChallengeRefusal::Unknown) => {
                "the join challenge is unknown or was already used; ask for a new one (POST /v1/join/challenge)".into()
            }
            Self::Challenge(ChallengeRefusal::Expired) => "the join challenge expired; ask for a new one".into(),
            Self::Aws(a) => a.reason(),
            Self::NoRule(id) => format!(
                "no environment has a join rule for {} (account {}); add one with `airlock env join-rule add`",
                id.arn, id.account
            ),
            Self::SeveralEnvironments(id, n) => format!(
                "join rules of {n} environments accept {}; an identity must match exactly one environment",
                id.arn
            ),
        }
    }

    /// The identity AWS named, when it got that far.
    pub fn identity(&self) -> Option<&AwsIdentity> {
        match self {
            Self::NoRule(id) | Self::SeveralEnvironments(id, _) => Some(id),
            _ => None,
        }
    }
}

/// Checks an AWS proof, spends its challenge, asks STS who signed it, and finds the one
/// environment that accepts that identity.
pub async fn verify_aws(
    state: &AppState,
    proof: &AwsStsProof,
) -> Result<Result<PlatformMatch, PlatformRefusal>, StoreError> {
    let server_id = state.ca.fingerprint().to_string();
    let checked = match aws::check_proof(proof, &state.platform.sts_allow, &server_id) {
        Ok(c) => c,
        Err(r) => return Ok(Err(PlatformRefusal::Aws(r))),
    };
    if let Err(r) = state.platform.challenges.spend(&checked.challenge, state.now()) {
        return Ok(Err(PlatformRefusal::Challenge(r)));
    }
    let identity = match state.platform.sts.call(&checked).await {
        Ok(id) => id,
        Err(r) => return Ok(Err(PlatformRefusal::Aws(r))),
    };
    let candidates = state.store.aws_join_rules_for_account(&identity.account).await?;
    Ok(match rules::match_aws(&candidates, &identity) {
        RuleMatch::One { tenant, environment, rule } => Ok(PlatformMatch { tenant, environment, rule, identity }),
        RuleMatch::NoRule => Err(PlatformRefusal::NoRule(identity)),
        RuleMatch::SeveralEnvironments(envs) => Err(PlatformRefusal::SeveralEnvironments(identity, envs.len())),
    })
}

/// Why a join rule was not added or removed.
#[derive(Debug, thiserror::Error)]
pub enum RuleAdminError {
    #[error(transparent)]
    Invalid(#[from] rules::RuleError),
    #[error("no environment {0} in your tenant")]
    NoEnvironment(airlock_core::EnvironmentId),
    #[error("environment {0} already has {max} join rules; remove one first", max = rules::MAX_RULES_PER_ENVIRONMENT)]
    TooMany(airlock_core::EnvironmentId),
    #[error("no join rule {0} in environment {1}")]
    NoRule(airlock_core::id::JoinRuleId, airlock_core::EnvironmentId),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn rule_detail(rule: &rules::JoinRule) -> serde_json::Value {
    let rules::RuleSpec::Aws(aws) = &rule.spec;
    serde_json::json!({
        "join_rule": rule.id.to_string(),
        "method": rule.spec.method(),
        "aws_account": aws.account(),
        "aws_arn_pattern": aws.arn_pattern(),
    })
}

/// Adds a rule to `environment`, audited with it.
pub async fn add_rule(
    state: &AppState,
    scope: &crate::authz::TenantScope,
    environment: airlock_core::EnvironmentId,
    spec: rules::RuleSpec,
) -> Result<rules::JoinRule, RuleAdminError> {
    use airlock_core::audit::{AuditAction, Outcome};
    let env =
        state.store.get_environment(scope, environment).await?.ok_or(RuleAdminError::NoEnvironment(environment))?;
    let now = state.now();
    let rule = rules::JoinRule {
        id: airlock_core::id::JoinRuleId::from_random(crate::state::random()),
        tenant: scope.tenant(),
        environment: env.id,
        spec,
        created_at: now,
    };
    let mut tx = state.store.write().await?;
    if tx.count_join_rules(scope, env.id).await? >= rules::MAX_RULES_PER_ENVIRONMENT {
        return Err(RuleAdminError::TooMany(env.id));
    }
    tx.insert_join_rule(scope, &rule, &scope.principal().actor()).await?;
    let mut ev = crate::state::event(scope.principal().actor(), AuditAction::JoinRuleAdd, Outcome::Success);
    ev.target = Some(env.id.to_string());
    ev.workspace = Some(env.workspace_id.to_string());
    ev.detail = rule_detail(&rule);
    tx.audit(&scope.chain(), now, ev).await?;
    tx.commit().await?;
    Ok(rule)
}

/// The rules of `environment`.
pub async fn list_rules(
    state: &AppState,
    scope: &crate::authz::TenantScope,
    environment: airlock_core::EnvironmentId,
) -> Result<Vec<rules::JoinRule>, RuleAdminError> {
    let env =
        state.store.get_environment(scope, environment).await?.ok_or(RuleAdminError::NoEnvironment(environment))?;
    Ok(state.store.list_join_rules(scope, env.id).await?)
}

/// Removes rule `id` of `environment`, audited with it. Appliances it let join keep their
/// certificates until they renew (`crate::gateway::renew` asks the rule again).
pub async fn remove_rule(
    state: &AppState,
    scope: &crate::authz::TenantScope,
    environment: airlock_core::EnvironmentId,
    id: airlock_core::id::JoinRuleId,
) -> Result<(), RuleAdminError> {
    use airlock_core::audit::{AuditAction, Outcome};
    let env =
        state.store.get_environment(scope, environment).await?.ok_or(RuleAdminError::NoEnvironment(environment))?;
    let now = state.now();
    let mut tx = state.store.write().await?;
    if !tx.delete_join_rule(scope, env.id, id).await? {
        return Err(RuleAdminError::NoRule(id, env.id));
    }
    let mut ev = crate::state::event(scope.principal().actor(), AuditAction::JoinRuleRemove, Outcome::Success);
    ev.target = Some(env.id.to_string());
    ev.workspace = Some(env.workspace_id.to_string());
    ev.detail = serde_json::json!({ "join_rule": id.to_string() });
    tx.audit(&scope.chain(), now, ev).await?;
    tx.commit().await?;
    Ok(())
}

/// The longest renewal proof read off a stream (a proof with a session token is a few KiB).
pub const MAX_RENEWAL_PROOF_BYTES: usize = 16 * 1024;

/// At a renewal: an appliance that joined with its AWS identity must prove it again, with the
/// challenge derived from the CSR's new key, and a rule of its own environment must still
/// accept it (alone: an identity that now also matches another environment is refused too).
/// Token-joined appliances pass with `None`. The refusal is a reason for the appliance and the audit.
pub async fn recheck_at_renewal(
    state: &AppState,
    scope: &crate::authz::TenantScope,
    peer: &airlock_core::ApplianceIdentity,
    csr_pem: &str,
    proof_json: &str,
) -> Result<Result<Option<AwsIdentity>, String>, StoreError> {
    let Some(row) = state.store.get_appliance(scope, peer.appliance).await? else { return Ok(Ok(None)) };
    if row.join_method != "aws_sts" {
        return Ok(Ok(None));
    }
    if proof_json.is_empty() {
        return Ok(Err(
            "this appliance joined with its AWS identity and must prove it again to renew; run it with --join-method aws".into(),
        ));
    }
    if proof_json.len() > MAX_RENEWAL_PROOF_BYTES {
        return Ok(Err(format!("the renewal's AWS proof is larger than {MAX_RENEWAL_PROOF_BYTES} bytes")));
    }
    let Ok(proof) = serde_json::from_str::<AwsStsProof>(proof_json) else {
        return Ok(Err("the renewal's AWS proof is malformed".into()));
    };
    let Ok(key) = crate::ca::csr_public_key(csr_pem) else { return Ok(Err("the renewal CSR is malformed".into())) };
    let server_id = state.ca.fingerprint().to_string();
    let checked = match aws::check_proof(&proof, &state.platform.sts_allow, &server_id) {
        Ok(c) => c,
        Err(r) => return Ok(Err(r.reason())),
    };
    if checked.challenge != airlock_proto::join::renewal_challenge(&key) {
        return Ok(Err(
            "the renewal's AWS proof does not answer this renewal (its challenge is not the new key's)".into()
        ));
    }
    let identity = match state.platform.sts.call(&checked).await {
        Ok(id) => id,
        Err(r) => return Ok(Err(r.reason())),
    };
    let candidates = state.store.aws_join_rules_for_account(&identity.account).await?;
    Ok(match rules::match_aws(&candidates, &identity) {
        RuleMatch::One { tenant, environment, .. } if tenant == peer.tenant && environment == peer.environment => {
            Ok(Some(identity))
        }
        RuleMatch::One { .. } => {
            Err(format!("{} is now accepted by another environment's join rule only", identity.arn))
        }
        RuleMatch::NoRule => Err(format!(
            "no join rule of environment {} accepts {} any more; renewal refused",
            peer.environment, identity.arn
        )),
        RuleMatch::SeveralEnvironments(envs) => {
            Err(PlatformRefusal::SeveralEnvironments(identity, envs.len()).reason())
        }
    })
}
