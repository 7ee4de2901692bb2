//! Pushing operation instructions: in push order, a page at a time, stopping (and recording where) when the stream's queue is full.

use airlock_core::operation::OperationState;
use std::collections::HashMap;
use std::sync::Arc;

use airlock_core::{ApplianceId, OperationId, WorkspaceId};
use airlock_proto::gateway::{ControlMessage, OperationInstruction, control_message};

use super::Pusher;
use crate::authz::TenantScope;
use crate::store::{OperationRow, PENDING_STATES, PushFrom, PushKey, StoreError};

/// Operations read from the store at a time while pushing instructions.
const PUSH_PAGE: i64 = 16;

impl Pusher {
    /// Sends `OperationInstruction`s for every operation of `appliance` still waiting for its
    /// final result, if the appliance is connected: `first` (the one that just changed), then
    /// in [`PushKey`] order. Never waits on the stream: when the queue is full, where the push
    /// stopped is remembered with the stream and [`Pusher::after_message`] goes on from there.
    pub async fn operations(&self, scope: &TenantScope, appliance: ApplianceId, first: Option<OperationId>) {
        if self.registry.status(&appliance).is_none() {
            return;
        }
        // At (re)connect, nothing pending is the normal case: the index says so without a read.
        if first.is_none() && !self.index.may_have_operations(&appliance) {
            return;
        }
        // This push starts from the beginning, so it covers whatever an interrupted one left.
        self.registry.take_resume(appliance);
        if let Some(first) = first {
            let op = match self.store.get_operation(scope, first).await {
                Ok(op) => op,
                Err(e) => {
                    tracing::error!(error = %e, %appliance, "cannot read an operation to push");
                    return self.registry.push_stopped(appliance, PushFrom::Start);
                }
            };
            let pending = |op: &OperationRow| {
                op.appliance_id == appliance && op.result_at.is_none() && PENDING_STATES.contains(&op.state)
            };
            if let Some(op) = op.filter(pending)
                && !self.send_instruction(scope, appliance, &op, &mut Payloads::default()).await
            {
                return self.registry.push_stopped(appliance, PushFrom::Start);
            }
        }
        self.push_from(scope, appliance, PushFrom::Start, first).await;
    }

    /// Sends the instructions of operations just requested (as committed: `ops` are the stored
    /// rows, not read back), each to its appliance if connected; a release or template is read
    /// once for all of them. Only the new operation is sent: whatever else is pending on a
    /// stream was sent when it was requested, decided or the stream connected, or a push that
    /// stopped on a full queue resumes at the appliance's next message. A new one that finds
    /// the queue full is covered the same way (a resume from the start).
    ///
    /// `releases`: the digest of the release that this batch's deploys or release tasks name,
    /// by workspace (as the requester prepared them), so that no request is parsed back to
    /// find it (10,000 parses for a rollout's round).
    pub async fn requested(&self, scope: &TenantScope, ops: &[&OperationRow], releases: HashMap<WorkspaceId, String>) {
        self.note_awaiting(
            ops.iter().filter(|op| op.state == OperationState::AwaitingApproval).map(|op| (op.id, op.appliance_id)),
        );
        let mut payloads = Payloads { read: HashMap::new(), releases };
        for &op in ops {
            if !self.send_instruction(scope, op.appliance_id, op, &mut payloads).await {
                // A no-op when the appliance is not connected: its Welcome pushes everything.
                self.registry.push_stopped(op.appliance_id, PushFrom::Start);
            }
        }
    }

    /// Pushes again every approved operation of `appliance` with no result yet (decided
    /// operations come first in [`PushKey`] order, so it stops at the first awaiting approval).
    pub(super) async fn repush_approved(&self, scope: &TenantScope, appliance: ApplianceId) {
        let mut from = PushFrom::Start;
        let mut payloads = Payloads::default();
        loop {
            let page = match self.store.pending_operations(scope, appliance, &from, PUSH_PAGE).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(error = %e, %appliance, "cannot read pending operations");
                    return self.registry.push_stopped(appliance, from);
                }
            };
            for op in &page {
                if op.state == OperationState::AwaitingApproval {
                    return;
                }
                if op.state == OperationState::Approved
                    && !self.send_instruction(scope, appliance, op, &mut payloads).await
                {
                    return self.registry.push_stopped(appliance, from);
                }
                from = PushFrom::After(PushKey::of(op));
            }
            if page.len() < PUSH_PAGE as usize {
                return;
            }
        }
    }

    /// Pushes the pending operations of `appliance` from `from` on, skipping `skip` (already
    /// sent first).
    pub(super) async fn push_from(
        &self,
        scope: &TenantScope,
        appliance: ApplianceId,
        mut from: PushFrom,
        skip: Option<OperationId>,
    ) {
        // A push from the start that finds nothing lets the index forget the appliance; taken
        // before the read so an operation noted meanwhile keeps it.
        let seen = (from == PushFrom::Start).then(|| self.index.seen(&appliance));
        let mut payloads = Payloads::default();
        loop {
            let page = match self.store.pending_operations(scope, appliance, &from, PUSH_PAGE).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(error = %e, %appliance, "cannot read pending operations");
                    return self.registry.push_stopped(appliance, from);
                }
            };
            for op in &page {
                if skip != Some(op.id) && !self.send_instruction(scope, appliance, op, &mut payloads).await {
                    tracing::debug!(%appliance, operation = %op.id, "stream busy; the push resumes at its next message");
                    return self.registry.push_stopped(appliance, from);
                }
                from = PushFrom::After(PushKey::of(op));
            }
            if let Some(seen) = seen
                && page.is_empty()
                && from == PushFrom::Start
            {
                self.index.nothing_pending(&appliance, seen);
            }
            if page.len() < PUSH_PAGE as usize {
                return;
            }
        }
    }

    /// Queues one instruction. False if it must be sent again later (queue full, or the store
    /// failed); an operation whose template version (or release) is missing is skipped.
    async fn send_instruction(
        &self,
        scope: &TenantScope,
        appliance: ApplianceId,
        op: &OperationRow,
        payloads: &mut Payloads,
    ) -> bool {
        let payload = match self.payload(scope, op, payloads).await {
            Ok(Some(p)) => p,
            Ok(None) => {
                tracing::error!(operation = %op.id, "the template version or release of this operation is not stored");
                return true;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot read the operation's template or release");
                return false;
            }
        };
        let mut instruction = OperationInstruction {
            request_id: op.id.to_string(),
            request_envelope_json: op.request_envelope.clone(),
            control_plane_certificate_pem: op.control_plane_cert_pem.clone(),
            approval_envelope_json: op.approval_envelope.clone().unwrap_or_default(),
            ..Default::default()
        };
        match &*payload {
            Payload::Template { manifest_toml, script } => {
                instruction.template_manifest_toml = manifest_toml.clone();
                instruction.template_script = script.clone();
            }
            Payload::Release { envelope, key_pems } => {
                instruction.release_envelope_json = envelope.clone();
                instruction.release_key_pems = key_pems.clone();
            }
        }
        let msg = ControlMessage { body: Some(control_message::Body::Operation(instruction)) };
        self.registry.send(appliance, msg)
    }

    /// What `op`'s instruction carries beside its statements, from `payloads` when an earlier
    /// operation of this push needed the same.
    async fn payload(
        &self,
        scope: &TenantScope,
        op: &OperationRow,
        payloads: &mut Payloads,
    ) -> Result<Option<Arc<Payload>>, StoreError> {
        use airlock_core::deploy::{DEPLOY_KIND, DeployArgs, TASK_KIND, TaskArgs};
        // A deploy or a release task carries its release; anything else its template.
        let release = if [DEPLOY_KIND, TASK_KIND].contains(&op.template_name.as_str()) {
            if let Some(known) = payloads.releases.get(&op.workspace_id) {
                Some(known.clone())
            } else {
                let request = crate::operations::stored_request(op)?;
                let args = &request.request.args;
                match DeployArgs::from_args(args).or_else(|| TaskArgs::from_args(args).map(|t| t.release)) {
                    Some(args) => Some(args.release),
                    None => return Ok(None),
                }
            }
        } else {
            None
        };
        let key =
            (op.workspace_id, op.template_name.clone(), release.clone().unwrap_or_else(|| op.template_sha256.clone()));
        if let Some(found) = payloads.read.get(&key) {
            return Ok(found.clone());
        }
        let found = match release {
            Some(release) => self.release_payload(scope, op.workspace_id, release).await?,
            None => self
                .store
                .template_version(scope, op.workspace_id, &op.template_name, &op.template_sha256)
                .await?
                .map(|t| Payload::Template { manifest_toml: t.manifest_toml, script: t.script }),
        }
        .map(Arc::new);
        payloads.read.insert(key, found.clone());
        Ok(found)
    }

    /// A deploy's (or a task's) release, the one its signed request names, and the workspace's unrevoked
    /// release keys, which the appliance narrows to those its customer accepts.
    async fn release_payload(
        &self,
        scope: &TenantScope,
        workspace: WorkspaceId,
        release: String,
    ) -> Result<Option<Payload>, StoreError> {
        let selector = crate::releases::ReleaseSelector::Digest(release);
        let Some(release) = self.store.find_release(scope, workspace, &selector).await? else {
            return Ok(None);
        };
        let keys = self.store.list_release_keys(scope, workspace).await?;
        Ok(Some(Payload::Release {
            envelope: release.envelope,
            key_pems: keys.into_iter().filter(|k| k.revoked_at.is_none()).map(|k| k.public_pem).collect(),
        }))
    }
}

/// What an instruction carries beside the operation's own statements.
#[derive(Debug)]
enum Payload {
    Template { manifest_toml: String, script: String },
    Release { envelope: String, key_pems: Vec<String> },
}

/// Payloads read during one push, by workspace, kind and template hash or release digest: a
/// batch of requests for one release reads it (and the release keys) once. Lives for one push
/// only, so a release key revoked meanwhile is left out of the next push.
#[derive(Default)]
struct Payloads {
    read: HashMap<(WorkspaceId, String, String), Option<Arc<Payload>>>,
    /// The release of the deploys and tasks being pushed, by workspace, when the pusher was told.
    releases: HashMap<WorkspaceId, String>,
}
