//! Logins between the redirect to the provider and its callback: in memory, bounded, each for [`super::LOGIN_TTL`].
//!
//! Anyone may start a login, so nothing here grows with what an anonymous peer sends; what logins hold is counted by [`crate::net::anonymous`] under [`PendingLogins::BUDGET`].
//! One source address (an IPv6 /64 counts as one) holds at most 16 logins and a newcomer from it evicts its own oldest; one network (an IPv6 /48, an IPv4 /24) at most 128, one tenant at most 1,000, and all together 10,000 beyond the tenants' reserves (`Config::sign_in_budget`): past those, new logins are refused until some expire, typed by the level that is full ([`StartRefusal::Busy`]) with when to retry (rounded up to 30 s).
//! So a peer holding a /48 (65,536 /64s) takes 128 slots, not the table, and a flood aimed at one tenant's sign-in leaves the other tenants 9,000.
//! Each tenant's first 8 logins in progress are its own reserve and take no place in the table (`Budget::reserved_per_party`): a table filled by floods aimed at other tenants still lets a tenant nobody flooded sign in, whether or not a sign-in of its ever completed, and evicts no one for it.
//! A full tenant or table gives way only to a tenant's proven networks (`KnownNetworks`: where a sign-in of that tenant completed in the last 30 days): a start from one evicts the oldest login from a network its tenant does not know.
//! A login from a known network is never evicted, and a start from an unknown one into a full level evicts nothing: the attacker picks how many networks a flood comes from, so no share by network can protect the people signing in.
//! Login starts are rate limited per address and per network, so neither can make the table of start counts fill up either.
//! A callback takes its login only once its pre-login cookie matches ([`PendingLogins::take`]): a callback without it, or with another browser's, consumes nothing.

use std::collections::{BTreeMap, HashMap, VecDeque};
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

/// A place in the order of starts: when, then a counter, so two starts of the same millisecond are two places.
type Age = (Timestamp, u64);

#[derive(Debug)]
struct Held {
    login: PendingLogin,
    age: Age,
}

#[derive(Debug)]
struct Inner {
    by_state: HashMap<String, Held>,
    /// Each address's states, oldest first (at most `per_address`).
    by_address: HashMap<Option<IpAddr>, VecDeque<String>>,
    /// Each network's, each tenant's and all states by age: the oldest of a level is found without a scan, and the
    /// expired leave from the front.
    by_network: HashMap<Option<IpAddr>, BTreeMap<Age, String>>,
    by_tenant: HashMap<TenantId, BTreeMap<Age, String>>,
    all: BTreeMap<Age, String>,
    next_age: u64,
    held: Holdings<TenantId>,
    /// Login starts in the current window, per address and per network.
    starts: HashMap<StartKey, (Timestamp, u32)>,
    /// The windows in the order they began: the ended ones leave from the front.
    start_order: VecDeque<(Timestamp, StartKey)>,
    known: KnownNetworks,
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

/// A busy refusal's `Retry-After` is rounded up to this step: to the second, it would tell anyone when the oldest
/// login of a tenant or of the server started.
const RETRY_STEP: u64 = 30;

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
    /// `retry_after` is about when the oldest of them expires and frees a place (rounded up to 30 s).
    Busy { level: Over, retry_after: Duration },
}

impl PendingLogins {
    /// What logins in progress may hold: per address, per network, per tenant and in all.
    pub const BUDGET: Budget =
        Budget { per_address: 16, per_network: 128, per_party: 1_000, reserved_per_party: 8, total: 10_000 };
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
            by_network: HashMap::new(),
            by_tenant: HashMap::new(),
            all: BTreeMap::new(),
            next_age: 0,
            held: Holdings::new(budget),
            starts: HashMap::new(),
            start_order: VecDeque::new(),
            known: KnownNetworks::default(),
            busy_logged: HashMap::new(),
        }))
    }

    /// Counts a login start from `from`; refused past the rate of its address or its network, or when the table of
    /// start windows is full (then with a constant minute: a window ends within one).
    pub fn admit_start(&self, from: Option<IpAddr>, now: Timestamp) -> Result<(), StartRefusal> {
        let keys = [StartKey::Network(from.map(network_key)), StartKey::Address(from.map(address_key))];
        let limit = |key: &StartKey| match key {
            StartKey::Network(_) => Self::NETWORK_STARTS_PER_MINUTE,
            StartKey::Address(_) => Self::STARTS_PER_MINUTE,
        };
        let mut inner = self.0.lock().unwrap_or_else(|e| e.into_inner());
        // Windows end in the order they began: the ended ones leave from the front, never by a scan of them all.
        while let Some(&(began, key)) = inner.start_order.front() {
            if now < began.saturating_add(Self::STARTS_WINDOW) {
                break;
            }
            inner.start_order.pop_front();
            if inner.starts.get(&key).is_some_and(|w| w.0 == began) {
                inner.starts.remove(&key);
            }
        }
        // The rates first: a peer past its rate is told so whatever the table holds. Both are checked before either
        // counts, so a refused start costs neither budget.
        for key in &keys {
            if let Some(&(began, count)) = inner.starts.get(key) {
                let ends = began.saturating_add(Self::STARTS_WINDOW);
                if now < ends && count >= limit(key) {
                    return Err(StartRefusal::RateLimited(ends.since(now).max(Duration::from_secs(1))));
                }
            }
        }
        let new_windows = keys.iter().filter(|k| !inner.starts.contains_key(k)).count();
        if inner.starts.len() + new_windows > Self::MAX_START_WINDOWS {
            inner.note_busy(Over::Total, now);
            return Err(StartRefusal::Busy { level: Over::Total, retry_after: Self::STARTS_WINDOW });
        }
        for key in keys {
            match inner.starts.get_mut(&key) {
                Some(w) if now < w.0.saturating_add(Self::STARTS_WINDOW) => w.1 += 1,
                _ => {
                    inner.starts.insert(key, (now, 1));
                    inner.start_order.push_back((now, key));
                }
            }
        }
        Ok(())
    }

    /// Holds `login` under `state`, evicting this address's oldest login if it holds its share; when its tenant or the
    /// table holds theirs, a start from a network its tenant knows evicts the oldest login from a network unknown to
    /// its own tenant. Otherwise refused, naming the level that is full.
    pub fn insert(&self, state: String, login: PendingLogin, now: Timestamp) -> Result<(), StartRefusal> {
        let holder = Holder::new(login.from, Some(login.tenant));
        let mut inner = self.0.lock().unwrap_or_else(|e| e.into_inner());
        // A state is random text; were one repeated, the newer login replaces the older, counted once.
        inner.remove(&state);
        inner.purge_expired(now);
        let known = inner.known.knows(login.tenant, holder.network(), now);
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
                Some(Over::Party) if known && inner.evict_stranger_of(login.tenant, now) => {}
                Some(Over::Total) if known && inner.evict_stranger_anywhere(login.tenant, now) => {}
                Some(level) => {
                    let retry_after = inner.retry_after(&holder, level, now);
                    inner.note_busy(level, now);
                    return Err(StartRefusal::Busy { level, retry_after });
                }
            }
        }
        inner.held.add(&holder);
        let age = (login.started, inner.next_age);
        inner.next_age += 1;
        inner.by_address.entry(holder.address()).or_default().push_back(state.clone());
        inner.by_network.entry(holder.network()).or_default().insert(age, state.clone());
        inner.by_tenant.entry(login.tenant).or_default().insert(age, state.clone());
        inner.all.insert(age, state.clone());
        inner.by_state.insert(state, Held { login, age });
        Ok(())
    }

    /// Takes the login of `state` if `cookie` is the pre-login cookie it was started with; a mismatch takes nothing.
    pub fn take(&self, state: &str, cookie: Option<&str>, now: Timestamp) -> Result<PendingLogin, TakeRefusal> {
        let mut inner = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let held = inner.by_state.get(state).ok_or(TakeRefusal::UnknownState)?;
        // Compared as hashes: the stored value is a hash, and comparing hashes leaks nothing useful about the cookie.
        if cookie.map(super::sha256_text).as_deref() != Some(held.login.binding.as_str()) {
            return Err(TakeRefusal::CookieMismatch);
        }
        let login = inner.remove(state).ok_or(TakeRefusal::UnknownState)?;
        if now >= login.started.saturating_add(LOGIN_TTL) {
            return Err(TakeRefusal::Expired);
        }
        Ok(login)
    }

    /// A sign-in of `tenant` started from `from` completed (its session is stored): its network is proven for the
    /// tenant, and its starts get a place when the tenant or the table is full.
    pub fn sign_in_completed(&self, tenant: TenantId, from: Option<IpAddr>, now: Timestamp) {
        let mut inner = self.0.lock().unwrap_or_else(|e| e.into_inner());
        inner.known.remember(tenant, from.map(network_key), now);
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
        let Held { login, age } = self.by_state.remove(state)?;
        let holder = Holder::new(login.from, Some(login.tenant));
        self.held.remove(&holder);
        let key = holder.address();
        if let Some(own) = self.by_address.get_mut(&key) {
            own.retain(|s| s != state);
            if own.is_empty() {
                self.by_address.remove(&key);
            }
        }
        fn unlist<K: Eq + std::hash::Hash>(map: &mut HashMap<K, BTreeMap<Age, String>>, key: K, age: &Age) {
            if let Some(own) = map.get_mut(&key) {
                own.remove(age);
                if own.is_empty() {
                    map.remove(&key);
                }
            }
        }
        unlist(&mut self.by_network, holder.network(), &age);
        unlist(&mut self.by_tenant, login.tenant, &age);
        self.all.remove(&age);
        Some(login)
    }

    /// Whether the login of `state` came from a network its tenant does not know: only such a login gives way.
    fn stranger(&self, state: &str, now: Timestamp) -> bool {
        self.by_state.get(state).is_some_and(|h| !self.known.knows(h.login.tenant, h.login.from.map(network_key), now))
    }

    /// Evicts the oldest login of `tenant` from a network it does not know; whether there was one.
    /// Runs only for a start from a known network into a full level: at most one pass over the tenant's logins.
    fn evict_stranger_of(&mut self, tenant: TenantId, now: Timestamp) -> bool {
        let oldest = self.by_tenant.get(&tenant).and_then(|own| own.values().find(|s| self.stranger(s, now)).cloned());
        oldest.is_some_and(|state| self.remove(&state).is_some())
    }

    /// With the table full: evicts the oldest stranger of `tenant`, else of the tenant holding the most that has one
    /// beyond its reserve (a login within a tenant's reserve holds no place in the table, so evicting it frees none).
    fn evict_stranger_anywhere(&mut self, tenant: TenantId, now: Timestamp) -> bool {
        if self.evict_stranger_of(tenant, now) {
            return true;
        }
        let reserve = self.held.budget().reserved_per_party;
        let mut tenants: Vec<(usize, TenantId)> =
            self.by_tenant.iter().map(|(t, own)| (own.len(), *t)).filter(|(held, _)| *held > reserve).collect();
        tenants.sort_unstable_by_key(|(held, _)| std::cmp::Reverse(*held));
        tenants.into_iter().any(|(_, t)| t != tenant && self.evict_stranger_of(t, now))
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

    /// When a start may succeed again: the oldest login of `holder`'s full `level` expires, rounded up to
    /// [`RETRY_STEP`]. The oldest is the first of its level's list: no scan.
    fn retry_after(&self, holder: &Holder<TenantId>, level: Over, now: Timestamp) -> Duration {
        let first = |list: Option<&BTreeMap<Age, String>>| list.and_then(|l| l.first_key_value()).map(|(age, _)| age.0);
        let oldest = match level {
            Over::Address => holder_oldest(self, holder),
            Over::Network => first(self.by_network.get(&holder.network())),
            Over::Party => first(holder.party().and_then(|t| self.by_tenant.get(t))),
            Over::Total => first(Some(&self.all)),
        };
        let wait = oldest.map_or(LOGIN_TTL, |t| t.saturating_add(LOGIN_TTL).since(now));
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        Duration::from_secs(secs.div_ceil(RETRY_STEP).max(1) * RETRY_STEP)
    }

    /// Drops the expired logins: the oldest first, stopping at the first live one.
    fn purge_expired(&mut self, now: Timestamp) {
        while let Some((&(started, _), state)) = self.all.first_key_value() {
            if now < started.saturating_add(LOGIN_TTL) {
                break;
            }
            let state = state.clone();
            self.remove(&state);
        }
    }
}

/// When the oldest login of `holder`'s address started.
fn holder_oldest(inner: &Inner, holder: &Holder<TenantId>) -> Option<Timestamp> {
    let state = inner.by_address.get(&holder.address())?.front()?;
    inner.by_state.get(state).map(|h| h.login.started)
}

/// The networks (`net::prefix::network_key`) from which a sign-in of each tenant completed, most recently used kept:
/// at most [`Self::PER_TENANT`] per tenant and [`Self::MAX`] in all, each for [`Self::FOR`] after its last sign-in.
/// Only a completed sign-in (a session stored) adds one, so an anonymous peer cannot.
#[derive(Debug, Default)]
struct KnownNetworks {
    by_tenant: HashMap<TenantId, HashMap<Option<IpAddr>, Age>>,
    /// All of them by last sign-in: the least recent leaves first.
    order: BTreeMap<Age, (TenantId, Option<IpAddr>)>,
    next_age: u64,
}

impl KnownNetworks {
    const PER_TENANT: usize = 64;
    const MAX: usize = 64 * 1024;
    const FOR: Duration = Duration::from_secs(30 * 24 * 3600);

    fn knows(&self, tenant: TenantId, network: Option<IpAddr>, now: Timestamp) -> bool {
        let last = self.by_tenant.get(&tenant).and_then(|own| own.get(&network));
        last.is_some_and(|(at, _)| now < at.saturating_add(Self::FOR))
    }

    fn remember(&mut self, tenant: TenantId, network: Option<IpAddr>, now: Timestamp) {
        while let Some((&(at, _), _)) = self.order.first_key_value() {
            if now < at.saturating_add(Self::FOR) {
                break;
            }
            self.forget_least_recent();
        }
        let age = (now, self.next_age);
        self.next_age += 1;
        let own = self.by_tenant.entry(tenant).or_default();
        if let Some(before) = own.insert(network, age) {
            self.order.remove(&before);
        } else if own.len() > Self::PER_TENANT {
            // At most 65 to look at: the tenant's least recently used network leaves.
            if let Some((&net, &last)) = own.iter().min_by_key(|(_, age)| **age) {
                own.remove(&net);
                self.order.remove(&last);
            }
        }
        self.order.insert(age, (tenant, network));
        if self.order.len() > Self::MAX {
            self.forget_least_recent();
        }
    }

    fn forget_least_recent(&mut self) {
        let Some((_, (tenant, network))) = self.order.pop_first() else { return };
        if let Some(own) = self.by_tenant.get_mut(&tenant) {
            own.remove(&network);
            if own.is_empty() {
                self.by_tenant.remove(&tenant);
            }
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
        let budget = Budget { per_address: 2, per_network: 3, per_party: 4, reserved_per_party: 0, total: 6 };
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
        // Acme's share: two more from another network fill it; a further one, from a network acme does not know, is
        // refused, due when acme's oldest expires.
        p.insert("p3".into(), login_for(acme, "198.51.100.1", at), at).unwrap();
        p.insert("p4".into(), login_for(acme, "198.51.100.2", at), at).unwrap();
        let refused = p.insert("p5".into(), login_for(acme, "198.51.100.3", at), at).unwrap_err();
        assert_eq!(refused, StartRefusal::Busy { level: Over::Party, retry_after: due(300) });
        // The table: globex's second login is its sixth, initech's is refused for the table as a whole; its oldest
        // login expires in 200 s, said as 210 (rounded up to 30 s, not to the second).
        p.insert("g".into(), login_for(globex, "203.0.113.1", at), at).unwrap();
        let refused = p.insert("i".into(), login_for(initech, "198.18.0.1", later(400)), later(400)).unwrap_err();
        assert_eq!(refused, StartRefusal::Busy { level: Over::Total, retry_after: Duration::from_secs(210) });
        // When the oldest expires, its place is free again; only it went.
        let free = t0.saturating_add(LOGIN_TTL);
        p.insert("i".into(), login_for(initech, "198.18.0.1", free), free).unwrap();
        assert_eq!(p.len(), 6);
    }

    /// The review's flood: an office network with 16 logins in progress, a tenant filled from 328 /24s, then starts from
    /// 20 fresh /24s. None of them cancels a login in progress; once a sign-in from the office completed, a start from
    /// the office gets in by evicting the oldest stranger's login, and the office's own stay.
    #[test]
    fn a_flood_from_fresh_networks_cancels_no_login_in_progress_and_a_proven_network_still_gets_in() {
        let p = PendingLogins::default();
        let t = Timestamp::from_unix_millis(1_000_000);
        let later = |s: u64| t.saturating_add(Duration::from_secs(s));
        let tenant = TenantId::from_random([1; 16]);
        for i in 0..16 {
            p.insert(format!("office-{i}"), login_for(tenant, &format!("198.51.100.{i}"), t), t).unwrap();
        }
        let mut flood = 0;
        for net in 0..328u32 {
            for host in 0..4 {
                let from = format!("10.{}.{}.{host}", net / 256, net % 256);
                if p.insert(format!("flood-{net}-{host}"), login_for(tenant, &from, later(1)), later(1)).is_ok() {
                    flood += 1;
                }
            }
        }
        assert_eq!(flood, PendingLogins::BUDGET.per_party - 16, "the flood filled the tenant");
        for net in 0..20u32 {
            let refused =
                p.insert(format!("fresh-{net}"), login_for(tenant, &format!("172.16.{net}.1"), later(2)), later(2));
            assert_eq!(refused.unwrap_err(), StartRefusal::Busy { level: Over::Party, retry_after: LOGIN_TTL });
        }
        assert_eq!(p.len(), PendingLogins::BUDGET.per_party, "nothing was evicted");
        // One of the office's sign-ins completes: its network is proven for the tenant.
        p.take("office-0", Some("cookie"), later(3)).unwrap();
        p.sign_in_completed(tenant, Some("198.51.100.0".parse().unwrap()), later(3));
        p.insert("office-new".into(), login_for(tenant, "198.51.100.200", later(3)), later(3)).unwrap();
        p.insert("office-again".into(), login_for(tenant, "198.51.100.201", later(3)), later(3)).unwrap();
        assert_eq!(p.take("flood-0-0", Some("cookie"), later(3)).unwrap_err(), TakeRefusal::UnknownState);
        // A stranger still evicts nobody, and the flood's networks are not proven by the office's sign-in.
        let refused = p.insert("fresh".into(), login_for(tenant, "10.0.1.9", later(3)), later(3)).unwrap_err();
        assert!(matches!(refused, StartRefusal::Busy { level: Over::Party, .. }), "{refused:?}");
        for i in 1..16 {
            assert!(p.take(&format!("office-{i}"), Some("cookie"), later(3)).is_ok(), "office-{i} was kept");
        }
        assert!(p.take("office-new", Some("cookie"), later(3)).is_ok());
    }

    #[test]
    fn a_login_from_a_proven_network_is_never_evicted_and_a_network_proven_elsewhere_or_long_ago_counts_for_nothing() {
        let budget = Budget { per_address: 4, per_network: 8, per_party: 4, reserved_per_party: 0, total: 100 };
        let p = PendingLogins::new(budget);
        let t = Timestamp::from_unix_millis(1_000_000);
        let (acme, globex) = (TenantId::from_random([1; 16]), TenantId::from_random([2; 16]));
        let office: IpAddr = "198.51.100.1".parse().unwrap();
        p.sign_in_completed(acme, Some(office), t);
        // Acme is full of logins from its own office: another start from the office evicts none of them.
        for i in 0..4 {
            p.insert(format!("office-{i}"), login_for(acme, &format!("198.51.100.{}", 10 + i), t), t).unwrap();
        }
        let refused = p.insert("more".into(), login_for(acme, "198.51.100.99", t), t).unwrap_err();
        assert!(matches!(refused, StartRefusal::Busy { level: Over::Party, .. }), "{refused:?}");
        assert_eq!(p.len(), 4);
        // A network proven for globex is a stranger to acme.
        let p = PendingLogins::new(budget);
        p.sign_in_completed(globex, Some(office), t);
        for i in 0..4 {
            p.insert(format!("s-{i}"), login_for(acme, &format!("10.0.{i}.1"), t), t).unwrap();
        }
        let refused = p.insert("office".into(), login_for(acme, "198.51.100.1", t), t).unwrap_err();
        assert!(matches!(refused, StartRefusal::Busy { level: Over::Party, .. }), "{refused:?}");
        // A network proven more than 30 days ago is forgotten; proven again, it gets in.
        let p = PendingLogins::new(budget);
        p.sign_in_completed(acme, Some(office), t);
        let month = t.saturating_add(KnownNetworks::FOR);
        for i in 0..4 {
            p.insert(format!("s-{i}"), login_for(acme, &format!("10.0.{i}.1"), month), month).unwrap();
        }
        let refused = p.insert("office".into(), login_for(acme, "198.51.100.1", month), month).unwrap_err();
        assert!(matches!(refused, StartRefusal::Busy { level: Over::Party, .. }), "{refused:?}");
        p.sign_in_completed(acme, Some(office), month);
        p.insert("office".into(), login_for(acme, "198.51.100.1", month), month).unwrap();
        assert_eq!(p.take("s-0", Some("cookie"), month).unwrap_err(), TakeRefusal::UnknownState, "the oldest stranger");
    }

    #[test]
    fn a_full_table_lets_a_tenants_proven_network_in_and_refuses_a_tenant_with_none() {
        let budget = Budget { per_address: 4, per_network: 4, per_party: 8, reserved_per_party: 0, total: 12 };
        let p = PendingLogins::new(budget);
        let t = Timestamp::from_unix_millis(1_000_000);
        let later = |s: u64| t.saturating_add(Duration::from_secs(s));
        let (flooded, other, fresh, unknown) = (
            TenantId::from_random([1; 16]),
            TenantId::from_random([2; 16]),
            TenantId::from_random([3; 16]),
            TenantId::from_random([4; 16]),
        );
        // `other` holds 4, one from its proven office; the flood holds 8 for `flooded`: the table is full.
        p.sign_in_completed(other, Some("203.0.113.1".parse().unwrap()), t);
        p.insert("other-office".into(), login_for(other, "203.0.113.1", t), t).unwrap();
        for i in 0..3 {
            p.insert(format!("other-{i}"), login_for(other, &format!("192.0.2.{i}"), later(1)), later(1)).unwrap();
        }
        for i in 0..8 {
            let from = format!("10.0.{}.{}", i / 4, i % 4);
            p.insert(format!("flood-{i}"), login_for(flooded, &from, later(2)), later(2)).unwrap();
        }
        // A tenant with no proven network waits for the flood's logins to expire.
        let refused = p.insert("u".into(), login_for(unknown, "198.18.0.1", later(3)), later(3)).unwrap_err();
        assert_eq!(refused, StartRefusal::Busy { level: Over::Total, retry_after: Duration::from_secs(600) });
        // A fresh tenant's proven network gets in: the oldest stranger of the tenant holding the most gives way.
        p.sign_in_completed(fresh, Some("198.51.100.1".parse().unwrap()), later(3));
        p.insert("fresh".into(), login_for(fresh, "198.51.100.7", later(3)), later(3)).unwrap();
        assert_eq!(p.take("flood-0", Some("cookie"), later(3)).unwrap_err(), TakeRefusal::UnknownState);
        assert!(p.take("other-0", Some("cookie"), later(3)).is_ok(), "the tenant holding fewer kept its own");
        assert!(p.take("other-office", Some("cookie"), later(3)).is_ok());
        assert!(p.take("fresh", Some("cookie"), later(3)).is_ok());
        // Proven logins only: a proven start is refused, not evicting them.
        let p = PendingLogins::new(budget);
        for (i, tenant) in [(0, other), (1, flooded), (2, unknown)] {
            let from = format!("198.18.{i}.1");
            p.sign_in_completed(tenant, Some(from.parse().unwrap()), t);
            for n in 0..4 {
                p.insert(format!("{i}-{n}"), login_for(tenant, &format!("198.18.{i}.{n}"), t), t).unwrap();
            }
        }
        p.sign_in_completed(fresh, Some("198.51.100.1".parse().unwrap()), t);
        let refused = p.insert("fresh".into(), login_for(fresh, "198.51.100.7", t), t).unwrap_err();
        assert!(matches!(refused, StartRefusal::Busy { level: Over::Total, .. }), "{refused:?}");
        assert_eq!(p.len(), 12);
    }

    /// The gap a proven network cannot close: a tenant whose sign-ins never completed, under a table filled by floods
    /// aimed at other tenants. Its reserve lets its people in at once; nobody's login is evicted for it, a stranger
    /// cannot use it to cancel anyone's, and a flood aimed at it holds its reserve and then waits like any other.
    #[test]
    fn a_tenant_nobody_flooded_signs_in_under_a_full_table_from_its_reserve_and_cancels_nobody() {
        let budget = Budget { per_address: 4, per_network: 4, per_party: 8, reserved_per_party: 2, total: 8 };
        let p = PendingLogins::new(budget);
        let t = Timestamp::from_unix_millis(1_000_000);
        let later = |s: u64| t.saturating_add(Duration::from_secs(s));
        let (flooded, other, quiet) =
            (TenantId::from_random([1; 16]), TenantId::from_random([2; 16]), TenantId::from_random([3; 16]));
        // Two flooded tenants hold their reserves and the whole table: 12 logins, 8 of them in the table.
        for (n, tenant) in [(0, flooded), (1, other)] {
            for i in 0..6 {
                let from = format!("10.{n}.{i}.1");
                p.insert(format!("flood-{n}-{i}"), login_for(tenant, &from, t), t).unwrap();
            }
        }
        let refused = p.insert("more".into(), login_for(flooded, "10.9.0.1", later(1)), later(1)).unwrap_err();
        assert!(matches!(refused, StartRefusal::Busy { level: Over::Total, .. }), "{refused:?}");
        // A tenant with no proven network and nothing in progress signs in at once, twice, and nobody's login went.
        for i in 0..2 {
            p.insert(format!("quiet-{i}"), login_for(quiet, &format!("198.51.100.{i}"), later(2)), later(2)).unwrap();
        }
        assert_eq!(p.len(), 14);
        for n in 0..2 {
            for i in 0..6 {
                assert!(p.take(&format!("flood-{n}-{i}"), Some("cookie"), later(2)).is_ok(), "flood-{n}-{i} stays");
            }
        }
        // (Put back: the table is full again.)
        for (n, tenant) in [(0, flooded), (1, other)] {
            for i in 0..6 {
                let from = format!("10.{n}.{i}.1");
                p.insert(format!("flood-{n}-{i}"), login_for(tenant, &from, later(2)), later(2)).unwrap();
            }
        }
        // Past its reserve it waits like anyone: a third start from a network it does not know is refused, evicting none.
        let refused = p.insert("quiet-2".into(), login_for(quiet, "198.51.100.2", later(3)), later(3)).unwrap_err();
        assert!(matches!(refused, StartRefusal::Busy { level: Over::Total, .. }), "{refused:?}");
        assert_eq!(p.len(), 14);
        // A proven network of another tenant evicts a flooded tenant's stranger, never a login within a reserve.
        let proven = TenantId::from_random([4; 16]);
        p.sign_in_completed(proven, Some("203.0.113.1".parse().unwrap()), later(3));
        p.sign_in_completed(quiet, Some("198.51.100.9".parse().unwrap()), later(3));
        for i in 0..2 {
            p.insert(format!("proven-{i}"), login_for(proven, &format!("203.0.113.{i}"), later(3)), later(3)).unwrap();
        }
        assert_eq!(p.len(), 16, "within its own reserve: nobody evicted");
        p.insert("proven-2".into(), login_for(proven, "203.0.113.2", later(4)), later(4)).unwrap();
        p.insert("quiet-3".into(), login_for(quiet, "198.51.100.9", later(4)), later(4)).unwrap();
        assert_eq!(p.len(), 16, "each evicted one flooded stranger");
        for i in 0..2 {
            assert!(p.take(&format!("quiet-{i}"), Some("cookie"), later(4)).is_ok(), "quiet-{i} kept");
        }
    }

    #[test]
    fn a_full_table_of_start_windows_refuses_with_a_constant_minute_after_checking_the_rates() {
        let p = PendingLogins::default();
        let t = Timestamp::from_unix_millis(1_000_000);
        let from = |i: usize| Some(IpAddr::from([10, (i >> 16) as u8, (i >> 8) as u8, i as u8]));
        // Each start from a fresh /24 opens two windows (its address, its network).
        let starts = PendingLogins::MAX_START_WINDOWS / 2;
        for i in 0..starts {
            p.admit_start(from(i << 8), t).unwrap();
        }
        let full = StartRefusal::Busy { level: Over::Total, retry_after: Duration::from_secs(60) };
        let later = t.saturating_add(Duration::from_secs(30));
        assert_eq!(p.admit_start(from(starts << 8), later).unwrap_err(), full, "a new window has no room");
        // An address with its windows open still starts, and one past its rate is told its rate, not the table.
        for _ in 1..PendingLogins::STARTS_PER_MINUTE {
            p.admit_start(from(0), later).unwrap();
        }
        assert!(matches!(p.admit_start(from(0), later), Err(StartRefusal::RateLimited(_))));
        // A minute on, the windows have ended.
        p.admit_start(from(starts << 8), t.saturating_add(Duration::from_secs(60))).unwrap();
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
