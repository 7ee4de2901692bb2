//! Envelopes signed with a certificate's own ECDSA P-256 key, as the control plane signs its
//! requests and an appliance its executions, for tests whose certificates come from elsewhere
//! (a control plane's own CA, say) rather than from [`crate::Ca`].

use airlock_core::dsse::Envelope;
use airlock_core::operation::{add_signature, certificate_key_id, signing_input};

/// Adds to `envelope` a signature by the PKCS#8 P-256 key `key_pkcs8_der`, with the key id of
/// the certificate `cert_der` (SHA-256 of its SubjectPublicKeyInfo).
pub fn sign_with_certificate_key(envelope: Envelope, cert_der: &[u8], key_pkcs8_der: &[u8]) -> Envelope {
    use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
    let rng = ring::rand::SystemRandom::new();
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, key_pkcs8_der, &rng).unwrap();
    let sig = key.sign(&rng, &signing_input(&envelope)).unwrap().as_ref().to_vec();
    add_signature(envelope, certificate_key_id(cert_der).unwrap(), sig)
}
