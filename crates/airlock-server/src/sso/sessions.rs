//! Sessions of signed-in users: their timeouts (decided by [`check`], on the injected clock), logout, and an admin ending every session of one user (which also cuts off what the user set going: [`end_user_sessions`]).
//!
//! A session lives at most [`SessionLimits::absolute`] from its sign-in, and ends after [`SessionLimits::idle`] without a request.
//! Its last use is written at most once a [`SessionLimits::TOUCH_INTERVAL`], so it may end up to that much before its idle timeout, never after.
//! Step-up: identity and token management by a session need a sign-in no older than the tenant's `max_age` ([`needs_step_up`], [`recent_enough`]).

use std::time::Duration;

use airlock_core::Timestamp;
use airlock_core::audit::{AuditAction, Outcome};

use crate::authz::{Permission, Principal, TenantScope};
use crate::state::{AppState, event};
use crate::store::{SessionRow, StoreError};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionLimits {
    pub idle: Duration,
    pub absolute: Duration,
}

impl Default for SessionLimits {
    fn default() -> Self {
        Self { idle: Duration::from_secs(30 * 60), absolute: Duration::from_secs(12 * 3600) }
    }
}

impl SessionLimits {
    /// How often a live session's last use is written at most.
    pub const TOUCH_INTERVAL: Duration = Duration::from_secs(60);
}

/// Why a session no longer authenticates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionEnd {
    /// Ended already: logout, or an admin.
    Ended,
    /// No request for [`SessionLimits::idle`].
    Idle,
    /// Past [`SessionLimits::absolute`] since its sign-in.
    Absolute,
}

impl SessionEnd {
    pub fn reason(self) -> &'static str {
        match self {
            SessionEnd::Ended => "ended",
            SessionEnd::Idle => "idle",
            SessionEnd::Absolute => "absolute",
        }
    }
}

/// Whether `session` still authenticates at `now`.
pub fn check(session: &SessionRow, limits: SessionLimits, now: Timestamp) -> Result<(), SessionEnd> {
    if session.ended_at.is_some() {
        Err(SessionEnd::Ended)
    } else if now >= session.created_at.saturating_add(limits.absolute) {
        Err(SessionEnd::Absolute)
    } else if now >= session.last_seen_at.saturating_add(limits.idle) {
        Err(SessionEnd::Idle)
    } else {
        Ok(())
    }
}

/// Whether a live session's last use should be written now.
pub fn due_for_touch(session: &SessionRow, now: Timestamp) -> bool {
    now >= session.last_seen_at.saturating_add(SessionLimits::TOUCH_INTERVAL)
}

/// Permissions a session exercises only with a recent sign-in (when the tenant sets `max_age`): identity and token management.
pub fn needs_step_up(permission: Permission) -> bool {
    matches!(permission, Permission::IdentityManage | Permission::TokensManage)
}

/// Whether a sign-in at `auth_time` is within `max_age` of `now` (a minute of leeway for the provider's clock).
pub fn recent_enough(auth_time: Timestamp, max_age: Duration, now: Timestamp) -> bool {
    now < auth_time.saturating_add(max_age).saturating_add(Duration::from_secs(60))
}

/// Ends the caller's own session (logout): the very next request with it is refused.
pub async fn logout(state: &AppState, scope: &TenantScope) -> Result<bool, StoreError> {
    let Principal::User { session, subject, .. } = scope.principal() else { return Ok(false) };
    let now = state.now();
    let mut tx = state.store.write().await?;
    if !tx.end_session(scope, *session, "logout", now).await? {
        return Ok(false);
    }
    let mut ev = event(format!("user:{subject}"), AuditAction::UserLogout, Outcome::Success);
    ev.target = Some(session.to_string());
    tx.audit(&scope.chain(), now, ev).await?;
    tx.commit().await?;
    Ok(true)
}

/// Where to send a browser whose session was just logged out so the provider's own session ends too (OpenID Connect
/// RP-Initiated Logout): the provider's `end_session_endpoint` with the session's ID token as `id_token_hint`, the
/// client id, and this server's public URL as `post_logout_redirect_uri` (register it with the provider). `None` when
/// the provider names no such endpoint, or cannot be asked now: the session here is ended either way.
pub async fn provider_logout_url(state: &AppState, scope: &TenantScope) -> Option<String> {
    let Principal::User { session, .. } = scope.principal() else { return None };
    let config = match state.store.idp_config(scope).await {
        Ok(config) => config?,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the identity provider for its logout");
            return None;
        }
    };
    let discovery = match state.issuers.discovery(&config.issuer, state.now()).await {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the identity provider's discovery for its logout");
            return None;
        }
    };
    let mut url = reqwest::Url::parse(&discovery.end_session_endpoint?).ok().filter(|u| u.scheme() == "https")?;
    // A session opened before ID tokens were kept, or one whose sealed token no longer opens, still logs out there:
    // the provider then asks its user to confirm, as the client id alone does not show who is leaving.
    let hint = match state.store.session_id_token(scope, *session).await {
        Ok(Some(sealed)) => state
            .kek
            .open(&sealed, &super::login::id_token_aad(scope.tenant(), *session))
            .ok()
            .and_then(|t| String::from_utf8(t).ok()),
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the session's ID token for the provider's logout");
            None
        }
    };
    {
        let mut q = url.query_pairs_mut();
        if let Some(hint) = &hint {
            q.append_pair("id_token_hint", hint);
        }
        q.append_pair("client_id", &config.client_id).append_pair("post_logout_redirect_uri", &state.sso.public_url);
    }
    Some(url.into())
}

/// Ends every live session of `subject` in the tenant at once (an admin, `identity:manage`); how many.
/// It also leaves a cut-off for the user, which halts the rollouts they created before it (`crate::rollouts`);
/// a user's own logout leaves none, since a rollout outliving the session that started it is the point of one.
pub async fn end_user_sessions(state: &AppState, scope: &TenantScope, subject: &str) -> Result<u64, StoreError> {
    let now = state.now();
    let mut tx = state.store.write().await?;
    let ended = tx.end_user_sessions(scope, subject, "ended_by_admin", now).await?;
    tx.cut_off_user_sessions(scope, subject, now).await?;
    let mut ev = event(scope.principal().actor(), AuditAction::UserSessionsEnd, Outcome::Success);
    ev.target = Some(format!("user:{}", subject.chars().take(255).collect::<String>()));
    ev.detail = serde_json::json!({ "sessions_ended": ended });
    tx.audit(&scope.chain(), now, ev).await?;
    tx.commit().await?;
    Ok(ended)
}
