//! What the appliance sends the control plane about operations, and what it does with each answer.
//!
//! Every result and release is written to the outbox (`crate::ops_store`) before it is sent, and
//! leaves the outbox only when the control plane acknowledges it as stored.
//! One sender at a time uses the stream, so messages go out in the order they were queued.
//! After every `Welcome` the whole outbox is sent again, every result before any release, before
//! anything else the appliance sends: the control plane takes no release before its result.
//! A release that reaches the control plane before its result is answered `Retry`: it stays in
//! the outbox, and goes as soon as its result is acknowledged.
//! A result the control plane refuses for good can never be followed by its release: both are
//! parked (kept on disk in `parked/`, out of the outbox), so they are not resent at every
//! reconnect, and the parking is audited; a release decided later is parked at once.
//! Acks are decided on their code alone; their text is for people.

use std::sync::{Arc, Mutex};

use airlock_core::OperationId;
use airlock_core::audit::{AuditAction, Outcome};
use airlock_core::operation::AckCode;
use airlock_proto::convert::ack_code_from_wire;
use airlock_proto::gateway::{ApplianceMessage, OperationAck, OperationAckKind};
use tokio::sync::mpsc;

use crate::ApplianceError;
use crate::audit_log::AuditLog;
use crate::ops_store::{OpStore, ReleaseItem};
use crate::result::ResultMsg;

/// The appliance's side of the stream for operation results and releases.
pub(crate) struct Outbound {
    ops: Arc<OpStore>,
    audit: Arc<AuditLog>,
    /// The current stream to the control plane, while connected.
    stream: Mutex<Option<mpsc::Sender<ApplianceMessage>>>,
    /// One sender at a time: the outbox resent at a (re)connect goes out whole, results first,
    /// before anything sent after it.
    sending: tokio::sync::Mutex<()>,
}

impl Outbound {
    pub(crate) fn new(ops: Arc<OpStore>, audit: Arc<AuditLog>) -> Self {
        Self { ops, audit, stream: Mutex::new(None), sending: tokio::sync::Mutex::new(()) }
    }

    /// Queues a result in the outbox; it is sent by whoever holds it next.
    pub(crate) fn queue_result(&self, result: &ResultMsg) -> Result<(), ApplianceError> {
        self.ops.queue_result(result)
    }

    /// Queues a release in the outbox and returns the message to send now, or `None` when it
    /// was parked: the control plane refused the operation's result for good, so it can never
    /// accept this release.
    pub(crate) fn queue_release(&self, item: &ReleaseItem) -> Result<Option<ApplianceMessage>, ApplianceError> {
        if !self.ops.queue_release(item)? {
            self.audit_parked(item.request_id, "the control plane refused this operation's result for good");
            return Ok(None);
        }
        self.ops.release_message(item).map(Some)
    }

    /// The stream ended: messages wait in the outbox until the next one.
    pub(crate) fn disconnected(&self) {
        *self.stream.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Sends to the control plane if connected, after any resend in progress; what is in the
    /// outbox goes again at reconnect.
    pub(crate) async fn send(&self, msg: ApplianceMessage) {
        let _one_sender = self.sending.lock().await;
        let tx = self.stream.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(tx) = tx {
            let _ = tx.send(msg).await;
        }
    }

    /// A stream to the control plane is up (its `Welcome` came): it becomes the outbound
    /// stream, and everything the control plane has not acknowledged goes on it, every result
    /// before any release, before any other message can be sent.
    pub(crate) async fn connected(&self, tx: mpsc::Sender<ApplianceMessage>) {
        let _one_sender = self.sending.lock().await;
        *self.stream.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx.clone());
        match self.ops.pending() {
            Ok(msgs) => {
                if !msgs.is_empty() {
                    tracing::info!(count = msgs.len(), "resending unacknowledged operation results and releases");
                }
                for m in msgs {
                    if tx.send(m).await.is_err() {
                        break;
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot read the outbox"),
        }
    }

    /// What the control plane did with a result or release, by its code.
    ///
    /// - Stored: the item leaves the outbox. When a result is stored, the release of the same
    ///   operation waiting in the outbox is returned, to send now.
    /// - Retry: not stored yet (a release ahead of its result): it stays in the outbox.
    /// - Refused: final, and audited. A refused result is parked with its release; a refused
    ///   release is parked.
    /// - A code this build does not know, or none: the item stays in the outbox, never taken
    ///   as stored, and the error is logged and audited.
    #[must_use = "a release waiting for this result must be sent"]
    pub(crate) fn on_ack(&self, ack: &OperationAck) -> Option<ApplianceMessage> {
        let Ok(id) = ack.request_id.parse::<OperationId>() else {
            tracing::warn!(request_id = %ack.request_id, "ignoring an acknowledgement of something that is not an operation");
            return None;
        };
        // What was acknowledged, and how: an unknown kind is as unusable as an unknown code.
        let release = match OperationAckKind::try_from(ack.kind) {
            Ok(OperationAckKind::Result) => Ok(false),
            Ok(OperationAckKind::Release) => Ok(true),
            Ok(OperationAckKind::Unspecified) | Err(_) => {
                Err(airlock_proto::convert::UnknownWireValue { field: "ack kind", value: ack.kind })
            }
        };
        let kind = match release {
            Ok(true) => "release",
            Ok(false) => "result",
            Err(_) => "unknown",
        };
        let code = match release.and_then(|_| ack_code_from_wire(ack.code)) {
            Ok(code) => code,
            Err(unknown) => {
                tracing::error!(request_id = %id, kind, error = %unknown, "the control plane answered with an ack this appliance does not understand; keeping the item to send again");
                let detail = serde_json::json!({ "request_id": id, "kind": kind, "reason": unknown.to_string(), "error": ack.error });
                if let Err(e) = self.audit.record(AuditAction::OperationError, Outcome::Error, detail) {
                    tracing::error!(error = %e, "cannot audit an unknown acknowledgement");
                }
                return None;
            }
        };
        let release = kind == "release";
        match code {
            AckCode::Retry => {
                tracing::warn!(request_id = %id, kind, error = %ack.error, "the control plane cannot take this yet; keeping it to send again");
                None
            }
            AckCode::Refused => {
                self.refused(id, release, &ack.error);
                None
            }
            AckCode::Stored => self.stored(id, release),
        }
    }

    /// Drops a stored item; for a result, returns the release waiting for it, if any.
    fn stored(&self, id: OperationId, release: bool) -> Option<ApplianceMessage> {
        if let Err(e) = self.ops.acknowledge(id, release) {
            tracing::error!(error = %e, "cannot drop an acknowledged outbox item");
        }
        if release {
            return None;
        }
        match self.ops.queued_release(id) {
            Ok(next) => next,
            Err(e) => {
                tracing::error!(request_id = %id, error = %e, "cannot read a queued release");
                None
            }
        }
    }

    /// Audits a final refusal, then parks what can never be accepted. If the refusal cannot
    /// be audited, the item stays in the outbox, to be refused (and audited) again.
    fn refused(&self, id: OperationId, release: bool, error: &str) {
        let kind = if release { "release" } else { "result" };
        tracing::error!(request_id = %id, kind, error, "the control plane refused an operation message for good");
        if let Err(e) = self.audit.record(
            AuditAction::OperationAckRefused,
            Outcome::Error,
            serde_json::json!({ "request_id": id, "kind": kind, "error": error }),
        ) {
            tracing::error!(error = %e, "cannot audit a refused acknowledgement; keeping the outbox item");
            return;
        }
        let parked = if release { self.ops.park_release(id) } else { self.ops.park(id) };
        match parked {
            Ok(true) => self.audit_parked(id, error),
            Ok(false) => {}
            Err(e) => tracing::error!(request_id = %id, kind, error = %e, "cannot park a refused outbox item"),
        }
    }

    fn audit_parked(&self, id: OperationId, error: &str) {
        tracing::warn!(request_id = %id, error, "the control plane refused this operation for good; parking its release");
        if let Err(e) = self.audit.record(
            AuditAction::OperationReleaseParked,
            Outcome::Error,
            serde_json::json!({ "request_id": id, "reason": error }),
        ) {
            tracing::error!(error = %e, "cannot audit a parked release");
        }
    }
}

#[cfg(test)]
mod tests;
