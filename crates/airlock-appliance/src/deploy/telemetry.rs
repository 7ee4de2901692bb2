//! What of a running service may go up besides its status: its cgroup's CPU, memory and process
//! counts, and the tail of its log. Only where the customer's signed policy in force opts in
//! (`[telemetry]`, [`airlock_core::policy::Telemetry`]); the report reads that policy each time
//! and asks here only for what it allows. Without it, logs and metrics stay on the appliance.
//!
//! A tail is redacted before it leaves: every secret value the appliance gave the service at its
//! start (its `secrets` and the credentials of the dependencies it is bound to, each as given
//! and without surrounding whitespace) is replaced by [`REDACTED`] wherever it appears whole in
//! the bytes read, one the tail's window cuts in two included (the read reaches back far enough
//! to see it whole).
//! A tail shows only what the service wrote since the appliance last started it (the deploy,
//! the rollback or the appliance's start that did; its own restarts keep counting), so never
//! output written with values the appliance no longer knows (a previous release's, a rotated
//! secret's).
//! Values shorter than [`MIN_REDACTED_BYTES`] are left alone, as they would shred ordinary text.
//! A value the service transforms (encodes, splits, prints piecemeal) is not recognised: a
//! customer who opts in to logs relies on the vendor's services not to print secrets that way.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::Serialize;

/// What replaces a secret value in a log tail that goes up.
pub(crate) const REDACTED: &str = "[redacted]";
/// Secret values shorter than this are not looked for.
pub(crate) const MIN_REDACTED_BYTES: usize = 4;
/// How far before the tail's window a read reaches to see a cut secret value whole: values
/// longer than this are still redacted where they lie whole in what was read.
const MAX_LOOKBEHIND_BYTES: usize = 64 * 1024;

/// A running service's use of its cgroup; each is `None` where it cannot be read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub(crate) struct ServiceMetrics {
    /// CPU time used since its current process started (`cpu.stat` `usage_usec`).
    pub(crate) cpu_usage_usec: Option<u64>,
    /// `memory.current`; on a host whose memory controller is not on cgroup v2, the resident
    /// memory of the cell's processes, summed (`VmRSS`).
    pub(crate) memory_current_bytes: Option<u64>,
    /// `pids.current`; without the pids controller on v2, the cell's threads (`cgroup.threads`).
    pub(crate) pids_current: Option<u64>,
}

/// Reads a service's cell (its cgroup v2 directory).
pub(crate) fn read_metrics(cell: &Path) -> ServiceMetrics {
    let read = |file: &str| std::fs::read_to_string(cell.join(file)).ok();
    let number = |text: String| text.trim().parse().ok();
    ServiceMetrics {
        cpu_usage_usec: read("cpu.stat").as_deref().and_then(cpu_usage_usec),
        memory_current_bytes: read("memory.current")
            .and_then(number)
            .or_else(|| read("cgroup.procs").map(|procs| resident_bytes(&procs))),
        pids_current: read("pids.current")
            .and_then(number)
            .or_else(|| read("cgroup.threads").map(|threads| threads.lines().count() as u64)),
    }
}

/// The resident memory of the processes `cgroup.procs` lists, summed (a process gone
/// meanwhile counts nothing).
fn resident_bytes(procs: &str) -> u64 {
    procs
        .lines()
        .filter_map(|pid| pid.trim().parse::<u32>().ok())
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .filter_map(|status| vm_rss_bytes(&status))
        .fold(0, u64::saturating_add)
}

/// `VmRSS` from a `/proc/<pid>/status`, in bytes.
fn vm_rss_bytes(status: &str) -> Option<u64> {
    let kib = status.lines().find_map(|line| line.strip_prefix("VmRSS:"))?.trim().strip_suffix("kB")?;
    kib.trim().parse::<u64>().ok().map(|k| k.saturating_mul(1024))
}

/// `usage_usec` from a `cpu.stat`.
fn cpu_usage_usec(cpu_stat: &str) -> Option<u64> {
    cpu_stat.lines().find_map(|line| line.strip_prefix("usage_usec ")).and_then(|v| v.trim().parse().ok())
}

/// The last `max_bytes` of the log at `log` (reaching into its rotated `.1` when the current
/// file is shorter), with every one of `secret_values` replaced by [`REDACTED`]; invalid UTF-8
/// is replaced too. A missing log is an empty tail.
pub(crate) fn log_tail(log: &Path, max_bytes: usize, secret_values: &[String]) -> String {
    let needles = needles(secret_values);
    let lookbehind = needles.iter().map(|n| n.len()).max().unwrap_or(1).saturating_sub(1).min(MAX_LOOKBEHIND_BYTES);
    let read = read_last(log, max_bytes + lookbehind);
    let window_start = read.len().saturating_sub(max_bytes);
    let redacted = redact(&read, window_start, &needles);
    let text = String::from_utf8_lossy(&redacted);
    // A marker longer than the value it replaced can push the tail past its bound.
    let mut cut = text.len().saturating_sub(max_bytes);
    while !text.is_char_boundary(cut) {
        cut += 1;
    }
    text[cut..].to_owned()
}

/// The values to look for: each as given and trimmed, none too short, longest first.
fn needles(secret_values: &[String]) -> Vec<&[u8]> {
    let mut needles: Vec<&[u8]> = secret_values
        .iter()
        .flat_map(|v| [v.as_str(), v.trim()])
        .filter(|v| v.len() >= MIN_REDACTED_BYTES)
        .map(str::as_bytes)
        .collect();
    needles.sort_by(|a, b| b.len().cmp(&a.len()).then(a.cmp(b)));
    needles.dedup();
    needles
}

/// `bytes[window_start..]` with every byte that belongs to a whole occurrence (in all of
/// `bytes`) of one of `needles` replaced: each run of such bytes becomes one [`REDACTED`], also
/// a run that began before the window.
fn redact(bytes: &[u8], window_start: usize, needles: &[&[u8]]) -> Vec<u8> {
    let mut secret = vec![false; bytes.len()];
    for needle in needles.iter().filter(|n| !n.is_empty()) {
        for (at, _) in bytes.windows(needle.len()).enumerate().filter(|(_, w)| w == needle) {
            secret[at..at + needle.len()].fill(true);
        }
    }
    let mut out = Vec::with_capacity(bytes.len().saturating_sub(window_start));
    let mut at = window_start.min(bytes.len());
    while at < bytes.len() {
        if secret[at] {
            out.extend_from_slice(REDACTED.as_bytes());
            while at < bytes.len() && secret[at] {
                at += 1;
            }
        } else {
            out.push(bytes[at]);
            at += 1;
        }
    }
    out
}

/// The last `want` bytes of a log and, where it holds fewer, of its rotated `.1` before them.
fn read_last(log: &Path, want: usize) -> Vec<u8> {
    let newer = read_file_end(log, want);
    if newer.len() >= want {
        return newer;
    }
    let mut rotated = log.to_owned().into_os_string();
    rotated.push(".1");
    let mut older = read_file_end(&PathBuf::from(rotated), want - newer.len());
    older.extend_from_slice(&newer);
    older
}

/// At most the last `want` bytes of a file; nothing if it cannot be read.
fn read_file_end(path: &Path, want: usize) -> Vec<u8> {
    let Ok(mut file) = std::fs::File::open(path) else { return Vec::new() };
    let len = file.metadata().map_or(0, |m| m.len());
    let want = u64::try_from(want).unwrap_or(u64::MAX);
    if file.seek(SeekFrom::Start(len.saturating_sub(want))).is_err() {
        return Vec::new();
    }
    let mut out = Vec::new();
    // The file may grow meanwhile: never more than asked for.
    let _ = file.take(want).read_to_end(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn a_secret_value_is_redacted_wherever_it_lies_whole_or_cut_by_the_window() {
        let given = values(&["hunter22", "pw"]);
        let needles = needles(&given);
        let text = b"start hunter22 mid hunter22hunter22 end pw";
        assert_eq!(redact(text, 0, &needles), b"start [redacted] mid [redacted] end pw");
        // The window starts inside an occurrence: the part in the window is still redacted.
        let cut = text.iter().position(|b| *b == b'u').unwrap();
        assert_eq!(redact(text, cut, &needles), b"[redacted] mid [redacted] end pw");
    }

    #[test]
    fn values_are_looked_for_as_given_and_trimmed_and_short_ones_not_at_all() {
        let given = values(&["s3cret\n", "abc", " x "]);
        let needles = needles(&given);
        assert_eq!(needles, [b"s3cret\n".as_slice(), b"s3cret"]);
        assert_eq!(redact(b"a=s3cret b=abc", 0, &needles), b"a=[redacted] b=abc");
    }

    #[test]
    fn a_log_tail_is_bounded_reaches_into_the_rotated_file_and_is_redacted() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("web.log");
        assert_eq!(log_tail(&log, 16, &[]), "");
        std::fs::write(dir.path().join("web.log.1"), "old line\nold secret-value\n").unwrap();
        std::fs::write(&log, "new\n").unwrap();
        assert_eq!(log_tail(&log, 8, &[]), "lue\nnew\n");
        assert_eq!(log_tail(&log, 21, &values(&["secret-value"])), "old [redacted]\nnew\n");
        // The window cuts the value: the read reaches back far enough to see it whole, and the
        // tail keeps its bound, cutting the marker rather than showing any of the value.
        assert_eq!(log_tail(&log, 14, &values(&["secret-value"])), "redacted]\nnew\n");
        assert_eq!(log_tail(&log, 8, &values(&["secret-value"])), "ed]\nnew\n");
        std::fs::remove_file(dir.path().join("web.log.1")).unwrap();
        std::fs::write(&log, b"\xffok\n").unwrap();
        assert_eq!(log_tail(&log, 8, &[]), "\u{fffd}ok\n");
    }

    #[test]
    fn metrics_come_from_the_cell_files_and_a_missing_one_is_unknown() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_metrics(dir.path()), ServiceMetrics::default());
        std::fs::write(dir.path().join("cpu.stat"), "usage_usec 1234\nuser_usec 1000\nsystem_usec 234\n").unwrap();
        std::fs::write(dir.path().join("memory.current"), "4096\n").unwrap();
        std::fs::write(dir.path().join("pids.current"), "3\n").unwrap();
        assert_eq!(
            read_metrics(dir.path()),
            ServiceMetrics { cpu_usage_usec: Some(1234), memory_current_bytes: Some(4096), pids_current: Some(3) }
        );
    }

    #[test]
    fn without_the_memory_and_pids_controllers_the_cells_processes_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cgroup.procs"), format!("{}\n999999999\n", std::process::id())).unwrap();
        std::fs::write(dir.path().join("cgroup.threads"), "1\n2\n3\n").unwrap();
        let metrics = read_metrics(dir.path());
        assert!(metrics.memory_current_bytes.is_some_and(|m| m > 0), "{metrics:?}");
        assert_eq!(metrics.pids_current, Some(3));
        assert_eq!(vm_rss_bytes("Name:\tsh\nVmRSS:\t    1508 kB\n"), Some(1508 * 1024));
    }
}
