//! Text that came from outside (a request body, a topic, a header) made safe
//! to quote in an answer, a stored `last_error` or a log line.
//!
//! This module owns one rule: quoted outside text never carries a raw control
//! character and never more than a bounded number of bytes. It must never
//! allocate when the text is already safe and short, and never split a UTF-8
//! character when it cuts.

use std::borrow::Cow;
use std::fmt::Write as _;

/// Default bound, in bytes of the escaped result, for request-derived text
/// quoted in an error: enough for an attribute name or a timestamp, too
/// little to carry a forged page of log lines.
pub const QUOTE_MAX: usize = 128;

/// What a cut-off text ends with.
const ELLIPSIS: &str = "…";

/// `s` with every control character escaped (`\n` as `\\n`, `\r` as `\\r`,
/// `\t` as `\\t`, others as `\\u{1b}`), cut at a character boundary so the
/// result is at most `max_len` bytes (`max_len` of 3 or more: the marker's
/// own length), a cut marked with `…`. Borrowed when nothing had to change.
pub fn escape_control(s: &str, max_len: usize) -> Cow<'_, str> {
    if s.len() <= max_len && !s.chars().any(char::is_control) {
        return Cow::Borrowed(s);
    }
    let budget = max_len.saturating_sub(ELLIPSIS.len());
    let mut out = String::with_capacity(max_len.min(s.len() + 16));
    // Where to cut if the whole does not fit: the last end of an escaped
    // character that leaves room for the marker.
    let mut cut = 0;
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                // Writing into a String cannot fail.
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
        if out.len() <= budget {
            cut = out.len();
        }
        if out.len() > max_len {
            out.truncate(cut);
            out.push_str(ELLIPSIS);
            return Cow::Owned(out);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_short_text_is_borrowed() {
        assert!(matches!(escape_control("line/3 ok", 64), Cow::Borrowed(_)));
        assert!(matches!(escape_control("", 0), Cow::Borrowed(_)));
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(escape_control("a\nb\r\tc", 64), "a\\nb\\r\\tc");
        assert_eq!(escape_control("x\u{1b}[31my", 64), "x\\u{1b}[31my");
        assert_eq!(
            escape_control("\u{0}\u{7f}\u{85}", 64),
            "\\u{0}\\u{7f}\\u{85}"
        );
    }

    #[test]
    fn long_text_is_cut_at_a_character_boundary_within_the_bound() {
        let long = "é".repeat(1000);
        let out = escape_control(&long, 20);
        assert!(out.len() <= 20, "{out}");
        assert!(out.ends_with('…'), "{out}");
        let newlines = "\n".repeat(1000);
        let escaped = escape_control(&newlines, 20);
        assert!(escaped.len() <= 20, "{escaped}");
        assert!(escaped.starts_with("\\n\\n"), "{escaped}");
        assert!(!escaped.contains('\n'));
        // Exactly at the bound: kept whole, no marker.
        assert_eq!(escape_control(&"a".repeat(20), 20), "a".repeat(20));
        assert_eq!(escape_control("ab\n", 4), "ab\\n");
    }
}
