//! Appliance identity as carried in certificates: a SPIFFE-style URI SAN
//! `spiffe://<trust-domain>/tenant/<t>/env/<e>/appliance/<a>`.

use std::fmt;
use std::str::FromStr;

use crate::{ApplianceId, EnvironmentId, TenantId};

/// Who an appliance certificate says it is. Only meaningful once the certificate chained to
/// the control plane CA; parsing alone proves nothing.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ApplianceIdentity {
    pub trust_domain: String,
    pub tenant: TenantId,
    pub environment: EnvironmentId,
    pub appliance: ApplianceId,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{uri}` is not an appliance identity: {why}")]
pub struct IdentityParseError {
    uri: String,
    why: String,
}

impl ApplianceIdentity {
    pub fn uri(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for ApplianceIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/tenant/{}/env/{}/appliance/{}",
            self.trust_domain, self.tenant, self.environment, self.appliance
        )
    }
}

impl FromStr for ApplianceIdentity {
    type Err = IdentityParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why: &str| IdentityParseError { uri: s.chars().take(200).collect(), why: why.to_owned() };
        let rest = s.strip_prefix("spiffe://").ok_or_else(|| err("missing spiffe:// scheme"))?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [domain, "tenant", t, "env", e, "appliance", a] => {
                if !is_valid_trust_domain(domain) {
                    return Err(err("invalid trust domain"));
                }
                Ok(Self {
                    trust_domain: (*domain).to_owned(),
                    tenant: t.parse().map_err(|e: crate::id::IdParseError| err(&e.to_string()))?,
                    environment: e.parse().map_err(|e: crate::id::IdParseError| err(&e.to_string()))?,
                    appliance: a.parse().map_err(|e: crate::id::IdParseError| err(&e.to_string()))?,
                })
            }
            _ => Err(err("expected /tenant/<t>/env/<e>/appliance/<a>")),
        }
    }
}

/// SPIFFE trust domains are lowercase letters, digits, `.`, `-` and `_`.
pub fn is_valid_trust_domain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_round_trips() {
        let id = ApplianceIdentity {
            trust_domain: "airlock.local".into(),
            tenant: TenantId::from_random([1; 16]),
            environment: EnvironmentId::from_random([2; 16]),
            appliance: ApplianceId::from_random([3; 16]),
        };
        assert_eq!(id.uri().parse::<ApplianceIdentity>().unwrap(), id);
    }

    #[test]
    fn identity_refuses_swapped_segments() {
        let t = TenantId::from_random([1; 16]);
        let e = EnvironmentId::from_random([2; 16]);
        let a = ApplianceId::from_random([3; 16]);
        let swapped = format!("spiffe://d/tenant/{e}/env/{t}/appliance/{a}");
        assert!(swapped.parse::<ApplianceIdentity>().is_err());
        assert!(format!("https://d/tenant/{t}/env/{e}/appliance/{a}").parse::<ApplianceIdentity>().is_err());
        assert!(format!("spiffe://D/tenant/{t}/env/{e}/appliance/{a}").parse::<ApplianceIdentity>().is_err());
    }
}
