//! The NATS JetStream sink (being built).

use super::{ForwarderSettings, RetryPolicy, SendOutcome, Sink};
use crate::config::JetStreamSinkConfig;
use crate::event::StoredEvent;

/// Errors building the sink from its config; they name the sink.
#[derive(Debug, thiserror::Error)]
#[error("sinks.jetstream '{sink}': {detail}")]
pub struct JetStreamSinkError {
    pub sink: String,
    pub detail: String,
}

pub struct JetStreamSink {}

/// Most bytes of events read for one batch of a per-event sink.
pub const BATCH_MAX_BYTES: usize = 8 * 1024 * 1024;

impl JetStreamSink {
    pub fn new(
        _cfg: &JetStreamSinkConfig,
        _agent_id: &str,
    ) -> Result<JetStreamSink, JetStreamSinkError> {
        Ok(JetStreamSink {})
    }

    /// The forwarder settings of this sink's config.
    pub fn settings(cfg: &JetStreamSinkConfig) -> ForwarderSettings {
        ForwarderSettings {
            name: cfg.name.clone(),
            batch_max_events: cfg.batch_max_events,
            batch_max_bytes: BATCH_MAX_BYTES,
            max_events_per_sec: cfg.max_events_per_sec,
            batch_linger: cfg.batch_linger,
            retry: RetryPolicy {
                initial: cfg.retry_initial,
                max: cfg.retry_max,
            },
            lanes: crate::config::lanes(&cfg.classes, cfg.priority),
            streams: crate::route::StreamFilter::new(&cfg.streams),
        }
    }
}

impl Sink for JetStreamSink {
    type Encoded = ();

    fn encode(&self, _batch: &[StoredEvent]) {}

    async fn send(&self, _batch: &[StoredEvent], _encoded: ()) -> SendOutcome {
        SendOutcome::retry(None, "not built yet")
    }
}
