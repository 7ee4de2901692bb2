//! Pushing instructions to appliances: operations and the customer's policy, down the stream each connected appliance holds open.
//!
//! Everything about when and in what order the control plane sends something unasked lives here; the gateway and the domain modules only say that something changed.
//!
//! When a push happens:
//! - right after an appliance's `Welcome`: the environment's relayed policy first, so that its operations are decided under it, then every operation still waiting for its result ([`Pusher::at_welcome`]), once per stream;
//! - when requests are committed, each to its appliance, from the committed rows without reading them back ([`Pusher::requested`]);
//! - when an approval is committed, to that appliance ([`Pusher::operations`]);
//! - when a policy is relayed, to every connected appliance of the environment, each of which is then offered its waiting operations again, since the new policy may decide them ([`Pusher::policy`]);
//! - after any message from an appliance, whatever is due on its stream ([`Pusher::after_message`]).
//!
//! Push order: the operation that just changed first, then decided operations (approved or denied) before those awaiting approval, then oldest first.
//! So a backlog nobody approved yet cannot hold back an approved one ([`crate::store::PushKey`], which the store's query follows).
//! A re-sent instruction is harmless: the appliance is idempotent per request id.
//!
//! Resume after a full queue: a push never waits on a stream; it queues with `try_send` and leaves slots free for replies.
//! A push that finds the queue full records where it stopped in the stream's [`crate::registry`] entry (the earliest of several), and the appliance's next message (heartbeat or result) resumes it from there, not from the start.
//! A policy that found the queue full is sent again the same way.
//! A message with nothing due touches memory only.
//!
//! Re-push timing: an approved operation the appliance answers with `AWAITING_APPROVAL` (its approval not valid yet) is pushed again on the same stream at [`repush_time`].
//! That is when the approval becomes valid (the time the appliance sends beside its code), at most [`REPUSH_AT_MOST`] and at least [`REPUSH_AT_LEAST`] ahead.
//! The appliance's next message after that time brings it, without waiting for a reconnect.
//!
//! The push index ([`PushIndex`]) lets a connect with nothing pending stay in memory.
//! Every write that gives an appliance something to receive runs through [`Pusher::noting`], which notes it in the index before the write and again after it.

mod index;
mod operations;
mod policy;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use airlock_core::{ApplianceId, EnvironmentId, Timestamp};

pub use index::{PushIndex, Seen};

use crate::authz::TenantScope;
use crate::registry::{Registration, Registry};
use crate::store::{Store, StoreError};

/// The longest the control plane waits before pushing an approved operation again that the
/// appliance said it cannot run yet.
pub const REPUSH_AT_MOST: Duration = Duration::from_secs(30);
/// The soonest it pushes one again.
pub const REPUSH_AT_LEAST: Duration = Duration::from_secs(1);

/// When to push an approved operation again that the appliance answered `AWAITING_APPROVAL`:
/// when its approval becomes valid (`valid_from`, which the appliance sends beside
/// `APPROVAL_NOT_YET_VALID`), at most [`REPUSH_AT_MOST`] and at least [`REPUSH_AT_LEAST`]
/// from `now`.
pub fn repush_time(valid_from: Option<Timestamp>, now: Timestamp) -> Timestamp {
    let latest = now.saturating_add(REPUSH_AT_MOST);
    valid_from.map_or(latest, |t| t.min(latest)).max(now.saturating_add(REPUSH_AT_LEAST))
}

/// What a write gives appliances to receive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Work {
    /// An operation of this appliance was requested or decided.
    Operation(ApplianceId),
    /// A policy was relayed to this environment.
    Policy(EnvironmentId),
}

/// Sends instructions to connected appliances. Reads the store, queues on the streams of the
/// [`Registry`], and keeps the [`PushIndex`].
#[derive(Debug)]
pub struct Pusher {
    store: Arc<Store>,
    registry: Arc<Registry>,
    index: PushIndex,
    awaiting: std::sync::Mutex<Awaiting>,
}

/// Operations requested (and pushed) awaiting approval and not decided since, by id, with their
/// appliance: an `AWAITING_APPROVAL` answer to one of them needs no read of the store (a
/// rollout's round brings thousands at once). Only an approved operation's answer can call for
/// anything (a re-push), and a decision removes its entry before it is written. Bounded: the
/// oldest entries are forgotten first, and a forgotten one is simply read from the store.
#[derive(Debug, Default)]
struct Awaiting {
    by_id: std::collections::HashMap<airlock_core::OperationId, ApplianceId>,
    order: std::collections::VecDeque<airlock_core::OperationId>,
}

/// The most operations [`Awaiting`] holds (about 50 bytes each).
const MAX_AWAITING: usize = 200_000;

impl Pusher {
    /// A pusher whose index is loaded from what the store holds.
    pub async fn load(store: Arc<Store>, registry: Arc<Registry>) -> Result<Self, StoreError> {
        let index = PushIndex::load(&store).await?;
        Ok(Self { store, registry, index, awaiting: Default::default() })
    }

    /// Notes operations just committed awaiting approval (see [`Awaiting`]).
    pub(crate) fn note_awaiting(&self, ops: impl Iterator<Item = (airlock_core::OperationId, ApplianceId)>) {
        let mut a = self.awaiting.lock().unwrap_or_else(|e| e.into_inner());
        for (id, appliance) in ops {
            if a.by_id.insert(id, appliance).is_none() {
                a.order.push_back(id);
            }
        }
        while a.by_id.len() > MAX_AWAITING || a.order.len() > 2 * MAX_AWAITING {
            let Some(oldest) = a.order.pop_front() else { break };
            a.by_id.remove(&oldest);
        }
    }

    /// Whether `id` is an operation of `appliance` still awaiting approval as far as memory knows;
    /// false means "read the store".
    pub(crate) fn known_awaiting(&self, id: airlock_core::OperationId, appliance: ApplianceId) -> bool {
        self.awaiting.lock().unwrap_or_else(|e| e.into_inner()).by_id.get(&id) == Some(&appliance)
    }

    /// `id` is being decided or has a result: its answers are read from the store from now on.
    pub(crate) fn forget_awaiting(&self, id: airlock_core::OperationId) {
        self.awaiting.lock().unwrap_or_else(|e| e.into_inner()).by_id.remove(&id);
    }

    /// The push index.
    pub fn index(&self) -> &PushIndex {
        &self.index
    }

    /// Runs `write`, which ends with the commit that creates or decides `work`, with `work`
    /// noted in the push index before it starts and again after it ends.
    ///
    /// Before: no stream connecting after the commit can skip its read and miss the work.
    /// After: a push whose read began before the commit (and so found nothing) may have
    /// dropped the entry; noting it again keeps it.
    /// A note for a write that then failed costs one read at most.
    pub async fn noting<T, E>(&self, work: Work, write: impl Future<Output = Result<T, E>>) -> Result<T, E> {
        self.noting_all(&[work], write).await
    }

    /// [`Pusher::noting`] for a write that creates or decides every one of `works` (a batch
    /// of requests committed together).
    pub async fn noting_all<T, E>(&self, works: &[Work], write: impl Future<Output = Result<T, E>>) -> Result<T, E> {
        works.iter().for_each(|w| self.note(*w));
        let done = write.await;
        works.iter().for_each(|w| self.note(*w));
        done
    }

    fn note(&self, work: Work) {
        match work {
            Work::Operation(appliance) => self.index.operation_may_be_pending(appliance),
            Work::Policy(environment) => self.index.policy_relayed(environment),
        }
    }

    /// Right after the `Welcome` on a new stream of `appliance`: the policy of its
    /// `environment`, then its waiting operations.
    pub async fn at_welcome(&self, scope: &TenantScope, appliance: ApplianceId, environment: EnvironmentId) {
        self.policy_to_appliance(scope, appliance, environment).await;
        self.operations(scope, appliance, None).await;
    }

    /// After a message from the appliance on the stream `reg`: goes on with a push (of
    /// operations or of the policy) that stopped on a full queue, and pushes approved
    /// operations again when a re-push is due. Touches memory only when none of these is.
    pub async fn after_message(&self, scope: &TenantScope, reg: &Registration, now: Timestamp) {
        let due = self.registry.take_due_of(reg, now);
        if due.policy.is_none() && due.resume.is_none() && !due.repush {
            return;
        }
        // Boxed so that the session task, which awaits this after every message, does not
        // carry the state of these reads for its whole life.
        Box::pin(async {
            if let Some(environment) = due.policy {
                self.policy_to_appliance(scope, reg.appliance, environment).await;
            }
            if let Some(from) = due.resume {
                self.push_from(scope, reg.appliance, from, None).await;
            }
            if due.repush {
                self.repush_approved(scope, reg.appliance).await;
            }
        })
        .await;
    }

    /// The appliance answered an approved operation `AWAITING_APPROVAL`: push its approved
    /// operations again at [`repush_time`].
    pub fn repush_when_valid(&self, appliance: ApplianceId, valid_from: Option<Timestamp>, now: Timestamp) {
        self.registry.repush_at(appliance, repush_time(valid_from, now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repush_time_follows_the_approvals_validity_within_bounds() {
        let now = Timestamp::from_unix_millis(1_800_000_000_000);
        let at = |secs: u64| now.saturating_add(Duration::from_secs(secs));
        assert_eq!(repush_time(Some(at(10)), now), at(10));
        assert_eq!(repush_time(Some(at(3600)), now), at(30));
        assert_eq!(repush_time(Some(now), now), at(1));
        assert_eq!(repush_time(None, now), at(30));
    }
}
