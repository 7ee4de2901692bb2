//! GCP and Kubernetes joins: a JWT the platform signed, verified through its issuer's OpenID
//! discovery and JWKS (`crate::issuer`, which fetches, caches and checks signatures), then read
//! here into the identity rules match.
//!
//! GCP: the token comes from the instance's metadata server (`format=full`), issued by
//! `--gcp-issuer` (Google's accounts service), its audience [`airlock_proto::join::challenge_audience`]
//! of the challenge: the challenge is in the signed token, so a captured token answers one
//! challenge, which the first answer spends. Its claims name the project
//! (`google.compute_engine.project_id`) and the service account (`email`, verified).
//!
//! Kubernetes, requested: a token the appliance asked its cluster's TokenRequest API for, its
//! audience [`airlock_proto::join::challenge_audience`] of the challenge: fresh as a GCP token.
//!
//! Kubernetes, mounted: a projected service-account token mounted by the kubelet, its audience fixed to
//! [`airlock_proto::join::server_audience`]. A mounted token cannot carry a challenge, so
//! freshness is bound otherwise: its `jti` joins once ([`TokenId`], kept until the token's `exp`
//! in the store), and its `iat` is at most `--k8s-max-token-age` old (1 h by default). Only an
//! issuer some rule names is ever asked for discovery (read from the unverified token first), so
//! an anonymous peer cannot make the control plane fetch a URL of its choosing.

use std::time::Duration;

use airlock_core::Timestamp;
use data_encoding::BASE64URL_NOPAD;

use super::rules::{GcpIdentity, K8sIdentity};
use crate::issuer::{Claims, JwtRefusal};

/// The longest token read (real ones are 1 to 2 KiB).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// How old a Kubernetes token's `iat` may be, unless configured: the kubelet refreshes a
/// projected token once 80% of its life has passed, so a volume with `expirationSeconds: 3600`
/// (the default) always holds one younger than this.
pub const DEFAULT_K8S_MAX_TOKEN_AGE: Duration = Duration::from_secs(3600);
/// The longest claim value read into an identity.
const MAX_CLAIM_BYTES: usize = 512;

/// Why a platform token was refused: a code for programs and the audit, a reason for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenRefusal {
    /// Not a JWT we can read (too long, not three parts, no `iss`).
    Malformed(&'static str),
    /// The issuer's verification refused it (signature, algorithm, key, iss, aud, time).
    Jwt(JwtRefusal),
    /// No join rule names the token's issuer; nothing was fetched from it.
    IssuerNotNamed(String),
    /// A claim the method needs is missing, or says what it must not.
    Claim(&'static str),
    /// This `jti` has joined or renewed another appliance already.
    Replayed,
    /// A mounted token (audience fixed, not the challenge's) where `--k8s-require-token-request`
    /// accepts only tokens from the TokenRequest API.
    MountedNotAccepted,
}

impl TokenRefusal {
    pub fn code(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed_token",
            Self::Jwt(r) => r.code(),
            Self::IssuerNotNamed(_) => "issuer_not_named",
            Self::Claim(_) => "missing_claim",
            Self::Replayed => "token_replayed",
            Self::MountedNotAccepted => "token_request_required",
        }
    }

    pub fn reason(&self) -> String {
        match self {
            Self::Malformed(why) => format!("the platform token is malformed: {why}"),
            Self::Jwt(r) => format!("the platform token is refused: {}", r.reason()),
            Self::IssuerNotNamed(iss) => format!(
                "no join rule names the token's issuer `{iss}`; add one with `airlock env join-rule add --k8s-issuer`"
            ),
            Self::Claim(what) => format!("the platform token does not carry {what}"),
            Self::Replayed => {
                "this service-account token (its jti) was used already; wait for the kubelet to refresh it".into()
            }
            Self::MountedNotAccepted => "this control plane accepts only Kubernetes tokens from the TokenRequest API \
                 (their audience binds the join challenge); run the appliance with --k8s-token-request"
                .into(),
        }
    }
}

/// A Kubernetes token's single-use id: a digest of its issuer and `jti`, kept until `expires_at`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenId {
    pub digest: String,
    pub expires_at: Timestamp,
}

/// The `iss` and `aud` of a token not yet verified: only to find the rules that name the issuer,
/// and to tell a requested Kubernetes token (its audience binds the challenge) from a mounted one.
pub fn unverified_issuer_and_audiences(token: &str) -> Result<(String, Vec<String>), TokenRefusal> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(TokenRefusal::Malformed("longer than 16 KiB"));
    }
    let mut parts = token.split('.');
    let (Some(_), Some(payload), Some(_), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(TokenRefusal::Malformed("not a signed JWT (three dot-separated parts)"));
    };
    let bytes =
        BASE64URL_NOPAD.decode(payload.as_bytes()).map_err(|_| TokenRefusal::Malformed("payload is not base64url"))?;
    let claims: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|_| TokenRefusal::Malformed("payload is not JSON"))?;
    let issuer = match claims.get("iss").and_then(|v| v.as_str()) {
        Some(iss) if !iss.is_empty() && iss.len() <= super::rules::MAX_ISSUER_BYTES => iss.to_owned(),
        _ => return Err(TokenRefusal::Malformed("no `iss` claim")),
    };
    // `aud` is a string or an array of strings (RFC 7519 §4.1.3).
    let audiences = match claims.get("aud") {
        Some(serde_json::Value::String(a)) => vec![a.clone()],
        Some(serde_json::Value::Array(all)) => all.iter().filter_map(|a| a.as_str().map(str::to_owned)).collect(),
        _ => Vec::new(),
    };
    Ok((issuer, audiences))
}

fn short_str(v: Option<&serde_json::Value>) -> Option<&str> {
    v.and_then(|v| v.as_str()).filter(|s| !s.is_empty() && s.len() <= MAX_CLAIM_BYTES)
}

/// The identity a verified GCE identity token names.
pub fn read_gcp(claims: &Claims) -> Result<GcpIdentity, TokenRefusal> {
    let c = &claims.0;
    let email = short_str(c.get("email")).ok_or(TokenRefusal::Claim("`email` (the service account)"))?;
    // Google says `email_verified: true` for service accounts; anything else is not one.
    if c.get("email_verified") != Some(&serde_json::Value::Bool(true)) {
        return Err(TokenRefusal::Claim("`email_verified: true`"));
    }
    let project = short_str(c.get("google").and_then(|g| g.get("compute_engine")).and_then(|g| g.get("project_id")))
        .ok_or(TokenRefusal::Claim("`google.compute_engine.project_id` (ask the metadata server with format=full)"))?;
    let sub = short_str(c.get("sub")).ok_or(TokenRefusal::Claim("`sub`"))?;
    Ok(GcpIdentity { project: project.to_owned(), email: email.to_owned(), sub: sub.to_owned() })
}

/// The identity a verified service-account token names, and with `single_use` (a mounted token,
/// whose freshness is its `jti`) its single-use id, which it must then carry. `sub` and the
/// `kubernetes.io` claim must agree on the namespace and service account.
pub fn read_k8s(
    issuer: &str,
    claims: &Claims,
    single_use: bool,
) -> Result<(K8sIdentity, Option<TokenId>), TokenRefusal> {
    let c = &claims.0;
    let sub = short_str(c.get("sub")).ok_or(TokenRefusal::Claim("`sub`"))?;
    let Some((namespace, name)) = sub.strip_prefix("system:serviceaccount:").and_then(|r| r.split_once(':')) else {
        return Err(TokenRefusal::Claim("a service account's `sub` (system:serviceaccount:NS:NAME)"));
    };
    let k = c.get("kubernetes.io").ok_or(TokenRefusal::Claim("the `kubernetes.io` claim"))?;
    let agrees = short_str(k.get("namespace")) == Some(namespace)
        && short_str(k.get("serviceaccount").and_then(|s| s.get("name"))) == Some(name);
    if !agrees {
        return Err(TokenRefusal::Claim("a `kubernetes.io` claim that agrees with `sub`"));
    }
    let pod = short_str(k.get("pod").and_then(|p| p.get("name"))).map(str::to_owned);
    let identity = K8sIdentity {
        issuer: issuer.to_owned(),
        namespace: namespace.to_owned(),
        service_account: name.to_owned(),
        pod,
    };
    if !single_use {
        return Ok((identity, None));
    }
    let jti = short_str(c.get("jti")).ok_or(TokenRefusal::Claim("a `jti` (Kubernetes 1.29 or later)"))?;
    let exp = c.get("exp").and_then(serde_json::Value::as_i64).ok_or(TokenRefusal::Claim("`exp`"))?;
    let mut h = sha2::Sha256::default();
    sha2::Digest::update(&mut h, issuer.as_bytes());
    sha2::Digest::update(&mut h, [0u8]);
    sha2::Digest::update(&mut h, jti.as_bytes());
    let digest = data_encoding::HEXLOWER.encode(&sha2::Digest::finalize(h));
    // Kept as long as the token verifies: `exp` plus the clock-skew leeway `issuer` allows.
    let expires_at = Timestamp::from_unix_millis(exp.saturating_mul(1000)).saturating_add(crate::issuer::LEEWAY);
    Ok((identity, Some(TokenId { digest, expires_at })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn claims(v: serde_json::Value) -> Claims {
        Claims(v.as_object().unwrap().clone())
    }

    #[test]
    fn a_gcp_token_names_a_verified_service_account_and_its_project() {
        let good = json!({"email": "a@p.iam.gserviceaccount.com", "email_verified": true, "sub": "1",
            "google": {"compute_engine": {"project_id": "p"}}});
        let id = read_gcp(&claims(good.clone())).unwrap();
        assert_eq!((id.project.as_str(), id.email.as_str()), ("p", "a@p.iam.gserviceaccount.com"));
        let mut unverified = good.clone();
        unverified["email_verified"] = json!("true");
        assert_eq!(read_gcp(&claims(unverified)), Err(TokenRefusal::Claim("`email_verified: true`")));
        let mut standard = good.clone();
        standard.as_object_mut().unwrap().remove("google");
        assert!(matches!(read_gcp(&claims(standard)), Err(TokenRefusal::Claim(_))), "format=standard has no project");
        let mut long = good;
        long["email"] = json!("a".repeat(600));
        assert!(read_gcp(&claims(long)).is_err());
    }

    #[test]
    fn a_k8s_token_names_its_service_account_once_by_jti() {
        let good = json!({"sub": "system:serviceaccount:airlock:appliance", "jti": "j1", "exp": 2_000_000_000,
            "kubernetes.io": {"namespace": "airlock", "serviceaccount": {"name": "appliance"}, "pod": {"name": "p-0"}}});
        let (id, token) = read_k8s("https://k", &claims(good.clone()), true).unwrap();
        let token = token.unwrap();
        assert_eq!(
            (id.namespace.as_str(), id.service_account.as_str(), id.pod.as_deref()),
            ("airlock", "appliance", Some("p-0"))
        );
        assert_eq!(
            token.expires_at,
            Timestamp::from_unix_millis(2_000_000_000_000).saturating_add(crate::issuer::LEEWAY)
        );
        let (_, same) = read_k8s("https://k", &claims(good.clone()), true).unwrap();
        assert_eq!(Some(&token), same.as_ref());
        let (_, other_issuer) = read_k8s("https://other", &claims(good.clone()), true).unwrap();
        let other_issuer = other_issuer.unwrap();
        assert_ne!(token.digest, other_issuer.digest, "a jti is unique per issuer only");
        let mut no_jti = good.clone();
        no_jti.as_object_mut().unwrap().remove("jti");
        assert!(read_k8s("https://k", &claims(no_jti.clone()), true).is_err());
        // A requested token is fresh by its audience: it needs no jti, and none is spent.
        let (requested, none) = read_k8s("https://k", &claims(no_jti), false).unwrap();
        assert_eq!((requested, none), (id.clone(), None));
        let mut disagree = good.clone();
        disagree["kubernetes.io"]["namespace"] = json!("default");
        assert!(read_k8s("https://k", &claims(disagree.clone()), true).is_err());
        assert!(read_k8s("https://k", &claims(disagree), false).is_err());
        let mut user = good;
        user["sub"] = json!("alice");
        assert!(read_k8s("https://k", &claims(user), false).is_err());
    }

    /// Through the issuer module, against the test kit's Google-shaped issuer: a key rotated in
    /// is fetched once a token names it (after the refetch pause), a kid no JWKS holds and
    /// unsigned or HMAC tokens are refused.
    #[tokio::test]
    async fn a_rotated_in_key_is_fetched_and_forged_tokens_are_refused() {
        use airlock_testkit::jwt_issuer::{Flavor, Forgery, JwtIssuer, google_claims};

        use crate::issuer::{Expect, IssuerClient, Issuers, REFRESH_AFTER_UNKNOWN_KID, read_ca_pem};
        let google = JwtIssuer::start(Flavor::Google);
        let issuers = Issuers::new(IssuerClient::new(read_ca_pem(google.ca_pem().as_bytes()).unwrap(), true).unwrap());
        let iss = google.issuer().to_owned();
        let t0 = 1_800_000_000;
        let at = |secs: u64| Timestamp::from_unix_millis(t0 * 1000).saturating_add(Duration::from_secs(secs));
        let audience = "airlock:sha256:00/v1/join#c";
        let expect = Expect { audience, max_age: None };
        let sa = "appliance@p.iam.gserviceaccount.com";
        let claims = google_claims(&iss, audience, sa, "p", t0);

        let verified = issuers.verify(&iss, &google.mint(&claims), &expect, at(0)).await.unwrap();
        assert_eq!(read_gcp(&verified).unwrap().email, sa);
        google.rotate();
        let rotated = google.mint(&claims);
        assert_eq!(
            issuers.verify(&iss, &rotated, &expect, at(5)).await,
            Err(JwtRefusal::UnknownKey),
            "within the pause, an unknown kid fetches nothing"
        );
        let fetched = google.fetches().1;
        let later = REFRESH_AFTER_UNKNOWN_KID.as_secs() + 10;
        assert!(issuers.verify(&iss, &rotated, &expect, at(later)).await.is_ok(), "the rotated-in key is fetched");
        assert_eq!(google.fetches().1, fetched + 1);
        let unknown = google.forge(&claims, Forgery::UnknownKid);
        assert_eq!(issuers.verify(&iss, &unknown, &expect, at(later * 3)).await, Err(JwtRefusal::UnknownKey));
        for forgery in [Forgery::AlgNone, Forgery::Hs256WithPublicKey] {
            let forged = google.forge(&claims, forgery);
            assert_eq!(issuers.verify(&iss, &forged, &expect, at(later * 3)).await, Err(JwtRefusal::Algorithm));
        }
        let other = Expect { audience: "airlock:sha256:00/v1/join#other", max_age: None };
        assert_eq!(issuers.verify(&iss, &rotated, &other, at(later)).await, Err(JwtRefusal::Audience));
    }

    #[test]
    fn the_unverified_issuer_and_audiences_are_read_boundedly() {
        let read = unverified_issuer_and_audiences;
        let payload = BASE64URL_NOPAD.encode(br#"{"iss":"https://k"}"#);
        assert_eq!(read(&format!("h.{payload}.s")).unwrap(), ("https://k".to_owned(), vec![]));
        let one = BASE64URL_NOPAD.encode(br#"{"iss":"https://k","aud":"a"}"#);
        assert_eq!(read(&format!("h.{one}.s")).unwrap().1, ["a"]);
        let two = BASE64URL_NOPAD.encode(br#"{"iss":"https://k","aud":["a","b",3]}"#);
        assert_eq!(read(&format!("h.{two}.s")).unwrap().1, ["a", "b"]);
        assert!(read("h.p").is_err());
        assert!(read(&format!("h.{payload}.s.x")).is_err());
        assert!(read(&"a".repeat(MAX_TOKEN_BYTES + 1)).is_err());
        assert!(read(&format!("h.{}.s", BASE64URL_NOPAD.encode(b"{}"))).is_err());
    }
}
