//! [`SecretRef`]: where a secret lives, never its value.
//!
//! The text form is the wire form (`file:/abs/path`, `env:NAME`, `aws-sm:NAME_OR_ARN`,
//! `aws-ssm:/param/name`, `k8s:namespace/name#key`); `FromStr` and `Display` round-trip, and
//! serde uses the same string. Every form is bounded and free of control characters.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The longest reference accepted, prefix included (an AWS ARN fits with room to spare).
pub const MAX_SECRET_REF_BYTES: usize = 2048;

/// A reference to a secret the appliance can check for existence and inject at a service's start.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SecretRef {
    /// A file on the appliance's host, by absolute path.
    File(String),
    /// A variable in the appliance's own environment.
    Env(String),
    /// An AWS Secrets Manager secret, by name or ARN.
    AwsSecretsManager(String),
    /// An AWS SSM parameter, by its `/`-rooted name.
    AwsSsm(String),
    /// A key of a Kubernetes secret.
    Kubernetes { namespace: String, name: String, key: String },
}

/// Why a secret reference was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretRefError {
    #[error("the reference is {bytes} bytes; at most {MAX_SECRET_REF_BYTES} are accepted")]
    TooLong { bytes: usize },
    #[error("the reference contains a control character")]
    ControlCharacter,
    #[error("unknown scheme `{0}`; use file:, env:, aws-sm:, aws-ssm: or k8s:")]
    UnknownScheme(String),
    #[error("`file:` needs an absolute path without `.`, `..` or empty components, e.g. file:/run/secrets/db")]
    BadFilePath,
    #[error("`env:` needs a variable name (letters, digits, `_`, not starting with a digit)")]
    BadEnvName,
    #[error("`aws-sm:` needs a secret name or a Secrets Manager ARN (letters, digits and /_+=.@-)")]
    BadAwsSecret,
    #[error("`aws-ssm:` needs a parameter name starting with `/` (letters, digits and _.-/)")]
    BadAwsParameter,
    #[error("`k8s:` needs namespace/name#key with a DNS-label namespace, a DNS-subdomain name and a key")]
    BadKubernetes,
}

impl SecretRef {
    /// The scheme, as written before the colon.
    pub fn scheme(&self) -> &'static str {
        match self {
            Self::File(_) => "file",
            Self::Env(_) => "env",
            Self::AwsSecretsManager(_) => "aws-sm",
            Self::AwsSsm(_) => "aws-ssm",
            Self::Kubernetes { .. } => "k8s",
        }
    }
}

/// A POSIX-style environment variable name; also used for the names a release gives variables.
pub(crate) fn is_env_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && s.len() <= 256
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

fn is_k8s_key(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
}

fn is_aws_secret(s: &str) -> bool {
    let chars_ok = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_alphanumeric() || b"/_+=.@-".contains(&b));
    match s.strip_prefix("arn:") {
        // arn:PARTITION:secretsmanager:REGION:ACCOUNT:secret:NAME
        Some(rest) => {
            let parts: Vec<&str> = rest.splitn(6, ':').collect();
            parts.len() == 6
                && parts[0].starts_with("aws")
                && parts[1] == "secretsmanager"
                && parts[2..5]
                    .iter()
                    .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
                && parts[4] == "secret"
                && chars_ok(parts[5])
        }
        None => s.len() <= 512 && chars_ok(s),
    }
}

fn is_ssm_parameter(s: &str) -> bool {
    s.starts_with('/')
        && s.len() > 1
        && s.len() <= 2048
        && !s.contains("//")
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-/".contains(&b))
}

fn is_absolute_clean_path(s: &str) -> bool {
    match s.strip_prefix('/') {
        Some(rest) => !rest.is_empty() && rest.split('/').all(|c| !c.is_empty() && c != "." && c != ".."),
        None => false,
    }
}

impl FromStr for SecretRef {
    type Err = SecretRefError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > MAX_SECRET_REF_BYTES {
            return Err(SecretRefError::TooLong { bytes: s.len() });
        }
        if s.chars().any(char::is_control) {
            return Err(SecretRefError::ControlCharacter);
        }
        let Some((scheme, rest)) = s.split_once(':') else {
            return Err(SecretRefError::UnknownScheme(s.chars().take(16).collect()));
        };
        match scheme {
            "file" if is_absolute_clean_path(rest) => Ok(Self::File(rest.to_owned())),
            "file" => Err(SecretRefError::BadFilePath),
            "env" if is_env_name(rest) => Ok(Self::Env(rest.to_owned())),
            "env" => Err(SecretRefError::BadEnvName),
            "aws-sm" if is_aws_secret(rest) => Ok(Self::AwsSecretsManager(rest.to_owned())),
            "aws-sm" => Err(SecretRefError::BadAwsSecret),
            "aws-ssm" if is_ssm_parameter(rest) => Ok(Self::AwsSsm(rest.to_owned())),
            "aws-ssm" => Err(SecretRefError::BadAwsParameter),
            "k8s" => {
                let (path, key) = rest.split_once('#').ok_or(SecretRefError::BadKubernetes)?;
                let (namespace, name) = path.split_once('/').ok_or(SecretRefError::BadKubernetes)?;
                if is_dns_label(namespace) && is_dns_subdomain(name) && is_k8s_key(key) {
                    Ok(Self::Kubernetes { namespace: namespace.to_owned(), name: name.to_owned(), key: key.to_owned() })
                } else {
                    Err(SecretRefError::BadKubernetes)
                }
            }
            other => Err(SecretRefError::UnknownScheme(other.chars().take(16).collect())),
        }
    }
}

impl fmt::Display for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(p) => write!(f, "file:{p}"),
            Self::Env(n) => write!(f, "env:{n}"),
            Self::AwsSecretsManager(n) => write!(f, "aws-sm:{n}"),
            Self::AwsSsm(n) => write!(f, "aws-ssm:{n}"),
            Self::Kubernetes { namespace, name, key } => write!(f, "k8s:{namespace}/{name}#{key}"),
        }
    }
}

impl Serialize for SecretRef {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SecretRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_form_round_trips() {
        for text in [
            "file:/run/secrets/db",
            "env:DATABASE_PASSWORD",
            "aws-sm:prod/shop/db",
            "aws-sm:arn:aws:secretsmanager:eu-west-1:123456789012:secret:prod/db-AbCdEf",
            "aws-ssm:/shop/prod/api-key",
            "k8s:shop/db-credentials#password",
        ] {
            let parsed: SecretRef = text.parse().unwrap();
            assert_eq!(parsed.to_string(), text);
            let json = serde_json::to_string(&parsed).unwrap();
            assert_eq!(json, format!("\"{text}\""));
            assert_eq!(serde_json::from_str::<SecretRef>(&json).unwrap(), parsed);
        }
        assert_eq!(
            "k8s:ns/n#k".parse::<SecretRef>().unwrap(),
            SecretRef::Kubernetes { namespace: "ns".into(), name: "n".into(), key: "k".into() }
        );
    }

    #[test]
    fn bad_references_of_each_kind_are_refused() {
        use SecretRefError::*;
        let cases: &[(&str, SecretRefError)] = &[
            ("vault:secret/db", UnknownScheme("vault".into())),
            ("no-scheme", UnknownScheme("no-scheme".into())),
            ("file:relative/path", BadFilePath),
            ("file:/run/../etc/shadow", BadFilePath),
            ("file:/", BadFilePath),
            ("file:/run//db", BadFilePath),
            ("env:", BadEnvName),
            ("env:1ABC", BadEnvName),
            ("env:A-B", BadEnvName),
            ("aws-sm:", BadAwsSecret),
            ("aws-sm:has space", BadAwsSecret),
            ("aws-sm:arn:aws:s3:::bucket", BadAwsSecret),
            ("aws-ssm:param", BadAwsParameter),
            ("aws-ssm:/a//b", BadAwsParameter),
            ("aws-ssm:/a b", BadAwsParameter),
            ("k8s:ns/name", BadKubernetes),
            ("k8s:name#key", BadKubernetes),
            ("k8s:NS/name#key", BadKubernetes),
            ("k8s:ns/name#", BadKubernetes),
            ("env:A\u{0}", ControlCharacter),
            ("file:/a\nb", ControlCharacter),
        ];
        for (text, want) in cases {
            assert_eq!(text.parse::<SecretRef>().as_ref(), Err(want), "{text}");
        }
        let long = format!("aws-ssm:/{}", "a".repeat(MAX_SECRET_REF_BYTES));
        assert_eq!(long.parse::<SecretRef>(), Err(TooLong { bytes: long.len() }));
        assert!(serde_json::from_str::<SecretRef>("\"env:\"").is_err());
    }
}
