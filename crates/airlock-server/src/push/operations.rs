//! Pushing operation instructions: in push order, a page at a time, stopping (and recording where) when the stream's queue is full.

use airlock_core::operation::OperationState;
use airlock_core::{ApplianceId, OperationId};
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
                && !self.send_instruction(scope, appliance, &op).await
            {
                return self.registry.push_stopped(appliance, PushFrom::Start);
            }
        }
        self.push_from(scope, appliance, PushFrom::Start, first).await;
    }

    /// Pushes again every approved operation of `appliance` with no result yet (decided
    /// operations come first in [`PushKey`] order, so it stops at the first awaiting approval).
    pub(super) async fn repush_approved(&self, scope: &TenantScope, appliance: ApplianceId) {
        let mut from = PushFrom::Start;
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
                if op.state == OperationState::Approved && !self.send_instruction(scope, appliance, op).await {
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
        loop {
            let page = match self.store.pending_operations(scope, appliance, &from, PUSH_PAGE).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(error = %e, %appliance, "cannot read pending operations");
                    return self.registry.push_stopped(appliance, from);
                }
            };
            for op in &page {
                if skip != Some(op.id) && !self.send_instruction(scope, appliance, op).await {
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
    async fn send_instruction(&self, scope: &TenantScope, appliance: ApplianceId, op: &OperationRow) -> bool {
        let mut instruction = OperationInstruction {
            request_id: op.id.to_string(),
            request_envelope_json: op.request_envelope.clone(),
            control_plane_certificate_pem: op.control_plane_cert_pem.clone(),
            approval_envelope_json: op.approval_envelope.clone().unwrap_or_default(),
            ..Default::default()
        };
        let found = if [airlock_core::deploy::DEPLOY_KIND, airlock_core::deploy::TASK_KIND]
            .contains(&op.template_name.as_str())
        {
            self.add_release(scope, op, &mut instruction).await
        } else {
            self.store.template_version(scope, op.workspace_id, &op.template_name, &op.template_sha256).await.map(|t| {
                t.map(|t| {
                    instruction.template_manifest_toml = t.manifest_toml;
                    instruction.template_script = t.script;
                })
            })
        };
        match found {
            Ok(Some(())) => {}
            Ok(None) => {
                tracing::error!(operation = %op.id, "the template version or release of this operation is not stored");
                return true;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot read the operation's template or release");
                return false;
            }
        }
        let msg = ControlMessage { body: Some(control_message::Body::Operation(instruction)) };
        self.registry.send(appliance, msg)
    }

    /// A deploy's (or a release task's) release, the one its signed request names, and the workspace's unrevoked
    /// release keys, which the appliance narrows to those its customer accepts.
    async fn add_release(
        &self,
        scope: &TenantScope,
        op: &OperationRow,
        instruction: &mut OperationInstruction,
    ) -> Result<Option<()>, StoreError> {
        let request = crate::operations::stored_request(op)?;
        let args = &request.request.args;
        let named = airlock_core::deploy::DeployArgs::from_args(args)
            .or_else(|| airlock_core::deploy::TaskArgs::from_args(args).map(|t| t.release));
        let Some(args) = named else {
            return Ok(None);
        };
        let selector = crate::releases::ReleaseSelector::Digest(args.release);
        let Some(release) = self.store.find_release(scope, op.workspace_id, &selector).await? else {
            return Ok(None);
        };
        let keys = self.store.list_release_keys(scope, op.workspace_id).await?;
        instruction.release_envelope_json = release.envelope;
        instruction.release_key_pems =
            keys.into_iter().filter(|k| k.revoked_at.is_none()).map(|k| k.public_pem).collect();
        Ok(Some(()))
    }
}
