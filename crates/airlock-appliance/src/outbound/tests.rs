//! The outbox on the stream: order at reconnect, and what each ack code does.

use airlock_core::OperationId;
use airlock_core::audit::AuditAction;
use airlock_core::operation::{AckCode, ReleaseDecision};
use airlock_proto::gateway::OperationAckKind;
use airlock_testkit::op_id;

use crate::admin::Request;
use crate::testing::*;

#[tokio::test]
async fn at_reconnect_results_go_before_releases_and_a_local_release_does_not_overtake_them() {
    let fx = Fx::new(ALL_PHASES);
    // Disconnected: three results and one release wait in the outbox.
    for id in [op_id(1), op_id(2), op_id(3)] {
        let stmt = fx.simple(id, "api");
        fx.run(&stmt, &fx.grant(&stmt)).await;
    }
    fx.control.release(HOST_ADMIN, &fx.release(op_id(1), ReleaseDecision::Release, |_| {})).unwrap();
    // The stream comes up; it takes one message at a time, so the resend is still going when
    // the customer releases the output of the last operation on this host.
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    let control = fx.control.clone();
    let resend = tokio::spawn(async move { control.outbound.connected(tx).await });
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let envelope: serde_json::Value =
        serde_json::from_slice(&fx.release(op_id(3), ReleaseDecision::Release, |_| {})).unwrap();
    let control = fx.control.clone();
    let local =
        tokio::spawn(async move { crate::admin::handle(&control, HOST_ADMIN, Request::Release { envelope }).await });
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let mut got = Vec::new();
    while got.len() < 5 {
        let m = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv()).await.unwrap().unwrap();
        got.push(m);
    }
    resend.await.unwrap();
    local.await.unwrap().unwrap();
    assert_eq!(
        kinds(&got),
        [
            ("result", op_id(1)),
            ("result", op_id(2)),
            ("result", op_id(3)),
            ("release", op_id(1)),
            ("release", op_id(3))
        ]
    );
}

#[tokio::test]
async fn a_release_the_control_plane_cannot_take_yet_stays_in_the_outbox() {
    let fx = Fx::new(ALL_PHASES);
    let stmt = fx.simple(op_id(1), "api");
    fx.run(&stmt, &fx.grant(&stmt)).await;
    fx.control.release(HOST_ADMIN, &fx.release(op_id(1), ReleaseDecision::Release, |_| {})).unwrap();
    let _ =
        fx.control.outbound.on_ack(&ack(op_id(1), OperationAckKind::Release, AckCode::Retry, "no result stored yet"));
    assert_eq!(kinds(&fx.control.ops.pending().unwrap()), [("result", op_id(1)), ("release", op_id(1))]);
    let _ = fx.control.outbound.on_ack(&stored(op_id(1), OperationAckKind::Result));
    let _ = fx.control.outbound.on_ack(&stored(op_id(1), OperationAckKind::Release));
    assert!(fx.control.ops.pending().unwrap().is_empty());
}

#[tokio::test]
async fn a_final_release_refusal_and_a_retryable_one_are_told_apart_by_code_not_text() {
    let fx = Fx::new(ALL_PHASES);
    let stmt = fx.simple(op_id(1), "api");
    fx.run(&stmt, &fx.grant(&stmt)).await;
    let _ = fx.control.outbound.on_ack(&stored(op_id(1), OperationAckKind::Result));
    fx.control.release(HOST_ADMIN, &fx.release(op_id(1), ReleaseDecision::Release, |_| {})).unwrap();
    // The same words, and the words the final refusal of a release on the control plane uses.
    let words = "operation has no execution whose output could be released";
    // Retry: kept, to go again after its result; nothing is audited as refused.
    let retry = ack(op_id(1), OperationAckKind::Release, AckCode::Retry, words);
    assert!(fx.control.outbound.on_ack(&retry).is_none());
    assert_eq!(kinds(&fx.control.ops.pending().unwrap()), [("release", op_id(1))]);
    assert!(fx.audited(AuditAction::OperationAckRefused).is_empty());
    assert!(fx.control.ops.parked_releases().unwrap().is_empty());
    // No code, or one this build does not know: never taken as stored; kept, and audited.
    for code in [0, 99] {
        let mut unknown = ack(op_id(1), OperationAckKind::Release, AckCode::Stored, words);
        unknown.code = code;
        assert!(fx.control.outbound.on_ack(&unknown).is_none());
        assert_eq!(kinds(&fx.control.ops.pending().unwrap()), [("release", op_id(1))]);
    }
    assert_eq!(fx.audited(AuditAction::OperationError).len(), 2);
    // Refused: final. Out of the outbox, kept in `parked/`, audited.
    let refused = ack(op_id(1), OperationAckKind::Release, AckCode::Refused, words);
    assert!(fx.control.outbound.on_ack(&refused).is_none());
    assert!(fx.control.ops.pending().unwrap().is_empty());
    assert_eq!(fx.control.ops.parked_releases().unwrap(), [op_id(1)]);
    assert_eq!(fx.audited(AuditAction::OperationAckRefused).len(), 1);
    assert_eq!(fx.audited(AuditAction::OperationReleaseParked).len(), 1);
}

#[tokio::test]
async fn a_release_waiting_for_its_result_goes_as_soon_as_the_result_is_acknowledged() {
    let fx = Fx::new(ALL_PHASES);
    for id in [op_id(1), op_id(2)] {
        let stmt = fx.simple(id, "api");
        fx.run(&stmt, &fx.grant(&stmt)).await;
    }
    fx.control.release(HOST_ADMIN, &fx.release(op_id(1), ReleaseDecision::Release, |_| {})).unwrap();
    // op_2 has no release waiting: nothing follows its result.
    assert!(fx.control.outbound.on_ack(&stored(op_id(2), OperationAckKind::Result)).is_none());
    // op_1's release was sent before its result was stored (the control plane does not answer
    // such a release): storing the result sends it at once, not at the next reconnect.
    let next = fx.control.outbound.on_ack(&stored(op_id(1), OperationAckKind::Result)).expect("the waiting release");
    assert_eq!(kinds(std::slice::from_ref(&next)), [("release", op_id(1))]);
    // It goes on the current stream.
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    fx.control.outbound.connected(tx).await;
    assert_eq!(kinds(&[rx.recv().await.unwrap()]), [("release", op_id(1))]);
    fx.control.outbound.send(next).await;
    assert_eq!(kinds(&[rx.recv().await.unwrap()]), [("release", op_id(1))]);
    // Acknowledged: gone, and a second result ack sends nothing.
    assert!(fx.control.outbound.on_ack(&stored(op_id(1), OperationAckKind::Release)).is_none());
    assert!(fx.control.outbound.on_ack(&stored(op_id(1), OperationAckKind::Result)).is_none());
    assert!(fx.control.ops.pending().unwrap().is_empty());
}

#[tokio::test]
async fn a_release_whose_result_is_refused_for_good_is_parked_not_resent() {
    let fx = Fx::new(ALL_PHASES);
    for id in [op_id(1), op_id(2)] {
        let stmt = fx.simple(id, "api");
        fx.run(&stmt, &fx.grant(&stmt)).await;
    }
    fx.control.release(HOST_ADMIN, &fx.release(op_id(1), ReleaseDecision::Release, |_| {})).unwrap();
    let refused = |id: OperationId| {
        ack(id, OperationAckKind::Result, AckCode::Refused, "the execution is not signed by this appliance")
    };
    assert!(fx.control.outbound.on_ack(&refused(op_id(1))).is_none());
    // Neither the result nor its release is resent at the next reconnect ...
    assert_eq!(kinds(&fx.control.ops.pending().unwrap()), [("result", op_id(2))]);
    // ... but both are kept on disk, and the parking is audited.
    assert_eq!(fx.control.ops.parked_releases().unwrap(), [op_id(1)]);
    assert!(fx.dir.path().join(format!("parked/{}.result.json", op_id(1))).exists());
    let parked = fx.audited(AuditAction::OperationReleaseParked);
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0]["detail"]["request_id"], op_id(1).to_string());
    // A release decided after the result was refused is parked at once and not sent.
    assert!(fx.control.outbound.on_ack(&refused(op_id(2))).is_none());
    assert_eq!(fx.audited(AuditAction::OperationReleaseParked).len(), 1);
    let (summary, msg) =
        fx.control.release(HOST_ADMIN, &fx.release(op_id(2), ReleaseDecision::Withhold, |_| {})).unwrap();
    assert_eq!(summary["release"], "withhold");
    assert!(msg.is_none());
    assert!(fx.control.ops.pending().unwrap().is_empty());
    assert_eq!(fx.control.ops.parked_releases().unwrap(), [op_id(1), op_id(2)]);
    assert_eq!(fx.audited(AuditAction::OperationReleaseParked).len(), 2);
}
