//! Recovery after an offline expiry: an appliance whose certificate expired while it could not
//! renew joins again, by any method, and keeps its identity.
//!
//! Keeping the appliance id keeps everything keyed by it: its audit chain, its execution chain
//! and its pre-approval counters (which live in its state directory and in our rows for it).
//! It proves possession of the old certificate's key by signing
//! [`airlock_proto::join::recovery_message`] (this control plane and the new key), and shows
//! the certificate. [`check`] decides without I/O that we issued it (its chain verifies against
//! our CA at a moment inside its validity: expiry is what is being recovered from) and that
//! the signature is its key's; [`check_stored`] then decides, in the join's transaction, that
//! the appliance exists, is not revoked, and that this is its current or previous certificate
//! (an older one, perhaps stolen, would fork the identity). Only an expired certificate recovers (by the injected
//! clock): a live one renews instead, and recovering it would hand its identity to a new key beside the live one. The
//! previous certificate (kept for an appliance that missed its renewal's answer) recovers only once the current one
//! has expired too, so it cannot take the identity back from the holder of the current one. The join's own proof (a new join
//! token, or a fresh platform proof) must name the certificate's environment: an expired
//! certificate alone gets nothing.

use std::sync::Arc;
use std::time::Duration;

use airlock_core::ApplianceIdentity;
use airlock_proto::join::{RecoveryProof, recovery_message};
use rustls::pki_types::{CertificateDer, UnixTime};

use crate::authz::TenantScope;
use crate::ca::CertificateAuthority;
use crate::store::{StoreError, WriteTx};

/// The longest certificate (PEM) and signature (base64url) read.
const MAX_CERTIFICATE_BYTES: usize = 16 * 1024;
const MAX_SIGNATURE_BYTES: usize = 512;

/// An appliance that proved it held a certificate we issued.
#[derive(Debug, Clone)]
pub struct Recovering {
    pub identity: ApplianceIdentity,
    /// The certificate's serial (hex), to compare with the stored ones.
    pub serial: String,
}

/// Why an identity was not recovered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecoveryRefusal {
    Malformed,
    /// The certificate does not chain to our CA, or names no appliance of ours.
    NotOurs,
    /// The signature is not the certificate key's over this control plane and the new key.
    Signature,
    /// The join's proof names another environment than the certificate.
    OtherEnvironment,
    /// No such appliance (any more).
    Unknown,
    Revoked,
    /// Not the appliance's current or previous certificate.
    Superseded,
    /// The platform proof shows another identity than the one the appliance joined with.
    OtherIdentity,
    /// The certificate has not expired: it renews, it does not recover.
    NotExpired,
    /// The previous certificate, while the one that replaced it is still valid.
    CurrentLive,
}

impl RecoveryRefusal {
    pub fn code(self) -> &'static str {
        match self {
            Self::Malformed => "recovery_malformed",
            Self::NotOurs => "recovery_not_ours",
            Self::Signature => "recovery_signature",
            Self::OtherEnvironment => "recovery_other_environment",
            Self::Unknown => "recovery_unknown_appliance",
            Self::Revoked => "recovery_revoked",
            Self::Superseded => "recovery_superseded",
            Self::OtherIdentity => "recovery_other_identity",
            Self::NotExpired => "recovery_not_expired",
            Self::CurrentLive => "recovery_current_live",
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            Self::Malformed => "the recovery proof is malformed",
            Self::NotOurs => "the certificate to recover was not issued by this control plane",
            Self::Signature => {
                "the recovery signature is not the old certificate key's over this control plane and the new key"
            }
            Self::OtherEnvironment => "the join proves another environment than the certificate to recover names",
            Self::Unknown => "the appliance to recover is unknown",
            Self::Revoked => "the appliance to recover is revoked; it cannot join again under its identity",
            Self::Superseded => "the certificate to recover is not the appliance's current or previous one",
            Self::OtherIdentity => {
                "the platform proof shows another identity than the one the appliance to recover joined with"
            }
            Self::NotExpired => "the certificate to recover has not expired; a live certificate renews over its stream",
            Self::CurrentLive => {
                "the certificate to recover was replaced by one that is still valid; only the appliance's newest \
                 certificate recovers while that one lives"
            }
        }
    }
}

/// Checks a recovery proof without I/O: the certificate is ours, has expired by `now`, and its key signed over this
/// control plane's id and `new_key` (the CSR's public key).
pub fn check(
    ca: &CertificateAuthority,
    proof: &RecoveryProof,
    new_key: &[u8],
    now: airlock_core::Timestamp,
) -> Result<Recovering, RecoveryRefusal> {
    if proof.certificate_pem.len() > MAX_CERTIFICATE_BYTES || proof.signature.len() > MAX_SIGNATURE_BYTES {
        return Err(RecoveryRefusal::Malformed);
    }
    let der = crate::ca::pem_to_der(&proof.certificate_pem).ok_or(RecoveryRefusal::Malformed)?;
    let peer = crate::tls::parse_peer_cert(der.as_ref(), ca.trust_domain()).map_err(|_| RecoveryRefusal::NotOurs)?;
    if !issued_by(ca.cert_der(), &der, peer.not_before) {
        return Err(RecoveryRefusal::NotOurs);
    }
    let signature =
        data_encoding::BASE64URL_NOPAD.decode(proof.signature.as_bytes()).map_err(|_| RecoveryRefusal::Malformed)?;
    let message = recovery_message(&ca.fingerprint().to_string(), new_key);
    // The key types an appliance generates (rcgen's default is P-256).
    let algorithms: [&'static dyn ring::signature::VerificationAlgorithm; 3] =
        [&ring::signature::ECDSA_P256_SHA256_ASN1, &ring::signature::ECDSA_P384_SHA384_ASN1, &ring::signature::ED25519];
    let signed = algorithms.iter().any(|alg| {
        ring::signature::UnparsedPublicKey::new(*alg, &peer.public_key).verify(&message, &signature).is_ok()
    });
    if !signed {
        return Err(RecoveryRefusal::Signature);
    }
    // A certificate is valid through its notAfter second (RFC 5280), so only past it is it expired.
    if now < through_second(peer.not_after) {
        return Err(RecoveryRefusal::NotExpired);
    }
    Ok(Recovering { identity: peer.identity, serial: peer.serial })
}

/// The first moment a certificate whose notAfter is `not_after` is expired: it is valid through
/// that whole second (RFC 5280), and its notAfter has no finer part.
fn through_second(not_after: airlock_core::Timestamp) -> airlock_core::Timestamp {
    not_after.saturating_add(Duration::from_secs(1))
}

/// Whether `leaf` chains to `ca` (signature, client-auth usage), checked at a moment inside
/// the leaf's validity: a recovered certificate has expired by design.
fn issued_by(
    ca: &CertificateDer<'static>,
    leaf: &CertificateDer<'static>,
    not_before: airlock_core::Timestamp,
) -> bool {
    let mut roots = rustls::RootCertStore::empty();
    if roots.add(ca.clone()).is_err() {
        return false;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let Ok(verifier) = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build()
    else {
        return false;
    };
    let inside = u64::try_from(not_before.unix_millis()).unwrap_or(0) / 1000 + 1;
    verifier.verify_client_cert(leaf, &[], UnixTime::since_unix_epoch(Duration::from_secs(inside))).is_ok()
}

/// In the join's transaction: the appliance exists, is not revoked, and the certificate is its
/// current one, or its previous one once the current one has expired too (by `now`). Answers what is stored of it
/// (how it joined, as whom).
pub async fn check_stored(
    tx: &mut WriteTx<'_>,
    r: &Recovering,
    now: airlock_core::Timestamp,
) -> Result<Result<crate::store::RenewalState, RecoveryRefusal>, StoreError> {
    let scope = TenantScope::for_appliance(&r.identity);
    let Some(state) = tx.renewal_state(&scope, r.identity.appliance).await? else {
        return Ok(Err(RecoveryRefusal::Unknown));
    };
    if state.revoked {
        return Ok(Err(RecoveryRefusal::Revoked));
    }
    if state.current_serial != r.serial && state.previous_serial.as_deref() != Some(r.serial.as_str()) {
        return Ok(Err(RecoveryRefusal::Superseded));
    }
    if state.current_serial != r.serial && now < through_second(state.current_not_after) {
        return Ok(Err(RecoveryRefusal::CurrentLive));
    }
    Ok(Ok(state))
}

#[cfg(test)]
mod tests {
    use airlock_core::{ApplianceId, EnvironmentId, TenantId, Timestamp};
    use rcgen::{CertificateParams, KeyPair, PublicKeyData, SigningKey};

    use super::*;

    fn sign(key: &KeyPair, server: &str, new_key: &KeyPair) -> String {
        data_encoding::BASE64URL_NOPAD.encode(&key.sign(&recovery_message(server, new_key.der_bytes())).unwrap())
    }

    #[test]
    fn only_a_certificate_we_issued_and_its_own_key_recover_an_identity_even_long_expired() {
        let issued_at = Timestamp::from_unix_millis(1_600_000_000_000);
        let (ca, _) = CertificateAuthority::generate("airlock.test", issued_at).unwrap();
        let (other_ca, _) = CertificateAuthority::generate("airlock.test", issued_at).unwrap();
        let identity = ApplianceIdentity {
            trust_domain: "airlock.test".into(),
            tenant: TenantId::from_random([1; 16]),
            environment: EnvironmentId::from_random([2; 16]),
            appliance: ApplianceId::from_random([3; 16]),
        };
        let old = KeyPair::generate().unwrap();
        let csr = CertificateParams::default().serialize_request(&old).unwrap().pem().unwrap();
        // A minute's certificate, years before any clock this test runs at.
        let cert = ca.sign_join_csr(&csr, &identity, issued_at, Duration::from_secs(60)).unwrap();
        let new = KeyPair::generate().unwrap();
        let fp = ca.fingerprint().to_string();
        let later = issued_at.saturating_add(Duration::from_secs(3600));
        let proof = |signature: String| RecoveryProof { certificate_pem: cert.pem.clone(), signature };

        let ok = check(&ca, &proof(sign(&old, &fp, &new)), new.der_bytes(), later).unwrap();
        assert_eq!(
            check(
                &ca,
                &proof(sign(&old, &fp, &new)),
                new.der_bytes(),
                issued_at.saturating_add(Duration::from_secs(59))
            )
            .unwrap_err(),
            RecoveryRefusal::NotExpired,
            "a live certificate renews; it does not recover"
        );
        // Valid through its notAfter second: 999 ms into it, still live; the next second, expired.
        let not_after = cert.not_after;
        let within = not_after.saturating_add(Duration::from_millis(999));
        assert_eq!(
            check(&ca, &proof(sign(&old, &fp, &new)), new.der_bytes(), within).unwrap_err(),
            RecoveryRefusal::NotExpired
        );
        let past = not_after.saturating_add(Duration::from_secs(1));
        assert!(check(&ca, &proof(sign(&old, &fp, &new)), new.der_bytes(), past).is_ok());
        assert_eq!((ok.identity, ok.serial), (identity, cert.serial.clone()));
        assert_eq!(
            check(&other_ca, &proof(sign(&old, &other_ca.fingerprint().to_string(), &new)), new.der_bytes(), later)
                .unwrap_err(),
            RecoveryRefusal::NotOurs,
            "another control plane's CA did not issue it"
        );
        let thief = KeyPair::generate().unwrap();
        assert_eq!(
            check(&ca, &proof(sign(&thief, &fp, &new)), new.der_bytes(), later).unwrap_err(),
            RecoveryRefusal::Signature,
            "the certificate alone, without its key"
        );
        assert_eq!(
            check(&ca, &proof(sign(&old, &fp, &new)), thief.der_bytes(), later).unwrap_err(),
            RecoveryRefusal::Signature,
            "a signature hands the identity to the key it names only"
        );
        assert_eq!(
            check(&ca, &proof(sign(&old, &other_ca.fingerprint().to_string(), &new)), new.der_bytes(), later)
                .unwrap_err(),
            RecoveryRefusal::Signature,
            "made for another control plane"
        );
        assert_eq!(check(&ca, &proof("%%".into()), new.der_bytes(), later).unwrap_err(), RecoveryRefusal::Malformed);
        let garbage = RecoveryProof { certificate_pem: "not a certificate".into(), signature: sign(&old, &fp, &new) };
        assert_eq!(check(&ca, &garbage, new.der_bytes(), later).unwrap_err(), RecoveryRefusal::Malformed);
        let huge = RecoveryProof { certificate_pem: "a".repeat(MAX_CERTIFICATE_BYTES + 1), signature: String::new() };
        assert_eq!(check(&ca, &huge, new.der_bytes(), later).unwrap_err(), RecoveryRefusal::Malformed);
    }
}
