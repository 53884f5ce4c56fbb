//! Value parsers for the config file: durations (`"500ms"`, `"30s"`, `"24h"`),
//! sizes (`"2GiB"`, `"16 MiB"`, `"500KB"` or a bare integer of bytes), listen
//! addresses and URLs, as plain `parse_*` functions and as serde
//! `deserialize_with` helpers.
//!
//! The helpers raise their error from inside the value's own deserializer, so
//! the TOML span and the key path of a bad value stay exact.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserializer;
use serde::de::{self, Visitor};
use url::Url;

/// What the messages suggest when a duration is malformed.
const DURATION_EXAMPLES: &str = r#"a duration such as "500ms", "30s", "5m" or "24h""#;
/// What the messages suggest when a size is malformed.
const SIZE_EXAMPLES: &str =
    r#"a size such as "16MiB", "2GiB", "500KB" or an integer number of bytes"#;

/// The longest duration any key takes: 100 years (of 365.25 days).
///
/// humantime reads up to `u64::MAX` seconds, and `Instant + Duration`, the
/// sum of two durations and `Duration * n` panic on overflow; under 100
/// years, any time the daemon derives from a key (a deadline, a timeout
/// plus a retry cap, an interval times a count) stays far from it.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 31_557_600);

/// Parses a human-readable duration (`"500ms"`, `"30s"`, `"1h 30m"`), at
/// most [`MAX_DURATION`].
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text.trim())
        .map_err(|e| format!("invalid duration {text:?}: {e}; expected {DURATION_EXAMPLES}"))?;
    if d > MAX_DURATION {
        return Err(format!(
            "invalid duration {text:?}: longer than 100 years, the most any setting takes"
        ));
    }
    Ok(d)
}

/// Parses a size: an integer number of bytes, or a number with a unit
/// (`"16MiB"`, `"2 GiB"`, `"500KB"`, `"1.5GB"`; units are case-insensitive,
/// `KB`/`MB`/`GB` are powers of 1000 and `KiB`/`MiB`/`GiB` powers of 1024).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(format!("invalid size {text:?}: expected {SIZE_EXAMPLES}"));
    }
    match trimmed.parse::<bytesize::ByteSize>() {
        // ByteSize saturates on overflow; u64::MAX bytes is never meant literally.
        Ok(size) if size.as_u64() == u64::MAX && trimmed != u64::MAX.to_string() => {
            Err(format!("invalid size {text:?}: too large"))
        }
        Ok(size) => Ok(size.as_u64()),
        Err(_) => Err(format!("invalid size {text:?}: expected {SIZE_EXAMPLES}")),
    }
}

/// Parses a listen address: an IP address and a port (`"127.0.0.1:8081"`,
/// `"[::1]:8443"`). Host names are not accepted: a listener binds to an address.
pub fn parse_socket_addr(text: &str) -> Result<SocketAddr, String> {
    text.parse::<SocketAddr>().map_err(|_| {
        format!(
            r#"invalid listen address {text:?}: expected IP:port such as "127.0.0.1:8081" or "[::]:8443" (host names are not accepted)"#
        )
    })
}

/// Parses an absolute URL.
pub fn parse_url(text: &str) -> Result<Url, String> {
    Url::parse(text).map_err(|e| format!("invalid URL {text:?}: {e}"))
}

/// `deserialize_with` helper: a duration string; zero is allowed.
pub fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    d.deserialize_str(DurationVisitor { nonzero: false })
}

/// `deserialize_with` helper: a duration string that must not be zero
/// (timeouts, intervals).
pub fn duration_nonzero<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    d.deserialize_str(DurationVisitor { nonzero: true })
}

/// `deserialize_with` helper for an optional duration; use with `#[serde(default)]`.
pub fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

/// `deserialize_with` helper: a size string or a bare integer number of bytes.
pub fn size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    d.deserialize_any(SizeVisitor)
}

/// `deserialize_with` helper for an optional size; use with `#[serde(default)]`.
pub fn opt_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    size(d).map(Some)
}

/// `deserialize_with` helper: a listen address (`IP:port`).
pub fn socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    d.deserialize_str(StrVisitor {
        expecting: r#"a listen address such as "127.0.0.1:8081""#,
        parse: parse_socket_addr,
    })
}

/// `deserialize_with` helper: an absolute URL (the scheme is checked later,
/// per kind, by validation).
pub fn url<'de, D: Deserializer<'de>>(d: D) -> Result<Url, D::Error> {
    d.deserialize_str(StrVisitor {
        expecting: r#"a URL such as "https://ingest.example.com/v1/events""#,
        parse: parse_url,
    })
}

/// `deserialize_with` helper: one URL, or a non-empty list of them.
pub fn urls<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Url>, D::Error> {
    d.deserialize_any(UrlsVisitor)
}

struct UrlsVisitor;

impl<'de> Visitor<'de> for UrlsVisitor {
    type Value = Vec<Url>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(r#"a URL such as "nats://nats.example.com:4222", or a list of them"#)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<Url>, E> {
        parse_url(v).map(|u| vec![u]).map_err(E::custom)
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Url>, A::Error> {
        let mut out = Vec::new();
        while let Some(text) = seq.next_element::<String>()? {
            out.push(parse_url(&text).map_err(de::Error::custom)?);
        }
        if out.is_empty() {
            return Err(de::Error::custom("the list of URLs is empty"));
        }
        Ok(out)
    }
}

struct DurationVisitor {
    nonzero: bool,
}

impl Visitor<'_> for DurationVisitor {
    type Value = Duration;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(DURATION_EXAMPLES)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
        let d = parse_duration(v).map_err(E::custom)?;
        if self.nonzero && d.is_zero() {
            return Err(E::custom(format!(
                "invalid duration {v:?}: must be greater than zero"
            )));
        }
        Ok(d)
    }
}

struct SizeVisitor;

impl Visitor<'_> for SizeVisitor {
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(SIZE_EXAMPLES)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
        parse_size(v).map_err(E::custom)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
        Ok(v)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
        u64::try_from(v).map_err(|_| E::custom(format!("invalid size {v}: must not be negative")))
    }
}

struct StrVisitor<T> {
    expecting: &'static str,
    parse: fn(&str) -> Result<T, String>,
}

impl<T> Visitor<'_> for StrVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        (self.parse)(v).map_err(E::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_accept_humantime_strings() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5_400)));
    }

    #[test]
    fn durations_past_100_years_are_rejected() {
        assert_eq!(parse_duration("100years"), Ok(MAX_DURATION));
        let err = parse_duration("101years").unwrap_err();
        assert!(err.contains("\"101years\": longer than 100 years"), "{err}");
        // Past what an `Instant` can be moved by, and past `u64` seconds.
        assert!(parse_duration("300000000000y").is_err());
        assert!(parse_duration("18446744073709551615s").is_err());
    }

    #[test]
    fn durations_without_a_unit_are_rejected_with_an_example() {
        let err = parse_duration("30").unwrap_err();
        assert!(err.contains("\"30\""), "{err}");
        assert!(err.contains("30s"), "{err}");
    }

    #[test]
    fn sizes_accept_units_spaces_and_plain_bytes() {
        assert_eq!(parse_size("2GiB"), Ok(2 * 1024 * 1024 * 1024));
        assert_eq!(parse_size("16 MiB"), Ok(16 * 1024 * 1024));
        assert_eq!(parse_size("500KB"), Ok(500_000));
        assert_eq!(parse_size("4096"), Ok(4096));
    }

    #[test]
    fn sizes_reject_garbage_empty_and_overflow() {
        assert!(parse_size("lots").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("99999999999EiB").is_err());
    }

    #[test]
    fn listen_addresses_need_an_ip_and_a_port() {
        assert!(parse_socket_addr("127.0.0.1:8081").is_ok());
        assert!(parse_socket_addr("[::]:8443").is_ok());
        assert!(parse_socket_addr("localhost:8081").is_err());
        assert!(parse_socket_addr("127.0.0.1").is_err());
    }
}
