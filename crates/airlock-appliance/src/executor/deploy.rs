//! Running an allowed deploy: the release's artifacts into the blob store, its required secrets
//! checked (held, and reported, until they all exist), then the deploy engine
//! ([`crate::deploy::Deployer`]) installs beside, starts, health-checks, switches or rolls back.
//!
//! A deploy is recorded and signed like any run ([`super::record`]): its exit code says how it
//! ended ([`DEPLOYED`], [`ROLLED_BACK`], [`REFUSED`]) and its output is the outcome as JSON
//! (metadata only), held on the appliance until the customer releases it.
//! What it does as it goes is reported up as a `DeploymentStatus` (the latest replaces the one
//! before; it goes again after every `Welcome`), which carries states, names, versions and
//! whether each secret reference exists, never a value. Each running service's metrics and the
//! redacted tail of its log go with it only where the customer's policy in force opts in
//! (`[telemetry]`), read again for every report; then a report also goes every
//! [`TELEMETRY_EVERY`] and as soon as the policy changes (`watch_services`).

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use airlock_core::operation::ExecutionStatus;
use airlock_core::release::{SecretRef, VerifiedRelease};
use airlock_core::run_spec::RunUser;
use airlock_proto::gateway as wire;
use serde::Serialize;

use super::run::Ran;
use super::{Executor, Job};
use crate::deploy::{
    Bindings, DeployConfig, DeployError, DeployEvent, DeployOutcome, Deployer, ServiceReport, ServiceStatus,
};
use crate::secrets::{ExistenceState, SecretResolver};

/// Exit code of a deploy that switched to its release (or found it current already).
pub(crate) const DEPLOYED: i32 = 0;
/// Exit code of a deploy rolled back to the release before.
pub(crate) const ROLLED_BACK: i32 = 1;
/// Exit code of a deploy refused before anything changed (a tampered or missing artifact, a
/// secret value unavailable, root not covered, a full disk).
pub(crate) const REFUSED: i32 = 2;

/// How often the deployment status goes up, at least, while the customer's policy opts in to
/// telemetry (it goes whenever a service changes anyway).
pub(crate) const TELEMETRY_EVERY: Duration = Duration::from_secs(60);

/// Interrupted fetches of one deploy's artifacts before it is refused (each resumes).
const MAX_FETCH_ATTEMPTS: u32 = 100;

/// What the appliance needs to deploy releases.
pub(crate) struct Deployments {
    pub(crate) deployer: Deployer,
    /// Artifacts come over the session's connection, into `blobs`.
    pub(crate) fetcher: crate::artifacts::ArtifactFetcher,
    pub(crate) link: crate::artifacts::GatewayLink,
    pub(crate) secrets: SecretResolver,
    pub(crate) bindings: Bindings,
    /// Verified artifacts, each named by its SHA-256 (in the state directory).
    pub(crate) blobs: PathBuf,
    /// How often a deploy held for missing secrets looks again.
    pub(crate) hold_poll: Duration,
    /// How long a deploy may be held before it is given up.
    pub(crate) max_hold: Duration,
    /// How long a fetch waits for a connection to the control plane.
    pub(crate) fetch_wait: Duration,
    /// The latest report, sent again after every `Welcome`.
    status: Mutex<wire::DeploymentStatus>,
    /// One deploy at a time, from its fetch to its blob pruning: a fetch's free-space check
    /// holds, and pruning never removes what another deploy just fetched.
    one_at_a_time: tokio::sync::Mutex<()>,
}

/// The appliance's deploy settings, from its configuration.
#[derive(Clone, Debug, Default)]
pub(crate) struct DeployOptions {
    pub(crate) releases_dir: Option<PathBuf>,
    pub(crate) dependencies: std::collections::BTreeMap<String, crate::config::CustomerDependency>,
    pub(crate) secrets: crate::SecretsConfig,
    pub(crate) engine: DeployConfig,
    /// Default 5 s.
    pub(crate) hold_poll: Option<Duration>,
    /// Default 24 h: a deploy held longer is given up (the customer's approval was for then).
    pub(crate) max_hold: Option<Duration>,
    /// Default 10 min: how long a fetch waits for the connection to come back.
    pub(crate) fetch_wait: Option<Duration>,
    /// How long an existence answer is reused (default: the resolver's).
    pub(crate) existence_ttl: Option<Duration>,
}

impl Deployments {
    pub(crate) fn open(
        sandbox: std::sync::Arc<crate::sandbox::Sandbox>,
        state_dir: &std::path::Path,
        options: DeployOptions,
    ) -> Result<Self, DeployError> {
        let deployer = Deployer::open(sandbox, state_dir, options.releases_dir.as_deref(), options.engine)?;
        let fetcher = crate::artifacts::ArtifactFetcher::new(state_dir)
            .map_err(|e| DeployError::Io(format!("the artifact store: {e}")))?;
        let blobs = fetcher.blobs_dir().to_owned();
        Ok(Self {
            deployer,
            fetcher,
            link: crate::artifacts::GatewayLink::default(),
            secrets: {
                let resolver = SecretResolver::new(&options.secrets, std::sync::Arc::new(crate::config::ProcessEnv))
                    .forbid(state_dir);
                match options.existence_ttl {
                    Some(ttl) => resolver.existence_ttl(ttl),
                    None => resolver,
                }
            },
            bindings: Bindings::from_config(&options.dependencies),
            blobs,
            hold_poll: options.hold_poll.unwrap_or(Duration::from_secs(5)),
            max_hold: options.max_hold.unwrap_or(Duration::from_secs(24 * 3600)),
            fetch_wait: options.fetch_wait.unwrap_or(Duration::from_secs(600)),
            status: Mutex::new(wire::DeploymentStatus::default()),
            one_at_a_time: tokio::sync::Mutex::new(()),
        })
    }
}

impl Deployments {
    /// Removes every blob (and partial fetch) no installed release holds: the store keeps only
    /// what the current and previous releases need, so releases cannot fill the state
    /// directory's disk deploy after deploy.
    fn prune_blobs(&self) {
        let keep = self.deployer.artifacts_in_use();
        let Ok(entries) = std::fs::read_dir(&self.blobs) else { return };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let sha256 = name.strip_suffix(".partial").unwrap_or(&name);
            if !keep.contains(sha256)
                && let Err(e) = std::fs::remove_file(entry.path())
            {
                tracing::warn!(blob = %name, error = %e, "cannot remove an artifact no release holds");
            }
        }
    }
}

/// Whether the customer switched the Deploy phase off on this host: a deploy in progress stops
/// (held, before install, or waiting for health).
pub(crate) fn deploy_switched_off(control: &crate::control::LocalControl) -> bool {
    control.disabled().contains(&airlock_core::policy::Phase::Deploy)
}

/// How a deploy ended, as its output (metadata only).
#[derive(Debug, Serialize)]
struct Report<'a> {
    release: &'a str,
    name: &'a str,
    version: &'a str,
    #[serde(flatten)]
    ended: Ended,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "snake_case", tag = "result")]
enum Ended {
    Deployed { outcome: DeployOutcome },
    RolledBack { outcome: DeployOutcome },
    Refused { reason: String },
}

fn release_ref(release: &VerifiedRelease) -> wire::ReleaseRef {
    wire::ReleaseRef {
        digest: release.digest().to_owned(),
        name: release.manifest().name.clone(),
        version: release.manifest().version.clone(),
    }
}

fn service_state(s: ServiceStatus) -> wire::ServiceState {
    match s {
        ServiceStatus::Starting => wire::ServiceState::Starting,
        ServiceStatus::Healthy => wire::ServiceState::Healthy,
        ServiceStatus::Unhealthy | ServiceStatus::Failed => wire::ServiceState::Unhealthy,
        ServiceStatus::Stopped => wire::ServiceState::Stopped,
        ServiceStatus::RolledBack => wire::ServiceState::RolledBack,
    }
}

impl Executor {
    /// Runs an allowed deploy to its end; see the module documentation.
    pub(crate) async fn run_deploy(&self, job: &Job, release: &VerifiedRelease) -> Ran {
        let started_at = self.control.now();
        let Some(d) = &self.deployments else {
            tracing::error!(request_id = %job.id, "this appliance has no deploy engine");
            return Ran::nothing(ExecutionStatus::FailedToStart, started_at, self.control.now());
        };
        let progress = |phase: wire::DeployPhase, missing: Vec<String>, reason: String| wire::DeployProgress {
            request_id: job.id.to_string(),
            release: Some(release_ref(release)),
            phase: phase as i32,
            missing_secrets: missing,
            reason,
        };
        let required: Vec<SecretRef> = release.manifest().required_secrets().into_iter().cloned().collect();
        let _one_at_a_time = d.one_at_a_time.lock().await;

        // A reference the customer's allow list does not cover is refused before anything,
        // and nothing about it is looked up or reported.
        if let Some(r) = required.iter().find(|r| !d.secrets.permits(r)) {
            let why =
                format!("the release needs secret `{r}`, which this appliance's [secrets] allow list does not cover");
            self.report(Some(progress(wire::DeployPhase::Failed, vec![], why.clone())), &[]).await;
            return self.deploy_ran(release, Ended::Refused { reason: why }, started_at, false);
        }
        self.report(Some(progress(wire::DeployPhase::Fetching, vec![], String::new())), &required).await;
        let ended = match self.fetch_artifacts(release).await {
            Err(why) => Ended::Refused { reason: why },
            Ok(()) => {
                let before = d.deployer.current();
                if let Err(cancelled) = self.hold_for_secrets(job, d, &required, &progress).await {
                    self.report(Some(progress(wire::DeployPhase::Failed, vec![], cancelled.clone())), &required).await;
                    return self.deploy_ran(release, Ended::Refused { reason: cancelled }, started_at, true);
                }
                // Another release deployed while this one was held: installing this one now could
                // go back to an older version the customer has moved on from.
                if d.deployer.current() != before {
                    let why = "another release was deployed while this one was held; request it again".to_owned();
                    self.report(Some(progress(wire::DeployPhase::Failed, vec![], why.clone())), &required).await;
                    return self.deploy_ran(release, Ended::Refused { reason: why }, started_at, false);
                }
                // Switched off while it fetched or was held: nothing is installed or stopped.
                if deploy_switched_off(&self.control) {
                    let why = "the customer switched the Deploy phase off before the release was installed".to_owned();
                    self.report(Some(progress(wire::DeployPhase::Failed, vec![], why.clone())), &required).await;
                    return self.deploy_ran(release, Ended::Refused { reason: why }, started_at, true);
                }
                self.report(Some(progress(wire::DeployPhase::Installing, vec![], String::new())), &required).await;
                let root_allowed = job.statement.command.run.user == RunUser::Root;
                // The customer's caps, as this deploy's decision settled them, hold for its
                // services and their checks (not its wall time: services run on).
                d.deployer.set_limits(crate::sandbox::RunLimits::from(job.limits));
                let on_event = |e: DeployEvent| tracing::info!(request_id = %job.id, event = ?e, "deploy");
                match d.deployer.deploy(release, &d.blobs, &d.secrets, &d.bindings, root_allowed, &on_event).await {
                    Ok(outcome @ (DeployOutcome::Deployed { .. } | DeployOutcome::AlreadyCurrent { .. })) => {
                        Ended::Deployed { outcome }
                    }
                    Ok(outcome @ DeployOutcome::RolledBack { .. }) => Ended::RolledBack { outcome },
                    Err(e) => Ended::Refused { reason: e.to_string() },
                }
            }
        };
        if !matches!(ended, Ended::Refused { .. }) {
            d.prune_blobs();
        }
        let (phase, reason) = match &ended {
            Ended::Deployed { .. } => (wire::DeployPhase::Deployed, String::new()),
            Ended::RolledBack { outcome: DeployOutcome::RolledBack { reason, .. } } => {
                (wire::DeployPhase::RolledBack, reason.to_string())
            }
            Ended::RolledBack { .. } => (wire::DeployPhase::RolledBack, String::new()),
            Ended::Refused { reason } => (wire::DeployPhase::Failed, reason.clone()),
        };
        self.report(Some(progress(phase, vec![], reason)), &required).await;
        self.deploy_ran(release, ended, started_at, false)
    }

    fn deploy_ran(
        &self,
        release: &VerifiedRelease,
        ended: Ended,
        started_at: airlock_core::Timestamp,
        cancelled: bool,
    ) -> Ran {
        let exit_code = match &ended {
            Ended::Deployed { .. } => DEPLOYED,
            Ended::RolledBack { .. } => ROLLED_BACK,
            Ended::Refused { .. } => REFUSED,
        };
        let report = Report {
            release: release.digest(),
            name: &release.manifest().name,
            version: &release.manifest().version,
            ended,
        };
        let output = serde_json::to_vec_pretty(&report).unwrap_or_default();
        let status = if cancelled { ExecutionStatus::Cancelled } else { ExecutionStatus::Completed };
        Ran {
            status,
            exit_code: (!cancelled).then_some(exit_code),
            output,
            truncated: false,
            started_at,
            finished_at: self.control.now(),
        }
    }

    /// Every artifact into the blob store, fetched over the session's connection where it is
    /// not there yet; a dropped connection waits for the next one and resumes where it stopped.
    /// A digest mismatch or a full disk refuses the deploy.
    async fn fetch_artifacts(&self, release: &VerifiedRelease) -> Result<(), String> {
        use crate::artifacts::FetchError;
        let Some(d) = &self.deployments else { return Err("no deploy engine".into()) };
        let artifacts = &release.statement().artifacts;
        if artifacts.iter().all(|a| d.blobs.join(&a.sha256).is_file()) {
            return Ok(());
        }
        for attempt in 0..MAX_FETCH_ATTEMPTS {
            // The instruction came over a connection; after a drop, wait a while for the next.
            let Ok(channel) = tokio::time::timeout(d.fetch_wait, d.link.connected()).await else {
                return Err(format!(
                    "no connection to the control plane for {:?} to fetch the artifacts",
                    d.fetch_wait
                ));
            };
            match d.fetcher.fetch_all(&channel, artifacts).await {
                Ok(_) => return Ok(()),
                Err(e @ (FetchError::Transport(_) | FetchError::Cancelled { .. })) => {
                    tracing::warn!(error = %e, attempt, "artifact fetch interrupted; resuming on the next connection");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        Err(format!("the artifacts could not be fetched after {MAX_FETCH_ATTEMPTS} interrupted attempts"))
    }

    /// Waits until every required secret exists, reporting the deploy held (with the missing
    /// references) meanwhile; gives up when the customer switches Deploy off.
    async fn hold_for_secrets(
        &self,
        job: &Job,
        d: &Deployments,
        required: &[SecretRef],
        progress: &(dyn Fn(wire::DeployPhase, Vec<String>, String) -> wire::DeployProgress + Sync),
    ) -> Result<(), String> {
        let mut held_reported: Option<Vec<String>> = None;
        // The appliance's clock (tests move it), so a hold that outlives a day is given up
        // however long the host slept.
        let deadline = self.control.now().saturating_add(d.max_hold);
        loop {
            let mut missing = Vec::new();
            for r in required {
                if d.secrets.existence(r).await.state != ExistenceState::Present {
                    missing.push(r.to_string());
                }
            }
            if missing.is_empty() {
                return Ok(());
            }
            if held_reported.as_ref() != Some(&missing) {
                tracing::warn!(request_id = %job.id, ?missing, "deploy held: required secrets do not exist yet");
                let _ = self.control.audit.record(
                    airlock_core::audit::AuditAction::DeploymentHeld,
                    airlock_core::audit::Outcome::Success,
                    serde_json::json!({ "request_id": job.id, "missing_secrets": missing }),
                );
                self.report(Some(progress(wire::DeployPhase::Held, missing.clone(), String::new())), required).await;
                held_reported = Some(missing);
            }
            if deploy_switched_off(&self.control) {
                return Err("the customer switched the Deploy phase off while the deploy was held".into());
            }
            if self.control.now() >= deadline {
                let missing = held_reported.unwrap_or_default().join(", ");
                return Err(format!("required secrets were still missing after {:?}: {missing}", d.max_hold));
            }
            tokio::time::sleep(d.hold_poll).await;
        }
    }

    /// Makes and sends the appliance's deployment status: the current release, `deploy` (or the
    /// last one), every service, and whether each of `secrets` exists.
    pub(crate) async fn report(&self, deploy: Option<wire::DeployProgress>, secrets: &[SecretRef]) {
        let Some(d) = &self.deployments else { return };
        let services: Vec<ServiceReport> = d.deployer.status_with(&self.telemetry());
        let mut existence = Vec::new();
        for r in secrets {
            let e = d.secrets.existence(r).await;
            existence.push(wire::SecretExistence {
                reference: r.to_string(),
                state: match e.state {
                    ExistenceState::Present => wire::SecretState::Present,
                    ExistenceState::Missing => wire::SecretState::Missing,
                    ExistenceState::Unknown => wire::SecretState::Unknown,
                } as i32,
                last_changed_unix_ms: e.last_changed.map_or(0, |t| t.unix_millis()),
            });
        }
        let current =
            d.deployer.current().map(|r| wire::ReleaseRef { digest: r.digest, name: r.name, version: r.version });
        let msg = {
            let mut status = d.status.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(p) = deploy {
                status.deploy = Some(p);
            }
            if !secrets.is_empty() {
                status.secrets = existence;
            }
            status.current = current;
            status.services = services
                .iter()
                .map(|s| wire::ServiceStatus {
                    name: s.service.clone(),
                    state: service_state(s.status) as i32,
                    release_version: s.release.version.clone(),
                    restarts: s.restarts,
                    metrics: s.metrics.map(|m| wire::ServiceMetrics {
                        cpu_usage_usec: m.cpu_usage_usec,
                        memory_current_bytes: m.memory_current_bytes,
                        pids_current: m.pids_current,
                    }),
                    log_tail: s.log_tail.clone(),
                })
                .collect();
            status.at_unix_ms = self.control.now().unix_millis();
            wire::ApplianceMessage { body: Some(wire::appliance_message::Body::DeploymentStatus(status.clone())) }
        };
        self.control.outbound.send(msg).await;
    }

    /// Runs an allowed release task (e.g. `migrate`) boxed in the release's directory, only if
    /// that release is the one running here, with its own secrets and the dependencies'
    /// bindings; recorded like a script's run (exit code, output held on the appliance).
    pub(crate) async fn run_task(&self, job: &Job, release: &VerifiedRelease) -> Ran {
        let started_at = self.control.now();
        let not_started = |why: String| {
            tracing::warn!(request_id = %job.id, reason = %why, "a release task was not started");
            Ran {
                status: ExecutionStatus::FailedToStart,
                exit_code: None,
                output: why.into_bytes(),
                truncated: false,
                started_at,
                finished_at: self.control.now(),
            }
        };
        let Some(d) = &self.deployments else { return not_started("this appliance has no deploy engine".into()) };
        let Some(args) = airlock_core::deploy::TaskArgs::from_args(&job.statement.request.args) else {
            return not_started("the request names no task".into());
        };
        let Some(task) = release.manifest().tasks.iter().find(|t| t.name == args.task) else {
            return not_started(format!("release {} has no task `{}`", release.digest(), args.task));
        };
        let Some(dir) = d.deployer.current_dir(release.digest()) else {
            return not_started(format!(
                "release {} {} is not the one running here: deploy it first",
                release.manifest().name,
                release.manifest().version
            ));
        };
        let env = match crate::deploy::task_env(release.manifest(), task, &d.bindings, &d.secrets).await {
            Ok(env) => env,
            Err(e) => return not_started(e.to_string()),
        };
        let limits = crate::sandbox::RunLimits::from(job.limits);
        let cwd = task.workdir.as_ref().map_or_else(|| dir.clone(), |w| dir.join(w.as_str()));
        let program = crate::deploy::program(&dir, &task.command);
        let cell = crate::sandbox::CellName::operation(job.id);
        let launch = crate::sandbox::ServiceLaunch {
            cell: &cell,
            program: &program,
            args: &task.args,
            env: &env.vars,
            release_dir: &dir,
            cwd: &cwd,
            limits: &limits,
            run_as: self.sandbox.run_as(),
        };
        let (cmd, boxed) = match self.sandbox.prepare_service(&launch) {
            Ok(prepared) => prepared,
            Err(e) => return not_started(e),
        };
        let cancelled = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        match self.run_boxed(job, cmd, boxed, &limits, cancelled).await {
            Ok((status, exit_code, output, truncated)) => {
                Ran { status, exit_code, output, truncated, started_at, finished_at: self.control.now() }
            }
            Err(e) => not_started(e.to_string()),
        }
    }

    /// Where the session publishes its connection, for artifact fetches.
    pub(crate) fn gateway_link(&self) -> crate::artifacts::GatewayLink {
        self.deployments.as_ref().map(|d| d.link.clone()).unwrap_or_default()
    }

    /// The latest status again (after a `Welcome`), with the services as they are now.
    pub(crate) async fn report_again(&self) {
        if self.deployments.is_some() {
            self.report(None, &[]).await;
        }
    }

    /// At the appliance's start: the current release's services start again (supervision goes
    /// on across restarts and offline).
    pub(crate) async fn recover_deployments(&self) {
        let Some(d) = &self.deployments else { return };
        // The caps of the policy in force (their defaults without one).
        let policy = self.control.policy.read().unwrap_or_else(|e| e.into_inner()).clone();
        let caps = policy.as_ref().map(|p| &p.document().vendor_code);
        if let Ok(limits) = airlock_core::run_spec::resolve(&Default::default(), caps) {
            d.deployer.set_limits(crate::sandbox::RunLimits::from(limits));
        }
        match d.deployer.recover(&d.secrets, &d.bindings).await {
            Ok(Some(digest)) => tracing::info!(release = %digest, "the current release runs again"),
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, "cannot start the current release again"),
        }
    }

    /// What the customer's policy in force lets go up of the services (nothing without one).
    fn telemetry(&self) -> airlock_core::policy::Telemetry {
        let policy = self.control.policy.read().unwrap_or_else(|e| e.into_inner());
        policy.as_ref().map(|p| p.document().telemetry).unwrap_or_default()
    }

    /// Reports the deployments again whenever a service changes state or restarts (checked every
    /// `every`), so the control plane learns of a service gone unhealthy between deploys; and,
    /// while the customer's policy opts in to telemetry, every `telemetry_every` and whenever
    /// that choice changes (so a report carrying a log tail is replaced by one without as soon
    /// as the customer opts out). Runs until aborted.
    pub(crate) async fn watch_services(&self, every: Duration, telemetry_every: Duration) {
        let Some(d) = &self.deployments else { return };
        let mut last = Vec::new();
        let mut last_telemetry = self.telemetry();
        let mut last_sent = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(every).await;
            let now: Vec<(String, ServiceStatus, u32)> =
                d.deployer.status().into_iter().map(|s| (s.service, s.status, s.restarts)).collect();
            let telemetry = self.telemetry();
            let due = telemetry.any() && last_sent.elapsed() >= telemetry_every;
            if now != last || telemetry != last_telemetry || due {
                self.report(None, &[]).await;
                last = now;
                last_telemetry = telemetry;
                last_sent = tokio::time::Instant::now();
            }
        }
    }

    /// At the appliance's stop: every service stops (SIGTERM, then SIGKILL after its timeout).
    pub(crate) async fn stop_deployments(&self) {
        if let Some(d) = &self.deployments {
            d.deployer.shutdown().await;
        }
    }
}
