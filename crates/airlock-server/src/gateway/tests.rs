//! The live gateway, in process, dialled with certificates minted by the server's own CA.

use std::sync::Arc;
use std::time::Duration;

use airlock_core::audit::AuditAction;
use airlock_core::{ApplianceId, ApplianceIdentity, EnvironmentId};
use airlock_proto::gateway::appliance_gateway_client::ApplianceGatewayClient;
use airlock_proto::gateway::{ApplianceMessage, Hello, appliance_message, control_message};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use airlock_testkit::{customer, op_id};

use crate::authz::TenantScope;
use crate::clock::SystemClock;
use crate::keys::KekSource;
use crate::{RunningServer, ServerConfig};

/// The customer key ([`customer::key`]) every test signs the customer's statements with.
const CUSTOMER: u8 = 42;

struct Fixture {
    server: RunningServer,
    /// Tenant A's admin token and workspace, for the API.
    admin_token: String,
    workspace: airlock_core::WorkspaceId,
    /// An appliance of tenant A, registered in the store.
    identity: ApplianceIdentity,
    other_tenant: airlock_core::TenantId,
    _dir: tempfile::TempDir,
}

async fn fixture() -> Fixture {
    fixture_with_clock(Arc::new(SystemClock)).await
}

async fn fixture_with_clock(clock: Arc<dyn crate::clock::Clock>) -> Fixture {
    fixture_with(clock, crate::net::ConnectionLimits::default()).await
}

async fn fixture_with(clock: Arc<dyn crate::clock::Clock>, limits: crate::net::ConnectionLimits) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let kek = KekSource::default_for(dir.path());
    let a = crate::init(dir.path(), &kek, "airlock.test", "acme", "default", &SystemClock).await.unwrap();
    let b = crate::create_tenant(dir.path(), &kek, "globex", "default", &SystemClock).await.unwrap();
    let server = serve_in_with(dir.path(), clock, limits).await;
    let identity = ApplianceIdentity {
        trust_domain: "airlock.test".into(),
        tenant: a.tenant,
        environment: EnvironmentId::from_random([5; 16]),
        appliance: ApplianceId::from_random([6; 16]),
    };
    let scope = TenantScope::for_local_operator(a.tenant, airlock_core::id::TokenId::from_random([7; 16]));
    let now = server.state.now();
    let mut tx = server.state.store.write().await.unwrap();
    tx.create_environment(&scope, a.workspace, identity.environment, "prod", now).await.unwrap();
    tx.insert_appliance(&identity, "test", ("00", now), b"key", now).await.unwrap();
    tx.commit().await.unwrap();
    Fixture {
        server,
        identity,
        other_tenant: b.tenant,
        admin_token: a.admin_token.expose().to_owned(),
        workspace: a.workspace,
        _dir: dir,
    }
}

/// Serves the initialised data directory `dir` on ephemeral local ports.
async fn serve_in(dir: &std::path::Path, clock: Arc<dyn crate::clock::Clock>) -> RunningServer {
    serve_in_with(dir, clock, crate::net::ConnectionLimits::default()).await
}

async fn serve_in_with(
    dir: &std::path::Path,
    clock: Arc<dyn crate::clock::Clock>,
    limits: crate::net::ConnectionLimits,
) -> RunningServer {
    let mut cfg = ServerConfig::new(dir.to_owned());
    cfg.limits = limits;
    cfg.api_listen = "127.0.0.1:0".parse().unwrap();
    cfg.gateway_listen = "127.0.0.1:0".parse().unwrap();
    cfg.hostnames = vec!["127.0.0.1".into()];
    cfg.clock = clock;
    crate::serve(cfg).await.unwrap()
}

/// Shuts the server down and serves its data directory again: only the store survives.
async fn restart(f: Fixture) -> Fixture {
    let Fixture { server, admin_token, workspace, identity, other_tenant, _dir: dir } = f;
    server.shutdown().await;
    let server = serve_in(dir.path(), Arc::new(SystemClock)).await;
    Fixture { server, admin_token, workspace, identity, other_tenant, _dir: dir }
}

/// Opens a session with a certificate our CA issues for `identity`; returns the first reply.
async fn session_as(f: &Fixture, identity: &ApplianceIdentity) -> Result<control_message::Body, tonic::Status> {
    let (channel, _, _) = channel_as(f, identity).await;
    session_on(channel).await
}

/// Opens a session on `channel`; returns the first reply.
async fn session_on(channel: tonic::transport::Channel) -> Result<control_message::Body, tonic::Status> {
    let hello = ApplianceMessage {
        body: Some(appliance_message::Body::Hello(Hello {
            version: "test".into(),
            health: None,
            ..Default::default()
        })),
    };
    let mut inbound = ApplianceGatewayClient::new(channel).session(tokio_stream::iter(vec![hello])).await?.into_inner();
    let reply = inbound.message().await?;
    Ok(reply.and_then(|m| m.body).expect("a reply"))
}

/// A key and a certificate our CA issued for `identity`.
fn credentials(f: &Fixture, identity: &ApplianceIdentity) -> (rcgen::KeyPair, crate::ca::Issued) {
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::default().serialize_request(&key).unwrap().pem().unwrap();
    let now = f.server.state.now();
    let issued = f.server.state.ca.sign_join_csr(&csr, identity, now, Duration::from_secs(3600)).unwrap();
    (key, issued)
}

/// [`credentials`], recorded as the appliance's current certificate (as its join or recovery would), so the gateway
/// serves it (a certificate other than its appliance's current or previous one opens nothing).
async fn recorded_credentials(f: &Fixture, identity: &ApplianceIdentity) -> (rcgen::KeyPair, crate::ca::Issued) {
    let (key, issued) = credentials(f, identity);
    let scope = TenantScope::for_appliance(identity);
    let mut tx = f.server.state.store.write().await.unwrap();
    let recorded = (issued.serial.as_str(), issued.not_after);
    // Recorded as a lost join's answer is: no earlier certificate is presented.
    tx.record_renewal(&scope, identity.appliance, recorded, crate::store::Renewed::LostJoinAnswer).await.unwrap();
    tx.commit().await.unwrap();
    (key, issued)
}

/// A TLS client configuration presenting a certificate our CA issued for `identity`, recorded as its current one.
async fn mtls_client(f: &Fixture, identity: &ApplianceIdentity) -> Arc<rustls::ClientConfig> {
    let (key, issued) = recorded_credentials(f, identity).await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(f.server.ca_pem.as_bytes()).unwrap()).unwrap();
    Arc::new(
        airlock_proto::tls::mtls_client_config(
            airlock_proto::tls::ServerTrust::Roots(roots),
            vec![issued.der.clone()],
            PrivateKeyDer::from(rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der())),
            &[b"h2"],
        )
        .unwrap(),
    )
}

/// Reads `s` until the peer closes it (or errs); whether that happened within `within`.
async fn closed_within<S: tokio::io::AsyncRead + Unpin>(s: &mut S, within: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 4096];
    tokio::time::timeout(within, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

#[tokio::test]
async fn one_certificate_holds_a_few_gateway_connections_its_newest_displaces_its_oldest_and_each_must_open_a_stream() {
    let f = fixture().await;
    let connector = tokio_rustls::TlsConnector::from(mtls_client(&f, &f.identity).await);
    let displaced = || {
        let labels = crate::metrics::ConnectionLabels { listener: "gateway", reason: "displaced_by_newer" };
        f.server.state.metrics.connections.closed.get_or_create(&labels).get()
    };
    let mut held = Vec::new();
    for _ in 0..super::CONNECTIONS_PER_APPLIANCE + 1 {
        let tcp = tokio::net::TcpStream::connect(f.server.gateway_addr).await.unwrap();
        held.push(connector.connect(ServerName::try_from("127.0.0.1").unwrap(), tcp).await.unwrap());
    }
    let started = tokio::time::Instant::now();
    // One past the cap: the newest is kept and the oldest cut, at once.
    assert!(closed_within(&mut held[0], Duration::from_secs(2)).await, "the oldest connection was not displaced");
    assert_eq!(displaced(), 1);
    // None opened a stream: each is cut at the deadline, and the certificate can connect again.
    for conn in &mut held[1..] {
        assert!(closed_within(conn, super::STREAM_OPEN_DEADLINE + Duration::from_secs(3)).await);
    }
    assert!(started.elapsed() >= super::STREAM_OPEN_DEADLINE - Duration::from_secs(1), "{:?}", started.elapsed());
    let mut again = session_as(&f, &f.identity).await;
    for _ in 0..50 {
        if again.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        again = session_as(&f, &f.identity).await;
    }
    assert!(matches!(again, Ok(control_message::Body::Welcome(_))), "{again:?}");
}

#[tokio::test]
async fn a_flood_of_silent_connects_does_not_evict_a_handshake_past_its_client_hello() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A small gateway: ten pending handshakes.
    let limits = crate::net::ConnectionLimits { gateway_max_connections: 40, ..Default::default() };
    let f = fixture_with(Arc::new(SystemClock), limits).await;
    let addr = f.server.gateway_addr;
    let mut tls =
        rustls::ClientConnection::new(mtls_client(&f, &f.identity).await, ServerName::try_from("127.0.0.1").unwrap())
            .unwrap();
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut out, mut buf) = (Vec::new(), vec![0u8; 64 * 1024]);
    // The ClientHello, and the server's whole flight back: the client now has its own flight to send.
    tls.write_tls(&mut out).unwrap();
    tcp.write_all(&out).await.unwrap();
    while !tls.wants_write() {
        let n = tcp.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before the server's flight");
        tls.read_tls(&mut &buf[..n]).unwrap();
        tls.process_new_packets().unwrap();
    }
    // Mid-handshake, a flood of bare connects from the same address, more than the whole pool.
    let mut flood = Vec::new();
    for _ in 0..30 {
        flood.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The handshake still completes, and the gateway serves it (its HTTP/2 preface comes back).
    std::io::Write::write_all(&mut tls.writer(), b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0").unwrap();
    let mut plain = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while plain.is_empty() {
        while tls.wants_write() {
            out.clear();
            tls.write_tls(&mut out).unwrap();
            tcp.write_all(&out).await.expect("the pending handshake was evicted");
        }
        let n = tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await.expect("no answer").unwrap_or(0);
        assert!(n > 0, "the pending handshake was evicted by the flood");
        tls.read_tls(&mut &buf[..n]).unwrap();
        tls.process_new_packets().unwrap();
        let _ = std::io::Read::read_to_end(&mut tls.reader(), &mut plain);
    }
    let evicted = f.server.state.metrics.render();
    assert!(evicted.contains("reason=\"address_evicted\""), "the flood displaced only itself: {evicted}");
    drop(flood);
}

/// A gateway channel authenticated as `identity`, with its key and certificate.
async fn channel_as(
    f: &Fixture,
    identity: &ApplianceIdentity,
) -> (tonic::transport::Channel, rcgen::KeyPair, crate::ca::Issued) {
    let (key, issued) = recorded_credentials(f, identity).await;
    let channel = channel_with(f, &key, &issued).await;
    (channel, key, issued)
}

/// A gateway channel presenting `issued` with its `key`.
async fn channel_with(f: &Fixture, key: &rcgen::KeyPair, issued: &crate::ca::Issued) -> tonic::transport::Channel {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(f.server.ca_pem.as_bytes()).unwrap()).unwrap();
    let tls = airlock_proto::tls::mtls_client_config(
        airlock_proto::tls::ServerTrust::Roots(roots),
        vec![issued.der.clone()],
        PrivateKeyDer::from(rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der())),
        &[b"h2"],
    )
    .unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let addr = f.server.gateway_addr;
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| {
            let connector = connector.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                let tls = connector.connect(ServerName::try_from("127.0.0.1").unwrap(), tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await
        .unwrap()
}

#[tokio::test]
async fn certificate_of_another_tenant_cannot_act_as_an_appliance() {
    let f = fixture().await;
    // Control: the appliance's own identity gets a welcome.
    let own = session_as(&f, &f.identity).await.unwrap();
    assert!(matches!(own, control_message::Body::Welcome(_)), "{own:?}");

    // Same appliance and environment ids, but a certificate naming another tenant: the
    // scope comes from the certificate, so tenant A's rows are invisible to it.
    let mut forged = f.identity.clone();
    forged.tenant = f.other_tenant;
    let err = session_as(&f, &forged).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");

    // Right tenant and appliance, wrong environment: refused too.
    let mut moved = f.identity.clone();
    moved.environment = EnvironmentId::from_random([9; 16]);
    let err = session_as(&f, &moved).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");

    // Both refusals are audited in the chain of the tenant the certificate names.
    let refused = f.server.state.store.audit_records(&f.other_tenant.to_string()).await.unwrap();
    assert!(
        refused.iter().any(|r| r.as_ref().is_ok_and(|r| r.event.action == AuditAction::GatewayStreamRefused.as_str()))
    );
    f.server.shutdown().await;
}

#[tokio::test]
async fn revoked_appliance_is_refused_even_with_a_fresh_certificate() {
    let f = fixture().await;
    let scope = TenantScope::for_appliance(&f.identity);
    let mut tx = f.server.state.store.write().await.unwrap();
    assert!(tx.revoke_appliance(&scope, f.identity.appliance, f.server.state.now()).await.unwrap());
    tx.commit().await.unwrap();
    // The revoked set in memory was not told (as after a crash between commit and insert):
    // the store check at stream start still refuses, with the status that stops appliances.
    let err = session_as(&f, &f.identity).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(airlock_proto::stream_end::is_revoked(&err), "{err:?}");
    f.server.shutdown().await;
}

/// After a renewal, the certificate it replaced opens sessions (its appliance may have missed the answer) only until
/// the appliance presents the new one; then a kept copy of the old one and its key opens nothing and fetches nothing.
#[tokio::test]
async fn a_renewed_appliances_old_certificate_is_retired_once_it_presents_the_new_one() {
    let f = fixture().await;
    let scope = TenantScope::for_appliance(&f.identity);
    let (old_key, old) = recorded_credentials(&f, &f.identity).await;
    // Renewed from `old` (as `gateway::renew` records it).
    let (new_key, new) = credentials(&f, &f.identity);
    let mut tx = f.server.state.store.write().await.unwrap();
    let renewed = crate::store::Renewed::Replaced { presented: &old.serial };
    tx.record_renewal(&scope, f.identity.appliance, (&new.serial, new.not_after), renewed).await.unwrap();
    tx.commit().await.unwrap();
    let welcome = |r: &Result<control_message::Body, tonic::Status>| matches!(r, Ok(control_message::Body::Welcome(_)));
    let with_old = session_on(channel_with(&f, &old_key, &old).await).await;
    assert!(welcome(&with_old), "the renewal's answer may have been lost: {with_old:?}");
    let with_new = session_on(channel_with(&f, &new_key, &new).await).await;
    assert!(welcome(&with_new), "{with_new:?}");
    // The appliance holds the new one: the old one is retired.
    let old_channel = channel_with(&f, &old_key, &old).await;
    let refused = session_on(old_channel.clone()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("superseded"), "{refused:?}");
    assert!(!airlock_proto::stream_end::is_revoked(&refused), "the appliance itself is not revoked");
    assert!(airlock_proto::stream_end::is_superseded(&refused), "the appliance is told why, in a form it acts on");
    let fetch = airlock_proto::gateway::FetchArtifactRequest { sha256: "00".repeat(32), offset: 0 };
    let refused = ApplianceGatewayClient::new(old_channel).fetch_artifact(fetch).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    let audited = f.server.state.store.audit_records(&f.identity.tenant.to_string()).await.unwrap();
    assert!(audited.iter().flatten().any(|r| r.event.detail["reason"] == "certificate_superseded"), "{audited:?}");
    f.server.shutdown().await;
}

// ---------- operations over the stream ----------

mod operations {
    use airlock_core::dsse::Envelope;
    use airlock_core::grant::{ApprovalDecision, DenyCode, OperationRequest};
    use airlock_core::operation::{
        AckCode, AuthorityKind, AuthorityRef, EXECUTION_PAYLOAD_TYPE, ExecutionStatement, ExecutionStatus,
        OutputCommitment, OutputSalt, RefusalCode, ReleaseDecision, ReleaseStatement, output_commitment, sha256_hex,
    };
    use airlock_core::policy::POLICY_PAYLOAD_TYPE;
    use airlock_proto::gateway::{
        ControlMessage, OperationAck, OperationAckKind, OperationInstruction, OperationOutcome, OperationResult,
        OutputRelease,
    };
    use http::{Method, StatusCode};
    use http_body_util::BodyExt;
    use serde_json::{Value, json};
    use tower::ServiceExt;

    use super::*;

    const MARKER: &[u8] = b"customer-plaintext-7f3a9c1e-never-at-rest";

    pub(super) async fn call(f: &Fixture, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Vec<u8>) {
        let mut req = http::Request::builder()
            .method(method)
            .uri(path)
            .header("authorization", format!("Bearer {}", f.admin_token));
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let req = req.body(axum::body::Body::from(body.map(|b| b.to_string()).unwrap_or_default())).unwrap();
        let resp = crate::api::router(f.server.state.clone()).oneshot(req).await.unwrap();
        let status = resp.status();
        (status, resp.into_body().collect().await.unwrap().to_bytes().to_vec())
    }

    pub(super) async fn json_call(f: &Fixture, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let (s, bytes) = call(f, method, path, body).await;
        (s, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    /// Pushes a template with `tags` and requests an operation on the fixture's appliance.
    pub(super) async fn request(f: &Fixture, name: &str, tags: &[&str]) -> Value {
        let manifest = format!(
            "name = \"{name}\"\ndescription = \"d\"\nphase = \"observe\"\ndata_tags = {tags:?}\nbody = \"run.sh\"\n"
        );
        let (s, v) = json_call(
            f,
            Method::POST,
            &format!("/v1/workspaces/{}/templates", f.workspace),
            Some(json!({ "manifest_toml": manifest, "script": "#!/bin/sh\necho hi\n" })),
        )
        .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        let (s, op) = json_call(
            f,
            Method::POST,
            &format!("/v1/environments/{}/operations", f.identity.environment),
            Some(json!({ "template": name, "vars": {}, "reason": "check" })),
        )
        .await;
        assert_eq!(s, StatusCode::CREATED, "{op}");
        op
    }

    pub(super) async fn op_state(f: &Fixture, id: &str) -> Value {
        json_call(f, Method::GET, &format!("/v1/operations/{id}"), None).await.1
    }

    /// A live stream as an appliance: messages go up through `tx`, replies come down `rx`.
    pub(super) struct Appliance {
        pub(super) tx: tokio::sync::mpsc::Sender<ApplianceMessage>,
        pub(super) rx: tonic::Streaming<ControlMessage>,
        pub(super) key: rcgen::KeyPair,
        pub(super) cert: crate::ca::Issued,
    }

    impl Appliance {
        pub(super) async fn connect(f: &Fixture, identity: &ApplianceIdentity) -> Self {
            Self::connect_attested(f, identity, "").await
        }

        /// Connects with `attestation_json` in the Hello, as an appliance the customer attested.
        pub(super) async fn connect_attested(
            f: &Fixture,
            identity: &ApplianceIdentity,
            attestation_json: &str,
        ) -> Self {
            let (channel, key, cert) = channel_as(f, identity).await;
            let (tx, rx) = tokio::sync::mpsc::channel(16);
            let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
            let hello = ApplianceMessage {
                body: Some(appliance_message::Body::Hello(Hello {
                    version: "test".into(),
                    health: None,
                    execution_key_attestation_json: attestation_json.to_owned(),
                })),
            };
            tx.send(hello).await.unwrap();
            let rx = ApplianceGatewayClient::new(channel).session(stream).await.unwrap().into_inner();
            let mut a = Self { tx, rx, key, cert };
            assert!(matches!(a.recv().await, control_message::Body::Welcome(_)));
            a
        }

        pub(super) async fn recv(&mut self) -> control_message::Body {
            let msg = tokio::time::timeout(Duration::from_secs(5), self.rx.message()).await.expect("a message in time");
            msg.unwrap().and_then(|m| m.body).expect("a message")
        }

        pub(super) async fn instruction(&mut self) -> OperationInstruction {
            match self.recv().await {
                control_message::Body::Operation(i) => i,
                other => panic!("expected an instruction, got {other:?}"),
            }
        }

        pub(super) async fn send(&mut self, body: appliance_message::Body) -> OperationAck {
            self.tx.send(ApplianceMessage { body: Some(body) }).await.unwrap();
            loop {
                match self.recv().await {
                    control_message::Body::OperationAck(a) => return a,
                    // Re-sent instructions are normal.
                    control_message::Body::Operation(_) => {}
                    other => panic!("expected an ack, got {other:?}"),
                }
            }
        }
    }

    /// The salt the test appliance commits to every output with.
    pub(super) const SALT: [u8; 32] = [0x11; 32];

    /// What an appliance commits to for `output` of `op` under [`SALT`]: nothing for secret output.
    pub(super) fn committed(op: &Value, output: &[u8]) -> OutputCommitment {
        let tags: Vec<String> = serde_json::from_value(op["data_tags"].clone()).unwrap();
        OutputCommitment::for_output(
            airlock_core::grant::is_secret_output(&tags),
            &OutputSalt::from_bytes(SALT),
            output,
        )
    }

    /// An execution statement for `op`, signed with `key` (whose certificate is `cert`).
    fn execution(op: &Value, output: &[u8], key: &rcgen::KeyPair, cert: &crate::ca::Issued) -> Envelope {
        let authority = AuthorityRef { kind: AuthorityKind::StandingWindow, digest: None, policy_digest: None };
        execution_by(op, output, key, cert, authority)
    }

    pub(super) fn execution_by(
        op: &Value,
        output: &[u8],
        key: &rcgen::KeyPair,
        cert: &crate::ca::Issued,
        authority: AuthorityRef,
    ) -> Envelope {
        execution_as(op, output, key, cert, authority, ExecutionStatus::Completed)
    }

    /// The same, the run having ended as `status`.
    fn execution_as(
        op: &Value,
        output: &[u8],
        key: &rcgen::KeyPair,
        cert: &crate::ca::Issued,
        authority: AuthorityRef,
        status: ExecutionStatus,
    ) -> Envelope {
        let now = airlock_core::Timestamp::from_unix_millis(op["requested_at"].as_i64().unwrap());
        let statement = ExecutionStatement {
            request_id: op["id"].as_str().unwrap().parse().unwrap(),
            appliance: op["appliance"].as_str().unwrap().parse().unwrap(),
            request_digest: op["request_digest"].as_str().unwrap().to_owned(),
            command_sha256: op["command_sha256"].as_str().unwrap().to_owned(),
            authority,
            status,
            started_at: now,
            finished_at: now,
            exit_code: Some(0),
            output_truncated: (committed(op, output) != OutputCommitment::Secret).then_some(false),
            output_commitment: committed(op, output),
            sequence: 1,
            previous_manifest_sha256: None,
        };
        let env = Envelope::new(EXECUTION_PAYLOAD_TYPE, serde_json::to_vec(&statement).unwrap());
        airlock_testkit::certified::sign_with_certificate_key(env, cert.der.as_ref(), &key.serialize_der())
    }

    fn result(op: &Value, env: &Envelope, cert_pem: &str) -> appliance_message::Body {
        appliance_message::Body::OperationResult(OperationResult {
            request_id: op["id"].as_str().unwrap().to_owned(),
            outcome: OperationOutcome::Executed as i32,
            reason: String::new(),
            execution_envelope_json: env.to_json(),
            appliance_certificate_pem: cert_pem.to_owned(),
            pre_approval_envelope_json: String::new(),
            ..Default::default()
        })
    }

    fn release(
        op: &Value,
        output_for_digest: &[u8],
        sent: &[u8],
        decision: ReleaseDecision,
    ) -> appliance_message::Body {
        let salt = if sent.is_empty() { Vec::new() } else { SALT.to_vec() };
        release_revealing(op, output_for_digest, sent, &salt, decision)
    }

    /// A release of `op` naming the commitment to `output_for_digest`, sending `sent` and `salt`.
    fn release_revealing(
        op: &Value,
        output_for_digest: &[u8],
        sent: &[u8],
        salt: &[u8],
        decision: ReleaseDecision,
    ) -> appliance_message::Body {
        let statement = ReleaseStatement {
            request_id: op["id"].as_str().unwrap().parse().unwrap(),
            appliance: op["appliance"].as_str().unwrap().parse().unwrap(),
            decision,
            output_commitment: committed(op, output_for_digest),
            decided_at: airlock_core::Timestamp::from_unix_millis(0),
            approver: "alice".into(),
            reason: "fine".into(),
        };
        appliance_message::Body::OutputRelease(OutputRelease {
            request_id: op["id"].as_str().unwrap().to_owned(),
            release_envelope_json: customer::sign_release(&statement, &[CUSTOMER]),
            output: sent.to_vec(),
            output_salt: salt.to_vec(),
        })
    }

    /// Every byte under the data directory (database, WAL, anything else).
    fn data_dir_contains(f: &Fixture, needle: &[u8]) -> bool {
        std::fs::read_dir(f._dir.path()).unwrap().any(|e| {
            let bytes = std::fs::read(e.unwrap().path()).unwrap_or_default();
            bytes.windows(needle.len()).any(|w| w == needle)
        })
    }

    #[tokio::test]
    async fn execution_signed_by_another_appliances_certificate_is_refused() {
        let f = fixture().await;
        let op = request(&f, "disk-usage", &["host:read"]).await;
        let id = op["id"].as_str().unwrap();
        let mut a = Appliance::connect(&f, &f.identity).await;
        // Pending operations follow the Welcome.
        let i = a.instruction().await;
        assert_eq!(i.request_id, id);
        assert!(i.template_script.contains("echo hi") && i.approval_envelope_json.is_empty());

        // A second, genuine appliance of the same environment signs an execution for ours.
        let mut other = f.identity.clone();
        other.appliance = ApplianceId::from_random([8; 16]);
        let now = f.server.state.now();
        let mut tx = f.server.state.store.write().await.unwrap();
        tx.insert_appliance(&other, "test", ("01", now), b"key2", now).await.unwrap();
        tx.commit().await.unwrap();
        let (other_key, other_cert) = credentials(&f, &other);
        let forged = execution(&op, b"out", &other_key, &other_cert);
        let ack = a.send(result(&op, &forged, &other_cert.pem)).await;
        assert_eq!(ack.kind, OperationAckKind::Result as i32);
        assert_refused(&ack, "not signed by this appliance");
        // Our certificate with another key's signature: refused too.
        let mismatched = execution(&op, b"out", &other_key, &a.cert);
        let ack = a.send(result(&op, &mismatched, &a.cert.pem)).await;
        assert_refused(&ack, "signature");
        assert_eq!(op_state(&f, id).await["state"], "awaiting_approval");

        // The appliance's own signature is accepted, and again idempotently.
        let good = execution(&op, b"out", &a.key, &a.cert);
        let ack = a.send(result(&op, &good, &a.cert.pem)).await;
        assert_eq!(code_of(&ack), AckCode::Stored, "{ack:?}");
        let ack = a.send(result(&op, &good, &a.cert.pem)).await;
        assert_eq!(code_of(&ack), AckCode::Stored, "{ack:?}");
        let shown = op_state(&f, id).await;
        assert_eq!(shown["state"], "executed");
        assert_eq!(shown["exit_code"], 0);
        let digest = output_commitment(&OutputSalt::from_bytes(SALT), b"out");
        assert_eq!(shown["output_commitment"], json!({ "salted": { "digest": digest, "size": 3 } }));
        let (_, m) = json_call(&f, Method::GET, &format!("/v1/operations/{id}/manifest"), None).await;
        assert_eq!(m["appliance_certificate"], a.cert.pem.as_str());
        let chain = f.identity.tenant.to_string();
        let records = f.server.state.store.audit_records(&chain).await.unwrap();
        let actions: Vec<_> = records.into_iter().map(|r| r.unwrap().event.action).collect();
        assert!(actions.iter().any(|a| a == AuditAction::OperationExecuted.as_str()), "{actions:?}");
        assert!(actions.iter().any(|a| a == AuditAction::OperationResultRefused.as_str()), "{actions:?}");
        f.server.shutdown().await;
    }

    #[tokio::test]
    async fn an_execution_key_attestation_is_checked_stored_and_served_in_the_manifest() {
        use airlock_core::execution_key::{ExecutionKeyAttestation, ExecutionSigningKey};
        let f = fixture().await;
        let op = request(&f, "disk-usage", &["host:read"]).await;
        let id = op["id"].as_str().unwrap();
        let mut a = Appliance::connect(&f, &f.identity).await;
        a.instruction().await;
        let exec_key = ExecutionSigningKey::from_seed([5; 32]);
        let attestation = |identity: &ApplianceIdentity, key: &ExecutionSigningKey| {
            ExecutionKeyAttestation {
                appliance: identity.appliance,
                environment: identity.environment,
                tenant: identity.tenant,
                execution_key: key.public().to_pem().unwrap(),
                attested_at: f.server.state.now(),
                attested_by: "alice".into(),
            }
            .envelope()
            .sign(&customer::key(1))
        };
        let signed = exec_key.sign(execution(&op, b"out", &a.key, &a.cert));
        let cert_pem = a.cert.pem.clone();
        let with = |att: &Envelope| {
            let mut body = result(&op, &signed, &cert_pem);
            if let appliance_message::Body::OperationResult(r) = &mut body {
                r.appliance_attestation_json = att.to_json();
            }
            body
        };
        // For another appliance, or naming a key that did not sign the execution: refused.
        let mut other = f.identity.clone();
        other.appliance = ApplianceId::from_random([8; 16]);
        assert_refused(&a.send(with(&attestation(&other, &exec_key))).await, "another appliance");
        let stranger = ExecutionSigningKey::from_seed([6; 32]);
        assert_refused(&a.send(with(&attestation(&f.identity, &stranger))).await, "not signed by the execution key");
        assert_eq!(op_state(&f, id).await["state"], "awaiting_approval");
        // Its own: stored, and served in the manifest beside the execution.
        let good = attestation(&f.identity, &exec_key);
        assert_eq!(code_of(&a.send(with(&good)).await), AckCode::Stored);
        let (_, m) = json_call(&f, Method::GET, &format!("/v1/operations/{id}/manifest"), None).await;
        let served: Envelope = serde_json::from_value(m["appliance_attestation"].clone()).unwrap();
        assert_eq!(served, good);
        f.server.shutdown().await;
    }

    #[tokio::test]
    async fn a_hello_carrying_an_attestation_is_stored_and_new_requests_name_its_key() {
        use airlock_core::execution_key::{ExecutionKeyAttestation, ExecutionSigningKey};
        let f = fixture().await;
        let exec_key = ExecutionSigningKey::from_seed([5; 32]);
        let attestation = |identity: &ApplianceIdentity| {
            ExecutionKeyAttestation {
                appliance: identity.appliance,
                environment: identity.environment,
                tenant: identity.tenant,
                execution_key: exec_key.public().to_pem().unwrap(),
                attested_at: f.server.state.now(),
                attested_by: "alice".into(),
            }
            .envelope()
            .sign(&customer::key(1))
            .to_json()
        };
        async fn listed_key(f: &Fixture) -> Value {
            let (_, list) = json_call(f, Method::GET, "/v1/appliances", None).await;
            list["appliances"][0]["execution_key"].clone()
        }
        let named_key = |op: &Value| op["request"].get("execution_key").cloned();
        // Before any attestation, requests name no host.
        let a = Appliance::connect(&f, &f.identity).await;
        assert_eq!(named_key(&request(&f, "first", &["host:read"]).await), None);
        drop(a);
        // Its own: stored, listed, and every new request names the key it attests.
        let a = Appliance::connect_attested(&f, &f.identity, &attestation(&f.identity)).await;
        let op = request(&f, "second", &["host:read"]).await;
        assert_eq!(named_key(&op), Some(json!(exec_key.public().key_id())));
        assert_eq!(listed_key(&f).await, json!(exec_key.public().key_id()));
        // What the customer will sign names it too: the request as the control plane signed it.
        let signed: Envelope = serde_json::from_value(op["signed_request"].clone()).unwrap();
        let signed: airlock_core::operation::RequestStatement = serde_json::from_slice(&signed.payload).unwrap();
        assert_eq!(signed.request.execution_key.as_deref(), Some(exec_key.public().key_id()));
        drop(a);
        // One naming another appliance is refused and audited, and replaces the stored one: the
        // control plane names no key it cannot tie to this appliance.
        let mut other = f.identity.clone();
        other.appliance = ApplianceId::from_random([8; 16]);
        let a = Appliance::connect_attested(&f, &f.identity, &attestation(&other)).await;
        assert_eq!(named_key(&request(&f, "third", &["host:read"]).await), None);
        assert_eq!(listed_key(&f).await, Value::Null);
        drop(a);
        // Nor is a malformed one kept.
        let _a = Appliance::connect_attested(&f, &f.identity, "{\"payloadType\": 7").await;
        assert_eq!(named_key(&request(&f, "fourth", &["host:read"]).await), None);
        let records = f.server.state.store.audit_records(&f.identity.tenant.to_string()).await.unwrap();
        let attests: Vec<_> = records
            .into_iter()
            .map(|r| r.unwrap().event)
            .filter(|e| e.action == AuditAction::ExecutionKeyAttest.as_str())
            .map(|e| e.outcome)
            .collect();
        use airlock_core::audit::Outcome;
        assert_eq!(attests, [Outcome::Success, Outcome::Denied, Outcome::Denied]);
        f.server.shutdown().await;
    }

    #[tokio::test]
    async fn release_with_other_bytes_is_refused_and_released_output_is_sealed() {
        let f = fixture().await;
        let op = request(&f, "report", &["host:read"]).await;
        let id = op["id"].as_str().unwrap();
        let mut a = Appliance::connect(&f, &f.identity).await;
        a.instruction().await;
        let good = execution(&op, MARKER, &a.key, &a.cert);
        assert_eq!(code_of(&a.send(result(&op, &good, &a.cert.pem)).await), AckCode::Stored);

        // Bytes that are not what the appliance signed: refused, nothing stored.
        let ack =
            a.send(release(&op, MARKER, b"customer-plaintext-7f3a9c1e-never-at-resX", ReleaseDecision::Release)).await;
        assert_eq!(ack.kind, OperationAckKind::Release as i32);
        assert_refused(&ack, "does not open the commitment");
        // The signed bytes, with another salt, with no salt, or with a salt that is not 32 bytes.
        let ack = a.send(release_revealing(&op, MARKER, MARKER, &[0x22; 32], ReleaseDecision::Release)).await;
        assert_refused(&ack, "does not open the commitment");
        let ack = a.send(release_revealing(&op, MARKER, MARKER, &[], ReleaseDecision::Release)).await;
        assert_refused(&ack, "no salt was revealed");
        let ack = a.send(release_revealing(&op, MARKER, MARKER, &SALT[..31], ReleaseDecision::Release)).await;
        assert_refused(&ack, "32 bytes");
        // A release naming other output than the execution: refused.
        let ack = a.send(release(&op, b"other", b"other", ReleaseDecision::Release)).await;
        assert_refused(&ack, "other output");
        // No release envelope and no commands-and-output pre-approval: refused.
        let bare = appliance_message::Body::OutputRelease(OutputRelease {
            request_id: id.to_owned(),
            release_envelope_json: String::new(),
            output: MARKER.to_vec(),
            output_salt: SALT.to_vec(),
        });
        assert_refused(&a.send(bare).await, "pre-approval");
        let (s, v) = json_call(&f, Method::GET, &format!("/v1/operations/{id}/output"), None).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
        assert_eq!(v["error"]["code"], "not_found");
        assert_eq!(op_state(&f, id).await["state"], "executed");

        let ack = a.send(release(&op, MARKER, MARKER, ReleaseDecision::Release)).await;
        assert_eq!(code_of(&ack), AckCode::Stored, "{ack:?}");
        let shown = op_state(&f, id).await;
        assert_eq!((shown["state"].as_str(), shown["output_released"].as_bool()), (Some("released"), Some(true)));
        let (s, bytes) = call(&f, Method::GET, &format!("/v1/operations/{id}/output"), None).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(bytes, MARKER);

        // At rest the output is sealed: no file of the data directory holds the plaintext.
        f.server.state.store.ping().await.unwrap();
        assert!(!data_dir_contains(&f, MARKER), "released output is stored in clear");
        // Control: the scan does find what is stored in clear (the salted commitment).
        let digest = output_commitment(&OutputSalt::from_bytes(SALT), MARKER);
        assert!(data_dir_contains(&f, digest.as_bytes()));
        assert!(!data_dir_contains(&f, sha256_hex(MARKER).as_bytes()), "no unsalted digest is kept");
        // The salt is sealed too (with it and the digest, a copy of the database would reveal a
        // short output), and revealed in the manifest, where the output verifies against it.
        assert!(!data_dir_contains(&f, &SALT));
        let (_, m) = json_call(&f, Method::GET, &format!("/v1/operations/{id}/manifest"), None).await;
        assert_eq!(m["output_salt"], OutputSalt::from_bytes(SALT).to_hex());
        f.server.shutdown().await;
    }

    #[tokio::test]
    async fn output_of_a_secret_tagged_request_is_refused() {
        let f = fixture().await;
        let op = request(&f, "read-config", &["output:secret"]).await;
        let id = op["id"].as_str().unwrap();
        let mut a = Appliance::connect(&f, &f.identity).await;
        a.instruction().await;
        // An execution that commits to secret output (even salted) is refused: nothing about it may leave.
        let mut as_if_public = op.clone();
        as_if_public["data_tags"] = json!(["host:read"]);
        let leaky = execution(&as_if_public, MARKER, &a.key, &a.cert);
        assert_refused(&a.send(result(&op, &leaky, &a.cert.pem)).await, "does not fit");
        let good = execution(&op, MARKER, &a.key, &a.cert);
        let signed: Value = serde_json::from_slice(&good.payload).unwrap();
        assert_eq!(signed["output_commitment"], "secret");
        assert!(signed.get("output_size").is_none() && signed.get("output_sha256").is_none(), "{signed}");
        assert_eq!(code_of(&a.send(result(&op, &good, &a.cert.pem)).await), AckCode::Stored);
        let ack = a.send(release(&op, MARKER, MARKER, ReleaseDecision::Release)).await;
        assert_refused(&ack, "output:secret");
        let (s, _) = call(&f, Method::GET, &format!("/v1/operations/{id}/output"), None).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        assert_eq!(op_state(&f, id).await["state"], "executed");
        assert!(!data_dir_contains(&f, MARKER));
        // Withholding it is recorded (no output travels).
        let ack = a.send(release(&op, MARKER, b"", ReleaseDecision::Withhold)).await;
        assert_eq!(code_of(&ack), AckCode::Stored, "{ack:?}");
        assert_eq!(op_state(&f, id).await["state"], "withheld");
        f.server.shutdown().await;
    }

    /// Relays the customer's signed denial of `op`.
    async fn deny(f: &Fixture, op: &Value) -> Envelope {
        relay(f, op, ApprovalDecision::Deny).await
    }

    #[tokio::test]
    async fn an_execution_that_crossed_the_denial_is_recorded_as_what_happened() {
        let f = fixture().await;
        let op = request(&f, "restart", &["service:restart"]).await;
        let id = op["id"].as_str().unwrap();
        let mut a = Appliance::connect(&f, &f.identity).await;
        a.instruction().await;
        deny(&f, &op).await;
        a.instruction().await;
        // The appliance ran it in the customer's standing window before the denial reached it:
        // the signed execution is recorded (and flagged), not refused, so nothing stays pending.
        // A template's execution claiming the appliance's own probe authority is refused.
        let probe = AuthorityRef { kind: AuthorityKind::Probe, digest: None, policy_digest: None };
        let posing = execution_by(&op, b"x", &a.key, &a.cert, probe);
        assert_refused(&a.send(result(&op, &posing, &a.cert.pem)).await, "built-in probe");
        let good = execution(&op, b"x", &a.key, &a.cert);
        assert_eq!(code_of(&a.send(result(&op, &good, &a.cert.pem)).await), AckCode::Stored);
        assert_eq!(op_state(&f, id).await["state"], "executed");
        f.server.shutdown().await;
    }

    #[tokio::test]
    async fn an_execution_killed_over_its_box_limits_is_stored_as_executed_never_as_cancelled() {
        let f = fixture().await;
        let op = request(&f, "restart", &["service:restart"]).await;
        let id = op["id"].as_str().unwrap();
        let mut a = Appliance::connect(&f, &f.identity).await;
        a.instruction().await;
        let window = AuthorityRef { kind: AuthorityKind::StandingWindow, digest: None, policy_digest: None };
        let over = execution_as(&op, b"x", &a.key, &a.cert, window, ExecutionStatus::OverLimit);
        assert!(String::from_utf8_lossy(&over.payload).contains(r#""status":"over-limit""#));
        let mut as_cancelled = result(&op, &over, &a.cert.pem);
        if let appliance_message::Body::OperationResult(r) = &mut as_cancelled {
            r.outcome = OperationOutcome::Cancelled as i32;
        }
        assert_refused(&a.send(as_cancelled).await, "does not match the signed execution status");
        assert_eq!(code_of(&a.send(result(&op, &over, &a.cert.pem)).await), AckCode::Stored);
        assert_eq!(op_state(&f, id).await["state"], "executed");
        f.server.shutdown().await;
    }

    #[tokio::test]
    async fn approval_reaches_a_connected_appliance_and_refusals_are_recorded() {
        let f = fixture().await;
        let op = request(&f, "restart", &["service:restart"]).await;
        let id = op["id"].as_str().unwrap();
        let mut a = Appliance::connect(&f, &f.identity).await;
        assert!(a.instruction().await.approval_envelope_json.is_empty());
        let grant = deny(&f, &op).await;
        // The denial is pushed at once.
        let pushed = a.instruction().await;
        assert_eq!(pushed.request_id, id);
        assert_eq!(Envelope::from_json(pushed.approval_envelope_json.as_bytes()).unwrap(), grant);
        // Until the appliance says what became of it, a denied request may yet show an
        // execution that crossed the denial: its release is kept for later, not refused.
        let ack = a.send(release(&op, b"x", b"x", ReleaseDecision::Release)).await;
        assert_eq!(code_of(&ack), AckCode::Retry, "{ack:?}");
        // The appliance's refusal of the denied request is recorded; it stays denied.
        let refused =
            refusal(&op, OperationOutcome::Refused, RefusalCode::CustomerDenied, "the customer denied this request");
        assert_eq!(code_of(&a.send(refused).await), AckCode::Stored);
        // Now no output of it can ever be taken: refused for good.
        let ack = a.send(release(&op, b"x", b"x", ReleaseDecision::Release)).await;
        assert_eq!(code_of(&ack), AckCode::Refused, "{ack:?}");
        let shown = op_state(&f, id).await;
        assert_eq!(shown["state"], "denied");
        assert_eq!(shown["refusal_code"], "customer_denied");
        assert_eq!(shown["refusal_reason"], "the customer denied this request");
        // A result for an operation that is not this appliance's is refused.
        let unknown = appliance_message::Body::OperationResult(OperationResult {
            request_id: op_id(0).to_string(),
            outcome: OperationOutcome::AwaitingApproval as i32,
            ..Default::default()
        });
        assert_refused(&a.send(unknown).await, "no operation");
        f.server.shutdown().await;
    }

    #[tokio::test]
    async fn a_final_release_refusal_and_a_retryable_one_are_told_apart_by_code() {
        let f = fixture().await;
        let early = request(&f, "report", &["host:read"]).await;
        let denied = request(&f, "restart", &["service:restart"]).await;
        let mut a = Appliance::connect(&f, &f.identity).await;
        a.instruction().await;
        a.instruction().await;
        // A release that arrived before its operation's result: keep it and send it again.
        let ack = a.send(release(&early, MARKER, MARKER, ReleaseDecision::Release)).await;
        assert_eq!((ack.kind, code_of(&ack)), (OperationAckKind::Release as i32, AckCode::Retry));
        // A release of an operation the customer denied and the appliance refused: no result
        // will ever make it acceptable.
        deny(&f, &denied).await;
        a.instruction().await;
        let confirmed = refusal(&denied, OperationOutcome::Refused, RefusalCode::CustomerDenied, "denied");
        assert_eq!(code_of(&a.send(confirmed).await), AckCode::Stored);
        let ack = a.send(release(&denied, b"x", b"x", ReleaseDecision::Release)).await;
        assert_eq!((ack.kind, code_of(&ack)), (OperationAckKind::Release as i32, AckCode::Refused));
        f.server.shutdown().await;
    }

    #[tokio::test]
    async fn a_result_with_an_unknown_or_contradicting_refusal_code_is_refused() {
        let f = fixture().await;
        let op = request(&f, "check", &["host:read"]).await;
        let id = op["id"].as_str().unwrap();
        let mut a = Appliance::connect(&f, &f.identity).await;
        a.instruction().await;
        let with = |outcome: OperationOutcome, code: i32, deny: i32| {
            appliance_message::Body::OperationResult(OperationResult {
                request_id: id.to_owned(),
                outcome: outcome as i32,
                reason: "not allowed".into(),
                refusal_code: code,
                deny_code: deny,
                ..Default::default()
            })
        };
        let wire = |c: RefusalCode| airlock_proto::convert::refusal_code_to_wire(c) as i32;
        let no_grant = airlock_proto::convert::deny_code_to_wire(DenyCode::NoMatchingGrant) as i32;
        for bad in [
            // Unspecified, or a code from a newer appliance: never read as something milder.
            with(OperationOutcome::AwaitingApproval, 0, 0),
            with(OperationOutcome::AwaitingApproval, 99, 0),
            with(OperationOutcome::Refused, 0, 0),
            with(OperationOutcome::Refused, 99, 0),
            // A code that contradicts the outcome.
            with(OperationOutcome::Refused, wire(RefusalCode::AwaitingAuthority), 0),
            with(OperationOutcome::AwaitingApproval, wire(RefusalCode::Misbound), 0),
            // A policy denial that does not say which check, or names one unknown here.
            with(OperationOutcome::Refused, wire(RefusalCode::Denied), 0),
            with(OperationOutcome::Refused, wire(RefusalCode::Denied), 999),
        ] {
            let ack = a.send(bad).await;
            assert_eq!((ack.kind, code_of(&ack)), (OperationAckKind::Result as i32, AckCode::Refused), "{ack:?}");
        }
        assert_eq!(op_state(&f, id).await["state"], "awaiting_approval");
        // A well-coded refusal is stored with its codes, and again idempotently.
        for _ in 0..2 {
            let ack = a.send(with(OperationOutcome::Refused, wire(RefusalCode::Denied), no_grant)).await;
            assert_eq!(code_of(&ack), AckCode::Stored, "{ack:?}");
        }
        let shown = op_state(&f, id).await;
        assert_eq!(
            (&shown["state"], &shown["refusal_code"], &shown["deny_code"]),
            (&json!("refused"), &json!("denied"), &json!("no_matching_grant"))
        );
        f.server.shutdown().await;
    }

    /// Sends `body`, then a heartbeat, and returns what came back before the heartbeat's ack
    /// (replies come in order, so an ack for `body` would come first).
    pub(super) async fn send_then_heartbeat(
        a: &mut Appliance,
        body: appliance_message::Body,
        seq: u64,
    ) -> Vec<OperationAck> {
        a.tx.send(ApplianceMessage { body: Some(body) }).await.unwrap();
        let hb = airlock_proto::gateway::Heartbeat { seq, health: None };
        a.tx.send(ApplianceMessage { body: Some(appliance_message::Body::Heartbeat(hb)) }).await.unwrap();
        let mut acks = Vec::new();
        loop {
            match a.recv().await {
                control_message::Body::HeartbeatAck(h) if h.seq == seq => return acks,
                control_message::Body::OperationAck(ack) => acks.push(ack),
                _ => {}
            }
        }
    }

    #[tokio::test]
    async fn release_before_its_result_is_kept_for_later_not_refused() {
        let f = fixture().await;
        let op = request(&f, "report", &["host:read"]).await;
        let id = op["id"].as_str().unwrap();
        let mut a = Appliance::connect(&f, &f.identity).await;
        a.instruction().await;

        // The release overtook the result (or the result's write failed): acknowledged as one
        // to send again, so the appliance keeps it in its outbox, and no refusal is audited.
        let early = release(&op, MARKER, MARKER, ReleaseDecision::Release);
        let acks = send_then_heartbeat(&mut a, early.clone(), 1).await;
        assert_eq!(acks.iter().map(code_of).collect::<Vec<_>>(), [AckCode::Retry], "{acks:?}");
        assert_eq!(op_state(&f, id).await["state"], "awaiting_approval");
        let chain = f.identity.tenant.to_string();
        let actions = |records: Vec<Result<airlock_core::audit::Record, i64>>| -> Vec<String> {
            records.into_iter().map(|r| r.unwrap().event.action).collect()
        };
        let audited = actions(f.server.state.store.audit_records(&chain).await.unwrap());
        assert!(!audited.iter().any(|a| a == AuditAction::OperationReleaseRefused.as_str()), "{audited:?}");

        // What is wrong with the release itself is still refused for good, result or not.
        let acks = send_then_heartbeat(&mut a, release(&op, MARKER, b"bytes", ReleaseDecision::Withhold), 2).await;
        assert_eq!(acks.len(), 1, "{acks:?}");
        assert_refused(&acks[0], "withheld output");

        // Once the result is stored, the resent release is taken.
        let good = execution(&op, MARKER, &a.key, &a.cert);
        assert_eq!(code_of(&a.send(result(&op, &good, &a.cert.pem)).await), AckCode::Stored);
        let ack = a.send(early).await;
        assert_eq!((ack.kind, code_of(&ack)), (OperationAckKind::Release as i32, AckCode::Stored), "{ack:?}");
        assert_eq!(op_state(&f, id).await["state"], "released");
        f.server.shutdown().await;
    }

    /// Asserts that `ack` refuses for good, and says so with `why` (its text is for people; the
    /// appliance reads only the code).
    #[track_caller]
    pub(super) fn assert_refused(ack: &OperationAck, why: &str) {
        assert_eq!(code_of(ack), AckCode::Refused, "{ack:?}");
        assert!(ack.error.contains(why), "expected `{why}`: {ack:?}");
    }

    /// The ack's code, which is all the appliance acts on.
    pub(super) fn code_of(ack: &OperationAck) -> AckCode {
        airlock_proto::convert::ack_code_from_wire(ack.code).expect("every ack carries a code")
    }

    /// A result saying the appliance did not run `op`, with `code` (and a reason for people).
    pub(super) fn refusal(
        op: &Value,
        outcome: OperationOutcome,
        code: RefusalCode,
        reason: &str,
    ) -> appliance_message::Body {
        appliance_message::Body::OperationResult(OperationResult {
            request_id: op["id"].as_str().unwrap().to_owned(),
            outcome: outcome as i32,
            reason: reason.to_owned(),
            refusal_code: airlock_proto::convert::refusal_code_to_wire(code) as i32,
            ..Default::default()
        })
    }

    /// `AWAITING_APPROVAL` because the approval is valid only from `valid_from`.
    fn not_yet_valid(op: &Value, valid_from: Option<airlock_core::Timestamp>) -> appliance_message::Body {
        let mut body =
            refusal(op, OperationOutcome::AwaitingApproval, RefusalCode::ApprovalNotYetValid, "not valid yet");
        if let (appliance_message::Body::OperationResult(r), Some(t)) = (&mut body, valid_from) {
            r.valid_from_unix_ms = t.unix_millis();
        }
        body
    }

    /// `AWAITING_APPROVAL` because nothing authorises it yet.
    fn awaiting_authority(op: &Value) -> appliance_message::Body {
        refusal(
            op,
            OperationOutcome::AwaitingApproval,
            RefusalCode::AwaitingAuthority,
            "no approval covers this request",
        )
    }

    /// Sends a heartbeat and returns the ids of the instructions that came before its ack.
    async fn heartbeat_pushes(a: &mut Appliance, seq: u64) -> Vec<String> {
        let hb = airlock_proto::gateway::Heartbeat { seq, health: None };
        a.tx.send(ApplianceMessage { body: Some(appliance_message::Body::Heartbeat(hb)) }).await.unwrap();
        let mut ids = Vec::new();
        loop {
            match a.recv().await {
                control_message::Body::HeartbeatAck(h) if h.seq == seq => break,
                control_message::Body::Operation(i) => ids.push(i.request_id),
                other => panic!("unexpected {other:?}"),
            }
        }
        // Instructions pushed after the reply follow it at once.
        while let Ok(Ok(Some(m))) = tokio::time::timeout(Duration::from_millis(300), a.rx.message()).await {
            if let Some(control_message::Body::Operation(i)) = m.body {
                ids.push(i.request_id);
            }
        }
        ids
    }

    #[tokio::test]
    async fn an_approved_operation_the_appliance_cannot_run_yet_is_pushed_again_when_due() {
        let clock = crate::clock::ManualClock::new(crate::clock::Clock::now(&SystemClock));
        let f = fixture_with_clock(clock.clone()).await;
        let early = request(&f, "early", &["host:read"]).await;
        let waiting = request(&f, "waiting", &["host:read"]).await;
        let mut a = Appliance::connect(&f, &f.identity).await;
        a.instruction().await;
        a.instruction().await;
        relay(&f, &early, ApprovalDecision::Approve).await;
        assert_eq!(a.instruction().await.request_id, early["id"].as_str().unwrap());

        // The approval is valid 10 s from now: the appliance cannot run it yet.
        let valid_from = f.server.state.now().saturating_add(Duration::from_secs(10));
        assert_eq!(code_of(&a.send(not_yet_valid(&early, Some(valid_from))).await), AckCode::Stored);
        // The one with no approval at all is not pushed again on its own.
        assert_eq!(code_of(&a.send(awaiting_authority(&waiting)).await), AckCode::Stored);
        // Before then, heartbeats push nothing.
        assert!(heartbeat_pushes(&mut a, 1).await.is_empty());
        clock.advance(Duration::from_secs(9));
        assert!(heartbeat_pushes(&mut a, 2).await.is_empty());
        // From then on, the next message from the appliance brings it again, once.
        clock.advance(Duration::from_secs(1));
        assert_eq!(heartbeat_pushes(&mut a, 3).await, [early["id"].as_str().unwrap()]);
        assert!(heartbeat_pushes(&mut a, 4).await.is_empty());

        // Without a time beside the code, it is pushed again after 30 s at most.
        assert_eq!(code_of(&a.send(not_yet_valid(&early, None)).await), AckCode::Stored);
        clock.advance(Duration::from_secs(29));
        assert!(heartbeat_pushes(&mut a, 5).await.is_empty());
        clock.advance(Duration::from_secs(1));
        assert_eq!(heartbeat_pushes(&mut a, 6).await, [early["id"].as_str().unwrap()]);
        // Once it has a result, nothing is pushed again.
        assert_eq!(code_of(&a.send(not_yet_valid(&early, None)).await), AckCode::Stored);
        let good = execution(&early, b"out", &a.key, &a.cert);
        assert_eq!(code_of(&a.send(result(&early, &good, &a.cert.pem)).await), AckCode::Stored);
        clock.advance(Duration::from_secs(60));
        assert!(heartbeat_pushes(&mut a, 7).await.is_empty());
        f.server.shutdown().await;
    }

    #[tokio::test]
    async fn a_relayed_policy_reaches_connected_appliances_at_once_and_others_after_their_welcome() {
        let f = fixture().await;
        let mut a = Appliance::connect(&f, &f.identity).await;
        let envelope = policy(&f, 7);
        let path = format!("/v1/environments/{}/policy", f.identity.environment);
        let (s, v) = json_call(&f, Method::PUT, &path, Some(relay_body(&envelope))).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v["sent_to"], 1);
        let pushed = match a.recv().await {
            control_message::Body::PolicyUpdate(p) => p,
            other => panic!("expected the policy, got {other:?}"),
        };
        assert_eq!(Envelope::from_json(pushed.policy_envelope_json.as_bytes()).unwrap(), envelope);
        // A request still waiting for authority is offered again under the new policy.
        let op = request(&f, "restart", &["service:restart"]).await;
        assert_eq!(a.instruction().await.request_id, op["id"].as_str().unwrap());
        let envelope = policy(&f, 8);
        assert_eq!(json_call(&f, Method::PUT, &path, Some(relay_body(&envelope))).await.0, StatusCode::OK);
        assert!(matches!(a.recv().await, control_message::Body::PolicyUpdate(_)));
        assert_eq!(a.instruction().await.request_id, op["id"].as_str().unwrap());
        drop(a);
        // A (re)connecting appliance gets it right after its Welcome.
        let mut again = Appliance::connect(&f, &f.identity).await;
        match again.recv().await {
            control_message::Body::PolicyUpdate(p) => {
                assert_eq!(Envelope::from_json(p.policy_envelope_json.as_bytes()).unwrap(), envelope)
            }
            other => panic!("expected the policy, got {other:?}"),
        }
        f.server.shutdown().await;
    }

    #[tokio::test]
    async fn secret_output_is_refused_even_before_its_result() {
        let f = fixture().await;
        let op = request(&f, "read-config", &["output:secret"]).await;
        let mut a = Appliance::connect(&f, &f.identity).await;
        a.instruction().await;
        let acks = send_then_heartbeat(&mut a, release(&op, MARKER, MARKER, ReleaseDecision::Release), 1).await;
        assert_eq!(acks.len(), 1, "{acks:?}");
        assert_refused(&acks[0], "output:secret");
        assert!(!data_dir_contains(&f, MARKER));
        f.server.shutdown().await;
    }

    /// Relays the customer's signed approval (or denial) of `op` through the API.
    pub(super) async fn relay(f: &Fixture, op: &Value, decision: ApprovalDecision) -> Envelope {
        let request: OperationRequest = serde_json::from_value(op["request"].clone()).unwrap();
        let t0 = airlock_core::Timestamp::from_unix_millis(0);
        let mut body = customer::approval(&request, t0, t0.saturating_add(Duration::from_millis(1)));
        body.decision = decision;
        let grant = customer::sign_grant(&body, &[CUSTOMER]);
        let path = format!("/v1/operations/{}/approval", request.id);
        let envelope: Value = serde_json::from_str(&grant).unwrap();
        let (s, v) = json_call(f, Method::POST, &path, Some(json!({ "envelope": envelope }))).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        Envelope::from_json(grant.as_bytes()).unwrap()
    }

    /// The customer's policy for the fixture's environment with `serial`, signed.
    pub(super) fn policy(f: &Fixture, serial: u64) -> Envelope {
        let toml = format!(
            "version = 1\nserial = {serial}\nenvironment = \"{}\"\nphases = [\"observe\"]\n",
            f.identity.environment
        );
        customer::sign(POLICY_PAYLOAD_TYPE, toml.into_bytes(), &[CUSTOMER])
    }

    /// The request body that relays `policy`.
    pub(super) fn relay_body(policy: &Envelope) -> Value {
        json!({ "envelope": serde_json::from_str::<Value>(&policy.to_json()).unwrap() })
    }

    /// The instructions queued on `rx` right now.
    fn queued(rx: &mut tokio::sync::mpsc::Receiver<crate::registry::Queued>) -> Vec<OperationInstruction> {
        std::iter::from_fn(|| rx.try_recv().ok())
            .map(|m| match m.unwrap().body {
                Some(control_message::Body::Operation(i)) => i,
                other => panic!("expected an instruction, got {other:?}"),
            })
            .collect()
    }

    /// The registry status of a stream the test drives by hand (no TLS connection behind it).
    fn bare_status(state: &crate::state::AppState) -> crate::registry::LiveStatus {
        let now = state.now();
        crate::registry::LiveStatus {
            connected_at: now,
            last_heartbeat: now,
            version: String::new(),
            healthy: true,
            cert_serial: "00".into(),
            cert_not_after: now,
        }
    }

    #[tokio::test]
    async fn a_push_stopped_by_a_full_queue_resumes_decided_operations_first() {
        let f = fixture().await;
        let state = &f.server.state;
        // A stream whose queue has room for two pushes beyond the slots kept for replies.
        let (tx, mut rx) = tokio::sync::mpsc::channel(6);
        let status = bare_status(state);
        let (reg, _kick) = state.registry.join(f.identity.appliance, status, tx);
        let scope = TenantScope::for_appliance(&f.identity);

        // Three requests: the third finds the queue full, and so does its approval.
        let mut ops = Vec::new();
        for name in ["one", "two", "three"] {
            ops.push(request(&f, name, &["host:read"]).await);
        }
        let approved = ops[2]["id"].as_str().unwrap().to_owned();
        let grant = relay(&f, &ops[2], ApprovalDecision::Approve).await;
        let sent: Vec<_> = queued(&mut rx).into_iter().map(|i| i.request_id).collect();
        assert_eq!(sent.len(), 2, "{sent:?}");
        assert!(!sent.contains(&approved), "{sent:?}");

        // The appliance's next message resumes the push: the approved one first, though it
        // is the newest, then the oldest still awaiting approval, as far as there is room.
        state.push.after_message(&scope, &reg, state.now()).await;
        let got = queued(&mut rx);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0].request_id, approved);
        assert_eq!(Envelope::from_json(got[0].approval_envelope_json.as_bytes()).unwrap(), grant);
        assert!(got[1].approval_envelope_json.is_empty());
        // Then on from where it stopped, not from the start again: the backlog drains.
        state.push.after_message(&scope, &reg, state.now()).await;
        let rest = queued(&mut rx);
        let mut all: Vec<_> = got.iter().chain(&rest).map(|i| i.request_id.clone()).collect();
        all.sort();
        let mut want: Vec<_> = ops.iter().map(|o| o["id"].as_str().unwrap().to_owned()).collect();
        want.sort();
        assert_eq!(all, want);
        // Nothing left to resume: a message from the appliance pushes nothing.
        state.push.after_message(&scope, &reg, state.now()).await;
        assert!(queued(&mut rx).is_empty());
        state.registry.leave(reg);
        f.server.shutdown().await;
    }

    #[tokio::test]
    async fn a_policy_that_found_the_stream_full_follows_the_next_message() {
        let f = fixture().await;
        let state = &f.server.state;
        let (tx, mut rx) = tokio::sync::mpsc::channel(6);
        let status = bare_status(state);
        let (reg, _kick) = state.registry.join(f.identity.appliance, status, tx.clone());
        let scope = TenantScope::for_appliance(&f.identity);
        // Two replies the peer has not read: only the slots kept for replies are left.
        for _ in 0..2 {
            tx.try_send(Ok(Box::new(ControlMessage { body: None }))).unwrap();
        }
        let envelope = policy(&f, 2);
        let path = format!("/v1/environments/{}/policy", f.identity.environment);
        let (s, v) = json_call(&f, Method::PUT, &path, Some(relay_body(&envelope))).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v["sent_to"], 0);
        // The peer reads; its next message brings the policy, once.
        while rx.try_recv().is_ok() {}
        state.push.after_message(&scope, &reg, state.now()).await;
        let got: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        assert_eq!(got.len(), 1);
        match got.into_iter().next().unwrap().unwrap().body {
            Some(control_message::Body::PolicyUpdate(p)) => {
                assert_eq!(Envelope::from_json(p.policy_envelope_json.as_bytes()).unwrap(), envelope)
            }
            other => panic!("expected the policy, got {other:?}"),
        }
        state.push.after_message(&scope, &reg, state.now()).await;
        assert!(rx.try_recv().is_err());
        state.registry.leave(reg);
        f.server.shutdown().await;
    }

    #[tokio::test]
    async fn instructions_that_found_the_stream_full_follow_the_next_heartbeat() {
        let f = fixture().await;
        let mut a = Appliance::connect(&f, &f.identity).await;
        // Instructions larger than the HTTP/2 window: an appliance that does not read stalls
        // its stream after the first, and the queue fills behind it.
        let manifest = "name = \"big\"\ndescription = \"d\"\nphase = \"observe\"\ndata_tags = []\nbody = \"run.sh\"\n";
        let script = format!("#!/bin/sh\n# {}\necho hi\n", "x".repeat(200 * 1024));
        let path = format!("/v1/workspaces/{}/templates", f.workspace);
        let (s, v) =
            json_call(&f, Method::POST, &path, Some(json!({ "manifest_toml": manifest, "script": script }))).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        let mut want = std::collections::BTreeSet::new();
        for _ in 0..30 {
            let path = format!("/v1/environments/{}/operations", f.identity.environment);
            let body = json!({ "template": "big", "vars": {}, "reason": "check" });
            let (s, op) = json_call(&f, Method::POST, &path, Some(body)).await;
            assert_eq!(s, StatusCode::CREATED, "{op}");
            want.insert(op["id"].as_str().unwrap().to_owned());
        }
        let mut got = std::collections::BTreeSet::new();
        let drain = async |a: &mut Appliance, got: &mut std::collections::BTreeSet<String>| {
            while let Ok(msg) = tokio::time::timeout(Duration::from_millis(500), a.rx.message()).await {
                if let Some(control_message::Body::Operation(i)) = msg.unwrap().and_then(|m| m.body) {
                    got.insert(i.request_id);
                }
            }
        };
        drain(&mut a, &mut got).await;
        assert!(got.len() < want.len(), "the stream never filled, so this test shows nothing");
        // Each heartbeat lets the push go on where it stopped.
        for seq in 1..=10 {
            if got == want {
                break;
            }
            let hb = airlock_proto::gateway::Heartbeat { seq, health: None };
            a.tx.send(ApplianceMessage { body: Some(appliance_message::Body::Heartbeat(hb)) }).await.unwrap();
            drain(&mut a, &mut got).await;
        }
        assert_eq!(got, want);
        f.server.shutdown().await;
    }
}

mod pre_approval {
    use std::collections::BTreeMap;

    use airlock_core::dsse::Envelope;
    use airlock_core::grant::{ApprovalLevel, PRE_APPROVAL_PAYLOAD_TYPE, PreApprovalBody};
    use airlock_core::operation::{AckCode, AuthorityKind, AuthorityRef};
    use airlock_proto::gateway::{OperationOutcome, OperationResult, OutputRelease};
    use http::{Method, StatusCode};

    use super::operations::*;
    use super::*;

    fn pre_approval(op: &serde_json::Value, level: ApprovalLevel, template: &str) -> (PreApprovalBody, Envelope) {
        let body = PreApprovalBody {
            id: "routine-1".into(),
            appliance: op["appliance"].as_str().unwrap().parse().unwrap(),
            template: template.to_owned(),
            template_sha256: op["template_sha256"].as_str().unwrap().to_owned(),
            phase: airlock_core::policy::Phase::Observe,
            not_before: airlock_core::Timestamp::from_unix_millis(0),
            not_after: airlock_core::Timestamp::from_unix_millis(i64::MAX / 2),
            max_runs: 5,
            level,
            constraints: BTreeMap::new(),
            approver: "alice".into(),
            issued_at: airlock_core::Timestamp::from_unix_millis(0),
        };
        let env = customer::sign(PRE_APPROVAL_PAYLOAD_TYPE, serde_json::to_vec(&body).unwrap(), &[CUSTOMER]);
        (body, env)
    }

    fn result_with(op: &serde_json::Value, exec: &Envelope, cert_pem: &str, pre: &Envelope) -> appliance_message::Body {
        appliance_message::Body::OperationResult(OperationResult {
            request_id: op["id"].as_str().unwrap().to_owned(),
            outcome: OperationOutcome::Executed as i32,
            reason: String::new(),
            execution_envelope_json: exec.to_json(),
            appliance_certificate_pem: cert_pem.to_owned(),
            pre_approval_envelope_json: pre.to_json(),
            ..Default::default()
        })
    }

    fn bare_release(op: &serde_json::Value, output: &[u8]) -> appliance_message::Body {
        appliance_message::Body::OutputRelease(OutputRelease {
            request_id: op["id"].as_str().unwrap().to_owned(),
            release_envelope_json: String::new(),
            output: output.to_vec(),
            output_salt: SALT.to_vec(),
        })
    }

    #[tokio::test]
    async fn pre_approved_output_needs_the_commands_and_output_level() {
        let f = fixture().await;
        let mut a = Appliance::connect(&f, &f.identity).await;
        for (name, level, released) in
            [("routine", ApprovalLevel::Commands, false), ("routine-out", ApprovalLevel::CommandsAndOutput, true)]
        {
            let op = request(&f, name, &["host:read"]).await;
            let id = op["id"].as_str().unwrap();
            assert_eq!(a.instruction().await.request_id, id);
            let (body, env) = pre_approval(&op, level, name);
            let by = |digest: String| AuthorityRef {
                kind: AuthorityKind::PreApproval,
                digest: Some(digest),
                policy_digest: None,
            };
            // A pre-approval for another template, or one the execution does not name: refused.
            let (other_body, other_env) = pre_approval(&op, level, "something-else");
            let exec = execution_by(&op, b"routine output", &a.key, &a.cert, by(other_body.digest_hex()));
            let ack = a.send(result_with(&op, &exec, &a.cert.pem, &other_env)).await;
            assert_refused(&ack, "another appliance, template or phase");
            let exec = execution_by(&op, b"routine output", &a.key, &a.cert, by("00".repeat(32)));
            let ack = a.send(result_with(&op, &exec, &a.cert.pem, &env)).await;
            assert_refused(&ack, "another pre-approval");
            // The real one: awaiting_approval -> executed, the pre-approval kept for the manifest.
            let exec = execution_by(&op, b"routine output", &a.key, &a.cert, by(body.digest_hex()));
            assert_eq!(code_of(&a.send(result_with(&op, &exec, &a.cert.pem, &env)).await), AckCode::Stored);
            let (_, m) = json_call(&f, Method::GET, &format!("/v1/operations/{id}/manifest"), None).await;
            assert_eq!(Envelope::from_json(m["pre_approval"].to_string().as_bytes()).unwrap(), env);

            // Output without a signed release: only at the commands-and-output level.
            let ack = a.send(bare_release(&op, b"routine output")).await;
            let expected = if released { AckCode::Stored } else { AckCode::Refused };
            assert_eq!(code_of(&ack), expected, "{ack:?}");
            let (s, bytes) = call(&f, Method::GET, &format!("/v1/operations/{id}/output"), None).await;
            if released {
                assert_eq!((s, bytes.as_slice()), (StatusCode::OK, b"routine output".as_slice()));
            } else {
                assert_eq!(s, StatusCode::NOT_FOUND);
                assert_eq!(op_state(&f, id).await["state"], "executed");
            }
        }
        f.server.shutdown().await;
    }
}

// ---------- what a connect reads ----------

mod connect_reads {
    use airlock_core::dsse::Envelope;
    use airlock_core::grant::ApprovalDecision;
    use airlock_proto::gateway::{Heartbeat, control_message};
    use http::{Method, StatusCode};
    use serde_json::json;

    use super::operations::{Appliance, json_call, policy, relay, relay_body, request};
    use super::*;

    /// Sends a heartbeat and waits for its ack: whatever followed the Welcome was pushed by
    /// then. Returns the other messages received meanwhile.
    async fn settle(a: &mut Appliance) -> Vec<control_message::Body> {
        let hb =
            ApplianceMessage { body: Some(appliance_message::Body::Heartbeat(Heartbeat { seq: 1, health: None })) };
        a.tx.send(hb).await.unwrap();
        let mut others = Vec::new();
        loop {
            match a.recv().await {
                control_message::Body::HeartbeatAck(_) => return others,
                other => others.push(other),
            }
        }
    }

    /// (Pending-operation reads, policy reads) the store served so far.
    fn reads(f: &Fixture) -> (u64, u64) {
        f.server.state.store.push_reads()
    }

    #[tokio::test]
    async fn a_connect_with_nothing_pending_reads_neither_operations_nor_policy() {
        let f = fixture().await;
        let before = reads(&f);
        let mut a = Appliance::connect(&f, &f.identity).await;
        assert!(settle(&mut a).await.is_empty());
        assert_eq!(reads(&f), before, "a connect with nothing pending stays in memory");
        drop(a);

        // A false positive costs one read, then the appliance is forgotten.
        f.server.state.push.index().operation_may_be_pending(f.identity.appliance);
        let mut a = Appliance::connect(&f, &f.identity).await;
        assert!(settle(&mut a).await.is_empty());
        assert_eq!(reads(&f), (before.0 + 1, before.1));
        assert!(!f.server.state.push.index().may_have_operations(&f.identity.appliance));
        drop(a);
        let mut a = Appliance::connect(&f, &f.identity).await;
        assert!(settle(&mut a).await.is_empty());
        assert_eq!(reads(&f), (before.0 + 1, before.1));
        f.server.shutdown().await;
    }

    fn instruction_ids(messages: &[control_message::Body]) -> Vec<String> {
        messages
            .iter()
            .map(|m| match m {
                control_message::Body::Operation(i) => i.request_id.clone(),
                other => panic!("expected an instruction, got {other:?}"),
            })
            .collect()
    }

    #[tokio::test]
    async fn operations_requested_or_decided_while_offline_are_pushed_on_connect_even_after_a_restart() {
        let f = fixture().await;
        // Requested while the appliance is offline: pushed at its connect.
        let op = request(&f, "check", &["host:read"]).await;
        let id = op["id"].as_str().unwrap().to_owned();
        let mut a = Appliance::connect(&f, &f.identity).await;
        assert_eq!(instruction_ids(&settle(&mut a).await), [id.as_str()]);
        drop(a);

        // After a restart the index is rebuilt from the store.
        let f = restart(f).await;
        assert!(f.server.state.push.index().may_have_operations(&f.identity.appliance));
        let mut a = Appliance::connect(&f, &f.identity).await;
        assert_eq!(instruction_ids(&settle(&mut a).await), [id.as_str()]);
        drop(a);

        // Approved while offline, then a restart: pushed with its approval.
        let grant = relay(&f, &op, ApprovalDecision::Approve).await;
        let f = restart(f).await;
        let mut a = Appliance::connect(&f, &f.identity).await;
        let pushed = settle(&mut a).await;
        match pushed.as_slice() {
            [control_message::Body::Operation(i)] => {
                assert_eq!(i.request_id, id);
                assert_eq!(Envelope::from_json(i.approval_envelope_json.as_bytes()).unwrap(), grant);
            }
            other => panic!("expected the approved instruction, got {other:?}"),
        }
        f.server.shutdown().await;
    }

    #[tokio::test]
    async fn a_relayed_policy_reaches_an_appliance_at_its_welcome_after_a_restart() {
        let f = fixture().await;
        let envelope = policy(&f, 3);
        let path = format!("/v1/environments/{}/policy", f.identity.environment);
        let (s, v) = json_call(&f, Method::PUT, &path, Some(relay_body(&envelope))).await;
        assert_eq!((s, &v["sent_to"]), (StatusCode::OK, &json!(0)), "{v}");

        let f = restart(f).await;
        let before = reads(&f);
        let mut a = Appliance::connect(&f, &f.identity).await;
        match settle(&mut a).await.as_slice() {
            [control_message::Body::PolicyUpdate(p)] => {
                assert_eq!(Envelope::from_json(p.policy_envelope_json.as_bytes()).unwrap(), envelope)
            }
            other => panic!("expected the policy, got {other:?}"),
        }
        // The policy was read; there were no operations to read.
        assert_eq!(reads(&f), (before.0, before.1 + 1));
        f.server.shutdown().await;
    }
}

/// Puts `bytes` in the workspace as an uploaded artifact, named by a release when `released`.
async fn stored_artifact(
    f: &Fixture,
    scope: &TenantScope,
    ws: airlock_core::WorkspaceId,
    bytes: &[u8],
    released: bool,
) -> String {
    use sha2::Digest;
    let sha = crate::artifacts::hex(&sha2::Sha256::digest(bytes));
    let digest = crate::artifacts::Sha256Hex::parse(&sha).unwrap();
    std::fs::write(f.server.state.artifacts.blob_path(&digest), bytes).unwrap();
    let now = f.server.state.now();
    let row =
        crate::store::ArtifactRow { workspace_id: ws, sha256: sha.clone(), size: bytes.len() as u64, created_at: now };
    let mut tx = f.server.state.store.write().await.unwrap();
    assert!(tx.insert_artifact(scope, &row, u64::MAX).await.unwrap());
    if released {
        tx.insert_release_artifacts(scope, ws, "shop", "1.0.0", &[sha.as_str()]).await.unwrap();
    }
    tx.commit().await.unwrap();
    sha
}

/// Every chunk of a fetch, or its error.
async fn fetch_as(
    f: &Fixture,
    identity: &ApplianceIdentity,
    sha256: &str,
    offset: u64,
) -> Result<Vec<airlock_proto::gateway::ArtifactChunk>, tonic::Status> {
    let (channel, _, _) = channel_as(f, identity).await;
    let request = airlock_proto::gateway::FetchArtifactRequest { sha256: sha256.to_owned(), offset };
    let mut stream = ApplianceGatewayClient::new(channel).fetch_artifact(request).await?.into_inner();
    let mut chunks = Vec::new();
    while let Some(chunk) = stream.message().await? {
        chunks.push(chunk);
    }
    Ok(chunks)
}

#[tokio::test]
async fn an_appliance_fetches_only_artifacts_released_in_its_own_workspace() {
    let f = fixture().await;
    let tenant_a = f.identity.tenant;
    let scope_a = TenantScope::for_local_operator(tenant_a, airlock_core::id::TokenId::from_random([7; 16]));
    let bytes: Vec<u8> = (0..1_300_000u32).map(|i| (i * 7 % 253) as u8).collect();
    let released = stored_artifact(&f, &scope_a, f.workspace, &bytes, true).await;
    let unreleased = stored_artifact(&f, &scope_a, f.workspace, b"uploaded, never released", false).await;

    // In order, in bounded chunks, the whole artifact.
    let chunks = fetch_as(&f, &f.identity, &released, 0).await.unwrap();
    assert!(chunks.len() >= 3, "{} chunks", chunks.len());
    let mut got = Vec::new();
    for c in &chunks {
        assert_eq!(c.offset, got.len() as u64);
        assert_eq!(c.size, bytes.len() as u64);
        assert!(c.data.len() <= super::fetch::FETCH_CHUNK);
        got.extend_from_slice(&c.data);
    }
    assert_eq!(got, bytes);
    // Resuming from an offset sends only the rest.
    let rest = fetch_as(&f, &f.identity, &released, 1_000_000).await.unwrap();
    assert_eq!(rest[0].offset, 1_000_000);
    assert_eq!(rest.iter().map(|c| c.data.len()).sum::<usize>(), 300_000);
    let past = fetch_as(&f, &f.identity, &released, 2_000_000).await.unwrap_err();
    assert_eq!(past.code(), tonic::Code::OutOfRange);

    // Not released, unknown, malformed: one answer, no hint.
    for digest in [unreleased.as_str(), &"0".repeat(64), "../../ca.key"] {
        let err = fetch_as(&f, &f.identity, digest, 0).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound, "{digest}: {err:?}");
        assert_eq!(err.message(), "no such artifact for this appliance");
    }

    // An appliance of another tenant, registered in its own environment, cannot fetch it.
    let scope_b = TenantScope::for_local_operator(f.other_tenant, airlock_core::id::TokenId::from_random([8; 16]));
    let ws_b = f.server.state.store.list_workspaces(&scope_b).await.unwrap()[0].id;
    let foreign = ApplianceIdentity {
        trust_domain: "airlock.test".into(),
        tenant: f.other_tenant,
        environment: EnvironmentId::from_random([10; 16]),
        appliance: ApplianceId::from_random([11; 16]),
    };
    let now = f.server.state.now();
    let mut tx = f.server.state.store.write().await.unwrap();
    tx.create_environment(&scope_b, ws_b, foreign.environment, "prod", now).await.unwrap();
    tx.insert_appliance(&foreign, "test", ("01", now), b"key", now).await.unwrap();
    tx.commit().await.unwrap();
    let err = fetch_as(&f, &foreign, &released, 0).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    assert_eq!(err.message(), "no such artifact for this appliance");
    // A certificate naming the other tenant with A's appliance ids is no appliance at all.
    let mut forged = f.identity.clone();
    forged.tenant = f.other_tenant;
    let err = fetch_as(&f, &forged, &released, 0).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");

    // Revoked: refused.
    let mut tx = f.server.state.store.write().await.unwrap();
    assert!(tx.revoke_appliance(&scope_a, f.identity.appliance, now).await.unwrap());
    tx.commit().await.unwrap();
    let err = fetch_as(&f, &f.identity, &released, 0).await.unwrap_err();
    assert!(airlock_proto::stream_end::is_revoked(&err), "{err:?}");
    f.server.shutdown().await;
}
