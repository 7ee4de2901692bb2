//! Signed operations on the control plane: the operations-signing identity, operation states,
//! the instructions pushed to appliances, and the checks on what appliances report back.
//!
//! Trust boundary: the control plane holds no customer key, so it cannot verify approvals or
//! releases; it checks their structure and binding only, and relays them unchanged. What it
//! does verify is the appliance's execution statement: signed by a certificate from our CA
//! naming exactly the appliance on the stream, and bound to the stored request.

use std::time::Duration;

use airlock_core::audit::{AuditAction, Outcome};
use airlock_core::dsse::Envelope;
use airlock_core::grant::{
    ApprovalDecision, ApprovalLevel, DenyCode, GRANT_PAYLOAD_TYPE, GrantBody, PRE_APPROVAL_PAYLOAD_TYPE,
    PreApprovalBody,
};
use airlock_core::operation::{
    AckCode, AuthorityKind, EXECUTION_PAYLOAD_TYPE, ExecutionStatement, ExecutionStatus, OperationState,
    RELEASE_PAYLOAD_TYPE, RefusalCode, ReleaseDecision, ReleaseStatement, RequestStatement, SECRET_OUTPUT_TAG,
    sha256_hex, verify_certified_envelope,
};
use airlock_core::{ApplianceId, ApplianceIdentity, OperationId, Timestamp};
use airlock_proto::convert::{ack_code_to_wire, deny_code_from_wire, refusal_code_from_wire};
use airlock_proto::gateway::{
    ControlMessage, OperationAck, OperationAckKind, OperationOutcome, OperationResult, OutputRelease, control_message,
};

use crate::authz::TenantScope;
use crate::state::{AppState, event};
use crate::store::{OperationRow, ReleaseUpdate, ResultUpdate, StoreError};

/// Longest refusal reason kept from an appliance (it names a check or rule, never data).
const MAX_REASON_CHARS: usize = 500;
/// Largest signed statement (envelope JSON) or certificate PEM stored from an appliance or
/// relayed for a customer; real ones are a few KiB.
pub const MAX_ENVELOPE_BYTES: usize = 64 * 1024;
/// How far ahead of the control plane's clock an appliance's clock may run.
const MAX_CLOCK_SKEW: Duration = Duration::from_secs(300);

/// The request statement of a stored operation (signed by us, so only corruption fails).
pub fn stored_request(op: &OperationRow) -> Result<RequestStatement, StoreError> {
    let env = Envelope::from_json(op.request_envelope.as_bytes())
        .map_err(|e| StoreError::Corrupt(format!("operation {} request envelope: {e}", op.id)))?;
    serde_json::from_slice(&env.payload)
        .map_err(|e| StoreError::Corrupt(format!("operation {} request statement: {e}", op.id)))
}

/// Parses a stored envelope column.
pub fn stored_envelope(op: &OperationRow, json: Option<&str>) -> Result<Option<Envelope>, StoreError> {
    json.map(|j| {
        Envelope::from_json(j.as_bytes()).map_err(|e| StoreError::Corrupt(format!("operation {} envelope: {e}", op.id)))
    })
    .transpose()
}

/// Why a relayed approval is refused (400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApprovalError {
    #[error("the envelope is not an approval: its payload type is `{found}`, expected `{expected}`")]
    NotAGrant { found: String, expected: &'static str },
    #[error("the envelope carries no signature; have the customer sign it with `airlock customer` tools")]
    Unsigned,
    #[error("the envelope carries more than {} signatures", airlock_core::dsse::MAX_SIGNATURES)]
    TooManySignatures,
    #[error("the approval body does not parse: {0}")]
    Body(String),
    #[error("the approval is for another {0} than this operation's")]
    Binding(&'static str),
}

/// Checks an approval's structure and its binding to the stored request. The signatures are
/// the appliance's to verify against the customer keys it pinned.
pub fn check_approval(
    env: &Envelope,
    op: &OperationRow,
    request: &RequestStatement,
) -> Result<GrantBody, ApprovalError> {
    if env.payload_type != GRANT_PAYLOAD_TYPE {
        return Err(ApprovalError::NotAGrant {
            found: env.payload_type.chars().take(100).collect(),
            expected: GRANT_PAYLOAD_TYPE,
        });
    }
    if env.signatures.is_empty() {
        return Err(ApprovalError::Unsigned);
    }
    if env.signatures.len() > airlock_core::dsse::MAX_SIGNATURES {
        return Err(ApprovalError::TooManySignatures);
    }
    let body: GrantBody = serde_json::from_slice(&env.payload).map_err(|e| ApprovalError::Body(e.to_string()))?;
    if body.request_id != op.id {
        return Err(ApprovalError::Binding("request id"));
    }
    if body.request_digest != op.request_digest {
        return Err(ApprovalError::Binding("request digest"));
    }
    if body.command_sha256 != op.command_sha256 {
        return Err(ApprovalError::Binding("command"));
    }
    if body.appliance != op.appliance_id {
        return Err(ApprovalError::Binding("appliance"));
    }
    if body.phase != request.request.phase {
        return Err(ApprovalError::Binding("phase"));
    }
    Ok(body)
}

// ---------- gateway: results and releases up ----------

/// A result or release the control plane will not store; the appliance is told why.
enum Refuse {
    /// Refused for good: acknowledged [`AckCode::Refused`] with this error.
    Because(String),
    /// The store failed: no acknowledgement, so the appliance sends it again later.
    Store(StoreError),
    /// Not acceptable yet, but it may be later (a release that overtook its operation's
    /// result): acknowledged [`AckCode::Retry`], so the appliance keeps it and sends it again
    /// after its results. Not a refusal, so not audited as one.
    NotYet(String),
}

impl From<StoreError> for Refuse {
    fn from(e: StoreError) -> Self {
        Refuse::Store(e)
    }
}

fn refuse<T>(why: impl Into<String>) -> Result<T, Refuse> {
    Err(Refuse::Because(why.into()))
}

fn ack(request_id: &str, kind: OperationAckKind, code: AckCode, error: String) -> ControlMessage {
    ControlMessage {
        body: Some(control_message::Body::OperationAck(OperationAck {
            request_id: request_id.to_owned(),
            kind: kind as i32,
            error,
            code: ack_code_to_wire(code) as i32,
        })),
    }
}

/// Off the network: short and printable.
fn sanitize(s: &str, max: usize) -> String {
    s.chars().filter(|c| !c.is_control()).take(max).collect()
}

async fn finish(
    state: &AppState,
    scope: &TenantScope,
    request_id: &str,
    kind: OperationAckKind,
    action: AuditAction,
    result: Result<(), Refuse>,
) -> Option<ControlMessage> {
    match result {
        Ok(()) => Some(ack(request_id, kind, AckCode::Stored, String::new())),
        Err(Refuse::Because(why)) => {
            tracing::info!(operation = %request_id, reason = %why, "refused an appliance's {action}");
            let mut ev = event(scope.principal().actor(), action, Outcome::Denied);
            ev.target = Some(request_id.to_owned());
            ev.detail = serde_json::json!({ "reason": why });
            state.audit_refusal(&scope.chain(), ev).await;
            Some(ack(request_id, kind, AckCode::Refused, why))
        }
        Err(Refuse::Store(e)) => {
            tracing::error!(error = %e, operation = %request_id, "cannot record an appliance's {action}; it will be resent");
            None
        }
        Err(Refuse::NotYet(why)) => {
            // The appliance sends it again after its results, and may on every reconnect until
            // it can be taken: a note, rate limited like refusals, and nothing durable.
            if let Some(suppressed) =
                state.refusal_limiter.admit(&scope.chain(), AuditAction::OperationDeferred.as_str(), state.now())
            {
                tracing::info!(operation = %request_id, reason = %why, suppressed, "deferred an appliance's {action}; it will be resent");
            }
            Some(ack(request_id, kind, AckCode::Retry, why))
        }
    }
}

/// Handles an `OperationResult` from `peer`; the reply is an `OperationAck`, or nothing when
/// the store failed (the appliance keeps it and sends it again).
pub async fn handle_result(
    state: &AppState,
    peer: &ApplianceIdentity,
    scope: &TenantScope,
    r: OperationResult,
) -> Option<ControlMessage> {
    let shown = sanitize(&r.request_id, 64);
    let result = match r.request_id.parse::<OperationId>() {
        Ok(id) => apply_result(state, peer, scope, id, &r).await,
        Err(e) => refuse(format!("the result's request id is malformed: {e}")),
    };
    finish(state, scope, &shown, OperationAckKind::Result, AuditAction::OperationResultRefused, result).await
}

async fn apply_result(
    state: &AppState,
    peer: &ApplianceIdentity,
    scope: &TenantScope,
    request_id: OperationId,
    r: &OperationResult,
) -> Result<(), Refuse> {
    let outcome = OperationOutcome::try_from(r.outcome).unwrap_or(OperationOutcome::Unspecified);
    let now = state.now();
    let mut tx = state.store.write().await?;
    let Some(op) = tx.operation(scope, request_id).await?.filter(|op| op.appliance_id == peer.appliance) else {
        return refuse(format!("no operation {request_id} for this appliance"));
    };
    let request = stored_request(&op)?;
    let pending = crate::store::PENDING_STATES.contains(&op.state) && op.result_at.is_none();
    let already = || refuse(format!("operation {request_id} already has a final result ({})", op.state));
    match outcome {
        OperationOutcome::Unspecified => refuse("the result has no outcome"),
        // Nothing ran and nothing changes; the instruction is sent again with the approval.
        // An approved one the appliance cannot run yet (its approval is not valid yet) is
        // sent again later on this stream, without waiting for a reconnect.
        OperationOutcome::AwaitingApproval => {
            let reported = reported_refusal(r, outcome)?;
            if pending && op.state == OperationState::Approved {
                state.push.repush_when_valid(peer.appliance, reported.valid_from, now);
            }
            Ok(())
        }
        OperationOutcome::Refused => {
            let reported = reported_refusal(r, outcome)?;
            let reason = sanitize(&r.reason, MAX_REASON_CHARS);
            if !pending {
                // The same result again is already stored (refusals stored before codes were
                // recorded have no code to compare).
                let same = op.refusal_reason.as_deref() == Some(reason.as_str())
                    && op.refusal_code.is_none_or(|c| c == reported.code)
                    && (op.refusal_code.is_none() || op.deny_code == reported.deny);
                return if same { Ok(()) } else { already() };
            }
            // A denial stays `denied`; the appliance's refusal confirms it audited it.
            let new_state =
                if op.state == OperationState::Denied { OperationState::Denied } else { OperationState::Refused };
            let update = ResultUpdate::refusal(new_state, reported.code, reported.deny, &reason);
            let detail = serde_json::json!({ "code": reported.code, "deny_code": reported.deny, "reason": reason });
            let ev = result_event(scope, AuditAction::OperationRefused, request_id, detail);
            commit_result(tx, scope, peer.appliance, request_id, &update, ev, now).await
        }
        OperationOutcome::Executed | OperationOutcome::Cancelled => {
            let v = verify_execution(state, peer, &op, &request, outcome, r, now)?;
            let execution_json = v.envelope.to_json();
            if !pending {
                return if op.execution_envelope.as_deref() == Some(execution_json.as_str()) {
                    Ok(())
                } else {
                    already()
                };
            }
            // A denial that crossed a pre-approved (or standing-window) run on its way: the
            // appliance ran it on the customer's own earlier authority, verified above. The
            // record says what happened rather than leaving the operation pending for ever.
            let after_denial = op.state == OperationState::Denied;
            let e = &v.statement;
            let size = i64::try_from(e.output_size).or_else(|_| refuse("output_size is out of range"))?;
            let (new_state, action) = if outcome == OperationOutcome::Executed {
                (OperationState::Executed, AuditAction::OperationExecuted)
            } else {
                (OperationState::Cancelled, AuditAction::OperationCancelled)
            };
            let update = ResultUpdate {
                state: new_state,
                execution_envelope: Some(&execution_json),
                appliance_cert_pem: Some(&v.cert_pem),
                pre_approval_envelope: v.pre_approval_json.as_deref(),
                exit_code: e.exit_code.map(i64::from),
                output_sha256: Some(&e.output_sha256),
                output_size: Some(size),
                refusal_code: None,
                deny_code: None,
                refusal_reason: None,
            };
            let detail = serde_json::json!({
                "status": e.status,
                "exit_code": e.exit_code,
                "output_sha256": e.output_sha256,
                "output_size": e.output_size,
                "authority": e.authority.kind,
                "sequence": e.sequence,
                "ran_before_the_denial_arrived": after_denial,
            });
            let ev = result_event(scope, action, request_id, detail);
            commit_result(tx, scope, peer.appliance, request_id, &update, ev, now).await
        }
    }
}

/// Why the appliance did not run an operation, as it coded it.
struct ReportedRefusal {
    code: RefusalCode,
    /// Which policy check denied it, for [`RefusalCode::Denied`].
    deny: Option<DenyCode>,
    /// When the approval becomes valid, for [`RefusalCode::ApprovalNotYetValid`] (if sent).
    valid_from: Option<Timestamp>,
}

/// Reads the codes of an `AWAITING_APPROVAL` or `REFUSED` result. A code this build does not
/// know, a missing one, or one that contradicts the outcome is refused, never read as
/// something milder: the reason text beside it is for people and is never parsed.
fn reported_refusal(r: &OperationResult, outcome: OperationOutcome) -> Result<ReportedRefusal, Refuse> {
    let code = refusal_code_from_wire(r.refusal_code)
        .or_else(|e| refuse(format!("the result's refusal code is missing or unknown to this control plane ({e})")))?;
    let awaiting = outcome == OperationOutcome::AwaitingApproval;
    if code.is_retryable() != awaiting {
        return refuse(format!(
            "refusal code {code:?} does not go with outcome {}: a retryable code comes with AWAITING_APPROVAL, a final one with REFUSED",
            outcome.as_str_name()
        ));
    }
    let deny =
        match code {
            RefusalCode::Denied => Some(deny_code_from_wire(r.deny_code).or_else(|e| {
                refuse(format!("a denial's deny code is missing or unknown to this control plane ({e})"))
            })?),
            _ => None,
        };
    let valid_from = (code == RefusalCode::ApprovalNotYetValid && r.valid_from_unix_ms != 0)
        .then(|| Timestamp::from_unix_millis(r.valid_from_unix_ms));
    Ok(ReportedRefusal { code, deny, valid_from })
}

fn result_event(
    scope: &TenantScope,
    action: AuditAction,
    request_id: OperationId,
    detail: serde_json::Value,
) -> airlock_core::audit::Event {
    let mut ev = event(scope.principal().actor(), action, Outcome::Success);
    ev.target = Some(request_id.to_string());
    ev.detail = detail;
    ev
}

/// Records a result and its audit record in one transaction.
async fn commit_result(
    mut tx: crate::store::WriteTx<'_>,
    scope: &TenantScope,
    appliance: ApplianceId,
    request_id: OperationId,
    update: &ResultUpdate<'_>,
    ev: airlock_core::audit::Event,
    now: Timestamp,
) -> Result<(), Refuse> {
    if !tx.record_result(scope, appliance, request_id, update, now).await? {
        return refuse(format!("operation {request_id} already has a final result"));
    }
    tx.audit(&scope.chain(), now, ev).await?;
    tx.commit().await?;
    Ok(())
}

struct VerifiedExecution {
    envelope: Envelope,
    statement: ExecutionStatement,
    cert_pem: String,
    pre_approval_json: Option<String>,
}

/// Verifies an execution statement: our CA issued the certificate, the certificate names
/// exactly the appliance on this stream, and the statement is bound to the stored request.
fn verify_execution(
    state: &AppState,
    peer: &ApplianceIdentity,
    op: &OperationRow,
    request: &RequestStatement,
    outcome: OperationOutcome,
    r: &OperationResult,
    now: Timestamp,
) -> Result<VerifiedExecution, Refuse> {
    if [&r.execution_envelope_json, &r.appliance_certificate_pem, &r.pre_approval_envelope_json]
        .iter()
        .any(|f| f.len() > MAX_ENVELOPE_BYTES)
    {
        return refuse(format!("a signed statement or certificate is larger than {MAX_ENVELOPE_BYTES} bytes"));
    }
    let envelope = Envelope::from_json(r.execution_envelope_json.as_bytes())
        .or_else(|e| refuse(format!("the execution envelope is malformed: {e}")))?;
    let unsigned: ExecutionStatement = serde_json::from_slice(&envelope.payload)
        .or_else(|e| refuse(format!("the execution statement is malformed: {e}")))?;
    // Checked at the time the appliance says it started, as a manifest verifier will: a
    // result resent after a renewal still carries the certificate that signed it. That time
    // is the appliance's claim; it may at least not lie in the control plane's future.
    if unsigned.started_at > now.saturating_add(MAX_CLOCK_SKEW) {
        return refuse(format!("the execution claims to have started in the future ({})", unsigned.started_at));
    }
    let certified = verify_certified_envelope(
        &envelope,
        EXECUTION_PAYLOAD_TYPE,
        &r.appliance_certificate_pem,
        state.ca.cert_der().as_ref(),
        unsigned.started_at,
    )
    .or_else(|e| refuse(format!("the execution signature does not verify: {e}")))?;
    let signers: Vec<ApplianceIdentity> = certified.uris.iter().filter_map(|u| u.parse().ok()).collect();
    if signers.len() != 1 || signers[0] != *peer {
        return refuse("the execution was not signed by this appliance's certificate");
    }
    // The payload parsed above is the one the signature covers.
    let statement = unsigned;
    if statement.request_id != op.id || statement.appliance != op.appliance_id {
        return refuse("the execution statement is for another request or appliance");
    }
    if statement.request_digest != op.request_digest || statement.command_sha256 != op.command_sha256 {
        return refuse("the execution statement is for another request digest or command");
    }
    let status_fits = match outcome {
        OperationOutcome::Cancelled => statement.status == ExecutionStatus::Cancelled,
        _ => statement.status != ExecutionStatus::Cancelled,
    };
    if !status_fits {
        return refuse("the outcome does not match the signed execution status");
    }
    let mut pre_approval_json = None;
    match statement.authority.kind {
        AuthorityKind::Grant => {
            let approval = stored_envelope(op, op.approval_envelope.as_deref())?;
            let body = approval.and_then(|env| serde_json::from_slice::<GrantBody>(&env.payload).ok());
            match body {
                Some(b) if statement.authority.digest.as_deref() == Some(b.digest_hex().as_str()) => {
                    if b.decision != ApprovalDecision::Approve {
                        return refuse("executed on a grant that denies this request");
                    }
                }
                _ => return refuse("executed on a grant the control plane did not relay for this request"),
            }
        }
        AuthorityKind::PreApproval => {
            let env = Envelope::from_json(r.pre_approval_envelope_json.as_bytes())
                .or_else(|_| refuse("executed on a pre-approval, but its envelope is missing or malformed"))?;
            if env.payload_type != PRE_APPROVAL_PAYLOAD_TYPE || env.signatures.is_empty() {
                return refuse("the pre-approval envelope is not a signed pre-approval");
            }
            let body: PreApprovalBody = serde_json::from_slice(&env.payload)
                .or_else(|e| refuse(format!("the pre-approval body does not parse: {e}")))?;
            if statement.authority.digest.as_deref() != Some(body.digest_hex().as_str()) {
                return refuse("the execution names another pre-approval than the one sent");
            }
            if body.appliance != op.appliance_id
                || body.template != op.template_name
                || body.template_sha256 != op.template_sha256
                || body.phase != request.request.phase
            {
                return refuse("the pre-approval is for another appliance, template or phase");
            }
            pre_approval_json = Some(env.to_json());
        }
        // The customer's policy allowed it without a per-request signature (the control
        // plane has no customer policy to check it against; `airlock verify --policy` does).
        AuthorityKind::StandingWindow => {}
        // Only the appliance's own probes need no signature, and no template may be one.
        AuthorityKind::Probe => {
            return refuse("an operation template is never a built-in probe; `observe` cannot authorise it");
        }
    }
    Ok(VerifiedExecution { envelope, statement, cert_pem: r.appliance_certificate_pem.clone(), pre_approval_json })
}

/// The additional data output is sealed with: it can only be opened as this operation's output.
fn output_aad(scope: &TenantScope, request_id: OperationId) -> Vec<u8> {
    format!("airlock operation output v1\n{}\n{request_id}", scope.tenant()).into_bytes()
}

/// Opens an operation's sealed output.
pub fn open_output(
    state: &AppState,
    scope: &TenantScope,
    request_id: OperationId,
    sealed: &[u8],
) -> Result<Vec<u8>, crate::keys::KeyError> {
    state.kek.open(sealed, &output_aad(scope, request_id))
}

/// Handles an `OutputRelease` from `peer`. Output is checked against the signed digest and
/// sealed under the KEK; it is never logged and never audited (only its digest and size).
pub async fn handle_release(
    state: &AppState,
    peer: &ApplianceIdentity,
    scope: &TenantScope,
    rel: OutputRelease,
) -> Option<ControlMessage> {
    let shown = sanitize(&rel.request_id, 64);
    let result = match rel.request_id.parse::<OperationId>() {
        Ok(id) => apply_release(state, peer, scope, id, &rel).await,
        Err(e) => refuse(format!("the release's request id is malformed: {e}")),
    };
    finish(state, scope, &shown, OperationAckKind::Release, AuditAction::OperationReleaseRefused, result).await
}

async fn apply_release(
    state: &AppState,
    peer: &ApplianceIdentity,
    scope: &TenantScope,
    request_id: OperationId,
    rel: &OutputRelease,
) -> Result<(), Refuse> {
    let now = state.now();
    let mut tx = state.store.write().await?;
    let Some(op) = tx.operation(scope, request_id).await?.filter(|op| op.appliance_id == peer.appliance) else {
        return refuse(format!("no operation {request_id} for this appliance"));
    };
    if rel.release_envelope_json.len() > MAX_ENVELOPE_BYTES {
        return refuse(format!("the release envelope is larger than {MAX_ENVELOPE_BYTES} bytes"));
    }
    let release_env = if rel.release_envelope_json.is_empty() {
        None
    } else {
        Some(
            Envelope::from_json(rel.release_envelope_json.as_bytes())
                .or_else(|e| refuse(format!("the release envelope is malformed: {e}")))?,
        )
    };
    let release_json = release_env.as_ref().map(Envelope::to_json);
    if matches!(op.state, OperationState::Released | OperationState::Withheld) {
        return if op.release_envelope == release_json {
            Ok(())
        } else {
            refuse(format!("the output of operation {request_id} was already {}", op.state))
        };
    }
    let request = stored_request(&op)?;
    let secret = request.request.output_is_secret();
    // What can be checked without the execution is checked first: those refusals are final
    // whether or not the result has arrived.
    let signed = match &release_env {
        None => None,
        Some(env) => {
            if env.payload_type != RELEASE_PAYLOAD_TYPE || env.signatures.is_empty() {
                return refuse(format!("the release envelope is not a signed release ({RELEASE_PAYLOAD_TYPE})"));
            }
            let body: ReleaseStatement = serde_json::from_slice(&env.payload)
                .or_else(|e| refuse(format!("the release statement is malformed: {e}")))?;
            if body.request_id != op.id || body.appliance != op.appliance_id {
                return refuse("the release is for another request or appliance");
            }
            Some(body)
        }
    };
    // Without a signed release, output goes only under a commands-and-output pre-approval.
    let decision = signed.as_ref().map_or(ReleaseDecision::Release, |b| b.decision);
    match decision {
        ReleaseDecision::Release if secret => {
            return refuse(format!("output of a request tagged `{SECRET_OUTPUT_TAG}` is never accepted"));
        }
        ReleaseDecision::Withhold if !rel.output.is_empty() => return refuse("withheld output must not be sent"),
        _ => {}
    }
    let may_execute = matches!(op.state, OperationState::AwaitingApproval | OperationState::Approved);
    if op.result_at.is_none() && may_execute {
        // The result was not stored yet (its write failed, or the release overtook it): the
        // appliance resends its results before its releases, so this one can be taken later.
        // (A denied request's execution is refused, so its release is refused below for good.)
        return Err(Refuse::NotYet(format!("operation {request_id} has no result yet ({})", op.state)));
    }
    if !matches!(op.state, OperationState::Executed | OperationState::Cancelled) {
        return refuse(format!(
            "operation {request_id} has no execution whose output could be released ({})",
            op.state
        ));
    }
    let execution: ExecutionStatement = stored_envelope(&op, op.execution_envelope.as_deref())?
        .and_then(|env| serde_json::from_slice(&env.payload).ok())
        .ok_or_else(|| Refuse::Store(StoreError::Corrupt(format!("operation {request_id} execution statement"))))?;
    let approver = match &signed {
        None => {
            let pre = stored_envelope(&op, op.pre_approval_envelope.as_deref())?
                .and_then(|env| serde_json::from_slice::<PreApprovalBody>(&env.payload).ok());
            match pre {
                Some(p)
                    if p.level == ApprovalLevel::CommandsAndOutput
                        && execution.authority.kind == AuthorityKind::PreApproval =>
                {
                    format!("pre-approval {}", p.id)
                }
                _ => return refuse("output without a customer release needs a commands-and-output pre-approval"),
            }
        }
        Some(body) => {
            if body.output_sha256 != execution.output_sha256 || body.output_size != execution.output_size {
                return refuse("the release names other output than the signed execution");
            }
            sanitize(&body.approver, 100)
        }
    };
    let sealed = match decision {
        ReleaseDecision::Release => {
            if rel.output.len() as u64 != execution.output_size || sha256_hex(&rel.output) != execution.output_sha256 {
                return refuse("the output does not match the digest and size the appliance signed");
            }
            Some(state.kek.seal(&rel.output, &output_aad(scope, request_id)).or_else(|e| refuse(e.to_string()))?)
        }
        ReleaseDecision::Withhold => None,
    };
    let new_state =
        if decision == ReleaseDecision::Release { OperationState::Released } else { OperationState::Withheld };
    let update =
        ReleaseUpdate { state: new_state, release_envelope: release_json.as_deref(), output_sealed: sealed.as_deref() };
    if !tx.record_release(scope, peer.appliance, request_id, &update, now).await? {
        // Cannot happen under the write lock; if it does, the appliance sends it again.
        return Err(Refuse::NotYet(format!("operation {request_id} changed while its release was checked")));
    }
    let action = if new_state == OperationState::Released {
        AuditAction::OperationReleased
    } else {
        AuditAction::OperationWithheld
    };
    let mut ev = event(scope.principal().actor(), action, Outcome::Success);
    ev.target = Some(request_id.to_string());
    // Digest and size only: the output itself never reaches the audit or the logs.
    ev.detail = serde_json::json!({
        "output_sha256": execution.output_sha256,
        "output_size": execution.output_size,
        "approver": approver,
        "signed_release": release_env.is_some(),
    });
    tx.audit(&scope.chain(), now, ev).await?;
    tx.commit().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_and_ids_parse_strictly() {
        for s in OperationState::ALL {
            assert_eq!(s.as_str().parse::<OperationState>().unwrap(), s);
        }
        assert!("done".parse::<OperationState>().is_err());
        let id = OperationId::from_random([0xab; 16]);
        assert_eq!(id.to_string().parse::<OperationId>().unwrap(), id);
        for bad in
            ["op_", "op_ABABABABABABABABABABABABABABABAB", "xx_abababababababababababababababab", &format!("{id}0")]
        {
            assert!(bad.parse::<OperationId>().is_err(), "{bad}");
        }
    }
}
