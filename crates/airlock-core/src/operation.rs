//! Signed operations: what each party signs about one operation, and the manifest that binds
//! the signatures together so either party can check the whole story offline.
//!
//! One operation produces up to four DSSE envelopes:
//! 1. the **request** ([`RequestStatement`]), signed by the control plane's operations key
//!    (a certificate from the built-in CA, URI SAN `spiffe://<trust-domain>/control-plane`);
//! 2. the customer's **approval** (a [`crate::grant::GrantBody`]) or **pre-approval**
//!    ([`crate::grant::PreApprovalBody`]), signed by pinned customer keys;
//! 3. the appliance's **execution** ([`ExecutionStatement`]), signed by the appliance's key
//!    (its CA-issued certificate names the appliance) and by its execution key, which the
//!    customer attested ([`crate::execution_key`]; the attestation travels in the manifest);
//! 4. the customer's **release** ([`ReleaseStatement`]) of the output, or its withholding.
//!
//! [`verify_manifest`] needs only the CA certificate and the customer's public keys: the CA
//! alone cannot forge an execution, since the execution key's attestation is the customer's.
//! An execution with no attestation (signed before attestations) is refused, or reported as
//! vendor-attested only when the verifier allows it ([`VendorAttested`]). X.509
//! signed envelopes use ECDSA P-256 with SHA-256 (DER signatures), the key type of the
//! certificates our CA issues, so standard DSSE tooling verifies them with the certificate's key.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::customer_key::CustomerPublicKey;
use crate::dsse::{Envelope, Signature, pae};
use crate::execution_key::{AttestationRefusal, verify_attestation};
use crate::grant::{
    ApprovalDecision, ApprovalLevel, Authority, Context, Decision, DenyReason, GRANT_PAYLOAD_TYPE, OperationRequest,
    PreApprovalBody, evaluate_with, verify_grant_envelope, verify_pre_approval_envelope,
};
pub use crate::output_commitment::{OpenedAs, OutputCommitment, OutputMismatch, OutputSalt, output_commitment};
use crate::output_commitment::{SignedCommitment, from_signed, to_signed};
use crate::policy::VerifiedPolicy;
use crate::probe::BuiltinProbe;
use crate::template::RenderedCommand;
use crate::{ApplianceIdentity, EnvironmentId, OperationId, TenantId, Timestamp};

pub const REQUEST_PAYLOAD_TYPE: &str = "application/vnd.airlock.operation-request.v1+json";
pub const EXECUTION_PAYLOAD_TYPE: &str = "application/vnd.airlock.execution.v1+json";
pub const RELEASE_PAYLOAD_TYPE: &str = "application/vnd.airlock.release.v1+json";
pub const MANIFEST_FORMAT: &str = "airlock-operation-manifest-v1";

/// The path of the control plane's operations-signing identity under its trust domain.
pub const CONTROL_PLANE_SPIFFE_PATH: &str = "/control-plane";

/// What the vendor asked for, signed by the control plane.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestStatement {
    pub request: OperationRequest,
    /// The exact command; its SHA-256 is `request.command_sha256`.
    pub command: RenderedCommand,
    pub reason: String,
    /// The API principal who asked.
    pub requested_by: String,
    pub requested_at: Timestamp,
    pub tenant: TenantId,
    pub environment: EnvironmentId,
}

/// How an operation ended on the appliance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExecutionStatus {
    /// The process ran to its end; `exit_code` says how.
    Completed,
    /// The customer revoked the phase (or the appliance stopped) while it ran: it was killed.
    Cancelled,
    /// The process could not be started.
    FailedToStart,
    /// It ran past its wall-time limit: everything it started was killed.
    TimedOut,
    /// It held more of the appliance's disk (bytes or files), memory or threads than its box
    /// allows, or the most of a disk short of its reserve: everything it started was killed.
    OverLimit,
}

/// What kind of customer authority an execution ran on. Its JSON spelling is part of the
/// signed execution statement, so it never changes; an unknown spelling does not parse.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AuthorityKind {
    /// A customer approval of this one request.
    #[serde(rename = "grant")]
    Grant,
    /// A customer pre-approval of the template on this appliance.
    #[serde(rename = "pre-approval")]
    PreApproval,
    /// A standing window of the customer's signed policy.
    #[serde(rename = "standing-window")]
    StandingWindow,
    /// The appliance's own read-only probes, which Observe allows without a signature.
    #[serde(rename = "observe")]
    Probe,
}

impl AuthorityKind {
    pub const ALL: [AuthorityKind; 4] =
        [AuthorityKind::Grant, AuthorityKind::PreApproval, AuthorityKind::StandingWindow, AuthorityKind::Probe];

    pub const fn as_str(self) -> &'static str {
        match self {
            AuthorityKind::Grant => "grant",
            AuthorityKind::PreApproval => "pre-approval",
            AuthorityKind::StandingWindow => "standing-window",
            AuthorityKind::Probe => "observe",
        }
    }
}

impl std::fmt::Display for AuthorityKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where an operation stands, as the control plane tracks it (and the API and the CLI show
/// it). Its text form is stored in the database and served in JSON; an unknown spelling is
/// refused, never mapped to a default.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum OperationState {
    AwaitingApproval,
    Approved,
    Denied,
    Executed,
    Cancelled,
    Refused,
    Released,
    Withheld,
}

impl OperationState {
    pub const ALL: [OperationState; 8] = [
        OperationState::AwaitingApproval,
        OperationState::Approved,
        OperationState::Denied,
        OperationState::Executed,
        OperationState::Cancelled,
        OperationState::Refused,
        OperationState::Released,
        OperationState::Withheld,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            OperationState::AwaitingApproval => "awaiting_approval",
            OperationState::Approved => "approved",
            OperationState::Denied => "denied",
            OperationState::Executed => "executed",
            OperationState::Cancelled => "cancelled",
            OperationState::Refused => "refused",
            OperationState::Released => "released",
            OperationState::Withheld => "withheld",
        }
    }
}

impl std::fmt::Display for OperationState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A state spelling no version of Airlock wrote.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown operation state `{0}`")]
pub struct UnknownState(pub String);

impl std::str::FromStr for OperationState {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        OperationState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownState(s.chars().take(40).collect()))
    }
}

/// Why the appliance did not run an operation (yet). Crosses the wire as a code, so neither
/// side ever reads the other's sentence; the text beside it is for people.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum RefusalCode {
    // Not final: the appliance may run it once authority arrives (`AWAITING_APPROVAL`).
    /// Nothing the appliance holds authorises it yet.
    AwaitingAuthority,
    /// The customer's approval is valid only from a later time (sent beside the code).
    ApprovalNotYetValid,
    // Final (`REFUSED`).
    /// The instruction is malformed (its id, its approval's encoding).
    Malformed,
    /// The request is not signed by the control plane's operations identity.
    Unauthenticated,
    /// The request names another appliance, tenant or environment, or its command is not
    /// what the appliance renders from the template.
    Misbound,
    /// The relayed approval does not verify with the pinned customer keys.
    ApprovalInvalid,
    /// The customer signed a denial.
    CustomerDenied,
    /// The customer's policy (or a built-in rule) refuses it; the [`crate::grant::DenyCode`]
    /// beside it says which check.
    Denied,
    /// The appliance could not record the execution (e.g. a full disk).
    NotRecorded,
    /// The instruction's template is over one of core's limits
    /// ([`crate::template::TemplateError::Limit`]): refused before any costly work.
    LimitExceeded,
    /// A deploy's release does not verify with a release key the customer accepts (unsigned,
    /// signed by a key the vendor did not register or the customer's policy excludes, or not a
    /// valid release), or its request does not deploy exactly that release.
    ReleaseUnverified,
    /// Refused by an appliance that kept no code (before codes existed); the text says why.
    /// An appliance sends it only for a refusal it stored then, so the control plane can take
    /// it as the final refusal it always was.
    Unclassified,
}

impl RefusalCode {
    /// Whether the appliance may still run it: the control plane keeps offering it.
    pub const fn is_retryable(self) -> bool {
        matches!(self, RefusalCode::AwaitingAuthority | RefusalCode::ApprovalNotYetValid)
    }
}

/// The control plane's answer to a result or release the appliance sent up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AckCode {
    /// Stored: the appliance drops it from its outbox.
    Stored,
    /// Not stored yet, through no fault of its own (a release that arrived before its
    /// operation's result): the appliance keeps it and sends it again after its results.
    Retry,
    /// Refused, and it will be refused again: the appliance keeps its copy, parks it and
    /// audits the refusal.
    Refused,
}

/// What authorised an execution.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorityRef {
    pub kind: AuthorityKind,
    /// SHA-256 of the grant's or pre-approval's signed body, when there is one.
    pub digest: Option<String>,
    /// The customer policy in force (its digest), when there is one.
    pub policy_digest: Option<String>,
}

/// What the appliance did, signed by the appliance's own key.
///
/// What it says about the output is an [`OutputCommitment`]: salted, or nothing at all for
/// secret output (see [`crate::output_commitment`]). Statements signed before salts spelled
/// it as `output_sha256` and `output_size`; they still parse, as
/// [`OutputCommitment::LegacyUnsalted`], and serialize back to the same bytes, so the chain
/// links ([`ExecutionStatement::manifest_sha256`]) computed over them do not change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "ExecutionStatementJson", into = "ExecutionStatementJson")]
pub struct ExecutionStatement {
    pub request_id: OperationId,
    pub appliance: crate::ApplianceId,
    pub request_digest: String,
    pub command_sha256: String,
    pub authority: AuthorityRef,
    pub status: ExecutionStatus,
    pub started_at: Timestamp,
    pub finished_at: Timestamp,
    pub exit_code: Option<i32>,
    /// The commitment to the output held on the appliance (stdout then stderr, as captured).
    pub output_commitment: OutputCommitment,
    /// The output hit the appliance's capture limit; what is held is its first part.
    /// `None` exactly when the output is secret: not even that leaves the appliance.
    pub output_truncated: Option<bool>,
    /// Position in this appliance's chain of manifests, from 1.
    pub sequence: u64,
    /// [`ExecutionStatement::manifest_sha256`] of this appliance's previous operation.
    pub previous_manifest_sha256: Option<String>,
}

/// The signed JSON of an [`ExecutionStatement`], field for field in the order it is signed.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecutionStatementJson {
    request_id: OperationId,
    appliance: crate::ApplianceId,
    request_digest: String,
    command_sha256: String,
    authority: AuthorityRef,
    status: ExecutionStatus,
    started_at: Timestamp,
    finished_at: Timestamp,
    exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    output_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    output_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    output_commitment: Option<SignedCommitment>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    output_truncated: Option<bool>,
    sequence: u64,
    previous_manifest_sha256: Option<String>,
}

impl TryFrom<ExecutionStatementJson> for ExecutionStatement {
    type Error = String;
    fn try_from(j: ExecutionStatementJson) -> Result<Self, String> {
        let output_commitment = from_signed(j.output_sha256, j.output_size, j.output_commitment)?;
        if (output_commitment == OutputCommitment::Secret) != j.output_truncated.is_none() {
            return Err("output_truncated is given exactly when the output is not secret".into());
        }
        Ok(Self {
            request_id: j.request_id,
            appliance: j.appliance,
            request_digest: j.request_digest,
            command_sha256: j.command_sha256,
            authority: j.authority,
            status: j.status,
            started_at: j.started_at,
            finished_at: j.finished_at,
            exit_code: j.exit_code,
            output_commitment,
            output_truncated: j.output_truncated,
            sequence: j.sequence,
            previous_manifest_sha256: j.previous_manifest_sha256,
        })
    }
}

impl From<ExecutionStatement> for ExecutionStatementJson {
    fn from(e: ExecutionStatement) -> Self {
        let (output_sha256, output_size, output_commitment) = to_signed(&e.output_commitment);
        Self {
            request_id: e.request_id,
            appliance: e.appliance,
            request_digest: e.request_digest,
            command_sha256: e.command_sha256,
            authority: e.authority,
            status: e.status,
            started_at: e.started_at,
            finished_at: e.finished_at,
            exit_code: e.exit_code,
            output_sha256,
            output_size,
            output_commitment,
            output_truncated: e.output_truncated,
            sequence: e.sequence,
            previous_manifest_sha256: e.previous_manifest_sha256,
        }
    }
}

impl ExecutionStatement {
    /// The link the next manifest points at: SHA-256 of this statement's canonical JSON.
    /// It is fixed once the operation ran; the later release does not change it.
    pub fn manifest_sha256(&self) -> String {
        crate::grant::sha256_json(self)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReleaseDecision {
    Release,
    Withhold,
}

/// The customer's decision about one operation's output, signed with their key. It names the
/// execution's [`OutputCommitment`] exactly (statements signed before salts named
/// `output_sha256` and `output_size`, and still parse as [`OutputCommitment::LegacyUnsalted`]).
/// It never carries the salt: a withholding must reveal nothing, and a release reveals the salt
/// beside the output ([`Manifest::output_salt`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "ReleaseStatementJson", into = "ReleaseStatementJson")]
pub struct ReleaseStatement {
    pub request_id: OperationId,
    pub appliance: crate::ApplianceId,
    pub decision: ReleaseDecision,
    pub output_commitment: OutputCommitment,
    pub decided_at: Timestamp,
    pub approver: String,
    pub reason: String,
}

/// The signed JSON of a [`ReleaseStatement`].
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReleaseStatementJson {
    request_id: OperationId,
    appliance: crate::ApplianceId,
    decision: ReleaseDecision,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    output_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    output_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    output_commitment: Option<SignedCommitment>,
    decided_at: Timestamp,
    approver: String,
    reason: String,
}

impl TryFrom<ReleaseStatementJson> for ReleaseStatement {
    type Error = String;
    fn try_from(j: ReleaseStatementJson) -> Result<Self, String> {
        Ok(Self {
            request_id: j.request_id,
            appliance: j.appliance,
            decision: j.decision,
            output_commitment: from_signed(j.output_sha256, j.output_size, j.output_commitment)?,
            decided_at: j.decided_at,
            approver: j.approver,
            reason: j.reason,
        })
    }
}

impl From<ReleaseStatement> for ReleaseStatementJson {
    fn from(r: ReleaseStatement) -> Self {
        let (output_sha256, output_size, output_commitment) = to_signed(&r.output_commitment);
        Self {
            request_id: r.request_id,
            appliance: r.appliance,
            decision: r.decision,
            output_sha256,
            output_size,
            output_commitment,
            decided_at: r.decided_at,
            approver: r.approver,
            reason: r.reason,
        }
    }
}

/// Everything about one operation, as both sides keep it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub request_id: OperationId,
    pub request: Envelope,
    /// PEM of the certificate whose key signed `request`.
    pub control_plane_certificate: String,
    #[serde(default)]
    pub approval: Option<Envelope>,
    #[serde(default)]
    pub pre_approval: Option<Envelope>,
    #[serde(default)]
    pub execution: Option<Envelope>,
    /// PEM of the appliance certificate whose key signed `execution`.
    #[serde(default)]
    pub appliance_certificate: Option<String>,
    #[serde(default)]
    pub release: Option<Envelope>,
    /// The customer's attestation of the execution key that signed `execution`
    /// ([`crate::execution_key::ExecutionKeyAttestation`]). Absent from manifests made before
    /// attestations, which then serialize to the same bytes as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub appliance_attestation: Option<Envelope>,
    /// The salt of the execution's output commitment, revealed with released output (and only
    /// then): with it anyone holding the output checks it against the signed commitment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_salt: Option<OutputSalt>,
}

impl Manifest {
    pub fn new(request_id: OperationId, request: Envelope, control_plane_certificate: String) -> Self {
        Self {
            format: MANIFEST_FORMAT.to_owned(),
            request_id,
            request,
            control_plane_certificate,
            approval: None,
            pre_approval: None,
            execution: None,
            appliance_certificate: None,
            release: None,
            appliance_attestation: None,
            output_salt: None,
        }
    }
}

/// The SHA-256 of a payload, as hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(&Sha256::digest(bytes))
}

/// The key id we put on envelopes signed by a certificate's key: SHA-256 (hex) of its
/// SubjectPublicKeyInfo, so any tool can recompute it from the certificate.
pub fn certificate_key_id(cert_der: &[u8]) -> Result<String, X509SignatureError> {
    let info = crate::certificate::inspect_der(cert_der)
        .map_err(|e| X509SignatureError::Certificate(format!("is unreadable ({e})")))?;
    Ok(sha256_hex(&info.spki_der))
}

/// Adds a signature made elsewhere (by a key this crate never holds) to an envelope.
pub fn add_signature(mut envelope: Envelope, keyid: String, sig: Vec<u8>) -> Envelope {
    envelope.signatures.push(Signature { keyid, sig });
    envelope
}

/// The bytes an X.509 key signs for `envelope`: the DSSE pre-authentication encoding.
pub fn signing_input(envelope: &Envelope) -> Vec<u8> {
    pae(&envelope.payload_type, &envelope.payload)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum X509SignatureError {
    #[error("certificate {0}")]
    Certificate(String),
    #[error("the certificate was not issued by the given CA")]
    NotIssuedByCa,
    #[error("the certificate was not valid at {0}")]
    NotValidAt(Timestamp),
    #[error("envelope payload type is `{found}`, expected `{expected}`")]
    WrongType { expected: String, found: String },
    #[error("no signature on the envelope verifies with the certificate's key")]
    BadSignature,
}

/// What a verified certificate-signed envelope's signer is: the URIs its certificate names.
/// (The payload is the envelope's own, now known to be signed.)
#[derive(Debug)]
pub struct CertifiedPayload {
    pub uris: Vec<String>,
}

/// Parses a PEM certificate (the first one in `pem`) into DER.
pub fn pem_certificate_der(pem: &str) -> Result<Vec<u8>, X509SignatureError> {
    crate::certificate::pem_to_der(pem).map_err(|e| X509SignatureError::Certificate(format!("is unreadable ({e})")))
}

/// Whether `uri` names the control plane's operations identity: `spiffe://<trust domain>/control-plane`,
/// in `trust_domain` when the caller knows it.
pub fn is_control_plane_identity(uri: &str, trust_domain: Option<&str>) -> bool {
    let Some(td) = uri.strip_prefix("spiffe://").and_then(|rest| rest.strip_suffix(CONTROL_PLANE_SPIFFE_PATH)) else {
        return false;
    };
    !td.is_empty() && !td.contains('/') && trust_domain.is_none_or(|want| want == td)
}

/// Why a request envelope is not the control plane's signed request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestSignatureError {
    #[error("the request signature does not verify: {0}")]
    Signature(X509SignatureError),
    #[error("the request was not signed by the control plane's operations identity")]
    NotControlPlane,
    #[error("the signed request is malformed: {0}")]
    Malformed(String),
}

/// The request the control plane signed: `envelope` must carry a [`RequestStatement`] signed
/// with a certificate `ca_der` issued to the operations identity, valid at `at` (the
/// statement's own `requested_at` when `None`, as an offline verifier checks it).
/// The one check of a request's signature, for the appliance before it runs anything and for
/// the customer's CLI before it shows a request for review.
pub fn verify_signed_request(
    envelope: &Envelope,
    cert_pem: &str,
    ca_der: &[u8],
    at: Option<Timestamp>,
    trust_domain: Option<&str>,
) -> Result<RequestStatement, RequestSignatureError> {
    let parse = || -> Result<RequestStatement, RequestSignatureError> {
        serde_json::from_slice(&envelope.payload).map_err(|e| RequestSignatureError::Malformed(e.to_string()))
    };
    let at = match at {
        Some(at) => at,
        None => parse()?.requested_at,
    };
    // The signature first: what an unauthenticated payload says decides nothing.
    let certified = verify_certified_envelope(envelope, REQUEST_PAYLOAD_TYPE, cert_pem, ca_der, at)
        .map_err(RequestSignatureError::Signature)?;
    if !certified.uris.iter().any(|u| is_control_plane_identity(u, trust_domain)) {
        return Err(RequestSignatureError::NotControlPlane);
    }
    parse()
}

/// Checks that `cert_pem` was issued by `ca_der`, was valid at `at`, and signed `envelope`.
pub fn verify_certified_envelope(
    envelope: &Envelope,
    expected_type: &str,
    cert_pem: &str,
    ca_der: &[u8],
    at: Timestamp,
) -> Result<CertifiedPayload, X509SignatureError> {
    let (_, ca) = x509_parser::parse_x509_certificate(ca_der)
        .map_err(|e| X509SignatureError::Certificate(format!("of the CA does not parse: {e}")))?;
    verify_with_ca(envelope, expected_type, cert_pem, &ca, at)
}

fn verify_with_ca(
    envelope: &Envelope,
    expected_type: &str,
    cert_pem: &str,
    ca: &x509_parser::certificate::X509Certificate<'_>,
    at: Timestamp,
) -> Result<CertifiedPayload, X509SignatureError> {
    use x509_parser::prelude::*;
    if envelope.payload_type != expected_type {
        return Err(X509SignatureError::WrongType {
            expected: expected_type.to_owned(),
            found: envelope.payload_type.clone(),
        });
    }
    let der = pem_certificate_der(cert_pem)?;
    let (_, cert) =
        parse_x509_certificate(&der).map_err(|e| X509SignatureError::Certificate(format!("does not parse: {e}")))?;
    if cert.issuer() != ca.subject() || cert.verify_signature(Some(ca.public_key())).is_err() {
        return Err(X509SignatureError::NotIssuedByCa);
    }
    let secs = at.unix_seconds();
    if secs < cert.validity().not_before.timestamp() || secs > cert.validity().not_after.timestamp() {
        return Err(X509SignatureError::NotValidAt(at));
    }
    let key = ring::signature::UnparsedPublicKey::new(
        &ring::signature::ECDSA_P256_SHA256_ASN1,
        cert.public_key().subject_public_key.data.as_ref(),
    );
    let message = pae(&envelope.payload_type, &envelope.payload);
    if envelope.signatures.len() > crate::dsse::MAX_SIGNATURES
        || !envelope.signatures.iter().any(|s| key.verify(&message, &s.sig).is_ok())
    {
        return Err(X509SignatureError::BadSignature);
    }
    // A SAN that does not parse names no one: the signer then matches no identity.
    let uris = crate::certificate::uris(&cert).unwrap_or_default();
    Ok(CertifiedPayload { uris })
}

/// What a verifier brings: trust anchors only.
pub struct VerifyInputs<'a> {
    /// DER of the control plane's CA certificate.
    pub ca_der: &'a [u8],
    pub customer_keys: &'a [CustomerPublicKey],
    /// Distinct customer keys an approval needs (the customer policy's `approvals_required`).
    pub approvals_required: usize,
    /// The customer's policy, verified by the caller: the one an execution names is held against
    /// its deny rules and caps, and it is the proof of an execution in a standing window (no
    /// per-request signature exists then).
    pub policy: Option<&'a VerifiedPolicy>,
    /// What to make of an execution no customer attestation vouches for.
    pub vendor_attested: VendorAttested,
}

/// Whether an execution vouched for only by a certificate from the vendor's CA (a manifest
/// made before execution keys were attested) is accepted. Such a one could have been forged
/// by whoever holds the CA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VendorAttested {
    /// Refused, with [`AttestationRefusal::VendorAttestedOnly`]: the default.
    Refuse,
    /// Accepted, and reported as [`ExecutionTrust::VendorAttestedOnly`].
    Accept,
}

/// Who vouches for a verified execution.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExecutionTrust {
    /// Signed by the appliance's execution key, which the customer attested.
    CustomerAttested {
        /// The execution key's id (SHA-256 of the raw public key, hex).
        key_id: String,
        attested_at: Timestamp,
        attested_by: String,
    },
    /// Only a certificate from the vendor's CA: whoever holds the CA could have signed it.
    VendorAttestedOnly,
}

/// The check that failed, by name, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("check `{check}` failed: {reason}")]
pub struct ManifestError {
    pub check: &'static str,
    pub reason: String,
    /// The decision the execution contradicts, when one does: a built-in deny, a customer
    /// deny rule, a policy cap, a probe that is not one. Read this, never `reason`.
    pub denied: Option<DenyReason>,
    /// Why the execution's signer is not one the customer vouched for, when that failed.
    pub attestation: Option<AttestationRefusal>,
}

/// What a manifest proves, once every check passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestReport {
    pub request: RequestStatement,
    pub approval: Option<crate::grant::GrantBody>,
    pub pre_approval: Option<PreApprovalBody>,
    pub execution: Option<ExecutionStatement>,
    pub release: Option<ReleaseStatement>,
    /// The salt the manifest reveals for released output (checked by [`verify_released_output`]).
    pub output_salt: Option<OutputSalt>,
    /// Every check that passed, in order.
    pub checks: Vec<&'static str>,
    /// Whether the execution was held against the customer's deny rules and caps: the policy
    /// it names was given (or it names none). Built-in denies are always checked.
    pub policy_checked: bool,
    /// Who vouches for the execution, when there is one.
    pub execution_trust: Option<ExecutionTrust>,
}

fn fail<T>(check: &'static str, reason: impl std::fmt::Display) -> Result<T, ManifestError> {
    Err(ManifestError { check, reason: reason.to_string(), denied: None, attestation: None })
}

fn denied<T>(check: &'static str, reason: DenyReason) -> Result<T, ManifestError> {
    Err(ManifestError { check, reason: reason.to_string(), denied: Some(reason), attestation: None })
}

fn unattested<T>(check: &'static str, refusal: AttestationRefusal) -> Result<T, ManifestError> {
    Err(ManifestError { check, reason: refusal.to_string(), denied: None, attestation: Some(refusal) })
}

fn parse<T: serde::de::DeserializeOwned>(check: &'static str, payload: &[u8]) -> Result<T, ManifestError> {
    serde_json::from_slice(payload).or_else(|e| fail(check, format!("the signed statement is malformed: {e}")))
}

/// Verifies every signature and binding in a manifest, offline, and that the execution was
/// allowed: the built-in denies, the built-in probes, and (given the policy it names) the
/// customer's deny rules and caps, whatever authority it ran on. Stops at the first failing
/// check and names it.
pub fn verify_manifest(json: &[u8], inputs: &VerifyInputs<'_>) -> Result<ManifestReport, ManifestError> {
    let m: Manifest = serde_json::from_slice(json).or_else(|e| fail("manifest.format", e))?;
    verify_parsed_manifest(&m, inputs)
}

/// The digest of the policy a manifest's execution names, unverified: only for picking which
/// of the customer's signed policies to verify it with.
pub fn named_policy_digest(json: &[u8]) -> Option<String> {
    let m: Manifest = serde_json::from_slice(json).ok()?;
    let e: ExecutionStatement = serde_json::from_slice(&m.execution?.payload).ok()?;
    e.authority.policy_digest
}

/// [`verify_manifest`] for a manifest already parsed.
pub fn verify_parsed_manifest(m: &Manifest, inputs: &VerifyInputs<'_>) -> Result<ManifestReport, ManifestError> {
    let mut checks = Vec::new();
    if m.format != MANIFEST_FORMAT {
        return fail("manifest.format", format!("format is `{}`, expected `{MANIFEST_FORMAT}`", m.format));
    }
    checks.push("manifest.format");
    let (_, ca) = x509_parser::parse_x509_certificate(inputs.ca_der)
        .or_else(|e| fail("request.signature", format!("the CA certificate does not parse: {e}")))?;

    // 1. The request, as the control plane signed it. Its payload is parsed once: the time
    // it names is checked against the certificate in the same step that verifies the bytes.
    let request: RequestStatement = parse("request.signature", &m.request.payload)?;
    let certified =
        verify_with_ca(&m.request, REQUEST_PAYLOAD_TYPE, &m.control_plane_certificate, &ca, request.requested_at)
            .or_else(|e| fail("request.signature", e))?;
    checks.push("request.signature");
    if !certified.uris.iter().any(|u| is_control_plane_identity(u, None)) {
        return fail("request.signer", "the signing certificate is not the control plane's operations identity");
    }
    checks.push("request.signer");
    let req = &request.request;
    if req.id != m.request_id {
        return fail("request.id", format!("the manifest is for {}, the signed request is {}", m.request_id, req.id));
    }
    checks.push("request.id");
    if request.command.sha256() != req.command_sha256 || request.command.template != req.kind {
        return fail("request.command", "the command does not hash to the request's command_sha256");
    }
    checks.push("request.command");
    // What the customer signs names the environment (requests made before it did not): it
    // must be the one the control plane's statement names.
    if req.environment.is_some_and(|env| env != request.environment) {
        return fail("request.environment", "the request the customer signs names another environment");
    }
    let request_digest = req.digest_hex();

    // 2. The customer's authority: an approval or a pre-approval.
    let mut approval = None;
    let mut pre_approval = None;
    let mut verified_grant = None;
    let mut verified_pre = None;
    if let Some(env) = &m.approval {
        let g = verify_grant_envelope(env, inputs.customer_keys, inputs.approvals_required)
            .or_else(|e| fail("approval.signature", e))?;
        checks.push("approval.signature");
        let b = g.body().clone();
        if b.request_id != req.id
            || b.request_digest != request_digest
            || b.command_sha256 != req.command_sha256
            || b.appliance != req.appliance
            || b.phase != req.phase
        {
            return fail("approval.binding", "the approval is for another request, command, appliance or phase");
        }
        checks.push("approval.binding");
        approval = Some(b);
        verified_grant = Some(g);
    }
    if let Some(env) = &m.pre_approval {
        let p = verify_pre_approval_envelope(env, inputs.customer_keys, inputs.approvals_required)
            .or_else(|e| fail("pre-approval.signature", e))?;
        checks.push("pre-approval.signature");
        let b = p.body();
        if b.appliance != req.appliance
            || b.template != req.kind
            || b.template_sha256 != request.command.template_sha256
            || b.phase != req.phase
        {
            return fail("pre-approval.binding", "the pre-approval is for another appliance, template or phase");
        }
        checks.push("pre-approval.binding");
        if let Err(var) = p.constraints_match(&req.args) {
            return fail("pre-approval.constraints", format!("variable `{var}` does not meet its constraint"));
        }
        checks.push("pre-approval.constraints");
        pre_approval = Some(b.clone());
        verified_pre = Some(p);
    }

    // 3. The execution, as the appliance signed it.
    let mut execution = None;
    let mut policy_checked = false;
    let mut execution_trust = None;
    if let Some(env) = &m.execution {
        let Some(cert) = m.appliance_certificate.as_deref() else {
            return fail("execution.signature", "the manifest has an execution but no appliance certificate");
        };
        let e: ExecutionStatement = parse("execution.signature", &env.payload)?;
        let certified = verify_with_ca(env, EXECUTION_PAYLOAD_TYPE, cert, &ca, e.started_at)
            .or_else(|e| fail("execution.signature", e))?;
        checks.push("execution.signature");
        let signer = certified.uris.iter().find_map(|u| u.parse::<ApplianceIdentity>().ok());
        match signer {
            Some(id) if id.appliance == req.appliance && id.environment == request.environment => {}
            _ => {
                return fail(
                    "execution.signer",
                    format!("the execution was not signed by appliance {}", req.appliance),
                );
            }
        }
        checks.push("execution.signer");

        // The CA vouches for the certificate, and whoever holds the CA could mint another: the
        // customer's attestation of the appliance's own execution key is what proves the
        // appliance signed it.
        match &m.appliance_attestation {
            Some(att) => {
                let attested = verify_attestation(att, inputs.customer_keys, inputs.approvals_required)
                    .or_else(|r| unattested("execution.attestation", r))?;
                attested
                    .check_names(req.appliance, request.environment, request.tenant)
                    .or_else(|r| unattested("execution.attestation", r))?;
                checks.push("execution.attestation");
                if !attested.key().signed(env, EXECUTION_PAYLOAD_TYPE) {
                    return unattested("execution.attested-key", AttestationRefusal::NotSignedByAttestedKey);
                }
                checks.push("execution.attested-key");
                // The attested key is newer than salted commitments: an execution it signed
                // with a plain digest was not made by this appliance's code.
                if matches!(e.output_commitment, OutputCommitment::LegacyUnsalted { .. }) {
                    return fail("execution.output", "an attested execution carries a legacy unsalted digest");
                }
                let s = attested.statement();
                execution_trust = Some(ExecutionTrust::CustomerAttested {
                    key_id: attested.key().key_id().to_owned(),
                    attested_at: s.attested_at,
                    attested_by: s.attested_by.clone(),
                });
            }
            None => match inputs.vendor_attested {
                VendorAttested::Refuse => {
                    return unattested("execution.attestation", AttestationRefusal::VendorAttestedOnly);
                }
                VendorAttested::Accept => execution_trust = Some(ExecutionTrust::VendorAttestedOnly),
            },
        }
        // The host the customer's signature names, when it names one: the execution must be
        // vouched for by that key, not by another host given the same appliance id.
        if let Some(named) = &req.execution_key {
            match &execution_trust {
                Some(ExecutionTrust::CustomerAttested { key_id, .. }) if key_id == named => {}
                Some(ExecutionTrust::CustomerAttested { key_id, .. }) => {
                    return fail(
                        "request.execution-key",
                        format!(
                            "the request was approved for the host with execution key {named}, but it ran on the host with key {key_id}"
                        ),
                    );
                }
                _ => {
                    return fail(
                        "request.execution-key",
                        format!(
                            "the request was approved for the host with execution key {named}, but the execution carries no attestation of that key"
                        ),
                    );
                }
            }
            checks.push("request.execution-key");
        }
        if e.request_id != req.id
            || e.request_digest != request_digest
            || e.command_sha256 != req.command_sha256
            || e.appliance != req.appliance
        {
            return fail("execution.binding", "the execution is for another request or command");
        }
        checks.push("execution.binding");
        match e.authority.kind {
            AuthorityKind::Grant => {
                let Some(a) = &approval else {
                    return fail("execution.authority", "executed on a grant, but the manifest has no approval");
                };
                if e.authority.digest.as_deref() != Some(a.digest_hex().as_str()) {
                    return fail(
                        "execution.authority",
                        "executed on a different approval than the one in the manifest",
                    );
                }
                if a.decision != ApprovalDecision::Approve {
                    return fail("execution.authority", "the customer denied this request, yet it was executed");
                }
                if e.started_at < a.not_before || e.started_at >= a.not_after {
                    return fail("execution.authority", "executed outside the approval's window");
                }
            }
            AuthorityKind::PreApproval => {
                let Some(p) = &pre_approval else {
                    return fail("execution.authority", "executed on a pre-approval, but the manifest has none");
                };
                if e.authority.digest.as_deref() != Some(p.digest_hex().as_str()) {
                    return fail(
                        "execution.authority",
                        "executed on a different pre-approval than the one in the manifest",
                    );
                }
                if e.started_at < p.not_before || e.started_at >= p.not_after {
                    return fail("execution.authority", "executed outside the pre-approval's window");
                }
            }
            // No customer signature is needed for the appliance's own read-only probes, and
            // nothing else is one, whatever it is called: the request must be the probe's own
            // command, with no script, variables or data tags.
            AuthorityKind::Probe => {
                if BuiltinProbe::of_signed(req, &request.command).is_none() {
                    return denied("execution.authority", DenyReason::NotBuiltinProbe { kind: req.kind.clone() });
                }
            }
            // The customer's signed policy allowed it in a standing window: check against it.
            AuthorityKind::StandingWindow => {
                let Some(policy) = inputs.policy else {
                    return fail(
                        "execution.authority",
                        "executed in a standing window of the customer's policy; give that signed policy to check it",
                    );
                };
                if e.authority.policy_digest.as_deref() != Some(policy.digest_hex().as_str()) {
                    return fail("execution.authority", "executed under another policy than the one given");
                }
                let doc = policy.document();
                let inside = doc.phases.contains(&req.phase)
                    && doc
                        .windows
                        .iter()
                        .any(|w| crate::grant::window_covers(w, req, &request.command.template_sha256, e.started_at));
                if !inside {
                    return fail(
                        "execution.authority",
                        "the policy has no standing window for this request's phase, template or tags at that time",
                    );
                }
            }
        }
        checks.push("execution.authority");

        // The decision the appliance made, made again: no authority lifts a built-in deny, and
        // none lifts the customer's deny rules or caps, which the policy the execution names
        // holds.
        if let Some(reason) = crate::grant::builtin_deny(req) {
            return denied("execution.built-in-denies", reason);
        }
        checks.push("execution.built-in-denies");
        let in_force = match (&e.authority.policy_digest, inputs.policy) {
            (None, _) => Some(None),
            (Some(named), Some(given)) if *named == given.digest_hex() => Some(Some(given)),
            (Some(named), Some(_)) => {
                return fail(
                    "execution.policy",
                    format!("executed under policy {named}, not the one given; give that signed policy"),
                );
            }
            (Some(_), None) => None,
        };
        if let Some(policy) = in_force {
            let authority = match e.authority.kind {
                AuthorityKind::Grant => verified_grant.as_ref().map(Authority::Grant),
                AuthorityKind::PreApproval => {
                    verified_pre.as_ref().map(|pre| Authority::PreApproval { pre, runs_used: 0, revoked: false })
                }
                AuthorityKind::StandingWindow | AuthorityKind::Probe => Some(Authority::None),
            };
            // Checked under execution.authority: the authority named is in the manifest.
            let Some(authority) = authority else {
                return fail("execution.policy", "the authority the execution names is not in the manifest");
            };
            if let Err(reason) = decide_again(policy, &request, &e, authority) {
                return denied("execution.policy", reason);
            }
            checks.push("execution.policy");
            policy_checked = true;
        }

        if !e.output_commitment.fits_request(req.output_is_secret()) {
            return fail(
                "execution.output",
                "the execution's output commitment does not fit the request (secret output carries none, other output a salted one)",
            );
        }
        checks.push("execution.output");
        execution = Some(e);
    } else if m.appliance_certificate.is_some() || m.release.is_some() || m.appliance_attestation.is_some() {
        return fail("execution.signature", "the manifest has a release, certificate or attestation but no execution");
    }

    // 4. The customer's release of the output.
    let mut release = None;
    if let Some(env) = &m.release {
        let Some(e) = &execution else {
            return fail("release.binding", "a release without an execution");
        };
        let v = env
            .verify(RELEASE_PAYLOAD_TYPE, inputs.customer_keys, inputs.approvals_required.max(1))
            .or_else(|e| fail("release.signature", e))?;
        checks.push("release.signature");
        let r: ReleaseStatement = parse("release.signature", &v.payload)?;
        if r.request_id != req.id || r.appliance != req.appliance || r.output_commitment != e.output_commitment {
            return fail("release.binding", "the release is for another request or other output");
        }
        checks.push("release.binding");
        release = Some(r);
    }
    let mut report = ManifestReport {
        request,
        approval,
        pre_approval,
        execution,
        release,
        output_salt: None,
        checks,
        policy_checked,
        execution_trust,
    };

    // 5. The revealed salt: only beside output that may go to the vendor, of a salted commitment.
    if let Some(salt) = &m.output_salt {
        let salted =
            matches!(report.execution.as_ref().map(|e| &e.output_commitment), Some(OutputCommitment::Salted { .. }));
        if !salted || !output_release_allowed(&report) {
            return fail("output.salt", "the manifest reveals a salt for output that is not released or not salted");
        }
        report.checks.push("output.salt");
        report.output_salt = Some(salt.clone());
    }
    Ok(report)
}

/// Checks released output against a verified manifest: the output must be releasable, and hash
/// (with the manifest's revealed salt, or without one for a legacy unsalted execution) to the
/// commitment and size the appliance signed. Says which of the two it was.
pub fn verify_released_output(report: &ManifestReport, output: &[u8]) -> Result<OpenedAs, ManifestError> {
    let Some(e) = &report.execution else {
        return fail("output.commitment", "the manifest has no execution, so no output");
    };
    if !output_release_allowed(report) {
        return fail("output.commitment", "the manifest does not release this output to the vendor");
    }
    e.output_commitment.check(report.output_salt.as_ref(), output).or_else(|why| fail("output.commitment", why))
}

/// Runs the appliance's decision for an executed request again, at its start time, with the
/// policy that was in force. Offline, the phases switched off on the host, spent nonces and
/// run counts are unknown: they are the appliance's to check, and count as unused here.
fn decide_again(
    policy: Option<&VerifiedPolicy>,
    request: &RequestStatement,
    e: &ExecutionStatement,
    authority: Authority<'_>,
) -> Result<(), DenyReason> {
    let req = &request.request;
    let disabled = std::collections::BTreeSet::new();
    let ctx = Context {
        policy,
        disabled: &disabled,
        appliance: req.appliance,
        now: e.started_at,
        template_sha256: &request.command.template_sha256,
        nonce_used: &|_| false,
        run: &request.command.run,
        same_user: false,
    };
    match evaluate_with(&ctx, req, authority) {
        Decision::Allow(_) => Ok(()),
        Decision::Deny(reason) => Err(reason),
    }
}

impl ManifestReport {
    /// Whether the execution committed to its output with a plain, unsalted SHA-256 (signed
    /// before salted commitments existed): a short output can be recovered from it.
    pub fn is_legacy_unsalted(&self) -> bool {
        matches!(self.execution.as_ref().map(|e| &e.output_commitment), Some(OutputCommitment::LegacyUnsalted { .. }))
    }
}

/// Whether the output of a verified manifest may go to the vendor: released by the customer,
/// or covered by a commands-and-output pre-approval; never for secret-tagged output.
pub fn output_release_allowed(report: &ManifestReport) -> bool {
    if report.request.request.output_is_secret() {
        return false;
    }
    match (&report.release, &report.pre_approval, &report.execution) {
        (Some(r), _, Some(_)) => r.decision == ReleaseDecision::Release,
        (None, Some(p), Some(e)) => {
            p.level == ApprovalLevel::CommandsAndOutput && e.authority.kind == AuthorityKind::PreApproval
        }
        _ => false,
    }
}

/// Checks that manifests, oldest first, form one appliance's chain with no gap.
pub fn verify_chain(reports: &[ManifestReport]) -> Result<(), ManifestError> {
    // Once the customer attested the appliance's execution key, every later execution is
    // signed with it: one vouched for by the vendor's CA alone after that is a forgery's mark.
    let mut attested = None;
    for r in reports {
        match (&r.execution_trust, attested) {
            (Some(ExecutionTrust::CustomerAttested { .. }), _) => attested = Some(r.request.request.id),
            (Some(ExecutionTrust::VendorAttestedOnly), Some(earlier)) => {
                return fail(
                    "chain.attestation",
                    format!(
                        "{} is vouched for only by the vendor's CA, after {earlier} was signed by the customer-attested key",
                        r.request.request.id
                    ),
                );
            }
            _ => {}
        }
    }
    let executions: Vec<&ExecutionStatement> = reports.iter().filter_map(|r| r.execution.as_ref()).collect();
    for pair in executions.windows(2) {
        let (prev, next) = (pair[0], pair[1]);
        if next.appliance != prev.appliance {
            return fail(
                "chain.link",
                format!("{} and {} are from different appliances", prev.request_id, next.request_id),
            );
        }
        if next.previous_manifest_sha256.as_deref() != Some(prev.manifest_sha256().as_str())
            || prev.sequence.checked_add(1) != Some(next.sequence)
        {
            return fail(
                "chain.link",
                format!(
                    "{} does not follow {} (a manifest is missing, edited or out of order)",
                    next.request_id, prev.request_id
                ),
            );
        }
    }
    Ok(())
}

/// Variables as a request carries them, for display.
pub fn describe_args(args: &BTreeMap<String, String>) -> String {
    args.iter().map(|(k, v)| format!("{k}={v:?}")).collect::<Vec<_>>().join(" ")
}

/// The payload type an approval envelope carries (a grant).
pub const APPROVAL_PAYLOAD_TYPE: &str = GRANT_PAYLOAD_TYPE;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_operations_identity_of_the_trust_domain_is_the_control_plane() {
        assert!(is_control_plane_identity("spiffe://airlock.test/control-plane", None));
        assert!(is_control_plane_identity("spiffe://airlock.test/control-plane", Some("airlock.test")));
        for (uri, td) in [
            ("spiffe://other.test/control-plane", Some("airlock.test")),
            ("spiffe://airlock.test/tenant/x/control-plane", None),
            ("spiffe:///control-plane", None),
            ("https://airlock.test/control-plane", None),
            ("spiffe://airlock.test/control-plane/x", None),
        ] {
            assert!(!is_control_plane_identity(uri, td), "{uri}");
        }
    }
}
