//! Customer grants and the decision whether an operation may run.
//!
//! A grant is the customer's signature (a DSSE envelope) over: this appliance, this phase,
//! this exact request (its digest), a validity window and a nonce. [`evaluate`] is the single,
//! pure decision the appliance makes before running anything: it takes everything as
//! arguments, including `now` and the record of used nonces, and returns a [`Permit`] (which
//! only it can build) or the reason for refusal.
//!
//! Order of checks, so the strongest rule always wins: built-in denies, then the customer's
//! deny rules, then the phase switch, then Observe (allowed), then a standing window, then
//! the grant.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::customer_key::CustomerPublicKey;
use crate::dsse::{DsseError, Envelope};
use crate::policy::{Phase, VerifiedPolicy, Weekday};
use crate::{ApplianceId, Timestamp};

pub const GRANT_PAYLOAD_TYPE: &str = "application/vnd.airlock.grant.v1+json";

/// Operation kinds no policy can allow.
pub const BUILTIN_DENIED_KINDS: &[(&str, &str)] = &[
    ("read-secret-value", "builtin:no-secret-values"),
    ("send-secret-value", "builtin:no-secret-values"),
    ("disable-audit", "builtin:audit-always-on"),
    ("truncate-audit", "builtin:audit-always-on"),
    ("replace-customer-key", "builtin:pinned-customer-key"),
];

/// What the vendor asks the appliance to do, as the customer sees and signs it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperationRequest {
    pub id: String,
    pub appliance: ApplianceId,
    /// The template the command was rendered from.
    pub kind: String,
    pub phase: Phase,
    pub args: BTreeMap<String, String>,
    /// SHA-256 (hex) of the exact rendered command.
    pub command_sha256: String,
}

impl OperationRequest {
    /// SHA-256 of the canonical JSON of the request: what a grant binds to.
    pub fn digest_hex(&self) -> String {
        // Plain data with string keys and a BTreeMap: serialization cannot fail and is stable.
        let json = serde_json::to_vec(self).unwrap_or_default();
        data_encoding::HEXLOWER.encode(&Sha256::digest(&json))
    }
}

/// The signed content of a grant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantBody {
    pub appliance: ApplianceId,
    pub phase: Phase,
    pub request_digest: String,
    pub not_before: Timestamp,
    pub not_after: Timestamp,
    pub nonce: String,
}

/// A grant whose signatures verified against the pinned keys. Only [`verify_grant`] builds one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedGrant {
    body: GrantBody,
    signed_by: Vec<String>,
}

impl VerifiedGrant {
    pub fn body(&self) -> &GrantBody {
        &self.body
    }

    pub fn signed_by(&self) -> &[String] {
        &self.signed_by
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    #[error("grant signature: {0}")]
    Signature(#[from] DsseError),
    #[error("grant is malformed: {0}")]
    Malformed(String),
}

/// Checks a grant's signatures: `threshold` distinct pinned keys (the policy's approvers).
pub fn verify_grant(
    envelope_json: &[u8],
    pinned: &[CustomerPublicKey],
    threshold: usize,
) -> Result<VerifiedGrant, GrantError> {
    let verified = Envelope::from_json(envelope_json)?.verify(GRANT_PAYLOAD_TYPE, pinned, threshold)?;
    let body: GrantBody =
        serde_json::from_slice(&verified.payload).map_err(|e| GrantError::Malformed(e.to_string()))?;
    Ok(VerifiedGrant { body, signed_by: verified.signed_by })
}

/// Proof that [`evaluate`] allowed an operation; the executor demands one.
#[derive(Debug, PartialEq, Eq)]
pub struct Permit {
    request_id: String,
    phase: Phase,
    /// The grant's nonce, which the caller must record as used before running.
    nonce: Option<String>,
    basis: Basis,
}

/// Why an operation was allowed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Basis {
    ObservePhase,
    StandingWindow,
    Grant { signed_by: Vec<String> },
}

impl Permit {
    pub fn request_id(&self) -> &str {
        &self.request_id
    }
    pub fn phase(&self) -> Phase {
        self.phase
    }
    pub fn nonce(&self) -> Option<&str> {
        self.nonce.as_deref()
    }
    pub fn basis(&self) -> &Basis {
        &self.basis
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DenyReason {
    /// A built-in deny no policy can lift.
    BuiltIn {
        rule: &'static str,
    },
    /// One of the customer's deny rules.
    DeniedByRule {
        rule: String,
    },
    /// No customer policy is in force: only Observe is allowed.
    NoPolicy,
    PhaseDisabled {
        phase: Phase,
    },
    NoMatchingGrant,
    GrantForAnotherAppliance,
    GrantForAnotherRequest,
    GrantForAnotherPhase {
        granted: Phase,
    },
    GrantNotYetValid {
        not_before: Timestamp,
    },
    GrantExpired {
        expired_at: Timestamp,
    },
    GrantTooLong {
        max_hours: u32,
    },
    NonceReplayed,
}

impl std::fmt::Display for DenyReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DenyReason::BuiltIn { rule } => write!(f, "denied by built-in rule {rule}"),
            DenyReason::DeniedByRule { rule } => write!(f, "denied by customer rule `{rule}`"),
            DenyReason::NoPolicy => f.write_str("no customer policy is in force; only Observe is allowed"),
            DenyReason::PhaseDisabled { phase } => write!(f, "the customer has not enabled the {phase:?} phase"),
            DenyReason::NoMatchingGrant => f.write_str("no customer grant covers this request"),
            DenyReason::GrantForAnotherAppliance => f.write_str("the grant is for another appliance"),
            DenyReason::GrantForAnotherRequest => f.write_str("the grant is for another request"),
            DenyReason::GrantForAnotherPhase { granted } => write!(f, "the grant is for the {granted:?} phase"),
            DenyReason::GrantNotYetValid { not_before } => write!(f, "the grant is not valid before {not_before}"),
            DenyReason::GrantExpired { expired_at } => write!(f, "the grant expired at {expired_at}"),
            DenyReason::GrantTooLong { max_hours } => {
                write!(f, "the grant's window exceeds the policy's maximum of {max_hours} hours")
            }
            DenyReason::NonceReplayed => f.write_str("the grant's nonce was already used"),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    Allow(Permit),
    Deny(DenyReason),
}

/// Decides whether `req` may run on `appliance` now. `nonce_used` answers from the appliance's
/// durable record of spent nonces.
#[must_use]
pub fn evaluate(
    policy: Option<&VerifiedPolicy>,
    appliance: ApplianceId,
    req: &OperationRequest,
    grant: Option<&VerifiedGrant>,
    nonce_used: &dyn Fn(&str) -> bool,
    now: Timestamp,
) -> Decision {
    use Decision::Deny;
    if let Some((_, rule)) = BUILTIN_DENIED_KINDS.iter().find(|(kind, _)| *kind == req.kind) {
        return Deny(DenyReason::BuiltIn { rule });
    }
    let Some(policy) = policy else {
        return if req.phase == Phase::Observe {
            allow(req, None, Basis::ObservePhase)
        } else {
            Deny(DenyReason::NoPolicy)
        };
    };
    let doc = policy.document();
    if let Some(rule) = doc
        .deny
        .iter()
        .find(|r| (r.kind == "*" || r.kind == req.kind) && r.args.iter().all(|(k, v)| req.args.get(k) == Some(v)))
    {
        return Deny(DenyReason::DeniedByRule { rule: rule.id.clone() });
    }
    if !doc.phases.contains(&req.phase) {
        return Deny(DenyReason::PhaseDisabled { phase: req.phase });
    }
    if matches!(req.phase, Phase::Observe) {
        return allow(req, None, Basis::ObservePhase);
    }
    if doc.windows.iter().any(|w| w.phase == req.phase && window_contains(w, now)) {
        return allow(req, None, Basis::StandingWindow);
    }
    let Some(grant) = grant else { return Deny(DenyReason::NoMatchingGrant) };
    let g = &grant.body;
    if g.appliance != appliance || req.appliance != appliance {
        return Deny(DenyReason::GrantForAnotherAppliance);
    }
    if g.request_digest != req.digest_hex() {
        return Deny(DenyReason::GrantForAnotherRequest);
    }
    if g.phase != req.phase {
        return Deny(DenyReason::GrantForAnotherPhase { granted: g.phase });
    }
    let max = std::time::Duration::from_secs(u64::from(doc.max_grant_hours) * 3600);
    if g.not_after <= g.not_before || g.not_after.since(g.not_before) > max {
        return Deny(DenyReason::GrantTooLong { max_hours: doc.max_grant_hours });
    }
    if now < g.not_before {
        return Deny(DenyReason::GrantNotYetValid { not_before: g.not_before });
    }
    if now >= g.not_after {
        return Deny(DenyReason::GrantExpired { expired_at: g.not_after });
    }
    if nonce_used(&g.nonce) {
        return Deny(DenyReason::NonceReplayed);
    }
    allow(req, Some(g.nonce.clone()), Basis::Grant { signed_by: grant.signed_by.clone() })
}

fn allow(req: &OperationRequest, nonce: Option<String>, basis: Basis) -> Decision {
    Decision::Allow(Permit { request_id: req.id.clone(), phase: req.phase, nonce, basis })
}

fn window_contains(w: &crate::policy::Window, now: Timestamp) -> bool {
    let t = now.to_offset_date_time();
    let day = match t.weekday() {
        time::Weekday::Monday => Weekday::Mon,
        time::Weekday::Tuesday => Weekday::Tue,
        time::Weekday::Wednesday => Weekday::Wed,
        time::Weekday::Thursday => Weekday::Thu,
        time::Weekday::Friday => Weekday::Fri,
        time::Weekday::Saturday => Weekday::Sat,
        time::Weekday::Sunday => Weekday::Sun,
    };
    let minute = u16::from(t.hour()) * 60 + u16::from(t.minute());
    let hhmm = |s: &str| -> Option<u16> {
        let (h, m) = s.split_once(':')?;
        Some(h.parse::<u16>().ok()? * 60 + m.parse::<u16>().ok()?)
    };
    match (hhmm(&w.start), hhmm(&w.end)) {
        (Some(start), Some(end)) => w.days.contains(&day) && start <= minute && minute < end,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::customer_key::CustomerSigningKey;
    use crate::policy::{POLICY_PAYLOAD_TYPE, verify_signed_policy};

    // 2026-11-24 is a Tuesday.
    const TUESDAY_NOON: i64 = 1_795_521_600_000;
    const HOUR: std::time::Duration = std::time::Duration::from_secs(3600);

    fn key() -> CustomerSigningKey {
        CustomerSigningKey::from_seed([1; 32])
    }

    fn policy(phases: &str, extra: &str) -> VerifiedPolicy {
        let text = format!("version = 1\nserial = 1\nphases = [{phases}]\n{extra}");
        let env = Envelope::new(POLICY_PAYLOAD_TYPE, text.into_bytes()).sign(&key());
        verify_signed_policy(env.to_json().as_bytes(), &[key().public()], None).unwrap()
    }

    fn apl() -> ApplianceId {
        ApplianceId::from_random([9; 16])
    }

    fn request(kind: &str, phase: Phase) -> OperationRequest {
        OperationRequest {
            id: "op_1".into(),
            appliance: apl(),
            kind: kind.into(),
            phase,
            args: [("action".to_owned(), "restart".to_owned())].into(),
            command_sha256: "ab".repeat(32),
        }
    }

    fn grant_for(req: &OperationRequest, edit: impl FnOnce(&mut GrantBody)) -> VerifiedGrant {
        let now = Timestamp::from_unix_millis(TUESDAY_NOON);
        let mut body = GrantBody {
            appliance: apl(),
            phase: req.phase,
            request_digest: req.digest_hex(),
            not_before: Timestamp::from_unix_millis(TUESDAY_NOON - 60_000),
            not_after: now.saturating_add(HOUR),
            nonce: "n-1".into(),
        };
        edit(&mut body);
        let env = Envelope::new(GRANT_PAYLOAD_TYPE, serde_json::to_vec(&body).unwrap()).sign(&key());
        verify_grant(env.to_json().as_bytes(), &[key().public()], 1).unwrap()
    }

    /// Runs one decision and renders it compactly, so each case reads as one line.
    fn check(
        policy: Option<&VerifiedPolicy>,
        req: &OperationRequest,
        grant: Option<&VerifiedGrant>,
        used: bool,
    ) -> String {
        let now = Timestamp::from_unix_millis(TUESDAY_NOON);
        match evaluate(policy, apl(), req, grant, &|_| used, now) {
            Decision::Allow(p) => format!("allow {:?}", p.basis()).split(" {").next().unwrap_or_default().to_owned(),
            Decision::Deny(r) => format!("deny: {r}"),
        }
    }

    #[test]
    fn phase_grant_deny_matrix() {
        let all = policy("\"observe\", \"deploy\", \"operate\"", "");
        let observe_only = policy("\"observe\"", "");
        let deny = policy(
            "\"observe\", \"deploy\", \"operate\"",
            "[[deny]]\nid = \"no-restart\"\nkind = \"*\"\nargs = { action = \"restart\" }\n",
        );
        for phase in [Phase::Observe, Phase::Deploy, Phase::Operate] {
            let req = request("svc", phase);
            let grant = grant_for(&req, |_| {});
            let elevated = phase != Phase::Observe;
            let expect_no_grant =
                if elevated { "deny: no customer grant covers this request" } else { "allow ObservePhase" };
            let expect_grant = if elevated { "allow Grant" } else { "allow ObservePhase" };
            assert_eq!(check(Some(&all), &req, None, false), expect_no_grant, "{phase:?} without grant");
            assert_eq!(check(Some(&all), &req, Some(&grant), false), expect_grant, "{phase:?} with grant");
            // Explicit deny beats everything, grants included.
            assert_eq!(check(Some(&deny), &req, Some(&grant), false), "deny: denied by customer rule `no-restart`");
            if elevated {
                let disabled = format!("deny: the customer has not enabled the {phase:?} phase");
                assert_eq!(check(Some(&observe_only), &req, Some(&grant), false), disabled);
                assert_eq!(
                    check(None, &req, Some(&grant), false),
                    "deny: no customer policy is in force; only Observe is allowed"
                );
                assert_eq!(check(Some(&all), &req, Some(&grant), true), "deny: the grant's nonce was already used");
            }
        }
    }

    #[test]
    fn grant_must_match_appliance_request_phase_and_window() {
        let all = policy("\"observe\", \"deploy\", \"operate\"", "");
        let req = request("svc", Phase::Operate);
        let other_apl = grant_for(&req, |g| g.appliance = ApplianceId::from_random([8; 16]));
        assert_eq!(check(Some(&all), &req, Some(&other_apl), false), "deny: the grant is for another appliance");
        let mut changed = req.clone();
        changed.args.insert("action".into(), "stop".into());
        assert_eq!(
            check(Some(&all), &changed, Some(&grant_for(&req, |_| {})), false),
            "deny: the grant is for another request"
        );
        let mut as_deploy = req.clone();
        as_deploy.phase = Phase::Deploy;
        let deploy_grant = grant_for(&as_deploy, |g| g.request_digest = req.digest_hex());
        assert!(check(Some(&all), &req, Some(&deploy_grant), false).contains("for the Deploy phase"));
        let expired = grant_for(&req, |g| {
            g.not_before = Timestamp::from_unix_millis(TUESDAY_NOON - 7_200_000);
            g.not_after = Timestamp::from_unix_millis(TUESDAY_NOON - 1);
        });
        assert!(check(Some(&all), &req, Some(&expired), false).starts_with("deny: the grant expired"));
        let future = grant_for(&req, |g| {
            g.not_before = Timestamp::from_unix_millis(TUESDAY_NOON + 60_000);
            g.not_after = Timestamp::from_unix_millis(TUESDAY_NOON + 120_000);
        });
        assert!(check(Some(&all), &req, Some(&future), false).starts_with("deny: the grant is not valid before"));
        let too_long =
            grant_for(&req, |g| g.not_after = Timestamp::from_unix_millis(TUESDAY_NOON).saturating_add(HOUR * 5));
        assert_eq!(
            check(Some(&all), &req, Some(&too_long), false),
            "deny: the grant's window exceeds the policy's maximum of 4 hours"
        );
    }

    #[test]
    fn standing_window_allows_only_its_phase_and_hours() {
        let windowed = policy(
            "\"observe\", \"deploy\", \"operate\"",
            "[[windows]]\nphase = \"deploy\"\ndays = [\"tue\"]\nstart = \"11:00\"\nend = \"13:00\"\n",
        );
        assert_eq!(check(Some(&windowed), &request("svc", Phase::Deploy), None, false), "allow StandingWindow");
        assert_eq!(
            check(Some(&windowed), &request("svc", Phase::Operate), None, false),
            "deny: no customer grant covers this request"
        );
        let later = policy(
            "\"observe\", \"deploy\"",
            "[[windows]]\nphase = \"deploy\"\ndays = [\"tue\"]\nstart = \"13:00\"\nend = \"14:00\"\n",
        );
        assert_eq!(
            check(Some(&later), &request("svc", Phase::Deploy), None, false),
            "deny: no customer grant covers this request"
        );
    }

    #[test]
    fn builtin_denies_cannot_be_lifted() {
        let all = policy("\"observe\", \"deploy\", \"operate\"", "");
        for (kind, rule) in BUILTIN_DENIED_KINDS {
            let req = request(kind, Phase::Operate);
            let grant = grant_for(&req, |_| {});
            assert_eq!(check(Some(&all), &req, Some(&grant), false), format!("deny: denied by built-in rule {rule}"));
            assert_eq!(
                check(None, &request(kind, Phase::Observe), None, false),
                format!("deny: denied by built-in rule {rule}")
            );
        }
    }

    #[test]
    fn forged_grant_is_refused_at_verification() {
        let req = request("svc", Phase::Operate);
        let body = serde_json::to_vec(&grant_for(&req, |_| {}).body).unwrap();
        let forged = Envelope::new(GRANT_PAYLOAD_TYPE, body).sign(&CustomerSigningKey::from_seed([2; 32]));
        assert!(verify_grant(forged.to_json().as_bytes(), &[key().public()], 1).is_err());
        let garbage = Envelope::new(GRANT_PAYLOAD_TYPE, b"{}".to_vec()).sign(&key());
        assert!(matches!(
            verify_grant(garbage.to_json().as_bytes(), &[key().public()], 1),
            Err(GrantError::Malformed(_))
        ));
    }
}
