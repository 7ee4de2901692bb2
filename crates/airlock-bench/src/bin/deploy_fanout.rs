//! Deploy fan-out benchmark (issue 14): one release deployed to every connected appliance of an
//! environment by one rollout at full concurrency, timed until every appliance has answered
//! its deploy instruction and the control plane has acknowledged each answer.
//!
//! One real `airlock server` (a child process) and N simulated appliances (`fleet`: each its
//! own key, join and mutual-TLS gateway stream), spread over `--processes` bench processes as
//! the fleet benchmark does (each process holds at most ~9,000 sockets of its 20,000 open
//! files). A release key is registered and, each round, a new signed release version pushed;
//! then, timed: `POST /v1/workspaces/{w}/rollouts` with `concurrency = N` until every
//! appliance has received its deploy `OperationInstruction` and had its answer acknowledged.
//! Each simulated appliance answers as a real one with no approval does: `AWAITING_APPROVAL`
//! with refusal code `AWAITING_AUTHORITY`. Everything is on loopback; every wait is bounded.
//!
//! Workers take commands on stdin (`connect`, `arm`, `wait <n> <deadline µs>`, `exit`) and
//! answer with one JSON line each.
// The summary and the worker protocol go to stdout; diagnostics go to stderr.
#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use airlock_bench::fleet::{self, EnrolCtx, Hold, Live};
use airlock_bench::worker::{Worker, emit};
use airlock_bench::{procfs, server, unix_us};
use airlock_core::Fingerprint;
use airlock_core::customer_key::CustomerSigningKey;
use airlock_core::release::{ReleaseStatement, sign_release};
use airlock_proto::gateway::{
    AckCode, ApplianceMessage, OperationAckKind, OperationOutcome, OperationResult, RefusalCode, appliance_message,
    control_message,
};
use anyhow::{Context, bail};
use clap::Parser;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::task::JoinSet;

/// Bounds on every phase.
const ENROL_LIMIT: Duration = Duration::from_secs(3600);
const CONNECT_LIMIT: Duration = Duration::from_secs(1800);
/// How long one round may take before it is reported as incomplete.
const ROUND_LIMIT: Duration = Duration::from_secs(600);

#[derive(Parser, Debug)]
#[command(name = "deploy_fanout", about = "Deploy fan-out to N connected appliances (issue 14), on loopback.")]
struct Args {
    /// Simulated appliances in total.
    #[arg(long, default_value_t = 10_000)]
    appliances: usize,
    /// Bench processes to spread the appliances over (one holds at most ~9,000 safely).
    #[arg(long, default_value_t = 2)]
    processes: usize,
    /// Rollouts, each of a new release version.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// The rollout's concurrency [default: every appliance at once].
    #[arg(long)]
    concurrency: Option<u32>,
    /// The `airlock` binary [default: `airlock` next to this binary].
    #[arg(long)]
    airlock_bin: Option<PathBuf>,
    /// Joins in flight at once (over all processes).
    #[arg(long, default_value_t = 32)]
    join_concurrency: usize,
    /// Gateway dials in flight at once (over all processes).
    #[arg(long, default_value_t = 128)]
    connect_concurrency: usize,
    /// Also write the summary as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Keep a copy of the server's log (stderr) here.
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
    #[arg(long, hide = true)]
    count: Option<usize>,
}

/// The admin token reaches workers through the environment, not the command line.
const ADMIN_TOKEN_ENV: &str = "AIRLOCK_BENCH_ADMIN_TOKEN";

/// What the appliances of one process saw in a round.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct RoundReport {
    /// Deploy instructions of operations not seen before (this round's).
    received: u64,
    /// Instructions of operations seen before, sent again.
    received_again: u64,
    /// Answers to this round's instructions the control plane acknowledged `STORED`.
    acked: u64,
    /// Answers it acknowledged otherwise (refused, retry).
    not_stored: u64,
    first_received_us: u64,
    first_acked_us: u64,
    last_acked_us: u64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
enum WorkerReport {
    Enrolled { ok: usize, failed: usize, errors: Vec<String> },
    Connected { ok: usize, failed: usize, errors: Vec<String> },
    Armed,
    Round(RoundReport),
}

/// Counters shared by the responders of one process, reset at `arm`.
#[derive(Default)]
struct Tally {
    received: AtomicU64,
    received_again: AtomicU64,
    acked: AtomicU64,
    not_stored: AtomicU64,
    first_received_us: AtomicU64,
    first_acked_us: AtomicU64,
    last_acked_us: AtomicU64,
}

impl Tally {
    fn reset(&self) {
        for c in [
            &self.received,
            &self.received_again,
            &self.acked,
            &self.not_stored,
            &self.first_received_us,
            &self.first_acked_us,
            &self.last_acked_us,
        ] {
            c.store(0, Ordering::SeqCst);
        }
    }

    fn report(&self) -> RoundReport {
        RoundReport {
            received: self.received.load(Ordering::SeqCst),
            received_again: self.received_again.load(Ordering::SeqCst),
            acked: self.acked.load(Ordering::SeqCst),
            not_stored: self.not_stored.load(Ordering::SeqCst),
            first_received_us: self.first_received_us.load(Ordering::SeqCst),
            first_acked_us: self.first_acked_us.load(Ordering::SeqCst),
            last_acked_us: self.last_acked_us.load(Ordering::SeqCst),
        }
    }
}

/// Records `now` as the first time of something, unless one is recorded.
fn first(at: &AtomicU64, now: u64) {
    let _ = at.compare_exchange(0, now, Ordering::SeqCst, Ordering::SeqCst);
}

/// One appliance answering deploy instructions as a real one without approval does, until its
/// stream ends (or the task is aborted at teardown). An operation it has not seen before is
/// this round's deploy: its acknowledged answer is what a round waits for. Instructions sent
/// again (of earlier rounds' deploys, still awaiting approval) are answered too, and counted.
async fn respond(live: Live, tally: Arc<Tally>) {
    let Live::Session { _client, tx, mut inbound, .. } = live else { return };
    let mut seen = std::collections::HashSet::new();
    let mut fresh = std::collections::HashSet::new();
    while let Ok(Some(msg)) = inbound.message().await {
        match msg.body {
            Some(control_message::Body::Operation(instruction)) => {
                if seen.insert(instruction.request_id.clone()) {
                    first(&tally.first_received_us, unix_us());
                    tally.received.fetch_add(1, Ordering::SeqCst);
                    fresh.insert(instruction.request_id.clone());
                } else {
                    tally.received_again.fetch_add(1, Ordering::SeqCst);
                }
                let answer = ApplianceMessage {
                    body: Some(appliance_message::Body::OperationResult(OperationResult {
                        request_id: instruction.request_id,
                        outcome: OperationOutcome::AwaitingApproval as i32,
                        reason: "no approval for this deploy yet".to_owned(),
                        refusal_code: RefusalCode::AwaitingAuthority as i32,
                        ..Default::default()
                    })),
                };
                if tx.send(answer).await.is_err() {
                    return;
                }
            }
            Some(control_message::Body::OperationAck(ack)) if ack.kind == OperationAckKind::Result as i32 => {
                if ack.code != AckCode::Stored as i32 {
                    tally.not_stored.fetch_add(1, Ordering::SeqCst);
                } else if fresh.remove(&ack.request_id) {
                    let now = unix_us();
                    first(&tally.first_acked_us, now);
                    tally.last_acked_us.fetch_max(now, Ordering::SeqCst);
                    tally.acked.fetch_add(1, Ordering::SeqCst);
                }
            }
            _ => {}
        }
    }
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

/// Raises this process's open-files soft limit to the hard one if `needed` does not fit.
fn ensure_open_files(needed: usize) -> anyhow::Result<()> {
    let Some((soft, hard)) = procfs::open_files_limit() else { return Ok(()) };
    let parse = |s: &str| if s == "unlimited" { usize::MAX } else { s.parse().unwrap_or(0) };
    if parse(&soft) >= needed {
        return Ok(());
    }
    let status = std::process::Command::new("prlimit")
        .args(["--pid", &std::process::id().to_string(), &format!("--nofile={hard}:{hard}")])
        .status()
        .context("running prlimit")?;
    anyhow::ensure!(
        status.success() && parse(&hard) >= needed,
        "{needed} open files needed, limit {soft}/{hard}: use more --processes"
    );
    Ok(())
}

/// This process's share of appliances: joined, connected, each answering on its own task.
struct Fleet {
    enrolled: Option<Vec<fleet::Enrolled>>,
    responders: JoinSet<()>,
    tally: Arc<Tally>,
}

impl Fleet {
    async fn enrol(ctx: Arc<EnrolCtx>, count: usize, concurrency: usize) -> (Self, WorkerReport) {
        let (enrolled, r) = fleet::enrol_many(ctx, count, concurrency).await;
        let report = WorkerReport::Enrolled { ok: r.ok, failed: r.failed, errors: r.errors };
        (Self { enrolled: Some(enrolled), responders: JoinSet::new(), tally: Arc::default() }, report)
    }

    async fn connect(&mut self, concurrency: usize) -> WorkerReport {
        let enrolled = self.enrolled.take().unwrap_or_default();
        let (lives, r) = fleet::connect_many(enrolled, concurrency, Hold::Session).await;
        for live in lives {
            self.responders.spawn(respond(live, self.tally.clone()));
        }
        WorkerReport::Connected { ok: r.ok, failed: r.failed, errors: r.errors }
    }

    /// Waits until `n` answers were acknowledged since the last `arm`, or `deadline_us`.
    async fn wait(&self, n: u64, deadline_us: u64) -> RoundReport {
        while self.tally.acked.load(Ordering::SeqCst) < n && unix_us() < deadline_us {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        self.tally.report()
    }
}

// ---------------------------------------------------------------- worker mode

async fn worker(args: Args) -> anyhow::Result<bool> {
    let api_url = args.api_url.context("--worker needs --api-url")?;
    let pin: Fingerprint = args.ca_fingerprint.context("--worker needs --ca-fingerprint")?.parse()?;
    let environment = args.environment.context("--worker needs --environment")?;
    let count = args.count.context("--worker needs --count")?;
    let token = std::env::var(ADMIN_TOKEN_ENV).with_context(|| format!("--worker needs {ADMIN_TOKEN_ENV}"))?;
    ensure_open_files(count + 200)?;
    let ctx = Arc::new(EnrolCtx::new(&api_url, pin, &token, &environment, false)?);
    let (mut fleet, report) = Fleet::enrol(ctx, count, args.join_concurrency).await;
    emit(&report)?;
    // Commands on a plain thread (tokio's stdin needs a feature the workspace does not enable).
    let (cmd_tx, mut commands) = tokio::sync::mpsc::channel::<String>(4);
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            if cmd_tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    // Bounded: the main process sends `exit` or closes stdin.
    while let Some(line) = commands.recv().await {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("connect") => emit(&fleet.connect(args.connect_concurrency).await)?,
            Some("arm") => {
                fleet.tally.reset();
                emit(&WorkerReport::Armed)?;
            }
            Some("wait") => {
                let mut num = || words.next().and_then(|w| w.parse::<u64>().ok()).context("wait <n> <deadline µs>");
                let (n, deadline) = (num()?, num()?);
                emit(&WorkerReport::Round(fleet.wait(n, deadline).await))?;
            }
            Some("exit") | None => break,
            Some(other) => bail!("unknown worker command {other:?}"),
        }
    }
    fleet.responders.abort_all();
    Ok(true)
}

/// Starts a worker process for `count` of the appliances.
fn spawn_worker(
    args: &Args,
    api_url: &str,
    pin: &str,
    environment: &str,
    token: &str,
    count: usize,
) -> anyhow::Result<Worker> {
    let exe = std::env::current_exe().context("locating this binary")?;
    let per = |total: usize| (total / args.processes).max(1).to_string();
    let mut cmd = tokio::process::Command::new(exe);
    cmd.args(["--worker", "--api-url", api_url, "--ca-fingerprint", pin, "--environment", environment])
        .args(["--count", &count.to_string()])
        .args(["--join-concurrency", &per(args.join_concurrency)])
        .args(["--connect-concurrency", &per(args.connect_concurrency)])
        .env(ADMIN_TOKEN_ENV, token);
    Worker::spawn(cmd)
}

// ---------------------------------------------------------------- main process

#[derive(Debug, Serialize)]
struct Round {
    version: String,
    /// From sending the rollout request to its response (the API runs the first round).
    api_s: f64,
    /// From sending the rollout request to the first instruction received.
    first_received_s: f64,
    /// … to the first answer acknowledged.
    first_acked_s: f64,
    /// … to the last answer acknowledged: the goal's figure.
    all_acked_s: f64,
    received: u64,
    received_again: u64,
    acked: u64,
    not_stored: u64,
    server_cpu_s: f64,
    server_rss_growth_mib: f64,
}

#[derive(Debug, Serialize)]
struct Summary {
    appliances: usize,
    processes: usize,
    cores: usize,
    joined: usize,
    connected: usize,
    concurrency: u32,
    server_rss_connected_mib: f64,
    rounds: Vec<Round>,
}

async fn api(http: &reqwest::Client, url: String, token: &str, body: Value) -> anyhow::Result<Value> {
    let resp = http.post(&url).bearer_auth(token).json(&body).send().await.with_context(|| format!("POST {url}"))?;
    let status = resp.status();
    let text = resp.text().await?;
    anyhow::ensure!(status.is_success(), "POST {url}: HTTP {status}: {}", text.chars().take(400).collect::<String>());
    Ok(serde_json::from_str(&text)?)
}

/// A small release whose only service runs a system binary: nothing to fetch, so no artifacts.
fn signed_release(key: &CustomerSigningKey, version: &str) -> anyhow::Result<Value> {
    let manifest = format!(
        "name = \"fanout\"\nversion = \"{version}\"\n\n[[service]]\nname = \"idle\"\ncommand = \"/bin/sleep\"\nargs = [\"infinity\"]\n"
    );
    let statement = ReleaseStatement::new(&manifest, Vec::new()).context("release statement")?;
    Ok(serde_json::from_str(&sign_release(&statement, key).to_json())?)
}

fn shares(n: usize, k: usize) -> Vec<usize> {
    (0..k).map(|i| n / k + usize::from(i < n % k)).collect()
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn secs_since(t0_us: u64, at_us: u64) -> f64 {
    if at_us == 0 { f64::NAN } else { at_us.saturating_sub(t0_us) as f64 / 1e6 }
}

async fn run(args: Args) -> anyhow::Result<bool> {
    anyhow::ensure!(args.appliances > 0, "--appliances must be at least 1");
    anyhow::ensure!((1..=args.appliances).contains(&args.processes), "--processes must be between 1 and --appliances");
    let shares = shares(args.appliances, args.processes);
    // Our share of sockets plus the server's (a child inherits our limit).
    ensure_open_files(shares[0].max(args.appliances) + 200)?;
    let airlock_bin = match &args.airlock_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.parent().context("binary has no directory")?.join("airlock"),
    };
    anyhow::ensure!(airlock_bin.is_file(), "{} not found: pass --airlock-bin", airlock_bin.display());
    let tmp = tempfile::Builder::new().prefix("airlock-fanout-").tempdir()?;
    let data_dir = tmp.path().join("data");
    let init = server::init(&airlock_bin, &data_dir)?;
    let mut srv = server::ServerProc::spawn(&airlock_bin, &data_dir)?;
    let res = run_with_server(&args, &shares, &init, &mut srv).await;
    srv.stop(Duration::from_secs(15)).await?;
    if let Some(dest) = &args.server_log
        && let Err(e) = std::fs::copy(&srv.log_file, dest)
    {
        eprintln!("warning: cannot copy the server log to {}: {e}", dest.display());
    }
    let summary = match res {
        Ok(s) => s,
        Err(e) => {
            for l in server::summarize_log(&srv.log_file).samples {
                eprintln!("  server: {l}");
            }
            return Err(e);
        }
    };
    println!("{}", serde_json::to_string_pretty(&summary)?);
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_vec_pretty(&summary)?)?;
    }
    let complete = summary.connected == args.appliances
        && summary.rounds.iter().all(|r| r.acked == args.appliances as u64 && r.not_stored == 0);
    Ok(complete)
}

async fn run_with_server(
    args: &Args,
    shares: &[usize],
    init: &server::InitOutput,
    srv: &mut server::ServerProc,
) -> anyhow::Result<Summary> {
    let ready = srv.wait_ready(Duration::from_secs(60)).await?;
    let pid = srv.pid();
    let pin: Fingerprint = ready.ca_fingerprint.parse()?;
    let api_url = ready.api_url.trim_end_matches('/').to_owned();
    let ws = &init.workspace;
    let token = &init.admin_token;
    let http = fleet::http_client(pin)?;
    let env =
        api(&http, format!("{api_url}/v1/workspaces/{ws}/environments"), token, json!({ "name": "fanout" })).await?;
    let environment = env["id"].as_str().context("environment response has no id")?.to_owned();
    let mut seed = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
        .map_err(|_| anyhow::anyhow!("no randomness for the release key"))?;
    let key = CustomerSigningKey::from_seed(seed);
    let pem = key.public().to_pem().context("release key")?;
    api(&http, format!("{api_url}/v1/workspaces/{ws}/release-keys"), token, json!({ "public_key_pem": pem })).await?;

    // ---- join and connect, every process at once
    let mut workers = Vec::new();
    for &count in &shares[1..] {
        workers.push(spawn_worker(args, &api_url, &ready.ca_fingerprint, &environment, token, count)?);
    }
    let ctx = Arc::new(EnrolCtx::new(&api_url, pin, token, &environment, false)?);
    let (mut local, local_report) = Fleet::enrol(ctx, shares[0], args.join_concurrency / args.processes).await;
    let mut joined = 0;
    let mut reports = vec![local_report];
    for w in &mut workers {
        reports.push(w.report(ENROL_LIMIT).await?);
    }
    for r in reports {
        let WorkerReport::Enrolled { ok, failed, errors } = r else { bail!("expected an enrol report, got {r:?}") };
        joined += ok;
        if failed > 0 {
            eprintln!("{failed} joins failed: {errors:?}");
        }
    }
    eprintln!("{joined} appliances joined");
    for w in &mut workers {
        w.send("connect").await?;
    }
    let mut reports = vec![local.connect(args.connect_concurrency / args.processes).await];
    for w in &mut workers {
        reports.push(w.report(CONNECT_LIMIT).await?);
    }
    let mut connected = 0;
    for r in reports {
        let WorkerReport::Connected { ok, failed, errors } = r else { bail!("expected a connect report, got {r:?}") };
        connected += ok;
        if failed > 0 {
            eprintln!("{failed} connects failed: {errors:?}");
        }
    }
    eprintln!("{connected} appliances connected");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_connected = procfs::status_kib(pid, "VmRSS")?;
    let concurrency = args.concurrency.unwrap_or(u32::try_from(connected).unwrap_or(u32::MAX)).max(1);

    // ---- rounds
    let mut rounds = Vec::new();
    for round in 1..=args.rounds {
        let version = format!("1.0.{round}");
        let envelope = signed_release(&key, &version)?;
        api(&http, format!("{api_url}/v1/workspaces/{ws}/releases"), token, json!({ "envelope": envelope })).await?;
        local.tally.reset();
        for w in &mut workers {
            w.send("arm").await?;
        }
        for w in &mut workers {
            let r = w.report(Duration::from_secs(30)).await?;
            anyhow::ensure!(matches!(r, WorkerReport::Armed), "expected armed, got {r:?}");
        }
        let (cpu0, rss0) = (procfs::cpu_seconds(pid)?, procfs::status_kib(pid, "VmRSS")?);
        let deadline = unix_us() + u64::try_from(ROUND_LIMIT.as_micros()).unwrap_or(u64::MAX);
        for (w, &n) in workers.iter_mut().zip(&shares[1..]) {
            w.send(&format!("wait {n} {deadline}")).await?;
        }
        let t0 = unix_us();
        let body = json!({
            "release": format!("fanout@{version}"), "environments": [environment],
            "concurrency": concurrency, "max_failures": args.appliances, "reason": format!("fan-out round {round}"),
        });
        api(&http, format!("{api_url}/v1/workspaces/{ws}/rollouts"), token, body).await?;
        let api_s = secs_since(t0, unix_us());
        let mut all = vec![local.wait(shares[0] as u64, deadline).await];
        for w in &mut workers {
            match w.report(ROUND_LIMIT + Duration::from_secs(30)).await? {
                WorkerReport::Round(r) => all.push(r),
                other => bail!("expected a round report, got {other:?}"),
            }
        }
        let (cpu1, rss1) = (procfs::cpu_seconds(pid)?, procfs::status_kib(pid, "VmRSS")?);
        let min_nonzero = |f: fn(&RoundReport) -> u64| all.iter().map(f).filter(|v| *v > 0).min().unwrap_or(0);
        let r = Round {
            version,
            api_s,
            first_received_s: secs_since(t0, min_nonzero(|r| r.first_received_us)),
            first_acked_s: secs_since(t0, min_nonzero(|r| r.first_acked_us)),
            all_acked_s: secs_since(t0, all.iter().map(|r| r.last_acked_us).max().unwrap_or(0)),
            received: all.iter().map(|r| r.received).sum(),
            received_again: all.iter().map(|r| r.received_again).sum(),
            acked: all.iter().map(|r| r.acked).sum(),
            not_stored: all.iter().map(|r| r.not_stored).sum(),
            server_cpu_s: cpu1 - cpu0,
            server_rss_growth_mib: mib(rss1) - mib(rss0),
        };
        eprintln!(
            "round {round}: {} of {connected} acknowledged, all in {:.3} s (first {:.3} s; API answered in {:.3} s); {} sent again; server CPU {:.2} s, RSS {:+.1} MiB",
            r.acked, r.all_acked_s, r.first_acked_s, r.api_s, r.received_again, r.server_cpu_s, r.server_rss_growth_mib
        );
        rounds.push(r);
    }
    for w in &mut workers {
        let _ = w.send("exit").await;
    }
    local.responders.abort_all();
    Ok(Summary {
        appliances: args.appliances,
        processes: args.processes,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        joined,
        connected,
        concurrency,
        server_rss_connected_mib: mib(rss_connected),
        rounds,
    })
}
