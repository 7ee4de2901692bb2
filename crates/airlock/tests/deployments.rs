//! Deployments through the real binaries: a vendor pushes a signed release with its artifacts,
//! asks for its deploy, the customer approves it on the appliance host; the appliance fetches
//! the artifacts over its own connection, installs beside, starts the service boxed, checks its
//! health, switches; an upgrade whose health check fails is rolled back; the control plane
//! learns the status (and that a secret exists, never its value), and a service's log and
//! metrics only once the customer's policy opts in; the service keeps running, supervised,
//! while the control plane is down and across an appliance restart offline.
// Test helpers panic to report failure.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use airlock_testkit::e2e::{Deployment, ReleasesDir, free_port, serves};
use airlock_testkit::process::wait_for;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_airlock");

const POLICY: &str = "version = 1\nserial = 1\nphases = [\"observe\", \"deploy\", \"operate\"]\n";

/// A canary secret value: it must appear nowhere on the control plane.
const CANARY: &str = "canary-b7e1f0c2d9";
/// What the release's service prints to its log at every start; its script computes the
/// number, so the marker is in no artifact the control plane stores.
const MARKER: &str = "shop-web-log-marker-41234";

/// A release directory: a `web` service serving `content` on `port`, health-checked at `check`,
/// with a secret from `secret_file` in its environment, and a 3 MiB asset (several chunks).
fn write_release(dir: &Path, version: &str, port: u16, content: &str, check: &str, secret_file: &Path) {
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::create_dir_all(dir.join("www")).unwrap();
    std::fs::write(
        dir.join("airlock.toml"),
        format!(
            r#"name = "shop"
version = "{version}"

[[service]]
name = "web"
command = "bin/web"
env = {{ PORT = "{port}" }}
secrets = {{ DB_PASSWORD = "file:{secret}" }}
stop_timeout_secs = 2
restart = {{ policy = "on-failure", initial_backoff_ms = 100, max_backoff_ms = 1000 }}
health = [{{ probe = {{ http = {{ path = "{check}", port = {port} }} }}, interval_secs = 1, timeout_secs = 1 }}]

[[task]]
name = "migrate"
command = "bin/migrate"
"#,
            secret = secret_file.display()
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("bin/web"),
        // It logs a marker and, carelessly, its secret: the value must never go up.
        "#!/bin/sh\n[ -n \"$DB_PASSWORD\" ] || exit 3\necho \"shop-web-log-marker-$((41000 + 234)) db=$DB_PASSWORD\"\n\
         exec python3 -m http.server \"$PORT\" --bind 127.0.0.1 --directory www\n",
    )
    .unwrap();
    std::fs::write(dir.join("bin/migrate"), "#!/bin/sh\necho migrated\n").unwrap();
    std::fs::write(dir.join("www/index.html"), content).unwrap();
    let asset: Vec<u8> = (0..3 * 1024 * 1024u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(dir.join("www/asset.bin"), asset).unwrap();
}

fn deploy(d: &Deployment, release: &str) -> String {
    let out = d.server.ok(&["deploy", release, "--env", &d.env, "--reason", "ship it"]);
    let id = out.lines().next().unwrap().trim().to_owned();
    assert!(id.starts_with("op_"), "{out}");
    id
}

fn status(d: &Deployment) -> Value {
    serde_json::from_str(&d.server.ok(&["appliance", "deployment", &d.appliance_id])).unwrap()
}

#[test]
fn a_release_is_deployed_upgraded_rolled_back_and_keeps_running_offline() {
    assert!(Path::new("/usr/bin/python3").exists(), "the release's service is python3's http.server");
    let releases = ReleasesDir::new();
    let (root, run_args) = (&releases.root, releases.run_args());
    let mut d = Deployment::start_with(BIN, POLICY, &run_args);
    let tmp = d.server.dir.path().to_owned();
    let key = d.register_release_key(BIN);
    let secret = releases.dir.path().join("db-password");
    std::fs::write(&secret, CANARY).unwrap();
    let port = free_port();

    // 1. Push v1, deploy it: it waits for the customer, who approves on the host.
    let v1 = tmp.join("shop-v1");
    write_release(&v1, "1.0.0", port, "shop v1", "/", &secret);
    d.server.ok(&["release", "push", v1.to_str().unwrap(), "--key", key.to_str().unwrap()]);
    let op = deploy(&d, "shop@1.0.0");
    d.wait_state(&op, "awaiting_approval");
    d.approve(&op);
    let done = d.wait_state(&op, "executed");
    assert_eq!(done["exit_code"], 0, "{done}");
    assert_eq!(done["template"], "deploy");
    serves(port, "shop v1");
    let s = status(&d);
    assert_eq!(s["current"]["version"], "1.0.0", "{s}");
    assert_eq!(s["deploy"]["phase"], "deployed", "{s}");
    assert_eq!(s["services"][0]["state"], "healthy", "{s}");
    assert_eq!(s["secrets"][0]["state"], "present", "{s}");
    assert_eq!(d.server.audited("deployment.request", "success").len(), 1);
    assert!(!d.server.audited("deployment.status", "success").is_empty());
    // The customer's policy does not opt in to telemetry: the log stays on the appliance.
    let log = root.join(".logs/web.log");
    wait_for(Duration::from_secs(10), "the marker in the service's log", || {
        std::fs::read_to_string(&log).ok().filter(|l| l.contains(MARKER)).map(|_| ())
    });
    assert!(s["services"][0]["log_tail"].is_null() && s["services"][0]["metrics"].is_null(), "{s}");
    assert!(!s.to_string().contains(MARKER));

    // The service dies: its supervisor starts it again, and the control plane learns of it.
    let killed =
        std::process::Command::new("pkill").args(["-KILL", "-f", &format!("http.server {port}")]).status().unwrap();
    assert!(killed.success(), "the service was running");
    serves(port, "shop v1");
    wait_for(Duration::from_secs(20), "the restart reported", || {
        let s = status(&d);
        (s["services"][0]["restarts"].as_u64() >= Some(1)).then_some(())
    });

    // A task of the running release, approved like any Operate operation.
    let out = d.server.ok(&["task", "shop@1.0.0", "migrate", "--env", &d.env, "--reason", "schema 42"]);
    let task = out.lines().next().unwrap().trim().to_owned();
    d.wait_state(&task, "awaiting_approval");
    d.approve(&task);
    let done = d.wait_state(&task, "executed");
    assert_eq!((done["template"].as_str(), done["exit_code"].as_i64()), (Some("release-task"), Some(0)), "{done}");
    assert_eq!(d.server.audited("release_task.request", "success").len(), 1);

    // Until here nothing of the log reached the control plane; the customer then opts in to
    // service logs and metrics with a signed policy the control plane relays.
    let data = airlock_testkit::e2e::all_bytes(&d.server.data_dir);
    assert!(!airlock_testkit::e2e::contains_bytes(&data, MARKER.as_bytes()), "the log reached the data dir");
    let opted_in = format!(
        "environment = \"{}\"\n{}[telemetry]\nservice_logs = true\nservice_metrics = true\n",
        d.env,
        POLICY.replace("serial = 1", "serial = 2")
    );
    let signed = tmp.join("telemetry-policy.json");
    airlock_testkit::e2e::sign_policy(BIN, &opted_in, &d.customer, &signed);
    d.server.ok(&["env", "policy", "push", &d.env, signed.to_str().unwrap()]);
    let s = wait_for(Duration::from_secs(20), "the log tail and metrics reported", || {
        Some(status(&d)).filter(|s| s["services"][0]["log_tail"].as_str().is_some_and(|t| t.contains(MARKER)))
    });
    let web = &s["services"][0];
    assert!(web["log_tail"].as_str().unwrap().contains(&format!("{MARKER} db=[redacted]")), "{s}");
    assert!(web["metrics"]["memory_current_bytes"].as_u64().is_some_and(|m| m > 0), "{s}");
    let text = d.server.ok(&["appliance", "deployment", &d.appliance_id, "--logs"]);
    assert!(text.contains("web 1.0.0 healthy") && text.contains(&format!("  | {MARKER} db=[redacted]")), "{text}");
    // The customer sees on the host what goes up.
    let local = airlock_testkit::e2e::ok(d.local(&["appliance", "phase", "status"]), "phase status");
    assert!(local.contains("the last 4096 bytes of each log go up (secret values redacted), and metrics"), "{local}");

    // 2. An upgrade whose health check never passes: rolled back, v1 serves again.
    let v2 = tmp.join("shop-v2");
    write_release(&v2, "2.0.0", port, "shop v2", "/missing", &secret);
    d.server.ok(&["release", "push", v2.to_str().unwrap(), "--key", key.to_str().unwrap()]);
    let op = deploy(&d, "shop@2.0.0");
    d.wait_state(&op, "awaiting_approval");
    d.approve(&op);
    let done = d.wait_state(&op, "executed");
    assert_eq!(done["exit_code"], 1, "rolled back: {done}");
    serves(port, "shop v1");
    let s = status(&d);
    assert_eq!(s["current"]["version"], "1.0.0", "{s}");
    assert_eq!(s["deploy"]["phase"], "rolled_back", "{s}");

    // 3. The control plane is down: the service runs on, supervised, and comes back with the
    // appliance after a restart while still offline.
    d.server.stop();
    serves(port, "shop v1");
    d.appliance.stop();
    let mut again = d.server.appliance_proc_with(&d.state, None, &run_args);
    serves(port, "shop v1");
    assert!(again.exited().is_none(), "{}", again.log());
    drop(again);

    // 4. The canary secret value is nowhere the control plane keeps anything, though the
    // service printed it to the log whose tail went up.
    let data = airlock_testkit::e2e::all_bytes(&d.server.data_dir);
    assert!(!airlock_testkit::e2e::contains_bytes(&data, CANARY.as_bytes()), "the secret's value reached the data dir");
    assert!(!d.server.log().contains(CANARY));
    // The tail the customer let go up is served, yet sealed at rest: not in clear on disk.
    assert!(!airlock_testkit::e2e::contains_bytes(&data, MARKER.as_bytes()), "a log tail is in clear at rest");
}

/// A release whose service needs an AWS Secrets Manager secret and an SSM parameter, against
/// moto's server: the deploy is held while the parameter is missing, proceeds once it exists,
/// and neither value reaches the control plane (its database, files, log or audit).
#[test]
fn a_deploy_is_held_until_its_aws_secrets_exist_and_their_values_stay_home() {
    let moto = airlock_testkit::moto::Moto::start();
    let (secret_value, param_value) = ("canary-sm-51c0ffee", "canary-ssm-7e57ab1e");
    moto.boto3(
        serde_json::json!([["secretsmanager", "create_secret", {"Name": "shop/db", "SecretString": secret_value}]]),
    );
    let releases = tempfile::tempdir().unwrap();
    std::fs::set_permissions(releases.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let config = releases.path().join("appliance.toml");
    std::fs::write(
        &config,
        format!(
            "[secrets]\nallow = [\"aws-sm:shop/\", \"aws-ssm:/shop/\"]\n\n[secrets.aws]\nregion = \"us-east-1\"\nsecretsmanager_endpoint = \"{0}\"\nssm_endpoint = \"{0}\"\n",
            moto.url
        ),
    )
    .unwrap();
    let root = releases.path().join("installed");
    let aws = [("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing")];
    let d = Deployment::start_with_env(
        BIN,
        POLICY,
        &["--releases-dir", root.to_str().unwrap(), "--config", config.to_str().unwrap()],
        &aws,
    );
    let tmp = d.server.dir.path().to_owned();
    let key = d.register_release_key(BIN);
    let dir = tmp.join("svc");
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::write(
        dir.join("airlock.toml"),
        r#"name = "svc"
version = "1.0.0"

[[service]]
name = "svc"
command = "bin/svc"
secrets = { DB_PASSWORD = "aws-sm:shop/db", API_TOKEN = "aws-ssm:/shop/api-token" }
"#,
    )
    .unwrap();
    // The service proves it got both values, without printing them.
    std::fs::write(
        dir.join("bin/svc"),
        "#!/bin/sh\n[ -n \"$DB_PASSWORD\" ] && [ -n \"$API_TOKEN\" ] || exit 3\necho \"got ${#DB_PASSWORD} and ${#API_TOKEN} bytes\"\nexec sleep 600\n",
    )
    .unwrap();
    d.server.ok(&["release", "push", dir.to_str().unwrap(), "--key", key.to_str().unwrap()]);
    let op = deploy(&d, "svc@1.0.0");
    d.wait_state(&op, "awaiting_approval");
    d.approve(&op);

    // Held: the control plane sees which reference is missing, and that the other exists.
    let held = wait_for(Duration::from_secs(30), "the deploy held", || {
        Some(status(&d)).filter(|s| s["deploy"]["phase"] == "held")
    });
    assert_eq!(held["deploy"]["missing_secrets"], serde_json::json!(["aws-ssm:/shop/api-token"]), "{held}");
    let state_of = |s: &Value, r: &str| {
        s["secrets"].as_array().unwrap().iter().find(|e| e["reference"] == r).map(|e| e["state"].clone())
    };
    assert_eq!(state_of(&held, "aws-sm:shop/db"), Some("present".into()), "{held}");
    assert_eq!(state_of(&held, "aws-ssm:/shop/api-token"), Some("missing".into()), "{held}");

    // The parameter appears: the deploy proceeds.
    moto.boto3(serde_json::json!([["ssm", "put_parameter", {"Name": "/shop/api-token", "Value": param_value, "Type": "SecureString"}]]));
    let done = d.wait_state(&op, "executed");
    assert_eq!(done["exit_code"], 0, "{done}");
    let s = status(&d);
    assert_eq!(state_of(&s, "aws-ssm:/shop/api-token"), Some("present".into()), "{s}");
    assert!(s["secrets"][0]["last_changed"].is_i64(), "{s}");

    // Neither value is anywhere the control plane keeps or says anything.
    let data = airlock_testkit::e2e::all_bytes(&d.server.data_dir);
    for value in [secret_value, param_value] {
        assert!(!airlock_testkit::e2e::contains_bytes(&data, value.as_bytes()), "{value} reached the data dir");
        assert!(!d.server.log().contains(value));
        let audit = serde_json::to_string(&d.server.audit_records()).unwrap();
        assert!(!audit.contains(value));
        assert!(!d.appliance.log().contains(value), "the appliance logged a value");
    }
}

/// The appliance is killed in the middle of fetching a release: its deploy is recorded as
/// interrupted at the next start, and the next deploy of the same release resumes the fetch
/// from the bytes already held, checks the whole artifact, and installs.
#[test]
fn a_fetch_cut_by_killing_the_appliance_resumes_where_it_stopped() {
    let releases = ReleasesDir::new();
    let run_args = releases.run_args();
    let mut d = Deployment::start_with(BIN, POLICY, &run_args);
    let tmp = d.server.dir.path().to_owned();
    let key = d.register_release_key(BIN);
    let dir = tmp.join("big");
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::write(
        dir.join("airlock.toml"),
        "name = \"big\"\nversion = \"1.0.0\"\n\n[[service]]\nname = \"big\"\ncommand = \"bin/big\"\n",
    )
    .unwrap();
    std::fs::write(dir.join("bin/big"), "#!/bin/sh\nexec sleep 600\n").unwrap();
    let data: Vec<u8> = (0..256u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8).collect();
    let sha = airlock_core::operation::sha256_hex(&data);
    std::fs::write(dir.join("data.bin"), &data).unwrap();
    drop(data);
    d.server.ok(&["release", "push", dir.to_str().unwrap(), "--key", key.to_str().unwrap()]);

    let op = deploy(&d, "big@1.0.0");
    d.wait_state(&op, "awaiting_approval");
    d.approve(&op);
    // Frozen as soon as the fetch has some bytes, then killed: no chance to finish it.
    let partial = d.state.join("artifacts/sha256").join(format!("{sha}.partial"));
    wait_for(Duration::from_secs(60), "the fetch to start", || {
        std::fs::metadata(&partial).ok().filter(|m| m.len() > 1 << 20).map(|_| ())
    });
    let pid = d.appliance.pid().to_string();
    assert!(std::process::Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
    let held = std::fs::metadata(&partial).unwrap().len();
    assert!(held < 256 << 20, "the fetch was cut short: {held} bytes held");
    assert!(std::process::Command::new("kill").args(["-KILL", &pid]).status().unwrap().success());
    let _ = d.appliance.child.wait();

    // The appliance starts again: the interrupted deploy is recorded as such, and the bytes
    // already fetched stay.
    d.appliance = d.server.appliance_proc_with(&d.state, None, &run_args);
    d.server.wait_connected(&mut d.appliance);
    d.wait_state(&op, "cancelled");
    assert!(std::fs::metadata(&partial).unwrap().len() >= held);

    // The vendor asks again, the customer approves again: the fetch goes on from where it was.
    let again = deploy(&d, "big@1.0.0");
    d.wait_state(&again, "awaiting_approval");
    d.approve(&again);
    let done = d.wait_state(&again, "executed");
    assert_eq!(done["exit_code"], 0, "{done}");
    let fetches: Vec<Value> = d
        .server
        .audit_records()
        .into_iter()
        .filter(|r| r["target"] == format!("artifact:{sha}").as_str() && r["detail"]["fetch"] == true)
        .collect();
    let offsets: Vec<u64> = fetches.iter().filter_map(|r| r["detail"]["offset"].as_u64()).collect();
    assert!(offsets.iter().any(|o| *o >= held), "the second fetch resumed past {held}: {offsets:?}");
    assert!(!partial.exists() && d.state.join("artifacts/sha256").join(&sha).exists());
}
