//! `/v1/workspaces/{workspace}/artifacts/{sha256}`: a release's artifact bytes, uploaded by their
//! SHA-256 before the release that names them is pushed ([`crate::artifacts`]).
//!
//! The upload is streamed to disk under its own size limit (`--max-artifact-bytes`), not the
//! API's JSON body limit ([`super::limit_body`] exempts this route); the metadata read lets the
//! CLI upload only what is missing; the download serves the bytes back to the vendor.

use std::sync::Arc;

use airlock_core::audit::Outcome;
use airlock_core::{Timestamp, WorkspaceId};
use axum::Json;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{ApiError, ApiPath, Authed, ErrorBody, ReadAudit, audited, parse_id, refused};
use crate::artifacts::{Put, PutError, READ_CHUNK, Sha256Hex};
use crate::authz::Action;
use crate::state::{AppState, event};
use crate::store::ArtifactRow;

impl From<PutError> for ApiError {
    fn from(e: PutError) -> Self {
        match e {
            PutError::BadDigest => ApiError::bad_request(e.to_string()),
            PutError::NoWorkspace(_) => ApiError::not_found(e.to_string()),
            PutError::Mismatch { .. } => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "digest_mismatch", e.to_string())
            }
            PutError::TooLarge { .. } => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", e.to_string())
            }
            PutError::DiskFull => ApiError::new(StatusCode::INSUFFICIENT_STORAGE, "disk_full", e.to_string()),
            PutError::QuotaExceeded { .. } => {
                ApiError::new(StatusCode::INSUFFICIENT_STORAGE, "quota_exceeded", e.to_string())
            }
            PutError::Body(_) => ApiError::bad_request(e.to_string()),
            PutError::Io(_) => ApiError::internal(e.to_string()),
            PutError::Store(e) => e.into(),
        }
    }
}

/// An artifact's bytes, as sent: any bytes (the server checks their SHA-256, not their shape).
#[derive(ToSchema)]
#[schema(value_type = String, format = Binary)]
// Only documents the body: the handler streams it and never builds one.
#[allow(dead_code)]
pub struct ArtifactBytes(Vec<u8>);

#[derive(Serialize, Deserialize, ToSchema)]
pub struct ArtifactView {
    pub workspace: String,
    /// Lowercase hex SHA-256 of the bytes.
    pub sha256: String,
    pub size: u64,
    /// Unix milliseconds: when the workspace first uploaded it.
    #[schema(value_type = i64)]
    pub created_at: Timestamp,
}

impl ArtifactView {
    fn from_row(row: &ArtifactRow) -> Self {
        Self {
            workspace: row.workspace_id.to_string(),
            sha256: row.sha256.clone(),
            size: row.size,
            created_at: row.created_at,
        }
    }
}

fn parse_path(workspace: &str, sha256: &str) -> Result<(WorkspaceId, Sha256Hex), ApiError> {
    Ok((parse_id(workspace)?, Sha256Hex::parse(sha256)?))
}

/// Upload an artifact's bytes under their SHA-256, streamed. Stored only when the bytes have that
/// digest; a workspace that holds it already is answered at once.
#[utoipa::path(put, path = "/v1/workspaces/{workspace}/artifacts/{sha256}", security(("bearer" = [])),
    params(("workspace" = String, Path, description = "workspace id (wsp_…)"),
        ("sha256" = String, Path, description = "lowercase hex SHA-256 of the bytes")),
    request_body(content = ArtifactBytes, content_type = "application/octet-stream", description = "the artifact's bytes"),
    responses((status = 201, body = ArtifactView, description = "stored"),
        (status = 200, body = ArtifactView, description = "the workspace holds this artifact already"),
        (status = 422, body = ErrorBody, description = "the bytes do not have this SHA-256 (`digest_mismatch`); nothing was kept"),
        (status = 500, body = ErrorBody, description = "storage failed; nothing was kept"),
        (status = 507, body = ErrorBody, description = "the control plane's disk is full (`disk_full`), or the workspace's artifacts would pass its quota (`quota_exceeded`); nothing was kept")))]
pub(super) async fn put_artifact(
    State(state): State<Arc<AppState>>,
    Authed(scope): Authed,
    ApiPath((workspace, sha256)): ApiPath<(String, String)>,
    request: Request,
) -> Result<(StatusCode, Json<ArtifactView>), ApiError> {
    let result = async {
        let (ws, digest) = parse_path(&workspace, &sha256)?;
        let declared = request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|n| n > state.artifacts.max_bytes()) {
            return Err(PutError::TooLarge { limit: state.artifacts.max_bytes() }.into());
        }
        let body = request.into_body().into_data_stream();
        match crate::artifacts::put(&state, &scope, ws, &digest, body).await? {
            Put::Created(row) => Ok((StatusCode::CREATED, Json(ArtifactView::from_row(&row)))),
            Put::Present(row) => Ok((StatusCode::OK, Json(ArtifactView::from_row(&row)))),
        }
    }
    .await;
    let mut ev = event(scope.principal().actor(), Action::UploadArtifact.audit_action(), Outcome::Success);
    ev.workspace = Some(workspace);
    ev.target = Some(format!("artifact:{}", sha256.chars().take(64).collect::<String>()));
    match result {
        // An upload answered with "already present" changed nothing: a read, recorded as one.
        Ok((StatusCode::OK, view)) => audited(&state, &scope, ReadAudit::Access, ev, Ok((StatusCode::OK, view))).await,
        other => refused(&state, &scope, ev, other).await,
    }
}

/// An artifact the workspace holds: its size and when it was uploaded (404 if not uploaded there).
#[utoipa::path(get, path = "/v1/workspaces/{workspace}/artifacts/{sha256}", security(("bearer" = [])),
    params(("workspace" = String, Path, description = "workspace id (wsp_…)"),
        ("sha256" = String, Path, description = "lowercase hex SHA-256 of the bytes")),
    responses((status = 200, body = ArtifactView)))]
pub(super) async fn get_artifact(
    State(state): State<Arc<AppState>>,
    Authed(scope): Authed,
    ApiPath((workspace, sha256)): ApiPath<(String, String)>,
) -> Result<Json<ArtifactView>, ApiError> {
    let result = async {
        let (ws, digest) = parse_path(&workspace, &sha256)?;
        match state.store.artifact(&scope, ws, digest.as_str()).await? {
            Some(row) => Ok(ArtifactView::from_row(&row)),
            None => Err(ApiError::not_found(format!("no artifact {digest} in workspace {ws} of your tenant"))),
        }
    }
    .await;
    let mut ev = event(scope.principal().actor(), Action::GetArtifact.audit_action(), Outcome::Success);
    ev.workspace = Some(workspace);
    audited(&state, &scope, ReadAudit::Access, ev, result).await.map(Json)
}

/// An artifact's bytes, as uploaded.
#[utoipa::path(get, path = "/v1/workspaces/{workspace}/artifacts/{sha256}/bytes", security(("bearer" = [])),
    params(("workspace" = String, Path, description = "workspace id (wsp_…)"),
        ("sha256" = String, Path, description = "lowercase hex SHA-256 of the bytes")),
    responses((status = 200, description = "the artifact's bytes", content_type = "application/octet-stream"),
        (status = 500, body = ErrorBody, description = "the stored bytes cannot be read")))]
pub(super) async fn download_artifact(
    State(state): State<Arc<AppState>>,
    Authed(scope): Authed,
    ApiPath((workspace, sha256)): ApiPath<(String, String)>,
) -> Result<Response, ApiError> {
    let result = async {
        let (ws, digest) = parse_path(&workspace, &sha256)?;
        let Some(row) = state.store.artifact(&scope, ws, digest.as_str()).await? else {
            return Err(ApiError::not_found(format!("no artifact {digest} in workspace {ws} of your tenant")));
        };
        let file = tokio::fs::File::open(state.artifacts.blob_path(&digest))
            .await
            .map_err(|_| ApiError::internal("the stored artifact cannot be read"))?;
        Ok((row.size, file))
    }
    .await;
    let mut ev = event(scope.principal().actor(), Action::DownloadArtifact.audit_action(), Outcome::Success);
    ev.workspace = Some(workspace);
    let (size, file) = audited(&state, &scope, ReadAudit::Access, ev, result).await?;
    let stream = futures_util::stream::unfold(file, |mut file| async move {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; READ_CHUNK];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(axum::body::Bytes::from(buf)), file))
            }
            Err(e) => Some((Err(e), file)),
        }
    });
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream".to_owned()), (header::CONTENT_LENGTH, size.to_string())],
        Body::from_stream(stream),
    )
        .into_response())
}

#[cfg(test)]
mod tests;
