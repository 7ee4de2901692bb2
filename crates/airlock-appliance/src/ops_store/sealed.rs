//! Operation output at rest: sealed, and bound to its operation.
//!
//! `ops/<id>/output.sealed` is the captured output encrypted with AES-256-GCM under `output.key`
//! (32 random bytes in the state directory, mode 0600, made when the store first opens), with the operation's
//! id as associated data: moved to another operation's directory, it does not decrypt.
//! Output is never in clear on disk; it is decrypted only for the customer on this host, or to
//! be sent in a release.
//!
//! Since salted output commitments, what is sealed is the run's 32-byte salt followed by the
//! output, with associated data `<id>\nsalted-v1`; the salt is revealed only with released
//! output. Output sealed before salts (the id alone as associated data) still opens, as output
//! without a salt: the associated data, not a guess at the layout, says which it is.
//! [`OpStore::revealable_output`] is the one check before any output leaves this host: what is
//! held must still open the commitment the execution signed.

use airlock_core::OperationId;
use airlock_core::operation::{ExecutionStatement, OutputCommitment, OutputSalt};
use airlock_core::output_commitment::OUTPUT_SALT_LEN;
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

/// An operation's output as held on this host, opened.
pub(crate) struct HeldOutput {
    /// The salt of its commitment; `None` for output sealed before salts.
    pub salt: Option<OutputSalt>,
    pub bytes: Vec<u8>,
}

/// A fresh salt for one run's output commitment, from the OS's CSPRNG.
pub(crate) fn fresh_salt() -> Result<OutputSalt, ApplianceError> {
    let mut salt = [0u8; OUTPUT_SALT_LEN];
    SystemRandom::new()
        .fill(&mut salt)
        .map_err(|_| ApplianceError::Internal("the OS random generator failed".into()))?;
    Ok(OutputSalt::from_bytes(salt))
}

fn salted_aad(id: OperationId) -> String {
    format!("{id}\nsalted-v1")
}

impl OpStore {
    /// Encrypts and stores an operation's output with the salt of its commitment.
    pub(crate) fn seal_output(&self, id: OperationId, salt: &OutputSalt, output: &[u8]) -> Result<(), ApplianceError> {
        let key = &self.output_key;
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| ApplianceError::Internal("the OS random generator failed".into()))?;
        let mut sealed = salt.as_bytes().to_vec();
        sealed.extend_from_slice(output);
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(salted_aad(id).as_bytes()),
            &mut sealed,
        )
        .map_err(|_| ApplianceError::Internal("output encryption failed".into()))?;
        let mut data = nonce.to_vec();
        data.extend_from_slice(&sealed);
        write(&self.dir(id)?.join(OUTPUT), &data)
    }

    /// Decrypts an operation's output (and its salt), for the customer on this host.
    pub(crate) fn open_output(&self, id: OperationId) -> Result<HeldOutput, ApplianceError> {
        let path = self.dir(id)?.join(OUTPUT);
        let data = std::fs::read(&path).map_err(|e| io_err(&path, e))?;
        if data.len() < NONCE_LEN {
            return Err(io_err(&path, "is damaged"));
        }
        let (nonce, sealed) = data.split_at(NONCE_LEN);
        let open = |aad: &str| {
            let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
            let mut buf = sealed.to_vec();
            self.output_key.open_in_place(nonce, Aad::from(aad.as_bytes()), &mut buf).ok().map(|p| p.to_vec())
        };
        if let Some(plain) = open(&salted_aad(id)) {
            if plain.len() < OUTPUT_SALT_LEN {
                return Err(io_err(&path, "is damaged"));
            }
            let (salt, bytes) = plain.split_at(OUTPUT_SALT_LEN);
            let salt = OutputSalt::try_from(salt).map_err(|_| io_err(&path, "is damaged"))?;
            return Ok(HeldOutput { salt: Some(salt), bytes: bytes.to_vec() });
        }
        match open(&id.to_string()) {
            Some(bytes) => Ok(HeldOutput { salt: None, bytes }),
            None => Err(io_err(&path, "does not decrypt: it was damaged or the key changed")),
        }
    }

    /// What the execution in the manifest of `id` committed to about its output.
    pub(crate) fn signed_commitment(&self, id: OperationId) -> Result<OutputCommitment, ApplianceError> {
        let execution = self.manifest(id)?.and_then(|m| m.execution).ok_or_else(|| {
            ApplianceError::Internal(format!("operation {id} has no signed execution, so no output to release"))
        })?;
        let statement: ExecutionStatement = serde_json::from_slice(&execution.payload)
            .map_err(|e| ApplianceError::Internal(format!("the stored execution of {id} does not parse: {e}")))?;
        Ok(statement.output_commitment)
    }

    /// The output of `id` about to leave this host, checked against the commitment its
    /// execution signed: a salt and bytes that do not open it (output swapped under the same
    /// key, a lost salt) are never revealed, and secret output never is.
    pub(crate) fn revealable_output(
        &self,
        id: OperationId,
        commitment: &OutputCommitment,
    ) -> Result<HeldOutput, ApplianceError> {
        let held = self.open_output(id)?;
        commitment.check(held.salt.as_ref(), &held.bytes).map_err(|why| {
            ApplianceError::Internal(format!(
                "the output held for {id} cannot be revealed: {why}; nothing was sent (restore the state directory from a backup)"
            ))
        })?;
        Ok(held)
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
        let salt = OutputSalt::from_bytes([3; 32]);
        store.seal_output(one, &salt, b"secret output bytes").unwrap();
        let held = store.open_output(one).unwrap();
        assert_eq!((held.salt, held.bytes.as_slice()), (Some(salt.clone()), &b"secret output bytes"[..]));
        let sealed = std::fs::read(dir.path().join(format!("ops/{one}/output.sealed"))).unwrap();
        assert!(!sealed.windows(6).any(|w| w == b"output"));
        assert!(!sealed.windows(32).any(|w| w == salt.as_bytes()), "the salt is sealed too");
        // Moving a sealed output to another operation does not decrypt.
        store.dir(two).unwrap();
        std::fs::write(dir.path().join(format!("ops/{two}/output.sealed")), &sealed).unwrap();
        assert!(store.open_output(two).is_err());
        // Directories are named by operation ids only, and no such id leaves `ops/`.
        assert!("../escape".parse::<OperationId>().is_err());
    }

    #[test]
    fn output_sealed_before_salts_still_opens_without_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = OpStore::open(dir.path()).unwrap();
        let id = op_id(1);
        // As appliances sealed it before salts: the id alone as associated data.
        let mut sealed = b"old output".to_vec();
        let nonce = [4u8; NONCE_LEN];
        store
            .output_key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(id.to_string().as_bytes()),
                &mut sealed,
            )
            .unwrap();
        let mut data = nonce.to_vec();
        data.extend_from_slice(&sealed);
        std::fs::write(store.dir(id).unwrap().join(OUTPUT), data).unwrap();
        let held = store.open_output(id).unwrap();
        assert_eq!((held.salt, held.bytes.as_slice()), (None, &b"old output"[..]));
    }

    #[test]
    fn held_output_that_does_not_open_its_commitment_is_never_revealed() {
        let dir = tempfile::tempdir().unwrap();
        let store = OpStore::open(dir.path()).unwrap();
        let id = op_id(1);
        let salt = OutputSalt::from_bytes([3; 32]);
        let committed = OutputCommitment::for_output(false, &salt, b"4821\n");
        store.seal_output(id, &salt, b"4821\n").unwrap();
        assert_eq!(store.revealable_output(id, &committed).unwrap().bytes, b"4821\n");
        // Other bytes, or the same bytes with another salt, sealed under the same key.
        store.seal_output(id, &salt, b"4822\n").unwrap();
        assert!(store.revealable_output(id, &committed).is_err());
        store.seal_output(id, &OutputSalt::from_bytes([4; 32]), b"4821\n").unwrap();
        assert!(store.revealable_output(id, &committed).is_err());
        assert!(store.revealable_output(id, &OutputCommitment::Secret).is_err());
    }
}
