//! Which secret references the customer lets releases use on this appliance: `[secrets] allow`
//! in the appliance's configuration, a list of reference prefixes, e.g.
//! `allow = ["file:/etc/shop/", "env:SHOP_", "aws-sm:prod/shop/", "aws-ssm:/shop/"]`.
//!
//! A release names its secrets, but the vendor writes the release: without this list a release
//! could name any file the appliance can read (its own keys), any variable of its environment or
//! any secret its cloud role reaches, and have the appliance hand the value to vendor code.
//! So nothing is read, and no existence is reported, for a reference the list does not cover.
//! Invariants:
//! - The default is empty: nothing is allowed.
//! - A `file:` reference must be a plain absolute path (no `.` or `..`), and the file it resolves
//!   to (symlinks followed) must lie under an allowed directory, never under a forbidden one
//!   (the state directory).
//! - An `env:` reference never names `AIRLOCK_*` or `AWS_*`, whatever the list says: those are
//!   the appliance's own settings and credentials.

use std::path::{Component, Path, PathBuf};

use airlock_core::release::SecretRef;

/// One allowed prefix, as the customer wrote it (`scheme:prefix`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretAllow {
    /// Files under this directory.
    Files(PathBuf),
    /// Variables whose names start with this.
    Env(String),
    AwsSecretsManager(String),
    AwsSsm(String),
    Kubernetes(String),
}

impl std::str::FromStr for SecretAllow {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (scheme, prefix) = s
            .split_once(':')
            .ok_or_else(|| format!("`{s}` is not `scheme:prefix` (file:, env:, aws-sm:, aws-ssm:, k8s:)"))?;
        match scheme {
            "file" => {
                let dir = PathBuf::from(prefix);
                if !dir.is_absolute() || !plain(&dir) || dir == Path::new("/") {
                    return Err(format!("`{s}`: a file prefix is an absolute directory other than /, without . or .."));
                }
                Ok(Self::Files(dir))
            }
            "env" if !prefix.is_empty() => Ok(Self::Env(prefix.to_owned())),
            "env" => Err(format!("`{s}`: give a prefix of the variables' names, not the whole environment")),
            // The whole scheme may be given: the cloud role's own permissions then bound it.
            "aws-sm" => Ok(Self::AwsSecretsManager(prefix.to_owned())),
            "aws-ssm" => Ok(Self::AwsSsm(prefix.to_owned())),
            "k8s" => Ok(Self::Kubernetes(prefix.to_owned())),
            other => Err(format!("`{other}:` is not a secret scheme (file:, env:, aws-sm:, aws-ssm:, k8s:)")),
        }
    }
}

impl<'de> serde::Deserialize<'de> for SecretAllow {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// A path of normal components only.
fn plain(path: &Path) -> bool {
    path.components().all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
}

/// The customer's list, and the directories no file reference may reach.
#[derive(Debug, Clone, Default)]
pub(crate) struct Allowed {
    pub(crate) allow: Vec<SecretAllow>,
    pub(crate) forbidden: Vec<PathBuf>,
}

impl Allowed {
    /// Whether a release may use `reference` here.
    pub(crate) fn permits(&self, reference: &SecretRef) -> bool {
        match reference {
            SecretRef::File(path) => self.permits_file(Path::new(path)),
            SecretRef::Env(name) => {
                !name.starts_with("AIRLOCK_")
                    && !name.starts_with("AWS_")
                    && self.allow.iter().any(|a| matches!(a, SecretAllow::Env(p) if name.starts_with(p.as_str())))
            }
            SecretRef::AwsSecretsManager(id) => {
                self.allow.iter().any(|a| matches!(a, SecretAllow::AwsSecretsManager(p) if id.starts_with(p.as_str())))
            }
            SecretRef::AwsSsm(name) => {
                self.allow.iter().any(|a| matches!(a, SecretAllow::AwsSsm(p) if name.starts_with(p.as_str())))
            }
            SecretRef::Kubernetes { .. } => {
                let text = reference.to_string();
                let rest = text.strip_prefix("k8s:").unwrap_or_default();
                self.allow.iter().any(|a| matches!(a, SecretAllow::Kubernetes(p) if rest.starts_with(p.as_str())))
            }
        }
    }

    fn permits_file(&self, path: &Path) -> bool {
        if !path.is_absolute() || !plain(path) {
            return false;
        }
        // Where it really is: a symlink under an allowed directory may point anywhere.
        let canonical = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_owned());
        let real = canonical(path);
        let allowed =
            self.allow.iter().any(|a| matches!(a, SecretAllow::Files(dir) if real.starts_with(canonical(dir))));
        allowed && !self.forbidden.iter().any(|dir| real.starts_with(canonical(dir)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(list: &[&str], forbidden: &[&Path]) -> Allowed {
        Allowed {
            allow: list.iter().map(|s| s.parse().unwrap()).collect(),
            forbidden: forbidden.iter().map(|p| p.to_path_buf()).collect(),
        }
    }

    fn r(s: &str) -> SecretRef {
        s.parse().unwrap()
    }

    #[test]
    fn nothing_is_allowed_by_default() {
        let none = Allowed::default();
        for s in ["file:/etc/shop/db", "env:SHOP_TOKEN", "aws-sm:prod/db", "aws-ssm:/shop/x", "k8s:shop/db#password"] {
            assert!(!none.permits(&r(s)), "{s}");
        }
    }

    #[test]
    fn only_what_the_list_covers_and_never_the_appliances_own() {
        let dir = tempfile::tempdir().unwrap();
        let shop = dir.path().join("shop");
        let state = dir.path().join("state");
        std::fs::create_dir_all(&shop).unwrap();
        std::fs::create_dir_all(&state).unwrap();
        std::fs::write(shop.join("db"), "x").unwrap();
        std::fs::write(state.join("key.pem"), "x").unwrap();
        let file_prefix = format!("file:{}", shop.display());
        let a = allowed(&[&file_prefix, "env:SHOP_", "env:A", "aws-sm:prod/shop/", "aws-ssm:/shop/"], &[&state]);
        assert!(a.permits(&r(&format!("file:{}/db", shop.display()))));
        assert!(
            a.permits(&r("env:SHOP_TOKEN")) && a.permits(&r("aws-sm:prod/shop/db")) && a.permits(&r("aws-ssm:/shop/x"))
        );
        assert!(
            !a.permits(&r("env:OTHER")) && !a.permits(&r("aws-sm:prod/billing/db")) && !a.permits(&r("aws-ssm:/other"))
        );
        // The appliance's own variables, even under an allowed prefix (`A`).
        assert!(!a.permits(&r("env:AIRLOCK_JOIN_TOKEN")) && !a.permits(&r("env:AWS_SECRET_ACCESS_KEY")));
        // Out of the directory by `..` (a release cannot even name it), or by a symlink into
        // the state directory.
        assert!(format!("file:{}/../state/key.pem", shop.display()).parse::<SecretRef>().is_err());
        std::os::unix::fs::symlink(state.join("key.pem"), shop.join("link")).unwrap();
        assert!(!a.permits(&r(&format!("file:{}/link", shop.display()))));
        // A forbidden directory stays forbidden even when the list covers it.
        let broad = allowed(&[&format!("file:{}", dir.path().display())], &[&state]);
        assert!(!broad.permits(&r(&format!("file:{}/key.pem", state.display()))));
        assert!(broad.permits(&r(&format!("file:{}/db", shop.display()))));
    }

    #[test]
    fn a_malformed_entry_is_refused() {
        for bad in ["etc/shop", "file:relative/dir", "file:/", "file:/etc/../root", "env:", "ftp:/x"] {
            assert!(bad.parse::<SecretAllow>().is_err(), "{bad}");
        }
    }
}
