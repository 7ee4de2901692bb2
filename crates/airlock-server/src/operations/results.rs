//! Results coming up from appliances: what became of an operation.
//!
//! An execution statement is accepted only if our CA issued its certificate and the certificate names exactly the stream's appliance.
//! The statement must bind the stored request (id, digest, command, appliance), its status must fit the outcome, and its authority must be one the control plane can account for.
//! A grant must be the one relayed for this request; a pre-approval must be sent beside it and name this appliance, template and phase; a standing window needs nothing more here (`airlock verify --policy` checks it against the customer's policy).
//! An execution claiming probe (`observe`) authority for a template is refused: only the appliance's own probes run without a signature.
//! The certificate is checked at the time the appliance says it started, which may not lie in the control plane's future.
//! The appliance also signs each execution with its own execution key; the customer's attestation of that key comes beside it once they made one.
//! The control plane holds no customer key, so it cannot verify the attestation's signature (`airlock verify` does); it checks that the attestation names this stream's appliance and that its key signed the execution, and stores it for the manifest.
//!
//! A refusal (`AWAITING_APPROVAL`, `REFUSED`) is read from its codes through `airlock_proto::convert`, never from its text.
//! A code this build does not know, a missing one, or one that contradicts the outcome is refused.
//! `REFUSED` stores the codes and the reason; `AWAITING_APPROVAL` changes nothing, but for an approved operation it asks [`crate::push`] to push it again when its approval becomes valid.
//! The same result sent again is acknowledged as stored; a different final result for the same operation is refused.

use std::time::Duration;

use airlock_core::audit::{AuditAction, Event, Outcome};
use airlock_core::dsse::Envelope;
use airlock_core::grant::{ApprovalDecision, DenyCode, GrantBody, PRE_APPROVAL_PAYLOAD_TYPE, PreApprovalBody};
use airlock_core::operation::{
    AuthorityKind, EXECUTION_PAYLOAD_TYPE, ExecutionStatement, ExecutionStatus, OperationState, RefusalCode,
    RequestStatement, verify_certified_envelope,
};
use airlock_core::{ApplianceId, ApplianceIdentity, OperationId, Timestamp};
use airlock_proto::convert::{deny_code_from_wire, refusal_code_from_wire};
use airlock_proto::gateway::{ControlMessage, OperationAckKind, OperationOutcome, OperationResult};

use super::reply::{Refuse, finish, refuse};
use super::{MAX_ENVELOPE_BYTES, sanitize, stored_envelope, stored_request};
use crate::authz::TenantScope;
use crate::state::{AppState, event};
use crate::store::{OperationRow, PENDING_STATES, ResultUpdate, WriteTx};

/// Longest refusal reason kept from an appliance (it names a check or rule, never data).
const MAX_REFUSAL_REASON_CHARS: usize = 500;

/// How far ahead of the control plane's clock an appliance's clock may run.
const MAX_CLOCK_SKEW: Duration = Duration::from_secs(300);

/// Handles an `OperationResult` from `peer`; the reply is an `OperationAck`, or nothing when
/// the store failed (the appliance keeps it and sends it again).
pub async fn handle_result(
    state: &AppState,
    peer: &ApplianceIdentity,
    scope: &TenantScope,
    r: OperationResult,
) -> Option<ControlMessage> {
    let shown = sanitize(&r.request_id, 64);
    let result = match r.request_id.parse::<OperationId>() {
        Ok(id) => apply_result(state, peer, scope, id, &r).await,
        Err(e) => refuse(format!("the result's request id is malformed: {e}")),
    };
    finish(state, scope, &shown, OperationAckKind::Result, AuditAction::OperationResultRefused, result).await
}

async fn apply_result(
    state: &AppState,
    peer: &ApplianceIdentity,
    scope: &TenantScope,
    request_id: OperationId,
    r: &OperationResult,
) -> Result<(), Refuse> {
    let outcome = OperationOutcome::try_from(r.outcome).unwrap_or(OperationOutcome::Unspecified);
    let now = state.now();
    if outcome == OperationOutcome::AwaitingApproval {
        // Pushed awaiting approval and not decided since: nothing to do, and nothing to read
        // (the codes are still checked). A decision forgets the entry before it is written.
        if state.push.known_awaiting(request_id, peer.appliance) {
            reported_refusal(r, OperationOutcome::AwaitingApproval)?;
            return Ok(());
        }
        // Nothing is written, so a plain read of the operation's state rather than the write
        // lock and the whole row: a rollout's fan-out brings thousands of these at once. (An
        // approval committed meanwhile pushes itself.)
        let Some((_, op_state, has_result)) =
            state.store.operation_status(scope, request_id).await?.filter(|(a, ..)| *a == peer.appliance)
        else {
            return refuse(format!("no operation {request_id} for this appliance"));
        };
        return awaiting_approval(state, peer, op_state, has_result, r, now);
    }
    // A final answer: from here on the store speaks for this operation.
    state.push.forget_awaiting(request_id);
    let mut tx = state.store.write().await?;
    let Some(op) = tx.operation(scope, request_id).await?.filter(|op| op.appliance_id == peer.appliance) else {
        return refuse(format!("no operation {request_id} for this appliance"));
    };
    let request = stored_request(&op)?;
    let pending = PENDING_STATES.contains(&op.state) && op.result_at.is_none();
    let already = || refuse(format!("operation {request_id} already has a final result ({})", op.state));
    match outcome {
        OperationOutcome::Unspecified => {
            refuse(format!("the result's outcome {} is unknown or unspecified", r.outcome))
        }
        // Answered above without the write lock; the same answer if it were not.
        OperationOutcome::AwaitingApproval => awaiting_approval(state, peer, op.state, op.result_at.is_some(), r, now),
        OperationOutcome::Refused => {
            let reported = reported_refusal(r, outcome)?;
            if reported.code == RefusalCode::NotRecorded {
                // The appliance ran it but could not record the run yet; it finishes recording
                // at the next instruction or start and sends the signed execution then. Nothing
                // is final until that arrives.
                return Err(Refuse::NotYet(format!(
                    "operation {request_id}: the appliance has not recorded its execution yet"
                )));
            }
            let reason = sanitize(&r.reason, MAX_REFUSAL_REASON_CHARS);
            if !pending {
                // The same result again is already stored (refusals stored before codes were
                // recorded have no code to compare).
                let same = op.refusal_reason.as_deref() == Some(reason.as_str())
                    && op.refusal_code.is_none_or(|c| c == reported.code)
                    && (op.refusal_code.is_none() || op.deny_code == reported.deny);
                return if same { Ok(()) } else { already() };
            }
            // A denial stays `denied`; the appliance's refusal confirms it audited it.
            let new_state =
                if op.state == OperationState::Denied { OperationState::Denied } else { OperationState::Refused };
            let update = ResultUpdate::refusal(new_state, reported.code, reported.deny, &reason);
            let detail = serde_json::json!({ "code": reported.code, "deny_code": reported.deny, "reason": reason });
            let ev = result_event(scope, AuditAction::OperationRefused, request_id, detail);
            commit_result(tx, scope, peer.appliance, request_id, &update, ev, now).await
        }
        OperationOutcome::Executed | OperationOutcome::Cancelled => {
            let v = verify_execution(state, peer, &op, &request, outcome, r, now)?;
            let execution_json = v.envelope.to_json();
            if !pending {
                return if op.execution_envelope.as_deref() == Some(execution_json.as_str()) {
                    Ok(())
                } else {
                    already()
                };
            }
            // A denial that crossed a pre-approved (or standing-window) run on its way: the
            // appliance ran it on the customer's own earlier authority, verified above. The
            // record says what happened rather than leaving the operation pending for ever.
            let after_denial = op.state == OperationState::Denied;
            let e = &v.statement;
            // Secret output is committed to with nothing (no digest, no size), other output with a
            // salted commitment; an appliance that says more about secret output is refused.
            if !e.output_commitment.fits_request(request.request.output_is_secret()) {
                return refuse("the execution's output commitment does not fit the request's output tags");
            }
            let size = e
                .output_commitment
                .size()
                .map(i64::try_from)
                .transpose()
                .or_else(|_| refuse("the output size is out of range"))?;
            let (new_state, action) = if outcome == OperationOutcome::Executed {
                (OperationState::Executed, AuditAction::OperationExecuted)
            } else {
                (OperationState::Cancelled, AuditAction::OperationCancelled)
            };
            let update = ResultUpdate {
                state: new_state,
                execution_envelope: Some(&execution_json),
                appliance_cert_pem: Some(&v.cert_pem),
                appliance_attestation: v.attestation_json.as_deref(),
                pre_approval_envelope: v.pre_approval_json.as_deref(),
                exit_code: e.exit_code.map(i64::from),
                output_sha256: e.output_commitment.digest(),
                output_size: size,
                refusal_code: None,
                deny_code: None,
                refusal_reason: None,
            };
            let detail = serde_json::json!({
                "status": e.status,
                "exit_code": e.exit_code,
                "output_commitment": e.output_commitment,
                "authority": e.authority.kind,
                "sequence": e.sequence,
                "ran_before_the_denial_arrived": after_denial,
            });
            let ev = result_event(scope, action, request_id, detail);
            commit_result(tx, scope, peer.appliance, request_id, &update, ev, now).await
        }
    }
}

/// An `AWAITING_APPROVAL` answer: nothing ran and nothing changes; the instruction is sent again
/// with the approval. An approved one the appliance cannot run yet (its approval is not valid
/// yet) is sent again later on this stream, without waiting for a reconnect.
fn awaiting_approval(
    state: &AppState,
    peer: &ApplianceIdentity,
    op_state: OperationState,
    has_result: bool,
    r: &OperationResult,
    now: Timestamp,
) -> Result<(), Refuse> {
    let reported = reported_refusal(r, OperationOutcome::AwaitingApproval)?;
    if !has_result && op_state == OperationState::Approved {
        state.push.repush_when_valid(peer.appliance, reported.valid_from, now);
    }
    Ok(())
}

/// Why the appliance did not run an operation, as it coded it.
struct ReportedRefusal {
    code: RefusalCode,
    /// Which policy check denied it, for [`RefusalCode::Denied`].
    deny: Option<DenyCode>,
    /// When the approval becomes valid, for [`RefusalCode::ApprovalNotYetValid`] (if sent).
    valid_from: Option<Timestamp>,
}

/// Reads the codes of an `AWAITING_APPROVAL` or `REFUSED` result. A code this build does not
/// know, a missing one, or one that contradicts the outcome is refused, never read as
/// something milder: the reason text beside it is for people and is never parsed.
fn reported_refusal(r: &OperationResult, outcome: OperationOutcome) -> Result<ReportedRefusal, Refuse> {
    let code = refusal_code_from_wire(r.refusal_code)
        .or_else(|e| refuse(format!("the result's refusal code is missing or unknown to this control plane ({e})")))?;
    let awaiting = outcome == OperationOutcome::AwaitingApproval;
    if code.is_retryable() != awaiting {
        return refuse(format!(
            "refusal code {code:?} does not go with outcome {}: a retryable code comes with AWAITING_APPROVAL, a final one with REFUSED",
            outcome.as_str_name()
        ));
    }
    let deny =
        match code {
            RefusalCode::Denied => Some(deny_code_from_wire(r.deny_code).or_else(|e| {
                refuse(format!("a denial's deny code is missing or unknown to this control plane ({e})"))
            })?),
            _ => None,
        };
    let valid_from = (code == RefusalCode::ApprovalNotYetValid && r.valid_from_unix_ms != 0)
        .then(|| Timestamp::from_unix_millis(r.valid_from_unix_ms));
    Ok(ReportedRefusal { code, deny, valid_from })
}

fn result_event(scope: &TenantScope, action: AuditAction, request_id: OperationId, detail: serde_json::Value) -> Event {
    let mut ev = event(scope.principal().actor(), action, Outcome::Success);
    ev.target = Some(request_id.to_string());
    ev.detail = detail;
    ev
}

/// Records a result and its audit record in one transaction.
async fn commit_result(
    mut tx: WriteTx<'_>,
    scope: &TenantScope,
    appliance: ApplianceId,
    request_id: OperationId,
    update: &ResultUpdate<'_>,
    ev: Event,
    now: Timestamp,
) -> Result<(), Refuse> {
    if !tx.record_result(scope, appliance, request_id, update, now).await? {
        return refuse(format!("operation {request_id} already has a final result"));
    }
    tx.audit(&scope.chain(), now, ev).await?;
    tx.commit().await?;
    Ok(())
}

struct VerifiedExecution {
    envelope: Envelope,
    statement: ExecutionStatement,
    cert_pem: String,
    pre_approval_json: Option<String>,
    attestation_json: Option<String>,
}

/// Verifies an execution statement: our CA issued the certificate, the certificate names
/// exactly the appliance on this stream, and the statement is bound to the stored request.
fn verify_execution(
    state: &AppState,
    peer: &ApplianceIdentity,
    op: &OperationRow,
    request: &RequestStatement,
    outcome: OperationOutcome,
    r: &OperationResult,
    now: Timestamp,
) -> Result<VerifiedExecution, Refuse> {
    if [
        &r.execution_envelope_json,
        &r.appliance_certificate_pem,
        &r.pre_approval_envelope_json,
        &r.appliance_attestation_json,
    ]
    .iter()
    .any(|f| f.len() > MAX_ENVELOPE_BYTES)
    {
        return refuse(format!("a signed statement or certificate is larger than {MAX_ENVELOPE_BYTES} bytes"));
    }
    let envelope = Envelope::from_json(r.execution_envelope_json.as_bytes())
        .or_else(|e| refuse(format!("the execution envelope is malformed: {e}")))?;
    let unsigned: ExecutionStatement = serde_json::from_slice(&envelope.payload)
        .or_else(|e| refuse(format!("the execution statement is malformed: {e}")))?;
    // Checked at the time the appliance says it started, as a manifest verifier will: a
    // result resent after a renewal still carries the certificate that signed it. That time
    // is the appliance's claim; it may at least not lie in the control plane's future.
    if unsigned.started_at > now.saturating_add(MAX_CLOCK_SKEW) {
        // Perhaps only the clocks disagree: it may be taken once ours catches up.
        return Err(Refuse::NotYet(format!(
            "the execution claims to have started in the future ({}); check the appliance's clock",
            unsigned.started_at
        )));
    }
    let certified = verify_certified_envelope(
        &envelope,
        EXECUTION_PAYLOAD_TYPE,
        &r.appliance_certificate_pem,
        state.ca.cert_der().as_ref(),
        unsigned.started_at,
    )
    .or_else(|e| refuse(format!("the execution signature does not verify: {e}")))?;
    // Exactly one URI, and it names this stream's appliance: junk beside a good one fails too.
    let signer = match certified.uris.as_slice() {
        [uri] => uri.parse::<ApplianceIdentity>().ok(),
        _ => None,
    };
    if signer.as_ref() != Some(peer) {
        return refuse("the execution was not signed by this appliance's certificate");
    }
    // The payload parsed above is the one the signature covers.
    let statement = unsigned;
    if statement.request_id != op.id || statement.appliance != op.appliance_id {
        return refuse("the execution statement is for another request or appliance");
    }
    if statement.request_digest != op.request_digest || statement.command_sha256 != op.command_sha256 {
        return refuse("the execution statement is for another request digest or command");
    }
    let status_fits = match outcome {
        OperationOutcome::Cancelled => statement.status == ExecutionStatus::Cancelled,
        _ => statement.status != ExecutionStatus::Cancelled,
    };
    if !status_fits {
        return refuse("the outcome does not match the signed execution status");
    }
    let mut pre_approval_json = None;
    match statement.authority.kind {
        AuthorityKind::Grant => {
            let approval = stored_envelope(op, op.approval_envelope.as_deref())?;
            let body = approval.and_then(|env| serde_json::from_slice::<GrantBody>(&env.payload).ok());
            match body {
                Some(b) if statement.authority.digest.as_deref() == Some(b.digest_hex().as_str()) => {
                    if b.decision != ApprovalDecision::Approve {
                        return refuse("executed on a grant that denies this request");
                    }
                }
                _ => return refuse("executed on a grant the control plane did not relay for this request"),
            }
        }
        AuthorityKind::PreApproval => {
            let env = Envelope::from_json(r.pre_approval_envelope_json.as_bytes())
                .or_else(|_| refuse("executed on a pre-approval, but its envelope is missing or malformed"))?;
            if env.payload_type != PRE_APPROVAL_PAYLOAD_TYPE || env.signatures.is_empty() {
                return refuse("the pre-approval envelope is not a signed pre-approval");
            }
            let body: PreApprovalBody = serde_json::from_slice(&env.payload)
                .or_else(|e| refuse(format!("the pre-approval body does not parse: {e}")))?;
            if statement.authority.digest.as_deref() != Some(body.digest_hex().as_str()) {
                return refuse("the execution names another pre-approval than the one sent");
            }
            if body.appliance != op.appliance_id
                || body.template != op.template_name
                || body.template_sha256 != op.template_sha256
                || body.phase != request.request.phase
            {
                return refuse("the pre-approval is for another appliance, template or phase");
            }
            pre_approval_json = Some(env.to_json());
        }
        // The customer's policy allowed it without a per-request signature (the control
        // plane has no customer policy to check it against; `airlock verify --policy` does).
        AuthorityKind::StandingWindow => {}
        // Only the appliance's own probes need no signature, and no template may be one.
        AuthorityKind::Probe => {
            return refuse("an operation template is never a built-in probe; `observe` cannot authorise it");
        }
    }
    let attestation_json = attestation_for(peer, &envelope, &r.appliance_attestation_json)?;
    Ok(VerifiedExecution {
        envelope,
        statement,
        cert_pem: r.appliance_certificate_pem.clone(),
        pre_approval_json,
        attestation_json,
    })
}

/// The customer's attestation sent beside an execution (none from an appliance the customer
/// did not attest, or older ones): it must name the stream's appliance, and its key must have
/// signed the execution. Who signed the attestation is the customer's to check offline.
fn attestation_for(peer: &ApplianceIdentity, execution: &Envelope, json: &str) -> Result<Option<String>, Refuse> {
    let Some(att) = crate::attestation::naming_peer(peer, json).or_else(refuse)? else { return Ok(None) };
    if !att.key.signed(execution, EXECUTION_PAYLOAD_TYPE) {
        return refuse("the execution is not signed by the execution key its attestation names");
    }
    Ok(Some(att.envelope.to_json()))
}
