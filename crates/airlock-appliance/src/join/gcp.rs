//! The GCP proof of a join: the instance's identity token, from its metadata server.
//!
//! `GET /computeMetadata/v1/instance/service-accounts/default/identity?audience=A&format=full`
//! with `Metadata-Flavor: Google`, over plain HTTP to the link-local server (as every Google
//! client library does), never through a proxy. The audience binds the token to this control
//! plane's CA and the challenge (`airlock_proto::join::challenge_audience`), so a captured token
//! answers one challenge of one control plane; `format=full` adds the project the control plane
//! matches rules on. Google signs the token; the control plane checks it against Google's JWKS.

use std::time::Duration;

use crate::ApplianceError;

/// How long the metadata server has to answer.
const TIMEOUT: Duration = Duration::from_secs(10);
/// The longest answer read (a token is about 1 KiB).
const MAX_TOKEN_BYTES: usize = 16 * 1024;
const IDENTITY_PATH: &str = "computeMetadata/v1/instance/service-accounts/default/identity";

fn failed(why: impl std::fmt::Display) -> ApplianceError {
    ApplianceError::PlatformIdentity(why.to_string())
}

/// Asks the metadata server at `metadata_url` for an identity token with `audience`.
pub(crate) async fn identity_token(metadata_url: &reqwest::Url, audience: &str) -> Result<String, ApplianceError> {
    let mut url = metadata_url.join(IDENTITY_PATH).map_err(failed)?;
    url.query_pairs_mut().append_pair("audience", audience).append_pair("format", "full");
    let client = super::platform_client(rustls::RootCertStore::empty(), TIMEOUT).map_err(failed)?;
    let mut resp = client.get(url).header("Metadata-Flavor", "Google").send().await.map_err(|e| {
        failed(format!("the GCE metadata server at {metadata_url} does not answer ({e}); is this a GCE instance?"))
    })?;
    let status = resp.status();
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(failed)? {
        if body.len() + chunk.len() > MAX_TOKEN_BYTES {
            return Err(failed("the metadata server's answer is longer than a token"));
        }
        body.extend_from_slice(&chunk);
    }
    let text = String::from_utf8(body).map_err(|_| failed("the metadata server's answer is not text"))?;
    if !status.is_success() {
        let said: String = text.chars().filter(|c| !c.is_control()).take(200).collect();
        return Err(failed(format!(
            "the metadata server refused an identity token (HTTP {}): {said}",
            status.as_u16()
        )));
    }
    let token = text.trim().to_owned();
    if token.split('.').count() != 3 || !token.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
        return Err(failed("the metadata server's answer is not a JWT"));
    }
    Ok(token)
}
