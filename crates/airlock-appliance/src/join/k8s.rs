//! The Kubernetes proof of a join: a service-account token, requested per challenge or mounted.
//!
//! Requested (`--k8s-token-request`, [`requested_token`]): the appliance asks its cluster's API
//! server for a token of its own service account (`TokenRequest`, `POST
//! /api/v1/namespaces/NS/serviceaccounts/NAME/token`), authenticated with its mounted token and
//! verifying the API server with the cluster CA, whose audience is
//! `airlock_proto::join::challenge_audience` of the challenge: fresh, as a GCP token is. The
//! service account needs RBAC `create` on its own `serviceaccounts/token`.
//!
//! Mounted: the pod spec projects a token whose audience is this control plane's id,
//! `airlock:<CA fingerprint>` (`airlock_proto::join::server_audience`), at `--k8s-token-path`;
//! the kubelet rewrites it before it expires. It is read afresh for each join and renewal. A
//! mounted token cannot carry the challenge: the control plane accepts each token's `jti` once
//! (for this appliance) and only while its `iat` is recent.

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use crate::ApplianceError;
use crate::config::K8sTokenRequest;

/// The shortest lifetime the API server grants (`expirationSeconds`); the control plane needs the
/// token for one join, within the challenge's minute.
const REQUESTED_SECONDS: u32 = 600;
/// How long the API server has to answer.
const TIMEOUT: Duration = Duration::from_secs(10);
/// The longest answer read (a `TokenRequest` with its token is 2 to 3 KiB).
const MAX_ANSWER_BYTES: usize = 64 * 1024;

fn failed(why: impl std::fmt::Display) -> ApplianceError {
    ApplianceError::PlatformIdentity(why.to_string())
}

/// Whether `token` looks like a JWT (three base64url parts).
fn is_jwt(token: &str) -> bool {
    token.split('.').count() == 3 && token.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// The namespace and name of the service account a mounted token names in its `sub`
/// (`system:serviceaccount:NS:NAME`). Read unverified: the API server verifies the token it is
/// shown, and grants a token only for the service account RBAC lets it.
fn service_account_of(token: &str) -> Result<(String, String), ApplianceError> {
    let payload = token.split('.').nth(1).unwrap_or_default();
    let claims: serde_json::Value = data_encoding::BASE64URL_NOPAD
        .decode(payload.as_bytes())
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| failed("the mounted service-account token's claims do not read as JSON"))?;
    let sub = claims["sub"].as_str().unwrap_or_default();
    let (ns, name) = sub.strip_prefix("system:serviceaccount:").and_then(|r| r.split_once(':')).ok_or_else(|| {
        failed("the mounted token is not a service account's (its `sub` is not system:serviceaccount:NS:NAME)")
    })?;
    // DNS labels and subdomains only: they go into the request's path.
    let name_ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 253
            && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    };
    if !name_ok(ns) || !name_ok(name) {
        return Err(failed("the mounted token names a service account that is not a Kubernetes name"));
    }
    Ok((ns.to_owned(), name.to_owned()))
}

/// Asks the API server for a token of the service account the mounted token at `token_path`
/// belongs to, with `audience` (the challenge's), for [`REQUESTED_SECONDS`].
pub(crate) async fn requested_token(
    request: &K8sTokenRequest,
    token_path: &Path,
    audience: &str,
) -> Result<String, ApplianceError> {
    let path = token_path.to_owned();
    let mounted = tokio::task::spawn_blocking(move || read_token(&path))
        .await
        .map_err(|e| ApplianceError::Internal(e.to_string()))??;
    let (namespace, name) = service_account_of(&mounted)?;
    let ca_path = request.ca_path.clone();
    let ca = tokio::task::spawn_blocking(move || std::fs::read(&ca_path))
        .await
        .map_err(|e| ApplianceError::Internal(e.to_string()))?
        .map_err(|e| failed(format!("cannot read the cluster CA at {} ({e})", request.ca_path.display())))?;
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&ca) {
        let cert = cert.map_err(|_| failed(format!("{} is not a PEM certificate file", request.ca_path.display())))?;
        roots.add(cert).map_err(|e| failed(format!("the cluster CA at {}: {e}", request.ca_path.display())))?;
    }
    if roots.is_empty() {
        return Err(failed(format!("{} holds no certificate", request.ca_path.display())));
    }
    // The API server is the cluster's own: reached directly, as in-cluster clients reach it by
    // its service address, and only the cluster CA vouches for it.
    let client = super::platform_client(roots, TIMEOUT).map_err(failed)?;
    let url =
        request.api_url.join(&format!("api/v1/namespaces/{namespace}/serviceaccounts/{name}/token")).map_err(failed)?;
    let body = serde_json::json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": { "audiences": [audience], "expirationSeconds": REQUESTED_SECONDS },
    });
    let mut resp = client
        .post(url)
        .bearer_auth(&mounted)
        .header("accept", "application/json")
        .json(&body)
        .send()
        .await
        .map_err(|e| failed(format!("the Kubernetes API server at {} does not answer ({e})", request.api_url)))?;
    let status = resp.status();
    let mut answer = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(failed)? {
        if answer.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Err(failed("the API server's answer to a TokenRequest is too long"));
        }
        answer.extend_from_slice(&chunk);
    }
    let json: Option<serde_json::Value> = serde_json::from_slice(&answer).ok();
    if !status.is_success() {
        // A `Status` object: its message is shown to the operator as it is, never interpreted.
        let said: String = json
            .as_ref()
            .and_then(|v| v["message"].as_str())
            .unwrap_or_default()
            .chars()
            .filter(|c| !c.is_control())
            .take(300)
            .collect();
        let hint = if status.as_u16() == 401 || status.as_u16() == 403 {
            format!(
                "; the service account {namespace}/{name} needs RBAC `create` on its own `serviceaccounts/token` (resourceNames: [{name}])"
            )
        } else {
            String::new()
        };
        return Err(failed(format!(
            "the Kubernetes API server refused a TokenRequest for {namespace}/{name} (HTTP {}): {said}{hint}",
            status.as_u16()
        )));
    }
    let token = json
        .as_ref()
        .and_then(|v| v["status"]["token"].as_str())
        .ok_or_else(|| failed("the API server's TokenRequest answer carries no status.token"))?;
    if !is_jwt(token) {
        return Err(failed("the API server's TokenRequest answer is not a JWT"));
    }
    Ok(token.to_owned())
}

/// The longest token file read (a token is 1 to 2 KiB).
const MAX_TOKEN_BYTES: u64 = 16 * 1024;

/// Reads the token at `path`.
pub(crate) fn read_token(path: &Path) -> Result<String, ApplianceError> {
    let failed = |why: String| ApplianceError::PlatformIdentity(why);
    let file = std::fs::File::open(path).map_err(|e| {
        failed(format!(
            "cannot read the service-account token at {} ({e}); project one with audience `airlock:<CA fingerprint>` there",
            path.display()
        ))
    })?;
    let mut text = String::new();
    file.take(MAX_TOKEN_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| failed(format!("cannot read {}: {e}", path.display())))?;
    if text.len() as u64 > MAX_TOKEN_BYTES {
        return Err(failed(format!("{} is longer than a token", path.display())));
    }
    let token = text.trim().to_owned();
    if !is_jwt(&token) {
        return Err(failed(format!("{} does not hold a JWT", path.display())));
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_service_account_is_read_from_the_mounted_token_and_must_be_a_kubernetes_name() {
        let token = |sub: &str| {
            let claims = serde_json::json!({ "sub": sub }).to_string();
            format!("h.{}.s", data_encoding::BASE64URL_NOPAD.encode(claims.as_bytes()))
        };
        assert_eq!(
            service_account_of(&token("system:serviceaccount:airlock:appliance")).unwrap(),
            ("airlock".to_owned(), "appliance".to_owned())
        );
        for bad in
            ["alice", "system:serviceaccount:airlock", "system:serviceaccount:a/../b:x", "system:serviceaccount:a:B"]
        {
            assert!(service_account_of(&token(bad)).is_err(), "{bad}");
        }
        assert!(service_account_of("h.!!.s").is_err());
    }

    #[test]
    fn a_mounted_token_is_read_fresh_and_anything_else_is_refused_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let missing = read_token(&path).unwrap_err().to_string();
        assert!(missing.contains("audience `airlock:<CA fingerprint>`"), "{missing}");
        std::fs::write(&path, "aGVhZA.cGF5bG9hZA.c2ln\n").unwrap();
        assert_eq!(read_token(&path).unwrap(), "aGVhZA.cGF5bG9hZA.c2ln");
        std::fs::write(&path, "not a token").unwrap();
        assert!(read_token(&path).is_err());
        std::fs::write(&path, format!("a.{}.c", "b".repeat(MAX_TOKEN_BYTES as usize))).unwrap();
        assert!(read_token(&path).unwrap_err().to_string().contains("longer than a token"));
    }
}
