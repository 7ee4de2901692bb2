//! Reading what a certificate says: its URIs, validity, serial and key.
//!
//! The one place both sides parse X.509 fields. It checks nothing about trust: a caller relies
//! on what it returns only for a certificate that chained to a CA it trusts (rustls did that at
//! the handshake, or [`crate::operation::verify_certified_envelope`] did it for an envelope).

use crate::{ApplianceIdentity, Fingerprint, Timestamp};

/// Why a certificate could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertificateError {
    #[error("the certificate is not PEM: {0}")]
    NotPem(String),
    #[error("the PEM block holds a {0}, not a CERTIFICATE")]
    NotACertificate(String),
    #[error("the certificate does not parse")]
    Malformed,
    #[error("the certificate's subject alternative name is malformed")]
    MalformedSan,
    #[error("the certificate must name exactly one appliance identity, it names {0}")]
    NotOneIdentity(usize),
    #[error("the certificate's identity does not parse: {0}")]
    BadIdentity(String),
}

/// What one certificate says about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertificateInfo {
    /// Every URI subject alternative name, in order.
    pub uris: Vec<String>,
    pub not_before: Timestamp,
    pub not_after: Timestamp,
    /// The serial number, lowercase hex of its DER bytes.
    pub serial: String,
    /// The DER SubjectPublicKeyInfo (algorithm and key).
    pub spki_der: Vec<u8>,
    /// The subject public key itself (the bit string inside the SPKI).
    pub public_key: Vec<u8>,
    /// SHA-256 of the whole DER certificate.
    pub fingerprint: Fingerprint,
}

impl CertificateInfo {
    /// The one appliance identity a certificate names. An appliance certificate carries
    /// exactly one URI, and it must parse as an [`ApplianceIdentity`].
    pub fn appliance_identity(&self) -> Result<ApplianceIdentity, CertificateError> {
        let [uri] = self.uris.as_slice() else {
            return Err(CertificateError::NotOneIdentity(self.uris.len()));
        };
        uri.parse().map_err(|e: crate::identity::IdentityParseError| CertificateError::BadIdentity(e.to_string()))
    }
}

/// Reads a DER certificate.
pub fn inspect_der(der: &[u8]) -> Result<CertificateInfo, CertificateError> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).map_err(|_| CertificateError::Malformed)?;
    let uris = uris(&cert)?;
    let validity = cert.validity();
    Ok(CertificateInfo {
        uris,
        not_before: Timestamp::from_unix_millis(validity.not_before.timestamp().saturating_mul(1000)),
        not_after: Timestamp::from_unix_millis(validity.not_after.timestamp().saturating_mul(1000)),
        serial: data_encoding::HEXLOWER.encode(cert.tbs_certificate.raw_serial()),
        spki_der: cert.public_key().raw.to_vec(),
        public_key: cert.public_key().subject_public_key.data.to_vec(),
        fingerprint: Fingerprint::of_der(der),
    })
}

/// The URI subject alternative names of a parsed certificate, in order.
pub(crate) fn uris(cert: &x509_parser::certificate::X509Certificate<'_>) -> Result<Vec<String>, CertificateError> {
    use x509_parser::prelude::GeneralName;
    Ok(match cert.subject_alternative_name().map_err(|_| CertificateError::MalformedSan)? {
        Some(san) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::URI(u) => Some((*u).to_owned()),
                _ => None,
            })
            .collect(),
        None => Vec::new(),
    })
}

/// Reads the first certificate of a PEM text.
pub fn inspect_pem(pem: &str) -> Result<CertificateInfo, CertificateError> {
    inspect_der(&pem_to_der(pem)?)
}

/// The DER of the first certificate in a PEM text.
pub fn pem_to_der(pem: &str) -> Result<Vec<u8>, CertificateError> {
    let (_, block) =
        x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|e| CertificateError::NotPem(e.to_string()))?;
    if block.label != "CERTIFICATE" {
        return Err(CertificateError::NotACertificate(block.label));
    }
    Ok(block.contents)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_with_uris(uris: &[&str]) -> rcgen::Certificate {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names =
            uris.iter().map(|u| rcgen::SanType::URI(rcgen::string::Ia5String::try_from(*u).unwrap())).collect();
        params.self_signed(&key).unwrap()
    }

    #[test]
    fn reads_uris_validity_serial_and_key() {
        let uri = "spiffe://airlock.test/tenant/ten_aaaaaaaaaaaaaaaaaaaaaaaaaa/env/env_aaaaaaaaaaaaaaaaaaaaaaaaaa/appliance/apl_aaaaaaaaaaaaaaaaaaaaaaaaaa";
        let cert = cert_with_uris(&[uri]);
        let info = inspect_pem(&cert.pem()).unwrap();
        assert_eq!(info.uris, vec![uri.to_owned()]);
        assert!(info.not_before < info.not_after);
        assert!(!info.serial.is_empty());
        assert_eq!(info.fingerprint, Fingerprint::of_der(cert.der()));
        assert_eq!(info.appliance_identity().unwrap().to_string(), uri);
    }

    #[test]
    fn an_appliance_certificate_names_exactly_one_identity() {
        let none = inspect_der(cert_with_uris(&[]).der()).unwrap();
        assert_eq!(none.appliance_identity(), Err(CertificateError::NotOneIdentity(0)));
        let two = inspect_der(cert_with_uris(&["spiffe://a/x", "spiffe://a/y"]).der()).unwrap();
        assert_eq!(two.appliance_identity(), Err(CertificateError::NotOneIdentity(2)));
        let bad = inspect_der(cert_with_uris(&["spiffe://a/x"]).der()).unwrap();
        assert!(matches!(bad.appliance_identity(), Err(CertificateError::BadIdentity(_))));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert_eq!(inspect_der(b"not a certificate"), Err(CertificateError::Malformed));
        assert!(matches!(inspect_pem("nothing here"), Err(CertificateError::NotPem(_))));
        // Not a key: four bytes under a private-key label.
        let key_pem = concat!("-----BEGIN PRIVATE", " KEY-----\nAAAA\n-----END PRIVATE", " KEY-----\n");
        assert!(matches!(inspect_pem(key_pem), Err(CertificateError::NotACertificate(_))));
    }
}
