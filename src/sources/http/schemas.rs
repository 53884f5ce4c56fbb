//! Checking the `data` of a request's events against the JSON Schema of
//! their type, before the commit (`422` listing every failing event).
//!
//! It owns what a schema failure answers and how it is counted per type in
//! the source status. It must never let part of a request through: one
//! failing event rejects the whole request, and nothing of it is stored.
//! The list in the answer is bounded; the count of failing events is not.

use std::collections::HashMap;

use axum::http::StatusCode;
use serde_json::value::RawValue;

use super::Ingest;
use super::answer::Reject;
use crate::event::NewEvent;
use crate::schema;
use crate::status::NO_SCHEMA;
use crate::text::{QUOTE_MAX, escape_control};

/// Most problems listed in one `422` answer.
const MAX_SCHEMA_ERRORS: usize = 100;

impl Ingest {
    /// Every event's `data` against its type's schema: `Err` is a `422`
    /// listing every failing event (bounded), and nothing is stored.
    pub(super) fn check_schemas(&self, events: &[NewEvent]) -> Result<(), Reject> {
        if self.schemas.is_empty() && !self.require_schema {
            return Ok(());
        }
        let mut errors = Vec::new();
        let mut failing = 0usize;
        let mut per_type: HashMap<&str, u64> = HashMap::new();
        for (index, e) in events.iter().enumerate() {
            let violations = match self.schemas.get(&e.event_type) {
                Some(_) if e.data.as_slice() == b"null" && carries_data_base64(e) => {
                    vec![schema::Violation {
                        pointer: String::new(),
                        message: "the event carries data_base64 (bytes); its type's schema \
                                  applies to JSON data"
                            .into(),
                    }]
                }
                // The answer's list is full: count, do not describe.
                Some(schema) if errors.len() == MAX_SCHEMA_ERRORS => {
                    if schema.passes(&e.data) {
                        continue;
                    }
                    Vec::new()
                }
                Some(schema) => match schema.check(&e.data) {
                    Ok(()) => continue,
                    Err(v) => v,
                },
                None if self.require_schema => vec![schema::Violation {
                    pointer: String::new(),
                    message: format!(
                        "type \"{}\" has no schema, and this source requires one \
                         (require_schema)",
                        escape_control(&e.event_type, QUOTE_MAX)
                    ),
                }],
                None => continue,
            };
            failing += 1;
            let label = if self.schemas.get(&e.event_type).is_some() {
                e.event_type.as_str()
            } else {
                NO_SCHEMA
            };
            *per_type.entry(label).or_default() += 1;
            for v in violations {
                if errors.len() == MAX_SCHEMA_ERRORS {
                    break;
                }
                errors.push(serde_json::json!({
                    "index": index,
                    "id": escape_control(&e.id, QUOTE_MAX),
                    "pointer": v.pointer,
                    "message": v.message,
                }));
            }
        }
        if failing == 0 {
            return Ok(());
        }
        for (event_type, n) in per_type {
            self.status.record_schema_rejects(event_type, n);
        }
        let first = errors.first().and_then(|e| e["index"].as_u64());
        let mut message = format!(
            "{failing} of {} events fail their schema; nothing was stored",
            events.len()
        );
        if errors.len() == MAX_SCHEMA_ERRORS {
            message.push_str(&format!(
                " (the first {MAX_SCHEMA_ERRORS} problems are listed)"
            ));
        }
        Err(Reject {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            kind: "schema validation failed",
            message,
            index: first.and_then(|i| usize::try_from(i).ok()),
            errors: Some(serde_json::Value::Array(errors)),
        })
    }
}

/// Whether a parsed event carried `data_base64` (kept in its attributes).
fn carries_data_base64(e: &NewEvent) -> bool {
    e.attrs.as_deref().is_some_and(|a| {
        serde_json::from_str::<HashMap<&str, &RawValue>>(a)
            .is_ok_and(|m| m.contains_key("data_base64"))
    })
}
