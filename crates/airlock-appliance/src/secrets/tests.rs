//! The resolver against real peers: moto's AWS server (installed by `scripts/test`, named by
//! `AIRLOCK_TEST_MOTO_SERVER`), real files, an injected environment. A recording proxy between
//! the resolver and moto shows which calls existence checks make and what comes back.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use airlock_core::release::SecretRef;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;

const CANARY: &str = "canary-4f1d9a7c-do-not-leak";

use airlock_testkit::moto::Moto;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap()
}

/// Everything that crossed a forwarding proxy, both ways.
#[derive(Clone, Default)]
struct Recording(Arc<Mutex<Vec<u8>>>);

impl Recording {
    fn take(&self) -> String {
        String::from_utf8_lossy(&std::mem::take(&mut *self.0.lock().unwrap())).into_owned()
    }

    /// The `x-amz-target` of every request, in order.
    fn targets(text: &str) -> Vec<String> {
        text.lines()
            .filter_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("x-amz-target").then(|| value.trim().to_owned())
            })
            .collect()
    }
}

/// A TCP forwarder to `upstream` that records both directions.
async fn recording_proxy(upstream: SocketAddr) -> (SocketAddr, Recording) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let recording = Recording::default();
    let rec = recording.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let rec = rec.clone();
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(upstream).await else { return };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::join!(pump(cr, sw, rec.clone()), pump(sr, cw, rec));
            });
        }
    });
    (addr, recording)
}

async fn pump(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf, rec: Recording) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                rec.0.lock().unwrap().extend_from_slice(&buf[..n]);
                if to.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown().await;
}

/// Every log line of this test binary (all its tests, all threads), from the first capture on.
/// Global, not per-thread: tracing may cache a callsite as disabled when another test's thread,
/// with no subscriber of its own, reaches it first.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn capture() -> Self {
        static LOGS: std::sync::OnceLock<Logs> = std::sync::OnceLock::new();
        LOGS.get_or_init(|| {
            let logs = Self::default();
            let writer = logs.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new("debug,airlock_appliance=trace"))
                .with_ansi(false)
                .with_writer(move || writer.clone())
                .finish();
            tracing::subscriber::set_global_default(subscriber).expect("no other global subscriber in this binary");
            logs
        })
        .clone()
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

fn config(endpoint: &str, timeout_ms: u64) -> SecretsConfig {
    let toml = format!(
        "allow = ['aws-sm:', 'aws-ssm:']\n[aws]\nregion = 'us-east-1'\nsecretsmanager_endpoint = '{endpoint}'\nssm_endpoint = '{endpoint}'\ntimeout_ms = {timeout_ms}\n"
    );
    toml::from_str(&toml).unwrap()
}

fn resolver(endpoint: &str, timeout_ms: u64) -> SecretResolver {
    let creds = aws_credential_types::Credentials::new("testing", "testing", None, None, "test");
    SecretResolver::with_credentials(&config(endpoint, timeout_ms), Arc::new(HashMap::<String, String>::new()), creds)
        .existence_ttl(Duration::ZERO)
}

fn r(text: &str) -> SecretRef {
    text.parse().unwrap()
}

#[tokio::test]
async fn aws_existence_makes_metadata_calls_only_and_never_sees_a_value() {
    let logs = Logs::capture();
    let moto = Moto::start();
    let upstream: SocketAddr = moto.url.trim_start_matches("http://").parse().unwrap();
    let (proxy, recording) = recording_proxy(upstream).await;
    let resolver = resolver(&format!("http://{proxy}"), 5000);
    moto.boto3(serde_json::json!([
        ["secretsmanager", "create_secret", { "Name": "prod/db", "SecretString": CANARY }],
        ["secretsmanager", "create_secret", { "Name": "prod/soon-gone", "SecretString": CANARY }],
        ["secretsmanager", "create_secret", { "Name": "prod/gone", "SecretString": CANARY }],
        ["secretsmanager", "create_secret", { "Name": "prod/binary", "SecretBinary": CANARY.as_bytes() }],
        ["ssm", "put_parameter", { "Name": "/shop/plain", "Value": CANARY, "Type": "String" }],
        ["ssm", "put_parameter", { "Name": "/shop/secure", "Value": CANARY, "Type": "SecureString" }],
        ["secretsmanager", "delete_secret", { "SecretId": "prod/soon-gone", "RecoveryWindowInDays": 7 }],
        ["secretsmanager", "delete_secret", { "SecretId": "prod/gone", "ForceDeleteWithoutRecovery": true }],
    ]));
    let started = Timestamp::from_unix_millis(
        i64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()).unwrap(),
    );

    let mut results = Vec::new();
    for (text, state, reason) in [
        ("aws-sm:prod/db", ExistenceState::Present, None),
        ("aws-sm:prod/binary", ExistenceState::Present, None),
        ("aws-sm:prod/absent", ExistenceState::Missing, Some(SecretReason::NotFound)),
        ("aws-sm:prod/soon-gone", ExistenceState::Missing, Some(SecretReason::ScheduledForDeletion)),
        ("aws-sm:prod/gone", ExistenceState::Missing, Some(SecretReason::NotFound)),
        ("aws-ssm:/shop/plain", ExistenceState::Present, None),
        ("aws-ssm:/shop/secure", ExistenceState::Present, None),
        ("aws-ssm:/shop/absent", ExistenceState::Missing, Some(SecretReason::NotFound)),
        ("aws-ssm:/shop", ExistenceState::Missing, Some(SecretReason::NotFound)),
    ] {
        let got = resolver.existence(&r(text)).await;
        assert_eq!((got.state, got.reason), (state, reason), "{text}: {got:?}");
        assert_eq!(got.reference, r(text));
        if state == ExistenceState::Present {
            // moto keeps whole seconds.
            let changed = got.last_changed.unwrap_or_else(|| panic!("{text}: no last change"));
            assert!(changed.unix_seconds() >= started.unix_seconds() - 60, "{text}: {changed}");
            assert!(changed.unix_seconds() <= started.unix_seconds() + 1, "{text}: {changed}");
        }
        results.push(got);
    }
    let wire = recording.take();
    let targets = Recording::targets(&wire);
    assert!(targets.contains(&"secretsmanager.DescribeSecret".to_owned()), "{targets:?}");
    assert!(targets.contains(&"AmazonSSM.DescribeParameters".to_owned()), "{targets:?}");
    assert!(
        targets.iter().all(|t| t == "secretsmanager.DescribeSecret" || t == "AmazonSSM.DescribeParameters"),
        "an existence check made a value call: {targets:?}"
    );
    assert!(!wire.contains(CANARY), "a metadata call carried the value");
    let json = serde_json::to_string(&results).unwrap();
    assert!(!json.contains(CANARY));
    // Metadata only: no field could carry a value, its length or its hash.
    let first = serde_json::to_value(&results[0]).unwrap();
    // Sorted here: whether serde_json keeps insertion order depends on the build (the control
    // plane's Cedar turns on its `preserve_order`).
    let mut keys: Vec<&String> = first.as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(keys, ["last_changed", "reason", "reference", "state"]);
    assert_eq!(first["reference"], "aws-sm:prod/db");
    assert_eq!(first["state"], "present");
    assert_eq!(serde_json::to_value(&results[3]).unwrap()["reason"], "scheduled_for_deletion");

    // The value calls, and only they, fetch values.
    for text in ["aws-sm:prod/db", "aws-ssm:/shop/plain", "aws-ssm:/shop/secure"] {
        let value = resolver.value(&r(text)).await.unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(value.as_str(), CANARY, "{text}");
        assert!(!format!("{value:?}").contains(CANARY), "Debug shows the value");
    }
    let binary = resolver.value(&r("aws-sm:prod/binary")).await.unwrap();
    assert_eq!(binary.as_str(), data_encoding::BASE64.encode(CANARY.as_bytes()), "binary secrets are base64");
    let targets = Recording::targets(&recording.take());
    assert!(targets.contains(&"secretsmanager.GetSecretValue".to_owned()), "{targets:?}");
    assert!(targets.contains(&"AmazonSSM.GetParameter".to_owned()), "{targets:?}");
    for (text, reason) in [
        ("aws-sm:prod/absent", SecretReason::NotFound),
        ("aws-ssm:/shop/absent", SecretReason::NotFound),
        ("aws-sm:prod/gone", SecretReason::NotFound),
    ] {
        let err = resolver.value(&r(text)).await.unwrap_err();
        assert_eq!(err, SecretError { reference: r(text), reason }, "{text}");
        assert!(!err.to_string().contains(CANARY));
    }
    // A scheduled-for-deletion secret's value is refused by AWS; whatever its code, no value.
    let err = resolver.value(&r("aws-sm:prod/soon-gone")).await.unwrap_err();
    assert!(!err.to_string().contains(CANARY) && !format!("{err:?}").contains(CANARY));

    let logs = logs.text();
    assert!(logs.contains("secret existence"), "the log capture works: {logs}");
    assert!(!logs.contains(CANARY), "a log line holds the value");
}

#[tokio::test]
async fn last_changed_moves_when_a_secret_or_parameter_changes() {
    let moto = Moto::start();
    let resolver = resolver(&moto.url, 5000);
    moto.boto3(serde_json::json!([
        ["secretsmanager", "create_secret", { "Name": "rotating", "SecretString": "one" }],
        ["ssm", "put_parameter", { "Name": "/rotating", "Value": "one", "Type": "SecureString" }],
    ]));
    let sm = resolver.existence(&r("aws-sm:rotating")).await.last_changed.unwrap();
    let ssm = resolver.existence(&r("aws-ssm:/rotating")).await.last_changed.unwrap();
    // moto records whole seconds.
    std::thread::sleep(Duration::from_millis(1100));
    moto.boto3(serde_json::json!([
        ["secretsmanager", "put_secret_value", { "SecretId": "rotating", "SecretString": "two" }],
        ["ssm", "put_parameter", { "Name": "/rotating", "Value": "two", "Type": "SecureString", "Overwrite": true }],
    ]));
    let sm_after = resolver.existence(&r("aws-sm:rotating")).await.last_changed.unwrap();
    let ssm_after = resolver.existence(&r("aws-ssm:/rotating")).await.last_changed.unwrap();
    assert!(sm_after > sm, "{sm} -> {sm_after}");
    assert!(ssm_after > ssm, "{ssm} -> {ssm_after}");
    assert_eq!(resolver.value(&r("aws-sm:rotating")).await.unwrap().as_str(), "two");
    assert_eq!(resolver.value(&r("aws-ssm:/rotating")).await.unwrap().as_str(), "two");
}

#[tokio::test]
async fn existence_is_cached_for_its_ttl_values_never() {
    let moto = Moto::start();
    let upstream: SocketAddr = moto.url.trim_start_matches("http://").parse().unwrap();
    let (proxy, recording) = recording_proxy(upstream).await;
    moto.boto3(serde_json::json!([["secretsmanager", "create_secret", { "Name": "cached", "SecretString": "v" }]]));
    let resolver = resolver(&format!("http://{proxy}"), 5000).existence_ttl(Duration::from_secs(60));
    for _ in 0..3 {
        assert_eq!(resolver.existence(&r("aws-sm:cached")).await.state, ExistenceState::Present);
    }
    assert_eq!(Recording::targets(&recording.take()).len(), 1, "existence is reused within its TTL");
    for _ in 0..2 {
        assert_eq!(resolver.value(&r("aws-sm:cached")).await.unwrap().as_str(), "v");
    }
    assert_eq!(Recording::targets(&recording.take()).len(), 2, "every value call asks AWS");
}

#[tokio::test]
async fn unreachable_or_silent_aws_is_unknown_quickly() {
    // Nothing listens on this port.
    let closed = format!("http://127.0.0.1:{}", free_port());
    // This one accepts and never answers.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_url = format!("http://{}", silent.local_addr().unwrap());
    let held = Arc::new(Mutex::new(Vec::new()));
    let keep = held.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = silent.accept().await {
            keep.lock().unwrap().push(stream);
        }
    });
    for (url, reason) in [(closed, SecretReason::Unreachable), (silent_url, SecretReason::Timeout)] {
        let resolver = resolver(&url, 300);
        for text in ["aws-sm:prod/db", "aws-ssm:/shop/key"] {
            let started = Instant::now();
            let got = resolver.existence(&r(text)).await;
            assert!(started.elapsed() < Duration::from_secs(3), "{text} at {url} took {:?}", started.elapsed());
            assert_eq!((got.state, got.reason), (ExistenceState::Unknown, Some(reason)), "{text} at {url}");
            let err = resolver.value(&r(text)).await.unwrap_err();
            assert_eq!(err.reason, reason, "{text} at {url}");
        }
    }
}

/// A server that answers every request with `status`, `headers` and `body`, after reading it whole.
async fn canned(status: u16, headers: &str, body: Vec<u8>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let head = format!("HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n{headers}\r\n", body.len());
    let response = [head.into_bytes(), body].concat();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let response = response.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                // The head, then as many body bytes as it announces.
                loop {
                    let Ok(n) = stream.read(&mut buf).await else { return };
                    if n == 0 {
                        return;
                    }
                    request.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&request).to_ascii_lowercase();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let length = text[..end]
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if request.len() >= end + 4 + length {
                            break;
                        }
                    }
                }
                let _ = stream.write_all(&response).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    url
}

#[tokio::test]
async fn odd_aws_answers_are_typed_reasons_and_an_error_body_goes_nowhere() {
    let logs = Logs::capture();
    let echo = format!(r#"{{"__type":"InternalFailure","message":"the value is {CANARY}"}}"#).into_bytes();
    let cases = [
        (canned(500, "", echo.clone()).await, SecretReason::ServiceError),
        (canned(400, "x-amzn-errortype: ThrottlingException:http://x/\r\n", echo).await, SecretReason::ServiceError),
        (canned(400, "", br#"{"__type":"AccessDeniedException"}"#.to_vec()).await, SecretReason::AccessDenied),
        (canned(200, "", vec![b' '; 2 * 1024 * 1024]).await, SecretReason::TooLarge),
        (canned(200, "", b"<html>not json</html>".to_vec()).await, SecretReason::BadResponse),
    ];
    for (url, reason) in cases {
        let resolver = resolver(&url, 5000);
        for text in ["aws-sm:prod/db", "aws-ssm:/shop/key"] {
            let got = resolver.existence(&r(text)).await;
            assert_eq!((got.state, got.reason), (ExistenceState::Unknown, Some(reason)), "{text} at {url}");
            let err = resolver.value(&r(text)).await.unwrap_err();
            assert_eq!(err.reason, reason, "{text} at {url}");
            assert!(!err.to_string().contains(CANARY) && !format!("{err:?}").contains(CANARY));
        }
    }
    assert!(logs.text().contains("InternalFailure"), "the error's code is logged");
    assert!(!logs.text().contains(CANARY), "an AWS error body reached the log");
}

#[tokio::test]
async fn file_and_env_secrets_are_checked_on_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("db-password");
    std::fs::write(&file, format!("{CANARY}\n")).unwrap();
    let mtime = std::fs::metadata(&file).unwrap().modified().unwrap();
    let env: HashMap<String, String> = [("DB_PASSWORD".to_owned(), CANARY.to_owned())].into();
    let allow = format!("allow = ['file:{}', 'env:DB_', 'env:NOT_', 'env:EMPTY']", dir.path().display());
    let config: SecretsConfig = toml::from_str(&allow).unwrap();
    let resolver = SecretResolver::new(&config, Arc::new(env)).existence_ttl(Duration::ZERO);

    let present = resolver.existence(&r(&format!("file:{}", file.display()))).await;
    assert_eq!(present.state, ExistenceState::Present);
    let ms = mtime.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
    assert_eq!(present.last_changed, Some(Timestamp::from_unix_millis(i64::try_from(ms).unwrap())));
    let value = resolver.value(&r(&format!("file:{}", file.display()))).await.unwrap();
    assert_eq!(value.as_str(), format!("{CANARY}\n"), "a file's value is its exact content");

    for (path, reason) in [
        (dir.path().join("absent"), SecretReason::NotFound),
        (dir.path().join("db-password/below-a-file"), SecretReason::NotFound),
        (dir.path().to_path_buf(), SecretReason::NotARegularFile),
    ] {
        let reference = r(&format!("file:{}", path.display()));
        let got = resolver.existence(&reference).await;
        assert_eq!((got.state, got.reason), (ExistenceState::Missing, Some(reason)), "{}", path.display());
        assert_eq!(resolver.value(&reference).await.unwrap_err().reason, reason);
    }
    // A FIFO does not hang the check, and is not a secret file.
    let fifo = dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), resolver.existence(&r(&format!("file:{}", fifo.display()))))
        .await
        .expect("a FIFO hung the existence check");
    assert_eq!(got.reason, Some(SecretReason::NotARegularFile));
    let big = dir.path().join("big");
    std::fs::write(&big, vec![b'x'; 2 * 1024 * 1024]).unwrap();
    assert_eq!(
        resolver.value(&r(&format!("file:{}", big.display()))).await.unwrap_err().reason,
        SecretReason::TooLarge
    );
    let binary = dir.path().join("binary");
    std::fs::write(&binary, [0xff, 0xfe, 0x00]).unwrap();
    assert_eq!(
        resolver.value(&r(&format!("file:{}", binary.display()))).await.unwrap_err().reason,
        SecretReason::NotUtf8
    );

    let env = resolver.existence(&r("env:DB_PASSWORD")).await;
    assert_eq!((env.state, env.last_changed, env.reason), (ExistenceState::Present, None, None));
    assert_eq!(resolver.value(&r("env:DB_PASSWORD")).await.unwrap().as_str(), CANARY);
    let absent = resolver.existence(&r("env:NOT_SET")).await;
    assert_eq!((absent.state, absent.reason), (ExistenceState::Missing, Some(SecretReason::NotFound)));
    assert_eq!(resolver.value(&r("env:NOT_SET")).await.unwrap_err().reason, SecretReason::NotFound);
    assert!(!serde_json::to_string(&[present, env]).unwrap().contains(CANARY));
}

#[tokio::test]
async fn kubernetes_secrets_wait_for_the_kubernetes_executor() {
    let config: SecretsConfig = toml::from_str("allow = ['k8s:shop/']").unwrap();
    let resolver = SecretResolver::new(&config, Arc::new(HashMap::<String, String>::new()));
    let reference = r("k8s:shop/db#password");
    let got = resolver.existence(&reference).await;
    assert_eq!((got.state, got.reason), (ExistenceState::Unknown, Some(SecretReason::NeedsKubernetesExecutor)));
    assert_eq!(serde_json::to_value(&got).unwrap()["reason"], "needs_kubernetes_executor");
    let err = resolver.value(&reference).await.unwrap_err();
    assert_eq!(err.reason, SecretReason::NeedsKubernetesExecutor);
    assert_eq!(err.to_string(), "secret k8s:shop/db#password: it needs the Kubernetes executor");
}

#[test]
fn the_secrets_section_is_checked_when_the_config_is_read() {
    let file: crate::config::FileConfig = toml::from_str(
        "[secrets.aws]\nregion = 'eu-west-1'\nsecretsmanager_endpoint = 'http://127.0.0.1:4566'\nssm_endpoint = 'https://ssm.internal:8443/'\n",
    )
    .unwrap();
    assert_eq!(file.secrets.aws.region, Some(aws_region("eu-west-1")));
    assert!(file.secrets.aws.ssm_endpoint.is_some());
    assert_eq!(crate::config::FileConfig::default().secrets, SecretsConfig::default());
    for bad in [
        "[secrets.aws]\nregion = 'EU WEST'",
        "[secrets.aws]\nsecretsmanager_endpoint = 'ftp://x'",
        "[secrets.aws]\nssm_endpoint = 'http://user:pw@x'",
        "[secrets.aws]\nssm_endpoint = 'not a url'",
        "[secrets.aws]\nendpoint = 'http://x'",
        "[secrets]\nvault = 1",
    ] {
        assert!(toml::from_str::<crate::config::FileConfig>(bad).is_err(), "{bad}");
    }
}

fn aws_region(s: &str) -> AwsRegion {
    serde_json::from_value(serde_json::json!(s)).unwrap()
}

/// Runs `standard_chain_child` in a fresh copy of this test binary with exactly `env`: the
/// standard chain reads the process's environment and home, which a test must not change.
fn run_chain_child(moto: &Moto, home: &std::path::Path, env: &[(&str, &str)]) -> String {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["secrets::tests::standard_chain_child", "--exact", "--nocapture", "--test-threads=1"])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", home)
        // No instance metadata service here: the chain must not wait for one.
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AIRLOCK_TEST_SECRETS_CHAIN_ENDPOINT", &moto.url)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

#[test]
fn the_standard_chain_supplies_region_and_credentials() {
    let moto = Moto::start();
    moto.boto3(serde_json::json!([["secretsmanager", "create_secret", { "Name": "chain/db", "SecretString": "v" }]]));
    let home = tempfile::tempdir().unwrap();
    let from_env = run_chain_child(
        &moto,
        home.path(),
        &[("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"), ("AWS_REGION", "us-east-1")],
    );
    assert!(from_env.contains("chain: present missing"), "{from_env}");
    // A profile in the home directory, as `aws configure` writes it.
    std::fs::create_dir(home.path().join(".aws")).unwrap();
    std::fs::write(home.path().join(".aws/config"), "[default]\nregion = us-east-1\n").unwrap();
    std::fs::write(
        home.path().join(".aws/credentials"),
        "[default]\naws_access_key_id = testing\naws_secret_access_key = testing\n",
    )
    .unwrap();
    let from_profile = run_chain_child(&moto, home.path(), &[]);
    assert!(from_profile.contains("chain: present missing"), "{from_profile}");
    let empty_home = tempfile::tempdir().unwrap();
    let nothing = run_chain_child(&moto, empty_home.path(), &[("AWS_REGION", "us-east-1")]);
    assert!(nothing.contains("chain: no_credentials"), "{nothing}");
}

/// The child half of `the_standard_chain_supplies_region_and_credentials`; a no-op on its own.
#[tokio::test]
async fn standard_chain_child() {
    let Some(endpoint) = std::env::var_os("AIRLOCK_TEST_SECRETS_CHAIN_ENDPOINT") else { return };
    let endpoint = endpoint.into_string().unwrap();
    // Endpoints only: region and credentials come from the chain.
    let config: SecretsConfig = toml::from_str(&format!(
        "allow = ['aws-sm:chain/']\n[aws]\nsecretsmanager_endpoint = '{endpoint}'\nssm_endpoint = '{endpoint}'\ntimeout_ms = 3000\n"
    ))
    .unwrap();
    let resolver = SecretResolver::new(&config, Arc::new(HashMap::<String, String>::new()));
    let present = resolver.existence(&r("aws-sm:chain/db")).await;
    let line = match present.reason {
        Some(reason) => serde_json::to_value(reason).unwrap().as_str().unwrap().to_owned(),
        None => {
            let missing = resolver.existence(&r("aws-sm:chain/absent")).await;
            format!("{} {}", "present", serde_json::to_value(missing.state).unwrap().as_str().unwrap())
        }
    };
    #[allow(clippy::print_stdout)]
    {
        println!("chain: {line}");
    }
}

#[tokio::test]
async fn a_reference_the_allow_list_does_not_cover_is_neither_read_nor_looked_up() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("key.pem");
    std::fs::write(&file, CANARY).unwrap();
    let env: HashMap<String, String> = [("AIRLOCK_JOIN_TOKEN".to_owned(), CANARY.to_owned())].into();
    // The default list allows nothing.
    let resolver = SecretResolver::new(&SecretsConfig::default(), Arc::new(env)).existence_ttl(Duration::ZERO);
    for reference in [format!("file:{}", file.display()), "env:AIRLOCK_JOIN_TOKEN".into(), "aws-sm:prod/db".into()] {
        let reference = r(&reference);
        let got = resolver.existence(&reference).await;
        assert_eq!(
            (got.state, got.reason, got.last_changed),
            (ExistenceState::Unknown, Some(SecretReason::NotAllowed), None)
        );
        assert_eq!(resolver.value(&reference).await.unwrap_err().reason, SecretReason::NotAllowed);
    }
    // The state directory stays out of reach even under an allowed directory.
    let config: SecretsConfig = toml::from_str(&format!("allow = ['file:{}']", dir.path().display())).unwrap();
    let resolver = SecretResolver::new(&config, Arc::new(HashMap::<String, String>::new())).forbid(dir.path());
    assert_eq!(
        resolver.value(&r(&format!("file:{}", file.display()))).await.unwrap_err().reason,
        SecretReason::NotAllowed
    );
}
