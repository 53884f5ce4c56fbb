//! `max_events_per_sec`: the token bucket that shortens or delays a batch
//! before it is sent. It is told the time and never reads a clock or sleeps
//! itself.

use std::time::{Duration, Instant};

/// Token bucket for `max_events_per_sec` (0 = unlimited); one second of
/// burst.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    per_sec: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    pub fn new(per_sec: u32, now: Instant) -> RateLimiter {
        RateLimiter {
            per_sec: per_sec as f64,
            tokens: per_sec as f64,
            last: now,
        }
    }

    /// How many of `want` events may go now (at least 1 once the bucket has
    /// a whole token), and how long to wait when none may.
    pub fn take(&mut self, want: usize, now: Instant) -> Result<usize, Duration> {
        if self.per_sec <= 0.0 {
            return Ok(want);
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.per_sec.max(1.0));
        if self.tokens < 1.0 {
            return Err(Duration::from_secs_f64((1.0 - self.tokens) / self.per_sec));
        }
        let n = (self.tokens.floor() as usize).min(want).max(1);
        self.tokens -= n as f64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limiter_caps_events_per_second() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(100, t0);
        assert_eq!(r.take(1000, t0), Ok(100), "one second of burst");
        let wait = r.take(10, t0).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(10));
        assert_eq!(r.take(1000, t0 + Duration::from_millis(500)), Ok(50));
        let mut unlimited = RateLimiter::new(0, t0);
        assert_eq!(unlimited.take(5000, t0), Ok(5000));
    }
}
