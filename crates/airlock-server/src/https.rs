//! Serves the axum router over TLS 1.3 (tokio-rustls and hyper), HTTP/1.1 and HTTP/2, with the same two-stage stop as the gateway.
//!
//! Every resource an anonymous peer can hold here is bounded ([`crate::net`]): a connection takes a slot from the API's pool (when it is full, the oldest idle one is evicted, failing that the one whose request has been in flight longest past [`crate::net::API_STALL_GRACE`], so stalled uploads cannot pin it; an evicted connection is cut at once), the TLS handshake has a deadline, a connection with no request in flight is closed after the idle timeout (the first request included), and reading and answering one request has a deadline too, past which the answer is 408.
//! HTTP/2 gets limits suited to an API: few concurrent streams, small windows, a 16 KiB header list; HTTP/1 headers past 16 KiB get 431.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::metrics::ConnectionMetrics;
use crate::net::{AcceptBackoff, ConnectionLimits, SlotPool};

const LISTENER: &str = "api";
/// Headers (HTTP/1 read buffer, HTTP/2 header list) larger than this are refused with 431.
pub(crate) const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Concurrent HTTP/2 streams per connection: an API client rarely needs more, and each holds a request's memory.
const H2_MAX_STREAMS: u32 = 16;
/// How long a connection being closed may take to finish what it is writing.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// What the API listener needs besides its socket.
pub(crate) struct Api {
    pub tls: rustls::ServerConfig,
    pub router: Router,
    pub pool: Arc<SlotPool>,
    pub limits: ConnectionLimits,
    pub counters: ConnectionMetrics,
}

pub(crate) async fn serve(
    listener: TcpListener,
    api: Api,
    mut stop_accepting: tokio::sync::watch::Receiver<bool>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let Api { tls, router, pool, limits, counters } = api;
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let mut backoff = AcceptBackoff::new();
    loop {
        let (tcp, addr) = tokio::select! {
            _ = stop_accepting.changed() => return,
            conn = crate::net::accept(&listener, &mut backoff, LISTENER) => conn,
        };
        let slot = match pool.acquire(addr.ip()) {
            Ok((slot, evicted)) => {
                if let Some(shed) = evicted {
                    counters.shed(LISTENER, shed);
                }
                Arc::new(slot)
            }
            Err(shed) => {
                counters.shed(LISTENER, shed);
                tracing::debug!(%addr, reason = shed.label(), "API connection refused");
                continue;
            }
        };
        // Without it, Nagle holds back HTTP/2's small WINDOW_UPDATE frames until the peer's
        // delayed ACK: a large upload crawled at one window per 40 ms (about 1.5 MiB/s).
        let _ = tcp.set_nodelay(true);
        let (acceptor, router, shutdown, counters) =
            (acceptor.clone(), router.clone(), shutdown.clone(), counters.clone());
        tokio::spawn(async move {
            let tls = tokio::select! {
                res = tokio::time::timeout(limits.tls_handshake_timeout, acceptor.accept(tcp)) => match res {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => return tracing::debug!(%addr, error = %e, "API TLS handshake failed"),
                    Err(_) => {
                        counters.closed(LISTENER, "handshake_timeout");
                        return tracing::debug!(%addr, "API TLS handshake timed out");
                    }
                },
                () = slot.evicted() => return,
            };
            serve_connection(tls, addr, router, slot, limits, counters, shutdown).await;
        });
    }
}

async fn serve_connection(
    tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    addr: std::net::SocketAddr,
    router: Router,
    slot: Arc<crate::net::Slot>,
    limits: ConnectionLimits,
    counters: ConnectionMetrics,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let request_slot = slot.clone();
    let request_counters = counters.clone();
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        // A request in flight keeps the connection from being idle until it is answered; it is evicted only once in flight past the stall grace, and only from a full pool.
        let busy = request_slot.busy();
        let (router, counters) = (router.clone(), request_counters.clone());
        async move {
            let _busy = busy;
            let mut req = req.map(axum::body::Body::new);
            // Authentication limits failures per source address and records a token's last use from it.
            req.extensions_mut().insert(crate::api::ClientAddr(addr.ip()));
            match tokio::time::timeout(limits.api_request_timeout, router.oneshot(req)).await {
                Ok(Ok(resp)) => Ok::<_, Infallible>(resp),
                Ok(Err(never)) => match never {},
                Err(_) => {
                    counters.closed(LISTENER, "request_timeout");
                    Ok(crate::api::request_timeout())
                }
            }
        }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // A client that trickles its headers must not hold a connection past the request deadline.
        .header_read_timeout(limits.api_request_timeout)
        .max_buf_size(MAX_HEADER_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(H2_MAX_STREAMS)
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .initial_stream_window_size(64 * 1024)
        .initial_connection_window_size(256 * 1024)
        .max_send_buf_size(64 * 1024)
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    let conn = builder.serve_connection(TokioIo::new(tls), service);
    tokio::pin!(conn);
    tokio::select! {
        res = conn.as_mut() => {
            if let Err(e) = res {
                tracing::debug!(%addr, error = %e, "API connection ended with error");
            }
            return;
        }
        _ = shutdown.changed() => {}
        () = slot.evicted() => {
            // Cut at once: its slot has gone to the newcomer, so the socket must not outlive it by a close grace.
            tracing::debug!(%addr, "idle or stalled API connection evicted for a newcomer");
            return;
        }
        () = crate::net::idle_expired(&slot, limits.api_idle_timeout) => {
            counters.closed(LISTENER, "idle_timeout");
            tracing::debug!(%addr, "API connection idle too long; closing");
        }
    }
    conn.as_mut().graceful_shutdown();
    // A peer that does not take part in a graceful close (HTTP/2 GOAWAY) is cut.
    let _ = tokio::time::timeout(CLOSE_GRACE, conn.as_mut()).await;
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use rustls::pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use crate::clock::SystemClock;
    use crate::keys::KekSource;

    #[tokio::test]
    async fn uploads_that_stall_cannot_pin_a_full_api_pool() {
        let dir = tempfile::tempdir().unwrap();
        let kek = KekSource::default_for(dir.path());
        crate::init(dir.path(), &kek, "airlock.test", "acme", "default", &SystemClock).await.unwrap();
        let mut cfg = crate::ServerConfig::new(dir.path().to_owned());
        cfg.api_listen = "127.0.0.1:0".parse().unwrap();
        cfg.gateway_listen = "127.0.0.1:0".parse().unwrap();
        cfg.hostnames = vec!["127.0.0.1".into()];
        cfg.limits = crate::net::ConnectionLimits { api_max_connections: 4, ..Default::default() };
        let server = crate::serve(cfg).await.unwrap();
        let connector =
            tokio_rustls::TlsConnector::from(Arc::new(airlock_proto::tls::pinned_client_config(server.ca_fingerprint)));
        let connect = || async {
            let tcp = tokio::net::TcpStream::connect(server.api_addr).await?;
            connector.connect(ServerName::try_from("127.0.0.1").unwrap(), tcp).await
        };

        // The whole pool: join uploads whose headers arrived and whose body stalls.
        let mut stalled = Vec::new();
        for _ in 0..4 {
            let mut conn = connect().await.unwrap();
            let head =
                "POST /v1/join HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{";
            conn.write_all(head.as_bytes()).await.unwrap();
            conn.flush().await.unwrap();
            stalled.push(conn);
        }
        tokio::time::sleep(crate::net::API_STALL_GRACE + Duration::from_millis(300)).await;

        // Past the grace, a real client gets in, well before the 30 s request deadline, by evicting the
        // longest stalled upload.
        let mut real = connect().await.expect("a full pool of stalled uploads locked the API out");
        real.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(3), real.read_to_end(&mut answer)).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let mut buf = [0u8; 256];
        // Cut at once, not after a close grace: its slot is already the newcomer's.
        let first = tokio::time::timeout(Duration::from_millis(300), stalled[0].read(&mut buf)).await;
        assert!(matches!(first, Ok(Ok(0) | Err(_))), "the longest stalled upload was evicted: {first:?}");
        server.shutdown().await;
    }
}
