//! The reconnect delay the connection-holding sources (MQTT, OPC UA) share:
//! jittered, doubling, capped, reset once a connection has proved stable.
//! Plain data: it never sleeps or touches a socket itself.

use std::time::Duration;

use rand::Rng;

/// First reconnect delay (before jitter).
pub const BACKOFF_INITIAL: Duration = Duration::from_millis(100);
/// Longest reconnect delay (before jitter).
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A connection that lasted this long resets the reconnect delay.
pub const STABLE_AFTER: Duration = Duration::from_secs(10);

/// Jittered exponential reconnect delay.
///
/// Unlike the sinks' `RetryBackoff`: never below half a step, fixed steps, no `Retry-After`.
pub(crate) struct ReconnectBackoff {
    next: Duration,
}

impl ReconnectBackoff {
    pub(crate) fn new() -> ReconnectBackoff {
        ReconnectBackoff {
            next: BACKOFF_INITIAL,
        }
    }

    pub(crate) fn reset(&mut self) {
        self.next = BACKOFF_INITIAL;
    }

    /// The delay to wait now: between half and all of the current step.
    pub(crate) fn delay(&mut self) -> Duration {
        let step = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        step.mul_f64(rand::rng().random_range(0.5..=1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_is_capped() {
        let mut b = ReconnectBackoff::new();
        let first = b.delay();
        assert!(first >= BACKOFF_INITIAL / 2 && first <= BACKOFF_INITIAL);
        for _ in 0..20 {
            let d = b.delay();
            assert!(d <= BACKOFF_MAX, "{d:?}");
        }
        assert!(b.delay() >= BACKOFF_MAX / 2);
        b.reset();
        assert!(b.delay() <= BACKOFF_INITIAL);
    }
}
