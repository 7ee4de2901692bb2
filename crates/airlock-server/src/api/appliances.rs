//! Appliances under `/v1`: join (a single-use token, or a platform identity answering a challenge),
//! the join rules of an environment, list with live status, revoke.

use std::sync::Arc;

use airlock_core::audit::AuditAction;
use airlock_core::audit::Outcome;
use airlock_core::{ApplianceId, EnvironmentId, WorkspaceId};
use airlock_proto::join::{JoinChallenge, JoinChallengeRequest, JoinRequest, JoinResponse, JoinTarget};
use axum::Json;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{ApiError, ApiJson, ApiPath, Authed, ErrorBody, ReadAudit, audited, parse_id, refused};
use crate::appliances::{self, JoinError, JoinRefusal, RevokeError};
use crate::authz::Action;
use crate::platform_join::rules::{AwsRule, GcpRule, JoinRule, K8sRule, RuleError, RuleSpec};
use crate::platform_join::{self, RuleAdminError};
use crate::state::{AppState, SYSTEM_CHAIN, event, random};
use crate::store::StoreError;

/// Exchange a proof of identity (a single-use join token, or a platform proof answering a
/// challenge: a signed `sts:GetCallerIdentity` request, a GCP identity token, a Kubernetes
/// service-account token) and a CSR for an appliance certificate.
#[utoipa::path(post, path = "/v1/join", request_body = airlock_proto::join::JoinRequestWire,
    responses((status = 200, body = JoinResponse),
        (status = 400, body = ErrorBody, description = "the CSR is refused"),
        (status = 401, body = ErrorBody, description = "the join token or platform proof is refused (unknown, spent, expired, forged, replayed)"),
        (status = 403, body = ErrorBody, description = "the platform identity is proved but no environment, or more than one, accepts it; or the identity to recover is refused"),
        (status = 503, body = ErrorBody, description = "the store or the platform (AWS STS, a token issuer) is unavailable; retry later")))]
pub(super) async fn join(
    State(state): State<Arc<AppState>>,
    ApiJson(req): ApiJson<JoinRequest>,
) -> Result<Json<JoinResponse>, ApiError> {
    let joined = appliances::join(&state, &req).await?;
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

/// A short-lived, single-use challenge for one platform-identity join: its proof must carry
/// it. Anyone may ask; each source address holds a few at once, and everyone a bounded number.
/// The body names the tenant or environment the join will name (one of them at least); the
/// challenge answers a join naming exactly those.
#[utoipa::path(post, path = "/v1/join/challenge", request_body = JoinChallengeRequest,
    responses((status = 200, body = JoinChallenge),
        (status = 400, body = ErrorBody, description = "the body is not a JoinChallengeRequest, or names neither a tenant nor an environment")))]
pub(super) async fn join_challenge(
    State(state): State<Arc<AppState>>,
    body: axum::body::Bytes,
) -> Result<Json<JoinChallenge>, ApiError> {
    // An appliance that predates targets sends no body: read as naming nothing, and refused below with the reason.
    let target = if body.is_empty() {
        JoinTarget::default()
    } else {
        serde_json::from_slice::<JoinChallengeRequest>(&body)
            .map_err(|e| ApiError::bad_request(format!("the challenge request is malformed: {e}")))?
            .target()
            .map_err(ApiError::bad_request)?
    };
    // A join that names no target is refused, so a challenge for one would only fill the table: refused here already,
    // with the reason the join would give (an appliance that predates targets sends no body, and learns why).
    if !target.is_pinned() {
        let refusal = platform_join::PlatformRefusal::Unpinned;
        let mut ev = event("anonymous", AuditAction::ApplianceJoin, Outcome::Denied);
        ev.detail = serde_json::json!({ "reason": refusal.reason(), "code": refusal.code() });
        // Its own limit: free to send in bulk, these must not crowd out other join refusals.
        state.audit_refusal_keyed(SYSTEM_CHAIN, "appliance.join:challenge_unpinned", ev).await;
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "join_target_required", refusal.reason()));
    }
    // Issuing keeps nothing (`platform_join::challenges`): there is no table to fill, so nothing to refuse.
    let c = state.platform.challenges.issue(state.now(), random(), target);
    Ok(Json(JoinChallenge {
        challenge: c.nonce,
        server_id: state.ca.fingerprint().to_string(),
        expires_at: c.expires_at.to_string(),
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
    /// How it joined: `join_token`, `aws_sts`, `gcp_identity` or `k8s_token`.
    pub join_method: String,
    /// The platform identity its join rule matched: for AWS the role or user ARN, for GCP
    /// `projects/P/serviceAccounts/EMAIL`, for Kubernetes `ISSUER#system:serviceaccount:NS:NAME`.
    pub join_identity: Option<String>,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct ApplianceList {
    pub appliances: Vec<ApplianceView>,
}

#[derive(Deserialize)]
pub struct ApplianceQuery {
    environment: Option<String>,
    /// Read by the gate too (`access::ListingQuery`): the list is decided on this workspace.
    workspace: Option<String>,
}

/// List appliances, with live status merged from the gateway: the tenant's, or one workspace's. A principal holding
/// roles only in workspaces (a workspace token) names one of its own.
#[utoipa::path(get, path = "/v1/appliances", security(("bearer" = [])),
    params(("environment" = Option<String>, Query, description = "only this environment (env_…)"),
        ("workspace" = Option<String>, Query, description = "only this workspace (wsp_…); required of a principal whose roles are all in workspaces")),
    responses((status = 200, body = ApplianceList),
        (status = 403, body = ErrorBody, description = "no role here grants it; `workspace_required`: name a workspace of yours"),
        (status = 404, body = ErrorBody, description = "no such workspace in your tenant")))]
pub(super) async fn list_appliances(
    State(state): State<Arc<AppState>>,
    Authed(scope): Authed,
    query: Result<Query<ApplianceQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<ApplianceList>, ApiError> {
    let result = async {
        let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
        let env = q.environment.as_deref().map(parse_id::<EnvironmentId>).transpose()?;
        let ws = q.workspace.as_deref().map(parse_id::<WorkspaceId>).transpose()?;
        if let Some(ws) = ws
            && !state.store.workspace_exists(&scope, ws).await?
        {
            return Err(ApiError::not_found(format!("no workspace {ws} in your tenant")));
        }
        let rows = state.store.list_appliances_in(&scope, env, ws).await?;
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
                    join_method: r.join_method.clone(),
                    join_identity: r.join_identity.clone(),
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

/// Revoke an appliance: its live stream closes at once and its certificates are refused. An appliance is a resource of
/// its environment's workspace: a workspace's admin revokes its appliances, and another workspace's is not found.
#[utoipa::path(post, path = "/v1/appliances/{appliance}/revoke", security(("bearer" = [])),
    params(("appliance" = String, Path, description = "appliance id (apl_…)")),
    responses((status = 200, body = RevokedView),
        (status = 404, body = ErrorBody, description = "no such appliance in your tenant (or your workspace)")))]
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
        (status = 404, body = ErrorBody, description = "no such appliance in your tenant (or your workspace), or it has not reported yet")))]
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
            JoinError::Refused { refusal: JoinRefusal::Proof, reason } => ApiError::unauthorized(reason),
            JoinError::Refused { refusal: JoinRefusal::NoEnvironment, reason } => ApiError::forbidden(reason),
            JoinError::Refused { refusal: JoinRefusal::Recovery, reason } => ApiError::forbidden(reason),
            JoinError::Refused { refusal: JoinRefusal::PlatformUnavailable, reason } => ApiError::unavailable(reason),
            JoinError::Refused { refusal: JoinRefusal::Unpinned, reason } => {
                ApiError::new(StatusCode::BAD_REQUEST, "join_target_required", reason)
            }
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

/// A join rule to add: one method's fields (exactly one of `aws`, `gcp`, `k8s`).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddJoinRule {
    #[serde(default)]
    pub aws: Option<AwsRuleView>,
    #[serde(default)]
    pub gcp: Option<GcpRuleView>,
    #[serde(default)]
    pub k8s: Option<K8sRuleView>,
}

impl AddJoinRule {
    fn spec(&self) -> Result<RuleSpec, RuleError> {
        match (&self.aws, &self.gcp, &self.k8s) {
            (Some(aws), None, None) => Ok(RuleSpec::Aws(AwsRule::new(&aws.account, aws.arn_pattern.as_deref())?)),
            (None, Some(gcp), None) => Ok(RuleSpec::Gcp(GcpRule::new(&gcp.project, &gcp.service_account)?)),
            (None, None, Some(k8s)) => Ok(RuleSpec::K8s(
                K8sRule::new(&k8s.issuer, &k8s.service_account)?.requiring_token_request(k8s.require_token_request),
            )),
            _ => Err(RuleError::Method),
        }
    }
}

/// A GCP rule: instances of this project running as this service account join (both exact).
#[derive(Serialize, Deserialize, ToSchema, Clone)]
#[serde(deny_unknown_fields)]
pub struct GcpRuleView {
    /// The project id, e.g. `my-project`.
    pub project: String,
    /// The service account's email, e.g. `airlock@my-project.iam.gserviceaccount.com`; no wildcard.
    pub service_account: String,
}

/// A Kubernetes rule: pods of this cluster (its service-account issuer) running as this
/// service account join.
#[derive(Serialize, Deserialize, ToSchema, Clone)]
#[serde(deny_unknown_fields)]
pub struct K8sRuleView {
    /// The cluster's service-account issuer (`--service-account-issuer`), an https:// URL
    /// whose OpenID discovery the control plane can read.
    pub issuer: String,
    /// `NAMESPACE/NAME`.
    pub service_account: String,
    /// Accept only tokens from the TokenRequest API, whose audience binds the join's challenge:
    /// a mounted token (fixed audience, single use by its `jti`) is refused as
    /// `rule_requires_token_request`, at a join and at a renewal. Default false.
    #[serde(default)]
    pub require_token_request: bool,
}

/// An AWS rule: the account, and optionally an ARN pattern (`*` matches any run of characters)
/// the caller's ARN must match, an assumed role's session read as its role
/// (`arn:aws:iam::ACCOUNT:role/NAME`). Without a pattern, any principal of the account joins.
#[derive(Serialize, Deserialize, ToSchema, Clone)]
#[serde(deny_unknown_fields)]
pub struct AwsRuleView {
    /// 12 digits.
    pub account: String,
    pub arn_pattern: Option<String>,
}

#[derive(Serialize, Deserialize, ToSchema, Clone)]
pub struct JoinRuleView {
    pub id: String,
    pub environment_id: String,
    /// `aws`, `gcp` or `k8s`: the one of the fields below that is present.
    pub method: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws: Option<AwsRuleView>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gcp: Option<GcpRuleView>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k8s: Option<K8sRuleView>,
    pub created_at: String,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct JoinRuleList {
    pub rules: Vec<JoinRuleView>,
}

fn rule_view(r: &JoinRule) -> JoinRuleView {
    let mut view = JoinRuleView {
        id: r.id.to_string(),
        environment_id: r.environment.to_string(),
        method: r.spec.method().to_owned(),
        aws: None,
        gcp: None,
        k8s: None,
        created_at: r.created_at.to_string(),
    };
    match &r.spec {
        RuleSpec::Aws(aws) => {
            view.aws = Some(AwsRuleView {
                account: aws.account().to_owned(),
                arn_pattern: aws.arn_pattern().map(str::to_owned),
            });
        }
        RuleSpec::Gcp(gcp) => {
            view.gcp = Some(GcpRuleView {
                project: gcp.project().to_owned(),
                service_account: gcp.service_account().to_owned(),
            });
        }
        RuleSpec::K8s(k8s) => {
            view.k8s = Some(K8sRuleView {
                issuer: k8s.issuer().to_owned(),
                service_account: format!("{}/{}", k8s.namespace(), k8s.service_account()),
                require_token_request: k8s.requires_token_request(),
            });
        }
    }
    view
}

/// Add a rule that lets a platform identity (an AWS account and role, a GCP project and
/// service account, a Kubernetes cluster's service account) join this environment.
/// An identity that the rules of more than one environment accept joins none.
#[utoipa::path(post, path = "/v1/environments/{environment}/join-rules", security(("bearer" = [])),
    params(("environment" = String, Path, description = "environment id (env_…)")),
    request_body = AddJoinRule,
    responses((status = 201, body = JoinRuleView),
        (status = 422, body = ErrorBody, description = "the environment holds as many join rules as it may")))]
pub(super) async fn add_join_rule(
    State(state): State<Arc<AppState>>,
    Authed(scope): Authed,
    ApiPath(environment): ApiPath<String>,
    body: Result<ApiJson<AddJoinRule>, ApiError>,
) -> Result<(StatusCode, Json<JoinRuleView>), ApiError> {
    let result = async {
        let ApiJson(body) = body?;
        let spec = body.spec().map_err(RuleAdminError::from)?;
        let rule = platform_join::add_rule(&state, &scope, parse_id(&environment)?, spec).await?;
        Ok((StatusCode::CREATED, Json(rule_view(&rule))))
    }
    .await;
    let mut ev = event(scope.principal().actor(), Action::AddJoinRule.audit_action(), Outcome::Success);
    ev.target = Some(environment);
    refused(&state, &scope, ev, result).await
}

/// The join rules of an environment.
#[utoipa::path(get, path = "/v1/environments/{environment}/join-rules", security(("bearer" = [])),
    params(("environment" = String, Path, description = "environment id (env_…)")),
    responses((status = 200, body = JoinRuleList)))]
pub(super) async fn list_join_rules(
    State(state): State<Arc<AppState>>,
    Authed(scope): Authed,
    ApiPath(environment): ApiPath<String>,
) -> Result<Json<JoinRuleList>, ApiError> {
    let result = async {
        let rules = platform_join::list_rules(&state, &scope, parse_id(&environment)?).await?;
        Ok(JoinRuleList { rules: rules.iter().map(rule_view).collect() })
    }
    .await;
    let mut ev = event(scope.principal().actor(), Action::ListJoinRules.audit_action(), Outcome::Success);
    ev.target = Some(environment);
    audited(&state, &scope, ReadAudit::Access, ev, result).await.map(Json)
}

/// What removing a join rule did.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct RemovedJoinRule {
    pub id: String,
    /// Always true.
    pub removed: bool,
}

/// Remove a join rule: no new appliance joins by it, and appliances it let join cannot renew
/// unless another rule of their environment still accepts them.
#[utoipa::path(delete, path = "/v1/environments/{environment}/join-rules/{rule}", security(("bearer" = [])),
    params(("environment" = String, Path, description = "environment id (env_…)"),
        ("rule" = String, Path, description = "join rule id (jrl_…)")),
    responses((status = 200, body = RemovedJoinRule)))]
pub(super) async fn remove_join_rule(
    State(state): State<Arc<AppState>>,
    Authed(scope): Authed,
    ApiPath((environment, rule)): ApiPath<(String, String)>,
) -> Result<Json<RemovedJoinRule>, ApiError> {
    let result = async {
        let id = parse_id(&rule)?;
        platform_join::remove_rule(&state, &scope, parse_id(&environment)?, id).await?;
        Ok(Json(RemovedJoinRule { id: rule.clone(), removed: true }))
    }
    .await;
    let mut ev = event(scope.principal().actor(), Action::RemoveJoinRule.audit_action(), Outcome::Success);
    ev.target = Some(environment);
    refused(&state, &scope, ev, result).await
}

impl From<RuleAdminError> for ApiError {
    fn from(e: RuleAdminError) -> Self {
        match e {
            RuleAdminError::Invalid(_) => ApiError::bad_request(e.to_string()),
            RuleAdminError::TooMany(_) => ApiError::limit_exceeded(e.to_string()),
            RuleAdminError::NoEnvironment(_) | RuleAdminError::NoRule(..) => ApiError::not_found(e.to_string()),
            RuleAdminError::Store(e) => e.into(),
        }
    }
}
