//! Customer policies relayed to appliances.
//!
//! The control plane holds no customer key: it can neither make a policy nor check a policy's
//! signatures. It checks only the shape of what an operator relays (a DSSE envelope of the
//! policy payload type, signed at least once, a policy that parses, a serial that moves
//! forward), keeps the latest one per environment and pushes it to the environment's
//! appliances, which verify it against the customer keys they pinned.

use airlock_core::EnvironmentId;
use airlock_core::dsse::Envelope;
use airlock_core::policy::{POLICY_PAYLOAD_TYPE, PolicyDocument};

/// The largest policy envelope relayed (a policy is a few KiB).
pub const MAX_POLICY_ENVELOPE_BYTES: usize = 256 * 1024;

/// What the shape checks found in a relayed envelope.
#[derive(Debug)]
pub struct CheckedPolicy {
    pub serial: u64,
    /// SHA-256 (hex) of the signed TOML, as the appliance reports it.
    pub policy_sha256: String,
    pub signatures: usize,
}

/// Checks the shape of a policy envelope; nothing here can check a signature.
pub fn check_shape(envelope: &Envelope, environment: EnvironmentId) -> Result<CheckedPolicy, String> {
    if envelope.payload_type != POLICY_PAYLOAD_TYPE {
        return Err(format!(
            "the envelope's payload type is `{}`, not a customer policy (`{POLICY_PAYLOAD_TYPE}`)",
            envelope.payload_type.chars().take(100).collect::<String>()
        ));
    }
    if envelope.signatures.is_empty() {
        return Err("the policy is not signed; sign it with `airlock customer policy sign`".into());
    }
    let text = std::str::from_utf8(&envelope.payload).map_err(|_| "the policy is not UTF-8".to_owned())?;
    let doc = PolicyDocument::parse(text).map_err(|e| e.to_string())?;
    // The appliance refuses it otherwise; refusing here tells the caller at once.
    doc.check_environment(environment, true)?;
    if i64::try_from(doc.serial).is_err() {
        return Err("the policy serial must be below 2^63".into());
    }
    Ok(CheckedPolicy {
        serial: doc.serial,
        policy_sha256: airlock_core::operation::sha256_hex(&envelope.payload),
        signatures: envelope.signatures.len(),
    })
}
