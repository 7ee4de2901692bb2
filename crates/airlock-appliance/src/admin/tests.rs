//! The admin socket end to end: a real Unix socket, the client functions the CLI uses.

use std::path::Path;

use airlock_core::audit::AuditAction;
use airlock_core::operation::ReleaseDecision;
use airlock_core::policy::{POLICY_PAYLOAD_TYPE, Phase};
use airlock_testkit::{customer, op_id};

use super::{Request, SOCKET_FILE, bind, call, call_value, read_output, serve};
use crate::testing::*;

/// This process, as the audit records a peer: the kernel's report when it connects.
fn me() -> serde_json::Value {
    serde_json::json!({ "uid": nix::unistd::geteuid().as_raw(), "pid": std::process::id() })
}

#[tokio::test]
async fn admin_socket_serves_operations_output_release_and_pre_approvals() {
    let fx = Fx::new(ALL_PHASES);
    let stmt = fx.simple(op_id(1), "api");
    fx.run(&stmt, &fx.grant(&stmt)).await;
    let socket = fx.dir.path().join(SOCKET_FILE);
    let server = tokio::spawn(serve(fx.control.clone(), bind(&socket).unwrap()));

    let list = call_value(&socket, &Request::Operations).await.unwrap();
    assert_eq!(list[0]["id"], op_id(1).to_string());
    assert_eq!(list[0]["state"], "executed");
    assert_eq!(list[0]["release"], serde_json::Value::Null);
    let (bytes, reply) = read_output(&socket, op_id(1)).await.unwrap();
    assert_eq!(bytes, fx.control.ops.open_output(op_id(1)).unwrap());
    assert_eq!(reply["output_size"], bytes.len());
    assert_eq!(fx.audited(AuditAction::OperationOutputRead).len(), 1);
    let manifest = call_value(&socket, &Request::Manifest { id: op_id(1) }).await.unwrap();
    assert_eq!(manifest["request_id"], op_id(1).to_string());
    // An id that is not an operation id is refused before it reaches a path.
    let err = raw_call(&socket, r#"{"cmd":"manifest","id":"../x"}"#).await;
    assert!(err.contains("malformed request"), "{err}");

    let envelope: serde_json::Value =
        serde_json::from_slice(&fx.release(op_id(1), ReleaseDecision::Release, |_| {})).unwrap();
    let released = call_value(&socket, &Request::Release { envelope }).await.unwrap();
    assert_eq!(released["release"], "release");

    let envelope: serde_json::Value = serde_json::from_slice(&fx.pre_approval(|_| {})).unwrap();
    let added = call_value(&socket, &Request::PreApprovalAdd { envelope }).await.unwrap();
    assert_eq!((added["id"].as_str(), added["runs_used"].as_u64()), (Some("routine"), Some(0)));
    call_value(&socket, &Request::PreApprovalRevoke { id: "routine".into() }).await.unwrap();
    let list = call_value(&socket, &Request::PreApprovals).await.unwrap();
    assert_eq!(list[0]["revoked"], true);

    // The phase commands keep their typed client.
    let status = call(&socket, &Request::Phase { phase: Phase::Deploy, enabled: false }).await.unwrap();
    assert_eq!(status.disabled, vec![Phase::Deploy]);
    let next = customer::sign(POLICY_PAYLOAD_TYPE, ALL_PHASES.replace("serial = 1", "serial = 2").into_bytes(), &[1]);
    let envelope: serde_json::Value = serde_json::from_str(&next.to_json()).unwrap();
    call_value(&socket, &Request::Policy { envelope }).await.unwrap();
    server.abort();

    // Every change made through the socket is audited with the peer the kernel reported: this
    // process, which connected.
    for action in [
        AuditAction::OperationOutputRead,
        AuditAction::OperationReleased,
        AuditAction::PreApprovalAdd,
        AuditAction::PreApprovalRevoke,
        AuditAction::PhaseDisable,
        AuditAction::PolicyUpdate,
    ] {
        let records = fx.audited(action);
        assert_eq!(records.len(), 1, "{action}");
        assert_eq!(records[0]["detail"]["peer"], me(), "{action}");
    }
}

/// Sends one raw line to the admin socket; returns the reply's text.
async fn raw_call(socket: &Path, line: &str) -> String {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let stream = tokio::net::UnixStream::connect(socket).await.unwrap();
    let (read, mut write) = stream.into_split();
    write.write_all(format!("{line}\n").as_bytes()).await.unwrap();
    let mut reply = String::new();
    tokio::io::BufReader::new(read).read_line(&mut reply).await.unwrap();
    reply
}
