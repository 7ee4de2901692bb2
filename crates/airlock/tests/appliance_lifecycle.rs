//! End to end: a real control plane process and real appliance processes over loopback mTLS.
// Test helpers panic to report failure.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use airlock_testkit::e2e;
use airlock_testkit::e2e::{Server, credentials, gateway_handshake};
use airlock_testkit::process::{listening_sockets, wait_for};

/// The binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_airlock");

#[test]
fn appliance_joins_and_reports_status() {
    let server = Server::start(BIN);
    let state = server.dir.path().join("apl");
    let (proc, id) = server.joined_appliance(&state);
    let a = server.appliance(&id);
    assert_eq!(a["connected"], true);
    assert_eq!(a["revoked"], false);
    assert_eq!(a["version"], env!("CARGO_PKG_VERSION"));
    assert!(a["last_heartbeat"].is_string(), "{a}");
    assert_eq!(a["cert_serial"].as_str().unwrap().len(), 32, "{a}");
    // Default lifetime is 30 days.
    let not_after = a["cert_not_after"].as_str().unwrap();
    assert!(not_after > "2026-", "{not_after}");

    // The private key never left the state directory, which only its owner can read.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&state.join("credentials.pem")), 0o600);
    assert_eq!(mode(&state), 0o700);
    let (_, key) = credentials(&state);
    let key_body: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
    assert!(!server.log().contains(&key_body[..40]));
    assert!(!proc.log().contains(&key_body[..40]));

    // The certificate names tenant, environment and appliance in a SPIFFE URI.
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join("appliance.json")).unwrap()).unwrap();
    let identity = meta["identity"].as_str().unwrap();
    assert!(identity.starts_with(&format!("spiffe://airlock.test/tenant/{}/env/env_", server.tenant)), "{identity}");
    assert!(identity.ends_with(&format!("/appliance/{id}")), "{identity}");

    let out = server.audit_verify();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn join_token_reuse_fails_with_clear_error() {
    let server = Server::start(BIN);
    let env = server.create_env("prod");
    let token = server.join_token(&env);
    let mut first = server.appliance_proc(&server.dir.path().join("a1"), Some(&token), None);
    server.wait_connected(&mut first);
    let mut second = server.appliance_proc(&server.dir.path().join("a2"), Some(&token), None);
    let status = wait_for(Duration::from_secs(20), "second appliance to give up", || second.exited());
    assert!(!status.success());
    assert!(second.log().contains("already used"), "{}", second.log());
    assert_eq!(server.appliances().len(), 1);
}

#[test]
fn appliance_refuses_control_plane_with_other_ca() {
    let server = Server::start(BIN);
    let env = server.create_env("prod");
    let token = server.join_token(&env);
    let wrong = format!("sha256:{}", "ab".repeat(32));
    let mut proc = server.appliance_proc(&server.dir.path().join("a"), Some(&token), Some(&wrong));
    let status = wait_for(Duration::from_secs(20), "appliance to refuse", || proc.exited());
    assert!(!status.success());
    assert!(proc.log().contains("does not include the pinned CA"), "{}", proc.log());
    // Nothing reached the control plane: the token is still good.
    assert!(server.appliances().is_empty());
    let mut ok = server.appliance_proc(&server.dir.path().join("b"), Some(&token), None);
    server.wait_connected(&mut ok);
}

#[test]
fn gateway_refuses_certificate_from_another_ca() {
    let server = Server::start(BIN);
    let state = server.dir.path().join("apl");
    let (_proc, id) = server.joined_appliance(&state);
    // A look-alike CA issues a certificate naming the very same identity.
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join("appliance.json")).unwrap()).unwrap();
    let identity = meta["identity"].as_str().unwrap().to_owned();
    let rogue_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::default();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "Airlock CA airlock.test");
    let rogue_ca = ca_params.self_signed(&rogue_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, rogue_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let mut leaf = rcgen::CertificateParams::default();
    leaf.subject_alt_names = vec![rcgen::SanType::URI(identity.try_into().unwrap())];
    leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();
    let _ = rogue_ca;

    let err = gateway_handshake(&server.gateway, &e2e::ca_pem(&state), &leaf_cert.pem(), &leaf_key.serialize_pem())
        .expect_err("a foreign CA's certificate must be refused");
    assert!(err.contains("UnknownCA") || err.contains("unknown"), "{err}");
    // The real credentials still work, and the refusal is audited.
    let (cert, key) = credentials(&state);
    gateway_handshake(&server.gateway, &e2e::ca_pem(&state), &cert, &key).unwrap();
    let rejected = wait_for(Duration::from_secs(5), "rejected handshake in the audit", || {
        let r = server.audited("gateway.handshake_rejected", "denied");
        (!r.is_empty()).then_some(r)
    });
    assert_eq!(rejected[0]["chain"], "system");
    assert_eq!(rejected[0]["detail"]["reason"], "unknown_issuer", "{rejected:?}");
    assert!(server.appliance(&id)["connected"] == true);
}

#[test]
fn expired_certificate_is_refused_at_handshake() {
    let server = Server::start_with(BIN, &["--appliance-cert-lifetime", "3s"]);
    let state = server.dir.path().join("apl");
    let (_proc, _id) = server.joined_appliance(&state);
    let (cert, key) = credentials(&state);
    let ca = e2e::ca_pem(&state);
    gateway_handshake(&server.gateway, &ca, &cert, &key).unwrap();
    std::thread::sleep(Duration::from_millis(4200));
    let err = gateway_handshake(&server.gateway, &ca, &cert, &key).expect_err("expired certificate must be refused");
    assert!(err.contains("CertificateExpired") || err.contains("expired"), "{err}");
}

#[test]
fn appliance_rotates_certificate_twice_with_new_keys() {
    let server = Server::start_with(BIN, &["--appliance-cert-lifetime", "6s"]);
    let state = server.dir.path().join("apl");
    let (proc, id) = server.joined_appliance(&state);
    // Read from the appliance's own state: the server records a renewal before the appliance has its answer.
    let (first_cert, first_key) = credentials(&state);
    let mut certs = vec![first_cert];
    let mut keys = vec![first_key];
    wait_for(Duration::from_secs(20), "two rotations", || {
        let (cert, key) = credentials(&state);
        if !certs.contains(&cert) {
            certs.push(cert);
            keys.push(key);
        }
        (certs.len() >= 3).then_some(())
    });
    let distinct_keys: std::collections::HashSet<_> = keys.iter().collect();
    assert_eq!(distinct_keys.len(), keys.len(), "each rotation must use a new key pair");
    assert!(proc.log().matches("certificate renewed").count() >= 2, "{}", proc.log());
    let renewals = server.audited("appliance.certificate_renew", "success");
    assert!(renewals.len() >= 2, "{renewals:?}");
    assert_eq!(renewals[0]["chain"], server.tenant);
    assert_eq!(renewals[1]["detail"]["previous_serial"], renewals[0]["detail"]["serial"]);
    // The appliance outlives its first certificates and stays connected on the renewed one.
    wait_for(Duration::from_secs(10), "appliance connected after rotations", || {
        (server.appliance(&id)["connected"] == true).then_some(())
    });
    let out = server.audit_verify();
    assert!(out.status.success());
}

#[test]
fn revocation_closes_stream_within_a_second_and_sticks() {
    let server = Server::start(BIN);
    let state = server.dir.path().join("apl");
    let (mut proc, id) = server.joined_appliance(&state);
    let (cert, key) = credentials(&state);
    let out = server.cli(&["appliance", "revoke", &id]);
    let revoked_at = Instant::now();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let status = wait_for(Duration::from_secs(5), "appliance to stop", || proc.exited());
    let elapsed = revoked_at.elapsed();
    assert!(elapsed < Duration::from_secs(1), "stream closed after {elapsed:?}");
    assert!(!status.success());
    assert!(proc.log().contains("revoked"), "{}", proc.log());
    let a = server.appliance(&id);
    assert_eq!(a["revoked"], true);
    assert_eq!(a["connected"], false);

    // Every later handshake with that certificate is refused, even by a fresh client.
    let err = gateway_handshake(&server.gateway, &e2e::ca_pem(&state), &cert, &key).expect_err("revoked");
    assert!(err.contains("CertificateRevoked") || err.contains("revoked"), "{err}");
    // The refusal is audited in the tenant's own chain: the certificate chained to our CA.
    let rejected = wait_for(Duration::from_secs(5), "revoked handshake in the tenant audit", || {
        let r: Vec<_> = server
            .audited("gateway.handshake_rejected", "denied")
            .into_iter()
            .filter(|r| r["chain"] == server.tenant.as_str() && r["detail"]["reason"] == "revoked")
            .collect();
        (!r.is_empty()).then_some(r)
    });
    assert_eq!(rejected[0]["target"], id.as_str());
    assert_eq!(server.audited("appliance.revoke", "success").len(), 1);
    // The appliance does not retry on the revoked identity.
    let mut again = server.appliance_proc(&state, None, None);
    let status = wait_for(Duration::from_secs(10), "restarted appliance to refuse", || again.exited());
    assert!(!status.success());
    assert!(again.log().contains("revoked"), "{}", again.log());

    // Revocation survives a control plane restart.
    let mut server = server;
    server.stop();
    server.launch(&[]);
    let err = gateway_handshake(&server.gateway, &e2e::ca_pem(&state), &cert, &key).expect_err("still revoked");
    assert!(err.contains("CertificateRevoked") || err.contains("revoked"), "{err}");
}

#[test]
fn appliance_revoked_while_offline_stops_at_handshake() {
    let server = Server::start(BIN);
    let state = server.dir.path().join("apl");
    let (mut proc, id) = server.joined_appliance(&state);
    assert!(proc.stop().success());
    server.ok(&["appliance", "revoke", &id]);
    // No revocation marker was written: only the gateway's TLS alert can tell it.
    assert!(!state.join("REVOKED").exists());
    let mut again = server.appliance_proc(&state, None, None);
    let status = wait_for(Duration::from_secs(20), "appliance to stop", || again.exited());
    assert!(!status.success());
    assert!(again.log().contains("revoked by the control plane"), "{}", again.log());
    assert_eq!(
        again.log().matches("connection to control plane lost").count(),
        0,
        "it must not retry: {}",
        again.log()
    );
}

#[test]
fn appliance_restarts_without_rejoining() {
    let server = Server::start(BIN);
    let state = server.dir.path().join("apl");
    let (mut proc, id) = server.joined_appliance(&state);
    assert!(proc.stop().success());
    wait_for(Duration::from_secs(10), "control plane to see the appliance leave", || {
        (server.appliance(&id)["connected"] == false).then_some(())
    });
    let mut again = server.appliance_proc(&state, None, None);
    let id_again = server.wait_connected(&mut again);
    assert_eq!(id, id_again);
    assert_eq!(server.appliances().len(), 1);
}

#[test]
fn appliance_reconnects_after_control_plane_restart() {
    let mut server = Server::start(BIN);
    let state = server.dir.path().join("apl");
    let (proc, id) = server.joined_appliance(&state);
    let before = proc.log().matches("connected to control plane").count();
    server.stop();
    // The restarted server binds new ports; the appliance keeps dialling the old gateway, so
    // restart on the same ports as before.
    let gateway = server.gateway.clone();
    let api_port = server.url.rsplit(':').next().unwrap().to_owned();
    server.launch(&["--listen", &format!("127.0.0.1:{api_port}"), "--gateway-listen", &gateway]);
    wait_for(Duration::from_secs(30), "appliance to reconnect", || {
        (proc.log().matches("connected to control plane").count() > before).then_some(())
    });
    assert!(proc.log().contains("control plane shutting down"), "{}", proc.log());
    wait_for(Duration::from_secs(10), "API to show it connected", || {
        (server.appliance(&id)["connected"] == true).then_some(())
    });
}

#[test]
fn appliance_never_listens_on_a_network_socket() {
    let server = Server::start(BIN);
    let (proc, _id) = server.joined_appliance(&server.dir.path().join("apl"));
    assert!(airlock_testkit::process::count_tcp_sockets(proc.pid()) >= 1);
    let listening = listening_sockets(proc.pid());
    assert!(listening.is_empty(), "appliance listens on {listening:?}");
    // The check can fail: the server process does listen.
    assert!(!listening_sockets(server.proc.as_ref().unwrap().pid()).is_empty());
}

#[test]
fn appliance_runs_from_a_toml_config_file() {
    let server = Server::start(BIN);
    let env = server.create_env("prod");
    let token = server.join_token(&env);
    let state = server.dir.path().join("apl");
    let config = server.dir.path().join("appliance.toml");
    std::fs::write(
        &config,
        format!(
            "control_plane = \"{}\"\nca_fingerprint = \"{}\"\njoin_token = \"{token}\"\nstate_dir = \"{}\"\n",
            server.url,
            server.fingerprint,
            state.display()
        ),
    )
    .unwrap();
    let mut cmd = std::process::Command::new(BIN);
    cmd.args(["appliance", "run", "--config"]).arg(&config);
    let mut proc = airlock_testkit::process::Proc::spawn(cmd, server.dir.path().join("toml-appliance.log"));
    server.wait_connected(&mut proc);

    // A typo in a security setting stops startup.
    std::fs::write(&config, format!("control_plane = \"{}\"\nca_fingerprnt = \"x\"\n", server.url)).unwrap();
    let out = std::process::Command::new(BIN).args(["appliance", "run", "--config"]).arg(&config).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn second_server_on_the_same_data_dir_is_refused() {
    let server = Server::start(BIN);
    let out = std::process::Command::new(BIN)
        .args(["server", "--data-dir"])
        .arg(&server.data_dir)
        .args(["--listen", "127.0.0.1:0", "--gateway-listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already using"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn old_certificate_keeps_working_until_it_expires() {
    let server = Server::start_with(BIN, &["--appliance-cert-lifetime", "12s"]);
    let state = server.dir.path().join("apl");
    let (_proc, id) = server.joined_appliance(&state);
    let first_serial = server.appliance(&id)["cert_serial"].as_str().unwrap().to_owned();
    let (old_cert, old_key) = credentials(&state);
    // The server records the new serial before the appliance has written its new certificate: wait for both.
    wait_for(Duration::from_secs(15), "first rotation", || {
        (server.appliance(&id)["cert_serial"].as_str() != Some(&first_serial) && credentials(&state).0 != old_cert)
            .then_some(())
    });
    assert_ne!(credentials(&state).0, old_cert);
    gateway_handshake(&server.gateway, &e2e::ca_pem(&state), &old_cert, &old_key)
        .expect("the certificate before rotation is still valid until it expires");
}

#[test]
fn heartbeats_advance_last_heartbeat() {
    let server = Server::start_with(BIN, &["--heartbeat-interval", "1s"]);
    let (_proc, id) = server.joined_appliance(&server.dir.path().join("apl"));
    let first = server.appliance(&id)["last_heartbeat"].as_str().unwrap().to_owned();
    let later = wait_for(Duration::from_secs(10), "a later heartbeat", || {
        let now = server.appliance(&id)["last_heartbeat"].as_str().unwrap().to_owned();
        (now > first).then_some(now)
    });
    assert!(later > first);
    assert_eq!(server.appliance(&id)["healthy"], true);
}

#[test]
fn appliance_retries_join_until_the_control_plane_is_reachable() {
    let mut server = Server::start(BIN);
    let env = server.create_env("prod");
    let token = server.join_token(&env);
    let gateway = server.gateway.clone();
    let api_port = server.url.rsplit(':').next().unwrap().to_owned();
    server.stop();

    let state = server.dir.path().join("apl");
    let mut proc = server.appliance_proc(&state, Some(&token), None);
    wait_for(Duration::from_secs(20), "appliance to retry its join", || {
        proc.log().contains("cannot reach the control plane to join").then_some(())
    });
    // Its key is already on disk, private, before any answer came back.
    use std::os::unix::fs::PermissionsExt;
    let pending = state.join("join-key.pem");
    assert_eq!(std::fs::metadata(&pending).unwrap().permissions().mode() & 0o777, 0o600);

    server.launch(&["--listen", &format!("127.0.0.1:{api_port}"), "--gateway-listen", &gateway]);
    server.wait_connected(&mut proc);
    assert!(!pending.exists(), "the pending key becomes the enrolled key");
    assert_eq!(server.appliances().len(), 1);
}

#[test]
fn second_appliance_on_the_same_state_dir_is_refused() {
    let server = Server::start(BIN);
    let state = server.dir.path().join("apl");
    let (_first, _id) = server.joined_appliance(&state);
    let mut second = server.appliance_proc(&state, None, None);
    let status = wait_for(Duration::from_secs(10), "second appliance to refuse", || second.exited());
    assert!(!status.success());
    assert!(second.log().contains("already using state directory"), "{}", second.log());
}
