//! End-to-end harness: a real `airlock server` and real appliances as separate processes on
//! loopback, with temp dirs; the real CLI for everything an operator or customer does.
//! Nothing is mocked. A test names the binary once (`env!("CARGO_BIN_EXE_airlock")`).
//!
//! A whole operation, request to execution, is a few lines:
//! ```text
//! const BIN: &str = env!("CARGO_BIN_EXE_airlock");
//! let d = Deployment::start(BIN, "version = 1\nserial = 1\nphases = [\"observe\", \"operate\"]\n");
//! d.push_template("greet", "operate", "[]", "#!/bin/sh\necho \"hello $AIRLOCK_VAR_NAME\"\n");
//! let id = d.request("greet", "world");
//! d.wait_state(&id, "awaiting_approval");
//! d.approve(&id);
//! d.wait_state(&id, "executed");
//! ```

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::process::{Proc, wait_for};

/// Runs `airlock args…` and returns its output.
pub fn run(bin: &str, args: &[&str]) -> Output {
    Command::new(bin).args(args).output().unwrap()
}

/// Asserts a command succeeded (showing its stderr if not) and returns its stdout.
pub fn ok(out: Output, what: &str) -> String {
    assert!(out.status.success(), "{what} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// `airlock customer keygen --out dir`.
pub fn keygen(bin: &str, dir: &Path) {
    ok(run(bin, &["customer", "keygen", "--out", dir.to_str().unwrap()]), "customer keygen");
}

/// Writes `policy_text` beside `out` and signs it with the key in `key_dir` into `out`.
pub fn sign_policy(bin: &str, policy_text: &str, key_dir: &Path, out: &Path) {
    let toml = out.with_extension("toml");
    std::fs::write(&toml, policy_text).unwrap();
    let key = key_dir.join("customer.key");
    let args = ["customer", "policy", "sign", toml.to_str().unwrap(), "--key", key.to_str().unwrap()];
    let res = Command::new(bin).args(args).arg("--out").arg(out).output().unwrap();
    assert!(res.status.success(), "policy sign failed: {}", String::from_utf8_lossy(&res.stderr));
}

pub struct Server {
    /// The `airlock` binary under test.
    pub bin: String,
    pub dir: tempfile::TempDir,
    pub data_dir: PathBuf,
    pub proc: Option<Proc>,
    pub url: String,
    pub gateway: String,
    pub fingerprint: String,
    pub token: String,
    pub workspace: String,
    pub tenant: String,
    /// The open-file limit (soft and hard) the server process runs under, if not the test's own.
    pub nofile: Option<u64>,
}

impl Server {
    pub fn start(bin: &str) -> Self {
        Self::start_with(bin, &[])
    }

    /// `airlock server init`, then `airlock server` on ephemeral loopback ports.
    pub fn start_with(bin: &str, extra: &[&str]) -> Self {
        Self::start_limited(bin, extra, None)
    }

    /// Like [`Server::start_with`], the server process under an open-file limit of `nofile` (soft and hard, so
    /// it cannot raise it), through `prlimit`.
    pub fn start_with_nofile(bin: &str, extra: &[&str], nofile: u64) -> Self {
        Self::start_limited(bin, extra, Some(nofile))
    }

    fn start_limited(bin: &str, extra: &[&str], nofile: Option<u64>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        let out = Command::new(bin)
            .args(["server", "init", "--data-dir"])
            .arg(&data_dir)
            .args(["--trust-domain", "airlock.test", "--tenant", "acme"])
            .output()
            .unwrap();
        assert!(out.status.success(), "init failed: {}", String::from_utf8_lossy(&out.stderr));
        let stdout = String::from_utf8(out.stdout).unwrap();
        let field = |name: &str| {
            stdout
                .lines()
                .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned()))
                .unwrap_or_else(|| panic!("init output lacks {name}: {stdout}"))
        };
        let (token, workspace, tenant) = (field("admin token:"), field("workspace:"), field("tenant:"));
        let mut s = Self {
            bin: bin.to_owned(),
            data_dir,
            proc: None,
            url: String::new(),
            gateway: String::new(),
            fingerprint: field("ca fingerprint:"),
            token,
            workspace,
            tenant,
            dir,
            nofile,
        };
        s.launch(extra);
        s
    }

    /// Starts (or restarts) the server process over the same data directory.
    pub fn launch(&mut self, extra: &[&str]) {
        let ready = self.dir.path().join("ready.json");
        let _ = std::fs::remove_file(&ready);
        let mut cmd = match self.nofile {
            // prlimit execs the server, so the process it starts is the server itself.
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}")).arg("--").arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        cmd.args(["server", "--data-dir"]).arg(&self.data_dir).args(["--hostname", "127.0.0.1"]);
        for (flag, default) in [("--listen", "127.0.0.1:0"), ("--gateway-listen", "127.0.0.1:0")] {
            if !extra.contains(&flag) {
                cmd.args([flag, default]);
            }
        }
        cmd.arg("--ready-file").arg(&ready).args(extra);
        let mut proc = Proc::spawn(cmd, self.dir.path().join("server.log"));
        let info: Value = wait_for(Duration::from_secs(20), "server ready file", || {
            if let Some(status) = proc.exited() {
                panic!("server exited with {status}: {}", proc.log());
            }
            std::fs::read(&ready).ok().and_then(|b| serde_json::from_slice(&b).ok())
        });
        self.url = info["api_url"].as_str().unwrap().to_owned();
        self.gateway = info["gateway_endpoint"].as_str().unwrap().to_owned();
        assert_eq!(info["ca_fingerprint"].as_str().unwrap(), self.fingerprint);
        self.proc = Some(proc);
    }

    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop();
        }
    }

    pub fn log(&self) -> String {
        self.proc.as_ref().map(Proc::log).unwrap_or_default()
    }

    /// Runs the CLI against this server with the given token.
    pub fn cli_as(&self, token: &str, args: &[&str]) -> Output {
        Command::new(&self.bin)
            .args(args)
            .env("AIRLOCK_URL", &self.url)
            .env("AIRLOCK_TOKEN", token)
            .env("AIRLOCK_CA_FINGERPRINT", &self.fingerprint)
            .env("NO_COLOR", "1")
            .output()
            .unwrap()
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_as(&self.token, args)
    }

    /// Runs the CLI and returns its stdout, panicking with stderr on failure.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(out.status.success(), "`airlock {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn create_env(&self, name: &str) -> String {
        self.ok(&["env", "create", name]).trim().to_owned()
    }

    pub fn join_token(&self, env: &str) -> String {
        self.ok(&["env", "join-token", env]).trim().to_owned()
    }

    pub fn appliances(&self) -> Vec<Value> {
        let out: Value = serde_json::from_str(&self.ok(&["appliance", "list", "--json"])).unwrap();
        out["appliances"].as_array().unwrap().clone()
    }

    pub fn appliance(&self, id: &str) -> Value {
        self.appliances().into_iter().find(|a| a["id"] == id).unwrap_or_else(|| panic!("no appliance {id}"))
    }

    /// Starts an appliance process with extra arguments (customer keys, policy).
    pub fn appliance_proc_with(&self, state_dir: &Path, join_token: Option<&str>, extra: &[&str]) -> Proc {
        self.appliance_proc_with_env(state_dir, join_token, extra, &[])
    }

    /// The same, with variables added to the appliance's environment (e.g. AWS credentials).
    pub fn appliance_proc_with_env(
        &self,
        state_dir: &Path,
        join_token: Option<&str>,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Proc {
        let mut cmd = Command::new(&self.bin);
        cmd.args(["appliance", "run", "--control-plane", &self.url, "--ca-fingerprint", &self.fingerprint])
            .arg("--state-dir")
            .arg(state_dir)
            .args(extra)
            .envs(env.iter().copied());
        if let Some(t) = join_token {
            cmd.args(["--join-token", t]);
        }
        let n = std::fs::read_dir(self.dir.path()).map(|d| d.count()).unwrap_or(0);
        Proc::spawn(cmd, self.dir.path().join(format!("appliance-{n}.log")))
    }

    /// Starts an appliance process with its state in `state_dir`.
    pub fn appliance_proc(&self, state_dir: &Path, join_token: Option<&str>, fingerprint: Option<&str>) -> Proc {
        let mut cmd = Command::new(&self.bin);
        cmd.args(["appliance", "run", "--control-plane", &self.url, "--ca-fingerprint"])
            .arg(fingerprint.unwrap_or(&self.fingerprint))
            .arg("--state-dir")
            .arg(state_dir);
        if let Some(t) = join_token {
            cmd.args(["--join-token", t]);
        }
        let n = std::fs::read_dir(self.dir.path()).map(|d| d.count()).unwrap_or(0);
        Proc::spawn(cmd, self.dir.path().join(format!("appliance-{n}.log")))
    }

    /// Creates an environment and joins one appliance to it; returns (process, appliance id).
    pub fn joined_appliance(&self, state_dir: &Path) -> (Proc, String) {
        let env = self.create_env(&format!("env-{}", std::process::id() ^ rand_u32()));
        let token = self.join_token(&env);
        let mut proc = self.appliance_proc(state_dir, Some(&token), None);
        let id = self.wait_connected(&mut proc);
        (proc, id)
    }

    /// Waits until the appliance logged its connection and the API shows it connected.
    pub fn wait_connected(&self, proc: &mut Proc) -> String {
        let id = wait_for(Duration::from_secs(20), "appliance to connect", || {
            if let Some(status) = proc.exited() {
                panic!("appliance exited with {status}: {}", proc.log());
            }
            let log = proc.log();
            log.lines()
                .find(|l| l.contains("connected to control plane"))
                .and_then(|l| l.split("appliance=").nth(1))
                .map(|rest| rest.split_whitespace().next().unwrap_or("").to_owned())
        });
        wait_for(Duration::from_secs(10), "API to show the appliance connected", || {
            (self.appliance(&id)["connected"] == true).then_some(())
        });
        id
    }

    /// Every audit record, via `airlock audit export`.
    pub fn audit_records(&self) -> Vec<Value> {
        let out = Command::new(&self.bin).args(["audit", "export", "--data-dir"]).arg(&self.data_dir).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    /// Audit records with this action and outcome.
    pub fn audited(&self, action: &str, outcome: &str) -> Vec<Value> {
        self.audit_records().into_iter().filter(|r| r["action"] == action && r["outcome"] == outcome).collect()
    }

    pub fn audit_verify(&self) -> Output {
        Command::new(&self.bin).args(["audit", "verify", "--data-dir"]).arg(&self.data_dir).output().unwrap()
    }
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(Instant::now().elapsed().as_nanos() as u64);
    h.finish() as u32
}

/// A customer with a key pair, an appliance that pins it under a signed policy, and templates.
pub struct Deployment {
    pub server: Server,
    /// The environment the appliance joined.
    pub env: String,
    /// The appliance's state directory.
    pub state: PathBuf,
    /// The customer's key directory (`customer.key`, `customer.pub`).
    pub customer: PathBuf,
    pub appliance: Proc,
    pub appliance_id: String,
}

impl Deployment {
    /// Makes a vendor release key, registers it in the deployment's workspace, and returns the
    /// path of its private half (for `release push --key`).
    pub fn register_release_key(&self, bin: &str) -> PathBuf {
        let vendor = self.server.dir.path().join("vendor-key");
        keygen(bin, &vendor);
        self.server.ok(&["release", "key", "add", vendor.join("customer.pub").to_str().unwrap()]);
        vendor.join("customer.key")
    }

    /// A server, a customer key, and an appliance joined to a new environment that pins the
    /// key and runs under `policy`, signed by it.
    pub fn start(bin: &str, policy: &str) -> Self {
        Self::start_with(bin, policy, &[])
    }

    /// The same, the appliance run with `extra` arguments.
    pub fn start_with(bin: &str, policy: &str, extra: &[&str]) -> Self {
        Self::start_with_env(bin, policy, extra, &[])
    }

    /// The same, with variables added to the appliance's environment.
    pub fn start_with_env(bin: &str, policy: &str, extra: &[&str], appliance_env: &[(&str, &str)]) -> Self {
        Self::start_with_server_args(bin, policy, &[], extra, appliance_env)
    }

    /// The same, the server run with `server_extra` arguments too (e.g. a short certificate lifetime).
    pub fn start_with_server_args(
        bin: &str,
        policy: &str,
        server_extra: &[&str],
        extra: &[&str],
        appliance_env: &[(&str, &str)],
    ) -> Self {
        let mut server_args = vec!["--heartbeat-interval", "1s"];
        server_args.extend_from_slice(server_extra);
        let server = Server::start_with(bin, &server_args);
        let tmp = server.dir.path().to_owned();
        let customer = tmp.join("customer");
        ok(run(bin, &["customer", "keygen", "--out", customer.to_str().unwrap()]), "keygen");
        let policy_toml = tmp.join("policy.toml");
        std::fs::write(&policy_toml, policy).unwrap();
        let signed = tmp.join("policy.json");
        let key = customer.join("customer.key");
        ok(
            run(
                bin,
                &[
                    "customer",
                    "policy",
                    "sign",
                    policy_toml.to_str().unwrap(),
                    "--key",
                    key.to_str().unwrap(),
                    "--out",
                    signed.to_str().unwrap(),
                ],
            ),
            "policy sign",
        );
        let env = server.create_env("prod");
        let token = server.join_token(&env);
        let state = tmp.join("apl");
        let pubkey = customer.join("customer.pub");
        let mut args = vec!["--customer-key", pubkey.to_str().unwrap(), "--policy", signed.to_str().unwrap()];
        args.extend_from_slice(extra);
        let mut appliance = server.appliance_proc_with_env(&state, Some(&token), &args, appliance_env);
        let appliance_id = server.wait_connected(&mut appliance);
        let d = Self { server, env, state, customer, appliance, appliance_id };
        // Once joined, the customer attests the appliance's execution key on its host, as an
        // install does: `airlock verify` accepts only executions that key signed.
        ok(d.attest(), "customer attest-appliance");
        // The appliance reconnects to present the attestation in its Hello; requests name the
        // attested key only once the control plane has it, and the appliance refuses any that
        // do not, so the first request waits for it.
        d.wait_attestation_known();
        d
    }

    /// Waits until the control plane has the appliance's execution key attestation (it names
    /// the key in every request from then on).
    pub fn wait_attestation_known(&self) {
        wait_for(Duration::from_secs(20), "control plane to learn the execution key attestation", || {
            self.server.appliance(&self.appliance_id)["execution_key"].as_str().map(|_| ())
        });
    }

    /// `airlock customer attest-appliance` with the customer's key, on the appliance host.
    pub fn attest(&self) -> Output {
        self.local(&["customer", "attest-appliance", "--key", &self.key()])
    }

    pub fn key(&self) -> String {
        self.customer.join("customer.key").to_str().unwrap().to_owned()
    }

    pub fn state(&self) -> &str {
        self.state.to_str().unwrap()
    }

    pub fn push_template(&self, name: &str, phase: &str, tags: &str, script: &str) {
        let dir = self.server.dir.path().join(format!("template-{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("template.toml"),
            format!(
                "name = \"{name}\"\ndescription = \"test {name}\"\nphase = \"{phase}\"\ndata_tags = {tags}\n\
                 body = \"run.sh\"\n\n[[variables]]\nname = \"name\"\npattern = \"[a-zA-Z0-9/._-]+\"\n"
            ),
        )
        .unwrap();
        std::fs::write(dir.join("run.sh"), script).unwrap();
        self.server.ok(&["template", "push", dir.to_str().unwrap()]);
    }

    pub fn template_dir(&self, name: &str) -> PathBuf {
        self.server.dir.path().join(format!("template-{name}"))
    }

    /// `airlock op request`; returns the operation id.
    pub fn request(&self, template: &str, name: &str) -> String {
        let out = self.server.ok(&[
            "op",
            "request",
            &self.env,
            template,
            "--var",
            &format!("name={name}"),
            "--reason",
            "end-to-end test",
        ]);
        let id = out.lines().next().unwrap().trim().to_owned();
        assert!(id.starts_with("op_"), "{out}");
        id
    }

    pub fn show(&self, id: &str) -> Value {
        serde_json::from_str(&self.server.ok(&["op", "show", id])).unwrap()
    }

    pub fn wait_state(&self, id: &str, state: &str) -> Value {
        wait_for(Duration::from_secs(20), &format!("operation {id} to be {state}"), || {
            let op = self.show(id);
            (op["state"] == state).then_some(op)
        })
    }

    /// The request digest the customer's own CLI computed while listing what awaits approval.
    pub fn reviewed_digest(&self, id: &str) -> String {
        let listed: Value =
            serde_json::from_str(&ok(self.server.cli(&["customer", "approvals", "list", "--json"]), "approvals list"))
                .unwrap();
        let op = listed["awaiting_approval"].as_array().unwrap().iter().find(|o| o["id"] == id).cloned();
        op.unwrap_or_else(|| panic!("{id} is not listed: {listed}"))["request_digest"].as_str().unwrap().to_owned()
    }

    pub fn decide(&self, verb: &str, id: &str, key: &str) -> Output {
        let digest = self.reviewed_digest(id);
        self.server.cli(&["customer", verb, id, "--key", key, "--digest", &digest, "--reason", "reviewed"])
    }

    pub fn approve(&self, id: &str) {
        ok(self.decide("approve", id, &self.key()), "customer approve");
    }

    pub fn local(&self, args: &[&str]) -> Output {
        let mut full: Vec<&str> = args.to_vec();
        full.extend(["--state-dir", self.state()]);
        run(&self.server.bin, &full)
    }

    pub fn audit_actions(&self) -> Vec<Value> {
        std::fs::read_to_string(self.state.join("audit.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    pub fn audited(&self, action: &str) -> Vec<Value> {
        self.audit_actions().into_iter().filter(|r| r["action"] == action).collect()
    }
}

/// The certificate and key an appliance holds, from its state directory.
pub fn credentials(state_dir: &Path) -> (String, String) {
    let text = std::fs::read_to_string(state_dir.join("credentials.pem")).unwrap();
    let at = text.find("-----BEGIN PRIVATE KEY-----").unwrap();
    (text[..at].to_owned(), text[at..].to_owned())
}

/// The control plane CA an appliance stored at join.
pub fn ca_pem(state_dir: &Path) -> String {
    std::fs::read_to_string(state_dir.join("ca.pem")).unwrap()
}

/// Attempts a full mTLS handshake plus one read against the gateway with the given client
/// credentials; returns the TLS error the server's alert produced, if any.
pub fn gateway_handshake(gateway: &str, ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<(), String> {
    use airlock_proto::tls::{ServerTrust, mtls_client_config};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap()).unwrap();
        let chain = vec![CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap()];
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
        let cfg = mtls_client_config(ServerTrust::Roots(roots), chain, key, &[b"h2"]).unwrap();
        let addr = gateway.parse().map_err(|e: std::net::AddrParseError| e.to_string())?;
        gateway_verdict(addr, std::sync::Arc::new(cfg)).await
    })
}

/// One handshake with `cfg` against the gateway at `addr`, then one read: in TLS 1.3 the server
/// judges the client's certificate after the client's Finished, so its verdict arrives as an alert on
/// that read, or as its first HTTP/2 SETTINGS frame.
pub async fn gateway_verdict(
    addr: std::net::SocketAddr,
    cfg: std::sync::Arc<rustls::ClientConfig>,
) -> Result<(), String> {
    use rustls::pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(cfg);
    let name = ServerName::from(addr.ip());
    let mut tls = connector.connect(name, tcp).await.map_err(|e| e.to_string())?;
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 64];
    match tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await {
        Ok(Ok(n)) if n > 0 => Ok(()),
        Ok(Ok(_)) => Err("connection closed".into()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

/// Every file under `dir`, concatenated (for "this secret is nowhere" checks).
pub fn all_bytes(dir: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(all_bytes(&path));
        } else if let Ok(bytes) = std::fs::read(&path) {
            out.extend(bytes);
        }
    }
    out
}

/// Whether `needle` occurs in `haystack`.
pub fn contains_bytes(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A loopback TCP port free now (for a service a test deploys).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap()
}

/// The response `GET /` gets on loopback `port`, if anything answers.
pub fn page(port: u16) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// Waits (30 s at most) until loopback `port` serves a page containing `content`.
pub fn serves(port: u16, content: &str) {
    wait_for(Duration::from_secs(30), &format!("`{content}` on port {port}"), || {
        page(port).filter(|p| p.contains(content)).map(|_| ())
    });
}

/// A test's directory for an appliance's releases: the box user reaches `root` through it, and
/// `config` lets releases read secrets (`file:`) from it alone.
pub struct ReleasesDir {
    pub dir: tempfile::TempDir,
    pub root: PathBuf,
    pub config: PathBuf,
}

impl ReleasesDir {
    pub fn new() -> Self {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let config = dir.path().join("appliance.toml");
        std::fs::write(&config, format!("[secrets]\nallow = [\"file:{}/\"]\n", dir.path().display())).unwrap();
        Self { root: dir.path().join("installed"), config, dir }
    }

    /// `--releases-dir` and `--config` for `airlock appliance run`.
    pub fn run_args(&self) -> [&str; 4] {
        ["--releases-dir", self.root.to_str().unwrap(), "--config", self.config.to_str().unwrap()]
    }
}

impl Default for ReleasesDir {
    fn default() -> Self {
        Self::new()
    }
}
