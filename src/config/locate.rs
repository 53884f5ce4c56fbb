//! Turns errors into positioned [`ConfigIssue`]s: byte offsets become 1-based
//! line and column, key paths (`sinks.https[0].url`) are looked up in the
//! parsed document to find where the offending value is written, and TOML /
//! serde error messages are tidied (missing and unknown keys name themselves
//! in the key path; unknown keys get a "did you mean" and, for secrets, a hint
//! to use the `*_file` key).

use std::collections::HashMap;
use std::ops::Range;

use toml::de::{DeTable, DeValue};

use super::error::ConfigIssue;

/// A semantic issue before it has a position: the key path it is about and
/// what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RawIssue {
    pub path: String,
    pub message: String,
}

impl RawIssue {
    pub(crate) fn new(path: impl Into<String>, message: impl Into<String>) -> RawIssue {
        RawIssue {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// Finds where key paths are written in one parsed document.
pub(crate) struct Locator<'d, 'i> {
    text: &'i str,
    root: &'d DeTable<'i>,
}

impl<'d, 'i> Locator<'d, 'i> {
    pub(crate) fn new(text: &'i str, root: &'d DeTable<'i>) -> Locator<'d, 'i> {
        Locator { text, root }
    }

    /// Positions a semantic issue at its key's value, or at the nearest
    /// enclosing table that is written in the file when the key is absent.
    pub(crate) fn issue(&self, raw: RawIssue) -> ConfigIssue {
        let span = self.span_of(&raw.path);
        positioned(self.text, span, raw.path, raw.message)
    }

    /// Span of the value at `path`; when a segment is missing, the span of the
    /// deepest enclosing value found. `None` for the document root.
    pub(crate) fn span_of(&self, path: &str) -> Option<Range<usize>> {
        let mut found: Option<Range<usize>> = None;
        let mut current: Option<&DeValue<'i>> = None;
        for segment in parse_key_path(path) {
            let next = match (segment, current) {
                (Segment::Key(key), None) => self.root.get(key),
                (Segment::Key(key), Some(DeValue::Table(table))) => table.get(key),
                (Segment::Index(i), Some(DeValue::Array(array))) => array.get(i),
                _ => None,
            };
            let Some(next) = next else { break };
            found = Some(next.span());
            current = Some(next.get_ref());
        }
        found
    }
}

/// Builds an issue from a span (converted to line/column) and a message.
fn positioned(
    text: &str,
    span: Option<Range<usize>>,
    key_path: String,
    message: String,
) -> ConfigIssue {
    let (line, column) = match span {
        Some(span) => {
            let (line, column) = line_col(text, span.start);
            (Some(line), Some(column))
        }
        None => (None, None),
    };
    ConfigIssue {
        line,
        column,
        key_path,
        message,
    }
}

/// 1-based line and column (in characters) of a byte offset.
pub(crate) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// An issue for a TOML syntax error. The key path is a best-effort guess from
/// the table headers above the error and the key on its line.
pub(crate) fn syntax_issue(text: &str, err: &toml::de::Error) -> ConfigIssue {
    let span = err.span();
    let key_path = span
        .as_ref()
        .map(|s| syntax_key_path(text, s.start))
        .unwrap_or_default();
    positioned(
        text,
        span,
        key_path,
        format!("invalid TOML: {}", err.message()),
    )
}

/// An issue for a deserialisation error (unknown key, missing key, wrong
/// type, bad value).
pub(crate) fn de_issue(
    locator: &Locator<'_, '_>,
    err: serde_path_to_error::Error<toml::de::Error>,
) -> ConfigIssue {
    let mut path = err.path().to_string();
    if path == "." {
        path.clear();
    }
    let err = err.into_inner();
    let mut message = err.message().to_owned();

    if let Some(field) = backticked_after(&message, "missing field ") {
        path = join_key(&path, &field);
        message = format!("missing required key `{field}`");
    } else if let Some(field) = backticked_after(&message, "unknown field ") {
        if !path.ends_with(field.as_str()) {
            path = join_key(&path, &field);
        }
        let expected = expected_names(&message);
        let secret_file = format!("{field}_file");
        if expected.iter().any(|e| *e == secret_file) {
            message.push_str(&format!(
                "; secrets are never written inline, they are read from files: use `{secret_file}`"
            ));
        } else if let Some(close) = closest(&field, &expected) {
            message.push_str(&format!("; did you mean `{close}`?"));
        }
    }

    let span = err.span().or_else(|| locator.span_of(&path));
    positioned(locator.text, span, path, message)
}

fn join_key(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// The first backticked word after `prefix` in `message`.
fn backticked_after(message: &str, prefix: &str) -> Option<String> {
    let rest = message.strip_prefix(prefix)?.strip_prefix('`')?;
    let end = rest.find('`')?;
    Some(rest[..end].to_owned())
}

/// The backticked names after "expected" in a serde unknown-field message.
fn expected_names(message: &str) -> Vec<&str> {
    let Some((_, tail)) = message.split_once("expected") else {
        return Vec::new();
    };
    tail.split('`').skip(1).step_by(2).collect()
}

/// The expected name closest to `field`, if it is plausibly a typo.
fn closest<'a>(field: &str, expected: &[&'a str]) -> Option<&'a str> {
    expected
        .iter()
        .map(|e| (edit_distance(field, e), *e))
        .filter(|(d, _)| *d <= 2 && *d < field.len())
        .min_by_key(|(d, _)| *d)
        .map(|(_, e)| e)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = substitution.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

enum Segment<'p> {
    Key(&'p str),
    Index(usize),
}

/// Splits `sources.opcua[1].nodes[2].node_id` into keys and indexes.
fn parse_key_path(path: &str) -> Vec<Segment<'_>> {
    let mut segments = Vec::new();
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (key, mut indexes) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !key.is_empty() {
            segments.push(Segment::Key(key));
        }
        while let Some(rest) = indexes.strip_prefix('[') {
            let Some(end) = rest.find(']') else { break };
            if let Ok(i) = rest[..end].parse() {
                segments.push(Segment::Index(i));
            }
            indexes = &rest[end + 1..];
        }
    }
    segments
}

/// Guesses the key path at `offset` in a file that does not parse: the last
/// table header above it (arrays of tables counted) plus the key on its line.
fn syntax_key_path(text: &str, offset: usize) -> String {
    let (error_line, _) = line_col(text, offset);
    // Occurrences seen so far of each array-of-tables path (`sources.opcua`).
    let mut array_counts: HashMap<String, usize> = HashMap::new();
    let mut table = String::new();
    let mut key = String::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if i + 1 == error_line {
            if let Some((k, _)) = line.split_once('=')
                && !line.starts_with('[')
            {
                key = header_keys(k).join(".");
            }
            break;
        }
        if let Some(inner) = line.strip_prefix("[[") {
            let keys = header_keys(inner.split("]]").next().unwrap_or_default());
            let name = keys.join(".");
            *array_counts.entry(name.clone()).or_default() += 1;
            let nested = format!("{name}.");
            array_counts.retain(|k, _| !k.starts_with(&nested));
            table = render_header(&keys, &array_counts);
        } else if let Some(inner) = line.strip_prefix('[') {
            let keys = header_keys(inner.split(']').next().unwrap_or_default());
            table = render_header(&keys, &array_counts);
        }
    }
    match (table.is_empty(), key.is_empty()) {
        (_, true) => table,
        (true, false) => key,
        (false, false) => format!("{table}.{key}"),
    }
}

fn header_keys(raw: &str) -> Vec<String> {
    raw.split('.')
        .map(|k| k.trim().trim_matches('"').trim_matches('\'').to_owned())
        .filter(|k| !k.is_empty())
        .collect()
}

fn render_header(keys: &[String], array_counts: &HashMap<String, usize>) -> String {
    let mut out = String::new();
    for (i, key) in keys.iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        out.push_str(key);
        if let Some(count) = array_counts.get(&keys[..=i].join(".")) {
            out.push_str(&format!("[{}]", count.saturating_sub(1)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_lines_and_characters_from_one() {
        let text = "a = 1\nbé = \"x\"\n";
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, 6), (2, 1));
        // "bé = " is 6 bytes but 5 characters.
        assert_eq!(line_col(text, 12), (2, 6));
        assert_eq!(line_col(text, text.len()), (3, 1));
    }

    #[test]
    fn span_of_walks_tables_and_arrays_and_falls_back_to_the_enclosing_table() {
        let text = "[agent]\nid = \"x\"\n\n[[sinks.https]]\nname = \"a\"\n\n[[sinks.https]]\nname = \"b\"\nurl = \"https://x\"\n";
        let doc = DeTable::parse(text).unwrap();
        let locator = Locator::new(text, doc.get_ref());
        let line = |path: &str| locator.span_of(path).map(|s| line_col(text, s.start).0);
        assert_eq!(line("agent.id"), Some(2));
        assert_eq!(line("sinks.https[1].url"), Some(9));
        // Absent key: the table that should hold it.
        assert_eq!(line("sinks.https[0].url"), Some(4));
        assert_eq!(line("health.listen"), None);
        assert_eq!(line(""), None);
    }

    #[test]
    fn syntax_key_path_counts_arrays_of_tables_and_nested_arrays() {
        let text = "[[sources.opcua]]\nname = \"a\"\n[[sources.opcua]]\nname = \"b\"\n[[sources.opcua.nodes]]\nnode_id = \"x\"\n[[sources.opcua.nodes]]\nstream = = 1\n";
        let offset = text.find("= =").unwrap();
        assert_eq!(
            syntax_key_path(text, offset),
            "sources.opcua[1].nodes[1].stream"
        );
    }

    #[test]
    fn closest_suggests_only_near_misses() {
        assert_eq!(closest("urll", &["name", "url"]), Some("url"));
        assert_eq!(closest("colour", &["name", "url"]), None);
    }
}
