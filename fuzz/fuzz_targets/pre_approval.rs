//! A pre-approval: envelope JSON as relayed, and a body signed by a pinned key (its
//! constraints compile as patterns).
#![no_main]
use std::collections::BTreeMap;

use airlock_core::grant::{PRE_APPROVAL_PAYLOAD_TYPE, verify_pre_approval, verify_pre_approval_envelope};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let pinned = airlock_fuzz::pinned();
    let _ = verify_pre_approval(data, &pinned, 1);
    if let Ok(p) = verify_pre_approval_envelope(&airlock_fuzz::signed(PRE_APPROVAL_PAYLOAD_TYPE, data), &pinned, 1) {
        let args: BTreeMap<String, String> = p.body().constraints.keys().map(|k| (k.clone(), k.clone())).collect();
        let _ = p.constraints_match(&args);
    }
});
