//! The customer's review of vendor requests: list what waits, approve or deny it with the
//! customer's key, sign pre-approvals for routine work, and verify manifests offline.
//!
//! Everything signed here is computed on the customer's machine from what the customer sees:
//! the command digest is recomputed from the command text shown, never taken on the control
//! plane's word, and the private key never leaves this process.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use airlock_core::customer_key::{CustomerPublicKey, CustomerSigningKey};
use airlock_core::dsse::Envelope;
use airlock_core::grant::{
    ApprovalDecision, ApprovalLevel, GRANT_PAYLOAD_TYPE, GrantBody, OperationRequest, PRE_APPROVAL_PAYLOAD_TYPE,
    PreApprovalBody,
};
use airlock_core::operation::{
    ExecutionTrust, ManifestReport, OpenedAs, OperationState, OutputCommitment, VendorAttested, VerifyInputs,
    describe_args, pem_certificate_der, verify_released_output, verify_signed_request,
};
use airlock_core::template::{RenderedCommand, Template};
use airlock_core::{ApplianceId, OperationId, Timestamp};
use anyhow::Context;
use ring::rand::{SecureRandom, SystemRandom};
use serde::Deserialize;

use crate::client::ApiClient;

/// The parts of the control plane's operation view the customer needs to decide.
#[derive(Debug, Deserialize)]
pub(crate) struct PendingOperation {
    pub(crate) id: OperationId,
    pub(crate) environment: String,
    pub(crate) reason: String,
    pub(crate) requested_by: String,
    pub(crate) state: OperationState,
    pub(crate) request: OperationRequest,
    pub(crate) command: RenderedCommand,
    /// The request as the control plane signed it; what is reviewed comes from here.
    pub(crate) signed_request: Envelope,
    pub(crate) control_plane_certificate: String,
}

impl PendingOperation {
    /// Checks the operation against the request the control plane signed (verified against
    /// the pinned CA), and refuses one whose command is not the one its request names, or that
    /// is shown under another id than its request's. What is reviewed is the signed request.
    fn checked(self, ca_der: &[u8]) -> anyhow::Result<Self> {
        let signed = verify_signed_request(&self.signed_request, &self.control_plane_certificate, ca_der, None, None)
            .map_err(|e| anyhow::anyhow!("operation {}: {e}; refusing to sign it", self.id))?;
        anyhow::ensure!(
            signed.request == self.request && signed.command == self.command,
            "operation {}: what the control plane shows is not the request it signed; refusing to sign it",
            self.id
        );
        let op = Self {
            environment: signed.environment.to_string(),
            reason: signed.reason,
            requested_by: signed.requested_by,
            request: signed.request,
            command: signed.command,
            ..self
        };
        op.consistent()
    }

    /// Refuses an operation whose command is not the one its request names, or that is
    /// shown under another id than its request's.
    fn consistent(self) -> anyhow::Result<Self> {
        anyhow::ensure!(
            self.id == self.request.id,
            "operation {} is shown with the request of {}; refusing to sign it",
            self.id,
            self.request.id
        );
        anyhow::ensure!(
            self.command.sha256() == self.request.command_sha256 && self.command.template == self.request.kind,
            "operation {}: the command shown does not match the request's command digest; refusing to sign it",
            self.id
        );
        Ok(self)
    }

    /// What the customer reads before deciding: every field the signature will cover.
    ///
    /// Every string in it came from the control plane, so each is escaped for the terminal
    /// ([`crate::terminal`]); the fields the customer's signature does not cover say so.
    pub(crate) fn describe(&self) -> String {
        use crate::terminal::{line, lines};
        let r = &self.request;
        let tags: Vec<&str> = r.data_tags.iter().map(String::as_str).collect();
        let unsigned = "(not covered by your signature)";
        // Requests name their environment in what the customer signs; older ones did not.
        let environment_signed = r.environment.is_some_and(|e| e.to_string() == self.environment);
        let environment_note = if environment_signed { "" } else { unsigned };
        // The host: the execution key the customer attested for it, which the request names
        // and the signature covers. Requests for an unattested appliance (or older) name none.
        let host = match &r.execution_key {
            Some(key) => format!("sha256:{}", line(key)),
            None => "(none named: any host given this appliance id may run it)".to_owned(),
        };
        let mut out = format!(
            "operation  {}\nrequest digest {} (pass it to `airlock customer approve|deny --digest`)\nenvironment {} {environment_note}\nappliance  {}\nhost (execution key) {host}\ntemplate   {} (sha256 {})\nphase      {:?}\ndata tags  {}\nvariables  {}\nreason     {} {unsigned}\nrequested  by {} {unsigned}\ncommand sha256 {}\n--- script ---\n{}",
            self.id,
            r.digest_hex(),
            line(&self.environment),
            r.appliance,
            line(&r.kind),
            line(&self.command.template_sha256),
            r.phase,
            if tags.is_empty() { "(none)".to_owned() } else { line(&tags.join(", ")).into_owned() },
            describe_args(&r.args),
            line(&self.reason),
            line(&self.requested_by),
            r.command_sha256,
            lines(&self.command.script),
        );
        if !self.command.script.ends_with('\n') {
            out.push('\n');
        }
        out.push_str("--- environment ---\n");
        for (k, v) in &self.command.env {
            out.push_str(&format!("{}={v:?}\n", line(k)));
        }
        out.push_str(&describe_run(&self.command.run));
        out
    }
}

/// What the command asks of its box, as the customer signs it.
fn describe_run(run: &airlock_core::run_spec::RunSpec) -> String {
    use airlock_core::run_spec::RunUser;
    let user = match run.user {
        RunUser::Box => "the appliance's unprivileged box user".to_owned(),
        RunUser::Root => "ROOT (the template asks for it; your approval covers it)".to_owned(),
    };
    let limit = |v: Option<u32>, unit: &str| v.map_or_else(|| "default".to_owned(), |v| format!("{v}{unit}"));
    format!(
        "--- box ---\nruns as     {user}\nwall time   {}\nprocesses   {}\nmemory      {}\n",
        limit(run.wall_time_seconds, " s"),
        limit(run.processes, ""),
        limit(run.memory_mib, " MiB"),
    )
}

#[derive(Deserialize)]
struct OperationList {
    operations: Vec<PendingOperation>,
}

/// Requests awaiting approval, each checked: one whose command does not match its request's
/// digest comes back as an error to show instead of the request.
pub(crate) async fn list_pending(
    client: &ApiClient,
    workspace: Option<String>,
) -> anyhow::Result<Vec<anyhow::Result<PendingOperation>>> {
    let ca = client.pinned_ca_der().await?;
    let filters = [("state", Some("awaiting_approval".to_owned())), ("workspace", workspace)];
    let list: OperationList = client.get(&crate::operations::list_path("/v1/operations", &filters)?).await?;
    Ok(list.operations.into_iter().map(|op| op.checked(&ca)).collect())
}

/// Shows the request on the terminal and asks for the start of its digest before signing.
fn confirm(op: &PendingOperation) -> anyhow::Result<()> {
    use std::io::{BufRead, IsTerminal};
    anyhow::ensure!(
        std::io::stdin().is_terminal(),
        "give --digest with the request digest you reviewed in `airlock customer approvals list`, or run this on a terminal to review it here"
    );
    let digest = op.request.digest_hex();
    eprint!("{}\nType the first 8 characters of the request digest to sign: ", op.describe());
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    anyhow::ensure!(line.trim().len() >= 8 && digest.starts_with(line.trim()), "not confirmed; nothing was signed");
    Ok(())
}

/// How the customer decides one request.
pub(crate) struct Decision<'a> {
    pub(crate) approve: bool,
    /// The request digest the customer reviewed (from `approvals list`). Without it the
    /// request is shown and must be confirmed on a terminal.
    pub(crate) reviewed_digest: Option<String>,
    pub(crate) keys: &'a [PathBuf],
    pub(crate) approver: Option<String>,
    pub(crate) reason: String,
    pub(crate) valid_for: std::time::Duration,
}

/// Fetches the request, checks it, signs the decision with every key and relays it.
pub(crate) async fn decide(client: &ApiClient, id: OperationId, d: Decision<'_>) -> anyhow::Result<PendingOperation> {
    let ca = client.pinned_ca_der().await?;
    let op: PendingOperation = client.get(&format!("/v1/operations/{id}")).await?;
    let op = op.checked(&ca)?;
    anyhow::ensure!(
        op.id == id,
        "asked for operation {id}, the control plane answered with {}; nothing was signed",
        op.id
    );
    anyhow::ensure!(
        op.state == OperationState::AwaitingApproval,
        "operation {id} is {}, not awaiting approval",
        op.state
    );
    // What is signed must be what the customer reviewed: the control plane could show one
    // request in the list and serve another here.
    let digest = op.request.digest_hex();
    match d.reviewed_digest.as_deref() {
        Some(reviewed) => anyhow::ensure!(
            reviewed.eq_ignore_ascii_case(&digest),
            "operation {id} is not the request you reviewed (its digest is {digest}, you gave {reviewed}); nothing was signed"
        ),
        None => confirm(&op)?,
    }
    let keys = load_keys(d.keys)?;
    let now = now();
    // A minute of slack for the appliance's clock; the window's length is what the policy caps.
    let not_before = Timestamp::from_unix_millis(now.unix_millis() - 60_000);
    let body = GrantBody {
        request_id: op.id,
        appliance: op.request.appliance,
        phase: op.request.phase,
        request_digest: op.request.digest_hex(),
        command_sha256: op.request.command_sha256.clone(),
        decision: if d.approve { ApprovalDecision::Approve } else { ApprovalDecision::Deny },
        decided_at: now,
        approver: d.approver.unwrap_or_else(|| key_names(&keys)),
        reason: d.reason,
        not_before,
        not_after: not_before.saturating_add(d.valid_for),
        nonce: random_hex(16)?,
    };
    let envelope = sign_all(Envelope::new(GRANT_PAYLOAD_TYPE, serde_json::to_vec(&body)?), &keys);
    let envelope: serde_json::Value = serde_json::from_str(&envelope.to_json())?;
    let _: serde_json::Value =
        client.post(&format!("/v1/operations/{id}/approval"), &serde_json::json!({ "envelope": envelope })).await?;
    Ok(op)
}

/// What a pre-approval covers.
pub(crate) struct PreApprovalSpec<'a> {
    pub(crate) appliance: ApplianceId,
    pub(crate) template_dir: &'a Path,
    pub(crate) valid_for: std::time::Duration,
    pub(crate) max_runs: u32,
    pub(crate) level: ApprovalLevel,
    pub(crate) constraints: BTreeMap<String, String>,
    pub(crate) keys: &'a [PathBuf],
    pub(crate) approver: Option<String>,
    pub(crate) id: Option<String>,
}

/// Signs a pre-approval for the template in `template_dir`, as the customer reviewed it.
pub(crate) fn pre_approve(spec: PreApprovalSpec<'_>) -> anyhow::Result<String> {
    let template = read_template(spec.template_dir)?;
    let manifest = template.manifest();
    for (name, pattern) in &spec.constraints {
        anyhow::ensure!(
            manifest.variables.iter().any(|v| &v.name == name),
            "template `{}` has no variable `{name}` to constrain",
            manifest.name
        );
        airlock_core::pattern::anchored(pattern).with_context(|| format!("constraint on `{name}`"))?;
    }
    anyhow::ensure!(spec.max_runs > 0, "--max-runs must be at least 1");
    let keys = load_keys(spec.keys)?;
    let now = now();
    let body = PreApprovalBody {
        id: match spec.id {
            Some(id) => id,
            None => format!("pa-{}", random_hex(8)?),
        },
        appliance: spec.appliance,
        template: manifest.name.clone(),
        template_sha256: template.content_sha256().to_owned(),
        phase: manifest.phase,
        not_before: now,
        not_after: now.saturating_add(spec.valid_for),
        max_runs: spec.max_runs,
        level: spec.level,
        constraints: spec.constraints,
        approver: spec.approver.unwrap_or_else(|| key_names(&keys)),
        issued_at: now,
    };
    Ok(sign_all(Envelope::new(PRE_APPROVAL_PAYLOAD_TYPE, serde_json::to_vec(&body)?), &keys).to_json())
}

/// Reads and checks the template in `dir` as the appliance will render it.
pub(crate) fn read_template(dir: &Path) -> anyhow::Result<Template> {
    let (manifest_toml, script) = crate::operations::read_template_dir(dir)?;
    Template::new(&manifest_toml, &script).with_context(|| format!("checking {}", dir.display()))
}

/// Verifies manifests offline and, given several, that they chain in the order given.
/// `policy` is the customer's signed policy: it sets the approver threshold (unless
/// `approvals_required` is given) and is what proves executions in a standing window.
pub(crate) fn verify(
    manifests: &[PathBuf],
    customer_keys: &[PathBuf],
    ca: &Path,
    policies: &[PathBuf],
    approvals_required: Option<usize>,
    outputs: &[PathBuf],
    vendor_attested: VendorAttested,
) -> anyhow::Result<Vec<(ManifestReport, Option<OpenedAs>)>> {
    anyhow::ensure!(
        outputs.is_empty() || outputs.len() == manifests.len(),
        "give one --output per manifest, in the same order (or none)"
    );
    let keys = customer_keys
        .iter()
        .map(|p| {
            let pem = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            CustomerPublicKey::from_pem(&pem).with_context(|| format!("loading {}", p.display()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let ca_pem = std::fs::read_to_string(ca).with_context(|| format!("reading {}", ca.display()))?;
    let ca_der = pem_certificate_der(&ca_pem).with_context(|| format!("loading {}", ca.display()))?;
    let policies = policies
        .iter()
        .map(|path| {
            let json = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            airlock_core::policy::verify_signed_policy(&json, &keys, None)
                .with_context(|| format!("checking the signed policy {}", path.display()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut reports = Vec::new();
    for path in manifests {
        let json = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        // Each execution is held against the policy it names, among those given (a chain may
        // span policy changes); the signatures decide whether that is the one in force.
        let named = airlock_core::operation::named_policy_digest(&json);
        let policy = named.as_deref().and_then(|d| policies.iter().find(|p| p.digest_hex() == d));
        let inputs = VerifyInputs {
            ca_der: &ca_der,
            customer_keys: &keys,
            approvals_required: approvals_required
                .unwrap_or_else(|| policy.or(policies.first()).map_or(1, |p| p.document().approvals_required)),
            policy,
            vendor_attested,
        };
        let report = airlock_core::operation::verify_manifest(&json, &inputs)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        reports.push(report);
    }
    airlock_core::operation::verify_chain(&reports).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut checked = Vec::new();
    for (i, report) in reports.into_iter().enumerate() {
        let opened = match outputs.get(i) {
            Some(path) => {
                let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
                Some(
                    verify_released_output(&report, &bytes)
                        .map_err(|e| anyhow::anyhow!("{} against {}: {e}", path.display(), manifests[i].display()))?,
                )
            }
            None => None,
        };
        checked.push((report, opened));
    }
    Ok(checked)
}

/// One line per fact a verified manifest proves.
pub(crate) fn describe_report(r: &ManifestReport) -> String {
    let req = &r.request.request;
    use crate::terminal::line;
    let mut out = format!(
        "operation {} on appliance {} in {} ({}): {} ({:?}), requested by {} at {} (the vendor's word: no customer or appliance signature covers who asked, or when)\n",
        req.id,
        req.appliance,
        r.request.environment,
        r.request.tenant,
        line(&req.kind),
        req.phase,
        line(&r.request.requested_by),
        r.request.requested_at
    );
    if let Some(a) = &r.approval {
        out.push_str(&format!("  {:?} by {} at {}\n", a.decision, line(&a.approver), a.decided_at));
    }
    if let Some(p) = &r.pre_approval {
        out.push_str(&format!("  pre-approved by {} ({}, {:?})\n", line(&p.approver), line(&p.id), p.level));
    }
    match &r.execution {
        Some(e) => out.push_str(&format!(
            "  {:?} at {}, exit code {}, output {}, #{} in the appliance's chain\n",
            e.status,
            e.started_at,
            e.exit_code.map_or_else(|| "none".to_owned(), |c| c.to_string()),
            match &e.output_commitment {
                OutputCommitment::Salted { digest, size } => format!("salted commitment {digest} ({size} bytes)"),
                OutputCommitment::Secret => "secret (no digest, no size)".to_owned(),
                OutputCommitment::LegacyUnsalted { sha256, size } => format!(
                    "LEGACY unsalted sha256 {sha256} ({size} bytes; signed before salted commitments, a short output can be guessed from it)"
                ),
            },
            e.sequence
        )),
        None => out.push_str("  not executed\n"),
    }
    match &r.execution_trust {
        Some(ExecutionTrust::CustomerAttested { key_id, attested_at, attested_by }) => out.push_str(&format!(
            "  signed by the appliance's execution key sha256:{key_id}, attested by {} at {attested_at}\n",
            line(attested_by)
        )),
        Some(ExecutionTrust::VendorAttestedOnly) => out.push_str(
            "  VENDOR-ATTESTED ONLY: no customer attestation of the appliance's execution key; only a certificate from the vendor's CA vouches for this execution, and whoever holds the CA could have forged it\n",
        ),
        None => {}
    }
    if let Some(rel) = &r.release {
        out.push_str(&format!("  output {:?} by {} at {}\n", rel.decision, line(&rel.approver), rel.decided_at));
    }
    out.push_str(&format!("  checks passed: {}\n", r.checks.join(", ")));
    if r.execution.is_some() && !r.policy_checked {
        out.push_str(
            "  customer deny rules and caps NOT checked: give the signed policy the execution names with --policy\n",
        );
    }
    out
}

pub(crate) fn load_keys(paths: &[PathBuf]) -> anyhow::Result<Vec<CustomerSigningKey>> {
    anyhow::ensure!(!paths.is_empty(), "give at least one --key");
    paths
        .iter()
        .map(|p| {
            let pem = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            CustomerSigningKey::from_pem(&pem).with_context(|| format!("loading {}", p.display()))
        })
        .collect()
}

pub(crate) fn sign_all(mut envelope: Envelope, keys: &[CustomerSigningKey]) -> Envelope {
    for key in keys {
        envelope = envelope.sign(key);
    }
    envelope
}

/// The default approver name: the signing keys' ids, shortened.
fn key_names(keys: &[CustomerSigningKey]) -> String {
    keys.iter().map(|k| format!("key:{}", &k.public().key_id()[..16])).collect::<Vec<_>>().join(",")
}

fn random_hex(bytes: usize) -> anyhow::Result<String> {
    let mut buf = vec![0u8; bytes];
    SystemRandom::new().fill(&mut buf).map_err(|_| anyhow::anyhow!("the OS random generator failed"))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

pub(crate) fn now() -> Timestamp {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    Timestamp::from_unix_millis(ms)
}

#[cfg(test)]
mod tests {
    use airlock_core::operation::{REQUEST_PAYLOAD_TYPE, RequestStatement};
    use airlock_testkit::{Ca, Fixture, Signer};

    use super::*;

    /// The operation the control plane serves for `statement`, signed by `signer`.
    fn served(statement: &RequestStatement, signer: &Signer) -> PendingOperation {
        let signed = signer.sign_payload(REQUEST_PAYLOAD_TYPE, serde_json::to_vec(statement).unwrap());
        PendingOperation {
            id: statement.request.id,
            environment: statement.environment.to_string(),
            reason: statement.reason.clone(),
            requested_by: statement.requested_by.clone(),
            state: OperationState::AwaitingApproval,
            request: statement.request.clone(),
            command: statement.command.clone(),
            signed_request: signed,
            control_plane_certificate: signer.cert_pem.clone(),
        }
    }

    #[test]
    fn only_the_request_the_control_plane_signed_is_offered_for_signing() {
        let fx = Fixture::new();
        let ca = fx.ca.der();
        let statement = fx.parts().request;
        assert!(served(&statement, &fx.control_plane).checked(&ca).is_ok());
        // The control plane shows a harmless script, but signed another.
        let mut shown = served(&statement, &fx.control_plane);
        shown.command.script = "#!/bin/sh\necho harmless\n".into();
        let err = shown.checked(&ca).unwrap_err().to_string();
        assert!(err.contains("not the request it signed"), "{err}");
        // Signed under another CA than the pinned one, or by a certificate that is not the
        // control plane's operations identity (an appliance's).
        let rogue = Ca::new("rogue").issue(&format!("spiffe://{}/control-plane", airlock_testkit::TRUST_DOMAIN));
        assert!(served(&statement, &rogue).checked(&ca).is_err());
        assert!(served(&statement, &fx.appliance).checked(&ca).is_err());
        // Shown under another operation's id.
        let mut swapped = served(&statement, &fx.control_plane);
        swapped.id = OperationId::from_random([2; 16]);
        assert!(swapped.checked(&ca).is_err());
    }

    #[test]
    fn what_is_reviewed_is_the_signed_request_and_no_byte_of_it_acts_on_the_terminal() {
        let fx = Fixture::new();
        let mut statement = fx.parts().request;
        // A signed script hiding a command behind a carriage return and an erase-line sequence.
        statement.command.script = "echo harmless\r\u{1b}[2Krm -rf /\n".into();
        statement.request.command_sha256 = statement.command.sha256();
        let mut op = served(&statement, &fx.control_plane);
        // Fields the customer's signature does not cover are taken from the signed request too.
        op.reason = "shown, but not what was signed".into();
        let described = op.checked(&fx.ca.der()).unwrap().describe();
        assert!(described.contains("echo harmless\\u{d}\\u{1b}[2Krm -rf /"), "{described}");
        assert!(!described.contains('\u{1b}') && !described.contains('\r'));
        assert!(described.contains(&format!("reason     {} (not covered by your signature)", statement.reason)));
    }

    #[test]
    fn the_host_a_request_names_is_shown_as_covered_by_the_signature() {
        let fx = Fixture::new();
        let statement = fx.parts().request;
        let key = statement.request.execution_key.clone().unwrap();
        let described = served(&statement, &fx.control_plane).checked(&fx.ca.der()).unwrap().describe();
        let line = described.lines().find(|l| l.starts_with("host (execution key)")).unwrap();
        assert_eq!(line, format!("host (execution key) sha256:{key}"));
        // A request naming no host says so.
        let mut statement = statement;
        statement.request.execution_key = None;
        let described = served(&statement, &fx.control_plane).checked(&fx.ca.der()).unwrap().describe();
        assert!(described.contains("host (execution key) (none named"), "{described}");
    }

    #[test]
    fn a_request_to_run_as_root_and_its_limits_are_shown_for_signing() {
        let fx = Fixture::new();
        let mut statement = fx.parts().request;
        let plain = served(&statement, &fx.control_plane).checked(&fx.ca.der()).unwrap().describe();
        assert!(
            plain.contains("runs as     the appliance's unprivileged box user")
                && plain.contains("wall time   default")
        );
        statement.command.run.user = airlock_core::run_spec::RunUser::Root;
        statement.command.run.wall_time_seconds = Some(90);
        statement.request.command_sha256 = statement.command.sha256();
        let described = served(&statement, &fx.control_plane).checked(&fx.ca.der()).unwrap().describe();
        assert!(described.contains("runs as     ROOT") && described.contains("wall time   90 s"), "{described}");
        // It is part of what the customer signs: the digest differs from the plain command's.
        assert_ne!(statement.command.sha256(), fx.parts().request.command.sha256());
    }
}
