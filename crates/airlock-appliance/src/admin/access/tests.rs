//! Who the admin socket admits, decided on peers with any uid, gid and groups.

use super::*;

const OWNER: u32 = 998;
const ADMINS: u32 = 990;

fn admins() -> Group {
    Group { gid: ADMINS, name: Some("airlock-admins".into()) }
}

fn peer(uid: u32, gid: u32, groups: Groups) -> PeerCred {
    PeerCred { uid, gid, pid: Some(4242), groups, boxed: Boxed::Outside }
}

#[test]
fn the_appliance_user_and_root_are_admitted_whatever_their_groups() {
    for access in [AdminAccess::new(OWNER, None), AdminAccess::new(OWNER, Some(admins()))] {
        for uid in [OWNER, 0] {
            let unreadable = peer(uid, 5, Groups::Unreadable("gone".into()));
            assert_eq!(admit(&unreadable, &access), Ok(Peer { uid, pid: Some(4242) }));
        }
    }
    // A peer in another PID namespace has no process to look at: it cannot be told apart from
    // vendor code, so even the appliance's own uid is refused.
    let far = PeerCred {
        pid: None,
        boxed: Boxed::Unknown("another PID namespace".into()),
        ..peer(OWNER, OWNER, Groups::NotRead)
    };
    assert!(matches!(admit(&far, &AdminAccess::new(OWNER, None)), Err(Refusal::Unidentified(_))));
}

#[test]
fn another_uid_is_refused_and_told_how_to_allow_a_group() {
    let access = AdminAccess::new(OWNER, None);
    // Even in a group called admin, or with the appliance's gid: with no admin group
    // configured, only the uid counts.
    let why = admit(&peer(1000, OWNER, Groups::NotRead), &access).unwrap_err();
    assert_eq!(why, Refusal::NotAllowed { uid: 1000, owner: OWNER, group: None });
    let text = why.to_string();
    assert!(text.contains("uid 1000 may not use") && text.contains("--admin-group"), "{text}");
}

#[test]
fn admin_group_members_are_admitted_by_primary_or_supplementary_group() {
    let access = AdminAccess::new(OWNER, Some(admins()));
    let admitted = Ok(Peer { uid: 1000, pid: Some(4242) });
    assert_eq!(admit(&peer(1000, ADMINS, Groups::Read(vec![])), &access), admitted);
    assert_eq!(admit(&peer(1000, 100, Groups::Read(vec![27, ADMINS])), &access), admitted);
    // A primary-group member needs no supplementary groups read.
    assert_eq!(admit(&peer(1000, ADMINS, Groups::Unreadable("gone".into())), &access), admitted);
}

#[test]
fn a_non_member_is_refused_and_told_which_group_admits() {
    let access = AdminAccess::new(OWNER, Some(admins()));
    let why = admit(&peer(1000, 100, Groups::Read(vec![27, 991])), &access).unwrap_err();
    assert_eq!(why, Refusal::NotAllowed { uid: 1000, owner: OWNER, group: Some(admins()) });
    let text = why.to_string();
    assert!(text.contains("`airlock-admins` (gid 990)") && text.contains("usermod -aG airlock-admins"), "{text}");
}

#[test]
fn unknown_groups_refuse_a_peer_that_needs_them() {
    let access = AdminAccess::new(OWNER, Some(admins()));
    for groups in [Groups::Unreadable("its process is no longer the one that connected".into()), Groups::NotRead] {
        let why = admit(&peer(1000, 100, groups), &access).unwrap_err();
        assert!(matches!(why, Refusal::GroupsUnknown { uid: 1000, .. }), "{why}");
    }
}

const STATUS: &str = "Name:\tairlock\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t4242\nPid:\t4242\nUid:\t1000\t1000\t1000\t1000\nGid:\t100\t100\t100\t100\nFDSize:\t64\nGroups:\t27 990 \nNStgid:\t4242\n";

#[test]
fn groups_are_read_only_from_the_process_that_connected() {
    assert_eq!(parse_status(STATUS, 1000, 100), Ok(vec![27, 990]));
    assert_eq!(parse_status(&STATUS.replace("Groups:\t27 990 ", "Groups:\t"), 1000, 100), Ok(vec![]));
    // The pid now belongs to another user's process, or one of another group: not the peer.
    for (uid, gid) in [(1001, 100), (1000, 101)] {
        assert!(parse_status(STATUS, uid, gid).unwrap_err().contains("no longer the one"));
    }
    // The real uid alone does not count: the kernel reports the effective one.
    let setuid = STATUS.replace("Uid:\t1000\t1000", "Uid:\t1000\t0");
    assert!(parse_status(&setuid, 1000, 100).is_err());
    assert!(parse_status(&STATUS.replace("Groups:", "Grps:"), 1000, 100).is_err());
    assert!(parse_status(&STATUS.replace("990", "x"), 1000, 100).is_err());
}

#[test]
fn admin_group_names_resolve_through_the_group_database() {
    let root = AdminAccess::resolve(Some(&AdminGroup::Name("root".into()))).unwrap();
    assert_eq!(root.group_gid(), Some(0));
    let by_gid = AdminAccess::resolve(Some(&AdminGroup::Gid(0))).unwrap();
    assert_eq!(by_gid.group, Some(Group { gid: 0, name: Some("root".into()) }));
    // A gid the database does not name is still a gid.
    let unnamed = AdminAccess::resolve(Some(&AdminGroup::Gid(4_000_000))).unwrap();
    assert_eq!(unnamed.group, Some(Group { gid: 4_000_000, name: None }));
    let err = AdminAccess::resolve(Some(&AdminGroup::Name("airlock-no-such-group".into()))).unwrap_err();
    assert!(err.to_string().contains("groupadd airlock-no-such-group"), "{err}");
    assert_eq!(AdminAccess::resolve(None).unwrap().group_gid(), None);
}

#[test]
fn vendor_code_is_refused_whatever_its_uid() {
    for access in [AdminAccess::new(OWNER, None), AdminAccess::new(OWNER, Some(admins()))] {
        for (uid, gid) in [(OWNER, OWNER), (0, 0), (1000, ADMINS)] {
            let boxed = PeerCred { boxed: Boxed::Inside, ..peer(uid, gid, Groups::Read(vec![ADMINS])) };
            assert_eq!(admit(&boxed, &access), Err(Refusal::VendorCode { uid }));
            // A process gone before it could be looked at may have been vendor code that
            // handed its connection on.
            let gone = PeerCred { boxed: Boxed::Unknown("exited".into()), ..peer(uid, gid, Groups::NotRead) };
            assert!(matches!(admit(&gone, &access), Err(Refusal::Unidentified(_))));
        }
    }
}
