//! Joining with platform-native identity instead of a pre-shared token: AWS, GCP, Kubernetes.
//!
//! An appliance first asks for a challenge (`POST /v1/join/challenge`, anonymous and bounded:
//! [`challenges`]), then proves its identity with a platform-signed statement ([`PlatformProof`]):
//! - AWS: a SigV4-signed `sts:GetCallerIdentity` request ([`aws`]), whose signed headers hold
//!   the challenge and this control plane's CA fingerprint; checked without I/O, then forwarded
//!   to an allow-listed STS endpoint, whose answer names the caller.
//! - GCP: the instance's identity token, its audience the CA fingerprint and the challenge
//!   ([`tokens`]), verified against `--gcp-issuer`'s JWKS (`crate::issuer`).
//! - Kubernetes: a service-account token whose audience binds the challenge (from the
//!   TokenRequest API) or is the CA fingerprint (mounted) ([`tokens`]), verified through the
//!   issuer a rule names (discovery, then JWKS).
//!
//! A platform join pins where it joins (`airlock_proto::join::JoinTarget`): its tenant (`--tenant`) or its
//! environment (`--environment`), or it is refused (`join_target_required`) before its challenge is spent.
//! Account ids, project ids and issuer URLs are no secret, and any tenant may write a rule naming them: so an
//! identity is matched only against the pinned tenant's [`rules`], and another tenant's rule for the same account
//! captures nothing (there is no claim on an account across tenants). The challenge is bound to the target it was
//! asked for with, and an AWS proof signs it, so a relayed proof cannot be steered to another tenant.
//! [`verify`] spends the challenge (the first answer takes it, so neither a challenge nor a
//! proof carrying it is accepted twice), asks the platform, and matches the identity against
//! the pinned tenant's rules with the one decision [`rules::match_identity`]: exactly one
//! environment must accept it. An appliance that names its environment is
//! judged by that environment's rules alone: several environments' rules cannot make its join
//! ambiguous, and an identity only another environment accepts is refused, not placed there.
//! `appliances::join` then issues the certificate as for a token join, and spends a Kubernetes token's `jti` in the
//! same transaction.
//!
//! Replay windows: an AWS or GCP proof, or a Kubernetes token the appliance asked the cluster's
//! TokenRequest API for (its audience [`challenge_audience`] of the challenge), is good for one
//! join, within the challenge's 60 s (SigV4's own 15-minute window and the tokens' lifetimes are
//! not relied on). A mounted Kubernetes token cannot carry the challenge: it joins once (its
//! `jti`), and only while its `iat` is younger than `--k8s-max-token-age`; whoever reads it before
//! its pod uses it can join once in its place within that window (ARCHITECTURE.md says so).
//! `--k8s-require-token-request` refuses mounted tokens and so closes it, for every rule; a rule added
//! with `--k8s-require-token-request` closes it for the service account it names
//! ([`rules::match_identity`] refuses a mounted token that only such rules name, as
//! `rule_requires_token_request`, at a join and at a renewal alike).
//!
//! At each renewal a platform-joined appliance proves its identity again, by the method it
//! joined with ([`recheck_at_renewal`]): the challenge is derived from the CSR's new key
//! (`airlock_proto::join::renewal_challenge`), and a rule of its own environment must still
//! accept it, and it must be the identity the appliance joined with (`join_identity`), or the renewal is refused and
//! audited: removing the rule for one role cuts off that role's appliances even while a rule for another role, which
//! the same key holder may also have, remains.

pub mod aws;
pub mod challenges;
pub mod recovery;
pub mod rules;
pub mod tokens;

use std::time::Duration;

use airlock_proto::join::{JoinTarget, PlatformProof, challenge_audience, server_audience};

use self::aws::{AwsRefusal, StsAllowList, StsClient};
use self::challenges::{ChallengeRefusal, Challenges};
use self::rules::{JoinRule, PlatformIdentity, ProofForm, RuleMatch};
use self::tokens::{TokenId, TokenRefusal};
use crate::issuer::Expect;
use crate::state::AppState;
use crate::store::StoreError;

/// Google's issuer of instance identity tokens (`--gcp-issuer` changes it, for tests).
pub const DEFAULT_GCP_ISSUER: &str = "https://accounts.google.com";

/// What a running control plane holds for platform joins.
#[derive(Debug)]
pub struct PlatformJoin {
    pub challenges: Challenges,
    pub sts_allow: StsAllowList,
    pub sts: StsClient,
    /// The issuer GCP identity tokens must come from.
    pub gcp_issuer: String,
    /// How old a mounted Kubernetes token's `iat` may be.
    pub k8s_max_token_age: Duration,
    /// Accept only Kubernetes tokens from the TokenRequest API (audience bound to the challenge).
    pub k8s_require_token_request: bool,
}

/// How platform joins are configured (`airlock server` flags).
#[derive(Debug, Clone)]
pub struct PlatformConfig {
    pub sts_endpoints: Vec<String>,
    pub gcp_issuer: String,
    pub k8s_max_token_age: Duration,
    /// `--k8s-require-token-request`: refuse mounted Kubernetes tokens, whose replay window this closes.
    pub k8s_require_token_request: bool,
}

impl Default for PlatformConfig {
    fn default() -> Self {
        Self {
            sts_endpoints: Vec::new(),
            gcp_issuer: DEFAULT_GCP_ISSUER.to_owned(),
            k8s_max_token_age: tokens::DEFAULT_K8S_MAX_TOKEN_AGE,
            k8s_require_token_request: false,
        }
    }
}

impl PlatformJoin {
    pub fn new(config: &PlatformConfig) -> Result<Self, String> {
        let gcp = reqwest::Url::parse(&config.gcp_issuer).map_err(|e| format!("--gcp-issuer: {e}"))?;
        if gcp.scheme() != "https" || gcp.query().is_some() || gcp.fragment().is_some() {
            return Err(format!("--gcp-issuer `{}`: an issuer is an https:// URL", config.gcp_issuer));
        }
        if config.k8s_max_token_age.is_zero() {
            return Err("--k8s-max-token-age must be more than zero".into());
        }
        Ok(Self {
            challenges: Challenges::default(),
            sts_allow: StsAllowList::new(&config.sts_endpoints)?,
            sts: StsClient::new(aws::STS_TIMEOUT)?,
            gcp_issuer: config.gcp_issuer.clone(),
            k8s_max_token_age: config.k8s_max_token_age,
            k8s_require_token_request: config.k8s_require_token_request,
        })
    }
}

/// A platform identity that one environment's rules accept.
#[derive(Debug, Clone)]
pub struct PlatformMatch {
    pub tenant: airlock_core::TenantId,
    pub environment: airlock_core::EnvironmentId,
    pub rule: airlock_core::id::JoinRuleId,
    pub identity: PlatformIdentity,
    /// A Kubernetes token's single-use id, spent with the join or renewal it allows.
    pub token_id: Option<TokenId>,
}

/// A refused platform join, and the tenant whose rules judged the proved identity, when one did: the refusal is
/// that tenant's to see (its audit chain), while one refused before any tenant's rules were read (a bad proof, a
/// spent challenge, a tenant named that has no rule for the identity's account) stays on the system chain, so no
/// one can make a chain for a tenant id that holds nothing.
#[derive(Debug, Clone)]
pub struct Refused {
    pub refusal: PlatformRefusal,
    pub judged_by: Option<airlock_core::TenantId>,
}

impl From<PlatformRefusal> for Refused {
    fn from(refusal: PlatformRefusal) -> Self {
        Self { refusal, judged_by: None }
    }
}

/// Why a platform proof did not join anything: a code for programs and the audit, a reason for people.
#[derive(Debug, Clone)]
pub enum PlatformRefusal {
    /// The join names neither its tenant nor its environment.
    Unpinned,
    Challenge(ChallengeRefusal),
    Aws(AwsRefusal),
    /// A GCP or Kubernetes token refused.
    Token(TokenRefusal),
    /// A renewal's proof answers another challenge than its new key's.
    NotThisRenewal,
    /// The platform named this identity, and no environment's rule accepts it.
    NoRule(PlatformIdentity),
    /// Rules of several environments accept it.
    SeveralEnvironments(PlatformIdentity, usize),
    /// The appliance named this environment, whose rules do not accept it; another environment's do.
    NotNamedEnvironment(PlatformIdentity, airlock_core::EnvironmentId),
    /// A mounted Kubernetes token, and every rule naming its service account (all of this
    /// environment) requires a token from the TokenRequest API.
    RuleRequiresTokenRequest(PlatformIdentity, airlock_core::EnvironmentId),
}

impl PlatformRefusal {
    pub fn code(&self) -> &'static str {
        match self {
            Self::Challenge(ChallengeRefusal::Unknown) => "challenge_unknown",
            Self::Challenge(ChallengeRefusal::Expired) => "challenge_expired",
            Self::Challenge(ChallengeRefusal::OtherTarget) => "challenge_other_target",
            Self::Challenge(ChallengeRefusal::Busy) => "challenge_busy",
            Self::Unpinned => "join_target_required",
            Self::Aws(a) => a.code(),
            Self::Token(t) => t.code(),
            Self::NotThisRenewal => "renewal_challenge",
            Self::NoRule(_) => "no_matching_rule",
            Self::SeveralEnvironments(..) => "several_environments",
            Self::NotNamedEnvironment(..) => "other_environment",
            Self::RuleRequiresTokenRequest(..) => "rule_requires_token_request",
        }
    }

    pub fn reason(&self) -> String {
        match self {
            Self::Challenge(ChallengeRefusal::Unknown) => {
                "the join challenge is unknown or was already used; ask for a new one (POST /v1/join/challenge)".into()
            }
            Self::Challenge(ChallengeRefusal::Expired) => "the join challenge expired; ask for a new one".into(),
            Self::Challenge(ChallengeRefusal::OtherTarget) => {
                "the join challenge was asked for another tenant or environment than this join names".into()
            }
            Self::Challenge(ChallengeRefusal::Busy) => {
                "more join challenges were answered this minute than this control plane remembers; try again".into()
            }
            Self::Unpinned => "a platform join must name its tenant (--tenant ten_…) or its environment \
                (--environment env_…): an account, project or cluster issuer is no secret, so only the rules of the \
                tenant the appliance names may accept it"
                .into(),
            Self::Aws(a) => a.reason(),
            Self::Token(t) => t.reason(),
            Self::NotThisRenewal => {
                "the renewal's platform proof does not answer this renewal (its challenge is not the new key's)".into()
            }
            Self::NoRule(id) => format!(
                "no environment of the tenant the join names has a join rule for {}; add one with `airlock env join-rule add`",
                describe(id)
            ),
            Self::SeveralEnvironments(id, n) => format!(
                "join rules of {n} environments accept {}; an identity must match exactly one environment",
                describe(id)
            ),
            Self::NotNamedEnvironment(id, named) => format!(
                "the join names environment {named}, whose join rules do not accept {}; another environment's do, \
                 so it is not joined there either (fix the rules or the appliance's --environment)",
                describe(id)
            ),
            Self::RuleRequiresTokenRequest(id, env) => format!(
                "the join rules of environment {env} that name {} accept only tokens from the TokenRequest API \
                 (their audience binds the join challenge), and this token is mounted; run the appliance with \
                 --k8s-token-request",
                describe(id)
            ),
        }
    }

    /// The identity the platform named, when it got that far.
    pub fn identity(&self) -> Option<&PlatformIdentity> {
        match self {
            Self::NoRule(id)
            | Self::SeveralEnvironments(id, _)
            | Self::NotNamedEnvironment(id, _)
            | Self::RuleRequiresTokenRequest(id, _) => Some(id),
            _ => None,
        }
    }

    /// Whether the platform could not be asked (STS or the issuer unreachable): worth a retry.
    pub fn unavailable(&self) -> bool {
        matches!(
            self,
            Self::Aws(AwsRefusal::StsUnreachable)
                | Self::Token(TokenRefusal::Jwt(crate::issuer::JwtRefusal::IssuerUnreachable))
                | Self::Challenge(ChallengeRefusal::Busy)
        )
    }
}

fn describe(id: &PlatformIdentity) -> String {
    match id {
        PlatformIdentity::Aws(a) => format!("{} (account {})", a.arn, a.account),
        PlatformIdentity::Gcp(g) => format!("service account {} of project {}", g.email, g.project),
        PlatformIdentity::K8s(k) => {
            format!("service account {}/{} of issuer {}", k.namespace, k.service_account, k.issuer)
        }
    }
}

/// How a proof shows it is fresh.
#[derive(Clone, Copy)]
enum Freshness<'a> {
    /// A join: the proof's challenge is spent (the first answer takes it).
    Join,
    /// A renewal: the challenge must be the one derived from the CSR's new key.
    Renewal { key: &'a [u8] },
}

impl Freshness<'_> {
    /// `target` is what the join names, which the challenge must have been asked for.
    fn check(self, state: &AppState, challenge: &str, target: JoinTarget) -> Result<(), PlatformRefusal> {
        match self {
            Freshness::Join => {
                state.platform.challenges.spend(challenge, state.now(), target).map_err(PlatformRefusal::Challenge)
            }
            Freshness::Renewal { key } => (challenge == airlock_proto::join::renewal_challenge(key))
                .then_some(())
                .ok_or(PlatformRefusal::NotThisRenewal),
        }
    }
}

/// What a proof proved: who the platform says signed it, how the proof was bound to the
/// attempt, the rules that could accept that identity, a mounted Kubernetes token's single-use
/// id, and the target that judges it (the one the join names, narrowed by what an AWS proof signs).
struct Proved {
    identity: PlatformIdentity,
    form: ProofForm,
    candidates: Vec<JoinRule>,
    token_id: Option<TokenId>,
    target: JoinTarget,
}

/// Checks a proof of any method, its freshness, and asks the platform (STS or the issuer) who made it.
/// `named` is the tenant and environment the join names (or a renewing appliance's own); an AWS proof that
/// signs either must sign the same, and a join's named ones must be signed.
async fn prove(
    state: &AppState,
    proof: &PlatformProof,
    fresh: Freshness<'_>,
    named: JoinTarget,
) -> Result<Result<Proved, PlatformRefusal>, StoreError> {
    let server_id = state.ca.fingerprint().to_string();
    let now = state.now();
    match proof {
        PlatformProof::AwsSts(proof) => {
            let checked = match aws::check_proof(proof, &state.platform.sts_allow, &server_id) {
                Ok(c) => c,
                Err(r) => return Ok(Err(PlatformRefusal::Aws(r))),
            };
            // A join must have signed the tenant and environment it names; a renewal is held to its own already, and
            // need not.
            let must_sign = matches!(fresh, Freshness::Join);
            let tenant = match aws::check_tenant(checked.tenant, named.tenant, must_sign) {
                Ok(tenant) => tenant,
                Err(r) => return Ok(Err(PlatformRefusal::Aws(r))),
            };
            let environment = match aws::check_environment(checked.environment, named.environment, must_sign) {
                Ok(env) => env,
                Err(r) => return Ok(Err(PlatformRefusal::Aws(r))),
            };
            let target = JoinTarget { tenant, environment };
            if let Err(r) = fresh.check(state, &checked.challenge, named) {
                return Ok(Err(r));
            }
            let identity = match state.platform.sts.call(&checked).await {
                Ok(id) => id,
                Err(r) => return Ok(Err(PlatformRefusal::Aws(r))),
            };
            let candidates = state.store.aws_join_rules_for_account(&identity.account).await?;
            Ok(Ok(Proved {
                identity: PlatformIdentity::Aws(identity),
                form: ProofForm::ChallengeBound,
                candidates,
                token_id: None,
                target,
            }))
        }
        PlatformProof::Gcp(proof) => {
            if proof.identity_token.len() > tokens::MAX_TOKEN_BYTES {
                return Ok(Err(PlatformRefusal::Token(TokenRefusal::Malformed("longer than 16 KiB"))));
            }
            if let Err(r) = fresh.check(state, &proof.challenge, named) {
                return Ok(Err(r));
            }
            // The audience binds the token to this control plane and this challenge, exactly.
            let audience = challenge_audience(&server_id, &proof.challenge);
            let expect = Expect { audience: &audience, max_age: None };
            let claims =
                match state.issuers.verify(&state.platform.gcp_issuer, &proof.identity_token, &expect, now).await {
                    Ok(c) => c,
                    Err(r) => return Ok(Err(PlatformRefusal::Token(TokenRefusal::Jwt(r)))),
                };
            let identity = match tokens::read_gcp(&claims) {
                Ok(id) => id,
                Err(r) => return Ok(Err(PlatformRefusal::Token(r))),
            };
            let candidates = state.store.gcp_join_rules_for_project(&identity.project).await?;
            Ok(Ok(Proved {
                identity: PlatformIdentity::Gcp(identity),
                form: ProofForm::ChallengeBound,
                candidates,
                token_id: None,
                target: named,
            }))
        }
        PlatformProof::K8s(proof) => {
            // A join's challenge is spent whichever form the token takes: for a mounted token it
            // proves nothing, but it paces anonymous attempts, as for the other methods.
            if let Freshness::Join = fresh
                && let Err(r) = fresh.check(state, &proof.challenge, named)
            {
                return Ok(Err(r));
            }
            let (issuer, audiences) = match tokens::unverified_issuer_and_audiences(&proof.service_account_token) {
                Ok(read) => read,
                Err(r) => return Ok(Err(PlatformRefusal::Token(r))),
            };
            // Only an issuer a rule names is ever fetched from.
            let candidates = state.store.k8s_join_rules_for_issuer(&issuer).await?;
            if candidates.is_empty() {
                return Ok(Err(PlatformRefusal::Token(TokenRefusal::IssuerNotNamed(issuer))));
            }
            // A token the appliance asked the TokenRequest API for names this challenge in its
            // audience: fresh as a GCP token, so no `iat` window and no `jti` to spend. Which form
            // it is, is read from the unverified token only to choose what to expect of it; the
            // verification below then holds it to exactly that audience.
            let bound = challenge_audience(&server_id, &proof.challenge);
            let requested = audiences.contains(&bound);
            if requested {
                if let Freshness::Renewal { .. } = fresh
                    && let Err(r) = fresh.check(state, &proof.challenge, named)
                {
                    return Ok(Err(r));
                }
            } else if state.platform.k8s_require_token_request {
                return Ok(Err(PlatformRefusal::Token(TokenRefusal::MountedNotAccepted)));
            }
            let mounted = server_audience(&server_id);
            let expect = if requested {
                Expect { audience: &bound, max_age: None }
            } else {
                Expect { audience: &mounted, max_age: Some(state.platform.k8s_max_token_age) }
            };
            let claims = match state.issuers.verify(&issuer, &proof.service_account_token, &expect, now).await {
                Ok(c) => c,
                Err(r) => return Ok(Err(PlatformRefusal::Token(TokenRefusal::Jwt(r)))),
            };
            let (identity, token_id) = match tokens::read_k8s(&issuer, &claims, !requested) {
                Ok(read) => read,
                Err(r) => return Ok(Err(PlatformRefusal::Token(r))),
            };
            let form = if requested { ProofForm::ChallengeBound } else { ProofForm::MountedToken };
            Ok(Ok(Proved { identity: PlatformIdentity::K8s(identity), form, candidates, token_id, target: named }))
        }
    }
}

/// Checks a join's platform proof, spends its challenge, asks the platform who made it, and
/// finds the one environment that accepts that identity among the rules of the tenant the join
/// names (only the named environment's, when it names one). A join that names neither is refused
/// before its challenge is spent.
pub async fn verify(
    state: &AppState,
    proof: &PlatformProof,
    named: JoinTarget,
) -> Result<Result<PlatformMatch, Refused>, StoreError> {
    if !named.is_pinned() {
        return Ok(Err(PlatformRefusal::Unpinned.into()));
    }
    let Proved { identity, form, candidates, token_id, target } =
        match prove(state, proof, Freshness::Join, named).await? {
            Ok(p) => p,
            Err(r) => return Ok(Err(r.into())),
        };
    let judged_by = judging_tenant(&candidates, target).filter(|t| candidates.iter().any(|r| r.tenant == *t));
    Ok(decide(candidates, identity, form, token_id, target).map_err(|refusal| Refused { refusal, judged_by }))
}

/// The tenant whose rules judge a join pinned to `target`: the tenant named, or the named environment's (whose rules,
/// if it has any for this identity's account, project or issuer, are among the candidates).
fn judging_tenant(candidates: &[JoinRule], target: JoinTarget) -> Option<airlock_core::TenantId> {
    target.tenant.or_else(|| {
        let env = target.environment?;
        candidates.iter().find(|r| r.environment == env).map(|r| r.tenant)
    })
}

/// The join's decision, once the platform named the identity: exactly one environment, among the
/// pinned tenant's `candidates`, or among the named environment's rules alone.
fn decide(
    candidates: Vec<JoinRule>,
    identity: PlatformIdentity,
    form: ProofForm,
    token_id: Option<TokenId>,
    target: JoinTarget,
) -> Result<PlatformMatch, PlatformRefusal> {
    // Every tenant's rules but the judging one's are dropped unread: they cannot capture this appliance, nor make its
    // join ambiguous.
    let Some(tenant) = judging_tenant(&candidates, target) else {
        return Err(if target.is_pinned() { PlatformRefusal::NoRule(identity) } else { PlatformRefusal::Unpinned });
    };
    let named = target.environment;
    let (judged, elsewhere): (Vec<JoinRule>, Vec<JoinRule>) = candidates
        .into_iter()
        .filter(|r| r.tenant == tenant)
        .partition(|r| named.is_none_or(|env| r.environment == env));
    match rules::match_identity(&judged, &identity, form) {
        RuleMatch::One { tenant, environment, rule } => {
            Ok(PlatformMatch { tenant, environment, rule, identity, token_id })
        }
        RuleMatch::NoRule => match named {
            Some(env) if !matches!(rules::match_identity(&elsewhere, &identity, form), RuleMatch::NoRule) => {
                Err(PlatformRefusal::NotNamedEnvironment(identity, env))
            }
            _ => Err(PlatformRefusal::NoRule(identity)),
        },
        RuleMatch::SeveralEnvironments(envs) => Err(PlatformRefusal::SeveralEnvironments(identity, envs.len())),
        RuleMatch::TokenRequestRequired(env) => Err(PlatformRefusal::RuleRequiresTokenRequest(identity, env)),
    }
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

fn rule_detail(rule: &JoinRule) -> serde_json::Value {
    let mut detail = serde_json::json!({ "join_rule": rule.id.to_string(), "method": rule.spec.method() });
    match &rule.spec {
        rules::RuleSpec::Aws(aws) => {
            detail["aws_account"] = aws.account().into();
            detail["aws_arn_pattern"] = aws.arn_pattern().into();
        }
        rules::RuleSpec::Gcp(gcp) => {
            detail["gcp_project"] = gcp.project().into();
            detail["gcp_service_account"] = gcp.service_account().into();
        }
        rules::RuleSpec::K8s(k8s) => {
            detail["k8s_issuer"] = k8s.issuer().into();
            detail["k8s_service_account"] = format!("{}/{}", k8s.namespace(), k8s.service_account()).into();
            detail["k8s_require_token_request"] = k8s.requires_token_request().into();
        }
    }
    detail
}

/// Adds a rule to `environment`, audited with it.
pub async fn add_rule(
    state: &AppState,
    scope: &crate::authz::TenantScope,
    environment: airlock_core::EnvironmentId,
    spec: rules::RuleSpec,
) -> Result<JoinRule, RuleAdminError> {
    use airlock_core::audit::{AuditAction, Outcome};
    let env =
        state.store.get_environment(scope, environment).await?.ok_or(RuleAdminError::NoEnvironment(environment))?;
    // No claim across tenants: another tenant naming the same account, project or issuer changes nothing for this
    // one, since a platform join is judged by the rules of the tenant it pins only (see `decide`).
    let now = state.now();
    let rule = JoinRule {
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
) -> Result<Vec<JoinRule>, RuleAdminError> {
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
pub const MAX_RENEWAL_PROOF_BYTES: usize = 24 * 1024;

/// What a renewal's platform proof showed.
#[derive(Debug)]
pub struct Reproved {
    pub identity: PlatformIdentity,
    /// A Kubernetes token's id, spent with the renewal (this appliance may show it again).
    pub token_id: Option<TokenId>,
}

/// At a renewal: an appliance that joined with its platform identity must prove it again, by
/// the same method, with the challenge derived from the CSR's new key (a Kubernetes token,
/// which cannot carry one, by a `jti` no other appliance used and a recent `iat`), and a rule
/// of its own environment must still accept it (alone: an identity that now also matches
/// another environment is refused too). Token-joined appliances pass with `None`. The refusal
/// is a reason for the appliance and the audit.
pub async fn recheck_at_renewal(
    state: &AppState,
    scope: &crate::authz::TenantScope,
    peer: &airlock_core::ApplianceIdentity,
    csr_pem: &str,
    proof_json: &str,
) -> Result<Result<Option<Reproved>, String>, StoreError> {
    let Some(row) = state.store.get_appliance(scope, peer.appliance).await? else { return Ok(Ok(None)) };
    let flag = match row.join_method.as_str() {
        "aws_sts" => "aws",
        airlock_proto::join::GCP_METHOD => "gcp",
        airlock_proto::join::K8S_METHOD => "k8s",
        _ => return Ok(Ok(None)),
    };
    if proof_json.is_empty() {
        return Ok(Err(format!(
            "this appliance joined with its platform identity ({}) and must prove it again to renew; run it with --join-method {flag}",
            row.join_method
        )));
    }
    if proof_json.len() > MAX_RENEWAL_PROOF_BYTES {
        return Ok(Err(format!("the renewal's platform proof is larger than {MAX_RENEWAL_PROOF_BYTES} bytes")));
    }
    // A bare AWS proof is how AWS-joined appliances sent it first.
    let parsed = serde_json::from_str::<PlatformProof>(proof_json)
        .or_else(|_| serde_json::from_str::<airlock_proto::join::AwsStsProof>(proof_json).map(PlatformProof::AwsSts));
    let Ok(proof) = parsed else {
        return Ok(Err("the renewal's platform proof is malformed".into()));
    };
    if proof.method() != row.join_method {
        return Ok(Err(format!(
            "this appliance joined with {} and must renew with the same method, not {}",
            row.join_method,
            proof.method()
        )));
    }
    let Ok(key) = crate::ca::csr_public_key(csr_pem) else { return Ok(Err("the renewal CSR is malformed".into())) };
    let renewal = Freshness::Renewal { key: &key };
    let own_target = JoinTarget { tenant: Some(peer.tenant), environment: Some(peer.environment) };
    let Proved { identity, form, candidates, token_id, .. } = match prove(state, &proof, renewal, own_target).await? {
        Ok(p) => p,
        Err(r) => return Ok(Err(r.reason())),
    };
    // The identity it joined with, and no other: a rule still accepting some identity the key holder also has (another
    // role of the account) must not keep alive an appliance whose own rule was removed.
    if let Some(refused) = other_identity(row.join_identity.as_deref(), &identity) {
        return Ok(Err(refused));
    }
    // Only the appliance's own environment's rules decide its renewal: another tenant's rule naming the same
    // identity (an AWS account id is no secret) must not make a fleet's renewals fail as ambiguous.
    let own: Vec<_> =
        candidates.into_iter().filter(|r| r.tenant == peer.tenant && r.environment == peer.environment).collect();
    Ok(match rules::match_identity(&own, &identity, form) {
        RuleMatch::One { tenant, environment, .. } if tenant == peer.tenant && environment == peer.environment => {
            Ok(Some(Reproved { identity, token_id }))
        }
        RuleMatch::One { .. } => {
            Err(format!("{} is now accepted by another environment's join rule only", describe(&identity)))
        }
        RuleMatch::NoRule => Err(format!(
            "no join rule of environment {} accepts {} any more; renewal refused",
            peer.environment,
            describe(&identity)
        )),
        RuleMatch::SeveralEnvironments(envs) => {
            Err(PlatformRefusal::SeveralEnvironments(identity, envs.len()).reason())
        }
        RuleMatch::TokenRequestRequired(env) => Err(PlatformRefusal::RuleRequiresTokenRequest(identity, env).reason()),
    })
}

/// Why a proved identity is not the one an appliance joined with (`recorded`, its `join_identity`), if it is not.
pub fn other_identity(recorded: Option<&str>, proved: &PlatformIdentity) -> Option<String> {
    let shown = proved.matched();
    match recorded {
        Some(recorded) if recorded == shown => None,
        Some(recorded) => Some(format!(
            "identity_changed: this appliance joined as {recorded}, and its proof shows {}; it renews and recovers only \
             as the identity it joined with",
            describe(proved)
        )),
        None => Some(format!(
            "identity_changed: no platform identity is recorded for this appliance, and its proof shows {}",
            describe(proved)
        )),
    }
}

#[cfg(test)]
mod tests {
    use airlock_core::id::JoinRuleId;
    use airlock_core::{EnvironmentId, TenantId, Timestamp};

    use airlock_proto::join::JoinTarget;

    use super::rules::{AwsIdentity, AwsRule, JoinRule, PlatformIdentity, ProofForm, RuleSpec};
    use super::{PlatformRefusal, decide};

    const ALPHA: [u8; 16] = [1; 16];

    fn tenant(t: [u8; 16]) -> JoinTarget {
        JoinTarget { tenant: Some(TenantId::from_random(t)), environment: None }
    }

    fn env(e: EnvironmentId) -> JoinTarget {
        JoinTarget { tenant: None, environment: Some(e) }
    }

    fn rule(env: EnvironmentId, pattern: &str) -> JoinRule {
        JoinRule {
            id: JoinRuleId::from_random(crate::state::random()),
            tenant: TenantId::from_random(ALPHA),
            environment: env,
            spec: RuleSpec::Aws(AwsRule::new("123456789012", Some(pattern)).unwrap()),
            created_at: Timestamp::from_unix_millis(0),
        }
    }

    fn prod() -> PlatformIdentity {
        PlatformIdentity::Aws(AwsIdentity::from_caller("123456789012", "arn:aws:iam::123456789012:role/airlock-prod"))
    }

    #[test]
    fn a_named_environment_is_judged_by_its_own_rules_only() {
        let (a, b, c) = (
            EnvironmentId::from_random(crate::state::random()),
            EnvironmentId::from_random(crate::state::random()),
            EnvironmentId::from_random(crate::state::random()),
        );
        let both = vec![
            rule(a, "arn:aws:iam::123456789012:role/airlock-*"),
            rule(b, "arn:aws:iam::123456789012:role/airlock-prod"),
        ];
        // Only the tenant named: two of its environments accept it, so it is refused as ambiguous.
        let several = decide(both.clone(), prod(), ProofForm::ChallengeBound, None, tenant(ALPHA));
        assert!(matches!(several, Err(PlatformRefusal::SeveralEnvironments(_, 2))));
        // Named: that environment's rules alone decide.
        let joined = decide(both.clone(), prod(), ProofForm::ChallengeBound, None, env(b)).unwrap();
        assert_eq!((joined.environment, joined.rule), (b, both[1].id));
        // Named, but only another environment accepts it: refused, not placed there.
        let only_a = vec![both[0].clone()];
        let in_b = JoinTarget { tenant: Some(TenantId::from_random(ALPHA)), environment: Some(b) };
        let refused = decide(only_a.clone(), prod(), ProofForm::ChallengeBound, None, in_b).unwrap_err();
        assert!(matches!(refused, PlatformRefusal::NotNamedEnvironment(_, env) if env == b));
        assert_eq!(refused.code(), "other_environment");
        assert!(refused.reason().contains(&b.to_string()), "{}", refused.reason());
        // Only the tenant named: the one environment of it that accepts it takes it.
        assert_eq!(
            decide(only_a.clone(), prod(), ProofForm::ChallengeBound, None, tenant(ALPHA)).unwrap().environment,
            a
        );
        // Named, and no environment accepts it: no rule at all.
        let none = vec![rule(a, "arn:aws:iam::123456789012:role/other")];
        assert!(matches!(
            decide(none, prod(), ProofForm::ChallengeBound, None, env(c)),
            Err(PlatformRefusal::NoRule(_))
        ));
        // An environment with no rule for this account: its tenant is unknown here, so no rule either.
        assert!(matches!(
            decide(only_a, prod(), ProofForm::ChallengeBound, None, env(c)),
            Err(PlatformRefusal::NoRule(_))
        ));
    }

    fn of(t: [u8; 16], r: JoinRule) -> JoinRule {
        JoinRule { tenant: TenantId::from_random(t), ..r }
    }

    #[test]
    fn another_tenants_rule_for_the_same_account_captures_nothing() {
        const BETA: [u8; 16] = [2; 16];
        let (alpha_env, beta_env) =
            (EnvironmentId::from_random(crate::state::random()), EnvironmentId::from_random(crate::state::random()));
        let alphas = rule(alpha_env, "arn:aws:iam::123456789012:role/airlock-*");
        // Beta names alpha's account (no secret) with a rule that accepts any of its roles.
        let betas = of(BETA, rule(beta_env, "arn:aws:iam::123456789012:*"));
        let both = vec![betas.clone(), alphas.clone()];
        // Alpha's appliance, pinned to alpha (by tenant or by environment), joins alpha, whatever beta's rules say.
        assert_eq!(
            decide(both.clone(), prod(), ProofForm::ChallengeBound, None, tenant(ALPHA)).unwrap().environment,
            alpha_env
        );
        assert_eq!(
            decide(both.clone(), prod(), ProofForm::ChallengeBound, None, env(alpha_env)).unwrap().environment,
            alpha_env
        );
        // Not ambiguous either: beta's rule is not read.
        let other_role =
            PlatformIdentity::Aws(AwsIdentity::from_caller("123456789012", "arn:aws:iam::123456789012:role/billing"));
        // An identity only beta's rule accepts, pinned to alpha: refused, not placed in beta.
        let refused =
            decide(both.clone(), other_role.clone(), ProofForm::ChallengeBound, None, tenant(ALPHA)).unwrap_err();
        assert!(matches!(refused, PlatformRefusal::NoRule(_)), "{refused:?}");
        // A tenant and an environment of another tenant: nothing of either.
        let crossed = JoinTarget { tenant: Some(TenantId::from_random(ALPHA)), environment: Some(beta_env) };
        assert!(decide(both.clone(), other_role.clone(), ProofForm::ChallengeBound, None, crossed).is_err());
        // Pinned to beta, beta's rule judges (beta's own appliance, or its operator's choice).
        assert_eq!(
            decide(both.clone(), other_role, ProofForm::ChallengeBound, None, tenant(BETA)).unwrap().environment,
            beta_env
        );
        // Pinned to nothing: refused.
        let unpinned = decide(both, prod(), ProofForm::ChallengeBound, None, JoinTarget::default()).unwrap_err();
        assert_eq!(unpinned.code(), "join_target_required");
        assert!(unpinned.reason().contains("--tenant"), "{}", unpinned.reason());
    }

    #[test]
    fn a_renewal_proves_the_identity_it_joined_with() {
        let role = |r: &str| {
            PlatformIdentity::Aws(AwsIdentity::from_caller(
                "123456789012",
                &format!("arn:aws:sts::123456789012:assumed-role/{r}/session-2"),
            ))
        };
        assert_eq!(super::other_identity(Some("arn:aws:iam::123456789012:role/a"), &role("a")), None);
        let why = super::other_identity(Some("arn:aws:iam::123456789012:role/a"), &role("b")).unwrap();
        assert!(why.starts_with("identity_changed") && why.contains("role/a") && why.contains("role/b"), "{why}");
        assert!(super::other_identity(None, &role("a")).is_some(), "nothing recorded is nothing to match");
    }

    #[test]
    fn a_mounted_token_that_only_token_request_rules_name_is_refused_with_its_own_code() {
        use super::rules::{K8sIdentity, K8sRule};
        let e = EnvironmentId::from_random(crate::state::random());
        let iss = "https://cluster.example";
        let strict = JoinRule {
            spec: RuleSpec::K8s(K8sRule::new(iss, "airlock/appliance").unwrap().requiring_token_request(true)),
            ..rule(e, "arn:aws:iam::123456789012:role/x")
        };
        let id = PlatformIdentity::K8s(K8sIdentity {
            issuer: iss.into(),
            namespace: "airlock".into(),
            service_account: "appliance".into(),
            pod: Some("p-0".into()),
        });
        let refused =
            decide(vec![strict.clone()], id.clone(), ProofForm::MountedToken, None, tenant(ALPHA)).unwrap_err();
        assert!(matches!(&refused, PlatformRefusal::RuleRequiresTokenRequest(_, x) if *x == e));
        assert_eq!(refused.code(), "rule_requires_token_request");
        assert_ne!(refused.code(), super::tokens::TokenRefusal::MountedNotAccepted.code(), "told apart from the flag");
        assert!(refused.reason().contains("--k8s-token-request") && refused.reason().contains(&e.to_string()));
        assert_eq!(refused.identity(), Some(&id), "the audit names who was refused");
        // Named or not, the same.
        let named = decide(vec![strict.clone()], id.clone(), ProofForm::MountedToken, None, env(e)).unwrap_err();
        assert_eq!(named.code(), "rule_requires_token_request");
        let joined = decide(vec![strict.clone()], id, ProofForm::ChallengeBound, None, tenant(ALPHA)).unwrap();
        assert_eq!((joined.environment, joined.rule), (e, strict.id));
    }
}
