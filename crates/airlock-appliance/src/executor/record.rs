//! Recording a run: sealing its output, signing what happened, chaining it, queuing the result.
//!
//! In this order:
//! 1. the output is sealed at rest with a fresh salt (`crate::ops_store`), and only the salted
//!    commitment and size go further, or nothing at all for `output:secret` output
//!    (`airlock_core::output_commitment`);
//! 2. an `ExecutionStatement` is signed with the appliance's certificate key (ECDSA P-256) and
//!    its execution key (Ed25519, `crate::execution_key`), chained to the previous one
//!    (`sequence`, `previous_manifest_sha256`); the customer's attestation of the execution key
//!    goes into the manifest beside it;
//! 3. the manifest holding it is stored *before* the chain head (`manifest-chain.json`) names
//!    it, so the head never names a statement that is not on disk;
//! 4. the result is queued in the outbox before it is sent, with the output too under a
//!    commands-and-output pre-approval, unless the template is tagged `output:secret`;
//! 5. the record becomes `executed` or `cancelled`, and the outcome is audited.
//!
//! If recording fails (a full disk), `super::recover` tries once more at once from what is on
//! disk; failing that, the record stays `running` for the next instruction or start to finish.

use airlock_core::OperationId;
use airlock_core::audit::{AuditAction, Outcome as AuditOutcome};
use airlock_core::dsse::Envelope;
use airlock_core::grant::ApprovalLevel;
use airlock_core::operation::{
    EXECUTION_PAYLOAD_TYPE, ExecutionStatement, ExecutionStatus, Manifest, OutputCommitment, RefusalCode,
    RequestStatement, add_signature, certificate_key_id, pem_certificate_der, signing_input,
};
use airlock_proto::gateway::ApplianceMessage;

use super::run::Ran;
use super::{Executor, Job};
use crate::ApplianceError;
use crate::ops_store::{OpState, ReleaseItem, fresh_salt};
use crate::result::{Outcome, Refusal, ResultMsg};
use crate::state_dir::Credentials;

impl Executor {
    /// Seals the output, signs the execution into the chain, stores the manifest and queues
    /// the result (and, under a commands-and-output pre-approval, the output).
    pub(crate) fn record_run(
        &self,
        job: Job,
        ran: &Ran,
    ) -> Result<(ResultMsg, Option<ApplianceMessage>), ApplianceError> {
        let ops = &self.control.ops;
        let id = job.id;
        let Ran { status, exit_code, ref output, truncated, started_at, finished_at } = *ran;
        let req = &job.statement.request;
        let secret = req.output_is_secret();
        let salt = fresh_salt()?;
        let output_commitment = OutputCommitment::for_output(secret, &salt, output);
        ops.seal_output(id, &salt, output)?;
        let (_, _, creds) = self.state.load()?;
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
                output_commitment: output_commitment.clone(),
                // Not even whether it hit the capture limit is told of secret output.
                output_truncated: (!secret).then_some(truncated),
                sequence,
                previous_manifest_sha256,
            };
            let envelope = sign_execution(&statement, &creds)?;
            // Both signatures on one envelope: the control plane checks the certificate's (its
            // CA, the stream's appliance), a verifier also the customer-attested key's, which
            // the CA cannot make.
            let envelope = self.control.execution_key().sign(envelope);
            let link = statement.manifest_sha256();
            // On disk before the head names it.
            manifest.execution = Some(envelope);
            manifest.appliance_certificate = Some(creds.cert_pem.clone());
            manifest.appliance_attestation = self.control.attestation();
            ops.save_manifest(&manifest)?;
            Ok((statement, link))
        })?;
        self.complete(&manifest, &job.statement, &statement, job.pre_approval.as_ref())
    }

    /// Once the execution is signed and in the manifest: queues the result (and, under a
    /// commands-and-output pre-approval, the output), records and audits the outcome.
    pub(crate) fn complete(
        &self,
        manifest: &Manifest,
        request: &RequestStatement,
        execution: &ExecutionStatement,
        pre_approval: Option<&(Envelope, ApprovalLevel)>,
    ) -> Result<(ResultMsg, Option<ApplianceMessage>), ApplianceError> {
        let id = execution.request_id;
        let cancelled = execution.status == ExecutionStatus::Cancelled;
        let mut result = ResultMsg::ran(id, if cancelled { Outcome::Cancelled } else { Outcome::Executed });
        result.execution_envelope_json = manifest.execution.as_ref().map(Envelope::to_json).unwrap_or_default();
        result.appliance_certificate_pem = manifest.appliance_certificate.clone().unwrap_or_default();
        result.pre_approval_envelope_json = pre_approval.map(|(e, _)| e.to_json()).unwrap_or_default();
        result.appliance_attestation_json =
            manifest.appliance_attestation.as_ref().map(Envelope::to_json).unwrap_or_default();
        let secret = request.request.output_is_secret();
        let auto_release = matches!(pre_approval, Some((_, ApprovalLevel::CommandsAndOutput))) && !secret;
        self.control.outbound.queue_result(&result)?;
        let release = if auto_release {
            // The salt joins this host's manifest as it leaves with the output.
            let held = self.control.ops.revealable_output(id, &execution.output_commitment)?;
            if held.salt.is_some() && manifest.output_salt != held.salt {
                let mut revealed = manifest.clone();
                revealed.output_salt = held.salt;
                self.control.ops.save_manifest(&revealed)?;
            }
            let item = ReleaseItem { request_id: id, release_envelope_json: String::new(), with_output: true };
            self.control.outbound.queue_release(&item)?
        } else {
            None
        };
        self.control.ops.update_record(id, |r| {
            r.state = if cancelled { OpState::Cancelled } else { OpState::Executed };
            r.exit_code = execution.exit_code;
            r.output_commitment = Some(execution.output_commitment.clone());
            r.output_truncated = execution.output_truncated.unwrap_or(false);
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
                "output_commitment": execution.output_commitment,
                "output_truncated": execution.output_truncated, "sequence": execution.sequence,
            }),
        )?;
        if auto_release {
            self.control.audit.record(
                AuditAction::OperationReleased,
                AuditOutcome::Success,
                serde_json::json!({
                    "request_id": id, "output_commitment": execution.output_commitment, "by": "pre-approval",
                    "digest": execution.authority.digest,
                }),
            )?;
        }
        Ok((result, release))
    }

    /// A run that could not be recorded: logged and audited. Returns the answer for it.
    pub(crate) fn record_failure(&self, id: OperationId, why: &str) -> ResultMsg {
        tracing::error!(request_id = %id, error = %why, "cannot record an execution");
        let _ = self.control.audit.record(
            AuditAction::OperationError,
            AuditOutcome::Error,
            serde_json::json!({ "request_id": id, "reason": why }),
        );
        not_recorded(id)
    }
}

/// The answer when a run could not be recorded: the record stays `running`, and the next
/// instruction for it (or the next start) finishes recording it.
pub(crate) fn not_recorded(id: OperationId) -> ResultMsg {
    ResultMsg::refused(id, Refusal::new(RefusalCode::NotRecorded), "the appliance could not record the execution")
}

/// Signs an execution statement with the key of the appliance's current certificate (ECDSA P-256,
/// DER); the execution key signs it next.
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
