//! [`RelativePath`]: a path inside a release directory, the one home for the path rules.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::Problem;

pub const MAX_PATH_BYTES: usize = 1024;

/// A normalized path relative to the release directory: not absolute, no `..`, `.` or empty
/// component, no backslash, no control character, at most [`MAX_PATH_BYTES`]. Two paths naming
/// the same file are therefore the same string.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RelativePath(String);

impl RelativePath {
    /// Checks `s` against the rules; the caller says where it was found.
    pub fn parse(s: &str) -> Result<Self, PathError> {
        if s.len() > MAX_PATH_BYTES {
            return Err(PathError::TooLong { bytes: s.len() });
        }
        let problem = if s.is_empty() {
            Some(Problem::Empty)
        } else if s.chars().any(char::is_control) {
            Some(Problem::ControlCharacter)
        } else if s.starts_with('/') {
            Some(Problem::AbsolutePath)
        } else if s.split(['/', '\\']).any(|c| c == "..") {
            Some(Problem::ParentComponent)
        } else if s.contains('\\') || s.split('/').any(|c| c.is_empty() || c == ".") {
            Some(Problem::UnnormalizedPath)
        } else {
            None
        };
        match problem {
            Some(p) => Err(PathError::Invalid(p)),
            None => Ok(Self(s.to_owned())),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Why a path was refused, before the caller adds where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path is {bytes} bytes; at most {MAX_PATH_BYTES} are accepted")]
    TooLong { bytes: usize },
    #[error("{0}")]
    Invalid(Problem),
}

impl fmt::Display for RelativePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for RelativePath {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for RelativePath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}
