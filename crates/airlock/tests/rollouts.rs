//! A rollout through the real binaries: one release to three appliances (three environments,
//! three customer policies), one at a time, halted at its failure threshold; it carries on
//! across a control-plane restart, and every target is an ordinary deploy its customer decides.
//! - appliance A's policy has a standing window for deploys: it deploys at once;
//! - appliance B's customer must approve: the rollout waits for it, through a restart;
//! - appliance C's policy does not enable Deploy: its deploy is refused, which halts the rollout.
// Test helpers panic to report failure.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use airlock_testkit::e2e::{Server, keygen, ok, sign_policy};
use airlock_testkit::process::{Proc, wait_for};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_airlock");

const RELEASE: &str = r#"name = "worker"
version = "1.0.0"

[[service]]
name = "worker"
command = "bin/worker"
stop_timeout_secs = 1
"#;

/// An appliance in an environment of its own, under `policy` signed by the customer's key.
fn appliance(server: &Server, name: &str, policy: &str, customer: &Path, releases: &Path) -> (Proc, String, String) {
    let dir = server.dir.path().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let signed = dir.join("policy.json");
    sign_policy(BIN, policy, customer, &signed);
    let env = server.create_env(name);
    let token = server.join_token(&env);
    let pubkey = customer.join("customer.pub");
    let releases = releases.join(name);
    let mut proc = server.appliance_proc_with(
        &dir.join("state"),
        Some(&token),
        &[
            "--customer-key",
            pubkey.to_str().unwrap(),
            "--policy",
            signed.to_str().unwrap(),
            "--releases-dir",
            releases.to_str().unwrap(),
        ],
    );
    let id = server.wait_connected(&mut proc);
    (proc, id, env)
}

fn rollout(server: &Server, id: &str) -> Value {
    serde_json::from_str(&server.ok(&["rollout", "--follow", id, "--once"])).unwrap()
}

fn wait_rollout(server: &Server, id: &str, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    wait_for(Duration::from_secs(60), what, || Some(rollout(server, id)).filter(|r| ok(r)))
}

#[test]
fn a_rollout_goes_one_at_a_time_survives_a_restart_and_halts_at_its_threshold() {
    let mut server = Server::start_with(BIN, &["--heartbeat-interval", "1s"]);
    let tmp = server.dir.path().to_owned();
    let releases = tempfile::tempdir().unwrap();
    std::fs::set_permissions(releases.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let customer = tmp.join("customer");
    keygen(BIN, &customer);
    let vendor = tmp.join("vendor");
    keygen(BIN, &vendor);
    let added = server.ok(&["release", "key", "add", vendor.join("customer.pub").to_str().unwrap()]);
    let vendor_key_id = added.trim().strip_prefix("release key id: ").unwrap().to_owned();
    let deploy_sha = airlock_core::deploy::deploy_template_sha256();
    // A window covers deploys of releases signed by the vendor key this customer pins.
    let window = format!(
        "version = 1\nserial = 1\nphases = [\"observe\", \"deploy\"]\nrelease_keys = [\"{vendor_key_id}\"]\n\n\
         [[windows]]\nphase = \"deploy\"\n\
         days = [\"mon\", \"tue\", \"wed\", \"thu\", \"fri\", \"sat\", \"sun\"]\nstart = \"00:00\"\nend = \"23:59\"\n\
         templates = [{{ name = \"deploy\", sha256 = \"{deploy_sha}\" }}]\n"
    );
    let approve_each = "version = 1\nserial = 1\nphases = [\"observe\", \"deploy\"]\n";
    let no_deploy = "version = 1\nserial = 1\nphases = [\"observe\"]\n";
    let (_a, a, _) = appliance(&server, "a", &window, &customer, releases.path());
    let (_b, b, _) = appliance(&server, "b", approve_each, &customer, releases.path());
    let (_c, c, _) = appliance(&server, "c", no_deploy, &customer, releases.path());

    let dir = tmp.join("worker");
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::write(dir.join("airlock.toml"), RELEASE).unwrap();
    std::fs::write(dir.join("bin/worker"), "#!/bin/sh\nexec sleep 600\n").unwrap();
    server.ok(&["release", "push", dir.to_str().unwrap(), "--key", vendor.join("customer.key").to_str().unwrap()]);

    let id = server
        .ok(&["rollout", "worker@1.0.0", "--concurrency", "1", "--max-failures", "0", "--reason", "fleet", "--no-wait"])
        .trim()
        .to_owned();
    assert!(id.starts_with("rol_"), "{id}");
    // A deploys under its window; B's deploy waits for its customer; C is not started yet.
    let r = wait_rollout(&server, &id, "A deployed and B requested", |r| {
        r["targets"][0]["state"] == "succeeded" && r["targets"][1]["state"] == "deploying"
    });
    assert_eq!(r["targets"][0]["appliance"], a.as_str());
    assert_eq!(r["targets"][1]["appliance"], b.as_str());
    assert_eq!(r["targets"][2]["state"], "pending", "{r}");
    let b_op = r["targets"][1]["operation"].as_str().unwrap().to_owned();

    // The control plane restarts (same ports): the rollout carries on from the store.
    server.stop();
    let gateway = server.gateway.clone();
    let api_port = server.url.rsplit(':').next().unwrap().to_owned();
    server.launch(&["--listen", &format!("127.0.0.1:{api_port}"), "--gateway-listen", &gateway]);
    wait_for(Duration::from_secs(30), "B to reconnect", || (server.appliance(&b)["connected"] == true).then_some(()));
    let listed: Value =
        serde_json::from_str(&ok(server.cli(&["customer", "approvals", "list", "--json"]), "approvals list")).unwrap();
    let op = listed["awaiting_approval"].as_array().unwrap().iter().find(|o| o["id"] == b_op.as_str()).cloned();
    let digest =
        op.unwrap_or_else(|| panic!("{b_op} awaits approval: {listed}"))["request_digest"].as_str().unwrap().to_owned();
    let key = customer.join("customer.key");
    ok(
        server.cli(&[
            "customer",
            "approve",
            &b_op,
            "--key",
            key.to_str().unwrap(),
            "--digest",
            &digest,
            "--reason",
            "ok",
        ]),
        "customer approve",
    );

    // B deploys; then C's deploy is refused by its customer's policy: past the threshold, halted.
    let r = wait_rollout(&server, &id, "the rollout to halt", |r| r["state"] == "halted");
    assert_eq!(r["targets"][1]["state"], "succeeded", "{r}");
    assert_eq!(r["targets"][2]["state"], "failed", "{r}");
    assert_eq!(r["targets"][2]["appliance"], c.as_str());
    assert_eq!((r["succeeded"].as_u64(), r["failed"].as_u64()), (Some(2), Some(1)), "{r}");
    let follow = server.cli(&["rollout", "--follow", &id]);
    assert_eq!(follow.status.code(), Some(1), "a halted rollout exits 1");
    let lines = String::from_utf8_lossy(&follow.stdout).into_owned();
    let last: Value = serde_json::from_str(lines.lines().last().unwrap()).unwrap();
    assert_eq!(last["state"], "halted", "{lines}");
    assert_eq!(server.audited("rollout.create", "success").len(), 1);
    assert_eq!(server.audited("rollout.halted", "success").len(), 1);
    assert_eq!(server.audited("deployment.request", "success").len(), 3);
}
