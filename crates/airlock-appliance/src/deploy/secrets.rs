//! Secret values and dependency bindings: what a service's environment gets besides the
//! release's plain `env`.
//!
//! Values come through [`SecretValues`] (the secrets module implements it for every scheme;
//! [`FileEnvSecrets`] reads `file:` and `env:` only). A value is asked for only for a service
//! that declares it (its `secrets`, and the credentials of the dependencies it is bound to),
//! held in [`Zeroizing`] memory while the service may be restarted, and never logged: errors
//! name the reference, never the value.
//!
//! Every service gets `AIRLOCK_DEPENDENCY_<NAME>_URL` and `AIRLOCK_DEPENDENCY_<NAME>_<ROLE>`
//! (upper-cased, `-` as `_`) for each dependency, from its [`Binding`]: the release's own URL
//! and credentials when bundled, the customer's when they bind their own. The release runs
//! unchanged either way; a service that `bundles` a dependency bound to the customer's own is
//! not started.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;

use airlock_core::release::{ReleaseManifest, SecretRef, Service};
use zeroize::Zeroizing;

/// Why a secret's value could not be had: names the reference, never a value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the value of secret `{reference}` is unavailable: {why}")]
pub(crate) struct SecretUnavailable {
    pub(crate) reference: SecretRef,
    pub(crate) why: String,
}

/// Where a service's secret values come from.
pub(crate) trait SecretValues: Send + Sync {
    /// The value `reference` points at, now.
    fn value<'a>(
        &'a self,
        reference: &'a SecretRef,
    ) -> Pin<Box<dyn Future<Output = Result<Zeroizing<String>, SecretUnavailable>> + Send + 'a>>;
}

/// What one dependency of a release is bound to on this appliance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Binding {
    /// The release's own: its `url` and `credentials`, served by the service that `bundles` it.
    Bundled,
    /// The customer's own service: the bundled one is not started.
    Customer { url: String, credentials: BTreeMap<String, SecretRef> },
}

/// Each dependency's binding; one not named is [`Binding::Bundled`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Bindings(pub(crate) BTreeMap<String, Binding>);

impl Bindings {
    /// The customer's bindings from the appliance configuration (`[dependency.<name>]`).
    pub(crate) fn from_config(config: &BTreeMap<String, crate::config::CustomerDependency>) -> Self {
        Self(
            config
                .iter()
                .map(|(name, d)| {
                    (name.clone(), Binding::Customer { url: d.url.clone(), credentials: d.credentials.clone() })
                })
                .collect(),
        )
    }

    pub(crate) fn get(&self, dependency: &str) -> &Binding {
        self.0.get(dependency).unwrap_or(&Binding::Bundled)
    }

    /// Whether `service` runs: not when it bundles a dependency the customer binds to their own.
    pub(crate) fn runs(&self, service: &Service) -> bool {
        service.bundles.as_deref().is_none_or(|d| matches!(self.get(d), Binding::Bundled))
    }
}

/// An environment variable name's part for a dependency name or role.
fn env_part(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect()
}

/// A service's whole environment (besides `PATH`, `HOME`, `TMPDIR`): its plain `env`, its
/// secrets' values, and every dependency's URL and credentials from `bindings`.
pub(crate) async fn service_env(
    manifest: &ReleaseManifest,
    service: &Service,
    bindings: &Bindings,
    secrets: &dyn SecretValues,
) -> Result<ServiceEnv, SecretUnavailable> {
    process_env(manifest, &service.env, &service.secrets, bindings, secrets).await
}

/// The environment a release's task runs with: its own secrets and the dependencies' bindings.
pub(crate) async fn task_env(
    manifest: &ReleaseManifest,
    task: &airlock_core::release::Task,
    bindings: &Bindings,
    secrets: &dyn SecretValues,
) -> Result<ServiceEnv, SecretUnavailable> {
    process_env(manifest, &BTreeMap::new(), &task.secrets, bindings, secrets).await
}

/// Plain values, then secret values, then every dependency's URL and credentials as bound.
async fn process_env(
    manifest: &ReleaseManifest,
    plain: &BTreeMap<String, String>,
    declared: &BTreeMap<String, SecretRef>,
    bindings: &Bindings,
    secrets: &dyn SecretValues,
) -> Result<ServiceEnv, SecretUnavailable> {
    let mut env: BTreeMap<String, Zeroizing<String>> =
        plain.iter().map(|(k, v)| (k.clone(), Zeroizing::new(v.clone()))).collect();
    let mut secret_names = Vec::new();
    for (name, reference) in declared {
        env.insert(name.clone(), secrets.value(reference).await?);
        secret_names.push(name.clone());
    }
    for dep in &manifest.dependencies {
        let prefix = format!("AIRLOCK_DEPENDENCY_{}", env_part(&dep.name));
        let (url, credentials) = match bindings.get(&dep.name) {
            Binding::Bundled => (dep.url.clone(), &dep.credentials),
            Binding::Customer { url, credentials } => (Some(url.clone()), credentials),
        };
        if let Some(url) = url {
            env.insert(format!("{prefix}_URL"), Zeroizing::new(url));
        }
        for (role, reference) in credentials {
            let name = format!("{prefix}_{}", env_part(role));
            env.insert(name.clone(), secrets.value(reference).await?);
            secret_names.push(name);
        }
    }
    let secret_values = secret_names.iter().filter_map(|n| env.get(n)).map(|v| v.as_str().to_owned()).collect();
    Ok(ServiceEnv { vars: env.into_iter().map(|(k, v)| (k, v.as_str().to_owned())).collect(), secret_values })
}

/// A service's environment, secret values included: wiped when dropped, never printed.
#[derive(Clone, Default)]
pub(crate) struct ServiceEnv {
    /// Every variable, by name.
    pub(crate) vars: Vec<(String, String)>,
    /// The values among them that came from secrets: what a log tail that goes up must not
    /// carry (`telemetry::redact`).
    pub(crate) secret_values: Vec<String>,
}

impl Drop for ServiceEnv {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        for (_, value) in &mut self.vars {
            value.zeroize();
        }
        for value in &mut self.secret_values {
            value.zeroize();
        }
    }
}

impl std::fmt::Debug for ServiceEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.vars.iter().map(|(k, _)| k)).finish()
    }
}
