//! The Airlock control plane: HTTPS API, appliance gateway, built-in CA, store and audit.
//!
//! Entry points: [`init`] prepares a data directory, [`create_tenant`] adds a tenant to one, [`serve`] runs both listeners, and [`verify_audit`], [`export_audit`] and [`checkpoint_audit`] read the audit chains offline (the last to sign their heads).
//!
//! Map of the crate, from the edge inwards:
//! - [`api`] (HTTPS, axum) and [`gateway`] (mTLS gRPC) are the two doors; the API's gate ([`api::access`]) authenticates ([`authn`]) and authorises every request before its handler parses, calls a domain function and maps its result.
//! - The domain: [`operations`] (requests, approvals, results, releases of output), [`releases`] (vendor releases and their signing keys), [`policy`] (relayed customer policies), [`appliances`] (join, revocation), [`tenancy`] (environments, join tokens), [`tokens`] (scoped API tokens), [`sso`] (identity providers, role mappings, sign-in and sessions).
//! - [`push`] sends instructions down the appliances' streams; [`registry`] holds the live streams; [`seen`] writes last-seen times in batches.
//! - [`state`] is what a running control plane shares; [`store`] is the database, every write in one transaction with its audit record.
//! - [`audit_checkpoints`] signs checkpoints of the audit chains and prunes old anonymous refusals behind them.
//! - [`issuer`] fetches identity providers' and platform issuers' keys (bounded, no private addresses unless allowed) and verifies the tokens they sign.
//! - [`authz`] makes the [`authz::TenantScope`] every tenant-data call demands and holds the one Cedar decision ([`authz::Engine`]); [`ca`], [`signer`], [`keys`] and [`tls`] hold the keys and the TLS configurations; [`clock`] is the one reader of wall-clock time.
//!
//! No module imports one that imports it back: the edge depends on the domain, the domain on [`state`], [`push`] and [`store`], and none of those on the domain.

pub mod api;
pub mod appliances;
pub mod artifacts;
pub mod attestation;
pub mod audit_checkpoints;
pub mod authn;
pub mod authz;
pub mod ca;
pub mod clock;
pub mod deployments;
pub mod gateway;
mod https;
pub mod issuer;
pub mod keys;
pub mod metrics;
pub mod net;
pub mod operations;
pub mod platform_join;
pub mod policy;
pub mod push;
pub mod registry;
pub mod releases;
pub mod rollouts;
pub mod seen;
pub mod signer;
pub mod sso;
pub mod state;
pub mod store;
pub mod tenancy;
pub mod tls;
pub mod tokens;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use airlock_core::audit::{AuditAction, Outcome};
use airlock_core::id::TokenId;
use airlock_core::token::{Secret, TokenKind};
use airlock_core::{Fingerprint, TenantId, WorkspaceId};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::audit_checkpoints::AuditSigner;
use crate::authz::{Role, TenantScope};
use crate::ca::CertificateAuthority;
use crate::clock::Clock;
use crate::keys::{Kek, KekSource};
use crate::state::{AppState, event, random};
use crate::store::{Store, StoreError, StoredCa};

const CA_KEY_AAD: &[u8] = b"airlock ca private key v1";
/// Lifetime of the control plane's own TLS certificates, re-issued at every start.
const SERVER_CERT_LIFETIME: Duration = Duration::from_secs(365 * 86_400);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Key(#[from] keys::KeyError),
    #[error(transparent)]
    Ca(#[from] ca::CaError),
    #[error("data directory {0} is already initialised; use it with `airlock server --data-dir`")]
    AlreadyInitialised(PathBuf),
    #[error("data directory {0} is not initialised; run `airlock server init --data-dir {0}` first")]
    NotInitialised(PathBuf),
    #[error("cannot use data directory {path}: {source}")]
    DataDir { path: PathBuf, source: std::io::Error },
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("another airlock server is already using {0}; one server per data directory")]
    Locked(PathBuf),
    #[error("cannot create the operations-signing identity: {0}")]
    Signer(#[from] signer::SignerError),
    #[error("authorization policies: {0}")]
    Authz(String),
}

/// Everything `airlock server` needs, resolved from defaults, file, environment and flags.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub data_dir: PathBuf,
    pub kek: KekSource,
    pub api_listen: SocketAddr,
    pub gateway_listen: SocketAddr,
    /// DNS names and IPs the server certificates carry, and the first is what appliances dial.
    pub hostnames: Vec<String>,
    /// `host:port` appliances should dial for the gateway, when it differs from the bound one.
    pub gateway_advertise: Option<String>,
    pub appliance_cert_lifetime: Duration,
    pub heartbeat_interval: Duration,
    pub join_token_ttl: Duration,
    /// Operator-supplied certificate chain and key (PEM) for the HTTPS API.
    pub api_tls_files: Option<(PathBuf, PathBuf)>,
    /// Connection caps and deadlines for both listeners.
    pub limits: net::ConnectionLimits,
    /// When the server checkpoints its audit chains and prunes anonymous refusal records.
    pub audit_schedule: audit_checkpoints::Schedule,
    /// How often unfinished rollouts are driven (their deploys' results are read, the next
    /// targets started).
    pub rollout_interval: Duration,
    /// The largest artifact one upload may carry (`--max-artifact-bytes`).
    pub max_artifact_bytes: u64,
    /// The most bytes of artifacts one workspace may hold (`--max-workspace-artifact-bytes`).
    pub max_workspace_artifact_bytes: u64,
    /// STS endpoints AWS join proofs may be sent to (`--aws-sts-endpoint`); empty: the public ones.
    pub aws_sts_endpoints: Vec<String>,
    /// The API's public URL (`--public-url`), for sign-in redirects and the CSRF check; default `https://<first hostname>:<API port>`.
    pub public_url: Option<String>,
    /// Signed-in users' idle and absolute session timeouts.
    pub session_limits: sso::SessionLimits,
    /// What sign-ins in progress may hold per address, network, tenant and in all (`sso::pending`).
    pub sign_in_budget: net::anonymous::Budget,
    /// Extra trust roots for identity providers and platform token issuers (`--issuer-ca-file`).
    pub issuer_roots: Vec<CertificateDer<'static>>,
    /// Whether issuers on private, loopback or link-local addresses may be fetched (`--allow-private-issuers`).
    pub allow_private_issuers: bool,
    /// The issuer GCP identity tokens must come from (`--gcp-issuer`).
    pub gcp_issuer: String,
    /// How old a Kubernetes join token's `iat` may be (`--k8s-max-token-age`).
    pub k8s_max_token_age: Duration,
    /// Accept only Kubernetes tokens from the TokenRequest API, not mounted ones (`--k8s-require-token-request`).
    pub k8s_require_token_request: bool,
    pub clock: Arc<dyn Clock>,
}

impl ServerConfig {
    pub fn new(data_dir: PathBuf) -> Self {
        Self {
            kek: KekSource::default_for(&data_dir),
            data_dir,
            api_listen: SocketAddr::from(([127, 0, 0, 1], 8443)),
            gateway_listen: SocketAddr::from(([127, 0, 0, 1], 8444)),
            hostnames: vec!["localhost".into()],
            gateway_advertise: None,
            appliance_cert_lifetime: Duration::from_secs(30 * 86_400),
            heartbeat_interval: Duration::from_secs(15),
            join_token_ttl: Duration::from_secs(15 * 60),
            api_tls_files: None,
            limits: net::ConnectionLimits::default(),
            audit_schedule: audit_checkpoints::Schedule::default(),
            rollout_interval: Duration::from_secs(1),
            max_artifact_bytes: artifacts::DEFAULT_MAX_ARTIFACT_BYTES,
            max_workspace_artifact_bytes: artifacts::DEFAULT_MAX_WORKSPACE_ARTIFACT_BYTES,
            aws_sts_endpoints: Vec::new(),
            public_url: None,
            session_limits: sso::SessionLimits::default(),
            sign_in_budget: sso::pending::PendingLogins::BUDGET,
            issuer_roots: Vec::new(),
            allow_private_issuers: false,
            gcp_issuer: platform_join::DEFAULT_GCP_ISSUER.to_owned(),
            k8s_max_token_age: platform_join::tokens::DEFAULT_K8S_MAX_TOKEN_AGE,
            k8s_require_token_request: false,
            clock: Arc::new(clock::SystemClock),
        }
    }
}

/// What `airlock server init` and `tenant create` report once.
#[derive(Debug)]
pub struct Bootstrap {
    pub tenant: TenantId,
    pub workspace: WorkspaceId,
    /// Printed once; only its hash is stored.
    pub admin_token: Secret,
    pub ca_fingerprint: Fingerprint,
}

/// Prepares a new data directory: KEK, database, CA, first tenant, workspace and admin token.
pub async fn init(
    data_dir: &Path,
    kek: &KekSource,
    trust_domain: &str,
    tenant_name: &str,
    workspace_name: &str,
    clock: &dyn Clock,
) -> Result<Bootstrap, ServerError> {
    if !airlock_core::identity::is_valid_trust_domain(trust_domain) {
        return Err(ServerError::Config(format!(
            "trust domain `{trust_domain}` must be lowercase letters, digits, `.`, `-` or `_`"
        )));
    }
    std::fs::create_dir_all(data_dir).map_err(|source| ServerError::DataDir { path: data_dir.into(), source })?;
    if data_dir.join(store::DB_FILE_NAME).exists() {
        return Err(ServerError::AlreadyInitialised(data_dir.into()));
    }
    restrict_dir(data_dir)?;
    let kek_key = kek.create_if_missing()?;
    let store = Store::open(data_dir, true, kek_key.audit_mac_key()).await?;
    let now = clock.now();
    let (ca, ca_key_pem) = CertificateAuthority::generate(trust_domain, now)?;
    let sealed = kek_key.seal(ca_key_pem.as_bytes(), CA_KEY_AAD)?;
    let mut tx = store.write().await?;
    tx.put_ca(&StoredCa { trust_domain: trust_domain.into(), cert_pem: ca.cert_pem().into(), key_sealed: sealed }, now)
        .await?;
    tx.commit().await?;
    AuditSigner::load_or_create(&store, &kek_key, now).await?.publish(data_dir)?;
    let out = add_tenant(&store, ca.fingerprint(), tenant_name, workspace_name, now).await?;
    store.close().await;
    Ok(out)
}

/// Adds a tenant with one workspace and an admin token to an initialised data directory.
pub async fn create_tenant(
    data_dir: &Path,
    kek: &KekSource,
    tenant_name: &str,
    workspace_name: &str,
    clock: &dyn Clock,
) -> Result<Bootstrap, ServerError> {
    let (store, kek_key) = open_existing(data_dir, kek).await?;
    let ca = load_ca(&store, &kek_key).await?;
    let out = add_tenant(&store, ca.fingerprint(), tenant_name, workspace_name, clock.now()).await?;
    store.close().await;
    Ok(out)
}

async fn add_tenant(
    store: &Store,
    ca_fingerprint: Fingerprint,
    tenant_name: &str,
    workspace_name: &str,
    now: airlock_core::Timestamp,
) -> Result<Bootstrap, ServerError> {
    let tenant = TenantId::from_random(random());
    let workspace = WorkspaceId::from_random(random());
    let token_id = TokenId::from_random(random());
    let admin_token = Secret::from_random(TokenKind::Api, random());
    let mut tx = store.write().await?;
    tx.create_tenant(tenant, tenant_name, now).await?;
    tx.create_workspace(tenant, workspace, workspace_name, now).await?;
    // The console's owner token: no expiry and no action list, since nothing could make another without it.
    let grants = authz::Grants::token(Role::Owner, None, None, None);
    let new_token = store::NewToken {
        id: token_id,
        hash: &admin_token.hash(),
        name: "initial admin",
        grants: &grants,
        created_by: None,
    };
    tx.create_api_token(tenant, new_token, now).await?;
    let scope = TenantScope::for_local_operator(tenant, token_id);
    let mut ev = event("local-operator", AuditAction::TenantCreate, Outcome::Success);
    ev.target = Some(tenant.to_string());
    ev.workspace = Some(workspace.to_string());
    ev.detail = serde_json::json!({ "tenant_name": tenant_name, "workspace_name": workspace_name, "admin_token": token_id.to_string() });
    tx.audit(&scope.chain(), now, ev).await?;
    tx.commit().await?;
    Ok(Bootstrap { tenant, workspace, admin_token, ca_fingerprint })
}

async fn open_existing(data_dir: &Path, kek: &KekSource) -> Result<(Store, Kek), ServerError> {
    if !data_dir.join(store::DB_FILE_NAME).exists() {
        return Err(ServerError::NotInitialised(data_dir.into()));
    }
    let kek_key = kek.load()?;
    let store = Store::open(data_dir, false, kek_key.audit_mac_key()).await?;
    Ok((store, kek_key))
}

/// The built-in CA of a data directory, as `serve` loads it: for the operator's own tooling on
/// the control plane host, and for tests that play the vendor forging with its own CA.
pub async fn open_ca(data_dir: &Path, kek: &KekSource) -> Result<CertificateAuthority, ServerError> {
    let (store, kek) = open_existing(data_dir, kek).await?;
    load_ca(&store, &kek).await
}

async fn load_ca(store: &Store, kek: &Kek) -> Result<CertificateAuthority, ServerError> {
    let stored = store.load_ca().await?.ok_or_else(|| ServerError::Config("the database holds no CA".into()))?;
    let key_pem = kek.open(&stored.key_sealed, CA_KEY_AAD)?;
    let key_pem = String::from_utf8(key_pem).map_err(|_| ca::CaError::Stored("CA key is not PEM".into()))?;
    Ok(CertificateAuthority::load(&stored.trust_domain, &stored.cert_pem, &key_pem)?)
}

/// The outcome of verifying every audit chain in a data directory.
#[derive(Debug)]
pub struct AuditReport {
    pub chains: Vec<ChainReport>,
    /// Whether head MACs were checked (they need the KEK).
    pub head_macs_checked: bool,
    /// How many checkpoints were checked; or why the checkpoint file could not be used.
    pub checkpoints: Result<usize, String>,
}

#[derive(Debug)]
pub struct ChainReport {
    pub chain: String,
    /// Number of records on success, or the first break.
    pub result: Result<u64, String>,
}

impl AuditReport {
    pub fn ok(&self) -> bool {
        self.checkpoints.is_ok() && self.chains.iter().all(|c| c.result.is_ok())
    }
}

/// What `airlock audit verify` checks a data directory against, besides its own chains.
#[derive(Clone, Debug, Default)]
pub struct AuditEvidence {
    /// A file of signed checkpoints (`airlock audit checkpoint`, or the server's own).
    pub checkpoints: Option<PathBuf>,
    /// The audit key's public half (PEM), as the operator keeps it; required for checkpoints
    /// without the KEK [default, with the KEK: the key sealed in the store].
    pub audit_key: Option<PathBuf>,
}

/// Verifies every audit chain in `data_dir`, opening the database read-only.
///
/// With checkpoints, the KEK is optional: without it head MACs are not checked, and the
/// checkpoints (checked with the audit key's public half) are what shows deletion,
/// truncation and rollback.
pub async fn verify_audit(
    data_dir: &Path,
    kek: &KekSource,
    evidence: &AuditEvidence,
) -> Result<AuditReport, ServerError> {
    if !data_dir.join(store::DB_FILE_NAME).exists() {
        return Err(ServerError::NotInitialised(data_dir.into()));
    }
    let kek = match (kek.load(), &evidence.checkpoints) {
        (Ok(kek), _) => Some(kek),
        (Err(_), Some(_)) if evidence.audit_key.is_none() => {
            return Err(ServerError::Config(
                "without the KEK, checkpoints are checked only with the audit key you keep (--audit-key, from `GET /v1/ca`): the data directory's copy is whatever its last editor left".into(),
            ));
        }
        (Err(_), Some(_)) => None,
        (Err(e), None) => return Err(e.into()),
    };
    let head_macs_checked = kek.is_some();
    // Without the KEK, MACs are not checked: any key will do to open the store.
    let head_mac =
        kek.as_ref().map_or_else(|| ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &random::<32>()), Kek::audit_mac_key);
    let store = Store::open_read_only(data_dir, head_mac).await?;
    let audit_key = audit_public_key(evidence.audit_key.as_deref(), kek.as_ref(), &store).await?;
    let mut options = store::VerifyOptions { head_macs: head_macs_checked, audit_key, checkpoints: Vec::new() };
    let checkpoints = match &evidence.checkpoints {
        None => Ok(0),
        Some(path) => read_checkpoints(path, options.audit_key.as_ref()).map(|cps| {
            options.checkpoints = cps;
            options.checkpoints.len()
        }),
    };
    let chains = store::verify_all_chains_with(&store, &options)
        .await?
        .into_iter()
        .map(|(chain, r)| ChainReport { chain, result: r.map(|h| h.seq) })
        .collect();
    store.close().await;
    Ok(AuditReport { chains, head_macs_checked, checkpoints })
}

/// The audit key to verify with: the operator's copy, else (with the KEK) the one sealed in the
/// store, which proves its own public half; never a public half anyone could have rewritten.
async fn audit_public_key(
    given: Option<&Path>,
    kek: Option<&Kek>,
    store: &Store,
) -> Result<Option<airlock_core::customer_key::CustomerPublicKey>, ServerError> {
    if let Some(path) = given {
        let pem = read_text(path)?;
        return airlock_core::customer_key::CustomerPublicKey::from_pem(&pem)
            .map(Some)
            .map_err(|e| ServerError::Config(format!("the audit key is not an Ed25519 public key (PEM): {e}")));
    }
    match (kek, store.load_audit_key().await?) {
        (Some(kek), Some(_)) => Ok(Some(AuditSigner::load(store, kek).await?.public())),
        _ => Ok(None),
    }
}

fn read_text(path: &Path) -> Result<String, ServerError> {
    std::fs::read_to_string(path).map_err(|source| ServerError::DataDir { path: path.into(), source })
}

fn read_checkpoints(
    path: &Path,
    key: Option<&airlock_core::customer_key::CustomerPublicKey>,
) -> Result<Vec<(usize, airlock_core::audit::checkpoint::Checkpoint)>, String> {
    let key = key.ok_or("no audit key to check the checkpoints with; give --key")?;
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    airlock_core::audit::checkpoint::read_lines(text.lines(), key).map_err(|e| e.to_string())
}

/// Signed checkpoints of every audit chain's head now, one line each, read-only.
pub async fn checkpoint_audit(data_dir: &Path, kek: &KekSource, clock: &dyn Clock) -> Result<Vec<String>, ServerError> {
    if !data_dir.join(store::DB_FILE_NAME).exists() {
        return Err(ServerError::NotInitialised(data_dir.into()));
    }
    let kek = kek.load()?;
    let store = Store::open_read_only(data_dir, kek.audit_mac_key()).await?;
    let signer = AuditSigner::load(&store, &kek).await?;
    let lines = signer
        .checkpoint_all(&store, clock.now(), airlock_core::audit::checkpoint::CheckpointReason::Requested)
        .await?;
    store.close().await;
    Ok(lines)
}

/// Every audit record of every chain (or of one chain), read-only, in chain order.
pub async fn export_audit(
    data_dir: &Path,
    kek: &KekSource,
    chain: Option<&str>,
) -> Result<Vec<airlock_core::audit::Record>, ServerError> {
    if !data_dir.join(store::DB_FILE_NAME).exists() {
        return Err(ServerError::NotInitialised(data_dir.into()));
    }
    let store = Store::open_read_only(data_dir, kek.load()?.audit_mac_key()).await?;
    let chains = match chain {
        Some(c) => vec![c.to_owned()],
        None => store.audit_chains().await?,
    };
    let mut out = Vec::new();
    for c in chains {
        for r in store.audit_records(&c).await? {
            match r {
                Ok(rec) => out.push(rec),
                Err(seq) => {
                    return Err(ServerError::Store(StoreError::Corrupt(format!(
                        "chain {c} record seq {seq} is not canonical; run `airlock audit verify`"
                    ))));
                }
            }
        }
    }
    store.close().await;
    Ok(out)
}

/// A control plane that is serving. Dropping it does not stop it; call [`RunningServer::shutdown`].
#[derive(Debug)]
pub struct RunningServer {
    pub api_addr: SocketAddr,
    pub gateway_addr: SocketAddr,
    pub gateway_endpoint: String,
    pub ca_fingerprint: Fingerprint,
    pub ca_pem: String,
    stop_accepting: tokio::sync::watch::Sender<bool>,
    shutdown: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    state: Arc<AppState>,
    audit_signer: Arc<AuditSigner>,
    audit_schedule: audit_checkpoints::Schedule,
    data_dir: PathBuf,
    /// Held for the server's life: a second server on the same data directory would race
    /// this one's in-memory state (live streams, revocations).
    _lock: std::fs::File,
}

impl RunningServer {
    pub fn api_url(&self) -> String {
        format!("https://{}", host_port(&self.state.gateway_server_name, self.api_addr.port()))
    }

    /// Ends every appliance stream, records their last-seen, stops both listeners, writes the
    /// queued audit records and closes the store, in that order, so nothing accepted is lost.
    pub async fn shutdown(self) {
        // No new connections first, or kicked appliances would reconnect during the drain.
        let _ = self.stop_accepting.send(true);
        let live = self.state.registry.kick_all(registry::Kick::ShuttingDown);
        tracing::info!(streams = live, "ending appliance streams");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while self.state.seen.live_sessions() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.state.seen.flush().await;
        self.state.authn.usage.flush(&self.state.store).await;
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        // Read records queued by the last requests are written before the store closes.
        self.state.audit_writer.flush().await;
        // The last word of this run: every chain's head, signed (a stop does not prune).
        let reason = airlock_core::audit::checkpoint::CheckpointReason::Stop;
        let (state, signer) = (&self.state, &self.audit_signer);
        audit_checkpoints::round(
            &state.store,
            signer,
            state.clock.as_ref(),
            &self.data_dir,
            &self.audit_schedule,
            reason,
        )
        .await;
        self.state.store.close().await;
    }
}

/// Opens the data directory, binds both listeners and serves until shut down.
pub async fn serve(config: ServerConfig) -> Result<RunningServer, ServerError> {
    // Refuse to start on a policy set that does not validate against its schema.
    let authz_engine = Arc::new(authz::Engine::load().map_err(|e| ServerError::Authz(e.to_string()))?);
    let (store, kek) = open_existing(&config.data_dir, &config.kek).await?;
    let lock = lock_data_dir(&config.data_dir)?;
    let ca = load_ca(&store, &kek).await?;
    let now = config.clock.now();
    let audit_signer = Arc::new(AuditSigner::load_or_create(&store, &kek, now).await?);
    audit_signer.publish(&config.data_dir)?;
    let revoked = Arc::new(tls::RevokedSet::default());
    for id in store.revoked_appliances().await? {
        revoked.insert(id);
    }
    let mut names = config.hostnames.clone();
    for extra in ["localhost", "127.0.0.1", "::1"] {
        if !names.iter().any(|n| n == extra) {
            names.push(extra.to_owned());
        }
    }
    let (server_cert, server_key) = ca.issue_server_cert(&names, now, SERVER_CERT_LIFETIME)?;
    let file_limit = net::files::raise_nofile_limit();
    if file_limit.soft > file_limit.started_with {
        tracing::info!(from = file_limit.started_with, to = file_limit.soft, "raised the open-file limit");
    }
    let pools = net::Pools::new(&config.limits, file_limit.soft);
    let gateway_chain = vec![server_cert.der.clone(), ca.cert_der().clone()];

    let api_listener = bind(config.api_listen).await?;
    let gateway_listener = bind(config.gateway_listen).await?;
    let api_addr = local_addr(&api_listener, config.api_listen)?;
    let gateway_addr = local_addr(&gateway_listener, config.gateway_listen)?;
    let host = names.first().cloned().unwrap_or_else(|| "localhost".into());
    let gateway_endpoint = config.gateway_advertise.clone().unwrap_or_else(|| host_port(&host, gateway_addr.port()));
    let gateway_server_name = gateway_endpoint
        .rsplit_once(':')
        .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']').to_owned())
        .unwrap_or_else(|| host.clone());

    let api_tls = match &config.api_tls_files {
        Some((cert, key)) => {
            let (chain, key) = read_tls_files(cert, key)?;
            tls::api_server_config(chain, key, config.clock.clone())
        }
        None => tls::api_server_config(gateway_chain.clone(), server_key.clone_key(), config.clock.clone()),
    }
    .map_err(|e| ServerError::Tls(e.to_string()))?;
    let (refused_tx, refused_rx) = tokio::sync::mpsc::unbounded_channel();
    let gateway_tls = tls::gateway_server_config(
        ca.cert_der(),
        gateway_chain,
        server_key,
        ca.trust_domain(),
        revoked.clone(),
        refused_tx,
        config.clock.clone(),
    )
    .map_err(|e| ServerError::Tls(e.to_string()))?;

    let ca_fingerprint = ca.fingerprint();
    let ca_pem = ca.cert_pem().to_owned();
    let ops_signer = signer::OperationsSigner::generate(&ca, now)?;
    let artifacts = artifacts::ArtifactStore::open(
        &config.data_dir,
        config.max_artifact_bytes,
        config.max_workspace_artifact_bytes,
    )
    .map_err(|source| ServerError::DataDir { path: config.data_dir.join("artifacts"), source })?;
    let platform = platform_join::PlatformJoin::new(&platform_join::PlatformConfig {
        sts_endpoints: config.aws_sts_endpoints.clone(),
        gcp_issuer: config.gcp_issuer.clone(),
        k8s_max_token_age: config.k8s_max_token_age,
        k8s_require_token_request: config.k8s_require_token_request,
    })
    .map_err(ServerError::Config)?;
    let public_url = match &config.public_url {
        Some(url) => {
            let parsed = reqwest::Url::parse(url).map_err(|e| ServerError::Config(format!("--public-url: {e}")))?;
            if parsed.scheme() != "https" || parsed.path() != "/" || parsed.query().is_some() {
                return Err(ServerError::Config("--public-url must be https://host[:port], with no path".into()));
            }
            url.trim_end_matches('/').to_owned()
        }
        // What `RunningServer::api_url` reports.
        None => format!("https://{}", host_port(&gateway_server_name, api_addr.port())),
    };
    let issuers = issuer::IssuerClient::new(config.issuer_roots.clone(), config.allow_private_issuers)
        .map_err(ServerError::Config)?;
    let store = Arc::new(store);
    let registry = Arc::new(registry::Registry::default());
    let push = push::Pusher::load(store.clone(), registry.clone()).await?;
    let metrics = metrics::Metrics::default();
    let state = Arc::new(AppState {
        seen: seen::SeenWriter::spawn(store.clone()),
        audit_writer: store::AuditWriter::spawn(store.clone(), metrics.audit.clone()),
        store,
        ca,
        ops_signer: Arc::new(ops_signer),
        kek,
        clock: config.clock.clone(),
        registry,
        revoked,
        push,
        metrics,
        refusal_limiter: state::RefusalLimiter::default(),
        authz: authz_engine.clone(),
        authn: authn::Authenticator::default(),
        templates: operations::CompiledTemplates::default(),
        appliance_cert_lifetime: config.appliance_cert_lifetime,
        heartbeat_interval: config.heartbeat_interval,
        join_token_ttl: config.join_token_ttl,
        gateway_endpoint: gateway_endpoint.clone(),
        gateway_server_name,
        audit_key_pem: audit_signer.public_pem().to_owned(),
        artifacts,
        platform,
        sso: sso::Sso::new(&public_url, config.session_limits, config.sign_in_budget),
        issuers: Arc::new(issuer::Issuers::new(issuers)),
    });
    let (stop_accepting, accepting_rx) = tokio::sync::watch::channel(false);
    let (shutdown, shutdown_rx) = tokio::sync::watch::channel(false);
    let shutdown_rx_for_audit = shutdown_rx.clone();
    let shutdown_rx_for_rollouts = shutdown_rx.clone();
    let shutdown_rx_for_token_usage = shutdown_rx.clone();
    let router = api::router(state.clone());
    let api = https::Api {
        tls: api_tls,
        router,
        pool: pools.api,
        limits: config.limits,
        counters: state.metrics.connections.clone(),
    };
    let api_task = tokio::spawn(https::serve(api_listener, api, accepting_rx.clone(), shutdown_rx.clone()));
    let gw_state = state.clone();
    let gateway_limits = gateway::GatewayLimits {
        handshakes: pools.gateway_handshakes,
        streams: pools.gateway_streams,
        hello_timeout: config.limits.gateway_hello_timeout,
        handshake_timeout: config.limits.tls_handshake_timeout,
    };
    let gateway_task = tokio::spawn(async move {
        let listeners = gateway::Listeners { stop_accepting: accepting_rx, shutdown: shutdown_rx };
        let served = gateway::serve(gw_state, gateway_listener, gateway_tls, refused_rx, listeners, gateway_limits);
        if let Err(e) = served.await {
            tracing::error!(error = %e, "gateway stopped");
        }
    });
    let checkpoint_task = tokio::spawn(audit_checkpoints::run(
        state.store.clone(),
        audit_signer.clone(),
        config.clock.clone(),
        config.data_dir.clone(),
        config.audit_schedule,
        shutdown_rx_for_audit,
    ));
    let token_usage_task = tokio::spawn(authn::TokenUsage::run(state.clone(), shutdown_rx_for_token_usage));
    let rollout_task = tokio::spawn(rollouts::run(state.clone(), config.rollout_interval, shutdown_rx_for_rollouts));
    tracing::info!(%api_addr, %gateway_addr, %gateway_endpoint, %ca_fingerprint, "control plane serving");
    Ok(RunningServer {
        api_addr,
        gateway_addr,
        gateway_endpoint,
        ca_fingerprint,
        ca_pem,
        stop_accepting,
        shutdown,
        tasks: vec![api_task, gateway_task, checkpoint_task, rollout_task, token_usage_task],
        state,
        audit_signer,
        audit_schedule: config.audit_schedule,
        data_dir: config.data_dir.clone(),
        _lock: lock,
    })
}

fn lock_data_dir(data_dir: &Path) -> Result<std::fs::File, ServerError> {
    let path = data_dir.join("airlock.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| ServerError::DataDir { path: path.clone(), source })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(ServerError::Locked(data_dir.into())),
        Err(std::fs::TryLockError::Error(source)) => Err(ServerError::DataDir { path, source }),
    }
}

fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") }
}

async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, ServerError> {
    tokio::net::TcpListener::bind(addr).await.map_err(|source| ServerError::Bind { addr, source })
}

fn local_addr(l: &tokio::net::TcpListener, addr: SocketAddr) -> Result<SocketAddr, ServerError> {
    l.local_addr().map_err(|source| ServerError::Bind { addr, source })
}

fn read_tls_files(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), ServerError> {
    use rustls::pki_types::pem::PemObject;
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| ServerError::Tls(format!("reading certificate chain {}: {e}", cert.display())))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| ServerError::Tls(format!("reading private key {}: {e}", key.display())))?;
    Ok((chain, key))
}

#[cfg(unix)]
fn restrict_dir(dir: &Path) -> Result<(), ServerError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|source| ServerError::DataDir { path: dir.into(), source })
}

#[cfg(not(unix))]
fn restrict_dir(_dir: &Path) -> Result<(), ServerError> {
    Ok(())
}

/// Builds the shared state over an initialised data directory without binding listeners,
/// for driving [`api::router`] in memory.
#[cfg(test)]
pub(crate) async fn test_state(data_dir: &Path, clock: Arc<dyn Clock>) -> Arc<AppState> {
    let issuers = issuer::IssuerClient::new(Vec::new(), true).expect("the issuer client builds");
    test_state_with_issuers(data_dir, clock, Arc::new(issuer::Issuers::new(issuers))).await
}

/// [`test_state`] with these issuers (a test's own identity provider, under its own CA).
#[cfg(test)]
pub(crate) async fn test_state_with_issuers(
    data_dir: &Path,
    clock: Arc<dyn Clock>,
    issuers: Arc<issuer::Issuers>,
) -> Arc<AppState> {
    let authz_engine = Arc::new(authz::Engine::load().expect("the Cedar policies validate"));
    let (store, kek) = open_existing(data_dir, &KekSource::default_for(data_dir)).await.expect("open data dir");
    let ca = load_ca(&store, &kek).await.expect("load CA");
    let audit_signer = AuditSigner::load_or_create(&store, &kek, clock.now()).await.expect("audit key");
    let ops_signer = signer::OperationsSigner::generate(&ca, clock.now()).expect("operations signer");
    let store = Arc::new(store);
    let registry = Arc::new(registry::Registry::default());
    let push = push::Pusher::load(store.clone(), registry.clone()).await.expect("load the push index");
    let metrics = metrics::Metrics::default();
    Arc::new(AppState {
        seen: seen::SeenWriter::spawn(store.clone()),
        audit_writer: store::AuditWriter::spawn(store.clone(), metrics.audit.clone()),
        store,
        ca,
        ops_signer: Arc::new(ops_signer),
        kek,
        clock,
        registry,
        revoked: Arc::new(tls::RevokedSet::default()),
        push,
        metrics,
        refusal_limiter: state::RefusalLimiter::default(),
        authz: authz_engine.clone(),
        authn: authn::Authenticator::default(),
        templates: operations::CompiledTemplates::default(),
        appliance_cert_lifetime: Duration::from_secs(3600),
        heartbeat_interval: Duration::from_secs(15),
        join_token_ttl: Duration::from_secs(15 * 60),
        gateway_endpoint: "127.0.0.1:1".into(),
        gateway_server_name: "127.0.0.1".into(),
        audit_key_pem: audit_signer.public_pem().to_owned(),
        artifacts: artifacts::ArtifactStore::open(data_dir, 4 * 1024 * 1024, 16 * 1024 * 1024).expect("artifact store"),
        platform: platform_join::PlatformJoin::new(&platform_join::PlatformConfig::default())
            .expect("the STS client builds"),
        sso: sso::Sso::new("https://127.0.0.1:1", sso::SessionLimits::default(), sso::pending::PendingLogins::BUDGET),
        issuers,
    })
}
