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
//! - GCP: `gcp`, the instance's identity token from its metadata server, whose audience is
//!   [`challenge_audience`] (this control plane's id and the challenge), with the challenge beside it.
//! - Kubernetes: `k8s`, a service-account token with the challenge beside it: either one the
//!   appliance asked the cluster's TokenRequest API for, whose audience is [`challenge_audience`]
//!   (fresh, as a GCP token), or a mounted projected token whose audience is fixed to
//!   [`server_audience`] (it cannot carry a challenge), whose freshness the control plane binds by
//!   its `jti` (single use) and `iat` instead.
//!
//! An AWS proof signs the tenant and environment the appliance names ([`TENANT_HEADER`], [`ENVIRONMENT_HEADER`]).
//!
//! A platform-joined appliance proves its identity again at each certificate renewal, over
//! its authenticated stream, with the challenge [`renewal_challenge`] derives from its new key
//! (a [`PlatformProof`] in JSON).
//!
//! On the wire the proof is one of the keys `join_token`, `aws_sts`, `gcp` or `k8s` beside
//! `csr_pem` and `version`, so a request from an appliance that knows only tokens reads as it
//! always did; in code it is the enum [`JoinProof`], and a request with none or several is
//! refused when read.
//!
//! A platform join pins where it joins ([`JoinTarget`]): its tenant (`tenant`) or its environment
//! (`environment`), or it is refused. Only the pinned tenant's (or environment's) rules judge the
//! identity, so another tenant's rule for the same account, project or issuer captures nothing; an
//! identity whose rules name several of the tenant's environments is placed in the named one, and
//! one that only another environment's rules accept is refused rather than joined elsewhere. The
//! challenge is asked for with the same target ([`JoinChallengeRequest`]) and bound to it, and an
//! AWS proof signs it ([`TENANT_HEADER`], [`ENVIRONMENT_HEADER`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub const JOIN_PATH: &str = "/v1/join";
pub const JOIN_CHALLENGE_PATH: &str = "/v1/join/challenge";
/// The signed header that carries the control plane's challenge (lowercase, as SigV4 lists it).
pub const CHALLENGE_HEADER: &str = "x-airlock-join-challenge";
/// The signed header that names the control plane the proof is meant for: its CA fingerprint,
/// so a proof shown to one control plane cannot be replayed at another.
pub const SERVER_ID_HEADER: &str = "x-airlock-server-id";
/// The signed header that names the environment the appliance means to join (`env_…`), when it
/// names one: the environment is then inside the proof, so whoever replays or relays it cannot
/// steer the join into another environment, and a request body naming another is refused.
pub const ENVIRONMENT_HEADER: &str = "x-airlock-environment";
/// The signed header that names the tenant the appliance means to join (`ten_…`), when it names
/// one: signed as [`ENVIRONMENT_HEADER`] is, for the same reason.
pub const TENANT_HEADER: &str = "x-airlock-tenant";

/// Where a platform join is pinned: its tenant, its environment (which implies its tenant), or
/// both. A platform identity is judged by the pinned tenant's (or environment's) join rules only,
/// so another tenant's rule naming the same account, project or issuer (none of which is a
/// secret) cannot capture the appliance. A platform join that pins neither is refused.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JoinTarget {
    pub tenant: Option<airlock_core::TenantId>,
    pub environment: Option<airlock_core::EnvironmentId>,
}

impl JoinTarget {
    /// Whether it pins anything.
    pub fn is_pinned(&self) -> bool {
        self.tenant.is_some() || self.environment.is_some()
    }
}

/// The body of `POST /v1/join/challenge`: the target the join will pin (a tenant, an environment, or
/// both; one at least). The challenge is bound to it, so a proof that carries the challenge (a GCP
/// token, a requested Kubernetes token) cannot be presented for another target.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct JoinChallengeRequest {
    /// The tenant (`ten_…`) the join will name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// The environment (`env_…`) the join will name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<String>,
}

impl JoinChallengeRequest {
    pub fn new(target: JoinTarget) -> Self {
        Self { tenant: target.tenant.map(|t| t.to_string()), environment: target.environment.map(|e| e.to_string()) }
    }

    /// The target it names, or why it names none readable.
    pub fn target(&self) -> Result<JoinTarget, &'static str> {
        read_target(self.tenant.as_deref(), self.environment.as_deref())
    }
}

fn read_target(tenant: Option<&str>, environment: Option<&str>) -> Result<JoinTarget, &'static str> {
    let tenant = tenant
        .map(|t| t.parse::<airlock_core::TenantId>())
        .transpose()
        .map_err(|_| "`tenant` is not a tenant id (`ten_…`)")?;
    let environment = environment
        .map(|e| e.parse::<airlock_core::EnvironmentId>())
        .transpose()
        .map_err(|_| "`environment` is not an environment id (`env_…`)")?;
    Ok(JoinTarget { tenant, environment })
}
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
    /// Set by an appliance whose certificate expired while it was offline: it keeps its identity.
    pub recover: Option<RecoveryProof>,
    /// The environment the appliance means to join (`--environment`): a platform identity is then judged by that
    /// environment's join rules only, and a join token must be that environment's.
    pub environment: Option<airlock_core::EnvironmentId>,
    /// The tenant the appliance means to join (`--tenant`): a platform identity is then judged by that tenant's join
    /// rules only, and a join token must be that tenant's. A platform join names this or `environment`.
    pub tenant: Option<airlock_core::TenantId>,
}

impl JoinRequest {
    /// Where the join is pinned.
    pub fn target(&self) -> JoinTarget {
        JoinTarget { tenant: self.tenant, environment: self.environment }
    }
}

/// An appliance whose certificate expired asks to keep its identity (its id, and so its audit
/// and execution chains and its counters): it shows its last certificate and signs
/// [`recovery_message`] with that certificate's key. It still proves where it belongs as any
/// join does (a new join token, or a fresh platform proof), and the control plane checks the
/// certificate is one it issued, is the appliance's current or previous one, is not revoked,
/// and names the environment that proof names.
#[derive(Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RecoveryProof {
    /// The expired certificate (PEM).
    pub certificate_pem: String,
    /// The old key's signature over [`recovery_message`], base64url without padding.
    pub signature: String,
}

impl std::fmt::Debug for RecoveryProof {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecoveryProof").finish_non_exhaustive()
    }
}

/// What the old key signs to recover: this control plane (its CA fingerprint) and the new key
/// the CSR certifies (its public bytes), so the signature hands the identity to that key only,
/// and only here.
pub fn recovery_message(server_id: &str, new_key: &[u8]) -> Vec<u8> {
    format!("airlock-recover-v1\n{server_id}\n{}", airlock_core::Fingerprint::of_der(new_key)).into_bytes()
}

/// How an appliance proves which environment it belongs to.
#[derive(Clone)]
pub enum JoinProof {
    /// The single-use join token (`airlock_jt_…`).
    JoinToken(String),
    /// A signed `sts:GetCallerIdentity` request answering a challenge.
    AwsSts(AwsStsProof),
    /// A GCE instance identity token whose audience carries the challenge.
    Gcp(GcpIdentityProof),
    /// A projected Kubernetes service-account token, and a challenge.
    K8s(K8sTokenProof),
}

impl JoinProof {
    /// The method's name as audited and listed (`join_token`, `aws_sts`, `gcp_identity`, `k8s_token`).
    pub fn method(&self) -> &'static str {
        match self {
            Self::JoinToken(_) => "join_token",
            Self::AwsSts(_) => "aws_sts",
            Self::Gcp(_) => GCP_METHOD,
            Self::K8s(_) => K8S_METHOD,
        }
    }
}

/// The audited and stored name of the GCP method.
pub const GCP_METHOD: &str = "gcp_identity";
/// The audited and stored name of the Kubernetes method.
pub const K8S_METHOD: &str = "k8s_token";

/// This control plane's id as platform tokens name it: `airlock:<CA fingerprint>`. A projected
/// Kubernetes token's audience is exactly this (set it as the volume's `audience`).
pub fn server_audience(server_id: &str) -> String {
    format!("airlock:{server_id}")
}

/// The audience a platform token minted for `challenge` carries (a GCP identity token, a
/// Kubernetes token from the TokenRequest API): `airlock:<CA fingerprint>/v1/join#<challenge>`,
/// so it answers one challenge of one control plane.
pub fn challenge_audience(server_id: &str, challenge: &str) -> String {
    format!("{}{JOIN_PATH}#{challenge}", server_audience(server_id))
}

/// A GCE instance identity token (`format=full`) whose audience is [`challenge_audience`] of `challenge`.
#[derive(Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct GcpIdentityProof {
    /// The JWT the metadata server answered.
    pub identity_token: String,
    /// The challenge its audience carries.
    pub challenge: String,
}

impl std::fmt::Debug for GcpIdentityProof {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token is a bearer credential until it expires: not logged.
        f.debug_struct("GcpIdentityProof").finish_non_exhaustive()
    }
}

/// A service-account token and the challenge this attempt was given, which it spends: a token
/// from the TokenRequest API whose audience is [`challenge_audience`] of that challenge, or a
/// mounted projected token whose audience is [`server_audience`].
#[derive(Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct K8sTokenProof {
    /// The JWT the API server issued (requested, or mounted by the kubelet).
    pub service_account_token: String,
    pub challenge: String,
}

impl std::fmt::Debug for K8sTokenProof {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("K8sTokenProof").finish_non_exhaustive()
    }
}

/// A platform proof made again at a renewal, sent as JSON in `RenewRequest.platform_proof_json`:
/// `{"aws_sts": …}`, `{"gcp": …}` or `{"k8s": …}` (a bare [`AwsStsProof`], as AWS-joined
/// appliances sent it first, reads as `aws_sts`), its challenge [`renewal_challenge`] of the new key.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum PlatformProof {
    AwsSts(AwsStsProof),
    Gcp(GcpIdentityProof),
    K8s(K8sTokenProof),
}

impl PlatformProof {
    pub fn method(&self) -> &'static str {
        match self {
            Self::AwsSts(_) => "aws_sts",
            Self::Gcp(_) => GCP_METHOD,
            Self::K8s(_) => K8S_METHOD,
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
    /// The single-use join token (`airlock_jt_…`); exactly one of `join_token`, `aws_sts`, `gcp`, `k8s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join_token: Option<String>,
    /// A signed `sts:GetCallerIdentity` request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws_sts: Option<AwsStsProof>,
    /// A GCE instance identity token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gcp: Option<GcpIdentityProof>,
    /// A projected Kubernetes service-account token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k8s: Option<K8sTokenProof>,
    /// PKCS#10 CSR in PEM for a key pair the appliance generated; it must not name an identity.
    pub csr_pem: String,
    /// The appliance build version.
    pub version: String,
    /// Set to keep an identity whose certificate expired offline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recover: Option<RecoveryProof>,
    /// The environment (`env_…`) the appliance means to join: only its join rules judge a platform identity, and a
    /// join token must be its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<String>,
    /// The tenant (`ten_…`) the appliance means to join: only its join rules judge a platform identity, and a join
    /// token must be its own. A platform join names `tenant` or `environment`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

impl TryFrom<JoinRequestWire> for JoinRequest {
    type Error = &'static str;
    fn try_from(w: JoinRequestWire) -> Result<Self, Self::Error> {
        let proof = match (w.join_token, w.aws_sts, w.gcp, w.k8s) {
            (Some(token), None, None, None) => JoinProof::JoinToken(token),
            (None, Some(aws), None, None) => JoinProof::AwsSts(aws),
            (None, None, Some(gcp), None) => JoinProof::Gcp(gcp),
            (None, None, None, Some(k8s)) => JoinProof::K8s(k8s),
            (None, None, None, None) => return Err("a join request needs `join_token`, `aws_sts`, `gcp` or `k8s`"),
            _ => return Err("a join request carries one of `join_token`, `aws_sts`, `gcp` and `k8s`, not several"),
        };
        let JoinTarget { tenant, environment } = read_target(w.tenant.as_deref(), w.environment.as_deref())?;
        Ok(Self { proof, csr_pem: w.csr_pem, version: w.version, recover: w.recover, environment, tenant })
    }
}

impl From<JoinRequest> for JoinRequestWire {
    fn from(r: JoinRequest) -> Self {
        let mut w = Self {
            join_token: None,
            aws_sts: None,
            gcp: None,
            k8s: None,
            csr_pem: r.csr_pem,
            version: r.version,
            recover: r.recover,
            environment: r.environment.map(|e| e.to_string()),
            tenant: r.tenant.map(|t| t.to_string()),
        };
        match r.proof {
            JoinProof::JoinToken(t) => w.join_token = Some(t),
            JoinProof::AwsSts(p) => w.aws_sts = Some(p),
            JoinProof::Gcp(p) => w.gcp = Some(p),
            JoinProof::K8s(p) => w.k8s = Some(p),
        }
        w
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
    /// Single use, for one join attempt; goes in the [`CHALLENGE_HEADER`] signed header (AWS),
    /// in the token's audience (GCP and a requested Kubernetes token, [`challenge_audience`]), or
    /// beside a mounted Kubernetes token.
    pub challenge: String,
    /// The control plane's CA fingerprint; goes in the [`SERVER_ID_HEADER`] signed header (AWS)
    /// or in the token's audience (GCP, Kubernetes: [`server_audience`]). The appliance uses the
    /// fingerprint it pinned, not this one.
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
        let gcp = r#"{"gcp":{"identity_token":"a.b.c","challenge":"n"},"csr_pem":"c","version":"1"}"#;
        assert!(matches!(serde_json::from_str::<JoinRequest>(gcp).unwrap().proof, JoinProof::Gcp(_)));
        let k8s = r#"{"k8s":{"service_account_token":"a.b.c","challenge":"n"},"csr_pem":"c","version":"1"}"#;
        let req = serde_json::from_str::<JoinRequest>(k8s).unwrap();
        assert_eq!(req.proof.method(), K8S_METHOD);
        assert_eq!(serde_json::to_string(&req).unwrap(), k8s);
        let two = r#"{"gcp":{"identity_token":"t","challenge":"n"},"k8s":{"service_account_token":"t","challenge":"n"},"csr_pem":"c","version":"1"}"#;
        assert!(serde_json::from_str::<JoinRequest>(two).is_err());
    }

    #[test]
    fn a_renewal_proof_names_its_method() {
        let gcp = r#"{"gcp":{"identity_token":"t","challenge":"renew:x"}}"#;
        assert_eq!(serde_json::from_str::<PlatformProof>(gcp).unwrap().method(), GCP_METHOD);
        assert!(serde_json::from_str::<PlatformProof>(r#"{"gcp":{}}"#).is_err());
        assert_eq!(challenge_audience("sha256:ab", "n"), "airlock:sha256:ab/v1/join#n");
    }
}
