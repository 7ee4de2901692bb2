//! The customer's keys and signed policy, through the real CLI and appliance processes.
// Test helpers panic to report failure.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use airlock_testkit::e2e::{self, Server};
use airlock_testkit::process::wait_for;

/// The binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_airlock");

const POLICY: &str = r#"
version = 1
serial = 1
phases = ["observe", "deploy"]

[[deny]]
id = "no-drop"
kind = "db-admin"
args = { action = "drop" }
"#;

fn airlock(args: &[&str]) -> std::process::Output {
    e2e::run(BIN, args)
}

fn keygen(dir: &Path) {
    e2e::keygen(BIN, dir)
}

fn sign(policy_text: &str, key_dir: &Path, out: &Path) {
    e2e::sign_policy(BIN, policy_text, key_dir, out)
}

#[test]
fn appliance_pins_customer_key_and_enforces_signed_policy_updates() {
    let server = Server::start(BIN);
    let tmp = server.dir.path();
    let (customer, attacker) = (tmp.join("customer"), tmp.join("attacker"));
    keygen(&customer);
    keygen(&attacker);
    let good = tmp.join("policy-1.json");
    sign(POLICY, &customer, &good);

    // Install: pin the customer's key and load its policy.
    let env = server.create_env("prod");
    let token = server.join_token(&env);
    let state = tmp.join("apl");
    let pubkey = customer.join("customer.pub");
    let mut proc = server.appliance_proc_with(
        &state,
        Some(&token),
        &["--customer-key", pubkey.to_str().unwrap(), "--policy", good.to_str().unwrap()],
    );
    server.wait_connected(&mut proc);
    let log = proc.log();
    assert!(log.contains("customer keys pinned"), "{log}");
    assert!(log.contains("customer policy in force") && log.contains("serial=1"), "{log}");
    assert!(state.join("customer-keys.pem").exists() && state.join("policy.dsse.json").exists());
    proc.stop();

    // A policy signed by anyone else (the vendor, say) is refused; the last good one stays.
    let forged = tmp.join("policy-2-forged.json");
    sign(
        &POLICY
            .replace("serial = 1", &format!("serial = 2\nenvironment = \"{env}\""))
            .replace("\"observe\", \"deploy\"", "\"observe\", \"deploy\", \"operate\""),
        &attacker,
        &forged,
    );
    let mut proc = server.appliance_proc_with(&state, None, &["--policy", forged.to_str().unwrap()]);
    server.wait_connected(&mut proc);
    let log = proc.log();
    assert!(log.contains("refusing policy"), "{log}");
    assert!(log.contains("serial=1"), "{log}");
    proc.stop();

    // So is an unsigned one, and one going back in time.
    let unsigned = tmp.join("unsigned.json");
    std::fs::write(&unsigned, POLICY).unwrap();
    let mut proc = server.appliance_proc_with(&state, None, &["--policy", unsigned.to_str().unwrap()]);
    server.wait_connected(&mut proc);
    assert!(proc.log().contains("refusing policy"), "{}", proc.log());
    proc.stop();

    // A newer policy signed by the customer takes effect.
    let newer = tmp.join("policy-2.json");
    sign(&POLICY.replace("serial = 1", "serial = 2"), &customer, &newer);
    let mut proc = server.appliance_proc_with(&state, None, &["--policy", newer.to_str().unwrap()]);
    server.wait_connected(&mut proc);
    let log = proc.log();
    assert!(log.contains("accepted a new customer policy") && log.contains("serial=2"), "{log}");
    proc.stop();

    let older = tmp.join("policy-1-again.json");
    sign(POLICY, &customer, &older);
    let mut proc = server.appliance_proc_with(&state, None, &["--policy", older.to_str().unwrap()]);
    server.wait_connected(&mut proc);
    let log = proc.log();
    assert!(log.contains("can only move forward"), "{log}");
    proc.stop();

    // Replacing the pinned customer key is never allowed.
    let other = attacker.join("customer.pub");
    let mut proc = server.appliance_proc_with(&state, None, &["--customer-key", other.to_str().unwrap()]);
    let status = wait_for(Duration::from_secs(10), "appliance to refuse the new key", || proc.exited());
    assert!(!status.success());
    assert!(proc.log().contains("never allowed"), "{}", proc.log());

    // Every decision is in the appliance's own audit log, which verifies.
    let log = state.join("audit.jsonl");
    let out = airlock(&["audit", "verify", "--file", log.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let records: Vec<serde_json::Value> =
        std::fs::read_to_string(&log).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let count = |action: &str, outcome: &str| {
        records.iter().filter(|r| r["action"] == action && r["outcome"] == outcome).count()
    };
    assert_eq!(count("customer_keys.pinned", "success"), 1);
    assert_eq!(count("policy.update", "success"), 2);
    assert_eq!(count("policy.update", "denied"), 3);
    assert_eq!(count("customer_keys.replace", "denied"), 1);
    let replace = records.iter().find(|r| r["action"] == "customer_keys.replace").unwrap();
    assert_eq!(replace["detail"]["rule"], "builtin:pinned-customer-key");
}

#[test]
fn appliance_audit_log_detects_tampering_and_blocks_start() {
    let server = Server::start(BIN);
    let env = server.create_env("prod");
    let token = server.join_token(&env);
    let state = server.dir.path().join("apl");
    for round in 0..4 {
        let mut proc = server.appliance_proc(&state, (round == 0).then_some(token.as_str()), None);
        server.wait_connected(&mut proc);
        proc.stop();
    }
    let log = state.join("audit.jsonl");
    let lines: Vec<String> = std::fs::read_to_string(&log).unwrap().lines().map(str::to_owned).collect();
    assert!(lines.len() >= 4, "{lines:?}");
    let verify = |dir: &Path| {
        let out = airlock(&["audit", "verify", "--file", dir.join("audit.jsonl").to_str().unwrap()]);
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    assert_eq!(verify(&state).0, Some(0));

    let write_copy = |name: &str, body: Vec<String>| {
        let dir = server.dir.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("audit.jsonl"), body.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
        std::fs::copy(state.join("audit.jsonl.head"), dir.join("audit.jsonl.head")).unwrap();
        std::fs::copy(state.join("audit.key"), dir.join("audit.key")).unwrap();
        dir
    };
    let mut edited = lines.clone();
    edited[1] = edited[1].replace("\"success\"", "\"denied\"");
    let mut deleted = lines.clone();
    deleted.remove(1);
    let mut reordered = lines.clone();
    reordered.swap(1, 2);
    let truncated = lines[..lines.len() - 1].to_vec();
    for (name, body, expect) in [
        ("edited", edited, "seq 2"),
        ("deleted", deleted, "seq 2"),
        ("reordered", reordered, "seq 2"),
        ("truncated", truncated, "removed from the end"),
    ] {
        let dir = write_copy(name, body);
        let (code, out) = verify(&dir);
        assert_eq!(code, Some(2), "{name}: {out}");
        assert!(out.contains("BROKEN") && out.contains(expect), "{name}: expected `{expect}` in {out}");
    }

    // The appliance itself refuses to run on a tampered log.
    let mut bad = lines.clone();
    bad.remove(1);
    std::fs::write(&log, bad.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    let mut proc = server.appliance_proc(&state, None, None);
    let status = wait_for(Duration::from_secs(10), "appliance to refuse its tampered log", || proc.exited());
    assert!(!status.success());
    assert!(proc.log().contains("refusing to run on a tampered audit log"), "{}", proc.log());
}

#[test]
fn policy_sign_checks_the_policy_before_signing() {
    let dir = tempfile::tempdir().unwrap();
    keygen(dir.path());
    let toml = dir.path().join("p.toml");
    std::fs::write(&toml, POLICY.replace("serial = 1", "serial = 1\nphase = \"operate\"")).unwrap();
    let key = dir.path().join("customer.key");
    let out = airlock(&["customer", "policy", "sign", toml.to_str().unwrap(), "--key", key.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field"), "{}", String::from_utf8_lossy(&out.stderr));
    // A policy needing two approvers cannot be signed with one key.
    std::fs::write(&toml, POLICY.replace("serial = 1", "serial = 1\napprovals_required = 2")).unwrap();
    let out = airlock(&["customer", "policy", "sign", toml.to_str().unwrap(), "--key", key.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("requires 2 approvers"));
}

#[test]
fn policy_sign_warns_about_a_standing_window_limited_to_nothing() {
    let dir = tempfile::tempdir().unwrap();
    keygen(dir.path());
    let toml = dir.path().join("p.toml");
    let key = dir.path().join("customer.key");
    let window = "\n[[windows]]\nphase = \"deploy\"\ndays = [\"tue\"]\nstart = \"02:00\"\nend = \"04:00\"\n";
    let sign = |text: &str| {
        std::fs::write(&toml, text).unwrap();
        let out = airlock(&["customer", "policy", "sign", toml.to_str().unwrap(), "--key", key.to_str().unwrap()]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).contains("payloadType"), "the signed policy goes to stdout");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let unlimited = sign(&format!("{POLICY}{window}"));
    assert!(unlimited.contains("warning: standing window #1 allows any Deploy request"), "{unlimited}");
    let by_tags = sign(&format!("{POLICY}{window}tags = [\"service:restart\"]\n"));
    assert!(!by_tags.contains("warning"), "{by_tags}");
    let by_template =
        sign(&format!("{POLICY}{window}templates = [{{ name = \"greet\", sha256 = \"{}\" }}]\n", "ab".repeat(32)));
    assert!(!by_template.contains("warning"), "{by_template}");
}

#[test]
fn customer_switches_phases_on_the_appliance_host() {
    let server = Server::start(BIN);
    let tmp = server.dir.path();
    let customer = tmp.join("customer");
    keygen(&customer);
    let signed = tmp.join("policy.json");
    sign(&POLICY.replace("\"observe\", \"deploy\"", "\"observe\", \"deploy\", \"operate\""), &customer, &signed);
    let env = server.create_env("prod");
    let token = server.join_token(&env);
    let state = tmp.join("apl");
    let pubkey = customer.join("customer.pub");
    let args = ["--customer-key", pubkey.to_str().unwrap(), "--policy", signed.to_str().unwrap()];
    let mut proc = server.appliance_proc_with(&state, Some(&token), &args);
    server.wait_connected(&mut proc);

    let phase = |args: &[&str]| {
        let mut all = vec!["appliance", "phase"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--state-dir", state.to_str().unwrap()]);
        let out = airlock(&all);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, out) = phase(&["status"]);
    assert!(ok && out.contains("effective: observe, deploy, operate") && out.contains("serial 1"), "{out}");

    let (ok, out) = phase(&["disable", "operate"]);
    assert!(ok && out.contains("effective: observe, deploy") && out.contains("disabled:  operate"), "{out}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(state.join("admin.sock")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // The switch survives a restart of the appliance.
    proc.stop();
    let mut proc = server.appliance_proc(&state, None, None);
    server.wait_connected(&mut proc);
    let (ok, out) = phase(&["status"]);
    assert!(ok && out.contains("disabled:  operate"), "{out}");
    let (ok, out) = phase(&["enable", "Operate"]);
    assert!(ok && out.contains("effective: observe, deploy, operate"), "{out}");
    let (ok, out) = phase(&["disable", "root"]);
    assert!(!ok && out.contains("unknown phase"), "{out}");

    let audit = std::fs::read_to_string(state.join("audit.jsonl")).unwrap();
    assert!(audit.contains("\"action\":\"phase.disable\"") && audit.contains("\"action\":\"phase.enable\""));
    proc.stop();
    let (ok, out) = phase(&["status"]);
    assert!(!ok && out.contains("is it running"), "{out}");
}

#[test]
fn a_customer_policy_relayed_through_the_control_plane_takes_effect_and_a_vendor_signed_one_is_refused() {
    let server = Server::start(BIN);
    let tmp = server.dir.path();
    let (customer, vendor) = (tmp.join("customer"), tmp.join("vendor"));
    keygen(&customer);
    keygen(&vendor);
    let first = tmp.join("policy-1.json");
    sign(POLICY, &customer, &first);
    let env = server.create_env("prod");
    let token = server.join_token(&env);
    let state = tmp.join("apl");
    let pubkey = customer.join("customer.pub");
    let args = ["--customer-key", pubkey.to_str().unwrap(), "--policy", first.to_str().unwrap()];
    let mut proc = server.appliance_proc_with(&state, Some(&token), &args);
    server.wait_connected(&mut proc);
    let status = || {
        let out = airlock(&["appliance", "phase", "status", "--state-dir", state.to_str().unwrap()]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(status().contains("effective: observe, deploy\n"), "{}", status());
    // Nothing relayed yet.
    let out = server.cli(&["env", "policy", "show", &env]);
    assert!(!out.status.success());

    // The customer signs a newer policy on their machine; the vendor relays it.
    let second = tmp.join("policy-2.json");
    sign(
        &POLICY
            .replace("serial = 1", &format!("serial = 2\nenvironment = \"{env}\""))
            .replace("\"observe\", \"deploy\"", "\"observe\", \"deploy\", \"operate\""),
        &customer,
        &second,
    );
    let pushed = server.ok(&["env", "policy", "push", &env, second.to_str().unwrap()]);
    assert!(pushed.contains("serial 2") && pushed.contains("sent to 1"), "{pushed}");
    wait_for(Duration::from_secs(10), "the relayed policy to take effect", || {
        let s = status();
        (s.contains("serial 2") && s.contains("effective: observe, deploy, operate")).then_some(())
    });
    let shown = server.ok(&["env", "policy", "show", &env]);
    assert!(shown.contains("serial:      2") && shown.contains("\"operate\""), "{shown}");

    // A policy the customer signed for another environment cannot be replayed to this one, nor
    // can one that names no environment be relayed at all.
    let staging = server.create_env("staging");
    for (name, text) in [
        ("for-staging", POLICY.replace("serial = 1", &format!("serial = 9\nenvironment = \"{staging}\""))),
        ("for-anywhere", POLICY.replace("serial = 1", "serial = 9")),
    ] {
        let path = tmp.join(format!("policy-{name}.json"));
        sign(&text, &customer, &path);
        let out = server.cli(&["env", "policy", "push", &env, path.to_str().unwrap()]);
        assert!(!out.status.success(), "{name} was relayed");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("environment"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // A policy signed by another key (the vendor's own) passes the control plane, which cannot
    // check customer signatures, and is refused by the appliance; the last good one stays.
    let forged = tmp.join("policy-3-vendor.json");
    sign(
        &POLICY
            .replace("serial = 1", &format!("serial = 3\nenvironment = \"{env}\""))
            .replace("\"observe\", \"deploy\"", "\"observe\""),
        &vendor,
        &forged,
    );
    server.ok(&["env", "policy", "push", &env, forged.to_str().unwrap()]);
    let audit = state.join("audit.jsonl");
    let refused = wait_for(Duration::from_secs(10), "the appliance to refuse the vendor's policy", || {
        let text = std::fs::read_to_string(&audit).unwrap();
        let records: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        records.into_iter().find(|r| r["action"] == "policy.refused")
    });
    assert_eq!(refused["outcome"], "denied");
    assert!(refused["detail"]["reason"].as_str().unwrap().contains("signature"), "{refused}");
    let s = status();
    assert!(s.contains("serial 2") && s.contains("effective: observe, deploy, operate"), "{s}");

    // After a reconnect the control plane sends the environment's policy again: the appliance
    // still runs the customer's.
    proc.stop();
    let mut proc = server.appliance_proc(&state, None, None);
    server.wait_connected(&mut proc);
    std::thread::sleep(Duration::from_millis(500));
    let s = status();
    assert!(s.contains("serial 2") && s.contains("effective: observe, deploy, operate"), "{s}");
    proc.stop();

    let out = airlock(&["audit", "verify", "--file", audit.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let records: Vec<serde_json::Value> =
        std::fs::read_to_string(&audit).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let relayed: Vec<_> =
        records.iter().filter(|r| r["action"] == "policy.update" && r["detail"]["source"] == "control_plane").collect();
    assert_eq!(relayed.len(), 1, "{relayed:?}");
    assert_eq!(relayed[0]["detail"]["serial"], 2);
}
