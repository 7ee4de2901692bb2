//! Customer policies relayed to appliances.
//!
//! The control plane holds no customer key: it can neither make a policy nor check a policy's
//! signatures. It checks only the shape of what an operator relays (a DSSE envelope of the
//! policy payload type, signed at least once, a policy that parses, a serial that moves
//! forward), keeps the latest one per environment and pushes it to the environment's
//! appliances, which verify it against the customer keys they pinned.

use airlock_core::dsse::Envelope;
use airlock_core::policy::{POLICY_PAYLOAD_TYPE, PolicyDocument};
use airlock_core::{ApplianceId, EnvironmentId};
use airlock_proto::gateway::{ControlMessage, PolicyUpdate, control_message};

use crate::authz::TenantScope;
use crate::state::AppState;
use crate::store::PolicyRow;

/// The largest policy envelope relayed (a policy is a few KiB).
pub const MAX_POLICY_ENVELOPE_BYTES: usize = 256 * 1024;

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
    doc.check_environment(environment, true)?;
    if i64::try_from(doc.serial).is_err() {
        return Err("the policy serial must be below 2^63".into());
    }
    Ok(CheckedPolicy {
        serial: doc.serial,
        policy_sha256: airlock_core::operation::sha256_hex(&envelope.payload),
        signatures: envelope.signatures.len(),
    })
}

fn message(policy: &PolicyRow) -> ControlMessage {
    ControlMessage {
        body: Some(control_message::Body::PolicyUpdate(PolicyUpdate { policy_envelope_json: policy.envelope.clone() })),
    }
}

/// Sends `policy` to every connected, non-revoked appliance of its environment. Returns how
/// many it reached; one whose queue was full gets it after its next message.
pub async fn push_to_environment(state: &AppState, scope: &TenantScope, policy: &PolicyRow) -> usize {
    let appliances = match state.store.list_appliances(scope, Some(policy.environment_id)).await {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "cannot list appliances to push a policy to; they get it when they reconnect");
            return 0;
        }
    };
    let msg = message(policy);
    let mut sent = 0;
    for a in appliances.iter().filter(|a| a.revoked_at.is_none()) {
        if state.registry.status(&a.id).is_none() {
            continue;
        }
        if state.registry.send(a.id, msg.clone()) {
            sent += 1;
            // Requests that were waiting for authority may be decided differently under the
            // new policy (a standing window, say): offer them again now, not at a reconnect.
            crate::operations::push_pending(state, scope, a.id, None).await;
        } else {
            state.registry.policy_stopped(a.id, policy.environment_id);
        }
    }
    sent
}

/// Sends the policy of `environment`, if one was relayed, to its `appliance` (after its
/// Welcome, or after its next message when a push found its queue full).
pub async fn push_to_appliance(
    state: &AppState,
    scope: &TenantScope,
    appliance: ApplianceId,
    environment: EnvironmentId,
) {
    // Most environments have none: no read for them.
    if !state.push_index.has_policy(&environment) {
        return;
    }
    match state.store.environment_policy(scope, environment).await {
        Ok(Some(policy)) => {
            if !state.registry.send(appliance, message(&policy)) {
                state.registry.policy_stopped(appliance, environment);
            }
        }
        Ok(None) => {}
        Err(e) => {
            tracing::error!(error = %e, %appliance, "cannot read the environment's policy");
            state.registry.policy_stopped(appliance, environment);
        }
    }
}
