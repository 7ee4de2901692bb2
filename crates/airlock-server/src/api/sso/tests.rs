//! Signed-in users through the router in memory: sessions (made in the store as a sign-in makes them) authenticate by
//! cookie or bearer, with CSRF, timeouts on the injected clock, logout, an admin ending them, step-up, identity
//! management; and the sign-in itself against a provider served here (`provider`), forged and replayed answers included.

use std::time::Duration;

use airlock_core::audit::AuditAction;
use airlock_core::id::SessionId;
use airlock_core::token::{Secret, TokenKind};
use airlock_core::{TenantId, Timestamp, WorkspaceId};
use axum::body::Body;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

use super::super::tests::{Api, api, assert_error, tenant_of};
use crate::authz::{Role, TenantScope};
use crate::state::random;
use crate::store::{NewSession, SessionKind};

pub(crate) mod provider;
mod rollouts;
mod workspaces;

/// A session of `subject` in `tenant` with `roles`, as a sign-in stores it; its secret.
pub(crate) async fn new_session(
    api: &Api,
    tenant: TenantId,
    subject: &str,
    roles: &[(Role, Option<WorkspaceId>)],
    auth_time: Timestamp,
) -> String {
    let secret = Secret::from_random(TokenKind::Session, random());
    let scope = TenantScope::for_system(tenant);
    let mut tx = api.state.store.write().await.unwrap();
    let new = NewSession {
        id: SessionId::from_random(random()),
        hash: &secret.hash(),
        subject,
        email: None,
        roles,
        kind: SessionKind::Browser,
        auth_time,
        id_token_sealed: None,
    };
    tx.create_session(&scope, new, api.state.now()).await.unwrap();
    tx.commit().await.unwrap();
    secret.expose().to_owned()
}

/// How a request carries the session.
#[derive(Clone, Copy)]
pub(crate) enum Via<'a> {
    /// The cookie, with the CSRF header.
    Cookie(&'a str),
    /// The cookie alone: an unsafe method is refused.
    BareCookie(&'a str),
    /// The cookie with this `Origin`.
    CookieFrom(&'a str, &'a str),
    Bearer(&'a str),
}

pub(crate) async fn call_as(
    api: &Api,
    via: Via<'_>,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, HeaderMap, Value) {
    let mut req = Request::builder().method(method).uri(path);
    req = match via {
        Via::Cookie(s) => req.header("cookie", format!("__Host-airlock_session={s}")).header("x-airlock-csrf", "1"),
        Via::BareCookie(s) => req.header("cookie", format!("__Host-airlock_session={s}")),
        Via::CookieFrom(s, origin) => {
            req.header("cookie", format!("__Host-airlock_session={s}")).header("origin", origin)
        }
        Via::Bearer(s) => req.header("authorization", format!("Bearer {s}")),
    };
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let req = req.body(body.map_or(Body::empty(), |b| Body::from(b.to_string()))).unwrap();
    let resp = super::super::router(api.state.clone()).oneshot(req).await.unwrap();
    let (status, headers) = (resp.status(), resp.headers().clone());
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, headers, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

async fn tenant(api: &Api) -> TenantId {
    tenant_of(api).await.parse().unwrap()
}

#[tokio::test]
async fn a_session_reads_what_its_roles_allow_by_cookie_or_bearer_and_shows_itself() {
    let api = api().await;
    let t = tenant(&api).await;
    let viewer = new_session(&api, t, "alice", &[(Role::Viewer, None)], api.state.now()).await;
    for via in [Via::Cookie(&viewer), Via::Bearer(&viewer)] {
        let (s, _, v) = call_as(&api, via, Method::GET, "/v1/workspaces", None).await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }
    let (s, _, me) = call_as(&api, Via::Cookie(&viewer), Method::GET, "/v1/auth/session", None).await;
    assert_eq!(s, StatusCode::OK, "{me}");
    assert_eq!(me["principal"], "user:alice");
    assert_eq!(me["roles"], json!([{ "role": "viewer", "workspace_id": null }]));
    // A viewer writes nothing, and manages no identity.
    let path = format!("/v1/workspaces/{}/environments", api.workspace);
    let (s, _, v) = call_as(&api, Via::Cookie(&viewer), Method::POST, &path, Some(json!({ "name": "x" }))).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert_error(&v, "not_granted", "no role");
    let (s, _, _) = call_as(&api, Via::Cookie(&viewer), Method::GET, "/v1/idp", None).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // A deployer in this workspace only: confined to it, its environments and deploys; no tenant-wide reads.
    let ws: WorkspaceId = api.workspace.parse().unwrap();
    let deployer = new_session(&api, t, "dave", &[(Role::Deployer, Some(ws))], api.state.now()).await;
    let (s, _, v) = call_as(&api, Via::Cookie(&deployer), Method::GET, &path, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, _, v) = call_as(&api, Via::Cookie(&deployer), Method::GET, "/v1/appliances", None).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    // An admin creates an environment (with the CSRF header).
    let admin = new_session(&api, t, "ada", &[(Role::Admin, None)], api.state.now()).await;
    let (s, _, v) =
        call_as(&api, Via::Cookie(&admin), Method::POST, &path, Some(json!({ "name": "made-by-ada" }))).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let actions = api.audit_actions(&t.to_string()).await;
    assert!(actions.iter().any(|(a, o)| a == AuditAction::EnvironmentCreate.as_str() && o == "success"));
    api.state.audit_writer.flush().await;
    let records = api.state.store.audit_records(&t.to_string()).await.unwrap();
    assert!(records.iter().flatten().any(|r| r.event.actor == "user:ada"), "the user is the actor");
}

#[tokio::test]
async fn a_cookie_authenticated_unsafe_request_needs_the_origin_or_the_csrf_header() {
    let api = api().await;
    let t = tenant(&api).await;
    let admin = new_session(&api, t, "ada", &[(Role::Admin, None)], api.state.now()).await;
    let path = format!("/v1/workspaces/{}/environments", api.workspace);
    let body = || Some(json!({ "name": "csrf" }));
    for via in [Via::BareCookie(&admin), Via::CookieFrom(&admin, "https://evil.example")] {
        let (s, _, v) = call_as(&api, via, Method::POST, &path, body()).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
        assert_error(&v, "csrf_refused", "Origin");
    }
    let (s, _, v) = call_as(&api, Via::BareCookie(&admin), Method::POST, "/v1/auth/logout", None).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "a forged logout is refused too: {v}");
    let (_, _, envs) = call_as(&api, Via::Cookie(&admin), Method::GET, &path, None).await;
    assert_eq!(envs.as_array().unwrap().len(), 0, "nothing was created");
    let origin = api.state.sso.public_url.clone();
    let (s, _, v) = call_as(&api, Via::CookieFrom(&admin, &origin), Method::POST, &path, body()).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    // A bearer session (the CLI) needs no CSRF proof: no browser sends it by itself.
    let (s, _, v) = call_as(&api, Via::Bearer(&admin), Method::POST, &path, Some(json!({ "name": "cli" }))).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
}

#[tokio::test]
async fn sessions_end_when_idle_and_at_their_absolute_lifetime_and_are_audited() {
    let api = api().await;
    let t = tenant(&api).await;
    let limits = api.state.sso.limits;
    let idle = new_session(&api, t, "idle", &[(Role::Viewer, None)], api.state.now()).await;
    let busy = new_session(&api, t, "busy", &[(Role::Viewer, None)], api.state.now()).await;
    // `busy` is used every 20 minutes; `idle` is not.
    let step = Duration::from_secs(20 * 60);
    let mut elapsed = Duration::ZERO;
    while elapsed + step < limits.absolute {
        api.clock.advance(step);
        elapsed += step;
        let (s, _, v) = call_as(&api, Via::Cookie(&busy), Method::GET, "/v1/workspaces", None).await;
        assert_eq!(s, StatusCode::OK, "{elapsed:?}: {v}");
    }
    let (s, _, v) = call_as(&api, Via::Cookie(&idle), Method::GET, "/v1/workspaces", None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_error(&v, "unauthenticated", "without use");
    api.clock.advance(limits.absolute - elapsed);
    let (s, _, v) = call_as(&api, Via::Cookie(&busy), Method::GET, "/v1/workspaces", None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_error(&v, "unauthenticated", "maximum lifetime");
    api.state.audit_writer.flush().await;
    let records = api.state.store.audit_records(&t.to_string()).await.unwrap();
    let ends: Vec<_> = records
        .iter()
        .flatten()
        .filter(|r| r.event.action == AuditAction::SessionEnd.as_str())
        .map(|r| (r.event.actor.clone(), r.event.detail["reason"].clone()))
        .collect();
    assert_eq!(ends, vec![("user:idle".to_owned(), json!("idle")), ("user:busy".to_owned(), json!("absolute"))]);
    let text = serde_json::to_string(&records).unwrap();
    assert!(!text.contains(&idle) && !text.contains(&busy), "no session secret reaches the audit");
}

#[tokio::test]
async fn logout_and_an_admin_ending_a_users_sessions_refuse_the_very_next_request() {
    let api = api().await;
    let t = tenant(&api).await;
    let alice = new_session(&api, t, "alice", &[(Role::Viewer, None)], api.state.now()).await;
    let alice_cli = new_session(&api, t, "alice", &[(Role::Viewer, None)], api.state.now()).await;
    let bob = new_session(&api, t, "bob", &[(Role::Viewer, None)], api.state.now()).await;
    let (s, headers, v) = call_as(&api, Via::Cookie(&bob), Method::POST, "/v1/auth/logout", None).await;
    assert_eq!((s, v["ended"].clone()), (StatusCode::OK, json!(true)), "{v}");
    assert!(v.get("provider_logout_url").is_none(), "no provider, nothing to end there: {v}");
    let cleared = headers.get_all(http::header::SET_COOKIE).iter().any(|c| {
        let c = c.to_str().unwrap();
        c.starts_with("__Host-airlock_session=;") && c.contains("Max-Age=0")
    });
    assert!(cleared, "{headers:?}");
    let (s, _, v) = call_as(&api, Via::Cookie(&bob), Method::GET, "/v1/workspaces", None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_error(&v, "unauthenticated", "ended");

    // An API token cannot "log out"; it is revoked instead.
    let (s, _) = api.call(Method::POST, "/v1/auth/logout", Some(&api.token), None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);

    let (s, v) = api.post("/v1/users/alice/end-sessions", json!({})).await;
    assert_eq!((s, v["sessions_ended"].clone()), (StatusCode::OK, json!(2)), "{v}");
    for secret in [&alice, &alice_cli] {
        let (s, _, _) = call_as(&api, Via::Bearer(secret), Method::GET, "/v1/auth/session", None).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
    }
    // Ending sessions is identity management: a viewer session may not.
    let carol = new_session(&api, t, "carol", &[(Role::Viewer, None)], api.state.now()).await;
    let (s, _, _) = call_as(&api, Via::Cookie(&carol), Method::POST, "/v1/users/alice/end-sessions", None).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let actions = api.audit_actions(&t.to_string()).await;
    for action in [AuditAction::UserLogout, AuditAction::UserSessionsEnd] {
        assert!(actions.iter().any(|(a, o)| a == action.as_str() && o == "success"), "{action:?}: {actions:?}");
    }
}

#[tokio::test]
async fn a_dead_or_unknown_session_secret_counts_as_a_failed_authentication() {
    let api = api().await;
    let forged = Secret::from_random(TokenKind::Session, [9; 32]);
    for _ in 0..crate::authn::FailureLimiter::PER_ADDRESS {
        let mut req = Request::get("/v1/workspaces")
            .header("cookie", format!("__Host-airlock_session={}", forged.expose()))
            .body(Body::empty())
            .unwrap();
        req.extensions_mut().insert(super::super::ClientAddr("192.0.2.44".parse().unwrap()));
        let resp = super::super::router(api.state.clone()).oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    }
    let mut req = Request::get("/v1/workspaces")
        .header("cookie", format!("__Host-airlock_session={}", forged.expose()))
        .body(Body::empty())
        .unwrap();
    req.extensions_mut().insert(super::super::ClientAddr("192.0.2.44".parse().unwrap()));
    let resp = super::super::router(api.state.clone()).oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn step_up_refuses_identity_and_token_management_with_an_old_sign_in() {
    let api = api().await;
    let t = tenant(&api).await;
    // The tenant's provider says: a sign-in at most 5 minutes old (set in the store: no discovery needed here).
    let scope = TenantScope::for_system(t);
    let row = crate::store::IdpConfigRow {
        issuer: "https://idp.example".into(),
        client_id: "airlock".into(),
        client_secret_sealed: api.state.kek.seal(b"s", b"unused").unwrap(),
        scopes: vec!["openid".into()],
        groups_claim: "groups".into(),
        require_mfa: false,
        max_age_seconds: Some(300),
        updated_at: api.state.now(),
        updated_by: "test".into(),
    };
    let mut tx = api.state.store.write().await.unwrap();
    tx.put_idp_config(&scope, &row).await.unwrap();
    tx.commit().await.unwrap();
    let signed_in = api.state.now();
    let admin = new_session(&api, t, "ada", &[(Role::Admin, None)], signed_in).await;
    let (s, _, v) = call_as(&api, Via::Cookie(&admin), Method::GET, "/v1/tokens", None).await;
    assert_eq!(s, StatusCode::OK, "fresh: {v}");
    api.clock.advance(Duration::from_secs(10 * 60));
    for path in ["/v1/tokens", "/v1/role-mappings"] {
        let (s, headers, v) = call_as(&api, Via::Cookie(&admin), Method::GET, path, None).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{path}: {v}");
        assert_error(&v, "reauthentication_required", "sign in again");
        assert_eq!(headers["x-airlock-login"], format!("/v1/auth/login?tenant={t}&max_age=300").as_str());
    }
    // Other actions need no step-up; an API token never does.
    let (s, _, _) = call_as(&api, Via::Cookie(&admin), Method::GET, "/v1/workspaces", None).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = api.get("/v1/tokens").await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn role_mappings_are_bounded_by_their_maker_and_audited() {
    let api = api().await;
    let t = tenant(&api).await;
    let (s, v) = api.post("/v1/role-mappings", json!({ "group": "eng", "role": "viewer" })).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    let (s, v) = api.post("/v1/role-mappings", json!({ "group": "eng", "role": "viewer" })).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    let (s, v) = api
        .post("/v1/role-mappings", json!({ "group": "ops", "role": "deployer", "workspace_id": api.workspace }))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    for bad in [
        json!({ "group": "", "role": "viewer" }),
        json!({ "group": "x", "role": "king" }),
        json!({ "group": "x", "role": "viewer", "extra": 1 }),
    ] {
        let (s, v) = api.post("/v1/role-mappings", bad.clone()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}: {v}");
    }
    let missing = WorkspaceId::from_random([7; 16]);
    let (s, _) =
        api.post("/v1/role-mappings", json!({ "group": "x", "role": "viewer", "workspace_id": missing })).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // An admin maps no group to owner, nor removes an owner mapping.
    let admin = new_session(&api, t, "ada", &[(Role::Admin, None)], api.state.now()).await;
    let owner_mapping = json!({ "group": "root", "role": "owner" });
    let (s, _, v) =
        call_as(&api, Via::Cookie(&admin), Method::POST, "/v1/role-mappings", Some(owner_mapping.clone())).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    let (s, v) = api.post("/v1/role-mappings", owner_mapping).await;
    assert_eq!(s, StatusCode::CREATED, "an owner token may: {v}");
    let owner_id = v["id"].as_str().unwrap().to_owned();
    let (s, _, _) =
        call_as(&api, Via::Cookie(&admin), Method::DELETE, &format!("/v1/role-mappings/{owner_id}"), None).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _, v) = call_as(&api, Via::Cookie(&admin), Method::DELETE, &format!("/v1/role-mappings/{id}"), None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, list) = api.get("/v1/role-mappings").await;
    assert_eq!(s, StatusCode::OK);
    let mut groups: Vec<_> = list.as_array().unwrap().iter().map(|m| m["group"].as_str().unwrap().to_owned()).collect();
    groups.sort();
    assert_eq!(groups, ["ops", "root"]);
    let actions = api.audit_actions(&t.to_string()).await;
    for action in [AuditAction::RoleMappingAdd, AuditAction::RoleMappingRemove, AuditAction::RoleMappingList] {
        assert!(actions.iter().any(|(a, _)| a == action.as_str()), "{action:?}");
    }
    assert!(actions.iter().any(|(a, o)| a == AuditAction::RoleMappingAdd.as_str() && o == "denied"), "refusals too");
}

#[tokio::test]
async fn a_tenant_holds_a_bounded_number_of_role_mappings() {
    let api = api().await;
    for n in 0..crate::sso::mappings::MAX_MAPPINGS {
        let (s, v) = api.post("/v1/role-mappings", json!({ "group": format!("g{n}"), "role": "viewer" })).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
    }
    let (s, v) = api.post("/v1/role-mappings", json!({ "group": "one-more", "role": "viewer" })).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
}

// ---------- sign-in against a provider served here ----------

mod sign_in {
    use std::sync::Arc;

    use super::provider::{Answer, Provider};
    use super::*;
    use crate::clock::ManualClock;
    use crate::issuer::{IssuerClient, Issuers};
    use crate::keys::KekSource;

    const SECRET: &str = "client-secret-s3cret";

    /// The API over a fresh data directory whose issuer client trusts the provider's CA on loopback; the provider set as
    /// the tenant's, and `eng` mapped to viewer.
    async fn api_with_provider(require_mfa: bool, max_age: Option<u64>) -> (Api, Arc<Provider>) {
        api_with_provider_and_budget(require_mfa, max_age, crate::sso::pending::PendingLogins::BUDGET).await
    }

    /// [`api_with_provider`], its sign-ins in progress held under `budget` (`Config::sign_in_budget`).
    async fn api_with_provider_and_budget(
        require_mfa: bool,
        max_age: Option<u64>,
        budget: crate::net::anonymous::Budget,
    ) -> (Api, Arc<Provider>) {
        let provider = Provider::start().await;
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(Timestamp::from_unix_millis(1_800_000_000_000));
        let boot =
            crate::init(dir.path(), &KekSource::default_for(dir.path()), "airlock.test", "acme", "default", &*clock)
                .await
                .unwrap();
        let issuers = Issuers::new(IssuerClient::new(vec![provider.ca.clone()], true).unwrap());
        let mut state = crate::test_state_with_issuers(dir.path(), clock.clone(), Arc::new(issuers)).await;
        let sso = &mut Arc::get_mut(&mut state).expect("nothing holds the new state yet").sso;
        *sso = crate::sso::Sso::new(&sso.public_url, sso.limits, budget);
        let api = Api {
            state,
            clock,
            token: boot.admin_token.expose().to_owned(),
            workspace: boot.workspace.to_string(),
            _dir: dir,
        };
        let body = json!({
            "issuer": provider.issuer, "client_id": "airlock", "client_secret": SECRET,
            "require_mfa": require_mfa, "max_age": max_age,
        });
        let (s, _) = api.call(Method::PUT, "/v1/idp", Some(&api.token), Some(&body.to_string())).await;
        assert_eq!(s, StatusCode::OK);
        let (s, v) = api.post("/v1/role-mappings", json!({ "group": "eng", "role": "viewer" })).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        (api, provider)
    }

    /// A started login: its state, nonce, PKCE challenge and pre-login cookie, from the redirect and `Set-Cookie`.
    struct Started {
        state: String,
        nonce: String,
        challenge: String,
        cookie: String,
        location: String,
    }

    async fn begin(api: &Api, extra: &str) -> Started {
        let t = tenant(api).await;
        let req = Request::get(format!("/v1/auth/login?tenant={t}{extra}")).body(Body::empty()).unwrap();
        let resp = super::super::super::router(api.state.clone()).oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::FOUND);
        let location = resp.headers()["location"].to_str().unwrap().to_owned();
        let set_cookie = resp.headers()["set-cookie"].to_str().unwrap().to_owned();
        assert!(set_cookie.contains("Secure; HttpOnly; SameSite=Lax; Path=/"), "{set_cookie}");
        let cookie = set_cookie.strip_prefix("__Host-airlock_login=").unwrap().split(';').next().unwrap().to_owned();
        let url = reqwest::Url::parse(&location).unwrap();
        let q = |name: &str| url.query_pairs().find(|(k, _)| k == name).map(|(_, v)| v.into_owned()).unwrap();
        assert_eq!(q("response_type"), "code");
        assert_eq!(q("code_challenge_method"), "S256");
        Started { state: q("state"), nonce: q("nonce"), challenge: q("code_challenge"), cookie, location }
    }

    async fn finish(api: &Api, state: &str, code: &str, cookie: Option<&str>) -> (StatusCode, HeaderMap, Value) {
        let mut req = Request::get(format!("/v1/auth/callback?state={state}&code={code}"));
        if let Some(c) = cookie {
            req = req.header("cookie", format!("__Host-airlock_login={c}"));
        }
        let resp =
            super::super::super::router(api.state.clone()).oneshot(req.body(Body::empty()).unwrap()).await.unwrap();
        let (status, headers) = (resp.status(), resp.headers().clone());
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (status, headers, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    fn session_cookie(headers: &HeaderMap) -> Option<String> {
        headers.get_all("set-cookie").iter().find_map(|c| {
            let c = c.to_str().unwrap();
            c.strip_prefix("__Host-airlock_session=")
                .and_then(|v| v.split(';').next())
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
        })
    }

    fn now_secs(api: &Api) -> i64 {
        api.state.now().unix_seconds()
    }

    #[tokio::test]
    async fn a_sign_in_redeems_the_code_with_pkce_and_client_auth_and_opens_a_session() {
        let (api, provider) = api_with_provider(false, None).await;
        let started = begin(&api, "&return_to=/v1/workspaces").await;
        assert!(started.location.starts_with(&format!("{}/authorize?", provider.issuer)));
        let claims = provider.claims("airlock", &started.nonce, "alice", &["eng", "other"], now_secs(&api));
        provider.answer_next(Answer::Token { claims, forged: false });
        let (s, headers, v) = finish(&api, &started.state, "code-1", Some(&started.cookie)).await;
        assert_eq!(s, StatusCode::SEE_OTHER, "{v}");
        assert_eq!(headers["location"], "/v1/workspaces");
        let set = headers.get_all("set-cookie").iter().map(|c| c.to_str().unwrap().to_owned()).collect::<Vec<_>>();
        let session_header = set.iter().find(|c| c.starts_with("__Host-airlock_session=")).unwrap();
        assert!(session_header.contains("; Secure; HttpOnly; SameSite=Lax; Path=/"), "{session_header}");
        assert!(set.iter().any(|c| c.starts_with("__Host-airlock_login=;") && c.contains("Max-Age=0")), "{set:?}");
        let session = session_cookie(&headers).unwrap();
        let (s, _, me) = call_as(&api, Via::Cookie(&session), Method::GET, "/v1/auth/session", None).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!((me["principal"].as_str(), me["roles"][0]["role"].as_str()), (Some("user:alice"), Some("viewer")));

        // The code went to the token endpoint with the client's secret (HTTP Basic) and the verifier of the challenge.
        let redemptions = provider.redemptions();
        let (form, authorization) = redemptions.last().unwrap();
        let field = |n: &str| form.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
        assert_eq!(field("grant_type"), Some("authorization_code"));
        assert_eq!(field("code"), Some("code-1"));
        assert_eq!(field("redirect_uri"), Some(format!("{}/v1/auth/callback", api.state.sso.public_url).as_str()));
        assert_eq!(crate::sso::sha256_text(field("code_verifier").unwrap()), started.challenge);
        let basic = format!("Basic {}", data_encoding::BASE64.encode(format!("airlock:{SECRET}").as_bytes()));
        assert_eq!(authorization.as_deref(), Some(basic.as_str()));

        // Audited as the user, with no code, secret or token.
        let t = tenant(&api).await.to_string();
        api.state.audit_writer.flush().await;
        let records = api.state.store.audit_records(&t).await.unwrap();
        let login = records.iter().flatten().find(|r| r.event.action == AuditAction::UserLogin.as_str()).unwrap();
        assert_eq!(login.event.actor, "user:alice");
        let text = serde_json::to_string(&records).unwrap();
        for secret in [SECRET, "code-1", session.as_str(), started.cookie.as_str()] {
            assert!(!text.contains(secret), "{secret} reached the audit");
        }
        // The provider is shown without its secret.
        let (s, shown) = api.get("/v1/idp").await;
        assert_eq!(s, StatusCode::OK);
        assert!(!shown.to_string().contains(SECRET) && shown["client_secret_set"] == true, "{shown}");
    }

    #[tokio::test]
    async fn forged_wrong_audience_wrong_issuer_expired_unsigned_and_foreign_nonce_id_tokens_open_no_session() {
        let (api, provider) = api_with_provider(false, None).await;
        let now = now_secs(&api);
        type Edit = fn(&mut Value, i64);
        let cases: [(&str, bool, Edit); 6] = [
            ("forged signature", true, |_, _| {}),
            ("wrong audience", false, |c, _| c["aud"] = json!("someone-else")),
            ("wrong issuer", false, |c, _| c["iss"] = json!("https://evil.example")),
            ("expired", false, |c, now| c["exp"] = json!(now - 120)),
            ("nonce of another login", false, |c, _| c["nonce"] = json!("not-this-login")),
            ("no subject", false, |c, _| {
                c.as_object_mut().unwrap().remove("sub");
            }),
        ];
        for (n, (what, forged, edit)) in cases.into_iter().enumerate() {
            let started = begin(&api, "").await;
            let mut claims = provider.claims("airlock", &started.nonce, "alice", &["eng"], now);
            edit(&mut claims, now);
            provider.answer_next(Answer::Token { claims, forged });
            let (s, headers, v) = finish(&api, &started.state, &format!("code-{n}"), Some(&started.cookie)).await;
            assert_eq!(s, StatusCode::UNAUTHORIZED, "{what}: {v}");
            assert!(session_cookie(&headers).is_none(), "{what} set a session");
        }
        let started = begin(&api, "").await;
        let claims = provider.claims("airlock", &started.nonce, "alice", &["eng"], now);
        provider.answer_next(Answer::Unsigned { claims });
        let (s, headers, v) = finish(&api, &started.state, "code-none", Some(&started.cookie)).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "alg none: {v}");
        assert!(session_cookie(&headers).is_none());
        let (s, _, v) = finish(&api, &started.state, "code-none-again", Some(&started.cookie)).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "a refused login is consumed too: {v}");
        // Each refusal is audited on the tenant's chain with its reason.
        api.state.audit_writer.flush().await;
        let records = api.state.store.audit_records(&tenant(&api).await.to_string()).await.unwrap();
        let refusals = records
            .iter()
            .flatten()
            .filter(|r| {
                r.event.action == AuditAction::UserLogin.as_str()
                    && r.event.outcome == airlock_core::audit::Outcome::Denied
            })
            .count();
        assert_eq!(refusals, 7);
        assert!(records.iter().flatten().any(|r| r.event.detail["reason"] == "nonce_mismatch"));
        assert!(!records.iter().flatten().any(|r| r.event.action == AuditAction::UserLogin.as_str()
            && r.event.outcome == airlock_core::audit::Outcome::Success));
    }

    #[tokio::test]
    async fn a_replayed_code_an_unknown_state_and_a_missing_or_foreign_cookie_open_no_session() {
        let (api, provider) = api_with_provider(false, None).await;
        let now = now_secs(&api);
        // A code the provider already redeemed: refused at its token endpoint.
        let first = begin(&api, "").await;
        provider.answer_next(Answer::Token {
            claims: provider.claims("airlock", &first.nonce, "alice", &["eng"], now),
            forged: false,
        });
        let (s, _, _) = finish(&api, &first.state, "same-code", Some(&first.cookie)).await;
        assert_eq!(s, StatusCode::SEE_OTHER);
        let second = begin(&api, "").await;
        provider.answer_next(Answer::Token {
            claims: provider.claims("airlock", &second.nonce, "alice", &["eng"], now),
            forged: false,
        });
        let (s, headers, v) = finish(&api, &second.state, "same-code", Some(&second.cookie)).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
        assert_eq!(v["error"]["code"], "code_rejected");
        assert!(session_cookie(&headers).is_none());
        // The same callback again: its login was consumed.
        let (s, _, v) = finish(&api, &first.state, "same-code", Some(&first.cookie)).await;
        assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("login_state_unknown")));

        // Without the pre-login cookie, or with another browser's: refused before the login is consumed.
        let third = begin(&api, "").await;
        let other = begin(&api, "").await;
        let redemptions = provider.redemptions().len();
        for cookie in [None, Some(other.cookie.as_str())] {
            let (s, headers, v) = finish(&api, &third.state, "code-3", cookie).await;
            assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("login_cookie_mismatch")));
            assert!(session_cookie(&headers).is_none());
        }
        assert_eq!(provider.redemptions().len(), redemptions, "no code was redeemed for them");
        provider.answer_next(Answer::Token {
            claims: provider.claims("airlock", &third.nonce, "alice", &["eng"], now),
            forged: false,
        });
        let (s, _, v) = finish(&api, &third.state, "code-3", Some(&third.cookie)).await;
        assert_eq!(s, StatusCode::SEE_OTHER, "the rightful browser still finishes: {v}");
        // A state that names no login: refused, and audited on the system chain (no tenant is known).
        let (s, _, _) = finish(&api, "made-up", "code-4", Some(&other.cookie)).await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        api.state.audit_writer.flush().await;
        let system = api.state.store.audit_records(crate::state::SYSTEM_CHAIN).await.unwrap();
        assert!(
            system.iter().flatten().any(|r| r.event.action == AuditAction::UserLogin.as_str()
                && r.event.detail["reason"] == "login_state_unknown")
        );
        // A callback naming another issuer (RFC 9207): a mix-up, refused before any code is redeemed.
        let mixed = begin(&api, "").await;
        let redemptions = provider.redemptions().len();
        let req = Request::get(format!("/v1/auth/callback?state={}&code=c&iss=https://evil.example", mixed.state))
            .header("cookie", format!("__Host-airlock_login={}", mixed.cookie))
            .body(Body::empty())
            .unwrap();
        let resp = super::super::super::router(api.state.clone()).oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(provider.redemptions().len(), redemptions);
        // A login older than 10 minutes.
        api.clock.advance(crate::sso::LOGIN_TTL);
        let (s, _, v) = finish(&api, &other.state, "code-5", Some(&other.cookie)).await;
        assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("login_expired")));
    }

    #[tokio::test]
    async fn mfa_required_refuses_a_password_only_sign_in_and_unmapped_groups_get_no_role() {
        let (api, provider) = api_with_provider(true, None).await;
        let now = now_secs(&api);
        let started = begin(&api, "").await;
        provider.answer_next(Answer::Token {
            claims: provider.claims("airlock", &started.nonce, "alice", &["eng"], now),
            forged: false,
        });
        let (s, headers, v) = finish(&api, &started.state, "c1", Some(&started.cookie)).await;
        assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::FORBIDDEN, Some("mfa_required")), "{v}");
        assert!(session_cookie(&headers).is_none());
        let started = begin(&api, "").await;
        let mut claims = provider.claims("airlock", &started.nonce, "alice", &["eng"], now);
        claims["amr"] = json!(["pwd", "otp"]);
        provider.answer_next(Answer::Token { claims, forged: false });
        let (s, _, v) = finish(&api, &started.state, "c2", Some(&started.cookie)).await;
        assert_eq!(s, StatusCode::SEE_OTHER, "{v}");

        let started = begin(&api, "").await;
        let mut claims = provider.claims("airlock", &started.nonce, "mallory", &["marketing"], now);
        claims["amr"] = json!(["mfa"]);
        provider.answer_next(Answer::Token { claims, forged: false });
        let (s, headers, v) = finish(&api, &started.state, "c3", Some(&started.cookie)).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
        assert_error(&v, "no_role", "your groups map to no role in this tenant");
        assert!(session_cookie(&headers).is_none());
    }

    #[tokio::test]
    async fn failed_sign_ins_count_against_their_address_and_stop_it_starting_more() {
        let (api, _provider) = api_with_provider(false, None).await;
        let t = tenant(&api).await;
        let from = |req: &mut Request<Body>| {
            req.extensions_mut().insert(super::super::super::ClientAddr("192.0.2.77".parse().unwrap()));
        };
        for n in 0..crate::authn::FailureLimiter::PER_ADDRESS {
            let mut req =
                Request::get(format!("/v1/auth/callback?state=guess-{n}&code=c")).body(Body::empty()).unwrap();
            from(&mut req);
            let resp = super::super::super::router(api.state.clone()).oneshot(req).await.unwrap();
            assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        }
        let mut req = Request::get(format!("/v1/auth/login?tenant={t}")).body(Body::empty()).unwrap();
        from(&mut req);
        let resp = super::super::super::router(api.state.clone()).oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        // Another address still signs in.
        let started = begin(&api, "").await;
        assert!(!started.state.is_empty());
    }

    /// A sign-in start from `from` for `tenant`: status, headers, body.
    async fn start_from(api: &Api, tenant: &str, from: &str) -> (StatusCode, HeaderMap, Value) {
        let mut req = Request::get(format!("/v1/auth/login?tenant={tenant}")).body(Body::empty()).unwrap();
        req.extensions_mut().insert(super::super::super::ClientAddr(from.parse().unwrap()));
        let resp = super::super::super::router(api.state.clone()).oneshot(req).await.unwrap();
        let (status, headers) = (resp.status(), resp.headers().clone());
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (status, headers, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    #[tokio::test]
    async fn a_full_network_tenant_or_server_refuses_a_start_alike_with_when_to_retry_and_audits_the_tenants_own() {
        let budget = crate::net::anonymous::Budget {
            per_address: 1,
            per_network: 2,
            per_party: 3,
            reserved_per_party: 0,
            total: 4,
        };
        let (api, provider) = api_with_provider_and_budget(false, None, budget).await;
        let acme = tenant(&api).await.to_string();
        let started = |(s, _, v): (StatusCode, HeaderMap, Value)| assert_eq!(s, StatusCode::FOUND, "{v}");
        // Every level is answered alike: which one is full says nothing to an anonymous caller (a full server is other
        // tenants' load), only when to retry.
        let mut messages = std::collections::BTreeSet::new();
        let mut refused = |(s, h, v): (StatusCode, HeaderMap, Value), retry: u64| {
            assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{v}");
            assert_eq!(v["error"]["code"], "sign_in_busy", "{v}");
            let message = v["error"]["message"].as_str().unwrap().replace(&retry.to_string(), "N");
            for level in ["network", "tenant", "server", "address"] {
                assert!(!message.contains(level), "{message}");
            }
            messages.insert(message);
            assert_eq!(h[http::header::RETRY_AFTER].to_str().unwrap(), retry.to_string(), "{v}");
            assert!(h.get(http::header::SET_COOKIE).is_none(), "a refused start sets no pre-login cookie");
        };
        // Its network's share: two addresses of 192.0.2.0/24; the third is refused until the first's login expires.
        started(start_from(&api, &acme, "192.0.2.1").await);
        api.clock.advance(Duration::from_secs(100));
        started(start_from(&api, &acme, "192.0.2.2").await);
        // (It expires in 500 s, said rounded up to 30 s: the second would tell when the oldest login started.)
        refused(start_from(&api, &acme, "192.0.2.3").await, 510);
        // The tenant's share: a third login from another network fills it; a fourth, from a network acme does not
        // know, is refused.
        started(start_from(&api, &acme, "198.51.100.1").await);
        refused(start_from(&api, &acme, "198.51.100.2").await, 510);
        // Another tenant takes the table's last place; then the server is full for anyone.
        let dir = api._dir.path();
        let globex =
            crate::create_tenant(dir, &KekSource::default_for(dir), "globex", "default", &*api.clock).await.unwrap();
        let body = json!({ "issuer": provider.issuer, "client_id": "airlock", "client_secret": SECRET });
        let (s, v) = api.call(Method::PUT, "/v1/idp", Some(globex.admin_token.expose()), Some(&body.to_string())).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let globex = globex.tenant.to_string();
        started(start_from(&api, &globex, "203.0.113.1").await);
        api.clock.advance(Duration::from_secs(50));
        refused(start_from(&api, &globex, "198.18.0.1").await, 450);
        assert_eq!(messages.len(), 1, "{messages:?}");
        // When the oldest login expires, its place is free again.
        api.clock.advance(Duration::from_secs(450));
        started(start_from(&api, &globex, "198.18.0.1").await);
        // Only the full tenant is audited on the tenant's chain: a full network or server is not the tenant's news,
        // and anyone could fill its chain with them.
        api.state.audit_writer.flush().await;
        let reasons = |chain: String| {
            let store = api.state.store.clone();
            async move {
                let records = store.audit_records(&chain).await.unwrap();
                records
                    .into_iter()
                    .map(Result::unwrap)
                    .filter(|r| r.event.action == AuditAction::UserLogin.as_str())
                    .map(|r| {
                        format!("{}/{}", r.event.detail["reason"].as_str().unwrap_or_default(), r.event.detail["level"])
                    })
                    .collect::<Vec<_>>()
            }
        };
        // The tenant's own audit keeps the level that was full.
        assert_eq!(reasons(acme).await, ["sign_in_busy/\"tenant\""]);
        assert!(reasons(globex).await.is_empty());
    }

    #[tokio::test]
    async fn a_completed_sign_in_proves_its_network_and_a_flood_of_busy_refusals_hides_no_callback_refusal() {
        let budget = crate::net::anonymous::Budget {
            per_address: 4,
            per_network: 8,
            per_party: 3,
            reserved_per_party: 0,
            total: 100,
        };
        let (api, provider) = api_with_provider_and_budget(false, None, budget).await;
        let acme = tenant(&api).await.to_string();
        // A sign-in from the office, started from 198.51.100.1, completes.
        let (s, h, v) = start_from(&api, &acme, "198.51.100.1").await;
        assert_eq!(s, StatusCode::FOUND, "{v}");
        let url = reqwest::Url::parse(h["location"].to_str().unwrap()).unwrap();
        let q = |name: &str| url.query_pairs().find(|(k, _)| k == name).map(|(_, v)| v.into_owned()).unwrap();
        let set_cookie = h["set-cookie"].to_str().unwrap();
        let cookie = set_cookie.strip_prefix("__Host-airlock_login=").unwrap().split(';').next().unwrap().to_owned();
        let claims = provider.claims("airlock", &q("nonce"), "alice", &["eng"], now_secs(&api));
        provider.answer_next(Answer::Token { claims, forged: false });
        let (s, headers, v) = finish(&api, &q("state"), "code-1", Some(&cookie)).await;
        assert_eq!(s, StatusCode::SEE_OTHER, "{v}");
        assert!(session_cookie(&headers).is_some());
        // Strangers fill the tenant; one more is refused, and evicts nobody.
        let mut strangers = Vec::new();
        for i in 0..3 {
            let (s, h, v) = start_from(&api, &acme, &format!("10.0.{i}.1")).await;
            assert_eq!(s, StatusCode::FOUND, "{v}");
            strangers.push(h);
        }
        for i in 3..30 {
            let (s, _, v) = start_from(&api, &acme, &format!("10.0.{i}.1")).await;
            assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::TOO_MANY_REQUESTS, Some("sign_in_busy")));
        }
        // The office's network is proven: its next start gets in, the oldest stranger's login gives way.
        let (s, h, v) = start_from(&api, &acme, "198.51.100.77").await;
        assert_eq!(s, StatusCode::FOUND, "{v}");
        assert_eq!(api.state.sso.pending.len(), 3);
        // A refused callback (another issuer than the login's) in the same second as the flood of busy refusals is
        // still audited: those are limited under their own key.
        let url = reqwest::Url::parse(h["location"].to_str().unwrap()).unwrap();
        let state = url.query_pairs().find(|(k, _)| k == "state").unwrap().1.into_owned();
        let cookie = h["set-cookie"].to_str().unwrap().strip_prefix("__Host-airlock_login=").unwrap();
        let cookie = cookie.split(';').next().unwrap();
        let (s, _, v) = finish(&api, &state, "c&iss=https://evil.example", Some(cookie)).await;
        assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("issuer_mismatch")), "{v}");
        api.state.audit_writer.flush().await;
        let records = api.state.store.audit_records(&acme).await.unwrap();
        let reasons: Vec<String> = records
            .into_iter()
            .map(Result::unwrap)
            .filter(|r| r.event.action == AuditAction::UserLogin.as_str())
            .filter_map(|r| r.event.detail["reason"].as_str().map(str::to_owned))
            .collect();
        let busy = reasons.iter().filter(|r| *r == "sign_in_busy").count();
        assert_eq!(busy, crate::state::RefusalLimiter::PER_SECOND as usize, "{reasons:?}");
        assert!(reasons.iter().any(|r| r == "issuer_mismatch"), "{reasons:?}");
    }

    #[tokio::test]
    async fn a_step_up_login_asks_the_provider_for_a_fresh_sign_in_and_refuses_an_old_one() {
        let (api, provider) = api_with_provider(false, Some(300)).await;
        let now = now_secs(&api);
        let started = begin(&api, "&max_age=300").await;
        assert!(started.location.contains("max_age=300") && started.location.contains("prompt=login"));
        let mut claims = provider.claims("airlock", &started.nonce, "alice", &["eng"], now);
        claims["auth_time"] = json!(now - 3600);
        provider.answer_next(Answer::Token { claims, forged: false });
        let (s, _, v) = finish(&api, &started.state, "c1", Some(&started.cookie)).await;
        assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("reauthentication_required")));
    }

    /// A CLI sign-in's link can be sent to someone else: it always makes them sign in at the provider again, so a browser
    /// already signed in there does not hand their loopback a code without their doing anything.
    #[tokio::test]
    async fn a_cli_sign_in_always_asks_the_provider_for_a_fresh_sign_in_and_a_browser_one_does_not() {
        let (api, _provider) = api_with_provider(false, None).await;
        let browser = begin(&api, "").await;
        assert!(!browser.location.contains("prompt="), "{}", browser.location);
        let challenge = "a".repeat(43);
        let cli =
            begin(&api, &format!("&cli_redirect=http%3A%2F%2F127.0.0.1%3A8123%2Fcb&cli_challenge={challenge}")).await;
        let url = reqwest::Url::parse(&cli.location).unwrap();
        let prompts: Vec<_> = url.query_pairs().filter(|(k, _)| k == "prompt").map(|(_, v)| v.into_owned()).collect();
        assert_eq!(prompts, ["login"], "{}", cli.location);
        assert!(!cli.location.contains("max_age"), "{}", cli.location);
        // With step-up too, one prompt.
        let both = begin(
            &api,
            &format!("&max_age=60&cli_redirect=http%3A%2F%2F127.0.0.1%3A8123%2Fcb&cli_challenge={challenge}"),
        )
        .await;
        assert_eq!(both.location.matches("prompt=").count(), 1, "{}", both.location);
        assert!(both.location.contains("max_age=60"));
    }

    /// Whoever picks the issuer picks who signs in under every mapped role, owner included, and the kept secret would
    /// be posted to the new issuer's token endpoint: only an owner sets the provider, and a new issuer or client id
    /// needs its secret again.
    #[tokio::test]
    async fn an_admin_cannot_repoint_the_provider_nor_send_its_secret_elsewhere() {
        let (api, provider) = api_with_provider(false, None).await;
        let admin = json!({ "name": "admin", "role": "admin", "expires_in": "1d" }).to_string();
        let (s, v) = api.call(Method::POST, "/v1/tokens", Some(&api.token), Some(&admin)).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        let admin = v["token"].as_str().unwrap().to_owned();
        let same = json!({ "issuer": provider.issuer, "client_id": "airlock" }).to_string();
        let (s, v) = api.call(Method::PUT, "/v1/idp", Some(&admin), Some(&same)).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "an admin set the identity provider: {v}");
        let (s, v) = api.call(Method::GET, "/v1/idp", Some(&admin), None).await;
        assert_eq!(s, StatusCode::OK, "an admin still reads it: {v}");
        // The owner: the same client keeps its sealed secret; another client id must bring its own.
        let (s, v) = api.call(Method::PUT, "/v1/idp", Some(&api.token), Some(&same)).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let other = json!({ "issuer": provider.issuer, "client_id": "another" }).to_string();
        let (s, v) = api.call(Method::PUT, "/v1/idp", Some(&api.token), Some(&other)).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        let row = api.state.store.idp_config(&TenantScope::for_system(tenant(&api).await)).await.unwrap().unwrap();
        assert_eq!(row.client_id, "airlock", "nothing changed");
    }

    #[tokio::test]
    async fn setting_a_provider_checks_its_discovery_and_keeps_the_secret_sealed() {
        let (api, provider) = api_with_provider(false, None).await;
        for (body, status) in [
            (
                json!({ "issuer": "https://127.0.0.1:1", "client_id": "a", "client_secret": "s" }),
                StatusCode::UNPROCESSABLE_ENTITY,
            ),
            (
                json!({ "issuer": "http://idp.example", "client_id": "a", "client_secret": "s" }),
                StatusCode::BAD_REQUEST,
            ),
            (json!({ "issuer": provider.issuer, "client_id": "a", "scopes": ["email"] }), StatusCode::BAD_REQUEST),
            (
                json!({ "issuer": provider.issuer, "client_id": "a", "client_secret": "s", "max_age": 999_999_999 }),
                StatusCode::BAD_REQUEST,
            ),
        ] {
            let (s, v) = api.call(Method::PUT, "/v1/idp", Some(&api.token), Some(&body.to_string())).await;
            assert_eq!(s, status, "{body}: {v}");
        }
        // The secret is sealed in the store, bound to its tenant.
        let t = tenant(&api).await;
        let row = api.state.store.idp_config(&TenantScope::for_system(t)).await.unwrap().unwrap();
        let contains = |h: &[u8], n: &[u8]| h.windows(n.len()).any(|w| w == n);
        assert!(!contains(&row.client_secret_sealed, SECRET.as_bytes()));
        assert_eq!(crate::sso::idp::open_secret(&api.state, t, &row).unwrap(), SECRET);
        let other = TenantId::from_random([9; 16]);
        assert!(crate::sso::idp::open_secret(&api.state, other, &row).is_err(), "another tenant cannot open it");
        for file in [crate::store::DB_FILE_NAME.to_owned(), format!("{}-wal", crate::store::DB_FILE_NAME)] {
            let bytes = std::fs::read(api._dir.path().join(file)).unwrap_or_default();
            assert!(!contains(&bytes, SECRET.as_bytes()), "the secret is in the database in clear");
        }
    }
}

#[tokio::test]
async fn a_signed_in_admin_makes_tokens_no_wider_than_their_roles_and_is_named_as_their_maker() {
    let api = api().await;
    let t = tenant(&api).await;
    let admin = new_session(&api, t, "ada", &[(Role::Admin, None)], api.state.now()).await;
    let body = json!({ "name": "ci", "role": "deployer", "expires_in": "1d" });
    let (s, _, v) = call_as(&api, Via::Cookie(&admin), Method::POST, "/v1/tokens", Some(body)).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["details"]["created_by"], "user:ada");
    let owner = json!({ "name": "root", "role": "owner", "expires_in": "1d" });
    let (s, _, v) = call_as(&api, Via::Cookie(&admin), Method::POST, "/v1/tokens", Some(owner)).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "an admin makes no owner: {v}");
    // A user confined to one workspace makes tokens only there.
    let ws: WorkspaceId = api.workspace.parse().unwrap();
    let ws_admin = new_session(&api, t, "wanda", &[(Role::Admin, Some(ws))], api.state.now()).await;
    let tenant_wide = json!({ "name": "wide", "role": "viewer", "expires_in": "1d" });
    let (s, _, v) = call_as(&api, Via::Cookie(&ws_admin), Method::POST, "/v1/tokens", Some(tenant_wide)).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "token management is tenant-wide: {v}");
}
