//! The appliance gateway: a mutual-TLS gRPC listener where appliances hold one stream each.
//!
//! Trust boundary: a connection reaches [`GatewayService`] only after the TLS handshake verified a client certificate issued by our CA for a non-revoked appliance ([`crate::tls`]).
//! The scope of every stream comes from its certificate, and the stored appliance must match both the tenant and the environment the certificate names.
//! The service re-checks revocation and expiry when a stream starts, checks revocation again after registering the stream (closing the race with a concurrent revocation), and ends a stream when its certificate expires or its appliance is revoked.
//!
//! The session task never awaits the appliance: replies and pushes are queued with `try_send`, so a peer that stops reading cannot stall the task that must act on revocation and expiry.
//! A peer whose reply queue is full is disconnected; a kicked or expired one gets a final status and then its socket is cut ([`ConnKill`]).
//! A peer must send its ClientHello within a short deadline and finish its handshake within another; pending handshakes have a small pool of their own, capped per address, where a newcomer evicts the oldest peer that has sent nothing yet (one whose ClientHello was read is busy, evictable only once stuck past [`crate::net::HANDSHAKE_STALL_GRACE`]), and verified appliance connections a separate one, so a bare TCP flood can neither starve appliances that present certificates, nor evict their handshakes, nor reach the file limit ([`crate::net`]).
//! One certificate identity holds at most [`CONNECTIONS_PER_APPLIANCE`] verified connections (its newest cuts its oldest), and a verified connection that opens no gRPC stream within [`STREAM_OPEN_DEADLINE`] is cut, so one valid certificate cannot fill the stream pool, which never evicts.
//! What is pushed unasked on a stream is [`crate::push`]'s business; results and releases go to [`crate::operations`], renewals to `renew`.
//! A release artifact is fetched on the appliance's connection as a stream of its own (`fetch`), under the same checks as a session.

mod conn;
mod fetch;
mod renew;
#[cfg(test)]
mod tests;

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use airlock_core::audit::{AuditAction, Outcome};
use airlock_proto::gateway::appliance_gateway_server::{ApplianceGateway, ApplianceGatewayServer};
use airlock_proto::gateway::{
    ApplianceMessage, ControlMessage, HealthStatus, HeartbeatAck, Welcome, appliance_message, control_message,
};
use futures_util::Stream;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

pub use conn::{ApplianceHold, ConnKill, GatewayConn, GatewayPeer, PerAppliance};

use crate::authz::TenantScope;
use crate::metrics::ReasonLabels;
use crate::registry::{Kick, LiveStatus, Registration};
use crate::seen::SeenUpdate;
use crate::state::{AppState, SYSTEM_CHAIN, event};
use crate::store::CertificateStanding;
use crate::tls::{PeerCert, handshake_failure_reason, parse_peer_cert};

/// Replies queued for one stream; a peer this far behind is not reading.
const REPLY_QUEUE: usize = 16;
/// How long a final status may take to reach the peer before its connection is cut.
const KILL_GRACE: Duration = Duration::from_millis(300);
/// Verified connections one appliance identity may hold: its stream, a replacement, and slack for reconnect races.
pub const CONNECTIONS_PER_APPLIANCE: usize = 8;
/// How long a verified connection may go without opening a gRPC stream before it is cut.
pub const STREAM_OPEN_DEADLINE: Duration = Duration::from_secs(5);

/// The two stages of stopping: no new connections, then end the rest.
pub struct Listeners {
    pub stop_accepting: tokio::sync::watch::Receiver<bool>,
    pub shutdown: tokio::sync::watch::Receiver<bool>,
}

/// The gateway's connection pools and deadlines.
pub struct GatewayLimits {
    /// Connections still in their handshake; a newcomer evicts the oldest that has sent nothing yet when it is full.
    pub handshakes: Arc<crate::net::SlotPool>,
    /// Verified appliance connections; a full pool refuses newcomers.
    pub streams: Arc<crate::net::SlotPool>,
    pub hello_timeout: Duration,
    pub handshake_timeout: Duration,
}

const LISTENER: &str = "gateway";

/// Accepts TCP connections, completes TLS handshakes and feeds verified connections to tonic.
pub async fn serve(
    state: Arc<AppState>,
    listener: TcpListener,
    tls: rustls::ServerConfig,
    mut refused_revoked: mpsc::UnboundedReceiver<airlock_core::ApplianceIdentity>,
    listeners: Listeners,
    limits: GatewayLimits,
) -> Result<(), tonic::transport::Error> {
    let Listeners { stop_accepting, shutdown } = listeners;
    let GatewayLimits { handshakes, streams, hello_timeout, handshake_timeout } = limits;
    let audit_state = state.clone();
    tokio::spawn(async move {
        while let Some(identity) = refused_revoked.recv().await {
            let scope = TenantScope::for_appliance(&identity);
            let mut ev = event(scope.principal().actor(), AuditAction::GatewayHandshakeRejected, Outcome::Denied);
            ev.target = Some(identity.appliance.to_string());
            ev.detail = serde_json::json!({ "reason": "revoked" });
            audit_state.audit_refusal(&scope.chain(), ev).await;
        }
    });
    let tls = Arc::new(tls);
    let per_appliance = PerAppliance::new(CONNECTIONS_PER_APPLIANCE);
    let (conn_tx, conn_rx) = mpsc::channel::<Result<GatewayConn, std::io::Error>>(256);
    let accept_state = state.clone();
    let mut accept_shutdown = stop_accepting;
    tokio::spawn(async move {
        let mut backoff = crate::net::AcceptBackoff::new();
        loop {
            let (tcp, addr) = tokio::select! {
                _ = accept_shutdown.changed() => break,
                conn = crate::net::accept(&listener, &mut backoff, LISTENER) => conn,
            };
            let counters = &accept_state.metrics.connections;
            // A full handshake pool evicts its oldest pending handshake: a flood of bare connects
            // only displaces itself, while an appliance's handshake completes in milliseconds.
            let pending = match handshakes.acquire(addr.ip()) {
                Ok((slot, evicted)) => {
                    if let Some(shed) = evicted {
                        counters.shed(LISTENER, shed);
                    }
                    slot
                }
                Err(shed) => {
                    counters.shed(LISTENER, shed);
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let (tls, state, conn_tx, streams, per_appliance) =
                (tls.clone(), accept_state.clone(), conn_tx.clone(), streams.clone(), per_appliance.clone());
            tokio::spawn(async move {
                let handshake = handshake(tcp, tls, hello_timeout, handshake_timeout, &pending);
                let tls = tokio::select! {
                    res = handshake => match res {
                        Ok(tls) => tls,
                        Err(Refused::Deadline(reason)) => {
                            state.metrics.connections.closed(LISTENER, reason);
                            return handshake_refused(&state, addr, reason).await;
                        }
                        Err(Refused::Tls(e)) => return handshake_refused(&state, addr, handshake_failure_reason(&e)).await,
                    },
                    // Counted as shed when the newcomer took its place.
                    () = pending.evicted() => return,
                };
                let leaf = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).cloned();
                let Some(peer) = leaf.and_then(|der| parse_peer_cert(der.as_ref(), state.ca.trust_domain()).ok())
                else {
                    return handshake_refused(&state, addr, "not_an_appliance").await;
                };
                let kill = Arc::new(ConnKill::default());
                let (hold, displaced) =
                    per_appliance.take((peer.identity.appliance, peer.serial.clone()), kill.clone());
                if displaced {
                    state.metrics.connections.closed(LISTENER, "displaced_by_newer");
                }
                let slot = match streams.acquire(addr.ip()) {
                    Ok((slot, _)) => slot,
                    Err(shed) => {
                        state.metrics.connections.shed(LISTENER, shed);
                        return handshake_refused(&state, addr, "overloaded").await;
                    }
                };
                drop(pending);
                let peer = GatewayPeer { cert: peer, kill: kill.clone() };
                if conn_tx.send(Ok(GatewayConn { io: tls, peer, _slot: slot, _hold: hold })).await.is_err() {
                    return;
                }
                // A certificate holder that never opens its stream would hold a slot that is never evicted.
                tokio::time::sleep(STREAM_OPEN_DEADLINE).await;
                if !kill.has_opened_a_stream() {
                    state.metrics.connections.closed(LISTENER, "stream_open_timeout");
                    tracing::info!(%addr, "verified gateway connection opened no stream; closing");
                    kill.kill();
                }
            });
        }
    });

    let mut shutdown = shutdown;
    tonic::transport::Server::builder()
        // Small HTTP/2 windows and frames keep per-stream buffers near the TLS floor; appliance
        // messages are a few hundred bytes.
        .initial_stream_window_size(Some(16 * 1024))
        .initial_connection_window_size(Some(32 * 1024))
        .max_frame_size(Some(16 * 1024))
        // An appliance holds one session stream; a second is allowed only so a replacement can
        // start before the old one is torn down, and a third for an artifact fetch (`fetch`).
        .max_concurrent_streams(Some(3))
        .http2_keepalive_interval(Some(Duration::from_secs(60)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(ApplianceGatewayServer::new(GatewayService { state }))
        .serve_with_incoming_shutdown(ReceiverStream::new(conn_rx), async move {
            let _ = shutdown.changed().await;
        })
        .await
}

/// Why a gateway handshake did not complete.
enum Refused {
    /// A deadline passed: `hello_timeout` or `handshake_timeout`.
    Deadline(&'static str),
    Tls(std::io::Error),
}

/// The ClientHello within `hello_timeout`, then the rest of the handshake within `handshake_timeout`, with
/// `pending` marked busy from the ClientHello on.
async fn handshake(
    tcp: tokio::net::TcpStream,
    tls: Arc<rustls::ServerConfig>,
    hello_timeout: Duration,
    handshake_timeout: Duration,
    pending: &crate::net::Slot,
) -> Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>, Refused> {
    let hello = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp);
    let start = match tokio::time::timeout(hello_timeout, hello).await {
        Ok(Ok(start)) => start,
        Ok(Err(e)) => return Err(Refused::Tls(e)),
        Err(_) => return Err(Refused::Deadline("hello_timeout")),
    };
    // A real TLS client: no longer displaced by a flood of peers that have sent nothing.
    let _busy = pending.busy();
    match tokio::time::timeout(handshake_timeout, start.into_stream(tls)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(Refused::Tls(e)),
        Err(_) => Err(Refused::Deadline("handshake_timeout")),
    }
}

async fn handshake_refused(state: &AppState, addr: std::net::SocketAddr, reason: &'static str) {
    state.metrics.handshake_failures.get_or_create(&ReasonLabels { reason: reason.to_owned() }).inc();
    tracing::info!(%addr, reason, "gateway refused a TLS handshake");
    let mut ev = event("anonymous", AuditAction::GatewayHandshakeRejected, Outcome::Denied);
    ev.detail = serde_json::json!({ "reason": reason, "peer": addr.to_string() });
    state.audit_refusal(SYSTEM_CHAIN, ev).await;
}

pub struct GatewayService {
    state: Arc<AppState>,
}

type SessionStream = Pin<Box<dyn Stream<Item = Result<ControlMessage, Status>> + Send>>;

/// A certificate replaced by a newer one its appliance has presented, or never its appliance's.
pub(crate) fn superseded() -> Status {
    airlock_proto::stream_end::superseded("this certificate has been superseded by a newer one; use the newest")
}

/// Retires the previous certificate of appliance `id`, which presented its current one, `serial`.
async fn retire_previous(
    state: &AppState,
    scope: &TenantScope,
    id: airlock_core::ApplianceId,
    serial: &str,
) -> Result<(), crate::store::StoreError> {
    let mut tx = state.store.write().await?;
    tx.retire_previous_certificate(scope, id, serial).await?;
    tx.commit().await?;
    tracing::info!(appliance = %id, "the appliance presented its renewed certificate; the one it replaced is retired");
    Ok(())
}

#[tonic::async_trait]
impl ApplianceGateway for GatewayService {
    type SessionStream = SessionStream;
    type FetchArtifactStream = fetch::FetchStream;

    async fn fetch_artifact(
        &self,
        req: Request<airlock_proto::gateway::FetchArtifactRequest>,
    ) -> Result<Response<Self::FetchArtifactStream>, Status> {
        fetch::fetch_artifact(&self.state, req).await
    }

    async fn session(&self, req: Request<Streaming<ApplianceMessage>>) -> Result<Response<SessionStream>, Status> {
        let GatewayPeer { cert: peer, kill } = req
            .extensions()
            .get::<GatewayPeer>()
            .cloned()
            .ok_or_else(|| Status::unauthenticated("no verified client certificate"))?;
        kill.stream_opened();
        let state = self.state.clone();
        let now = state.now();
        let id = peer.identity.appliance;
        let scope = TenantScope::for_appliance(&peer.identity);
        // The handshake checked these, but the connection may have outlived them.
        if state.revoked.contains(&id) {
            return Err(refuse_stream(
                &state,
                &scope,
                "revoked",
                airlock_proto::stream_end::revoked(Kick::Revoked.message(id)),
            )
            .await);
        }
        if now >= peer.not_after {
            let status = Status::unauthenticated("certificate expired; reconnect with a renewed certificate");
            return Err(refuse_stream(&state, &scope, "certificate_expired", status).await);
        }
        match state.store.get_appliance(&scope, id).await {
            Ok(Some(row)) if row.revoked_at.is_some() => {
                let status = airlock_proto::stream_end::revoked(Kick::Revoked.message(id));
                return Err(refuse_stream(&state, &scope, "revoked", status).await);
            }
            // The certificate names a tenant and environment; the stored appliance must match
            // both, so a certificate can never act on another tenant's or environment's rows.
            Ok(Some(row)) if row.environment_id == peer.identity.environment => {
                match row.certificate_standing(&peer.serial) {
                    CertificateStanding::Superseded => {
                        let status = superseded();
                        return Err(refuse_stream(&state, &scope, "certificate_superseded", status).await);
                    }
                    // It holds its renewed certificate: the one it replaced is retired, whoever kept a copy.
                    CertificateStanding::Current { previous_live: true } => {
                        if let Err(e) = retire_previous(&state, &scope, id, &peer.serial).await {
                            tracing::error!(error = %e, "cannot retire a renewed appliance's previous certificate");
                            return Err(Status::unavailable("control plane store unavailable; retry"));
                        }
                    }
                    CertificateStanding::Current { previous_live: false } | CertificateStanding::Previous => {}
                }
            }
            Ok(_) => {
                let status = Status::permission_denied("unknown appliance for this certificate");
                return Err(refuse_stream(&state, &scope, "unknown_appliance", status).await);
            }
            Err(e) => {
                tracing::error!(error = %e, "store lookup failed");
                return Err(Status::unavailable("control plane store unavailable; retry"));
            }
        }

        let status = LiveStatus {
            connected_at: now,
            last_heartbeat: now,
            version: String::new(),
            healthy: true,
            cert_serial: peer.serial.clone(),
            cert_not_after: peer.not_after,
        };
        let (tx, rx) = mpsc::channel::<crate::registry::Queued>(REPLY_QUEUE);
        let (registration, mut kicked) = state.registry.join(id, status, tx.clone());
        // A revocation that landed between the check above and `join` found nothing to kick;
        // the revoked set is written before any kick, so checking it again closes the gap.
        if state.revoked.contains(&id) {
            state.registry.leave(registration);
            return Err(airlock_proto::stream_end::revoked(Kick::Revoked.message(id)));
        }
        state.metrics.appliances_connected.inc();
        let mut inbound = req.into_inner();
        let until_expiry = peer.not_after.since(now);
        let session = state.seen.session();

        tokio::spawn(async move {
            let expiry = tokio::time::sleep(until_expiry);
            let mut welcomed = false;
            tokio::pin!(expiry);
            let mut version = String::new();
            let mut reports = crate::deployments::ReportBudget::default();
            // Replies never wait on the peer: an appliance that stops reading must not stall
            // this task, which has to stay free to act on revocation and expiry.
            let ended = loop {
                tokio::select! {
                    kick = &mut kicked => {
                        let kick = kick.unwrap_or(Kick::Replaced);
                        let status = match kick {
                            Kick::ShuttingDown => Status::unavailable(kick.message(id)),
                            Kick::Revoked => airlock_proto::stream_end::revoked(kick.message(id)),
                            Kick::Replaced => Status::permission_denied(kick.message(id)),
                        };
                        let _ = tx.try_send(Err(status));
                        // A replaced stream may share its connection with its replacement.
                        break kick != Kick::Replaced;
                    }
                    _ = &mut expiry => {
                        let _ = tx.try_send(Err(Status::unauthenticated("certificate expired; reconnect with the renewed certificate")));
                        break true;
                    }
                    msg = inbound.message() => {
                        let msg = match msg {
                            Ok(Some(m)) => m,
                            Ok(None) | Err(_) => break false,
                        };
                        // The first Hello only: a peer repeating Hello must not make the
                        // store redo the Welcome-time push.
                        let hello = !welcomed && matches!(msg.body, Some(appliance_message::Body::Hello(_)));
                        welcomed |= hello;
                        let reply =
                            handle_message(&state, &registration, &peer, &scope, msg, &mut version, &mut reports).await;
                        let Some(reply) = reply else { continue };
                        match tx.try_send(Ok(Box::new(reply))) {
                            // After the Welcome: every operation still waiting for this
                            // appliance's result, re-sent on each (re)connect.
                            Ok(()) if hello => {
                                // The environment's policy first, so operations are decided
                                // under it.
                                // Boxed, like every path that may read the store: the state
                                // of a rarely taken await would otherwise enlarge every
                                // stream's task for its whole life.
                                Box::pin(state.push.at_welcome(&scope, id, peer.identity.environment)).await
                            }
                            // A push that found the queue full goes on now that the peer is
                            // active (memory only when none did).
                            Ok(()) => state.push.after_message(&scope, &registration, state.now()).await,
                            Err(mpsc::error::TrySendError::Closed(_)) => break false,
                            Err(mpsc::error::TrySendError::Full(_)) => {
                                tracing::warn!(appliance = %id, "appliance is not reading its stream; closing the connection");
                                break true;
                            }
                        }
                    }
                }
            };
            drop(tx);
            state.metrics.appliances_connected.dec();
            if let Some(last) = state.registry.leave(registration) {
                state.seen.record(SeenUpdate { scope, appliance: id, version: last.version, at: last.last_heartbeat });
            }
            drop(session);
            if ended {
                // Give the final status a moment to reach a well-behaved peer, then cut the socket.
                tokio::time::sleep(KILL_GRACE).await;
                kill.kill();
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx).map(|m| m.map(|m| *m)))))
    }
}

/// Audits a refused stream in the appliance's tenant chain and returns the status to send.
async fn refuse_stream(state: &AppState, scope: &TenantScope, reason: &str, status: Status) -> Status {
    let mut ev = event(scope.principal().actor(), AuditAction::GatewayStreamRefused, Outcome::Denied);
    ev.detail = serde_json::json!({ "reason": reason });
    state.audit_refusal(&scope.chain(), ev).await;
    status
}

async fn handle_message(
    state: &AppState,
    reg: &Registration,
    peer: &PeerCert,
    scope: &TenantScope,
    msg: ApplianceMessage,
    version: &mut String,
    reports: &mut crate::deployments::ReportBudget,
) -> Option<ControlMessage> {
    let now = state.now();
    let body = match msg.body? {
        appliance_message::Body::Hello(hello) => {
            // Off the network: keep the reported version short and printable.
            *version = hello.version.chars().filter(|c| !c.is_control()).take(64).collect();
            let healthy = reported_healthy(peer, hello.health.as_ref());
            let v = version.clone();
            state.registry.update(reg, |s| {
                s.version = v;
                s.healthy = healthy;
                s.last_heartbeat = now;
            });
            // Before the Welcome, so requests made once the appliance is connected name the
            // key it holds. A store failure leaves the stored one: requests naming a key the
            // appliance no longer holds are refused there, which fails closed.
            // Boxed: see the push after the Welcome.
            let attestation = &hello.execution_key_attestation_json;
            if let Err(e) =
                Box::pin(crate::appliances::hello_attestation(state, scope, &peer.identity, attestation)).await
            {
                tracing::error!(appliance = %peer.identity.appliance, error = %e, "cannot store the appliance's execution key attestation");
            }
            control_message::Body::Welcome(Welcome {
                appliance_id: peer.identity.appliance.to_string(),
                heartbeat_interval_seconds: u32::try_from(state.heartbeat_interval.as_secs()).unwrap_or(30),
            })
        }
        appliance_message::Body::Heartbeat(hb) => {
            state.metrics.heartbeats.inc();
            let healthy = reported_healthy(peer, hb.health.as_ref());
            state.registry.update(reg, |s| {
                s.last_heartbeat = now;
                s.healthy = healthy;
            });
            control_message::Body::HeartbeatAck(HeartbeatAck { seq: hb.seq })
        }
        // Boxed: see the push after the Welcome.
        appliance_message::Body::Renew(renew) => {
            Box::pin(renew::renew_certificate(state, reg, peer, scope, &renew.csr_pem, &renew.platform_proof_json))
                .await
        }
        appliance_message::Body::OperationResult(result) => {
            return Box::pin(crate::operations::handle_result(state, &peer.identity, scope, result)).await;
        }
        appliance_message::Body::OutputRelease(release) => {
            return Box::pin(crate::operations::handle_release(state, &peer.identity, scope, release)).await;
        }
        appliance_message::Body::DeploymentStatus(status) => {
            // Nothing to answer: the next report replaces this one, so a failure is only logged.
            if !reports.admit(std::time::Instant::now()) {
                tracing::debug!(appliance = %peer.identity.appliance, "deployment status over its rate; dropped");
                return None;
            }
            if let Err(e) = crate::deployments::handle_status(state, &peer.identity, scope, &status).await {
                tracing::error!(appliance = %peer.identity.appliance, error = %e, "cannot store a deployment status");
            }
            return None;
        }
    };
    Some(ControlMessage { body: Some(body) })
}

/// Whether an appliance reports itself healthy. A status this build does not know (or an
/// unspecified one) is not taken as healthy: it is shown as unhealthy, and logged.
fn reported_healthy(peer: &PeerCert, health: Option<&airlock_proto::gateway::Health>) -> bool {
    let Some(h) = health else { return true };
    match HealthStatus::try_from(h.status) {
        Ok(HealthStatus::Healthy) => true,
        Ok(HealthStatus::Degraded) => false,
        Ok(HealthStatus::Unspecified) | Err(_) => {
            tracing::warn!(appliance = %peer.identity.appliance, status = h.status, "unknown health status; showing the appliance as unhealthy");
            false
        }
    }
}
