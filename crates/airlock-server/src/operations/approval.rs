//! Relaying the customer's approval (or denial) of a request.
//!
//! The control plane holds no customer key, so it cannot check an approval's signatures.
//! It checks the structure and that the approval binds this request (id, digest, command, appliance, phase), stores it unchanged and pushes it to the appliance, which verifies the signatures against the customer keys it pinned.
//! An approval is relayed only while the operation awaits one; a second one, even a valid one, is a conflict.

use airlock_core::OperationId;
use airlock_core::audit::{AuditAction, Outcome};
use airlock_core::dsse::Envelope;
use airlock_core::grant::{ApprovalDecision, GRANT_PAYLOAD_TYPE, GrantBody};
use airlock_core::operation::{OperationState, RequestStatement};

use super::{MAX_ENVELOPE_BYTES, stored_request};
use crate::authz::TenantScope;
use crate::push::Work;
use crate::state::{AppState, event};
use crate::store::{OperationRow, StoreError};

/// Why a relayed approval was not stored.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("no operation {0} in your tenant")]
    NoOperation(OperationId),
    #[error("the envelope is larger than {MAX_ENVELOPE_BYTES} bytes")]
    TooLarge,
    #[error("the envelope is not a DSSE envelope: {0}")]
    NotAnEnvelope(String),
    #[error(transparent)]
    Approval(#[from] ApprovalError),
    #[error("operation {id} is {state}; an approval is relayed only while it awaits approval")]
    NotAwaiting { id: OperationId, state: OperationState },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Relays the customer's approval (or denial) of operation `id`, given as the JSON of a DSSE
/// envelope: checks it, stores it unchanged with its audit record (noted in the push index
/// around the commit), and pushes it to the appliance. Returns the operation as it is now.
pub async fn relay_approval(
    state: &AppState,
    scope: &TenantScope,
    id: OperationId,
    envelope: serde_json::Value,
) -> Result<OperationRow, RelayError> {
    let op = state.store.get_operation(scope, id).await?.ok_or(RelayError::NoOperation(id))?;
    if envelope.to_string().len() > MAX_ENVELOPE_BYTES {
        return Err(RelayError::TooLarge);
    }
    let envelope: Envelope = serde_json::from_value(envelope).map_err(|e| RelayError::NotAnEnvelope(e.to_string()))?;
    let request = stored_request(&op)?;
    let grant = check_approval(&envelope, &op, &request)?;
    if op.state != OperationState::AwaitingApproval || op.approval_envelope.is_some() {
        return Err(RelayError::NotAwaiting { id, state: op.state });
    }
    let now = state.now();
    let new_state = match grant.decision {
        ApprovalDecision::Approve => OperationState::Approved,
        ApprovalDecision::Deny => OperationState::Denied,
    };
    let mut ev = event(scope.principal().actor(), AuditAction::OperationApprovalRelayed, Outcome::Success);
    ev.target = Some(id.to_string());
    ev.detail = serde_json::json!({
        "decision": grant.decision,
        "approver": grant.approver,
        "grant_digest": grant.digest_hex(),
        "not_before": grant.not_before,
        "not_after": grant.not_after,
        "signatures": envelope.signatures.len(),
    });
    // Before the write: from here on, an answer about this operation is judged from the store, so an
    // answer to the approved instruction is never taken for one awaiting approval.
    state.push.forget_awaiting(id);
    // The row is read inside the transaction that changed it: once the change commits,
    // nothing can fail the call (and audit an error beside the committed success).
    let relayed = state
        .push
        .noting(Work::Operation(op.appliance_id), async {
            let mut tx = state.store.write().await?;
            if !tx.set_approval(scope, id, &envelope.to_json(), new_state, now).await? {
                // Decided meanwhile.
                let now_state = tx.operation(scope, id).await?.map_or(op.state, |op| op.state);
                return Err(RelayError::NotAwaiting { id, state: now_state });
            }
            tx.audit(&scope.chain(), now, ev).await?;
            let relayed = tx.operation(scope, id).await?.ok_or(RelayError::NoOperation(id))?;
            tx.commit().await?;
            Ok(relayed)
        })
        .await?;
    tracing::info!(operation = %id, decision = ?grant.decision, "approval relayed");
    state.push.operations(scope, op.appliance_id, Some(id)).await;
    Ok(relayed)
}

/// Why a relayed approval is refused (400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApprovalError {
    #[error("the envelope is not an approval: its payload type is `{found}`, expected `{expected}`")]
    NotAGrant { found: String, expected: &'static str },
    #[error("the envelope carries no signature; have the customer sign it with `airlock customer` tools")]
    Unsigned,
    #[error("the envelope carries more than {} signatures", airlock_core::dsse::MAX_SIGNATURES)]
    TooManySignatures,
    #[error("the approval body does not parse: {0}")]
    Body(String),
    #[error("the approval is for another {0} than this operation's")]
    Binding(&'static str),
}

/// Checks an approval's structure and its binding to the stored request. The signatures are
/// the appliance's to verify against the customer keys it pinned.
pub fn check_approval(
    env: &Envelope,
    op: &OperationRow,
    request: &RequestStatement,
) -> Result<GrantBody, ApprovalError> {
    if env.payload_type != GRANT_PAYLOAD_TYPE {
        return Err(ApprovalError::NotAGrant {
            found: env.payload_type.chars().take(100).collect(),
            expected: GRANT_PAYLOAD_TYPE,
        });
    }
    if env.signatures.is_empty() {
        return Err(ApprovalError::Unsigned);
    }
    if env.signatures.len() > airlock_core::dsse::MAX_SIGNATURES {
        return Err(ApprovalError::TooManySignatures);
    }
    let body: GrantBody = serde_json::from_slice(&env.payload).map_err(|e| ApprovalError::Body(e.to_string()))?;
    if body.request_id != op.id {
        return Err(ApprovalError::Binding("request id"));
    }
    if body.request_digest != op.request_digest {
        return Err(ApprovalError::Binding("request digest"));
    }
    if body.command_sha256 != op.command_sha256 {
        return Err(ApprovalError::Binding("command"));
    }
    if body.appliance != op.appliance_id {
        return Err(ApprovalError::Binding("appliance"));
    }
    if body.phase != request.request.phase {
        return Err(ApprovalError::Binding("phase"));
    }
    Ok(body)
}
