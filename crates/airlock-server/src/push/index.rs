//! What may be waiting to be pushed to an appliance when it connects, in memory.
//!
//! Every appliance stream pushes the environment's relayed policy and the operations still waiting for the appliance's result right after its `Welcome`.
//! Usually there is neither, and at fleet scale two database reads per connect are most of what a connect costs.
//! These indexes, loaded from the store at start-up and kept up to date by the writes that create something to push, let a connect with nothing pending stay in memory.
//!
//! A false positive costs one read, after which the appliance is dropped from the index.
//! A false negative would lose a push, so an entry is always added before the write that makes it true is committed ([`super::Pusher::noting`]).
//! An operation's entry is added again right after the commit: a push whose read began before the commit (and so found nothing) may drop the entry, but only if no entry was added since its read began.
//! Between the commit and that second insert a connecting stream may skip the read; it is registered by then, and the writer pushes to it right after.
//! An appliance is dropped from the index only by a push from the start that found nothing.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use airlock_core::{ApplianceId, EnvironmentId};

use crate::store::{Store, StoreError};

#[derive(Debug, Default)]
pub struct PushIndex {
    /// Appliances that may have operations without a final result, each with the
    /// generation of the latest write that made it so.
    operations: Mutex<HashMap<ApplianceId, u64>>,
    generation: AtomicU64,
    /// Environments with a relayed policy.
    policies: RwLock<HashSet<EnvironmentId>>,
}

/// The state of an appliance's entry when a push started reading the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seen(Option<u64>);

impl PushIndex {
    /// Builds the indexes from what the store holds.
    pub async fn load(store: &Store) -> Result<Self, StoreError> {
        let index = Self::default();
        for appliance in store.appliances_with_pending_operations().await? {
            index.operation_may_be_pending(appliance);
        }
        for environment in store.environments_with_policy().await? {
            index.policy_relayed(environment);
        }
        Ok(index)
    }

    /// Notes that `appliance` may have an operation to push. Call before committing the
    /// write that creates or decides it, and again after.
    pub fn operation_may_be_pending(&self, appliance: ApplianceId) {
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        self.ops().insert(appliance, generation);
    }

    /// Whether `appliance` may have operations to push (false: it certainly has none).
    pub fn may_have_operations(&self, appliance: &ApplianceId) -> bool {
        self.ops().contains_key(appliance)
    }

    /// Taken before reading the pending operations of `appliance` from the store.
    pub fn seen(&self, appliance: &ApplianceId) -> Seen {
        Seen(self.ops().get(appliance).copied())
    }

    /// The store held nothing pending for `appliance` when read after `seen`: drop it from
    /// the index unless an operation was noted since (which the read may have missed).
    pub fn nothing_pending(&self, appliance: &ApplianceId, seen: Seen) {
        let mut ops = self.ops();
        if seen.0.is_some() && ops.get(appliance).copied() == seen.0 {
            ops.remove(appliance);
        }
    }

    /// Notes that `environment` has a relayed policy. Call before committing it.
    pub fn policy_relayed(&self, environment: EnvironmentId) {
        self.policies.write().unwrap_or_else(|e| e.into_inner()).insert(environment);
    }

    /// Whether a policy may have been relayed to `environment`.
    pub fn has_policy(&self, environment: &EnvironmentId) -> bool {
        self.policies.read().unwrap_or_else(|e| e.into_inner()).contains(environment)
    }

    fn ops(&self) -> std::sync::MutexGuard<'_, HashMap<ApplianceId, u64>> {
        // Single inserts and removes: a poisoned lock holds a consistent map.
        self.operations.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_operation_noted_during_a_read_keeps_the_appliance_indexed() {
        let index = PushIndex::default();
        let a = ApplianceId::from_random([1; 16]);
        // Not indexed: nothing to remove.
        index.nothing_pending(&a, index.seen(&a));
        assert!(!index.may_have_operations(&a));

        index.operation_may_be_pending(a);
        let seen = index.seen(&a);
        // An operation created while the store was being read.
        index.operation_may_be_pending(a);
        index.nothing_pending(&a, seen);
        assert!(index.may_have_operations(&a));

        index.nothing_pending(&a, index.seen(&a));
        assert!(!index.may_have_operations(&a));
    }

    #[test]
    fn a_read_that_missed_an_uncommitted_operation_cannot_drop_it_for_good() {
        let index = PushIndex::default();
        let a = ApplianceId::from_random([2; 16]);
        // The writer notes the operation, a push reads the store before the commit and finds
        // nothing, and drops the entry.
        index.operation_may_be_pending(a);
        let seen = index.seen(&a);
        index.nothing_pending(&a, seen);
        assert!(!index.may_have_operations(&a));
        // The writer commits and notes it again.
        index.operation_may_be_pending(a);
        assert!(index.may_have_operations(&a));
        // Or the push finishes only after that: the newer entry stays.
        index.nothing_pending(&a, seen);
        assert!(index.may_have_operations(&a));
    }
}
