//! Secrets a release requires: whether each exists (for the control plane), and its value (for
//! the one service that declares it, at its start).
//!
//! Invariants:
//! - an existence check reads metadata only: `stat` and an open for reading (never a read) for
//!   `file:`, a lookup for `env:`, `DescribeSecret` and `DescribeParameters` for AWS; never a call
//!   whose answer holds a value (`GetSecretValue`, `GetParameter` are made by `value` alone);
//! - a [`SecretExistence`] carries the reference, a state, a time and a typed reason: never a
//!   value, its length or a hash of it;
//! - values live in [`Zeroizing`] strings, are never cached, logged, nor put in an error; the
//!   `Debug` of anything holding one prints `<redacted>`; the body of an AWS answer to a value
//!   call goes nowhere but the parser (not into errors or logs, even when it is an error);
//! - every network call is bounded in time and in the size of what it reads, and any failure is
//!   a typed [`SecretReason`], so the deploy engine decides on codes, not on text.
//!
//! Existence results (present and missing only) are cached for a few seconds, so a deploy that
//! polls many references does not hammer AWS; `unknown` is never cached, so a transient failure
//! is retried on the next check.

// The deploy engine and the status sender call this; until the integrator wires them in, only
// the tests do.

mod allow;
pub(crate) mod aws;
mod local;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use airlock_core::Timestamp;
use airlock_core::release::SecretRef;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::config::EnvSource;

pub use allow::SecretAllow;
pub use aws::{AwsEndpoint, AwsRegion};

/// `[secrets]` in the appliance's TOML configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretsConfig {
    /// The secret references releases may use here, by prefix (`allow`); none by default.
    #[serde(default)]
    pub allow: Vec<SecretAllow>,
    #[serde(default)]
    pub aws: AwsSecretsConfig,
}

/// `[secrets.aws]`: where the appliance asks AWS; every field is optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsSecretsConfig {
    /// The region; by default the standard chain's (`AWS_REGION`, the profile, the instance).
    pub region: Option<AwsRegion>,
    /// Secrets Manager's endpoint; by default `https://secretsmanager.REGION.amazonaws.com`.
    pub secretsmanager_endpoint: Option<AwsEndpoint>,
    /// SSM's endpoint; by default `https://ssm.REGION.amazonaws.com`.
    pub ssm_endpoint: Option<AwsEndpoint>,
    /// How long one AWS call may take, connection included (default 5000).
    pub timeout_ms: Option<u64>,
}

/// Whether a secret exists, as the control plane may learn it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ExistenceState {
    Present,
    Missing,
    /// The appliance could not tell; `reason` says why.
    Unknown,
}

/// Why a secret is missing or unknown, or why its value could not be had: a code, for machines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
pub(crate) enum SecretReason {
    #[error("it does not exist")]
    NotFound,
    #[error("it is scheduled for deletion")]
    ScheduledForDeletion,
    #[error("it is not a regular file")]
    NotARegularFile,
    #[error("the appliance's user may not read it")]
    NotReadable,
    #[error("it needs the Kubernetes executor")]
    NeedsKubernetesExecutor,
    #[error("no AWS region is configured or found by the standard chain")]
    NoRegion,
    #[error("no AWS credentials were found by the standard chain")]
    NoCredentials,
    #[error("AWS refused the appliance's credentials or denied the call")]
    AccessDenied,
    #[error("the AWS request could not be signed")]
    Signing,
    #[error("AWS was not reachable")]
    Unreachable,
    #[error("AWS did not answer in time")]
    Timeout,
    #[error("AWS answered with an error")]
    ServiceError,
    #[error("the answer could not be understood")]
    BadResponse,
    #[error("the value is larger than the appliance accepts")]
    TooLarge,
    #[error("the value is not UTF-8 text")]
    NotUtf8,
    #[error("reading it failed")]
    Io,
    #[error("the appliance's [secrets] allow list does not cover it")]
    NotAllowed,
}

impl SecretReason {
    /// What a failure means for existence: the secret is missing, or we cannot tell.
    fn state(self) -> ExistenceState {
        match self {
            Self::NotFound | Self::ScheduledForDeletion | Self::NotARegularFile | Self::NotReadable => {
                ExistenceState::Missing
            }
            _ => ExistenceState::Unknown,
        }
    }
}

/// What the control plane learns of one secret: metadata only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SecretExistence {
    /// The reference, in its text form.
    pub reference: SecretRef,
    pub state: ExistenceState,
    /// When the secret last changed, where the store says (file mtime, AWS dates); never for `env:`.
    pub last_changed: Option<Timestamp>,
    /// Set when `state` is not `present`.
    pub reason: Option<SecretReason>,
}

impl SecretExistence {
    fn present(reference: &SecretRef, last_changed: Option<Timestamp>) -> Self {
        Self { reference: reference.clone(), state: ExistenceState::Present, last_changed, reason: None }
    }

    fn failed(reference: &SecretRef, reason: SecretReason) -> Self {
        Self { reference: reference.clone(), state: reason.state(), last_changed: None, reason: Some(reason) }
    }
}

/// Why a value could not be had. It names the reference, never the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("secret {reference}: {reason}")]
pub(crate) struct SecretError {
    pub reference: SecretRef,
    pub reason: SecretReason,
}

/// A secret's value: its `Debug` is `Zeroizing { .. }`, never the text; memory is wiped on drop.
pub(crate) type SecretValue = Zeroizing<String>;

/// How long present and missing results are reused.
pub(crate) const DEFAULT_EXISTENCE_TTL: Duration = Duration::from_secs(5);

/// Answers existence and value questions for every kind of [`SecretRef`].
pub(crate) struct SecretResolver {
    allowed: allow::Allowed,
    env: Arc<dyn EnvSource + Send + Sync>,
    aws: aws::Aws,
    ttl: Duration,
    cache: Mutex<HashMap<SecretRef, (Instant, SecretExistence)>>,
}

impl std::fmt::Debug for SecretResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretResolver").field("aws", &self.aws).field("ttl", &self.ttl).finish_non_exhaustive()
    }
}

impl SecretResolver {
    /// A resolver with AWS credentials from the standard chain (environment, profile, instance
    /// role), loaded at the first AWS call.
    pub(crate) fn new(config: &SecretsConfig, env: Arc<dyn EnvSource + Send + Sync>) -> Self {
        Self {
            allowed: allow::Allowed { allow: config.allow.clone(), forbidden: Vec::new() },
            env,
            aws: aws::Aws::new(&config.aws, None),
            ttl: DEFAULT_EXISTENCE_TTL,
            cache: Mutex::default(),
        }
    }

    /// No `file:` reference may reach `dir` (the state directory), whatever the list allows.
    pub(crate) fn forbid(mut self, dir: &std::path::Path) -> Self {
        self.allowed.forbidden.push(dir.to_owned());
        self
    }

    /// Whether the customer lets releases use `reference` on this appliance.
    pub(crate) fn permits(&self, reference: &SecretRef) -> bool {
        self.allowed.permits(reference)
    }

    /// A resolver with the given AWS credentials instead of the standard chain's.
    #[cfg(test)]
    pub(crate) fn with_credentials(
        config: &SecretsConfig,
        env: Arc<dyn EnvSource + Send + Sync>,
        credentials: aws_credential_types::Credentials,
    ) -> Self {
        Self { aws: aws::Aws::new(&config.aws, Some(credentials)), ..Self::new(config, env) }
    }

    /// How long present and missing results are reused; zero: never.
    pub(crate) fn existence_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Whether `reference` exists, from metadata only.
    pub(crate) async fn existence(&self, reference: &SecretRef) -> SecretExistence {
        if !self.permits(reference) {
            // Not even its existence: the reference is not the release's to ask about.
            return SecretExistence::failed(reference, SecretReason::NotAllowed);
        }
        if let Some(hit) = self.cached(reference) {
            return hit;
        }
        let result = match reference {
            SecretRef::File(path) => local::file_existence(path).await,
            SecretRef::Env(name) => local::env_existence(self.env.as_ref(), name),
            SecretRef::AwsSecretsManager(id) => self.aws.secret_existence(id).await,
            SecretRef::AwsSsm(name) => self.aws.parameter_existence(name).await,
            SecretRef::Kubernetes { .. } => Err(SecretReason::NeedsKubernetesExecutor),
        };
        let existence = match result {
            Ok(last_changed) => SecretExistence::present(reference, last_changed),
            Err(reason) => SecretExistence::failed(reference, reason),
        };
        if existence.state != ExistenceState::Unknown && !self.ttl.is_zero() {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            // Bounded by the references releases declare; dropping stale entries keeps it so.
            cache.retain(|_, (at, _)| at.elapsed() < self.ttl);
            cache.insert(reference.clone(), (Instant::now(), existence.clone()));
        }
        tracing::debug!(reference = %reference, state = ?existence.state, reason = ?existence.reason, "secret existence");
        existence
    }

    /// The value of `reference`, for the environment of the service that declares it. Never
    /// cached: each call asks the store.
    pub(crate) async fn value(&self, reference: &SecretRef) -> Result<SecretValue, SecretError> {
        if !self.permits(reference) {
            return Err(SecretError { reference: reference.clone(), reason: SecretReason::NotAllowed });
        }
        let result = match reference {
            SecretRef::File(path) => local::file_value(path).await,
            SecretRef::Env(name) => local::env_value(self.env.as_ref(), name),
            SecretRef::AwsSecretsManager(id) => self.aws.secret_value(id).await,
            SecretRef::AwsSsm(name) => self.aws.parameter_value(name).await,
            SecretRef::Kubernetes { .. } => Err(SecretReason::NeedsKubernetesExecutor),
        };
        result.map_err(|reason| {
            tracing::warn!(reference = %reference, %reason, "cannot get a secret's value");
            SecretError { reference: reference.clone(), reason }
        })
    }

    fn cached(&self, reference: &SecretRef) -> Option<SecretExistence> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.get(reference).filter(|(at, _)| at.elapsed() < self.ttl).map(|(_, e)| e.clone())
    }
}

use std::future::Future;

/// The deploy engine takes a service's secret values from the resolver, at its start.
impl crate::deploy::SecretValues for SecretResolver {
    fn value<'a>(
        &'a self,
        reference: &'a SecretRef,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<SecretValue, crate::deploy::SecretUnavailable>> + Send + 'a>>
    {
        Box::pin(async move {
            SecretResolver::value(self, reference)
                .await
                .map_err(|e| crate::deploy::SecretUnavailable { reference: e.reference, why: e.reason.to_string() })
        })
    }
}
