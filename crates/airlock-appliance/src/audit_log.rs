//! The appliance's local audit log: hash-chained JSON lines in the state directory, each also
//! echoed to stdout for the customer's own log tools.
//!
//! Records use the same chain as the control plane (`airlock_core::audit`), and the same
//! action names (`AuditAction`).
//! Beside the log, `audit.jsonl.head` holds the last record's sequence and hash, so removing
//! lines from the end shows too.
//! The head carries an HMAC-SHA256 (`Head::mac`, as the control plane's) under `audit.key`, a
//! random key made on first start, owner-only, so rewriting the head after cutting records
//! needs a key that vendor code, once sandboxed, cannot read.
//! A head without a MAC is an old log's: it is keyed once, and `audit.head_keyed` records it;
//! after that record an unkeyed head is refused, so deleting the key does not re-open the door.
//! A start refused for a log or head that does not verify leaves a note (`audit.refused`),
//! recorded as `appliance.start_refused` at the next start that verifies.
//! The log is opened append-only and verified at start: the appliance refuses to run on a log
//! that was edited, reordered or truncated (disabling or truncating the local audit is a
//! built-in deny).
//! A record is synced before its head is written; a crash between the two, or in the middle of
//! a record, is recovered at the next start and recorded as `audit.recovered`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use airlock_core::audit::{self, AuditAction, ChainHash, Event, Head, Outcome, Record};

use crate::ApplianceError;
use crate::files::{self, Mode};

pub mod checkpoints;

use airlock_core::audit::anchor::{Anchor, AnchoredState};
use airlock_core::audit::checkpoint::{CheckpointReason, CheckpointsReport, check_checkpoints};
use airlock_core::customer_key::CustomerPublicKey;
pub use checkpoints::{CheckpointConfig, CheckpointSink};

pub const LOG_FILE: &str = "audit.jsonl";
pub const CHAIN: &str = "appliance";
/// The head MAC key beside the log: 32 random bytes, hex, owner-only.
pub const KEY_FILE: &str = "audit.key";
/// Notes of refused starts, recorded at the next good start.
const REFUSED_FILE: &str = "audit.refused";

pub struct AuditLog {
    inner: Mutex<Inner>,
    /// The customer's authority as the chain records it: replayed at open, moved by `anchor`.
    anchored: Mutex<AnchoredState>,
}

struct Inner {
    file: std::fs::File,
    /// Length of the file up to the last complete record, to roll back a failed append.
    len: u64,
    head: Head,
    head_path: PathBuf,
    key: ring::hmac::Key,
    checkpoints: Option<checkpoints::Checkpointer>,
}

/// The head file: the last record's position, and its MAC (absent in logs written before heads
/// were keyed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct HeadFile {
    seq: u64,
    hash: ChainHash,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "hex_mac")]
    mac: Option<[u8; 32]>,
}

impl HeadFile {
    fn head(&self) -> Head {
        Head { seq: self.seq, hash: self.hash }
    }
}

mod hex_mac {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(mac: &Option<[u8; 32]>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&data_encoding::HEXLOWER.encode(mac.as_ref().map_or(&[][..], |m| &m[..])))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<[u8; 32]>, D::Error> {
        let text = String::deserialize(d)?;
        let bytes = data_encoding::HEXLOWER.decode(text.as_bytes()).map_err(serde::de::Error::custom)?;
        bytes.try_into().map(Some).map_err(|_| serde::de::Error::custom("a head MAC is 32 bytes"))
    }
}

/// What `verify_file` could check of the head's MAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadMac {
    /// The MAC verified under the key beside the log.
    Verified,
    /// The key beside the log could not be read (another user runs the check): only the chain,
    /// and the checkpoints if given, were checked.
    KeyUnreadable,
    /// A log from before heads were keyed.
    Unkeyed,
}

/// What verifying a log file found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileReport {
    pub head: Head,
    pub mac: HeadMac,
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
        Some(a)
            if a.seq.checked_add(1) == Some(head.seq)
                && records.iter().rev().nth(1).map_or(a.seq == 0, |r| r.head() == a) =>
        {
            Ok((head, true))
        }
        Some(a) => audit::verify_chain(CHAIN, records, Some(a)).map(|h| (h, false)).map_err(|e| e.to_string()),
    }
}

/// Reads and verifies a log file against its head file, and the head's MAC when the key beside
/// the log is readable.
pub fn verify_file(log: &Path) -> Result<FileReport, String> {
    let scan = scan(log)?;
    if scan.partial_tail {
        return Err(format!("line {} is incomplete: the log was cut mid-record", scan.records.len() + 1));
    }
    let head_file = read_head(log)?;
    let mac = match (read_key(&log.with_file_name(KEY_FILE)), head_file) {
        // Another user checking a copy may not read the key: the chain and checkpoints still speak.
        (Err(_), Some(HeadFile { mac: Some(_), .. })) => HeadMac::KeyUnreadable,
        (key, Some(h)) => {
            check_mac(key.ok().flatten().as_ref(), &h, &scan.records)?;
            if h.mac.is_some() { HeadMac::Verified } else { HeadMac::Unkeyed }
        }
        (_, None) => HeadMac::Unkeyed,
    };
    let (head, _) = check(&scan.records, head_file.map(|h| h.head()))?;
    Ok(FileReport { head, mac })
}

/// Checks the head file's MAC under `key`. An unkeyed head passes only while the chain has never
/// recorded keying its head (an old log not yet migrated).
fn check_mac(key: Option<&ring::hmac::Key>, head: &HeadFile, records: &[Record]) -> Result<(), String> {
    match (head.mac, key) {
        (Some(mac), Some(key)) if head.head().mac_verifies(key, CHAIN, &mac) => Ok(()),
        (Some(_), Some(_)) => Err("the head file's MAC does not verify: the head was rewritten".into()),
        (Some(_), None) => Err(format!("the head is keyed but its key {KEY_FILE} is missing")),
        (None, _) if was_keyed(records) => {
            Err("the head file has no MAC although the log's head was keyed: the head was rewritten".into())
        }
        (None, _) => Ok(()),
    }
}

/// Whether the chain records that its head was keyed.
fn was_keyed(records: &[Record]) -> bool {
    records.iter().any(|r| r.event.action == AuditAction::AuditHeadKeyed.as_str())
}

fn read_head(log: &Path) -> Result<Option<HeadFile>, String> {
    match std::fs::read_to_string(head_path(log)) {
        Ok(text) => serde_json::from_str(&text).map(Some).map_err(|_| "the head file is malformed".to_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read the head file: {e}")),
    }
}

fn write_head(path: &Path, head: &Head, key: &ring::hmac::Key) -> std::io::Result<()> {
    let file = HeadFile { seq: head.seq, hash: head.hash, mac: Some(head.mac(key, CHAIN)) };
    let json = serde_json::to_vec(&file).map_err(std::io::Error::other)?;
    files::replace(path, &json, Mode::Private)
}

/// The head MAC key, `None` if there is none yet.
fn read_key(path: &Path) -> Result<Option<ring::hmac::Key>, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => data_encoding::HEXLOWER
            .decode(text.trim().as_bytes())
            .ok()
            .filter(|k| k.len() == 32)
            .map(|k| Some(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &k)))
            .ok_or_else(|| format!("{KEY_FILE} is damaged: it is not 32 bytes of hex")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {KEY_FILE}: {e}")),
    }
}

/// Makes a new head MAC key, owner-only, from the OS random generator.
fn create_key(path: &Path) -> Result<ring::hmac::Key, String> {
    use ring::rand::SecureRandom;
    let mut key = [0u8; 32];
    ring::rand::SystemRandom::new().fill(&mut key).map_err(|_| "the OS random generator failed".to_owned())?;
    files::replace(path, data_encoding::HEXLOWER.encode(&key).as_bytes(), Mode::Private)
        .map_err(|e| format!("cannot write {KEY_FILE}: {e}"))?;
    Ok(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key))
}

/// Leaves a note of a refused start, for the next start that verifies to record.
fn note_refusal(state_dir: &Path, why: &str) {
    use std::io::Write as _;
    let line = serde_json::json!({ "at": crate::clock::now(), "reason": why }).to_string();
    let mut opts = std::fs::OpenOptions::new();
    opts.append(true).create(true);
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    if let Err(e) = opts.open(state_dir.join(REFUSED_FILE)).and_then(|mut f| writeln!(f, "{line}")) {
        tracing::error!(error = %e, "cannot leave a note of the refused start");
    }
}

/// The notes refused starts left, oldest first.
fn refusal_notes(state_dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(state_dir.join(REFUSED_FILE))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| serde_json::json!({ "reason": "an unreadable note" })))
        .collect()
}

impl AuditLog {
    /// Opens the log in `state_dir`, verifying what is already there; no checkpoints.
    pub fn open(state_dir: &Path) -> Result<Self, ApplianceError> {
        Self::open_with(state_dir, None)
    }

    /// Opens the log, verifying it and, with a checkpoint file, that it matches its checkpoints.
    pub fn open_with(state_dir: &Path, checkpoints: Option<&CheckpointConfig>) -> Result<Self, ApplianceError> {
        let path = state_dir.join(LOG_FILE);
        let refuse = |why: String| {
            tracing::error!(reason = %why, "the local audit log does not verify");
            note_refusal(state_dir, &why);
            ApplianceError::Customer(format!(
                "the local audit log {} does not verify ({why}); refusing to run on a tampered audit log. Compare it with your checkpoints (`airlock audit verify --file … --checkpoints …`) and restore it, or move the state directory aside to re-install",
                path.display()
            ))
        };
        let scan = scan(&path).map_err(refuse)?;
        let head_file = read_head(&path).map_err(refuse)?;
        let key_path = state_dir.join(KEY_FILE);
        let key = read_key(&key_path).map_err(refuse)?;
        if let Some(h) = &head_file {
            check_mac(key.as_ref(), h, &scan.records).map_err(refuse)?;
        }
        // Keyed now: a new log, or an old one whose head had no MAC (once: see `was_keyed`).
        let newly_keyed = !was_keyed(&scan.records);
        let key = match key {
            Some(key) => key,
            None => create_key(&key_path).map_err(refuse)?,
        };
        let (head, rolled_forward) = check(&scan.records, head_file.map(|h| h.head())).map_err(refuse)?;
        let checkpoints = checkpoints
            .map(|config| checkpoints::Checkpointer::open(state_dir, config))
            .transpose()
            .map_err(|why| ApplianceError::Customer(format!("audit checkpoints: {why}")))?;
        if let Some(cp) = &checkpoints {
            cp.check(&scan.records).map_err(refuse)?;
        }
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
        let log = Self {
            inner: Mutex::new(Inner {
                file,
                len: scan.complete_len,
                head,
                head_path: head_path(&path),
                key,
                checkpoints,
            }),
            anchored: Mutex::new(AnchoredState::replay(&scan.records)),
        };
        if rolled_forward || scan.partial_tail || newly_keyed {
            let inner = log.inner.lock().unwrap_or_else(|e| e.into_inner());
            write_head(&inner.head_path, &inner.head, &inner.key).map_err(io)?;
        }
        if rolled_forward || scan.partial_tail {
            log.record(
                AuditAction::AuditRecovered,
                Outcome::Success,
                serde_json::json!({ "dropped_partial_record": scan.partial_tail, "head_rolled_forward": rolled_forward }),
            )?;
        }
        if newly_keyed {
            // An old log's head is keyed as it stands: from here on it carries a MAC.
            let migrated = head.seq > 0;
            log.record(
                AuditAction::AuditHeadKeyed,
                Outcome::Success,
                serde_json::json!({ "migrated_unkeyed_head": migrated, "seq": head.seq, "key_file": KEY_FILE }),
            )?;
            if migrated {
                tracing::warn!(
                    seq = head.seq,
                    "the audit log's head was not keyed; it is keyed from now on (audit.head_keyed)"
                );
            }
        }
        // Starts refused since the last good one are recorded now that the log verifies.
        let notes = refusal_notes(state_dir);
        for note in &notes {
            log.record(AuditAction::ApplianceStartRefused, Outcome::Denied, note.clone())?;
        }
        if !notes.is_empty() {
            std::fs::remove_file(state_dir.join(REFUSED_FILE)).map_err(io)?;
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
        write_head(&inner.head_path, &inner.head, &inner.key).map_err(io)?;
        let head = inner.head;
        if let Some(cp) = inner.checkpoints.as_mut()
            && cp.count()
            && let Err(e) = cp.write(head, CheckpointReason::Periodic)
        {
            // The record is durable; a checkpoint that could not be sent is the customer's to see.
            tracing::error!(error = %e, seq = head.seq, "cannot write an audit checkpoint");
        }
        // The customer's log tools read stdout; logs go to stderr.
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        Ok(())
    }
}

impl AuditLog {
    /// The customer's authority as the chain records it.
    pub(crate) fn anchored(&self) -> AnchoredState {
        self.anchored.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Records a change of the customer's authority state (see `airlock_core::audit::anchor`).
    pub(crate) fn anchor(&self, anchor: &Anchor) -> Result<(), ApplianceError> {
        self.record(anchor.action(), Outcome::Success, anchor.detail())?;
        self.anchored.lock().unwrap_or_else(|e| e.into_inner()).apply(anchor);
        Ok(())
    }

    /// Writes a checkpoint of the head now (at start and stop), if checkpoints are configured.
    pub fn checkpoint(&self, reason: CheckpointReason) -> Result<(), ApplianceError> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let head = inner.head;
        match inner.checkpoints.as_mut() {
            Some(cp) => cp.write(head, reason).map_err(|e| {
                ApplianceError::Customer(format!("writing an audit checkpoint: {e}; check --audit-checkpoints"))
            }),
            None => Ok(()),
        }
    }
}

/// Verifies a log file as [`verify_file`] does, then against a checkpoint file signed by `key`.
pub fn verify_file_with_checkpoints(
    log: &Path,
    checkpoint_lines: &str,
    key: &CustomerPublicKey,
) -> Result<(FileReport, CheckpointsReport), String> {
    let report = verify_file(log)?;
    let records = scan(log)?.records;
    let checked = check_checkpoints(CHAIN, &records, checkpoint_lines.lines(), key).map_err(|e| e.to_string())?;
    Ok((report, checked))
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

    fn key(dir: &Path) -> ring::hmac::Key {
        read_key(&dir.join(KEY_FILE)).unwrap().unwrap()
    }

    fn records(dir: &Path) -> Vec<Record> {
        std::fs::read_to_string(dir.join(LOG_FILE)).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

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
        write_head(&head_path(&log_path), &lines[2].head(), &key(dir.path())).unwrap();
        let log = AuditLog::open(dir.path()).unwrap();
        log.record(AuditAction::ApplianceStart, Outcome::Success, serde_json::Value::Null).unwrap();
        assert_eq!(
            actions(dir.path()),
            [
                "audit.head_keyed",
                "phase.disable",
                "phase.enable",
                "policy.update",
                "audit.recovered",
                "appliance.start"
            ]
        );
        assert_eq!(verify_file(&log_path).unwrap().head.seq, 6);
        // Two records past the head is not a crash: refused.
        write_head(&head_path(&log_path), &lines[1].head(), &key(dir.path())).unwrap();
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
        assert_eq!(actions(dir.path()), ["audit.head_keyed", "phase.disable", "phase.enable", "audit.recovered"]);
        assert_eq!(verify_file(&log_path).unwrap().head.seq, 4);
    }

    #[test]
    fn the_head_is_keyed_with_an_owner_only_key() {
        use std::os::unix::fs::PermissionsExt;
        let dir = log_with(2);
        let log_path = dir.path().join(LOG_FILE);
        let mode = std::fs::metadata(dir.path().join(KEY_FILE)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let head: HeadFile = serde_json::from_str(&std::fs::read_to_string(head_path(&log_path)).unwrap()).unwrap();
        assert!(head.head().mac_verifies(&key(dir.path()), CHAIN, &head.mac.unwrap()));
        assert_eq!(verify_file(&log_path).unwrap(), FileReport { head: head.head(), mac: HeadMac::Verified });
    }

    #[test]
    fn a_head_with_a_bad_mac_refuses_start_and_is_recorded_at_the_next_good_start() {
        let dir = log_with(3);
        let log_path = dir.path().join(LOG_FILE);
        let good_head = std::fs::read(head_path(&log_path)).unwrap();
        // Cut the last record and rewrite the head without the key: a self-consistent chain.
        let recs = records(dir.path());
        let cut: String = recs[..3].iter().map(|r| serde_json::to_string(r).unwrap() + "\n").collect();
        std::fs::write(&log_path, &cut).unwrap();
        let forged_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &[9; 32]);
        write_head(&head_path(&log_path), &recs[2].head(), &forged_key).unwrap();
        assert!(verify_file(&log_path).unwrap_err().contains("MAC does not verify"));
        let err = AuditLog::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("MAC does not verify") && err.contains("refusing to run"), "{err}");
        // The refusal changed nothing: the log is as it was left.
        assert_eq!(std::fs::read_to_string(&log_path).unwrap(), cut);
        // An unkeyed head is refused too, once the log was keyed.
        let unkeyed = HeadFile { seq: recs[2].seq, hash: recs[2].hash, mac: None };
        std::fs::write(head_path(&log_path), serde_json::to_vec(&unkeyed).unwrap()).unwrap();
        assert!(AuditLog::open(dir.path()).err().unwrap().to_string().contains("has no MAC"));
        // So is a keyed head whose key was deleted.
        let full: String = recs.iter().map(|r| serde_json::to_string(r).unwrap() + "\n").collect();
        std::fs::write(&log_path, full).unwrap();
        std::fs::write(head_path(&log_path), &good_head).unwrap();
        let key_text = std::fs::read(dir.path().join(KEY_FILE)).unwrap();
        std::fs::remove_file(dir.path().join(KEY_FILE)).unwrap();
        assert!(AuditLog::open(dir.path()).err().unwrap().to_string().contains("key audit.key is missing"));
        // Put back, the log starts, and the refused starts are in it.
        std::fs::write(dir.path().join(KEY_FILE), key_text).unwrap();
        drop(AuditLog::open(dir.path()).unwrap());
        let recs = records(dir.path());
        let refused: Vec<&Record> = recs.iter().filter(|r| r.event.action == "appliance.start_refused").collect();
        assert_eq!(refused.len(), 3, "{recs:?}");
        assert!(refused[0].event.detail["reason"].as_str().unwrap().contains("MAC does not verify"));
        assert_eq!(refused[0].event.outcome, Outcome::Denied);
        assert!(!dir.path().join(REFUSED_FILE).exists());
        assert_eq!(verify_file(&log_path).unwrap().mac, HeadMac::Verified);
    }

    #[test]
    fn an_unkeyed_head_of_an_old_log_is_keyed_once_and_recorded() {
        let dir = log_with(3);
        let log_path = dir.path().join(LOG_FILE);
        // An old state directory: its records have no keying record, its head no MAC, no key.
        let old: Vec<Record> = {
            let mut head = Head::EMPTY;
            ACTIONS
                .iter()
                .map(|a| {
                    let event = Event {
                        actor: "appliance".into(),
                        action: a.as_str().into(),
                        workspace: None,
                        target: None,
                        outcome: Outcome::Success,
                        detail: serde_json::Value::Null,
                    };
                    let r = Record::append(CHAIN, head, crate::clock::now(), event);
                    head = r.head();
                    r
                })
                .collect()
        };
        std::fs::write(&log_path, old.iter().map(|r| serde_json::to_string(r).unwrap() + "\n").collect::<String>())
            .unwrap();
        std::fs::write(head_path(&log_path), serde_json::to_vec(&old[2].head()).unwrap()).unwrap();
        std::fs::remove_file(dir.path().join(KEY_FILE)).unwrap();
        assert_eq!(verify_file(&log_path).unwrap().mac, HeadMac::Unkeyed);
        drop(AuditLog::open(dir.path()).unwrap());
        let recs = records(dir.path());
        assert_eq!(recs[3].event.action, "audit.head_keyed");
        assert_eq!(recs[3].event.detail["migrated_unkeyed_head"], true);
        assert_eq!(verify_file(&log_path).unwrap().mac, HeadMac::Verified);
        // Once: a second start adds nothing.
        drop(AuditLog::open(dir.path()).unwrap());
        assert_eq!(records(dir.path()).len(), 4);
    }

    use airlock_core::audit::checkpoint::Checkpoint;

    fn checkpointed(dir: &Path, every: u64) -> (CheckpointConfig, tempfile::TempDir) {
        let outside = tempfile::tempdir().unwrap();
        let config = CheckpointConfig { sink: CheckpointSink::File(outside.path().join("checkpoints.jsonl")), every };
        let _ = dir;
        (config, outside)
    }

    fn cp_lines(config: &CheckpointConfig) -> String {
        let CheckpointSink::File(path) = &config.sink else { panic!("a file sink") };
        std::fs::read_to_string(path).unwrap()
    }

    /// What an attacker with the appliance's uid (and so, until the box, its key) does: cut the
    /// log to `keep` records and write a head for it with a valid MAC.
    fn cut_and_rewrite_head(dir: &Path, keep: usize) {
        let recs = records(dir);
        let cut: String = recs[..keep].iter().map(|r| serde_json::to_string(r).unwrap() + "\n").collect();
        std::fs::write(dir.join(LOG_FILE), cut).unwrap();
        write_head(&head_path(&dir.join(LOG_FILE)), &recs[keep - 1].head(), &key(dir)).unwrap();
    }

    #[test]
    fn checkpoints_are_signed_at_start_stop_and_every_n_records() {
        let dir = tempfile::tempdir().unwrap();
        let (config, _outside) = checkpointed(dir.path(), 2);
        let log = AuditLog::open_with(dir.path(), Some(&config)).unwrap();
        log.checkpoint(CheckpointReason::Start).unwrap();
        for action in ACTIONS {
            log.record(action, Outcome::Success, serde_json::Value::Null).unwrap();
        }
        log.checkpoint(CheckpointReason::Stop).unwrap();
        drop(log);
        let key = checkpoints::public_key(dir.path()).unwrap();
        let text = cp_lines(&config);
        let seqs: Vec<(u64, CheckpointReason)> =
            text.lines().map(|l| Checkpoint::from_line(l, &key).unwrap()).map(|c| (c.seq, c.reason)).collect();
        // Record 1 is audit.head_keyed, written by `open` after the checkpointer exists: it counts.
        assert_eq!(seqs, [(1, CheckpointReason::Start), (3, CheckpointReason::Periodic), (4, CheckpointReason::Stop)]);
        let (_, checked) = verify_file_with_checkpoints(&dir.path().join(LOG_FILE), &text, &key).unwrap();
        assert_eq!(checked.last_seq, 4);
    }

    #[test]
    fn a_truncated_log_with_a_rewritten_head_refuses_start_against_its_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let (config, _outside) = checkpointed(dir.path(), 1000);
        let log = AuditLog::open_with(dir.path(), Some(&config)).unwrap();
        for action in ACTIONS {
            log.record(action, Outcome::Success, serde_json::Value::Null).unwrap();
        }
        log.checkpoint(CheckpointReason::Stop).unwrap();
        drop(log);
        cut_and_rewrite_head(dir.path(), 2);
        // The head and its MAC agree with the cut log: only the checkpoint knows.
        assert!(verify_file(&dir.path().join(LOG_FILE)).is_ok());
        let before = std::fs::read(dir.path().join(LOG_FILE)).unwrap();
        let err = AuditLog::open_with(dir.path(), Some(&config)).err().unwrap().to_string();
        assert!(err.contains("truncation") && err.contains("refusing to run"), "{err}");
        assert_eq!(std::fs::read(dir.path().join(LOG_FILE)).unwrap(), before, "a refusal changes nothing");
        let key = checkpoints::public_key(dir.path()).unwrap();
        let err = verify_file_with_checkpoints(&dir.path().join(LOG_FILE), &cp_lines(&config), &key).unwrap_err();
        assert!(err.contains("truncation"), "{err}");
    }

    #[test]
    fn a_checkpoint_file_inside_the_state_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        for inside in [dir.path().join("checkpoints.jsonl"), dir.path().join("sub/../sub/checkpoints.jsonl")] {
            let config = CheckpointConfig { sink: CheckpointSink::File(inside), every: 10 };
            let err = AuditLog::open_with(dir.path(), Some(&config)).err().unwrap().to_string();
            assert!(err.contains("inside the state directory"), "{err}");
        }
    }

    #[test]
    fn checkpoints_can_go_to_syslog() {
        let dir = tempfile::tempdir().unwrap();
        let sock_dir = tempfile::tempdir().unwrap();
        let socket = sock_dir.path().join("log");
        let syslog = std::os::unix::net::UnixDatagram::bind(&socket).unwrap();
        let config = CheckpointConfig { sink: CheckpointSink::Syslog(socket), every: 1000 };
        let log = AuditLog::open_with(dir.path(), Some(&config)).unwrap();
        log.checkpoint(CheckpointReason::Start).unwrap();
        let mut buf = vec![0u8; 8192];
        let n = syslog.recv(&mut buf).unwrap();
        let line = String::from_utf8_lossy(&buf[..n]).into_owned();
        assert!(line.starts_with("<13>airlock-appliance["), "{line}");
        // A syslog line, as the customer's syslog stored it, verifies the log.
        let key = checkpoints::public_key(dir.path()).unwrap();
        let stored = format!("Dec  1 05:00:00 host {line}");
        verify_file_with_checkpoints(&dir.path().join(LOG_FILE), &stored, &key).unwrap();
    }
}
