//! Times and durations for people, one spelling for `ztid-server` and `ztid-agent`:
//! points in time as RFC 3339 in UTC with how they stand from now
//! (`2026-12-02T10:14:36Z (in 59m50s)`), lifetimes as people write them (`1h30m`).
//! Scripts read the JSON output, which keeps Unix seconds.
//!
//! And values from elsewhere, shown to a person ([`shown`]): what an agent, a workload, a
//! federation peer or a narrower admin chose can neither drive the reader's terminal nor
//! forge a line of output.

#![forbid(unsafe_code)]

#[cfg(feature = "logs")]
pub mod logs;

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A value from elsewhere, shown to a person: every character that could act on a
/// terminal or hide what the text says is written visibly as an escape.
/// Escaped: C0 and C1 controls and DEL (ESC, CSI, OSC sequences such as OSC 52 and OSC 8;
/// CR and BS overwriting; LF forging lines) as `\n`, `\r`, `\t` or `\x1b`; and the
/// invisible formatting characters (bidi overrides, embeddings and isolates, zero-width
/// characters, line and paragraph separators, tag characters) as `\u{202e}`. Everything
/// else, other scripts included, is shown as it is. A backslash is not doubled: refusals
/// the server already escaped would read `\\x1b`, and a value copied from the output would
/// no longer match; a typed `\x1b` can look like an escaped ESC, but does nothing.
pub fn shown(value: &str) -> Shown<'_> {
    Shown(value)
}

/// What [`shown`] returns: writes the value escaped.
#[derive(Debug, Clone, Copy)]
pub struct Shown<'a>(&'a str);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        // Runs of plain characters are written at once.
        while let Some((at, c)) = rest.char_indices().find(|&(_, c)| needs_escape(c)) {
            f.write_str(&rest[..at])?;
            match c {
                '\n' => f.write_str("\\n")?,
                '\r' => f.write_str("\\r")?,
                '\t' => f.write_str("\\t")?,
                c if u32::from(c) < 0x80 => write!(f, "\\x{:02x}", u32::from(c))?,
                c => write!(f, "\\u{{{:x}}}", u32::from(c))?,
            }
            rest = &rest[at + c.len_utf8()..];
        }
        f.write_str(rest)
    }
}

/// `value` as [`shown`] writes it.
pub fn shown_string(value: &str) -> String {
    shown(value).to_string()
}

/// `value` in double quotes, its `\\` and `"` escaped, then as [`shown`] writes it: for
/// one `name=value` field among others on a line, which a value holding spaces and `"`
/// could otherwise end early and follow with fields of its own.
pub fn shown_quoted(value: &str) -> String {
    let quoted = value.replace('\\', "\\\\").replace('"', "\\\"");
    format!("\"{}\"", shown(&quoted))
}

/// The first character of `value` that has no place in a name or a text field a person
/// reads (a C0 or C1 control, DEL), if any: input checks refuse such values where the
/// field has no use for them. Invisible formatting characters are not refused here (a
/// label or a path may hold them in other scripts); [`shown`] makes them visible.
pub fn first_control(value: &str) -> Option<char> {
    value.chars().find(|c| c.is_control())
}

/// Whether [`shown`] escapes `c`.
fn needs_escape(c: char) -> bool {
    c.is_control() || is_invisible_format(c)
}

/// Invisible characters that change how the text around them reads: bidi controls,
/// zero-width and joiner characters, separators, fillers, tags.
fn is_invisible_format(c: char) -> bool {
    matches!(
        u32::from(c),
        0x00ad // soft hyphen
            | 0x034f // combining grapheme joiner
            | 0x061c // Arabic letter mark
            | 0x115f..=0x1160 // Hangul fillers
            | 0x17b4..=0x17b5
            | 0x180b..=0x180f // Mongolian variation selectors and vowel separator
            | 0x200b..=0x200f // zero-width space, joiners, LRM, RLM
            | 0x2028..=0x202e // line and paragraph separators, bidi embeddings and overrides
            | 0x2060..=0x206f // word joiner, invisible operators, bidi isolates, deprecated formats
            | 0x3164 // Hangul filler
            | 0xfe00..=0xfe0f // variation selectors
            | 0xfeff // zero-width no-break space (BOM)
            | 0xffa0 // halfwidth Hangul filler
            | 0xfff9..=0xfffb // interlinear annotations
            | 0x1d173..=0x1d17a // musical formatting
            | 0xe0000..=0xe0fff // tags, variation selectors supplement
    )
}

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

/// Exit status of a command whose standard output was closed under it, as a C tool
/// killed by `SIGPIPE` reports it (128 + 13).
pub const CLOSED_STDOUT_STATUS: i32 = 141;

/// For a command-line verb: a write to a standard output closed by its reader
/// (`ztid-server entry list | head`) ends the process quietly with
/// [`CLOSED_STDOUT_STATUS`], as a C tool's does, instead of a panic and a backtrace.
/// Rust ignores `SIGPIPE`, so `println!` (and clap's completion writer) panic on
/// `EPIPE`. Not for a daemon: any other panic keeps the default hook.
pub fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if info.payload_as_str().is_some_and(is_broken_pipe) {
            std::process::exit(CLOSED_STDOUT_STATUS);
        }
        default(info);
    }));
}

/// Whether a panic message is a write's broken pipe: `println!`'s ("failed printing to
/// stdout: … (os error 32)") or an unwrapped `io::Error`'s Debug (`kind: BrokenPipe`).
/// The OS's text is localised; the error number and kind are not.
fn is_broken_pipe(message: &str) -> bool {
    message.contains("(os error 32)") || message.contains("kind: BrokenPipe")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broken_pipe_panics_are_told_from_others() {
        assert!(is_broken_pipe(
            "failed printing to stdout: Broken pipe (os error 32)"
        ));
        assert!(is_broken_pipe(
            "failed to write completion file: Os { code: 32, kind: BrokenPipe, message: \"Broken pipe\" }"
        ));
        assert!(!is_broken_pipe(
            "failed printing to stdout: No space left on device (os error 28)"
        ));
        assert!(!is_broken_pipe(
            "index out of bounds: the len is 3 but the index is 32"
        ));
    }

    #[test]
    fn values_from_elsewhere_are_shown_with_every_control_visible() {
        let s = |v: &str| shown(v).to_string();
        assert_eq!(s("spiffe://example.org/a"), "spiffe://example.org/a");
        assert_eq!(
            s("ünïcødé 名前"),
            "ünïcødé 名前",
            "other scripts stay as they are"
        );
        // CSI (colour, cursor), OSC 52 (clipboard) and OSC 8 (links), 8-bit CSI.
        assert_eq!(s("\x1b[31mred\x1b[0m"), "\\x1b[31mred\\x1b[0m");
        assert_eq!(
            s("\x1b]52;c;cm0gLXJmIC8=\x07"),
            "\\x1b]52;c;cm0gLXJmIC8=\\x07"
        );
        assert_eq!(
            s("\x1b]8;;http://evil\x1b\\x\x1b]8;;\x1b\\"),
            "\\x1b]8;;http://evil\\x1b\\x\\x1b]8;;\\x1b\\"
        );
        assert_eq!(s("\u{9b}2J"), "\\u{9b}2J");
        // Overwriting and forged lines.
        assert_eq!(s("ok\rEVIL"), "ok\\rEVIL");
        assert_eq!(s("abc\x08\x08\x08xyz"), "abc\\x08\\x08\\x08xyz");
        assert_eq!(
            s("a\nSelector      : unix:uid:0"),
            "a\\nSelector      : unix:uid:0"
        );
        assert_eq!(s("\t\x00\x7f"), "\\t\\x00\\x7f");
        // Bidi overrides and isolates, zero-width characters.
        assert_eq!(s("exe.\u{202e}fdp"), "exe.\\u{202e}fdp");
        assert_eq!(
            s("\u{2066}a\u{2067}b\u{2068}c\u{2069}"),
            "\\u{2066}a\\u{2067}b\\u{2068}c\\u{2069}"
        );
        assert_eq!(s("ad\u{200b}min\u{feff}"), "ad\\u{200b}min\\u{feff}");
        assert_eq!(s("\u{2028}\u{e0041}"), "\\u{2028}\\u{e0041}");
        // A message the server escaped already is not escaped twice.
        assert_eq!(s("hint holds (\\x1b)"), "hint holds (\\x1b)");
        assert_eq!(shown_string("a\nb"), "a\\nb");
        assert_eq!(
            shown_quoted("x\" subject=\"spiffe://td/victim"),
            r#""x\" subject=\"spiffe://td/victim""#
        );
        // A backslash of the value cannot undo the escape of the quote after it.
        assert_eq!(shown_quoted("x\\\" y\x1b"), r#""x\\\" y\x1b""#);
    }

    #[test]
    fn controls_are_found_for_input_checks() {
        assert_eq!(first_control("a hint"), None);
        assert_eq!(first_control("label \u{202e} in Hebrew"), None);
        assert_eq!(first_control("a\x1b[2J"), Some('\x1b'));
        assert_eq!(first_control("line\nforged"), Some('\n'));
        assert_eq!(first_control("\u{85}"), Some('\u{85}'));
        assert_eq!(first_control("\x7f"), Some('\x7f'));
    }

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
