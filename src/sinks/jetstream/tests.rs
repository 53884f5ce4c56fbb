//! Tests of the wire form (subjects, headers, the binding's encoding), the
//! credentials and the mapping of publish failures to outcomes; the
//! conformance and interop suites run the sink against a real server.

use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::context::{PublishError, PublishErrorKind};

use super::message::header_value;
use super::stream::PROBE;
use super::*;
use crate::event::{Class, StoredEvent};
use crate::sinks::SendOutcome;

fn event(stream: &str, attrs: Option<&str>) -> StoredEvent {
    StoredEvent {
        seq: 42,
        source: "mes".into(),
        id: "e-42".into(),
        stream: stream.into(),
        stream_seq: 7,
        class: Class::Critical,
        event_type: "com.example.mes.confirmation".into(),
        source_time: Some("2026-11-29T10:00:00Z".into()),
        recv_time_us: 0,
        data: br#"{"qty":3}"#.to_vec(),
        attrs: attrs.map(str::to_string),
    }
}

fn header<'a>(m: &'a Outgoing, name: &str) -> Option<&'a str> {
    m.headers().get(name).map(|v| v.as_str())
}

#[test]
fn subjects_render_every_placeholder_with_valid_tokens() {
    let t = SubjectTemplate::new("plantrelay.{agent}.{stream}", "gw-01");
    assert_eq!(
        t.render("mes", "line3/press7"),
        "plantrelay.gw-01.line3.press7"
    );
    assert_eq!(
        t.render("mes", "line 3/a.b/*/>"),
        "plantrelay.gw-01.line_3.a_b._._"
    );
    assert_eq!(t.render("mes", "/x//"), "plantrelay.gw-01._.x._._");
    assert_eq!(t.render("mes", ""), "plantrelay.gw-01._");
    let t = SubjectTemplate::new("f.{agent}.{source}.{stream}.v1", "gw.a b");
    assert_eq!(t.render("mes.x", "a/b"), "f.gw_a_b.mes_x.a.b.v1");
    assert_eq!(t.render("", "a"), "f.gw_a_b._.a.v1");
    let t = SubjectTemplate::new("events", "gw");
    assert_eq!(t.render("mes", "a/b"), "events");
    let t = SubjectTemplate::new("x.pre-{source}-post", "gw");
    assert_eq!(t.render("s\t1", "a"), "x.pre-s_1-post");
}

#[test]
fn the_capture_subject_is_the_literal_prefix() {
    let cap = |t: &str| SubjectTemplate::new(t, "gw-01").capture();
    assert_eq!(
        cap("plantrelay.{agent}.{stream}").as_deref(),
        Some("plantrelay.gw-01.>")
    );
    assert_eq!(
        cap("a.{agent}.x{source}.{stream}").as_deref(),
        Some("a.gw-01.>")
    );
    assert_eq!(cap("a.{agent}.events").as_deref(), Some("a.gw-01.events"));
    assert_eq!(cap("{stream}.x"), None);
    assert_eq!(cap("p{source}.x"), None);
    let t = SubjectTemplate::new("plantrelay.{agent}.{source}.{stream}", "gw-01");
    let cap = t.capture().unwrap();
    assert!(subject_matches(&cap, &t.render("mes", "line/3")));
    assert!(subject_matches(&cap, &t.render(PROBE, PROBE)));
}

#[test]
fn subjects_match_with_nats_wildcards() {
    assert!(subject_matches("a.b.c", "a.b.c"));
    assert!(!subject_matches("a.b.c", "a.b"));
    assert!(!subject_matches("a.b", "a.b.c"));
    assert!(subject_matches("a.*.c", "a.x.c"));
    assert!(!subject_matches("a.*", "a.x.c"));
    assert!(subject_matches("a.>", "a.x.c"));
    assert!(!subject_matches("a.>", "a"));
    assert!(subject_matches(">", "a"));
    assert!(subject_matches("*.>", "a.b"));
}

#[test]
fn headers_carry_the_cloudevent_and_the_dedup_id() {
    let t = SubjectTemplate::new("plantrelay.{agent}.{stream}", "gw-01");
    let e = event(
        "line/3",
        Some(r#"{"traceparent":"00-ab","partof":{"order":7},"sequence":"x","odd key":"v w"}"#),
    );
    let m = outgoing(&t, "gw-01", &e);
    assert_eq!(m.subject(), "plantrelay.gw-01.line.3");
    assert_eq!(header(&m, "Nats-Msg-Id"), Some("e-42"));
    assert_eq!(header(&m, "ce-specversion"), Some("1.0"));
    assert_eq!(header(&m, "ce-id"), Some("e-42"));
    assert_eq!(header(&m, "ce-source"), Some("plantrelay://gw-01/mes"));
    assert_eq!(header(&m, "ce-type"), Some("com.example.mes.confirmation"));
    assert_eq!(header(&m, "ce-subject"), Some("line/3"));
    assert_eq!(header(&m, "ce-time"), Some("2026-11-29T10:00:00Z"));
    assert_eq!(header(&m, "ce-sequence"), Some("42"), "never from attrs");
    assert_eq!(header(&m, "ce-streamsequence"), Some("7"));
    assert_eq!(header(&m, "ce-deliveryclass"), Some("critical"));
    assert_eq!(header(&m, "ce-traceparent"), Some("00-ab"));
    assert_eq!(header(&m, "ce-partof"), Some("{%22order%22:7}"));
    // A space cannot be in a header name: dropped, not fatal.
    assert_eq!(
        m.headers()
            .iter()
            .filter(|(k, _)| k.to_string().contains("odd"))
            .count(),
        0
    );
    assert_eq!(header(&m, "content-type"), Some("application/json"));
    assert_eq!(m.payload(), br#"{"qty":3}"#);
    let mut e = event("a", None);
    e.source_time = None;
    let m = outgoing(&t, "gw-01", &e);
    assert_eq!(header(&m, "ce-time"), None);
}

#[test]
fn binary_data_is_the_body_and_datacontenttype_the_content_type() {
    let t = SubjectTemplate::new("p.{stream}", "gw");
    let mut e = event("a", Some(r#"{"data_base64":"AAEC"}"#));
    e.data = b"null".to_vec();
    let m = outgoing(&t, "gw", &e);
    assert_eq!(m.payload(), &[0u8, 1, 2]);
    assert_eq!(header(&m, "content-type"), None);
    assert_eq!(header(&m, "ce-data_base64"), None);
    let e = event("a", Some(r#"{"datacontenttype":"application/xml"}"#));
    let m = outgoing(&t, "gw", &e);
    assert_eq!(header(&m, "content-type"), Some("application/xml"));
    assert_eq!(header(&m, "ce-datacontenttype"), None);
}

#[test]
fn header_values_are_percent_encoded_as_the_binding_says() {
    assert_eq!(header_value("abc-1:2".into()), "abc-1:2");
    assert_eq!(header_value("a b\"%é".into()), "a%20b%22%25%C3%A9");
    assert_eq!(header_value("x\r\ny".into()), "x%0D%0Ay");
}

#[test]
fn credentials_files_yield_the_jwt_and_a_seed_that_signs_the_nonce() {
    let user = nkeys::KeyPair::new_user();
    let seed = user.seed().unwrap();
    let creds = format!(
        "-----BEGIN NATS USER JWT-----\neyJhbGciOi.jwt.sig\n------END NATS USER JWT------\n\n************************* IMPORTANT *************************\n\n-----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
    );
    let (jwt, parsed) = parse_creds(&creds).unwrap();
    assert_eq!(jwt, "eyJhbGciOi.jwt.sig");
    assert_eq!(parsed, seed);
    assert!(parse_creds("nothing here").is_err());
    let mut broken = seed.clone().into_bytes();
    broken[10] = if broken[10] == b'A' { b'B' } else { b'A' };
    let broken = creds.replace(&seed, std::str::from_utf8(&broken).unwrap());
    assert!(
        parse_creds(&broken).unwrap_err().contains("not valid"),
        "a damaged seed is refused"
    );
    let auth = Auth::Creds { jwt, seed }.connect(b"nonce-123").unwrap();
    assert_eq!(auth.jwt.as_deref(), Some("eyJhbGciOi.jwt.sig"));
    user.verify(b"nonce-123", &auth.signature.unwrap()).unwrap();
    let auth = Auth::Token("t0k".into()).connect(b"n").unwrap();
    assert_eq!(auth.token.as_deref(), Some("t0k"));
}

fn js_error(code: u64) -> PublishError {
    let e: jetstream::Error = serde_json::from_str(&format!(
        r#"{{"code":400,"err_code":{code},"description":"refused"}}"#
    ))
    .unwrap();
    PublishError::with_source(PublishErrorKind::Other, e)
}

#[test]
fn failures_map_to_retries_and_named_rejections() {
    let e = event("a", None);
    let t = Duration::from_secs(10);
    let f = |err: PublishError| failure(&err, &e, "p.a", t);
    let transient = |x: Failure| match x {
        Failure::Transient(r) => r,
        other => panic!("{other:?}"),
    };
    let r = transient(f(PublishError::new(PublishErrorKind::TimedOut)));
    assert!(
        r.contains("10s") && r.contains("e-42") && r.contains("p.a"),
        "{r}"
    );
    let r = transient(f(PublishError::new(PublishErrorKind::StreamNotFound)));
    assert!(
        r.contains("no JetStream stream captures subject p.a"),
        "{r}"
    );
    let r = transient(f(PublishError::new(PublishErrorKind::BrokenPipe)));
    assert!(r.contains("connection"), "{r}");
    transient(f(js_error(10077)));
    for code in [10054, 10097] {
        assert!(matches!(f(js_error(code)), Failure::Permanent(r) if r.contains("e-42")));
    }
    assert!(matches!(
        f(PublishError::new(PublishErrorKind::MaxPayloadExceeded)),
        Failure::Permanent(r) if r.contains("e-42")
    ));

    assert_eq!(outcome(5, None), SendOutcome::Ack);
    assert_eq!(
        outcome(3, Some(Failure::Transient("t".into()))),
        SendOutcome::Retry {
            acked: 3,
            after: None,
            reason: "t".into()
        }
    );
    assert_eq!(
        outcome(3, Some(Failure::Permanent("p".into()))),
        SendOutcome::Reject {
            acked: 3,
            index: Some(3),
            reason: "p".into()
        }
    );
}
