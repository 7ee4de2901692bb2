//! Time as a value. Core never reads a clock: callers pass `now` in.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch, UTC.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(i64);

impl Timestamp {
    pub const fn from_unix_millis(ms: i64) -> Self {
        Self(ms)
    }

    pub const fn unix_millis(self) -> i64 {
        self.0
    }

    pub const fn unix_seconds(self) -> i64 {
        self.0.div_euclid(1000)
    }

    pub fn saturating_add(self, d: std::time::Duration) -> Self {
        let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        Self(self.0.saturating_add(ms))
    }

    /// Time from `earlier` to `self`, zero if `earlier` is later.
    pub fn since(self, earlier: Timestamp) -> std::time::Duration {
        // i128: two attacker-chosen i64 values must not overflow into a small duration.
        let ms = i128::from(self.0) - i128::from(earlier.0);
        std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(if ms < 0 { 0 } else { u64::MAX }))
    }

    pub fn to_offset_date_time(self) -> ::time::OffsetDateTime {
        ::time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.0) * 1_000_000)
            .unwrap_or(::time::OffsetDateTime::UNIX_EPOCH)
    }

    pub fn from_offset_date_time(t: ::time::OffsetDateTime) -> Self {
        Self(i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX))
    }

    /// RFC 3339 in UTC, e.g. `2026-11-23T01:02:03.456Z`.
    pub fn rfc3339(self) -> String {
        self.to_offset_date_time()
            .format(&::time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|_| self.0.to_string())
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.rfc3339())
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.rfc3339())
    }
}

/// Parses a human duration: `90s`, `15m`, `4h`, `30d`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: u64 = num.parse().map_err(|_| format!("`{s}` is not a duration; use e.g. 90s, 15m, 4h or 30d"))?;
    let secs = match unit {
        "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        "d" => n.saturating_mul(86_400),
        _ => return Err(format!("`{s}` has unknown unit `{unit}`; use s, m, h or d")),
    };
    Ok(std::time::Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_rfc3339_utc() {
        assert_eq!(Timestamp::from_unix_millis(0).to_string(), "1970-01-01T00:00:00Z");
        assert_eq!(Timestamp::from_unix_millis(1_500).to_string(), "1970-01-01T00:00:01.5Z");
    }

    #[test]
    fn since_does_not_overflow_on_extreme_values() {
        let (min, max) = (Timestamp::from_unix_millis(i64::MIN), Timestamp::from_unix_millis(i64::MAX));
        assert_eq!(max.since(min), std::time::Duration::from_millis(u64::MAX));
        assert_eq!(min.since(max), std::time::Duration::ZERO);
    }

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration("90s").unwrap().as_secs(), 90);
        assert_eq!(parse_duration("15m").unwrap().as_secs(), 900);
        assert_eq!(parse_duration("30d").unwrap().as_secs(), 30 * 86_400);
        assert_eq!(parse_duration("7").unwrap().as_secs(), 7);
        assert!(parse_duration("7y").is_err());
        assert!(parse_duration("h").is_err());
    }
}
