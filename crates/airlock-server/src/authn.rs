//! Who is calling: a bearer API token, or a signed-in user's session (its cookie, or the CLI's bearer session credential), turned into a [`TenantScope`], or a typed refusal.
//!
//! A token is checked against the clock on every request (expiry, a rotated secret's grace), never only when its row is read, since rows are cached.
//! Failed token authentications (a well-formed secret that is unknown, revoked, expired or rotated past its grace) are limited per source address and per token ([`FailureLimiter`]): past the limit a failing caller gets 429 with `Retry-After` instead of 401; a valid token still works from a limited address, and a request with no token at all gets 401 (it guesses at nothing).
//! Last use (time, source address) is noted in memory and written at most once a minute per token ([`TokenUsage`]), so a hot token does not turn reads into writes.
//! A session ([`Authenticator::authenticate_session`]) authenticates into [`crate::authz::Principal::User`] with the same [`crate::authz::Grants`] a token has, its roles the snapshot taken at sign-in; a session past its idle or absolute timeout (`crate::sso::sessions::check`, on the injected clock) is ended there and then, and audited.
//! A dead session secret counts as a failure like a dead token's (per address, and per session).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use airlock_core::id::{SessionId, TokenId};
use airlock_core::token::{Secret, TokenKind};
use airlock_core::{TenantId, Timestamp};

use airlock_core::audit::{AuditAction, Outcome};

use crate::authz::{Grants, TenantScope};
use crate::sso::sessions::{self, SessionEnd, SessionLimits};
use crate::store::{Store, StoreError};

/// Why a caller was not authenticated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthnRefusal {
    Missing,
    Malformed,
    Unknown,
    Revoked,
    Expired,
    /// A secret a rotation replaced, past the grace the rotation gave it.
    RotatedPastGrace,
    /// A session that was ended (logout, an admin).
    SessionEnded,
    /// A session unused for longer than the idle timeout.
    SessionIdle,
    /// A session older than the absolute timeout.
    SessionExpired,
    /// Too many failures from this address or with this token; try again after `retry_after`.
    RateLimited {
        retry_after: Duration,
    },
}

impl AuthnRefusal {
    /// The audit record's reason.
    pub fn code(self) -> &'static str {
        match self {
            AuthnRefusal::Missing => "missing_token",
            AuthnRefusal::Malformed => "malformed_token",
            AuthnRefusal::Unknown => "unknown_token",
            AuthnRefusal::Revoked => "revoked_token",
            AuthnRefusal::Expired => "expired_token",
            AuthnRefusal::RotatedPastGrace => "rotated_token",
            AuthnRefusal::SessionEnded => "session_ended",
            AuthnRefusal::SessionIdle => "session_idle",
            AuthnRefusal::SessionExpired => "session_expired",
            AuthnRefusal::RateLimited { .. } => "rate_limited",
        }
    }

    /// What the caller reads.
    pub fn message(self) -> &'static str {
        match self {
            AuthnRefusal::Missing => "missing bearer token",
            AuthnRefusal::Malformed => "malformed authorization header or API token",
            AuthnRefusal::Unknown => "unknown API token",
            AuthnRefusal::Revoked => "this API token was revoked",
            AuthnRefusal::Expired => "this API token has expired",
            AuthnRefusal::RotatedPastGrace => "this API token was rotated and its old secret's grace period is over",
            AuthnRefusal::SessionEnded => "this session has ended; sign in again",
            AuthnRefusal::SessionIdle => "this session ended after a period without use; sign in again",
            AuthnRefusal::SessionExpired => "this session reached its maximum lifetime; sign in again",
            AuthnRefusal::RateLimited { .. } => "too many failed authentications; retry later",
        }
    }
}

/// A refusal, with the tenant and the actor (`token:…`, `user:…`) it concerns when the secret named a known credential.
#[derive(Clone, Debug)]
pub struct Refused {
    pub refusal: AuthnRefusal,
    pub known: Option<(TenantId, String)>,
}

/// The authentication state a server keeps: failure counts and pending last uses.
#[derive(Debug, Default)]
pub struct Authenticator {
    pub failures: FailureLimiter,
    pub usage: TokenUsage,
}

impl Authenticator {
    /// Authenticates `authorization` (the header's value, if any) from `from` at `now`.
    pub async fn authenticate(
        &self,
        store: &Store,
        authorization: Option<&[u8]>,
        from: Option<IpAddr>,
        now: Timestamp,
    ) -> Result<Result<TenantScope, Refused>, StoreError> {
        // A blocked address still gets a valid token through (others may share it, behind one NAT); its failures get 429.
        let address_blocked = from.and_then(|addr| self.failures.blocked(FailureKey::Address(addr), now));
        let refused = |refusal, token: Option<(TenantId, TokenId)>| {
            if let Some(addr) = from {
                self.failures.fail(FailureKey::Address(addr), now);
            }
            let refusal = match address_blocked {
                Some(retry_after) => AuthnRefusal::RateLimited { retry_after },
                None => refusal,
            };
            Ok(Err(Refused { refusal, known: token.map(|(t, id)| (t, format!("token:{id}"))) }))
        };
        // No token, or not one in the token format, guesses at no secret: 401, never counted (its audit records are
        // folded like any refusal's).
        let anonymous = |refusal| Ok(Err(Refused { refusal, known: None }));
        let Some(value) = authorization else { return anonymous(AuthnRefusal::Missing) };
        let Some(text) = std::str::from_utf8(value).ok().and_then(|v| v.strip_prefix("Bearer ")) else {
            return anonymous(AuthnRefusal::Malformed);
        };
        let Ok(secret) = Secret::parse(TokenKind::Api, text) else { return anonymous(AuthnRefusal::Malformed) };
        let Some(found) = store.find_api_token(&secret.hash()).await? else {
            return refused(AuthnRefusal::Unknown, None);
        };
        let token = Some((found.token.tenant, found.token.id));
        let why = if found.revoked_at.is_some() {
            Some(AuthnRefusal::Revoked)
        } else if found.token.grants.expires_at.is_some_and(|t| now >= t) {
            Some(AuthnRefusal::Expired)
        } else if found.matched_previous && found.previous_valid_until.is_none_or(|t| now >= t) {
            Some(AuthnRefusal::RotatedPastGrace)
        } else {
            None
        };
        if let Some(why) = why {
            let key = FailureKey::Token(found.token.id);
            self.failures.fail(key, now);
            if let Some(retry_after) = self.failures.blocked(key, now) {
                return refused(AuthnRefusal::RateLimited { retry_after }, token);
            }
            return refused(why, token);
        }
        self.usage.note(found.token.id, now, from);
        Ok(Ok(TenantScope::for_api_token(found.token)))
    }
}

impl Authenticator {
    /// Authenticates a session secret (`airlock_ss_…`, from the session cookie or a bearer header) from `from` at `now`.
    /// A session past a timeout is ended here (once, audited on its tenant's chain) and refused.
    pub async fn authenticate_session(
        &self,
        store: &Store,
        text: &str,
        limits: SessionLimits,
        from: Option<IpAddr>,
        now: Timestamp,
    ) -> Result<Result<TenantScope, Refused>, StoreError> {
        let address_blocked = from.and_then(|addr| self.failures.blocked(FailureKey::Address(addr), now));
        let refused = |refusal, known| {
            if let Some(addr) = from {
                self.failures.fail(FailureKey::Address(addr), now);
            }
            let refusal = match address_blocked {
                Some(retry_after) => AuthnRefusal::RateLimited { retry_after },
                None => refusal,
            };
            Ok(Err(Refused { refusal, known }))
        };
        let Ok(secret) = Secret::parse(TokenKind::Session, text) else {
            return Ok(Err(Refused { refusal: AuthnRefusal::Malformed, known: None }));
        };
        let Some(session) = store.find_session(&secret.hash()).await? else {
            return refused(AuthnRefusal::Unknown, None);
        };
        let known = Some((session.tenant, format!("user:{}", session.subject)));
        if let Err(end) = sessions::check(&session, limits, now) {
            if end != SessionEnd::Ended {
                end_timed_out(store, &session, end, now).await?;
            }
            let key = FailureKey::Session(session.id);
            self.failures.fail(key, now);
            if let Some(retry_after) = self.failures.blocked(key, now) {
                return refused(AuthnRefusal::RateLimited { retry_after }, known);
            }
            let why = match end {
                SessionEnd::Ended => AuthnRefusal::SessionEnded,
                SessionEnd::Idle => AuthnRefusal::SessionIdle,
                SessionEnd::Absolute => AuthnRefusal::SessionExpired,
            };
            return refused(why, known);
        }
        if sessions::due_for_touch(&session, now) {
            store.touch_session(session.id, now).await?;
        }
        let grants = Grants::user(session.roles);
        Ok(Ok(TenantScope::for_session(session.tenant, session.id, session.subject, session.auth_time, grants)))
    }
}

/// Ends a session a timeout ended, with its audit record, unless something ended it first.
async fn end_timed_out(
    store: &Store,
    session: &crate::store::SessionRow,
    end: SessionEnd,
    now: Timestamp,
) -> Result<(), StoreError> {
    let scope = TenantScope::for_system(session.tenant);
    let mut tx = store.write().await?;
    if tx.end_session(&scope, session.id, end.reason(), now).await? {
        let mut ev =
            crate::state::event(format!("user:{}", session.subject), AuditAction::SessionEnd, Outcome::Success);
        ev.target = Some(session.id.to_string());
        ev.detail = serde_json::json!({ "reason": end.reason() });
        tx.audit(&scope.chain(), now, ev).await?;
        tx.commit().await?;
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FailureKey {
    Address(IpAddr),
    /// A known token presented with a secret that no longer works (revoked, expired, rotated past grace).
    Token(TokenId),
    /// A known session presented after it ended.
    Session(SessionId),
}

/// Counts failed authentications per key in fixed one-minute windows; past the limit a key is refused until its window ends.
#[derive(Debug, Default)]
pub struct FailureLimiter(Mutex<HashMap<FailureKey, Window>>);

#[derive(Clone, Copy, Debug)]
struct Window {
    started: Timestamp,
    failures: u32,
}

impl FailureLimiter {
    pub const WINDOW: Duration = Duration::from_secs(60);
    /// Failures per window from one address: a script retrying a bad token hits it, a person mistyping does not.
    pub const PER_ADDRESS: u32 = 30;
    /// Failures per window with one known token's dead secret.
    pub const PER_TOKEN: u32 = 10;
    const MAX_KEYS: usize = 16 * 1024;

    fn limit(key: FailureKey) -> u32 {
        match key {
            FailureKey::Address(_) => Self::PER_ADDRESS,
            FailureKey::Token(_) | FailureKey::Session(_) => Self::PER_TOKEN,
        }
    }

    /// Addresses are counted as the connection pools count them: an IPv6 /64 is one address (one host
    /// usually holds a whole /64, and would otherwise get a fresh budget per address it picks).
    fn normalized(key: FailureKey) -> FailureKey {
        match key {
            FailureKey::Address(ip) => FailureKey::Address(crate::net::prefix::address_key(ip)),
            other => other,
        }
    }

    /// How long `key` must wait, if it is over its limit.
    pub fn blocked(&self, key: FailureKey, now: Timestamp) -> Option<Duration> {
        let key = Self::normalized(key);
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let w = map.get(&key)?;
        let ends = w.started.saturating_add(Self::WINDOW);
        (w.failures >= Self::limit(key) && now < ends).then(|| ends.since(now).max(Duration::from_secs(1)))
    }

    pub fn fail(&self, key: FailureKey, now: Timestamp) {
        let key = Self::normalized(key);
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= Self::MAX_KEYS && !map.contains_key(&key) {
            // Bounded: windows that ended carry nothing, and dropping them forgets nothing that still counts.
            map.retain(|_, w| now < w.started.saturating_add(Self::WINDOW));
            if map.len() >= Self::MAX_KEYS {
                // Still full of live windows (many addresses failing at once): forget the addresses that are not
                // blocked, fewest failures first, never a blocked key nor a token's or session's count, so that
                // flooding the table from many addresses cannot reset the limit on a credential or a blocked address.
                let mut evictable: Vec<(FailureKey, u32)> = map
                    .iter()
                    .filter(|(k, w)| matches!(k, FailureKey::Address(_)) && w.failures < Self::limit(**k))
                    .map(|(k, w)| (*k, w.failures))
                    .collect();
                evictable.sort_unstable_by_key(|(_, failures)| *failures);
                for (k, _) in evictable.into_iter().take(Self::MAX_KEYS / 4) {
                    map.remove(&k);
                }
            }
            if map.len() >= Self::MAX_KEYS {
                // Every key is blocked or a credential's: the newcomer is not counted this window (an address
                // with nothing recorded is not blocked either way), and nothing that counts is forgotten.
                return;
            }
        }
        let w = map.entry(key).or_insert(Window { started: now, failures: 0 });
        if now >= w.started.saturating_add(Self::WINDOW) {
            *w = Window { started: now, failures: 0 };
        }
        w.failures = w.failures.saturating_add(1);
    }
}

/// Last uses noted since the last flush, by token.
#[derive(Debug, Default)]
pub struct TokenUsage(Mutex<HashMap<TokenId, (Timestamp, Option<IpAddr>)>>);

impl TokenUsage {
    /// How often pending last uses are written: at most one write per token per interval.
    pub const FLUSH_INTERVAL: Duration = Duration::from_secs(60);
    const MAX_PENDING: usize = 64 * 1024;

    pub fn note(&self, token: TokenId, at: Timestamp, from: Option<IpAddr>) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() < Self::MAX_PENDING || map.contains_key(&token) {
            map.insert(token, (at, from));
        }
    }

    /// The last use noted and not yet written, for a listing fresher than the store.
    pub fn pending(&self, token: TokenId) -> Option<(Timestamp, Option<IpAddr>)> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).get(&token).copied()
    }

    /// Writes every pending last use in one transaction.
    pub async fn flush(&self, store: &Store) {
        let batch: Vec<_> = {
            let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
            map.drain().map(|(id, (at, from))| (id, at, from)).collect()
        };
        if let Err(e) = store.record_token_uses(&batch).await {
            tracing::warn!(error = %e, tokens = batch.len(), "could not record API tokens' last use");
        }
    }

    /// Flushes every [`TokenUsage::FLUSH_INTERVAL`] until shutdown.
    pub async fn run(state: std::sync::Arc<crate::state::AppState>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Self::FLUSH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => state.authn.usage.flush(&state.store).await,
                _ = stop.changed() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_addresses_of_one_ipv6_slash_64_share_one_budget() {
        let l = FailureLimiter::default();
        let t0 = Timestamp::from_unix_millis(1_000_000);
        for i in 0..FailureLimiter::PER_ADDRESS {
            let addr: IpAddr = format!("2001:db8:1:2::{:x}", i + 1).parse().unwrap();
            l.fail(FailureKey::Address(addr), t0);
        }
        let fresh: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        assert!(l.blocked(FailureKey::Address(fresh), t0).is_some(), "a new address in the same /64 is limited too");
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(l.blocked(FailureKey::Address(other), t0), None, "another /64 is not");
    }

    #[test]
    fn flooding_the_table_from_many_addresses_resets_no_credential_or_blocked_address() {
        let l = FailureLimiter::default();
        let t0 = Timestamp::from_unix_millis(1_000_000);
        let token = FailureKey::Token(TokenId::from_random([7; 16]));
        let blocked: IpAddr = "198.51.100.7".parse().unwrap();
        for _ in 0..FailureLimiter::PER_TOKEN {
            l.fail(token, t0);
        }
        for _ in 0..FailureLimiter::PER_ADDRESS {
            l.fail(FailureKey::Address(blocked), t0);
        }
        assert!(l.blocked(token, t0).is_some());
        // Many more distinct /64s than the table holds, each failing once, within the window.
        for i in 0..(FailureLimiter::MAX_KEYS as u32 * 2) {
            let addr = IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, (i >> 16) as u16, i as u16, 0, 0, 0, 1));
            l.fail(FailureKey::Address(addr), t0);
        }
        assert!(l.blocked(token, t0).is_some(), "the token's count survived the flood");
        assert!(l.blocked(FailureKey::Address(blocked), t0).is_some(), "the blocked address is still blocked");
        assert!(l.0.lock().unwrap().len() <= FailureLimiter::MAX_KEYS);
    }

    #[test]
    fn failures_past_the_limit_wait_for_the_window_to_end() {
        let l = FailureLimiter::default();
        let t0 = Timestamp::from_unix_millis(1_000_000);
        let key = FailureKey::Address("192.0.2.1".parse().unwrap());
        for _ in 0..FailureLimiter::PER_ADDRESS {
            assert_eq!(l.blocked(key, t0), None);
            l.fail(key, t0);
        }
        assert_eq!(l.blocked(key, t0), Some(FailureLimiter::WINDOW));
        let other = FailureKey::Address("192.0.2.2".parse().unwrap());
        assert_eq!(l.blocked(other, t0), None, "another address is not limited");
        assert_eq!(l.blocked(key, t0.saturating_add(FailureLimiter::WINDOW)), None, "a new window starts afresh");
    }
}
