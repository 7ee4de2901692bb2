//! Join rules: which platform identity joins which environment, and the one matching decision.
//!
//! A rule belongs to one environment. An identity is matched against the rules of its method
//! of the tenant its join pins (the store narrows AWS rules by account, GCP rules by project and
//! Kubernetes rules by issuer, `super::decide` to the tenant); it joins only if the rules it matches name exactly one
//! environment ([`match_identity`], the one decision for every method). No match and several environments are both
//! refusals: an identity that two environments both accept must not be placed in
//! either by the order of a query. Rules of different tenants may name the same account, project or issuer: none
//! is a secret, and no tenant's rule is read for another tenant's join.

use airlock_core::id::JoinRuleId;
use airlock_core::{EnvironmentId, TenantId};

/// Longest ARN pattern accepted; IAM ARNs are at most 2048 characters, roles far shorter.
pub const MAX_ARN_PATTERN_BYTES: usize = 512;
/// Rules one environment may hold.
pub const MAX_RULES_PER_ENVIRONMENT: usize = 50;

/// Longest Kubernetes issuer URL accepted.
pub const MAX_ISSUER_BYTES: usize = 512;

/// What a rule accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RuleSpec {
    Aws(AwsRule),
    Gcp(GcpRule),
    K8s(K8sRule),
}

impl RuleSpec {
    /// The method the rule is for, as stored (`aws`, `gcp`, `k8s`).
    pub fn method(&self) -> &'static str {
        match self {
            RuleSpec::Aws(_) => "aws",
            RuleSpec::Gcp(_) => "gcp",
            RuleSpec::K8s(_) => "k8s",
        }
    }

    /// Whether a proof of this form satisfies the rule: only a Kubernetes rule that requires
    /// the TokenRequest API refuses a mounted token.
    pub fn accepts_form(&self, form: ProofForm) -> bool {
        match self {
            RuleSpec::K8s(rule) => !(rule.require_token_request && form == ProofForm::MountedToken),
            RuleSpec::Aws(_) | RuleSpec::Gcp(_) => true,
        }
    }

    /// Whether this rule accepts `identity` (a rule of another method never does).
    pub fn matches(&self, identity: &PlatformIdentity) -> bool {
        match (self, identity) {
            (RuleSpec::Aws(rule), PlatformIdentity::Aws(id)) => rule.matches(id),
            (RuleSpec::Gcp(rule), PlatformIdentity::Gcp(id)) => {
                id.project == rule.project && id.email == rule.service_account
            }
            (RuleSpec::K8s(rule), PlatformIdentity::K8s(id)) => {
                id.issuer == rule.issuer && id.namespace == rule.namespace && id.service_account == rule.service_account
            }
            _ => false,
        }
    }
}

/// A GCP rule: the project the instance runs in and the service account it runs as, both
/// exact (an email has no wildcard: a pattern over emails would let `evil-airlock@…` in).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GcpRule {
    project: String,
    service_account: String,
}

impl GcpRule {
    pub fn new(project: &str, service_account: &str) -> Result<Self, RuleError> {
        // Project ids are 6 to 30 of [a-z0-9-]; old domain-scoped ones are `example.com:name`.
        let project_ok = (1..=100).contains(&project.len())
            && project.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.:".contains(&b));
        if !project_ok {
            return Err(RuleError::GcpProject(project.chars().take(40).collect()));
        }
        let email_ok = service_account.len() <= 254
            && service_account
                .split_once('@')
                .is_some_and(|(local, domain)| !local.is_empty() && domain.contains('.') && !domain.contains('@'))
            && service_account.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._@".contains(&b));
        if !email_ok {
            return Err(RuleError::GcpServiceAccount(service_account.chars().take(80).collect()));
        }
        Ok(Self { project: project.to_owned(), service_account: service_account.to_owned() })
    }

    pub fn project(&self) -> &str {
        &self.project
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

/// A Kubernetes rule: the cluster's service-account issuer, and a namespace and service account;
/// and whether the token must come from the TokenRequest API (its audience binding the join's
/// challenge), which closes the replay window a mounted token leaves (`super::tokens`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct K8sRule {
    issuer: String,
    namespace: String,
    service_account: String,
    require_token_request: bool,
}

impl K8sRule {
    /// `service_account` is `namespace/name`.
    pub fn new(issuer: &str, service_account: &str) -> Result<Self, RuleError> {
        let url_ok = issuer.len() <= MAX_ISSUER_BYTES
            && reqwest::Url::parse(issuer).is_ok_and(|u| {
                u.scheme() == "https"
                    && u.host_str().is_some()
                    && u.username().is_empty()
                    && u.password().is_none()
                    && u.query().is_none()
                    && u.fragment().is_none()
            });
        if !url_ok {
            return Err(RuleError::K8sIssuer(issuer.chars().take(80).collect()));
        }
        let (namespace, name) =
            service_account.split_once('/').ok_or_else(|| RuleError::K8sServiceAccount(short(service_account)))?;
        // DNS-1123: a namespace is a label, a service account name a subdomain.
        let label = |s: &str, max: usize, dots: bool| {
            (1..=max).contains(&s.len())
                && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || (dots && b == b'.'))
                && !s.starts_with(['-', '.'])
                && !s.ends_with(['-', '.'])
        };
        if !label(namespace, 63, false) || !label(name, 253, true) {
            return Err(RuleError::K8sServiceAccount(short(service_account)));
        }
        Ok(Self {
            issuer: issuer.to_owned(),
            namespace: namespace.to_owned(),
            service_account: name.to_owned(),
            require_token_request: false,
        })
    }

    /// The same rule, accepting only tokens from the TokenRequest API when `require` is set.
    #[must_use]
    pub fn requiring_token_request(self, require: bool) -> Self {
        Self { require_token_request: require, ..self }
    }

    pub fn requires_token_request(&self) -> bool {
        self.require_token_request
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

fn short(s: &str) -> String {
    s.chars().take(80).collect()
}

/// Who a platform said the appliance is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PlatformIdentity {
    Aws(AwsIdentity),
    Gcp(GcpIdentity),
    K8s(K8sIdentity),
}

impl PlatformIdentity {
    /// What rules match, as stored and listed: an ARN, `projects/P/serviceAccounts/EMAIL`, or
    /// `ISSUER#system:serviceaccount:NS:NAME`.
    pub fn matched(&self) -> String {
        match self {
            Self::Aws(id) => id.arn.clone(),
            Self::Gcp(id) => format!("projects/{}/serviceAccounts/{}", id.project, id.email),
            Self::K8s(id) => format!("{}#system:serviceaccount:{}:{}", id.issuer, id.namespace, id.service_account),
        }
    }

    /// The audit record's view.
    pub fn audit(&self) -> serde_json::Value {
        match self {
            Self::Aws(id) => serde_json::json!({ "account": id.account, "arn": id.caller_arn, "matched_arn": id.arn }),
            Self::Gcp(id) => serde_json::json!({ "project": id.project, "email": id.email, "sub": id.sub }),
            Self::K8s(id) => serde_json::json!({
                "issuer": id.issuer, "namespace": id.namespace, "service_account": id.service_account, "pod": id.pod,
            }),
        }
    }
}

/// Who a GCE identity token names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GcpIdentity {
    pub project: String,
    pub email: String,
    /// The service account's unique id.
    pub sub: String,
}

/// Who a projected service-account token names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct K8sIdentity {
    pub issuer: String,
    pub namespace: String,
    pub service_account: String,
    /// The pod the token was mounted in, when the token says.
    pub pod: Option<String>,
}

/// An AWS rule: the account, and optionally an ARN pattern the caller's (role) ARN must match.
/// Without a pattern any principal of the account matches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AwsRule {
    account: String,
    arn_pattern: Option<String>,
}

/// Why a rule cannot be stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("an AWS account id is 12 digits, got `{0}`")]
    Account(String),
    #[error(
        "`{0}` is not an ARN pattern: it looks like `arn:aws:iam::123456789012:role/airlock-*` (`*` matches any run of characters), at most 512 bytes"
    )]
    Pattern(String),
    #[error("the ARN pattern names account {pattern}, but the rule is for account {account}")]
    OtherAccount { pattern: String, account: String },
    #[error("`{0}` is not a GCP project id (lowercase letters, digits and hyphens)")]
    GcpProject(String),
    #[error(
        "`{0}` is not a service account email (e.g. `airlock@my-project.iam.gserviceaccount.com`, lowercase, no wildcard)"
    )]
    GcpServiceAccount(String),
    #[error("`{0}` is not a Kubernetes service-account issuer: an https:// URL with no query, at most 512 bytes")]
    K8sIssuer(String),
    #[error("`{0}` is not NAMESPACE/NAME of a Kubernetes service account")]
    K8sServiceAccount(String),
    #[error("a join rule is for one method: give --aws-account, --gcp-project or --k8s-issuer, with its fields")]
    Method,
}

impl AwsRule {
    pub fn new(account: &str, arn_pattern: Option<&str>) -> Result<Self, RuleError> {
        if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
            return Err(RuleError::Account(account.chars().take(40).collect()));
        }
        if let Some(p) = arn_pattern {
            let fields: Vec<&str> = p.splitn(6, ':').collect();
            let printable = p.bytes().all(|b| b.is_ascii_graphic());
            if p.len() > MAX_ARN_PATTERN_BYTES || !printable || fields.len() != 6 || fields[0] != "arn" {
                return Err(RuleError::Pattern(p.chars().take(80).collect()));
            }
            // A literal account in the pattern that is not the rule's would never match: say so now.
            if !fields[4].contains('*') && fields[4] != account {
                return Err(RuleError::OtherAccount { pattern: fields[4].to_owned(), account: account.to_owned() });
            }
        }
        Ok(Self { account: account.to_owned(), arn_pattern: arn_pattern.map(str::to_owned) })
    }

    pub fn account(&self) -> &str {
        &self.account
    }

    pub fn arn_pattern(&self) -> Option<&str> {
        self.arn_pattern.as_deref()
    }

    /// Whether `identity` (as AWS answered, its assumed-role ARN already mapped) is accepted.
    pub fn matches(&self, identity: &AwsIdentity) -> bool {
        identity.account == self.account && self.arn_pattern.as_deref().is_none_or(|p| glob_match(p, &identity.arn))
    }
}

/// Who AWS said signed the proof.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AwsIdentity {
    pub account: String,
    /// The ARN rules match: an assumed role's session ARN mapped to its role's ARN.
    pub arn: String,
    /// The ARN exactly as `GetCallerIdentity` answered it.
    pub caller_arn: String,
}

impl AwsIdentity {
    /// Maps `arn:aws:sts::ACCOUNT:assumed-role/ROLE/SESSION` to `arn:aws:iam::ACCOUNT:role/ROLE`,
    /// as Vault does, so rules name roles and not sessions (a role's path is not in the
    /// assumed-role ARN, so a rule on a role with a path matches it with `*`). Other ARNs stay.
    pub fn from_caller(account: &str, caller_arn: &str) -> Self {
        let fields: Vec<&str> = caller_arn.splitn(6, ':').collect();
        let arn = match fields.as_slice() {
            ["arn", partition, "sts", "", acct, resource] => match resource.split('/').collect::<Vec<_>>().as_slice() {
                ["assumed-role", role, _session] => format!("arn:{partition}:iam::{acct}:role/{role}"),
                _ => caller_arn.to_owned(),
            },
            _ => caller_arn.to_owned(),
        };
        Self { account: account.to_owned(), arn, caller_arn: caller_arn.to_owned() }
    }
}

/// A stored rule.
#[derive(Clone, Debug)]
pub struct JoinRule {
    pub id: JoinRuleId,
    pub tenant: TenantId,
    pub environment: EnvironmentId,
    pub spec: RuleSpec,
    pub created_at: airlock_core::Timestamp,
}

/// How a proof is bound to this attempt: by the challenge (AWS, GCP, a Kubernetes token from the
/// TokenRequest API), or only by a mounted Kubernetes token's single-use `jti` and recent `iat`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProofForm {
    ChallengeBound,
    MountedToken,
}

/// The one environment an identity joins, or why none.
#[derive(Debug, PartialEq, Eq)]
pub enum RuleMatch {
    /// Every rule naming the identity is of this environment; `rule` is the first of them that
    /// accepts the proof's form.
    One {
        tenant: TenantId,
        environment: EnvironmentId,
        rule: JoinRuleId,
    },
    NoRule,
    /// Rules of several environments match: refused rather than placed in one at random.
    SeveralEnvironments(Vec<EnvironmentId>),
    /// The rules naming the identity are all of this environment, and each requires a token from
    /// the TokenRequest API: a mounted token is refused.
    TokenRequestRequired(EnvironmentId),
}

/// Decides which environment `identity` joins, from the candidate `rules`, for a proof of `form`.
/// The environment is decided by the identity alone, so that the form of a proof can never move
/// an appliance to another environment; then one of that environment's rules must accept the form.
pub fn match_identity(rules: &[JoinRule], identity: &PlatformIdentity, form: ProofForm) -> RuleMatch {
    let matching: Vec<&JoinRule> = rules.iter().filter(|r| r.spec.matches(identity)).collect();
    let Some(first) = matching.first() else { return RuleMatch::NoRule };
    let mut envs: Vec<EnvironmentId> = matching.iter().map(|r| r.environment).collect();
    envs.sort();
    envs.dedup();
    if envs.len() > 1 {
        return RuleMatch::SeveralEnvironments(envs);
    }
    match matching.iter().find(|r| r.spec.accepts_form(form)) {
        Some(rule) => RuleMatch::One { tenant: rule.tenant, environment: rule.environment, rule: rule.id },
        None => RuleMatch::TokenRequestRequired(first.environment),
    }
}

/// Whether all of `text` matches `pattern`, where `*` matches any run of characters (also
/// `/` and `:`) and every other character itself. Linear backtracking on the last `*`, so a
/// pattern of many stars costs at most |pattern| × |text|.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(env: EnvironmentId, account: &str, pattern: Option<&str>) -> JoinRule {
        JoinRule {
            id: JoinRuleId::from_random(rand()),
            tenant: TenantId::from_random([1; 16]),
            environment: env,
            spec: RuleSpec::Aws(AwsRule::new(account, pattern).unwrap()),
            created_at: airlock_core::Timestamp::from_unix_millis(0),
        }
    }

    fn rand() -> [u8; 16] {
        crate::state::random()
    }

    #[test]
    fn globs_match_whole_values() {
        assert!(glob_match("arn:aws:iam::1:role/airlock-*", "arn:aws:iam::1:role/airlock-prod"));
        assert!(glob_match("arn:aws:iam::1:role/airlock-*", "arn:aws:iam::1:role/airlock-"));
        assert!(!glob_match("arn:aws:iam::1:role/airlock-*", "arn:aws:iam::1:role/other"));
        assert!(!glob_match("arn:aws:iam::1:role/airlock", "arn:aws:iam::1:role/airlock-prod"));
        assert!(glob_match("*", ""));
        assert!(glob_match("a*b*c", "axxbyyc"));
        assert!(!glob_match("a*b*c", "axxbyy"));
        let many = "*a".repeat(200);
        assert!(!glob_match(&many, &"a".repeat(150)), "linear, not exponential");
    }

    #[test]
    fn assumed_role_sessions_are_matched_as_their_role() {
        let id = AwsIdentity::from_caller("123456789012", "arn:aws:sts::123456789012:assumed-role/airlock-prod/i-0abc");
        assert_eq!(id.arn, "arn:aws:iam::123456789012:role/airlock-prod");
        let user = AwsIdentity::from_caller("123456789012", "arn:aws:iam::123456789012:user/alice");
        assert_eq!(user.arn, "arn:aws:iam::123456789012:user/alice");
        let odd = AwsIdentity::from_caller("123456789012", "arn:aws:sts::123456789012:federated-user/bob");
        assert_eq!(odd.arn, odd.caller_arn);
    }

    fn match_aws(rules: &[JoinRule], id: &AwsIdentity) -> RuleMatch {
        match_identity(rules, &PlatformIdentity::Aws(id.clone()), ProofForm::ChallengeBound)
    }

    fn with_spec(env: EnvironmentId, spec: RuleSpec) -> JoinRule {
        JoinRule { spec, ..rule(env, "123456789012", None) }
    }

    #[test]
    fn gcp_and_k8s_identities_match_their_exact_rules_only() {
        let (a, b) = (EnvironmentId::from_random(rand()), EnvironmentId::from_random(rand()));
        let sa = "airlock@prod-1.iam.gserviceaccount.com";
        let gcp = PlatformIdentity::Gcp(GcpIdentity { project: "prod-1".into(), email: sa.into(), sub: "1".into() });
        let rules = vec![
            with_spec(a, RuleSpec::Gcp(GcpRule::new("prod-1", sa).unwrap())),
            with_spec(b, RuleSpec::Gcp(GcpRule::new("prod-2", sa).unwrap())),
            rule(b, "123456789012", None),
        ];
        assert!(
            matches!(match_identity(&rules, &gcp, ProofForm::ChallengeBound), RuleMatch::One { environment, .. } if environment == a)
        );
        let other = PlatformIdentity::Gcp(GcpIdentity {
            project: "prod-1".into(),
            email: "other@prod-1.iam.gserviceaccount.com".into(),
            sub: "2".into(),
        });
        assert_eq!(match_identity(&rules, &other, ProofForm::ChallengeBound), RuleMatch::NoRule);
        let iss = "https://oidc.eks.eu-west-1.amazonaws.com/id/ABC";
        let k8s = |ns: &str, name: &str, issuer: &str| {
            PlatformIdentity::K8s(K8sIdentity {
                issuer: issuer.into(),
                namespace: ns.into(),
                service_account: name.into(),
                pod: None,
            })
        };
        let rules = vec![with_spec(a, RuleSpec::K8s(K8sRule::new(iss, "airlock/appliance").unwrap()))];
        assert!(matches!(
            match_identity(&rules, &k8s("airlock", "appliance", iss), ProofForm::MountedToken),
            RuleMatch::One { .. }
        ));
        assert_eq!(
            match_identity(&rules, &k8s("default", "appliance", iss), ProofForm::MountedToken),
            RuleMatch::NoRule
        );
        assert_eq!(match_identity(&rules, &k8s("airlock", "other", iss), ProofForm::MountedToken), RuleMatch::NoRule);
        assert_eq!(
            match_identity(&rules, &k8s("airlock", "appliance", "https://other.example"), ProofForm::MountedToken),
            RuleMatch::NoRule
        );
    }

    #[test]
    fn gcp_and_k8s_rules_are_checked_when_made() {
        assert!(GcpRule::new("prod-1", "airlock-*@prod-1.iam.gserviceaccount.com").is_err(), "no wildcard");
        assert!(GcpRule::new("Prod", "a@b.c").is_err());
        assert!(GcpRule::new("prod-1", "not-an-email").is_err());
        assert!(K8sRule::new("http://cluster.example", "ns/sa").is_err(), "https only");
        assert!(K8sRule::new("https://cluster.example", "ns").is_err());
        assert!(K8sRule::new("https://cluster.example", "Ns/sa").is_err());
        assert!(K8sRule::new("https://cluster.example", "ns/-sa").is_err());
        assert!(K8sRule::new("https://cluster.example?x=1", "ns/sa").is_err());
        assert!(K8sRule::new("https://cluster.example", "ns/sa.v1").is_ok());
    }

    #[test]
    fn a_rule_that_requires_the_token_request_api_refuses_a_mounted_token_without_moving_it_elsewhere() {
        let (a, b) = (EnvironmentId::from_random(rand()), EnvironmentId::from_random(rand()));
        let iss = "https://cluster.example";
        let id = PlatformIdentity::K8s(K8sIdentity {
            issuer: iss.into(),
            namespace: "airlock".into(),
            service_account: "appliance".into(),
            pod: None,
        });
        let strict = K8sRule::new(iss, "airlock/appliance").unwrap().requiring_token_request(true);
        let lax = K8sRule::new(iss, "airlock/appliance").unwrap();
        assert!(strict.requires_token_request() && !lax.requires_token_request());
        let only_strict = vec![with_spec(a, RuleSpec::K8s(strict.clone()))];
        assert!(matches!(
            match_identity(&only_strict, &id, ProofForm::ChallengeBound),
            RuleMatch::One { environment, .. } if environment == a
        ));
        assert_eq!(match_identity(&only_strict, &id, ProofForm::MountedToken), RuleMatch::TokenRequestRequired(a));
        // Another rule of the same environment that does not require it accepts the mounted token, and is the rule named.
        let both = vec![with_spec(a, RuleSpec::K8s(strict.clone())), with_spec(a, RuleSpec::K8s(lax.clone()))];
        assert!(matches!(
            match_identity(&both, &id, ProofForm::MountedToken),
            RuleMatch::One { rule, .. } if rule == both[1].id
        ));
        // A lax rule in another environment does not take the mounted token away from the strict one: ambiguous.
        let split = vec![with_spec(a, RuleSpec::K8s(strict)), with_spec(b, RuleSpec::K8s(lax))];
        assert!(matches!(
            match_identity(&split, &id, ProofForm::MountedToken),
            RuleMatch::SeveralEnvironments(envs) if envs.len() == 2
        ));
        // Other methods' rules never ask for it.
        assert!(RuleSpec::Aws(AwsRule::new("123456789012", None).unwrap()).accepts_form(ProofForm::MountedToken));
    }

    #[test]
    fn an_identity_joins_only_the_one_environment_its_rules_name() {
        let (a, b) = (EnvironmentId::from_random(rand()), EnvironmentId::from_random(rand()));
        let id = AwsIdentity::from_caller("123456789012", "arn:aws:sts::123456789012:assumed-role/airlock-prod/s");
        let role = Some("arn:aws:iam::123456789012:role/airlock-*");
        let rules = vec![rule(a, "123456789012", role), rule(b, "123456789012", Some("arn:aws:iam::*:role/other"))];
        assert!(matches!(match_aws(&rules, &id), RuleMatch::One { environment, .. } if environment == a));
        let two = vec![rule(a, "123456789012", role), rule(b, "123456789012", None)];
        assert!(matches!(match_aws(&two, &id), RuleMatch::SeveralEnvironments(envs) if envs.len() == 2));
        let same_env_twice = vec![rule(a, "123456789012", role), rule(a, "123456789012", None)];
        assert!(matches!(match_aws(&same_env_twice, &id), RuleMatch::One { .. }));
        assert_eq!(match_aws(&[rule(a, "111111111111", None)], &id), RuleMatch::NoRule);
        assert_eq!(
            match_aws(&[rule(a, "123456789012", Some("arn:aws:iam::123456789012:role/x"))], &id),
            RuleMatch::NoRule
        );
    }

    #[test]
    fn rules_are_checked_when_made() {
        assert!(matches!(AwsRule::new("12345", None), Err(RuleError::Account(_))));
        assert!(matches!(AwsRule::new("123456789012", Some("role/x")), Err(RuleError::Pattern(_))));
        assert!(matches!(
            AwsRule::new("123456789012", Some("arn:aws:iam::999999999999:role/x")),
            Err(RuleError::OtherAccount { .. })
        ));
        assert!(AwsRule::new("123456789012", Some("arn:aws:iam::*:role/x")).is_ok());
        assert!(
            AwsRule::new("123456789012", Some(&format!("arn:aws:iam::123456789012:role/{}", "x".repeat(600)))).is_err()
        );
    }
}
