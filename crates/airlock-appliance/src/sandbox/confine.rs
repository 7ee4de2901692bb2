//! What a run does to itself between fork and exec, to be in its box before the vendor's
//! first instruction.
//!
//! [`Confinement::apply`] runs in the forked child of a multi-threaded process, so it makes
//! only system calls (through nix's safe wrappers, which do not allocate) on values prepared
//! before the fork: no allocation, no locks.
//! In order: mark every inherited descriptor close-on-exec (the appliance may have been
//! started with some open that are not), enter the cell (as root, who may), set the resource
//! limits, enter an IPC namespace of its own (where the appliance may); a root run then enters
//! a mount namespace of its own ([`super::mounts`], while it still holds `CAP_SYS_ADMIN`); drop
//! to the box user (or, for a root run, drop every capability but a few from the bounding set),
//! then `no_new_privs` and the Landlock ruleset, and last, for a root run, its seccomp filter
//! ([`super::seccomp`]). Any failure fails the spawn, so nothing runs half boxed.
//!
//! A root run is held by more than a box user's run, since root owns root's files and passes
//! their modes: Landlock keeps it from opening what is not its own, its mount namespace from
//! changing modes, owners, attributes and times outside its working directory (and hides the
//! state directory and the host's root-only secrets), and its seccomp filter from Unix sockets,
//! by which it would reach the host's daemons.
//!
//! The IPC namespace: System V shared memory, semaphores and message queues, and POSIX message
//! queues, are not files, so Landlock does not see them, and they outlive the process that
//! made them. In a namespace of its own, what a box makes is gone with its last process (its
//! memory too), and it can neither see nor attach what the host or another box made.

use std::fs::File;
use std::io;

use landlock::RulesetCreated;
use nix::sys::resource::{Resource, rlim_t, setrlimit};
use nix::unistd::{Gid, Uid, setgroups, setresgid, setresuid};

use super::mounts::MountPlan;
use super::seccomp::RootFilter;
use super::{RunAs, RunLimits};

/// What a root run puts itself under besides the rest of the box.
pub(super) struct RootOnly {
    pub(super) mounts: MountPlan,
    pub(super) filter: std::sync::Arc<RootFilter>,
}

pub(super) struct Confinement {
    procs: Option<File>,
    run_as: RunAs,
    limits: [(Resource, rlim_t); 5],
    fence: Option<RulesetCreated>,
    /// Whether the run gets an IPC namespace of its own (where the appliance may make one).
    own_ipc: bool,
    /// For a root run (and only for one): its mount namespace and seccomp filter.
    root: Option<RootOnly>,
}

impl Confinement {
    pub(super) fn new(
        procs: Option<File>,
        run_as: RunAs,
        limits: &RunLimits,
        fence: Option<RulesetCreated>,
        own_ipc: bool,
        root: Option<RootOnly>,
    ) -> Self {
        // `RLIMIT_NPROC` counts every process of the uid, so it holds a fork bomb only for the
        // box user; for the appliance's own user it would count the appliance too.
        let processes = match run_as {
            RunAs::BoxUser { .. } => rlim_t::from(limits.processes),
            RunAs::Appliance | RunAs::Root => nix::sys::resource::RLIM_INFINITY,
        };
        Self {
            procs,
            run_as,
            limits: [
                (Resource::RLIMIT_NPROC, processes),
                (Resource::RLIMIT_DATA, limits.memory_bytes),
                (Resource::RLIMIT_NOFILE, rlim_t::from(limits.open_files)),
                (Resource::RLIMIT_CORE, 0),
                (Resource::RLIMIT_FSIZE, limits.file_bytes),
            ],
            fence,
            own_ipc,
            root,
        }
    }

    /// Puts the calling (child) process in its box.
    pub(super) fn apply(&mut self) -> io::Result<()> {
        close_on_exec_from(3)?;
        if let Some(procs) = &self.procs {
            // Writing 0 to `cgroup.procs` moves the writer.
            if nix::unistd::write(procs, b"0")? != 1 {
                return Err(io::Error::from_raw_os_error(nix::libc::EIO));
            }
        }
        for &(resource, value) in &self.limits {
            if value != nix::sys::resource::RLIM_INFINITY {
                setrlimit(resource, value, value)?;
            }
        }
        if self.own_ipc {
            own_ipc_namespace()?;
        }
        if let Some(root) = &self.root {
            root.mounts.apply()?;
        }
        if let RunAs::BoxUser { uid, gid } = self.run_as {
            setgroups(&[])?;
            let (uid, gid) = (Uid::from_raw(uid), Gid::from_raw(gid));
            setresgid(gid, gid, gid)?;
            setresuid(uid, uid, uid)?;
        }
        if self.run_as == RunAs::Root {
            keep_only_root_capabilities()?;
        }
        match self.fence.take() {
            // Sets no_new_privs, then restricts itself.
            Some(fence) => {
                if fence.restrict_self().is_err() {
                    return Err(io::Error::from_raw_os_error(nix::libc::EPERM));
                }
            }
            None => nix::sys::prctl::set_no_new_privs()?,
        }
        match &self.root {
            Some(root) => root.filter.install(),
            None => Ok(()),
        }
    }
}

/// The capabilities a root run keeps: owning and reading files as root, signals (which Landlock
/// keeps inside the box), switching ids, low ports. What they would reach past the box is held
/// elsewhere: opening files by Landlock, changing modes and owners by the run's read-only mount
/// namespace (writable only in its working directory, `nosuid` everywhere), Unix sockets and
/// `open_by_handle_at` (`CAP_DAC_READ_SEARCH`) by its seccomp filter. Gone are, among others,
/// `CAP_SYS_RESOURCE`, `CAP_SYS_NICE`, `CAP_MKNOD`, `CAP_SYS_TIME`, `CAP_SYS_MODULE`,
/// `CAP_SYS_RAWIO`, `CAP_SYS_ADMIN` (so it cannot undo its mounts), `CAP_SYS_PTRACE`,
/// `CAP_NET_ADMIN`, `CAP_BPF` and `CAP_SYS_BOOT`: with them a root script could reach past its
/// box (a raw disk, the clock that approvals are timed by).
const ROOT_KEEPS: [u32; 9] = [
    0,  // CAP_CHOWN
    1,  // CAP_DAC_OVERRIDE
    2,  // CAP_DAC_READ_SEARCH
    3,  // CAP_FOWNER
    4,  // CAP_FSETID
    5,  // CAP_KILL
    6,  // CAP_SETGID
    7,  // CAP_SETUID
    10, // CAP_NET_BIND_SERVICE
];

/// Drops every other capability from the bounding set; the exec that follows leaves a root
/// process only what the bounding set holds.
fn keep_only_root_capabilities() -> io::Result<()> {
    use nix::libc;
    for cap in 0..=63u32 {
        if ROOT_KEEPS.contains(&cap) {
            continue;
        }
        // SAFETY: prctl with integer arguments only. EINVAL marks a capability this kernel
        // does not know: there is nothing to drop.
        #[allow(unsafe_code)]
        let dropped = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) };
        if dropped != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(e);
            }
        }
    }
    Ok(())
}

/// Whether this process may make IPC namespaces: tried once, on a thread of its own that ends
/// right after (a namespace is the calling thread's), so the appliance stays where it was.
pub(super) fn ipc_namespaces_available() -> bool {
    std::thread::spawn(|| own_ipc_namespace().is_ok()).join().unwrap_or(false)
}

/// Moves the calling process into a new IPC namespace (see the module documentation).
fn own_ipc_namespace() -> io::Result<()> {
    // SAFETY: unshare with an integer flag; it changes only the calling (child) process.
    #[allow(unsafe_code)]
    let r = unsafe { nix::libc::unshare(nix::libc::CLONE_NEWIPC) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Marks every descriptor from `first` on close-on-exec: what the appliance holds (or was
/// started with) never reaches vendor code.
fn close_on_exec_from(first: u32) -> io::Result<()> {
    use nix::libc;
    // SAFETY: close_range with integer arguments; CLOSE_RANGE_CLOEXEC closes nothing now.
    #[allow(unsafe_code)]
    let r = unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, libc::CLOSE_RANGE_CLOEXEC) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
