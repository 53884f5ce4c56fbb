//! Text that came from outside (the network, an upstream's answer, a
//! certificate) made safe to show: every control character escaped, so that
//! it cannot start a new log line, move a terminal's cursor or set its title,
//! and long text bounded, so that one client cannot make an error message
//! megabytes long.
//!
//! This module owns the escape rules and nothing else: it never decides
//! whether text is acceptable, it only renders it harmless.

use std::borrow::Cow;
use std::fmt::Write as _;

/// Bound for an error message that is stored and served (`last_error`, a
/// dead letter's reason): enough for a reason and the start of what an
/// upstream said, not enough to hold a request body.
pub const MAX_ERROR_LEN: usize = 512;

/// Bound, in bytes of the escaped result, for request-derived text quoted
/// in an ingest error: enough for an attribute name or a timestamp, too
/// little to carry a forged page of log lines.
pub const QUOTE_MAX: usize = 128;

/// Appended where text was cut short.
pub const TRUNCATED: &str = "…[truncated]";

/// A character that must not reach a log line or a terminal as is: C0
/// controls (including `\n`, `\r`, `\t`, ESC, BEL), DEL, C1 controls
/// (U+0080..U+009F, which some terminals read as ESC sequences), and the
/// Unicode line and paragraph separators, which some viewers break lines on.
pub fn is_unsafe(c: char) -> bool {
    c.is_control() || c == '\u{2028}' || c == '\u{2029}'
}

/// Appends `c` in its escaped form: `\n`, `\r`, `\t`, `\\xNN` for the
/// other ASCII controls, `\u{NNNN}` for the rest.
pub fn push_escaped(out: &mut String, c: char) {
    match c {
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        c if (c as u32) < 0x80 => {
            let _ = write!(out, "\\x{:02x}", c as u32);
        }
        c => {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        }
    }
}

/// `s` with every control character escaped (see [`push_escaped`]) and cut
/// to at most `max_len` bytes (marker included, on a character boundary,
/// never inside an escape) when it is longer. Borrowed when nothing changes.
pub fn escape_control(s: &str, max_len: usize) -> Cow<'_, str> {
    if s.len() <= max_len && !s.chars().any(is_unsafe) {
        return Cow::Borrowed(s);
    }
    let budget = max_len.saturating_sub(TRUNCATED.len());
    let mut out = String::with_capacity(s.len().min(max_len));
    let mut piece = String::new();
    for (i, c) in s.char_indices() {
        piece.clear();
        if is_unsafe(c) {
            push_escaped(&mut piece, c);
        } else {
            piece.push(c);
        }
        // Past the budget only if the rest, escaped, would not fit anyway.
        if out.len() + piece.len() > budget && !rest_fits_all(s, i, &out, max_len) {
            if max_len >= TRUNCATED.len() {
                out.push_str(TRUNCATED);
            }
            return Cow::Owned(out);
        }
        out.push_str(&piece);
    }
    Cow::Owned(out)
}

/// Whether `out` plus the escaped rest of `s` from byte `from` fits in
/// `max_len`: then nothing needs cutting.
fn rest_fits_all(s: &str, from: usize, out: &str, max_len: usize) -> bool {
    let mut len = out.len();
    for c in s[from..].chars() {
        len += if is_unsafe(c) {
            let mut p = String::new();
            push_escaped(&mut p, c);
            p.len()
        } else {
            c.len_utf8()
        };
        if len > max_len {
            return false;
        }
    }
    true
}

/// [`escape_control`] without a length bound: for short fields that are
/// bounded where they are accepted (ids, subjects, names).
pub fn escape(s: &str) -> Cow<'_, str> {
    escape_control(s, usize::MAX)
}

/// An error message to store or serve: escaped, at most [`MAX_ERROR_LEN`]
/// bytes.
pub fn bounded_error(s: &str) -> String {
    escape_control(s, MAX_ERROR_LEN).into_owned()
}

/// JSON text made safe for a terminal: serde escapes C0 controls inside
/// strings but leaves DEL, C1 controls and U+2028/U+2029 raw; those (which
/// can only occur inside strings) become `\u00XX` escapes, so the text stays
/// the same JSON. Line breaks between values are kept.
pub fn json_safe(json: &str) -> Cow<'_, str> {
    if !json.chars().any(|c| is_unsafe(c) && c != '\n') {
        return Cow::Borrowed(json);
    }
    let mut out = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        if is_unsafe(c) && c != '\n' {
            let _ = write!(out, "\\u{:04x}", c as u32);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_text_stays_the_same_json_without_raw_controls() {
        let v = serde_json::json!({"id": "a\u{9b}b\u{7f}\u{2028}\n\u{1b}"});
        let pretty = serde_json::to_string_pretty(&v).unwrap();
        let safe = json_safe(&pretty);
        assert!(!safe.chars().any(|c| is_unsafe(c) && c != '\n'), "{safe}");
        let back: serde_json::Value = serde_json::from_str(&safe).unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn clean_text_is_borrowed_unchanged() {
        assert!(matches!(
            escape_control("press-07 ok", 64),
            Cow::Borrowed("press-07 ok")
        ));
        assert!(matches!(escape("Grüße"), Cow::Borrowed("Grüße")));
    }

    #[test]
    fn every_control_character_is_escaped() {
        assert_eq!(escape("a\nb"), "a\\nb");
        assert_eq!(escape("a\r\tb"), "a\\r\\tb");
        assert_eq!(escape("\x1b[2J\x07"), "\\x1b[2J\\x07");
        assert_eq!(escape("\x7f"), "\\x7f");
        assert_eq!(escape("\u{9b}31m"), "\\u{9b}31m");
        assert_eq!(escape("x\u{2028}y"), "x\\u{2028}y");
        assert_eq!(escape("\0"), "\\x00");
        let all: String = (0u32..0x100).filter_map(char::from_u32).collect();
        assert!(!escape(&all).chars().any(is_unsafe));
    }

    #[test]
    fn long_text_is_cut_on_a_character_boundary_with_a_marker() {
        let long = "ä".repeat(1000);
        let cut = escape_control(&long, 100);
        assert!(cut.len() <= 100, "{}", cut.len());
        assert!(cut.ends_with(TRUNCATED));
        assert!(cut.starts_with("ää"));
        // Exactly at the bound: kept whole.
        let exact = "x".repeat(100);
        assert_eq!(escape_control(&exact, 100), exact);
    }

    #[test]
    fn an_escape_is_never_cut_in_half() {
        let s = "\n".repeat(100);
        let cut = escape_control(&s, 50);
        assert!(cut.len() <= 50);
        let body = cut.strip_suffix(TRUNCATED).unwrap();
        assert_eq!(body.len() % 2, 0, "{body}");
        assert!(body.chars().all(|c| c == '\\' || c == 'n'));
    }

    #[test]
    fn a_four_mebibyte_error_is_stored_as_at_most_max_error_len_bytes() {
        let huge = format!("bad event: {}", "A\n".repeat(2 << 20));
        let e = bounded_error(&huge);
        assert!(e.len() <= MAX_ERROR_LEN);
        assert!(e.starts_with("bad event: A\\nA\\n"));
        assert!(!e.contains('\n'));
    }
}
