//! Shared state of a running control plane.

use std::sync::Arc;
use std::time::Duration;

use airlock_core::Timestamp;
use airlock_core::audit::{Event, Outcome};
use ring::rand::{SecureRandom, SystemRandom};

use crate::ca::CertificateAuthority;
use crate::clock::Clock;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::store::{Store, StoreError};
use crate::tls::RevokedSet;

/// The audit chain for events that belong to no known tenant (e.g. a bad credential).
pub const SYSTEM_CHAIN: &str = "system";

#[derive(Debug)]
pub struct AppState {
    pub store: Store,
    pub ca: CertificateAuthority,
    pub clock: Arc<dyn Clock>,
    pub registry: Registry,
    pub revoked: Arc<RevokedSet>,
    pub metrics: Metrics,
    pub appliance_cert_lifetime: Duration,
    pub heartbeat_interval: Duration,
    pub join_token_ttl: Duration,
    pub gateway_endpoint: String,
    pub gateway_server_name: String,
}

impl AppState {
    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }

    /// Appends one event in its own transaction. For events with no state change to commit
    /// alongside (reads, refusals).
    pub async fn audit(&self, chain: &str, event: Event) -> Result<(), StoreError> {
        let mut tx = self.store.write().await?;
        tx.audit(chain, self.now(), event).await?;
        tx.commit().await
    }

    /// Like [`AppState::audit`], but a failure to audit is logged rather than returned: used on
    /// paths that are already refusing the request.
    pub async fn audit_refusal(&self, chain: &str, event: Event) {
        if let Err(e) = self.audit(chain, event).await {
            tracing::error!(error = %e, "could not append audit record");
        }
    }
}

pub fn event(actor: impl Into<String>, action: &str, outcome: Outcome) -> Event {
    Event {
        actor: actor.into(),
        action: action.to_owned(),
        workspace: None,
        target: None,
        outcome,
        detail: serde_json::Value::Null,
    }
}

/// Bytes from the OS CSPRNG. Failure of the system RNG is unrecoverable for a CA.
pub fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    SystemRandom::new().fill(&mut b).expect("the OS random generator failed"); // No safe fallback exists.
    b
}
