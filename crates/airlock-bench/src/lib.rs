//! What the benchmark binaries share: the fleet's simulated appliances (`fleet`), starting and reading a
//! control plane (`server`), and this process's CPU and memory (`procfs`).

pub mod fleet;
pub mod procfs;
pub mod server;
pub mod worker;

/// Wall-clock microseconds since the Unix epoch: how the bench processes agree on a deadline.
pub fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
