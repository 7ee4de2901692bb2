//! Relayed approvals: the structure and binding checks the control plane can make.

use airlock_core::dsse::Envelope;
use airlock_core::grant::{GRANT_PAYLOAD_TYPE, GrantBody};
use airlock_core::operation::RequestStatement;

use crate::store::OperationRow;

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
