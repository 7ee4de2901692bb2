//! The customer's control of the appliance on its own host: the state every decision is made from.
//!
//! [`LocalControl`] holds the customer's signed policy, the phases switched off on this host,
//! the spent grant nonces, the installed pre-approvals, the operations' records and the
//! process groups of the operations running now.
//! Everything the customer does on the host (through `crate::admin`) changes it; every change
//! is saved and audited with the [`Peer`] that asked, and a phase switch is on disk and in the
//! audit before it takes effect.
//! The vendor reaches it only through what the executor verifies.
//! What the vendor may use now is the policy's phases minus those switched off here; switching
//! a phase off, or loading a policy without it, kills every running operation of that phase.

pub(crate) mod release;
#[cfg(test)]
mod tests;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, RwLock};

use airlock_core::audit::anchor::Anchor;
use airlock_core::audit::{AuditAction, Outcome};
use airlock_core::customer_key::CustomerPublicKey;
use airlock_core::dsse::Envelope;
use airlock_core::execution_key::ExecutionSigningKey;
use airlock_core::operation::OutputCommitment;
use airlock_core::policy::{Phase, VerifiedPolicy};
use airlock_core::{ApplianceId, OperationId, Timestamp};
use serde::{Deserialize, Serialize};

use crate::ApplianceError;
use crate::audit_log::AuditLog;
use crate::clock::Clock;
use crate::customer::{PolicyRefused, PolicySource};
use crate::nonces::NonceStore;
use crate::ops_store::{OpRecord, OpState, OpStore};
use crate::outbound::Outbound;
use crate::preapprovals::PreApprovalStore;
use crate::running::RunningOps;
use crate::state_dir::StateDir;

const DISABLED_FILE: &str = "disabled-phases.json";

/// What is in force on this host, as `status` and `phase` answer it.
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
    /// Who vendor code runs as here; `None` before the appliance has joined and started.
    #[serde(default)]
    pub vendor_code_user: Option<VendorCodeUser>,
    /// Whether the customer's policy accepts Deploy and Operate work run as the appliance's
    /// own user (`same_user` in `[vendor_code]`).
    #[serde(default)]
    pub same_user_accepted: bool,
    /// Whether vendor code can reach the cloud's instance metadata service; `None` before the
    /// appliance has joined and started.
    #[serde(default)]
    pub cloud_metadata: Option<CloudMetadata>,
    /// How many of each service's last log bytes go up with its status, if the customer's policy
    /// opts in (`[telemetry] service_logs`); `None`: the logs stay on this host.
    #[serde(default)]
    pub service_log_tail_bytes: Option<u32>,
    /// Whether the services' metrics go up (`[telemetry] service_metrics`).
    #[serde(default)]
    pub service_metrics_sent: bool,
}

/// Who vendor code runs as on this appliance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VendorCodeUser {
    /// Its dedicated unprivileged user and group.
    BoxUser { uid: u32, gid: u32 },
    /// The appliance's own user: the appliance is not root, so it cannot switch users.
    ApplianceUser,
}

/// Whether vendor code can reach the cloud's instance metadata service (169.254.169.254 and
/// the like), which hands the host's cloud credentials to whoever asks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CloudMetadata {
    /// Out of every box's reach: refused at connect and send.
    Fenced,
    /// Within reach, where the host has one: the fence could not be set up, for `why`.
    Reachable { why: String },
}

/// Who asked, on this host: the admin socket's peer, as the kernel reported it when it
/// connected (`crate::admin::access` admits it). Every change made at its request is audited
/// with it, as `"peer": {"uid": …, "pid": …}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub(crate) struct Peer {
    pub(crate) uid: u32,
    /// `None` when the peer is in another PID namespace (the kernel reports 0 then).
    pub(crate) pid: Option<u32>,
}

impl Peer {
    /// `detail` with the peer added, for an audit record written at its request.
    pub(crate) fn stamp(self, mut detail: serde_json::Value) -> serde_json::Value {
        detail["peer"] = serde_json::json!(self);
        detail
    }
}

/// The customer-controlled state decisions are made from.
pub(crate) struct LocalControl {
    pub(crate) policy: RwLock<Option<VerifiedPolicy>>,
    disabled: RwLock<BTreeSet<Phase>>,
    state: StateDir,
    pub(crate) audit: Arc<AuditLog>,
    /// The pinned customer keys; they change only by a signed rotation (`rotate_keys`).
    pinned: RwLock<Vec<CustomerPublicKey>>,
    /// Spent grant nonces (durable).
    pub(crate) nonces: NonceStore,
    pub(crate) pre_approvals: PreApprovalStore,
    pub(crate) ops: Arc<OpStore>,
    /// What goes to the control plane, and what comes of it.
    pub(crate) outbound: Outbound,
    running: RunningOps,
    /// The last policy envelope relayed by the control plane that was refused (its digest),
    /// with the digest of the policy then in force: the same again is not audited again.
    refused_relay: Mutex<Option<(String, Option<String>)>>,
    /// This appliance's identity, once enrolled: a policy must not name another environment,
    /// a pre-approval or an attestation another appliance.
    identity: RwLock<Option<airlock_core::ApplianceIdentity>>,
    /// The appliance's own execution-signing key (`crate::execution_key`).
    execution_key: ExecutionSigningKey,
    /// The customer's attestation of it, once made. A watch, so the session hears of a new
    /// one and reconnects to present it in its Hello (`crate::session`).
    attestation: tokio::sync::watch::Sender<Option<Envelope>>,
    vendor_code_user: RwLock<Option<VendorCodeUser>>,
    cloud_metadata: RwLock<Option<CloudMetadata>>,
    clock: Clock,
}

impl LocalControl {
    /// On the wall clock (`crate::run_with_clock` passes its own).
    #[cfg(test)]
    pub(crate) fn new(
        state_dir: &Path,
        policy: Option<VerifiedPolicy>,
        audit: Arc<AuditLog>,
        pinned: Vec<CustomerPublicKey>,
    ) -> Result<Self, ApplianceError> {
        Self::with_clock(state_dir, policy, audit, pinned, Arc::new(crate::clock::now))
    }

    pub(crate) fn with_clock(
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
        let ops = Arc::new(OpStore::open(state_dir)?);
        let execution_key = crate::execution_key::load_or_create(&state, &audit)?;
        let attestation = crate::execution_key::stored_attestation(&state)?;
        Ok(Self {
            policy: RwLock::new(policy),
            disabled: RwLock::new(disabled),
            nonces: NonceStore::open(state_dir, clock())?,
            pre_approvals: PreApprovalStore::open(state_dir)?,
            outbound: Outbound::new(ops.clone(), audit.clone()),
            ops,
            state,
            audit,
            pinned: RwLock::new(pinned),
            running: RunningOps::default(),
            refused_relay: Mutex::new(None),
            identity: RwLock::new(None),
            execution_key,
            attestation: tokio::sync::watch::Sender::new(attestation),
            vendor_code_user: RwLock::new(None),
            cloud_metadata: RwLock::new(None),
            clock,
        })
    }

    pub(crate) fn now(&self) -> Timestamp {
        (self.clock)()
    }

    pub(crate) fn pinned(&self) -> Vec<CustomerPublicKey> {
        self.pinned.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Applies a customer-signed rotation of the pinned keys (`customer::rotate_keys`).
    pub(crate) fn rotate_keys(&self, by: Peer, envelope_json: &[u8]) -> Result<serde_json::Value, ApplianceError> {
        // Held across the check and the write, so two rotations cannot both apply to one set.
        let mut pinned = self.pinned.write().unwrap_or_else(|e| e.into_inner());
        let rotated =
            crate::customer::rotate_keys(&self.state, &pinned, self.threshold(), envelope_json, &self.audit, by)?;
        let ids = airlock_core::key_rotation::key_ids(&rotated);
        *pinned = rotated;
        Ok(serde_json::json!({ "key_ids": ids }))
    }

    pub(crate) fn set_identity(&self, identity: &airlock_core::ApplianceIdentity) {
        *self.identity.write().unwrap_or_else(|e| e.into_inner()) = Some(identity.clone());
    }

    fn identity(&self) -> Option<airlock_core::ApplianceIdentity> {
        self.identity.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Who vendor code runs as, as the box settled it when the appliance started.
    pub(crate) fn set_vendor_code_user(&self, user: VendorCodeUser) {
        *self.vendor_code_user.write().unwrap_or_else(|e| e.into_inner()) = Some(user);
    }

    /// Whether vendor code can reach the cloud's metadata service, as the box settled it.
    pub(crate) fn set_cloud_metadata(&self, reach: CloudMetadata) {
        *self.cloud_metadata.write().unwrap_or_else(|e| e.into_inner()) = Some(reach);
    }

    fn environment(&self) -> Option<airlock_core::EnvironmentId> {
        self.identity().map(|i| i.environment)
    }

    fn appliance(&self) -> Option<ApplianceId> {
        self.identity().map(|i| i.appliance)
    }

    /// The key every execution is signed with, beside the certificate's.
    pub(crate) fn execution_key(&self) -> &ExecutionSigningKey {
        &self.execution_key
    }

    /// The customer's attestation of the execution key, if they made one.
    pub(crate) fn attestation(&self) -> Option<Envelope> {
        self.attestation.borrow().clone()
    }

    /// Hears of each attestation the customer makes from now on.
    pub(crate) fn attestation_changes(&self) -> tokio::sync::watch::Receiver<Option<Envelope>> {
        self.attestation.subscribe()
    }

    /// The id of this host's execution key, if the customer attested it: every request the
    /// customer approves for this appliance must name it, and none may name another
    /// (`crate::executor`).
    pub(crate) fn attested_key_id(&self) -> Option<String> {
        self.attestation.borrow().as_ref().map(|_| self.execution_key.public().key_id().to_owned())
    }

    /// What the customer attests: this appliance's identity and its execution public key.
    pub(crate) fn execution_key_info(&self) -> Result<serde_json::Value, ApplianceError> {
        let key = self.execution_key.public();
        let pem = key.to_pem().map_err(|e| ApplianceError::Internal(e.to_string()))?;
        let identity = self.identity();
        Ok(serde_json::json!({
            "identity": identity.as_ref().map(ToString::to_string),
            "appliance": identity.as_ref().map(|i| i.appliance),
            "environment": identity.as_ref().map(|i| i.environment),
            "tenant": identity.as_ref().map(|i| i.tenant),
            "execution_key": pem,
            "key_id": key.key_id(),
            "attestation": self.attestation().map(|a| serde_json::to_value(a).unwrap_or_default()),
        }))
    }

    /// Keeps the customer's signed attestation of the execution key (`crate::execution_key`).
    pub(crate) fn attest_execution_key(
        &self,
        by: Peer,
        envelope_json: &[u8],
    ) -> Result<serde_json::Value, ApplianceError> {
        let key = self.execution_key.public();
        let identity = self.identity();
        let offered = crate::execution_key::Offered {
            envelope_json,
            key: &key,
            identity: identity.as_ref(),
            pinned: &self.pinned(),
            threshold: self.threshold(),
        };
        // The watch's lock is held across the check and the write: what is in force is what
        // is on disk. Its watchers hear only of an attestation that was kept.
        let mut accepted = Ok(());
        self.attestation.send_if_modified(|current| {
            match crate::execution_key::accept(&self.state, &offered, &self.audit, by) {
                Ok(envelope) => {
                    *current = Some(envelope);
                    true
                }
                Err(e) => {
                    accepted = Err(e);
                    false
                }
            }
        });
        accepted?;
        Ok(serde_json::json!({ "key_id": key.key_id(), "attested": true }))
    }

    /// Distinct customer signatures an approval, pre-approval or release needs.
    pub(crate) fn threshold(&self) -> usize {
        let policy = self.policy.read().unwrap_or_else(|e| e.into_inner());
        policy.as_ref().map_or(1, |p| p.document().approvals_required.max(1))
    }

    /// Phases switched off on this host.
    pub(crate) fn disabled(&self) -> BTreeSet<Phase> {
        self.disabled.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Phases the vendor may use now.
    pub(crate) fn effective_phases(&self) -> BTreeSet<Phase> {
        let disabled = self.disabled.read().unwrap_or_else(|e| e.into_inner());
        let policy = self.policy.read().unwrap_or_else(|e| e.into_inner());
        let enabled: BTreeSet<Phase> = match policy.as_ref() {
            Some(p) => p.document().phases.clone(),
            None => [Phase::Observe].into(),
        };
        enabled.difference(&disabled).copied().collect()
    }

    pub(crate) fn status(&self) -> Status {
        let policy = self.policy.read().unwrap_or_else(|e| e.into_inner());
        let disabled = self.disabled.read().unwrap_or_else(|e| e.into_inner()).iter().copied().collect();
        Status {
            policy_serial: policy.as_ref().map(VerifiedPolicy::serial),
            policy_digest: policy.as_ref().map(VerifiedPolicy::digest_hex),
            policy_phases: policy.as_ref().map(|p| p.document().phases.iter().copied().collect()).unwrap_or_default(),
            disabled,
            effective: self.effective_phases().into_iter().collect(),
            vendor_code_user: *self.vendor_code_user.read().unwrap_or_else(|e| e.into_inner()),
            same_user_accepted: policy.as_ref().is_some_and(|p| p.document().vendor_code.same_user),
            cloud_metadata: self.cloud_metadata.read().unwrap_or_else(|e| e.into_inner()).clone(),
            service_log_tail_bytes: policy
                .as_ref()
                .and_then(|p| p.document().telemetry.log_tail())
                .and_then(|bytes| u32::try_from(bytes).ok()),
            service_metrics_sent: policy.as_ref().is_some_and(|p| p.document().telemetry.service_metrics),
        }
    }

    /// Switches a phase on this host. The new set is saved and audited before it takes effect,
    /// so what is in force is always what is on disk and in the audit. Operations of a phase
    /// switched off are killed at once.
    ///
    /// A switch-off holds in memory even when saving or auditing it fails: the customer's
    /// restriction never waits on the disk (the error is still returned, and the switch is
    /// saved again at their next one).
    pub(crate) fn set_phase(&self, by: Peer, phase: Phase, enabled: bool) -> Result<Status, ApplianceError> {
        {
            let mut disabled = self.disabled.write().unwrap_or_else(|e| e.into_inner());
            let mut next = disabled.clone();
            let changed = if enabled { next.remove(&phase) } else { next.insert(phase) };
            if changed {
                let saved = serde_json::to_vec(&next)
                    .map_err(|e| ApplianceError::Internal(e.to_string()))
                    .and_then(|json| Ok(self.state.write_private(DISABLED_FILE, &json)?));
                if let Err(e) = saved {
                    if !enabled {
                        *disabled = next;
                        drop(disabled);
                        self.cancel_ineffective();
                    }
                    return Err(e);
                }
            }
            let action = if enabled { AuditAction::PhaseEnable } else { AuditAction::PhaseDisable };
            let detail = by.stamp(serde_json::json!({ "phase": phase, "changed": changed }));
            self.audit.record(action, Outcome::Success, detail)?;
            *disabled = next;
        }
        tracing::info!(?phase, enabled, "phase switched by the customer on this host");
        self.cancel_ineffective();
        Ok(self.status())
    }

    /// Loads a newly signed policy (the checks made at start); running operations of phases it
    /// no longer enables are killed.
    pub(crate) fn load_policy(&self, by: Peer, envelope_json: &[u8]) -> Result<Status, ApplianceError> {
        self.apply_policy(envelope_json, PolicySource::Host(by)).map_err(ApplianceError::from)
    }

    fn apply_policy(&self, envelope_json: &[u8], source: PolicySource) -> Result<Status, PolicyRefused> {
        {
            let mut policy = self.policy.write().unwrap_or_else(|e| e.into_inner());
            let next = crate::customer::accept_policy(
                &self.state,
                &self.pinned(),
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
    pub(crate) fn relayed_policy(&self, envelope_json: &[u8]) -> Result<Option<Status>, ApplianceError> {
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
                Err(e.into())
            }
            Err(e @ PolicyRefused::Failed(_)) => Err(e.into()),
        }
    }

    /// Registers a started operation. If its phase is no longer in force (it changed since the
    /// decision), it is killed at once.
    pub(crate) fn register_running(
        &self,
        id: OperationId,
        phase: Phase,
        pgid: i32,
        cell: Option<Arc<crate::sandbox::Cell>>,
        cancelled: Arc<AtomicBool>,
    ) {
        self.running.register(id, phase, pgid, cell, cancelled);
        self.cancel_ineffective();
    }

    /// Forgets a finished operation, killing whatever it left behind in its process group.
    pub(crate) fn unregister_running(&self, id: OperationId) {
        self.running.unregister(id);
    }

    /// Kills every running operation whose phase is not in force now.
    pub(crate) fn cancel_ineffective(&self) {
        self.running.cancel_outside(&self.effective_phases());
    }

    /// Kills every running operation (the appliance is stopping): none outlives the appliance,
    /// and the next start records them as cancelled.
    pub(crate) fn kill_all_running(&self) {
        self.running.kill_all();
    }

    /// The process group of a running operation.
    #[cfg(test)]
    pub(crate) fn running_group(&self, id: OperationId) -> Option<i32> {
        self.running.group(id)
    }

    /// Ids of operations whose process runs now.
    pub(crate) fn running_ids(&self) -> Vec<OperationId> {
        self.running.ids()
    }

    /// Local operations, newest first.
    pub(crate) fn operations(&self) -> Result<serde_json::Value, ApplianceError> {
        let list: Vec<serde_json::Value> = self.ops.list()?.iter().map(|r| r.summary()).collect();
        Ok(serde_json::Value::Array(list))
    }

    /// One operation's output, for the customer on this host, with the salt of its commitment
    /// so the customer's CLI can check it against what the appliance signed.
    pub(crate) fn output(&self, by: Peer, id: OperationId) -> Result<serde_json::Value, ApplianceError> {
        let (record, commitment) = self.finished(id)?;
        let held = self.ops.open_output(id)?;
        self.audit.record(
            AuditAction::OperationOutputRead,
            Outcome::Success,
            by.stamp(serde_json::json!({ "request_id": id, "output_commitment": commitment })),
        )?;
        Ok(serde_json::json!({
            "id": id,
            "output_base64": data_encoding::BASE64.encode(&held.bytes),
            "output_salt": held.salt,
            "output_commitment": commitment,
            "output_size": held.bytes.len(),
            "truncated": record.output_truncated,
            "data_tags": record.data_tags,
        }))
    }

    /// A finished operation, with what its execution committed to about the output.
    fn finished(&self, id: OperationId) -> Result<(OpRecord, OutputCommitment), ApplianceError> {
        let record = self
            .ops
            .record(id)?
            .ok_or_else(|| ApplianceError::Customer(format!("no operation {id} on this appliance")))?;
        match record.commitment() {
            Some(c) if matches!(record.state, OpState::Executed | OpState::Cancelled) => Ok((record, c)),
            _ => Err(ApplianceError::Customer(format!("operation {id} has no output (it is {:?})", record.state))),
        }
    }

    pub(crate) fn pre_approval_add(&self, by: Peer, envelope_json: &[u8]) -> Result<serde_json::Value, ApplianceError> {
        let refuse = |why: String| {
            let detail = by.stamp(serde_json::json!({ "reason": why }));
            let _ = self.audit.record(AuditAction::PreApprovalAdd, Outcome::Denied, detail);
            ApplianceError::Customer(why)
        };
        let envelope = Envelope::from_json(envelope_json).map_err(|e| refuse(format!("pre-approval envelope: {e}")))?;
        let verified = airlock_core::grant::verify_pre_approval(envelope_json, &self.pinned(), self.threshold())
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
            by.stamp(serde_json::json!({
                "id": body.id, "template": body.template, "phase": body.phase, "level": body.level,
                "max_runs": body.max_runs, "not_before": body.not_before, "not_after": body.not_after,
                "digest": body.digest_hex(), "signed_by": verified.signed_by(),
            })),
        )?;
        self.audit.anchor(&Anchor::PreApprovalRuns { id: body.id.clone(), runs_used: entry.runs_used })?;
        Ok(entry.summary())
    }

    pub(crate) fn pre_approval_revoke(&self, by: Peer, id: &str) -> Result<serde_json::Value, ApplianceError> {
        let entry = self
            .pre_approvals
            .revoke(id, self.now())?
            .ok_or_else(|| ApplianceError::Customer(format!("no pre-approval `{id}` on this appliance")))?;
        let detail = by.stamp(serde_json::json!({ "id": id }));
        self.audit.record(AuditAction::PreApprovalRevoke, Outcome::Success, detail)?;
        self.audit.anchor(&Anchor::PreApprovalRevoked { id: id.to_owned() })?;
        Ok(entry.summary())
    }

    pub(crate) fn pre_approvals(&self) -> serde_json::Value {
        serde_json::Value::Array(self.pre_approvals.list().iter().map(|e| e.summary()).collect())
    }

    /// The appliance's copy of one manifest. An execution signed before the customer attested
    /// the execution key gets the attestation now: it covers the key, which signed it all the same.
    pub(crate) fn manifest(&self, id: OperationId) -> Result<serde_json::Value, ApplianceError> {
        let mut m = self.ops.manifest(id)?.ok_or_else(|| ApplianceError::Customer(format!("no manifest for {id}")))?;
        if m.appliance_attestation.is_none()
            && let Some(execution) = &m.execution
            && self.execution_key.public().signed(execution, airlock_core::operation::EXECUTION_PAYLOAD_TYPE)
        {
            m.appliance_attestation = self.attestation();
        }
        serde_json::to_value(m).map_err(|e| ApplianceError::Internal(e.to_string()))
    }
}
