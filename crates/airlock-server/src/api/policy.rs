//! `/v1/environments/{environment}/policy`: relay the customer's signed policy to an
//! environment's appliances, and read back the one relayed last.
//!
//! The control plane cannot make or check a policy's signatures (it holds no customer key);
//! see [`crate::policy`] for what it does check.

use std::sync::Arc;

use airlock_core::audit::Outcome;
use airlock_core::dsse::Envelope;
use airlock_core::{EnvironmentId, Timestamp};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{ApiError, ApiJson, Authed, ErrorBody, audited, authorize, parse_id};
use crate::authz::Action;
use crate::policy::{MAX_POLICY_ENVELOPE_BYTES, check_shape};
use crate::state::{AppState, event};
use crate::store::{PolicyRow, PutPolicy, StoreError};

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RelayPolicy {
    /// The customer's signed policy: a DSSE envelope as a JSON object (what
    /// `airlock customer policy sign` writes).
    #[schema(value_type = Object)]
    pub envelope: serde_json::Value,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct PolicyView {
    pub environment: String,
    pub serial: u64,
    /// SHA-256 of the signed policy TOML (the digest the appliance reports in its status).
    pub policy_sha256: String,
    /// The envelope as relayed, unchanged.
    #[schema(value_type = Object)]
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
    responses((status = 200, body = PolicyView), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(super) async fn relay_policy(
    State(state): State<Arc<AppState>>,
    Authed(scope): Authed,
    Path(environment): Path<String>,
    body: Result<ApiJson<RelayPolicy>, ApiError>,
) -> Result<Json<PolicyView>, ApiError> {
    authorize(&state, &scope, Action::RelayPolicy, Some(environment.clone())).await?;
    let mut ev = event(scope.principal().actor(), Action::RelayPolicy.audit_action(), Outcome::Success);
    ev.target = Some(environment.clone());
    let checked = async {
        let ApiJson(body) = body?;
        let env_id: EnvironmentId = parse_id(&environment)?;
        state
            .store
            .get_environment(&scope, env_id)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("no environment {env_id} in your tenant")))?;
        if body.envelope.to_string().len() > MAX_POLICY_ENVELOPE_BYTES {
            return Err(ApiError::bad_request(format!(
                "the envelope is larger than {MAX_POLICY_ENVELOPE_BYTES} bytes; it is not a policy"
            )));
        }
        let envelope: Envelope = serde_json::from_value(body.envelope)
            .map_err(|e| ApiError::bad_request(format!("the envelope is not a DSSE envelope: {e}")))?;
        let checked = check_shape(&envelope, env_id).map_err(ApiError::bad_request)?;
        Ok((env_id, envelope, checked))
    }
    .await;
    let (env_id, envelope, checked) = match checked {
        Ok(v) => v,
        Err(e) => return audited(&state, &scope, ev, Err(e)).await,
    };
    let now = state.now();
    let row = PolicyRow {
        environment_id: env_id,
        serial: checked.serial,
        policy_sha256: checked.policy_sha256.clone(),
        envelope: envelope.to_json(),
        relayed_by: scope.principal().actor(),
        relayed_at: now,
    };
    // Before the commit, so no stream connecting after it can miss the policy.
    state.push.index().policy_relayed(env_id);
    let mut tx = state.store.write().await?;
    match tx.put_policy(&scope, &row).await? {
        PutPolicy::Stored => {}
        PutPolicy::NoEnvironment => {
            drop(tx);
            let e = ApiError::not_found(format!("no environment {env_id} in your tenant"));
            return audited(&state, &scope, ev, Err(e)).await;
        }
        PutPolicy::NotNewer { stored } => {
            drop(tx);
            let e = ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                format!(
                    "environment {env_id} already has policy serial {stored}; a relayed policy's serial must be greater (appliances refuse a rollback too)"
                ),
            );
            return audited(&state, &scope, ev, Err(e)).await;
        }
    }
    ev.detail = serde_json::json!({
        "serial": checked.serial,
        "policy_sha256": checked.policy_sha256,
        "signatures": checked.signatures,
    });
    tx.audit(&scope.chain(), now, ev).await?;
    tx.commit().await?;
    let sent = state.push.policy(&scope, &row).await;
    tracing::info!(environment = %env_id, serial = checked.serial, sent, "customer policy relayed");
    Ok(Json(PolicyView::from_row(&row, Some(sent))?))
}

/// The customer policy relayed last to the environment; 404 if none was.
#[utoipa::path(get, path = "/v1/environments/{environment}/policy", security(("bearer" = [])),
    params(("environment" = String, Path, description = "environment id (env_…)")),
    responses((status = 200, body = PolicyView), (status = 404, body = ErrorBody)))]
pub(super) async fn get_policy(
    State(state): State<Arc<AppState>>,
    Authed(scope): Authed,
    Path(environment): Path<String>,
) -> Result<Json<PolicyView>, ApiError> {
    authorize(&state, &scope, Action::GetPolicy, Some(environment.clone())).await?;
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
    audited(&state, &scope, ev, result).await.map(Json)
}
