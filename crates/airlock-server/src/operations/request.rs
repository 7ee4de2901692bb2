//! Requesting an operation: render the current template version, sign the request with the operations key, store it with its audit record, and push it to the appliance.
//!
//! One path for one request and for many ([`request_many`], a rollout's round): what is requested is prepared once, every request is signed, and all of them are stored with their audit records in one write transaction before any is pushed. An operation is never stored without its audit record, nor pushed before its commit.
//!
//! The request is signed by the operations key ([`crate::signer`]) and stored with that key's certificate, so its manifest verifies after a restart.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use airlock_core::dsse::Envelope;

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

/// One operation of a batch ([`request_many`]): to `appliance` of `environment`, under `id`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    pub environment: EnvironmentId,
    pub appliance: ApplianceId,
    /// Chosen by the caller, who may have recorded it first (see [`NewOperation::id`]).
    pub id: OperationId,
}

/// Requests an operation: checks it, signs it, stores it with its audit record (noted in the
/// push index around the commit), and pushes it to the appliance if it is connected.
/// The same path as [`request_many`], for one target.
pub async fn request(state: &AppState, scope: &TenantScope, new: NewOperation) -> Result<OperationRow, RequestError> {
    let reason = checked_reason(&new.reason)?;
    let env = state
        .store
        .get_environment(scope, new.environment)
        .await?
        .ok_or(RequestError::NoEnvironment(new.environment))?;
    let appliance = choose_appliance(state, scope, &env, new.appliance).await?;
    let id = new.id.unwrap_or_else(|| OperationId::from_random(random()));
    let target = Target { environment: env.id, appliance, id };
    let mut made = request_many(state, scope, new.what, reason, &[target]).await?;
    made.pop().unwrap_or(Err(RequestError::NotActive { appliance, environment: env.id }))
}

/// Requests the same operation (`what`, `reason`) of many appliances at once: what is
/// requested is prepared (a release verified, a template rendered) once; the requests are
/// signed in parallel off the async workers; every operation is stored with its audit record
/// in ONE write transaction (noted in the push index around it); then each is pushed to its
/// appliance if connected.
///
/// `Err`: nothing was stored (the reason, what is requested, signing or the store failed).
/// `Ok`: one result per target, in order; a target whose environment or appliance is not
/// (or no longer) an active one of the tenant's fails alone.
pub async fn request_many(
    state: &AppState,
    scope: &TenantScope,
    what: Requested,
    reason: String,
    targets: &[Target],
) -> Result<Vec<Result<OperationRow, RequestError>>, RequestError> {
    let reason = checked_reason(&reason)?;
    // Each environment and its active appliances, read once.
    let mut envs: HashMap<EnvironmentId, Option<(Environment, Active)>> = HashMap::new();
    for t in targets {
        if envs.contains_key(&t.environment) {
            continue;
        }
        let found = match state.store.get_environment(scope, t.environment).await? {
            Some(env) => {
                let list = state.store.list_appliances(scope, Some(env.id)).await?;
                let active = targets
                    .iter()
                    .filter(|x| x.environment == env.id)
                    .map(|x| x.appliance)
                    .collect::<std::collections::HashSet<_>>();
                let rows = list
                    .iter()
                    .filter(|a| a.revoked_at.is_none() && active.contains(&a.id))
                    .map(|a| (a.id, a.clone()))
                    .collect();
                Some((env, rows))
            }
            None => None,
        };
        envs.insert(t.environment, found);
    }
    // What is requested, prepared once per workspace (a batch is normally one).
    let mut prepared: HashMap<WorkspaceId, Arc<Prepared>> = HashMap::new();
    for (env, _) in envs.values().flatten() {
        if prepared.contains_key(&env.workspace_id) {
            continue;
        }
        let p = match &what {
            Requested::Template { name, vars } => {
                prepare_template(state, scope, env, name.clone(), vars.clone()).await?
            }
            Requested::Deploy(selector) => prepare_deploy(state, scope, env, selector).await?,
            Requested::Task { release, task } => prepare_task(state, scope, env, release, task).await?,
        };
        prepared.insert(env.workspace_id, Arc::new(p));
    }

    let now = state.now();
    let requested_by = scope.principal().actor();
    let mut out: Vec<Result<OperationRow, RequestError>> = Vec::with_capacity(targets.len());
    let mut statements = Vec::new();
    for t in targets {
        let Some(Some((env, active))) = envs.get(&t.environment) else {
            out.push(Err(RequestError::NoEnvironment(t.environment)));
            continue;
        };
        let Some(chosen) = active.get(&t.appliance) else {
            out.push(Err(RequestError::NotActive { appliance: t.appliance, environment: env.id }));
            continue;
        };
        // The host the customer's approval will name: the key its stored attestation names.
        let execution_key = match chosen
            .execution_key_attestation
            .as_deref()
            .map(|json| crate::attestation::stored_key_id(&t.appliance.to_string(), json))
            .transpose()
        {
            Ok(k) => k,
            Err(e) => {
                out.push(Err(e.into()));
                continue;
            }
        };
        let p = &prepared[&env.workspace_id];
        let request = OperationRequest {
            id: t.id,
            appliance: t.appliance,
            kind: p.kind.clone(),
            phase: p.phase,
            data_tags: p.data_tags.clone(),
            args: p.args.clone(),
            command_sha256: p.command.sha256(),
            environment: Some(env.id),
            execution_key,
        };
        statements.push((
            out.len(),
            env.workspace_id,
            RequestStatement {
                request,
                command: p.command.clone(),
                reason: reason.clone(),
                requested_by: requested_by.clone(),
                requested_at: now,
                tenant: scope.tenant(),
                environment: env.id,
            },
        ));
        // Filled in below once signed.
        out.push(Err(RequestError::Sign));
    }

    let signed = sign_all(state, statements).await?;
    let mut slots = Vec::with_capacity(signed.len());
    let mut rows = Vec::with_capacity(signed.len());
    let mut events = Vec::with_capacity(signed.len());
    for ((slot, workspace, statement), envelope) in signed {
        let p = &prepared[&workspace];
        let (row, ev) = stored(scope, workspace, p, statement, envelope.to_json(), state.ops_signer.cert_pem(), now);
        slots.push(slot);
        rows.push(row);
        events.push(ev);
    }

    let works: Vec<Work> = rows.iter().map(|r| Work::Operation(r.appliance_id)).collect();
    let inserted = state
        .push
        .noting_all(&works, async {
            let mut tx = state.store.write().await?;
            let inserted = tx.insert_operations(scope, &rows).await?;
            // Exactly one audit record per operation stored, in the same transaction.
            let audited = events.into_iter().zip(&inserted).filter(|(_, ok)| **ok).map(|(ev, _)| ev).collect();
            tx.audit_all(&scope.chain(), now, audited).await?;
            tx.commit().await?;
            Ok::<_, RequestError>(inserted)
        })
        .await?;
    for ((slot, row), ok) in slots.into_iter().zip(rows).zip(inserted) {
        out[slot] = if ok {
            tracing::debug!(operation = %row.id, appliance = %row.appliance_id, template = %row.template_name, "operation requested");
            Ok(row)
        } else {
            Err(RequestError::NotActive { appliance: row.appliance_id, environment: row.environment_id })
        };
    }
    // Every stored operation, and only those: the others' slots hold why they were not.
    let stored: Vec<&OperationRow> = out.iter().filter_map(|r| r.as_ref().ok()).collect();
    tracing::info!(operations = stored.len(), targets = targets.len(), "operations requested");
    // Each workspace's release, for deploys and tasks: the instructions carry it.
    let releases = prepared
        .iter()
        .filter_map(|(ws, p)| {
            let args = deploy::DeployArgs::from_args(&p.args)
                .or_else(|| deploy::TaskArgs::from_args(&p.args).map(|t| t.release))?;
            [deploy::DEPLOY_KIND, deploy::TASK_KIND].contains(&p.kind.as_str()).then_some((*ws, args.release))
        })
        .collect();
    state.push.requested(scope, &stored, releases).await;
    Ok(out)
}

/// The reason, trimmed, if the customer can read it.
fn checked_reason(reason: &str) -> Result<String, RequestError> {
    let reason = reason.trim().to_owned();
    if reason.is_empty() || reason.chars().count() > MAX_REASON_CHARS || reason.chars().any(char::is_control) {
        return Err(RequestError::Reason);
    }
    Ok(reason)
}

/// Requests signed with the operations key, each returned beside its envelope, in order: on
/// the blocking pool, split over the available cores (a rollout signs thousands at once and
/// must not hold an async worker).
async fn sign_all<T: Send + 'static>(
    state: &AppState,
    statements: Vec<(usize, T, RequestStatement)>,
) -> Result<Vec<((usize, T, RequestStatement), Envelope)>, RequestError> {
    /// Below this, one thread signs them: a hand-off costs more than it saves.
    const PER_THREAD_AT_LEAST: usize = 64;
    let sign_err = |e: &dyn std::fmt::Display| {
        tracing::error!(error = %e, "cannot sign an operation request");
        RequestError::Sign
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per = statements.len().div_ceil(threads).max(PER_THREAD_AT_LEAST);
    let mut statements = statements;
    let mut chunks = Vec::new();
    while !statements.is_empty() {
        let rest = statements.split_off(per.min(statements.len()));
        chunks.push(std::mem::replace(&mut statements, rest));
    }
    let handles: Vec<_> = chunks
        .into_iter()
        .map(|chunk| {
            let signer = state.ops_signer.clone();
            tokio::task::spawn_blocking(move || {
                chunk.into_iter().map(|s| signer.sign_request(&s.2).map(|e| (s, e))).collect::<Result<Vec<_>, _>>()
            })
        })
        .collect();
    let mut out = Vec::new();
    for h in handles {
        out.extend(h.await.map_err(|e| sign_err(&e))?.map_err(|e| sign_err(&e))?);
    }
    Ok(out)
}

/// The row and audit event of a signed request.
fn stored(
    scope: &TenantScope,
    workspace: WorkspaceId,
    p: &Prepared,
    statement: RequestStatement,
    envelope_json: String,
    cert_pem: &str,
    now: airlock_core::Timestamp,
) -> (OperationRow, airlock_core::audit::Event) {
    let request = &statement.request;
    let row = OperationRow {
        id: request.id,
        workspace_id: workspace,
        environment_id: statement.environment,
        appliance_id: request.appliance,
        template_name: p.kind.clone(),
        template_sha256: p.template_sha256.clone(),
        state: OperationState::AwaitingApproval,
        requested_by: statement.requested_by.clone(),
        requested_at: now,
        updated_at: now,
        request_digest: request.digest_hex(),
        command_sha256: request.command_sha256.clone(),
        request_envelope: envelope_json,
        control_plane_cert_pem: cert_pem.to_owned(),
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
    let action = if deploy::is_deploy(request) {
        AuditAction::DeploymentRequest
    } else if deploy::is_task(request) {
        AuditAction::ReleaseTaskRequest
    } else {
        AuditAction::OperationRequest
    };
    let mut ev = event(scope.principal().actor(), action, Outcome::Success);
    ev.target = Some(row.id.to_string());
    ev.workspace = Some(workspace.to_string());
    // Keys in sorted order, as the chain hashes them: a detail written otherwise is copied
    // sorted before hashing (serde_json keeps insertion order in this build), 10,000 copies
    // for a rollout's round.
    ev.detail = serde_json::json!({
        "appliance": request.appliance.to_string(),
        "command_sha256": row.command_sha256,
        "data_tags": request.data_tags,
        "environment": statement.environment.to_string(),
        "phase": request.phase,
        "reason": statement.reason,
        // A deploy's or a task's arguments name the release (and task); a template's
        // variables may carry anything, so they stay in the signed request only.
        "release": (deploy::is_deploy(request) || deploy::is_task(request)).then_some(&request.args),
        "request_digest": row.request_digest,
        "template": row.template_name,
        "template_sha256": row.template_sha256,
    });
    (row, ev)
}

/// The active appliances of an environment that a batch targets, by id.
type Active = HashMap<ApplianceId, ApplianceRow>;

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

/// A stored release of the environment's workspace, verified again with its unrevoked keys.
async fn verified_release(
    state: &AppState,
    scope: &TenantScope,
    env: &Environment,
    selector: &ReleaseSelector,
) -> Result<airlock_core::release::VerifiedRelease, RequestError> {
    let (_, release) =
        crate::releases::deployable(state, scope, env.workspace_id, selector).await.map_err(|e| match e {
            DeployableError::Store(e) => RequestError::Store(e),
            e => RequestError::Release(e),
        })?;
    Ok(release)
}

/// The deploy of a stored release, verified again with the workspace's unrevoked keys.
async fn prepare_deploy(
    state: &AppState,
    scope: &TenantScope,
    env: &Environment,
    selector: &ReleaseSelector,
) -> Result<Prepared, RequestError> {
    let release = verified_release(state, scope, env, selector).await?;
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
    let release = verified_release(state, scope, env, selector).await?;
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
) -> Result<ApplianceId, RequestError> {
    let list = state.store.list_appliances(scope, Some(env.id)).await?;
    let mut active = list.iter().filter(|a| a.revoked_at.is_none()).map(|a| a.id);
    match named {
        Some(id) => active.find(|a| *a == id).ok_or(RequestError::NotActive { appliance: id, environment: env.id }),
        None => match (active.next(), active.next()) {
            (Some(only), None) => Ok(only),
            (None, _) => Err(RequestError::NoAppliance(env.id)),
            (Some(_), Some(_)) => Err(RequestError::SeveralAppliances(env.id)),
        },
    }
}

#[cfg(test)]
mod tests;
