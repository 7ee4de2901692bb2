//! Sandbox start-up cost per operation: a boxed `/bin/sh -c true` (cgroup cell, working
//! directory, Landlock rules, user switch, limits, disposal) against a bare spawn of the same,
//! alternately in one run. Run as root, as the appliance is: see BENCHMARKS.md.
//!
//! `cargo bench -p airlock-appliance --bench sandbox -- [ROUNDS]`
#![allow(clippy::print_stdout)] // the report is its output

use std::time::Duration;

use airlock_appliance::sandbox_bench::spawn_true;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), String> {
    let rounds = std::env::args().skip(1).find_map(|a| a.parse::<usize>().ok()).unwrap_or(500);
    let state = tempfile::tempdir().map_err(|e| e.to_string())?;
    // Warm up the page cache and the allocator, then measure.
    spawn_true(state.path(), 20).await?;
    let mut t = spawn_true(state.path(), rounds).await?;
    t.bare.sort_unstable();
    t.boxed.sort_unstable();
    println!("rounds {rounds}; box user switch {}, Landlock {}, cgroup cell {}", t.switched_user, t.landlock, t.cgroup);
    println!("{:<8} {:>10} {:>10} {:>10}", "", "median ms", "p90 ms", "p99 ms");
    for (name, v) in [("bare", &t.bare), ("boxed", &t.boxed)] {
        let (p50, p90, p99) = (percentile(v, 0.5), percentile(v, 0.9), percentile(v, 0.99));
        println!("{name:<8} {:>10.3} {:>10.3} {:>10.3}", ms(p50), ms(p90), ms(p99));
    }
    let added = ms(percentile(&t.boxed, 0.5)) - ms(percentile(&t.bare, 0.5));
    let ratio = ms(percentile(&t.boxed, 0.5)) / ms(percentile(&t.bare, 0.5));
    println!("added by the box (median): {added:.3} ms; boxed/bare = {ratio:.2}");
    Ok(())
}
