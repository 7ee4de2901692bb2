//! People sign in through their tenant's OpenID provider (authorization code + PKCE) and hold a server-side session.
//!
//! - [`idp`]: each tenant's provider (issuer, client, scopes, groups claim, MFA, step-up `max_age`), checked by fetching its discovery when set; the client secret sealed under the KEK, bound to the tenant, never shown.
//! - [`mappings`]: provider groups mapped to roles, tenant-wide or in one workspace; a user's roles are those their groups map to at sign-in, a snapshot kept in the session (a change at the provider counts from the next sign-in).
//! - [`pending`]: logins between the redirect to the provider and its callback, in memory only: 10 minutes each, at most 16 per source address (a newcomer from that address evicts its own oldest), 128 per network, 1,000 per tenant and 10,000 in all beyond each tenant's first 8 (its reserve), a full level refused alike (`sign_in_busy`) with when to retry (a start from a network where a sign-in of the tenant completed evicts the oldest login from a network the tenant does not know, never one it knows), with login starts rate limited per address and network.
//! - [`login`]: the two halves of a sign-in. `begin` redirects to the provider with state, nonce and a PKCE S256 challenge, and sets a short-lived pre-login cookie bound to the state; `finish` checks the cookie against the state before it consumes the pending login, exchanges the code with the client secret and the PKCE verifier, verifies the ID token (`crate::issuer`), then the nonce, MFA, step-up, and maps groups to roles.
//! - [`sessions`]: timeouts (idle and absolute, on the injected clock), logout, and an admin ending a user's sessions; `crate::authn` authenticates the session cookie (or the CLI's bearer session credential) into a [`crate::authz::Principal::User`] with the same grants a token has.
//!
//! Every sign-in (success or refusal, with a reason code), logout and session end is audited on the tenant's chain as `user:<subject>`; no code, token or secret reaches the audit or a log.
//! A refused sign-in counts against its source address in `crate::authn::FailureLimiter`, as a failed token does; an address past the limit starts no login until its window ends.

pub mod idp;
pub mod login;
pub mod mappings;
pub mod pending;
pub mod sessions;
#[cfg(test)]
mod tests;

use std::time::Duration;

pub use sessions::SessionLimits;

/// The session cookie: host-only, HTTPS only, unreadable by scripts, not sent on cross-site subrequests.
pub const SESSION_COOKIE: &str = "__Host-airlock_session";
/// The pre-login cookie: binds the browser that started a login to its state until the callback.
pub const LOGIN_COOKIE: &str = "__Host-airlock_login";
/// The header a script sends on a cookie-authenticated unsafe request when it cannot send `Origin` (CSRF).
pub const CSRF_HEADER: &str = "x-airlock-csrf";
/// The header that tells a signed-in user where to sign in again when an action needs a recent sign-in.
pub const LOGIN_HEADER: &str = "x-airlock-login";

/// The sign-in state a running server keeps: its public URL, session limits and the logins in progress.
#[derive(Debug)]
pub struct Sso {
    /// The server's public HTTPS URL (`https://host:port`): the redirect URI's origin, and the one `Origin` a cookie-authenticated unsafe request may carry.
    pub public_url: String,
    pub limits: SessionLimits,
    pub pending: pending::PendingLogins,
    pub cli_codes: pending::CliCodes,
}

impl Sso {
    pub fn new(public_url: &str, limits: SessionLimits, sign_in_budget: crate::net::anonymous::Budget) -> Self {
        Self {
            public_url: public_url.trim_end_matches('/').to_owned(),
            limits,
            pending: pending::PendingLogins::new(sign_in_budget),
            cli_codes: pending::CliCodes::default(),
        }
    }

    /// The redirect URI registered with every tenant's provider.
    pub fn redirect_uri(&self) -> String {
        format!("{}/v1/auth/callback", self.public_url)
    }
}

/// How long a pending login waits for its callback.
pub const LOGIN_TTL: Duration = Duration::from_secs(10 * 60);

/// The value of cookie `name` in a request's `Cookie` headers, if sent once with a sane value.
pub fn cookie<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    let mut found = None;
    for value in headers.get_all(http::header::COOKIE) {
        let Ok(text) = value.to_str() else { continue };
        for pair in text.split(';') {
            if let Some((k, v)) = pair.trim().split_once('=')
                && k == name
            {
                if found.is_some() {
                    // Two cookies of one name: one was planted (a sibling domain cannot set `__Host-` cookies, but be strict).
                    return None;
                }
                found = Some(v);
            }
        }
    }
    found.filter(|v| !v.is_empty() && v.len() <= 256)
}

/// A `Set-Cookie` value for a host-only, secure, script-proof cookie; `max_age` 0 clears it.
pub fn set_cookie(name: &str, value: &str, max_age: Duration) -> String {
    format!("{name}={value}; Secure; HttpOnly; SameSite=Lax; Path=/; Max-Age={}", max_age.as_secs())
}

/// Random bytes as URL-safe text (state, nonce, PKCE verifier, the pre-login cookie).
pub(crate) fn random_text() -> String {
    data_encoding::BASE64URL_NOPAD.encode(&crate::state::random::<32>())
}

/// SHA-256 of `text`, as URL-safe text: the PKCE S256 challenge, and how the pre-login cookie is kept.
pub(crate) fn sha256_text(text: &str) -> String {
    data_encoding::BASE64URL_NOPAD.encode(ring::digest::digest(&ring::digest::SHA256, text.as_bytes()).as_ref())
}
