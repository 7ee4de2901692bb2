//! The executor: what the appliance does with an `OperationInstruction` from the control plane.
//!
//! Nothing from the control plane is taken on its word.
//! Instructions are handled one at a time, each in these steps:
//! 1. `decide` checks it and returns a `Verdict`, writing nothing;
//! 2. [`Executor::act`] does what the verdict says: it audits the instruction and the
//!    decision, stores a final refusal (so the same answer is given again), and for an allowed
//!    operation spends the grant's nonce or counts the pre-approval run, durably, and records
//!    the operation `running`, all before anything runs;
//! 3. `run` runs the script in its box (`crate::sandbox`);
//! 4. `record` seals the output, signs the execution into the chain and queues the result;
//! 5. `recover` finishes whatever a stop or a failure to write left half done.
//!
//! Every step is in the local audit log; refusals carry the failed check or rule, never
//! customer data.
//! A request already finished is answered with its stored result: nothing runs twice.

mod decide;
mod deploy;
mod record;
mod recover;
mod run;
#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};

use airlock_core::audit::anchor::Anchor;
use airlock_core::audit::{AuditAction, Outcome as AuditOutcome};
use airlock_core::dsse::Envelope;
use airlock_core::grant::{ApprovalLevel, DenyReason};
use airlock_core::operation::{AuthorityRef, Manifest, RefusalCode, RequestStatement, pem_certificate_der};
use airlock_core::{ApplianceIdentity, OperationId};
use airlock_proto::gateway::{
    ApplianceMessage, OperationInstruction, OperationOutcome, OperationResult, appliance_message,
};

use crate::ApplianceError;
use crate::control::LocalControl;
use crate::ops_store::OpRecord;
use crate::result::ResultMsg;
use crate::sandbox::Sandbox;
use crate::state_dir::StateDir;
use decide::{Allowed, Grounds, Refused, Spend, Verdict, short};
pub(crate) use deploy::{DeployOptions, TELEMETRY_EVERY};
use record::not_recorded;

/// What became of an instruction.
#[derive(Debug)]
pub(crate) enum Handled {
    /// The answer to send now.
    Reply(ResultMsg),
    /// The instruction's id is not an operation id: refused and audited, answered under the
    /// (bounded) text it gave.
    MalformedId(OperationResult),
    /// Allowed and started; the task ends with the result, already queued and sent.
    Started(
        // The session lets the run finish on its own; tests await it.
        #[cfg_attr(not(test), allow(dead_code))] tokio::task::JoinHandle<ResultMsg>,
    ),
    /// Nothing to send now: it is running, or a local failure (logged) left it undecided.
    Nothing,
}

impl Handled {
    /// What to send the control plane now, if anything.
    pub(crate) fn reply(&self) -> Option<ApplianceMessage> {
        match self {
            Handled::Reply(result) => Some(result.to_message()),
            Handled::MalformedId(result) => {
                Some(ApplianceMessage { body: Some(appliance_message::Body::OperationResult(result.clone())) })
            }
            Handled::Started(_) | Handled::Nothing => None,
        }
    }
}

/// What acting on a verdict left to do.
enum Acted {
    Reply(ResultMsg),
    MalformedId(OperationResult),
    Run(Box<Job>),
    Nothing,
}

/// An allowed operation, ready to run: everything its run and its record need.
#[derive(Debug)]
pub(crate) struct Job {
    id: OperationId,
    statement: RequestStatement,
    manifest: Manifest,
    authority: AuthorityRef,
    /// The pre-approval it runs under, if any, and its level.
    pre_approval: Option<(Envelope, ApprovalLevel)>,
    /// What its run may use, as the decision settled it.
    limits: airlock_core::run_spec::RunLimits,
    /// For a deploy (or a release task): its release, verified and bound to the signed request.
    release: Option<Box<airlock_core::release::VerifiedRelease>>,
}

pub(crate) struct Executor {
    control: Arc<LocalControl>,
    identity: ApplianceIdentity,
    ca_der: Vec<u8>,
    state: StateDir,
    /// Decisions are made and acted on one at a time: a nonce or a pre-approval run is spent once.
    deciding: Mutex<()>,
    /// Operations this process started and has not finished recording. One recorded `running`
    /// but not here was left by a stop or by a failure to record it: it is recovered.
    active: Mutex<HashSet<OperationId>>,
    /// The box every run (and every release's service) goes in.
    sandbox: Arc<Sandbox>,
    /// The deploy engine and what it needs; `None` where it cannot open (the releases
    /// directory is unusable): deploys then fail to start, scripts still run.
    deployments: Option<deploy::Deployments>,
}

/// Audits each box the usage watch kills: its cell (an operation's id, or a service's cell
/// name) and why. A script's execution is recorded `over-limit` besides.
fn audit_box_kills(control: Arc<LocalControl>) -> crate::sandbox::usage::OnKill {
    Arc::new(move |cell, why| {
        let recorded = control.audit.record(
            AuditAction::BoxOverLimit,
            AuditOutcome::Success,
            serde_json::json!({ "cell": cell, "reason": why.to_string() }),
        );
        if let Err(e) = recorded {
            tracing::error!(cell, error = %e, "cannot audit a box killed over its limits");
        }
    })
}

impl Executor {
    pub(crate) fn new(
        control: Arc<LocalControl>,
        state_dir: &Path,
        identity: ApplianceIdentity,
        ca_pem: &str,
        box_user: Option<&str>,
        disk: &crate::config::BoxDisk,
        deploy_options: DeployOptions,
    ) -> Result<Self, ApplianceError> {
        let ca_der = pem_certificate_der(ca_pem).map_err(|e| ApplianceError::Customer(format!("ca.pem: {e}")))?;
        control.set_identity(&identity);
        let sandbox = Arc::new(Sandbox::open(state_dir, box_user, disk).map_err(ApplianceError::Customer)?);
        // The usage watch, once per appliance; it ends with the sandbox. (No runtime: a test
        // that only decides, never runs.)
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(sandbox.watcher(crate::sandbox::usage::EVERY, audit_box_kills(control.clone())));
        }
        control.set_vendor_code_user(sandbox.vendor_code_user());
        control.set_cloud_metadata(sandbox.cloud_metadata());
        let deployments = match deploy::Deployments::open(sandbox.clone(), state_dir, deploy_options) {
            Ok(d) => {
                // Deploy switched off: a deploy still waiting for its services rolls back.
                let watched = control.clone();
                let switched_off = move || deploy::deploy_switched_off(&watched);
                d.deployer.abort_when(crate::deploy::Abort(Arc::new(switched_off)));
                Some(d)
            }
            Err(e) => {
                tracing::error!(error = %e, "releases cannot be deployed on this appliance");
                None
            }
        };
        Ok(Self {
            control,
            identity,
            ca_der,
            state: StateDir::open(state_dir)?,
            deciding: Mutex::new(()),
            active: Mutex::new(HashSet::new()),
            sandbox,
            deployments,
        })
    }

    /// The box, to change how it runs vendor code; the deploy engine (which shares it) goes.
    #[cfg(test)]
    pub(crate) fn sandbox_mut(&mut self) -> &mut Sandbox {
        self.deployments = None;
        Arc::get_mut(&mut self.sandbox).expect("no run in progress")
    }

    /// Where the run of `id` works, while it runs.
    #[cfg(test)]
    pub(crate) fn workdir(&self, id: OperationId) -> std::path::PathBuf {
        self.sandbox.workdir(id)
    }

    pub(crate) fn control(&self) -> &Arc<LocalControl> {
        &self.control
    }

    /// Decides about one instruction (off the async threads) and starts it if allowed.
    pub(crate) async fn handle(self: &Arc<Self>, instruction: OperationInstruction) -> Handled {
        let this = self.clone();
        match tokio::task::spawn_blocking(move || this.act(&instruction)).await {
            Ok(Acted::Reply(r)) => Handled::Reply(r),
            Ok(Acted::MalformedId(r)) => Handled::MalformedId(r),
            Ok(Acted::Nothing) => Handled::Nothing,
            Ok(Acted::Run(job)) => {
                let this = self.clone();
                Handled::Started(tokio::spawn(async move { this.run(*job).await }))
            }
            Err(e) => {
                tracing::error!(error = %e, "operation decision task failed");
                Handled::Nothing
            }
        }
    }

    /// Decides about one instruction and does what the decision says, one at a time.
    fn act(&self, instruction: &OperationInstruction) -> Acted {
        let _one_at_a_time = self.deciding.lock().unwrap_or_else(|e| e.into_inner());
        match self.act_inner(instruction) {
            Ok(acted) => acted,
            Err(e) => {
                // A local failure (disk): decide nothing; the control plane asks again.
                tracing::error!(request_id = %short(&instruction.request_id), error = %e, "cannot decide about an operation");
                let _ = self.control.audit.record(
                    AuditAction::OperationError,
                    AuditOutcome::Error,
                    serde_json::json!({ "request_id": short(&instruction.request_id), "reason": e.to_string() }),
                );
                Acted::Nothing
            }
        }
    }

    fn act_inner(&self, instruction: &OperationInstruction) -> Result<Acted, ApplianceError> {
        let audit = &self.control.audit;
        audit.record(
            AuditAction::OperationReceived,
            AuditOutcome::Success,
            serde_json::json!({ "request_id": short(&instruction.request_id), "with_approval": !instruction.approval_envelope_json.is_empty() }),
        )?;
        // A pre-approval the customer revoked (or whose last run went) between deciding and
        // spending is not spent: decide again, from what the appliance holds now.
        for _ in 0..MAX_DECISIONS {
            return match self.decide(instruction)? {
                Verdict::Allowed(allowed) => {
                    let Allowed { record, job, spend } = *allowed;
                    match self.spend(&spend)? {
                        Spent::Yes => self.start(record, job),
                        Spent::Replayed => {
                            let grounds = Grounds::denied(&DenyReason::NonceReplayed);
                            self.store_refusal(decide::refusal(record, job.manifest, grounds, None))
                        }
                        Spent::Gone => continue,
                    }
                }
                Verdict::Refused(refused) => self.store_refusal(*refused),
                Verdict::MalformedId(id) => {
                    let why = "the request id is malformed";
                    tracing::warn!(request_id = %id, reason = %why, "refusing an operation instruction");
                    let _ = audit.record(
                        AuditAction::OperationRefused,
                        AuditOutcome::Denied,
                        serde_json::json!({ "request_id": id, "reason": why }),
                    );
                    Ok(Acted::MalformedId(OperationResult {
                        request_id: id,
                        outcome: OperationOutcome::Refused as i32,
                        reason: why.into(),
                        refusal_code: airlock_proto::convert::refusal_code_to_wire(RefusalCode::Malformed) as i32,
                        ..Default::default()
                    }))
                }
                Verdict::Answered(result) => {
                    tracing::info!(request_id = %result.request_id, "operation already finished; sending its stored result again");
                    Ok(Acted::Reply(result))
                }
                Verdict::InProgress => Ok(Acted::Nothing),
                // Left `running` by a failure to record it: finish recording it now. A release
                // it queued goes with the outbox, after its result.
                Verdict::Unrecorded(id) => Ok(match self.recover(id, None, false)? {
                    Some((result, _)) => Acted::Reply(result),
                    None => Acted::Nothing,
                }),
                Verdict::Unverified(id, why) => {
                    tracing::warn!(request_id = %id, reason = %why.reason, "refusing an operation instruction");
                    let _ = audit.record(
                        AuditAction::OperationRefused,
                        AuditOutcome::Denied,
                        serde_json::json!({ "request_id": id, "reason": why.reason }),
                    );
                    Ok(Acted::Reply(ResultMsg::refused(id, why.refusal, why.reason)))
                }
                Verdict::Awaiting(req, why) => {
                    audit.record(
                        AuditAction::OperationAwaitingApproval,
                        AuditOutcome::Success,
                        serde_json::json!({ "request_id": req.id, "template": req.kind, "phase": req.phase, "reason": why.reason }),
                    )?;
                    Ok(Acted::Reply(ResultMsg::refused(req.id, why.refusal, why.reason)))
                }
            };
        }
        Err(ApplianceError::Internal("the pre-approvals on this host kept changing while deciding".into()))
    }

    /// Stores and audits a refusal of an authenticated request, so the same answer is given again.
    fn store_refusal(&self, refused: Refused) -> Result<Acted, ApplianceError> {
        let Refused { record, manifest, grounds, customer_denial } = refused;
        tracing::warn!(request_id = %record.id, reason = %grounds.reason, "refusing an operation");
        if let Some(g) = customer_denial {
            // The customer's own words stay in the local audit; the control plane gets the code.
            let _ = self.control.audit.record(
                AuditAction::OperationCustomerDecision,
                AuditOutcome::Success,
                serde_json::json!({ "request_id": record.id, "approver": g.approver, "reason": g.reason, "decided_at": g.decided_at }),
            );
        }
        let action = match grounds.refusal.code {
            RefusalCode::Denied => AuditAction::OperationDenied,
            RefusalCode::CustomerDenied => AuditAction::OperationDeniedByCustomer,
            RefusalCode::Malformed
            | RefusalCode::Unauthenticated
            | RefusalCode::Misbound
            | RefusalCode::ApprovalInvalid
            | RefusalCode::NotRecorded
            | RefusalCode::LimitExceeded
            | RefusalCode::ReleaseUnverified
            // Sent only for refusals stored before codes existed, never decided now.
            | RefusalCode::Unclassified
            // Not final, so never stored; named here so a new code is a compile error.
            | RefusalCode::AwaitingAuthority
            | RefusalCode::ApprovalNotYetValid => AuditAction::OperationRefused,
        };
        self.control.ops.save_manifest(&manifest)?;
        self.control.ops.save_record(&record)?;
        self.control.audit.record(
            action,
            AuditOutcome::Denied,
            serde_json::json!({
                "request_id": record.id, "template": record.template, "phase": record.phase,
                "reason": grounds.reason, "rule": grounds.rule,
            }),
        )?;
        let result = record.result.ok_or_else(|| ApplianceError::Internal("a refusal without its answer".into()))?;
        Ok(Acted::Reply(result))
    }

    /// Spends the single-use part of an allowed operation's authority, durably.
    fn spend(&self, spend: &Spend) -> Result<Spent, ApplianceError> {
        Ok(match spend {
            Spend::Nothing => Spent::Yes,
            Spend::Nonce { nonce, not_after } => {
                if self.control.nonces.consume(nonce, *not_after)? {
                    Spent::Yes
                } else {
                    Spent::Replayed
                }
            }
            Spend::PreApprovalRun { id } => match self.control.pre_approvals.take_run(id)? {
                Some(runs_used) => {
                    // Saved first, then recorded: a crash between leaves the file ahead, which
                    // the next start records (`anchors`).
                    self.control.audit.anchor(&Anchor::PreApprovalRuns { id: id.clone(), runs_used })?;
                    Spent::Yes
                }
                None => Spent::Gone,
            },
        })
    }

    /// Records the allowed operation `running` (durably) before anything runs.
    fn start(&self, record: OpRecord, job: Job) -> Result<Acted, ApplianceError> {
        self.control.ops.save_manifest(&job.manifest)?;
        self.control.ops.save_record(&record)?;
        self.active.lock().unwrap_or_else(|e| e.into_inner()).insert(record.id);
        self.control.audit.record(
            AuditAction::OperationAllowed,
            AuditOutcome::Success,
            serde_json::json!({
                "request_id": record.id, "template": record.template, "phase": record.phase,
                "data_tags": record.data_tags, "authority": job.authority,
                // Audited at every run: the customer sees when vendor code runs as root or as
                // the appliance's own user.
                "run_as": self.sandbox.run_as_for(job.statement.command.run.user),
                "limits": job.limits,
            }),
        )?;
        Ok(Acted::Run(Box::new(job)))
    }

    fn is_active(&self, id: OperationId) -> bool {
        self.active.lock().unwrap_or_else(|e| e.into_inner()).contains(&id)
    }

    /// Runs an allowed operation, records the run, and sends its result (and, under a
    /// commands-and-output pre-approval, its output).
    async fn run(self: Arc<Self>, job: Job) -> ResultMsg {
        let id = job.id;
        let ran = match &job.release {
            Some(release) if airlock_core::deploy::is_task(&job.statement.request) => {
                self.run_task(&job, release).await
            }
            Some(release) => self.run_deploy(&job, release).await,
            None => self.run_script(&job).await,
        };
        let this = self.clone();
        let recorded = tokio::task::spawn_blocking(move || this.record_or_recover(job, ran)).await;
        // From here a record still `running` is recovered by the next instruction for it.
        self.active.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
        match recorded {
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
}

/// How many times one instruction is decided again when its pre-approval changed between
/// deciding and spending it; each time, the decision sees the change.
const MAX_DECISIONS: usize = 4;

/// What spending an authority came to.
enum Spent {
    Yes,
    /// The grant's nonce was already spent: the approval was used before.
    Replayed,
    /// The pre-approval was revoked, or its last run taken, since the decision.
    Gone,
}
