//! Config text -> `Config::parse` (TOML syntax, deserialisation, path
//! resolution, validation, and the file:line:col of every issue).
#![no_main]

use libfuzzer_sys::fuzz_target;
use plantrelay::fuzzing;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match fuzzing::config(text) {
        Ok(config) => {
            assert!(!config.source_names().is_empty() || !config.sink_names().is_empty());
            let _ = format!("{config:?}");
        }
        Err(e) => {
            // The message an operator reads: it must render, and name a place.
            let message = e.to_string();
            assert!(!message.is_empty());
            for issue in &e.issues {
                if let (Some(line), Some(column)) = (issue.line, issue.column) {
                    assert!(line >= 1 && column >= 1, "issue at {line}:{column}");
                    assert!(
                        line <= text.lines().count().max(1) + 1,
                        "line {line} past the end"
                    );
                }
            }
        }
    }
});
