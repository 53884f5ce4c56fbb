//! Warnings rate-limited per kind: a client or a publisher that sends the
//! same fault a thousand times a second, or a fault of the disk that lasts
//! for hours, gets one `warn` line a minute (with the count of the ones in
//! between), not a flood that fills the disk and hides everything else.
//! The rest are logged at `debug`.
//!
//! It only decides whether a line is a warning; it never drops, counts or
//! answers anything itself.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often the same kind of problem is logged at `warn`.
pub(crate) const WARN_EVERY: Duration = Duration::from_secs(60);

/// Logs a kind of problem at `warn` at most once per [`WARN_EVERY`], with
/// the number of that kind suppressed in between.
#[derive(Default)]
pub(crate) struct WarnLimiter {
    last: Mutex<HashMap<&'static str, (Instant, u64)>>,
}

impl WarnLimiter {
    /// `Some(suppressed since the last warning)` when this one should be a
    /// warning, `None` when it goes to `debug`.
    pub(crate) fn check(&self, kind: &'static str) -> Option<u64> {
        // A poisoned lock only means a panic elsewhere held it; the map is
        // still a valid map.
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        match last.get_mut(kind) {
            Some((at, suppressed)) if now.duration_since(*at) < WARN_EVERY => {
                *suppressed += 1;
                None
            }
            Some((at, suppressed)) => {
                let n = *suppressed;
                *at = now;
                *suppressed = 0;
                Some(n)
            }
            None => {
                last.insert(kind, (now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_of_a_kind_warns_and_the_next_ones_within_a_minute_do_not() {
        let w = WarnLimiter::default();
        assert_eq!(w.check("a"), Some(0));
        assert_eq!(w.check("a"), None);
        assert_eq!(w.check("a"), None);
        assert_eq!(w.check("b"), Some(0), "kinds are limited apart");
    }
}
