//! The API driven in memory through `tower::ServiceExt::oneshot`, with an injected clock.

use std::sync::Arc;
use std::time::Duration;

use airlock_core::Timestamp;
use axum::body::Body;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

use crate::clock::ManualClock;
use crate::keys::KekSource;
use crate::state::AppState;

struct Api {
    state: Arc<AppState>,
    clock: Arc<ManualClock>,
    token: String,
    workspace: String,
    _dir: tempfile::TempDir,
}

async fn api() -> Api {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(Timestamp::from_unix_millis(1_800_000_000_000));
    let boot = crate::init(dir.path(), &KekSource::default_for(dir.path()), "airlock.test", "acme", "default", &*clock)
        .await
        .unwrap();
    let state = crate::test_state(dir.path(), clock.clone()).await;
    Api { state, clock, token: boot.admin_token.expose().to_owned(), workspace: boot.workspace.to_string(), _dir: dir }
}

impl Api {
    async fn call(&self, method: Method, path: &str, token: Option<&str>, body: Option<&str>) -> (StatusCode, Value) {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let req = req.body(body.map_or(Body::empty(), |b| Body::from(b.to_owned()))).unwrap();
        let resp = super::router(self.state.clone()).oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, value)
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call(Method::GET, path, Some(&self.token), None).await
    }

    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, path, Some(&self.token), Some(&body.to_string())).await
    }

    async fn new_env(&self, name: &str) -> String {
        let (s, v) =
            self.post(&format!("/v1/workspaces/{}/environments", self.workspace), json!({ "name": name })).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        v["id"].as_str().unwrap().to_owned()
    }

    async fn join_token(&self, env: &str) -> String {
        let (s, v) = self.post(&format!("/v1/environments/{env}/join-tokens"), json!({})).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        v["token"].as_str().unwrap().to_owned()
    }

    async fn join(&self, token: &str, csr: &str) -> (StatusCode, Value) {
        let body = json!({ "join_token": token, "csr_pem": csr, "version": "test" }).to_string();
        self.call(Method::POST, "/v1/join", None, Some(&body)).await
    }

    async fn audit_actions(&self, chain: &str) -> Vec<(String, String)> {
        self.state
            .store
            .audit_records(chain)
            .await
            .unwrap()
            .into_iter()
            .map(|r| {
                let r = r.unwrap();
                (r.event.action, serde_json::to_value(r.event.outcome).unwrap().as_str().unwrap().to_owned())
            })
            .collect()
    }

    async fn appliance_count(&self) -> usize {
        let (_, v) = self.get("/v1/appliances").await;
        v["appliances"].as_array().unwrap().len()
    }
}

fn csr() -> String {
    csr_for(&rcgen::KeyPair::generate().unwrap())
}

fn assert_error_shape(v: &Value) {
    assert!(v["error"]["code"].is_string() && v["error"]["message"].is_string(), "not an API error body: {v}");
}

#[tokio::test]
async fn unknown_route_gets_json_404() {
    let api = api().await;
    let (s, v) = api.get("/v1/nope").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_error_shape(&v);
    let (s, v) = api.call(Method::DELETE, "/v1/workspaces", Some(&api.token), None).await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    assert_error_shape(&v);
}

#[tokio::test]
async fn malformed_body_gets_400_and_store_unchanged() {
    let api = api().await;
    let path = format!("/v1/workspaces/{}/environments", api.workspace);
    for body in ["{", "{\"name\": 5}", "{\"name\": \"ok\", \"extra\": 1}", "{\"name\": \"bad name!\"}"] {
        let (s, v) = api.call(Method::POST, &path, Some(&api.token), Some(body)).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert_error_shape(&v);
    }
    let (s, v) = api.call(Method::POST, "/v1/join", None, Some("not json")).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_error_shape(&v);
    let (_, envs) = api.get(&path).await;
    assert_eq!(envs.as_array().unwrap().len(), 0);
}

#[tokio::test]
async fn missing_or_forged_token_is_401_and_audited() {
    let api = api().await;
    let forged = airlock_core::token::Secret::from_random(airlock_core::token::TokenKind::Api, [3; 32]);
    for token in [None, Some("nonsense"), Some(forged.expose())] {
        let (s, v) = api.call(Method::GET, "/v1/workspaces", token, None).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        assert_error_shape(&v);
    }
    let system = api.audit_actions("system").await;
    assert_eq!(system.iter().filter(|(a, o)| a == "api.authenticate" && o == "denied").count(), 3);
    // The forged token itself never reaches the audit.
    let records = api.state.store.audit_records("system").await.unwrap();
    for r in records {
        assert!(!serde_json::to_string(&r.unwrap()).unwrap().contains(forged.expose()));
    }
}

#[tokio::test]
async fn other_tenants_resources_are_invisible() {
    let api = api().await;
    let env_a = api.new_env("a").await;
    let (s, joined) = api.join(&api.join_token(&env_a).await, &csr()).await;
    assert_eq!(s, StatusCode::OK, "{joined}");
    let appliance_a = joined["appliance_id"].as_str().unwrap().to_owned();

    let dir = api._dir.path();
    let other =
        crate::create_tenant(dir, &KekSource::default_for(dir), "globex", "default", &*api.clock).await.unwrap();
    let b = other.admin_token.expose();
    let api_ref = &api;
    let call = |m: Method, p: String| async move { api_ref.call(m, &p, Some(b), Some("{}")).await };

    let (s, _) = call(Method::GET, format!("/v1/workspaces/{}/environments", api.workspace)).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = call(Method::POST, format!("/v1/workspaces/{}/environments", api.workspace)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST); // body lacks a name: input is checked before existence
    let (s, _) = call(Method::POST, format!("/v1/environments/{env_a}/join-tokens")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = call(Method::POST, format!("/v1/appliances/{appliance_a}/revoke")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, list) = api.call(Method::GET, "/v1/appliances", Some(b), None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(list["appliances"].as_array().unwrap().is_empty(), "{list}");
    // Tenant A still sees its appliance, unrevoked.
    let (_, mine) = api.get("/v1/appliances").await;
    assert_eq!(mine["appliances"][0]["revoked"], false);
}

#[tokio::test]
async fn join_token_is_single_use_and_reuse_is_audited() {
    let api = api().await;
    let env = api.new_env("e").await;
    let token = api.join_token(&env).await;
    let (s, v) = api.join(&token, &csr()).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = api.join(&token, &csr()).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(v["error"]["message"].as_str().unwrap().contains("already used"), "{v}");
    assert_eq!(api.appliance_count().await, 1);
    let tenant_chain =
        api.state.store.audit_chains().await.unwrap().into_iter().find(|c| c.starts_with("ten_")).unwrap();
    let actions = api.audit_actions(&tenant_chain).await;
    assert!(actions.contains(&("appliance.join".into(), "success".into())));
    assert!(actions.contains(&("appliance.join".into(), "denied".into())));
}

#[tokio::test]
async fn expired_join_token_is_refused() {
    let api = api().await;
    let env = api.new_env("e").await;
    let token = api.join_token(&env).await;
    api.clock.advance(Duration::from_secs(15 * 60 + 1));
    let (s, v) = api.join(&token, &csr()).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(v["error"]["message"].as_str().unwrap().contains("expired"), "{v}");
    assert_eq!(api.appliance_count().await, 0);
}

#[tokio::test]
async fn bad_csr_is_refused_and_leaves_token_unspent() {
    let api = api().await;
    let env = api.new_env("e").await;
    let token = api.join_token(&env).await;
    let (s, v) =
        api.join(&token, "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n").await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    // A CSR that asks for an identity of its choosing is refused too.
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI("spiffe://airlock.test/tenant/x".try_into().unwrap())];
    let (s, _) = api.join(&token, &params.serialize_request(&key).unwrap().pem().unwrap()).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(api.appliance_count().await, 0);
    let (s, v) = api.join(&token, &csr()).await;
    assert_eq!(s, StatusCode::OK, "token should still be usable: {v}");
}

#[tokio::test]
async fn join_token_for_unknown_environment_is_404() {
    let api = api().await;
    let (s, v) = api.post("/v1/environments/env_aaaaaaaaaaaaaaaaaaaaaaaaaa/join-tokens", json!({})).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    let (s, v) = api.post("/v1/environments/apl_aaaaaaaaaaaaaaaaaaaaaaaaaa/join-tokens", json!({})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("expected an environment id"), "{v}");
    let env = api.new_env("e").await;
    let (s, _) = api.post(&format!("/v1/environments/{env}/join-tokens"), json!({ "ttl_seconds": 0 })).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn openapi_documents_every_v1_route() {
    let api = api().await;
    let (s, doc) = api.call(Method::GET, "/v1/openapi.json", None, None).await;
    assert_eq!(s, StatusCode::OK);
    let paths: Vec<&str> = doc["paths"].as_object().unwrap().keys().map(String::as_str).collect();
    for p in [
        "/v1/ca",
        "/v1/join",
        "/v1/workspaces",
        "/v1/workspaces/{workspace}/environments",
        "/v1/environments/{environment}/join-tokens",
        "/v1/appliances",
        "/v1/appliances/{appliance}/revoke",
    ] {
        assert!(paths.contains(&p), "{p} missing from OpenAPI: {paths:?}");
    }
}

#[tokio::test]
async fn health_ready_and_metrics_answer() {
    let api = api().await;
    assert_eq!(api.call(Method::GET, "/healthz", None, None).await.0, StatusCode::OK);
    assert_eq!(api.call(Method::GET, "/readyz", None, None).await.0, StatusCode::OK);
    let req = Request::builder().uri("/metrics").body(Body::empty()).unwrap();
    let resp = super::router(api.state.clone()).oneshot(req).await.unwrap();
    let text = String::from_utf8(resp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    assert!(text.contains("airlock_gateway_appliances_connected"), "{text}");
}

fn csr_for(key: &rcgen::KeyPair) -> String {
    rcgen::CertificateParams::default().serialize_request(key).unwrap().pem().unwrap()
}

#[tokio::test]
async fn join_retry_with_the_same_key_gets_the_same_identity() {
    let api = api().await;
    let env = api.new_env("e").await;
    let token = api.join_token(&env).await;
    let key = rcgen::KeyPair::generate().unwrap();
    let (s, first) = api.join(&token, &csr_for(&key)).await;
    assert_eq!(s, StatusCode::OK, "{first}");
    // The response was lost: the appliance asks again with the same key (a fresh CSR).
    let (s, again) = api.join(&token, &csr_for(&key)).await;
    assert_eq!(s, StatusCode::OK, "{again}");
    assert_eq!(again["appliance_id"], first["appliance_id"]);
    assert_ne!(again["certificate_pem"], first["certificate_pem"]);
    assert_eq!(api.appliance_count().await, 1);
    let (_, list) = api.get("/v1/appliances").await;
    assert!(again["certificate_pem"].as_str().unwrap().len() > 100);
    assert_eq!(list["appliances"][0]["id"], first["appliance_id"]);

    // Anyone else presenting the spent token, even with a valid CSR, is refused.
    let (s, v) = api.join(&token, &csr()).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
    // And the retry window closes with the token's own validity.
    api.clock.advance(Duration::from_secs(15 * 60));
    let (s, _) = api.join(&token, &csr_for(&key)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(api.appliance_count().await, 1);
}

#[tokio::test]
async fn join_retry_is_refused_once_the_appliance_is_revoked() {
    let api = api().await;
    let env = api.new_env("e").await;
    let token = api.join_token(&env).await;
    let key = rcgen::KeyPair::generate().unwrap();
    let (_, first) = api.join(&token, &csr_for(&key)).await;
    let id = first["appliance_id"].as_str().unwrap();
    let (s, _) = api.post(&format!("/v1/appliances/{id}/revoke"), json!({})).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = api.join(&token, &csr_for(&key)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}
