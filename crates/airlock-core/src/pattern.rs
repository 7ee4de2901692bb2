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
}
