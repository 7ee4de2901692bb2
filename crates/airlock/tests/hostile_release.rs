//! A vendor gone hostile ships a release, end to end: the real control plane and appliance
//! (running as root, as CI does), a customer who approves the deploy (root service included)
//! and a task, as a customer who trusts the vendor would.
//! Its services (one as the box user, one as root), an exec health check and a task probe
//! their boxes from the inside (`hostile/probe.py`): the appliance's state directory, admin
//! socket, config and customer files; the releases root, other releases, logs and statements;
//! the appliance's and siblings' environments, memory, descriptors and signals; setuid and
//! capabilities; the gateway without the appliance's key; System V IPC; and its limits (a fork
//! bomb, memory, open files, file size) while the test checks that the appliance and the web
//! service serve on. Every attempt fails, and afterwards the appliance's keys and audit, the
//! releases root and the previous release are as they were, and the next deploy works.
// Test helpers panic to report failure.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use airlock_testkit::e2e::{Deployment, ReleasesDir, free_port, ok, serves};
use airlock_testkit::process::wait_for;
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_airlock");

const POLICY: &str = "version = 1\nserial = 1\nphases = [\"observe\", \"deploy\", \"operate\"]\n";

/// The probes the hostile release runs; see its docstring.
const PROBE: &str = include_str!("hostile/probe.py");

/// The web service's secret: no probe may see it.
const CANARY: &str = "canary-5ec2e7-hostile";

/// The box user uids an appliance running as root picks from (`sandbox::user`).
const BOX_UIDS: std::ops::RangeInclusive<u32> = 61184..=65519;

/// The `web` service every release here has: python's http.server on `port`, with a secret.
fn web_service(port: u16, secret: &Path) -> String {
    format!(
        r#"[[service]]
name = "web"
command = "bin/web"
env = {{ PORT = "{port}" }}
secrets = {{ WEB_SECRET = "file:{secret}" }}
stop_timeout_secs = 2
health = [{{ probe = {{ http = {{ path = "/", port = {port} }} }}, interval_secs = 2, timeout_secs = 2 }}]
"#,
        secret = secret.display()
    )
}

fn write_web(dir: &Path, content: &str) {
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::create_dir_all(dir.join("www")).unwrap();
    std::fs::write(
        dir.join("bin/web"),
        "#!/bin/sh\n[ -n \"$WEB_SECRET\" ] || exit 3\nexec python3 -m http.server \"$PORT\" --bind 127.0.0.1 --directory www\n",
    )
    .unwrap();
    std::fs::write(dir.join("www/index.html"), content).unwrap();
}

fn push(d: &Deployment, dir: &Path, key: &Path) -> String {
    let out = d.server.ok(&["release", "push", dir.to_str().unwrap(), "--key", key.to_str().unwrap()]);
    out.split_whitespace().nth(2).unwrap().to_owned()
}

/// Asks for the deploy of `release`, approves it as the customer, and waits for its end.
fn deploy(d: &Deployment, release: &str) -> Value {
    let out = d.server.ok(&["deploy", release, "--env", &d.env, "--reason", "ship it"]);
    let id = out.lines().next().unwrap().trim().to_owned();
    d.wait_state(&id, "awaiting_approval");
    d.approve(&id);
    wait_for(Duration::from_secs(120), &format!("deploy {id} to end"), || {
        let op = d.show(&id);
        (op["state"] == "executed").then_some(op)
    })
}

/// Every file under `dir` (two levels), as paths.
fn files_under(dir: &Path, depth: u32) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if entry.file_type().unwrap().is_dir() {
            if depth > 0 {
                out.extend(files_under(&path, depth - 1));
            }
        } else {
            out.push(path);
        }
    }
    out
}

/// The content, mode and owner of each file: what the attack must leave as it was.
fn fingerprint(files: &[PathBuf]) -> BTreeMap<PathBuf, (String, u32, u32, u32)> {
    files
        .iter()
        .filter_map(|f| {
            let meta = std::fs::symlink_metadata(f).ok()?;
            let content = if meta.file_type().is_symlink() {
                std::fs::read_link(f).unwrap().display().to_string()
            } else if meta.is_file() {
                airlock_core::operation::sha256_hex(&std::fs::read(f).ok()?)
            } else {
                String::new()
            };
            Some((f.clone(), (content, meta.mode(), meta.uid(), meta.gid())))
        })
        .collect()
}

/// The probes' lines that say an attempt got through.
fn got_through(report: &str) -> Vec<&str> {
    report.lines().filter(|l| l.contains("GOT-THROUGH")).collect()
}

fn blocked(report: &str) -> usize {
    report.lines().filter(|l| l.starts_with("BLOCKED ")).count()
}

/// System V shared memory segments in the host's IPC namespace owned by a box uid.
fn box_owned_shm() -> Vec<String> {
    let table = std::fs::read_to_string("/proc/sysvipc/shm").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter(|l| l.split_whitespace().nth(7).and_then(|u| u.parse().ok()).is_some_and(|u| BOX_UIDS.contains(&u)))
        .map(|l| l.split_whitespace().nth(1).unwrap_or("").to_owned())
        .collect()
}

/// Removes, however the test ends, what a box would leave in the host's IPC namespace if the
/// appliance did not give each box one of its own.
struct SweepBoxSegments;

impl Drop for SweepBoxSegments {
    fn drop(&mut self) {
        for id in box_owned_shm() {
            let _ = std::process::Command::new("ipcrm").args(["-m", &id]).status();
        }
    }
}

/// Processes whose command line contains `needle`.
fn processes_running(needle: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).replace('\0', " ").contains(needle))
        })
        .collect()
}

#[test]
fn a_hostile_release_cannot_reach_past_its_boxes_and_the_appliance_serves_on() {
    assert!(Path::new("/usr/bin/python3").exists(), "the release's services are python3");
    let _sweep = SweepBoxSegments;
    let releases = ReleasesDir::new();
    let (root, config, run_args) = (&releases.root, &releases.config, releases.run_args());
    let mut d = Deployment::start_with(BIN, POLICY, &run_args);
    let tmp = d.server.dir.path().to_owned();
    let key = d.register_release_key(BIN);
    let secret = releases.dir.path().join("web-secret");
    std::fs::write(&secret, CANARY).unwrap();
    let port = free_port();

    // 1. A plain release first: the one the hostile release would tamper with.
    let v1 = tmp.join("shop-v1");
    write_web(&v1, "shop v1");
    std::fs::write(
        v1.join("airlock.toml"),
        format!("name = \"shop\"\nversion = \"1.0.0\"\n\n{}", web_service(port, &secret)),
    )
    .unwrap();
    let v1_digest = push(&d, &v1, &key);
    let done = deploy(&d, "shop@1.0.0");
    assert_eq!(done["exit_code"], 0, "{done}");
    serves(port, "shop v1");

    // 2. The hostile release: `web` serves on, `attacker` (the box user) and `rooty` (root,
    // approved) probe and exhaust, an exec health check and a task probe too.
    let report_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let report_port = report_listener.local_addr().unwrap().port();
    let check_report = std::thread::spawn(move || {
        let (mut conn, _) = report_listener.accept().unwrap();
        let mut report = String::new();
        conn.read_to_string(&mut report).unwrap();
        // Dropping the listener: the checks after this one find no one to report to and pass.
        report
    });
    let state_files: Vec<PathBuf> = files_under(&d.state, 2);
    let v1_dir = root.join(&v1_digest);
    let release_paths = vec![
        root.join("current"),
        root.join("deploy-state.json"),
        v1_dir.clone(),
        v1_dir.join("bin/web"),
        root.join(format!("{v1_digest}.statement.json")),
        root.join(".logs"),
        root.join(".logs/web.log"),
    ];
    let customer_files = vec![
        d.customer.join("customer.pub"),
        d.customer.join("customer.key"),
        tmp.join("policy.json"),
        config.clone(),
        secret.clone(),
    ];
    let gateway = d.server.gateway.rsplit("://").next().unwrap().trim_end_matches('/').to_owned();
    let targets = json!({
        "state_dir": d.state,
        "state_files": state_files,
        "admin_socket": d.state.join("admin.sock"),
        "customer_files": customer_files,
        "releases_root": root,
        "release_paths": release_paths,
        "other_releases": [v1_dir],
        "own_digest_guess": v1_digest,
        "appliance_pid": d.appliance.pid(),
        "gateway": gateway,
        "report_port": report_port,
        "process_limit": 256,
    });
    let v2 = tmp.join("shop-v2");
    write_web(&v2, "shop v2");
    std::fs::write(v2.join("targets.json"), serde_json::to_vec_pretty(&targets).unwrap()).unwrap();
    std::fs::write(v2.join("bin/probe"), PROBE).unwrap();
    // Up until the attacker is done with its limits; then it exits at once, every time it is
    // started again, as soon as a release may ask (`MIN_BACKOFF_MS`).
    std::fs::write(
        v2.join("bin/crasher"),
        "#!/bin/sh\nwhile :; do grep -qx hostile-go /proc/[0-9]*/comm 2>/dev/null && exit 1; sleep 0.5; done\n",
    )
    .unwrap();
    // Shipped setuid root and executable by all: install must make it a plain file.
    std::fs::write(v2.join("bin/suid"), "#!/bin/sh\nid\n").unwrap();
    std::fs::set_permissions(v2.join("bin/suid"), std::fs::Permissions::from_mode(0o6777)).unwrap();
    // A link inside the release: it arrives as a file, never as a link.
    std::os::unix::fs::symlink("probe", v2.join("bin/link")).unwrap();
    std::fs::write(
        v2.join("airlock.toml"),
        format!(
            r#"name = "shop"
version = "2.0.0"

{web}
[[service]]
name = "attacker"
command = "bin/probe"
args = ["attacker"]
stop_timeout_secs = 2
health = [{{ probe = {{ exec = {{ command = "bin/probe", args = ["check"] }} }}, interval_secs = 60, timeout_secs = 60 }}]

[[service]]
name = "rooty"
command = "bin/link"
args = ["rooty"]
run_as_root = true
stop_timeout_secs = 2

[[service]]
name = "spewer"
command = "bin/probe"
args = ["spewer"]
stop_timeout_secs = 2

[[service]]
name = "crasher"
command = "bin/crasher"
stop_timeout_secs = 2
restart = {{ policy = "always", initial_backoff_ms = 100, max_backoff_ms = 100 }}

[[task]]
name = "probe"
command = "bin/probe"
args = ["task"]
"#,
            web = web_service(port, &secret)
        ),
    )
    .unwrap();
    let before_state = fingerprint(&state_files.iter().filter(|f| !is_appended(f)).cloned().collect::<Vec<_>>());
    let v1_files: Vec<PathBuf> = files_under(&v1_dir, 3)
        .into_iter()
        .chain([root.join(format!("{v1_digest}.statement.json")), config.clone(), secret.clone()])
        .collect();
    let before_v1 = fingerprint(&v1_files);
    let v2_digest = push(&d, &v2, &key);
    let done = deploy(&d, "shop@2.0.0");
    assert_eq!(done["exit_code"], 0, "the hostile release deployed: {done}\n{}", d.appliance.log());
    serves(port, "shop v2");

    // 3. While the attacker holds its fork bomb and every descriptor it may open, the web
    // service serves, and the appliance answers its customer and its control plane.
    let log_of = |service: &str| std::fs::read_to_string(root.join(format!(".logs/{service}.log"))).unwrap_or_default();
    wait_for(Duration::from_secs(90), "the attacker to hold its limits", || {
        log_of("attacker").contains("EXHAUST-HOLDING").then_some(())
    });
    serves(port, "shop v2");
    let status = ok(d.local(&["appliance", "phase", "status"]), "phase status during the attack");
    assert!(status.contains("deploy"), "{status}");
    let deployment: Value = serde_json::from_str(&d.server.ok(&["appliance", "deployment", &d.appliance_id])).unwrap();
    assert_eq!(deployment["current"]["version"], "2.0.0", "{deployment}");
    wait_for(Duration::from_secs(60), "the attacker to let go", || {
        log_of("attacker").contains("EXHAUST-DONE").then_some(())
    });
    // The crash loop: the web service serves, the appliance answers, and what it spends on
    // restarting the crasher stays a fraction of a core.
    let (ticks, restarts) = (cpu_ticks(d.appliance.pid()), crasher_restarts(&d));
    let started = std::time::Instant::now();
    std::thread::sleep(Duration::from_secs(10));
    serves(port, "shop v2");
    ok(d.local(&["appliance", "phase", "status"]), "phase status during the crash loop");
    let spent = (cpu_ticks(d.appliance.pid()) - ticks) as f64 / 100.0 / started.elapsed().as_secs_f64();
    let restarted = crasher_restarts(&d) - restarts;
    eprintln!("crash loop: {restarted} restarts in {:?}, the appliance used {spent:.2} of a core", started.elapsed());
    wait_for(Duration::from_secs(60), "the root service's probes", || {
        log_of("rooty").contains("PROBES-DONE").then_some(())
    });
    let check = check_report.join().unwrap();

    // 4. A task of the hostile release, approved like any Operate operation.
    let out = d.server.ok(&["task", "shop@2.0.0", "probe", "--env", &d.env, "--reason", "routine"]);
    let task = out.lines().next().unwrap().trim().to_owned();
    d.wait_state(&task, "awaiting_approval");
    d.approve(&task);
    wait_for(Duration::from_secs(120), "the task to run", || (d.show(&task)["state"] == "executed").then_some(()));
    let task_output = ok(d.local(&["appliance", "ops", "output", &task]), "ops output");

    // Install made every artifact a plain, read-only file of root's (no setuid, no link, no
    // capability), and no box changed that since.
    let v2_dir = root.join(&v2_digest);
    for f in files_under(&v2_dir, 3) {
        let meta = std::fs::symlink_metadata(&f).unwrap();
        let what = (meta.is_file(), meta.mode() & 0o7777, meta.uid(), meta.gid());
        assert_eq!(what, (true, 0o555, 0, 0), "{} is a plain file, 0555, root's", f.display());
    }

    // Every attempt of every box failed.
    let reports =
        [("attacker", log_of("attacker")), ("rooty", log_of("rooty")), ("check", check), ("task", task_output)];
    for (who, report) in &reports {
        eprintln!("{who}: {} attempts blocked", blocked(report));
        assert!(report.contains("PROBES-DONE"), "{who} ran its probes to the end:\n{report}");
        assert!(got_through(report).is_empty(), "{who} got through:\n{}", got_through(report).join("\n"));
        assert!(blocked(report) >= 100, "{who} tried: {} attempts blocked\n{report}", blocked(report));
        assert!(!report.contains(CANARY), "{who} read the web service's secret");
    }
    let attacker = &reports[0].1;
    assert!(attacker.contains("exhaust:fork-bomb") && attacker.contains("exhaust:open-files"), "{attacker}");
    assert!(reports[1].1.contains("privileges:uid 0 "), "rooty ran as root: {}", reports[1].1);

    // No System V IPC object the boxes made lives in the host's namespace.
    let leaked = box_owned_shm();
    assert!(leaked.is_empty(), "shared memory segments of box users outlive their boxes: {leaked:?}");

    // 5. Nothing the appliance keeps changed: keys, pinned keys, policy, credentials, the
    // artifacts, the previous release, the config and the secret.
    let after_state = fingerprint(&before_state.keys().cloned().collect::<Vec<_>>());
    assert_eq!(after_state, before_state, "the state directory");
    assert_eq!(fingerprint(&v1_files), before_v1, "the previous release, its statement, the config, the secret");
    assert_eq!(std::fs::read_link(root.join("current")).unwrap(), Path::new(&v2_digest));
    let deploy_state: Value = serde_json::from_slice(&std::fs::read(root.join("deploy-state.json")).unwrap()).unwrap();
    assert_eq!(
        (deploy_state["current"].as_str(), deploy_state["previous"].as_str()),
        (Some(&*v2_digest), Some(&*v1_digest))
    );
    assert!(!root.join("planted-by-vendor").exists() && !root.join("current.new").exists());
    let audit = d.state.join("audit.jsonl");
    ok(d.server.cli(&["audit", "verify", "--file", audit.to_str().unwrap()]), "audit verify");
    assert!(d.audited("phase.enable").is_empty(), "no box switched a phase");
    assert!(d.appliance.exited().is_none(), "{}", d.appliance.log());
    assert!(!d.appliance.log().contains(CANARY) && !d.server.log().contains(CANARY));

    // 6. The customer's appliance goes on: the plain release is deployed again, and nothing of
    // the hostile one is left running.
    let done = deploy(&d, "shop@1.0.0");
    assert_eq!(done["exit_code"], 0, "{done}");
    serves(port, "shop v1");
    wait_for(Duration::from_secs(20), "the hostile release's processes to be gone", || {
        processes_running("/bin/probe").is_empty().then_some(())
    });
    assert!(box_owned_shm().is_empty());
    d.appliance.stop();
}

/// CPU time (user and system, in clock ticks) process `pid` has used, its threads included.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_name = stat.rsplit(')').next().unwrap();
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Fields 14 and 15 of stat(5): the 12th and 13th after the name.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// How often the crasher service was started again, as the control plane last heard.
fn crasher_restarts(d: &Deployment) -> u64 {
    let s: Value = serde_json::from_str(&d.server.ok(&["appliance", "deployment", &d.appliance_id])).unwrap();
    s["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == "crasher")
        .and_then(|x| x["restarts"].as_u64())
        .unwrap_or(0)
}

/// State files the appliance appends to as it works (the audit log and its head, operations):
/// they change by design; `audit verify` speaks for them.
fn is_appended(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    name.starts_with("audit.jsonl")
        || name.ends_with(".json") && !name.contains("policy")
        || path.components().any(|c| c.as_os_str() == "ops" || c.as_os_str() == "artifacts")
        || name.contains("nonce")
        || name.contains("preapproval")
}

/// A hole closed: Landlock governs opening, writing, linking and removing files, not changing
/// their modes, owners, extended attributes or times, and a root run keeps `CAP_CHOWN` and
/// `CAP_FOWNER` (and owns every file of root's). So a root service (the customer approved
/// `run_as_root`) could `chmod` and `chown` what it cannot open: the state directory and its
/// keys (made readable to every local user), or its own installed release (a setuid-root
/// program any local user can run). It tries to change each to what it already is, since the
/// call succeeding is the hole. Likewise `connect` on a Unix socket by its path is not a
/// Landlock right (ABI 6), and `CAP_DAC_OVERRIDE` passes its modes: a root run would reach any
/// daemon of the host's. And the system roots a box may read (`/etc`, `/opt`, ...) hold
/// root-only files (`/etc/shadow`, host keys) that `CAP_DAC_READ_SEARCH` opens. A root run's
/// mount namespace (read-only but its working directory, the state directory and the host's
/// secrets hidden) and its seccomp filter (no Unix socket) hold each (`sandbox::mounts`,
/// `sandbox::seccomp`).
#[test]
fn a_root_service_cannot_change_modes_or_owners_outside_its_box() {
    let releases = ReleasesDir::new();
    let root = &releases.root;
    let mut d = Deployment::start_with(BIN, POLICY, &releases.run_args());
    let tmp = d.server.dir.path().to_owned();
    let key = d.register_release_key(BIN);
    // A host daemon's socket, root's only (as /var/run/docker.sock or systemd's private one).
    let daemon = tmp.join("daemon");
    std::fs::create_dir(&daemon).unwrap();
    std::fs::set_permissions(&daemon, std::fs::Permissions::from_mode(0o700)).unwrap();
    let socket = daemon.join("control.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600)).unwrap();
    let dir = tmp.join("rooty");
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::write(
        dir.join("airlock.toml"),
        "name = \"rooty\"\nversion = \"1.0.0\"\n\n[[service]]\nname = \"rooty\"\ncommand = \"bin/rooty\"\nrun_as_root = true\n",
    )
    .unwrap();
    let script = format!(
        r#"#!/bin/sh
S={state}
for f in "$S" "$S/output.key" "$S/audit.key" "$S/credentials.pem" "$S/customer-keys.pem"; do
  m=$(stat -c %a "$f" 2>/dev/null) && chmod "$m" "$f" 2>/dev/null && echo "GOT-THROUGH chmod $f" || echo "BLOCKED chmod $f"
  o=$(stat -c %u:%g "$f" 2>/dev/null) && chown "$o" "$f" 2>/dev/null && echo "GOT-THROUGH chown $f" || echo "BLOCKED chown $f"
done
chmod 4555 bin/rooty 2>/dev/null && echo "GOT-THROUGH setuid root on its installed release" || echo "BLOCKED setuid"
head -c 1 /etc/shadow >/dev/null 2>&1 && echo "GOT-THROUGH read the host's /etc/shadow" || echo "BLOCKED shadow"
python3 -c 'import socket, sys
try:
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    print("GOT-THROUGH connected to a root-only socket of the host")
except OSError as e:
    print("BLOCKED connect", e)' {socket}
echo PROBES-DONE
exec sleep 600
"#,
        state = d.state.display(),
        socket = socket.display()
    );
    std::fs::write(dir.join("bin/rooty"), script).unwrap();
    push(&d, &dir, &key);
    let done = deploy(&d, "rooty@1.0.0");
    assert_eq!(done["exit_code"], 0, "{done}");
    let log = root.join(".logs/rooty.log");
    let report = wait_for(Duration::from_secs(30), "the probes", || {
        std::fs::read_to_string(&log).ok().filter(|l| l.contains("PROBES-DONE"))
    });
    d.appliance.stop();
    assert!(got_through(&report).is_empty(), "a root service got through:\n{}", got_through(&report).join("\n"));
    assert_eq!(blocked(&report), 13, "every probe ran and was blocked:\n{report}");
}
