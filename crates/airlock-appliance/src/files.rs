//! How the appliance replaces a file of its state directory: whole, synced, and owner-only.
//!
//! [`replace`] is the one way any file is replaced: a crash leaves the old content or the new,
//! never a mix, and once it returns the new content survives a crash.
//! It writes a temporary file beside the target (`.<name>.tmp`, created anew, never reused),
//! syncs it, renames it over the target, then syncs the directory.
//! Without the last step the rename itself can be lost in a crash, bringing the old file back.
//! A failure at any step leaves the target as it was.

use std::io::Write;
use std::path::Path;

/// Who may read a replaced file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Its owner only (0600): keys, records, anything about operations.
    Private,
    /// Anyone on the host (0644): the CA certificate, the enrolment, the revocation mark.
    Readable,
}

/// Replaces `path` with `data` atomically and durably (see the module documentation).
pub(crate) fn replace(path: &Path, data: &[u8], mode: Mode) -> std::io::Result<()> {
    let dir = path.parent().ok_or_else(|| std::io::Error::other("the path has no directory"))?;
    let name = path.file_name().ok_or_else(|| std::io::Error::other("the path names no file"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    // A temporary file left by a crash is stale: its write never completed.
    let _ = std::fs::remove_file(&tmp);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(match mode {
            Mode::Private => 0o600,
            Mode::Readable => 0o644,
        });
    }
    let written = opts.open(&tmp).and_then(|mut f| {
        f.write_all(data)?;
        f.sync_all()
    });
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::File::open(dir)?.sync_all()
}

/// Creates a directory (and its parents) readable by its owner only (0700).
pub(crate) fn create_private_dir(path: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(path)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Creates the state directory itself: owner-only, as [`create_private_dir`], except that the
/// group's search bit (0710) is kept. `StateDir::share_with_group` sets it for the customer's
/// admin group, so its members can reach the admin socket, and clears it when there is none.
pub(crate) fn create_state_dir(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(path)?;
    let search = std::fs::metadata(path)?.permissions().mode() & 0o010;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700 | search))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn the_new_content_is_complete_and_nothing_is_left_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        replace(&path, b"first", Mode::Readable).unwrap();
        assert_eq!((std::fs::read(&path).unwrap(), mode(&path)), (b"first".to_vec(), 0o644));
        // A temporary file a crash left behind does not get in the way, nor into the result.
        std::fs::write(dir.path().join(".state.json.tmp"), b"half a wri").unwrap();
        let big = vec![b'x'; 1 << 20];
        replace(&path, &big, Mode::Private).unwrap();
        assert_eq!((std::fs::read(&path).unwrap(), mode(&path)), (big, 0o600));
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["state.json"]);
    }

    #[test]
    fn a_failed_replace_leaves_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nonces.jsonl");
        replace(&path, b"old", Mode::Private).unwrap();
        // The temporary file cannot be made (a directory is in its place, even for root).
        let blocker = dir.path().join(".nonces.jsonl.tmp");
        std::fs::create_dir(&blocker).unwrap();
        std::fs::write(blocker.join("inside"), b"").unwrap();
        assert!(replace(&path, b"new", Mode::Private).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        // The target cannot be replaced (a directory is in its place): the new content is not
        // left anywhere either.
        let target = dir.path().join("record.json");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("inside"), b"").unwrap();
        assert!(replace(&target, b"new", Mode::Private).is_err());
        assert!(target.is_dir() && !dir.path().join(".record.json.tmp").exists());
    }

    #[test]
    fn private_directories_are_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ops/op");
        create_private_dir(&path).unwrap();
        assert_eq!(mode(&path), 0o700);
    }
}
