//! Patterns the whole of a value must match: template variables and the customer's
//! pre-approval constraints.
//!
//! A pattern must be a complete regular expression on its own before it is anchored.
//! Wrapping text as `^(?:{p})$` without that check let `[a-z]+)|(.*` close the group early and
//! accept any value; a pattern that parses alone cannot reach outside the group.

/// Why a pattern cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{pattern}` is not a regular expression on its own: {why}")]
pub struct PatternError {
    pattern: String,
    why: String,
}

/// Compiles `pattern` so that it must match a whole value.
pub fn anchored(pattern: &str) -> Result<regex::Regex, PatternError> {
    let err = |e: regex::Error| PatternError { pattern: pattern.chars().take(80).collect(), why: e.to_string() };
    regex::Regex::new(pattern).map_err(err)?;
    regex::Regex::new(&format!("^(?:{pattern})$")).map_err(err)
}

/// A pattern compiled by [`anchored`], kept with its source text: what a customer writes in a
/// signed document (a policy's deny rule). It parses from a string, so a pattern that cannot be
/// anchored makes the whole document invalid instead of matching nothing (or everything).
#[derive(Clone, Debug)]
pub struct AnchoredPattern {
    source: String,
    regex: regex::Regex,
}

impl AnchoredPattern {
    /// Whether the whole of `value` matches.
    pub fn is_match(&self, value: &str) -> bool {
        self.regex.is_match(value)
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }
}

impl TryFrom<String> for AnchoredPattern {
    type Error = PatternError;
    fn try_from(source: String) -> Result<Self, Self::Error> {
        let regex = anchored(&source)?;
        Ok(Self { source, regex })
    }
}

/// Two patterns are the same when they are written the same.
impl PartialEq for AnchoredPattern {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Eq for AnchoredPattern {}

impl<'de> serde::Deserialize<'de> for AnchoredPattern {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let source = String::deserialize(deserializer)?;
        Self::try_from(source).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pattern_matches_whole_values_only() {
        let re = anchored("[a-z]+|web").unwrap();
        assert!(re.is_match("api") && re.is_match("web"));
        assert!(!re.is_match("api; id") && !re.is_match("x-api"));
    }

    #[test]
    fn a_pattern_cannot_close_its_own_anchoring() {
        for escape in ["[a-z]+)|(.*", ".*)|(", "a)(b"] {
            assert!(anchored(escape).is_err(), "{escape}");
        }
        // What such a pattern tried: any value at all would have matched.
        assert!(regex::Regex::new("^(?:[a-z]+)|(.*)$").unwrap().is_match("$(rm -rf /)"));
    }

    #[test]
    fn a_pattern_in_a_document_is_checked_when_it_parses() {
        let ok = AnchoredPattern::try_from("billing|billing-.*".to_owned()).unwrap();
        assert!(ok.is_match("billing-eu") && !ok.is_match("not-billing"));
        assert!(AnchoredPattern::try_from("[a-z]+)|(.*".to_owned()).is_err());
    }
}
