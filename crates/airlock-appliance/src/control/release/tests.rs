//! The customer's release: checked against the signed output, decided once, signed by enough keys.

use std::sync::Arc;

use airlock_core::audit::AuditAction;
use airlock_core::dsse::Envelope;
use airlock_core::operation::{OutputCommitment, OutputSalt, ReleaseDecision, ReleaseStatement};
use airlock_proto::gateway::appliance_message;
use airlock_testkit::{customer, op_id};

use crate::result::Outcome;
use crate::testing::*;
use crate::{ApplianceError, ReleaseRefusal};

#[tokio::test]
async fn release_is_checked_against_the_signed_output_and_secret_output_stays() {
    let fx = Fx::new(ALL_PHASES);
    let stmt = fx.simple(op_id(1), "api");
    fx.run(&stmt, &fx.grant(&stmt)).await;
    let err = fx
        .control
        .release(
            HOST_ADMIN,
            &fx.release(op_id(1), ReleaseDecision::Release, |s| {
                s.output_commitment = OutputCommitment::Salted { digest: "ab".repeat(32), size: 1 }
            }),
        )
        .unwrap_err();
    assert!(matches!(err, ApplianceError::Release(ReleaseRefusal::OtherOutput { id, .. }) if id == op_id(1)), "{err}");
    let err = fx
        .control
        .release(
            HOST_ADMIN,
            &fx.release(op_id(1), ReleaseDecision::Release, |s| {
                if let OutputCommitment::Salted { size, .. } = &mut s.output_commitment {
                    *size += 1;
                }
            }),
        )
        .unwrap_err();
    assert!(matches!(err, ApplianceError::Release(ReleaseRefusal::OtherOutput { .. })), "{err}");
    let unpinned = {
        let env = fx.release(op_id(1), ReleaseDecision::Release, |_| {});
        let mut e = Envelope::from_json(&env).unwrap();
        e.signatures.clear();
        e.sign(&customer::key(9)).to_json().into_bytes()
    };
    assert!(matches!(
        fx.control.release(HOST_ADMIN, &unpinned),
        Err(ApplianceError::Release(ReleaseRefusal::NotVerified(_)))
    ));
    let (summary, msg) =
        fx.control.release(HOST_ADMIN, &fx.release(op_id(1), ReleaseDecision::Release, |_| {})).unwrap();
    assert_eq!(summary["release"], "release");
    match msg.unwrap().body {
        Some(appliance_message::Body::OutputRelease(r)) => {
            let held = fx.control.ops.open_output(op_id(1)).unwrap();
            assert_eq!(r.output, held.bytes);
            assert_eq!(r.output_salt, held.salt.unwrap().as_bytes());
        }
        other => panic!("{other:?}"),
    }
    assert!(fx.control.ops.manifest(op_id(1)).unwrap().unwrap().release.is_some());
    assert_eq!(fx.audited(AuditAction::OperationReleased).len(), 1);
    assert_eq!(fx.audited(AuditAction::OperationReleaseRefused).len(), 3);
    // Once decided, it stays decided.
    assert!(fx.control.release(HOST_ADMIN, &fx.release(op_id(1), ReleaseDecision::Withhold, |_| {})).is_err());

    // Secret-tagged output: release refused, withholding allowed.
    let secret_manifest = MANIFEST.replace("service:logs", "output:secret");
    let stmt = fx.statement(op_id(33), &secret_manifest, SCRIPT, vars("api"));
    let approval = fx.grant(&stmt);
    fx.send(fx.instruction(&stmt, &secret_manifest, SCRIPT, &approval)).await;
    let err = fx.control.release(HOST_ADMIN, &fx.release(op_id(33), ReleaseDecision::Release, |_| {})).unwrap_err();
    assert!(matches!(err, ApplianceError::Release(ReleaseRefusal::SecretOutput(id)) if id == op_id(33)), "{err}");
    assert!(err.to_string().contains("never leaves this host"), "the customer is told why: {err}");
    let (summary, msg) =
        fx.control.release(HOST_ADMIN, &fx.release(op_id(33), ReleaseDecision::Withhold, |_| {})).unwrap();
    assert_eq!(summary["release"], "withhold");
    match msg.unwrap().body {
        Some(appliance_message::Body::OutputRelease(r)) => assert!(r.output.is_empty()),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn two_decisions_about_one_output_at_once_admit_exactly_one() {
    let fx = Fx::new(ALL_PHASES);
    for n in 0..5 {
        let id = op_id(100 + n);
        let stmt = fx.simple(id, "api");
        fx.run(&stmt, &fx.grant(&stmt)).await;
        let release = fx.release(id, ReleaseDecision::Release, |_| {});
        let withhold = fx.release(id, ReleaseDecision::Withhold, |_| {});
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let calls: Vec<_> = [release, withhold]
            .into_iter()
            .map(|env| {
                let (control, barrier) = (fx.control.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    control.release(HOST_ADMIN, &env).map(|(summary, _)| summary)
                })
            })
            .collect();
        let outcomes: Vec<_> = calls.into_iter().map(|t| t.join().unwrap()).collect();
        let won: Vec<_> = outcomes.iter().filter_map(|o| o.as_ref().ok()).collect();
        assert_eq!(won.len(), 1, "{outcomes:?}");
        let lost = outcomes.iter().find_map(|o| o.as_ref().err()).unwrap();
        assert!(matches!(lost, ApplianceError::Release(ReleaseRefusal::AlreadyDecided { .. })), "{lost}");
        // What is recorded, in the manifest and queued is the one decision that held.
        let record = fx.control.ops.record(id).unwrap().unwrap();
        let decided = if won[0]["release"] == "release" { ReleaseDecision::Release } else { ReleaseDecision::Withhold };
        assert_eq!(record.release, Some(decided));
        let manifest = fx.control.ops.manifest(id).unwrap().unwrap();
        let signed: ReleaseStatement = serde_json::from_slice(&manifest.release.unwrap().payload).unwrap();
        assert_eq!(signed.decision, decided);
    }
}

#[tokio::test]
async fn a_release_needs_as_many_customer_signatures_as_the_policy_asks() {
    let fx = Fx::new(&format!("{ALL_PHASES}approvals_required = 2\n"));
    assert_eq!(fx.control.threshold(), 2);
    let stmt = fx.simple(op_id(10), "api");
    let grant = Envelope::from_json(fx.grant(&stmt).as_bytes()).unwrap().sign(&customer::key(2)).to_json();
    assert_eq!(fx.run(&stmt, &grant).await.outcome, Outcome::Executed);
    // One signature is not enough.
    let one = fx.release(op_id(10), ReleaseDecision::Release, |_| {});
    let err = fx.control.release(HOST_ADMIN, &one).unwrap_err();
    assert!(matches!(err, ApplianceError::Release(ReleaseRefusal::NotVerified(_))), "{err}");
    assert_eq!(fx.control.ops.record(op_id(10)).unwrap().unwrap().release, None);
    // Two distinct pinned keys (what `airlock customer release --key a --key b` signs) are.
    let two = Envelope::from_json(&one).unwrap().sign(&customer::key(2)).to_json().into_bytes();
    let (summary, _) = fx.control.release(HOST_ADMIN, &two).unwrap();
    assert_eq!(summary["release"], "release");
}

/// Every byte this appliance would send the control plane now: its outbox, as encoded on the wire.
fn outbox_bytes(fx: &Fx) -> Vec<u8> {
    use prost::Message;
    fx.control.ops.pending().unwrap().iter().flat_map(|m| m.encode_to_vec()).collect()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn a_secret_tagged_run_signs_neither_digest_nor_size() {
    let fx = Fx::new(ALL_PHASES);
    let secret_manifest = MANIFEST.replace("service:logs", "output:secret");
    let stmt = fx.statement(op_id(33), &secret_manifest, SCRIPT, vars("api"));
    let approval = fx.grant(&stmt);
    let r = fx.send(fx.instruction(&stmt, &secret_manifest, SCRIPT, &approval)).await;
    assert_eq!(r.outcome, Outcome::Executed);
    // The signed bytes themselves, as they go up.
    let signed = Envelope::from_json(r.execution_envelope_json.as_bytes()).unwrap().payload;
    let fields: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&signed).unwrap();
    assert_eq!(fields["output_commitment"], "secret");
    for absent in ["output_sha256", "output_size", "output_truncated"] {
        assert!(!fields.contains_key(absent), "{absent} is signed: {}", String::from_utf8_lossy(&signed));
    }
    let held = fx.control.ops.open_output(op_id(33)).unwrap();
    let sent = outbox_bytes(&fx);
    assert!(!contains(&sent, airlock_core::operation::sha256_hex(&held.bytes).as_bytes()));
    assert!(!contains(&sent, held.salt.unwrap().as_bytes()));
    assert_eq!(fx.execution(&r).output_truncated, None);
}

#[tokio::test]
async fn the_salt_leaves_only_with_released_output_and_identical_outputs_commit_differently() {
    let fx = Fx::new(ALL_PHASES);
    // A four-digit PIN: trivially guessed from an unsalted digest.
    let pin = "#!/bin/sh\necho 4821\n";
    for n in [1, 2] {
        let stmt = fx.statement(op_id(n), MANIFEST, pin, vars("api"));
        let approval = fx.grant(&stmt);
        assert_eq!(fx.send(fx.instruction(&stmt, MANIFEST, pin, &approval)).await.outcome, Outcome::Executed);
    }
    let (one, two) = (fx.control.ops.open_output(op_id(1)).unwrap(), fx.control.ops.open_output(op_id(2)).unwrap());
    assert_eq!((one.bytes.as_slice(), two.bytes.as_slice()), (&b"4821\n"[..], &b"4821\n"[..]));
    let commitment = |n| fx.control.ops.record(op_id(n)).unwrap().unwrap().commitment().unwrap();
    assert_ne!(commitment(1), commitment(2));
    let (salt1, salt2) = (one.salt.clone().unwrap(), two.salt.clone().unwrap());
    assert_ne!(salt1, salt2);
    // Before any release, neither salt is in anything sent, nor in clear in any file.
    let sent = outbox_bytes(&fx);
    for salt in [&salt1, &salt2] {
        assert!(!contains(&sent, salt.as_bytes()) && !contains(&sent, salt.to_hex().as_bytes()));
        for f in all_files(fx.dir.path()) {
            let bytes = std::fs::read(&f).unwrap();
            assert!(!contains(&bytes, salt.to_hex().as_bytes()), "salt in clear in {}", f.display());
        }
    }
    // A withholding reveals nothing either.
    let (_, msg) = fx.control.release(HOST_ADMIN, &fx.release(op_id(2), ReleaseDecision::Withhold, |_| {})).unwrap();
    match msg.unwrap().body {
        Some(appliance_message::Body::OutputRelease(r)) => assert!(r.output.is_empty() && r.output_salt.is_empty()),
        other => panic!("{other:?}"),
    }
    assert!(fx.control.ops.manifest(op_id(2)).unwrap().unwrap().output_salt.is_none());
    assert!(!contains(&outbox_bytes(&fx), salt2.as_bytes()));
    // The release reveals the salt, beside the output and in the manifest.
    let (_, msg) = fx.control.release(HOST_ADMIN, &fx.release(op_id(1), ReleaseDecision::Release, |_| {})).unwrap();
    match msg.unwrap().body {
        Some(appliance_message::Body::OutputRelease(r)) => assert_eq!(r.output_salt, salt1.as_bytes()),
        other => panic!("{other:?}"),
    }
    assert_eq!(fx.control.ops.manifest(op_id(1)).unwrap().unwrap().output_salt, Some(salt1));
}

#[tokio::test]
async fn a_release_is_refused_when_the_held_salt_or_bytes_no_longer_open_the_commitment() {
    let fx = Fx::new(ALL_PHASES);
    let stmt = fx.simple(op_id(1), "api");
    fx.run(&stmt, &fx.grant(&stmt)).await;
    let held = fx.control.ops.open_output(op_id(1)).unwrap();
    let mut altered = held.bytes.clone();
    altered[0] ^= 1;
    let salt = held.salt.unwrap();
    for (salt, bytes) in [(OutputSalt::from_bytes([7; 32]), held.bytes.as_slice()), (salt, altered.as_slice())] {
        // Sealed under the appliance's own key: only the commitment can tell.
        fx.control.ops.seal_output(op_id(1), &salt, bytes).unwrap();
        let err = fx.control.release(HOST_ADMIN, &fx.release(op_id(1), ReleaseDecision::Release, |_| {})).unwrap_err();
        assert!(matches!(err, ApplianceError::Release(ReleaseRefusal::HeldOutputMismatch(_))), "{err}");
        assert_eq!(fx.control.ops.record(op_id(1)).unwrap().unwrap().release, None);
        assert!(fx.control.ops.manifest(op_id(1)).unwrap().unwrap().output_salt.is_none());
    }
    assert!(!contains(&outbox_bytes(&fx), &altered));
}
