//! Offline manifest verification: a good manifest passes every check, and each forged,
//! edited or mismatched part fails the check that names it.

#![allow(clippy::unwrap_used)]

use airlock_core::Timestamp;
use airlock_core::customer_key::CustomerSigningKey;
use airlock_core::dsse::Envelope;
use airlock_core::execution_key::{AttestationRefusal, ExecutionKeyAttestation, ExecutionSigningKey};
use airlock_core::grant::{
    ApprovalDecision, ApprovalLevel, DenyReason, GRANT_PAYLOAD_TYPE, PRE_APPROVAL_PAYLOAD_TYPE, PreApprovalBody,
};
use airlock_core::operation::{
    AuthorityKind, AuthorityRef, EXECUTION_PAYLOAD_TYPE, ExecutionTrust, Manifest, ManifestError, ManifestReport,
    OpenedAs, OutputCommitment, OutputSalt, RELEASE_PAYLOAD_TYPE, REQUEST_PAYLOAD_TYPE, ReleaseDecision,
    VendorAttested, VerifyInputs, output_release_allowed, sha256_hex, verify_chain, verify_manifest,
    verify_released_output,
};
use airlock_core::policy::{POLICY_PAYLOAD_TYPE, Phase, VerifiedPolicy, verify_signed_policy};
use airlock_core::probe::BuiltinProbe;
use airlock_core::template::RenderedCommand;
use airlock_testkit::signed_operation::{OUTPUT, OUTPUT_SALT};
use airlock_testkit::{Ca, Fixture, NOW, Parts};

type Edit = Box<dyn FnOnce(&mut Parts)>;

fn verify(fx: &Fixture, m: &Manifest) -> Result<ManifestReport, String> {
    verify_with(fx, m, VendorAttested::Refuse).map_err(|e| e.check.to_owned())
}

fn verify_with(fx: &Fixture, m: &Manifest, vendor_attested: VendorAttested) -> Result<ManifestReport, ManifestError> {
    let keys = [fx.customer.public()];
    let ca = fx.ca.der();
    let inputs =
        VerifyInputs { ca_der: &ca, customer_keys: &keys, approvals_required: 1, policy: None, vendor_attested };
    verify_manifest(serde_json::to_string(m).unwrap().as_bytes(), &inputs)
}

fn failing_check(fx: &Fixture, edit: impl FnOnce(&mut Parts)) -> String {
    let mut parts = fx.parts();
    edit(&mut parts);
    verify(fx, &fx.assemble(&parts)).err().unwrap_or_else(|| "passed".into())
}

#[test]
fn complete_manifest_passes_every_check() {
    let fx = Fixture::new();
    let report = verify(&fx, &fx.manifest()).unwrap();
    assert_eq!(
        report.checks,
        [
            "manifest.format",
            "request.signature",
            "request.signer",
            "request.id",
            "request.command",
            "approval.signature",
            "approval.binding",
            "execution.signature",
            "execution.signer",
            "execution.attestation",
            "execution.attested-key",
            "request.execution-key",
            "execution.binding",
            "execution.authority",
            "execution.built-in-denies",
            "execution.output",
            "release.signature",
            "release.binding",
            "output.salt",
        ]
    );
    assert!(output_release_allowed(&report));
    // The execution names a policy the verifier was not given: its rules are not checked.
    assert!(!report.policy_checked);
    assert_eq!(
        report.execution_trust,
        Some(ExecutionTrust::CustomerAttested {
            key_id: fx.execution_key.public().key_id().to_owned(),
            attested_at: Timestamp::from_unix_millis(NOW),
            attested_by: "alice@customer.example".into(),
        })
    );
}

/// The execution as the vendor forges it: edited, and signed under a certificate its CA minted
/// for the appliance's identity, without the appliance's execution key.
fn forged_by_the_ca(fx: &Fixture) -> Manifest {
    let mut parts = fx.parts();
    parts.execution.exit_code = Some(1);
    let mut m = fx.assemble(&parts);
    let minted = fx.ca.issue(&fx.identity.uri());
    m.execution = Some(minted.sign(Envelope::new(EXECUTION_PAYLOAD_TYPE, m.execution.unwrap().payload)));
    m.appliance_certificate = Some(minted.cert_pem.clone());
    m
}

#[test]
fn an_execution_signed_only_under_a_ca_issued_certificate_is_refused() {
    let fx = Fixture::new();
    // The customer's attestation copied from a genuine manifest does not cover the forgery.
    let forged = forged_by_the_ca(&fx);
    let err = verify_with(&fx, &forged, VendorAttested::Refuse).unwrap_err();
    assert_eq!(err.check, "execution.attested-key");
    assert_eq!(err.attestation, Some(AttestationRefusal::NotSignedByAttestedKey));
    // Nor is one allowed for old manifests.
    assert_eq!(
        verify_with(&fx, &forged, VendorAttested::Accept).unwrap_err().attestation,
        Some(AttestationRefusal::NotSignedByAttestedKey)
    );
    // Without the attestation it is vouched for by the CA alone: refused unless asked for.
    let mut bare = forged;
    bare.appliance_attestation = None;
    let err = verify_with(&fx, &bare, VendorAttested::Refuse).unwrap_err();
    assert_eq!((err.check, err.attestation), ("execution.attestation", Some(AttestationRefusal::VendorAttestedOnly)));
    // The vendor attesting a key of its own, with its own key: not a customer signature.
    let vendor_key = ExecutionSigningKey::from_seed([66; 32]);
    let mut statement = fx.attestation_statement();
    statement.execution_key = vendor_key.public().to_pem().unwrap();
    let mut m = fx.manifest();
    m.execution = Some(vendor_key.sign(m.execution.unwrap()));
    m.appliance_attestation = Some(statement.envelope().sign(&CustomerSigningKey::from_seed([66; 32])));
    let err = verify_with(&fx, &m, VendorAttested::Accept).unwrap_err();
    assert_eq!(err.check, "execution.attestation");
    assert!(matches!(err.attestation, Some(AttestationRefusal::NotCustomerSigned(_))), "{err:?}");
}

#[test]
fn an_attestation_signed_by_a_key_that_is_not_pinned_is_refused() {
    let fx = Fixture::new();
    let stranger = CustomerSigningKey::from_seed([8; 32]);
    let mut m = fx.manifest();
    m.appliance_attestation = Some(fx.attestation_statement().envelope().sign(&stranger));
    let err = verify_with(&fx, &m, VendorAttested::Accept).unwrap_err();
    assert_eq!(err.check, "execution.attestation");
    assert!(matches!(err.attestation, Some(AttestationRefusal::NotCustomerSigned(_))), "{err:?}");
    // A payload edited after the customer signed it.
    let mut m = fx.manifest();
    let att = m.appliance_attestation.as_mut().unwrap();
    att.payload = String::from_utf8(att.payload.clone()).unwrap().replacen("alice", "mallo", 1).into_bytes();
    assert!(matches!(
        verify_with(&fx, &m, VendorAttested::Accept).unwrap_err().attestation,
        Some(AttestationRefusal::NotCustomerSigned(_))
    ));
}

#[test]
fn an_attestation_for_another_appliance_is_refused() {
    let fx = Fixture::new();
    let edits: [fn(&mut ExecutionKeyAttestation); 3] = [
        |s| s.appliance = airlock_core::ApplianceId::from_random([4; 16]),
        |s| s.environment = airlock_core::EnvironmentId::from_random([4; 16]),
        |s| s.tenant = airlock_core::TenantId::from_random([4; 16]),
    ];
    for edit in edits {
        let mut statement = fx.attestation_statement();
        edit(&mut statement);
        let mut m = fx.manifest();
        m.appliance_attestation = Some(statement.envelope().sign(&fx.customer));
        let err = verify_with(&fx, &m, VendorAttested::Accept).unwrap_err();
        assert_eq!((err.check, err.attestation), ("execution.attestation", Some(AttestationRefusal::OtherAppliance)));
    }
}

#[test]
fn an_old_manifest_without_attestation_is_reported_vendor_attested_only() {
    let fx = Fixture::new();
    // A request from before attestations names no host either.
    let mut parts = fx.parts();
    parts.request.request.execution_key = None;
    rebind(&mut parts);
    let mut m = fx.assemble(&parts);
    m.appliance_attestation = None;
    // As it was serialized before attestations: no field at all.
    assert!(!serde_json::to_string(&m).unwrap().contains("appliance_attestation"));
    let err = verify_with(&fx, &m, VendorAttested::Refuse).unwrap_err();
    assert_eq!(err.attestation, Some(AttestationRefusal::VendorAttestedOnly));
    assert!(err.to_string().contains("--allow-vendor-attested"), "{err}");
    let report = verify_with(&fx, &m, VendorAttested::Accept).unwrap();
    assert_eq!(report.execution_trust, Some(ExecutionTrust::VendorAttestedOnly));
    assert!(!report.checks.contains(&"execution.attestation"));
    // An attestation with no execution to vouch for is not a manifest anyone made.
    let mut m = fx.manifest();
    m.execution = None;
    m.appliance_certificate = None;
    m.release = None;
    m.output_salt = None;
    assert_eq!(verify(&fx, &m).unwrap_err(), "execution.signature");
}

#[test]
fn each_signed_payload_edited_after_signing_is_caught() {
    let fx = Fixture::new();
    let edit = |m: &mut Manifest, which: &str| {
        let env = match which {
            "request" => &mut m.request,
            "approval" => m.approval.as_mut().unwrap(),
            "execution" => m.execution.as_mut().unwrap(),
            _ => m.release.as_mut().unwrap(),
        };
        // Same length, one character changed: only the signature can tell.
        let text = String::from_utf8(env.payload.clone()).unwrap();
        env.payload = text.replacen("op_0011", "op_0012", 1).into_bytes();
        assert_ne!(env.payload, text.into_bytes(), "{which} payload must contain the request id");
    };
    for (which, check) in [
        ("request", "request.signature"),
        ("approval", "approval.signature"),
        ("execution", "execution.signature"),
        ("release", "release.signature"),
    ] {
        let mut m = fx.manifest();
        edit(&mut m, which);
        assert_eq!(verify(&fx, &m).unwrap_err(), check, "editing the {which}");
    }
}

#[test]
fn each_binding_mismatch_names_its_check() {
    let fx = Fixture::new();
    let cases: Vec<(&str, Edit)> = vec![
        ("request.command", Box::new(|p| p.request.command.script.push_str("rm -rf /\n"))),
        ("approval.binding", Box::new(|p| p.approval.request_digest = "00".repeat(32))),
        ("approval.binding", Box::new(|p| p.approval.appliance = airlock_core::ApplianceId::from_random([9; 16]))),
        ("approval.binding", Box::new(|p| p.approval.command_sha256 = "00".repeat(32))),
        ("execution.binding", Box::new(|p| p.execution.request_digest = "00".repeat(32))),
        ("execution.binding", Box::new(|p| p.execution.command_sha256 = "00".repeat(32))),
        ("execution.authority", Box::new(|p| p.execution.authority.digest = Some("00".repeat(32)))),
        ("execution.authority", Box::new(|p| p.execution.authority.kind = AuthorityKind::PreApproval)),
        (
            "release.binding",
            Box::new(|p| p.release.output_commitment = OutputCommitment::Salted { digest: "00".repeat(32), size: 18 }),
        ),
        (
            "release.binding",
            Box::new(|p| {
                let size = p.execution.output_commitment.size().unwrap() + 1;
                let digest = p.execution.output_commitment.digest().unwrap().to_owned();
                p.release.output_commitment = OutputCommitment::Salted { digest, size };
            }),
        ),
        // A release naming the same output by its plain digest: never taken for the salted one.
        (
            "release.binding",
            Box::new(|p| {
                p.release.output_commitment =
                    OutputCommitment::LegacyUnsalted { sha256: sha256_hex(OUTPUT), size: OUTPUT.len() as u64 }
            }),
        ),
    ];
    for (check, edit) in cases {
        assert_eq!(failing_check(&fx, edit), check);
    }
}

#[test]
fn execution_after_a_denial_or_outside_the_window_fails() {
    let fx = Fixture::new();
    let denied = failing_check(&fx, |p| {
        p.approval.decision = ApprovalDecision::Deny;
        p.execution.authority.digest = Some(p.approval.digest_hex());
    });
    assert_eq!(denied, "execution.authority");
    let late = failing_check(&fx, |p| {
        p.execution.started_at = p.approval.not_after;
    });
    assert_eq!(late, "execution.authority");
}

#[test]
fn signatures_by_the_wrong_party_are_refused() {
    let fx = Fixture::new();
    // The request signed by the appliance's key (a CA-issued certificate, but not the control plane's).
    let mut m = fx.manifest();
    m.request = fx.appliance.sign(Envelope::new(REQUEST_PAYLOAD_TYPE, m.request.payload.clone()));
    m.control_plane_certificate = fx.appliance.cert_pem.clone();
    assert_eq!(verify(&fx, &m).unwrap_err(), "request.signer");

    // The execution signed by another appliance of the same CA.
    let mut m = fx.manifest();
    let mut other = fx.identity.clone();
    other.appliance = airlock_core::ApplianceId::from_random([4; 16]);
    let imposter = fx.ca.issue(&other.uri());
    m.execution = Some(imposter.sign(Envelope::new(EXECUTION_PAYLOAD_TYPE, m.execution.unwrap().payload)));
    m.appliance_certificate = Some(imposter.cert_pem.clone());
    assert_eq!(verify(&fx, &m).unwrap_err(), "execution.signer");

    // Certificates from another CA, naming the right identities.
    let rogue = Ca::new("Rogue CA");
    let mut m = fx.manifest();
    let rogue_cp = rogue.issue(&format!("spiffe://{}/control-plane", airlock_testkit::TRUST_DOMAIN));
    m.request = rogue_cp.sign(Envelope::new(REQUEST_PAYLOAD_TYPE, m.request.payload.clone()));
    m.control_plane_certificate = rogue_cp.cert_pem.clone();
    assert_eq!(verify(&fx, &m).unwrap_err(), "request.signature");
    let mut m = fx.manifest();
    let rogue_appliance = rogue.issue(&fx.identity.uri());
    m.execution = Some(rogue_appliance.sign(Envelope::new(EXECUTION_PAYLOAD_TYPE, m.execution.unwrap().payload)));
    m.appliance_certificate = Some(rogue_appliance.cert_pem.clone());
    assert_eq!(verify(&fx, &m).unwrap_err(), "execution.signature");

    // Approval and release signed by a key the verifier does not hold.
    let stranger = CustomerSigningKey::from_seed([8; 32]);
    let mut m = fx.manifest();
    m.approval = Some(Envelope::new(GRANT_PAYLOAD_TYPE, m.approval.unwrap().payload).sign(&stranger));
    assert_eq!(verify(&fx, &m).unwrap_err(), "approval.signature");
    let mut m = fx.manifest();
    m.release = Some(Envelope::new(RELEASE_PAYLOAD_TYPE, m.release.unwrap().payload).sign(&stranger));
    assert_eq!(verify(&fx, &m).unwrap_err(), "release.signature");
}

#[test]
fn missing_and_malformed_parts_are_refused() {
    let fx = Fixture::new();
    let keys = [fx.customer.public()];
    let ca = fx.ca.der();
    let inputs = VerifyInputs {
        ca_der: &ca,
        customer_keys: &keys,
        approvals_required: 1,
        policy: None,
        vendor_attested: VendorAttested::Refuse,
    };
    for bad in [&b"{"[..], b"[]", b"{\"format\":\"airlock-operation-manifest-v1\"}"] {
        assert_eq!(verify_manifest(bad, &inputs).unwrap_err().check, "manifest.format");
    }
    let mut m = fx.manifest();
    m.format = "something-else".into();
    assert_eq!(verify(&fx, &m).unwrap_err(), "manifest.format");

    // An execution with no approval at all.
    let mut m = fx.manifest();
    m.approval = None;
    assert_eq!(verify(&fx, &m).unwrap_err(), "execution.authority");
    // An execution without the certificate that signed it.
    let mut m = fx.manifest();
    m.appliance_certificate = None;
    assert_eq!(verify(&fx, &m).unwrap_err(), "execution.signature");
    // Another manifest's request under this manifest's id.
    let mut m = fx.manifest();
    m.request_id = "op_ffffffffffffffffffffffffffffffff".parse().unwrap();
    assert_eq!(verify(&fx, &m).unwrap_err(), "request.id");
    // Two approvals required, one given.
    let keys = [fx.customer.public(), CustomerSigningKey::from_seed([8; 32]).public()];
    let inputs = VerifyInputs {
        ca_der: &ca,
        customer_keys: &keys,
        approvals_required: 2,
        policy: None,
        vendor_attested: VendorAttested::Refuse,
    };
    let err = verify_manifest(serde_json::to_string(&fx.manifest()).unwrap().as_bytes(), &inputs).unwrap_err();
    assert_eq!(err.check, "approval.signature");
}

#[test]
fn a_pending_manifest_verifies_as_far_as_it_goes() {
    let fx = Fixture::new();
    let mut m = fx.manifest();
    m.release = None;
    m.output_salt = None;
    let report = verify(&fx, &m).unwrap();
    assert!(report.release.is_none());
    assert!(!output_release_allowed(&report), "no release, no output");
    m.execution = None;
    m.appliance_certificate = None;
    m.appliance_attestation = None;
    let report = verify(&fx, &m).unwrap();
    assert!(report.execution.is_none() && report.execution_trust.is_none());
}

#[test]
fn manifests_chain_and_a_gap_is_detected() {
    let fx = Fixture::new();
    let first = fx.parts();
    let mut second = fx.parts();
    second.execution.sequence = 2;
    second.execution.previous_manifest_sha256 = Some(first.execution.manifest_sha256());
    let mut third = fx.parts();
    third.execution.sequence = 3;
    third.execution.previous_manifest_sha256 = Some(second.execution.manifest_sha256());
    let reports: Vec<_> = [&first, &second, &third].iter().map(|p| verify(&fx, &fx.assemble(p)).unwrap()).collect();
    verify_chain(&reports).unwrap();
    let gap = [reports[0].clone(), reports[2].clone()];
    assert_eq!(verify_chain(&gap).unwrap_err().check, "chain.link");
    let reordered = [reports[1].clone(), reports[0].clone()];
    assert_eq!(verify_chain(&reordered).unwrap_err().check, "chain.link");
}

#[test]
fn a_chain_that_wraps_from_the_largest_sequence_to_zero_is_a_break() {
    // `u64::MAX + 1` is 0 in a release build: unchecked, this pair would link.
    let fx = Fixture::new();
    let mut last = fx.parts();
    last.execution.sequence = u64::MAX;
    let mut wrapped = fx.parts();
    wrapped.execution.sequence = 0;
    wrapped.execution.previous_manifest_sha256 = Some(last.execution.manifest_sha256());
    let reports: Vec<_> = [&last, &wrapped].iter().map(|p| verify(&fx, &fx.assemble(p)).unwrap()).collect();
    assert_eq!(verify_chain(&reports).unwrap_err().check, "chain.link");
}

#[test]
fn after_an_attested_execution_one_vouched_for_by_the_ca_alone_breaks_the_chain() {
    let fx = Fixture::new();
    let first = fx.parts();
    // A request naming no host (one naming the attested host's key fails on its own, see
    // `a_request_approved_for_one_host_does_not_verify_when_another_host_ran_it`).
    let mut second = fx.parts();
    second.request.request.execution_key = None;
    rebind(&mut second);
    second.execution.sequence = 2;
    second.execution.previous_manifest_sha256 = Some(first.execution.manifest_sha256());
    let attested = verify(&fx, &fx.assemble(&first)).unwrap();
    // The vendor drops the attestation from the next manifest, as from a forged one.
    let mut stripped = fx.assemble(&second);
    stripped.appliance_attestation = None;
    let vendor_only = verify_with(&fx, &stripped, VendorAttested::Accept).unwrap();
    assert_eq!(vendor_only.execution_trust, Some(ExecutionTrust::VendorAttestedOnly));
    assert_eq!(verify_chain(&[attested, vendor_only]).unwrap_err().check, "chain.attestation");
}

#[test]
fn a_request_signed_for_another_environment_does_not_verify_for_this_one() {
    let fx = Fixture::new();
    let mut parts = fx.parts();
    parts.request.request.environment = Some(airlock_core::EnvironmentId::from_random([7; 16]));
    parts.request.request.command_sha256 = parts.request.command.sha256();
    assert_eq!(verify(&fx, &fx.assemble(&parts)).unwrap_err(), "request.environment");
}

#[test]
fn a_request_approved_for_one_host_does_not_verify_when_another_host_ran_it() {
    let fx = Fixture::new();
    // Two hosts the vendor gave one appliance id, each attested by the customer: the request
    // names host A's key, host B's key signed the execution and its attestation rides along.
    let mut parts = fx.parts();
    let host_a = ExecutionSigningKey::from_seed([21; 32]);
    parts.request.request.execution_key = Some(host_a.public().key_id().to_owned());
    rebind(&mut parts);
    let err = verify_with(&fx, &fx.assemble(&parts), VendorAttested::Refuse).unwrap_err();
    assert_eq!(err.check, "request.execution-key");
    assert!(err.reason.contains(host_a.public().key_id()), "{}", err.reason);
    // Nor does stripping the attestation help, even where vendor-attested manifests are allowed.
    let mut stripped = fx.assemble(&parts);
    stripped.appliance_attestation = None;
    assert_eq!(verify_with(&fx, &stripped, VendorAttested::Accept).unwrap_err().check, "request.execution-key");
    // Run on the host it names, it verifies and says so.
    let report = verify(&fx, &fx.manifest()).unwrap();
    assert!(report.checks.contains(&"request.execution-key"));
}

#[test]
fn an_attested_execution_never_carries_a_legacy_unsalted_digest() {
    let fx = Fixture::new();
    let mut parts = fx.parts();
    parts.execution.output_commitment = OutputCommitment::LegacyUnsalted { sha256: sha256_hex(OUTPUT), size: 12 };
    assert_eq!(verify(&fx, &fx.assemble(&parts)).unwrap_err(), "execution.output");
}

fn signed_policy(fx: &Fixture, windows: &str) -> VerifiedPolicy {
    let text = format!("version = 1\nserial = 1\nphases = [\"observe\", \"operate\"]\n{windows}");
    let env = Envelope::new(POLICY_PAYLOAD_TYPE, text.into_bytes()).sign(&fx.customer);
    verify_signed_policy(env.to_json().as_bytes(), &[fx.customer.public()], None).unwrap()
}

#[test]
fn executions_without_a_customer_signature_need_the_policy_that_allowed_them() {
    let fx = Fixture::new();
    let keys = [fx.customer.public()];
    let ca = fx.ca.der();
    // Tuesday 11:00-13:00 UTC covers the fixture's execution (Tuesday 12:01).
    let policy =
        signed_policy(&fx, "[[windows]]\nphase = \"operate\"\ndays = [\"tue\"]\nstart = \"11:00\"\nend = \"13:00\"\n");
    let elsewhere =
        signed_policy(&fx, "[[windows]]\nphase = \"operate\"\ndays = [\"wed\"]\nstart = \"11:00\"\nend = \"13:00\"\n");
    let in_window = |policy_digest: String| {
        let mut parts = fx.parts();
        parts.execution.authority =
            AuthorityRef { kind: AuthorityKind::StandingWindow, digest: None, policy_digest: Some(policy_digest) };
        let mut m = fx.assemble(&parts);
        m.approval = None;
        serde_json::to_vec(&m).unwrap()
    };
    let check = |json: &[u8], policy| {
        let inputs = VerifyInputs {
            ca_der: &ca,
            customer_keys: &keys,
            approvals_required: 1,
            policy,
            vendor_attested: VendorAttested::Refuse,
        };
        verify_manifest(json, &inputs).map(|_| ()).map_err(|e| e.check)
    };
    let m = in_window(policy.digest_hex());
    assert_eq!(check(&m, Some(&policy)), Ok(()));
    assert_eq!(check(&m, None), Err("execution.authority"), "a standing window needs the policy to check");
    let other = in_window(elsewhere.digest_hex());
    assert_eq!(check(&other, Some(&elsewhere)), Err("execution.authority"), "no window at that time");
    assert_eq!(check(&m, Some(&elsewhere)), Err("execution.authority"), "another policy");

    // A vendor template executed as if it were one of the appliance's own probes.
    let mut parts = fx.parts();
    parts.execution.authority = AuthorityRef { kind: AuthorityKind::Probe, digest: None, policy_digest: None };
    let mut m = fx.assemble(&parts);
    m.approval = None;
    assert_eq!(check(&serde_json::to_vec(&m).unwrap(), Some(&policy)), Err("execution.authority"));
}

// What the appliance would have refused verifies no more: each authority is held against the
// built-in denies, the built-in probes, and the customer's deny rules and caps.

const WINDOW: &str = "[[windows]]\nphase = \"operate\"\ndays = [\"tue\"]\nstart = \"11:00\"\nend = \"13:00\"\n";

/// A policy signed by `signers` of the fixture's customer key and a second key (seed 8).
fn policy_of(fx: &Fixture, extra: &str, signers: usize) -> VerifiedPolicy {
    let text = format!("version = 1\nserial = 1\nphases = [\"observe\", \"operate\"]\n{extra}");
    let mut env = Envelope::new(POLICY_PAYLOAD_TYPE, text.into_bytes()).sign(&fx.customer);
    if signers > 1 {
        env = env.sign(&second_key());
    }
    verify_signed_policy(env.to_json().as_bytes(), &[fx.customer.public(), second_key().public()], None).unwrap()
}

fn second_key() -> CustomerSigningKey {
    CustomerSigningKey::from_seed([8; 32])
}

/// Makes the approval and execution follow an edited request, as honest parties would sign.
fn rebind(p: &mut Parts) {
    let req = &p.request.request;
    p.approval.request_digest = req.digest_hex();
    p.approval.command_sha256 = req.command_sha256.clone();
    p.execution.request_digest = req.digest_hex();
    p.execution.command_sha256 = req.command_sha256.clone();
    if p.execution.authority.kind == AuthorityKind::Grant {
        p.execution.authority.digest = Some(p.approval.digest_hex());
    }
}

/// The manifest of `parts` run on `kind` of authority under `policy`, with what that authority needs.
fn run_on(fx: &Fixture, mut parts: Parts, kind: AuthorityKind, policy: Option<&VerifiedPolicy>) -> Manifest {
    parts.execution.authority = AuthorityRef { kind, digest: None, policy_digest: policy.map(|p| p.digest_hex()) };
    rebind(&mut parts);
    let mut pre = None;
    match kind {
        AuthorityKind::Grant => parts.execution.authority.digest = Some(parts.approval.digest_hex()),
        AuthorityKind::PreApproval => {
            let body = pre_approval_for(&parts);
            parts.execution.authority.digest = Some(body.digest_hex());
            pre = Some(Envelope::new(PRE_APPROVAL_PAYLOAD_TYPE, serde_json::to_vec(&body).unwrap()).sign(&fx.customer));
        }
        AuthorityKind::StandingWindow | AuthorityKind::Probe => {}
    }
    let mut m = fx.assemble(&parts);
    if kind != AuthorityKind::Grant {
        m.approval = None;
    }
    m.pre_approval = pre;
    m
}

fn pre_approval_for(parts: &Parts) -> PreApprovalBody {
    let req = &parts.request.request;
    PreApprovalBody {
        id: "pa-restarts".into(),
        appliance: req.appliance,
        template: req.kind.clone(),
        template_sha256: parts.request.command.template_sha256.clone(),
        phase: req.phase,
        not_before: Timestamp::from_unix_millis(NOW),
        not_after: Timestamp::from_unix_millis(NOW).saturating_add(std::time::Duration::from_secs(3600)),
        max_runs: 1,
        level: ApprovalLevel::Commands,
        constraints: Default::default(),
        approver: "alice@customer.example".into(),
        issued_at: Timestamp::from_unix_millis(NOW),
    }
}

/// Verifies with `policy` given; the failing check and its typed reason, or the report.
fn verify_under(
    fx: &Fixture,
    m: &Manifest,
    policy: Option<&VerifiedPolicy>,
) -> Result<ManifestReport, (&'static str, Option<DenyReason>)> {
    let keys = [fx.customer.public(), second_key().public()];
    let ca = fx.ca.der();
    let inputs = VerifyInputs {
        ca_der: &ca,
        customer_keys: &keys,
        approvals_required: 1,
        policy,
        vendor_attested: VendorAttested::Refuse,
    };
    verify_manifest(serde_json::to_string(m).unwrap().as_bytes(), &inputs).map_err(|e| (e.check, e.denied))
}

#[test]
fn every_authority_passes_under_the_policy_that_allowed_it() {
    let fx = Fixture::new();
    let policy = policy_of(&fx, WINDOW, 1);
    for kind in [AuthorityKind::Grant, AuthorityKind::PreApproval, AuthorityKind::StandingWindow] {
        let report = verify_under(&fx, &run_on(&fx, fx.parts(), kind, Some(&policy)), Some(&policy)).unwrap();
        assert!(report.policy_checked, "{kind}");
        let tail = ["execution.authority", "execution.built-in-denies", "execution.policy"];
        assert!(report.checks.windows(3).any(|w| w == tail), "{kind}: {:?}", report.checks);
    }
}

#[test]
fn a_request_the_customer_denied_fails_whatever_authority_it_ran_on() {
    let fx = Fixture::new();
    let by_value = format!("{WINDOW}[[deny]]\nid = \"no-billing\"\nany_value = \"billing\"\n");
    // The fixture's template names its variable `service`: a rule about `target` denies it too.
    let missing =
        format!("{WINDOW}[[deny]]\nid = \"no-target\"\nkind = \"restart-service\"\nargs = {{ target = \"x\" }}\n");
    for (policy, reason) in [
        (policy_of(&fx, &by_value, 1), DenyReason::DeniedByRule { rule: "no-billing".into() }),
        (
            policy_of(&fx, &missing, 1),
            DenyReason::RuleVariableMissing { rule: "no-target".into(), variable: "target".into() },
        ),
    ] {
        for kind in [AuthorityKind::Grant, AuthorityKind::PreApproval, AuthorityKind::StandingWindow] {
            let m = run_on(&fx, fx.parts(), kind, Some(&policy));
            assert_eq!(
                verify_under(&fx, &m, Some(&policy)).unwrap_err(),
                ("execution.policy", Some(reason.clone())),
                "{kind}"
            );
        }
    }
}

#[test]
fn a_standing_window_limited_to_other_templates_does_not_cover_an_execution() {
    let fx = Fixture::new();
    let limited = policy_of(
        &fx,
        &format!("{WINDOW}templates = [{{ name = \"restart-service\", sha256 = \"{}\" }}]\n", "0".repeat(64)),
        1,
    );
    let m = run_on(&fx, fx.parts(), AuthorityKind::StandingWindow, Some(&limited));
    assert_eq!(verify_under(&fx, &m, Some(&limited)).unwrap_err(), ("execution.authority", None));
    let this_one = policy_of(
        &fx,
        &format!(
            "{WINDOW}templates = [{{ name = \"restart-service\", sha256 = \"{}\" }}]\n",
            fx.parts().request.command.template_sha256
        ),
        1,
    );
    let m = run_on(&fx, fx.parts(), AuthorityKind::StandingWindow, Some(&this_one));
    assert!(verify_under(&fx, &m, Some(&this_one)).is_ok());
}

#[test]
fn a_secret_read_request_fails_even_with_a_grant_and_no_policy() {
    let fx = Fixture::new();
    for tag in ["secret:read", "Secret:Read"] {
        let mut parts = fx.parts();
        parts.request.request.data_tags.insert(tag.into());
        let m = run_on(&fx, parts, AuthorityKind::Grant, None);
        assert_eq!(
            verify_under(&fx, &m, None).unwrap_err(),
            ("execution.built-in-denies", Some(DenyReason::BuiltIn { rule: "builtin:no-secret-values" }))
        );
    }
}

#[test]
fn the_policys_caps_hold_for_grants() {
    let fx = Fixture::new();
    // The fixture's approval is valid for an hour; this policy allows at most one.
    let mut parts = fx.parts();
    parts.approval.not_after = parts.approval.not_before.saturating_add(std::time::Duration::from_secs(2 * 3600));
    let one_hour = policy_of(&fx, "max_grant_hours = 1\n", 1);
    let m = run_on(&fx, parts, AuthorityKind::Grant, Some(&one_hour));
    assert_eq!(
        verify_under(&fx, &m, Some(&one_hour)).unwrap_err(),
        ("execution.policy", Some(DenyReason::GrantTooLong { max_hours: 1 }))
    );
    // Two approvers required, one signed (the verifier was told one would do).
    let two = policy_of(&fx, "approvals_required = 2\n", 2);
    let m = run_on(&fx, fx.parts(), AuthorityKind::Grant, Some(&two));
    assert_eq!(
        verify_under(&fx, &m, Some(&two)).unwrap_err(),
        ("execution.policy", Some(DenyReason::NotEnoughApprovers { required: 2, signed: 1 }))
    );
    // A phase the policy does not enable.
    let observe_only = {
        let env = Envelope::new(POLICY_PAYLOAD_TYPE, b"version = 1\nserial = 1\nphases = [\"observe\"]\n".to_vec())
            .sign(&fx.customer);
        verify_signed_policy(env.to_json().as_bytes(), &[fx.customer.public()], None).unwrap()
    };
    let m = run_on(&fx, fx.parts(), AuthorityKind::Grant, Some(&observe_only));
    assert_eq!(
        verify_under(&fx, &m, Some(&observe_only)).unwrap_err(),
        ("execution.policy", Some(DenyReason::PhaseDisabled { phase: Phase::Operate }))
    );
}

#[test]
fn a_policy_other_than_the_one_the_execution_names_cannot_vouch_for_it() {
    let fx = Fixture::new();
    let in_force = policy_of(&fx, "", 1);
    let other = policy_of(&fx, "max_grant_hours = 3\n", 1);
    let m = run_on(&fx, fx.parts(), AuthorityKind::Grant, Some(&in_force));
    assert_eq!(verify_under(&fx, &m, Some(&other)).unwrap_err(), ("execution.policy", None));
    // Named but not given: verified as far as it goes, and the report says so.
    assert!(!verify_under(&fx, &m, None).unwrap().policy_checked);
}

/// The fixture's operation turned into a request for the `status` probe running `command`.
fn as_probe(fx: &Fixture, command: RenderedCommand, policy: Option<&VerifiedPolicy>) -> Manifest {
    let mut parts = fx.parts();
    let req = &mut parts.request.request;
    req.kind = "status".into();
    req.phase = Phase::Observe;
    req.args.clear();
    req.data_tags.clear();
    req.command_sha256 = command.sha256();
    parts.request.command = command;
    run_on(fx, parts, AuthorityKind::Probe, policy)
}

#[test]
fn only_the_appliances_own_probes_run_as_probes() {
    let fx = Fixture::new();
    let genuine = as_probe(&fx, BuiltinProbe::Status.command(), None);
    assert!(verify_under(&fx, &genuine, None).unwrap().policy_checked, "no policy in force: nothing else to check");
    let not_a_probe =
        |kind: &str| Err(("execution.authority", Some(DenyReason::NotBuiltinProbe { kind: kind.into() })));
    // An arbitrary script under the probe's name and template hash.
    let mut scripted = BuiltinProbe::Status.command();
    scripted.script = "#!/bin/sh\ncat /etc/shadow\n".into();
    assert_eq!(verify_under(&fx, &as_probe(&fx, scripted, None), None).map(|_| ()), not_a_probe("status"));
    // A variable smuggled into the probe's environment.
    let mut with_env = BuiltinProbe::Status.command();
    with_env.env.insert("LD_PRELOAD".into(), "/tmp/x.so".into());
    assert_eq!(verify_under(&fx, &as_probe(&fx, with_env, None), None).map(|_| ()), not_a_probe("status"));
    // Another probe's command under this name.
    let mut other = BuiltinProbe::Health.command();
    other.template = "status".into();
    assert_eq!(verify_under(&fx, &as_probe(&fx, other, None), None).map(|_| ()), not_a_probe("status"));
    // The fixture's own template, labelled a probe.
    let m = run_on(&fx, fx.parts(), AuthorityKind::Probe, None);
    assert_eq!(verify_under(&fx, &m, None).map(|_| ()), not_a_probe("restart-service"));
    // A genuine probe still meets the customer's deny rules.
    let deny_all = policy_of(&fx, "[[deny]]\nid = \"quiet\"\nkind = \"*\"\n", 1);
    let m = as_probe(&fx, BuiltinProbe::Status.command(), Some(&deny_all));
    assert_eq!(
        verify_under(&fx, &m, Some(&deny_all)).unwrap_err(),
        ("execution.policy", Some(DenyReason::DeniedByRule { rule: "quiet".into() }))
    );
}

#[test]
fn released_output_verifies_with_the_revealed_salt_and_altered_output_or_salt_does_not() {
    let fx = Fixture::new();
    let report = verify(&fx, &fx.manifest()).unwrap();
    assert!(!report.is_legacy_unsalted());
    assert_eq!(verify_released_output(&report, OUTPUT), Ok(OpenedAs::Salted));
    let mut altered = OUTPUT.to_vec();
    altered[0] ^= 1;
    assert_eq!(verify_released_output(&report, &altered).unwrap_err().check, "output.commitment");
    assert_eq!(verify_released_output(&report, &OUTPUT[1..]).unwrap_err().check, "output.commitment");
    // Another salt: the manifest still verifies (the salt is not signed), the output does not.
    let mut m = fx.manifest();
    m.output_salt = Some(OutputSalt::from_bytes([0x5b; 32]));
    let wrong_salt = verify(&fx, &m).unwrap();
    assert_eq!(verify_released_output(&wrong_salt, OUTPUT).unwrap_err().check, "output.commitment");
    // No salt revealed: nothing to check the output with.
    let mut m = fx.manifest();
    m.output_salt = None;
    let no_salt = verify(&fx, &m).unwrap();
    assert_eq!(verify_released_output(&no_salt, OUTPUT).unwrap_err().check, "output.commitment");
}

#[test]
fn a_salt_beside_output_that_is_not_released_is_refused() {
    let fx = Fixture::new();
    let withheld = failing_check(&fx, |p| p.release.decision = ReleaseDecision::Withhold);
    assert_eq!(withheld, "output.salt");
    let mut m = fx.manifest();
    m.release = None;
    assert_eq!(verify(&fx, &m).unwrap_err(), "output.salt");
    m.output_salt = None;
    let report = verify(&fx, &m).unwrap();
    assert_eq!(verify_released_output(&report, OUTPUT).unwrap_err().check, "output.commitment");
}

/// The fixture's operation with its request tagged `output:secret`, every binding redone.
fn secret_parts(fx: &Fixture) -> Parts {
    let mut p = fx.parts();
    p.request.request.data_tags.insert(airlock_core::grant::SECRET_OUTPUT_TAG.to_owned());
    p.approval.request_digest = p.request.request.digest_hex();
    p.execution.request_digest = p.request.request.digest_hex();
    p.execution.authority.digest = Some(p.approval.digest_hex());
    p.execution.output_commitment = OutputCommitment::Secret;
    p.execution.output_truncated = None;
    p.release.decision = ReleaseDecision::Withhold;
    p.release.output_commitment = OutputCommitment::Secret;
    p.output_salt = None;
    p
}

#[test]
fn a_secret_execution_signs_neither_digest_nor_size() {
    let fx = Fixture::new();
    let parts = secret_parts(&fx);
    let m = fx.assemble(&parts);
    let signed = String::from_utf8(m.execution.as_ref().unwrap().payload.clone()).unwrap();
    let sent = serde_json::from_str::<serde_json::Value>(&signed).unwrap();
    let fields: Vec<&str> = sent.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(sent["output_commitment"], "secret", "{signed}");
    for absent in ["output_sha256", "output_size", "output_truncated"] {
        assert!(!fields.contains(&absent), "{absent} in {signed}");
    }
    let salted = OutputCommitment::for_output(false, &OutputSalt::from_bytes(OUTPUT_SALT), OUTPUT);
    assert!(!signed.contains(salted.digest().unwrap()) && !signed.contains(&sha256_hex(OUTPUT)));
    let report = verify(&fx, &m).unwrap();
    assert!(!output_release_allowed(&report));
    assert_eq!(verify_released_output(&report, OUTPUT).unwrap_err().check, "output.commitment");

    // An execution of secret output that commits to it anyway, and the reverse, are refused.
    let mut leaky = secret_parts(&fx);
    leaky.execution.output_commitment = salted.clone();
    leaky.execution.output_truncated = Some(false);
    assert_eq!(verify(&fx, &fx.assemble(&leaky)).unwrap_err(), "execution.output");
    let mut silent = fx.parts();
    silent.execution.output_commitment = OutputCommitment::Secret;
    silent.execution.output_truncated = None;
    assert_eq!(verify(&fx, &fx.assemble(&silent)).unwrap_err(), "execution.output");
}

#[test]
fn two_runs_with_the_same_output_commit_differently() {
    let one = OutputCommitment::for_output(false, &OutputSalt::from_bytes([1; 32]), b"4821\n");
    let two = OutputCommitment::for_output(false, &OutputSalt::from_bytes([2; 32]), b"4821\n");
    assert_ne!(one.digest(), two.digest());
    assert_ne!(one.digest(), Some(sha256_hex(b"4821\n").as_str()));
}

/// An execution as appliances signed it before salted commitments, byte for byte.
fn legacy_execution_json(p: &Parts) -> String {
    let e = &p.execution;
    format!(
        concat!(
            r#"{{"request_id":"{}","appliance":"{}","request_digest":"{}","command_sha256":"{}","#,
            r#""authority":{},"status":"completed","started_at":{},"finished_at":{},"exit_code":0,"#,
            r#""output_sha256":"{}","output_size":{},"output_truncated":false,"sequence":1,"#,
            r#""previous_manifest_sha256":null}}"#
        ),
        e.request_id,
        e.appliance,
        e.request_digest,
        e.command_sha256,
        serde_json::to_string(&e.authority).unwrap(),
        serde_json::to_string(&e.started_at).unwrap(),
        serde_json::to_string(&e.finished_at).unwrap(),
        sha256_hex(OUTPUT),
        OUTPUT.len()
    )
}

#[test]
fn an_old_unsalted_manifest_still_verifies_and_is_reported_as_legacy() {
    let fx = Fixture::new();
    // Its request is as old: it names no host.
    let mut parts = fx.parts();
    parts.request.request.execution_key = None;
    rebind(&mut parts);
    let execution = legacy_execution_json(&parts);
    let release = format!(
        r#"{{"request_id":"{}","appliance":"{}","decision":"release","output_sha256":"{}","output_size":{},"decided_at":{},"approver":"alice","reason":""}}"#,
        parts.release.request_id,
        parts.release.appliance,
        sha256_hex(OUTPUT),
        OUTPUT.len(),
        serde_json::to_string(&parts.release.decided_at).unwrap(),
    );
    let mut m = fx.assemble(&parts);
    m.execution = Some(fx.appliance.sign(Envelope::new(EXECUTION_PAYLOAD_TYPE, execution.clone().into_bytes())));
    m.release = Some(Envelope::new(RELEASE_PAYLOAD_TYPE, release.into_bytes()).sign(&fx.customer));
    // Made before execution keys were attested: the CA's certificate alone vouches for it.
    m.appliance_attestation = None;
    let verify =
        |fx: &Fixture, m: &Manifest| verify_with(fx, m, VendorAttested::Accept).map_err(|e| e.check.to_owned());
    // An old manifest has no salt; a salt beside a legacy digest would be refused.
    let mut with_salt = m.clone();
    with_salt.output_salt = Some(OutputSalt::from_bytes(OUTPUT_SALT));
    assert_eq!(verify(&fx, &with_salt).unwrap_err(), "output.salt");
    m.output_salt = None;
    let json = serde_json::to_string(&m).unwrap();
    assert!(!json.contains("output_salt"));
    let report = verify(&fx, &m).unwrap();
    assert!(report.is_legacy_unsalted());
    assert_eq!(report.execution_trust, Some(ExecutionTrust::VendorAttestedOnly));
    let e = report.execution.as_ref().unwrap();
    assert_eq!(
        e.output_commitment,
        OutputCommitment::LegacyUnsalted { sha256: sha256_hex(OUTPUT), size: OUTPUT.len() as u64 }
    );
    // Re-serialized as it was signed: the chain link over it is unchanged.
    assert_eq!(serde_json::to_string(e).unwrap(), execution);
    assert_eq!(e.manifest_sha256(), sha256_hex(execution.as_bytes()));
    assert_eq!(verify_released_output(&report, OUTPUT), Ok(OpenedAs::LegacyUnsalted));
    assert_eq!(verify_released_output(&report, b"other").unwrap_err().check, "output.commitment");
}

#[test]
fn a_statement_spelling_its_output_both_ways_or_neither_is_malformed() {
    let fx = Fixture::new();
    let parts = fx.parts();
    let legacy = legacy_execution_json(&parts);
    let both = legacy.replace(
        r#""output_truncated""#,
        r#""output_commitment":{"salted":{"digest":"00000000000000000000000000000000000000000000000000000000000000aa","size":1}},"output_truncated""#,
    );
    let neither = legacy.replace(&format!(r#""output_sha256":"{}","output_size":18,"#, sha256_hex(OUTPUT)), "");
    let short_digest = legacy.replace(&sha256_hex(OUTPUT), "abcd");
    let secret_with_size = legacy.replace(
        &format!(r#""output_sha256":"{}","output_size":18,"#, sha256_hex(OUTPUT)),
        r#""output_commitment":"secret","#,
    );
    for bad in [both, neither, short_digest, secret_with_size] {
        assert_ne!(bad, legacy);
        let mut m = fx.assemble(&parts);
        m.execution = Some(fx.appliance.sign(Envelope::new(EXECUTION_PAYLOAD_TYPE, bad.clone().into_bytes())));
        assert_eq!(verify(&fx, &m).unwrap_err(), "execution.signature", "{bad}");
    }
}
