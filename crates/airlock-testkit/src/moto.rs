//! moto's AWS server (PyPI, installed by `scripts/test` and named by
//! `AIRLOCK_TEST_MOTO_SERVER`), on a loopback port for one test: a real AWS API emulator.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn moto_server() -> PathBuf {
    let path = std::env::var_os("AIRLOCK_TEST_MOTO_SERVER").map(PathBuf::from).unwrap_or_else(|| {
        panic!("AIRLOCK_TEST_MOTO_SERVER is not set; run the tests with scripts/test, which installs moto[server]")
    });
    assert!(path.exists(), "{} does not exist; run scripts/test, which installs moto[server]", path.display());
    path
}

/// The Python beside `moto_server` (the venv's), or `python3` with `PYTHONPATH` as scripts/test set it.
pub fn python() -> PathBuf {
    let beside = moto_server().with_file_name("python");
    if beside.exists() { beside } else { PathBuf::from("python3") }
}

/// moto's server on a loopback port, killed on drop.
pub struct Moto {
    child: Child,
    pub url: String,
}

impl Moto {
    pub fn start() -> Self {
        Self::start_with_env(&[])
    }

    /// moto with its request authentication switched on after the first `free_calls` calls (its
    /// `INITIAL_NO_AUTH_ACTION_COUNT`): those set up users, roles and keys; from then on every
    /// call must carry a SigV4 signature by keys moto issued, checked as AWS does, so a forged or
    /// tampered one fails here.
    pub fn start_with_iam_auth_after(free_calls: u32) -> Self {
        Self::start_with_env(&[("INITIAL_NO_AUTH_ACTION_COUNT", &free_calls.to_string())])
    }

    fn start_with_env(env: &[(&str, &str)]) -> Self {
        let port = crate::e2e::free_port();
        let child = Command::new(moto_server())
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", moto_server().display()));
        let moto = Self { child, url: format!("http://127.0.0.1:{port}") };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "moto_server did not listen on {port} within 30 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        moto
    }

    /// Runs boto3 calls against moto: `[["secretsmanager", "create_secret", {kwargs}], …]`.
    pub fn boto3(&self, calls: serde_json::Value) {
        const SCRIPT: &str = r#"
import json, sys, boto3
url, calls = sys.argv[1], json.loads(sys.argv[2])
clients = {}
for service, method, kwargs in calls:
    if "SecretBinary" in kwargs:
        kwargs["SecretBinary"] = bytes(kwargs["SecretBinary"])
    client = clients.setdefault(service, boto3.client(service, endpoint_url=url, region_name="us-east-1"))
    getattr(client, method)(**kwargs)
"#;
        let out = Command::new(python())
            .args(["-c", SCRIPT, &self.url, &calls.to_string()])
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_DEFAULT_REGION", "us-east-1")
            .output()
            .expect("run python with boto3");
        assert!(out.status.success(), "boto3 failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Like [`Moto::boto3`], returning each call's answer as JSON (dates as text).
    pub fn boto3_results(&self, calls: serde_json::Value) -> Vec<serde_json::Value> {
        const SCRIPT: &str = r#"
import json, sys, boto3
url, calls = sys.argv[1], json.loads(sys.argv[2])
out = []
for service, method, kwargs in calls:
    client = boto3.client(service, endpoint_url=url, region_name="us-east-1")
    answer = getattr(client, method)(**kwargs)
    answer.pop("ResponseMetadata", None)
    out.append(answer)
print(json.dumps(out, default=str))
"#;
        let out = Command::new(python())
            .args(["-c", SCRIPT, &self.url, &calls.to_string()])
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_DEFAULT_REGION", "us-east-1")
            .output()
            .expect("run python with boto3");
        assert!(out.status.success(), "boto3 failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("boto3 results as JSON")
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
