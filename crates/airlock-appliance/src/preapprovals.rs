//! Pre-approvals the customer installed on this host, with their durable run counters and
//! revocations (`pre-approvals.json` in the state directory).
//!
//! A run is counted, and the counter synced to disk, before the operation runs: a crash never
//! gives a run back.
//! A revocation is saved before it is acknowledged and is final: adding the same pre-approval
//! again does not lift it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use airlock_core::Timestamp;
use airlock_core::dsse::Envelope;
use airlock_core::grant::PreApprovalBody;
use serde::{Deserialize, Serialize};

use crate::ApplianceError;
use crate::files::{self, Mode};

pub(crate) const PRE_APPROVALS_FILE: &str = "pre-approvals.json";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Entry {
    /// The signed pre-approval, as the customer made it.
    pub envelope: Envelope,
    /// Its body as verified when it was added (shown in listings; verified again at each use).
    pub body: PreApprovalBody,
    pub runs_used: u32,
    pub revoked: bool,
    pub added_at: Timestamp,
    #[serde(default)]
    pub revoked_at: Option<Timestamp>,
}

impl Entry {
    pub(crate) fn summary(&self) -> serde_json::Value {
        let b = &self.body;
        serde_json::json!({
            "id": b.id,
            "template": b.template,
            "template_sha256": b.template_sha256,
            "phase": b.phase,
            "level": b.level,
            "not_before": b.not_before,
            "not_after": b.not_after,
            "max_runs": b.max_runs,
            "runs_used": self.runs_used,
            "constraints": b.constraints,
            "approver": b.approver,
            "revoked": self.revoked,
            "added_at": self.added_at,
            "revoked_at": self.revoked_at,
            "digest": b.digest_hex(),
        })
    }
}

pub(crate) struct PreApprovalStore {
    path: PathBuf,
    entries: Mutex<BTreeMap<String, Entry>>,
}

impl PreApprovalStore {
    pub(crate) fn open(state_dir: &Path) -> Result<Self, ApplianceError> {
        let path = state_dir.join(PRE_APPROVALS_FILE);
        let entries = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                ApplianceError::Customer(format!(
                    "{} is damaged ({e}); refusing to forget pre-approval run counts and revocations",
                    path.display()
                ))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(ApplianceError::Customer(format!("{}: {e}", path.display()))),
        };
        Ok(Self { path, entries: Mutex::new(entries) })
    }

    fn save(&self, entries: &BTreeMap<String, Entry>) -> Result<(), ApplianceError> {
        let json = serde_json::to_vec_pretty(entries).map_err(|e| ApplianceError::Internal(e.to_string()))?;
        files::replace(&self.path, &json, Mode::Private)
            .map_err(|e| ApplianceError::Customer(format!("{}: {e}", self.path.display())))
    }

    /// Stores a verified pre-approval. The same one again is a no-op; another under the same
    /// id is refused (its counter and revocation belong to the first).
    pub(crate) fn add(
        &self,
        envelope: Envelope,
        body: PreApprovalBody,
        now: Timestamp,
    ) -> Result<Entry, ApplianceError> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(existing) = entries.get(&body.id) {
            if existing.body == body {
                return Ok(existing.clone());
            }
            return Err(ApplianceError::Customer(format!(
                "a different pre-approval with id `{}` is already installed; sign the new one with a new id",
                body.id
            )));
        }
        let entry =
            Entry { envelope, body: body.clone(), runs_used: 0, revoked: false, added_at: now, revoked_at: None };
        let mut next = entries.clone();
        next.insert(body.id.clone(), entry.clone());
        self.save(&next)?;
        *entries = next;
        Ok(entry)
    }

    /// Revokes at once. `Ok(None)` if there is no such pre-approval.
    pub(crate) fn revoke(&self, id: &str, now: Timestamp) -> Result<Option<Entry>, ApplianceError> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let Some(current) = entries.get(id) else { return Ok(None) };
        if current.revoked {
            return Ok(Some(current.clone()));
        }
        let mut next = entries.clone();
        if let Some(e) = next.get_mut(id) {
            e.revoked = true;
            e.revoked_at = Some(now);
        }
        // A revocation holds in memory even if saving it fails: the customer's restriction
        // never waits on the disk (the error is still returned).
        let saved = self.save(&next);
        *entries = next;
        saved?;
        Ok(entries.get(id).cloned())
    }

    pub(crate) fn list(&self) -> Vec<Entry> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect()
    }

    #[cfg(test)]
    pub(crate) fn get(&self, id: &str) -> Option<Entry> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).get(id).cloned()
    }

    /// Unrevoked pre-approvals for `template`.
    pub(crate) fn candidates(&self, template: &str) -> Vec<Entry> {
        self.list().into_iter().filter(|e| !e.revoked && e.body.template == template).collect()
    }

    /// Counts one run against `id`, durably, if it is still unrevoked and has runs left.
    /// Returns the runs used now, `None` if no run was left.
    pub(crate) fn take_run(&self, id: &str) -> Result<Option<u32>, ApplianceError> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let Some(current) = entries.get(id) else { return Ok(None) };
        if current.revoked || current.runs_used >= current.body.max_runs {
            return Ok(None);
        }
        let runs_used = current.runs_used + 1;
        let mut next = entries.clone();
        if let Some(e) = next.get_mut(id) {
            e.runs_used = runs_used;
        }
        self.save(&next)?;
        *entries = next;
        Ok(Some(runs_used))
    }
}
