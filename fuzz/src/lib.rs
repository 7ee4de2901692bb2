//! What the fuzz targets share: fixed keys, so a target can sign fuzzed bytes and reach the
//! parser behind a signature check (a verifier parses a payload only once it is signed).
#![allow(clippy::unwrap_used, clippy::expect_used)] // A broken fixture is a broken target.

use airlock_core::customer_key::{CustomerPublicKey, CustomerSigningKey};
use airlock_core::dsse::Envelope;

/// The customer key every target signs with and pins.
pub fn customer_key() -> CustomerSigningKey {
    CustomerSigningKey::from_seed([7; 32])
}

pub fn pinned() -> Vec<CustomerPublicKey> {
    vec![customer_key().public()]
}

/// `payload` as the customer would sign it, as envelope JSON.
pub fn signed(payload_type: &str, payload: &[u8]) -> Envelope {
    Envelope::new(payload_type, payload.to_vec()).sign(&customer_key())
}

/// Splits at the first NUL: two inputs from one (a manifest and its script, say).
pub fn split(data: &[u8]) -> (&[u8], &[u8]) {
    match data.iter().position(|b| *b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[]),
    }
}
