//! Running an allowed operation's script, and nothing else.
//!
//! The script runs as `/bin/sh script.sh` in the box ([`crate::sandbox`]): its own cgroup
//! cell, user, Landlock rules, limits and private working directory, with only `PATH`, `HOME`,
//! `TMPDIR` and the request's `AIRLOCK_VAR_*` values in its environment and no standard input.
//! It is registered with `crate::running`, so the customer switching its phase off kills
//! everything it started; a restart after a crash kills what it left by its cell. Past its
//! wall-time limit it is killed whole and recorded as timed out; killed by the usage watch
//! (`crate::sandbox::usage`), as over its limits.
//! Where the host has no cgroup v2, it leads its own process group instead, whose id (with the
//! host's boot id) is saved in the operation's record for recovery; a group that cannot be
//! recorded does not run on: it is killed at once.
//! When the script ends, whatever is left of its cell (or group) is killed, so its pipes close.
//! Standard output, then standard error, are kept up to [`MAX_OUTPUT_BYTES`]; the rest is
//! dropped and the execution says it was truncated.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use airlock_core::Timestamp;
use airlock_core::operation::ExecutionStatus;
use tokio::io::AsyncReadExt;

use super::{Executor, Job};
use crate::ApplianceError;
use crate::files::{self, Mode};
use crate::running::boot_id;
use crate::sandbox::RunLimits;

/// The most output kept per operation (stdout, then stderr); the rest is dropped and the
/// execution says `output_truncated`.
pub(crate) const MAX_OUTPUT_BYTES: usize = 1 << 20;

/// How a run ended, kept until it is recorded.
#[derive(Debug)]
pub(crate) struct Ran {
    pub(crate) status: ExecutionStatus,
    pub(crate) exit_code: Option<i32>,
    pub(crate) output: Vec<u8>,
    pub(crate) truncated: bool,
    pub(crate) started_at: Timestamp,
    pub(crate) finished_at: Timestamp,
}

impl Ran {
    /// A run that produced nothing: it did not start, or it was lost.
    pub(crate) fn nothing(status: ExecutionStatus, started_at: Timestamp, finished_at: Timestamp) -> Self {
        Self { status, exit_code: None, output: Vec::new(), truncated: false, started_at, finished_at }
    }
}

impl Executor {
    /// Runs the job's script to its end (or until it is killed) and returns how it ended.
    pub(crate) async fn run_script(&self, job: &Job) -> Ran {
        let started_at = self.control.now();
        let cancelled = Arc::new(AtomicBool::new(false));
        let (status, exit_code, output, truncated) = match self.execute(job, cancelled).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(request_id = %job.id, error = %e, "the operation could not be started");
                (ExecutionStatus::FailedToStart, None, Vec::new(), false)
            }
        };
        Ran { status, exit_code, output, truncated, started_at, finished_at: self.control.now() }
    }

    /// Runs the script in its box; returns how it ended and its captured output.
    async fn execute(
        &self,
        job: &Job,
        cancelled: Arc<AtomicBool>,
    ) -> Result<(ExecutionStatus, Option<i32>, Vec<u8>, bool), ApplianceError> {
        // The script as it ran stays with the operation's record.
        let dir = self.control.ops.dir(job.id)?;
        let script = dir.join("script.sh");
        files::replace(&script, job.statement.command.script.as_bytes(), Mode::Private)
            .map_err(|e| ApplianceError::Customer(format!("{}: {e}", script.display())))?;
        let limits = RunLimits::from(job.limits);
        let run_as = self.sandbox.run_as_for(job.statement.command.run.user);
        let command = &job.statement.command;
        let (cmd, boxed) = self
            .sandbox
            .prepare(job.id, command.script.as_bytes(), &command.env, &limits, run_as)
            .map_err(ApplianceError::Internal)?;
        self.run_boxed(job, cmd, boxed, &limits, cancelled).await
    }

    /// Runs a prepared, boxed command of an allowed operation (a script, a release's task) to
    /// its end: registered so the customer can cancel it, killed whole past its wall time, its
    /// output captured; returns how it ended.
    pub(crate) async fn run_boxed(
        &self,
        job: &Job,
        mut cmd: tokio::process::Command,
        boxed: crate::sandbox::Boxed,
        limits: &RunLimits,
        cancelled: Arc<AtomicBool>,
    ) -> Result<(ExecutionStatus, Option<i32>, Vec<u8>, bool), ApplianceError> {
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(request_id = %job.id, error = %e, "cannot start the script in its box");
                boxed.dispose();
                return Ok((ExecutionStatus::FailedToStart, None, Vec::new(), false));
            }
        };
        let pgid = child.id().and_then(|p| i32::try_from(p).ok()).unwrap_or(0);
        self.control.register_running(job.id, job.statement.request.phase, pgid, boxed.cell.clone(), cancelled.clone());
        // Without a cell, the group is recorded, so that if this process dies the next one kills
        // it before it records the operation as cancelled. A group that cannot be recorded does
        // not run. (With a cell, the next process finds and kills the cell itself.)
        if boxed.cell.is_none() {
            let boot = boot_id();
            if let Err(e) = self.control.ops.update_record(job.id, |r| {
                r.pgid = Some(pgid);
                r.boot_id = boot;
                Ok(())
            }) {
                tracing::error!(request_id = %job.id, error = %e, "cannot record the operation's process group; killing it");
                cancelled.store(true, Ordering::SeqCst);
                self.control.unregister_running(job.id);
                let _ = child.wait().await;
                boxed.dispose();
                return Ok((ExecutionStatus::Cancelled, None, Vec::new(), false));
            }
        }
        let out = tokio::spawn(capture(child.stdout.take()));
        let err = tokio::spawn(capture(child.stderr.take()));
        let (status, timed_out) = match tokio::time::timeout(limits.wall_time, child.wait()).await {
            Ok(status) => (status, false),
            Err(_) => {
                tracing::warn!(request_id = %job.id, limit = ?limits.wall_time, "the operation ran past its time limit: killing it");
                // Unregistering kills what it started (again below, a no-op).
                self.control.unregister_running(job.id);
                (child.wait().await, true)
            }
        };
        // Whatever the script left behind in its box goes with it, so the pipes close.
        self.control.unregister_running(job.id);
        if boxed.cell.is_none() {
            // The group is gone and its id free for reuse: no later recovery may kill by it.
            if let Err(e) = self.control.ops.update_record(job.id, |r| {
                r.pgid = None;
                Ok(())
            }) {
                tracing::warn!(request_id = %job.id, error = %e, "cannot clear the operation's process group");
            }
        }
        // With a cell, everything holding the pipes is dead by now. Without one, a process that
        // left the group may hold them for ever: the run is not kept waiting on it.
        let (mut output, out_over) = drained(out).await;
        let (errput, err_over) = drained(err).await;
        let overrun = boxed.overrun();
        let _ = tokio::task::spawn_blocking(move || boxed.dispose()).await;
        output.extend_from_slice(&errput);
        let truncated = out_over || err_over || output.len() > MAX_OUTPUT_BYTES;
        output.truncate(MAX_OUTPUT_BYTES);
        let exit_code = status.ok().and_then(|s| s.code());
        let status = if cancelled.load(Ordering::SeqCst) {
            ExecutionStatus::Cancelled
        } else if timed_out {
            ExecutionStatus::TimedOut
        } else if let Some(why) = overrun {
            tracing::warn!(request_id = %job.id, reason = %why, "the operation was killed over its box's limits");
            ExecutionStatus::OverLimit
        } else {
            ExecutionStatus::Completed
        };
        Ok((status, exit_code, output, truncated))
    }
}

/// What a capture task read, once its stream closes, or (marked truncated) nothing if it has
/// not closed a few seconds after the run ended.
async fn drained(mut capture: tokio::task::JoinHandle<(Vec<u8>, bool)>) -> (Vec<u8>, bool) {
    match tokio::time::timeout(std::time::Duration::from_secs(5), &mut capture).await {
        Ok(read) => read.unwrap_or_default(),
        Err(_) => {
            tracing::warn!("a process outside the run's group kept its output open; the output is dropped");
            capture.abort();
            (Vec::new(), true)
        }
    }
}

/// Reads a stream to its end, keeping the first [`MAX_OUTPUT_BYTES`]; says if more came.
async fn capture<R: tokio::io::AsyncRead + Unpin>(stream: Option<R>) -> (Vec<u8>, bool) {
    let Some(mut stream) = stream else { return (Vec::new(), false) };
    let mut kept = Vec::new();
    let mut over = false;
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = MAX_OUTPUT_BYTES - kept.len();
                if n > room {
                    over = true;
                }
                kept.extend_from_slice(&chunk[..n.min(room)]);
            }
        }
    }
    (kept, over)
}

#[cfg(test)]
mod tests;
