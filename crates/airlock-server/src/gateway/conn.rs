//! A verified appliance connection: the TLS stream handed to tonic with what the handshake proved, and the switch that cuts it from the server side.
//!
//! Ending a gRPC stream relies on the peer reading its final status.
//! A peer that stops reading (or advertises a zero HTTP/2 window) would keep a revoked or expired connection open, so revocation and expiry also cut the socket.

use std::pin::Pin;
use std::sync::Arc;

use tonic::transport::server::Connected;

use crate::tls::PeerCert;

/// A verified appliance connection, handed to tonic with its peer facts.
pub struct GatewayConn {
    pub(super) io: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    pub(super) peer: GatewayPeer,
    /// The connection's place in the gateway's stream pool, freed when tonic drops the connection.
    pub(super) _slot: crate::net::Slot,
    /// Its place among its certificate's connections, freed likewise.
    pub(super) _hold: ApplianceHold,
}

/// Verified connections per certificate (appliance and serial), so one certificate cannot fill the stream pool (which
/// never evicts).
///
/// At its cap, a certificate's newest connection cuts its oldest rather than being refused: an
/// appliance that reconnects over a flaky network leaves dead connections behind, and must not be
/// locked out until keepalive notices them; a holder of the certificate displaces only its own (so a kept copy of a
/// certificate its appliance has since replaced cannot cut the appliance's connections).
/// One certificate: its appliance and serial.
pub(super) type CertKey = (airlock_core::ApplianceId, String);

/// One certificate's connections, oldest first: (place, switch).
type Held = std::collections::VecDeque<(u64, Arc<ConnKill>)>;

#[derive(Debug)]
pub struct PerAppliance {
    cap: usize,
    next: std::sync::atomic::AtomicU64,
    conns: std::sync::Mutex<std::collections::HashMap<CertKey, Held>>,
}

impl PerAppliance {
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(Self { cap: cap.max(1), next: Default::default(), conns: Default::default() })
    }

    /// A place for one more connection of certificate `id` (cut through `kill`); at the cap, its oldest
    /// connection is cut to make room. Returns whether one was.
    pub fn take(self: &Arc<Self>, id: CertKey, kill: Arc<ConnKill>) -> (ApplianceHold, bool) {
        let seq = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let oldest = {
            let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
            let mine = conns.entry(id.clone()).or_default();
            let oldest = if mine.len() >= self.cap { mine.pop_front() } else { None };
            mine.push_back((seq, kill));
            oldest
        };
        let displaced = oldest.map(|(_, kill)| kill.kill()).is_some();
        (ApplianceHold { pool: self.clone(), id, seq }, displaced)
    }
}

/// One connection's place among its appliance's, freed on drop.
#[derive(Debug)]
pub struct ApplianceHold {
    pool: Arc<PerAppliance>,
    id: CertKey,
    seq: u64,
}

impl Drop for ApplianceHold {
    fn drop(&mut self) {
        let mut conns = self.pool.conns.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(mine) = conns.get_mut(&self.id) {
            mine.retain(|(seq, _)| *seq != self.seq);
            if mine.is_empty() {
                conns.remove(&self.id);
            }
        }
    }
}

/// What a stream handler learns about its connection.
#[derive(Clone)]
pub struct GatewayPeer {
    pub cert: PeerCert,
    pub kill: Arc<ConnKill>,
}

/// Drops a connection from the server side. Ending a gRPC stream relies on the peer reading
/// the final status; a peer that stops reading (or advertises a zero HTTP/2 window) would
/// keep a revoked or expired connection open, so revocation and expiry also cut the socket.
#[derive(Debug, Default)]
pub struct ConnKill {
    killed: std::sync::atomic::AtomicBool,
    /// Whether the connection ever opened a gRPC stream; one that does not within a deadline is cut.
    stream_opened: std::sync::atomic::AtomicBool,
    waker: std::sync::Mutex<Option<std::task::Waker>>,
}

impl ConnKill {
    pub fn stream_opened(&self) {
        self.stream_opened.store(true, std::sync::atomic::Ordering::Release);
    }

    pub fn has_opened_a_stream(&self) -> bool {
        self.stream_opened.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn kill(&self) {
        self.killed.store(true, std::sync::atomic::Ordering::Release);
        if let Some(w) = self.waker.lock().unwrap_or_else(|e| e.into_inner()).take() {
            w.wake();
        }
    }

    fn check(&self, cx: &std::task::Context<'_>) -> std::io::Result<()> {
        if self.killed.load(std::sync::atomic::Ordering::Acquire) {
            return Err(std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "closed by the control plane"));
        }
        let mut slot = self.waker.lock().unwrap_or_else(|e| e.into_inner());
        if !slot.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            *slot = Some(cx.waker().clone());
        }
        Ok(())
    }
}

impl Connected for GatewayConn {
    type ConnectInfo = GatewayPeer;
    fn connect_info(&self) -> GatewayPeer {
        self.peer.clone()
    }
}

impl tokio::io::AsyncRead for GatewayConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        // hyper always has a read pending on an idle connection, so registering here is
        // enough for a kill to wake it.
        if let Err(e) = self.peer.kill.check(cx) {
            return std::task::Poll::Ready(Err(e));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for GatewayConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self.peer.kill.killed.load(std::sync::atomic::Ordering::Acquire) {
            return std::task::Poll::Ready(Err(std::io::ErrorKind::ConnectionAborted.into()));
        }
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
