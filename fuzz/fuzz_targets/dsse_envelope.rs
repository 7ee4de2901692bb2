//! DSSE envelope JSON, and its verification against a pinned key.
#![no_main]
use airlock_core::dsse::Envelope;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(envelope) = Envelope::from_json(data) {
        let _ = envelope.verify(&envelope.payload_type.clone(), &airlock_fuzz::pinned(), 1);
        let _ = airlock_core::operation::signing_input(&envelope);
        let again = Envelope::from_json(envelope.to_json().as_bytes()).expect("an envelope re-reads");
        assert_eq!(again.payload, envelope.payload);
    }
});
