//! Finishing what a stop, a crash or a full disk left half done, so every run is recorded once
//! and the chain of signed executions has no gap.
//!
//! An operation is recorded `running` before its script starts, and stays so until its run is
//! recorded.
//! One that is `running` but not being run or recorded by this process was left by a stop, or
//! by a failure to record it.
//! The appliance kills every script it runs when it stops; at the next start
//! ([`Executor::recover_interrupted`]) what a crash may have left running is killed: every cell
//! a previous process left was killed when the box was opened (`crate::sandbox`); where the
//! host has no cgroup v2, the process group recorded for each such operation is killed here,
//! if it is from this boot of the host.
//! Then each is finished from what is on disk:
//! - an execution already signed and in its manifest (the stop came while it was being
//!   recorded) is completed from the manifest, and the chain head brought up to it;
//! - otherwise the run is lost: it is audited `operation.interrupted` and signed as cancelled,
//!   with no output.
//!
//! A run whose recording failed is retried once at once, and otherwise finished by the next
//! instruction for it.

use airlock_core::OperationId;
use airlock_core::audit::{AuditAction, Outcome as AuditOutcome};
use airlock_core::grant::PreApprovalBody;
use airlock_core::operation::{ExecutionStatement, ExecutionStatus, RequestStatement};
use airlock_proto::gateway::ApplianceMessage;

use super::run::Ran;
use super::{Executor, Job};
use crate::ApplianceError;
use crate::ops_store::OpState;
use crate::result::ResultMsg;
use crate::running::{boot_id, kill_group};

impl Executor {
    /// Operations left `running` by a previous process (it stopped while they ran): what
    /// their scripts left is killed, and they are recorded, signed and reported as cancelled.
    /// One whose execution was already signed (the stop came while it was being recorded) is
    /// completed from its manifest, so the chain has no gap.
    pub(crate) fn recover_interrupted(&self) -> Result<usize, ApplianceError> {
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

    /// Records a run; if that fails (a full disk), tries once more from what is on disk, as
    /// a restart would. `None` leaves it `running`, for the next instruction or start to finish.
    pub(crate) fn record_or_recover(&self, job: Job, ran: Ran) -> Option<(ResultMsg, Option<ApplianceMessage>)> {
        let id = job.id;
        match self.record_run(job, &ran) {
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

    /// Finishes recording one operation left `running` by this process or a previous one: a
    /// signed execution in its manifest is completed (and the chain head brought up to it);
    /// else it is signed now from `ran`, or, without it (the run is lost), it is signed as
    /// cancelled, after its process group is killed if a previous process (`orphaned`) ran it:
    /// this process killed its own groups when their runs ended, and their ids may be reused.
    /// `None` if its files do not allow it.
    pub(crate) fn recover(
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
                Ran::nothing(ExecutionStatus::Cancelled, record.updated_at, self.control.now())
            }
        };
        let job = Job { id, statement, manifest, authority, pre_approval, limits: Default::default(), release: None };
        self.record_run(job, &ran).map(Some)
    }
}

#[cfg(test)]
mod tests;
