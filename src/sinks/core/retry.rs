//! When a forwarder tries again after a failure: capped exponential backoff
//! with full jitter, never sooner than the upstream's `Retry-After`. Plain
//! data with no clock of its own: the caller passes the jitter and does the
//! waiting; it must never sleep.

use std::time::Duration;

/// Retry timing of a forwarder.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub initial: Duration,
    pub max: Duration,
}

/// Capped exponential backoff with full jitter: the n-th consecutive failure
/// waits a uniform random time in [0, min(max, initial × 2^n)], but never
/// less than the upstream's `Retry-After` (itself capped at 10 × max).
///
/// Unlike the sources' `reconnect::ReconnectBackoff`: full jitter down to zero, and `Retry-After` obeyed.
#[derive(Debug, Clone)]
pub struct RetryBackoff {
    policy: RetryPolicy,
    failures: u32,
}

impl RetryBackoff {
    pub fn new(policy: RetryPolicy) -> RetryBackoff {
        RetryBackoff {
            policy,
            failures: 0,
        }
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// The ceiling of the next delay, before jitter.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.failures.min(30)).unwrap_or(u32::MAX);
        self.policy
            .initial
            .saturating_mul(factor)
            .min(self.policy.max)
    }

    /// Records a failure and returns how long to wait; `jitter` in [0, 1].
    pub fn fail(&mut self, retry_after: Option<Duration>, jitter: f64) -> Duration {
        let ceiling = self.ceiling();
        self.failures = self.failures.saturating_add(1);
        let jittered = ceiling.mul_f64(jitter.clamp(0.0, 1.0));
        match retry_after {
            Some(after) => jittered.max(after.min(self.policy.max.saturating_mul(10))),
            None => jittered,
        }
    }

    pub fn succeed(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_exponentially_to_its_cap_with_jitter() {
        let mut b = RetryBackoff::new(RetryPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
        });
        assert_eq!(b.fail(None, 1.0), Duration::from_millis(100));
        assert_eq!(b.fail(None, 1.0), Duration::from_millis(200));
        assert_eq!(b.fail(None, 0.5), Duration::from_millis(200));
        for _ in 0..40 {
            assert!(b.fail(None, 1.0) <= Duration::from_secs(2));
        }
        assert_eq!(
            b.fail(None, 0.0),
            Duration::ZERO,
            "full jitter reaches zero"
        );
        b.succeed();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
    }

    #[test]
    fn backoff_honours_retry_after_within_reason() {
        let mut b = RetryBackoff::new(RetryPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
        });
        assert_eq!(
            b.fail(Some(Duration::from_secs(3)), 0.1),
            Duration::from_secs(3)
        );
        assert_eq!(
            b.fail(Some(Duration::from_secs(3600)), 0.1),
            Duration::from_secs(10),
            "a silly Retry-After is capped at 10 × retry_max"
        );
    }
}
