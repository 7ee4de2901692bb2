//! Vendor code tries to escape its box. CI runs as root with cgroup v2 and Landlock, which
//! these tests need: they fail, never skip, where the box cannot be built.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use airlock_core::OperationId;

use super::*;
use crate::config::BoxDisk;
use usage::Overrun;

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
    let sandbox = Sandbox::open(state.path(), None, &Default::default()).unwrap();
    assert!(matches!(sandbox.run_as, RunAs::BoxUser { .. }), "the tests run as root");
    assert!(sandbox.cells.is_some() && sandbox.landlock, "cgroup v2 and Landlock are available to the tests");
    assert!(sandbox.ipc_namespace, "the tests run as root, who may make IPC namespaces");
    assert!(sandbox.root_runs.is_ok(), "the tests may run vendor code as root: {:?}", sandbox.root_runs);
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
    let sandbox = Sandbox::open(state.path(), Some("nobody"), &Default::default()).unwrap();
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    assert_eq!(sandbox.run_as, RunAs::BoxUser { uid: nobody.uid.as_raw(), gid: nobody.gid.as_raw() });
    let r = run(&sandbox, 6, "id -u", &[], &RunLimits::default()).await;
    assert_eq!(r.output.trim(), nobody.uid.to_string());
    drop(sandbox);
    let root = Sandbox::open(state.path(), Some("root"), &Default::default()).unwrap_err();
    assert!(root.contains("must run unprivileged"), "{root}");
    let missing = Sandbox::open(state.path(), Some("airlock-no-such-user"), &Default::default()).unwrap_err();
    assert!(missing.contains("does not exist") && missing.contains("useradd"), "{missing}");
}

#[test]
fn a_symlink_planted_at_the_work_roots_name_is_removed_not_followed() {
    let state = state();
    let target = tempfile::tempdir().unwrap();
    std::fs::set_permissions(target.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let work_root = Sandbox::open(state.path(), None, &Default::default()).unwrap().work_root.clone();
    // Someone else on the host plants a symlink where the next start makes its work root.
    std::os::unix::fs::symlink(target.path(), &work_root).unwrap();
    let sandbox = Sandbox::open(state.path(), None, &Default::default()).unwrap();
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

/// Runs `script` as root in a box of its own (a script's: its working directory is where it
/// starts), with `env`.
async fn run_as_root(sandbox: &Sandbox, n: u8, script: &str, env: &[(&str, String)]) -> Run {
    let env: BTreeMap<String, String> = env.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect();
    let (mut cmd, boxed) = sandbox.prepare(id(n), script.as_bytes(), &env, &RunLimits::default(), RunAs::Root).unwrap();
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output()).await.unwrap().unwrap();
    boxed.dispose();
    let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
    output.push_str(&String::from_utf8_lossy(&out.stderr));
    Run { code: out.status.code(), output }
}

fn mode_of(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
}

#[tokio::test]
async fn a_root_run_cannot_change_modes_owners_or_times_in_the_state_directory() {
    let state = state();
    let sandbox = boxed(&state);
    let key = state.path().join("output.key");
    let before = std::fs::metadata(&key).unwrap();
    // Each attempt on the key and on the directory itself; `stat` shows what the run sees there.
    let script = r#"for f in "$STATE/output.key" "$STATE"; do
  chmod 644 "$f" && echo "CHMOD $f"
  chown 65534 "$f" && echo "CHOWN $f"
  touch -m -d @0 "$f" && echo "TOUCHED $f"
done
ls -a "$STATE"; stat -c 'seen %a %F' "$STATE""#;
    let r = run_as_root(&sandbox, 20, script, &[("STATE", state.path().display().to_string())]).await;
    assert!(
        !r.output.contains("CHMOD") && !r.output.contains("CHOWN") && !r.output.contains("TOUCHED"),
        "{}",
        r.output
    );
    assert!(!r.output.contains("output.key "), "nothing in the state directory is seen: {}", r.output);
    assert!(r.output.contains("seen 0 directory"), "an empty directory of mode 0 hides it: {}", r.output);
    let after = std::fs::metadata(&key).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!((after.mode(), after.uid(), after.mtime()), (before.mode(), before.uid(), before.mtime()));
    assert_eq!(mode_of(state.path()), 0o700);
    // The run's mounts were its own: none is left on the host.
    let host = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!host.contains(state.path().to_str().unwrap()) && !host.contains("/run/airlock-box"), "{host}");
}

#[tokio::test]
async fn a_root_service_cannot_set_setuid_on_its_release_or_outside_its_working_directory() {
    let state = state();
    let sandbox = boxed(&state);
    let releases = tempfile::tempdir().unwrap();
    std::fs::set_permissions(releases.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let release = releases.path().join("r");
    std::fs::create_dir_all(release.join("bin")).unwrap();
    // Outside both its release and its working directory: a root-owned file, as a host's.
    let elsewhere = releases.path().join("host-tool");
    std::fs::write(&elsewhere, "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&elsewhere, std::fs::Permissions::from_mode(0o755)).unwrap();
    let script = format!(
        "#!/bin/sh\nchmod u+s bin/svc && echo SETUID-RELEASE\nchmod 4755 {elsewhere} && echo SETUID-ELSEWHERE\nchown 65534 {elsewhere} && echo CHOWN-ELSEWHERE\necho x > \"$HOME/tool\" && chmod 4755 \"$HOME/tool\" && echo SETUID-IN-HOME\nid -u\n",
        elsewhere = elsewhere.display()
    );
    std::fs::write(release.join("bin/svc"), script).unwrap();
    std::fs::set_permissions(release.join("bin/svc"), std::fs::Permissions::from_mode(0o555)).unwrap();
    let cell = CellName::service(&"cd".repeat(32), "svc").unwrap();
    let program = release.join("bin/svc");
    let launch = ServiceLaunch {
        cell: &cell,
        program: program.as_os_str(),
        args: &[],
        env: &[],
        release_dir: &release,
        cwd: &release,
        limits: &RunLimits::default(),
        run_as: RunAs::Root,
    };
    let (mut cmd, boxed) = sandbox.prepare_service(&launch).unwrap();
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output()).await.unwrap().unwrap();
    boxed.dispose();
    let output = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().last(), Some("0"), "it ran as root: {output}");
    assert!(!output.contains("SETUID-RELEASE") && !output.contains("-ELSEWHERE"), "{output}");
    // Its working directory is its own, but `nosuid`: the bit it sets there gives nothing.
    assert!(output.contains("SETUID-IN-HOME"), "{output}");
    assert_eq!((mode_of(&release.join("bin/svc")), mode_of(&elsewhere)), (0o555, 0o755));
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&elsewhere).unwrap().uid(), 0);
}

#[tokio::test]
async fn a_root_run_writes_chmods_and_chowns_in_its_working_directory_and_uses_its_devices() {
    let state = state();
    let sandbox = boxed(&state);
    let script = r#"echo data > f && chmod 640 f && chown 65534:65534 f && stat -c 'mine %a %u:%g' f
mkdir d && echo y > d/g && touch -d @0 d/g && echo DIR-OK
echo x > "$TMPDIR/t" && echo TMP-OK
echo quiet > /dev/null && head -c 4 /dev/urandom | wc -c
echo to-stderr > /dev/stderr"#;
    let r = run_as_root(&sandbox, 21, script, &[]).await;
    assert!(r.output.contains("mine 640 65534:65534"), "{}", r.output);
    assert!(r.output.contains("DIR-OK") && r.output.contains("TMP-OK"), "{}", r.output);
    assert!(r.output.lines().any(|l| l.trim() == "4") && r.output.contains("to-stderr"), "{}", r.output);
    assert_eq!(r.code, Some(0), "{}", r.output);
}

#[tokio::test]
async fn a_root_run_cannot_read_the_hosts_password_hashes_or_private_keys() {
    let state = state();
    let sandbox = boxed(&state);
    assert!(Path::new("/etc/shadow").exists(), "the test host has a shadow file");
    let script = "for f in /etc/shadow /etc/gshadow /etc/shadow- /etc/gshadow- /etc/ssh/ssh_host_ed25519_key /etc/ssl/private/*; do
  [ -e \"$f\" ] || continue
  head -c 1 \"$f\" > /dev/null && echo \"READ $f\"
  # To the mode it has: what matters is whether the call is allowed.
  chmod \"$(stat -c %a \"$f\")\" \"$f\" && echo \"CHMOD $f\"
done
ls /etc/ssl/private; head -c 3 /etc/passwd; echo; echo DONE";
    let r = run_as_root(&sandbox, 22, script, &[]).await;
    assert!(!r.output.contains("READ ") && !r.output.contains("CHMOD "), "{}", r.output);
    assert!(r.output.contains("roo") && r.output.contains("DONE"), "the rest of /etc reads: {}", r.output);
    assert!(!r.output.contains("snakeoil"), "the host's TLS keys are hidden: {}", r.output);
    assert_eq!(mode_of(Path::new("/etc/shadow")) & 0o004, 0);
}

#[tokio::test]
async fn a_root_run_makes_no_unix_socket_but_a_socketpair_and_binds_a_low_port() {
    let state = state();
    let sandbox = boxed(&state);
    // A low port free on the host, for the run to bind (`CAP_NET_BIND_SERVICE` is kept).
    let port = (80..1024).find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok()).unwrap();
    let script = r#"/usr/bin/python3 - <<'PY'
import ctypes, errno, os, socket
def attempt(what, fn):
    try:
        fn()
        print("MADE", what)
    except OSError as e:
        print("REFUSED", what, errno.errorcode.get(e.errno))
attempt("unix-stream", lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
attempt("unix-dgram", lambda: socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC))
attempt("pair-stream", lambda: socket.socketpair())
attempt("pair-seqpacket", lambda: socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET))
attempt("pair-dgram", lambda: socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM))
a, b = socket.socketpair()
a.sendall(b"ping"); print("PAIR", b.recv(4).decode())
s = socket.socket(); s.bind(("127.0.0.1", int(os.environ["PORT"]))); print("BOUND", s.getsockname()[1])
libc = ctypes.CDLL(None, use_errno=True)
# io_uring_setup(1, NULL) and open_by_handle_at(AT_FDCWD, NULL, 0): EFAULT if the kernel looked.
for name, nr, args in [("io_uring_setup", 425, (1, None)), ("open_by_handle_at", 304, (-100, None, 0)), ("keyctl", 250, (0, -4, 0))]:
    r = libc.syscall(nr, *args)
    print("CALL", name, r, errno.errorcode.get(ctypes.get_errno()))
PY"#;
    let r = run_as_root(&sandbox, 23, script, &[("PORT", port.to_string())]).await;
    for refused in ["unix-stream", "unix-dgram", "pair-dgram"] {
        assert!(r.output.contains(&format!("REFUSED {refused} EACCES")), "{refused}: {}", r.output);
    }
    assert!(r.output.contains("MADE pair-stream") && r.output.contains("MADE pair-seqpacket"), "{}", r.output);
    assert!(r.output.contains("PAIR ping") && r.output.contains(&format!("BOUND {port}")), "{}", r.output);
    for call in ["io_uring_setup", "open_by_handle_at", "keyctl"] {
        assert!(r.output.contains(&format!("CALL {call} -1 EACCES")), "{call}: {}", r.output);
    }
    // The box user is not filtered: its uid alone keeps it from the host's root-only sockets.
    let r = run(
        &sandbox,
        24,
        "/usr/bin/python3 -c 'import socket; socket.socket(socket.AF_UNIX); print(\"MADE\")'",
        &[],
        &RunLimits::default(),
    )
    .await;
    assert!(r.output.contains("MADE"), "{}", r.output);
}

#[tokio::test]
async fn a_root_run_without_its_mount_namespace_or_filter_does_not_start() {
    let state = state();
    let mut sandbox = boxed(&state);
    // An appliance without CAP_SYS_ADMIN (in a container, say), or on another architecture.
    sandbox.root_runs = Err("the appliance cannot give a root run a mount namespace of its own".to_owned());
    let env = BTreeMap::new();
    let err = sandbox.prepare(id(25), b"echo RAN", &env, &RunLimits::default(), RunAs::Root).unwrap_err();
    assert!(err.contains("does not run as root") && err.contains("mount namespace"), "{err}");
    assert!(!sandbox.workdir(id(25)).exists());
    let r = run(&sandbox, 26, "echo RAN", &[], &RunLimits::default()).await;
    assert!(r.output.contains("RAN"), "{}", r.output);
}

// The usage watch, on real boxes: each pass is run by hand, so the tests need not wait for
// the watcher's interval.

/// A box as an appliance running as root builds it, held to `disk`.
fn watched(state: &tempfile::TempDir, disk: BoxDisk) -> Sandbox {
    let sandbox = Sandbox::open(state.path(), None, &disk).unwrap();
    assert!(sandbox.cells.is_some(), "cgroup v2 is available to the tests");
    sandbox
}

/// Starts `script` in box `n` and waits until it says `ready`.
async fn start_box(sandbox: &Sandbox, n: u8, script: &str) -> (tokio::process::Child, Boxed) {
    use tokio::io::AsyncBufReadExt;
    let (mut cmd, boxed) =
        sandbox.prepare(id(n), script.as_bytes(), &BTreeMap::new(), &RunLimits::default(), sandbox.run_as).unwrap();
    let mut child = cmd.spawn().unwrap();
    let mut out = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(20), out.next_line()).await.unwrap().unwrap();
    assert_eq!(line.as_deref(), Some("ready"), "box {n}");
    (child, boxed)
}

/// Whether the box's process was killed (by SIGKILL, as `cgroup.kill` does), waiting briefly.
async fn killed(child: &mut tokio::process::Child) -> bool {
    use std::os::unix::process::ExitStatusExt;
    match tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
        Ok(status) => status.unwrap().signal() == Some(9),
        Err(_) => false,
    }
}

/// Ends a box the watch left alone.
async fn end(mut child: tokio::process::Child, boxed: Boxed) {
    assert!(child.try_wait().unwrap().is_none(), "the box still runs");
    boxed.dispose();
    let _ = child.wait().await;
}

#[tokio::test]
async fn a_box_holding_too_many_files_is_killed_and_one_within_its_limit_runs_on() {
    let state = state();
    let sandbox = watched(&state, BoxDisk { box_files: 50, ..BoxDisk::default() });
    let many = "mkdir d; i=0; while [ $i -lt 100 ]; do : > d/f$i; i=$((i+1)); done; echo ready; sleep 60";
    let (mut child, boxed) = start_box(&sandbox, 40, many).await;
    let (calm, calm_box) = start_box(&sandbox, 41, "touch a b c; echo ready; sleep 60").await;
    // The walk stops one entry past the limit: bounded work, whatever the box holds.
    let over = Overrun::Files { files: 51, limit: 50 };
    assert_eq!(sandbox.boxes.pass(), vec![(id(40).to_string(), over.clone())]);
    assert!(killed(&mut child).await, "killed through its cell");
    assert_eq!(boxed.overrun(), Some(over));
    assert_eq!(calm_box.overrun(), None);
    boxed.dispose();
    assert!(sandbox.boxes.pass().is_empty(), "a disposed box is not judged again");
    end(calm, calm_box).await;
}

#[tokio::test]
async fn a_deleted_file_a_box_still_holds_open_counts_against_its_disk_limit() {
    let state = state();
    let sandbox = watched(&state, BoxDisk { box_bytes: 1 << 20, ..BoxDisk::default() });
    let script = "exec 3>big; head -c 2097152 /dev/zero >&3; rm big; echo ready; sleep 60";
    let (mut child, boxed) = start_box(&sandbox, 42, script).await;
    let bytes = usage::walk(boxed.workdir(), 1000, u64::MAX, &mut Default::default()).bytes;
    assert!(bytes < 1 << 20, "its directory holds almost nothing: {bytes}");
    let killed_for = sandbox.boxes.pass();
    let [(cell, Overrun::Disk { bytes, limit })] = killed_for.as_slice() else { panic!("{killed_for:?}") };
    assert_eq!((cell.as_str(), *limit), (id(42).to_string().as_str(), 1 << 20));
    assert!(*bytes >= 2 << 20, "the 2 MiB it deleted but holds: {bytes}");
    assert!(killed(&mut child).await);
    boxed.dispose();
}

#[tokio::test]
async fn below_the_reserve_the_box_holding_the_most_is_killed_and_then_the_rest_runs_on() {
    let state = state();
    let disk = BoxDisk { box_bytes: 64 << 20, box_files: 100_000, reserve_bytes: Some(8 << 20) };
    let sandbox = watched(&state, disk);
    // The boxes' working directories on a 16 MiB disk of their own.
    let _disk = crate::testing::SmallDisk::mount(sandbox.work_root().to_owned(), "16m");
    let (mut big, big_box) = start_box(&sandbox, 43, "head -c 6291456 /dev/zero > f; echo ready; sleep 60").await;
    let (small, small_box) = start_box(&sandbox, 44, "head -c 3145728 /dev/zero > f; echo ready; sleep 60").await;
    // 9 MiB held, 7 MiB free: below the 8 MiB reserve. Only the biggest goes.
    let killed_for = sandbox.boxes.pass();
    let [(cell, Overrun::Reserve { free, reserve, bytes })] = killed_for.as_slice() else { panic!("{killed_for:?}") };
    assert_eq!(*cell, id(43).to_string());
    assert!(*free < *reserve && *bytes >= 6 << 20, "{killed_for:?}");
    assert!(killed(&mut big).await);
    big_box.dispose();
    // Its space is back: the other box holds 3 MiB, past 1/8 of the reserve, but the reserve is intact.
    assert!(sandbox.boxes.pass().is_empty());
    assert_eq!(small_box.overrun(), None);
    end(small, small_box).await;
}

#[tokio::test]
async fn boxes_holding_nothing_significant_are_not_killed_when_the_disk_is_full_for_other_reasons() {
    let state = state();
    let disk = BoxDisk { box_bytes: 64 << 20, box_files: 100_000, reserve_bytes: Some(8 << 20) };
    let sandbox = watched(&state, disk);
    let disk = crate::testing::SmallDisk::mount(sandbox.work_root().to_owned(), "16m");
    // Something else (not vendor code) fills the disk to 12 MiB.
    std::fs::write(disk.0.join("not-a-box"), vec![7u8; 12 << 20]).unwrap();
    let (idle, idle_box) = start_box(&sandbox, 45, "echo ready; sleep 60").await;
    // Half a MiB: under 1/8 of the reserve.
    let (some, some_box) = start_box(&sandbox, 46, "head -c 524288 /dev/zero > f; echo ready; sleep 60").await;
    assert!(sandbox.boxes.pass().is_empty(), "the disk is nearly full, but not by a box");
    end(idle, idle_box).await;
    end(some, some_box).await;
}

#[tokio::test]
async fn where_the_cell_cannot_cap_them_memory_and_threads_are_summed_over_the_boxs_processes() {
    let state = state();
    let sandbox = watched(&state, BoxDisk::default());
    let (mut child, boxed) =
        start_box(&sandbox, 47, "sleep 60 & sleep 60 & sleep 60 & sleep 60 & echo ready; wait").await;
    let cell = boxed.cell.clone().unwrap();
    // This host's cells have the pids and memory controllers; one without them is what the
    // watch sees when the box is judged with caps.
    let caps = usage::Caps { memory_bytes: Some(u64::MAX), threads: Some(u64::MAX) };
    let measured = usage::Watched::new(cell.clone(), boxed.workdir().to_owned(), caps);
    let usage = usage::measure(&measured, &usage::Watch::on(&BoxDisk::default(), u64::MAX));
    assert!(usage.threads >= 5, "the shell and four sleeps: {usage:?}");
    let one = std::fs::read_to_string(format!("/proc/{}/status", child.id().unwrap())).unwrap();
    let rss = one.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap().split_whitespace().next().unwrap();
    let rss: u64 = rss.parse::<u64>().unwrap() * 1024;
    assert!(usage.memory_bytes > rss, "summed, not one process's: {usage:?} vs {rss}");
    // Held to 3 threads, the box goes.
    let watched = Arc::new(usage::Watched::new(
        cell,
        boxed.workdir().to_owned(),
        usage::Caps { memory_bytes: None, threads: Some(3) },
    ));
    sandbox.boxes.add(&watched);
    let killed_for = sandbox.boxes.pass();
    assert!(
        matches!(killed_for.as_slice(), [(_, Overrun::Threads { threads, limit: 3 })] if *threads >= 5),
        "{killed_for:?}"
    );
    assert!(killed(&mut child).await);
    assert!(watched.overrun().is_some());
    watched.retire();
    // And held to less memory than its processes hold together.
    boxed.dispose();
    let (mut child, boxed) = start_box(&sandbox, 48, "sleep 60 & sleep 60 & echo ready; wait").await;
    let watched = Arc::new(usage::Watched::new(
        boxed.cell.clone().unwrap(),
        boxed.workdir().to_owned(),
        usage::Caps { memory_bytes: Some(rss), threads: None },
    ));
    sandbox.boxes.add(&watched);
    let killed_for = sandbox.boxes.pass();
    assert!(matches!(killed_for.as_slice(), [(_, Overrun::Memory { .. })]), "{killed_for:?}");
    assert!(killed(&mut child).await);
    watched.retire();
    boxed.dispose();
}

#[tokio::test]
async fn the_watch_never_kills_a_cell_its_box_has_left() {
    let state = state();
    let sandbox = watched(&state, BoxDisk { box_files: 1, ..BoxDisk::default() });
    let (child, boxed) = start_box(&sandbox, 49, "touch a b; echo ready; sleep 60").await;
    let watched = boxed.watched.clone().unwrap();
    // Its run disposes of it between a pass's measuring and its kill (here, only retired, so
    // its cell is still there to show the kill does not reach it): the kill is a no-op.
    watched.retire();
    assert!(!watched.kill(Overrun::Files { files: 3, limit: 1 }));
    assert!(sandbox.boxes.pass().is_empty(), "nor is it judged again");
    assert_eq!(boxed.overrun(), None);
    end(child, boxed).await;
}
