//! The customer's release: checked against the signed output, decided once, signed by enough keys.

use std::sync::Arc;

use airlock_core::audit::AuditAction;
use airlock_core::dsse::Envelope;
use airlock_core::operation::{ReleaseDecision, ReleaseStatement};
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
        .release(HOST_ADMIN, &fx.release(op_id(1), ReleaseDecision::Release, |s| s.output_sha256 = "ab".repeat(32)))
        .unwrap_err();
    assert!(matches!(err, ApplianceError::Release(ReleaseRefusal::OtherOutput { id, .. }) if id == op_id(1)), "{err}");
    let err = fx
        .control
        .release(HOST_ADMIN, &fx.release(op_id(1), ReleaseDecision::Release, |s| s.output_size += 1))
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
            assert_eq!(r.output, fx.control.ops.open_output(op_id(1)).unwrap());
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
