//! The test OpenID provider (`airlock_testkit::oidc`) behaves as the real one a relying party
//! meets: discovery, code flow with PKCE required, codes single use, ID tokens that verify
//! against its JWKS and carry groups, amr, acr and auth_time, step-up through `max_age`.
//! Driven with plain reqwest and checked with `jsonwebtoken`, no Airlock code in between.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use airlock_testkit::oidc::{ACR_MFA, ACR_PASSWORD, Account, OidcClient, OidcProvider, Settings};
use data_encoding::BASE64URL_NOPAD;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;

const REDIRECT: &str = "https://127.0.0.1:9/callback";

fn client() -> OidcClient {
    OidcClient::new("airlock", "client-secret-1", REDIRECT)
}

fn verifier(n: u8) -> String {
    BASE64URL_NOPAD.encode(&[n; 32])
}

fn challenge(verifier: &str) -> String {
    BASE64URL_NOPAD.encode(ring::digest::digest(&ring::digest::SHA256, verifier.as_bytes()).as_ref())
}

/// The authorize URL a relying party sends the browser to, with PKCE S256 and `extra` parameters.
async fn authorize_url(p: &OidcProvider, client_id: &str, verifier: &str, extra: &[(&str, &str)]) -> String {
    let discovery = discovery(p).await;
    let mut url = reqwest::Url::parse(discovery["authorization_endpoint"].as_str().unwrap()).unwrap();
    url.query_pairs_mut()
        .append_pair("response_type", "code")
        .append_pair("client_id", client_id)
        .append_pair("redirect_uri", REDIRECT)
        .append_pair("scope", "openid email")
        .append_pair("state", "state-1")
        .append_pair("nonce", "nonce-1")
        .append_pair("code_challenge", &challenge(verifier))
        .append_pair("code_challenge_method", "S256")
        .extend_pairs(extra);
    url.into()
}

async fn discovery(p: &OidcProvider) -> Value {
    let url = format!("{}/.well-known/openid-configuration", p.issuer());
    p.browser(None).get(url).send().await.unwrap().error_for_status().unwrap().json().await.unwrap()
}

fn query(url: &str, name: &str) -> Option<String> {
    reqwest::Url::parse(url).unwrap().query_pairs().find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
}

/// The token endpoint's answer to a code exchange: status and JSON body.
async fn exchange(p: &OidcProvider, code: &str, verifier: Option<&str>) -> (u16, Value) {
    let token_endpoint = discovery(p).await["token_endpoint"].as_str().unwrap().to_owned();
    let mut form = vec![("grant_type", "authorization_code"), ("code", code), ("redirect_uri", REDIRECT)];
    if let Some(v) = verifier {
        form.push(("code_verifier", v));
    }
    let resp = p
        .browser(None)
        .post(token_endpoint)
        .basic_auth("airlock", Some("client-secret-1"))
        .form(&form)
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

/// Verifies `id_token` against the provider's JWKS (the key its `kid` names), issuer and audience.
async fn verify(p: &OidcProvider, id_token: &str, alg: Algorithm) -> Value {
    let jwks_uri = discovery(p).await["jwks_uri"].as_str().unwrap().to_owned();
    let jwks: JwkSet = p.browser(None).get(jwks_uri).send().await.unwrap().json().await.unwrap();
    let header = jsonwebtoken::decode_header(id_token).unwrap();
    assert_eq!(header.alg, alg);
    let jwk = jwks.find(header.kid.as_deref().unwrap()).expect("the ID token's kid is in the JWKS");
    let mut validation = Validation::new(alg);
    validation.set_audience(&["airlock"]);
    validation.set_issuer(&[p.issuer()]);
    jsonwebtoken::decode::<Value>(id_token, &DecodingKey::from_jwk(jwk).unwrap(), &validation).unwrap().claims
}

/// One login as the chosen account, through to the ID token's verified claims.
async fn login(p: &OidcProvider, n: u8, extra: &[(&str, &str)]) -> Value {
    let v = verifier(n);
    let callback = p.drive_login(&p.browser(None), &authorize_url(p, "airlock", &v, extra).await).await;
    let (status, body) = exchange(p, &query(&callback, "code").unwrap(), Some(&v)).await;
    assert_eq!(status, 200, "{body}");
    verify(p, body["id_token"].as_str().unwrap(), Algorithm::RS256).await
}

#[tokio::test]
async fn discovery_is_served_with_code_flow_and_pkce_s256_only() {
    let p = OidcProvider::start(&[client()]);
    let d = discovery(&p).await;
    assert_eq!(d["issuer"], p.issuer());
    assert_eq!(d["response_types_supported"], serde_json::json!(["code"]));
    assert_eq!(d["code_challenge_methods_supported"], serde_json::json!(["S256"]));
    for field in ["authorization_endpoint", "token_endpoint", "jwks_uri", "end_session_endpoint"] {
        assert!(d[field].as_str().unwrap().starts_with(p.issuer()), "{field}: {d}");
    }
}

#[tokio::test]
async fn a_code_flow_with_pkce_yields_an_id_token_that_verifies_and_carries_groups_amr_acr() {
    let p = OidcProvider::start(&[client()]);
    p.set_account("alice", Account::new("alice@example.com", &["eng", "ops"]).with_mfa());
    p.login_as("alice");
    let v = verifier(1);
    let callback = p.drive_login(&p.browser(None), &authorize_url(&p, "airlock", &v, &[]).await).await;
    assert!(callback.starts_with(REDIRECT), "{callback}");
    assert_eq!(query(&callback, "state").as_deref(), Some("state-1"));
    assert_eq!(query(&callback, "iss").as_deref(), Some(p.issuer()));
    let code = query(&callback, "code").unwrap();

    let (status, body) = exchange(&p, &code, Some(&v)).await;
    assert_eq!(status, 200, "{body}");
    let claims = verify(&p, body["id_token"].as_str().unwrap(), Algorithm::RS256).await;
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["email"], "alice@example.com");
    assert_eq!(claims["groups"], serde_json::json!(["eng", "ops"]));
    assert_eq!(claims["amr"], serde_json::json!(["pwd", "mfa"]));
    assert_eq!(claims["acr"], ACR_MFA);
    assert_eq!(claims["nonce"], "nonce-1");
    assert!(claims["auth_time"].as_i64().unwrap() <= claims["iat"].as_i64().unwrap());

    // The same code again: refused, as a replayed authorization code must be.
    let (status, body) = exchange(&p, &code, Some(&v)).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("invalid_grant")), "{body}");
}

#[tokio::test]
async fn the_token_endpoint_refuses_a_wrong_or_missing_verifier() {
    let p = OidcProvider::start(&[client()]);
    p.set_account("alice", Account::new("alice@example.com", &["eng"]));
    p.login_as("alice");
    for wrong in [Some(verifier(9)), None] {
        let callback = p.drive_login(&p.browser(None), &authorize_url(&p, "airlock", &verifier(1), &[]).await).await;
        let (status, body) = exchange(&p, &query(&callback, "code").unwrap(), wrong.as_deref()).await;
        assert_eq!((status, body["error"].as_str()), (400, Some("invalid_grant")), "{wrong:?}: {body}");
    }
}

#[tokio::test]
async fn an_authorization_request_without_pkce_is_refused() {
    let p = OidcProvider::start(&[client()]);
    p.set_account("alice", Account::new("alice@example.com", &["eng"]));
    p.login_as("alice");
    let mut url = reqwest::Url::parse(&authorize_url(&p, "airlock", &verifier(1), &[]).await).unwrap();
    let kept: Vec<(String, String)> = url
        .query_pairs()
        .filter(|(k, _)| !k.starts_with("code_challenge"))
        .map(|(k, v)| (k.into(), v.into()))
        .collect();
    url.query_pairs_mut().clear().extend_pairs(kept);
    let callback = p.drive_login(&p.browser(None), url.as_str()).await;
    assert_eq!(query(&callback, "error").as_deref(), Some("invalid_request"), "{callback}");
    assert_eq!(query(&callback, "code"), None);
}

#[tokio::test]
async fn groups_change_between_logins_and_max_age_forces_a_fresh_login() {
    let p = OidcProvider::start(&[client()]);
    p.set_account("alice", Account::new("alice@example.com", &["eng"]));
    p.login_as("alice");
    let first = login(&p, 1, &[]).await;
    assert_eq!(first["groups"], serde_json::json!(["eng"]));
    assert_eq!(first["acr"], ACR_PASSWORD);

    p.set_account("alice", Account::new("alice@example.com", &["admins"]).with_mfa());
    // One browser across both logins, so the provider's session is there to be reused or not.
    let browser = p.browser(None);
    for (n, extra) in [(2, &[][..]), (3, &[("max_age", "0")][..]), (4, &[("prompt", "login")][..])] {
        let v = verifier(n);
        let callback = p.drive_login(&browser, &authorize_url(&p, "airlock", &v, extra).await).await;
        let (status, body) = exchange(&p, &query(&callback, "code").unwrap(), Some(&v)).await;
        assert_eq!(status, 200, "{body}");
        let claims = verify(&p, body["id_token"].as_str().unwrap(), Algorithm::RS256).await;
        assert_eq!(claims["groups"], serde_json::json!(["admins"]), "{extra:?}");
    }
    // A fresh login through max_age logs in whoever the test chose now.
    p.set_account("bob", Account::new("bob@example.com", &["viewers"]));
    p.login_as("bob");
    let v = verifier(5);
    let callback = p.drive_login(&browser, &authorize_url(&p, "airlock", &v, &[("max_age", "0")]).await).await;
    let (_, body) = exchange(&p, &query(&callback, "code").unwrap(), Some(&v)).await;
    let claims = verify(&p, body["id_token"].as_str().unwrap(), Algorithm::RS256).await;
    assert_eq!((claims["sub"].as_str(), claims["groups"].clone()), (Some("bob"), serde_json::json!(["viewers"])));
}

#[tokio::test]
async fn an_es256_client_gets_es256_id_tokens() {
    let mut es = client();
    es.id_token_signed_response_alg = "ES256";
    let p = OidcProvider::start_with(&[es], Settings::default());
    p.set_account("alice", Account::new("alice@example.com", &["eng"]));
    p.login_as("alice");
    let v = verifier(1);
    let callback = p.drive_login(&p.browser(None), &authorize_url(&p, "airlock", &v, &[]).await).await;
    let (_, body) = exchange(&p, &query(&callback, "code").unwrap(), Some(&v)).await;
    let claims = verify(&p, body["id_token"].as_str().unwrap(), Algorithm::ES256).await;
    assert_eq!(claims["sub"], "alice");
}

#[tokio::test]
async fn a_refused_login_comes_back_as_access_denied() {
    let p = OidcProvider::start(&[client()]);
    p.refuse_logins();
    let callback = p.drive_login(&p.browser(None), &authorize_url(&p, "airlock", &verifier(1), &[]).await).await;
    assert_eq!(query(&callback, "error").as_deref(), Some("access_denied"), "{callback}");
}

#[tokio::test]
async fn the_provider_process_ends_when_dropped() {
    let p = OidcProvider::start(&[client()]);
    let pid = p.pid();
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    drop(p);
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "node {pid} outlived its OidcProvider");
}
