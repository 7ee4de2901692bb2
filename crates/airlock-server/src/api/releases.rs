//! `/v1/workspaces/{workspace}/release-keys` and `/v1/workspaces/{workspace}/releases`: a
//! workspace's release-signing keys, and the signed releases pushed into it (see
//! [`crate::releases`]). A release is its signed statement (manifest and artifact digests); the
//! artifacts' bytes are uploaded before it (`api::artifacts`).

use std::sync::Arc;

use airlock_core::audit::Outcome;
use airlock_core::dsse::{DsseError, Envelope};
use airlock_core::release::ReleaseError;
use airlock_core::{Timestamp, WorkspaceId};
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{ApiError, ApiJson, ApiPath, Authed, ErrorBody, ReadAudit, audited, parse_id, refused};
use crate::authz::Action;
use crate::releases::{PushReleaseError, ReleaseKeyError};
use crate::state::{AppState, event};
use crate::store::{ReleaseKeyRow, ReleaseRow};

impl From<ReleaseKeyError> for ApiError {
    fn from(e: ReleaseKeyError) -> Self {
        match e {
            ReleaseKeyError::BadKey(_) => ApiError::bad_request(e.to_string()),
            ReleaseKeyError::NoWorkspace(_) | ReleaseKeyError::NoKey(_) => ApiError::not_found(e.to_string()),
            ReleaseKeyError::Store(e) => e.into(),
        }
    }
}

impl From<PushReleaseError> for ApiError {
    fn from(e: PushReleaseError) -> Self {
        match e {
            PushReleaseError::NotAnEnvelope(_) => ApiError::bad_request(e.to_string()),
            PushReleaseError::Invalid(ReleaseError::Limit(_)) => ApiError::limit_exceeded(e.to_string()),
            PushReleaseError::Invalid(ReleaseError::Signature(DsseError::NotEnoughSignatures { .. })) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "unverified",
                "the release is not signed by a release key registered in this workspace; register its public half \
                 first (`airlock release key add`)",
            ),
            PushReleaseError::Invalid(_) => ApiError::bad_request(e.to_string()),
            PushReleaseError::Immutable { .. } => ApiError::conflict(e.to_string()),
            PushReleaseError::NoWorkspace(_) => ApiError::not_found(e.to_string()),
            PushReleaseError::MissingArtifacts(_) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "missing_artifacts", e.to_string())
            }
            PushReleaseError::Interrupted => ApiError::unavailable(e.to_string()),
            PushReleaseError::Store(e) => e.into(),
        }
    }
}

// ---------- release keys ----------

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddReleaseKey {
    /// The release key's public half (Ed25519, PEM), as `airlock customer keygen` writes it.
    pub public_key_pem: String,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct ReleaseKeyView {
    pub workspace: String,
    /// Hex SHA-256 of the public key: the key id its DSSE signatures name.
    pub key_id: String,
    pub public_key_pem: String,
    /// Unix milliseconds.
    #[schema(value_type = i64)]
    pub created_at: Timestamp,
    /// Unix milliseconds; absent while the key is accepted.
    #[schema(value_type = Option<i64>)]
    pub revoked_at: Option<Timestamp>,
}

impl ReleaseKeyView {
    fn from_row(row: &ReleaseKeyRow) -> Self {
        Self {
            workspace: row.workspace_id.to_string(),
            key_id: row.key_id.clone(),
            public_key_pem: row.public_pem.clone(),
            created_at: row.created_at,
            revoked_at: row.revoked_at,
        }
    }
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct ReleaseKeyList {
    pub keys: Vec<ReleaseKeyView>,
}

/// Register a release-signing key: releases pushed into the workspace must be signed by one.
#[utoipa::path(post, path = "/v1/workspaces/{workspace}/release-keys", security(("bearer" = [])),
    params(("workspace" = String, Path, description = "workspace id (wsp_…)")),
    request_body = AddReleaseKey,
    responses((status = 201, body = ReleaseKeyView, description = "registered"),
        (status = 409, body = ErrorBody, description = "the workspace holds this key already")))]
pub(super) async fn add_release_key(
    State(state): State<Arc<AppState>>,
    Authed(scope): Authed,
    ApiPath(workspace): ApiPath<String>,
    body: Result<ApiJson<AddReleaseKey>, ApiError>,
) -> Result<(StatusCode, Json<ReleaseKeyView>), ApiError> {
    let result = async {
        let ApiJson(body) = body?;
        let ws: WorkspaceId = parse_id(&workspace)?;
        let row = crate::releases::add_key(&state, &scope, ws, &body.public_key_pem).await?;
        Ok((StatusCode::CREATED, Json(ReleaseKeyView::from_row(&row))))
    }
    .await;
    let mut ev = event(scope.principal().actor(), Action::AddReleaseKey.audit_action(), Outcome::Success);
    ev.workspace = Some(workspace);
    refused(&state, &scope, ev, result).await
}

/// Revoke a release key: pushes signed only by it are refused, and releases signed only by it
/// are no longer deployed. Revoking a revoked key changes nothing.
#[utoipa::path(post, path = "/v1/workspaces/{workspace}/release-keys/{key_id}/revoke", security(("bearer" = [])),
    params(("workspace" = String, Path, description = "workspace id (wsp_…)"),
        ("key_id" = String, Path, description = "the key's id: hex SHA-256 of its public key")),
    responses((status = 200, body = ReleaseKeyView),
        (status = 404, body = ErrorBody, description = "no such key in this workspace")))]
pub(super) async fn revoke_release_key(
    State(state): State<Arc<AppState>>,
    Authed(scope): Authed,
    ApiPath((workspace, key_id)): ApiPath<(String, String)>,
) -> Result<Json<ReleaseKeyView>, ApiError> {
    let result = async {
        let ws: WorkspaceId = parse_id(&workspace)?;
        if key_id.len() != 64 || !key_id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(ApiError::bad_request("a key id is 64 lowercase hex digits (`airlock release key list`)"));
        }
        let row = crate::releases::revoke_key(&state, &scope, ws, &key_id).await?;
        Ok(Json(ReleaseKeyView::from_row(&row)))
    }
    .await;
    let mut ev = event(scope.principal().actor(), Action::RevokeReleaseKey.audit_action(), Outcome::Success);
    ev.workspace = Some(workspace);
    refused(&state, &scope, ev, result).await
}

/// A workspace's release-signing keys, revoked ones included.
#[utoipa::path(get, path = "/v1/workspaces/{workspace}/release-keys", security(("bearer" = [])),
    params(("workspace" = String, Path, description = "workspace id (wsp_…)")),
    responses((status = 200, body = ReleaseKeyList)))]
pub(super) async fn list_release_keys(
    State(state): State<Arc<AppState>>,
    Authed(scope): Authed,
    ApiPath(workspace): ApiPath<String>,
) -> Result<Json<ReleaseKeyList>, ApiError> {
    let result = async {
        let ws: WorkspaceId = parse_id(&workspace)?;
        if !state.store.workspace_exists(&scope, ws).await? {
            return Err(ApiError::not_found(format!("no workspace {ws} in your tenant")));
        }
        let rows = state.store.list_release_keys(&scope, ws).await?;
        Ok(ReleaseKeyList { keys: rows.iter().map(ReleaseKeyView::from_row).collect() })
    }
    .await;
    let mut ev = event(scope.principal().actor(), Action::ListReleaseKeys.audit_action(), Outcome::Success);
    ev.workspace = Some(workspace);
    audited(&state, &scope, ReadAudit::Access, ev, result).await.map(Json)
}

// ---------- releases ----------

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PushRelease {
    /// The signed release statement: a DSSE envelope (payload type
    /// `application/vnd.airlock.vendor-release.v1+json`) as a JSON object, what `airlock release push` makes.
    #[schema(value_type = Envelope)]
    pub envelope: serde_json::Value,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct ReleaseView {
    pub workspace: String,
    pub name: String,
    pub version: String,
    /// The release digest: SHA-256 of the signed statement, what a deploy binds.
    pub digest: String,
    /// Artifacts the statement names.
    pub artifacts: u64,
    pub pushed_by: String,
    /// Unix milliseconds.
    #[schema(value_type = i64)]
    pub pushed_at: Timestamp,
}

impl ReleaseView {
    fn from_row(row: &ReleaseRow) -> Self {
        Self {
            workspace: row.workspace_id.to_string(),
            name: row.name.clone(),
            version: row.version.clone(),
            digest: row.digest.clone(),
            artifacts: row.artifacts,
            pushed_by: row.pushed_by.clone(),
            pushed_at: row.pushed_at,
        }
    }
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct ReleaseList {
    pub releases: Vec<ReleaseView>,
}

/// Push a signed release. It is verified against the workspace's unrevoked release keys and
/// stored; releases are immutable, so the same name and version again is accepted only with the
/// same digest.
#[utoipa::path(post, path = "/v1/workspaces/{workspace}/releases", security(("bearer" = [])),
    params(("workspace" = String, Path, description = "workspace id (wsp_…)")),
    request_body = PushRelease,
    responses((status = 201, body = ReleaseView, description = "stored"),
        (status = 200, body = ReleaseView, description = "unchanged: this name, version and digest are stored"),
        (status = 409, body = ErrorBody, description = "this name and version are stored with another digest (`conflict`): releases are immutable"),
        (status = 422, body = ErrorBody, description = "not signed by a registered, unrevoked release key of the workspace (`unverified`), over a release limit (`limit_exceeded`), or naming artifacts not uploaded to the workspace (`missing_artifacts`, naming their digests)")))]
pub(super) async fn push_release(
    State(state): State<Arc<AppState>>,
    Authed(scope): Authed,
    ApiPath(workspace): ApiPath<String>,
    body: Result<ApiJson<PushRelease>, ApiError>,
) -> Result<(StatusCode, Json<ReleaseView>), ApiError> {
    let result = async {
        let ApiJson(body) = body?;
        let ws: WorkspaceId = parse_id(&workspace)?;
        let pushed = crate::releases::push(&state, &scope, ws, body.envelope).await?;
        let status = if pushed.created { StatusCode::CREATED } else { StatusCode::OK };
        Ok((status, Json(ReleaseView::from_row(&pushed.row))))
    }
    .await;
    let mut ev = event(scope.principal().actor(), Action::PushRelease.audit_action(), Outcome::Success);
    ev.workspace = Some(workspace);
    refused(&state, &scope, ev, result).await
}

/// A workspace's releases, by name then push time.
#[utoipa::path(get, path = "/v1/workspaces/{workspace}/releases", security(("bearer" = [])),
    params(("workspace" = String, Path, description = "workspace id (wsp_…)")),
    responses((status = 200, body = ReleaseList)))]
pub(super) async fn list_releases(
    State(state): State<Arc<AppState>>,
    Authed(scope): Authed,
    ApiPath(workspace): ApiPath<String>,
) -> Result<Json<ReleaseList>, ApiError> {
    let result = async {
        let ws: WorkspaceId = parse_id(&workspace)?;
        if !state.store.workspace_exists(&scope, ws).await? {
            return Err(ApiError::not_found(format!("no workspace {ws} in your tenant")));
        }
        let rows = state.store.list_releases(&scope, ws).await?;
        Ok(ReleaseList { releases: rows.iter().map(ReleaseView::from_row).collect() })
    }
    .await;
    let mut ev = event(scope.principal().actor(), Action::ListReleases.audit_action(), Outcome::Success);
    ev.workspace = Some(workspace);
    audited(&state, &scope, ReadAudit::Access, ev, result).await.map(Json)
}
