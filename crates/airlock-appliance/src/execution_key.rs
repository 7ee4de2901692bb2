//! The appliance's execution-signing key and the customer's attestation of it
//! (`airlock_core::execution_key`).
//!
//! The key is Ed25519, made on the first start in the state directory (`execution.key`, 0600),
//! and never leaves it: vendor code cannot reach the state directory (`crate::sandbox`), and
//! nothing sends the private half anywhere. Every execution is signed with it *and* with the
//! certificate's key: the control plane keeps checking the certificate's signature against its
//! CA and the stream's identity (`operations/results.rs` there), while `airlock verify` also
//! requires the signature of the key the customer attested, which the CA cannot make.
//!
//! The customer reads the public key over the admin socket (`execution_key` request) and sends
//! back their signed attestation (`attest_execution_key`). It is kept only if it verifies
//! against the pinned customer keys with the policy's threshold and names this appliance and
//! this key; either way the attempt is audited `execution_key.attest`. The attestation then
//! travels in every manifest and result the appliance produces.

use airlock_core::ApplianceIdentity;
use airlock_core::audit::{AuditAction, Outcome};
use airlock_core::customer_key::CustomerPublicKey;
use airlock_core::dsse::Envelope;
use airlock_core::execution_key::{ExecutionPublicKey, ExecutionSigningKey, VerifiedAttestation, verify_attestation};
use ring::rand::{SecureRandom, SystemRandom};

use crate::ApplianceError;
use crate::audit_log::AuditLog;
use crate::control::Peer;
use crate::state_dir::StateDir;

pub(crate) const KEY_FILE: &str = "execution.key";
pub(crate) const ATTESTATION_FILE: &str = "execution-key-attestation.dsse.json";
/// An attestation is a few hundred bytes.
const MAX_ATTESTATION_BYTES: usize = 64 * 1024;

/// The execution key in the state directory, made (and audited) on the first start.
pub(crate) fn load_or_create(state: &StateDir, audit: &AuditLog) -> Result<ExecutionSigningKey, ApplianceError> {
    if let Some(pem) = state.read_optional(KEY_FILE)? {
        return ExecutionSigningKey::from_pem(&pem).map_err(|e| {
            ApplianceError::Customer(format!(
                "{KEY_FILE} in the state directory is damaged ({e}); move the state directory aside to re-install"
            ))
        });
    }
    let mut seed = [0u8; 32];
    SystemRandom::new()
        .fill(&mut seed)
        .map_err(|_| ApplianceError::Internal("the OS random generator failed".into()))?;
    let key = ExecutionSigningKey::from_seed(seed);
    let pem = key.to_pem().map_err(|e| ApplianceError::Internal(format!("encoding the execution key: {e}")))?;
    state.write_private(KEY_FILE, pem.as_bytes())?;
    audit.record(
        AuditAction::ExecutionKeyCreate,
        Outcome::Success,
        serde_json::json!({ "key_id": key.public().key_id() }),
    )?;
    tracing::info!(key_id = %key.public().key_id(), "execution key created; attest it with `airlock customer attest-appliance`");
    Ok(key)
}

/// The stored attestation, if the customer made one. One that no longer parses is ignored (the
/// manifests then carry none, and `airlock verify` says so): the customer attests again.
pub(crate) fn stored_attestation(state: &StateDir) -> Result<Option<Envelope>, ApplianceError> {
    let Some(text) = state.read_optional(ATTESTATION_FILE)? else { return Ok(None) };
    match Envelope::from_json(text.as_bytes()) {
        Ok(env) => Ok(Some(env)),
        Err(e) => {
            tracing::error!(error = %e, "the stored execution key attestation is unreadable; attest the appliance again");
            Ok(None)
        }
    }
}

/// What is checked of an attestation offered on the host, decided before anything is written.
pub(crate) struct Offered<'a> {
    pub(crate) envelope_json: &'a [u8],
    pub(crate) key: &'a ExecutionPublicKey,
    /// `None` before the appliance joined: there is nothing to attest yet.
    pub(crate) identity: Option<&'a ApplianceIdentity>,
    pub(crate) pinned: &'a [CustomerPublicKey],
    pub(crate) threshold: usize,
}

/// Decides on an offered attestation: signed by the pinned keys, for this appliance and key.
fn decide(offered: &Offered<'_>) -> Result<(Envelope, VerifiedAttestation), String> {
    let identity = offered.identity.ok_or(
        "the appliance has not joined its control plane yet, so it has no identity to attest; attest it once it has joined",
    )?;
    if offered.pinned.is_empty() {
        return Err("no customer key is pinned; pin your keys at install with --customer-key".into());
    }
    if offered.envelope_json.len() > MAX_ATTESTATION_BYTES {
        return Err("larger than 64 KiB; it is not an attestation".into());
    }
    let envelope = Envelope::from_json(offered.envelope_json).map_err(|e| e.to_string())?;
    let verified = verify_attestation(&envelope, offered.pinned, offered.threshold).map_err(|e| e.to_string())?;
    verified
        .check_names(identity.appliance, identity.environment, identity.tenant)
        .map_err(|e| format!("{e}: this is appliance {}", identity.appliance))?;
    if verified.key() != offered.key {
        return Err(format!(
            "it attests execution key {}, but this appliance's is {}",
            verified.key().key_id(),
            offered.key.key_id()
        ));
    }
    Ok((envelope, verified))
}

/// Stores an attestation that holds; audits the attempt either way.
pub(crate) fn accept(
    state: &StateDir,
    offered: &Offered<'_>,
    audit: &AuditLog,
    by: Peer,
) -> Result<Envelope, ApplianceError> {
    let (envelope, verified) = match decide(offered) {
        Ok(ok) => ok,
        Err(why) => {
            audit.record(
                AuditAction::ExecutionKeyAttest,
                Outcome::Denied,
                by.stamp(serde_json::json!({ "reason": why })),
            )?;
            tracing::error!(reason = %why, "refusing an attestation of the execution key");
            return Err(ApplianceError::Customer(format!("the attestation is refused: {why}")));
        }
    };
    state.write_private(ATTESTATION_FILE, envelope.to_json().as_bytes())?;
    let s = verified.statement();
    audit.record(
        AuditAction::ExecutionKeyAttest,
        Outcome::Success,
        by.stamp(serde_json::json!({
            "key_id": verified.key().key_id(),
            "appliance": s.appliance,
            "attested_at": s.attested_at,
            "attested_by": s.attested_by,
            "signed_by": verified.signed_by(),
        })),
    )?;
    tracing::info!(key_id = %verified.key().key_id(), "the customer attested the execution key");
    Ok(envelope)
}

#[cfg(test)]
mod tests;
