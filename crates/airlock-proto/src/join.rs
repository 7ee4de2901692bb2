//! The join exchange: `POST /v1/join` on the control plane's HTTPS API.
//!
//! The appliance sends a single-use join token and a CSR for a key it generated itself;
//! the control plane answers with a certificate naming the appliance's identity.

use serde::{Deserialize, Serialize};

pub const JOIN_PATH: &str = "/v1/join";

#[derive(Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    /// The single-use join token (`airlock_jt_…`).
    pub join_token: String,
    /// PKCS#10 CSR in PEM for a key pair the appliance generated; it must not name an identity.
    pub csr_pem: String,
    /// The appliance build version.
    pub version: String,
}

impl std::fmt::Debug for JoinRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinRequest").field("join_token", &"<redacted>").finish_non_exhaustive()
    }
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
