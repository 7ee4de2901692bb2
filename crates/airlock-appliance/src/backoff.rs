//! Jittered exponential backoff for reconnects ("full jitter").
//!
//! A fleet that lost the control plane at once does not come back in lockstep, which keeps a
//! reconnect storm CPU-bounded.

use std::time::Duration;

use ring::rand::{SecureRandom, SystemRandom};

#[derive(Debug)]
pub(crate) struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub(crate) fn new(base: Duration, cap: Duration) -> Self {
        Self { base, cap, attempt: 0 }
    }

    /// The ceiling of the next delay: base × 2^attempt, capped.
    pub(crate) fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(20)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// A delay drawn uniformly from [0, ceiling], then the ceiling grows.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let mut b = [0u8; 8];
        // If the system RNG fails, waiting the full ceiling is still a valid backoff.
        if SystemRandom::new().fill(&mut b).is_err() {
            return ceiling;
        }
        let frac = u64::from_le_bytes(b) as f64 / u64::MAX as f64;
        ceiling.mul_f64(frac)
    }

    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let ceilings: Vec<_> = (0..8)
            .map(|_| {
                let c = b.ceiling();
                assert!(b.next_delay() <= c);
                c
            })
            .collect();
        assert_eq!(ceilings[0], Duration::from_millis(100));
        assert_eq!(ceilings[3], Duration::from_millis(800));
        assert_eq!(*ceilings.last().unwrap(), Duration::from_secs(2));
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
    }

    #[test]
    fn backoff_is_jittered() {
        let mut b = Backoff::new(Duration::from_secs(10), Duration::from_secs(10));
        let delays: std::collections::HashSet<_> = (0..10).map(|_| b.next_delay()).collect();
        assert!(delays.len() > 5, "delays should differ: {delays:?}");
    }
}
