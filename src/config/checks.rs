//! The checks of one config value each: agent ids and names, MQTT topic
//! filters, JSON pointers, `{placeholder}` templates, NATS subject literals,
//! OPC UA node ids and certificate fingerprints. Each answers `Err` with a
//! message that names the value and says what is expected; they must never
//! know which key the value came from (the caller adds the path) and never
//! do I/O.

/// Agent id: non-empty, `[A-Za-z0-9._-]`, at most 64 characters.
pub(super) fn check_agent_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if id.len() > 64 {
        return Err(format!("must be at most 64 characters, got {}", id.len()));
    }
    if let Some(c) = id.chars().find(|c| !is_name_char(*c)) {
        return Err(format!(
            "invalid character {c:?} in agent id `{id}`: use only A-Z, a-z, 0-9, `.`, `_` and `-`"
        ));
    }
    Ok(())
}

/// Source and sink names: `[A-Za-z0-9][A-Za-z0-9._-]{0,62}`.
pub(super) fn check_name(name: &str) -> Result<(), String> {
    let Some(first) = name.chars().next() else {
        return Err("name must not be empty".to_owned());
    };
    if !first.is_ascii_alphanumeric() {
        return Err(format!(
            "invalid name `{name}`: must start with a letter or digit"
        ));
    }
    if name.len() > 63 {
        return Err(format!(
            "invalid name `{name}`: at most 63 characters, got {}",
            name.len()
        ));
    }
    if let Some(c) = name.chars().find(|c| !is_name_char(*c)) {
        return Err(format!(
            "invalid character {c:?} in name `{name}`: use only A-Z, a-z, 0-9, `.`, `_` and `-`"
        ));
    }
    Ok(())
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// MQTT topic filter: non-empty; `#` only as the whole last level; `+` only
/// as a whole level.
pub(super) fn check_topic_filter(filter: &str) -> Result<(), String> {
    if filter.is_empty() {
        return Err("topic filter must not be empty".to_owned());
    }
    if filter.contains('\0') {
        return Err(format!("invalid topic filter {filter:?}: contains NUL"));
    }
    if filter.len() > 65_535 {
        return Err("topic filter is longer than 65535 bytes".to_owned());
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') {
            if *level != "#" {
                return Err(format!(
                    "invalid topic filter `{filter}`: `#` must be alone in its level"
                ));
            }
            if i + 1 != levels.len() {
                return Err(format!(
                    "invalid topic filter `{filter}`: `#` must be the last level"
                ));
            }
        }
        if level.contains('+') && *level != "+" {
            return Err(format!(
                "invalid topic filter `{filter}`: `+` must be alone in its level"
            ));
        }
    }
    Ok(())
}

/// JSON pointer (RFC 6901): empty, or `/`-prefixed with `~` only in `~0`/`~1`.
pub(super) fn check_json_pointer(pointer: &str) -> Result<(), String> {
    if !pointer.is_empty() && !pointer.starts_with('/') {
        return Err(format!(
            "invalid JSON pointer `{pointer}`: must be empty or start with `/` (e.g. \"/eventId\")"
        ));
    }
    let mut chars = pointer.chars();
    while let Some(c) = chars.next() {
        if c == '~' && !matches!(chars.next(), Some('0' | '1')) {
            return Err(format!(
                "invalid JSON pointer `{pointer}`: `~` must be followed by 0 or 1"
            ));
        }
    }
    Ok(())
}

/// A template with `{name}` placeholders; `allowed` decides which names exist.
pub(super) fn check_template(
    template: &str,
    allowed: &dyn Fn(&str) -> bool,
    allowed_text: &str,
) -> Result<(), String> {
    if template.is_empty() {
        return Err("template must not be empty".to_owned());
    }
    let mut rest = template;
    while let Some(i) = rest.find(['{', '}']) {
        if rest[i..].starts_with('}') {
            return Err(format!("invalid template `{template}`: unmatched `}}`"));
        }
        let after = &rest[i + 1..];
        let Some(end) = after.find('}') else {
            return Err(format!("invalid template `{template}`: unclosed `{{`"));
        };
        let name = &after[..end];
        if name.contains('{') {
            return Err(format!("invalid template `{template}`: nested `{{`"));
        }
        if !allowed(name) {
            return Err(format!(
                "invalid template `{template}`: unknown placeholder `{{{name}}}`, expected {allowed_text}"
            ));
        }
        rest = &after[end + 1..];
    }
    Ok(())
}

/// The literal parts of a NATS subject template: no spaces or wildcards, no
/// empty tokens.
pub(super) fn check_subject_literal(subject: &str) -> Result<(), String> {
    if subject.contains(|c: char| c.is_whitespace() || c == '*' || c == '>') {
        return Err(format!(
            "invalid subject `{subject}`: must not contain spaces or the wildcards `*` and `>`"
        ));
    }
    if subject.starts_with('.') || subject.ends_with('.') || subject.contains("..") {
        return Err(format!(
            "invalid subject `{subject}`: tokens between `.` must not be empty"
        ));
    }
    Ok(())
}

/// OPC UA node id in standard notation.
pub(super) fn check_node_id(node_id: &str) -> Result<(), String> {
    let fail = |why: &str| {
        Err(format!(
            "invalid node id `{node_id}`: {why} (e.g. \"ns=2;s=Press07.State\", \"i=2258\")"
        ))
    };
    let identifier = if let Some(rest) = node_id.strip_prefix("ns=") {
        let Some((ns, rest)) = rest.split_once(';') else {
            return fail("expected `;` after the namespace index");
        };
        if ns.parse::<u16>().is_err() {
            return fail("the namespace index must be a number from 0 to 65535");
        }
        rest
    } else if let Some(rest) = node_id.strip_prefix("nsu=") {
        match rest.split_once(';') {
            Some((uri, rest)) if !uri.is_empty() => rest,
            _ => return fail("expected a namespace URI and `;` after `nsu=`"),
        }
    } else {
        node_id
    };
    match identifier.split_once('=') {
        Some(("i", v)) if v.parse::<u32>().is_ok() => Ok(()),
        Some(("i", _)) => fail("a numeric identifier `i=` must be a number from 0 to 4294967295"),
        Some(("s", v)) if !v.is_empty() => Ok(()),
        Some(("s", _)) => fail("a string identifier `s=` must not be empty"),
        Some(("g", v)) if is_guid(v) => Ok(()),
        Some(("g", _)) => {
            fail("a GUID identifier `g=` must look like 09087e75-8e5e-499b-954f-f2a9603db28a")
        }
        Some(("b", v)) if is_base64(v) => Ok(()),
        Some(("b", _)) => fail("an opaque identifier `b=` must be non-empty base64"),
        _ => fail("expected an identifier `i=`, `s=`, `g=` or `b=`"),
    }
}

fn is_guid(v: &str) -> bool {
    let groups: Vec<&str> = v.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, len)| g.len() == len && g.chars().all(|c| c.is_ascii_hexdigit()))
}

fn is_base64(v: &str) -> bool {
    let body = v.trim_end_matches('=');
    let padding = v.len() - body.len();
    !v.is_empty()
        && v.len().is_multiple_of(4)
        && padding <= 2
        && body
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '/')
}

/// SHA-256 fingerprint: 64 hex digits, colons allowed between them.
pub(super) fn check_sha256_fingerprint(fingerprint: &str) -> Result<(), String> {
    let hex: String = fingerprint.chars().filter(|c| *c != ':').collect();
    if hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(format!(
            "invalid SHA-256 fingerprint `{fingerprint}`: expected 64 hex digits (colons allowed)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::validate::SINK_PLACEHOLDERS;

    #[test]
    fn node_ids_in_every_standard_form_are_accepted() {
        for ok in [
            "i=2258",
            "ns=2;s=Press07.State",
            "ns=65535;i=4294967295",
            "nsu=http://example.com/UA/;s=Line3;Press=7",
            "ns=1;g=09087e75-8e5e-499b-954f-f2a9603db28a",
            "ns=1;b=M/RbKBsRVkePCePcx24oRA==",
        ] {
            assert_eq!(check_node_id(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn malformed_node_ids_are_rejected_with_the_reason() {
        for (bad, why) in [
            ("ns=2;x=1", "expected an identifier"),
            ("ns=70000;i=1", "namespace index"),
            ("ns=2s=Press", "expected `;`"),
            ("i=abc", "numeric identifier"),
            ("ns=2;s=", "must not be empty"),
            ("g=1234", "GUID"),
            ("b=abc", "base64"),
            ("nsu=;i=1", "namespace URI"),
            ("Press07.State", "expected an identifier"),
        ] {
            let err = check_node_id(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn topic_filters_follow_mqtt_wildcard_rules() {
        for ok in ["a/b", "a/+/c", "#", "a/#", "+", "+/+", "$share/g/a/#", "/a"] {
            assert_eq!(check_topic_filter(ok), Ok(()), "{ok}");
        }
        for bad in ["", "a/#/c", "a#", "a/b+", "a/+b/c", "#/a"] {
            assert!(check_topic_filter(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn templates_reject_unknown_unclosed_and_stray_braces() {
        let sink = |n: &str| SINK_PLACEHOLDERS.contains(&n);
        assert_eq!(
            check_template("plantrelay/{agent}/{stream}", &sink, ""),
            Ok(())
        );
        assert!(
            check_template("a/{nope}", &sink, "")
                .unwrap_err()
                .contains("{nope}")
        );
        assert!(
            check_template("a/{agent", &sink, "")
                .unwrap_err()
                .contains("unclosed")
        );
        assert!(
            check_template("a/agent}", &sink, "")
                .unwrap_err()
                .contains("unmatched")
        );
        assert!(check_template("", &sink, "").is_err());
    }

    #[test]
    fn json_pointers_must_start_with_a_slash_and_escape_tildes() {
        assert_eq!(check_json_pointer(""), Ok(()));
        assert_eq!(check_json_pointer("/a~1b/~0"), Ok(()));
        assert!(check_json_pointer("eventId").is_err());
        assert!(check_json_pointer("/a~2").is_err());
    }

    #[test]
    fn names_and_agent_ids_follow_their_character_rules() {
        assert_eq!(check_name("press-line-3"), Ok(()));
        assert!(check_name("-press").is_err());
        assert!(check_name("press line").is_err());
        assert!(check_name(&"a".repeat(64)).is_err());
        assert_eq!(check_agent_id(&"a".repeat(64)), Ok(()));
        assert!(check_agent_id(&"a".repeat(65)).is_err());
        assert!(check_agent_id("gw/1").is_err());
    }

    #[test]
    fn fingerprints_need_64_hex_digits_with_optional_colons() {
        let hex = "ab".repeat(32);
        assert_eq!(check_sha256_fingerprint(&hex), Ok(()));
        let colons = vec!["AB"; 32].join(":");
        assert_eq!(check_sha256_fingerprint(&colons), Ok(()));
        assert!(check_sha256_fingerprint(&hex[2..]).is_err());
        assert!(check_sha256_fingerprint(&"zz".repeat(32)).is_err());
    }
}
