//! The appliance's own records against a local writer with its uid: the keyed audit head and
//! signed checkpoints, through real appliance processes and `airlock audit verify`.
// Test helpers panic to report failure.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use airlock_core::audit::{Head, Record};
use airlock_testkit::e2e::{self, Server};
use airlock_testkit::process::wait_for;

/// The binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_airlock");

fn records(state: &Path) -> Vec<Record> {
    std::fs::read_to_string(state.join("audit.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn write_log(state: &Path, recs: &[Record]) {
    let text: String = recs.iter().map(|r| serde_json::to_string(r).unwrap() + "\n").collect();
    std::fs::write(state.join("audit.jsonl"), text).unwrap();
}

/// Writes a head for `head` with a valid MAC: an attacker with the appliance's uid can read
/// `audit.key` until vendor code runs in the box.
fn write_head_with_stolen_key(state: &Path, head: Head) {
    let hex = std::fs::read_to_string(state.join("audit.key")).unwrap();
    let bytes: Vec<u8> =
        (0..hex.trim().len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &bytes);
    let mac: String = head.mac(&key, "appliance").iter().map(|b| format!("{b:02x}")).collect();
    let json = serde_json::json!({ "seq": head.seq, "hash": head.hash, "mac": mac });
    std::fs::write(state.join("audit.jsonl.head"), json.to_string()).unwrap();
}

/// `airlock audit verify --file … --checkpoints … [--key …]`: (exit code, stdout).
fn verify(state: &Path, checkpoints: &Path, key: Option<&Path>) -> (Option<i32>, String) {
    let log = state.join("audit.jsonl");
    let mut args =
        vec!["audit", "verify", "--file", log.to_str().unwrap(), "--checkpoints", checkpoints.to_str().unwrap()];
    if let Some(k) = key {
        args.extend(["--key", k.to_str().unwrap()]);
    }
    let out = e2e::run(BIN, &args);
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

struct Appliance {
    server: Server,
    state: PathBuf,
    checkpoints: PathBuf,
}

impl Appliance {
    /// An appliance joined and run `rounds` times, checkpointing to a file outside its state.
    fn run_rounds(rounds: usize) -> Self {
        let server = Server::start(BIN);
        let env = server.create_env("prod");
        let token = server.join_token(&env);
        let state = server.dir.path().join("apl");
        let outside = server.dir.path().join("customer-log");
        std::fs::create_dir_all(&outside).unwrap();
        let checkpoints = outside.join("checkpoints.jsonl");
        let apl = Self { server, state, checkpoints };
        for round in 0..rounds {
            let mut proc = apl.start((round == 0).then_some(token.as_str()));
            apl.server.wait_connected(&mut proc);
            proc.stop();
        }
        apl
    }

    fn start(&self, token: Option<&str>) -> airlock_testkit::process::Proc {
        let cp = format!("--audit-checkpoints={}", self.checkpoints.display());
        self.server.appliance_proc_with(&self.state, token, &[&cp, "--audit-checkpoint-every=2"])
    }

    /// Starts it and expects a refusal naming `expect`.
    fn refuses(&self, expect: &str) -> String {
        let mut proc = self.start(None);
        let status = wait_for(Duration::from_secs(10), "appliance to refuse its log", || proc.exited());
        assert!(!status.success());
        let log = proc.log();
        assert!(log.contains("refusing to run on a tampered audit log") && log.contains(expect), "{log}");
        log
    }
}

#[test]
fn a_truncated_log_with_a_rewritten_head_refuses_start_and_verify_names_the_truncation() {
    let apl = Appliance::run_rounds(2);
    let state = &apl.state;
    let (code, out) = verify(state, &apl.checkpoints, None);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("checkpoints, the last at seq") && out.contains("head MAC verified"), "{out}");
    // The customer keeps the checkpoint key's public half from install.
    let kept = apl.server.dir.path().join("checkpoint.pub");
    std::fs::copy(state.join("checkpoint.pub"), &kept).unwrap();

    // Cut the last records and rewrite the head so that log, head and MAC agree.
    let recs = records(state);
    let keep = recs.len() - 1;
    write_log(state, &recs[..keep]);
    write_head_with_stolen_key(state, recs[keep - 1].head());
    let plain = e2e::run(BIN, &["audit", "verify", "--file", state.join("audit.jsonl").to_str().unwrap()]);
    assert!(plain.status.success(), "without checkpoints the cut log looks whole");

    let (code, out) = verify(state, &apl.checkpoints, Some(&kept));
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("BROKEN") && out.contains("truncation"), "{out}");
    let before = std::fs::read(state.join("audit.jsonl")).unwrap();
    apl.refuses("truncation");
    assert_eq!(std::fs::read(state.join("audit.jsonl")).unwrap(), before, "the refusal left the log as it was");

    // Put back, the appliance starts and records the refused start.
    write_log(state, &recs);
    write_head_with_stolen_key(state, recs.last().unwrap().head());
    let mut proc = apl.start(None);
    apl.server.wait_connected(&mut proc);
    proc.stop();
    let refused: Vec<Record> =
        records(state).into_iter().filter(|r| r.event.action == "appliance.start_refused").collect();
    assert_eq!(refused.len(), 1);
    assert!(refused[0].event.detail["reason"].as_str().unwrap().contains("truncation"));
    assert_eq!(verify(state, &apl.checkpoints, Some(&kept)).0, Some(0));
}

#[test]
fn a_reanchored_chain_is_detected_by_its_checkpoints() {
    let apl = Appliance::run_rounds(2);
    let state = &apl.state;
    // Rewrite record 3 and re-hash every record after it: a self-consistent chain, longer
    // than the checkpointed one, with a head to match.
    let recs = records(state);
    let mut forged: Vec<Record> = recs[..2].to_vec();
    let mut head = forged[1].head();
    for r in &recs[2..] {
        let mut event = r.event.clone();
        event.detail = serde_json::json!({ "rewritten": true });
        let next = Record::append("appliance", head, r.at, event);
        head = next.head();
        forged.push(next);
    }
    write_log(state, &forged);
    write_head_with_stolen_key(state, head);
    let (code, out) = verify(state, &apl.checkpoints, None);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("re-anchoring"), "{out}");
    apl.refuses("re-anchoring");
}

#[test]
fn a_rolled_back_log_is_detected_by_its_checkpoints_in_syslog() {
    let server = Server::start(BIN);
    let env = server.create_env("prod");
    let token = server.join_token(&env);
    let state = server.dir.path().join("apl");
    // The customer's syslog: a datagram socket whose lines the test keeps.
    let socket = server.dir.path().join("syslog.sock");
    let syslog = std::os::unix::net::UnixDatagram::bind(&socket).unwrap();
    syslog.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut lines = Vec::new();
    let collect = |lines: &mut Vec<String>| {
        let mut buf = vec![0u8; 16384];
        while let Ok(n) = syslog.recv(&mut buf) {
            lines.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    };
    let sink = format!("--audit-checkpoints=syslog:{}", socket.display());
    let run = |token: Option<&str>, lines: &mut Vec<String>| {
        let mut proc = server.appliance_proc_with(&state, token, &[&sink]);
        server.wait_connected(&mut proc);
        proc.stop();
        collect(lines);
    };
    run(Some(&token), &mut lines);
    // A copy of the state directory as it was; later it is put back.
    let backup = server.dir.path().join("backup");
    std::fs::create_dir_all(&backup).unwrap();
    for f in ["audit.jsonl", "audit.jsonl.head"] {
        std::fs::copy(state.join(f), backup.join(f)).unwrap();
    }
    run(None, &mut lines);
    run(None, &mut lines);
    for f in ["audit.jsonl", "audit.jsonl.head"] {
        std::fs::copy(backup.join(f), state.join(f)).unwrap();
    }
    // Syslog cannot be read back, so the appliance starts on the older copy; its checkpoints
    // now go backwards.
    run(None, &mut lines);
    assert!(lines.len() >= 8, "{lines:?}");
    let file = server.dir.path().join("syslog-export.log");
    std::fs::write(&file, lines.iter().map(|l| format!("Dec  1 05:00:00 host {l}\n")).collect::<String>()).unwrap();
    let (code, out) = verify(&state, &file, None);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("rollback"), "{out}");
}

#[test]
fn a_checkpoint_file_in_the_state_directory_is_refused() {
    let server = Server::start(BIN);
    let env = server.create_env("prod");
    let token = server.join_token(&env);
    let state = server.dir.path().join("apl");
    std::fs::create_dir_all(&state).unwrap();
    let inside = format!("--audit-checkpoints={}", state.join("checkpoints.jsonl").display());
    let mut proc = server.appliance_proc_with(&state, Some(&token), &[&inside]);
    let status = wait_for(Duration::from_secs(10), "appliance to refuse the checkpoint path", || proc.exited());
    assert!(!status.success());
    assert!(proc.log().contains("inside the state directory"), "{}", proc.log());
}

/// Starts an appliance that must refuse, naming `expect`.
fn refuses_to_start(server: &Server, state: &Path, extra: &[&str], expect: &str) {
    let mut proc = server.appliance_proc_with(state, None, extra);
    let status = wait_for(Duration::from_secs(10), "appliance to refuse to start", || proc.exited());
    assert!(!status.success());
    assert!(proc.log().contains(expect), "{}", proc.log());
}

fn count(state: &Path, action: &str, outcome: &str) -> usize {
    records(state)
        .iter()
        .filter(|r| r.event.action == action && serde_json::to_value(r.event.outcome).unwrap() == outcome)
        .count()
}

#[test]
fn pinned_keys_change_only_by_a_signed_rotation_and_an_edited_key_file_refuses_start() {
    let server = Server::start(BIN);
    let tmp = server.dir.path();
    let (customer, successor, vendor) = (tmp.join("customer"), tmp.join("successor"), tmp.join("vendor"));
    for dir in [&customer, &successor, &vendor] {
        e2e::keygen(BIN, dir);
    }
    let env = server.create_env("prod");
    let token = server.join_token(&env);
    let state = tmp.join("apl");
    let pubkey = customer.join("customer.pub");
    let mut proc = server.appliance_proc_with(&state, Some(&token), &["--customer-key", pubkey.to_str().unwrap()]);
    server.wait_connected(&mut proc);
    proc.stop();

    // The vendor's key appended to the pinned keys on disk: start is refused, and audited.
    let keys_file = state.join("customer-keys.pem");
    let pinned = std::fs::read_to_string(&keys_file).unwrap();
    std::fs::write(&keys_file, pinned.clone() + &std::fs::read_to_string(vendor.join("customer.pub")).unwrap())
        .unwrap();
    refuses_to_start(&server, &state, &[], "key file was edited");
    std::fs::write(&keys_file, &pinned).unwrap();

    // A rotation signed by the pinned key is applied on the host; one signed by the vendor is not.
    let mut proc = server.appliance_proc(&state, None, None);
    server.wait_connected(&mut proc);
    let sign_rotation = |key: &Path, out: &Path| {
        let out_s = out.to_str().unwrap();
        let new = successor.join("customer.pub");
        e2e::ok(
            e2e::run(
                BIN,
                &[
                    "customer",
                    "keys",
                    "rotate",
                    "--key",
                    key.to_str().unwrap(),
                    "--new-key",
                    new.to_str().unwrap(),
                    "--reason",
                    "handover",
                    "--out",
                    out_s,
                ],
            ),
            "customer keys rotate",
        );
    };
    let forged = tmp.join("rotation-forged.json");
    sign_rotation(&vendor.join("customer.key"), &forged);
    let apply = |file: &Path| {
        e2e::run(BIN, &["appliance", "keys", "rotate", file.to_str().unwrap(), "--state-dir", state.to_str().unwrap()])
    };
    let out = apply(&forged);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("rotation is refused"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read_to_string(&keys_file).unwrap(), pinned, "a refused rotation changes nothing");
    let good = tmp.join("rotation.json");
    sign_rotation(&customer.join("customer.key"), &good);
    let out = e2e::ok(apply(&good), "appliance keys rotate");
    assert!(out.contains("pinned customer keys now"), "{out}");
    // The same statement again finds another key set pinned.
    assert!(!apply(&good).status.success());
    proc.stop();

    // The rotated file is what the chain records: the appliance starts on it.
    let mut proc = server.appliance_proc(&state, None, None);
    server.wait_connected(&mut proc);
    proc.stop();
    assert_eq!(count(&state, "state.diverged", "denied"), 1);
    assert_eq!(count(&state, "customer_keys.rotate", "success"), 1);
    assert_eq!(count(&state, "customer_keys.rotate", "denied"), 2);
    assert!(
        e2e::run(BIN, &["audit", "verify", "--file", state.join("audit.jsonl").to_str().unwrap()]).status.success()
    );
}

#[test]
fn an_older_signed_policy_put_back_refuses_start() {
    let server = Server::start(BIN);
    let tmp = server.dir.path();
    let customer = tmp.join("customer");
    e2e::keygen(BIN, &customer);
    let policy = |serial: u64| {
        let path = tmp.join(format!("policy-{serial}.json"));
        e2e::sign_policy(BIN, &format!("version = 1\nserial = {serial}\nphases = [\"observe\"]\n"), &customer, &path);
        path
    };
    let (one, two) = (policy(1), policy(2));
    let env = server.create_env("prod");
    let token = server.join_token(&env);
    let state = tmp.join("apl");
    let pubkey = customer.join("customer.pub");
    for (token, file) in [(Some(token.as_str()), &one), (None, &two)] {
        let mut proc = server.appliance_proc_with(
            &state,
            token,
            &["--customer-key", pubkey.to_str().unwrap(), "--policy", file.to_str().unwrap()],
        );
        server.wait_connected(&mut proc);
        proc.stop();
    }
    std::fs::copy(&one, state.join("policy.dsse.json")).unwrap();
    refuses_to_start(&server, &state, &[], "older policy was put back");
    assert_eq!(std::fs::read(state.join("policy.dsse.json")).unwrap(), std::fs::read(&one).unwrap());
    assert_eq!(count(&state, "state.diverged", "denied"), 1);
}
