//! A CSR, PEM or DER: the parser (with its self-signature check) that join and renewal call.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = rcgen::CertificateSigningRequestParams::from_der(&data.to_vec().into());
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = rcgen::CertificateSigningRequestParams::from_pem(text);
        let _ = airlock_core::certificate::inspect_pem(text);
    }
    let _ = airlock_core::certificate::inspect_der(data);
});
