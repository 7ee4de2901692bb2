//! At start, the files that hold the customer's authority are held against the audit chain
//! (`airlock_core::audit::anchor` decides; this module reads the files and acts).
//!
//! The pinned key set (`customer-keys.pem`), the signed policy (`policy.dsse.json`) and the
//! pre-approval counters and revocations (`pre-approvals.json`) are each recorded in the chain
//! as they change. A key file edited on disk, an older signed policy put back, a counter reset,
//! a revocation lifted or a pre-approval removed refuses start: each is recorded as
//! `state.diverged`, and nothing else changes. A file ahead of the chain (a crash between saving
//! and recording, or a state directory from before anchors) is recorded as found.

use airlock_core::audit::anchor::{AnchoredState, PreApprovalState};
use airlock_core::audit::{AuditAction, Outcome};

use crate::ApplianceError;
use crate::audit_log::AuditLog;
use crate::state_dir::StateDir;

/// Checks the files against the chain as it was opened; refuses start if they went back.
pub(crate) fn check_at_start(state: &StateDir, audit: &AuditLog) -> Result<(), ApplianceError> {
    let on_disk = read(state)?;
    let comparison = audit.anchored().compare(&on_disk);
    if !comparison.diverged.is_empty() {
        let reasons: Vec<String> = comparison.diverged.iter().map(ToString::to_string).collect();
        for reason in &reasons {
            audit.record(AuditAction::StateDiverged, Outcome::Denied, serde_json::json!({ "reason": reason }))?;
            tracing::error!(%reason, "a file of the customer's authority disagrees with the audit log");
        }
        return Err(ApplianceError::Customer(format!(
            "refusing to start: {}. The audit log records how it was; put the file back as it was (from a backup), or move the state directory aside to re-install",
            reasons.join("; ")
        )));
    }
    for anchor in &comparison.to_anchor {
        audit.anchor(anchor)?;
    }
    if !comparison.to_anchor.is_empty() {
        tracing::info!(count = comparison.to_anchor.len(), "recorded the customer's authority state in the audit log");
    }
    Ok(())
}

/// The state as the files hold it.
fn read(state: &StateDir) -> Result<AnchoredState, ApplianceError> {
    let pinned_keys = crate::customer::pinned_key_ids(state)?;
    let policy = crate::customer::stored_policy_serial(state)?;
    let pre_approvals = crate::preapprovals::PreApprovalStore::open(state.path())?
        .list()
        .into_iter()
        .map(|e| (e.body.id.clone(), PreApprovalState { runs_used: e.runs_used, revoked: e.revoked }))
        .collect();
    Ok(AnchoredState { pinned_keys, policy, pre_approvals })
}

#[cfg(test)]
mod tests;
