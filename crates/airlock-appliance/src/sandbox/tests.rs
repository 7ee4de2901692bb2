//! Vendor code tries to escape its box. CI runs as root with cgroup v2 and Landlock, which
//! these tests need: they fail, never skip, where the box cannot be built.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use airlock_core::OperationId;

use super::*;

struct Run {
    code: Option<i32>,
    output: String,
}

fn state() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::write(dir.path().join("output.key"), "the appliance's key").unwrap();
    std::fs::set_permissions(dir.path().join("output.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
    dir
}

fn id(n: u8) -> OperationId {
    OperationId::from_random([n; 16])
}

async fn run(sandbox: &Sandbox, n: u8, script: &str, env: &[(&str, String)], limits: &RunLimits) -> Run {
    let env: BTreeMap<String, String> = env.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect();
    let (mut cmd, boxed) = sandbox.prepare(id(n), script.as_bytes(), &env, limits, sandbox.run_as).unwrap();
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output()).await.unwrap().unwrap();
    boxed.dispose();
    assert!(!boxed.workdir().exists(), "the working directory is removed after the run");
    let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
    output.push_str(&String::from_utf8_lossy(&out.stderr));
    Run { code: out.status.code(), output }
}

/// The box as an appliance running as root builds it.
fn boxed(state: &tempfile::TempDir) -> Sandbox {
    let sandbox = Sandbox::open(state.path(), None).unwrap();
    assert!(matches!(sandbox.run_as, RunAs::BoxUser { .. }), "the tests run as root");
    assert!(sandbox.cells.is_some() && sandbox.landlock, "cgroup v2 and Landlock are available to the tests");
    assert!(sandbox.ipc_namespace, "the tests run as root, who may make IPC namespaces");
    sandbox
}

/// Vendor code that runs with root's uid: only Landlock and the cell hold it.
fn boxed_as_root(state: &tempfile::TempDir) -> Sandbox {
    let mut sandbox = boxed(state);
    sandbox.run_as = RunAs::Appliance;
    sandbox
}

#[tokio::test]
async fn vendor_code_runs_as_the_box_user_in_a_private_directory_outside_the_state() {
    let state = state();
    let sandbox = boxed(&state);
    let RunAs::BoxUser { uid, gid } = sandbox.run_as else { unreachable!() };
    let r = run(&sandbox, 1, "id -u; id -g; id -G; pwd; echo $HOME", &[], &RunLimits::default()).await;
    let lines: Vec<&str> = r.output.lines().collect();
    assert_eq!(&lines[..3], &[uid.to_string(), gid.to_string(), gid.to_string()], "{}", r.output);
    assert_ne!(uid, 0);
    assert!(!lines[3].starts_with(state.path().to_str().unwrap()), "{}", r.output);
    assert_eq!(lines[3], lines[4]);
    assert_eq!(r.code, Some(0));
}

#[tokio::test]
async fn vendor_code_cannot_read_the_state_directory_even_with_roots_uid() {
    let state = state();
    let key = state.path().join("output.key");
    for as_root in [false, true] {
        let sandbox = if as_root { boxed_as_root(&state) } else { boxed(&state) };
        let script =
            "cat \"$KEY\" && echo READ; ls \"$STATE\" && echo LISTED; echo x > \"$STATE/planted\" && echo WROTE; true";
        let env = [("KEY", key.display().to_string()), ("STATE", state.path().display().to_string())];
        let r = run(&sandbox, 2, script, &env, &RunLimits::default()).await;
        assert!(!r.output.contains("the appliance's key"), "{}", r.output);
        assert!(
            !r.output.contains("READ") && !r.output.contains("LISTED") && !r.output.contains("WROTE"),
            "{}",
            r.output
        );
        assert!(!state.path().join("planted").exists());
    }
}

#[tokio::test]
async fn vendor_code_cannot_signal_the_appliance() {
    let state = state();
    let me = std::process::id().to_string();
    for as_root in [false, true] {
        let sandbox = if as_root { boxed_as_root(&state) } else { boxed(&state) };
        let r = run(
            &sandbox,
            3,
            "kill -0 \"$APPLIANCE\" && echo SIGNALLED; true",
            &[("APPLIANCE", me.clone())],
            &RunLimits::default(),
        )
        .await;
        assert!(!r.output.contains("SIGNALLED"), "{}", r.output);
    }
}

#[tokio::test]
async fn a_fork_bomb_stops_at_the_process_limit() {
    let state = state();
    let sandbox = boxed(&state);
    let limits = RunLimits { processes: 16, ..RunLimits::default() };
    // Fifty processes at once, each saying it started (the shell dies at the first fork
    // the kernel refuses).
    let script = "i=0; while [ $i -lt 50 ]; do { echo started; exec sleep 1; } & i=$((i+1)); done";
    let r = run(&sandbox, 4, script, &[], &limits).await;
    let started = u32::try_from(r.output.matches("started").count()).unwrap();
    assert!((1..limits.processes).contains(&started), "{started} started: {}", r.output);
}

#[tokio::test]
async fn a_run_that_fails_to_enter_its_box_does_not_run() {
    let state = state();
    let sandbox = boxed(&state);
    let env = BTreeMap::new();
    let (mut cmd, boxed) = sandbox.prepare(id(5), b"touch ran", &env, &RunLimits::default(), sandbox.run_as).unwrap();
    // Its cell is gone before it starts: the child cannot enter it, so the spawn fails.
    boxed.cell.as_ref().unwrap().kill_and_remove();
    assert!(cmd.output().await.is_err());
    assert!(!boxed.workdir().join("ran").exists());
    boxed.dispose();
}

#[test]
fn no_landlock_rule_covers_the_state_directory() {
    let protected = vec![PathBuf::from("/var/lib/airlock"), PathBuf::from("/opt/airlock/state")];
    assert_eq!(fence::allowed_roots(&["/usr", "/var", "/opt", "/etc"], &protected), vec!["/usr", "/etc"]);
}

#[tokio::test]
async fn a_named_box_user_is_used_and_root_or_a_missing_user_is_refused() {
    let state = state();
    let sandbox = Sandbox::open(state.path(), Some("nobody")).unwrap();
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    assert_eq!(sandbox.run_as, RunAs::BoxUser { uid: nobody.uid.as_raw(), gid: nobody.gid.as_raw() });
    let r = run(&sandbox, 6, "id -u", &[], &RunLimits::default()).await;
    assert_eq!(r.output.trim(), nobody.uid.to_string());
    drop(sandbox);
    let root = Sandbox::open(state.path(), Some("root")).unwrap_err();
    assert!(root.contains("must run unprivileged"), "{root}");
    let missing = Sandbox::open(state.path(), Some("airlock-no-such-user")).unwrap_err();
    assert!(missing.contains("does not exist") && missing.contains("useradd"), "{missing}");
}

#[test]
fn a_symlink_planted_at_the_work_roots_name_is_removed_not_followed() {
    let state = state();
    let target = tempfile::tempdir().unwrap();
    std::fs::set_permissions(target.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let work_root = Sandbox::open(state.path(), None).unwrap().work_root.clone();
    // Someone else on the host plants a symlink where the next start makes its work root.
    std::os::unix::fs::symlink(target.path(), &work_root).unwrap();
    let sandbox = Sandbox::open(state.path(), None).unwrap();
    let meta = std::fs::symlink_metadata(&sandbox.work_root).unwrap();
    assert!(meta.is_dir() && !meta.file_type().is_symlink());
    assert_eq!(
        std::fs::metadata(target.path()).unwrap().permissions().mode() & 0o777,
        0o755,
        "the target is untouched"
    );
}

#[test]
fn vendor_code_sharing_the_appliances_uid_runs_only_in_a_full_box() {
    use fence::Enforced::*;
    let user = RunAs::BoxUser { uid: 61184, gid: 61184 };
    assert_eq!(unusable(user, Nothing, false), None, "its own uid holds it");
    assert_eq!(unusable(RunAs::Appliance, FilesAndScopes, true), None);
    for (enforced, cells) in [(FilesAndScopes, false), (FilesOnly, true), (Nothing, true)] {
        assert!(unusable(RunAs::Appliance, enforced, cells).is_some(), "{enforced:?} {cells}");
    }
}

#[tokio::test]
async fn no_descriptor_of_the_appliance_reaches_vendor_code() {
    let state = state();
    let sandbox = boxed(&state);
    // A pipe opened without close-on-exec (pipe(2), not pipe2), as one inherited from whatever
    // started the appliance.
    let (read, write) = nix::unistd::pipe().unwrap();
    use std::os::fd::AsRawFd;
    let r = run(&sandbox, 7, "ls /proc/self/fd", &[], &RunLimits::default()).await;
    let fds: Vec<i32> = r.output.split_whitespace().filter_map(|f| f.parse().ok()).collect();
    assert!(!fds.contains(&read.as_raw_fd()) && !fds.contains(&write.as_raw_fd()), "{fds:?}");
    assert!(fds.iter().all(|fd| *fd <= 3), "only its standard streams and ls's own: {fds:?}");
}

#[tokio::test]
async fn a_root_run_keeps_only_a_few_capabilities_and_cannot_make_devices() {
    let state = state();
    let sandbox = boxed(&state);
    assert!(sandbox.work_root.starts_with("/run/airlock-box"), "a root-owned base, not /tmp");
    let script = "grep CapEff /proc/self/status; mknod disk b 7 0 && echo MADE-A-DEVICE; id -u";
    let env = BTreeMap::new();
    let (mut cmd, boxed) = sandbox.prepare(id(8), script.as_bytes(), &env, &RunLimits::default(), RunAs::Root).unwrap();
    let out = cmd.output().await.unwrap();
    boxed.dispose();
    let output = String::from_utf8_lossy(&out.stdout);
    // CHOWN, DAC_OVERRIDE, DAC_READ_SEARCH, FOWNER, FSETID, KILL, SETGID, SETUID, NET_BIND_SERVICE.
    assert!(output.contains("CapEff:\t00000000000004ff"), "{output}");
    assert!(!output.contains("MADE-A-DEVICE") && output.trim_end().ends_with('0'), "{output}");
}

#[tokio::test]
async fn concurrent_runs_get_uids_of_their_own_so_one_cannot_starve_another() {
    let state = state();
    let sandbox = boxed(&state);
    let limits = RunLimits { processes: 8, ..RunLimits::default() };
    let env = BTreeMap::new();
    // Run A takes every process its uid may have, and holds them.
    let bomb = b"i=0; while [ $i -lt 20 ]; do sleep 3 & i=$((i+1)); done";
    let (mut a, boxed_a) = sandbox.prepare(id(9), bomb, &env, &limits, sandbox.run_as).unwrap();
    let a_uid = boxed_a.lease.lock().unwrap().as_ref().map(|l| l.id).unwrap();
    let a = a.spawn().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Run B, meanwhile, forks as it needs to.
    let b = run(&sandbox, 10, "sh -c 'echo forked'; id -u", &[], &limits).await;
    assert!(b.output.contains("forked"), "{}", b.output);
    let b_uid: u32 = b.output.lines().last().unwrap().trim().parse().unwrap();
    assert_ne!(a_uid, b_uid);
    drop(a);
    boxed_a.dispose();
    // Both uids are back in the pool once their cells are gone.
    let (_, again) = sandbox.prepare(id(11), b"true", &env, &limits, sandbox.run_as).unwrap();
    assert!(again.lease.lock().unwrap().is_some());
    again.dispose();
}

#[tokio::test]
async fn a_run_cannot_write_a_file_past_its_size_limit() {
    let state = state();
    let sandbox = boxed(&state);
    let limits = RunLimits { file_bytes: 1 << 20, ..RunLimits::default() };
    let r = run(&sandbox, 12, "head -c 4194304 /dev/zero > big; wc -c < big", &[], &limits).await;
    let written = r.output.lines().find_map(|l| l.trim().parse::<u64>().ok());
    assert_eq!(written, Some(1 << 20), "{}", r.output);
}

#[tokio::test]
async fn a_service_reads_and_runs_its_release_but_cannot_write_it_even_with_roots_uid() {
    let state = state();
    let releases = tempfile::tempdir().unwrap();
    std::fs::set_permissions(releases.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let release = releases.path().join("r");
    std::fs::create_dir_all(release.join("bin")).unwrap();
    std::fs::write(release.join("bin/svc"), "#!/bin/sh\ncat ./data; echo \"home=$HOME\"; echo x > ./planted && echo WROTE; echo y > \"$HOME/scratch\" && echo SCRATCH; id -u\n").unwrap();
    std::fs::set_permissions(release.join("bin/svc"), std::fs::Permissions::from_mode(0o555)).unwrap();
    std::fs::write(release.join("data"), "release-data\n").unwrap();
    std::fs::set_permissions(release.join("data"), std::fs::Permissions::from_mode(0o444)).unwrap();
    for as_root in [false, true] {
        let sandbox = if as_root { boxed_as_root(&state) } else { boxed(&state) };
        let cell = CellName::service(&"ab".repeat(32), "svc").unwrap();
        let program = release.join("bin/svc");
        let env = vec![("GREETING".to_owned(), "hi".to_owned())];
        let launch = ServiceLaunch {
            cell: &cell,
            program: program.as_os_str(),
            args: &[],
            env: &env,
            release_dir: &release,
            cwd: &release,
            limits: &RunLimits::default(),
            run_as: sandbox.run_as,
        };
        let (mut cmd, boxed) = sandbox.prepare_service(&launch).unwrap();
        assert!(boxed.cell.as_ref().unwrap().dir().ends_with(format!("svc-{}-svc", "ab".repeat(6))));
        let out = tokio::time::timeout(Duration::from_secs(30), cmd.output()).await.unwrap().unwrap();
        boxed.dispose();
        let output = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        assert!(output.contains("release-data"), "{output}");
        assert!(output.contains("SCRATCH"), "its HOME is its own to write: {output}");
        assert!(!output.contains("WROTE") && !release.join("planted").exists(), "{output}");
        assert!(!output.contains(state.path().to_str().unwrap()), "{output}");
    }
    // A working directory outside the release is refused.
    let sandbox = boxed(&state);
    let cell = CellName::service(&"ab".repeat(32), "svc").unwrap();
    let launch = ServiceLaunch {
        cell: &cell,
        program: std::ffi::OsStr::new("true"),
        args: &[],
        env: &[],
        release_dir: &release,
        cwd: Path::new("/"),
        limits: &RunLimits::default(),
        run_as: sandbox.run_as,
    };
    assert!(sandbox.prepare_service(&launch).is_err());
    assert!(CellName::service("not hex", "svc").is_err() && CellName::service(&"ab".repeat(32), "../x").is_err());
}

/// System V shared memory segments in this (the host's) IPC namespace owned by a box uid.
fn box_owned_shm_segments() -> Vec<String> {
    let table = std::fs::read_to_string("/proc/sysvipc/shm").unwrap();
    table
        .lines()
        .skip(1)
        .filter(|l| l.split_whitespace().nth(7).and_then(|u| u.parse::<u32>().ok()).is_some_and(|u| u >= 61184))
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn system_v_ipc_a_run_makes_dies_with_its_box_and_it_sees_none_of_the_hosts() {
    let state = state();
    // A segment of the host's, as a database on the host keeps one.
    let host = std::process::Command::new("ipcmk").args(["-M", "4096", "-p", "0600"]).output().unwrap();
    let host_id = String::from_utf8_lossy(&host.stdout).split(':').nth(1).map(|s| s.trim().to_owned()).unwrap();
    let _removed = RemoveSegment(host_id);
    let own_ns = std::fs::read_link("/proc/self/ns/ipc").unwrap();
    for as_root in [false, true] {
        let sandbox = if as_root { boxed_as_root(&state) } else { boxed(&state) };
        // Shared memory, a message queue and a semaphore, left behind on purpose.
        let script =
            "ipcmk -M 1048576 && ipcmk -Q && ipcmk -S 1 && echo MADE; ipcs -m | grep -c 0x; readlink /proc/self/ns/ipc";
        let r = run(&sandbox, 13 + u8::from(as_root), script, &[], &RunLimits::default()).await;
        assert!(r.output.contains("MADE"), "{}", r.output);
        let ns = r.output.lines().last().unwrap().trim();
        assert_ne!(Path::new(ns), own_ns, "the run has an IPC namespace of its own: {}", r.output);
        // It saw only its own segment, never the host's.
        assert_eq!(r.output.lines().rev().nth(1).map(str::trim), Some("1"), "{}", r.output);
    }
    let left = box_owned_shm_segments();
    for id in left.iter().filter_map(|l| l.split_whitespace().nth(1)) {
        let _ = std::process::Command::new("ipcrm").args(["-m", id]).status();
    }
    assert!(left.is_empty(), "a box's segment outlived it: {left:?}");
}

/// Removes a shared memory segment the test made, however the test ends.
struct RemoveSegment(String);

impl Drop for RemoveSegment {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ipcrm").args(["-m", &self.0]).status();
    }
}

#[tokio::test]
async fn a_root_run_without_a_cell_does_not_start() {
    let state = state();
    let mut sandbox = boxed(&state);
    // A host without cgroup v2: nothing would tell a root run from the customer's root at the
    // admin socket.
    sandbox.cells = None;
    let env = BTreeMap::new();
    let err = sandbox.prepare(id(15), b"echo RAN", &env, &RunLimits::default(), RunAs::Root).unwrap_err();
    assert!(err.contains("cgroup v2"), "{err}");
    // The box user still runs: its uid is refused at the admin socket whatever its cell.
    let r = run(&sandbox, 16, "echo RAN", &[], &RunLimits::default()).await;
    assert!(r.output.contains("RAN"), "{}", r.output);
}
