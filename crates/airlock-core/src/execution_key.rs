//! The appliance's execution-signing key, and the customer's attestation of it.
//!
//! An appliance certificate comes from the vendor's CA, so a certificate alone cannot prove
//! that an execution happened: whoever holds the CA can mint one for any appliance and sign
//! anything with it. Each appliance therefore also holds an Ed25519 key of its own, generated
//! in its state directory and never sent anywhere, and signs every execution with it as well
//! as with its certificate key (two signatures on one DSSE envelope: the control plane keeps
//! checking the certificate's, `airlock verify` checks both).
//!
//! The customer vouches for that key once, on the appliance host, where they read it over the
//! admin socket (which vendor code cannot reach): an [`ExecutionKeyAttestation`] naming the
//! appliance, its environment and tenant and the key, signed with their own keys
//! ([`ATTESTATION_PAYLOAD_TYPE`]). A manifest carries the attestation beside the execution, and
//! [`crate::operation::verify_manifest`] refuses an execution that the attested key did not sign.
//!
//! An attestation covers the key, not a span of time: the key never left the appliance, so
//! what it signed before the customer attested it is the appliance's as much as what it signed
//! after.

use serde::{Deserialize, Serialize};

use crate::customer_key::{CustomerPublicKey, CustomerSigningKey, KeyError};
use crate::dsse::{DsseError, Envelope};
use crate::{ApplianceId, EnvironmentId, TenantId, Timestamp};

pub const ATTESTATION_PAYLOAD_TYPE: &str = "application/vnd.airlock.execution-key-attestation.v1+json";

/// The appliance's private execution-signing key (Ed25519). `Debug` never shows it.
///
/// It is an Ed25519 key like the customer's, and shares its one implementation (PKCS#8 PEM,
/// strict verification, the key id): only what it is for differs.
pub struct ExecutionSigningKey(CustomerSigningKey);

/// The public half, as the customer attests it and verifiers hold it.
#[derive(Clone, PartialEq, Eq)]
pub struct ExecutionPublicKey(CustomerPublicKey);

impl ExecutionSigningKey {
    /// Builds a key from 32 bytes the caller drew from a CSPRNG.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self(CustomerSigningKey::from_seed(seed))
    }

    pub fn from_pem(pem: &str) -> Result<Self, KeyError> {
        CustomerSigningKey::from_pem(pem).map(Self)
    }

    pub fn to_pem(&self) -> Result<String, KeyError> {
        self.0.to_pem()
    }

    pub fn public(&self) -> ExecutionPublicKey {
        ExecutionPublicKey(self.0.public())
    }

    /// Adds this key's signature to `envelope` (beside any it has).
    pub fn sign(&self, envelope: Envelope) -> Envelope {
        envelope.sign(&self.0)
    }
}

impl std::fmt::Debug for ExecutionSigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ExecutionSigningKey(<redacted>, public {})", self.public().key_id())
    }
}

impl std::fmt::Debug for ExecutionPublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ExecutionPublicKey({})", self.key_id())
    }
}

impl ExecutionPublicKey {
    pub fn from_pem(pem: &str) -> Result<Self, KeyError> {
        CustomerPublicKey::from_pem(pem).map(Self)
    }

    pub fn to_pem(&self) -> Result<String, KeyError> {
        self.0.to_pem()
    }

    /// Lowercase hex SHA-256 of the raw public key: the fingerprint the customer compares.
    pub fn key_id(&self) -> &str {
        self.0.key_id_str()
    }

    /// Whether this key signed `envelope` (of the given payload type).
    pub fn signed(&self, envelope: &Envelope, payload_type: &str) -> bool {
        envelope.verify(payload_type, std::slice::from_ref(&self.0), 1).is_ok()
    }
}

/// What the customer signs about one appliance's execution key. A wire contract.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecutionKeyAttestation {
    pub appliance: ApplianceId,
    pub environment: EnvironmentId,
    pub tenant: TenantId,
    /// The execution public key, PEM (SubjectPublicKeyInfo).
    pub execution_key: String,
    pub attested_at: Timestamp,
    /// Who attested, in the customer's words.
    #[serde(default)]
    pub attested_by: String,
}

impl ExecutionKeyAttestation {
    /// The statement, unsigned, in a DSSE envelope for the customer to sign.
    pub fn envelope(&self) -> Envelope {
        // Plain data with string keys: serialization cannot fail.
        Envelope::new(ATTESTATION_PAYLOAD_TYPE, serde_json::to_vec(self).unwrap_or_default())
    }
}

/// Why an attestation, or an execution under it, is refused. Code decides on the variant;
/// the sentence is for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttestationRefusal {
    #[error(
        "the execution is vouched for only by a certificate from the vendor's CA: the manifest carries no customer attestation of the appliance's execution key (attest it with `airlock customer attest-appliance`, or accept such manifests with --allow-vendor-attested)"
    )]
    VendorAttestedOnly,
    #[error("the attestation of the appliance's execution key is not signed by the customer keys given: {0}")]
    /// (Boxed: it travels inside every `ManifestError`, which stays small.)
    NotCustomerSigned(Box<DsseError>),
    #[error("the attestation of the appliance's execution key is malformed: {0}")]
    Malformed(String),
    #[error("the attestation is for another appliance, environment or tenant than the execution")]
    OtherAppliance,
    #[error("the execution is not signed by the execution key the customer attested for this appliance")]
    NotSignedByAttestedKey,
}

/// An attestation the customer's keys signed. Only [`verify_attestation`] builds one.
#[derive(Clone, Debug)]
pub struct VerifiedAttestation {
    statement: ExecutionKeyAttestation,
    key: ExecutionPublicKey,
    signed_by: Vec<String>,
}

impl VerifiedAttestation {
    pub fn statement(&self) -> &ExecutionKeyAttestation {
        &self.statement
    }

    pub fn key(&self) -> &ExecutionPublicKey {
        &self.key
    }

    pub fn signed_by(&self) -> &[String] {
        &self.signed_by
    }

    /// The attestation names exactly this appliance.
    pub fn check_names(
        &self,
        appliance: ApplianceId,
        environment: EnvironmentId,
        tenant: TenantId,
    ) -> Result<(), AttestationRefusal> {
        let s = &self.statement;
        if s.appliance != appliance || s.environment != environment || s.tenant != tenant {
            return Err(AttestationRefusal::OtherAppliance);
        }
        Ok(())
    }
}

/// Reads an attestation without checking who signed it: for a party that holds no customer
/// key (the control plane, which only checks that it fits the appliance and its execution).
pub fn read_attestation(
    envelope: &Envelope,
) -> Result<(ExecutionKeyAttestation, ExecutionPublicKey), AttestationRefusal> {
    if envelope.payload_type != ATTESTATION_PAYLOAD_TYPE {
        return Err(AttestationRefusal::Malformed(format!(
            "payload type is `{}`, expected `{ATTESTATION_PAYLOAD_TYPE}`",
            envelope.payload_type
        )));
    }
    let statement: ExecutionKeyAttestation =
        serde_json::from_slice(&envelope.payload).map_err(|e| AttestationRefusal::Malformed(e.to_string()))?;
    let key = ExecutionPublicKey::from_pem(&statement.execution_key)
        .map_err(|e| AttestationRefusal::Malformed(format!("its execution key: {e}")))?;
    Ok((statement, key))
}

/// Verifies an attestation against the customer's `keys`, with `threshold` distinct signatures.
pub fn verify_attestation(
    envelope: &Envelope,
    keys: &[CustomerPublicKey],
    threshold: usize,
) -> Result<VerifiedAttestation, AttestationRefusal> {
    // The signature first: what an unauthenticated payload says decides nothing.
    let verified = envelope
        .verify(ATTESTATION_PAYLOAD_TYPE, keys, threshold.max(1))
        .map_err(|e| AttestationRefusal::NotCustomerSigned(Box::new(e)))?;
    let (statement, key) = read_attestation(envelope)?;
    Ok(VerifiedAttestation { statement, key, signed_by: verified.signed_by })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn statement(key: &ExecutionSigningKey) -> ExecutionKeyAttestation {
        ExecutionKeyAttestation {
            appliance: ApplianceId::from_random([3; 16]),
            environment: EnvironmentId::from_random([2; 16]),
            tenant: TenantId::from_random([1; 16]),
            execution_key: key.public().to_pem().unwrap(),
            attested_at: Timestamp::from_unix_millis(0),
            attested_by: "alice".into(),
        }
    }

    #[test]
    fn an_attestation_verifies_with_the_customer_key_and_names_its_appliance() {
        let exec = ExecutionSigningKey::from_seed([9; 32]);
        let customer = CustomerSigningKey::from_seed([1; 32]);
        let s = statement(&exec);
        let env = s.envelope().sign(&customer);
        let v = verify_attestation(&env, &[customer.public()], 1).unwrap();
        assert_eq!(v.key(), &exec.public());
        assert!(v.check_names(s.appliance, s.environment, s.tenant).is_ok());
        assert_eq!(
            v.check_names(ApplianceId::from_random([4; 16]), s.environment, s.tenant),
            Err(AttestationRefusal::OtherAppliance)
        );
        // Signed by the execution key itself, or another key: not the customer's.
        let self_signed = s.envelope().sign(&CustomerSigningKey::from_seed([9; 32]));
        assert!(matches!(
            verify_attestation(&self_signed, &[customer.public()], 1),
            Err(AttestationRefusal::NotCustomerSigned(_))
        ));
        assert!(matches!(
            verify_attestation(&env, &[customer.public()], 2),
            Err(AttestationRefusal::NotCustomerSigned(_))
        ));
    }

    #[test]
    fn a_malformed_attestation_is_refused_not_a_panic() {
        let customer = CustomerSigningKey::from_seed([1; 32]);
        let mut s = statement(&ExecutionSigningKey::from_seed([9; 32]));
        s.execution_key = "not a key".into();
        let env = s.envelope().sign(&customer);
        assert!(matches!(verify_attestation(&env, &[customer.public()], 1), Err(AttestationRefusal::Malformed(_))));
        let junk = Envelope::new(ATTESTATION_PAYLOAD_TYPE, b"{".to_vec()).sign(&customer);
        assert!(matches!(verify_attestation(&junk, &[customer.public()], 1), Err(AttestationRefusal::Malformed(_))));
    }

    #[test]
    fn the_key_never_shows_in_debug() {
        let key = ExecutionSigningKey::from_seed([9; 32]);
        let pem = key.to_pem().unwrap();
        let shown = format!("{key:?}");
        assert!(shown.contains("redacted") && !shown.contains(&pem));
        assert_eq!(ExecutionSigningKey::from_pem(&pem).unwrap().public(), key.public());
    }
}
