//! A provider served here, on loopback HTTPS under a test CA, whose token endpoint answers with exactly the ID token a
//! test asks for: signed with its published key or a forged one, any claims. Discovery and the JWKS are real
//! documents fetched through `crate::issuer`, so the server's checks run as they do against a real provider.
//! It also plays the provider's part a test relies on: codes are single use, PKCE S256 is checked, client auth recorded.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use data_encoding::BASE64URL_NOPAD;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{Value, json};

/// What the token endpoint answers next.
#[derive(Clone, Debug)]
pub(crate) enum Answer {
    /// An ID token with these claims, signed with the published key (`forged`: another key under the same `kid`).
    Token { claims: Value, forged: bool },
    /// An ID token whose header says `alg: none`, unsigned.
    Unsigned { claims: Value },
}

/// One redemption at the token endpoint: its form, and its `Authorization` header.
pub(crate) type Redemption = (Vec<(String, String)>, Option<String>);

#[derive(Default)]
struct Seen {
    /// Codes redeemed already: a second redemption is `invalid_grant`.
    codes: Vec<String>,
    /// Each redemption's form and `Authorization` header.
    requests: Vec<Redemption>,
}

pub(crate) struct Provider {
    pub(crate) issuer: String,
    pub(crate) ca: CertificateDer<'static>,
    key: EcdsaKeyPair,
    forger: EcdsaKeyPair,
    next: Mutex<Option<Answer>>,
    seen: Mutex<Seen>,
}

fn b64(bytes: &[u8]) -> String {
    BASE64URL_NOPAD.encode(bytes)
}

fn key() -> EcdsaKeyPair {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap()
}

impl Provider {
    pub(crate) async fn start() -> Arc<Self> {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::default();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer_ca = rcgen::Issuer::new(ca_params, ca_key);
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let mut leaf_params = rcgen::CertificateParams::default();
        leaf_params.subject_alt_names = vec![rcgen::SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into())];
        let leaf = leaf_params.signed_by(&leaf_key, &issuer_ca).unwrap();
        let tls = rustls::ServerConfig::builder_with_provider(airlock_proto::tls::provider())
            .with_protocol_versions(airlock_proto::tls::PROTOCOL_VERSIONS)
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone(), ca.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
            )
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let issuer = format!("https://127.0.0.1:{}", listener.local_addr().unwrap().port());
        let provider = Arc::new(Self {
            issuer,
            ca: ca.der().clone(),
            key: key(),
            forger: key(),
            next: Mutex::new(None),
            seen: Mutex::default(),
        });
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let serving = provider.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                let (acceptor, provider) = (acceptor.clone(), serving.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let service = hyper::service::service_fn(move |req| {
                        let provider = provider.clone();
                        async move { Ok::<_, Infallible>(provider.answer(req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        provider
    }

    /// The token endpoint's next answer.
    pub(crate) fn answer_next(&self, answer: Answer) {
        *self.next.lock().unwrap() = Some(answer);
    }

    /// The forms and `Authorization` headers the token endpoint received.
    pub(crate) fn redemptions(&self) -> Vec<Redemption> {
        self.seen.lock().unwrap().requests.clone()
    }

    /// Claims as a good sign-in's ID token carries them.
    pub(crate) fn claims(&self, audience: &str, nonce: &str, subject: &str, groups: &[&str], now_secs: i64) -> Value {
        json!({
            "iss": self.issuer,
            "aud": audience,
            "sub": subject,
            "nonce": nonce,
            "iat": now_secs,
            "exp": now_secs + 600,
            "auth_time": now_secs,
            "groups": groups,
            "amr": ["pwd"],
        })
    }

    fn jwt(&self, claims: &Value, forged: bool) -> String {
        let header = b64(json!({ "alg": "ES256", "kid": "k1", "typ": "JWT" }).to_string().as_bytes());
        let body = b64(claims.to_string().as_bytes());
        let signing_input = format!("{header}.{body}");
        let key = if forged { &self.forger } else { &self.key };
        let sig = key.sign(&SystemRandom::new(), signing_input.as_bytes()).unwrap();
        format!("{signing_input}.{}", b64(sig.as_ref()))
    }

    fn jwks(&self) -> Value {
        // An uncompressed P-256 point: 0x04, x, y.
        let point = self.key.public_key().as_ref();
        json!({ "keys": [{
            "kty": "EC", "crv": "P-256", "kid": "k1", "alg": "ES256", "use": "sig",
            "x": b64(&point[1..33]), "y": b64(&point[33..65]),
        }]})
    }

    async fn answer(&self, req: hyper::Request<Incoming>) -> hyper::Response<Full<bytes_of::Bytes>> {
        let path = req.uri().path().to_owned();
        let authorization = req.headers().get("authorization").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let (status, value) = match path.as_str() {
            "/.well-known/openid-configuration" => (
                200,
                json!({
                    "issuer": self.issuer,
                    "authorization_endpoint": format!("{}/authorize", self.issuer),
                    "token_endpoint": format!("{}/token", self.issuer),
                    "jwks_uri": format!("{}/jwks", self.issuer),
                    "response_types_supported": ["code"],
                    "code_challenge_methods_supported": ["S256"],
                }),
            ),
            "/jwks" => (200, self.jwks()),
            "/token" => self.token(&body, authorization),
            _ => (404, json!({ "error": "not_found" })),
        };
        hyper::Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(bytes_of::Bytes::from(value.to_string())))
            .unwrap()
    }

    fn token(&self, body: &[u8], authorization: Option<String>) -> (u16, Value) {
        let form: Vec<(String, String)> = reqwest::Url::parse(&format!("http://x/?{}", String::from_utf8_lossy(body)))
            .unwrap()
            .query_pairs()
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        let field = |name: &str| form.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        let mut seen = self.seen.lock().unwrap();
        seen.requests.push((form.clone(), authorization));
        let Some(code) = field("code") else { return (400, json!({ "error": "invalid_request" })) };
        if seen.codes.contains(&code) {
            return (400, json!({ "error": "invalid_grant", "error_description": "code already used" }));
        }
        seen.codes.push(code);
        match self.next.lock().unwrap().take() {
            Some(Answer::Token { claims, forged }) => {
                (200, json!({ "id_token": self.jwt(&claims, forged), "access_token": "at", "token_type": "Bearer" }))
            }
            Some(Answer::Unsigned { claims }) => {
                let header = b64(json!({ "alg": "none", "kid": "k1" }).to_string().as_bytes());
                let token = format!("{header}.{}.", b64(claims.to_string().as_bytes()));
                (200, json!({ "id_token": token, "access_token": "at", "token_type": "Bearer" }))
            }
            None => (400, json!({ "error": "invalid_grant" })),
        }
    }
}

/// `bytes` through the crates that already depend on it.
mod bytes_of {
    pub(crate) use axum::body::Bytes;
}
