//! Release fan-out benchmark (issue 14): one release with one large artifact (50 MiB by default,
//! random bytes) rolled out to N simulated appliances (1,000 by default) on loopback.
//!
//! Setup, untimed: `airlock server` in a process of its own; N appliances join one environment
//! and hold their mutual-TLS gateway streams (the fleet library); `airlock customer keygen`,
//! `airlock release key add` and `airlock release push` (which `PUT`s the artifact, then `POST`s
//! the signed release) through the real CLI.
//!
//! Timed: `POST /v1/workspaces/{w}/rollouts` with `concurrency = N`; each appliance, on its
//! deploy `OperationInstruction`, verifies the release envelope with the relayed keys
//! (`airlock_core::release::verify_release`), fetches every artifact the release names over its
//! own gateway connection (`FetchArtifact`), checks sizes and SHA-256, and counts as installed.
//! Fetches go either through the appliance's own `ArtifactFetcher` into a per-appliance
//! directory (`--store disk`), or, when N copies do not fit on disk, through the same RPC with
//! the same checks, hashing and discarding the bytes (`--store discard`).
//!
//! Reported: time to the first and the last instruction and install, the server's CPU seconds
//! (utime + stime of its process over the window) per GiB served, its peak RSS during the window,
//! bytes served. Every wait is bounded by `--timeout-seconds`; temporary files are deleted.
// The summary goes to stdout; diagnostics go to stderr.
#![allow(clippy::print_stdout)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use airlock_appliance::artifacts::ArtifactFetcher;
use airlock_bench::fleet::{self, EnrolCtx, Hold, Live};
use airlock_bench::{procfs, server, unix_us};
use airlock_core::Fingerprint;
use airlock_core::customer_key::CustomerPublicKey;
use airlock_core::dsse::Envelope;
use airlock_core::release::{Artifact, verify_release};
use airlock_proto::gateway::appliance_gateway_client::ApplianceGatewayClient;
use airlock_proto::gateway::{ControlMessage, FetchArtifactRequest, control_message};
use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use serde::Serialize;
use tokio::task::JoinSet;
use tonic::transport::Channel;

/// The server's rollout limit (`concurrency must be between 1 and 1000`).
const MAX_ROLLOUT_CONCURRENCY: usize = 1000;
/// Free space kept beyond N copies of the artifact before `--store auto` writes them to disk.
const DISK_MARGIN: u64 = 4 * 1024 * 1024 * 1024;
/// Client timeout for the artifact's `PUT` and the rollout's `POST` (the server's deadline is the same).
const SLOW_REQUEST_TIMEOUT: Duration = Duration::from_secs(600);
/// How often the server's RSS is sampled during the window.
const RSS_SAMPLE_EVERY: Duration = Duration::from_millis(100);

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
enum Store {
    /// `disk` if N copies of the artifact (plus 4 GiB) fit on the temp filesystem, else `discard`.
    Auto,
    /// The appliance's `ArtifactFetcher`: resumable, fsynced blob per appliance (deleted after).
    Disk,
    /// The same RPC and checks (offsets, size, SHA-256), bytes hashed and dropped.
    Discard,
}

#[derive(Parser, Debug)]
#[command(name = "release_fanout", about = "One large release rolled out to N simulated appliances, on loopback.")]
struct Args {
    /// Simulated appliances (at most 1,000: the rollout's concurrency limit).
    #[arg(long, default_value_t = 1000)]
    appliances: usize,
    /// Size of the release's one artifact, MiB (random bytes).
    #[arg(long, default_value_t = 50)]
    size_mib: u64,
    /// Where each appliance puts what it fetched.
    #[arg(long, value_enum, default_value_t = Store::Auto)]
    store: Store,
    /// The `airlock` binary [default: `airlock` next to this binary; run `cargo build --release -p airlock` first].
    #[arg(long)]
    airlock_bin: Option<PathBuf>,
    /// Joins in flight at once.
    #[arg(long, default_value_t = 32)]
    join_concurrency: usize,
    /// Gateway dials in flight at once.
    #[arg(long, default_value_t = 128)]
    connect_concurrency: usize,
    /// Upper bound on the timed window (rollout start to the last install), seconds.
    #[arg(long, default_value_t = 1800)]
    timeout_seconds: u64,
    /// Also write the summary as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Debug, Default, Serialize)]
struct Summary {
    appliances: usize,
    artifact_bytes: u64,
    store: Option<Store>,
    cores: usize,
    join_s: f64,
    connect_s: f64,
    /// `PUT` of the artifact, seconds.
    upload_s: f64,
    /// `airlock release push` of the release once its artifact is held (sign, check, `POST`), seconds.
    push_s: f64,
    instructed: usize,
    installed: usize,
    failed: usize,
    first_instruction_s: Option<f64>,
    all_instructed_s: Option<f64>,
    first_installed_s: Option<f64>,
    all_installed_s: Option<f64>,
    /// Instruction received to installed (verify, fetch, check), per appliance: median, 90th, max, seconds.
    install_p50_s: f64,
    install_p90_s: f64,
    install_max_s: f64,
    /// Artifact bytes the appliances received and checked.
    bytes_served: u64,
    server_cpu_s: f64,
    server_cpu_s_per_gib: f64,
    /// Throughput over the whole window, MiB/s.
    mib_per_s: f64,
    server_rss_before_kib: u64,
    server_rss_peak_kib: u64,
    /// CPU seconds this bench process (all simulated appliances) used over the window.
    bench_cpu_s: f64,
    /// CPU seconds the whole machine was busy over the window (all processes, all cores).
    machine_busy_s: f64,
    errors: Vec<String>,
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
    let res = runtime.block_on(run(args));
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

async fn run(args: Args) -> anyhow::Result<bool> {
    anyhow::ensure!(
        (1..=MAX_ROLLOUT_CONCURRENCY).contains(&args.appliances),
        "--appliances must be between 1 and {MAX_ROLLOUT_CONCURRENCY} (one rollout, all at once)"
    );
    anyhow::ensure!(args.size_mib > 0, "--size-mib must be at least 1");
    if let Some((soft, _)) = procfs::open_files_limit()
        && soft.parse::<usize>().is_ok_and(|s| s < args.appliances + 200)
    {
        bail!("this needs about {} open files but the limit is {soft}; raise it (`ulimit -n`)", args.appliances + 200);
    }
    let airlock_bin = match &args.airlock_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.parent().context("binary has no directory")?.join("airlock"),
    };
    anyhow::ensure!(
        airlock_bin.is_file(),
        "{} not found: run `cargo build --release -p airlock` first, or pass --airlock-bin",
        airlock_bin.display()
    );
    let tmp = tempfile::Builder::new().prefix("airlock-release-fanout-").tempdir()?;
    let size = args.size_mib * 1024 * 1024;
    let store = match args.store {
        Store::Auto => {
            let free = free_bytes(tmp.path())?;
            let needed = size.saturating_mul(args.appliances as u64).saturating_add(DISK_MARGIN);
            if free >= needed { Store::Disk } else { Store::Discard }
        }
        s => s,
    };
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    eprintln!(
        "release_fanout: {} appliances, {} MiB artifact, store {store:?}, {cores} cores, server {}",
        args.appliances,
        args.size_mib,
        airlock_bin.display()
    );
    let data_dir = tmp.path().join("data");
    let init = server::init(&airlock_bin, &data_dir)?;
    // Uploads to the API run at only a few MiB/s here (see BENCHMARKS.md): the default 30 s
    // request deadline would cut a 50 MiB `PUT`.
    let mut srv = server::ServerProc::spawn_with(&airlock_bin, &data_dir, &["--api-request-timeout", "600s"])?;
    let res = run_with_server(&args, store, size, cores, &airlock_bin, tmp.path(), &init, &mut srv).await;
    let _ = srv.stop(Duration::from_secs(15)).await;
    let log = server::summarize_log(&srv.log_file);
    let summary = match res {
        Ok(s) => s,
        Err(e) => {
            for l in &log.samples {
                eprintln!("  server: {l}");
            }
            return Err(e);
        }
    };
    print_summary(&summary);
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_vec_pretty(&summary)?)
            .with_context(|| format!("writing {}", out.display()))?;
        eprintln!("wrote {}", out.display());
    }
    Ok(summary.installed == args.appliances)
}

#[allow(clippy::too_many_arguments)]
async fn run_with_server(
    args: &Args,
    store: Store,
    size: u64,
    cores: usize,
    airlock_bin: &Path,
    tmp: &Path,
    init: &server::InitOutput,
    srv: &mut server::ServerProc,
) -> anyhow::Result<Summary> {
    let ready = srv.wait_ready(Duration::from_secs(60)).await?;
    anyhow::ensure!(ready.pid == srv.pid(), "ready file names pid {}, we started {}", ready.pid, srv.pid());
    let pid = srv.pid();
    let pin: Fingerprint = ready.ca_fingerprint.parse()?;
    let api_url = ready.api_url.trim_end_matches('/').to_owned();
    let http = fleet::http_client(pin)?;
    // The rollout's `POST` requests every target's deploy before it answers (about 0.1 s each
    // here), past the fleet client's 60 s timeout at 1,000 targets; and the artifact's `PUT`.
    let slow_http = reqwest::Client::builder()
        .use_preconfigured_tls(airlock_proto::tls::pinned_client_config(pin))
        .timeout(SLOW_REQUEST_TIMEOUT)
        .build()
        .context("building HTTP client")?;
    let env = post_json(
        &http,
        &format!("{api_url}/v1/workspaces/{}/environments", init.workspace),
        &init.admin_token,
        &serde_json::json!({ "name": "bench" }),
    )
    .await
    .context("creating environment")?;
    let environment = env["id"].as_str().context("environment response has no id")?.to_owned();

    let mut summary =
        Summary { appliances: args.appliances, artifact_bytes: size, store: Some(store), cores, ..Summary::default() };
    let ctx = Arc::new(EnrolCtx::new(&api_url, pin, &init.admin_token, &environment, false)?);
    let t = Instant::now();
    let (enrolled, joined) = fleet::enrol_many(ctx, args.appliances, args.join_concurrency).await;
    anyhow::ensure!(joined.failed == 0, "{} joins failed: {:?}", joined.failed, joined.errors);
    summary.join_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let (lives, connected) = fleet::connect_many(enrolled, args.connect_concurrency, Hold::Session).await;
    anyhow::ensure!(connected.failed == 0, "{} connects failed: {:?}", connected.failed, connected.errors);
    summary.connect_s = t.elapsed().as_secs_f64();
    eprintln!("{} appliances joined in {:.1}s, connected in {:.1}s", lives.len(), summary.join_s, summary.connect_s);

    // The release, through the real CLI: a vendor key registered, the artifact uploaded, the
    // statement signed and posted.
    let cli = |cli_args: &[&str]| -> anyhow::Result<String> {
        let out = server::clean_command(airlock_bin)
            .args(cli_args)
            .env("AIRLOCK_URL", &api_url)
            .env("AIRLOCK_TOKEN", &init.admin_token)
            .env("AIRLOCK_CA_FINGERPRINT", &ready.ca_fingerprint)
            .env("NO_COLOR", "1")
            .stdin(std::process::Stdio::null())
            .output()
            .with_context(|| format!("running airlock {}", cli_args.join(" ")))?;
        if !out.status.success() {
            bail!("airlock {} failed: {}", cli_args.join(" "), String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let vendor = tmp.join("vendor");
    cli(&["customer", "keygen", "--out", path_str(&vendor)?])?;
    cli(&["release", "key", "add", path_str(&vendor.join("customer.pub"))?])?;
    let release_dir = tmp.join("release");
    std::fs::create_dir_all(release_dir.join("bin"))?;
    std::fs::write(
        release_dir.join("airlock.toml"),
        "name = \"bench\"\nversion = \"1.0.0\"\n\n[[service]]\nname = \"app\"\ncommand = \"bin/app\"\n",
    )?;
    let blob = random_bytes(size)?;
    let sha256 = hex(ring::digest::digest(&ring::digest::SHA256, &blob).as_ref());
    std::fs::write(release_dir.join("bin/app"), &blob)?;
    let t = Instant::now();
    // The artifact goes up in a `PUT` of its own, so upload and push are timed apart; the push
    // then finds it held and only signs and posts the release.
    let put = slow_http
        .put(format!("{api_url}/v1/workspaces/{}/artifacts/{sha256}", init.workspace))
        .bearer_auth(&init.admin_token)
        .header("content-type", "application/octet-stream")
        .body(blob)
        .send()
        .await
        .context("uploading the artifact")?;
    let status = put.status();
    anyhow::ensure!(
        status.is_success(),
        "uploading the artifact: HTTP {status}: {}",
        put.text().await.unwrap_or_default()
    );
    summary.upload_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    cli(&["release", "push", path_str(&release_dir)?, "--key", path_str(&vendor.join("customer.key"))?])?;
    summary.push_s = t.elapsed().as_secs_f64();
    // The pushed copy is no longer needed; the server holds its own.
    std::fs::remove_dir_all(&release_dir)?;
    eprintln!("artifact uploaded in {:.1}s, release pushed in {:.1}s", summary.upload_s, summary.push_s);

    // Every appliance waits for its instruction before the rollout starts.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout_seconds);
    let blobs_root = tmp.join("appliances");
    std::fs::create_dir_all(&blobs_root)?;
    let bytes = Arc::new(AtomicU64::new(0));
    let mut set = JoinSet::new();
    for (i, live) in lives.into_iter().enumerate() {
        let fetcher = match store {
            Store::Disk => Some(ArtifactFetcher::new(&blobs_root.join(i.to_string()))?),
            _ => None,
        };
        let bytes = bytes.clone();
        set.spawn(async move {
            let mut live = live;
            let res = tokio::time::timeout_at(deadline, appliance(&mut live, fetcher, &bytes)).await;
            // Keeps the stream up until the result is in, so no reconnect muddies the window.
            drop(live);
            match res {
                Ok(r) => r,
                Err(_) => Err(Failure { instructed_unix_us: None, error: "timed out".into() }),
            }
        });
    }

    let rss_before = procfs::status_kib(pid, "VmRSS")?;
    let rss_peak = Arc::new(AtomicU64::new(rss_before));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (rss_peak, sampling) = (rss_peak.clone(), sampling.clone());
        tokio::spawn(async move {
            while sampling.load(Ordering::Relaxed) && tokio::time::Instant::now() < deadline {
                if let Ok(kib) = procfs::status_kib(pid, "VmRSS") {
                    rss_peak.fetch_max(kib, Ordering::Relaxed);
                }
                tokio::time::sleep(RSS_SAMPLE_EVERY).await;
            }
        })
    };
    let cpu_before = procfs::cpu_seconds(pid)?;
    let bench_before = procfs::self_cpu_seconds()?;
    let busy_before = procfs::machine_busy_seconds()?;
    let start = unix_us();
    let t0 = Instant::now();
    let rollout = post_json(
        &slow_http,
        &format!("{api_url}/v1/workspaces/{}/rollouts", init.workspace),
        &init.admin_token,
        &serde_json::json!({
            "release": "bench@1.0.0", "environments": [], "concurrency": args.appliances,
            "max_failures": args.appliances, "reason": "release fan-out benchmark",
        }),
    )
    .await
    .context("starting the rollout")?;
    eprintln!("rollout {} started in {:.2}s", rollout["id"].as_str().unwrap_or("?"), t0.elapsed().as_secs_f64());

    let mut instructed = Vec::new();
    let mut installed = Vec::new();
    let mut install_us = Vec::new();
    let mut errors = Vec::new();
    while let Some(res) = set.join_next().await {
        match res {
            Ok(Ok(done)) => {
                instructed.push(done.instructed_unix_us);
                installed.push(done.installed_unix_us);
                install_us.push(done.installed_unix_us.saturating_sub(done.instructed_unix_us));
            }
            Ok(Err(f)) => {
                summary.failed += 1;
                instructed.extend(f.instructed_unix_us);
                if errors.len() < 10 && !errors.contains(&f.error) {
                    errors.push(f.error);
                }
            }
            Err(e) => {
                summary.failed += 1;
                errors.push(e.to_string());
            }
        }
    }
    summary.server_cpu_s = procfs::cpu_seconds(pid)? - cpu_before;
    summary.bench_cpu_s = procfs::self_cpu_seconds()? - bench_before;
    summary.machine_busy_s = procfs::machine_busy_seconds()? - busy_before;
    let window_s = t0.elapsed().as_secs_f64();
    sampling.store(false, Ordering::Relaxed);
    let _ = sampler.await;
    summary.server_rss_before_kib = rss_before;
    summary.server_rss_peak_kib = rss_peak.load(Ordering::Relaxed);
    std::fs::remove_dir_all(&blobs_root)?;

    let since = |us: u64| us.saturating_sub(start) as f64 / 1e6;
    summary.instructed = instructed.len();
    summary.installed = installed.len();
    summary.first_instruction_s = instructed.iter().min().map(|&u| since(u));
    summary.all_instructed_s =
        (instructed.len() == args.appliances).then(|| instructed.iter().max().map(|&u| since(u))).flatten();
    summary.first_installed_s = installed.iter().min().map(|&u| since(u));
    summary.all_installed_s =
        (installed.len() == args.appliances).then(|| installed.iter().max().map(|&u| since(u))).flatten();
    let mut install = install_us;
    install.sort_unstable();
    let pct = |p: usize| install.get((install.len() * p / 100).min(install.len().saturating_sub(1)));
    summary.install_p50_s = pct(50).map_or(0.0, |&u| u as f64 / 1e6);
    summary.install_p90_s = pct(90).map_or(0.0, |&u| u as f64 / 1e6);
    summary.install_max_s = install.last().map_or(0.0, |&u| u as f64 / 1e6);
    summary.bytes_served = bytes.load(Ordering::Relaxed);
    let gib = summary.bytes_served as f64 / (1u64 << 30) as f64;
    summary.server_cpu_s_per_gib = if gib > 0.0 { summary.server_cpu_s / gib } else { 0.0 };
    summary.mib_per_s = summary.bytes_served as f64 / (1 << 20) as f64 / window_s.max(1e-9);
    summary.errors = errors;
    Ok(summary)
}

struct Installed {
    instructed_unix_us: u64,
    installed_unix_us: u64,
}

struct Failure {
    instructed_unix_us: Option<u64>,
    error: String,
}

/// One simulated appliance: waits for its deploy instruction, verifies the release, fetches and
/// checks every artifact. Bounded by the caller's deadline.
async fn appliance(live: &mut Live, fetcher: Option<ArtifactFetcher>, bytes: &AtomicU64) -> Result<Installed, Failure> {
    let Live::Session { channel, inbound, .. } = live else {
        return Err(Failure { instructed_unix_us: None, error: "not a session".into() });
    };
    let fail = |at: Option<u64>, e: String| Failure { instructed_unix_us: at, error: e };
    let instruction = loop {
        match inbound.message().await {
            Ok(Some(ControlMessage { body: Some(control_message::Body::Operation(op)) }))
                if !op.release_envelope_json.is_empty() =>
            {
                break op;
            }
            Ok(Some(_)) => {}
            Ok(None) => return Err(fail(None, "the control plane closed the stream".into())),
            Err(s) => return Err(fail(None, format!("stream error: {}: {}", s.code(), s.message()))),
        }
    };
    let at = unix_us();
    let envelope = Envelope::from_json(instruction.release_envelope_json.as_bytes())
        .map_err(|e| fail(Some(at), format!("release envelope malformed: {e}")))?;
    let keys: Vec<CustomerPublicKey> =
        instruction.release_key_pems.iter().filter_map(|pem| CustomerPublicKey::from_pem(pem).ok()).collect();
    let release =
        verify_release(&envelope, &keys).map_err(|e| fail(Some(at), format!("release does not verify: {e}")))?;
    let artifacts = &release.statement().artifacts;
    match fetcher {
        Some(f) => {
            f.fetch_all(channel, artifacts).await.map_err(|e| fail(Some(at), format!("fetch: {e}")))?;
            bytes.fetch_add(artifacts.iter().map(|a| a.size).sum(), Ordering::Relaxed);
        }
        None => {
            for a in artifacts {
                fetch_and_discard(channel, a, bytes).await.map_err(|e| fail(Some(at), format!("{e:#}")))?;
            }
        }
    }
    Ok(Installed { instructed_unix_us: at, installed_unix_us: unix_us() })
}

/// `FetchArtifact` from offset 0 with the fetcher's checks (contiguous offsets, the signed size,
/// the signed SHA-256), the bytes hashed and dropped instead of written.
async fn fetch_and_discard(channel: &Channel, artifact: &Artifact, bytes: &AtomicU64) -> anyhow::Result<()> {
    let mut client = ApplianceGatewayClient::new(channel.clone());
    let req = FetchArtifactRequest { sha256: artifact.sha256.clone(), offset: 0 };
    let mut stream = client
        .fetch_artifact(req)
        .await
        .map_err(|s| anyhow::anyhow!("FetchArtifact: {}: {}", s.code(), s.message()))?
        .into_inner();
    let mut hasher = ring::digest::Context::new(&ring::digest::SHA256);
    let mut at = 0u64;
    // Bounded: every chunk is non-empty and `at` never passes the signed size.
    while let Some(chunk) =
        stream.message().await.map_err(|s| anyhow::anyhow!("FetchArtifact: {}: {}", s.code(), s.message()))?
    {
        let len = chunk.data.len() as u64;
        if chunk.size != artifact.size || chunk.offset != at || len == 0 || at + len > artifact.size {
            bail!(
                "a chunk of {len} bytes at {} (size {}) when {at} of {} was expected",
                chunk.offset,
                chunk.size,
                artifact.size
            );
        }
        hasher.update(&chunk.data);
        at += len;
        bytes.fetch_add(len, Ordering::Relaxed);
    }
    if at != artifact.size {
        bail!("the stream ended at {at} of {} bytes", artifact.size);
    }
    let actual = hex(hasher.finish().as_ref());
    if actual != artifact.sha256 {
        bail!("artifact {} arrived with SHA-256 {actual}", artifact.sha256);
    }
    Ok(())
}

async fn post_json(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    body: &serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    let resp = http.post(url).bearer_auth(token).json(body).send().await?;
    let status = resp.status();
    let text = resp.text().await?;
    anyhow::ensure!(status.is_success(), "HTTP {status}: {}", text.chars().take(300).collect::<String>());
    Ok(serde_json::from_str(&text)?)
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str().with_context(|| format!("{} is not UTF-8", p.display()))
}

/// `size` random bytes from the OS RNG, so nothing along the way can compress them.
fn random_bytes(size: u64) -> anyhow::Result<Vec<u8>> {
    use ring::rand::SecureRandom;
    let mut buf = vec![0u8; usize::try_from(size).context("--size-mib too large")?];
    // `fill` takes at most a few hundred KiB at once on some platforms; 1 MiB pieces are safe.
    let rng = ring::rand::SystemRandom::new();
    for piece in buf.chunks_mut(1024 * 1024) {
        rng.fill(piece).map_err(|_| anyhow::anyhow!("the OS RNG failed"))?;
    }
    Ok(buf)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Free bytes on the filesystem holding `path`, from `df` (this crate has no libc).
fn free_bytes(path: &Path) -> anyhow::Result<u64> {
    let out = std::process::Command::new("df").args(["-Pk"]).arg(path).output().context("running df")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let kib: u64 = text
        .lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .context("unexpected df output")?;
    Ok(kib * 1024)
}

fn print_summary(s: &Summary) {
    let opt = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.2} s"));
    println!(
        "release fan-out: {} appliances, {} MiB artifact, store {:?}, {} cores",
        s.appliances,
        s.artifact_bytes >> 20,
        s.store.unwrap_or(Store::Auto),
        s.cores
    );
    println!(
        "  setup: join {:.1} s, connect {:.1} s, artifact PUT {:.2} s, release push {:.2} s",
        s.join_s, s.connect_s, s.upload_s, s.push_s
    );
    println!("  instructed {} (first {}, all {})", s.instructed, opt(s.first_instruction_s), opt(s.all_instructed_s));
    println!(
        "  installed {} / failed {} (first {}, all {})",
        s.installed,
        s.failed,
        opt(s.first_installed_s),
        opt(s.all_installed_s)
    );
    println!(
        "  instruction to installed: median {:.2} s, p90 {:.2} s, max {:.2} s",
        s.install_p50_s, s.install_p90_s, s.install_max_s
    );
    println!(
        "  served {:.2} GiB at {:.0} MiB/s; server CPU {:.1} s = {:.2} CPU s/GiB",
        s.bytes_served as f64 / (1u64 << 30) as f64,
        s.mib_per_s,
        s.server_cpu_s,
        s.server_cpu_s_per_gib
    );
    println!(
        "  server RSS {:.0} MiB before, peak {:.0} MiB; bench CPU {:.1} s; machine busy {:.1} CPU s",
        s.server_rss_before_kib as f64 / 1024.0,
        s.server_rss_peak_kib as f64 / 1024.0,
        s.bench_cpu_s,
        s.machine_busy_s
    );
    for e in &s.errors {
        println!("  error: {e}");
    }
}
