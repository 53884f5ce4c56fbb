//! How big a forwarder's batches are and how long a small one waits: the
//! settings every forwarder has, and the linger rule. Pure functions of the
//! settings and the batch in hand; they must never read a clock (the caller
//! passes the time).

use std::time::Duration;

use super::RetryPolicy;

pub use crate::config::DEFAULT_BATCH_LINGER;

/// How long a batch just read should wait for more events before it goes
/// out; `None`: send it now. `len` events of `bytes` bytes, the oldest
/// received at `oldest_recv_us`. A batch at `max_events`, or at half of
/// `max_bytes` or more (waiting could not double it), never waits, nor does
/// one whose oldest event is already `linger` old. The wait ends when the
/// oldest event is `linger` old, so a clock that steps back cannot stretch
/// it beyond `linger`.
pub fn linger(
    len: usize,
    bytes: usize,
    oldest_recv_us: i64,
    now_us: i64,
    settings: &ForwarderSettings,
) -> Option<Duration> {
    if settings.batch_linger.is_zero()
        || len >= settings.batch_max_events
        || bytes.saturating_mul(2) >= settings.batch_max_bytes
    {
        return None;
    }
    let age = Duration::from_micros(now_us.saturating_sub(oldest_recv_us).max(0) as u64);
    settings
        .batch_linger
        .checked_sub(age)
        .filter(|d| !d.is_zero())
}

/// Settings every forwarder has.
#[derive(Debug, Clone)]
pub struct ForwarderSettings {
    pub name: String,
    pub batch_max_events: usize,
    pub batch_max_bytes: usize,
    pub max_events_per_sec: u32,
    /// See [`linger`]; zero sends every batch at once.
    pub batch_linger: Duration,
    pub retry: RetryPolicy,
    /// One cursor each, in priority order: `[None]` for one lane over every
    /// class in journal order (see [`crate::config::lanes`]).
    pub lanes: Vec<Option<crate::event::Class>>,
    /// The streams it takes (`streams`).
    pub streams: crate::route::StreamFilter,
}

/// Most bytes of events read for one batch of a sink without
/// `batch_max_bytes` (one publish per event: MQTT, JetStream).
pub const PER_EVENT_BATCH_MAX_BYTES: usize = 8 * 1024 * 1024;

impl ForwarderSettings {
    /// The settings of any sink's config (see [`crate::config::Forwarding`]).
    pub fn of(cfg: &impl crate::config::SinkKeys) -> ForwarderSettings {
        let f = cfg.forwarding();
        ForwarderSettings {
            name: f.name.to_owned(),
            batch_max_events: f.batch_max_events,
            batch_max_bytes: f.batch_max_bytes.map_or(PER_EVENT_BATCH_MAX_BYTES, |b| {
                usize::try_from(b).unwrap_or(usize::MAX)
            }),
            max_events_per_sec: f.max_events_per_sec,
            batch_linger: f.batch_linger,
            retry: RetryPolicy {
                initial: f.retry_initial,
                max: f.retry_max,
            },
            lanes: crate::config::lanes(f.classes, f.priority),
            streams: crate::route::StreamFilter::new(f.streams),
        }
    }
}
