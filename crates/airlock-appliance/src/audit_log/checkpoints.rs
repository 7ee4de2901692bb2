//! Signed checkpoints of the audit head, sent where the customer chose: an append-only file
//! outside the state directory, or syslog (`airlock_core::audit::checkpoint` has the format
//! and the checks).
//!
//! They are signed with an Ed25519 key of the appliance's own, `checkpoint.key` (owner-only,
//! made on first start); `checkpoint.pub` beside it is what the customer verifies with. The
//! certificate key is not used: it exists only after the join and changes at each renewal.
//! One is written at start, at stop and every N records. A file inside the state directory is
//! refused: whoever can rewrite the log could rewrite it too.
//! At start, a checkpoint file is checked against the log: a log shorter than a checkpoint,
//! rewritten under one, or put back to an older copy refuses start.

use std::io::Write;
use std::path::{Path, PathBuf};

use airlock_core::audit::checkpoint::{self, Checkpoint, CheckpointReason};
use airlock_core::audit::{Head, Record};
use airlock_core::customer_key::{CustomerPublicKey, CustomerSigningKey};

use crate::files::{self, Mode};

/// The checkpoint signing key in the state directory (PKCS#8 PEM, owner-only).
const KEY_FILE: &str = "checkpoint.key";
/// Its public half, for `airlock audit verify --checkpoints … --key`.
pub const PUBLIC_KEY_FILE: &str = "checkpoint.pub";
/// The syslog socket on Linux.
pub const SYSLOG_SOCKET: &str = "/dev/log";

/// Where checkpoints go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckpointSink {
    /// JSON lines appended to a file outside the state directory.
    File(PathBuf),
    /// Datagrams to a syslog socket (`/dev/log`, or another for tests).
    Syslog(PathBuf),
}

impl std::str::FromStr for CheckpointSink {
    type Err = String;
    /// `syslog`, `syslog:<socket>`, or an absolute file path.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.strip_prefix("syslog") {
            Some("") => Ok(Self::Syslog(SYSLOG_SOCKET.into())),
            Some(rest) if rest.starts_with(':') => Ok(Self::Syslog(rest[1..].into())),
            _ if Path::new(s).is_absolute() => Ok(Self::File(s.into())),
            _ => Err(format!("`{s}` is neither `syslog` nor an absolute file path")),
        }
    }
}

/// The customer's checkpoint settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointConfig {
    pub sink: CheckpointSink,
    /// A checkpoint every this many records (at least 1).
    pub every: u64,
}

pub(crate) struct Checkpointer {
    sink: CheckpointSink,
    key: CustomerSigningKey,
    every: u64,
    since_last: u64,
}

impl Checkpointer {
    /// Loads (or makes) the checkpoint key and checks the sink is outside `state_dir`.
    pub(crate) fn open(state_dir: &Path, config: &CheckpointConfig) -> Result<Self, String> {
        if let CheckpointSink::File(path) = &config.sink {
            refuse_inside(state_dir, path)?;
        }
        let key = load_or_create_key(state_dir)?;
        Ok(Self { sink: config.sink.clone(), key, every: config.every.max(1), since_last: 0 })
    }

    /// Checks a checkpoint file against the log's records; syslog cannot be read back.
    pub(crate) fn check(&self, records: &[Record]) -> Result<(), String> {
        let CheckpointSink::File(path) = &self.sink else { return Ok(()) };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(format!("cannot read the checkpoint file {}: {e}", path.display())),
        };
        checkpoint::check_checkpoints(super::CHAIN, records, text.lines(), &self.key.public())
            .map(|_| ())
            .map_err(|e| format!("the log does not match its checkpoints in {}: {e}", path.display()))
    }

    /// Counts one record; true when a periodic checkpoint is due.
    pub(crate) fn count(&mut self) -> bool {
        self.since_last += 1;
        self.since_last >= self.every
    }

    /// Writes a checkpoint of `head` now.
    pub(crate) fn write(&mut self, head: Head, reason: CheckpointReason) -> std::io::Result<()> {
        let line = Checkpoint::new(super::CHAIN, head, crate::clock::now(), reason).signed_line(&self.key);
        match &self.sink {
            CheckpointSink::File(path) => {
                let mut opts = std::fs::OpenOptions::new();
                opts.append(true).create(true);
                {
                    use std::os::unix::fs::OpenOptionsExt;
                    // A checkpoint holds no secret; the customer's tools read it.
                    opts.mode(0o644);
                }
                let mut file = opts.open(path)?;
                file.write_all(format!("{line}\n").as_bytes())?;
                file.sync_data()?;
            }
            CheckpointSink::Syslog(socket) => {
                // RFC 3164 framing, facility user, severity notice; the envelope follows the tag.
                let message = format!("<13>airlock-appliance[{}]: {line}", std::process::id());
                std::os::unix::net::UnixDatagram::unbound()?.send_to(message.as_bytes(), socket)?;
            }
        }
        self.since_last = 0;
        Ok(())
    }
}

/// The public checkpoint key in `state_dir`, for the verifier's default.
pub fn public_key(state_dir: &Path) -> Result<CustomerPublicKey, String> {
    let path = state_dir.join(PUBLIC_KEY_FILE);
    let pem = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    CustomerPublicKey::from_pem(&pem).map_err(|e| format!("{}: {e}", path.display()))
}

fn refuse_inside(state_dir: &Path, path: &Path) -> Result<(), String> {
    let canonical = |p: &Path| std::fs::canonicalize(p).map_err(|e| format!("{}: {e}", p.display()));
    let state = canonical(state_dir)?;
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).ok_or("the checkpoint path names no directory")?;
    let dir = canonical(parent).map_err(|e| format!("the checkpoint file's directory: {e}"))?;
    if dir.starts_with(&state) {
        return Err(format!(
            "the checkpoint file {} is inside the state directory; put it where the appliance's log cannot take it back (another directory, a mount, or use syslog)",
            path.display()
        ));
    }
    Ok(())
}

fn load_or_create_key(state_dir: &Path) -> Result<CustomerSigningKey, String> {
    let path = state_dir.join(KEY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(pem) => return CustomerSigningKey::from_pem(&pem).map_err(|e| format!("{KEY_FILE}: {e}")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot read {KEY_FILE}: {e}")),
    }
    use ring::rand::SecureRandom;
    let mut seed = [0u8; 32];
    ring::rand::SystemRandom::new().fill(&mut seed).map_err(|_| "the OS random generator failed".to_owned())?;
    let key = CustomerSigningKey::from_seed(seed);
    let io = |e: std::io::Error| format!("cannot write the checkpoint key: {e}");
    let public = key.public().to_pem().map_err(|e| e.to_string())?;
    files::replace(&state_dir.join(PUBLIC_KEY_FILE), public.as_bytes(), Mode::Readable).map_err(io)?;
    files::replace(&path, key.to_pem().map_err(|e| e.to_string())?.as_bytes(), Mode::Private).map_err(io)?;
    Ok(key)
}
