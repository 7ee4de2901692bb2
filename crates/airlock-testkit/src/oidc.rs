//! A real OpenID provider for login tests: panva's certified `oidc-provider` (npm), which
//! `scripts/test` installs into the folder named by `AIRLOCK_TEST_OIDC_PROVIDER_DIR`, started on
//! a loopback HTTPS port for one test and killed on drop.
//!
//! Everything a relying party talks to (discovery, authorize, token, JWKS, end_session) is the
//! library's own code; only its login screen is replaced (`oidc-provider/provider.mjs`): it logs
//! in the account the test chose with [`OidcProvider::login_as`] and grants consent, so a login is
//! driven by following redirects ([`OidcProvider::drive_login`]) instead of filling in a form.
//! Accounts (subject → email, groups, amr, acr) live in a file the provider re-reads at every
//! login, so a test can change a user's groups between two logins ([`OidcProvider::set_account`]).
//!
//! The provider's certificate comes from a test CA made here; give [`OidcProvider::ca_file`] to
//! the server as its extra trust root for identity providers.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use airlock_core::Fingerprint;
use airlock_proto::tls::PinnedCaVerifier;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use serde::Serialize;

/// A confidential client (relying party) registered with the provider at start.
#[derive(Clone, Debug, Serialize)]
pub struct OidcClient {
    pub client_id: String,
    pub client_secret: String,
    pub redirect_uris: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub post_logout_redirect_uris: Vec<String>,
    /// `RS256` (the default) or `ES256`.
    pub id_token_signed_response_alg: &'static str,
    /// `client_secret_basic` (the default) or `client_secret_post`.
    pub token_endpoint_auth_method: &'static str,
}

impl OidcClient {
    /// A client with RS256 ID tokens that authenticates at the token endpoint with HTTP Basic.
    pub fn new(client_id: &str, client_secret: &str, redirect_uri: &str) -> Self {
        Self {
            client_id: client_id.to_owned(),
            client_secret: client_secret.to_owned(),
            redirect_uris: vec![redirect_uri.to_owned()],
            post_logout_redirect_uris: Vec::new(),
            id_token_signed_response_alg: "RS256",
            token_endpoint_auth_method: "client_secret_basic",
        }
    }
}

/// A person at the provider: what their ID token says about them and about how they logged in.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Account {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    pub groups: Vec<String>,
    /// Authentication methods, e.g. `["pwd"]` or `["pwd", "mfa"]`; absent from the token if empty.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub amr: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acr: Option<String>,
    /// A provider that says the user authenticated this long ago even at a login it was asked to make fresh
    /// (`prompt=login`, `max_age`): its ID tokens' `auth_time`, in seconds before the login.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authenticated_seconds_ago: Option<u64>,
}

impl Account {
    /// An account in `groups`, logged in with a password only.
    pub fn new(email: &str, groups: &[&str]) -> Self {
        Self {
            email: Some(email.to_owned()),
            groups: groups.iter().map(|g| (*g).to_owned()).collect(),
            amr: vec!["pwd".to_owned()],
            acr: Some(ACR_PASSWORD.to_owned()),
            authenticated_seconds_ago: None,
        }
    }

    /// The same account, its logins claiming to have happened `ago` earlier (an `auth_time` that old).
    pub fn authenticated_ago(mut self, ago: Duration) -> Self {
        self.authenticated_seconds_ago = Some(ago.as_secs());
        self
    }

    /// The same account, logged in with a second factor too.
    pub fn with_mfa(mut self) -> Self {
        self.amr = vec!["pwd".to_owned(), "mfa".to_owned()];
        self.acr = Some(ACR_MFA.to_owned());
        self
    }
}

/// The `acr` of a password-only login, as [`Account::new`] sets it.
pub const ACR_PASSWORD: &str = "urn:airlock:test:pwd";
/// The `acr` of a login with a second factor, as [`Account::with_mfa`] sets it.
pub const ACR_MFA: &str = "urn:airlock:test:mfa";

/// Provider settings beyond its clients.
#[derive(Clone, Debug)]
pub struct Settings {
    /// How long an ID token is valid.
    pub id_token_ttl: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self { id_token_ttl: Duration::from_secs(3600) }
    }
}

/// The accounts file the provider re-reads at every login.
#[derive(Default, Serialize)]
struct AccountsFile {
    accounts: BTreeMap<String, Account>,
    /// The subject the next login logs in; `None`: the user refuses (`access_denied`).
    next_login: Option<String>,
}

/// A running provider, killed on drop.
pub struct OidcProvider {
    child: Child,
    /// Held open: the provider exits when it closes, so even a test that dies leaves none behind.
    _stdin: ChildStdin,
    issuer: String,
    ca_pem: String,
    ca_der: CertificateDer<'static>,
    dir: tempfile::TempDir,
    accounts: Mutex<AccountsFile>,
}

fn provider_dir() -> PathBuf {
    let dir = std::env::var_os("AIRLOCK_TEST_OIDC_PROVIDER_DIR").map(PathBuf::from).unwrap_or_else(|| {
        panic!(
            "AIRLOCK_TEST_OIDC_PROVIDER_DIR is not set; run the tests with scripts/test, which installs oidc-provider (npm) there"
        )
    });
    assert!(
        dir.join("node_modules/oidc-provider/package.json").exists(),
        "{} has no node_modules/oidc-provider; run scripts/test, which installs it",
        dir.display()
    );
    dir
}

/// The provider's start script, committed beside this crate.
fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("oidc-provider/provider.mjs")
}

impl OidcProvider {
    /// Starts a provider with these clients and no accounts yet.
    pub fn start(clients: &[OidcClient]) -> Self {
        Self::start_with(clients, Settings::default())
    }

    pub fn start_with(clients: &[OidcClient], settings: Settings) -> Self {
        let module_dir = provider_dir();
        let dir = tempfile::tempdir().unwrap();
        let (ca_pem, ca_der, leaf_pem, leaf_key_pem) = loopback_certificates();
        std::fs::write(dir.path().join("ca.pem"), &ca_pem).unwrap();
        std::fs::write(dir.path().join("cert.pem"), leaf_pem).unwrap();
        std::fs::write(dir.path().join("key.pem"), leaf_key_pem).unwrap();
        let config = serde_json::json!({
            "cert": dir.path().join("cert.pem"),
            "key": dir.path().join("key.pem"),
            "accounts": dir.path().join("accounts.json"),
            "clients": clients,
            "id_token_ttl_seconds": settings.id_token_ttl.as_secs(),
        });
        let config_file = dir.path().join("config.json");
        std::fs::write(&config_file, config.to_string()).unwrap();
        let log = std::fs::File::create(dir.path().join("provider.log")).unwrap();
        let mut child = Command::new("node")
            .arg(script())
            .arg(&config_file)
            .env("OIDC_PROVIDER_DIR", &module_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start node (Node.js) for the OpenID provider: {e}"));
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        // The provider prints its issuer once it listens; a thread reads it so a provider that
        // hangs fails the test after a deadline instead of blocking it.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_default();
        let issuer = serde_json::from_str::<serde_json::Value>(&line)
            .ok()
            .and_then(|v| v["issuer"].as_str().map(str::to_owned))
            .unwrap_or_default();
        let p =
            Self { child, _stdin: stdin, issuer, ca_pem, ca_der, dir, accounts: Mutex::new(AccountsFile::default()) };
        assert!(!p.issuer.is_empty(), "the OpenID provider did not start: {}", p.log());
        p.write_accounts(&AccountsFile::default());
        p
    }

    /// The issuer URL, `https://127.0.0.1:<port>`, as discovery and every ID token name it.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The test CA that issued the provider's certificate, PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The same CA as a file, for the server's extra identity-provider trust root.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Adds or replaces the account `subject`; the next login and token use the new values.
    pub fn set_account(&self, subject: &str, account: Account) {
        let mut file = self.accounts.lock().unwrap();
        file.accounts.insert(subject.to_owned(), account);
        self.write_accounts(&file);
    }

    /// Removes the account `subject`.
    pub fn remove_account(&self, subject: &str) {
        let mut file = self.accounts.lock().unwrap();
        file.accounts.remove(subject);
        self.write_accounts(&file);
    }

    /// The account the next login (and each one after, until changed) logs in.
    pub fn login_as(&self, subject: &str) {
        let mut file = self.accounts.lock().unwrap();
        assert!(file.accounts.contains_key(subject), "login_as({subject}): no such account; set_account first");
        file.next_login = Some(subject.to_owned());
        self.write_accounts(&file);
    }

    /// The next login is refused by the user: the provider redirects back with `access_denied`.
    pub fn refuse_logins(&self) {
        let mut file = self.accounts.lock().unwrap();
        file.next_login = None;
        self.write_accounts(&file);
    }

    /// Written whole, then renamed into place, so the provider never reads half a file.
    fn write_accounts(&self, file: &AccountsFile) {
        let tmp = self.dir.path().join("accounts.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec(file).unwrap()).unwrap();
        std::fs::rename(&tmp, self.dir.path().join("accounts.json")).unwrap();
    }

    /// The provider's process id (node).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the provider wrote to stderr.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("provider.log")).unwrap_or_default()
    }

    /// A browser: keeps cookies, follows no redirect (so [`Self::drive_login`] sees each one),
    /// and trusts this provider's CA and, if given, the control plane's CA by its fingerprint.
    pub fn browser(&self, control_plane_ca: Option<Fingerprint>) -> reqwest::Client {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca_der.clone()).unwrap();
        let provider = airlock_proto::tls::provider();
        let verifier = Arc::new(EitherCa {
            provider_ca: WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .unwrap(),
            control_plane_ca: control_plane_ca.map(PinnedCaVerifier::new),
        });
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(airlock_proto::tls::PROTOCOL_VERSIONS)
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .cookie_store(true)
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap()
    }

    /// Follows redirects from `login_url` (the control plane's `/v1/auth/login?…`, or the
    /// provider's authorize URL itself) through the provider's login, and returns the URL the
    /// provider finally redirects to outside itself: the relying party's callback, with `code`
    /// and `state` (or `error`), not yet followed, so a test can replay or tamper with it.
    /// `browser` should come from [`Self::browser`] (cookies kept, redirects not followed).
    pub async fn drive_login(&self, browser: &reqwest::Client, login_url: &str) -> String {
        let provider = reqwest::Url::parse(&self.issuer).unwrap();
        let mut url = reqwest::Url::parse(login_url).unwrap_or_else(|e| panic!("login URL {login_url}: {e}"));
        let mut been_at_provider = false;
        for _ in 0..20 {
            let at_provider = url.origin() == provider.origin();
            if been_at_provider && !at_provider {
                return url.into();
            }
            been_at_provider |= at_provider;
            let mut resp = browser.get(url.clone()).send().await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
            if at_provider && resp.status() == reqwest::StatusCode::OK {
                // Logging in another account than the provider's session holds: the provider first ends that session
                // with a page that posts itself (its `form_post` template); a browser submits it, so this one does too.
                let body = resp.text().await.unwrap_or_default();
                let Some((action, fields)) = self_posting_form(&body) else {
                    panic!(
                        "GET {url} answered 200, not a redirect, during a login: {body}\nprovider log:\n{}",
                        self.log()
                    );
                };
                let action = url.join(&action).unwrap();
                assert_eq!(action.origin(), provider.origin(), "the provider's page posts elsewhere: {body}");
                resp =
                    browser.post(action).form(&fields).send().await.unwrap_or_else(|e| panic!("POST from {url}: {e}"));
            }
            let status = resp.status();
            let location = resp.headers().get(reqwest::header::LOCATION).map(|l| l.to_str().unwrap().to_owned());
            let Some(location) = location.filter(|_| status.is_redirection()) else {
                let body = resp.text().await.unwrap_or_default();
                panic!(
                    "{url} answered {status}, not a redirect, during a login: {body}\nprovider log:\n{}",
                    self.log()
                );
            };
            url = url.join(&location).unwrap_or_else(|e| panic!("redirect from {url} to {location}: {e}"));
        }
        panic!("a login from {login_url} did not leave the provider within 20 redirects, at {url}");
    }
}

/// The action and hidden fields of oidc-provider's self-posting page (`lib/response_modes/form_post.js`): one
/// `<form method="post" action="…">` of `<input type="hidden" name="…" value="…"/>`, values HTML-escaped.
fn self_posting_form(html: &str) -> Option<(String, Vec<(String, String)>)> {
    let attr = |tag: &str, name: &str| {
        let start = tag.find(&format!("{name}=\""))? + name.len() + 2;
        let len = tag[start..].find('"')?;
        Some(unescape(&tag[start..start + len]))
    };
    let form = html.split("<form ").nth(1)?.split('>').next()?;
    if !attr(form, "method")?.eq_ignore_ascii_case("post") {
        return None;
    }
    let fields = html
        .split("<input ")
        .skip(1)
        .filter_map(|tag| {
            let tag = tag.split('>').next()?;
            Some((attr(tag, "name")?, attr(tag, "value")?))
        })
        .collect();
    Some((attr(form, "action")?, fields))
}

fn unescape(s: &str) -> String {
    s.replace("&quot;", "\"").replace("&#39;", "'").replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
}

impl Drop for OidcProvider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A test CA and a leaf for `127.0.0.1` it issued: (CA PEM, CA DER, leaf PEM, leaf key PEM).
pub(crate) fn loopback_certificates() -> (String, CertificateDer<'static>, String, String) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "Airlock test identity-provider CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let mut leaf_params = CertificateParams::default();
    leaf_params.subject_alt_names = vec![SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into())];
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
    (ca.pem(), ca.der().clone(), leaf.pem(), leaf_key.serialize_pem())
}

/// Trusts a server whose chain verifies against the provider's CA, or else contains the pinned
/// control-plane CA: one browser talks to both during a login.
#[derive(Debug)]
struct EitherCa {
    provider_ca: Arc<WebPkiServerVerifier>,
    control_plane_ca: Option<Arc<PinnedCaVerifier>>,
}

impl ServerCertVerifier for EitherCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let by_provider_ca =
            self.provider_ca.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now);
        match (&self.control_plane_ca, by_provider_ca) {
            (Some(pinned), Err(_)) => {
                pinned.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            }
            (_, result) => result,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.provider_ca.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.provider_ca.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider_ca.supported_verify_schemes()
    }
}
