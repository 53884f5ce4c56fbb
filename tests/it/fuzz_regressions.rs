//! Inputs the fuzz targets in `fuzz/` found to break a parser, each kept as
//! a test through `plantrelay::fuzzing` (the same entry points the targets
//! call), so the fix stays fixed.

use plantrelay::fuzzing;

#[test]
fn a_replay_since_an_age_reaching_before_1970_is_refused_not_a_panic() {
    // Found by the admin_inputs target (minimised: `70955160m`, about 135
    // years): the time it names is before the Unix epoch, and the audit
    // line's RFC 3339 formatting panicked on it.
    let reason = fuzzing::admin_since("70955160m").unwrap_err();
    assert!(reason.contains("before 1970-01-01T00:00:00Z"), "{reason}");
    let reason = fuzzing::admin_since("100years").unwrap_err();
    assert!(reason.contains("before 1970-01-01T00:00:00Z"), "{reason}");
    let reason = fuzzing::admin_replay(br#"{"since": "60y"}"#).unwrap_err();
    assert!(reason.contains("before 1970-01-01T00:00:00Z"), "{reason}");
    // An age inside the epoch still works.
    assert!(fuzzing::admin_since("2h").is_ok());
}

#[test]
fn a_lone_surrogate_escape_in_data_or_an_extension_is_refused_not_journaled() {
    // Found by the http_body target: `"data": {"qt\ud800y": 5}` was accepted
    // and journaled verbatim, and a strict JSON reader upstream would refuse
    // the whole batch carrying it.
    let single = b"application/cloudevents+json";
    for body in [
        &br#"{"id":"a","data":{"qt\ud800y":5}}"#[..],
        br#"{"id":"b","data":"\udc00"}"#,
        br#"{"id":"c","data":1,"lineext":"x\ud800"}"#,
    ] {
        assert!(
            fuzzing::http_body(single, body).is_none(),
            "{}",
            String::from_utf8_lossy(body)
        );
    }
    // A real pair (an emoji) is text, and is kept.
    let ok = fuzzing::http_body(single, br#"{"id":"d","data":"\ud83d\ude00"}"#).unwrap();
    assert_eq!(ok.len(), 1);
}
