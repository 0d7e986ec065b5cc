//! Log lines for people: the fields of every log line, message included, written through
//! [`shown`](crate::shown). tracing-subscriber's own text format escapes ESC, BEL, BS, FF,
//! DEL and C1 in the message only, and nothing in a `%`-formatted field: a node ID, a
//! selector or a peer's error quoted in a log line could still forge lines (CR, LF) or
//! drive the terminal of whoever reads the log.

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::FormatFields;

use crate::{shown, shown_quoted};

/// The field formatter of both daemons' text logs:
/// `tracing_subscriber::fmt().fmt_fields(EscapedFields)`. The message comes first as
/// tracing writes it; other fields are `name=value`, strings quoted.
#[derive(Debug, Clone, Copy, Default)]
pub struct EscapedFields;

impl<'writer> FormatFields<'writer> for EscapedFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> fmt::Result {
        let mut visitor = Visitor {
            writer,
            result: Ok(()),
            first: true,
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct Visitor<'writer> {
    writer: Writer<'writer>,
    result: fmt::Result,
    first: bool,
}

impl Visitor<'_> {
    fn write(&mut self, field: &Field, value: &str, quoted: bool) {
        // The `log` crate's metadata (tracing-log), which the event's own line already says.
        if self.result.is_err() || field.name().starts_with("log.") {
            return;
        }
        let sep = if std::mem::take(&mut self.first) {
            ""
        } else {
            " "
        };
        let name = field.name();
        let name = name.strip_prefix("r#").unwrap_or(name);
        self.result = match (name, quoted) {
            ("message", _) => write!(self.writer, "{sep}{}", shown(value)),
            (_, true) => write!(self.writer, "{sep}{name}={}", shown_quoted(value)),
            (_, false) => write!(self.writer, "{sep}{name}={}", shown(value)),
        };
    }
}

impl Visit for Visitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.write(field, value, true);
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.write(field, &value.to_string(), false);
        // Its causes, as tracing-subscriber writes them: `name.sources=[a, b]`.
        let mut sources = Vec::new();
        let mut next = value.source();
        while let Some(e) = next {
            sources.push(shown(&e.to_string()).to_string());
            next = e.source();
        }
        if !sources.is_empty() && self.result.is_ok() {
            self.result = write!(
                self.writer,
                " {}.sources=[{}]",
                field.name(),
                sources.join(", ")
            );
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let mut text = String::new();
        if write!(text, "{value:?}").is_err() {
            self.result = Err(fmt::Error);
            return;
        }
        self.write(field, &text, false);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn logged(f: impl FnOnce()) -> String {
        let out = Captured::default();
        let sink = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || sink.clone())
            .with_ansi(false)
            .without_time()
            .fmt_fields(EscapedFields)
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let bytes = out.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn log_fields_and_messages_cannot_forge_lines_or_drive_a_terminal() {
        let node = "n1\n2026-12-05T00:00:00Z  INFO ztid: agent banned\r\x1b]52;c;ZXZpbA==\x07";
        let reason = "bad\x1b[2J\u{202e}txt.exe";
        let text = logged(|| {
            tracing::warn!(node, reason = %reason, kind = ?"a\"b", "refused {node}");
        });
        assert_eq!(text.matches('\n').count(), 1, "one line: {text:?}");
        assert!(
            !text.contains(['\r', '\x1b', '\x07', '\u{202e}']),
            "{text:?}"
        );
        assert!(
            text.contains(r#"refused n1\n2026-12-05T00:00:00Z  INFO ztid: agent banned\r\x1b]52;c;ZXZpbA==\x07"#),
            "{text:?}"
        );
        assert!(
            text.contains(r#"node="n1\n2026-12-05T00:00:00Z"#),
            "{text:?}"
        );
        assert!(
            text.contains(r"reason=bad\x1b[2J\u{202e}txt.exe"),
            "{text:?}"
        );
        // A `?` field is its Debug text.
        assert!(text.contains(r#"kind="a\"b""#), "{text:?}");
    }

    #[test]
    fn errors_and_span_fields_are_escaped_too() {
        let err = std::io::Error::other("peer said \x1b[31mno\n");
        let text = logged(|| {
            let span = tracing::info_span!("fetch", peer = "p\r");
            let _g = span.enter();
            tracing::error!(error = &err as &(dyn std::error::Error + 'static), "failed");
        });
        assert_eq!(text.matches('\n').count(), 1, "one line: {text:?}");
        assert!(!text.contains(['\r', '\x1b']), "{text:?}");
        assert!(text.contains(r"error=peer said \x1b[31mno\n"), "{text:?}");
        assert!(text.contains(r#"fetch{peer="p\r"}"#), "{text:?}");
        // An error's causes are kept, escaped as well.
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl fmt::Display for Outer {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("fetch\rfailed")
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let outer = Outer(err);
        let text = logged(|| {
            tracing::warn!(error = &outer as &(dyn std::error::Error + 'static));
        });
        assert!(
            text.contains(r"error=fetch\rfailed error.sources=["),
            "{text:?}"
        );
        assert_eq!(text.matches('\n').count(), 1, "one line: {text:?}");
        assert!(
            text.contains(r"error.sources=[peer said \x1b[31mno\n]"),
            "{text:?}"
        );
    }
}
