//! The customer's decision about one operation's output: release it to the vendor, or withhold it.
//!
//! The decision is signed by enough pinned customer keys and names the exact output the
//! appliance signed (its digest and size); output tagged `output:secret` can be withheld, never
//! released.
//! It is checked and recorded under the operation store's lock, so of two decisions made at
//! once exactly one holds, and once decided an output stays decided.
//! The signed decision joins the operation's manifest, and is queued for the control plane,
//! with the output itself when released.

use airlock_core::audit::{AuditAction, Outcome};
use airlock_core::dsse::Envelope;
use airlock_core::operation::{RELEASE_PAYLOAD_TYPE, ReleaseDecision, ReleaseStatement};
use airlock_proto::gateway::ApplianceMessage;

use super::LocalControl;
use crate::ApplianceError;
use crate::ops_store::ReleaseItem;

impl LocalControl {
    /// Verifies and applies the customer's release or withholding of one output, and queues it
    /// for the control plane. Returns the message to send (none when the release is parked:
    /// the control plane refused the operation's result for good).
    pub(crate) fn release(
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
                airlock_core::grant::SECRET_OUTPUT_TAG
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
        let msg = self.outbound.queue_release(&item)?;
        Ok((record.summary(), msg))
    }
}

#[cfg(test)]
mod tests;
