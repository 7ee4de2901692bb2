//! Connection slots: a bounded pool per listener, with a cap per source address.
//!
//! A [`Slot`] is held for a connection's whole life and frees itself on drop.
//! Source addresses are grouped as [`super::prefix::address_key`] says (an IPv6 /64 counts as one address).
//! When a cap is reached, the oldest *evictable* connection in that scope (the whole pool, or the newcomer's address) is told to close and the newcomer takes its place; only when none is evictable is the newcomer refused.
//! What is evictable is the listener's call ([`Eviction`]): a connection with no work in flight (an API connection between requests, a gateway peer that has sent nothing yet); in a pool with a stall grace, failing that, the connection whose work has been in flight longest, once past the grace (an upload that stalls, a handshake that stops halfway); never an authenticated appliance stream.
//! So a peer that holds idle connections, floods bare TCP connects or stalls its requests only ever displaces its own kind, or work older than the grace, and cannot lock out a client that is doing something.
//! Evictions are told apart by scope ([`Shed::Evicted`] for the pool's cap, [`Shed::AddressEvicted`] for an address's): only the pool's cap is load worth reporting, an address displacing itself is not.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tokio::time::Instant;

use super::prefix::address_key;

/// Why a connection did not get a slot, or lost it; the metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shed {
    /// The pool was full and nothing in it could be evicted.
    PoolFull,
    /// The source address holds its share and none of its connections could be evicted.
    AddressFull,
    /// An older evictable connection closed to make room in a full pool.
    Evicted,
    /// An address at its share displaced one of its own connections: that address's business, not load on the pool.
    AddressEvicted,
}

impl Shed {
    pub fn label(self) -> &'static str {
        match self {
            Shed::PoolFull => "pool_full",
            Shed::AddressFull => "address_full",
            Shed::Evicted => "evicted",
            Shed::AddressEvicted => "address_evicted",
        }
    }

    /// Whether this says the pool itself is full (what `/readyz` reports), rather than one address at its share.
    pub fn pool_pressure(self) -> bool {
        matches!(self, Shed::PoolFull | Shed::Evicted)
    }
}

/// Whether a pool may close its connections to make room.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Eviction {
    /// Any connection with no work in flight ([`Slot::busy`]).
    Idle,
    /// As `Idle`; when none is idle, the connection whose work has been in flight longest, if for at least this long.
    IdleThenStalled(std::time::Duration),
    /// None: a full pool refuses newcomers.
    Never,
}

/// A pool's caps.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub total: usize,
    pub per_address: usize,
    pub eviction: Eviction,
}

/// What a connection shares with the pool: its work counter, its last activity and the bell that evicts it.
#[derive(Debug)]
struct Shared {
    in_flight: AtomicUsize,
    /// Milliseconds since the pool's epoch at the last start or end of work.
    last_active_ms: AtomicU64,
    /// Milliseconds since the pool's epoch when work last went from none to some.
    busy_since_ms: AtomicU64,
    evict: Notify,
}

#[derive(Debug)]
struct Entry {
    addr: IpAddr,
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Inner {
    next_id: u64,
    /// By id, so the first entry is the oldest connection.
    live: BTreeMap<u64, Entry>,
    per_address: HashMap<IpAddr, usize>,
}

/// A listener's connection pool.
#[derive(Debug)]
pub struct SlotPool {
    limits: Limits,
    epoch: Instant,
    inner: Mutex<Inner>,
}

impl SlotPool {
    pub fn new(limits: Limits) -> Arc<Self> {
        let limits = Limits { total: limits.total.max(1), per_address: limits.per_address.max(1), ..limits };
        Arc::new(Self { limits, epoch: Instant::now(), inner: Mutex::new(Inner::default()) })
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Connections holding a slot now.
    pub fn len(&self) -> usize {
        self.lock().live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// A slot for a connection from `addr`, evicting the oldest evictable connection in the full scope if
    /// need be. On success, also says whether someone was evicted (to be counted as shed).
    pub fn acquire(self: &Arc<Self>, addr: IpAddr) -> Result<(Slot, Option<Shed>), Shed> {
        let addr = address_key(addr);
        let mut inner = self.lock();
        let mut evicted = None;
        if inner.per_address.get(&addr).copied().unwrap_or(0) >= self.limits.per_address {
            if !self.evict_oldest(&mut inner, Some(addr)) {
                return Err(Shed::AddressFull);
            }
            evicted = Some(Shed::AddressEvicted);
        }
        if inner.live.len() >= self.limits.total {
            if !self.evict_oldest(&mut inner, None) {
                return Err(Shed::PoolFull);
            }
            evicted = Some(Shed::Evicted);
        }
        let id = inner.next_id;
        inner.next_id += 1;
        let shared = Arc::new(Shared {
            in_flight: AtomicUsize::new(0),
            last_active_ms: AtomicU64::new(self.now_ms()),
            busy_since_ms: AtomicU64::new(0),
            evict: Notify::new(),
        });
        inner.live.insert(id, Entry { addr, shared: shared.clone() });
        *inner.per_address.entry(addr).or_default() += 1;
        Ok((Slot { pool: self.clone(), id, shared }, evicted))
    }

    /// Removes the oldest evictable connection (of `addr`, if given) and rings its bell.
    fn evict_oldest(&self, inner: &mut Inner, addr: Option<IpAddr>) -> bool {
        let grace = match self.limits.eviction {
            Eviction::Never => return false,
            Eviction::Idle => None,
            Eviction::IdleThenStalled(grace) => Some(u64::try_from(grace.as_millis()).unwrap_or(u64::MAX)),
        };
        let in_scope = |e: &Entry| addr.is_none_or(|a| e.addr == a);
        let idle = inner
            .live
            .iter()
            .find(|(_, e)| in_scope(e) && e.shared.in_flight.load(Ordering::Acquire) == 0)
            .map(|(id, _)| *id);
        let stalled = || {
            let grace = grace?;
            let now = self.now_ms();
            inner
                .live
                .iter()
                .filter(|(_, e)| in_scope(e))
                .map(|(id, e)| (*id, e.shared.busy_since_ms.load(Ordering::Acquire)))
                .filter(|(_, since)| now.saturating_sub(*since) >= grace)
                .min_by_key(|(_, since)| *since)
                .map(|(id, _)| id)
        };
        let victim = idle.or_else(stalled);
        let Some(id) = victim else { return false };
        if let Some(entry) = inner.live.remove(&id) {
            release_address(inner, entry.addr);
            // `notify_one` keeps the wake-up for a connection not yet waiting on it.
            entry.shared.evict.notify_one();
        }
        true
    }

    fn release(&self, id: u64) {
        let mut inner = self.lock();
        if let Some(entry) = inner.live.remove(&id) {
            release_address(&mut inner, entry.addr);
        }
    }
}

fn release_address(inner: &mut Inner, addr: IpAddr) {
    if let Some(n) = inner.per_address.get_mut(&addr) {
        *n -= 1;
        if *n == 0 {
            inner.per_address.remove(&addr);
        }
    }
}

/// One connection's place in its pool, freed on drop.
#[derive(Debug)]
pub struct Slot {
    pool: Arc<SlotPool>,
    id: u64,
    shared: Arc<Shared>,
}

impl Slot {
    /// Marks work in flight until the guard drops; a connection with work in flight is not evicted.
    pub fn busy(&self) -> Busy {
        if self.shared.in_flight.fetch_add(1, Ordering::AcqRel) == 0 {
            self.shared.busy_since_ms.store(self.pool.now_ms(), Ordering::Release);
        }
        self.touch();
        Busy { pool: self.pool.clone(), shared: self.shared.clone() }
    }

    /// How long the connection has had no work in flight, or `None` while it has some.
    pub fn idle_for(&self) -> Option<std::time::Duration> {
        if self.shared.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let last = self.shared.last_active_ms.load(Ordering::Acquire);
        Some(std::time::Duration::from_millis(self.pool.now_ms().saturating_sub(last)))
    }

    /// Completes when the pool evicted this connection to make room for another.
    pub async fn evicted(&self) {
        self.shared.evict.notified().await;
    }

    fn touch(&self) {
        self.shared.last_active_ms.store(self.pool.now_ms(), Ordering::Release);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.pool.release(self.id);
    }
}

/// Work in flight on a connection (an API request); the connection is not evictable while one is held.
#[derive(Debug)]
pub struct Busy {
    pool: Arc<SlotPool>,
    shared: Arc<Shared>,
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.shared.last_active_ms.store(self.pool.now_ms(), Ordering::Release);
        self.shared.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
    }

    #[tokio::test]
    async fn a_full_pool_evicts_its_oldest_idle_connection_and_never_a_busy_one() {
        let pool = SlotPool::new(Limits { total: 2, per_address: 10, eviction: Eviction::Idle });
        let (first, _) = pool.acquire(ip(1)).unwrap();
        let (second, _) = pool.acquire(ip(2)).unwrap();
        let _work = first.busy();
        // The first is busy, so the second (idle) goes.
        let (_third, shed) = pool.acquire(ip(3)).unwrap();
        assert_eq!(shed, Some(Shed::Evicted));
        tokio::time::timeout(std::time::Duration::from_secs(1), second.evicted()).await.expect("second evicted");
        assert_eq!(pool.len(), 2);
        // Now both holders are... the first busy, the third idle: the third goes next.
        drop(second);
        assert_eq!(pool.len(), 2, "dropping an evicted slot frees nothing twice");
    }

    #[tokio::test]
    async fn a_pool_with_nothing_evictable_refuses() {
        let pool = SlotPool::new(Limits { total: 1, per_address: 1, eviction: Eviction::Never });
        let (held, _) = pool.acquire(ip(1)).unwrap();
        assert_eq!(pool.acquire(ip(2)).unwrap_err(), Shed::PoolFull);
        assert_eq!(pool.acquire(ip(1)).unwrap_err(), Shed::AddressFull);
        drop(held);
        assert!(pool.acquire(ip(2)).is_ok(), "a dropped slot is free again");

        let busy_pool = SlotPool::new(Limits { total: 1, per_address: 1, eviction: Eviction::Idle });
        let (slot, _) = busy_pool.acquire(ip(1)).unwrap();
        let _work = slot.busy();
        assert_eq!(busy_pool.acquire(ip(2)).unwrap_err(), Shed::PoolFull);
    }

    #[tokio::test]
    async fn an_address_at_its_share_displaces_only_its_own_connections() {
        let pool = SlotPool::new(Limits { total: 10, per_address: 2, eviction: Eviction::Idle });
        let (other, _) = pool.acquire(ip(9)).unwrap();
        let (mine_old, _) = pool.acquire(ip(1)).unwrap();
        let (_mine, _) = pool.acquire(ip(1)).unwrap();
        let (_newest, shed) = pool.acquire(ip(1)).unwrap();
        assert_eq!(shed, Some(Shed::AddressEvicted));
        assert!(!Shed::AddressEvicted.pool_pressure() && !Shed::AddressFull.pool_pressure());
        assert!(Shed::Evicted.pool_pressure() && Shed::PoolFull.pool_pressure());
        tokio::time::timeout(std::time::Duration::from_secs(1), mine_old.evicted()).await.expect("own oldest evicted");
        assert!(tokio::time::timeout(std::time::Duration::from_millis(50), other.evicted()).await.is_err());
    }

    #[tokio::test]
    async fn idle_time_counts_from_the_end_of_the_last_work() {
        let pool = SlotPool::new(Limits { total: 1, per_address: 1, eviction: Eviction::Idle });
        let (slot, _) = pool.acquire(ip(1)).unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(60)).await;
        assert!(slot.idle_for().unwrap() >= std::time::Duration::from_millis(50));
        let work = slot.busy();
        assert_eq!(slot.idle_for(), None);
        tokio::time::sleep(std::time::Duration::from_millis(60)).await;
        drop(work);
        assert!(slot.idle_for().unwrap() < std::time::Duration::from_millis(50));
    }

    #[tokio::test]
    async fn a_full_pool_of_stalled_work_evicts_the_longest_stalled_past_its_grace() {
        let grace = std::time::Duration::from_millis(100);
        let pool = SlotPool::new(Limits { total: 2, per_address: 2, eviction: Eviction::IdleThenStalled(grace) });
        let (oldest_work, _) = pool.acquire(ip(1)).unwrap();
        let (newer_work, _) = pool.acquire(ip(2)).unwrap();
        let _a = newer_work.busy();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let _b = oldest_work.busy();
        // Nothing idle and nothing past its grace: refused.
        assert_eq!(pool.acquire(ip(3)).unwrap_err(), Shed::PoolFull);
        tokio::time::sleep(grace + std::time::Duration::from_millis(20)).await;
        // Both are past the grace: the work that started first goes, whatever the connection's age.
        let (_third, shed) = pool.acquire(ip(3)).unwrap();
        assert_eq!(shed, Some(Shed::Evicted));
        tokio::time::timeout(std::time::Duration::from_secs(1), newer_work.evicted()).await.expect("stalled evicted");
        assert!(tokio::time::timeout(std::time::Duration::from_millis(50), oldest_work.evicted()).await.is_err());

        // A plain `Idle` pool never evicts busy work, however old.
        let strict = SlotPool::new(Limits { total: 1, per_address: 1, eviction: Eviction::Idle });
        let (slot, _) = strict.acquire(ip(1)).unwrap();
        let _work = slot.busy();
        tokio::time::sleep(grace + std::time::Duration::from_millis(20)).await;
        assert_eq!(strict.acquire(ip(2)).unwrap_err(), Shed::PoolFull);
    }

    #[tokio::test]
    async fn one_ipv6_host_cannot_take_more_than_one_share_by_rotating_its_addresses() {
        let pool = SlotPool::new(Limits { total: 10, per_address: 2, eviction: Eviction::Never });
        let (_a, _) = pool.acquire("2001:db8::1".parse().unwrap()).unwrap();
        let (_b, _) = pool.acquire("2001:db8::2".parse().unwrap()).unwrap();
        assert_eq!(pool.acquire("2001:db8::3".parse().unwrap()).unwrap_err(), Shed::AddressFull);
        let (_c, _) = pool.acquire("::ffff:10.0.0.1".parse().unwrap()).unwrap();
        let (_d, _) = pool.acquire(ip(1)).unwrap();
        assert_eq!(pool.acquire(ip(1)).unwrap_err(), Shed::AddressFull);
    }
}
