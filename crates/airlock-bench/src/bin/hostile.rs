//! The control plane under hostile load: a real `airlock server` at a soft (and hard) limit of 1,024 open files,
//! held by idle TLS connections, stalled uploads and a bare TCP flood on the gateway, while real API calls are made
//! and real appliances (simulated on the wire, as in the fleet benchmark) reconnect.
//!
//! Reports the success rate and p50/p99 latency of the API calls and of the reconnects (`Hello` answered by
//! `Welcome`), the server's peak RSS against its idle RSS, and what the server shed.
//!
//! `cargo build --release -p airlock && cargo run --release -p airlock-bench --bin hostile`
//!
//! Everything is on loopback; the load runs for a bounded time (the measurements, plus `--ramp`).
#![allow(clippy::print_stdout)] // A benchmark reports on stdout.

use airlock_bench::{fleet, procfs, server};

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use airlock_core::Fingerprint;
use anyhow::{Context, bail};
use clap::Parser;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Parser, Debug)]
#[command(name = "hostile", about = "Real API calls and appliance reconnects while hostile peers hold what they can.")]
struct Args {
    /// Idle TLS connections held open against the API (re-opened when the server closes them).
    #[arg(long, default_value_t = 2000)]
    idle: usize,
    /// HTTP/1 uploads to `POST /v1/join` that stall before their last bytes (re-opened when answered).
    #[arg(long, default_value_t = 200)]
    stalled: usize,
    /// Bare TCP connects per second to the gateway, each held until the server closes it.
    #[arg(long, default_value_t = 500)]
    tcp_per_second: usize,
    /// Real API calls (`GET /v1/appliances`, each on a new connection).
    #[arg(long, default_value_t = 100)]
    calls: usize,
    /// Appliance reconnects (mutual TLS, `Hello`, `Welcome`).
    #[arg(long, default_value_t = 100)]
    reconnects: usize,
    /// The server's open-file limit, soft and hard.
    #[arg(long, default_value_t = 1024)]
    server_nofile: u64,
    /// Seconds of hostile load before measuring.
    #[arg(long, default_value_t = 5)]
    ramp: u64,
    /// The `airlock` binary [default: beside this one].
    #[arg(long)]
    airlock_bin: Option<PathBuf>,
}

/// What counts as a success: an answer within this.
const GOAL: Duration = Duration::from_secs(5);

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    raise_own_nofile()?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(run(args))
}

/// This process holds every hostile connection; raise its soft limit to the hard one.
fn raise_own_nofile() -> anyhow::Result<()> {
    let status = Command::new("prlimit")
        .args(["--pid", &std::process::id().to_string(), "--nofile=20000:20000"])
        .status()
        .context("running prlimit")?;
    if !status.success() {
        eprintln!("could not raise this process's open-file limit to 20,000; the load may be smaller than asked");
    }
    Ok(())
}

async fn run(args: Args) -> anyhow::Result<()> {
    let bin = match &args.airlock_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.parent().context("binary has no directory")?.join("airlock"),
    };
    anyhow::ensure!(bin.is_file(), "{} not found; `cargo build --release -p airlock` first", bin.display());
    let dir = tempfile::tempdir()?;
    let data_dir = dir.path().join("data");
    let init = server::init(&bin, &data_dir)?;
    let ready_file = dir.path().join("ready.json");
    let log_file = dir.path().join("server.log");
    let mut child = Command::new("prlimit")
        .arg(format!("--nofile={0}:{0}", args.server_nofile))
        .arg("--")
        .arg(&bin)
        .args(["server", "--data-dir"])
        .arg(&data_dir)
        .args(["--listen", "127.0.0.1:0", "--gateway-listen", "127.0.0.1:0", "--hostname", "127.0.0.1"])
        .args(["--heartbeat-interval", "3600s", "--ready-file"])
        .arg(&ready_file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_file)?)
        .spawn()
        .context("starting the server under prlimit")?;
    let result = measure(&args, &init, &ready_file, &mut child).await;
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let _ = child.wait();
    if result.is_err() {
        eprintln!("server log: {}", log_file.display());
        let _ = dir.keep();
    }
    result
}

async fn measure(
    args: &Args,
    init: &server::InitOutput,
    ready_file: &std::path::Path,
    child: &mut std::process::Child,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let ready: server::Ready = loop {
        if let Some(status) = child.try_wait()? {
            bail!("the server exited during startup: {status}");
        }
        if let Some(r) = std::fs::read(ready_file).ok().and_then(|b| serde_json::from_slice(&b).ok()) {
            break r;
        }
        anyhow::ensure!(started.elapsed() < Duration::from_secs(30), "the server did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let pid = ready.pid;
    let pin: Fingerprint = ready.ca_fingerprint.parse()?;
    let api_url = ready.api_url.trim_end_matches('/').to_owned();
    let api: SocketAddr = api_url.trim_start_matches("https://").parse()?;
    let gateway: SocketAddr = ready.gateway_endpoint.parse()?;
    let http = fleet::http_client(pin)?;
    let ca: serde_json::Value = http.get(format!("{api_url}/v1/ca")).send().await?.json().await?;
    let ca_pem = ca["certificate_pem"].as_str().context("no CA in /v1/ca")?.to_owned();
    let env: serde_json::Value = http
        .post(format!("{api_url}/v1/workspaces/{}/environments", init.workspace))
        .bearer_auth(&init.admin_token)
        .json(&serde_json::json!({ "name": "hostile" }))
        .send()
        .await?
        .json()
        .await?;
    let environment = env["id"].as_str().context("environment response has no id")?.to_owned();
    let ctx = Arc::new(fleet::EnrolCtx::new(&api_url, pin, &init.admin_token, &environment, true)?);
    let (enrolled, report) = fleet::enrol_many(ctx, args.reconnects, 8).await;
    anyhow::ensure!(report.failed == 0, "joining failed: {:?}", report.errors);
    // Every appliance connects once before the attack, as a fleet would be connected.
    let (lives, baseline) = fleet::connect_many(enrolled.clone(), 8, fleet::Hold::Session).await;
    anyhow::ensure!(baseline.failed == 0, "connecting failed: {:?}", baseline.errors);
    drop(lives);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_rss = procfs::status_kib(pid, "VmRSS")?;
    println!("server pid {pid} at an open-file limit of {}; idle RSS {idle_rss} KiB", args.server_nofile);

    let stop = Arc::new(AtomicBool::new(false));
    let tls = client_config(&ca_pem);
    let counts = Arc::new(Counts::default());
    let mut load = Vec::new();
    for _ in 0..args.idle.div_ceil(500) {
        let share = args.idle.min(500);
        load.push(tokio::spawn(idle_flood(api, tls.clone(), share, stop.clone(), counts.clone())));
    }
    load.push(tokio::spawn(stalled_uploads(api, tls.clone(), args.stalled, stop.clone(), counts.clone())));
    load.push(tokio::spawn(tcp_flood(gateway, args.tcp_per_second, stop.clone(), counts.clone())));
    let fd_peak = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (stop, fd_peak) = (stop.clone(), fd_peak.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(n) = procfs::open_fds(pid) {
                    fd_peak.fetch_max(n, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(args.ramp)).await;
    println!(
        "under load: {} idle TLS connections held, {} stalled uploads in flight, {} bare TCP connects so far",
        counts.idle_live.load(Ordering::Relaxed),
        counts.stalled_live.load(Ordering::Relaxed),
        counts.tcp_connects.load(Ordering::Relaxed)
    );

    // Real API calls, each on a new connection (the harder case: it needs a slot and a handshake).
    let mut call_ms = Vec::new();
    let mut call_ok = 0;
    let mut call_errors = Vec::new();
    for _ in 0..args.calls {
        let client = fleet::http_client(pin)?;
        let t = Instant::now();
        let res = tokio::time::timeout(
            GOAL,
            client.get(format!("{api_url}/v1/appliances")).bearer_auth(&init.admin_token).send(),
        )
        .await;
        let took = t.elapsed();
        match res {
            Ok(Ok(r)) if r.status().is_success() => call_ok += 1,
            Ok(Ok(r)) => call_errors.push(format!("HTTP {}", r.status())),
            Ok(Err(e)) => call_errors.push(e.to_string()),
            Err(_) => call_errors.push("no answer within 5 s".into()),
        }
        call_ms.push(took.as_secs_f64() * 1000.0);
    }
    // Appliance reconnects, four at a time.
    let (lives, reconnects) = fleet::connect_many(enrolled, 4, fleet::Hold::Session).await;
    drop(lives);
    let mut reconnect_ms: Vec<f64> = reconnects.latency_us.iter().map(|us| *us as f64 / 1000.0).collect();
    let reconnect_ok = reconnect_ms.iter().filter(|ms| **ms <= GOAL.as_secs_f64() * 1000.0).count();

    let ready = http.get(format!("{api_url}/readyz")).send().await?;
    let ready_status = ready.status().as_u16();
    let metrics = http.get(format!("{api_url}/metrics")).bearer_auth(&init.admin_token).send().await?.text().await?;
    let peak_rss = procfs::status_kib(pid, "VmHWM")?;
    stop.store(true, Ordering::Relaxed);
    for task in load {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    let _ = sampler.await;

    println!(
        "API calls:          {call_ok}/{} within 5 s; p50 {:.1} ms, p99 {:.1} ms{}",
        args.calls,
        percentile(&mut call_ms, 50.0),
        percentile(&mut call_ms, 99.0),
        errors(&call_errors)
    );
    println!(
        "appliance reconnects: {reconnect_ok}/{} within 5 s; p50 {:.1} ms, p99 {:.1} ms{}",
        args.reconnects,
        percentile(&mut reconnect_ms, 50.0),
        percentile(&mut reconnect_ms, 99.0),
        errors(&reconnects.errors)
    );
    println!(
        "server RSS: idle {idle_rss} KiB, peak {peak_rss} KiB ({:.1}x); open files peak {} of {}",
        peak_rss as f64 / idle_rss.max(1) as f64,
        fd_peak.load(Ordering::Relaxed),
        args.server_nofile
    );
    println!(
        "load offered: {} idle TLS connections opened, {} stalled uploads started ({} answered 408), {} bare TCP connects",
        counts.idle_opened.load(Ordering::Relaxed),
        counts.stalled_started.load(Ordering::Relaxed),
        counts.stalled_408.load(Ordering::Relaxed),
        counts.tcp_connects.load(Ordering::Relaxed)
    );
    println!("/readyz under load: {ready_status}");
    for line in metrics.lines().filter(|l| {
        l.starts_with("airlock_shed_connections_total")
            || l.starts_with("airlock_closed_connections_total")
            || l.starts_with("airlock_gateway_handshake_failures_total")
    }) {
        println!("  {line}");
    }
    Ok(())
}

fn errors(errors: &[String]) -> String {
    if errors.is_empty() { String::new() } else { format!("; errors: {:?}", &errors[..errors.len().min(3)]) }
}

fn percentile(values: &mut [f64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let idx = ((p / 100.0) * (values.len() - 1) as f64).round() as usize;
    values[idx.min(values.len() - 1)]
}

#[derive(Default)]
struct Counts {
    idle_opened: AtomicUsize,
    idle_live: AtomicUsize,
    stalled_started: AtomicUsize,
    stalled_live: AtomicUsize,
    stalled_408: AtomicUsize,
    tcp_connects: AtomicUsize,
}

fn client_config(ca_pem: &str) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    if let Ok(ca) = CertificateDer::from_pem_slice(ca_pem.as_bytes()) {
        let _ = roots.add(ca);
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3 is supported")
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

async fn tls_connect(
    addr: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("127.0.0.1").map_err(std::io::Error::other)?;
    tokio_rustls::TlsConnector::from(cfg).connect(name, tcp).await
}

/// Holds `target` idle TLS connections, re-opening those the server closes, until `stop`.
async fn idle_flood(
    api: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
    target: usize,
    stop: Arc<AtomicBool>,
    counts: Arc<Counts>,
) {
    let live = Arc::new(AtomicUsize::new(0));
    while !stop.load(Ordering::Relaxed) {
        if live.load(Ordering::Relaxed) >= target {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        let Ok(Ok(mut tls)) = tokio::time::timeout(Duration::from_secs(5), tls_connect(api, cfg.clone())).await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        counts.idle_opened.fetch_add(1, Ordering::Relaxed);
        counts.idle_live.fetch_add(1, Ordering::Relaxed);
        live.fetch_add(1, Ordering::Relaxed);
        let (live, stop, counts) = (live.clone(), stop.clone(), counts.clone());
        tokio::spawn(async move {
            let mut buf = [0u8; 256];
            while !stop.load(Ordering::Relaxed) {
                if let Ok(Ok(0) | Err(_)) = tokio::time::timeout(Duration::from_millis(500), tls.read(&mut buf)).await {
                    break;
                }
            }
            live.fetch_sub(1, Ordering::Relaxed);
            counts.idle_live.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// Keeps `target` stalled uploads in flight: each declares 8,000 bytes, sends 100 and waits.
async fn stalled_uploads(
    api: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
    target: usize,
    stop: Arc<AtomicBool>,
    counts: Arc<Counts>,
) {
    while !stop.load(Ordering::Relaxed) {
        if counts.stalled_live.load(Ordering::Relaxed) >= target {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        let Ok(Ok(mut tls)) = tokio::time::timeout(Duration::from_secs(5), tls_connect(api, cfg.clone())).await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let head = "POST /v1/join HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: 8000\r\n\r\n";
        if tls.write_all(head.as_bytes()).await.is_err() || tls.write_all(&[b' '; 100]).await.is_err() {
            continue;
        }
        counts.stalled_started.fetch_add(1, Ordering::Relaxed);
        counts.stalled_live.fetch_add(1, Ordering::Relaxed);
        let (stop, counts) = (stop.clone(), counts.clone());
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while !stop.load(Ordering::Relaxed) {
                match tokio::time::timeout(Duration::from_millis(500), tls.read(&mut buf)).await {
                    Ok(Ok(0) | Err(_)) => break,
                    Ok(Ok(n)) => {
                        if buf[..n].starts_with(b"HTTP/1.1 408") {
                            counts.stalled_408.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(_) => {}
                }
            }
            counts.stalled_live.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// `per_second` bare TCP connects to the gateway, each held (sending nothing) until the server closes it or 10 s pass.
async fn tcp_flood(gateway: SocketAddr, per_second: usize, stop: Arc<AtomicBool>, counts: Arc<Counts>) {
    let tick = Duration::from_millis(20);
    let per_tick = (per_second / 50).max(1);
    let mut interval = tokio::time::interval(tick);
    while !stop.load(Ordering::Relaxed) {
        interval.tick().await;
        for _ in 0..per_tick {
            let (stop, counts) = (stop.clone(), counts.clone());
            tokio::spawn(async move {
                let Ok(Ok(mut tcp)) = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(gateway)).await
                else {
                    return;
                };
                counts.tcp_connects.fetch_add(1, Ordering::Relaxed);
                let mut buf = [0u8; 64];
                let held = Instant::now();
                while !stop.load(Ordering::Relaxed) && held.elapsed() < Duration::from_secs(10) {
                    if let Ok(Ok(0) | Err(_)) =
                        tokio::time::timeout(Duration::from_millis(500), tcp.read(&mut buf)).await
                    {
                        break;
                    }
                }
            });
        }
    }
}
