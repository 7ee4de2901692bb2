//! One line of an audit log (a record) or of a checkpoint file, as `airlock audit verify` reads them.
#![no_main]
use airlock_core::audit::checkpoint::Checkpoint;
use airlock_core::audit::{Record, verify_chain};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else { return };
    for text in line.lines() {
        if let Ok(record) = serde_json::from_str::<Record>(text) {
            let _ = verify_chain(&record.chain.clone(), [&record], Some(record.head()));
            let _ = airlock_core::audit::anchor::Anchor::from_record(&record);
        }
        let _ = Checkpoint::from_line(text, &airlock_fuzz::customer_key().public());
    }
});
