//! Process harness for end-to-end tests: a real `airlock server` and real appliances, as
//! separate processes on loopback with temp dirs. Nothing is mocked.
// A test harness: panicking on an unexpected failure is how it reports one.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_airlock")
}

/// Polls `f` every 50 ms until it returns `Some`, or panics after `timeout` with `what`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process killed on drop, with stderr captured to a file.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(mut cmd: Command, log: PathBuf) -> Self {
        let file = std::fs::File::create(&log).unwrap();
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(file).env("AIRLOCK_LOG", "info").env("NO_COLOR", "1");
        let child = cmd.spawn().unwrap();
        Self { child, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        strip_ansi(&s)
    }

    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// SIGTERM, then wait for exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill").arg("-TERM").arg(self.pid().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = self.exited() {
                return s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                return self.child.wait().unwrap();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

pub struct Server {
    pub dir: tempfile::TempDir,
    pub data_dir: PathBuf,
    pub proc: Option<Proc>,
    pub url: String,
    pub gateway: String,
    pub fingerprint: String,
    pub token: String,
    pub workspace: String,
    pub tenant: String,
}

impl Server {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// `airlock server init`, then `airlock server` on ephemeral loopback ports.
    pub fn start_with(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        let out = Command::new(bin())
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
            data_dir,
            proc: None,
            url: String::new(),
            gateway: String::new(),
            fingerprint: field("ca fingerprint:"),
            token,
            workspace,
            tenant,
            dir,
        };
        s.launch(extra);
        s
    }

    /// Starts (or restarts) the server process over the same data directory.
    pub fn launch(&mut self, extra: &[&str]) {
        let ready = self.dir.path().join("ready.json");
        let _ = std::fs::remove_file(&ready);
        let mut cmd = Command::new(bin());
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
        Command::new(bin())
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
        let mut cmd = Command::new(bin());
        cmd.args(["appliance", "run", "--control-plane", &self.url, "--ca-fingerprint", &self.fingerprint])
            .arg("--state-dir")
            .arg(state_dir)
            .args(extra);
        if let Some(t) = join_token {
            cmd.args(["--join-token", t]);
        }
        let n = std::fs::read_dir(self.dir.path()).map(|d| d.count()).unwrap_or(0);
        Proc::spawn(cmd, self.dir.path().join(format!("appliance-{n}.log")))
    }

    /// Starts an appliance process with its state in `state_dir`.
    pub fn appliance_proc(&self, state_dir: &Path, join_token: Option<&str>, fingerprint: Option<&str>) -> Proc {
        let mut cmd = Command::new(bin());
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
        let out = Command::new(bin()).args(["audit", "export", "--data-dir"]).arg(&self.data_dir).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    /// Audit records with this action and outcome.
    pub fn audited(&self, action: &str, outcome: &str) -> Vec<Value> {
        self.audit_records().into_iter().filter(|r| r["action"] == action && r["outcome"] == outcome).collect()
    }

    pub fn audit_verify(&self) -> Output {
        Command::new(bin()).args(["audit", "verify", "--data-dir"]).arg(&self.data_dir).output().unwrap()
    }
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(Instant::now().elapsed().as_nanos() as u64);
    h.finish() as u32
}

/// The certificate and key an appliance holds, from its state directory.
pub fn credentials(state_dir: &Path) -> (String, String) {
    let text = std::fs::read_to_string(state_dir.join("credentials.pem")).unwrap();
    let at = text.find("-----BEGIN PRIVATE KEY-----").unwrap();
    (text[..at].to_owned(), text[at..].to_owned())
}

/// Attempts a full mTLS handshake plus one read against the gateway with the given client
/// credentials; returns the TLS error the server's alert produced, if any.
pub fn gateway_handshake(gateway: &str, ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<(), String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap()).unwrap();
        let chain = vec![CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap()];
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
        let mut cfg = rustls::ClientConfig::builder_with_provider(airlock_proto::tls::provider())
            .with_protocol_versions(airlock_proto::tls::PROTOCOL_VERSIONS)
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .unwrap();
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        let tcp = tokio::net::TcpStream::connect(gateway).await.map_err(|e| e.to_string())?;
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg));
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let mut tls = connector.connect(name, tcp).await.map_err(|e| e.to_string())?;
        // In TLS 1.3 the server judges our certificate after our Finished: its verdict
        // arrives as an alert on the first read, or as its first HTTP/2 SETTINGS frame.
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
    })
}

pub fn ca_pem(state_dir: &Path) -> String {
    std::fs::read_to_string(state_dir.join("ca.pem")).unwrap()
}

/// Listening TCP/UDP sockets owned by `pid`, from /proc (Linux).
pub fn listening_sockets(pid: u32) -> Vec<String> {
    let mut inodes = std::collections::HashSet::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().flatten() {
        if let Ok(target) = std::fs::read_link(fd.path()) {
            let t = target.to_string_lossy().to_string();
            if let Some(inode) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                inodes.insert(inode.to_owned());
            }
        }
    }
    assert!(!inodes.is_empty(), "process {pid} has no sockets at all; is it connected?");
    let mut listening = Vec::new();
    for table in ["tcp", "tcp6", "udp", "udp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else { continue };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() < 10 || !inodes.contains(cols[9]) {
                continue;
            }
            // TCP state 0A is LISTEN; any UDP socket bound by the process receives datagrams.
            let listens = if table.starts_with("tcp") { cols[3] == "0A" } else { true };
            if listens {
                listening.push(format!("{table} {}", cols[1]));
            }
        }
    }
    listening
}

pub fn count_tcp_sockets(pid: u32) -> usize {
    let mut n = 0;
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().flatten() {
        if std::fs::read_link(fd.path()).is_ok_and(|t| t.to_string_lossy().starts_with("socket:")) {
            n += 1;
        }
    }
    n
}
