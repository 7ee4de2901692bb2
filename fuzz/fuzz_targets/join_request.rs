//! `POST /v1/join` body: the join JSON, then the CSR inside it, as the control plane reads them.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = serde_json::from_slice::<airlock_proto::join::JoinRequest>(data) {
        let _ = rcgen::CertificateSigningRequestParams::from_pem(&req.csr_pem);
    }
    let _ = serde_json::from_slice::<airlock_proto::join::JoinResponse>(data);
});
