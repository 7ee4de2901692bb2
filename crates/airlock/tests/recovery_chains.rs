//! An appliance whose certificate expired while it was offline joins again and keeps what issue 16
//! says it keeps beyond its id and audit chain (tested in `platform_join.rs`): its execution chain and
//! its pre-approval counters. A real server, a real appliance process, a certificate lifetime of
//! seconds, as the recovery test there uses.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use airlock_testkit::e2e::{Deployment, ok, run};
use airlock_testkit::process::wait_for;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_airlock");

const POLICY: &str = r#"
version = 1
serial = 1
phases = ["observe", "deploy", "operate"]
"#;

/// The certificate lifetime the server issues, and how long the appliance stays offline past it.
const CERT_LIFETIME: &str = "4s";
const OFFLINE: Duration = Duration::from_secs(5);

#[test]
fn after_recovery_the_execution_chain_continues_and_pre_approval_counts_are_kept() {
    let mut d =
        Deployment::start_with_server_args(BIN, POLICY, &["--appliance-cert-lifetime", CERT_LIFETIME], &[], &[]);
    d.push_template("greet", "operate", "[\"service:greet\"]", "#!/bin/sh\necho \"hello $AIRLOCK_VAR_NAME\"\n");
    // A pre-approval of two runs; one is used before the certificate expires.
    let signed = d.server.dir.path().join("pre.json");
    let template_dir = d.template_dir("greet");
    ok(
        run(
            BIN,
            &[
                "customer",
                "preapprove",
                "--appliance",
                &d.appliance_id,
                "--template-dir",
                template_dir.to_str().unwrap(),
                "--max-runs",
                "2",
                "--constrain",
                "name=world|moon",
                "--key",
                &d.key(),
                "--out",
                signed.to_str().unwrap(),
            ],
        ),
        "preapprove",
    );
    ok(d.local(&["appliance", "preapproval", "add", signed.to_str().unwrap()]), "preapproval add");
    let before = d.request("greet", "world");
    d.wait_state(&before, "executed");

    // Offline past its certificate's end, then back with a new join token of its environment.
    d.appliance.stop();
    std::thread::sleep(OFFLINE);
    let pubkey = d.customer.join("customer.pub");
    let token = d.server.join_token(&d.env);
    let mut again = d.server.appliance_proc_with(&d.state, Some(&token), &["--customer-key", pubkey.to_str().unwrap()]);
    let id = d.server.wait_connected(&mut again);
    d.appliance = again;
    assert_eq!(id, d.appliance_id, "the appliance id is kept");
    let recovered = d.server.audited("appliance.join", "success");
    assert!(
        recovered.iter().any(|r| r["target"] == id.as_str() && r["detail"]["recovered_serial"].is_string()),
        "this was a recovery, not a renewal: {recovered:#?}"
    );
    d.wait_attestation_known();

    // The pre-approval's second run executes without a customer signature; a third is not covered:
    // the counter was not reset by the recovery.
    let after = d.request("greet", "moon");
    d.wait_state(&after, "executed");
    let beyond = d.request("greet", "world");
    // `awaiting_approval` is also where every request starts: wait for the appliance's own decision on it.
    wait_for(Duration::from_secs(20), "the appliance to decide on the third run", || {
        d.audited("operation.awaiting_approval").into_iter().find(|r| r.to_string().contains(&beyond))
    });
    assert_eq!(d.show(&beyond)["state"], "awaiting_approval");
    let executed: Vec<Value> = d.audited("operation.executed");
    assert_eq!(executed.len(), 2, "two pre-approved runs in all: {executed:#?}");

    // The execution after the recovery links to the one before it, and both verify as a chain.
    let dir = d.server.dir.path();
    let (m1, m2) = (dir.join("before.json"), dir.join("after.json"));
    std::fs::write(&m1, d.server.ok(&["op", "manifest", &before])).unwrap();
    std::fs::write(&m2, d.server.ok(&["op", "manifest", &after])).unwrap();
    let ca = d.state.join("ca.pem");
    let policy = dir.join("policy.json");
    let verify = |first: &std::path::Path, second: &std::path::Path| {
        run(
            BIN,
            &[
                "verify",
                first.to_str().unwrap(),
                second.to_str().unwrap(),
                "--customer-key",
                pubkey.to_str().unwrap(),
                "--ca",
                ca.to_str().unwrap(),
                "--policy",
                policy.to_str().unwrap(),
            ],
        )
    };
    let out = ok(verify(&m1, &m2), "verify the chain across the recovery");
    assert!(out.contains(&before) && out.contains(&after), "{out}");
    let reversed = verify(&m2, &m1);
    assert!(!reversed.status.success(), "the order is part of the chain");
    assert!(String::from_utf8_lossy(&reversed.stderr).contains("chain.link"), "{reversed:?}");

    // The appliance's own audit chain runs on across the expiry too.
    let log = d.state.join("audit.jsonl");
    ok(run(BIN, &["audit", "verify", "--file", log.to_str().unwrap()]), "appliance audit verify");
    assert!(d.server.audit_verify().status.success());
}
