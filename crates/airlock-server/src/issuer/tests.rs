use std::time::Duration;

use airlock_core::Timestamp;
use data_encoding::BASE64URL_NOPAD;
use jsonwebtoken::jwk::JwkSet;
use ring::signature::{Ed25519KeyPair, KeyPair};

use super::*;

const ISSUER: &str = "https://issuer.example";
const NOW: i64 = 1_800_000_000;

fn now() -> Timestamp {
    Timestamp::from_unix_millis(NOW * 1000)
}

fn b64(v: &serde_json::Value) -> String {
    BASE64URL_NOPAD.encode(v.to_string().as_bytes())
}

/// An Ed25519 key, its JWK set (kid `k1`) and a signer of tokens with any header.
struct Key {
    pair: Ed25519KeyPair,
}

impl Key {
    fn new() -> Self {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
        Self { pair: Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap() }
    }

    fn jwks(&self, kid: &str) -> JwkSet {
        let x = BASE64URL_NOPAD.encode(self.pair.public_key().as_ref());
        serde_json::from_value(serde_json::json!({
            "keys": [{ "kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid, "use": "sig", "alg": "EdDSA" }]
        }))
        .unwrap()
    }

    fn sign(&self, header: serde_json::Value, claims: serde_json::Value) -> String {
        let input = format!("{}.{}", b64(&header), b64(&claims));
        let sig = self.pair.sign(input.as_bytes());
        format!("{input}.{}", BASE64URL_NOPAD.encode(sig.as_ref()))
    }
}

fn claims() -> serde_json::Value {
    serde_json::json!({ "iss": ISSUER, "aud": "airlock", "sub": "s", "iat": NOW - 10, "exp": NOW + 300 })
}

fn expect() -> Expect<'static> {
    Expect { audience: "airlock", max_age: None }
}

/// The checks after the key set is in hand: header, key, signature, claims.
fn verify_with(keys: &JwkSet, token: &str) -> Result<Claims, JwtRefusal> {
    let (alg, kid) = read_header(token)?;
    let jwk = find_key(keys, kid.as_deref(), alg).ok_or(JwtRefusal::UnknownKey)?;
    let key = DecodingKey::from_jwk(jwk).map_err(|_| JwtRefusal::UnknownKey)?;
    let claims = check_signed(token, &key, alg)?;
    check_claims(&claims, ISSUER, &expect(), now())?;
    Ok(claims)
}

#[test]
fn a_token_signed_by_a_published_key_is_believed() {
    let key = Key::new();
    let token = key.sign(serde_json::json!({ "alg": "EdDSA", "kid": "k1" }), claims());
    let got = verify_with(&key.jwks("k1"), &token).unwrap();
    assert_eq!(got.str("sub"), Some("s"));
    assert_eq!(got.strings("aud"), vec!["airlock".to_owned()]);
}

#[test]
fn forged_and_unknown_keys_are_refused() {
    let key = Key::new();
    let other = Key::new();
    let forged = other.sign(serde_json::json!({ "alg": "EdDSA", "kid": "k1" }), claims());
    assert_eq!(verify_with(&key.jwks("k1"), &forged).unwrap_err(), JwtRefusal::Signature);
    let unknown = key.sign(serde_json::json!({ "alg": "EdDSA", "kid": "k9" }), claims());
    assert_eq!(verify_with(&key.jwks("k1"), &unknown).unwrap_err(), JwtRefusal::UnknownKey);
    // A payload changed after signing.
    let token = key.sign(serde_json::json!({ "alg": "EdDSA", "kid": "k1" }), claims());
    let mut parts: Vec<&str> = token.split('.').collect();
    let mut changed = claims();
    changed["sub"] = "admin".into();
    let payload = b64(&changed);
    parts[1] = &payload;
    assert_eq!(verify_with(&key.jwks("k1"), &parts.join(".")).unwrap_err(), JwtRefusal::Signature);
}

#[test]
fn none_and_hmac_algorithms_are_refused_before_any_key_is_used() {
    let key = Key::new();
    let payload = b64(&claims());
    let none = format!("{}.{payload}.", b64(&serde_json::json!({ "alg": "none", "kid": "k1" })));
    assert_eq!(verify_with(&key.jwks("k1"), &none).unwrap_err(), JwtRefusal::Algorithm);
    // HS256 keyed by the public key: the classic confusion.
    let header = b64(&serde_json::json!({ "alg": "HS256", "kid": "k1" }));
    let input = format!("{header}.{payload}");
    let mac = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key.pair.public_key().as_ref()),
        input.as_bytes(),
    );
    let hs = format!("{input}.{}", BASE64URL_NOPAD.encode(mac.as_ref()));
    assert_eq!(verify_with(&key.jwks("k1"), &hs).unwrap_err(), JwtRefusal::Algorithm);
    // An accepted algorithm the key is not for.
    let rs = key.sign(serde_json::json!({ "alg": "RS256", "kid": "k1" }), claims());
    assert_eq!(verify_with(&key.jwks("k1"), &rs).unwrap_err(), JwtRefusal::UnknownKey);
    for junk in ["", "a.b", "a.b.c.d", "!!.e30.x", &"a".repeat(MAX_TOKEN_BYTES + 1)] {
        assert!(read_header(junk).is_err() || junk.len() > MAX_TOKEN_BYTES, "{junk:.20}");
    }
}

#[test]
fn issuer_audience_and_times_are_checked_on_the_given_clock() {
    let check = |patch: serde_json::Value, expect: Expect<'_>| {
        let mut c = claims();
        for (k, v) in patch.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        check_claims(&Claims(c.as_object().unwrap().clone()), ISSUER, &expect, now())
    };
    assert_eq!(check(serde_json::json!({}), expect()), Ok(()));
    assert_eq!(check(serde_json::json!({ "iss": "https://evil.example" }), expect()), Err(JwtRefusal::Issuer));
    assert_eq!(check(serde_json::json!({ "iss": null }), expect()), Err(JwtRefusal::Issuer));
    assert_eq!(check(serde_json::json!({ "aud": "other" }), expect()), Err(JwtRefusal::Audience));
    assert_eq!(check(serde_json::json!({ "aud": ["other", "airlock"] }), expect()), Ok(()));
    assert_eq!(check(serde_json::json!({ "exp": NOW - 61 }), expect()), Err(JwtRefusal::Expired));
    assert_eq!(check(serde_json::json!({ "exp": NOW - 30 }), expect()), Ok(()), "within the leeway");
    assert_eq!(check(serde_json::json!({ "exp": null }), expect()), Err(JwtRefusal::Malformed));
    assert_eq!(check(serde_json::json!({ "nbf": NOW + 120 }), expect()), Err(JwtRefusal::NotYetValid));
    assert_eq!(check(serde_json::json!({ "iat": NOW + 120 }), expect()), Err(JwtRefusal::NotYetValid));
    let recent = Expect { audience: "airlock", max_age: Some(Duration::from_secs(600)) };
    assert_eq!(check(serde_json::json!({ "iat": NOW - 600 }), recent), Ok(()));
    assert_eq!(check(serde_json::json!({ "iat": NOW - 3600 }), recent), Err(JwtRefusal::TooOld));
    assert_eq!(check(serde_json::json!({ "iat": null }), recent), Err(JwtRefusal::Malformed));
}

#[test]
fn private_and_plain_http_issuer_urls_are_refused_unless_allowed() {
    let strict = IssuerClient::new(Vec::new(), false).unwrap();
    for url in [
        "http://issuer.example",
        "https://127.0.0.1/",
        "https://10.1.2.3/",
        "https://169.254.169.254/latest",
        "https://[::1]/",
        "https://[fd00:ec2::254]/",
        "https://[::ffff:127.0.0.1]/",
        "https://user:pw@issuer.example/",
        "file:///etc/passwd",
        "not a url",
    ] {
        assert!(matches!(strict.check_url(url), Err(IssuerError::NotAllowed(_))), "{url}");
    }
    assert!(strict.check_url("https://accounts.google.com").is_ok());
    let lenient = IssuerClient::new(Vec::new(), true).unwrap();
    assert!(lenient.check_url("https://127.0.0.1:8443/").is_ok());
    assert!(lenient.check_url("http://127.0.0.1:8443/").is_err(), "https only, always");
    assert!(is_public("8.8.8.8".parse().unwrap()));
    assert!(!is_public("100.64.0.1".parse().unwrap()));
    assert!(is_public("2606:4700::1".parse().unwrap()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_and_keys_come_from_a_real_openid_provider() {
    let provider = airlock_testkit::oidc::OidcProvider::start(&[]);
    let ca = read_ca_pem(provider.ca_pem().as_bytes()).unwrap().remove(0);
    let issuers = Issuers::new(IssuerClient::new(vec![ca.clone()], true).unwrap());
    let d = issuers.discovery(provider.issuer(), now()).await.unwrap();
    assert_eq!(d.issuer, provider.issuer());
    assert!(d.token_endpoint.is_some() && d.authorization_endpoint.is_some());
    let (_, keys) = issuers.fetch(provider.issuer(), now(), false).await.unwrap();
    assert!(!keys.keys.is_empty(), "the provider publishes its signing keys");
    // A token naming a key the provider does not publish: refused, after one refetch.
    let token = Key::new().sign(serde_json::json!({ "alg": "EdDSA", "kid": "nope" }), claims());
    let err = issuers.verify(provider.issuer(), &token, &expect(), now()).await.unwrap_err();
    assert_eq!(err, JwtRefusal::UnknownKey);
    // Another issuer URL than the discovery document names.
    let wrong = format!("{}/", provider.issuer().trim_end_matches('/'));
    let wrong = if wrong == provider.issuer() { format!("{}x", provider.issuer()) } else { wrong };
    assert!(issuers.discovery(&wrong, now()).await.is_err());
    // The same provider on loopback, with private addresses refused: not fetched at all.
    let strict = Issuers::new(IssuerClient::new(vec![ca], false).unwrap());
    assert!(matches!(strict.discovery(provider.issuer(), now()).await, Err(IssuerError::NotAllowed(_))));
}
