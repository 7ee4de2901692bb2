//! The built-in certificate authority; only this module holds the CA private key.
//!
//! It signs the control plane's own TLS certificates, its operations-signing certificate and appliance certificates from CSRs; appliance private keys never reach the control plane.
//! Nothing from a CSR but its public key reaches a certificate: the control plane decides every field, including the appliance identity.
//! The key exists in clear only in memory; at rest it is sealed under the KEK ([`crate::keys`]), which is never stored in the database.

use std::net::IpAddr;
use std::time::Duration;

use airlock_core::{ApplianceIdentity, Fingerprint, Timestamp};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// How far back `not_before` is set, to tolerate small clock skew between the parties. For
/// short test lifetimes it shrinks to a tenth of the lifetime, so the appliance's renewal
/// point (two thirds of not_before..not_after) stays two thirds of the real lifetime.
const MAX_BACKDATE: Duration = Duration::from_secs(60);
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 86_400);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("the CSR is not a valid PKCS#10 request or its signature does not match its key")]
    InvalidCsr,
    #[error("the CSR asks to be a CA")]
    CsrAsksForCa,
    #[error("the CSR names identity `{requested}` but this request may only be issued `{expected}`")]
    IdentityMismatch { requested: String, expected: String },
    #[error("the CSR must name no identity at join time (it asked for `{0}`); the control plane assigns it")]
    IdentityAtJoin(String),
    #[error("the CSR reuses the current key; renewal requires a new key pair")]
    KeyReused,
    #[error("certificate generation failed: {0}")]
    Generate(String),
    #[error("the stored CA is unusable: {0}")]
    Stored(String),
}

/// An issued certificate and the facts callers record about it.
#[derive(Clone, Debug)]
pub struct Issued {
    pub pem: String,
    pub der: CertificateDer<'static>,
    pub serial: String,
    pub not_after: Timestamp,
}

pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    trust_domain: String,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.trust_domain)
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Creates a new CA. Returns it and its private key as PKCS#8 PEM, for sealing.
    pub fn generate(trust_domain: &str, now: Timestamp) -> Result<(Self, String), CaError> {
        let key = KeyPair::generate().map_err(gen_err)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, format!("Airlock CA {trust_domain}"));
        params.distinguished_name.push(DnType::OrganizationName, "Airlock");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        params.not_before = backdated(now, CA_LIFETIME);
        params.not_after = now.saturating_add(CA_LIFETIME).to_offset_date_time();
        params.serial_number = Some(random_serial()?);
        params.use_authority_key_identifier_extension = false;
        let cert = params.self_signed(&key).map_err(gen_err)?;
        let key_pem = key.serialize_pem();
        let ca = Self::load(trust_domain, &cert.pem(), &key_pem)?;
        Ok((ca, key_pem))
    }

    pub fn load(trust_domain: &str, cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| CaError::Stored(e.to_string()))?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(|e| CaError::Stored(e.to_string()))?;
        let cert_der = pem_to_der(cert_pem).ok_or_else(|| CaError::Stored("CA certificate PEM".into()))?;
        Ok(Self { issuer, cert_pem: cert_pem.to_owned(), cert_der, trust_domain: trust_domain.to_owned() })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of_der(self.cert_der.as_ref())
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// A TLS server certificate for the control plane's own listeners, with a fresh key.
    pub fn issue_server_cert(
        &self,
        names: &[String],
        now: Timestamp,
        lifetime: Duration,
    ) -> Result<(Issued, PrivateKeyDer<'static>), CaError> {
        let key = KeyPair::generate().map_err(gen_err)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, "Airlock control plane");
        params.subject_alt_names = names
            .iter()
            .map(|n| match n.parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => n.clone().try_into().map(SanType::DnsName).map_err(gen_err),
            })
            .collect::<Result<_, _>>()?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        self.finish(params, &key, now, lifetime).map(|issued| {
            let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
            (issued, der)
        })
    }

    /// The control plane's operations-signing identity: a fresh ECDSA P-256 key (returned as
    /// PKCS#8 DER, to be held in memory only) and a certificate whose only URI SAN is
    /// `spiffe://<trust-domain>/control-plane`. It signs operation requests, nothing else:
    /// no TLS usage.
    pub fn issue_operations_signer(&self, now: Timestamp, lifetime: Duration) -> Result<(Issued, Vec<u8>), CaError> {
        let key = KeyPair::generate().map_err(gen_err)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, "Airlock control plane operations");
        let uri = format!("spiffe://{}{}", self.trust_domain, airlock_core::operation::CONTROL_PLANE_SPIFFE_PATH);
        params.subject_alt_names = vec![SanType::URI(uri.try_into().map_err(gen_err)?)];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let issued = self.finish(params, &key, now, lifetime)?;
        Ok((issued, key.serialize_der()))
    }

    /// Signs a join CSR: it must be well formed, self-signed by its key, and name no identity.
    pub fn sign_join_csr(
        &self,
        csr_pem: &str,
        identity: &ApplianceIdentity,
        now: Timestamp,
        lifetime: Duration,
    ) -> Result<Issued, CaError> {
        let csr = parse_csr(csr_pem)?;
        if let Some(uri) = requested_uris(&csr).into_iter().next() {
            return Err(CaError::IdentityAtJoin(truncate(&uri)));
        }
        self.sign_appliance(csr, identity, now, lifetime)
    }

    /// Signs a renewal CSR: it must name exactly the current identity and carry a new key.
    pub fn sign_renewal_csr(
        &self,
        csr_pem: &str,
        identity: &ApplianceIdentity,
        current_public_key: &[u8],
        now: Timestamp,
        lifetime: Duration,
    ) -> Result<Issued, CaError> {
        let csr = parse_csr(csr_pem)?;
        let expected = identity.uri();
        let uris = requested_uris(&csr);
        if uris.len() != 1 || uris[0] != expected {
            return Err(CaError::IdentityMismatch { requested: truncate(&uris.join(",")), expected });
        }
        if csr.public_key.der_bytes() == current_public_key {
            return Err(CaError::KeyReused);
        }
        self.sign_appliance(csr, identity, now, lifetime)
    }

    fn sign_appliance(
        &self,
        csr: CertificateSigningRequestParams,
        identity: &ApplianceIdentity,
        now: Timestamp,
        lifetime: Duration,
    ) -> Result<Issued, CaError> {
        if !matches!(csr.params.is_ca, IsCa::NoCa | IsCa::ExplicitNoCa) {
            return Err(CaError::CsrAsksForCa);
        }
        // Nothing from the CSR but its public key reaches the certificate: the control plane
        // decides every field.
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, identity.appliance.to_string());
        params.subject_alt_names = vec![SanType::URI(identity.uri().try_into().map_err(gen_err)?)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let (not_before, not_after) = (backdated(now, lifetime), now.saturating_add(lifetime));
        params.not_before = not_before;
        params.not_after = not_after.to_offset_date_time();
        let serial = random_serial()?;
        params.serial_number = Some(serial.clone());
        let req = CertificateSigningRequestParams { params, public_key: csr.public_key };
        let cert = req.signed_by(&self.issuer).map_err(gen_err)?;
        Ok(Issued {
            pem: cert.pem(),
            der: cert.der().clone(),
            serial: data_encoding::HEXLOWER.encode(&serial.to_bytes()),
            not_after: truncate_to_seconds(not_after),
        })
    }

    fn finish(
        &self,
        mut params: CertificateParams,
        key: &KeyPair,
        now: Timestamp,
        lifetime: Duration,
    ) -> Result<Issued, CaError> {
        let not_after = now.saturating_add(lifetime);
        params.not_before = backdated(now, lifetime);
        params.not_after = not_after.to_offset_date_time();
        let serial = random_serial()?;
        params.serial_number = Some(serial.clone());
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(key, &self.issuer).map_err(gen_err)?;
        Ok(Issued {
            pem: cert.pem(),
            der: cert.der().clone(),
            serial: data_encoding::HEXLOWER.encode(&serial.to_bytes()),
            not_after: truncate_to_seconds(not_after),
        })
    }
}

/// The public key a CSR proves possession of (its self-signature is checked).
pub fn csr_public_key(csr_pem: &str) -> Result<Vec<u8>, CaError> {
    Ok(parse_csr(csr_pem)?.public_key.der_bytes().to_vec())
}

pub fn pem_to_der(pem: &str) -> Option<CertificateDer<'static>> {
    airlock_core::certificate::pem_to_der(pem).ok().map(CertificateDer::from)
}

fn parse_csr(csr_pem: &str) -> Result<CertificateSigningRequestParams, CaError> {
    // The CSR came off the network: from_pem verifies its self-signature (proof of possession).
    CertificateSigningRequestParams::from_pem(csr_pem).map_err(|_| CaError::InvalidCsr)
}

fn requested_uris(csr: &CertificateSigningRequestParams) -> Vec<String> {
    csr.params
        .subject_alt_names
        .iter()
        .map(|san| match san {
            SanType::URI(u) => u.as_str().to_owned(),
            other => format!("{other:?}"),
        })
        .collect()
}

fn random_serial() -> Result<SerialNumber, CaError> {
    let mut bytes = [0u8; 16];
    SystemRandom::new().fill(&mut bytes).map_err(|_| CaError::Generate("random generator failed".into()))?;
    bytes[0] &= 0x7f; // Serials are positive integers (RFC 5280 §4.1.2.2).
    bytes[0] |= 0x01; // A leading non-zero byte keeps the DER length fixed.
    Ok(SerialNumber::from_slice(&bytes))
}

fn backdated(now: Timestamp, lifetime: Duration) -> time::OffsetDateTime {
    let back = MAX_BACKDATE.min(lifetime / 10);
    Timestamp::from_unix_millis(now.unix_millis() - back.as_millis() as i64).to_offset_date_time()
}

/// X.509 times have second precision; report what the certificate really says.
fn truncate_to_seconds(t: Timestamp) -> Timestamp {
    Timestamp::from_unix_millis(t.unix_seconds() * 1000)
}

fn truncate(s: &str) -> String {
    s.chars().take(200).collect()
}

fn gen_err(e: impl std::fmt::Display) -> CaError {
    CaError::Generate(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use airlock_core::{ApplianceId, EnvironmentId, TenantId};

    fn identity() -> ApplianceIdentity {
        ApplianceIdentity {
            trust_domain: "airlock.test".into(),
            tenant: TenantId::from_random([1; 16]),
            environment: EnvironmentId::from_random([2; 16]),
            appliance: ApplianceId::from_random([3; 16]),
        }
    }

    fn csr(key: &KeyPair, sans: Vec<String>) -> String {
        CertificateParams::new(sans).unwrap().serialize_request(key).unwrap().pem().unwrap()
    }

    fn now() -> Timestamp {
        Timestamp::from_unix_millis(1_800_000_000_000)
    }

    #[test]
    fn ca_key_round_trips_through_pem() {
        let (ca, key_pem) = CertificateAuthority::generate("airlock.test", now()).unwrap();
        let again = CertificateAuthority::load("airlock.test", ca.cert_pem(), &key_pem).unwrap();
        assert_eq!(again.fingerprint(), ca.fingerprint());
    }

    #[test]
    fn join_csr_gets_identity_from_control_plane() {
        let (ca, _) = CertificateAuthority::generate("airlock.test", now()).unwrap();
        let key = KeyPair::generate().unwrap();
        let issued = ca.sign_join_csr(&csr(&key, vec![]), &identity(), now(), Duration::from_secs(60)).unwrap();
        let info = airlock_core::certificate::inspect_der(&issued.der).unwrap();
        assert_eq!(info.uris, vec![identity().uri()]);
        assert_eq!(issued.not_after.unix_seconds(), now().unix_seconds() + 60);
    }

    #[test]
    fn join_csr_naming_an_identity_is_refused() {
        let (ca, _) = CertificateAuthority::generate("airlock.test", now()).unwrap();
        let key = KeyPair::generate().unwrap();
        let pem = csr(&key, vec![]);
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(identity().uri().try_into().unwrap())];
        let named = params.serialize_request(&key).unwrap().pem().unwrap();
        assert!(matches!(
            ca.sign_join_csr(&named, &identity(), now(), Duration::from_secs(60)),
            Err(CaError::IdentityAtJoin(_))
        ));
        assert!(ca.sign_join_csr(&pem, &identity(), now(), Duration::from_secs(60)).is_ok());
    }

    #[test]
    fn csr_with_broken_signature_is_refused() {
        let (ca, _) = CertificateAuthority::generate("airlock.test", now()).unwrap();
        let key = KeyPair::generate().unwrap();
        let der = CertificateParams::new(Vec::<String>::new()).unwrap().serialize_request(&key).unwrap().der().to_vec();
        let mut tampered = der.clone();
        let last = tampered.len() - 5;
        tampered[last] ^= 0xff;
        let pem = format!(
            "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
            data_encoding::BASE64.encode(&tampered)
        );
        assert!(matches!(
            ca.sign_join_csr(&pem, &identity(), now(), Duration::from_secs(60)),
            Err(CaError::InvalidCsr)
        ));
        assert!(matches!(
            ca.sign_join_csr("garbage", &identity(), now(), Duration::from_secs(60)),
            Err(CaError::InvalidCsr)
        ));
    }

    #[test]
    fn renewal_requires_same_identity_and_new_key() {
        let (ca, _) = CertificateAuthority::generate("airlock.test", now()).unwrap();
        let key = KeyPair::generate().unwrap();
        let current = ca.sign_join_csr(&csr(&key, vec![]), &identity(), now(), Duration::from_secs(60)).unwrap();
        let spki = airlock_core::certificate::inspect_der(&current.der).unwrap().public_key;
        let uri = identity().uri();
        let reuse = {
            let mut p = CertificateParams::default();
            p.subject_alt_names = vec![SanType::URI(uri.clone().try_into().unwrap())];
            p.serialize_request(&key).unwrap().pem().unwrap()
        };
        assert!(matches!(
            ca.sign_renewal_csr(&reuse, &identity(), &spki, now(), Duration::from_secs(60)),
            Err(CaError::KeyReused)
        ));
        let fresh = KeyPair::generate().unwrap();
        let mut other = identity();
        other.appliance = ApplianceId::from_random([9; 16]);
        let wrong = {
            let mut p = CertificateParams::default();
            p.subject_alt_names = vec![SanType::URI(other.uri().try_into().unwrap())];
            p.serialize_request(&fresh).unwrap().pem().unwrap()
        };
        assert!(matches!(
            ca.sign_renewal_csr(&wrong, &identity(), &spki, now(), Duration::from_secs(60)),
            Err(CaError::IdentityMismatch { .. })
        ));
        let good = {
            let mut p = CertificateParams::default();
            p.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
            p.serialize_request(&fresh).unwrap().pem().unwrap()
        };
        ca.sign_renewal_csr(&good, &identity(), &spki, now(), Duration::from_secs(60)).unwrap();
    }
}
