//! The JetStream stream this sink publishes into: found by name or by the
//! subject, created only when `create_stream` says so, and checked to
//! capture the sink's subjects, with a warning when its duplicate window is
//! shorter than a retry may take. It must never change an existing stream.

use async_nats::jetstream;
use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::context::{GetStreamByNameErrorKind, GetStreamErrorKind};
use async_nats::jetstream::stream::{Config as StreamConfig, Info as StreamInfo, StorageType};
use tracing::{info, warn};

use super::connection::describe;
use super::{JetStreamSink, subject_matches};

/// The value of `{source}` and `{stream}` in the subject checked at connect.
pub(super) const PROBE: &str = "probe";
impl JetStreamSink {
    /// Finds (or creates) the stream and checks that it captures this
    /// sink's subjects.
    pub(super) async fn check_stream(&self, js: &jetstream::Context) -> Result<StreamInfo, String> {
        let probe = self.template.render(PROBE, PROBE);
        let on = &self.shown;
        let info = match &self.stream {
            Some(name) => match js.get_stream(name).await {
                Ok(s) => s.cached_info().clone(),
                Err(e)
                    if matches!(e.kind(), GetStreamErrorKind::JetStream(j)
                        if j.error_code() == ErrorCode::STREAM_NOT_FOUND) =>
                {
                    let capture = self.template.capture();
                    if !self.create_stream {
                        return Err(format!(
                            "JetStream stream '{name}' does not exist on {on}; create it (capturing subject {}) or set create_stream = true",
                            capture.as_deref().unwrap_or(&probe)
                        ));
                    }
                    let Some(capture) = capture else {
                        return Err(format!(
                            "JetStream stream '{name}' does not exist on {on}, and its subjects cannot be derived from the subject template `{}` (its first token varies); create the stream yourself",
                            self.template_text
                        ));
                    };
                    self.create(js, name, capture).await?
                }
                Err(e) => {
                    return Err(format!(
                        "cannot look up JetStream stream '{name}' on {on}: {} (is JetStream enabled on the server?)",
                        describe(&e)
                    ));
                }
            },
            None => match js.stream_by_subject(probe.clone()).await {
                Ok(name) => match js.get_stream(&name).await {
                    Ok(s) => s.cached_info().clone(),
                    Err(e) => {
                        return Err(format!(
                            "cannot look up JetStream stream '{name}' on {on}: {}",
                            describe(&e)
                        ));
                    }
                },
                Err(e) if e.kind() == GetStreamByNameErrorKind::NotFound => {
                    return Err(format!(
                        "no JetStream stream on {on} captures subject {probe} (from the subject template `{}`); create one, or set `stream` and create_stream = true",
                        self.template_text
                    ));
                }
                Err(e) => {
                    return Err(format!(
                        "cannot look up the JetStream stream for subject {probe} on {on}: {} (is JetStream enabled on the server?)",
                        describe(&e)
                    ));
                }
            },
        };
        let name = &info.config.name;
        if !info
            .config
            .subjects
            .iter()
            .any(|f| subject_matches(f, &probe))
        {
            return Err(format!(
                "JetStream stream '{name}' on {on} does not capture subject {probe} (from the subject template `{}`); its subjects are {:?}",
                self.template_text, info.config.subjects
            ));
        }
        let horizon = self.retry.max + self.timeout;
        if info.config.duplicate_window < horizon {
            warn!(
                sink = %self.name,
                stream = %name,
                duplicate_window = %humantime::format_duration(info.config.duplicate_window),
                needed = %humantime::format_duration(horizon),
                "the stream's duplicate window is shorter than retry_max + timeout: an event resent after a long retry may be stored twice"
            );
        }
        Ok(info)
    }

    async fn create(
        &self,
        js: &jetstream::Context,
        name: &str,
        capture: String,
    ) -> Result<StreamInfo, String> {
        let config = StreamConfig {
            name: name.to_string(),
            subjects: vec![capture.clone()],
            storage: StorageType::File,
            duplicate_window: self.duplicate_window,
            ..Default::default()
        };
        match js.create_stream(config).await {
            Ok(s) => {
                info!(
                    sink = %self.name,
                    stream = %name,
                    subjects = %capture,
                    duplicate_window = %humantime::format_duration(self.duplicate_window),
                    "created the JetStream stream (create_stream = true)"
                );
                Ok(s.cached_info().clone())
            }
            Err(e) => Err(format!(
                "cannot create JetStream stream '{name}' (capturing {capture}) on {}: {}",
                self.shown,
                describe(&e)
            )),
        }
    }
}
