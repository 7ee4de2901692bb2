//! Certificate renewal over the stream.
//!
//! A certificate renews only if it is the appliance's current one or the one it replaced (the appliance may have missed the reply), the appliance is not revoked, and half of the certificate's life has passed.
//! Before that there is nothing to renew, and refusing keeps a misbehaving appliance from minting certificates.
//! The CSR must name exactly the current identity and carry a new key ([`crate::ca::CertificateAuthority::sign_renewal_csr`]).
//! The new serial is recorded with its audit record, and the previous one stays acceptable for one more renewal.
//! An appliance that joined with its platform identity proves it again, and a join rule of its environment must still accept it ([`crate::platform_join::recheck_at_renewal`]).

use airlock_core::audit::{AuditAction, Outcome};
use airlock_proto::gateway::{RenewRefused, RenewResponse, control_message};

use crate::authz::TenantScope;
use crate::registry::Registration;
use crate::state::{AppState, event};
use crate::tls::PeerCert;

pub(super) async fn renew_certificate(
    state: &AppState,
    reg: &Registration,
    peer: &PeerCert,
    scope: &TenantScope,
    csr_pem: &str,
    platform_proof_json: &str,
) -> control_message::Body {
    let now = state.now();
    let actor = scope.principal().actor();
    let target = Some(peer.identity.appliance.to_string());
    let refused = |reason: String| {
        let mut ev = event(actor.clone(), AuditAction::ApplianceCertificateRenew, Outcome::Denied);
        ev.target = target.clone();
        ev.detail = serde_json::json!({ "reason": reason, "presented_serial": peer.serial });
        async move {
            state.audit_refusal(&scope.chain(), ev).await;
            control_message::Body::RenewRefused(RenewRefused { reason })
        }
    };
    // Renewal is paced by the certificate's own life: before half of it has passed there is
    // nothing to renew, and refusing keeps a misbehaving appliance from minting certificates.
    let half_life = peer.not_before.saturating_add(peer.not_after.since(peer.not_before) / 2);
    if now < half_life {
        return refused(format!("too early: renew after {half_life}")).await;
    }
    // Outside the write transaction: it may ask STS or a token issuer, which takes a round trip.
    let platform = match crate::platform_join::recheck_at_renewal(
        state,
        scope,
        &peer.identity,
        csr_pem,
        platform_proof_json,
    )
    .await
    {
        Ok(Ok(identity)) => identity,
        Ok(Err(reason)) => return refused(reason).await,
        Err(e) => {
            tracing::error!(error = %e, "cannot re-check a platform identity at renewal");
            return control_message::Body::RenewRefused(RenewRefused {
                reason: "the control plane's store is unavailable; will retry".into(),
            });
        }
    };
    let result = async {
        let mut tx = state.store.write().await?;
        // Only the current certificate, or the one it replaced (the appliance may have missed
        // the reply), may renew; an older or stolen one would fork the identity.
        let Some(current) = tx.renewal_state(scope, peer.identity.appliance).await? else {
            return Ok(Err("unknown appliance".to_owned()));
        };
        if current.revoked {
            return Ok(Err("appliance is revoked".to_owned()));
        }
        if peer.serial != current.current_serial && current.previous_serial.as_deref() != Some(peer.serial.as_str()) {
            return Ok(Err("this certificate has been superseded; use the newest one".to_owned()));
        }
        // A Kubernetes token another appliance used proves nothing for this one.
        if let Some(token) = platform.as_ref().and_then(|p| p.token_id.as_ref())
            && !tx.spend_platform_token(token, peer.identity.appliance, now).await?
        {
            return Ok(Err(crate::platform_join::tokens::TokenRefusal::Replayed.reason()));
        }
        let issued = match state.ca.sign_renewal_csr(
            csr_pem,
            &peer.identity,
            &peer.public_key,
            now,
            state.appliance_cert_lifetime,
        ) {
            Ok(i) => i,
            Err(e) => return Ok(Err(e.to_string())),
        };
        let renewed = crate::store::Renewed::Replaced { presented: &peer.serial };
        tx.record_renewal(scope, peer.identity.appliance, (&issued.serial, issued.not_after), renewed).await?;
        let mut ev = event(actor.clone(), AuditAction::ApplianceCertificateRenew, Outcome::Success);
        ev.target = target.clone();
        ev.detail = serde_json::json!({
            "serial": issued.serial, "not_after": issued.not_after.to_string(), "previous_serial": peer.serial,
            "platform_identity": platform.as_ref().map(|p| p.identity.audit()),
        });
        tx.audit(&scope.chain(), now, ev).await?;
        tx.commit().await?;
        Ok::<_, crate::store::StoreError>(Ok(issued))
    }
    .await;
    let issued = match result {
        Ok(Ok(issued)) => issued,
        Ok(Err(reason)) => return refused(reason).await,
        Err(e) => {
            tracing::error!(error = %e, "cannot record renewal");
            return control_message::Body::RenewRefused(RenewRefused {
                reason: "control plane could not record the renewal; retry later".into(),
            });
        }
    };
    state.metrics.renewals.inc();
    let (serial, not_after) = (issued.serial.clone(), issued.not_after);
    state.registry.update(reg, |s| {
        s.cert_serial = serial;
        s.cert_not_after = not_after;
    });
    tracing::info!(appliance = %peer.identity.appliance, serial = %issued.serial, "renewed appliance certificate");
    control_message::Body::Renewed(RenewResponse {
        certificate_pem: issued.pem,
        serial: issued.serial,
        not_after_unix_ms: issued.not_after.unix_millis(),
    })
}
