//! The wire contract of a batch (see the receiver's module docs): its
//! content type, its content encoding (gzip, zstd, identity) within
//! [`MAX_BODY_BYTES`], and the CloudEvents it must hold. Pure functions over
//! headers and bytes that answer a [`Rejection`]; they must never panic on
//! any input.

use std::io::Read;

use axum::http::{HeaderMap, StatusCode, header};
use serde::Deserialize;

use super::{BATCH_CONTENT_TYPE, MAX_BODY_BYTES};

/// One CloudEvent as the wire carries it.
#[derive(Deserialize)]
pub(super) struct WireEvent {
    pub(super) specversion: String,
    pub(super) id: String,
    pub(super) source: String,
    #[serde(rename = "type")]
    pub(super) event_type: String,
    #[serde(default)]
    pub(super) subject: Option<String>,
    #[serde(default)]
    pub(super) time: Option<String>,
    #[serde(default)]
    pub(super) sequence: Option<u64>,
    #[serde(default)]
    pub(super) streamsequence: Option<u64>,
    /// Kept as text: building a JSON tree of every event's data is most of
    /// a receiver's CPU, and only recording receivers need it.
    #[serde(default)]
    pub(super) data: Option<Box<serde_json::value::RawValue>>,
}

pub(super) type Rejection = (StatusCode, &'static str, String);

pub(super) fn check_content_type(headers: &HeaderMap) -> Result<(), Rejection> {
    let value = headers
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap_or("<not text>"));
    let essence = value
        .and_then(|v| v.split(';').next())
        .map(str::trim)
        .unwrap_or("");
    if essence.eq_ignore_ascii_case(BATCH_CONTENT_TYPE) {
        Ok(())
    } else {
        Err((
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported media type",
            format!(
                "Content-Type must be {BATCH_CONTENT_TYPE}, got {}",
                value.unwrap_or("none")
            ),
        ))
    }
}

pub(super) fn decode_body(
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(Vec<u8>, &'static str), Rejection> {
    let encoding = headers.get(header::CONTENT_ENCODING).map(|v| {
        v.to_str()
            .unwrap_or("<not text>")
            .trim()
            .to_ascii_lowercase()
    });
    let limit = MAX_BODY_BYTES as u64 + 1;
    let mut out = Vec::new();
    let (result, name) = match encoding.as_deref() {
        None | Some("") | Some("identity") => return Ok((body.to_vec(), "identity")),
        Some("gzip") | Some("x-gzip") => (
            flate2::read::MultiGzDecoder::new(body)
                .take(limit)
                .read_to_end(&mut out)
                .map(drop)
                .map_err(|e| e.to_string()),
            "gzip",
        ),
        Some("zstd") => (zstd_decode(body, &mut out, limit), "zstd"),
        Some(other) => {
            return Err((
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported content encoding",
                format!("Content-Encoding must be gzip, zstd or identity, got {other}"),
            ));
        }
    };
    if let Err(e) = result {
        return Err((
            StatusCode::BAD_REQUEST,
            "undecodable body",
            format!("the {name} body does not decode: {e}"),
        ));
    }
    if out.len() > MAX_BODY_BYTES {
        return Err((
            StatusCode::PAYLOAD_TOO_LARGE,
            "body too large",
            format!("the decoded body exceeds {MAX_BODY_BYTES} bytes"),
        ));
    }
    Ok((out, name))
}

/// Decodes every zstd frame of `body` (encoders may write several) into
/// `out`, up to `limit` bytes, checking content checksums where present.
fn zstd_decode(body: &[u8], out: &mut Vec<u8>, limit: u64) -> Result<(), String> {
    let mut src = body;
    let mut frame = 0;
    while !src.is_empty() {
        let mut decoder = ruzstd::decoding::StreamingDecoder::new(&mut src)
            .map_err(|e| format!("frame {frame}: {e}"))?;
        let room = limit.saturating_sub(out.len() as u64);
        (&mut decoder)
            .take(room)
            .read_to_end(out)
            .map_err(|e| format!("frame {frame}: {e}"))?;
        if out.len() as u64 >= limit {
            // The caller answers 413.
            return Ok(());
        }
        let d = &decoder.decoder;
        if let (Some(sent), Some(computed)) =
            (d.get_checksum_from_data(), d.get_calculated_checksum())
            && sent != computed
        {
            return Err(format!("frame {frame}: content checksum mismatch"));
        }
        frame += 1;
    }
    Ok(())
}

pub(super) fn parse_batch(body: &[u8]) -> Result<Vec<WireEvent>, Rejection> {
    let bad = |reason: String| (StatusCode::BAD_REQUEST, "malformed batch", reason);
    // Tracking the path costs on every field: only a body that fails to
    // parse is parsed again with it, for the message.
    let events: Vec<WireEvent> = match serde_json::from_slice(body) {
        Ok(events) => events,
        Err(_) => {
            let mut de = serde_json::Deserializer::from_slice(body);
            let events: Vec<WireEvent> =
                serde_path_to_error::deserialize(&mut de).map_err(|e| {
                    let path = e.path().to_string();
                    let inner = e.into_inner();
                    if path == "." {
                        bad(format!(
                            "the body must be a JSON array of CloudEvents: {inner}"
                        ))
                    } else {
                        bad(format!("event {path}: {inner}"))
                    }
                })?;
            de.end()
                .map_err(|e| bad(format!("trailing data after the JSON array: {e}")))?;
            events
        }
    };
    for (i, e) in events.iter().enumerate() {
        if e.specversion != "1.0" {
            return Err(bad(format!(
                "event [{i}]: specversion must be \"1.0\", got {:?}",
                e.specversion
            )));
        }
        for (name, value) in [
            ("id", &e.id),
            ("source", &e.source),
            ("type", &e.event_type),
        ] {
            if value.is_empty() {
                return Err(bad(format!("event [{i}]: \"{name}\" must not be empty")));
            }
        }
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn batch_parsing_names_the_event_and_field() {
        let (status, _, reason) = parse_batch(br#"{"id":"x"}"#).err().unwrap();
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(reason.contains("JSON array"), "{reason}");
        let body = br#"[{"specversion":"1.0","id":"a","source":"s","type":"t"},
                        {"specversion":"1.0","source":"s","type":"t"}]"#;
        let (_, _, reason) = parse_batch(body).err().unwrap();
        assert!(reason.contains("[1]") && reason.contains("id"), "{reason}");
        let body = br#"[{"specversion":"0.3","id":"a","source":"s","type":"t"}]"#;
        let (_, _, reason) = parse_batch(body).err().unwrap();
        assert!(reason.contains("specversion"), "{reason}");
        let body =
            br#"[{"specversion":"1.0","id":"a","source":"s","type":"t","streamsequence":"x"}]"#;
        let (_, _, reason) = parse_batch(body).err().unwrap();
        assert!(reason.contains("streamsequence"), "{reason}");
        let body = br#"[{"specversion":"1.0","id":"a","source":"s","type":"t","sequence":3,"data":{"q":1}}]"#;
        let events = parse_batch(body).unwrap();
        assert_eq!(events[0].sequence, Some(3));
        assert_eq!(events[0].data.as_ref().map(|d| d.get()), Some(r#"{"q":1}"#));
    }

    #[test]
    fn zstd_bodies_decode_and_garbage_is_rejected() {
        let text = br#"[{"specversion":"1.0","id":"a","source":"s","type":"t"}]"#.repeat(50);
        let compressed = ruzstd::encoding::compress_to_vec(
            &text[..],
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("zstd"));
        let (out, name) = decode_body(&headers, &compressed).unwrap();
        assert_eq!((out.as_slice(), name), (&text[..], "zstd"));
        let (status, _, _) = decode_body(&headers, b"not zstd").err().unwrap();
        assert_eq!(status, StatusCode::BAD_REQUEST);
        headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("br"));
        let (status, _, reason) = decode_body(&headers, b"x").err().unwrap();
        assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert!(reason.contains("br"), "{reason}");
    }

    /// `zstd --check` output of two frames: the batch split in the middle.
    const TWO_ZSTD_FRAMES: [u8; 82] = [
        0x28, 0xb5, 0x2f, 0xfd, 0x04, 0x58, 0xf9, 0x00, 0x00, 0x5b, 0x7b, 0x22, 0x73, 0x70, 0x65,
        0x63, 0x76, 0x65, 0x72, 0x73, 0x69, 0x6f, 0x6e, 0x22, 0x3a, 0x22, 0x31, 0x2e, 0x30, 0x22,
        0x2c, 0x22, 0x69, 0x64, 0x22, 0x3a, 0x22, 0x61, 0x22, 0x2c, 0x23, 0x44, 0x4a, 0x11, 0x28,
        0xb5, 0x2f, 0xfd, 0x04, 0x58, 0xc9, 0x00, 0x00, 0x22, 0x73, 0x6f, 0x75, 0x72, 0x63, 0x65,
        0x22, 0x3a, 0x22, 0x73, 0x22, 0x2c, 0x22, 0x74, 0x79, 0x70, 0x65, 0x22, 0x3a, 0x22, 0x74,
        0x22, 0x7d, 0x5d, 0xd6, 0xb3, 0xe6, 0x76,
    ];

    #[test]
    fn zstd_bodies_of_several_frames_decode_and_checksums_are_checked() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("zstd"));
        let (out, _) = decode_body(&headers, &TWO_ZSTD_FRAMES).unwrap();
        assert_eq!(
            out,
            br#"[{"specversion":"1.0","id":"a","source":"s","type":"t"}]"#
        );
        let mut corrupt = TWO_ZSTD_FRAMES;
        corrupt[81] ^= 0xff; // last byte of the second frame's checksum
        let (status, _, reason) = decode_body(&headers, &corrupt).err().unwrap();
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            reason.contains("frame 1") && reason.contains("checksum"),
            "{reason}"
        );
    }

    #[test]
    fn oversized_decoded_bodies_are_413() {
        // 65 MiB of zeros compress to almost nothing: a zip bomb in miniature.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &vec![0u8; MAX_BODY_BYTES + 1024]).unwrap();
        let body = gz.finish().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        let (status, _, _) = decode_body(&headers, &body).err().unwrap();
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    }
}
