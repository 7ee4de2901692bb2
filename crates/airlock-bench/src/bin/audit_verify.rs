//! `airlock audit verify` on a large chain with signed checkpoints.
//!
//! Makes a data directory (`airlock_server::init`), appends `--records` records to one tenant
//! chain through the group-commit writer, signs a checkpoint of every chain after each tenth
//! (`airlock_server::checkpoint_audit`), then times `airlock_server::verify_audit` (what
//! `airlock audit verify --data-dir` runs): with the KEK and no checkpoints, and without the KEK
//! against the checkpoints (public keys only).
//!
//! `cargo run --release -p airlock-bench --bin audit_verify [-- --records 1000000]`
#![allow(clippy::print_stdout)] // A benchmark reports on stdout.

use std::sync::Arc;
use std::time::Instant;

use airlock_core::audit::{AuditAction, Outcome};
use airlock_server::clock::{Clock, SystemClock};
use airlock_server::keys::KekSource;
use airlock_server::metrics::AuditMetrics;
use airlock_server::state::event;
use airlock_server::store::{AuditWriter, Store};
use anyhow::ensure;
use clap::Parser;

#[derive(Parser, Debug)]
#[command(name = "audit_verify", about = "Verify a large audit chain, with and without signed checkpoints.")]
struct Args {
    /// Records on the tenant chain.
    #[arg(long, default_value_t = 1_000_000)]
    records: usize,
}

/// Appends in flight at once (the writer batches them).
const IN_FLIGHT: usize = 1024;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(run(&args))
}

async fn run(args: &Args) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data_dir = dir.path().join("data");
    let kek = KekSource::default_for(&data_dir);
    let boot = airlock_server::init(&data_dir, &kek, "bench.test", "bench", "main", &SystemClock).await?;
    let chain = boot.tenant.to_string();
    let checkpoints = dir.path().join("checkpoints.jsonl");

    let store = Arc::new(Store::open(&data_dir, false, kek.load()?.audit_mac_key()).await?);
    let writer = Arc::new(AuditWriter::spawn(store.clone(), AuditMetrics::default()));
    let start = Instant::now();
    let tenth = args.records.div_ceil(10);
    let mut written = 0;
    while written < args.records {
        let upto = (written + tenth).min(args.records);
        while written < upto {
            let batch = (upto - written).min(IN_FLIGHT);
            let mut tasks = Vec::with_capacity(batch);
            for n in written..written + batch {
                let (writer, chain) = (writer.clone(), chain.clone());
                tasks.push(tokio::spawn(async move {
                    let mut ev = event("tok_bench", AuditAction::OperationManifest, Outcome::Success);
                    ev.target = Some(format!("op_{n:032x}"));
                    writer.append(&chain, SystemClock.now(), ev).await
                }));
            }
            for t in tasks {
                t.await??;
            }
            written += batch;
        }
        let lines = airlock_server::checkpoint_audit(&data_dir, &kek, &SystemClock).await?;
        airlock_server::audit_checkpoints::append_lines(&checkpoints, &lines)?;
    }
    let fill = start.elapsed();
    drop(writer);
    store.close().await;
    let db_bytes = std::fs::metadata(data_dir.join("airlock.db"))?.len()
        + std::fs::metadata(data_dir.join("airlock.db-wal")).map_or(0, |m| m.len());
    println!(
        "{} records on one chain (+ {} checkpoint lines), written in {:.1} s; database {:.0} MB",
        args.records,
        std::fs::read_to_string(&checkpoints)?.lines().count(),
        fill.as_secs_f64(),
        db_bytes as f64 / 1e6
    );

    let with_kek = airlock_server::AuditEvidence::default();
    let offline = airlock_server::AuditEvidence { checkpoints: Some(checkpoints.clone()), audit_key: None };
    let no_kek = KekSource::File(dir.path().join("no-such-kek"));
    for (what, kek, evidence) in [
        ("with the KEK (head MACs), no checkpoints", &kek, &with_kek),
        ("without the KEK, against the checkpoints", &no_kek, &offline),
        ("with the KEK and the checkpoints", &kek, &offline),
    ] {
        let start = Instant::now();
        let report = airlock_server::verify_audit(&data_dir, kek, evidence).await?;
        let took = start.elapsed();
        ensure!(report.ok(), "the audit does not verify: {report:?}");
        println!(
            "  verify {what:<44} {:>6.2} s  {:>10.0} records/s",
            took.as_secs_f64(),
            args.records as f64 / took.as_secs_f64()
        );
    }
    Ok(())
}
