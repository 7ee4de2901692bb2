use std::path::Path;

use airlock_core::audit::AuditAction;
use airlock_core::key_rotation::{KEY_ROTATION_PAYLOAD_TYPE, KeyRotationStatement, key_ids};
use airlock_core::{Timestamp, policy::POLICY_PAYLOAD_TYPE};
use airlock_testkit::{customer, op_id};

use super::check_at_start;
use crate::audit_log::AuditLog;
use crate::result::Outcome;
use crate::state_dir::StateDir;
use crate::testing::*;

/// Starts again on `dir`: a new audit log (the chain as it stands) and the check.
fn start_check(dir: &Path) -> Result<(), String> {
    let audit = AuditLog::open(dir).unwrap();
    check_at_start(&StateDir::open(dir).unwrap(), &audit).map_err(|e| e.to_string())
}

fn actions(dir: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(dir.join(crate::audit_log::LOG_FILE))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|r| (r["action"].as_str().unwrap().to_owned(), r["outcome"].as_str().unwrap().to_owned()))
        .collect()
}

fn diverged(dir: &Path) -> usize {
    actions(dir).iter().filter(|(a, o)| a == "state.diverged" && o == "denied").count()
}

/// Refuses start naming `expect`, audits it, and changes no file but the log.
fn assert_refused_and_unchanged(dir: &Path, file: &str, expect: &str) {
    let before = std::fs::read(dir.join(file)).unwrap();
    let refusals = diverged(dir);
    let err = start_check(dir).unwrap_err();
    assert!(err.contains(expect) && err.contains("refusing to start"), "{err}");
    assert_eq!(diverged(dir), refusals + 1);
    assert_eq!(std::fs::read(dir.join(file)).unwrap(), before);
    // Still refused the next time: nothing was "fixed" by the refusal.
    assert!(start_check(dir).is_err());
}

#[test]
fn a_pinned_key_file_edited_on_disk_refuses_start() {
    let dir = tempfile::tempdir().unwrap();
    let state = StateDir::open(dir.path()).unwrap();
    let audit = AuditLog::open(dir.path()).unwrap();
    let pem = |n: u8| customer::key(n).public().to_pem().unwrap();
    crate::customer::pin_keys(&state, &[pem(1)], &audit).unwrap();
    drop(audit);
    assert_eq!(start_check(dir.path()), Ok(()));
    // The vendor's key appended to the pinned keys.
    let path = dir.path().join("customer-keys.pem");
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str(&pem(9));
    std::fs::write(&path, text).unwrap();
    assert_refused_and_unchanged(dir.path(), "customer-keys.pem", "key file was edited");
    // Replaced by the vendor's key alone, too.
    std::fs::write(&path, pem(9)).unwrap();
    assert_refused_and_unchanged(dir.path(), "customer-keys.pem", "key file was edited");
}

#[test]
fn an_older_signed_policy_put_back_refuses_start() {
    let dir = tempfile::tempdir().unwrap();
    let state = StateDir::open(dir.path()).unwrap();
    let audit = AuditLog::open(dir.path()).unwrap();
    let pinned = crate::customer::pin_keys(&state, &[customer::key(1).public().to_pem().unwrap()], &audit).unwrap();
    let signed = |serial: u64| {
        let toml = ALL_PHASES.replace("serial = 1", &format!("serial = {serial}"));
        customer::sign(POLICY_PAYLOAD_TYPE, toml.into_bytes(), &[1]).to_json()
    };
    let (one, two) = (dir.path().join("p1.json"), dir.path().join("p2.json"));
    std::fs::write(&one, signed(1)).unwrap();
    std::fs::write(&two, signed(2)).unwrap();
    crate::customer::load_policy(&state, &pinned, Some(&one), &audit).unwrap();
    crate::customer::load_policy(&state, &pinned, Some(&two), &audit).unwrap();
    drop(audit);
    assert_eq!(start_check(dir.path()), Ok(()));
    std::fs::copy(&one, dir.path().join("policy.dsse.json")).unwrap();
    assert_refused_and_unchanged(dir.path(), "policy.dsse.json", "older policy was put back");
    // With the stored policy gone unverifiable (unpinned keys, say), the chain's high-water mark
    // still refuses an older one.
    std::fs::copy(&two, dir.path().join("policy.dsse.json")).unwrap();
    let audit = AuditLog::open(dir.path()).unwrap();
    let in_force = crate::customer::load_policy(&state, &customer::public_keys(&[5]), None, &audit).unwrap();
    assert_eq!(in_force, None);
    let offered = crate::customer::accept_policy(
        &state,
        &pinned,
        signed(1).as_bytes(),
        None,
        &audit,
        crate::customer::PolicySource::Host(HOST_ADMIN),
        None,
    );
    assert!(
        matches!(
            offered,
            Err(crate::customer::PolicyRefused::Invalid(crate::customer::PolicyRejection::Verify(
                airlock_core::policy::PolicyError::Rollback { offered: 1, current: 2 }
            )))
        ),
        "the high-water mark holds: {offered:?}"
    );
}

#[tokio::test]
async fn a_pre_approval_counter_reset_or_revocation_lifted_refuses_start() {
    let fx = Fx::new(ALL_PHASES);
    fx.control.pre_approval_add(HOST_ADMIN, &fx.pre_approval(|p| p.id = "counted".into())).unwrap();
    fx.control.pre_approval_add(HOST_ADMIN, &fx.pre_approval(|p| p.id = "revoked".into())).unwrap();
    let r = fx.run(&fx.simple(op_id(1), "api"), "").await;
    assert_eq!(r.outcome, Outcome::Executed, "{r:?}");
    fx.control.pre_approval_revoke(HOST_ADMIN, "revoked").unwrap();
    let dir = fx.dir.path();
    assert_eq!(start_check(dir), Ok(()));
    let path = dir.join("pre-approvals.json");
    let good = std::fs::read_to_string(&path).unwrap();
    let mut entries: serde_json::Value = serde_json::from_str(&good).unwrap();
    let used = entries["counted"]["runs_used"].as_u64().unwrap();
    assert!(used >= 1);
    entries["counted"]["runs_used"] = 0.into();
    std::fs::write(&path, serde_json::to_vec_pretty(&entries).unwrap()).unwrap();
    assert_refused_and_unchanged(dir, "pre-approvals.json", "counter was reset");
    let mut entries: serde_json::Value = serde_json::from_str(&good).unwrap();
    entries["revoked"]["revoked"] = false.into();
    std::fs::write(&path, serde_json::to_vec_pretty(&entries).unwrap()).unwrap();
    assert_refused_and_unchanged(dir, "pre-approvals.json", "revocation was lifted");
    let mut entries: serde_json::Value = serde_json::from_str(&good).unwrap();
    entries.as_object_mut().unwrap().remove("revoked");
    std::fs::write(&path, serde_json::to_vec_pretty(&entries).unwrap()).unwrap();
    assert_refused_and_unchanged(dir, "pre-approvals.json", "were removed");
    // Put back as it was, the appliance starts.
    std::fs::write(&path, good).unwrap();
    assert_eq!(start_check(dir), Ok(()));
}

#[test]
fn an_old_state_directory_is_anchored_once_at_its_first_start() {
    let dir = tempfile::tempdir().unwrap();
    // Files with no anchor in the log: a state directory from before anchors.
    std::fs::write(dir.path().join("customer-keys.pem"), customer::key(1).public().to_pem().unwrap()).unwrap();
    drop(AuditLog::open(dir.path()).unwrap());
    assert_eq!(start_check(dir.path()), Ok(()));
    let anchored = |dir: &Path| actions(dir).iter().filter(|(a, _)| a == "state.pinned_keys").count();
    assert_eq!(anchored(dir.path()), 1);
    assert_eq!(start_check(dir.path()), Ok(()));
    assert_eq!(anchored(dir.path()), 1, "once");
}

fn rotation(previous: &[u8], new: &[u8], signers: &[u8]) -> Vec<u8> {
    let statement = KeyRotationStatement {
        previous_key_ids: key_ids(&customer::public_keys(previous)),
        new_keys: new.iter().map(|n| customer::key(*n).public().to_pem().unwrap()).collect(),
        issued_at: Timestamp::from_unix_millis(NOW),
        reason: "a key left with its admin".into(),
    };
    customer::sign(KEY_ROTATION_PAYLOAD_TYPE, serde_json::to_vec(&statement).unwrap(), signers).to_json().into_bytes()
}

#[test]
fn a_valid_rotation_statement_rotates_the_pinned_keys() {
    let fx = Fx::new(ALL_PHASES);
    let reply = fx.control.rotate_keys(HOST_ADMIN, &rotation(PINNED, &[3, 4], &[1])).unwrap();
    assert_eq!(reply["key_ids"], serde_json::json!(key_ids(&customer::public_keys(&[3, 4]))));
    assert_eq!(key_ids(&fx.control.pinned()), key_ids(&customer::public_keys(&[3, 4])));
    assert_eq!(fx.audited(AuditAction::CustomerKeysRotate).len(), 1);
    // The file and the chain agree: the next start accepts them.
    assert_eq!(start_check(fx.dir.path()), Ok(()));
    // The old keys sign nothing any more, not even the same rotation again.
    let again = fx.control.rotate_keys(HOST_ADMIN, &rotation(PINNED, &[3, 4], &[1]));
    assert!(again.is_err());
    assert!(fx.control.pre_approval_add(HOST_ADMIN, &fx.pre_approval(|_| {})).is_err());
}

#[test]
fn an_under_signed_or_forged_rotation_is_refused_and_changes_nothing() {
    let fx = Fx::new(&ALL_PHASES.replace("serial = 1", "serial = 1\napprovals_required = 2"));
    let before = key_ids(&fx.control.pinned());
    for (what, envelope) in [
        ("one of two signatures", rotation(PINNED, &[3, 4], &[1])),
        ("the vendor's key", rotation(PINNED, &[9, 8], &[9, 8])),
        ("the new keys themselves", rotation(PINNED, &[3, 4], &[3, 4])),
        ("another key set", rotation(&[1, 5], &[3, 4], &[1, 2])),
        ("too few new keys", rotation(PINNED, &[3], &[1, 2])),
        ("not an envelope", b"{}".to_vec()),
    ] {
        let err = fx.control.rotate_keys(HOST_ADMIN, &envelope).unwrap_err().to_string();
        assert!(err.contains("rotation is refused"), "{what}: {err}");
        assert_eq!(key_ids(&fx.control.pinned()), before, "{what}");
        assert!(!fx.dir.path().join("customer-keys.pem").exists(), "{what}");
    }
    let refusals = fx.audited(AuditAction::CustomerKeysRotate);
    assert_eq!(refusals.len(), 6);
    assert!(refusals.iter().all(|r| r["outcome"] == "denied" && r["detail"]["peer"]["uid"] == 1000), "{refusals:?}");
    assert!(fx.control.rotate_keys(HOST_ADMIN, &rotation(PINNED, &[3, 4], &[1, 2])).is_ok());
}
