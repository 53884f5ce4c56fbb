//! JSON Schemas for event `data`, by CloudEvents `type` (`[[schemas]]`):
//! compiled once at start, then applied by the sources before an event is
//! acknowledged, so a malformed MES posting is refused while the operator
//! who sent it is still there, not by ERP hours later.
//!
//! This module owns loading (drafts 7, 2019-09 and 2020-12; `$ref`s to local
//! files only, never fetched over a network) and checking one event's data.
//! It must never decide what becomes of a failing event: HTTP ingest refuses
//! the request, an MQTT source applies its `on_invalid`.
//!
//! Messages never quote the data itself (they say "value" where the
//! validator would print it), so a failing payload cannot flood an answer,
//! a log line or the status page.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use jsonschema::{Draft, Retrieve, Uri, Validator};
use serde_json::Value;

use self::instance::{Borrowed, Data};

mod instance;

use crate::config::SchemaConfig;
use crate::text::escape_control;

/// Largest schema file read (a schema or a file one `$ref`s).
const MAX_SCHEMA_FILE: u64 = 4 * 1024 * 1024;
/// Most violations reported per event: the first ones say what to fix.
pub const MAX_VIOLATIONS_PER_EVENT: usize = 10;
/// Longest message of one violation, in bytes.
const MAX_MESSAGE: usize = 300;

/// A schema that cannot be used: the file, where in it, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaError {
    pub file: PathBuf,
    /// JSON pointer into the schema document ("" when it concerns the whole).
    pub pointer: String,
    pub message: String,
}

impl fmt::Display for SchemaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.pointer.is_empty() {
            write!(f, "schema {}: {}", self.file.display(), self.message)
        } else {
            write!(
                f,
                "schema {} at {}: {}",
                self.file.display(),
                self.pointer,
                self.message
            )
        }
    }
}

impl std::error::Error for SchemaError {}

/// One way an event's data fails its schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// JSON pointer into the event's `data` ("" for the whole of it).
    pub pointer: String,
    pub message: String,
}

/// One compiled schema.
pub struct Schema {
    file: PathBuf,
    validator: Validator<Borrowed>,
}

impl fmt::Debug for Schema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Schema").field("file", &self.file).finish()
    }
}

impl Schema {
    /// Reads and compiles the schema in `file`.
    pub fn load(file: &Path) -> Result<Schema, SchemaError> {
        let fail = |pointer: String, message: String| SchemaError {
            file: file.to_path_buf(),
            pointer,
            message,
        };
        let doc = read_json(file).map_err(|m| fail(String::new(), m))?;
        let draft = match doc.get("$schema") {
            None => Draft::Draft202012,
            Some(Value::String(uri)) => draft_of(uri).ok_or_else(|| {
                fail(
                    "/$schema".into(),
                    format!(
                        "\"{}\" is not a supported dialect; use draft 7, 2019-09 or 2020-12 \
                         (e.g. \"https://json-schema.org/draft/2020-12/schema\")",
                        escape_control(uri, 120)
                    ),
                )
            })?,
            Some(_) => return Err(fail("/$schema".into(), "must be a string".into())),
        };
        let base = url::Url::from_file_path(file).map_err(|()| {
            fail(
                String::new(),
                "the schema's path is not absolute; it is resolved against the config file".into(),
            )
        })?;
        let validator = jsonschema::options_for::<Borrowed>()
            .with_draft(draft)
            .with_base_uri(base.as_str())
            .with_retriever(LocalFiles)
            .should_validate_formats(true)
            .build(&doc)
            .map_err(|e| {
                fail(
                    e.instance_path().as_str().to_owned(),
                    escape_control(&e.to_string(), MAX_MESSAGE).into_owned(),
                )
            })?;
        Ok(Schema {
            file: file.to_path_buf(),
            validator,
        })
    }

    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Whether `data` (JSON text) matches, without building any report:
    /// for the events past what an answer lists.
    pub fn passes(&self, data: &[u8]) -> bool {
        Data::parse(data).is_ok_and(|v| self.validator.is_valid(&v))
    }

    /// Checks `data` (JSON text). At most [`MAX_VIOLATIONS_PER_EVENT`] are
    /// returned, each message bounded and without the data's values.
    pub fn check(&self, data: &[u8]) -> Result<(), Vec<Violation>> {
        let value = match Data::parse(data) {
            Ok(v) => v,
            Err(e) => {
                return Err(vec![Violation {
                    pointer: String::new(),
                    message: format!("data is not JSON: {e}"),
                }]);
            }
        };
        if self.validator.is_valid(&value) {
            return Ok(());
        }
        let violations: Vec<Violation> = self
            .validator
            .iter_errors(&value)
            .take(MAX_VIOLATIONS_PER_EVENT)
            .map(|e| Violation {
                pointer: e.instance_path().as_str().to_owned(),
                message: escape_control(&e.masked().to_string(), MAX_MESSAGE).into_owned(),
            })
            .collect();
        if violations.is_empty() {
            // `is_valid` and `iter_errors` disagreeing would be a validator
            // bug; refuse rather than let the event pass unchecked.
            return Err(vec![Violation {
                pointer: String::new(),
                message: "does not match its schema".into(),
            }]);
        }
        Err(violations)
    }
}

/// Every configured schema, by the CloudEvents type it governs.
#[derive(Debug, Default, Clone)]
pub struct Schemas {
    by_type: HashMap<String, Arc<Schema>>,
}

impl Schemas {
    /// Compiles every `[[schemas]]` entry; the first that fails is the error.
    pub fn load(configs: &[SchemaConfig]) -> Result<Schemas, SchemaError> {
        let mut by_type = HashMap::with_capacity(configs.len());
        for c in configs {
            by_type.insert(c.event_type.clone(), Arc::new(Schema::load(&c.file)?));
        }
        Ok(Schemas { by_type })
    }

    pub fn get(&self, event_type: &str) -> Option<&Schema> {
        self.by_type.get(event_type).map(|s| &**s)
    }

    /// The schema of `event_type`, to be kept by a source.
    pub fn get_shared(&self, event_type: &str) -> Option<Arc<Schema>> {
        self.by_type.get(event_type).cloned()
    }

    pub fn is_empty(&self) -> bool {
        self.by_type.is_empty()
    }
}

/// The draft a `$schema` URI names, if it is one plantrelay accepts.
fn draft_of(uri: &str) -> Option<Draft> {
    let uri = uri.trim_end_matches('#');
    let uri = uri
        .strip_prefix("https://")
        .or_else(|| uri.strip_prefix("http://"))?;
    match uri {
        "json-schema.org/draft-07/schema" => Some(Draft::Draft7),
        "json-schema.org/draft/2019-09/schema" => Some(Draft::Draft201909),
        "json-schema.org/draft/2020-12/schema" => Some(Draft::Draft202012),
        _ => None,
    }
}

fn read_json(file: &Path) -> Result<Value, String> {
    let meta = std::fs::metadata(file).map_err(|e| format!("cannot read it: {e}"))?;
    if meta.len() > MAX_SCHEMA_FILE {
        return Err(format!(
            "{} bytes; a schema file may have at most {MAX_SCHEMA_FILE}",
            meta.len()
        ));
    }
    let text = std::fs::read(file).map_err(|e| format!("cannot read it: {e}"))?;
    serde_json::from_slice(&text).map_err(|e| format!("not JSON: {e}"))
}

/// Resolves `$ref`s to local files (relative to the referring schema, or
/// `file:` URIs); anything else is refused, never fetched: a gateway must
/// not depend on a web server to validate what a machine sends it.
struct LocalFiles;

impl Retrieve for LocalFiles {
    fn retrieve(
        &self,
        uri: &Uri<String>,
    ) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
        if uri.scheme().as_str() != "file" {
            return Err(format!(
                "$ref to {uri} is not fetched: plantrelay resolves references to local \
                 schema files only (a path relative to the schema, or a file: URI)"
            )
            .into());
        }
        let path = url::Url::parse(uri.as_str())
            .ok()
            .and_then(|u| u.to_file_path().ok())
            .ok_or_else(|| format!("$ref {uri} is not a local file path"))?;
        read_json(&path)
            .map_err(|m| format!("$ref {}: {m}", path.display()))
            .map_err(Into::into)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn violations_name_the_pointer_and_never_quote_the_data() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(
            dir.path(),
            "s.json",
            r#"{"$schema":"https://json-schema.org/draft/2020-12/schema",
                "type":"object","required":["order"],
                "properties":{"order":{"type":"string","maxLength":4},
                              "qty":{"type":"number","minimum":0},
                              "at":{"type":"string","format":"date-time"}}}"#,
        );
        let s = Schema::load(&f).unwrap();
        assert_eq!(s.check(br#"{"order":"1234","qty":1}"#), Ok(()));
        let v = s
            .check(br#"{"order":"SECRET-LONG","qty":-1,"at":"yesterday"}"#)
            .unwrap_err();
        let mut pointers: Vec<&str> = v.iter().map(|v| v.pointer.as_str()).collect();
        pointers.sort();
        assert_eq!(pointers, ["/at", "/order", "/qty"]);
        assert!(v.iter().all(|v| !v.message.contains("SECRET")), "{v:?}");
        let v = s.check(br#"{"qty":-1}"#).unwrap_err();
        let messages: Vec<&str> = v.iter().map(|v| v.message.as_str()).collect();
        assert!(
            messages.contains(&"\"order\" is a required property"),
            "{messages:?}"
        );
        assert!(
            messages.contains(&"value is less than the minimum of 0"),
            "{messages:?}"
        );
        let v = s.check(b"[1]").unwrap_err();
        assert_eq!(v[0].pointer, "");
        let v = s.check(b"{").unwrap_err();
        assert!(v[0].message.starts_with("data is not JSON"), "{v:?}");
    }

    #[test]
    fn drafts_7_2019_and_2020_load_and_others_are_refused_at_their_pointer() {
        let dir = tempfile::tempdir().unwrap();
        for uri in [
            "http://json-schema.org/draft-07/schema#",
            "https://json-schema.org/draft/2019-09/schema",
            "https://json-schema.org/draft/2020-12/schema",
        ] {
            let f = write(
                dir.path(),
                "d.json",
                &format!(r#"{{"$schema":"{uri}","type":"object"}}"#),
            );
            Schema::load(&f).unwrap();
        }
        let f = write(
            dir.path(),
            "d4.json",
            r#"{"$schema":"http://json-schema.org/draft-04/schema#"}"#,
        );
        let e = Schema::load(&f).unwrap_err();
        assert_eq!(e.pointer, "/$schema");
        assert!(e.message.contains("draft 7, 2019-09 or 2020-12"), "{e}");
    }

    #[test]
    fn a_broken_schema_is_reported_with_its_file_and_pointer() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(
            dir.path(),
            "broken.json",
            r#"{"type":"object","properties":{"qty":{"type":"number","minimum":"zero"}}}"#,
        );
        let e = Schema::load(&f).unwrap_err();
        assert_eq!(e.file, f);
        assert_eq!(e.pointer, "/properties/qty/minimum", "{e}");
        let f = write(dir.path(), "notjson.json", "{");
        let e = Schema::load(&f).unwrap_err();
        assert!(e.message.starts_with("not JSON"), "{e}");
    }

    #[test]
    fn refs_resolve_to_local_files_and_never_to_the_network() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "qty.json",
            r#"{"type":"object","required":["value"],"properties":{"value":{"type":"number"}}}"#,
        );
        let f = write(
            dir.path(),
            "main.json",
            r#"{"type":"object","properties":{"yield":{"$ref":"qty.json"}}}"#,
        );
        let s = Schema::load(&f).unwrap();
        assert_eq!(s.check(br#"{"yield":{"value":3}}"#), Ok(()));
        let v = s.check(br#"{"yield":{}}"#).unwrap_err();
        assert_eq!(v[0].pointer, "/yield");
        let f = write(
            dir.path(),
            "remote.json",
            r#"{"properties":{"x":{"$ref":"https://127.0.0.1:9/x.json"}}}"#,
        );
        let e = Schema::load(&f).unwrap_err();
        assert!(e.message.contains("local schema files only"), "{e}");
    }
}
