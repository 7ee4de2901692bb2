//! The join exchange on the control plane's HTTPS API.
//!
//! The appliance proves who it is in one of two ways and sends a CSR for a key it generated
//! itself; the control plane answers with a certificate naming the appliance's identity.
//! - A single-use join token (bare metal): `POST /v1/join` with `join_token`.
//! - Platform identity (AWS): `POST /v1/join/challenge` first, for a short-lived, single-use
//!   nonce; then `POST /v1/join` with `aws_sts`, a SigV4-signed `sts:GetCallerIdentity`
//!   request whose signed headers carry that nonce ([`CHALLENGE_HEADER`]) and the control
//!   plane's CA fingerprint ([`SERVER_ID_HEADER`]). The control plane forwards it, unchanged, to
//!   an STS endpoint on its allow list, and AWS's answer names the caller.
//!
//! A platform-joined appliance proves its identity again at each certificate renewal, over
//! its authenticated stream, with the challenge [`renewal_challenge`] derives from its new key.
//!
//! On the wire the proof is one of the keys `join_token` or `aws_sts` beside `csr_pem` and
//! `version`, so a request from an appliance that knows only tokens reads as it always did; in
//! code it is the enum [`JoinProof`], and a request with neither or both is refused when read.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub const JOIN_PATH: &str = "/v1/join";
pub const JOIN_CHALLENGE_PATH: &str = "/v1/join/challenge";
/// The signed header that carries the control plane's challenge (lowercase, as SigV4 lists it).
pub const CHALLENGE_HEADER: &str = "x-airlock-join-challenge";
/// The signed header that names the control plane the proof is meant for: its CA fingerprint,
/// so a proof shown to one control plane cannot be replayed at another.
pub const SERVER_ID_HEADER: &str = "x-airlock-server-id";
/// The only body a `GetCallerIdentity` proof may carry.
pub const GET_CALLER_IDENTITY_BODY: &str = "Action=GetCallerIdentity&Version=2011-06-15";

/// A join request: a proof of identity, and a CSR.
#[derive(Clone, Serialize, Deserialize)]
#[serde(try_from = "JoinRequestWire", into = "JoinRequestWire")]
pub struct JoinRequest {
    pub proof: JoinProof,
    /// PKCS#10 CSR in PEM for a key pair the appliance generated; it must not name an identity.
    pub csr_pem: String,
    /// The appliance build version.
    pub version: String,
}

/// How an appliance proves which environment it belongs to.
#[derive(Clone)]
pub enum JoinProof {
    /// The single-use join token (`airlock_jt_…`).
    JoinToken(String),
    /// A signed `sts:GetCallerIdentity` request answering a challenge.
    AwsSts(AwsStsProof),
}

impl JoinProof {
    /// The method's name as audited and listed (`join_token`, `aws_sts`).
    pub fn method(&self) -> &'static str {
        match self {
            Self::JoinToken(_) => "join_token",
            Self::AwsSts(_) => "aws_sts",
        }
    }
}

/// A SigV4 header-signed `sts:GetCallerIdentity` request, as the appliance built it. The
/// control plane sends exactly this (to an allow-listed endpoint only); it cannot alter it
/// without breaking the signature, and holds no AWS credential of the appliance's.
#[derive(Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AwsStsProof {
    /// `POST`.
    pub method: String,
    /// The STS endpoint, e.g. `https://sts.eu-west-1.amazonaws.com/`.
    pub url: String,
    /// Every header sent, by name (`authorization`, `x-amz-date`, the two `x-airlock-*`, ...).
    pub headers: BTreeMap<String, String>,
    /// `Action=GetCallerIdentity&Version=2011-06-15`.
    pub body: String,
}

impl std::fmt::Debug for AwsStsProof {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The signature and a session token are credentials for a few minutes: not logged.
        f.debug_struct("AwsStsProof").field("url", &self.url).finish_non_exhaustive()
    }
}

/// The JSON form of [`JoinRequest`].
#[derive(Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema), schema(as = JoinRequest))]
#[serde(deny_unknown_fields)]
pub struct JoinRequestWire {
    /// The single-use join token (`airlock_jt_…`); exactly one of `join_token` and `aws_sts`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join_token: Option<String>,
    /// A signed `sts:GetCallerIdentity` request; exactly one of `join_token` and `aws_sts`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws_sts: Option<AwsStsProof>,
    /// PKCS#10 CSR in PEM for a key pair the appliance generated; it must not name an identity.
    pub csr_pem: String,
    /// The appliance build version.
    pub version: String,
}

impl TryFrom<JoinRequestWire> for JoinRequest {
    type Error = &'static str;
    fn try_from(w: JoinRequestWire) -> Result<Self, Self::Error> {
        let proof = match (w.join_token, w.aws_sts) {
            (Some(token), None) => JoinProof::JoinToken(token),
            (None, Some(aws)) => JoinProof::AwsSts(aws),
            (None, None) => return Err("a join request needs `join_token` or `aws_sts`"),
            (Some(_), Some(_)) => return Err("a join request carries one of `join_token` and `aws_sts`, not both"),
        };
        Ok(Self { proof, csr_pem: w.csr_pem, version: w.version })
    }
}

impl From<JoinRequest> for JoinRequestWire {
    fn from(r: JoinRequest) -> Self {
        let (join_token, aws_sts) = match r.proof {
            JoinProof::JoinToken(t) => (Some(t), None),
            JoinProof::AwsSts(p) => (None, Some(p)),
        };
        Self { join_token, aws_sts, csr_pem: r.csr_pem, version: r.version }
    }
}

impl std::fmt::Debug for JoinRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinRequest").field("method", &self.proof.method()).finish_non_exhaustive()
    }
}

/// The challenge a renewal's platform proof carries: derived from the new key the CSR
/// certifies, so it needs no round trip and is single use (a renewal must bring a new key, and
/// a proof captured for one key renews nothing without that key's private half). `key` is the
/// key's public bytes as the CSR carries them.
pub fn renewal_challenge(key: &[u8]) -> String {
    format!("renew:{}", airlock_core::Fingerprint::of_der(key))
}

/// The answer to `POST /v1/join/challenge`: a nonce to put in the platform proof.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JoinChallenge {
    /// Single use, for one join attempt; goes in the [`CHALLENGE_HEADER`] signed header.
    pub challenge: String,
    /// The control plane's CA fingerprint; goes in the [`SERVER_ID_HEADER`] signed header.
    pub server_id: String,
    /// After this the challenge is refused (RFC 3339).
    pub expires_at: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JoinResponse {
    pub appliance_id: String,
    /// SPIFFE URI the certificate carries.
    pub identity: String,
    pub certificate_pem: String,
    /// The control plane CA; its SHA-256 fingerprint equals the one the appliance pinned.
    pub ca_certificate_pem: String,
    /// `host:port` of the appliance gateway.
    pub gateway_endpoint: String,
    /// TLS server name to expect on the gateway certificate.
    pub gateway_server_name: String,
    pub not_after: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_request_reads_as_it_always_did_and_neither_or_both_is_refused() {
        let old = r#"{"join_token":"airlock_jt_x","csr_pem":"c","version":"1"}"#;
        let req: JoinRequest = serde_json::from_str(old).unwrap();
        assert!(matches!(req.proof, JoinProof::JoinToken(ref t) if t == "airlock_jt_x"));
        assert_eq!(serde_json::to_string(&req).unwrap(), old);
        assert!(serde_json::from_str::<JoinRequest>(r#"{"csr_pem":"c","version":"1"}"#).is_err());
        let both = r#"{"join_token":"t","aws_sts":{"method":"POST","url":"u","headers":{},"body":""},"csr_pem":"c","version":"1"}"#;
        assert!(serde_json::from_str::<JoinRequest>(both).is_err());
        let aws =
            r#"{"aws_sts":{"method":"POST","url":"u","headers":{"a":"b"},"body":""},"csr_pem":"c","version":"1"}"#;
        assert!(matches!(serde_json::from_str::<JoinRequest>(aws).unwrap().proof, JoinProof::AwsSts(_)));
        assert!(
            serde_json::from_str::<JoinRequest>(r#"{"join_token":"t","csr_pem":"c","version":"1","x":1}"#).is_err()
        );
    }
}
