//! What a running control plane shares: the store, the CA and the operations signer, the key-encryption key, the clock, the live streams and the pusher.
//!
//! Built once by [`crate::serve`] (and by the tests over a data directory); every handler and domain function takes it by reference.
//! It also owns the audit of refusals, which anyone on the network can provoke, so those records are rate limited ([`AppState::audit_refusal`]).
//! Records with no state change beside them go through the group-commit writer ([`crate::store::AuditWriter`]): [`AppState::audit`] waits until its record is durable, [`AppState::audit_access`] (routine reads) only until it is queued.

use std::sync::Arc;
use std::time::Duration;

use airlock_core::Timestamp;
use airlock_core::audit::{AuditAction, Event, Outcome};
use ring::rand::{SecureRandom, SystemRandom};

use crate::ca::CertificateAuthority;
use crate::clock::Clock;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::store::{AuditWriter, Store, StoreError};
use crate::tls::RevokedSet;

/// The audit chain for events that belong to no known tenant (e.g. a bad credential).
pub const SYSTEM_CHAIN: &str = "system";

#[derive(Debug)]
pub struct AppState {
    pub store: Arc<Store>,
    pub seen: crate::seen::SeenWriter,
    pub ca: CertificateAuthority,
    /// Signs operation requests; the key lives only in this process.
    pub ops_signer: Arc<crate::signer::OperationsSigner>,
    /// Seals released operation output at rest.
    pub kek: crate::keys::Kek,
    pub clock: Arc<dyn Clock>,
    pub registry: Arc<Registry>,
    pub revoked: Arc<RevokedSet>,
    /// Sends instructions to connected appliances.
    pub push: crate::push::Pusher,
    pub metrics: Metrics,
    /// Group-commits the audit records that have no effect to commit with.
    pub audit_writer: AuditWriter,
    pub refusal_limiter: RefusalLimiter,
    /// The one authorization decision (Cedar), built once at start.
    pub authz: Arc<crate::authz::Engine>,
    /// Bearer-token authentication: failure limits and last-use batching.
    pub authn: crate::authn::Authenticator,
    /// Templates compiled off the async workers, kept by content.
    pub templates: crate::operations::CompiledTemplates,
    pub appliance_cert_lifetime: Duration,
    pub heartbeat_interval: Duration,
    pub join_token_ttl: Duration,
    pub gateway_endpoint: String,
    pub gateway_server_name: String,
    /// The audit signing key's public half (PEM), published beside the CA certificate.
    pub audit_key_pem: String,
    /// Release artifacts on disk.
    pub artifacts: crate::artifacts::ArtifactStore,
    /// Join challenges and the STS endpoints platform proofs may go to.
    pub platform: crate::platform_join::PlatformJoin,
    /// Signed-in users: the public URL, session limits, logins in progress.
    pub sso: crate::sso::Sso,
    /// Identity providers' and platform issuers' discovery documents and signing keys.
    pub issuers: Arc<crate::issuer::Issuers>,
}

impl AppState {
    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }

    /// Appends one event with no state change to commit alongside (a sensitive read, a
    /// refusal) and returns once it is durable; concurrent callers share one commit.
    pub async fn audit(&self, chain: &str, event: Event) -> Result<(), StoreError> {
        Ok(self.audit_writer.append(chain, self.now(), event).await?)
    }

    /// Queues the record of a routine read and returns without waiting for its commit (the
    /// next group commit writes it). One that cannot be queued is logged and counted, never
    /// dropped silently.
    pub async fn audit_access(&self, chain: &str, event: Event) {
        if let Err(e) = self.audit_writer.enqueue(chain, self.now(), event).await {
            self.metrics.audit.queued_records_lost.inc();
            tracing::error!(error = %e, chain, "could not queue a read's audit record");
        }
    }

    /// Like [`AppState::audit`], but a failure to audit is logged rather than returned: used on
    /// paths that are already refusing the request.
    ///
    /// Refusals are rate limited per chain and action: anyone can send bad credentials or
    /// handshakes, and each record is a durable write. Records past the limit are counted, and
    /// the next admitted record of that kind says how many were folded into it. Keying by
    /// action keeps a flood of one kind from hiding another.
    pub async fn audit_refusal(&self, chain: &str, event: Event) {
        let key = event.action.clone();
        self.audit_refusal_keyed(chain, &key, event).await;
    }

    /// [`AppState::audit_refusal`], limited under `limiter_key` instead of the event's action: for a kind of refusal
    /// anyone can provoke in bulk, so it cannot crowd out the records of another kind with the same action.
    pub async fn audit_refusal_keyed(&self, chain: &str, limiter_key: &str, mut event: Event) {
        match self.refusal_limiter.admit(chain, limiter_key, self.now()) {
            None => return,
            Some(0) => {}
            Some(suppressed) => {
                if !event.detail.is_object() {
                    event.detail = serde_json::json!({});
                }
                if let serde_json::Value::Object(map) = &mut event.detail {
                    map.insert("similar_events_suppressed".into(), suppressed.into());
                }
            }
        }
        if let Err(e) = self.audit(chain, event).await {
            tracing::error!(error = %e, "could not append audit record");
        }
    }
}

/// Admits at most [`RefusalLimiter::PER_SECOND`] records per second for each (chain, action);
/// counts the rest.
#[derive(Debug, Default)]
pub struct RefusalLimiter(std::sync::Mutex<std::collections::HashMap<(String, String), LimiterState>>);

#[derive(Debug, Default)]
struct LimiterState {
    second: i64,
    admitted: u32,
    suppressed: u64,
}

impl RefusalLimiter {
    pub const PER_SECOND: u32 = 20;

    /// `Some(n)`: write the record, noting `n` suppressed since the last one. `None`: drop it.
    pub fn admit(&self, chain: &str, action: &str, now: Timestamp) -> Option<u64> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        // Keys are tenants × actions, but an idle key carrying no count is dropped so the map
        // does not grow with every tenant that ever saw a refusal.
        if map.len() > 4096 {
            map.retain(|_, s| s.suppressed > 0 || s.second == now.unix_seconds());
        }
        let s = map.entry((chain.to_owned(), action.to_owned())).or_default();
        if s.second != now.unix_seconds() {
            s.second = now.unix_seconds();
            s.admitted = 0;
        }
        if s.admitted >= Self::PER_SECOND {
            s.suppressed += 1;
            return None;
        }
        s.admitted += 1;
        Some(std::mem::take(&mut s.suppressed))
    }
}

/// An audit event with no target or detail yet. Writers name the action with [`AuditAction`],
/// so a misspelt action is a compile error; the record keeps its text.
pub fn event(actor: impl Into<String>, action: AuditAction, outcome: Outcome) -> Event {
    Event {
        actor: actor.into(),
        action: action.as_str().to_owned(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_limiter_folds_floods_into_a_count() {
        let l = RefusalLimiter::default();
        let t = Timestamp::from_unix_millis(10_000);
        for _ in 0..RefusalLimiter::PER_SECOND {
            assert_eq!(l.admit("system", "a", t), Some(0));
        }
        for _ in 0..5 {
            assert_eq!(l.admit("system", "a", t), None);
        }
        // Another kind of event, or another chain, is not drowned out by the flood.
        assert_eq!(l.admit("system", "b", t), Some(0));
        assert_eq!(l.admit("ten_x", "a", t), Some(0));
        assert_eq!(l.admit("system", "a", Timestamp::from_unix_millis(11_000)), Some(5));
        assert_eq!(l.admit("system", "a", Timestamp::from_unix_millis(11_001)), Some(0));
    }
}
