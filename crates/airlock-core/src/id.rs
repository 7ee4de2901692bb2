//! Typed identifiers: a bare string or byte array never crosses a crate boundary.
//!
//! Every id is 128 random bits shown as `<prefix>_<26 lowercase base32 chars>`, so an id
//! says what it names and one kind can never be passed where another is expected.
//! [`OperationId`] alone is `op_<32 lowercase hex>`, the form signed statements and stored
//! operations already carry.

use std::fmt;
use std::str::FromStr;

use data_encoding::BASE32_NOPAD;

/// Why a string is not a valid id of the expected kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected {expected} id (`{prefix}_…`), got `{got}`")]
pub struct IdParseError {
    expected: &'static str,
    prefix: &'static str,
    got: String,
}

macro_rules! typed_id {
    ($(#[$meta:meta])* $name:ident, $prefix:literal, $what:literal) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name([u8; 16]);

        impl $name {
            pub const PREFIX: &'static str = $prefix;
            /// Exactly the strings [`FromStr`] accepts, as a regular expression (for the API's
            /// schema): 26 base32 characters carry 130 bits, so the last one has its low 2 bits
            /// zero.
            pub const PATTERN: &'static str = concat!("^", $prefix, "_[a-z2-7]{25}[aeimquy4]$");

            /// Builds an id from 16 random bytes the caller drew from a CSPRNG.
            pub const fn from_random(bytes: [u8; 16]) -> Self {
                Self(bytes)
            }

            pub const fn as_bytes(&self) -> &[u8; 16] {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}_{}", $prefix, BASE32_NOPAD.encode(&self.0).to_ascii_lowercase())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(self, f)
            }
        }

        impl FromStr for $name {
            type Err = IdParseError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let err = || IdParseError { expected: $what, prefix: $prefix, got: truncate(s) };
                let body = s
                    .strip_prefix($prefix)
                    .and_then(|rest| rest.strip_prefix('_'))
                    .ok_or_else(err)?;
                if body.len() != 26 || body.bytes().any(|b| b.is_ascii_uppercase()) {
                    return Err(err());
                }
                let bytes = BASE32_NOPAD
                    .decode(body.to_ascii_uppercase().as_bytes())
                    .map_err(|_| err())?;
                let arr: [u8; 16] = bytes.try_into().map_err(|_| err())?;
                Ok(Self(arr))
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

typed_id!(
    /// A vendor organisation on the control plane; the unit of isolation.
    TenantId, "ten", "a tenant"
);
typed_id!(
    /// A group of environments inside a tenant (one product, one team).
    WorkspaceId, "wsp", "a workspace"
);
typed_id!(
    /// One customer deployment: the place appliances join.
    EnvironmentId, "env", "an environment"
);
typed_id!(
    /// One appliance process identity, stable across certificate rotations.
    ApplianceId, "apl", "an appliance"
);
typed_id!(
    /// A stored credential (API token or join token), never the secret itself.
    TokenId, "tok", "a token"
);
typed_id!(
    /// A rollout: one release deployed to many environments under a concurrency limit.
    RolloutId, "rol", "a rollout"
);
typed_id!(
    /// A signed-in user's session on the control plane (never its secret).
    SessionId, "ses", "a session"
);
typed_id!(
    /// A mapping of an identity-provider group to a role, tenant-wide or in one workspace.
    RoleMappingId, "rmp", "a role mapping"
);
typed_id!(
    /// A rule that lets a platform identity (an AWS account and role) join one environment.
    JoinRuleId, "jrl", "a join rule"
);

/// One operation: `op_` and 32 lowercase hex digits (128 random bits).
///
/// Both sides parse with this one type: the control plane mints them, the appliance names its
/// per-operation directory after them, so anything else is refused before it reaches a path.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OperationId([u8; 16]);

impl OperationId {
    pub const PREFIX: &'static str = "op";
    /// Exactly the strings [`FromStr`] accepts, as a regular expression (for the API's schema).
    pub const PATTERN: &'static str = "^op_[0-9a-f]{32}$";

    /// Builds an id from 16 random bytes the caller drew from a CSPRNG.
    pub const fn from_random(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    pub const fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Display for OperationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "op_{}", data_encoding::HEXLOWER.encode(&self.0))
    }
}

impl fmt::Debug for OperationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for OperationId {
    type Err = IdParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || IdParseError { expected: "an operation", prefix: "op", got: truncate(s) };
        let body = s.strip_prefix("op_").ok_or_else(err)?;
        if body.len() != 32 || body.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(err());
        }
        let bytes = data_encoding::HEXLOWER.decode(body.as_bytes()).map_err(|_| err())?;
        Ok(Self(bytes.try_into().map_err(|_| err())?))
    }
}

impl serde::Serialize for OperationId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for OperationId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Keeps attacker-controlled input out of error messages beyond a short prefix.
fn truncate(s: &str) -> String {
    const MAX: usize = 40;
    if s.len() <= MAX {
        s.to_owned()
    } else {
        let mut end = MAX;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &s[..end])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_round_trips_through_display() {
        let id = ApplianceId::from_random([7; 16]);
        let text = id.to_string();
        assert!(text.starts_with("apl_"));
        assert_eq!(text.parse::<ApplianceId>().unwrap(), id);
    }

    #[test]
    fn id_refuses_other_kind() {
        let tenant = TenantId::from_random([1; 16]).to_string();
        let err = tenant.parse::<ApplianceId>().unwrap_err();
        assert!(err.to_string().contains("expected an appliance id (`apl_…`)"), "{err}");
    }

    #[test]
    fn operation_id_is_op_and_32_hex_digits() {
        let id = OperationId::from_random([0xab; 16]);
        assert_eq!(id.to_string(), format!("op_{}", "ab".repeat(16)));
        assert_eq!(id.to_string().parse::<OperationId>().unwrap(), id);
        assert_eq!(serde_json::to_string(&id).unwrap(), format!("\"{id}\""));
        for bad in [
            "op_1",
            "op_",
            "",
            "op_../../etc/passwd",
            &format!("op_{}", "AB".repeat(16)),
            &format!("apl_{}", "ab".repeat(16)),
        ] {
            assert!(bad.parse::<OperationId>().is_err(), "{bad}");
            assert!(serde_json::from_str::<OperationId>(&format!("\"{bad}\"")).is_err(), "{bad}");
        }
    }

    /// The published pattern and the parser agree on every id shape: random ids, each possible
    /// last character, and near misses (wrong length, case, alphabet, prefix).
    #[test]
    fn pattern_accepts_exactly_what_parses() {
        let appliance = regex::Regex::new(ApplianceId::PATTERN).unwrap();
        let operation = regex::Regex::new(OperationId::PATTERN).unwrap();
        let base32 = "abcdefghijklmnopqrstuvwxyz234567";
        let mut candidates: Vec<String> = Vec::new();
        for n in 0..=255u8 {
            candidates.push(ApplianceId::from_random([n; 16]).to_string());
            candidates.push(OperationId::from_random([n; 16]).to_string());
        }
        for last in base32.chars().chain(['A', '0', '8', '_', 'é']) {
            candidates.push(format!("apl_{}{last}", "a".repeat(25)));
        }
        for body in ["a".repeat(25), "a".repeat(27), "A".repeat(26), "0".repeat(26)] {
            candidates.push(format!("apl_{body}"));
        }
        for body in ["a".repeat(31), "a".repeat(33), "A".repeat(32), "g".repeat(32), "f".repeat(32)] {
            candidates.push(format!("op_{body}"));
        }
        candidates.push(format!("env_{}", "a".repeat(26)));
        candidates.push(format!("apl_{}\n", "a".repeat(26)));
        for c in &candidates {
            assert_eq!(appliance.is_match(c), c.parse::<ApplianceId>().is_ok(), "{c}");
            assert_eq!(operation.is_match(c), c.parse::<OperationId>().is_ok(), "{c}");
        }
        assert!(candidates.iter().filter(|c| appliance.is_match(c)).count() > 256);
    }

    #[test]
    fn id_refuses_malformed_body() {
        for bad in ["apl_", "apl_short", "apl_AAAAAAAAAAAAAAAAAAAAAAAAAA", "apl-aaaaaaaaaaaaaaaaaaaaaaaaaa", ""] {
            assert!(bad.parse::<ApplianceId>().is_err(), "{bad}");
        }
    }
}
