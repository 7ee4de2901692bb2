//! The outbox: results and releases written down before they are sent, until the control
//! plane acknowledges them.
//!
//! - `outbox/<id>.result.json`, `outbox/<id>.release.json`: not yet acknowledged; sent again at
//!   every (re)connect, every result before any release (the control plane takes no release
//!   before its result).
//!   A queued release holds no output: it is read from the sealed file when sent.
//! - `parked/<id>.result.json`, `parked/<id>.release.json`: a result the control plane refused
//!   for good, and the release of that operation, which it can then never accept (or a release
//!   it refused): kept, but never sent again.
//!
//! When and why items move is `crate::outbound`'s: this module only keeps the files.

use std::path::PathBuf;

use airlock_core::OperationId;
use airlock_proto::convert::output_salt_to_wire;
use airlock_proto::gateway::{ApplianceMessage, OutputRelease, appliance_message};
use serde::{Deserialize, Serialize};

use super::{OpStore, io_err, read_json, to_json, write};
use crate::ApplianceError;
use crate::result::ResultMsg;

pub(crate) const OUTBOX_DIR: &str = "outbox";
pub(crate) const PARKED_DIR: &str = "parked";

/// A queued `OutputRelease`. The output itself stays sealed until the moment it is sent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ReleaseItem {
    pub request_id: OperationId,
    /// Empty when a commands-and-output pre-approval covers the output.
    pub release_envelope_json: String,
    /// Whether the output goes with it (a release), or not (a withholding).
    pub with_output: bool,
}

impl OpStore {
    fn outbox_path(&self, id: OperationId, kind: &str) -> PathBuf {
        self.root.join(OUTBOX_DIR).join(format!("{id}.{kind}.json"))
    }

    pub(crate) fn queue_result(&self, result: &ResultMsg) -> Result<(), ApplianceError> {
        self.fault("result")?;
        write(&self.outbox_path(result.request_id, "result"), &to_json(result)?)
    }

    fn parked_path(&self, id: OperationId, kind: &str) -> PathBuf {
        self.root.join(PARKED_DIR).join(format!("{id}.{kind}.json"))
    }

    /// Queues a release for the control plane. Returns `false` when it was parked instead: the
    /// control plane refused the operation's result for good, so it can never accept a release.
    pub(crate) fn queue_release(&self, item: &ReleaseItem) -> Result<bool, ApplianceError> {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        if self.parked_path(item.request_id, "result").exists() {
            write(&self.parked_path(item.request_id, "release"), &to_json(item)?)?;
            return Ok(false);
        }
        write(&self.outbox_path(item.request_id, "release"), &to_json(item)?)?;
        Ok(true)
    }

    /// The control plane refused the result of `id` for good: the result and any queued release
    /// move out of the outbox into `parked/`. Returns whether a release was parked.
    pub(crate) fn park(&self, id: OperationId) -> Result<bool, ApplianceError> {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        if !self.move_to_parked(id, "result")? {
            // Marks the result refused, so a later release is parked too.
            write(&self.parked_path(id, "result"), b"{}")?;
        }
        self.move_to_parked(id, "release")
    }

    /// The control plane refused the release of `id` for good: it moves out of the outbox into
    /// `parked/`. Returns whether there was one.
    pub(crate) fn park_release(&self, id: OperationId) -> Result<bool, ApplianceError> {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.move_to_parked(id, "release")
    }

    /// Moves one outbox item to `parked/`, copied before it is removed. Returns whether there was one.
    fn move_to_parked(&self, id: OperationId, kind: &str) -> Result<bool, ApplianceError> {
        let from = self.outbox_path(id, kind);
        match std::fs::read(&from) {
            Ok(bytes) => {
                write(&self.parked_path(id, kind), &bytes)?;
                std::fs::remove_file(&from).map_err(|e| io_err(&from, e))?;
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err(&from, e)),
        }
    }

    /// Ids of operations whose release is parked.
    #[cfg(test)]
    pub(crate) fn parked_releases(&self) -> Result<Vec<OperationId>, ApplianceError> {
        let dir = self.root.join(PARKED_DIR);
        let mut ids: Vec<OperationId> = std::fs::read_dir(&dir)
            .map_err(|e| io_err(&dir, e))?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_string_lossy().strip_suffix(".release.json")?.parse().ok())
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// The queued release of `id`, ready to send, if one waits in the outbox.
    pub(crate) fn queued_release(&self, id: OperationId) -> Result<Option<ApplianceMessage>, ApplianceError> {
        match read_json::<ReleaseItem>(&self.outbox_path(id, "release"))? {
            Some(item) => self.release_message(&item).map(Some),
            None => Ok(None),
        }
    }

    /// Drops an acknowledged item. `release` picks the release, else the result.
    pub(crate) fn acknowledge(&self, id: OperationId, release: bool) -> Result<bool, ApplianceError> {
        let path = self.outbox_path(id, if release { "release" } else { "result" });
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err(&path, e)),
        }
    }

    /// The message for one queued release, with its output read from the sealed file.
    pub(crate) fn release_message(&self, item: &ReleaseItem) -> Result<ApplianceMessage, ApplianceError> {
        let (output, output_salt) = if item.with_output {
            let held = self.revealable_output(item.request_id, &self.signed_commitment(item.request_id)?)?;
            (held.bytes, output_salt_to_wire(held.salt.as_ref()))
        } else {
            (Vec::new(), Vec::new())
        };
        Ok(ApplianceMessage {
            body: Some(appliance_message::Body::OutputRelease(OutputRelease {
                request_id: item.request_id.to_string(),
                release_envelope_json: item.release_envelope_json.clone(),
                output,
                output_salt,
            })),
        })
    }

    /// Everything not yet acknowledged: every result, then every release (the control plane
    /// refuses a release it sees before its result).
    pub(crate) fn pending(&self) -> Result<Vec<ApplianceMessage>, ApplianceError> {
        let dir = self.root.join(OUTBOX_DIR);
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .map_err(|e| io_err(&dir, e))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect();
        names.sort();
        let mut results = Vec::new();
        let mut releases = Vec::new();
        for name in names {
            let path = dir.join(&name);
            if name.ends_with(".result.json") {
                if let Some(r) = read_json::<ResultMsg>(&path)? {
                    results.push(r.to_message());
                }
            } else if name.ends_with(".release.json")
                && let Some(item) = read_json::<ReleaseItem>(&path)?
            {
                match self.release_message(&item) {
                    Ok(m) => releases.push(m),
                    Err(e) => {
                        tracing::error!(request_id = %item.request_id, error = %e, "cannot send a queued release")
                    }
                }
            }
        }
        results.extend(releases);
        Ok(results)
    }
}

#[cfg(test)]
mod tests {
    use airlock_testkit::op_id;

    use super::*;
    use crate::result::Outcome;

    #[test]
    fn outbox_keeps_items_until_acknowledged_results_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = OpStore::open(dir.path()).unwrap();
        let a = op_id(1);
        store
            .queue_release(&ReleaseItem { request_id: a, release_envelope_json: String::new(), with_output: false })
            .unwrap();
        store.queue_result(&ResultMsg::ran(a, Outcome::Executed)).unwrap();
        let pending = store.pending().unwrap();
        assert_eq!(pending.len(), 2);
        assert!(matches!(pending[0].body, Some(appliance_message::Body::OperationResult(_))));
        assert!(store.acknowledge(a, false).unwrap());
        assert_eq!(store.pending().unwrap().len(), 1);
        assert!(store.acknowledge(a, true).unwrap());
        assert!(store.pending().unwrap().is_empty());
    }
}
