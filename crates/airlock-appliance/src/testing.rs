//! The appliance's test harness: an enrolled state directory, a running executor, and the
//! instructions, approvals and releases the other parties would send it.
//!
//! The test kit (`airlock_testkit`) supplies the CA, the control plane's operations certificate,
//! the appliance's certificate and the customer's keys; this module supplies what only the
//! appliance has: its state directory, its `LocalControl` and `Executor`, and a clock the test
//! moves.
//! A new test is a few lines:
//! `let fx = Fx::new(ALL_PHASES); let stmt = fx.simple(op_id(1), "api");`
//! `let r = fx.run(&stmt, &fx.grant(&stmt)).await;`

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use airlock_core::audit::AuditAction;
use airlock_core::dsse::Envelope;
use airlock_core::execution_key::ExecutionKeyAttestation;
use airlock_core::grant::{ApprovalLevel, DenyCode, GrantBody, PreApprovalBody};
use airlock_core::operation::{
    AckCode, ExecutionStatement, REQUEST_PAYLOAD_TYPE, RefusalCode, ReleaseDecision, ReleaseStatement, RequestStatement,
};
use airlock_core::policy::{Phase, VerifiedPolicy, verify_signed_policy};
use airlock_core::template::Template;
use airlock_core::{OperationId, Timestamp};
use airlock_proto::convert;
use airlock_proto::gateway::{
    ApplianceMessage, OperationAck, OperationAckKind, OperationInstruction, appliance_message,
};
use airlock_testkit::{Fixture, customer};

use crate::audit_log::AuditLog;
use crate::control::{LocalControl, Peer};
use crate::executor::{Executor, Handled};
use crate::result::{Outcome, ResultMsg};
use crate::state_dir::{Credentials, Enrolment, StateDir};

/// 2026-11-24 12:00 UTC, a Tuesday.
pub(crate) const NOW: i64 = airlock_testkit::NOW;
pub(crate) const MINUTE: i64 = 60_000;
pub(crate) const HOUR: i64 = 60 * MINUTE;

/// The template most tests run: Operate, one variable, output on both streams, exit code 3.
pub(crate) const MANIFEST: &str = r#"
name = "echo-service"
description = "Say hello to a service"
phase = "operate"
data_tags = ["service:logs"]
body = "run.sh"

[[variables]]
name = "service"
pattern = "[a-z][a-z0-9-]{0,40}"
"#;
pub(crate) const SCRIPT: &str = "echo \"hello $AIRLOCK_VAR_SERVICE from $PWD\"\necho oops >&2\nexit 3\n";
/// A customer policy enabling every phase.
pub(crate) const ALL_PHASES: &str = "version = 1\nserial = 1\nphases = [\"observe\", \"deploy\", \"operate\"]\n";

/// The customer at the appliance host, as the admin socket admits them.
pub(crate) const HOST_ADMIN: Peer = Peer { uid: 1000, pid: Some(4242) };

/// The customer keys pinned on every test appliance.
pub(crate) const PINNED: &[u8] = &[1, 2];

/// The template's variables.
pub(crate) fn vars(service: &str) -> BTreeMap<String, String> {
    [("service".to_owned(), service.to_owned())].into()
}

/// A policy signed by both pinned customer keys, so one asking for two approvals loads too.
pub(crate) fn policy(toml: &str) -> VerifiedPolicy {
    let signed = customer::signed_policy(toml, PINNED);
    verify_signed_policy(signed.as_bytes(), &customer::public_keys(PINNED), None).unwrap()
}

/// Vendor release-signing key `n` (a fixed seed, apart from the customer's).
pub(crate) fn vendor_key(n: u8) -> airlock_core::customer_key::CustomerSigningKey {
    airlock_core::customer_key::CustomerSigningKey::from_seed([0xA0 ^ n; 32])
}

/// A release of `manifest_toml` whose artifacts are `files` (path, bytes), signed by vendor key
/// `n`: its envelope, and the release as an appliance verifies it.
pub(crate) fn vendor_release(
    manifest_toml: &str,
    files: &[(&str, &[u8])],
    n: u8,
) -> (Envelope, airlock_core::release::VerifiedRelease) {
    use airlock_core::release::{Artifact, RelativePath, ReleaseStatement, sign_release, verify_release};
    let artifacts = files
        .iter()
        .map(|(path, bytes)| Artifact {
            path: RelativePath::parse(path).unwrap(),
            sha256: airlock_core::operation::sha256_hex(bytes),
            size: bytes.len() as u64,
        })
        .collect();
    let statement = ReleaseStatement::new(manifest_toml, artifacts).unwrap();
    let envelope = sign_release(&statement, &vendor_key(n));
    let verified = verify_release(&envelope, &[vendor_key(n).public()]).unwrap();
    (envelope, verified)
}

/// An enrolled appliance on a temporary state directory, with its executor.
pub(crate) struct Fx {
    pub(crate) dir: tempfile::TempDir,
    /// Where deployed releases go (outside the state directory).
    pub(crate) releases: tempfile::TempDir,
    /// The appliance's clock (Unix milliseconds); tests move it.
    pub(crate) clock: Arc<AtomicI64>,
    pub(crate) policy: Option<VerifiedPolicy>,
    /// The CA, the control plane's and the appliance's certificates, the appliance's identity.
    pub(crate) kit: Fixture,
    pub(crate) control: Arc<LocalControl>,
    pub(crate) exec: Arc<Executor>,
    /// What each box may hold on disk.
    pub(crate) disk: crate::config::BoxDisk,
    /// What the appliance sent up since `listen`, and what is still to be read.
    sent: std::sync::Mutex<(Vec<ApplianceMessage>, Option<tokio::sync::mpsc::Receiver<ApplianceMessage>>)>,
}

impl Fx {
    /// An appliance enrolled with the kit's CA, under a policy signed by the pinned keys.
    pub(crate) fn new(policy_toml: &str) -> Self {
        Self::with_disk(policy_toml, crate::config::BoxDisk::default())
    }

    /// With boxes held to `disk` (the appliance's `--box-disk-*` and `--disk-reserve-mib`).
    pub(crate) fn with_disk(policy_toml: &str, disk: crate::config::BoxDisk) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let kit = Fixture::new();
        let enrolment = Enrolment {
            identity: kit.identity.uri(),
            control_plane: "https://cp.test".into(),
            gateway_endpoint: "cp.test:8444".into(),
            gateway_server_name: "cp.test".into(),
            ca_fingerprint: "unused".into(),
        };
        let creds = Credentials { cert_pem: kit.appliance.cert_pem.clone(), key_pem: kit.appliance.key_pem() };
        StateDir::open(dir.path()).unwrap().save_enrolment(&enrolment, kit.ca.pem(), &creds).unwrap();
        let clock = Arc::new(AtomicI64::new(NOW));
        let policy = Some(policy(policy_toml));
        let releases = tempfile::tempdir().unwrap();
        std::fs::set_permissions(releases.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let (control, exec) = open(dir.path(), releases.path(), policy.clone(), &clock, &kit, &disk);
        Self { dir, releases, clock, policy, kit, control, exec, disk, sent: Default::default() }
    }

    /// Vendor code runs as the appliance's own user from now on, as on an appliance that is not
    /// root: only Landlock and its cell hold it.
    pub(crate) fn run_vendor_code_as_the_appliance_user(&mut self) {
        let exec = Arc::get_mut(&mut self.exec).expect("no run in progress");
        exec.sandbox_mut().set_run_as(crate::sandbox::RunAs::Appliance);
        self.control.set_vendor_code_user(crate::control::VendorCodeUser::ApplianceUser);
    }

    /// The appliance process stops and starts again on the same state directory.
    pub(crate) fn restart(&mut self) {
        if let Some(old) = Arc::get_mut(&mut self.exec) {
            old.sandbox_mut().leave_shared_dirs();
        }
        let (control, exec) =
            open(self.dir.path(), self.releases.path(), self.policy.clone(), &self.clock, &self.kit, &self.disk);
        self.control = control;
        self.exec = exec;
    }

    /// The request the control plane signs for `manifest` and `script` with `args`.
    pub(crate) fn statement(
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
            request: airlock_core::grant::OperationRequest {
                id,
                appliance: self.kit.identity.appliance,
                kind: m.name.clone(),
                phase: m.phase,
                data_tags: m.data_tags.clone(),
                args,
                command_sha256: command.sha256(),
                environment: Some(self.kit.identity.environment),
                // As the control plane names it: the key the appliance's Hello attested, if any.
                execution_key: self.control.attested_key_id(),
            },
            command,
            reason: "routine check".into(),
            requested_by: "vendor-ops".into(),
            requested_at: Timestamp::from_unix_millis(NOW),
            tenant: self.kit.identity.tenant,
            environment: self.kit.identity.environment,
        }
    }

    /// A request of the usual template, for `service`.
    pub(crate) fn simple(&self, id: OperationId, service: &str) -> RequestStatement {
        self.statement(id, MANIFEST, SCRIPT, vars(service))
    }

    /// The instruction the control plane sends for `stmt`, signed by its operations identity.
    pub(crate) fn instruction(
        &self,
        stmt: &RequestStatement,
        manifest: &str,
        script: &str,
        approval: &str,
    ) -> OperationInstruction {
        let env = self.kit.control_plane.sign_payload(REQUEST_PAYLOAD_TYPE, serde_json::to_vec(stmt).unwrap());
        OperationInstruction {
            request_id: stmt.request.id.to_string(),
            request_envelope_json: env.to_json(),
            control_plane_certificate_pem: self.kit.control_plane.cert_pem.clone(),
            template_manifest_toml: manifest.into(),
            template_script: script.into(),
            approval_envelope_json: approval.into(),
            ..Default::default()
        }
    }

    /// The deploy of `release` the control plane signs.
    pub(crate) fn deploy_statement(
        &self,
        id: OperationId,
        release: &airlock_core::release::VerifiedRelease,
    ) -> RequestStatement {
        use airlock_core::deploy;
        let command = deploy::deploy_command(release);
        RequestStatement {
            request: airlock_core::grant::OperationRequest {
                id,
                appliance: self.kit.identity.appliance,
                kind: deploy::DEPLOY_KIND.into(),
                phase: Phase::Deploy,
                data_tags: Default::default(),
                args: deploy::DeployArgs::of(release).to_args(),
                command_sha256: command.sha256(),
                environment: Some(self.kit.identity.environment),
                execution_key: self.control.attested_key_id(),
            },
            command,
            reason: "ship 1.0".into(),
            requested_by: "vendor-deployer".into(),
            requested_at: Timestamp::from_unix_millis(NOW),
            tenant: self.kit.identity.tenant,
            environment: self.kit.identity.environment,
        }
    }

    /// The instruction for a deploy: the signed request, the vendor's signed release and the
    /// release keys (vendor key seeds) the control plane relays.
    pub(crate) fn deploy_instruction(
        &self,
        stmt: &RequestStatement,
        release: &Envelope,
        relayed_keys: &[u8],
        approval: &str,
    ) -> OperationInstruction {
        OperationInstruction {
            release_envelope_json: release.to_json(),
            release_key_pems: relayed_keys.iter().map(|n| vendor_key(*n).public().to_pem().unwrap()).collect(),
            ..self.instruction(stmt, "", "", approval)
        }
    }

    /// The customer's approval of `stmt`, valid from a minute ago for an hour, edited, signed
    /// by customer key `key`.
    pub(crate) fn grant_with(&self, stmt: &RequestStatement, key: u8, edit: impl FnOnce(&mut GrantBody)) -> String {
        let mut body = customer::approval(
            &stmt.request,
            Timestamp::from_unix_millis(NOW - MINUTE),
            Timestamp::from_unix_millis(NOW + HOUR),
        );
        edit(&mut body);
        customer::sign_grant(&body, &[key])
    }

    /// The customer's approval of `stmt`, signed by customer key 1.
    pub(crate) fn grant(&self, stmt: &RequestStatement) -> String {
        self.grant_with(stmt, 1, |_| {})
    }

    /// A pre-approval `routine` of the usual template, two runs, commands only, edited, signed
    /// by customer key 1.
    pub(crate) fn pre_approval(&self, edit: impl FnOnce(&mut PreApprovalBody)) -> Vec<u8> {
        let t = Template::new(MANIFEST, SCRIPT).unwrap();
        let mut body = PreApprovalBody {
            id: "routine".into(),
            appliance: self.kit.identity.appliance,
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
        customer::sign_pre_approval(&body, &[1]).into_bytes()
    }

    /// The customer's release (or withholding) of the output of `id`, as the appliance holds
    /// it, edited, signed by customer key 1.
    pub(crate) fn release(
        &self,
        id: OperationId,
        decision: ReleaseDecision,
        edit: impl FnOnce(&mut ReleaseStatement),
    ) -> Vec<u8> {
        let record = self.control.ops.record(id).unwrap().unwrap();
        let mut st = ReleaseStatement {
            request_id: id,
            appliance: self.kit.identity.appliance,
            decision,
            output_commitment: record.commitment().unwrap(),
            decided_at: Timestamp::from_unix_millis(NOW),
            approver: "alice".into(),
            reason: "fine".into(),
        };
        edit(&mut st);
        customer::sign_release(&st, &[1]).into_bytes()
    }

    /// Hands an instruction to the executor and waits for its answer (and its run, if any).
    pub(crate) async fn send(&self, instruction: OperationInstruction) -> ResultMsg {
        match self.exec.handle(instruction).await {
            Handled::Reply(r) => r,
            Handled::Started(h) => h.await.unwrap(),
            Handled::MalformedId(r) => panic!("refused as malformed: {r:?}"),
            Handled::Nothing => panic!("no answer"),
        }
    }

    /// Sends the instruction for `stmt` of the usual template with `approval` (or none: "").
    pub(crate) async fn run(&self, stmt: &RequestStatement, approval: &str) -> ResultMsg {
        self.send(self.instruction(stmt, MANIFEST, SCRIPT, approval)).await
    }

    /// Starts the instruction for `stmt` of `script`, approved, and returns its running task.
    pub(crate) async fn start(&self, stmt: &RequestStatement, script: &str) -> tokio::task::JoinHandle<ResultMsg> {
        match self.exec.handle(self.instruction(stmt, MANIFEST, script, &self.grant(stmt))).await {
            Handled::Started(h) => h,
            other => panic!("{other:?}"),
        }
    }

    /// From now on, what the appliance sends the control plane is kept (`sent`), as if a
    /// stream were up.
    pub(crate) async fn listen(&self) {
        let (tx, rx) = tokio::sync::mpsc::channel(10_000);
        self.control.outbound.connected(tx).await;
        self.sent.lock().unwrap().1 = Some(rx);
    }

    /// Everything sent up since `listen`, in order.
    pub(crate) fn sent(&self) -> Vec<ApplianceMessage> {
        let mut sent = self.sent.lock().unwrap();
        let (kept, rx) = &mut *sent;
        if let Some(rx) = rx {
            while let Ok(m) = rx.try_recv() {
                kept.push(m);
            }
        }
        kept.clone()
    }

    /// Every record of the local audit log.
    pub(crate) fn audit_records(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.path().join("audit.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .collect()
    }

    /// The local audit's records of `action`.
    pub(crate) fn audited(&self, action: AuditAction) -> Vec<serde_json::Value> {
        self.audit_records().into_iter().filter(|r| r["action"] == action.as_str()).collect()
    }

    /// Whether the operation ran (its output was sealed).
    pub(crate) fn ran(&self, id: OperationId) -> bool {
        self.dir.path().join("ops").join(id.to_string()).join("output.sealed").exists()
    }

    /// The execution statement a result carries.
    /// The customer's attestation of this appliance's execution key, edited by `edit`, then
    /// signed by customer keys `ns`, as envelope JSON.
    pub(crate) fn attestation(&self, ns: &[u8], edit: impl FnOnce(&mut ExecutionKeyAttestation)) -> Vec<u8> {
        let mut statement = ExecutionKeyAttestation {
            appliance: self.kit.identity.appliance,
            environment: self.kit.identity.environment,
            tenant: self.kit.identity.tenant,
            execution_key: self.control.execution_key().public().to_pem().unwrap(),
            attested_at: Timestamp::from_unix_millis(NOW),
            attested_by: "alice".into(),
        };
        edit(&mut statement);
        let env = statement.envelope();
        ns.iter().fold(env, |env, n| env.sign(&customer::key(*n))).to_json().into_bytes()
    }

    /// The customer attests this appliance's execution key on the host.
    pub(crate) fn attest(&self) {
        self.control.attest_execution_key(HOST_ADMIN, &self.attestation(&[1], |_| {})).unwrap();
    }

    pub(crate) fn execution(&self, result: &ResultMsg) -> ExecutionStatement {
        let env = Envelope::from_json(result.execution_envelope_json.as_bytes()).unwrap();
        serde_json::from_slice(&env.payload).unwrap()
    }
}

fn open(
    dir: &Path,
    releases: &Path,
    policy: Option<VerifiedPolicy>,
    clock: &Arc<AtomicI64>,
    kit: &Fixture,
    disk: &crate::config::BoxDisk,
) -> (Arc<LocalControl>, Arc<Executor>) {
    let audit = Arc::new(AuditLog::open(dir).unwrap());
    let c = clock.clone();
    let now = Arc::new(move || Timestamp::from_unix_millis(c.load(Ordering::SeqCst)));
    let control = Arc::new(LocalControl::with_clock(dir, policy, audit, customer::public_keys(PINNED), now).unwrap());
    // Releases go outside the state directory, where the box user can read them.
    let options = crate::executor::DeployOptions {
        releases_dir: Some(releases.join("releases")),
        engine: crate::deploy::DeployConfig {
            health_deadline: std::time::Duration::from_secs(10),
            ..Default::default()
        },
        hold_poll: Some(std::time::Duration::from_millis(100)),
        existence_ttl: Some(std::time::Duration::ZERO),
        // No control plane here: a release whose artifacts are not in the store fails quickly.
        fetch_wait: Some(std::time::Duration::from_millis(200)),
        // The tests' secret files live in their temporary directories.
        secrets: toml::from_str(&format!("allow = ['file:{}']", std::env::temp_dir().display())).unwrap(),
        ..Default::default()
    };
    let exec =
        Arc::new(Executor::new(control.clone(), dir, kit.identity.clone(), kit.ca.pem(), None, disk, options).unwrap());
    (control, exec)
}

/// The request was refused for good, with `code`, here and on the wire.
pub(crate) fn assert_refused(r: &ResultMsg, code: RefusalCode) {
    assert_eq!(r.outcome, Outcome::Refused, "{r:?}");
    assert_code(r, code);
}

/// The customer's policy (or a built-in rule) refused the request, by the check `deny`.
pub(crate) fn assert_denied(r: &ResultMsg, deny: DenyCode) {
    assert_refused(r, RefusalCode::Denied);
    assert_eq!(r.refusal.as_ref().and_then(|f| f.deny), Some(deny), "{r:?}");
    assert_eq!(r.to_proto().deny_code, convert::deny_code_to_wire(deny) as i32);
}

/// The request is not refused for good: it waits for authority, with `code`.
pub(crate) fn assert_awaiting(r: &ResultMsg, code: RefusalCode) {
    assert_eq!(r.outcome, Outcome::AwaitingApproval, "{r:?}");
    assert_code(r, code);
}

fn assert_code(r: &ResultMsg, code: RefusalCode) {
    assert_eq!(r.refusal.as_ref().map(|f| f.code), Some(code), "{r:?}");
    assert_eq!(convert::refusal_code_from_wire(r.to_proto().refusal_code), Ok(code));
}

/// The control plane's acknowledgement of `id`: what it did (`code`), and why (`error`, for people).
pub(crate) fn ack(id: OperationId, kind: OperationAckKind, code: AckCode, error: &str) -> OperationAck {
    let code = convert::ack_code_to_wire(code) as i32;
    OperationAck { request_id: id.to_string(), kind: kind as i32, error: error.into(), code }
}

/// The control plane stored `id`'s result or release.
pub(crate) fn stored(id: OperationId, kind: OperationAckKind) -> OperationAck {
    ack(id, kind, AckCode::Stored, "")
}

/// What each message to the control plane is about: `("result", id)` or `("release", id)`.
pub(crate) fn kinds(msgs: &[ApplianceMessage]) -> Vec<(&'static str, OperationId)> {
    use appliance_message::Body;
    msgs.iter()
        .map(|m| match &m.body {
            Some(Body::OperationResult(r)) => ("result", r.request_id.parse().unwrap()),
            Some(Body::OutputRelease(r)) => ("release", r.request_id.parse().unwrap()),
            other => panic!("{other:?}"),
        })
        .collect()
}

/// Processes of a group that are still alive (zombies waiting to be reaped do not count).
pub(crate) fn live_members(pgid: i32) -> usize {
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

/// Waits (up to about five seconds) until `done` holds.
pub(crate) async fn eventually(mut done: impl FnMut() -> bool) {
    for _ in 0..250 {
        if done() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Every file under `dir`.
pub(crate) fn all_files(dir: &Path) -> Vec<PathBuf> {
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

/// A small disk: a tmpfs of `size` (say `16m`) mounted at a path for one test, as root, and
/// unmounted (and its mount point removed, if empty) when dropped. What fills it cannot touch
/// the host's disks.
pub(crate) struct SmallDisk(pub(crate) PathBuf);

impl SmallDisk {
    pub(crate) fn mount(at: PathBuf, size: &str) -> Self {
        std::fs::create_dir_all(&at).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0755"), "tmpfs"])
            .arg(&at)
            .status()
            .expect("mount(8) runs");
        assert!(status.success(), "the tests mount a tmpfs as a small disk, as root");
        Self(at)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}
