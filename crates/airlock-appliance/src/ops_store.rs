//! What the appliance keeps about operations, in its state directory:
//!
//! - `ops/<id>/record.json`: the local state of one operation (what the customer lists);
//! - `ops/<id>/manifest.json`: the appliance's own copy of the operation's manifest;
//! - `ops/<id>/output.sealed`: the captured output, AES-256-GCM under `output.key` (32 random
//!   bytes, mode 0600, made on first use), bound to the request id; never in clear on disk;
//! - `manifest-chain.json`: the sequence and digest of the last execution this appliance signed;
//! - `outbox/<id>.result.json`, `outbox/<id>.release.json`: results and releases not yet
//!   acknowledged by the control plane, written before they are sent and resent on every
//!   (re)connect. A queued release holds no output: it is read from the sealed file when sent.
//! - `parked/<id>.result.json`, `parked/<id>.release.json`: a result the control plane refused
//!   for good, and the release of that operation, which it can then never accept: kept, but
//!   no longer resent.
//!
//! Every file is replaced with [`crate::files::replace`]: whole, synced, owner-only.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use airlock_core::grant::OperationRequest;
use airlock_core::operation::{AuthorityRef, Manifest, ReleaseDecision};
use airlock_core::policy::Phase;
use airlock_core::{ApplianceId, OperationId, Timestamp};
use airlock_proto::gateway::{ApplianceMessage, OutputRelease, appliance_message};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

use crate::ApplianceError;
use crate::files::{self, Mode};
use crate::result::ResultMsg;

pub const OPS_DIR: &str = "ops";
pub const OUTBOX_DIR: &str = "outbox";
pub const PARKED_DIR: &str = "parked";
pub const OUTPUT_KEY_FILE: &str = "output.key";
pub const CHAIN_FILE: &str = "manifest-chain.json";
const RECORD: &str = "record.json";
const MANIFEST: &str = "manifest.json";
const OUTPUT: &str = "output.sealed";

/// Where an operation stands on this appliance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpState {
    /// Allowed and started; its process may be running.
    Running,
    Executed,
    Cancelled,
    Refused,
}

/// A queued `OutputRelease`. The output itself stays sealed until the moment it is sent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseItem {
    pub request_id: OperationId,
    /// Empty when a commands-and-output pre-approval covers the output.
    pub release_envelope_json: String,
    /// Whether the output goes with it (a release), or not (a withholding).
    pub with_output: bool,
}

/// The local record of one operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpRecord {
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
    #[serde(default)]
    pub output_sha256: Option<String>,
    #[serde(default)]
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
    pub fn new(req: &OperationRequest, state: OpState, now: Timestamp) -> Self {
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

    pub fn is_secret(&self) -> bool {
        airlock_core::operation::is_secret_output(&self.data_tags)
    }

    /// The view `{"cmd":"operations"}` lists.
    pub fn summary(&self) -> serde_json::Value {
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
            "output_sha256": self.output_sha256,
            "output_size": self.output_size,
            "output_truncated": self.output_truncated,
            "release": release,
            "data_tags": self.data_tags,
            "received_at": self.received_at,
            "updated_at": self.updated_at,
        })
    }
}

/// The chain of this appliance's signed executions.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainHead {
    pub sequence: u64,
    pub manifest_sha256: Option<String>,
}

pub struct OpStore {
    root: PathBuf,
    /// Serialises updates of records and the chain head.
    lock: Mutex<()>,
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
    pub fn open(state_dir: &Path) -> Result<Self, ApplianceError> {
        create_private_dir(&state_dir.join(OPS_DIR))?;
        create_private_dir(&state_dir.join(OUTBOX_DIR))?;
        create_private_dir(&state_dir.join(PARKED_DIR))?;
        Ok(Self {
            root: state_dir.to_owned(),
            lock: Mutex::new(()),
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
    pub fn dir(&self, id: OperationId) -> Result<PathBuf, ApplianceError> {
        let dir = self.root.join(OPS_DIR).join(id.to_string());
        create_private_dir(&dir)?;
        Ok(dir)
    }

    pub fn record(&self, id: OperationId) -> Result<Option<OpRecord>, ApplianceError> {
        read_json(&self.root.join(OPS_DIR).join(id.to_string()).join(RECORD))
    }

    pub fn save_record(&self, record: &OpRecord) -> Result<(), ApplianceError> {
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        write(&self.dir(record.id)?.join(RECORD), &to_json(record)?)
    }

    /// Applies `edit` to a stored record under the store's lock.
    pub fn update_record(
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
    pub fn list(&self) -> Result<Vec<OpRecord>, ApplianceError> {
        let dir = self.root.join(OPS_DIR);
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(|e| io_err(&dir, e))? {
            let entry = entry.map_err(|e| io_err(&dir, e))?;
            // Only directories named by an operation id are operations.
            let Ok(id) = entry.file_name().to_string_lossy().parse::<OperationId>() else { continue };
            if let Some(r) = self.record(id)? {
                out.push(r);
            }
        }
        out.sort_by(|a, b| b.received_at.cmp(&a.received_at).then_with(|| a.id.cmp(&b.id)));
        Ok(out)
    }

    pub fn manifest(&self, id: OperationId) -> Result<Option<Manifest>, ApplianceError> {
        read_json(&self.root.join(OPS_DIR).join(id.to_string()).join(MANIFEST))
    }

    pub fn save_manifest(&self, manifest: &Manifest) -> Result<(), ApplianceError> {
        self.fault("manifest")?;
        write(&self.dir(manifest.request_id)?.join(MANIFEST), &to_json(manifest)?)
    }

    fn output_key(&self) -> Result<LessSafeKey, ApplianceError> {
        let path = self.root.join(OUTPUT_KEY_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                SystemRandom::new()
                    .fill(&mut key)
                    .map_err(|_| ApplianceError::Internal("the OS random generator failed".into()))?;
                write(&path, &key)?;
                key.to_vec()
            }
            Err(e) => return Err(io_err(&path, e)),
        };
        let key =
            UnboundKey::new(&AES_256_GCM, &bytes).map_err(|_| io_err(&path, "is not a 32-byte key; it was damaged"))?;
        Ok(LessSafeKey::new(key))
    }

    /// Encrypts and stores an operation's output.
    pub fn seal_output(&self, id: OperationId, output: &[u8]) -> Result<(), ApplianceError> {
        let key = self.output_key()?;
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| ApplianceError::Internal("the OS random generator failed".into()))?;
        let mut sealed = output.to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(id.to_string().as_bytes()),
            &mut sealed,
        )
        .map_err(|_| ApplianceError::Internal("output encryption failed".into()))?;
        let mut data = nonce.to_vec();
        data.extend_from_slice(&sealed);
        write(&self.dir(id)?.join(OUTPUT), &data)
    }

    /// Decrypts an operation's output.
    pub fn open_output(&self, id: OperationId) -> Result<Vec<u8>, ApplianceError> {
        let path = self.dir(id)?.join(OUTPUT);
        let data = std::fs::read(&path).map_err(|e| io_err(&path, e))?;
        if data.len() < NONCE_LEN {
            return Err(io_err(&path, "is damaged"));
        }
        let (nonce, sealed) = data.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| io_err(&path, "is damaged"))?;
        let mut buf = sealed.to_vec();
        let plain = self
            .output_key()?
            .open_in_place(nonce, Aad::from(id.to_string().as_bytes()), &mut buf)
            .map_err(|_| io_err(&path, "does not decrypt: it was damaged or the key changed"))?
            .to_vec();
        Ok(plain)
    }

    /// Runs `sign` with the next link of the chain; records the new head (synced) if it succeeds.
    ///
    /// `sign` must store the signed statement durably (in the operation's manifest) before it
    /// returns: the head only ever names a statement that is on disk, so a stop between the
    /// two leaves a statement ahead of the head, which [`OpStore::advance_chain`] takes up at
    /// recovery, never a head naming a lost statement.
    pub fn extend_chain<T>(
        &self,
        sign: impl FnOnce(u64, Option<String>) -> Result<(T, String), ApplianceError>,
    ) -> Result<T, ApplianceError> {
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let path = self.root.join(CHAIN_FILE);
        let head: ChainHead = read_json(&path)?.unwrap_or_default();
        let sequence = head.sequence + 1;
        let (out, digest) = sign(sequence, head.manifest_sha256)?;
        self.fault("chain")?;
        write(&path, &to_json(&ChainHead { sequence, manifest_sha256: Some(digest) })?)?;
        Ok(out)
    }

    /// Makes the head name a statement that was stored but whose head was not written (the
    /// appliance stopped, or the write failed, in between). A head already at or past it stays.
    pub fn advance_chain(
        &self,
        sequence: u64,
        previous_manifest_sha256: Option<&str>,
        manifest_sha256: &str,
    ) -> Result<(), ApplianceError> {
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let path = self.root.join(CHAIN_FILE);
        let head: ChainHead = read_json(&path)?.unwrap_or_default();
        if head.sequence >= sequence {
            return Ok(());
        }
        if head.sequence + 1 != sequence || head.manifest_sha256.as_deref() != previous_manifest_sha256 {
            return Err(ApplianceError::Internal(format!(
                "the manifest chain is at {} and cannot take the stored execution {sequence}",
                head.sequence
            )));
        }
        self.fault("chain")?;
        write(&path, &to_json(&ChainHead { sequence, manifest_sha256: Some(manifest_sha256.to_owned()) })?)
    }

    pub fn chain_head(&self) -> Result<ChainHead, ApplianceError> {
        Ok(read_json(&self.root.join(CHAIN_FILE))?.unwrap_or_default())
    }

    fn outbox_path(&self, id: OperationId, kind: &str) -> PathBuf {
        self.root.join(OUTBOX_DIR).join(format!("{id}.{kind}.json"))
    }

    pub fn queue_result(&self, result: &ResultMsg) -> Result<(), ApplianceError> {
        self.fault("result")?;
        write(&self.outbox_path(result.request_id, "result"), &to_json(result)?)
    }

    fn parked_path(&self, id: OperationId, kind: &str) -> PathBuf {
        self.root.join(PARKED_DIR).join(format!("{id}.{kind}.json"))
    }

    /// Queues a release for the control plane. Returns `false` when it was parked instead: the
    /// control plane refused the operation's result for good, so it can never accept a release.
    pub fn queue_release(&self, item: &ReleaseItem) -> Result<bool, ApplianceError> {
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
    pub fn park(&self, id: OperationId) -> Result<bool, ApplianceError> {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        if !self.move_to_parked(id, "result")? {
            // Marks the result refused, so a later release is parked too.
            write(&self.parked_path(id, "result"), b"{}")?;
        }
        self.move_to_parked(id, "release")
    }

    /// The control plane refused the release of `id` for good: it moves out of the outbox into
    /// `parked/`. Returns whether there was one.
    pub fn park_release(&self, id: OperationId) -> Result<bool, ApplianceError> {
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
    pub fn parked_releases(&self) -> Result<Vec<OperationId>, ApplianceError> {
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
    pub fn queued_release(&self, id: OperationId) -> Result<Option<ApplianceMessage>, ApplianceError> {
        match read_json::<ReleaseItem>(&self.outbox_path(id, "release"))? {
            Some(item) => self.release_message(&item).map(Some),
            None => Ok(None),
        }
    }

    /// Drops an acknowledged item. `release` picks the release, else the result.
    pub fn acknowledge(&self, id: OperationId, release: bool) -> Result<bool, ApplianceError> {
        let path = self.outbox_path(id, if release { "release" } else { "result" });
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err(&path, e)),
        }
    }

    /// The message for one queued release, with its output read from the sealed file.
    pub fn release_message(&self, item: &ReleaseItem) -> Result<ApplianceMessage, ApplianceError> {
        let output = if item.with_output { self.open_output(item.request_id)? } else { Vec::new() };
        Ok(ApplianceMessage {
            body: Some(appliance_message::Body::OutputRelease(OutputRelease {
                request_id: item.request_id.to_string(),
                release_envelope_json: item.release_envelope_json.clone(),
                output,
            })),
        })
    }

    /// Everything not yet acknowledged: every result, then every release (the control plane
    /// refuses a release it sees before its result).
    pub fn pending(&self) -> Result<Vec<ApplianceMessage>, ApplianceError> {
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
    fn output_round_trips_sealed_and_is_bound_to_its_id() {
        let dir = tempfile::tempdir().unwrap();
        let store = OpStore::open(dir.path()).unwrap();
        let (one, two) = (op_id(1), op_id(2));
        store.seal_output(one, b"secret output bytes").unwrap();
        assert_eq!(store.open_output(one).unwrap(), b"secret output bytes");
        let sealed = std::fs::read(dir.path().join(format!("ops/{one}/output.sealed"))).unwrap();
        assert!(!sealed.windows(6).any(|w| w == b"output"));
        // Moving a sealed output to another operation does not decrypt.
        store.dir(two).unwrap();
        std::fs::write(dir.path().join(format!("ops/{two}/output.sealed")), &sealed).unwrap();
        assert!(store.open_output(two).is_err());
        // Directories are named by operation ids only, and no such id leaves `ops/`.
        assert!("../escape".parse::<OperationId>().is_err());
    }

    #[test]
    fn outbox_keeps_items_until_acknowledged_results_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = OpStore::open(dir.path()).unwrap();
        let a = op_id(1);
        store.seal_output(a, b"x").unwrap();
        store
            .queue_release(&ReleaseItem { request_id: a, release_envelope_json: String::new(), with_output: true })
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
