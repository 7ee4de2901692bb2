//! Release artifacts on the control plane: content-addressed blobs under
//! `<data-dir>/artifacts/sha256/<hex>`, shared on disk by every workspace that uploaded them, and
//! reached only through a workspace's row ([`crate::store::ArtifactRow`], bound to a
//! [`TenantScope`]).
//!
//! Invariants:
//! - A blob's file is only ever renamed into place, after its bytes were written to a temporary
//!   file, hashed while written, fsynced, and found to have the digest its name says; a wrong
//!   digest, a body over the limit, a full disk or a broken upload leave nothing behind.
//! - A workspace holds an artifact only after uploading all of its bytes itself: knowing a digest
//!   grants nothing, even when another tenant's identical bytes are on disk already.
//! - The body is streamed to disk, never held whole in memory; its size is bounded by
//!   [`ArtifactStore::max_bytes`] (the server's `--max-artifact-bytes`).
//! - A workspace holds at most [`ArtifactStore::workspace_quota`] bytes of artifacts (the
//!   server's `--max-workspace-artifact-bytes`), counted over its rows: an upload reads no more
//!   than what is left, and its row is inserted only if the sum still fits, in the same
//!   statement, so concurrent uploads cannot pass it together ([`PutError::QuotaExceeded`]).
//!   The disk bounds them all (a full disk is refused cleanly as [`PutError::DiskFull`]).

use std::io;
use std::path::{Path, PathBuf};

use airlock_core::WorkspaceId;
use airlock_core::audit::{AuditAction, Outcome};
use futures_util::{Stream, StreamExt};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;

use crate::authz::TenantScope;
use crate::state::{AppState, event};
use crate::store::{ArtifactRow, StoreError};

/// The default largest artifact one upload may carry: 2 GiB.
pub const DEFAULT_MAX_ARTIFACT_BYTES: u64 = 2 * 1024 * 1024 * 1024;
/// The default most bytes of artifacts one workspace may hold: 100 GiB.
pub const DEFAULT_MAX_WORKSPACE_ARTIFACT_BYTES: u64 = 100 * 1024 * 1024 * 1024;

/// How much of a blob one read takes, when it is downloaded or fetched by an appliance.
pub const READ_CHUNK: usize = 512 * 1024;

/// A lowercase hex SHA-256, checked: the only thing that names a blob on disk.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Sha256Hex(String);

impl Sha256Hex {
    pub fn parse(s: &str) -> Result<Self, PutError> {
        if s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            Ok(Self(s.to_owned()))
        } else {
            Err(PutError::BadDigest)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Sha256Hex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where blobs live, and how large one may be.
#[derive(Debug)]
pub struct ArtifactStore {
    /// `<data-dir>/artifacts/sha256`.
    blobs: PathBuf,
    /// `<data-dir>/artifacts/tmp`: uploads in progress, on the same filesystem so a rename is atomic.
    tmp: PathBuf,
    max_bytes: u64,
    workspace_quota: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum PutError {
    #[error("an artifact is named by its lowercase hex SHA-256 (64 characters)")]
    BadDigest,
    #[error("no workspace {0} in your tenant")]
    NoWorkspace(WorkspaceId),
    #[error("the uploaded bytes have SHA-256 {actual}, not {expected}; nothing was kept")]
    Mismatch { expected: String, actual: String },
    #[error("the artifact is larger than this server's limit of {limit} bytes (`--max-artifact-bytes`)")]
    TooLarge { limit: u64 },
    #[error("the control plane's disk is full; nothing was kept")]
    DiskFull,
    #[error(
        "the workspace would hold more than its quota of {quota} bytes of artifacts (it holds {used}; \
         `--max-workspace-artifact-bytes`); nothing was kept"
    )]
    QuotaExceeded { quota: u64, used: u64 },
    #[error("the upload broke off: {0}")]
    Body(String),
    #[error("artifact storage failed: {0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// An upload's result: stored by this call, or held by the workspace already.
#[derive(Debug)]
pub enum Put {
    Created(ArtifactRow),
    Present(ArtifactRow),
}

impl ArtifactStore {
    /// The store under `<data_dir>/artifacts`, created owner-only if missing.
    pub fn open(data_dir: &Path, max_bytes: u64, workspace_quota: u64) -> io::Result<Self> {
        let root = data_dir.join("artifacts");
        let (blobs, tmp) = (root.join("sha256"), root.join("tmp"));
        for dir in [&root, &blobs, &tmp] {
            std::fs::create_dir_all(dir)?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
            }
        }
        // Leftovers of uploads a crash interrupted: never renamed, so never a blob.
        for entry in std::fs::read_dir(&tmp)?.flatten() {
            let _ = std::fs::remove_file(entry.path());
        }
        Ok(Self { blobs, tmp, max_bytes, workspace_quota })
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    pub fn workspace_quota(&self) -> u64 {
        self.workspace_quota
    }

    /// The blob's file (it exists only once a whole, checked upload was renamed there).
    pub fn blob_path(&self, digest: &Sha256Hex) -> PathBuf {
        self.blobs.join(digest.as_str())
    }

    /// Streams `body` to a temporary file while hashing it; renames it to the blob's path only
    /// when its SHA-256 is `expected`. Returns the size; a body over `limit` bytes is
    /// [`PutError::TooLarge`].
    pub async fn receive<S, E>(&self, expected: &Sha256Hex, body: S, limit: u64) -> Result<u64, PutError>
    where
        S: Stream<Item = Result<axum::body::Bytes, E>>,
        E: std::fmt::Display,
    {
        let tmp = self.tmp.join(format!("{expected}.{}", unique()));
        let result = self.receive_into(&tmp, expected, body, limit).await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        result
    }

    async fn receive_into<S, E>(&self, tmp: &Path, expected: &Sha256Hex, body: S, limit: u64) -> Result<u64, PutError>
    where
        S: Stream<Item = Result<axum::body::Bytes, E>>,
        E: std::fmt::Display,
    {
        let file = tokio::fs::OpenOptions::new().write(true).create_new(true).open(tmp).await.map_err(disk)?;
        // Large writes: one blocking-pool hop per MiB rather than per HTTP frame.
        let mut out = tokio::io::BufWriter::with_capacity(1024 * 1024, file);
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut body = std::pin::pin!(body);
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| body_error(&e.to_string(), self.max_bytes))?;
            size += chunk.len() as u64;
            if size > limit {
                return Err(PutError::TooLarge { limit });
            }
            hasher.update(&chunk);
            out.write_all(&chunk).await.map_err(disk)?;
        }
        out.flush().await.map_err(disk)?;
        let actual = hex(&hasher.finalize());
        if actual != expected.as_str() {
            return Err(PutError::Mismatch { expected: expected.to_string(), actual });
        }
        let file = out.into_inner();
        file.sync_all().await.map_err(disk)?;
        drop(file);
        // The same bytes may be there already (another workspace's upload): replacing them with
        // identical bytes is harmless, and the rename is atomic either way.
        tokio::fs::rename(tmp, self.blob_path(expected)).await.map_err(disk)?;
        let dir = tokio::fs::File::open(&self.blobs).await?;
        dir.sync_all().await.map_err(disk)?;
        Ok(size)
    }
}

/// A body error: the size limit when it is `http_body_util::Limited`'s, else a broken upload.
fn body_error(message: &str, limit: u64) -> PutError {
    if message.contains("length limit exceeded") {
        PutError::TooLarge { limit }
    } else {
        PutError::Body(message.chars().take(200).collect())
    }
}

/// ENOSPC and EDQUOT are a full disk; anything else is a storage failure.
pub(crate) fn disk(e: io::Error) -> PutError {
    match e.raw_os_error() {
        Some(28 /* ENOSPC */ | 122 /* EDQUOT */) => PutError::DiskFull,
        _ => PutError::Io(e),
    }
}

fn unique() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("{}-{}.upload", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(bytes)
}

/// Uploads an artifact into a workspace: streamed to disk and checked ([`ArtifactStore::receive`]),
/// then its row and audit record in one transaction. The body is read even when the workspace
/// holds the artifact already only if it did not: a held one is answered at once.
pub async fn put<S, E>(
    state: &AppState,
    scope: &TenantScope,
    workspace: WorkspaceId,
    digest: &Sha256Hex,
    body: S,
) -> Result<Put, PutError>
where
    S: Stream<Item = Result<axum::body::Bytes, E>>,
    E: std::fmt::Display,
{
    if !state.store.workspace_exists(scope, workspace).await? {
        return Err(PutError::NoWorkspace(workspace));
    }
    if let Some(row) = state.store.artifact(scope, workspace, digest.as_str()).await? {
        return Ok(Put::Present(row));
    }
    let quota = state.artifacts.workspace_quota();
    let used = state.store.workspace_artifact_bytes(scope, workspace).await?;
    let left = quota.saturating_sub(used);
    if left == 0 {
        return Err(PutError::QuotaExceeded { quota, used });
    }
    let limit = state.artifacts.max_bytes().min(left);
    let size = match state.artifacts.receive(digest, body, limit).await {
        Err(PutError::TooLarge { .. }) if limit < state.artifacts.max_bytes() => {
            return Err(PutError::QuotaExceeded { quota, used });
        }
        other => other?,
    };
    let now = state.now();
    let row = ArtifactRow { workspace_id: workspace, sha256: digest.to_string(), size, created_at: now };
    let mut ev = event(scope.principal().actor(), AuditAction::ReleasePush, Outcome::Success);
    ev.workspace = Some(workspace.to_string());
    ev.target = Some(format!("artifact:{digest}"));
    ev.detail = serde_json::json!({ "artifact": digest.as_str(), "size": size });
    let mut tx = state.store.write().await?;
    if !tx.insert_artifact(scope, &row, quota).await? {
        drop(tx);
        // Another upload of the same bytes won, or others filled the quota meanwhile. (The
        // blob stays on disk: identical bytes of another workspace may share its file.)
        if let Some(row) = state.store.artifact(scope, workspace, digest.as_str()).await? {
            return Ok(Put::Present(row));
        }
        let used = state.store.workspace_artifact_bytes(scope, workspace).await?;
        if state.store.workspace_exists(scope, workspace).await? {
            return Err(PutError::QuotaExceeded { quota, used });
        }
        return Err(PutError::NoWorkspace(workspace));
    }
    tx.audit(&scope.chain(), now, ev).await?;
    tx.commit().await?;
    tracing::info!(%workspace, artifact = %digest, size, "artifact uploaded");
    Ok(Put::Created(row))
}
