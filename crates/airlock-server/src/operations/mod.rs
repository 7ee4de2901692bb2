//! Signed operations on the control plane: a vendor's request, the customer's approval, the appliance's result and the customer's release of the output.
//!
//! Trust boundary: the control plane holds no customer key, so it cannot verify approvals or releases; it checks their structure and binding only, and relays them unchanged.
//! What it does verify is the appliance's execution statement: signed by a certificate from our CA naming exactly the appliance on the stream, and bound to the stored request.
//!
//! States ([`airlock_core::operation::OperationState`]): `awaiting_approval` → `approved` or `denied` → `executed`, `cancelled` or `refused` → `released` or `withheld`.
//! `denied` stays `denied` when the appliance confirms its refusal.
//! It becomes `executed` (flagged in the audit) only when a signed execution shows that the appliance ran it on the customer's own earlier authority before the denial reached it.
//!
//! Where each step lives: [`request`](request()) (signing and storing a request), [`approval`](relay_approval) (relaying the customer's decision), [`templates`](push_template).
//! Coming up the stream: [`results`](handle_result) and [`release`](handle_release), both answered through the coded acks of `reply`.
//! Whatever is to go down the stream after a change is [`crate::push`]'s business.

mod approval;
mod compiled;
mod release;
mod reply;
mod request;
mod results;
mod templates;

use airlock_core::dsse::Envelope;
use airlock_core::operation::{Manifest, RequestStatement};

pub use approval::{ApprovalError, RelayError, check_approval, relay_approval};
pub use compiled::{CompileError, CompiledTemplates};
pub use release::{OutputError, handle_release, released_output, released_salt};
pub use request::{NewOperation, RequestError, Requested, Target, request, request_many};
pub use results::handle_result;
pub use templates::{PushTemplateError, PushedTemplate, push_template};

use crate::authz::TenantScope;
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

/// The operation's manifest: every signed statement stored for it, with the certificates that
/// verify them.
/// The salt of released output is opened (it is sealed under the KEK) and revealed beside it,
/// so the manifest checks the output offline.
pub fn manifest(kek: &crate::keys::Kek, scope: &TenantScope, op: &OperationRow) -> Result<Manifest, OutputError> {
    let request = stored_envelope(op, Some(&op.request_envelope))?
        .ok_or_else(|| StoreError::Corrupt(format!("operation {} has no request", op.id)))?;
    let mut m = Manifest::new(op.id, request, op.control_plane_cert_pem.clone());
    m.approval = stored_envelope(op, op.approval_envelope.as_deref())?;
    m.pre_approval = stored_envelope(op, op.pre_approval_envelope.as_deref())?;
    m.execution = stored_envelope(op, op.execution_envelope.as_deref())?;
    m.appliance_certificate = op.appliance_cert_pem.clone();
    m.appliance_attestation = stored_envelope(op, op.appliance_attestation.as_deref())?;
    m.release = stored_envelope(op, op.release_envelope.as_deref())?;
    m.output_salt = released_salt(kek, scope, op)?;
    Ok(m)
}

/// Off the network: short and printable.
fn sanitize(s: &str, max: usize) -> String {
    s.chars().filter(|c| !c.is_control()).take(max).collect()
}
