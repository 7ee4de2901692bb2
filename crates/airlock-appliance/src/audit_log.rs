//! The appliance's local audit log: hash-chained JSON lines in the state directory, each also
//! echoed to stdout for the customer's own log tools.
//!
//! Records use the same chain as the control plane (`airlock_core::audit`). Beside the log,
//! `audit.jsonl.head` holds the last record's seq and hash, so removing lines from the end is
//! detected too. The log is opened append-only and verified at start: the appliance refuses to
//! run on a log that was edited, reordered or truncated (disabling or truncating the local
//! audit is a built-in deny).

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use airlock_core::audit::{self, Event, Head, Outcome, Record};

use crate::ApplianceError;

pub const LOG_FILE: &str = "audit.jsonl";
pub const CHAIN: &str = "appliance";

pub struct AuditLog {
    inner: Mutex<Inner>,
}

struct Inner {
    file: std::fs::File,
    head: Head,
    head_path: PathBuf,
}

/// The head file's path for a log at `log`.
pub fn head_path(log: &Path) -> PathBuf {
    let mut name = log.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".head");
    log.with_file_name(name)
}

/// Reads and verifies a log file (and its head file, if present). Returns the head.
pub fn verify_file(log: &Path) -> Result<Head, String> {
    let file = match std::fs::File::open(log) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return verify_records(&[], read_head(log)?),
        Err(e) => return Err(format!("cannot read {}: {e}", log.display())),
    };
    let mut records = Vec::new();
    let mut reader = std::io::BufReader::new(file);
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader.read_line(&mut line).map_err(|e| format!("cannot read {}: {e}", log.display()))?;
        if n == 0 {
            break;
        }
        let position = records.len() + 1;
        if !line.ends_with('\n') {
            return Err(format!("line {position} is incomplete: the log was cut mid-record"));
        }
        let text = line.trim_end_matches('\n');
        let record: Record = serde_json::from_str(text)
            .ok()
            .filter(|r: &Record| serde_json::to_string(r).is_ok_and(|canon| canon == text))
            .ok_or_else(|| format!("line {position} is not a canonical audit record: the record was edited"))?;
        records.push(record);
    }
    verify_records(&records, read_head(log)?)
}

fn verify_records(records: &[Record], anchor: Option<Head>) -> Result<Head, String> {
    audit::verify_chain(CHAIN, records, anchor).map_err(|e| e.to_string())
}

fn read_head(log: &Path) -> Result<Option<Head>, String> {
    match std::fs::read_to_string(head_path(log)) {
        Ok(text) => serde_json::from_str(&text).map(Some).map_err(|_| "the head file is malformed".to_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read the head file: {e}")),
    }
}

impl AuditLog {
    /// Opens the log in `state_dir`, verifying what is already there.
    pub fn open(state_dir: &Path) -> Result<Self, ApplianceError> {
        let path = state_dir.join(LOG_FILE);
        let head = verify_file(&path).map_err(|why| {
            ApplianceError::Customer(format!(
                "the local audit log {} does not verify ({why}); refusing to run on a tampered audit log",
                path.display()
            ))
        })?;
        let mut opts = std::fs::OpenOptions::new();
        opts.append(true).create(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let file =
            opts.open(&path).map_err(|e| ApplianceError::Customer(format!("opening {}: {e}", path.display())))?;
        Ok(Self { inner: Mutex::new(Inner { file, head, head_path: head_path(&path) }) })
    }

    /// Appends one record durably, then echoes it to stdout.
    pub fn record(&self, action: &str, outcome: Outcome, detail: serde_json::Value) -> Result<(), ApplianceError> {
        let event =
            Event { actor: "appliance".into(), action: action.into(), workspace: None, target: None, outcome, detail };
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let record = Record::append(CHAIN, inner.head, crate::now(), event);
        let line = serde_json::to_string(&record).map_err(|e| ApplianceError::Internal(e.to_string()))?;
        let io = |e: std::io::Error| ApplianceError::Customer(format!("writing the local audit log: {e}"));
        inner.file.write_all(format!("{line}\n").as_bytes()).map_err(io)?;
        inner.file.sync_data().map_err(io)?;
        let head = record.head();
        let head_json = serde_json::to_vec(&head).map_err(|e| ApplianceError::Internal(e.to_string()))?;
        let tmp = inner.head_path.with_extension("head.tmp");
        std::fs::write(&tmp, head_json).and_then(|()| std::fs::rename(&tmp, &inner.head_path)).map_err(io)?;
        inner.head = head;
        // The customer's log tools read stdout; logs go to stderr.
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        Ok(())
    }
}
