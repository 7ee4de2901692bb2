//! The customer's side in tests: numbered key pairs and what they sign.
//!
//! Customer key `n` is always the same key (seed `[n; 32]`), so a test names keys by number
//! and two processes of one test agree on them.

use airlock_core::Timestamp;
use airlock_core::customer_key::{CustomerPublicKey, CustomerSigningKey};
use airlock_core::dsse::Envelope;
use airlock_core::grant::{
    ApprovalDecision, GRANT_PAYLOAD_TYPE, GrantBody, OperationRequest, PRE_APPROVAL_PAYLOAD_TYPE, PreApprovalBody,
};
use airlock_core::operation::{RELEASE_PAYLOAD_TYPE, ReleaseStatement};
use airlock_core::policy::POLICY_PAYLOAD_TYPE;

/// Customer key number `n`.
pub fn key(n: u8) -> CustomerSigningKey {
    CustomerSigningKey::from_seed([n; 32])
}

/// The public halves of keys `ns`, as an appliance pins them.
pub fn public_keys(ns: &[u8]) -> Vec<CustomerPublicKey> {
    ns.iter().map(|n| key(*n).public()).collect()
}

/// Signs `payload` as a DSSE envelope with each of keys `ns`.
pub fn sign(payload_type: &str, payload: Vec<u8>, ns: &[u8]) -> Envelope {
    ns.iter().fold(Envelope::new(payload_type, payload), |env, n| env.sign(&key(*n)))
}

/// A policy (TOML) signed by keys `ns`, as envelope JSON.
pub fn signed_policy(toml: &str, ns: &[u8]) -> String {
    sign(POLICY_PAYLOAD_TYPE, toml.as_bytes().to_vec(), ns).to_json()
}

/// An approval of exactly `req`, valid from `not_before` to `not_after`, with a nonce unique
/// to the request. Edit the body before signing it to break one binding.
pub fn approval(req: &OperationRequest, not_before: Timestamp, not_after: Timestamp) -> GrantBody {
    GrantBody {
        request_id: req.id,
        appliance: req.appliance,
        phase: req.phase,
        request_digest: req.digest_hex(),
        command_sha256: req.command_sha256.clone(),
        decision: ApprovalDecision::Approve,
        decided_at: not_before,
        approver: "alice".into(),
        reason: "looks fine".into(),
        not_before,
        not_after,
        nonce: format!("nonce-{}", req.id),
    }
}

/// A grant (approval or denial) signed by keys `ns`, as envelope JSON.
pub fn sign_grant(body: &GrantBody, ns: &[u8]) -> String {
    sign(GRANT_PAYLOAD_TYPE, serde_json::to_vec(body).unwrap(), ns).to_json()
}

/// A pre-approval signed by keys `ns`, as envelope JSON.
pub fn sign_pre_approval(body: &PreApprovalBody, ns: &[u8]) -> String {
    sign(PRE_APPROVAL_PAYLOAD_TYPE, serde_json::to_vec(body).unwrap(), ns).to_json()
}

/// A release (or withholding) signed by keys `ns`, as envelope JSON.
pub fn sign_release(body: &ReleaseStatement, ns: &[u8]) -> String {
    sign(RELEASE_PAYLOAD_TYPE, serde_json::to_vec(body).unwrap(), ns).to_json()
}
