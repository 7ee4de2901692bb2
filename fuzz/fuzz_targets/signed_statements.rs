//! The customer's other signed statements the appliance reads: a key rotation and an execution
//! key attestation, signed by a pinned key so their bodies are parsed.
#![no_main]
use airlock_core::execution_key::{ATTESTATION_PAYLOAD_TYPE, verify_attestation};
use airlock_core::key_rotation::{KEY_ROTATION_PAYLOAD_TYPE, verify_key_rotation};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let pinned = airlock_fuzz::pinned();
    let _ = verify_key_rotation(data, &pinned, 1);
    let rotation = airlock_fuzz::signed(KEY_ROTATION_PAYLOAD_TYPE, data).to_json();
    let _ = verify_key_rotation(rotation.as_bytes(), &pinned, 1);
    let _ = verify_attestation(&airlock_fuzz::signed(ATTESTATION_PAYLOAD_TYPE, data), &pinned, 1);
});
