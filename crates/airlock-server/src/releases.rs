//! Vendor releases (not a customer *releasing output*; that is `operations::release`): a
//! workspace's release-signing keys, and releases pushed as signed statements.
//!
//! A release is checked with core's [`verify_release`] against the workspace's unrevoked keys,
//! on the blocking pool, and stored as the envelope it arrived in. Releases are immutable: the
//! same name and version again is accepted unchanged only with the same digest. Every artifact a
//! release names must have been uploaded to its workspace first ([`crate::artifacts`]); the
//! release's artifacts are recorded with it, which is what an appliance may fetch.

use airlock_core::WorkspaceId;
use airlock_core::audit::{AuditAction, Outcome};
use airlock_core::customer_key::CustomerPublicKey;
use airlock_core::dsse::Envelope;
use airlock_core::release::{ReleaseError, VerifiedRelease, verify_release};

use crate::authz::TenantScope;
use crate::state::{AppState, event};
use crate::store::{ReleaseKeyRow, ReleaseRow, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum ReleaseKeyError {
    #[error("not an Ed25519 public key in PEM: {0}")]
    BadKey(String),
    #[error("no workspace {0} in your tenant")]
    NoWorkspace(WorkspaceId),
    #[error("no release key {0} in this workspace")]
    NoKey(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Registers a release-signing key (its public half) in a workspace, with its audit record.
pub async fn add_key(
    state: &AppState,
    scope: &TenantScope,
    workspace: WorkspaceId,
    public_pem: &str,
) -> Result<ReleaseKeyRow, ReleaseKeyError> {
    let key = CustomerPublicKey::from_pem(public_pem).map_err(|e| ReleaseKeyError::BadKey(e.to_string()))?;
    let now = state.now();
    let row = ReleaseKeyRow {
        workspace_id: workspace,
        key_id: key.key_id(),
        public_pem: key.to_pem().map_err(|e| ReleaseKeyError::BadKey(e.to_string()))?,
        created_at: now,
        revoked_at: None,
    };
    let mut ev = event(scope.principal().actor(), AuditAction::ReleaseKeyAdd, Outcome::Success);
    ev.workspace = Some(workspace.to_string());
    ev.target = Some(row.key_id.clone());
    let mut tx = state.store.write().await?;
    if !tx.add_release_key(scope, &row).await? {
        return Err(ReleaseKeyError::NoWorkspace(workspace));
    }
    tx.audit(&scope.chain(), now, ev).await?;
    tx.commit().await?;
    tracing::info!(key_id = %row.key_id, %workspace, "release key added");
    Ok(row)
}

/// Revokes a release key of a workspace, with its audit record: from now on no push signed only
/// by it is accepted, and no release signed only by it is deployed (deploys verify again).
pub async fn revoke_key(
    state: &AppState,
    scope: &TenantScope,
    workspace: WorkspaceId,
    key_id: &str,
) -> Result<ReleaseKeyRow, ReleaseKeyError> {
    let now = state.now();
    let mut ev = event(scope.principal().actor(), AuditAction::ReleaseKeyRevoke, Outcome::Success);
    ev.workspace = Some(workspace.to_string());
    ev.target = Some(key_id.chars().take(64).collect());
    let mut tx = state.store.write().await?;
    let row = tx
        .revoke_release_key(scope, workspace, key_id, now)
        .await?
        .ok_or_else(|| ReleaseKeyError::NoKey(key_id.chars().filter(|c| !c.is_control()).take(64).collect()))?;
    tx.audit(&scope.chain(), now, ev).await?;
    tx.commit().await?;
    tracing::info!(key_id = %row.key_id, %workspace, "release key revoked");
    Ok(row)
}

#[derive(Debug, thiserror::Error)]
pub enum PushReleaseError {
    #[error("the body is not a DSSE envelope: {0}")]
    NotAnEnvelope(String),
    /// No signature by a registered, unrevoked key, or a statement or manifest core refuses.
    #[error("{0}")]
    Invalid(ReleaseError),
    #[error(
        "release {name} {version} already exists with digest {stored}; releases are immutable, so publish a new version"
    )]
    Immutable { name: String, version: String, stored: String },
    #[error("no workspace {0} in your tenant")]
    NoWorkspace(WorkspaceId),
    /// Artifacts the statement names whose bytes were not uploaded to the workspace.
    #[error(
        "upload these artifacts to the workspace first (`airlock release push` does): {}",
        .0.join(", ")
    )]
    MissingArtifacts(Vec<String>),
    #[error("verifying the release did not finish; retry")]
    Interrupted,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A release as stored, and whether this push stored it.
#[derive(Debug)]
pub struct PushedRelease {
    pub row: ReleaseRow,
    pub created: bool,
}

/// Verifies a signed release against the workspace's unrevoked keys and stores it, with its audit
/// record. The same name, version and digest again changes nothing; another digest is refused.
pub async fn push(
    state: &AppState,
    scope: &TenantScope,
    workspace: WorkspaceId,
    envelope: serde_json::Value,
) -> Result<PushedRelease, PushReleaseError> {
    let envelope_json = serde_json::to_string(&envelope).map_err(|e| PushReleaseError::NotAnEnvelope(e.to_string()))?;
    let envelope =
        Envelope::from_json(envelope_json.as_bytes()).map_err(|e| PushReleaseError::NotAnEnvelope(e.to_string()))?;
    if !state.store.workspace_exists(scope, workspace).await? {
        return Err(PushReleaseError::NoWorkspace(workspace));
    }
    let keys = state
        .store
        .list_release_keys(scope, workspace)
        .await?
        .into_iter()
        .filter(|k| k.revoked_at.is_none())
        .map(|k| {
            CustomerPublicKey::from_pem(&k.public_pem)
                .map_err(|e| StoreError::Corrupt(format!("release key {}: {e}", k.key_id)))
        })
        .collect::<Result<Vec<_>, _>>()?;
    // Hashing and parsing up to the statement's cap: off the async workers.
    let verified = tokio::task::spawn_blocking(move || verify_release(&envelope, &keys))
        .await
        .map_err(|_| PushReleaseError::Interrupted)?
        .map_err(PushReleaseError::Invalid)?;
    let manifest = verified.manifest();
    let digests: Vec<&str> = verified.statement().artifacts.iter().map(|a| a.sha256.as_str()).collect();
    // Rows are never deleted, so a check before the write lock still holds at the commit.
    let missing = state.store.missing_artifacts(scope, workspace, &digests).await?;
    if !missing.is_empty() {
        return Err(PushReleaseError::MissingArtifacts(missing));
    }
    let now = state.now();
    let row = ReleaseRow {
        workspace_id: workspace,
        name: manifest.name.clone(),
        version: manifest.version.clone(),
        digest: verified.digest().to_owned(),
        artifacts: verified.statement().artifacts.len() as u64,
        envelope: envelope_json,
        pushed_by: scope.principal().actor(),
        pushed_at: now,
    };
    let mut ev = event(scope.principal().actor(), AuditAction::ReleasePush, Outcome::Success);
    ev.workspace = Some(workspace.to_string());
    ev.target = Some(format!("{}@{}", row.name, row.version));
    let mut tx = state.store.write().await?;
    if let Some(stored) = tx.release(scope, workspace, &row.name, &row.version).await? {
        drop(tx);
        if stored.digest != row.digest {
            return Err(PushReleaseError::Immutable { name: row.name, version: row.version, stored: stored.digest });
        }
        ev.detail = serde_json::json!({ "digest": row.digest, "unchanged": true });
        state.audit(&scope.chain(), ev).await?;
        return Ok(PushedRelease { row: stored, created: false });
    }
    if !tx.insert_release(scope, &row).await? {
        return Err(PushReleaseError::NoWorkspace(workspace));
    }
    tx.insert_release_artifacts(scope, workspace, &row.name, &row.version, &digests).await?;
    ev.detail = serde_json::json!({
        "digest": row.digest,
        "artifacts": row.artifacts,
        "signed_by": verified.signed_by(),
    });
    tx.audit(&scope.chain(), now, ev).await?;
    tx.commit().await?;
    tracing::info!(release = %row.name, version = %row.version, digest = %row.digest, "release pushed");
    Ok(PushedRelease { row, created: true })
}

/// Which release a deploy names: `NAME@VERSION`, or the release digest (64 hex digits).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReleaseSelector {
    Digest(String),
    Version { name: String, version: String },
}

impl std::str::FromStr for ReleaseSelector {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            let shown: String = s.chars().filter(|c| !c.is_control()).take(80).collect();
            format!("`{shown}` names no release: give NAME@VERSION or the release digest")
        };
        if s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Ok(Self::Digest(s.to_owned()));
        }
        let (name, version) = s.split_once('@').ok_or_else(bad)?;
        if name.is_empty() || version.is_empty() || s.len() > 256 || s.chars().any(char::is_control) {
            return Err(bad());
        }
        Ok(Self::Version { name: name.to_owned(), version: version.to_owned() })
    }
}

impl std::fmt::Display for ReleaseSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Digest(d) => f.write_str(d),
            Self::Version { name, version } => write!(f, "{name}@{version}"),
        }
    }
}

/// Why a stored release cannot be deployed.
#[derive(Debug, thiserror::Error)]
pub enum DeployableError {
    #[error("no release {0} in workspace {1}; push it with `airlock release push`")]
    NoRelease(ReleaseSelector, WorkspaceId),
    /// Its signing key was revoked since it was pushed (or the stored envelope is damaged).
    #[error("release {0} no longer verifies with the workspace's unrevoked keys: {1}")]
    NoLongerVerifies(ReleaseSelector, ReleaseError),
    #[error("verifying the release did not finish; retry")]
    Interrupted,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The workspace's unrevoked release keys: what a release must be signed by, and what the
/// control plane relays to appliances with a deploy.
pub async fn unrevoked_keys(
    state: &AppState,
    scope: &TenantScope,
    workspace: WorkspaceId,
) -> Result<Vec<ReleaseKeyRow>, StoreError> {
    let keys = state.store.list_release_keys(scope, workspace).await?;
    Ok(keys.into_iter().filter(|k| k.revoked_at.is_none()).collect())
}

/// A stored release, verified again with the workspace's unrevoked keys (a release whose key
/// was revoked since is not deployed), on the blocking pool.
pub async fn deployable(
    state: &AppState,
    scope: &TenantScope,
    workspace: WorkspaceId,
    selector: &ReleaseSelector,
) -> Result<(ReleaseRow, VerifiedRelease), DeployableError> {
    let row = state
        .store
        .find_release(scope, workspace, selector)
        .await?
        .ok_or_else(|| DeployableError::NoRelease(selector.clone(), workspace))?;
    let keys = unrevoked_keys(state, scope, workspace)
        .await?
        .iter()
        .map(|k| {
            CustomerPublicKey::from_pem(&k.public_pem)
                .map_err(|e| StoreError::Corrupt(format!("release key {}: {e}", k.key_id)))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let envelope = Envelope::from_json(row.envelope.as_bytes())
        .map_err(|e| StoreError::Corrupt(format!("release {}@{}: {e}", row.name, row.version)))?;
    let verified = tokio::task::spawn_blocking(move || verify_release(&envelope, &keys))
        .await
        .map_err(|_| DeployableError::Interrupted)?
        .map_err(|e| DeployableError::NoLongerVerifies(selector.clone(), e))?;
    if verified.digest() != row.digest {
        return Err(
            StoreError::Corrupt(format!("release {}@{}: digest differs from its row", row.name, row.version)).into()
        );
    }
    Ok((row, verified))
}
