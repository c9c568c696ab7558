//! Go-style durations (`10s`, `250ms`, `1m30s`), as the CRD writes them: the one parser and the one
//! renderer of the project. Parsing is `kube::core::Duration`'s (the parser the CRD's fields deserialize
//! with), so a value the API server stored reads the same on a flag.

use std::str::FromStr;
use std::time::Duration;

/// The schema's pattern of a duration field (the CEL rules bound its value).
pub const PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$";

/// What an error shows as examples of a valid value.
const EXAMPLES: &str = "expected e.g. 10s, 250ms, 1m30s";

/// A non-negative Go duration; surrounding whitespace is ignored. The error is one line that quotes
/// the value.
pub fn parse(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err(format!("empty duration ({EXAMPLES})"));
    }
    let d = kube::core::Duration::from_str(t)
        .map_err(|_| format!("cannot parse {s:?} as a duration ({EXAMPLES})"))?;
    if d.is_negative() {
        return Err(format!("{s:?} is negative"));
    }
    Ok(d.into())
}

/// `d` as a Go duration that [`parse`] reads back exactly: whole seconds as `10s`, else the largest of
/// `ms`, `us` and `ns` that is exact (a sub-millisecond part is kept, never truncated).
pub fn render(d: Duration) -> String {
    let n = d.subsec_nanos();
    if n == 0 {
        format!("{}s", d.as_secs())
    } else if n.is_multiple_of(1_000_000) {
        format!("{}ms", d.as_millis())
    } else if n.is_multiple_of(1_000) {
        format!("{}us", d.as_micros())
    } else {
        format!("{}ns", d.as_nanos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_parse() {
        assert_eq!(parse("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse(" 1m30s "), Ok(Duration::from_secs(90)));
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("1500500us"), Ok(Duration::from_micros(1_500_500)));
        assert_eq!(parse("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(
            parse(""),
            Err("empty duration (expected e.g. 10s, 250ms, 1m30s)".into())
        );
        assert_eq!(
            parse("ten"),
            Err("cannot parse \"ten\" as a duration (expected e.g. 10s, 250ms, 1m30s)".into())
        );
        assert!(parse("10").is_err(), "a unit is required");
        assert_eq!(parse("-1s"), Err("\"-1s\" is negative".into()));
    }

    #[test]
    fn rendering_is_exact_and_reads_back() {
        for (d, s) in [
            (Duration::from_secs(10), "10s"),
            (Duration::from_secs(600), "600s"),
            (Duration::ZERO, "0s"),
            (Duration::from_millis(1500), "1500ms"),
            (Duration::from_micros(250_500), "250500us"),
            (Duration::from_nanos(1_000_000_001), "1000000001ns"),
        ] {
            assert_eq!(render(d), s);
            assert_eq!(parse(s), Ok(d));
        }
    }
}
