//! Running an allowed operation's script, and nothing else.
//!
//! The script runs as `/bin/sh ops/<id>/script.sh`, in the operation's directory, with only
//! `PATH` and the request's `AIRLOCK_VAR_*` values in its environment and no standard input.
//! It runs in a cgroup cell of its own ([`crate::sandbox`]), entered before the script starts,
//! and registered with `crate::running`, so the customer switching its phase off kills
//! everything it started; a restart after a crash kills what it left by its cell.
//! Where the host has no cgroup v2, it leads its own process group instead, whose id (with the
//! host's boot id) is saved in the operation's record for recovery; a group that cannot be
//! recorded does not run on: it is killed at once.
//! When the script ends, whatever is left of its cell (or group) is killed, so its pipes close.
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

/// The shell that starts a script in a cell: it waits for the appliance to move it into the
/// cell (one line on standard input; end of input means it was not moved, so nothing runs),
/// then becomes the script, with no standard input.
const ENTER_THEN_RUN: &str = "read -r _ || exit 125; exec /bin/sh \"$0\" </dev/null";

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
        let cell = match &self.cells {
            Some(cells) => Some(Arc::new(cells.create(job.id).map_err(ApplianceError::Internal)?)),
            None => None,
        };
        let mut cmd = tokio::process::Command::new("/bin/sh");
        match cell {
            Some(_) => cmd.arg("-c").arg(ENTER_THEN_RUN).arg(&script).stdin(Stdio::piped()),
            None => cmd.arg(&script).stdin(Stdio::null()),
        };
        cmd.env_clear()
            .env("PATH", PATH)
            .envs(&job.statement.command.env)
            .current_dir(&dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(request_id = %job.id, error = %e, "cannot start /bin/sh");
                if let Some(cell) = &cell {
                    cell.kill_and_remove();
                }
                return Ok((ExecutionStatus::FailedToStart, None, Vec::new(), false));
            }
        };
        let pid = child.id().unwrap_or(0);
        let pgid = i32::try_from(pid).unwrap_or(0);
        if let Some(cell) = &cell {
            // Into its cell before the script starts; if that fails, it never starts.
            let entered = cell.enter(pid);
            let released = match (&entered, child.stdin.take()) {
                (Ok(()), Some(mut stdin)) => {
                    use tokio::io::AsyncWriteExt;
                    stdin.write_all(b"\n").await.map_err(|e| e.to_string())
                }
                (Ok(()), None) => Err("no standard input to release the script".to_owned()),
                (Err(e), _) => Err(e.clone()),
            };
            if let Err(e) = released {
                tracing::error!(request_id = %job.id, error = %e, "cannot start the script in its cell");
                let _ = child.kill().await;
                cell.kill_and_remove();
                return Ok((ExecutionStatus::FailedToStart, None, Vec::new(), false));
            }
        }
        self.control.register_running(job.id, job.statement.request.phase, pgid, cell.clone(), cancelled.clone());
        // Without a cell, the group is recorded, so that if this process dies the next one kills
        // it before it records the operation as cancelled. A group that cannot be recorded does
        // not run. (With a cell, the next process finds and kills the cell itself.)
        if cell.is_none() {
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
        }
        let out = tokio::spawn(capture(child.stdout.take()));
        let err = tokio::spawn(capture(child.stderr.take()));
        let status = child.wait().await;
        // Whatever the script left behind in its group goes with it, so the pipes close.
        self.control.unregister_running(job.id);
        if cell.is_none() {
            // The group is gone and its id free for reuse: no later recovery may kill by it.
            if let Err(e) = self.control.ops.update_record(job.id, |r| {
                r.pgid = None;
                Ok(())
            }) {
                tracing::warn!(request_id = %job.id, error = %e, "cannot clear the operation's process group");
            }
        }
        let (mut output, out_over) = out.await.unwrap_or_default();
        let (errput, err_over) = err.await.unwrap_or_default();
        if let Some(cell) = &cell {
            // Everything in it was killed; the pipes have closed, so it is empty or nearly.
            let cell = cell.clone();
            let _ = tokio::task::spawn_blocking(move || cell.kill_and_remove()).await;
        }
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
