//! Live appliance connections, in memory: one entry per connected appliance, with the sender of its stream and what is still to be pushed on it.
//!
//! Heartbeats update this map and not the database: at fleet scale a write per heartbeat would dominate the store.
//! The database learns version and last-seen time when a stream ends (through [`crate::seen`]); the API merges both views.
//! A newer stream of the same appliance replaces (and ends) the older one.
//! What is still to be pushed on a stream (where an interrupted push resumes, when approved operations are due again, a policy that found the queue full) rides on its entry, boxed because it is rare.
//! [`crate::push`] decides what goes in it, and reads it back after every message from the appliance, under one lock and with no I/O.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use airlock_core::{ApplianceId, EnvironmentId, Timestamp};
use airlock_proto::gateway::ControlMessage;
use tokio::sync::{mpsc, oneshot};

use crate::store::PushFrom;

/// One message queued for a stream. Boxed: the queue's slots are allocated (and, as a busy
/// stream cycles through them, touched) in blocks of 32 per stream, so a slot of a pointer
/// rather than of a whole `ControlMessage` (144 bytes) saves about 4 KiB per stream.
pub type Queued = Result<Box<ControlMessage>, tonic::Status>;

/// The queue of messages to one stream (replies and pushed instructions share it).
pub type StreamSender = mpsc::Sender<Queued>;

/// Slots of a stream's queue that pushes leave free for replies, so a push can never make
/// the session task take a full queue for a peer that stopped reading.
const RESERVED_FOR_REPLIES: usize = 4;

#[derive(Clone, Debug)]
pub struct LiveStatus {
    pub connected_at: Timestamp,
    pub last_heartbeat: Timestamp,
    pub version: String,
    pub healthy: bool,
    pub cert_serial: String,
    pub cert_not_after: Timestamp,
}

/// Why the control plane ended a live stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kick {
    Revoked,
    /// The same appliance opened a newer stream.
    Replaced,
    ShuttingDown,
}

struct Entry {
    conn: u64,
    status: LiveStatus,
    /// Fired to end the stream at once.
    kick: Option<oneshot::Sender<Kick>>,
    /// Where messages the control plane originates (operation instructions) go.
    sender: StreamSender,
    /// Pushes to go on with after the appliance's next message; rare, so boxed to keep
    /// every connected appliance's entry small.
    later: Option<Box<Later>>,
}

#[derive(Debug, Default)]
struct Later {
    /// Where to resume pushing instructions: set when a push stopped on a full queue, taken
    /// on the appliance's next message. Kept here so a heartbeat with nothing to resume
    /// costs no database read.
    resume: Option<PushFrom>,
    /// When approved operations should be pushed again: the appliance answered one with
    /// `AWAITING_APPROVAL` (its approval not valid yet). Checked on the appliance's next
    /// message; memory only.
    repush_at: Option<Timestamp>,
    /// A policy push to this stream found its queue full: the environment whose policy to
    /// send again on the appliance's next message.
    policy_pending: Option<EnvironmentId>,
}

impl Entry {
    fn later(&mut self) -> &mut Later {
        self.later.get_or_insert_with(Box::default)
    }

    /// Drops the pending pushes' box once nothing is left in it.
    fn tidy(&mut self) {
        if self
            .later
            .as_ref()
            .is_some_and(|l| l.resume.is_none() && l.repush_at.is_none() && l.policy_pending.is_none())
        {
            self.later = None;
        }
    }
}

/// What is to be pushed to a stream after the appliance's latest message.
#[derive(Debug, Default)]
pub struct Due {
    /// Where an interrupted push of operations resumes.
    pub resume: Option<PushFrom>,
    /// Approved operations the appliance could not run yet are to be pushed again.
    pub repush: bool,
    /// The environment whose policy could not be queued.
    pub policy: Option<EnvironmentId>,
}

#[derive(Default)]
pub struct Registry {
    inner: Mutex<HashMap<ApplianceId, Entry>>,
    next_conn: AtomicU64,
}

impl Kick {
    pub fn message(self, appliance: ApplianceId) -> String {
        match self {
            Kick::Revoked => format!("appliance revoked: {appliance}"),
            Kick::Replaced => "replaced by a newer stream from the same appliance".to_owned(),
            Kick::ShuttingDown => "control plane shutting down; reconnect".to_owned(),
        }
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("connected", &self.len()).finish()
    }
}

/// Proof of registration; dropping it does nothing, [`Registry::leave`] consumes it.
#[derive(Debug)]
pub struct Registration {
    pub appliance: ApplianceId,
    conn: u64,
}

impl Registry {
    /// Registers a new stream, replacing (and ending) any older stream of the same appliance.
    pub fn join(
        &self,
        appliance: ApplianceId,
        status: LiveStatus,
        sender: StreamSender,
    ) -> (Registration, oneshot::Receiver<Kick>) {
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let old = self.lock().insert(appliance, Entry { conn, status, kick: Some(tx), sender, later: None });
        if let Some(kick) = old.and_then(|mut old| old.kick.take()) {
            let _ = kick.send(Kick::Replaced);
        }
        (Registration { appliance, conn }, rx)
    }

    /// Removes this stream's entry unless a newer stream replaced it. Returns its last status.
    pub fn leave(&self, reg: Registration) -> Option<LiveStatus> {
        let mut map = self.lock();
        match map.get(&reg.appliance) {
            Some(e) if e.conn == reg.conn => map.remove(&reg.appliance).map(|e| e.status),
            _ => None,
        }
    }

    pub fn update(&self, reg: &Registration, f: impl FnOnce(&mut LiveStatus)) {
        if let Some(e) = self.lock().get_mut(&reg.appliance)
            && e.conn == reg.conn
        {
            f(&mut e.status);
        }
    }

    /// Queues `msg` on the live stream of `appliance` without waiting. False if it is not
    /// connected or its queue is (nearly) full; the caller sends it again later.
    pub fn send(&self, appliance: ApplianceId, msg: ControlMessage) -> bool {
        let Some(sender) = self.lock().get(&appliance).map(|e| e.sender.clone()) else {
            return false;
        };
        sender.capacity() > RESERVED_FOR_REPLIES && sender.try_send(Ok(Box::new(msg))).is_ok()
    }

    /// Remembers that a push to `appliance` stopped before `from` (the earliest of several).
    pub fn push_stopped(&self, appliance: ApplianceId, from: PushFrom) {
        if let Some(e) = self.lock().get_mut(&appliance) {
            let later = e.later();
            later.resume = Some(match later.resume.take() {
                Some(earlier) => earlier.min(from),
                None => from,
            });
        }
    }

    /// Takes where an interrupted push to `appliance` should resume, if one stopped.
    pub fn take_resume(&self, appliance: ApplianceId) -> Option<PushFrom> {
        let mut map = self.lock();
        let e = map.get_mut(&appliance)?;
        let resume = e.later.as_mut().and_then(|l| l.resume.take());
        e.tidy();
        resume
    }

    /// Asks for the approved operations of `appliance` to be pushed again at `at` (the
    /// earliest of several), on its live stream.
    pub fn repush_at(&self, appliance: ApplianceId, at: Timestamp) {
        if let Some(e) = self.lock().get_mut(&appliance) {
            let later = e.later();
            later.repush_at = Some(later.repush_at.map_or(at, |earlier| earlier.min(at)));
        }
    }

    /// Remembers that the policy of `environment` could not be queued for `appliance`.
    pub fn policy_stopped(&self, appliance: ApplianceId, environment: EnvironmentId) {
        if let Some(e) = self.lock().get_mut(&appliance) {
            e.later().policy_pending = Some(environment);
        }
    }

    /// Takes what is due on the stream `reg` (not one that replaced it) at `now`: where an
    /// interrupted push resumes, whether approved operations are to be pushed again, and the
    /// environment whose policy is still to be sent. One lock, no I/O: this runs on every
    /// message from the appliance, heartbeats included.
    pub fn take_due_of(&self, reg: &Registration, now: Timestamp) -> Due {
        let mut map = self.lock();
        let Some(e) = map.get_mut(&reg.appliance).filter(|e| e.conn == reg.conn) else {
            return Due::default();
        };
        let Some(later) = e.later.as_mut() else {
            return Due::default();
        };
        let repush = later.repush_at.is_some_and(|at| at <= now);
        if repush {
            later.repush_at = None;
        }
        let due = Due { resume: later.resume.take(), repush, policy: later.policy_pending.take() };
        e.tidy();
        due
    }

    /// Ends the live stream of `appliance`, if any. Returns whether one was live.
    pub fn kick(&self, appliance: ApplianceId, why: Kick) -> bool {
        let entry = self.lock().get_mut(&appliance).and_then(|e| e.kick.take());
        match entry {
            Some(kick) => kick.send(why).is_ok(),
            None => false,
        }
    }

    /// Ends every live stream (shutdown), so appliances reconnect promptly and last-seen is
    /// recorded. Returns how many were live.
    pub fn kick_all(&self, why: Kick) -> usize {
        let kicks: Vec<_> = self.lock().values_mut().filter_map(|e| e.kick.take()).collect();
        kicks.into_iter().map(|k| k.send(why)).filter(Result::is_ok).count()
    }

    pub fn status(&self, appliance: &ApplianceId) -> Option<LiveStatus> {
        self.lock().get(appliance).map(|e| e.status.clone())
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ApplianceId, Entry>> {
        // A panic while holding this lock cannot leave the map half-updated (single inserts
        // and removes), so a poisoned lock is still safe to use.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}
