//! What the appliance keeps about operations, in its state directory.
//!
//! - `ops/<id>/record.json`: the local state of one operation (what the customer lists);
//! - `ops/<id>/manifest.json`: the appliance's own copy of the operation's manifest;
//! - `ops/<id>/output.sealed`: the captured output, sealed at rest (`sealed`);
//! - `manifest-chain.json`: the head of the chain of signed executions (`chain`);
//! - `outbox/` and `parked/`: results and releases for the control plane (`outbox`).
//!
//! Operation ids name the directories; an `OperationId` is `op_` and 32 hex digits, so no id
//! leaves `ops/`.
//! Every file is replaced with `crate::files::replace`: whole, synced, owner-only.
//! One lock serialises updates of records, the chain head and the outbox, so a decision
//! checked and recorded under it (the customer's release) holds against another made at once.

mod chain;
mod outbox;
mod sealed;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use airlock_core::grant::OperationRequest;
use airlock_core::operation::{AuthorityRef, Manifest, OutputCommitment, ReleaseDecision};
use airlock_core::policy::Phase;
use airlock_core::{ApplianceId, OperationId, Timestamp};
use serde::{Deserialize, Serialize};

use crate::ApplianceError;
use crate::files::{self, Mode};
use crate::result::ResultMsg;

pub(crate) use outbox::{OUTBOX_DIR, PARKED_DIR, ReleaseItem};
pub(crate) use sealed::fresh_salt;

pub(crate) const OPS_DIR: &str = "ops";
/// The head of the chain of signed executions (`chain`).
pub(crate) const CHAIN_FILE: &str = "manifest-chain.json";
const RECORD: &str = "record.json";
const MANIFEST: &str = "manifest.json";

/// Where an operation stands on this appliance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum OpState {
    /// Allowed and started; its process may be running.
    Running,
    Executed,
    Cancelled,
    Refused,
}

/// The local record of one operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct OpRecord {
    pub id: OperationId,
    pub appliance: ApplianceId,
    pub template: String,
    pub phase: Phase,
    pub data_tags: BTreeSet<String>,
    pub state: OpState,
    pub received_at: Timestamp,
    pub updated_at: Timestamp,
    /// Why it was refused (a check or rule, never customer data).
    #[serde(default)]
    pub refusal_reason: Option<String>,
    /// What allowed it (`grant`, `pre-approval`, `standing-window` or `observe`), once allowed.
    #[serde(default)]
    pub authority: Option<AuthorityRef>,
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// What the signed execution commits to about the output, once it ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_commitment: Option<OutputCommitment>,
    /// Records of runs signed before salted commitments: their plain digest and size. Read
    /// only through [`OpRecord::commitment`]; never written for a new run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_size: Option<u64>,
    #[serde(default)]
    pub output_truncated: bool,
    /// The customer's decision about the output, if any.
    #[serde(default)]
    pub release: Option<ReleaseDecision>,
    /// The output went to the vendor under a commands-and-output pre-approval.
    #[serde(default)]
    pub released_by_pre_approval: bool,
    /// The final answer, resent as is when the control plane asks again.
    #[serde(default)]
    pub result: Option<ResultMsg>,
    /// The process group of its script, recorded as it starts, so a restart after a crash can
    /// kill what the previous process left running.
    #[serde(default)]
    pub pgid: Option<i32>,
    /// The host's boot id when `pgid` was recorded: after a reboot the group id means nothing.
    #[serde(default)]
    pub boot_id: Option<String>,
}

impl OpRecord {
    /// The record of an authenticated request received `now`, in `state`.
    pub(crate) fn new(req: &OperationRequest, state: OpState, now: Timestamp) -> Self {
        Self {
            id: req.id,
            appliance: req.appliance,
            template: req.kind.clone(),
            phase: req.phase,
            data_tags: req.data_tags.clone(),
            state,
            received_at: now,
            updated_at: now,
            refusal_reason: None,
            authority: None,
            exit_code: None,
            output_commitment: None,
            output_sha256: None,
            output_size: None,
            output_truncated: false,
            release: None,
            released_by_pre_approval: false,
            result: None,
            pgid: None,
            boot_id: None,
        }
    }

    /// What the execution committed to about the output (for a record written before salts,
    /// the legacy unsalted digest it kept); `None` until it ran.
    pub(crate) fn commitment(&self) -> Option<OutputCommitment> {
        match (&self.output_commitment, &self.output_sha256, self.output_size) {
            (Some(c), _, _) => Some(c.clone()),
            (None, Some(sha256), Some(size)) => Some(OutputCommitment::LegacyUnsalted { sha256: sha256.clone(), size }),
            _ => None,
        }
    }

    pub(crate) fn is_secret(&self) -> bool {
        airlock_core::grant::is_secret_output(&self.data_tags)
    }

    /// The view `{"cmd":"operations"}` lists.
    pub(crate) fn summary(&self) -> serde_json::Value {
        let release = match (self.release, self.released_by_pre_approval) {
            (Some(ReleaseDecision::Release), _) => Some("release"),
            (Some(ReleaseDecision::Withhold), _) => Some("withhold"),
            (None, true) => Some("pre-approved"),
            (None, false) => None,
        };
        serde_json::json!({
            "id": self.id,
            "appliance": self.appliance,
            "template": self.template,
            "phase": self.phase,
            "state": self.state,
            "authority": self.authority.as_ref().map(|a| a.kind),
            "refusal_reason": self.refusal_reason,
            "exit_code": self.exit_code,
            "output_commitment": self.commitment(),
            "output_truncated": self.output_truncated,
            "release": release,
            "data_tags": self.data_tags,
            "received_at": self.received_at,
            "updated_at": self.updated_at,
        })
    }
}

pub(crate) struct OpStore {
    root: PathBuf,
    /// Serialises updates of records and the chain head.
    lock: Mutex<()>,
    /// The key output is sealed under, loaded (or made) once at open: two operations
    /// recording at once must never each make one and overwrite the other's.
    output_key: ring::aead::LessSafeKey,
    /// Tests: writes made to fail once each, by name (`chain`, `manifest`, `result`).
    #[cfg(test)]
    pub(crate) faults: Mutex<Vec<&'static str>>,
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> ApplianceError {
    ApplianceError::Customer(format!("{}: {e}", path.display()))
}

/// Replaces one of the store's files (see [`crate::files::replace`]).
fn write(path: &Path, data: &[u8]) -> Result<(), ApplianceError> {
    files::replace(path, data, Mode::Private).map_err(|e| io_err(path, e))
}

fn create_private_dir(path: &Path) -> Result<(), ApplianceError> {
    files::create_private_dir(path).map_err(|e| io_err(path, e))
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, ApplianceError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| io_err(path, format!("damaged: {e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path, e)),
    }
}

fn to_json<T: Serialize>(value: &T) -> Result<Vec<u8>, ApplianceError> {
    serde_json::to_vec_pretty(value).map_err(|e| ApplianceError::Internal(e.to_string()))
}

impl OpStore {
    pub(crate) fn open(state_dir: &Path) -> Result<Self, ApplianceError> {
        create_private_dir(&state_dir.join(OPS_DIR))?;
        create_private_dir(&state_dir.join(OUTBOX_DIR))?;
        create_private_dir(&state_dir.join(PARKED_DIR))?;
        Ok(Self {
            root: state_dir.to_owned(),
            lock: Mutex::new(()),
            output_key: sealed::load_or_create_output_key(state_dir)?,
            #[cfg(test)]
            faults: Mutex::new(Vec::new()),
        })
    }

    /// A write a test made to fail (once).
    #[cfg(test)]
    fn fault(&self, what: &str) -> Result<(), ApplianceError> {
        let mut faults = self.faults.lock().unwrap_or_else(|e| e.into_inner());
        match faults.iter().position(|f| *f == what) {
            Some(i) => {
                faults.remove(i);
                Err(ApplianceError::Customer(format!("{what}: injected write failure (no space left on device)")))
            }
            None => Ok(()),
        }
    }

    #[cfg(not(test))]
    #[inline]
    fn fault(&self, _what: &str) -> Result<(), ApplianceError> {
        Ok(())
    }

    /// The operation's directory (created).
    pub(crate) fn dir(&self, id: OperationId) -> Result<PathBuf, ApplianceError> {
        let dir = self.root.join(OPS_DIR).join(id.to_string());
        create_private_dir(&dir)?;
        Ok(dir)
    }

    pub(crate) fn record(&self, id: OperationId) -> Result<Option<OpRecord>, ApplianceError> {
        read_json(&self.root.join(OPS_DIR).join(id.to_string()).join(RECORD))
    }

    pub(crate) fn save_record(&self, record: &OpRecord) -> Result<(), ApplianceError> {
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        write(&self.dir(record.id)?.join(RECORD), &to_json(record)?)
    }

    /// Applies `edit` to a stored record under the store's lock.
    pub(crate) fn update_record(
        &self,
        id: OperationId,
        edit: impl FnOnce(&mut OpRecord) -> Result<(), ApplianceError>,
    ) -> Result<OpRecord, ApplianceError> {
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut record =
            self.record(id)?.ok_or_else(|| ApplianceError::Customer(format!("no operation {id} on this appliance")))?;
        edit(&mut record)?;
        write(&self.dir(id)?.join(RECORD), &to_json(&record)?)?;
        Ok(record)
    }

    /// Every operation, newest first.
    pub(crate) fn list(&self) -> Result<Vec<OpRecord>, ApplianceError> {
        let dir = self.root.join(OPS_DIR);
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(|e| io_err(&dir, e))? {
            let entry = entry.map_err(|e| io_err(&dir, e))?;
            // Only directories named by an operation id are operations; say so of anything else.
            let name = entry.file_name();
            let Ok(id) = name.to_string_lossy().parse::<OperationId>() else {
                tracing::warn!(path = %entry.path().display(), "ignoring an entry of ops/ that is not named by an operation id");
                continue;
            };
            if let Some(r) = self.record(id)? {
                out.push(r);
            }
        }
        out.sort_by(|a, b| b.received_at.cmp(&a.received_at).then_with(|| a.id.cmp(&b.id)));
        Ok(out)
    }

    pub(crate) fn manifest(&self, id: OperationId) -> Result<Option<Manifest>, ApplianceError> {
        read_json(&self.root.join(OPS_DIR).join(id.to_string()).join(MANIFEST))
    }

    pub(crate) fn save_manifest(&self, manifest: &Manifest) -> Result<(), ApplianceError> {
        self.fault("manifest")?;
        write(&self.dir(manifest.request_id)?.join(MANIFEST), &to_json(manifest)?)
    }
}
