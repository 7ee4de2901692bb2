//! First contact: a proof of identity and a CSR exchanged for a certificate, over CA-pinned HTTPS.
//!
//! The proof is a join token, or the host's platform identity (`aws`): then the control plane's
//! challenge is fetched first, over the same pinned channel, and the signed proof carries it
//! with the pinned CA's fingerprint (never the fingerprint the answer names).
//!
//! The answer came over a channel that trusts only the pinned CA, and is still checked before
//! it is written down: its CA is the pinned one, and its certificate names the identity it
//! claims and certifies our key.

use airlock_core::Fingerprint;
use airlock_core::certificate;
use airlock_core::token::Secret;
use airlock_proto::join::{JOIN_CHALLENGE_PATH, JOIN_PATH, JoinChallenge, JoinProof, JoinRequest, JoinResponse};
use rcgen::{CertificateParams, KeyPair};

mod aws;

use crate::ApplianceError;
use crate::config::AwsJoinConfig;
use crate::state_dir::{Credentials, Enrolment, inspect_cert};

/// A CSR for `key`, naming `identity_uri` when renewing (a join CSR names no identity).
pub(crate) fn csr_for(key: &KeyPair, identity_uri: Option<&str>) -> Result<String, ApplianceError> {
    let mut params = CertificateParams::default();
    if let Some(uri) = identity_uri {
        let uri = uri.to_owned().try_into().map_err(|e| ApplianceError::Internal(format!("identity URI: {e}")))?;
        params.subject_alt_names = vec![rcgen::SanType::URI(uri)];
    }
    params.serialize_request(key).and_then(|c| c.pem()).map_err(|e| ApplianceError::Internal(format!("CSR: {e}")))
}

/// How this appliance proves who it is at its first join.
#[derive(Clone, Copy)]
pub(crate) enum JoinWith<'a> {
    Token(&'a Secret),
    Aws(&'a AwsJoinConfig),
}

impl JoinWith<'_> {
    pub(crate) fn method(self) -> &'static str {
        match self {
            Self::Token(_) => "join token",
            Self::Aws(_) => "AWS identity",
        }
    }
}

/// Joins with `key`, which the caller generated and saved first (see `StateDir::save_pending_join_key`).
pub(crate) async fn join(
    control_plane: &str,
    pin: Fingerprint,
    with: JoinWith<'_>,
    key: &KeyPair,
) -> Result<(Enrolment, String, Credentials), ApplianceError> {
    let csr_pem = csr_for(key, None)?;
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(airlock_proto::tls::pinned_client_config(pin))
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .map_err(|e| ApplianceError::Internal(format!("HTTP client: {e}")))?;
    let proof = match with {
        JoinWith::Token(token) => JoinProof::JoinToken(token.expose().to_owned()),
        JoinWith::Aws(cfg) => {
            let resp = send(client.post(format!("{control_plane}{JOIN_CHALLENGE_PATH}"))).await?;
            let challenge: JoinChallenge =
                resp.json().await.map_err(|e| ApplianceError::Protocol(format!("join challenge: {e}")))?;
            // The server id signed is the CA this appliance pinned: a proof made for a control
            // plane it was not installed for could not be replayed at that one anyway.
            JoinProof::AwsSts(aws::proof(cfg, &challenge.challenge, &pin.to_string()).await?)
        }
    };
    let body = JoinRequest { proof, csr_pem, version: airlock_proto::VERSION.to_owned() };
    let resp = send(client.post(format!("{control_plane}{JOIN_PATH}")).json(&body)).await?;
    let joined: JoinResponse =
        resp.json().await.map_err(|e| ApplianceError::Protocol(format!("join response: {e}")))?;
    check_join_response(&joined, pin, key)?;
    let enrolment = Enrolment {
        identity: joined.identity,
        control_plane: control_plane.to_owned(),
        gateway_endpoint: joined.gateway_endpoint,
        gateway_server_name: joined.gateway_server_name,
        ca_fingerprint: pin.to_string(),
    };
    let creds = Credentials { cert_pem: joined.certificate_pem, key_pem: key.serialize_pem() };
    Ok((enrolment, joined.ca_certificate_pem, creds))
}

/// A fresh AWS proof for a renewal with `key` (JSON), answering the challenge derived from it;
/// empty when none can be made, which the control plane refuses (and the appliance retries).
pub(crate) async fn renewal_proof(cfg: &AwsJoinConfig, key: &KeyPair, server_id: &str) -> String {
    use rcgen::PublicKeyData;
    let challenge = airlock_proto::join::renewal_challenge(key.der_bytes());
    match aws::proof(cfg, &challenge, server_id).await {
        Ok(proof) => serde_json::to_string(&proof).unwrap_or_default(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot prove the host's AWS identity for this renewal");
            String::new()
        }
    }
}

/// Sends a join call; a refusal's message is the operator's to read.
async fn send(request: reqwest::RequestBuilder) -> Result<reqwest::Response, ApplianceError> {
    let resp = request.send().await.map_err(|e| match airlock_proto::tls::find_pin_mismatch(&e) {
        Some(pinned) => ApplianceError::UntrustedControlPlane { pinned },
        None => ApplianceError::Unreachable(airlock_proto::tls::describe_error(&e)),
    })?;
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    // Off the network: the message is shown to the operator, never interpreted.
    let text = resp.text().await.unwrap_or_default();
    let message = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| text.chars().take(300).collect());
    // Too many challenges out, or the platform unreachable from the control plane: worth a retry.
    if status.as_u16() == 429 || status.as_u16() == 503 {
        return Err(ApplianceError::Unreachable(format!("HTTP {}: {message}", status.as_u16())));
    }
    Err(ApplianceError::JoinRefused { status: status.as_u16(), message })
}

/// The response came over a pinned channel, but check it is internally consistent before
/// writing it down: the CA is the pinned one and the certificate is for our key.
fn check_join_response(joined: &JoinResponse, pin: Fingerprint, key: &KeyPair) -> Result<(), ApplianceError> {
    let ca = certificate::inspect_pem(&joined.ca_certificate_pem)
        .map_err(|e| ApplianceError::Protocol(format!("join response CA: {e}")))?;
    if ca.fingerprint != pin {
        return Err(ApplianceError::UntrustedControlPlane { pinned: pin });
    }
    let (identity, _) = inspect_cert(&joined.certificate_pem)
        .map_err(|e| ApplianceError::Protocol(format!("join response certificate: {e}")))?;
    if identity.uri() != joined.identity {
        return Err(ApplianceError::Protocol("join response identity does not match its certificate".into()));
    }
    if !cert_matches_key(&joined.certificate_pem, key) {
        return Err(ApplianceError::Protocol("join response certificate is not for our key".into()));
    }
    Ok(())
}

/// Whether a certificate certifies `key` (its subject public key is the key's).
pub(crate) fn cert_matches_key(cert_pem: &str, key: &KeyPair) -> bool {
    use rcgen::PublicKeyData;
    certificate::inspect_pem(cert_pem).is_ok_and(|info| info.public_key == key.der_bytes())
}
