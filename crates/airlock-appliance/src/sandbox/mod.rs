//! The box vendor code runs in.
//!
//! Everything the appliance starts for the vendor (operation scripts, release services) is
//! started from a [`Sandbox::prepare`]d (or [`Sandbox::prepare_service`]d) command, and runs:
//! - in a cgroup cell of its own ([`cell`]), killed whole on cancel, revocation, timeout and,
//!   after a crash, at the next start;
//! - as the box user ([`user`]): a dedicated unprivileged uid and gid, never the appliance's;
//! - with `no_new_privs` and a Landlock ruleset ([`fence`]) that lets it read the system and
//!   write only its own working directory, and neither signal processes outside the box nor
//!   connect to abstract sockets: even root-run code cannot open the state directory (the
//!   admin socket, the output key, sealed output, the audit log) or signal the appliance;
//! - in an IPC namespace of its own where the appliance is root ([`confine`]): what it makes
//!   with System V IPC or POSIX message queues dies with it, and it sees none of the host's;
//! - a root run, also in a mount namespace of its own ([`mounts`]) where every mount is
//!   read-only, `nosuid` and `nodev` but its working directory, and the state directory and the
//!   host's root-only secrets are hidden; and under a seccomp filter ([`seccomp`]) that refuses
//!   it Unix sockets (by which it would reach the host's daemons), among a few other calls;
//! - kept from the cloud's instance metadata service ([`netfence`]), so it cannot take the
//!   host's cloud credentials (where the appliance may attach cgroup BPF programs);
//! - in a private working directory outside the state directory, removed after the run;
//!   a service also reads (never writes) its installed release directory;
//! - under limits on wall time (operations only: services run until stopped), processes,
//!   memory and open files ([`RunLimits`]);
//! - watched ([`usage`]): killed past its own disk or file limit, or when it holds the most of
//!   a disk whose free space fell below the reserve.
//!
//! The child puts itself in its box between fork and exec ([`confine`]), so no instruction of
//! the vendor's runs outside it; if any step fails, the spawn fails and nothing runs.
//! Where the host lacks a part (no cgroup v2, no Landlock, an appliance that is not root), the
//! appliance says so when it starts ([`Sandbox::open`]) and the rest still holds; but nothing
//! runs as root without a cell (its cell alone tells a root run from the customer's root at the
//! admin socket), nor without its mount namespace and seccomp filter (where the appliance lacks
//! `CAP_SYS_ADMIN`, say in a container, or on another architecture than x86_64).

pub mod bench;
mod cell;
mod confine;
mod fence;
mod mounts;
mod netfence;
mod seccomp;
#[cfg(test)]
mod tests;
pub(crate) mod usage;
mod user;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use airlock_core::OperationId;
use airlock_core::run_spec::RunUser;

pub(crate) use cell::Cell;
use cell::Cells;
use confine::{Confinement, RootOnly};
use seccomp::RootFilter;
pub(crate) use user::RunAs;

/// The only `PATH` vendor code gets.
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What one run may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RunLimits {
    /// Past this, everything the run started is killed and it is recorded as timed out.
    pub(crate) wall_time: Duration,
    /// Processes (and threads) at once, a fork bomb's ceiling.
    pub(crate) processes: u32,
    /// Bytes of data memory per process (`RLIMIT_DATA`), and of the cell where the host's
    /// cgroup v2 has a memory controller.
    pub(crate) memory_bytes: u64,
    pub(crate) open_files: u32,
    /// The largest file it may write (`RLIMIT_FSIZE`).
    pub(crate) file_bytes: u64,
}

impl Default for RunLimits {
    fn default() -> Self {
        airlock_core::run_spec::RunLimits::default().into()
    }
}

impl From<airlock_core::run_spec::RunLimits> for RunLimits {
    /// The limits the customer's decision settled, as the box applies them.
    fn from(l: airlock_core::run_spec::RunLimits) -> Self {
        Self {
            wall_time: Duration::from_secs(u64::from(l.wall_time_seconds)),
            processes: l.processes,
            memory_bytes: u64::from(l.memory_mib) << 20,
            open_files: 1024,
            file_bytes: 1 << 30,
        }
    }
}

/// The name of a release service's cell (and box working directory): `svc-` or `chk-` (its
/// exec health checks), the release digest's first 12 hex digits, and the service's name, a
/// slug. Never an operation id (those are plain hex), so the two kinds never share a cell.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct CellName(String);

impl CellName {
    /// The cell of service `service` (a slug) of the release whose digest is `digest` (hex).
    pub(crate) fn service(digest: &str, service: &str) -> Result<Self, String> {
        Self::make("svc", digest, service)
    }

    /// The cell of an operation's run of a release's task: named by the operation, as a
    /// script's run is.
    pub(crate) fn operation(id: OperationId) -> Self {
        Self(id.to_string())
    }

    /// The cell an exec health check of that service runs in.
    pub(crate) fn check(digest: &str, service: &str) -> Result<Self, String> {
        Self::make("chk", digest, service)
    }

    fn make(kind: &str, digest: &str, service: &str) -> Result<Self, String> {
        let short = digest.get(..12).filter(|d| d.bytes().all(|b| b.is_ascii_hexdigit()));
        let slug = !service.is_empty()
            && service.len() <= 63
            && service.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        match short {
            Some(short) if slug => Ok(Self(format!("{kind}-{short}-{service}"))),
            _ => Err(format!(
                "no cell name for service `{}` of release `{}`",
                service.escape_debug(),
                digest.escape_debug()
            )),
        }
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

/// What [`Sandbox::prepare_service`] starts.
#[derive(Debug)]
pub(crate) struct ServiceLaunch<'a> {
    pub(crate) cell: &'a CellName,
    /// An absolute path, a path inside the release, or a name looked up on the box's `PATH`.
    pub(crate) program: &'a std::ffi::OsStr,
    pub(crate) args: &'a [String],
    /// Its whole environment besides `PATH`, `HOME` and `TMPDIR` (secret values included).
    pub(crate) env: &'a [(String, String)],
    /// The installed release: readable and runnable by the service, not writable.
    pub(crate) release_dir: &'a Path,
    /// Where it starts, inside `release_dir`.
    pub(crate) cwd: &'a Path,
    pub(crate) limits: &'a RunLimits,
    pub(crate) run_as: RunAs,
}

/// How this appliance boxes vendor code, settled when it starts.
#[derive(Debug)]
pub(crate) struct Sandbox {
    /// `None` where the host offers no cgroup v2: runs are then held by their process group.
    cells: Option<Cells>,
    run_as: RunAs,
    /// A uid of its own for each run at once, when vendor code runs as a dynamic box user.
    uids: user::UidPool,
    /// Where runs get their working directories, outside the state directory.
    work_root: PathBuf,
    /// What the Landlock rules let runs read: the system outside the state directory.
    allowed: fence::Allowed,
    /// Whether the kernel enforces Landlock rules.
    landlock: bool,
    /// Whether each run gets an IPC namespace of its own ([`confine`]): where the appliance
    /// may make one (root with `CAP_SYS_ADMIN`; not, say, in a container without it).
    ipc_namespace: bool,
    /// The state directory, resolved: a root run's mount namespace hides it.
    state_dir: PathBuf,
    /// The seccomp filter root runs install, or why no root run starts here: the appliance
    /// may not make them a mount namespace ([`mounts::available`]), or has no filter for this
    /// architecture.
    root_runs: Result<Arc<RootFilter>, String>,
    /// Whether the metadata fence ([`netfence`]) holds every cell, or why not.
    cloud_metadata: crate::control::CloudMetadata,
    /// Why vendor code may not run here at all, if so: it would share the appliance's uid
    /// without the parts of the box that then hold it (`Sandbox::open`).
    unusable: Option<String>,
    /// The boxes live now, as the usage watch ([`Sandbox::watcher`]) measures them.
    boxes: Arc<usage::Boxes>,
}

/// Why vendor code may not run at all, if so. Sharing the appliance's uid, vendor code is held
/// only by Landlock (files, signals, abstract sockets) and its cell (by which the admin socket
/// tells it apart): without either, nothing keeps it from the appliance.
fn unusable(run_as: RunAs, enforced: fence::Enforced, cells: bool) -> Option<String> {
    match (run_as, enforced, cells) {
        (RunAs::BoxUser { .. }, _, _) | (_, fence::Enforced::FilesAndScopes, true) => None,
        (_, fence::Enforced::FilesAndScopes, false) => Some(
            "the appliance is not root and has no cgroup v2 cell to hold vendor code in; run it as root, or delegate it a cgroup"
                .to_owned(),
        ),
        _ => Some(
            "the appliance is not root and this kernel lacks Landlock's signal scope (Linux 6.12); run the appliance as root so vendor code gets a user of its own"
                .to_owned(),
        ),
    }
}

/// The seccomp filter root runs install, or why none may start: only an appliance running as
/// root (whose box user is its own) runs vendor code as root, in a mount namespace it must be
/// able to make, under a filter written for its architecture.
fn root_runs(run_as: RunAs) -> Result<Arc<RootFilter>, String> {
    if !matches!(run_as, RunAs::BoxUser { .. }) {
        return Err("the appliance is not root".to_owned());
    }
    mounts::available()?;
    RootFilter::build().map(Arc::new)
}

/// Where runs get their working directories: a root-owned directory under `/run` for an
/// appliance running as root, else the user's runtime directory, else (with a warning) the
/// shared temporary directory, where anyone may take the name first.
fn work_base(tag: &str) -> Result<PathBuf, String> {
    if nix::unistd::geteuid().is_root() && Path::new("/run").is_dir() {
        let base = Path::new("/run/airlock-box");
        std::fs::create_dir_all(base)
            .and_then(|()| std::fs::set_permissions(base, std::fs::Permissions::from_mode(0o711)))
            .map_err(|e| format!("cannot create {}: {e}", base.display()))?;
        return Ok(base.join(tag));
    }
    if let Some(runtime) = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from)
        && runtime.is_absolute()
        && runtime.is_dir()
    {
        return Ok(runtime.join(format!("airlock-box-{tag}")));
    }
    tracing::warn!(
        "no runtime directory of the appliance's own: vendor code works under the shared temporary directory"
    );
    Ok(std::env::temp_dir().join(format!("airlock-box-{tag}")))
}

impl Sandbox {
    /// Tests start a second appliance on a state directory before dropping the first (a
    /// process restart has no such overlap): the first must then leave the cell and working
    /// root they share, which its drop would remove, empty, from under the second.
    #[cfg(test)]
    pub(crate) fn leave_shared_dirs(&mut self) {
        self.work_root = PathBuf::new();
        std::mem::forget(self.cells.take());
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // Every run removed its working directory; one a run still holds stays for the next start.
        let _ = std::fs::remove_dir(&self.work_root);
    }
}

/// One run's box: its cell and its working directory, disposed of when the run ends.
#[derive(Debug)]
pub(crate) struct Boxed {
    pub(crate) cell: Option<Arc<Cell>>,
    workdir: PathBuf,
    /// Its entry in the usage watch (boxes with a cell only).
    watched: Option<Arc<usage::Watched>>,
    /// The uid it runs as, given back once everything in its cell is dead.
    lease: std::sync::Mutex<Option<user::Lease>>,
}

impl Sandbox {
    /// Settles how runs are boxed on this host, kills what a previous process left running and
    /// removes its working directories. `box_user` names the user vendor code runs as; by
    /// default the appliance picks an unused uid of its own.
    /// `disk` is what the usage watch holds each box to.
    pub(crate) fn open(
        state_dir: &Path,
        box_user: Option<&str>,
        disk: &crate::config::BoxDisk,
    ) -> Result<Self, String> {
        let state = std::fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.to_owned());
        let tag = airlock_core::operation::sha256_hex(state.as_os_str().as_encoded_bytes())[..16].to_owned();
        let run_as = user::resolve(box_user, &tag)?;
        let cells = match Cells::open(&tag) {
            Ok(cells) => Some(cells),
            Err(why) => {
                tracing::warn!(reason = %why, "no cgroup for vendor code: each run is held by its process group only, which setsid escapes");
                None
            }
        };
        let cloud_metadata = match cells.as_ref().map(|cells| netfence::fence(cells.dir())) {
            Some(Ok(())) => crate::control::CloudMetadata::Fenced,
            Some(Err(why)) => crate::control::CloudMetadata::Reachable { why },
            None => {
                crate::control::CloudMetadata::Reachable { why: "no cgroup v2 cell to hold vendor code in".to_owned() }
            }
        };
        if let crate::control::CloudMetadata::Reachable { why } = &cloud_metadata {
            tracing::warn!(
                reason = %why,
                "vendor code can reach the cloud's instance metadata service, where this host has one, and with it the host's cloud credentials"
            );
        }
        let work_root = work_base(&tag)?;
        if work_root.starts_with(&state) {
            return Err(format!(
                "the box's working directories ({}) must be outside the state directory",
                work_root.display()
            ));
        }
        let enforced = fence::enforced();
        let landlock = enforced != fence::Enforced::Nothing;
        let ipc_namespace = confine::ipc_namespaces_available();
        if !ipc_namespace {
            tracing::warn!(
                "no IPC namespace for vendor code (the appliance is not root, or lacks CAP_SYS_ADMIN): what it makes with System V IPC outlives its box"
            );
        }
        let root_runs = root_runs(run_as);
        if let (RunAs::BoxUser { .. }, Err(why)) = (run_as, &root_runs) {
            tracing::warn!(reason = %why, "no vendor code runs as root on this appliance");
        }
        let unusable = unusable(run_as, enforced, cells.is_some());
        if let Some(why) = &unusable {
            tracing::error!(reason = %why, "vendor code will not run on this appliance");
        }
        let uids = user::UidPool::for_box(run_as, box_user, &tag);
        if cells.is_none() {
            tracing::warn!("without cgroup cells, what vendor code writes to disk is not watched");
        }
        let boxes = Arc::new(usage::Boxes::new(*disk, work_root.clone()));
        let sandbox = Self {
            cells,
            run_as,
            uids,
            work_root,
            allowed: fence::Allowed::outside(std::slice::from_ref(&state)),
            landlock,
            ipc_namespace,
            state_dir: state,
            root_runs,
            cloud_metadata,
            unusable,
            boxes,
        };
        sandbox.clear_leftovers()?;
        match sandbox.run_as {
            RunAs::BoxUser { uid, gid } => tracing::info!(uid, gid, landlock, "vendor code runs boxed"),
            RunAs::Appliance | RunAs::Root => tracing::warn!(
                landlock,
                "the appliance is not root, so vendor code runs as the appliance's own user (boxed by Landlock where the kernel has it)"
            ),
        }
        if !landlock {
            tracing::warn!(
                "this kernel does not enforce Landlock: vendor code is kept from the state directory by its permissions only"
            );
        }
        Ok(sandbox)
    }

    /// Runs vendor code as `run_as` from now on, as an appliance that is not root would.
    #[cfg(test)]
    pub(crate) fn set_run_as(&mut self, run_as: RunAs) {
        self.run_as = run_as;
    }

    /// Who vendor code runs as on this appliance, unless a template asks for root.
    pub(crate) fn run_as(&self) -> RunAs {
        self.run_as
    }

    /// The same, as `phase status` shows it.
    pub(crate) fn vendor_code_user(&self) -> crate::control::VendorCodeUser {
        match self.run_as {
            RunAs::BoxUser { uid, gid } => crate::control::VendorCodeUser::BoxUser { uid, gid },
            RunAs::Appliance | RunAs::Root => crate::control::VendorCodeUser::ApplianceUser,
        }
    }

    /// Whether vendor code can reach the cloud's metadata service, as `phase status` shows it.
    pub(crate) fn cloud_metadata(&self) -> crate::control::CloudMetadata {
        self.cloud_metadata.clone()
    }

    /// Who a run asking for `user` runs as. The decision has already refused root where the
    /// appliance cannot give it (it is not root).
    pub(crate) fn run_as_for(&self, user: RunUser) -> RunAs {
        match (user, self.run_as) {
            (RunUser::Root, RunAs::BoxUser { .. }) => RunAs::Root,
            _ => self.run_as,
        }
    }

    /// Where the run of `id` works, while it runs.
    #[cfg(test)]
    pub(crate) fn workdir(&self, id: OperationId) -> PathBuf {
        self.work_root.join(id.to_string())
    }

    /// The system root (`/opt`, `/etc`, ...) under which `path` lies, if every box may read it
    /// by its Landlock rules: the releases root must not be there, or every box (a template's
    /// script, another release's service) would read every release, and a root run its logs.
    pub(crate) fn readable_by_every_box(&self, path: &Path) -> Option<&'static str> {
        self.allowed.system_root_of(path)
    }

    /// Where boxes get their working directories: the release root must not be inside it.
    pub(crate) fn work_root(&self) -> &Path {
        &self.work_root
    }

    /// The usage watch over this sandbox's boxes, a pass every `every` ([`usage::EVERY`] but in
    /// tests), until the sandbox is dropped; `on_kill` hears of each box it kills.
    pub(crate) fn watcher(&self, every: Duration, on_kill: usage::OnKill) -> impl Future<Output = ()> + Send + 'static {
        usage::watch(Arc::downgrade(&self.boxes), every, on_kill)
    }

    /// Kills whatever a previous process left running and removes its working directories.
    fn clear_leftovers(&self) -> Result<(), String> {
        if let Some(cells) = &self.cells {
            for (name, cell) in cells.leftovers() {
                if cell.populated() {
                    tracing::warn!(cell = %name, "killing what an interrupted operation or service left running");
                }
                cell.kill_and_remove();
            }
        }
        match std::fs::remove_dir_all(&self.work_root) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot clear {}: {e}", self.work_root.display())),
        }
        // Made afresh, never reused: in a shared directory such as /tmp anyone may have put a
        // symlink or a directory of their own at this (predictable) name, and `mkdir` follows
        // neither. What is there now is ours.
        let made = std::fs::create_dir(&self.work_root)
            .and_then(|()| std::fs::symlink_metadata(&self.work_root))
            .map_err(|e| format!("cannot create {}: {e}", self.work_root.display()))?;
        use std::os::unix::fs::MetadataExt;
        if !made.is_dir() || made.uid() != nix::unistd::geteuid().as_raw() {
            return Err(format!("{} is not a directory of the appliance's own", self.work_root.display()));
        }
        std::fs::set_permissions(&self.work_root, std::fs::Permissions::from_mode(0o711))
            .map_err(|e| format!("cannot set the permissions of {}: {e}", self.work_root.display()))
    }

    /// A command that runs `script` for operation `id` in a box of its own, with `env` (and
    /// only `PATH`, `HOME` and `TMPDIR` besides), no standard input, and its output piped.
    pub(crate) fn prepare(
        &self,
        id: OperationId,
        script: &[u8],
        env: &std::collections::BTreeMap<String, String>,
        limits: &RunLimits,
        run_as: RunAs,
    ) -> Result<(tokio::process::Command, Boxed), String> {
        let (mut confinement, boxed) = self.enter(&id.to_string(), Some(script), &[], None, limits, run_as)?;
        let mut cmd = tokio::process::Command::new("/bin/sh");
        cmd.arg("script.sh")
            .env_clear()
            .env("PATH", PATH)
            .env("HOME", &boxed.workdir)
            .env("TMPDIR", &boxed.workdir)
            .envs(env)
            .current_dir(&boxed.workdir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        // SAFETY: `apply` runs in the forked child before exec and makes only system calls on
        // values prepared here (see `confine`): no allocation, no locks.
        #[allow(unsafe_code)]
        unsafe {
            cmd.pre_exec(move || confinement.apply());
        }
        Ok((cmd, boxed))
    }

    /// A command that starts a release's service (or one of its exec health checks) in a box
    /// of its own, cell `launch.cell`: the same box as an operation's, but it runs `program`
    /// from its working directory inside the release, which it may read and run but not
    /// write, with a private writable `HOME`/`TMPDIR` of its own (scratch: removed when the
    /// box is disposed of and at the appliance's start). Its environment is `PATH`, `HOME`,
    /// `TMPDIR` and `launch.env` only; no standard input; its output piped.
    pub(crate) fn prepare_service(
        &self,
        launch: &ServiceLaunch<'_>,
    ) -> Result<(tokio::process::Command, Boxed), String> {
        if !launch.cwd.starts_with(launch.release_dir) {
            return Err(format!("{} is not inside the release", launch.cwd.display()));
        }
        let (mut confinement, boxed) = self.enter(
            launch.cell.as_str(),
            None,
            &[launch.release_dir],
            Some(launch.cwd),
            launch.limits,
            launch.run_as,
        )?;
        let mut cmd = tokio::process::Command::new(launch.program);
        cmd.args(launch.args)
            .env_clear()
            .env("PATH", PATH)
            .env("HOME", &boxed.workdir)
            .env("TMPDIR", &boxed.workdir)
            .envs(launch.env.iter().map(|(k, v)| (k, v)))
            .current_dir(launch.cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        // SAFETY: as in `prepare`.
        #[allow(unsafe_code)]
        unsafe {
            cmd.pre_exec(move || confinement.apply());
        }
        Ok((cmd, boxed))
    }

    /// The one way into a box: a uid, a cell named `name` under `limits`, a private working
    /// directory (holding `script`, if any; where the run starts unless `cwd` says), and the
    /// confinement the child applies to itself.
    fn enter(
        &self,
        name: &str,
        script: Option<&[u8]>,
        read_only: &[&Path],
        cwd: Option<&Path>,
        limits: &RunLimits,
        run_as: RunAs,
    ) -> Result<(Confinement, Boxed), String> {
        if let Some(why) = &self.unusable {
            return Err(format!("vendor code does not run here: {why}"));
        }
        // Root's uid is the customer's at the admin socket (and `connect` by path is not a
        // Landlock right): only its cell tells a root run apart there, as for the appliance's uid.
        if run_as == RunAs::Root && self.cells.is_none() {
            return Err(
                "vendor code does not run as root here: without a cgroup v2 cell the admin socket cannot tell it from the customer's root"
                    .to_owned(),
            );
        }
        // Root owns root's files and passes every mode: without its mount namespace it could
        // change the modes of what Landlock keeps it from opening, and without its seccomp
        // filter reach the host's daemons by their Unix sockets.
        let root_filter = match (run_as, &self.root_runs) {
            (RunAs::Root, Err(why)) => return Err(format!("vendor code does not run as root here: {why}")),
            (RunAs::Root, Ok(filter)) => Some(filter.clone()),
            _ => None,
        };
        // A uid of its own while it runs, where one is free; else the box user's, shared.
        let lease = match run_as {
            RunAs::BoxUser { .. } => self.uids.lease(),
            RunAs::Appliance | RunAs::Root => None,
        };
        let run_as = match &lease {
            Some(lease) => RunAs::BoxUser { uid: lease.id, gid: lease.id },
            None => run_as,
        };
        let cell = match &self.cells {
            Some(cells) => {
                let cell = cells.create(name)?;
                cell.limit(limits.processes, limits.memory_bytes);
                Some(Arc::new(cell))
            }
            None => None,
        };
        let workdir = self.work_root.join(name);
        let watched = cell.as_ref().map(|cell| {
            // What the cell's hierarchy cannot cap, the watch sums over its processes.
            let caps = usage::Caps {
                memory_bytes: (!cell.dir().join("memory.max").exists()).then_some(limits.memory_bytes),
                threads: (!cell.dir().join("pids.max").exists()).then_some(u64::from(limits.processes)),
            };
            let watched = Arc::new(usage::Watched::new(cell.clone(), workdir.clone(), caps));
            self.boxes.add(&watched);
            watched
        });
        let boxed = Boxed { cell, workdir, watched, lease: std::sync::Mutex::new(lease) };
        let made = self.make_workdir(&boxed.workdir, script, run_as).and_then(|()| {
            let fence =
                if self.landlock { Some(fence::ruleset(&boxed.workdir, read_only, &self.allowed)?) } else { None };
            let procs = boxed.cell.as_ref().map(|c| c.procs()).transpose()?;
            let root = match root_filter {
                Some(filter) => {
                    let cwd = cwd.unwrap_or(&boxed.workdir);
                    let mounts = mounts::MountPlan::new(&boxed.workdir, cwd, &self.state_dir, self.allowed.devices())?;
                    Some(RootOnly { mounts, filter })
                }
                None => None,
            };
            Ok(Confinement::new(procs, run_as, limits, fence, self.ipc_namespace, root))
        });
        match made {
            Ok(confinement) => Ok((confinement, boxed)),
            Err(e) => {
                boxed.dispose();
                Err(e)
            }
        }
    }

    /// The run's private working directory, owned by the box user, with the script (if any) in it.
    fn make_workdir(&self, dir: &Path, script: Option<&[u8]>, run_as: RunAs) -> Result<(), String> {
        let io = |e: std::io::Error| format!("cannot make the working directory {}: {e}", dir.display());
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(io)?;
        }
        std::fs::create_dir(dir).map_err(io)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
        if let Some(script) = script {
            let file = dir.join("script.sh");
            std::fs::write(&file, script).map_err(io)?;
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o444)).map_err(io)?;
        }
        if let RunAs::BoxUser { uid, gid } = run_as {
            std::os::unix::fs::chown(dir, Some(uid), Some(gid)).map_err(io)?;
        }
        Ok(())
    }
}

impl Boxed {
    /// Kills what is left, removes the cell and the working directory, and gives its uid back
    /// (only once the cell is empty: a uid with a process left stays out of the pool).
    pub(crate) fn dispose(&self) {
        // First, so the watch never kills the cell once a later run may have made it again.
        if let Some(watched) = &self.watched {
            watched.retire();
        }
        let empty = match &self.cell {
            Some(cell) => {
                cell.kill_and_remove();
                !cell.dir().exists()
            }
            None => false,
        };
        let lease = self.lease.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let (true, Some(lease)) = (empty, lease) {
            lease.release();
        }
        if let Err(e) = std::fs::remove_dir_all(&self.workdir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %self.workdir.display(), error = %e, "cannot remove a run's working directory");
        }
    }

    /// Why the usage watch killed it, if it did.
    pub(crate) fn overrun(&self) -> Option<usage::Overrun> {
        self.watched.as_ref().and_then(|w| w.overrun())
    }

    #[cfg(test)]
    pub(crate) fn workdir(&self) -> &Path {
        &self.workdir
    }
}
