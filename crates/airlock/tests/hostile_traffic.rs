//! The control plane under hostile traffic, on loopback with real sockets: a real `airlock server` at a soft
//! open-file limit of 1,024 is held by idle TLS connections, stalled uploads (HTTP/1 and HTTP/2), slowloris
//! headers and a bare TCP flood on the gateway, while real API calls are made and a real appliance reconnects;
//! that load, from one address, is not reported as shedding, and a second address that fills the pool is.
// Test helpers panic to report failure.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use airlock_testkit::e2e::{Server, ca_pem, gateway_verdict};
use airlock_testkit::process::{count_tcp_sockets, wait_for};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_airlock");

const IDLE_TIMEOUT: Duration = Duration::from_secs(3);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(4);
/// What a deadline may overrun by on a loaded two-core machine before it counts as missed.
const SLACK: Duration = Duration::from_secs(3);

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS 1.3 client trusting only the control plane's CA, offering `alpn`.
fn client_config(ca: &str, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca.as_bytes()).unwrap()).unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

async fn tls_connect(addr: SocketAddr, cfg: Arc<rustls::ClientConfig>) -> std::io::Result<Tls> {
    tls_connect_from(None, addr, cfg).await
}

/// As [`tls_connect`], from `source` (another loopback address, to act as another peer) if given.
async fn tls_connect_from(
    source: Option<std::net::IpAddr>,
    addr: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
) -> std::io::Result<Tls> {
    let tcp = match source {
        None => TcpStream::connect(addr).await?,
        Some(ip) => {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(ip, 0))?;
            socket.connect(addr).await?
        }
    };
    let name = ServerName::try_from("127.0.0.1").unwrap();
    tokio_rustls::TlsConnector::from(cfg).connect(name, tcp).await
}

/// Reads until the peer closes the connection or `within` passes; returns what was read and whether it closed.
async fn read_until_closed<S: tokio::io::AsyncRead + Unpin>(s: &mut S, within: Duration) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (out, true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (out, false),
        }
    }
}

fn addr_of(url: &str) -> SocketAddr {
    url.trim_start_matches("https://").parse().unwrap()
}

fn http_client(ca: &str, h2: bool) -> reqwest::Client {
    let alpn: &[&[u8]] = if h2 { &[b"h2"] } else { &[b"http/1.1"] };
    let b = reqwest::Client::builder().use_preconfigured_tls((*client_config(ca, alpn)).clone());
    let b = if h2 { b.http2_prior_knowledge() } else { b.http1_only() };
    b.timeout(Duration::from_secs(10)).build().unwrap()
}

/// Holds `target` idle TLS connections to the API open, re-opening those the server closes, until `stop`.
async fn idle_flood(
    api: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
    target: usize,
    stop: Arc<AtomicBool>,
    opened: Arc<AtomicUsize>,
) {
    idle_flood_from(None, api, cfg, target, stop, opened).await
}

/// As [`idle_flood`], from `source` if given.
async fn idle_flood_from(
    source: Option<std::net::IpAddr>,
    api: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
    target: usize,
    stop: Arc<AtomicBool>,
    opened: Arc<AtomicUsize>,
) {
    let live = Arc::new(AtomicUsize::new(0));
    while !stop.load(Ordering::Relaxed) {
        if live.load(Ordering::Relaxed) >= target {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        let Ok(mut tls) = tls_connect_from(source, api, cfg.clone()).await else { continue };
        opened.fetch_add(1, Ordering::Relaxed);
        live.fetch_add(1, Ordering::Relaxed);
        let (live, stop) = (live.clone(), stop.clone());
        tokio::spawn(async move {
            let mut buf = [0u8; 64];
            while !stop.load(Ordering::Relaxed) {
                match tokio::time::timeout(Duration::from_millis(200), tls.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => break,
                    _ => {}
                }
            }
            live.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// Bare TCP connects to the gateway, topped up every 20 ms (each held 3 s), until `stop`.
async fn tcp_flood(gateway: SocketAddr, stop: Arc<AtomicBool>, connects: Arc<AtomicUsize>) {
    let mut held: std::collections::VecDeque<(Instant, TcpStream)> = Default::default();
    while !stop.load(Ordering::Relaxed) {
        for _ in 0..10 {
            if let Ok(s) = TcpStream::connect(gateway).await {
                connects.fetch_add(1, Ordering::Relaxed);
                held.push_back((Instant::now(), s));
            }
        }
        while held.front().is_some_and(|(t, _)| t.elapsed() > Duration::from_secs(3)) {
            held.pop_front();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An HTTP/1 upload that stalls after 100 of its 8,000 declared bytes; returns the time to the server's answer or close, and the status line.
async fn stalled_h1_upload(api: SocketAddr, cfg: Arc<rustls::ClientConfig>) -> (Duration, String) {
    let mut tls = tls_connect(api, cfg).await.unwrap();
    let head =
        "POST /v1/join HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: 8000\r\n\r\n";
    tls.write_all(head.as_bytes()).await.unwrap();
    tls.write_all(&[b' '; 100]).await.unwrap();
    let started = Instant::now();
    let (got, closed) = read_until_closed(&mut tls, REQUEST_TIMEOUT + SLACK + SLACK).await;
    let line = String::from_utf8_lossy(&got).lines().next().unwrap_or_default().to_owned();
    assert!(closed || !got.is_empty(), "a stalled HTTP/1 upload got neither an answer nor a close");
    (started.elapsed(), line)
}

/// An HTTP/2 upload that stalls after 100 of its 8,000 declared bytes (frames written by hand); returns the time
/// until the server answers the stream (a HEADERS frame on stream 1) or closes the connection.
async fn stalled_h2_upload(api: SocketAddr, cfg: Arc<rustls::ClientConfig>) -> Duration {
    let mut tls = tls_connect(api, cfg).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]); // empty SETTINGS
    // HPACK: :method POST (2+1 = static 3), :scheme https (7), then literals without indexing.
    let mut block = vec![0x83, 0x87];
    for (index, value) in [(4u8, "/v1/join"), (1, "127.0.0.1")] {
        block.push(index);
        block.push(value.len() as u8);
        block.extend_from_slice(value.as_bytes());
    }
    for (name, value) in [("content-type", "application/json"), ("content-length", "8000")] {
        block.push(0);
        block.push(name.len() as u8);
        block.extend_from_slice(name.as_bytes());
        block.push(value.len() as u8);
        block.extend_from_slice(value.as_bytes());
    }
    let frame = |out: &mut Vec<u8>, kind: u8, flags: u8, payload: &[u8]| {
        let len = payload.len() as u32;
        out.extend_from_slice(&len.to_be_bytes()[1..]);
        out.extend_from_slice(&[kind, flags, 0, 0, 0, 1]);
        out.extend_from_slice(payload);
    };
    frame(&mut out, 1, 0x4, &block); // HEADERS, END_HEADERS
    frame(&mut out, 0, 0, &[b' '; 100]); // DATA, not the end
    tls.write_all(&out).await.unwrap();
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT + SLACK + SLACK;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        // Frames: 3 bytes length, type, flags, 4 bytes stream id.
        let mut at = 0;
        while got.len() >= at + 9 {
            let len = usize::from(got[at]) << 16 | usize::from(got[at + 1]) << 8 | usize::from(got[at + 2]);
            let (kind, stream) =
                (got[at + 3], u32::from_be_bytes(got[at + 5..at + 9].try_into().unwrap()) & 0x7fff_ffff);
            if stream == 1 && (kind == 1 || kind == 3) || kind == 7 {
                return started.elapsed();
            }
            at += 9 + len;
        }
        match tokio::time::timeout_at(deadline, tls.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("a stalled HTTP/2 upload got no answer within {:?}", REQUEST_TIMEOUT + SLACK + SLACK),
        }
    }
}

/// Headers trickled a byte every 300 ms; returns the time until the server closes the connection.
async fn slowloris(api: SocketAddr, cfg: Arc<rustls::ClientConfig>) -> Duration {
    let mut tls = tls_connect(api, cfg).await.unwrap();
    tls.write_all(b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\nx-slow: ").await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 256];
    while started.elapsed() < REQUEST_TIMEOUT + SLACK + SLACK {
        if tls.write_all(b"a").await.is_err() {
            return started.elapsed();
        }
        if let Ok(Ok(0) | Err(_)) = tokio::time::timeout(Duration::from_millis(300), tls.read(&mut buf)).await {
            return started.elapsed();
        }
    }
    panic!("a slowloris connection was held past its deadline");
}

fn metric(text: &str, prefix: &str) -> f64 {
    text.lines().filter(|l| l.starts_with(prefix)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

#[test]
fn the_control_plane_serves_real_clients_while_hostile_peers_hold_what_they_can() {
    let deadlines = [
        "--api-idle-timeout",
        "3s",
        "--api-request-timeout",
        "4s",
        "--gateway-hello-timeout",
        "1s",
        "--tls-handshake-timeout",
        "2s",
    ];
    let mut server = Server::start_with_nofile(BIN, &deadlines, 1024);
    let pid = server.proc.as_ref().unwrap().pid();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let open_files = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
    assert!(open_files.split_whitespace().nth(3) == Some("1024"), "{open_files}");

    let state = server.dir.path().join("apl");
    let (appliance, _id) = server.joined_appliance(&state);
    let ca = ca_pem(&state);
    let (api, gateway) = (addr_of(&server.url), server.gateway.parse::<SocketAddr>().unwrap());
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (h1, h2) = (client_config(&ca, &[b"http/1.1"]), client_config(&ca, &[b"h2"]));

    // Bad input, one at a time: a body past the join route's limit is 413 over both protocols, headers past
    // 16 KiB are 431, /metrics wants a token, and the gateway refuses TLS 1.2 and certificate-less clients.
    rt.block_on(async {
        for h2 in [false, true] {
            let client = http_client(&ca, h2);
            let resp = client
                .post(format!("{}/v1/join", server.url))
                .header("content-type", "application/json")
                .body(vec![b' '; 17 * 1024])
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 413, "h2 {h2}");
            let body: serde_json::Value = resp.json().await.unwrap();
            assert_eq!(body["error"]["code"], "payload_too_large");
            // Other routes read bodies up to about 2 MiB (this one is refused for what it says, not for its size).
            let resp = client
                .post(format!("{}/v1/workspaces/{}/environments", server.url, server.workspace))
                .bearer_auth(&server.token)
                .header("content-type", "application/json")
                .body(format!("{{\"name\": \"{}\"}}", "a".repeat(512 * 1024)))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 400, "h2 {h2}");
            let resp = client.get(format!("{}/metrics", server.url)).send().await.unwrap();
            assert_eq!(resp.status(), 401, "h2 {h2}");
            let resp = client.get(format!("{}/metrics", server.url)).bearer_auth(&server.token).send().await.unwrap();
            assert_eq!(resp.status(), 200, "h2 {h2}");
        }
        let resp = http_client(&ca, false)
            .get(format!("{}/healthz", server.url))
            .header("x-big", "a".repeat(20 * 1024))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 431);

        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(ca.as_bytes()).unwrap()).unwrap();
        let tls12 = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let refused = gateway_verdict(gateway, Arc::new(tls12)).await.unwrap_err();
        assert!(refused.contains("ProtocolVersion") || refused.contains("protocol"), "{refused}");
        let refused = gateway_verdict(gateway, client_config(&ca, &[b"h2"])).await.unwrap_err();
        assert!(refused.to_lowercase().contains("certificate"), "{refused}");

        // A bare TCP connection to the gateway that never sends its ClientHello is closed at the 1 s deadline.
        let mut bare = TcpStream::connect(gateway).await.unwrap();
        let started = Instant::now();
        let (_, closed) = read_until_closed(&mut bare, Duration::from_secs(1) + SLACK).await;
        assert!(closed, "a silent gateway connection was held past its ClientHello deadline");
        assert!(started.elapsed() >= Duration::from_millis(900), "closed early: {:?}", started.elapsed());
        let client = http_client(&ca, false);
        let metrics = client.get(format!("{}/metrics", server.url)).bearer_auth(&server.token).send().await.unwrap();
        let metrics = metrics.text().await.unwrap();
        assert!(
            metrics.contains("airlock_closed_connections_total{listener=\"gateway\",reason=\"hello_timeout\"} 1"),
            "{metrics}"
        );
    });

    // The hostile load, held from here on.
    let stop = Arc::new(AtomicBool::new(false));
    let (opened, connects) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    rt.spawn(idle_flood(api, h1.clone(), 1000, stop.clone(), opened.clone()));
    rt.spawn(tcp_flood(gateway, stop.clone(), connects.clone()));
    let uploads: Vec<_> = (0..40).map(|_| rt.spawn(stalled_h1_upload(api, h1.clone()))).collect();
    let h2_uploads: Vec<_> = (0..10).map(|_| rt.spawn(stalled_h2_upload(api, h2.clone()))).collect();
    let loris: Vec<_> = (0..20).map(|_| rt.spawn(slowloris(api, h1.clone()))).collect();
    wait_for(Duration::from_secs(30), "1,000 idle TLS connections opened", || {
        (opened.load(Ordering::Relaxed) >= 1000).then_some(())
    });

    // Real API calls get through, each well within 5 s.
    for _ in 0..5 {
        let started = Instant::now();
        let out = server.cli(&["appliance", "list", "--json"]);
        assert!(out.status.success(), "an API call failed under load: {}", String::from_utf8_lossy(&out.stderr));
        assert!(started.elapsed() < Duration::from_secs(5), "an API call took {:?}", started.elapsed());
    }
    // A real appliance restarts and reconnects through the gateway flood.
    drop(appliance);
    let started = Instant::now();
    let mut again = server.appliance_proc(&state, None, None);
    server.wait_connected(&mut again);
    assert!(started.elapsed() < Duration::from_secs(15), "reconnecting took {:?}", started.elapsed());

    // All of that load came from one address (127.0.0.1), which only displaced its own connections: /metrics
    // counts it on both listeners, but /readyz stays 200, since one peer must not hold it at 503.
    let ready_and_metrics = || {
        rt.block_on(async {
            let client = http_client(&ca, false);
            let ready = client.get(format!("{}/readyz", server.url)).send().await.unwrap();
            let ready = (ready.status(), ready.json::<serde_json::Value>().await.unwrap());
            let metrics =
                client.get(format!("{}/metrics", server.url)).bearer_auth(&server.token).send().await.unwrap();
            (ready, metrics.text().await.unwrap())
        })
    };
    let (ready, metrics) = ready_and_metrics();
    assert_eq!(ready.0, 200, "{}", ready.1);
    assert!(
        metric(&metrics, "airlock_shed_connections_total{listener=\"api\",reason=\"address_evicted\"") >= 1.0,
        "{metrics}"
    );
    let gateway_shed = metric(&metrics, "airlock_shed_connections_total{listener=\"gateway\"")
        + metric(&metrics, "airlock_closed_connections_total{listener=\"gateway\",reason=\"hello_timeout\"");
    assert!(gateway_shed >= 1.0, "{metrics}");
    let sockets = count_tcp_sockets(pid);
    assert!(sockets < 1000, "the server holds {sockets} sockets at a limit of 1,024");

    // Every stalled upload and slowloris connection was answered or closed within its deadline.
    rt.block_on(async {
        for u in uploads {
            let (took, line) = u.await.unwrap();
            assert!(took <= REQUEST_TIMEOUT + SLACK, "a stalled HTTP/1 upload held {took:?} ({line})");
            assert!(line.is_empty() || line.contains("408"), "{line}");
        }
        for u in h2_uploads {
            let took = u.await.unwrap();
            assert!(took <= REQUEST_TIMEOUT + SLACK, "a stalled HTTP/2 upload held {took:?}");
        }
        for l in loris {
            let took = l.await.unwrap();
            assert!(took <= REQUEST_TIMEOUT + SLACK, "a slowloris connection held {took:?}");
        }
    });
    // A second address fills what the first left of the API's pool (298 at this file limit): the pool is
    // genuinely full now, newcomers evict across addresses, and /readyz says it is shedding.
    let opened_elsewhere = Arc::new(AtomicUsize::new(0));
    let other = Some(std::net::IpAddr::from([127, 0, 0, 2]));
    rt.spawn(idle_flood_from(other, api, h1.clone(), 200, stop.clone(), opened_elsewhere.clone()));
    wait_for(Duration::from_secs(30), "200 idle TLS connections from a second address", || {
        (opened_elsewhere.load(Ordering::Relaxed) >= 200).then_some(())
    });
    let (ready, full) = ready_and_metrics();
    assert_eq!(ready.0, 503, "{}", ready.1);
    assert_eq!(ready.1["error"]["code"], "shedding");
    assert!(metric(&full, "airlock_shed_connections_total{listener=\"api\",reason=\"evicted\"") >= 1.0, "{full}");
    stop.store(true, Ordering::Relaxed);
    assert!(
        metrics.contains("airlock_closed_connections_total{listener=\"api\",reason=\"request_timeout\"}") || {
            let m = rt.block_on(async {
                let client = http_client(&ca, false);
                client
                    .get(format!("{}/metrics", server.url))
                    .bearer_auth(&server.token)
                    .send()
                    .await
                    .unwrap()
                    .text()
                    .await
                    .unwrap()
            });
            m.contains("airlock_closed_connections_total{listener=\"api\",reason=\"request_timeout\"}")
        }
    );

    // An idle connection, alone, is closed at its idle deadline (none of its own kind to evict it early).
    rt.block_on(async {
        tokio::time::sleep(IDLE_TIMEOUT + SLACK).await;
        let mut idle = tls_connect(api, h1.clone()).await.unwrap();
        let started = Instant::now();
        let (_, closed) = read_until_closed(&mut idle, IDLE_TIMEOUT + SLACK).await;
        assert!(closed, "an idle connection was held past {:?}", IDLE_TIMEOUT + SLACK);
        assert!(
            started.elapsed() >= IDLE_TIMEOUT - Duration::from_millis(500),
            "closed early: {:?}",
            started.elapsed()
        );
    });
    assert!(!server.log().contains("accept failed"), "{}", server.log());
    drop(again);
    server.stop();
}
