//! Logins between the redirect to the provider and its callback: in memory, bounded, each for [`super::LOGIN_TTL`].
//!
//! Anyone may start a login, so nothing here grows with what an anonymous peer sends: one source address (an IPv6 /64 counts as one) holds at most [`PendingLogins::PER_ADDRESS`] logins and a newcomer from it evicts its own oldest; all addresses together hold at most [`PendingLogins::TOTAL`], past which new logins are refused until some expire (no live login of another address is evicted); and login starts are rate limited per address.
//! A callback takes its login only once its pre-login cookie matches ([`PendingLogins::take`]): a callback without it, or with another browser's, consumes nothing.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use airlock_core::{TenantId, Timestamp};

use super::LOGIN_TTL;

/// Where the CLI waits for its one-time code (`airlock login`): its loopback redirect and its PKCE challenge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CliLogin {
    pub redirect: String,
    pub challenge: String,
}

/// One login in progress; dropped when its callback comes or it expires.
#[derive(Clone, Debug)]
pub struct PendingLogin {
    pub tenant: TenantId,
    /// The provider the login went to: a configuration changed since is refused at the callback.
    pub issuer: String,
    pub client_id: String,
    pub nonce: String,
    pub verifier: String,
    /// SHA-256 of the pre-login cookie's value.
    pub binding: String,
    pub started: Timestamp,
    pub from: Option<IpAddr>,
    /// A path on this server to return to after a browser login.
    pub return_to: Option<String>,
    /// A step-up: the sign-in must be at most this old.
    pub max_age: Option<u64>,
    pub cli: Option<CliLogin>,
}

/// Why a callback took no login.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TakeRefusal {
    /// No login in progress has this state (never started, already finished, or evicted).
    UnknownState,
    /// The browser calling back did not send the pre-login cookie of the browser that started the login.
    CookieMismatch,
    /// The login was started more than [`LOGIN_TTL`] ago.
    Expired,
}

#[derive(Debug, Default)]
struct Inner {
    by_state: HashMap<String, PendingLogin>,
    /// Each address's states, oldest first.
    by_address: HashMap<Option<IpAddr>, VecDeque<String>>,
    starts: HashMap<Option<IpAddr>, (Timestamp, u32)>,
}

#[derive(Debug, Default)]
pub struct PendingLogins(Mutex<Inner>);

/// Why a login could not start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartRefusal {
    /// This address started too many logins this minute; retry after this long.
    RateLimited(Duration),
    /// The server holds as many logins in progress as it will.
    Full,
}

impl PendingLogins {
    pub const PER_ADDRESS: usize = 16;
    pub const TOTAL: usize = 10_000;
    /// Login starts per address per minute: a person retries a few times, a script flooding the provider is stopped.
    pub const STARTS_PER_MINUTE: u32 = 30;
    const STARTS_WINDOW: Duration = Duration::from_secs(60);

    /// Counts a login start from `from`; refused past the rate.
    pub fn admit_start(&self, from: Option<IpAddr>, now: Timestamp) -> Result<(), StartRefusal> {
        let key = from.map(crate::net::slots::address_key);
        let mut inner = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if inner.starts.len() >= Self::TOTAL {
            inner.starts.retain(|_, (started, _)| now < started.saturating_add(Self::STARTS_WINDOW));
            if inner.starts.len() >= Self::TOTAL {
                return Err(StartRefusal::Full);
            }
        }
        let w = inner.starts.entry(key).or_insert((now, 0));
        if now >= w.0.saturating_add(Self::STARTS_WINDOW) {
            *w = (now, 0);
        }
        if w.1 >= Self::STARTS_PER_MINUTE {
            let ends = w.0.saturating_add(Self::STARTS_WINDOW);
            return Err(StartRefusal::RateLimited(ends.since(now).max(Duration::from_secs(1))));
        }
        w.1 += 1;
        Ok(())
    }

    /// Holds `login` under `state`, evicting this address's oldest login if it holds [`Self::PER_ADDRESS`].
    pub fn insert(&self, state: String, login: PendingLogin, now: Timestamp) -> Result<(), StartRefusal> {
        let key = login.from.map(crate::net::slots::address_key);
        let mut inner = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if inner.by_state.len() >= Self::TOTAL {
            inner.purge_expired(now);
            if inner.by_state.len() >= Self::TOTAL {
                return Err(StartRefusal::Full);
            }
        }
        let Inner { by_state, by_address, .. } = &mut *inner;
        let own = by_address.entry(key).or_default();
        while own.len() >= Self::PER_ADDRESS {
            if let Some(oldest) = own.pop_front() {
                by_state.remove(&oldest);
            }
        }
        own.push_back(state.clone());
        by_state.insert(state, login);
        Ok(())
    }

    /// Takes the login of `state` if `cookie` is the pre-login cookie it was started with; a mismatch takes nothing.
    pub fn take(&self, state: &str, cookie: Option<&str>, now: Timestamp) -> Result<PendingLogin, TakeRefusal> {
        let mut inner = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let login = inner.by_state.get(state).ok_or(TakeRefusal::UnknownState)?;
        // Compared as hashes: the stored value is a hash, and comparing hashes leaks nothing useful about the cookie.
        if cookie.map(super::sha256_text).as_deref() != Some(login.binding.as_str()) {
            return Err(TakeRefusal::CookieMismatch);
        }
        let login = inner.remove(state).ok_or(TakeRefusal::UnknownState)?;
        if now >= login.started.saturating_add(LOGIN_TTL) {
            return Err(TakeRefusal::Expired);
        }
        Ok(login)
    }

    /// How many logins are in progress (tests).
    pub fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).by_state.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Inner {
    fn remove(&mut self, state: &str) -> Option<PendingLogin> {
        let login = self.by_state.remove(state)?;
        let key = login.from.map(crate::net::slots::address_key);
        if let Some(own) = self.by_address.get_mut(&key) {
            own.retain(|s| s != state);
            if own.is_empty() {
                self.by_address.remove(&key);
            }
        }
        Some(login)
    }

    fn purge_expired(&mut self, now: Timestamp) {
        let expired: Vec<String> = self
            .by_state
            .iter()
            .filter(|(_, l)| now >= l.started.saturating_add(LOGIN_TTL))
            .map(|(s, _)| s.clone())
            .collect();
        for state in expired {
            self.remove(&state);
        }
    }
}

/// One-time codes a CLI login's callback hands the CLI's loopback: each for `login::CLI_CODE_TTL`, bound to the CLI's PKCE challenge, taken once.
#[derive(Debug, Default)]
pub struct CliCodes(Mutex<HashMap<String, CliCode>>);

#[derive(Debug)]
struct CliCode {
    secret: airlock_core::token::Secret,
    challenge: String,
    issued: Timestamp,
}

impl CliCodes {
    /// Codes held at most: each is the end of a finished login, which its own limits bound already.
    const MAX: usize = 1024;

    /// Holds a new session's `secret` for the CLI that sent `challenge`; returns the code.
    pub fn insert(&self, secret: airlock_core::token::Secret, challenge: String, now: Timestamp) -> String {
        let code = super::random_text();
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= Self::MAX {
            map.retain(|_, c| now < c.issued.saturating_add(super::login::CLI_CODE_TTL));
            if map.len() >= Self::MAX {
                // The oldest goes: its CLI waited longest; its session ends by itself when idle.
                if let Some(oldest) = map.iter().min_by_key(|(_, c)| c.issued).map(|(k, _)| k.clone()) {
                    map.remove(&oldest);
                }
            }
        }
        map.insert(code.clone(), CliCode { secret, challenge, issued: now });
        code
    }

    /// The session secret for `code`, once, if `challenge` (of the verifier presented) is the one the login sent.
    pub fn take(&self, code: &str, challenge: &str, now: Timestamp) -> Option<airlock_core::token::Secret> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let c = map.get(code)?;
        if c.challenge != challenge {
            // A wrong verifier burns the code: whoever holds it is not the CLI that started the login.
            map.remove(code);
            return None;
        }
        let c = map.remove(code)?;
        (now < c.issued.saturating_add(super::login::CLI_CODE_TTL)).then_some(c.secret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn login(from: &str, at: Timestamp) -> PendingLogin {
        PendingLogin {
            tenant: TenantId::from_random([1; 16]),
            issuer: "https://idp.example".into(),
            client_id: "airlock".into(),
            nonce: "n".into(),
            verifier: "v".into(),
            binding: super::super::sha256_text("cookie"),
            started: at,
            from: Some(from.parse().unwrap()),
            return_to: None,
            max_age: None,
            cli: None,
        }
    }

    #[test]
    fn an_address_evicts_only_its_own_oldest_login() {
        let p = PendingLogins::default();
        let t = Timestamp::from_unix_millis(1_000_000);
        p.insert("other".into(), login("192.0.2.9", t), t).unwrap();
        for i in 0..PendingLogins::PER_ADDRESS + 3 {
            p.insert(format!("s{i}"), login("192.0.2.1", t), t).unwrap();
        }
        assert_eq!(p.len(), PendingLogins::PER_ADDRESS + 1);
        assert_eq!(p.take("s0", Some("cookie"), t).unwrap_err(), TakeRefusal::UnknownState, "the oldest was evicted");
        assert!(p.take("other", Some("cookie"), t).is_ok(), "another address's login stays");
        // An IPv6 /64 is one address.
        for i in 0..PendingLogins::PER_ADDRESS + 1 {
            p.insert(format!("v6-{i}"), login(&format!("2001:db8::{i:x}"), t), t).unwrap();
        }
        assert_eq!(p.take("v6-0", Some("cookie"), t).unwrap_err(), TakeRefusal::UnknownState);
    }

    #[test]
    fn a_callback_without_the_cookie_consumes_nothing_and_an_old_login_is_expired() {
        let p = PendingLogins::default();
        let t = Timestamp::from_unix_millis(1_000_000);
        p.insert("s".into(), login("192.0.2.1", t), t).unwrap();
        assert_eq!(p.take("s", None, t).unwrap_err(), TakeRefusal::CookieMismatch);
        assert_eq!(p.take("s", Some("another"), t).unwrap_err(), TakeRefusal::CookieMismatch);
        assert!(p.take("s", Some("cookie"), t).is_ok(), "the rightful browser still finishes");
        assert_eq!(p.take("s", Some("cookie"), t).unwrap_err(), TakeRefusal::UnknownState, "single use");
        p.insert("late".into(), login("192.0.2.1", t), t).unwrap();
        assert_eq!(p.take("late", Some("cookie"), t.saturating_add(LOGIN_TTL)).unwrap_err(), TakeRefusal::Expired);
    }

    #[test]
    fn a_cli_code_is_taken_once_only_with_its_verifiers_challenge_and_a_wrong_one_burns_it() {
        let codes = CliCodes::default();
        let t = Timestamp::from_unix_millis(1_000_000);
        let secret = || airlock_core::token::Secret::from_random(airlock_core::token::TokenKind::Session, [5; 32]);
        let code = codes.insert(secret(), "challenge".into(), t);
        assert!(codes.take(&code, "another", t).is_none());
        assert!(codes.take(&code, "challenge", t).is_none(), "a wrong verifier burnt it");
        let code = codes.insert(secret(), "challenge".into(), t);
        assert_eq!(codes.take(&code, "challenge", t).map(|s| s.hash()), Some(secret().hash()));
        assert!(codes.take(&code, "challenge", t).is_none(), "single use");
        let code = codes.insert(secret(), "challenge".into(), t);
        assert!(
            codes.take(&code, "challenge", t.saturating_add(super::super::login::CLI_CODE_TTL)).is_none(),
            "expired"
        );
    }

    #[test]
    fn starts_are_rate_limited_per_address() {
        let p = PendingLogins::default();
        let t = Timestamp::from_unix_millis(1_000_000);
        let a = Some("192.0.2.1".parse().unwrap());
        for _ in 0..PendingLogins::STARTS_PER_MINUTE {
            p.admit_start(a, t).unwrap();
        }
        assert!(matches!(p.admit_start(a, t), Err(StartRefusal::RateLimited(_))));
        assert!(p.admit_start(Some("192.0.2.2".parse().unwrap()), t).is_ok());
        assert!(p.admit_start(a, t.saturating_add(Duration::from_secs(60))).is_ok());
    }
}
