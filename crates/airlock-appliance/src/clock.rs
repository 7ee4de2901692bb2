//! The one place the appliance reads the wall clock, and the clock type tests replace.

use std::sync::Arc;
use std::time::Duration;

use airlock_core::Timestamp;

/// A clock: the appliance's wall clock, or a test's.
pub(crate) type Clock = Arc<dyn Fn() -> Timestamp + Send + Sync>;

/// Wall-clock time. The appliance checks its own certificate's validity with it.
pub(crate) fn now() -> Timestamp {
    Timestamp::from_offset_date_time(time::OffsetDateTime::now_utc())
}

/// The time `crate::run_with_clock` runs by: when its certificate ends and is renewed, and what
/// its local control (nonces, pre-approvals) reads as now. A wait for a deadline on this clock
/// (the renewal at two thirds of the certificate's life) sleeps at most `recheck` before reading
/// the clock again, so a clock that jumps is followed: a host's after a suspend, or a test's
/// moved by hand.
#[derive(Clone)]
pub struct TimeSource {
    pub(crate) now: Clock,
    pub(crate) recheck: Duration,
}

impl TimeSource {
    /// The wall clock (what `crate::run` uses), rechecked every minute.
    pub fn system() -> Self {
        Self { now: Arc::new(now), recheck: Duration::from_secs(60) }
    }

    /// A clock a test moves by hand; deadlines on it are rechecked every 50 ms.
    pub fn manual(now: impl Fn() -> Timestamp + Send + Sync + 'static) -> Self {
        Self { now: Arc::new(now), recheck: Duration::from_millis(50) }
    }

    pub(crate) fn now(&self) -> Timestamp {
        (self.now)()
    }

    /// How long to sleep towards `deadline`: until it, but never longer than `recheck`.
    pub(crate) fn sleep_towards(&self, deadline: Timestamp) -> Duration {
        deadline.since(self.now()).min(self.recheck)
    }
}

impl std::fmt::Debug for TimeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TimeSource").field("now", &self.now()).field("recheck", &self.recheck).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_for_a_deadline_rechecks_a_clock_that_jumps() {
        let at = Arc::new(std::sync::atomic::AtomicI64::new(1_000_000));
        let read = at.clone();
        let time =
            TimeSource::manual(move || Timestamp::from_unix_millis(read.load(std::sync::atomic::Ordering::SeqCst)));
        let deadline = Timestamp::from_unix_millis(1_000_000 + 3_600_000);
        assert_eq!(time.sleep_towards(deadline), Duration::from_millis(50), "an hour away: recheck soon");
        at.store(1_000_000 + 3_600_000 - 10, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(time.sleep_towards(deadline), Duration::from_millis(10));
        at.store(1_000_000 + 3_600_000 + 10, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(time.sleep_towards(deadline), Duration::ZERO, "past: now");
        assert_eq!(TimeSource::system().sleep_towards(deadline), Duration::ZERO);
    }
}
