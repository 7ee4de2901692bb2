//! The two halves of a sign-in: [`begin`] sends the browser to the tenant's provider, [`finish`] takes it back at the callback and opens a session.
//!
//! `finish` decides in this order, each refusal typed ([`LoginRefusal`]) and audited with its code: the state names a login in progress and the pre-login cookie matches it (else nothing is consumed); the login is consumed (single use) and not expired; the provider did not answer with an error; the tenant's provider is still the one the login went to; the code is redeemed at the token endpoint with the client secret and the PKCE verifier (a replayed code is refused there); the ID token verifies (`crate::issuer`: signature through the JWKS, issuer, audience, expiry); then its nonce, `azp`, subject, step-up `max_age`, MFA; and the groups map to at least one role.
//! Only then is the session stored with its audit record, in one transaction.

use std::net::IpAddr;
use std::time::Duration;

use airlock_core::audit::{AuditAction, Outcome};
use airlock_core::id::SessionId;
use airlock_core::token::{Secret, TokenKind};
use airlock_core::{TenantId, Timestamp};
use serde::Deserialize;

use super::mappings::{MAX_GROUPS, roles_for_groups, valid_group};
use super::pending::{CliLogin, PendingLogin, StartRefusal, TakeRefusal};
use super::{LOGIN_TTL, idp, random_text, sha256_text};
use crate::authz::{Role, TenantScope};
use crate::issuer::{Expect, IssuerError, JwtRefusal};
use crate::net::anonymous::Over;
use crate::state::{AppState, SYSTEM_CHAIN, event, random};
use crate::store::{NewSession, SessionKind, StoreError};

/// Why a sign-in was refused; [`LoginRefusal::code`] is what the audit records and the API answers.
#[derive(Debug, thiserror::Error)]
pub enum LoginRefusal {
    #[error("{0}")]
    BadRequest(String),
    #[error("this tenant has no identity provider configured")]
    NoProvider,
    #[error("too many logins from this address; retry in {0:?}")]
    RateLimited(Duration),
    /// The logins in progress of one level hold their share ([`crate::net::anonymous`]): the newcomer's address or
    /// network, the tenant it signs in to, or the server. Retry once the oldest of them expires.
    /// The answer is the same for every level (`sign_in_busy`): which one is full is the server's log's and, for the
    /// tenant's own, its audit's ([`busy_level`]), never an anonymous caller's (a full table is other tenants' load).
    #[error("too many sign-ins are in progress; retry in {} s", .retry_after.as_secs().max(1))]
    Busy { level: Over, retry_after: Duration },
    #[error("no login in progress has this state; start again")]
    UnknownState,
    #[error("this browser did not start this login (its pre-login cookie is missing or another's); start again")]
    CookieMismatch,
    #[error("the login took more than 10 minutes; start again")]
    Expired,
    #[error("the identity provider refused the login ({0})")]
    ProviderRefused(String),
    #[error("the tenant's identity provider changed during the login; start again")]
    ProviderChanged,
    /// The callback's `iss` (RFC 9207) names another issuer than the one the login went to: a mix-up.
    #[error("the callback comes from another issuer than the one this login went to")]
    IssuerMismatch,
    #[error("the identity provider cannot be used: {0}")]
    ProviderUnavailable(String),
    #[error("the identity provider refused the authorization code (used already, or not issued for this login)")]
    CodeRejected,
    #[error("the ID token was refused: {}", .0.reason())]
    IdToken(JwtRefusal),
    #[error("the ID token's nonce is not this login's")]
    NonceMismatch,
    #[error("the ID token lacks a usable {0}")]
    BadClaims(&'static str),
    #[error("this action needs a recent sign-in, and the identity provider's is older")]
    NotRecent,
    #[error(
        "this tenant requires multi-factor authentication, and the identity provider does not show one for this sign-in"
    )]
    MfaRequired,
    #[error("your groups map to no role in this tenant; ask an admin to map one of your groups")]
    NoRole,
    #[error("{0}")]
    Internal(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl LoginRefusal {
    /// The audit record's reason, and the API error's code.
    pub fn code(&self) -> &'static str {
        match self {
            LoginRefusal::BadRequest(_) => "bad_request",
            LoginRefusal::NoProvider => "not_found",
            LoginRefusal::RateLimited(_) => "rate_limited",
            LoginRefusal::Busy { .. } => "sign_in_busy",
            LoginRefusal::UnknownState => "login_state_unknown",
            LoginRefusal::CookieMismatch => "login_cookie_mismatch",
            LoginRefusal::Expired => "login_expired",
            LoginRefusal::ProviderRefused(_) => "provider_refused",
            LoginRefusal::ProviderChanged => "provider_changed",
            LoginRefusal::IssuerMismatch => "issuer_mismatch",
            LoginRefusal::ProviderUnavailable(_) => "provider_unavailable",
            LoginRefusal::CodeRejected => "code_rejected",
            LoginRefusal::IdToken(r) => r.code(),
            LoginRefusal::NonceMismatch => "nonce_mismatch",
            LoginRefusal::BadClaims(_) => "bad_claims",
            LoginRefusal::NotRecent => "reauthentication_required",
            LoginRefusal::MfaRequired => "mfa_required",
            LoginRefusal::NoRole => "no_role",
            LoginRefusal::Internal(_) | LoginRefusal::Store(_) => "internal",
        }
    }
}

/// The level of the logins in progress that was full, as the audit records it (`detail.level`).
fn busy_level(level: Over) -> &'static str {
    match level {
        Over::Address => "address",
        Over::Network => "network",
        Over::Party => "tenant",
        Over::Total => "server",
    }
}

/// What `GET /v1/auth/login` asks.
#[derive(Debug)]
pub struct Begin {
    pub tenant: TenantId,
    pub return_to: Option<String>,
    pub max_age: Option<u64>,
    pub cli: Option<CliLogin>,
}

/// Where to send the browser, and the pre-login cookie to set.
#[derive(Debug)]
pub struct Started {
    pub authorize_url: String,
    pub cookie: String,
}

/// A path on this server to return to: absolute, not `//host`, no backslash or control character.
pub fn valid_return_to(path: &str) -> bool {
    path.starts_with('/')
        && !path.starts_with("//")
        && path.len() <= 512
        && !path.chars().any(|c| c == '\\' || c.is_control())
}

/// The CLI's loopback redirect: `http://127.0.0.1:<port>/…`, `http://[::1]:<port>/…` or `http://localhost:<port>/…`.
pub fn valid_cli_redirect(url: &str) -> bool {
    let Ok(u) = reqwest::Url::parse(url) else { return false };
    let host = u.host_str().unwrap_or_default();
    let loopback = host == "localhost"
        || host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    u.scheme() == "http" && loopback && u.port().is_some() && u.username().is_empty() && url.len() <= 256
}

pub async fn begin(state: &AppState, req: Begin, from: Option<IpAddr>) -> Result<Started, LoginRefusal> {
    let now = state.now();
    state.sso.pending.admit_start(from, now).map_err(start_refusal)?;
    if req.return_to.as_deref().is_some_and(|p| !valid_return_to(p)) {
        return Err(LoginRefusal::BadRequest("return_to must be a path on this server".into()));
    }
    if let Some(cli) = &req.cli
        && (!valid_cli_redirect(&cli.redirect) || cli.challenge.len() != 43)
    {
        return Err(LoginRefusal::BadRequest(
            "cli_redirect must be a loopback http URL with a port, and cli_challenge a PKCE S256 challenge".into(),
        ));
    }
    let scope = TenantScope::for_system(req.tenant);
    let config = state.store.idp_config(&scope).await?.ok_or(LoginRefusal::NoProvider)?;
    let discovery = state.issuers.discovery(&config.issuer, now).await.map_err(provider_error)?;
    let endpoint = discovery
        .authorization_endpoint
        .ok_or_else(|| LoginRefusal::ProviderUnavailable("its discovery names no authorization endpoint".into()))?;
    let mut url = reqwest::Url::parse(&endpoint)
        .map_err(|_| LoginRefusal::ProviderUnavailable("its authorization endpoint is not a URL".into()))?;
    let (login_state, nonce, verifier, cookie) = (random_text(), random_text(), random_text(), random_text());
    {
        let mut q = url.query_pairs_mut();
        q.append_pair("response_type", "code")
            .append_pair("client_id", &config.client_id)
            .append_pair("redirect_uri", &state.sso.redirect_uri())
            .append_pair("scope", &config.scopes.join(" "))
            .append_pair("state", &login_state)
            .append_pair("nonce", &nonce)
            .append_pair("code_challenge", &sha256_text(&verifier))
            .append_pair("code_challenge_method", "S256");
        if let Some(max_age) = req.max_age {
            q.append_pair("max_age", &max_age.to_string());
        }
        // A CLI sign-in always makes the person authenticate at the provider again (`prompt=login`), as gcloud and az
        // do. Its link can be sent to someone else (phishing): in a browser already signed in to the provider, the
        // login would otherwise complete with no action of theirs and hand the one-time code to the loopback port of
        // whatever process listens on their machine. The provider's own sign-in page, the one place they are used to
        // checking, then stands between the link and the code, with MFA if the provider asks for it. (An interstitial
        // page of ours would be a click on a page the link's sender chose to send them to; the provider's credential
        // prompt is a deliberate act at a page they trust.)
        if req.max_age.is_some() || req.cli.is_some() {
            q.append_pair("prompt", "login");
        }
    }
    let pending = PendingLogin {
        tenant: req.tenant,
        issuer: config.issuer,
        client_id: config.client_id,
        nonce,
        verifier,
        binding: sha256_text(&cookie),
        started: now,
        from,
        return_to: req.return_to,
        max_age: req.max_age,
        cli: req.cli,
    };
    if let Err(refused) = state.sso.pending.insert(login_state, pending, now) {
        // Only the tenant's own share being full is the tenant's news: a full network or server says nothing about it,
        // and auditing those on its chain would let anyone fill it. Such a record is limited under its own key, so a
        // flood of them cannot crowd out the records of refused callbacks (MFA missing, issuer mismatch).
        if let StartRefusal::Busy { level: level @ Over::Party, .. } = refused {
            let mut ev = event("anonymous", AuditAction::UserLogin, Outcome::Denied);
            ev.detail = serde_json::json!({ "reason": start_refusal(refused).code(), "level": busy_level(level) });
            state.audit_refusal_keyed(&req.tenant.to_string(), TENANT_BUSY_LIMITER_KEY, ev).await;
        }
        return Err(start_refusal(refused));
    }
    Ok(Started { authorize_url: url.into(), cookie })
}

/// The refusal limiter's key for a start refused because its tenant is full (not its action's, `user.login`).
const TENANT_BUSY_LIMITER_KEY: &str = "user.login.tenant_busy";

fn start_refusal(r: StartRefusal) -> LoginRefusal {
    match r {
        StartRefusal::RateLimited(after) => LoginRefusal::RateLimited(after),
        StartRefusal::Busy { level, retry_after } => LoginRefusal::Busy { level, retry_after },
    }
}

fn provider_error(e: IssuerError) -> LoginRefusal {
    LoginRefusal::ProviderUnavailable(match e {
        IssuerError::NotAllowed(why) => format!("its address is not allowed: {why}"),
        IssuerError::Unreachable(why) => format!("unreachable: {why}"),
        IssuerError::BadAnswer(why) => format!("unusable answer: {why}"),
    })
}

/// What the provider sent back to `GET /v1/auth/callback`.
#[derive(Debug)]
pub struct Callback {
    pub state: String,
    pub code: Option<String>,
    pub error: Option<String>,
    /// The issuer the provider says it is (RFC 9207), when it says.
    pub iss: Option<String>,
}

/// A sign-in that succeeded.
#[derive(Debug)]
pub enum Finished {
    /// A browser session: set this secret as the session cookie and go to `return_to`.
    Browser { secret: Secret, return_to: Option<String> },
    /// A CLI session: send the browser to the CLI's loopback with this one-time code.
    Cli { redirect: String },
}

/// A refusal, with the tenant and subject it concerns when known (for its audit record).
#[derive(Debug)]
pub struct Refused {
    pub refusal: LoginRefusal,
    pub tenant: Option<TenantId>,
    pub subject: Option<String>,
}

#[derive(Deserialize)]
struct TokenAnswer {
    id_token: Option<String>,
}

/// `amr` values that show a second factor or a phishing-resistant method (RFC 8176).
const MFA_AMR: &[&str] =
    &["mfa", "otp", "hwk", "swk", "sms", "tel", "fpt", "face", "iris", "retina", "vbm", "sc", "pop"];
/// `acr` values that show multi-factor authentication (OpenID PAPE's multi-factor policies).
const MFA_ACR: &[&str] = &[
    "http://schemas.openid.net/pape/policies/2007/06/multi-factor",
    "http://schemas.openid.net/pape/policies/2007/06/multi-factor-physical",
];

/// Whether the token's `amr` or `acr` shows a second factor.
pub fn shows_mfa(amr: &[String], acr: Option<&str>) -> bool {
    amr.iter().any(|m| MFA_AMR.contains(&m.as_str())) || acr.is_some_and(|a| MFA_ACR.contains(&a))
}

fn printable(s: &str, max: usize) -> bool {
    !s.is_empty() && s.chars().count() <= max && !s.chars().any(char::is_control)
}

/// Finishes a login; see the module documentation for the order of checks.
pub async fn finish(state: &AppState, cb: Callback, cookie: Option<&str>) -> Result<(Finished, TenantId), Refused> {
    let now = state.now();
    let anonymous = |refusal| Refused { refusal, tenant: None, subject: None };
    let pending = state.sso.pending.take(&cb.state, cookie, now).map_err(|r| {
        anonymous(match r {
            TakeRefusal::UnknownState => LoginRefusal::UnknownState,
            TakeRefusal::CookieMismatch => LoginRefusal::CookieMismatch,
            TakeRefusal::Expired => LoginRefusal::Expired,
        })
    })?;
    let tenant = pending.tenant;
    let in_tenant =
        |refusal, subject: Option<&str>| Refused { refusal, tenant: Some(tenant), subject: subject.map(str::to_owned) };
    let finished =
        redeem(state, &pending, &cb, now).await.map_err(|(refusal, subject)| in_tenant(refusal, subject.as_deref()))?;
    // The session is stored: the network this login started from is proven for its tenant (`pending`'s priority).
    state.sso.pending.sign_in_completed(tenant, pending.from, now);
    Ok(finished)
}

async fn redeem(
    state: &AppState,
    pending: &PendingLogin,
    cb: &Callback,
    now: Timestamp,
) -> Result<(Finished, TenantId), (LoginRefusal, Option<String>)> {
    let fail = |r: LoginRefusal| (r, None);
    if cb.iss.as_deref().is_some_and(|iss| iss != pending.issuer) {
        return Err(fail(LoginRefusal::IssuerMismatch));
    }
    if let Some(error) = &cb.error {
        let error: String = error.chars().filter(|c| c.is_ascii_graphic()).take(64).collect();
        return Err(fail(LoginRefusal::ProviderRefused(error)));
    }
    let code = cb.code.as_deref().ok_or_else(|| fail(LoginRefusal::BadRequest("the callback has no code".into())))?;
    let scope = TenantScope::for_system(pending.tenant);
    let config =
        state.store.idp_config(&scope).await.map_err(|e| fail(e.into()))?.ok_or(fail(LoginRefusal::NoProvider))?;
    if config.issuer != pending.issuer || config.client_id != pending.client_id {
        return Err(fail(LoginRefusal::ProviderChanged));
    }
    let secret =
        idp::open_secret(state, pending.tenant, &config).map_err(|e| fail(LoginRefusal::Internal(e.to_string())))?;
    let discovery = state.issuers.discovery(&config.issuer, now).await.map_err(|e| fail(provider_error(e)))?;
    let token_endpoint = discovery
        .token_endpoint
        .ok_or_else(|| fail(LoginRefusal::ProviderUnavailable("its discovery names no token endpoint".into())))?;
    let redirect_uri = state.sso.redirect_uri();
    let form = [
        ("grant_type", "authorization_code"),
        ("code", code),
        ("redirect_uri", redirect_uri.as_str()),
        ("code_verifier", pending.verifier.as_str()),
    ];
    let answer: TokenAnswer =
        state.issuers.client().post_form(&token_endpoint, &form, Some((&config.client_id, &secret))).await.map_err(
            |e| {
                fail(match e {
                    // The token endpoint's 400 `invalid_grant`: a replayed, expired or foreign code, or a wrong verifier.
                    IssuerError::BadAnswer(_) => LoginRefusal::CodeRejected,
                    other => provider_error(other),
                })
            },
        )?;
    let id_token = answer.id_token.ok_or_else(|| fail(LoginRefusal::BadClaims("id_token in the token answer")))?;
    let expect = Expect { audience: &config.client_id, max_age: None };
    let claims = state
        .issuers
        .verify(&config.issuer, &id_token, &expect, now)
        .await
        .map_err(|r| fail(LoginRefusal::IdToken(r)))?;
    if claims.str("nonce") != Some(pending.nonce.as_str()) {
        return Err(fail(LoginRefusal::NonceMismatch));
    }
    if claims.strings("aud").len() > 1 && claims.str("azp") != Some(config.client_id.as_str()) {
        return Err(fail(LoginRefusal::BadClaims("azp")));
    }
    let subject =
        claims.str("sub").filter(|s| printable(s, 255)).ok_or(fail(LoginRefusal::BadClaims("sub")))?.to_owned();
    let with_subject = |r: LoginRefusal| (r, Some(subject.clone()));
    let email = claims.str("email").filter(|e| printable(e, 320)).map(str::to_owned);
    // Only the provider's `auth_time` says when the user last authenticated: `iat` is when this token was issued,
    // which a provider does silently from its own single sign-on, so it would pass any step-up. Without the claim
    // the session counts as authenticated long ago (step-up then asks again, with `max_age`, which makes the claim
    // required: OpenID Connect Core §3.1.2.1).
    let auth_time = match claims.int("auth_time") {
        Some(t) => t,
        None if pending.max_age.is_some() => return Err(with_subject(LoginRefusal::BadClaims("auth_time"))),
        None => 0,
    };
    let auth_time = Timestamp::from_unix_millis(auth_time.saturating_mul(1000));
    if let Some(max_age) = pending.max_age
        && !super::sessions::recent_enough(auth_time, Duration::from_secs(max_age), now)
    {
        return Err(with_subject(LoginRefusal::NotRecent));
    }
    if config.require_mfa && !shows_mfa(&claims.strings("amr"), claims.str("acr")) {
        return Err(with_subject(LoginRefusal::MfaRequired));
    }
    let groups: Vec<String> =
        claims.strings(&config.groups_claim).into_iter().filter(|g| valid_group(g)).take(MAX_GROUPS).collect();
    let mappings = state.store.list_role_mappings(&scope).await.map_err(|e| with_subject(e.into()))?;
    let roles = roles_for_groups(&mappings, &groups);
    if roles.is_empty() {
        return Err(with_subject(LoginRefusal::NoRole));
    }
    let kind = if pending.cli.is_some() { SessionKind::Cli } else { SessionKind::Browser };
    let opened =
        Opened { subject: &subject, email: email.as_deref(), roles: &roles, kind, auth_time, id_token: &id_token };
    let secret = open_session(state, &scope, opened, now).await.map_err(with_subject)?;
    let finished = match &pending.cli {
        None => Finished::Browser { secret, return_to: pending.return_to.clone() },
        Some(cli) => {
            let code = state.sso.cli_codes.insert(secret, cli.challenge.clone(), now);
            let mut url = reqwest::Url::parse(&cli.redirect)
                .map_err(|_| with_subject(LoginRefusal::BadRequest("cli_redirect".into())))?;
            url.query_pairs_mut().append_pair("code", &code);
            Finished::Cli { redirect: url.into() }
        }
    };
    Ok((finished, pending.tenant))
}

/// What a verified sign-in opens a session with.
struct Opened<'a> {
    subject: &'a str,
    email: Option<&'a str>,
    roles: &'a [(Role, Option<airlock_core::WorkspaceId>)],
    kind: SessionKind,
    auth_time: Timestamp,
    id_token: &'a str,
}

/// What the ID token kept with a session is sealed to: its tenant and session, so a row copied elsewhere opens nowhere.
pub fn id_token_aad(tenant: TenantId, session: SessionId) -> Vec<u8> {
    format!("airlock-session-id-token:{tenant}:{session}").into_bytes()
}

/// Stores a new session with its audit record (`user.login`, success) in one transaction.
/// Its ID token is kept sealed, for the provider's logout (`id_token_hint`, [`super::sessions::provider_logout_url`]).
async fn open_session(
    state: &AppState,
    scope: &TenantScope,
    o: Opened<'_>,
    now: Timestamp,
) -> Result<Secret, LoginRefusal> {
    let Opened { subject, email, roles, kind, auth_time, id_token } = o;
    let id = SessionId::from_random(random());
    let secret = Secret::from_random(TokenKind::Session, random());
    let sealed = state
        .kek
        .seal(id_token.as_bytes(), &id_token_aad(scope.tenant(), id))
        .map_err(|e| LoginRefusal::Internal(format!("cannot seal the ID token: {e}")))?;
    let mut tx = state.store.write().await?;
    let new =
        NewSession { id, hash: &secret.hash(), subject, email, roles, kind, auth_time, id_token_sealed: Some(&sealed) };
    tx.create_session(scope, new, now).await?;
    let mut ev = event(format!("user:{subject}"), AuditAction::UserLogin, Outcome::Success);
    ev.target = Some(id.to_string());
    ev.detail = serde_json::json!({
        "roles": crate::store::roles_text(roles),
        "kind": kind.as_str(),
        "auth_time": auth_time.to_string(),
    });
    tx.audit(&scope.chain(), now, ev).await?;
    tx.commit().await?;
    Ok(secret)
}

/// Audits a refused sign-in: on the tenant's chain once the login named one, else on the system chain (rate limited).
pub async fn audit_refusal(state: &AppState, refused: &Refused) {
    let actor = refused.subject.as_ref().map_or_else(|| "anonymous".to_owned(), |s| format!("user:{s}"));
    let mut ev = event(actor, AuditAction::UserLogin, Outcome::Denied);
    ev.detail = serde_json::json!({ "reason": refused.refusal.code() });
    let chain = refused.tenant.map_or_else(|| SYSTEM_CHAIN.to_owned(), |t| t.to_string());
    state.audit_refusal(&chain, ev).await;
}

/// The CLI's exchange: its one-time code and the PKCE verifier of the challenge it sent, for the session credential.
pub fn exchange_cli_code(state: &AppState, code: &str, verifier: &str) -> Option<Secret> {
    state.sso.cli_codes.take(code, &sha256_text(verifier), state.now())
}

/// How long the CLI's one-time code waits for its exchange.
pub const CLI_CODE_TTL: Duration = Duration::from_secs(120);

const _: () = assert!(CLI_CODE_TTL.as_secs() < LOGIN_TTL.as_secs());
