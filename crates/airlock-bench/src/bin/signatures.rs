//! Signature verification throughput: customer grants against raw Ed25519, in one run.
//!
//! `cargo run --release -p airlock-bench --bin signatures [-- --seconds S]`
//!
//! A grant check is envelope JSON parsing + base64 + DSSE PAE + one Ed25519 verification +
//! the body's JSON parsing; the goal is at least 0.8× raw verification throughput. Rounds of
//! each measurement alternate, so both see the same machine load; the median round counts.
#![allow(clippy::print_stdout)] // A benchmark reports on stdout.

use std::time::{Duration, Instant};

use airlock_core::customer_key::CustomerSigningKey;
use airlock_core::dsse::Envelope;
use airlock_core::grant::{ApprovalDecision, GRANT_PAYLOAD_TYPE, GrantBody, verify_grant};
use airlock_core::policy::Phase;
use airlock_core::{ApplianceId, Timestamp};

const ROUNDS: usize = 7;

fn main() {
    let seconds: f64 =
        std::env::args().skip_while(|a| a != "--seconds").nth(1).and_then(|s| s.parse().ok()).unwrap_or(1.0);
    let per_round = Duration::from_secs_f64(seconds / ROUNDS as f64 / 2.0);

    let key = CustomerSigningKey::from_seed([7; 32]);
    let public = key.public();
    let body = GrantBody {
        request_id: "op_0123456789abcdef0123456789abcdef".into(),
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

    let mut raw = Vec::new();
    let mut grant = Vec::new();
    for _ in 0..ROUNDS {
        raw.push(rate(per_round, || public.verify(&message, &signature)));
        grant.push(rate(per_round, || verify_grant(&envelope, std::slice::from_ref(&public), 1).is_ok()));
    }
    let (raw, grant) = (median(raw), median(grant));
    println!("signature verification, {ROUNDS} alternating rounds, median");
    println!("  raw Ed25519 verify (strict)        {raw:>10.0} /s");
    println!("  customer grant (DSSE + Ed25519)    {grant:>10.0} /s");
    println!("  ratio grant / raw                  {:>10.2} (goal >= 0.80)", grant / raw);
    println!("  envelope size                      {:>10} bytes", envelope.len());
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
