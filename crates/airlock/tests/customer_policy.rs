//! The customer's keys and signed policy, through the real CLI and appliance processes.
// Test helpers panic to report failure.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::{Server, bin, wait_for};

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
    Command::new(bin()).args(args).output().unwrap()
}

fn keygen(dir: &Path) {
    let out = airlock(&["customer", "keygen", "--out", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

fn sign(policy_text: &str, key_dir: &Path, out: &Path) {
    let toml = out.with_extension("toml");
    std::fs::write(&toml, policy_text).unwrap();
    let key = key_dir.join("customer.key");
    let res = airlock(&[
        "customer",
        "policy",
        "sign",
        toml.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
}

#[test]
fn appliance_pins_customer_key_and_enforces_signed_policy_updates() {
    let server = Server::start();
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
            .replace("serial = 1", "serial = 2")
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
