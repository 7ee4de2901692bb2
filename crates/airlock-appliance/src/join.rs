//! First contact: a proof of identity and a CSR exchanged for a certificate, over CA-pinned HTTPS.
//!
//! The proof is a join token, or the host's platform identity (`aws`, `gcp`, `k8s`): then the
//! control plane's challenge is fetched first, over the same pinned channel, and the proof
//! carries it with the pinned CA's fingerprint (never the fingerprint the answer names): in
//! AWS's signed headers (with the environment the appliance names), in a GCP token's audience
//! and a requested Kubernetes token's, beside a mounted Kubernetes token (whose audience is the
//! pinned CA's fingerprint, fixed when the volume was projected).
//!
//! The answer came over a channel that trusts only the pinned CA, and is still checked before
//! it is written down: its CA is the pinned one, and its certificate names the identity it
//! claims and certifies our key.
//!
//! An appliance whose certificate expired while it could not renew joins again the same way
//! and keeps its identity ([`join`] with `recover`): it adds its expired certificate and a
//! signature by that certificate's key over the control plane's id and the new key, and the
//! answer must name the identity it had.

use airlock_core::Fingerprint;
use airlock_core::certificate;
use airlock_core::token::Secret;
use airlock_proto::join::{
    GcpIdentityProof, JOIN_CHALLENGE_PATH, JOIN_PATH, JoinChallenge, JoinChallengeRequest, JoinProof, JoinRequest,
    JoinResponse, JoinTarget, K8sTokenProof, PlatformProof,
};
use rcgen::{CertificateParams, KeyPair};

mod aws;
mod gcp;
mod k8s;

use crate::ApplianceError;
use crate::config::PlatformJoinConfig;
use crate::state_dir::{Credentials, Enrolment, inspect_cert};

/// A client for a platform's own identity endpoint (GCE metadata server, Kubernetes API
/// server): reached directly (no proxy, no redirect), trusting only `roots`, within `timeout`.
fn platform_client(roots: rustls::RootCertStore, timeout: std::time::Duration) -> Result<reqwest::Client, String> {
    let tls = airlock_proto::tls::third_party_client_config(roots).map_err(|e| e.to_string())?;
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .no_proxy()
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| e.to_string())
}

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
    Platform(&'a PlatformJoinConfig),
}

impl JoinWith<'_> {
    pub(crate) fn method(self) -> &'static str {
        match self {
            Self::Token(_) => "join token",
            Self::Platform(PlatformJoinConfig::Aws(_)) => "AWS identity",
            Self::Platform(PlatformJoinConfig::Gcp { .. }) => "GCP identity token",
            Self::Platform(PlatformJoinConfig::K8s { .. }) => "Kubernetes service-account token",
        }
    }
}

/// A proof of this host's platform identity answering `challenge`, for the control plane whose
/// CA is `server_id` (the pinned fingerprint), naming `target` where the method can sign it (AWS; the other
/// methods' challenge is bound to it by the control plane).
async fn platform_proof(
    cfg: &PlatformJoinConfig,
    challenge: &str,
    server_id: &str,
    target: JoinTarget,
) -> Result<PlatformProof, ApplianceError> {
    Ok(match cfg {
        PlatformJoinConfig::Aws(aws) => PlatformProof::AwsSts(aws::proof(aws, challenge, server_id, target).await?),
        PlatformJoinConfig::Gcp { metadata_url } => {
            let audience = airlock_proto::join::challenge_audience(server_id, challenge);
            let identity_token = gcp::identity_token(metadata_url, &audience).await?;
            PlatformProof::Gcp(GcpIdentityProof { identity_token, challenge: challenge.to_owned() })
        }
        PlatformJoinConfig::K8s { token_path, token_request: Some(request) } => {
            // The same audience as GCP's: the challenge inside the signed token.
            let audience = airlock_proto::join::challenge_audience(server_id, challenge);
            let service_account_token = k8s::requested_token(request, token_path, &audience).await?;
            PlatformProof::K8s(K8sTokenProof { service_account_token, challenge: challenge.to_owned() })
        }
        PlatformJoinConfig::K8s { token_path, token_request: None } => {
            let path = token_path.clone();
            let service_account_token = tokio::task::spawn_blocking(move || k8s::read_token(&path))
                .await
                .map_err(|e| ApplianceError::Internal(e.to_string()))??;
            PlatformProof::K8s(K8sTokenProof { service_account_token, challenge: challenge.to_owned() })
        }
    })
}

/// Joins with `key`, which the caller generated and saved first (see `StateDir::save_pending_join_key`).
/// With a `target` tenant or environment, only that one may take it (a platform join must name one, or is refused).
/// With `recover` (the expired credentials), keeps their identity or fails; a platform join that names no target
/// then names the one its expired certificate does.
pub(crate) async fn join(
    control_plane: &str,
    pin: Fingerprint,
    with: JoinWith<'_>,
    target: JoinTarget,
    key: &KeyPair,
    recover: Option<&Credentials>,
) -> Result<(Enrolment, String, Credentials), ApplianceError> {
    let csr_pem = csr_for(key, None)?;
    let recover = recover.map(|old| recovery_proof(old, key, pin)).transpose()?;
    let target = match (&recover, with) {
        (Some((_, identity)), JoinWith::Platform(_)) if !target.is_pinned() => {
            JoinTarget { tenant: Some(identity.tenant), environment: Some(identity.environment) }
        }
        _ => target,
    };
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(airlock_proto::tls::pinned_client_config(pin))
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .map_err(|e| ApplianceError::Internal(format!("HTTP client: {e}")))?;
    let proof = match with {
        JoinWith::Token(token) => JoinProof::JoinToken(token.expose().to_owned()),
        JoinWith::Platform(cfg) => {
            // The challenge is bound to the target, so a proof carrying it answers a join of that target only.
            let asked = JoinChallengeRequest::new(target);
            let resp = send(client.post(format!("{control_plane}{JOIN_CHALLENGE_PATH}")).json(&asked)).await?;
            let challenge: JoinChallenge =
                resp.json().await.map_err(|e| ApplianceError::Protocol(format!("join challenge: {e}")))?;
            // The server id proved is the CA this appliance pinned: a proof made for a control
            // plane it was not installed for could not be replayed at that one anyway.
            match platform_proof(cfg, &challenge.challenge, &pin.to_string(), target).await? {
                PlatformProof::AwsSts(p) => JoinProof::AwsSts(p),
                PlatformProof::Gcp(p) => JoinProof::Gcp(p),
                PlatformProof::K8s(p) => JoinProof::K8s(p),
            }
        }
    };
    let expected = recover.as_ref().map(|(_, identity)| identity.uri());
    let body = JoinRequest {
        proof,
        csr_pem,
        version: airlock_proto::VERSION.to_owned(),
        recover: recover.map(|(proof, _)| proof),
        environment: target.environment,
        tenant: target.tenant,
    };
    let resp = send(client.post(format!("{control_plane}{JOIN_PATH}")).json(&body)).await?;
    let joined: JoinResponse =
        resp.json().await.map_err(|e| ApplianceError::Protocol(format!("join response: {e}")))?;
    check_join_response(&joined, pin, key)?;
    if let Some(uri) = expected
        && joined.identity != uri
    {
        return Err(ApplianceError::Protocol(format!(
            "the control plane answered a recovery with identity {}, not {uri}",
            joined.identity
        )));
    }
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

/// The expired certificate, and its key's signature handing its identity to `key` at the
/// control plane `pin` names; with the identity it names.
fn recovery_proof(
    old: &Credentials,
    key: &KeyPair,
    pin: Fingerprint,
) -> Result<(airlock_proto::join::RecoveryProof, airlock_core::ApplianceIdentity), ApplianceError> {
    use rcgen::{PublicKeyData, SigningKey};
    let (identity, _) =
        inspect_cert(&old.cert_pem).map_err(|e| ApplianceError::Protocol(format!("the stored certificate: {e}")))?;
    let old_key =
        KeyPair::from_pem(&old.key_pem).map_err(|e| ApplianceError::Internal(format!("the stored key: {e}")))?;
    let message = airlock_proto::join::recovery_message(&pin.to_string(), key.der_bytes());
    let signature =
        old_key.sign(&message).map_err(|e| ApplianceError::Internal(format!("signing the recovery: {e}")))?;
    let proof = airlock_proto::join::RecoveryProof {
        certificate_pem: old.cert_pem.clone(),
        signature: data_encoding::BASE64URL_NOPAD.encode(&signature),
    };
    Ok((proof, identity))
}

/// A fresh platform proof for a renewal with `key` (JSON of `PlatformProof`), answering the
/// challenge derived from it; empty when none can be made, which the control plane refuses
/// (and the appliance retries).
pub(crate) async fn renewal_proof(cfg: &PlatformJoinConfig, key: &KeyPair, server_id: &str) -> String {
    use rcgen::PublicKeyData;
    let challenge = airlock_proto::join::renewal_challenge(key.der_bytes());
    // The renewal is judged by the appliance's own environment; nothing to name.
    match platform_proof(cfg, &challenge, server_id, JoinTarget::default()).await {
        Ok(proof) => serde_json::to_string(&proof).unwrap_or_default(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot prove the host's platform identity for this renewal");
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
