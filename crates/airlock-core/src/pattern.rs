//! Patterns the whole of a value must match: template variables and the customer's
//! pre-approval constraints.
//!
//! A pattern must be a complete regular expression on its own before it is anchored.
//! Wrapping text as `^(?:{p})$` without that check let `[a-z]+)|(.*` close the group early and
//! accept any value; a pattern that parses alone cannot reach outside the group.

/// Longest pattern accepted, in bytes. Patterns constrain one value (a service name, a
/// version); 256 bytes is room for any honest one.
pub const MAX_PATTERN_BYTES: usize = 256;

/// Most memory one compiled pattern may take (its program, and the lazy DFA's cache).
///
/// With the regex crate's defaults (10 MiB), `\w{100}` compiled in 50 ms to 6 MB: 200 of them
/// in one template took 10.4 s and 1.17 GB. At this limit such a pattern is refused in
/// microseconds, and a pattern that fits compiles in about a millisecond.
pub const MAX_COMPILED_BYTES: usize = 64 * 1024;

/// Deepest nesting of groups and repetitions the parser follows.
const MAX_NESTING: u32 = 32;

/// Why a pattern cannot be used. [`PatternError::is_limit`] tells a pattern over a limit (the
/// author can shorten it) from one that is not a regular expression at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("the pattern is {bytes} bytes; at most {MAX_PATTERN_BYTES} are accepted")]
    TooLong { bytes: usize },
    #[error("`{pattern}` compiles past the limit of {MAX_COMPILED_BYTES} bytes; write a narrower pattern")]
    TooComplex { pattern: String },
    #[error("`{pattern}` is not a regular expression on its own: {why}")]
    Invalid { pattern: String, why: String },
}

impl PatternError {
    /// Whether the pattern was refused for its size rather than its syntax.
    pub fn is_limit(&self) -> bool {
        matches!(self, PatternError::TooLong { .. } | PatternError::TooComplex { .. })
    }
}

/// Compiles `pattern` so that it must match a whole value, within the limits above.
pub fn anchored(pattern: &str) -> Result<regex::Regex, PatternError> {
    if pattern.len() > MAX_PATTERN_BYTES {
        return Err(PatternError::TooLong { bytes: pattern.len() });
    }
    let shown = || pattern.chars().take(80).collect::<String>();
    let err = |e: regex::Error| match e {
        regex::Error::CompiledTooBig(_) => PatternError::TooComplex { pattern: shown() },
        other => PatternError::Invalid { pattern: shown(), why: other.to_string() },
    };
    let build = |text: &str| {
        regex::RegexBuilder::new(text)
            .size_limit(MAX_COMPILED_BYTES)
            .dfa_size_limit(MAX_COMPILED_BYTES)
            .nest_limit(MAX_NESTING)
            .build()
    };
    build(pattern).map_err(err)?;
    build(&format!("^(?:{pattern})$")).map_err(err)
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

    #[test]
    fn a_pattern_over_a_limit_is_refused_as_such() {
        let long = "a".repeat(MAX_PATTERN_BYTES + 1);
        assert_eq!(anchored(&long).unwrap_err(), PatternError::TooLong { bytes: MAX_PATTERN_BYTES + 1 });
        assert!(anchored(&"a".repeat(MAX_PATTERN_BYTES)).is_ok());
        // Small to write, huge to compile: each `\w` is hundreds of Unicode ranges.
        let err = anchored(r"\w{100}").unwrap_err();
        assert!(matches!(err, PatternError::TooComplex { .. }) && err.is_limit(), "{err}");
        let nested = format!("{}a{}", "(".repeat(40), ")".repeat(40));
        assert!(anchored(&nested).is_err());
        let invalid = anchored("[a-z").unwrap_err();
        assert!(!invalid.is_limit() && invalid.to_string().contains("not a regular expression"), "{invalid}");
        // Honest patterns fit.
        for ok in [r"[a-z][a-z0-9-]{0,62}", r"\w+", r"v?\d+\.\d+\.\d+(-[a-z0-9.]+)?", r"[0-9a-f]{64}"] {
            assert!(anchored(ok).is_ok(), "{ok}");
        }
    }
}
