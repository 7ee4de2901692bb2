//! A platform token issuer of our own, for the GCP and Kubernetes joins: an HTTPS server on a
//! loopback port that serves OpenID discovery and a JWKS the way Google's accounts service and
//! a Kubernetes API server do, and signs tokens RS256 with keys it makes.
//!
//! - [`JwtIssuer::start`] with a [`Flavor`]: Google (`/oauth2/v3/certs`, 40-hex kids) or
//!   Kubernetes (`/openid/v1/jwks` served as `application/jwk-set+json`, kids derived from the key).
//! - [`JwtIssuer::mint`] signs any claims with the current key; [`JwtIssuer::rotate`] makes a
//!   new key, serves it beside the old ones and signs with it from then on.
//! - [`JwtIssuer::forge`] makes the tokens a verifier must refuse: `alg: none`, HS256 keyed with
//!   the public key, a `kid` the JWKS does not hold. Wrong `iss`/`aud`, expired and future `iat`
//!   are only claims: pass them to `mint` ([`google_claims`], [`k8s_claims`] make the real shapes).
//! - Kubernetes flavor: the API server's TokenRequest endpoint too,
//!   `POST /api/v1/namespaces/NS/serviceaccounts/NAME/token` speaking `authentication.k8s.io/v1`
//!   JSON in and out: bearer authentication with a token of this issuer for the API audience
//!   ([`K8S_API_AUDIENCE`]), a service account may ask only for its own tokens (as RBAC usually
//!   grants), `expirationSeconds` at least 600, and errors as `Status` objects. It mints tokens
//!   with the requested audiences; [`JwtIssuer::refuse_token_requests`] makes it answer 403 as an
//!   API server whose RBAC does not grant `create` on `serviceaccounts/token`.
//! - [`JwtIssuer::gcp_metadata`]: a GCE metadata server emulator (plain HTTP, as the real one
//!   is) answering `GET /computeMetadata/v1/instance/service-accounts/default/identity` with a
//!   Google-shaped ID token signed by this issuer, and refusing requests without
//!   `Metadata-Flavor: Google`.
//!
//! The certificate comes from a test CA made here; give [`JwtIssuer::ca_file`] to the server
//! (`--issuer-ca-file`) with `--allow-private-issuers`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use data_encoding::{BASE64URL_NOPAD, HEXLOWER};
use http_body_util::BodyExt;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rsa::pkcs1::EncodeRsaPrivateKey;
use rsa::pkcs8::EncodePublicKey;
use rsa::traits::PublicKeyParts;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};

/// Whose issuer the server imitates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    Google,
    Kubernetes,
}

impl Flavor {
    fn jwks_path(self) -> &'static str {
        match self {
            Flavor::Google => "/oauth2/v3/certs",
            Flavor::Kubernetes => "/openid/v1/jwks",
        }
    }
}

/// A token a verifier must refuse although it looks like the issuer's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forgery {
    /// `alg: none`, no signature.
    AlgNone,
    /// HS256 with the current public key (SPKI PEM) as the HMAC secret: the classic confusion.
    Hs256WithPublicKey,
    /// RS256 by a key the JWKS does not serve, under a `kid` it does not hold.
    UnknownKid,
}

struct SigningKey {
    kid: String,
    /// PKCS#1 DER of the private key.
    private_der: Vec<u8>,
    public_pem: String,
    n: String,
    e: String,
}

impl SigningKey {
    fn generate(flavor: Flavor) -> Self {
        let mut rng = RingRng(ring::rand::SystemRandom::new());
        let key = rsa::RsaPrivateKey::new(&mut rng, 2048).expect("an RSA key");
        let public = key.to_public_key();
        let spki = public.to_public_key_der().expect("SPKI DER");
        let digest = ring::digest::digest(&ring::digest::SHA256, spki.as_bytes());
        let kid = match flavor {
            // Google's kids are 40 hex digits; a Kubernetes API server's are the key's hash, base64url.
            Flavor::Google => HEXLOWER.encode(&digest.as_ref()[..20]),
            Flavor::Kubernetes => BASE64URL_NOPAD.encode(digest.as_ref()),
        };
        Self {
            kid,
            private_der: key.to_pkcs1_der().expect("PKCS#1 DER").as_bytes().to_vec(),
            public_pem: public.to_public_key_pem(rsa::pkcs8::LineEnding::LF).expect("SPKI PEM"),
            n: BASE64URL_NOPAD.encode(&public.n().to_bytes_be()),
            e: BASE64URL_NOPAD.encode(&public.e().to_bytes_be()),
        }
    }

    fn jwk(&self) -> Value {
        json!({ "kty": "RSA", "use": "sig", "alg": "RS256", "kid": self.kid, "n": self.n, "e": self.e })
    }

    fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &EncodingKey::from_rsa_der(&self.private_der)).expect("RS256 signs")
    }
}

/// `rsa` asks for a `rand_core` RNG; ring's system RNG is the one the workspace already trusts.
struct RingRng(ring::rand::SystemRandom);

impl rsa::rand_core::RngCore for RingRng {
    fn next_u32(&mut self) -> u32 {
        rsa::rand_core::impls::next_u32_via_fill(self)
    }
    fn next_u64(&mut self) -> u64 {
        rsa::rand_core::impls::next_u64_via_fill(self)
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        ring::rand::SecureRandom::fill(&self.0, dest).expect("system randomness");
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rsa::rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

impl rsa::rand_core::CryptoRng for RingRng {}

struct Shared {
    flavor: Flavor,
    issuer: String,
    /// Served in the JWKS; the last one signs.
    keys: Mutex<Vec<SigningKey>>,
    discovery_fetches: AtomicUsize,
    jwks_fetches: AtomicUsize,
    /// TokenRequests answered with a token.
    tokens_granted: AtomicUsize,
    /// Answer TokenRequests 403, as without the RBAC grant.
    refuse_token_requests: AtomicBool,
}

impl Shared {
    fn mint(&self, claims: &Value) -> String {
        let keys = self.keys.lock().unwrap();
        keys.last().expect("a key").sign(claims)
    }
}

/// The running issuer; stops when dropped.
pub struct JwtIssuer {
    shared: Arc<Shared>,
    _dir: tempfile::TempDir,
    ca_file: PathBuf,
    ca_pem: String,
    _server: Background,
}

impl JwtIssuer {
    /// Starts the issuer at `https://127.0.0.1:PORT`, with one key.
    pub fn start(flavor: Flavor) -> Self {
        let (ca_pem, _ca_der, leaf_pem, leaf_key_pem) = crate::oidc::loopback_certificates();
        let dir = tempfile::tempdir().unwrap();
        let ca_file = dir.path().join("issuer-ca.pem");
        std::fs::write(&ca_file, &ca_pem).unwrap();
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(leaf_pem.as_bytes()).collect::<Result<_, _>>().unwrap();
        let key = PrivateKeyDer::from_pem_slice(leaf_key_pem.as_bytes()).unwrap();
        let tls = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared {
            flavor,
            issuer: format!("https://127.0.0.1:{port}"),
            keys: Mutex::new(vec![SigningKey::generate(flavor)]),
            discovery_fetches: AtomicUsize::new(0),
            jwks_fetches: AtomicUsize::new(0),
            tokens_granted: AtomicUsize::new(0),
            refuse_token_requests: AtomicBool::new(false),
        });
        let serving = shared.clone();
        let server = Background::serve(listener, Some(tokio_rustls::TlsAcceptor::from(Arc::new(tls))), move |req| {
            issuer_answer(&serving, &req)
        });
        Self { shared, _dir: dir, ca_file, ca_pem, _server: server }
    }

    /// `https://127.0.0.1:PORT`: the `iss` of its tokens, and where discovery is served.
    pub fn issuer(&self) -> &str {
        &self.shared.issuer
    }

    /// The CA its certificate chains to, as a PEM file (`--issuer-ca-file`).
    pub fn ca_file(&self) -> PathBuf {
        self.ca_file.clone()
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The `kid` tokens are signed under now.
    pub fn current_kid(&self) -> String {
        self.shared.keys.lock().unwrap().last().expect("a key").kid.clone()
    }

    /// Makes a new key, serves it beside the old ones and signs with it from now on; its `kid`.
    pub fn rotate(&self) -> String {
        let key = SigningKey::generate(self.shared.flavor);
        let kid = key.kid.clone();
        self.shared.keys.lock().unwrap().push(key);
        kid
    }

    /// Signs `claims` RS256 with the current key.
    pub fn mint(&self, claims: &Value) -> String {
        self.shared.mint(claims)
    }

    /// A token carrying `claims` that a verifier must refuse (see [`Forgery`]).
    pub fn forge(&self, claims: &Value, how: Forgery) -> String {
        match how {
            Forgery::AlgNone => {
                let header = json!({ "alg": "none", "typ": "JWT", "kid": self.current_kid() });
                format!(
                    "{}.{}.",
                    BASE64URL_NOPAD.encode(header.to_string().as_bytes()),
                    BASE64URL_NOPAD.encode(claims.to_string().as_bytes())
                )
            }
            Forgery::Hs256WithPublicKey => {
                let keys = self.shared.keys.lock().unwrap();
                let current = keys.last().expect("a key");
                let mut header = Header::new(Algorithm::HS256);
                header.kid = Some(current.kid.clone());
                jsonwebtoken::encode(&header, claims, &EncodingKey::from_secret(current.public_pem.as_bytes())).unwrap()
            }
            Forgery::UnknownKid => SigningKey::generate(self.shared.flavor).sign(claims),
        }
    }

    /// How many times discovery and the JWKS were fetched.
    pub fn fetches(&self) -> (usize, usize) {
        (self.shared.discovery_fetches.load(Ordering::SeqCst), self.shared.jwks_fetches.load(Ordering::SeqCst))
    }

    /// TokenRequests answered with a token so far.
    pub fn tokens_granted(&self) -> usize {
        self.shared.tokens_granted.load(Ordering::SeqCst)
    }

    /// From now on, answer TokenRequests `403 Forbidden` (or grant them again with `false`).
    pub fn refuse_token_requests(&self, refuse: bool) {
        self.shared.refuse_token_requests.store(refuse, Ordering::SeqCst);
    }

    /// A GCE metadata server whose default service account is `email` in `project`, signing
    /// its identity tokens with this issuer's current key.
    pub fn gcp_metadata(&self, email: &str, project: &str) -> GcpMetadata {
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let url = format!("http://127.0.0.1:{}", listener.local_addr().unwrap().port());
        let instance = Arc::new(Instance {
            issuer: self.shared.clone(),
            email: email.to_owned(),
            project: project.to_owned(),
            refusals: AtomicUsize::new(0),
        });
        let serving = instance.clone();
        let server = Background::serve(listener, None, move |req| metadata_answer(&serving, &req));
        GcpMetadata { url, instance, _server: server }
    }
}

/// Seconds since the epoch, as tokens count time.
pub fn unix_now() -> i64 {
    i64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()).unwrap()
}

/// The claims of a GCE instance's ID token (`format=full`), issued at `iat` for an hour.
pub fn google_claims(issuer: &str, audience: &str, email: &str, project: &str, iat: i64) -> Value {
    json!({
        "aud": audience,
        "azp": "117380906433436113419",
        "email": email,
        "email_verified": true,
        "exp": iat + 3600,
        "iat": iat,
        "iss": issuer,
        "sub": "117380906433436113419",
        "google": { "compute_engine": {
            "instance_creation_timestamp": 1_700_000_000,
            "instance_id": "4395826913564812345",
            "instance_name": "airlock-appliance-1",
            "project_id": project,
            "project_number": 123_456_789_012_i64,
            "zone": "europe-west1-b",
        }},
    })
}

/// The audience of the tokens a Kubernetes API server accepts as credentials (its
/// `--api-audiences`, as kubeadm sets it): the service account's own mounted token carries it.
pub const K8S_API_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";

/// The claims of a projected service-account token (Kubernetes 1.30: with `jti` and the node),
/// issued at `iat` for an hour.
pub fn k8s_claims(issuer: &str, audience: &str, namespace: &str, service_account: &str, iat: i64) -> Value {
    let mut jti = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut jti).unwrap();
    json!({
        "aud": [audience],
        "exp": iat + 3600,
        "iat": iat,
        "nbf": iat,
        "iss": issuer,
        "jti": HEXLOWER.encode(&jti),
        "kubernetes.io": {
            "namespace": namespace,
            "node": { "name": "node-1", "uid": "6c1a4b1e-7c55-4d8e-9d0e-1f6b1d1c2a3b" },
            "pod": { "name": "airlock-appliance-0", "uid": "0b8f2c6e-2e3f-4c4a-8e5c-5f4b1d2a3c4d" },
            "serviceaccount": { "name": service_account, "uid": "9a7d3f2b-1c4e-4b5a-8d6f-3e2c1b0a9f8e" },
        },
        "sub": format!("system:serviceaccount:{namespace}:{service_account}"),
    })
}

fn issuer_answer(shared: &Shared, req: &Request<Bytes>) -> Response<Full<Bytes>> {
    let json_response = |content_type: &str, body: Value| {
        Response::builder()
            .status(StatusCode::OK)
            .header("content-type", content_type)
            .header("cache-control", "public, max-age=3600")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap()
    };
    let iss = &shared.issuer;
    match (req.method().as_str(), req.uri().path()) {
        ("GET", "/.well-known/openid-configuration") => {
            shared.discovery_fetches.fetch_add(1, Ordering::SeqCst);
            let jwks_uri = format!("{iss}{}", shared.flavor.jwks_path());
            let body = match shared.flavor {
                Flavor::Google => json!({
                    "issuer": iss,
                    "authorization_endpoint": format!("{iss}/o/oauth2/v2/auth"),
                    "token_endpoint": format!("{iss}/token"),
                    "userinfo_endpoint": format!("{iss}/v1/userinfo"),
                    "revocation_endpoint": format!("{iss}/revoke"),
                    "jwks_uri": jwks_uri,
                    "response_types_supported": ["code", "token", "id_token", "code token", "code id_token", "token id_token", "code token id_token", "none"],
                    "subject_types_supported": ["public"],
                    "id_token_signing_alg_values_supported": ["RS256"],
                    "scopes_supported": ["openid", "email", "profile"],
                    "token_endpoint_auth_methods_supported": ["client_secret_post", "client_secret_basic"],
                    "claims_supported": ["aud", "email", "email_verified", "exp", "family_name", "given_name", "iat", "iss", "name", "picture", "sub"],
                    "code_challenge_methods_supported": ["plain", "S256"],
                    "grant_types_supported": ["authorization_code", "refresh_token", "urn:ietf:params:oauth:grant-type:device_code", "urn:ietf:params:oauth:grant-type:jwt-bearer"],
                }),
                Flavor::Kubernetes => json!({
                    "issuer": iss,
                    "jwks_uri": jwks_uri,
                    "response_types_supported": ["id_token"],
                    "subject_types_supported": ["public"],
                    "id_token_signing_alg_values_supported": ["RS256"],
                }),
            };
            json_response("application/json", body)
        }
        ("GET", path) if path == shared.flavor.jwks_path() => {
            shared.jwks_fetches.fetch_add(1, Ordering::SeqCst);
            let keys: Vec<Value> = shared.keys.lock().unwrap().iter().map(SigningKey::jwk).collect();
            let content_type = match shared.flavor {
                Flavor::Google => "application/json; charset=UTF-8",
                Flavor::Kubernetes => "application/jwk-set+json",
            };
            json_response(content_type, json!({ "keys": keys }))
        }
        ("POST", path) if shared.flavor == Flavor::Kubernetes && token_request_path(path).is_some() => {
            let (namespace, name) = token_request_path(path).unwrap_or_default();
            token_request(shared, req, &namespace, &name)
        }
        _ => Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(Full::new(Bytes::from("404 page not found")))
            .unwrap(),
    }
}

/// `/api/v1/namespaces/NS/serviceaccounts/NAME/token`: its namespace and name.
fn token_request_path(path: &str) -> Option<(String, String)> {
    let rest = path.strip_prefix("/api/v1/namespaces/")?;
    let (namespace, rest) = rest.split_once('/')?;
    let name = rest.strip_prefix("serviceaccounts/")?.strip_suffix("/token")?;
    (!namespace.is_empty() && !name.is_empty() && !name.contains('/')).then(|| (namespace.to_owned(), name.to_owned()))
}

/// A `Status` failure, as the API server answers one.
fn k8s_status(code: StatusCode, reason: &str, message: &str) -> Response<Full<Bytes>> {
    let body = json!({ "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16() });
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

/// The claims of `token` if this issuer signed it, it is unexpired and for the API audience.
fn api_credential(shared: &Shared, token: &str) -> Option<serde_json::Map<String, Value>> {
    let keys = shared.keys.lock().unwrap();
    let kid = jsonwebtoken::decode_header(token).ok()?.kid?;
    let key = keys.iter().find(|k| k.kid == kid)?;
    let decoding = jsonwebtoken::DecodingKey::from_rsa_components(&key.n, &key.e).ok()?;
    let mut validation = jsonwebtoken::Validation::new(Algorithm::RS256);
    validation.set_audience(&[K8S_API_AUDIENCE]);
    validation.set_issuer(&[&shared.issuer]);
    jsonwebtoken::decode::<serde_json::Map<String, Value>>(token, &decoding, &validation).ok().map(|d| d.claims)
}

/// `TokenRequest` (authentication.k8s.io/v1) for `namespace/name`.
fn token_request(shared: &Shared, req: &Request<Bytes>, namespace: &str, name: &str) -> Response<Full<Bytes>> {
    let bearer = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    let Some(caller) = api_credential(shared, bearer) else {
        return k8s_status(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
    };
    let user = caller.get("sub").and_then(Value::as_str).unwrap_or_default().to_owned();
    // RBAC as an appliance's Role grants it: `create` on its own `serviceaccounts/token` only.
    let own = user == format!("system:serviceaccount:{namespace}:{name}");
    if !own || shared.refuse_token_requests.load(Ordering::SeqCst) {
        return k8s_status(
            StatusCode::FORBIDDEN,
            "Forbidden",
            &format!(
                "serviceaccounts \"{name}\" is forbidden: User \"{user}\" cannot create resource \"serviceaccounts/token\" in API group \"\" in the namespace \"{namespace}\""
            ),
        );
    }
    let Ok(body) = serde_json::from_slice::<Value>(req.body()) else {
        return k8s_status(StatusCode::BAD_REQUEST, "BadRequest", "the body is not JSON");
    };
    if body["apiVersion"] != "authentication.k8s.io/v1" || body["kind"] != "TokenRequest" {
        return k8s_status(StatusCode::BAD_REQUEST, "BadRequest", "not an authentication.k8s.io/v1 TokenRequest");
    }
    let audiences: Vec<String> = match body["spec"]["audiences"].as_array() {
        Some(a) if !a.is_empty() => a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect(),
        _ => vec![K8S_API_AUDIENCE.to_owned()],
    };
    let seconds = body["spec"]["expirationSeconds"].as_i64().unwrap_or(3600);
    if seconds < 600 {
        return k8s_status(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            &format!(
                "TokenRequest.authentication.k8s.io \"{name}\" is invalid: spec.expirationSeconds: Invalid value: {seconds}: may not specify a duration less than 10 minutes"
            ),
        );
    }
    let now = unix_now();
    let mut claims = k8s_claims(&shared.issuer, "", namespace, name, now);
    claims["aud"] = json!(audiences);
    claims["exp"] = json!(now + seconds);
    // A requested token without a bound object has no pod.
    claims["kubernetes.io"].as_object_mut().unwrap().remove("pod");
    let token = shared.mint(&claims);
    shared.tokens_granted.fetch_add(1, Ordering::SeqCst);
    let answer = json!({
        "kind": "TokenRequest",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": { "name": name, "namespace": namespace, "creationTimestamp": null },
        "spec": { "audiences": audiences, "expirationSeconds": seconds, "boundObjectRef": null },
        "status": {
            "token": token,
            "expirationTimestamp": airlock_core::Timestamp::from_unix_millis((now + seconds) * 1000).rfc3339(),
        },
    });
    Response::builder()
        .status(StatusCode::CREATED)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(answer.to_string())))
        .unwrap()
}

struct Instance {
    issuer: Arc<Shared>,
    email: String,
    project: String,
    refusals: AtomicUsize,
}

/// A GCE metadata server emulator; stops when dropped.
pub struct GcpMetadata {
    /// `http://127.0.0.1:PORT`, for the appliance's `--gcp-metadata-url`.
    pub url: String,
    instance: Arc<Instance>,
    _server: Background,
}

impl GcpMetadata {
    /// Requests refused for want of the `Metadata-Flavor: Google` header.
    pub fn refused_without_flavor(&self) -> usize {
        self.instance.refusals.load(Ordering::SeqCst)
    }
}

fn metadata_answer(instance: &Instance, req: &Request<Bytes>) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String| {
        Response::builder()
            .status(status)
            .header("metadata-flavor", "Google")
            .header("content-type", "application/text")
            .body(Full::new(Bytes::from(body)))
            .unwrap()
    };
    // The real server refuses requests without the header, so that a page a browser or a
    // proxied request reaches cannot read the instance's credentials.
    if req.headers().get("metadata-flavor").and_then(|v| v.to_str().ok()) != Some("Google") {
        instance.refusals.fetch_add(1, Ordering::SeqCst);
        return Response::builder()
            .status(StatusCode::FORBIDDEN)
            .header("content-type", "text/html; charset=UTF-8")
            .body(Full::new(Bytes::from(
                "Your client does not have permission to get URL from this server. Missing Metadata-Flavor:Google header.",
            )))
            .unwrap();
    }
    if req.method() != hyper::Method::GET
        || req.uri().path() != "/computeMetadata/v1/instance/service-accounts/default/identity"
    {
        return text(StatusCode::NOT_FOUND, "Not Found".into());
    }
    let query: HashMap<String, String> = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), percent_decode(v)))
        .collect();
    let Some(audience) = query.get("audience").filter(|a| !a.is_empty()) else {
        return text(StatusCode::BAD_REQUEST, "non-empty audience parameter required".into());
    };
    let iss = instance.issuer.issuer.clone();
    let mut claims = google_claims(&iss, audience, &instance.email, &instance.project, unix_now());
    // Without format=full the token has no `google` claim, as the real server answers.
    if query.get("format").map(String::as_str) != Some("full") {
        claims.as_object_mut().unwrap().remove("google");
    }
    text(StatusCode::OK, instance.issuer.mint(&claims))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A hyper server on its own thread and runtime, stopped when dropped.
struct Background {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Background {
    fn serve<F>(listener: std::net::TcpListener, tls: Option<tokio_rustls::TlsAcceptor>, answer: F) -> Self
    where
        F: Fn(Request<Bytes>) -> Response<Full<Bytes>> + Send + Sync + 'static,
    {
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        listener.set_nonblocking(true).unwrap();
        let answer = Arc::new(answer);
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    let (tcp, _) = tokio::select! {
                        _ = &mut stopped => return,
                        accepted = listener.accept() => match accepted { Ok(a) => a, Err(_) => continue },
                    };
                    let answer = answer.clone();
                    let tls = tls.clone();
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let answer = answer.clone();
                            async move {
                                // Bodies are small here (a TokenRequest); read whole, then answered.
                                let (parts, body) = req.into_parts();
                                let bytes = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                                Ok::<_, Infallible>((*answer)(Request::from_parts(parts, bytes)))
                            }
                        });
                        let http = hyper::server::conn::http1::Builder::new();
                        match tls {
                            Some(acceptor) => {
                                if let Ok(stream) = acceptor.accept(tcp).await {
                                    let _ = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service).await;
                                }
                            }
                            None => {
                                let _ = http.serve_connection(hyper_util::rt::TokioIo::new(tcp), service).await;
                            }
                        }
                    });
                }
            });
        });
        Self { stop: Some(stop), thread: Some(thread) }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding_reads_audiences() {
        assert_eq!(percent_decode("airlock%3Asha256%3Aab%2Fv1%2Fjoin%23c"), "airlock:sha256:ab/v1/join#c");
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}
