//! Deciding about deploys: the release must verify with a vendor key the control plane relayed
//! and the customer's policy accepts, the signed request must deploy exactly that release, and
//! the customer's authority decides as for any Deploy-phase operation.

use airlock_core::dsse::Envelope;
use airlock_core::grant::DenyCode;
use airlock_core::operation::RefusalCode;
use airlock_core::release::VerifiedRelease;
use airlock_testkit::op_id;

use crate::result::Outcome;
use crate::testing::*;

const RELEASE: &str = "name = \"shop\"\nversion = \"1.0.0\"\n\n[[service]]\nname = \"web\"\ncommand = \"bin/web\"\n";
const WEB: &[u8] = b"#!/bin/sh\nexec sleep 600\n";

fn release(manifest: &str, key: u8) -> (Envelope, VerifiedRelease) {
    vendor_release(manifest, &[("bin/web", WEB)], key)
}

/// A release whose service `web` serves `content` on `port` (health-checked over HTTP), with
/// `secrets` in its environment; its artifacts are put in the appliance's blob store.
fn web(fx: &Fx, version: &str, port: u16, content: &str, check: &str, secrets: &str) -> (Envelope, VerifiedRelease) {
    let manifest = format!(
        r#"
name = "shop"
version = "{version}"

[[service]]
name = "web"
command = "bin/web"
env = {{ PORT = "{port}" }}
secrets = {{ {secrets} }}
stop_timeout_secs = 2
restart = {{ policy = "on-failure", initial_backoff_ms = 100, max_backoff_ms = 400 }}
health = [{{ probe = {{ http = {{ path = "{check}", port = {port} }} }}, interval_secs = 1, timeout_secs = 1 }}]
"#
    );
    let script: &[u8] = b"#!/bin/sh\nexec python3 -m http.server \"$PORT\" --bind 127.0.0.1 --directory www\n";
    let files: [(&str, &[u8]); 2] = [("bin/web", script), ("www/index.html", content.as_bytes())];
    let blobs = fx.dir.path().join("artifacts/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    for (_, bytes) in files {
        std::fs::write(blobs.join(airlock_core::operation::sha256_hex(bytes)), bytes).unwrap();
    }
    vendor_release(&manifest, &files, 1)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The page the release on `port` serves, once it answers (a release restarted by a rollback
/// takes a moment to listen again).
async fn fetch(port: u16) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tries = 0;
    let mut s = loop {
        match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            Ok(s) => break s,
            Err(e) if tries < 100 => {
                tries += 1;
                let _ = e;
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => panic!("nothing listens on {port}: {e}"),
        }
    };
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// `instruction` handed to the executor, which starts it; the task ends with its result.
fn started(
    fx: &Fx,
    instruction: airlock_proto::gateway::OperationInstruction,
) -> tokio::task::JoinHandle<crate::result::ResultMsg> {
    let exec = fx.exec.clone();
    tokio::spawn(async move {
        match exec.handle(instruction).await {
            crate::executor::Handled::Started(h) => h.await.unwrap(),
            other => panic!("{other:?}"),
        }
    })
}

/// The `DeploymentStatus` messages the appliance sent up, in order.
fn statuses(fx: &Fx) -> Vec<airlock_proto::gateway::DeploymentStatus> {
    fx.sent()
        .into_iter()
        .filter_map(|m| match m.body {
            Some(airlock_proto::gateway::appliance_message::Body::DeploymentStatus(s)) => Some(s),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approved_deploy_installs_serves_and_upgrades_and_a_failed_one_rolls_back() {
    let fx = Fx::new(ALL_PHASES);
    fx.listen().await;
    let port = free_port();
    let (envelope, v1) = web(&fx, "1.0.0", port, "shop v1", "/", "");
    let stmt = fx.deploy_statement(op_id(1), &v1);
    let r = fx.send(fx.deploy_instruction(&stmt, &envelope, &[1], "")).await;
    assert_awaiting(&r, RefusalCode::AwaitingAuthority);
    // Approved: installed, started boxed, healthy, switched; signed like any run.
    let r = fx.send(fx.deploy_instruction(&stmt, &envelope, &[1], &fx.grant(&stmt))).await;
    assert_eq!(r.outcome, Outcome::Executed, "{r:?}");
    let e = fx.execution(&r);
    assert_eq!((e.status, e.exit_code), (airlock_core::operation::ExecutionStatus::Completed, Some(0)), "{e:?}");
    assert!(fetch(port).await.contains("shop v1"));
    let last = statuses(&fx).pop().unwrap();
    assert_eq!(last.current.as_ref().unwrap().digest, v1.digest());
    assert_eq!(last.deploy.as_ref().unwrap().phase, airlock_proto::gateway::DeployPhase::Deployed as i32);
    assert_eq!(last.services[0].state, airlock_proto::gateway::ServiceState::Healthy as i32);

    // An upgrade whose health check never passes: rolled back, v1 serves again.
    let (envelope, bad) = web(&fx, "2.0.0", port, "shop v2", "/missing", "");
    let stmt = fx.deploy_statement(op_id(2), &bad);
    let r = fx.send(fx.deploy_instruction(&stmt, &envelope, &[1], &fx.grant(&stmt))).await;
    assert_eq!(fx.execution(&r).exit_code, Some(super::super::deploy::ROLLED_BACK), "{r:?}");
    assert!(fetch(port).await.contains("shop v1"));
    let last = statuses(&fx).pop().unwrap();
    assert_eq!(last.current.as_ref().unwrap().digest, v1.digest());
    assert_eq!(last.deploy.as_ref().unwrap().phase, airlock_proto::gateway::DeployPhase::RolledBack as i32);

    // A good upgrade switches.
    let (envelope, v3) = web(&fx, "3.0.0", port, "shop v3", "/", "");
    let stmt = fx.deploy_statement(op_id(3), &v3);
    let r = fx.send(fx.deploy_instruction(&stmt, &envelope, &[1], &fx.grant(&stmt))).await;
    assert_eq!(fx.execution(&r).exit_code, Some(0), "{r:?}");
    assert!(fetch(port).await.contains("shop v3"));
    // The blob store keeps what the installed releases (v3, and v1 to roll back to) hold: the
    // rolled-back v2's page is gone, v1's and v3's stay.
    let blob = |content: &str| {
        fx.dir.path().join("artifacts/sha256").join(airlock_core::operation::sha256_hex(content.as_bytes()))
    };
    assert!(!blob("shop v2").exists() && blob("shop v1").exists() && blob("shop v3").exists());
    fx.exec.stop_deployments().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_missing_a_secret_is_held_until_it_exists_and_its_value_never_goes_up() {
    let fx = Fx::new(ALL_PHASES);
    fx.listen().await;
    let port = free_port();
    let secret_file = fx.releases.path().join("db-password");
    let reference = format!("file:{}", secret_file.display());
    let (envelope, v1) = web(&fx, "1.0.0", port, "shop v1", "/", &format!("DB_PASSWORD = \"{reference}\""));
    let stmt = fx.deploy_statement(op_id(4), &v1);
    let running = started(&fx, fx.deploy_instruction(&stmt, &envelope, &[1], &fx.grant(&stmt)));
    // Held, naming the missing reference, and audited.
    let held = loop {
        let held = statuses(&fx)
            .into_iter()
            .find(|s| s.deploy.as_ref().is_some_and(|d| d.phase == airlock_proto::gateway::DeployPhase::Held as i32));
        if let Some(h) = held {
            break h;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(held.deploy.unwrap().missing_secrets, vec![reference.clone()]);
    assert_eq!(held.secrets[0].state, airlock_proto::gateway::SecretState::Missing as i32);
    assert_eq!(fx.audited(airlock_core::audit::AuditAction::DeploymentHeld).len(), 1);
    assert!(!running.is_finished());
    // The secret appears: the deploy proceeds, the service gets the value.
    std::fs::write(&secret_file, "canary-7f3a9c").unwrap();
    let r = tokio::time::timeout(std::time::Duration::from_secs(30), running).await.unwrap().unwrap();
    assert_eq!(fx.execution(&r).exit_code, Some(0), "{r:?}");
    let last = statuses(&fx).pop().unwrap();
    assert_eq!(last.secrets[0].state, airlock_proto::gateway::SecretState::Present as i32);
    // Nothing sent up, nor the audit, holds the value.
    for m in fx.sent() {
        assert!(!format!("{m:?}").contains("canary-7f3a9c"));
    }
    assert!(!std::fs::read_to_string(fx.dir.path().join("audit.jsonl")).unwrap().contains("canary-7f3a9c"));
    fx.exec.stop_deployments().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_held_past_a_day_on_the_appliances_clock_is_given_up_and_nothing_changes() {
    let fx = Fx::new(ALL_PHASES);
    fx.listen().await;
    let port = free_port();
    let (envelope, v1) = web(&fx, "1.0.0", port, "shop v1", "/", "");
    let stmt = fx.deploy_statement(op_id(11), &v1);
    let r = fx.send(fx.deploy_instruction(&stmt, &envelope, &[1], &fx.grant(&stmt))).await;
    assert_eq!(fx.execution(&r).exit_code, Some(0), "{r:?}");

    let reference = format!("file:{}", fx.releases.path().join("never-there").display());
    let (envelope, v2) = web(&fx, "2.0.0", port, "shop v2", "/", &format!("DB_PASSWORD = \"{reference}\""));
    let stmt = fx.deploy_statement(op_id(12), &v2);
    let running = started(&fx, fx.deploy_instruction(&stmt, &envelope, &[1], &fx.grant(&stmt)));
    while fx.audited(airlock_core::audit::AuditAction::DeploymentHeld).is_empty() {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // An hour on: still held. A day and a bit on (the host slept, say): given up.
    fx.clock.fetch_add(3_600_000, std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    assert!(!running.is_finished());
    fx.clock.fetch_add(24 * 3_600_000, std::sync::atomic::Ordering::SeqCst);
    let r = tokio::time::timeout(std::time::Duration::from_secs(30), running).await.unwrap().unwrap();
    let e = fx.execution(&r);
    assert_eq!(e.status, airlock_core::operation::ExecutionStatus::Cancelled, "{e:?}");
    let last = statuses(&fx).pop().unwrap();
    let progress = last.deploy.unwrap();
    assert_eq!(progress.phase, airlock_proto::gateway::DeployPhase::Failed as i32);
    assert!(progress.reason.contains("still missing") && progress.reason.contains(&reference), "{progress:?}");
    // v1 still current and serving; v2 never installed.
    assert_eq!(last.current.unwrap().digest, v1.digest());
    assert!(fetch(port).await.contains("shop v1"));
    assert!(!fx.releases.path().join("releases").join(v2.digest()).exists());
    fx.exec.stop_deployments().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_deploy_cannot_downgrade_nor_spend_an_approval_twice() {
    use airlock_core::grant::GrantBody;
    let mut fx = Fx::new(ALL_PHASES);
    fx.listen().await;
    let port = free_port();
    let nonce = |g: &mut GrantBody| g.nonce = "deploy-nonce".into();
    let (env1, v1) = web(&fx, "1.0.0", port, "shop v1", "/", "");
    let old = fx.deploy_statement(op_id(21), &v1);
    let old_instruction = fx.deploy_instruction(&old, &env1, &[1], &fx.grant_with(&old, 1, nonce));
    let first = fx.send(old_instruction.clone()).await;
    assert_eq!(fx.execution(&first).exit_code, Some(0), "{first:?}");
    let (env2, v2) = web(&fx, "2.0.0", port, "shop v2", "/", "");
    let new = fx.deploy_statement(op_id(22), &v2);
    let r = fx.send(fx.deploy_instruction(&new, &env2, &[1], &fx.grant(&new))).await;
    assert_eq!(fx.execution(&r).exit_code, Some(0), "{r:?}");
    assert!(fetch(port).await.contains("shop v2"));

    // The vendor replays the old, approved deploy of v1: answered from its record, nothing
    // is installed, v2 keeps serving; and the same after a restart.
    assert_eq!(fx.send(old_instruction.clone()).await, first);
    assert!(fetch(port).await.contains("shop v2"));
    fx.exec.stop_deployments().await;
    fx.restart();
    fx.listen().await;
    fx.exec.recover_deployments().await;
    assert_eq!(fx.send(old_instruction).await, first);
    assert!(fetch(port).await.contains("shop v2"));
    assert_eq!(fx.audited(airlock_core::audit::AuditAction::OperationExecuted).len(), 2);

    // A new request for v1 under a new approval that reuses the spent nonce: denied.
    let again = fx.deploy_statement(op_id(23), &v1);
    let r = fx.send(fx.deploy_instruction(&again, &env1, &[1], &fx.grant_with(&again, 1, nonce))).await;
    assert_denied(&r, DenyCode::NonceReplayed);
    // The old approval on the new request: it approves another request, so it is no authority.
    let r = fx.send(fx.deploy_instruction(&again, &env1, &[1], &fx.grant_with(&old, 1, |_| {}))).await;
    assert_ne!(r.outcome, Outcome::Executed, "{r:?}");
    assert!(fetch(port).await.contains("shop v2"));
    let current = fx.exec.deployments.as_ref().unwrap().deployer.current().unwrap();
    assert_eq!(current.digest, v2.digest());
    fx.exec.stop_deployments().await;
}

/// The first service of the latest report, once that one carries a log tail (`with_tail`) or
/// none.
async fn last_service_report(fx: &Fx, with_tail: bool) -> airlock_proto::gateway::ServiceStatus {
    for _ in 0..200 {
        let last = statuses(fx).pop().map(|s| s.services[0].clone());
        if let Some(s) = last.filter(|s| s.log_tail.is_some() == with_tail) {
            return s;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("no report {} a log tail", if with_tail { "with" } else { "without" });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_logs_and_metrics_go_up_only_while_the_customers_policy_opts_in_and_secrets_are_redacted() {
    let fx = Fx::new(ALL_PHASES);
    fx.listen().await;
    let secret_file = fx.releases.path().join("api-token");
    std::fs::write(&secret_file, "canary-5e1f7a0b\n").unwrap();
    let manifest = format!(
        "name = \"chatty\"\nversion = \"1.0.0\"\n\n[[service]]\nname = \"chatty\"\ncommand = \"bin/chatty\"\n\
         secrets = {{ API_TOKEN = \"file:{}\" }}\n",
        secret_file.display()
    );
    // It prints a marker and, as a careless service might, its secret (without the newline).
    let script: &[u8] = b"#!/bin/sh\necho \"telemetry-marker token=$API_TOKEN.\"\nexec sleep 600\n";
    let blobs = fx.dir.path().join("artifacts/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::write(blobs.join(airlock_core::operation::sha256_hex(script)), script).unwrap();
    // What an earlier release of the service logged, with a value this one was not given.
    let log = fx.releases.path().join("releases/.logs/chatty.log");
    std::fs::create_dir_all(log.parent().unwrap()).unwrap();
    std::fs::write(&log, "earlier release: token=canary-0ld0ld0\n").unwrap();
    let (envelope, release) = vendor_release(&manifest, &[("bin/chatty", script)], 1);
    let stmt = fx.deploy_statement(op_id(9), &release);
    let r = fx.send(fx.deploy_instruction(&stmt, &envelope, &[1], &fx.grant(&stmt))).await;
    assert_eq!(fx.execution(&r).exit_code, Some(0), "{r:?}");
    let logged = || std::fs::read_to_string(&log).unwrap_or_default().contains("telemetry-marker");
    for _ in 0..100 {
        if logged() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(logged(), "the service wrote its marker to its log on the appliance");

    // The policy in force does not opt in: no metric, no log line goes up.
    fx.exec.report_again().await;
    let last = statuses(&fx).pop().unwrap().services[0].clone();
    assert!(last.metrics.is_none() && last.log_tail.is_none(), "{last:?}");

    // The customer opts in: the watcher reports at once, with metrics and the redacted tail.
    let watcher = {
        let exec = fx.exec.clone();
        let every = std::time::Duration::from_millis(20);
        tokio::spawn(async move { exec.watch_services(every, std::time::Duration::from_secs(3600)).await })
    };
    let set_policy = |toml: &str| *fx.control.policy.write().unwrap() = Some(policy(toml));
    set_policy(&format!(
        "{}[telemetry]\nservice_logs = true\nservice_metrics = true\n",
        ALL_PHASES.replace("serial = 1", "serial = 2")
    ));
    let on = last_service_report(&fx, true).await;
    let tail = on.log_tail.as_deref().unwrap();
    assert!(tail.contains("telemetry-marker token=[redacted]."), "{tail}");
    assert!(!tail.contains("earlier release"), "only what this release's service wrote: {tail}");
    let metrics = on.metrics.unwrap();
    assert!(metrics.memory_current_bytes.is_some_and(|m| m > 0), "{metrics:?}");
    assert!(metrics.pids_current.is_some_and(|p| p >= 1), "{metrics:?}");

    // And out again: the next report carries neither.
    set_policy(&ALL_PHASES.replace("serial = 1", "serial = 3"));
    let off = last_service_report(&fx, false).await;
    assert!(off.metrics.is_none(), "{off:?}");
    watcher.abort();
    for m in fx.sent() {
        let m = format!("{m:?}");
        assert!(!m.contains("canary-5e1f7a0b") && !m.contains("canary-0ld0ld0"), "a secret value went up");
    }
    fx.exec.stop_deployments().await;
}

#[tokio::test]
async fn a_release_the_customer_does_not_accept_is_refused() {
    let key_id = |n: u8| vendor_key(n).public().key_id();
    let only_2 = format!("{ALL_PHASES}release_keys = [\"{}\"]\n", key_id(2));
    let fx = Fx::new(&only_2);
    let (envelope, verified) = release(RELEASE, 1);
    let stmt = fx.deploy_statement(op_id(2), &verified);
    // Signed by a key the vendor registered, which the customer's policy excludes.
    let r = fx.send(fx.deploy_instruction(&stmt, &envelope, &[1, 2], &fx.grant(&stmt))).await;
    assert_refused(&r, RefusalCode::ReleaseUnverified);
    assert!(r.reason.contains("release"), "{r:?}");
    assert!(!fx.ran(op_id(2)));

    let fx = Fx::new(ALL_PHASES);
    // Signed by a key the control plane did not relay (not registered for the workspace).
    let r = fx.send(fx.deploy_instruction(&stmt, &envelope, &[3], &fx.grant(&stmt))).await;
    assert_refused(&r, RefusalCode::ReleaseUnverified);
    // No key at all.
    let stmt = fx.deploy_statement(op_id(3), &verified);
    let r = fx.send(fx.deploy_instruction(&stmt, &envelope, &[], &fx.grant(&stmt))).await;
    assert_refused(&r, RefusalCode::ReleaseUnverified);
}

#[tokio::test]
async fn a_tampered_or_swapped_release_is_refused() {
    let fx = Fx::new(ALL_PHASES);
    let (envelope, verified) = release(RELEASE, 1);
    // The payload edited after the vendor signed it.
    let stmt = fx.deploy_statement(op_id(4), &verified);
    let mut tampered = envelope.clone();
    let text = String::from_utf8(tampered.payload.clone()).unwrap().replace("bin/web", "bin/wex");
    tampered.payload = text.into_bytes();
    let r = fx.send(fx.deploy_instruction(&stmt, &tampered, &[1], &fx.grant(&stmt))).await;
    assert_refused(&r, RefusalCode::ReleaseUnverified);
    // Another signed release than the one the customer approved the deploy of.
    let (other, _) = release(&RELEASE.replace("1.0.0", "1.0.1"), 1);
    let stmt = fx.deploy_statement(op_id(5), &verified);
    let r = fx.send(fx.deploy_instruction(&stmt, &other, &[1], &fx.grant(&stmt))).await;
    assert_refused(&r, RefusalCode::ReleaseUnverified);
    assert!(r.reason.contains("not the release sent"), "{r:?}");
    // Not an envelope at all.
    let stmt = fx.deploy_statement(op_id(6), &verified);
    let mut i = fx.deploy_instruction(&stmt, &envelope, &[1], &fx.grant(&stmt));
    i.release_envelope_json = "{".into();
    assert_refused(&fx.send(i).await, RefusalCode::ReleaseUnverified);
    for id in 4..=6 {
        assert!(!fx.ran(op_id(id)));
    }
}

#[tokio::test]
async fn a_release_with_a_root_service_needs_the_customers_signature() {
    // A standing window for Deploy covers deploys, but never one that asks for root.
    let window = format!(
        "{ALL_PHASES}release_keys = [\"{}\"]\n\n[[windows]]\nphase = \"deploy\"\ndays = [\"mon\", \"tue\", \"wed\", \"thu\", \"fri\", \"sat\", \"sun\"]\nstart = \"00:00\"\nend = \"23:59\"\ntemplates = [{{ name = \"deploy\", sha256 = \"{}\" }}]\n",
        vendor_key(1).public().key_id(),
        airlock_core::deploy::deploy_template_sha256()
    );
    // Without the vendor's key pinned in the policy, the window covers no deploy: the release
    // was verified only with keys the control plane relayed.
    let unpinned = Fx::new(&window.replace(&format!("release_keys = [\"{}\"]\n", vendor_key(1).public().key_id()), ""));
    let (envelope, verified) = release(RELEASE, 1);
    let stmt = unpinned.deploy_statement(op_id(10), &verified);
    let r = unpinned.send(unpinned.deploy_instruction(&stmt, &envelope, &[1], "")).await;
    assert_awaiting(&r, RefusalCode::AwaitingAuthority);
    assert!(r.reason.contains("release_keys"), "{r:?}");
    let fx = Fx::new(&window);
    let (envelope, verified) = release(&format!("{RELEASE}run_as_root = true\n"), 1);
    let stmt = fx.deploy_statement(op_id(7), &verified);
    let r = fx.send(fx.deploy_instruction(&stmt, &envelope, &[1], "")).await;
    assert_awaiting(&r, RefusalCode::AwaitingAuthority);
    // Without root, the window covers it.
    let (envelope, verified) = release(RELEASE, 1);
    let stmt = fx.deploy_statement(op_id(8), &verified);
    let r = fx.send(fx.deploy_instruction(&stmt, &envelope, &[1], "")).await;
    assert_eq!(r.outcome, Outcome::Executed, "{r:?}");
    // A deny rule on the release's name beats the window.
    let deny = format!("{window}\n[[deny]]\nid = \"no-shop\"\nkind = \"deploy\"\nargs = {{ name = \"shop\" }}\n");
    let fx = Fx::new(&deny);
    let stmt = fx.deploy_statement(op_id(9), &verified);
    let r = fx.send(fx.deploy_instruction(&stmt, &envelope, &[1], &fx.grant(&stmt))).await;
    assert_denied(&r, DenyCode::DeniedByRule);
}

/// A signed release of `manifest` and `files`, its artifacts put in the appliance's blob store.
fn stored_release(fx: &Fx, manifest: &str, files: &[(&str, &[u8])]) -> (Envelope, VerifiedRelease) {
    let blobs = fx.dir.path().join("artifacts/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    for (_, bytes) in files {
        std::fs::write(blobs.join(airlock_core::operation::sha256_hex(bytes)), bytes).unwrap();
    }
    vendor_release(manifest, files, 1)
}

/// The request to run task `task` of `release`, as the control plane signs it.
fn task_statement(
    fx: &Fx,
    id: airlock_core::OperationId,
    release: &VerifiedRelease,
    task: &str,
) -> airlock_core::operation::RequestStatement {
    use airlock_core::deploy;
    let mut stmt = fx.deploy_statement(id, release);
    let command =
        deploy::task_command(release, task).unwrap_or_else(|_| deploy::task_command(release, "migrate").unwrap());
    stmt.request.kind = deploy::TASK_KIND.into();
    stmt.request.phase = airlock_core::policy::Phase::Operate;
    stmt.request.args = deploy::TaskArgs { release: deploy::DeployArgs::of(release), task: task.into() }.to_args();
    stmt.request.command_sha256 = command.sha256();
    stmt.command = command;
    stmt
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_task_runs_boxed_in_the_running_release_under_the_customers_authority() {
    let fx = Fx::new(ALL_PHASES);
    let manifest = r#"name = "shop"
version = "1.0.0"

[[service]]
name = "web"
command = "bin/web"

[[task]]
name = "migrate"
command = "bin/migrate"
args = ["--to", "42"]

[[dependency]]
name = "postgres"
url = "postgres://db.internal/shop"
"#;
    let web: &[u8] = b"#!/bin/sh\nexec sleep 600\n";
    let migrate: &[u8] =
        b"#!/bin/sh\necho \"migrating $1 $2 on $AIRLOCK_DEPENDENCY_POSTGRES_URL as $(id -u) in $PWD\"\n";
    let (envelope, release) = stored_release(&fx, manifest, &[("bin/web", web), ("bin/migrate", migrate)]);

    // Before the release runs here, its task is not started (and says why).
    let stmt = task_statement(&fx, op_id(20), &release, "migrate");
    let r = fx.send(fx.deploy_instruction(&stmt, &envelope, &[1], &fx.grant(&stmt))).await;
    assert_eq!(fx.execution(&r).status, airlock_core::operation::ExecutionStatus::FailedToStart, "{r:?}");

    let stmt = fx.deploy_statement(op_id(21), &release);
    let r = fx.send(fx.deploy_instruction(&stmt, &envelope, &[1], &fx.grant(&stmt))).await;
    assert_eq!(fx.execution(&r).exit_code, Some(0), "{r:?}");

    // Without authority it waits, like any Operate operation; approved, it runs.
    let stmt = task_statement(&fx, op_id(22), &release, "migrate");
    let r = fx.send(fx.deploy_instruction(&stmt, &envelope, &[1], "")).await;
    assert_awaiting(&r, RefusalCode::AwaitingAuthority);
    let r = fx.send(fx.deploy_instruction(&stmt, &envelope, &[1], &fx.grant(&stmt))).await;
    let e = fx.execution(&r);
    assert_eq!((e.status, e.exit_code), (airlock_core::operation::ExecutionStatus::Completed, Some(0)), "{r:?}");
    let out = String::from_utf8(fx.control.ops.open_output(op_id(22)).unwrap().bytes.clone()).unwrap();
    assert!(out.starts_with("migrating --to 42 on postgres://db.internal/shop as "), "{out}");
    assert!(!out.contains(" as 0 "), "the task runs as the box user, not root: {out}");

    // A task the release does not have is refused before anything runs.
    let stmt = task_statement(&fx, op_id(23), &release, "drop-everything");
    let r = fx.send(fx.deploy_instruction(&stmt, &envelope, &[1], &fx.grant(&stmt))).await;
    assert_refused(&r, RefusalCode::ReleaseUnverified);
    fx.exec.stop_deployments().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_naming_a_secret_the_customer_did_not_allow_is_refused_and_nothing_is_read() {
    let fx = Fx::new(ALL_PHASES);
    fx.listen().await;
    // The appliance's own keys and the host's secrets, named by a vendor's release.
    let own_key = fx.dir.path().join("credentials.pem");
    let references =
        [format!("file:{}", own_key.display()), "file:/etc/shadow".into(), "env:AIRLOCK_JOIN_TOKEN".into()];
    for (i, reference) in (30u8..).zip(references) {
        let manifest = format!(
            "name = \"greedy\"\nversion = \"1.0.0\"\n\n[[service]]\nname = \"web\"\ncommand = \"bin/web\"\nsecrets = {{ K = \"{reference}\" }}\n"
        );
        let (envelope, release) = stored_release(&fx, &manifest, &[("bin/web", b"#!/bin/sh\nexec sleep 600\n")]);
        let stmt = fx.deploy_statement(op_id(i), &release);
        let r = fx.send(fx.deploy_instruction(&stmt, &envelope, &[1], &fx.grant(&stmt))).await;
        assert_eq!(fx.execution(&r).exit_code, Some(super::super::deploy::REFUSED), "{reference}: {r:?}");
        let last = statuses(&fx).pop().unwrap();
        let deploy = last.deploy.unwrap();
        assert_eq!(deploy.phase, airlock_proto::gateway::DeployPhase::Failed as i32);
        assert!(deploy.reason.contains("allow list"), "{}", deploy.reason);
        // Not even its existence goes up.
        assert!(last.secrets.is_empty(), "{:?}", last.secrets);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_deploy_off_rolls_back_a_deploy_waiting_for_its_services() {
    let fx = Fx::new(ALL_PHASES);
    fx.listen().await;
    let port = free_port();
    // Its health check never passes: without the switch, it would wait the whole deadline.
    let (envelope, release) = web(&fx, "1.0.0", port, "shop v1", "/never", "");
    let stmt = fx.deploy_statement(op_id(40), &release);
    let running = started(&fx, fx.deploy_instruction(&stmt, &envelope, &[1], &fx.grant(&stmt)));
    // Once its service is starting, the customer switches Deploy off on the host.
    let since = std::time::Instant::now();
    loop {
        // Where the services stand now (the engine's own report, or this one).
        fx.exec.report(None, &[]).await;
        let starting = statuses(&fx)
            .into_iter()
            .any(|s| s.services.iter().any(|v| v.state == airlock_proto::gateway::ServiceState::Starting as i32));
        if starting {
            break;
        }
        assert!(since.elapsed() < std::time::Duration::from_secs(10), "the service never started");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    fx.control.set_phase(HOST_ADMIN, airlock_core::policy::Phase::Deploy, false).unwrap();
    let r = tokio::time::timeout(std::time::Duration::from_secs(8), running).await.unwrap().unwrap();
    let e = fx.execution(&r);
    assert_eq!(e.exit_code, Some(super::super::deploy::ROLLED_BACK), "{e:?}");
    assert!(since.elapsed() < std::time::Duration::from_secs(9), "rolled back at once, not at the health deadline");
    let last = statuses(&fx).pop().unwrap();
    assert!(last.current.is_none(), "nothing was switched to: {last:?}");
    assert!(last.deploy.unwrap().reason.contains("switched the Deploy phase off"));
    fx.exec.stop_deployments().await;
}
