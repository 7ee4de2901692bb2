use super::*;
use crate::customer_key::CustomerSigningKey;
use crate::dsse::{DsseError, Envelope};
use crate::operation::sha256_hex;

const GOOD: &str = r#"
name = "shop"
version = "1.4.2-rc.1+build.7"

[[service]]
name = "web"
command = "bin/web"
args = ["--port", "8080"]
env = { RUST_LOG = "info", EMPTY = "" }
secrets = { DATABASE_PASSWORD = "aws-sm:prod/shop/db", API_KEY = "env:SHOP_API_KEY" }
workdir = "app/web"
stop_timeout_secs = 30
restart = { policy = "always", initial_backoff_ms = 250, max_backoff_ms = 30000 }

[[service.health]]
probe = { http = { path = "/healthz", port = 8080 } }
interval_secs = 5
timeout_secs = 2
healthy_threshold = 2
unhealthy_threshold = 3

[[service.health]]
probe = { tcp = { port = 8080 } }

[[service]]
name = "worker"
command = "/usr/bin/python3"
args = ["-m", "worker"]
run_as_root = true
health = [{ probe = { exec = { command = "bin/check", args = ["--quick"] } } }]

[[task]]
name = "migrate"
command = "bin/migrate"
workdir = "app"
secrets = { DATABASE_PASSWORD = "aws-sm:prod/shop/db" }

[[dependency]]
name = "postgres"
url = "postgres://db.internal:5432/shop"
credentials = { password = "k8s:shop/db#password", user = "aws-ssm:/shop/db/user" }

[[dependency]]
name = "queue"
"#;

fn key(n: u8) -> CustomerSigningKey {
    CustomerSigningKey::from_seed([n; 32])
}

fn artifact(path: &str, content: &[u8]) -> Artifact {
    Artifact { path: RelativePath::parse(path).unwrap(), sha256: sha256_hex(content), size: content.len() as u64 }
}

fn statement() -> ReleaseStatement {
    ReleaseStatement::new(GOOD, vec![artifact("bin/web", b"web"), artifact("app/web/index.html", b"<html>")]).unwrap()
}

/// `GOOD` with `from` replaced by `to` (which must occur).
fn bad(from: &str, to: &str) -> ReleaseError {
    assert!(GOOD.contains(from), "{from}");
    ReleaseManifest::parse(&GOOD.replacen(from, to, 1)).unwrap_err()
}

fn invalid_at(err: &ReleaseError) -> (&str, &Problem) {
    match err {
        ReleaseError::Invalid { at, problem } => (at, problem),
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[test]
fn a_good_manifest_parses() {
    let m = ReleaseManifest::parse(GOOD).unwrap();
    assert_eq!((m.name.as_str(), m.version.as_str()), ("shop", "1.4.2-rc.1+build.7"));
    assert_eq!(m.services.len(), 2);
    let web = &m.services[0];
    assert_eq!(web.workdir.as_ref().map(RelativePath::as_str), Some("app/web"));
    assert_eq!(web.restart, Restart { policy: RestartPolicy::Always, initial_backoff_ms: 250, max_backoff_ms: 30000 });
    assert_eq!(web.health[0].probe, HealthProbe::Http(HttpProbe { path: "/healthz".into(), port: 8080 }));
    assert_eq!(web.health[1].probe, HealthProbe::Tcp(TcpProbe { port: 8080 }));
    assert_eq!((web.health[1].interval_secs, web.health[1].unhealthy_threshold), (10, 3));
    assert_eq!(web.secrets["DATABASE_PASSWORD"], "aws-sm:prod/shop/db".parse().unwrap());
    assert!(!web.run_as_root);
    let worker = &m.services[1];
    assert_eq!(worker.restart, Restart::default());
    assert_eq!(worker.stop_timeout_secs, 10);
    assert_eq!(worker.workdir, None);
    assert_eq!(m.tasks[0].name, "migrate");
    assert_eq!(m.dependencies[1], Dependency { name: "queue".into(), url: None, credentials: Default::default() });
    let secrets: Vec<String> = m.required_secrets().iter().map(ToString::to_string).collect();
    assert_eq!(secrets, ["env:SHOP_API_KEY", "aws-sm:prod/shop/db", "aws-ssm:/shop/db/user", "k8s:shop/db#password"]);
}

#[test]
fn run_as_root_is_recorded() {
    let m = ReleaseManifest::parse(GOOD).unwrap();
    let root: Vec<&str> = m.root_services().map(|s| s.name.as_str()).collect();
    assert_eq!(root, ["worker"]);
}

#[test]
fn unknown_keys_are_refused_everywhere() {
    for (from, to) in [
        ("name = \"shop\"", "name = \"shop\"\nlicense = \"x\""),
        ("stop_timeout_secs = 30", "stop_timeout_secs = 30\nuser = \"root\""),
        ("max_backoff_ms = 30000", "max_backoff_ms = 30000, jitter = true"),
        ("interval_secs = 5", "interval_secs = 5\nretries = 1"),
        ("port = 8080 } }\ninterval", "port = 8080, host = \"x\" } }\ninterval"),
        ("workdir = \"app\"\n", "workdir = \"app\"\nenv = {}\n"),
        ("name = \"queue\"", "name = \"queue\"\npassword = \"hunter2\""),
        ("probe = { tcp", "probe = { udp"),
    ] {
        match bad(from, to) {
            ReleaseError::Syntax(msg) => assert!(msg.contains("unknown"), "{to}: {msg}"),
            other => panic!("{to}: {other:?}"),
        }
    }
}

#[test]
fn workdirs_outside_the_release_are_refused() {
    for (workdir, word) in [
        ("/etc", "absolute"),
        ("../etc", "`..`"),
        ("app/../../etc", "`..`"),
        ("app\\\\..\\\\x", "`..`"),
        ("./app", "`.`"),
        ("app//web", "`.`"),
        ("", "empty"),
    ] {
        match bad("workdir = \"app/web\"", &format!("workdir = \"{workdir}\"")) {
            ReleaseError::Syntax(msg) => assert!(msg.contains(word), "{workdir}: {msg}"),
            other => panic!("{workdir}: {other:?}"),
        }
    }
    assert_eq!(RelativePath::parse("/etc"), Err(PathError::Invalid(Problem::AbsolutePath)));
    assert_eq!(RelativePath::parse("a/../b"), Err(PathError::Invalid(Problem::ParentComponent)));
    assert_eq!(RelativePath::parse("a/"), Err(PathError::Invalid(Problem::UnnormalizedPath)));
    let err = bad("command = \"bin/migrate\"", "command = \"../bin/migrate\"");
    assert_eq!(invalid_at(&err), ("task[migrate].command", &Problem::ParentComponent));
}

#[test]
fn duplicate_names_are_refused() {
    let err = bad("name = \"worker\"", "name = \"web\"");
    assert_eq!(invalid_at(&err), ("service", &Problem::Duplicate("web".into())));
    let err = bad("name = \"queue\"", "name = \"postgres\"");
    assert_eq!(invalid_at(&err), ("dependency", &Problem::Duplicate("postgres".into())));
}

#[test]
fn bad_values_say_where() {
    let cases: &[(&str, &str, &str, Problem)] = &[
        ("name = \"shop\"", "name = \"Shop\"", "name", Problem::NotSlug),
        ("version = \"1.4.2-rc.1+build.7\"", "version = \"1.4\"", "version", Problem::NotVersion),
        ("version = \"1.4.2-rc.1+build.7\"", "version = \"01.4.2\"", "version", Problem::NotVersion),
        ("version = \"1.4.2-rc.1+build.7\"", "version = \"1.4.2-rc.01\"", "version", Problem::NotVersion),
        ("name = \"web\"", "name = \"we b\"", "service[we b].name", Problem::NotSlug),
        ("RUST_LOG = \"info\"", "RUST_LOG = \"a\\nb\"", "service[web].env.RUST_LOG", Problem::ControlCharacter),
        ("RUST_LOG = \"info\"", "\"1X\" = \"info\"", "service[web].env.1X", Problem::NotEnvName("1X".into())),
        (
            "RUST_LOG = \"info\"",
            "API_KEY = \"plain\"",
            "service[web].env.API_KEY",
            Problem::EnvAndSecret("API_KEY".into()),
        ),
        (
            "initial_backoff_ms = 250",
            "initial_backoff_ms = 60000",
            "service[web].restart.initial_backoff_ms",
            Problem::Exceeds { other: "max_backoff_ms", max: 30000 },
        ),
        (
            "initial_backoff_ms = 250",
            "initial_backoff_ms = 1",
            "service[web].restart.initial_backoff_ms",
            Problem::OutOfRange { min: MIN_BACKOFF_MS, max: MAX_BACKOFF_MS, found: 1 },
        ),
        (
            "stop_timeout_secs = 30",
            "stop_timeout_secs = 0",
            "service[web].stop_timeout_secs",
            Problem::OutOfRange { min: 1, max: MAX_STOP_TIMEOUT_SECS, found: 0 },
        ),
        (
            "timeout_secs = 2",
            "timeout_secs = 9",
            "service[web].health[0].timeout_secs",
            Problem::Exceeds { other: "interval_secs", max: 5 },
        ),
        (
            "healthy_threshold = 2",
            "healthy_threshold = 0",
            "service[web].health[0].healthy_threshold",
            Problem::OutOfRange { min: 1, max: 100, found: 0 },
        ),
        (
            "tcp = { port = 8080 }",
            "tcp = { port = 0 }",
            "service[web].health[1].probe.tcp.port",
            Problem::OutOfRange { min: 1, max: 65535, found: 0 },
        ),
        ("path = \"/healthz\"", "path = \"healthz\"", "service[web].health[0].probe.http.path", Problem::BadHttpPath),
        ("command = \"bin/web\"", "command = \"\"", "service[web].command", Problem::Empty),
    ];
    for (from, to, at, problem) in cases {
        let err = bad(from, to);
        assert_eq!(invalid_at(&err), (*at, problem), "{to}");
        assert!(err.to_string().contains(at), "{err}");
    }
}

#[test]
fn a_restart_backoff_under_the_floor_is_refused_and_the_floor_is_accepted() {
    // A crash-looping service restarted every millisecond costs the appliance a good part of a core.
    let err = bad("initial_backoff_ms = 250, max_backoff_ms = 30000", "initial_backoff_ms = 99, max_backoff_ms = 99");
    assert_eq!(
        invalid_at(&err),
        ("service[web].restart.initial_backoff_ms", &Problem::OutOfRange { min: 100, max: MAX_BACKOFF_MS, found: 99 })
    );
    assert!(err.to_string().contains("must be between 100 and"), "{err}");
    let floor = GOOD.replacen(
        "initial_backoff_ms = 250, max_backoff_ms = 30000",
        "initial_backoff_ms = 100, max_backoff_ms = 100",
        1,
    );
    let web = ReleaseManifest::parse(&floor).unwrap().services.into_iter().find(|s| s.name == "web").unwrap();
    assert_eq!((web.restart.initial_backoff_ms, web.restart.max_backoff_ms), (MIN_BACKOFF_MS, MIN_BACKOFF_MS));
}

#[test]
fn bad_secret_references_are_refused_in_the_manifest() {
    for reference in
        ["vault:x", "file:relative", "env:1X", "aws-sm:bad name", "aws-ssm:no-slash", "k8s:ns/name", "file:/a/../b"]
    {
        match bad("\"aws-sm:prod/shop/db\", API_KEY", &format!("\"{reference}\", API_KEY")) {
            ReleaseError::Syntax(msg) => assert!(msg.contains("secret") || msg.contains("scheme"), "{msg}"),
            other => panic!("{reference}: {other:?}"),
        }
    }
    let err = bad("secrets = { DATABASE_PASSWORD = \"aws-sm:prod/shop/db\" }", "secrets = { \"A-B\" = \"env:X\" }");
    assert_eq!(invalid_at(&err).1, &Problem::NotEnvName("A-B".into()));
}

#[test]
fn over_limit_sizes_are_refused() {
    let huge = format!("{GOOD}\n#{}", "x".repeat(MAX_MANIFEST_BYTES));
    assert_eq!(
        ReleaseManifest::parse(&huge),
        Err(ReleaseError::Limit(ReleaseLimit::ManifestBytes { bytes: huge.len() }))
    );
    let mut many = String::from("name = \"a\"\nversion = \"1.0.0\"\n");
    for i in 0..=MAX_SERVICES {
        many.push_str(&format!("[[service]]\nname = \"s{i}\"\ncommand = \"x\"\n"));
    }
    assert_eq!(
        ReleaseManifest::parse(&many),
        Err(ReleaseError::Limit(ReleaseLimit::Count {
            at: "service".into(),
            count: MAX_SERVICES + 1,
            max: MAX_SERVICES
        }))
    );
    let long = "a".repeat(MAX_STRING_BYTES + 1);
    assert_eq!(
        bad("url = \"postgres://db.internal:5432/shop\"", &format!("url = \"{long}\"")),
        ReleaseError::Limit(ReleaseLimit::Length {
            at: "dependency[postgres].url".into(),
            bytes: long.len(),
            max: MAX_STRING_BYTES
        })
    );
    let name = "a".repeat(MAX_NAME_BYTES + 1);
    assert!(matches!(bad("name = \"shop\"", &format!("name = \"{name}\"")), ReleaseError::Limit(_)));
    let args = format!("args = [{}]", vec!["\"a\""; MAX_ARGS + 1].join(","));
    assert!(matches!(bad("args = [\"-m\", \"worker\"]", &args), ReleaseError::Limit(ReleaseLimit::Count { .. })));
}

#[test]
fn statement_is_sorted_canonical_and_digested() {
    let s = statement();
    let paths: Vec<&str> = s.artifacts.iter().map(|a| a.path.as_str()).collect();
    assert_eq!(paths, ["app/web/index.html", "bin/web"]);
    assert_eq!(s.manifest_sha256, sha256_hex(GOOD.as_bytes()));
    let json = String::from_utf8(s.to_canonical_json()).unwrap();
    assert!(json.starts_with("{\"manifest_sha256\":\""), "{json}");
    assert_eq!(s.digest(), sha256_hex(json.as_bytes()));
    // The same release built from artifacts in another order has the same digest.
    let again =
        ReleaseStatement::new(GOOD, vec![artifact("app/web/index.html", b"<html>"), artifact("bin/web", b"web")])
            .unwrap();
    assert_eq!(again.digest(), s.digest());
    let other = ReleaseStatement::new(GOOD, vec![artifact("bin/web", b"web2")]).unwrap();
    assert_ne!(other.digest(), s.digest());
}

#[test]
fn bad_artifacts_are_refused() {
    let err = ReleaseStatement::new(GOOD, vec![artifact("bin/web", b"a"), artifact("bin/web", b"b")]).unwrap_err();
    assert_eq!(invalid_at(&err), ("artifacts", &Problem::Duplicate("bin/web".into())));
    let mut a = artifact("bin/web", b"a");
    a.sha256 = "ABC".into();
    let err = ReleaseStatement::new(GOOD, vec![a]).unwrap_err();
    assert_eq!(invalid_at(&err), ("artifacts[bin/web].sha256", &Problem::NotSha256));
    let too_many = (0..=MAX_ARTIFACTS).map(|i| artifact(&format!("f{i}"), b"")).collect();
    assert!(matches!(ReleaseStatement::new(GOOD, too_many), Err(ReleaseError::Limit(ReleaseLimit::Count { .. }))));
    assert!(matches!(ReleaseStatement::new("name = 1", vec![]), Err(ReleaseError::Syntax(_))));
    // A `..` artifact path in a signed statement is refused when it is read.
    let s = statement();
    let json = String::from_utf8(s.to_canonical_json()).unwrap().replace("bin/web", "../web");
    let env = Envelope::new(RELEASE_PAYLOAD_TYPE, json.into_bytes()).sign(&key(1));
    match verify_release(&env, &[key(1).public()]) {
        Err(ReleaseError::Malformed(msg)) => assert!(msg.contains("`..`"), "{msg}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn signing_and_verifying_round_trips() {
    let s = statement();
    let env = sign_release(&s, &key(1));
    let env = Envelope::from_json(env.to_json().as_bytes()).unwrap();
    let v = verify_release(&env, &[key(2).public(), key(1).public()]).unwrap();
    assert_eq!(v.statement(), &s);
    assert_eq!(v.manifest(), &ReleaseManifest::parse(GOOD).unwrap());
    assert_eq!(v.digest(), s.digest());
    assert_eq!(v.signed_by(), [key(1).public().key_id()]);
}

#[test]
fn tampered_unaccepted_and_mistyped_envelopes_are_refused() {
    let s = statement();
    let good = sign_release(&s, &key(1));
    let accepted = [key(1).public()];

    let mut tampered = good.clone();
    let json = String::from_utf8(tampered.payload).unwrap().replace("\"size\":3", "\"size\":4");
    tampered.payload = json.into_bytes();
    assert_eq!(
        verify_release(&tampered, &accepted),
        Err(ReleaseError::Signature(DsseError::NotEnoughSignatures { valid: 0, required: 1 }))
    );

    assert_eq!(
        verify_release(&good, &[key(2).public()]),
        Err(ReleaseError::Signature(DsseError::NotEnoughSignatures { valid: 0, required: 1 }))
    );
    assert!(matches!(verify_release(&good, &[]), Err(ReleaseError::Signature(_))));

    let mistyped = Envelope::new("application/vnd.airlock.grant.v1+json", good.payload.clone()).sign(&key(1));
    assert!(matches!(verify_release(&mistyped, &accepted), Err(ReleaseError::Signature(DsseError::WrongType { .. }))));
}

#[test]
fn a_statement_whose_manifest_digest_differs_is_refused() {
    let mut s = statement();
    s.manifest = s.manifest.replace("version = \"1.4.2-rc.1+build.7\"", "version = \"9.9.9\"");
    let env = Envelope::new(RELEASE_PAYLOAD_TYPE, s.to_canonical_json()).sign(&key(1));
    assert_eq!(
        verify_release(&env, &[key(1).public()]),
        Err(ReleaseError::ManifestDigestMismatch {
            stated: sha256_hex(GOOD.as_bytes()),
            actual: sha256_hex(s.manifest.as_bytes())
        })
    );
}

#[test]
fn non_canonical_and_oversized_statements_are_refused() {
    let s = statement();
    let pretty = serde_json::to_vec_pretty(&s).unwrap();
    let env = Envelope::new(RELEASE_PAYLOAD_TYPE, pretty).sign(&key(1));
    assert_eq!(verify_release(&env, &[key(1).public()]), Err(ReleaseError::NotCanonical));

    let mut unsorted = s.clone();
    unsorted.artifacts.reverse();
    let env = Envelope::new(RELEASE_PAYLOAD_TYPE, unsorted.to_canonical_json()).sign(&key(1));
    assert_eq!(verify_release(&env, &[key(1).public()]), Err(ReleaseError::NotCanonical));

    let mut extra: serde_json::Value = serde_json::from_slice(&s.to_canonical_json()).unwrap();
    extra["signed_off_by"] = "x".into();
    let env = Envelope::new(RELEASE_PAYLOAD_TYPE, serde_json::to_vec(&extra).unwrap()).sign(&key(1));
    assert!(matches!(verify_release(&env, &[key(1).public()]), Err(ReleaseError::Malformed(_))));

    let env = Envelope::new(RELEASE_PAYLOAD_TYPE, vec![b' '; MAX_STATEMENT_BYTES + 1]);
    assert_eq!(
        verify_release(&env, &[key(1).public()]),
        Err(ReleaseError::Limit(ReleaseLimit::StatementBytes { bytes: MAX_STATEMENT_BYTES + 1 }))
    );

    // A signed statement whose manifest is invalid is refused after the signature checks.
    let mut bad_manifest = s;
    bad_manifest.manifest = GOOD.replace("name = \"shop\"", "name = \"Shop\"");
    bad_manifest.manifest_sha256 = sha256_hex(bad_manifest.manifest.as_bytes());
    let env = sign_release(&bad_manifest, &key(1));
    assert!(matches!(verify_release(&env, &[key(1).public()]), Err(ReleaseError::Invalid { .. })));
}

#[test]
fn a_service_bundles_only_a_declared_dependency() {
    let text = GOOD.replacen("name = \"worker\"", "name = \"worker\"\nbundles = \"postgres\"", 1);
    let m = ReleaseManifest::parse(&text).unwrap();
    assert_eq!(m.services[1].bundles.as_deref(), Some("postgres"));
    assert_eq!(m.services[0].bundles, None);
    let err = bad("name = \"worker\"", "name = \"worker\"\nbundles = \"redis\"");
    assert_eq!(invalid_at(&err), ("service[worker].bundles", &Problem::UnknownDependency("redis".into())));
    assert!(err.to_string().contains("`redis` is not a dependency"), "{err}");
}
