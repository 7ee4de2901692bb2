//! The hash-chained audit record shared by the control plane and the appliance.
//!
//! Each record commits to its chain, its sequence number and the hash of the record before
//! it, so an edit, a deletion or a reordering breaks the chain at the first affected record.
//! Truncation of the tail is caught by comparing the last record with a head anchor the
//! writer keeps elsewhere ([`verify_chain`] takes it as an optional argument).
//!
//! Hash = SHA-256(`airlock-audit-v1\n` || canonical JSON of the record without `hash`).
//! Canonical JSON is serde_json of [`RecordBody`]: fields in declaration order, `detail`
//! objects with sorted keys. This encoding is a wire contract. The keys are sorted here, not left to serde_json's map:
//! a dependency can turn on its `preserve_order` feature (the control plane's Cedar does), and the hash must not depend on the build.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::Timestamp;

pub mod anchor;
pub mod checkpoint;

const DOMAIN: &[u8] = b"airlock-audit-v1\n";

/// A SHA-256 digest shown as lowercase hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ChainHash(pub [u8; 32]);

impl ChainHash {
    pub const GENESIS: ChainHash = ChainHash([0; 32]);

    pub fn to_hex(&self) -> String {
        data_encoding::HEXLOWER.encode(&self.0)
    }

    pub fn from_hex(s: &str) -> Option<Self> {
        let bytes = data_encoding::HEXLOWER.decode(s.as_bytes()).ok()?;
        Some(Self(bytes.try_into().ok()?))
    }
}

impl fmt::Debug for ChainHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl Serialize for ChainHash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for ChainHash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::from_hex(&s).ok_or_else(|| serde::de::Error::custom("expected 64 lowercase hex digits"))
    }
}

/// How the audited action ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Success,
    /// Refused for lack of authority (bad credential, revoked, wrong tenant).
    Denied,
    /// Refused because the input was malformed or the action failed.
    Error,
}

/// Every action either side writes to an audit chain: one set of names for the control plane
/// and the appliance, so the same event is spelled the same way in both logs.
///
/// A record stores the text ([`AuditAction::as_str`]); writers take this type, so a misspelt
/// action is a compile error. Old records keep their text and still verify.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AuditAction {
    /// A connection to the appliance's admin socket from a peer it does not admit.
    AdminPeerRefused,
    ApiAuthenticate,
    ApplianceJoin,
    ApplianceRevoke,
    ApplianceList,
    ApplianceCertificateRenew,
    ApplianceStart,
    /// A start refused because the audit log or its head did not verify; recorded at the
    /// next start that verifies, from the note the refusal left.
    ApplianceStartRefused,
    /// The head file is MAC'd from here on: a new log, or an unkeyed one migrated once.
    AuditHeadKeyed,
    /// The control plane made its audit signing key (the key that signs checkpoints).
    AuditKeyCreate,
    /// Old records were removed from the start of a chain, behind a signed checkpoint.
    AuditPruned,
    AuditRecovered,
    /// The appliance killed a box of vendor code over its disk, file, memory or thread limit,
    /// or holding the most of a disk below its reserve (the box's cell and why).
    BoxOverLimit,
    CustomerKeysPinned,
    CustomerKeysReplace,
    CustomerKeysRotate,
    /// A deploy of a vendor release requested (an operation of kind `deploy`).
    DeploymentGet,
    /// A deploy waits for required secrets that do not exist yet (the missing references).
    DeploymentHeld,
    DeploymentRequest,
    /// An appliance reported a new phase of a deploy (fetching, held, deployed, rolled back, ...).
    DeploymentStatus,
    EnvironmentCreate,
    EnvironmentList,
    /// The appliance made its execution-signing key (first start).
    ExecutionKeyCreate,
    /// The customer attested the appliance's execution key over the admin socket (or a
    /// forged or misdirected attestation was refused).
    ExecutionKeyAttest,
    GatewayHandshakeRejected,
    GatewayStreamRefused,
    /// A tenant's identity-provider configuration set or read (never its client secret).
    IdpSet,
    IdpGet,
    JoinTokenCreate,
    /// A platform-identity join rule added to an environment, listed, or removed.
    JoinRuleAdd,
    JoinRuleList,
    JoinRuleRemove,
    OperationAckRefused,
    OperationAllowed,
    OperationApprovalRelayed,
    OperationAwaitingApproval,
    OperationCancelled,
    OperationCustomerDecision,
    OperationDeferred,
    OperationDenied,
    OperationDeniedByCustomer,
    OperationError,
    OperationExecuted,
    OperationGet,
    OperationInterrupted,
    OperationList,
    OperationManifest,
    OperationOutputDownload,
    OperationOutputRead,
    OperationReceived,
    OperationRefused,
    OperationReleaseParked,
    OperationReleaseRefused,
    OperationReleased,
    OperationRequest,
    OperationResultRefused,
    OperationWithheld,
    OutputSealed,
    PhaseDisable,
    PhaseEnable,
    PolicyGet,
    PolicyRefused,
    PolicyRelayed,
    PolicyStoredInvalid,
    PolicyUpdate,
    PreApprovalAdd,
    PreApprovalRevoke,
    ReleaseKeyAdd,
    ReleaseKeyList,
    ReleaseKeyRevoke,
    ReleaseList,
    ReleasePush,
    /// A task of a release requested (an operation of kind `release-task`).
    ReleaseTaskRequest,
    /// An identity-provider group mapped to a role (tenant-wide or in one workspace), listed, or unmapped.
    RoleMappingAdd,
    RoleMappingList,
    RoleMappingRemove,
    /// A rollout deployed to every target within its failure threshold.
    RolloutCompleted,
    RolloutCreate,
    RolloutGet,
    /// A rollout passed its failure threshold (or lost its creator's token): nothing new starts.
    RolloutHalted,
    RolloutList,
    /// A signed-in user's session ended: logout, idle or absolute timeout, or an admin ending it.
    SessionEnd,
    /// A file of the customer's authority disagrees with the chain at start; the start is refused.
    StateDiverged,
    /// `state.*`: the state the chain anchors (`anchor::Anchor`), recorded as it changes.
    StatePinnedKeys,
    StatePolicySerial,
    StatePreApprovalRevoked,
    StatePreApprovalRuns,
    TemplateList,
    TemplatePush,
    TenantCreate,
    /// An API token created, listed, rotated (a new secret) or revoked.
    TokenCreate,
    TokenList,
    TokenRevoke,
    TokenRotate,
    /// A person's sign-in through the tenant's identity provider (success, or refused with a reason code).
    UserLogin,
    /// A signed-in user ended their own session.
    UserLogout,
    /// An admin ended every session of one user.
    UserSessionsEnd,
    /// The fleet-wide metrics read.
    MetricsRead,
    WorkspaceList,
}

impl AuditAction {
    pub const ALL: &'static [AuditAction] = &[
        AuditAction::AdminPeerRefused,
        AuditAction::ApiAuthenticate,
        AuditAction::ApplianceJoin,
        AuditAction::ApplianceRevoke,
        AuditAction::ApplianceList,
        AuditAction::ApplianceCertificateRenew,
        AuditAction::ApplianceStart,
        AuditAction::ApplianceStartRefused,
        AuditAction::AuditHeadKeyed,
        AuditAction::AuditKeyCreate,
        AuditAction::AuditPruned,
        AuditAction::AuditRecovered,
        AuditAction::BoxOverLimit,
        AuditAction::CustomerKeysPinned,
        AuditAction::CustomerKeysReplace,
        AuditAction::CustomerKeysRotate,
        AuditAction::DeploymentGet,
        AuditAction::DeploymentHeld,
        AuditAction::DeploymentRequest,
        AuditAction::DeploymentStatus,
        AuditAction::EnvironmentCreate,
        AuditAction::EnvironmentList,
        AuditAction::ExecutionKeyCreate,
        AuditAction::ExecutionKeyAttest,
        AuditAction::GatewayHandshakeRejected,
        AuditAction::GatewayStreamRefused,
        AuditAction::IdpSet,
        AuditAction::IdpGet,
        AuditAction::JoinTokenCreate,
        AuditAction::JoinRuleAdd,
        AuditAction::JoinRuleList,
        AuditAction::JoinRuleRemove,
        AuditAction::OperationAckRefused,
        AuditAction::OperationAllowed,
        AuditAction::OperationApprovalRelayed,
        AuditAction::OperationAwaitingApproval,
        AuditAction::OperationCancelled,
        AuditAction::OperationCustomerDecision,
        AuditAction::OperationDeferred,
        AuditAction::OperationDenied,
        AuditAction::OperationDeniedByCustomer,
        AuditAction::OperationError,
        AuditAction::OperationExecuted,
        AuditAction::OperationGet,
        AuditAction::OperationInterrupted,
        AuditAction::OperationList,
        AuditAction::OperationManifest,
        AuditAction::OperationOutputDownload,
        AuditAction::OperationOutputRead,
        AuditAction::OperationReceived,
        AuditAction::OperationRefused,
        AuditAction::OperationReleaseParked,
        AuditAction::OperationReleaseRefused,
        AuditAction::OperationReleased,
        AuditAction::OperationRequest,
        AuditAction::OperationResultRefused,
        AuditAction::OperationWithheld,
        AuditAction::OutputSealed,
        AuditAction::PhaseDisable,
        AuditAction::PhaseEnable,
        AuditAction::PolicyGet,
        AuditAction::PolicyRefused,
        AuditAction::PolicyRelayed,
        AuditAction::PolicyStoredInvalid,
        AuditAction::PolicyUpdate,
        AuditAction::PreApprovalAdd,
        AuditAction::PreApprovalRevoke,
        AuditAction::ReleaseKeyAdd,
        AuditAction::ReleaseKeyList,
        AuditAction::ReleaseKeyRevoke,
        AuditAction::ReleaseList,
        AuditAction::ReleasePush,
        AuditAction::ReleaseTaskRequest,
        AuditAction::RoleMappingAdd,
        AuditAction::RoleMappingList,
        AuditAction::RoleMappingRemove,
        AuditAction::RolloutCompleted,
        AuditAction::RolloutCreate,
        AuditAction::RolloutGet,
        AuditAction::RolloutHalted,
        AuditAction::RolloutList,
        AuditAction::SessionEnd,
        AuditAction::StateDiverged,
        AuditAction::StatePinnedKeys,
        AuditAction::StatePolicySerial,
        AuditAction::StatePreApprovalRevoked,
        AuditAction::StatePreApprovalRuns,
        AuditAction::TemplateList,
        AuditAction::TemplatePush,
        AuditAction::TenantCreate,
        AuditAction::TokenCreate,
        AuditAction::TokenList,
        AuditAction::TokenRevoke,
        AuditAction::TokenRotate,
        AuditAction::UserLogin,
        AuditAction::UserLogout,
        AuditAction::UserSessionsEnd,
        AuditAction::MetricsRead,
        AuditAction::WorkspaceList,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            AuditAction::AdminPeerRefused => "admin.peer_refused",
            AuditAction::ApiAuthenticate => "api.authenticate",
            AuditAction::ApplianceJoin => "appliance.join",
            AuditAction::ApplianceRevoke => "appliance.revoke",
            AuditAction::ApplianceList => "appliance.list",
            AuditAction::ApplianceCertificateRenew => "appliance.certificate_renew",
            AuditAction::ApplianceStart => "appliance.start",
            AuditAction::ApplianceStartRefused => "appliance.start_refused",
            AuditAction::AuditHeadKeyed => "audit.head_keyed",
            AuditAction::AuditKeyCreate => "audit.key_create",
            AuditAction::AuditPruned => "audit.pruned",
            AuditAction::AuditRecovered => "audit.recovered",
            AuditAction::BoxOverLimit => "box.over_limit",
            AuditAction::CustomerKeysPinned => "customer_keys.pinned",
            AuditAction::CustomerKeysReplace => "customer_keys.replace",
            AuditAction::CustomerKeysRotate => "customer_keys.rotate",
            AuditAction::DeploymentGet => "deployment.get",
            AuditAction::DeploymentHeld => "deployment.held",
            AuditAction::DeploymentRequest => "deployment.request",
            AuditAction::DeploymentStatus => "deployment.status",
            AuditAction::EnvironmentCreate => "environment.create",
            AuditAction::EnvironmentList => "environment.list",
            AuditAction::ExecutionKeyCreate => "execution_key.create",
            AuditAction::ExecutionKeyAttest => "execution_key.attest",
            AuditAction::GatewayHandshakeRejected => "gateway.handshake_rejected",
            AuditAction::GatewayStreamRefused => "gateway.stream_refused",
            AuditAction::IdpSet => "idp.set",
            AuditAction::IdpGet => "idp.get",
            AuditAction::JoinTokenCreate => "join_token.create",
            AuditAction::JoinRuleAdd => "join_rule.add",
            AuditAction::JoinRuleList => "join_rule.list",
            AuditAction::JoinRuleRemove => "join_rule.remove",
            AuditAction::OperationAckRefused => "operation.ack_refused",
            AuditAction::OperationAllowed => "operation.allowed",
            AuditAction::OperationApprovalRelayed => "operation.approval_relayed",
            AuditAction::OperationAwaitingApproval => "operation.awaiting_approval",
            AuditAction::OperationCancelled => "operation.cancelled",
            AuditAction::OperationCustomerDecision => "operation.customer_decision",
            AuditAction::OperationDeferred => "operation.deferred",
            AuditAction::OperationDenied => "operation.denied",
            AuditAction::OperationDeniedByCustomer => "operation.denied_by_customer",
            AuditAction::OperationError => "operation.error",
            AuditAction::OperationExecuted => "operation.executed",
            AuditAction::OperationGet => "operation.get",
            AuditAction::OperationInterrupted => "operation.interrupted",
            AuditAction::OperationList => "operation.list",
            AuditAction::OperationManifest => "operation.manifest",
            AuditAction::OperationOutputDownload => "operation.output_download",
            AuditAction::OperationOutputRead => "operation.output_read",
            AuditAction::OperationReceived => "operation.received",
            AuditAction::OperationRefused => "operation.refused",
            AuditAction::OperationReleaseParked => "operation.release_parked",
            AuditAction::OperationReleaseRefused => "operation.release_refused",
            AuditAction::OperationReleased => "operation.released",
            AuditAction::OperationRequest => "operation.request",
            AuditAction::OperationResultRefused => "operation.result_refused",
            AuditAction::OperationWithheld => "operation.withheld",
            AuditAction::OutputSealed => "output.sealed",
            AuditAction::PhaseDisable => "phase.disable",
            AuditAction::PhaseEnable => "phase.enable",
            AuditAction::PolicyGet => "policy.get",
            AuditAction::PolicyRefused => "policy.refused",
            AuditAction::PolicyRelayed => "policy.relayed",
            AuditAction::PolicyStoredInvalid => "policy.stored_invalid",
            AuditAction::PolicyUpdate => "policy.update",
            AuditAction::PreApprovalAdd => "pre_approval.add",
            AuditAction::PreApprovalRevoke => "pre_approval.revoke",
            AuditAction::ReleaseKeyAdd => "release_key.add",
            AuditAction::ReleaseKeyList => "release_key.list",
            AuditAction::ReleaseKeyRevoke => "release_key.revoke",
            AuditAction::ReleaseList => "release.list",
            AuditAction::ReleasePush => "release.push",
            AuditAction::ReleaseTaskRequest => "release_task.request",
            AuditAction::RoleMappingAdd => "role_mapping.add",
            AuditAction::RoleMappingList => "role_mapping.list",
            AuditAction::RoleMappingRemove => "role_mapping.remove",
            AuditAction::RolloutCompleted => "rollout.completed",
            AuditAction::RolloutCreate => "rollout.create",
            AuditAction::RolloutGet => "rollout.get",
            AuditAction::RolloutHalted => "rollout.halted",
            AuditAction::RolloutList => "rollout.list",
            AuditAction::SessionEnd => "session.end",
            AuditAction::StateDiverged => "state.diverged",
            AuditAction::StatePinnedKeys => "state.pinned_keys",
            AuditAction::StatePolicySerial => "state.policy_serial",
            AuditAction::StatePreApprovalRevoked => "state.pre_approval_revoked",
            AuditAction::StatePreApprovalRuns => "state.pre_approval_runs",
            AuditAction::TemplateList => "template.list",
            AuditAction::TemplatePush => "template.push",
            AuditAction::TenantCreate => "tenant.create",
            AuditAction::TokenCreate => "token.create",
            AuditAction::TokenList => "token.list",
            AuditAction::TokenRevoke => "token.revoke",
            AuditAction::TokenRotate => "token.rotate",
            AuditAction::UserLogin => "user.login",
            AuditAction::UserLogout => "user.logout",
            AuditAction::UserSessionsEnd => "user.sessions_end",
            AuditAction::MetricsRead => "metrics.read",
            AuditAction::WorkspaceList => "workspace.list",
        }
    }
}

impl fmt::Display for AuditAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An action name no version of Airlock writes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown audit action `{0}`")]
pub struct UnknownAction(pub String);

impl std::str::FromStr for AuditAction {
    type Err = UnknownAction;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        AuditAction::ALL
            .iter()
            .copied()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| UnknownAction(s.chars().take(40).collect()))
    }
}

/// What a writer supplies: everything but the chain position.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Who acted: `token:tok_…`, `appliance:apl_…`, `anonymous`, `system`.
    pub actor: String,
    /// What was attempted, dotted: `environment.create`, `appliance.join`.
    pub action: String,
    pub workspace: Option<String>,
    /// The object acted on, by id.
    pub target: Option<String>,
    pub outcome: Outcome,
    /// Small, non-secret context (a reason, a certificate serial). Never a token or key.
    pub detail: serde_json::Value,
}

/// The part of a record its hash covers.
#[derive(Clone, Copy, Serialize)]
struct RecordBody<'a> {
    chain: &'a str,
    seq: u64,
    at: Timestamp,
    event: &'a Event,
    prev: ChainHash,
}

/// One stored audit record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Which chain this belongs to: a tenant id, or `system` for events before any tenant is known.
    pub chain: String,
    /// 1-based position in the chain.
    pub seq: u64,
    pub at: Timestamp,
    #[serde(flatten)]
    pub event: Event,
    pub prev: ChainHash,
    pub hash: ChainHash,
}

/// The last record of a chain, kept by the writer so truncation is detectable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    pub seq: u64,
    pub hash: ChainHash,
}

impl Head {
    pub const EMPTY: Head = Head { seq: 0, hash: ChainHash::GENESIS };

    /// The writer's MAC over this head of `chain` (HMAC-SHA256), so a head rewritten by anyone
    /// without the key shows. Both sides key their heads this way.
    pub fn mac(&self, key: &ring::hmac::Key, chain: &str) -> [u8; 32] {
        head_mac(key, &self.mac_input(chain))
    }

    /// Whether `mac` is this head's MAC under `key` (compared in constant time).
    pub fn mac_verifies(&self, key: &ring::hmac::Key, chain: &str, mac: &[u8]) -> bool {
        ring::hmac::verify(key, &self.mac_input(chain), mac).is_ok()
    }

    /// The MAC's input; a wire contract (the control plane's stored heads use it).
    fn mac_input(&self, chain: &str) -> Vec<u8> {
        format!("airlock-audit-head-v1\n{chain}\n{}\n{}", self.seq, self.hash.to_hex()).into_bytes()
    }
}

/// HMAC-SHA256 of a head's MAC input: the one place both head forms are keyed.
fn head_mac(key: &ring::hmac::Key, input: &[u8]) -> [u8; 32] {
    let tag = ring::hmac::sign(key, input);
    let mut out = [0u8; 32];
    out.copy_from_slice(&tag.as_ref()[..32]);
    out
}

/// A head as the control plane MACs it: with the store-wide epoch of the write that moved it
/// (one more than any head's before, so a head put back from an older copy carries an epoch
/// some other head has passed) and the time of that write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EpochHead {
    pub head: Head,
    pub epoch: u64,
    pub at: Timestamp,
}

impl EpochHead {
    /// HMAC-SHA256 over chain, seq, hash, epoch and time.
    pub fn mac(&self, key: &ring::hmac::Key, chain: &str) -> [u8; 32] {
        head_mac(key, &self.mac_input(chain))
    }

    /// Whether `mac` is this head's MAC under `key` (compared in constant time).
    pub fn mac_verifies(&self, key: &ring::hmac::Key, chain: &str, mac: &[u8]) -> bool {
        ring::hmac::verify(key, &self.mac_input(chain), mac).is_ok()
    }

    /// The MAC's input; a wire contract (the control plane's stored heads use it).
    fn mac_input(&self, chain: &str) -> Vec<u8> {
        format!(
            "airlock-audit-head-v2\n{chain}\n{}\n{}\n{}\n{}",
            self.head.seq,
            self.head.hash.to_hex(),
            self.epoch,
            self.at.unix_millis()
        )
        .into_bytes()
    }
}

impl Record {
    /// Appends `event` after `head`, producing the record to store and the new head.
    pub fn append(chain: &str, head: Head, at: Timestamp, event: Event) -> Record {
        let seq = head.seq + 1;
        let hash = hash_body(&RecordBody { chain, seq, at, event: &event, prev: head.hash });
        Record { chain: chain.to_owned(), seq, at, event, prev: head.hash, hash }
    }

    pub fn head(&self) -> Head {
        Head { seq: self.seq, hash: self.hash }
    }

    fn recomputed_hash(&self) -> ChainHash {
        hash_body(&RecordBody { chain: &self.chain, seq: self.seq, at: self.at, event: &self.event, prev: self.prev })
    }
}

fn hash_body(body: &RecordBody<'_>) -> ChainHash {
    if !keys_sorted(&body.event.detail) {
        let event = Event { detail: with_sorted_keys(&body.event.detail), ..body.event.clone() };
        return hash_body(&RecordBody { event: &event, ..*body });
    }
    let mut h = Sha256::new();
    h.update(DOMAIN);
    // Serializing a struct of plain data into a Vec cannot fail.
    let json = serde_json::to_vec(body).unwrap_or_default();
    h.update(&json);
    ChainHash(h.finalize().into())
}

/// Whether every object in `v` lists its keys in sorted order (always so without serde_json's `preserve_order`).
fn keys_sorted(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Object(map) => {
            map.keys().zip(map.keys().skip(1)).all(|(a, b)| a < b) && map.values().all(keys_sorted)
        }
        serde_json::Value::Array(items) => items.iter().all(keys_sorted),
        _ => true,
    }
}

/// `v` with every object's keys inserted in sorted order, so it serializes sorted whichever map serde_json was built with.
fn with_sorted_keys(v: &serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            serde_json::Value::Object(entries.into_iter().map(|(k, v)| (k.clone(), with_sorted_keys(v))).collect())
        }
        serde_json::Value::Array(items) => serde_json::Value::Array(items.iter().map(with_sorted_keys).collect()),
        other => other.clone(),
    }
}

/// Where and why a chain stopped verifying.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainBreak {
    #[error("record {position} (seq {seq}) belongs to chain `{found}`, expected `{expected}`")]
    WrongChain { position: u64, seq: u64, expected: String, found: String },
    #[error(
        "record seq {expected} is missing or out of place (position {position} holds seq {seq}): a record was deleted, inserted or reordered"
    )]
    Sequence { position: u64, seq: u64, expected: u64 },
    #[error("record seq {seq}: its hash does not match its content: the record was edited")]
    Edited { seq: u64 },
    #[error("record seq {seq}: it does not follow the record before it: a record was deleted or reordered")]
    Link { seq: u64 },
    #[error("chain ends at seq {found} but the writer's head is seq {expected}: records were removed from the end")]
    Truncated { found: u64, expected: u64 },
    #[error("chain head mismatch at seq {seq}: the last record was replaced")]
    HeadMismatch { seq: u64 },
    #[error(
        "chain continues past the writer's head (seq {expected}) to seq {found}: records were appended by someone else"
    )]
    Extended { found: u64, expected: u64 },
}

impl ChainBreak {
    /// The sequence number of the first record found broken (for truncation: the first missing one).
    pub fn first_bad_seq(&self) -> u64 {
        match self {
            ChainBreak::WrongChain { seq, .. }
            | ChainBreak::Edited { seq }
            | ChainBreak::Link { seq }
            | ChainBreak::HeadMismatch { seq } => *seq,
            ChainBreak::Extended { expected, .. } => expected.saturating_add(1),
            ChainBreak::Sequence { expected, .. } => *expected,
            ChainBreak::Truncated { found, .. } => found.saturating_add(1),
        }
    }
}

/// Verifies records in stored order. Returns the chain head on success.
///
/// `anchor`, when given, is the head the writer recorded; a shorter or different chain fails.
pub fn verify_chain<'a, I>(chain: &str, records: I, anchor: Option<Head>) -> Result<Head, ChainBreak>
where
    I: IntoIterator<Item = &'a Record>,
{
    verify_chain_from(chain, Head::EMPTY, records, anchor)
}

/// Verifies records that continue the chain after `start`: the head where a pruned prefix ended,
/// which the caller has from a signed checkpoint (or [`Head::EMPTY`] for a whole chain).
pub fn verify_chain_from<'a, I>(chain: &str, start: Head, records: I, anchor: Option<Head>) -> Result<Head, ChainBreak>
where
    I: IntoIterator<Item = &'a Record>,
{
    let mut head = start;
    for (i, rec) in records.into_iter().enumerate() {
        let position = i as u64 + 1;
        if rec.chain != chain {
            return Err(ChainBreak::WrongChain {
                position,
                seq: rec.seq,
                expected: chain.to_owned(),
                found: rec.chain.clone(),
            });
        }
        if rec.recomputed_hash() != rec.hash {
            return Err(ChainBreak::Edited { seq: rec.seq });
        }
        // Checked: sequence numbers are input, and a wrap from `u64::MAX` to 0 must not pass
        // for the next record (it would in a release build).
        let Some(expected) = head.seq.checked_add(1) else {
            return Err(ChainBreak::Link { seq: rec.seq });
        };
        if rec.seq != expected {
            return Err(ChainBreak::Sequence { position, seq: rec.seq, expected });
        }
        if rec.prev != head.hash {
            return Err(ChainBreak::Link { seq: rec.seq });
        }
        head = rec.head();
    }
    // The writer moves its head in the same transaction as every append, so the chain must end
    // exactly there: shorter is truncation, longer is a forged append, different is a rewrite.
    if let Some(anchor) = anchor {
        if head.seq < anchor.seq {
            return Err(ChainBreak::Truncated { found: head.seq, expected: anchor.seq });
        }
        if head.seq > anchor.seq {
            return Err(ChainBreak::Extended { found: head.seq, expected: anchor.seq });
        }
        if head.hash != anchor.hash {
            return Err(ChainBreak::HeadMismatch { seq: head.seq });
        }
    }
    Ok(head)
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_audit_action_has_one_spelling_that_parses_back() {
        let mut seen = std::collections::BTreeSet::new();
        for a in AuditAction::ALL {
            assert!(seen.insert(a.as_str()), "{a} is spelt twice");
            assert_eq!(a.as_str().parse::<AuditAction>(), Ok(*a));
        }
        assert!("operation.release".parse::<AuditAction>().is_err(), "one name per event: operation.released");
    }

    use super::*;

    fn event(n: u32) -> Event {
        Event {
            actor: "token:tok_x".into(),
            action: format!("test.action{n}"),
            workspace: None,
            target: Some(format!("t{n}")),
            outcome: Outcome::Success,
            detail: serde_json::json!({"n": n}),
        }
    }

    fn chain(n: u32) -> Vec<Record> {
        let mut head = Head::EMPTY;
        (0..n)
            .map(|i| {
                let r = Record::append("c", head, Timestamp::from_unix_millis(i64::from(i)), event(i));
                head = r.head();
                r
            })
            .collect()
    }

    #[test]
    fn a_chain_that_wraps_from_the_largest_sequence_to_zero_never_verifies() {
        // Hand-made records: no writer reaches `u64::MAX`, but a verifier reads what it is given.
        let record = |seq: u64, prev: ChainHash| {
            let r = Record {
                chain: "c".into(),
                seq,
                at: Timestamp::from_unix_millis(1),
                event: event(1),
                prev,
                hash: prev,
            };
            Record { hash: r.recomputed_hash(), ..r }
        };
        let last = record(u64::MAX, ChainHash::GENESIS);
        let wrapped = record(0, last.hash);
        assert!(verify_chain("c", [&last, &wrapped], None).is_err());
        // Sequence numbers named by an anchor are checked too: a report, not an overflow.
        let err = verify_chain("c", std::iter::empty(), Some(last.head())).unwrap_err();
        assert_eq!(err.first_bad_seq(), 1);
        assert_eq!(ChainBreak::Extended { found: 0, expected: u64::MAX }.first_bad_seq(), u64::MAX);
    }

    #[test]
    fn intact_chain_verifies() {
        let recs = chain(5);
        let head = verify_chain("c", &recs, Some(recs[4].head())).unwrap();
        assert_eq!(head.seq, 5);
    }

    #[test]
    fn audit_chain_detects_edited_record() {
        let mut recs = chain(5);
        recs[2].event.outcome = Outcome::Denied;
        assert_eq!(verify_chain("c", &recs, None), Err(ChainBreak::Edited { seq: 3 }));
    }

    #[test]
    fn audit_chain_detects_removed_entry() {
        let mut recs = chain(5);
        recs.remove(1);
        let err = verify_chain("c", &recs, None).unwrap_err();
        assert_eq!(err.first_bad_seq(), 2, "{err}");
    }

    #[test]
    fn audit_chain_detects_reordering() {
        let mut recs = chain(5);
        recs.swap(1, 3);
        let err = verify_chain("c", &recs, None).unwrap_err();
        assert_eq!(err.first_bad_seq(), 2, "{err}");
    }

    #[test]
    fn audit_chain_detects_renumbered_records() {
        // Swapping content but keeping seq numbers in place breaks the hash of the first one.
        let mut recs = chain(5);
        let (a, b) = (recs[1].clone(), recs[2].clone());
        recs[1] = Record { seq: 2, ..b };
        recs[2] = Record { seq: 3, ..a };
        assert_eq!(verify_chain("c", &recs, None).unwrap_err().first_bad_seq(), 2);
    }

    #[test]
    fn audit_chain_detects_truncation_against_anchor() {
        let recs = chain(5);
        let anchor = recs[4].head();
        assert_eq!(verify_chain("c", &recs[..3], Some(anchor)), Err(ChainBreak::Truncated { found: 3, expected: 5 }));
    }

    #[test]
    fn audit_chain_detects_rehashed_chain_with_forged_append() {
        // Edit record 3, recompute every hash after it and append one more: only the
        // writer's anchor can tell.
        let recs = chain(5);
        let anchor = recs[4].head();
        let mut forged: Vec<Record> = recs[..2].to_vec();
        let mut head = forged[1].head();
        for i in 2..6 {
            let mut ev = event(i);
            ev.outcome = Outcome::Denied;
            let r = Record::append("c", head, Timestamp::from_unix_millis(i64::from(i)), ev);
            head = r.head();
            forged.push(r);
        }
        assert!(verify_chain("c", &forged, None).is_ok(), "a re-hashed chain is self-consistent");
        assert_eq!(verify_chain("c", &forged, Some(anchor)), Err(ChainBreak::Extended { found: 6, expected: 5 }));
        assert!(matches!(verify_chain("c", &forged[..5], Some(anchor)), Err(ChainBreak::HeadMismatch { seq: 5 })));
    }

    #[test]
    fn audit_chain_refuses_records_from_another_chain() {
        let recs = chain(2);
        assert!(matches!(verify_chain("other", &recs, None), Err(ChainBreak::WrongChain { .. })));
    }

    #[test]
    fn head_mac_binds_chain_seq_and_hash() {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &[7; 32]);
        let other = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &[8; 32]);
        let recs = chain(3);
        let head = recs[2].head();
        let mac = head.mac(&key, "c");
        assert!(head.mac_verifies(&key, "c", &mac));
        assert!(!head.mac_verifies(&other, "c", &mac), "another key");
        assert!(!head.mac_verifies(&key, "d", &mac), "another chain");
        assert!(!recs[1].head().mac_verifies(&key, "c", &mac), "an earlier head");
        assert!(!head.mac_verifies(&key, "c", &mac[..31]), "a cut MAC");
    }

    #[test]
    fn epoch_head_mac_binds_epoch_and_time_too() {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &[7; 32]);
        let recs = chain(3);
        let head = EpochHead { head: recs[2].head(), epoch: 9, at: Timestamp::from_unix_millis(5) };
        let mac = head.mac(&key, "c");
        assert!(head.mac_verifies(&key, "c", &mac));
        assert!(!EpochHead { epoch: 8, ..head }.mac_verifies(&key, "c", &mac), "another epoch");
        assert!(
            !EpochHead { at: Timestamp::from_unix_millis(6), ..head }.mac_verifies(&key, "c", &mac),
            "another time"
        );
        assert!(!EpochHead { head: recs[1].head(), ..head }.mac_verifies(&key, "c", &mac), "an earlier head");
        assert!(!head.mac_verifies(&key, "d", &mac), "another chain");
        assert!(!head.head.mac_verifies(&key, "c", &mac), "the v1 MAC is another input");
    }

    #[test]
    fn record_json_round_trips() {
        let recs = chain(2);
        let line = serde_json::to_string(&recs[1]).unwrap();
        let back: Record = serde_json::from_str(&line).unwrap();
        assert_eq!(back, recs[1]);
        verify_chain("c", &[recs[0].clone(), back], None).unwrap();
    }
}
