//! Signed checkpoints of an audit chain's head, written to a place outside the writer's store.
//!
//! A head file (even MAC'd) lives beside the log, so whoever can rewrite the log may one day
//! rewrite both; a checkpoint the writer signed and sent elsewhere (an append-only file the
//! customer chose, or syslog) cannot be taken back. Checked against a log, checkpoints show:
//! - truncation: the log ends before a checkpoint's sequence number;
//! - re-anchoring: the record at a checkpoint's sequence number has another hash (the chain
//!   was rewritten from there and re-hashed);
//! - rollback: a checkpoint's sequence number is lower than one before it (the log was put back
//!   to an older copy and the writer carried on from there).
//!
//! A checkpoint is a DSSE envelope ([`CHECKPOINT_PAYLOAD_TYPE`]) over the JSON of
//! [`Checkpoint`], signed with the writer's Ed25519 key; one envelope per line. A line may carry
//! a prefix before the envelope (syslog adds one): the envelope starts at the first `{`.

use serde::{Deserialize, Serialize};

use super::{ChainHash, Head, Record};
use crate::Timestamp;
use crate::customer_key::{CustomerPublicKey, CustomerSigningKey};
use crate::dsse::Envelope;

pub const CHECKPOINT_PAYLOAD_TYPE: &str = "application/vnd.airlock.audit-checkpoint.v1+json";

/// Why a checkpoint was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckpointReason {
    Start,
    Stop,
    /// Every N records (the appliance) or every interval (the control plane).
    Periodic,
    /// Asked for by the operator (`airlock audit checkpoint`).
    Requested,
    /// Written before the records up to it were pruned: verification starts from it.
    Prune,
}

/// The signed statement: the chain's head at a time. A wire contract.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    pub chain: String,
    pub seq: u64,
    pub hash: ChainHash,
    pub at: Timestamp,
    pub reason: CheckpointReason,
}

impl Checkpoint {
    pub fn new(chain: &str, head: Head, at: Timestamp, reason: CheckpointReason) -> Self {
        Self { chain: chain.to_owned(), seq: head.seq, hash: head.hash, at, reason }
    }

    /// One line for the checkpoint file: the envelope signed with `key`, without a newline.
    /// The key is an Ed25519 key like the customer's (the same type signs both).
    pub fn signed_line(&self, key: &CustomerSigningKey) -> String {
        // Plain data: serialization cannot fail.
        let payload = serde_json::to_vec(self).unwrap_or_default();
        Envelope::new(CHECKPOINT_PAYLOAD_TYPE, payload).sign(key).to_json()
    }

    /// Reads one line of a checkpoint file, checking its signature with `key`.
    pub fn from_line(line: &str, key: &CustomerPublicKey) -> Result<Self, String> {
        let start = line.find('{').ok_or("no checkpoint envelope on the line")?;
        let envelope = Envelope::from_json(line[start..].trim_end().as_bytes()).map_err(|e| e.to_string())?;
        let verified = envelope
            .verify(CHECKPOINT_PAYLOAD_TYPE, std::slice::from_ref(key), 1)
            .map_err(|e| format!("not signed by the checkpoint key: {e}"))?;
        serde_json::from_slice(&verified.payload).map_err(|e| format!("not a checkpoint: {e}"))
    }
}

/// How a log disagrees with its checkpoints. `line` is the checkpoint's 1-based line.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointBreak {
    #[error("checkpoint line {line}: {why}; the checkpoint file was edited, or signed with another key")]
    Unreadable { line: usize, why: String },
    #[error("checkpoint line {line} is for chain `{found}`, not `{expected}`")]
    WrongChain { line: usize, expected: String, found: String },
    #[error(
        "checkpoint line {line} saw the log at seq {checkpoint}, but it ends at seq {log}: records were removed from the end (truncation)"
    )]
    Truncated { line: usize, checkpoint: u64, log: u64 },
    #[error(
        "checkpoint line {line}: the record at seq {seq} is not the one checkpointed: the chain was rewritten and re-hashed from there (re-anchoring)"
    )]
    Reanchored { line: usize, seq: u64 },
    #[error(
        "checkpoint line {line} is at seq {seq}, after one at seq {previous}: the log was put back to an older copy (rollback)"
    )]
    RolledBack { line: usize, seq: u64, previous: u64 },
}

/// What the checkpoints confirmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckpointsReport {
    pub count: usize,
    /// The highest sequence number checkpointed.
    pub last_seq: u64,
}

/// Checks a verified chain (`records`, in order from seq 1) against the lines of a checkpoint
/// file, signed by `key`. Blank lines are skipped; every other line must be a checkpoint.
pub fn check_checkpoints<'a>(
    chain: &str,
    records: &[Record],
    lines: impl IntoIterator<Item = &'a str>,
    key: &CustomerPublicKey,
) -> Result<CheckpointsReport, CheckpointBreak> {
    let checkpoints = read_lines(lines, key)?;
    if let Some((line, cp)) = checkpoints.iter().find(|(_, cp)| cp.chain != chain) {
        return Err(CheckpointBreak::WrongChain { line: *line, expected: chain.to_owned(), found: cp.chain.clone() });
    }
    check_chain_against(Head::EMPTY, records, &checkpoints)
}

/// Reads every non-blank line of a checkpoint file (1-based line numbers kept), checking each
/// signature with `key`. Lines may be for several chains.
pub fn read_lines<'a>(
    lines: impl IntoIterator<Item = &'a str>,
    key: &CustomerPublicKey,
) -> Result<Vec<(usize, Checkpoint)>, CheckpointBreak> {
    let mut checkpoints = Vec::new();
    for (i, text) in lines.into_iter().enumerate() {
        let line = i + 1;
        if text.trim().is_empty() {
            continue;
        }
        let cp = Checkpoint::from_line(text, key).map_err(|why| CheckpointBreak::Unreadable { line, why })?;
        checkpoints.push((line, cp));
    }
    Ok(checkpoints)
}

/// Checks one verified chain against its checkpoints (all for this chain, in file order).
///
/// `records` continue the chain after `start` (a pruned chain's anchor, or [`Head::EMPTY`]).
/// A checkpoint behind `start` is about pruned records and cannot be checked here: the
/// anchor itself is a signed checkpoint, so what it covers was vouched for when it was pruned.
pub fn check_chain_against(
    start: Head,
    records: &[Record],
    checkpoints: &[(usize, Checkpoint)],
) -> Result<CheckpointsReport, CheckpointBreak> {
    // Order first: a log put back to an older copy, on which the writer carried on, also fails
    // the hash checks below, but "rollback" is what happened.
    let mut report = CheckpointsReport { count: 0, last_seq: 0 };
    for (line, cp) in checkpoints {
        if cp.seq < report.last_seq {
            return Err(CheckpointBreak::RolledBack { line: *line, seq: cp.seq, previous: report.last_seq });
        }
        report.last_seq = cp.seq;
        report.count += 1;
    }
    let log_seq = records.last().map_or(start.seq, |r| r.seq);
    for (line, cp) in checkpoints {
        let line = *line;
        if cp.seq > log_seq {
            return Err(CheckpointBreak::Truncated { line, checkpoint: cp.seq, log: log_seq });
        }
        let at = match cp.seq.checked_sub(start.seq) {
            None => continue,
            Some(0) => start.hash,
            // The chain verified from `start`, so record n sits at index n - start - 1.
            Some(n) => usize::try_from(n - 1).ok().and_then(|i| records.get(i)).map_or(ChainHash::GENESIS, |r| r.hash),
        };
        if at != cp.hash {
            return Err(CheckpointBreak::Reanchored { line, seq: cp.seq });
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{Event, Outcome};

    fn key(n: u8) -> CustomerSigningKey {
        CustomerSigningKey::from_seed([n; 32])
    }

    fn chain(n: u32, variant: &str) -> Vec<Record> {
        let mut head = Head::EMPTY;
        (0..n)
            .map(|i| {
                let event = Event {
                    actor: "appliance".into(),
                    action: format!("test.{variant}{i}"),
                    workspace: None,
                    target: None,
                    outcome: Outcome::Success,
                    detail: serde_json::Value::Null,
                };
                let r = Record::append("c", head, Timestamp::from_unix_millis(i64::from(i)), event);
                head = r.head();
                r
            })
            .collect()
    }

    fn line(records: &[Record], seq: usize, signer: &CustomerSigningKey) -> String {
        let head = if seq == 0 { Head::EMPTY } else { records[seq - 1].head() };
        Checkpoint::new("c", head, Timestamp::from_unix_millis(0), CheckpointReason::Periodic).signed_line(signer)
    }

    #[test]
    fn checkpoints_on_the_chain_verify() {
        let recs = chain(6, "a");
        let lines = [line(&recs, 0, &key(1)), line(&recs, 3, &key(1)), String::new(), line(&recs, 6, &key(1))];
        let report = check_checkpoints("c", &recs, lines.iter().map(String::as_str), &key(1).public()).unwrap();
        assert_eq!(report, CheckpointsReport { count: 3, last_seq: 6 });
        // A syslog prefix is skipped.
        let prefixed = format!("<134>Dec  1 05:00:00 host airlock-appliance[1]: {}", lines[1]);
        assert!(check_checkpoints("c", &recs, [prefixed.as_str()], &key(1).public()).is_ok());
    }

    #[test]
    fn truncation_reanchoring_and_rollback_are_detected() {
        let recs = chain(6, "a");
        let cp5 = line(&recs, 5, &key(1));
        let check = |records: &[Record], lines: &[&str]| {
            check_checkpoints("c", records, lines.iter().copied(), &key(1).public())
        };
        assert_eq!(check(&recs[..4], &[&cp5]), Err(CheckpointBreak::Truncated { line: 1, checkpoint: 5, log: 4 }));
        // The same length, re-hashed from seq 2: self-consistent, but not the chain checkpointed.
        let mut rewritten = recs[..1].to_vec();
        rewritten.extend(chain(6, "b").into_iter().skip(1));
        let rewritten = {
            let mut head = rewritten[0].head();
            rewritten
                .into_iter()
                .enumerate()
                .map(|(i, r)| {
                    if i == 0 {
                        return r;
                    }
                    let r = Record::append("c", head, r.at, r.event);
                    head = r.head();
                    r
                })
                .collect::<Vec<_>>()
        };
        crate::audit::verify_chain("c", &rewritten, None).unwrap();
        assert_eq!(check(&rewritten, &[&cp5]), Err(CheckpointBreak::Reanchored { line: 1, seq: 5 }));
        let cp3 = line(&recs, 3, &key(1));
        assert_eq!(check(&recs, &[&cp5, &cp3]), Err(CheckpointBreak::RolledBack { line: 2, seq: 3, previous: 5 }));
    }

    #[test]
    fn forged_or_edited_checkpoints_are_refused() {
        let recs = chain(3, "a");
        let forged = line(&recs, 3, &key(2));
        let check = |lines: &[&str]| check_checkpoints("c", &recs, lines.iter().copied(), &key(1).public());
        assert!(matches!(check(&[&forged]), Err(CheckpointBreak::Unreadable { line: 1, .. })));
        let good = line(&recs, 2, &key(1));
        let mut env: serde_json::Value = serde_json::from_str(&good).unwrap();
        env["payload"] = data_encoding::BASE64
            .encode(
                &serde_json::to_vec(&Checkpoint::new(
                    "c",
                    recs[2].head(),
                    Timestamp::from_unix_millis(0),
                    CheckpointReason::Periodic,
                ))
                .unwrap(),
            )
            .into();
        assert!(matches!(check(&[&env.to_string()]), Err(CheckpointBreak::Unreadable { .. })));
        assert!(matches!(check(&["garbage"]), Err(CheckpointBreak::Unreadable { .. })));
        let other_chain = Checkpoint::new("d", recs[0].head(), Timestamp::from_unix_millis(0), CheckpointReason::Start)
            .signed_line(&key(1));
        assert!(matches!(check(&[&other_chain]), Err(CheckpointBreak::WrongChain { .. })));
    }

    #[test]
    fn a_pruned_chain_is_checked_from_its_anchor() {
        let recs = chain(6, "a");
        let start = recs[2].head();
        let kept = &recs[3..];
        crate::audit::verify_chain_from("c", start, kept, Some(recs[5].head())).unwrap();
        let cps: Vec<(usize, Checkpoint)> = [1, 3, 5]
            .iter()
            .enumerate()
            .map(|(i, &seq)| {
                let line = line(&recs, seq, &key(1));
                (i + 1, Checkpoint::from_line(&line, &key(1).public()).unwrap())
            })
            .collect();
        assert_eq!(check_chain_against(start, kept, &cps), Ok(CheckpointsReport { count: 3, last_seq: 5 }));
        // The anchor itself must be the checkpointed record.
        let wrong_start = Head { seq: 3, hash: recs[1].hash };
        assert_eq!(check_chain_against(wrong_start, kept, &cps), Err(CheckpointBreak::Reanchored { line: 2, seq: 3 }));
        // Everything after the anchor was removed: truncation behind the last checkpoint.
        assert_eq!(
            check_chain_against(start, &[], &cps),
            Err(CheckpointBreak::Truncated { line: 3, checkpoint: 5, log: 3 })
        );
        // Records before the anchor cannot continue it.
        assert!(crate::audit::verify_chain_from("c", start, &recs[2..], None).is_err());
    }
}
