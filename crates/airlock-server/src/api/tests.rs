//! The API driven in memory through `tower::ServiceExt::oneshot`, with an injected clock.

use std::sync::Arc;
use std::time::Duration;

use airlock_core::Timestamp;
use airlock_core::audit::AuditAction;
use axum::body::Body;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

use airlock_testkit::{customer, op_id};

use crate::clock::ManualClock;
use crate::keys::KekSource;
use crate::state::AppState;

pub(super) struct Api {
    pub(super) state: Arc<AppState>,
    pub(super) clock: Arc<ManualClock>,
    pub(super) token: String,
    pub(super) workspace: String,
    pub(super) _dir: tempfile::TempDir,
}

pub(super) async fn api() -> Api {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(Timestamp::from_unix_millis(1_800_000_000_000));
    let boot = crate::init(dir.path(), &KekSource::default_for(dir.path()), "airlock.test", "acme", "default", &*clock)
        .await
        .unwrap();
    let state = crate::test_state(dir.path(), clock.clone()).await;
    Api { state, clock, token: boot.admin_token.expose().to_owned(), workspace: boot.workspace.to_string(), _dir: dir }
}

impl Api {
    pub(super) async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> (StatusCode, Value) {
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

    pub(super) async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call(Method::GET, path, Some(&self.token), None).await
    }

    pub(super) async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, path, Some(&self.token), Some(&body.to_string())).await
    }

    pub(super) async fn new_env(&self, name: &str) -> String {
        let (s, v) =
            self.post(&format!("/v1/workspaces/{}/environments", self.workspace), json!({ "name": name })).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        v["id"].as_str().unwrap().to_owned()
    }

    pub(super) async fn join_token(&self, env: &str) -> String {
        let (s, v) = self.post(&format!("/v1/environments/{env}/join-tokens"), json!({})).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        v["token"].as_str().unwrap().to_owned()
    }

    pub(super) async fn join(&self, token: &str, csr: &str) -> (StatusCode, Value) {
        let body = json!({ "join_token": token, "csr_pem": csr, "version": "test" }).to_string();
        self.call(Method::POST, "/v1/join", None, Some(&body)).await
    }

    pub(super) async fn audit_actions(&self, chain: &str) -> Vec<(String, String)> {
        // Routine reads queue their records; everything queued so far is committed first.
        self.state.audit_writer.flush().await;
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

pub(super) fn csr() -> String {
    csr_for(&rcgen::KeyPair::generate().unwrap())
}

fn assert_error_shape(v: &Value) {
    assert!(v["error"]["code"].is_string() && v["error"]["message"].is_string(), "not an API error body: {v}");
}

/// Asserts an API error of `code` whose message tells the caller `why` (the message is what
/// the operator reads; clients decide on the status and the code).
#[track_caller]
pub(super) fn assert_error(v: &Value, code: &str, why: &str) {
    assert_eq!(v["error"]["code"], code, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains(why), "expected `{why}`: {v}");
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
    assert_eq!(system.iter().filter(|(a, o)| a == AuditAction::ApiAuthenticate.as_str() && o == "denied").count(), 3);
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
    assert_error(&v, "unauthenticated", "already used");
    assert_eq!(api.appliance_count().await, 1);
    let tenant_chain =
        api.state.store.audit_chains().await.unwrap().into_iter().find(|c| c.starts_with("ten_")).unwrap();
    let actions = api.audit_actions(&tenant_chain).await;
    assert!(actions.contains(&(AuditAction::ApplianceJoin.as_str().into(), "success".into())));
    assert!(actions.contains(&(AuditAction::ApplianceJoin.as_str().into(), "denied".into())));
}

#[tokio::test]
async fn expired_join_token_is_refused() {
    let api = api().await;
    let env = api.new_env("e").await;
    let token = api.join_token(&env).await;
    api.clock.advance(Duration::from_secs(15 * 60 + 1));
    let (s, v) = api.join(&token, &csr()).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_error(&v, "unauthenticated", "expired");
    assert_eq!(api.appliance_count().await, 0);
}

#[tokio::test]
async fn a_flood_of_one_kind_of_join_refusal_does_not_hide_another_from_the_audit() {
    let api = api().await;
    let env = api.new_env("e").await;
    let token = api.join_token(&env).await;
    // More malformed tokens in one second than the refusal audit takes of one kind.
    for _ in 0..crate::state::RefusalLimiter::PER_SECOND + 10 {
        let (s, _) = api.join("not-a-token", &csr()).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
    }
    // Then, in the same second, a refusal of another kind: a known token with a bad CSR.
    let (s, _) =
        api.join(&token, "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    api.state.audit_writer.flush().await;
    let reasons: Vec<String> = api
        .state
        .store
        .audit_records(crate::state::SYSTEM_CHAIN)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.unwrap().event)
        .filter(|e| e.action == AuditAction::ApplianceJoin.as_str())
        .map(|e| e.detail["reason"].as_str().unwrap_or_default().to_owned())
        .collect();
    let flooded = reasons.iter().filter(|r| !r.starts_with("CSR refused")).count();
    assert_eq!(flooded, crate::state::RefusalLimiter::PER_SECOND as usize, "the flood is limited: {reasons:?}");
    assert!(reasons.iter().any(|r| r.starts_with("CSR refused")), "the other kind is recorded: {reasons:?}");
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
    assert_error(&v, "bad_request", "expected an environment id");
    let env = api.new_env("e").await;
    let (s, _) = api.post(&format!("/v1/environments/{env}/join-tokens"), json!({ "ttl_seconds": 0 })).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}

/// One raw call through the router: status, headers and body.
async fn raw(api: &Api, req: Request<Body>) -> (StatusCode, http::HeaderMap, Value) {
    let resp = super::router(api.state.clone()).oneshot(req).await.unwrap();
    let (status, headers) = (resp.status(), resp.headers().clone());
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, headers, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

/// The document as served, and a concrete path for each templated one (ids that parse).
async fn served_document(api: &Api) -> Value {
    let (s, _, doc) = raw(api, Request::get("/v1/openapi.json").body(Body::empty()).unwrap()).await;
    assert_eq!(s, StatusCode::OK);
    doc
}

pub(super) fn concrete(path: &str) -> String {
    path.replace("{workspace}", &airlock_core::WorkspaceId::from_random([1; 16]).to_string())
        .replace("{environment}", &airlock_core::EnvironmentId::from_random([2; 16]).to_string())
        .replace("{appliance}", &airlock_core::ApplianceId::from_random([3; 16]).to_string())
        .replace("{id}", &op_id(4).to_string())
        .replace("{rollout}", &airlock_core::RolloutId::from_random([5; 16]).to_string())
        .replace("{sha256}", &"a".repeat(64))
        .replace("{key_id}", &"b".repeat(64))
        .replace("{token}", &airlock_core::id::TokenId::from_random([6; 16]).to_string())
        .replace("{rule}", &airlock_core::id::JoinRuleId::from_random([7; 16]).to_string())
        .replace("{mapping}", &airlock_core::id::RoleMappingId::from_random([8; 16]).to_string())
        .replace("{subject}", "alice")
}

const METHODS: [&str; 5] = ["get", "put", "post", "delete", "patch"];

/// The router and the document agree, both ways: every documented operation reaches its handler
/// (an anonymous call gets one of the statuses documented for it, never the fallback's), and
/// every other method on a documented path is a JSON 405 whose `Allow` lists exactly the
/// documented ones. (No route is added outside `routes()`, so no undocumented path exists.)
#[tokio::test]
async fn router_and_document_list_the_same_routes() {
    let api = api().await;
    let doc = served_document(&api).await;
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 19, "{:?}", paths.keys());
    assert!(
        paths[airlock_proto::join::JOIN_PATH]["post"].is_object(),
        "the join route is documented where appliances call it"
    );
    for (path, item) in paths {
        let uri = concrete(path);
        let documented: Vec<&str> = METHODS.into_iter().filter(|m| item.get(*m).is_some()).collect();
        assert!(!documented.is_empty(), "{path}");
        for method in METHODS {
            let req = Request::builder().method(method.to_uppercase().as_str()).uri(&uri).body(Body::empty()).unwrap();
            let (status, headers, body) = raw(&api, req).await;
            if let Some(op) = item.get(method) {
                let statuses = op["responses"].as_object().unwrap();
                assert!(statuses.contains_key(status.as_str()), "{method} {path}: {status} is not documented: {body}");
                assert_ne!(body["error"]["message"], "no such route; see /v1/openapi.json", "{method} {path}");
            } else {
                assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path} is routed but not documented");
                assert_error(&body, "method_not_allowed", "not allowed");
                let allow = headers[http::header::ALLOW].to_str().unwrap().to_ascii_lowercase();
                let mut allowed: Vec<&str> = allow.split(',').map(str::trim).filter(|m| *m != "head").collect();
                allowed.sort_unstable();
                let mut expected = documented.clone();
                expected.sort_unstable();
                assert_eq!(allowed, expected, "{path}: Allow is not the documented methods");
            }
        }
    }
}

/// What the contract promises of every route: errors have the error schema, ids their patterns,
/// request bodies refuse unknown fields (serde's `deny_unknown_fields`) and say so, and
/// response schemas are closed.
#[tokio::test]
async fn document_gives_every_error_id_and_body_its_exact_schema() {
    let api = api().await;
    let doc = served_document(&api).await;
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    let schema_of = |content: &Value| -> String {
        let r = content["application/json"]["schema"]["$ref"].as_str().unwrap_or_default();
        r.rsplit('/').next().unwrap().to_owned()
    };
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let at = format!("{method} {path}");
            for (status, resp) in op["responses"].as_object().unwrap() {
                if status.starts_with('4') || status.starts_with('5') {
                    assert_eq!(schema_of(&resp["content"]), "ErrorBody", "{at} {status}");
                }
                let name = schema_of(&resp["content"]);
                if let Some(schema) = schemas.get(&name).filter(|s| s["type"] == "object") {
                    assert_eq!(schema["additionalProperties"], false, "{at} {status}: response {name} is open");
                }
            }
            for param in op["parameters"].as_array().into_iter().flatten() {
                if param["in"] == "path" {
                    let pattern = param["schema"]["pattern"].as_str().unwrap_or_else(|| panic!("{at}: {param}"));
                    let re = regex::Regex::new(pattern).unwrap();
                    assert!(re.is_match(&concrete(&format!("{{{}}}", param["name"].as_str().unwrap()))), "{at}");
                    assert!(op["responses"]["404"].is_object() && op["responses"]["400"].is_object(), "{at}");
                }
            }
            if let Some(body) = op.get("requestBody") {
                // A raw byte body (an artifact upload) has no fields to close.
                if body["content"].get("application/octet-stream").is_none() {
                    let name = schema_of(&body["content"]);
                    assert_eq!(
                        schemas[&name]["additionalProperties"], false,
                        "{at}: request {name} accepts unknown fields"
                    );
                }
                for status in ["400", "413", "415"] {
                    assert!(op["responses"][status].is_object(), "{at} lacks {status}");
                }
            }
            assert!(op["responses"]["408"].is_object(), "{at} lacks 408");
            if op.get("security").is_some() {
                for status in ["401", "403", "503"] {
                    assert!(op["responses"][status].is_object(), "{at} lacks {status}");
                }
                assert!(op["responses"]["401"]["headers"]["WWW-Authenticate"].is_object(), "{at}");
            }
        }
    }
}

/// The request fields the document constrains are constrained exactly so by the server.
#[tokio::test]
async fn documented_field_constraints_are_the_servers() {
    let api = api().await;
    let doc = served_document(&api).await;
    let schemas = &doc["components"]["schemas"];
    let name =
        regex::Regex::new(schemas["CreateEnvironment"]["properties"]["name"]["pattern"].as_str().unwrap()).unwrap();
    let path = format!("/v1/workspaces/{}/environments", api.workspace);
    for candidate in ["a", "ok-1_2.3", &"n".repeat(64), &"n".repeat(65), "", "bad name!", "é", "a\n"] {
        let (s, v) = api.post(&path, json!({ "name": candidate })).await;
        assert_eq!(s == StatusCode::CREATED, name.is_match(candidate), "{candidate:?}: {s} {v}");
    }
    let ttl = &schemas["CreateJoinToken"]["properties"]["ttl_seconds"];
    let (min, max) = (ttl["minimum"].as_u64().unwrap(), ttl["maximum"].as_u64().unwrap());
    let env = api.new_env("ttl").await;
    for (seconds, ok) in [(min - 1, false), (min, true), (max, true), (max + 1, false)] {
        let (s, v) = api.post(&format!("/v1/environments/{env}/join-tokens"), json!({ "ttl_seconds": seconds })).await;
        assert_eq!(s == StatusCode::CREATED, ok, "{seconds}: {s} {v}");
    }
}

/// A body that is not JSON, not declared JSON, or too large gets our error body with the status
/// the document gives it.
#[tokio::test]
async fn body_rejections_are_json_errors_with_their_documented_status() {
    let api = api().await;
    let path = format!("/v1/workspaces/{}/environments", api.workspace);
    let post = |content_type: Option<&str>, body: Vec<u8>| {
        let mut req = Request::post(&path).header("authorization", format!("Bearer {}", api.token));
        if let Some(t) = content_type {
            req = req.header("content-type", t);
        }
        req.body(Body::from(body)).unwrap()
    };
    let (s, _, v) = raw(&api, post(Some("text/plain"), b"{\"name\": \"a\"}".to_vec())).await;
    assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_error(&v, "unsupported_media_type", "application/json");
    let (s, _, v) = raw(&api, post(None, b"{\"name\": \"a\"}".to_vec())).await;
    assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_error(&v, "unsupported_media_type", "application/json");
    let (s, _, v) = raw(&api, post(Some("application/json"), b"{\"name\": ".to_vec())).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_error(&v, "bad_request", "malformed request body");
    let huge = format!("{{\"name\": \"{}\"}}", "a".repeat(3 << 20)).into_bytes();
    let (s, _, v) = raw(&api, post(Some("application/json"), huge)).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert_error(&v, "payload_too_large", "too large");
    // A path segment that is not UTF-8 once decoded is our 400, not axum's text.
    let bad = Request::get("/v1/workspaces/%FF/environments")
        .header("authorization", format!("Bearer {}", api.token))
        .body(Body::empty())
        .unwrap();
    let (s, _, v) = raw(&api, bad).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_error_shape(&v);
}

#[tokio::test]
async fn health_ready_and_metrics_answer() {
    let api = api().await;
    assert_eq!(api.call(Method::GET, "/healthz", None, None).await.0, StatusCode::OK);
    assert_eq!(api.call(Method::GET, "/readyz", None, None).await.0, StatusCode::OK);
    // Metrics count fleet-wide, so anonymous callers get 401 and any token holder the text.
    let (s, _, v) = raw(&api, Request::builder().uri("/metrics").body(Body::empty()).unwrap()).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_error(&v, "unauthenticated", "bearer");
    let req = Request::builder()
        .uri("/metrics")
        .header("authorization", format!("Bearer {}", api.token))
        .body(Body::empty())
        .unwrap();
    let resp = super::router(api.state.clone()).oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let text = String::from_utf8(resp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    assert!(text.contains("airlock_gateway_appliances_connected"), "{text}");

    // An address displacing or refused its own connections is counted but is not shedding: one peer
    // must not hold /readyz at 503.
    api.state.metrics.connections.shed("api", crate::net::Shed::AddressEvicted);
    api.state.metrics.connections.shed("gateway", crate::net::Shed::AddressFull);
    assert_eq!(raw(&api, Request::builder().uri("/readyz").body(Body::empty()).unwrap()).await.0, StatusCode::OK);
    let text = api.state.metrics.render();
    assert!(text.contains("airlock_shed_connections_total{listener=\"api\",reason=\"address_evicted\"} 1"), "{text}");
    assert!(text.contains("airlock_shed_connections_total{listener=\"gateway\",reason=\"address_full\"} 1"), "{text}");
    // A listener whose pool is full makes /readyz say so, and /metrics count it.
    api.state.metrics.connections.shed("api", crate::net::Shed::Evicted);
    let (s, _, v) = raw(&api, Request::builder().uri("/readyz").body(Body::empty()).unwrap()).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_error(&v, "shedding", "shedding");
    assert!(
        api.state.metrics.render().contains("airlock_shed_connections_total{listener=\"api\",reason=\"evicted\"} 1"),
        "{}",
        api.state.metrics.render()
    );
}

#[tokio::test]
async fn each_route_takes_bodies_up_to_its_limit_and_413_past_it() {
    let api = api().await;
    let post = |path: &str, declared: bool, len: usize| {
        let body = format!("{{\"pad\": \"{}\"}}", "a".repeat(len));
        let mut req = Request::post(path)
            .header("authorization", format!("Bearer {}", api.token))
            .header("content-type", "application/json");
        if declared {
            req = req.header("content-length", body.len());
        }
        req.body(Body::from(body)).unwrap()
    };
    // The join route: a few KiB is fine (refused for what it says, not its size), 17 KiB is not, whether
    // the length is declared (refused before reading) or not (refused once the bytes pass the limit).
    for declared in [true, false] {
        let (s, _, _) = raw(&api, post("/v1/join", declared, 4 * 1024)).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "declared {declared}");
        let (s, _, v) = raw(&api, post("/v1/join", declared, 17 * 1024)).await;
        assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "declared {declared}");
        assert_error(&v, "payload_too_large", "too large");
    }
    // Other routes take up to `BODY_LIMIT` (a template at core's caps, escaped: about 2 MiB).
    let path = format!("/v1/workspaces/{}/environments", api.workspace);
    let (s, _, _) = raw(&api, post(&path, true, 512 * 1024)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _, v) = raw(&api, post(&path, false, crate::api::BODY_LIMIT + 1)).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert_error(&v, "payload_too_large", "too large");
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

// ---------- templates and operations ----------

const TEMPLATE: &str = r#"
name = "restart-service"
description = "Restart one service"
phase = "operate"
data_tags = ["service:restart"]
body = "restart.sh"

[[variables]]
name = "service"
pattern = "[a-z][a-z0-9-]{0,40}"
"#;
const SCRIPT: &str = "#!/bin/sh\nsystemctl restart \"$AIRLOCK_VAR_SERVICE\"\n";

/// The customer key ([`customer::key`]) the fixture's customer signs with.
const CUSTOMER: u8 = 42;

impl Api {
    async fn push_template(&self, manifest: &str, script: &str) -> (StatusCode, Value) {
        let body = json!({ "manifest_toml": manifest, "script": script });
        self.post(&format!("/v1/workspaces/{}/templates", self.workspace), body).await
    }

    /// An environment with one joined appliance: (environment, appliance).
    async fn env_with_appliance(&self, name: &str) -> (String, String) {
        let env = self.new_env(name).await;
        let (s, joined) = self.join(&self.join_token(&env).await, &csr()).await;
        assert_eq!(s, StatusCode::OK, "{joined}");
        (env, joined["appliance_id"].as_str().unwrap().to_owned())
    }

    async fn request_op(&self, env: &str, vars: Value) -> (StatusCode, Value) {
        let body = json!({ "template": "restart-service", "vars": vars, "reason": "ticket 42: api is stuck" });
        self.post(&format!("/v1/environments/{env}/operations"), body).await
    }

    /// A pushed template, an environment with one appliance, and one operation on it.
    async fn operation(&self) -> Value {
        let (s, v) = self.push_template(TEMPLATE, SCRIPT).await;
        assert!(s == StatusCode::CREATED || s == StatusCode::OK, "{v}");
        let (env, _) = self.env_with_appliance(&format!("e{}", rand_suffix())).await;
        let (s, op) = self.request_op(&env, json!({ "service": "api" })).await;
        assert_eq!(s, StatusCode::CREATED, "{op}");
        op
    }

    async fn tenant_chain(&self) -> String {
        self.state.store.audit_chains().await.unwrap().into_iter().find(|c| c.starts_with("ten_")).unwrap()
    }
}

fn rand_suffix() -> String {
    data_encoding::HEXLOWER.encode(&crate::state::random::<4>())
}

/// The customer's grant for an operation as the API shows it, with `edit` applied to its body.
fn grant_for(op: &Value, edit: impl FnOnce(&mut Value)) -> Value {
    let mut body = json!({
        "request_id": op["id"],
        "appliance": op["appliance"],
        "phase": op["phase"],
        "request_digest": op["request_digest"],
        "command_sha256": op["command_sha256"],
        "decision": "approve",
        "decided_at": 1_800_000_000_000_i64,
        "approver": "alice@customer",
        "reason": "ok",
        "not_before": 1_800_000_000_000_i64,
        "not_after": 1_800_003_600_000_i64,
        "nonce": "n-1",
    });
    edit(&mut body);
    let env = customer::sign(airlock_core::grant::GRANT_PAYLOAD_TYPE, serde_json::to_vec(&body).unwrap(), &[CUSTOMER]);
    serde_json::from_str(&env.to_json()).unwrap()
}

#[tokio::test]
async fn template_push_list_versions_and_bad_templates() {
    let api = api().await;
    let (s, first) = api.push_template(TEMPLATE, SCRIPT).await;
    assert_eq!(s, StatusCode::CREATED, "{first}");
    assert_eq!(first["name"], "restart-service");
    assert_eq!(first["phase"], "operate");
    assert_eq!(first["data_tags"], json!(["service:restart"]));
    assert_eq!(
        first["variables"][0],
        json!({ "name": "service", "type": "string", "pattern": "[a-z][a-z0-9-]{0,40}" })
    );
    assert!(first["created_at"].is_i64(), "{first}");
    // The same content again: 200, unchanged.
    let (s, again) = api.push_template(TEMPLATE, SCRIPT).await;
    assert_eq!(s, StatusCode::OK, "{again}");
    assert_eq!(again["content_sha256"], first["content_sha256"]);

    // An operation on the first version, then a new version.
    let (env, _) = api.env_with_appliance("prod").await;
    let (s, op) = api.request_op(&env, json!({ "service": "api" })).await;
    assert_eq!(s, StatusCode::CREATED, "{op}");
    let (s, second) = api.push_template(TEMPLATE, &SCRIPT.replace("restart", "reload")).await;
    assert_eq!(s, StatusCode::CREATED, "{second}");
    assert_ne!(second["content_sha256"], first["content_sha256"]);
    let (s, list) = api.get(&format!("/v1/workspaces/{}/templates", api.workspace)).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(list["templates"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list["templates"][0]["content_sha256"], second["content_sha256"]);
    // The older request still names (and resolves) the version it was rendered from.
    let (_, old) = api.get(&format!("/v1/operations/{}", op["id"].as_str().unwrap())).await;
    assert_eq!(old["template_sha256"], first["content_sha256"]);
    let (_, new) = api.request_op(&env, json!({ "service": "api" })).await;
    assert_eq!(new["template_sha256"], second["content_sha256"]);
    assert_ne!(new["command_sha256"], old["command_sha256"]);

    // Invalid templates: 400 with the template error; nothing stored.
    for (manifest, script, expect) in [
        (TEMPLATE.replace("restart-service", "Restart Service"), SCRIPT, "name"),
        (TEMPLATE.replace("phase = \"operate\"", "phase = \"root\""), SCRIPT, "unknown variant"),
        ("not toml [".to_owned(), SCRIPT, "template.toml"),
        (TEMPLATE.replace("restart-service", "other"), "  ", "empty"),
    ] {
        let (s, v) = api.push_template(&manifest, script).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        assert_error_shape(&v);
        assert_error(&v, "bad_request", expect);
    }
    // Over a limit: 422 `limit_exceeded`, and refused before any pattern compiles.
    let costly = TEMPLATE.replace("[a-z][a-z0-9-]{0,40}", r"\\w{100}");
    let many: String =
        (0..=airlock_core::template::MAX_VARIABLES).map(|i| format!("[[variables]]\nname = \"v{i}\"\n")).collect();
    for (manifest, expect) in
        [(costly, "compiles past the limit"), (format!("{TEMPLATE}\n{many}"), "variables; at most")]
    {
        let (s, v) = api.push_template(&manifest, SCRIPT).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
        assert_error(&v, "limit_exceeded", expect);
    }
    let (s, v) = api.post(&format!("/v1/workspaces/{}/templates", api.workspace), json!({ "script": "x" })).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let (_, list) = api.get(&format!("/v1/workspaces/{}/templates", api.workspace)).await;
    assert_eq!(list["templates"].as_array().unwrap().len(), 1);
    let actions = api.audit_actions(&api.tenant_chain().await).await;
    assert_eq!(actions.iter().filter(|(a, o)| a == AuditAction::TemplatePush.as_str() && o == "success").count(), 3);
    assert!(actions.contains(&(AuditAction::TemplatePush.as_str().into(), "error".into())));
}

#[tokio::test]
async fn operation_request_checks_template_vars_and_appliance() {
    let api = api().await;
    api.push_template(TEMPLATE, SCRIPT).await;
    let empty = api.new_env("empty").await;
    let (s, v) = api.request_op(&empty, json!({ "service": "api" })).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_error(&v, "bad_request", "no active appliance");

    let (env, appliance) = api.env_with_appliance("prod").await;
    for (vars, expect) in [
        (json!({ "service": "api; rm -rf /" }), "does not match"),
        (json!({}), "required"),
        (json!({ "service": "api", "extra": "1" }), "no variable `extra`"),
    ] {
        let (s, v) = api.request_op(&env, vars).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        assert_error(&v, "bad_request", expect);
    }
    let body = json!({ "template": "nope", "vars": {}, "reason": "x" });
    let (s, _) = api.post(&format!("/v1/environments/{env}/operations"), body).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let body = json!({ "template": "restart-service", "vars": { "service": "api" }, "reason": "  " });
    let (s, _) = api.post(&format!("/v1/environments/{env}/operations"), body).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let body = json!({ "template": "restart-service", "vars": { "service": "api" }, "reason": "x",
        "appliance": "apl_aaaaaaaaaaaaaaaaaaaaaaaaaa" });
    let (s, v) = api.post(&format!("/v1/environments/{env}/operations"), body).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_error(&v, "bad_request", "not an active appliance");
    let (_, none) = api.get("/v1/operations").await;
    assert!(none["operations"].as_array().unwrap().is_empty(), "{none}");

    let (s, op) = api.request_op(&env, json!({ "service": "api" })).await;
    assert_eq!(s, StatusCode::CREATED, "{op}");
    let id = op["id"].as_str().unwrap();
    assert!(id.parse::<airlock_core::OperationId>().is_ok(), "{id}");
    assert_eq!(op["state"], "awaiting_approval");
    assert_eq!(op["appliance"], appliance.as_str());
    assert_eq!(op["environment"], env.as_str());
    assert_eq!(op["vars"], json!({ "service": "api" }));
    assert_eq!(op["command"]["env"]["AIRLOCK_VAR_SERVICE"], "api");
    assert_eq!(op["output_released"], false);
    let request: airlock_core::grant::OperationRequest = serde_json::from_value(op["request"].clone()).unwrap();
    assert_eq!(op["request_digest"], request.digest_hex());
    assert_eq!(request.kind, "restart-service");
    let actions = api.audit_actions(&api.tenant_chain().await).await;
    assert!(actions.contains(&(AuditAction::OperationRequest.as_str().into(), "success".into())));

    // Filters.
    let (_, listed) = api.get(&format!("/v1/operations?state=awaiting_approval&environment={env}")).await;
    assert_eq!(listed["operations"].as_array().unwrap().len(), 1);
    let (_, listed) = api.get("/v1/operations?state=approved").await;
    assert!(listed["operations"].as_array().unwrap().is_empty());
    let (s, _) = api.get("/v1/operations?state=finished").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (_, v) = api.get(&format!("/v1/operations/{id}/output")).await;
    assert_eq!(v["error"]["code"], "not_found", "{v}");
}

#[tokio::test]
async fn states_and_ids_parse_strictly() {
    let api = api().await;
    // An operation id is parsed before anything is looked up: anything but `op_` and 32
    // lowercase hex digits is a 400, a well-formed unknown one a 404.
    let id = op_id(0xab);
    for bad in
        ["op_1", "op_", "op_ABABABABABABABABABABABABABABABAB", "xx_abababababababababababababababab", &format!("{id}0")]
    {
        for path in [format!("/v1/operations/{bad}"), format!("/v1/operations/{bad}/manifest")] {
            let (s, v) = api.get(&path).await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{path}: {v}");
            assert_error(&v, "bad_request", "an operation id");
        }
    }
    let (s, v) = api.get(&format!("/v1/operations/{id}")).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    // Every state the server writes can be asked for; anything else is refused, not ignored.
    for st in airlock_core::operation::OperationState::ALL {
        let (s, v) = api.get(&format!("/v1/operations?state={st}")).await;
        assert_eq!(s, StatusCode::OK, "{st}: {v}");
    }
    let (s, v) = api.get("/v1/operations?state=done").await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_error(&v, "bad_request", "unknown operation state `done`");
}

#[tokio::test]
async fn other_tenants_operations_and_environments_are_invisible() {
    let api = api().await;
    let op = api.operation().await;
    let id = op["id"].as_str().unwrap();
    let env = op["environment"].as_str().unwrap();
    let dir = api._dir.path();
    let other =
        crate::create_tenant(dir, &KekSource::default_for(dir), "globex", "default", &*api.clock).await.unwrap();
    let b = other.admin_token.expose();
    for path in [
        format!("/v1/operations/{id}"),
        format!("/v1/operations/{id}/manifest"),
        format!("/v1/operations/{id}/output"),
        format!("/v1/workspaces/{}/templates", api.workspace),
    ] {
        let (s, v) = api.call(Method::GET, &path, Some(b), None).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{path}: {v}");
        assert_error_shape(&v);
    }
    // Another tenant's environment is 404, even with a template of the same name of its own.
    let push = json!({ "manifest_toml": TEMPLATE, "script": SCRIPT }).to_string();
    let (s, _) =
        api.call(Method::POST, &format!("/v1/workspaces/{}/templates", other.workspace), Some(b), Some(&push)).await;
    assert_eq!(s, StatusCode::CREATED);
    let body = json!({ "template": "restart-service", "vars": { "service": "api" }, "reason": "x" }).to_string();
    let (s, _) = api.call(Method::POST, &format!("/v1/environments/{env}/operations"), Some(b), Some(&body)).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let approval = json!({ "envelope": grant_for(&op, |_| {}) }).to_string();
    let (s, _) = api.call(Method::POST, &format!("/v1/operations/{id}/approval"), Some(b), Some(&approval)).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (_, list) = api.call(Method::GET, "/v1/operations", Some(b), None).await;
    assert!(list["operations"].as_array().unwrap().is_empty(), "{list}");
    // Tenant A's operation is untouched.
    let (_, mine) = api.get(&format!("/v1/operations/{id}")).await;
    assert_eq!(mine["state"], "awaiting_approval");
}

#[tokio::test]
async fn approval_relay_checks_structure_binding_and_state() {
    let api = api().await;
    let op = api.operation().await;
    let id = op["id"].as_str().unwrap();
    let path = format!("/v1/operations/{id}/approval");
    let wrong_type = {
        let payload = serde_json::to_vec(&json!({ "request_id": id })).unwrap();
        let env = customer::sign(airlock_core::operation::RELEASE_PAYLOAD_TYPE, payload, &[CUSTOMER]);
        serde_json::from_str::<Value>(&env.to_json()).unwrap()
    };
    let unsigned = {
        let mut g = grant_for(&op, |_| {});
        g["signatures"] = json!([]);
        g
    };
    for (envelope, expect) in [
        (grant_for(&op, |b| b["request_digest"] = json!("00".repeat(32))), "request digest"),
        (grant_for(&op, |b| b["command_sha256"] = json!("11".repeat(32))), "command"),
        (grant_for(&op, |b| b["appliance"] = json!("apl_aaaaaaaaaaaaaaaaaaaaaaaaaa")), "appliance"),
        (grant_for(&op, |b| b["request_id"] = json!(op_id(0))), "request id"),
        (grant_for(&op, |b| b["phase"] = json!("observe")), "phase"),
        (grant_for(&op, |b| b["decision"] = json!("maybe")), "does not parse"),
        (wrong_type, "not an approval"),
        (json!({ "payload": "QQ==".repeat(20_000), "payloadType": "x", "signatures": [] }), "larger than"),
        (unsigned, "no signature"),
        (json!({ "payload": 5 }), "not a DSSE envelope"),
    ] {
        let (s, v) = api.post(&path, json!({ "envelope": envelope })).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{expect}: {v}");
        assert_error(&v, "bad_request", expect);
    }
    let (_, still) = api.get(&format!("/v1/operations/{id}")).await;
    assert_eq!(still["state"], "awaiting_approval");
    assert!(still["approval"].is_null());

    let good = grant_for(&op, |_| {});
    let (s, v) = api.post(&path, json!({ "envelope": good })).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["state"], "approved");
    assert_eq!(v["approval"], good);
    // A second approval, even a valid one, is a conflict.
    let (s, v) = api.post(&path, json!({ "envelope": grant_for(&op, |b| b["nonce"] = json!("n-2")) })).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert_error_shape(&v);
    let (_, after) = api.get(&format!("/v1/operations/{id}")).await;
    assert_eq!(after["approval"], good);

    // A denial is relayed too and leaves the operation denied.
    let op2 = api.operation().await;
    let deny = grant_for(&op2, |b| b["decision"] = json!("deny"));
    let (s, v) = api
        .post(&format!("/v1/operations/{}/approval", op2["id"].as_str().unwrap()), json!({ "envelope": deny }))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["state"], "denied");
    let actions = api.audit_actions(&api.tenant_chain().await).await;
    assert_eq!(
        actions.iter().filter(|(a, o)| a == AuditAction::OperationApprovalRelayed.as_str() && o == "success").count(),
        2
    );
}

#[tokio::test]
async fn manifest_request_verifies_against_the_ca_even_after_a_restart() {
    use airlock_core::operation::{
        Manifest, REQUEST_PAYLOAD_TYPE, VerifyInputs, verify_certified_envelope, verify_parsed_manifest,
    };
    let api = api().await;
    let op = api.operation().await;
    let id = op["id"].as_str().unwrap();
    let (s, v) =
        api.post(&format!("/v1/operations/{id}/approval"), json!({ "envelope": grant_for(&op, |_| {}) })).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, m) = api.get(&format!("/v1/operations/{id}/manifest")).await;
    assert_eq!(s, StatusCode::OK, "{m}");
    let manifest: Manifest = serde_json::from_value(m).unwrap();
    let ca_der = api.state.ca.cert_der().as_ref().to_vec();
    let at = Timestamp::from_unix_millis(op["requested_at"].as_i64().unwrap());
    let certified = verify_certified_envelope(
        &manifest.request,
        REQUEST_PAYLOAD_TYPE,
        &manifest.control_plane_certificate,
        &ca_der,
        at,
    )
    .unwrap();
    assert_eq!(certified.uris, vec!["spiffe://airlock.test/control-plane".to_owned()]);
    let keys = customer::public_keys(&[CUSTOMER]);
    let report = verify_parsed_manifest(
        &manifest,
        &VerifyInputs {
            ca_der: &ca_der,
            customer_keys: &keys,
            approvals_required: 1,
            policy: None,
            vendor_attested: airlock_core::operation::VendorAttested::Refuse,
        },
    )
    .unwrap();
    assert!(report.checks.contains(&"approval.binding"), "{:?}", report.checks);
    assert_eq!(report.request.request.id.to_string(), id);

    // A request signed by another CA's key does not verify against this CA.
    let (other_ca, _) = crate::ca::CertificateAuthority::generate("airlock.test", at).unwrap();
    assert!(
        verify_certified_envelope(
            &manifest.request,
            REQUEST_PAYLOAD_TYPE,
            &manifest.control_plane_certificate,
            other_ca.cert_der(),
            at
        )
        .is_err()
    );

    // After a restart the signing key is new, but old manifests still verify.
    let restarted = crate::test_state(api._dir.path(), api.clock.clone()).await;
    assert_ne!(restarted.ops_signer.cert_pem(), api.state.ops_signer.cert_pem());
    let req = Request::builder()
        .uri(format!("/v1/operations/{id}/manifest"))
        .header("authorization", format!("Bearer {}", api.token))
        .body(Body::empty())
        .unwrap();
    let resp = super::router(restarted).oneshot(req).await.unwrap();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let again: Manifest = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(again, manifest);
    verify_parsed_manifest(
        &again,
        &VerifyInputs {
            ca_der: &ca_der,
            customer_keys: &keys,
            approvals_required: 1,
            policy: None,
            vendor_attested: airlock_core::operation::VendorAttested::Refuse,
        },
    )
    .unwrap();
}

/// A customer policy with `serial`, as `airlock customer policy sign` writes it.
fn signed_policy(env: &str, serial: u64, signers: &[u8]) -> Value {
    let toml = format!("version = 1\nserial = {serial}\nenvironment = \"{env}\"\nphases = [\"observe\", \"deploy\"]\n");
    serde_json::from_str(&customer::signed_policy(&toml, signers)).unwrap()
}

#[tokio::test]
async fn policy_relay_checks_shape_and_serial_and_stores_it_unchanged() {
    let api = api().await;
    let env = api.new_env("prod").await;
    let path = format!("/v1/environments/{env}/policy");
    let put = |body: Value| {
        let path = path.clone();
        let api = &api;
        async move { api.call(Method::PUT, &path, Some(&api.token), Some(&body.to_string())).await }
    };
    // Nothing relayed yet.
    let (s, v) = api.get(&path).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    assert_eq!(v["error"]["code"], "not_found");

    // Shape: a policy envelope, signed at least once, whose policy parses.
    let mut unsigned = signed_policy(&env, 3, &[1]);
    unsigned["signatures"] = json!([]);
    let mut other_type = signed_policy(&env, 3, &[1]);
    other_type["payloadType"] = json!(airlock_core::grant::GRANT_PAYLOAD_TYPE);
    let mut not_a_policy = signed_policy(&env, 3, &[1]);
    not_a_policy["payload"] = json!(data_encoding::BASE64.encode(b"version = 1\nserial = 3\nphases = [\"root\"]\n"));
    let mut huge = signed_policy(&env, 3, &[1]);
    // Signed by the customer for another environment, or for none: the vendor must not be able
    // to replay it here.
    let other_env = api.new_env("staging").await;
    let mut nowhere = signed_policy(&env, 3, &[1]);
    nowhere["payload"] = json!(data_encoding::BASE64.encode(b"version = 1\nserial = 3\nphases = [\"observe\"]\n"));
    huge["payload"] = json!(data_encoding::BASE64.encode(&vec![b'#'; 300 * 1024]));
    for (bad, why) in [
        (json!({ "envelope": unsigned }), "not signed"),
        (json!({ "envelope": other_type }), "payload type"),
        (json!({ "envelope": not_a_policy }), "policy"),
        (json!({ "envelope": huge }), "larger than"),
        (json!({ "envelope": { "payload": 1 } }), "DSSE"),
        (json!({ "policy": "x" }), "malformed"),
        (json!({ "envelope": signed_policy(&other_env, 3, &[1]) }), "is for environment"),
        (json!({ "envelope": nowhere }), "must name the environment"),
    ] {
        let (s, v) = put(bad).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{why}: {v}");
        assert_error(&v, "bad_request", why);
    }
    let (s, _) = api.get(&path).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // Any signature passes here (the control plane has no customer key to check it with):
    // the appliance is where it is verified.
    let first = signed_policy(&env, 3, &[1]);
    let (s, v) = put(json!({ "envelope": first })).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["serial"], 3);
    assert_eq!(v["sent_to"], 0);
    let (s, shown) = api.get(&path).await;
    assert_eq!(s, StatusCode::OK, "{shown}");
    assert_eq!(shown["envelope"], first);
    assert_eq!(shown["serial"], 3);
    let payload = data_encoding::BASE64.decode(first["payload"].as_str().unwrap().as_bytes()).unwrap();
    assert_eq!(shown["policy_sha256"], airlock_core::operation::sha256_hex(&payload));

    // The serial must move forward: the same or an older one is a conflict, and changes nothing.
    for serial in [3, 2] {
        let (s, v) = put(json!({ "envelope": signed_policy(&env, serial, &[2]) })).await;
        assert_eq!(s, StatusCode::CONFLICT, "{v}");
        assert_error(&v, "conflict", "serial 3");
    }
    assert_eq!(api.get(&path).await.1["envelope"], first);
    let newer = signed_policy(&env, 4, &[1, 2]);
    let (s, v) = put(json!({ "envelope": newer })).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(api.get(&path).await.1["envelope"], newer);

    let actions = api.audit_actions(&tenant_of(&api).await).await;
    let relayed: Vec<_> = actions.iter().filter(|(a, _)| a == AuditAction::PolicyRelayed.as_str()).collect();
    assert_eq!(relayed.iter().filter(|(_, o)| o == "success").count(), 2, "{actions:?}");
    assert_eq!(relayed.iter().filter(|(_, o)| o != "success").count(), 10, "{actions:?}");
}

/// The tenant chain of the fixture's admin token.
pub(super) async fn tenant_of(api: &Api) -> String {
    let chains = api.state.store.audit_chains().await.unwrap();
    chains.into_iter().find(|c| c != crate::state::SYSTEM_CHAIN).unwrap()
}

#[tokio::test]
async fn another_tenants_environment_policy_is_invisible_and_unwritable() {
    let api = api().await;
    let env_a = api.new_env("a").await;
    let path = format!("/v1/environments/{env_a}/policy");
    let (s, v) = api
        .call(
            Method::PUT,
            &path,
            Some(&api.token),
            Some(&json!({ "envelope": signed_policy(&env_a.to_string(), 5, &[1]) }).to_string()),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let dir = api._dir.path();
    let other =
        crate::create_tenant(dir, &KekSource::default_for(dir), "globex", "default", &*api.clock).await.unwrap();
    let b = other.admin_token.expose();
    let (s, v) = api.call(Method::GET, &path, Some(b), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    let body = json!({ "envelope": signed_policy(&env_a.to_string(), 9, &[7]) }).to_string();
    let (s, v) = api.call(Method::PUT, &path, Some(b), Some(&body)).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    // Tenant A's policy is unchanged.
    assert_eq!(api.get(&path).await.1["serial"], 5);
    // And an environment that does not exist at all: 404 too.
    let missing = format!("/v1/environments/{}/policy", airlock_core::EnvironmentId::from_random([9; 16]));
    let (s, _) = api.call(Method::PUT, &missing, Some(&api.token), Some(&body)).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

/// Concurrent reads all land in the chain, which still verifies; a sensitive read's record
/// is committed by the time it is answered, a routine read's by the next group commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reads_are_all_audited_and_sensitive_ones_are_durable_when_answered() {
    let api = api().await;
    let calls = (0..120_u8).map(|i| {
        let path =
            if i % 2 == 0 { "/v1/appliances".to_owned() } else { format!("/v1/operations/{}/manifest", op_id(i)) };
        let api = &api;
        async move { api.get(&path).await.0 }
    });
    let statuses = futures_util::future::join_all(calls).await;
    assert_eq!(statuses.iter().filter(|s| **s == StatusCode::OK).count(), 60);
    assert_eq!(statuses.iter().filter(|s| **s == StatusCode::NOT_FOUND).count(), 60);

    let chain = api.tenant_chain().await;
    // No flush yet: every manifest read was answered after its own record's commit.
    let committed = api.state.store.audit_records(&chain).await.unwrap();
    let manifests = committed
        .iter()
        .filter(|r| r.as_ref().unwrap().event.action == AuditAction::OperationManifest.as_str())
        .count();
    assert_eq!(manifests, 60);

    // Every routine read is counted: repeats of one within a batch share a record (`repeated`).
    api.state.audit_writer.flush().await;
    let lists: u64 = (api.state.store.audit_records(&chain).await.unwrap().into_iter())
        .map(|r| r.unwrap().event)
        .filter(|e| e.action == AuditAction::ApplianceList.as_str())
        .map(|e| e.detail["repeated"].as_u64().unwrap_or(1))
        .sum();
    assert_eq!(lists, 60);
    for (chain, result) in crate::store::verify_all_chains(&api.state.store).await.unwrap() {
        assert!(result.is_ok(), "{chain}: {result:?}");
    }
    // Far fewer commits than records: the reads shared transactions.
    assert!(api.state.metrics.audit.commits.get() < 120, "{}", api.state.metrics.audit.commits.get());
}

/// When the audit cannot be written, a sensitive read is refused rather than answered
/// unrecorded; a routine read is answered and its lost record is counted.
#[tokio::test]
async fn a_failing_audit_commit_refuses_sensitive_reads_and_counts_lost_routine_ones() {
    use sqlx::ConnectOptions;
    let api = api().await;
    let db = api._dir.path().join(crate::store::DB_FILE_NAME);
    let mut conn = sqlx::sqlite::SqliteConnectOptions::new().filename(db).connect().await.unwrap();
    sqlx::raw_sql(
        "CREATE TRIGGER fail_audit BEFORE INSERT ON audit_events BEGIN SELECT RAISE(ABORT, 'injected'); END;",
    )
    .execute(&mut conn)
    .await
    .unwrap();

    let (s, v) = api.get(&format!("/v1/operations/{}/manifest", op_id(1))).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_error(&v, "unavailable", "retry later");
    let (s, v) = api.get("/v1/appliances").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    api.state.audit_writer.flush().await;
    assert_eq!(api.state.metrics.audit.queued_records_lost.get(), 1);
    assert!(api.state.metrics.render().contains("airlock_audit_queued_records_lost_total 1"));
}

#[tokio::test]
async fn ca_document_publishes_the_audit_key_beside_the_certificate() {
    let api = api().await;
    let (s, v) = api.call(Method::GET, "/v1/ca", None, None).await;
    assert_eq!(s, StatusCode::OK);
    let published = std::fs::read_to_string(api._dir.path().join(crate::store::AUDIT_KEY_FILE_NAME)).unwrap();
    assert_eq!(v["audit_key"], published.as_str(), "{v}");
    assert!(airlock_core::customer_key::CustomerPublicKey::from_pem(&published).is_ok());
}

mod workspace_ids;
