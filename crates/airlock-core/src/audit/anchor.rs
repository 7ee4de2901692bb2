//! The appliance's authority state, anchored in its audit chain.
//!
//! The files that hold the customer's authority on the appliance (the pinned key set, the
//! signed policy, pre-approval run counters and revocations) are plain files a local writer
//! could put back or edit. Each change is also recorded in the hash chain as an [`Anchor`];
//! at start, [`AnchoredState::compare`] holds the files against the chain's last word:
//! - the pinned key set must be the anchored one (it changes only by a signed rotation);
//! - the policy's serial must not be below its high-water mark, nor the same serial another
//!   content;
//! - a pre-approval's run counter must not be below the anchored count, a revoked one must stay
//!   revoked, and none may vanish.
//!
//! A file ahead of the chain (a crash between saving it and recording it, or a state directory
//! from before anchors) is anchored as found: only the customer's signatures move state forward,
//! and going forward only restricts.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{AuditAction, Record};

/// One recorded piece of state. Its audit action says which; the record's `detail` holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Anchor {
    PinnedKeys { key_ids: Vec<String> },
    PolicySerial { serial: u64, digest: String },
    PreApprovalRuns { id: String, runs_used: u32 },
    PreApprovalRevoked { id: String },
}

#[derive(Serialize, Deserialize)]
struct KeysDetail {
    key_ids: Vec<String>,
}

#[derive(Serialize, Deserialize)]
struct PolicyDetail {
    serial: u64,
    digest: String,
}

#[derive(Serialize, Deserialize)]
struct RunsDetail {
    id: String,
    runs_used: u32,
}

#[derive(Serialize, Deserialize)]
struct RevokedDetail {
    id: String,
}

impl Anchor {
    pub fn action(&self) -> AuditAction {
        match self {
            Anchor::PinnedKeys { .. } => AuditAction::StatePinnedKeys,
            Anchor::PolicySerial { .. } => AuditAction::StatePolicySerial,
            Anchor::PreApprovalRuns { .. } => AuditAction::StatePreApprovalRuns,
            Anchor::PreApprovalRevoked { .. } => AuditAction::StatePreApprovalRevoked,
        }
    }

    /// The record's `detail`.
    pub fn detail(&self) -> serde_json::Value {
        let value = match self {
            Anchor::PinnedKeys { key_ids } => serde_json::to_value(KeysDetail { key_ids: key_ids.clone() }),
            Anchor::PolicySerial { serial, digest } => {
                serde_json::to_value(PolicyDetail { serial: *serial, digest: digest.clone() })
            }
            Anchor::PreApprovalRuns { id, runs_used } => {
                serde_json::to_value(RunsDetail { id: id.clone(), runs_used: *runs_used })
            }
            Anchor::PreApprovalRevoked { id } => serde_json::to_value(RevokedDetail { id: id.clone() }),
        };
        // Plain data with string keys: serialization cannot fail.
        value.unwrap_or_default()
    }

    /// The anchor a record holds, if it is one (and a success). Records written before anchors
    /// existed count too: a key set pinned (`customer_keys.pinned`), a policy accepted
    /// (`policy.update`), a pre-approval revoked (`pre_approval.revoke`), so a state directory
    /// edited before the upgrade is caught at its first start after it.
    pub fn from_record(record: &Record) -> Option<Self> {
        if record.event.outcome != super::Outcome::Success {
            return None;
        }
        let action: AuditAction = record.event.action.parse().ok()?;
        let detail = record.event.detail.clone();
        match action {
            AuditAction::StatePinnedKeys | AuditAction::CustomerKeysPinned => {
                let d: KeysDetail = serde_json::from_value(detail).ok()?;
                Some(Anchor::PinnedKeys { key_ids: d.key_ids })
            }
            AuditAction::StatePolicySerial | AuditAction::PolicyUpdate => {
                let d: PolicyDetail = serde_json::from_value(detail).ok()?;
                Some(Anchor::PolicySerial { serial: d.serial, digest: d.digest })
            }
            AuditAction::StatePreApprovalRuns => {
                let d: RunsDetail = serde_json::from_value(detail).ok()?;
                Some(Anchor::PreApprovalRuns { id: d.id, runs_used: d.runs_used })
            }
            AuditAction::StatePreApprovalRevoked | AuditAction::PreApprovalRevoke => {
                let d: RevokedDetail = serde_json::from_value(detail).ok()?;
                Some(Anchor::PreApprovalRevoked { id: d.id })
            }
            _ => None,
        }
    }
}

/// A pre-approval's counter and revocation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PreApprovalState {
    pub runs_used: u32,
    pub revoked: bool,
}

/// The state as the chain last recorded it, or as the files hold it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AnchoredState {
    /// Sorted key ids; `None` before any key was pinned.
    pub pinned_keys: Option<Vec<String>>,
    /// The policy's high-water mark: serial and content digest.
    pub policy: Option<(u64, String)>,
    pub pre_approvals: BTreeMap<String, PreApprovalState>,
}

/// How a file disagrees with the chain.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Divergence {
    #[error(
        "the pinned customer keys on disk ({disk:?}) are not the ones the audit log pinned ({anchored:?}): the key file was edited"
    )]
    PinnedKeysEdited { anchored: Vec<String>, disk: Vec<String> },
    #[error(
        "the signed policy on disk (serial {disk}) is older than serial {anchored} already in force: an older policy was put back"
    )]
    PolicyRolledBack { anchored: u64, disk: u64 },
    #[error(
        "the signed policy on disk has serial {serial} but not the content in force at that serial: the policy file was replaced"
    )]
    PolicyReplaced { serial: u64 },
    #[error("the signed policy (serial {anchored}) is gone from disk: the policy file was removed")]
    PolicyRemoved { anchored: u64 },
    #[error("pre-approval `{id}` has {disk} run(s) used on disk, but {anchored} were counted: its counter was reset")]
    RunsReset { id: String, anchored: u32, disk: u32 },
    #[error("pre-approval `{id}` was revoked, but is not on disk: its revocation was lifted")]
    RevocationLifted { id: String },
    #[error("pre-approval `{id}` is gone from disk: its counter and revocation were removed")]
    PreApprovalRemoved { id: String },
}

/// What comparing the files with the chain decided.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Comparison {
    /// Files behind or beside the chain: refuse to start.
    pub diverged: Vec<Divergence>,
    /// Files ahead of the chain, or never anchored: record these.
    pub to_anchor: Vec<Anchor>,
}

impl AnchoredState {
    /// Replays the anchors of a verified chain; the last of each kind wins.
    pub fn replay<'a>(records: impl IntoIterator<Item = &'a Record>) -> Self {
        let mut state = Self::default();
        for anchor in records.into_iter().filter_map(Anchor::from_record) {
            state.apply(&anchor);
        }
        state
    }

    pub fn apply(&mut self, anchor: &Anchor) {
        match anchor {
            Anchor::PinnedKeys { key_ids } => {
                let mut ids = key_ids.clone();
                ids.sort();
                self.pinned_keys = Some(ids);
            }
            Anchor::PolicySerial { serial, digest } => self.policy = Some((*serial, digest.clone())),
            Anchor::PreApprovalRuns { id, runs_used } => {
                self.pre_approvals.entry(id.clone()).or_default().runs_used = *runs_used;
            }
            Anchor::PreApprovalRevoked { id } => self.pre_approvals.entry(id.clone()).or_default().revoked = true,
        }
    }

    /// Compares `disk` (the files) with this (the chain).
    pub fn compare(&self, disk: &AnchoredState) -> Comparison {
        let mut out = Comparison::default();
        let disk_keys = disk.pinned_keys.clone().unwrap_or_default();
        match &self.pinned_keys {
            Some(anchored) if *anchored != disk_keys => {
                out.diverged.push(Divergence::PinnedKeysEdited { anchored: anchored.clone(), disk: disk_keys })
            }
            Some(_) => {}
            None if !disk_keys.is_empty() => out.to_anchor.push(Anchor::PinnedKeys { key_ids: disk_keys }),
            None => {}
        }
        match (&self.policy, &disk.policy) {
            (Some((serial, _)), None) => out.diverged.push(Divergence::PolicyRemoved { anchored: *serial }),
            (Some((a, _)), Some((d, _))) if d < a => {
                out.diverged.push(Divergence::PolicyRolledBack { anchored: *a, disk: *d })
            }
            (Some((a, ad)), Some((d, dd))) if d == a && ad != dd => {
                out.diverged.push(Divergence::PolicyReplaced { serial: *d })
            }
            (Some((a, _)), Some((d, dd))) if d > a => {
                out.to_anchor.push(Anchor::PolicySerial { serial: *d, digest: dd.clone() })
            }
            (None, Some((d, dd))) => out.to_anchor.push(Anchor::PolicySerial { serial: *d, digest: dd.clone() }),
            _ => {}
        }
        for (id, anchored) in &self.pre_approvals {
            let Some(on_disk) = disk.pre_approvals.get(id) else {
                out.diverged.push(Divergence::PreApprovalRemoved { id: id.clone() });
                continue;
            };
            if on_disk.runs_used < anchored.runs_used {
                out.diverged.push(Divergence::RunsReset {
                    id: id.clone(),
                    anchored: anchored.runs_used,
                    disk: on_disk.runs_used,
                });
            }
            if anchored.revoked && !on_disk.revoked {
                out.diverged.push(Divergence::RevocationLifted { id: id.clone() });
            }
        }
        for (id, on_disk) in &disk.pre_approvals {
            let anchored = self.pre_approvals.get(id);
            if anchored.is_none_or(|a| on_disk.runs_used > a.runs_used) {
                out.to_anchor.push(Anchor::PreApprovalRuns { id: id.clone(), runs_used: on_disk.runs_used });
            }
            if on_disk.revoked && !anchored.is_some_and(|a| a.revoked) {
                out.to_anchor.push(Anchor::PreApprovalRevoked { id: id.clone() });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Timestamp;
    use crate::audit::{Event, Head, Outcome};

    fn chain(anchors: &[Anchor]) -> Vec<Record> {
        let mut head = Head::EMPTY;
        anchors
            .iter()
            .map(|a| {
                let event = Event {
                    actor: "appliance".into(),
                    action: a.action().as_str().into(),
                    workspace: None,
                    target: None,
                    outcome: Outcome::Success,
                    detail: a.detail(),
                };
                let r = Record::append("appliance", head, Timestamp::from_unix_millis(0), event);
                head = r.head();
                r
            })
            .collect()
    }

    fn disk(keys: &[&str], policy: Option<(u64, &str)>, pre: &[(&str, u32, bool)]) -> AnchoredState {
        AnchoredState {
            pinned_keys: Some(keys.iter().map(|k| k.to_string()).collect()),
            policy: policy.map(|(s, d)| (s, d.to_owned())),
            pre_approvals: pre
                .iter()
                .map(|(id, runs, revoked)| (id.to_string(), PreApprovalState { runs_used: *runs, revoked: *revoked }))
                .collect(),
        }
    }

    fn anchored() -> AnchoredState {
        AnchoredState::replay(&chain(&[
            Anchor::PinnedKeys { key_ids: vec!["a".into()] },
            Anchor::PolicySerial { serial: 1, digest: "d1".into() },
            Anchor::PreApprovalRuns { id: "p".into(), runs_used: 0 },
            Anchor::PinnedKeys { key_ids: vec!["b".into(), "c".into()] },
            Anchor::PolicySerial { serial: 2, digest: "d2".into() },
            Anchor::PreApprovalRuns { id: "p".into(), runs_used: 2 },
            Anchor::PreApprovalRevoked { id: "q".into() },
        ]))
    }

    #[test]
    fn the_last_anchor_of_each_kind_wins_and_matching_files_pass() {
        let state = anchored();
        assert_eq!(state.pinned_keys, Some(vec!["b".into(), "c".into()]));
        let same = disk(&["b", "c"], Some((2, "d2")), &[("p", 2, false), ("q", 0, true)]);
        assert_eq!(state.compare(&same), Comparison::default());
    }

    #[test]
    fn files_behind_the_chain_diverge() {
        let state = anchored();
        let cases = [
            (disk(&["b", "c", "vendor"], Some((2, "d2")), &[("p", 2, false), ("q", 0, true)]), "key file was edited"),
            (disk(&["b", "c"], Some((1, "d1")), &[("p", 2, false), ("q", 0, true)]), "older policy was put back"),
            (disk(&["b", "c"], Some((2, "dX")), &[("p", 2, false), ("q", 0, true)]), "policy file was replaced"),
            (disk(&["b", "c"], None, &[("p", 2, false), ("q", 0, true)]), "policy file was removed"),
            (disk(&["b", "c"], Some((2, "d2")), &[("p", 0, false), ("q", 0, true)]), "counter was reset"),
            (disk(&["b", "c"], Some((2, "d2")), &[("p", 2, false), ("q", 0, false)]), "revocation was lifted"),
            (disk(&["b", "c"], Some((2, "d2")), &[("q", 0, true)]), "were removed"),
        ];
        for (files, expect) in cases {
            let cmp = state.compare(&files);
            assert_eq!(cmp.diverged.len(), 1, "{expect}: {cmp:?}");
            assert!(cmp.diverged[0].to_string().contains(expect), "{expect}: {}", cmp.diverged[0]);
        }
    }

    #[test]
    fn records_from_before_anchors_count() {
        let legacy = |action: AuditAction, detail: serde_json::Value| Event {
            actor: "appliance".into(),
            action: action.as_str().into(),
            workspace: None,
            target: None,
            outcome: Outcome::Success,
            detail,
        };
        let first = Record::append(
            "appliance",
            Head::EMPTY,
            Timestamp::from_unix_millis(0),
            legacy(AuditAction::CustomerKeysPinned, serde_json::json!({ "key_ids": ["k"] })),
        );
        let second = Record::append(
            "appliance",
            first.head(),
            Timestamp::from_unix_millis(0),
            legacy(AuditAction::PolicyUpdate, serde_json::json!({ "serial": 4, "digest": "d4", "signed_by": ["k"] })),
        );
        let state = AnchoredState::replay([&first, &second]);
        assert_eq!(state.pinned_keys, Some(vec!["k".into()]));
        assert_eq!(state.policy, Some((4, "d4".into())));
        let vendor_key_appended = disk(&["k", "vendor"], Some((4, "d4")), &[]);
        assert!(matches!(state.compare(&vendor_key_appended).diverged[..], [Divergence::PinnedKeysEdited { .. }]));
    }

    #[test]
    fn files_ahead_of_the_chain_or_never_anchored_are_anchored() {
        let cmp = AnchoredState::default().compare(&disk(&["a"], Some((3, "d3")), &[("p", 1, true)]));
        assert!(cmp.diverged.is_empty());
        assert_eq!(
            cmp.to_anchor,
            [
                Anchor::PinnedKeys { key_ids: vec!["a".into()] },
                Anchor::PolicySerial { serial: 3, digest: "d3".into() },
                Anchor::PreApprovalRuns { id: "p".into(), runs_used: 1 },
                Anchor::PreApprovalRevoked { id: "p".into() },
            ]
        );
        let ahead = anchored().compare(&disk(&["b", "c"], Some((3, "d3")), &[("p", 3, false), ("q", 0, true)]));
        assert!(ahead.diverged.is_empty());
        assert_eq!(ahead.to_anchor.len(), 2, "{ahead:?}");
        // An empty state directory has nothing to say.
        assert_eq!(AnchoredState::default().compare(&AnchoredState::default()), Comparison::default());
    }
}
