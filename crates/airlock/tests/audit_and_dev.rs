//! Audit tamper detection on a real data directory, and `airlock dev`.
// Test helpers panic to report failure.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

use airlock_testkit::e2e::Server;
use support::{copy_dir, tamper};

mod support;

/// The binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_airlock");

fn verify(data_dir: &Path) -> (bool, String) {
    let out = Command::new(BIN).args(["audit", "verify", "--data-dir"]).arg(data_dir).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_verify_detects_edit_delete_reorder_and_truncation() {
    let mut server = Server::start(BIN);
    for name in ["a", "b", "c"] {
        let env = server.create_env(name);
        server.join_token(&env);
    }
    server.ok(&["appliance", "list"]);
    server.stop();
    let (ok, out) = verify(&server.data_dir);
    assert!(ok, "{out}");
    assert!(out.contains(&format!("OK     chain {}", server.tenant)), "{out}");

    let chain = &server.tenant;
    let cases = [
        ("edit", format!("UPDATE audit_events SET record = replace(record, '\"success\"', '\"denied\"') WHERE chain = '{chain}' AND seq = 3"), "seq 3"),
        ("delete", format!("DELETE FROM audit_events WHERE chain = '{chain}' AND seq = 3"), "seq 3"),
        (
            "reorder",
            format!(
                "UPDATE audit_events SET record = (SELECT record FROM audit_events WHERE chain = '{chain}' AND seq = 4) WHERE chain = '{chain}' AND seq = 3;
                 UPDATE audit_events SET record = (SELECT record FROM audit_events e2 WHERE e2.chain = '{chain}' AND e2.seq = 3) WHERE chain = '{chain}' AND seq = 4;"
            ),
            "seq 3",
        ),
        ("truncate", format!("DELETE FROM audit_events WHERE chain = '{chain}' AND seq = (SELECT MAX(seq) FROM audit_events WHERE chain = '{chain}')"), "removed from the end"),
        ("rewrite-head", format!("UPDATE audit_heads SET seq = seq - 1 WHERE chain = '{chain}'"), "head"),
        ("delete-head", format!("DELETE FROM audit_heads WHERE chain = '{chain}'"), "head is missing"),
        (
            "delete-chain",
            format!("DELETE FROM audit_heads WHERE chain = '{chain}'; DELETE FROM audit_events WHERE chain = '{chain}'"),
            "head is missing",
        ),
        (
            "inject-field",
            format!("UPDATE audit_events SET record = replace(record, '\"outcome\"', '\"approved_by\":\"mallory\",\"outcome\"') WHERE chain = '{chain}' AND seq = 2"),
            "seq 2",
        ),
    ];
    for (what, sql, expect) in cases {
        let copy = server.dir.path().join(format!("tampered-{what}"));
        copy_dir(&server.data_dir, &copy);
        tamper(&copy.join("airlock.db"), &sql).await;
        let (ok, out) = verify(&copy);
        assert!(!ok, "{what}: tampering went unnoticed: {out}");
        assert!(out.contains(&format!("BROKEN chain {chain}")), "{what}: {out}");
        assert!(out.contains(expect), "{what}: expected `{expect}` in: {out}");
    }
}

#[test]
fn audit_records_security_events_without_secrets() {
    let mut server = Server::start(BIN);
    let env = server.create_env("prod");
    let token = server.join_token(&env);
    let state = server.dir.path().join("apl");
    let mut proc = server.appliance_proc(&state, Some(&token), None);
    let id = server.wait_connected(&mut proc);
    let bad = server.cli_as("airlock_at_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", &["appliance", "list"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown API token"));
    server.ok(&["appliance", "revoke", &id]);
    server.stop();

    let dump = Command::new(BIN).args(["audit", "verify", "--data-dir"]).arg(&server.data_dir).output().unwrap();
    assert!(dump.status.success());
    let db = std::fs::read(server.data_dir.join("airlock.db")).unwrap();
    let wal = std::fs::read(server.data_dir.join("airlock.db-wal")).unwrap_or_default();
    let text = String::from_utf8_lossy(&db).into_owned() + &String::from_utf8_lossy(&wal);
    for action in ["appliance.join", "appliance.revoke", "api.authenticate", "join_token.create", "environment.create"]
    {
        assert!(text.contains(action), "audit lacks {action}");
    }
    // Neither the admin token, nor the join token, nor the CA key is stored in clear.
    assert!(!text.contains(&server.token), "admin token stored in clear");
    assert!(!text.contains(&token), "join token stored in clear");
    assert!(!text.contains("BEGIN PRIVATE KEY"), "a private key is stored in clear");
    let logs = server.log() + &proc.log();
    assert!(!logs.contains(&server.token) && !logs.contains(&token), "a token reached the logs");
}

#[test]
fn dev_exits_zero_when_appliance_is_connected() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["dev", "--exit-when-ready", "--data-dir"])
        .arg(dir.path().join("dev"))
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("(connected)"), "{stdout}");
    assert!(stdout.contains("AIRLOCK_CA_FINGERPRINT=sha256:"), "{stdout}");
}

#[test]
fn server_init_refuses_an_initialised_directory() {
    let server = Server::start(BIN);
    let out = Command::new(BIN).args(["server", "init", "--data-dir"]).arg(&server.data_dir).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already initialised"));
}

#[test]
fn server_refuses_to_start_with_wrong_key_encryption_key() {
    let mut server = Server::start(BIN);
    server.stop();
    let out = Command::new(BIN)
        .args(["server", "--data-dir"])
        .arg(&server.data_dir)
        .args(["--listen", "127.0.0.1:0", "--gateway-listen", "127.0.0.1:0"])
        .env("AIRLOCK_KEK", "11".repeat(32))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("could not be opened"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn server_logs_json_lines_when_asked() {
    let server = Server::start_with(BIN, &["--log-format", "json"]);
    let log = server.log();
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.iter().any(|l| l.contains("control plane serving")), "{log}");
    for line in lines {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string() && v["timestamp"].is_string(), "{line}");
    }
}

/// A sensitive read is answered only once its audit record is durable: a server killed
/// (SIGKILL, no shutdown) right after answering still has the record, and every chain
/// verifies. Routine reads of the same run are not waited for, but a clean stop writes them.
#[test]
fn an_acknowledged_durable_read_survives_a_crash_of_the_server() {
    let mut server = Server::start(BIN);
    let listed = server.cli(&["op", "list"]);
    assert!(listed.status.success(), "{}", String::from_utf8_lossy(&listed.stderr));
    // A manifest read is durable whatever its answer; this one is a 404, recorded as an error.
    let missing = "op_0123456789abcdef0123456789abcdef";
    let manifest = server.cli(&["op", "manifest", missing]);
    assert!(!manifest.status.success());
    let mut proc = server.proc.take().unwrap();
    proc.child.kill().unwrap();
    proc.child.wait().unwrap();

    server.launch(&[]);
    server.stop();
    let verify = server.audit_verify();
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stdout));
    let reads = server.audited("operation.manifest", "error");
    assert_eq!(reads.len(), 1, "the acknowledged manifest read was lost: {reads:?}");
    assert_eq!(reads[0]["target"], missing);
    // The routine read queued before it went into the same or an earlier commit.
    assert_eq!(server.audited("operation.list", "success").len(), 1);
}
