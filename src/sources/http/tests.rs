//! Bodies through [`parse_events`], as the ingest route reads them: the
//! parser's limits and error positions, and the CloudEvent mapping rules
//! of [`super::mapping`] seen from a request.

use super::mapping::PAIRWISE_NAMES;
use super::parse::Format;
use super::*;
use crate::event::NewEvent;

const LIMITS: Limits = Limits {
    max_events_per_request: 100,
    max_concurrent_requests: 4,
    max_depth: 8,
    max_attributes: 300,
};

fn parse(body: &str, format: Format) -> Result<Vec<NewEvent>, (String, Option<usize>)> {
    parse_events(
        body.as_bytes(),
        format,
        "mes",
        Class::Critical,
        &LIMITS,
        None,
    )
    .map_err(|r| (r.message, r.index))
}

#[test]
fn escaped_names_and_strings_read_as_their_text() {
    // Names with escapes are copied, the others borrowed; both must
    // mean the same attribute.
    let events = parse(
        r#"[{"i\u0064":"a\"b","subject":"line\/1","type":"t","x\u0065xt":"\u00e9"},
                {"id":"plain","subject":"s\u00fc"}]"#,
        Format::Batch,
    )
    .unwrap();
    assert_eq!(events[0].id, "a\"b");
    assert_eq!(events[0].stream, "line/1");
    assert_eq!(events[0].attrs.as_deref(), Some(r#"{"xext":"\u00e9"}"#));
    assert_eq!(events[1].id, "plain");
    assert_eq!(events[1].stream, "s\u{fc}");
    assert_eq!(
        parse(r#"{"id":"a","\u0069d":"b"}"#, Format::Single)
            .unwrap_err()
            .0,
        "attribute \"id\" appears more than once"
    );
    assert_eq!(
        parse(r#"{"id":7}"#, Format::Single).unwrap_err().0,
        "id must be a string"
    );
}

#[test]
fn a_repeated_attribute_is_named_with_few_and_with_many_attributes() {
    let event = |n: usize, repeat: Option<usize>| {
        let mut attrs: Vec<String> = (0..n).map(|i| format!("\"a{i}ext\":{i}")).collect();
        if let Some(r) = repeat {
            attrs.push(format!("\"a{r}ext\":0"));
        }
        format!("{{\"id\":\"x\",{}}}", attrs.join(","))
    };
    for n in [3, PAIRWISE_NAMES - 2, PAIRWISE_NAMES, 200] {
        let ok = parse(&event(n, None), Format::Single).unwrap();
        assert_eq!(ok.len(), 1, "{n} distinct attributes");
        let err = parse(&event(n, Some(n / 2)), Format::Single).unwrap_err();
        assert_eq!(
            err.0,
            format!("attribute \"a{}ext\" appears more than once", n / 2),
            "{n} attributes"
        );
    }
}

#[test]
fn data_is_kept_verbatim_and_attributes_in_order() {
    let events = parse(
        r#"{"id":"a","data":{"b":1, "a":12345678901234567890123},"zext":"z","aext":1,"sequence":9,"streamsequence":2}"#,
        Format::Single,
    )
    .unwrap();
    assert_eq!(
        std::str::from_utf8(&events[0].data).unwrap(),
        r#"{"b":1, "a":12345678901234567890123}"#
    );
    assert_eq!(events[0].attrs.as_deref(), Some(r#"{"zext":"z","aext":1}"#));
}

#[test]
fn validation_reasons() {
    let cases = [
        (r#"{"data":1}"#, "id is required"),
        (r#"{"id":""}"#, "id must not be empty"),
        (r#"{"id":5}"#, "id must be a string"),
        (r#"{"id":"a","specversion":"0.3"}"#, "specversion"),
        (r#"{"id":"a","time":"now"}"#, "RFC 3339"),
        (r#"{"id":"a","subject":7}"#, "subject must be a string"),
        (r#"{"id":"a","id":"b"}"#, "more than once"),
        (
            r#"{"id":"a","data":1,"data_base64":"aGk="}"#,
            "mutually exclusive",
        ),
        (r#"{"id":"a","data_base64":"%%"}"#, "base64"),
        (
            r#"{"id":"a","source":"x","originsource":"y"}"#,
            "both present",
        ),
    ];
    for (body, reason) in cases {
        let (msg, index) = parse(body, Format::Single).unwrap_err();
        assert!(msg.contains(reason), "{body}: {msg}");
        assert_eq!(index, Some(0));
    }
    let long = "x".repeat(MAX_KEY_LEN + 1);
    let (msg, _) = parse(&format!(r#"{{"id":"{long}"}}"#), Format::Single).unwrap_err();
    assert!(msg.contains("at most 1024"), "{msg}");
    assert!(parse(&format!(r#"{{"id":"{}"}}"#, &long[1..]), Format::Single).is_ok());
}

#[test]
fn syntax_errors_name_the_element_or_line() {
    let (msg, index) = parse(r#"[{"id":"a"},{"id":"b"},{"id" "c"}]"#, Format::Batch).unwrap_err();
    assert!(msg.contains("line 1 column"), "{msg}");
    assert_eq!(index, Some(2));
    let (msg, index) = parse(r#"[{"id":"a"}] x"#, Format::Batch).unwrap_err();
    assert!(msg.contains("trailing"), "{msg}");
    assert_eq!(index, None);
    let (_, index) = parse(r#"{"id":"a"}"#, Format::Batch).unwrap_err();
    assert_eq!(index, None);
    let (_, index) = parse(r#"[{"id":"a"}, 5]"#, Format::Batch).unwrap_err();
    assert_eq!(index, Some(1));
    let (msg, index) = parse("{\"id\":\"a\"}\n\n{oops}\n", Format::Ndjson).unwrap_err();
    assert!(msg.contains("line 3"), "{msg}");
    assert_eq!(index, Some(2));
}

#[test]
fn empty_bodies_have_no_events() {
    for (body, format) in [
        ("", Format::Single),
        ("  \n", Format::Json),
        ("[]", Format::Batch),
        (" [ ] ", Format::Json),
        ("\n\r\n  \n", Format::Ndjson),
    ] {
        let (msg, _) = parse(body, format).unwrap_err();
        assert_eq!(msg, "no events", "{body:?}");
    }
}

#[test]
fn json_content_type_takes_an_object_or_an_array_and_a_bom() {
    assert_eq!(
        parse("\u{feff}{\"id\":\"a\"}", Format::Json).unwrap().len(),
        1
    );
    assert_eq!(
        parse(r#" [{"id":"a"},{"id":"b"}]"#, Format::Json)
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn the_event_cap_stops_the_parser_in_every_format() {
    let max = LIMITS.max_events_per_request;
    let batch = |n: usize| {
        let events: Vec<String> = (0..n).map(|i| format!("{{\"id\":\"e{i}\"}}")).collect();
        format!("[{}]", events.join(","))
    };
    assert_eq!(parse(&batch(max), Format::Batch).unwrap().len(), max);
    for body in [batch(max + 1), batch(max * 50)] {
        let (msg, index) = parse(&body, Format::Batch).unwrap_err();
        assert!(msg.contains(&format!("more than {max} events (max_events_per_request)")));
        assert_eq!(index, None);
    }
    let ndjson = |n: usize| {
        (0..n)
            .map(|i| format!("{{\"id\":\"e{i}\"}}\n"))
            .collect::<String>()
    };
    assert_eq!(parse(&ndjson(max), Format::Ndjson).unwrap().len(), max);
    let (msg, _) = parse(&ndjson(max + 1), Format::Ndjson).unwrap_err();
    assert!(msg.contains("max_events_per_request"), "{msg}");
    // Past the cap the rest is not even read: a syntax error after it
    // does not change the answer.
    let (msg, _) = parse(&format!("{}, oops", &batch(max + 1)), Format::Batch).unwrap_err();
    assert!(msg.contains("max_events_per_request"), "{msg}");
}

#[test]
fn depth_attribute_count_and_scalar_extensions_are_checked_per_event() {
    let deep = |n: usize| format!("{}1{}", "[".repeat(n), "]".repeat(n));
    let ok = format!(r#"{{"id":"a","data":{}}}"#, deep(LIMITS.max_depth));
    assert_eq!(parse(&ok, Format::Single).unwrap().len(), 1);
    let body = format!(
        r#"[{{"id":"a"}},{{"id":"b","data":{{"x":{}}}}}]"#,
        deep(10_000)
    );
    let (msg, index) = parse(&body, Format::Batch).unwrap_err();
    assert!(
        msg.contains("\"data\" nests arrays and objects 10001 levels deep"),
        "{msg}"
    );
    assert!(msg.contains("at most 8 are allowed (max_depth)"), "{msg}");
    assert_eq!(index, Some(1));

    for (value, kind) in [(r#"{"a":1}"#, "an object"), ("[1]", "an array")] {
        let body = format!(r#"{{"id":"a","plantext":{value}}}"#);
        let (msg, index) = parse(&body, Format::Single).unwrap_err();
        assert!(msg.contains(&format!("\"plantext\" is {kind}")), "{msg}");
        assert_eq!(index, Some(0));
    }
    let body = format!(r#"{{"id":"a","source":{}}}"#, deep(10_000));
    assert!(
        parse(&body, Format::Single)
            .unwrap_err()
            .0
            .contains("\"source\" is an array")
    );
    // A null extension is absent; scalars are kept as sent.
    let e = parse(
        r#"{"id":"a","nullext":null,"n":1.5,"b":true}"#,
        Format::Single,
    )
    .unwrap();
    assert_eq!(e[0].attrs.as_deref(), Some(r#"{"n":1.5,"b":true}"#));

    let many: Vec<String> = (0..100_000).map(|i| format!("\"x{i}\":1")).collect();
    let body = format!(r#"{{"id":"a",{}}}"#, many.join(","));
    let (msg, index) = parse(&format!("[{body}]"), Format::Batch).unwrap_err();
    assert!(
        msg.contains("more than 300 attributes (max_attributes)"),
        "{msg}"
    );
    assert!(msg.contains("\"x299\""), "{msg}");
    assert_eq!(index, Some(0));
}

#[test]
fn reasons_quoting_the_request_carry_no_control_characters_and_are_bounded() {
    let forged = "x\\n2026-12-05T08:00:00Z  WARN admin action: journal dropped\\u001b[0m";
    let body = format!(r#"{{"id":"a","{forged}":1,"{forged}":2}}"#);
    let (msg, _) = parse(&body, Format::Single).unwrap_err();
    assert!(!msg.chars().any(char::is_control), "{msg:?}");
    assert!(msg.contains("x\\n2026-12-05"), "{msg}");
    assert!(msg.contains("\\x1b"), "{msg}");

    let long = format!("\\n{}", "A".repeat(100_000));
    for body in [
        format!(r#"{{"id":"a","{long}":1,"{long}":2}}"#),
        format!(r#"{{"id":"a","time":"{long}"}}"#),
        format!(r#"{{"id":"a","specversion":["{long}"]}}"#),
        format!(r#"[{{"id":"a"}}, "{long}"]"#),
    ] {
        let (msg, _) = parse(&body, Format::Json).unwrap_err();
        assert!(msg.len() < 600, "{} bytes: {}", msg.len(), &msg[..200]);
        assert!(!msg.chars().any(char::is_control), "{msg:?}");
    }
}
