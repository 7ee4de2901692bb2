//! The key-encryption key (KEK) and sealing of secrets at rest.
//!
//! The KEK is 32 bytes from a key file (default `<data-dir>/kek.key`, mode 0600), a path the operator gives, or the `AIRLOCK_KEK` environment variable (64 hex digits).
//! It seals the CA private key and released operation output with AES-256-GCM, and keys the MAC over audit chain heads.
//! It is never stored in the database, so a copied database alone reveals no key material.

use std::io::Write;
use std::path::{Path, PathBuf};

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

pub const KEK_FILE_NAME: &str = "kek.key";
const SEAL_VERSION: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key-encryption key from {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot write key-encryption key to {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("key-encryption key in {0} is malformed: expected 64 hex digits")]
    Malformed(String),
    #[error("key-encryption key file {path} is readable by others (mode {mode:o}); run `chmod 600 {path}`", path = .path.display())]
    Permissions { path: PathBuf, mode: u32 },
    #[error("sealed data could not be opened: wrong key-encryption key, or the data was altered")]
    Unseal,
    #[error("system random generator failed")]
    Random,
}

/// Where the KEK comes from, in the operator's words.
#[derive(Clone, Debug)]
pub enum KekSource {
    File(PathBuf),
    /// Hex from the environment; the value itself is never logged.
    Env(String),
}

pub struct Kek {
    key: [u8; 32],
}

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Kek(<redacted>)")
    }
}

impl KekSource {
    pub fn default_for(data_dir: &Path) -> Self {
        KekSource::File(data_dir.join(KEK_FILE_NAME))
    }

    pub fn load(&self) -> Result<Kek, KeyError> {
        match self {
            KekSource::Env(hex) => parse_hex(hex.trim()).ok_or_else(|| KeyError::Malformed("AIRLOCK_KEK".into())),
            KekSource::File(path) => {
                check_private(path)?;
                let text =
                    std::fs::read_to_string(path).map_err(|source| KeyError::Read { path: path.clone(), source })?;
                parse_hex(text.trim()).ok_or_else(|| KeyError::Malformed(path.display().to_string()))
            }
        }
    }

    /// Creates a new random KEK file (mode 0600) if this source is a file that does not exist.
    pub fn create_if_missing(&self) -> Result<Kek, KeyError> {
        if let KekSource::File(path) = self
            && !path.exists()
        {
            let mut key = [0u8; 32];
            SystemRandom::new().fill(&mut key).map_err(|_| KeyError::Random)?;
            write_private(path, data_encoding::HEXLOWER.encode(&key).as_bytes())
                .map_err(|source| KeyError::Write { path: path.clone(), source })?;
            return Ok(Kek { key });
        }
        self.load()
    }
}

impl Kek {
    /// AES-256-GCM with a random 96-bit nonce: `version || nonce || ciphertext || tag`.
    /// `aad` binds the ciphertext to its purpose, so a sealed value cannot be swapped for another.
    pub fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, KeyError> {
        let key = self.aead_key()?;
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new().fill(&mut nonce).map_err(|_| KeyError::Random)?;
        let mut buf = plaintext.to_vec();
        key.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut buf)
            .map_err(|_| KeyError::Random)?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + buf.len());
        out.push(SEAL_VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&buf);
        Ok(out)
    }

    pub fn open(&self, sealed: &[u8], aad: &[u8]) -> Result<Vec<u8>, KeyError> {
        let key = self.aead_key()?;
        let (version, rest) = sealed.split_first().ok_or(KeyError::Unseal)?;
        if *version != SEAL_VERSION || rest.len() < NONCE_LEN {
            return Err(KeyError::Unseal);
        }
        let (nonce, ct) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| KeyError::Unseal)?;
        let mut buf = ct.to_vec();
        let plain = key.open_in_place(nonce, Aad::from(aad), &mut buf).map_err(|_| KeyError::Unseal)?;
        Ok(plain.to_vec())
    }

    /// A key derived for MACs over audit chain heads (distinct from the sealing key).
    pub fn audit_mac_key(&self) -> ring::hmac::Key {
        let derive = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.key);
        let sub = ring::hmac::sign(&derive, b"airlock audit head mac v1");
        ring::hmac::Key::new(ring::hmac::HMAC_SHA256, sub.as_ref())
    }

    fn aead_key(&self) -> Result<LessSafeKey, KeyError> {
        let unbound = UnboundKey::new(&AES_256_GCM, &self.key).map_err(|_| KeyError::Unseal)?;
        Ok(LessSafeKey::new(unbound))
    }
}

fn parse_hex(s: &str) -> Option<Kek> {
    let bytes = data_encoding::HEXLOWER_PERMISSIVE.decode(s.as_bytes()).ok()?;
    Some(Kek { key: bytes.try_into().ok()? })
}

#[cfg(unix)]
fn check_private(path: &Path) -> Result<(), KeyError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|source| KeyError::Read { path: path.to_owned(), source })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Permissions { path: path.to_owned(), mode });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_private(_path: &Path) -> Result<(), KeyError> {
    Ok(())
}

/// Writes a file only its owner can read, created fresh (never through an existing file).
pub fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(contents)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_value_opens_only_with_same_key_and_purpose() {
        let dir = tempfile::tempdir().unwrap();
        let src = KekSource::default_for(dir.path());
        let kek = src.create_if_missing().unwrap();
        let sealed = kek.seal(b"ca private key", b"ca-key").unwrap();
        assert_eq!(kek.open(&sealed, b"ca-key").unwrap(), b"ca private key");
        assert!(matches!(kek.open(&sealed, b"other"), Err(KeyError::Unseal)));
        let other = KekSource::Env("11".repeat(32)).load().unwrap();
        assert!(matches!(other.open(&sealed, b"ca-key"), Err(KeyError::Unseal)));
        let mut flipped = sealed.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(matches!(kek.open(&flipped, b"ca-key"), Err(KeyError::Unseal)));
    }

    #[test]
    fn kek_file_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let src = KekSource::default_for(dir.path());
        src.create_if_missing().unwrap();
        let path = dir.path().join(KEK_FILE_NAME);
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(src.load(), Err(KeyError::Permissions { .. })));
    }
}
