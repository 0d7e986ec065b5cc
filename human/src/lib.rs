//! Times and durations for people, one spelling for `ztid-server` and `ztid-agent`:
//! points in time as RFC 3339 in UTC with how they stand from now
//! (`2026-12-02T10:14:36Z (in 59m50s)`), lifetimes as people write them (`1h30m`).
//! Scripts read the JSON output, which keeps Unix seconds.

#![forbid(unsafe_code)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Now, in Unix seconds (0 if the clock is before 1970, which only makes every time
/// read as far in the future).
pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// `unix` (seconds) as RFC 3339 in UTC, `2026-12-02T10:14:36Z`; a time beyond what
/// RFC 3339 can write (year 10000 on) stays in Unix seconds, `@N`.
pub fn rfc3339(unix: i64) -> String {
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
pub fn duration(seconds: i64) -> String {
    units(seconds, usize::MAX)
}

/// How long something took: `3ms` below a second, else two units at most, rounded down.
pub fn elapsed(d: Duration) -> String {
    if d.as_secs() == 0 {
        format!("{}ms", d.as_millis())
    } else {
        units(i64::try_from(d.as_secs()).unwrap_or(i64::MAX), 2)
    }
}

/// A point in time: `2026-12-02T10:14:36Z (3m ago)` or `(in 1h)`.
pub fn when(unix: i64) -> String {
    when_at(unix, now_unix(), false)
}

/// An expiry: `2026-12-02T10:14:36Z (in 59m50s)` or `(expired 2m ago)`.
pub fn expiry(unix: i64) -> String {
    when_at(unix, now_unix(), true)
}

/// [`when`] (or, for an expiry, [`expiry`]) as seen at `now`.
pub fn when_at(unix: i64, now: i64, is_expiry: bool) -> String {
    format!("{} ({})", rfc3339(unix), relative(unix, now, is_expiry))
}

/// How `at` stands from `now`, two units at most: `in 59m50s`, `3m ago`, `now`; for an
/// expiry, a past time reads `expired 3m ago`.
pub fn relative(at: i64, now: i64, is_expiry: bool) -> String {
    let delta = at.saturating_sub(now);
    let past = || units(delta.saturating_neg(), 2);
    match delta {
        0 => "now".into(),
        d if d > 0 => format!("in {}", units(d, 2)),
        _ if is_expiry => format!("expired {} ago", past()),
        _ => format!("{} ago", past()),
    }
}

/// `seconds` in at most `most` units (days, hours, minutes, seconds), the largest
/// first; when approximating, smaller units are dropped, never rounded up (so
/// `in 59m59s` never reads `in 1h`).
fn units(seconds: i64, most: usize) -> String {
    let sign = if seconds < 0 { "-" } else { "" };
    let mut rest = seconds.unsigned_abs();
    let mut text = String::new();
    let mut written = 0;
    for (unit, size) in [("d", 86_400u64), ("h", 3_600), ("m", 60), ("s", 1)] {
        let n = rest / size;
        rest %= size;
        if written == most {
            break;
        }
        if n > 0 {
            text.push_str(&format!("{n}{unit}"));
            written += 1;
        } else if written > 0 && most != usize::MAX {
            // Approximating, a zero unit ends it: 1 h 0 m 5 s reads `1h`.
            break;
        }
    }
    if text.is_empty() {
        return "0s".into();
    }
    format!("{sign}{text}")
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
        assert_eq!(elapsed(Duration::from_micros(3_400)), "3ms");
        assert_eq!(elapsed(Duration::from_millis(61_500)), "1m1s");
    }

    #[test]
    fn times_are_rfc3339_utc_with_what_remains() {
        let at = 1_796_206_476; // 2026-12-02T10:14:36Z
        assert_eq!(rfc3339(at), "2026-12-02T10:14:36Z");
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(i64::MAX), format!("@{}", i64::MAX));
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
        assert_eq!(
            when_at(at, at + 120, true),
            "2026-12-02T10:14:36Z (expired 2m ago)"
        );
        assert_eq!(when_at(at, at, true), "2026-12-02T10:14:36Z (now)");
        // Two units at most, the smaller ones dropped, never rounded up.
        assert_eq!(relative(at, at - 3599, false), "in 59m59s");
        assert_eq!(relative(at, at - 3605, true), "in 1h");
        assert_eq!(
            relative(at, at - (3 * 86_400 + 7200 + 61), false),
            "in 3d2h"
        );
    }
}
