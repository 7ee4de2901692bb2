//! Scoped API tokens through the real binaries: `airlock token create|list|rotate|revoke` against a real server.
//! A deployer token confined to a workspace does its work and nothing else; rotation keeps the old secret for its
//! grace only; revocation ends the token at the next request; a token cannot be made wider than its maker.
// Test helpers panic to report failure.
#![allow(clippy::unwrap_used)]

use airlock_testkit::e2e::Server;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_airlock");

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn token_create_list_rotate_and_revoke_through_the_cli() {
    let server = Server::start(BIN);
    let env = server.create_env("prod");

    // Created: the secret alone on stdout, recognisable by its prefix.
    let secret = server
        .ok(&[
            "token",
            "create",
            "ci",
            "--role",
            "viewer",
            "--actions",
            "environments:read,workspaces:read",
            "--expires-in",
            "30d",
        ])
        .trim()
        .to_owned();
    assert!(secret.starts_with("airlock_at_"), "{secret}");
    let listed = server.cli_as(&secret, &["env", "list"]);
    assert!(listed.status.success(), "{}", stderr(&listed));
    assert!(String::from_utf8_lossy(&listed.stdout).contains(&env));
    // Outside its actions: refused, saying why.
    let refused = server.cli_as(&secret, &["env", "create", "other"]);
    assert!(!refused.status.success());
    assert!(stderr(&refused).contains("action list"), "{}", stderr(&refused));
    // Not wider than its maker: a viewer manages no tokens.
    let refused = server.cli_as(&secret, &["token", "create", "x", "--role", "viewer", "--expires-in", "1d"]);
    assert!(!refused.status.success());
    assert!(stderr(&refused).contains("HTTP 403"), "{}", stderr(&refused));

    // Listed, never with a secret.
    let list: Vec<Value> = serde_json::from_str(&server.ok(&["token", "list", "--json"])).unwrap();
    assert_eq!(list.len(), 2, "{list:?}");
    assert!(!serde_json::to_string(&list).unwrap().contains("airlock_at_"));
    let ci = list.iter().find(|t| t["name"] == "ci").unwrap();
    let id = ci["id"].as_str().unwrap().to_owned();
    assert_eq!(ci["role"], "viewer");
    let text = server.ok(&["token", "list"]);
    assert!(text.contains(&id) && text.contains("actions: workspaces:read,environments:read"), "{text}");

    // Rotated with no grace: the old secret is refused at once, the new one works.
    let rotated = server.ok(&["token", "rotate", &id]).trim().to_owned();
    assert!(rotated.starts_with("airlock_at_") && rotated != secret);
    let old = server.cli_as(&secret, &["env", "list"]);
    assert!(!old.status.success());
    assert!(stderr(&old).contains("rotated"), "{}", stderr(&old));
    assert!(server.cli_as(&rotated, &["env", "list"]).status.success());

    // Revoked: the next request is refused.
    let out = server.ok(&["token", "revoke", &id]);
    assert!(out.contains("revoked"), "{out}");
    let after = server.cli_as(&rotated, &["env", "list"]);
    assert!(!after.status.success());
    assert!(stderr(&after).contains("revoked"), "{}", stderr(&after));
    // Each step is audited.
    for action in ["token.create", "token.rotate", "token.revoke"] {
        assert_eq!(server.audited(action, "success").len(), 1, "{action}");
    }
    assert!(!server.audited("api.authenticate", "denied").is_empty());
}

#[test]
fn a_workspace_token_lists_its_workspaces_appliances_and_operations_by_naming_it() {
    let server = Server::start(BIN);
    server.create_env("prod");
    let ws = server.workspace.clone();
    let secret = server
        .ok(&["token", "create", "fleet", "--role", "viewer", "--workspace", &ws, "--expires-in", "1d"])
        .trim()
        .to_owned();
    // The tenant's lists are not a workspace token's: it is told to name its workspace.
    for args in [&["appliance", "list"][..], &["op", "list"], &["customer", "approvals", "list"]] {
        let refused = server.cli_as(&secret, args);
        assert!(!refused.status.success(), "{args:?}");
        let why = stderr(&refused);
        assert!(why.contains("HTTP 403") && why.contains("`workspace`"), "{args:?}: {why}");
    }
    // Naming it, it lists its own.
    for args in [
        &["appliance", "list", "--workspace", &ws, "--json"][..],
        &["op", "list", "--workspace", &ws, "--json"],
        &["customer", "approvals", "list", "--workspace", &ws, "--json"],
    ] {
        let listed = server.cli_as(&secret, args);
        assert!(listed.status.success(), "{args:?}: {}", stderr(&listed));
    }
    // A value that would add a parameter is refused before anything is sent.
    let bad = server.cli_as(&secret, &["op", "list", "--workspace", &format!("{ws}&state=approved")]);
    assert!(!bad.status.success());
    assert!(stderr(&bad).contains("not a valid workspace"), "{}", stderr(&bad));
}
