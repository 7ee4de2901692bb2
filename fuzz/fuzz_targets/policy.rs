//! The customer's policy: TOML as the customer signs it, and as a signed envelope.
#![no_main]
use airlock_core::policy::{POLICY_PAYLOAD_TYPE, PolicyDocument, verify_signed_policy};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(doc) = PolicyDocument::parse(text)
    {
        let _ = doc.warnings();
    }
    let pinned = airlock_fuzz::pinned();
    let _ = verify_signed_policy(data, &pinned, None);
    let envelope = airlock_fuzz::signed(POLICY_PAYLOAD_TYPE, data).to_json();
    let _ = verify_signed_policy(envelope.as_bytes(), &pinned, None);
});
