//! Token issuers the control plane trusts: OpenID discovery, their signing keys (JWKS) and the
//! one check of a JWT they signed.
//!
//! Used by every feature that believes a token from elsewhere: people's ID tokens at login, and
//! platform identity tokens at join (GCP, Kubernetes). Issuer URLs come from tenants (their
//! identity provider) and from join rules, so fetching one is an outbound request an outsider
//! chose. [`IssuerClient`] bounds it: HTTPS only, no redirects, 10 s, answers at most 1 MiB, and
//! no private, loopback or link-local address (by the URL's literal or by what its name
//! resolves to) unless the operator allows them (`--allow-private-issuers`, for an issuer on
//! the operator's own network, and for tests).
//!
//! [`Issuers`] keeps each issuer's discovery document and key set (bounded, an hour each) and
//! fetches the key set again when a token names an unknown `kid`, at most once per
//! [`REFRESH_AFTER_UNKNOWN_KID`], so a stream of made-up `kid`s cannot turn into a stream of
//! fetches. [`Issuers::verify`] accepts only asymmetric algorithms (never `none`, never an HMAC
//! keyed by a public key) and checks every time claim against the injected clock.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use airlock_core::Timestamp;
use data_encoding::BASE64URL_NOPAD;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use rustls::pki_types::CertificateDer;
use serde::Deserialize;
use serde::de::DeserializeOwned;

/// Time limit of one request to an issuer.
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// The largest answer read from an issuer.
pub const MAX_ANSWER_BYTES: usize = 1024 * 1024;
/// How long a discovery document or key set is used before it is fetched again.
pub const CACHE_FOR: Duration = Duration::from_secs(3600);
/// The least time between two key-set fetches for one issuer caused by unknown `kid`s.
pub const REFRESH_AFTER_UNKNOWN_KID: Duration = Duration::from_secs(30);
/// How long a failed fetch of an issuer's documents is answered from memory before it is tried again.
pub const RETRY_FAILED_AFTER: Duration = Duration::from_secs(60);
/// Clock skew allowed on `exp`, `nbf` and `iat`.
pub const LEEWAY: Duration = Duration::from_secs(60);
/// The most issuers whose keys are kept at once; past it the least recently fetched is dropped.
const MAX_ISSUERS: usize = 256;
/// The largest token looked at.
const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Signature algorithms accepted: asymmetric ones only.
const ALGORITHMS: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// The certificates in a PEM file given as extra trust roots for issuers (`--issuer-ca-file`).
pub fn read_ca_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not a PEM file of certificates: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate in the issuer CA file".into());
    }
    Ok(certs)
}

/// Why an issuer URL was not fetched, or its answer not used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IssuerError {
    /// The URL is one this control plane does not fetch (scheme, private address, malformed).
    #[error("issuer URL refused: {0}")]
    NotAllowed(String),
    #[error("issuer unreachable: {0}")]
    Unreachable(String),
    #[error("issuer gave an unusable answer: {0}")]
    BadAnswer(String),
}

/// The bounded HTTP client every request to an issuer goes through.
#[derive(Clone, Debug)]
pub struct IssuerClient {
    http: reqwest::Client,
    allow_private: bool,
}

impl IssuerClient {
    /// A client trusting the system's roots plus `extra_roots` (an issuer with a private CA).
    pub fn new(extra_roots: Vec<CertificateDer<'static>>, allow_private: bool) -> Result<Self, String> {
        let tls = outbound_tls(extra_roots)?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(TIMEOUT)
            .connect_timeout(TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            // A proxy from the environment would resolve issuer names itself, past the resolver below.
            .no_proxy()
            .dns_resolver(Arc::new(PublicOnlyResolver { allow_private }))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self { http, allow_private })
    }

    /// Whether `url` may be fetched at all: HTTPS, a host, and no private address literal.
    /// (A name is checked once resolved, by the client's resolver.)
    pub fn check_url(&self, url: &str) -> Result<reqwest::Url, IssuerError> {
        let parsed = reqwest::Url::parse(url).map_err(|_| IssuerError::NotAllowed("not a URL".into()))?;
        if parsed.scheme() != "https" {
            return Err(IssuerError::NotAllowed("only https URLs are fetched".into()));
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(IssuerError::NotAllowed("a URL with credentials".into()));
        }
        let literal = match parsed.host() {
            Some(url::Host::Ipv4(ip)) => Some(IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => Some(IpAddr::V6(ip)),
            Some(url::Host::Domain(name)) => name.parse::<IpAddr>().ok(),
            None => return Err(IssuerError::NotAllowed("a URL with no host".into())),
        };
        if let Some(ip) = literal
            && !self.allow_private
            && !is_public(ip)
        {
            return Err(IssuerError::NotAllowed(
                "a private, loopback or link-local address (the operator may allow them with --allow-private-issuers)"
                    .into(),
            ));
        }
        Ok(parsed)
    }

    /// GETs `url` and reads its JSON answer.
    pub async fn get_json<T: DeserializeOwned>(&self, url: &str) -> Result<T, IssuerError> {
        let url = self.check_url(url)?;
        let response = self.http.get(url).header("accept", "application/json").send().await;
        read_json(response).await
    }

    /// POSTs a form to `url` (a token endpoint), with HTTP basic authentication if given, and
    /// reads its JSON answer. An error answer's body is read too (an OAuth error is JSON).
    pub async fn post_form<T: DeserializeOwned>(
        &self,
        url: &str,
        form: &[(&str, &str)],
        basic_auth: Option<(&str, &str)>,
    ) -> Result<T, IssuerError> {
        let url = self.check_url(url)?;
        let mut request = self.http.post(url).header("accept", "application/json").form(form);
        if let Some((user, password)) = basic_auth {
            // RFC 6749 §2.3.1: the client id and secret are form-encoded before basic authentication.
            let encode = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
            request = request.basic_auth(encode(user), Some(encode(password)));
        }
        read_json(request.send().await).await
    }
}

/// The TLS client configuration of the control plane's outbound calls to public services
/// (issuers, AWS STS): the system's roots plus `extra_roots`, ring, safe defaults.
pub(crate) fn outbound_tls(extra_roots: Vec<CertificateDer<'static>>) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    for cert in extra_roots {
        roots.add(cert).map_err(|e| format!("an extra CA certificate is not usable: {e}"))?;
    }
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

async fn read_json<T: DeserializeOwned>(response: reqwest::Result<reqwest::Response>) -> Result<T, IssuerError> {
    let mut response = response.map_err(|e| IssuerError::Unreachable(describe(&e)))?;
    let status = response.status();
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| IssuerError::Unreachable(describe(&e)))? {
        if body.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Err(IssuerError::BadAnswer(format!("the answer is larger than {MAX_ANSWER_BYTES} bytes")));
        }
        body.extend_from_slice(&chunk);
    }
    if !status.is_success() {
        return Err(IssuerError::BadAnswer(format!("HTTP {}", status.as_u16())));
    }
    serde_json::from_slice(&body).map_err(|e| IssuerError::BadAnswer(format!("not the JSON expected: {e}")))
}

/// A reqwest error, said without the URL's query (a token endpoint's code would be there).
fn describe(e: &reqwest::Error) -> String {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else if e.is_redirect() {
        "redirects are not followed"
    } else {
        "request failed"
    };
    match e.url().and_then(|u| u.host_str()) {
        Some(host) => format!("{what} ({host})"),
        None => what.to_owned(),
    }
}

/// Resolves names, then drops every address that is not public unless allowed: a name that
/// resolves only to private addresses is refused, so a tenant's issuer URL cannot reach the
/// control plane's own network.
#[derive(Debug)]
struct PublicOnlyResolver {
    allow_private: bool,
}

impl reqwest::dns::Resolve for PublicOnlyResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow_private = self.allow_private;
        Box::pin(async move {
            let found: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), 0)).await?.collect();
            let kept: Vec<SocketAddr> = found.into_iter().filter(|a| allow_private || is_public(a.ip())).collect();
            if kept.is_empty() {
                return Err("the issuer's name resolves to no public address".into());
            }
            Ok(Box::new(kept.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Whether `ip` is a public unicast address (not loopback, private, link-local, shared, documentation, …).
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xc0) == 64) // 100.64.0.0/10, carrier-grade NAT
                || (o[0] == 192 && o[1] == 0 && o[2] == 0) // 192.0.0.0/24, protocol assignments
                || (o[0] == 198 && (o[1] & 0xfe) == 18) // 198.18.0.0/15, benchmarking
                || o[0] >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let s = v6.segments();
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link-local
                || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
                || (s[0] == 0x64 && s[1] == 0xff9b)) // NAT64, which reaches IPv4 behind it
        }
    }
}

/// An issuer's OpenID discovery document: the fields Airlock uses.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Discovery {
    pub issuer: String,
    pub jwks_uri: String,
    #[serde(default)]
    pub authorization_endpoint: Option<String>,
    #[serde(default)]
    pub token_endpoint: Option<String>,
    #[serde(default)]
    pub end_session_endpoint: Option<String>,
}

/// What a token must be for.
#[derive(Clone, Copy, Debug)]
pub struct Expect<'a> {
    /// One of the token's `aud` values must be exactly this.
    pub audience: &'a str,
    /// If set, `iat` must be no older than this.
    pub max_age: Option<Duration>,
}

/// A verified token's claims.
#[derive(Clone, Debug, PartialEq)]
pub struct Claims(pub serde_json::Map<String, serde_json::Value>);

impl Claims {
    pub fn str(&self, name: &str) -> Option<&str> {
        self.0.get(name).and_then(serde_json::Value::as_str)
    }

    pub fn int(&self, name: &str) -> Option<i64> {
        self.0.get(name).and_then(serde_json::Value::as_i64)
    }

    /// A claim that is a string or an array of strings (`aud`, `amr`, groups), as a list.
    pub fn strings(&self, name: &str) -> Vec<String> {
        match self.0.get(name) {
            Some(serde_json::Value::String(s)) => vec![s.clone()],
            Some(serde_json::Value::Array(items)) => {
                items.iter().filter_map(serde_json::Value::as_str).map(str::to_owned).collect()
            }
            _ => Vec::new(),
        }
    }
}

/// Why a token was not believed: a code for programs and the audit, a reason for people.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JwtRefusal {
    Malformed,
    /// `none`, an HMAC or an algorithm the key is not for.
    Algorithm,
    UnknownKey,
    Signature,
    Issuer,
    Audience,
    Expired,
    NotYetValid,
    /// Issued longer ago than the caller accepts.
    TooOld,
    IssuerUnreachable,
}

impl JwtRefusal {
    pub fn code(&self) -> &'static str {
        match self {
            JwtRefusal::Malformed => "token_malformed",
            JwtRefusal::Algorithm => "token_algorithm",
            JwtRefusal::UnknownKey => "token_unknown_key",
            JwtRefusal::Signature => "token_signature",
            JwtRefusal::Issuer => "token_issuer",
            JwtRefusal::Audience => "token_audience",
            JwtRefusal::Expired => "token_expired",
            JwtRefusal::NotYetValid => "token_not_yet_valid",
            JwtRefusal::TooOld => "token_too_old",
            JwtRefusal::IssuerUnreachable => "issuer_unreachable",
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            JwtRefusal::Malformed => "the token is not a well-formed signed JWT",
            JwtRefusal::Algorithm => "the token's algorithm is not accepted (asymmetric signatures only)",
            JwtRefusal::UnknownKey => "the token names a key its issuer does not publish",
            JwtRefusal::Signature => "the token's signature does not verify",
            JwtRefusal::Issuer => "the token is from another issuer",
            JwtRefusal::Audience => "the token is for another audience",
            JwtRefusal::Expired => "the token has expired",
            JwtRefusal::NotYetValid => "the token is not valid yet",
            JwtRefusal::TooOld => "the token was issued too long ago",
            JwtRefusal::IssuerUnreachable => "the token's issuer or its keys cannot be fetched",
        }
    }
}

/// One issuer's cached documents.
#[derive(Debug)]
struct Cached {
    discovery: Discovery,
    keys: Arc<JwkSet>,
    fetched_at: Timestamp,
    /// When an unknown `kid` last caused a fetch.
    refreshed_for_kid_at: Option<Timestamp>,
}

/// The issuers' discovery documents and key sets, fetched on demand and cached.
#[derive(Debug)]
pub struct Issuers {
    client: IssuerClient,
    cache: Mutex<HashMap<String, Cached>>,
    /// One fetch per issuer at a time: concurrent logins wait for it instead of each fetching. Per issuer, so a
    /// slow or stalling issuer (a tenant's choice) holds up no other.
    fetching: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Issuers whose last fetch failed, and when: asked again within [`RETRY_FAILED_AFTER`], the error is
    /// answered at once, so a stalling issuer costs one 10 s fetch a minute, not one per anonymous login.
    failed: Mutex<HashMap<String, (Timestamp, IssuerError)>>,
}

impl Issuers {
    pub fn new(client: IssuerClient) -> Self {
        Self { client, cache: Mutex::default(), fetching: Mutex::default(), failed: Mutex::default() }
    }

    pub fn client(&self) -> &IssuerClient {
        &self.client
    }

    /// `issuer`'s discovery document, whose `issuer` must be exactly `issuer`.
    pub async fn discovery(&self, issuer: &str, now: Timestamp) -> Result<Discovery, IssuerError> {
        if let Some(c) = self.fresh(issuer, now) {
            return Ok(c.0);
        }
        Ok(self.fetch(issuer, now, false).await?.0)
    }

    /// Verifies a JWT `issuer` signed: see the module documentation for every check.
    pub async fn verify(
        &self,
        issuer: &str,
        token: &str,
        expect: &Expect<'_>,
        now: Timestamp,
    ) -> Result<Claims, JwtRefusal> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(JwtRefusal::Malformed);
        }
        let (alg, kid) = read_header(token)?;
        let keys = match self.fresh(issuer, now) {
            Some((_, keys)) => keys,
            None => self.fetch(issuer, now, false).await.map_err(|_| JwtRefusal::IssuerUnreachable)?.1,
        };
        let keys = match find_key(&keys, kid.as_deref(), alg) {
            Some(_) => keys,
            None if self.may_refresh_for_kid(issuer, now) => {
                self.fetch(issuer, now, true).await.map_err(|_| JwtRefusal::IssuerUnreachable)?.1
            }
            None => keys,
        };
        let jwk = find_key(&keys, kid.as_deref(), alg).ok_or(JwtRefusal::UnknownKey)?;
        let key = DecodingKey::from_jwk(jwk).map_err(|_| JwtRefusal::UnknownKey)?;
        let claims = check_signed(token, &key, alg)?;
        check_claims(&claims, issuer, expect, now)?;
        Ok(claims)
    }

    fn fresh(&self, issuer: &str, now: Timestamp) -> Option<(Discovery, Arc<JwkSet>)> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let c = cache.get(issuer)?;
        (now < c.fetched_at.saturating_add(CACHE_FOR) && now >= c.fetched_at)
            .then(|| (c.discovery.clone(), c.keys.clone()))
    }

    fn may_refresh_for_kid(&self, issuer: &str, now: Timestamp) -> bool {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let Some(c) = cache.get_mut(issuer) else { return true };
        let last = c.refreshed_for_kid_at.unwrap_or(c.fetched_at);
        let may = now >= last.saturating_add(REFRESH_AFTER_UNKNOWN_KID) || now < last;
        if may {
            c.refreshed_for_kid_at = Some(now);
        }
        may
    }

    async fn fetch(
        &self,
        issuer: &str,
        now: Timestamp,
        for_unknown_kid: bool,
    ) -> Result<(Discovery, Arc<JwkSet>), IssuerError> {
        let lock = {
            let mut locks = self.fetching.lock().unwrap_or_else(|e| e.into_inner());
            if locks.len() >= MAX_ISSUERS {
                // Bounded: a lock no fetch holds or waits on carries nothing.
                locks.retain(|_, l| Arc::strong_count(l) > 1);
            }
            locks.entry(issuer.to_owned()).or_default().clone()
        };
        let _one_at_a_time = lock.lock().await;
        // Another caller may have fetched while this one waited.
        if !for_unknown_kid && let Some(c) = self.fresh(issuer, now) {
            return Ok(c);
        }
        if let Some((at, e)) = self.failed.lock().unwrap_or_else(|e| e.into_inner()).get(issuer)
            && now >= *at
            && now < at.saturating_add(RETRY_FAILED_AFTER)
        {
            return Err(e.clone());
        }
        let fetched = self.fetch_documents(issuer).await;
        let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        let (discovery, keys) = match fetched {
            Ok(found) => {
                failed.remove(issuer);
                found
            }
            Err(e) => {
                if failed.len() >= MAX_ISSUERS {
                    failed.retain(|_, (at, _)| now < at.saturating_add(RETRY_FAILED_AFTER));
                }
                if failed.len() < MAX_ISSUERS {
                    failed.insert(issuer.to_owned(), (now, e.clone()));
                }
                return Err(e);
            }
        };
        drop(failed);
        let keys = Arc::new(keys);
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= MAX_ISSUERS
            && !cache.contains_key(issuer)
            && let Some(oldest) = cache.iter().min_by_key(|(_, c)| c.fetched_at).map(|(k, _)| k.clone())
        {
            cache.remove(&oldest);
        }
        let refreshed_for_kid_at = for_unknown_kid.then_some(now);
        cache.insert(
            issuer.to_owned(),
            Cached { discovery: discovery.clone(), keys: keys.clone(), fetched_at: now, refreshed_for_kid_at },
        );
        Ok((discovery, keys))
    }

    /// The discovery document and key set, fetched.
    async fn fetch_documents(&self, issuer: &str) -> Result<(Discovery, JwkSet), IssuerError> {
        let trimmed = issuer.trim_end_matches('/');
        let discovery: Discovery = self.client.get_json(&format!("{trimmed}/.well-known/openid-configuration")).await?;
        if discovery.issuer != issuer {
            return Err(IssuerError::BadAnswer("the discovery document names another issuer".into()));
        }
        let keys: JwkSet = self.client.get_json(&discovery.jwks_uri).await?;
        Ok((discovery, keys))
    }
}

/// The token's algorithm (one accepted) and key id, read before any key is looked for.
fn read_header(token: &str) -> Result<(Algorithm, Option<String>), JwtRefusal> {
    #[derive(Deserialize)]
    struct Header {
        alg: String,
        #[serde(default)]
        kid: Option<String>,
    }
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(JwtRefusal::Malformed);
    };
    let bytes = BASE64URL_NOPAD.decode(header.as_bytes()).map_err(|_| JwtRefusal::Malformed)?;
    let header: Header = serde_json::from_slice(&bytes).map_err(|_| JwtRefusal::Malformed)?;
    let alg = ALGORITHMS
        .iter()
        .copied()
        .find(|a| {
            serde_json::to_value(a).ok().as_ref().and_then(serde_json::Value::as_str) == Some(header.alg.as_str())
        })
        .ok_or(JwtRefusal::Algorithm)?;
    Ok((alg, header.kid))
}

/// The key `kid` names, fit for `alg`; with no `kid`, the only key fit for `alg`.
fn find_key<'k>(keys: &'k JwkSet, kid: Option<&str>, alg: Algorithm) -> Option<&'k jsonwebtoken::jwk::Jwk> {
    use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, KeyAlgorithm};
    let fits = |jwk: &jsonwebtoken::jwk::Jwk| {
        let family = match (&jwk.algorithm, alg) {
            (AlgorithmParameters::RSA(_), Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512)
            | (AlgorithmParameters::RSA(_), Algorithm::PS256 | Algorithm::PS384 | Algorithm::PS512) => true,
            (AlgorithmParameters::EllipticCurve(ec), Algorithm::ES256) => ec.curve == EllipticCurve::P256,
            (AlgorithmParameters::EllipticCurve(ec), Algorithm::ES384) => ec.curve == EllipticCurve::P384,
            (AlgorithmParameters::OctetKeyPair(okp), Algorithm::EdDSA) => okp.curve == EllipticCurve::Ed25519,
            _ => false,
        };
        // A key that names its algorithm is used for that one only.
        let declared = jwk.common.key_algorithm.is_none_or(|declared| {
            serde_json::to_value(declared).ok() == serde_json::to_value(alg).ok()
                || (declared == KeyAlgorithm::EdDSA && alg == Algorithm::EdDSA)
        });
        let for_signing =
            jwk.common.public_key_use.as_ref().is_none_or(|u| *u == jsonwebtoken::jwk::PublicKeyUse::Signature);
        family && declared && for_signing
    };
    match kid {
        Some(kid) => keys.keys.iter().find(|k| k.common.key_id.as_deref() == Some(kid) && fits(k)),
        None => {
            let mut fitting = keys.keys.iter().filter(|k| fits(k));
            let only = fitting.next()?;
            fitting.next().is_none().then_some(only)
        }
    }
}

/// The signature, with every time and audience check left to [`check_claims`] (on the injected clock).
fn check_signed(token: &str, key: &DecodingKey, alg: Algorithm) -> Result<Claims, JwtRefusal> {
    let mut validation = Validation::new(alg);
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    match jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(token, key, &validation) {
        Ok(data) => Ok(Claims(data.claims)),
        Err(e) => Err(match e.kind() {
            jsonwebtoken::errors::ErrorKind::InvalidSignature => JwtRefusal::Signature,
            jsonwebtoken::errors::ErrorKind::InvalidAlgorithm => JwtRefusal::Algorithm,
            _ => JwtRefusal::Malformed,
        }),
    }
}

/// Issuer, audience and times, with `now` from the caller's clock.
pub fn check_claims(claims: &Claims, issuer: &str, expect: &Expect<'_>, now: Timestamp) -> Result<(), JwtRefusal> {
    if claims.str("iss") != Some(issuer) {
        return Err(JwtRefusal::Issuer);
    }
    if !claims.strings("aud").iter().any(|a| a == expect.audience) {
        return Err(JwtRefusal::Audience);
    }
    let now_s = now.unix_seconds();
    let leeway = LEEWAY.as_secs() as i64;
    let exp = claims.int("exp").ok_or(JwtRefusal::Malformed)?;
    if now_s >= exp.saturating_add(leeway) {
        return Err(JwtRefusal::Expired);
    }
    if let Some(nbf) = claims.int("nbf")
        && now_s.saturating_add(leeway) < nbf
    {
        return Err(JwtRefusal::NotYetValid);
    }
    let iat = claims.int("iat");
    if let Some(iat) = iat
        && now_s.saturating_add(leeway) < iat
    {
        return Err(JwtRefusal::NotYetValid);
    }
    if let Some(max_age) = expect.max_age {
        let iat = iat.ok_or(JwtRefusal::Malformed)?;
        let max_age = i64::try_from(max_age.as_secs()).unwrap_or(i64::MAX);
        if now_s > iat.saturating_add(max_age).saturating_add(leeway) {
            return Err(JwtRefusal::TooOld);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
