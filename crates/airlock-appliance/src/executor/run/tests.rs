//! Running scripts: everything a run started goes when the customer switches its phase off.

use airlock_core::audit::AuditAction;
use airlock_core::operation::ExecutionStatus;
use airlock_core::policy::{POLICY_PAYLOAD_TYPE, Phase};
use airlock_testkit::{customer, op_id};

use crate::executor::Handled;
use crate::ops_store::OpState;
use crate::result::Outcome;
use crate::testing::*;

#[tokio::test]
async fn disabling_the_phase_kills_the_whole_process_group_and_records_cancelled() {
    let fx = Fx::new(ALL_PHASES);
    let script = "echo started\nsleep 60 &\nsleep 60\necho never\n";
    let stmt = fx.statement(op_id(26), MANIFEST, script, vars("api"));
    let approval = fx.grant(&stmt);
    let handle = fx.start(&stmt, script).await;
    let mut pgid = None;
    for _ in 0..100 {
        pgid = fx.control.running_group(op_id(26));
        if pgid.is_some_and(|g| live_members(g) >= 2) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let pgid = pgid.expect("the operation is running");
    assert!(live_members(pgid) >= 2, "the shell and its background sleep");
    // Asked again while it runs: nothing new starts.
    assert!(matches!(fx.exec.handle(fx.instruction(&stmt, MANIFEST, script, &approval)).await, Handled::Nothing));
    fx.control.set_phase(HOST_ADMIN, Phase::Operate, false).unwrap();
    let r = tokio::time::timeout(std::time::Duration::from_secs(10), handle).await.unwrap().unwrap();
    assert_eq!(r.outcome, Outcome::Cancelled, "{r:?}");
    assert_eq!(fx.execution(&r).status, ExecutionStatus::Cancelled);
    assert_eq!(fx.control.ops.record(op_id(26)).unwrap().unwrap().state, OpState::Cancelled);
    assert_eq!(fx.audited(AuditAction::OperationCancelled).len(), 1);
    let output = String::from_utf8(fx.control.ops.open_output(op_id(26)).unwrap().bytes).unwrap();
    assert_eq!(output, "started\n");
    eventually(|| live_members(pgid) == 0).await;
    assert_eq!(live_members(pgid), 0, "the whole process group is gone");
}

#[tokio::test]
async fn a_new_policy_without_the_phase_cancels_running_operations() {
    let fx = Fx::new(ALL_PHASES);
    let script = "sleep 60\n";
    let stmt = fx.statement(op_id(30), MANIFEST, script, vars("api"));
    let handle = fx.start(&stmt, script).await;
    eventually(|| fx.control.running_group(op_id(30)).is_some()).await;
    let next = customer::sign(POLICY_PAYLOAD_TYPE, b"version = 1\nserial = 2\nphases = [\"observe\"]\n".to_vec(), &[1])
        .to_json();
    let status = fx.control.load_policy(HOST_ADMIN, next.as_bytes()).unwrap();
    assert_eq!(status.effective, vec![Phase::Observe]);
    let r = tokio::time::timeout(std::time::Duration::from_secs(10), handle).await.unwrap().unwrap();
    assert_eq!(r.outcome, Outcome::Cancelled);
    // A policy that does not verify is refused and the one in force stays.
    let forged = customer::sign(POLICY_PAYLOAD_TYPE, ALL_PHASES.replace("serial = 1", "serial = 3").into_bytes(), &[9])
        .to_json();
    assert!(fx.control.load_policy(HOST_ADMIN, forged.as_bytes()).is_err());
    assert_eq!(fx.control.status().policy_serial, Some(2));
}

#[tokio::test]
async fn a_process_that_left_its_group_with_setsid_dies_with_its_run() {
    let fx = Fx::new(ALL_PHASES);
    // The escape the process-group kill missed: a new session, double-forked, left running.
    let script = "setsid sh -c 'echo $$ > escaped.pid; exec sleep 60' &\nsleep 60\n";
    let stmt = fx.statement(op_id(27), MANIFEST, script, vars("api"));
    let handle = fx.start(&stmt, script).await;
    let pid_file = fx.exec.workdir(op_id(27)).join("escaped.pid");
    eventually(|| std::fs::read_to_string(&pid_file).is_ok_and(|p| p.ends_with('\n'))).await;
    let escaped: i32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
    assert!(alive(escaped), "the escaped process runs in a session of its own");
    fx.control.set_phase(HOST_ADMIN, Phase::Operate, false).unwrap();
    let r = tokio::time::timeout(std::time::Duration::from_secs(10), handle).await.unwrap().unwrap();
    assert_eq!(r.outcome, Outcome::Cancelled, "{r:?}");
    eventually(|| !alive(escaped)).await;
    assert!(!alive(escaped), "what left the process group died with its cell");
}

#[tokio::test]
async fn a_run_past_its_time_limit_is_killed_whole_and_recorded_as_timed_out() {
    let fx = Fx::new(ALL_PHASES);
    // The template asks for a second; it tries to outlive it in a session of its own, too.
    let manifest = format!("{MANIFEST}\n[run]\nwall_time_seconds = 1\n");
    let script = "echo started\nsetsid sh -c 'echo $$ > escaped.pid; exec sleep 60' &\nsleep 60\n";
    let stmt = fx.statement(op_id(28), &manifest, script, vars("api"));
    let Handled::Started(handle) = fx.exec.handle(fx.instruction(&stmt, &manifest, script, &fx.grant(&stmt))).await
    else {
        panic!("not started")
    };
    let pid_file = fx.exec.workdir(op_id(28)).join("escaped.pid");
    eventually(|| std::fs::read_to_string(&pid_file).is_ok_and(|p| p.ends_with('\n'))).await;
    let escaped: i32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
    let r = tokio::time::timeout(std::time::Duration::from_secs(10), handle).await.unwrap().unwrap();
    assert_eq!(r.outcome, Outcome::Executed, "{r:?}");
    assert_eq!(fx.execution(&r).status, ExecutionStatus::TimedOut);
    assert_eq!(String::from_utf8(fx.control.ops.open_output(op_id(28)).unwrap().bytes).unwrap(), "started\n");
    eventually(|| !alive(escaped)).await;
    assert!(!alive(escaped), "what it started died with it");
}

/// Whether process `pid` runs (and is not a zombie).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit_once(") ").is_some_and(|(_, r)| !r.starts_with('Z')))
}

#[tokio::test]
async fn root_runs_only_with_the_customers_approval_of_the_request_and_is_audited() {
    let fx = Fx::new(ALL_PHASES);
    let manifest = format!("{MANIFEST}\n[run]\nuser = \"root\"\n");
    let script = "id -u\n";
    let stmt = fx.statement(op_id(40), &manifest, script, vars("api"));
    assert!(stmt.command.run.user == airlock_core::run_spec::RunUser::Root, "in the command the customer signs");
    let r = fx.send(fx.instruction(&stmt, &manifest, script, &fx.grant(&stmt))).await;
    assert_eq!(r.outcome, Outcome::Executed, "{r:?}");
    assert_eq!(String::from_utf8(fx.control.ops.open_output(op_id(40)).unwrap().bytes).unwrap(), "0\n");
    let allowed = fx.audited(AuditAction::OperationAllowed);
    assert_eq!(allowed.last().unwrap()["detail"]["run_as"], "root");
    // Without an approval (a window would otherwise cover it), it does not run.
    let windowed = Fx::new(&format!(
        "{ALL_PHASES}[[windows]]\nphase = \"operate\"\ndays = [\"mon\", \"tue\", \"wed\", \"thu\", \"fri\", \"sat\", \"sun\"]\nstart = \"00:00\"\nend = \"23:59\"\n"
    ));
    let stmt = windowed.statement(op_id(41), &manifest, script, vars("api"));
    let r = windowed.send(windowed.instruction(&stmt, &manifest, script, "")).await;
    assert_eq!(r.outcome, Outcome::AwaitingApproval, "{r:?}");
    assert!(!windowed.ran(op_id(41)));
    // The same template without root runs in that window, as the box user.
    let stmt = windowed.statement(op_id(42), MANIFEST, script, vars("api"));
    let r = windowed.send(windowed.instruction(&stmt, MANIFEST, script, "")).await;
    assert_eq!(r.outcome, Outcome::Executed, "{r:?}");
    let uid: u32 =
        String::from_utf8(windowed.control.ops.open_output(op_id(42)).unwrap().bytes).unwrap().trim().parse().unwrap();
    assert!(uid >= 61184, "{uid}");
    assert_eq!(
        windowed.audited(AuditAction::OperationAllowed).last().unwrap()["detail"]["run_as"]["box_user"]["uid"],
        uid
    );
}

#[tokio::test]
async fn an_appliance_that_cannot_switch_users_runs_deploy_and_operate_only_if_the_policy_accepts_it() {
    let mut fx = Fx::new(ALL_PHASES);
    fx.run_vendor_code_as_the_appliance_user();
    let stmt = fx.simple(op_id(43), "api");
    let r = fx.run(&stmt, &fx.grant(&stmt)).await;
    assert_denied(&r, airlock_core::grant::DenyCode::SameUserNotAccepted);
    let mut fx = Fx::new(&format!("{ALL_PHASES}[vendor_code]\nsame_user = true\n"));
    fx.run_vendor_code_as_the_appliance_user();
    let stmt = fx.simple(op_id(44), "api");
    let r = fx.run(&stmt, &fx.grant(&stmt)).await;
    assert_eq!(r.outcome, Outcome::Executed, "{r:?}");
    assert_eq!(fx.audited(AuditAction::OperationAllowed).last().unwrap()["detail"]["run_as"], "appliance_user");
    assert!(fx.control.status().same_user_accepted, "phase status shows it");
}

#[tokio::test]
async fn a_script_writing_past_its_box_disk_limit_is_killed_and_recorded_over_limit() {
    // --box-disk-mib 1: the script writes 4 MiB into its working directory, then waits.
    let disk = crate::config::BoxDisk { box_bytes: 1 << 20, ..Default::default() };
    let fx = Fx::with_disk(ALL_PHASES, disk);
    let script = "echo started\nhead -c 4194304 /dev/zero > fill\nsleep 60\necho never\n";
    let stmt = fx.statement(op_id(29), MANIFEST, script, vars("api"));
    let handle = fx.start(&stmt, script).await;
    // The watch passes every 3 s.
    let r = tokio::time::timeout(std::time::Duration::from_secs(15), handle).await.unwrap().unwrap();
    assert_eq!(r.outcome, Outcome::Executed, "{r:?}");
    let execution = fx.execution(&r);
    assert_eq!(execution.status, ExecutionStatus::OverLimit);
    assert_eq!(serde_json::to_value(execution.status).unwrap(), "over-limit");
    assert_eq!(String::from_utf8(fx.control.ops.open_output(op_id(29)).unwrap().bytes).unwrap(), "started\n");
    let killed = fx.audited(AuditAction::BoxOverLimit);
    assert_eq!(killed.len(), 1, "{killed:?}");
    assert_eq!(killed[0]["detail"]["cell"], op_id(29).to_string(), "{killed:?}");
    assert!(killed[0]["detail"]["reason"].as_str().unwrap().contains("over its limit of 1.0 MiB"), "{killed:?}");
    let executed = fx.audited(AuditAction::OperationExecuted);
    assert_eq!(executed.last().unwrap()["detail"]["status"], "over-limit", "{executed:?}");
    assert!(!fx.exec.workdir(op_id(29)).exists(), "what it wrote is gone with its box");
}
