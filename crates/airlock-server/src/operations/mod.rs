//! Signed operations on the control plane: the operations-signing identity, operation states,
//! the instructions pushed to appliances, and the checks on what appliances report back.
//!
//! Trust boundary: the control plane holds no customer key, so it cannot verify approvals or
//! releases; it checks their structure and binding only, and relays them unchanged. What it
//! does verify is the appliance's execution statement: signed by a certificate from our CA
//! naming exactly the appliance on the stream, and bound to the stored request.

mod approval;
mod release;
mod reply;
mod results;
#[cfg(test)]
mod tests;

use airlock_core::dsse::Envelope;
use airlock_core::operation::RequestStatement;

pub use approval::{ApprovalError, check_approval};
pub use release::{handle_release, open_output};
pub use results::handle_result;

use crate::store::{OperationRow, StoreError};

/// Largest signed statement (envelope JSON) or certificate PEM stored from an appliance or
/// relayed for a customer; real ones are a few KiB.
pub const MAX_ENVELOPE_BYTES: usize = 64 * 1024;

/// The request statement of a stored operation (signed by us, so only corruption fails).
pub fn stored_request(op: &OperationRow) -> Result<RequestStatement, StoreError> {
    let env = Envelope::from_json(op.request_envelope.as_bytes())
        .map_err(|e| StoreError::Corrupt(format!("operation {} request envelope: {e}", op.id)))?;
    serde_json::from_slice(&env.payload)
        .map_err(|e| StoreError::Corrupt(format!("operation {} request statement: {e}", op.id)))
}

/// Parses a stored envelope column.
pub fn stored_envelope(op: &OperationRow, json: Option<&str>) -> Result<Option<Envelope>, StoreError> {
    json.map(|j| {
        Envelope::from_json(j.as_bytes()).map_err(|e| StoreError::Corrupt(format!("operation {} envelope: {e}", op.id)))
    })
    .transpose()
}

/// Off the network: short and printable.
fn sanitize(s: &str, max: usize) -> String {
    s.chars().filter(|c| !c.is_control()).take(max).collect()
}
