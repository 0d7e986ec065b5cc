//! Printing shared by every verb: the output format and lists.

use clap::ValueEnum;
use serde_json::Value;

/// Output format of every verb.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// For people.
    Text,
    /// For scripts.
    Json,
}

/// Prints a list: a JSON array, or a count and each item.
pub(super) fn print_list<T>(
    items: &[T],
    noun: &str,
    to_json: fn(&T) -> Value,
    print: fn(&T, Output),
    out: Output,
) {
    match out {
        Output::Json => println!(
            "{}",
            Value::from(items.iter().map(to_json).collect::<Vec<_>>())
        ),
        Output::Text => {
            println!("Found {} {noun}", items.len());
            for i in items {
                print(i, out);
            }
        }
    }
}

/// Now, in Unix seconds (0 if the clock is before 1970, which only makes every time
/// read as far in the future).
fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// `unix` (seconds) as RFC 3339 in UTC, `2026-12-02T10:14:36Z`; a time beyond what
/// RFC 3339 can write (year 10000 on) stays in Unix seconds, `@N`.
pub(crate) fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("@{unix}"))
}

/// A lifetime in seconds as people write it: `1h30m`, `5m`, `30s`, `2d3h`, every unit
/// that is not zero (exact: a TTL of 5430 s is `1h30m30s`); `0s` for none.
pub(crate) fn duration(seconds: i64) -> String {
    duration_units(seconds, usize::MAX)
}

/// `seconds` in at most `units` units (days, hours, minutes, seconds), the largest
/// first; smaller units are dropped, not rounded (so `in 59m59s` never reads `in 1h`).
fn duration_units(seconds: i64, units: usize) -> String {
    let sign = if seconds < 0 { "-" } else { "" };
    let mut rest = seconds.unsigned_abs();
    let mut text = String::new();
    let mut written = 0;
    for (unit, size) in [("d", 86_400u64), ("h", 3_600), ("m", 60), ("s", 1)] {
        let n = rest / size;
        rest %= size;
        if written == units {
            break;
        }
        if n > 0 {
            text.push_str(&format!("{n}{unit}"));
            written += 1;
        } else if written > 0 && units != usize::MAX {
            // Approximating, a zero unit ends it: 1 h 0 m 5 s reads `1h`.
            break;
        }
    }
    if text.is_empty() {
        return "0s".into();
    }
    format!("{sign}{text}")
}

/// How `at` stands from `now`, two units at most: `in 59m50s`, `3m ago`, `now`; for an
/// expiry, a past time reads `expired 3m ago`.
fn relative(at: i64, now: i64, expiry: bool) -> String {
    let delta = at.saturating_sub(now);
    match delta {
        0 => "now".into(),
        d if d > 0 => format!("in {}", duration_units(d, 2)),
        d if expiry => format!(
            "expired {} ago",
            duration_units(d, 2).trim_start_matches('-')
        ),
        d => format!("{} ago", duration_units(d, 2).trim_start_matches('-')),
    }
}

/// A point in time for people: `2026-12-02T10:14:36Z (3m ago)` or `(in 1h)`.
pub(crate) fn when(unix: i64) -> String {
    when_at(unix, now_unix(), false)
}

/// An expiry for people: `2026-12-02T10:14:36Z (in 59m50s)` or `(expired 2m ago)`.
pub(crate) fn expiry(unix: i64) -> String {
    when_at(unix, now_unix(), true)
}

fn when_at(unix: i64, now: i64, is_expiry: bool) -> String {
    format!("{} ({})", rfc3339(unix), relative(unix, now, is_expiry))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(duration(0), "0s");
        assert_eq!(duration(30), "30s");
        assert_eq!(duration(300), "5m");
        assert_eq!(duration(3600), "1h");
        assert_eq!(duration(5400), "1h30m");
        assert_eq!(duration(86_400 + 3600), "1d1h");
        // A TTL is shown exactly; only relative times are approximated.
        assert_eq!(duration(5430), "1h30m30s");
        assert_eq!(duration(3605), "1h5s");
        assert_eq!(duration(-90), "-1m30s");
    }

    #[test]
    fn times_are_rfc3339_utc_with_what_remains() {
        let at = 1_796_206_476; // 2026-12-02T10:14:36Z
        assert_eq!(rfc3339(at), "2026-12-02T10:14:36Z");
        assert_eq!(
            when_at(at, at - 3590, true),
            "2026-12-02T10:14:36Z (in 59m50s)"
        );
        assert_eq!(
            when_at(at, at + 180, false),
            "2026-12-02T10:14:36Z (3m ago)"
        );
        assert_eq!(
            when_at(at, at + 125, true),
            "2026-12-02T10:14:36Z (expired 2m5s ago)"
        );
        assert_eq!(when_at(at, at, true), "2026-12-02T10:14:36Z (now)");
        // Two units at most, the smaller ones dropped, never rounded up.
        assert_eq!(relative(at, at - 3599, false), "in 59m59s");
        assert_eq!(
            relative(at, at - (3 * 86_400 + 7200 + 61), false),
            "in 3d2h"
        );
        assert_eq!(relative(at, at - 3605, false), "in 1h");
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(i64::MAX), format!("@{}", i64::MAX));
    }
}
