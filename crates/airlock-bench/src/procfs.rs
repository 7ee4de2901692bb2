//! What the benchmark reads about processes from `/proc` (Linux only).

use std::sync::OnceLock;

use anyhow::Context;

/// A `kB` field of `/proc/<pid>/status`, e.g. `VmRSS` or `VmHWM`, in KiB.
pub fn status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// `Threads` of `/proc/<pid>/status`.
pub fn threads(pid: u32) -> anyhow::Result<u64> {
    status_kib(pid, "Threads")
}

/// Open file descriptors of a process.
pub fn open_fds(pid: u32) -> anyhow::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// CPU seconds (user + system) a process has used so far.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    cpu_seconds_at(&format!("/proc/{pid}/stat"))
}

pub fn self_cpu_seconds() -> anyhow::Result<f64> {
    cpu_seconds_at("/proc/self/stat")
}

fn cpu_seconds_at(path: &str) -> anyhow::Result<f64> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    // The command name is in parentheses and may contain spaces; fields resume after the last ')'.
    // After it come fields 3 (state) onwards, so utime (14) and stime (15) are at 11 and 12.
    let rest = text.rsplit_once(')').map(|(_, r)| r).context("malformed stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<u64> {
        fields.get(i).and_then(|v| v.parse().ok()).with_context(|| format!("malformed stat field {i}"))
    };
    let total = ticks(11)? + ticks(12)?;
    Ok(total as f64 / clock_ticks() as f64)
}

/// `getconf CLK_TCK`, which is 100 on every Linux we run on.
pub fn clock_ticks() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .filter(|&t| t > 0)
            .unwrap_or(100)
    })
}

/// Soft and hard limits on open files for this process (`/proc/self/limits`).
pub fn open_files_limit() -> Option<(String, String)> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    let mut parts = line.trim_start_matches("Max open files").split_whitespace();
    Some((parts.next()?.to_owned(), parts.next()?.to_owned()))
}

/// CPU seconds the whole machine spent busy (all CPUs, everything but idle and iowait).
pub fn machine_busy_seconds() -> anyhow::Result<f64> {
    let text = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = text.lines().find(|l| l.starts_with("cpu ")).context("no cpu line in /proc/stat")?;
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
    anyhow::ensure!(v.len() >= 5, "malformed /proc/stat");
    // user nice system idle iowait irq softirq steal: busy is all but idle, iowait and steal
    // (guest time is already in user).
    let busy: u64 = [0, 1, 2, 5, 6].iter().filter_map(|&i| v.get(i)).sum();
    Ok(busy as f64 / clock_ticks() as f64)
}

/// Write system calls a process has made so far (`syscw` in `/proc/<pid>/io`).
pub fn write_syscalls(pid: u32) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/io")).with_context(|| format!("reading /proc/{pid}/io"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("syscw:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no syscw in /proc/{pid}/io"))
}
