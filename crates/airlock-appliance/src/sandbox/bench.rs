//! What the box costs a run: `benches/sandbox.rs` times it against a bare spawn.

use std::path::Path;
use std::time::{Duration, Instant};

use airlock_core::OperationId;

use super::{RunLimits, Sandbox};

/// Wall times of `rounds` spawns of `/bin/sh -c true` each way, taken alternately so both
/// see the same machine.
#[derive(Debug, Default)]
pub struct Timings {
    /// A plain spawn and wait.
    pub bare: Vec<Duration>,
    /// The same script boxed: cell, working directory, Landlock rules, user switch, limits,
    /// spawn, wait, and disposal of the cell and the directory.
    pub boxed: Vec<Duration>,
    /// Whether the runs switched users, and whether Landlock and cgroups were in force.
    pub switched_user: bool,
    pub landlock: bool,
    pub cgroup: bool,
}

/// Times `rounds` bare and boxed spawns for an appliance whose state directory is `state_dir`.
pub async fn spawn_true(state_dir: &Path, rounds: usize) -> Result<Timings, String> {
    let sandbox = Sandbox::open(state_dir, None, &Default::default())?;
    let mut t = Timings {
        switched_user: matches!(sandbox.run_as, super::RunAs::BoxUser { .. }),
        landlock: sandbox.landlock,
        cgroup: sandbox.cells.is_some(),
        ..Timings::default()
    };
    let env = Default::default();
    let limits = RunLimits::default();
    for round in 0..rounds {
        let started = Instant::now();
        let status =
            tokio::process::Command::new("/bin/sh").args(["-c", "true"]).status().await.map_err(|e| e.to_string())?;
        t.bare.push(started.elapsed());
        if !status.success() {
            return Err("/bin/sh -c true failed".into());
        }
        let started = Instant::now();
        let id = OperationId::from_random(u128::try_from(round).unwrap_or(0).to_be_bytes());
        let (mut cmd, boxed) = sandbox.prepare(id, b"true", &env, &limits, sandbox.run_as)?;
        let status = cmd.status().await.map_err(|e| e.to_string());
        boxed.dispose();
        t.boxed.push(started.elapsed());
        if !status?.success() {
            return Err("the boxed script failed".into());
        }
    }
    Ok(t)
}
