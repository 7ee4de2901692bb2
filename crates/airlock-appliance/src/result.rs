//! What the appliance answers about one operation: it ran, or why it did not.
//!
//! A refusal is a decision the control plane acts on: a [`RefusalCode`], the [`DenyCode`] of the
//! policy check that denied it, and when an approval that is not valid yet becomes valid.
//! The sentence beside it is for people; nothing on either side parses it.
//! A finished answer is stored with its operation and answered again as it is, so the same
//! request always gets the same answer.

use airlock_core::grant::{DenyCode, DenyReason};
use airlock_core::operation::RefusalCode;
use airlock_core::{OperationId, Timestamp};
use airlock_proto::convert;
use airlock_proto::gateway::{ApplianceMessage, OperationOutcome, OperationResult, appliance_message};
use serde::{Deserialize, Serialize};

/// What the appliance answers about one request, as sent in `OperationResult`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Outcome {
    AwaitingApproval,
    Refused,
    Executed,
    Cancelled,
}

/// Why the appliance did not run an operation (yet), as the control plane decides on it: a
/// code, which policy check denied it, and when an approval that is not valid yet becomes
/// valid. The sentence beside it ([`ResultMsg::reason`]) is for people only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Refusal {
    pub code: RefusalCode,
    /// Set when `code` is [`RefusalCode::Denied`]: which check denied it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deny: Option<DenyCode>,
    /// Set when `code` is [`RefusalCode::ApprovalNotYetValid`]: when the approval becomes valid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_from: Option<Timestamp>,
}

impl Refusal {
    /// A refusal with nothing to say beside its code.
    pub(crate) fn new(code: RefusalCode) -> Self {
        Self { code, deny: None, valid_from: None }
    }

    /// What evaluating the customer's policy and authority denied. A signed denial by the
    /// customer has its own code; every other check is [`RefusalCode::Denied`] with the check
    /// named, and an approval not valid yet is not final.
    pub(crate) fn denied(reason: &DenyReason) -> Self {
        match reason {
            DenyReason::CustomerDenied => Self::new(RefusalCode::CustomerDenied),
            DenyReason::GrantNotYetValid { not_before } => Self::not_yet_valid(*not_before),
            other => Self { code: RefusalCode::Denied, deny: Some(other.code()), valid_from: None },
        }
    }

    /// The customer's approval holds from `valid_from` on: the control plane offers the
    /// request again then.
    pub(crate) fn not_yet_valid(valid_from: Timestamp) -> Self {
        Self { code: RefusalCode::ApprovalNotYetValid, deny: None, valid_from: Some(valid_from) }
    }
}

/// An `OperationResult`, in a form the state directory can hold.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ResultMsg {
    pub request_id: OperationId,
    pub outcome: Outcome,
    /// Why it did not run, for people only: nothing decides on it.
    #[serde(default)]
    pub reason: String,
    /// Why it did not run (`AwaitingApproval`, `Refused`), as the control plane decides on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<Refusal>,
    #[serde(default)]
    pub execution_envelope_json: String,
    #[serde(default)]
    pub appliance_certificate_pem: String,
    #[serde(default)]
    pub pre_approval_envelope_json: String,
    /// The customer's attestation of the execution key (empty before they made one).
    #[serde(default)]
    pub appliance_attestation_json: String,
}

impl ResultMsg {
    /// An operation that ran: `Executed` or `Cancelled`.
    pub(crate) fn ran(request_id: OperationId, outcome: Outcome) -> Self {
        Self {
            request_id,
            outcome,
            reason: String::new(),
            refusal: None,
            execution_envelope_json: String::new(),
            appliance_certificate_pem: String::new(),
            pre_approval_envelope_json: String::new(),
            appliance_attestation_json: String::new(),
        }
    }

    /// An operation that did not run: awaiting approval if its refusal is not final, else refused.
    pub(crate) fn refused(request_id: OperationId, refusal: Refusal, reason: impl Into<String>) -> Self {
        let outcome = if refusal.code.is_retryable() { Outcome::AwaitingApproval } else { Outcome::Refused };
        Self { reason: reason.into(), refusal: Some(refusal), ..Self::ran(request_id, outcome) }
    }

    pub(crate) fn to_proto(&self) -> OperationResult {
        let outcome = match self.outcome {
            Outcome::AwaitingApproval => OperationOutcome::AwaitingApproval,
            Outcome::Refused => OperationOutcome::Refused,
            Outcome::Executed => OperationOutcome::Executed,
            Outcome::Cancelled => OperationOutcome::Cancelled,
        };
        // A refusal stored before refusal codes existed has none: it goes as the final
        // refusal it was, `Unclassified`, never as an unspecified code the control plane refuses.
        let legacy = (self.outcome == Outcome::Refused && self.refusal.is_none()).then_some(Refusal {
            code: RefusalCode::Unclassified,
            deny: None,
            valid_from: None,
        });
        let refusal = self.refusal.as_ref().or(legacy.as_ref());
        OperationResult {
            request_id: self.request_id.to_string(),
            outcome: outcome as i32,
            reason: self.reason.clone(),
            execution_envelope_json: self.execution_envelope_json.clone(),
            appliance_certificate_pem: self.appliance_certificate_pem.clone(),
            pre_approval_envelope_json: self.pre_approval_envelope_json.clone(),
            appliance_attestation_json: self.appliance_attestation_json.clone(),
            refusal_code: refusal.map_or(0, |r| convert::refusal_code_to_wire(r.code) as i32),
            deny_code: refusal.and_then(|r| r.deny).map_or(0, |d| convert::deny_code_to_wire(d) as i32),
            valid_from_unix_ms: refusal.and_then(|r| r.valid_from).map_or(0, Timestamp::unix_millis),
        }
    }

    pub(crate) fn to_message(&self) -> ApplianceMessage {
        ApplianceMessage { body: Some(appliance_message::Body::OperationResult(self.to_proto())) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_stored_before_codes_existed_is_sent_as_final_and_unclassified() {
        // The form an appliance of the previous version stored in `record.json` and the outbox.
        let id = OperationId::from_random([9; 16]);
        let legacy =
            format!(r#"{{"request_id":"{id}","outcome":"refused","reason":"the request is for another appliance"}}"#);
        let stored: ResultMsg = serde_json::from_str(&legacy).unwrap();
        let wire = stored.to_proto();
        assert_eq!(wire.outcome, OperationOutcome::Refused as i32);
        assert_eq!(convert::refusal_code_from_wire(wire.refusal_code), Ok(RefusalCode::Unclassified));
        // A refusal decided now keeps its own code.
        let now = ResultMsg::refused(id, Refusal::denied(&DenyReason::NoPolicy), "no policy");
        assert_eq!(convert::refusal_code_from_wire(now.to_proto().refusal_code), Ok(RefusalCode::Denied));
    }
}
