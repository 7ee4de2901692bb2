//! The admin socket end to end: a real Unix socket, the client functions the CLI uses, and who
//! it admits.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use airlock_core::audit::AuditAction;
use airlock_core::operation::ReleaseDecision;
use airlock_core::policy::{POLICY_PAYLOAD_TYPE, Phase};
use airlock_testkit::{customer, op_id};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::access::{AdminAccess, Boxed, Group, Groups, PeerCred, Refusal, Refused, admit};
use super::{Request, SOCKET_FILE, bind, call, call_value, connection, read_output, serve};
use crate::state_dir::StateDir;
use crate::testing::*;

/// This process's effective uid: the appliance's own in these tests.
fn my_uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// This process, as the audit records a peer: the kernel's report when it connects.
fn me() -> serde_json::Value {
    serde_json::json!({ "uid": my_uid(), "pid": std::process::id() })
}

#[tokio::test]
async fn admin_socket_serves_operations_output_release_and_pre_approvals() {
    let fx = Fx::new(ALL_PHASES);
    let stmt = fx.simple(op_id(1), "api");
    fx.run(&stmt, &fx.grant(&stmt)).await;
    let socket = fx.dir.path().join(SOCKET_FILE);
    let access = AdminAccess::resolve(None).unwrap();
    let server = tokio::spawn(serve(fx.control.clone(), access.clone(), bind(&socket, &access).unwrap()));
    assert_eq!(std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777, 0o600);

    let list = call_value(&socket, &Request::Operations).await.unwrap();
    assert_eq!(list[0]["id"], op_id(1).to_string());
    assert_eq!(list[0]["state"], "executed");
    assert_eq!(list[0]["release"], serde_json::Value::Null);
    let (bytes, reply) = read_output(&socket, op_id(1)).await.unwrap();
    let held = fx.control.ops.open_output(op_id(1)).unwrap();
    assert_eq!(bytes, held.bytes);
    assert_eq!(reply["output_salt"], held.salt.unwrap().to_hex());
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
    assert!(fx.audited(AuditAction::AdminPeerRefused).is_empty());
}

#[tokio::test]
async fn a_refused_peer_gets_one_error_is_audited_and_nothing_it_sent_is_acted_on() {
    let fx = Fx::new(ALL_PHASES);
    let access = AdminAccess::new(my_uid(), None);
    let stranger = PeerCred { uid: 4242, gid: 4343, pid: Some(777), groups: Groups::NotRead, boxed: Boxed::Outside };
    let why = admit(&stranger, &access).unwrap_err();
    assert!(matches!(why, Refusal::NotAllowed { uid: 4242, .. }), "{why}");
    // A request that would act, one that is not JSON, and one larger than the socket buffers:
    // each gets the refusal and nothing else.
    let big = format!("{{\"cmd\":\"policy\",\"envelope\":\"{}\"}}", "x".repeat(600_000));
    for request in [r#"{"cmd":"phase","phase":"deploy","enabled":false}"#, "not json", big.as_str()] {
        let (client, server) = tokio::net::UnixStream::pair().unwrap();
        let refused = Refused { peer: Some(Box::new(stranger.clone())), why: why.clone() };
        let served = tokio::spawn(connection(fx.control.clone(), server, Err(refused)));
        let (mut read, mut write) = client.into_split();
        write.write_all(format!("{request}\n").as_bytes()).await.unwrap();
        drop(write);
        let mut reply = String::new();
        read.read_to_string(&mut reply).await.unwrap();
        served.await.unwrap();
        assert_eq!(reply.lines().count(), 1, "{reply}");
        let error = serde_json::from_str::<serde_json::Value>(&reply).unwrap()["error"].as_str().unwrap().to_owned();
        assert!(error.contains("uid 4242 may not use") && error.contains("--admin-group"), "{error}");
    }
    let refusals = fx.audited(AuditAction::AdminPeerRefused);
    assert_eq!(refusals.len(), 3);
    assert_eq!(refusals[0]["outcome"], "denied");
    assert_eq!(refusals[0]["detail"]["interface"], "admin_socket");
    assert_eq!(refusals[0]["detail"]["refusal"], "not_allowed");
    assert_eq!(
        refusals[0]["detail"]["peer"],
        serde_json::json!({ "uid": 4242, "gid": 4343, "pid": 777, "boxed": "outside" })
    );
    // Nothing changed, and nothing but the refusals was audited.
    assert!(fx.control.disabled().is_empty());
    assert_eq!(fx.control.status().policy_serial, Some(1));
    assert!(fx.audited(AuditAction::PhaseDisable).is_empty() && fx.audited(AuditAction::PolicyUpdate).is_empty());
}

#[tokio::test]
async fn the_kernel_names_the_connecting_process_and_its_groups() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join(SOCKET_FILE);
    let egid = nix::unistd::getegid().as_raw();
    let access = AdminAccess::new(my_uid(), Some(Group { gid: egid, name: None }));
    let listener = bind(&socket, &access).unwrap();
    let _client = tokio::net::UnixStream::connect(&socket).await.unwrap();
    let (server, _) = listener.accept().await.unwrap();
    let peer = PeerCred::of(&server, &access).unwrap();
    assert_eq!((peer.uid, peer.gid, peer.pid), (my_uid(), egid, Some(std::process::id())));
    let Groups::Read(mut groups) = peer.groups else { panic!("groups not read: {:?}", peer.groups) };
    let mut expected: Vec<u32> = nix::unistd::getgroups().unwrap().iter().map(|g| g.as_raw()).collect();
    groups.sort_unstable();
    expected.sort_unstable();
    assert_eq!(groups, expected);
    // With no admin group, the groups are not needed, so not read.
    let owner_only = AdminAccess::new(my_uid(), None);
    assert_eq!(PeerCred::of(&server, &owner_only).unwrap().groups, Groups::NotRead);
}

#[tokio::test]
async fn the_admin_group_reaches_the_socket_and_nothing_else_secret() {
    let fx = Fx::new(ALL_PHASES);
    // An executed operation: the output key, its sealed output, its record and manifest exist.
    let stmt = fx.simple(op_id(1), "api");
    fx.run(&stmt, &fx.grant(&stmt)).await;
    // The test's own group stands in for the customer's: chown to it works even as non-root.
    let egid = nix::unistd::getegid().as_raw();
    let access = AdminAccess::new(my_uid(), Some(Group { gid: egid, name: None }));
    let socket = fx.dir.path().join(SOCKET_FILE);
    let server = tokio::spawn(serve(fx.control.clone(), access.clone(), bind(&socket, &access).unwrap()));
    let state = StateDir::open(fx.dir.path()).unwrap();
    state.share_with_group(Some(egid)).unwrap();
    let meta = |p: &Path| std::fs::metadata(p).unwrap();
    assert_eq!((meta(&socket).permissions().mode() & 0o777, meta(&socket).gid()), (0o660, egid));
    assert_eq!((meta(fx.dir.path()).permissions().mode() & 0o777, meta(fx.dir.path()).gid()), (0o710, egid));
    // Opening the state directory again (every part of the appliance does) keeps it reachable.
    StateDir::open(fx.dir.path()).unwrap();
    assert_eq!(meta(fx.dir.path()).permissions().mode() & 0o777, 0o710);
    // The group can search the directory, never list it; under it, it can open only what was
    // always meant for anyone on the host.
    const FOR_ANYONE: [&str; 3] = ["ca.pem", "appliance.json", "REVOKED"];
    let mut checked = 0;
    for path in all_files(fx.dir.path()) {
        let name = path.file_name().unwrap().to_str().unwrap();
        if path == socket || FOR_ANYONE.contains(&name) {
            continue;
        }
        assert_eq!(meta(&path).permissions().mode() & 0o077, 0, "{} is open to others", path.display());
        let mut dir = path.parent().unwrap();
        while dir != fx.dir.path() {
            assert_eq!(meta(dir).permissions().mode() & 0o077, 0, "{} is open to others", dir.display());
            dir = dir.parent().unwrap();
        }
        checked += 1;
    }
    assert!(checked >= 5 && fx.dir.path().join("output.key").exists(), "{checked}");
    // The owner is still admitted.
    call(&socket, &Request::Status).await.unwrap();
    server.abort();
    // Without an admin group, the directory is owner-only again.
    state.share_with_group(None).unwrap();
    assert_eq!(meta(fx.dir.path()).permissions().mode() & 0o777, 0o700);
}

#[tokio::test]
async fn vendor_code_cannot_reach_the_admin_socket_the_output_key_or_sealed_output() {
    for same_user in [false, true] {
        let mut fx = Fx::new(&format!("{ALL_PHASES}[vendor_code]\nsame_user = true\n"));
        if same_user {
            fx.run_vendor_code_as_the_appliance_user();
        }
        let earlier = fx.simple(op_id(1), "api");
        fx.run(&earlier, &fx.grant(&earlier)).await;
        fx.control.set_phase(HOST_ADMIN, Phase::Deploy, false).unwrap();
        let socket = fx.dir.path().join(SOCKET_FILE);
        let access = AdminAccess::resolve(None).unwrap();
        let server = tokio::spawn(serve(fx.control.clone(), access.clone(), bind(&socket, &access).unwrap()));
        // What the attacker script did: switch a phase back on through the admin socket, read
        // the output key and another operation's sealed output.
        let script = r#"python3 -c 'import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(b"{\"cmd\": \"phase\", \"phase\": \"deploy\", \"enabled\": true}\n")
print("REPLY", s.recv(4096))' STATE/admin.sock
cat STATE/output.key && echo KEY
cat STATE/ops/EARLIER/output.sealed && echo SEALED
true
"#
        .replace("STATE", &fx.dir.path().display().to_string())
        .replace("EARLIER", &op_id(1).to_string());
        let stmt = fx.statement(op_id(2), MANIFEST, &script, vars("api"));
        let r = fx.send(fx.instruction(&stmt, MANIFEST, &script, &fx.grant(&stmt))).await;
        let output = String::from_utf8_lossy(&fx.control.ops.open_output(op_id(2)).unwrap().bytes).into_owned();
        assert_eq!(r.outcome, crate::result::Outcome::Executed, "{r:?}");
        assert!(!output.contains("KEY") && !output.contains("SEALED"), "{output}");
        assert!(!output.contains("\"ok\""), "{output}");
        assert_eq!(fx.control.disabled(), [Phase::Deploy].into(), "the phase stays off ({output})");
        assert!(fx.audited(AuditAction::PhaseEnable).is_empty());
        if same_user {
            // It reached the socket as the appliance's own uid: refused as vendor code, audited.
            let refused = fx.audited(AuditAction::AdminPeerRefused);
            assert_eq!(refused.len(), 1, "{output}");
            assert_eq!(refused[0]["detail"]["refusal"], "vendor_code");
        }
        server.abort();
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
