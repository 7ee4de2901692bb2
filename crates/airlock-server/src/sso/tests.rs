//! The sign-in decisions that need no server: timeouts on an injected clock, MFA evidence, redirects, group mapping.

use std::time::Duration;

use airlock_core::id::{RoleMappingId, SessionId};
use airlock_core::{TenantId, Timestamp, WorkspaceId};

use super::login::{shows_mfa, valid_cli_redirect, valid_return_to};
use super::mappings::roles_for_groups;
use super::sessions::{SessionEnd, SessionLimits, check, due_for_touch, recent_enough};
use crate::authz::{Grants, Role, Target};
use crate::store::{RoleMappingRow, SessionKind, SessionRow, parse_roles, roles_text};

fn session(created: Timestamp, last_seen: Timestamp) -> SessionRow {
    SessionRow {
        id: SessionId::from_random([1; 16]),
        tenant: TenantId::from_random([2; 16]),
        subject: "alice".into(),
        email: None,
        roles: vec![(Role::Viewer, None)],
        kind: SessionKind::Browser,
        auth_time: created,
        created_at: created,
        last_seen_at: last_seen,
        ended_at: None,
    }
}

#[test]
fn a_session_ends_when_idle_or_past_its_absolute_lifetime_on_the_injected_clock() {
    let limits = SessionLimits::default();
    let t0 = Timestamp::from_unix_millis(1_800_000_000_000);
    let s = session(t0, t0);
    assert_eq!(check(&s, limits, t0), Ok(()));
    let almost_idle = t0.saturating_add(limits.idle - Duration::from_millis(1));
    assert_eq!(check(&s, limits, almost_idle), Ok(()));
    assert_eq!(check(&s, limits, t0.saturating_add(limits.idle)), Err(SessionEnd::Idle));
    // Used all along: the absolute lifetime still ends it.
    let late = t0.saturating_add(limits.absolute);
    let busy = session(t0, late.saturating_add(Duration::ZERO));
    assert_eq!(check(&busy, limits, late), Err(SessionEnd::Absolute));
    let mut ended = session(t0, t0);
    ended.ended_at = Some(t0);
    assert_eq!(check(&ended, limits, t0), Err(SessionEnd::Ended));
    // Last use is written at most once a minute.
    assert!(!due_for_touch(&s, t0.saturating_add(Duration::from_secs(59))));
    assert!(due_for_touch(&s, t0.saturating_add(Duration::from_secs(60))));
}

#[test]
fn step_up_counts_the_sign_in_time_with_a_minute_of_leeway() {
    let t0 = Timestamp::from_unix_millis(1_800_000_000_000);
    let max_age = Duration::from_secs(300);
    assert!(recent_enough(t0, max_age, t0.saturating_add(Duration::from_secs(359))));
    assert!(!recent_enough(t0, max_age, t0.saturating_add(Duration::from_secs(360))));
}

#[test]
fn mfa_is_shown_by_amr_or_acr_and_nothing_else() {
    let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
    assert!(shows_mfa(&s(&["pwd", "mfa"]), None));
    assert!(shows_mfa(&s(&["hwk"]), None));
    assert!(shows_mfa(&s(&["pwd"]), Some("http://schemas.openid.net/pape/policies/2007/06/multi-factor")));
    assert!(!shows_mfa(&s(&["pwd"]), None));
    assert!(!shows_mfa(&s(&["pwd"]), Some("urn:airlock:test:pwd")));
    assert!(!shows_mfa(&[], Some("")));
}

#[test]
fn return_paths_stay_on_this_server_and_cli_redirects_on_loopback() {
    for ok in ["/v1/auth/session", "/ui/?x=1"] {
        assert!(valid_return_to(ok), "{ok}");
    }
    for bad in ["https://evil.example/", "//evil.example/", "/\\evil", "", "relative", "/a\nb"] {
        assert!(!valid_return_to(bad), "{bad:?}");
    }
    for ok in ["http://127.0.0.1:5000/callback", "http://[::1]:5000/cb", "http://localhost:9/x"] {
        assert!(valid_cli_redirect(ok), "{ok}");
    }
    for bad in [
        "https://127.0.0.1:5000/callback",
        "http://127.0.0.1/callback",
        "http://evil.example:5000/",
        "http://10.0.0.1:5000/",
        "http://user@127.0.0.1:5000/",
        "nonsense",
    ] {
        assert!(!valid_cli_redirect(bad), "{bad}");
    }
}

#[test]
fn groups_map_to_each_role_once_and_unmapped_groups_to_none() {
    let ws = WorkspaceId::from_random([3; 16]);
    let m = |group: &str, role, workspace| RoleMappingRow {
        id: RoleMappingId::from_random([4; 16]),
        group: group.into(),
        role,
        workspace,
        created_at: Timestamp::from_unix_millis(0),
        created_by: "token:x".into(),
    };
    let mappings = [m("eng", Role::Viewer, None), m("ops", Role::Deployer, Some(ws)), m("eng2", Role::Viewer, None)];
    let groups = |g: &[&str]| g.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
    assert_eq!(
        roles_for_groups(&mappings, &groups(&["eng", "eng2", "ops"])),
        vec![(Role::Viewer, None), (Role::Deployer, Some(ws))]
    );
    assert!(roles_for_groups(&mappings, &groups(&["nobody", "ENG"])).is_empty());
    let roles = vec![(Role::Viewer, None), (Role::Deployer, Some(ws))];
    assert_eq!(parse_roles(&roles_text(&roles)).unwrap(), roles);
}

#[test]
fn a_user_whose_roles_are_all_in_one_workspace_is_confined_to_it() {
    let ws = WorkspaceId::from_random([3; 16]);
    let other = WorkspaceId::from_random([5; 16]);
    let confined = Grants::user(vec![(Role::Deployer, Some(ws)), (Role::Viewer, Some(ws))]);
    assert_eq!(confined.workspace, Some(ws));
    assert_eq!(
        confined.roles_for(Target::Environment("env_x")).count(),
        2,
        "its environments resolve in its workspace"
    );
    let spread = Grants::user(vec![(Role::Deployer, Some(ws)), (Role::Viewer, Some(other))]);
    assert_eq!(spread.workspace, None);
    // An environment's path names no workspace, so a workspace role does not count on one for an unconfined user.
    assert_eq!(spread.roles_for(Target::Environment("env_x")).count(), 0);
    // Nor on an operation or a rollout, whose paths name none either: the gate first confines the user to theirs.
    assert_eq!(spread.roles_for(Target::Operation("op_x")).count(), 0);
    assert_eq!(spread.roles_for(Target::Rollout("rol_x")).count(), 0);
    assert_eq!(confined.roles_for(Target::Operation("op_x")).count(), 2);
    assert_eq!(spread.roles_for(Target::Workspace(&ws.to_string())).collect::<Vec<_>>(), vec![Role::Deployer]);
    let tenant_wide = Grants::user(vec![(Role::Viewer, None), (Role::Deployer, Some(ws))]);
    assert_eq!(tenant_wide.workspace, None);
    assert_eq!(tenant_wide.roles_for(Target::Tenant).collect::<Vec<_>>(), vec![Role::Viewer]);
}
