//! A cgroup of its own per run, killed as a whole.
//!
//! Each run (an operation, by its id; a release service, by `svc-<release>-<service>`) gets a cgroup v2 "cell" under one directory per appliance
//! (`airlock-box-<hash of the state directory>`), beside the appliance's own cgroup.
//! A process cannot leave its cgroup by `setsid` or a double fork, so killing the cell
//! (`cgroup.kill`) ends everything the run started, and a restart kills what a previous
//! process left by its cell, never by a process id that may have been reused.
//! The child enters its cell itself, between fork and exec (see `confine`), so nothing of the
//! script runs outside it.
//! The cgroup v2 hierarchy is found through `/proc/self/mountinfo` (on some hosts it is
//! mounted beside v1 controllers, at `/sys/fs/cgroup/unified`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The directory under which this appliance's cells live; removed (when empty) on drop.
#[derive(Debug)]
pub(crate) struct Cells {
    dir: PathBuf,
}

impl Drop for Cells {
    fn drop(&mut self) {
        // Only an empty cgroup can be removed: one a run still holds stays for recovery.
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// One run's cgroup.
#[derive(Debug)]
pub(crate) struct Cell {
    dir: PathBuf,
}

impl Cells {
    /// This appliance's cell directory (named by `tag`), made if needed; `Err` says why there
    /// is none.
    pub(crate) fn open(tag: &str) -> Result<Self, String> {
        let mountinfo =
            std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| format!("/proc/self/mountinfo: {e}"))?;
        let mount = cgroup2_mount(&mountinfo).ok_or("no cgroup v2 hierarchy is mounted")?;
        let own = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| format!("/proc/self/cgroup: {e}"))?;
        let own = own_cgroup(&own).ok_or("this process has no cgroup v2 path")?;
        let parent = mount.join(own.trim_start_matches('/'));
        let dir = parent.join(format!("airlock-box-{tag}"));
        std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        if !dir.join("cgroup.kill").exists() {
            return Err(format!("{} has no cgroup.kill (a kernel before 5.14)", dir.display()));
        }
        // The pids and memory controllers, where this hierarchy has them, so each cell can be
        // capped (`Cell::limit`); where they are all on v1 (as on some hosts), rlimits hold.
        let offered = std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
        let wanted: Vec<String> =
            offered.split_whitespace().filter(|c| matches!(*c, "pids" | "memory")).map(|c| format!("+{c}")).collect();
        if !wanted.is_empty()
            && let Err(e) = std::fs::write(dir.join("cgroup.subtree_control"), wanted.join(" "))
        {
            tracing::warn!(cell = %dir.display(), error = %e, "cannot enable the pids and memory controllers for cells");
        }
        Ok(Self { dir })
    }

    /// The directory every cell is made in.
    pub(crate) fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// A new cell named `name` (an operation id, or a service's [`super::CellName`]). A cell
    /// left by a previous run of it is killed first.
    pub(crate) fn create(&self, name: &str) -> Result<Cell, String> {
        let cell = Cell { dir: self.dir.join(name) };
        if cell.dir.exists() {
            cell.kill_and_remove();
        }
        std::fs::create_dir_all(&cell.dir).map_err(|e| format!("cannot create {}: {e}", cell.dir.display()))?;
        Ok(cell)
    }

    /// The cells a previous appliance process left, by name (an operation id or a service's
    /// cell name): what they hold may still run.
    pub(crate) fn leftovers(&self) -> Vec<(String, Cell)> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return Vec::new() };
        entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| Some((e.file_name().to_str()?.to_owned(), Cell { dir: e.path() })))
            .collect()
    }
}

impl Cell {
    /// The cell's `cgroup.procs`, open for writing: a process that writes `0` to it enters
    /// the cell, with everything it will start.
    pub(crate) fn procs(&self) -> Result<std::fs::File, String> {
        std::fs::OpenOptions::new()
            .write(true)
            .open(self.dir.join("cgroup.procs"))
            .map_err(|e| format!("cannot open {}/cgroup.procs: {e}", self.dir.display()))
    }

    /// Caps the cell's processes and memory where the hierarchy has those controllers (on a
    /// host whose controllers are all on v1, the run's resource limits hold them instead).
    pub(crate) fn limit(&self, processes: u32, memory_bytes: u64) {
        for (file, value) in [("pids.max", processes.to_string()), ("memory.max", memory_bytes.to_string())] {
            let path = self.dir.join(file);
            if path.exists()
                && let Err(e) = std::fs::write(&path, value)
            {
                tracing::warn!(file = %path.display(), error = %e, "cannot set a cell's limit");
            }
        }
    }

    /// Kills everything in the cell at once, `setsid` and double-forked children included.
    pub(crate) fn kill(&self) {
        if let Err(e) = std::fs::write(self.dir.join("cgroup.kill"), "1")
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::error!(cell = %self.dir.display(), error = %e, "cannot kill a cell");
        }
    }

    /// Sends `signal` to every process in the cell (a graceful stop's SIGTERM reaches children
    /// that left the process group too).
    pub(crate) fn signal(&self, signal: nix::sys::signal::Signal) {
        let Ok(procs) = std::fs::read_to_string(self.dir.join("cgroup.procs")) else { return };
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
        }
    }

    /// Whether any process is left in the cell.
    pub(crate) fn populated(&self) -> bool {
        std::fs::read_to_string(self.dir.join("cgroup.events"))
            .map(|events| events.lines().any(|l| l == "populated 1"))
            .unwrap_or(false)
    }

    /// Kills everything in the cell, waits (briefly) until it is empty, and removes it.
    pub(crate) fn kill_and_remove(&self) {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.populated() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if let Err(e) = std::fs::remove_dir(&self.dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(cell = %self.dir.display(), error = %e, "cannot remove a cell");
        }
    }

    pub(crate) fn dir(&self) -> &std::path::Path {
        &self.dir
    }
}

/// The mount point of the cgroup v2 hierarchy, from `/proc/self/mountinfo`.
fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // `id parent major:minor root mount-point options [optional...] - fstype source super`
        let (fields, rest) = line.split_once(" - ")?;
        if rest.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        Some(PathBuf::from(unescape(fields.split(' ').nth(4)?)))
    })
}

/// This process's path in the v2 hierarchy, from `/proc/self/cgroup` (`0::<path>`).
fn own_cgroup(proc_cgroup: &str) -> Option<String> {
    proc_cgroup.lines().find_map(|l| l.strip_prefix("0::")).map(str::to_owned)
}

/// Mount points in mountinfo escape space, tab, newline and backslash as octal (`\040`).
fn unescape(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut rest = field;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest.get(i + 1..i + 4).and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(c) => {
                out.push(char::from(c));
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use airlock_core::OperationId;

    use super::*;

    #[test]
    fn the_v2_hierarchy_is_found_beside_v1_controllers() {
        let mountinfo = "\
30 25 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        assert_eq!(cgroup2_mount(mountinfo), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        let only_v2 = "29 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(cgroup2_mount(only_v2), Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(cgroup2_mount("31 30 0:27 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"), None);
        assert_eq!(unescape("/mnt/with\\040space"), "/mnt/with space");
        assert_eq!(
            own_cgroup("1:cpu:/\n0::/system.slice/airlock.service\n").as_deref(),
            Some("/system.slice/airlock.service")
        );
    }

    /// Whether this host lets the test create cgroups (CI runs as root with cgroup v2).
    fn cells() -> Cells {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let tag = format!("test-{}-{nanos}", std::process::id());
        Cells::open(&tag).expect("cgroup v2 is available to the tests (run them as root)")
    }

    #[test]
    fn a_cell_is_killed_whole_even_after_setsid_and_a_double_fork() {
        let cells = cells();
        let id = OperationId::from_random([0x5a; 16]);
        let cell = cells.create(&id.to_string()).unwrap();
        // A shell moved into the cell, which starts a session leader that double-forks.
        let mut child = std::process::Command::new("/bin/sh")
            .args(["-c", "read -r _; setsid sh -c 'sleep 60 & sleep 60 &' ; sleep 60"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::fs::write(cell.dir().join("cgroup.procs"), child.id().to_string()).unwrap();
        drop(child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(5);
        let procs = || std::fs::read_to_string(cell.dir().join("cgroup.procs")).unwrap().lines().count();
        while procs() < 4 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(procs() >= 4, "the shell and the sleeps it started run in the cell");
        assert_eq!(cells.leftovers().len(), 1);
        cell.kill_and_remove();
        let _ = child.wait();
        assert!(!cell.dir().exists(), "the cell is empty and removed");
        assert!(cells.leftovers().is_empty());
    }
}
