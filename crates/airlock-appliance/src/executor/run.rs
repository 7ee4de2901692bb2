//! Running an allowed operation's script, and nothing else.
//!
//! The script runs as `/bin/sh ops/<id>/script.sh`, in the operation's directory, with only
//! `PATH` and the request's `AIRLOCK_VAR_*` values in its environment and no standard input.
//! It leads its own process group, registered with `crate::running` as it starts, so the
//! customer switching its phase off kills it whole; the group's id, with the host's boot id, is
//! saved in the operation's record, so a restart after a crash can kill what it left running.
//! A group that cannot be recorded does not run on: it is killed at once.
//! When the script ends, whatever is left of its group is killed, so its pipes close.
//! Standard output, then standard error, are kept up to [`MAX_OUTPUT_BYTES`]; the rest is
//! dropped and the execution says it was truncated.

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use airlock_core::Timestamp;
use airlock_core::operation::ExecutionStatus;
use tokio::io::AsyncReadExt;

use super::{Executor, Job};
use crate::ApplianceError;
use crate::files::{self, Mode};
use crate::running::boot_id;

/// The most output kept per operation (stdout, then stderr); the rest is dropped and the
/// execution says `output_truncated`.
pub(crate) const MAX_OUTPUT_BYTES: usize = 1 << 20;

/// The only environment a script gets besides its `AIRLOCK_VAR_*` values.
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

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

    /// Runs the script; returns how it ended and its captured output.
    async fn execute(
        &self,
        job: &Job,
        cancelled: Arc<AtomicBool>,
    ) -> Result<(ExecutionStatus, Option<i32>, Vec<u8>, bool), ApplianceError> {
        let dir = self.control.ops.dir(job.id)?;
        let script = dir.join("script.sh");
        files::replace(&script, job.statement.command.script.as_bytes(), Mode::Private)
            .map_err(|e| ApplianceError::Customer(format!("{}: {e}", script.display())))?;
        let mut cmd = tokio::process::Command::new("/bin/sh");
        cmd.arg(&script)
            .env_clear()
            .env("PATH", PATH)
            .envs(&job.statement.command.env)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(request_id = %job.id, error = %e, "cannot start /bin/sh");
                return Ok((ExecutionStatus::FailedToStart, None, Vec::new(), false));
            }
        };
        let pgid = child.id().and_then(|p| i32::try_from(p).ok()).unwrap_or(0);
        self.control.register_running(job.id, job.statement.request.phase, pgid, cancelled.clone());
        // Recorded, so that if this process dies the next one kills the group before it
        // records the operation as cancelled. A group that cannot be recorded does not run.
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
            return Ok((ExecutionStatus::Cancelled, None, Vec::new(), false));
        }
        let out = tokio::spawn(capture(child.stdout.take()));
        let err = tokio::spawn(capture(child.stderr.take()));
        let status = child.wait().await;
        // Whatever the script left behind in its group goes with it, so the pipes close.
        self.control.unregister_running(job.id);
        // The group is gone and its id free for reuse: no later recovery may kill by it.
        if let Err(e) = self.control.ops.update_record(job.id, |r| {
            r.pgid = None;
            Ok(())
        }) {
            tracing::warn!(request_id = %job.id, error = %e, "cannot clear the operation's process group");
        }
        let (mut output, out_over) = out.await.unwrap_or_default();
        let (errput, err_over) = err.await.unwrap_or_default();
        output.extend_from_slice(&errput);
        let truncated = out_over || err_over || output.len() > MAX_OUTPUT_BYTES;
        output.truncate(MAX_OUTPUT_BYTES);
        let exit_code = status.ok().and_then(|s| s.code());
        let status =
            if cancelled.load(Ordering::SeqCst) { ExecutionStatus::Cancelled } else { ExecutionStatus::Completed };
        Ok((status, exit_code, output, truncated))
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
