//! Pushing templates: every version is kept by content hash, and the newest is current.
//!
//! An older request keeps naming (and resolving) the version it was rendered from.

use airlock_core::WorkspaceId;
use airlock_core::audit::{AuditAction, Outcome};
use airlock_core::template::TemplateError;

use crate::authz::TenantScope;
use crate::state::{AppState, event};
use crate::store::{StoreError, TemplateRow};

/// Why a template was not stored.
#[derive(Debug, thiserror::Error)]
pub enum PushTemplateError {
    /// Over one of core's limits ([`TemplateError::Limit`]) or invalid.
    #[error("{0}")]
    Invalid(TemplateError),
    #[error(transparent)]
    Interrupted(super::compiled::CompileError),
    #[error("no workspace {0} in your tenant")]
    NoWorkspace(WorkspaceId),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A template as stored, and whether this push changed the current version.
#[derive(Debug)]
pub struct PushedTemplate {
    pub row: TemplateRow,
    pub changed: bool,
}

/// Stores a template version and makes it current, with its audit record. The same content
/// again changes nothing (and is audited as unchanged); content pushed before keeps its first
/// creation time.
pub async fn push_template(
    state: &AppState,
    scope: &TenantScope,
    workspace: WorkspaceId,
    manifest_toml: String,
    script: String,
) -> Result<PushedTemplate, PushTemplateError> {
    // Core checks sizes first, so an oversized push costs no parsing; the rest runs off the
    // async workers and is kept for list and request.
    let t = state.templates.load(&manifest_toml, &script).await.map_err(|e| match e {
        super::compiled::CompileError::Template(e) => PushTemplateError::Invalid(e),
        other => PushTemplateError::Interrupted(other),
    })?;
    if !state.store.workspace_exists(scope, workspace).await? {
        return Err(PushTemplateError::NoWorkspace(workspace));
    }
    let now = state.now();
    let name = t.manifest().name.clone();
    let sha = t.content_sha256().to_owned();
    let mut ev = event(scope.principal().actor(), AuditAction::TemplatePush, Outcome::Success);
    ev.workspace = Some(workspace.to_string());
    ev.target = Some(name.clone());
    let row = TemplateRow {
        workspace_id: workspace,
        name: name.clone(),
        content_sha256: sha.clone(),
        manifest_toml,
        script,
        created_at: now,
    };
    let mut tx = state.store.write().await?;
    let previous = tx.current_template_sha(scope, workspace, &name).await?;
    let changed = previous.as_deref() != Some(sha.as_str());
    if changed {
        if !tx.put_template(scope, workspace, &row, now).await? {
            return Err(PushTemplateError::NoWorkspace(workspace));
        }
        ev.detail = serde_json::json!({
            "content_sha256": sha,
            "previous_sha256": previous,
            "phase": t.manifest().phase,
            "data_tags": t.manifest().data_tags,
        });
        tx.audit(&scope.chain(), now, ev).await?;
        tx.commit().await?;
        tracing::info!(template = %name, content_sha256 = %sha, "template pushed");
    } else {
        drop(tx);
        ev.detail = serde_json::json!({ "content_sha256": sha, "unchanged": true });
        state.audit(&scope.chain(), ev).await?;
    }
    let row = state.store.template_version(scope, workspace, &name, &sha).await?.unwrap_or(row);
    Ok(PushedTemplate { row, changed })
}
