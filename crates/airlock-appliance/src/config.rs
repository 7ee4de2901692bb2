//! Appliance configuration: defaults, then a TOML file, then `AIRLOCK_*` environment, then flags.
//!
//! Unknown keys in the file are an error: a typo in a security setting must stop startup.
//! Environment is read through `EnvSource`, so tests never change the process's environment.

use std::path::{Path, PathBuf};
use std::time::Duration;

use std::collections::BTreeMap;

use airlock_core::Fingerprint;
use airlock_core::release::SecretRef;
use airlock_core::token::{Secret, TokenKind};
use serde::Deserialize;

/// The file form. Unknown keys are an error: a typo in a security setting must stop startup.
/// No `Debug`: it holds the join token in clear.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub control_plane: Option<String>,
    pub ca_fingerprint: Option<String>,
    pub join_token: Option<String>,
    /// `aws`, `gcp` or `k8s`: join with the host's platform identity instead of a token.
    pub join_method: Option<String>,
    /// The environment (`env_…`) to join: only its join rules judge the platform identity, and a join token must be its.
    pub environment: Option<String>,
    /// The tenant (`ten_…`) to join: only its join rules judge the platform identity. A platform join names this
    /// or `environment`.
    pub tenant: Option<String>,
    /// The GCE metadata server a GCP join asks (default `http://metadata.google.internal`).
    pub gcp_metadata_url: Option<String>,
    /// The projected service-account token a Kubernetes join reads (default
    /// `/var/run/secrets/tokens/airlock`).
    pub k8s_token_path: Option<PathBuf>,
    /// Ask the cluster's TokenRequest API for a token whose audience binds each join's challenge,
    /// instead of showing the mounted token (which then only authenticates that request).
    pub k8s_token_request: Option<bool>,
    /// The Kubernetes API server (default `https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT`).
    pub k8s_api_url: Option<String>,
    /// The CA file that verifies the API server (default the service account's `ca.crt`).
    pub k8s_ca_path: Option<PathBuf>,
    /// The STS endpoint an AWS join signs for (default `https://sts.<region>.amazonaws.com`).
    pub aws_sts_endpoint: Option<String>,
    /// The region an AWS join signs for, when the standard chain names none.
    pub aws_region: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub max_backoff_seconds: Option<u64>,
    /// Customer public keys (PEM files) to pin at install.
    #[serde(default)]
    pub customer_keys: Vec<PathBuf>,
    /// A customer-signed policy file (from `airlock customer policy sign`).
    pub policy: Option<PathBuf>,
    /// The customer's admin group (a name or a numeric gid): its members may use the admin
    /// socket, besides the appliance's own user and root.
    pub admin_group: Option<String>,
    /// The unprivileged user vendor code runs as (an appliance running as root switches to
    /// it); by default an unused uid of the appliance's own.
    pub box_user: Option<String>,
    /// Where signed audit checkpoints go: `syslog`, or an absolute file path outside the state
    /// directory.
    pub audit_checkpoints: Option<String>,
    /// A checkpoint every this many audit records (default 1000), besides start and stop.
    pub audit_checkpoint_every: Option<u64>,
    /// `[secrets.aws]`: region and endpoints for `aws-sm:` and `aws-ssm:` references.
    #[serde(default)]
    pub secrets: crate::SecretsConfig,
    /// Where deployed releases are installed: outside the state directory, readable by the box
    /// user (default `/var/lib/airlock-releases/<tag>` for root).
    pub releases_dir: Option<PathBuf>,
    /// The customer's own services bound in place of a release's bundled dependencies:
    /// `[dependency.postgres] url = "postgres://…"`, `credentials = { password = "file:/…" }`.
    #[serde(default)]
    pub dependency: BTreeMap<String, CustomerDependency>,
    /// MiB one box's working directory may hold (default 4096).
    pub box_disk_mib: Option<u64>,
    /// Files (entries) one box's working directory may hold (default 100000).
    pub box_disk_files: Option<u64>,
    /// MiB kept free on the disk boxes write to: below it, the box holding the most is killed
    /// (default a tenth of that filesystem, at most 1024; 0 keeps no reserve).
    pub disk_reserve_mib: Option<u64>,
}

/// A customer's own service a release's dependency is bound to.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomerDependency {
    pub url: String,
    /// Credentials by role (e.g. `password`), by reference: values are read only to start a
    /// service.
    #[serde(default)]
    pub credentials: BTreeMap<String, SecretRef>,
}

impl std::fmt::Debug for FileConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileConfig")
            .field("control_plane", &self.control_plane)
            .field("state_dir", &self.state_dir)
            .finish_non_exhaustive()
    }
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File(path.into(), e.to_string()))?;
        toml::from_str(&text).map_err(|e| ConfigError::File(path.into(), e.to_string()))
    }
}

/// Values given on the command line. No `Debug`: it holds the join token in clear.
#[derive(Default, Clone)]
pub struct Flags {
    pub control_plane: Option<String>,
    pub ca_fingerprint: Option<String>,
    pub join_token: Option<String>,
    pub join_method: Option<String>,
    pub environment: Option<String>,
    pub tenant: Option<String>,
    pub aws_sts_endpoint: Option<String>,
    pub gcp_metadata_url: Option<String>,
    pub k8s_token_path: Option<PathBuf>,
    pub k8s_token_request: bool,
    pub k8s_api_url: Option<String>,
    pub k8s_ca_path: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub customer_keys: Vec<PathBuf>,
    pub policy: Option<PathBuf>,
    pub admin_group: Option<String>,
    pub box_user: Option<String>,
    pub audit_checkpoints: Option<String>,
    pub audit_checkpoint_every: Option<u64>,
    pub releases_dir: Option<PathBuf>,
    pub box_disk_mib: Option<u64>,
    pub box_disk_files: Option<u64>,
    pub disk_reserve_mib: Option<u64>,
}

/// Where environment variables come from; tests pass a map instead of mutating the process.
pub trait EnvSource {
    fn get(&self, key: &str) -> Option<String>;
}

pub struct ProcessEnv;

impl EnvSource for ProcessEnv {
    fn get(&self, key: &str) -> Option<String> {
        std::env::var(key).ok().filter(|v| !v.is_empty())
    }
}

impl EnvSource for std::collections::HashMap<String, String> {
    fn get(&self, key: &str) -> Option<String> {
        std::collections::HashMap::get(self, key).cloned()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {0}: {1}")]
    File(PathBuf, String),
    #[error("missing `{0}`: give it as a flag, in the config file, or as {1}")]
    Missing(&'static str, &'static str),
    #[error("`control_plane` must be an https:// URL, got `{0}`")]
    BadUrl(String),
    #[error(transparent)]
    Fingerprint(#[from] airlock_core::fingerprint::FingerprintParseError),
    #[error("join token: {0}")]
    Token(#[from] airlock_core::token::TokenParseError),
    #[error("`environment`: {0}")]
    Environment(#[from] airlock_core::id::IdParseError),
    #[error("`tenant`: {0}")]
    Tenant(airlock_core::id::IdParseError),
    #[error("`admin_group` must be a group name or a numeric gid, got `{0}`")]
    AdminGroup(String),
    #[error("`audit_checkpoints`: {0}")]
    Checkpoints(String),
    #[error("`releases_dir` must be an absolute path, got `{0}`")]
    ReleasesDir(PathBuf),
    #[error("`dependency.{0}`: {1}")]
    Dependency(String, &'static str),
    #[error("`join_method` is `aws`, `gcp` or `k8s` (or unset, with a join token), got `{0}`")]
    JoinMethod(String),
    #[error("give a join token or a `join_method`, not both")]
    TwoJoinMethods,
    #[error("`gcp_metadata_url` is http(s)://HOST[:PORT], got `{0}`")]
    GcpMetadataUrl(String),
    #[error("`k8s_token_path` must be an absolute path, got `{0}`")]
    K8sTokenPath(PathBuf),
    #[error("`k8s_ca_path` must be an absolute path, got `{0}`")]
    K8sCaPath(PathBuf),
    #[error("`k8s_api_url` is https://HOST[:PORT], got `{0}`")]
    K8sApiUrl(String),
    #[error(
        "a Kubernetes TokenRequest needs the API server: give `k8s_api_url`, or run in a pod (KUBERNETES_SERVICE_HOST)"
    )]
    K8sNoApiServer,
    #[error("`aws_sts_endpoint`: {0}")]
    AwsEndpoint(String),
    #[error("`aws_region` looks like `eu-west-1`, got `{0}`")]
    AwsRegion(String),
    #[error("`{0}` must be a whole number from {1} to 2^44, got `{2}`")]
    BadNumber(&'static str, u64, String),
}

/// What one box may hold on disk, and what is kept free for the appliance (see
/// `sandbox::usage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BoxDisk {
    pub box_bytes: u64,
    pub box_files: u64,
    /// Bytes kept free, as configured; `None`: a tenth of the filesystem, at most 1 GiB
    /// (`sandbox::usage::default_reserve`), since boxes may write to a small tmpfs (`/run`)
    /// where a fixed 1 GiB could never be free and every box of any size would be killed.
    pub reserve_bytes: Option<u64>,
}

impl Default for BoxDisk {
    fn default() -> Self {
        Self { box_bytes: 4 << 30, box_files: 100_000, reserve_bytes: None }
    }
}

/// `url` if it is a bare base URL of one of `schemes`: a host, no credentials, no path, query
/// or fragment (requests join their own paths to it).
fn base_url(url: &str, schemes: &[&str]) -> Option<reqwest::Url> {
    reqwest::Url::parse(url).ok().filter(|u| {
        schemes.contains(&u.scheme())
            && u.host_str().is_some()
            && u.username().is_empty()
            && u.password().is_none()
            && u.path() == "/"
            && u.query().is_none()
            && u.fragment().is_none()
    })
}

/// The metadata server a GCP join asks unless configured.
pub const DEFAULT_GCP_METADATA_URL: &str = "http://metadata.google.internal";
/// Where a Kubernetes join reads its projected service-account token unless configured.
pub const DEFAULT_K8S_TOKEN_PATH: &str = "/var/run/secrets/tokens/airlock";
/// The service account's own token, which authenticates a TokenRequest unless configured.
pub const DEFAULT_K8S_API_TOKEN_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
/// The cluster CA that verifies the API server unless configured.
pub const DEFAULT_K8S_CA_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";

/// How an appliance proves its platform identity, at its join and at each renewal (`crate::join`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlatformJoinConfig {
    Aws(AwsJoinConfig),
    /// The GCE metadata server to ask for identity tokens (`http://HOST[:PORT]`).
    Gcp {
        metadata_url: reqwest::Url,
    },
    /// The service-account token file the kubelet keeps fresh: shown as the proof (its audience
    /// `airlock:<CA fingerprint>`), or with `token_request` only to ask the API server for a
    /// token bound to each challenge.
    K8s {
        token_path: PathBuf,
        token_request: Option<K8sTokenRequest>,
    },
}

/// Where a Kubernetes join asks for a token per challenge (`crate::join::k8s::requested_token`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct K8sTokenRequest {
    /// The API server, `https://HOST[:PORT]/`.
    pub api_url: reqwest::Url,
    /// The PEM file of the CA that verifies it.
    pub ca_path: PathBuf,
}

/// How a first start joins with the host's AWS identity (`crate::join::aws`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AwsJoinConfig {
    /// The STS endpoint signed for; `None`: `https://sts.<region>.amazonaws.com`.
    pub sts_endpoint: Option<reqwest::Url>,
    /// The region signed for; `None`: the standard chain's (environment, profile, instance).
    pub region: Option<String>,
}

/// The customer's admin group, as configured: resolved to a gid when the appliance starts
/// (`crate::admin::access`), so a group created later is found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminGroup {
    Name(String),
    Gid(u32),
}

impl std::str::FromStr for AdminGroup {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(gid) = s.parse::<u32>() {
            return Ok(Self::Gid(gid));
        }
        // The characters `/etc/group` and useradd allow; anything else is a typo or worse.
        let valid = !s.is_empty()
            && s.len() <= 32
            && !s.starts_with('-')
            && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        if valid { Ok(Self::Name(s.to_owned())) } else { Err(ConfigError::AdminGroup(s.chars().take(40).collect())) }
    }
}

impl std::fmt::Display for AdminGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Name(name) => f.write_str(name),
            Self::Gid(gid) => write!(f, "gid {gid}"),
        }
    }
}

/// The resolved configuration the appliance runs with.
#[derive(Debug, Clone)]
pub struct ApplianceConfig {
    pub control_plane: String,
    pub ca_fingerprint: Fingerprint,
    /// Needed only for the first join; ignored once the state directory holds an identity.
    pub join_token: Option<Secret>,
    /// Join with the host's platform identity instead of a token (never both).
    pub platform_join: Option<PlatformJoinConfig>,
    /// The environment a join names (`--environment`); `None`: the control plane finds it among the tenant's.
    pub join_environment: Option<airlock_core::EnvironmentId>,
    /// The tenant a join names (`--tenant`). A platform join names this or `join_environment`, or is refused.
    pub join_tenant: Option<airlock_core::TenantId>,
    pub state_dir: PathBuf,
    pub max_backoff: Duration,
    pub customer_keys: Vec<PathBuf>,
    pub policy: Option<PathBuf>,
    /// Whose members may use the admin socket besides the appliance's user and root; none by
    /// default.
    pub admin_group: Option<AdminGroup>,
    /// The user vendor code runs as; `None`: an unused uid the appliance picks.
    pub box_user: Option<String>,
    /// Where signed checkpoints of the audit head go; none by default.
    pub audit_checkpoints: Option<crate::audit_log::CheckpointConfig>,
    /// Where `aws-sm:` and `aws-ssm:` secrets are asked for (file only).
    pub secrets: crate::SecretsConfig,
    /// Where deployed releases are installed; `None`: the default beside the box's working
    /// directories (`deploy::default_releases_dir`).
    pub releases_dir: Option<PathBuf>,
    /// Dependencies bound to the customer's own services, by name; the rest are bundled.
    pub dependencies: BTreeMap<String, CustomerDependency>,
    /// What one box may hold on disk, and the reserve kept free.
    pub box_disk: BoxDisk,
}

/// Records between periodic audit checkpoints unless configured.
pub const DEFAULT_CHECKPOINT_EVERY: u64 = 1000;

impl ApplianceConfig {
    /// Where a join is pinned (`--tenant`, `--environment`).
    pub fn join_target(&self) -> airlock_proto::join::JoinTarget {
        airlock_proto::join::JoinTarget { tenant: self.join_tenant, environment: self.join_environment }
    }

    pub fn resolve(file: Option<FileConfig>, env: &dyn EnvSource, flags: &Flags) -> Result<Self, ConfigError> {
        let file = file.unwrap_or_default();
        let pick = |flag: &Option<String>, key: &str, file: &Option<String>| {
            flag.clone().or_else(|| env.get(key)).or_else(|| file.clone())
        };
        let control_plane = pick(&flags.control_plane, "AIRLOCK_CONTROL_PLANE", &file.control_plane)
            .ok_or(ConfigError::Missing("control_plane", "AIRLOCK_CONTROL_PLANE"))?;
        let control_plane = control_plane.trim_end_matches('/').to_owned();
        if !control_plane.starts_with("https://") {
            return Err(ConfigError::BadUrl(control_plane));
        }
        let ca_fingerprint = pick(&flags.ca_fingerprint, "AIRLOCK_CA_FINGERPRINT", &file.ca_fingerprint)
            .ok_or(ConfigError::Missing("ca_fingerprint", "AIRLOCK_CA_FINGERPRINT"))?
            .parse()?;
        let join_token = pick(&flags.join_token, "AIRLOCK_JOIN_TOKEN", &file.join_token)
            .map(|t| Secret::parse(TokenKind::Join, &t))
            .transpose()?;
        let platform_join = match pick(&flags.join_method, "AIRLOCK_JOIN_METHOD", &file.join_method).as_deref() {
            None | Some("token") => None,
            Some("aws") => {
                let sts_endpoint = pick(&flags.aws_sts_endpoint, "AIRLOCK_AWS_STS_ENDPOINT", &file.aws_sts_endpoint)
                    .map(|e| {
                        // The same rules as the secrets' endpoints: http(s)://HOST[:PORT][/PATH], nothing else.
                        e.parse::<crate::AwsEndpoint>().map_err(ConfigError::AwsEndpoint)?;
                        reqwest::Url::parse(&e).map_err(|err| ConfigError::AwsEndpoint(err.to_string()))
                    })
                    .transpose()?;
                let region = file.aws_region.clone();
                if let Some(r) = &region
                    && (r.is_empty()
                        || r.len() > 32
                        || !r.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'))
                {
                    return Err(ConfigError::AwsRegion(r.chars().take(40).collect()));
                }
                Some(PlatformJoinConfig::Aws(AwsJoinConfig { sts_endpoint, region }))
            }
            Some("gcp") => {
                let url = pick(&flags.gcp_metadata_url, "AIRLOCK_GCP_METADATA_URL", &file.gcp_metadata_url)
                    .unwrap_or_else(|| DEFAULT_GCP_METADATA_URL.to_owned());
                let metadata_url = base_url(&url, &["http", "https"])
                    .ok_or_else(|| ConfigError::GcpMetadataUrl(url.chars().take(80).collect()))?;
                Some(PlatformJoinConfig::Gcp { metadata_url })
            }
            Some("k8s") => {
                let requested = flags.k8s_token_request
                    || env.get("AIRLOCK_K8S_TOKEN_REQUEST").is_some_and(|v| v == "true" || v == "1")
                    || file.k8s_token_request.unwrap_or(false);
                // With a TokenRequest the mounted token is only the API credential: the service account's own.
                let default_token = if requested { DEFAULT_K8S_API_TOKEN_PATH } else { DEFAULT_K8S_TOKEN_PATH };
                let token_path = flags
                    .k8s_token_path
                    .clone()
                    .or_else(|| env.get("AIRLOCK_K8S_TOKEN_PATH").map(PathBuf::from))
                    .or_else(|| file.k8s_token_path.clone())
                    .unwrap_or_else(|| PathBuf::from(default_token));
                if !token_path.is_absolute() {
                    return Err(ConfigError::K8sTokenPath(token_path));
                }
                let token_request = if requested {
                    let in_cluster = env.get("KUBERNETES_SERVICE_HOST").map(|host| {
                        let port = env.get("KUBERNETES_SERVICE_PORT").unwrap_or_else(|| "443".into());
                        // An IPv6 service address is bracketed in a URL.
                        if host.contains(':') {
                            format!("https://[{host}]:{port}")
                        } else {
                            format!("https://{host}:{port}")
                        }
                    });
                    let url = pick(&flags.k8s_api_url, "AIRLOCK_K8S_API_URL", &file.k8s_api_url)
                        .or(in_cluster)
                        .ok_or(ConfigError::K8sNoApiServer)?;
                    let api_url = base_url(&url, &["https"])
                        .ok_or_else(|| ConfigError::K8sApiUrl(url.chars().take(80).collect()))?;
                    let ca_path = flags
                        .k8s_ca_path
                        .clone()
                        .or_else(|| env.get("AIRLOCK_K8S_CA_PATH").map(PathBuf::from))
                        .or_else(|| file.k8s_ca_path.clone())
                        .unwrap_or_else(|| PathBuf::from(DEFAULT_K8S_CA_PATH));
                    if !ca_path.is_absolute() {
                        return Err(ConfigError::K8sCaPath(ca_path));
                    }
                    Some(K8sTokenRequest { api_url, ca_path })
                } else {
                    None
                };
                Some(PlatformJoinConfig::K8s { token_path, token_request })
            }
            Some(other) => return Err(ConfigError::JoinMethod(other.chars().take(40).collect())),
        };
        if platform_join.is_some() && join_token.is_some() {
            return Err(ConfigError::TwoJoinMethods);
        }
        let join_environment = pick(&flags.environment, "AIRLOCK_ENVIRONMENT", &file.environment)
            .map(|e| e.parse::<airlock_core::EnvironmentId>())
            .transpose()?;
        let join_tenant = pick(&flags.tenant, "AIRLOCK_TENANT", &file.tenant)
            .map(|t| t.parse::<airlock_core::TenantId>())
            .transpose()
            .map_err(ConfigError::Tenant)?;
        let state_dir = flags
            .state_dir
            .clone()
            .or_else(|| env.get("AIRLOCK_STATE_DIR").map(PathBuf::from))
            .or(file.state_dir)
            .ok_or(ConfigError::Missing("state_dir", "AIRLOCK_STATE_DIR"))?;
        let max_backoff = env
            .get("AIRLOCK_MAX_BACKOFF_SECONDS")
            .and_then(|v| v.parse().ok())
            .or(file.max_backoff_seconds)
            .unwrap_or(60)
            .clamp(1, 3600);
        let max_backoff = Duration::from_secs(max_backoff);
        let customer_keys = if !flags.customer_keys.is_empty() {
            flags.customer_keys.clone()
        } else if let Some(list) = env.get("AIRLOCK_CUSTOMER_KEYS") {
            list.split(',').map(PathBuf::from).collect()
        } else {
            file.customer_keys
        };
        let policy = flags.policy.clone().or_else(|| env.get("AIRLOCK_POLICY").map(PathBuf::from)).or(file.policy);
        let admin_group =
            pick(&flags.admin_group, "AIRLOCK_ADMIN_GROUP", &file.admin_group).map(|g| g.parse()).transpose()?;
        let box_user = pick(&flags.box_user, "AIRLOCK_BOX_USER", &file.box_user);
        let every = flags
            .audit_checkpoint_every
            .or_else(|| env.get("AIRLOCK_AUDIT_CHECKPOINT_EVERY").and_then(|v| v.parse().ok()))
            .or(file.audit_checkpoint_every)
            .unwrap_or(DEFAULT_CHECKPOINT_EVERY)
            .max(1);
        let audit_checkpoints = pick(&flags.audit_checkpoints, "AIRLOCK_AUDIT_CHECKPOINTS", &file.audit_checkpoints)
            .map(|s| s.parse().map_err(ConfigError::Checkpoints))
            .transpose()?
            .map(|sink| crate::audit_log::CheckpointConfig { sink, every });
        let releases_dir = flags
            .releases_dir
            .clone()
            .or_else(|| env.get("AIRLOCK_RELEASES_DIR").map(PathBuf::from))
            .or(file.releases_dir);
        if let Some(dir) = &releases_dir
            && !dir.is_absolute()
        {
            return Err(ConfigError::ReleasesDir(dir.clone()));
        }
        // A flag, else the environment (a bad number there is an error, not ignored), else the file.
        let number =
            |flag: Option<u64>, key: &'static str, file: Option<u64>, min: u64| -> Result<Option<u64>, ConfigError> {
                let given = match (flag, env.get(key)) {
                    (Some(n), _) => Some(n),
                    (None, Some(v)) => Some(
                        v.trim()
                            .parse::<u64>()
                            .map_err(|_| ConfigError::BadNumber(key, min, v.chars().take(40).collect()))?,
                    ),
                    (None, None) => file,
                };
                match given {
                    Some(n) if n < min || n > 1 << 44 => Err(ConfigError::BadNumber(key, min, n.to_string())),
                    n => Ok(n),
                }
            };
        let defaults = BoxDisk::default();
        let box_disk = BoxDisk {
            box_bytes: number(flags.box_disk_mib, "AIRLOCK_BOX_DISK_MIB", file.box_disk_mib, 1)?
                .map_or(defaults.box_bytes, |m| m << 20),
            box_files: number(flags.box_disk_files, "AIRLOCK_BOX_DISK_FILES", file.box_disk_files, 1)?
                .unwrap_or(defaults.box_files),
            reserve_bytes: number(flags.disk_reserve_mib, "AIRLOCK_DISK_RESERVE_MIB", file.disk_reserve_mib, 0)?
                .map_or(defaults.reserve_bytes, |m| Some(m << 20)),
        };
        for (name, dep) in &file.dependency {
            let slug = !name.is_empty()
                && name.len() <= 63
                && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if !slug {
                return Err(ConfigError::Dependency(name.chars().take(64).collect(), "the name must be a slug"));
            }
            if dep.url.is_empty() || dep.url.chars().any(char::is_control) {
                return Err(ConfigError::Dependency(name.clone(), "`url` must be a non-empty URL"));
            }
        }
        Ok(Self {
            control_plane,
            ca_fingerprint,
            join_token,
            platform_join,
            join_environment,
            join_tenant,
            state_dir,
            max_backoff,
            customer_keys,
            policy,
            admin_group,
            box_user,
            audit_checkpoints,
            secrets: file.secrets,
            releases_dir,
            dependencies: file.dependency,
            box_disk,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    const FP: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

    #[test]
    fn box_disk_limits_come_from_flags_env_or_file_and_a_bad_number_is_refused() {
        let resolve = |env: &[(&str, &str)], flags: &Flags| {
            let file = FileConfig {
                control_plane: Some("https://file".into()),
                ca_fingerprint: Some(FP.into()),
                state_dir: Some("/file".into()),
                box_disk_files: Some(50),
                ..Default::default()
            };
            let env: HashMap<String, String> = env.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect();
            ApplianceConfig::resolve(Some(file), &env, flags)
        };
        let d = resolve(&[], &Flags::default()).unwrap().box_disk;
        assert_eq!(d, BoxDisk { box_files: 50, ..BoxDisk::default() });
        assert_eq!((d.box_bytes, d.reserve_bytes), (4 << 30, None));
        let flags = Flags { box_disk_mib: Some(8), ..Default::default() };
        let d = resolve(&[("AIRLOCK_BOX_DISK_MIB", "16"), ("AIRLOCK_DISK_RESERVE_MIB", "0")], &flags).unwrap().box_disk;
        assert_eq!((d.box_bytes, d.reserve_bytes), (8 << 20, Some(0)));
        for (key, bad) in
            [("AIRLOCK_BOX_DISK_MIB", "4G"), ("AIRLOCK_BOX_DISK_FILES", "0"), ("AIRLOCK_DISK_RESERVE_MIB", "-1")]
        {
            let err = resolve(&[(key, bad)], &Flags::default()).expect_err("refused");
            assert!(matches!(err, ConfigError::BadNumber(k, _, _) if k == key), "{err}");
        }
        let huge = Flags { box_disk_mib: Some(u64::MAX), ..Default::default() };
        assert!(matches!(resolve(&[], &huge), Err(ConfigError::BadNumber("AIRLOCK_BOX_DISK_MIB", 1, _))));
    }

    #[test]
    fn flags_beat_env_beat_file() {
        let file = FileConfig {
            control_plane: Some("https://file".into()),
            ca_fingerprint: Some(FP.into()),
            state_dir: Some("/file".into()),
            ..Default::default()
        };
        let env: HashMap<String, String> = [("AIRLOCK_CONTROL_PLANE".to_owned(), "https://env".to_owned())].into();
        let flags = Flags { state_dir: Some("/flag".into()), ..Default::default() };
        let cfg = ApplianceConfig::resolve(Some(file), &env, &flags).unwrap();
        assert_eq!(cfg.control_plane, "https://env");
        assert_eq!(cfg.state_dir, PathBuf::from("/flag"));
    }

    #[test]
    fn config_file_refuses_unknown_keys() {
        let err = toml::from_str::<FileConfig>("control_plane = 'https://x'\nca_fingerprnt = 'x'").unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn admin_group_is_a_name_or_a_gid_from_flag_env_or_file() {
        let flags = Flags {
            control_plane: Some("https://x".into()),
            ca_fingerprint: Some(FP.into()),
            state_dir: Some("/s".into()),
            ..Default::default()
        };
        let file = toml::from_str::<FileConfig>("admin_group = 'airlock-admins'").unwrap();
        let cfg = ApplianceConfig::resolve(Some(file), &HashMap::new(), &flags).unwrap();
        assert_eq!(cfg.admin_group, Some(AdminGroup::Name("airlock-admins".into())));
        let env: HashMap<String, String> = [("AIRLOCK_ADMIN_GROUP".to_owned(), "990".to_owned())].into();
        let cfg = ApplianceConfig::resolve(None, &env, &flags).unwrap();
        assert_eq!(cfg.admin_group, Some(AdminGroup::Gid(990)));
        assert_eq!(ApplianceConfig::resolve(None, &HashMap::new(), &flags).unwrap().admin_group, None);
        for bad in ["", "ops admins", "-x", "wheel\n", "adm:x"] {
            let flags = Flags { admin_group: Some(bad.into()), ..flags.clone() };
            let err = ApplianceConfig::resolve(None, &HashMap::new(), &flags).unwrap_err();
            assert!(matches!(err, ConfigError::AdminGroup(_)), "{bad}: {err}");
        }
    }

    #[test]
    fn audit_checkpoints_go_to_syslog_or_an_absolute_file() {
        use crate::audit_log::CheckpointSink;
        let flags = Flags {
            control_plane: Some("https://x".into()),
            ca_fingerprint: Some(FP.into()),
            state_dir: Some("/s".into()),
            ..Default::default()
        };
        assert_eq!(ApplianceConfig::resolve(None, &HashMap::new(), &flags).unwrap().audit_checkpoints, None);
        let file = toml::from_str::<FileConfig>("audit_checkpoints = 'syslog'\naudit_checkpoint_every = 10").unwrap();
        let cfg = ApplianceConfig::resolve(Some(file), &HashMap::new(), &flags).unwrap().audit_checkpoints.unwrap();
        assert_eq!((cfg.sink, cfg.every), (CheckpointSink::Syslog("/dev/log".into()), 10));
        let env: HashMap<String, String> =
            [("AIRLOCK_AUDIT_CHECKPOINTS".to_owned(), "/var/log/airlock/checkpoints.jsonl".to_owned())].into();
        let cfg = ApplianceConfig::resolve(None, &env, &flags).unwrap().audit_checkpoints.unwrap();
        assert_eq!(cfg.sink, CheckpointSink::File("/var/log/airlock/checkpoints.jsonl".into()));
        assert_eq!(cfg.every, DEFAULT_CHECKPOINT_EVERY);
        let flags = Flags { audit_checkpoints: Some("checkpoints.jsonl".into()), ..flags };
        assert!(matches!(ApplianceConfig::resolve(None, &HashMap::new(), &flags), Err(ConfigError::Checkpoints(_))));
    }

    #[test]
    fn releases_dir_and_customer_dependencies_come_from_the_file() {
        let flags = Flags {
            control_plane: Some("https://x".into()),
            ca_fingerprint: Some(FP.into()),
            state_dir: Some("/s".into()),
            ..Default::default()
        };
        let text = "releases_dir = '/srv/releases'\n[dependency.postgres]\nurl = 'postgres://db:5432/shop'\ncredentials = { password = 'file:/etc/shop/db' }\n";
        let cfg = ApplianceConfig::resolve(Some(toml::from_str(text).unwrap()), &HashMap::new(), &flags).unwrap();
        assert_eq!(cfg.releases_dir, Some(PathBuf::from("/srv/releases")));
        let pg = &cfg.dependencies["postgres"];
        assert_eq!(pg.url, "postgres://db:5432/shop");
        assert_eq!(pg.credentials["password"], "file:/etc/shop/db".parse().unwrap());
        let env: HashMap<String, String> = [("AIRLOCK_RELEASES_DIR".to_owned(), "releases".to_owned())].into();
        assert!(matches!(ApplianceConfig::resolve(None, &env, &flags), Err(ConfigError::ReleasesDir(_))));
        let bad = toml::from_str::<FileConfig>("[dependency.postgres]\nurl = 'x'\npassword = 'hunter2'\n");
        assert!(bad.is_err(), "an unknown key of a dependency is refused");
        let bad =
            toml::from_str::<FileConfig>("[dependency.postgres]\nurl = 'x'\ncredentials = { password = 'hunter2' }\n");
        assert!(bad.is_err(), "a credential is a reference, never a value");
        let file = toml::from_str::<FileConfig>("[dependency.Postgres]\nurl = 'x'\n").unwrap();
        assert!(matches!(
            ApplianceConfig::resolve(Some(file), &HashMap::new(), &flags),
            Err(ConfigError::Dependency(..))
        ));
    }

    #[test]
    fn a_join_pins_its_tenant_from_a_flag_the_environment_or_the_file() {
        let flags = Flags {
            control_plane: Some("https://x".into()),
            ca_fingerprint: Some(FP.into()),
            state_dir: Some("/s".into()),
            join_method: Some("aws".into()),
            ..Default::default()
        };
        let tenant = airlock_core::TenantId::from_random([7; 16]);
        let cfg = ApplianceConfig::resolve(None, &HashMap::new(), &flags).unwrap();
        assert!(!cfg.join_target().is_pinned(), "unpinned here; the control plane refuses it with the reason");
        let pinned = Flags { tenant: Some(tenant.to_string()), ..flags.clone() };
        let cfg = ApplianceConfig::resolve(None, &HashMap::new(), &pinned).unwrap();
        assert_eq!(cfg.join_target().tenant, Some(tenant));
        let env = HashMap::from([("AIRLOCK_TENANT".to_owned(), tenant.to_string())]);
        assert_eq!(ApplianceConfig::resolve(None, &env, &flags).unwrap().join_tenant, Some(tenant));
        let file = FileConfig { tenant: Some(tenant.to_string()), ..Default::default() };
        assert_eq!(ApplianceConfig::resolve(Some(file), &HashMap::new(), &flags).unwrap().join_tenant, Some(tenant));
        let bad = Flags { tenant: Some("acme".into()), ..flags };
        assert!(matches!(ApplianceConfig::resolve(None, &HashMap::new(), &bad), Err(ConfigError::Tenant(_))));
    }

    #[test]
    fn an_aws_join_is_chosen_by_join_method_and_never_beside_a_token() {
        let flags = Flags {
            control_plane: Some("https://x".into()),
            ca_fingerprint: Some(FP.into()),
            state_dir: Some("/s".into()),
            join_method: Some("aws".into()),
            aws_sts_endpoint: Some("http://127.0.0.1:5000".into()),
            ..Default::default()
        };
        let cfg = ApplianceConfig::resolve(None, &HashMap::new(), &flags).unwrap();
        let Some(PlatformJoinConfig::Aws(aws)) = cfg.platform_join else { panic!("an AWS join") };
        assert_eq!(aws.sts_endpoint.map(String::from).as_deref(), Some("http://127.0.0.1:5000/"));
        let with_token = Flags { join_token: Some(format!("airlock_jt_{}", "a".repeat(43))), ..flags.clone() };
        assert!(matches!(
            ApplianceConfig::resolve(None, &HashMap::new(), &with_token),
            Err(ConfigError::TwoJoinMethods | ConfigError::Token(_))
        ));
        let azure = Flags { join_method: Some("azure".into()), ..flags.clone() };
        assert!(matches!(ApplianceConfig::resolve(None, &HashMap::new(), &azure), Err(ConfigError::JoinMethod(_))));
        let gcp = Flags { join_method: Some("gcp".into()), ..flags.clone() };
        let cfg = ApplianceConfig::resolve(None, &HashMap::new(), &gcp).unwrap();
        assert!(
            matches!(cfg.platform_join, Some(PlatformJoinConfig::Gcp { metadata_url }) if metadata_url.as_str() == "http://metadata.google.internal/")
        );
        let odd = Flags { gcp_metadata_url: Some("http://127.0.0.1:9/computeMetadata".into()), ..gcp };
        assert!(matches!(ApplianceConfig::resolve(None, &HashMap::new(), &odd), Err(ConfigError::GcpMetadataUrl(_))));
        let k8s = Flags { join_method: Some("k8s".into()), ..flags.clone() };
        let cfg = ApplianceConfig::resolve(None, &HashMap::new(), &k8s).unwrap();
        assert_eq!(
            cfg.platform_join,
            Some(PlatformJoinConfig::K8s {
                token_path: PathBuf::from("/var/run/secrets/tokens/airlock"),
                token_request: None
            })
        );
        // A TokenRequest: the API server from the pod's environment, the service account's own token and CA.
        let requested = Flags { k8s_token_request: true, ..k8s.clone() };
        assert!(matches!(
            ApplianceConfig::resolve(None, &HashMap::new(), &requested),
            Err(ConfigError::K8sNoApiServer)
        ));
        let pod: HashMap<String, String> =
            [("KUBERNETES_SERVICE_HOST", "fd00::1"), ("KUBERNETES_SERVICE_PORT", "6443")]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
        let cfg = ApplianceConfig::resolve(None, &pod, &requested).unwrap();
        assert_eq!(
            cfg.platform_join,
            Some(PlatformJoinConfig::K8s {
                token_path: PathBuf::from(DEFAULT_K8S_API_TOKEN_PATH),
                token_request: Some(K8sTokenRequest {
                    api_url: reqwest::Url::parse("https://[fd00::1]:6443/").unwrap(),
                    ca_path: PathBuf::from(DEFAULT_K8S_CA_PATH),
                }),
            })
        );
        let plain = Flags { k8s_api_url: Some("http://10.0.0.1".into()), ..requested.clone() };
        assert!(matches!(ApplianceConfig::resolve(None, &pod, &plain), Err(ConfigError::K8sApiUrl(_))));
        let relative_ca = Flags { k8s_ca_path: Some("ca.crt".into()), ..requested };
        assert!(matches!(ApplianceConfig::resolve(None, &pod, &relative_ca), Err(ConfigError::K8sCaPath(_))));
        let relative = Flags { k8s_token_path: Some("token".into()), ..k8s };
        assert!(matches!(
            ApplianceConfig::resolve(None, &HashMap::new(), &relative),
            Err(ConfigError::K8sTokenPath(_))
        ));
        let bad = Flags { aws_sts_endpoint: Some("sts.amazonaws.com".into()), ..flags };
        assert!(matches!(ApplianceConfig::resolve(None, &HashMap::new(), &bad), Err(ConfigError::AwsEndpoint(_))));
    }

    #[test]
    fn plain_http_control_plane_is_refused() {
        let flags = Flags {
            control_plane: Some("http://x".into()),
            ca_fingerprint: Some(FP.into()),
            state_dir: Some("/s".into()),
            ..Default::default()
        };
        let err = ApplianceConfig::resolve(None, &HashMap::new(), &flags).unwrap_err();
        assert!(matches!(err, ConfigError::BadUrl(_)));
    }
}
