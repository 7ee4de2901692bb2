//! Installing a release beside the others: `<releases root>/<release digest>/`.
//!
//! Invariants:
//! - A release directory exists under its digest only once every artifact in it was copied
//!   from the blob store and hashed again to its signed SHA-256 and size: it is built in
//!   `.tmp-<digest>` and renamed, so a half-installed release is never taken for one.
//! - Blobs are opened without following symlinks and must be regular files; artifacts are
//!   created anew (never through an existing file or link) under directories made here.
//! - Artifacts carry no mode in the signed statement: every artifact file is 0o555 (readable
//!   and runnable by the box user, writable by nobody but root), every directory 0o755.
//! - Beside each release directory, `<digest>.statement.json` keeps its statement, so the
//!   appliance can start it again after a restart without the control plane.
//! - Installing a digest already installed checks its files again and reinstalls it if any
//!   differs.

use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use airlock_core::release::{Artifact, ReleaseManifest, ReleaseStatement, VerifiedRelease};

use super::DeployError;

/// The releases root: installed releases, the `current` pointer, the deploy state, logs.
#[derive(Debug)]
pub(crate) struct Releases {
    root: PathBuf,
}

/// Whether `s` is a digest as this module names directories by: 64 lowercase hex digits.
pub(super) fn is_digest(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn io(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> DeployError {
    let at = format!("{what} {}", path.display());
    move |e| DeployError::Io(format!("{at}: {e}"))
}

impl Releases {
    /// The releases root `root`, made if needed (0o755: the box user reads releases), refused
    /// inside the state directory (which the box may not read) or the box's working root
    /// (wiped at every start), and refused unless the appliance's own user owns it.
    pub(crate) fn open(root: &Path, state_dir: &Path, box_work_root: &Path) -> Result<Self, DeployError> {
        std::fs::create_dir_all(root).map_err(io("cannot create", root))?;
        let real = std::fs::canonicalize(root).map_err(io("cannot resolve", root))?;
        for (other, what) in [(state_dir, "the state directory"), (box_work_root, "the box's working directories")] {
            let other = std::fs::canonicalize(other).unwrap_or_else(|_| other.to_owned());
            if real.starts_with(&other) || other.starts_with(&real) {
                return Err(DeployError::BadReleasesRoot(format!(
                    "{} overlaps {what} ({}): put releases_dir outside it",
                    real.display(),
                    other.display()
                )));
            }
        }
        // Whoever owns the root can swap the releases the appliance runs (as root, with a
        // release that asked for it): a directory someone else made first is refused.
        let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&real).map_err(io("cannot read", &real))?);
        let me = nix::unistd::geteuid().as_raw();
        if owner != me {
            return Err(DeployError::BadReleasesRoot(format!(
                "{} belongs to uid {owner}, not to this appliance's user (uid {me}): another user could replace \
                 the releases it runs; remove it or set releases_dir elsewhere",
                real.display()
            )));
        }
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o755)).map_err(io("cannot set", &real))?;
        let logs = real.join(".logs");
        std::fs::create_dir_all(&logs).map_err(io("cannot create", &logs))?;
        std::fs::set_permissions(&logs, std::fs::Permissions::from_mode(0o700)).map_err(io("cannot set", &logs))?;
        Ok(Self { root: real })
    }

    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn dir(&self, digest: &str) -> PathBuf {
        self.root.join(digest)
    }

    /// Where a service's output goes (owner-only: logs never leave the appliance).
    pub(crate) fn log(&self, service: &str) -> PathBuf {
        self.root.join(".logs").join(format!("{service}.log"))
    }

    fn statement_path(&self, digest: &str) -> PathBuf {
        self.root.join(format!("{digest}.statement.json"))
    }

    /// Installs `release` from `blobs` (each artifact the file `<blobs>/<sha256 hex>`) and
    /// returns its directory; see the module documentation.
    pub(crate) fn install(&self, release: &VerifiedRelease, blobs: &Path) -> Result<PathBuf, DeployError> {
        let digest = release.digest();
        if !is_digest(digest) {
            return Err(DeployError::Io(format!("`{digest}` is not a release digest")));
        }
        let dir = self.dir(digest);
        if dir.is_dir() {
            match check_installed(&dir, &release.statement().artifacts) {
                Ok(()) => return Ok(dir),
                Err(why) => {
                    tracing::warn!(release = digest, reason = %why, "an installed release was altered: installing it again");
                    remove_tree(&dir)?;
                }
            }
        }
        let tmp = self.root.join(format!(".tmp-{digest}"));
        if tmp.exists() {
            remove_tree(&tmp)?;
        }
        let made = (|| {
            std::fs::create_dir(&tmp).map_err(io("cannot create", &tmp))?;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).map_err(io("cannot set", &tmp))?;
            for artifact in &release.statement().artifacts {
                copy_artifact(blobs, &tmp, artifact)?;
            }
            crate::files::replace(
                &self.statement_path(digest),
                &release.statement().to_canonical_json(),
                crate::files::Mode::Readable,
            )
            .map_err(io("cannot write", &self.statement_path(digest)))?;
            std::fs::rename(&tmp, &dir).map_err(io("cannot rename", &tmp))?;
            sync_dir(&self.root);
            Ok(())
        })();
        if made.is_err() {
            let _ = remove_tree(&tmp);
        }
        made.map(|()| dir)
    }

    /// The statement and manifest of the installed release `digest`, as installed.
    pub(crate) fn installed(&self, digest: &str) -> Result<(ReleaseStatement, ReleaseManifest), DeployError> {
        let path = self.statement_path(digest);
        let bytes = std::fs::read(&path).map_err(io("cannot read", &path))?;
        let statement: ReleaseStatement = serde_json::from_slice(&bytes)
            .map_err(|e| DeployError::Io(format!("{} is malformed: {e}", path.display())))?;
        if statement.digest() != digest || !self.dir(digest).is_dir() {
            return Err(DeployError::Io(format!("the installed release {digest} is not the one recorded")));
        }
        let manifest =
            statement.manifest().map_err(|e| DeployError::Io(format!("the installed release {digest}: {e}")))?;
        Ok((statement, manifest))
    }

    /// The SHA-256 of every artifact of every installed release: the blobs worth keeping.
    pub(crate) fn artifacts_in_use(&self) -> std::collections::BTreeSet<String> {
        let Ok(entries) = std::fs::read_dir(&self.root) else { return Default::default() };
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_suffix(".statement.json").map(str::to_owned))
            .filter_map(|digest| self.installed(&digest).ok())
            .flat_map(|(statement, _)| statement.artifacts.into_iter().map(|a| a.sha256))
            .collect()
    }

    /// Whether the installed release `digest` still holds exactly what `statement` signed.
    pub(crate) fn check(&self, digest: &str, statement: &ReleaseStatement) -> Result<(), DeployError> {
        check_installed(&self.dir(digest), &statement.artifacts)
            .map_err(|why| DeployError::Io(format!("the installed release {digest} was altered: {why}")))
    }

    /// Removes every installed release but those in `keep`, and leftovers of interrupted
    /// installs.
    pub(crate) fn prune(&self, keep: &[&str]) {
        let Ok(entries) = std::fs::read_dir(&self.root) else { return };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let digest = name.strip_suffix(".statement.json").unwrap_or(&name);
            let stale_tmp = name.starts_with(".tmp-");
            if stale_tmp || (is_digest(digest) && !keep.contains(&digest)) {
                let path = entry.path();
                let removed = if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    remove_tree(&path)
                } else {
                    std::fs::remove_file(&path).map_err(io("cannot remove", &path))
                };
                if let Err(e) = removed {
                    tracing::warn!(error = %e, "cannot prune an old release");
                }
            }
        }
    }
}

/// Copies one artifact from the blob store into `into`, hashing what it writes.
fn copy_artifact(blobs: &Path, into: &Path, artifact: &Artifact) -> Result<(), DeployError> {
    let blob = blobs.join(&artifact.sha256);
    let mut src =
        std::fs::OpenOptions::new().read(true).custom_flags(nix::libc::O_NOFOLLOW).open(&blob).map_err(|e| {
            DeployError::MissingArtifact { path: artifact.path.as_str().to_owned(), why: e.to_string() }
        })?;
    let meta = src.metadata().map_err(io("cannot stat", &blob))?;
    if !meta.is_file() {
        return Err(DeployError::MissingArtifact {
            path: artifact.path.as_str().to_owned(),
            why: "the blob is not a regular file".into(),
        });
    }
    let dest = into.join(artifact.path.as_str());
    if let Some(parent) = dest.parent() {
        make_dirs(into, parent)?;
    }
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o555)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&dest)
        .map_err(io("cannot create", &dest))?;
    let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
    let mut size = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = src.read(&mut buf).map_err(io("cannot read", &blob))?;
        if n == 0 {
            break;
        }
        size += n as u64;
        if size > artifact.size {
            break;
        }
        hash.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(io("cannot write", &dest))?;
    }
    if size != artifact.size || data_encoding::HEXLOWER.encode(hash.finish().as_ref()) != artifact.sha256 {
        return Err(DeployError::Tampered { path: artifact.path.as_str().to_owned() });
    }
    out.sync_all().map_err(io("cannot sync", &dest))?;
    std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o555)).map_err(io("cannot set", &dest))
}

/// Makes `dir` and its parents up to `root`, each a real directory (0o755), never a link.
fn make_dirs(root: &Path, dir: &Path) -> Result<(), DeployError> {
    let Ok(rel) = dir.strip_prefix(root) else { return Err(DeployError::Io(format!("{} escapes", dir.display()))) };
    let mut at = root.to_owned();
    for part in rel.components() {
        at.push(part);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(DeployError::Io(format!("{} is both a file and a directory", at.display()))),
            Err(_) => {
                std::fs::create_dir(&at).map_err(io("cannot create", &at))?;
                std::fs::set_permissions(&at, std::fs::Permissions::from_mode(0o755)).map_err(io("cannot set", &at))?;
            }
        }
    }
    Ok(())
}

/// Whether every artifact of an installed release still has its signed content.
fn check_installed(dir: &Path, artifacts: &[Artifact]) -> Result<(), String> {
    for artifact in artifacts {
        let path = dir.join(artifact.path.as_str());
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| format!("{}: {e}", artifact.path.as_str()))?;
        let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = file.read(&mut buf).map_err(|e| format!("{}: {e}", artifact.path.as_str()))?;
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
        }
        if data_encoding::HEXLOWER.encode(hash.finish().as_ref()) != artifact.sha256 {
            return Err(format!("{} differs from its signed digest", artifact.path.as_str()));
        }
    }
    Ok(())
}

/// Removes a tree this module made (its files are read-only; its directories are not).
pub(super) fn remove_tree(path: &Path) -> Result<(), DeployError> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(DeployError::Io(format!("cannot remove {}: {e}", path.display()))),
    }
}

/// Makes a rename in `dir` durable.
pub(super) fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}
