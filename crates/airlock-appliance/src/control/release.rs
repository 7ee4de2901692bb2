//! The customer's decision about one operation's output: release it to the vendor, or withhold it.
//!
//! The decision is signed by enough pinned customer keys and names the exact output commitment
//! the appliance signed; output tagged `output:secret` can be withheld, never released.
//! A release goes ahead only if the output and salt held here still open that commitment
//! (`OpStore::revealable_output`); the salt then joins the manifest and goes up with the output.
//! It is checked and recorded under the operation store's lock, so of two decisions made at
//! once exactly one holds, and once decided an output stays decided.
//! The signed decision joins the operation's manifest, and is queued for the control plane,
//! with the output itself when released.

use airlock_core::audit::{AuditAction, Outcome};
use airlock_core::dsse::Envelope;
use airlock_core::grant::SECRET_OUTPUT_TAG;
use airlock_core::operation::{OutputCommitment, RELEASE_PAYLOAD_TYPE, ReleaseDecision, ReleaseStatement};
use airlock_core::{ApplianceId, OperationId};
use airlock_proto::gateway::ApplianceMessage;

use super::{LocalControl, Peer};
use crate::ApplianceError;
use crate::ops_store::ReleaseItem;

/// Why the customer's release (or withholding) of an output was refused. The customer reads
/// the sentence at the admin socket; code and tests decide on the variant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReleaseRefusal {
    #[error("release envelope: {0}")]
    Malformed(String),
    #[error("the release does not verify with the pinned customer keys: {0}")]
    NotVerified(String),
    #[error("the release statement is malformed: {0}")]
    MalformedStatement(String),
    /// The operation is unknown here, or has not finished.
    #[error("{0}")]
    NotFinished(String),
    #[error("the release is for appliance {0}, not this one")]
    AnotherAppliance(ApplianceId),
    #[error(
        "the release names other output than operation {id} committed to ({produced:?}); sign a release of its own commitment"
    )]
    OtherOutput { id: OperationId, produced: OutputCommitment },
    /// What is held here no longer opens the signed commitment: nothing is revealed.
    #[error("{0}")]
    HeldOutputMismatch(String),
    #[error(
        "operation {0} is tagged `{SECRET_OUTPUT_TAG}`: its output never leaves this host; you can withhold it, not release it"
    )]
    SecretOutput(OperationId),
    #[error("the output of {id} was already decided ({decided:?})")]
    AlreadyDecided { id: OperationId, decided: ReleaseDecision },
    #[error("the output of {0} was already released under a commands-and-output pre-approval")]
    ReleasedByPreApproval(OperationId),
    #[error("operation {0} has no manifest")]
    NoManifest(OperationId),
}

impl LocalControl {
    /// Verifies and applies the customer's release or withholding of one output, and queues it
    /// for the control plane. Returns the message to send (none when the release is parked:
    /// the control plane refused the operation's result for good).
    pub(crate) fn release(
        &self,
        by: Peer,
        envelope_json: &[u8],
    ) -> Result<(serde_json::Value, Option<ApplianceMessage>), ApplianceError> {
        let refuse = |why: ReleaseRefusal| {
            let _ = self.audit.record(
                AuditAction::OperationReleaseRefused,
                Outcome::Denied,
                by.stamp(serde_json::json!({ "reason": why.to_string() })),
            );
            ApplianceError::Release(why)
        };
        let envelope =
            Envelope::from_json(envelope_json).map_err(|e| refuse(ReleaseRefusal::Malformed(e.to_string())))?;
        let verified = envelope
            .verify(RELEASE_PAYLOAD_TYPE, &self.pinned(), self.threshold())
            .map_err(|e| refuse(ReleaseRefusal::NotVerified(e.to_string())))?;
        let statement: ReleaseStatement = serde_json::from_slice(&verified.payload)
            .map_err(|e| refuse(ReleaseRefusal::MalformedStatement(e.to_string())))?;
        let id = statement.request_id;
        let (record, commitment) = self.finished(id).map_err(|e| refuse(ReleaseRefusal::NotFinished(e.to_string())))?;
        if statement.appliance != record.appliance {
            return Err(refuse(ReleaseRefusal::AnotherAppliance(statement.appliance)));
        }
        if statement.output_commitment != commitment {
            return Err(refuse(ReleaseRefusal::OtherOutput { id, produced: commitment }));
        }
        let salt = match statement.decision {
            ReleaseDecision::Release if record.is_secret() => return Err(refuse(ReleaseRefusal::SecretOutput(id))),
            ReleaseDecision::Release => {
                self.ops
                    .revealable_output(id, &commitment)
                    .map_err(|e| refuse(ReleaseRefusal::HeldOutputMismatch(e.to_string())))?
                    .salt
            }
            // A withholding reveals nothing, not even the salt.
            ReleaseDecision::Withhold => None,
        };
        // Checked and decided under the store's lock: of two decisions at once, one holds.
        let now = self.now();
        let record = self.ops.update_record(id, |r| {
            if let Some(decided) = r.release {
                return Err(refuse(ReleaseRefusal::AlreadyDecided { id, decided }));
            }
            if r.released_by_pre_approval {
                return Err(refuse(ReleaseRefusal::ReleasedByPreApproval(id)));
            }
            let mut manifest = self.ops.manifest(id)?.ok_or_else(|| refuse(ReleaseRefusal::NoManifest(id)))?;
            manifest.release = Some(envelope.clone());
            manifest.output_salt = salt.clone();
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
            by.stamp(serde_json::json!({
                "request_id": id,
                "output_commitment": statement.output_commitment,
                "signed_by": verified.signed_by,
                "approver": statement.approver,
            })),
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
