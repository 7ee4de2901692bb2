//! Fleet benchmark: one `airlock server` and thousands of simulated appliances, all on loopback.
//!
//! Phases: join (join token + CSR per appliance over the HTTPS API), connect (one mutual-TLS
//! gRPC stream per appliance, `Hello` → `Welcome`), server memory per connected appliance,
//! and closed-loop heartbeats for a fixed time. See BENCHMARKS.md at the workspace root.
//!
//! One process can hold at most as many sockets as its open-files limit allows, so with
//! `--processes K` the main process starts K-1 copies of itself in `--worker` mode, each
//! joining and connecting its share against the same server. Workers take commands on stdin
//! (`connect`, `heartbeat <deadline µs>`, `exit`) and answer with one JSON line per phase.
// The summary table and the worker protocol go to stdout; diagnostics go to stderr.
#![allow(clippy::print_stdout)]

use airlock_bench::worker::{Worker, emit};
use airlock_bench::{fleet, procfs, server, unix_us};

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use airlock_core::Fingerprint;
use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use serde::{Deserialize, Serialize};

use airlock_bench::fleet::{ConnectReport, EnrolCtx, EnrolReport, HeartbeatReport, Hold};

/// The memory goal: this many connected appliances, each costing the server less than this.
const GOAL_APPLIANCES: usize = 10_000;
const GOAL_KIB_PER_APPLIANCE: f64 = 50.0;

/// Time limits on the phases, so every wait is bounded.
const ENROL_PHASE_LIMIT: Duration = Duration::from_secs(3600);
const CONNECT_PHASE_LIMIT: Duration = Duration::from_secs(1800);

#[derive(Parser, Debug)]
#[command(name = "airlock-bench", about = "Fleet benchmark for the Airlock control plane, on loopback.")]
struct Args {
    /// Simulated appliances in total.
    #[arg(long, default_value_t = 1000)]
    appliances: usize,
    /// Processes to spread the appliances over (one process holds at most ~9,000 safely).
    #[arg(long, default_value_t = 1)]
    processes: usize,
    /// The `airlock` binary [default: `airlock` next to this binary; run `cargo build --release -p airlock` first].
    #[arg(long)]
    airlock_bin: Option<PathBuf>,
    /// Joins in flight at once (over all processes).
    #[arg(long, default_value_t = 32)]
    join_concurrency: usize,
    /// Gateway dials in flight at once (over all processes).
    #[arg(long, default_value_t = 128)]
    connect_concurrency: usize,
    /// All joins share one HTTPS connection instead of one fresh TLS connection each.
    #[arg(long)]
    share_join_connection: bool,
    /// How far each appliance connects: `session` is the real thing; `tls` and `h2` stop
    /// earlier, to split the server's memory per appliance by layer (no heartbeats then).
    #[arg(long, value_enum, default_value_t = Hold::Session)]
    hold: Hold,
    /// Length of the closed-loop heartbeat phase, seconds.
    #[arg(long, default_value_t = 10)]
    heartbeat_seconds: u64,
    /// Wait after the last appliance connected before reading server memory, seconds.
    #[arg(long, default_value_t = 2)]
    settle_seconds: u64,
    /// Also write the summary as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// After everyone disconnects, wait at most this long for the server to finish writing
    /// (it records last-seen per stream), before stopping it. 0: stop it at once.
    #[arg(long, default_value_t = 300)]
    drain_seconds: u64,
    /// Keep a copy of the server's log (stderr) here; the data directory itself is deleted.
    #[arg(long)]
    server_log: Option<PathBuf>,

    // ---- worker mode (started by the main process) ----
    #[arg(long, hide = true)]
    worker: bool,
    #[arg(long, hide = true)]
    api_url: Option<String>,
    #[arg(long, hide = true)]
    ca_fingerprint: Option<String>,
    #[arg(long, hide = true)]
    environment: Option<String>,
    /// Appliances for this worker.
    #[arg(long, hide = true)]
    count: Option<usize>,
}

/// The admin token reaches workers through the environment, not the command line.
const ADMIN_TOKEN_ENV: &str = "AIRLOCK_BENCH_ADMIN_TOKEN";

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
enum WorkerReport {
    Enrolled(EnrolReport),
    Connected(ConnectReport),
    Heartbeat(HeartbeatReport),
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let res = if args.worker { runtime.block_on(worker(args)) } else { runtime.block_on(run(args)) };
    // Thousands of connection tasks may still be winding down; do not wait for them.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match res {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::from(2),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn deadline_from_unix_us(deadline_us: u64) -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_micros(deadline_us.saturating_sub(unix_us()))
}

/// Splits `n` into `k` nearly equal shares.
fn shares(n: usize, k: usize) -> Vec<usize> {
    (0..k).map(|i| n / k + usize::from(i < n % k)).collect()
}

/// Makes sure this process (and so its children) may open `needed` files, raising the soft
/// limit to the hard one with `prlimit(1)` if need be.
fn ensure_open_files(needed: usize) -> anyhow::Result<()> {
    let parse = |v: &str| if v == "unlimited" { usize::MAX } else { v.parse().unwrap_or(0) };
    let Some((soft, hard)) = procfs::open_files_limit() else { return Ok(()) };
    let (mut soft, hard) = (parse(&soft), parse(&hard));
    if soft < needed && soft < hard {
        let limit = if hard == usize::MAX { "unlimited".to_owned() } else { hard.to_string() };
        let status = std::process::Command::new("prlimit")
            .args(["--pid", &std::process::id().to_string(), &format!("--nofile={limit}:{limit}")])
            .status();
        if matches!(status, Ok(s) if s.success()) {
            soft = procfs::open_files_limit().map_or(0, |(s, _)| parse(&s));
        }
    }
    if soft < needed {
        bail!(
            "this needs about {needed} open files per process but the limit is {soft} (hard {hard}); \
             raise it (`ulimit -n`) or use more --processes"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------- worker mode

async fn worker(args: Args) -> anyhow::Result<bool> {
    let api_url = args.api_url.context("--worker needs --api-url")?;
    let pin: Fingerprint = args.ca_fingerprint.context("--worker needs --ca-fingerprint")?.parse()?;
    let environment = args.environment.context("--worker needs --environment")?;
    let count = args.count.context("--worker needs --count")?;
    let token = std::env::var(ADMIN_TOKEN_ENV).with_context(|| format!("--worker needs {ADMIN_TOKEN_ENV}"))?;
    ensure_open_files(count + 200)?;
    let ctx = Arc::new(EnrolCtx::new(&api_url, pin, &token, &environment, args.share_join_connection)?);

    let (enrolled, report) = fleet::enrol_many(ctx, count, args.join_concurrency).await;
    emit(&WorkerReport::Enrolled(report))?;

    // Commands come on stdin, read on a plain thread (tokio's stdin needs a feature the
    // workspace does not enable).
    let (cmd_tx, mut commands) = tokio::sync::mpsc::channel::<String>(4);
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            if cmd_tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    let mut enrolled = Some(enrolled);
    let mut lives = Vec::new();
    // Bounded: each command is one phase, and the main process sends `exit` (or closes stdin).
    while let Some(line) = commands.recv().await {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("connect") => {
                let Some(e) = enrolled.take() else { bail!("connect sent twice") };
                let (l, report) = fleet::connect_many(e, args.connect_concurrency, args.hold).await;
                lives = l;
                emit(&WorkerReport::Connected(report))?;
            }
            Some("heartbeat") => {
                let deadline: u64 = words.next().and_then(|w| w.parse().ok()).context("heartbeat needs a deadline")?;
                let (l, report) =
                    fleet::heartbeat_many(std::mem::take(&mut lives), deadline_from_unix_us(deadline)).await;
                lives = l;
                emit(&WorkerReport::Heartbeat(report))?;
            }
            Some("exit") | None => break,
            Some(other) => bail!("unknown worker command {other:?}"),
        }
    }
    drop(lives);
    Ok(true)
}

/// Starts a worker process for `count` of the appliances.
fn spawn_worker(
    args: &Args,
    api_url: &str,
    pin: &str,
    environment: &str,
    admin_token: &str,
    count: usize,
) -> anyhow::Result<Worker> {
    let exe = std::env::current_exe().context("locating this binary")?;
    let per = |total: usize| (total / args.processes).max(1).to_string();
    let mut cmd = tokio::process::Command::new(exe);
    cmd.args(["--worker", "--api-url", api_url, "--ca-fingerprint", pin, "--environment", environment])
        .args(["--count", &count.to_string()])
        .args(["--join-concurrency", &per(args.join_concurrency)])
        .args(["--connect-concurrency", &per(args.connect_concurrency)])
        .args([
            "--hold",
            &args.hold.to_possible_value().map_or_else(|| "session".to_owned(), |v| v.get_name().to_owned()),
        ])
        .env(ADMIN_TOKEN_ENV, admin_token);
    if args.share_join_connection {
        cmd.arg("--share-join-connection");
    }
    Worker::spawn(cmd)
}

// ---------------------------------------------------------------- main process

#[derive(Debug, Serialize)]
struct Summary {
    appliances: usize,
    processes: usize,
    cores: usize,
    hold: Hold,
    airlock_bin: String,
    join: JoinSummary,
    connect: ConnectSummary,
    memory: MemorySummary,
    heartbeat: HeartbeatSummary,
    goal: GoalSummary,
    /// From the last appliance disconnecting until the server stopped writing and computing.
    server_drain_s: Option<f64>,
    server_shutdown_s: Option<f64>,
    server_log: server::LogSummary,
}

#[derive(Debug, Serialize)]
struct JoinSummary {
    ok: usize,
    failed: usize,
    concurrency: usize,
    fresh_tls_per_join: bool,
    wall_s: f64,
    per_s: f64,
    token_p50_ms: f64,
    token_p99_ms: f64,
    join_p50_ms: f64,
    join_p99_ms: f64,
    server_cpu_s: f64,
    errors: Vec<String>,
}

#[derive(Debug, Serialize)]
struct ConnectSummary {
    ok: usize,
    failed: usize,
    concurrency: usize,
    /// Wall time until the first 1,000 appliances (or all, if fewer) had their `Welcome`.
    first_1000_s: f64,
    all_s: f64,
    per_s: f64,
    latency_p50_ms: f64,
    latency_p99_ms: f64,
    server_cpu_s: f64,
    errors: Vec<String>,
}

#[derive(Debug, Serialize)]
struct MemorySummary {
    rss_before_kib: u64,
    rss_connected_kib: u64,
    per_appliance_kib: f64,
    rss_after_heartbeats_kib: u64,
    peak_rss_kib: u64,
    server_fds: usize,
    server_threads: u64,
    metrics_connected: Option<f64>,
    metrics_match: bool,
}

#[derive(Debug, Serialize)]
struct HeartbeatSummary {
    seconds: f64,
    acks: u64,
    per_s: f64,
    mean_rtt_ms: f64,
    server_counter_delta: Option<f64>,
    server_cpu_s: f64,
    server_cpu_us_per_heartbeat: f64,
    bench_cpu_s: f64,
    /// CPU seconds the whole machine was busy; much more than server + bench means other load.
    machine_busy_s: f64,
    failed_streams: usize,
    errors: Vec<String>,
}

#[derive(Debug, Serialize)]
struct GoalSummary {
    target_appliances: usize,
    target_kib_per_appliance: f64,
    appliances_connected: usize,
    appliances_met: bool,
    memory_met: bool,
}

fn percentile_ms(values: &mut [u64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_unstable();
    let idx = ((p / 100.0) * (values.len() - 1) as f64).round() as usize;
    values[idx.min(values.len() - 1)] as f64 / 1000.0
}

fn secs(us: u64) -> f64 {
    us as f64 / 1e6
}

/// `/metrics` counts fleet-wide, so it wants an API token (the admin's here).
async fn metrics_text(client: &reqwest::Client, api_url: &str, token: &str) -> anyhow::Result<String> {
    let resp = client.get(format!("{api_url}/metrics")).bearer_auth(token).send().await.context("GET /metrics")?;
    anyhow::ensure!(resp.status().is_success(), "GET /metrics: HTTP {}", resp.status());
    Ok(resp.text().await?)
}

async fn run(args: Args) -> anyhow::Result<bool> {
    anyhow::ensure!(args.appliances > 0, "--appliances must be at least 1");
    anyhow::ensure!(
        args.processes > 0 && args.processes <= args.appliances,
        "--processes must be between 1 and --appliances"
    );
    let shares = shares(args.appliances, args.processes);
    // Our own share of gateway sockets, plus the server's (a child inherits our limit): all of
    // them, plus SQLite and the API.
    ensure_open_files(shares[0].max(args.appliances) + 200)?;

    let airlock_bin = match &args.airlock_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.parent().context("binary has no directory")?.join("airlock"),
    };
    anyhow::ensure!(
        airlock_bin.is_file(),
        "{} not found: run `cargo build --release -p airlock` first, or pass --airlock-bin",
        airlock_bin.display()
    );
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    eprintln!(
        "airlock-bench: {} appliances over {} process(es) on {cores} cores, server {}",
        args.appliances,
        args.processes,
        airlock_bin.display()
    );

    let tmp = tempfile::Builder::new().prefix("airlock-bench-").tempdir()?;
    let data_dir = tmp.path().join("data");
    let init = server::init(&airlock_bin, &data_dir)?;
    let mut srv = server::ServerProc::spawn(&airlock_bin, &data_dir)?;
    let res = run_with_server(&args, &shares, &airlock_bin, cores, &init, &mut srv).await;
    let shutdown = srv.stop(Duration::from_secs(15)).await;
    let log = server::summarize_log(&srv.log_file);
    if let Some(dest) = &args.server_log {
        match std::fs::copy(&srv.log_file, dest) {
            Ok(_) => eprintln!("server log copied to {}", dest.display()),
            Err(e) => eprintln!("warning: cannot copy the server log to {}: {e}", dest.display()),
        }
    }
    let mut summary = match res {
        Ok(s) => s,
        Err(e) => {
            if log.warn_lines + log.error_lines > 0 {
                eprintln!("server log samples:");
                for l in &log.samples {
                    eprintln!("  {l}");
                }
            }
            return Err(e);
        }
    };
    summary.server_shutdown_s = shutdown?.map(|d| d.as_secs_f64());
    summary.server_log = log;
    print_summary(&summary);
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_vec_pretty(&summary)?)
            .with_context(|| format!("writing {}", out.display()))?;
        eprintln!("wrote {}", out.display());
    }
    Ok(summary.connect.ok == args.appliances && summary.join.failed == 0)
}

async fn run_with_server(
    args: &Args,
    shares: &[usize],
    airlock_bin: &std::path::Path,
    cores: usize,
    init: &server::InitOutput,
    srv: &mut server::ServerProc,
) -> anyhow::Result<Summary> {
    let ready = srv.wait_ready(Duration::from_secs(60)).await?;
    anyhow::ensure!(ready.pid == srv.pid(), "ready file names pid {}, we started {}", ready.pid, srv.pid());
    anyhow::ensure!(
        ready.ca_fingerprint == init.ca_fingerprint,
        "server CA {} differs from the one init printed {}",
        ready.ca_fingerprint,
        init.ca_fingerprint
    );
    let pid = srv.pid();
    let pin: Fingerprint = ready.ca_fingerprint.parse()?;
    let api_url = ready.api_url.trim_end_matches('/').to_owned();
    eprintln!("server pid {pid}: API {api_url}, gateway {}", ready.gateway_endpoint);

    let http = fleet::http_client(pin)?;
    let env: serde_json::Value = {
        let resp = http
            .post(format!("{api_url}/v1/workspaces/{}/environments", init.workspace))
            .bearer_auth(&init.admin_token)
            .json(&serde_json::json!({ "name": "bench" }))
            .send()
            .await
            .context("creating environment")?;
        let status = resp.status();
        let text = resp.text().await?;
        anyhow::ensure!(status.is_success(), "creating environment: HTTP {status}: {text}");
        serde_json::from_str(&text)?
    };
    let environment = env["id"].as_str().context("environment response has no id")?.to_owned();

    // ---- join
    let per = |total: usize| (total / args.processes).max(1);
    let cpu0 = procfs::cpu_seconds(pid)?;
    let mut workers = Vec::new();
    for &count in &shares[1..] {
        workers.push(spawn_worker(args, &api_url, &ready.ca_fingerprint, &environment, &init.admin_token, count)?);
    }
    eprintln!("joining {} appliances ({} in flight)…", args.appliances, args.join_concurrency);
    let ctx = Arc::new(EnrolCtx::new(&api_url, pin, &init.admin_token, &environment, args.share_join_connection)?);
    let (enrolled, own) =
        tokio::time::timeout(ENROL_PHASE_LIMIT, fleet::enrol_many(ctx, shares[0], per(args.join_concurrency)))
            .await
            .context("join phase timed out")?;
    let mut joins = vec![own];
    for w in &mut workers {
        match w.report(ENROL_PHASE_LIMIT).await? {
            WorkerReport::Enrolled(r) => joins.push(r),
            other => bail!("expected a join report, got {other:?}"),
        }
    }
    let join_cpu = procfs::cpu_seconds(pid)? - cpu0;
    let join = summarize_joins(joins, args, join_cpu);
    eprintln!("joined {} ({} failed) in {:.1} s", join.ok, join.failed, join.wall_s);

    // ---- connect
    let rss_before = procfs::status_kib(pid, "VmRSS")?;
    eprintln!(
        "server RSS before connecting: {rss_before} KiB; connecting ({} dials in flight)…",
        args.connect_concurrency
    );
    let cpu0 = procfs::cpu_seconds(pid)?;
    let start_us = unix_us();
    for w in &mut workers {
        w.send("connect").await?;
    }
    let (lives, own) = tokio::time::timeout(
        CONNECT_PHASE_LIMIT,
        fleet::connect_many(enrolled, per(args.connect_concurrency), args.hold),
    )
    .await
    .context("connect phase timed out")?;
    let mut connects = vec![own];
    for w in &mut workers {
        match w.report(CONNECT_PHASE_LIMIT).await? {
            WorkerReport::Connected(r) => connects.push(r),
            other => bail!("expected a connect report, got {other:?}"),
        }
    }
    let connect_cpu = procfs::cpu_seconds(pid)? - cpu0;
    let connect = summarize_connects(connects, start_us, args, connect_cpu);
    eprintln!(
        "connected {} ({} failed): first 1000 in {:.2} s, all in {:.2} s",
        connect.ok, connect.failed, connect.first_1000_s, connect.all_s
    );

    // ---- memory
    tokio::time::sleep(Duration::from_secs(args.settle_seconds)).await;
    let rss_connected = procfs::status_kib(pid, "VmRSS")?;
    let metrics = metrics_text(&http, &api_url, &init.admin_token).await?;
    let metrics_connected = server::metric(&metrics, "airlock_gateway_appliances_connected");
    let hb_counter0 = server::metric(&metrics, "airlock_gateway_heartbeats_total");
    let per_appliance_kib =
        if connect.ok > 0 { rss_connected.saturating_sub(rss_before) as f64 / connect.ok as f64 } else { 0.0 };
    let server_fds = procfs::open_fds(pid).unwrap_or(0);
    let server_threads = procfs::threads(pid).unwrap_or(0);
    eprintln!(
        "server RSS with {} connected: {rss_connected} KiB ({per_appliance_kib:.1} KiB each); metrics say {metrics_connected:?}",
        connect.ok
    );

    // ---- heartbeats (only with live sessions)
    let heartbeat_seconds = if args.hold == Hold::Session { args.heartbeat_seconds } else { 0 };
    eprintln!("heartbeating for {heartbeat_seconds} s…");
    let busy0 = procfs::machine_busy_seconds()?;
    let cpu0 = procfs::cpu_seconds(pid)?;
    let hb_start = Instant::now();
    let deadline_us = unix_us() + heartbeat_seconds * 1_000_000;
    for w in &mut workers {
        w.send(&format!("heartbeat {deadline_us}")).await?;
    }
    let hb_limit = Duration::from_secs(heartbeat_seconds + 120);
    let (lives, own) = tokio::time::timeout(hb_limit, fleet::heartbeat_many(lives, deadline_from_unix_us(deadline_us)))
        .await
        .context("heartbeat phase overran")?;
    let hb_wall = hb_start.elapsed().as_secs_f64();
    let hb_cpu = procfs::cpu_seconds(pid)? - cpu0;
    let machine_busy_s = procfs::machine_busy_seconds()? - busy0;
    let mut beats = vec![own];
    for w in &mut workers {
        match w.report(hb_limit).await? {
            WorkerReport::Heartbeat(r) => beats.push(r),
            other => bail!("expected a heartbeat report, got {other:?}"),
        }
    }
    let hb_counter1 =
        server::metric(&metrics_text(&http, &api_url, &init.admin_token).await?, "airlock_gateway_heartbeats_total");
    let acks: u64 = beats.iter().map(|b| b.acks).sum();
    let rtt_sum: u64 = beats.iter().map(|b| b.rtt_sum_us).sum();
    let seconds = (heartbeat_seconds as f64).max(1e-9);
    let heartbeat = HeartbeatSummary {
        seconds: hb_wall,
        acks,
        per_s: acks as f64 / seconds,
        mean_rtt_ms: if acks > 0 { rtt_sum as f64 / acks as f64 / 1000.0 } else { 0.0 },
        server_counter_delta: hb_counter0.zip(hb_counter1).map(|(a, b)| b - a),
        server_cpu_s: hb_cpu,
        server_cpu_us_per_heartbeat: if acks > 0 { hb_cpu * 1e6 / acks as f64 } else { 0.0 },
        bench_cpu_s: beats.iter().map(|b| b.bench_cpu_s).sum(),
        machine_busy_s,
        failed_streams: beats.iter().map(|b| b.failed).sum(),
        errors: beats.into_iter().flat_map(|b| b.errors).take(10).collect(),
    };
    let rss_after_hb = procfs::status_kib(pid, "VmRSS")?;
    let peak = procfs::status_kib(pid, "VmHWM")?;

    // ---- done: disconnect everyone before stopping the server.
    let disconnect_at = Instant::now();
    for w in &mut workers {
        let _ = w.send("exit").await;
    }
    drop(lives);
    for w in &mut workers {
        match tokio::time::timeout(Duration::from_secs(30), w.child.wait()).await {
            Ok(Ok(status)) if status.success() => {}
            Ok(Ok(status)) => eprintln!("warning: worker exited with {status}"),
            _ => {
                let _ = w.child.kill().await;
            }
        }
    }

    let server_drain_s = drain(pid, disconnect_at, Duration::from_secs(args.drain_seconds)).await?;

    let connected = connect.ok;
    let memory = MemorySummary {
        rss_before_kib: rss_before,
        rss_connected_kib: rss_connected,
        per_appliance_kib,
        rss_after_heartbeats_kib: rss_after_hb,
        peak_rss_kib: peak,
        server_fds,
        server_threads,
        metrics_connected,
        // Only a Session stream counts as connected.
        metrics_match: metrics_connected == Some(if args.hold == Hold::Session { connected as f64 } else { 0.0 }),
    };
    Ok(Summary {
        appliances: args.appliances,
        processes: args.processes,
        cores,
        hold: args.hold,
        airlock_bin: airlock_bin.display().to_string(),
        join,
        connect,
        goal: GoalSummary {
            target_appliances: GOAL_APPLIANCES,
            target_kib_per_appliance: GOAL_KIB_PER_APPLIANCE,
            appliances_connected: connected,
            // Only live sessions count towards the fleet goal.
            appliances_met: args.hold == Hold::Session && connected >= GOAL_APPLIANCES,
            memory_met: per_appliance_kib < GOAL_KIB_PER_APPLIANCE,
        },
        memory,
        heartbeat,
        server_drain_s,
        server_shutdown_s: None,
        server_log: server::LogSummary::default(),
    })
}

/// Waits until the server has made no write system call and used (almost) no CPU for a full
/// second, at most `limit` after `start`. Returns how long after `start` it became quiet, or
/// `None` if it never did.
async fn drain(pid: u32, start: Instant, limit: Duration) -> anyhow::Result<Option<f64>> {
    if limit.is_zero() {
        return Ok(None);
    }
    const STEP: Duration = Duration::from_millis(250);
    const QUIET_STEPS: u32 = 4;
    let mut last = (procfs::write_syscalls(pid)?, procfs::cpu_seconds(pid)?);
    let mut quiet_since: Option<Instant> = None;
    let mut quiet = 0;
    while start.elapsed() < limit {
        tokio::time::sleep(STEP).await;
        let now = (procfs::write_syscalls(pid)?, procfs::cpu_seconds(pid)?);
        if now.0 == last.0 && now.1 - last.1 < 0.02 {
            quiet_since.get_or_insert_with(Instant::now);
            quiet += 1;
            if quiet >= QUIET_STEPS {
                let busy = quiet_since.map_or(start, |q| q - STEP).saturating_duration_since(start);
                return Ok(Some(busy.as_secs_f64()));
            }
        } else {
            quiet_since = None;
            quiet = 0;
        }
        last = now;
    }
    eprintln!("warning: the server was still busy {limit:?} after the appliances disconnected");
    Ok(None)
}

fn summarize_joins(reports: Vec<EnrolReport>, args: &Args, server_cpu_s: f64) -> JoinSummary {
    let start = reports.iter().map(|r| r.start_unix_us).min().unwrap_or(0);
    let end = reports.iter().map(|r| r.end_unix_us).max().unwrap_or(start);
    let ok: usize = reports.iter().map(|r| r.ok).sum();
    let mut token_us: Vec<u64> = reports.iter().flat_map(|r| r.token_us.iter().copied()).collect();
    let mut join_us: Vec<u64> = reports.iter().flat_map(|r| r.join_us.iter().copied()).collect();
    let wall_s = secs(end.saturating_sub(start));
    JoinSummary {
        ok,
        failed: reports.iter().map(|r| r.failed).sum(),
        concurrency: args.join_concurrency,
        fresh_tls_per_join: !args.share_join_connection,
        wall_s,
        per_s: if wall_s > 0.0 { ok as f64 / wall_s } else { 0.0 },
        token_p50_ms: percentile_ms(&mut token_us, 50.0),
        token_p99_ms: percentile_ms(&mut token_us, 99.0),
        join_p50_ms: percentile_ms(&mut join_us, 50.0),
        join_p99_ms: percentile_ms(&mut join_us, 99.0),
        server_cpu_s,
        errors: reports.into_iter().flat_map(|r| r.errors).take(10).collect(),
    }
}

fn summarize_connects(reports: Vec<ConnectReport>, start_us: u64, args: &Args, server_cpu_s: f64) -> ConnectSummary {
    let mut welcomes: Vec<u64> = reports.iter().flat_map(|r| r.welcome_unix_us.iter().copied()).collect();
    welcomes.sort_unstable();
    let mut latency: Vec<u64> = reports.iter().flat_map(|r| r.latency_us.iter().copied()).collect();
    let ok = welcomes.len();
    let at = |i: usize| welcomes.get(i).map_or(0.0, |&t| secs(t.saturating_sub(start_us)));
    let all_s = if ok > 0 { at(ok - 1) } else { 0.0 };
    ConnectSummary {
        ok,
        failed: reports.iter().map(|r| r.failed).sum(),
        concurrency: args.connect_concurrency,
        first_1000_s: if ok > 0 { at(ok.min(1000) - 1) } else { 0.0 },
        all_s,
        per_s: if all_s > 0.0 { ok as f64 / all_s } else { 0.0 },
        latency_p50_ms: percentile_ms(&mut latency, 50.0),
        latency_p99_ms: percentile_ms(&mut latency, 99.0),
        server_cpu_s,
        errors: reports.into_iter().flat_map(|r| r.errors).take(10).collect(),
    }
}

fn print_summary(s: &Summary) {
    let j = &s.join;
    let c = &s.connect;
    let m = &s.memory;
    let h = &s.heartbeat;
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!();
    println!(
        "Airlock fleet benchmark: {} appliances, {} process(es), {} cores, holding {:?}",
        s.appliances, s.processes, s.cores, s.hold
    );
    println!("{:-<100}", "");
    println!("{:<34} value", "metric");
    println!("{:-<100}", "");
    println!("{:<34} {} ok, {} failed", "joined", j.ok, j.failed);
    println!(
        "{:<34} {:.2} s ({:.1} joins/s, {} in flight)",
        "join wall time (token + join)", j.wall_s, j.per_s, j.concurrency
    );
    println!("{:<34} p50 {:.1} ms, p99 {:.1} ms", "  join-token request", j.token_p50_ms, j.token_p99_ms);
    println!(
        "{:<34} p50 {:.1} ms, p99 {:.1} ms ({})",
        "  keygen + POST /v1/join",
        j.join_p50_ms,
        j.join_p99_ms,
        if j.fresh_tls_per_join { "fresh TLS each" } else { "shared connection" }
    );
    println!("{:<34} {:.2} s ({:.0} µs per join)", "  server CPU", j.server_cpu_s, per(j.server_cpu_s * 1e6, j.ok));
    let reached = match s.hold {
        Hold::Tls => "connected (mutual TLS only)",
        Hold::H2 => "connected (TLS + HTTP/2, no stream)",
        Hold::Session => "connected (Hello → Welcome)",
    };
    println!("{:<34} {} ok, {} failed", reached, c.ok, c.failed);
    println!("{:<34} {:.2} s", format!("time to connect first {}", c.ok.min(1000)), c.first_1000_s);
    println!(
        "{:<34} {:.2} s ({:.0}/s, {} in flight)",
        format!("time to connect all {}", c.ok),
        c.all_s,
        c.per_s,
        c.concurrency
    );
    println!(
        "{:<34} p50 {:.1} ms, p99 {:.1} ms",
        "  per-appliance connect latency", c.latency_p50_ms, c.latency_p99_ms
    );
    println!(
        "{:<34} {:.2} s ({:.0} µs per connection)",
        "  server CPU",
        c.server_cpu_s,
        per(c.server_cpu_s * 1e6, c.ok)
    );
    println!("{:<34} {:.1} MiB", "server RSS before connecting", mib(m.rss_before_kib));
    println!("{:<34} {:.1} MiB", "server RSS all connected", mib(m.rss_connected_kib));
    println!(
        "{:<34} {:.1} KiB (goal < {} KiB: {})",
        "server memory per appliance",
        m.per_appliance_kib,
        s.goal.target_kib_per_appliance,
        if s.goal.memory_met { "met" } else { "NOT met" }
    );
    println!(
        "{:<34} {:.1} MiB after heartbeats, peak {:.1} MiB",
        "server RSS later",
        mib(m.rss_after_heartbeats_kib),
        mib(m.peak_rss_kib)
    );
    println!("{:<34} {} fds, {} threads", "server process", m.server_fds, m.server_threads);
    println!(
        "{:<34} {} ({})",
        "metrics appliances_connected",
        m.metrics_connected.map_or("missing".to_owned(), |v| v.to_string()),
        if m.metrics_match { "matches" } else { "MISMATCH" }
    );
    println!(
        "{:<34} {} acks in {:.1} s = {:.0}/s (mean RTT {:.1} ms)",
        "heartbeats", h.acks, h.seconds, h.per_s, h.mean_rtt_ms
    );
    println!(
        "{:<34} {:.2} s = {:.1} µs per heartbeat (bench used {:.2} s, machine busy {:.2} s of {:.0})",
        "  server CPU",
        h.server_cpu_s,
        h.server_cpu_us_per_heartbeat,
        h.bench_cpu_s,
        h.machine_busy_s,
        h.seconds * s.cores as f64
    );
    println!(
        "{:<34} {}",
        "  server heartbeat counter delta",
        h.server_counter_delta.map_or("missing".to_owned(), |v| v.to_string())
    );
    println!(
        "{:<34} {} connected (goal {}: {})",
        "fleet goal",
        s.goal.appliances_connected,
        s.goal.target_appliances,
        if s.goal.appliances_met { "met" } else { "not met in this run" }
    );
    println!(
        "{:<34} {}",
        "server busy after all disconnected",
        s.server_drain_s.map_or("not measured".to_owned(), |d| format!("{d:.2} s (writing last-seen per stream)"))
    );
    println!(
        "{:<34} {} lines, {} WARN, {} ERROR; shutdown {}",
        "server log",
        s.server_log.lines,
        s.server_log.warn_lines,
        s.server_log.error_lines,
        s.server_shutdown_s.map_or("forced (SIGKILL)".to_owned(), |d| format!("{d:.2} s after SIGTERM"))
    );
    println!("{:-<100}", "");
    for e in j.errors.iter().chain(&c.errors).chain(&h.errors) {
        println!("error sample: {e}");
    }
    for l in &s.server_log.samples {
        println!("server log: {l}");
    }
}

fn per(total: f64, n: usize) -> f64 {
    if n > 0 { total / n as f64 } else { 0.0 }
}
