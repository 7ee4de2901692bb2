//! People sign in through a real OpenID provider (panva's `oidc-provider`, `airlock_testkit::oidc`) to a real
//! `airlock server`: the tenant's provider and group mappings set with the CLI, a browser driven through the login,
//! the session cookie used for reads and refused for writes its roles do not give; unmapped groups, MFA, a group
//! change at the provider, an admin ending sessions, logout, CSRF, replayed and cookie-less callbacks; step-up
//! through the provider; a logout that ends the provider's session too; and `airlock login` through its loopback redirect (a fresh sign-in at the provider each
//! time), its credential kept mode 0600.
// Test helpers panic to report failure.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};

use airlock_core::Fingerprint;
use airlock_testkit::e2e::{Server, free_port};
use airlock_testkit::oidc::{Account, OidcClient, OidcProvider};
use reqwest::StatusCode;
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_airlock");
const CLIENT_SECRET: &str = "client-secret-e2e";

struct Setup {
    server: Server,
    provider: OidcProvider,
}

/// A provider with the server's redirect URI registered, and the server trusting the provider's CA.
fn setup() -> Setup {
    let port = free_port();
    let redirect = format!("https://127.0.0.1:{port}/v1/auth/callback");
    let client = OidcClient {
        post_logout_redirect_uris: vec![format!("https://127.0.0.1:{port}")],
        ..OidcClient::new("airlock", CLIENT_SECRET, &redirect)
    };
    let provider = OidcProvider::start(&[client]);
    let ca = provider.ca_file();
    let listen = format!("127.0.0.1:{port}");
    let server = Server::start_with(
        BIN,
        &["--listen", &listen, "--issuer-ca-file", ca.to_str().unwrap(), "--allow-private-issuers"],
    );
    assert_eq!(server.url, format!("https://127.0.0.1:{port}"));
    let out = Command::new(BIN)
        .args(["idp", "set", "--issuer", provider.issuer(), "--client-id", "airlock"])
        .env("AIRLOCK_IDP_CLIENT_SECRET", CLIENT_SECRET)
        .env("AIRLOCK_URL", &server.url)
        .env("AIRLOCK_TOKEN", &server.token)
        .env("AIRLOCK_CA_FINGERPRINT", &server.fingerprint)
        .output()
        .unwrap();
    assert!(out.status.success(), "idp set: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("/v1/auth/callback"));
    for (group, role) in [("eng", "viewer"), ("deployers", "deployer"), ("admins", "admin")] {
        server.ok(&["role-mapping", "add", group, "--role", role]);
    }
    Setup { server, provider }
}

impl Setup {
    fn browser(&self) -> reqwest::Client {
        self.provider.browser(Some(self.server.fingerprint.parse::<Fingerprint>().unwrap()))
    }

    fn login_url(&self) -> String {
        format!("{}/v1/auth/login?tenant={}", self.server.url, self.server.tenant)
    }

    /// Drives a login as `subject` in `browser` up to the callback URL (not yet called).
    async fn callback(&self, browser: &reqwest::Client, subject: &str) -> String {
        self.provider.login_as(subject);
        self.provider.drive_login(browser, &self.login_url()).await
    }

    /// A whole login in `browser`: the callback's status and body.
    async fn login(&self, browser: &reqwest::Client, subject: &str) -> (StatusCode, Value) {
        let callback = self.callback(browser, subject).await;
        let resp = browser.get(&callback).send().await.unwrap();
        let status = resp.status();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, browser: &reqwest::Client, path: &str) -> (StatusCode, Value) {
        let resp = browser.get(format!("{}{path}", self.server.url)).send().await.unwrap();
        let status = resp.status();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// A POST as the server's own pages send it (with `Origin`).
    async fn post(&self, browser: &reqwest::Client, path: &str, body: Value) -> (StatusCode, Value) {
        let resp = browser
            .post(format!("{}{path}", self.server.url))
            .header("origin", &self.server.url)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    fn envs_path(&self) -> String {
        format!("/v1/workspaces/{}/environments", self.server.workspace)
    }

    fn user_login_reasons(&self) -> Vec<String> {
        self.server
            .audit_records()
            .iter()
            .filter(|r| r["action"] == "user.login" && r["outcome"] == "denied")
            .map(|r| r["detail"]["reason"].as_str().unwrap_or_default().to_owned())
            .collect()
    }
}

#[tokio::test]
async fn a_person_signs_in_reads_with_the_session_cookie_and_their_groups_decide_what_they_may_do() {
    let s = setup();
    s.provider.set_account("alice", Account::new("alice@example.com", &["eng"]));
    let browser = s.browser();
    let (status, me) = s.login(&browser, "alice").await;
    // The callback answers 303 to the session page; this browser follows no redirect, so read it.
    assert_eq!(status, StatusCode::SEE_OTHER, "{me}");
    let (status, me) = s.get(&browser, "/v1/auth/session").await;
    assert_eq!(status, StatusCode::OK, "{me}");
    assert_eq!(me["principal"], "user:alice");
    assert_eq!(me["roles"], json!([{ "role": "viewer", "workspace_id": null }]));
    // A viewer reads, and writes nothing.
    let (status, v) = s.get(&browser, &s.envs_path()).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let (status, v) = s.post(&browser, &s.envs_path(), json!({ "name": "from-alice" })).await;
    assert_eq!((status, v["error"]["code"].as_str()), (StatusCode::FORBIDDEN, Some("not_granted")), "{v}");

    // Without Origin or the CSRF header, a cookie-authenticated write is refused before anything else.
    let resp = browser.post(format!("{}/v1/auth/logout", s.server.url)).json(&json!({})).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert_eq!(resp.json::<Value>().await.unwrap()["error"]["code"], "csrf_refused");

    // A change of groups at the provider counts from the next sign-in: now an admin.
    s.provider.set_account("alice", Account::new("alice@example.com", &["admins"]));
    let (status, _) = s.get(&browser, "/v1/auth/session").await;
    assert_eq!(status, StatusCode::OK, "the old session still holds its old roles");
    let (status, v) = s.post(&browser, &s.envs_path(), json!({ "name": "still-viewer" })).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{v}");
    let (status, _) = s.login(&browser, "alice").await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let (status, v) = s.post(&browser, &s.envs_path(), json!({ "name": "from-alice" })).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");

    // A deployer in another browser deploys but administers nothing.
    s.provider.set_account("dave", Account::new("dave@example.com", &["deployers"]));
    let dave = s.browser();
    let (status, _) = s.login(&dave, "dave").await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let (status, me) = s.get(&dave, "/v1/auth/session").await;
    assert_eq!((status, me["roles"][0]["role"].as_str()), (StatusCode::OK, Some("deployer")), "{me}");
    let (status, _) = s.post(&dave, &s.envs_path(), json!({ "name": "from-dave" })).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // An admin (here the owner's token) ends alice's sessions: her next request is refused.
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(airlock_proto::tls::pinned_client_config(s.server.fingerprint.parse().unwrap()))
        .build()
        .unwrap();
    let resp = client
        .post(format!("{}/v1/users/alice/end-sessions", s.server.url))
        .bearer_auth(&s.server.token)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let (status, v) = s.get(&browser, "/v1/auth/session").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{v}");
    // Dave logs out: his next request is refused too.
    let (status, v) = s.post(&dave, "/v1/auth/logout", json!({})).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let (status, _) = s.get(&dave, "/v1/auth/session").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // Audited on the tenant's chain as the user, with no code, token or secret.
    let records = s.server.audit_records();
    let logins = records.iter().filter(|r| r["action"] == "user.login" && r["outcome"] == "success").count();
    assert_eq!(logins, 3);
    for action in ["user.logout", "user.sessions_end"] {
        assert!(records.iter().any(|r| r["action"] == action), "{action}");
    }
    let text = serde_json::to_string(&records).unwrap();
    assert!(!text.contains("airlock_ss_") && !text.contains(CLIENT_SECRET));
    assert!(!s.server.log().contains(CLIENT_SECRET), "the client secret is never logged");
}

#[tokio::test]
async fn unmapped_groups_mfa_replayed_and_cookie_less_callbacks_are_refused_with_no_session() {
    let s = setup();
    // Groups that map to no role: 403 with a clear message.
    s.provider.set_account("nobody", Account::new("nobody@example.com", &["marketing"]));
    let browser = s.browser();
    let (status, v) = s.login(&browser, "nobody").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("your groups map to no role in this tenant"), "{v}");
    assert_eq!(s.get(&browser, "/v1/auth/session").await.0, StatusCode::UNAUTHORIZED);

    // A callback replayed: its login was consumed, so it is refused and opens no second session.
    s.provider.set_account("alice", Account::new("alice@example.com", &["eng"]));
    // A browser of its own: the provider would otherwise carry on the session it holds for `nobody`.
    let browser = s.browser();
    let callback = s.callback(&browser, "alice").await;
    assert_eq!(browser.get(&callback).send().await.unwrap().status(), StatusCode::SEE_OTHER);
    let replay = browser.get(&callback).send().await.unwrap();
    assert_eq!(replay.status(), StatusCode::BAD_REQUEST);
    assert!(
        replay.headers().get("set-cookie").is_none_or(|c| !c.to_str().unwrap().contains("airlock_session=airlock"))
    );

    // The callback from a browser that did not start the login (no pre-login cookie): refused, and the rightful browser still finishes.
    let victim = s.browser();
    let callback = s.callback(&victim, "alice").await;
    let stranger = s.browser();
    let resp = stranger.get(&callback).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(resp.json::<Value>().await.unwrap()["error"]["code"], "login_cookie_mismatch");
    assert_eq!(s.get(&stranger, "/v1/auth/session").await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(victim.get(&callback).send().await.unwrap().status(), StatusCode::SEE_OTHER);

    // A state that names no login: refused.
    let mut forged = reqwest::Url::parse(&callback).unwrap();
    let kept: Vec<(String, String)> = forged
        .query_pairs()
        .map(|(k, v)| if k == "state" { (k.into(), "forged".into()) } else { (k.into(), v.into()) })
        .collect();
    forged.query_pairs_mut().clear().extend_pairs(kept);
    assert_eq!(browser.get(forged.as_str()).send().await.unwrap().status(), StatusCode::BAD_REQUEST);

    // The tenant requires MFA: a password-only sign-in is refused, one with a second factor admitted.
    let out = Command::new(BIN)
        .args(["idp", "set", "--issuer", s.provider.issuer(), "--client-id", "airlock", "--require-mfa"])
        .env("AIRLOCK_URL", &s.server.url)
        .env("AIRLOCK_TOKEN", &s.server.token)
        .env("AIRLOCK_CA_FINGERPRINT", &s.server.fingerprint)
        .env_remove("AIRLOCK_IDP_CLIENT_SECRET")
        .output()
        .unwrap();
    assert!(out.status.success(), "the sealed secret is kept: {}", String::from_utf8_lossy(&out.stderr));
    let mfa_browser = s.browser();
    let (status, v) = s.login(&mfa_browser, "alice").await;
    assert_eq!((status, v["error"]["code"].as_str()), (StatusCode::FORBIDDEN, Some("mfa_required")), "{v}");
    s.provider.set_account("alice", Account::new("alice@example.com", &["eng"]).with_mfa());
    let mfa_browser = s.browser();
    let (status, v) = s.login(&mfa_browser, "alice").await;
    assert_eq!(status, StatusCode::SEE_OTHER, "{v}");
    assert_eq!(s.get(&mfa_browser, "/v1/auth/session").await.0, StatusCode::OK);

    // The provider refusing the login comes back as a refusal, audited.
    s.provider.refuse_logins();
    let refused_browser = s.browser();
    let callback = s.provider.drive_login(&refused_browser, &s.login_url()).await;
    let resp = refused_browser.get(&callback).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);

    let reasons = s.user_login_reasons();
    for reason in ["no_role", "mfa_required", "provider_refused"] {
        assert!(reasons.iter().any(|r| r == reason), "{reason} in {reasons:?}");
    }
}

/// Step-up against the real provider: token management by a session whose provider sign-in is older than the tenant's
/// `max_age` is refused with where to sign in again; that login asks the provider for a fresh sign-in (`max_age`,
/// `prompt=login`), and only a fresh one lifts the refusal. (The server's clock is the system's here: the provider
/// backdates the sign-in instead, as one answering from an old sign-in would.)
#[tokio::test]
async fn step_up_sends_the_person_back_to_the_provider_and_only_a_fresh_sign_in_lifts_it() {
    let s = setup();
    let out = Command::new(BIN)
        .args(["idp", "set", "--issuer", s.provider.issuer(), "--client-id", "airlock", "--max-age", "5m"])
        .env("AIRLOCK_URL", &s.server.url)
        .env("AIRLOCK_TOKEN", &s.server.token)
        .env("AIRLOCK_CA_FINGERPRINT", &s.server.fingerprint)
        .env_remove("AIRLOCK_IDP_CLIENT_SECRET")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let two_hours = std::time::Duration::from_secs(7200);
    s.provider.set_account("ada", Account::new("ada@example.com", &["admins"]).authenticated_ago(two_hours));
    let browser = s.browser();
    let (status, v) = s.login(&browser, "ada").await;
    assert_eq!(status, StatusCode::SEE_OTHER, "an ordinary sign-in takes the provider's word on when: {v}");
    // Reads need no recent sign-in; token management does.
    assert_eq!(s.get(&browser, &s.envs_path()).await.0, StatusCode::OK);
    let resp = browser.get(format!("{}/v1/tokens", s.server.url)).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let login = resp.headers()["x-airlock-login"].to_str().unwrap().to_owned();
    assert_eq!(resp.json::<Value>().await.unwrap()["error"]["code"], "reauthentication_required");
    assert_eq!(login, format!("/v1/auth/login?tenant={}&max_age=300", s.server.tenant));
    let login = format!("{}{login}", s.server.url);

    // The login URL asks the provider for a sign-in at most that old, made now.
    let resp = browser.get(&login).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::FOUND);
    let authorize = reqwest::Url::parse(resp.headers()["location"].to_str().unwrap()).unwrap();
    assert!(authorize.as_str().starts_with(s.provider.issuer()), "{authorize}");
    let param = |n: &str| authorize.query_pairs().find(|(k, _)| k == n).map(|(_, v)| v.into_owned());
    assert_eq!((param("max_age").as_deref(), param("prompt").as_deref()), (Some("300"), Some("login")));

    // A provider that answers with the old sign-in anyway: refused, and token management stays refused.
    s.provider.login_as("ada");
    let callback = s.provider.drive_login(&browser, &login).await;
    let resp = browser.get(&callback).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(resp.json::<Value>().await.unwrap()["error"]["code"], "reauthentication_required");
    assert_eq!(s.get(&browser, "/v1/tokens").await.0, StatusCode::UNAUTHORIZED);
    assert!(s.user_login_reasons().iter().any(|r| r == "reauthentication_required"));

    // A fresh sign-in at the provider lifts it.
    s.provider.set_account("ada", Account::new("ada@example.com", &["admins"]));
    let callback = s.provider.drive_login(&browser, &login).await;
    let resp = browser.get(&callback).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let (status, v) = s.get(&browser, "/v1/tokens").await;
    assert_eq!(status, StatusCode::OK, "{v}");
}

/// Logging out of a browser session also ends the provider's session: the answer names the provider's
/// `end_session_endpoint` with the session's ID token and this server as where to come back to.
#[tokio::test]
async fn a_browser_logout_sends_the_person_to_the_providers_logout_and_ends_the_session_there_too() {
    let s = setup();
    s.provider.set_account("alice", Account::new("alice@example.com", &["eng"]));
    let browser = s.browser();
    assert_eq!(s.login(&browser, "alice").await.0, StatusCode::SEE_OTHER);
    // While the provider's session lives, a sign-in completes there without asking anything (here: a user who would
    // refuse, were they asked).
    s.provider.refuse_logins();
    let callback = s.provider.drive_login(&browser, &s.login_url()).await;
    assert_eq!(browser.get(&callback).send().await.unwrap().status(), StatusCode::SEE_OTHER, "{callback}");

    let (status, v) = s.post(&browser, "/v1/auth/logout", json!({})).await;
    assert_eq!((status, &v["ended"]), (StatusCode::OK, &json!(true)), "{v}");
    let logout = reqwest::Url::parse(v["provider_logout_url"].as_str().unwrap()).unwrap();
    assert!(logout.as_str().starts_with(s.provider.issuer()), "{logout}");
    let param = |n: &str| logout.query_pairs().find(|(k, _)| k == n).map(|(_, v)| v.into_owned());
    assert_eq!(param("id_token_hint").unwrap().split('.').count(), 3, "a JWT");
    assert_eq!(param("client_id").as_deref(), Some("airlock"));
    assert_eq!(param("post_logout_redirect_uri"), Some(s.server.url.clone()));
    assert_eq!(s.get(&browser, "/v1/auth/session").await.0, StatusCode::UNAUTHORIZED, "ended here at once");

    // The provider asks its user to confirm (its own page); they do, and come back here.
    let page = browser.get(logout.clone()).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let page = page.text().await.unwrap();
    let attr = |after: &str, name: &str| {
        let start = page.find(after).unwrap();
        let rest = &page[start..];
        let at = rest.find(&format!("{name}=\"")).unwrap() + name.len() + 2;
        rest[at..at + rest[at..].find('"').unwrap()].to_owned()
    };
    let action = logout.join(&attr("<form", "action")).unwrap();
    let xsrf = attr("name=\"xsrf\"", "value");
    let resp = browser.post(action).form(&[("xsrf", xsrf.as_str()), ("logout", "yes")]).send().await.unwrap();
    assert!(resp.status().is_redirection(), "{}", resp.status());
    let back = resp.headers()["location"].to_str().unwrap().to_owned();
    assert!(back.starts_with(&s.server.url), "{back}");

    // The provider's session is gone: signing in now asks the user, who refuses.
    let callback = s.provider.drive_login(&browser, &s.login_url()).await;
    assert_eq!(browser.get(&callback).send().await.unwrap().status(), StatusCode::UNAUTHORIZED, "{callback}");
}

#[tokio::test]
async fn airlock_login_takes_the_session_through_a_loopback_redirect_and_keeps_it_mode_0600() {
    let s = setup();
    s.provider.set_account("alice", Account::new("alice@example.com", &["eng"]));
    s.provider.login_as("alice");
    let home = tempfile::tempdir().unwrap();
    let mut cli = Command::new(BIN)
        .args(["login", "--server", &s.server.url, "--tenant", &s.server.tenant])
        .args(["--ca-fingerprint", &s.server.fingerprint])
        .env("XDG_CONFIG_HOME", home.path())
        .env_remove("AIRLOCK_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The CLI prints the URL to open; read it from its stderr.
    let stderr = cli.stderr.take().unwrap();
    let url = tokio::task::spawn_blocking(move || {
        BufReader::new(stderr).lines().map_while(Result::ok).find(|l| l.starts_with("https://")).unwrap()
    })
    .await
    .unwrap();
    assert!(url.contains("cli_challenge=") && url.contains("cli_redirect="), "{url}");
    let browser = s.browser();
    // The link could have been sent to someone else: the provider is asked to have them sign in, even if its session
    // in this browser would do (`prompt=login`; see `sso::login::begin`).
    let resp = s.browser().get(&url).send().await.unwrap();
    let authorize = resp.headers()["location"].to_str().unwrap().to_owned();
    let authorize = reqwest::Url::parse(&authorize).unwrap();
    assert!(authorize.query_pairs().any(|(k, v)| k == "prompt" && v == "login"), "{authorize}");
    let callback = s.provider.drive_login(&browser, &url).await;
    let resp = browser.get(&callback).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::FOUND);
    let loopback = resp.headers()["location"].to_str().unwrap().to_owned();
    assert!(loopback.starts_with("http://127.0.0.1:"), "{loopback}");
    let page = browser.get(&loopback).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let out = tokio::task::spawn_blocking(move || cli.wait_with_output()).await.unwrap().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("signed in as user:alice"), "{out:?}");

    let file = home.path().join("airlock/credentials.json");
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    let stored: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert!(stored["session"].as_str().unwrap().starts_with("airlock_ss_"));

    // Later commands use the stored session when no token is given.
    let as_user = |args: &[&str]| {
        Command::new(BIN).args(args).env("XDG_CONFIG_HOME", home.path()).env_remove("AIRLOCK_TOKEN").output().unwrap()
    };
    let listed = as_user(&["env", "list", "--workspace", &s.server.workspace]);
    assert!(listed.status.success(), "{}", String::from_utf8_lossy(&listed.stderr));
    let refused = as_user(&["env", "create", "nope", "--workspace", &s.server.workspace]);
    assert!(!refused.status.success(), "a viewer creates nothing");

    // The code is single use: exchanging it again is refused.
    let code = reqwest::Url::parse(&loopback).unwrap().query_pairs().find(|(k, _)| k == "code").unwrap().1.into_owned();
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(airlock_proto::tls::pinned_client_config(s.server.fingerprint.parse().unwrap()))
        .build()
        .unwrap();
    let again = client
        .post(format!("{}/v1/auth/cli/exchange", s.server.url))
        .json(&json!({ "code": code, "verifier": "x".repeat(43) }))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::UNAUTHORIZED);

    let out = as_user(&["logout"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!file.exists());
    let session = stored["session"].as_str().unwrap();
    let resp = client.get(format!("{}/v1/auth/session", s.server.url)).bearer_auth(session).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "the session ended on the server");
}
