//! The chain of this appliance's signed executions, and the order in which it is written.
//!
//! Each `ExecutionStatement` names its `sequence` and the digest of the previous one, so a
//! removed or reordered execution shows.
//! `manifest-chain.json` holds the head: the sequence and digest of the last one signed.
//! A statement is stored (in its operation's manifest) before the head names it, so the head
//! never names a statement that is not on disk.
//! A stop between the two leaves a statement one ahead of the head, which recovery takes up
//! ([`OpStore::advance_chain`]); a statement that could not be stored is never named, and the
//! one signed again in its place takes its sequence.

use serde::{Deserialize, Serialize};

use super::{CHAIN_FILE, OpStore, read_json, to_json, write};
use crate::ApplianceError;

/// The chain of this appliance's signed executions.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ChainHead {
    pub sequence: u64,
    pub manifest_sha256: Option<String>,
}

impl OpStore {
    /// Runs `sign` with the next link of the chain; records the new head (synced) if it succeeds.
    ///
    /// `sign` must store the signed statement durably (in the operation's manifest) before it
    /// returns: the head only ever names a statement that is on disk, so a stop between the
    /// two leaves a statement ahead of the head, which [`OpStore::advance_chain`] takes up at
    /// recovery, never a head naming a lost statement.
    pub(crate) fn extend_chain<T>(
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
    pub(crate) fn advance_chain(
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

    /// The head as it is on disk.
    #[cfg(test)]
    pub(crate) fn chain_head(&self) -> Result<ChainHead, ApplianceError> {
        Ok(read_json(&self.root.join(CHAIN_FILE))?.unwrap_or_default())
    }
}
