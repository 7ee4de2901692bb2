//! Signed audit checkpoints of a real control plane: deletion, truncation and rollback of a
//! chain are caught offline with public keys only, and pruning keeps the chains verifiable.
// Test helpers panic to report failure.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use airlock_testkit::e2e::Server;
use support::{copy_dir, tamper};

mod support;

/// The binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_airlock");

/// `airlock audit verify --data-dir … --checkpoints … --key …`, without the KEK (it is moved
/// out of the copy): public keys only. Returns (success, output).
fn verify_offline(data_dir: &Path, checkpoints: &Path, key: &Path) -> (bool, String) {
    let out = Command::new(BIN)
        .args(["audit", "verify", "--data-dir"])
        .arg(data_dir)
        .arg("--kek-file")
        .arg(data_dir.join("no-such-kek"))
        .arg("--checkpoints")
        .arg(checkpoints)
        .arg("--audit-key")
        .arg(key)
        .env_remove("AIRLOCK_KEK")
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

/// `airlock audit checkpoint --out FILE` (appends).
fn checkpoint(data_dir: &Path, out: &Path) {
    let res = Command::new(BIN)
        .args(["audit", "checkpoint", "--data-dir"])
        .arg(data_dir)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    assert!(res.status.success(), "checkpoint failed: {}", String::from_utf8_lossy(&res.stderr));
}

/// The audit key as the operator keeps it: a copy taken when the data directory was made
/// (the same PEM as `audit_key` in `GET /v1/ca`, which the API tests check).
fn operator_copy_of_key(server: &Server, dir: &Path) -> PathBuf {
    let pem = std::fs::read_to_string(server.data_dir.join("audit-key.pub")).unwrap();
    assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----"), "{pem}");
    let path = dir.join("audit-key.pub");
    std::fs::write(&path, pem).unwrap();
    path
}

/// One refused authentication: an anonymous record on the `system` chain.
fn refused_call(server: &Server) {
    let out = server.cli_as("airlock_api_notarealtoken", &["appliance", "list"]);
    assert!(!out.status.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn deletion_truncation_and_rollback_are_caught_with_checkpoints() {
    let mut server = Server::start(BIN);
    let outside = tempfile::tempdir().unwrap();
    let key = operator_copy_of_key(&server, outside.path());
    let checkpoints = outside.path().join("checkpoints.jsonl");
    for name in ["a", "b"] {
        server.create_env(name);
    }
    refused_call(&server);
    server.stop();
    // A copy of the database as it was: what an intruder later puts back.
    let old = server.dir.path().join("old");
    copy_dir(&server.data_dir, &old);
    checkpoint(&server.data_dir, &checkpoints);

    server.launch(&[]);
    for name in ["c", "d"] {
        server.create_env(name);
    }
    refused_call(&server);
    server.stop();
    checkpoint(&server.data_dir, &checkpoints);
    let (ok, out) = verify_offline(&server.data_dir, &checkpoints, &key);
    assert!(ok, "{out}");
    assert!(out.contains("head MACs not checked"), "{out}");
    assert!(out.contains(&format!("OK     chain {}", server.tenant)) && out.contains("OK     chain system"), "{out}");

    let tenant = server.tenant.clone();
    let cases: [(&str, String, &str, &str); 3] = [
        (
            "delete-system",
            "DELETE FROM audit_events WHERE chain = 'system'; DELETE FROM audit_heads WHERE chain = 'system';".into(),
            "system",
            "is missing",
        ),
        (
            // The chain's records and head (the tenants table and the checkpoints still name it).
            "delete-tenant",
            format!("DELETE FROM audit_events WHERE chain = '{tenant}'; DELETE FROM audit_heads WHERE chain = '{tenant}';"),
            &tenant,
            "is missing",
        ),
        (
            // The newest record gone and the head moved back to the one before (no KEK needed
            // when the verifier has none either).
            "truncate",
            format!(
                "DELETE FROM audit_events WHERE chain = '{tenant}' AND seq = (SELECT MAX(seq) FROM audit_events WHERE chain = '{tenant}');
                 UPDATE audit_heads SET seq = seq - 1, hash = (SELECT json_extract(record, '$.hash') FROM audit_events WHERE chain = '{tenant}' AND seq = (SELECT MAX(seq) FROM audit_events WHERE chain = '{tenant}')) WHERE chain = '{tenant}';"
            ),
            &tenant,
            "truncation",
        ),
    ];
    for (what, sql, chain, expect) in cases {
        let copy = server.dir.path().join(format!("tampered-{what}"));
        copy_dir(&server.data_dir, &copy);
        tamper(&copy.join("airlock.db"), &sql).await;
        let (ok, out) = verify_offline(&copy, &checkpoints, &key);
        assert!(!ok, "{what}: went unnoticed: {out}");
        assert!(out.contains(&format!("BROKEN chain {chain}")), "{what}: {out}");
        assert!(out.contains(expect), "{what}: expected `{expect}` in: {out}");
    }

    // Rollback: the whole database put back to the older copy.
    let rolled = server.dir.path().join("rolled-back");
    copy_dir(&server.data_dir, &rolled);
    for file in ["airlock.db", "airlock.db-wal", "airlock.db-shm"] {
        let _ = std::fs::remove_file(rolled.join(file));
        if old.join(file).exists() {
            std::fs::copy(old.join(file), rolled.join(file)).unwrap();
        }
    }
    let (ok, out) = verify_offline(&rolled, &checkpoints, &key);
    assert!(!ok, "rollback went unnoticed: {out}");
    assert!(out.contains(&format!("BROKEN chain {tenant}")) && out.contains("truncation"), "{out}");
    // ... and the rolled-back copy, restarted and written to past the old head, is re-anchored.
    let mut again = Server { data_dir: rolled.clone(), proc: None, ..clone_handle(&server) };
    again.launch(&[]);
    for name in ["x", "y", "z", "w"] {
        again.create_env(name);
    }
    again.stop();
    let (ok, out) = verify_offline(&rolled, &checkpoints, &key);
    assert!(!ok, "rollback then new writes went unnoticed: {out}");
    assert!(out.contains(&format!("BROKEN chain {tenant}")) && out.contains("re-anchoring"), "{out}");

    // A checkpoint signed with another key is refused, naming its line: one added to the file,
    // or the whole file checked with another key.
    use airlock_core::audit::checkpoint::{Checkpoint, CheckpointReason};
    use airlock_core::audit::{ChainHash, Head};
    let forger = airlock_core::customer_key::CustomerSigningKey::from_seed([9; 32]);
    let forged = Checkpoint::new(
        &tenant,
        Head { seq: 1, hash: ChainHash::GENESIS },
        airlock_core::Timestamp::from_unix_millis(0),
        CheckpointReason::Requested,
    )
    .signed_line(&forger);
    let with_forgery = outside.path().join("forged.jsonl");
    let lines = std::fs::read_to_string(&checkpoints).unwrap();
    let forged_line = lines.lines().count() + 1;
    std::fs::write(&with_forgery, format!("{lines}{forged}\n")).unwrap();
    let (ok, out) = verify_offline(&server.data_dir, &with_forgery, &key);
    assert!(!ok && out.contains("BROKEN checkpoints") && out.contains(&format!("line {forged_line}")), "{out}");
    let keys = tempfile::tempdir().unwrap();
    airlock_testkit::e2e::keygen(BIN, &keys.path().join("k"));
    let (ok, out) = verify_offline(&server.data_dir, &checkpoints, &keys.path().join("k").join("customer.pub"));
    assert!(!ok && out.contains("BROKEN checkpoints") && out.contains("line 1"), "{out}");
}

/// A second handle on the same test directory, for a server over another data directory.
fn clone_handle(s: &Server) -> Server {
    Server {
        bin: s.bin.clone(),
        dir: tempfile::tempdir_in(s.dir.path()).unwrap(),
        data_dir: s.data_dir.clone(),
        proc: None,
        url: String::new(),
        gateway: String::new(),
        fingerprint: s.fingerprint.clone(),
        nofile: s.nofile,
        token: s.token.clone(),
        workspace: s.workspace.clone(),
        tenant: s.tenant.clone(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_server_checkpoints_and_prunes_on_its_own_and_stays_verifiable() {
    // A retention of one second, checkpointed every second: refusals older than that are
    // pruned behind a signed anchor while the server runs.
    let mut server = Server::start_with(BIN, &["--audit-checkpoint-interval", "1s", "--audit-retention", "1s"]);
    for _ in 0..5 {
        refused_call(&server);
    }
    let log = server.data_dir.join("audit-checkpoints.jsonl");
    airlock_testkit::process::wait_for(std::time::Duration::from_secs(30), "the refusals pruned", || {
        let records = server.audit_records();
        let system = records.iter().filter(|r| r["chain"] == "system");
        system.clone().all(|r| r["action"] != "api.authenticate").then_some(())
    });
    server.stop();
    let key = server.data_dir.join("audit-key.pub");
    let (ok, out) = verify_offline(&server.data_dir, &log, &key);
    assert!(ok, "{out}");
    // With the KEK too (head MACs checked), as `airlock audit verify --data-dir` does.
    let out = Command::new(BIN).args(["audit", "verify", "--data-dir"]).arg(&server.data_dir).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let records = server.audit_records();
    let system: Vec<_> = records.iter().filter(|r| r["chain"] == "system").collect();
    assert!(system.iter().any(|r| r["action"] == "audit.pruned"), "{system:?}");
    assert!(system.iter().all(|r| r["action"] != "api.authenticate"), "old refusals were pruned: {system:?}");
}
