//! A content type (chosen by the first byte) and a request body -> the HTTP
//! ingest path short of the journal: the `Content-Type` check, then
//! `parse_events` (CloudEvents single, batch, NDJSON, plain JSON) and the
//! mapping of each CloudEvent onto an event.
#![no_main]

#[path = "framing.rs"]
mod framing;

use libfuzzer_sys::fuzz_target;
use plantrelay::fuzzing;

const CONTENT_TYPES: [&str; 8] = [
    "application/cloudevents+json",
    "application/cloudevents-batch+json",
    "application/x-ndjson",
    "application/ndjson",
    "application/json",
    "Application/JSON; charset=utf-8",
    "application/cloudevents-batch+json ; charset=utf-8",
    "text/plain",
];

fuzz_target!(|data: &[u8]| {
    let Some((selector, body)) = data.split_first() else {
        return;
    };
    let content_type = CONTENT_TYPES[usize::from(*selector) % CONTENT_TYPES.len()];
    let Some(events) = fuzzing::http_body(content_type.as_bytes(), body) else {
        return;
    };
    // Accepted: every event is one the journal and the sinks can carry.
    assert!(!events.is_empty(), "accepted a body without events");
    for e in &events {
        assert!(!e.id.is_empty() && e.id.len() <= 1024, "id {:?}", e.id);
        assert!(
            !e.stream.is_empty() && e.stream.len() <= 1024,
            "stream {:?}",
            e.stream
        );
        assert!(!e.event_type.is_empty() && e.event_type.len() <= 1024);
        framing::assert_json("data", &e.data);
        if let Some(attrs) = &e.attrs {
            framing::assert_json_object("attrs", attrs);
        }
    }
});
