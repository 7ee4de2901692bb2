//! The audit keeping pace with the API, in one run:
//!
//! 1. Durable audit appends per second, N concurrent appenders, through the group-commit
//!    writer (`airlock_server::store::AuditWriter`) against one transaction and one commit per
//!    record, on a temporary data directory (SQLite WAL, `synchronous = FULL`). Every append
//!    counted was acknowledged after the fsync of its commit. Goal: ≥ 50,000/s grouped.
//! 2. Authenticated `GET /v1/appliances` (bearer token, a routine read) against `/healthz` on
//!    the same real server (`airlock_server::serve`: TLS 1.3, the real router and store), over
//!    HTTP/1.1 keep-alive with a fixed number of connections, in alternating rounds; the median
//!    round counts. Goal: ≥ 0.8×. Beside them: `/readyz` (one `SELECT 1`, the cost of one
//!    database round trip) and a durable read (a manifest; 404 here).
//!
//! `cargo run --release -p airlock-bench --bin audit [-- --appenders 256 --records 200]`
//!
//! Everything is on loopback and bounded by the request and record counts.
#![allow(clippy::print_stdout)] // A benchmark reports on stdout.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use airlock_core::Fingerprint;
use airlock_core::audit::{AuditAction, Outcome};
use airlock_server::clock::{Clock, SystemClock};
use airlock_server::keys::KekSource;
use airlock_server::metrics::AuditMetrics;
use airlock_server::state::event;
use airlock_server::store::{AuditWriter, Store};
use anyhow::{Context, ensure};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(name = "audit", about = "Group-committed audit appends, and audited reads against /healthz, on loopback.")]
struct Args {
    /// Concurrent appenders in the append benchmark.
    #[arg(long, default_value_t = 256)]
    appenders: usize,
    /// Records each appender appends through the group commit.
    #[arg(long, default_value_t = 200)]
    records: usize,
    /// Records each appender appends one commit at a time (each is an fsync, so fewer).
    #[arg(long, default_value_t = 8)]
    single_records: usize,
    /// HTTP/1.1 keep-alive connections, one request in flight on each.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Requests per round and route.
    #[arg(long, default_value_t = 5000)]
    requests: usize,
    /// Alternating rounds per route; the median counts.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
}

/// Audit chains the appenders spread over, as tenants would.
const CHAINS: usize = 16;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(appends(&args))?;
    // The server gets its own runtime, as it has its own process in production; the client
    // load runs on the main one.
    let server_rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let dir = tempfile::tempdir()?;
    let (addr, pin, token) = server_rt.block_on(start_server(dir.path()))?;
    rt.block_on(reads(&args, addr, pin, &token))
}

async fn appends(args: &Args) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mac = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"bench");
    let store = Arc::new(Store::open(dir.path(), true, mac).await?);
    let metrics = AuditMetrics::default();
    let writer = Arc::new(AuditWriter::spawn(store.clone(), metrics.clone()));

    let grouped = run_appenders(args.appenders, args.records, {
        let writer = writer.clone();
        move |chain, n| {
            let writer = writer.clone();
            async move { Ok(writer.append(&chain, SystemClock.now(), record(n)).await?) }
        }
    })
    .await?;
    let single = run_appenders(args.appenders, args.single_records, {
        let store = store.clone();
        move |chain, n| {
            let store = store.clone();
            async move {
                let mut tx = store.write().await?;
                tx.audit(&chain, SystemClock.now(), record(n)).await?;
                Ok(tx.commit().await?)
            }
        }
    })
    .await?;
    let verified = airlock_server::store::verify_all_chains(&store).await?;
    ensure!(verified.iter().all(|(_, r)| r.is_ok()), "a chain does not verify after the run: {verified:?}");

    let grouped_rate = grouped.0 as f64 / grouped.1.as_secs_f64();
    let single_rate = single.0 as f64 / single.1.as_secs_f64();
    println!("durable audit appends, {} concurrent appenders over {CHAINS} chains, synchronous=FULL", args.appenders);
    println!(
        "  group commit            {:>8} records in {:>6.2} s  {grouped_rate:>10.0} /s  ({} commits, {:.0} records each)",
        grouped.0,
        grouped.1.as_secs_f64(),
        metrics.commits.get(),
        metrics.records.get() as f64 / metrics.commits.get().max(1) as f64,
    );
    println!(
        "  one commit per record   {:>8} records in {:>6.2} s  {single_rate:>10.0} /s",
        single.0,
        single.1.as_secs_f64()
    );
    println!("  ratio grouped / single  {:>10.1}x   (goal: grouped >= 50000 /s)", grouped_rate / single_rate);
    Ok(())
}

fn record(n: usize) -> airlock_core::audit::Event {
    let mut ev = event("tok_bench", AuditAction::OperationManifest, Outcome::Success);
    ev.target = Some(format!("op_{n:032x}"));
    ev
}

/// `appenders` tasks, each appending `each` records one after the other (each awaited);
/// returns the records appended and the wall time.
async fn run_appenders<F, Fut>(appenders: usize, each: usize, append: F) -> anyhow::Result<(usize, Duration)>
where
    F: Fn(String, usize) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    let start = Instant::now();
    let tasks: Vec<_> = (0..appenders)
        .map(|task| {
            let append = append.clone();
            tokio::spawn(async move {
                for n in 0..each {
                    append(format!("ten_bench{}", task % CHAINS), n).await?;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    Ok((appenders * each, start.elapsed()))
}

async fn start_server(dir: &std::path::Path) -> anyhow::Result<(SocketAddr, Fingerprint, String)> {
    let data_dir = dir.join("data");
    let kek = KekSource::default_for(&data_dir);
    let boot = airlock_server::init(&data_dir, &kek, "bench.test", "acme", "default", &SystemClock).await?;
    let mut config = airlock_server::ServerConfig::new(data_dir);
    config.api_listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.gateway_listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.hostnames = vec!["127.0.0.1".into()];
    let server = airlock_server::serve(config).await?;
    let out = (server.api_addr, server.ca_fingerprint, boot.admin_token.expose().to_owned());
    // The server runs until the process ends; the benchmark never stops it.
    std::mem::forget(server);
    Ok(out)
}

async fn reads(args: &Args, addr: SocketAddr, pin: Fingerprint, token: &str) -> anyhow::Result<()> {
    let mut tls = airlock_proto::tls::pinned_client_config(pin);
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .http1_only()
        .pool_max_idle_per_host(args.connections)
        .timeout(Duration::from_secs(30))
        .build()
        .context("building the HTTP client")?;
    let base = format!("https://127.0.0.1:{}", addr.port());
    let routes = [
        ("GET /healthz", format!("{base}/healthz"), None),
        ("GET /v1/appliances (token)", format!("{base}/v1/appliances"), Some(token)),
        // One database round trip and nothing else: what a token lookup costs.
        ("GET /readyz (SELECT 1)", format!("{base}/readyz"), None),
        (
            "GET manifest, durable (404)",
            format!("{base}/v1/operations/op_0123456789abcdef0123456789abcdef/manifest"),
            Some(token),
        ),
    ];
    // Warm up every connection on every route once.
    for (_, url, auth) in &routes {
        round(&client, url, *auth, args.connections, args.connections).await?;
    }
    let mut rates = vec![Vec::new(); routes.len()];
    for _ in 0..args.rounds {
        for (i, (_, url, auth)) in routes.iter().enumerate() {
            rates[i].push(round(&client, url, *auth, args.requests, args.connections).await?);
        }
    }
    let medians: Vec<f64> = rates.into_iter().map(median).collect();
    println!(
        "API reads over HTTP/1.1 keep-alive TLS 1.3, {} connections, {} requests x {} rounds each, median",
        args.connections, args.requests, args.rounds
    );
    for ((name, _, _), rate) in routes.iter().zip(&medians) {
        println!("  {name:<30} {rate:>10.0} /s");
    }
    println!("  ratio /v1/appliances / /healthz {:>8.2}   (goal >= 0.80)", medians[1] / medians[0]);
    Ok(())
}

/// `requests` GETs of `url` over `connections` workers; returns requests per second.
async fn round(
    client: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    requests: usize,
    connections: usize,
) -> anyhow::Result<f64> {
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let workers: Vec<_> = (0..connections)
        .map(|_| {
            let (client, url, next) = (client.clone(), url.to_owned(), next.clone());
            let auth = token.map(|t| format!("Bearer {t}"));
            tokio::spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < requests {
                    let mut req = client.get(&url);
                    if let Some(a) = &auth {
                        req = req.header("authorization", a);
                    }
                    let resp = req.send().await?;
                    let status = resp.status();
                    resp.bytes().await?;
                    ensure!(status.is_success() || status == reqwest::StatusCode::NOT_FOUND, "{url}: {status}");
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for w in workers {
        w.await??;
    }
    Ok(requests as f64 / start.elapsed().as_secs_f64())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
