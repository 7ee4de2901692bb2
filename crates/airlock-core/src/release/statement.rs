//! [`ReleaseStatement`]: what the vendor signs, its canonical encoding and digest, and
//! [`verify_release`].

use serde::{Deserialize, Serialize};

use super::{Problem, RelativePath, ReleaseError, ReleaseLimit, ReleaseManifest, count, invalid};
use crate::customer_key::{CustomerPublicKey, CustomerSigningKey};
use crate::dsse::Envelope;
use crate::operation::sha256_hex;

/// Distinct from the customer's output release ([`crate::operation::RELEASE_PAYLOAD_TYPE`]), so
/// neither envelope can stand for the other.
pub const RELEASE_PAYLOAD_TYPE: &str = "application/vnd.airlock.vendor-release.v1+json";
pub const MAX_ARTIFACTS: usize = 10_000;
/// The manifest, its digest and [`MAX_ARTIFACTS`] entries with long paths fit.
pub const MAX_STATEMENT_BYTES: usize = 16 * 1024 * 1024;

/// One content-addressed file of a release.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Artifact {
    pub path: RelativePath,
    /// Lowercase hex SHA-256 of the file's bytes.
    pub sha256: String,
    pub size: u64,
}

/// The signed statement. A wire contract: its canonical JSON is the fields in this order,
/// artifacts sorted by path, no whitespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseStatement {
    /// SHA-256 (hex) of `manifest`'s exact bytes.
    pub manifest_sha256: String,
    /// `airlock.toml`, exactly as shipped.
    pub manifest: String,
    pub artifacts: Vec<Artifact>,
}

impl ReleaseStatement {
    /// Builds the statement for a release: checks the manifest and the artifacts, and sorts them.
    pub fn new(manifest_toml: &str, mut artifacts: Vec<Artifact>) -> Result<Self, ReleaseError> {
        ReleaseManifest::parse(manifest_toml)?;
        artifacts.sort_by(|a, b| a.path.cmp(&b.path));
        let statement = Self {
            manifest_sha256: sha256_hex(manifest_toml.as_bytes()),
            manifest: manifest_toml.to_owned(),
            artifacts,
        };
        statement.validate()?;
        Ok(statement)
    }

    /// The canonical encoding: what is signed and what [`Self::digest`] hashes.
    pub fn to_canonical_json(&self) -> Vec<u8> {
        // Plain data with string keys: serialization cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The release digest a deploy manifest binds: SHA-256 (hex) of the canonical encoding.
    pub fn digest(&self) -> String {
        sha256_hex(&self.to_canonical_json())
    }

    /// The manifest, parsed and validated.
    pub fn manifest(&self) -> Result<ReleaseManifest, ReleaseError> {
        ReleaseManifest::parse(&self.manifest)
    }

    /// Artifacts bounded, sorted, unique, with well-formed digests; the manifest's digest stated
    /// right and the manifest valid.
    fn validate(&self) -> Result<(), ReleaseError> {
        count("artifacts", self.artifacts.len(), MAX_ARTIFACTS)?;
        for pair in self.artifacts.windows(2) {
            if pair[0].path == pair[1].path {
                return Err(invalid("artifacts", Problem::Duplicate(pair[0].path.to_string())));
            }
            if pair[0].path > pair[1].path {
                return Err(ReleaseError::NotCanonical);
            }
        }
        for a in &self.artifacts {
            if !is_sha256_hex(&a.sha256) {
                return Err(invalid(&format!("artifacts[{}].sha256", a.path), Problem::NotSha256));
            }
        }
        if !is_sha256_hex(&self.manifest_sha256) {
            return Err(invalid("manifest_sha256", Problem::NotSha256));
        }
        let actual = sha256_hex(self.manifest.as_bytes());
        if actual != self.manifest_sha256 {
            return Err(ReleaseError::ManifestDigestMismatch { stated: self.manifest_sha256.clone(), actual });
        }
        Ok(())
    }
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Signs a release statement with a vendor release key (an Ed25519 key of the same type as the
/// customer's; its key id is the hex SHA-256 of the public key).
pub fn sign_release(statement: &ReleaseStatement, key: &CustomerSigningKey) -> Envelope {
    Envelope::new(RELEASE_PAYLOAD_TYPE, statement.to_canonical_json()).sign(key)
}

/// A release whose envelope verified and whose statement and manifest are valid. Only
/// [`verify_release`] builds one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedRelease {
    statement: ReleaseStatement,
    manifest: ReleaseManifest,
    digest: String,
    signed_by: Vec<String>,
}

impl VerifiedRelease {
    pub fn statement(&self) -> &ReleaseStatement {
        &self.statement
    }

    pub fn manifest(&self) -> &ReleaseManifest {
        &self.manifest
    }

    /// [`ReleaseStatement::digest`] of the verified statement.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// Key ids of the accepted keys that signed.
    pub fn signed_by(&self) -> &[String] {
        &self.signed_by
    }
}

/// Checks the size, the payload type and a signature by one of `accepted_keys`, then the statement's size,
/// form (canonical, sorted, unique artifacts) and manifest (its digest, then its content).
pub fn verify_release(
    envelope: &Envelope,
    accepted_keys: &[CustomerPublicKey],
) -> Result<VerifiedRelease, ReleaseError> {
    // Bounded before any work: the signature check hashes the whole payload.
    if envelope.payload.len() > MAX_STATEMENT_BYTES {
        return Err(ReleaseError::Limit(ReleaseLimit::StatementBytes { bytes: envelope.payload.len() }));
    }
    let verified = envelope.verify(RELEASE_PAYLOAD_TYPE, accepted_keys, 1)?;
    let payload = verified.payload;
    let statement: ReleaseStatement =
        serde_json::from_slice(&payload).map_err(|e| ReleaseError::Malformed(e.to_string()))?;
    statement.validate()?;
    if statement.to_canonical_json() != payload {
        return Err(ReleaseError::NotCanonical);
    }
    let manifest = statement.manifest()?;
    Ok(VerifiedRelease { digest: sha256_hex(&payload), statement, manifest, signed_by: verified.signed_by })
}
