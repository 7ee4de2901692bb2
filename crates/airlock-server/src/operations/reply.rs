//! Answering what an appliance reported: every ack carries a code, and the appliance acts on the code only.
//!
//! `STORED`: taken (or already held); the appliance drops it from its outbox.
//! `RETRY`: not acceptable yet through no fault of its own (a release before its result); kept and sent again, and not audited as a refusal.
//! `REFUSED`: refused for good; audited (rate limited) in the tenant's chain, and the appliance parks its copy.
//! When the store fails there is no ack at all, so the appliance sends it again later.
//! The `error` text says why, for people only.

use airlock_core::audit::{AuditAction, Outcome};
use airlock_core::operation::AckCode;
use airlock_proto::convert::ack_code_to_wire;
use airlock_proto::gateway::{ControlMessage, OperationAck, OperationAckKind, control_message};

use crate::authz::TenantScope;
use crate::state::{AppState, event};
use crate::store::StoreError;

/// A result or release the control plane will not store; the appliance is told why.
pub(super) enum Refuse {
    /// Refused for good: acknowledged [`AckCode::Refused`] with this error.
    Because(String),
    /// The store failed: no acknowledgement, so the appliance sends it again later.
    Store(StoreError),
    /// Not acceptable yet, but it may be later (a release that overtook its operation's
    /// result): acknowledged [`AckCode::Retry`], so the appliance keeps it and sends it again
    /// after its results. Not a refusal, so not audited as one.
    NotYet(String),
}

impl From<StoreError> for Refuse {
    fn from(e: StoreError) -> Self {
        Refuse::Store(e)
    }
}

pub(super) fn refuse<T>(why: impl Into<String>) -> Result<T, Refuse> {
    Err(Refuse::Because(why.into()))
}

fn ack(request_id: &str, kind: OperationAckKind, code: AckCode, error: String) -> ControlMessage {
    ControlMessage {
        body: Some(control_message::Body::OperationAck(OperationAck {
            request_id: request_id.to_owned(),
            kind: kind as i32,
            error,
            code: ack_code_to_wire(code) as i32,
        })),
    }
}

pub(super) async fn finish(
    state: &AppState,
    scope: &TenantScope,
    request_id: &str,
    kind: OperationAckKind,
    action: AuditAction,
    result: Result<(), Refuse>,
) -> Option<ControlMessage> {
    match result {
        Ok(()) => Some(ack(request_id, kind, AckCode::Stored, String::new())),
        Err(Refuse::Because(why)) => {
            tracing::info!(operation = %request_id, reason = %why, "refused an appliance's {action}");
            let mut ev = event(scope.principal().actor(), action, Outcome::Denied);
            ev.target = Some(request_id.to_owned());
            ev.detail = serde_json::json!({ "reason": why });
            state.audit_refusal(&scope.chain(), ev).await;
            Some(ack(request_id, kind, AckCode::Refused, why))
        }
        Err(Refuse::Store(e)) => {
            tracing::error!(error = %e, operation = %request_id, "cannot record an appliance's {action}; it will be resent");
            None
        }
        Err(Refuse::NotYet(why)) => {
            // The appliance sends it again after its results, and may on every reconnect until
            // it can be taken: a note, rate limited like refusals, and nothing durable.
            if let Some(suppressed) =
                state.refusal_limiter.admit(&scope.chain(), AuditAction::OperationDeferred.as_str(), state.now())
            {
                tracing::info!(operation = %request_id, reason = %why, suppressed, "deferred an appliance's {action}; it will be resent");
            }
            Some(ack(request_id, kind, AckCode::Retry, why))
        }
    }
}
