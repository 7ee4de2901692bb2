//! Bearer secrets (API tokens, join tokens): their recognisable format and how they are stored.
//!
//! A token is `airlock_<kind>_<52 base32 chars>` (256 random bits), so secret scanners can
//! match it and a leaked one says what it is. Only its SHA-256 is ever stored: with 256 bits
//! of entropy a slow password hash adds nothing.

use std::fmt;

use data_encoding::BASE32_NOPAD;
use sha2::{Digest, Sha256};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenKind {
    /// Authenticates an operator or integration on the HTTPS API.
    Api,
    /// Single-use bootstrap credential for one appliance join.
    Join,
    /// A signed-in user's session: the browser's cookie, or the CLI's bearer credential after `airlock login`.
    Session,
}

impl TokenKind {
    pub const fn prefix(self) -> &'static str {
        match self {
            TokenKind::Api => "airlock_at_",
            TokenKind::Join => "airlock_jt_",
            TokenKind::Session => "airlock_ss_",
        }
    }
}

/// A token in clear. `Debug` and `Display` never show it; only [`Secret::expose`] does.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    kind: TokenKind,
    text: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenParseError {
    #[error("not an Airlock {0:?} token: it must start with `{1}`")]
    WrongPrefix(TokenKind, &'static str),
    #[error("malformed Airlock token: wrong length or characters")]
    Malformed,
}

/// SHA-256 of a token's text: the only form a store keeps.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenHash(pub [u8; 32]);

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenHash({}…)", data_encoding::HEXLOWER.encode(&self.0[..4]))
    }
}

impl Secret {
    /// Builds a new token from 32 bytes the caller drew from a CSPRNG.
    pub fn from_random(kind: TokenKind, bytes: [u8; 32]) -> Self {
        let body = BASE32_NOPAD.encode(&bytes).to_ascii_lowercase();
        Self { kind, text: format!("{}{body}", kind.prefix()) }
    }

    /// Checks a presented token's shape without learning anything about its validity.
    pub fn parse(kind: TokenKind, text: &str) -> Result<Self, TokenParseError> {
        let text = text.trim();
        let body = text.strip_prefix(kind.prefix()).ok_or(TokenParseError::WrongPrefix(kind, kind.prefix()))?;
        if body.len() != 52 || !body.bytes().all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b)) {
            return Err(TokenParseError::Malformed);
        }
        Ok(Self { kind, text: text.to_owned() })
    }

    pub fn kind(&self) -> TokenKind {
        self.kind
    }

    pub fn hash(&self) -> TokenHash {
        TokenHash(Sha256::digest(self.text.as_bytes()).into())
    }

    /// The clear text, for printing once to its owner or sending to the server.
    pub fn expose(&self) -> &str {
        &self.text
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({:?}, redacted)", self.kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_round_trips_and_hides_itself() {
        let t = Secret::from_random(TokenKind::Api, [9; 32]);
        assert!(t.expose().starts_with("airlock_at_"));
        assert_eq!(Secret::parse(TokenKind::Api, t.expose()).unwrap().hash(), t.hash());
        assert!(!format!("{t:?}").contains(&t.expose()[11..]));
    }

    #[test]
    fn token_kinds_do_not_mix() {
        let join = Secret::from_random(TokenKind::Join, [1; 32]);
        assert!(matches!(Secret::parse(TokenKind::Api, join.expose()), Err(TokenParseError::WrongPrefix(..))));
        assert_eq!(Secret::parse(TokenKind::Join, "airlock_jt_short"), Err(TokenParseError::Malformed));
    }
}
