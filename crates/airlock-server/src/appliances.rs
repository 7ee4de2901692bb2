//! An appliance's life on the control plane: it joins with a single-use token or a platform
//! identity (`crate::platform_join`), and it can be revoked.
//!
//! Join: the token is checked without the write lock first (an unknown one costs a read), the
//! CSR's self-signature proves possession of its key before anything is spent, and the token
//! is spent in the same transaction that records the appliance and its audit record.
//! A CSR the CA refuses rolls the transaction back, so a bad CSR does not burn the token.
//! The same appliance asking again with the same key while the token would still be valid is a
//! join whose response was lost: it is answered again (with a fresh certificate) instead of
//! stranded.
//! A platform join asked again with the same key, in the environment its identity matches, is
//! answered the same way.
//! A join that carries a recovery proof (`crate::platform_join::recovery`) keeps the identity of
//! the expired certificate it shows, in the environment the join's own proof names.
//!
//! Revocation is enforced at three points.
//! At the handshake: the gateway's certificate verifier ([`crate::tls`]) consults the
//! in-memory revoked set.
//! At stream start: the gateway re-checks the set and the stored row, and checks the set again
//! after registering the stream, which closes the race with a concurrent revocation.
//! On live streams: once the revocation commits, its stream is kicked and the socket cut.
//! [`revoke`] adds the appliance to the set before the commit, so no window opens between
//! commit and enforcement, and takes it out again if the commit fails, so a revocation that was
//! not recorded has no effect; it kicks the live stream only after the commit.

use airlock_core::audit::{AuditAction, Outcome};
use airlock_core::token::{Secret, TokenKind};
use airlock_core::{ApplianceId, ApplianceIdentity};
use airlock_proto::join::{JoinProof, JoinRequest, PlatformProof};

use crate::authz::TenantScope;
use crate::ca::Issued;
use crate::platform_join::PlatformRefusal;
use crate::platform_join::recovery::{Recovering, RecoveryRefusal};
use crate::platform_join::tokens::TokenRefusal;
use crate::registry::Kick;
use crate::state::{AppState, SYSTEM_CHAIN, event, random};
use crate::store::{JoinVia, RedeemRefusal, Renewed, StoreError};

/// An appliance that joined (or whose lost join response was answered again).
#[derive(Debug)]
pub struct Joined {
    pub identity: ApplianceIdentity,
    pub certificate: Issued,
    /// The answer to a join whose response was lost.
    pub retried: bool,
}

/// What a join was refused for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JoinRefusal {
    /// The token is malformed, unknown, spent or expired.
    Token,
    /// The CSR is malformed, or asks for what the CA does not issue.
    Csr,
    /// The platform proof, or its challenge, is refused.
    Proof,
    /// The platform identity is proved, but no environment, or more than one, accepts it; or the
    /// join names an environment that its token or its identity's rules are not for.
    NoEnvironment,
    /// The platform could not be asked (STS or the token issuer unreachable); the appliance may try again.
    PlatformUnavailable,
    /// The identity to recover is refused (not ours, not its key, revoked, superseded, elsewhere).
    Recovery,
    /// A platform join that names neither its tenant nor its environment.
    Unpinned,
}

impl JoinRefusal {
    /// Its kind, where a refusal's detail names no finer code.
    fn code(self) -> &'static str {
        match self {
            Self::Token => "token",
            Self::Csr => "csr",
            Self::Proof => "proof",
            Self::NoEnvironment => "no_environment",
            Self::PlatformUnavailable => "platform_unavailable",
            Self::Recovery => "recovery",
            Self::Unpinned => "join_target_required",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// Refused, and the refusal audited (in the tenant's chain when the token names one).
    #[error("{reason}")]
    Refused { refusal: JoinRefusal, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Exchanges a proof of identity (a join token, or a platform proof) and a CSR (PEM) for an
/// appliance certificate. `version` is what the appliance reports itself as (off the network;
/// kept short and printable).
pub async fn join(state: &AppState, request: &JoinRequest) -> Result<Joined, JoinError> {
    let platform = match &request.proof {
        JoinProof::JoinToken(token) => return join_with_token(state, token, request).await,
        JoinProof::AwsSts(p) => PlatformProof::AwsSts(p.clone()),
        JoinProof::Gcp(p) => PlatformProof::Gcp(p.clone()),
        JoinProof::K8s(p) => PlatformProof::K8s(p.clone()),
    };
    join_with_platform(state, &platform, request).await
}

/// Checks a request's recovery proof, if any, against the CSR's key (no I/O).
fn recovering(state: &AppState, request: &JoinRequest, join_key: &[u8]) -> Result<Option<Recovering>, RecoveryRefusal> {
    let now = state.now();
    request.recover.as_ref().map(|r| crate::platform_join::recovery::check(&state.ca, r, join_key, now)).transpose()
}

/// Audits a refused recovery: once the certificate proved ours and the signature its key's (`of`), on the chain of
/// the tenant whose appliance it names, with the appliance and serial (that tenant should learn who tried); else on
/// `chain`.
async fn refuse_recovery(
    state: &AppState,
    chain: String,
    method: &str,
    r: RecoveryRefusal,
    of: Option<&Recovering>,
) -> JoinError {
    let mut detail = serde_json::json!({ "method": method, "code": r.code() });
    let chain = match of {
        Some(recovering) => {
            detail["appliance"] = recovering.identity.appliance.to_string().into();
            detail["recovered_serial"] = recovering.serial.clone().into();
            recovering.identity.tenant.to_string()
        }
        None => chain,
    };
    refuse(state, chain, JoinRefusal::Recovery, r.reason().to_owned(), detail).await
}

/// How long after a platform join its answer may be asked for again with the same key and
/// identity (a join token's retry is bounded by the token's own life, 15 minutes, alike).
const LOST_ANSWER_WINDOW: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// Records a refused join on `chain` and returns the error.
async fn refuse(
    state: &AppState,
    chain: String,
    refusal: JoinRefusal,
    reason: String,
    detail: serde_json::Value,
) -> JoinError {
    let mut ev = event("anonymous", AuditAction::ApplianceJoin, Outcome::Denied);
    let mut detail = detail;
    detail["reason"] = reason.clone().into();
    // Limited per kind of refusal, so a flood of one (an unknown `kid`, a bad CSR) cannot crowd
    // out the records of another (a replayed token) on the same chain. Codes are our own words.
    let kind = detail.get("code").and_then(serde_json::Value::as_str).unwrap_or(refusal.code());
    let limiter_key = format!("{}:{kind}", ev.action);
    ev.detail = detail;
    state.audit_refusal_keyed(&chain, &limiter_key, ev).await;
    JoinError::Refused { refusal, reason }
}

/// Exchanges a single-use join token and a CSR for an appliance certificate.
async fn join_with_token(state: &AppState, token: &str, request: &JoinRequest) -> Result<Joined, JoinError> {
    let (csr_pem, version) = (request.csr_pem.as_str(), request.version.as_str());
    let now = state.now();
    let refuse = |chain: String, refusal: JoinRefusal, reason: String| {
        refuse(state, chain, refusal, reason, serde_json::json!({ "method": "join_token" }))
    };
    let secret = match Secret::parse(TokenKind::Join, token) {
        Ok(s) => s,
        Err(e) => return Err(refuse(SYSTEM_CHAIN.into(), JoinRefusal::Token, e.to_string()).await),
    };
    // An unknown token is refused without taking the write lock, so guessing costs nothing
    // but a read.
    if !state.store.join_token_known(&secret.hash()).await? {
        return Err(refuse(SYSTEM_CHAIN.into(), JoinRefusal::Token, "unknown join token".into()).await);
    }
    // The CSR's self-signature proves possession of its key; checked before anything is spent.
    let join_key = match crate::ca::csr_public_key(csr_pem) {
        Ok(k) => k,
        Err(e) => return Err(refuse(SYSTEM_CHAIN.into(), JoinRefusal::Csr, format!("CSR refused: {e}")).await),
    };
    let recovering = match recovering(state, request, &join_key) {
        Ok(r) => r,
        Err(r) => return Err(refuse_recovery(state, SYSTEM_CHAIN.into(), "join_token", r, None).await),
    };
    let fresh = recovering.as_ref().map_or_else(|| ApplianceId::from_random(random()), |r| r.identity.appliance);
    let mut tx = state.store.write().await?;
    let redeemed = tx.redeem_join_token(&secret.hash(), fresh, now).await?;
    // The same appliance asking again with the same key, while the token would still be
    // valid, is a join whose response was lost: answer it again instead of stranding it.
    let retry = match &redeemed {
        Err(RedeemRefusal::AlreadyUsed { tenant, by: Some(by), expires_at })
            if now < *expires_at && recovering.is_none() =>
        {
            tx.join_retry_environment(*tenant, *by, &join_key).await?.map(|env| (*tenant, env, *by))
        }
        _ => None,
    };
    let trust_domain = state.ca.trust_domain().to_owned();
    let (identity, token, retried) = match (redeemed, retry) {
        (Ok(r), _) => {
            let identity =
                ApplianceIdentity { trust_domain, tenant: r.tenant, environment: r.environment, appliance: fresh };
            (identity, Some(r.token), false)
        }
        (Err(_), Some((tenant, environment, appliance))) => {
            (ApplianceIdentity { trust_domain, tenant, environment, appliance }, None, true)
        }
        (Err(refusal), None) => {
            drop(tx);
            let (chain, why) = match refusal {
                RedeemRefusal::Unknown => (SYSTEM_CHAIN.to_owned(), "unknown join token".to_owned()),
                RedeemRefusal::AlreadyUsed { tenant, .. } => (
                    tenant.to_string(),
                    "join token was already used; issue a new one with `airlock env join-token`".to_owned(),
                ),
                RedeemRefusal::Expired { tenant, expired_at } => (
                    tenant.to_string(),
                    format!("join token expired at {expired_at}; issue a new one with `airlock env join-token`"),
                ),
            };
            return Err(refuse(chain, JoinRefusal::Token, why).await);
        }
    };
    // A join that names its tenant is for that one only, as for an environment below.
    if let Some(named) = request.tenant
        && named != identity.tenant
    {
        drop(tx);
        let why = format!("the join names tenant {named}, and this join token is another tenant's");
        let detail = serde_json::json!({ "method": "join_token", "code": "other_tenant" });
        let chain = identity.tenant.to_string();
        return Err(crate::appliances::refuse(state, chain, JoinRefusal::NoEnvironment, why, detail).await);
    }
    // A join that names its environment is for that one only; the token stays unspent for the right appliance.
    if let Some(named) = request.environment
        && named != identity.environment
    {
        drop(tx);
        let why = format!(
            "the join names environment {named}, and this join token is for another; give the token of {named}, \
             or the right --environment"
        );
        let detail = serde_json::json!({ "method": "join_token", "code": "other_environment" });
        // The module's `refuse`, with a code in the detail (the local closure records the method only).
        let chain = identity.tenant.to_string();
        return Err(crate::appliances::refuse(state, chain, JoinRefusal::NoEnvironment, why, detail).await);
    }
    // A recovery keeps its identity only in the environment the token names, and only while
    // that identity is the appliance's, unrevoked; otherwise the token is not spent.
    let recovered = match &recovering {
        Some(r) if (r.identity.tenant, r.identity.environment) != (identity.tenant, identity.environment) => {
            drop(tx);
            let why = RecoveryRefusal::OtherEnvironment;
            return Err(refuse_recovery(state, identity.tenant.to_string(), "join_token", why, Some(r)).await);
        }
        Some(r) => match crate::platform_join::recovery::check_stored(&mut tx, r, now).await? {
            Ok(stored) => Some((r.serial.clone(), stored.join_method)),
            Err(why) => {
                drop(tx);
                return Err(refuse_recovery(state, identity.tenant.to_string(), "join_token", why, Some(r)).await);
            }
        },
        None => None,
    };
    let mut detail = serde_json::json!({ "method": "join_token", "join_token": token.map(|t| t.to_string()) });
    // A platform-joined appliance may recover with a join token: the token is an operator's explicit grant for
    // that very environment (one who has moved the appliance off its platform, or whose platform identity is
    // gone), and refusing it would strand the appliance with no way back but a new identity. Its renewals stop
    // proving the platform identity from then on, so the change of method is in the join's audit record.
    let recovered = recovered.map(|(serial, from)| {
        if from != "join_token" {
            detail["method_changed"] = serde_json::json!({ "from": from, "to": "join_token" });
        }
        serial
    });
    let via = JoinVia { method: "join_token", identity: None, rule: None };
    let record = Record::new(retried, recovered);
    issue(state, tx, Issue { identity, join_key: &join_key, csr_pem, version, record, via, detail }).await
}

/// Joins with a platform proof (`crate::platform_join`): AWS, GCP or Kubernetes.
async fn join_with_platform(
    state: &AppState,
    proof: &PlatformProof,
    request: &JoinRequest,
) -> Result<Joined, JoinError> {
    let (csr_pem, version) = (request.csr_pem.as_str(), request.version.as_str());
    let method = proof.method();
    let refused = |crate::platform_join::Refused { refusal: r, judged_by }| async move {
        let refusal = match &r {
            PlatformRefusal::NoRule(_)
            | PlatformRefusal::SeveralEnvironments(..)
            | PlatformRefusal::NotNamedEnvironment(..) => JoinRefusal::NoEnvironment,
            PlatformRefusal::Unpinned => JoinRefusal::Unpinned,
            r if r.unavailable() => JoinRefusal::PlatformUnavailable,
            _ => JoinRefusal::Proof,
        };
        let detail = serde_json::json!({
            "method": method,
            "code": r.code(),
            "identity": r.identity().map(|i| i.audit()),
        });
        tracing::info!(code = r.code(), method, "refused a platform join");
        let chain = judged_by.map_or_else(|| SYSTEM_CHAIN.to_owned(), |t| t.to_string());
        refuse(state, chain, refusal, r.reason(), detail).await
    };
    // The CSR first: it costs nothing to check, and a bad one should not spend a challenge.
    let join_key = match crate::ca::csr_public_key(csr_pem) {
        Ok(k) => k,
        Err(e) => {
            let detail = serde_json::json!({ "method": method, "code": "bad_csr" });
            return Err(refuse(state, SYSTEM_CHAIN.into(), JoinRefusal::Csr, format!("CSR refused: {e}"), detail).await);
        }
    };
    let recovering = match recovering(state, request, &join_key) {
        Ok(r) => r,
        Err(r) => return Err(refuse_recovery(state, SYSTEM_CHAIN.into(), method, r, None).await),
    };
    let matched = match crate::platform_join::verify(state, proof, request.target()).await? {
        Ok(m) => m,
        Err(r) => return Err(refused(r).await),
    };
    if let Some(r) = &recovering
        && (r.identity.tenant, r.identity.environment) != (matched.tenant, matched.environment)
    {
        let why = RecoveryRefusal::OtherEnvironment;
        return Err(refuse_recovery(state, matched.tenant.to_string(), method, why, Some(r)).await);
    }
    let mut tx = state.store.write().await?;
    let mut method_changed = None;
    let (retry, recovered) = match &recovering {
        Some(r) => match crate::platform_join::recovery::check_stored(&mut tx, r, state.now()).await? {
            // A platform-joined appliance recovers as the identity it joined with, or not at all: another identity
            // that some rule of its environment accepts (another role of the account) takes nothing over.
            Ok(stored)
                if stored.join_method != "join_token"
                    && crate::platform_join::other_identity(stored.join_identity.as_deref(), &matched.identity)
                        .is_some() =>
            {
                drop(tx);
                let why = RecoveryRefusal::OtherIdentity;
                return Err(refuse_recovery(state, matched.tenant.to_string(), method, why, Some(r)).await);
            }
            Ok(stored) => {
                if stored.join_method != method {
                    method_changed = Some(serde_json::json!({ "from": stored.join_method, "to": method }));
                }
                (None, Some((r.identity.appliance, r.serial.clone())))
            }
            Err(why) => {
                drop(tx);
                return Err(refuse_recovery(state, matched.tenant.to_string(), method, why, Some(r)).await);
            }
        },
        None => match tx.platform_join_retry(matched.tenant, matched.environment, &join_key).await? {
            None => (None, None),
            // The same key and identity soon after: the answer was lost, the same appliance is answered again.
            Some(j)
                if state.now().since(j.joined_at) <= LOST_ANSWER_WINDOW
                    && crate::platform_join::other_identity(j.identity.as_deref(), &matched.identity).is_none() =>
            {
                (Some(j.appliance), None)
            }
            // Later, or as another identity: a new certificate for that appliance would outlive its renewals and
            // recoveries (the key is the one it first joined with), so whoever kept the key could take it over.
            Some(j) => {
                drop(tx);
                let why = format!(
                    "this key already joined appliance {}; a join is retried with it only as the same identity \
                     within {} minutes of that join and before the appliance renews, and a new appliance needs a new key",
                    j.appliance,
                    LOST_ANSWER_WINDOW.as_secs() / 60
                );
                let detail = serde_json::json!({
                    "method": method,
                    "code": "join_key_reused",
                    "identity": matched.identity.audit(),
                    "appliance": j.appliance.to_string(),
                });
                let chain = matched.tenant.to_string();
                return Err(refuse(state, chain, JoinRefusal::Proof, why, detail).await);
            }
        },
    };
    let identity = ApplianceIdentity {
        trust_domain: state.ca.trust_domain().to_owned(),
        tenant: matched.tenant,
        environment: matched.environment,
        appliance: recovered
            .as_ref()
            .map(|(id, _)| *id)
            .or(retry)
            .unwrap_or_else(|| ApplianceId::from_random(random())),
    };
    // A Kubernetes token joins once: spent with the appliance it makes, in this transaction
    // (a retry of a lost answer, by the same key, is the same appliance and may show it again).
    if let Some(token) = &matched.token_id
        && !tx.spend_platform_token(token, identity.appliance, state.now()).await?
    {
        drop(tx);
        // The identity is proved and the tenant's rules accept it: a replay of its token is that tenant's to see.
        let r = PlatformRefusal::Token(TokenRefusal::Replayed);
        let detail = serde_json::json!({ "method": method, "code": r.code(), "identity": matched.identity.audit() });
        return Err(refuse(state, matched.tenant.to_string(), JoinRefusal::Proof, r.reason(), detail).await);
    }
    let shown = matched.identity.matched();
    let mut detail = serde_json::json!({
        "method": method,
        "identity": matched.identity.audit(),
        "join_rule": matched.rule.to_string(),
    });
    if let Some(changed) = method_changed {
        detail["method_changed"] = changed;
    }
    let via = JoinVia { method, identity: Some(&shown), rule: Some(matched.rule) };
    let record = Record::new(retry.is_some(), recovered.map(|(_, serial)| serial));
    issue(state, tx, Issue { identity, join_key: &join_key, csr_pem, version, record, via, detail }).await
}

/// What a join records.
enum Record {
    /// A new appliance.
    New,
    /// The answer to a join whose response was lost: the same appliance, renewed.
    LostAnswer,
    /// An appliance whose certificate (this serial) expired keeps its identity.
    Recovered(String),
}

impl Record {
    fn new(retried: bool, recovered: Option<String>) -> Self {
        match (recovered, retried) {
            (Some(serial), _) => Self::Recovered(serial),
            (None, true) => Self::LostAnswer,
            (None, false) => Self::New,
        }
    }
}

/// What [`issue`] records.
struct Issue<'a> {
    identity: ApplianceIdentity,
    join_key: &'a [u8],
    csr_pem: &'a str,
    version: &'a str,
    record: Record,
    via: JoinVia<'a>,
    /// The method's part of the audit record.
    detail: serde_json::Value,
}

/// Signs the certificate and records the appliance (or the renewal of a lost answer) with its
/// audit record, in `tx`. A CSR the CA refuses rolls back, so a bad CSR spends no token.
async fn issue(state: &AppState, mut tx: crate::store::WriteTx<'_>, i: Issue<'_>) -> Result<Joined, JoinError> {
    let now = state.now();
    let Issue { identity, join_key, csr_pem, version, record, via, detail } = i;
    let appliance = identity.appliance;
    let issued = match state.ca.sign_join_csr(csr_pem, &identity, now, state.appliance_cert_lifetime) {
        Ok(i) => i,
        Err(e) => {
            drop(tx);
            let chain = identity.tenant.to_string();
            return Err(refuse(state, chain, JoinRefusal::Csr, format!("CSR refused: {e}"), detail).await);
        }
    };
    let version: String = version.chars().filter(|c| !c.is_control()).take(64).collect();
    let scope = TenantScope::for_appliance(&identity);
    match &record {
        Record::LostAnswer => {
            let cert = (issued.serial.as_str(), issued.not_after);
            tx.record_renewal(&scope, appliance, cert, Renewed::LostJoinAnswer).await?;
        }
        Record::Recovered(recovered) => {
            let cert = (issued.serial.as_str(), issued.not_after);
            tx.record_renewal(&scope, appliance, cert, Renewed::Replaced { presented: recovered }).await?;
            // It proves itself by the method it recovered with from now on, at each renewal.
            tx.record_join_via(&identity, via).await?;
        }
        Record::New => {
            tx.insert_appliance(&identity, &version, (&issued.serial, issued.not_after), join_key, now).await?;
            if via.method != "join_token" {
                tx.record_join_via(&identity, via).await?;
            }
        }
    }
    let retried = matches!(record, Record::LostAnswer);
    let mut ev = event(format!("appliance:{appliance}"), AuditAction::ApplianceJoin, Outcome::Success);
    ev.target = Some(appliance.to_string());
    let mut detail = detail;
    detail["environment"] = identity.environment.to_string().into();
    detail["retry_of_lost_response"] = retried.into();
    if let Record::Recovered(serial) = &record {
        detail["recovered_serial"] = serial.clone().into();
    }
    detail["serial"] = issued.serial.clone().into();
    detail["not_after"] = issued.not_after.to_string().into();
    ev.detail = detail;
    tx.audit(&identity.tenant.to_string(), now, ev).await?;
    tx.commit().await?;
    state.metrics.joins.inc();
    tracing::info!(%appliance, environment = %identity.environment, method = via.method, retried, "appliance joined");
    Ok(Joined { identity, certificate: issued, retried })
}

/// A revocation that took effect.
#[derive(Debug)]
pub struct Revoked {
    /// Whether the appliance had a live stream, which was ended.
    pub was_connected: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RevokeError {
    #[error("no appliance {0} in your tenant")]
    NoAppliance(ApplianceId),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Revokes appliance `id`: recorded with its audit record, enforced from before the commit
/// returns, and its live stream ended once it is recorded.
pub async fn revoke(state: &AppState, scope: &TenantScope, id: ApplianceId) -> Result<Revoked, RevokeError> {
    let now = state.now();
    let mut tx = state.store.write().await?;
    if !tx.revoke_appliance(scope, id, now).await? {
        return Err(RevokeError::NoAppliance(id));
    }
    // Refuse new handshakes and streams from before the commit returns (so no window opens
    // between commit and enforcement), but end the live stream only once the revocation is
    // durably recorded: a revocation that fails to commit must not have taken effect.
    state.revoked.insert(id);
    let was_connected = state.registry.status(&id).is_some();
    let mut ev = event(scope.principal().actor(), AuditAction::ApplianceRevoke, Outcome::Success);
    ev.target = Some(id.to_string());
    ev.detail = serde_json::json!({ "was_connected": was_connected });
    let committed = async {
        tx.audit(&scope.chain(), now, ev).await?;
        tx.commit().await
    }
    .await;
    if let Err(e) = committed {
        state.revoked.remove(&id);
        return Err(e.into());
    }
    state.registry.kick(id, Kick::Revoked);
    tracing::info!(appliance = %id, was_connected, "appliance revoked");
    Ok(Revoked { was_connected })
}

/// Keeps the execution key attestation an appliance sent in its Hello, replacing the one
/// stored: requests made from now on name the key it attests (`crate::attestation`). One that
/// is malformed or names another appliance is refused and audited, and clears the stored one
/// (the appliance holds none the control plane can name). Written only when it changed.
pub async fn hello_attestation(
    state: &AppState,
    scope: &TenantScope,
    peer: &ApplianceIdentity,
    json: &str,
) -> Result<(), StoreError> {
    let id = peer.appliance;
    let (offered, refused) = match crate::attestation::naming_peer(peer, json) {
        Ok(att) => (att, None),
        Err(why) => (None, Some(why)),
    };
    if let Some(why) = &refused {
        tracing::warn!(appliance = %id, reason = %why, "refusing the execution key attestation an appliance sent");
        let mut ev = event(scope.principal().actor(), AuditAction::ExecutionKeyAttest, Outcome::Denied);
        ev.target = Some(id.to_string());
        ev.detail = serde_json::json!({ "reason": why });
        state.audit_refusal(&scope.chain(), ev).await;
    }
    let stored = state.store.get_appliance(scope, id).await?.and_then(|a| a.execution_key_attestation);
    let offered_json = offered.as_ref().map(|a| a.envelope.to_json());
    if stored == offered_json {
        return Ok(());
    }
    let now = state.now();
    let mut tx = state.store.write().await?;
    tx.record_execution_key_attestation(scope, id, offered_json.as_deref()).await?;
    if refused.is_none() {
        let mut ev = event(scope.principal().actor(), AuditAction::ExecutionKeyAttest, Outcome::Success);
        ev.target = Some(id.to_string());
        ev.detail = serde_json::json!({ "key_id": offered.as_ref().map(|a| a.key.key_id()) });
        tx.audit(&scope.chain(), now, ev).await?;
    }
    tx.commit().await?;
    tracing::info!(appliance = %id, key_id = ?offered.as_ref().map(|a| a.key.key_id()), "stored the appliance's execution key attestation");
    Ok(())
}
