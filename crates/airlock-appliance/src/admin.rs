//! The customer's local control of the appliance: a Unix socket in the state directory.
//!
//! Only the appliance's owner can reach it (socket mode 0600 in a 0700 directory); it is not a
//! network socket, and the vendor has no path to it. One JSON request per connection, one
//! JSON reply. Phase switches are persisted in the state directory, audited, and take effect
//! at once for every later decision.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use airlock_core::audit::{AuditAction, Outcome};
use airlock_core::customer_key::CustomerPublicKey;
use airlock_core::dsse::Envelope;
use airlock_core::operation::AckCode;
use airlock_core::operation::{RELEASE_PAYLOAD_TYPE, ReleaseDecision, ReleaseStatement};
use airlock_core::policy::{Phase, VerifiedPolicy};
use airlock_core::{ApplianceId, OperationId, Timestamp};
use airlock_proto::convert::ack_code_from_wire;
use airlock_proto::gateway::{ApplianceMessage, OperationAck, OperationAckKind};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::ApplianceError;
use crate::audit_log::AuditLog;
use crate::customer::{PolicyRefused, PolicySource};
use crate::nonces::NonceStore;
use crate::ops_store::{OpState, OpStore, ReleaseItem};
use crate::preapprovals::PreApprovalStore;
use crate::state_dir::StateDir;

pub const SOCKET_FILE: &str = "admin.sock";
const DISABLED_FILE: &str = "disabled-phases.json";
/// The largest request the socket reads: envelopes are a few KiB.
const MAX_REQUEST_BYTES: u64 = 1 << 20;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Status,
    Phase {
        phase: Phase,
        enabled: bool,
    },
    /// Local operations, newest first.
    Operations,
    /// One operation's output, decrypted for the customer on this host (audited).
    Output {
        id: OperationId,
    },
    /// The customer's signed release or withholding of one operation's output.
    Release {
        envelope: serde_json::Value,
    },
    PreApprovalAdd {
        envelope: serde_json::Value,
    },
    PreApprovalRevoke {
        id: String,
    },
    PreApprovals,
    /// A newly signed customer policy.
    Policy {
        envelope: serde_json::Value,
    },
    /// The appliance's own copy of one operation's manifest.
    Manifest {
        id: OperationId,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    pub policy_serial: Option<u64>,
    pub policy_digest: Option<String>,
    /// Phases the customer's policy enables.
    pub policy_phases: Vec<Phase>,
    /// Phases switched off on this host.
    pub disabled: Vec<Phase>,
    /// What the vendor may use now: policy phases minus disabled ones.
    pub effective: Vec<Phase>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Ok(serde_json::Value),
    Error(String),
}

/// A clock: the appliance's wall clock, or a test's.
pub type Clock = Arc<dyn Fn() -> Timestamp + Send + Sync>;

/// An operation whose process runs now, so the customer's revocation can kill it.
struct Running {
    phase: Phase,
    /// Its process group (the shell's pid: it leads its own group).
    pgid: i32,
    cancelled: Arc<AtomicBool>,
}

/// The customer-controlled state decisions are made from.
pub struct LocalControl {
    pub policy: RwLock<Option<VerifiedPolicy>>,
    disabled: RwLock<BTreeSet<Phase>>,
    state: StateDir,
    pub(crate) audit: Arc<AuditLog>,
    pinned: Vec<CustomerPublicKey>,
    /// Spent grant nonces (durable).
    pub nonces: NonceStore,
    pub pre_approvals: PreApprovalStore,
    pub ops: OpStore,
    running: Mutex<HashMap<OperationId, Running>>,
    /// The current stream to the control plane, while connected.
    outbound: Mutex<Option<tokio::sync::mpsc::Sender<ApplianceMessage>>>,
    /// One sender at a time: the outbox resent at a (re)connect goes out whole, results first,
    /// before anything sent after it (a release must never reach the control plane before its
    /// result).
    sending: tokio::sync::Mutex<()>,
    /// The last policy envelope relayed by the control plane that was refused (its digest),
    /// with the digest of the policy then in force: the same again is not audited again.
    refused_relay: Mutex<Option<(String, Option<String>)>>,
    /// This appliance, once enrolled.
    appliance: RwLock<Option<ApplianceId>>,
    /// Its environment, once enrolled: a policy must not name another.
    environment: RwLock<Option<airlock_core::EnvironmentId>>,
    clock: Clock,
}

impl LocalControl {
    pub fn new(
        state_dir: &Path,
        policy: Option<VerifiedPolicy>,
        audit: Arc<AuditLog>,
        pinned: Vec<CustomerPublicKey>,
    ) -> Result<Self, ApplianceError> {
        Self::with_clock(state_dir, policy, audit, pinned, Arc::new(crate::now))
    }

    pub fn with_clock(
        state_dir: &Path,
        policy: Option<VerifiedPolicy>,
        audit: Arc<AuditLog>,
        pinned: Vec<CustomerPublicKey>,
        clock: Clock,
    ) -> Result<Self, ApplianceError> {
        let state = StateDir::open(state_dir)?;
        let disabled = match state.read_optional(DISABLED_FILE)? {
            Some(text) => serde_json::from_str(&text)
                .map_err(|e| ApplianceError::Customer(format!("{DISABLED_FILE} in the state directory: {e}")))?,
            None => BTreeSet::new(),
        };
        Ok(Self {
            policy: RwLock::new(policy),
            disabled: RwLock::new(disabled),
            nonces: NonceStore::open(state_dir, clock())?,
            pre_approvals: PreApprovalStore::open(state_dir)?,
            ops: OpStore::open(state_dir)?,
            state,
            audit,
            pinned,
            running: Mutex::new(HashMap::new()),
            outbound: Mutex::new(None),
            sending: tokio::sync::Mutex::new(()),
            refused_relay: Mutex::new(None),
            appliance: RwLock::new(None),
            environment: RwLock::new(None),
            clock,
        })
    }

    pub fn now(&self) -> Timestamp {
        (self.clock)()
    }

    pub fn pinned(&self) -> &[CustomerPublicKey] {
        &self.pinned
    }

    pub fn audit_log(&self) -> &AuditLog {
        &self.audit
    }

    pub(crate) fn set_identity(&self, identity: &airlock_core::ApplianceIdentity) {
        *self.appliance.write().unwrap_or_else(|e| e.into_inner()) = Some(identity.appliance);
        *self.environment.write().unwrap_or_else(|e| e.into_inner()) = Some(identity.environment);
    }

    fn environment(&self) -> Option<airlock_core::EnvironmentId> {
        *self.environment.read().unwrap_or_else(|e| e.into_inner())
    }

    fn appliance(&self) -> Option<ApplianceId> {
        *self.appliance.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Distinct customer signatures an approval, pre-approval or release needs.
    pub fn threshold(&self) -> usize {
        let policy = self.policy.read().unwrap_or_else(|e| e.into_inner());
        policy.as_ref().map_or(1, |p| p.document().approvals_required.max(1))
    }

    /// Phases switched off on this host.
    pub fn disabled(&self) -> BTreeSet<Phase> {
        self.disabled.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Phases the vendor may use now.
    pub fn effective_phases(&self) -> BTreeSet<Phase> {
        let disabled = self.disabled.read().unwrap_or_else(|e| e.into_inner());
        let policy = self.policy.read().unwrap_or_else(|e| e.into_inner());
        let enabled: BTreeSet<Phase> = match policy.as_ref() {
            Some(p) => p.document().phases.clone(),
            None => [Phase::Observe].into(),
        };
        enabled.difference(&disabled).copied().collect()
    }

    pub fn status(&self) -> Status {
        let policy = self.policy.read().unwrap_or_else(|e| e.into_inner());
        let disabled = self.disabled.read().unwrap_or_else(|e| e.into_inner()).iter().copied().collect();
        Status {
            policy_serial: policy.as_ref().map(VerifiedPolicy::serial),
            policy_digest: policy.as_ref().map(VerifiedPolicy::digest_hex),
            policy_phases: policy.as_ref().map(|p| p.document().phases.iter().copied().collect()).unwrap_or_default(),
            disabled,
            effective: self.effective_phases().into_iter().collect(),
        }
    }

    /// Switches a phase on this host. The new set is saved and audited before it takes effect,
    /// so what is in force is always what is on disk and in the audit. Operations of a phase
    /// switched off are killed at once.
    pub fn set_phase(&self, phase: Phase, enabled: bool) -> Result<Status, ApplianceError> {
        {
            let mut disabled = self.disabled.write().unwrap_or_else(|e| e.into_inner());
            let mut next = disabled.clone();
            let changed = if enabled { next.remove(&phase) } else { next.insert(phase) };
            if changed {
                let json = serde_json::to_vec(&next).map_err(|e| ApplianceError::Internal(e.to_string()))?;
                self.state.write_private(DISABLED_FILE, &json)?;
            }
            let action = if enabled { AuditAction::PhaseEnable } else { AuditAction::PhaseDisable };
            self.audit.record(action, Outcome::Success, serde_json::json!({ "phase": phase, "changed": changed }))?;
            *disabled = next;
        }
        tracing::info!(?phase, enabled, "phase switched by the customer on this host");
        self.cancel_ineffective();
        Ok(self.status())
    }

    /// Loads a newly signed policy (the checks made at start); running operations of phases it
    /// no longer enables are killed.
    pub fn load_policy(&self, envelope_json: &[u8]) -> Result<Status, ApplianceError> {
        self.apply_policy(envelope_json, PolicySource::Host).map_err(|e| ApplianceError::Customer(e.to_string()))
    }

    fn apply_policy(&self, envelope_json: &[u8], source: PolicySource) -> Result<Status, PolicyRefused> {
        {
            let mut policy = self.policy.write().unwrap_or_else(|e| e.into_inner());
            let next = crate::customer::accept_policy(
                &self.state,
                &self.pinned,
                envelope_json,
                policy.as_ref(),
                &self.audit,
                source,
                self.environment(),
            )?;
            *policy = Some(next);
        }
        self.cancel_ineffective();
        Ok(self.status())
    }

    /// A signed policy relayed by the control plane (`PolicyUpdate`): applied exactly as one
    /// loaded on this host. The policy in force again (the control plane sends it after every
    /// connect) is a no-op, and so is the same refused envelope again while the same policy is
    /// in force: neither is audited again. Returns the new status if it changed anything.
    pub fn relayed_policy(&self, envelope_json: &[u8]) -> Result<Option<Status>, ApplianceError> {
        let current = self.status().policy_digest;
        if let Ok(envelope) = Envelope::from_json(envelope_json)
            && current.as_deref() == Some(airlock_core::operation::sha256_hex(&envelope.payload).as_str())
        {
            return Ok(None);
        }
        let seen = (airlock_core::operation::sha256_hex(envelope_json), current);
        let mut refused = self.refused_relay.lock().unwrap_or_else(|e| e.into_inner());
        if refused.as_ref() == Some(&seen) {
            return Ok(None);
        }
        match self.apply_policy(envelope_json, PolicySource::ControlPlane) {
            Ok(status) => {
                *refused = None;
                Ok(Some(status))
            }
            // Only a policy that can never apply is remembered as refused; one that failed to
            // be stored is tried again when the control plane sends it again.
            Err(e @ PolicyRefused::Invalid(_)) => {
                *refused = Some(seen);
                Err(ApplianceError::Customer(e.to_string()))
            }
            Err(e @ PolicyRefused::Failed(_)) => Err(ApplianceError::Customer(e.to_string())),
        }
    }

    /// Registers a started operation. If its phase is no longer in force (it changed since the
    /// decision), it is killed at once.
    pub(crate) fn register_running(&self, id: OperationId, phase: Phase, pgid: i32, cancelled: Arc<AtomicBool>) {
        self.running.lock().unwrap_or_else(|e| e.into_inner()).insert(id, Running { phase, pgid, cancelled });
        self.cancel_ineffective();
    }

    /// Forgets a finished operation, killing whatever it left behind in its process group.
    pub(crate) fn unregister_running(&self, id: OperationId) {
        if let Some(r) = self.running.lock().unwrap_or_else(|e| e.into_inner()).remove(&id) {
            kill_group(r.pgid);
        }
    }

    /// Kills every running operation whose phase is not in force now.
    pub fn cancel_ineffective(&self) {
        let effective = self.effective_phases();
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        for (id, r) in running.iter() {
            if !effective.contains(&r.phase) && !r.cancelled.swap(true, Ordering::SeqCst) {
                tracing::warn!(request_id = %id, phase = ?r.phase, "phase revoked by the customer: killing the operation");
                kill_group(r.pgid);
            }
        }
    }

    /// Kills every running operation (the appliance is stopping): none outlives the appliance,
    /// and the next start records them as cancelled.
    pub fn kill_all_running(&self) {
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        for (id, r) in running.iter() {
            r.cancelled.store(true, Ordering::SeqCst);
            tracing::warn!(request_id = %id, "the appliance is stopping: killing the operation");
            kill_group(r.pgid);
        }
    }

    /// The process group of a running operation.
    pub fn running_group(&self, id: OperationId) -> Option<i32> {
        self.running.lock().unwrap_or_else(|e| e.into_inner()).get(&id).map(|r| r.pgid)
    }

    /// Ids of operations whose process runs now.
    pub fn running_ids(&self) -> Vec<OperationId> {
        self.running.lock().unwrap_or_else(|e| e.into_inner()).keys().copied().collect()
    }

    pub(crate) fn set_outbound(&self, tx: Option<tokio::sync::mpsc::Sender<ApplianceMessage>>) {
        *self.outbound.lock().unwrap_or_else(|e| e.into_inner()) = tx;
    }

    /// Sends to the control plane if connected, after any resend in progress; what is in the
    /// outbox goes again at reconnect.
    pub(crate) async fn send(&self, msg: ApplianceMessage) {
        let _one_sender = self.sending.lock().await;
        let tx = self.outbound.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(tx) = tx {
            let _ = tx.send(msg).await;
        }
    }

    /// A stream to the control plane is up: it becomes the outbound stream, and everything
    /// the control plane has not acknowledged goes on it, every result before any release,
    /// before any other message can be sent.
    pub(crate) async fn connected(&self, tx: tokio::sync::mpsc::Sender<ApplianceMessage>) {
        let _one_sender = self.sending.lock().await;
        self.set_outbound(Some(tx.clone()));
        match self.ops.pending() {
            Ok(msgs) => {
                if !msgs.is_empty() {
                    tracing::info!(count = msgs.len(), "resending unacknowledged operation results and releases");
                }
                for m in msgs {
                    if tx.send(m).await.is_err() {
                        break;
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot read the outbox"),
        }
    }

    /// What the control plane did with a result or release, by its code (the text beside it
    /// is for people and never read).
    ///
    /// - Stored: the item leaves the outbox. When a result is stored, the release of the same
    ///   operation waiting in the outbox is returned, to send now (the control plane takes no
    ///   release before its result, so one sent early is waiting for this).
    /// - Retry: not stored yet (a release that reached the control plane before its result):
    ///   it stays in the outbox and goes again after its result.
    /// - Refused: final, and audited. A refused result can never be followed by its release:
    ///   both are parked (kept on disk, out of the outbox) instead of being resent on every
    ///   reconnect. A refused release is parked too.
    /// - A code this build does not know, or none: the item stays in the outbox, never taken
    ///   as stored, and the error is logged and audited.
    #[must_use = "a release waiting for this result must be sent"]
    pub fn on_ack(&self, ack: &OperationAck) -> Option<ApplianceMessage> {
        let release = ack.kind == OperationAckKind::Release as i32;
        let kind = if release { "release" } else { "result" };
        let Ok(id) = ack.request_id.parse::<OperationId>() else {
            tracing::warn!(request_id = %ack.request_id, "ignoring an acknowledgement of something that is not an operation");
            return None;
        };
        let code = match ack_code_from_wire(ack.code) {
            Ok(code) => code,
            Err(unknown) => {
                tracing::error!(request_id = %id, kind, error = %unknown, "the control plane answered with an ack this appliance does not understand; keeping the item to send again");
                let detail = serde_json::json!({ "request_id": id, "kind": kind, "reason": unknown.to_string(), "error": ack.error });
                if let Err(e) = self.audit.record(AuditAction::OperationError, Outcome::Error, detail) {
                    tracing::error!(error = %e, "cannot audit an unknown acknowledgement");
                }
                return None;
            }
        };
        match code {
            AckCode::Retry => {
                tracing::warn!(request_id = %id, kind, error = %ack.error, "the control plane cannot take this yet; keeping it to send again");
                None
            }
            AckCode::Refused => {
                tracing::error!(request_id = %id, kind, error = %ack.error, "the control plane refused an operation message for good");
                if let Err(e) = self.audit.record(
                    AuditAction::OperationAckRefused,
                    Outcome::Error,
                    serde_json::json!({ "request_id": id, "kind": kind, "error": ack.error }),
                ) {
                    tracing::error!(error = %e, "cannot audit a refused acknowledgement; keeping the outbox item");
                    return None;
                }
                let parked = if release { self.ops.park_release(id) } else { self.ops.park(id) };
                match parked {
                    Ok(true) => self.audit_parked(id, &ack.error),
                    Ok(false) => {}
                    Err(e) => tracing::error!(request_id = %id, kind, error = %e, "cannot park a refused outbox item"),
                }
                None
            }
            AckCode::Stored => {
                if let Err(e) = self.ops.acknowledge(id, release) {
                    tracing::error!(error = %e, "cannot drop an acknowledged outbox item");
                }
                if release {
                    return None;
                }
                match self.ops.queued_release(id) {
                    Ok(next) => next,
                    Err(e) => {
                        tracing::error!(request_id = %id, error = %e, "cannot read a queued release");
                        None
                    }
                }
            }
        }
    }

    fn audit_parked(&self, id: OperationId, error: &str) {
        tracing::warn!(request_id = %id, error, "the control plane refused this operation for good; parking its release");
        if let Err(e) = self.audit.record(
            AuditAction::OperationReleaseParked,
            Outcome::Error,
            serde_json::json!({ "request_id": id, "reason": error }),
        ) {
            tracing::error!(error = %e, "cannot audit a parked release");
        }
    }

    /// Local operations, newest first.
    pub fn operations(&self) -> Result<serde_json::Value, ApplianceError> {
        let list: Vec<serde_json::Value> = self.ops.list()?.iter().map(|r| r.summary()).collect();
        Ok(serde_json::Value::Array(list))
    }

    /// One operation's output, for the customer on this host.
    pub fn output(&self, id: OperationId) -> Result<serde_json::Value, ApplianceError> {
        let record = self.finished(id)?;
        let output = self.ops.open_output(id)?;
        self.audit.record(
            AuditAction::OperationOutputRead,
            Outcome::Success,
            serde_json::json!({ "request_id": id, "output_sha256": record.output_sha256, "output_size": record.output_size }),
        )?;
        Ok(serde_json::json!({
            "id": id,
            "output_base64": data_encoding::BASE64.encode(&output),
            "output_sha256": record.output_sha256,
            "output_size": record.output_size,
            "truncated": record.output_truncated,
            "data_tags": record.data_tags,
        }))
    }

    fn finished(&self, id: OperationId) -> Result<crate::ops_store::OpRecord, ApplianceError> {
        let record = self
            .ops
            .record(id)?
            .ok_or_else(|| ApplianceError::Customer(format!("no operation {id} on this appliance")))?;
        if !matches!(record.state, OpState::Executed | OpState::Cancelled) || record.output_sha256.is_none() {
            return Err(ApplianceError::Customer(format!("operation {id} has no output (it is {:?})", record.state)));
        }
        Ok(record)
    }

    /// Verifies and applies the customer's release or withholding of one output, and queues it
    /// for the control plane. Returns the message to send (none when the release is parked:
    /// the control plane refused the operation's result for good).
    pub fn release(
        &self,
        envelope_json: &[u8],
    ) -> Result<(serde_json::Value, Option<ApplianceMessage>), ApplianceError> {
        let refuse = |why: String| {
            let _ = self.audit.record(
                AuditAction::OperationReleaseRefused,
                Outcome::Denied,
                serde_json::json!({ "reason": why }),
            );
            ApplianceError::Customer(why)
        };
        let envelope = Envelope::from_json(envelope_json).map_err(|e| refuse(format!("release envelope: {e}")))?;
        let verified = envelope
            .verify(RELEASE_PAYLOAD_TYPE, &self.pinned, self.threshold())
            .map_err(|e| refuse(format!("the release does not verify with the pinned customer keys: {e}")))?;
        let statement: ReleaseStatement = serde_json::from_slice(&verified.payload)
            .map_err(|e| refuse(format!("the release statement is malformed: {e}")))?;
        let id = statement.request_id;
        let record = self.finished(id).map_err(|e| refuse(e.to_string()))?;
        if statement.appliance != record.appliance {
            return Err(refuse(format!("the release is for appliance {}, not this one", statement.appliance)));
        }
        if Some(&statement.output_sha256) != record.output_sha256.as_ref()
            || Some(statement.output_size) != record.output_size
        {
            return Err(refuse(format!(
                "the release names output {} ({} bytes), but operation {id} produced {} ({} bytes)",
                statement.output_sha256,
                statement.output_size,
                record.output_sha256.as_deref().unwrap_or("-"),
                record.output_size.unwrap_or(0)
            )));
        }
        if statement.decision == ReleaseDecision::Release && record.is_secret() {
            return Err(refuse(format!(
                "operation {id} is tagged `{}`: its output never leaves this host; you can withhold it, not release it",
                airlock_core::operation::SECRET_OUTPUT_TAG
            )));
        }
        // Checked and decided under the store's lock: of two decisions at once, one holds.
        let now = self.now();
        let record = self.ops.update_record(id, |r| {
            if let Some(done) = r.release {
                return Err(refuse(format!("the output of {id} was already decided ({done:?})")));
            }
            if r.released_by_pre_approval {
                return Err(refuse(format!(
                    "the output of {id} was already released under a commands-and-output pre-approval"
                )));
            }
            let mut manifest =
                self.ops.manifest(id)?.ok_or_else(|| refuse(format!("operation {id} has no manifest")))?;
            manifest.release = Some(envelope.clone());
            self.ops.save_manifest(&manifest)?;
            r.release = Some(statement.decision);
            r.updated_at = now;
            Ok(())
        })?;
        let action = match statement.decision {
            ReleaseDecision::Release => AuditAction::OperationReleased,
            ReleaseDecision::Withhold => AuditAction::OperationWithheld,
        };
        self.audit.record(
            action,
            Outcome::Success,
            serde_json::json!({
                "request_id": id,
                "output_sha256": statement.output_sha256,
                "output_size": statement.output_size,
                "signed_by": verified.signed_by,
                "approver": statement.approver,
            }),
        )?;
        let item = ReleaseItem {
            request_id: id,
            release_envelope_json: envelope.to_json(),
            with_output: statement.decision == ReleaseDecision::Release,
        };
        if !self.ops.queue_release(&item)? {
            self.audit_parked(id, "the control plane refused this operation's result for good");
            return Ok((record.summary(), None));
        }
        let msg = self.ops.release_message(&item)?;
        Ok((record.summary(), Some(msg)))
    }

    pub fn pre_approval_add(&self, envelope_json: &[u8]) -> Result<serde_json::Value, ApplianceError> {
        let refuse = |why: String| {
            let _ =
                self.audit.record(AuditAction::PreApprovalAdd, Outcome::Denied, serde_json::json!({ "reason": why }));
            ApplianceError::Customer(why)
        };
        let envelope = Envelope::from_json(envelope_json).map_err(|e| refuse(format!("pre-approval envelope: {e}")))?;
        let verified = airlock_core::grant::verify_pre_approval(envelope_json, &self.pinned, self.threshold())
            .map_err(|e| refuse(format!("the pre-approval does not verify with the pinned customer keys: {e}")))?;
        let body = verified.body().clone();
        if let Some(me) = self.appliance()
            && body.appliance != me
        {
            return Err(refuse(format!("the pre-approval is for appliance {}, not this one ({me})", body.appliance)));
        }
        let entry = self.pre_approvals.add(envelope, body.clone(), self.now()).map_err(|e| refuse(e.to_string()))?;
        self.audit.record(
            AuditAction::PreApprovalAdd,
            Outcome::Success,
            serde_json::json!({
                "id": body.id, "template": body.template, "phase": body.phase, "level": body.level,
                "max_runs": body.max_runs, "not_before": body.not_before, "not_after": body.not_after,
                "digest": body.digest_hex(), "signed_by": verified.signed_by(),
            }),
        )?;
        Ok(entry.summary())
    }

    pub fn pre_approval_revoke(&self, id: &str) -> Result<serde_json::Value, ApplianceError> {
        let entry = self
            .pre_approvals
            .revoke(id, self.now())?
            .ok_or_else(|| ApplianceError::Customer(format!("no pre-approval `{id}` on this appliance")))?;
        self.audit.record(AuditAction::PreApprovalRevoke, Outcome::Success, serde_json::json!({ "id": id }))?;
        Ok(entry.summary())
    }

    pub fn pre_approvals(&self) -> serde_json::Value {
        serde_json::Value::Array(self.pre_approvals.list().iter().map(|e| e.summary()).collect())
    }

    pub fn manifest(&self, id: OperationId) -> Result<serde_json::Value, ApplianceError> {
        let m = self.ops.manifest(id)?.ok_or_else(|| ApplianceError::Customer(format!("no manifest for {id}")))?;
        serde_json::to_value(m).map_err(|e| ApplianceError::Internal(e.to_string()))
    }

    /// Answers one admin request.
    pub async fn handle(&self, request: Request) -> Result<serde_json::Value, ApplianceError> {
        let value = |s: Status| serde_json::to_value(s).map_err(|e| ApplianceError::Internal(e.to_string()));
        let bytes = |v: &serde_json::Value| serde_json::to_vec(v).map_err(|e| ApplianceError::Internal(e.to_string()));
        match request {
            Request::Status => value(self.status()),
            Request::Phase { phase, enabled } => value(self.set_phase(phase, enabled)?),
            Request::Operations => self.operations(),
            Request::Output { id } => self.output(id),
            Request::Release { envelope } => {
                let (reply, msg) = self.release(&bytes(&envelope)?)?;
                if let Some(msg) = msg {
                    self.send(msg).await;
                }
                Ok(reply)
            }
            Request::PreApprovalAdd { envelope } => self.pre_approval_add(&bytes(&envelope)?),
            Request::PreApprovalRevoke { id } => self.pre_approval_revoke(&id),
            Request::PreApprovals => Ok(self.pre_approvals()),
            Request::Policy { envelope } => value(self.load_policy(&bytes(&envelope)?)?),
            Request::Manifest { id } => self.manifest(id),
        }
    }
}

/// Kills a whole process group at once.
pub(crate) fn kill_group(pgid: i32) {
    if pgid <= 1 {
        return;
    }
    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), nix::sys::signal::Signal::SIGKILL);
}

/// Binds the admin socket (owner-only). Done before the appliance reports itself ready, so a
/// failure to offer the customer's controls stops it.
pub fn bind(socket: &Path) -> Result<tokio::net::UnixListener, ApplianceError> {
    let io = |e: std::io::Error| ApplianceError::Customer(format!("admin socket {}: {e}", socket.display()));
    // A socket file left by a previous run would make bind fail; the state directory lock
    // guarantees no other appliance process is serving it.
    let _ = std::fs::remove_file(socket);
    let listener = tokio::net::UnixListener::bind(socket).map_err(io)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    }
    Ok(listener)
}

/// Serves the admin socket until the task is dropped.
pub async fn serve(control: Arc<LocalControl>, listener: tokio::net::UnixListener) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "admin socket accept failed");
                continue;
            }
        };
        let control = control.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            // One request per connection; a client that sends more is cut off.
            let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_REQUEST_BYTES));
            let reply = match reader.read_line(&mut line).await {
                Ok(_) => match serde_json::from_str::<Request>(&line) {
                    Ok(request) => match control.handle(request).await {
                        Ok(v) => Reply::Ok(v),
                        Err(e) => Reply::Error(e.to_string()),
                    },
                    Err(e) => Reply::Error(format!("malformed request: {e}")),
                },
                Err(e) => Reply::Error(format!("reading request: {e}")),
            };
            let mut text = serde_json::to_string(&reply).unwrap_or_default();
            text.push('\n');
            let _ = write.write_all(text.as_bytes()).await;
        });
    }
}

/// The client side, for `airlock appliance …` on the same host: any request, its JSON answer.
pub async fn call_value(socket: &Path, request: &Request) -> Result<serde_json::Value, ApplianceError> {
    let io = |e: std::io::Error| {
        ApplianceError::Customer(format!("cannot reach the appliance at {}: {e}; is it running?", socket.display()))
    };
    let stream = tokio::net::UnixStream::connect(socket).await.map_err(io)?;
    let (read, mut write) = stream.into_split();
    let mut text = serde_json::to_string(request).map_err(|e| ApplianceError::Internal(e.to_string()))?;
    text.push('\n');
    write.write_all(text.as_bytes()).await.map_err(io)?;
    let mut line = String::new();
    BufReader::new(read).read_line(&mut line).await.map_err(io)?;
    match serde_json::from_str::<Reply>(&line) {
        Ok(Reply::Ok(value)) => Ok(value),
        Ok(Reply::Error(e)) => Err(ApplianceError::Customer(e)),
        Err(e) => Err(ApplianceError::Protocol(format!("admin reply: {e}"))),
    }
}

/// Reads one operation's output over the socket, checked against the digest the appliance
/// signed. Returns the bytes and the reply (digest, size, truncated, data tags).
pub async fn read_output(socket: &Path, id: OperationId) -> Result<(Vec<u8>, serde_json::Value), ApplianceError> {
    let reply = call_value(socket, &Request::Output { id }).await?;
    let bytes = data_encoding::BASE64
        .decode(reply["output_base64"].as_str().unwrap_or_default().as_bytes())
        .map_err(|_| ApplianceError::Protocol("the appliance sent output that is not base64".into()))?;
    if reply["output_sha256"].as_str() != Some(airlock_core::operation::sha256_hex(&bytes).as_str()) {
        return Err(ApplianceError::Protocol("the output read does not match its digest".into()));
    }
    Ok((bytes, reply))
}

/// The client side of `status` and `phase`, for `airlock appliance phase …`.
pub async fn call(socket: &Path, request: &Request) -> Result<Status, ApplianceError> {
    let value = call_value(socket, request).await?;
    serde_json::from_value(value).map_err(|e| ApplianceError::Protocol(format!("admin reply: {e}")))
}
