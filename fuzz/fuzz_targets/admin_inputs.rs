//! The admin API's inputs, chosen by the first byte: 0 a replay body
//! (`POST /api/v1/sinks/{name}/replay`), 1 a replay `since` value, 2 the
//! query of `GET /api/v1/dead-letters`. A parsed replay point is also
//! described as the audit line does.
#![no_main]

use libfuzzer_sys::fuzz_target;
use plantrelay::fuzzing;

fuzz_target!(|data: &[u8]| {
    let Some((selector, rest)) = data.split_first() else {
        return;
    };
    match selector % 3 {
        0 => {
            if let Err(reason) = fuzzing::admin_replay(rest) {
                assert!(!reason.is_empty());
            }
        }
        1 => {
            if let Ok(since) = std::str::from_utf8(rest) {
                let _ = fuzzing::admin_since(since);
            }
        }
        _ => {
            let query = String::from_utf8_lossy(rest);
            let _ = fuzzing::admin_dead_letter_query(&format!("/api/v1/dead-letters?{query}"));
        }
    }
});
