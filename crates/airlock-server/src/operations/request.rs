//! Requesting an operation: render the current template version, sign the request with the operations key, store it with its audit record, and push it to the appliance.
//!
//! The request is signed by the operations key ([`crate::signer`]) and stored with that key's certificate, so its manifest verifies after a restart.

use std::collections::BTreeMap;

use airlock_core::audit::{AuditAction, Outcome};
use airlock_core::grant::OperationRequest;
use airlock_core::operation::{OperationState, RequestStatement};
use airlock_core::template::TemplateError;
use airlock_core::{ApplianceId, EnvironmentId, OperationId, WorkspaceId};

use airlock_core::deploy;

use crate::authz::TenantScope;
use crate::push::Work;
use crate::releases::{DeployableError, ReleaseSelector};
use crate::state::{AppState, event, random};
use crate::store::{ApplianceRow, Environment, OperationRow, StoreError};

/// Longest reason an operator may give for a request.
const MAX_REASON_CHARS: usize = 1000;

/// What an operator asks for.
#[derive(Clone, Debug)]
pub struct NewOperation {
    pub environment: EnvironmentId,
    pub what: Requested,
    /// Why, shown to the customer and signed into the request.
    pub reason: String,
    /// Defaults to the environment's only active appliance.
    pub appliance: Option<ApplianceId>,
    /// The operation's id, chosen by a caller that records it before asking (a rollout, so a
    /// request made twice after a restart is one operation); a fresh one by default.
    pub id: Option<OperationId>,
}

/// What an operation runs: a template's current version, or the deploy of a signed release.
#[derive(Clone, Debug)]
pub enum Requested {
    /// Template name (its current version is rendered) and its variables.
    Template { name: String, vars: BTreeMap<String, String> },
    /// The release a deploy installs (core's `deploy`): a Deploy-phase request whose arguments
    /// bind the release digest.
    Deploy(ReleaseSelector),
    /// A task of a release (e.g. `migrate`): an Operate-phase request whose arguments bind the
    /// release digest and name the task; the appliance runs it only in the release running there.
    Task { release: ReleaseSelector, task: String },
}

/// Why a request was not made.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("reason must be 1–{MAX_REASON_CHARS} characters without control characters; the customer reads it")]
    Reason,
    #[error("no environment {0} in your tenant")]
    NoEnvironment(EnvironmentId),
    #[error("appliance {appliance} is not an active appliance of environment {environment}")]
    NotActive { appliance: ApplianceId, environment: EnvironmentId },
    #[error("environment {0} has no active appliance; join one first")]
    NoAppliance(EnvironmentId),
    #[error("environment {0} has several appliances; name one with `appliance`")]
    SeveralAppliances(EnvironmentId),
    #[error("no template `{name}` in workspace {workspace}; push it with `airlock template push`")]
    NoTemplate { name: String, workspace: WorkspaceId },
    /// The variables do not fit the template, or the template is over a limit.
    #[error("{0}")]
    Render(TemplateError),
    #[error(transparent)]
    Release(DeployableError),
    #[error("release {release} has no task `{task}`")]
    NoTask { task: String, release: String },
    #[error("the control plane could not sign the request; retry later")]
    Sign,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Requests an operation: checks it, signs it, stores it with its audit record (noted in the
/// push index around the commit), and pushes it to the appliance if it is connected.
pub async fn request(state: &AppState, scope: &TenantScope, new: NewOperation) -> Result<OperationRow, RequestError> {
    let reason = new.reason.trim().to_owned();
    if reason.is_empty() || reason.chars().count() > MAX_REASON_CHARS || reason.chars().any(char::is_control) {
        return Err(RequestError::Reason);
    }
    let env = state
        .store
        .get_environment(scope, new.environment)
        .await?
        .ok_or(RequestError::NoEnvironment(new.environment))?;
    // What runs first: a missing template or a release that no longer verifies is the
    // clearer answer, whatever the environment's appliances.
    let prepared = match new.what {
        Requested::Template { name, vars } => prepare_template(state, scope, &env, name, vars).await?,
        Requested::Deploy(selector) => prepare_deploy(state, scope, &env, &selector).await?,
        Requested::Task { release, task } => prepare_task(state, scope, &env, &release, &task).await?,
    };
    let chosen = choose_appliance(state, scope, &env, new.appliance).await?;
    let appliance = chosen.id;
    // The host the customer's approval will name: the key its stored attestation names.
    let execution_key = chosen
        .execution_key_attestation
        .as_deref()
        .map(|json| crate::attestation::stored_key_id(&appliance.to_string(), json))
        .transpose()?;
    let command = prepared.command;

    let now = state.now();
    let id = new.id.unwrap_or_else(|| OperationId::from_random(random()));
    let request = OperationRequest {
        id,
        appliance,
        kind: prepared.kind.clone(),
        phase: prepared.phase,
        data_tags: prepared.data_tags,
        args: prepared.args,
        command_sha256: command.sha256(),
        environment: Some(env.id),
        execution_key,
    };
    let statement = RequestStatement {
        request: request.clone(),
        command,
        reason: reason.clone(),
        requested_by: scope.principal().actor(),
        requested_at: now,
        tenant: scope.tenant(),
        environment: env.id,
    };
    let envelope = state.ops_signer.sign_request(&statement).map_err(|e| {
        tracing::error!(error = %e, "cannot sign an operation request");
        RequestError::Sign
    })?;
    let row = OperationRow {
        id,
        workspace_id: env.workspace_id,
        environment_id: env.id,
        appliance_id: appliance,
        template_name: prepared.kind,
        template_sha256: prepared.template_sha256,
        state: OperationState::AwaitingApproval,
        requested_by: statement.requested_by.clone(),
        requested_at: now,
        updated_at: now,
        request_digest: request.digest_hex(),
        command_sha256: request.command_sha256.clone(),
        request_envelope: envelope.to_json(),
        control_plane_cert_pem: state.ops_signer.cert_pem().to_owned(),
        approval_envelope: None,
        pre_approval_envelope: None,
        execution_envelope: None,
        appliance_cert_pem: None,
        appliance_attestation: None,
        release_envelope: None,
        exit_code: None,
        output_sha256: None,
        output_size: None,
        refusal_code: None,
        deny_code: None,
        refusal_reason: None,
        result_at: None,
        output_stored: false,
        output_salt_sealed: None,
    };
    let action = if deploy::is_deploy(&request) {
        AuditAction::DeploymentRequest
    } else if deploy::is_task(&request) {
        AuditAction::ReleaseTaskRequest
    } else {
        AuditAction::OperationRequest
    };
    let mut ev = event(scope.principal().actor(), action, Outcome::Success);
    ev.target = Some(id.to_string());
    ev.workspace = Some(env.workspace_id.to_string());
    ev.detail = serde_json::json!({
        "environment": env.id.to_string(),
        "appliance": appliance.to_string(),
        "template": row.template_name,
        "template_sha256": row.template_sha256,
        "phase": request.phase,
        "data_tags": request.data_tags,
        "command_sha256": row.command_sha256,
        "request_digest": row.request_digest,
        "reason": reason,
        "args": request.args,
    });
    state
        .push
        .noting(Work::Operation(appliance), async {
            let mut tx = state.store.write().await?;
            if !tx.insert_operation(scope, &row).await? {
                return Err(RequestError::NotActive { appliance, environment: env.id });
            }
            tx.audit(&scope.chain(), now, ev).await?;
            Ok(tx.commit().await?)
        })
        .await?;
    tracing::info!(operation = %id, %appliance, template = %row.template_name, "operation requested");
    state.push.operations(scope, appliance, Some(id)).await;
    Ok(row)
}

/// A request's command and what the customer's authority judges it by.
struct Prepared {
    kind: String,
    phase: airlock_core::policy::Phase,
    data_tags: std::collections::BTreeSet<String>,
    args: BTreeMap<String, String>,
    command: airlock_core::template::RenderedCommand,
    /// The template's content hash (a deploy's fixed marker).
    template_sha256: String,
}

/// The current version of a template, rendered with `vars`.
async fn prepare_template(
    state: &AppState,
    scope: &TenantScope,
    env: &Environment,
    name: String,
    vars: BTreeMap<String, String>,
) -> Result<Prepared, RequestError> {
    let template = state.store.current_template(scope, env.workspace_id, &name).await?.ok_or_else(|| {
        RequestError::NoTemplate { name: name.chars().take(64).collect(), workspace: env.workspace_id }
    })?;
    // Stored templates passed the limits when pushed; one stored before a limit existed is
    // refused as over it (the caller's to fix), anything else is corruption.
    let template = match state.templates.load(&template.manifest_toml, &template.script).await {
        Ok(t) => t,
        Err(super::CompileError::Template(e @ TemplateError::Limit(_))) => return Err(RequestError::Render(e)),
        Err(e) => return Err(StoreError::Corrupt(format!("template {}: {e}", template.name)).into()),
    };
    let command = template.render(&vars).map_err(RequestError::Render)?;
    let m = template.manifest();
    Ok(Prepared {
        kind: m.name.clone(),
        phase: m.phase,
        data_tags: m.data_tags.clone(),
        args: vars,
        command,
        template_sha256: template.content_sha256().to_owned(),
    })
}

/// The deploy of a stored release, verified again with the workspace's unrevoked keys.
async fn prepare_deploy(
    state: &AppState,
    scope: &TenantScope,
    env: &Environment,
    selector: &ReleaseSelector,
) -> Result<Prepared, RequestError> {
    let (_, release) =
        crate::releases::deployable(state, scope, env.workspace_id, selector).await.map_err(|e| match e {
            DeployableError::Store(e) => RequestError::Store(e),
            e => RequestError::Release(e),
        })?;
    Ok(Prepared {
        kind: deploy::DEPLOY_KIND.to_owned(),
        phase: airlock_core::policy::Phase::Deploy,
        data_tags: Default::default(),
        args: deploy::DeployArgs::of(&release).to_args(),
        command: deploy::deploy_command(&release),
        template_sha256: deploy::deploy_template_sha256(),
    })
}

/// A task of a stored release, the release verified again with the workspace's unrevoked keys.
async fn prepare_task(
    state: &AppState,
    scope: &TenantScope,
    env: &Environment,
    selector: &ReleaseSelector,
    task: &str,
) -> Result<Prepared, RequestError> {
    let (_, release) =
        crate::releases::deployable(state, scope, env.workspace_id, selector).await.map_err(|e| match e {
            DeployableError::Store(e) => RequestError::Store(e),
            e => RequestError::Release(e),
        })?;
    let command = deploy::task_command(&release, task).map_err(|_| RequestError::NoTask {
        task: task.chars().filter(|c| !c.is_control()).take(64).collect(),
        release: selector.to_string(),
    })?;
    let args = deploy::TaskArgs { release: deploy::DeployArgs::of(&release), task: task.to_owned() };
    Ok(Prepared {
        kind: deploy::TASK_KIND.to_owned(),
        phase: airlock_core::policy::Phase::Operate,
        data_tags: Default::default(),
        args: args.to_args(),
        command,
        template_sha256: deploy::task_template_sha256(),
    })
}

/// The appliance a request goes to: the one named, if it is an active appliance of `env`, or
/// else the environment's only active one.
async fn choose_appliance(
    state: &AppState,
    scope: &TenantScope,
    env: &Environment,
    named: Option<ApplianceId>,
) -> Result<ApplianceRow, RequestError> {
    let mut active: Vec<ApplianceRow> = state
        .store
        .list_appliances(scope, Some(env.id))
        .await?
        .iter()
        .filter(|a| a.revoked_at.is_none())
        .cloned()
        .collect();
    match named {
        Some(id) => active
            .into_iter()
            .find(|a| a.id == id)
            .ok_or(RequestError::NotActive { appliance: id, environment: env.id }),
        None if active.len() == 1 => Ok(active.remove(0)),
        None if active.is_empty() => Err(RequestError::NoAppliance(env.id)),
        None => Err(RequestError::SeveralAppliances(env.id)),
    }
}
