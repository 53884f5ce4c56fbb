//! What the tests of the per-event sinks (MQTT, JetStream) share: MES
//! events to post, the check of what an upstream received, and the real
//! binary to kill.

use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Stdio};

use serde_json::{Value, json};

/// `n` MES events over `streams` streams, ids `<prefix>-<i>`.
pub fn events(prefix: &str, range: std::ops::Range<usize>, streams: usize) -> Vec<Value> {
    range
        .map(|i| {
            json!({
                "specversion": "1.0",
                "id": format!("{prefix}-{i}"),
                "source": "mes",
                "type": "com.example.order",
                "subject": format!("line{}/orders", i % streams),
                "data": {"n": i},
            })
        })
        .collect()
}

/// Checks a subscriber's CloudEvents: every id of `expected` there; per
/// stream, `streamsequence` rises over first occurrences; the only
/// duplicates are whole re-sends of the same id. Returns the duplicates.
pub fn check(received: &[Value], expected: &HashSet<String>) -> usize {
    let mut seen = HashSet::new();
    let mut last: HashMap<String, u64> = HashMap::new();
    let mut dups = 0;
    for ce in received {
        let id = ce["id"].as_str().expect("an id").to_owned();
        if !seen.insert(id.clone()) {
            dups += 1;
            continue;
        }
        let stream = ce["subject"].as_str().unwrap().to_owned();
        let seq = ce["streamsequence"].as_u64().unwrap();
        let prev = last.insert(stream.clone(), seq).unwrap_or(0);
        assert!(
            seq > prev,
            "stream {stream}: {id} (streamsequence {seq}) after {prev}: out of order"
        );
    }
    let missing: Vec<_> = expected.difference(&seen).take(5).collect();
    assert!(
        missing.is_empty(),
        "{} of {} ids missing, e.g. {missing:?}",
        expected.difference(&seen).count(),
        expected.len()
    );
    dups
}

/// `plantrelay run -c <config>`, quiet.
pub fn spawn(config: &std::path::Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_plantrelay"))
        .args(["run", "-c"])
        .arg(config)
        .env("PLANTRELAY_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}
