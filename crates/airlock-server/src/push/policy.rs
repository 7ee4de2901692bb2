//! Pushing the customer's policy relayed to an environment: to its connected appliances when it is relayed, and to each appliance after its `Welcome`.

use airlock_core::{ApplianceId, EnvironmentId};
use airlock_proto::gateway::{ControlMessage, PolicyUpdate, control_message};

use super::Pusher;
use crate::authz::TenantScope;
use crate::store::PolicyRow;

fn message(policy: &PolicyRow) -> ControlMessage {
    ControlMessage {
        body: Some(control_message::Body::PolicyUpdate(PolicyUpdate { policy_envelope_json: policy.envelope.clone() })),
    }
}

impl Pusher {
    /// Sends `policy` to every connected, non-revoked appliance of its environment, and offers
    /// each its waiting operations again. Returns how many it reached; one whose queue was
    /// full gets it after its next message.
    pub async fn policy(&self, scope: &TenantScope, policy: &PolicyRow) -> usize {
        let appliances = match self.store.list_appliances(scope, Some(policy.environment_id)).await {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(error = %e, "cannot list appliances to push a policy to; they get it when they reconnect");
                return 0;
            }
        };
        let msg = message(policy);
        let mut sent = 0;
        for a in appliances.iter().filter(|a| a.revoked_at.is_none()) {
            if self.registry.status(&a.id).is_none() {
                continue;
            }
            if self.registry.send(a.id, msg.clone()) {
                sent += 1;
                // Requests that were waiting for authority may be decided differently under the
                // new policy (a standing window, say): offer them again now, not at a reconnect.
                self.operations(scope, a.id, None).await;
            } else {
                self.registry.policy_stopped(a.id, policy.environment_id);
            }
        }
        sent
    }

    /// Sends the policy of `environment`, if one was relayed, to its `appliance` (after its
    /// Welcome, or after its next message when a push found its queue full).
    pub(super) async fn policy_to_appliance(
        &self,
        scope: &TenantScope,
        appliance: ApplianceId,
        environment: EnvironmentId,
    ) {
        // Most environments have none: no read for them.
        if !self.index.has_policy(&environment) {
            return;
        }
        match self.store.environment_policy(scope, environment).await {
            Ok(Some(policy)) => {
                if !self.registry.send(appliance, message(&policy)) {
                    self.registry.policy_stopped(appliance, environment);
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(error = %e, %appliance, "cannot read the environment's policy");
                self.registry.policy_stopped(appliance, environment);
            }
        }
    }
}
