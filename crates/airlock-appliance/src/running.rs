//! The operations running now, so the customer can stop them.
//!
//! Each script runs in its own cgroup cell ([`crate::sandbox`]), where the host has cgroup v2,
//! else in its own process group, led by its shell.
//! Killing the cell kills the script and everything it started, at once, `setsid` and
//! double-forked children included; a process group holds only those that stayed in it.
//! The executor registers a run as its script starts and unregisters it when the script
//! ends, killing whatever the script left behind.
//! [`crate::control::LocalControl`] kills the groups of every phase the customer switches off,
//! and of every operation when the appliance stops.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use airlock_core::OperationId;
use airlock_core::policy::Phase;

use crate::sandbox::Cell;

/// An operation whose process runs now.
struct Running {
    phase: Phase,
    /// Its process group (the shell's pid: it leads its own group).
    pgid: i32,
    /// Its cgroup, when the host has them: what is killed.
    cell: Option<Arc<Cell>>,
    /// Set when the appliance killed it, so its run is recorded as cancelled.
    cancelled: Arc<AtomicBool>,
}

impl Running {
    /// Kills everything the run started.
    fn kill(&self) {
        match &self.cell {
            Some(cell) => cell.kill(),
            None => kill_group(self.pgid),
        }
    }
}

/// The operations running now, by id.
#[derive(Default)]
pub(crate) struct RunningOps {
    running: Mutex<HashMap<OperationId, Running>>,
}

impl RunningOps {
    pub(crate) fn register(
        &self,
        id: OperationId,
        phase: Phase,
        pgid: i32,
        cell: Option<Arc<Cell>>,
        cancelled: Arc<AtomicBool>,
    ) {
        self.lock().insert(id, Running { phase, pgid, cell, cancelled });
    }

    /// Forgets a finished operation, killing whatever it left behind.
    pub(crate) fn unregister(&self, id: OperationId) {
        if let Some(r) = self.lock().remove(&id) {
            r.kill();
        }
    }

    /// Kills every running operation whose phase is not in `effective`.
    pub(crate) fn cancel_outside(&self, effective: &BTreeSet<Phase>) {
        for (id, r) in self.lock().iter() {
            if !effective.contains(&r.phase) && !r.cancelled.swap(true, Ordering::SeqCst) {
                tracing::warn!(request_id = %id, phase = ?r.phase, "phase revoked by the customer: killing the operation");
                r.kill();
            }
        }
    }

    /// Kills every running operation (the appliance is stopping).
    pub(crate) fn kill_all(&self) {
        for (id, r) in self.lock().iter() {
            r.cancelled.store(true, Ordering::SeqCst);
            tracing::warn!(request_id = %id, "the appliance is stopping: killing the operation");
            r.kill();
        }
    }

    /// The process group of a running operation.
    #[cfg(test)]
    pub(crate) fn group(&self, id: OperationId) -> Option<i32> {
        self.lock().get(&id).map(|r| r.pgid)
    }

    /// Ids of operations whose process runs now.
    pub(crate) fn ids(&self) -> Vec<OperationId> {
        self.lock().keys().copied().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<OperationId, Running>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Kills a whole process group at once.
pub(crate) fn kill_group(pgid: i32) {
    // 0 and 1 are not a script's group: killpg would signal our own group, or init's.
    if pgid <= 1 {
        return;
    }
    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), nix::sys::signal::Signal::SIGKILL);
}

/// This boot of the host (Linux), so a process group recorded before a reboot is not killed.
pub(crate) fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok().map(|s| s.trim().to_owned())
}
