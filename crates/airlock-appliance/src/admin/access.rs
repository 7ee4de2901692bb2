//! Who may use the admin socket, decided from the kernel's word on the peer (`SO_PEERCRED`).
//!
//! Admitted: the appliance's own effective uid, root, and, when the configuration names one
//! (`admin_group`), members of the customer's admin group.
//! Anyone else gets one refusal that says how to be allowed; the refusal is audited with the
//! peer's uid, gid and pid, and nothing the peer sent is parsed.
//! Why: the socket switches phases, loads policy, reads and releases output. File modes guard
//! it too (0600 in a 0700 state directory, or 0660 in a 0710 one for the admin group), but a
//! mode is one `chmod` from open, and code the appliance runs for the vendor is to run as users
//! of its own: the kernel's answer holds whatever the modes say.
//!
//! The uid, gid and pid are the peer's when it called `connect`, from the kernel, never from
//! anything it sends.
//! Membership of the admin group is the peer's primary gid, or one of its supplementary groups,
//! read once from `/proc/<pid>/status` right after accept. That read races with the peer: it may
//! have exited and its pid been reused. So the effective uid and gid in that file must be the
//! ones the kernel reported, and a peer admitted only through a supplementary group is refused
//! when the file cannot be read (the peer is gone, or in another PID namespace). What is left of
//! the race needs another process of the same uid and gid, holding the group, to take the pid in
//! between.
//!
//! [`admit`] decides from facts read before ([`PeerCred::of`]); `crate::admin` acts on it.

use airlock_core::audit::{AuditAction, Outcome};
use serde::Serialize;

use crate::ApplianceError;
use crate::audit_log::AuditLog;
use crate::config::AdminGroup;
use crate::control::Peer;

/// Who the admin socket admits, settled once when the appliance starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AdminAccess {
    /// The appliance process's effective uid.
    owner: u32,
    group: Option<Group>,
}

/// The customer's admin group, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Group {
    pub(crate) gid: u32,
    /// For messages; a gid without a name in the group database has none.
    pub(crate) name: Option<String>,
}

impl std::fmt::Display for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.name {
            Some(name) => write!(f, "`{name}` (gid {})", self.gid),
            None => write!(f, "gid {}", self.gid),
        }
    }
}

impl AdminAccess {
    /// For this process, with the configured group looked up in the system's group database
    /// (`/etc/group`, or whatever `nsswitch.conf` names). A name that is not there stops the
    /// appliance: the customer meant someone to be admitted.
    pub(crate) fn resolve(group: Option<&AdminGroup>) -> Result<Self, ApplianceError> {
        use nix::unistd::{Gid, Uid};
        let Some(configured) = group else { return Ok(Self::new(Uid::effective().as_raw(), None)) };
        let lookup = |e: nix::Error| ApplianceError::Customer(format!("looking up admin group {configured}: {e}"));
        let group = match configured {
            AdminGroup::Name(name) => {
                let found = nix::unistd::Group::from_name(name).map_err(lookup)?.ok_or_else(|| {
                    ApplianceError::Customer(format!(
                        "admin_group `{name}` is not a group on this host; create it (`groupadd {name}`) or give a numeric gid"
                    ))
                })?;
                Group { gid: found.gid.as_raw(), name: Some(found.name) }
            }
            AdminGroup::Gid(gid) => {
                let name = nix::unistd::Group::from_gid(Gid::from_raw(*gid)).map_err(lookup)?.map(|g| g.name);
                Group { gid: *gid, name }
            }
        };
        Ok(Self::new(Uid::effective().as_raw(), Some(group)))
    }

    pub(crate) fn new(owner: u32, group: Option<Group>) -> Self {
        Self { owner, group }
    }

    /// The admin group's gid, if one is configured: the socket and the state directory are
    /// opened to it.
    pub(crate) fn group_gid(&self) -> Option<u32> {
        self.group.as_ref().map(|g| g.gid)
    }
}

/// What the kernel says about the peer, and the groups its process holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct PeerCred {
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    /// `None` when the peer is in another PID namespace (the kernel reports 0 then).
    pub(crate) pid: Option<u32>,
    #[serde(skip)]
    pub(crate) groups: Groups,
    /// Whether its process runs in a box, as vendor code (`crate::sandbox`): its cgroup is a
    /// cell. Read from `/proc`.
    pub(crate) boxed: Boxed,
}

/// Whether a peer's process is vendor code in its box.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Boxed {
    Outside,
    Inside,
    /// It cannot be told (its process is gone, a zombie, or in another PID namespace): a box
    /// could have connected and handed the connection on before exiting, so it is refused.
    Unknown(String),
}

impl Boxed {
    /// Reads where process `pid` runs. A cell's cgroup path names the box:
    /// `.../airlock-box-<tag>/<operation id>`.
    fn of(pid: Option<u32>) -> Self {
        let Some(pid) = pid else { return Boxed::Unknown("its process is in another PID namespace".into()) };
        let status = match std::fs::read_to_string(format!("/proc/{pid}/status")) {
            Ok(s) => s,
            Err(e) => return Boxed::Unknown(format!("/proc/{pid}/status: {e}")),
        };
        if status.lines().any(|l| l.starts_with("State:") && l.contains('Z')) {
            return Boxed::Unknown("its process has exited".into());
        }
        match std::fs::read_to_string(format!("/proc/{pid}/cgroup")) {
            Ok(cgroups) if cgroups.lines().any(|l| l.contains("/airlock-box-")) => Boxed::Inside,
            Ok(_) => Boxed::Outside,
            Err(e) => Boxed::Unknown(format!("/proc/{pid}/cgroup: {e}")),
        }
    }
}

/// The peer's supplementary groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Groups {
    /// Not needed: no admin group is configured.
    NotRead,
    Read(Vec<u32>),
    /// Why they could not be read.
    Unreadable(String),
}

impl PeerCred {
    /// Reads the peer of a connection just accepted: its credentials from the kernel and, when
    /// an admin group is configured, its supplementary groups from `/proc`.
    pub(crate) fn of(stream: &tokio::net::UnixStream, access: &AdminAccess) -> Result<Self, Refusal> {
        let cred = stream.peer_cred().map_err(|e| Refusal::Unidentified(e.to_string()))?;
        let (uid, gid) = (cred.uid(), cred.gid());
        let pid = cred.pid().and_then(|p| u32::try_from(p).ok()).filter(|p| *p != 0);
        let groups = match (&access.group, pid) {
            (None, _) => Groups::NotRead,
            (Some(_), None) => Groups::Unreadable("its process is in another PID namespace".into()),
            (Some(_), Some(pid)) => match std::fs::read_to_string(format!("/proc/{pid}/status")) {
                Ok(status) => parse_status(&status, uid, gid).map_or_else(Groups::Unreadable, Groups::Read),
                Err(e) => Groups::Unreadable(format!("/proc/{pid}/status: {e}")),
            },
        };
        Ok(Self { uid, gid, pid, groups, boxed: Boxed::of(pid) })
    }
}

/// Why a peer may not use the admin socket. The peer reads the sentence; code and tests decide
/// on the variant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Refusal {
    /// The kernel could not say who connected.
    #[error("the appliance cannot tell who connected to its admin socket ({0}); refused")]
    Unidentified(String),
    /// Not the appliance's user, not root, not in the admin group.
    #[error("{}", not_allowed(*uid, *owner, group.as_ref()))]
    NotAllowed { uid: u32, owner: u32, group: Option<Group> },
    /// Not the appliance's user nor root, not in the admin group by its primary gid, and its
    /// supplementary groups could not be read.
    /// Vendor code, whatever its uid: nothing the appliance runs for the vendor may act for the
    /// customer.
    #[error("a process the appliance runs for the vendor may not use its admin socket")]
    VendorCode { uid: u32 },
    #[error(
        "uid {uid} may use this appliance's admin socket only as a member of admin group {group}, and that cannot be checked: {why}; connect again from a process that waits for the reply, or make {group} its primary group"
    )]
    GroupsUnknown { uid: u32, group: Group, why: String },
}

impl Refusal {
    /// The refusal as a code, for the audit record.
    pub(crate) fn code(&self) -> &'static str {
        match self {
            Refusal::Unidentified(_) => "unidentified",
            Refusal::NotAllowed { .. } => "not_allowed",
            Refusal::VendorCode { .. } => "vendor_code",
            Refusal::GroupsUnknown { .. } => "groups_unknown",
        }
    }
}

fn not_allowed(uid: u32, owner: u32, group: Option<&Group>) -> String {
    match group {
        None => format!(
            "uid {uid} may not use this appliance's admin socket: only its own user (uid {owner}) and root may. To allow a customer admin group, start the appliance with `--admin-group GROUP` (or `admin_group` in appliance.toml, or AIRLOCK_ADMIN_GROUP) and add this user to it"
        ),
        Some(group) => format!(
            "uid {uid} may not use this appliance's admin socket: only its own user (uid {owner}), root and members of admin group {group} may. To allow this user, add it to that group (`usermod -aG {} USER`) and log in again",
            group.name.clone().unwrap_or_else(|| group.gid.to_string())
        ),
    }
}

/// Decides whether `peer` may use the admin socket. Pure: what it needs was read before.
pub(crate) fn admit(peer: &PeerCred, access: &AdminAccess) -> Result<Peer, Refusal> {
    let admitted = Peer { uid: peer.uid, pid: peer.pid };
    match &peer.boxed {
        Boxed::Outside => {}
        Boxed::Inside => return Err(Refusal::VendorCode { uid: peer.uid }),
        Boxed::Unknown(why) => {
            return Err(Refusal::Unidentified(format!("it cannot be told apart from vendor code: {why}")));
        }
    }
    if peer.uid == access.owner || peer.uid == 0 {
        return Ok(admitted);
    }
    let not_allowed = || Refusal::NotAllowed { uid: peer.uid, owner: access.owner, group: access.group.clone() };
    let Some(group) = &access.group else { return Err(not_allowed()) };
    if peer.gid == group.gid {
        return Ok(admitted);
    }
    let unknown = |why: &str| Refusal::GroupsUnknown { uid: peer.uid, group: group.clone(), why: why.to_owned() };
    match &peer.groups {
        Groups::Read(groups) if groups.contains(&group.gid) => Ok(admitted),
        Groups::Read(_) => Err(not_allowed()),
        Groups::Unreadable(why) => Err(unknown(why)),
        // `PeerCred::of` reads them whenever a group is configured; fail closed all the same.
        Groups::NotRead => Err(unknown("its groups were not read")),
    }
}

/// A refused connection: who it was, as far as known, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refused {
    pub(crate) peer: Option<Box<PeerCred>>,
    pub(crate) why: Refusal,
}

/// Reads the peer of a connection just accepted and decides on it.
pub(crate) fn check(stream: &tokio::net::UnixStream, access: &AdminAccess) -> Result<Peer, Refused> {
    let peer = PeerCred::of(stream, access).map_err(|why| Refused { peer: None, why })?;
    admit(&peer, access).map_err(|why| Refused { peer: Some(Box::new(peer)), why })
}

impl Refused {
    /// Records the refusal with the peer's uid, gid and pid. A refusal that cannot be recorded
    /// is still a refusal.
    pub(crate) fn audit(&self, audit: &AuditLog) {
        let detail = serde_json::json!({
            "interface": "admin_socket",
            "peer": self.peer,
            "refusal": self.why.code(),
            "reason": self.why.to_string(),
        });
        if let Err(e) = audit.record(AuditAction::AdminPeerRefused, Outcome::Denied, detail) {
            tracing::error!(error = %e, "cannot audit a refused admin socket peer");
        }
        tracing::warn!(peer = ?self.peer, reason = %self.why, "admin socket peer refused");
    }
}

/// The supplementary groups in a `/proc/<pid>/status` text, if its effective uid and gid are
/// the ones the kernel reported for the peer (see the module documentation).
fn parse_status(status: &str, uid: u32, gid: u32) -> Result<Vec<u32>, String> {
    let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).map(str::split_whitespace);
    // `Uid:` and `Gid:` list the real, effective, saved and filesystem ids.
    let effective = |name: &str| field(name).and_then(|mut ids| ids.nth(1)).and_then(|id| id.parse::<u32>().ok());
    if effective("Uid:") != Some(uid) || effective("Gid:") != Some(gid) {
        return Err("its process is no longer the one that connected".into());
    }
    let groups = field("Groups:").ok_or("its process status lists no groups")?;
    groups.map(|g| g.parse::<u32>().map_err(|_| format!("its process status lists a malformed group `{g}`"))).collect()
}

#[cfg(test)]
mod tests;
