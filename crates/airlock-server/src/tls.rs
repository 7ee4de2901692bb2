//! TLS for the control plane's two listeners.
//!
//! The HTTPS API presents a certificate from the built-in CA (or the operator's own) and asks for no client certificate.
//! The appliance gateway requires a client certificate that chains to the built-in CA, names an appliance of our trust domain, and is within its validity period by the injected clock.
//! Its appliance must not be revoked ([`RevokedSet`], the first of the three revocation points described in [`crate::appliances`]).
//! Only TLS 1.3 is offered, and the gateway resumes no sessions, so every connection runs the client-certificate checks.
//! Certificates are read with core's one certificate reader ([`airlock_core::certificate`]).

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use airlock_core::{ApplianceId, ApplianceIdentity, Timestamp};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, RootCertStore, SignatureScheme};

use crate::clock::{Clock, RustlsTime};

/// Appliances whose certificates must be refused, shared with the TLS verifier.
#[derive(Debug, Default)]
pub struct RevokedSet(RwLock<HashSet<ApplianceId>>);

impl RevokedSet {
    pub fn insert(&self, id: ApplianceId) {
        self.0.write().unwrap_or_else(|e| e.into_inner()).insert(id);
    }

    pub fn remove(&self, id: &ApplianceId) {
        self.0.write().unwrap_or_else(|e| e.into_inner()).remove(id);
    }

    pub fn contains(&self, id: &ApplianceId) -> bool {
        self.0.read().unwrap_or_else(|e| e.into_inner()).contains(id)
    }
}

/// Facts about a verified appliance certificate, taken after the handshake.
#[derive(Clone, Debug)]
pub struct PeerCert {
    pub identity: ApplianceIdentity,
    pub not_before: Timestamp,
    pub not_after: Timestamp,
    pub serial: String,
    /// The subject public key, to tell a renewal's new key from the current one.
    pub public_key: Vec<u8>,
}

/// Reads identity and validity from a leaf certificate (with core's one certificate reader).
/// The caller must only trust the result if the certificate chained to our CA.
pub fn parse_peer_cert(der: &[u8], trust_domain: &str) -> Result<PeerCert, String> {
    let info = airlock_core::certificate::inspect_der(der).map_err(|e| e.to_string())?;
    let identity = info.appliance_identity().map_err(|e| e.to_string())?;
    if identity.trust_domain != trust_domain {
        return Err(format!("certificate is for trust domain `{}`, not ours", identity.trust_domain));
    }
    Ok(PeerCert {
        identity,
        not_before: info.not_before,
        not_after: info.not_after,
        serial: info.serial,
        public_key: info.public_key,
    })
}

/// Wraps webpki's chain check with our identity and revocation checks.
#[derive(Debug)]
struct ApplianceCertVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
    revoked: Arc<RevokedSet>,
    /// Identities refused as revoked. Their chains verified, so the tenant is known and the
    /// refusal belongs in that tenant's audit chain.
    refused_revoked: tokio::sync::mpsc::UnboundedSender<ApplianceIdentity>,
}

impl ClientCertVerifier for ApplianceCertVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        // Chain, signature, EKU and validity at `now` (our injected clock) first.
        self.inner.verify_client_cert(end_entity, intermediates, now)?;
        let peer = parse_peer_cert(end_entity.as_ref(), &self.trust_domain)
            .map_err(|_| Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure))?;
        if self.revoked.contains(&peer.identity.appliance) {
            let _ = self.refused_revoked.send(peer.identity);
            return Err(Error::InvalidCertificate(CertificateError::Revoked));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn base_builder(clock: Arc<dyn Clock>) -> rustls::ConfigBuilder<rustls::ServerConfig, rustls::WantsVerifier> {
    rustls::ServerConfig::builder_with_details(airlock_proto::tls::provider(), Arc::new(RustlsTime(clock)))
        .with_protocol_versions(airlock_proto::tls::PROTOCOL_VERSIONS)
        .expect("ring supports TLS 1.3") // A static, valid combination.
}

pub fn api_server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    clock: Arc<dyn Clock>,
) -> Result<rustls::ServerConfig, Error> {
    let mut cfg = base_builder(clock).with_no_client_auth().with_single_cert(chain, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

pub fn gateway_server_config(
    ca: &CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    trust_domain: &str,
    revoked: Arc<RevokedSet>,
    refused_revoked: tokio::sync::mpsc::UnboundedSender<ApplianceIdentity>,
    clock: Arc<dyn Clock>,
) -> Result<rustls::ServerConfig, Error> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone())?;
    let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), airlock_proto::tls::provider())
        .build()
        .map_err(|e| Error::General(format!("client verifier: {e}")))?;
    let verifier = ApplianceCertVerifier { inner, trust_domain: trust_domain.to_owned(), revoked, refused_revoked };
    let mut cfg = base_builder(clock).with_client_cert_verifier(Arc::new(verifier)).with_single_cert(chain, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    // Resumed sessions would skip the client-certificate check, and with it the revocation
    // and expiry checks, so every appliance connection does a full handshake.
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(cfg)
}

/// Names the reason a handshake was refused, for the audit log and metrics.
pub fn handshake_failure_reason(err: &std::io::Error) -> &'static str {
    let tls = err.get_ref().and_then(|e| e.downcast_ref::<Error>());
    match tls {
        Some(Error::NoCertificatesPresented) => "no_client_certificate",
        Some(Error::InvalidCertificate(CertificateError::Revoked)) => "revoked",
        Some(Error::InvalidCertificate(CertificateError::Expired | CertificateError::ExpiredContext { .. })) => {
            "expired"
        }
        Some(Error::InvalidCertificate(
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
        )) => "not_yet_valid",
        Some(Error::InvalidCertificate(CertificateError::UnknownIssuer)) => "unknown_issuer",
        Some(Error::InvalidCertificate(CertificateError::BadSignature)) => "bad_signature",
        Some(Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)) => "not_an_appliance",
        Some(Error::InvalidCertificate(_)) => "invalid_certificate",
        Some(Error::PeerIncompatible(_)) => "incompatible_peer",
        Some(_) => "tls_error",
        None => "connection_error",
    }
}
