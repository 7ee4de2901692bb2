//! Rollouts: one release deployed to many appliances (every active appliance of the chosen
//! environments of a workspace), at most `concurrency` at a time, halted once more than
//! `max_failures` of them failed.
//!
//! Each target becomes an ordinary deploy operation (`Requested::Deploy`), so every appliance's
//! customer decides about it exactly as about a single deploy; a target waiting for its
//! customer's approval holds a slot. A round's starts are requested as one batch
//! (`operations::request_many`: the release verified once, one transaction), so a rollout of
//! thousands at full concurrency reaches every appliance within seconds.
//!
//! Decide, then act: [`plan`] is pure (the targets' states in, what to start and the rollout's
//! state out); [`drive`] reads the store, refreshes targets from their operations, plans, and
//! writes. Everything is in the store, and a target's operation id is chosen and stored before
//! the deploy is requested, so after a restart the driver carries on where it was and a request
//! it repeats is the same operation.
//!
//! The driver acts with its creator's authority ([`RolloutCreator`], checked at every round).
//! An API token is looked up again each round: revoked or expired, it halts the rollout.
//! A signed-in user's rollout keeps the roles of the session it was created in, as they applied in
//! its workspace (a snapshot: the driver needs no live session, so the user's logout or a session
//! timing out does not stop it); an admin ending the user's sessions after the rollout's creation
//! (`sso::sessions::end_user_sessions`, which leaves a per-user cut-off) halts it, audited.

use std::sync::Arc;
use std::time::Duration;

use airlock_core::audit::{AuditAction, Outcome};
use airlock_core::operation::OperationState;
use airlock_core::{EnvironmentId, OperationId, RolloutId, Timestamp, WorkspaceId};
use serde::{Deserialize, Serialize};

use crate::authz::TenantScope;
use crate::operations::{RequestError, Requested, Target};
use crate::releases::{DeployableError, ReleaseSelector};
use crate::state::{AppState, event, random};
use crate::store::{RolloutCreator, RolloutRow, RolloutTargetRow, StoreError, UnfinishedRollout};

/// Most targets one rollout may have.
pub const MAX_TARGETS: usize = 10_000;

/// Where a rollout stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    Running,
    /// Past its failure threshold: nothing new starts; deploys in flight finish.
    Halting,
    Halted,
    Completed,
}

/// Where one target stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TargetState {
    Pending,
    /// Its deploy was requested and has not finished (it may be waiting for approval).
    Deploying,
    Succeeded,
    Failed,
}

/// What to do next.
#[derive(Debug, PartialEq, Eq)]
pub struct Plan {
    /// Indexes of the targets to start now.
    pub start: Vec<usize>,
    pub state: RolloutState,
}

/// Decides a round: halt past the threshold (in-flight deploys finish), else start pending
/// targets in order up to the concurrency limit; done when nothing is pending or in flight.
pub fn plan(targets: &[TargetState], concurrency: u32, max_failures: u32) -> Plan {
    let count = |s: TargetState| targets.iter().filter(|t| **t == s).count();
    let (failed, in_flight, pending) =
        (count(TargetState::Failed), count(TargetState::Deploying), count(TargetState::Pending));
    if failed > max_failures as usize {
        let state = if in_flight == 0 { RolloutState::Halted } else { RolloutState::Halting };
        return Plan { start: Vec::new(), state };
    }
    if pending == 0 && in_flight == 0 {
        return Plan { start: Vec::new(), state: RolloutState::Completed };
    }
    let room = (concurrency as usize).saturating_sub(in_flight);
    let start = targets.iter().enumerate().filter(|(_, t)| **t == TargetState::Pending).map(|(i, _)| i).take(room);
    Plan { start: start.collect(), state: RolloutState::Running }
}

/// What a deploy operation's state means for its target.
pub fn target_state(op: OperationState, exit_code: Option<i64>) -> TargetState {
    match op {
        OperationState::AwaitingApproval | OperationState::Approved => TargetState::Deploying,
        OperationState::Executed | OperationState::Released | OperationState::Withheld if exit_code == Some(0) => {
            TargetState::Succeeded
        }
        OperationState::Executed
        | OperationState::Released
        | OperationState::Withheld
        | OperationState::Denied
        | OperationState::Cancelled
        | OperationState::Refused => TargetState::Failed,
    }
}

/// What an operator asks for.
#[derive(Clone, Debug)]
pub struct NewRollout {
    pub workspace: WorkspaceId,
    pub release: ReleaseSelector,
    /// Only these environments; every environment of the workspace when empty.
    pub environments: Vec<EnvironmentId>,
    pub concurrency: u32,
    pub max_failures: u32,
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error("concurrency must be between 1 and {MAX_TARGETS}")]
    Concurrency,
    #[error("the reason must be 1–1000 characters without control characters; every customer reads it")]
    Reason,
    #[error("no environment {0} in this workspace")]
    NoEnvironment(EnvironmentId),
    #[error("no active appliance in the chosen environments: nothing to deploy to")]
    NoTargets,
    #[error("a rollout reaches at most {MAX_TARGETS} appliances")]
    TooManyTargets,
    #[error("rollouts are started by an API token or a signed-in user")]
    NotAnApiPrincipal,
    #[error("no workspace {0} in your tenant")]
    NoWorkspace(WorkspaceId),
    #[error(transparent)]
    Release(DeployableError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Creates a rollout (its targets: every active appliance of the chosen environments, in
/// environment order) with its audit record, and drives its first round at once.
///
/// The first round's targets are stored already deploying under their operation ids, in the
/// creating transaction, so that round reads nothing back and writes no target again: it is
/// the same drive a restart makes of targets chosen but never requested. Holding the drive
/// lock from before the creation means no periodic round drives the rollout in between.
///
/// Returns the rollout and its targets as the first round left them (a round that met a store
/// error is logged and left to the periodic driver, which asks again under the same ids).
pub async fn create(
    state: &AppState,
    scope: &TenantScope,
    new: NewRollout,
) -> Result<(RolloutRow, Vec<RolloutTargetRow>), RolloutError> {
    let _driving = DRIVING.lock().await;
    // Read before the store is, as in `drive_locked`: nothing this rollout requests exists yet.
    let version = state.store.operation_states_version();
    let (mut row, mut targets) = create_unstarted(state, scope, new).await?;
    let ops = std::collections::HashMap::new();
    if let Err(e) = drive_read(state, scope, version, &mut row, &mut targets, &ops).await {
        tracing::warn!(rollout = %row.id, error = %e, "the rollout's first round failed; the driver retries");
        // What the store holds, rather than what the round meant to store.
        if let Some(stored) = state.store.rollout(scope, row.id).await? {
            targets = state.store.rollout_targets(scope, row.id).await?;
            row = stored;
        }
    }
    Ok((row, targets))
}

/// [`create`]'s rollout, stored with its first round's targets marked deploying, not yet requested.
async fn create_unstarted(
    state: &AppState,
    scope: &TenantScope,
    new: NewRollout,
) -> Result<(RolloutRow, Vec<RolloutTargetRow>), RolloutError> {
    if !(1..=MAX_TARGETS as u32).contains(&new.concurrency) {
        return Err(RolloutError::Concurrency);
    }
    let reason = new.reason.trim().to_owned();
    if reason.is_empty() || reason.chars().count() > 1000 || reason.chars().any(char::is_control) {
        return Err(RolloutError::Reason);
    }
    let created_by = match scope.principal() {
        crate::authz::Principal::ApiToken { id, .. } => RolloutCreator::Token(*id),
        crate::authz::Principal::User { subject, session, grants, .. } => RolloutCreator::User {
            subject: subject.clone(),
            session: *session,
            roles: grants.within(new.workspace).roles,
        },
        crate::authz::Principal::Appliance(_) | crate::authz::Principal::System => {
            return Err(RolloutError::NotAnApiPrincipal);
        }
    };
    if !state.store.workspace_exists(scope, new.workspace).await? {
        return Err(RolloutError::NoWorkspace(new.workspace));
    }
    let (release, _) =
        crate::releases::deployable(state, scope, new.workspace, &new.release).await.map_err(|e| match e {
            DeployableError::Store(e) => RolloutError::Store(e),
            e => RolloutError::Release(e),
        })?;
    let all = state.store.list_environments(scope, new.workspace).await?;
    let chosen: Vec<EnvironmentId> = if new.environments.is_empty() {
        all.iter().map(|e| e.id).collect()
    } else {
        for e in &new.environments {
            if !all.iter().any(|a| a.id == *e) {
                return Err(RolloutError::NoEnvironment(*e));
            }
        }
        new.environments.clone()
    };
    let now = state.now();
    let mut targets = Vec::new();
    for env in chosen {
        let appliances = state.store.list_appliances(scope, Some(env)).await?;
        for a in appliances.iter().filter(|a| a.revoked_at.is_none()) {
            if targets.len() == MAX_TARGETS {
                return Err(RolloutError::TooManyTargets);
            }
            targets.push(RolloutTargetRow {
                position: u32::try_from(targets.len()).unwrap_or(u32::MAX),
                environment_id: env,
                appliance_id: a.id,
                operation_id: None,
                state: TargetState::Pending,
                detail: String::new(),
                updated_at: now,
            });
        }
    }
    if targets.is_empty() {
        return Err(RolloutError::NoTargets);
    }
    // What the first round starts, chosen now (see `create`).
    let states: Vec<TargetState> = targets.iter().map(|t| t.state).collect();
    for i in plan(&states, new.concurrency, new.max_failures).start {
        let t = &mut targets[i];
        t.operation_id = Some(OperationId::from_random(random()));
        t.state = TargetState::Deploying;
    }
    let row = RolloutRow {
        id: RolloutId::from_random(random()),
        tenant_id: scope.tenant(),
        workspace_id: new.workspace,
        release_digest: release.digest,
        release_name: release.name,
        release_version: release.version,
        concurrency: new.concurrency,
        max_failures: new.max_failures,
        reason,
        created_by,
        state: RolloutState::Running,
        created_at: now,
        updated_at: now,
    };
    let mut ev = event(scope.principal().actor(), AuditAction::RolloutCreate, Outcome::Success);
    ev.workspace = Some(new.workspace.to_string());
    ev.target = Some(row.id.to_string());
    ev.detail = serde_json::json!({
        "release": row.release_digest, "name": row.release_name, "version": row.release_version,
        "targets": targets.len(), "concurrency": row.concurrency, "max_failures": row.max_failures,
    });
    let mut tx = state.store.write().await?;
    tx.insert_rollout(scope, &row, &targets).await?;
    tx.audit(&scope.chain(), now, ev).await?;
    tx.commit().await?;
    tracing::info!(rollout = %row.id, targets = targets.len(), "rollout created");
    Ok((row, targets))
}

/// Drives every unfinished rollout, every `every`, until `stop`.
pub async fn run(state: Arc<AppState>, every: Duration, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {
                if let Err(e) = round(&state).await {
                    tracing::error!(error = %e, "rollout round failed; retrying at the next");
                }
            }
            _ = stop.changed() => return,
        }
    }
}

/// One round over every unfinished rollout.
pub(crate) async fn round(state: &AppState) -> Result<(), StoreError> {
    let unfinished = state.store.unfinished_rollouts().await?;
    DRIVEN.lock().unwrap_or_else(|e| e.into_inner()).retain(|id, _| unfinished.iter().any(|u| u.id == *id));
    for rollout in unfinished {
        let id = rollout.id;
        let scope = match creator_scope(state, rollout).await? {
            Ok(scope) => scope,
            Err(why) => {
                halt_orphan(state, id, why).await?;
                continue;
            }
        };
        if let Err(e) = drive_if_moved(state, &scope, id).await {
            tracing::error!(rollout = %id, error = %e, "cannot drive a rollout");
        }
    }
    Ok(())
}

/// Drives are serialized within the process: the API's first round and the periodic one must
/// not both start the same pending targets under different operation ids.
static DRIVING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Each rollout's last complete drive: the store's operation-state version read before it.
/// A plan is a pure function of the targets' operations' states, so while that version stays
/// the same another drive would start nothing and change nothing. Memory only: after a restart
/// every unfinished rollout is driven (and its targets chosen but never requested are asked).
static DRIVEN: std::sync::Mutex<std::collections::BTreeMap<RolloutId, u64>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// Refreshes a rollout's targets from their operations, plans, starts what the plan says.
pub async fn drive(state: &AppState, scope: &TenantScope, id: RolloutId) -> Result<(), StoreError> {
    let _driving = DRIVING.lock().await;
    drive_locked(state, scope, id).await
}

/// [`drive`], unless no operation has changed state since this rollout's last complete drive:
/// then there is nothing to refresh and nothing the plan could start anew. (A rollout whose
/// deploys all wait for their customers' approval then costs nothing a second, however many
/// targets it has.) Judged once the lock is held: a round that waited behind the API's first
/// drive would otherwise read all its targets and operations again while their appliances
/// answer (measured: 1.1-2.2 s of a 10,000-target round's busiest seconds).
async fn drive_if_moved(state: &AppState, scope: &TenantScope, id: RolloutId) -> Result<(), StoreError> {
    let _driving = DRIVING.lock().await;
    let unchanged = DRIVEN.lock().unwrap_or_else(|e| e.into_inner()).get(&id).copied()
        == Some(state.store.operation_states_version());
    if unchanged {
        return Ok(());
    }
    drive_locked(state, scope, id).await
}

/// [`drive`]'s work, under [`DRIVING`].
async fn drive_locked(state: &AppState, scope: &TenantScope, id: RolloutId) -> Result<(), StoreError> {
    // Read before the store is: a change that lands after it makes the next round drive again.
    let version = state.store.operation_states_version();
    let Some(mut rollout) = state.store.rollout(scope, id).await? else { return Ok(()) };
    let mut targets = state.store.rollout_targets(scope, id).await?;
    // Every requested target's operation, in one read.
    let ops = state.store.rollout_operation_states(scope, id).await?;
    drive_read(state, scope, version, &mut rollout, &mut targets, &ops).await
}

/// A drive of a rollout already read: its targets and their operations' states (`ops`) as the
/// store had them once the operation-state `version` was read. Updates `rollout` and `targets`
/// to what it stored.
async fn drive_read(
    state: &AppState,
    scope: &TenantScope,
    version: u64,
    rollout: &mut RolloutRow,
    targets: &mut [RolloutTargetRow],
    ops: &std::collections::HashMap<OperationId, (OperationState, Option<i64>)>,
) -> Result<(), StoreError> {
    let id = rollout.id;
    let now = state.now();
    let mut changed = Vec::new();
    let mut start = Vec::new();
    for (i, t) in targets.iter_mut().enumerate() {
        if t.state != TargetState::Deploying {
            continue;
        }
        let Some(op) = t.operation_id else { continue };
        let new = match ops.get(&op) {
            Some(&(state, exit_code)) => target_state(state, exit_code),
            // Chosen and stored, then the process stopped before the request: ask again.
            None => {
                start.push(i);
                continue;
            }
        };
        if new != t.state {
            t.state = new;
            t.updated_at = now;
            changed.push(i);
        }
    }
    let states: Vec<TargetState> = targets.iter().map(|t| t.state).collect();
    let next = plan(&states, rollout.concurrency, rollout.max_failures);
    start.extend(&next.start);
    let settled = start_targets(state, scope, rollout, targets, &start, now).await;
    // Started targets were stored as deploying (or left as they were) before their requests;
    // only those whose request was refused changed since.
    changed.extend(start.into_iter().filter(|&i| targets[i].state == TargetState::Failed));
    // A target that could not even be requested failed at once: the next round plans with it.
    changed.sort_unstable();
    changed.dedup();
    // Only a drive whose every start was requested or refused for good may be skipped after:
    // one that met a store error must run again.
    let done = || {
        if settled {
            DRIVEN.lock().unwrap_or_else(|e| e.into_inner()).insert(id, version);
        }
    };
    if changed.is_empty() && next.state == rollout.state {
        done();
        return Ok(());
    }
    let mut tx = state.store.write().await?;
    tx.put_rollout_targets(scope, id, changed.iter().map(|&i| &targets[i])).await?;
    if next.state != rollout.state {
        tx.set_rollout_state(scope, id, next.state, now).await?;
        let action = match next.state {
            RolloutState::Completed => Some(AuditAction::RolloutCompleted),
            RolloutState::Halting | RolloutState::Halted if rollout.state == RolloutState::Running => {
                Some(AuditAction::RolloutHalted)
            }
            _ => None,
        };
        if let Some(action) = action {
            let mut ev = event(scope.principal().actor(), action, Outcome::Success);
            ev.workspace = Some(rollout.workspace_id.to_string());
            ev.target = Some(id.to_string());
            let count = |s: TargetState| targets.iter().filter(|t| t.state == s).count();
            ev.detail = serde_json::json!({
                "succeeded": count(TargetState::Succeeded), "failed": count(TargetState::Failed),
                "max_failures": rollout.max_failures,
            });
            tx.audit(&scope.chain(), now, ev).await?;
        }
    }
    tx.commit().await?;
    rollout.state = next.state;
    rollout.updated_at = now;
    done();
    Ok(())
}

/// Requests the deploys of the targets at `which` under ids stored first (see the module doc),
/// all in one batch (`operations::request_many`); a request the control plane refuses (the
/// appliance was revoked, the release's key was revoked) fails its target.
/// False if a store error left some of them to be asked again at the next round.
async fn start_targets(
    state: &AppState,
    scope: &TenantScope,
    rollout: &RolloutRow,
    targets: &mut [RolloutTargetRow],
    which: &[usize],
    now: Timestamp,
) -> bool {
    if which.is_empty() {
        return true;
    }
    let mut requests = Vec::with_capacity(which.len());
    // Those not yet stored as deploying under their ids (a rollout's first round was, when it
    // was created; a target asked again after a restart was, before the restart).
    let mut marking = Vec::new();
    for &i in which {
        let t = &mut targets[i];
        let stored_already = t.state == TargetState::Deploying && t.operation_id.is_some();
        let id = *t.operation_id.get_or_insert_with(|| OperationId::from_random(random()));
        if !stored_already {
            t.state = TargetState::Deploying;
            t.updated_at = now;
            marking.push(i);
        }
        requests.push(Target { environment: t.environment_id, appliance: t.appliance_id, id });
    }
    // Stored before the requests, so a restart in between asks again under the same ids.
    let stored = async {
        if marking.is_empty() {
            return Ok(());
        }
        let mut tx = state.store.write().await?;
        tx.put_rollout_targets(scope, rollout.id, marking.iter().map(|&i| &targets[i])).await?;
        tx.commit().await
    };
    if let Err(e) = stored.await {
        tracing::error!(rollout = %rollout.id, error = %e, "cannot record rollout targets; retrying at the next round");
        for &i in &marking {
            targets[i].state = TargetState::Pending;
            targets[i].operation_id = None;
        }
        return false;
    }
    let what = Requested::Deploy(ReleaseSelector::Digest(rollout.release_digest.clone()));
    let reason = format!("rollout {}: {}", rollout.id, rollout.reason);
    let fail = |t: &mut RolloutTargetRow, e: &RequestError| {
        t.state = TargetState::Failed;
        t.detail = e.to_string().chars().take(500).collect();
    };
    match crate::operations::request_many(state, scope, what, reason, &requests).await {
        Ok(results) => {
            for (&i, r) in which.iter().zip(results) {
                if let Err(e) = r {
                    fail(&mut targets[i], &e);
                }
            }
            true
        }
        // The store, not the requests: nothing was stored, and the next round asks again
        // under the same ids.
        Err(e @ RequestError::Store(StoreError::Db(_))) => {
            tracing::error!(rollout = %rollout.id, error = %e, "cannot request the rollout's deploys");
            false
        }
        Err(e) => {
            which.iter().for_each(|&i| fail(&mut targets[i], &e));
            true
        }
    }
}

/// Why a rollout's creator no longer lends it authority.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CreatorGone {
    /// The API token that created it was revoked, or expired.
    TokenRevoked,
    /// An admin ended the creating user's sessions after the rollout was created.
    SessionsEnded,
}

impl CreatorGone {
    /// The stable code the audit records.
    pub const fn code(self) -> &'static str {
        match self {
            CreatorGone::TokenRevoked => "creator_token_revoked",
            CreatorGone::SessionsEnded => "creator_sessions_ended",
        }
    }
}

/// The scope a rollout's driver acts in this round: its creator's authority as it is now (see the module doc).
async fn creator_scope(
    state: &AppState,
    rollout: UnfinishedRollout,
) -> Result<Result<TenantScope, CreatorGone>, StoreError> {
    match rollout.creator {
        RolloutCreator::Token(token) => {
            let live = state
                .store
                .api_token_by_id(token)
                .await?
                .filter(|row| row.grants.expires_at.is_none_or(|t| t > state.now()));
            Ok(live.map(TenantScope::for_rollout).ok_or(CreatorGone::TokenRevoked))
        }
        RolloutCreator::User { subject, session, roles } => {
            let scope =
                TenantScope::for_user_rollout(rollout.tenant, subject.clone(), session, roles, rollout.created_at);
            // Ended at the very millisecond of the creation counts: the creating request may have been in flight.
            let cut_off = state.store.session_cut_off(&scope, &subject).await?;
            Ok(if cut_off.is_some_and(|at| at >= rollout.created_at) {
                Err(CreatorGone::SessionsEnded)
            } else {
                Ok(scope)
            })
        }
    }
}

/// A rollout whose creator no longer lends it authority: halted, audited in its tenant's chain.
async fn halt_orphan(state: &AppState, id: RolloutId, why: CreatorGone) -> Result<(), StoreError> {
    let Some(tenant) = state.store.rollout_tenant(id).await? else { return Ok(()) };
    let scope = TenantScope::for_system(tenant);
    let now = state.now();
    let mut ev = event(scope.principal().actor(), AuditAction::RolloutHalted, Outcome::Success);
    ev.target = Some(id.to_string());
    ev.detail = serde_json::json!({ "why": why.code() });
    let mut tx = state.store.write().await?;
    tx.set_rollout_state(&scope, id, RolloutState::Halted, now).await?;
    tx.audit(&scope.chain(), now, ev).await?;
    tx.commit().await?;
    tracing::warn!(rollout = %id, why = why.code(), "rollout halted: its creator no longer lends it authority");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use TargetState::*;

    #[test]
    fn a_plan_starts_up_to_the_concurrency_in_order() {
        assert_eq!(plan(&[Pending, Pending, Pending], 2, 0), Plan { start: vec![0, 1], state: RolloutState::Running });
        assert_eq!(plan(&[Deploying, Pending, Pending], 2, 0).start, vec![1]);
        assert_eq!(plan(&[Deploying, Deploying, Pending], 2, 0).start, Vec::<usize>::new());
        assert_eq!(plan(&[Succeeded, Succeeded], 2, 0), Plan { start: vec![], state: RolloutState::Completed });
    }

    #[test]
    fn past_the_threshold_nothing_starts_and_in_flight_deploys_finish() {
        // One failure allowed: the first does not halt.
        assert_eq!(plan(&[Failed, Pending, Pending], 1, 1).start, vec![1]);
        assert_eq!(
            plan(&[Failed, Failed, Deploying, Pending], 3, 1),
            Plan { start: vec![], state: RolloutState::Halting }
        );
        assert_eq!(
            plan(&[Failed, Failed, Succeeded, Pending], 3, 1),
            Plan { start: vec![], state: RolloutState::Halted }
        );
        // Failures within the threshold still complete.
        assert_eq!(plan(&[Failed, Succeeded], 1, 1).state, RolloutState::Completed);
    }

    #[test]
    fn a_deploy_succeeds_only_when_it_ran_and_switched() {
        assert_eq!(target_state(OperationState::Executed, Some(0)), Succeeded);
        assert_eq!(target_state(OperationState::Executed, Some(1)), Failed);
        assert_eq!(target_state(OperationState::Executed, None), Failed);
        assert_eq!(target_state(OperationState::AwaitingApproval, None), Deploying);
        for s in [OperationState::Denied, OperationState::Refused, OperationState::Cancelled] {
            assert_eq!(target_state(s, None), Failed);
        }
    }
}
