//! Our DSSE envelopes against securesystemslib's reference implementation, both ways.
//! `scripts/test` installs it; if it is missing this test fails rather than skips.
// Test helpers panic to report failure.
#![allow(clippy::unwrap_used)]

use std::process::Command;

use airlock_core::customer_key::CustomerSigningKey;
use airlock_core::dsse::Envelope;

const TYPE: &str = "application/vnd.airlock.test+json";

fn peer(args: &[&str]) -> std::process::Output {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peers/dsse_peer.py");
    // scripts/test installs the peer in its own environment and names its interpreter here.
    let python = std::env::var("AIRLOCK_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(&python).arg(script).args(args).output().unwrap_or_else(|e| {
        panic!("cannot run {python} ({e}); run the tests with scripts/test, which installs the peer")
    });
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("ModuleNotFoundError"), "securesystemslib is not installed; run scripts/test: {stderr}");
    out
}

#[test]
fn reference_dsse_verifier_accepts_our_envelopes_and_refuses_tampered_ones() {
    let dir = tempfile::tempdir().unwrap();
    let key = CustomerSigningKey::from_seed([42; 32]);
    let public = dir.path().join("customer.pub");
    std::fs::write(&public, key.public().to_pem().unwrap()).unwrap();
    let payload = br#"{"request":"op_1","decision":"approve"}"#;
    let env = Envelope::new(TYPE, payload.to_vec()).sign(&key);

    let good = dir.path().join("good.json");
    std::fs::write(&good, env.to_json()).unwrap();
    let keyid = key.public().key_id();
    let out = peer(&["verify", good.to_str().unwrap(), public.to_str().unwrap(), &keyid]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.stdout, payload);

    let mut tampered = env.clone();
    tampered.payload = br#"{"request":"op_1","decision":"deny"}"#.to_vec();
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, tampered.to_json()).unwrap();
    let out = peer(&["verify", bad.to_str().unwrap(), public.to_str().unwrap(), &keyid]);
    assert!(!out.status.success(), "the reference verifier accepted a tampered payload");
}

#[test]
fn we_verify_envelopes_signed_by_the_reference_implementation() {
    let dir = tempfile::tempdir().unwrap();
    let key = CustomerSigningKey::from_seed([7; 32]);
    let private = dir.path().join("customer.key");
    std::fs::write(&private, key.to_pem().unwrap()).unwrap();
    let out = peer(&["sign", TYPE, "hello from python", private.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let env = Envelope::from_json(&out.stdout).unwrap();
    // securesystemslib names the key by its own key id, which is not ours: the id is only a
    // hint, so the signature still counts for the pinned key it verifies under.
    assert_ne!(env.signatures[0].keyid, key.public().key_id());
    let verified = env.verify(TYPE, &[key.public()], 1).unwrap();
    assert_eq!(verified.payload, b"hello from python");
    let other = CustomerSigningKey::from_seed([8; 32]);
    assert!(env.verify(TYPE, &[other.public()], 1).is_err());
}

#[test]
fn customer_keygen_writes_a_private_key_only_its_owner_can_read() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(["customer", "keygen", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let private = std::fs::read_to_string(dir.path().join("customer.key")).unwrap();
    let public = std::fs::read_to_string(dir.path().join("customer.pub")).unwrap();
    assert_eq!(std::fs::metadata(dir.path().join("customer.key")).unwrap().permissions().mode() & 0o777, 0o600);
    let key = CustomerSigningKey::from_pem(&private).unwrap();
    assert_eq!(key.public().to_pem().unwrap(), public);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains(&key.public().key_id()), "{stdout}");
    let body: String = private.lines().filter(|l| !l.starts_with("-----")).collect();
    assert!(!stdout.contains(&body), "the private key must not be printed");

    // The key is usable by standard tooling: the reference implementation signs with it.
    let signed = peer(&["sign", TYPE, "x", dir.path().join("customer.key").to_str().unwrap()]);
    assert!(signed.status.success(), "{}", String::from_utf8_lossy(&signed.stderr));

    // Running it again never replaces the pinned key.
    let again = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(["customer", "keygen", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("refusing to replace"));
    assert_eq!(std::fs::read_to_string(dir.path().join("customer.key")).unwrap(), private);
}

#[test]
fn every_envelope_of_a_manifest_verifies_with_the_reference_implementation() {
    let dir = tempfile::tempdir().unwrap();
    let fx = airlock_testkit::Fixture::new();
    let m = fx.manifest();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let customer = write("customer.pub", &fx.customer.public().to_pem().unwrap());
    let control_plane = write("control-plane.pem", &m.control_plane_certificate);
    let appliance = write("appliance.pem", m.appliance_certificate.as_deref().unwrap());
    let keyid = |cert: &str| {
        airlock_core::operation::certificate_key_id(&airlock_core::operation::pem_certificate_der(cert).unwrap())
            .unwrap()
    };
    let customer_id = fx.customer.public().key_id();
    let cases = [
        ("request", m.request.clone(), "verify-cert", control_plane.clone(), keyid(&m.control_plane_certificate)),
        ("approval", m.approval.clone().unwrap(), "verify", customer.clone(), customer_id.clone()),
        (
            "execution",
            m.execution.clone().unwrap(),
            "verify-cert",
            appliance.clone(),
            keyid(m.appliance_certificate.as_deref().unwrap()),
        ),
        ("release", m.release.clone().unwrap(), "verify", customer.clone(), customer_id.clone()),
    ];
    for (name, env, how, key, id) in cases {
        let path = write(&format!("{name}.json"), &env.to_json());
        let out = peer(&[how, &path, &key, &id]);
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(out.stdout, env.payload, "{name}");

        let mut tampered = env.clone();
        tampered.payload.push(b' ');
        let path = write(&format!("{name}-tampered.json"), &tampered.to_json());
        assert!(!peer(&[how, &path, &key, &id]).status.success(), "{name}: tampered payload accepted");
    }
    // The execution does not verify under the control plane's key, nor the reverse.
    let path = write("execution-2.json", &m.execution.clone().unwrap().to_json());
    assert!(!peer(&["verify-cert", &path, &control_plane, &keyid(&m.control_plane_certificate)]).status.success());
}
