//! The deploy engine with real boxed processes. CI runs as root with cgroup v2 and Landlock,
//! which these tests need: they fail, never skip, where the box cannot be built.
//! Services are shell scripts; the web ones serve their release's `www/` with
//! `python3 -m http.server` on a free port.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use airlock_core::customer_key::CustomerSigningKey;
use airlock_core::operation::sha256_hex;
use airlock_core::release::{Artifact, RelativePath, ReleaseStatement, VerifiedRelease, sign_release, verify_release};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::sandbox::{RunAs, Sandbox};
use crate::testing::SmallDisk;

struct Fixture {
    _state: tempfile::TempDir,
    top: tempfile::TempDir,
    sandbox: Arc<Sandbox>,
    deployer: Deployer,
    key: CustomerSigningKey,
}

fn config() -> DeployConfig {
    DeployConfig {
        health_deadline: Duration::from_secs(4),
        supervise: SuperviseConfig {
            settle: Duration::from_millis(200),
            reset_after: Duration::from_secs(10),
            first_probe: Duration::from_millis(100),
            probe_interval_cap: Some(Duration::from_millis(200)),
            log_cap_bytes: 1 << 20,
            ..SuperviseConfig::default()
        },
    }
}

fn fixture() -> Fixture {
    fixture_with(config(), None)
}

/// With `box_user`, vendor code runs as that named user (one with a passwd entry) rather than
/// as dynamic uids.
fn fixture_with(config: DeployConfig, box_user: Option<&str>) -> Fixture {
    fixture_on(config, box_user, &crate::config::BoxDisk::default())
}

/// With boxes held to `disk` by the usage watch.
fn fixture_on(config: DeployConfig, box_user: Option<&str>, disk: &crate::config::BoxDisk) -> Fixture {
    assert!(
        Path::new("/usr/bin/python3").exists(),
        "the deploy tests serve HTTP with the system's python3 (/usr/bin/python3, on the box's PATH)"
    );
    let state = tempfile::tempdir().unwrap();
    std::fs::set_permissions(state.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let sandbox = Arc::new(Sandbox::open(state.path(), box_user, disk).unwrap());
    assert!(matches!(sandbox.run_as(), RunAs::BoxUser { .. }), "the tests run as root");
    let top = tempfile::tempdir().unwrap();
    // The box user must reach the releases through this directory.
    std::fs::set_permissions(top.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::create_dir(top.path().join("blobs")).unwrap();
    let deployer = Deployer::open(sandbox.clone(), state.path(), Some(&top.path().join("releases")), config).unwrap();
    Fixture { _state: state, top, sandbox, deployer, key: CustomerSigningKey::from_seed([7; 32]) }
}

impl Fixture {
    fn blobs(&self) -> PathBuf {
        self.top.path().join("blobs")
    }

    fn root(&self) -> &Path {
        self.deployer.releases().root()
    }

    /// A signed, verified release of `manifest` and `files`, its blobs in the store.
    fn release(&self, manifest: &str, files: &[(&str, &[u8])]) -> VerifiedRelease {
        let artifacts = files
            .iter()
            .map(|(path, bytes)| {
                let sha256 = sha256_hex(bytes);
                std::fs::write(self.blobs().join(&sha256), bytes).unwrap();
                Artifact { path: RelativePath::parse(path).unwrap(), sha256, size: bytes.len() as u64 }
            })
            .collect();
        let statement = ReleaseStatement::new(manifest, artifacts).unwrap();
        verify_release(&sign_release(&statement, &self.key), &[self.key.public()]).unwrap()
    }

    /// A release whose service `web` serves `content` on `port`, health-checked at `check`.
    fn web(&self, version: &str, port: u16, content: &str, check: &str) -> VerifiedRelease {
        let manifest = format!(
            r#"
name = "shop"
version = "{version}"

[[service]]
name = "web"
command = "bin/web"
env = {{ PORT = "{port}" }}
stop_timeout_secs = 2
restart = {{ policy = "on-failure", initial_backoff_ms = 100, max_backoff_ms = 400 }}
health = [{{ probe = {{ http = {{ path = "{check}", port = {port} }} }}, interval_secs = 1, timeout_secs = 1 }}]
"#
        );
        let script = b"#!/bin/sh\nexec python3 -m http.server \"$PORT\" --bind 127.0.0.1 --directory www\n";
        self.release(&manifest, &[("bin/web", script), ("www/index.html", content.as_bytes())])
    }

    async fn deploy(&self, release: &VerifiedRelease) -> Result<DeployOutcome, DeployError> {
        self.deployer.deploy(release, &self.blobs(), &resolver(), &Bindings::default(), false, &|_| {}).await
    }

    fn status(&self, service: &str) -> ServiceReport {
        self.deployer.status().into_iter().find(|r| r.service == service).expect("the service is reported")
    }

    fn log(&self, service: &str) -> String {
        std::fs::read_to_string(self.deployer.releases().log(service)).unwrap_or_default()
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The body `GET /index.html` gets on `port`, if anything answers.
async fn fetch(port: u16) -> Option<String> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    stream.write_all(b"GET /index.html HTTP/1.0\r\n\r\n").await.ok()?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(3), stream.read_to_string(&mut out)).await.ok()?.ok()?;
    Some(out.split("\r\n\r\n").nth(1)?.to_owned())
}

/// The pid of `service` now running.
async fn pid(f: &Fixture, service: &str) -> u32 {
    let inner = f.deployer.inner.lock().await;
    let active = inner.current.as_ref().expect("a release is current");
    let s = active.services.iter().find(|s| s.unit.service.name == service).expect("the service runs");
    s.state().pid.expect("it has a process")
}

async fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn upgrade_switches_and_a_failing_upgrade_rolls_back_to_the_one_serving() {
    let f = fixture();
    let port = free_port();
    let v1 = f.web("1.0.0", port, "v1", "/index.html");
    let out = f.deploy(&v1).await.unwrap();
    assert_eq!(out, DeployOutcome::Deployed { digest: v1.digest().to_owned() });
    assert_eq!(pointer::target(f.root()).as_deref(), Some(v1.digest()));
    assert_eq!(fetch(port).await.as_deref(), Some("v1"));
    assert_eq!(f.status("web").status, ServiceStatus::Healthy);
    assert_eq!(f.status("web").release.version, "1.0.0");

    // It runs as the box user, in a cell of its own, and cannot write its release.
    let pid = pid(&f, "web").await;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid = status.lines().find_map(|l| l.strip_prefix("Uid:")).unwrap().split_whitespace().next().unwrap();
    assert_ne!(uid, "0", "{status}");
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(cgroup.contains(&format!("/svc-{}-web", &v1.digest()[..12])), "{cgroup}");
    let dir = f.root().join(v1.digest());
    assert_eq!(std::fs::metadata(dir.join("bin/web")).unwrap().permissions().mode() & 0o777, 0o555);
    assert!(f.log("web").contains("GET /index.html"), "the service's output goes to its log");

    // v2 replaces it: switched, v1 stopped, kept for rollback.
    let v2 = f.web("2.0.0", port, "v2", "/index.html");
    assert_eq!(f.deploy(&v2).await.unwrap(), DeployOutcome::Deployed { digest: v2.digest().to_owned() });
    assert_eq!(pointer::target(f.root()).as_deref(), Some(v2.digest()));
    assert_eq!(fetch(port).await.as_deref(), Some("v2"));
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "v1's process is gone");
    assert!(!cgroup_dir(&f, &format!("svc-{}-web", &v1.digest()[..12])).exists(), "v1's cell is removed");
    let state = pointer::read(f.root()).unwrap();
    assert_eq!((state.current.as_deref(), state.previous.as_deref()), (Some(v2.digest()), Some(v1.digest())));
    assert!(f.root().join(v1.digest()).is_dir());
    assert_eq!(f.deploy(&v2).await.unwrap(), DeployOutcome::AlreadyCurrent { digest: v2.digest().to_owned() });

    // v3's health check fails: rolled back to v2, which serves again.
    let v3 = f.web("3.0.0", port, "v3", "/missing");
    let events = std::sync::Mutex::new(Vec::new());
    let out = f
        .deployer
        .deploy(&v3, &f.blobs(), &resolver(), &Bindings::default(), false, &|e| events.lock().unwrap().push(e))
        .await
        .unwrap();
    assert_eq!(
        out,
        DeployOutcome::RolledBack {
            reason: RollbackReason::Unhealthy { service: "web".into() },
            restored: Some(v2.digest().to_owned())
        }
    );
    let events = events.into_inner().unwrap();
    assert!(events.contains(&DeployEvent::Service { service: "web".into(), status: ServiceStatus::Unhealthy }));
    assert!(matches!(events.last(), Some(DeployEvent::RollingBack { .. })), "{events:?}");
    assert_eq!(pointer::target(f.root()).as_deref(), Some(v2.digest()));
    wait_for("v2 to serve again", || f.status("web").status == ServiceStatus::Healthy).await;
    assert_eq!(fetch(port).await.as_deref(), Some("v2"));
    let reports = f.deployer.status();
    assert!(
        reports.iter().any(|r| r.release.version == "3.0.0" && r.status == ServiceStatus::RolledBack),
        "{reports:?}"
    );
    let state = pointer::read(f.root()).unwrap();
    assert_eq!((state.current.as_deref(), state.pending.as_ref()), (Some(v2.digest()), None));
    serde_json::to_string(&reports).unwrap();

    // A fourth release prunes the oldest: only the current and previous are kept.
    let v4 = f.web("4.0.0", port, "v4", "/index.html");
    f.deploy(&v4).await.unwrap();
    assert!(!f.root().join(v1.digest()).exists() && f.root().join(v2.digest()).is_dir());
    f.deployer.shutdown().await;
    assert!(fetch(port).await.is_none(), "nothing serves after shutdown");
}

fn cgroup_dir(f: &Fixture, name: &str) -> PathBuf {
    // The cells sit beside this process's cgroup, under the sandbox's own directory.
    let _ = &f.sandbox;
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let own = own.lines().find_map(|l| l.strip_prefix("0::")).unwrap().trim_start_matches('/').to_owned();
    let mount = if Path::new("/sys/fs/cgroup/unified").is_dir() { "/sys/fs/cgroup/unified" } else { "/sys/fs/cgroup" };
    let base = Path::new(mount).join(own);
    std::fs::read_dir(&base)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("airlock-box-"))
        .map(|e| e.path().join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| base.join("none").join(name))
}

#[tokio::test]
async fn a_service_that_exits_at_once_is_restarted_with_backoff() {
    let f = fixture();
    let manifest = r#"
name = "crashy"
version = "1.0.0"

[[service]]
name = "crash"
command = "bin/crash"
restart = { policy = "on-failure", initial_backoff_ms = 100, max_backoff_ms = 400 }
"#;
    let release = f.release(manifest, &[("bin/crash", b"#!/bin/sh\necho started\nexit 3\n")]);
    let began = Instant::now();
    let out = f.deploy(&release).await.unwrap();
    let took = began.elapsed();
    let DeployOutcome::RolledBack { reason: RollbackReason::NotHealthy { services, .. }, restored: None } = out else {
        panic!("{out:?}")
    };
    assert_eq!(services, ["crash"]);
    let report = f.status("crash");
    assert_eq!(report.status, ServiceStatus::RolledBack);
    // Backoff 100, 200, 400, 400... ms: about ten restarts in four seconds, not hundreds.
    let most = u32::try_from(took.as_millis() / 400 + 4).unwrap();
    assert!((3..=most).contains(&report.restarts), "{} restarts in {took:?}", report.restarts);
    assert!(f.log("crash").matches("started").count() >= 3, "{}", f.log("crash"));
    assert_eq!(pointer::target(f.root()), None, "a first deploy that fails leaves nothing current");
}

#[tokio::test]
async fn a_service_over_its_disk_limit_is_killed_and_restarts_with_its_scratch_emptied() {
    let disk = crate::config::BoxDisk { box_bytes: 1 << 20, ..Default::default() };
    let f = fixture_on(config(), None, &disk);
    let watch = tokio::spawn(f.sandbox.watcher(Duration::from_millis(100), Arc::new(|_, _| {})));
    let manifest = r#"
name = "hoard"
version = "1.0.0"

[[service]]
name = "hog"
command = "bin/hog"
restart = { policy = "on-failure", initial_backoff_ms = 100, max_backoff_ms = 400 }
"#;
    // It settles healthy, then fills its scratch directory past 1 MiB; a restart that found its
    // last run's file there would say so.
    let script = b"#!/bin/sh\n[ -e \"$HOME/fill\" ] && echo STALE\necho started\nsleep 1\nhead -c 2097152 /dev/zero > \"$HOME/fill\"\nexec sleep 60\n";
    let release = f.release(manifest, &[("bin/hog", script)]);
    let out = f.deploy(&release).await.unwrap();
    assert!(matches!(out, DeployOutcome::Deployed { .. }), "{out:?}");
    let state = || async {
        let inner = f.deployer.inner.lock().await;
        let active = inner.current.as_ref().expect("a release is current");
        active.services.iter().find(|s| s.unit.service.name == "hog").expect("the service runs").state()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut now = state().await;
    while now.restarts < 2 {
        assert!(Instant::now() < deadline, "not killed and restarted twice: {now:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        now = state().await;
    }
    let why = now.last_error.unwrap_or_default();
    assert!(why.starts_with("killed: its disk use") && why.contains("over its limit of 1.0 MiB"), "{why}");
    assert!(f.log("hog").matches("started").count() >= 2, "{}", f.log("hog"));
    assert!(!f.log("hog").contains("STALE"), "each run starts with an empty scratch directory: {}", f.log("hog"));
    watch.abort();
    // Its last run still holds its box: stopped, so nothing outlives the test.
    f.deployer.shutdown().await;
}

#[tokio::test]
async fn graceful_stop_sends_term_then_kill_after_the_timeout() {
    let f = fixture();
    let manifest = r#"
name = "stubborn"
version = "1.0.0"

[[service]]
name = "stubborn"
command = "bin/stubborn"
stop_timeout_secs = 1
restart = { policy = "always" }
"#;
    let script = b"#!/bin/sh\ntrap 'echo got-term' TERM\necho up\nwhile true; do sleep 0.1; done\n";
    let release = f.release(manifest, &[("bin/stubborn", script)]);
    assert!(matches!(f.deploy(&release).await.unwrap(), DeployOutcome::Deployed { .. }));
    let pid = pid(&f, "stubborn").await;
    let began = Instant::now();
    f.deployer.shutdown().await;
    let took = began.elapsed();
    assert!(f.log("stubborn").contains("got-term"), "it got SIGTERM first: {}", f.log("stubborn"));
    assert!(took >= Duration::from_secs(1) && took < Duration::from_secs(4), "killed after the timeout: {took:?}");
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "it is dead");
    assert!(!cgroup_dir(&f, &format!("svc-{}-stubborn", &release.digest()[..12])).exists());
    assert!(f.deployer.status().is_empty());
}

#[tokio::test]
async fn an_appliance_killed_mid_switch_recovers_one_consistent_release() {
    let f = fixture();
    let port = free_port();
    let v1 = f.web("1.0.0", port, "v1", "/index.html");
    let v2 = f.web("2.0.0", port, "v2", "/index.html");
    f.deploy(&v1).await.unwrap();
    f.deployer.shutdown().await;
    let root = f.root().to_owned();
    f.deployer.releases().install(&v2, &f.blobs()).unwrap();

    // Killed before the rename: `current.new` half made, `current` still on v1.
    let mut state = pointer::read(&root).unwrap();
    state.pending = Some(pointer::Pending { from: Some(v1.digest().into()), to: v2.digest().into() });
    pointer::write(&root, &state).unwrap();
    std::os::unix::fs::symlink(v2.digest(), root.join("current.new")).unwrap();
    let again = Deployer::open(f.sandbox.clone(), f._state.path(), Some(&root), config()).unwrap();
    assert_eq!(again.recover(&resolver(), &Bindings::default()).await.unwrap().as_deref(), Some(v1.digest()));
    assert!(!root.join("current.new").exists());
    assert_eq!(pointer::target(&root).as_deref(), Some(v1.digest()));
    let settled = pointer::read(&root).unwrap();
    assert_eq!((settled.current.as_deref(), settled.pending), (Some(v1.digest()), None));
    wait_for("v1 to serve", || again.status().first().is_some_and(|r| r.status == ServiceStatus::Healthy)).await;
    assert_eq!(fetch(port).await.as_deref(), Some("v1"));
    again.shutdown().await;

    // Killed after the rename, before the state was written: the switch committed.
    state.pending = Some(pointer::Pending { from: Some(v1.digest().into()), to: v2.digest().into() });
    pointer::write(&root, &state).unwrap();
    pointer::switch(&root, Some(v2.digest())).unwrap();
    let again = Deployer::open(f.sandbox.clone(), f._state.path(), Some(&root), config()).unwrap();
    assert_eq!(again.recover(&resolver(), &Bindings::default()).await.unwrap().as_deref(), Some(v2.digest()));
    let settled = pointer::read(&root).unwrap();
    assert_eq!(
        (settled.current.as_deref(), settled.previous.as_deref(), settled.pending),
        (Some(v2.digest()), Some(v1.digest()), None)
    );
    wait_for("v2 to serve", || again.status().first().is_some_and(|r| r.status == ServiceStatus::Healthy)).await;
    assert_eq!(fetch(port).await.as_deref(), Some("v2"));
    again.shutdown().await;
}

#[tokio::test]
async fn a_tampered_blob_is_refused_and_nothing_changes() {
    let f = fixture();
    let port = free_port();
    let v1 = f.web("1.0.0", port, "v1", "/index.html");
    f.deploy(&v1).await.unwrap();
    let v2 = f.web("2.0.0", port, "v2", "/index.html");
    // The blob store is edited under the appliance: same name, other bytes.
    std::fs::write(f.blobs().join(sha256_hex(b"v2")), b"v2 but evil").unwrap();
    let err = f.deploy(&v2).await.unwrap_err();
    assert_eq!(err, DeployError::Tampered { path: "www/index.html".into() });
    assert!(!f.root().join(v2.digest()).exists() && !f.root().join(format!(".tmp-{}", v2.digest())).exists());
    assert_eq!(pointer::target(f.root()).as_deref(), Some(v1.digest()));
    assert_eq!(fetch(port).await.as_deref(), Some("v1"));
    // A missing blob is refused the same way.
    std::fs::remove_file(f.blobs().join(sha256_hex(b"v2"))).unwrap();
    assert!(matches!(f.deploy(&v2).await, Err(DeployError::MissingArtifact { .. })));
    f.deployer.shutdown().await;
}

#[tokio::test]
async fn root_without_approval_and_a_missing_secret_are_refused_before_anything_changes() {
    let f = fixture();
    let root_release = f.release(
        "name = \"r\"\nversion = \"1.0.0\"\n[[service]]\nname = \"r\"\ncommand = \"sleep\"\nargs = [\"60\"]\nrun_as_root = true\n",
        &[],
    );
    let err = f.deploy(&root_release).await.unwrap_err();
    assert_eq!(err, DeployError::RootNotAllowed { service: "r".into() });
    assert!(!f.root().join(root_release.digest()).exists(), "nothing installed");

    let secret = f.top.path().join("no-such-secret");
    let manifest = format!(
        "name = \"s\"\nversion = \"1.0.0\"\n[[service]]\nname = \"s\"\ncommand = \"sleep\"\nargs = [\"60\"]\nsecrets = {{ API_KEY = \"file:{}\" }}\n",
        secret.display()
    );
    let release = f.release(&manifest, &[]);
    let err = f.deploy(&release).await.unwrap_err();
    let DeployError::Secret(missing) = &err else { panic!("{err:?}") };
    assert_eq!(missing.reference, format!("file:{}", secret.display()).parse().unwrap());
    assert!(err.to_string().contains(&secret.display().to_string()), "{err}");
    assert!(f.deployer.status().is_empty() && pointer::target(f.root()).is_none());

    // With the value present, its service gets it (and only in its environment).
    std::fs::write(&secret, "hunter2\n").unwrap();
    let manifest = manifest.replace("command = \"sleep\"\nargs = [\"60\"]", "command = \"bin/s\"");
    let release = f.release(&manifest, &[("bin/s", b"#!/bin/sh\necho \"key=$API_KEY\"\nexec sleep 60\n")]);
    assert!(matches!(f.deploy(&release).await.unwrap(), DeployOutcome::Deployed { .. }));
    wait_for("the service's output", || f.log("s").contains("key=")).await;
    assert!(f.log("s").contains("key=hunter2\n"), "{}", f.log("s"));
    f.deployer.shutdown().await;
}

#[tokio::test]
async fn a_dependency_bound_to_the_customer_skips_the_bundled_service_and_reaches_the_app() {
    let f = fixture();
    let manifest = r#"
name = "app"
version = "1.0.0"

[[service]]
name = "db"
command = "sleep"
args = ["60"]
bundles = "postgres"

[[service]]
name = "app"
command = "bin/app"

[[dependency]]
name = "postgres"
url = "postgres://bundled:5432/app"
"#;
    let script = b"#!/bin/sh\necho \"url=$AIRLOCK_DEPENDENCY_POSTGRES_URL pw=$AIRLOCK_DEPENDENCY_POSTGRES_PASSWORD\"\nexec sleep 60\n";
    let release = f.release(manifest, &[("bin/app", script)]);
    let password = f.top.path().join("pg-password");
    std::fs::write(&password, "s3cret").unwrap();
    let bindings = Bindings(BTreeMap::from([(
        "postgres".to_owned(),
        Binding::Customer {
            url: "postgres://customer.internal:5432/app".into(),
            credentials: BTreeMap::from([("password".into(), format!("file:{}", password.display()).parse().unwrap())]),
        },
    )]));
    let out = f.deployer.deploy(&release, &f.blobs(), &resolver(), &bindings, false, &|_| {}).await.unwrap();
    assert!(matches!(out, DeployOutcome::Deployed { .. }), "{out:?}");
    let services: Vec<String> = f.deployer.status().into_iter().map(|r| r.service).collect();
    assert_eq!(services, ["app"], "the bundled database is not started");
    wait_for("the app's output", || f.log("app").contains("url=")).await;
    assert!(f.log("app").contains("url=postgres://customer.internal:5432/app pw=s3cret"), "{}", f.log("app"));
    f.deployer.shutdown().await;

    // The same release, bundled: both run, and the app gets the release's own URL.
    let f = fixture();
    let release = f.release(manifest, &[("bin/app", script)]);
    f.deploy(&release).await.unwrap();
    let mut services: Vec<String> = f.deployer.status().into_iter().map(|r| r.service).collect();
    services.sort();
    assert_eq!(services, ["app", "db"]);
    wait_for("the app's output", || f.log("app").contains("url=")).await;
    assert!(f.log("app").contains("url=postgres://bundled:5432/app pw=\n"), "{}", f.log("app"));
    f.deployer.shutdown().await;
}

#[test]
fn a_releases_root_inside_the_state_directory_is_refused() {
    let state = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let err = Releases::open(&state.path().join("releases"), state.path(), work.path()).unwrap_err();
    assert!(matches!(err, DeployError::BadReleasesRoot(_)), "{err}");
    assert!(err.to_string().contains("state directory"), "{err}");
}

#[test]
fn a_releases_root_another_user_made_first_is_refused() {
    let state = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let shared = tempfile::tempdir().unwrap();
    let planted = shared.path().join("releases");
    std::fs::create_dir(&planted).unwrap();
    std::os::unix::fs::chown(&planted, Some(65534), Some(65534)).unwrap();
    let err = Releases::open(&planted, state.path(), work.path()).unwrap_err();
    assert!(matches!(err, DeployError::BadReleasesRoot(_)), "{err}");
    assert!(err.to_string().contains("uid 65534"), "{err}");
    // Through a symbolic link, the same.
    let link = shared.path().join("link");
    std::os::unix::fs::symlink(&planted, &link).unwrap();
    assert!(matches!(Releases::open(&link, state.path(), work.path()), Err(DeployError::BadReleasesRoot(_))));
}

/// A tmpfs mounted for one test, unmounted when dropped (even when the test fails).
#[tokio::test]
async fn a_full_disk_refuses_the_install_and_the_running_release_keeps_serving() {
    let state = tempfile::tempdir().unwrap();
    std::fs::set_permissions(state.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let sandbox = Arc::new(Sandbox::open(state.path(), None, &Default::default()).unwrap());
    let top = tempfile::tempdir().unwrap();
    std::fs::set_permissions(top.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::create_dir(top.path().join("blobs")).unwrap();
    let disk = SmallDisk::mount(top.path().join("small"), "2m");
    let deployer = Deployer::open(sandbox.clone(), state.path(), Some(&disk.0), config()).unwrap();
    let f = Fixture { _state: state, top, sandbox, deployer, key: CustomerSigningKey::from_seed([7; 32]) };
    let port = free_port();
    f.deploy(&f.web("1.0.0", port, "shop v1", "/index.html")).await.unwrap();
    assert_eq!(fetch(port).await.as_deref(), Some("shop v1"));

    // v2 carries 3 MiB the 2 MiB disk cannot hold: refused with the reason, nothing switched.
    let big = vec![b'x'; 3 << 20];
    let script: &[u8] = b"#!/bin/sh\nexec python3 -m http.server \"$PORT\" --bind 127.0.0.1 --directory www\n";
    let manifest = format!(
        "name = \"shop\"\nversion = \"2.0.0\"\n\n[[service]]\nname = \"web\"\ncommand = \"bin/web\"\nenv = {{ PORT = \"{port}\" }}\n"
    );
    let v2 = f.release(&manifest, &[("bin/web", script), ("www/index.html", b"shop v2"), ("data/big", &big)]);
    let err = f.deploy(&v2).await.unwrap_err();
    assert!(err.to_string().contains("No space left on device"), "{err}");
    assert_eq!(fetch(port).await.as_deref(), Some("shop v1"));
    assert_eq!(f.deployer.current().unwrap().version, "1.0.0");
    // The half-made copy is gone, so the disk has room again for what fits.
    let left: Vec<String> = std::fs::read_dir(&disk.0)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".tmp-") || n.starts_with(v2.digest()))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    f.deploy(&f.web("3.0.0", port, "shop v3", "/index.html")).await.unwrap();
    assert_eq!(fetch(port).await.as_deref(), Some("shop v3"));
    f.deployer.shutdown().await;
}

#[test]
fn a_releases_root_every_box_may_read_is_refused_and_not_made() {
    let state = tempfile::tempdir().unwrap();
    let sandbox = Arc::new(Sandbox::open(state.path(), None, &Default::default()).unwrap());
    for root in ["/opt/airlock-test-releases-refused/releases", "/etc/airlock-test-releases-refused"] {
        let err = Deployer::open(sandbox.clone(), state.path(), Some(Path::new(root)), config()).unwrap_err();
        assert!(matches!(err, DeployError::BadReleasesRoot(_)), "{err}");
        assert!(err.to_string().contains("every box may read"), "{err}");
        assert!(!Path::new(root).exists(), "nothing is made before the refusal");
    }
}

#[tokio::test]
async fn tcp_and_boxed_exec_checks_decide_health() {
    let f = fixture();
    let port = free_port();
    let manifest = |version: &str, check: &str| {
        format!(
            r#"
name = "shop"
version = "{version}"

[[service]]
name = "web"
command = "bin/web"
env = {{ PORT = "{port}" }}
stop_timeout_secs = 2

[[service.health]]
probe = {{ tcp = {{ port = {port} }} }}
interval_secs = 1
timeout_secs = 1

[[service.health]]
probe = {{ exec = {{ command = "{check}" }} }}
interval_secs = 1
timeout_secs = 1
unhealthy_threshold = 1
"#
        )
    };
    let web = b"#!/bin/sh\nexec python3 -m http.server \"$PORT\" --bind 127.0.0.1 --directory www\n";
    // The check runs boxed in the release: it reads the release and sees the service's env.
    let good = b"#!/bin/sh\ntest -f www/index.html && [ \"$PORT\" -gt 0 ]\n";
    let v1 =
        f.release(&manifest("1.0.0", "bin/check"), &[("bin/web", web), ("bin/check", good), ("www/index.html", b"v1")]);
    assert_eq!(f.deploy(&v1).await.unwrap(), DeployOutcome::Deployed { digest: v1.digest().to_owned() });
    let v2 = f
        .release(&manifest("2.0.0", "/bin/false"), &[("bin/web", web), ("bin/check", good), ("www/index.html", b"v2")]);
    let out = f.deploy(&v2).await.unwrap();
    assert_eq!(
        out,
        DeployOutcome::RolledBack {
            reason: RollbackReason::Unhealthy { service: "web".into() },
            restored: Some(v1.digest().to_owned())
        }
    );
    wait_for("v1 to serve again", || f.status("web").status == ServiceStatus::Healthy).await;
    assert_eq!(fetch(port).await.as_deref(), Some("v1"));
    f.deployer.shutdown().await;
    for digest in [v1.digest(), v2.digest()] {
        assert!(!cgroup_dir(&f, &format!("chk-{}-web-1", &digest[..12])).exists(), "no check's cell is left");
    }
}

/// The integrator spawns deploys and recoveries: their futures must be `Send`.
#[allow(dead_code)]
fn deploy_futures_are_send(f: &Fixture, release: &VerifiedRelease) {
    fn send<T: Send>(_: T) {}
    send(f.deployer.deploy(release, Path::new("/"), &resolver(), &Bindings::default(), false, &|_| {}));
    send(f.deployer.recover(&resolver(), &Bindings::default()));
    send(f.deployer.shutdown());
}

/// The appliance's own secret resolver, as `run` makes it (file and env references here).
fn resolver() -> crate::secrets::SecretResolver {
    let allow = format!("allow = ['file:{}']", std::env::temp_dir().display());
    let config: crate::SecretsConfig = toml::from_str(&allow).unwrap();
    crate::secrets::SecretResolver::new(&config, Arc::new(crate::config::ProcessEnv))
}

/// The PostgreSQL this machine runs (trust authentication on loopback), as a customer's own.
const CUSTOMER_POSTGRES: &str = "postgres://postgres@127.0.0.1:5432/test";

fn psql(url: &str, sql: &str) -> String {
    let out = std::process::Command::new("psql")
        .args([url, "-tAc", sql])
        .output()
        .expect("psql (the PostgreSQL client) runs");
    assert!(out.status.success(), "psql {sql}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// One release with a bundled PostgreSQL (`db`, its own server in its scratch directory) and an
/// app that writes a row through whatever `postgres` is bound to: run bundled, then bound to
/// the customer's own PostgreSQL (the one this machine runs), unchanged. PostgreSQL looks its
/// own user up, so vendor code runs as a named box user here (`nobody`), as an appliance
/// configured with `box_user` does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_release_runs_on_its_bundled_postgres_or_the_customers_own() {
    let bindir = std::process::Command::new("pg_config").arg("--bindir").output().expect("pg_config runs");
    let bindir = String::from_utf8(bindir.stdout).unwrap().trim().to_owned();
    assert!(Path::new(&bindir).join("postgres").exists(), "PostgreSQL's server binaries are in {bindir}");
    psql(CUSTOMER_POSTGRES, "select 1");
    let port = free_port();
    let manifest = format!(
        r#"
name = "ledger"
version = "1.0.0"

[[service]]
name = "db"
command = "bin/db"
env = {{ PGBIN = "{bindir}", PGPORT = "{port}" }}
bundles = "postgres"
# A first start runs initdb: the vendor gives it a while before failed probes count against it.
health = [{{ probe = {{ tcp = {{ port = {port} }} }}, interval_secs = 1, timeout_secs = 1, unhealthy_threshold = 100 }}]

[[service]]
name = "app"
command = "bin/app"
env = {{ MARK = "MARK_VALUE" }}

[[dependency]]
name = "postgres"
url = "postgres://postgres@127.0.0.1:{port}/postgres"
"#
    );
    let db: &[u8] = b"#!/bin/sh\nset -e\n\"$PGBIN/initdb\" -D \"$HOME/pg\" -U postgres --auth=trust >/dev/null\nexec \"$PGBIN/postgres\" -D \"$HOME/pg\" -p \"$PGPORT\" -k \"$HOME\" -c listen_addresses=127.0.0.1\n";
    // The app: wait for its database, write its mark, then leave a file saying it is ready.
    let app: &[u8] = b"#!/bin/sh\nn=0\nuntil psql \"$AIRLOCK_DEPENDENCY_POSTGRES_URL\" -qc 'create table if not exists airlock_deploy_marks (mark text)' 2>/dev/null; do\n  n=$((n+1)); [ $n -gt 150 ] && exit 1; sleep 0.2\ndone\npsql \"$AIRLOCK_DEPENDENCY_POSTGRES_URL\" -qc \"insert into airlock_deploy_marks values ('$MARK')\" || exit 1\necho \"wrote $MARK\"\nexec sleep 600\n";
    let long = DeployConfig { health_deadline: Duration::from_secs(60), ..config() };

    // Bundled: the release's own database runs, and the app's row lands in it.
    let f = fixture_with(long.clone(), Some("nobody"));
    let mark = format!("bundled-{port}");
    let bundled = f.release(&manifest.replace("MARK_VALUE", &mark), &[("bin/db", db), ("bin/app", app)]);
    let out = f.deployer.deploy(&bundled, &f.blobs(), &resolver(), &Bindings::default(), false, &|_| {}).await.unwrap();
    assert!(matches!(out, DeployOutcome::Deployed { .. }), "{out:?}\ndb: {}\napp: {}", f.log("db"), f.log("app"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f.log("app").contains("wrote") {
        assert!(Instant::now() < deadline, "the app never wrote: {}\n{}", f.log("app"), f.log("db"));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let bundled_url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    assert_eq!(psql(&bundled_url, "select mark from airlock_deploy_marks"), mark);
    f.deployer.shutdown().await;

    // Bound to the customer's PostgreSQL: the bundled one is not started, the same app writes there.
    let f = fixture_with(long, Some("nobody"));
    let mark = format!("customer-{port}");
    let release = f.release(&manifest.replace("MARK_VALUE", &mark), &[("bin/db", db), ("bin/app", app)]);
    let bindings = Bindings(BTreeMap::from([(
        "postgres".to_owned(),
        Binding::Customer { url: CUSTOMER_POSTGRES.into(), credentials: BTreeMap::new() },
    )]));
    let out = f.deployer.deploy(&release, &f.blobs(), &resolver(), &bindings, false, &|_| {}).await.unwrap();
    assert!(matches!(out, DeployOutcome::Deployed { .. }), "{out:?}");
    let services: Vec<String> = f.deployer.status().into_iter().map(|r| r.service).collect();
    assert_eq!(services, ["app"], "the bundled database is not started");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f.log("app").contains("wrote") {
        assert!(Instant::now() < deadline, "the app never wrote: {}", f.log("app"));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rows = psql(CUSTOMER_POSTGRES, &format!("select count(*) from airlock_deploy_marks where mark = '{mark}'"));
    assert_eq!(rows, "1");
    psql(CUSTOMER_POSTGRES, &format!("delete from airlock_deploy_marks where mark = '{mark}'"));
    f.deployer.shutdown().await;
}
