//! Recovery: a stop, a crash or a full disk never loses a run, runs it twice, or leaves a gap
//! in the chain of signed executions.

use airlock_core::OperationId;
use airlock_core::audit::AuditAction;
use airlock_core::operation::ExecutionStatus;
use airlock_testkit::op_id;

use crate::ops_store::OpState;
use crate::result::{Outcome, ResultMsg};
use crate::testing::*;

#[tokio::test]
async fn an_operation_interrupted_by_a_stop_is_recorded_cancelled_at_restart() {
    let mut fx = Fx::new(ALL_PHASES);
    let script = "sleep 60\n";
    let stmt = fx.statement(op_id(25), MANIFEST, script, vars("api"));
    let handle = fx.start(&stmt, script).await;
    let pgid = loop {
        if let Some(g) = fx.control.running_group(op_id(25)) {
            break g;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    // The appliance stops: its tasks are dropped before they record anything, and what it
    // runs is killed on the way out.
    handle.abort();
    assert!(handle.await.unwrap_err().is_cancelled());
    let old = fx.control.clone();
    assert!(live_members(pgid) >= 1, "dropping the task does not stop the process");
    old.kill_all_running();
    eventually(|| live_members(pgid) == 0).await;
    assert_eq!(live_members(pgid), 0);
    fx.restart();
    assert_eq!(fx.exec.recover_interrupted().unwrap(), 1);
    let record = fx.control.ops.record(op_id(25)).unwrap().unwrap();
    assert_eq!(record.state, OpState::Cancelled);
    assert_eq!(fx.run(&stmt, "").await.outcome, Outcome::Cancelled);
    assert_eq!(fx.audited(AuditAction::OperationInterrupted).len(), 1);
}

#[tokio::test]
async fn an_execution_signed_just_before_a_stop_is_completed_without_a_chain_gap() {
    let mut fx = Fx::new(ALL_PHASES);
    let stmt = fx.simple(op_id(1), "api");
    let r = fx.run(&stmt, &fx.grant(&stmt)).await;
    // The stop came after the execution was signed and in the manifest, before it was recorded.
    fx.control
        .ops
        .update_record(op_id(1), |r| {
            r.state = OpState::Running;
            r.result = None;
            Ok(())
        })
        .unwrap();
    fx.control.ops.acknowledge(op_id(1), false).unwrap();
    let head = fx.control.ops.chain_head().unwrap();
    fx.restart();
    assert_eq!(fx.exec.recover_interrupted().unwrap(), 1);
    assert_eq!(fx.control.ops.chain_head().unwrap(), head, "nothing was signed again");
    assert_eq!(fx.run(&stmt, "").await, r);
    assert_eq!(fx.control.ops.pending().unwrap().len(), 1, "the result is queued again");
}

#[tokio::test]
async fn a_failure_to_record_a_run_is_recovered_at_once_and_its_result_queued() {
    let fx = Fx::new(ALL_PHASES);
    // The chain head cannot be written once (disk full) after the execution was signed.
    let r = run_with_faults(&fx, op_id(21), &["chain"]).await;
    assert_eq!(r.outcome, Outcome::Executed, "{r:?}");
    let e = fx.execution(&r);
    assert_eq!((e.status, e.exit_code, e.sequence), (ExecutionStatus::Completed, Some(0), 1));
    assert_eq!(fx.control.ops.open_output(op_id(21)).unwrap().bytes, b"done\n");
    assert_eq!(fx.control.ops.record(op_id(21)).unwrap().unwrap().state, OpState::Executed);
    assert_eq!(fx.control.ops.chain_head().unwrap().sequence, 1);
    assert_eq!(fx.control.ops.pending().unwrap().len(), 1, "the result is queued");
    assert_eq!(fx.audited(AuditAction::OperationError).len(), 1);
    // The chain goes on from it.
    let stmt = fx.simple(op_id(23), "api");
    let e2 = fx.execution(&fx.run(&stmt, &fx.grant(&stmt)).await);
    assert_eq!((e2.sequence, e2.previous_manifest_sha256), (2, Some(e.manifest_sha256())));
}

#[tokio::test]
async fn a_run_left_unrecorded_is_finished_by_the_next_instruction_for_it() {
    let fx = Fx::new(ALL_PHASES);
    // Recording fails, and so does the immediate second try.
    let r = run_with_faults(&fx, op_id(36), &["result", "result"]).await;
    assert_ne!(r.outcome, Outcome::Executed);
    assert_eq!(fx.control.ops.record(op_id(36)).unwrap().unwrap().state, OpState::Running);
    assert!(fx.control.ops.pending().unwrap().is_empty());
    // The control plane asks again (it has no result): it is finished from the signed manifest.
    let stmt = fx.statement(op_id(36), MANIFEST, "sleep 0.2\necho done\n", vars("api"));
    let again = fx.send(fx.instruction(&stmt, MANIFEST, "sleep 0.2\necho done\n", "")).await;
    assert_eq!(again.outcome, Outcome::Executed, "{again:?}");
    assert_eq!(fx.execution(&again).sequence, 1, "signed once");
    assert_eq!(fx.control.ops.chain_head().unwrap().sequence, 1);
    assert_eq!(fx.control.ops.record(op_id(36)).unwrap().unwrap().state, OpState::Executed);
    assert_eq!(fx.control.ops.pending().unwrap().len(), 1);
}

#[tokio::test]
async fn a_failed_manifest_write_never_leaves_the_chain_head_naming_a_lost_statement() {
    let fx = Fx::new(ALL_PHASES);
    // The manifest with the signed execution cannot be written once.
    let r = run_with_faults(&fx, op_id(27), &["manifest"]).await;
    assert_eq!(r.outcome, Outcome::Executed, "{r:?}");
    // The statement that could not be stored was never named by the head: the one signed
    // again takes its place, so the chain has no gap.
    let e = fx.execution(&r);
    assert_eq!((e.sequence, e.previous_manifest_sha256.as_deref()), (1, None));
    let head = fx.control.ops.chain_head().unwrap();
    assert_eq!((head.sequence, head.manifest_sha256), (1, Some(e.manifest_sha256())));
    let manifest = fx.control.ops.manifest(op_id(27)).unwrap().unwrap();
    assert_eq!(manifest.execution.unwrap().to_json(), r.execution_envelope_json);
}

#[tokio::test]
async fn a_statement_stored_before_its_chain_head_is_taken_up_at_recovery() {
    let mut fx = Fx::new(ALL_PHASES);
    let stmt = fx.simple(op_id(1), "api");
    let r = fx.run(&stmt, &fx.grant(&stmt)).await;
    let e = fx.execution(&r);
    // The stop came after the signed execution was stored, before the head was written.
    std::fs::remove_file(fx.dir.path().join(crate::ops_store::CHAIN_FILE)).unwrap();
    fx.control
        .ops
        .update_record(op_id(1), |r| {
            r.state = OpState::Running;
            r.result = None;
            Ok(())
        })
        .unwrap();
    fx.restart();
    assert_eq!(fx.exec.recover_interrupted().unwrap(), 1);
    let head = fx.control.ops.chain_head().unwrap();
    assert_eq!((head.sequence, head.manifest_sha256), (1, Some(e.manifest_sha256())));
    assert_eq!(fx.run(&stmt, "").await, r);
    let stmt2 = fx.simple(op_id(2), "api");
    let e2 = fx.execution(&fx.run(&stmt2, &fx.grant(&stmt2)).await);
    assert_eq!((e2.sequence, e2.previous_manifest_sha256), (2, Some(e.manifest_sha256())));
}

#[tokio::test]
async fn a_script_left_running_by_a_crash_is_killed_at_recovery() {
    let mut fx = Fx::new(ALL_PHASES);
    let script = "sleep 60 &\nsleep 60\n";
    let stmt = fx.statement(op_id(15), MANIFEST, script, vars("api"));
    let handle = fx.start(&stmt, script).await;
    let mut pgid = None;
    for _ in 0..100 {
        pgid = fx.control.running_group(op_id(15));
        if pgid.is_some_and(|g| live_members(g) >= 2) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let pgid = pgid.expect("the operation runs");
    // The appliance crashes: nothing of it runs on, nothing kills the script.
    handle.abort();
    let _ = handle.await;
    assert!(live_members(pgid) >= 2);
    fx.restart();
    assert_eq!(fx.exec.recover_interrupted().unwrap(), 1);
    eventually(|| live_members(pgid) == 0).await;
    assert_eq!(live_members(pgid), 0, "the orphaned script and its children are gone");
    assert_eq!(fx.control.ops.record(op_id(15)).unwrap().unwrap().state, OpState::Cancelled);
}

/// Starts an operation whose script sleeps a little, then makes the named writes fail once
/// each while it runs (the decision's writes are done by then).
async fn run_with_faults(fx: &Fx, id: OperationId, faults: &[&'static str]) -> ResultMsg {
    let script = "sleep 0.2\necho done\n";
    let stmt = fx.statement(id, MANIFEST, script, vars("api"));
    let handle = fx.start(&stmt, script).await;
    fx.control.ops.faults.lock().unwrap().extend_from_slice(faults);
    handle.await.unwrap()
}
