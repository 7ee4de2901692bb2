//! What the appliance commits to about an operation's output before the customer decides to
//! release it, and how released output is checked against that commitment.
//!
//! The signed execution reaches the vendor before the customer releases anything, so what it
//! says about the output must reveal nothing about it. A plain SHA-256 of a short output (a
//! four-digit PIN) is inverted by trying every candidate, so the commitment is salted:
//!
//! ```text
//! digest = SHA-256( "airlock-output-commitment-v1\0" || salt (32 bytes) || output )
//! ```
//!
//! as lowercase hex ([`output_commitment`]). The label is fixed and the salt has a fixed
//! length, so the output is exactly the bytes after them: no two (salt, output) pairs share an
//! input. The salt is 32 bytes from a CSPRNG, fresh for every run; the appliance keeps it sealed
//! with the output and reveals it only beside released output, so before the release the digest
//! cannot be tested against any guess.
//!
//! Output of a request tagged `output:secret` never leaves the appliance, so nothing about it
//! does either: its execution carries [`OutputCommitment::Secret`], with no digest and no size.
//!
//! Executions signed before salts existed carry an unsalted SHA-256 of the output. They still
//! verify, as [`OutputCommitment::LegacyUnsalted`], and are never mistaken for salted ones.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The domain-separation label at the start of every output commitment's input.
pub const OUTPUT_COMMITMENT_LABEL: &[u8] = b"airlock-output-commitment-v1\0";

/// The length of an output salt, in bytes.
pub const OUTPUT_SALT_LEN: usize = 32;

/// The salt of one run's output commitment. Its JSON form is lowercase hex.
/// Core never makes one: the appliance fills it from the OS's CSPRNG ([`OutputSalt::from_bytes`]).
#[derive(Clone, PartialEq, Eq)]
pub struct OutputSalt([u8; OUTPUT_SALT_LEN]);

impl OutputSalt {
    pub fn from_bytes(bytes: [u8; OUTPUT_SALT_LEN]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; OUTPUT_SALT_LEN] {
        &self.0
    }

    pub fn to_hex(&self) -> String {
        data_encoding::HEXLOWER.encode(&self.0)
    }
}

/// A salt that is not 32 bytes (or, as text, not 64 lowercase hex digits).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an output salt is {OUTPUT_SALT_LEN} bytes (64 lowercase hex digits); this one is not")]
pub struct MalformedSalt;

impl TryFrom<&[u8]> for OutputSalt {
    type Error = MalformedSalt;
    fn try_from(bytes: &[u8]) -> Result<Self, MalformedSalt> {
        <[u8; OUTPUT_SALT_LEN]>::try_from(bytes).map(Self).map_err(|_| MalformedSalt)
    }
}

impl std::str::FromStr for OutputSalt {
    type Err = MalformedSalt;
    fn from_str(s: &str) -> Result<Self, MalformedSalt> {
        let bytes = data_encoding::HEXLOWER.decode(s.as_bytes()).map_err(|_| MalformedSalt)?;
        Self::try_from(bytes.as_slice())
    }
}

// Never printed: before its release a salt is what keeps the output unguessable.
impl std::fmt::Debug for OutputSalt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OutputSalt(..)")
    }
}

impl Serialize for OutputSalt {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for OutputSalt {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// The salted commitment to `output`: SHA-256 over the label, the salt and the output, as
/// lowercase hex. The one definition the appliance, the control plane and `airlock verify` use.
pub fn output_commitment(salt: &OutputSalt, output: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(OUTPUT_COMMITMENT_LABEL);
    h.update(salt.as_bytes());
    h.update(output);
    data_encoding::HEXLOWER.encode(&h.finalize())
}

/// What a signed statement says about an operation's output.
///
/// In signed statements the first two travel as `"output_commitment"`, the third as the
/// `output_sha256` and `output_size` fields statements had before salts (see
/// `operation::ExecutionStatement`). The JSON of this type itself (`{"salted": {...}}`,
/// `"secret"`, `{"legacy_unsalted": {...}}`) is for views such as the API's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum OutputCommitment {
    /// `digest` is [`output_commitment`] of the output under this run's salt.
    Salted { digest: String, size: u64 },
    /// The request is tagged `output:secret`: no digest, no size, nothing about the output.
    Secret,
    /// Signed before salted commitments: `sha256` is the plain SHA-256 of the output. A short
    /// output can be recovered from it; verifiers report it as legacy.
    LegacyUnsalted { sha256: String, size: u64 },
}

impl OutputCommitment {
    /// The salted commitment a new run signs for `output` (secret output gets none).
    pub fn for_output(secret: bool, salt: &OutputSalt, output: &[u8]) -> Self {
        if secret {
            OutputCommitment::Secret
        } else {
            OutputCommitment::Salted { digest: output_commitment(salt, output), size: output.len() as u64 }
        }
    }

    /// Whether this is what an execution of a request with secret output (or not) commits to:
    /// [`OutputCommitment::Secret`] exactly for secret output. Legacy statements predate the
    /// rule and are taken as they are (and reported as legacy).
    pub fn fits_request(&self, secret_output: bool) -> bool {
        match self {
            OutputCommitment::Secret => secret_output,
            OutputCommitment::Salted { .. } => !secret_output,
            OutputCommitment::LegacyUnsalted { .. } => true,
        }
    }

    /// The output's size, when the statement tells it.
    pub fn size(&self) -> Option<u64> {
        match self {
            OutputCommitment::Salted { size, .. } | OutputCommitment::LegacyUnsalted { size, .. } => Some(*size),
            OutputCommitment::Secret => None,
        }
    }

    /// The digest the statement names (salted, or for legacy statements plain), for display.
    pub fn digest(&self) -> Option<&str> {
        match self {
            OutputCommitment::Salted { digest, .. } => Some(digest),
            OutputCommitment::LegacyUnsalted { sha256, .. } => Some(sha256),
            OutputCommitment::Secret => None,
        }
    }

    /// Checks revealed output (and, for a salted commitment, its salt) against this
    /// commitment. A salt given for a legacy commitment, or missing for a salted one, fails.
    pub fn check(&self, salt: Option<&OutputSalt>, output: &[u8]) -> Result<OpenedAs, OutputMismatch> {
        match (self, salt) {
            (OutputCommitment::Secret, _) => Err(OutputMismatch::Secret),
            (OutputCommitment::Salted { digest, size }, Some(salt)) => {
                if output.len() as u64 != *size || output_commitment(salt, output) != *digest {
                    return Err(OutputMismatch::Differs);
                }
                Ok(OpenedAs::Salted)
            }
            (OutputCommitment::Salted { .. }, None) => Err(OutputMismatch::NoSalt),
            (OutputCommitment::LegacyUnsalted { sha256, size }, None) => {
                if output.len() as u64 != *size || crate::operation::sha256_hex(output) != *sha256 {
                    return Err(OutputMismatch::Differs);
                }
                Ok(OpenedAs::LegacyUnsalted)
            }
            (OutputCommitment::LegacyUnsalted { .. }, Some(_)) => Err(OutputMismatch::SaltForLegacy),
        }
    }

    /// Refuses a digest that is not 64 lowercase hex digits: what no version of Airlock signs.
    pub(crate) fn well_formed(self) -> Result<Self, String> {
        let hex64 = |d: &str| d.len() == 64 && d.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        match self.digest() {
            Some(d) if !hex64(d) => Err("an output digest is 64 lowercase hex digits".into()),
            _ => Ok(self),
        }
    }
}

/// How released output was checked: against a salted commitment, or a legacy unsalted digest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenedAs {
    Salted,
    LegacyUnsalted,
}

/// Why revealed output does not open a commitment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OutputMismatch {
    #[error("the output is secret: nothing may be revealed against it")]
    Secret,
    #[error("the output (or its salt) does not hash to the signed commitment and size")]
    Differs,
    #[error("the commitment is salted, but no salt was revealed")]
    NoSalt,
    #[error("a salt was revealed for output committed to without one (a legacy, unsalted digest)")]
    SaltForLegacy,
}

/// How the signed statements spell a salted or secret commitment (`"output_commitment"`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub(crate) enum SignedCommitment {
    Salted { digest: String, size: u64 },
    Secret,
}

/// Splits a commitment into the fields a signed statement carries: the legacy pair
/// (`output_sha256`, `output_size`) or the `output_commitment`.
pub(crate) fn to_signed(c: &OutputCommitment) -> (Option<String>, Option<u64>, Option<SignedCommitment>) {
    match c {
        OutputCommitment::Salted { digest, size } => {
            (None, None, Some(SignedCommitment::Salted { digest: digest.clone(), size: *size }))
        }
        OutputCommitment::Secret => (None, None, Some(SignedCommitment::Secret)),
        OutputCommitment::LegacyUnsalted { sha256, size } => (Some(sha256.clone()), Some(*size), None),
    }
}

/// Reads the fields of a signed statement back: exactly one of the two spellings, complete.
pub(crate) fn from_signed(
    sha256: Option<String>,
    size: Option<u64>,
    commitment: Option<SignedCommitment>,
) -> Result<OutputCommitment, String> {
    let c = match (sha256, size, commitment) {
        (None, None, Some(SignedCommitment::Salted { digest, size })) => OutputCommitment::Salted { digest, size },
        (None, None, Some(SignedCommitment::Secret)) => OutputCommitment::Secret,
        (Some(sha256), Some(size), None) => OutputCommitment::LegacyUnsalted { sha256, size },
        (_, _, Some(_)) => return Err("a statement carries output_commitment or output_sha256, not both".into()),
        _ => return Err("a statement needs output_commitment (or, before salts, output_sha256 and output_size)".into()),
    };
    c.well_formed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_commitment_is_sha256_over_label_salt_and_output() {
        let salt = OutputSalt::from_bytes([7; 32]);
        let mut input = b"airlock-output-commitment-v1\0".to_vec();
        input.extend_from_slice(&[7; 32]);
        input.extend_from_slice(b"1234\n");
        assert_eq!(output_commitment(&salt, b"1234\n"), crate::operation::sha256_hex(&input));
        assert_ne!(output_commitment(&salt, b"1234\n"), output_commitment(&OutputSalt::from_bytes([8; 32]), b"1234\n"));
    }

    #[test]
    fn revealed_output_opens_only_its_own_commitment() {
        let salt = OutputSalt::from_bytes([1; 32]);
        let c = OutputCommitment::for_output(false, &salt, b"4821");
        assert_eq!(c.check(Some(&salt), b"4821"), Ok(OpenedAs::Salted));
        assert_eq!(c.check(Some(&salt), b"4822"), Err(OutputMismatch::Differs));
        assert_eq!(c.check(Some(&OutputSalt::from_bytes([2; 32])), b"4821"), Err(OutputMismatch::Differs));
        assert_eq!(c.check(None, b"4821"), Err(OutputMismatch::NoSalt));
        let legacy = OutputCommitment::LegacyUnsalted { sha256: crate::operation::sha256_hex(b"4821"), size: 4 };
        assert_eq!(legacy.check(None, b"4821"), Ok(OpenedAs::LegacyUnsalted));
        assert_eq!(legacy.check(Some(&salt), b"4821"), Err(OutputMismatch::SaltForLegacy));
        assert_eq!(OutputCommitment::for_output(true, &salt, b"4821"), OutputCommitment::Secret);
        assert_eq!(OutputCommitment::Secret.check(Some(&salt), b"4821"), Err(OutputMismatch::Secret));
    }

    #[test]
    fn a_salt_is_exactly_32_bytes_and_never_printed() {
        assert!("ab".repeat(32).parse::<OutputSalt>().is_ok());
        for bad in ["ab".repeat(31), "AB".repeat(32), "zz".repeat(32), String::new()] {
            assert_eq!(bad.parse::<OutputSalt>(), Err(MalformedSalt), "{bad}");
        }
        assert!(OutputSalt::try_from(&[0u8; 31][..]).is_err());
        assert_eq!(format!("{:?}", OutputSalt::from_bytes([0xab; 32])), "OutputSalt(..)");
    }
}
