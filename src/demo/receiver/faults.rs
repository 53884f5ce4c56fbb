//! The receiver's fault injection: failing statuses, latency, resets and
//! rejected ids set on the [`super::Receiver`], and scripted answers. Plain
//! settings; the handler applies them, and they must never touch what was
//! recorded.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;

#[derive(Debug, Clone, Copy)]
pub(super) struct FailFault {
    pub(super) status: StatusCode,
    pub(super) retry_after: Option<u64>,
    pub(super) probability: f64,
}

#[derive(Debug, Clone, Default)]
pub(super) struct Faults {
    pub(super) fail: Option<FailFault>,
    pub(super) latency: Duration,
    pub(super) reset_probability: f64,
    pub(super) rejected: Arc<HashSet<String>>,
}

/// One scripted answer (see [`Receiver::script`](super::Receiver::script)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scripted {
    /// Answer this status (with `Retry-After: <secs>` if given), accepting
    /// nothing.
    Status {
        status: u16,
        retry_after: Option<u64>,
    },
    /// Refuse the batch: `Some(i)` answers 422 naming the id of its `i`-th
    /// event, `None` answers 400 naming no event.
    Reject(Option<usize>),
    /// Wait this long, then handle the batch as usual (a client with a
    /// shorter timeout has given up by then; what it sent is accepted all
    /// the same, as a slow upstream would).
    Delay(Duration),
}

pub(super) fn roll(probability: f64) -> bool {
    if probability >= 1.0 {
        true
    } else if probability > 0.0 {
        rand::random::<f64>() < probability
    } else {
        false // includes NaN
    }
}
