//! An operation manifest, as `airlock verify` reads one offline.
#![no_main]
use std::sync::OnceLock;

use airlock_core::operation::{VendorAttested, VerifyInputs, verify_manifest};
use libfuzzer_sys::fuzz_target;

fn ca_der() -> &'static [u8] {
    static CA: OnceLock<Vec<u8>> = OnceLock::new();
    CA.get_or_init(|| {
        let key = rcgen::KeyPair::generate().expect("a CA key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).expect("a CA certificate").der().to_vec()
    })
}

fuzz_target!(|data: &[u8]| {
    let keys = airlock_fuzz::pinned();
    for vendor_attested in [VendorAttested::Refuse, VendorAttested::Accept] {
        let inputs = VerifyInputs {
            ca_der: ca_der(),
            customer_keys: &keys,
            approvals_required: 1,
            policy: None,
            vendor_attested,
        };
        let _ = verify_manifest(data, &inputs);
    }
});
