//! What a run does to itself between fork and exec, to be in its box before the vendor's
//! first instruction.
//!
//! [`Confinement::apply`] runs in the forked child of a multi-threaded process, so it makes
//! only system calls (through nix's safe wrappers, which do not allocate) on values prepared
//! before the fork: no allocation, no locks.
//! In order: enter the cell (as root, who may), set the resource limits, drop to the box
//! user, then `no_new_privs` and the Landlock ruleset. Any failure fails the spawn, so
//! nothing runs half boxed.

use std::fs::File;
use std::io;

use landlock::RulesetCreated;
use nix::sys::resource::{Resource, rlim_t, setrlimit};
use nix::unistd::{Gid, Uid, setgroups, setresgid, setresuid};

use super::{RunAs, RunLimits};

pub(super) struct Confinement {
    procs: Option<File>,
    run_as: RunAs,
    limits: [(Resource, rlim_t); 4],
    fence: Option<RulesetCreated>,
}

impl Confinement {
    pub(super) fn new(procs: Option<File>, run_as: RunAs, limits: &RunLimits, fence: Option<RulesetCreated>) -> Self {
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
            ],
            fence,
        }
    }

    /// Puts the calling (child) process in its box.
    pub(super) fn apply(&mut self) -> io::Result<()> {
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
        if let RunAs::BoxUser { uid, gid } = self.run_as {
            setgroups(&[])?;
            let (uid, gid) = (Uid::from_raw(uid), Gid::from_raw(gid));
            setresgid(gid, gid, gid)?;
            setresuid(uid, uid, uid)?;
        }
        match self.fence.take() {
            // Sets no_new_privs, then restricts itself.
            Some(fence) => match fence.restrict_self() {
                Ok(_) => Ok(()),
                Err(_) => Err(io::Error::from_raw_os_error(nix::libc::EPERM)),
            },
            None => Ok(nix::sys::prctl::set_no_new_privs()?),
        }
    }
}
