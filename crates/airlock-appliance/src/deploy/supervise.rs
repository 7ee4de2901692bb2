//! Running a release's services: the [`Executor`] seam and the built-in [`ProcessExecutor`].
//!
//! Each service runs boxed ([`crate::sandbox::Sandbox::prepare_service`]) in a cell of its own
//! (`svc-<release>-<service>`), as the box user (root only where the caller allowed it), with
//! its output appended to an owner-only log file on the appliance (`<releases root>/.logs`,
//! rotated to `.1` past a size cap; only its redacted tail goes up, and only where the
//! customer's policy opts in: see `telemetry`).
//! A supervisor task per service restarts it per its policy (`never`, `on-failure`, `always`),
//! waiting an exponential backoff between its `initial_backoff_ms` and `max_backoff_ms`, reset
//! once a run has lasted [`SuperviseConfig::reset_after`]. While a process runs, its health
//! checks run beside it (see `health`) and set its status.
//! Stopping is graceful: SIGTERM to every process in the cell, SIGKILL after the service's
//! `stop_timeout_secs`, then the cell and the box's scratch directory are removed.
//! A service the usage watch kills (`crate::sandbox::usage`) counts as failed, its
//! `last_error` saying `killed: <why>`; its scratch directory goes with its box, so it
//! restarts (per its policy) empty.

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use airlock_core::release::{HealthCheck, HealthProbe, RestartPolicy, Service};
use airlock_core::run_spec::RunUser;
use serde::Serialize;
use tokio::io::AsyncReadExt;
use tokio::sync::watch;

use super::health;
use super::secrets::ServiceEnv;
use crate::sandbox::{Boxed, CellName, RunLimits, Sandbox, ServiceLaunch};

/// A service's state as the appliance reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ServiceStatus {
    /// Started, its health not settled yet.
    Starting,
    Healthy,
    Unhealthy,
    /// Exited with a failure (and, per its policy, perhaps waiting to be restarted).
    Failed,
    /// Stopped by the appliance, or exited successfully with nothing to restart it.
    Stopped,
    /// Part of a deploy that was rolled back: stopped.
    RolledBack,
}

/// One service's state, as its supervisor sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub(crate) struct ServiceState {
    pub(crate) status: ServiceStatus,
    /// Times it was started again after exiting.
    pub(crate) restarts: u32,
    pub(crate) pid: Option<u32>,
    /// The cgroup of the process running now, where the host gives it one: what its metrics
    /// are read from (`telemetry`).
    pub(crate) cell: Option<PathBuf>,
    /// Why it last failed to start or run, if it did (no secret value: a sandbox or exit reason).
    pub(crate) last_error: Option<String>,
    /// Whether the supervisor has ended (stopped, or exited with no restart due).
    pub(crate) ended: bool,
}

/// The release a service belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub(crate) struct ReleaseInfo {
    pub(crate) name: String,
    pub(crate) version: String,
    pub(crate) digest: String,
}

/// Everything needed to (re)start one service.
#[derive(Debug)]
pub(crate) struct ServiceUnit {
    pub(crate) release: ReleaseInfo,
    pub(crate) service: Service,
    pub(crate) release_dir: PathBuf,
    /// Plain env, secret values and dependency bindings, resolved at deploy.
    pub(crate) env: ServiceEnv,
    pub(crate) log: PathBuf,
    /// Bytes its processes appended to `log` since the executor last started it: all a log tail
    /// may show, so a tail holds only output written knowing the secret values in `env` (not a
    /// previous release's, nor those of a rotated secret).
    pub(crate) logged: std::sync::atomic::AtomicU64,
}

/// Starts and stops services; the built-in one supervises boxed processes
/// ([`ProcessExecutor`]), a Kubernetes one can follow.
pub(crate) trait Executor: Send + Sync {
    /// Starts supervising `unit`; returns at once (its status says how it goes).
    fn start(&self, unit: Arc<ServiceUnit>) -> Supervised;
}

/// A service under supervision.
#[derive(Debug)]
pub(crate) struct Supervised {
    pub(crate) unit: Arc<ServiceUnit>,
    state: watch::Receiver<ServiceState>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Supervised {
    /// Builds a handle around an executor's own supervising task.
    pub(crate) fn new(
        unit: Arc<ServiceUnit>,
        state: watch::Receiver<ServiceState>,
        stop: watch::Sender<bool>,
        task: tokio::task::JoinHandle<()>,
    ) -> Self {
        Self { unit, state, stop, task }
    }

    pub(crate) fn state(&self) -> ServiceState {
        self.state.borrow().clone()
    }

    pub(crate) fn watch(&self) -> watch::Receiver<ServiceState> {
        self.state.clone()
    }

    /// Stops it gracefully and waits until it has.
    pub(crate) async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// How the process executor supervises.
#[derive(Clone, Debug)]
pub(crate) struct SuperviseConfig {
    /// How long a service without health checks must stay up to count as healthy.
    pub(crate) settle: Duration,
    /// A run that lasted this long resets the restart backoff.
    pub(crate) reset_after: Duration,
    /// The first probe, this long after a start.
    pub(crate) first_probe: Duration,
    /// Probes run at most this far apart (tests shorten the releases' intervals).
    pub(crate) probe_interval_cap: Option<Duration>,
    /// A log file past this many bytes is rotated to `.1`.
    pub(crate) log_cap_bytes: u64,
    pub(crate) limits: RunLimits,
}

impl Default for SuperviseConfig {
    fn default() -> Self {
        Self {
            settle: Duration::from_secs(1),
            reset_after: Duration::from_secs(30),
            first_probe: Duration::from_millis(250),
            probe_interval_cap: None,
            log_cap_bytes: 10 << 20,
            limits: RunLimits::default(),
        }
    }
}

/// The built-in supervisor: boxed processes on this host.
#[derive(Debug, Clone)]
pub(crate) struct ProcessExecutor {
    sandbox: Arc<Sandbox>,
    config: SuperviseConfig,
    /// What each start (and exec check) may use: the customer's caps as the last deploy's
    /// decision settled them, or as the policy in force gives them at the appliance's start.
    limits: Arc<std::sync::Mutex<RunLimits>>,
}

impl ProcessExecutor {
    pub(crate) fn new(sandbox: Arc<Sandbox>, config: SuperviseConfig) -> Self {
        let limits = Arc::new(std::sync::Mutex::new(config.limits));
        Self { sandbox, config, limits }
    }

    /// The limits every later start and exec check gets.
    pub(crate) fn set_limits(&self, limits: RunLimits) {
        *self.limits.lock().unwrap_or_else(|e| e.into_inner()) = limits;
    }

    fn limits(&self) -> RunLimits {
        *self.limits.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Executor for ProcessExecutor {
    fn start(&self, unit: Arc<ServiceUnit>) -> Supervised {
        unit.logged.store(0, std::sync::atomic::Ordering::Relaxed);
        let (state_tx, state_rx) = watch::channel(ServiceState {
            status: ServiceStatus::Starting,
            restarts: 0,
            pid: None,
            cell: None,
            last_error: None,
            ended: false,
        });
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(supervise(self.clone(), unit.clone(), state_tx, stop_rx));
        Supervised::new(unit, state_rx, stop_tx, task)
    }
}

/// What a service's command names: an absolute path, a path inside the release, or a name on
/// the box's `PATH`.
pub(crate) fn program(release_dir: &Path, command: &str) -> OsString {
    if command.starts_with('/') || !command.contains('/') {
        command.into()
    } else {
        release_dir.join(command).into_os_string()
    }
}

fn cwd(unit: &ServiceUnit) -> PathBuf {
    match &unit.service.workdir {
        Some(dir) => unit.release_dir.join(dir.as_str()),
        None => unit.release_dir.clone(),
    }
}

impl ProcessExecutor {
    fn run_as(&self, service: &Service) -> crate::sandbox::RunAs {
        if service.run_as_root { self.sandbox.run_as_for(RunUser::Root) } else { self.sandbox.run_as() }
    }

    /// Starts one process of `unit`, its output going to its log.
    fn spawn(&self, unit: &Arc<ServiceUnit>) -> Result<(tokio::process::Child, Boxed), String> {
        let limits = self.limits();
        let cell = CellName::service(&unit.release.digest, &unit.service.name)?;
        let cwd = cwd(unit);
        let program = program(&unit.release_dir, &unit.service.command);
        let launch = ServiceLaunch {
            cell: &cell,
            program: &program,
            args: &unit.service.args,
            env: &unit.env.vars,
            release_dir: &unit.release_dir,
            cwd: &cwd,
            limits: &limits,
            run_as: self.run_as(&unit.service),
        };
        let (mut cmd, boxed) = self.sandbox.prepare_service(&launch)?;
        let mut child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) => {
                boxed.dispose();
                return Err(format!("cannot start `{}`: {e}", unit.service.command));
            }
        };
        let log = Arc::new(std::sync::Mutex::new(LogFile::new(unit.log.clone(), self.config.log_cap_bytes)));
        if let Some(out) = child.stdout.take() {
            tokio::spawn(copy_log(out, log.clone(), unit.clone()));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(copy_log(err, log, unit.clone()));
        }
        Ok((child, boxed))
    }

    /// Runs one exec health check boxed like the service, in its working directory.
    async fn probe_exec(
        &self,
        unit: &ServiceUnit,
        index: usize,
        command: &str,
        args: &[String],
        timeout: Duration,
    ) -> bool {
        let Ok(cell) = CellName::check(&unit.release.digest, &format!("{}-{index}", unit.service.name)) else {
            return false;
        };
        let cwd = cwd(unit);
        let program = program(&unit.release_dir, command);
        let limits = self.limits();
        let launch = ServiceLaunch {
            cell: &cell,
            program: &program,
            args,
            env: &unit.env.vars,
            release_dir: &unit.release_dir,
            cwd: &cwd,
            limits: &limits,
            run_as: self.run_as(&unit.service),
        };
        let Ok((mut cmd, boxed)) = self.sandbox.prepare_service(&launch) else { return false };
        // Disposed of however this ends, an abort (the service exited) included.
        let boxed = DisposeOnDrop(Some(boxed));
        cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
        let ok = match cmd.spawn() {
            Ok(mut child) => {
                matches!(tokio::time::timeout(timeout, child.wait()).await, Ok(Ok(status)) if status.success())
            }
            Err(_) => false,
        };
        let mut boxed = boxed;
        if let Some(b) = boxed.0.take() {
            let _ = tokio::task::spawn_blocking(move || b.dispose()).await;
        }
        ok
    }

    async fn probe(&self, unit: &ServiceUnit, index: usize, check: &HealthCheck) -> bool {
        let timeout = Duration::from_secs(check.timeout_secs);
        let timeout =
            self.config.probe_interval_cap.map_or(timeout, |cap| timeout.min(cap.max(Duration::from_millis(100))));
        match &check.probe {
            HealthProbe::Http(p) => health::probe_http(p.port, &p.path, timeout).await,
            HealthProbe::Tcp(p) => health::probe_tcp(p.port, timeout).await,
            HealthProbe::Exec(p) => self.probe_exec(unit, index, &p.command, &p.args, timeout).await,
        }
    }

    /// Sets the status from the health checks for as long as the process runs (the task is
    /// aborted when it ends).
    async fn watch_health(self, unit: Arc<ServiceUnit>, state: Arc<watch::Sender<ServiceState>>) {
        let checks = &unit.service.health;
        if checks.is_empty() {
            tokio::time::sleep(self.config.settle).await;
            state.send_modify(|s| s.status = ServiceStatus::Healthy);
            return;
        }
        let mut tallies = vec![health::Tally::default(); checks.len()];
        let mut next: Vec<Instant> = vec![Instant::now() + self.config.first_probe; checks.len()];
        loop {
            let (i, at) = next.iter().copied().enumerate().min_by_key(|(_, at)| *at).unwrap_or((0, Instant::now()));
            tokio::time::sleep_until(at.into()).await;
            let check = &checks[i];
            let ok = self.probe(&unit, i, check).await;
            tallies[i].record(check, ok);
            if !ok {
                tracing::debug!(service = %unit.service.name, probe = %health::describe(check), "a health probe failed");
            }
            let interval = Duration::from_secs(check.interval_secs);
            next[i] = Instant::now() + self.config.probe_interval_cap.map_or(interval, |cap| interval.min(cap));
            let status = match health::overall(&tallies) {
                Some(true) => Some(ServiceStatus::Healthy),
                Some(false) => Some(ServiceStatus::Unhealthy),
                None => None,
            };
            if let Some(status) = status {
                state.send_if_modified(|s| {
                    let changed = s.status != status;
                    s.status = status;
                    changed
                });
            }
        }
    }
}

/// Starts, watches and restarts one service until told to stop.
async fn supervise(
    exec: ProcessExecutor,
    unit: Arc<ServiceUnit>,
    state: watch::Sender<ServiceState>,
    mut stop: watch::Receiver<bool>,
) {
    let state = Arc::new(state);
    let restart = unit.service.restart;
    let initial = Duration::from_millis(restart.initial_backoff_ms);
    let max = Duration::from_millis(restart.max_backoff_ms);
    let mut backoff = initial;
    loop {
        if *stop.borrow() {
            break;
        }
        state.send_modify(|s| {
            s.status = ServiceStatus::Starting;
            s.pid = None;
            s.cell = None;
        });
        let failed = match exec.spawn(&unit) {
            Err(why) => {
                tracing::warn!(service = %unit.service.name, reason = %why, "a service did not start");
                state.send_modify(|s| s.last_error = Some(why));
                true
            }
            Ok((mut child, boxed)) => {
                let started = Instant::now();
                state.send_modify(|s| {
                    s.pid = child.id();
                    s.cell = boxed.cell.as_ref().map(|c| c.dir().to_owned());
                });
                let health = tokio::spawn(exec.clone().watch_health(unit.clone(), state.clone()));
                let exited = tokio::select! {
                    status = child.wait() => Some(status),
                    _ = stop.changed() => None,
                };
                health.abort();
                let Some(status) = exited else {
                    graceful_stop(&mut child, boxed, Duration::from_secs(unit.service.stop_timeout_secs)).await;
                    break;
                };
                // Killed by the usage watch: disposing of the box removes its scratch directory,
                // so the restart starts empty rather than straight back over its limit.
                let overrun = boxed.overrun();
                let _ = tokio::task::spawn_blocking(move || boxed.dispose()).await;
                if started.elapsed() >= exec.config.reset_after {
                    backoff = initial;
                }
                let ok = overrun.is_none() && status.as_ref().is_ok_and(|s| s.success());
                if !ok {
                    let why = match (overrun, status) {
                        (Some(over), _) => format!("killed: {over}"),
                        (None, Ok(s)) => format!("exited: {s}"),
                        (None, Err(e)) => format!("cannot wait for it: {e}"),
                    };
                    tracing::warn!(service = %unit.service.name, reason = %why, "a service exited");
                    state.send_modify(|s| s.last_error = Some(why));
                }
                !ok
            }
        };
        let again = match restart.policy {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => failed,
            RestartPolicy::Never => false,
        };
        state.send_modify(|s| {
            s.status = if failed { ServiceStatus::Failed } else { ServiceStatus::Stopped };
            s.pid = None;
            s.cell = None;
        });
        if !again {
            state.send_modify(|s| s.ended = true);
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => break,
        }
        backoff = (backoff * 2).min(max);
        state.send_modify(|s| s.restarts += 1);
    }
    state.send_modify(|s| {
        s.status = ServiceStatus::Stopped;
        s.pid = None;
        s.cell = None;
        s.ended = true;
    });
}

/// SIGTERM to everything in the box, SIGKILL after `timeout`, then the box is removed.
async fn graceful_stop(child: &mut tokio::process::Child, boxed: Boxed, timeout: Duration) {
    use nix::sys::signal::Signal;
    match &boxed.cell {
        Some(cell) => cell.signal(Signal::SIGTERM),
        None => {
            if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
                let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), Signal::SIGTERM);
            }
        }
    }
    let cell = boxed.cell.clone();
    let emptied = async {
        let _ = child.wait().await;
        // The rest of the cell (children it started) gets the same time to go.
        while cell.as_ref().is_some_and(|c| c.populated()) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    if tokio::time::timeout(timeout, emptied).await.is_err() {
        let _ = child.start_kill();
    }
    // Kills (SIGKILL) whatever is left, removes the cell and the scratch directory.
    let _ = tokio::task::spawn_blocking(move || boxed.dispose()).await;
    let _ = child.wait().await;
}

/// A box disposed of when dropped.
struct DisposeOnDrop(Option<Boxed>);

impl Drop for DisposeOnDrop {
    fn drop(&mut self) {
        if let Some(boxed) = self.0.take() {
            boxed.dispose();
        }
    }
}

/// A service's log file, rotated to `<name>.1` past its cap.
struct LogFile {
    path: PathBuf,
    cap: u64,
    file: Option<std::fs::File>,
    written: u64,
}

impl LogFile {
    fn new(path: PathBuf, cap: u64) -> Self {
        Self { path, cap, file: None, written: 0 }
    }

    /// Appends `bytes`; says whether they were.
    fn write(&mut self, bytes: &[u8]) -> bool {
        if self.file.is_none() || self.written >= self.cap {
            if self.written >= self.cap || std::fs::metadata(&self.path).is_ok_and(|m| m.len() >= self.cap) {
                let mut old = self.path.clone().into_os_string();
                old.push(".1");
                let _ = std::fs::rename(&self.path, old);
            }
            self.file = std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(&self.path).ok();
            self.written = self.file.as_ref().and_then(|f| f.metadata().ok()).map_or(0, |m| m.len());
        }
        if let Some(file) = &mut self.file
            && file.write_all(bytes).is_ok()
        {
            self.written += bytes.len() as u64;
            return true;
        }
        false
    }
}

async fn copy_log(
    mut from: impl tokio::io::AsyncRead + Unpin,
    to: Arc<std::sync::Mutex<LogFile>>,
    unit: Arc<ServiceUnit>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 {
            break;
        }
        if to.lock().unwrap_or_else(|e| e.into_inner()).write(&buf[..n]) {
            unit.logged.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_past_its_cap_is_rotated_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("web.log");
        let mut log = LogFile::new(path.clone(), 10);
        log.write(b"0123456789");
        log.write(b"abc");
        log.write(b"0123456789");
        log.write(b"xyz");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "xyz");
        assert_eq!(std::fs::read_to_string(dir.path().join("web.log.1")).unwrap(), "abc0123456789");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        // A new process of the service appends to what is there, within the cap.
        let mut again = LogFile::new(path.clone(), 10);
        again.write(b"!");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "xyz!");
    }
}
