//! Health probes: HTTP (`GET http://127.0.0.1:<port><path>`, a 2xx status is healthy), TCP
//! (a connection is accepted) and exec (a command, boxed like the service, exits 0).
//!
//! A probe that does not finish within its timeout failed. A service is healthy once every
//! check has succeeded `healthy_threshold` times in a row, unhealthy once any has failed
//! `unhealthy_threshold` times in a row; in between it keeps what it had (starting, at first).
//! A service without checks is healthy once it has stayed up for the settle time.

use std::time::Duration;

use airlock_core::release::{HealthCheck, HealthProbe};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One probe's answer.
pub(super) async fn probe_http(port: u16, path: &str, timeout: Duration) -> bool {
    let ask = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        // The status line is all that is read: `HTTP/1.x NNN ...`.
        let mut head = [0u8; 64];
        let mut read = 0;
        while read < head.len() {
            let n = stream.read(&mut head[read..]).await.ok()?;
            if n == 0 {
                break;
            }
            read += n;
            if head[..read].contains(&b'\n') {
                break;
            }
        }
        let line = std::str::from_utf8(&head[..read]).ok()?;
        let mut words = line.split_whitespace();
        let version = words.next()?;
        let code: u16 = words.next()?.parse().ok()?;
        Some(version.starts_with("HTTP/1.") && (200..300).contains(&code))
    };
    matches!(tokio::time::timeout(timeout, ask).await, Ok(Some(true)))
}

pub(super) async fn probe_tcp(port: u16, timeout: Duration) -> bool {
    matches!(tokio::time::timeout(timeout, TcpStream::connect(("127.0.0.1", port))).await, Ok(Ok(_)))
}

/// Consecutive results of one check, and what they make it.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Tally {
    successes: u32,
    failures: u32,
    pub(super) verdict: Option<bool>,
}

impl Tally {
    pub(super) fn record(&mut self, check: &HealthCheck, ok: bool) {
        if ok {
            self.successes = self.successes.saturating_add(1);
            self.failures = 0;
            if self.successes >= check.healthy_threshold {
                self.verdict = Some(true);
            }
        } else {
            self.failures = self.failures.saturating_add(1);
            self.successes = 0;
            if self.failures >= check.unhealthy_threshold {
                self.verdict = Some(false);
            }
        }
    }
}

/// The service's health from its checks' tallies: `Some(false)` if any is unhealthy,
/// `Some(true)` if all are healthy, else `None` (not settled yet).
pub(super) fn overall(tallies: &[Tally]) -> Option<bool> {
    if tallies.iter().any(|t| t.verdict == Some(false)) {
        Some(false)
    } else if tallies.iter().all(|t| t.verdict == Some(true)) {
        Some(true)
    } else {
        None
    }
}

/// How a check's probe is described in logs (never with a value of the service's env).
pub(super) fn describe(check: &HealthCheck) -> String {
    match &check.probe {
        HealthProbe::Http(p) => format!("http 127.0.0.1:{}{}", p.port, p.path),
        HealthProbe::Tcp(p) => format!("tcp 127.0.0.1:{}", p.port),
        HealthProbe::Exec(p) => format!("exec {}", p.command),
    }
}

#[cfg(test)]
mod tests {
    use airlock_core::release::TcpProbe;

    use super::*;

    #[test]
    fn thresholds_settle_a_verdict_and_it_holds_in_between() {
        let check = HealthCheck {
            probe: HealthProbe::Tcp(TcpProbe { port: 1 }),
            interval_secs: 1,
            timeout_secs: 1,
            healthy_threshold: 2,
            unhealthy_threshold: 2,
        };
        let mut t = Tally::default();
        t.record(&check, true);
        assert_eq!(t.verdict, None);
        t.record(&check, true);
        assert_eq!(t.verdict, Some(true));
        t.record(&check, false);
        assert_eq!(t.verdict, Some(true), "one failure below the threshold changes nothing");
        t.record(&check, false);
        assert_eq!(t.verdict, Some(false));
        assert_eq!(overall(&[t, Tally::default()]), Some(false));
        assert_eq!(overall(&[Tally { verdict: Some(true), ..t }, Tally::default()]), None);
    }
}
