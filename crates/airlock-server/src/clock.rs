//! The only place the control plane reads wall-clock time, so tests can inject their own (and rustls checks certificate validity by the same clock).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use airlock_core::Timestamp;

pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now(&self) -> Timestamp;
}

#[derive(Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_offset_date_time(time::OffsetDateTime::now_utc())
    }
}

/// A clock tests move by hand.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    pub fn new(at: Timestamp) -> Arc<Self> {
        Arc::new(Self(AtomicI64::new(at.unix_millis())))
    }

    pub fn advance(&self, d: std::time::Duration) {
        self.0.fetch_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX), Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_unix_millis(self.0.load(Ordering::SeqCst))
    }
}

/// Adapts a [`Clock`] to rustls, so certificate validity in handshakes follows the same time.
#[derive(Debug)]
pub(crate) struct RustlsTime(pub(crate) Arc<dyn Clock>);

impl rustls::time_provider::TimeProvider for RustlsTime {
    fn current_time(&self) -> Option<rustls::pki_types::UnixTime> {
        let secs = u64::try_from(self.0.now().unix_seconds()).ok()?;
        Some(rustls::pki_types::UnixTime::since_unix_epoch(std::time::Duration::from_secs(secs)))
    }
}
