//! The live gateway, in process, dialled with certificates minted by the server's own CA.

use std::sync::Arc;
use std::time::Duration;

use airlock_core::{ApplianceId, ApplianceIdentity, EnvironmentId};
use airlock_proto::gateway::appliance_gateway_client::ApplianceGatewayClient;
use airlock_proto::gateway::{ApplianceMessage, Hello, appliance_message, control_message};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::authz::TenantScope;
use crate::clock::SystemClock;
use crate::keys::KekSource;
use crate::{RunningServer, ServerConfig};

struct Fixture {
    server: RunningServer,
    /// An appliance of tenant A, registered in the store.
    identity: ApplianceIdentity,
    other_tenant: airlock_core::TenantId,
    _dir: tempfile::TempDir,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let kek = KekSource::default_for(dir.path());
    let a = crate::init(dir.path(), &kek, "airlock.test", "acme", "default", &SystemClock).await.unwrap();
    let b = crate::create_tenant(dir.path(), &kek, "globex", "default", &SystemClock).await.unwrap();
    let mut cfg = ServerConfig::new(dir.path().to_owned());
    cfg.api_listen = "127.0.0.1:0".parse().unwrap();
    cfg.gateway_listen = "127.0.0.1:0".parse().unwrap();
    cfg.hostnames = vec!["127.0.0.1".into()];
    let server = crate::serve(cfg).await.unwrap();
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
    Fixture { server, identity, other_tenant: b.tenant, _dir: dir }
}

/// Opens a session with a certificate our CA issues for `identity`; returns the first reply.
async fn session_as(f: &Fixture, identity: &ApplianceIdentity) -> Result<control_message::Body, tonic::Status> {
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::default().serialize_request(&key).unwrap().pem().unwrap();
    let now = f.server.state.now();
    let issued = f.server.state.ca.sign_join_csr(&csr, identity, now, Duration::from_secs(3600)).unwrap();

    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(f.server.ca_pem.as_bytes()).unwrap()).unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(airlock_proto::tls::provider())
        .with_protocol_versions(airlock_proto::tls::PROTOCOL_VERSIONS)
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![issued.der], PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap())
        .unwrap();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let addr = f.server.gateway_addr;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
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
        .unwrap();
    let hello =
        ApplianceMessage { body: Some(appliance_message::Body::Hello(Hello { version: "test".into(), health: None })) };
    let mut inbound = ApplianceGatewayClient::new(channel).session(tokio_stream::iter(vec![hello])).await?.into_inner();
    let reply = inbound.message().await?;
    Ok(reply.and_then(|m| m.body).expect("a reply"))
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
    assert!(refused.iter().any(|r| r.as_ref().is_ok_and(|r| r.event.action == "gateway.stream_refused")));
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
    assert!(err.message().starts_with(airlock_proto::REVOKED_STATUS_PREFIX), "{err:?}");
    f.server.shutdown().await;
}
