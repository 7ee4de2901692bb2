//! What appliances report about their release deployments (`DeploymentStatus` on the gateway):
//! the release running, the deploy in progress, each service's state, and whether each secret
//! reference exists. The latest report per appliance is stored and served by the API.
//!
//! Invariants:
//! - Only metadata is kept, besides what the customer's signed policy lets the appliance send
//!   (`[telemetry]`: each running service's metrics and the redacted tail of its log); the wire
//!   type carries no secret value, and every string from the appliance is bounded and stripped
//!   of control characters here (a log tail keeps its line breaks and tabs).
//! - A code this build does not know is stored as `unknown`, never mapped to a known state.
//! - A change of the deploy's phase is audited in the tenant's chain; service and secret
//!   changes alone are not (they would flood the chain), the stored row shows them.

use airlock_core::audit::{AuditAction, Outcome};
use airlock_core::{ApplianceIdentity, Timestamp};
use airlock_proto::gateway as wire;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::authz::TenantScope;
use crate::state::{AppState, event};
use crate::store::StoreError;

/// Most services, and secret references, kept from one report (a release's own caps).
const MAX_SERVICES: usize = airlock_core::release::MAX_SERVICES;
const MAX_SECRETS: usize = 4 * airlock_core::release::MAX_SECRETS;
const MAX_TEXT: usize = 256;
/// The longest log tail kept per service: the most a customer's policy lets go up.
const MAX_LOG_TAIL: usize = airlock_core::policy::MAX_LOG_TAIL_BYTES as usize;

/// A release, as an appliance names it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ReleaseRefView {
    pub digest: String,
    pub name: String,
    pub version: String,
}

/// Where a deploy stands on its appliance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeployPhase {
    Fetching,
    /// Waiting for required secrets that do not exist yet.
    Held,
    Installing,
    Starting,
    Deployed,
    RolledBack,
    Failed,
    Unknown,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DeployProgressView {
    pub request_id: String,
    pub release: Option<ReleaseRefView>,
    pub phase: DeployPhase,
    pub missing_secrets: Vec<String>,
    pub reason: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ServiceState {
    Starting,
    Healthy,
    Unhealthy,
    Stopped,
    RolledBack,
    Unknown,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ServiceStatusView {
    pub name: String,
    pub state: ServiceState,
    pub release_version: String,
    pub restarts: u32,
    /// Only where the customer's policy opts in (`service_metrics`), for a service running now.
    #[serde(default)]
    pub metrics: Option<ServiceMetricsView>,
    /// Only where the customer's policy opts in (`service_logs`), for a service running now: the
    /// last bytes of its log, secret values the appliance gave it replaced by `[redacted]`.
    #[serde(default)]
    pub log_tail: Option<String>,
}

/// A running service's use of its cgroup, as its appliance read it; each is absent where the
/// host does not account for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ServiceMetricsView {
    /// CPU time used since its current process started, in microseconds.
    pub cpu_usage_usec: Option<u64>,
    pub memory_current_bytes: Option<u64>,
    pub pids_current: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SecretState {
    Present,
    Missing,
    Unknown,
}

/// Whether a secret reference exists; never its value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SecretExistenceView {
    pub reference: String,
    pub state: SecretState,
    #[schema(value_type = Option<i64>)]
    pub last_changed: Option<Timestamp>,
}

/// An appliance's latest deployment report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DeploymentStatusView {
    pub current: Option<ReleaseRefView>,
    pub deploy: Option<DeployProgressView>,
    pub services: Vec<ServiceStatusView>,
    pub secrets: Vec<SecretExistenceView>,
    /// When the appliance made the report (its clock).
    #[schema(value_type = i64)]
    pub reported_at: Timestamp,
}

fn text(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(MAX_TEXT).collect()
}

/// A log tail: at most [`MAX_LOG_TAIL`] bytes (its end), control characters other than line
/// breaks and tabs removed.
fn log_text(s: &str) -> String {
    let mut cut = s.len().saturating_sub(MAX_LOG_TAIL);
    while !s.is_char_boundary(cut) {
        cut += 1;
    }
    s[cut..].chars().filter(|c| !c.is_control() || matches!(c, '\n' | '\t')).collect()
}

fn release(r: Option<&wire::ReleaseRef>) -> Option<ReleaseRefView> {
    let r = r.filter(|r| !r.digest.is_empty())?;
    Some(ReleaseRefView { digest: text(&r.digest), name: text(&r.name), version: text(&r.version) })
}

impl DeploymentStatusView {
    /// The report, bounded and with every code checked (unknown codes stay `unknown`).
    pub fn from_wire(s: &wire::DeploymentStatus, received_at: Timestamp) -> Self {
        let phase = |p: i32| match wire::DeployPhase::try_from(p) {
            Ok(wire::DeployPhase::Fetching) => DeployPhase::Fetching,
            Ok(wire::DeployPhase::Held) => DeployPhase::Held,
            Ok(wire::DeployPhase::Installing) => DeployPhase::Installing,
            Ok(wire::DeployPhase::Starting) => DeployPhase::Starting,
            Ok(wire::DeployPhase::Deployed) => DeployPhase::Deployed,
            Ok(wire::DeployPhase::RolledBack) => DeployPhase::RolledBack,
            Ok(wire::DeployPhase::Failed) => DeployPhase::Failed,
            Ok(wire::DeployPhase::Unspecified) | Err(_) => DeployPhase::Unknown,
        };
        let service = |p: i32| match wire::ServiceState::try_from(p) {
            Ok(wire::ServiceState::Starting) => ServiceState::Starting,
            Ok(wire::ServiceState::Healthy) => ServiceState::Healthy,
            Ok(wire::ServiceState::Unhealthy) => ServiceState::Unhealthy,
            Ok(wire::ServiceState::Stopped) => ServiceState::Stopped,
            Ok(wire::ServiceState::RolledBack) => ServiceState::RolledBack,
            Ok(wire::ServiceState::Unspecified) | Err(_) => ServiceState::Unknown,
        };
        let secret = |p: i32| match wire::SecretState::try_from(p) {
            Ok(wire::SecretState::Present) => SecretState::Present,
            Ok(wire::SecretState::Missing) => SecretState::Missing,
            Ok(wire::SecretState::Unknown | wire::SecretState::Unspecified) | Err(_) => SecretState::Unknown,
        };
        Self {
            current: release(s.current.as_ref()),
            deploy: s.deploy.as_ref().map(|d| DeployProgressView {
                request_id: text(&d.request_id),
                release: release(d.release.as_ref()),
                phase: phase(d.phase),
                missing_secrets: d.missing_secrets.iter().take(MAX_SECRETS).map(|m| text(m)).collect(),
                reason: text(&d.reason),
            }),
            services: s
                .services
                .iter()
                .take(MAX_SERVICES)
                .map(|v| ServiceStatusView {
                    name: text(&v.name),
                    state: service(v.state),
                    release_version: text(&v.release_version),
                    restarts: v.restarts,
                    metrics: v.metrics.as_ref().map(|m| ServiceMetricsView {
                        cpu_usage_usec: m.cpu_usage_usec,
                        memory_current_bytes: m.memory_current_bytes,
                        pids_current: m.pids_current,
                    }),
                    log_tail: v.log_tail.as_deref().map(log_text),
                })
                .collect(),
            secrets: s
                .secrets
                .iter()
                .take(MAX_SECRETS)
                .map(|v| SecretExistenceView {
                    reference: text(&v.reference),
                    state: secret(v.state),
                    last_changed: (v.last_changed_unix_ms > 0)
                        .then(|| Timestamp::from_unix_millis(v.last_changed_unix_ms)),
                })
                .collect(),
            reported_at: if s.at_unix_ms > 0 { Timestamp::from_unix_millis(s.at_unix_ms) } else { received_at },
        }
    }
}

/// How many reports one stream may have stored per second: a deploy reports a handful of phase
/// changes in quick succession, a flood of them must not hold the store's write lock.
const REPORTS_PER_SECOND: u32 = 5;

/// One gateway stream's allowance of stored reports (a fixed one-second window).
#[derive(Debug, Default)]
pub struct ReportBudget {
    window: Option<std::time::Instant>,
    used: u32,
}

impl ReportBudget {
    /// Whether a report arriving at `now` is stored.
    pub fn admit(&mut self, now: std::time::Instant) -> bool {
        match self.window {
            Some(start) if now.duration_since(start) < std::time::Duration::from_secs(1) => {
                self.used += 1;
                self.used <= REPORTS_PER_SECOND
            }
            _ => {
                self.window = Some(now);
                self.used = 1;
                true
            }
        }
    }
}

/// The additional data an appliance's log tails are sealed with: its tenant and itself.
fn log_tails_aad(scope: &TenantScope, appliance: airlock_core::ApplianceId) -> Vec<u8> {
    format!("airlock deployment log tails v1\n{}\n{appliance}", scope.tenant()).into_bytes()
}

/// The appliance's latest report with its log tails opened, if it is the tenant's and has
/// reported.
pub async fn status(
    state: &AppState,
    scope: &TenantScope,
    appliance: airlock_core::ApplianceId,
) -> Result<Option<DeploymentStatusView>, StoreError> {
    let Some(stored) = state.store.deployment_status(scope, appliance).await? else { return Ok(None) };
    let mut view = stored.view;
    if let Some(sealed) = stored.log_tails_sealed {
        let plain = state
            .kek
            .open(&sealed, &log_tails_aad(scope, appliance))
            .map_err(|_| StoreError::Corrupt(format!("the log tails of {appliance} cannot be opened")))?;
        let tails: Vec<Option<String>> = serde_json::from_slice(&plain)
            .map_err(|e| StoreError::Corrupt(format!("the log tails of {appliance}: {e}")))?;
        for (service, tail) in view.services.iter_mut().zip(tails) {
            service.log_tail = tail;
        }
    }
    Ok(Some(view))
}

/// Stores an appliance's report, replacing the one before; a new deploy phase is audited.
/// Nothing goes back to the appliance (its next report replaces this one anyway).
pub async fn handle_status(
    state: &AppState,
    peer: &ApplianceIdentity,
    scope: &TenantScope,
    status: &wire::DeploymentStatus,
) -> Result<(), StoreError> {
    let now = state.now();
    let mut view = DeploymentStatusView::from_wire(status, now);
    // Log tails are customer data the customer let go up: sealed at rest, apart from the rest.
    let tails: Vec<Option<String>> = view.services.iter_mut().map(|s| s.log_tail.take()).collect();
    let sealed = match tails.iter().any(Option::is_some) {
        true => {
            let plain = serde_json::to_vec(&tails).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            Some(
                state
                    .kek
                    .seal(&plain, &log_tails_aad(scope, peer.appliance))
                    .map_err(|e| StoreError::Corrupt(format!("cannot seal log tails: {e}")))?,
            )
        }
        false => None,
    };
    let json = serde_json::to_string(&view).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let before = state.store.deployment_status(scope, peer.appliance).await?.map(|s| s.view);
    let changed_phase = view.deploy.as_ref().map(|d| (&d.request_id, d.phase))
        != before.as_ref().and_then(|b| b.deploy.as_ref()).map(|d| (&d.request_id, d.phase));
    // Audited only for a deploy of this very appliance: a report naming anything else is stored
    // (it is the appliance's own word) but adds nothing to the tenant's chain.
    let own_deploy = match view.deploy.as_ref().and_then(|d| d.request_id.parse::<airlock_core::OperationId>().ok()) {
        Some(op) if changed_phase => state.store.get_operation(scope, op).await?.is_some_and(|row| {
            row.appliance_id == peer.appliance && row.template_name == airlock_core::deploy::DEPLOY_KIND
        }),
        _ => false,
    };
    let mut tx = state.store.write().await?;
    tx.put_deployment_status(scope, peer.appliance, &json, sealed.as_deref(), now).await?;
    if own_deploy && let Some(d) = &view.deploy {
        let mut ev = event(scope.principal().actor(), AuditAction::DeploymentStatus, Outcome::Success);
        ev.target = Some(d.request_id.clone());
        ev.detail = serde_json::json!({
            "appliance": peer.appliance.to_string(),
            "phase": d.phase,
            "release": d.release,
            "missing_secrets": d.missing_secrets,
            "reason": d.reason,
        });
        tx.audit(&scope.chain(), now, ev).await?;
    }
    tx.commit().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_tail_is_bounded_and_keeps_only_line_breaks_and_tabs_of_control_characters() {
        let long = format!("é{}\x1b[31mred\r\n\tend\0", "x".repeat(MAX_LOG_TAIL));
        let status = wire::DeploymentStatus {
            services: vec![
                wire::ServiceStatus { name: "web".into(), log_tail: Some(long), ..Default::default() },
                wire::ServiceStatus { name: "db".into(), ..Default::default() },
            ],
            ..Default::default()
        };
        let view = DeploymentStatusView::from_wire(&status, Timestamp::from_unix_millis(1));
        let tail = view.services[0].log_tail.as_deref().unwrap();
        assert!(tail.len() <= MAX_LOG_TAIL && tail.ends_with("[31mred\n\tend"), "{tail:?}");
        assert!(!tail.contains('é') && !tail.contains('\x1b') && !tail.contains('\r'));
        assert_eq!((view.services[1].log_tail.as_deref(), view.services[1].metrics), (None, None));
        // A row stored before these fields existed still reads.
        let old = r#"{"name":"web","state":"healthy","release_version":"1","restarts":0}"#;
        let old: ServiceStatusView = serde_json::from_str(old).unwrap();
        assert_eq!((old.log_tail, old.metrics), (None, None));
    }

    #[test]
    fn a_stream_stores_a_few_reports_a_second() {
        let mut budget = ReportBudget::default();
        let t0 = std::time::Instant::now();
        let admitted = (0..20).filter(|i| budget.admit(t0 + std::time::Duration::from_millis(*i))).count();
        assert_eq!(admitted, REPORTS_PER_SECOND as usize);
        assert!(budget.admit(t0 + std::time::Duration::from_millis(1001)));
    }
}
