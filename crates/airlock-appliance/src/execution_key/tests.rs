//! The execution key on disk, and the customer's attestation of it over the admin socket.

use std::os::unix::fs::PermissionsExt;

use airlock_core::audit::AuditAction;
use airlock_core::execution_key::ExecutionPublicKey;
use airlock_core::operation::{Manifest, VendorAttested, VerifyInputs, pem_certificate_der, verify_parsed_manifest};
use airlock_core::{ApplianceId, TenantId};
use airlock_testkit::{customer, op_id};

use super::{ATTESTATION_FILE, KEY_FILE};
use crate::admin::access::AdminAccess;
use crate::admin::{Request, SOCKET_FILE, bind, call_value, serve};
use crate::testing::*;

#[test]
fn the_execution_key_is_owner_only_and_stable_across_restarts() {
    let mut fx = Fx::new(ALL_PHASES);
    let path = fx.dir.path().join(KEY_FILE);
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    let first = fx.control.execution_key().public();
    let pem = std::fs::read_to_string(&path).unwrap();
    fx.restart();
    fx.restart();
    assert_eq!(fx.control.execution_key().public(), first);
    assert_eq!(std::fs::read_to_string(&path).unwrap(), pem);
    // Made once, and only its id is in the audit.
    let created = fx.audited(AuditAction::ExecutionKeyCreate);
    assert_eq!(created.len(), 1);
    assert_eq!(created[0]["detail"]["key_id"], first.key_id());
    let audit = std::fs::read_to_string(fx.dir.path().join("audit.jsonl")).unwrap();
    let secret = pem.lines().nth(1).unwrap();
    assert!(!audit.contains(secret));
    // A damaged key file stops the start rather than signing with another key.
    std::fs::write(&path, "not a key").unwrap();
    let audit = std::sync::Arc::new(crate::audit_log::AuditLog::open(fx.dir.path()).unwrap());
    let pinned = customer::public_keys(PINNED);
    let err = crate::control::LocalControl::new(fx.dir.path(), None, audit, pinned).err().unwrap();
    assert!(err.to_string().contains(KEY_FILE), "{err}");
}

#[tokio::test]
async fn an_attestation_applied_over_the_admin_socket_goes_into_every_manifest() {
    let mut fx = Fx::new(ALL_PHASES);
    // An execution signed before the attestation.
    let before = fx.simple(op_id(1), "api");
    fx.run(&before, &fx.grant(&before)).await;
    let socket = fx.dir.path().join(SOCKET_FILE);
    let access = AdminAccess::resolve(None).unwrap();
    let server = tokio::spawn(serve(fx.control.clone(), access.clone(), bind(&socket, &access).unwrap()));

    // What the customer reads: the identity and the key, nothing attested yet.
    let info = call_value(&socket, &Request::ExecutionKey).await.unwrap();
    assert_eq!(info["identity"], fx.kit.identity.uri());
    assert_eq!(info["appliance"], fx.kit.identity.appliance.to_string());
    assert_eq!(info["tenant"], fx.kit.identity.tenant.to_string());
    let key = ExecutionPublicKey::from_pem(info["execution_key"].as_str().unwrap()).unwrap();
    assert_eq!(key, fx.control.execution_key().public());
    assert_eq!(info["key_id"], key.key_id());
    assert!(info["attestation"].is_null());

    let envelope: serde_json::Value = serde_json::from_slice(&fx.attestation(&[1], |_| {})).unwrap();
    let reply = call_value(&socket, &Request::AttestExecutionKey { envelope: envelope.clone() }).await.unwrap();
    assert_eq!(reply["key_id"], key.key_id());
    let attested = fx.audited(AuditAction::ExecutionKeyAttest);
    assert_eq!(attested.len(), 1);
    assert_eq!(attested[0]["outcome"], "success");
    assert_eq!(attested[0]["detail"]["peer"]["uid"], nix::unistd::geteuid().as_raw());
    let stored = fx.dir.path().join(ATTESTATION_FILE);
    assert_eq!(std::fs::metadata(&stored).unwrap().permissions().mode() & 0o777, 0o600);
    server.abort();

    // Kept across a restart, and in every manifest from now on, which then verifies with the
    // customer's key alone, refusing vendor-attested executions.
    fx.restart();
    let after = fx.simple(op_id(2), "web");
    let r = fx.run(&after, &fx.grant(&after)).await;
    assert!(!r.appliance_attestation_json.is_empty());
    let ca_der = pem_certificate_der(fx.kit.ca.pem()).unwrap();
    let keys = customer::public_keys(&[1]);
    let inputs = VerifyInputs {
        ca_der: &ca_der,
        customer_keys: &keys,
        approvals_required: 1,
        policy: None,
        vendor_attested: VendorAttested::Refuse,
    };
    for id in [op_id(1), op_id(2)] {
        // The host's copy; the one signed before the attestation gets it when it is read.
        let m: Manifest = serde_json::from_value(fx.control.manifest(id).unwrap()).unwrap();
        assert_eq!(m.appliance_attestation.as_ref().map(|a| serde_json::to_value(a).unwrap()), Some(envelope.clone()));
        verify_parsed_manifest(&m, &inputs).unwrap();
    }
}

#[tokio::test]
async fn a_forged_or_misdirected_attestation_is_refused_and_audited() {
    let fx = Fx::new(ALL_PHASES);
    let socket = fx.dir.path().join(SOCKET_FILE);
    let access = AdminAccess::resolve(None).unwrap();
    let server = tokio::spawn(serve(fx.control.clone(), access.clone(), bind(&socket, &access).unwrap()));
    let other_key = airlock_core::execution_key::ExecutionSigningKey::from_seed([66; 32]).public().to_pem().unwrap();
    let wrong_type = br#"{"payload":"e30=","payloadType":"application/vnd.airlock.policy.v1+toml","signatures":[]}"#;
    let forged: [(Vec<u8>, &str); 5] = [
        // Signed by a key the appliance did not pin (the vendor's).
        (fx.attestation(&[9], |_| {}), "not signed by the customer keys"),
        // For another appliance, or another tenant.
        (fx.attestation(&[1], |s| s.appliance = ApplianceId::from_random([4; 16])), "another appliance"),
        (fx.attestation(&[1], |s| s.tenant = TenantId::from_random([4; 16])), "another appliance"),
        // A key the vendor holds, in place of the appliance's.
        (fx.attestation(&[1], |s| s.execution_key = other_key.clone()), "but this appliance's is"),
        (wrong_type.to_vec(), "not signed"),
    ];
    for (envelope, why) in &forged {
        let envelope: serde_json::Value = serde_json::from_slice(envelope).unwrap();
        let err = call_value(&socket, &Request::AttestExecutionKey { envelope }).await.unwrap_err().to_string();
        assert!(err.contains("the attestation is refused") && err.contains(why), "{why}: {err}");
    }
    // Nothing kept, nothing in the manifests, every attempt audited as denied.
    assert!(!fx.dir.path().join(ATTESTATION_FILE).exists());
    assert!(fx.control.attestation().is_none());
    let refused = fx.audited(AuditAction::ExecutionKeyAttest);
    assert_eq!(refused.len(), forged.len());
    assert!(refused.iter().all(|r| r["outcome"] == "denied" && r["detail"]["peer"]["uid"].is_number()));
    server.abort();
}
