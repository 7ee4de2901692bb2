//! Deciding about one instruction: what the appliance will do with it, and why.
//!
//! Deciding writes nothing: no audit record, no stored refusal, no spent nonce or pre-approval
//! run.
//! It reads what the appliance holds (the customer's policy, the phases switched off on this
//! host, spent nonces, installed pre-approvals, the operation's own record) and returns a
//! [`Verdict`]; `Executor::act` does what the verdict says.
//! The checks, in order:
//! 1. the instruction's id is an operation id, and the operation is not already answered
//!    (a finished one is answered again from its record: nothing runs twice);
//! 2. the request envelope is signed by the control plane's operations identity: a certificate
//!    of the stored CA whose URI SAN is `spiffe://<trust-domain>/control-plane`;
//! 3. the request names this appliance, tenant and environment, and the appliance re-renders
//!    the command from the template itself: it must equal the signed command and its digest,
//!    and the template's name, phase and data tags must be the request's (the vendor cannot run
//!    text the customer did not see);
//! 4. the customer's authority: the relayed approval (verified with the pinned keys), else
//!    what the policy allows by itself, else an unrevoked pre-approval installed on this host;
//!    `airlock_core::grant::evaluate_with` decides with the host's policy, switched-off
//!    phases, spent nonces and clock, and the content hash of the template the appliance
//!    rendered (deny rules and standing windows may name it).
//!
//! An instruction that does not authenticate is refused and never stored.
//! An authenticated one refused for good is stored, so the same answer is given again.
//! One that nothing authorises yet, or whose approval is not valid yet, waits: nothing is
//! stored, and the control plane asks again.

use airlock_core::customer_key::CustomerPublicKey;
use airlock_core::deploy;
use airlock_core::dsse::Envelope;
use airlock_core::grant::{
    ApprovalDecision, Authority, Basis, Context, Decision, DenyReason, GrantBody, OperationRequest, evaluate_with,
    verify_grant, verify_pre_approval,
};
use airlock_core::operation::{
    AuthorityKind, AuthorityRef, Manifest, RefusalCode, RequestSignatureError, RequestStatement, verify_signed_request,
};
use airlock_core::release::{MAX_STATEMENT_BYTES, VerifiedRelease, verify_release};
use airlock_core::template::{Template, TemplateError};
use airlock_core::{OperationId, Timestamp};
use airlock_proto::gateway::OperationInstruction;

use super::{Executor, Job};
use crate::ApplianceError;
use crate::ops_store::{OpRecord, OpState};
use crate::result::{Refusal, ResultMsg};
use crate::sandbox::RunAs;

/// What to do with one instruction.
#[derive(Debug)]
pub(crate) enum Verdict {
    /// The id is not an operation id: refused under the (bounded, printable) text it gave.
    MalformedId(String),
    /// Already answered: its stored result goes again.
    Answered(ResultMsg),
    /// This process is running it, or recording its run, now: nothing to send.
    InProgress,
    /// Left `running` by a failure to record its run: finish recording it.
    Unrecorded(OperationId),
    /// The instruction does not authenticate, or is not for this id: refused, never stored.
    Unverified(OperationId, Grounds),
    /// Nothing authorises it yet, or its approval is not valid yet: not stored, asked again.
    Awaiting(OperationRequest, Grounds),
    /// Authenticated and refused for good: stored, so the same answer is given again.
    Refused(Box<Refused>),
    /// Allowed: once its authority is spent, it runs.
    Allowed(Box<Allowed>),
}

/// Why an operation does not run (yet): its codes, the sentence for people, and the customer's
/// rule that denied it, if one did (for the local audit).
#[derive(Debug)]
pub(crate) struct Grounds {
    pub(crate) refusal: Refusal,
    pub(crate) reason: String,
    pub(crate) rule: Option<String>,
}

impl Grounds {
    pub(crate) fn new(code: RefusalCode, reason: impl Into<String>) -> Self {
        Self { refusal: Refusal::new(code), reason: reason.into(), rule: None }
    }

    /// What `evaluate_with` denied.
    pub(crate) fn denied(reason: &DenyReason) -> Self {
        let rule = match reason {
            DenyReason::BuiltIn { rule } => Some((*rule).to_owned()),
            DenyReason::DeniedByRule { rule } | DenyReason::RuleVariableMissing { rule, .. } => Some(rule.clone()),
            _ => None,
        };
        Self { refusal: Refusal::denied(reason), reason: reason.to_string(), rule }
    }
}

/// An authenticated request refused for good, as it is stored.
#[derive(Debug)]
pub(crate) struct Refused {
    /// Its record, holding the answer (`result`) given from now on.
    pub(crate) record: OpRecord,
    pub(crate) manifest: Manifest,
    pub(crate) grounds: Grounds,
    /// The customer's signed denial, whose words stay in the local audit.
    pub(crate) customer_denial: Option<GrantBody>,
}

/// An allowed operation: what is recorded before it runs, and the authority it spends.
#[derive(Debug)]
pub(crate) struct Allowed {
    /// Its record, `running` under the authority that allowed it.
    pub(crate) record: OpRecord,
    pub(crate) job: Job,
    pub(crate) spend: Spend,
}

/// The single-use part of an operation's authority, spent durably before it runs.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Spend {
    /// The policy allows it by itself (a standing window, an Observe probe): nothing to spend.
    Nothing,
    /// The customer's approval: its nonce is recorded as used.
    Nonce { nonce: String, not_after: Timestamp },
    /// A pre-approval installed on this host: one of its runs is counted.
    PreApprovalRun { id: String },
}

impl Executor {
    /// Decides about one instruction from what the appliance holds now, and writes nothing.
    /// An error is a local failure to read (a damaged record): nothing is decided.
    pub(crate) fn decide(&self, instruction: &OperationInstruction) -> Result<Verdict, ApplianceError> {
        let Ok(id) = instruction.request_id.parse::<OperationId>() else {
            return Ok(Verdict::MalformedId(short(&instruction.request_id)));
        };
        if let Some(record) = self.control.ops.record(id)? {
            if record.state == OpState::Running {
                return Ok(if self.is_active(id) { Verdict::InProgress } else { Verdict::Unrecorded(id) });
            }
            if let Some(result) = record.result {
                return Ok(Verdict::Answered(result));
            }
        }
        let now = self.control.now();
        let (statement, envelope) = match self.verify_request(id, instruction, now) {
            Ok(v) => v,
            Err(why) => return Ok(Verdict::Unverified(id, why)),
        };
        // The request is authenticated from here: refusals are stored and answered again.
        let req = statement.request.clone();
        let mut manifest = Manifest::new(id, envelope, instruction.control_plane_certificate_pem.clone());
        let record = OpRecord::new(&req, OpState::Refused, now);
        let refused =
            |record, manifest, grounds| Ok(Verdict::Refused(Box::new(refusal(record, manifest, grounds, None))));
        let bound = match self.check_binding(instruction, &statement) {
            Ok(b) => b,
            Err(why) => return refused(record, manifest, why),
        };

        let policy = self.control.policy.read().unwrap_or_else(|e| e.into_inner()).clone();
        let disabled = self.control.disabled();
        let threshold = policy.as_ref().map_or(1, |p| p.document().approvals_required.max(1));
        let policy_digest = policy.as_ref().map(|p| p.digest_hex());
        let nonces = &self.control.nonces;
        let nonce_used = |n: &str| nonces.is_used(n);
        let ctx = Context {
            policy: policy.as_ref(),
            disabled: &disabled,
            appliance: self.identity.appliance,
            now,
            // The appliance's own render: deny rules and windows see the template it loaded.
            template_sha256: bound.template_sha256(),
            nonce_used: &nonce_used,
            // Checked above to be the appliance's own render.
            run: &statement.command.run,
            same_user: self.sandbox.run_as() == RunAs::Appliance,
        };
        let pinned = &self.control.pinned()[..];
        let allowed = |mut record: OpRecord, manifest, authority: AuthorityRef, pre_approval, spend, limits| {
            record.state = OpState::Running;
            record.authority = Some(authority.clone());
            let release = bound.release();
            let job = Job { id, statement: statement.clone(), manifest, authority, pre_approval, limits, release };
            Ok(Verdict::Allowed(Box::new(Allowed { record, job, spend })))
        };

        // 1. The customer's approval (or denial), relayed by the control plane.
        if !instruction.approval_envelope_json.is_empty() {
            let approval = match Envelope::from_json(instruction.approval_envelope_json.as_bytes()) {
                Ok(e) => e,
                Err(e) => {
                    let why = Grounds::new(RefusalCode::Malformed, format!("the approval is malformed: {e}"));
                    return refused(record, manifest, why);
                }
            };
            manifest.approval = Some(approval);
            let grant = match verify_grant(instruction.approval_envelope_json.as_bytes(), pinned, threshold) {
                Ok(g) => g,
                Err(e) => {
                    let why = format!("the approval does not verify with the pinned customer keys: {e}");
                    return refused(record, manifest, Grounds::new(RefusalCode::ApprovalInvalid, why));
                }
            };
            let g = grant.body().clone();
            let customer_denied = |record, manifest, g| {
                let grounds = Grounds::denied(&DenyReason::CustomerDenied);
                Ok(Verdict::Refused(Box::new(refusal(record, manifest, grounds, Some(g)))))
            };
            let binds = g.request_id == req.id && g.request_digest == req.digest_hex() && g.appliance == req.appliance;
            if g.decision == ApprovalDecision::Deny && binds {
                return customer_denied(record, manifest, g);
            }
            return match evaluate_with(&ctx, &req, Authority::Grant(&grant)) {
                Decision::Allow(permit) => {
                    let spend = match permit.nonce() {
                        Some(nonce) => Spend::Nonce { nonce: nonce.to_owned(), not_after: g.not_after },
                        None => Spend::Nothing,
                    };
                    let authority = authority_ref(permit.basis(), Some(g.digest_hex()), policy_digest);
                    allowed(record, manifest, authority, None, spend, permit.limits())
                }
                Decision::Deny(DenyReason::CustomerDenied) => customer_denied(record, manifest, g),
                // Not final: the control plane sends the instruction again (on reconnect), and
                // from `not_before` on the same approval can hold.
                Decision::Deny(DenyReason::GrantNotYetValid { not_before }) => {
                    let grounds = Grounds {
                        refusal: Refusal::not_yet_valid(not_before),
                        reason: format!("the approval is not valid until {not_before}"),
                        rule: None,
                    };
                    Ok(Verdict::Awaiting(req, grounds))
                }
                Decision::Deny(reason) => refused(record, manifest, Grounds::denied(&reason)),
            };
        }

        // 2. No approval: what the policy allows by itself, else a pre-approval. A release the
        // customer's policy does not pin the signing key of (`release_keys`) was verified only
        // with keys the control plane relayed: only the customer's approval of this very
        // request, which names its digest, may deploy it or run its task.
        let pinned_release = policy.as_ref().is_some_and(|p| !p.document().release_keys.is_empty());
        if matches!(bound, Bound::Release(_) | Bound::Task(_)) && !pinned_release {
            let why = "the customer's policy pins no release key (release_keys), so only the customer's approval of this request may deploy a release or run its task";
            if let Decision::Deny(reason) = evaluate_with(&ctx, &req, Authority::None)
                && !matches!(reason, DenyReason::NoMatchingGrant | DenyReason::RootNeedsApproval)
            {
                return refused(record, manifest, Grounds::denied(&reason));
            }
            return Ok(Verdict::Awaiting(req, Grounds::new(RefusalCode::AwaitingAuthority, why)));
        }
        match evaluate_with(&ctx, &req, Authority::None) {
            Decision::Allow(permit) => {
                let authority = authority_ref(permit.basis(), None, policy_digest);
                allowed(record, manifest, authority, None, Spend::Nothing, permit.limits())
            }
            // A pre-approval may cover it (root too, which no window covers).
            Decision::Deny(DenyReason::NoMatchingGrant | DenyReason::RootNeedsApproval) => {
                let mut misses = Vec::new();
                for entry in self.control.pre_approvals.candidates(&req.kind) {
                    let pre = match verify_pre_approval(entry.envelope.to_json().as_bytes(), pinned, threshold) {
                        Ok(p) => p,
                        Err(e) => {
                            misses.push(format!("pre-approval {} does not verify: {e}", entry.body.id));
                            continue;
                        }
                    };
                    let authority =
                        Authority::PreApproval { pre: &pre, runs_used: entry.runs_used, revoked: entry.revoked };
                    match evaluate_with(&ctx, &req, authority) {
                        Decision::Allow(permit) => {
                            let body = pre.body();
                            manifest.pre_approval = Some(entry.envelope.clone());
                            let authority = AuthorityRef {
                                kind: AuthorityKind::PreApproval,
                                digest: Some(body.digest_hex()),
                                policy_digest,
                            };
                            let pre_approval = Some((entry.envelope.clone(), body.level));
                            let spend = Spend::PreApprovalRun { id: body.id.clone() };
                            return allowed(record, manifest, authority, pre_approval, spend, permit.limits());
                        }
                        Decision::Deny(reason) => misses.push(reason.to_string()),
                    }
                }
                let mut reason = DenyReason::NoMatchingGrant.to_string();
                for m in &misses {
                    reason.push_str("; ");
                    reason.push_str(m);
                }
                Ok(Verdict::Awaiting(req, Grounds::new(RefusalCode::AwaitingAuthority, reason)))
            }
            Decision::Deny(reason) => refused(record, manifest, Grounds::denied(&reason)),
        }
    }

    /// The request envelope: signed by the control plane's operations identity, for this id.
    fn verify_request(
        &self,
        id: OperationId,
        instruction: &OperationInstruction,
        now: Timestamp,
    ) -> Result<(RequestStatement, Envelope), Grounds> {
        let malformed = |why: String| Grounds::new(RefusalCode::Malformed, why);
        let envelope = Envelope::from_json(instruction.request_envelope_json.as_bytes())
            .map_err(|e| malformed(format!("the request envelope is malformed: {e}")))?;
        let statement = verify_signed_request(
            &envelope,
            &instruction.control_plane_certificate_pem,
            &self.ca_der,
            Some(now),
            Some(&self.identity.trust_domain),
        )
        .map_err(|e| match e {
            RequestSignatureError::Malformed(_) => malformed(e.to_string()),
            RequestSignatureError::Signature(_) | RequestSignatureError::NotControlPlane => {
                Grounds::new(RefusalCode::Unauthenticated, e.to_string())
            }
        })?;
        if statement.request.id != id {
            return Err(Grounds::new(RefusalCode::Misbound, "the signed request has another id than the instruction"));
        }
        Ok((statement, envelope))
    }

    /// The request is for us, and the signed command is exactly what the template renders (or,
    /// for a deploy, exactly the deploy of the release sent with it).
    fn check_binding(
        &self,
        instruction: &OperationInstruction,
        statement: &RequestStatement,
    ) -> Result<Bound, Grounds> {
        let misbound = |why: String| Grounds::new(RefusalCode::Misbound, why);
        let req = &statement.request;
        if req.appliance != self.identity.appliance {
            return Err(misbound(DenyReason::AnotherAppliance.to_string()));
        }
        if statement.tenant != self.identity.tenant || statement.environment != self.identity.environment {
            return Err(misbound("the request is for another tenant or environment".into()));
        }
        // The environment the customer's approval names, not only the vendor's statement.
        if req.environment != Some(self.identity.environment) {
            return Err(misbound("the request the customer signs does not name this environment".into()));
        }
        // The host: appliance ids are the vendor's to hand out, so two hosts may share one.
        // Once the customer attested this host's execution key, a request must name it; until
        // then, a request naming any key cannot be for this host.
        let own = self.control.attested_key_id();
        if req.execution_key != own {
            let why = match &req.execution_key {
                None => "approved for another host: the request names no execution key, but the customer attested this host's (the control plane names it once the appliance has reconnected)".to_owned(),
                Some(named) => format!(
                    "approved for another host: the request names execution key {}, which is not this host's attested key",
                    short(named)
                ),
            };
            return Err(misbound(why));
        }
        if deploy::is_deploy(req) || deploy::is_task(req) {
            return self.check_release(instruction, statement);
        }
        // A template can never pass for one of the appliance's own probes (which Observe runs
        // without a signature): `Template::new` refuses their names, and the request's kind
        // must be the template's name (checked below).
        // Core's limits bound this work; a template over one is refused with its own code, so
        // the vendor sees why and the appliance never spends more than they allow.
        let template =
            Template::new(&instruction.template_manifest_toml, &instruction.template_script).map_err(|e| match e {
                TemplateError::Limit(_) => Grounds::new(RefusalCode::LimitExceeded, e.to_string()),
                other => misbound(format!("the template does not load: {other}")),
            })?;
        let rendered =
            template.render(&req.args).map_err(|e| misbound(format!("the request's variables do not render: {e}")))?;
        if rendered != statement.command {
            return Err(misbound("the signed command is not what the template renders".into()));
        }
        if rendered.sha256() != req.command_sha256 {
            return Err(misbound("the command does not hash to the request's command_sha256".into()));
        }
        let m = template.manifest();
        if m.name != req.kind || m.phase != req.phase || m.data_tags != req.data_tags {
            return Err(misbound("the template's name, phase or data tags differ from the request's".into()));
        }
        Ok(Bound::Template(Box::new(template)))
    }

    /// A deploy's release: signed by a release key the vendor registered (relayed with it) and
    /// the customer's policy accepts, valid, and exactly what the signed request deploys.
    fn check_release(
        &self,
        instruction: &OperationInstruction,
        statement: &RequestStatement,
    ) -> Result<Bound, Grounds> {
        let unverified = |why: String| Grounds::new(RefusalCode::ReleaseUnverified, why);
        if instruction.release_envelope_json.len() > MAX_STATEMENT_BYTES * 2 {
            return Err(unverified("the release envelope is over its size limit".into()));
        }
        let envelope = Envelope::from_json(instruction.release_envelope_json.as_bytes())
            .map_err(|e| unverified(format!("the release envelope is malformed: {e}")))?;
        let relayed = instruction
            .release_key_pems
            .iter()
            .take(MAX_RELAYED_RELEASE_KEYS)
            .filter_map(|pem| CustomerPublicKey::from_pem(pem).ok())
            .collect();
        let policy = self.control.policy.read().unwrap_or_else(|e| e.into_inner()).clone();
        let keys = deploy::accepted_release_keys(policy.as_ref().map(|p| p.document()), relayed);
        if keys.is_empty() {
            return Err(unverified(
                "no release key both registered by the vendor and accepted by the customer's policy".into(),
            ));
        }
        let release = verify_release(&envelope, &keys).map_err(|e| unverified(format!("the release: {e}")))?;
        let (req, command) = (&statement.request, &statement.command);
        if deploy::is_task(req) {
            deploy::check_task_binding(req, command, &release).map_err(|e| unverified(e.to_string()))?;
            return Ok(Bound::Task(Box::new(release)));
        }
        deploy::check_deploy_binding(req, command, &release).map_err(|e| unverified(e.to_string()))?;
        Ok(Bound::Release(Box::new(release)))
    }
}

/// What a request was checked against: the template the appliance rendered, the release a
/// deploy installs, or the release whose task it runs.
#[derive(Debug)]
enum Bound {
    Template(Box<Template>),
    Release(Box<VerifiedRelease>),
    Task(Box<VerifiedRelease>),
}

impl Bound {
    /// What deny rules and windows see as the template's content hash.
    fn template_sha256(&self) -> &str {
        match self {
            Bound::Template(t) => t.content_sha256(),
            Bound::Release(_) => DEPLOY_TEMPLATE_SHA256.get_or_init(deploy::deploy_template_sha256),
            Bound::Task(_) => TASK_TEMPLATE_SHA256.get_or_init(deploy::task_template_sha256),
        }
    }

    fn release(&self) -> Option<Box<VerifiedRelease>> {
        match self {
            Bound::Template(_) => None,
            Bound::Release(r) | Bound::Task(r) => Some(r.clone()),
        }
    }
}

static DEPLOY_TEMPLATE_SHA256: std::sync::OnceLock<String> = std::sync::OnceLock::new();
static TASK_TEMPLATE_SHA256: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Most release keys taken from one instruction (a workspace has few).
const MAX_RELAYED_RELEASE_KEYS: usize = 64;

/// An authenticated request refused for good: its record holds the answer given from now on.
pub(crate) fn refusal(
    mut record: OpRecord,
    manifest: Manifest,
    grounds: Grounds,
    customer_denial: Option<GrantBody>,
) -> Refused {
    record.state = OpState::Refused;
    // A refused operation ran on no authority, whatever was decided before the refusal.
    record.authority = None;
    record.refusal_reason = Some(grounds.reason.clone());
    record.result = Some(ResultMsg::refused(record.id, grounds.refusal.clone(), grounds.reason.clone()));
    Refused { record, manifest, grounds, customer_denial }
}

/// What authorised a run, as the execution statement names it.
fn authority_ref(basis: &Basis, grant_digest: Option<String>, policy_digest: Option<String>) -> AuthorityRef {
    let (kind, digest) = match basis {
        Basis::Grant { .. } => (AuthorityKind::Grant, grant_digest),
        Basis::PreApproval { .. } => (AuthorityKind::PreApproval, None),
        Basis::StandingWindow => (AuthorityKind::StandingWindow, None),
        Basis::ObservePhase => (AuthorityKind::Probe, None),
    };
    AuthorityRef { kind, digest, policy_digest }
}

/// Ids come from the vendor's side: audit and logs get a bounded, printable form.
pub(crate) fn short(id: &str) -> String {
    id.chars().filter(|c| !c.is_control()).take(80).collect()
}
