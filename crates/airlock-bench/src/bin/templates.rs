//! What loading a template costs: compile (`Template::new`) and render time, and the peak RSS
//! of a process that does only that, for a small template, one at every cap, and the
//! pathological ones (refused). Each case runs in a child process of its own, so its peak RSS
//! is its own.
//!
//! `cargo run --release -p airlock-bench --bin templates [-- --rounds N]`
//!
//! Before the limits, 200 variables of `\w{100}` took 10.4 s and 1.17 GB (issue 13); the
//! `legacy-one-pattern` case compiles one such pattern with the regex crate's defaults (what
//! `Template::new` did for each variable) for comparison.
#![allow(clippy::print_stdout)] // A benchmark reports on stdout.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use airlock_core::pattern::MAX_PATTERN_BYTES;
use airlock_core::template::{MAX_MANIFEST_BYTES, MAX_SCRIPT_BYTES, MAX_VARIABLES, Template};

const CASES: &[&str] = &["small", "at-every-cap", "pathological-200", "costly-32", "legacy-one-pattern"];

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| args.iter().skip_while(|a| *a != name).nth(1).cloned();
    let rounds: usize = arg("--rounds").and_then(|r| r.parse().ok()).unwrap_or(20);
    if let Some(case) = arg("--case") {
        return run_case(&case, rounds);
    }
    println!("{:<20} {:>14} {:>14} {:>12}  result", "case", "compile", "render", "peak RSS");
    for case in CASES {
        let out = std::process::Command::new(std::env::current_exe()?)
            .args(["--case", case, "--rounds", &rounds.to_string()])
            .output()?;
        anyhow::ensure!(out.status.success(), "{case}: {}", String::from_utf8_lossy(&out.stderr));
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }
    Ok(())
}

fn run_case(case: &str, rounds: usize) -> anyhow::Result<()> {
    let (manifest, script, values) = match case {
        "small" => small(),
        "at-every-cap" => at_every_cap(),
        "pathological-200" => variables(200, r"\w{100}"),
        "costly-32" => variables(MAX_VARIABLES, r"\w{100}"),
        "legacy-one-pattern" => {
            let started = Instant::now();
            let re = regex::Regex::new(r"^(?:\w{100})$")?;
            let compile = started.elapsed();
            std::hint::black_box(&re);
            println!(
                "{case:<20} {:>14} {:>14} {:>9} MiB  compiled with the regex crate's default limits",
                format!("{compile:.2?}"),
                "-",
                peak_rss_kib()? / 1024
            );
            return Ok(());
        }
        other => anyhow::bail!("no case {other}"),
    };
    let mut compile = Vec::new();
    let mut render = Vec::new();
    let mut outcome = String::new();
    for _ in 0..rounds {
        let started = Instant::now();
        let loaded = Template::new(&manifest, &script);
        compile.push(started.elapsed());
        match loaded {
            Ok(t) => {
                let started = Instant::now();
                let command = t.render(&values)?;
                render.push(started.elapsed());
                outcome = format!("rendered ({} variables)", command.env.len());
            }
            Err(e) => outcome = format!("refused: {}", truncate(&e.to_string(), 70)),
        }
    }
    let render = if render.is_empty() { "-".to_owned() } else { format!("{:.2?}", median(&mut render)) };
    println!(
        "{case:<20} {:>14} {:>14} {:>9} MiB  {outcome}",
        format!("{:.2?}", median(&mut compile)),
        render,
        peak_rss_kib()? / 1024
    );
    Ok(())
}

type Case = (String, String, BTreeMap<String, String>);

fn small() -> Case {
    let manifest = "name = \"restart-service\"\ndescription = \"Restart one service\"\nphase = \"operate\"\n\
        data_tags = [\"service:restart\"]\nbody = \"restart.sh\"\n\n[[variables]]\nname = \"service\"\n\
        pattern = \"[a-z][a-z0-9-]{0,40}\"\n";
    let script = "#!/bin/sh\nsystemctl restart \"$AIRLOCK_VAR_SERVICE\"\n";
    (manifest.into(), script.into(), [("service".to_owned(), "billing".to_owned())].into())
}

/// Every cap at once: the largest manifest and script, the most variables, each pattern as
/// long as allowed (32 character classes), each value as long as its pattern allows.
fn at_every_cap() -> Case {
    let pattern = "[a-z0-9]".repeat(MAX_PATTERN_BYTES / 8);
    let (mut manifest, _, values) = variables(MAX_VARIABLES, &pattern);
    manifest.push('#');
    manifest.push_str(&"x".repeat(MAX_MANIFEST_BYTES - manifest.len()));
    let script = format!("#!/bin/sh\n#{}", "x".repeat(MAX_SCRIPT_BYTES - 11));
    let values = values.into_keys().map(|k| (k, "a".repeat(32))).collect();
    (manifest, script, values)
}

fn variables(count: usize, pattern: &str) -> Case {
    let mut manifest = "name = \"many\"\ndescription = \"d\"\nphase = \"operate\"\nbody = \"run.sh\"\n".to_owned();
    let mut values = BTreeMap::new();
    for i in 0..count {
        manifest.push_str(&format!("[[variables]]\nname = \"v{i}\"\npattern = '{pattern}'\n"));
        values.insert(format!("v{i}"), "a".to_owned());
    }
    (manifest, "#!/bin/sh\necho\n".into(), values)
}

fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n { s.to_owned() } else { format!("{}…", s.chars().take(n).collect::<String>()) }
}

/// `VmHWM` of this process: its peak resident set.
fn peak_rss_kib() -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmHWM in /proc/self/status"))
}
