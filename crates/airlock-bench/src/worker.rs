//! A benchmark spread over processes: the main process starts copies of its own binary in a
//! worker mode, sends each a command per line on its standard input, and reads one JSON report
//! per line from its standard output.

use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// A worker process as the main process sees it.
pub struct Worker {
    pub child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl Worker {
    /// Starts `cmd` (this binary in its worker mode, with its arguments) with piped standard
    /// input and output, killed if the main process drops it.
    pub fn spawn(mut cmd: tokio::process::Command) -> anyhow::Result<Self> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting worker")?;
        let stdin = child.stdin.take().context("worker stdin")?;
        let stdout = child.stdout.take().context("worker stdout")?;
        Ok(Self { child, stdin, lines: BufReader::new(stdout).lines() })
    }

    /// Sends one command line.
    pub async fn send(&mut self, command: &str) -> anyhow::Result<()> {
        self.stdin.write_all(format!("{command}\n").as_bytes()).await?;
        self.stdin.flush().await?;
        Ok(())
    }

    /// The next report, within `limit`.
    pub async fn report<T: DeserializeOwned>(&mut self, limit: Duration) -> anyhow::Result<T> {
        let line = tokio::time::timeout(limit, self.lines.next_line())
            .await
            .context("worker did not report in time")??
            .context("worker exited without reporting")?;
        serde_json::from_str(&line).with_context(|| format!("bad worker report: {line}"))
    }
}

/// In a worker: one report, as one line on standard output.
#[allow(clippy::print_stdout)]
pub fn emit<T: Serialize>(report: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(report)?);
    Ok(())
}
