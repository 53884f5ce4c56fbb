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
    assert!(reason.contains("too far in the past"), "{reason}");
    let reason = fuzzing::admin_since("100years").unwrap_err();
    assert!(reason.contains("too far in the past"), "{reason}");
    let reason = fuzzing::admin_replay(br#"{"since": "60y"}"#).unwrap_err();
    assert!(reason.contains("too far in the past"), "{reason}");
    // An age inside the epoch still works.
    assert!(fuzzing::admin_since("2h").is_ok());
}
