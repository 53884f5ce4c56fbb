#![allow(dead_code, reason = "each target uses a part of it")]

//! The input framing shared by the structured targets (seeds are written
//! by `fuzz/seeds/generate.py` in the same layout): a byte string is split
//! into small fields, and a short input simply ends the sequence.

pub struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(data: &'a [u8]) -> Reader<'a> {
        Reader { data }
    }

    pub fn u8(&mut self) -> Option<u8> {
        let (first, rest) = self.data.split_first()?;
        self.data = rest;
        Some(*first)
    }

    /// Little-endian.
    pub fn u16(&mut self) -> Option<u16> {
        let lo = self.u8()?;
        let hi = self.u8()?;
        Some(u16::from_le_bytes([lo, hi]))
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        head
    }

    /// A one-byte length, then that many bytes, read as (lossy) UTF-8;
    /// length 0xFF stands for "absent".
    pub fn opt_str(&mut self) -> Option<Option<String>> {
        match self.u8()? {
            0xFF => Some(None),
            n => Some(Some(
                String::from_utf8_lossy(self.bytes(usize::from(n))).into_owned(),
            )),
        }
    }

    /// A two-byte length, then that many bytes.
    pub fn blob(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        Some(self.bytes(usize::from(n)))
    }
}

/// Asserts that `bytes` is one well-formed JSON value, as the forwarder
/// reads it (a raw value: a `\uD800` escape without its pair passes, as it
/// does in the agent; a strict reader upstream may refuse it).
pub fn assert_json(what: &str, bytes: &[u8]) {
    if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(bytes) {
        panic!(
            "{what} is not valid JSON ({e}): {}",
            String::from_utf8_lossy(bytes)
        );
    }
}

/// Asserts that `text` is a JSON object.
pub fn assert_json_object(what: &str, text: &str) {
    type Object = std::collections::BTreeMap<String, serde::de::IgnoredAny>;
    if let Err(e) = serde_json::from_str::<Object>(text) {
        panic!("{what} is not a JSON object ({e}): {text}");
    }
}
