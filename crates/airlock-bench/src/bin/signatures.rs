//! Signature verification throughput: customer grants against raw Ed25519, and operation
//! manifests against raw verification of the same signatures, in one run.
//!
//! `cargo run --release -p airlock-bench --bin signatures [-- --seconds S]`
//!
//! A grant check is envelope JSON parsing + base64 + DSSE PAE + one Ed25519 verification +
//! the body's JSON parsing; the goal is at least 0.8× raw verification throughput.
//! A manifest check (`airlock verify`) carries eight signatures: four Ed25519 (the customer's
//! approval, release and attestation of the appliance's execution key, and that key's
//! signature on the execution) and four ECDSA P-256 (the control plane's request, the
//! appliance's certificate key on the execution, and the CA's signature on each of their
//! certificates). Its baseline verifies exactly those eight signatures over the same bytes with
//! the primitives alone; the goal is again at least 0.8×. Rounds of each measurement alternate, so all see the same machine
//! load; the median round counts.
#![allow(clippy::print_stdout)] // A benchmark reports on stdout.

use std::time::{Duration, Instant};

use airlock_core::customer_key::CustomerSigningKey;
use airlock_core::dsse::Envelope;
use airlock_core::grant::{ApprovalDecision, GRANT_PAYLOAD_TYPE, GrantBody, verify_grant};
use airlock_core::policy::Phase;
use airlock_core::{ApplianceId, Timestamp};

use airlock_testkit as fixture;

const ROUNDS: usize = 7;

fn main() {
    let seconds: f64 =
        std::env::args().skip_while(|a| a != "--seconds").nth(1).and_then(|s| s.parse().ok()).unwrap_or(1.0);
    let per_round = Duration::from_secs_f64(seconds / ROUNDS as f64 / 2.0);

    let key = CustomerSigningKey::from_seed([7; 32]);
    let public = key.public();
    let body = GrantBody {
        request_id: "op_0123456789abcdef0123456789abcdef".parse().expect("a valid operation id"),
        appliance: ApplianceId::from_random([1; 16]),
        phase: Phase::Operate,
        request_digest: "ab".repeat(32),
        command_sha256: "cd".repeat(32),
        decision: ApprovalDecision::Approve,
        decided_at: Timestamp::from_unix_millis(1_800_000_000_000),
        approver: "ops@customer.example".into(),
        reason: "restart after the incident".into(),
        not_before: Timestamp::from_unix_millis(1_800_000_000_000),
        not_after: Timestamp::from_unix_millis(1_800_003_600_000),
        nonce: "5f0c8a1e-nonce".into(),
    };
    let payload = serde_json::to_vec(&body).unwrap_or_default();
    let envelope = Envelope::new(GRANT_PAYLOAD_TYPE, payload.clone()).sign(&key).to_json().into_bytes();
    // The raw baseline verifies the same bytes the grant's signature covers.
    let message = airlock_core::dsse::pae(GRANT_PAYLOAD_TYPE, &payload);
    let signature = key.sign(&message);
    assert!(public.verify(&message, &signature), "baseline signature must verify");
    assert!(verify_grant(&envelope, std::slice::from_ref(&public), 1).is_ok(), "grant must verify");

    let manifest = ManifestBench::new();
    assert!(manifest.raw(), "baseline signatures must verify");
    assert!(manifest.full(), "manifest must verify");

    let (mut raw, mut grant, mut raw_six, mut full) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        raw.push(rate(per_round, || public.verify(&message, &signature)));
        grant.push(rate(per_round, || verify_grant(&envelope, std::slice::from_ref(&public), 1).is_ok()));
        raw_six.push(rate(per_round, || manifest.raw()));
        full.push(rate(per_round, || manifest.full()));
    }
    let (raw, grant, raw_six, full) = (median(raw), median(grant), median(raw_six), median(full));
    println!("signature verification, {ROUNDS} alternating rounds, median");
    println!("  raw Ed25519 verify (strict)                 {raw:>10.0} /s");
    println!("  customer grant (DSSE + Ed25519)             {grant:>10.0} /s");
    println!("  ratio grant / raw Ed25519                   {:>10.2} (goal >= 0.80)", grant / raw);
    println!("  grant envelope size                         {:>10} bytes", envelope.len());
    println!("  raw: a manifest's 8 signatures (4 Ed25519 + 4 ECDSA P-256) {raw_six:>10.0} sets/s");
    println!("  manifest (airlock verify, all checks)       {full:>10.0} /s");
    println!("  ratio manifest / its raw signatures         {:>10.2} (goal >= 0.80)", full / raw_six);
    println!("  manifest in raw Ed25519 verifications       {:>10.1}", raw / full);
    println!("  manifest size                               {:>10} bytes", manifest.json.len());
}

/// A complete signed manifest, and the eight signatures in it pulled out for the baseline.
struct ManifestBench {
    json: Vec<u8>,
    ca_der: Vec<u8>,
    keys: Vec<airlock_core::customer_key::CustomerPublicKey>,
    /// (index into `keys`, message, signature)
    ed25519: Vec<(usize, Vec<u8>, Vec<u8>)>,
    /// (SPKI point, message, DER signature)
    ecdsa: Vec<(Vec<u8>, Vec<u8>, Vec<u8>)>,
}

impl ManifestBench {
    fn new() -> Self {
        use airlock_core::operation::pem_certificate_der;
        use x509_parser::prelude::*;
        let fx = fixture::Fixture::new();
        let m = fx.manifest();
        let pae = |e: &Envelope| airlock_core::dsse::pae(&e.payload_type, &e.payload);
        let approval = m.approval.clone().unwrap_or_else(|| unreachable!());
        let release = m.release.clone().unwrap_or_else(|| unreachable!());
        let execution = m.execution.clone().unwrap_or_else(|| unreachable!());
        let attestation = m.appliance_attestation.clone().unwrap_or_else(|| unreachable!());
        // The execution is signed by the certificate's key, then by the execution key.
        let ed25519 = vec![
            (0, pae(&approval), approval.signatures[0].sig.clone()),
            (0, pae(&release), release.signatures[0].sig.clone()),
            (0, pae(&attestation), attestation.signatures[0].sig.clone()),
            (1, pae(&execution), execution.signatures[1].sig.clone()),
        ];
        let execution_key = fx.execution_key.public().to_pem().ok();
        let execution_key = execution_key
            .and_then(|pem| airlock_core::customer_key::CustomerPublicKey::from_pem(&pem).ok())
            .unwrap_or_else(|| unreachable!());
        let ca_der = fx.ca.der();
        let ca_point = parse_x509_certificate(&ca_der).map(|(_, c)| c.public_key().subject_public_key.data.to_vec());
        let ca_point = ca_point.unwrap_or_default();
        let mut ecdsa = Vec::new();
        for (env, cert_pem) in [(&m.request, &m.control_plane_certificate), (&execution, &fx.appliance.cert_pem)] {
            let der = pem_certificate_der(cert_pem).unwrap_or_default();
            let Ok((_, cert)) = parse_x509_certificate(&der) else { unreachable!() };
            let point = cert.public_key().subject_public_key.data.to_vec();
            ecdsa.push((point, pae(env), env.signatures[0].sig.clone()));
            ecdsa.push((ca_point.clone(), cert.tbs_certificate.as_ref().to_vec(), cert.signature_value.data.to_vec()));
        }
        let json = serde_json::to_vec(&m).unwrap_or_default();
        Self { json, ca_der, keys: vec![fx.customer.public(), execution_key], ed25519, ecdsa }
    }

    fn raw(&self) -> bool {
        let ed = self.ed25519.iter().all(|(key, msg, sig)| self.keys[*key].verify(msg, sig));
        let ec = self.ecdsa.iter().all(|(point, msg, sig)| {
            ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, point)
                .verify(msg, sig)
                .is_ok()
        });
        ed && ec
    }

    fn full(&self) -> bool {
        let inputs = airlock_core::operation::VerifyInputs {
            ca_der: &self.ca_der,
            customer_keys: &self.keys[..1],
            approvals_required: 1,
            policy: None,
            vendor_attested: airlock_core::operation::VendorAttested::Refuse,
        };
        airlock_core::operation::verify_manifest(&self.json, &inputs).is_ok()
    }
}

fn rate(budget: Duration, mut op: impl FnMut() -> bool) -> f64 {
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < budget {
        for _ in 0..64 {
            assert!(op(), "verification failed during the benchmark");
            n += 1;
        }
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
