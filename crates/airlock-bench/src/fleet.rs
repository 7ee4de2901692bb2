//! Simulated appliances: join over the HTTPS API, hold a gateway stream, heartbeat.
//!
//! Each appliance does what `airlock-appliance` does on the wire: its own key pair and CSR,
//! its own mutual-TLS 1.3 connection with its own certificate, one `Session` stream opened
//! with `Hello`. Nothing is written to disk.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use airlock_core::Fingerprint;
use airlock_proto::gateway::appliance_gateway_client::ApplianceGatewayClient;
use airlock_proto::gateway::{
    ApplianceMessage, ControlMessage, Health, HealthStatus, Heartbeat, Hello, appliance_message, control_message,
};
use airlock_proto::join::{JOIN_PATH, JoinRequest, JoinResponse};
use anyhow::{Context, anyhow, bail};
use hyper_util::rt::TokioIo;
use rcgen::{CertificateParams, KeyPair};
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::Channel;

use crate::unix_us;

/// Per-request timeout for the HTTPS API.
const HTTP_TIMEOUT: Duration = Duration::from_secs(60);
/// TCP connect + TLS handshake + HTTP/2 preface.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// From opening the stream to receiving `Welcome`.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(30);
/// HTTP/2 receive windows, the appliance's own (`airlock-appliance`'s `session.rs`): they bound
/// what an artifact fetch has in flight.
const ARTIFACT_STREAM_WINDOW: u32 = 4 * 1024 * 1024;
const ARTIFACT_CONNECTION_WINDOW: u32 = 8 * 1024 * 1024;
/// Keep at most this many distinct error messages per phase.
const MAX_ERROR_SAMPLES: usize = 10;

/// What the appliances of one process need to join.
pub struct EnrolCtx {
    pub api_url: String,
    pub pin: Fingerprint,
    pub admin_token: String,
    pub environment: String,
    /// Shared by all token requests (admin traffic, HTTP/2 multiplexed).
    pub admin: reqwest::Client,
    /// `Some`: all joins share this client. `None`: each appliance makes its own, as a real one does.
    pub shared_join_client: Option<reqwest::Client>,
}

impl EnrolCtx {
    pub fn new(
        api_url: &str,
        pin: Fingerprint,
        admin_token: &str,
        environment: &str,
        share_join_connection: bool,
    ) -> anyhow::Result<Self> {
        let admin = http_client(pin)?;
        let shared_join_client = if share_join_connection { Some(http_client(pin)?) } else { None };
        Ok(Self {
            api_url: api_url.trim_end_matches('/').to_owned(),
            pin,
            admin_token: admin_token.to_owned(),
            environment: environment.to_owned(),
            admin,
            shared_join_client,
        })
    }
}

/// A CA-pinned HTTPS client, as the CLI and the appliance build it.
pub fn http_client(pin: Fingerprint) -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .use_preconfigured_tls(airlock_proto::tls::pinned_client_config(pin))
        .timeout(HTTP_TIMEOUT)
        .build()
        .context("building HTTP client")
}

/// A joined appliance: its credentials and where to dial.
#[derive(Clone)]
pub struct Enrolled {
    cert: CertificateDer<'static>,
    key_pkcs8: Vec<u8>,
    roots: Arc<RootCertStore>,
    gateway_endpoint: String,
    gateway_server_name: String,
}

/// How far each appliance goes, to split the server's per-appliance memory by layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Hold {
    /// Mutual-TLS connection only; no HTTP/2 preface is sent.
    Tls,
    /// TLS + HTTP/2 connection (tonic channel), but no `Session` stream.
    H2,
    /// The real thing: a `Session` stream, `Hello` answered by `Welcome`.
    Session,
}

/// A connected appliance. Dropping it closes the stream and connection.
// Nearly every value is a `Session` (the other variants are for memory breakdowns), so boxing
// it would only add an allocation per appliance.
#[allow(clippy::large_enum_variant)]
pub enum Live {
    Session {
        // Held so the connection's request handle lives as long as the stream.
        _client: ApplianceGatewayClient<Channel>,
        /// The stream's connection, for other RPCs on it (e.g. `FetchArtifact`), as the appliance does.
        channel: Channel,
        tx: mpsc::Sender<ApplianceMessage>,
        inbound: Streaming<ControlMessage>,
    },
    H2 {
        _channel: Channel,
    },
    Tls {
        _stream: Box<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
    },
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct EnrolReport {
    pub ok: usize,
    pub failed: usize,
    pub start_unix_us: u64,
    pub end_unix_us: u64,
    /// Latency of each successful `POST …/join-tokens`, µs.
    pub token_us: Vec<u64>,
    /// Latency of each successful key generation + `POST /v1/join`, µs.
    pub join_us: Vec<u64>,
    pub errors: Vec<String>,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct ConnectReport {
    pub ok: usize,
    pub failed: usize,
    pub start_unix_us: u64,
    pub end_unix_us: u64,
    /// When each appliance received `Welcome`, µs since the Unix epoch (comparable across processes).
    pub welcome_unix_us: Vec<u64>,
    /// Dial + handshake + `Hello` → `Welcome`, per appliance, µs.
    pub latency_us: Vec<u64>,
    pub errors: Vec<String>,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct HeartbeatReport {
    pub acks: u64,
    /// Appliances whose stream failed during the window.
    pub failed: usize,
    /// Round trip of each acknowledged heartbeat is not kept; this is the sum, µs, for a mean.
    pub rtt_sum_us: u64,
    /// CPU seconds this bench process used during the window.
    pub bench_cpu_s: f64,
    pub errors: Vec<String>,
}

/// Keeps the first few distinct error messages.
#[derive(Default)]
struct ErrorSamples(Vec<String>);

impl ErrorSamples {
    fn add(&mut self, e: impl std::fmt::Display) {
        let text = format!("{e:#}");
        if self.0.len() < MAX_ERROR_SAMPLES && !self.0.contains(&text) {
            self.0.push(text);
        }
    }
}

/// Joins `count` appliances with at most `concurrency` in flight.
pub async fn enrol_many(ctx: Arc<EnrolCtx>, count: usize, concurrency: usize) -> (Vec<Enrolled>, EnrolReport) {
    let start_unix_us = unix_us();
    let sem = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut set = JoinSet::new();
    for _ in 0..count {
        let (ctx, sem) = (ctx.clone(), sem.clone());
        set.spawn(async move {
            let _permit = sem.acquire_owned().await.map_err(|_| anyhow!("semaphore closed"))?;
            enrol_one(&ctx).await
        });
    }
    let mut enrolled = Vec::with_capacity(count);
    let mut report = EnrolReport { start_unix_us, ..EnrolReport::default() };
    let mut errors = ErrorSamples::default();
    while let Some(res) = set.join_next().await {
        match res.map_err(anyhow::Error::from).and_then(|r| r) {
            Ok((e, token_us, join_us)) => {
                enrolled.push(e);
                report.token_us.push(token_us);
                report.join_us.push(join_us);
            }
            Err(e) => {
                report.failed += 1;
                errors.add(e);
            }
        }
    }
    report.ok = enrolled.len();
    report.end_unix_us = unix_us();
    report.errors = errors.0;
    (enrolled, report)
}

async fn enrol_one(ctx: &EnrolCtx) -> anyhow::Result<(Enrolled, u64, u64)> {
    let t = Instant::now();
    let created: serde_json::Value = check(
        ctx.admin
            .post(format!("{}/v1/environments/{}/join-tokens", ctx.api_url, ctx.environment))
            .bearer_auth(&ctx.admin_token)
            .json(&serde_json::json!({}))
            .send()
            .await
            .context("creating join token")?,
    )
    .await
    .context("creating join token")?;
    let token = created["token"].as_str().context("join token response has no token")?.to_owned();
    let token_us = micros(t.elapsed());

    let t = Instant::now();
    let key = KeyPair::generate().context("key generation")?;
    let csr_pem = CertificateParams::default().serialize_request(&key).and_then(|c| c.pem()).context("CSR")?;
    let body = JoinRequest {
        proof: airlock_proto::join::JoinProof::JoinToken(token),
        csr_pem,
        version: airlock_proto::VERSION.to_owned(),
        recover: None,
        environment: None,
        tenant: None,
    };
    let own_client;
    let client = match &ctx.shared_join_client {
        Some(c) => c,
        None => {
            own_client = http_client(ctx.pin)?;
            &own_client
        }
    };
    let resp = client.post(format!("{}{JOIN_PATH}", ctx.api_url)).json(&body).send().await.context("joining")?;
    let joined: JoinResponse = check(resp).await.context("joining")?;
    let join_us = micros(t.elapsed());

    let cert =
        CertificateDer::from_pem_slice(joined.certificate_pem.as_bytes()).context("join response certificate")?;
    let ca = CertificateDer::from_pem_slice(joined.ca_certificate_pem.as_bytes()).context("join response CA")?;
    if Fingerprint::of_der(ca.as_ref()) != ctx.pin {
        bail!("join response CA is not the pinned one");
    }
    let mut roots = RootCertStore::empty();
    roots.add(ca).context("join response CA")?;
    let enrolled = Enrolled {
        cert,
        key_pkcs8: key.serialize_der(),
        roots: Arc::new(roots),
        gateway_endpoint: joined.gateway_endpoint,
        gateway_server_name: joined.gateway_server_name,
    };
    Ok((enrolled, token_us, join_us))
}

/// Turns a non-2xx response into an error carrying the API's message.
async fn check<T: serde::de::DeserializeOwned>(resp: reqwest::Response) -> anyhow::Result<T> {
    let status = resp.status();
    let text = resp.text().await.context("reading response")?;
    if !status.is_success() {
        bail!("HTTP {}: {}", status.as_u16(), text.chars().take(300).collect::<String>());
    }
    serde_json::from_str(&text)
        .with_context(|| format!("unexpected response: {}", text.chars().take(200).collect::<String>()))
}

/// Connects every enrolled appliance with at most `concurrency` dials in flight.
pub async fn connect_many(enrolled: Vec<Enrolled>, concurrency: usize, hold: Hold) -> (Vec<Live>, ConnectReport) {
    let start_unix_us = unix_us();
    let sem = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut set = JoinSet::new();
    let count = enrolled.len();
    for e in enrolled {
        let sem = sem.clone();
        set.spawn(async move {
            let _permit = sem.acquire_owned().await.map_err(|_| anyhow!("semaphore closed"))?;
            let t = Instant::now();
            let live = connect_one(&e, hold).await?;
            Ok::<_, anyhow::Error>((live, unix_us(), micros(t.elapsed())))
        });
    }
    let mut lives = Vec::with_capacity(count);
    let mut report = ConnectReport { start_unix_us, ..ConnectReport::default() };
    let mut errors = ErrorSamples::default();
    while let Some(res) = set.join_next().await {
        match res.map_err(anyhow::Error::from).and_then(|r| r) {
            Ok((live, at, latency)) => {
                lives.push(live);
                report.welcome_unix_us.push(at);
                report.latency_us.push(latency);
            }
            Err(e) => {
                report.failed += 1;
                errors.add(e);
            }
        }
    }
    report.ok = lives.len();
    report.end_unix_us = unix_us();
    report.errors = errors.0;
    (lives, report)
}

async fn connect_one(e: &Enrolled, hold: Hold) -> anyhow::Result<Live> {
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(e.key_pkcs8.clone()));
    let tls = airlock_proto::tls::mtls_client_config(
        airlock_proto::tls::ServerTrust::Roots((*e.roots).clone()),
        vec![e.cert.clone()],
        key,
        &[b"h2"],
    )
    .context("client certificate")?;
    if hold == Hold::Tls {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, tls_only(&e.gateway_endpoint, &e.gateway_server_name, tls))
            .await
            .context("connect timed out")?
            .map_err(|err| anyhow!("connect: {}", describe(&err)))?;
        return Ok(Live::Tls { _stream: Box::new(stream) });
    }
    let channel = tokio::time::timeout(CONNECT_TIMEOUT, dial(&e.gateway_endpoint, &e.gateway_server_name, tls))
        .await
        .context("connect timed out")?
        .map_err(|err| anyhow!("connect: {}", describe(&err)))?;
    if hold == Hold::H2 {
        return Ok(Live::H2 { _channel: channel });
    }
    let mut client = ApplianceGatewayClient::new(channel.clone());
    let (tx, rx) = mpsc::channel::<ApplianceMessage>(8);
    let hello = ApplianceMessage {
        body: Some(appliance_message::Body::Hello(Hello {
            version: airlock_proto::VERSION.to_owned(),
            health: Some(healthy(0)),
            ..Default::default()
        })),
    };
    tx.try_send(hello).map_err(|_| anyhow!("cannot queue Hello"))?;
    let welcome = async {
        let mut inbound = client
            .session(ReceiverStream::new(rx))
            .await
            .map_err(|s| anyhow!("opening session: {}: {}", s.code(), s.message()))?
            .into_inner();
        match inbound.message().await {
            Ok(Some(ControlMessage { body: Some(control_message::Body::Welcome(_)) })) => Ok(inbound),
            Ok(Some(other)) => Err(anyhow!("expected Welcome, got {other:?}")),
            Ok(None) => Err(anyhow!("stream closed before Welcome")),
            Err(s) => Err(anyhow!("waiting for Welcome: {}: {}", s.code(), s.message())),
        }
    };
    let inbound = tokio::time::timeout(WELCOME_TIMEOUT, welcome).await.context("no Welcome in time")??;
    Ok(Live::Session { _client: client, channel, tx, inbound })
}

/// TCP + mutual TLS, nothing more.
async fn tls_only(
    endpoint: &str,
    server_name: &str,
    tls: rustls::ClientConfig,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let name = ServerName::try_from(server_name.to_owned()).map_err(std::io::Error::other)?;
    let tcp = tokio::net::TcpStream::connect(endpoint).await?;
    tcp.set_nodelay(true)?;
    tokio_rustls::TlsConnector::from(Arc::new(tls)).connect(name, tcp).await
}

/// Dials the gateway exactly as `airlock-appliance` does: our own connector, so TLS is
/// exactly `tls`; the URI only carries the authority to tonic.
async fn dial(
    endpoint: &str,
    server_name: &str,
    tls: rustls::ClientConfig,
) -> Result<Channel, tonic::transport::Error> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let name = ServerName::try_from(server_name.to_owned())
        .unwrap_or_else(|_| ServerName::try_from("invalid.invalid").expect("static name is valid"));
    let addr = endpoint.to_owned();
    tonic::transport::Endpoint::from_shared(format!("http://{endpoint}"))?
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(Duration::from_secs(60))
        .keep_alive_timeout(Duration::from_secs(20))
        .initial_stream_window_size(ARTIFACT_STREAM_WINDOW)
        .initial_connection_window_size(ARTIFACT_CONNECTION_WINDOW)
        .connect_with_connector(tower::service_fn(move |_| {
            let (connector, name, addr) = (connector.clone(), name.clone(), addr.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect(addr.as_str()).await?;
                tcp.set_nodelay(true)?;
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await
}

fn healthy(uptime_seconds: u64) -> Health {
    Health { status: HealthStatus::Healthy as i32, uptime_seconds }
}

/// Every appliance heartbeats in a closed loop (send, await the ack, repeat) until `deadline`.
/// Returns the appliances whose streams are still up, so they stay connected afterwards.
pub async fn heartbeat_many(lives: Vec<Live>, deadline: tokio::time::Instant) -> (Vec<Live>, HeartbeatReport) {
    let cpu_before = crate::procfs::self_cpu_seconds().unwrap_or(0.0);
    let acks = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let rtt_sum = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let mut set = JoinSet::new();
    for live in lives {
        let (acks, rtt_sum) = (acks.clone(), rtt_sum.clone());
        set.spawn(async move {
            let mut live = live;
            let res = heartbeat_loop(&mut live, deadline, &acks, &rtt_sum).await;
            (live, res)
        });
    }
    let mut kept = Vec::new();
    let mut errors = ErrorSamples::default();
    while let Some(res) = set.join_next().await {
        match res {
            Ok((live, Ok(()))) => kept.push(live),
            Ok((_, Err(e))) => {
                failed.fetch_add(1, Ordering::Relaxed);
                errors.add(e);
            }
            Err(e) => {
                failed.fetch_add(1, Ordering::Relaxed);
                errors.add(e);
            }
        }
    }
    let report = HeartbeatReport {
        acks: acks.load(Ordering::Relaxed),
        failed: failed.load(Ordering::Relaxed),
        rtt_sum_us: rtt_sum.load(Ordering::Relaxed),
        bench_cpu_s: crate::procfs::self_cpu_seconds().unwrap_or(0.0) - cpu_before,
        errors: errors.0,
    };
    (kept, report)
}

async fn heartbeat_loop(
    live: &mut Live,
    deadline: tokio::time::Instant,
    acks: &std::sync::atomic::AtomicU64,
    rtt_sum: &std::sync::atomic::AtomicU64,
) -> anyhow::Result<()> {
    let Live::Session { tx, inbound, .. } = live else { return Ok(()) };
    let mut seq = 0u64;
    while tokio::time::Instant::now() < deadline {
        seq += 1;
        let sent = Instant::now();
        let msg = ApplianceMessage {
            body: Some(appliance_message::Body::Heartbeat(Heartbeat { seq, health: Some(healthy(seq)) })),
        };
        if tokio::time::timeout_at(deadline, tx.send(msg)).await.is_err() {
            return Ok(());
        }
        // Bounded by the deadline; a stream that ends early is an error.
        loop {
            let msg = match tokio::time::timeout_at(deadline, inbound.message()).await {
                Err(_) => return Ok(()),
                Ok(Ok(Some(m))) => m,
                Ok(Ok(None)) => bail!("control plane closed the stream"),
                Ok(Err(s)) => bail!("stream error: {}: {}", s.code(), s.message()),
            };
            if let Some(control_message::Body::HeartbeatAck(ack)) = msg.body
                && ack.seq == seq
            {
                acks.fetch_add(1, Ordering::Relaxed);
                rtt_sum.fetch_add(micros(sent.elapsed()), Ordering::Relaxed);
                break;
            }
        }
    }
    Ok(())
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Flattens an error chain into one line.
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cur = s.source();
    }
    parts.join(": ")
}
