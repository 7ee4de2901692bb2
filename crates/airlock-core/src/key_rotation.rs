//! Rotating the customer keys an appliance pinned: the only way the pinned set changes.
//!
//! A [`KeyRotationStatement`] names the set it replaces (by key id) and the new set (as PEM),
//! in a DSSE envelope ([`KEY_ROTATION_PAYLOAD_TYPE`]) signed by as many distinct keys of the
//! current set as the policy in force requires for approvals (its `approvals_required`): the
//! same people who could approve anything can hand their authority over, no fewer.
//! Naming the replaced set binds a statement to it: once applied, it cannot be applied again,
//! nor to an appliance that pinned other keys. A new set smaller than the threshold would lock
//! the customer out, and is refused.

use serde::{Deserialize, Serialize};

use crate::Timestamp;
use crate::customer_key::CustomerPublicKey;
use crate::dsse::{DsseError, Envelope};

pub const KEY_ROTATION_PAYLOAD_TYPE: &str = "application/vnd.airlock.customer-key-rotation.v1+json";
/// More keys than any policy can require (`approvals_required` is at most 16).
pub const MAX_KEYS: usize = 32;

/// The signed statement. A wire contract.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRotationStatement {
    /// The key ids of the pinned set this replaces, sorted.
    pub previous_key_ids: Vec<String>,
    /// The new set, as public key PEM.
    pub new_keys: Vec<String>,
    pub issued_at: Timestamp,
    /// Why, in the customer's words.
    #[serde(default)]
    pub reason: String,
}

/// Why a rotation statement is refused. The customer reads the sentence; code decides on the
/// variant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RotationError {
    #[error("the rotation statement against the pinned customer keys: {0}")]
    Signature(#[from] DsseError),
    #[error("the rotation statement is malformed: {0}")]
    Malformed(String),
    #[error("the rotation replaces another key set than the one pinned here; make it from the pinned keys")]
    OtherKeySet,
    #[error(
        "the rotation's new key set has {offered} key(s); the policy needs {required} signature(s), so it would lock you out"
    )]
    TooFewKeys { offered: usize, required: usize },
    #[error("the rotation's new key set is the pinned one: nothing to rotate")]
    Unchanged,
}

/// A rotation that verified against the pinned keys. Only [`verify_key_rotation`] builds one.
#[derive(Clone, Debug)]
pub struct VerifiedRotation {
    statement: KeyRotationStatement,
    new_keys: Vec<CustomerPublicKey>,
    signed_by: Vec<String>,
}

impl VerifiedRotation {
    pub fn new_keys(&self) -> &[CustomerPublicKey] {
        &self.new_keys
    }

    pub fn signed_by(&self) -> &[String] {
        &self.signed_by
    }

    pub fn statement(&self) -> &KeyRotationStatement {
        &self.statement
    }
}

/// Sorted key ids of a key set.
pub fn key_ids(keys: &[CustomerPublicKey]) -> Vec<String> {
    let mut ids: Vec<String> = keys.iter().map(CustomerPublicKey::key_id).collect();
    ids.sort();
    ids.dedup();
    ids
}

/// Verifies a rotation envelope against the `pinned` set and the policy's `threshold`.
pub fn verify_key_rotation(
    envelope_json: &[u8],
    pinned: &[CustomerPublicKey],
    threshold: usize,
) -> Result<VerifiedRotation, RotationError> {
    let envelope = Envelope::from_json(envelope_json)?;
    let verified = envelope.verify(KEY_ROTATION_PAYLOAD_TYPE, pinned, threshold.max(1))?;
    let statement: KeyRotationStatement =
        serde_json::from_slice(&verified.payload).map_err(|e| RotationError::Malformed(e.to_string()))?;
    let mut previous = statement.previous_key_ids.clone();
    previous.sort();
    if previous != key_ids(pinned) {
        return Err(RotationError::OtherKeySet);
    }
    if statement.new_keys.len() > MAX_KEYS {
        return Err(RotationError::Malformed(format!("more than {MAX_KEYS} new keys")));
    }
    let new_keys = statement
        .new_keys
        .iter()
        .map(|pem| CustomerPublicKey::from_pem(pem).map_err(|e| RotationError::Malformed(e.to_string())))
        .collect::<Result<Vec<_>, _>>()?;
    let distinct = key_ids(&new_keys).len();
    if distinct < threshold.max(1) {
        return Err(RotationError::TooFewKeys { offered: distinct, required: threshold.max(1) });
    }
    if key_ids(&new_keys) == key_ids(pinned) {
        return Err(RotationError::Unchanged);
    }
    Ok(VerifiedRotation { statement, new_keys, signed_by: verified.signed_by })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::customer_key::CustomerSigningKey;

    fn key(n: u8) -> CustomerSigningKey {
        CustomerSigningKey::from_seed([n; 32])
    }

    fn statement(previous: &[u8], new: &[u8]) -> KeyRotationStatement {
        let previous: Vec<CustomerPublicKey> = previous.iter().map(|n| key(*n).public()).collect();
        KeyRotationStatement {
            previous_key_ids: key_ids(&previous),
            new_keys: new.iter().map(|n| key(*n).public().to_pem().unwrap()).collect(),
            issued_at: Timestamp::from_unix_millis(0),
            reason: "laptop lost".into(),
        }
    }

    fn signed(statement: &KeyRotationStatement, signers: &[u8]) -> Vec<u8> {
        let mut env = Envelope::new(KEY_ROTATION_PAYLOAD_TYPE, serde_json::to_vec(statement).unwrap());
        for n in signers {
            env = env.sign(&key(*n));
        }
        env.to_json().into_bytes()
    }

    #[test]
    fn a_rotation_signed_by_the_threshold_verifies() {
        let pinned = [key(1).public(), key(2).public()];
        let ok = verify_key_rotation(&signed(&statement(&[1, 2], &[3, 4]), &[1, 2]), &pinned, 2).unwrap();
        assert_eq!(key_ids(ok.new_keys()), key_ids(&[key(3).public(), key(4).public()]));
        assert_eq!(ok.signed_by().len(), 2);
    }

    #[test]
    fn an_under_signed_or_forged_rotation_is_refused() {
        let pinned = [key(1).public(), key(2).public()];
        let s = statement(&[1, 2], &[3, 4]);
        assert!(matches!(
            verify_key_rotation(&signed(&s, &[1]), &pinned, 2),
            Err(RotationError::Signature(DsseError::NotEnoughSignatures { valid: 1, required: 2 }))
        ));
        // The vendor's key, or the new keys themselves, are not the pinned ones.
        assert!(matches!(verify_key_rotation(&signed(&s, &[9, 3, 4]), &pinned, 1), Err(RotationError::Signature(_))));
        let mut tampered: serde_json::Value = serde_json::from_slice(&signed(&s, &[1, 2])).unwrap();
        tampered["payloadType"] = "application/vnd.airlock.policy.v1+toml".into();
        assert!(verify_key_rotation(tampered.to_string().as_bytes(), &pinned, 1).is_err());
    }

    #[test]
    fn a_rotation_binds_the_set_it_replaces_and_leaves_enough_keys() {
        let pinned = [key(1).public()];
        // Made for another set (or already applied): refused.
        assert_eq!(
            verify_key_rotation(&signed(&statement(&[1, 2], &[3]), &[1]), &pinned, 1).unwrap_err(),
            RotationError::OtherKeySet
        );
        assert_eq!(
            verify_key_rotation(&signed(&statement(&[1], &[3]), &[1]), &[key(3).public()], 1).unwrap_err(),
            RotationError::Signature(DsseError::NotEnoughSignatures { valid: 0, required: 1 })
        );
        let two = [key(1).public(), key(2).public()];
        assert_eq!(
            verify_key_rotation(&signed(&statement(&[1, 2], &[3]), &[1, 2]), &two, 2).unwrap_err(),
            RotationError::TooFewKeys { offered: 1, required: 2 }
        );
        assert_eq!(
            verify_key_rotation(&signed(&statement(&[1], &[1]), &[1]), &pinned, 1).unwrap_err(),
            RotationError::Unchanged
        );
        let mut bad = statement(&[1], &[3]);
        bad.new_keys.push("not a key".into());
        assert!(matches!(verify_key_rotation(&signed(&bad, &[1]), &pinned, 1), Err(RotationError::Malformed(_))));
    }
}
