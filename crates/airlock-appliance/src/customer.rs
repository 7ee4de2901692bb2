//! The customer's authority on the appliance: pinned customer keys and the signed policy.
//!
//! Keys are pinned on first start and can never be replaced through configuration (a built-in
//! deny): a different key set later stops the appliance. They change only by a rotation the
//! pinned keys signed (`rotate_keys`), and every change is anchored in the audit chain
//! (`crate::anchors` holds the file against it at start).
//! A policy is accepted only if it verifies against the pinned keys and moves forward;
//! otherwise it is refused with its reason, and the last good policy stays in force.
//! With no policy, only Observe is allowed.
//! A policy relayed by the control plane (which can neither sign nor verify one) passes the same
//! checks as one loaded on the host, and must name this appliance's environment; its refusal is
//! audited `policy.refused`.

use std::path::Path;

use airlock_core::audit::anchor::Anchor;
use airlock_core::customer_key::CustomerPublicKey;
use airlock_core::key_rotation;
use airlock_core::policy::{VerifiedPolicy, verify_signed_policy};

use airlock_core::audit::{AuditAction, Outcome};

use crate::ApplianceError;
use crate::audit_log::AuditLog;
use crate::control::Peer;
use crate::state_dir::StateDir;

const PINNED_KEYS: &str = "customer-keys.pem";
const POLICY: &str = "policy.dsse.json";

/// The pinned key set's sorted ids as the file holds it, `None` without a file.
pub(crate) fn pinned_key_ids(state: &StateDir) -> Result<Option<Vec<String>>, ApplianceError> {
    let Some(text) = state.read_optional(PINNED_KEYS)? else { return Ok(None) };
    let keys = split_pems(&text)
        .iter()
        .map(|p| CustomerPublicKey::from_pem(p))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ApplianceError::Customer(format!("{PINNED_KEYS} in the state directory: {e}")))?;
    Ok(Some(key_rotation::key_ids(&keys)))
}

/// The stored policy's serial and content digest, read without verifying it: what matters here
/// is whether it is the one the audit log recorded. An unreadable file reads as serial 0.
pub(crate) fn stored_policy_serial(state: &StateDir) -> Result<Option<(u64, String)>, ApplianceError> {
    let Some(text) = state.read_optional(POLICY)? else { return Ok(None) };
    let payload = airlock_core::dsse::Envelope::from_json(text.as_bytes()).map(|e| e.payload).ok();
    let serial = payload
        .as_deref()
        .and_then(|p| std::str::from_utf8(p).ok())
        .and_then(|t| airlock_core::policy::PolicyDocument::parse(t).ok())
        .map(|d| d.serial);
    Ok(Some(match (serial, payload) {
        (Some(serial), Some(payload)) => (serial, airlock_core::operation::sha256_hex(&payload)),
        _ => (0, airlock_core::operation::sha256_hex(text.as_bytes())),
    }))
}

/// Pins `configured` keys on first use; afterwards they must equal the pinned set.
pub(crate) fn pin_keys(
    state: &StateDir,
    configured: &[String],
    audit: &AuditLog,
) -> Result<Vec<CustomerPublicKey>, ApplianceError> {
    let parse = |pem: &str| {
        CustomerPublicKey::from_pem(pem).map_err(|e| ApplianceError::Customer(format!("customer public key: {e}")))
    };
    let configured: Vec<CustomerPublicKey> = configured.iter().map(|p| parse(p)).collect::<Result<_, _>>()?;
    let pinned: Vec<CustomerPublicKey> = match state.read_optional(PINNED_KEYS)? {
        Some(text) => {
            let keys: Vec<CustomerPublicKey> = split_pems(&text).iter().map(|p| parse(p)).collect::<Result<_, _>>()?;
            if keys.is_empty() {
                return Err(ApplianceError::Customer(format!(
                    "{PINNED_KEYS} in the state directory holds no key: it was damaged; move the state directory aside to re-install"
                )));
            }
            keys
        }
        None => Vec::new(),
    };
    match (pinned.is_empty(), configured.is_empty()) {
        (true, true) => Ok(Vec::new()),
        (true, false) => {
            let text: String = configured.iter().map(|k| k.to_pem().unwrap_or_default()).collect::<Vec<_>>().concat();
            state.write_private(PINNED_KEYS, text.as_bytes())?;
            let ids: Vec<String> = configured.iter().map(CustomerPublicKey::key_id).collect();
            audit.record(AuditAction::CustomerKeysPinned, Outcome::Success, serde_json::json!({ "key_ids": ids }))?;
            audit.anchor(&Anchor::PinnedKeys { key_ids: key_rotation::key_ids(&configured) })?;
            tracing::info!(keys = ?ids, "customer keys pinned");
            Ok(configured)
        }
        (false, true) => Ok(pinned),
        (false, false) => {
            let ids = |ks: &[CustomerPublicKey]| {
                let mut v: Vec<String> = ks.iter().map(CustomerPublicKey::key_id).collect();
                v.sort();
                v
            };
            if ids(&pinned) != ids(&configured) {
                audit.record(
                    AuditAction::CustomerKeysReplace,
                    Outcome::Denied,
                    serde_json::json!({ "rule": "builtin:pinned-customer-key", "offered": ids(&configured) }),
                )?;
                return Err(ApplianceError::Customer(
                    "the configured customer keys differ from the keys pinned at install; replacing the pinned customer key is never allowed through configuration: rotate it with `airlock customer keys rotate`, and once rotated, start without --customer-key (or move the state directory aside to re-install)".into(),
                ));
            }
            Ok(pinned)
        }
    }
}

/// Applies a customer-signed rotation of the pinned keys (the admin socket's
/// `rotate_customer_keys`): it must verify against `pinned` with `threshold` signatures
/// (`airlock_core::key_rotation`). On success the new set is stored, recorded as
/// `customer_keys.rotate` and anchored; a refusal is recorded and changes nothing.
pub(crate) fn rotate_keys(
    state: &StateDir,
    pinned: &[CustomerPublicKey],
    threshold: usize,
    envelope_json: &[u8],
    audit: &AuditLog,
    by: Peer,
) -> Result<Vec<CustomerPublicKey>, ApplianceError> {
    let refuse = |why: String| {
        let _ = audit.record(
            AuditAction::CustomerKeysRotate,
            Outcome::Denied,
            by.stamp(serde_json::json!({ "reason": why })),
        );
        tracing::error!(reason = %why, "refusing a customer key rotation; the pinned keys stay");
        ApplianceError::Customer(format!("the key rotation is refused: {why}"))
    };
    if pinned.is_empty() {
        return Err(refuse("no customer key is pinned yet; pin keys at install with --customer-key".into()));
    }
    if envelope_json.len() as u64 > MAX_POLICY_BYTES {
        return Err(refuse("larger than 1 MiB; it is not a rotation statement".into()));
    }
    let rotation =
        key_rotation::verify_key_rotation(envelope_json, pinned, threshold).map_err(|e| refuse(e.to_string()))?;
    let new_keys = rotation.new_keys().to_vec();
    let text = new_keys.iter().map(|k| k.to_pem().unwrap_or_default()).collect::<Vec<_>>().concat();
    let previous = state.read_optional(PINNED_KEYS)?.unwrap_or_default();
    state.write_private(PINNED_KEYS, text.as_bytes()).map_err(|e| refuse(e.to_string()))?;
    let detail = by.stamp(serde_json::json!({
        "previous_key_ids": key_rotation::key_ids(pinned),
        "key_ids": key_rotation::key_ids(&new_keys),
        "signed_by": rotation.signed_by(),
        "reason": rotation.statement().reason,
    }));
    let recorded = audit
        .record(AuditAction::CustomerKeysRotate, Outcome::Success, detail)
        .and_then(|()| audit.anchor(&Anchor::PinnedKeys { key_ids: key_rotation::key_ids(&new_keys) }));
    if let Err(e) = recorded {
        // Not recorded, not applied: the file goes back to the set the chain names.
        let _ = state.write_private(PINNED_KEYS, previous.as_bytes());
        return Err(e);
    }
    tracing::info!(keys = ?key_rotation::key_ids(&new_keys), "customer keys rotated");
    Ok(new_keys)
}

/// The policy in force after considering `offered` (a signed policy file), if any.
pub(crate) fn load_policy(
    state: &StateDir,
    pinned: &[CustomerPublicKey],
    offered: Option<&Path>,
    audit: &AuditLog,
) -> Result<Option<VerifiedPolicy>, ApplianceError> {
    let current = match state.read_optional(POLICY)? {
        Some(stored) => match verify_signed_policy(stored.as_bytes(), pinned, None) {
            Ok(p) => Some(p),
            Err(e) => {
                audit.record(
                    AuditAction::PolicyStoredInvalid,
                    Outcome::Error,
                    serde_json::json!({ "reason": e.to_string() }),
                )?;
                tracing::error!(reason = %e, "the stored policy no longer verifies; ignoring it");
                None
            }
        },
        None => None,
    };
    let Some(path) = offered else { return Ok(current) };
    let bytes = match read_capped(path) {
        Ok(b) => b,
        Err(why) => {
            audit.record(AuditAction::PolicyUpdate, Outcome::Denied, serde_json::json!({ "reason": why }))?;
            tracing::error!(policy = %path.display(), reason = %why, "refusing policy; the last good policy stays in force");
            return Ok(current);
        }
    };
    if pinned.is_empty() {
        audit.record(
            AuditAction::PolicyUpdate,
            Outcome::Denied,
            serde_json::json!({ "reason": "no customer key is pinned" }),
        )?;
        tracing::error!(policy = %path.display(), "refusing policy: no customer key is pinned; pass --customer-key");
        return Ok(current);
    }
    match verify_signed_policy(&bytes, pinned, current.as_ref()).and_then(|p| above_high_water(p, audit)) {
        Ok(p) => {
            if current.as_ref().is_none_or(|c| c.digest_hex() != p.digest_hex()) {
                state.write_private(POLICY, &bytes)?;
                audit.record(
                    AuditAction::PolicyUpdate,
                    Outcome::Success,
                    serde_json::json!({ "serial": p.serial(), "digest": p.digest_hex(), "signed_by": p.signed_by() }),
                )?;
                audit.anchor(&Anchor::PolicySerial { serial: p.serial(), digest: p.digest_hex() })?;
                tracing::info!(serial = p.serial(), digest = %p.digest_hex(), signed_by = ?p.signed_by(), "accepted a new customer policy");
            }
            Ok(Some(p))
        }
        Err(e) => {
            audit.record(AuditAction::PolicyUpdate, Outcome::Denied, serde_json::json!({ "reason": e.to_string() }))?;
            tracing::error!(policy = %path.display(), reason = %e, "refusing policy; the last good policy stays in force");
            Ok(current)
        }
    }
}

/// Refuses a policy below the serial the audit chain recorded as in force, even when the stored
/// policy no longer verifies (after a key rotation, say) and so cannot speak for itself.
fn above_high_water(p: VerifiedPolicy, audit: &AuditLog) -> Result<VerifiedPolicy, airlock_core::policy::PolicyError> {
    match audit.anchored().policy {
        Some((high, _)) if p.serial() < high => {
            Err(airlock_core::policy::PolicyError::Rollback { offered: p.serial(), current: high })
        }
        _ => Ok(p),
    }
}

/// Where a newly signed policy came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PolicySource {
    /// The appliance host: the admin socket's peer.
    Host(Peer),
    /// Relayed by the control plane, which cannot sign one: trusted exactly as much as its
    /// customer signatures.
    ControlPlane,
}

/// Accepts a newly signed policy offered on this host (the admin socket) or relayed by the
/// control plane: the same checks as at start. On success it is stored and audited; on
/// refusal the reason is audited (`policy.update` denied for the host, `policy.refused` for
/// the control plane) and returned, and the policy in force stays.
pub(crate) fn accept_policy(
    state: &StateDir,
    pinned: &[CustomerPublicKey],
    envelope_json: &[u8],
    current: Option<&VerifiedPolicy>,
    audit: &AuditLog,
    source: PolicySource,
    environment: Option<airlock_core::EnvironmentId>,
) -> Result<VerifiedPolicy, PolicyRefused> {
    let refuse = |why: String| {
        let _ = match source {
            PolicySource::Host(by) => {
                audit.record(AuditAction::PolicyUpdate, Outcome::Denied, by.stamp(serde_json::json!({ "reason": why })))
            }
            PolicySource::ControlPlane => audit.record(
                AuditAction::PolicyRefused,
                Outcome::Denied,
                serde_json::json!({ "reason": why, "source": "control_plane" }),
            ),
        };
        tracing::error!(reason = %why, ?source, "refusing policy; the last good policy stays in force");
        why
    };
    let invalid = |why: PolicyRejection| {
        refuse(why.to_string());
        PolicyRefused::Invalid(why)
    };
    if pinned.is_empty() {
        return Err(invalid(PolicyRejection::NoPinnedKey));
    }
    if envelope_json.len() as u64 > MAX_POLICY_BYTES {
        return Err(invalid(PolicyRejection::TooLarge));
    }
    let p = verify_signed_policy(envelope_json, pinned, current)
        .and_then(|p| above_high_water(p, audit))
        .map_err(|e| invalid(e.into()))?;
    let relayed = source == PolicySource::ControlPlane;
    match environment {
        Some(env) => p.document().check_environment(env, relayed).map_err(|e| invalid(e.into()))?,
        None if relayed => return Err(invalid(PolicyRejection::NotEnrolled)),
        None => {}
    }
    if current.is_none_or(|c| c.digest_hex() != p.digest_hex()) {
        state.write_private(POLICY, envelope_json).map_err(|e| PolicyRefused::Failed(refuse(e.to_string())))?;
        let mut detail =
            serde_json::json!({ "serial": p.serial(), "digest": p.digest_hex(), "signed_by": p.signed_by() });
        match source {
            PolicySource::ControlPlane => detail["source"] = "control_plane".into(),
            PolicySource::Host(by) => detail = by.stamp(detail),
        }
        audit
            .record(AuditAction::PolicyUpdate, Outcome::Success, detail)
            .map_err(|e| PolicyRefused::Failed(e.to_string()))?;
        audit
            .anchor(&Anchor::PolicySerial { serial: p.serial(), digest: p.digest_hex() })
            .map_err(|e| PolicyRefused::Failed(e.to_string()))?;
        tracing::info!(serial = p.serial(), digest = %p.digest_hex(), ?source, "accepted a new customer policy");
    }
    Ok(p)
}

/// Why a policy was not put in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PolicyRefused {
    /// It does not verify or does not apply here: offering it again changes nothing.
    Invalid(PolicyRejection),
    /// Storing or auditing it failed (a full disk, say): it may succeed if offered again.
    Failed(String),
}

impl From<PolicyRefused> for ApplianceError {
    fn from(e: PolicyRefused) -> Self {
        match e {
            PolicyRefused::Invalid(why) => ApplianceError::Policy(why),
            PolicyRefused::Failed(why) => ApplianceError::Customer(why),
        }
    }
}

/// Why a signed policy can never be put in force here: the customer reads the sentence, code
/// and tests decide on the variant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyRejection {
    #[error("no customer key is pinned; the appliance accepts no policy")]
    NoPinnedKey,
    #[error("larger than 1 MiB; it is not a policy")]
    TooLarge,
    /// Its signatures, threshold, serial or content.
    #[error(transparent)]
    Verify(#[from] airlock_core::policy::PolicyError),
    #[error(transparent)]
    Environment(#[from] airlock_core::policy::EnvironmentMismatch),
    #[error("the appliance is not enrolled yet; a relayed policy cannot be placed")]
    NotEnrolled,
}

/// A policy is a few KiB; a larger file is not one.
const MAX_POLICY_BYTES: u64 = 1 << 20;

fn read_capped(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(MAX_POLICY_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if bytes.len() as u64 > MAX_POLICY_BYTES {
        return Err(format!("{} is larger than 1 MiB; it is not a policy", path.display()));
    }
    Ok(bytes)
}

fn split_pems(text: &str) -> Vec<String> {
    const END: &str = "-----END PUBLIC KEY-----";
    text.split_inclusive(END).filter(|p| p.contains(END)).map(|p| p.trim_start().to_owned()).collect()
}
