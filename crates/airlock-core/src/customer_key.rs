//! The customer's Ed25519 keys: the root of the customer's authority over the appliance.
//!
//! The private key never reaches the vendor; the appliance pins public keys at install. Keys
//! travel as standard PEM (PKCS#8 for the private key, SubjectPublicKeyInfo for the public
//! one), so customers can inspect them with their own tools. A key id is the lowercase hex
//! SHA-256 of the raw 32-byte public key.

use std::fmt;

use ed25519_dalek::Signer;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("not an Ed25519 private key in PKCS#8 PEM, as `airlock customer keygen` writes it")]
    PrivatePem,
    #[error("not an Ed25519 public key in PEM (`-----BEGIN PUBLIC KEY-----`)")]
    PublicPem,
    #[error("could not encode the key as PEM")]
    Encode,
}

/// A customer signing key. `Debug` never shows it; [`CustomerSigningKey::to_pem`] is the
/// only way out, for writing it to the customer's own file.
pub struct CustomerSigningKey(ed25519_dalek::SigningKey);

/// A pinned customer public key. Its id is computed once: verification looks it up per
/// signature, and hashing it each time cost a measurable share of a grant check.
#[derive(Clone, PartialEq, Eq)]
pub struct CustomerPublicKey {
    key: ed25519_dalek::VerifyingKey,
    id: String,
}

impl CustomerSigningKey {
    /// Builds a key from 32 bytes the caller drew from a CSPRNG.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self(ed25519_dalek::SigningKey::from_bytes(&seed))
    }

    pub fn from_pem(pem: &str) -> Result<Self, KeyError> {
        ed25519_dalek::SigningKey::from_pkcs8_pem(pem).map(Self).map_err(|_| KeyError::PrivatePem)
    }

    /// PKCS#8 v1 (the private key alone). ed25519-dalek's own encoder writes v2, with the
    /// public key embedded, which common tooling (Python's `cryptography`) refuses.
    pub fn to_pem(&self) -> Result<String, KeyError> {
        let v1 = ed25519_dalek::pkcs8::KeypairBytes { secret_key: self.0.to_bytes(), public_key: None };
        v1.to_pkcs8_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF)
            .map(|z| z.to_string())
            .map_err(|_| KeyError::Encode)
    }

    pub fn public(&self) -> CustomerPublicKey {
        CustomerPublicKey::new(self.0.verifying_key())
    }

    /// Ed25519 is deterministic: signing needs no randomness, so core can do it.
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.0.sign(message).to_bytes()
    }
}

impl fmt::Debug for CustomerSigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CustomerSigningKey(<redacted>, public {})", self.public().key_id())
    }
}

impl CustomerPublicKey {
    fn new(key: ed25519_dalek::VerifyingKey) -> Self {
        let id = data_encoding::HEXLOWER.encode(&Sha256::digest(key.as_bytes()));
        Self { key, id }
    }

    pub fn from_pem(pem: &str) -> Result<Self, KeyError> {
        ed25519_dalek::VerifyingKey::from_public_key_pem(pem).map(Self::new).map_err(|_| KeyError::PublicPem)
    }

    pub fn to_pem(&self) -> Result<String, KeyError> {
        self.key.to_public_key_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF).map_err(|_| KeyError::Encode)
    }

    pub fn key_id(&self) -> String {
        self.id.clone()
    }

    pub fn key_id_str(&self) -> &str {
        &self.id
    }

    /// Strict verification (rejects small-order keys and non-canonical signatures), so a
    /// signature cannot be malleated into a second valid one.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        let Ok(sig) = ed25519_dalek::Signature::from_slice(signature) else { return false };
        self.key.verify_strict(message, &sig).is_ok()
    }
}

impl fmt::Debug for CustomerPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CustomerPublicKey({})", self.key_id())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_through_pem() {
        let key = CustomerSigningKey::from_seed([7; 32]);
        let again = CustomerSigningKey::from_pem(&key.to_pem().unwrap()).unwrap();
        assert_eq!(again.public(), key.public());
        let public = CustomerPublicKey::from_pem(&key.public().to_pem().unwrap()).unwrap();
        assert_eq!(public.key_id(), key.public().key_id());
        assert_eq!(public.key_id().len(), 64);
        assert!(key.public().to_pem().unwrap().starts_with("-----BEGIN PUBLIC KEY-----"));
    }

    #[test]
    fn debug_never_shows_the_private_key() {
        let key = CustomerSigningKey::from_seed([7; 32]);
        let pem = key.to_pem().unwrap();
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        assert!(!format!("{key:?}").contains(&body));
    }

    #[test]
    fn signature_verifies_only_for_its_message_and_key() {
        let key = CustomerSigningKey::from_seed([1; 32]);
        let other = CustomerSigningKey::from_seed([2; 32]);
        let sig = key.sign(b"approve op-1");
        assert!(key.public().verify(b"approve op-1", &sig));
        assert!(!key.public().verify(b"approve op-2", &sig));
        assert!(!other.public().verify(b"approve op-1", &sig));
        assert!(!key.public().verify(b"approve op-1", &sig[..63]));
    }

    #[test]
    fn malformed_pem_is_refused() {
        assert_eq!(CustomerSigningKey::from_pem("nope").unwrap_err(), KeyError::PrivatePem);
        assert_eq!(CustomerPublicKey::from_pem("nope").unwrap_err(), KeyError::PublicPem);
        // A public key is not a private key.
        let public = CustomerSigningKey::from_seed([1; 32]).public().to_pem().unwrap();
        assert!(CustomerSigningKey::from_pem(&public).is_err());
    }
}
