//! A customer's approval (grant): envelope JSON as relayed, and a body signed by a pinned key.
#![no_main]
use airlock_core::grant::{GRANT_PAYLOAD_TYPE, verify_grant, verify_grant_envelope};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let pinned = airlock_fuzz::pinned();
    let _ = verify_grant(data, &pinned, 1);
    let _ = verify_grant_envelope(&airlock_fuzz::signed(GRANT_PAYLOAD_TYPE, data), &pinned, 1);
});
