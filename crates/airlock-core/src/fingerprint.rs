//! SHA-256 fingerprints of DER certificates, the form in which a CA is pinned at install.

use std::fmt;
use std::str::FromStr;

use data_encoding::HEXLOWER_PERMISSIVE;
use sha2::{Digest, Sha256};

/// The SHA-256 of a certificate's DER encoding.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{0}` is not a SHA-256 fingerprint; expected 64 hex digits, optionally prefixed `sha256:` and separated by `:`"
)]
pub struct FingerprintParseError(String);

impl Fingerprint {
    pub fn of_der(der: &[u8]) -> Self {
        Self(Sha256::digest(der).into())
    }

    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", data_encoding::HEXLOWER.encode(&self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Fingerprint {
    type Err = FingerprintParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let trimmed = s.trim();
        let body = trimmed.strip_prefix("sha256:").or_else(|| trimmed.strip_prefix("SHA256:")).unwrap_or(trimmed);
        let hex: String = body.chars().filter(|c| *c != ':').collect();
        let bytes = HEXLOWER_PERMISSIVE
            .decode(hex.as_bytes())
            .map_err(|_| FingerprintParseError(s.chars().take(80).collect()))?;
        let arr: [u8; 32] = bytes.try_into().map_err(|_| FingerprintParseError(s.chars().take(80).collect()))?;
        Ok(Self(arr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_common_spellings() {
        let fp = Fingerprint::of_der(b"cert");
        let plain = data_encoding::HEXLOWER.encode(fp.as_bytes());
        let colons = data_encoding::HEXUPPER
            .encode(fp.as_bytes())
            .as_bytes()
            .chunks(2)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect::<Vec<_>>()
            .join(":");
        for spelling in [fp.to_string(), plain, format!("SHA256:{colons}")] {
            assert_eq!(spelling.parse::<Fingerprint>().unwrap(), fp, "{spelling}");
        }
    }

    #[test]
    fn refuses_wrong_length() {
        assert!("sha256:abcd".parse::<Fingerprint>().is_err());
        assert!("zz".repeat(32).parse::<Fingerprint>().is_err());
    }
}
