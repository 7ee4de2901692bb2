//! Release artifact transfer, in one run: a real control plane on loopback (`airlock_server::serve`:
//! TLS 1.3, the real router, store and gateway) holding one artifact (256 MiB by default), fetched
//! side by side in alternating rounds:
//!
//! (a) ours: `airlock_appliance::artifacts::ArtifactFetcher` over the gateway (mutual TLS, gRPC
//!     `FetchArtifact`, the appliance's own HTTP/2 settings), checking the SHA-256 and writing the
//!     blob (fsynced, renamed into place);
//! (b) curl: `curl -s --cacert … -H 'authorization: Bearer …' https://127.0.0.1:PORT/v1/workspaces/W/artifacts/SHA/bytes | sha256sum`,
//!     the vendor download of the same bytes, hashed and discarded.
//!
//! The median round of each counts. Goal: ours ≥ 1.2× curl's throughput.
//!
//! `cargo run --release -p airlock-bench --bin transfer [-- --size-mib 256 --rounds 5]`
#![allow(clippy::print_stdout)] // A benchmark reports on stdout.

use std::process::Command;
use std::time::{Duration, Instant};

use airlock_appliance::artifacts::{ArtifactFetcher, Gateway, dial_gateway_with};
use airlock_core::release::{Artifact, RelativePath, ReleaseStatement, sign_release};
use airlock_server::clock::SystemClock;
use airlock_server::keys::KekSource;
use anyhow::{Context, ensure};
use clap::Parser;
use serde_json::{Value, json};

#[derive(Parser, Debug)]
#[command(name = "transfer", about = "An artifact fetched over the gateway against curl over HTTPS, on loopback.")]
struct Args {
    /// The artifact's size in MiB.
    #[arg(long, default_value_t = 256)]
    size_mib: u64,
    /// Alternating rounds of each; the median counts.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(run(args))
}

fn noise(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn run(args: Args) -> anyhow::Result<()> {
    let size = args.size_mib * 1024 * 1024;
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let kek = KekSource::default_for(&data);
    let boot = airlock_server::init(&data, &kek, "airlock.test", "acme", "default", &SystemClock).await?;
    let mut cfg = airlock_server::ServerConfig::new(data.clone());
    cfg.api_listen = "127.0.0.1:0".parse()?;
    cfg.gateway_listen = "127.0.0.1:0".parse()?;
    cfg.hostnames = vec!["127.0.0.1".into()];
    cfg.max_artifact_bytes = size.max(1024 * 1024);
    cfg.limits.api_request_timeout = Duration::from_secs(600);
    let server = airlock_server::serve(cfg).await?;
    let token = boot.admin_token.expose().to_owned();
    let ws = boot.workspace.to_string();
    let base = format!("https://{}", server.api_addr);
    let http = reqwest::Client::builder()
        .use_preconfigured_tls(airlock_proto::tls::pinned_client_config(server.ca_fingerprint))
        .build()?;
    let call = |method: reqwest::Method, path: String, body: Value| {
        let req = http.request(method, format!("{base}{path}")).bearer_auth(&token).json(&body);
        async move {
            let resp = req.send().await?;
            let status = resp.status();
            let v: Value = resp.json().await?;
            ensure!(status.is_success(), "{path}: {status} {v}");
            Ok::<_, anyhow::Error>(v)
        }
    };

    // An appliance, joined the real way, and a release naming one artifact.
    let env =
        call(reqwest::Method::POST, format!("/v1/workspaces/{ws}/environments"), json!({ "name": "bench" })).await?;
    let env = env["id"].as_str().context("environment id")?.to_owned();
    let join_token = call(reqwest::Method::POST, format!("/v1/environments/{env}/join-tokens"), json!({})).await?;
    let key = rcgen::KeyPair::generate()?;
    let csr = rcgen::CertificateParams::default().serialize_request(&key)?.pem()?;
    let joined = call(
        reqwest::Method::POST,
        "/v1/join".into(),
        json!({ "join_token": join_token["token"], "csr_pem": csr, "version": "bench" }),
    )
    .await?;
    let release_key = airlock_testkit::customer::key(1);
    call(
        reqwest::Method::POST,
        format!("/v1/workspaces/{ws}/release-keys"),
        json!({ "public_key_pem": release_key.public().to_pem()? }),
    )
    .await?;
    let bytes = noise(usize::try_from(size)?);
    let sha256 = hex(ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref());
    let resp = http
        .put(format!("{base}/v1/workspaces/{ws}/artifacts/{sha256}"))
        .bearer_auth(&token)
        .header("content-type", "application/octet-stream")
        .body(bytes)
        .send()
        .await?;
    ensure!(resp.status().is_success(), "upload: {}", resp.status());
    let artifact = Artifact { path: RelativePath::parse("bin/app")?, sha256: sha256.clone(), size };
    let manifest = "name = \"bench\"\nversion = \"1.0.0\"\n\n[[service]]\nname = \"app\"\ncommand = \"bin/app\"\n";
    let statement = ReleaseStatement::new(manifest, vec![artifact.clone()])?;
    let envelope: Value = serde_json::from_str(&sign_release(&statement, &release_key).to_json())?;
    call(reqwest::Method::POST, format!("/v1/workspaces/{ws}/releases"), json!({ "envelope": envelope })).await?;

    let key_pem = key.serialize_pem();
    let gateway = Gateway {
        endpoint: joined["gateway_endpoint"].as_str().context("gateway endpoint")?,
        server_name: joined["gateway_server_name"].as_str().context("gateway server name")?,
        ca_pem: joined["ca_certificate_pem"].as_str().context("CA")?,
        cert_pem: joined["certificate_pem"].as_str().context("certificate")?,
        key_pem: &key_pem,
    };
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, server.ca_pem.as_bytes())?;
    let url = format!("{base}/v1/workspaces/{ws}/artifacts/{sha256}/bytes");
    let state_dir = dir.path().join("appliance");
    let fetcher = ArtifactFetcher::new(&state_dir)?.with_free_margin(0);
    let blob = fetcher.blobs_dir().join(&sha256);

    println!("artifact: {} MiB, {} rounds each, alternating", args.size_mib, args.rounds);
    let (mut ours, mut curl) = (Vec::new(), Vec::new());
    for round in 0..args.rounds {
        let started = Instant::now();
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "curl -s --fail --cacert '{}' -H 'authorization: Bearer {token}' '{url}' | sha256sum",
                ca_file.display()
            ))
            .output()
            .context("running curl | sha256sum")?;
        let took = started.elapsed();
        let got = String::from_utf8_lossy(&out.stdout);
        ensure!(got.starts_with(&sha256), "curl | sha256sum gave {got}");
        curl.push(took);

        let _ = std::fs::remove_file(&blob);
        let channel = dial_gateway_with(&gateway).await?;
        let started = Instant::now();
        fetcher.fetch(&channel, &artifact).await?;
        let took_ours = started.elapsed();
        ours.push(took_ours);
        println!(
            "round {round}: curl {:>7.1} MiB/s, ours {:>7.1} MiB/s",
            mib_per_s(size, took),
            mib_per_s(size, took_ours)
        );
    }
    let (ours, curl) = (median(&mut ours), median(&mut curl));
    println!(
        "median: curl | sha256sum {:.1} MiB/s ({:.2} s), ours (fetch, SHA-256, fsync, rename) {:.1} MiB/s ({:.2} s): {:.2}×",
        mib_per_s(size, curl),
        curl.as_secs_f64(),
        mib_per_s(size, ours),
        ours.as_secs_f64(),
        curl.as_secs_f64() / ours.as_secs_f64()
    );
    server.shutdown().await;
    Ok(())
}

fn mib_per_s(size: u64, took: Duration) -> f64 {
    size as f64 / (1024.0 * 1024.0) / took.as_secs_f64()
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort_unstable();
    v[v.len() / 2]
}
