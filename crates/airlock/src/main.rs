//! The `airlock` binary: parses arguments, resolves configuration and calls the libraries.
// Printing results to stdout is this binary's job; logs go to stderr.
#![allow(clippy::print_stdout)]

#[cfg(feature = "appliance")]
mod appliance_local;
mod approvals;
mod client;
mod customer;
mod deployments;
#[cfg(all(feature = "server", feature = "appliance"))]
mod dev;
mod login;
mod operations;
mod releases;
mod terminal;
mod tokens;

use std::path::PathBuf;
use std::process::ExitCode;

use airlock_core::Fingerprint;
use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "airlock",
    version,
    about = "Run your product in your customers' environments while they keep the keys."
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "AIRLOCK_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the control plane, or prepare its data directory.
    #[cfg(feature = "server")]
    Server(Box<ServerCmd>),
    /// Run an appliance, or list and revoke appliances through the API.
    Appliance(ApplianceCmd),
    /// Manage environments through the API.
    Env(EnvCmd),
    /// Push and list operation templates through the API.
    Template(operations::TemplateCmd),
    /// Vendor releases: register release keys, push signed release directories, list releases.
    Release(releases::ReleaseCmd),
    /// Deploy a pushed release to an environment (a Deploy-phase operation).
    Deploy(deployments::DeployArgs),
    /// Deploy a release to many environments, a few at a time, halting past a failure threshold.
    Rollout(deployments::RolloutArgs),
    /// Run a task of the release running in an environment (e.g. migrate): an Operate-phase operation.
    Task(deployments::TaskArgs),
    /// Request signed operations and read their manifests and released output.
    Op(operations::OpCmd),
    /// Scoped API tokens: create (the secret printed once), list, rotate, revoke.
    Token(tokens::TokenCmd),
    /// Sign in through your tenant's identity provider (a browser); later commands use the session.
    Login(login::LoginArgs),
    /// End the session `airlock login` made, and forget it.
    Logout,
    /// The tenant's OpenID identity provider (owners and admins).
    Idp(login::IdpCmd),
    /// Map identity-provider groups to roles (owners and admins).
    RoleMapping(login::RoleMappingCmd),
    /// Verify audit logs.
    Audit(AuditCmd),
    /// Customer-side tools: keys, policy, approvals (run on the customer's machine).
    Customer(CustomerCmd),
    /// Verify operation manifests offline, with public keys and the CA certificate only.
    Verify(VerifyArgs),
    /// Run a local control plane, environment and appliance together.
    #[cfg(all(feature = "server", feature = "appliance"))]
    Dev(dev::DevArgs),
}

// ---------------- server ----------------

#[cfg(feature = "server")]
#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
struct ServerCmd {
    #[command(subcommand)]
    command: Option<ServerSub>,
    #[command(flatten)]
    run: ServerRunArgs,
}

#[cfg(feature = "server")]
#[derive(Subcommand)]
enum ServerSub {
    /// Create the data directory: CA, first tenant and workspace, and an admin API token.
    Init(InitArgs),
    /// Administer tenants directly on the data directory.
    Tenant {
        #[command(subcommand)]
        command: TenantSub,
    },
}

#[cfg(feature = "server")]
#[derive(Subcommand)]
enum TenantSub {
    /// Add a tenant with one workspace and print its admin API token once.
    Create {
        name: String,
        #[arg(long, default_value = "default")]
        workspace: String,
        #[command(flatten)]
        data: DataDirArgs,
    },
}

#[derive(Args, Clone)]
struct DataDirArgs {
    /// The control plane's data directory.
    #[arg(long, env = "AIRLOCK_DATA_DIR")]
    data_dir: PathBuf,
    /// Key-encryption key file (default: <data-dir>/kek.key). AIRLOCK_KEK (64 hex digits) overrides.
    #[arg(long, env = "AIRLOCK_KEK_FILE")]
    kek_file: Option<PathBuf>,
}

#[cfg(feature = "server")]
impl DataDirArgs {
    fn kek(&self) -> airlock_server::keys::KekSource {
        use airlock_server::keys::KekSource;
        if let Some(hex) = std::env::var("AIRLOCK_KEK").ok().filter(|v| !v.is_empty()) {
            return KekSource::Env(hex);
        }
        match &self.kek_file {
            Some(p) => KekSource::File(p.clone()),
            None => KekSource::default_for(&self.data_dir),
        }
    }
}

#[cfg(feature = "server")]
#[derive(Args)]
struct InitArgs {
    #[command(flatten)]
    data: DataDirArgs,
    #[arg(long, default_value = "default")]
    tenant: String,
    #[arg(long, default_value = "default")]
    workspace: String,
    /// SPIFFE trust domain for appliance identities.
    #[arg(long, default_value = "airlock.local")]
    trust_domain: String,
}

#[cfg(feature = "server")]
#[derive(Args)]
struct ServerRunArgs {
    /// The control plane's data directory (see `airlock server init`).
    #[arg(long, env = "AIRLOCK_DATA_DIR")]
    data_dir: Option<PathBuf>,
    #[arg(long, env = "AIRLOCK_KEK_FILE")]
    kek_file: Option<PathBuf>,
    /// TOML file with any of these settings (flags and AIRLOCK_* variables win).
    #[arg(long, env = "AIRLOCK_CONFIG")]
    config: Option<PathBuf>,
    /// HTTPS API address [default: 127.0.0.1:8443].
    #[arg(long, env = "AIRLOCK_LISTEN")]
    listen: Option<std::net::SocketAddr>,
    /// Appliance gateway (mTLS) address [default: 127.0.0.1:8444].
    #[arg(long, env = "AIRLOCK_GATEWAY_LISTEN")]
    gateway_listen: Option<std::net::SocketAddr>,
    /// Names for the server certificates; the first is what appliances dial [default: localhost].
    #[arg(long = "hostname", env = "AIRLOCK_HOSTNAMES", value_delimiter = ',')]
    hostnames: Vec<String>,
    /// host:port appliances should dial for the gateway, if not the bound one.
    #[arg(long, env = "AIRLOCK_GATEWAY_ADVERTISE")]
    gateway_advertise: Option<String>,
    /// Appliance certificate lifetime, e.g. 30d, 1h, 6s [default: 30d].
    #[arg(long, env = "AIRLOCK_APPLIANCE_CERT_LIFETIME", value_parser = parse_duration)]
    appliance_cert_lifetime: Option<std::time::Duration>,
    /// Default lifetime of join tokens [default: 15m].
    #[arg(long, env = "AIRLOCK_JOIN_TOKEN_TTL", value_parser = parse_duration)]
    join_token_ttl: Option<std::time::Duration>,
    /// Interval appliances should heartbeat at [default: 15s].
    #[arg(long, env = "AIRLOCK_HEARTBEAT_INTERVAL", value_parser = parse_duration)]
    heartbeat_interval: Option<std::time::Duration>,
    /// The largest release artifact one upload may carry, in bytes [default: 2 GiB].
    #[arg(long, env = "AIRLOCK_MAX_ARTIFACT_BYTES")]
    max_artifact_bytes: Option<u64>,
    /// The most bytes of release artifacts one workspace may hold [default: 100 GiB].
    #[arg(long, env = "AIRLOCK_MAX_WORKSPACE_ARTIFACT_BYTES")]
    max_workspace_artifact_bytes: Option<u64>,
    /// An STS endpoint appliances' AWS join proofs may be sent to, e.g. a test emulator
    /// (repeat for several); given, it replaces the default, https://sts.amazonaws.com and
    /// https://sts.<region>.amazonaws.com.
    #[arg(long = "aws-sts-endpoint", env = "AIRLOCK_AWS_STS_ENDPOINTS", value_delimiter = ',')]
    aws_sts_endpoints: Vec<String>,
    /// The API's public URL (https://host[:port]): sign-in redirects come back to it, and a browser's unsafe requests
    /// must carry it as `Origin` [default: https://<first hostname>:<API port>].
    #[arg(long, env = "AIRLOCK_PUBLIC_URL")]
    public_url: Option<String>,
    /// A signed-in user's session ends after this long without a request [default: 30m].
    #[arg(long, env = "AIRLOCK_SESSION_IDLE_TIMEOUT", value_parser = parse_duration)]
    session_idle_timeout: Option<std::time::Duration>,
    /// A signed-in user's session ends this long after sign-in, used or not [default: 12h].
    #[arg(long, env = "AIRLOCK_SESSION_MAX_LIFETIME", value_parser = parse_duration)]
    session_max_lifetime: Option<std::time::Duration>,
    /// A PEM file of CA certificates to trust, besides the system's, for identity providers and
    /// platform token issuers (repeat for several).
    #[arg(long = "issuer-ca-file", env = "AIRLOCK_ISSUER_CA_FILES", value_delimiter = ',')]
    issuer_ca_files: Vec<PathBuf>,
    /// Let identity providers and platform token issuers be on private, loopback or link-local
    /// addresses (an issuer on your own network); off by default, so a tenant's issuer URL cannot
    /// reach the control plane's network.
    #[arg(long, env = "AIRLOCK_ALLOW_PRIVATE_ISSUERS")]
    allow_private_issuers: bool,
    /// The issuer of GCP instance identity tokens, e.g. a test issuer [default: https://accounts.google.com].
    #[arg(long, env = "AIRLOCK_GCP_ISSUER")]
    gcp_issuer: Option<String>,
    /// How old a Kubernetes service-account token may be at a join (its `iat`); keep the
    /// projected volume's expirationSeconds at most this [default: 1h].
    #[arg(long, env = "AIRLOCK_K8S_MAX_TOKEN_AGE", value_parser = parse_duration)]
    k8s_max_token_age: Option<std::time::Duration>,
    /// Accept only Kubernetes tokens the appliance asked the TokenRequest API for (their audience
    /// binds the join challenge: no replay window), refusing mounted projected tokens.
    #[arg(long, env = "AIRLOCK_K8S_REQUIRE_TOKEN_REQUEST")]
    k8s_require_token_request: bool,
    /// Operator-supplied certificate chain (PEM) for the HTTPS API.
    #[arg(long, env = "AIRLOCK_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Operator-supplied private key (PEM) for the HTTPS API.
    #[arg(long, env = "AIRLOCK_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// API connections at once, cut to the API's share of the open-file limit [default: 4096].
    #[arg(long, env = "AIRLOCK_API_MAX_CONNECTIONS")]
    api_max_connections: Option<usize>,
    /// API connections one source address (an IPv6 /64 counting as one) may hold [default: 256].
    #[arg(long, env = "AIRLOCK_API_CONNECTIONS_PER_ADDRESS")]
    api_connections_per_address: Option<usize>,
    /// Close an API connection with no request in flight for this long, the first request included [default: 30s].
    #[arg(long, env = "AIRLOCK_API_IDLE_TIMEOUT", value_parser = parse_duration)]
    api_idle_timeout: Option<std::time::Duration>,
    /// Deadline to receive and answer one API request, headers and body included; past it, 408 [default: 30s].
    #[arg(long, env = "AIRLOCK_API_REQUEST_TIMEOUT", value_parser = parse_duration)]
    api_request_timeout: Option<std::time::Duration>,
    /// Gateway connections at once, cut to the gateway's share of the open-file limit [default: 100000].
    #[arg(long, env = "AIRLOCK_GATEWAY_MAX_CONNECTIONS")]
    gateway_max_connections: Option<usize>,
    /// Deadline for a gateway peer's TLS ClientHello [default: 2s].
    #[arg(long, env = "AIRLOCK_GATEWAY_HELLO_TIMEOUT", value_parser = parse_duration)]
    gateway_hello_timeout: Option<std::time::Duration>,
    /// Deadline for a TLS handshake on either listener [default: 5s].
    #[arg(long, env = "AIRLOCK_TLS_HANDSHAKE_TIMEOUT", value_parser = parse_duration)]
    tls_handshake_timeout: Option<std::time::Duration>,
    /// Write {api_url, gateway_endpoint, ca_fingerprint} as JSON here once listening.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// How often the server prunes and checkpoints its audit chains (to
    /// `<data-dir>/audit-checkpoints.jsonl`; also at shutdown) [default: 1h].
    #[arg(long, env = "AIRLOCK_AUDIT_CHECKPOINT_INTERVAL", value_parser = parse_duration)]
    audit_checkpoint_interval: Option<std::time::Duration>,
    /// How long records of anonymous refusals (the `system` chain) are kept [default: 30d].
    #[arg(long, env = "AIRLOCK_AUDIT_RETENTION", value_parser = parse_duration)]
    audit_retention: Option<std::time::Duration>,
}

#[cfg(feature = "server")]
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ServerFileConfig {
    data_dir: Option<PathBuf>,
    kek_file: Option<PathBuf>,
    listen: Option<std::net::SocketAddr>,
    gateway_listen: Option<std::net::SocketAddr>,
    hostnames: Option<Vec<String>>,
    gateway_advertise: Option<String>,
    appliance_cert_lifetime: Option<String>,
    join_token_ttl: Option<String>,
    heartbeat_interval: Option<String>,
    audit_checkpoint_interval: Option<String>,
    audit_retention: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    aws_sts_endpoints: Option<Vec<String>>,
    public_url: Option<String>,
    session_idle_timeout: Option<String>,
    session_max_lifetime: Option<String>,
    issuer_ca_files: Option<Vec<PathBuf>>,
    allow_private_issuers: Option<bool>,
    gcp_issuer: Option<String>,
    k8s_max_token_age: Option<String>,
    k8s_require_token_request: Option<bool>,
    api_max_connections: Option<usize>,
    api_connections_per_address: Option<usize>,
    api_idle_timeout: Option<String>,
    api_request_timeout: Option<String>,
    gateway_max_connections: Option<usize>,
    gateway_hello_timeout: Option<String>,
    tls_handshake_timeout: Option<String>,
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    airlock_core::time::parse_duration(s)
}

// ---------------- appliance ----------------

#[derive(Args)]
struct ApplianceCmd {
    #[command(subcommand)]
    command: ApplianceSub,
}

#[derive(Subcommand)]
enum ApplianceSub {
    /// Run the appliance: join once, then hold an outbound mTLS stream to the control plane.
    #[cfg(feature = "appliance")]
    Run(Box<ApplianceRunArgs>),
    /// On the appliance host: switch a phase on or off, or show what is in force.
    #[cfg(feature = "appliance")]
    Phase {
        #[command(subcommand)]
        command: PhaseSub,
        /// The appliance's state directory (its admin socket lives there).
        #[arg(long, global = true, env = "AIRLOCK_STATE_DIR")]
        state_dir: Option<PathBuf>,
    },
    /// On the appliance host: operations this appliance ran, their output and manifests.
    #[cfg(feature = "appliance")]
    Ops {
        #[command(subcommand)]
        command: appliance_local::OpsSub,
        /// The appliance's state directory (its admin socket lives there).
        #[arg(long, global = true, env = "AIRLOCK_STATE_DIR")]
        state_dir: Option<PathBuf>,
    },
    /// On the appliance host: install, revoke and list the customer's pre-approvals.
    #[cfg(feature = "appliance")]
    Preapproval {
        #[command(subcommand)]
        command: appliance_local::PreapprovalSub,
        /// The appliance's state directory (its admin socket lives there).
        #[arg(long, global = true, env = "AIRLOCK_STATE_DIR")]
        state_dir: Option<PathBuf>,
    },
    /// On the appliance host: load a newly signed customer policy.
    #[cfg(feature = "appliance")]
    Policy {
        #[command(subcommand)]
        command: appliance_local::PolicySub,
        /// The appliance's state directory (its admin socket lives there).
        #[arg(long, global = true, env = "AIRLOCK_STATE_DIR")]
        state_dir: Option<PathBuf>,
    },
    /// On the appliance host: apply a signed rotation of the pinned customer keys.
    #[cfg(feature = "appliance")]
    Keys {
        #[command(subcommand)]
        command: appliance_local::KeysSub,
        /// The appliance's state directory (its admin socket lives there).
        #[arg(long, global = true, env = "AIRLOCK_STATE_DIR")]
        state_dir: Option<PathBuf>,
    },
    /// List appliances and their status.
    List {
        /// Only this environment (env_…).
        #[arg(long)]
        env: Option<String>,
        /// Only this workspace (wsp_…); needed when your roles or token are confined to workspaces.
        #[arg(long)]
        workspace: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Revoke an appliance: its stream closes and its certificates are refused.
    Revoke {
        appliance: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Where an appliance's deployments stand, as it last reported: the release running, the
    /// deploy in progress, each service (with its metrics and the tail of its log where the
    /// customer's policy lets them go up), and which secret references exist (JSON).
    Deployment {
        appliance: String,
        /// Print each service's state, metrics and log tail as text instead.
        #[arg(long)]
        logs: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[cfg(feature = "appliance")]
#[derive(Args)]
struct ApplianceRunArgs {
    /// TOML file with control_plane, ca_fingerprint, join_token, state_dir.
    #[arg(long, env = "AIRLOCK_APPLIANCE_CONFIG")]
    config: Option<PathBuf>,
    /// The control plane API URL (https://…).
    #[arg(long)]
    control_plane: Option<String>,
    /// SHA-256 fingerprint of the control plane CA.
    #[arg(long)]
    ca_fingerprint: Option<String>,
    /// Single-use join token, needed only the first time.
    #[arg(long)]
    join_token: Option<String>,
    /// Join with the host's platform identity instead of a token: `aws` (credentials from the
    /// standard chain: environment, profile, instance role), `gcp` (the instance's identity
    /// token from its metadata server) or `k8s` (a projected service-account token whose
    /// audience is `airlock:<CA fingerprint>`). The appliance proves it again at each renewal.
    #[arg(long)]
    join_method: Option<String>,
    /// The environment (`env_…`) to join: a platform identity is judged by its join rules only (another
    /// environment's rules accepting it is a refusal), and a join token must be its. A platform join
    /// (`--join-method`) needs this or `--tenant`.
    #[arg(long)]
    environment: Option<String>,
    /// The tenant (`ten_…`) to join: a platform identity is judged by its join rules only, so another
    /// tenant's rule naming the same account, project or cluster cannot take this appliance. A platform
    /// join (`--join-method`) needs this or `--environment`.
    #[arg(long)]
    tenant: Option<String>,
    /// The STS endpoint an AWS join signs for [default: https://sts.<region>.amazonaws.com].
    #[arg(long)]
    aws_sts_endpoint: Option<String>,
    /// The GCE metadata server a GCP join asks [default: http://metadata.google.internal].
    #[arg(long)]
    gcp_metadata_url: Option<String>,
    /// The projected service-account token a Kubernetes join reads [default: /var/run/secrets/tokens/airlock;
    /// with --k8s-token-request, the service account's own token, which authenticates the request].
    #[arg(long)]
    k8s_token_path: Option<PathBuf>,
    /// Ask the cluster's TokenRequest API for a token whose audience binds each join's challenge (no
    /// replay window) instead of showing the mounted one; the service account needs `create` on
    /// its own `serviceaccounts/token`.
    #[arg(long)]
    k8s_token_request: bool,
    /// The Kubernetes API server a TokenRequest goes to [default: https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT].
    #[arg(long)]
    k8s_api_url: Option<String>,
    /// The CA file that verifies the API server [default: /var/run/secrets/kubernetes.io/serviceaccount/ca.crt].
    #[arg(long)]
    k8s_ca_path: Option<PathBuf>,
    /// Where the appliance keeps its key, certificate and state.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Customer public key to pin at install (repeat for several approvers).
    #[arg(long = "customer-key")]
    customer_keys: Vec<PathBuf>,
    /// Customer-signed policy file (`airlock customer policy sign`).
    #[arg(long)]
    policy: Option<PathBuf>,
    /// The customer's admin group (name or gid): its members may use the admin socket, besides
    /// the appliance's user and root. Also AIRLOCK_ADMIN_GROUP, or admin_group in the TOML file.
    #[arg(long)]
    admin_group: Option<String>,
    /// The unprivileged user vendor code runs as (the appliance must run as root to switch to
    /// it); by default an unused uid of the appliance's own. Also AIRLOCK_BOX_USER, or box_user.
    #[arg(long)]
    box_user: Option<String>,
    /// Where signed checkpoints of the audit head go: `syslog`, or an absolute path to an
    /// append-only file outside the state directory. Also AIRLOCK_AUDIT_CHECKPOINTS.
    #[arg(long)]
    audit_checkpoints: Option<String>,
    /// A checkpoint every this many audit records (default 1000), besides start and stop.
    #[arg(long)]
    audit_checkpoint_every: Option<u64>,
    /// Where deployed releases are installed: outside the state directory and the system roots
    /// every box reads (/opt, /etc, /usr...), readable by the box user (default
    /// /var/lib/airlock-releases/<tag> as root). Also AIRLOCK_RELEASES_DIR.
    #[arg(long)]
    releases_dir: Option<PathBuf>,
    /// MiB one box of vendor code may hold in its working directory before it is killed
    /// (default 4096). Also AIRLOCK_BOX_DISK_MIB, or box_disk_mib.
    #[arg(long)]
    box_disk_mib: Option<u64>,
    /// Files one box of vendor code may hold before it is killed (default 100000). Also
    /// AIRLOCK_BOX_DISK_FILES, or box_disk_files.
    #[arg(long)]
    box_disk_files: Option<u64>,
    /// MiB kept free on the disk boxes write to: below it, the box holding the most is killed
    /// (default a tenth of that disk, at most 1024; 0 keeps none). Also AIRLOCK_DISK_RESERVE_MIB,
    /// or disk_reserve_mib.
    #[arg(long)]
    disk_reserve_mib: Option<u64>,
}

#[cfg(feature = "appliance")]
#[derive(Subcommand)]
enum PhaseSub {
    /// Show the policy in force, phases disabled on this host, and what is effective.
    Status,
    /// Allow a phase again (within what the customer policy enables).
    Enable { phase: String },
    /// Switch a phase off on this host, at once.
    Disable { phase: String },
}

// ---------------- API client commands ----------------

#[derive(Args, Clone)]
struct ApiArgs {
    /// Control plane API URL [default: the one `airlock login` signed in to].
    #[arg(long, env = "AIRLOCK_URL")]
    url: Option<String>,
    /// API token (airlock_at_…) [default: the session `airlock login` keeps].
    #[arg(long, env = "AIRLOCK_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// SHA-256 fingerprint of the control plane CA to pin [default: the one `airlock login` pinned].
    #[arg(long, env = "AIRLOCK_CA_FINGERPRINT")]
    ca_fingerprint: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

impl ApiArgs {
    fn client(&self) -> anyhow::Result<client::ApiClient> {
        // What `airlock login` stored fills in what is not given, its session only for the server it signed in to.
        let stored = login::stored_credential();
        let url = match (&self.url, &stored) {
            (Some(url), _) => url.clone(),
            (None, Some(s)) => s.url.clone(),
            (None, None) => anyhow::bail!("no server: give --url (AIRLOCK_URL), or sign in with `airlock login`"),
        };
        let same_server = |s: &&login::StoredCredential| s.url.trim_end_matches('/') == url.trim_end_matches('/');
        let token = match (&self.token, stored.as_ref().filter(same_server)) {
            (Some(token), _) => token.clone(),
            (None, Some(s)) => s.session.clone(),
            (None, None) => {
                anyhow::bail!("no credential: give --token (AIRLOCK_TOKEN), or sign in with `airlock login`")
            }
        };
        let pin = match (&self.ca_fingerprint, stored.as_ref().filter(same_server)) {
            (Some(fp), _) => fp.clone(),
            (None, Some(s)) => s.ca_fingerprint.clone(),
            (None, None) => anyhow::bail!("no CA fingerprint to pin: give --ca-fingerprint (AIRLOCK_CA_FINGERPRINT)"),
        };
        let pin: Fingerprint = pin.parse()?;
        client::ApiClient::new(&url, &token, pin)
    }
}

#[derive(Args)]
struct EnvCmd {
    #[command(subcommand)]
    command: EnvSub,
}

#[derive(Subcommand)]
enum EnvSub {
    /// Create an environment (one customer deployment).
    Create {
        name: String,
        /// Workspace id (wsp_…); may be omitted when the tenant has one workspace.
        #[arg(long)]
        workspace: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List environments.
    List {
        #[arg(long)]
        workspace: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Create a single-use join token for an environment; prints the token.
    JoinToken {
        environment: String,
        /// Lifetime, e.g. 15m (default), 1h.
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<std::time::Duration>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Relay the customer's signed policy to the environment's appliances, or show the one
    /// relayed last. The control plane cannot sign a policy: each appliance checks the
    /// customer's signatures against the keys it pinned.
    Policy(EnvPolicyCmd),
    /// Rules that let a platform identity (an AWS account and role, a GCP project and service
    /// account, a Kubernetes service account) join the environment without a join token
    /// (`airlock appliance run --join-method aws|gcp|k8s`).
    JoinRule(EnvJoinRuleCmd),
}

#[derive(Args)]
struct EnvJoinRuleCmd {
    #[command(subcommand)]
    command: EnvJoinRuleSub,
}

#[derive(Subcommand)]
enum EnvJoinRuleSub {
    /// Let a platform identity join; one method per rule. AWS: the account, and optionally an
    /// ARN pattern (`*` matches any run of characters; an assumed role's session is matched as
    /// its role's ARN). GCP: a project and a service account email (exact). Kubernetes: the
    /// cluster's service-account issuer URL and NAMESPACE/NAME; the projected token's audience
    /// must be `airlock:<CA fingerprint>`. An identity that the rules of more than one
    /// environment accept joins none.
    Add {
        environment: String,
        /// The AWS account id (12 digits).
        #[arg(long, conflicts_with_all = ["gcp_project", "k8s_issuer"])]
        aws_account: Option<String>,
        /// e.g. 'arn:aws:iam::123456789012:role/airlock-*'; without it, any principal of the account.
        #[arg(long, requires = "aws_account")]
        aws_role_arn: Option<String>,
        /// The GCP project id the instance runs in.
        #[arg(long, requires = "gcp_service_account", conflicts_with = "k8s_issuer")]
        gcp_project: Option<String>,
        /// The service account email the instance runs as, e.g. airlock@my-project.iam.gserviceaccount.com.
        #[arg(long, requires = "gcp_project")]
        gcp_service_account: Option<String>,
        /// The cluster's service-account issuer, e.g. https://oidc.eks.eu-west-1.amazonaws.com/id/ABC.
        #[arg(long, requires = "k8s_service_account")]
        k8s_issuer: Option<String>,
        /// NAMESPACE/NAME of the pod's service account.
        #[arg(long, requires = "k8s_issuer")]
        k8s_service_account: Option<String>,
        /// Accept only tokens the appliance asks the TokenRequest API for (`appliance run
        /// --k8s-token-request`), whose audience binds the join's challenge; a mounted token,
        /// which anyone who reads it can replay once within --k8s-max-token-age, is refused.
        #[arg(long, requires = "k8s_issuer")]
        k8s_require_token_request: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List the environment's join rules.
    List {
        environment: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Remove a join rule; appliances it let join cannot renew unless another rule accepts them.
    Remove {
        environment: String,
        rule: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Args)]
struct EnvPolicyCmd {
    #[command(subcommand)]
    command: EnvPolicySub,
}

#[derive(Subcommand)]
enum EnvPolicySub {
    /// Relay a signed policy (the file `airlock customer policy sign` writes) to every
    /// appliance of the environment, at once to connected ones and to others when they connect.
    Push {
        environment: String,
        /// The signed policy (a DSSE envelope, JSON).
        signed: PathBuf,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Show the policy relayed last to the environment.
    Show {
        environment: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Args)]
struct CustomerCmd {
    #[command(subcommand)]
    command: CustomerSub,
}

#[derive(Subcommand)]
enum CustomerSub {
    /// Create an Ed25519 key pair: DIR/customer.key (0600, never leaves your machine) and DIR/customer.pub.
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Customer policy: what the vendor may do, signed with your key.
    Policy {
        #[command(subcommand)]
        command: PolicySub,
    },
    /// The customer keys an appliance pinned: they change only by a statement the current keys sign.
    Keys {
        #[command(subcommand)]
        command: CustomerKeysSub,
    },
    /// Requests waiting for your decision.
    Approvals {
        #[command(subcommand)]
        command: ApprovalsSub,
    },
    /// Approve one request: sign its exact command with your key (repeat --key for several approvers).
    Approve(DecideArgs),
    /// Deny one request, signed with your key.
    Deny(DecideArgs),
    /// Sign a pre-approval for routine runs of one template on one appliance; install it on the
    /// appliance host with `airlock appliance preapproval add`.
    Preapprove(PreapproveArgs),
    /// On the appliance host: release (or --withhold) one operation's output, signed with your key.
    #[cfg(feature = "appliance")]
    Release(appliance_local::ReleaseArgs),
    /// On the appliance host, once after it joined: attest the appliance's own execution key with
    /// your key, so `airlock verify` accepts only executions it signed (not merely ones under a
    /// certificate from the vendor's CA).
    #[cfg(feature = "appliance")]
    AttestAppliance(appliance_local::AttestArgs),
}

#[derive(Subcommand)]
enum CustomerKeysSub {
    /// Sign a rotation of the pinned keys to a new set; apply it on the appliance host with
    /// `airlock appliance keys rotate FILE`. Signed by as many current keys as your policy's
    /// `approvals_required`.
    Rotate {
        /// A current private key (repeat for several approvers).
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
        /// The public key of a pinned key that does not sign (repeat): the statement names the
        /// whole pinned set it replaces.
        #[arg(long = "pinned-key")]
        pinned: Vec<PathBuf>,
        /// A public key of the new set (repeat).
        #[arg(long = "new-key", required = true)]
        new_keys: Vec<PathBuf>,
        /// Why, in your words (kept in the signed statement).
        #[arg(long, default_value = "")]
        reason: String,
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ApprovalsSub {
    /// List requests awaiting approval, with the exact command each would run.
    List {
        /// Only this workspace (wsp_…); needed when your roles or token are confined to workspaces.
        #[arg(long)]
        workspace: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Args)]
struct DecideArgs {
    /// Operation id (op_…).
    id: airlock_core::OperationId,
    #[arg(long = "key", required = true)]
    keys: Vec<PathBuf>,
    /// Why (recorded in the signed decision).
    #[arg(long, default_value = "")]
    reason: String,
    /// Your name as it should appear in the manifest (default: the key ids).
    #[arg(long)]
    approver: Option<String>,
    /// How long the approval may be used (the policy caps it; default 1h).
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    valid_for: std::time::Duration,
    /// The request digest you reviewed (`airlock customer approvals list`); the request is
    /// signed only if it is still exactly that one. Without it you confirm on the terminal.
    #[arg(long)]
    digest: Option<String>,
    #[command(flatten)]
    api: ApiArgs,
}

#[derive(Args)]
struct PreapproveArgs {
    /// The appliance it is for (apl_…).
    #[arg(long)]
    appliance: String,
    /// The template as you reviewed it: a directory with template.toml and its script.
    #[arg(long)]
    template_dir: PathBuf,
    #[arg(long, default_value = "7d", value_parser = parse_duration)]
    valid_for: std::time::Duration,
    #[arg(long)]
    max_runs: u32,
    /// `commands` (output still released per run) or `commands-and-output`.
    #[arg(long, default_value = "commands")]
    level: String,
    /// NAME=REGEX: the whole value of variable NAME must match REGEX (repeatable).
    #[arg(long = "constrain")]
    constraints: Vec<String>,
    #[arg(long = "key", required = true)]
    keys: Vec<PathBuf>,
    #[arg(long)]
    approver: Option<String>,
    /// An id of your choosing (default: random); runs are counted and revoked by it.
    #[arg(long)]
    id: Option<String>,
    /// Where to write the signed pre-approval (default: stdout).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args)]
struct VerifyArgs {
    /// Manifest files (`airlock op manifest ID > m.json`); several are also checked as one chain, oldest first.
    #[arg(required = true)]
    manifests: Vec<PathBuf>,
    /// A customer public key (repeat for each approver key).
    #[arg(long = "customer-key", required = true)]
    customer_keys: Vec<PathBuf>,
    /// The control plane CA certificate (PEM), e.g. `<appliance-state-dir>/ca.pem`.
    #[arg(long)]
    ca: PathBuf,
    /// Your signed policy (repeat for each, when the manifests span policy changes): sets the
    /// approver threshold, proves executions in its standing windows, and holds every execution
    /// under it against its deny rules and caps. Each execution is held against the one it names.
    #[arg(long = "policy")]
    policies: Vec<PathBuf>,
    /// Exit 0 even when an execution names a policy not given, so its deny rules and caps went
    /// unchecked (it is still reported).
    #[arg(long)]
    allow_unchecked_policy: bool,
    /// Distinct customer keys an approval needs (default: the policy's approvals_required, else 1).
    #[arg(long)]
    approvals_required: Option<usize>,
    /// Released output (`airlock op output ID > out.bin`) to check against the manifest's signed
    /// commitment, with the salt the manifest reveals; one per manifest, in the same order.
    #[arg(long = "output")]
    outputs: Vec<PathBuf>,
    /// Accept executions no customer attestation vouches for (manifests made before the
    /// appliance's execution key was attested): only a certificate from the vendor's CA vouches
    /// for them, so whoever holds the CA could have forged them. They are reported as such.
    #[arg(long)]
    allow_vendor_attested: bool,
}

#[derive(Subcommand)]
enum PolicySub {
    /// Check a policy TOML and sign it; writes the signed policy (a DSSE envelope) to --out or stdout.
    Sign {
        policy: PathBuf,
        /// Private key (repeat when the policy requires several approvers).
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Args)]
struct AuditCmd {
    #[command(subcommand)]
    command: AuditSub,
}

#[derive(Subcommand)]
enum AuditSub {
    /// Verify every audit chain in a control plane data directory, or an appliance's audit file.
    Verify {
        /// The control plane's data directory.
        #[arg(long, env = "AIRLOCK_DATA_DIR", required_unless_present = "file", conflicts_with = "file")]
        data_dir: Option<PathBuf>,
        #[arg(long, env = "AIRLOCK_KEK_FILE")]
        kek_file: Option<PathBuf>,
        /// An appliance's audit log (`<state-dir>/audit.jsonl`).
        #[arg(long)]
        file: Option<PathBuf>,
        /// Signed checkpoints: the appliance's checkpoint file (or your syslog's lines of it),
        /// or the control plane's (`airlock audit checkpoint`, `<data-dir>/audit-checkpoints.jsonl`).
        /// Detects deletion, truncation, re-anchoring and rollback; with it, a data directory
        /// verifies without the KEK (head MACs are then not checked).
        #[arg(long)]
        checkpoints: Option<PathBuf>,
        /// The checkpoint key's public half (PEM) [default: the appliance's `checkpoint.pub`
        /// beside the log; for a control plane, the key sealed in its store, which needs the KEK:
        /// without it give the copy you keep, `audit_key` from `GET /v1/ca`].
        #[arg(long, alias = "audit-key")]
        key: Option<PathBuf>,
    },
    /// Write a signed checkpoint of every audit chain of a control plane (JSON lines).
    Checkpoint {
        #[command(flatten)]
        data: DataDirArgs,
        /// Append to this file (created if missing) instead of printing to stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Print audit records as JSON lines (all chains, or one).
    Export {
        #[command(flatten)]
        data: DataDirArgs,
        /// Only this chain: a tenant id, or `system`.
        #[arg(long)]
        chain: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("AIRLOCK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,h2=warn,hyper=warn,tower=warn,rustls=warn"));
    // Colour codes only for a person at a terminal: in a log file they are noise.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        #[cfg(feature = "server")]
        Command::Server(cmd) => server(*cmd).await,
        Command::Appliance(cmd) => appliance(cmd).await,
        Command::Env(cmd) => env(cmd).await,
        Command::Template(cmd) => operations::template(cmd).await,
        Command::Release(cmd) => releases::release(cmd).await,
        Command::Token(cmd) => tokens::token(cmd).await,
        Command::Login(args) => login::login(args).await,
        Command::Logout => login::logout().await,
        Command::Idp(cmd) => login::idp(cmd).await,
        Command::RoleMapping(cmd) => login::role_mapping(cmd).await,
        Command::Deploy(args) => deployments::deploy(args).await,
        Command::Rollout(args) => deployments::rollout(args).await,
        Command::Task(args) => deployments::task(args).await,
        Command::Op(cmd) => operations::op(cmd).await,
        Command::Audit(cmd) => audit(cmd).await,
        Command::Customer(CustomerCmd {
            command: CustomerSub::Policy { command: PolicySub::Sign { policy, keys, out } },
        }) => {
            let (signed, warnings) = customer::sign_policy(&policy, &keys)?;
            for warning in &warnings {
                eprintln!("warning: {warning}");
            }
            match out {
                Some(path) => std::fs::write(&path, &signed).with_context(|| format!("writing {}", path.display()))?,
                None => println!("{signed}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Customer(CustomerCmd {
            command: CustomerSub::Keys { command: CustomerKeysSub::Rotate { keys, pinned, new_keys, reason, out } },
        }) => {
            let signed = customer::sign_key_rotation(&keys, &pinned, &new_keys, reason)?;
            match out {
                Some(path) => std::fs::write(&path, &signed).with_context(|| format!("writing {}", path.display()))?,
                None => println!("{signed}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Customer(CustomerCmd { command: CustomerSub::Keygen { out } }) => {
            let key_id = customer::keygen(&out)?;
            println!("customer key id: {key_id}");
            println!("private key:     {} (keep it on this machine)", out.join(customer::PRIVATE_KEY_FILE).display());
            println!(
                "public key:      {} (install it on the appliance)",
                out.join(customer::PUBLIC_KEY_FILE).display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Customer(CustomerCmd {
            command: CustomerSub::Approvals { command: ApprovalsSub::List { workspace, api } },
        }) => {
            let pending = approvals::list_pending(&api.client()?, workspace).await?;
            if api.json {
                let ops: Vec<serde_json::Value> = pending
                    .iter()
                    .map(|p| match p {
                        Ok(op) => serde_json::json!({ "id": op.id, "request_digest": op.request.digest_hex() }),
                        Err(e) => serde_json::json!({ "error": e.to_string() }),
                    })
                    .collect();
                println!("{}", serde_json::json!({ "awaiting_approval": ops }));
            } else if pending.is_empty() {
                println!("nothing awaits your approval");
            } else {
                for op in &pending {
                    match op {
                        Ok(op) => println!("{}", op.describe()),
                        Err(e) => println!("DO NOT APPROVE: {e}\n"),
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Customer(CustomerCmd { command: CustomerSub::Approve(args) }) => decide(args, true).await,
        Command::Customer(CustomerCmd { command: CustomerSub::Deny(args) }) => decide(args, false).await,
        Command::Customer(CustomerCmd { command: CustomerSub::Preapprove(args) }) => {
            let constraints = args
                .constraints
                .iter()
                .map(|c| {
                    c.split_once('=')
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                        .ok_or_else(|| anyhow::anyhow!("--constrain `{c}`: expected NAME=REGEX"))
                })
                .collect::<anyhow::Result<_>>()?;
            let level = match args.level.as_str() {
                "commands" => airlock_core::grant::ApprovalLevel::Commands,
                "commands-and-output" => airlock_core::grant::ApprovalLevel::CommandsAndOutput,
                other => anyhow::bail!("--level `{other}`: use `commands` or `commands-and-output`"),
            };
            let signed = approvals::pre_approve(approvals::PreApprovalSpec {
                appliance: args.appliance.parse().context("--appliance")?,
                template_dir: &args.template_dir,
                valid_for: args.valid_for,
                max_runs: args.max_runs,
                level,
                constraints,
                keys: &args.keys,
                approver: args.approver,
                id: args.id,
            })?;
            match args.out {
                Some(path) => std::fs::write(&path, &signed).with_context(|| format!("writing {}", path.display()))?,
                None => println!("{signed}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify(args) => {
            let reports = approvals::verify(
                &args.manifests,
                &args.customer_keys,
                &args.ca,
                &args.policies,
                args.approvals_required,
                &args.outputs,
                if args.allow_vendor_attested {
                    airlock_core::operation::VendorAttested::Accept
                } else {
                    airlock_core::operation::VendorAttested::Refuse
                },
            )?;
            for (r, opened) in &reports {
                print!("{}", approvals::describe_report(r));
                match opened {
                    Some(airlock_core::operation::OpenedAs::Salted) => {
                        println!("  released output matches the salted commitment")
                    }
                    Some(airlock_core::operation::OpenedAs::LegacyUnsalted) => {
                        println!("  released output matches the LEGACY unsalted digest")
                    }
                    None => {}
                }
            }
            if reports.len() > 1 {
                println!("chain: {} manifests, each follows the one before", reports.len());
            }
            let unchecked = reports.iter().filter(|(r, _)| r.execution.is_some() && !r.policy_checked).count();
            if unchecked > 0 && !args.allow_unchecked_policy {
                eprintln!(
                    "NOT VERIFIED: the deny rules and caps of {unchecked} execution(s) were not checked; give the signed policies they name with --policy (or accept this with --allow-unchecked-policy)"
                );
                return Ok(ExitCode::FAILURE);
            }
            println!("OK");
            Ok(ExitCode::SUCCESS)
        }
        #[cfg(feature = "appliance")]
        Command::Customer(CustomerCmd { command: CustomerSub::Release(args) }) => appliance_local::release(args).await,
        #[cfg(feature = "appliance")]
        Command::Customer(CustomerCmd { command: CustomerSub::AttestAppliance(args) }) => {
            appliance_local::attest(args).await
        }
        #[cfg(all(feature = "server", feature = "appliance"))]
        Command::Dev(args) => dev::run(args).await,
    }
}

async fn decide(args: DecideArgs, approve: bool) -> anyhow::Result<ExitCode> {
    let op = approvals::decide(
        &args.api.client()?,
        args.id,
        approvals::Decision {
            approve,
            reviewed_digest: args.digest,
            keys: &args.keys,
            approver: args.approver,
            reason: args.reason,
            valid_for: args.valid_for,
        },
    )
    .await?;
    eprintln!("{}", op.describe());
    println!("{} {}", if approve { "approved" } else { "denied" }, op.id);
    Ok(ExitCode::SUCCESS)
}

#[cfg(feature = "server")]
async fn server(cmd: ServerCmd) -> anyhow::Result<ExitCode> {
    use airlock_server::clock::SystemClock;
    match cmd.command {
        Some(ServerSub::Init(args)) => {
            let out = airlock_server::init(
                &args.data.data_dir,
                &args.data.kek(),
                &args.trust_domain,
                &args.tenant,
                &args.workspace,
                &SystemClock,
            )
            .await?;
            print_bootstrap(&out, "Initialised");
            Ok(ExitCode::SUCCESS)
        }
        Some(ServerSub::Tenant { command: TenantSub::Create { name, workspace, data } }) => {
            let out =
                airlock_server::create_tenant(&data.data_dir, &data.kek(), &name, &workspace, &SystemClock).await?;
            print_bootstrap(&out, "Created tenant");
            Ok(ExitCode::SUCCESS)
        }
        None => serve(cmd.run).await,
    }
}

#[cfg(feature = "server")]
fn print_bootstrap(out: &airlock_server::Bootstrap, what: &str) {
    println!("{what}.");
    println!("tenant:          {}", out.tenant);
    println!("workspace:       {}", out.workspace);
    println!("ca fingerprint:  {}", out.ca_fingerprint);
    println!("admin token:     {}", out.admin_token.expose());
    println!();
    println!("The admin token is shown once and stored only as a hash. Keep it safe.");
}

#[cfg(feature = "server")]
async fn serve(args: ServerRunArgs) -> anyhow::Result<ExitCode> {
    let file: ServerFileConfig = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
        }
        None => ServerFileConfig::default(),
    };
    let data_dir = args
        .data_dir
        .or(file.data_dir)
        .context("missing --data-dir (or AIRLOCK_DATA_DIR, or data_dir in the config file)")?;
    let data = DataDirArgs { data_dir: data_dir.clone(), kek_file: args.kek_file.or(file.kek_file) };
    let mut cfg = airlock_server::ServerConfig::new(data_dir);
    cfg.kek = data.kek();
    if let Some(a) = args.listen.or(file.listen) {
        cfg.api_listen = a;
    }
    if let Some(a) = args.gateway_listen.or(file.gateway_listen) {
        cfg.gateway_listen = a;
    }
    let hostnames = if args.hostnames.is_empty() { file.hostnames.unwrap_or_default() } else { args.hostnames };
    if !hostnames.is_empty() {
        cfg.hostnames = hostnames;
    }
    cfg.gateway_advertise = args.gateway_advertise.or(file.gateway_advertise);
    let file_duration = |v: Option<String>| v.map(|s| parse_duration(&s)).transpose().map_err(anyhow::Error::msg);
    if let Some(d) = args.appliance_cert_lifetime.or(file_duration(file.appliance_cert_lifetime)?) {
        anyhow::ensure!(d.as_secs() >= 2, "appliance certificate lifetime must be at least 2s");
        cfg.appliance_cert_lifetime = d;
    }
    if let Some(d) = args.join_token_ttl.or(file_duration(file.join_token_ttl)?) {
        anyhow::ensure!((1..=86_400).contains(&d.as_secs()), "join token TTL must be between 1s and 24h");
        cfg.join_token_ttl = d;
    }
    if let Some(n) = args.max_artifact_bytes {
        cfg.max_artifact_bytes = n;
    }
    if let Some(n) = args.max_workspace_artifact_bytes {
        cfg.max_workspace_artifact_bytes = n;
    }
    if let Some(d) = args.heartbeat_interval.or(file_duration(file.heartbeat_interval)?) {
        anyhow::ensure!(d.as_secs() >= 1, "heartbeat interval must be at least 1s");
        cfg.heartbeat_interval = d;
    }
    if let Some(d) = args.audit_checkpoint_interval.or(file_duration(file.audit_checkpoint_interval)?) {
        anyhow::ensure!(d.as_secs() >= 1, "audit checkpoint interval must be at least 1s");
        cfg.audit_schedule.interval = d;
    }
    if let Some(d) = args.audit_retention.or(file_duration(file.audit_retention)?) {
        anyhow::ensure!(d.as_secs() >= 1, "audit retention must be at least 1s");
        cfg.audit_schedule.retention = d;
    }
    cfg.aws_sts_endpoints = if args.aws_sts_endpoints.is_empty() {
        file.aws_sts_endpoints.unwrap_or_default()
    } else {
        args.aws_sts_endpoints
    };
    cfg.public_url = args.public_url.or(file.public_url);
    if let Some(d) = args.session_idle_timeout.or(file_duration(file.session_idle_timeout)?) {
        anyhow::ensure!(d.as_secs() >= 1, "session idle timeout must be at least 1s");
        cfg.session_limits.idle = d;
    }
    if let Some(d) = args.session_max_lifetime.or(file_duration(file.session_max_lifetime)?) {
        anyhow::ensure!(d.as_secs() >= 1, "session max lifetime must be at least 1s");
        cfg.session_limits.absolute = d;
    }
    let issuer_ca_files =
        if args.issuer_ca_files.is_empty() { file.issuer_ca_files.unwrap_or_default() } else { args.issuer_ca_files };
    for path in issuer_ca_files {
        let pem = std::fs::read(&path).with_context(|| format!("read issuer CA file {}", path.display()))?;
        let certs = airlock_server::issuer::read_ca_pem(&pem)
            .map_err(|e| anyhow::anyhow!("issuer CA file {}: {e}", path.display()))?;
        cfg.issuer_roots.extend(certs);
    }
    cfg.allow_private_issuers = args.allow_private_issuers || file.allow_private_issuers.unwrap_or(false);
    if let Some(issuer) = args.gcp_issuer.or(file.gcp_issuer) {
        cfg.gcp_issuer = issuer;
    }
    if let Some(d) = args.k8s_max_token_age.or(file_duration(file.k8s_max_token_age)?) {
        anyhow::ensure!(d.as_secs() >= 1, "k8s max token age must be at least 1s");
        cfg.k8s_max_token_age = d;
    }
    cfg.k8s_require_token_request = args.k8s_require_token_request || file.k8s_require_token_request.unwrap_or(false);
    cfg.api_tls_files = match (args.tls_cert.or(file.tls_cert), args.tls_key.or(file.tls_key)) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        _ => anyhow::bail!("give both tls_cert and tls_key, or neither"),
    };
    let limits = &mut cfg.limits;
    if let Some(n) = args.api_max_connections.or(file.api_max_connections) {
        anyhow::ensure!(n >= 1, "api_max_connections must be at least 1");
        limits.api_max_connections = n;
    }
    if let Some(n) = args.api_connections_per_address.or(file.api_connections_per_address) {
        anyhow::ensure!(n >= 1, "api_connections_per_address must be at least 1");
        limits.api_connections_per_address = n;
    }
    if let Some(n) = args.gateway_max_connections.or(file.gateway_max_connections) {
        anyhow::ensure!(n >= 2, "gateway_max_connections must be at least 2");
        limits.gateway_max_connections = n;
    }
    let deadlines = [
        (args.api_idle_timeout, file.api_idle_timeout, &mut limits.api_idle_timeout, "api_idle_timeout"),
        (args.api_request_timeout, file.api_request_timeout, &mut limits.api_request_timeout, "api_request_timeout"),
        (
            args.gateway_hello_timeout,
            file.gateway_hello_timeout,
            &mut limits.gateway_hello_timeout,
            "gateway_hello_timeout",
        ),
        (
            args.tls_handshake_timeout,
            file.tls_handshake_timeout,
            &mut limits.tls_handshake_timeout,
            "tls_handshake_timeout",
        ),
    ];
    for (flag, in_file, slot, name) in deadlines {
        if let Some(d) = flag.or(file_duration(in_file)?) {
            anyhow::ensure!(d.as_secs() >= 1, "{name} must be at least 1s");
            *slot = d;
        }
    }
    let running = airlock_server::serve(cfg).await?;
    let info = serde_json::json!({
        "api_url": running.api_url(),
        "gateway_endpoint": running.gateway_endpoint,
        "ca_fingerprint": running.ca_fingerprint.to_string(),
        "pid": std::process::id(),
    });
    if let Some(path) = &args.ready_file {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&info)?)?;
        std::fs::rename(&tmp, path)?;
    }
    wait_for_signal().await;
    tracing::info!("shutting down");
    running.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

/// Ctrl-C or SIGTERM.
#[cfg(any(feature = "server", feature = "appliance"))]
async fn wait_for_signal() {
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

async fn appliance(cmd: ApplianceCmd) -> anyhow::Result<ExitCode> {
    match cmd.command {
        #[cfg(feature = "appliance")]
        ApplianceSub::Run(args) => {
            use airlock_appliance::config::{ApplianceConfig, FileConfig, Flags, ProcessEnv};
            let file = args.config.as_deref().map(FileConfig::load).transpose()?;
            let flags = Flags {
                control_plane: args.control_plane,
                ca_fingerprint: args.ca_fingerprint,
                join_token: args.join_token,
                join_method: args.join_method,
                environment: args.environment,
                tenant: args.tenant,
                aws_sts_endpoint: args.aws_sts_endpoint,
                gcp_metadata_url: args.gcp_metadata_url,
                k8s_token_path: args.k8s_token_path,
                k8s_token_request: args.k8s_token_request,
                k8s_api_url: args.k8s_api_url,
                k8s_ca_path: args.k8s_ca_path,
                state_dir: args.state_dir,
                customer_keys: args.customer_keys,
                policy: args.policy,
                admin_group: args.admin_group,
                box_user: args.box_user,
                audit_checkpoints: args.audit_checkpoints,
                audit_checkpoint_every: args.audit_checkpoint_every,
                releases_dir: args.releases_dir,
                box_disk_mib: args.box_disk_mib,
                box_disk_files: args.box_disk_files,
                disk_reserve_mib: args.disk_reserve_mib,
            };
            let config = ApplianceConfig::resolve(file, &ProcessEnv, &flags)?;
            let (tx, rx) = tokio::sync::watch::channel(false);
            tokio::spawn(async move {
                wait_for_signal().await;
                let _ = tx.send(true);
            });
            airlock_appliance::run(config, rx).await?;
            Ok(ExitCode::SUCCESS)
        }
        #[cfg(feature = "appliance")]
        ApplianceSub::Phase { command, state_dir } => {
            use airlock_appliance::admin::{Request, SOCKET_FILE, call};
            let state_dir = state_dir.context("give --state-dir (or AIRLOCK_STATE_DIR)")?;
            let parse = |p: &str| -> anyhow::Result<airlock_core::policy::Phase> {
                serde_json::from_value(serde_json::Value::String(p.to_ascii_lowercase()))
                    .map_err(|_| anyhow::anyhow!("unknown phase `{p}`; use install, observe, deploy or operate"))
            };
            let request = match command {
                PhaseSub::Status => Request::Status,
                PhaseSub::Enable { phase } => Request::Phase { phase: parse(&phase)?, enabled: true },
                PhaseSub::Disable { phase } => Request::Phase { phase: parse(&phase)?, enabled: false },
            };
            let status = call(&state_dir.join(SOCKET_FILE), &request).await?;
            let names = |v: &[airlock_core::policy::Phase]| {
                v.iter().map(|p| format!("{p:?}").to_ascii_lowercase()).collect::<Vec<_>>().join(", ")
            };
            match status.policy_serial {
                Some(serial) => {
                    println!("policy:    serial {serial}, sha256 {}", status.policy_digest.as_deref().unwrap_or("?"))
                }
                None => println!("policy:    none (only observe is allowed)"),
            }
            println!("enabled:   {}", names(&status.policy_phases));
            println!("disabled:  {}", names(&status.disabled));
            println!("effective: {}", names(&status.effective));
            use airlock_appliance::admin::VendorCodeUser;
            match status.vendor_code_user {
                Some(VendorCodeUser::BoxUser { uid, gid }) => {
                    println!("vendor code runs as: its box user (uid {uid}, gid {gid})")
                }
                Some(VendorCodeUser::ApplianceUser) if status.same_user_accepted => println!(
                    "vendor code runs as: the appliance's own user (it is not root); the policy accepts this, and every run is audited"
                ),
                Some(VendorCodeUser::ApplianceUser) => println!(
                    "vendor code runs as: the appliance's own user (it is not root); the policy does not accept this, so Deploy and Operate are refused"
                ),
                None => println!("vendor code runs as: not known until the appliance has joined"),
            }
            use airlock_appliance::admin::CloudMetadata;
            match &status.cloud_metadata {
                Some(CloudMetadata::Fenced) => println!("cloud metadata service: out of vendor code's reach"),
                Some(CloudMetadata::Reachable { why }) => println!(
                    "cloud metadata service: REACHABLE by vendor code where this host has one, and with it the host's cloud credentials ({why})"
                ),
                None => println!("cloud metadata service: not known until the appliance has joined"),
            }
            match (status.service_log_tail_bytes, status.service_metrics_sent) {
                (None, false) => println!("service logs and metrics: stay on this host"),
                (None, true) => println!("service logs and metrics: metrics go up; logs stay on this host"),
                (Some(bytes), metrics) => println!(
                    "service logs and metrics: the last {bytes} bytes of each log go up (secret values redacted){}",
                    if metrics { ", and metrics" } else { "; metrics stay on this host" }
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
        #[cfg(feature = "appliance")]
        ApplianceSub::Ops { command, state_dir } => appliance_local::ops(command, state_dir).await,
        #[cfg(feature = "appliance")]
        ApplianceSub::Preapproval { command, state_dir } => appliance_local::preapproval(command, state_dir).await,
        #[cfg(feature = "appliance")]
        ApplianceSub::Policy { command, state_dir } => appliance_local::policy(command, state_dir).await,
        ApplianceSub::Keys { command, state_dir } => appliance_local::keys(command, state_dir).await,
        ApplianceSub::List { env, workspace, api } => {
            let path = operations::list_path("/v1/appliances", &[("environment", env), ("workspace", workspace)])?;
            let list: serde_json::Value = api.client()?.get(&path).await?;
            if api.json {
                terminal::print_json(&list)?;
            } else {
                println!(
                    "{:<32} {:<10} {:<8} {:<25} {:<34} {:<25} JOINED BY",
                    "APPLIANCE", "STATUS", "VERSION", "LAST HEARTBEAT", "CERT SERIAL", "CERT EXPIRES"
                );
                for a in list["appliances"].as_array().into_iter().flatten() {
                    let status = if a["revoked"] == true {
                        "revoked"
                    } else if a["connected"] == true {
                        "connected"
                    } else {
                        "offline"
                    };
                    let joined_by = match (a["join_method"].as_str(), a["join_identity"].as_str()) {
                        (Some(method), Some(identity)) => format!("{method} {identity}"),
                        (Some(method), None) => method.to_owned(),
                        (None, _) => "-".to_owned(),
                    };
                    println!(
                        "{:<32} {:<10} {:<8} {:<25} {:<34} {:<25} {}",
                        a["id"].as_str().unwrap_or(""),
                        status,
                        a["version"].as_str().unwrap_or(""),
                        a["last_heartbeat"].as_str().unwrap_or("-"),
                        a["cert_serial"].as_str().unwrap_or(""),
                        a["cert_not_after"].as_str().unwrap_or(""),
                        joined_by,
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        ApplianceSub::Deployment { appliance, logs, api } => {
            let appliance = operations::path_segment("appliance id", &appliance)?;
            let status: serde_json::Value =
                api.client()?.get(&format!("/v1/appliances/{appliance}/deployment")).await?;
            if logs {
                print!("{}", deployments::services_text(&status));
            } else {
                terminal::print_json(&status)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        ApplianceSub::Revoke { appliance, api } => {
            let out: serde_json::Value =
                api.client()?.post(&format!("/v1/appliances/{appliance}/revoke"), &serde_json::json!({})).await?;
            if api.json {
                terminal::print_json(&out)?;
            } else {
                println!("revoked {appliance}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The workspace id to put in a request path: the one given, or the tenant's only one; checked
/// as a path segment either way.
pub(crate) async fn resolve_workspace(c: &client::ApiClient, given: Option<String>) -> anyhow::Result<String> {
    let id = match given {
        Some(w) => w,
        None => {
            let list: Vec<serde_json::Value> = c.get("/v1/workspaces").await?;
            match list.as_slice() {
                [one] => one["id"].as_str().unwrap_or_default().to_owned(),
                [] => anyhow::bail!("your tenant has no workspace"),
                _ => anyhow::bail!("your tenant has several workspaces; pass --workspace"),
            }
        }
    };
    operations::path_segment("workspace id", &id)
}

async fn env(cmd: EnvCmd) -> anyhow::Result<ExitCode> {
    match cmd.command {
        EnvSub::Create { name, workspace, api } => {
            let c = api.client()?;
            let ws = resolve_workspace(&c, workspace).await?;
            let env: serde_json::Value =
                c.post(&format!("/v1/workspaces/{ws}/environments"), &serde_json::json!({ "name": name })).await?;
            if api.json {
                terminal::print_json(&env)?;
            } else {
                println!("{}", env["id"].as_str().unwrap_or_default());
            }
        }
        EnvSub::List { workspace, api } => {
            let c = api.client()?;
            let ws = resolve_workspace(&c, workspace).await?;
            let envs: serde_json::Value = c.get(&format!("/v1/workspaces/{ws}/environments")).await?;
            if api.json {
                terminal::print_json(&envs)?;
            } else {
                for e in envs.as_array().into_iter().flatten() {
                    println!("{}  {}", e["id"].as_str().unwrap_or(""), e["name"].as_str().unwrap_or(""));
                }
            }
        }
        EnvSub::Policy(EnvPolicyCmd { command: EnvPolicySub::Push { environment, signed, api } }) => {
            let text = std::fs::read_to_string(&signed).with_context(|| format!("reading {}", signed.display()))?;
            let envelope: serde_json::Value = serde_json::from_str(&text).with_context(|| {
                format!(
                    "{} is not a signed policy (JSON); sign one with `airlock customer policy sign`",
                    signed.display()
                )
            })?;
            let out: serde_json::Value = api
                .client()?
                .put(&format!("/v1/environments/{environment}/policy"), &serde_json::json!({ "envelope": envelope }))
                .await?;
            if api.json {
                terminal::print_json(&out)?;
            } else {
                println!(
                    "relayed policy serial {} ({}) to environment {environment}: sent to {} connected appliance(s); the others get it when they connect",
                    out["serial"],
                    out["policy_sha256"].as_str().unwrap_or("?"),
                    out["sent_to"]
                );
            }
        }
        EnvSub::Policy(EnvPolicyCmd { command: EnvPolicySub::Show { environment, api } }) => {
            let out: serde_json::Value = api.client()?.get(&format!("/v1/environments/{environment}/policy")).await?;
            if api.json {
                terminal::print_json(&out)?;
            } else {
                println!("serial:      {}", out["serial"]);
                println!("sha256:      {}", out["policy_sha256"].as_str().unwrap_or("?"));
                println!("signatures:  {}", out["envelope"]["signatures"].as_array().map_or(0, Vec::len));
                println!("relayed by:  {}", out["relayed_by"].as_str().unwrap_or("?"));
                println!(
                    "relayed at:  {}",
                    airlock_core::Timestamp::from_unix_millis(out["relayed_at"].as_i64().unwrap_or(0))
                );
                if let Ok(envelope) = serde_json::from_value::<airlock_core::dsse::Envelope>(out["envelope"].clone()) {
                    println!("\n{}", String::from_utf8_lossy(&envelope.payload).trim_end());
                }
            }
        }
        EnvSub::JoinToken { environment, ttl, api } => {
            let body = serde_json::json!({ "ttl_seconds": ttl.map(|d| d.as_secs()) });
            let out: serde_json::Value =
                api.client()?.post(&format!("/v1/environments/{environment}/join-tokens"), &body).await?;
            if api.json {
                terminal::print_json(&out)?;
            } else {
                eprintln!("single-use join token, expires {}:", out["expires_at"].as_str().unwrap_or("?"));
                println!("{}", out["token"].as_str().unwrap_or_default());
            }
        }
        EnvSub::JoinRule(cmd) => return env_join_rule(cmd.command).await,
    }
    Ok(ExitCode::SUCCESS)
}

async fn env_join_rule(cmd: EnvJoinRuleSub) -> anyhow::Result<ExitCode> {
    let print_rule = |r: &serde_json::Value| {
        let s = |v: &serde_json::Value| v.as_str().unwrap_or("").to_owned();
        let (scope, who) = match r["method"].as_str() {
            Some("gcp") => (s(&r["gcp"]["project"]), s(&r["gcp"]["service_account"])),
            Some("k8s") if r["k8s"]["require_token_request"] == true => {
                (s(&r["k8s"]["issuer"]), format!("{} (TokenRequest tokens only)", s(&r["k8s"]["service_account"])))
            }
            Some("k8s") => (s(&r["k8s"]["issuer"]), s(&r["k8s"]["service_account"])),
            _ => (
                s(&r["aws"]["account"]),
                r["aws"]["arn_pattern"].as_str().unwrap_or("(any principal of the account)").to_owned(),
            ),
        };
        println!(
            "{:<32} {:<6} {:<14} {}",
            r["id"].as_str().unwrap_or(""),
            r["method"].as_str().unwrap_or(""),
            scope,
            who
        );
    };
    match cmd {
        EnvJoinRuleSub::Add {
            environment,
            aws_account,
            aws_role_arn,
            gcp_project,
            gcp_service_account,
            k8s_issuer,
            k8s_service_account,
            k8s_require_token_request,
            api,
        } => {
            let environment = operations::path_segment("environment id", &environment)?;
            let body = match (aws_account, gcp_project, k8s_issuer) {
                (Some(account), None, None) => {
                    serde_json::json!({ "aws": { "account": account, "arn_pattern": aws_role_arn } })
                }
                (None, Some(project), None) => serde_json::json!({ "gcp": {
                    "project": project, "service_account": gcp_service_account.unwrap_or_default() } }),
                (None, None, Some(issuer)) => serde_json::json!({ "k8s": {
                    "issuer": issuer, "service_account": k8s_service_account.unwrap_or_default(),
                    "require_token_request": k8s_require_token_request } }),
                _ => anyhow::bail!(
                    "give one method: --aws-account [--aws-role-arn], --gcp-project with --gcp-service-account, or --k8s-issuer with --k8s-service-account"
                ),
            };
            let out: serde_json::Value =
                api.client()?.post(&format!("/v1/environments/{environment}/join-rules"), &body).await?;
            if api.json {
                terminal::print_json(&out)?;
            } else {
                println!("{}", out["id"].as_str().unwrap_or_default());
            }
        }
        EnvJoinRuleSub::List { environment, api } => {
            let environment = operations::path_segment("environment id", &environment)?;
            let out: serde_json::Value =
                api.client()?.get(&format!("/v1/environments/{environment}/join-rules")).await?;
            if api.json {
                terminal::print_json(&out)?;
            } else {
                println!("{:<32} {:<6} {:<14} IDENTITY", "RULE", "METHOD", "ACCOUNT/PROJECT/ISSUER");
                out["rules"].as_array().into_iter().flatten().for_each(print_rule);
            }
        }
        EnvJoinRuleSub::Remove { environment, rule, api } => {
            let environment = operations::path_segment("environment id", &environment)?;
            let rule = operations::path_segment("join rule id", &rule)?;
            let out: serde_json::Value =
                api.client()?.delete(&format!("/v1/environments/{environment}/join-rules/{rule}")).await?;
            if api.json {
                terminal::print_json(&out)?;
            } else {
                println!("removed {rule}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn audit(cmd: AuditCmd) -> anyhow::Result<ExitCode> {
    match cmd.command {
        AuditSub::Verify { file: Some(file), checkpoints, key, .. } => {
            verify_appliance_audit(&file, checkpoints.as_deref(), key.as_deref())
        }
        #[cfg(feature = "server")]
        AuditSub::Verify { data_dir: Some(data_dir), kek_file, checkpoints, key, .. } => {
            let data = DataDirArgs { data_dir, kek_file };
            let evidence = airlock_server::AuditEvidence { checkpoints, audit_key: key };
            let report = airlock_server::verify_audit(&data.data_dir, &data.kek(), &evidence).await?;
            match &report.checkpoints {
                Ok(0) => {}
                Ok(n) => println!("OK     {n} checkpoints read"),
                Err(e) => println!("BROKEN checkpoints: {e}"),
            }
            if !report.head_macs_checked {
                println!("NOTE   head MACs not checked: the KEK is not readable; the checkpoints stand in for them");
            }
            for c in &report.chains {
                match &c.result {
                    Ok(n) => println!("OK     chain {}: at seq {n}", c.chain),
                    Err(e) => println!("BROKEN chain {}: {e}", c.chain),
                }
            }
            if report.ok() {
                println!("audit log intact ({} chains)", report.chains.len());
                Ok(ExitCode::SUCCESS)
            } else {
                println!("audit log has been tampered with");
                Ok(ExitCode::from(2))
            }
        }
        #[cfg(feature = "server")]
        AuditSub::Verify { .. } => anyhow::bail!("give --data-dir or --file"),
        #[cfg(feature = "server")]
        AuditSub::Checkpoint { data, out } => {
            let lines =
                airlock_server::checkpoint_audit(&data.data_dir, &data.kek(), &airlock_server::clock::SystemClock)
                    .await?;
            match out {
                Some(path) => {
                    airlock_server::audit_checkpoints::append_lines(&path, &lines)
                        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
                    eprintln!("{} checkpoints appended to {}", lines.len(), path.display());
                }
                None => {
                    for line in lines {
                        println!("{line}");
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        #[cfg(feature = "server")]
        AuditSub::Export { data, chain } => {
            for rec in airlock_server::export_audit(&data.data_dir, &data.kek(), chain.as_deref()).await? {
                println!("{}", serde_json::to_string(&rec)?);
            }
            Ok(ExitCode::SUCCESS)
        }
        #[cfg(not(feature = "server"))]
        AuditSub::Verify { .. } | AuditSub::Export { .. } | AuditSub::Checkpoint { .. } => {
            anyhow::bail!("this build has no control plane support; rebuild with the `server` feature")
        }
    }
}

#[cfg(feature = "appliance")]
fn verify_appliance_audit(
    file: &std::path::Path,
    checkpoints: Option<&std::path::Path>,
    key: Option<&std::path::Path>,
) -> anyhow::Result<ExitCode> {
    use airlock_appliance::audit_log::{self, HeadMac};
    use anyhow::Context;
    let verified = match checkpoints {
        None => audit_log::verify_file(file).map(|r| (r, None)),
        Some(cp_path) => {
            let lines = std::fs::read_to_string(cp_path).with_context(|| format!("reading {}", cp_path.display()))?;
            let public = match key {
                Some(k) => {
                    let pem = std::fs::read_to_string(k).with_context(|| format!("reading {}", k.display()))?;
                    airlock_core::customer_key::CustomerPublicKey::from_pem(&pem)
                        .with_context(|| format!("{} is not the checkpoint key", k.display()))?
                }
                None => audit_log::checkpoints::public_key(file.parent().unwrap_or(std::path::Path::new(".")))
                    .map_err(|e| anyhow::anyhow!("{e}; give --key"))?,
            };
            audit_log::verify_file_with_checkpoints(file, &lines, &public).map(|(r, c)| (r, Some(c)))
        }
    };
    match verified {
        Ok((report, checked)) => {
            if let Some(c) = checked {
                println!("OK     {} checkpoints, the last at seq {}", c.count, c.last_seq);
            }
            let mac = match report.mac {
                HeadMac::Verified => "head MAC verified",
                HeadMac::KeyUnreadable => "head MAC not checked: its key beside the log is not readable by you",
                HeadMac::Unkeyed => "head not keyed yet (an old log; the appliance keys it at its next start)",
            };
            println!("OK     {}: {} records; {mac}", file.display(), report.head.seq);
            Ok(ExitCode::SUCCESS)
        }
        Err(why) => {
            println!("BROKEN {}: {why}", file.display());
            Ok(ExitCode::from(2))
        }
    }
}

#[cfg(not(feature = "appliance"))]
fn verify_appliance_audit(
    _file: &std::path::Path,
    _checkpoints: Option<&std::path::Path>,
    _key: Option<&std::path::Path>,
) -> anyhow::Result<ExitCode> {
    anyhow::bail!("this build has no appliance support; rebuild with the `appliance` feature")
}
