//! Who vendor code runs as.
//!
//! An appliance running as root runs vendor code as a dedicated unprivileged user and group:
//! the one the configuration names, or else a uid of its own from the range systemd keeps for
//! dynamic users (61184–65519), picked by the state directory's hash and checked to be in
//! neither the user nor the group database, so no file on the host belongs to it.
//! Each run takes a uid of its own from a pool ([`UidPool`]) while it runs, so one run can
//! neither use up another's processes (`RLIMIT_NPROC` counts per uid) nor reach its files or
//! processes by their owner; a named box user is one uid, shared by concurrent runs.
//! An appliance that is not root cannot switch users: vendor code then runs as the
//! appliance's own user, and only Landlock keeps it from the appliance's files.

use nix::unistd::{Gid, Group, Uid, User};

/// The first and last uid of the dynamic range.
const DYNAMIC_FIRST: u32 = 61184;
const DYNAMIC_LAST: u32 = 65519;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum RunAs {
    /// A dedicated unprivileged user and group the appliance switches to.
    BoxUser { uid: u32, gid: u32 },
    /// The appliance's own user: it is not root, so it cannot switch.
    #[serde(rename = "appliance_user")]
    Appliance,
    /// Root, for a template that asks for it with the customer's approval, on an appliance
    /// that runs as root: still in its cell, under Landlock and its limits.
    Root,
}

/// Settles who vendor code runs as; `tag` (hex) picks the dynamic uid.
pub(crate) fn resolve(configured: Option<&str>, tag: &str) -> Result<RunAs, String> {
    if !Uid::effective().is_root() {
        if let Some(name) = configured {
            return Err(format!(
                "the box user `{name}` is configured, but only an appliance running as root can switch to it"
            ));
        }
        return Ok(RunAs::Appliance);
    }
    match configured {
        Some(name) => named(name),
        None => dynamic(tag),
    }
}

fn named(name: &str) -> Result<RunAs, String> {
    let user = User::from_name(name)
        .map_err(|e| format!("cannot look up the box user `{name}`: {e}"))?
        .ok_or_else(|| format!("the box user `{name}` does not exist; create it (useradd --system {name})"))?;
    if user.uid.is_root() || user.gid.as_raw() == 0 {
        return Err(format!("the box user `{name}` is root or in group root: vendor code must run unprivileged"));
    }
    Ok(RunAs::BoxUser { uid: user.uid.as_raw(), gid: user.gid.as_raw() })
}

fn dynamic(tag: &str) -> Result<RunAs, String> {
    free_dynamic_ids(tag, 1)
        .first()
        .map(|&id| RunAs::BoxUser { uid: id, gid: id })
        .ok_or_else(|| "no free uid in 61184-65519 for vendor code; name a box user in the configuration".to_owned())
}

/// How many runs at once get a uid of their own.
const POOL_SIZE: usize = 16;

/// Up to `n` ids from the dynamic range that are in neither the user nor the group database,
/// starting where `tag` (hex) points.
fn free_dynamic_ids(tag: &str, n: usize) -> Vec<u32> {
    let span = DYNAMIC_LAST - DYNAMIC_FIRST + 1;
    let seed = u32::from_str_radix(tag.get(..8).unwrap_or("0"), 16).unwrap_or(0);
    (0..64 + n as u32)
        .map(|step| DYNAMIC_FIRST + (seed.wrapping_add(step) % span))
        .filter(|&id| {
            matches!(User::from_uid(Uid::from_raw(id)), Ok(None))
                && matches!(Group::from_gid(Gid::from_raw(id)), Ok(None))
        })
        .take(n)
        .collect()
}

/// The uids runs take, one each while they run.
#[derive(Debug, Default)]
pub(crate) struct UidPool {
    free: std::sync::Arc<std::sync::Mutex<Vec<u32>>>,
}

/// A uid (and the gid of the same number) a run holds until its box is disposed of.
#[derive(Debug)]
pub(crate) struct Lease {
    pub(crate) id: u32,
    free: std::sync::Arc<std::sync::Mutex<Vec<u32>>>,
}

impl UidPool {
    /// The pool for a dynamic box user (`run_as`, picked by `tag`); empty for a named one.
    pub(crate) fn for_box(run_as: RunAs, configured: Option<&str>, tag: &str) -> Self {
        let ids = match (run_as, configured) {
            (RunAs::BoxUser { .. }, None) => free_dynamic_ids(tag, POOL_SIZE),
            _ => Vec::new(),
        };
        // Taken from the end: the first id (the box user `phase status` names) goes first.
        Self { free: std::sync::Arc::new(std::sync::Mutex::new(ids.into_iter().rev().collect())) }
    }

    /// A uid for one run, if one is free.
    pub(crate) fn lease(&self) -> Option<Lease> {
        let id = self.free.lock().unwrap_or_else(|e| e.into_inner()).pop()?;
        Some(Lease { id, free: self.free.clone() })
    }
}

impl Lease {
    /// Gives the uid back: everything that ran as it is dead (its cell was killed).
    pub(crate) fn release(self) {
        self.free.lock().unwrap_or_else(|e| e.into_inner()).push(self.id);
    }
}
