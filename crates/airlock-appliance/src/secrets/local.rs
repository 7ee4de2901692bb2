//! `file:` and `env:` secrets, on the appliance's own host.
//!
//! A file's existence is an open for reading (which proves the appliance's user may read it,
//! whatever permissions, ACLs or Landlock say) and an `fstat` of what was opened: no byte is
//! read, and a file swapped between the check and the stat cannot fool it. The open is
//! non-blocking, so a FIFO planted at the path cannot hang the check.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::time::SystemTime;

use airlock_core::Timestamp;
use zeroize::{Zeroize, Zeroizing};

use super::{SecretReason, SecretValue};
use crate::config::EnvSource;

/// The largest file value accepted: far above any password, key or certificate chain.
pub(super) const MAX_FILE_VALUE_BYTES: u64 = 1024 * 1024;

fn io_reason(e: &std::io::Error) -> SecretReason {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::NotFound | ErrorKind::NotADirectory => SecretReason::NotFound,
        ErrorKind::PermissionDenied => SecretReason::NotReadable,
        _ => SecretReason::Io,
    }
}

/// Opens `path` for reading without blocking, and checks it is a regular file.
fn open_regular(path: &str) -> Result<(std::fs::File, std::fs::Metadata), SecretReason> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(path)
        .map_err(|e| io_reason(&e))?;
    let meta = file.metadata().map_err(|e| io_reason(&e))?;
    if !meta.is_file() {
        return Err(SecretReason::NotARegularFile);
    }
    Ok((file, meta))
}

fn timestamp(t: SystemTime) -> Option<Timestamp> {
    let ms = t.duration_since(SystemTime::UNIX_EPOCH).ok()?.as_millis();
    Some(Timestamp::from_unix_millis(i64::try_from(ms).ok()?))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SecretReason> + Send + 'static,
) -> Result<T, SecretReason> {
    tokio::task::spawn_blocking(f).await.map_err(|_| SecretReason::Io)?
}

/// Present with the file's mtime, or why not.
pub(super) async fn file_existence(path: &str) -> Result<Option<Timestamp>, SecretReason> {
    let path = path.to_owned();
    blocking(move || {
        let (_file, meta) = open_regular(&path)?;
        Ok(meta.modified().ok().and_then(timestamp))
    })
    .await
}

/// The file's content, exactly (a trailing newline is kept: it may be part of the secret).
pub(super) async fn file_value(path: &str) -> Result<SecretValue, SecretReason> {
    let path = path.to_owned();
    blocking(move || {
        let (file, meta) = open_regular(&path)?;
        if meta.len() > MAX_FILE_VALUE_BYTES {
            return Err(SecretReason::TooLarge);
        }
        // Room for the whole file up front, so the buffer never moves and leaves a copy behind.
        let mut bytes = Zeroizing::new(Vec::with_capacity(meta.len() as usize + 1));
        file.take(MAX_FILE_VALUE_BYTES + 1).read_to_end(&mut bytes).map_err(|e| io_reason(&e))?;
        if bytes.len() as u64 > MAX_FILE_VALUE_BYTES {
            return Err(SecretReason::TooLarge);
        }
        utf8(std::mem::take(&mut *bytes))
    })
    .await
}

/// Text from bytes without a copy; the bytes are wiped if they are not text.
pub(super) fn utf8(bytes: Vec<u8>) -> Result<SecretValue, SecretReason> {
    match String::from_utf8(bytes) {
        Ok(text) => Ok(Zeroizing::new(text)),
        Err(e) => {
            e.into_bytes().zeroize();
            Err(SecretReason::NotUtf8)
        }
    }
}

/// Present when the variable is set in the appliance's environment (and not empty, for the
/// process's own). Its last change is unknowable.
pub(super) fn env_existence(env: &dyn EnvSource, name: &str) -> Result<Option<Timestamp>, SecretReason> {
    // `EnvSource` hands over the value; it is wiped at once.
    env.get(name).map(Zeroizing::new).map(|_| None).ok_or(SecretReason::NotFound)
}

pub(super) fn env_value(env: &dyn EnvSource, name: &str) -> Result<SecretValue, SecretReason> {
    env.get(name).map(Zeroizing::new).ok_or(SecretReason::NotFound)
}
