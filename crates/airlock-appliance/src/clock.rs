//! The one place the appliance reads the wall clock, and the clock type tests replace.

use std::sync::Arc;

use airlock_core::Timestamp;

/// A clock: the appliance's wall clock, or a test's.
pub(crate) type Clock = Arc<dyn Fn() -> Timestamp + Send + Sync>;

/// Wall-clock time. The appliance checks its own certificate's validity with it.
pub(crate) fn now() -> Timestamp {
    Timestamp::from_offset_date_time(time::OffsetDateTime::now_utc())
}
