//! Times and sizes, as every module stores and shows them: a wall-clock
//! time as µs since the Unix epoch, that time as RFC 3339, a byte count in
//! IEC units, a duration for a progress line, and the one reading of a
//! "since" time people type (replay, admin API).
//!
//! Pure functions, total on their whole input: a stored or received value
//! can never make one fail or panic. This module must never decide policy
//! or do I/O.

use std::time::{Duration, SystemTime};

/// The last µs humantime can format (9999-12-31T23:59:59.999999Z); past it
/// its `Display` fails, and `to_string` would panic.
const MAX_FORMATTABLE_US: i64 = 253_402_300_800 * 1_000_000 - 1;

/// `t` as µs since the Unix epoch; negative before it, saturating.
pub fn unix_micros(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_micros()).unwrap_or(i64::MAX),
    }
}

/// RFC 3339 with microseconds, UTC; clamped to 1970..=9999, so that no
/// stored or received value can make formatting fail.
pub fn rfc3339_us(us: i64) -> String {
    humantime::format_rfc3339_micros(formattable_us(us)).to_string()
}

/// `t` clamped to 1970..=9999, the times humantime can format: before
/// 1970 its formatter panics, past 9999 it fails and `to_string` panics.
/// For the wall clock too, which a gateway's administrator can set to any
/// time at all.
pub fn formattable(t: SystemTime) -> SystemTime {
    formattable_us(unix_micros(t))
}

/// `t` if humantime can format it (1970..=9999), else `None`: for a stored
/// value, where a time outside that range is damage rather than a clock
/// to clamp.
pub fn if_formattable(t: SystemTime) -> Option<SystemTime> {
    (0..=MAX_FORMATTABLE_US)
        .contains(&unix_micros(t))
        .then_some(t)
}

fn formattable_us(us: i64) -> SystemTime {
    let us = us.clamp(0, MAX_FORMATTABLE_US);
    // Clamped to 0.. above: the cast is exact.
    SystemTime::UNIX_EPOCH + Duration::from_micros(us as u64)
}

/// A byte count in IEC units (`1.5 GiB`).
pub fn fmt_bytes(n: u64) -> String {
    bytesize::ByteSize::b(n).display().iec().to_string()
}

/// A duration as people read it in a progress line.
pub fn short_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// [`short_duration`] of a number of seconds another process reported (a
/// gateway's status answer): negative reads as 0, and one past what a
/// `Duration` holds (`1e20`) as the longest, where `from_secs_f64` panics.
pub fn short_secs(secs: f64) -> String {
    short_duration(Duration::try_from_secs_f64(secs.max(0.0)).unwrap_or(Duration::MAX))
}

/// A replay start as people give it: an RFC 3339 time
/// (`2026-11-29T08:00:00Z`) or an age (`90m`, `2h`), checked to lie between
/// 1970-01-01T00:00:00Z and 9999-12-31T23:59:59Z, so that nothing downstream
/// has to convert or format a time outside what it can hold. A time after
/// every event is fine: nothing is delivered again. `field` names the input
/// in the reason (`since`, `--since`).
pub fn since_time(field: &str, s: &str) -> Result<SystemTime, String> {
    let range = "accepted: an RFC 3339 time from 1970-01-01T00:00:00Z to 9999-12-31T23:59:59Z, \
                 or an age (90m, 2h, 7days) that reaches back no further than 1970";
    let t = match humantime::parse_rfc3339_weak(s) {
        Ok(t) => t,
        Err(humantime::TimestampError::OutOfRange) => {
            return Err(format!("{field} {s:?}: out of range; {range}"));
        }
        Err(_) => match humantime::parse_duration(s) {
            Ok(d) => SystemTime::now()
                .checked_sub(d)
                .ok_or_else(|| format!("{field} {s:?}: too far in the past; {range}"))?,
            Err(_) => {
                return Err(format!(
                    "{field} {s:?}: expected an RFC 3339 time (2026-11-29T08:00:00Z) or an age (90m, 2h); {range}"
                ));
            }
        },
    };
    if t < SystemTime::UNIX_EPOCH {
        return Err(format!(
            "{field} {s:?}: before 1970-01-01T00:00:00Z; {range}"
        ));
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_reported_age_formats_without_panicking() {
        assert_eq!(short_secs(42.0), "42.0s");
        assert_eq!(short_secs(-3.0), "0.0s");
        assert_eq!(short_secs(f64::NAN), "0.0s");
        assert_eq!(short_secs(7_200.0), "2h00m");
        assert_eq!(short_secs(1e20), short_duration(Duration::MAX));
        assert_eq!(short_secs(f64::INFINITY), short_duration(Duration::MAX));
    }

    #[test]
    fn any_stored_time_formats_without_panicking() {
        assert_eq!(rfc3339_us(-5), "1970-01-01T00:00:00.000000Z");
        assert_eq!(rfc3339_us(i64::MAX), "9999-12-31T23:59:59.999999Z");
        assert_eq!(rfc3339_us(0), "1970-01-01T00:00:00.000000Z");
    }

    #[test]
    fn any_clock_formats_without_panicking() {
        let before = SystemTime::UNIX_EPOCH - Duration::from_secs(86_400);
        let after = SystemTime::UNIX_EPOCH + Duration::from_secs(400_000_000_000);
        let at = SystemTime::UNIX_EPOCH + Duration::from_micros(1_796_000_000_123_456);
        assert_eq!(
            humantime::format_rfc3339_seconds(formattable(before)).to_string(),
            "1970-01-01T00:00:00Z"
        );
        assert_eq!(
            humantime::format_rfc3339_millis(formattable(after)).to_string(),
            "9999-12-31T23:59:59.999Z"
        );
        assert_eq!(formattable(at), at);
        assert_eq!(if_formattable(at), Some(at));
        assert_eq!(if_formattable(before), None);
        assert_eq!(if_formattable(after), None);
        assert_eq!(if_formattable(formattable(after)), Some(formattable(after)));
    }

    #[test]
    fn times_before_the_epoch_are_negative_and_extremes_saturate() {
        let before = SystemTime::UNIX_EPOCH - Duration::from_micros(7);
        assert_eq!(unix_micros(before), -7);
        assert_eq!(unix_micros(SystemTime::UNIX_EPOCH), 0);
    }

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(short_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(short_duration(Duration::from_secs(61)), "1m01s");
        assert_eq!(short_duration(Duration::from_secs(3720)), "1h02m");
        assert_eq!(fmt_bytes(2 * 1024 * 1024), "2.0 MiB");
    }
}
