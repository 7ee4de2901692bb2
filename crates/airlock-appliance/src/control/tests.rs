//! The decision state under the customer's hand: policies relayed by the control plane.

use airlock_core::EnvironmentId;
use airlock_core::audit::AuditAction;
use airlock_core::dsse::Envelope;
use airlock_core::policy::{POLICY_PAYLOAD_TYPE, Phase, PolicyError};
use airlock_testkit::{customer, op_id};

use crate::result::Outcome;
use crate::testing::*;
use crate::{ApplianceError, PolicyRejection};

#[tokio::test]
async fn a_policy_relayed_by_the_control_plane_is_applied_like_one_loaded_on_the_host() {
    let fx = Fx::new(ALL_PHASES);
    let script = "sleep 60\n";
    let stmt = fx.statement(op_id(32), MANIFEST, script, vars("api"));
    let handle = fx.start(&stmt, script).await;
    eventually(|| fx.control.running_group(op_id(32)).is_some()).await;
    let observe_only =
        format!("version = 1\nserial = 2\nenvironment = \"{}\"\nphases = [\"observe\"]\n", fx.kit.identity.environment)
            .into_bytes();
    let next = customer::sign(POLICY_PAYLOAD_TYPE, observe_only.clone(), &[1]).to_json();
    let status = fx.control.relayed_policy(next.as_bytes()).unwrap().expect("a change");
    assert_eq!((status.policy_serial, status.effective.clone()), (Some(2), vec![Phase::Observe]));
    // Running operations of a phase it no longer enables are cancelled, as for a local one.
    let r = tokio::time::timeout(std::time::Duration::from_secs(10), handle).await.unwrap().unwrap();
    assert_eq!(r.outcome, Outcome::Cancelled);
    // Stored like a local one, so it is in force after a restart.
    let stored = std::fs::read(fx.dir.path().join("policy.dsse.json")).unwrap();
    assert_eq!(Envelope::from_json(&stored).unwrap().payload, observe_only);
    let updates = fx.audited(AuditAction::PolicyUpdate);
    assert_eq!(updates.len(), 1);
    assert_eq!(updates[0]["detail"]["source"], "control_plane");
    // The policy in force again (sent after every connect): nothing happens, nothing audited.
    assert!(fx.control.relayed_policy(next.as_bytes()).unwrap().is_none());
    assert_eq!(fx.audited(AuditAction::PolicyUpdate).len(), 1);

    // Signed by a key the customer did not pin (the vendor's own): refused and audited, the
    // policy in force stays; the same envelope again is not audited again.
    let with_env = |serial: &str| {
        ALL_PHASES
            .replace("serial = 1", &format!("serial = {serial}\nenvironment = \"{}\"", fx.kit.identity.environment))
    };
    let vendor = customer::sign(POLICY_PAYLOAD_TYPE, with_env("3").into_bytes(), &[9]).to_json();
    let err = fx.control.relayed_policy(vendor.as_bytes()).unwrap_err();
    assert!(matches!(err, ApplianceError::Policy(PolicyRejection::Verify(PolicyError::Signature(_)))), "{err}");
    assert_eq!(fx.control.status().policy_serial, Some(2));
    assert_eq!(fx.control.effective_phases(), [Phase::Observe].into());
    assert!(fx.control.relayed_policy(vendor.as_bytes()).unwrap().is_none());
    let refused = fx.audited(AuditAction::PolicyRefused);
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0]["outcome"], "denied");
    assert!(refused[0]["detail"]["reason"].as_str().unwrap().contains("signature"), "{refused:?}");
    // An older policy, properly signed: the no-rollback rule holds for relayed ones too.
    let older = customer::sign(POLICY_PAYLOAD_TYPE, with_env("1").into_bytes(), &[1]).to_json();
    let err = fx.control.relayed_policy(older.as_bytes()).unwrap_err();
    let rollback = PolicyRejection::Verify(PolicyError::Rollback { offered: 1, current: 2 });
    assert!(matches!(&err, ApplianceError::Policy(r) if *r == rollback), "{err}");
    assert_eq!(fx.audited(AuditAction::PolicyRefused).len(), 2);
    assert_eq!(fx.control.status().policy_serial, Some(2));
    // An unsigned envelope or one that is not a policy: refused too.
    assert!(fx.control.relayed_policy(b"{}").is_err());
    assert_eq!(fx.audited(AuditAction::PolicyRefused).len(), 3);

    // A customer-signed policy for another environment, or one naming none, replayed by the
    // vendor: refused, even though its signature and serial are good.
    let elsewhere = ALL_PHASES
        .replace("serial = 1", &format!("serial = 7\nenvironment = \"{}\"", EnvironmentId::from_random([42; 16])));
    for text in [elsewhere, ALL_PHASES.replace("serial = 1", "serial = 7")] {
        let replayed = customer::sign(POLICY_PAYLOAD_TYPE, text.into_bytes(), &[1]).to_json();
        let err = fx.control.relayed_policy(replayed.as_bytes()).unwrap_err();
        assert!(matches!(err, ApplianceError::Policy(PolicyRejection::Environment(_))), "{err}");
    }
    assert_eq!(fx.control.status().policy_serial, Some(2));
    assert_eq!(fx.audited(AuditAction::PolicyRefused).len(), 5);
    // On the host, the customer may load one naming no environment (their own act), but never
    // one for another environment.
    let local = customer::sign(POLICY_PAYLOAD_TYPE, ALL_PHASES.replace("serial = 1", "serial = 8").into_bytes(), &[1])
        .to_json();
    fx.control.load_policy(HOST_ADMIN, local.as_bytes()).unwrap();
    assert_eq!(fx.control.status().policy_serial, Some(8));
}
