//! Appliances under `/v1`: join with a single-use token, list with live status, revoke.

use std::sync::Arc;

use airlock_core::audit::Outcome;
use airlock_core::{ApplianceId, EnvironmentId};
use airlock_proto::join::{JoinRequest, JoinResponse};
use axum::Json;
use axum::extract::{Query, State};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{ApiError, ApiJson, ApiPath, Authed, ErrorBody, ReadAudit, audited, parse_id, refused};
use crate::appliances::{self, JoinError, JoinRefusal, RevokeError};
use crate::authz::Action;
use crate::state::{AppState, event};
use crate::store::StoreError;

/// Exchange a single-use join token and a CSR for an appliance certificate.
#[utoipa::path(post, path = "/v1/join", request_body = JoinRequest,
    responses((status = 200, body = JoinResponse),
        (status = 400, body = ErrorBody, description = "the CSR is refused"),
        (status = 401, body = ErrorBody, description = "the join token is unknown, spent or expired"),
        (status = 503, body = ErrorBody, description = "the store is unavailable; retry later")))]
pub(super) async fn join(
    State(state): State<Arc<AppState>>,
    ApiJson(req): ApiJson<JoinRequest>,
) -> Result<Json<JoinResponse>, ApiError> {
    let joined = appliances::join(&state, &req.join_token, &req.csr_pem, &req.version).await?;
    Ok(Json(JoinResponse {
        appliance_id: joined.identity.appliance.to_string(),
        identity: joined.identity.uri(),
        certificate_pem: joined.certificate.pem,
        ca_certificate_pem: state.ca.cert_pem().to_owned(),
        gateway_endpoint: state.gateway_endpoint.clone(),
        gateway_server_name: state.gateway_server_name.clone(),
        not_after: joined.certificate.not_after.to_string(),
    }))
}

#[derive(Serialize, Deserialize, ToSchema, Clone)]
pub struct ApplianceView {
    pub id: String,
    pub environment_id: String,
    pub connected: bool,
    pub revoked: bool,
    pub version: String,
    pub healthy: Option<bool>,
    pub last_heartbeat: Option<String>,
    pub cert_serial: String,
    pub cert_not_after: String,
    pub joined_at: String,
    /// The id of the execution key the customer attested for this appliance, as it last sent
    /// the attestation: requests made for it name this key. Absent until then.
    pub execution_key: Option<String>,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct ApplianceList {
    pub appliances: Vec<ApplianceView>,
}

#[derive(Deserialize)]
pub struct ApplianceQuery {
    environment: Option<String>,
}

/// List appliances, with live status merged from the gateway.
#[utoipa::path(get, path = "/v1/appliances", security(("bearer" = [])),
    params(("environment" = Option<String>, Query, description = "only this environment (env_…)")),
    responses((status = 200, body = ApplianceList)))]
pub(super) async fn list_appliances(
    State(state): State<Arc<AppState>>,
    Authed(scope): Authed,
    query: Result<Query<ApplianceQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<ApplianceList>, ApiError> {
    let result = async {
        let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
        let env = q.environment.as_deref().map(parse_id::<EnvironmentId>).transpose()?;
        let rows = state.store.list_appliances(&scope, env).await?;
        let appliances = rows
            .iter()
            .map(|r| {
                let live = state.registry.status(&r.id);
                let execution_key = r
                    .execution_key_attestation
                    .as_deref()
                    .map(|json| crate::attestation::stored_key_id(&r.id.to_string(), json))
                    .transpose()?;
                Ok(ApplianceView {
                    id: r.id.to_string(),
                    environment_id: r.environment_id.to_string(),
                    connected: live.is_some(),
                    revoked: r.revoked_at.is_some(),
                    version: live.as_ref().map_or(r.version.clone(), |l| l.version.clone()),
                    healthy: live.as_ref().map(|l| l.healthy),
                    last_heartbeat: live.as_ref().map(|l| l.last_heartbeat).or(r.last_seen_at).map(|t| t.to_string()),
                    cert_serial: live.as_ref().map_or(r.cert_serial.clone(), |l| l.cert_serial.clone()),
                    cert_not_after: live.as_ref().map_or(r.cert_not_after, |l| l.cert_not_after).to_string(),
                    joined_at: r.joined_at.to_string(),
                    execution_key,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok(ApplianceList { appliances })
    }
    .await;
    let ev = event(scope.principal().actor(), Action::ListAppliances.audit_action(), Outcome::Success);
    audited(&state, &scope, ReadAudit::Access, ev, result).await.map(Json)
}

/// What revoking an appliance did.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct RevokedView {
    pub id: String,
    /// Always true: the appliance is revoked now, whether or not it was before.
    pub revoked: bool,
    /// Whether it had a live stream, which was ended.
    pub was_connected: bool,
}

/// Revoke an appliance: its live stream closes at once and its certificates are refused.
#[utoipa::path(post, path = "/v1/appliances/{appliance}/revoke", security(("bearer" = [])),
    params(("appliance" = String, Path, description = "appliance id (apl_…)")),
    responses((status = 200, body = RevokedView)))]
pub(super) async fn revoke_appliance(
    State(state): State<Arc<AppState>>,
    Authed(scope): Authed,
    ApiPath(appliance): ApiPath<String>,
) -> Result<Json<RevokedView>, ApiError> {
    let result = async {
        let id: ApplianceId = parse_id(&appliance)?;
        let revoked = appliances::revoke(&state, &scope, id).await?;
        Ok(Json(RevokedView { id: id.to_string(), revoked: true, was_connected: revoked.was_connected }))
    }
    .await;
    let mut ev = event(scope.principal().actor(), Action::RevokeAppliance.audit_action(), Outcome::Success);
    ev.target = Some(appliance);
    refused(&state, &scope, ev, result).await
}

/// The latest deployment status the appliance reported: the release running, the deploy in
/// progress, each service's state and whether each secret reference exists (never a value).
#[utoipa::path(get, path = "/v1/appliances/{appliance}/deployment", security(("bearer" = [])),
    params(("appliance" = String, Path, description = "appliance id (apl_…)")),
    responses((status = 200, body = crate::deployments::DeploymentStatusView),
        (status = 404, body = ErrorBody, description = "no such appliance in your tenant, or it has not reported yet")))]
pub(super) async fn get_deployment_status(
    State(state): State<Arc<AppState>>,
    Authed(scope): Authed,
    ApiPath(appliance): ApiPath<String>,
) -> Result<Json<crate::deployments::DeploymentStatusView>, ApiError> {
    let result = async {
        let id: ApplianceId = parse_id(&appliance)?;
        if state.store.get_appliance(&scope, id).await?.is_none() {
            return Err(ApiError::not_found(format!("no appliance {id} in your tenant")));
        }
        let status = crate::deployments::status(&state, &scope, id).await?;
        status.ok_or_else(|| ApiError::not_found(format!("appliance {id} has not reported a deployment status yet")))
    }
    .await;
    let mut ev = event(scope.principal().actor(), Action::GetDeploymentStatus.audit_action(), Outcome::Success);
    ev.target = Some(appliance);
    audited(&state, &scope, ReadAudit::Access, ev, result).await.map(Json)
}

impl From<JoinError> for ApiError {
    fn from(e: JoinError) -> Self {
        match e {
            JoinError::Refused { refusal: JoinRefusal::Token, reason } => ApiError::unauthorized(reason),
            JoinError::Refused { refusal: JoinRefusal::Csr, reason } => ApiError::bad_request(reason),
            JoinError::Store(e) => e.into(),
        }
    }
}

impl From<RevokeError> for ApiError {
    fn from(e: RevokeError) -> Self {
        match e {
            RevokeError::NoAppliance(_) => ApiError::not_found(e.to_string()),
            RevokeError::Store(e) => e.into(),
        }
    }
}
