//! Vendor code tries to take the customer's authority, end to end: the real control plane, the
//! real appliance (running as root, as CI does) and a script pushed as a template and allowed
//! by a standing window, with no per-request review. Every attempt fails, and the appliance's
//! state is unchanged.
// Test helpers panic to report failure.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use airlock_testkit::e2e::{Deployment, ok};
use airlock_testkit::process::wait_for;

/// The binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_airlock");

/// Operate is allowed all week by a standing window: no per-request review.
const POLICY: &str = r#"
version = 1
serial = 1
phases = ["observe", "deploy", "operate"]

[[windows]]
phase = "operate"
days = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
start = "00:00"
end = "23:59"
"#;

/// What the attacker script did, and more: each line says what got through (nothing should).
const ATTACK: &str = r#"#!/bin/sh
S="$AIRLOCK_VAR_NAME"
# 1. Switch a phase the customer turned off back on, through the admin socket.
python3 -c 'import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1] + "/admin.sock")
s.sendall(b"{\"cmd\": \"phase\", \"phase\": \"deploy\", \"enabled\": true}\n")
print("GOT-THROUGH admin socket:", s.recv(4096))' "$S" 2>/dev/null
# 2. Leave a process running after the operation.
setsid sh -c 'exec sleep 300' </dev/null >/dev/null 2>&1 &
# 3. Cut its records out of the audit log and rewrite the head.
sed -i '$d' "$S/audit.jsonl" 2>/dev/null && echo "GOT-THROUGH audit log edited"
echo forged > "$S/audit.jsonl.head" 2>/dev/null && echo "GOT-THROUGH audit head rewritten"
# 4. Pin the vendor's key beside the customer's.
echo vendor-key >> "$S/customer-keys.pem" 2>/dev/null && echo "GOT-THROUGH pinned keys edited"
# And read the appliance's keys and another operation's sealed output.
for f in "$S/output.key" "$S/audit.key" "$S/credentials.pem" "$S"/ops/*/output.sealed; do
  cat "$f" >/dev/null 2>&1 && echo "GOT-THROUGH read $f"
done
ls "$S" >/dev/null 2>&1 && echo "GOT-THROUGH listed the state directory"
# 5. Take the host's cloud credentials from the instance metadata service (refused at connect,
# wherever the host has one or not).
python3 -c 'import socket
for address in ("169.254.169.254", "fd00:ec2::254"):
    try:
        socket.create_connection((address, 80), timeout=2).close()
        print("GOT-THROUGH metadata service", address)
    except PermissionError:
        pass
    except OSError as e:
        print("GOT-THROUGH metadata service", address, e)'
echo attack-done
"#;

fn sha256_of(path: &Path) -> String {
    airlock_core::operation::sha256_hex(&std::fs::read(path).unwrap())
}

/// Processes running as `uid`.
fn processes_of(uid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
                s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some(&uid.to_string()))
            })
        })
        .collect()
}

#[test]
fn vendor_code_in_a_standing_window_cannot_take_the_customers_authority() {
    let mut d = Deployment::start(BIN, POLICY);
    ok(d.local(&["appliance", "phase", "disable", "deploy"]), "phase disable deploy");
    d.push_template("attack", "operate", "[]", ATTACK);
    // One earlier operation, whose sealed output the attack tries to read.
    let earlier = d.request("attack", "/nonexistent");
    d.wait_state(&earlier, "executed");
    let pinned = d.state.join("customer-keys.pem");
    let (keys_before, policy_before) = (sha256_of(&pinned), sha256_of(&d.state.join("policy.dsse.json")));

    let id = d.request("attack", d.state());
    d.wait_state(&id, "executed");
    // The customer reads the output on the appliance host.
    let output = ok(d.local(&["appliance", "ops", "output", &id]), "ops output");
    assert!(output.contains("attack-done"), "the script ran to its end: {output}");
    assert!(!output.contains("GOT-THROUGH"), "{output}");

    // 1. The phase stays off, and no phase.enable was audited.
    let status = ok(d.local(&["appliance", "phase", "status"]), "phase status");
    assert!(status.contains("disabled:  deploy"), "{status}");
    assert!(status.contains("cloud metadata service: out of vendor code's reach"), "{status}");
    let uid: u32 = status
        .split("box user (uid ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .and_then(|u| u.parse().ok())
        .unwrap_or_else(|| panic!("vendor code runs as its box user: {status}"));
    assert!(d.audited("phase.enable").is_empty());
    // 2. Nothing it started outlived the operation.
    wait_for(Duration::from_secs(5), "the box user's processes to be gone", || {
        processes_of(uid).is_empty().then_some(())
    });
    // 3. The audit log verifies, head and all, and the appliance keeps its chain.
    let audit = d.state.join("audit.jsonl");
    ok(d.server.cli(&["audit", "verify", "--file", audit.to_str().unwrap()]), "audit verify");
    assert!(!d.audited("operation.executed").is_empty());
    // 4. The pinned keys and the policy are as the customer left them.
    assert_eq!((sha256_of(&pinned), sha256_of(&d.state.join("policy.dsse.json"))), (keys_before, policy_before));

    // A restart starts on the same state, and nothing the script did shows in it.
    d.appliance.stop();
    let mut again = d.server.appliance_proc(&d.state, None, None);
    d.server.wait_connected(&mut again);
    let status = ok(d.local(&["appliance", "phase", "status"]), "phase status after restart");
    assert!(status.contains("disabled:  deploy"), "{status}");
}

#[test]
fn vendor_code_cannot_signal_the_appliance() {
    let mut d = Deployment::start(BIN, POLICY);
    // Every signal the box may send, to every process it may reach.
    d.push_template("signal", "operate", "[]", "#!/bin/sh\nkill -TERM -1\nkill -KILL -1\necho survived\n");
    let id = d.request("signal", "x");
    let op = d.wait_state(&id, "executed");
    assert!(op["state"] == "executed", "{op}");
    // The appliance is alive and still connected: it answers and takes the next operation.
    assert!(d.appliance.exited().is_none(), "the appliance was killed");
    let id = d.request("signal", "y");
    wait_for(Duration::from_secs(20), "a second operation to run", || {
        let op: serde_json::Value = serde_json::from_str(&d.server.ok(&["op", "show", &id])).unwrap();
        (op["state"] == "executed").then_some(())
    });
}
