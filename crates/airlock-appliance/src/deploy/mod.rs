//! The deploy engine: installs a verified release beside the others, runs its services boxed,
//! health-checks them, switches the current release atomically, and rolls back on failure.
//!
//! The flow ([`Deployer::deploy`]), decided before anything is acted on:
//! 1. Refuse, changing nothing, a release with a `run_as_root` service the caller did not
//!    allow ([`DeployError::RootNotAllowed`]), an artifact whose bytes do not match the signed
//!    statement ([`DeployError::Tampered`]), or a secret whose value is unavailable
//!    ([`DeployError::Secret`], naming the reference).
//! 2. Install beside (`install`): `<releases root>/<digest>/`, never half-made.
//! 3. Record the pending switch, stop the current release's services, start the new ones.
//!    Stop-then-start, so an upgrade of a service with a fixed port works; the price is a
//!    short outage during a deploy.
//! 4. Wait until every new service is healthy within the deadline. Then switch `current`
//!    (the commit point, `pointer`), record it, and prune installed releases but the current
//!    and previous. Otherwise stop the new services, start the previous release's again, and
//!    report [`DeployOutcome::RolledBack`] with a typed [`RollbackReason`].
//!
//! A crash at any point leaves a consistent state for [`Deployer::recover`], called at the
//! appliance's start: the pending switch is resolved by the `current` link (committed, or the
//! previous release is current), the current release's files are checked against its
//! statement, and its services are started again (the appliance's start killed what a previous
//! process left running, with every other leftover cell: `Sandbox::open`).
//! Supervision continues offline: nothing here needs the control plane.
//! One deploy (or recovery) runs at a time; [`Deployer::status`] answers meanwhile.
//!
//! The releases root is outside the state directory (the box may not read that one) and
//! readable by the box user; logs (`.logs/`) are the appliance's only: a redacted tail of one,
//! and its service's metrics, go up only where the customer's policy opts in (`telemetry`).

mod health;
mod install;
mod pointer;
mod secrets;
mod supervise;
mod telemetry;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use airlock_core::release::{ReleaseManifest, VerifiedRelease};
use serde::Serialize;

pub(crate) use install::Releases;
#[allow(unused_imports)] // `Binding`: for the tests.
pub(crate) use secrets::{Binding, Bindings, SecretUnavailable, SecretValues, task_env};
pub(crate) use supervise::{
    Executor, ProcessExecutor, ReleaseInfo, ServiceState, ServiceStatus, ServiceUnit, SuperviseConfig, Supervised,
    program,
};
pub(crate) use telemetry::ServiceMetrics;

/// Why a deploy was refused: nothing was changed, the current release runs on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum DeployError {
    #[error("service `{service}` asks to run as root, which the customer's approval does not cover")]
    RootNotAllowed { service: String },
    #[error("artifact `{path}` does not match its signed digest and size: refused, nothing installed")]
    Tampered { path: String },
    #[error("artifact `{path}` is not in the blob store: {why}")]
    MissingArtifact { path: String, why: String },
    #[error(transparent)]
    Secret(#[from] SecretUnavailable),
    #[error("the releases directory: {0}")]
    BadReleasesRoot(String),
    #[error("{0}")]
    Io(String),
}

/// Why a deploy was rolled back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[serde(rename_all = "snake_case", tag = "reason")]
pub(crate) enum RollbackReason {
    #[error("services {services:?} were not healthy within {deadline_ms} ms")]
    NotHealthy { services: Vec<String>, deadline_ms: u64 },
    #[error("service `{service}` failed its health checks")]
    Unhealthy { service: String },
    #[error("service `{service}` exited and will not be restarted: {why}")]
    Exited { service: String, why: String },
    #[error("the switch could not be recorded: {why}")]
    Switch { why: String },
    #[error("the customer switched the Deploy phase off while the new release was starting")]
    SwitchedOff,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub(crate) enum DeployOutcome {
    /// The release is current and healthy; the previous one is stopped and kept for rollback.
    Deployed { digest: String },
    /// It was current already: nothing was done.
    AlreadyCurrent { digest: String },
    /// The previous release (if any) is current again, and runs again (`restored`) if it ran.
    RolledBack { reason: RollbackReason, restored: Option<String> },
}

/// What a deploy reports as it goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "event")]
pub(crate) enum DeployEvent {
    Installed { digest: String },
    Stopping { digest: String },
    Starting { digest: String },
    Service { service: String, status: ServiceStatus },
    Switched { digest: String },
    RollingBack { reason: RollbackReason },
}

/// One service as `Deployer::status` reports it (serialisable, to go up as metadata).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct ServiceReport {
    pub(crate) release: ReleaseInfo,
    pub(crate) service: String,
    pub(crate) status: ServiceStatus,
    pub(crate) restarts: u32,
    /// Only where asked for (the customer's policy opts in), for a service running now.
    pub(crate) metrics: Option<ServiceMetrics>,
    /// The same: the redacted last bytes of its log.
    pub(crate) log_tail: Option<String>,
}

/// The most log bytes one report carries, all services together.
const MAX_REPORT_LOG_BYTES: usize = 256 * 1024;

/// The engine's settings.
#[derive(Debug, Clone)]
pub(crate) struct DeployConfig {
    /// How long the new services have to become healthy.
    pub(crate) health_deadline: Duration,
    pub(crate) supervise: SuperviseConfig,
}

impl Default for DeployConfig {
    fn default() -> Self {
        Self { health_deadline: Duration::from_secs(60), supervise: SuperviseConfig::default() }
    }
}

/// The releases running now.
#[derive(Debug)]
struct Active {
    release: ReleaseInfo,
    services: Vec<Supervised>,
}

#[derive(Debug, Default)]
struct Inner {
    current: Option<Active>,
    /// The services of the last deploy that was rolled back, as reported.
    rolled_back: Vec<ServiceReport>,
}

/// The deploy engine over an [`Executor`].
#[derive(Debug)]
pub(crate) struct Deployer<E: Executor = ProcessExecutor> {
    releases: Releases,
    executor: E,
    config: DeployConfig,
    inner: tokio::sync::Mutex<Inner>,
    /// What `status` reads while a deploy holds `inner`.
    shown: std::sync::Mutex<Shown>,
    /// Whether a deploy waiting for its services' health must give up and roll back (the
    /// customer switched the Deploy phase off).
    abort: std::sync::Mutex<Option<Abort>>,
}

/// When a deploy waiting for health gives up.
#[derive(Clone)]
pub(crate) struct Abort(pub(crate) Arc<dyn Fn() -> bool + Send + Sync>);

impl std::fmt::Debug for Abort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Abort")
    }
}

#[derive(Debug, Default)]
struct Shown {
    current: Option<ReleaseInfo>,
    running: Vec<(ReleaseInfo, Arc<ServiceUnit>, tokio::sync::watch::Receiver<ServiceState>)>,
    rolled_back: Vec<ServiceReport>,
}

fn info(manifest: &ReleaseManifest, digest: &str) -> ReleaseInfo {
    ReleaseInfo { name: manifest.name.clone(), version: manifest.version.clone(), digest: digest.to_owned() }
}

impl<E: Executor> Deployer<E> {
    pub(crate) fn new(releases: Releases, executor: E, config: DeployConfig) -> Self {
        Self {
            releases,
            executor,
            config,
            inner: tokio::sync::Mutex::new(Inner::default()),
            shown: std::sync::Mutex::new(Shown::default()),
            abort: std::sync::Mutex::new(None),
        }
    }

    /// From now on, a deploy waiting for health rolls back as soon as `abort` says so.
    pub(crate) fn abort_when(&self, abort: Abort) {
        *self.abort.lock().unwrap_or_else(|e| e.into_inner()) = Some(abort);
    }

    fn aborted(&self) -> bool {
        self.abort.lock().unwrap_or_else(|e| e.into_inner()).as_ref().is_some_and(|abort| (abort.0)())
    }

    #[cfg(test)]
    pub(crate) fn releases(&self) -> &Releases {
        &self.releases
    }

    /// Every service of the current release, and of the last rolled-back deploy.
    pub(crate) fn status(&self) -> Vec<ServiceReport> {
        self.status_with(&airlock_core::policy::Telemetry::default())
    }

    /// The same, with what `telemetry` (the customer's policy) lets go up of each service
    /// running now: its metrics, and the redacted tail of its log.
    pub(crate) fn status_with(&self, telemetry: &airlock_core::policy::Telemetry) -> Vec<ServiceReport> {
        let (running, rolled_back) = {
            let shown = self.shown.lock().unwrap_or_else(|e| e.into_inner());
            (shown.running.clone(), shown.rolled_back.clone())
        };
        // One report stays well under the gateway's message size, however many services run.
        let tail_bytes = telemetry.log_tail().map(|bytes| bytes.min(MAX_REPORT_LOG_BYTES / running.len().max(1)));
        // Files are read outside the lock `show` takes.
        let mut out: Vec<ServiceReport> = running
            .iter()
            .map(|(release, unit, state)| {
                let s = state.borrow().clone();
                let metrics = telemetry.service_metrics.then(|| s.cell.as_deref().map(telemetry::read_metrics));
                let logged =
                    usize::try_from(unit.logged.load(std::sync::atomic::Ordering::Relaxed)).unwrap_or(usize::MAX);
                let log_tail =
                    tail_bytes.map(|bytes| telemetry::log_tail(&unit.log, bytes.min(logged), &unit.env.secret_values));
                ServiceReport {
                    release: release.clone(),
                    service: unit.service.name.clone(),
                    status: s.status,
                    restarts: s.restarts,
                    metrics: metrics.map(Option::unwrap_or_default),
                    log_tail,
                }
            })
            .collect();
        out.extend(rolled_back);
        out
    }

    /// The release running now, if any.
    pub(crate) fn current(&self) -> Option<ReleaseInfo> {
        self.shown.lock().unwrap_or_else(|e| e.into_inner()).current.clone()
    }

    /// The SHA-256 of every artifact the installed releases (current and previous) hold.
    pub(crate) fn artifacts_in_use(&self) -> std::collections::BTreeSet<String> {
        self.releases.artifacts_in_use()
    }

    /// The installed directory of the release running now, if it is `digest`.
    pub(crate) fn current_dir(&self, digest: &str) -> Option<PathBuf> {
        self.current().filter(|r| r.digest == digest).map(|r| self.releases.dir(&r.digest))
    }

    fn show(&self, inner: &Inner) {
        let mut shown = self.shown.lock().unwrap_or_else(|e| e.into_inner());
        shown.current = inner.current.as_ref().map(|a| a.release.clone());
        shown.running = inner
            .current
            .iter()
            .flat_map(|a| a.services.iter().map(|s| (a.release.clone(), s.unit.clone(), s.watch())))
            .collect();
        shown.rolled_back = inner.rolled_back.clone();
    }

    /// The units of the services of `manifest` that run under `bindings`, their environments
    /// resolved (a missing secret value refuses them all).
    async fn units(
        &self,
        release: &ReleaseInfo,
        manifest: &ReleaseManifest,
        secrets: &dyn SecretValues,
        bindings: &Bindings,
    ) -> Result<Vec<Arc<ServiceUnit>>, DeployError> {
        let dir = self.releases.dir(&release.digest);
        let mut units = Vec::new();
        for service in manifest.services.iter().filter(|s| bindings.runs(s)) {
            let env = secrets::service_env(manifest, service, bindings, secrets).await?;
            units.push(Arc::new(ServiceUnit {
                release: release.clone(),
                service: service.clone(),
                release_dir: dir.clone(),
                env,
                log: self.releases.log(&service.name),
                logged: Default::default(),
            }));
        }
        Ok(units)
    }

    /// Deploys `release` (its artifacts in `blobs`, each named by its SHA-256); see the module
    /// documentation. `root_allowed`: whether the customer's approval covers `run_as_root`.
    pub(crate) async fn deploy(
        &self,
        release: &VerifiedRelease,
        blobs: &Path,
        secrets: &dyn SecretValues,
        bindings: &Bindings,
        root_allowed: bool,
        progress: &(dyn Fn(DeployEvent) + Send + Sync),
    ) -> Result<DeployOutcome, DeployError> {
        let mut inner = self.inner.lock().await;
        let manifest = release.manifest();
        let digest = release.digest().to_owned();
        // Decide: everything that refuses the deploy, before anything changes.
        if !root_allowed && let Some(s) = manifest.root_services().find(|s| bindings.runs(s)) {
            return Err(DeployError::RootNotAllowed { service: s.name.clone() });
        }
        if inner.current.as_ref().is_some_and(|a| a.release.digest == digest) {
            return Ok(DeployOutcome::AlreadyCurrent { digest });
        }
        let new_info = info(manifest, &digest);
        let units = self.units(&new_info, manifest, secrets, bindings).await?;
        self.releases.install(release, blobs)?;
        progress(DeployEvent::Installed { digest: digest.clone() });

        // Act.
        let mut state = pointer::read(self.releases.root())?;
        // The release current on disk even if it is not running (`recover` was not called):
        // it stays the one to roll back to, and is not pruned.
        let from = inner.current.as_ref().map(|a| a.release.digest.clone()).or_else(|| state.current.clone());
        state.pending = Some(pointer::Pending { from: from.clone(), to: digest.clone() });
        if root_allowed {
            state.root_allowed.insert(digest.clone());
        } else {
            state.root_allowed.remove(&digest);
        }
        pointer::write(self.releases.root(), &state)?;
        inner.rolled_back.clear();
        let old = inner.current.take();
        let old_units = match old {
            Some(old) => {
                progress(DeployEvent::Stopping { digest: old.release.digest.clone() });
                let units: Vec<Arc<ServiceUnit>> = old.services.iter().map(|s| s.unit.clone()).collect();
                stop_all(old.services).await;
                Some((old.release, units))
            }
            None => None,
        };
        progress(DeployEvent::Starting { digest: digest.clone() });
        let started: Vec<Supervised> = units.into_iter().map(|u| self.executor.start(u)).collect();
        inner.current = Some(Active { release: new_info.clone(), services: started });
        self.show(&inner);
        let waited = self.wait_healthy(inner.current.as_ref().map_or(&[][..], |a| &a.services), progress).await;
        let committed = waited.and_then(|()| {
            pointer::switch(self.releases.root(), Some(&digest))
                .and_then(|()| {
                    state.pending = None;
                    state.previous = from.clone();
                    state.current = Some(digest.clone());
                    pointer::write(self.releases.root(), &state)
                })
                .map_err(|e| RollbackReason::Switch { why: e.to_string() })
        });
        match committed {
            Ok(()) => {
                progress(DeployEvent::Switched { digest: digest.clone() });
                let keep: Vec<&str> = [Some(digest.as_str()), from.as_deref()].into_iter().flatten().collect();
                self.releases.prune(&keep);
                state.root_allowed.retain(|d| keep.contains(&d.as_str()));
                if let Err(e) = pointer::write(self.releases.root(), &state) {
                    tracing::warn!(error = %e, "cannot record the pruned releases");
                }
                Ok(DeployOutcome::Deployed { digest })
            }
            Err(reason) => {
                progress(DeployEvent::RollingBack { reason: reason.clone() });
                tracing::warn!(release = %digest, reason = %reason, "rolling back a deploy");
                let failed = inner.current.take().map(|a| a.services).unwrap_or_default();
                let mut reports = Vec::new();
                for s in &failed {
                    let st = s.state();
                    reports.push(ServiceReport {
                        release: new_info.clone(),
                        service: s.unit.service.name.clone(),
                        status: ServiceStatus::RolledBack,
                        restarts: st.restarts,
                        metrics: None,
                        log_tail: None,
                    });
                }
                stop_all(failed).await;
                inner.rolled_back = reports;
                // The previous release, as it ran: its units kept their resolved environments.
                if let Some((release, units)) = old_units {
                    let services = units.into_iter().map(|u| self.executor.start(u)).collect();
                    inner.current = Some(Active { release, services });
                }
                // The link never left `from` unless the switch itself failed after renaming.
                let restored = inner.current.as_ref().map(|a| a.release.digest.clone());
                if let Err(e) = pointer::switch(self.releases.root(), from.as_deref()) {
                    tracing::error!(error = %e, "cannot point `current` back at the previous release");
                }
                state.pending = None;
                state.current = from.clone();
                if let Err(e) = pointer::write(self.releases.root(), &state) {
                    tracing::error!(error = %e, "cannot record the rollback");
                }
                self.show(&inner);
                Ok(DeployOutcome::RolledBack { reason, restored })
            }
        }
    }

    /// Waits until every service is healthy, one exits for good, or the deadline passes.
    async fn wait_healthy(
        &self,
        services: &[Supervised],
        progress: &(dyn Fn(DeployEvent) + Send + Sync),
    ) -> Result<(), RollbackReason> {
        let deadline = tokio::time::Instant::now() + self.config.health_deadline;
        let mut last: Vec<Option<ServiceStatus>> = vec![None; services.len()];
        loop {
            let mut all = true;
            for (i, s) in services.iter().enumerate() {
                let st = s.state();
                if last[i] != Some(st.status) {
                    last[i] = Some(st.status);
                    progress(DeployEvent::Service { service: s.unit.service.name.clone(), status: st.status });
                }
                if st.status == ServiceStatus::Unhealthy {
                    return Err(RollbackReason::Unhealthy { service: s.unit.service.name.clone() });
                }
                if st.ended && st.status != ServiceStatus::Healthy {
                    return Err(RollbackReason::Exited {
                        service: s.unit.service.name.clone(),
                        why: st.last_error.unwrap_or_else(|| "it stopped".into()),
                    });
                }
                all &= st.status == ServiceStatus::Healthy;
            }
            if all {
                return Ok(());
            }
            if self.aborted() {
                return Err(RollbackReason::SwitchedOff);
            }
            if tokio::time::Instant::now() >= deadline {
                let services = services
                    .iter()
                    .filter(|s| s.state().status != ServiceStatus::Healthy)
                    .map(|s| s.unit.service.name.clone())
                    .collect();
                let deadline_ms = u64::try_from(self.config.health_deadline.as_millis()).unwrap_or(u64::MAX);
                return Err(RollbackReason::NotHealthy { services, deadline_ms });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// At the appliance's start: settles a switch a crash interrupted (see `pointer`) and starts
    /// the current release's services again. Returns the current release's digest, if any.
    pub(crate) async fn recover(
        &self,
        secrets: &dyn SecretValues,
        bindings: &Bindings,
    ) -> Result<Option<String>, DeployError> {
        let mut inner = self.inner.lock().await;
        let state = pointer::settle(self.releases.root())?;
        let Some(digest) = state.current.clone() else { return Ok(None) };
        let (statement, manifest) = self.releases.installed(&digest)?;
        // The release directory is outside the state directory: check it was not edited while
        // the appliance was down.
        self.releases.check(&digest, &statement)?;
        if !state.root_allowed.contains(&digest)
            && let Some(s) = manifest.root_services().find(|s| bindings.runs(s))
        {
            return Err(DeployError::RootNotAllowed { service: s.name.clone() });
        }
        let release = info(&manifest, &digest);
        let units = self.units(&release, &manifest, secrets, bindings).await?;
        if let Some(old) = inner.current.take() {
            stop_all(old.services).await;
        }
        let services = units.into_iter().map(|u| self.executor.start(u)).collect();
        inner.current = Some(Active { release, services });
        self.show(&inner);
        Ok(Some(digest))
    }

    /// Stops every running service (at the appliance's shutdown; `current` stays as it is).
    pub(crate) async fn shutdown(&self) {
        let mut inner = self.inner.lock().await;
        if let Some(active) = inner.current.take() {
            stop_all(active.services).await;
        }
        self.show(&inner);
    }
}

impl Deployer<ProcessExecutor> {
    /// What services and their exec checks may use from now on (the customer's caps).
    pub(crate) fn set_limits(&self, limits: crate::sandbox::RunLimits) {
        self.executor.set_limits(limits);
    }

    /// The engine with the built-in process supervisor, its releases in `releases_dir` (or the
    /// default beside the box's working directories), never inside `state_dir`.
    pub(crate) fn open(
        sandbox: Arc<crate::sandbox::Sandbox>,
        state_dir: &Path,
        releases_dir: Option<&Path>,
        config: DeployConfig,
    ) -> Result<Self, DeployError> {
        let state = std::fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.to_owned());
        let tag = airlock_core::operation::sha256_hex(state.as_os_str().as_encoded_bytes())[..16].to_owned();
        let root = match releases_dir {
            Some(dir) => dir.to_owned(),
            None => default_releases_dir(&tag)?,
        };
        if let Some(system) = sandbox.readable_by_every_box(&root) {
            return Err(DeployError::BadReleasesRoot(format!(
                "{} is under {system}, which every box may read (other releases, and their logs to a root run): put releases_dir elsewhere, e.g. under /var/lib",
                root.display()
            )));
        }
        let releases = Releases::open(&root, &state, sandbox.work_root())?;
        let executor = ProcessExecutor::new(sandbox, config.supervise.clone());
        Ok(Self::new(releases, executor, config))
    }
}

/// Stops services, all at once.
async fn stop_all(services: Vec<Supervised>) {
    let stops: Vec<_> = services.into_iter().map(|s| tokio::spawn(s.stop())).collect();
    for stop in stops {
        let _ = stop.await;
    }
}

/// Where releases go by default: beside the box's working directories, never in the state
/// directory; `tag` tells appliances on one host apart. Never a shared temporary directory,
/// where another user could make the directory first.
pub(crate) fn default_releases_dir(tag: &str) -> Result<PathBuf, DeployError> {
    if nix::unistd::geteuid().is_root() {
        return Ok(PathBuf::from("/var/lib/airlock-releases").join(tag));
    }
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| {
            std::env::var_os("HOME").map(PathBuf::from).filter(|p| p.is_absolute()).map(|h| h.join(".local/state"))
        })
        .ok_or_else(|| {
            DeployError::BadReleasesRoot(
                "neither XDG_STATE_HOME nor HOME is set to an absolute path: set releases_dir".into(),
            )
        })?;
    Ok(base.join(format!("airlock-releases-{tag}")))
}
