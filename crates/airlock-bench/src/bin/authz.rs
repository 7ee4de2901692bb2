//! The authorization decision (issue 15), in one run:
//!
//! 1. The Cedar decision alone (`airlock_server::authz::Engine::decide`): entities built, request evaluated, answer typed,
//!    timed one by one for a scoped token (a deployer confined to one workspace with an action list) and an owner token,
//!    permitted and refused. Goal: p99 ≤ 50 µs.
//! 2. Authenticated and authorised reads against `/healthz` on the same real server (`airlock_server::serve`: TLS 1.3,
//!    the real router, gate and store), over HTTP/1.1 keep-alive with a fixed number of connections, in alternating
//!    rounds; the median round counts. The cheap read route is `GET /v1/appliances` (a cached list, as in the `audit`
//!    benchmark) with a scoped token (a viewer whose action list is `appliances:read`): token lookup, the gate's Cedar
//!    decision, the read, the queued audit record. Goal: ≥ 0.8× `/healthz`. Beside it: a workspace-scoped token listing
//!    its workspace's environments (a database read each time).
//!
//! `cargo run --release -p airlock-bench --bin authz [-- --decisions 200000 --requests 5000]`
#![allow(clippy::print_stdout)] // A benchmark reports on stdout.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use airlock_core::{Fingerprint, TenantId, WorkspaceId};
use airlock_server::authz::{ApiPrincipal, Decision, Engine, Grants, Permission, PermissionSet, Role, Target};
use airlock_server::clock::SystemClock;
use airlock_server::keys::KekSource;
use anyhow::{Context, ensure};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "authz",
    about = "The authorization decision alone, and authorised reads against /healthz, on loopback."
)]
struct Args {
    /// Decisions timed per case.
    #[arg(long, default_value_t = 100_000)]
    decisions: usize,
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

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    decisions(args.decisions)?;
    let server_rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let dir = tempfile::tempdir()?;
    let (addr, pin, token, workspace) = server_rt.block_on(start_server(dir.path()))?;
    rt.block_on(reads(&args, addr, pin, &token, &workspace))
}

fn decisions(n: usize) -> anyhow::Result<()> {
    let engine = Engine::load()?;
    let tenant = TenantId::from_random([1; 16]);
    let ws = WorkspaceId::from_random([2; 16]);
    let ws_text = ws.to_string();
    let actions: PermissionSet =
        [Permission::EnvironmentsRead, Permission::ReleasesRead, Permission::ReleasesWrite].into_iter().collect();
    let scoped = Grants::token(Role::Deployer, Some(ws), Some(actions), None);
    let owner = Grants::token(Role::Owner, None, None, None);
    let cases = [
        ("scoped deployer, permitted", &scoped, Permission::ReleasesWrite, Decision::Permit),
        (
            "scoped deployer, outside its actions",
            &scoped,
            Permission::ArtifactsWrite,
            Decision::Deny(airlock_server::authz::DenyReason::OutsideTokenActions),
        ),
        ("owner, permitted", &owner, Permission::ReleasesWrite, Decision::Permit),
    ];
    println!("Cedar decision alone ({n} decisions per case, each timed)");
    println!("  {:<40} {:>9} {:>9} {:>9} {:>9}", "case", "p50", "p90", "p99", "max");
    for (name, grants, permission, expected) in cases {
        let principal = ApiPrincipal { id: "tok_bench", grants };
        let mut times = Vec::with_capacity(n);
        for _ in 0..n {
            let started = Instant::now();
            let d = engine.decide(tenant, &principal, permission, Target::Workspace(&ws_text));
            times.push(started.elapsed());
            ensure!(d == expected, "{name}: {d:?}");
        }
        times.sort();
        let at = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)];
        println!(
            "  {name:<40} {:>9.1?} {:>9.1?} {:>9.1?} {:>9.1?}",
            at(0.50),
            at(0.90),
            at(0.99),
            times[times.len() - 1]
        );
    }
    println!("  (goal: p99 <= 50 µs)");
    Ok(())
}

async fn start_server(dir: &std::path::Path) -> anyhow::Result<(SocketAddr, Fingerprint, String, String)> {
    let data_dir = dir.join("data");
    let kek = KekSource::default_for(&data_dir);
    let boot = airlock_server::init(&data_dir, &kek, "bench.test", "acme", "default", &SystemClock).await?;
    let mut config = airlock_server::ServerConfig::new(data_dir);
    config.api_listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.gateway_listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.hostnames = vec!["127.0.0.1".into()];
    let server = airlock_server::serve(config).await?;
    let out =
        (server.api_addr, server.ca_fingerprint, boot.admin_token.expose().to_owned(), boot.workspace.to_string());
    // The server runs until the process ends; the benchmark never stops it.
    std::mem::forget(server);
    Ok(out)
}

fn client(connections: usize, pin: Fingerprint) -> anyhow::Result<reqwest::Client> {
    let mut tls = airlock_proto::tls::pinned_client_config(pin);
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .http1_only()
        .pool_max_idle_per_host(connections)
        .timeout(Duration::from_secs(30))
        .build()
        .context("building the HTTP client")
}

async fn reads(args: &Args, addr: SocketAddr, pin: Fingerprint, owner: &str, workspace: &str) -> anyhow::Result<()> {
    let client = client(args.connections, pin)?;
    let base = format!("https://127.0.0.1:{}", addr.port());
    // The scoped tokens, made through the API as an integration's would be.
    let scoped = make_token(
        &client,
        &base,
        owner,
        serde_json::json!({ "name": "bench", "role": "viewer",
        "actions": ["appliances:read"], "expires_in": "1d" }),
    )
    .await?;
    let in_workspace = make_token(
        &client,
        &base,
        owner,
        serde_json::json!({ "name": "bench-ws", "role": "viewer",
        "workspace_id": workspace, "actions": ["environments:read"], "expires_in": "1d" }),
    )
    .await?;
    let routes = [
        ("GET /healthz", format!("{base}/healthz"), None),
        ("GET /v1/appliances (scoped token)", format!("{base}/v1/appliances"), Some(scoped.as_str())),
        ("GET /v1/appliances (owner token)", format!("{base}/v1/appliances"), Some(owner)),
        (
            "GET environments (workspace token)",
            format!("{base}/v1/workspaces/{workspace}/environments"),
            Some(in_workspace.as_str()),
        ),
    ];
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
        println!("  {name:<34} {rate:>10.0} /s");
    }
    println!("  ratio scoped read / /healthz {:>10.2}   (goal >= 0.80)", medians[1] / medians[0]);
    Ok(())
}

async fn make_token(
    client: &reqwest::Client,
    base: &str,
    owner: &str,
    body: serde_json::Value,
) -> anyhow::Result<String> {
    let resp = client.post(format!("{base}/v1/tokens")).bearer_auth(owner).json(&body).send().await?;
    ensure!(resp.status().is_success(), "creating a scoped token: {}", resp.status());
    let made: serde_json::Value = resp.json().await?;
    Ok(made["token"].as_str().context("no token in the answer")?.to_owned())
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
                    ensure!(status.is_success(), "{url}: {status}");
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
