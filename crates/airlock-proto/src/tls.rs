//! TLS 1.3 for both ends, and trust in the control plane by pinned CA fingerprint.
//!
//! The appliance and the CLI are installed with the SHA-256 fingerprint of the control plane
//! CA. [`PinnedCaVerifier`] accepts a server only if the chain it presents contains a
//! certificate with exactly that fingerprint and the leaf verifies against it as the sole
//! trust anchor (signature, validity, server name). There is no trust-on-first-use path.

use std::sync::Arc;

use airlock_core::Fingerprint;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, Error, OtherError, RootCertStore, SignatureScheme};

/// The crypto provider every Airlock TLS endpoint uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Only TLS 1.3 is ever negotiated.
pub static PROTOCOL_VERSIONS: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

#[derive(Debug, thiserror::Error)]
#[error(
    "the control plane's certificate chain does not include the pinned CA {pinned}; check the CA fingerprint you were given (`airlock server init` prints it)"
)]
pub struct PinMismatch {
    pub pinned: Fingerprint,
}

/// Verifies a server certificate against a CA identified only by its fingerprint.
#[derive(Debug)]
pub struct PinnedCaVerifier {
    pin: Fingerprint,
    provider: Arc<CryptoProvider>,
}

impl PinnedCaVerifier {
    pub fn new(pin: Fingerprint) -> Arc<Self> {
        Arc::new(Self { pin, provider: provider() })
    }
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        // The presented chain came off the network: only a certificate whose hash we pinned
        // can become a trust anchor.
        let anchor = intermediates.iter().find(|c| Fingerprint::of_der(c.as_ref()) == self.pin).ok_or_else(|| {
            Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(PinMismatch { pinned: self.pin }))))
        })?;
        let mut roots = RootCertStore::empty();
        roots.add(anchor.clone().into_owned())?;
        let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| Error::General(format!("building verifier for pinned CA: {e}")))?;
        inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        // PROTOCOL_VERSIONS excludes TLS 1.2, so rustls never gets here.
        Err(Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// A TLS 1.3 client config that trusts only the pinned CA and presents no client certificate.
pub fn pinned_client_config(pin: Fingerprint) -> rustls::ClientConfig {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(PROTOCOL_VERSIONS)
        .expect("ring supports TLS 1.3") // A static, valid combination.
        .dangerous()
        .with_custom_certificate_verifier(PinnedCaVerifier::new(pin))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    cfg
}

/// A client config for a third party's HTTPS endpoint (AWS, a cloud's metadata server, a
/// cluster's API server): TLS 1.2 or 1.3, as those still serve 1.2; trusting only `roots`;
/// no client certificate.
pub fn third_party_client_config(roots: RootCertStore) -> Result<rustls::ClientConfig, Error> {
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// How a mutual-TLS client decides to trust the server it dials.
pub enum ServerTrust {
    /// A CA known only by its fingerprint ([`PinnedCaVerifier`]): the appliance's first dial
    /// and the CLI.
    Pinned(Fingerprint),
    /// A CA certificate already held (the one the appliance stored at join).
    Roots(RootCertStore),
}

/// The one builder of a TLS 1.3 client config that presents a certificate: the appliance's
/// gateway stream, and the tests and benchmark that stand in for appliances.
pub fn mtls_client_config(
    trust: ServerTrust,
    chain: Vec<CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
    alpn: &[&[u8]],
) -> Result<rustls::ClientConfig, Error> {
    let builder = rustls::ClientConfig::builder_with_provider(provider()).with_protocol_versions(PROTOCOL_VERSIONS)?;
    let builder = match trust {
        ServerTrust::Pinned(pin) => builder.dangerous().with_custom_certificate_verifier(PinnedCaVerifier::new(pin)),
        ServerTrust::Roots(roots) => builder.with_root_certificates(roots),
    };
    let mut cfg = builder.with_client_auth_cert(chain, key)?;
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(cfg)
}

/// Walks an error's source chain looking for a pin mismatch, so callers can say so plainly.
pub fn find_pin_mismatch(err: &(dyn std::error::Error + 'static)) -> Option<Fingerprint> {
    error_chain(err).find_map(|e| {
        if let Some(p) = e.downcast_ref::<PinMismatch>() {
            return Some(p.pinned);
        }
        match e.downcast_ref::<Error>() {
            Some(Error::InvalidCertificate(CertificateError::Other(OtherError(other)))) => {
                other.downcast_ref::<PinMismatch>().map(|p| p.pinned)
            }
            _ => None,
        }
    })
}

/// Finds the first rustls error anywhere in an error's chain.
pub fn find_tls_error<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a Error> {
    error_chain(err).find_map(|e| e.downcast_ref::<Error>())
}

/// Every error in a chain. Unlike plain `source()`, this descends into `io::Error`s, whose
/// `source()` skips the error they wrap (and TLS stacks nest them).
pub fn error_chain<'a>(
    err: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(err), |e| match e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
        Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
        None => e.source(),
    })
}

/// Flattens an error chain into one line for an operator, skipping repeated messages.
pub fn describe_error(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    for err in error_chain(e) {
        let text = err.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
    }
    parts.join(": ")
}
