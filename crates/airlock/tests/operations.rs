//! Signed operations end to end, through the real CLI, control plane and appliance processes:
//! request → customer approval → execution on the appliance → output held → customer release
//! → manifest verified offline; refusals; revocation mid-operation; pre-approval run counts.
// Test helpers panic to report failure.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use airlock_testkit::e2e::{Deployment, all_bytes, contains_bytes as contains, ok, run};
use airlock_testkit::process::wait_for;
use serde_json::Value;

/// The binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_airlock");

const POLICY: &str = r#"
version = 1
serial = 1
phases = ["observe", "deploy", "operate"]

[[deny]]
id = "never-touch-billing"
kind = "greet"
args = { name = "billing" }
"#;

fn airlock(args: &[&str]) -> Output {
    run(BIN, args)
}

/// A deployment under `policy` with the `greet` template pushed.
fn setup(policy: &str) -> Deployment {
    let d = Deployment::start(BIN, policy);
    d.push_template(
        "greet",
        "operate",
        "[\"service:greet\"]",
        "#!/bin/sh\necho \"hello $AIRLOCK_VAR_NAME\"\necho 'to stderr' >&2\nexit 3\n",
    );
    d
}

#[test]
fn request_approve_execute_release_and_verify_through_the_cli() {
    let s = setup(POLICY);
    let id = s.request("greet", "world");
    let op = s.wait_state(&id, "awaiting_approval");
    assert_eq!(op["appliance"], s.appliance_id.as_str());

    // The customer sees the exact command before signing anything.
    let listed = ok(s.server.cli(&["customer", "approvals", "list"]), "approvals list");
    assert!(listed.contains(&id) && listed.contains("echo \"hello $AIRLOCK_VAR_NAME\""), "{listed}");
    assert!(listed.contains("service:greet") && listed.contains("end-to-end test"), "{listed}");
    // Signing needs the digest of what was reviewed: a wrong one (or none, off a terminal)
    // signs nothing.
    let wrong = s.server.cli(&["customer", "approve", &id, "--key", &s.key(), "--digest", &"0".repeat(64)]);
    assert!(!wrong.status.success());
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("not the request you reviewed"));
    let blind = s.server.cli(&["customer", "approve", &id, "--key", &s.key()]);
    assert!(!blind.status.success());
    assert!(String::from_utf8_lossy(&blind.stderr).contains("--digest"));
    assert_eq!(s.show(&id)["state"], "awaiting_approval", "nothing may have been relayed");
    s.approve(&id);

    // Executed on the appliance; only a salted commitment and the size reach the control plane,
    // never a plain digest anyone could test guesses against.
    let op = s.wait_state(&id, "executed");
    assert_eq!(op["exit_code"], 3);
    let expected = b"hello world\nto stderr\n";
    assert_eq!(op["output_size"], expected.len());
    assert_eq!(op["output_commitment"]["salted"]["size"], expected.len());
    let plain_digest = airlock_core::operation::sha256_hex(expected);
    assert_ne!(op["output_commitment"]["salted"]["digest"], plain_digest.as_str());
    let pending_manifest = s.server.ok(&["op", "manifest", &id]);
    assert!(!pending_manifest.contains("output_salt") && !pending_manifest.contains(&plain_digest));
    assert!(!s.server.cli(&["op", "output", &id]).status.success(), "output must be held until released");
    assert!(!contains(&all_bytes(&s.state), b"hello world"), "output must be encrypted at rest on the appliance");

    // The customer reads it locally, then releases it with a second signature.
    let local = s.local(&["appliance", "ops", "output", &id]);
    assert_eq!(ok(local, "ops output").as_bytes(), expected);
    ok(s.local(&["customer", "release", &id, "--key", &s.key(), "--reason", "fine to share"]), "customer release");
    s.wait_state(&id, "released");
    let released = s.server.cli(&["op", "output", &id]);
    assert_eq!(ok(released, "op output").as_bytes(), expected);

    // The manifest verifies offline with public keys and the CA only, and says what fails.
    let manifest = s.server.ok(&["op", "manifest", &id]);
    let dir = s.server.dir.path();
    let m = dir.join("m.json");
    std::fs::write(&m, &manifest).unwrap();
    let pubkey = s.customer.join("customer.pub");
    let ca = s.state.join("ca.pem");
    let policy = s.server.dir.path().join("policy.json");
    // `airlock verify` of one manifest, with the customer's key, the CA, and `extra`.
    let verify_with = |path: &Path, extra: &[&str]| {
        let mut args = vec!["verify", path.to_str().unwrap(), "--customer-key", pubkey.to_str().unwrap()];
        args.extend(["--ca", ca.to_str().unwrap()]);
        args.extend(extra);
        airlock(&args)
    };
    let with_policy = ["--policy", policy.to_str().unwrap()];
    let verify = |path: &Path| verify_with(path, &with_policy);
    // Without the policy the execution names, its deny rules and caps go unchecked: the
    // customer is told, and it is not verified unless they accept that.
    let refused = verify_with(&m, &[]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("NOT VERIFIED"), "{refused:?}");
    let out = ok(verify_with(&m, &["--allow-unchecked-policy"]), "verify --allow-unchecked-policy");
    assert!(out.contains("OK") && out.contains(&id) && out.contains("deny rules and caps NOT checked"), "{out}");
    let out = ok(verify(&m), "verify --policy");
    assert!(out.contains("execution.policy") && !out.contains("NOT checked"), "{out}");
    assert!(out.contains("salted commitment"), "{out}");
    assert!(!out.contains("LEGACY"), "{out}");

    // The released output verifies against the signed commitment with the revealed salt;
    // altered bytes, or another salt, do not.
    let with_output = |manifest: &Path, output: &Path| {
        verify_with(manifest, &["--policy", policy.to_str().unwrap(), "--output", output.to_str().unwrap()])
    };
    let out_file = dir.join("out.bin");
    std::fs::write(&out_file, expected).unwrap();
    let out = ok(with_output(&m, &out_file), "verify with output");
    assert!(out.contains("released output matches the salted commitment"), "{out}");
    let altered_file = dir.join("altered.bin");
    std::fs::write(&altered_file, b"hello World\nto stderr\n").unwrap();
    let out = with_output(&m, &altered_file);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("output.commitment"));
    let mut other_salt: Value = serde_json::from_str(&manifest).unwrap();
    let salt = other_salt["output_salt"].as_str().unwrap().to_owned();
    other_salt["output_salt"] = format!("{}{}", if salt.starts_with('0') { "1" } else { "0" }, &salt[1..]).into();
    let other_salt_path = dir.join("other-salt.json");
    std::fs::write(&other_salt_path, other_salt.to_string()).unwrap();
    let out = with_output(&other_salt_path, &out_file);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("output.commitment"));

    let mut tampered: Value = serde_json::from_str(&manifest).unwrap();
    let release = tampered["release"]["payload"].as_str().unwrap().to_owned();
    // One character in the middle changes, always: a bit the decoder ignores (padding) or a
    // letter the payload happens not to contain would leave it intact.
    let mut other_release = release.into_bytes();
    let middle = other_release.len() / 2;
    other_release[middle] = if other_release[middle] == b'A' { b'B' } else { b'A' };
    let other_release = String::from_utf8(other_release).unwrap();
    tampered["release"]["payload"] = other_release.into();
    let t = dir.join("tampered.json");
    std::fs::write(&t, tampered.to_string()).unwrap();
    let out = verify(&t);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("release.signature") || err.contains("manifest.format"), "{err}");

    // The appliance keeps its own copy, and its audit tells the whole story.
    let own = ok(s.local(&["appliance", "ops", "manifest", &id]), "ops manifest");
    let own_path = dir.join("own.json");
    std::fs::write(&own_path, own).unwrap();
    ok(verify(&own_path), "verify the appliance's copy");
    for action in ["operation.received", "operation.allowed", "operation.executed", "operation.released"] {
        assert!(!s.audited(action).is_empty(), "appliance audit lacks {action}");
    }
    ok(airlock(&["audit", "verify", "--file", s.state.join("audit.jsonl").to_str().unwrap()]), "audit verify");
    assert!(s.server.audit_verify().status.success());

    // The customer's private key never reached the control plane: not in its files, not in its log.
    let private = std::fs::read_to_string(s.customer.join("customer.key")).unwrap();
    let body: String = private.lines().filter(|l| !l.starts_with("-----")).collect();
    assert!(!contains(&all_bytes(&s.server.data_dir), body.as_bytes()));
    assert!(!s.server.log().contains(&body));
    // Released output is stored sealed, and never logged.
    assert!(!contains(&all_bytes(&s.server.data_dir), b"hello world"));
    assert!(!s.server.log().contains("hello world"));
}

#[test]
fn refused_requests_run_nothing_and_are_reported_without_customer_data() {
    let s = setup(POLICY);
    // A customer deny rule is final: the appliance refuses before anyone could approve (a deny
    // with a valid approval in hand is covered in the appliance's own tests).
    let id = s.request("greet", "billing");
    let op = s.wait_state(&id, "refused");
    let late = s.server.cli(&["customer", "approve", &id, "--key", &s.key(), "--digest", &"0".repeat(64)]);
    assert!(!late.status.success(), "a refused request cannot be approved any more");
    assert!(op["refusal_reason"].as_str().unwrap().contains("never-touch-billing"), "{op}");
    let denied = s.audited("operation.denied");
    assert!(denied.iter().any(|r| r.to_string().contains("never-touch-billing")), "{denied:?}");

    // The customer's denial is final.
    let id = s.request("greet", "world");
    s.wait_state(&id, "awaiting_approval");
    ok(s.decide("deny", &id, &s.key()), "customer deny");
    s.wait_state(&id, "denied");
    assert!(s.audited("operation.executed").is_empty(), "nothing may have run");

    // An approval signed by a key the appliance did not pin is refused.
    let stranger = s.server.dir.path().join("stranger");
    ok(airlock(&["customer", "keygen", "--out", stranger.to_str().unwrap()]), "keygen");
    let id = s.request("greet", "world");
    s.wait_state(&id, "awaiting_approval");
    let key = stranger.join("customer.key");
    ok(s.decide("approve", &id, key.to_str().unwrap()), "approve with a stranger's key");
    let op = s.wait_state(&id, "refused");
    assert!(op["refusal_reason"].as_str().unwrap().contains("signature"), "{op}");
    assert!(s.audited("operation.executed").is_empty(), "nothing may have run");
}

#[test]
fn a_new_template_version_that_renames_the_denied_variable_is_still_denied_on_the_appliance() {
    let s = setup(POLICY);
    // The vendor pushes a new version of `greet` whose variable is `target`, not `name`: the
    // customer's rule about `name = "billing"` must not be evaded by the rename.
    let dir = s.server.dir.path().join("template-greet-v2");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("template.toml"),
        "name = \"greet\"\ndescription = \"greet, version 2\"\nphase = \"operate\"\n\
         data_tags = [\"service:greet\"]\nbody = \"run.sh\"\n\n[[variables]]\nname = \"target\"\n\
         pattern = \"[a-z]+\"\n",
    )
    .unwrap();
    std::fs::write(dir.join("run.sh"), "#!/bin/sh\necho \"hello $AIRLOCK_VAR_TARGET\"\n").unwrap();
    s.server.ok(&["template", "push", dir.to_str().unwrap()]);
    for value in ["billing", "world"] {
        let out =
            s.server.ok(&["op", "request", &s.env, "greet", "--var", &format!("target={value}"), "--reason", "v2"]);
        let id = out.lines().next().unwrap().trim().to_owned();
        let op = s.wait_state(&id, "refused");
        assert_eq!(op["deny_code"], "rule_variable_missing", "{op}");
        let reason = op["refusal_reason"].as_str().unwrap();
        assert!(reason.contains("never-touch-billing") && reason.contains("`name`"), "{op}");
    }
    let denied = s.audited("operation.denied");
    assert!(denied.iter().filter(|r| r.to_string().contains("never-touch-billing")).count() >= 2, "{denied:?}");
    assert!(s.audited("operation.executed").is_empty(), "nothing may have run");
}

#[test]
fn disabling_operate_on_the_host_kills_the_running_operation() {
    let s = setup(POLICY);
    // The script may write only in its private working directory, where the test finds it.
    s.push_template("long-task", "operate", "[]", "#!/bin/sh\necho $$ > \"$AIRLOCK_VAR_NAME\"\nsleep 120\necho done\n");
    let id = s.request("long-task", "task.pid");
    s.wait_state(&id, "awaiting_approval");
    s.approve(&id);
    // Under /run/airlock-box/<appliance>/ for an appliance running as root, as here.
    let workdir =
        || std::fs::read_dir("/run/airlock-box").ok()?.flatten().map(|e| e.path().join(&id)).find(|dir| dir.is_dir());
    let pid_file = wait_for(Duration::from_secs(20), "the task's working directory", workdir).join("task.pid");
    let pid: u32 = wait_for(Duration::from_secs(20), "the task to start", || {
        std::fs::read_to_string(&pid_file).ok().and_then(|t| t.trim().parse().ok())
    });
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    ok(s.local(&["appliance", "phase", "disable", "operate"]), "phase disable");
    let op = s.wait_state(&id, "cancelled");
    assert!(op["output_commitment"]["salted"]["digest"].is_string(), "{op}");
    wait_for(Duration::from_secs(5), "the task's process to be gone", || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Gone, or a zombie awaiting its parent's reap.
        (stat.is_empty() || stat.split_whitespace().nth(2) == Some("Z")).then_some(())
    });
    assert!(!s.audited("operation.cancelled").is_empty());
    assert!(workdir().is_none(), "the run's working directory is removed");
    // Manifests of cancelled operations verify like any other.
    let m = s.server.dir.path().join("cancelled.json");
    std::fs::write(&m, s.server.ok(&["op", "manifest", &id])).unwrap();
    let pubkey = s.customer.join("customer.pub");
    let ca = s.state.join("ca.pem");
    let policy = s.server.dir.path().join("policy.json");
    ok(
        airlock(&[
            "verify",
            m.to_str().unwrap(),
            "--customer-key",
            pubkey.to_str().unwrap(),
            "--ca",
            ca.to_str().unwrap(),
            "--policy",
            policy.to_str().unwrap(),
        ]),
        "verify cancelled",
    );
}

#[test]
fn pre_approval_runs_are_counted_across_restarts() {
    let mut s = setup(POLICY);
    let signed = s.server.dir.path().join("pre.json");
    let template_dir = s.template_dir("greet");
    ok(
        airlock(&[
            "customer",
            "preapprove",
            "--appliance",
            &s.appliance_id,
            "--template-dir",
            template_dir.to_str().unwrap(),
            "--max-runs",
            "2",
            "--constrain",
            "name=world|moon",
            "--key",
            &s.key(),
            "--out",
            signed.to_str().unwrap(),
        ]),
        "preapprove",
    );
    ok(s.local(&["appliance", "preapproval", "add", signed.to_str().unwrap()]), "preapproval add");

    let first = s.request("greet", "world");
    s.wait_state(&first, "executed");
    // A value outside the constraint falls back to per-request approval.
    let outside = s.request("greet", "mars");
    s.wait_state(&outside, "awaiting_approval");

    // Restart the appliance: the run counter survives.
    s.appliance.stop();
    let pubkey = s.customer.join("customer.pub");
    let mut again = s.server.appliance_proc_with(&s.state, None, &["--customer-key", pubkey.to_str().unwrap()]);
    s.server.wait_connected(&mut again);
    s.appliance = again;
    let second = s.request("greet", "moon");
    s.wait_state(&second, "executed");
    let third = s.request("greet", "world");
    s.wait_state(&third, "awaiting_approval");

    // The manifests chain: the second execution names the first.
    let pubkey = pubkey.to_str().unwrap().to_owned();
    let ca = s.state.join("ca.pem");
    let (m1, m2) = (s.server.dir.path().join("m1.json"), s.server.dir.path().join("m2.json"));
    std::fs::write(&m1, s.server.ok(&["op", "manifest", &first])).unwrap();
    std::fs::write(&m2, s.server.ok(&["op", "manifest", &second])).unwrap();
    let policy = s.server.dir.path().join("policy.json");
    let chain = airlock(&[
        "verify",
        m1.to_str().unwrap(),
        m2.to_str().unwrap(),
        "--customer-key",
        &pubkey,
        "--ca",
        ca.to_str().unwrap(),
        "--policy",
        policy.to_str().unwrap(),
    ]);
    ok(chain, "verify chain");
    let reversed = airlock(&[
        "verify",
        m2.to_str().unwrap(),
        m1.to_str().unwrap(),
        "--customer-key",
        &pubkey,
        "--ca",
        ca.to_str().unwrap(),
    ]);
    assert!(!reversed.status.success());
    assert!(String::from_utf8_lossy(&reversed.stderr).contains("chain.link"));
}

#[test]
fn secret_output_never_leaves_the_appliance() {
    let s = setup(POLICY);
    s.push_template(
        "show-config",
        "operate",
        "[\"output:secret\"]",
        "#!/bin/sh\necho \"SECRET-MARKER-$AIRLOCK_VAR_NAME\"\n",
    );
    let id = s.request("show-config", "x1");
    s.wait_state(&id, "awaiting_approval");
    s.approve(&id);
    s.wait_state(&id, "executed");
    // The customer can read it locally, but no release can send it.
    let local = ok(s.local(&["appliance", "ops", "output", &id]), "ops output");
    assert!(local.contains("SECRET-MARKER-x1"));
    let out = s.local(&["customer", "release", &id, "--key", &s.key()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("secret"), "{}", String::from_utf8_lossy(&out.stderr));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(s.show(&id)["state"], "executed");
    // The script names the marker; only the output carries the value after it.
    assert!(!contains(&all_bytes(&s.server.data_dir), b"SECRET-MARKER-x1"));
    assert!(!s.server.log().contains("SECRET-MARKER-x1"));
    assert!(!s.appliance.log().contains("SECRET-MARKER-x1"), "the appliance must not log output either");
    assert!(!contains(&all_bytes(&s.state), b"SECRET-MARKER-x1"), "held output is encrypted at rest");
}
