//! The control plane under test: `airlock server init`, then `airlock server` as a child process.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use airlock_testkit::process::strip_ansi;
use anyhow::{Context, bail};
use serde::Deserialize;

/// What `airlock server init` prints.
#[derive(Debug)]
pub struct InitOutput {
    pub workspace: String,
    pub ca_fingerprint: String,
    pub admin_token: String,
}

/// The JSON `airlock server --ready-file` writes once both listeners are up.
#[derive(Debug, Deserialize)]
pub struct Ready {
    pub api_url: String,
    pub gateway_endpoint: String,
    pub ca_fingerprint: String,
    pub pid: u32,
}

/// The `airlock` binary must not pick up settings from the caller's environment.
pub fn clean_command(bin: &Path) -> Command {
    let mut cmd = Command::new(bin);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("AIRLOCK_") {
            cmd.env_remove(&k);
        }
    }
    cmd
}

pub fn init(bin: &Path, data_dir: &Path) -> anyhow::Result<InitOutput> {
    let out = clean_command(bin)
        .args(["server", "init", "--data-dir"])
        .arg(data_dir)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {} server init", bin.display()))?;
    if !out.status.success() {
        bail!("airlock server init failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| -> anyhow::Result<String> {
        stdout
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == name).then(|| v.trim().to_owned())
            })
            .with_context(|| format!("`airlock server init` printed no `{name}:` line:\n{stdout}"))
    };
    Ok(InitOutput {
        workspace: field("workspace")?,
        ca_fingerprint: field("ca fingerprint")?,
        admin_token: field("admin token")?,
    })
}

/// A running `airlock server`. Dropping it kills the process if [`Self::stop`] was not called.
pub struct ServerProc {
    child: Child,
    ready_file: PathBuf,
    pub log_file: PathBuf,
}

impl ServerProc {
    pub fn spawn(bin: &Path, data_dir: &Path) -> anyhow::Result<Self> {
        Self::spawn_with(bin, data_dir, &[])
    }

    /// As [`Self::spawn`], with more `airlock server` flags (e.g. a longer request deadline).
    pub fn spawn_with(bin: &Path, data_dir: &Path, extra_args: &[&str]) -> anyhow::Result<Self> {
        let ready_file = data_dir.join("ready.json");
        let log_file = data_dir.join("server.log");
        let log = std::fs::File::create(&log_file).context("creating server log")?;
        let child = clean_command(bin)
            .args(["server", "--data-dir"])
            .arg(data_dir)
            .args([
                "--listen",
                "127.0.0.1:0",
                "--gateway-listen",
                "127.0.0.1:0",
                "--hostname",
                "127.0.0.1",
                // Appliances here heartbeat when told to, not on the server's schedule.
                "--heartbeat-interval",
                "3600s",
                "--ready-file",
            ])
            .arg(&ready_file)
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {} server", bin.display()))?;
        Ok(Self { child, ready_file, log_file })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until the server has written its ready file.
    pub async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<Ready> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(status) = self.child.try_wait()? {
                bail!("airlock server exited during startup ({status}); see {}", self.log_file.display());
            }
            if let Ok(text) = std::fs::read_to_string(&self.ready_file)
                && let Ok(ready) = serde_json::from_str::<Ready>(&text)
            {
                return Ok(ready);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("airlock server not ready after {timeout:?}; see {}", self.log_file.display())
    }

    /// SIGTERM (through `kill(1)`, so this crate needs no unsafe or libc), then SIGKILL after `grace`.
    /// Returns how long the graceful shutdown took, if it finished in time.
    pub async fn stop(&mut self, grace: Duration) -> anyhow::Result<Option<Duration>> {
        if self.child.try_wait()?.is_some() {
            return Ok(Some(Duration::ZERO));
        }
        let start = Instant::now();
        let status = Command::new("kill").args(["-TERM", &self.pid().to_string()]).status().context("running kill")?;
        if status.success() {
            while start.elapsed() < grace {
                if self.child.try_wait()?.is_some() {
                    return Ok(Some(start.elapsed()));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        self.child.kill()?;
        self.child.wait()?;
        Ok(None)
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Summary of the server's stderr log: how many WARN/ERROR lines, and a few of them.
#[derive(Debug, Default, serde::Serialize)]
pub struct LogSummary {
    pub lines: usize,
    pub warn_lines: usize,
    pub error_lines: usize,
    pub samples: Vec<String>,
}

pub fn summarize_log(path: &Path) -> LogSummary {
    let Ok(text) = std::fs::read_to_string(path) else { return LogSummary::default() };
    let mut s = LogSummary::default();
    for line in text.lines() {
        let line = strip_ansi(line);
        s.lines += 1;
        let warn = line.contains(" WARN ");
        let error = line.contains(" ERROR ");
        s.warn_lines += usize::from(warn);
        s.error_lines += usize::from(error);
        if (warn || error) && s.samples.len() < 10 {
            s.samples.push(line.chars().take(400).collect());
        }
    }
    s
}

/// Reads one sample (no labels) from the Prometheus/OpenMetrics text at `/metrics`.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?;
        let value = rest.strip_prefix(' ')?;
        value.split_whitespace().next()?.parse().ok()
    })
}
