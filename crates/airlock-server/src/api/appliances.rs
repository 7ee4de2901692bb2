//! Appliances under `/v1`: join with a single-use token, list with live status, revoke.

use std::sync::Arc;

use airlock_core::audit::{AuditAction, Outcome};
use airlock_core::token::{Secret, TokenKind};
use airlock_core::{ApplianceId, ApplianceIdentity, EnvironmentId};
use airlock_proto::join::{JoinRequest, JoinResponse};
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{ApiError, ApiJson, Authed, ErrorBody, audited, authorize, parse_id};
use crate::authz::{Action, TenantScope};
use crate::state::{AppState, SYSTEM_CHAIN, event, random};
use crate::store::RedeemRefusal;

/// Exchange a single-use join token and a CSR for an appliance certificate.
#[utoipa::path(post, path = "/v1/join", request_body = JoinRequest,
    responses((status = 200, body = JoinResponse), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
pub(super) async fn join(
    State(state): State<Arc<AppState>>,
    ApiJson(req): ApiJson<JoinRequest>,
) -> Result<Json<JoinResponse>, ApiError> {
    let now = state.now();
    let refuse = |chain: String, why: String, status: StatusCode| {
        let state = state.clone();
        async move {
            let mut ev = event("anonymous", AuditAction::ApplianceJoin, Outcome::Denied);
            ev.detail = serde_json::json!({ "reason": why });
            state.audit_refusal(&chain, ev).await;
            ApiError::new(
                status,
                if status == StatusCode::BAD_REQUEST { "bad_request" } else { "unauthenticated" },
                why,
            )
        }
    };
    let secret = match Secret::parse(TokenKind::Join, &req.join_token) {
        Ok(s) => s,
        Err(e) => return Err(refuse(SYSTEM_CHAIN.into(), e.to_string(), StatusCode::UNAUTHORIZED).await),
    };
    // An unknown token is refused without taking the write lock, so guessing costs nothing
    // but a read.
    if !state.store.join_token_known(&secret.hash()).await? {
        return Err(refuse(SYSTEM_CHAIN.into(), "unknown join token".into(), StatusCode::UNAUTHORIZED).await);
    }
    // The CSR's self-signature proves possession of its key; checked before anything is spent.
    let join_key = match crate::ca::csr_public_key(&req.csr_pem) {
        Ok(k) => k,
        Err(e) => return Err(refuse(SYSTEM_CHAIN.into(), format!("CSR refused: {e}"), StatusCode::BAD_REQUEST).await),
    };
    let fresh = ApplianceId::from_random(random());
    let mut tx = state.store.write().await?;
    let redeemed = tx.redeem_join_token(&secret.hash(), fresh, now).await?;
    // The same appliance asking again with the same key, while the token would still be
    // valid, is a join whose response was lost: answer it again instead of stranding it.
    let retry = match &redeemed {
        Err(RedeemRefusal::AlreadyUsed { tenant, by: Some(by), expires_at }) if now < *expires_at => {
            tx.join_retry_environment(*tenant, *by, &join_key).await?.map(|env| (*tenant, env, *by))
        }
        _ => None,
    };
    let trust_domain = state.ca.trust_domain().to_owned();
    let (identity, token, retried) = match (redeemed, retry) {
        (Ok(r), _) => {
            let identity =
                ApplianceIdentity { trust_domain, tenant: r.tenant, environment: r.environment, appliance: fresh };
            (identity, Some(r.token), false)
        }
        (Err(_), Some((tenant, environment, appliance))) => {
            (ApplianceIdentity { trust_domain, tenant, environment, appliance }, None, true)
        }
        (Err(refusal), None) => {
            drop(tx);
            let (chain, why) = match refusal {
                RedeemRefusal::Unknown => (SYSTEM_CHAIN.to_owned(), "unknown join token".to_owned()),
                RedeemRefusal::AlreadyUsed { tenant, .. } => (
                    tenant.to_string(),
                    "join token was already used; issue a new one with `airlock env join-token`".to_owned(),
                ),
                RedeemRefusal::Expired { tenant, expired_at } => (
                    tenant.to_string(),
                    format!("join token expired at {expired_at}; issue a new one with `airlock env join-token`"),
                ),
            };
            return Err(refuse(chain, why, StatusCode::UNAUTHORIZED).await);
        }
    };
    let appliance = identity.appliance;
    let issued = match state.ca.sign_join_csr(&req.csr_pem, &identity, now, state.appliance_cert_lifetime) {
        Ok(i) => i,
        Err(e) => {
            // Rolling back leaves the token unspent: a bad CSR should not burn it.
            drop(tx);
            return Err(refuse(identity.tenant.to_string(), format!("CSR refused: {e}"), StatusCode::BAD_REQUEST).await);
        }
    };
    let version: String = req.version.chars().filter(|c| !c.is_control()).take(64).collect();
    if retried {
        tx.record_renewal(&TenantScope::for_appliance(&identity), appliance, &issued.serial, issued.not_after).await?;
    } else {
        tx.insert_appliance(&identity, &version, (&issued.serial, issued.not_after), &join_key, now).await?;
    }
    let mut ev = event(format!("appliance:{appliance}"), AuditAction::ApplianceJoin, Outcome::Success);
    ev.target = Some(appliance.to_string());
    ev.detail = serde_json::json!({
        "environment": identity.environment.to_string(),
        "join_token": token.map(|t| t.to_string()),
        "retry_of_lost_response": retried,
        "serial": issued.serial,
        "not_after": issued.not_after.to_string(),
    });
    tx.audit(&identity.tenant.to_string(), now, ev).await?;
    tx.commit().await?;
    state.metrics.joins.inc();
    tracing::info!(%appliance, environment = %identity.environment, retried, "appliance joined");
    Ok(Json(JoinResponse {
        appliance_id: appliance.to_string(),
        identity: identity.uri(),
        certificate_pem: issued.pem,
        ca_certificate_pem: state.ca.cert_pem().to_owned(),
        gateway_endpoint: state.gateway_endpoint.clone(),
        gateway_server_name: state.gateway_server_name.clone(),
        not_after: issued.not_after.to_string(),
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
    authorize(&state, &scope, Action::ListAppliances, None).await?;
    let result = async {
        let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
        let env = q.environment.as_deref().map(parse_id::<EnvironmentId>).transpose()?;
        let rows = state.store.list_appliances(&scope, env).await?;
        let appliances = rows
            .into_iter()
            .map(|r| {
                let live = state.registry.status(&r.id);
                ApplianceView {
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
                }
            })
            .collect();
        Ok(ApplianceList { appliances })
    }
    .await;
    let ev = event(scope.principal().actor(), Action::ListAppliances.audit_action(), Outcome::Success);
    audited(&state, &scope, ev, result).await.map(Json)
}

/// Revoke an appliance: its live stream closes at once and its certificates are refused.
#[utoipa::path(post, path = "/v1/appliances/{appliance}/revoke", security(("bearer" = [])),
    params(("appliance" = String, Path, description = "appliance id (apl_…)")),
    responses((status = 200, body = ApplianceView), (status = 404, body = ErrorBody)))]
pub(super) async fn revoke_appliance(
    State(state): State<Arc<AppState>>,
    Authed(scope): Authed,
    Path(appliance): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    authorize(&state, &scope, Action::RevokeAppliance, Some(appliance.clone())).await?;
    let mut ev = event(scope.principal().actor(), Action::RevokeAppliance.audit_action(), Outcome::Success);
    ev.target = Some(appliance.clone());
    let id: ApplianceId = match parse_id(&appliance) {
        Ok(id) => id,
        Err(e) => return audited(&state, &scope, ev, Err(e)).await,
    };
    let now = state.now();
    let mut tx = state.store.write().await?;
    if !tx.revoke_appliance(&scope, id, now).await? {
        drop(tx);
        return audited(&state, &scope, ev, Err(ApiError::not_found(format!("no appliance {id} in your tenant"))))
            .await;
    }
    // Refuse new handshakes and streams from before the commit returns (so no window opens
    // between commit and enforcement), but end the live stream only once the revocation is
    // durably recorded: a revocation that fails to commit must not have taken effect.
    state.revoked.insert(id);
    let was_connected = state.registry.status(&id).is_some();
    ev.detail = serde_json::json!({ "was_connected": was_connected });
    let committed = async {
        tx.audit(&scope.chain(), now, ev).await?;
        tx.commit().await
    }
    .await;
    if let Err(e) = committed {
        state.revoked.remove(&id);
        return Err(e.into());
    }
    state.registry.kick(id, crate::registry::Kick::Revoked);
    tracing::info!(appliance = %id, was_connected, "appliance revoked");
    Ok(Json(serde_json::json!({ "id": id.to_string(), "revoked": true, "was_connected": was_connected })))
}
