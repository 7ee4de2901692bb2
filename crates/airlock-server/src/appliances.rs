//! An appliance's life on the control plane: it joins with a single-use token, and it can be
//! revoked.
//!
//! Join: the token is checked without the write lock first (an unknown one costs a read), the
//! CSR's self-signature proves possession of its key before anything is spent, and the token
//! is spent in the same transaction that records the appliance and its audit record.
//! A CSR the CA refuses rolls the transaction back, so a bad CSR does not burn the token.
//! The same appliance asking again with the same key while the token would still be valid is a
//! join whose response was lost: it is answered again (with a fresh certificate) instead of
//! stranded.
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

use crate::authz::TenantScope;
use crate::ca::Issued;
use crate::registry::Kick;
use crate::state::{AppState, SYSTEM_CHAIN, event, random};
use crate::store::{RedeemRefusal, StoreError};

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
}

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// Refused, and the refusal audited (in the tenant's chain when the token names one).
    #[error("{reason}")]
    Refused { refusal: JoinRefusal, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Exchanges a single-use join token and a CSR (PEM) for an appliance certificate. `version`
/// is what the appliance reports itself as (off the network; kept short and printable).
pub async fn join(state: &AppState, token: &str, csr_pem: &str, version: &str) -> Result<Joined, JoinError> {
    let now = state.now();
    let refuse = |chain: String, refusal: JoinRefusal, reason: String| async move {
        let mut ev = event("anonymous", AuditAction::ApplianceJoin, Outcome::Denied);
        ev.detail = serde_json::json!({ "reason": reason });
        state.audit_refusal(&chain, ev).await;
        JoinError::Refused { refusal, reason }
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
    let fresh = ApplianceId::from_random(random());
    let mut tx = state.store.write().await?;
    let redeemed = tx.redeem_join_token(&secret.hash(), fresh, now).await?;
    // The same appliance asking again with the same key, while the token would still be
    // valid, is a join whose response was lost: answer it again instead of stranding it.
    let retry = match &redeemed {
        Err(RedeemRefusal::AlreadyUsed { tenant, by: Some(by), expires_at }) if now < *expires_at => {
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
    let appliance = identity.appliance;
    let issued = match state.ca.sign_join_csr(csr_pem, &identity, now, state.appliance_cert_lifetime) {
        Ok(i) => i,
        Err(e) => {
            // Rolling back leaves the token unspent: a bad CSR should not burn it.
            drop(tx);
            return Err(refuse(identity.tenant.to_string(), JoinRefusal::Csr, format!("CSR refused: {e}")).await);
        }
    };
    let version: String = version.chars().filter(|c| !c.is_control()).take(64).collect();
    if retried {
        tx.record_renewal(&TenantScope::for_appliance(&identity), appliance, &issued.serial, issued.not_after).await?;
    } else {
        tx.insert_appliance(&identity, &version, (&issued.serial, issued.not_after), &join_key, now).await?;
    }
    let mut ev = event(format!("appliance:{appliance}"), AuditAction::ApplianceJoin, Outcome::Success);
    ev.target = Some(appliance.to_string());
    ev.detail = serde_json::json!({
        "environment": identity.environment.to_string(),
        "join_token": token.map(|t| t.to_string()),
        "retry_of_lost_response": retried,
        "serial": issued.serial,
        "not_after": issued.not_after.to_string(),
    });
    tx.audit(&identity.tenant.to_string(), now, ev).await?;
    tx.commit().await?;
    state.metrics.joins.inc();
    tracing::info!(%appliance, environment = %identity.environment, retried, "appliance joined");
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
