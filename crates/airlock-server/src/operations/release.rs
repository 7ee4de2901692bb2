//! Releases coming up from appliances, and the sealed output they bring.
//!
//! What can be checked without the execution is checked first, and its refusals are final whether or not the result has arrived.
//! Those are the envelope's type and binding, withheld output that was sent anyway, and any output of a request tagged `output:secret` (one predicate, [`airlock_core::grant::is_secret_output`]).
//! A release that arrives before its operation's result is stored is answered `RETRY`: the appliance keeps it and sends it again after its results.
//! A release of an operation that has no execution (a denied one, say) is refused for good.
//! Output is accepted only if, with the salt sent beside it, it opens the commitment the appliance signed (`airlock_core::output_commitment`; a plain digest for executions signed before salts), and only under a signed release or a commands-and-output pre-approval.
//! A signed release must name that commitment exactly; a salt with withheld output, or a malformed one, is refused.
//! Output and salt are sealed under the KEK at once, with additional data binding tenant and operation, so they open only as this operation's; the manifest reveals the salt ([`released_salt`]).
//! Released output exists in clear only in memory: it is never logged, and the audit gets its commitment only.

use airlock_core::audit::{AuditAction, Outcome};
use airlock_core::dsse::Envelope;
use airlock_core::grant::{ApprovalLevel, PreApprovalBody, SECRET_OUTPUT_TAG};
use airlock_core::operation::{
    AuthorityKind, ExecutionStatement, OperationState, OutputSalt, RELEASE_PAYLOAD_TYPE, ReleaseDecision,
    ReleaseStatement,
};
use airlock_core::{ApplianceIdentity, OperationId};
use airlock_proto::convert::output_salt_from_wire;
use airlock_proto::gateway::{ControlMessage, OperationAckKind, OutputRelease};

use super::reply::{Refuse, finish, refuse};
use super::{MAX_ENVELOPE_BYTES, sanitize, stored_envelope, stored_request};
use crate::authz::TenantScope;
use crate::state::{AppState, event};
use crate::store::{OperationRow, ReleaseUpdate, StoreError};

/// The additional data output is sealed with: it can only be opened as this operation's output.
fn output_aad(scope: &TenantScope, request_id: OperationId) -> Vec<u8> {
    format!("airlock operation output v1\n{}\n{request_id}", scope.tenant()).into_bytes()
}

/// The additional data a released output's salt is sealed with.
fn salt_aad(scope: &TenantScope, request_id: OperationId) -> Vec<u8> {
    format!("airlock operation output salt v1\n{}\n{request_id}", scope.tenant()).into_bytes()
}

/// The salt of an operation's released output, opened; `None` when there is none (not released,
/// or an execution signed before salts).
pub fn released_salt(
    kek: &crate::keys::Kek,
    scope: &TenantScope,
    op: &OperationRow,
) -> Result<Option<OutputSalt>, OutputError> {
    let Some(sealed) = &op.output_salt_sealed else { return Ok(None) };
    let bytes = kek.open(sealed, &salt_aad(scope, op.id)).map_err(OutputError::Unseal)?;
    OutputSalt::try_from(bytes.as_slice())
        .map(Some)
        .map_err(|_| OutputError::Store(StoreError::Corrupt(format!("operation {} output salt", op.id))))
}

/// Why released output cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("no operation {0} in your tenant")]
    NoOperation(OperationId),
    #[error("operation {id} has no released output ({state})")]
    NotReleased { id: OperationId, state: OperationState },
    /// The key-encryption key does not open what is stored.
    #[error("the stored output could not be opened with the key-encryption key")]
    Unseal(crate::keys::KeyError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The released output of operation `id`, opened, with the operation.
pub async fn released_output(
    state: &AppState,
    scope: &TenantScope,
    id: OperationId,
) -> Result<(OperationRow, Vec<u8>), OutputError> {
    let op = state.store.get_operation(scope, id).await?.ok_or(OutputError::NoOperation(id))?;
    let not_released = || OutputError::NotReleased { id, state: op.state };
    if op.state != OperationState::Released {
        return Err(not_released());
    }
    let sealed = state.store.sealed_output(scope, id).await?.ok_or_else(not_released)?;
    let bytes = state.kek.open(&sealed, &output_aad(scope, id)).map_err(OutputError::Unseal)?;
    Ok((op, bytes))
}

/// Handles an `OutputRelease` from `peer`. Output is checked against the signed digest and
/// sealed under the KEK; it is never logged and never audited (only its digest and size).
pub async fn handle_release(
    state: &AppState,
    peer: &ApplianceIdentity,
    scope: &TenantScope,
    rel: OutputRelease,
) -> Option<ControlMessage> {
    let shown = sanitize(&rel.request_id, 64);
    let result = match rel.request_id.parse::<OperationId>() {
        Ok(id) => apply_release(state, peer, scope, id, &rel).await,
        Err(e) => refuse(format!("the release's request id is malformed: {e}")),
    };
    finish(state, scope, &shown, OperationAckKind::Release, AuditAction::OperationReleaseRefused, result).await
}

async fn apply_release(
    state: &AppState,
    peer: &ApplianceIdentity,
    scope: &TenantScope,
    request_id: OperationId,
    rel: &OutputRelease,
) -> Result<(), Refuse> {
    let now = state.now();
    let mut tx = state.store.write().await?;
    let Some(op) = tx.operation(scope, request_id).await?.filter(|op| op.appliance_id == peer.appliance) else {
        return refuse(format!("no operation {request_id} for this appliance"));
    };
    if rel.release_envelope_json.len() > MAX_ENVELOPE_BYTES {
        return refuse(format!("the release envelope is larger than {MAX_ENVELOPE_BYTES} bytes"));
    }
    let release_env = if rel.release_envelope_json.is_empty() {
        None
    } else {
        Some(
            Envelope::from_json(rel.release_envelope_json.as_bytes())
                .or_else(|e| refuse(format!("the release envelope is malformed: {e}")))?,
        )
    };
    let release_json = release_env.as_ref().map(Envelope::to_json);
    if matches!(op.state, OperationState::Released | OperationState::Withheld) {
        return if op.release_envelope == release_json {
            Ok(())
        } else {
            refuse(format!("the output of operation {request_id} was already {}", op.state))
        };
    }
    let request = stored_request(&op)?;
    let secret = request.request.output_is_secret();
    // What can be checked without the execution is checked first: those refusals are final
    // whether or not the result has arrived.
    let signed = match &release_env {
        None => None,
        Some(env) => {
            if env.payload_type != RELEASE_PAYLOAD_TYPE || env.signatures.is_empty() {
                return refuse(format!("the release envelope is not a signed release ({RELEASE_PAYLOAD_TYPE})"));
            }
            let body: ReleaseStatement = serde_json::from_slice(&env.payload)
                .or_else(|e| refuse(format!("the release statement is malformed: {e}")))?;
            if body.request_id != op.id || body.appliance != op.appliance_id {
                return refuse("the release is for another request or appliance");
            }
            Some(body)
        }
    };
    // Without a signed release, output goes only under a commands-and-output pre-approval.
    let decision = signed.as_ref().map_or(ReleaseDecision::Release, |b| b.decision);
    match decision {
        ReleaseDecision::Release if secret => {
            return refuse(format!("output of a request tagged `{SECRET_OUTPUT_TAG}` is never accepted"));
        }
        ReleaseDecision::Withhold if !rel.output.is_empty() || !rel.output_salt.is_empty() => {
            return refuse("withheld output (and its salt) must not be sent");
        }
        _ => {}
    }
    let salt = output_salt_from_wire(&rel.output_salt).or_else(|e| refuse(e.to_string()))?;
    // Until its result is stored, any pending operation may yet show an execution: even a
    // denied one, run on the customer's earlier authority before the denial reached the
    // appliance. The appliance resends its results before its releases, and holds a release
    // only for a run it executed, so this one is taken (or refused with its result) later.
    let pending =
        matches!(op.state, OperationState::AwaitingApproval | OperationState::Approved | OperationState::Denied);
    if op.result_at.is_none() && pending {
        // (The words "no execution recorded yet" keep appliances that predate ack codes,
        // which read them, keeping the release too.)
        return Err(Refuse::NotYet(format!(
            "operation {request_id} has no execution recorded yet ({}); send it again after its result",
            op.state
        )));
    }
    if !matches!(op.state, OperationState::Executed | OperationState::Cancelled) {
        return refuse(format!(
            "operation {request_id} has no execution whose output could be released ({})",
            op.state
        ));
    }
    let execution: ExecutionStatement = stored_envelope(&op, op.execution_envelope.as_deref())?
        .and_then(|env| serde_json::from_slice(&env.payload).ok())
        .ok_or_else(|| Refuse::Store(StoreError::Corrupt(format!("operation {request_id} execution statement"))))?;
    let approver = match &signed {
        None => {
            let pre = stored_envelope(&op, op.pre_approval_envelope.as_deref())?
                .and_then(|env| serde_json::from_slice::<PreApprovalBody>(&env.payload).ok());
            match pre {
                Some(p)
                    if p.level == ApprovalLevel::CommandsAndOutput
                        && execution.authority.kind == AuthorityKind::PreApproval =>
                {
                    format!("pre-approval {}", p.id)
                }
                _ => return refuse("output without a customer release needs a commands-and-output pre-approval"),
            }
        }
        Some(body) => {
            if body.output_commitment != execution.output_commitment {
                return refuse("the release names other output than the signed execution");
            }
            sanitize(&body.approver, 100)
        }
    };
    let (sealed, sealed_salt) = match decision {
        ReleaseDecision::Release => {
            if let Err(why) = execution.output_commitment.check(salt.as_ref(), &rel.output) {
                return refuse(format!("the output does not open the commitment the appliance signed: {why}"));
            }
            let output =
                state.kek.seal(&rel.output, &output_aad(scope, request_id)).or_else(|e| refuse(e.to_string()))?;
            let salt = match &salt {
                Some(s) => Some(
                    state.kek.seal(s.as_bytes(), &salt_aad(scope, request_id)).or_else(|e| refuse(e.to_string()))?,
                ),
                None => None,
            };
            (Some(output), salt)
        }
        ReleaseDecision::Withhold => (None, None),
    };
    let new_state =
        if decision == ReleaseDecision::Release { OperationState::Released } else { OperationState::Withheld };
    let update = ReleaseUpdate {
        state: new_state,
        release_envelope: release_json.as_deref(),
        output_sealed: sealed.as_deref(),
        output_salt_sealed: sealed_salt.as_deref(),
    };
    if !tx.record_release(scope, peer.appliance, request_id, &update, now).await? {
        // Cannot happen under the write lock; if it does, the appliance sends it again.
        return Err(Refuse::NotYet(format!("operation {request_id} changed while its release was checked")));
    }
    let action = if new_state == OperationState::Released {
        AuditAction::OperationReleased
    } else {
        AuditAction::OperationWithheld
    };
    let mut ev = event(scope.principal().actor(), action, Outcome::Success);
    ev.target = Some(request_id.to_string());
    // The commitment only: the output itself never reaches the audit or the logs.
    ev.detail = serde_json::json!({
        "output_commitment": execution.output_commitment,
        "approver": approver,
        "signed_release": release_env.is_some(),
    });
    tx.audit(&scope.chain(), now, ev).await?;
    tx.commit().await?;
    Ok(())
}
