//! What a root run sees of the host's file system: a mount namespace of its own, made by the
//! child between fork and exec while it still holds `CAP_SYS_ADMIN` ([`MountPlan::apply`]).
//!
//! Landlock governs opening, writing, linking and removing files, not changing their modes,
//! owners, extended attributes or times; and root owns root's files (and keeps `CAP_CHOWN`
//! and `CAP_FOWNER`). Without more, a root run could `chmod` the state directory's keys to be
//! readable by every local user, or make its own installed release setuid root. So in a root
//! run's namespace:
//! - `/` is made private, recursively, first: nothing it mounts reaches the host, and the host's
//!   later mounts do not reach it;
//! - every mount is read-only, `nosuid` and `nodev` (`mount_setattr(2)`, recursively), but for
//!   its working directory, bound onto itself and writable again: `chmod`, `chown`, extended
//!   attributes and times fail with `EROFS` everywhere else, its release and the releases root
//!   included;
//! - the appliance's state directory (which holds the admin socket) is under an empty,
//!   read-only tmpfs of mode 0: nothing in it can be named, let alone changed;
//! - the host's root-only secrets under the system roots a box may read are hidden: the files
//!   of [`HIDDEN_FILES`] and the SSH host private keys under `/dev/null` (on a `nodev` mount, so
//!   opening one is refused), the directories of [`HIDDEN_DIRS`] under an empty tmpfs. `/root`
//!   needs no mask: it is under no root Landlock lets a box read;
//! - the devices a box may use (`fence::DEVICES`) are each bound onto themselves, the only
//!   mounts where device files open; writing them works on a read-only mount. Landlock gives a
//!   box neither `/dev/shm` nor `/dev/pts` (it has no terminal), so they stay as every mount.
//!
//! A root run writes only in its working directory (its `HOME` and `TMPDIR`), as Landlock already
//! has it; a service starts in its release, which it only reads. The namespace dies with the
//! run's last process. Where the appliance may not make one ([`available`]), no root run starts.

use std::ffi::{CStr, CString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::libc;
use nix::mount::{MsFlags, mount};

/// Root-only files under `/etc` (which every box reads) that hold the host's secrets: password
/// and group password hashes, and their backups.
const HIDDEN_FILES: &[&str] = &["/etc/shadow", "/etc/shadow-", "/etc/gshadow", "/etc/gshadow-"];

/// Where the SSH host private keys are (`ssh_host_*_key`; their `.pub` halves stay readable).
const SSH_DIR: &str = "/etc/ssh";

/// Root-only directories under `/etc` that hold private keys: the host's TLS keys.
const HIDDEN_DIRS: &[&str] = &["/etc/ssl/private"];

/// `mount_setattr(2)`'s attributes (`linux/mount.h`).
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;

/// `struct mount_attr` (`linux/mount.h`, version 0).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// One root run's mounts, its paths prepared before the fork (the child allocates nothing).
pub(super) struct MountPlan {
    workdir: CString,
    /// Where the run starts: its working directory, or a service's directory in its release.
    /// Entered again once the mounts are made, so it is reached through them.
    cwd: CString,
    /// Under an empty read-only tmpfs, deepest first (a mask over a parent would hide a child).
    hidden_dirs: Vec<CString>,
    /// Under `/dev/null` on a `nodev` mount.
    hidden_files: Vec<CString>,
    devices: Vec<CString>,
}

fn c_path(path: &Path) -> Result<CString, String> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| format!("{} holds a NUL byte", path.display()))
}

/// The SSH host private keys that exist now.
fn ssh_host_keys() -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(SSH_DIR) else { return Vec::new() };
    entries
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with("ssh_host_") && name.ends_with("_key")
        })
        .map(|e| e.path())
        .collect()
}

impl MountPlan {
    /// The mounts of a root run working in `workdir`, starting in `cwd`, on an appliance whose
    /// state directory is `state_dir`, whose box may use `devices`.
    pub(super) fn new(workdir: &Path, cwd: &Path, state_dir: &Path, devices: &[&str]) -> Result<Self, String> {
        let exists = |p: &Path, dir: bool| {
            std::fs::symlink_metadata(p).is_ok_and(|m| if dir { m.is_dir() } else { m.is_file() })
        };
        if !exists(state_dir, true) {
            return Err(format!("the state directory {} is not a directory", state_dir.display()));
        }
        let mut hidden_dirs: Vec<&Path> = HIDDEN_DIRS.iter().map(Path::new).filter(|d| exists(d, true)).collect();
        hidden_dirs.push(state_dir);
        hidden_dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        let keys = ssh_host_keys();
        let hidden_files =
            HIDDEN_FILES.iter().map(Path::new).chain(keys.iter().map(PathBuf::as_path)).filter(|f| exists(f, false));
        Ok(Self {
            workdir: c_path(workdir)?,
            cwd: c_path(cwd)?,
            hidden_dirs: hidden_dirs.into_iter().map(c_path).collect::<Result<_, _>>()?,
            hidden_files: hidden_files.map(c_path).collect::<Result<_, _>>()?,
            devices: devices.iter().map(Path::new).filter(|d| d.exists()).map(c_path).collect::<Result<_, _>>()?,
        })
    }

    /// Moves the calling (child) process into a mount namespace of its own, made as the module
    /// documentation says. Only system calls on the prepared paths: no allocation.
    pub(super) fn apply(&self) -> io::Result<()> {
        let none = None::<&CStr>;
        private_namespace()?;
        let bind = |path: &CStr| mount(Some(path), path, none, MsFlags::MS_BIND, none);
        bind(&self.workdir)?;
        for device in &self.devices {
            bind(device)?;
        }
        for file in &self.hidden_files {
            mount(Some(c"/dev/null"), file.as_c_str(), none, MsFlags::MS_BIND, none)?;
        }
        let sealed = MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
        for dir in &self.hidden_dirs {
            mount(Some(c"tmpfs"), dir.as_c_str(), Some(c"tmpfs"), sealed, Some(c"mode=000,size=4k"))?;
        }
        let all = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV;
        mount_setattr(c"/", libc::AT_RECURSIVE as libc::c_uint, all, 0)?;
        mount_setattr(&self.workdir, 0, 0, MOUNT_ATTR_RDONLY)?;
        for device in &self.devices {
            mount_setattr(device, 0, 0, MOUNT_ATTR_NODEV)?;
        }
        nix::unistd::chdir(self.cwd.as_c_str())?;
        Ok(())
    }
}

/// A new mount namespace for the calling thread, with `/` made private, recursively.
fn private_namespace() -> io::Result<()> {
    // SAFETY: unshare with an integer flag; it changes only the calling thread (in the child,
    // the whole process).
    #[allow(unsafe_code)]
    let r = unsafe { libc::unshare(libc::CLONE_NEWNS) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    let none = None::<&CStr>;
    mount(none, c"/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)?;
    Ok(())
}

/// Sets `set` and clears `clear` on the mount at `path` (and those under it, with `AT_RECURSIVE`).
fn mount_setattr(path: &CStr, flags: libc::c_uint, set: u64, clear: u64) -> io::Result<()> {
    let attr = MountAttr { attr_set: set, attr_clr: clear, propagation: 0, userns_fd: 0 };
    // SAFETY: mount_setattr(2) reads a NUL-terminated path and a `struct mount_attr` of the
    // size given, both alive for the call.
    #[allow(unsafe_code)]
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            path.as_ptr(),
            flags,
            &raw const attr,
            size_of::<MountAttr>(),
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether this process may give root runs a namespace of their own: tried once, on a thread
/// of its own that ends right after (a namespace is the calling thread's), so the appliance
/// stays where it was. Needs `CAP_SYS_ADMIN` and `mount_setattr(2)` (Linux 5.12).
pub(super) fn available() -> Result<(), String> {
    let tried = std::thread::spawn(|| {
        private_namespace()?;
        mount_setattr(c"/", libc::AT_RECURSIVE as libc::c_uint, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, 0)
    })
    .join();
    match tried {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!(
            "the appliance cannot give a root run a mount namespace of its own ({e}): it needs CAP_SYS_ADMIN and Linux 5.12"
        )),
        Err(_) => Err("the appliance cannot tell whether it may make mount namespaces".to_owned()),
    }
}
