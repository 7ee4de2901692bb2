//! The appliance's local audit log: hash-chained JSON lines in the state directory, each also
//! echoed to stdout for the customer's own log tools.
//!
//! Records use the same chain as the control plane (`airlock_core::audit`), and the same
//! action names (`AuditAction`).
//! Beside the log, `audit.jsonl.head` holds the last record's sequence and hash, so removing
//! lines from the end shows too.
//! The log is opened append-only and verified at start: the appliance refuses to run on a log
//! that was edited, reordered or truncated (disabling or truncating the local audit is a
//! built-in deny).
//! A record is synced before its head is written; a crash between the two, or in the middle of
//! a record, is recovered at the next start and recorded as `audit.recovered`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use airlock_core::audit::{self, AuditAction, Event, Head, Outcome, Record};

use crate::ApplianceError;
use crate::files::{self, Mode};

pub const LOG_FILE: &str = "audit.jsonl";
pub const CHAIN: &str = "appliance";

pub struct AuditLog {
    inner: Mutex<Inner>,
}

struct Inner {
    file: std::fs::File,
    /// Length of the file up to the last complete record, to roll back a failed append.
    len: u64,
    head: Head,
    head_path: PathBuf,
}

/// The head file's path for a log at `log`.
pub fn head_path(log: &Path) -> PathBuf {
    let mut name = log.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".head");
    log.with_file_name(name)
}

/// What reading a log found.
struct Scan {
    records: Vec<Record>,
    /// Bytes of complete lines; anything after is a record cut by a crash mid-write.
    complete_len: u64,
    partial_tail: bool,
}

fn scan(log: &Path) -> Result<Scan, String> {
    let bytes = match std::fs::read(log) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(format!("cannot read {}: {e}", log.display())),
    };
    let complete_len = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    let mut records = Vec::new();
    for (i, line) in bytes[..complete_len].split(|b| *b == b'\n').filter(|l| !l.is_empty()).enumerate() {
        let text = std::str::from_utf8(line).map_err(|_| format!("line {} is not UTF-8: the log was edited", i + 1))?;
        let record: Record = serde_json::from_str(text)
            .ok()
            .filter(|r: &Record| serde_json::to_string(r).is_ok_and(|canon| canon == text))
            .ok_or_else(|| format!("line {} is not a canonical audit record: the record was edited", i + 1))?;
        records.push(record);
    }
    Ok(Scan { records, complete_len: complete_len as u64, partial_tail: complete_len < bytes.len() })
}

/// Checks records against the head file. A log exactly one record past its head is what a
/// crash between syncing a record and writing the head leaves; it is accepted and reported.
fn check(records: &[Record], anchor: Option<Head>) -> Result<(Head, bool), String> {
    let head = audit::verify_chain(CHAIN, records, None).map_err(|e| e.to_string())?;
    match anchor {
        None if records.len() <= 1 => Ok((head, records.len() == 1)),
        None => Err("the head file is missing: it was deleted".into()),
        Some(a) if a == head => Ok((head, false)),
        Some(a) if head.seq == a.seq + 1 && records.iter().rev().nth(1).map_or(a.seq == 0, |r| r.head() == a) => {
            Ok((head, true))
        }
        Some(a) => audit::verify_chain(CHAIN, records, Some(a)).map(|h| (h, false)).map_err(|e| e.to_string()),
    }
}

/// Reads and verifies a log file against its head file. Returns the head.
pub fn verify_file(log: &Path) -> Result<Head, String> {
    let scan = scan(log)?;
    if scan.partial_tail {
        return Err(format!("line {} is incomplete: the log was cut mid-record", scan.records.len() + 1));
    }
    check(&scan.records, read_head(log)?).map(|(head, _)| head)
}

fn read_head(log: &Path) -> Result<Option<Head>, String> {
    match std::fs::read_to_string(head_path(log)) {
        Ok(text) => serde_json::from_str(&text).map(Some).map_err(|_| "the head file is malformed".to_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read the head file: {e}")),
    }
}

fn write_head(path: &Path, head: &Head) -> std::io::Result<()> {
    let json = serde_json::to_vec(head).map_err(std::io::Error::other)?;
    files::replace(path, &json, Mode::Private)
}

impl AuditLog {
    /// Opens the log in `state_dir`, verifying what is already there.
    pub fn open(state_dir: &Path) -> Result<Self, ApplianceError> {
        let path = state_dir.join(LOG_FILE);
        let refuse = |why: String| {
            ApplianceError::Customer(format!(
                "the local audit log {} does not verify ({why}); refusing to run on a tampered audit log",
                path.display()
            ))
        };
        let scan = scan(&path).map_err(refuse)?;
        let (head, rolled_forward) = check(&scan.records, read_head(&path).map_err(refuse)?).map_err(refuse)?;
        let mut opts = std::fs::OpenOptions::new();
        opts.append(true).create(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let io = |e: std::io::Error| ApplianceError::Customer(format!("opening {}: {e}", path.display()));
        let file = opts.open(&path).map_err(io)?;
        // A record cut by a crash was never acknowledged: drop it, and say so in the log.
        if scan.partial_tail {
            file.set_len(scan.complete_len).map_err(io)?;
        }
        let log = Self { inner: Mutex::new(Inner { file, len: scan.complete_len, head, head_path: head_path(&path) }) };
        if rolled_forward || scan.partial_tail {
            {
                let inner = log.inner.lock().unwrap_or_else(|e| e.into_inner());
                write_head(&inner.head_path, &inner.head).map_err(io)?;
            }
            log.record(
                AuditAction::AuditRecovered,
                Outcome::Success,
                serde_json::json!({ "dropped_partial_record": scan.partial_tail, "head_rolled_forward": rolled_forward }),
            )?;
        }
        Ok(log)
    }

    /// Appends one record durably, then echoes it to stdout.
    pub fn record(
        &self,
        action: AuditAction,
        outcome: Outcome,
        detail: serde_json::Value,
    ) -> Result<(), ApplianceError> {
        let event = Event {
            actor: "appliance".into(),
            action: action.as_str().into(),
            workspace: None,
            target: None,
            outcome,
            detail,
        };
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let record = Record::append(CHAIN, inner.head, crate::clock::now(), event);
        let line = serde_json::to_string(&record).map_err(|e| ApplianceError::Internal(e.to_string()))?;
        let io = |e: std::io::Error| ApplianceError::Customer(format!("writing the local audit log: {e}"));
        let bytes = format!("{line}\n");
        if let Err(e) = inner.file.write_all(bytes.as_bytes()).and_then(|()| inner.file.sync_data()) {
            // Never leave half a line for the next append to join.
            let _ = inner.file.set_len(inner.len);
            return Err(io(e));
        }
        // The record is durable: from here the chain continues from it, whatever happens to
        // the head file (a crash before the head is written is recovered at the next start).
        inner.len += bytes.len() as u64;
        inner.head = record.head();
        write_head(&inner.head_path, &inner.head).map_err(io)?;
        // The customer's log tools read stdout; logs go to stderr.
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn actions(dir: &Path) -> Vec<String> {
        std::fs::read_to_string(dir.join(LOG_FILE))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<Record>(l).unwrap().event.action)
            .collect()
    }

    /// Distinct actions for the records of a test log, in order.
    const ACTIONS: [AuditAction; 3] = [AuditAction::PhaseDisable, AuditAction::PhaseEnable, AuditAction::PolicyUpdate];

    fn log_with(n: usize) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path()).unwrap();
        for action in &ACTIONS[..n] {
            log.record(*action, Outcome::Success, serde_json::Value::Null).unwrap();
        }
        dir
    }

    #[test]
    fn deleting_the_head_file_is_detected() {
        let dir = log_with(3);
        std::fs::remove_file(head_path(&dir.path().join(LOG_FILE))).unwrap();
        let err = verify_file(&dir.path().join(LOG_FILE)).unwrap_err();
        assert!(err.contains("head file is missing"), "{err}");
        assert!(AuditLog::open(dir.path()).is_err());
    }

    #[test]
    fn crash_between_record_and_head_is_recovered_and_recorded() {
        let dir = log_with(3);
        let log_path = dir.path().join(LOG_FILE);
        // The head as it was before the third record: the state a crash right after syncing
        // that record, before its head was written, leaves behind.
        let lines: Vec<Record> =
            std::fs::read_to_string(&log_path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        write_head(&head_path(&log_path), &lines[1].head()).unwrap();
        let log = AuditLog::open(dir.path()).unwrap();
        log.record(AuditAction::ApplianceStart, Outcome::Success, serde_json::Value::Null).unwrap();
        assert_eq!(
            actions(dir.path()),
            ["phase.disable", "phase.enable", "policy.update", "audit.recovered", "appliance.start"]
        );
        assert_eq!(verify_file(&log_path).unwrap().seq, 5);
        // Two records past the head is not a crash: refused.
        write_head(&head_path(&log_path), &lines[0].head()).unwrap();
        assert!(AuditLog::open(dir.path()).is_err());
    }

    #[test]
    fn record_cut_mid_write_is_dropped_and_recorded() {
        let dir = log_with(2);
        let log_path = dir.path().join(LOG_FILE);
        let mut f = std::fs::OpenOptions::new().append(true).open(&log_path).unwrap();
        f.write_all(b"{\"chain\":\"appliance\",\"seq\":3,\"at\"").unwrap();
        assert!(verify_file(&log_path).unwrap_err().contains("incomplete"));
        let log = AuditLog::open(dir.path()).unwrap();
        drop(log);
        assert_eq!(actions(dir.path()), ["phase.disable", "phase.enable", "audit.recovered"]);
        assert_eq!(verify_file(&log_path).unwrap().seq, 3);
    }
}
