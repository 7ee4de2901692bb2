//! The watch on what boxes use of the disk (and, where their cell cannot cap it, of memory and
//! threads), so vendor code cannot exhaust the appliance.
//!
//! A box writes only its working directory (Landlock; a root run's other mounts are
//! read-only), so what it holds on disk is that directory's bytes and entries, plus files it
//! deleted but still holds open (found through `/proc/PID/fd` of its cell's processes).
//! Every [`EVERY`], the watcher measures each live box ([`measure`], I/O) and [`judge`]s it
//! (pure): a box over its own bytes or entries kills itself; when the free space of the
//! filesystem the boxes write to is below the reserve, the box holding the most bytes is
//! killed, if it holds at least 1/8 of the reserve.
//! A box is killed through its cell (`cgroup.kill`), never by a pid, and only while its run
//! still owns the cell ([`Watched::kill`]): a box disposed of meanwhile, whose cell name a
//! restart may already reuse, is left alone.
//! Its run then sees [`Watched::overrun`]: a script's execution is recorded `over-limit`, a
//! service's `last_error` says `killed: <reason>`; disposing of the box removes its working
//! directory, which gives the space back.
//! Boxes without a cell (no cgroup v2) are not watched: nothing would kill all of them.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use super::Cell;

/// How often boxes are measured: a box writing at disk speed (say 500 MiB/s) gets at most
/// ~1.5 GiB past its limit or into the reserve before the next pass, which the 1 GiB default
/// reserve mostly absorbs; measuring more often costs a walk of every box each time.
pub(crate) const EVERY: Duration = Duration::from_secs(3);

/// The limits boxes are held to (`config::BoxDisk`, as the appliance's flags set them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Watch {
    /// Bytes one box may hold on disk.
    pub(crate) box_bytes: u64,
    /// Entries (files, directories, links) one box may hold.
    pub(crate) box_files: u64,
    /// Free bytes kept on the filesystem the boxes write to.
    pub(crate) reserve_bytes: u64,
}

impl Watch {
    /// The limits of `disk` on a filesystem of `total` bytes (the reserve, unless configured,
    /// is [`default_reserve`] of it).
    pub(crate) fn on(disk: &crate::config::BoxDisk, total: u64) -> Self {
        Self {
            box_bytes: disk.box_bytes,
            box_files: disk.box_files,
            reserve_bytes: disk.reserve_bytes.unwrap_or_else(|| default_reserve(total)),
        }
    }
}

/// The reserve unless configured: a tenth of the filesystem, at most 1 GiB. A fixed 1 GiB
/// would be always breached on a small filesystem (a root appliance's boxes write to `/run`,
/// a tmpfs often smaller than that), and every box of an eighth of it would be killed.
pub(crate) fn default_reserve(total: u64) -> u64 {
    (total / 10).min(1 << 30)
}

/// Limits a box's cell cannot enforce itself (its hierarchy lacks `memory.max` or
/// `pids.max`), so the watch sums them over its processes instead.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Caps {
    pub(crate) memory_bytes: Option<u64>,
    pub(crate) threads: Option<u64>,
}

/// What a box uses, as one pass measured it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Usage {
    /// Bytes on disk: its working directory's, and its deleted files still held open.
    pub(crate) bytes: u64,
    /// Entries in its working directory (the walk stops one past the limit).
    pub(crate) files: u64,
    /// Resident bytes summed over its processes (measured only where [`Caps`] asks).
    pub(crate) memory_bytes: u64,
    /// Threads summed over its processes (measured only where [`Caps`] asks).
    pub(crate) threads: u64,
    /// Part of its working directory could not be read ([`Walked::hidden`]).
    pub(crate) hidden: bool,
}

/// Why a box was killed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Overrun {
    Disk {
        bytes: u64,
        limit: u64,
    },
    Files {
        files: u64,
        limit: u64,
    },
    /// The filesystem's free space fell below the reserve and this box held the most.
    Reserve {
        free: u64,
        reserve: u64,
        bytes: u64,
    },
    Memory {
        bytes: u64,
        limit: u64,
    },
    Threads {
        threads: u64,
        limit: u64,
    },
    /// It made part of its working directory unreadable to the watch, which can then not
    /// tell what it holds.
    Hidden,
}

impl std::fmt::Display for Overrun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |b: &u64| format!("{:.1} MiB", *b as f64 / f64::from(1 << 20));
        match self {
            Self::Disk { bytes, limit } => write!(f, "its disk use {} is over its limit of {}", mib(bytes), mib(limit)),
            Self::Files { files, limit } => write!(f, "it holds {files} files, over its limit of {limit}"),
            Self::Reserve { free, reserve, bytes } => write!(
                f,
                "the disk's free space {} fell below the reserve of {} and it held the most ({})",
                mib(free),
                mib(reserve),
                mib(bytes)
            ),
            Self::Memory { bytes, limit } => write!(f, "its memory {} is over its limit of {}", mib(bytes), mib(limit)),
            Self::Threads { threads, limit } => write!(f, "it runs {threads} threads, over its limit of {limit}"),
            Self::Hidden => {
                write!(f, "it made part of its working directory unreadable, so its disk use cannot be measured")
            }
        }
    }
}

/// Whether a box must be killed: over one of its own limits, or (`biggest`: it holds the most
/// bytes of all boxes) the free space `free` is below the reserve and it holds at least 1/8
/// of the reserve. Below that it is not what fills the disk (the disk may be full for other
/// reasons): killing it would give back little and punish a box for others' use.
pub(crate) fn judge(watch: &Watch, caps: &Caps, usage: &Usage, free: u64, biggest: bool) -> Option<Overrun> {
    if usage.bytes > watch.box_bytes {
        return Some(Overrun::Disk { bytes: usage.bytes, limit: watch.box_bytes });
    }
    if usage.files > watch.box_files {
        return Some(Overrun::Files { files: usage.files, limit: watch.box_files });
    }
    if usage.hidden {
        return Some(Overrun::Hidden);
    }
    if let Some(limit) = caps.memory_bytes
        && usage.memory_bytes > limit
    {
        return Some(Overrun::Memory { bytes: usage.memory_bytes, limit });
    }
    if let Some(limit) = caps.threads
        && usage.threads > limit
    {
        return Some(Overrun::Threads { threads: usage.threads, limit });
    }
    if biggest && free < watch.reserve_bytes && usage.bytes >= (watch.reserve_bytes / 8).max(1) {
        return Some(Overrun::Reserve { free, reserve: watch.reserve_bytes, bytes: usage.bytes });
    }
    None
}

/// The index of the box holding the most bytes (the first of equals), if any.
pub(crate) fn biggest(usages: &[Usage]) -> Option<usize> {
    usages.iter().enumerate().max_by_key(|(i, u)| (u.bytes, std::cmp::Reverse(*i))).map(|(i, _)| i)
}

/// A live box as the watch sees it: its cell (the unit it is killed by), its working
/// directory, and what its cell cannot cap.
#[derive(Debug)]
pub(crate) struct Watched {
    cell: Arc<Cell>,
    workdir: PathBuf,
    caps: Caps,
    state: Mutex<WatchedState>,
}

#[derive(Debug, Default)]
struct WatchedState {
    /// Its run disposed of it: the cell is no longer its own to kill.
    gone: bool,
    overrun: Option<Overrun>,
}

impl Watched {
    pub(crate) fn new(cell: Arc<Cell>, workdir: PathBuf, caps: Caps) -> Self {
        Self { cell, workdir, caps, state: Mutex::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WatchedState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Kills the box for `why`, unless its run has disposed of it (or it was killed already);
    /// says whether it did. Under the lock [`Watched::retire`] takes, so it never kills a cell
    /// a later run of the same name made.
    pub(crate) fn kill(&self, why: Overrun) -> bool {
        let mut state = self.lock();
        if state.gone || state.overrun.is_some() {
            return false;
        }
        self.cell.kill();
        state.overrun = Some(why);
        true
    }

    /// Its run is disposing of it: the watch leaves it alone from now on.
    pub(crate) fn retire(&self) {
        self.lock().gone = true;
    }

    /// Why the watch killed it, if it did.
    pub(crate) fn overrun(&self) -> Option<Overrun> {
        self.lock().overrun.clone()
    }

    fn gone(&self) -> bool {
        self.lock().gone
    }

    /// The processes in its cell now.
    fn pids(&self) -> Vec<i32> {
        std::fs::read_to_string(self.cell.dir().join("cgroup.procs"))
            .map(|procs| procs.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }
}

/// The boxes live now, and what they are held to; shared by the sandbox (which adds boxes)
/// and its watcher (which holds it weakly, so it ends with the sandbox).
#[derive(Debug)]
pub(crate) struct Boxes {
    disk: crate::config::BoxDisk,
    /// Where every box's working directory is: its filesystem is the one the reserve keeps.
    work_root: PathBuf,
    live: Mutex<Vec<Weak<Watched>>>,
}

impl Boxes {
    pub(crate) fn new(disk: crate::config::BoxDisk, work_root: PathBuf) -> Self {
        Self { disk, work_root, live: Mutex::default() }
    }

    pub(crate) fn add(&self, watched: &Arc<Watched>) {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        // Boxes dropped since are forgotten here too, so the list stays as long as the boxes
        // alive even where no watcher runs.
        live.retain(|w| w.strong_count() > 0);
        live.push(Arc::downgrade(watched));
    }

    /// The boxes not yet disposed of (forgetting the rest).
    fn live(&self) -> Vec<Arc<Watched>> {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        live.retain(|w| w.upgrade().is_some_and(|w| !w.gone()));
        live.iter().filter_map(Weak::upgrade).collect()
    }

    /// One pass: measures every live box, judges it, kills those that must go; returns them
    /// (by cell name) with why.
    pub(crate) fn pass(&self) -> Vec<(String, Overrun)> {
        let live = self.live();
        if live.is_empty() {
            return Vec::new();
        }
        let (free, total) = space(&self.work_root).unwrap_or((u64::MAX, u64::MAX));
        let watch = Watch::on(&self.disk, total);
        let usages: Vec<Usage> = live.iter().map(|w| measure(w, &watch)).collect();
        let big = biggest(&usages);
        let mut killed = Vec::new();
        for (i, (w, usage)) in live.iter().zip(&usages).enumerate() {
            if let Some(why) = judge(&watch, &w.caps, usage, free, big == Some(i))
                && w.kill(why.clone())
            {
                let name = w.cell.dir().file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                tracing::warn!(cell = %name, reason = %why, "killed a box over its limits");
                killed.push((name, why));
            }
        }
        killed
    }
}

/// What is told of each box killed: its cell's name and why (the executor audits it).
pub(crate) type OnKill = Arc<dyn Fn(&str, &Overrun) + Send + Sync>;

/// Runs a pass every `every` while the sandbox lives.
pub(crate) async fn watch(boxes: Weak<Boxes>, every: Duration, on_kill: OnKill) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(boxes) = boxes.upgrade() else { return };
        // Walking directories is blocking I/O.
        let Ok(killed) = tokio::task::spawn_blocking(move || boxes.pass()).await else { return };
        for (name, why) in &killed {
            on_kill(name.as_str(), why);
        }
    }
}

/// Free bytes (to an unprivileged writer) and the size of the filesystem holding `path`.
fn space(path: &Path) -> Option<(u64, u64)> {
    let s = nix::sys::statvfs::statvfs(path).ok()?;
    Some((s.blocks_available().saturating_mul(s.fragment_size()), s.blocks().saturating_mul(s.fragment_size())))
}

/// Measures one box: its working directory (bounded by the watch's limits), the deleted files
/// its processes hold open, and, where its caps ask, their memory and threads.
pub(crate) fn measure(w: &Watched, watch: &Watch) -> Usage {
    let mut seen = HashSet::new();
    let Walked { mut bytes, files, hidden } = walk(&w.workdir, watch.box_files, watch.box_bytes, &mut seen);
    let pids = w.pids();
    if let Ok(dev) = std::fs::symlink_metadata(&w.workdir).map(|m| m.dev()) {
        bytes = bytes.saturating_add(held_deleted(&pids, dev, &mut seen));
    }
    let mut usage = Usage { bytes, files, hidden, ..Usage::default() };
    if w.caps.memory_bytes.is_some() || w.caps.threads.is_some() {
        for pid in &pids {
            let (memory, threads) = process_use(*pid);
            usage.memory_bytes = usage.memory_bytes.saturating_add(memory);
            usage.threads = usage.threads.saturating_add(threads);
        }
    }
    usage
}

/// What [`walk`] found under a directory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Walked {
    /// Bytes on disk.
    pub(crate) bytes: u64,
    /// Entries.
    pub(crate) files: u64,
    /// A directory or entry the walk was denied: what is under it is not counted.
    pub(crate) hidden: bool,
}

/// Whether an error reading the box's own files means it denied the watch: a box running as
/// the appliance's own user (a non-root appliance) can `chmod 000` a directory of its working
/// directory and so hide what it writes there. Anything else (an entry gone meanwhile) is not.
fn denied(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::PermissionDenied
}

/// Bytes on disk and entries under `dir`, not following symlinks nor crossing into other
/// filesystems. The work per pass is bounded: it stops once past `max_files` entries or
/// `max_bytes` (the box is over its limit then, whatever the rest holds). A file linked twice
/// counts once (`seen`).
pub(crate) fn walk(dir: &Path, max_files: u64, max_bytes: u64, seen: &mut HashSet<(u64, u64)>) -> Walked {
    let Ok(root) = std::fs::symlink_metadata(dir) else { return Walked::default() };
    let dev = root.dev();
    let (mut bytes, mut files, mut hidden) = (0u64, 0u64, false);
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        // Entries vanish while the box runs: whatever is gone is not there now; what the box
        // denies the watch is.
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) => {
                hidden |= denied(&e);
                continue;
            }
        };
        for entry in entries.flatten() {
            let meta = match entry.metadata() {
                Ok(meta) => meta,
                Err(e) => {
                    hidden |= denied(&e);
                    continue;
                }
            };
            files += 1;
            if meta.dev() != dev {
                // A mount point (there should be none): what is under it is not this disk's.
                continue;
            }
            if meta.nlink() <= 1 || meta.is_dir() || seen.insert((meta.dev(), meta.ino())) {
                bytes = bytes.saturating_add(meta.blocks().saturating_mul(512));
            }
            if meta.is_dir() {
                stack.push(entry.path());
            }
            if files > max_files || bytes > max_bytes {
                return Walked { bytes, files, hidden };
            }
        }
    }
    Walked { bytes, files, hidden }
}

/// Bytes of files on device `dev` that `pids` hold open but have deleted: gone from the
/// directory, still on the disk until closed.
pub(crate) fn held_deleted(pids: &[i32], dev: u64, seen: &mut HashSet<(u64, u64)>) -> u64 {
    let mut bytes = 0u64;
    for pid in pids {
        let fds = PathBuf::from(format!("/proc/{pid}/fd"));
        let Ok(entries) = std::fs::read_dir(&fds) else { continue };
        for entry in entries.flatten() {
            let deleted = std::fs::read_link(entry.path())
                .is_ok_and(|target| target.as_os_str().as_encoded_bytes().ends_with(b" (deleted)"));
            if !deleted {
                continue;
            }
            // The link's target: the open file itself.
            let Ok(meta) = std::fs::metadata(entry.path()) else { continue };
            if meta.is_file() && meta.dev() == dev && seen.insert((meta.dev(), meta.ino())) {
                bytes = bytes.saturating_add(meta.blocks().saturating_mul(512));
            }
        }
    }
    bytes
}

/// Resident bytes and threads of one process, from `/proc/PID/status` (zero if it is gone).
fn process_use(pid: i32) -> (u64, u64) {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return (0, 0) };
    let field = |name: &str| {
        status.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
    };
    (field("VmRSS:").unwrap_or(0).saturating_mul(1024), field("Threads:").unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const WATCH: Watch = Watch { box_bytes: 4 * MIB, box_files: 100, reserve_bytes: 8 * MIB };

    fn used(bytes: u64, files: u64) -> Usage {
        Usage { bytes, files, ..Usage::default() }
    }

    #[test]
    fn a_box_at_its_limits_runs_on_and_one_past_is_killed() {
        let none = Caps::default();
        let plenty = u64::MAX;
        assert_eq!(judge(&WATCH, &none, &used(4 * MIB, 100), plenty, true), None);
        assert_eq!(
            judge(&WATCH, &none, &used(4 * MIB + 1, 0), plenty, false),
            Some(Overrun::Disk { bytes: 4 * MIB + 1, limit: 4 * MIB })
        );
        assert_eq!(judge(&WATCH, &none, &used(0, 101), plenty, false), Some(Overrun::Files { files: 101, limit: 100 }));
    }

    #[test]
    fn memory_and_threads_are_judged_only_where_the_cell_cannot_cap_them() {
        let heavy = Usage { memory_bytes: 65 * MIB, threads: 33, ..Usage::default() };
        assert_eq!(judge(&WATCH, &Caps::default(), &heavy, u64::MAX, false), None, "the cell caps them itself");
        let memory = Caps { memory_bytes: Some(64 * MIB), threads: None };
        assert_eq!(
            judge(&WATCH, &memory, &heavy, u64::MAX, false),
            Some(Overrun::Memory { bytes: 65 * MIB, limit: 64 * MIB })
        );
        let threads = Caps { memory_bytes: None, threads: Some(32) };
        assert_eq!(judge(&WATCH, &threads, &heavy, u64::MAX, false), Some(Overrun::Threads { threads: 33, limit: 32 }));
        let at = Usage { memory_bytes: 64 * MIB, threads: 32, ..Usage::default() };
        assert_eq!(
            judge(&WATCH, &Caps { memory_bytes: Some(64 * MIB), threads: Some(32) }, &at, u64::MAX, false),
            None
        );
    }

    #[test]
    fn the_default_reserve_is_a_tenth_of_the_disk_up_to_a_gib_and_a_configured_one_is_kept() {
        let default = crate::config::BoxDisk::default();
        // A 256 MiB /run: a fixed GiB could never be free there.
        assert_eq!(Watch::on(&default, 256 * MIB).reserve_bytes, 256 * MIB / 10);
        assert_eq!(Watch::on(&default, 100 << 30).reserve_bytes, 1 << 30);
        let set = crate::config::BoxDisk { reserve_bytes: Some(8 * MIB), ..default };
        assert_eq!(Watch::on(&set, 16 * MIB).reserve_bytes, 8 * MIB);
        let none = crate::config::BoxDisk { reserve_bytes: Some(0), ..default };
        assert_eq!(Watch::on(&none, 100 << 30).reserve_bytes, 0);
    }

    #[test]
    fn below_the_reserve_only_the_biggest_box_holding_an_eighth_of_it_is_killed() {
        let none = Caps::default();
        let eighth = WATCH.reserve_bytes / 8;
        let low = WATCH.reserve_bytes - 1;
        assert_eq!(
            judge(&WATCH, &none, &used(eighth, 1), low, true),
            Some(Overrun::Reserve { free: low, reserve: WATCH.reserve_bytes, bytes: eighth })
        );
        assert_eq!(judge(&WATCH, &none, &used(eighth - 1, 1), low, true), None, "it holds nothing significant");
        assert_eq!(judge(&WATCH, &none, &used(eighth, 1), low, false), None, "another box holds more");
        assert_eq!(judge(&WATCH, &none, &used(eighth, 1), WATCH.reserve_bytes, true), None, "the reserve is intact");
        assert_eq!(judge(&WATCH, &none, &used(0, 0), 0, true), None, "an empty box on a full disk");
        assert_eq!(biggest(&[used(1, 0), used(3, 0), used(3, 0)]), Some(1));
        assert_eq!(biggest(&[]), None);
    }

    #[test]
    fn the_walk_counts_once_follows_no_link_and_stops_past_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), vec![1u8; 64 << 10]).unwrap();
        std::fs::hard_link(dir.path().join("a"), dir.path().join("b")).unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/c"), vec![1u8; 64 << 10]).unwrap();
        // A link to somewhere big: not followed.
        std::os::unix::fs::symlink("/usr", dir.path().join("usr")).unwrap();
        let Walked { bytes, files, hidden } = walk(dir.path(), 1000, u64::MAX, &mut HashSet::new());
        assert_eq!(files, 5);
        assert!((128 << 10..256 << 10).contains(&bytes), "{bytes}");
        assert!(!hidden);
        let Walked { files, .. } = walk(dir.path(), 2, u64::MAX, &mut HashSet::new());
        assert_eq!(files, 3, "it stops one past the limit");
    }

    #[test]
    fn a_box_that_hides_part_of_its_directory_from_the_watch_is_killed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (closed, listed) = (dir.path().join("closed"), dir.path().join("listed"));
        for d in [&closed, &listed] {
            std::fs::create_dir(d).unwrap();
            std::fs::write(d.join("big"), vec![1u8; 64 << 10]).unwrap();
        }
        let mode = |p: &Path, m: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
        // As a box of a non-root appliance does, under its own uid. A root test runs the walk
        // on a thread of a uid without privileges: the raw syscalls change that thread's
        // credentials only (and drop its capabilities), not the test process's.
        let owner = if nix::unistd::geteuid().is_root() { 65534 } else { nix::unistd::geteuid().as_raw() };
        for p in [dir.path(), &closed, &listed, &closed.join("big"), &listed.join("big")] {
            std::os::unix::fs::chown(p, Some(owner), Some(owner)).unwrap();
        }
        let walk_as_owner = |path: PathBuf| {
            std::thread::spawn(move || {
                if nix::unistd::geteuid().is_root() {
                    use nix::libc::{SYS_setresgid, SYS_setresuid, syscall};
                    // SAFETY: plain syscalls on this thread's own credentials.
                    #[allow(unsafe_code)]
                    let dropped = unsafe {
                        syscall(SYS_setresgid, owner, owner, owner) == 0
                            && syscall(SYS_setresuid, owner, owner, owner) == 0
                    };
                    assert!(dropped, "{}", std::io::Error::last_os_error());
                }
                walk(&path, 1000, u64::MAX, &mut HashSet::new())
            })
            .join()
            .unwrap()
        };
        let open = walk_as_owner(dir.path().to_owned());
        assert!(!open.hidden && open.bytes >= 128 << 10, "{open:?}");
        mode(&closed, 0o000);
        // Listed but not searchable: its names show, their sizes do not.
        mode(&listed, 0o400);
        let hiding = walk_as_owner(dir.path().to_owned());
        mode(&closed, 0o700);
        mode(&listed, 0o700);
        assert!(hiding.hidden, "{hiding:?}");
        let usage = Usage { bytes: hiding.bytes, files: hiding.files, hidden: true, ..Usage::default() };
        assert_eq!(judge(&WATCH, &Caps::default(), &usage, u64::MAX, false), Some(Overrun::Hidden));
    }
}
