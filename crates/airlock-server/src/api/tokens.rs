//! API tokens under `/v1/tokens`: create (the secret shown once), list (never a secret), rotate, revoke. Owners and admins only (`tokens:manage`), always audited.

use std::sync::Arc;
use std::time::Duration;

use airlock_core::audit::Outcome;
use airlock_core::id::TokenId;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{ApiError, ApiJson, ApiPath, Authed, ReadAudit, audited, parse_id, refused};
use crate::authz::{Action, Permission, PermissionSet, Role};
use crate::state::{AppState, event};
use crate::store::TokenRow;
use crate::tokens::{self, NewTokenRequest, TokenError};

#[derive(Serialize, Deserialize, ToSchema)]
pub struct TokenView {
    pub id: String,
    pub name: String,
    /// owner, admin, deployer, operator, viewer or auditor.
    pub role: String,
    /// The one workspace the token acts in; absent: the whole tenant.
    pub workspace_id: Option<String>,
    /// The token's explicit permissions (`environments:read`, …); absent: all its role grants.
    pub actions: Option<Vec<String>>,
    pub expires_at: Option<String>,
    pub created_at: String,
    pub created_by: Option<String>,
    pub rotated_at: Option<String>,
    /// Until when the secret a rotation replaced still works.
    pub previous_valid_until: Option<String>,
    pub revoked_at: Option<String>,
    /// Recorded at most once a minute per token.
    pub last_used_at: Option<String>,
    pub last_used_from: Option<String>,
}

impl From<TokenRow> for TokenView {
    fn from(t: TokenRow) -> Self {
        let ts = |t: Option<airlock_core::Timestamp>| t.map(|t| t.to_string());
        Self {
            id: t.id.to_string(),
            name: t.name,
            role: t.grants.role().map_or("", Role::as_str).to_owned(),
            workspace_id: t.grants.workspace.map(|w| w.to_string()),
            actions: t.grants.actions.map(|a| a.iter().map(|p| p.as_str().to_owned()).collect()),
            expires_at: ts(t.grants.expires_at),
            created_at: t.created_at.to_string(),
            created_by: t.created_by,
            rotated_at: ts(t.rotated_at),
            previous_valid_until: ts(t.previous_valid_until),
            revoked_at: ts(t.revoked_at),
            last_used_at: ts(t.last_used_at),
            last_used_from: t.last_used_from,
        }
    }
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct IssuedTokenView {
    /// The secret in clear (`airlock_at_…`). Shown once; only its hash is stored.
    pub token: String,
    pub details: TokenView,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// 1–100 characters.
    pub name: String,
    /// owner, admin, deployer, operator, viewer or auditor; no more than yours.
    pub role: String,
    /// Confine the token to one workspace (wsp_…); absent: the whole tenant.
    pub workspace_id: Option<String>,
    /// Permissions the token may use, within what its role grants; absent: all its role grants.
    pub actions: Option<Vec<String>>,
    /// How long the token lives: `90d`, `12h`, `3600` (seconds); at most 365 days.
    pub expires_in: String,
}

#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct RotateToken {
    /// How long the old secret keeps working: `0` (the default) to `7d`.
    pub grace: Option<String>,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct RevokedTokenView {
    pub id: String,
    pub revoked_at: String,
    /// The tokens it made, and theirs, revoked with it.
    pub also_revoked: Vec<String>,
}

/// List the tenant's API tokens (never their secrets).
#[utoipa::path(get, path = "/v1/tokens", security(("bearer" = [])),
    responses((status = 200, body = Vec<TokenView>)))]
pub(super) async fn list_tokens(
    State(state): State<Arc<AppState>>,
    Authed(scope): Authed,
) -> Result<Json<Vec<TokenView>>, ApiError> {
    let result = tokens::list(&state, &scope)
        .await
        .map_err(ApiError::from)
        .map(|rows| rows.into_iter().map(TokenView::from).collect());
    let ev = event(scope.principal().actor(), Action::ListTokens.audit_action(), Outcome::Success);
    audited(&state, &scope, ReadAudit::Durable, ev, result).await.map(Json)
}

/// Create a scoped API token. Its secret is in this answer only.
#[utoipa::path(post, path = "/v1/tokens", security(("bearer" = [])),
    request_body = CreateToken,
    responses((status = 201, body = IssuedTokenView)))]
pub(super) async fn create_token(
    State(state): State<Arc<AppState>>,
    Authed(scope): Authed,
    body: Result<ApiJson<CreateToken>, ApiError>,
) -> Result<(StatusCode, Json<IssuedTokenView>), ApiError> {
    let result = async {
        let ApiJson(body) = body?;
        let role: Role = body.role.parse().map_err(ApiError::bad_request)?;
        let workspace = body.workspace_id.as_deref().map(parse_id).transpose()?;
        let actions = body
            .actions
            .map(|list| list.iter().map(|a| a.parse::<Permission>()).collect::<Result<PermissionSet, _>>())
            .transpose()
            .map_err(ApiError::bad_request)?;
        let lifetime = airlock_core::time::parse_duration(&body.expires_in).map_err(ApiError::bad_request)?;
        let req = NewTokenRequest { name: body.name, role, workspace, actions, lifetime };
        let issued = tokens::create(&state, &scope, req).await?;
        let view = IssuedTokenView { token: issued.secret.expose().to_owned(), details: issued.token.into() };
        Ok((StatusCode::CREATED, Json(view)))
    }
    .await;
    let ev = event(scope.principal().actor(), Action::CreateToken.audit_action(), Outcome::Success);
    refused(&state, &scope, ev, result).await
}

/// Give a token a new secret; the old one keeps working for the grace given (default none).
#[utoipa::path(post, path = "/v1/tokens/{token}/rotate", security(("bearer" = [])),
    params(("token" = String, Path, description = "token id (tok_…)")),
    request_body = RotateToken,
    responses((status = 200, body = IssuedTokenView)))]
pub(super) async fn rotate_token(
    State(state): State<Arc<AppState>>,
    Authed(scope): Authed,
    ApiPath(token): ApiPath<String>,
    body: Result<ApiJson<RotateToken>, ApiError>,
) -> Result<Json<IssuedTokenView>, ApiError> {
    let result = async {
        let ApiJson(body) = body?;
        let id: TokenId = parse_id(&token)?;
        let grace = body
            .grace
            .as_deref()
            .map(airlock_core::time::parse_duration)
            .transpose()
            .map_err(ApiError::bad_request)?
            .unwrap_or(Duration::ZERO);
        let issued = tokens::rotate(&state, &scope, id, grace).await?;
        Ok(Json(IssuedTokenView { token: issued.secret.expose().to_owned(), details: issued.token.into() }))
    }
    .await;
    let mut ev = event(scope.principal().actor(), Action::RotateToken.audit_action(), Outcome::Success);
    ev.target = Some(token);
    refused(&state, &scope, ev, result).await
}

/// Revoke a token, and the tokens it made: the very next request with any of them is refused.
#[utoipa::path(delete, path = "/v1/tokens/{token}", security(("bearer" = [])),
    params(("token" = String, Path, description = "token id (tok_…)")),
    responses((status = 200, body = RevokedTokenView)))]
pub(super) async fn revoke_token(
    State(state): State<Arc<AppState>>,
    Authed(scope): Authed,
    ApiPath(token): ApiPath<String>,
) -> Result<Json<RevokedTokenView>, ApiError> {
    let result = async {
        let id: TokenId = parse_id(&token)?;
        let revoked = tokens::revoke(&state, &scope, id).await?;
        Ok(Json(RevokedTokenView {
            id: id.to_string(),
            revoked_at: revoked.at.to_string(),
            also_revoked: revoked.also_revoked.iter().map(ToString::to_string).collect(),
        }))
    }
    .await;
    let mut ev = event(scope.principal().actor(), Action::RevokeToken.audit_action(), Outcome::Success);
    ev.target = Some(token);
    refused(&state, &scope, ev, result).await
}

impl From<TokenError> for ApiError {
    fn from(e: TokenError) -> Self {
        match e {
            TokenError::Name | TokenError::Lifetime | TokenError::Grace | TokenError::ActionOutsideRole(..) => {
                ApiError::bad_request(e.to_string())
            }
            TokenError::NoWorkspace(_) | TokenError::NoToken(_) => ApiError::not_found(e.to_string()),
            TokenError::ExceedsCreator(_) => ApiError::forbidden(e.to_string()),
            TokenError::Store(e) => e.into(),
        }
    }
}
