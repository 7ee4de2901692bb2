//! Serves the axum router over TLS 1.3 (tokio-rustls and hyper), HTTP/1.1 and HTTP/2, with the same two-stage stop as the gateway.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

pub(crate) async fn serve(
    listener: TcpListener,
    tls: rustls::ServerConfig,
    router: Router,
    mut stop_accepting: tokio::sync::watch::Receiver<bool>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    loop {
        let (tcp, addr) = tokio::select! {
            _ = stop_accepting.changed() => return,
            res = listener.accept() => match res {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "API accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (acceptor, router, mut shutdown) = (acceptor.clone(), router.clone(), shutdown.clone());
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return tracing::debug!(%addr, error = %e, "API TLS handshake failed"),
                Err(_) => return tracing::debug!(%addr, "API TLS handshake timed out"),
            };
            let service = TowerToHyperService::new(router);
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            // A client that trickles its headers must not hold a connection forever.
            builder.http1().timer(TokioTimer::new()).header_read_timeout(Duration::from_secs(15));
            builder.http2().timer(TokioTimer::new()).keep_alive_interval(Duration::from_secs(60));
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
            tokio::pin!(conn);
            tokio::select! {
                res = conn.as_mut() => {
                    if let Err(e) = res {
                        tracing::debug!(%addr, error = %e, "API connection ended with error");
                    }
                }
                _ = shutdown.changed() => conn.as_mut().graceful_shutdown(),
            }
        });
    }
}
