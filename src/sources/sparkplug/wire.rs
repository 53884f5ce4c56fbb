//! A scan of the protobuf wire format that counts the values a payload
//! would expand to, without decoding (allocating) anything. It knows just
//! enough of the Sparkplug B schema to find the repeated and nested fields.
//! It must never allocate for what it counts, nor trust a length it has not
//! checked against what is left of the buffer.

use super::MAX_NESTING;

/// The message types that hold repeated or nested fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Payload,
    Metric,
    Template,
    DataSet,
    Row,
    PropertySet,
    PropertyValue,
    PropertySetList,
}

/// For a length-delimited field of a message: whether each occurrence
/// counts as one value, and the message type to scan inside it.
fn field(kind: Kind, number: u64) -> (bool, Option<Kind>) {
    match (kind, number) {
        (Kind::Payload, 2) => (true, Some(Kind::Metric)),
        (Kind::Metric, 9) => (false, Some(Kind::PropertySet)),
        (Kind::Metric, 17) => (false, Some(Kind::DataSet)),
        (Kind::Metric, 18) => (false, Some(Kind::Template)),
        (Kind::Template, 2) => (true, Some(Kind::Metric)),
        (Kind::Template, 3) => (true, None),
        (Kind::DataSet, 2) => (true, None),
        (Kind::DataSet, 4) => (true, Some(Kind::Row)),
        (Kind::Row, 1) => (true, None),
        (Kind::PropertySet, 1) => (true, None),
        (Kind::PropertySet, 2) => (true, Some(Kind::PropertyValue)),
        (Kind::PropertyValue, 9) => (false, Some(Kind::PropertySet)),
        (Kind::PropertyValue, 10) => (false, Some(Kind::PropertySetList)),
        (Kind::PropertySetList, 1) => (true, Some(Kind::PropertySet)),
        _ => (false, None),
    }
}

/// `Err` when the payload holds more than `max` values (metrics at any
/// level, template parameters, data set columns, types, rows and cells,
/// property keys and values), nests deeper than [`MAX_NESTING`], or is
/// not well-formed protobuf.
pub(super) fn check(buf: &[u8], max: usize) -> Result<(), String> {
    let mut count = 0usize;
    scan(buf, Kind::Payload, 1, max, &mut count)
}

fn scan(buf: &[u8], kind: Kind, depth: usize, max: usize, count: &mut usize) -> Result<(), String> {
    if depth > MAX_NESTING {
        return Err(format!(
            "payload nests messages deeper than {MAX_NESTING} levels"
        ));
    }
    let mut rest = buf;
    while !rest.is_empty() {
        let key = varint(&mut rest)?;
        let number = key >> 3;
        if number == 0 {
            return Err(malformed("field number 0"));
        }
        match key & 7 {
            0 => {
                let _ = varint(&mut rest)?;
                // A DataSet's `types`, unpacked: one per occurrence.
                if kind == Kind::DataSet && number == 3 {
                    bump(count, 1, max)?;
                }
            }
            1 => rest = skip(rest, 8)?,
            5 => rest = skip(rest, 4)?,
            2 => {
                let len = varint(&mut rest)?;
                let len = usize::try_from(len)
                    .ok()
                    .filter(|l| *l <= rest.len())
                    .ok_or_else(|| malformed("a length runs past the end"))?;
                let (inner, after) = rest.split_at(len);
                rest = after;
                if kind == Kind::DataSet && number == 3 {
                    // Packed `types`: one value per varint.
                    let n = inner.iter().filter(|b| **b < 0x80).count();
                    bump(count, n, max)?;
                    continue;
                }
                let (counted, nested) = field(kind, number);
                if counted {
                    bump(count, 1, max)?;
                }
                if let Some(nested) = nested {
                    scan(inner, nested, depth + 1, max, count)?;
                }
            }
            _ => return Err(malformed("a group or unknown wire type")),
        }
    }
    Ok(())
}

fn bump(count: &mut usize, n: usize, max: usize) -> Result<(), String> {
    *count = count.saturating_add(n);
    if *count > max {
        return Err(format!(
            "the message holds more than {max} metrics and nested values \
             (sparkplug_max_metrics); refused before decoding"
        ));
    }
    Ok(())
}

fn malformed(what: &str) -> String {
    format!("payload is not a Sparkplug B protobuf: {what}")
}

fn skip(buf: &[u8], n: usize) -> Result<&[u8], String> {
    buf.get(n..)
        .ok_or_else(|| malformed("a fixed-size field runs past the end"))
}

fn varint(buf: &mut &[u8]) -> Result<u64, String> {
    let mut v = 0u64;
    for i in 0..10 {
        let (&b, rest) = buf
            .split_first()
            .ok_or_else(|| malformed("a varint runs past the end"))?;
        *buf = rest;
        v |= u64::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            return Ok(v);
        }
    }
    Err(malformed("a varint longer than 10 bytes"))
}
