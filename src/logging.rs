//! Log set-up: `tracing` to standard error, human text by default or one JSON
//! object per line, filtered like `RUST_LOG` (`PLANTRELAY_LOG` wins if set).
//!
//! Every line goes through [`EscapingWriter`]: whatever a field or a message
//! holds (an event id, a topic, an upstream's answer), one event is one line,
//! and no control character reaches the log or the terminal raw. This module
//! must never drop or reorder a log line; it only rewrites its bytes.

use std::io::{self, IsTerminal, Write};

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

use crate::text;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (for log shippers).
    Json,
}

/// Installs the global subscriber. `default` is the filter when neither
/// `PLANTRELAY_LOG` nor `RUST_LOG` is set (e.g. `"info"`).
pub fn init(format: LogFormat, default: &str) {
    let filter = std::env::var("PLANTRELAY_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new(default));
    // Colours only for a person at a terminal: not for journald, files or
    // pipes, and never when NO_COLOR is set (https://no-color.org).
    let ansi = format == LogFormat::Text
        && std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(Stderr(LineEscape { format, ansi }))
        .with_ansi(ansi);
    // A second init (tests) keeps the first subscriber: ignore the error.
    let _ = match format {
        LogFormat::Text => builder.with_target(false).try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
}

/// How one formatted event is made safe.
#[derive(Debug, Clone, Copy)]
pub struct LineEscape {
    pub format: LogFormat,
    /// Colours are on: the formatter's own SGR sequences (`ESC [ … m`) stay.
    pub ansi: bool,
}

impl LineEscape {
    /// One formatted event, escaped: every control character but the final
    /// `\n` is written as an escape. Text: `\n`, `\x1b`, `\u{9b}` (see
    /// [`text::push_escaped`]). JSON: serde already escapes C0 controls
    /// inside strings; DEL and C1 controls, which it leaves raw, become
    /// `\u00XX` (they can only occur inside strings, so the line stays valid
    /// JSON).
    pub fn apply(&self, line: &str) -> String {
        let body = line.strip_suffix('\n').unwrap_or(line);
        let mut out = String::with_capacity(line.len() + 16);
        let mut chars = body.chars().peekable();
        while let Some(c) = chars.next() {
            if !text::is_unsafe(c) {
                out.push(c);
                continue;
            }
            match self.format {
                LogFormat::Json => {
                    use std::fmt::Write as _;
                    let _ = write!(out, "\\u{:04x}", c as u32);
                }
                LogFormat::Text if c == '\x1b' && self.ansi => {
                    // Keep a colour sequence (ESC [ digits/; m) whole;
                    // anything else after an ESC is escaped.
                    let mut seq = String::from("\x1b");
                    if chars.peek() == Some(&'[') {
                        seq.push('[');
                        chars.next();
                        while let Some(&d) = chars.peek() {
                            if d.is_ascii_digit() || d == ';' {
                                seq.push(d);
                                chars.next();
                            } else {
                                break;
                            }
                        }
                        if chars.peek() == Some(&'m') {
                            chars.next();
                            seq.push('m');
                            out.push_str(&seq);
                            continue;
                        }
                    }
                    for s in seq.chars() {
                        if text::is_unsafe(s) {
                            text::push_escaped(&mut out, s);
                        } else {
                            out.push(s);
                        }
                    }
                }
                LogFormat::Text => text::push_escaped(&mut out, c),
            }
        }
        out.push('\n');
        out
    }
}

/// Standard error behind [`LineEscape`].
#[derive(Debug, Clone, Copy)]
pub struct Stderr(pub LineEscape);

impl<'a> MakeWriter<'a> for Stderr {
    type Writer = EscapingWriter<io::Stderr>;

    fn make_writer(&'a self) -> Self::Writer {
        EscapingWriter {
            inner: io::stderr(),
            escape: self.0,
        }
    }
}

/// Escapes what it is given as one event and writes it in one call.
/// tracing-subscriber's fmt layer formats each event into a buffer and hands
/// it over with a single `write_all`, so each `write` here is one whole line
/// (possibly with `\n` inside, which is the point).
///
/// A line that cannot be written is dropped, never reported as an error:
/// the fmt layer answers a failed write with `eprintln!`, which panics when
/// standard error fails, and the release build aborts on a panic. Standard
/// error fails for real on a gateway: a pipe whose reader went away
/// (`EPIPE`; Rust ignores `SIGPIPE`), a log file on a full disk
/// (`StandardError=file:`), an I/O error. The agent goes on without those
/// lines rather than end at the next one.
pub struct EscapingWriter<W: Write> {
    pub inner: W,
    pub escape: LineEscape,
}

impl<W: Write> Write for EscapingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let line = String::from_utf8_lossy(buf);
        let _dropped = self.inner.write_all(self.escape.apply(&line).as_bytes());
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let _dropped = self.inner.flush();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: LineEscape = LineEscape {
        format: LogFormat::Text,
        ansi: false,
    };

    /// A writer whose every call fails, as standard error does once its
    /// pipe's reader is gone.
    struct Broken;

    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
        fn flush(&mut self) -> io::Result<()> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
    }

    #[test]
    fn a_line_standard_error_refuses_is_dropped_not_an_error() {
        let mut w = EscapingWriter {
            inner: Broken,
            escape: TEXT,
        };
        let line = b"WARN sink 'central' unreachable\n";
        assert_eq!(w.write(line).unwrap(), line.len());
        w.write_all(line).unwrap();
        w.flush().unwrap();
    }

    #[test]
    fn a_newline_inside_an_event_cannot_start_a_new_line() {
        let forged =
            "WARN duplicate attribute name=\"x\nINFO admin action who=root\"\n".to_string();
        let out = TEXT.apply(&forged);
        assert_eq!(out.matches('\n').count(), 1, "{out}");
        assert!(out.ends_with("who=root\"\n"));
        assert!(out.contains("x\\nINFO admin action"));
    }

    #[test]
    fn escape_bel_and_c1_are_escaped_without_colours() {
        let out = TEXT.apply("id=\x1b]0;pwned\x07 \u{9b}2J \x1b[31mred\x1b[0m\n");
        assert_eq!(
            out,
            "id=\\x1b]0;pwned\\x07 \\u{9b}2J \\x1b[31mred\\x1b[0m\n"
        );
    }

    #[test]
    fn with_colours_only_colour_sequences_stay() {
        let colour = LineEscape {
            format: LogFormat::Text,
            ansi: true,
        };
        let out = colour.apply("\x1b[2m12:00\x1b[0m id=\x1b]0;pwned\x07 \x1b[2J\n");
        assert_eq!(out, "\x1b[2m12:00\x1b[0m id=\\x1b]0;pwned\\x07 \\x1b[2J\n");
    }

    #[test]
    fn json_lines_stay_json_with_c1_and_del_escaped() {
        let json = LineEscape {
            format: LogFormat::Json,
            ansi: false,
        };
        let line = serde_json::json!({"id": "a\u{9b}b\u{7f}c\n\u{1b}"}).to_string() + "\n";
        let out = json.apply(&line);
        assert_eq!(out.matches('\n').count(), 1);
        assert!(!out.trim_end().chars().any(text::is_unsafe), "{out}");
        let back: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(back["id"], "a\u{9b}b\u{7f}c\n\u{1b}");
    }
}
