//! The executor: what the appliance does with an `OperationInstruction`.
//!
//! Nothing from the control plane is taken on its word. For each instruction the executor
//! 1. checks the request envelope was signed by the control plane's operations identity
//!    (a certificate from the stored CA with URI SAN `spiffe://<trust-domain>/control-plane`);
//! 2. checks the request is for this appliance, re-renders the command from the template
//!    itself and requires it to equal the signed command and its digest, and the template's
//!    name, phase and data tags to equal the request's (the vendor cannot run text the
//!    customer did not see);
//! 3. picks the customer's authority: the relayed approval (verified with the pinned keys),
//!    else an unrevoked pre-approval installed on this host, else none, and asks
//!    `airlock_core::grant::evaluate_with` with the host's policy, switched-off phases, spent
//!    nonces and clock;
//! 4. on allow, spends the grant's nonce or counts the pre-approval run durably *before*
//!    running, runs the script with `/bin/sh` in a clean environment and its own process
//!    group (killed whole if the customer revokes its phase), seals the output at rest, signs
//!    an `ExecutionStatement` chained to the previous one, and queues the result in the outbox.
//!
//! Every step is in the local audit log; refusals carry the failed check or rule, never
//! customer data. A request already finished is answered with its stored result: nothing
//! runs twice.

use std::collections::HashSet;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use airlock_core::audit::{AuditAction, Outcome as AuditOutcome};
use airlock_core::dsse::Envelope;
use airlock_core::grant::{
    ApprovalDecision, ApprovalLevel, Authority, Basis, Context, Decision, DenyReason, PreApprovalBody, evaluate_with,
    verify_grant, verify_pre_approval,
};
use airlock_core::operation::{
    AuthorityKind, AuthorityRef, CONTROL_PLANE_SPIFFE_PATH, EXECUTION_PAYLOAD_TYPE, ExecutionStatement,
    ExecutionStatus, Manifest, REQUEST_PAYLOAD_TYPE, RefusalCode, RequestStatement, add_signature, certificate_key_id,
    pem_certificate_der, sha256_hex, signing_input, verify_certified_envelope,
};
use airlock_core::template::Template;
use airlock_core::{ApplianceIdentity, OperationId, Timestamp};
use airlock_proto::gateway::{
    ApplianceMessage, OperationInstruction, OperationOutcome, OperationResult, appliance_message,
};
use tokio::io::AsyncReadExt;

use crate::ApplianceError;
use crate::control::LocalControl;
use crate::files::{self, Mode};
use crate::ops_store::{OpRecord, OpState, ReleaseItem};
use crate::result::{Outcome, Refusal, ResultMsg};
use crate::running::{boot_id, kill_group};
use crate::state_dir::{Credentials, StateDir};

/// The most output kept per operation (stdout, then stderr); the rest is dropped and the
/// execution says `output_truncated`.
pub const MAX_OUTPUT_BYTES: usize = 1 << 20;

/// The only environment a script gets besides its `AIRLOCK_VAR_*` values.
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What became of an instruction.
#[derive(Debug)]
pub enum Handled {
    /// The answer to send now.
    Reply(ResultMsg),
    /// The instruction's id is not an operation id: refused and audited, answered under the
    /// (bounded) text it gave.
    MalformedId(OperationResult),
    /// Allowed and started; the task ends with the result, already queued and sent.
    Started(tokio::task::JoinHandle<ResultMsg>),
    /// Nothing to send now: it is running, or a local failure (logged) left it undecided.
    Nothing,
}

impl Handled {
    /// What to send the control plane now, if anything.
    pub fn reply(&self) -> Option<ApplianceMessage> {
        match self {
            Handled::Reply(result) => Some(result.to_message()),
            Handled::MalformedId(result) => {
                Some(ApplianceMessage { body: Some(appliance_message::Body::OperationResult(result.clone())) })
            }
            Handled::Started(_) | Handled::Nothing => None,
        }
    }
}

enum Decided {
    Reply(ResultMsg),
    MalformedId(OperationResult),
    Run(Box<Job>),
    Nothing,
}

/// How a run ended, kept until it is recorded.
struct Ran {
    status: ExecutionStatus,
    exit_code: Option<i32>,
    output: Vec<u8>,
    truncated: bool,
    started_at: Timestamp,
    finished_at: Timestamp,
}

/// An allowed operation, ready to run.
struct Job {
    id: OperationId,
    statement: RequestStatement,
    manifest: Manifest,
    authority: AuthorityRef,
    pre_approval: Option<(Envelope, ApprovalLevel)>,
}

pub struct Executor {
    control: Arc<LocalControl>,
    identity: ApplianceIdentity,
    ca_der: Vec<u8>,
    state: StateDir,
    /// Decisions are made one at a time: a nonce or a pre-approval run is spent once.
    decide: Mutex<()>,
    /// Operations this process started and has not finished recording. One recorded `running`
    /// but not here was left by a stop or by a failure to record it: it is recovered.
    active: Mutex<HashSet<OperationId>>,
}

impl Executor {
    pub fn new(
        control: Arc<LocalControl>,
        state_dir: &Path,
        identity: ApplianceIdentity,
        ca_pem: &str,
    ) -> Result<Self, ApplianceError> {
        let ca_der = pem_certificate_der(ca_pem).map_err(|e| ApplianceError::Customer(format!("ca.pem: {e}")))?;
        control.set_identity(&identity);
        Ok(Self {
            control,
            identity,
            ca_der,
            state: StateDir::open(state_dir)?,
            decide: Mutex::new(()),
            active: Mutex::new(HashSet::new()),
        })
    }

    pub fn control(&self) -> &Arc<LocalControl> {
        &self.control
    }

    /// Decides about one instruction (off the async threads) and starts it if allowed.
    pub async fn handle(self: &Arc<Self>, instruction: OperationInstruction) -> Handled {
        let this = self.clone();
        match tokio::task::spawn_blocking(move || this.decide(&instruction)).await {
            Ok(Decided::Reply(r)) => Handled::Reply(r),
            Ok(Decided::MalformedId(r)) => Handled::MalformedId(r),
            Ok(Decided::Nothing) => Handled::Nothing,
            Ok(Decided::Run(job)) => {
                let this = self.clone();
                Handled::Started(tokio::spawn(async move { this.run(*job).await }))
            }
            Err(e) => {
                tracing::error!(error = %e, "operation decision task failed");
                Handled::Nothing
            }
        }
    }

    fn decide(&self, instruction: &OperationInstruction) -> Decided {
        let _one_at_a_time = self.decide.lock().unwrap_or_else(|e| e.into_inner());
        match self.decide_inner(instruction) {
            Ok(d) => d,
            Err(e) => {
                // A local failure (disk): decide nothing; the control plane asks again.
                tracing::error!(request_id = %instruction.request_id, error = %e, "cannot decide about an operation");
                let _ = self.control.audit.record(
                    AuditAction::OperationError,
                    AuditOutcome::Error,
                    serde_json::json!({ "request_id": short(&instruction.request_id), "reason": e.to_string() }),
                );
                Decided::Nothing
            }
        }
    }

    fn decide_inner(&self, instruction: &OperationInstruction) -> Result<Decided, ApplianceError> {
        let audit = &self.control.audit;
        audit.record(
            AuditAction::OperationReceived,
            AuditOutcome::Success,
            serde_json::json!({ "request_id": short(&instruction.request_id), "with_approval": !instruction.approval_envelope_json.is_empty() }),
        )?;
        let Ok(id) = instruction.request_id.parse::<OperationId>() else {
            return Ok(self.refuse_malformed_id(&instruction.request_id));
        };
        if let Some(record) = self.control.ops.record(id)? {
            if record.state == OpState::Running {
                if self.is_active(id) {
                    return Ok(Decided::Nothing);
                }
                // Left `running` by a failure to record it: finish recording it now.
                return Ok(match self.recover(id, None, false)? {
                    // A release it queued goes with the outbox, after its result.
                    Some((result, _)) => Decided::Reply(result),
                    None => Decided::Nothing,
                });
            }
            if let Some(result) = record.result {
                tracing::info!(request_id = %id, "operation already finished; sending its stored result again");
                return Ok(Decided::Reply(result));
            }
        }
        let now = self.control.now();
        let (statement, envelope) = match self.verify_request(id, instruction, now) {
            Ok(v) => v,
            Err(why) => return Ok(self.refuse_unverified(id, why)),
        };
        // The request is authenticated from here: refusals are stored and answered again.
        let req = statement.request.clone();
        let mut manifest = Manifest::new(id, envelope, instruction.control_plane_certificate_pem.clone());
        let record = OpRecord {
            id,
            appliance: req.appliance,
            template: req.kind.clone(),
            phase: req.phase,
            data_tags: req.data_tags.clone(),
            state: OpState::Refused,
            received_at: now,
            updated_at: now,
            refusal_reason: None,
            authority: None,
            exit_code: None,
            output_sha256: None,
            output_size: None,
            output_truncated: false,
            release: None,
            released_by_pre_approval: false,
            result: None,
            pgid: None,
            boot_id: None,
        };
        let template = match self.check_binding(instruction, &statement) {
            Ok(t) => t,
            Err(why) => return self.refuse(record, &manifest, why),
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
            nonce_used: &nonce_used,
        };
        let pinned = self.control.pinned();

        // 1. The customer's approval (or denial), relayed by the control plane.
        if !instruction.approval_envelope_json.is_empty() {
            let approval = match Envelope::from_json(instruction.approval_envelope_json.as_bytes()) {
                Ok(e) => e,
                Err(e) => {
                    let why = Grounds::new(RefusalCode::Malformed, format!("the approval is malformed: {e}"));
                    return self.refuse(record, &manifest, why);
                }
            };
            manifest.approval = Some(approval);
            let grant = match verify_grant(instruction.approval_envelope_json.as_bytes(), pinned, threshold) {
                Ok(g) => g,
                Err(e) => {
                    let why = format!("the approval does not verify with the pinned customer keys: {e}");
                    return self.refuse(record, &manifest, Grounds::new(RefusalCode::ApprovalInvalid, why));
                }
            };
            let g = grant.body().clone();
            let binds = g.request_id == req.id && g.request_digest == req.digest_hex() && g.appliance == req.appliance;
            if g.decision == ApprovalDecision::Deny && binds {
                return self.denied_by_customer(record, &manifest, &g);
            }
            return match evaluate_with(&ctx, &req, Authority::Grant(&grant)) {
                Decision::Allow(permit) => {
                    if let Some(nonce) = permit.nonce()
                        && !self.control.nonces.consume(nonce, g.not_after)?
                    {
                        return self.refuse(record, &manifest, Grounds::denied(&DenyReason::NonceReplayed));
                    }
                    let authority = authority_ref(permit.basis(), Some(g.digest_hex()), policy_digest);
                    self.start(record, manifest, statement, authority, None)
                }
                Decision::Deny(DenyReason::CustomerDenied) => self.denied_by_customer(record, &manifest, &g),
                // Not final: the control plane sends the instruction again (on reconnect), and
                // from `not_before` on the same approval can hold.
                Decision::Deny(DenyReason::GrantNotYetValid { not_before }) => self.awaiting(
                    &req,
                    Grounds {
                        refusal: Refusal::not_yet_valid(not_before),
                        reason: format!("the approval is not valid until {not_before}"),
                        rule: None,
                    },
                ),
                Decision::Deny(reason) => self.refuse(record, &manifest, Grounds::denied(&reason)),
            };
        }

        // 2. No approval: what the policy allows by itself, else a pre-approval.
        match evaluate_with(&ctx, &req, Authority::None) {
            Decision::Allow(permit) => {
                let authority = authority_ref(permit.basis(), None, policy_digest);
                self.start(record, manifest, statement, authority, None)
            }
            Decision::Deny(DenyReason::NoMatchingGrant) => {
                let mut misses = Vec::new();
                for entry in self.control.pre_approvals.candidates(&req.kind) {
                    let pre = match verify_pre_approval(entry.envelope.to_json().as_bytes(), pinned, threshold) {
                        Ok(p) => p,
                        Err(e) => {
                            misses.push(format!("pre-approval {} does not verify: {e}", entry.body.id));
                            continue;
                        }
                    };
                    let authority = Authority::PreApproval {
                        pre: &pre,
                        template_sha256: template.content_sha256(),
                        runs_used: entry.runs_used,
                        revoked: entry.revoked,
                    };
                    match evaluate_with(&ctx, &req, authority) {
                        Decision::Allow(_) => {
                            let body = pre.body();
                            // Counted (and synced) before anything runs; a lost race is a miss.
                            if !self.control.pre_approvals.take_run(&body.id)? {
                                misses.push(format!("pre-approval {}: its runs are spent or it was revoked", body.id));
                                continue;
                            }
                            manifest.pre_approval = Some(entry.envelope.clone());
                            let authority = AuthorityRef {
                                kind: AuthorityKind::PreApproval,
                                digest: Some(body.digest_hex()),
                                policy_digest,
                            };
                            return self.start(
                                record,
                                manifest,
                                statement,
                                authority,
                                Some((entry.envelope.clone(), body.level)),
                            );
                        }
                        Decision::Deny(reason) => misses.push(reason.to_string()),
                    }
                }
                let mut reason = DenyReason::NoMatchingGrant.to_string();
                for m in &misses {
                    reason.push_str("; ");
                    reason.push_str(m);
                }
                self.awaiting(&req, Grounds::new(RefusalCode::AwaitingAuthority, reason))
            }
            Decision::Deny(reason) => self.refuse(record, &manifest, Grounds::denied(&reason)),
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
        let certified = verify_certified_envelope(
            &envelope,
            REQUEST_PAYLOAD_TYPE,
            &instruction.control_plane_certificate_pem,
            &self.ca_der,
            now,
        )
        .map_err(|e| {
            Grounds::new(RefusalCode::Unauthenticated, format!("the request signature does not verify: {e}"))
        })?;
        let expected = format!("spiffe://{}{CONTROL_PLANE_SPIFFE_PATH}", self.identity.trust_domain);
        if !certified.uris.contains(&expected) {
            let why = "the request was not signed by the control plane's operations identity";
            return Err(Grounds::new(RefusalCode::Unauthenticated, why));
        }
        let statement: RequestStatement = serde_json::from_slice(&envelope.payload)
            .map_err(|e| malformed(format!("the signed request is malformed: {e}")))?;
        if statement.request.id != id {
            return Err(Grounds::new(RefusalCode::Misbound, "the signed request has another id than the instruction"));
        }
        Ok((statement, envelope))
    }

    /// The request is for us, and the signed command is exactly what the template renders.
    fn check_binding(
        &self,
        instruction: &OperationInstruction,
        statement: &RequestStatement,
    ) -> Result<Template, Grounds> {
        let misbound = |why: String| Grounds::new(RefusalCode::Misbound, why);
        let req = &statement.request;
        if req.appliance != self.identity.appliance {
            return Err(misbound(DenyReason::AnotherAppliance.to_string()));
        }
        if statement.tenant != self.identity.tenant || statement.environment != self.identity.environment {
            return Err(misbound("the request is for another tenant or environment".into()));
        }
        // A template can never pass for one of the appliance's own probes (which Observe runs
        // without a signature): `Template::new` refuses their names, and the request's kind
        // must be the template's name (checked below).
        let template = Template::new(&instruction.template_manifest_toml, &instruction.template_script)
            .map_err(|e| misbound(format!("the template does not load: {e}")))?;
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
        Ok(template)
    }

    /// A refusal of an instruction that did not authenticate: answered, audited, not stored.
    fn refuse_unverified(&self, id: OperationId, why: Grounds) -> Decided {
        tracing::warn!(request_id = %id, reason = %why.reason, "refusing an operation instruction");
        let _ = self.control.audit.record(
            AuditAction::OperationRefused,
            AuditOutcome::Denied,
            serde_json::json!({ "request_id": id, "reason": why.reason }),
        );
        Decided::Reply(ResultMsg::refused(id, why.refusal, why.reason))
    }

    /// An instruction whose id is not an operation id: answered under the text it gave.
    fn refuse_malformed_id(&self, id: &str) -> Decided {
        let why = "the request id is malformed";
        tracing::warn!(request_id = %short(id), reason = %why, "refusing an operation instruction");
        let _ = self.control.audit.record(
            AuditAction::OperationRefused,
            AuditOutcome::Denied,
            serde_json::json!({ "request_id": short(id), "reason": why }),
        );
        Decided::MalformedId(OperationResult {
            request_id: short(id),
            outcome: OperationOutcome::Refused as i32,
            reason: why.into(),
            refusal_code: airlock_proto::convert::refusal_code_to_wire(RefusalCode::Malformed) as i32,
            ..Default::default()
        })
    }

    /// A refusal of an authenticated request: stored, so the same answer is given again.
    fn refuse(&self, mut record: OpRecord, manifest: &Manifest, why: Grounds) -> Result<Decided, ApplianceError> {
        tracing::warn!(request_id = %record.id, reason = %why.reason, "refusing an operation");
        let action = match why.refusal.code {
            RefusalCode::Denied => AuditAction::OperationDenied,
            RefusalCode::CustomerDenied => AuditAction::OperationDeniedByCustomer,
            _ => AuditAction::OperationRefused,
        };
        let result = ResultMsg::refused(record.id, why.refusal, why.reason.clone());
        record.state = OpState::Refused;
        record.refusal_reason = Some(why.reason.clone());
        record.result = Some(result.clone());
        self.control.ops.save_manifest(manifest)?;
        self.control.ops.save_record(&record)?;
        self.control.audit.record(
            action,
            AuditOutcome::Denied,
            serde_json::json!({
                "request_id": record.id, "template": record.template, "phase": record.phase,
                "reason": why.reason, "rule": why.rule,
            }),
        )?;
        Ok(Decided::Reply(result))
    }

    /// Nothing authorises the request yet; nothing is stored, and the control plane sends it
    /// again (with an approval, or once one is valid).
    fn awaiting(&self, req: &airlock_core::grant::OperationRequest, why: Grounds) -> Result<Decided, ApplianceError> {
        self.control.audit.record(
            AuditAction::OperationAwaitingApproval,
            AuditOutcome::Success,
            serde_json::json!({ "request_id": req.id, "template": req.kind, "phase": req.phase, "reason": why.reason }),
        )?;
        Ok(Decided::Reply(ResultMsg::refused(req.id, why.refusal, why.reason)))
    }

    fn denied_by_customer(
        &self,
        record: OpRecord,
        manifest: &Manifest,
        g: &airlock_core::grant::GrantBody,
    ) -> Result<Decided, ApplianceError> {
        // The customer's own words stay in the local audit; the control plane gets the reason code.
        let _ = self.control.audit.record(
            AuditAction::OperationCustomerDecision,
            AuditOutcome::Success,
            serde_json::json!({ "request_id": record.id, "approver": g.approver, "reason": g.reason, "decided_at": g.decided_at }),
        );
        self.refuse(record, manifest, Grounds::denied(&DenyReason::CustomerDenied))
    }

    /// Records the decision (durably) before anything runs.
    fn start(
        &self,
        mut record: OpRecord,
        manifest: Manifest,
        statement: RequestStatement,
        authority: AuthorityRef,
        pre_approval: Option<(Envelope, ApprovalLevel)>,
    ) -> Result<Decided, ApplianceError> {
        record.state = OpState::Running;
        record.authority = Some(authority.clone());
        self.control.ops.save_manifest(&manifest)?;
        self.control.ops.save_record(&record)?;
        self.active.lock().unwrap_or_else(|e| e.into_inner()).insert(record.id);
        self.control.audit.record(
            AuditAction::OperationAllowed,
            AuditOutcome::Success,
            serde_json::json!({
                "request_id": record.id, "template": record.template, "phase": record.phase,
                "data_tags": record.data_tags, "authority": authority,
            }),
        )?;
        Ok(Decided::Run(Box::new(Job { id: record.id, statement, manifest, authority, pre_approval })))
    }

    fn is_active(&self, id: OperationId) -> bool {
        self.active.lock().unwrap_or_else(|e| e.into_inner()).contains(&id)
    }

    async fn run(self: Arc<Self>, job: Job) -> ResultMsg {
        let id = job.id;
        let started_at = self.control.now();
        let cancelled = Arc::new(AtomicBool::new(false));
        let (status, exit_code, output, truncated) = match self.execute(&job, cancelled).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(request_id = %id, error = %e, "the operation could not be started");
                (ExecutionStatus::FailedToStart, None, Vec::new(), false)
            }
        };
        let ran = Ran { status, exit_code, output, truncated, started_at, finished_at: self.control.now() };
        let this = self.clone();
        let finished = tokio::task::spawn_blocking(move || this.finish_run(job, ran)).await;
        // From here a record still `running` is recovered by the next instruction for it.
        self.active.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
        match finished {
            Ok(Some((result, release))) => {
                self.control.outbound.send(result.to_message()).await;
                if let Some(m) = release {
                    self.control.outbound.send(m).await;
                }
                result
            }
            Ok(None) => not_recorded(id),
            Err(e) => self.record_failure(id, &e.to_string()),
        }
    }

    /// Records a run; if that fails (a full disk), tries once more from what is on disk, as
    /// a restart would. `None` leaves it `running`, for the next instruction or start to finish.
    fn finish_run(&self, job: Job, ran: Ran) -> Option<(ResultMsg, Option<ApplianceMessage>)> {
        let id = job.id;
        match self.finish(job, &ran) {
            Ok(done) => return Some(done),
            Err(e) => {
                self.record_failure(id, &e.to_string());
            }
        }
        match self.recover(id, Some(ran), false) {
            Ok(done) => done,
            Err(e) => {
                self.record_failure(id, &e.to_string());
                None
            }
        }
    }

    fn record_failure(&self, id: OperationId, why: &str) -> ResultMsg {
        tracing::error!(request_id = %id, error = %why, "cannot record an execution");
        let _ = self.control.audit.record(
            AuditAction::OperationError,
            AuditOutcome::Error,
            serde_json::json!({ "request_id": id, "reason": why }),
        );
        not_recorded(id)
    }

    /// Runs the script; returns how it ended and its captured output.
    async fn execute(
        &self,
        job: &Job,
        cancelled: Arc<AtomicBool>,
    ) -> Result<(ExecutionStatus, Option<i32>, Vec<u8>, bool), ApplianceError> {
        let dir = self.control.ops.dir(job.id)?;
        let script = dir.join("script.sh");
        files::replace(&script, job.statement.command.script.as_bytes(), Mode::Private)
            .map_err(|e| ApplianceError::Customer(format!("{}: {e}", script.display())))?;
        let mut cmd = tokio::process::Command::new("/bin/sh");
        cmd.arg(&script)
            .env_clear()
            .env("PATH", PATH)
            .envs(&job.statement.command.env)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(request_id = %job.id, error = %e, "cannot start /bin/sh");
                return Ok((ExecutionStatus::FailedToStart, None, Vec::new(), false));
            }
        };
        let pgid = child.id().and_then(|p| i32::try_from(p).ok()).unwrap_or(0);
        self.control.register_running(job.id, job.statement.request.phase, pgid, cancelled.clone());
        // Recorded, so that if this process dies the next one kills the group before it
        // records the operation as cancelled. A group that cannot be recorded does not run.
        let boot = boot_id();
        if let Err(e) = self.control.ops.update_record(job.id, |r| {
            r.pgid = Some(pgid);
            r.boot_id = boot;
            Ok(())
        }) {
            tracing::error!(request_id = %job.id, error = %e, "cannot record the operation's process group; killing it");
            cancelled.store(true, Ordering::SeqCst);
            self.control.unregister_running(job.id);
            let _ = child.wait().await;
            return Ok((ExecutionStatus::Cancelled, None, Vec::new(), false));
        }
        let out = tokio::spawn(capture(child.stdout.take()));
        let err = tokio::spawn(capture(child.stderr.take()));
        let status = child.wait().await;
        // Whatever the script left behind in its group goes with it, so the pipes close.
        self.control.unregister_running(job.id);
        // The group is gone and its id free for reuse: no later recovery may kill by it.
        if let Err(e) = self.control.ops.update_record(job.id, |r| {
            r.pgid = None;
            Ok(())
        }) {
            tracing::warn!(request_id = %job.id, error = %e, "cannot clear the operation's process group");
        }
        let (mut output, out_over) = out.await.unwrap_or_default();
        let (errput, err_over) = err.await.unwrap_or_default();
        output.extend_from_slice(&errput);
        let truncated = out_over || err_over || output.len() > MAX_OUTPUT_BYTES;
        output.truncate(MAX_OUTPUT_BYTES);
        let exit_code = status.ok().and_then(|s| s.code());
        let status =
            if cancelled.load(Ordering::SeqCst) { ExecutionStatus::Cancelled } else { ExecutionStatus::Completed };
        Ok((status, exit_code, output, truncated))
    }

    /// Seals the output, signs the execution into the chain, stores the manifest and queues
    /// the result (and, under a commands-and-output pre-approval, the output).
    fn finish(&self, job: Job, ran: &Ran) -> Result<(ResultMsg, Option<ApplianceMessage>), ApplianceError> {
        let ops = &self.control.ops;
        let id = job.id;
        let Ran { status, exit_code, ref output, truncated, started_at, finished_at } = *ran;
        let output_sha256 = sha256_hex(output);
        let output_size = output.len() as u64;
        ops.seal_output(id, output)?;
        let (_, _, creds) = self.state.load()?;
        let req = &job.statement.request;
        let mut manifest = job.manifest;
        let statement = ops.extend_chain(|sequence, previous_manifest_sha256| {
            let statement = ExecutionStatement {
                request_id: id,
                appliance: req.appliance,
                request_digest: req.digest_hex(),
                command_sha256: req.command_sha256.clone(),
                authority: job.authority.clone(),
                status,
                started_at,
                finished_at,
                exit_code,
                output_sha256: output_sha256.clone(),
                output_size,
                output_truncated: truncated,
                sequence,
                previous_manifest_sha256,
            };
            let envelope = sign_execution(&statement, &creds)?;
            let link = statement.manifest_sha256();
            // On disk before the head names it.
            manifest.execution = Some(envelope);
            manifest.appliance_certificate = Some(creds.cert_pem.clone());
            ops.save_manifest(&manifest)?;
            Ok((statement, link))
        })?;
        self.complete(&manifest, &job.statement, &statement, job.pre_approval.as_ref())
    }

    /// Once the execution is signed and in the manifest: queues the result (and, under a
    /// commands-and-output pre-approval, the output), records and audits the outcome.
    fn complete(
        &self,
        manifest: &Manifest,
        request: &RequestStatement,
        execution: &ExecutionStatement,
        pre_approval: Option<&(Envelope, ApprovalLevel)>,
    ) -> Result<(ResultMsg, Option<ApplianceMessage>), ApplianceError> {
        let ops = &self.control.ops;
        let id = execution.request_id;
        let cancelled = execution.status == ExecutionStatus::Cancelled;
        let mut result = ResultMsg::ran(id, if cancelled { Outcome::Cancelled } else { Outcome::Executed });
        result.execution_envelope_json = manifest.execution.as_ref().map(Envelope::to_json).unwrap_or_default();
        result.appliance_certificate_pem = manifest.appliance_certificate.clone().unwrap_or_default();
        result.pre_approval_envelope_json = pre_approval.map(|(e, _)| e.to_json()).unwrap_or_default();
        let secret = request.request.output_is_secret();
        let auto_release = matches!(pre_approval, Some((_, ApprovalLevel::CommandsAndOutput))) && !secret;
        self.control.outbound.queue_result(&result)?;
        let release = if auto_release {
            let item = ReleaseItem { request_id: id, release_envelope_json: String::new(), with_output: true };
            self.control.outbound.queue_release(&item)?
        } else {
            None
        };
        ops.update_record(id, |r| {
            r.state = if cancelled { OpState::Cancelled } else { OpState::Executed };
            r.exit_code = execution.exit_code;
            r.output_sha256 = Some(execution.output_sha256.clone());
            r.output_size = Some(execution.output_size);
            r.output_truncated = execution.output_truncated;
            r.released_by_pre_approval = auto_release;
            r.result = Some(result.clone());
            r.updated_at = execution.finished_at;
            Ok(())
        })?;
        let action = if cancelled { AuditAction::OperationCancelled } else { AuditAction::OperationExecuted };
        self.control.audit.record(
            action,
            AuditOutcome::Success,
            serde_json::json!({
                "request_id": id, "status": execution.status, "exit_code": execution.exit_code,
                "output_sha256": execution.output_sha256, "output_size": execution.output_size,
                "output_truncated": execution.output_truncated, "sequence": execution.sequence,
            }),
        )?;
        if auto_release {
            self.control.audit.record(
                AuditAction::OperationReleased,
                AuditOutcome::Success,
                serde_json::json!({
                    "request_id": id, "output_sha256": execution.output_sha256,
                    "output_size": execution.output_size, "by": "pre-approval",
                    "digest": execution.authority.digest,
                }),
            )?;
        }
        Ok((result, release))
    }

    /// Operations left `running` by a previous process (it stopped while they ran): what
    /// their scripts left is killed, and they are recorded, signed and reported as cancelled.
    /// One whose execution was already signed (the stop came while it was being recorded) is
    /// completed from its manifest, so the chain has no gap.
    pub fn recover_interrupted(&self) -> Result<usize, ApplianceError> {
        let running = self.control.running_ids();
        let mut recovered = 0;
        for record in self.control.ops.list()? {
            if record.state != OpState::Running || running.contains(&record.id) || self.is_active(record.id) {
                continue;
            }
            match self.recover(record.id, None, true) {
                Ok(Some(_)) => recovered += 1,
                Ok(None) => {}
                // One that cannot be recorded now does not keep the others from it.
                Err(e) => {
                    self.record_failure(record.id, &e.to_string());
                }
            }
        }
        Ok(recovered)
    }

    /// Finishes recording one operation left `running` by this process or a previous one: a
    /// signed execution in its manifest is completed (and the chain head brought up to it);
    /// else it is signed now from `ran`, or, without it (the run is lost), it is signed as
    /// cancelled, after its process group is killed if a previous process (`orphaned`) ran it:
    /// this process killed its own groups when their runs ended, and their ids may be reused.
    /// `None` if its files do not allow it.
    fn recover(
        &self,
        id: OperationId,
        ran: Option<Ran>,
        orphaned: bool,
    ) -> Result<Option<(ResultMsg, Option<ApplianceMessage>)>, ApplianceError> {
        let ops = &self.control.ops;
        let Some(record) = ops.record(id)? else { return Ok(None) };
        if record.state != OpState::Running {
            return Ok(record.result.map(|r| (r, None)));
        }
        let Some(manifest) = ops.manifest(id)? else { return Ok(None) };
        let Ok(statement) = serde_json::from_slice::<RequestStatement>(&manifest.request.payload) else {
            return Ok(None);
        };
        let pre_approval = manifest.pre_approval.clone().and_then(|env| {
            let body: PreApprovalBody = serde_json::from_slice(&env.payload).ok()?;
            Some((env, body.level))
        });
        let signed =
            manifest.execution.as_ref().and_then(|e| serde_json::from_slice::<ExecutionStatement>(&e.payload).ok());
        if let Some(execution) = signed {
            ops.advance_chain(
                execution.sequence,
                execution.previous_manifest_sha256.as_deref(),
                &execution.manifest_sha256(),
            )?;
            return self.complete(&manifest, &statement, &execution, pre_approval.as_ref()).map(Some);
        }
        let Some(authority) = record.authority.clone() else { return Ok(None) };
        let ran = match ran {
            Some(ran) => ran,
            None => {
                // Its script may still run, orphaned: the group goes before it is called cancelled.
                if orphaned
                    && let Some(pgid) = record.pgid
                    && record.boot_id == boot_id()
                {
                    tracing::warn!(request_id = %id, pgid, "killing what an interrupted operation left running");
                    kill_group(pgid);
                }
                self.control.audit.record(
                    AuditAction::OperationInterrupted,
                    AuditOutcome::Error,
                    serde_json::json!({ "request_id": id, "reason": "its run was not recorded: the appliance stopped, or could not write, while it ran" }),
                )?;
                Ran {
                    status: ExecutionStatus::Cancelled,
                    exit_code: None,
                    output: Vec::new(),
                    truncated: false,
                    started_at: record.updated_at,
                    finished_at: self.control.now(),
                }
            }
        };
        let job = Job { id, statement, manifest, authority, pre_approval };
        self.finish(job, &ran).map(Some)
    }
}

/// Why a refusal was decided: its codes, the sentence for people, and the customer's rule
/// that denied it, if one did (for the local audit).
struct Grounds {
    refusal: Refusal,
    reason: String,
    rule: Option<String>,
}

impl Grounds {
    fn new(code: RefusalCode, reason: impl Into<String>) -> Self {
        Self { refusal: Refusal::new(code), reason: reason.into(), rule: None }
    }

    fn denied(reason: &DenyReason) -> Self {
        let rule = match reason {
            DenyReason::BuiltIn { rule } => Some((*rule).to_owned()),
            DenyReason::DeniedByRule { rule } => Some(rule.clone()),
            _ => None,
        };
        Self { refusal: Refusal::denied(reason), reason: reason.to_string(), rule }
    }
}

/// The answer when a run could not be recorded: the control plane asks again later.
fn not_recorded(id: OperationId) -> ResultMsg {
    ResultMsg::refused(id, Refusal::new(RefusalCode::NotRecorded), "the appliance could not record the execution")
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

/// Signs an execution statement with the appliance's current key (ECDSA P-256, DER).
fn sign_execution(statement: &ExecutionStatement, creds: &Credentials) -> Result<Envelope, ApplianceError> {
    use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
    let internal = |what: &str| ApplianceError::Internal(format!("signing the execution: {what}"));
    let payload = serde_json::to_vec(statement).map_err(|e| internal(&e.to_string()))?;
    let envelope = Envelope::new(EXECUTION_PAYLOAD_TYPE, payload);
    let key = rcgen::KeyPair::from_pem(&creds.key_pem).map_err(|_| internal("the appliance key does not load"))?;
    let rng = ring::rand::SystemRandom::new();
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &key.serialize_der(), &rng)
        .map_err(|_| internal("the appliance key is not ECDSA P-256"))?;
    let sig = pair.sign(&rng, &signing_input(&envelope)).map_err(|_| internal("signature failed"))?;
    let cert_der = pem_certificate_der(&creds.cert_pem).map_err(|e| internal(&e.to_string()))?;
    let keyid = certificate_key_id(&cert_der).map_err(|e| internal(&e.to_string()))?;
    Ok(add_signature(envelope, keyid, sig.as_ref().to_vec()))
}

/// Reads a stream to its end, keeping the first [`MAX_OUTPUT_BYTES`]; says if more came.
async fn capture<R: tokio::io::AsyncRead + Unpin>(stream: Option<R>) -> (Vec<u8>, bool) {
    let Some(mut stream) = stream else { return (Vec::new(), false) };
    let mut kept = Vec::new();
    let mut over = false;
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = MAX_OUTPUT_BYTES - kept.len();
                if n > room {
                    over = true;
                }
                kept.extend_from_slice(&chunk[..n.min(room)]);
            }
        }
    }
    (kept, over)
}

/// Ids come from the vendor's side: audit and logs get a bounded, printable form.
fn short(id: &str) -> String {
    id.chars().filter(|c| !c.is_control()).take(80).collect()
}

#[cfg(test)]
mod tests;
