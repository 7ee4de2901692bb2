//! Which release is current: the `current` symlink and the deploy state file.
//!
//! `<releases root>/current` is a symlink to the current release's directory (its digest,
//! relative). It is switched by making `current.new` and renaming it over `current`: the
//! rename is the commit point of a deploy, atomic on a crash.
//! `<releases root>/deploy-state.json` (written only through `crate::files::replace`) records
//! `current`, `previous`, and, while a deploy is under way, `pending` (`from` → `to`).
//! On start ([`settle`]), a pending switch is resolved by the symlink: if `current` already
//! names `to`, the switch committed and `to` is current; otherwise `from` is, the symlink is put
//! back on it, and a leftover `current.new` is removed. Either way the state is written back
//! without `pending`, so the appliance restarts one consistent release.

use std::collections::BTreeSet;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::DeployError;
use super::install::{is_digest, sync_dir};

const STATE: &str = "deploy-state.json";
const CURRENT: &str = "current";
const CURRENT_NEW: &str = "current.new";

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DeployState {
    pub(crate) current: Option<String>,
    pub(crate) previous: Option<String>,
    pub(crate) pending: Option<Pending>,
    /// The releases deployed with the customer's approval for `run_as_root` services, so a
    /// restart starts them as approved.
    #[serde(default)]
    pub(crate) root_allowed: BTreeSet<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Pending {
    pub(crate) from: Option<String>,
    pub(crate) to: String,
}

pub(crate) fn read(root: &Path) -> Result<DeployState, DeployError> {
    let path = root.join(STATE);
    match std::fs::read(&path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes).map_err(|e| DeployError::Io(format!("{} is malformed: {e}", path.display())))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(DeployState::default()),
        Err(e) => Err(DeployError::Io(format!("cannot read {}: {e}", path.display()))),
    }
}

pub(crate) fn write(root: &Path, state: &DeployState) -> Result<(), DeployError> {
    let path = root.join(STATE);
    let bytes = serde_json::to_vec_pretty(state).map_err(|e| DeployError::Io(e.to_string()))?;
    crate::files::replace(&path, &bytes, crate::files::Mode::Readable)
        .map_err(|e| DeployError::Io(format!("cannot write {}: {e}", path.display())))
}

/// The digest `current` points at, if it is a link to one.
pub(crate) fn target(root: &Path) -> Option<String> {
    let link = std::fs::read_link(root.join(CURRENT)).ok()?;
    let name = link.to_str()?;
    is_digest(name).then(|| name.to_owned())
}

/// Points `current` at `digest` (or removes it, for none) atomically.
pub(crate) fn switch(root: &Path, digest: Option<&str>) -> Result<(), DeployError> {
    let new = root.join(CURRENT_NEW);
    let current = root.join(CURRENT);
    let _ = std::fs::remove_file(&new);
    match digest {
        Some(digest) => {
            std::os::unix::fs::symlink(digest, &new)
                .map_err(|e| DeployError::Io(format!("cannot create {}: {e}", new.display())))?;
            std::fs::rename(&new, &current)
                .map_err(|e| DeployError::Io(format!("cannot switch {}: {e}", current.display())))?;
        }
        None => match std::fs::remove_file(&current) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(DeployError::Io(format!("cannot remove {}: {e}", current.display()))),
        },
    }
    sync_dir(root);
    Ok(())
}

/// Resolves what a crash may have left half done (see the module documentation) and returns
/// the consistent state, written back.
pub(crate) fn settle(root: &Path) -> Result<DeployState, DeployError> {
    let mut state = read(root)?;
    let _ = std::fs::remove_file(root.join(CURRENT_NEW));
    let linked = target(root);
    if let Some(pending) = state.pending.take() {
        if linked.as_deref() == Some(pending.to.as_str()) {
            state.previous = pending.from;
            state.current = Some(pending.to);
        } else {
            if state.current != pending.from {
                state.previous = state.current.take();
            }
            state.current = pending.from;
        }
    }
    if linked != state.current {
        switch(root, state.current.as_deref())?;
    }
    write(root, &state)?;
    Ok(state)
}
