//! Customer policies relayed to appliances.
//!
//! The control plane holds no customer key: it can neither make a policy nor check a policy's signatures.
//! It checks only the shape of what an operator relays: a DSSE envelope of the policy payload type, signed at least once, a policy that parses and names this environment, and a serial greater than the one stored.
//! It keeps the latest one per environment and hands it to [`crate::push`], which sends it to the environment's connected appliances at once and to each other appliance after its `Welcome`, before its operations.
//! The appliances verify it against the customer keys they pinned.

use airlock_core::EnvironmentId;
use airlock_core::audit::{AuditAction, Outcome};
use airlock_core::dsse::Envelope;
use airlock_core::policy::{POLICY_PAYLOAD_TYPE, PolicyDocument};

use crate::authz::TenantScope;
use crate::push::Work;
use crate::state::{AppState, event};
use crate::store::{PolicyRow, PutPolicy, StoreError};

/// The largest policy envelope relayed (a policy is a few KiB).
pub const MAX_POLICY_ENVELOPE_BYTES: usize = 256 * 1024;

/// Why a relayed policy was not stored.
#[derive(Debug, thiserror::Error)]
pub enum RelayPolicyError {
    #[error("no environment {0} in your tenant")]
    NoEnvironment(EnvironmentId),
    #[error("the envelope is larger than {MAX_POLICY_ENVELOPE_BYTES} bytes; it is not a policy")]
    TooLarge,
    #[error("the envelope is not a DSSE envelope: {0}")]
    NotAnEnvelope(String),
    /// The shape checks failed.
    #[error("{0}")]
    Shape(String),
    #[error(
        "environment {environment} already has policy serial {stored}; a relayed policy's serial must be greater (appliances refuse a rollback too)"
    )]
    NotNewer { environment: EnvironmentId, stored: u64 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A policy as stored, and how many connected appliances it reached at once.
#[derive(Debug)]
pub struct Relayed {
    pub row: PolicyRow,
    pub sent_to: usize,
}

/// Relays the customer's signed policy (the JSON of a DSSE envelope) to `environment`:
/// checks its shape, stores it with its audit record (noted in the push index around the
/// commit), and pushes it to the environment's connected appliances.
pub async fn relay(
    state: &AppState,
    scope: &TenantScope,
    environment: EnvironmentId,
    envelope: serde_json::Value,
) -> Result<Relayed, RelayPolicyError> {
    state.store.get_environment(scope, environment).await?.ok_or(RelayPolicyError::NoEnvironment(environment))?;
    if envelope.to_string().len() > MAX_POLICY_ENVELOPE_BYTES {
        return Err(RelayPolicyError::TooLarge);
    }
    let envelope: Envelope =
        serde_json::from_value(envelope).map_err(|e| RelayPolicyError::NotAnEnvelope(e.to_string()))?;
    // Parsing compiles the policy's patterns (up to its caps: milliseconds, not microseconds),
    // so it runs on the blocking pool, never on the workers that answer everyone else.
    let (envelope, checked) = tokio::task::spawn_blocking(move || {
        let checked = check_shape(&envelope, environment);
        (envelope, checked)
    })
    .await
    .map_err(|_| RelayPolicyError::Shape("the policy check was interrupted".into()))?;
    let checked = checked.map_err(RelayPolicyError::Shape)?;
    let now = state.now();
    let row = PolicyRow {
        environment_id: environment,
        serial: checked.serial,
        policy_sha256: checked.policy_sha256.clone(),
        envelope: envelope.to_json(),
        relayed_by: scope.principal().actor(),
        relayed_at: now,
    };
    let mut ev = event(scope.principal().actor(), AuditAction::PolicyRelayed, Outcome::Success);
    ev.target = Some(environment.to_string());
    ev.detail = serde_json::json!({
        "serial": checked.serial,
        "policy_sha256": checked.policy_sha256,
        "signatures": checked.signatures,
    });
    state
        .push
        .noting(Work::Policy(environment), async {
            let mut tx = state.store.write().await?;
            match tx.put_policy(scope, &row).await? {
                PutPolicy::Stored => {}
                PutPolicy::NoEnvironment => return Err(RelayPolicyError::NoEnvironment(environment)),
                PutPolicy::NotNewer { stored } => return Err(RelayPolicyError::NotNewer { environment, stored }),
            }
            tx.audit(&scope.chain(), now, ev).await?;
            Ok(tx.commit().await?)
        })
        .await?;
    let sent_to = state.push.policy(scope, &row).await;
    tracing::info!(%environment, serial = checked.serial, sent_to, "customer policy relayed");
    Ok(Relayed { row, sent_to })
}

/// What the shape checks found in a relayed envelope.
#[derive(Debug)]
pub struct CheckedPolicy {
    pub serial: u64,
    /// SHA-256 (hex) of the signed TOML, as the appliance reports it.
    pub policy_sha256: String,
    pub signatures: usize,
}

/// Checks the shape of a policy envelope; nothing here can check a signature.
pub fn check_shape(envelope: &Envelope, environment: EnvironmentId) -> Result<CheckedPolicy, String> {
    if envelope.payload_type != POLICY_PAYLOAD_TYPE {
        return Err(format!(
            "the envelope's payload type is `{}`, not a customer policy (`{POLICY_PAYLOAD_TYPE}`)",
            envelope.payload_type.chars().take(100).collect::<String>()
        ));
    }
    if envelope.signatures.is_empty() {
        return Err("the policy is not signed; sign it with `airlock customer policy sign`".into());
    }
    let text = std::str::from_utf8(&envelope.payload).map_err(|_| "the policy is not UTF-8".to_owned())?;
    let doc = PolicyDocument::parse(text).map_err(|e| e.to_string())?;
    // The appliance refuses it otherwise; refusing here tells the caller at once.
    doc.check_environment(environment, true).map_err(|e| e.to_string())?;
    if i64::try_from(doc.serial).is_err() {
        return Err("the policy serial must be below 2^63".into());
    }
    Ok(CheckedPolicy {
        serial: doc.serial,
        policy_sha256: airlock_core::operation::sha256_hex(&envelope.payload),
        signatures: envelope.signatures.len(),
    })
}
