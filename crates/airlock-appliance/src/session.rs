//! The appliance's one outbound stream to the gateway: mutual TLS 1.3, gRPC over HTTP/2.
//!
//! Trust: the gateway must present a certificate chaining to the CA stored at join, whose
//! fingerprint was pinned at install.
//! The appliance presents its own certificate; the private key stays in this process and the
//! state directory.
//! In TLS 1.3 the gateway judges a client certificate after the client finished its handshake,
//! so the session reads the gateway's first flight itself: a refused (or revoked) certificate
//! is a typed error, not a broken stream.
//! On the stream: heartbeats, certificate renewal with a new key at two thirds of its lifetime,
//! and the control plane's messages.
//! After every `Welcome` the outbox is sent again (`crate::outbound`), ahead of anything else.
//! Operation instructions go to the executor off the loop, so heartbeats go on while they run.
//! A relayed `PolicyUpdate` is applied exactly like a policy loaded on the host; a refused one
//! changes nothing.
//! Every `Hello` carries the customer's attestation of the execution key, if made; one made
//! while connected ends the session so the next `Hello` carries it.
//! While connected, the channel is published on a [`crate::artifacts::GatewayLink`], so artifact
//! fetches ride the same connection.

use std::sync::Arc;
use std::time::Duration;

use airlock_core::certificate;
use airlock_core::{ApplianceIdentity, Timestamp};
use airlock_proto::gateway::appliance_gateway_client::ApplianceGatewayClient;
use airlock_proto::gateway::{
    ApplianceMessage, Health, HealthStatus, Heartbeat, Hello, RenewRequest, appliance_message, control_message,
};
use airlock_proto::tls::{ServerTrust, mtls_client_config};
use hyper_util::rt::TokioIo;
use rcgen::KeyPair;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::ApplianceError;
use crate::clock::TimeSource;
use crate::executor::Executor;
use crate::join::{cert_matches_key, csr_for};
use crate::outbound::Outbound;
use crate::state_dir::{Credentials, Enrolment, StateDir, Validity, inspect_cert};

/// How a session ended.
#[derive(Debug)]
pub(crate) enum SessionEnd {
    /// The control plane revoked this appliance: do not retry on this identity.
    Revoked(String),
    /// The control plane refused this certificate as replaced by a newer one this appliance no longer holds: retrying
    /// with it cannot succeed.
    Superseded(String),
    /// Anything else: retry with backoff. `established` says the stream got as far as Welcome.
    Dropped {
        reason: String,
        established: bool,
    },
    Shutdown,
}

pub(crate) struct Session<'a> {
    pub state: &'a StateDir,
    pub enrolment: &'a Enrolment,
    pub ca_pem: &'a str,
    pub identity: &'a ApplianceIdentity,
    pub started: std::time::Instant,
    /// The clock the certificate's renewal is timed by.
    pub time: &'a TimeSource,
    /// Set for an appliance that joins with its platform identity: each renewal carries a fresh proof.
    pub platform_join: Option<&'a crate::config::PlatformJoinConfig>,
    pub executor: Arc<Executor>,
    /// Where the connected channel is published, for artifact fetches (`crate::artifacts`).
    pub link: crate::artifacts::GatewayLink,
}

/// Withdraws the published channel when a session ends, however it ends.
struct Unpublish<'a>(&'a crate::artifacts::GatewayLink);

impl Drop for Unpublish<'_> {
    fn drop(&mut self) {
        self.0.publish(None);
    }
}

/// Detaches the outbox from a stream when its session ends, however it ends.
struct Detach<'a>(&'a Outbound);

impl Drop for Detach<'_> {
    fn drop(&mut self) {
        self.0.disconnected();
    }
}

impl Session<'_> {
    pub(crate) async fn run(&self, shutdown: &mut tokio::sync::watch::Receiver<bool>) -> SessionEnd {
        match self.run_inner(shutdown).await {
            Ok(end) => end,
            Err(end) => end,
        }
    }

    async fn run_inner(&self, shutdown: &mut tokio::sync::watch::Receiver<bool>) -> Result<SessionEnd, SessionEnd> {
        let dropped = |reason: String| SessionEnd::Dropped { reason, established: false };
        let (_, _, creds) = self.state.load().map_err(|e| dropped(e.to_string()))?;
        let tls = client_tls(self.ca_pem, &creds).map_err(dropped)?;
        let channel = connect(&self.enrolment.gateway_endpoint, &self.enrolment.gateway_server_name, tls)
            .await
            .map_err(|e| classify_transport(&e))?;
        self.link.publish(Some(channel.clone()));
        let _unpublish = Unpublish(&self.link);
        let mut client = ApplianceGatewayClient::new(channel);
        let (tx, rx) = mpsc::channel::<ApplianceMessage>(8);
        // The customer's attestation of the execution key goes in every Hello: the control
        // plane names that key in the requests it makes, so an approval covers this one host.
        // One made while connected ends the session, and the next Hello carries it.
        let mut attestation = self.executor.control().attestation_changes();
        let execution_key_attestation_json =
            attestation.borrow_and_update().as_ref().map(|a| a.to_json()).unwrap_or_default();
        let hello = ApplianceMessage {
            body: Some(appliance_message::Body::Hello(Hello {
                version: airlock_proto::VERSION.to_owned(),
                health: Some(self.health()),
                execution_key_attestation_json,
            })),
        };
        // The channel has room: this is its first message.
        let _ = tx.try_send(hello);
        let mut inbound =
            client.session(ReceiverStream::new(rx)).await.map_err(|s| classify_status(&s, false))?.into_inner();

        let mut established = false;
        let _detach = Detach(&self.executor.control().outbound);
        let mut heartbeat = tokio::time::interval(Duration::from_secs(15));
        heartbeat.reset();
        let mut seq = 0u64;
        let mut pending_key: Option<KeyPair> = None;
        let validity = inspect_cert(&creds.cert_pem).ok().map(|(_, v)| v);
        let mut renew_at = validity.map(|v| v.renew_at());
        loop {
            let renew_sleep =
                tokio::time::sleep(renew_at.map_or(Duration::from_secs(3600), |t| self.time.sleep_towards(t)));
            tokio::select! {
                _ = shutdown.changed() => return Ok(SessionEnd::Shutdown),
                Ok(()) = attestation.changed() => {
                    tracing::info!("reconnecting to present the customer's attestation of the execution key");
                    return Ok(SessionEnd::Dropped { reason: "the customer attested the execution key; presenting it in a new Hello".into(), established });
                }
                _ = renew_sleep, if pending_key.is_none() && renew_at.is_some() => {
                    // The sleep is capped (`TimeSource::sleep_towards`): read the clock again.
                    if renew_at.is_some_and(|t| self.time.now() < t) {
                        continue;
                    }
                    let key = KeyPair::generate().map_err(|e| dropped(format!("key generation: {e}")))?;
                    let csr_pem = csr_for(&key, Some(&self.identity.uri())).map_err(|e| dropped(e.to_string()))?;
                    tracing::info!("requesting certificate renewal with a new key pair");
                    let platform_proof_json = match self.platform_join {
                        Some(cfg) => crate::join::renewal_proof(cfg, &key, &self.enrolment.ca_fingerprint).await,
                        None => String::new(),
                    };
                    pending_key = Some(key);
                    let renew = RenewRequest { csr_pem, platform_proof_json };
                    let msg = ApplianceMessage { body: Some(appliance_message::Body::Renew(renew)) };
                    if tx.send(msg).await.is_err() {
                        return Ok(SessionEnd::Dropped { reason: "stream closed".into(), established });
                    }
                }
                _ = heartbeat.tick() => {
                    seq += 1;
                    let msg = ApplianceMessage {
                        body: Some(appliance_message::Body::Heartbeat(Heartbeat { seq, health: Some(self.health()) })),
                    };
                    if tx.send(msg).await.is_err() {
                        return Ok(SessionEnd::Dropped { reason: "stream closed".into(), established });
                    }
                }
                msg = inbound.message() => {
                    let msg = match msg {
                        Ok(Some(m)) => m,
                        Ok(None) => return Ok(SessionEnd::Dropped { reason: "control plane closed the stream".into(), established }),
                        Err(status) => return Ok(classify_status(&status, established)),
                    };
                    match msg.body {
                        Some(control_message::Body::Welcome(w)) => {
                            established = true;
                            let every = Duration::from_secs(u64::from(w.heartbeat_interval_seconds.clamp(1, 3600)));
                            heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                            tracing::info!(appliance = %w.appliance_id, heartbeat_seconds = every.as_secs(), "connected to control plane");
                            // Results and releases not yet acknowledged go again, off the loop,
                            // ahead of anything else the appliance sends.
                            let executor = self.executor.clone();
                            let tx = tx.clone();
                            tokio::spawn(async move {
                                executor.control().outbound.connected(tx).await;
                                // Then where the deployments stand, as they are now.
                                executor.report_again().await;
                            });
                        }
                        Some(control_message::Body::HeartbeatAck(_)) => {}
                        Some(control_message::Body::Renewed(r)) => {
                            let Some(key) = pending_key.take() else {
                                tracing::warn!("ignoring a renewed certificate we did not ask for");
                                continue;
                            };
                            match self.accept_renewal(&r.certificate_pem, &key) {
                                Ok(_) => {
                                    tracing::info!(serial = %r.serial, not_after = %Timestamp::from_unix_millis(r.not_after_unix_ms), "certificate renewed; reconnecting with it");
                                    // Presenting the new certificate is what retires the old one at the
                                    // control plane (until then it stays usable, in case this answer had
                                    // been lost), so a copy of the old key stops working now rather than
                                    // at its expiry. What was in flight resumes on the new connection.
                                    return Ok(SessionEnd::Dropped {
                                        reason: "presenting the renewed certificate on a new connection".into(),
                                        established,
                                    });
                                }
                                Err(e) => {
                                    tracing::error!(error = %e, "refusing renewed certificate");
                                    renew_at = Some(retry_renewal_at(validity, self.time.now()));
                                }
                            }
                        }
                        Some(control_message::Body::RenewRefused(r)) => {
                            pending_key = None;
                            tracing::warn!(reason = %r.reason, "certificate renewal refused; will retry");
                            renew_at = Some(retry_renewal_at(validity, self.time.now()));
                        }
                        Some(control_message::Body::Operation(instruction)) => {
                            // Decided and run off the loop: heartbeats go on while it runs.
                            let executor = self.executor.clone();
                            let tx = tx.clone();
                            tokio::spawn(async move {
                                if let Some(reply) = executor.handle(instruction).await.reply() {
                                    let _ = tx.send(reply).await;
                                }
                            });
                        }
                        Some(control_message::Body::PolicyUpdate(update)) => {
                            // Verified against the pinned customer keys like a policy loaded
                            // on this host; a refusal is audited and changes nothing.
                            match self.executor.control().relayed_policy(update.policy_envelope_json.as_bytes()) {
                                Ok(Some(status)) => tracing::info!(serial = ?status.policy_serial, "applied a customer policy relayed by the control plane"),
                                Ok(None) => {}
                                Err(e) => tracing::warn!(error = %e, "refused a policy relayed by the control plane; the policy in force stays"),
                            }
                        }
                        Some(control_message::Body::OperationAck(ack)) => {
                            // A release that waited for this result goes now, off the loop.
                            if let Some(next) = self.executor.control().outbound.on_ack(&ack) {
                                let control = self.executor.control().clone();
                                tokio::spawn(async move { control.outbound.send(next).await });
                            }
                        }
                        None => {}
                    }
                }
            }
        }
    }

    fn health(&self) -> Health {
        Health { status: HealthStatus::Healthy as i32, uptime_seconds: self.started.elapsed().as_secs() }
    }

    /// Checks a renewed certificate is for our new key and identity, then replaces the old pair.
    fn accept_renewal(&self, cert_pem: &str, key: &KeyPair) -> Result<Validity, ApplianceError> {
        let (identity, validity) =
            inspect_cert(cert_pem).map_err(|e| ApplianceError::Protocol(format!("renewed certificate: {e}")))?;
        if &identity != self.identity {
            return Err(ApplianceError::Protocol("renewed certificate names another identity".into()));
        }
        if !cert_matches_key(cert_pem, key) {
            return Err(ApplianceError::Protocol("renewed certificate is not for our new key".into()));
        }
        self.state.save_credentials(&Credentials { cert_pem: cert_pem.to_owned(), key_pem: key.serialize_pem() })?;
        Ok(validity)
    }
}

/// When to try a refused renewal again: a quarter of the time left, between 1 and 30 seconds.
fn retry_renewal_at(validity: Option<Validity>, now: Timestamp) -> Timestamp {
    let left = validity.map_or(Duration::from_secs(120), |v| v.not_after.since(now));
    now.saturating_add((left / 4).clamp(Duration::from_secs(1), Duration::from_secs(30)))
}

/// Mutual TLS to the gateway: trusting only the CA stored at join, presenting our certificate.
pub(crate) fn client_tls(ca_pem: &str, creds: &Credentials) -> Result<rustls::ClientConfig, String> {
    let ca = certificate::pem_to_der(ca_pem).map_err(|e| format!("stored CA: {e}"))?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(ca)).map_err(|e| format!("stored CA: {e}"))?;
    let cert = certificate::pem_to_der(&creds.cert_pem).map_err(|e| format!("certificate: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(creds.key_pem.as_bytes()).map_err(|e| format!("private key: {e}"))?;
    mtls_client_config(ServerTrust::Roots(roots), vec![CertificateDer::from(cert)], key, &[b"h2"])
        .map_err(|e| format!("client certificate: {e}"))
}

/// HTTP/2 receive windows: a stream's, and the whole connection's.
const ARTIFACT_STREAM_WINDOW: u32 = 4 * 1024 * 1024;
const ARTIFACT_CONNECTION_WINDOW: u32 = 8 * 1024 * 1024;

/// Dials the gateway. The connector is ours so TLS is exactly the config above.
pub(crate) async fn connect(
    endpoint: &str,
    server_name: &str,
    tls: rustls::ClientConfig,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let name = ServerName::try_from(server_name.to_owned())
        .unwrap_or_else(|_| ServerName::try_from("invalid.invalid").expect("static name is valid")); // The fallback fails verification, as it should.
    let addr = endpoint.to_owned();
    // The URI only carries the authority to tonic; TLS is done by the connector below.
    tonic::transport::Endpoint::from_shared(format!("http://{endpoint}"))?
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(Duration::from_secs(60))
        .keep_alive_timeout(Duration::from_secs(20))
        // What the gateway may send before we take it: room for artifact chunks in flight
        // (`crate::artifacts`); the session's own messages are small and never fill it.
        .initial_stream_window_size(ARTIFACT_STREAM_WINDOW)
        .initial_connection_window_size(ARTIFACT_CONNECTION_WINDOW)
        .connect_with_connector(tower::service_fn(move |_| {
            let (connector, name, addr) = (connector.clone(), name.clone(), addr.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect(addr.as_str()).await?;
                tcp.set_nodelay(true)?;
                let mut tls = connector.connect(name, tcp).await?;
                let first = read_first_flight(&mut tls).await?;
                Ok::<_, std::io::Error>(TokioIo::new(Replay { prefix: first, pos: 0, inner: tls }))
            }
        }))
        .await
}

/// The gateway refused our certificate after the handshake completed on our side.
#[derive(Debug, thiserror::Error)]
#[error("the gateway refused our certificate: {0}")]
pub(crate) struct CertificateRefused(String);

/// In TLS 1.3 the server judges a client certificate after the client has finished its
/// handshake, so a refusal arrives as an alert on the first read. Reading the server's first
/// flight (its HTTP/2 SETTINGS) here turns that alert into a typed error before tonic sees
/// the connection; the bytes read are replayed to tonic.
async fn read_first_flight<S: tokio::io::AsyncRead + Unpin>(io: &mut S) -> std::io::Result<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 4096];
    let n = match tokio::time::timeout(Duration::from_secs(10), io.read(&mut buf)).await {
        Err(_) => {
            return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "gateway sent nothing after the handshake"));
        }
        Ok(Err(e)) => {
            // tokio-rustls reports a received alert as text on this path.
            let text = e.to_string();
            return Err(match text.strip_prefix("received fatal alert: ") {
                Some(alert) => {
                    std::io::Error::new(std::io::ErrorKind::PermissionDenied, CertificateRefused(alert.to_owned()))
                }
                None => e,
            });
        }
        Ok(Ok(n)) => n,
    };
    if n == 0 {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "gateway closed the connection"));
    }
    buf.truncate(n);
    Ok(buf)
}

/// A stream that first yields bytes already read from it.
struct Replay<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Replay<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = (self.prefix.len() - self.pos).min(buf.remaining());
            let start = self.pos;
            buf.put_slice(&self.prefix[start..start + n]);
            self.pos += n;
            if self.pos == self.prefix.len() {
                self.prefix = Vec::new();
                self.pos = 0;
            }
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Replay<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

fn classify_status(status: &tonic::Status, established: bool) -> SessionEnd {
    if airlock_proto::stream_end::is_revoked(status) {
        return SessionEnd::Revoked(status.message().to_owned());
    }
    if airlock_proto::stream_end::is_superseded(status) {
        return SessionEnd::Superseded(status.message().to_owned());
    }
    if let Some(end) = tls_alert(status) {
        return end;
    }
    SessionEnd::Dropped { reason: format!("{}: {}", status.code(), status.message()), established }
}

fn classify_transport(e: &(dyn std::error::Error + 'static)) -> SessionEnd {
    tls_alert(e)
        .unwrap_or_else(|| SessionEnd::Dropped { reason: airlock_proto::tls::describe_error(e), established: false })
}

/// Whether the gateway refused our certificate as revoked, anywhere in the error chain.
fn tls_alert(e: &(dyn std::error::Error + 'static)) -> Option<SessionEnd> {
    let revoked = airlock_proto::tls::error_chain(e).any(|err| {
        matches!(err.downcast_ref::<CertificateRefused>(), Some(CertificateRefused(alert)) if alert == "CertificateRevoked")
            || matches!(
                err.downcast_ref::<rustls::Error>(),
                Some(rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRevoked))
            )
    });
    revoked.then(|| SessionEnd::Revoked("the gateway refused our certificate as revoked".into()))
}
