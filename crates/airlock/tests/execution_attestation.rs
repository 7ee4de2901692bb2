//! The vendor's CA alone cannot forge an execution: the customer attests the appliance's own
//! execution key on its host, and `airlock verify` refuses an execution that key did not sign,
//! even one under a certificate freshly minted by the control plane's own CA.
// Test helpers panic to report failure.
#![allow(clippy::unwrap_used)]

use std::process::Output;
use std::time::Duration;

use airlock_core::dsse::Envelope;
use airlock_core::operation::{EXECUTION_PAYLOAD_TYPE, ExecutionStatement, Manifest};
use airlock_testkit::e2e::{Deployment, credentials, ok, run};

/// The binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_airlock");

const POLICY: &str = "version = 1\nserial = 1\nphases = [\"observe\", \"operate\"]\n";

/// The execution of `m` edited (it now says the run succeeded) and signed, as the vendor would,
/// under a certificate its own CA mints for the appliance's identity.
fn forge_with_the_ca(d: &Deployment, m: &Manifest) -> Manifest {
    let data_dir = &d.server.data_dir;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let kek = airlock_server::keys::KekSource::default_for(data_dir);
    let ca = rt.block_on(airlock_server::open_ca(data_dir, &kek)).unwrap();
    let (cert_pem, _) = credentials(&d.state);
    let identity = airlock_core::certificate::inspect_pem(&cert_pem).unwrap().appliance_identity().unwrap();
    let mut statement: ExecutionStatement = serde_json::from_slice(&m.execution.as_ref().unwrap().payload).unwrap();
    statement.exit_code = Some(0);
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::default().serialize_request(&key).unwrap().pem().unwrap();
    let from = airlock_core::Timestamp::from_unix_millis(statement.started_at.unix_millis() - 60_000);
    let minted = ca.sign_join_csr(&csr, &identity, from, Duration::from_secs(3600)).unwrap();
    let envelope = Envelope::new(EXECUTION_PAYLOAD_TYPE, serde_json::to_vec(&statement).unwrap());
    let mut forged = m.clone();
    forged.execution = Some(airlock_testkit::certified::sign_with_certificate_key(
        envelope,
        minted.der.as_ref(),
        &key.serialize_der(),
    ));
    forged.appliance_certificate = Some(minted.pem);
    forged
}

#[test]
fn attested_executions_verify_and_one_re_signed_under_a_fresh_ca_certificate_is_refused() {
    let d = Deployment::start(BIN, POLICY);
    // The harness attested at install; attesting again shows what is attested, and can keep a copy.
    let copy = d.server.dir.path().join("attestation.json");
    let shown = ok(
        d.local(&["customer", "attest-appliance", "--key", &d.key(), "--out", copy.to_str().unwrap()]),
        "attest-appliance",
    );
    assert!(shown.contains(&d.appliance_id) && shown.contains("execution key  sha256:"), "{shown}");
    let envelope: Envelope = serde_json::from_slice(&std::fs::read(&copy).unwrap()).unwrap();
    assert_eq!(envelope.payload_type, airlock_core::execution_key::ATTESTATION_PAYLOAD_TYPE);
    let attested = d.audited("execution_key.attest");
    assert_eq!(attested.len(), 2);
    assert!(attested.iter().all(|r| r["outcome"] == "success"));

    d.push_template("greet", "operate", "[]", "#!/bin/sh\necho \"hello $AIRLOCK_VAR_NAME\"\nexit 3\n");
    let id = d.request("greet", "world");
    d.wait_state(&id, "awaiting_approval");
    d.approve(&id);
    d.wait_state(&id, "executed");

    let dir = d.server.dir.path();
    let pubkey = d.customer.join("customer.pub");
    let ca = d.state.join("ca.pem");
    let policy = d.server.dir.path().join("policy.json");
    let verify = |m: &Manifest, name: &str, extra: &[&str]| -> Output {
        let path = dir.join(name);
        std::fs::write(&path, serde_json::to_vec(m).unwrap()).unwrap();
        let mut args = vec!["verify", path.to_str().unwrap(), "--customer-key", pubkey.to_str().unwrap()];
        args.extend(["--ca", ca.to_str().unwrap(), "--policy", policy.to_str().unwrap()]);
        args.extend(extra);
        run(BIN, &args)
    };
    let stderr = |out: &Output| String::from_utf8_lossy(&out.stderr).into_owned();

    // The control plane serves the attestation with the manifest, and it verifies.
    let served: Manifest = serde_json::from_str(&d.server.ok(&["op", "manifest", &id])).unwrap();
    assert!(served.appliance_attestation.is_some());
    let out = ok(verify(&served, "m.json", &[]), "verify");
    assert!(out.contains("execution.attested-key") && out.contains("signed by the appliance's execution key"), "{out}");
    assert!(!out.contains("VENDOR-ATTESTED"), "{out}");

    // Re-signed under a certificate the CA minted for this very appliance: refused, with the reason.
    let forged = forge_with_the_ca(&d, &served);
    let out = verify(&forged, "forged.json", &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not signed by the execution key the customer attested"), "{}", stderr(&out));
    // Even when old manifests are allowed.
    assert!(!verify(&forged, "forged.json", &["--allow-vendor-attested"]).status.success());
    // With the attestation stripped it is vouched for by the CA alone; and the request the
    // customer approved names the attested host's key, so it is refused even where
    // vendor-attested manifests are accepted.
    assert!(served.request.payload.windows(14).any(|w| w == b"\"execution_key"), "the request names the host");
    let mut stripped = forged;
    stripped.appliance_attestation = None;
    let refusals = [
        (&[][..], "--allow-vendor-attested"),
        (&["--allow-vendor-attested"][..], "approved for the host with execution key"),
    ];
    for (extra, why) in refusals {
        let out = verify(&stripped, "stripped.json", extra);
        assert!(!out.status.success());
        assert!(stderr(&out).contains(why), "{}", stderr(&out));
    }

    // The appliance's own copy carries the attestation too.
    let local: Manifest =
        serde_json::from_str(&ok(d.local(&["appliance", "ops", "manifest", &id]), "ops manifest")).unwrap();
    assert_eq!(local.appliance_attestation, served.appliance_attestation);
    assert!(verify(&local, "local.json", &[]).status.success());
}
