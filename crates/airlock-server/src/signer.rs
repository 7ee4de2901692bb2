//! The control plane's operations-signing identity.
//!
//! A fresh ECDSA P-256 key at every start, held only in memory, whose certificate from our CA names only `spiffe://<trust-domain>/control-plane`.
//! It signs operation requests and nothing else, and the key is never stored.
//! Each operation stores the certificate that signed its request, so a manifest still verifies after a restart has replaced the key.

use std::time::Duration;

use airlock_core::Timestamp;
use airlock_core::dsse::Envelope;
use airlock_core::operation::{
    REQUEST_PAYLOAD_TYPE, RequestStatement, add_signature, certificate_key_id, signing_input,
};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};

use crate::ca::{CaError, CertificateAuthority};

/// Lifetime of the operations-signing certificate, issued afresh at every start.
pub const SIGNER_LIFETIME: Duration = Duration::from_secs(365 * 86_400);

#[derive(Debug, thiserror::Error)]
pub enum SignerError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error("the operations-signing key is unusable: {0}")]
    Key(String),
    #[error("signing failed")]
    Sign,
}

/// The control plane's operations-signing identity. The key exists only in memory, for the
/// life of the process; each operation stores the certificate that signed its request.
pub struct OperationsSigner {
    key: EcdsaKeyPair,
    cert_pem: String,
    key_id: String,
    rng: SystemRandom,
}

impl std::fmt::Debug for OperationsSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OperationsSigner").field("key_id", &self.key_id).finish_non_exhaustive()
    }
}

impl OperationsSigner {
    /// Generates a key and has the CA certify it as `spiffe://<trust-domain>/control-plane`.
    pub fn generate(ca: &CertificateAuthority, now: Timestamp) -> Result<Self, SignerError> {
        let (issued, pkcs8) = ca.issue_operations_signer(now, SIGNER_LIFETIME)?;
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &pkcs8, &rng)
            .map_err(|e| SignerError::Key(e.to_string()))?;
        let key_id = certificate_key_id(issued.der.as_ref()).map_err(|e| SignerError::Key(e.to_string()))?;
        Ok(Self { key, cert_pem: issued.pem, key_id, rng })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A DSSE envelope of `payload_type` over `payload`, signed with the operations key.
    pub fn sign(&self, payload_type: &str, payload: Vec<u8>) -> Result<Envelope, SignerError> {
        let env = Envelope::new(payload_type, payload);
        let sig = self.key.sign(&self.rng, &signing_input(&env)).map_err(|_| SignerError::Sign)?;
        Ok(add_signature(env, self.key_id.clone(), sig.as_ref().to_vec()))
    }

    /// Signs a request statement.
    pub fn sign_request(&self, statement: &RequestStatement) -> Result<Envelope, SignerError> {
        let payload = serde_json::to_vec(statement).map_err(|_| SignerError::Sign)?;
        self.sign(REQUEST_PAYLOAD_TYPE, payload)
    }
}

#[cfg(test)]
mod tests {
    use airlock_core::operation::verify_certified_envelope;

    use super::*;

    #[test]
    fn signer_certificate_names_only_the_control_plane_and_verifies() {
        let now = Timestamp::from_unix_millis(1_800_000_000_000);
        let (ca, _) = CertificateAuthority::generate("airlock.test", now).unwrap();
        let signer = OperationsSigner::generate(&ca, now).unwrap();
        let env = signer.sign(REQUEST_PAYLOAD_TYPE, b"{}".to_vec()).unwrap();
        let ok = verify_certified_envelope(&env, REQUEST_PAYLOAD_TYPE, signer.cert_pem(), ca.cert_der(), now).unwrap();
        assert_eq!(ok.uris, vec!["spiffe://airlock.test/control-plane".to_owned()]);
        // Another CA's signer does not verify against this CA.
        let (other, _) = CertificateAuthority::generate("airlock.test", now).unwrap();
        let foreign = OperationsSigner::generate(&other, now).unwrap();
        let env2 = foreign.sign(REQUEST_PAYLOAD_TYPE, b"{}".to_vec()).unwrap();
        assert!(
            verify_certified_envelope(&env2, REQUEST_PAYLOAD_TYPE, foreign.cert_pem(), ca.cert_der(), now).is_err()
        );
        // A tampered payload does not verify.
        let mut tampered = env;
        tampered.payload = b"{\"a\":1}".to_vec();
        assert!(
            verify_certified_envelope(&tampered, REQUEST_PAYLOAD_TYPE, signer.cert_pem(), ca.cert_der(), now).is_err()
        );
    }
}
