//! Customer grants and the decision whether an operation may run.
//!
//! A grant is the customer's signature (a DSSE envelope) over: this appliance, this phase,
//! this exact request (its digest), a validity window and a nonce. [`evaluate`] is the single,
//! pure decision the appliance makes before running anything: it takes everything as
//! arguments, including `now` and the record of used nonces, and returns a [`Permit`] (which
//! only it can build) or the reason for refusal.
//!
//! Order of checks, so the strongest rule always wins: the request is for this appliance,
//! built-in denies, the customer's deny rules, the phase (policy and host switches), the
//! appliance's own read-only probes (allowed), a standing window, then the grant.
//!
//! Deny rules and standing windows see what a request is, not only what it is called: its
//! data tags, the content hash of the template it was rendered from, and its variables'
//! values. A rule naming a variable the request lacks denies (fail closed), so a new template
//! version that renames the variable is still denied ([`customer_deny`]).
//!
//! What the vendor labels a request is not trusted to lift anything: Observe without a grant
//! covers only the appliance's built-in probes, never a vendor template that calls itself
//! Observe; built-in denies match the declared data-access tags as well as the kind, and the
//! customer's signature covers both (they are in the request digest).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::customer_key::CustomerPublicKey;
use crate::dsse::{DsseError, Envelope};
use crate::policy::{DenyRule, Phase, PolicyDocument, VerifiedPolicy, Weekday, Window};
use crate::probe::BuiltinProbe;
use crate::run_spec::{OverCap, RunLimits, RunSpec, RunUser, resolve};
use crate::{ApplianceId, OperationId, Timestamp};

pub const GRANT_PAYLOAD_TYPE: &str = "application/vnd.airlock.grant.v1+json";

/// Data-access tags no policy can allow.
pub const BUILTIN_DENIED_TAGS: &[(&str, &str)] = &[
    ("secret:read", "builtin:no-secret-values"),
    ("secret:send", "builtin:no-secret-values"),
    ("audit:write", "builtin:audit-always-on"),
    ("customer-key:write", "builtin:pinned-customer-key"),
];

/// Longest nonce a grant may carry.
pub const MAX_NONCE_BYTES: usize = 128;

/// Operation kinds no policy can allow.
pub const BUILTIN_DENIED_KINDS: &[(&str, &str)] = &[
    ("read-secret-value", "builtin:no-secret-values"),
    ("send-secret-value", "builtin:no-secret-values"),
    ("disable-audit", "builtin:audit-always-on"),
    ("truncate-audit", "builtin:audit-always-on"),
    ("replace-customer-key", "builtin:pinned-customer-key"),
];

/// What the vendor asks the appliance to do, as the customer sees and signs it. A field it does
/// not know is refused: the digest is of what it parsed, so nothing may ride along unseen.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperationRequest {
    pub id: OperationId,
    pub appliance: ApplianceId,
    /// The template the command was rendered from.
    pub kind: String,
    pub phase: Phase,
    /// What customer data the template declares it may touch (shown to the customer).
    #[serde(default)]
    pub data_tags: std::collections::BTreeSet<String>,
    pub args: BTreeMap<String, String>,
    /// SHA-256 (hex) of the exact rendered command.
    pub command_sha256: String,
    /// The customer environment it is for, so what the customer signs names it: an approval
    /// given for one environment never runs in another, whatever ids the vendor hands out.
    /// Absent only in requests made before it was signed (and so from their digest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<crate::EnvironmentId>,
    /// The host it is for: the id ([`crate::execution_key::ExecutionPublicKey::key_id`]) of
    /// the execution key the customer attested for the appliance. Appliance ids are the
    /// vendor's to hand out, so two hosts may share one; an approval names the one host whose
    /// key it is. Absent for an appliance the customer has not attested, and in requests made
    /// before it was signed (and so from their digest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub execution_key: Option<String>,
}

impl OperationRequest {
    /// SHA-256 of the canonical JSON of the request: what a grant binds to.
    pub fn digest_hex(&self) -> String {
        sha256_json(self)
    }

    /// Whether its output must never leave the appliance ([`is_secret_output`]).
    pub fn output_is_secret(&self) -> bool {
        is_secret_output(&self.data_tags)
    }
}

/// A template carrying this data tag produces output that never leaves the customer's
/// environment: the appliance refuses to release it, whatever the customer signs.
/// Compare tags with [`is_secret_output`], never by hand.
pub const SECRET_OUTPUT_TAG: &str = "output:secret";

/// Whether a request with these data tags has output that must never leave the appliance.
/// The one predicate both sides (and the CLI) use; tags compare without regard to case, so
/// `Output:Secret` cannot slip past one side and not the other.
pub fn is_secret_output<'a>(tags: impl IntoIterator<Item = &'a String>) -> bool {
    tags.into_iter().any(|t| t.eq_ignore_ascii_case(SECRET_OUTPUT_TAG))
}

/// The customer's answer to one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApprovalDecision {
    Approve,
    Deny,
}

/// The signed content of a grant: the customer's approval (or denial) of one exact request.
///
/// `request_id` and `command_sha256` are also inside `request_digest`; they are repeated so a
/// person reading the envelope sees what was approved without recomputing anything.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantBody {
    pub request_id: OperationId,
    pub appliance: ApplianceId,
    pub phase: Phase,
    pub request_digest: String,
    /// SHA-256 (hex) of the exact rendered command the customer reviewed.
    pub command_sha256: String,
    pub decision: ApprovalDecision,
    pub decided_at: Timestamp,
    /// Who decided, as the customer names them (free text, shown in manifests).
    pub approver: String,
    pub reason: String,
    pub not_before: Timestamp,
    pub not_after: Timestamp,
    pub nonce: String,
}

impl GrantBody {
    /// SHA-256 (hex) of this body's canonical JSON, which the execution statement binds to.
    pub fn digest_hex(&self) -> String {
        sha256_json(self)
    }
}

/// SHA-256 (hex) of a value's JSON. Only for plain data (string keys, sorted maps), whose
/// serialization cannot fail and is stable.
pub(crate) fn sha256_json<T: Serialize>(value: &T) -> String {
    data_encoding::HEXLOWER.encode(&Sha256::digest(serde_json::to_vec(value).unwrap_or_default()))
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
    verify_grant_envelope(&Envelope::from_json(envelope_json)?, pinned, threshold)
}

/// [`verify_grant`] for an envelope already parsed.
pub fn verify_grant_envelope(
    envelope: &Envelope,
    pinned: &[CustomerPublicKey],
    threshold: usize,
) -> Result<VerifiedGrant, GrantError> {
    let verified = envelope.verify(GRANT_PAYLOAD_TYPE, pinned, threshold)?;
    let body: GrantBody =
        serde_json::from_slice(&verified.payload).map_err(|e| GrantError::Malformed(e.to_string()))?;
    Ok(VerifiedGrant { body, signed_by: verified.signed_by })
}

pub const PRE_APPROVAL_PAYLOAD_TYPE: &str = "application/vnd.airlock.pre-approval.v1+json";

/// What a pre-approval covers besides the command itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ApprovalLevel {
    /// Commands run without a per-request approval; each output is still released per run.
    Commands,
    /// Commands run, and their output goes to the vendor, without asking again.
    CommandsAndOutput,
}

/// The signed content of a pre-approval: routine work on one template on one appliance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreApprovalBody {
    /// Chosen by the customer when signing; the appliance counts runs and revocation by it.
    pub id: String,
    pub appliance: ApplianceId,
    pub template: String,
    /// The template's content hash: an edited template falls back to per-request approval.
    pub template_sha256: String,
    pub phase: Phase,
    pub not_before: Timestamp,
    pub not_after: Timestamp,
    pub max_runs: u32,
    pub level: ApprovalLevel,
    /// Variable name → regular expression its whole value must match.
    #[serde(default)]
    pub constraints: BTreeMap<String, String>,
    pub approver: String,
    pub issued_at: Timestamp,
}

impl PreApprovalBody {
    pub fn digest_hex(&self) -> String {
        sha256_json(self)
    }
}

/// A pre-approval whose signatures verified, with its constraints compiled.
#[derive(Clone, Debug)]
pub struct VerifiedPreApproval {
    body: PreApprovalBody,
    constraints: Vec<(String, regex::Regex)>,
    signed_by: Vec<String>,
}

impl VerifiedPreApproval {
    pub fn body(&self) -> &PreApprovalBody {
        &self.body
    }

    pub fn signed_by(&self) -> &[String] {
        &self.signed_by
    }

    /// Whether every constrained variable is present and matches; the first that does not.
    pub fn constraints_match(&self, args: &BTreeMap<String, String>) -> Result<(), String> {
        match self.constraints.iter().find(|(name, re)| !args.get(name).is_some_and(|v| re.is_match(v))) {
            Some((name, _)) => Err(name.clone()),
            None => Ok(()),
        }
    }
}

/// Checks a pre-approval's signatures and shape.
pub fn verify_pre_approval(
    envelope_json: &[u8],
    pinned: &[CustomerPublicKey],
    threshold: usize,
) -> Result<VerifiedPreApproval, GrantError> {
    verify_pre_approval_envelope(&Envelope::from_json(envelope_json)?, pinned, threshold)
}

/// [`verify_pre_approval`] for an envelope already parsed.
pub fn verify_pre_approval_envelope(
    envelope: &Envelope,
    pinned: &[CustomerPublicKey],
    threshold: usize,
) -> Result<VerifiedPreApproval, GrantError> {
    let verified = envelope.verify(PRE_APPROVAL_PAYLOAD_TYPE, pinned, threshold)?;
    let body: PreApprovalBody =
        serde_json::from_slice(&verified.payload).map_err(|e| GrantError::Malformed(e.to_string()))?;
    if body.id.is_empty()
        || body.id.len() > 64
        || !body.id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(GrantError::Malformed("the pre-approval id must be 1-64 letters, digits, `-` or `_`".into()));
    }
    if body.not_after <= body.not_before {
        return Err(GrantError::Malformed("the pre-approval's window ends before it starts".into()));
    }
    // One constraint per variable at most, so no more than a template may declare.
    if body.constraints.len() > crate::template::MAX_VARIABLES {
        return Err(GrantError::Malformed(format!(
            "{} constraints; at most {} are accepted",
            body.constraints.len(),
            crate::template::MAX_VARIABLES
        )));
    }
    let constraints = body
        .constraints
        .iter()
        .map(|(name, pattern)| {
            crate::pattern::anchored(pattern)
                .map(|re| (name.clone(), re))
                .map_err(|e| GrantError::Malformed(format!("constraint on `{name}`: {e}")))
        })
        .collect::<Result<_, _>>()?;
    Ok(VerifiedPreApproval { body, constraints, signed_by: verified.signed_by })
}

/// Proof that [`evaluate`] allowed an operation; the executor demands one.
#[derive(Debug, PartialEq, Eq)]
pub struct Permit {
    request_id: OperationId,
    phase: Phase,
    /// The grant's nonce, which the caller must record as used before running.
    nonce: Option<String>,
    /// The pre-approval whose run counter the caller must advance before running.
    pre_approval: Option<String>,
    basis: Basis,
    /// What the run may use: what its template asks, within the customer's caps.
    limits: RunLimits,
}

/// Why an operation was allowed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Basis {
    ObservePhase,
    StandingWindow,
    Grant { signed_by: Vec<String> },
    PreApproval { id: String, signed_by: Vec<String> },
}

impl Permit {
    pub fn request_id(&self) -> OperationId {
        self.request_id
    }
    pub fn phase(&self) -> Phase {
        self.phase
    }
    pub fn nonce(&self) -> Option<&str> {
        self.nonce.as_deref()
    }
    pub fn pre_approval(&self) -> Option<&str> {
        self.pre_approval.as_deref()
    }
    pub fn basis(&self) -> &Basis {
        &self.basis
    }
    pub fn limits(&self) -> RunLimits {
        self.limits
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DenyReason {
    /// The request names another appliance.
    AnotherAppliance,
    /// The grant is signed by fewer distinct pinned keys than the policy requires.
    NotEnoughApprovers {
        required: usize,
        signed: usize,
    },
    /// The grant's window ends before it starts.
    GrantWindowInvalid,
    /// The grant's nonce is empty or too long.
    NonceMalformed,
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
    /// The customer signed a denial of this request.
    CustomerDenied,
    /// A pre-approval was presented but does not cover this request.
    OutsidePreApproval {
        id: String,
        why: String,
    },
    PreApprovalRevoked {
        id: String,
    },
    /// One of the customer's deny rules names a variable the request does not have: it cannot
    /// be shown not to apply, so it denies.
    RuleVariableMissing {
        rule: String,
        variable: String,
    },
    /// Executed as one of the appliance's built-in probes (no customer signature), but it is
    /// not one: another name, variables, data tags or a script.
    NotBuiltinProbe {
        kind: String,
    },
    /// The template asks for more than the customer's policy allows vendor code.
    OverRunCap {
        limit: &'static str,
        asked: u32,
        cap: u32,
    },
    /// The template asks to run as root, which only the customer's signature on the request
    /// (a grant, or a pre-approval of that template version) covers; a window does not.
    RootNeedsApproval,
    /// This appliance cannot switch users (it is not root), and the customer's policy does not
    /// accept Deploy and Operate work run as the appliance's own user.
    SameUserNotAccepted,
    /// The template asks to run as root, and this appliance is not root.
    RootUnavailable,
}

/// Which check a [`DenyReason`] comes from, without its details: what crosses the wire, so
/// the other side can tell denials apart without reading the sentence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum DenyCode {
    AnotherAppliance,
    NotEnoughApprovers,
    GrantWindowInvalid,
    NonceMalformed,
    BuiltIn,
    DeniedByRule,
    NoPolicy,
    PhaseDisabled,
    NoMatchingGrant,
    GrantForAnotherAppliance,
    GrantForAnotherRequest,
    GrantForAnotherPhase,
    GrantNotYetValid,
    GrantExpired,
    GrantTooLong,
    NonceReplayed,
    CustomerDenied,
    OutsidePreApproval,
    PreApprovalRevoked,
    RuleVariableMissing,
    NotBuiltinProbe,
    OverRunCap,
    RootNeedsApproval,
    SameUserNotAccepted,
    RootUnavailable,
}

impl DenyReason {
    /// The check this reason comes from.
    pub fn code(&self) -> DenyCode {
        match self {
            DenyReason::AnotherAppliance => DenyCode::AnotherAppliance,
            DenyReason::NotEnoughApprovers { .. } => DenyCode::NotEnoughApprovers,
            DenyReason::GrantWindowInvalid => DenyCode::GrantWindowInvalid,
            DenyReason::NonceMalformed => DenyCode::NonceMalformed,
            DenyReason::BuiltIn { .. } => DenyCode::BuiltIn,
            DenyReason::DeniedByRule { .. } => DenyCode::DeniedByRule,
            DenyReason::NoPolicy => DenyCode::NoPolicy,
            DenyReason::PhaseDisabled { .. } => DenyCode::PhaseDisabled,
            DenyReason::NoMatchingGrant => DenyCode::NoMatchingGrant,
            DenyReason::GrantForAnotherAppliance => DenyCode::GrantForAnotherAppliance,
            DenyReason::GrantForAnotherRequest => DenyCode::GrantForAnotherRequest,
            DenyReason::GrantForAnotherPhase { .. } => DenyCode::GrantForAnotherPhase,
            DenyReason::GrantNotYetValid { .. } => DenyCode::GrantNotYetValid,
            DenyReason::GrantExpired { .. } => DenyCode::GrantExpired,
            DenyReason::GrantTooLong { .. } => DenyCode::GrantTooLong,
            DenyReason::NonceReplayed => DenyCode::NonceReplayed,
            DenyReason::CustomerDenied => DenyCode::CustomerDenied,
            DenyReason::OutsidePreApproval { .. } => DenyCode::OutsidePreApproval,
            DenyReason::PreApprovalRevoked { .. } => DenyCode::PreApprovalRevoked,
            DenyReason::RuleVariableMissing { .. } => DenyCode::RuleVariableMissing,
            DenyReason::NotBuiltinProbe { .. } => DenyCode::NotBuiltinProbe,
            DenyReason::OverRunCap { .. } => DenyCode::OverRunCap,
            DenyReason::RootNeedsApproval => DenyCode::RootNeedsApproval,
            DenyReason::SameUserNotAccepted => DenyCode::SameUserNotAccepted,
            DenyReason::RootUnavailable => DenyCode::RootUnavailable,
        }
    }
}

impl std::fmt::Display for DenyReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DenyReason::AnotherAppliance => f.write_str("the request is for another appliance"),
            DenyReason::NotEnoughApprovers { required, signed } => {
                write!(f, "the grant has {signed} of the {required} customer approvals the policy requires")
            }
            DenyReason::GrantWindowInvalid => f.write_str("the grant's window ends before it starts"),
            DenyReason::NonceMalformed => f.write_str("the grant's nonce is empty or too long"),
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
            DenyReason::CustomerDenied => f.write_str("the customer denied this request"),
            DenyReason::OutsidePreApproval { id, why } => {
                write!(f, "pre-approval {id} does not cover this request: {why}")
            }
            DenyReason::PreApprovalRevoked { id } => write!(f, "pre-approval {id} was revoked by the customer"),
            DenyReason::RuleVariableMissing { rule, variable } => write!(
                f,
                "denied by customer rule `{rule}`: it names variable `{variable}`, which this request does not have"
            ),
            DenyReason::NotBuiltinProbe { kind } => {
                write!(f, "`{kind}` is not one of the appliance's built-in probes, which alone need no approval")
            }
            DenyReason::OverRunCap { limit, asked, cap } => write!(
                f,
                "the template asks for {limit} = {asked}, above the customer's cap of {cap} (`[vendor_code]` in the policy)"
            ),
            DenyReason::RootNeedsApproval => {
                f.write_str("the template asks to run as root, which needs the customer's approval of this request")
            }
            DenyReason::SameUserNotAccepted => f.write_str(
                "this appliance is not root, so vendor code would run as its own user, and the customer's policy does not accept that for Deploy and Operate (`same_user` in `[vendor_code]`)",
            ),
            DenyReason::RootUnavailable => {
                f.write_str("the template asks to run as root, and this appliance is not root")
            }
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    Allow(Permit),
    Deny(DenyReason),
}

/// Everything a decision depends on besides the request and its grant, from the appliance.
pub struct Context<'a> {
    pub policy: Option<&'a VerifiedPolicy>,
    /// Phases the customer switched off on this host.
    pub disabled: &'a std::collections::BTreeSet<Phase>,
    pub appliance: ApplianceId,
    pub now: Timestamp,
    /// Content hash of the template the request's command was rendered from, as the deciding
    /// side knows it: the appliance's own render, or offline the signed command.
    pub template_sha256: &'a str,
    /// Answers from the appliance's durable record of spent nonces.
    pub nonce_used: &'a dyn Fn(&str) -> bool,
    /// What the command asks of its box (from the same render as `template_sha256`).
    pub run: &'a RunSpec,
    /// Whether vendor code would run as the appliance's own user (the appliance is not root);
    /// unknown offline, where it counts as not.
    pub same_user: bool,
}

/// What the vendor's side presents as the customer's authority for one request.
#[derive(Clone, Copy)]
pub enum Authority<'a> {
    None,
    Grant(&'a VerifiedGrant),
    PreApproval {
        pre: &'a VerifiedPreApproval,
        /// Runs already counted against it (the appliance's durable counter).
        runs_used: u32,
        /// Revoked by the customer on the appliance host.
        revoked: bool,
    },
}

/// Decides whether `req` may run now, on a per-request grant or none.
#[must_use]
pub fn evaluate(ctx: &Context<'_>, req: &OperationRequest, grant: Option<&VerifiedGrant>) -> Decision {
    evaluate_with(ctx, req, grant.map_or(Authority::None, Authority::Grant))
}

/// Decides whether `req` may run now.
#[must_use]
pub fn evaluate_with(ctx: &Context<'_>, req: &OperationRequest, authority: Authority<'_>) -> Decision {
    match evaluate_authority(ctx, req, authority) {
        Decision::Allow(permit) => check_box(ctx, req, permit),
        deny => deny,
    }
}

/// What an allowed request may ask of its box: root only with the customer's signature on it,
/// the appliance's own user only where the policy accepts it, limits within the caps.
fn check_box(ctx: &Context<'_>, req: &OperationRequest, mut permit: Permit) -> Decision {
    use Decision::Deny;
    let caps = ctx.policy.map(|p| &p.document().vendor_code);
    let root = ctx.run.user == RunUser::Root;
    if ctx.same_user && root {
        return Deny(DenyReason::RootUnavailable);
    }
    if ctx.same_user && matches!(req.phase, Phase::Deploy | Phase::Operate) && !caps.is_some_and(|c| c.same_user) {
        return Deny(DenyReason::SameUserNotAccepted);
    }
    if root && !matches!(permit.basis, Basis::Grant { .. } | Basis::PreApproval { .. }) {
        return Deny(DenyReason::RootNeedsApproval);
    }
    match resolve(ctx.run, caps) {
        Ok(limits) => permit.limits = limits,
        Err(OverCap { limit, asked, cap }) => return Deny(DenyReason::OverRunCap { limit, asked, cap }),
    }
    Decision::Allow(permit)
}

/// The decision on the request's authority, before what it asks of its box.
fn evaluate_authority(ctx: &Context<'_>, req: &OperationRequest, authority: Authority<'_>) -> Decision {
    use Decision::Deny;
    if req.appliance != ctx.appliance {
        return Deny(DenyReason::AnotherAppliance);
    }
    if let Some(reason) = builtin_deny(req) {
        return Deny(reason);
    }
    let builtin_probe = BuiltinProbe::of_request(req).is_some();
    if ctx.disabled.contains(&req.phase) {
        return Deny(DenyReason::PhaseDisabled { phase: req.phase });
    }
    let Some(policy) = ctx.policy else {
        return if builtin_probe { allow(req, None, Basis::ObservePhase) } else { Deny(DenyReason::NoPolicy) };
    };
    let doc = policy.document();
    if let Some(reason) = customer_deny(doc, req, ctx.template_sha256) {
        return Deny(reason);
    }
    if !doc.phases.contains(&req.phase) {
        return Deny(DenyReason::PhaseDisabled { phase: req.phase });
    }
    if builtin_probe {
        return allow(req, None, Basis::ObservePhase);
    }
    let window =
        req.phase != Phase::Observe && doc.windows.iter().any(|w| window_covers(w, req, ctx.template_sha256, ctx.now));
    // A window never covers root: that takes the customer's signature on the request.
    if window && ctx.run.user != RunUser::Root {
        return allow(req, None, Basis::StandingWindow);
    }
    match authority {
        Authority::None if window => Deny(DenyReason::RootNeedsApproval),
        Authority::None => Deny(DenyReason::NoMatchingGrant),
        Authority::Grant(grant) => check_grant(ctx, doc, req, grant),
        Authority::PreApproval { pre, runs_used, revoked } => {
            check_pre_approval(ctx, doc, req, pre, runs_used, revoked)
        }
    }
}

fn check_grant(ctx: &Context<'_>, doc: &PolicyDocument, req: &OperationRequest, grant: &VerifiedGrant) -> Decision {
    use Decision::Deny;
    let g = &grant.body;
    if g.appliance != ctx.appliance {
        return Deny(DenyReason::GrantForAnotherAppliance);
    }
    if grant.signed_by.len() < doc.approvals_required {
        return Deny(DenyReason::NotEnoughApprovers {
            required: doc.approvals_required,
            signed: grant.signed_by.len(),
        });
    }
    if g.request_digest != req.digest_hex() || g.request_id != req.id || g.command_sha256 != req.command_sha256 {
        return Deny(DenyReason::GrantForAnotherRequest);
    }
    if g.decision == ApprovalDecision::Deny {
        return Deny(DenyReason::CustomerDenied);
    }
    if g.phase != req.phase {
        return Deny(DenyReason::GrantForAnotherPhase { granted: g.phase });
    }
    if g.not_after <= g.not_before {
        return Deny(DenyReason::GrantWindowInvalid);
    }
    let max = std::time::Duration::from_secs(u64::from(doc.max_grant_hours) * 3600);
    if g.not_after.since(g.not_before) > max {
        return Deny(DenyReason::GrantTooLong { max_hours: doc.max_grant_hours });
    }
    if ctx.now < g.not_before {
        return Deny(DenyReason::GrantNotYetValid { not_before: g.not_before });
    }
    if ctx.now >= g.not_after {
        return Deny(DenyReason::GrantExpired { expired_at: g.not_after });
    }
    if g.nonce.is_empty() || g.nonce.len() > MAX_NONCE_BYTES {
        return Deny(DenyReason::NonceMalformed);
    }
    if (ctx.nonce_used)(&g.nonce) {
        return Deny(DenyReason::NonceReplayed);
    }
    allow(req, Some(g.nonce.clone()), Basis::Grant { signed_by: grant.signed_by.clone() })
}

fn check_pre_approval(
    ctx: &Context<'_>,
    doc: &PolicyDocument,
    req: &OperationRequest,
    pre: &VerifiedPreApproval,
    runs_used: u32,
    revoked: bool,
) -> Decision {
    use Decision::Deny;
    let p = &pre.body;
    let outside = |why: &str| Deny(DenyReason::OutsidePreApproval { id: p.id.clone(), why: why.to_owned() });
    if revoked {
        return Deny(DenyReason::PreApprovalRevoked { id: p.id.clone() });
    }
    if p.appliance != ctx.appliance {
        return outside("it is for another appliance");
    }
    if pre.signed_by.len() < doc.approvals_required {
        return Deny(DenyReason::NotEnoughApprovers { required: doc.approvals_required, signed: pre.signed_by.len() });
    }
    if p.template != req.kind {
        return outside("it is for another template");
    }
    if p.template_sha256 != ctx.template_sha256 {
        return outside("the template changed since it was pre-approved");
    }
    if p.phase != req.phase {
        return outside("it is for another phase");
    }
    if ctx.now < p.not_before {
        return outside("it is not valid yet");
    }
    if ctx.now >= p.not_after {
        return outside("it has expired");
    }
    if runs_used >= p.max_runs {
        return outside("its runs are spent");
    }
    if let Err(var) = pre.constraints_match(&req.args) {
        return outside(&format!("variable `{var}` does not meet its constraint"));
    }
    Decision::Allow(Permit {
        request_id: req.id,
        phase: req.phase,
        nonce: None,
        pre_approval: Some(p.id.clone()),
        basis: Basis::PreApproval { id: p.id.clone(), signed_by: pre.signed_by.clone() },
        limits: RunLimits::default(),
    })
}

fn allow(req: &OperationRequest, nonce: Option<String>, basis: Basis) -> Decision {
    Decision::Allow(Permit {
        request_id: req.id,
        phase: req.phase,
        nonce,
        pre_approval: None,
        basis,
        limits: RunLimits::default(),
    })
}

/// The built-in deny a request meets, by its kind or its declared data tags, whatever the
/// spelling; no policy lifts it.
pub fn builtin_deny(req: &OperationRequest) -> Option<DenyReason> {
    let kind = req.kind.to_ascii_lowercase();
    let by_kind = BUILTIN_DENIED_KINDS.iter().find(|(k, _)| *k == kind);
    let by_tag =
        || BUILTIN_DENIED_TAGS.iter().find(|(tag, _)| req.data_tags.iter().any(|t| t.eq_ignore_ascii_case(tag)));
    by_kind.or_else(by_tag).map(|(_, rule)| DenyReason::BuiltIn { rule })
}

/// The first of the customer's deny rules that denies `req`, rendered from the template whose
/// content hash is `template_sha256`.
pub fn customer_deny(doc: &PolicyDocument, req: &OperationRequest, template_sha256: &str) -> Option<DenyReason> {
    doc.deny.iter().find_map(|rule| match rule_verdict(rule, req, template_sha256) {
        RuleVerdict::NotApplicable => None,
        RuleVerdict::Denies => Some(DenyReason::DeniedByRule { rule: rule.id.clone() }),
        RuleVerdict::VariableMissing(variable) => {
            Some(DenyReason::RuleVariableMissing { rule: rule.id.clone(), variable })
        }
    })
}

/// What one deny rule says about one request.
enum RuleVerdict {
    NotApplicable,
    Denies,
    /// Nothing shows the rule does not apply, but a variable it names is missing.
    VariableMissing(String),
}

fn rule_verdict(rule: &DenyRule, req: &OperationRequest, template_sha256: &str) -> RuleVerdict {
    let kind_holds = rule.kind.as_deref().is_none_or(|k| k == "*" || k.eq_ignore_ascii_case(&req.kind));
    let tags_hold =
        rule.tags.is_empty() || rule.tags.iter().any(|t| req.data_tags.iter().any(|d| d.eq_ignore_ascii_case(t)));
    let template_holds = rule.template_sha256.as_deref().is_none_or(|h| h.eq_ignore_ascii_case(template_sha256));
    if !(kind_holds && tags_hold && template_holds) {
        return RuleVerdict::NotApplicable;
    }
    if let Some(pattern) = &rule.any_value
        && !req.args.values().any(|v| pattern.is_match(v))
    {
        return RuleVerdict::NotApplicable;
    }
    let mut missing = None;
    for (name, value) in &rule.args {
        match req.args.get(name) {
            Some(v) if v != value => return RuleVerdict::NotApplicable,
            Some(_) => {}
            None => {
                missing.get_or_insert_with(|| name.clone());
            }
        }
    }
    match missing {
        Some(variable) => RuleVerdict::VariableMissing(variable),
        None => RuleVerdict::Denies,
    }
}

/// Whether standing window `w` covers `req` (rendered from the template whose content hash is
/// `template_sha256`) at `now`: its phase, its hours, and the templates or tags it is limited to.
pub fn window_covers(w: &Window, req: &OperationRequest, template_sha256: &str, now: Timestamp) -> bool {
    let template_listed =
        || w.templates.iter().any(|t| t.name == req.kind && t.sha256.eq_ignore_ascii_case(template_sha256));
    let tags_listed =
        || !req.data_tags.is_empty() && req.data_tags.iter().all(|d| w.tags.iter().any(|t| t.eq_ignore_ascii_case(d)));
    w.phase == req.phase
        && window_contains(w, now)
        && (w.templates.is_empty() || template_listed())
        && (w.tags.is_empty() || tags_listed())
}

fn window_contains(w: &Window, now: Timestamp) -> bool {
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
    use std::collections::BTreeSet;

    use super::*;
    use crate::customer_key::CustomerSigningKey;
    use crate::policy::{POLICY_PAYLOAD_TYPE, verify_signed_policy};

    // 2026-11-24 is a Tuesday.
    const TUESDAY_NOON: i64 = 1_795_521_600_000;
    const HOUR: std::time::Duration = std::time::Duration::from_secs(3600);
    const ALL: &str = "\"observe\", \"deploy\", \"operate\"";

    fn key(n: u8) -> CustomerSigningKey {
        CustomerSigningKey::from_seed([n; 32])
    }

    fn policy_signed(phases: &str, extra: &str, keys: &[u8]) -> VerifiedPolicy {
        let text = format!("version = 1\nserial = 1\nphases = [{phases}]\n{extra}");
        let mut env = Envelope::new(POLICY_PAYLOAD_TYPE, text.into_bytes());
        for k in keys {
            env = env.sign(&key(*k));
        }
        let pinned: Vec<_> = (1..=3).map(|n| key(n).public()).collect();
        verify_signed_policy(env.to_json().as_bytes(), &pinned, None).unwrap()
    }

    fn policy(phases: &str, extra: &str) -> VerifiedPolicy {
        policy_signed(phases, extra, &[1])
    }

    /// The content hash of the template the test requests are rendered from.
    fn template_sha() -> String {
        "cd".repeat(32)
    }

    fn apl() -> ApplianceId {
        ApplianceId::from_random([9; 16])
    }

    fn request(kind: &str, phase: Phase) -> OperationRequest {
        OperationRequest {
            id: OperationId::from_random([1; 16]),
            appliance: apl(),
            kind: kind.into(),
            phase,
            data_tags: BTreeSet::new(),
            args: [("action".to_owned(), "restart".to_owned())].into(),
            command_sha256: "ab".repeat(32),
            environment: None,
            execution_key: None,
        }
    }

    #[test]
    fn a_request_naming_no_host_keeps_the_digest_it_had_before_hosts_were_named() {
        let req = request("restart", Phase::Operate);
        let json = serde_json::to_string(&req).unwrap();
        assert!(!json.contains("execution_key"), "{json}");
        let parsed: OperationRequest = serde_json::from_str(&json).unwrap();
        assert_eq!(parsed.digest_hex(), req.digest_hex());
        // Naming a host is part of what the customer signs.
        let mut named = req.clone();
        named.execution_key = Some("ab".repeat(32));
        assert_ne!(named.digest_hex(), req.digest_hex());
    }

    fn grant_signed(req: &OperationRequest, keys: &[u8], edit: impl FnOnce(&mut GrantBody)) -> VerifiedGrant {
        let now = Timestamp::from_unix_millis(TUESDAY_NOON);
        let mut body = GrantBody {
            request_id: req.id,
            appliance: apl(),
            phase: req.phase,
            request_digest: req.digest_hex(),
            command_sha256: req.command_sha256.clone(),
            decision: ApprovalDecision::Approve,
            decided_at: now,
            approver: "ops@customer".into(),
            reason: "ok".into(),
            not_before: Timestamp::from_unix_millis(TUESDAY_NOON - 60_000),
            not_after: now.saturating_add(HOUR),
            nonce: "n-1".into(),
        };
        edit(&mut body);
        let mut env = Envelope::new(GRANT_PAYLOAD_TYPE, serde_json::to_vec(&body).unwrap());
        for k in keys {
            env = env.sign(&key(*k));
        }
        let pinned: Vec<_> = (1..=3).map(|n| key(n).public()).collect();
        verify_grant(env.to_json().as_bytes(), &pinned, 1).unwrap()
    }

    fn grant_for(req: &OperationRequest, edit: impl FnOnce(&mut GrantBody)) -> VerifiedGrant {
        grant_signed(req, &[1], edit)
    }

    #[test]
    fn a_request_with_a_field_nobody_reviews_does_not_parse() {
        let req = request("restart", Phase::Operate);
        let mut json = serde_json::to_value(&req).unwrap();
        assert_eq!(serde_json::from_value::<OperationRequest>(json.clone()).unwrap(), req);
        json["also_run"] = "rm -rf /".into();
        assert!(serde_json::from_value::<OperationRequest>(json).is_err());
    }

    /// The decision for `req` asking `run` of its box, on an appliance that can switch users
    /// or (`same_user`) cannot.
    fn boxed(policy: &VerifiedPolicy, req: &OperationRequest, run: RunSpec, same_user: bool, grant: bool) -> Decision {
        let disabled = BTreeSet::new();
        let template = template_sha();
        let ctx = Context {
            policy: Some(policy),
            disabled: &disabled,
            appliance: apl(),
            now: Timestamp::from_unix_millis(TUESDAY_NOON),
            template_sha256: &template,
            nonce_used: &|_| false,
            run: &run,
            same_user,
        };
        let g = grant_for(req, |_| {});
        evaluate(&ctx, req, grant.then_some(&g))
    }

    #[test]
    fn what_a_template_asks_of_its_box_is_held_to_the_customers_policy() {
        let window = "[[windows]]\nphase = \"deploy\"\ndays = [\"tue\"]\nstart = \"11:00\"\nend = \"13:00\"\n";
        let p = policy(ALL, window);
        let deploy = request("deploy-svc", Phase::Deploy);
        let root = RunSpec { user: RunUser::Root, ..RunSpec::default() };
        let deny = |d: Decision| match d {
            Decision::Deny(r) => r,
            Decision::Allow(p) => panic!("allowed: {p:?}"),
        };
        // Root: the customer's grant covers it; a standing window does not.
        assert!(matches!(boxed(&p, &deploy, root, false, true), Decision::Allow(_)));
        assert_eq!(deny(boxed(&p, &deploy, root, false, false)), DenyReason::RootNeedsApproval);
        // An appliance that is not root: no root at all, and its own user only if accepted.
        assert_eq!(deny(boxed(&p, &deploy, root, true, true)), DenyReason::RootUnavailable);
        assert_eq!(deny(boxed(&p, &deploy, RunSpec::default(), true, true)), DenyReason::SameUserNotAccepted);
        let accepting = policy(ALL, &format!("{window}[vendor_code]\nsame_user = true\n"));
        assert!(matches!(boxed(&accepting, &deploy, RunSpec::default(), true, true), Decision::Allow(_)));
        // Limits: what the template asks, within the caps; above them, denied.
        let asks = RunSpec { wall_time_seconds: Some(120), ..RunSpec::default() };
        let Decision::Allow(permit) = boxed(&p, &deploy, asks, false, true) else { panic!() };
        assert_eq!(permit.limits().wall_time_seconds, 120);
        let greedy = RunSpec { memory_mib: Some(1 << 20), ..RunSpec::default() };
        assert_eq!(
            deny(boxed(&p, &deploy, greedy, false, true)),
            DenyReason::OverRunCap { limit: "memory_mib", asked: 1 << 20, cap: 4096 }
        );
        let capped = policy(ALL, "[vendor_code]\nmax_wall_time_seconds = 60\n");
        assert_eq!(deny(boxed(&capped, &deploy, asks, false, true)).code(), DenyCode::OverRunCap);
        let Decision::Allow(permit) = boxed(&capped, &deploy, RunSpec::default(), false, true) else { panic!() };
        assert_eq!(permit.limits().wall_time_seconds, 60);
    }

    /// Runs one decision and renders it compactly, so each case reads as one line.
    fn decide(
        policy: Option<&VerifiedPolicy>,
        disabled: &[Phase],
        req: &OperationRequest,
        grant: Option<&VerifiedGrant>,
        used: bool,
    ) -> String {
        render(decision(policy, disabled, req, &template_sha(), grant, used))
    }

    fn decision(
        policy: Option<&VerifiedPolicy>,
        disabled: &[Phase],
        req: &OperationRequest,
        template_sha256: &str,
        grant: Option<&VerifiedGrant>,
        used: bool,
    ) -> Decision {
        let disabled: BTreeSet<Phase> = disabled.iter().copied().collect();
        let ctx = Context {
            policy,
            disabled: &disabled,
            appliance: apl(),
            now: Timestamp::from_unix_millis(TUESDAY_NOON),
            template_sha256,
            nonce_used: &|_| used,
            run: &RunSpec::default(),
            same_user: false,
        };
        evaluate(&ctx, req, grant)
    }

    fn render(d: Decision) -> String {
        match d {
            Decision::Allow(p) => format!("allow {:?}", p.basis()).split(" {").next().unwrap_or_default().to_owned(),
            Decision::Deny(r) => format!("deny: {r}"),
        }
    }

    /// The decision for `req` rendered from the template whose content hash is `template_sha256`.
    fn check_rendered(
        policy: &VerifiedPolicy,
        req: &OperationRequest,
        template_sha256: &str,
        grant: Option<&VerifiedGrant>,
    ) -> Decision {
        decision(Some(policy), &[], req, template_sha256, grant, false)
    }

    /// The typed reason a decision denied with.
    fn deny_reason(d: Decision) -> Option<DenyReason> {
        match d {
            Decision::Allow(_) => None,
            Decision::Deny(r) => Some(r),
        }
    }

    fn check(
        policy: Option<&VerifiedPolicy>,
        req: &OperationRequest,
        grant: Option<&VerifiedGrant>,
        used: bool,
    ) -> String {
        decide(policy, &[], req, grant, used)
    }

    #[test]
    fn phase_grant_deny_matrix() {
        let all = policy(ALL, "");
        let observe_only = policy("\"observe\"", "");
        let deny = policy(ALL, "[[deny]]\nid = \"no-restart\"\nkind = \"*\"\nargs = { action = \"restart\" }\n");
        // Observe is exercised through the appliance's own probe; Deploy and Operate through a
        // vendor template.
        for (kind, phase) in [("status", Phase::Observe), ("svc", Phase::Deploy), ("svc", Phase::Operate)] {
            let mut req = request(kind, phase);
            if phase == Phase::Observe {
                req.args.clear();
            }
            let grant = grant_for(&req, |_| {});
            let elevated = phase != Phase::Observe;
            let expect_no_grant =
                if elevated { "deny: no customer grant covers this request" } else { "allow ObservePhase" };
            let expect_grant = if elevated { "allow Grant" } else { "allow ObservePhase" };
            assert_eq!(check(Some(&all), &req, None, false), expect_no_grant, "{phase:?} without grant");
            assert_eq!(check(Some(&all), &req, Some(&grant), false), expect_grant, "{phase:?} with grant");
            // Explicit deny beats everything, grants included; a probe lacks the variable the
            // rule names, which denies it too (fail closed).
            let expect_deny = if elevated {
                "deny: denied by customer rule `no-restart`"
            } else {
                "deny: denied by customer rule `no-restart`: it names variable `action`, which this request does not have"
            };
            assert_eq!(check(Some(&deny), &req, Some(&grant), false), expect_deny);
            // A phase switched off on the host beats everything but the built-in denies.
            let off = format!("deny: the customer has not enabled the {phase:?} phase");
            assert_eq!(decide(Some(&all), &[phase], &req, Some(&grant), false), off);
            if elevated {
                assert_eq!(check(Some(&observe_only), &req, Some(&grant), false), off);
                assert_eq!(
                    check(None, &req, Some(&grant), false),
                    "deny: no customer policy is in force; only Observe is allowed"
                );
                assert_eq!(check(Some(&all), &req, Some(&grant), true), "deny: the grant's nonce was already used");
            }
        }
    }

    #[test]
    fn vendor_template_labelled_observe_still_needs_a_grant() {
        let all = policy(ALL, "");
        let req = request("drop-tables", Phase::Observe);
        assert_eq!(check(Some(&all), &req, None, false), "deny: no customer grant covers this request");
        assert_eq!(check(None, &req, None, false), "deny: no customer policy is in force; only Observe is allowed");
        assert_eq!(check(Some(&all), &req, Some(&grant_for(&req, |_| {})), false), "allow Grant");
    }

    #[test]
    fn grant_must_match_appliance_request_phase_and_window() {
        let all = policy(ALL, "");
        let req = request("svc", Phase::Operate);
        let other_apl = grant_for(&req, |g| g.appliance = ApplianceId::from_random([8; 16]));
        assert_eq!(check(Some(&all), &req, Some(&other_apl), false), "deny: the grant is for another appliance");
        let mut elsewhere = req.clone();
        elsewhere.appliance = ApplianceId::from_random([8; 16]);
        assert_eq!(check(Some(&all), &elsewhere, None, false), "deny: the request is for another appliance");
        let mut changed = req.clone();
        changed.args.insert("action".into(), "stop".into());
        assert_eq!(
            check(Some(&all), &changed, Some(&grant_for(&req, |_| {})), false),
            "deny: the grant is for another request"
        );
        // Tags are part of what the customer signed.
        let mut retagged = req.clone();
        retagged.data_tags.insert("customer-db:read".into());
        assert_eq!(
            check(Some(&all), &retagged, Some(&grant_for(&req, |_| {})), false),
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
        let too_long = grant_for(&req, |g| {
            g.not_after = g.not_before.saturating_add(HOUR * 4 + std::time::Duration::from_millis(1))
        });
        assert_eq!(
            check(Some(&all), &req, Some(&too_long), false),
            "deny: the grant's window exceeds the policy's maximum of 4 hours"
        );
        let exactly_four = grant_for(&req, |g| g.not_after = g.not_before.saturating_add(HOUR * 4));
        assert_eq!(check(Some(&all), &req, Some(&exactly_four), false), "allow Grant");
        let inverted = grant_for(&req, |g| std::mem::swap(&mut g.not_before, &mut g.not_after));
        assert_eq!(check(Some(&all), &req, Some(&inverted), false), "deny: the grant's window ends before it starts");
        let forever = grant_for(&req, |g| {
            g.not_before = Timestamp::from_unix_millis(i64::MIN);
            g.not_after = Timestamp::from_unix_millis(i64::MAX);
        });
        assert!(check(Some(&all), &req, Some(&forever), false).contains("exceeds the policy's maximum"));
        let empty_nonce = grant_for(&req, |g| g.nonce.clear());
        assert_eq!(check(Some(&all), &req, Some(&empty_nonce), false), "deny: the grant's nonce is empty or too long");
    }

    #[test]
    fn customer_set_grant_limit_is_enforced() {
        let one_hour = policy(ALL, "max_grant_hours = 1\n");
        let req = request("svc", Phase::Deploy);
        let two_hours = grant_for(&req, |g| g.not_after = g.not_before.saturating_add(HOUR * 2));
        assert_eq!(
            check(Some(&one_hour), &req, Some(&two_hours), false),
            "deny: the grant's window exceeds the policy's maximum of 1 hours"
        );
    }

    #[test]
    fn grant_needs_as_many_approvers_as_the_policy() {
        let two = policy_signed(ALL, "approvals_required = 2\n", &[1, 2]);
        let req = request("svc", Phase::Operate);
        let one = grant_signed(&req, &[1], |_| {});
        assert_eq!(
            check(Some(&two), &req, Some(&one), false),
            "deny: the grant has 1 of the 2 customer approvals the policy requires"
        );
        let same_key_twice = grant_signed(&req, &[1, 1], |_| {});
        assert!(check(Some(&two), &req, Some(&same_key_twice), false).contains("1 of the 2"));
        assert_eq!(check(Some(&two), &req, Some(&grant_signed(&req, &[1, 3], |_| {})), false), "allow Grant");
    }

    #[test]
    fn standing_window_allows_only_its_phase_and_hours() {
        let windowed =
            policy(ALL, "[[windows]]\nphase = \"deploy\"\ndays = [\"tue\"]\nstart = \"11:00\"\nend = \"13:00\"\n");
        assert_eq!(check(Some(&windowed), &request("svc", Phase::Deploy), None, false), "allow StandingWindow");
        assert_eq!(
            check(Some(&windowed), &request("svc", Phase::Operate), None, false),
            "deny: no customer grant covers this request"
        );
        assert!(
            decide(Some(&windowed), &[Phase::Deploy], &request("svc", Phase::Deploy), None, false)
                .contains("not enabled")
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
        let all = policy(ALL, "");
        for (kind, rule) in BUILTIN_DENIED_KINDS {
            for spelling in [kind.to_string(), kind.to_ascii_uppercase()] {
                let req = request(&spelling, Phase::Operate);
                let grant = grant_for(&req, |_| {});
                assert_eq!(
                    check(Some(&all), &req, Some(&grant), false),
                    format!("deny: denied by built-in rule {rule}")
                );
            }
            assert_eq!(
                check(None, &request(kind, Phase::Observe), None, false),
                format!("deny: denied by built-in rule {rule}")
            );
        }
        // Renaming the operation does not help: its declared tags are checked too.
        for (tag, rule) in BUILTIN_DENIED_TAGS {
            let mut req = request("innocent-looking", Phase::Operate);
            req.data_tags.insert(tag.to_ascii_uppercase());
            let grant = grant_for(&req, |_| {});
            assert_eq!(check(Some(&all), &req, Some(&grant), false), format!("deny: denied by built-in rule {rule}"));
        }
    }

    #[test]
    fn forged_grant_is_refused_at_verification() {
        let req = request("svc", Phase::Operate);
        let body = serde_json::to_vec(&grant_for(&req, |_| {}).body).unwrap();
        let forged = Envelope::new(GRANT_PAYLOAD_TYPE, body).sign(&CustomerSigningKey::from_seed([7; 32]));
        assert!(verify_grant(forged.to_json().as_bytes(), &[key(1).public()], 1).is_err());
        let garbage = Envelope::new(GRANT_PAYLOAD_TYPE, b"{}".to_vec()).sign(&key(1));
        assert!(matches!(
            verify_grant(garbage.to_json().as_bytes(), &[key(1).public()], 1),
            Err(GrantError::Malformed(_))
        ));
        // A policy envelope is not a grant, even when signed by the right key.
        let policy = Envelope::new(POLICY_PAYLOAD_TYPE, b"{}".to_vec()).sign(&key(1));
        assert!(matches!(
            verify_grant(policy.to_json().as_bytes(), &[key(1).public()], 1),
            Err(GrantError::Signature(DsseError::WrongType { .. }))
        ));
    }

    #[test]
    fn customer_denial_is_final_even_when_well_formed() {
        let all = policy(ALL, "");
        let req = request("svc", Phase::Operate);
        let denial = grant_for(&req, |g| g.decision = ApprovalDecision::Deny);
        assert_eq!(check(Some(&all), &req, Some(&denial), false), "deny: the customer denied this request");
        // An approval naming the right digest but another request id is not for this request.
        let other = grant_for(&req, |g| g.request_id = OperationId::from_random([2; 16]));
        assert_eq!(check(Some(&all), &req, Some(&other), false), "deny: the grant is for another request");
    }

    /// A request of `kind` with these variables, as a template version declaring `tags` renders it.
    fn rendered(kind: &str, vars: &[(&str, &str)], tags: &[&str]) -> OperationRequest {
        let mut req = request(kind, Phase::Deploy);
        req.args = vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        req.data_tags = tags.iter().map(|t| (*t).to_owned()).collect();
        req
    }

    const DEPLOY_SVC_V1: &str = "1111111111111111111111111111111111111111111111111111111111111111";
    const DEPLOY_SVC_V2: &str = "2222222222222222222222222222222222222222222222222222222222222222";

    #[test]
    fn a_renamed_variable_in_a_new_template_version_is_still_denied() {
        let p = policy(ALL, "[[deny]]\nid = \"no-billing\"\nkind = \"deploy-svc\"\nargs = { service = \"billing\" }\n");
        let v1 = rendered("deploy-svc", &[("service", "billing")], &[]);
        let grant = grant_for(&v1, |_| {});
        assert_eq!(
            deny_reason(check_rendered(&p, &v1, DEPLOY_SVC_V1, Some(&grant))),
            Some(DenyReason::DeniedByRule { rule: "no-billing".into() })
        );
        let api = rendered("deploy-svc", &[("service", "api")], &[]);
        assert_eq!(deny_reason(check_rendered(&p, &api, DEPLOY_SVC_V1, Some(&grant_for(&api, |_| {})))), None);
        // The vendor's new version calls the variable `target`: the rule still holds, whatever
        // the value, until the customer rewrites it.
        for value in ["billing", "api"] {
            let v2 = rendered("deploy-svc", &[("target", value)], &[]);
            let denied = deny_reason(check_rendered(&p, &v2, DEPLOY_SVC_V2, Some(&grant_for(&v2, |_| {}))));
            assert_eq!(
                denied,
                Some(DenyReason::RuleVariableMissing { rule: "no-billing".into(), variable: "service".into() }),
                "{value}"
            );
            assert_eq!(denied.map(|d| d.code()), Some(DenyCode::RuleVariableMissing));
        }
        // Another template is not what the rule is about.
        let other = rendered("restart-svc", &[("target", "billing")], &[]);
        assert_eq!(deny_reason(check_rendered(&p, &other, DEPLOY_SVC_V1, Some(&grant_for(&other, |_| {})))), None);
        // The kind compares without regard to case, as before.
        let shouting = rendered("DEPLOY-SVC", &[("target", "billing")], &[]);
        assert!(deny_reason(check_rendered(&p, &shouting, DEPLOY_SVC_V2, None)).is_some());
    }

    #[test]
    fn a_rule_is_lifted_only_by_a_value_that_contradicts_it() {
        let p = policy(
            ALL,
            "[[deny]]\nid = \"no-prod-billing\"\nkind = \"*\"\nargs = { service = \"billing\", env = \"prod\" }\n",
        );
        // `service` contradicts the rule: the missing `env` does not matter.
        let api = rendered("deploy-svc", &[("service", "api")], &[]);
        assert_eq!(deny_reason(check_rendered(&p, &api, DEPLOY_SVC_V1, Some(&grant_for(&api, |_| {})))), None);
        let billing = rendered("deploy-svc", &[("service", "billing")], &[]);
        assert_eq!(
            deny_reason(check_rendered(&p, &billing, DEPLOY_SVC_V1, Some(&grant_for(&billing, |_| {})))),
            Some(DenyReason::RuleVariableMissing { rule: "no-prod-billing".into(), variable: "env".into() })
        );
        let both = rendered("deploy-svc", &[("service", "billing"), ("env", "prod")], &[]);
        assert_eq!(
            deny_reason(check_rendered(&p, &both, DEPLOY_SVC_V1, None)),
            Some(DenyReason::DeniedByRule { rule: "no-prod-billing".into() })
        );
        let staging = rendered("deploy-svc", &[("service", "billing"), ("env", "staging")], &[]);
        assert_eq!(deny_reason(check_rendered(&p, &staging, DEPLOY_SVC_V1, None)), Some(DenyReason::NoMatchingGrant));
    }

    #[test]
    fn renamed_templates_are_denied_by_tags_values_and_hashes() {
        let p = policy(
            ALL,
            &format!(
                "[[deny]]\nid = \"no-billing-writes\"\ntags = [\"billing:write\"]\n\
                 [[deny]]\nid = \"no-billing-values\"\nany_value = \"billing|billing-[a-z]+\"\n\
                 [[deny]]\nid = \"bad-version\"\ntemplate_sha256 = \"{DEPLOY_SVC_V1}\"\n"
            ),
        );
        let rule = |id: &str| Some(DenyReason::DeniedByRule { rule: id.into() });
        // Renamed, but it declares what it touches; the tag compares without regard to case.
        for tag in ["billing:write", "BILLING:WRITE"] {
            let renamed = rendered("ship-it", &[("target", "api")], &[tag, "service:restart"]);
            assert_eq!(deny_reason(check_rendered(&p, &renamed, DEPLOY_SVC_V2, None)), rule("no-billing-writes"));
        }
        // Renamed template and variable: the value is still the value.
        for value in ["billing", "billing-eu"] {
            let renamed = rendered("ship-it", &[("target", value)], &[]);
            assert_eq!(deny_reason(check_rendered(&p, &renamed, DEPLOY_SVC_V2, None)), rule("no-billing-values"));
        }
        // The pattern matches whole values only.
        let lookalike = rendered("ship-it", &[("target", "not-billing")], &[]);
        let grant = grant_for(&lookalike, |_| {});
        assert_eq!(deny_reason(check_rendered(&p, &lookalike, DEPLOY_SVC_V2, Some(&grant))), None);
        // One exact version is denied whatever it is called, and a new version is not that one.
        let v1 = rendered("anything", &[("target", "api")], &[]);
        assert_eq!(deny_reason(check_rendered(&p, &v1, DEPLOY_SVC_V1, None)), rule("bad-version"));
        let grant = grant_for(&v1, |_| {});
        assert_eq!(deny_reason(check_rendered(&p, &v1, DEPLOY_SVC_V2, Some(&grant))), None);
        // Selectors combine: a tag rule limited to one kind does not touch other kinds.
        let scoped = policy(ALL, "[[deny]]\nid = \"r\"\nkind = \"deploy-svc\"\ntags = [\"billing:write\"]\n");
        let elsewhere = rendered("ship-it", &[], &["billing:write"]);
        assert_eq!(
            deny_reason(check_rendered(&scoped, &elsewhere, DEPLOY_SVC_V1, None)),
            Some(DenyReason::NoMatchingGrant)
        );
    }

    #[test]
    fn deny_rules_beat_standing_windows_and_pre_approvals_too() {
        let p = policy(
            ALL,
            "[[windows]]\nphase = \"deploy\"\ndays = [\"tue\"]\nstart = \"11:00\"\nend = \"13:00\"\n\
             [[deny]]\nid = \"no-billing\"\nany_value = \"billing\"\n",
        );
        let billing = rendered("ship-it", &[("target", "billing")], &[]);
        assert_eq!(
            render(check_rendered(&p, &billing, DEPLOY_SVC_V1, None)),
            "deny: denied by customer rule `no-billing`"
        );
        let api = rendered("ship-it", &[("target", "api")], &[]);
        assert_eq!(render(check_rendered(&p, &api, DEPLOY_SVC_V1, None)), "allow StandingWindow");
    }

    #[test]
    fn limited_standing_windows_cover_only_their_templates_and_tags() {
        let window = |limit: &str| {
            policy(
                ALL,
                &format!(
                    "[[windows]]\nphase = \"deploy\"\ndays = [\"tue\"]\nstart = \"11:00\"\nend = \"13:00\"\n{limit}\n"
                ),
            )
        };
        let req = rendered("deploy-svc", &[("service", "api")], &["service:restart"]);
        let outcome = |p: &VerifiedPolicy, req: &OperationRequest, sha: &str| render(check_rendered(p, req, sha, None));
        let none = "deny: no customer grant covers this request";

        let unlimited = window("");
        assert_eq!(outcome(&unlimited, &req, DEPLOY_SVC_V2), "allow StandingWindow");
        assert_eq!(
            unlimited.document().warnings(),
            [crate::policy::PolicyWarning::UnlimitedWindow { index: 0, phase: Phase::Deploy }]
        );

        let by_template = window(&format!("templates = [{{ name = \"deploy-svc\", sha256 = \"{DEPLOY_SVC_V1}\" }}]"));
        assert!(by_template.document().warnings().is_empty());
        assert_eq!(outcome(&by_template, &req, DEPLOY_SVC_V1), "allow StandingWindow");
        // A new version, or another template under the same hash, is not what the customer named.
        assert_eq!(outcome(&by_template, &req, DEPLOY_SVC_V2), none);
        assert_eq!(outcome(&by_template, &rendered("ship-it", &[], &["service:restart"]), DEPLOY_SVC_V1), none);

        let by_tags = window("tags = [\"service:restart\", \"service:read\"]");
        assert!(by_tags.document().warnings().is_empty());
        assert_eq!(outcome(&by_tags, &req, DEPLOY_SVC_V2), "allow StandingWindow");
        let more = rendered("deploy-svc", &[], &["service:restart", "customer-db:read"]);
        assert_eq!(outcome(&by_tags, &more, DEPLOY_SVC_V2), none);
        // A request that declares nothing is not shown to touch only what the window allows.
        assert_eq!(outcome(&by_tags, &rendered("deploy-svc", &[], &[]), DEPLOY_SVC_V2), none);

        // Both limits given: both must hold.
        let both = window(&format!(
            "templates = [{{ name = \"deploy-svc\", sha256 = \"{DEPLOY_SVC_V1}\" }}]\ntags = [\"service:read\"]"
        ));
        assert_eq!(outcome(&both, &req, DEPLOY_SVC_V1), none);
        // Outside the window's hours a limited window covers nothing either.
        let later = policy(
            ALL,
            &format!(
                "[[windows]]\nphase = \"deploy\"\ndays = [\"wed\"]\nstart = \"11:00\"\nend = \"13:00\"\n\
                 templates = [{{ name = \"deploy-svc\", sha256 = \"{DEPLOY_SVC_V1}\" }}]\n"
            ),
        );
        assert_eq!(outcome(&later, &req, DEPLOY_SVC_V1), none);
    }

    fn pre_approval(edit: impl FnOnce(&mut PreApprovalBody)) -> VerifiedPreApproval {
        let now = Timestamp::from_unix_millis(TUESDAY_NOON);
        let mut body = PreApprovalBody {
            id: "pa-restarts".into(),
            appliance: apl(),
            template: "svc".into(),
            template_sha256: "cd".repeat(32),
            phase: Phase::Operate,
            not_before: Timestamp::from_unix_millis(TUESDAY_NOON - 60_000),
            not_after: now.saturating_add(HOUR * 24),
            max_runs: 3,
            level: ApprovalLevel::Commands,
            constraints: [("action".to_owned(), "restart|reload".to_owned())].into(),
            approver: "ops@customer".into(),
            issued_at: now,
        };
        edit(&mut body);
        let env = Envelope::new(PRE_APPROVAL_PAYLOAD_TYPE, serde_json::to_vec(&body).unwrap()).sign(&key(1));
        verify_pre_approval(env.to_json().as_bytes(), &[key(1).public()], 1).unwrap()
    }

    fn decide_pre(
        policy: &VerifiedPolicy,
        req: &OperationRequest,
        pre: &VerifiedPreApproval,
        template_sha256: &str,
        runs_used: u32,
        revoked: bool,
    ) -> String {
        let disabled = BTreeSet::new();
        let ctx = Context {
            policy: Some(policy),
            disabled: &disabled,
            appliance: apl(),
            now: Timestamp::from_unix_millis(TUESDAY_NOON),
            template_sha256,
            nonce_used: &|_| false,
            run: &RunSpec::default(),
            same_user: false,
        };
        match evaluate_with(&ctx, req, Authority::PreApproval { pre, runs_used, revoked }) {
            Decision::Allow(p) => {
                assert_eq!(p.pre_approval(), Some("pa-restarts"));
                assert_eq!(p.nonce(), None);
                "allow".into()
            }
            Decision::Deny(r) => format!("deny: {r}"),
        }
    }

    #[test]
    fn secret_output_is_one_predicate_whatever_the_case() {
        let tags = |t: &[&str]| t.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert!(is_secret_output(&tags(&["host:read", "output:secret"])));
        // Templates refuse such spellings; requests and stored rows from elsewhere may not.
        assert!(is_secret_output(&tags(&["Output:Secret"])));
        assert!(!is_secret_output(&tags(&["output:secrets", "secret"])));
    }

    #[test]
    fn a_constraint_that_closes_its_own_anchoring_is_refused_even_when_the_customer_signed_it() {
        let mut body = pre_approval(|_| {}).body().clone();
        body.constraints.insert("action".into(), "restart)|(.*".into());
        let env = Envelope::new(PRE_APPROVAL_PAYLOAD_TYPE, serde_json::to_vec(&body).unwrap()).sign(&key(1));
        let err = verify_pre_approval(env.to_json().as_bytes(), &[key(1).public()], 1).unwrap_err();
        assert!(matches!(err, GrantError::Malformed(_)), "{err}");
    }

    #[test]
    fn pre_approval_covers_only_its_template_runs_window_and_values() {
        let all = policy(ALL, "");
        let req = request("svc", Phase::Operate);
        let sha = "cd".repeat(32);
        let pre = pre_approval(|_| {});
        assert_eq!(decide_pre(&all, &req, &pre, &sha, 0, false), "allow");
        assert_eq!(decide_pre(&all, &req, &pre, &sha, 2, false), "allow");
        let outside = |why: &str| format!("deny: pre-approval pa-restarts does not cover this request: {why}");
        assert_eq!(decide_pre(&all, &req, &pre, &sha, 3, false), outside("its runs are spent"));
        assert_eq!(
            decide_pre(&all, &req, &pre, &"00".repeat(32), 0, false),
            outside("the template changed since it was pre-approved")
        );
        assert_eq!(
            decide_pre(&all, &req, &pre, &sha, 0, true),
            "deny: pre-approval pa-restarts was revoked by the customer"
        );
        let mut stop = req.clone();
        stop.args.insert("action".into(), "stop".into());
        assert_eq!(
            decide_pre(&all, &stop, &pre, &sha, 0, false),
            outside("variable `action` does not meet its constraint")
        );
        let mut missing = req.clone();
        missing.args.clear();
        assert_eq!(
            decide_pre(&all, &missing, &pre, &sha, 0, false),
            outside("variable `action` does not meet its constraint")
        );
        let other_template = pre_approval(|p| p.template = "db-dump".into());
        assert_eq!(decide_pre(&all, &req, &other_template, &sha, 0, false), outside("it is for another template"));
        let elsewhere = pre_approval(|p| p.appliance = ApplianceId::from_random([1; 16]));
        assert_eq!(decide_pre(&all, &req, &elsewhere, &sha, 0, false), outside("it is for another appliance"));
        let expired = pre_approval(|p| p.not_after = Timestamp::from_unix_millis(TUESDAY_NOON));
        assert_eq!(decide_pre(&all, &req, &expired, &sha, 0, false), outside("it has expired"));
        let later = pre_approval(|p| p.not_before = Timestamp::from_unix_millis(TUESDAY_NOON + 1));
        assert_eq!(decide_pre(&all, &req, &later, &sha, 0, false), outside("it is not valid yet"));
        let deploy = pre_approval(|p| p.phase = Phase::Deploy);
        assert_eq!(decide_pre(&all, &req, &deploy, &sha, 0, false), outside("it is for another phase"));
        // Deny rules still beat a pre-approval.
        let deny = policy(ALL, "[[deny]]\nid = \"no-restart\"\nkind = \"svc\"\nargs = { action = \"restart\" }\n");
        assert_eq!(decide_pre(&deny, &req, &pre, &sha, 0, false), "deny: denied by customer rule `no-restart`");
        // Two approvers required, one signed.
        let two = policy_signed(ALL, "approvals_required = 2", &[1, 2]);
        assert_eq!(
            decide_pre(&two, &req, &pre, &sha, 0, false),
            "deny: the grant has 1 of the 2 customer approvals the policy requires"
        );
    }

    #[test]
    fn malformed_pre_approvals_are_refused_at_verification() {
        let sign = |body: serde_json::Value| {
            Envelope::new(PRE_APPROVAL_PAYLOAD_TYPE, serde_json::to_vec(&body).unwrap()).sign(&key(1)).to_json()
        };
        let good = serde_json::to_value(pre_approval(|_| {}).body().clone()).unwrap();
        let mut bad_regex = good.clone();
        bad_regex["constraints"]["action"] = "(".into();
        let mut bad_id = good.clone();
        bad_id["id"] = "../etc".into();
        let mut backwards = good.clone();
        backwards["not_after"] = backwards["not_before"].clone();
        for bad in [bad_regex, bad_id, backwards] {
            assert!(matches!(
                verify_pre_approval(sign(bad).as_bytes(), &[key(1).public()], 1),
                Err(GrantError::Malformed(_))
            ));
        }
        assert!(matches!(
            verify_pre_approval(sign(good).as_bytes(), &[key(2).public()], 1),
            Err(GrantError::Signature(DsseError::NotEnoughSignatures { .. }))
        ));
    }
}
