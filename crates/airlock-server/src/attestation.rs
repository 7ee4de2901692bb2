//! The customer's attestation of an appliance's execution key, as the control plane handles it.
//!
//! The control plane holds no customer key, so it cannot check who signed an attestation
//! (`airlock verify` and the appliance do). What it checks is that the attestation names the
//! appliance that sent it: in its Hello on every connect ([`crate::appliances::hello_attestation`]),
//! and beside each execution (`operations::results`). The key it names goes into every
//! request made for the appliance (`operations::request`), so the customer's approval covers
//! that one host even if the vendor gave another host the same appliance id.

use airlock_core::ApplianceIdentity;
use airlock_core::dsse::Envelope;
use airlock_core::execution_key::{ExecutionPublicKey, read_attestation};

use crate::store::StoreError;

/// Longest attestation accepted from an appliance (one is a few hundred bytes).
pub const MAX_ATTESTATION_BYTES: usize = 64 * 1024;

/// An attestation that names the appliance that sent it (its customer signature unchecked).
#[derive(Debug)]
pub struct NamingPeer {
    pub envelope: Envelope,
    pub key: ExecutionPublicKey,
}

/// Reads an attestation `peer` sent: `None` when it sent none (empty), refused with a reason
/// for people when it is malformed or names another appliance, environment or tenant.
pub fn naming_peer(peer: &ApplianceIdentity, json: &str) -> Result<Option<NamingPeer>, String> {
    if json.is_empty() {
        return Ok(None);
    }
    if json.len() > MAX_ATTESTATION_BYTES {
        return Err(format!("the execution key attestation is larger than {MAX_ATTESTATION_BYTES} bytes"));
    }
    let envelope =
        Envelope::from_json(json.as_bytes()).map_err(|e| format!("the attestation envelope is malformed: {e}"))?;
    let (statement, key) = read_attestation(&envelope).map_err(|e| format!("the execution key attestation: {e}"))?;
    if statement.appliance != peer.appliance
        || statement.environment != peer.environment
        || statement.tenant != peer.tenant
    {
        return Err("the execution key attestation is for another appliance".into());
    }
    Ok(Some(NamingPeer { envelope, key }))
}

/// The id of the execution key a stored attestation names (checked when it was stored).
pub fn stored_key_id(appliance: &str, json: &str) -> Result<String, StoreError> {
    let corrupt =
        |e: String| StoreError::Corrupt(format!("appliance {appliance}: stored execution key attestation: {e}"));
    let envelope = Envelope::from_json(json.as_bytes()).map_err(|e| corrupt(e.to_string()))?;
    let (_, key) = read_attestation(&envelope).map_err(|e| corrupt(e.to_string()))?;
    Ok(key.key_id().to_owned())
}
