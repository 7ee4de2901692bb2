//! Certificate renewal, expiry offline and recovery (issue 16) under one clock the test moves by
//! hand, instead of certificates of seconds and sleeps past their end: the control plane
//! (`airlock_server::serve` with a `ManualClock`, by which rustls also checks client certificates)
//! and the appliance (`airlock_appliance::run_with_clock`) run in this test's process, on the same
//! clock. Operators, customers and the appliance's host use the real CLI, as in the other
//! end-to-end tests; Kubernetes tokens come from the test kit's issuer.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use airlock_appliance::{ApplianceConfig, ApplianceError, TimeSource};
use airlock_server::clock::{Clock, ManualClock, SystemClock};
use airlock_testkit::e2e::{Server, ok, run, sign_policy};
use airlock_testkit::process::wait_for;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_airlock");

/// A control plane in this process on a clock the test moves, and the CLI's view of it.
struct InProcess {
    clock: Arc<ManualClock>,
    server: Option<airlock_server::RunningServer>,
    /// The test kit's handle on a server, without a process: its CLI helpers talk to `server`.
    cli: Server,
    rt: tokio::runtime::Runtime,
}

/// An appliance running in this process.
struct Running {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), ApplianceError>>,
}

impl InProcess {
    /// `airlock server init`'s work, then the server on loopback, configured by `configure`.
    fn start(configure: impl FnOnce(&mut airlock_server::ServerConfig)) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        let clock = ManualClock::new(SystemClock.now());
        let kek = airlock_server::keys::KekSource::default_for(&data_dir);
        let boot =
            rt.block_on(airlock_server::init(&data_dir, &kek, "airlock.test", "acme", "default", &*clock)).unwrap();
        let mut cfg = airlock_server::ServerConfig::new(data_dir.clone());
        cfg.api_listen = "127.0.0.1:0".parse().unwrap();
        cfg.gateway_listen = "127.0.0.1:0".parse().unwrap();
        cfg.hostnames = vec!["127.0.0.1".into()];
        cfg.heartbeat_interval = Duration::from_secs(1);
        cfg.clock = clock.clone();
        configure(&mut cfg);
        let server = rt.block_on(airlock_server::serve(cfg)).unwrap();
        let cli = Server {
            bin: BIN.to_owned(),
            dir,
            data_dir,
            proc: None,
            url: server.api_url(),
            gateway: server.gateway_endpoint.clone(),
            fingerprint: boot.ca_fingerprint.to_string(),
            token: boot.admin_token.expose().to_owned(),
            workspace: boot.workspace.to_string(),
            tenant: boot.tenant.to_string(),
            nofile: None,
        };
        Self { clock, server: Some(server), cli, rt }
    }

    /// An appliance's configuration, joining with `join_token` if given.
    fn appliance_config(&self, state: &Path, join_token: Option<&str>) -> ApplianceConfig {
        use airlock_core::token::{Secret, TokenKind};
        ApplianceConfig {
            control_plane: self.cli.url.clone(),
            ca_fingerprint: self.cli.fingerprint.parse().unwrap(),
            join_token: join_token.map(|t| Secret::parse(TokenKind::Join, t).unwrap()),
            platform_join: None,
            join_environment: None,
            // A platform join pins its tenant; a token join may name it too.
            join_tenant: Some(self.cli.tenant.parse().unwrap()),
            state_dir: state.to_owned(),
            max_backoff: Duration::from_secs(1),
            customer_keys: Vec::new(),
            policy: None,
            admin_group: None,
            box_user: None,
            audit_checkpoints: None,
            secrets: Default::default(),
            releases_dir: None,
            dependencies: Default::default(),
            box_disk: Default::default(),
        }
    }

    /// Starts an appliance on this test's clock.
    fn run(&self, config: ApplianceConfig) -> Running {
        let clock = self.clock.clone();
        let time = TimeSource::manual(move || clock.now());
        let (stop, rx) = tokio::sync::watch::channel(false);
        let task = self.rt.spawn(airlock_appliance::run_with_clock(config, time, rx));
        Running { stop, task }
    }

    /// Runs an appliance that is expected to stop on its own; its result.
    fn run_to_end(&self, config: ApplianceConfig) -> Result<(), ApplianceError> {
        let Running { stop: _stop, task } = self.run(config);
        self.rt.block_on(async { tokio::time::timeout(Duration::from_secs(30), task).await }).unwrap().unwrap()
    }

    fn stop(&self, appliance: Running) {
        let _ = appliance.stop.send(true);
        let ended = self.rt.block_on(async { tokio::time::timeout(Duration::from_secs(20), appliance.task).await });
        ended.unwrap().unwrap().unwrap();
    }

    /// Waits until the API shows an appliance of `env` connected; its id.
    fn wait_connected(&self, env: &str, appliance: &Running) -> String {
        wait_for(Duration::from_secs(30), "the appliance to connect", || {
            assert!(!appliance.task.is_finished(), "the appliance stopped before connecting");
            self.cli.appliances().into_iter().find(|a| a["environment_id"] == env && a["connected"] == true)
        })["id"]
            .as_str()
            .unwrap()
            .to_owned()
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            self.rt.block_on(server.shutdown());
        }
    }
}

fn recovered_joins(cli: &Server, id: &str) -> Vec<Value> {
    let joins = cli.audited("appliance.join", "success");
    joins.into_iter().filter(|r| r["target"] == id && r["detail"]["recovered_serial"].is_string()).collect()
}

const POLICY: &str = r#"
version = 1
serial = 1
phases = ["observe", "deploy", "operate"]
"#;

/// The customer's side of an appliance: its keys, the policy they signed, templates and requests
/// through the CLI.
struct Customer<'a> {
    cli: &'a Server,
    env: String,
    state: PathBuf,
    keys: PathBuf,
}

impl Customer<'_> {
    fn key(&self) -> String {
        self.keys.join("customer.key").to_str().unwrap().to_owned()
    }

    fn local(&self, args: &[&str]) -> String {
        let mut full = args.to_vec();
        full.extend(["--state-dir", self.state.to_str().unwrap()]);
        ok(run(BIN, &full), &args.join(" "))
    }

    fn template_dir(&self, name: &str) -> PathBuf {
        let dir = self.cli.dir.path().join(format!("template-{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn push_template(&self, name: &str, script: &str) {
        let dir = self.template_dir(name);
        std::fs::write(
            dir.join("template.toml"),
            format!(
                "name = \"{name}\"\ndescription = \"test {name}\"\nphase = \"operate\"\ndata_tags = [\"service:{name}\"]\n\
                 body = \"run.sh\"\n\n[[variables]]\nname = \"name\"\npattern = \"[a-zA-Z0-9/._-]+\"\n"
            ),
        )
        .unwrap();
        std::fs::write(dir.join("run.sh"), script).unwrap();
        self.cli.ok(&["template", "push", dir.to_str().unwrap()]);
    }

    fn request(&self, template: &str, name: &str) -> String {
        let var = format!("name={name}");
        let out = self.cli.ok(&["op", "request", &self.env, template, "--var", &var, "--reason", "clock test"]);
        out.lines().next().unwrap().trim().to_owned()
    }

    fn show(&self, id: &str) -> Value {
        serde_json::from_str(&self.cli.ok(&["op", "show", id])).unwrap()
    }

    fn wait_state(&self, id: &str, state: &str) {
        wait_for(Duration::from_secs(30), &format!("operation {id} to be {state}"), || {
            (self.show(id)["state"] == state).then_some(())
        });
    }

    /// The appliance's own audit records of `action`.
    fn audited(&self, action: &str) -> Vec<Value> {
        let log = std::fs::read_to_string(self.state.join("audit.jsonl")).unwrap();
        log.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()).filter(|r| r["action"] == action).collect()
    }
}

/// The certificate of an appliance expires while it is offline; it comes back with a new join
/// token of its environment as itself, and keeps its audit chain, its execution chain and its
/// pre-approval counters. Without a way to join, or with another environment's token, it cannot;
/// once revoked, never. Nothing here waits for a certificate's end: the clock is moved past it.
#[test]
fn an_appliance_whose_certificate_expired_offline_recovers_its_identity_and_chains() {
    let plane = InProcess::start(|cfg| cfg.appliance_cert_lifetime = Duration::from_secs(3600));
    let cli = &plane.cli;
    let tmp = cli.dir.path().to_owned();
    let keys = tmp.join("customer");
    ok(run(BIN, &["customer", "keygen", "--out", keys.to_str().unwrap()]), "keygen");
    let signed_policy = tmp.join("policy.json");
    sign_policy(BIN, POLICY, &keys, &signed_policy);
    let env = cli.create_env("prod");
    let state = tmp.join("apl");
    let customer = Customer { cli, env: env.clone(), state: state.clone(), keys: keys.clone() };
    let with_customer = |token: Option<&str>| ApplianceConfig {
        customer_keys: vec![keys.join("customer.pub")],
        policy: Some(signed_policy.clone()),
        ..plane.appliance_config(&state, token)
    };

    let appliance = plane.run(with_customer(Some(&cli.join_token(&env))));
    let id = plane.wait_connected(&env, &appliance);
    customer.local(&["customer", "attest-appliance", "--key", &customer.key()]);
    wait_for(Duration::from_secs(30), "the control plane to learn the execution key attestation", || {
        cli.appliance(&id)["execution_key"].as_str().map(|_| ())
    });
    customer.push_template("greet", "#!/bin/sh\necho \"hello $AIRLOCK_VAR_NAME\"\n");
    // A pre-approval of two runs; one is used before the certificate expires.
    let pre = tmp.join("pre.json");
    let template_dir = customer.template_dir("greet");
    let preapprove = [
        "customer",
        "preapprove",
        "--appliance",
        &id,
        "--template-dir",
        template_dir.to_str().unwrap(),
        "--max-runs",
        "2",
        "--constrain",
        "name=world|moon",
        "--key",
        &customer.key(),
        "--out",
        pre.to_str().unwrap(),
    ];
    ok(run(BIN, &preapprove), "preapprove");
    customer.local(&["appliance", "preapproval", "add", pre.to_str().unwrap()]);
    // Signed on the customer's (wall) clock, which has run on since the test's clock was set.
    plane.clock.advance(Duration::from_secs(60));
    let before = customer.request("greet", "world");
    customer.wait_state(&before, "executed");

    // Offline past its certificate's end.
    plane.stop(appliance);
    plane.clock.advance(Duration::from_secs(2 * 3600));
    let appliances_before = cli.appliances().len();

    // Without a way to join, the expiry is the error, and says how to recover.
    let stuck = plane.run_to_end(with_customer(None)).unwrap_err();
    assert!(matches!(stuck, ApplianceError::CertificateExpired(_)), "{stuck}");
    assert!(stuck.to_string().contains("to recover its identity"), "{stuck}");
    // A join token of another environment does not recover it, and is not spent.
    let elsewhere = cli.create_env("elsewhere");
    let wrong = plane.run_to_end(with_customer(Some(&cli.join_token(&elsewhere)))).unwrap_err();
    assert!(wrong.to_string().contains("another environment"), "{wrong}");
    let refused = cli.audited("appliance.join", "denied");
    assert!(refused.iter().any(|r| r["detail"]["code"] == "recovery_other_environment"), "{refused:#?}");

    // With a new join token of its environment, it joins again as itself.
    let appliance = plane.run(with_customer(Some(&cli.join_token(&env))));
    assert_eq!(plane.wait_connected(&env, &appliance), id, "the appliance id is kept");
    assert_eq!(cli.appliances().len(), appliances_before, "no new appliance");
    assert_eq!(recovered_joins(cli, &id).len(), 1, "the recovery is audited as one");

    // The pre-approval's second run executes without a customer signature; a third is not
    // covered: the counter was not reset by the recovery.
    let after = customer.request("greet", "moon");
    customer.wait_state(&after, "executed");
    let beyond = customer.request("greet", "world");
    // `awaiting_approval` is where every request starts: wait for the appliance's own decision.
    wait_for(Duration::from_secs(30), "the appliance to decide on the third run", || {
        customer.audited("operation.awaiting_approval").into_iter().find(|r| r.to_string().contains(&beyond))
    });
    assert_eq!(customer.show(&beyond)["state"], "awaiting_approval");
    assert_eq!(customer.audited("operation.executed").len(), 2, "two pre-approved runs in all");

    // The execution after the recovery links to the one before it, and both verify as a chain.
    let (m1, m2) = (tmp.join("before.json"), tmp.join("after.json"));
    std::fs::write(&m1, cli.ok(&["op", "manifest", &before])).unwrap();
    std::fs::write(&m2, cli.ok(&["op", "manifest", &after])).unwrap();
    let (ca, pubkey) = (state.join("ca.pem"), keys.join("customer.pub"));
    let verify = |first: &Path, second: &Path| {
        let args = [
            "verify",
            first.to_str().unwrap(),
            second.to_str().unwrap(),
            "--customer-key",
            pubkey.to_str().unwrap(),
            "--ca",
            ca.to_str().unwrap(),
            "--policy",
            signed_policy.to_str().unwrap(),
        ];
        run(BIN, &args)
    };
    let out = ok(verify(&m1, &m2), "verify the chain across the recovery");
    assert!(out.contains(&before) && out.contains(&after), "{out}");
    let reversed = verify(&m2, &m1);
    assert!(!reversed.status.success(), "the order is part of the chain");
    plane.stop(appliance);

    // Its own audit chain runs on unbroken across the expiry.
    ok(run(BIN, &["audit", "verify", "--file", state.join("audit.jsonl").to_str().unwrap()]), "appliance audit");

    // A revoked appliance cannot come back under its identity, even with a token of its environment.
    plane.clock.advance(Duration::from_secs(2 * 3600));
    cli.ok(&["appliance", "revoke", &id]);
    let revoked = plane.run_to_end(with_customer(Some(&cli.join_token(&env)))).unwrap_err();
    assert!(revoked.to_string().contains("revoked"), "{revoked}");
    assert!(recovered_joins(cli, &id).len() == 1, "no second recovery");
    assert!(cli.audit_verify().status.success());
}

/// A Kubernetes appliance that joined with its mounted token: once its rule requires tokens from
/// the TokenRequest API, its next renewal (the clock moved past two thirds of its certificate's
/// life) is refused and audited; offline past the certificate's end, a mounted token cannot
/// recover it either, and a requested one does, as the same appliance.
#[test]
fn a_rule_requiring_token_request_refuses_a_mounted_token_at_renewal_and_recovery_and_a_requested_one_recovers() {
    use airlock_testkit::jwt_issuer::{Flavor, JwtIssuer, K8S_API_AUDIENCE, k8s_claims, unix_now};
    let cluster = JwtIssuer::start(Flavor::Kubernetes);
    // Requested tokens live 10 minutes from the issuer's own (wall) time: the clock moves less in all.
    let lifetime = Duration::from_secs(240);
    let plane = InProcess::start(|cfg| {
        cfg.issuer_roots = airlock_server::issuer::read_ca_pem(cluster.ca_pem().as_bytes()).unwrap();
        cfg.allow_private_issuers = true;
        cfg.appliance_cert_lifetime = lifetime;
    });
    let cli = &plane.cli;
    let iss = cluster.issuer().to_owned();
    let env = cli.create_env("k8s");
    let add = |extra: &[&str]| {
        let mut args = vec!["env", "join-rule", "add", &env, "--k8s-issuer", &iss, "--k8s-service-account"];
        args.push("airlock/appliance");
        args.extend_from_slice(extra);
        cli.ok(&args).trim().to_owned()
    };
    let lax = add(&[]);

    let tmp = cli.dir.path().to_owned();
    let state = tmp.join("apl");
    let mounted = tmp.join("mounted-token");
    let now_secs = || plane.clock.now().unix_seconds();
    let audience = airlock_proto::join::server_audience(&cli.fingerprint);
    let kubelet_refresh = || {
        std::fs::write(&mounted, cluster.mint(&k8s_claims(&iss, &audience, "airlock", "appliance", now_secs())))
            .unwrap();
    };
    kubelet_refresh();
    use airlock_appliance::config::{K8sTokenRequest, PlatformJoinConfig};
    let with_mounted = || ApplianceConfig {
        platform_join: Some(PlatformJoinConfig::K8s { token_path: mounted.clone(), token_request: None }),
        ..plane.appliance_config(&state, None)
    };
    let appliance = plane.run(with_mounted());
    let id = plane.wait_connected(&env, &appliance);
    assert_eq!(cli.appliance(&id)["join_method"], "k8s_token");

    // The rule now requires requested tokens (the old one removed, a stricter one added).
    let strict = add(&["--k8s-require-token-request"]);
    cli.ok(&["env", "join-rule", "remove", &env, &lax]);
    let listed = cli.ok(&["env", "join-rule", "list", &env]);
    assert!(listed.lines().any(|l| l.contains(&strict) && l.contains("TokenRequest tokens only")), "{listed}");
    let json: Value = serde_json::from_str(&cli.ok(&["env", "join-rule", "list", &env, "--json"])).unwrap();
    assert_eq!(json["rules"][0]["k8s"]["require_token_request"], true, "{json}");

    // Past two thirds of the certificate's life, the appliance renews with its mounted token: refused.
    plane.clock.advance(lifetime * 2 / 3 + Duration::from_secs(5));
    let denied = wait_for(Duration::from_secs(30), "the renewal to be refused", || {
        cli.audited("appliance.certificate_renew", "denied").into_iter().find(|r| r["target"] == id.as_str())
    });
    let reason = denied["detail"]["reason"].as_str().unwrap();
    assert!(reason.contains("TokenRequest") && reason.contains("--k8s-token-request"), "{denied}");
    assert!(cli.audited("appliance.certificate_renew", "success").is_empty(), "nothing was issued");

    // Offline past the certificate's end; the kubelet's token is fresh, and still mounted: refused.
    plane.stop(appliance);
    plane.clock.advance(lifetime / 3);
    kubelet_refresh();
    let appliances_before = cli.appliances().len();
    let refused = plane.run_to_end(with_mounted()).unwrap_err();
    assert!(matches!(refused, ApplianceError::JoinRefused { status: 401, .. }), "{refused}");
    assert!(refused.to_string().contains("--k8s-token-request"), "{refused}");
    let denied = cli.audited("appliance.join", "denied");
    let audited = denied.iter().find(|r| r["detail"]["code"] == "rule_requires_token_request").unwrap();
    assert_eq!(audited["detail"]["identity"]["service_account"], "appliance", "{audited}");
    assert_eq!(cli.appliances().len(), appliances_before, "nothing was issued");
    assert!(recovered_joins(cli, &id).is_empty());

    // With a token it asks the TokenRequest API for, it recovers as itself.
    let api_token = tmp.join("api-token");
    // It authenticates the TokenRequest to the issuer, whose time is the wall clock's.
    std::fs::write(&api_token, cluster.mint(&k8s_claims(&iss, K8S_API_AUDIENCE, "airlock", "appliance", unix_now())))
        .unwrap();
    let requesting = ApplianceConfig {
        platform_join: Some(PlatformJoinConfig::K8s {
            token_path: api_token,
            token_request: Some(K8sTokenRequest { api_url: iss.parse().unwrap(), ca_path: cluster.ca_file() }),
        }),
        ..plane.appliance_config(&state, None)
    };
    let appliance = plane.run(requesting);
    assert_eq!(plane.wait_connected(&env, &appliance), id, "the appliance id is kept");
    assert_eq!(cli.appliances().len(), appliances_before, "no new appliance");
    let recovered = recovered_joins(cli, &id);
    assert_eq!(recovered.len(), 1, "{recovered:#?}");
    assert_eq!(recovered[0]["detail"]["join_rule"], strict.as_str());
    // And renews with requested tokens from then on.
    plane.clock.advance(lifetime * 2 / 3 + Duration::from_secs(5));
    wait_for(Duration::from_secs(30), "a renewal with a requested token", || {
        cli.audited("appliance.certificate_renew", "success").into_iter().find(|r| r["target"] == id.as_str())
    });
    plane.stop(appliance);
    assert!(cli.audit_verify().status.success());
}
