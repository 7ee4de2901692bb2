//! Logins between the redirect to the provider and its callback: in memory, bounded, each for [`super::LOGIN_TTL`].
//!
//! Anyone may start a login, so nothing here grows with what an anonymous peer sends; what logins hold is counted by [`crate::net::anonymous`] under [`PendingLogins::BUDGET`].
//! One source address (an IPv6 /64 counts as one) holds at most 16 logins and a newcomer from it evicts its own oldest; one network (an IPv6 /48, an IPv4 /24) at most 128, one tenant at most 1,000, and all together 10,000 (`Config::sign_in_budget`): past those, new logins are refused until some expire, typed by the level that is full ([`StartRefusal::Busy`]) with when its oldest login expires.
//! So a peer holding a /48 (65,536 /64s) takes 128 slots, not the table, and a flood aimed at one tenant's sign-in leaves the other tenants 9,000.
//! Within a full tenant the places are shared fairly by network: a newcomer from a network holding less than an equal part evicts the oldest login of the network holding the most, so a flood from a few networks does not lock the tenant's people out (`Inner::evict_for_fair_share`).
//! Login starts are rate limited per address and per network, so neither can make the table of start counts fill up either.
//! A callback takes its login only once its pre-login cookie matches ([`PendingLogins::take`]): a callback without it, or with another browser's, consumes nothing.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use airlock_core::{TenantId, Timestamp};

use super::LOGIN_TTL;
use crate::net::anonymous::{Budget, Holder, Holdings, Over};
use crate::net::prefix::{address_key, network_key};

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

#[derive(Debug)]
struct Inner {
    by_state: HashMap<String, PendingLogin>,
    /// Each address's states, oldest first.
    by_address: HashMap<Option<IpAddr>, VecDeque<String>>,
    held: Holdings<TenantId>,
    /// Login starts in the current window, per address and per network.
    starts: HashMap<StartKey, (Timestamp, u32)>,
    /// Each tenant's states per network, oldest first: whom a fair share evicts when the tenant is full.
    by_tenant_network: HashMap<(TenantId, Option<IpAddr>), VecDeque<String>>,
    /// Per full level: when a refusal was last logged, and how many since were not.
    busy_logged: HashMap<Over, (Timestamp, u64)>,
}

/// Where a login start counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum StartKey {
    Address(Option<IpAddr>),
    Network(Option<IpAddr>),
}

#[derive(Debug)]
pub struct PendingLogins(Mutex<Inner>);

/// How often a refusal of a full level is logged at most.
const BUSY_LOG_EVERY: Duration = Duration::from_secs(10);

impl Default for PendingLogins {
    fn default() -> Self {
        Self::new(Self::BUDGET)
    }
}

/// Why a login could not start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartRefusal {
    /// This address started too many logins this minute; retry after this long.
    RateLimited(Duration),
    /// The logins in progress of the newcomer's `level` (its network, its tenant, the whole table) hold their share;
    /// `retry_after` is when the oldest of them expires and frees a place.
    Busy { level: Over, retry_after: Duration },
}

impl PendingLogins {
    /// What logins in progress may hold: per address, per network, per tenant and in all.
    pub const BUDGET: Budget = Budget { per_address: 16, per_network: 128, per_party: 1_000, total: 10_000 };
    /// Login starts per address per minute: a person retries a few times, a script flooding the provider is stopped.
    pub const STARTS_PER_MINUTE: u32 = 30;
    /// Login starts per network per minute: an office behind one /24 signs in, a /48 of scripts does not mint start counts.
    pub const NETWORK_STARTS_PER_MINUTE: u32 = 120;
    /// Start windows held at most: the network limit bounds how many a network adds a minute, so filling it takes many networks.
    const MAX_START_WINDOWS: usize = 64 * 1024;
    const STARTS_WINDOW: Duration = Duration::from_secs(60);

    /// Logins in progress held under `budget`: [`Self::BUDGET`] in a server (`Config::sign_in_budget`), smaller in tests.
    pub fn new(budget: Budget) -> Self {
        Self(Mutex::new(Inner {
            by_state: HashMap::new(),
            by_address: HashMap::new(),
            held: Holdings::new(budget),
            starts: HashMap::new(),
            by_tenant_network: HashMap::new(),
            busy_logged: HashMap::new(),
        }))
    }

    /// Counts a login start from `from`; refused past the rate of its address or its network.
    pub fn admit_start(&self, from: Option<IpAddr>, now: Timestamp) -> Result<(), StartRefusal> {
        let keys = [StartKey::Network(from.map(network_key)), StartKey::Address(from.map(address_key))];
        let mut inner = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if inner.starts.len() + keys.len() > Self::MAX_START_WINDOWS {
            inner.starts.retain(|_, (started, _)| now < started.saturating_add(Self::STARTS_WINDOW));
            if inner.starts.len() + keys.len() > Self::MAX_START_WINDOWS {
                // Every window is live: the oldest ends within a minute, and frees its place.
                let oldest = inner.starts.values().map(|(started, _)| *started).min().unwrap_or(now);
                let retry_after = oldest.saturating_add(Self::STARTS_WINDOW).since(now).max(Duration::from_secs(1));
                inner.note_busy(Over::Total, now);
                return Err(StartRefusal::Busy { level: Over::Total, retry_after });
            }
        }
        // Both are checked before either counts, so a refused start costs neither budget.
        for key in keys {
            let limit = match key {
                StartKey::Network(_) => Self::NETWORK_STARTS_PER_MINUTE,
                StartKey::Address(_) => Self::STARTS_PER_MINUTE,
            };
            let w = inner.starts.entry(key).or_insert((now, 0));
            if now >= w.0.saturating_add(Self::STARTS_WINDOW) {
                *w = (now, 0);
            }
            if w.1 >= limit {
                let ends = w.0.saturating_add(Self::STARTS_WINDOW);
                return Err(StartRefusal::RateLimited(ends.since(now).max(Duration::from_secs(1))));
            }
        }
        for key in keys {
            if let Some(w) = inner.starts.get_mut(&key) {
                w.1 += 1;
            }
        }
        Ok(())
    }

    /// Holds `login` under `state`, evicting this address's oldest login if it holds its share, or in a full tenant
    /// the oldest of the network holding the most if this one holds less than its fair part; refused when its
    /// network, its tenant or the table holds theirs, naming which.
    pub fn insert(&self, state: String, login: PendingLogin, now: Timestamp) -> Result<(), StartRefusal> {
        let holder = Holder::new(login.from, Some(login.tenant));
        let mut inner = self.0.lock().unwrap_or_else(|e| e.into_inner());
        // A state is random text; were one repeated, the newer login replaces the older, counted once.
        inner.remove(&state);
        let mut swept = false;
        loop {
            match inner.held.over(&holder) {
                None => break,
                Some(Over::Address) => {
                    let oldest = inner.by_address.get_mut(&holder.address()).and_then(VecDeque::pop_front);
                    match oldest {
                        Some(oldest) => {
                            inner.remove(&oldest);
                        }
                        // Counted but listed nowhere cannot happen; refusing is the safe answer if it did.
                        None => {
                            inner.note_busy(Over::Address, now);
                            return Err(StartRefusal::Busy { level: Over::Address, retry_after: LOGIN_TTL });
                        }
                    }
                }
                Some(Over::Network | Over::Party | Over::Total) if !swept => {
                    // Only when full: a sweep of at most `BUDGET.total` entries, not one per request.
                    inner.purge_expired(now);
                    swept = true;
                }
                Some(Over::Party) if inner.evict_for_fair_share(login.tenant, holder.network()) => {}
                Some(level) => {
                    let retry_after = inner.oldest_expiry(&holder, level, now);
                    inner.note_busy(level, now);
                    return Err(StartRefusal::Busy { level, retry_after });
                }
            }
        }
        inner.held.add(&holder);
        inner.by_address.entry(holder.address()).or_default().push_back(state.clone());
        inner.by_tenant_network.entry((login.tenant, holder.network())).or_default().push_back(state.clone());
        inner.by_state.insert(state, login);
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
        let holder = Holder::new(login.from, Some(login.tenant));
        self.held.remove(&holder);
        let key = holder.address();
        if let Some(own) = self.by_address.get_mut(&key) {
            own.retain(|s| s != state);
            if own.is_empty() {
                self.by_address.remove(&key);
            }
        }
        let key = (login.tenant, holder.network());
        if let Some(own) = self.by_tenant_network.get_mut(&key) {
            own.retain(|s| s != state);
            if own.is_empty() {
                self.by_tenant_network.remove(&key);
            }
        }
        Some(login)
    }

    /// A tenant's logins in progress are shared fairly among the networks they come from: when the tenant holds its
    /// share, a newcomer from a network holding less than an equal part of it (the share over the networks holding
    /// some, the newcomer's counted) evicts the oldest login of the network holding the most, if that holds more than
    /// one more than the newcomer's. So a flood from a few networks cannot lock the tenant's people out; a flood from
    /// as many networks as the share has places still can, and is what the network and table budgets bound.
    /// Whether it evicted one. Runs only when the tenant is full, after the sweep: one pass over the tenant-network pairs.
    fn evict_for_fair_share(&mut self, tenant: TenantId, network: Option<IpAddr>) -> bool {
        let mut networks = 0usize;
        let mut biggest: Option<&VecDeque<String>> = None;
        for ((t, _), states) in &self.by_tenant_network {
            if *t != tenant {
                continue;
            }
            networks += 1;
            if biggest.is_none_or(|b| states.len() > b.len()) {
                biggest = Some(states);
            }
        }
        let mine = self.by_tenant_network.get(&(tenant, network)).map_or(0, VecDeque::len);
        if mine == 0 {
            networks += 1;
        }
        let fair = (self.held.budget().per_party / networks.max(1)).max(1);
        let Some(states) = biggest else { return false };
        if mine >= fair || states.len() <= mine + 1 {
            return false;
        }
        let Some(oldest) = states.front().cloned() else { return false };
        self.remove(&oldest).is_some()
    }

    /// Logs a start refused because `level` is full, at most once per [`BUSY_LOG_EVERY`] per level: a flood is
    /// worth one line saying how big it is, not a line per request.
    fn note_busy(&mut self, level: Over, now: Timestamp) {
        let (last, suppressed) = self.busy_logged.entry(level).or_insert((Timestamp::from_unix_millis(0), 0));
        if now < last.saturating_add(BUSY_LOG_EVERY) {
            *suppressed += 1;
            return;
        }
        tracing::warn!(
            ?level,
            similar_refusals_suppressed = *suppressed,
            "sign-in start refused: logins in progress full"
        );
        *last = now;
        *suppressed = 0;
    }

    /// How long until the oldest login of `holder`'s full `level` expires (at least a second): when a start may
    /// succeed again. Read only on a refusal, after the sweep that found the level full, so no dearer than it.
    fn oldest_expiry(&self, holder: &Holder<TenantId>, level: Over, now: Timestamp) -> Duration {
        let same_level = |l: &PendingLogin| {
            let other = Holder::new(l.from, Some(l.tenant));
            match level {
                Over::Address => other.address() == holder.address(),
                Over::Network => other.network() == holder.network(),
                Over::Party => other.party() == holder.party(),
                Over::Total => true,
            }
        };
        let oldest = self.by_state.values().filter(|l| same_level(l)).map(|l| l.started).min();
        oldest.map_or(LOGIN_TTL, |t| t.saturating_add(LOGIN_TTL).since(now)).max(Duration::from_secs(1))
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
        login_for(TenantId::from_random([1; 16]), from, at)
    }

    fn login_for(tenant: TenantId, from: &str, at: Timestamp) -> PendingLogin {
        PendingLogin {
            tenant,
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
        for i in 0..PendingLogins::BUDGET.per_address + 3 {
            p.insert(format!("s{i}"), login("192.0.2.1", t), t).unwrap();
        }
        assert_eq!(p.len(), PendingLogins::BUDGET.per_address + 1);
        assert_eq!(p.take("s0", Some("cookie"), t).unwrap_err(), TakeRefusal::UnknownState, "the oldest was evicted");
        assert!(p.take("other", Some("cookie"), t).is_ok(), "another address's login stays");
        // An IPv6 /64 is one address.
        for i in 0..PendingLogins::BUDGET.per_address + 1 {
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

    #[test]
    fn a_slash_48_flood_leaves_sign_in_from_another_prefix_working() {
        let p = PendingLogins::default();
        let t = Timestamp::from_unix_millis(1_000_000);
        let tenant = TenantId::from_random([1; 16]);
        // Every /64 of one /48 starts logins: the network holds its share, and the rest is refused, not evicting.
        let mut held = 0;
        for subnet in 0..=u16::MAX {
            let from = format!("2001:db8:48:{subnet:x}::1");
            match p.insert(format!("flood-{subnet}"), login_for(tenant, &from, t), t) {
                Ok(()) => held += 1,
                Err(refusal) => {
                    assert_eq!(refusal, StartRefusal::Busy { level: Over::Network, retry_after: LOGIN_TTL })
                }
            }
        }
        assert_eq!(held, PendingLogins::BUDGET.per_network);
        assert_eq!(p.len(), PendingLogins::BUDGET.per_network);
        assert!(p.take("flood-0", Some("cookie"), t).is_ok(), "the flood's first logins were not displaced either");
        // A person of the same tenant on another network, IPv6 or IPv4, signs in.
        p.insert("person".into(), login_for(tenant, "2001:db8:49::7", t), t).unwrap();
        assert!(p.take("person", Some("cookie"), t).is_ok());
        p.insert("office".into(), login_for(tenant, "198.51.100.7", t), t).unwrap();
        assert!(p.take("office", Some("cookie"), t).is_ok());
    }

    #[test]
    fn one_tenants_sign_ins_take_only_its_share_of_the_table() {
        let p = PendingLogins::default();
        let t = Timestamp::from_unix_millis(1_000_000);
        let (flooded, other) = (TenantId::from_random([1; 16]), TenantId::from_random([2; 16]));
        // Many networks, each within its share, all aimed at one tenant.
        let mut held = 0;
        for i in 0..PendingLogins::BUDGET.total {
            let from = format!("10.{}.{}.1", i / 256, i % 256);
            if p.insert(format!("flood-{i}"), login_for(flooded, &from, t), t).is_ok() {
                held += 1;
            }
        }
        assert_eq!(held, PendingLogins::BUDGET.per_party);
        assert_eq!(
            p.insert("late".into(), login_for(flooded, "203.0.113.1", t), t).unwrap_err(),
            StartRefusal::Busy { level: Over::Party, retry_after: LOGIN_TTL },
            "the flooded tenant holds its share"
        );
        p.insert("other".into(), login_for(other, "203.0.113.1", t), t).unwrap();
        assert!(p.take("other", Some("cookie"), t).is_ok(), "another tenant signs in");
        // Once the flood's logins expire, the flooded tenant's people sign in again.
        let later = t.saturating_add(LOGIN_TTL);
        p.insert("late".into(), login_for(flooded, "203.0.113.1", later), later).unwrap();
        assert_eq!(p.len(), 1);
    }

    #[test]
    fn a_full_level_is_refused_by_name_with_the_time_its_oldest_login_expires() {
        let budget = Budget { per_address: 2, per_network: 3, per_party: 4, total: 6 };
        let p = PendingLogins::new(budget);
        let t0 = Timestamp::from_unix_millis(1_000_000);
        let later = |s: u64| t0.saturating_add(Duration::from_secs(s));
        let (acme, globex, initech) =
            (TenantId::from_random([1; 16]), TenantId::from_random([2; 16]), TenantId::from_random([3; 16]));
        // A network's share: three logins from 192.0.2.0/24 (two addresses), the first at t0.
        p.insert("n1".into(), login_for(acme, "192.0.2.1", t0), t0).unwrap();
        p.insert("n2".into(), login_for(acme, "192.0.2.1", later(60)), later(60)).unwrap();
        p.insert("n3".into(), login_for(globex, "192.0.2.2", later(120)), later(120)).unwrap();
        let at = later(300);
        let refused = p.insert("n4".into(), login_for(globex, "192.0.2.3", at), at).unwrap_err();
        let due = |s: u64| LOGIN_TTL - Duration::from_secs(s);
        assert_eq!(refused, StartRefusal::Busy { level: Over::Network, retry_after: due(300) });
        // Acme's share: two more from another network fill it; a further one from that network, which holds its fair
        // part (two networks, two each), is refused, due when acme's oldest expires.
        p.insert("p3".into(), login_for(acme, "198.51.100.1", at), at).unwrap();
        p.insert("p4".into(), login_for(acme, "198.51.100.2", at), at).unwrap();
        let refused = p.insert("p5".into(), login_for(acme, "198.51.100.3", at), at).unwrap_err();
        assert_eq!(refused, StartRefusal::Busy { level: Over::Party, retry_after: due(300) });
        // The table: globex's second login is its sixth, initech's is refused for the table as a whole.
        p.insert("g".into(), login_for(globex, "203.0.113.1", at), at).unwrap();
        let refused = p.insert("i".into(), login_for(initech, "198.18.0.1", later(400)), later(400)).unwrap_err();
        assert_eq!(refused, StartRefusal::Busy { level: Over::Total, retry_after: due(400) });
        // When the oldest expires, its place is free again; only it went.
        let free = t0.saturating_add(LOGIN_TTL);
        p.insert("i".into(), login_for(initech, "198.18.0.1", free), free).unwrap();
        assert_eq!(p.len(), 6);
    }

    #[test]
    fn a_flood_from_a_few_networks_fills_a_tenant_and_its_people_from_another_network_still_sign_in() {
        let p = PendingLogins::default();
        let t = Timestamp::from_unix_millis(1_000_000);
        let tenant = TenantId::from_random([1; 16]);
        // Eight /48s, each from as many /64s as it takes to hold its network's share, all aimed at one tenant.
        // (The last network to arrive takes places from the others up to its fair part: 1,000 over 8.)
        for net in 0..8u16 {
            for subnet in 0..64u16 {
                let from = format!("2001:db8:{net:x}:{subnet:x}::1");
                for n in 0..4 {
                    let _ = p.insert(format!("flood-{net}-{subnet}-{n}"), login_for(tenant, &from, t), t);
                }
            }
        }
        assert_eq!(p.len(), PendingLogins::BUDGET.per_party, "the flood filled the tenant's share");
        // The flood's own networks hold more than their fair part: a further start from one is refused, evicting nothing.
        let later = t.saturating_add(Duration::from_secs(1));
        let refused = p.insert("more".into(), login_for(tenant, "2001:db8:0:ff::1", later), later).unwrap_err();
        assert!(matches!(refused, StartRefusal::Busy { level: Over::Party, .. }), "{refused:?}");
        assert_eq!(p.len(), PendingLogins::BUDGET.per_party);
        // A person from another network signs in: the oldest login of the biggest flooding network gives way.
        p.insert("person".into(), login_for(tenant, "198.51.100.7", later), later).unwrap();
        p.insert("colleague".into(), login_for(tenant, "2001:db8:99::7", later), later).unwrap();
        assert_eq!(p.len(), PendingLogins::BUDGET.per_party);
        assert!(p.take("person", Some("cookie"), later).is_ok());
        assert!(p.take("colleague", Some("cookie"), later).is_ok());
    }

    #[test]
    fn starts_are_rate_limited_per_network_too() {
        let p = PendingLogins::default();
        let t = Timestamp::from_unix_millis(1_000_000);
        // Fresh /64s of one /48 each start once: the network's rate stops them, not a new budget per /64.
        let mut admitted = 0;
        for subnet in 0..1_000u16 {
            if p.admit_start(Some(format!("2001:db8:48:{subnet:x}::1").parse().unwrap()), t).is_ok() {
                admitted += 1;
            }
        }
        assert_eq!(admitted, PendingLogins::NETWORK_STARTS_PER_MINUTE);
        assert!(p.admit_start(Some("2001:db8:49::1".parse().unwrap()), t).is_ok(), "another /48 starts");
        assert!(
            p.admit_start(Some("2001:db8:48::1".parse().unwrap()), t.saturating_add(Duration::from_secs(60))).is_ok()
        );
    }
}
