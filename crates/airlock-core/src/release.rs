//! Vendor releases: the manifest a release ships (`airlock.toml`), the statement the vendor
//! signs over it and its artifacts, and the check an appliance makes before installing anything.
//!
//! (Not to be confused with a customer *releasing output*: that is `grant`/`operation`.)
//!
//! A release is a directory: `airlock.toml` ([`ReleaseManifest`]: name, version, services,
//! tasks, required secrets, dependencies, health checks) and artifacts. The vendor signs a
//! [`ReleaseStatement`]: the manifest's exact text and its SHA-256, and every artifact's
//! relative path, SHA-256 and size, in a DSSE envelope of type [`RELEASE_PAYLOAD_TYPE`].
//! [`ReleaseStatement::digest`] (SHA-256 of the canonical JSON) is the release digest a deploy
//! manifest binds. [`verify_release`] is the one way to a [`VerifiedRelease`].
//!
//! Invariants:
//! - Parsing is bounded: the manifest's bytes, the number of services, tasks, dependencies,
//!   secrets, env entries, args and artifacts, and every string's length are capped, checked
//!   before or while parsing; over a limit is [`ReleaseError::Limit`].
//! - Every table refuses unknown keys, so a typo is an error, not an ignored setting.
//! - Paths a release names (working directories, artifacts) are [`RelativePath`]s: relative,
//!   no `..`, `.` or empty component, so nothing a release names leaves its directory.
//! - Secrets are [`SecretRef`]s, never values; a service or task gets only those it declares.
//! - `run_as_root` is recorded as asked (default false); this module does not grant it, the
//!   appliance requires the customer's approval covering it.
//! - A verified statement is canonical (re-encoding it gives the signed bytes), its artifacts are
//!   sorted with no duplicate path, and its manifest's SHA-256 is the one stated.

mod path;
mod secret_ref;
mod statement;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

pub use path::{MAX_PATH_BYTES, PathError, RelativePath};
pub use secret_ref::{MAX_SECRET_REF_BYTES, SecretRef, SecretRefError};
pub use statement::{
    Artifact, MAX_ARTIFACTS, MAX_STATEMENT_BYTES, RELEASE_PAYLOAD_TYPE, ReleaseStatement, VerifiedRelease,
    sign_release, verify_release,
};

use crate::dsse::DsseError;

/// `airlock.toml`'s size cap.
pub const MAX_MANIFEST_BYTES: usize = 256 * 1024;
pub const MAX_SERVICES: usize = 64;
pub const MAX_TASKS: usize = 64;
pub const MAX_DEPENDENCIES: usize = 32;
/// Secrets one service, task or dependency may name.
pub const MAX_SECRETS: usize = 64;
/// Environment entries of one service.
pub const MAX_ENV: usize = 128;
/// Arguments of one command.
pub const MAX_ARGS: usize = 128;
/// Health checks of one service.
pub const MAX_HEALTH_CHECKS: usize = 8;
/// A command, an argument, an env value, a URL or an HTTP path.
pub const MAX_STRING_BYTES: usize = 4096;
/// A release, service, task or dependency name: a slug.
pub const MAX_NAME_BYTES: usize = 63;
pub const MAX_VERSION_BYTES: usize = 128;
/// The shortest restart backoff a release may ask for: a service that crashes at once, restarted
/// sooner, costs the appliance a good part of a core in restarts alone.
pub const MIN_BACKOFF_MS: u64 = 100;
/// The longest restart backoff and stop timeout a release may ask for.
pub const MAX_BACKOFF_MS: u64 = 10 * 60 * 1000;
pub const MAX_STOP_TIMEOUT_SECS: u64 = 600;
pub const MAX_HEALTH_INTERVAL_SECS: u64 = 3600;
pub const MAX_HEALTH_THRESHOLD: u32 = 100;

/// Why a release, its manifest or its envelope was refused. Code decides on the variant; the
/// vendor reads the sentence.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReleaseError {
    #[error("over a limit: {0}")]
    Limit(ReleaseLimit),
    /// Not TOML, a wrong type, or an unknown or missing key (toml's message says where).
    #[error("airlock.toml: {0}")]
    Syntax(String),
    #[error("airlock.toml: `{at}`: {problem}")]
    Invalid { at: String, problem: Problem },
    #[error("the release envelope: {0}")]
    Signature(#[from] DsseError),
    #[error("the release statement is malformed: {0}")]
    Malformed(String),
    #[error("the release statement is not in canonical form; sign what `ReleaseStatement::to_canonical_json` makes")]
    NotCanonical,
    #[error("the statement says the manifest's SHA-256 is {stated}, but the manifest it carries hashes to {actual}")]
    ManifestDigestMismatch { stated: String, actual: String },
}

/// Which limit a release exceeded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReleaseLimit {
    #[error("airlock.toml is {bytes} bytes; at most {MAX_MANIFEST_BYTES} are accepted")]
    ManifestBytes { bytes: usize },
    #[error("the release statement is {bytes} bytes; at most {MAX_STATEMENT_BYTES} are accepted")]
    StatementBytes { bytes: usize },
    #[error("`{at}` has {count} entries; at most {max} are accepted")]
    Count { at: String, count: usize, max: usize },
    #[error("`{at}` is {bytes} bytes; at most {max} are accepted")]
    Length { at: String, bytes: usize, max: usize },
}

/// What is wrong with one value of a manifest or statement.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("must be a slug: lowercase letters, digits and `-`, starting with a letter or digit")]
    NotSlug,
    #[error("must be a semantic version such as 1.4.2 or 2.0.0-rc.1")]
    NotVersion,
    #[error("must not be empty")]
    Empty,
    #[error("must not contain control characters")]
    ControlCharacter,
    #[error("must be a path relative to the release directory, not an absolute one")]
    AbsolutePath,
    #[error("must not contain `..`: it would leave the release directory")]
    ParentComponent,
    #[error("must not contain `.`, empty components, backslashes or a trailing `/`")]
    UnnormalizedPath,
    #[error("`{0}` appears twice")]
    Duplicate(String),
    #[error("`{0}` is not an environment variable name")]
    NotEnvName(String),
    #[error("`{0}` is set both as a plain value and from a secret")]
    EnvAndSecret(String),
    #[error("bad secret reference: {0}")]
    SecretRef(SecretRefError),
    #[error("must be between {min} and {max}, is {found}")]
    OutOfRange { min: u64, max: u64, found: u64 },
    #[error("must be at most `{other}` ({max})")]
    Exceeds { other: &'static str, max: u64 },
    #[error("an HTTP health check path must start with `/` and contain no spaces")]
    BadHttpPath,
    #[error("must be lowercase hex SHA-256 (64 characters)")]
    NotSha256,
    #[error("`{0}` is not a dependency this release declares")]
    UnknownDependency(String),
}

/// The parsed and validated `airlock.toml`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseManifest {
    pub name: String,
    pub version: String,
    #[serde(default, rename = "service")]
    pub services: Vec<Service>,
    #[serde(default, rename = "task")]
    pub tasks: Vec<Task>,
    #[serde(default, rename = "dependency")]
    pub dependencies: Vec<Dependency>,
}

/// A long-running process the appliance supervises.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub name: String,
    /// A program on the box's `PATH`, an absolute path, or a path inside the release.
    pub command: String,
    #[serde(default)]
    pub args: Vec<String>,
    /// Plain environment values (no secrets: those go in `secrets`).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Environment variables set from secrets at the service's start, by reference.
    #[serde(default)]
    pub secrets: BTreeMap<String, SecretRef>,
    /// The working directory inside the release; its root when absent.
    #[serde(default)]
    pub workdir: Option<RelativePath>,
    #[serde(default)]
    pub restart: Restart,
    /// SIGTERM, then SIGKILL after this many seconds.
    #[serde(default = "default_stop_timeout")]
    pub stop_timeout_secs: u64,
    /// Asks to run as root; recorded here, approved (or not) by the customer.
    #[serde(default)]
    pub run_as_root: bool,
    #[serde(default)]
    pub health: Vec<HealthCheck>,
    /// The dependency this service provides (e.g. `postgres`) when the customer binds that
    /// dependency to the bundled one; it is not started when they bind their own instead.
    #[serde(default)]
    pub bundles: Option<String>,
}

fn default_stop_timeout() -> u64 {
    10
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    Always,
    OnFailure,
    Never,
}

/// When a service is restarted, and how long to wait: doubling from `initial_backoff_ms` up to
/// `max_backoff_ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Restart {
    pub policy: RestartPolicy,
    #[serde(default = "default_initial_backoff")]
    pub initial_backoff_ms: u64,
    #[serde(default = "default_max_backoff")]
    pub max_backoff_ms: u64,
}

fn default_initial_backoff() -> u64 {
    500
}
fn default_max_backoff() -> u64 {
    60_000
}

impl Default for Restart {
    fn default() -> Self {
        Self {
            policy: RestartPolicy::OnFailure,
            initial_backoff_ms: default_initial_backoff(),
            max_backoff_ms: default_max_backoff(),
        }
    }
}

/// One health check and its thresholds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    pub probe: HealthProbe,
    #[serde(default = "default_interval")]
    pub interval_secs: u64,
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// Consecutive successes before the service counts as healthy.
    #[serde(default = "default_one")]
    pub healthy_threshold: u32,
    /// Consecutive failures before it counts as unhealthy.
    #[serde(default = "default_three")]
    pub unhealthy_threshold: u32,
}

fn default_interval() -> u64 {
    10
}
fn default_timeout() -> u64 {
    5
}
fn default_one() -> u32 {
    1
}
fn default_three() -> u32 {
    3
}

/// What a health check does; in TOML, `probe = { http = { path = "/healthz", port = 8080 } }`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HealthProbe {
    Http(HttpProbe),
    Tcp(TcpProbe),
    Exec(ExecProbe),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpProbe {
    pub path: String,
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpProbe {
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecProbe {
    pub command: String,
    #[serde(default)]
    pub args: Vec<String>,
}

/// A named one-off operation of the release (e.g. `migrate`), run in the Operate phase.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Task {
    pub name: String,
    pub command: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub workdir: Option<RelativePath>,
    #[serde(default)]
    pub secrets: BTreeMap<String, SecretRef>,
}

/// A service the release needs (e.g. `postgres`), which the customer binds to their own or to
/// the bundled one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dependency {
    pub name: String,
    #[serde(default)]
    pub url: Option<String>,
    /// Credentials by role (e.g. `password`), by reference.
    #[serde(default)]
    pub credentials: BTreeMap<String, SecretRef>,
}

impl ReleaseManifest {
    /// Parses and validates `airlock.toml`; the size is checked before parsing.
    pub fn parse(text: &str) -> Result<Self, ReleaseError> {
        if text.len() > MAX_MANIFEST_BYTES {
            return Err(ReleaseError::Limit(ReleaseLimit::ManifestBytes { bytes: text.len() }));
        }
        let manifest: Self = toml::from_str(text).map_err(|e| ReleaseError::Syntax(e.to_string()))?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// Every secret reference the release needs, deduplicated: what the appliance checks exists.
    pub fn required_secrets(&self) -> BTreeSet<&SecretRef> {
        let services = self.services.iter().flat_map(|s| s.secrets.values());
        let tasks = self.tasks.iter().flat_map(|t| t.secrets.values());
        let deps = self.dependencies.iter().flat_map(|d| d.credentials.values());
        services.chain(tasks).chain(deps).collect()
    }

    /// The services that ask to run as root: the customer's approval must cover each.
    pub fn root_services(&self) -> impl Iterator<Item = &Service> {
        self.services.iter().filter(|s| s.run_as_root)
    }

    fn validate(&self) -> Result<(), ReleaseError> {
        slug("name", &self.name)?;
        if self.version.len() > MAX_VERSION_BYTES {
            return Err(too_long("version", self.version.len(), MAX_VERSION_BYTES));
        }
        if !is_version(&self.version) {
            return Err(invalid("version", Problem::NotVersion));
        }
        count("service", self.services.len(), MAX_SERVICES)?;
        count("task", self.tasks.len(), MAX_TASKS)?;
        count("dependency", self.dependencies.len(), MAX_DEPENDENCIES)?;
        unique("service", self.services.iter().map(|s| &s.name))?;
        unique("task", self.tasks.iter().map(|t| &t.name))?;
        unique("dependency", self.dependencies.iter().map(|d| &d.name))?;
        for s in &self.services {
            s.validate(&format!("service[{}]", s.name))?;
            if let Some(dep) = &s.bundles
                && !self.dependencies.iter().any(|d| &d.name == dep)
            {
                return Err(invalid(
                    &format!("service[{}].bundles", s.name),
                    Problem::UnknownDependency(dep.chars().take(64).collect()),
                ));
            }
        }
        for t in &self.tasks {
            let at = format!("task[{}]", t.name);
            slug(&format!("{at}.name"), &t.name)?;
            command(&at, &t.command, &t.args)?;
            secrets(&format!("{at}.secrets"), &t.secrets)?;
        }
        for d in &self.dependencies {
            let at = format!("dependency[{}]", d.name);
            slug(&format!("{at}.name"), &d.name)?;
            if let Some(url) = &d.url {
                text(&format!("{at}.url"), url)?;
            }
            count(&format!("{at}.credentials"), d.credentials.len(), MAX_SECRETS)?;
            for key in d.credentials.keys() {
                text(&format!("{at}.credentials"), key)?;
            }
        }
        Ok(())
    }
}

impl Service {
    fn validate(&self, at: &str) -> Result<(), ReleaseError> {
        slug(&format!("{at}.name"), &self.name)?;
        command(at, &self.command, &self.args)?;
        count(&format!("{at}.env"), self.env.len(), MAX_ENV)?;
        for (name, value) in &self.env {
            let at = format!("{at}.env.{name}");
            if !secret_ref::is_env_name(name) {
                return Err(invalid(&at, Problem::NotEnvName(name.clone())));
            }
            if self.secrets.contains_key(name) {
                return Err(invalid(&at, Problem::EnvAndSecret(name.clone())));
            }
            text_may_be_empty(&at, value)?;
        }
        secrets(&format!("{at}.secrets"), &self.secrets)?;
        let r = &self.restart;
        range(&format!("{at}.restart.initial_backoff_ms"), r.initial_backoff_ms, MIN_BACKOFF_MS, MAX_BACKOFF_MS)?;
        range(&format!("{at}.restart.max_backoff_ms"), r.max_backoff_ms, MIN_BACKOFF_MS, MAX_BACKOFF_MS)?;
        if r.initial_backoff_ms > r.max_backoff_ms {
            return Err(invalid(
                &format!("{at}.restart.initial_backoff_ms"),
                Problem::Exceeds { other: "max_backoff_ms", max: r.max_backoff_ms },
            ));
        }
        range(&format!("{at}.stop_timeout_secs"), self.stop_timeout_secs, 1, MAX_STOP_TIMEOUT_SECS)?;
        count(&format!("{at}.health"), self.health.len(), MAX_HEALTH_CHECKS)?;
        for (i, h) in self.health.iter().enumerate() {
            let at = format!("{at}.health[{i}]");
            match &h.probe {
                HealthProbe::Http(p) => {
                    text(&format!("{at}.probe.http.path"), &p.path)?;
                    if !p.path.starts_with('/') || p.path.contains(char::is_whitespace) {
                        return Err(invalid(&format!("{at}.probe.http.path"), Problem::BadHttpPath));
                    }
                    range(&format!("{at}.probe.http.port"), p.port.into(), 1, u16::MAX.into())?;
                }
                HealthProbe::Tcp(p) => range(&format!("{at}.probe.tcp.port"), p.port.into(), 1, u16::MAX.into())?,
                HealthProbe::Exec(p) => command(&format!("{at}.probe.exec"), &p.command, &p.args)?,
            }
            range(&format!("{at}.interval_secs"), h.interval_secs, 1, MAX_HEALTH_INTERVAL_SECS)?;
            range(&format!("{at}.timeout_secs"), h.timeout_secs, 1, MAX_HEALTH_INTERVAL_SECS)?;
            if h.timeout_secs > h.interval_secs {
                return Err(invalid(
                    &format!("{at}.timeout_secs"),
                    Problem::Exceeds { other: "interval_secs", max: h.interval_secs },
                ));
            }
            let t = u64::from(MAX_HEALTH_THRESHOLD);
            range(&format!("{at}.healthy_threshold"), h.healthy_threshold.into(), 1, t)?;
            range(&format!("{at}.unhealthy_threshold"), h.unhealthy_threshold.into(), 1, t)?;
        }
        Ok(())
    }
}

fn invalid(at: &str, problem: Problem) -> ReleaseError {
    ReleaseError::Invalid { at: at.to_owned(), problem }
}

fn too_long(at: &str, bytes: usize, max: usize) -> ReleaseError {
    ReleaseError::Limit(ReleaseLimit::Length { at: at.to_owned(), bytes, max })
}

fn count(at: &str, count: usize, max: usize) -> Result<(), ReleaseError> {
    if count > max {
        return Err(ReleaseError::Limit(ReleaseLimit::Count { at: at.to_owned(), count, max }));
    }
    Ok(())
}

fn range(at: &str, found: u64, min: u64, max: u64) -> Result<(), ReleaseError> {
    if found < min || found > max {
        return Err(invalid(at, Problem::OutOfRange { min, max, found }));
    }
    Ok(())
}

fn text_may_be_empty(at: &str, s: &str) -> Result<(), ReleaseError> {
    if s.len() > MAX_STRING_BYTES {
        return Err(too_long(at, s.len(), MAX_STRING_BYTES));
    }
    if s.chars().any(char::is_control) {
        return Err(invalid(at, Problem::ControlCharacter));
    }
    Ok(())
}

fn text(at: &str, s: &str) -> Result<(), ReleaseError> {
    text_may_be_empty(at, s)?;
    if s.is_empty() {
        return Err(invalid(at, Problem::Empty));
    }
    Ok(())
}

fn slug(at: &str, s: &str) -> Result<(), ReleaseError> {
    if s.len() > MAX_NAME_BYTES {
        return Err(too_long(at, s.len(), MAX_NAME_BYTES));
    }
    let ok = s.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !ok {
        return Err(invalid(at, Problem::NotSlug));
    }
    Ok(())
}

/// A command and its arguments: bounded, no control characters, and a command with a `..`
/// component is refused (it would reach outside the release).
fn command(at: &str, command: &str, args: &[String]) -> Result<(), ReleaseError> {
    let at_command = format!("{at}.command");
    text(&at_command, command)?;
    if command.split('/').any(|c| c == "..") {
        return Err(invalid(&at_command, Problem::ParentComponent));
    }
    let at_args = format!("{at}.args");
    count(&at_args, args.len(), MAX_ARGS)?;
    for arg in args {
        text_may_be_empty(&at_args, arg)?;
    }
    Ok(())
}

fn secrets(at: &str, secrets: &BTreeMap<String, SecretRef>) -> Result<(), ReleaseError> {
    count(at, secrets.len(), MAX_SECRETS)?;
    for name in secrets.keys() {
        if !secret_ref::is_env_name(name) {
            return Err(invalid(
                &format!("{at}.{}", name.chars().take(64).collect::<String>()),
                Problem::NotEnvName(name.clone()),
            ));
        }
    }
    Ok(())
}

fn unique<'a>(at: &str, names: impl Iterator<Item = &'a String>) -> Result<(), ReleaseError> {
    let mut seen = BTreeSet::new();
    for name in names {
        if !seen.insert(name) {
            return Err(invalid(at, Problem::Duplicate(name.clone())));
        }
    }
    Ok(())
}

/// A strict semantic version 2.0.0: `MAJOR.MINOR.PATCH`, numbers without leading zeros, an
/// optional `-pre.release` and `+build`.
fn is_version(s: &str) -> bool {
    let (rest, build) = match s.split_once('+') {
        Some((r, b)) => (r, Some(b)),
        None => (s, None),
    };
    let (core, pre) = match rest.split_once('-') {
        Some((c, p)) => (c, Some(p)),
        None => (rest, None),
    };
    let numeric = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && (p == "0" || !p.starts_with('0'));
    let ident = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    let parts: Vec<&str> = core.split('.').collect();
    parts.len() == 3
        && parts.iter().all(|p| numeric(p) && p.len() <= 20)
        && pre.is_none_or(|p| p.split('.').all(|i| ident(i) && (!i.bytes().all(|b| b.is_ascii_digit()) || numeric(i))))
        && build.is_none_or(|b| b.split('.').all(ident))
}

impl fmt::Display for RestartPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Always => "always",
            Self::OnFailure => "on-failure",
            Self::Never => "never",
        })
    }
}
