//! `/v1/environments/{environment}/policy`: relay the customer's signed policy to an environment's appliances, and read back the one relayed last.
//!
//! The control plane cannot make or check a policy's signatures (it holds no customer key); see [`crate::policy`] for what it does check.

use std::sync::Arc;

use airlock_core::audit::Outcome;
use airlock_core::dsse::Envelope;
use airlock_core::{EnvironmentId, Timestamp};
use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{ApiError, ApiJson, ApiPath, Authed, ErrorBody, ReadAudit, audited, parse_id, refused};
use crate::authz::Action;
use crate::policy::RelayPolicyError;
use crate::state::{AppState, event};
use crate::store::{PolicyRow, StoreError};

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RelayPolicy {
    /// The customer's signed policy: a DSSE envelope as a JSON object (what
    /// `airlock customer policy sign` writes).
    #[schema(value_type = Envelope)]
    pub envelope: serde_json::Value,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct PolicyView {
    pub environment: String,
    pub serial: u64,
    /// SHA-256 of the signed policy TOML (the digest the appliance reports in its status).
    pub policy_sha256: String,
    /// The envelope as relayed, unchanged.
    #[schema(value_type = Envelope)]
    pub envelope: serde_json::Value,
    pub relayed_by: String,
    /// Unix milliseconds.
    #[schema(value_type = i64)]
    pub relayed_at: Timestamp,
    /// Appliances of the environment it was sent to at once (connected ones); the others get
    /// it when they connect. Absent when read back.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub sent_to: Option<usize>,
}

impl PolicyView {
    fn from_row(row: &PolicyRow, sent_to: Option<usize>) -> Result<Self, ApiError> {
        let envelope = serde_json::from_str(&row.envelope)
            .map_err(|e| StoreError::Corrupt(format!("stored policy of {}: {e}", row.environment_id)))?;
        Ok(Self {
            environment: row.environment_id.to_string(),
            serial: row.serial,
            policy_sha256: row.policy_sha256.clone(),
            envelope,
            relayed_by: row.relayed_by.clone(),
            relayed_at: row.relayed_at,
            sent_to,
        })
    }
}

/// Relay the customer's signed policy to every appliance of the environment. Only its shape is
/// checked here (payload type, at least one signature, a policy that parses, a serial greater
/// than the one relayed before); each appliance verifies the signatures against the customer
/// keys it pinned, and refuses a policy they do not sign.
#[utoipa::path(put, path = "/v1/environments/{environment}/policy", security(("bearer" = [])),
    params(("environment" = String, Path, description = "environment id (env_…)")),
    request_body = RelayPolicy,
    responses((status = 200, body = PolicyView),
        (status = 409, body = ErrorBody, description = "its serial is not greater than the one relayed before")))]
pub(super) async fn relay_policy(
    State(state): State<Arc<AppState>>,
    Authed(scope): Authed,
    ApiPath(environment): ApiPath<String>,
    body: Result<ApiJson<RelayPolicy>, ApiError>,
) -> Result<Json<PolicyView>, ApiError> {
    let result = async {
        let ApiJson(body) = body?;
        let relayed = crate::policy::relay(&state, &scope, parse_id(&environment)?, body.envelope).await?;
        Ok(Json(PolicyView::from_row(&relayed.row, Some(relayed.sent_to))?))
    }
    .await;
    let mut ev = event(scope.principal().actor(), Action::RelayPolicy.audit_action(), Outcome::Success);
    ev.target = Some(environment);
    refused(&state, &scope, ev, result).await
}

impl From<RelayPolicyError> for ApiError {
    fn from(e: RelayPolicyError) -> Self {
        match e {
            RelayPolicyError::NoEnvironment(_) => ApiError::not_found(e.to_string()),
            RelayPolicyError::TooLarge | RelayPolicyError::NotAnEnvelope(_) | RelayPolicyError::Shape(_) => {
                ApiError::bad_request(e.to_string())
            }
            RelayPolicyError::NotNewer { .. } => ApiError::conflict(e.to_string()),
            RelayPolicyError::Store(e) => e.into(),
        }
    }
}

/// The customer policy relayed last to the environment; 404 if none was.
#[utoipa::path(get, path = "/v1/environments/{environment}/policy", security(("bearer" = [])),
    params(("environment" = String, Path, description = "environment id (env_…)")),
    responses((status = 200, body = PolicyView)))]
pub(super) async fn get_policy(
    State(state): State<Arc<AppState>>,
    Authed(scope): Authed,
    ApiPath(environment): ApiPath<String>,
) -> Result<Json<PolicyView>, ApiError> {
    let mut ev = event(scope.principal().actor(), Action::GetPolicy.audit_action(), Outcome::Success);
    ev.target = Some(environment.clone());
    let result = async {
        let env_id: EnvironmentId = parse_id(&environment)?;
        let row = state.store.environment_policy(&scope, env_id).await?.ok_or_else(|| {
            ApiError::not_found(format!("no policy was relayed to environment {env_id} in your tenant"))
        })?;
        PolicyView::from_row(&row, None)
    }
    .await;
    audited(&state, &scope, ReadAudit::Access, ev, result).await.map(Json)
}
