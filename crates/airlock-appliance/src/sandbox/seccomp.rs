//! The system calls a root run may not make: a seccomp filter it installs last, after
//! `no_new_privs` and Landlock, between fork and exec.
//!
//! `connect(2)` to a Unix socket by its path is not a Landlock right on this kernel (its
//! `LANDLOCK_ACCESS_FS_RESOLVE_UNIX` comes later), and `CAP_DAC_OVERRIDE` passes a socket's
//! mode: a root run could reach any daemon of the host's that listens on one (a container
//! engine's, the init system's). So it may not make a Unix socket at all; what it refuses,
//! with `EACCES`:
//! - `socket(AF_UNIX, ...)`; `socketpair(AF_UNIX, ...)` stays, connected stream and
//!   seqpacket pairs, but not datagram ones (`SOCK_DGRAM`, and `SOCK_RAW`, which the kernel
//!   makes a datagram socket), which `sendto` a path like an unconnected socket;
//! - `io_uring_setup`: a ring's `IORING_OP_SOCKET` makes a socket without `socket(2)`;
//! - `open_by_handle_at`: with `CAP_DAC_READ_SEARCH`, it opens a file by its inode, past
//!   every path: Landlock's rules and the masks of the run's mount namespace (`mounts`);
//! - `add_key`, `request_key`, `keyctl`: the kernel's user keyring is uid 0's, shared with
//!   every root process of the host.
//!
//! So a root run logs neither to syslog nor to the journal (its output goes to its log, as any
//! run's), and NSS modules that ask a daemon over a Unix socket (nscd, sssd, systemd-resolved)
//! fail, which glibc falls back from to files and DNS.
//!
//! The filter is for x86_64 (syscall numbers are per architecture); the x32 numbers of these
//! calls are refused too, and any other ABI (32-bit `int 0x80`) kills the process, as its calls
//! would bypass the numbers checked. Elsewhere [`RootFilter::build`] fails, and no root run starts.

use std::collections::BTreeMap;
use std::io;

use seccompiler::BpfProgram;

/// The seccomp program every root run installs, built once when the appliance starts.
#[derive(Debug)]
pub(super) struct RootFilter(BpfProgram);

impl RootFilter {
    #[cfg(target_arch = "x86_64")]
    pub(super) fn build() -> Result<Self, String> {
        use nix::libc;
        use seccompiler::{
            SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
        };
        /// x32 system calls are x86_64's with this bit set, checked against the same arch.
        const X32_SYSCALL_BIT: i64 = 0x4000_0000;
        const TYPE_MASK: u64 = 0xf;
        let build = || -> Result<BpfProgram, seccompiler::BackendError> {
            let int_arg = |index: u8, op: SeccompCmpOp, value: u64| {
                SeccompCondition::new(index, SeccompCmpArgLen::Dword, op, value)
            };
            let unix = || int_arg(0, SeccompCmpOp::Eq, libc::AF_UNIX as u64);
            let unix_of_type = |kind: libc::c_int| -> Result<SeccompRule, seccompiler::BackendError> {
                SeccompRule::new(vec![unix()?, int_arg(1, SeccompCmpOp::MaskedEq(TYPE_MASK), kind as u64)?])
            };
            let refused: [(i64, Vec<SeccompRule>); 7] = [
                (libc::SYS_socket, vec![SeccompRule::new(vec![unix()?])?]),
                (libc::SYS_socketpair, vec![unix_of_type(libc::SOCK_DGRAM)?, unix_of_type(libc::SOCK_RAW)?]),
                (libc::SYS_io_uring_setup, vec![]),
                (libc::SYS_open_by_handle_at, vec![]),
                (libc::SYS_add_key, vec![]),
                (libc::SYS_request_key, vec![]),
                (libc::SYS_keyctl, vec![]),
            ];
            let mut rules = BTreeMap::new();
            for (call, when) in refused {
                rules.insert(call | X32_SYSCALL_BIT, when.clone());
                rules.insert(call, when);
            }
            let filter = SeccompFilter::new(
                rules,
                SeccompAction::Allow,
                SeccompAction::Errno(libc::EACCES as u32),
                TargetArch::x86_64,
            )?;
            filter.try_into()
        };
        build().map(Self).map_err(|e| format!("cannot build the seccomp filter for root runs: {e}"))
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub(super) fn build() -> Result<Self, String> {
        Err(format!("no seccomp filter for root runs is written for {}, only for x86_64", std::env::consts::ARCH))
    }

    /// Installs the filter on the calling (child) process: one `seccomp(2)` call on the
    /// program built before the fork, no allocation.
    pub(super) fn install(&self) -> io::Result<()> {
        match seccompiler::apply_filter(&self.0) {
            Ok(()) => Ok(()),
            Err(seccompiler::Error::Seccomp(e) | seccompiler::Error::Prctl(e)) => Err(e),
            Err(_) => Err(io::Error::from_raw_os_error(nix::libc::EINVAL)),
        }
    }
}
