//! The customer's policy: what the vendor may do on the appliance, signed by the customer.
//!
//! The customer writes it as TOML and signs it (`airlock customer policy sign`), which wraps the
//! exact TOML bytes in a DSSE envelope. The appliance accepts a policy only through
//! [`verify_signed_policy`], against the customer keys it pinned at install: the vendor can relay
//! a policy but never make one. [`VerifiedPolicy`] can only be built there.
//!
//! This module defines the document and its verification. Evaluating operations against it
//! (grants, windows, deny rules) builds on [`VerifiedPolicy`].

use std::collections::BTreeSet;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::customer_key::CustomerPublicKey;
use crate::dsse::{DsseError, Envelope};

pub const POLICY_PAYLOAD_TYPE: &str = "application/vnd.airlock.policy.v1+toml";
/// Longest elevation a policy may allow (the issue's default maximum is 4 hours).
pub const DEFAULT_MAX_GRANT_HOURS: u32 = 4;
/// Largest policy text parsed. Its deny rules compile patterns while it parses, so the text's
/// size bounds that work; each pattern is bounded on its own by [`crate::pattern`].
pub const MAX_POLICY_BYTES: usize = 64 * 1024;
/// Most deny rules, and most standing windows, one policy may hold.
pub const MAX_DENY_RULES: usize = 256;
pub const MAX_WINDOWS: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, serde::Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Install,
    Observe,
    Deploy,
    Operate,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Weekday {
    Mon,
    Tue,
    Wed,
    Thu,
    Fri,
    Sat,
    Sun,
}

/// The policy as the customer writes it. Unknown keys are refused: a typo in a security
/// setting must not silently fall back to a default.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyDocument {
    /// Format version; must be 1.
    pub version: u32,
    /// Increases with every new policy; the appliance refuses to go back to a lower one.
    pub serial: u64,
    /// The environment (`env_…`) this policy is for. The appliance refuses a policy that names
    /// another environment, and one relayed by the control plane unless it names its own: the
    /// vendor sees every policy it relays and must not be able to replay one customer
    /// environment's policy to another. A policy loaded on the appliance host may omit it.
    #[serde(default)]
    pub environment: Option<String>,
    /// Phases the vendor may use at all.
    pub phases: BTreeSet<Phase>,
    /// Distinct pinned customer keys that must sign approvals and this policy (default 1).
    #[serde(default = "one")]
    pub approvals_required: usize,
    /// Longest validity a grant may have (default 4).
    #[serde(default = "default_max_grant_hours")]
    pub max_grant_hours: u32,
    /// Standing windows in which a phase is allowed without a per-request grant.
    #[serde(default)]
    pub windows: Vec<Window>,
    /// Explicit denies; they beat every grant and window.
    #[serde(default)]
    pub deny: Vec<DenyRule>,
    /// Caps on what vendor code may use, and whether it may run as the appliance's own user.
    #[serde(default)]
    pub vendor_code: crate::run_spec::VendorCodeCaps,
    /// The vendor release-signing keys (hex SHA-256 key ids) whose releases this environment
    /// installs. Empty: any key the vendor registered for the workspace, as the control plane
    /// relays them (the customer's authority over each deploy still binds the release digest).
    #[serde(default)]
    pub release_keys: BTreeSet<String>,
    /// What of the services' running state goes up besides status, health, versions and secret
    /// existence: nothing unless the customer opts in here.
    #[serde(default)]
    pub telemetry: Telemetry,
}

/// Service logs and metrics stay on the appliance unless the customer's signed policy opts in
/// (`[telemetry]`); the vendor cannot switch them on, since only the customer signs a policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Telemetry {
    /// Whether each running service's last log bytes go up with its status (default false).
    #[serde(default)]
    pub service_logs: bool,
    /// Whether each running service's CPU, memory and process counts go up (default false).
    #[serde(default)]
    pub service_metrics: bool,
    /// How many of a service's last log bytes go up, with `service_logs`; at most
    /// [`MAX_LOG_TAIL_BYTES`] (default [`DEFAULT_LOG_TAIL_BYTES`]).
    #[serde(default = "default_log_tail_bytes")]
    pub log_tail_bytes: u32,
}

/// A service's log bytes that go up by default once the customer opts in.
pub const DEFAULT_LOG_TAIL_BYTES: u32 = 4096;
/// The most of a service's log bytes one report carries.
pub const MAX_LOG_TAIL_BYTES: u32 = 16384;

impl Default for Telemetry {
    fn default() -> Self {
        Self { service_logs: false, service_metrics: false, log_tail_bytes: DEFAULT_LOG_TAIL_BYTES }
    }
}

impl Telemetry {
    /// How many of each service's last log bytes go up: none unless `service_logs`.
    pub fn log_tail(&self) -> Option<usize> {
        self.service_logs.then_some(self.log_tail_bytes as usize)
    }

    /// Whether anything beyond status goes up.
    pub fn any(&self) -> bool {
        self.service_logs || self.service_metrics
    }
}

fn default_log_tail_bytes() -> u32 {
    DEFAULT_LOG_TAIL_BYTES
}

/// Most release keys a policy names.
pub const MAX_RELEASE_KEYS: usize = 64;

/// A standing window: a phase allowed without a per-request grant at these times.
///
/// With `templates` or `tags` it allows only what they name; without either it allows every
/// request of its phase, which `airlock customer policy sign` warns about
/// ([`PolicyDocument::warnings`]).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Window {
    pub phase: Phase,
    pub days: Vec<Weekday>,
    /// `HH:MM`, UTC.
    pub start: String,
    /// `HH:MM`, UTC, after `start`.
    pub end: String,
    /// Only these exact templates (name and content hash) run in the window; a new version of
    /// a template is not covered until the customer names it.
    #[serde(default)]
    pub templates: Vec<TemplateRef>,
    /// Only requests that declare data tags, all of them among these, run in the window.
    #[serde(default)]
    pub tags: BTreeSet<String>,
}

impl Window {
    /// Whether the window is limited to some templates or tags.
    pub fn is_limited(&self) -> bool {
        !self.templates.is_empty() || !self.tags.is_empty()
    }
}

/// One exact template: its name and the content hash `airlock template list` prints.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateRef {
    pub name: String,
    /// SHA-256 (hex) of the template's content.
    pub sha256: String,
}

/// An explicit deny. It applies to a request when every selector it has holds (`kind`, `tags`,
/// `template_sha256`), and then denies it when every value condition holds (`args`,
/// `any_value`); a rule without value conditions denies all it applies to.
///
/// A rule that names a variable the request lacks denies it (fail closed): renaming the
/// variable in a new template version must not lift the rule. `any_value` matches a value
/// whatever its variable is called.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DenyRule {
    /// Named in refusals, so the customer sees which rule denied what.
    pub id: String,
    /// Operation kind (template name) this rule matches, or `*` (also when left out).
    #[serde(default)]
    pub kind: Option<String>,
    /// Data-access tags: the rule applies to a request that declares any of them.
    #[serde(default)]
    pub tags: BTreeSet<String>,
    /// The content hash of one exact template version the rule applies to.
    #[serde(default)]
    pub template_sha256: Option<String>,
    /// Variable name → exact value that must match (all of them), if any.
    #[serde(default)]
    pub args: std::collections::BTreeMap<String, String>,
    /// A pattern the whole value of some variable, whatever its name, must match.
    #[serde(default)]
    pub any_value: Option<crate::pattern::AnchoredPattern>,
}

/// Something a policy allows that the customer may not have meant; it still signs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicyWarning {
    /// A standing window limited to no templates or tags: any request of its phase runs in it
    /// without review.
    UnlimitedWindow { index: usize, phase: Phase },
}

impl std::fmt::Display for PolicyWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PolicyWarning::UnlimitedWindow { index, phase } => write!(
                f,
                "standing window #{} allows any {phase:?} request without review; limit it with \
                 `templates = [{{ name = \"…\", sha256 = \"…\" }}]` or `tags = [\"…\"]`",
                index + 1
            ),
        }
    }
}

fn one() -> usize {
    1
}

fn default_max_grant_hours() -> u32 {
    DEFAULT_MAX_GRANT_HOURS
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("policy is not valid TOML for this format: {0}")]
    Parse(String),
    #[error("policy is invalid: {0}")]
    Invalid(String),
    #[error("the policy has {actual} {what}; at most {max} are accepted")]
    Limit { what: &'static str, actual: usize, max: usize },
    #[error("policy signature: {0}")]
    Signature(#[from] DsseError),
    #[error("policy is not signed by {required} distinct pinned customer key(s) (it names {signed})")]
    Threshold { required: usize, signed: usize },
    #[error("policy serial {offered} is older than the current policy's {current}; a policy can only move forward")]
    Rollback { offered: u64, current: u64 },
    #[error("policy serial {serial} is already in force with different content; increase the serial")]
    SerialReused { serial: u64 },
}

/// Why a policy does not govern this environment.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvironmentMismatch {
    #[error("the policy is for environment {named}; this appliance is in {here}")]
    Another { named: String, here: crate::EnvironmentId },
    #[error("a policy relayed by the control plane must name the environment it is for (environment = \"{here}\")")]
    Unnamed { here: crate::EnvironmentId },
}

impl PolicyDocument {
    /// Parses and validates, for the customer before signing and the appliance after verifying.
    pub fn parse(toml_text: &str) -> Result<Self, PolicyError> {
        if toml_text.len() > MAX_POLICY_BYTES {
            return Err(PolicyError::Limit { what: "bytes", actual: toml_text.len(), max: MAX_POLICY_BYTES });
        }
        // Counted before the typed parse, which compiles every rule's pattern.
        let table: toml::Table = toml::from_str(toml_text).map_err(|e| PolicyError::Parse(e.to_string()))?;
        let entries = |key: &str| table.get(key).and_then(toml::Value::as_array).map_or(0, Vec::len);
        if entries("deny") > MAX_DENY_RULES {
            return Err(PolicyError::Limit { what: "deny rules", actual: entries("deny"), max: MAX_DENY_RULES });
        }
        if entries("windows") > MAX_WINDOWS {
            return Err(PolicyError::Limit { what: "windows", actual: entries("windows"), max: MAX_WINDOWS });
        }
        let doc: PolicyDocument = toml::from_str(toml_text).map_err(|e| PolicyError::Parse(e.to_string()))?;
        doc.validate()?;
        Ok(doc)
    }

    fn validate(&self) -> Result<(), PolicyError> {
        let invalid = |m: String| Err(PolicyError::Invalid(m));
        if self.version != 1 {
            return invalid(format!("version {} is not supported; use version = 1", self.version));
        }
        if let Some(env) = &self.environment
            && env.parse::<crate::EnvironmentId>().is_err()
        {
            return invalid(format!("environment `{env}` is not an environment id (env_…)"));
        }
        if self.deny.len() > MAX_DENY_RULES {
            return Err(PolicyError::Limit { what: "deny rules", actual: self.deny.len(), max: MAX_DENY_RULES });
        }
        if self.windows.len() > MAX_WINDOWS {
            return Err(PolicyError::Limit { what: "windows", actual: self.windows.len(), max: MAX_WINDOWS });
        }
        if self.release_keys.len() > MAX_RELEASE_KEYS {
            return Err(PolicyError::Limit {
                what: "release keys",
                actual: self.release_keys.len(),
                max: MAX_RELEASE_KEYS,
            });
        }
        for key in &self.release_keys {
            check_sha256(key, "a release key id")?;
        }
        if !(1..=16).contains(&self.approvals_required) {
            return invalid("approvals_required must be between 1 and 16".into());
        }
        if !(1..=24 * 7).contains(&self.max_grant_hours) {
            return invalid("max_grant_hours must be between 1 and 168".into());
        }
        if !(1..=MAX_LOG_TAIL_BYTES).contains(&self.telemetry.log_tail_bytes) {
            return invalid(format!("[telemetry] log_tail_bytes must be between 1 and {MAX_LOG_TAIL_BYTES}"));
        }
        for w in &self.windows {
            let (start, end) = (parse_hhmm(&w.start)?, parse_hhmm(&w.end)?);
            if start >= end {
                return invalid(format!("window {} – {} must end after it starts", w.start, w.end));
            }
            if w.days.is_empty() {
                return invalid("a window needs at least one day".into());
            }
            if !self.phases.contains(&w.phase) {
                return invalid(format!("a window allows {:?}, which `phases` does not enable", w.phase));
            }
            for t in &w.templates {
                if t.name.is_empty() {
                    return invalid("a window's template needs a `name`".into());
                }
                check_sha256(&t.sha256, "a window's template `sha256`")?;
            }
            check_tags(&w.tags, "a window's")?;
        }
        let mut ids = BTreeSet::new();
        for d in &self.deny {
            if d.id.is_empty() {
                return invalid("a deny rule needs an `id`".into());
            }
            if d.kind.as_deref().is_some_and(str::is_empty) {
                return invalid(format!("deny rule `{}`: `kind` is empty; use `*` for any", d.id));
            }
            if d.kind.is_none()
                && d.tags.is_empty()
                && d.template_sha256.is_none()
                && d.args.is_empty()
                && d.any_value.is_none()
            {
                return invalid(format!(
                    "deny rule `{}` matches nothing in particular; give a `kind` (`*` for any), `tags`, \
                     `template_sha256`, `args` or `any_value`",
                    d.id
                ));
            }
            if let Some(sha) = &d.template_sha256 {
                check_sha256(sha, &format!("deny rule `{}`: `template_sha256`", d.id))?;
            }
            check_tags(&d.tags, &format!("deny rule `{}`:", d.id))?;
            if !ids.insert(d.id.as_str()) {
                return invalid(format!("deny rule id `{}` is used twice", d.id));
            }
        }
        Ok(())
    }

    /// What the customer should hear about before signing; none of it makes the policy invalid.
    pub fn warnings(&self) -> Vec<PolicyWarning> {
        self.windows
            .iter()
            .enumerate()
            .filter(|(_, w)| !w.is_limited())
            .map(|(index, w)| PolicyWarning::UnlimitedWindow { index, phase: w.phase })
            .collect()
    }
}

fn check_sha256(value: &str, what: &str) -> Result<(), PolicyError> {
    if value.len() != 64 || !value.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return Err(PolicyError::Invalid(format!("{what} must be 64 lowercase hex digits (a SHA-256)")));
    }
    Ok(())
}

fn check_tags(tags: &BTreeSet<String>, whose: &str) -> Result<(), PolicyError> {
    match tags.iter().find(|t| !crate::template::is_data_tag(t)) {
        Some(t) => Err(PolicyError::Invalid(format!(
            "{whose} tag {t:?} is not a data tag (1-64 of `a-z`, `0-9`, `:`, `_`, `-`)"
        ))),
        None => Ok(()),
    }
}

impl PolicyDocument {
    /// Whether this policy may govern an appliance of `environment`; `relayed` says the
    /// control plane delivered it, in which case it must name the environment.
    pub fn check_environment(
        &self,
        environment: crate::EnvironmentId,
        relayed: bool,
    ) -> Result<(), EnvironmentMismatch> {
        match &self.environment {
            Some(named) if *named != environment.to_string() => {
                Err(EnvironmentMismatch::Another { named: named.clone(), here: environment })
            }
            None if relayed => Err(EnvironmentMismatch::Unnamed { here: environment }),
            _ => Ok(()),
        }
    }
}

/// Minutes after midnight.
fn parse_hhmm(s: &str) -> Result<u16, PolicyError> {
    let bad = || PolicyError::Invalid(format!("`{s}` is not a time of day; use HH:MM (UTC)"));
    let (h, m) = s.split_once(':').ok_or_else(bad)?;
    let (h, m): (u16, u16) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if h > 24 || m > 59 || (h == 24 && m != 0) || s.len() != 5 {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

/// A policy that verified against the pinned customer keys. Only [`verify_signed_policy`]
/// builds one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedPolicy {
    doc: PolicyDocument,
    digest: [u8; 32],
    signed_by: Vec<String>,
}

impl VerifiedPolicy {
    pub fn document(&self) -> &PolicyDocument {
        &self.doc
    }

    /// SHA-256 of the exact signed TOML, hex.
    pub fn digest_hex(&self) -> String {
        data_encoding::HEXLOWER.encode(&self.digest)
    }

    pub fn signed_by(&self) -> &[String] {
        &self.signed_by
    }

    pub fn serial(&self) -> u64 {
        self.doc.serial
    }
}

/// Verifies a signed policy (DSSE envelope JSON) against pinned keys, and that it does not
/// roll back `current`. The policy states how many distinct keys must sign it.
pub fn verify_signed_policy(
    envelope_json: &[u8],
    pinned: &[CustomerPublicKey],
    current: Option<&VerifiedPolicy>,
) -> Result<VerifiedPolicy, PolicyError> {
    let envelope = Envelope::from_json(envelope_json)?;
    // One valid signature first, so nothing unsigned is even parsed as TOML...
    let verified = envelope.verify(POLICY_PAYLOAD_TYPE, pinned, 1)?;
    let text = std::str::from_utf8(&verified.payload).map_err(|_| PolicyError::Parse("not UTF-8".into()))?;
    let doc = PolicyDocument::parse(text)?;
    // ...then the threshold: the new policy's own, and never fewer than the policy in force
    // requires, so one approver cannot sign away the others.
    let required = doc.approvals_required.max(current.map_or(1, |c| c.doc.approvals_required));
    if verified.signed_by.len() < required {
        return Err(PolicyError::Threshold { required, signed: verified.signed_by.len() });
    }
    let digest: [u8; 32] = Sha256::digest(&verified.payload).into();
    if let Some(cur) = current {
        if doc.serial < cur.doc.serial {
            return Err(PolicyError::Rollback { offered: doc.serial, current: cur.doc.serial });
        }
        if doc.serial == cur.doc.serial && digest != cur.digest {
            return Err(PolicyError::SerialReused { serial: doc.serial });
        }
    }
    Ok(VerifiedPolicy { doc, digest, signed_by: verified.signed_by })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::customer_key::CustomerSigningKey;

    const POLICY: &str = r#"
version = 1
serial = 3
phases = ["observe", "deploy"]
max_grant_hours = 2

[[windows]]
phase = "deploy"
days = ["tue"]
start = "02:00"
end = "04:00"

[[deny]]
id = "no-drop-db"
kind = "db-admin"
args = { action = "drop" }
"#;

    fn key(n: u8) -> CustomerSigningKey {
        CustomerSigningKey::from_seed([n; 32])
    }

    fn signed(text: &str, keys: &[&CustomerSigningKey]) -> Vec<u8> {
        let mut env = Envelope::new(POLICY_PAYLOAD_TYPE, text.as_bytes().to_vec());
        for k in keys {
            env = env.sign(k);
        }
        env.to_json().into_bytes()
    }

    #[test]
    fn signed_policy_verifies_against_pinned_key() {
        let p = verify_signed_policy(&signed(POLICY, &[&key(1)]), &[key(1).public()], None).unwrap();
        assert_eq!(p.serial(), 3);
        assert_eq!(p.document().phases, [Phase::Observe, Phase::Deploy].into());
        assert_eq!(p.document().deny[0].id, "no-drop-db");
        assert_eq!(p.document().approvals_required, 1);
        assert_eq!(p.digest_hex().len(), 64);
    }

    #[test]
    fn a_policy_over_its_limits_is_refused_before_its_patterns_compile() {
        let rule = |i: usize| format!("[[deny]]\nid = \"r{i}\"\nany_value = \"x{i}\"\n");
        let many: String = (0..=MAX_DENY_RULES).map(rule).collect();
        let err = PolicyDocument::parse(&format!("{POLICY}\n{many}")).unwrap_err();
        assert!(matches!(err, PolicyError::Limit { what: "deny rules", .. }), "{err}");
        let padded = format!("{POLICY}\n{}", "#".repeat(MAX_POLICY_BYTES));
        assert!(matches!(PolicyDocument::parse(&padded), Err(PolicyError::Limit { what: "bytes", .. })));
        let costly = format!("{POLICY}\n[[deny]]\nid = \"costly\"\nany_value = '\\w{{100}}'\n");
        let err = PolicyDocument::parse(&costly).unwrap_err().to_string();
        assert!(err.contains("compiles past the limit"), "{err}");
    }

    #[test]
    fn policy_signed_by_another_key_is_refused() {
        let err = verify_signed_policy(&signed(POLICY, &[&key(2)]), &[key(1).public()], None).unwrap_err();
        assert!(matches!(err, PolicyError::Signature(DsseError::NotEnoughSignatures { .. })), "{err}");
    }

    #[test]
    fn unsigned_or_malformed_policy_is_refused() {
        let unsigned = Envelope::new(POLICY_PAYLOAD_TYPE, POLICY.as_bytes().to_vec()).to_json();
        assert!(verify_signed_policy(unsigned.as_bytes(), &[key(1).public()], None).is_err());
        assert!(verify_signed_policy(POLICY.as_bytes(), &[key(1).public()], None).is_err());
        let wrong_type = Envelope::new("text/plain", POLICY.as_bytes().to_vec()).sign(&key(1)).to_json();
        assert!(matches!(
            verify_signed_policy(wrong_type.as_bytes(), &[key(1).public()], None),
            Err(PolicyError::Signature(DsseError::WrongType { .. }))
        ));
    }

    #[test]
    fn policy_requiring_two_approvers_needs_two_keys() {
        let two = POLICY.replace("max_grant_hours = 2", "max_grant_hours = 2\napprovals_required = 2");
        let pinned = [key(1).public(), key(2).public()];
        assert_eq!(
            verify_signed_policy(&signed(&two, &[&key(1)]), &pinned, None),
            Err(PolicyError::Threshold { required: 2, signed: 1 })
        );
        assert!(verify_signed_policy(&signed(&two, &[&key(1), &key(2)]), &pinned, None).is_ok());
    }

    #[test]
    fn one_approver_cannot_lower_the_threshold() {
        let pinned = [key(1).public(), key(2).public()];
        let two = POLICY.replace("max_grant_hours = 2", "max_grant_hours = 2\napprovals_required = 2");
        let current = verify_signed_policy(&signed(&two, &[&key(1), &key(2)]), &pinned, None).unwrap();
        let downgrade = POLICY.replace("serial = 3", "serial = 4");
        assert_eq!(
            verify_signed_policy(&signed(&downgrade, &[&key(1)]), &pinned, Some(&current)),
            Err(PolicyError::Threshold { required: 2, signed: 1 })
        );
        assert!(verify_signed_policy(&signed(&downgrade, &[&key(1), &key(2)]), &pinned, Some(&current)).is_ok());
    }

    #[test]
    fn policy_cannot_roll_back_or_reuse_a_serial() {
        let pinned = [key(1).public()];
        let current = verify_signed_policy(&signed(POLICY, &[&key(1)]), &pinned, None).unwrap();
        let older = POLICY.replace("serial = 3", "serial = 2");
        assert_eq!(
            verify_signed_policy(&signed(&older, &[&key(1)]), &pinned, Some(&current)),
            Err(PolicyError::Rollback { offered: 2, current: 3 })
        );
        let same_serial = POLICY.replace("max_grant_hours = 2", "max_grant_hours = 3");
        assert_eq!(
            verify_signed_policy(&signed(&same_serial, &[&key(1)]), &pinned, Some(&current)),
            Err(PolicyError::SerialReused { serial: 3 })
        );
        assert!(verify_signed_policy(&signed(POLICY, &[&key(1)]), &pinned, Some(&current)).is_ok());
    }

    #[test]
    fn invalid_documents_are_refused_with_a_reason() {
        for (edit, expect) in [
            (POLICY.replace("version = 1", "version = 2"), "version"),
            (POLICY.replace("phases = [\"observe\", \"deploy\"]", "phases = [\"observe\"]"), "does not enable"),
            (POLICY.replace("end = \"04:00\"", "end = \"01:00\""), "end after"),
            (POLICY.replace("start = \"02:00\"", "start = \"2am\""), "HH:MM"),
            (POLICY.replace("max_grant_hours = 2", "max_grant_hours = 0"), "max_grant_hours"),
            (POLICY.replace("kind = \"db-admin\"", "kind = \"db-admin\"\nkidn = 1"), "unknown field"),
            (POLICY.replace("phases = [\"observe\", \"deploy\"]", "phases = [\"root\"]"), "unknown variant"),
            (POLICY.replace("kind = \"db-admin\"\nargs = { action = \"drop\" }", ""), "matches nothing"),
            (POLICY.replace("kind = \"db-admin\"", "kind = \"\""), "`kind` is empty"),
            (POLICY.replace("kind = \"db-admin\"", "template_sha256 = \"ABCD\""), "64 lowercase hex"),
            (POLICY.replace("kind = \"db-admin\"", "tags = [\"Secret:Read\"]"), "not a data tag"),
            (POLICY.replace("kind = \"db-admin\"", "any_value = \"[a-z]+)|(.*\""), "not a regular expression"),
            (POLICY.replace("end = \"04:00\"", "end = \"04:00\"\ntags = [\"a b\"]"), "not a data tag"),
            (
                POLICY.replace("end = \"04:00\"", "end = \"04:00\"\ntemplates = [{ name = \"x\", sha256 = \"12\" }]"),
                "64 lowercase hex",
            ),
            (POLICY.replace("end = \"04:00\"", "end = \"04:00\"\ntemplates = [{ name = \"x\" }]"), "missing field"),
        ] {
            let err = PolicyDocument::parse(&edit).unwrap_err().to_string();
            assert!(err.contains(expect), "expected `{expect}` in: {err}");
        }
    }

    #[test]
    fn service_logs_and_metrics_stay_home_unless_the_policy_opts_in() {
        let off = PolicyDocument::parse(POLICY).unwrap().telemetry;
        assert_eq!(off, Telemetry::default());
        assert!(!off.any() && off.log_tail().is_none());
        assert_eq!(off.log_tail_bytes, DEFAULT_LOG_TAIL_BYTES);

        let on =
            PolicyDocument::parse(&format!("{POLICY}\n[telemetry]\nservice_logs = true\nservice_metrics = true\n"))
                .unwrap()
                .telemetry;
        assert!(on.service_metrics && on.any());
        assert_eq!(on.log_tail(), Some(DEFAULT_LOG_TAIL_BYTES as usize));
        let metrics_only =
            PolicyDocument::parse(&format!("{POLICY}\n[telemetry]\nservice_metrics = true\n")).unwrap().telemetry;
        assert!(metrics_only.any() && metrics_only.log_tail().is_none());
        let most = PolicyDocument::parse(&format!(
            "{POLICY}\n[telemetry]\nservice_logs = true\nlog_tail_bytes = {MAX_LOG_TAIL_BYTES}\n"
        ))
        .unwrap()
        .telemetry;
        assert_eq!(most.log_tail(), Some(MAX_LOG_TAIL_BYTES as usize));

        for (section, expect) in [
            (format!("log_tail_bytes = {}", MAX_LOG_TAIL_BYTES + 1), "log_tail_bytes must be between"),
            ("log_tail_bytes = 0".to_owned(), "log_tail_bytes must be between"),
            ("log_tail_bytes = -1".to_owned(), "invalid value"),
            ("service_log = true".to_owned(), "unknown field"),
            ("service_logs = \"yes\"".to_owned(), "invalid type"),
        ] {
            let err = PolicyDocument::parse(&format!("{POLICY}\n[telemetry]\n{section}\n")).unwrap_err().to_string();
            assert!(err.contains(expect), "expected `{expect}` for `{section}` in: {err}");
        }
    }

    #[test]
    fn an_old_deny_rule_still_loads_and_means_the_same() {
        let p = PolicyDocument::parse(POLICY).unwrap();
        let rule = &p.deny[0];
        assert_eq!(rule.kind.as_deref(), Some("db-admin"));
        assert_eq!(rule.args, [("action".to_owned(), "drop".to_owned())].into());
        assert!(rule.tags.is_empty() && rule.template_sha256.is_none() && rule.any_value.is_none());
        assert!(p.windows[0].templates.is_empty() && p.windows[0].tags.is_empty());
    }

    #[test]
    fn new_deny_rules_and_window_limits_parse() {
        let sha = "ab".repeat(32);
        let text = format!(
            "{POLICY}\n[[deny]]\nid = \"no-billing\"\ntags = [\"billing:write\"]\nany_value = \"billing|billing-.*\"\n\
             [[deny]]\nid = \"bad-version\"\ntemplate_sha256 = \"{sha}\"\n"
        )
        .replace(
            "end = \"04:00\"",
            &format!("end = \"04:00\"\ntemplates = [{{ name = \"deploy-svc\", sha256 = \"{sha}\" }}]"),
        );
        let p = PolicyDocument::parse(&text).unwrap();
        assert!(p.deny[1].any_value.as_ref().is_some_and(|v| v.is_match("billing-eu") && !v.is_match("x-billing")));
        assert_eq!(p.deny[2].template_sha256.as_deref(), Some(sha.as_str()));
        assert_eq!(p.windows[0].templates[0].name, "deploy-svc");
        assert!(p.warnings().is_empty());
        assert_eq!(
            PolicyDocument::parse(POLICY).unwrap().warnings(),
            [PolicyWarning::UnlimitedWindow { index: 0, phase: Phase::Deploy }]
        );
    }
}
