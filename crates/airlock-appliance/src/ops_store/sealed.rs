//! Operation output at rest: sealed, and bound to its operation.
//!
//! `ops/<id>/output.sealed` is the captured output encrypted with AES-256-GCM under `output.key`
//! (32 random bytes in the state directory, mode 0600, made when the store first opens), with the operation's
//! id as associated data: moved to another operation's directory, it does not decrypt.
//! Output is never in clear on disk; it is decrypted only for the customer on this host, or to
//! be sent in a release.

use airlock_core::OperationId;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

use super::{OpStore, io_err, write};
use crate::ApplianceError;

pub(crate) const OUTPUT_KEY_FILE: &str = "output.key";
const OUTPUT: &str = "output.sealed";

/// Reads `output.key`, or makes it if there is none yet. Called once, when the store opens.
pub(super) fn load_or_create_output_key(state_dir: &std::path::Path) -> Result<LessSafeKey, ApplianceError> {
    let path = state_dir.join(OUTPUT_KEY_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut key = [0u8; 32];
            SystemRandom::new()
                .fill(&mut key)
                .map_err(|_| ApplianceError::Internal("the OS random generator failed".into()))?;
            write(&path, &key)?;
            key.to_vec()
        }
        Err(e) => return Err(io_err(&path, e)),
    };
    let key =
        UnboundKey::new(&AES_256_GCM, &bytes).map_err(|_| io_err(&path, "is not a 32-byte key; it was damaged"))?;
    Ok(LessSafeKey::new(key))
}

impl OpStore {
    /// Encrypts and stores an operation's output.
    pub(crate) fn seal_output(&self, id: OperationId, output: &[u8]) -> Result<(), ApplianceError> {
        let key = &self.output_key;
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| ApplianceError::Internal("the OS random generator failed".into()))?;
        let mut sealed = output.to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(id.to_string().as_bytes()),
            &mut sealed,
        )
        .map_err(|_| ApplianceError::Internal("output encryption failed".into()))?;
        let mut data = nonce.to_vec();
        data.extend_from_slice(&sealed);
        write(&self.dir(id)?.join(OUTPUT), &data)
    }

    /// Decrypts an operation's output.
    pub(crate) fn open_output(&self, id: OperationId) -> Result<Vec<u8>, ApplianceError> {
        let path = self.dir(id)?.join(OUTPUT);
        let data = std::fs::read(&path).map_err(|e| io_err(&path, e))?;
        if data.len() < NONCE_LEN {
            return Err(io_err(&path, "is damaged"));
        }
        let (nonce, sealed) = data.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| io_err(&path, "is damaged"))?;
        let mut buf = sealed.to_vec();
        let plain = self
            .output_key
            .open_in_place(nonce, Aad::from(id.to_string().as_bytes()), &mut buf)
            .map_err(|_| io_err(&path, "does not decrypt: it was damaged or the key changed"))?
            .to_vec();
        Ok(plain)
    }
}

#[cfg(test)]
mod tests {
    use airlock_testkit::op_id;

    use super::*;

    #[test]
    fn output_round_trips_sealed_and_is_bound_to_its_id() {
        let dir = tempfile::tempdir().unwrap();
        let store = OpStore::open(dir.path()).unwrap();
        let (one, two) = (op_id(1), op_id(2));
        store.seal_output(one, b"secret output bytes").unwrap();
        assert_eq!(store.open_output(one).unwrap(), b"secret output bytes");
        let sealed = std::fs::read(dir.path().join(format!("ops/{one}/output.sealed"))).unwrap();
        assert!(!sealed.windows(6).any(|w| w == b"output"));
        // Moving a sealed output to another operation does not decrypt.
        store.dir(two).unwrap();
        std::fs::write(dir.path().join(format!("ops/{two}/output.sealed")), &sealed).unwrap();
        assert!(store.open_output(two).is_err());
        // Directories are named by operation ids only, and no such id leaves `ops/`.
        assert!("../escape".parse::<OperationId>().is_err());
    }
}
