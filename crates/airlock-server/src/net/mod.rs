//! What an anonymous peer can hold on either listener, bounded: connection slots, deadlines and the file budget.
//!
//! [`slots`] caps each listener's connections (in total and per source address, an IPv6 /64 counting as one) and evicts idle ones fairly, then work stalled past a grace; [`files`] raises the open-file limit and splits it between the listeners.
//! The listeners themselves ([`crate::https`], [`crate::gateway`]) apply the deadlines in [`ConnectionLimits`] and count what they shed in [`crate::metrics::ConnectionMetrics`].

pub mod anonymous;
pub mod files;
pub mod prefix;
pub mod slots;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

pub use files::{FileBudgets, FileLimit};
pub use slots::{Eviction, Limits, Shed, Slot, SlotPool};

/// Caps and deadlines for both listeners (`airlock server` flags).
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    /// API connections at once; cut further to the API's share of the open-file limit.
    pub api_max_connections: usize,
    /// API connections one source address may hold (an IPv6 /64 counts as one address, see [`prefix::address_key`]).
    pub api_connections_per_address: usize,
    /// How long an API connection may go without a request in flight, from its handshake on, before it is closed.
    pub api_idle_timeout: Duration,
    /// How long reading and answering one request may take (headers and body included); past it the answer is 408.
    pub api_request_timeout: Duration,
    /// How long a TLS handshake may take, on either listener.
    pub tls_handshake_timeout: Duration,
    /// Gateway connections at once (handshakes and appliance streams); cut to the gateway's share of the open-file limit.
    pub gateway_max_connections: usize,
    /// How long a gateway peer has to send its ClientHello.
    pub gateway_hello_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            api_max_connections: 4096,
            api_connections_per_address: 256,
            api_idle_timeout: Duration::from_secs(30),
            api_request_timeout: Duration::from_secs(30),
            tls_handshake_timeout: Duration::from_secs(5),
            gateway_max_connections: 100_000,
            gateway_hello_timeout: Duration::from_secs(2),
        }
    }
}

/// The pools both listeners draw from, sized from the file limit.
#[derive(Debug)]
pub struct Pools {
    pub api: std::sync::Arc<SlotPool>,
    /// Gateway connections that have not finished their handshake: few, short, capped per address; a newcomer evicts
    /// the oldest that has sent nothing yet, failing that the one stuck longest past its ClientHello (past a grace).
    pub gateway_handshakes: std::sync::Arc<SlotPool>,
    /// Verified appliance connections: never evicted; a full pool refuses newcomers (the gateway also caps them per certificate).
    pub gateway_streams: std::sync::Arc<SlotPool>,
}

/// Pending gateway handshakes get this fraction of the gateway's share, at most [`MAX_PENDING_HANDSHAKES`].
const HANDSHAKE_SHARE_DIVISOR: usize = 4;
/// A full handshake is ~0.25 ms of CPU (BENCHMARKS.md); more in flight only queues CPU work.
const MAX_PENDING_HANDSHAKES: usize = 1024;
/// One address may hold this fraction of the pending handshakes: appliances behind one NAT share an address, but a
/// handshake takes milliseconds, so a fraction is plenty for them and keeps one flooder from evicting everyone's.
const HANDSHAKE_ADDRESS_DIVISOR: usize = 4;
/// An API request in flight this long may be evicted for a newcomer when the pool is full and nothing is idle: an
/// anonymous peer cannot pin the pool with uploads it stalls, while a request that is moving finishes well within it.
pub const API_STALL_GRACE: Duration = Duration::from_secs(5);
/// A gateway handshake past its ClientHello this long may be evicted for a newcomer when nothing pending is silent.
pub const HANDSHAKE_STALL_GRACE: Duration = Duration::from_secs(2);

impl Pools {
    pub fn new(limits: &ConnectionLimits, file_limit: u64) -> Self {
        let budgets = FileBudgets::split(file_limit).cap(limits.api_max_connections, limits.gateway_max_connections);
        let handshakes = (budgets.gateway / HANDSHAKE_SHARE_DIVISOR).clamp(1, MAX_PENDING_HANDSHAKES);
        let streams = budgets.gateway.saturating_sub(handshakes).max(1);
        tracing::info!(
            file_limit,
            api = budgets.api,
            gateway_handshakes = handshakes,
            gateway_streams = streams,
            "connection budgets"
        );
        Self {
            api: SlotPool::new(Limits {
                total: budgets.api,
                per_address: limits.api_connections_per_address,
                eviction: Eviction::IdleThenStalled(API_STALL_GRACE),
            }),
            gateway_handshakes: SlotPool::new(Limits {
                total: handshakes,
                per_address: (handshakes / HANDSHAKE_ADDRESS_DIVISOR).max(1),
                eviction: Eviction::IdleThenStalled(HANDSHAKE_STALL_GRACE),
            }),
            // Appliances behind one NAT share an address, so streams are capped per certificate (by the gateway), not per address.
            gateway_streams: SlotPool::new(Limits { total: streams, per_address: streams, eviction: Eviction::Never }),
        }
    }
}

/// Delays between failed `accept` calls: doubling from 5 ms to 1 s, reset by the next success.
///
/// `accept` fails when the process is out of files (EMFILE) or the kernel out of memory; retrying at once would spin a core while nothing can change.
#[derive(Debug)]
pub struct AcceptBackoff {
    next: Duration,
}

impl AcceptBackoff {
    const MIN: Duration = Duration::from_millis(5);
    const MAX: Duration = Duration::from_secs(1);

    pub fn new() -> Self {
        Self { next: Self::MIN }
    }

    pub fn reset(&mut self) {
        self.next = Self::MIN;
    }

    /// The delay before the next attempt.
    pub fn failed(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        delay
    }
}

impl Default for AcceptBackoff {
    fn default() -> Self {
        Self::new()
    }
}

/// The next connection on `listener`, backing off on errors.
pub async fn accept(
    listener: &TcpListener,
    backoff: &mut AcceptBackoff,
    name: &'static str,
) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(conn) => {
                backoff.reset();
                return conn;
            }
            Err(e) => {
                let delay = backoff.failed();
                tracing::warn!(listener = name, error = %e, ?delay, "accept failed; backing off");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Completes once `slot` has had no work in flight for `timeout`.
pub async fn idle_expired(slot: &Slot, timeout: Duration) {
    loop {
        let wait = match slot.idle_for() {
            Some(idle) if idle >= timeout => return,
            Some(idle) => timeout - idle,
            None => timeout,
        };
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_backoff_doubles_to_its_cap_and_resets() {
        let mut b = AcceptBackoff::new();
        let delays: Vec<_> = (0..10).map(|_| b.failed()).collect();
        assert_eq!(delays[0], Duration::from_millis(5));
        assert_eq!(delays[1], Duration::from_millis(10));
        assert!(delays.windows(2).all(|w| w[1] >= w[0]));
        assert_eq!(*delays.last().unwrap(), Duration::from_secs(1));
        b.reset();
        assert_eq!(b.failed(), Duration::from_millis(5));
    }

    #[test]
    fn pools_fit_the_file_limit_whatever_is_configured() {
        let pools = Pools::new(&ConnectionLimits::default(), 1024);
        let total =
            pools.api.limits().total + pools.gateway_handshakes.limits().total + pools.gateway_streams.limits().total;
        assert!(total <= 1024 - 64, "{total}");
        assert!(pools.gateway_handshakes.limits().total < pools.gateway_streams.limits().total);
    }

    #[tokio::test]
    async fn an_idle_connection_expires_and_a_busy_one_does_not() {
        let pool = SlotPool::new(Limits { total: 2, per_address: 2, eviction: Eviction::Idle });
        let (slot, _) = pool.acquire([127, 0, 0, 1].into()).unwrap();
        let timeout = Duration::from_millis(100);
        let work = slot.busy();
        assert!(tokio::time::timeout(timeout * 3, idle_expired(&slot, timeout)).await.is_err());
        drop(work);
        let started = tokio::time::Instant::now();
        idle_expired(&slot, timeout).await;
        assert!(started.elapsed() >= Duration::from_millis(90));
    }
}
