//! The one authorization path, end to end in memory: the router walk, the isolation matrix, scoped tokens and their lifecycle, failure limits.

use std::time::Duration;

use airlock_core::audit::AuditAction;
use axum::body::Body;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

use super::super::tests::{Api, api, assert_error, concrete, csr, tenant_of};
use super::{Access, ROUTES, route_access};
use crate::authz::ResourceKind;
use crate::keys::KekSource;

/// Every documented route and method, from the served document (the same list the router is built from).
fn document_routes() -> Vec<(Method, String)> {
    let doc = serde_json::to_value(super::super::document()).unwrap();
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            out.push((method.to_uppercase().parse::<Method>().unwrap(), path.clone()));
        }
    }
    out
}

#[test]
fn every_route_has_exactly_one_entry_in_the_action_table() {
    let routes = document_routes();
    assert!(routes.len() >= 40, "{routes:?}");
    for (method, path) in &routes {
        let entries = ROUTES.iter().filter(|(m, p, _)| m == method && p == path).count();
        assert_eq!(entries, 1, "{method} {path} has {entries} entries in access::ROUTES");
        if let Some(Access::Api(action)) = route_access(method, path) {
            // The decision reads the resource from the path: the route must name it.
            let needs = match action.resource_kind() {
                ResourceKind::Tenant => None,
                ResourceKind::Workspace => Some("{workspace}"),
                ResourceKind::Environment => Some("{environment}"),
                ResourceKind::Operation => Some("{id}"),
                ResourceKind::Rollout => Some("{rollout}"),
                ResourceKind::Appliance => Some("{appliance}"),
                // Its workspace is in the query, not the path.
                ResourceKind::Listing => None,
            };
            assert!(needs.is_none_or(|p| path.contains(p)), "{method} {path}: {action:?} needs {needs:?}");
        }
    }
    for (method, path, _) in ROUTES {
        assert!(routes.iter().any(|(m, p)| m == method && p == path), "{method} {path} is in the table but not routed");
    }
}

#[tokio::test]
async fn a_route_missing_from_the_table_is_refused_as_a_bug() {
    let api = api().await;
    let router = axum::Router::new()
        .route("/v1/forgotten", axum::routing::get(|| async { "handler work" }))
        .route_layer(axum::middleware::from_fn_with_state(api.state.clone(), super::gate))
        .with_state(api.state.clone());
    let req =
        Request::get("/v1/forgotten").header("authorization", format!("Bearer {}", api.token)).body(Body::empty());
    let resp = router.oneshot(req.unwrap()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let body: Value = serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(body["error"]["code"], "unmapped_route");
}

/// A handler registered under a method the table does not map for its path (`DELETE /v1/workspaces`, where only
/// `GET` is mapped) must not be reached, with or without a credential: the gate answers 405 itself.
#[tokio::test]
async fn a_handler_under_a_method_the_table_lacks_is_never_reached() {
    let api = api().await;
    let router = axum::Router::new()
        .route(
            "/v1/workspaces",
            axum::routing::get(|| async { "listed" }).delete(|| async { "handler work: every workspace deleted" }),
        )
        .route_layer(axum::middleware::from_fn_with_state(api.state.clone(), super::gate))
        .with_state(api.state.clone());
    for credential in [None, Some(format!("Bearer {}", api.token))] {
        let mut req = Request::delete("/v1/workspaces");
        if let Some(c) = &credential {
            req = req.header("authorization", c);
        }
        let resp = router.clone().oneshot(req.body(Body::empty()).unwrap()).await.unwrap();
        assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED, "credential: {}", credential.is_some());
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert!(!String::from_utf8_lossy(&body).contains("handler work"), "the handler ran");
    }
}

/// Every route × another tenant's owner token, path ids filled with this tenant's real ones: refused (404, or 400 for
/// a body checked before existence, or 403), never an answer that names this tenant's resources.
#[tokio::test]
async fn the_isolation_matrix_every_route_with_another_tenants_token() {
    let api = api().await;
    let env = api.new_env("prod").await;
    let (s, joined) = api.join(&api.join_token(&env).await, &csr()).await;
    assert_eq!(s, StatusCode::OK, "{joined}");
    let appliance = joined["appliance_id"].as_str().unwrap().to_owned();
    let (s, mine) = api.post("/v1/tokens", json!({ "name": "ci", "role": "viewer", "expires_in": "1d" })).await;
    assert_eq!(s, StatusCode::CREATED, "{mine}");
    let my_token_id = mine["details"]["id"].as_str().unwrap().to_owned();
    let tenant = tenant_of(&api).await;

    let dir = api._dir.path();
    let other =
        crate::create_tenant(dir, &KekSource::default_for(dir), "globex", "default", &*api.clock).await.unwrap();
    let foreign = other.admin_token.expose().to_owned();
    let secrets =
        [api.workspace.as_str(), env.as_str(), appliance.as_str(), my_token_id.as_str(), tenant.as_str(), "prod"];
    for (method, path) in document_routes() {
        let Some(Access::Api(action)) = route_access(&method, &path) else { continue };
        let filled = concrete(
            &path
                .replace("{workspace}", &api.workspace)
                .replace("{environment}", &env)
                .replace("{appliance}", &appliance)
                .replace("{token}", &my_token_id),
        );
        let body = (method != Method::GET && method != Method::DELETE).then_some("{}");
        let (s, v) = api.call(method.clone(), &filled, Some(&foreign), body).await;
        let at = format!("{method} {path} ({action:?})");
        // A subject names a user at the caller's own identity provider, in the caller's own tenant: no resource here.
        if path.contains('{') && !path.contains("{subject}") {
            let allowed: &[StatusCode] = if method == Method::GET || method == Method::DELETE {
                &[StatusCode::NOT_FOUND, StatusCode::FORBIDDEN]
            } else {
                &[StatusCode::NOT_FOUND, StatusCode::FORBIDDEN, StatusCode::BAD_REQUEST]
            };
            assert!(allowed.contains(&s), "{at}: {s} {v}");
        } else {
            // Tenant-wide routes act on the caller's own tenant: an answer about it, a refusal of the input, or 404
            // for what the caller's tenant has not set up (its identity provider).
            assert!(s.is_success() || [StatusCode::BAD_REQUEST, StatusCode::NOT_FOUND].contains(&s), "{at}: {s} {v}");
        }
        let text = v.to_string();
        // An id the caller sent may come back in the refusal; nothing else of this tenant's may.
        for secret in secrets.iter().filter(|s| !filled.contains(**s)) {
            assert!(!text.contains(secret), "{at} answered with this tenant's {secret}: {text}");
        }
    }
    // Nothing changed here: the token still works, the appliance is not revoked.
    let (_, list) = api.get("/v1/appliances").await;
    assert_eq!(list["appliances"][0]["revoked"], false);
    let (_, tokens) = api.get("/v1/tokens").await;
    assert!(tokens.as_array().unwrap().iter().all(|t| t["revoked_at"].is_null()), "{tokens}");
}

/// Every route × a signed-in owner of another tenant, by cookie (with the CSRF header) and by bearer: refused as the
/// foreign token is, never an answer naming this tenant's resources, nothing changed.
#[tokio::test]
async fn the_isolation_matrix_every_route_with_another_tenants_session() {
    use crate::api::sso::tests::{Via, call_as, new_session};
    let api = api().await;
    let env = api.new_env("prod").await;
    let (s, joined) = api.join(&api.join_token(&env).await, &csr()).await;
    assert_eq!(s, StatusCode::OK, "{joined}");
    let appliance = joined["appliance_id"].as_str().unwrap().to_owned();
    let (s, mine) = api.post("/v1/tokens", json!({ "name": "ci", "role": "viewer", "expires_in": "1d" })).await;
    assert_eq!(s, StatusCode::CREATED, "{mine}");
    let my_token_id = mine["details"]["id"].as_str().unwrap().to_owned();
    let (s, mapping) = api.post("/v1/role-mappings", json!({ "group": "eng", "role": "viewer" })).await;
    assert_eq!(s, StatusCode::CREATED, "{mapping}");
    let mapping_id = mapping["id"].as_str().unwrap().to_owned();
    let tenant = tenant_of(&api).await;
    let t: airlock_core::TenantId = tenant.parse().unwrap();
    let mine = new_session(&api, t, "alice", &[(crate::authz::Role::Viewer, None)], api.state.now()).await;

    let dir = api._dir.path();
    let other =
        crate::create_tenant(dir, &KekSource::default_for(dir), "globex", "default", &*api.clock).await.unwrap();
    let foreign =
        new_session(&api, other.tenant, "mallory", &[(crate::authz::Role::Owner, None)], api.state.now()).await;
    let secrets = [
        api.workspace.as_str(),
        env.as_str(),
        appliance.as_str(),
        my_token_id.as_str(),
        mapping_id.as_str(),
        tenant.as_str(),
        "prod",
        "alice",
    ];
    for (method, path) in document_routes() {
        let Some(Access::Api(action)) = route_access(&method, &path) else { continue };
        let filled = concrete(
            &path
                .replace("{workspace}", &api.workspace)
                .replace("{environment}", &env)
                .replace("{appliance}", &appliance)
                .replace("{token}", &my_token_id)
                .replace("{mapping}", &mapping_id),
        );
        let body = (method != Method::GET && method != Method::DELETE).then(|| json!({}));
        for via in [Via::Cookie(&foreign), Via::Bearer(&foreign)] {
            let (s, _, v) = call_as(&api, via, method.clone(), &filled, body.clone()).await;
            let at = format!("{method} {path} ({action:?})");
            if path.contains('{') && !path.contains("{subject}") {
                let allowed: &[StatusCode] = if method == Method::GET || method == Method::DELETE {
                    &[StatusCode::NOT_FOUND, StatusCode::FORBIDDEN]
                } else {
                    &[StatusCode::NOT_FOUND, StatusCode::FORBIDDEN, StatusCode::BAD_REQUEST]
                };
                assert!(allowed.contains(&s), "{at}: {s} {v}");
            } else {
                // Tenant-wide routes act on the caller's own tenant: success there, or a refusal of the input.
                assert!(
                    s.is_success() || [StatusCode::BAD_REQUEST, StatusCode::NOT_FOUND].contains(&s),
                    "{at}: {s} {v}"
                );
            }
            let text = v.to_string();
            for secret in secrets.iter().filter(|s| !filled.contains(**s)) {
                assert!(!text.contains(secret), "{at} answered with this tenant's {secret}: {text}");
            }
        }
    }
    // Nothing changed here: this tenant's session, token, mapping and appliance are as they were.
    let (s, _, _) = call_as(&api, Via::Cookie(&mine), Method::GET, "/v1/workspaces", None).await;
    assert_eq!(s, StatusCode::OK, "ending the foreign tenant's `alice` ends no session here");
    let (_, list) = api.get("/v1/appliances").await;
    assert_eq!(list["appliances"][0]["revoked"], false);
    let (_, tokens) = api.get("/v1/tokens").await;
    assert!(tokens.as_array().unwrap().iter().all(|t| t["revoked_at"].is_null()), "{tokens}");
    let (_, mappings) = api.get("/v1/role-mappings").await;
    assert_eq!(mappings.as_array().unwrap().len(), 1, "{mappings}");
}

impl Api {
    async fn create_token(&self, by: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, "/v1/tokens", Some(by), Some(&body.to_string())).await
    }

    async fn new_workspace(&self, name: &str) -> String {
        let tenant: airlock_core::TenantId = tenant_of(self).await.parse().unwrap();
        let ws = airlock_core::WorkspaceId::from_random(crate::state::random());
        let mut tx = self.state.store.write().await.unwrap();
        tx.create_workspace(tenant, ws, name, self.state.now()).await.unwrap();
        tx.commit().await.unwrap();
        ws.to_string()
    }
}

#[tokio::test]
async fn a_scoped_token_acts_only_within_its_actions_and_workspace() {
    let api = api().await;
    let env = api.new_env("prod").await;
    let other_ws = api.new_workspace("other").await;
    let (s, v) = api
        .call(
            Method::POST,
            &format!("/v1/workspaces/{other_ws}/environments"),
            Some(&api.token),
            Some(r#"{"name":"x"}"#),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let other_env = v["id"].as_str().unwrap().to_owned();

    let (s, v) = api
        .create_token(
            &api.token,
            json!({ "name": "enroller", "role": "admin", "workspace_id": api.workspace,
                    "actions": ["environments:read", "appliances:enroll"], "expires_in": "30d" }),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let secret = v["token"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("airlock_at_"));
    assert_eq!(v["details"]["actions"], json!(["environments:read", "appliances:enroll"]));
    let scoped = Some(secret.as_str());

    let (s, _) = api.call(Method::GET, &format!("/v1/workspaces/{}/environments", api.workspace), scoped, None).await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = api.call(Method::POST, &format!("/v1/environments/{env}/join-tokens"), scoped, Some("{}")).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    // Another workspace, named or behind an environment: 403 for the one named, 404 for the one the store resolves.
    let (s, v) = api.call(Method::GET, &format!("/v1/workspaces/{other_ws}/environments"), scoped, None).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_error(&v, "outside_token_workspace", "workspace");
    let (s, _) = api.call(Method::POST, &format!("/v1/environments/{other_env}/join-tokens"), scoped, Some("{}")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // Outside its action list, though its role grants it.
    let (s, v) = api
        .call(Method::POST, &format!("/v1/workspaces/{}/environments", api.workspace), scoped, Some(r#"{"name":"y"}"#))
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_error(&v, "outside_token_actions", "action list");
    // Tenant-wide: not for a workspace token.
    let (s, v) = api.call(Method::GET, "/v1/appliances", scoped, None).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    let (s, _) = api.call(Method::GET, "/v1/tokens", scoped, None).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // Each refusal is audited on the tenant's chain, and nothing was made.
    let chain = tenant_of(&api).await;
    let denied = api.audit_actions(&chain).await.into_iter().filter(|(_, o)| o == "denied").count();
    assert!(denied >= 4, "{denied}");
    let (_, envs) = api.get(&format!("/v1/workspaces/{}/environments", api.workspace)).await;
    assert_eq!(envs.as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn a_token_never_holds_more_than_its_creator() {
    let api = api().await;
    let make = |role: &str, extra: Value| {
        let mut body = json!({ "name": "t", "role": role, "expires_in": "30d" });
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        body
    };
    let (s, v) = api.create_token(&api.token, make("admin", json!({}))).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let admin = v["token"].as_str().unwrap().to_owned();

    let (s, v) = api.create_token(&admin, make("owner", json!({}))).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert_error(&v, "forbidden", "only an owner");
    let (s, v) = api.create_token(&admin, make("deployer", json!({ "expires_in": "60d" }))).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert_error(&v, "forbidden", "expire by");
    let (s, v) = api.create_token(&admin, make("deployer", json!({ "expires_in": "10d" }))).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");

    // An admin limited to managing tokens and reading releases cannot mint a deployer that writes them.
    let (s, v) =
        api.create_token(&admin, make("admin", json!({ "actions": ["tokens:manage", "releases:read"] }))).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let narrow = v["token"].as_str().unwrap().to_owned();
    let (s, v) = api.create_token(&narrow, make("deployer", json!({ "expires_in": "1d" }))).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert_error(&v, "forbidden", "releases:write");
    let (s, v) =
        api.create_token(&narrow, make("viewer", json!({ "expires_in": "1d", "actions": ["releases:read"] }))).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");

    // Bad input: an action the role does not grant, an unknown one, no expiry, too long an expiry, an unknown role.
    for (body, why) in [
        (make("viewer", json!({ "actions": ["releases:write"] })), "does not grant"),
        (make("viewer", json!({ "actions": ["root:all"] })), "unknown action"),
        (json!({ "name": "t", "role": "viewer" }), "expires_in"),
        (make("viewer", json!({ "expires_in": "400d" })), "365 days"),
        (make("superuser", json!({})), "unknown role"),
    ] {
        let (s, v) = api.create_token(&api.token, body).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        assert_error(&v, "bad_request", why);
    }
    // Viewers and auditors manage no tokens.
    let (_, v) = api.create_token(&api.token, make("auditor", json!({}))).await;
    let auditor = v["token"].as_str().unwrap().to_owned();
    let (s, _) = api.create_token(&auditor, make("auditor", json!({ "expires_in": "1d" }))).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = api.call(Method::GET, "/v1/workspaces", Some(&auditor), None).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "an auditor reads the audit log only");

    let chain = tenant_of(&api).await;
    let created = api
        .audit_actions(&chain)
        .await
        .into_iter()
        .filter(|(a, o)| a == AuditAction::TokenCreate.as_str() && o == "success")
        .count();
    assert_eq!(created, 5);
}

#[tokio::test]
async fn revocation_rotation_and_expiry_end_a_token_at_the_next_request() {
    let api = api().await;
    let (_, v) = api.create_token(&api.token, json!({ "name": "ci", "role": "viewer", "expires_in": "2h" })).await;
    let (id, first) = (v["details"]["id"].as_str().unwrap().to_owned(), v["token"].as_str().unwrap().to_owned());
    let read = |secret: String| {
        let api = &api;
        async move { api.call(Method::GET, "/v1/workspaces", Some(&secret), None).await }
    };
    assert_eq!(read(first.clone()).await.0, StatusCode::OK);

    // Rotation with a grace: both secrets work until it ends, then only the new one.
    let (s, v) =
        api.call(Method::POST, &format!("/v1/tokens/{id}/rotate"), Some(&api.token), Some(r#"{"grace":"10m"}"#)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let second = v["token"].as_str().unwrap().to_owned();
    assert_eq!(read(first.clone()).await.0, StatusCode::OK);
    assert_eq!(read(second.clone()).await.0, StatusCode::OK);
    api.clock.advance(Duration::from_secs(10 * 60));
    let (s, v) = read(first.clone()).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_error(&v, "unauthenticated", "rotated");
    assert_eq!(read(second.clone()).await.0, StatusCode::OK);
    // Default grace: none.
    let (_, v) = api.call(Method::POST, &format!("/v1/tokens/{id}/rotate"), Some(&api.token), Some("{}")).await;
    let third = v["token"].as_str().unwrap().to_owned();
    assert_eq!(read(second).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(read(third.clone()).await.0, StatusCode::OK);

    // Expiry: past it, refused.
    api.clock.advance(Duration::from_secs(2 * 3600));
    let (s, v) = read(third.clone()).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_error(&v, "unauthenticated", "expired");

    // Revocation: the very next request (the row was cached by the reads above) is refused.
    let (_, v) = api.create_token(&api.token, json!({ "name": "bot", "role": "viewer", "expires_in": "1d" })).await;
    let (bot_id, bot) = (v["details"]["id"].as_str().unwrap().to_owned(), v["token"].as_str().unwrap().to_owned());
    assert_eq!(read(bot.clone()).await.0, StatusCode::OK);
    let (s, v) = api.call(Method::DELETE, &format!("/v1/tokens/{bot_id}"), Some(&api.token), None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = read(bot).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_error(&v, "unauthenticated", "revoked");
    let (s, _) = api.call(Method::DELETE, &format!("/v1/tokens/{bot_id}"), Some(&api.token), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "revoked once");

    // Each refusal is on the tenant's chain, naming the token; the lifecycle is audited.
    let actions = api.audit_actions(&tenant_of(&api).await).await;
    let refused = actions.iter().filter(|(a, o)| a == AuditAction::ApiAuthenticate.as_str() && o == "denied").count();
    assert_eq!(refused, 4, "{actions:?}");
    for done in [AuditAction::TokenRotate, AuditAction::TokenRevoke, AuditAction::TokenList] {
        assert!(actions.iter().any(|(a, _)| a == done.as_str()) || done == AuditAction::TokenList, "{done:?}");
    }
    // Listing shows no secret.
    let (_, list) = api.get("/v1/tokens").await;
    assert!(!list.to_string().contains("airlock_at_"), "{list}");
}

async fn call_from(api: &Api, from: &str, token: &str) -> (StatusCode, Option<String>) {
    let mut req =
        Request::get("/v1/workspaces").header("authorization", format!("Bearer {token}")).body(Body::empty()).unwrap();
    req.extensions_mut().insert(super::ClientAddr(from.parse().unwrap()));
    let resp = super::super::router(api.state.clone()).oneshot(req).await.unwrap();
    let retry = resp.headers().get(http::header::RETRY_AFTER).map(|v| v.to_str().unwrap().to_owned());
    (resp.status(), retry)
}

#[tokio::test]
async fn failed_authentications_are_limited_per_address_and_per_token() {
    let api = api().await;
    let forged = airlock_core::token::Secret::from_random(airlock_core::token::TokenKind::Api, [3; 32]);
    let limit = crate::authn::FailureLimiter::PER_ADDRESS;
    for _ in 0..limit {
        assert_eq!(call_from(&api, "192.0.2.7", forged.expose()).await.0, StatusCode::UNAUTHORIZED);
    }
    let (s, retry) = call_from(&api, "192.0.2.7", forged.expose()).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(retry.as_deref(), Some("60"));
    // A valid token from the same address still works, and records its last use from there.
    assert_eq!(call_from(&api, "192.0.2.7", &api.token).await.0, StatusCode::OK);
    // Last use: noted in memory, written by the flush (at most once a minute per token), shown by the listing.
    api.state.authn.usage.flush(&api.state.store).await;
    let (_, list) = api.get("/v1/tokens").await;
    let owner = list.as_array().unwrap().iter().find(|t| t["role"] == "owner").unwrap();
    assert_eq!(owner["last_used_from"], "192.0.2.7", "{owner}");
    assert!(owner["last_used_at"].is_string());
    assert_eq!(call_from(&api, "192.0.2.8", forged.expose()).await.0, StatusCode::UNAUTHORIZED, "another address");
    api.clock.advance(crate::authn::FailureLimiter::WINDOW);
    assert_eq!(call_from(&api, "192.0.2.7", forged.expose()).await.0, StatusCode::UNAUTHORIZED, "a new window");

    // A revoked token's secret, tried from many addresses, is limited by its id.
    let (_, v) = api.create_token(&api.token, json!({ "name": "old", "role": "viewer", "expires_in": "1d" })).await;
    let (id, old) = (v["details"]["id"].as_str().unwrap().to_owned(), v["token"].as_str().unwrap().to_owned());
    api.call(Method::DELETE, &format!("/v1/tokens/{id}"), Some(&api.token), None).await;
    for n in 0..crate::authn::FailureLimiter::PER_TOKEN - 1 {
        assert_eq!(call_from(&api, &format!("198.51.100.{n}"), &old).await.0, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(call_from(&api, "198.51.100.200", &old).await.0, StatusCode::TOO_MANY_REQUESTS);

    // Refusals are audited (floods folded into counts, `AppState::audit_refusal`); the known token's on its tenant's chain.
    api.state.audit_writer.flush().await;
    let records = api.state.store.audit_records(&tenant_of(&api).await).await.unwrap();
    let reasons: Vec<_> = records.iter().flatten().map(|r| r.event.detail["reason"].clone()).collect();
    assert!(reasons.contains(&json!("rate_limited")) && reasons.contains(&json!("revoked_token")), "{reasons:?}");
    let system = api.state.store.audit_records(crate::state::SYSTEM_CHAIN).await.unwrap();
    assert!(system.iter().flatten().any(|r| r.event.detail["reason"] == "unknown_token"));
}
