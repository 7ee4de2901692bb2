//! Join rules: which platform identity joins which environment, and the one matching decision.
//!
//! A rule belongs to one environment. An identity is matched against every rule of its
//! method across tenants (the store narrows AWS rules by account); it joins only if the
//! rules it matches name exactly one environment. No match and several environments are both
//! refusals: an identity that two customers' environments both accept must not be placed in
//! either by the order of a query.

use airlock_core::id::JoinRuleId;
use airlock_core::{EnvironmentId, TenantId};

/// Longest ARN pattern accepted; IAM ARNs are at most 2048 characters, roles far shorter.
pub const MAX_ARN_PATTERN_BYTES: usize = 512;
/// Rules one environment may hold.
pub const MAX_RULES_PER_ENVIRONMENT: usize = 50;

/// What a rule accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RuleSpec {
    Aws(AwsRule),
}

impl RuleSpec {
    /// The method the rule is for, as stored (`aws`).
    pub fn method(&self) -> &'static str {
        match self {
            RuleSpec::Aws(_) => "aws",
        }
    }
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

/// The one environment an identity joins, or why none.
#[derive(Debug, PartialEq, Eq)]
pub enum RuleMatch {
    /// Every matching rule names this environment; `rule` is the first of them.
    One {
        tenant: TenantId,
        environment: EnvironmentId,
        rule: JoinRuleId,
    },
    NoRule,
    /// Rules of several environments match: refused rather than placed in one at random.
    SeveralEnvironments(Vec<EnvironmentId>),
}

/// Decides which environment `identity` joins, from the candidate `rules`.
pub fn match_aws(rules: &[JoinRule], identity: &AwsIdentity) -> RuleMatch {
    let matching: Vec<&JoinRule> =
        rules.iter().filter(|r| matches!(&r.spec, RuleSpec::Aws(aws) if aws.matches(identity))).collect();
    let Some(first) = matching.first() else { return RuleMatch::NoRule };
    let mut envs: Vec<EnvironmentId> = matching.iter().map(|r| r.environment).collect();
    envs.sort();
    envs.dedup();
    if envs.len() > 1 {
        return RuleMatch::SeveralEnvironments(envs);
    }
    RuleMatch::One { tenant: first.tenant, environment: first.environment, rule: first.id }
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
