//! Event data as the validator reads it: a JSON tree that borrows its
//! strings from the event's bytes, so checking an event allocates one vector
//! per object and array rather than one string per key and value.
//! (A `serde_json::Value` of a 1 KiB confirmation costs four times the
//! validation itself.)
//!
//! It implements the `jsonschema` representation traits and nothing else;
//! it must answer exactly as `serde_json::Value` would: the last of
//! repeated keys wins, numbers compare by value, string lengths count code
//! points.

use std::borrow::Cow;
use std::fmt;

use jsonschema::JsonType;
use jsonschema::json::{Array, Json, Node, NodeIdentity, Object};
use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Number, Value};

/// Objects with more members than this are kept sorted for binary search;
/// smaller ones in document order, searched linearly.
const LINEAR_MEMBERS: usize = 16;

/// One JSON value borrowing from the text it was parsed from.
#[derive(Debug, Default)]
pub enum Data<'a> {
    #[default]
    Null,
    Bool(bool),
    Number(Number),
    String(Cow<'a, str>),
    Array(Vec<Data<'a>>),
    /// No key twice; sorted by key when longer than [`LINEAR_MEMBERS`].
    Object(Vec<(Cow<'a, str>, Data<'a>)>),
}

impl<'a> Data<'a> {
    /// Parses JSON text (the whole of it).
    pub fn parse(text: &'a [u8]) -> Result<Data<'a>, serde_json::Error> {
        let mut de = serde_json::Deserializer::from_slice(text);
        let v = Data::deserialize(&mut de)?;
        de.end()?;
        Ok(v)
    }

    fn to_value(&self) -> Value {
        match self {
            Data::Null => Value::Null,
            Data::Bool(b) => Value::Bool(*b),
            Data::Number(n) => Value::Number(n.clone()),
            Data::String(s) => Value::String(s.to_string()),
            Data::Array(items) => Value::Array(items.iter().map(Data::to_value).collect()),
            Data::Object(members) => Value::Object(
                members
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_value()))
                    .collect(),
            ),
        }
    }
}

/// A string that borrows from the input when it holds no escape.
struct Str<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Str<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Str<'de>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Str<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

impl<'de> Deserialize<'de> for Data<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Data<'de>, D::Error> {
        d.deserialize_any(DataVisitor)
    }
}

struct DataVisitor;

impl<'de> Visitor<'de> for DataVisitor {
    type Value = Data<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_unit<E>(self) -> Result<Data<'de>, E> {
        Ok(Data::Null)
    }
    fn visit_bool<E>(self, v: bool) -> Result<Data<'de>, E> {
        Ok(Data::Bool(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Data<'de>, E> {
        Ok(Data::Number(v.into()))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Data<'de>, E> {
        Ok(Data::Number(v.into()))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Data<'de>, E> {
        // serde_json yields only finite floats.
        Ok(Number::from_f64(v).map_or(Data::Null, Data::Number))
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Data<'de>, E> {
        Ok(Data::String(Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Data<'de>, E> {
        Ok(Data::String(Cow::Owned(v.to_owned())))
    }
    fn visit_string<E>(self, v: String) -> Result<Data<'de>, E> {
        Ok(Data::String(Cow::Owned(v)))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Data<'de>, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Data::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Data<'de>, A::Error> {
        let mut members: Vec<(Cow<'de, str>, Data<'de>)> = Vec::new();
        while let Some(Str(key)) = map.next_key()? {
            let value = map.next_value()?;
            members.push((key, value));
        }
        Ok(Data::Object(normalize(members)))
    }
}

/// Drops all but the last of repeated keys (as `serde_json::Value` keeps
/// the last), and sorts long member lists for binary search.
fn normalize<'a>(mut members: Vec<(Cow<'a, str>, Data<'a>)>) -> Vec<(Cow<'a, str>, Data<'a>)> {
    if members.len() <= LINEAR_MEMBERS {
        let repeated = members
            .iter()
            .enumerate()
            .any(|(i, (k, _))| members[i + 1..].iter().any(|(o, _)| o == k));
        if repeated {
            let mut kept: Vec<(Cow<'a, str>, Data<'a>)> = Vec::with_capacity(members.len());
            for (k, v) in members {
                match kept.iter_mut().find(|(o, _)| *o == k) {
                    Some(slot) => slot.1 = v,
                    None => kept.push((k, v)),
                }
            }
            return kept;
        }
        return members;
    }
    // Stable: among equal keys the last stays last, and is the one kept.
    members.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out: Vec<(Cow<'a, str>, Data<'a>)> = Vec::with_capacity(members.len());
    for m in members {
        match out.last_mut() {
            Some(last) if last.0 == m.0 => *last = m,
            _ => out.push(m),
        }
    }
    out
}

/// The `jsonschema` representation of [`Data`].
pub struct Borrowed;

impl Json for Borrowed {
    type Node<'a> = &'a Data<'a>;
    type PreparedKey = String;
    type StringBuffer = Data<'static>;

    const KEYS_PER_LOOKUP: usize = 2;
    const ACYCLIC: bool = true;

    fn prepare_key(key: &str) -> String {
        key.to_owned()
    }

    fn with_string_node<T>(
        buffer: &mut Data<'static>,
        string: &str,
        f: impl FnOnce(<Self as Json>::Node<'_>) -> T,
    ) -> T {
        *buffer = Data::String(Cow::Owned(string.to_owned()));
        f(buffer)
    }
}

impl<'a> Node<'a, Borrowed> for &'a Data<'a> {
    type Object = &'a [(Cow<'a, str>, Data<'a>)];
    type Array = &'a [Data<'a>];
    type Number = &'a Number;

    fn as_object(&self) -> Option<Self::Object> {
        match self {
            Data::Object(members) => Some(members),
            _ => None,
        }
    }
    fn as_array(&self) -> Option<Self::Array> {
        match self {
            Data::Array(items) => Some(items),
            _ => None,
        }
    }
    fn as_string(&self) -> Option<Cow<'a, str>> {
        match self {
            Data::String(s) => Some(Cow::Borrowed(s)),
            _ => None,
        }
    }
    fn as_number(&self) -> Option<&'a Number> {
        match self {
            Data::Number(n) => Some(n),
            _ => None,
        }
    }
    fn as_boolean(&self) -> Option<bool> {
        match self {
            Data::Bool(b) => Some(*b),
            _ => None,
        }
    }
    fn is_null(&self) -> bool {
        matches!(self, Data::Null)
    }
    fn json_type(&self) -> JsonType {
        match self {
            Data::Null => JsonType::Null,
            Data::Bool(_) => JsonType::Boolean,
            Data::Number(_) => JsonType::Number,
            Data::String(_) => JsonType::String,
            Data::Array(_) => JsonType::Array,
            Data::Object(_) => JsonType::Object,
        }
    }
    fn string_length_within(&self, min: u64, max: u64) -> Option<bool> {
        let Data::String(s) = self else {
            return None;
        };
        // A code point takes one to four bytes: most lengths are decided
        // without counting.
        let bytes = s.len() as u64;
        if bytes < min || bytes.div_ceil(4) > max {
            return Some(false);
        }
        if min <= bytes.div_ceil(4) && bytes <= max {
            return Some(true);
        }
        Some((min..=max).contains(&(s.chars().count() as u64)))
    }
    fn to_value(&self) -> Cow<'a, Value> {
        Cow::Owned(Data::to_value(self))
    }
    fn identity(&self) -> Option<NodeIdentity> {
        Some(NodeIdentity::new(
            std::ptr::from_ref::<Data<'_>>(*self) as usize
        ))
    }
}

pub struct Members<'a>(std::slice::Iter<'a, (Cow<'a, str>, Data<'a>)>);

impl<'a> Iterator for Members<'a> {
    type Item = (&'a str, &'a Data<'a>);
    fn next(&mut self) -> Option<Self::Item> {
        self.0.next().map(|(k, v)| (k.as_ref(), v))
    }
}

impl<'a> Object<'a, Borrowed> for &'a [(Cow<'a, str>, Data<'a>)] {
    type Node = &'a Data<'a>;
    type MemberName = &'a str;
    type MembersIter = Members<'a>;

    fn len(&self) -> usize {
        <[_]>::len(self)
    }
    fn get(&self, key: &String) -> Option<&'a Data<'a>> {
        if <[_]>::len(self) <= LINEAR_MEMBERS {
            return self.iter().find(|(k, _)| k == key).map(|(_, v)| v);
        }
        self.binary_search_by(|(k, _)| k.as_ref().cmp(key.as_str()))
            .ok()
            .map(|i| &self[i].1)
    }
    fn members(&self) -> Members<'a> {
        Members(self.iter())
    }
}

impl<'a> Array<'a, Borrowed> for &'a [Data<'a>] {
    type Node = &'a Data<'a>;
    type ElementsIter = std::slice::Iter<'a, Data<'a>>;

    fn len(&self) -> usize {
        <[_]>::len(self)
    }
    fn elements(&self) -> std::slice::Iter<'a, Data<'a>> {
        self.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_reads_as_serde_json_does() {
        let text = r#"{"a":1,"b":[true,null,"x\n"],"a":2.5,"c":{"d":-3}}"#;
        let d = Data::parse(text.as_bytes()).unwrap();
        let v: Value = serde_json::from_str(text).unwrap();
        assert_eq!(d.to_value(), v, "the last of repeated keys wins");
        let mut many = String::from("{");
        for i in (0..40).rev() {
            many.push_str(&format!("\"k{i}\":{i},"));
        }
        many.push_str("\"k7\":\"last\"}");
        let d = Data::parse(many.as_bytes()).unwrap();
        let v: Value = serde_json::from_str(&many).unwrap();
        assert_eq!(d.to_value(), v);
        let obj = (&d).as_object().unwrap();
        let get = |k: &str| Object::<Borrowed>::get(&obj, &k.to_owned());
        assert_eq!(
            get("k7").and_then(|n| n.as_string()),
            Some(Cow::Borrowed("last"))
        );
        assert_eq!(
            get("k39").and_then(|n| n.as_number()),
            Some(&Number::from(39))
        );
        assert!(get("nope").is_none());
        assert!(Data::parse(b"{} x").is_err());
    }

    #[test]
    fn it_keeps_the_representation_contract() {
        let text = jsonschema::json::conformance::document().to_string();
        let d = Data::parse(text.as_bytes()).unwrap();
        jsonschema::json::conformance::assert_conformance::<Borrowed>(&&d);
    }

    #[test]
    fn validators_agree_with_the_serde_json_representation() {
        let schema = serde_json::json!({
            "type": "object",
            "required": ["name", "qty"],
            "additionalProperties": false,
            "properties": {
                "name": {"type": "string", "minLength": 2, "maxLength": 4, "pattern": "^[a-zé]+$"},
                "qty": {"type": "integer", "minimum": 0, "multipleOf": 2},
                "tags": {"type": "array", "uniqueItems": true, "items": {"enum": ["a", "b", 1]}},
                "at": {"type": "string", "format": "date-time"},
                "k": {"const": {"x": [1, 2.0]}}
            },
            "propertyNames": {"maxLength": 4}
        });
        let ours = jsonschema::options_for::<Borrowed>()
            .should_validate_formats(true)
            .build(&schema)
            .unwrap();
        let theirs = jsonschema::options()
            .should_validate_formats(true)
            .build(&schema)
            .unwrap();
        for text in [
            r#"{"name":"abé","qty":4}"#,
            r#"{"name":"abéé","qty":4.0,"tags":["a",1],"at":"2026-12-05T10:00:00Z"}"#,
            r#"{"name":"a","qty":3}"#,
            r#"{"name":"abcde","qty":-2}"#,
            r#"{"name":"AB","qty":2}"#,
            r#"{"name":"ab","qty":2,"tags":["a","a"]}"#,
            r#"{"name":"ab","qty":2,"tags":[2]}"#,
            r#"{"name":"ab","qty":2,"at":"yesterday"}"#,
            r#"{"name":"ab","qty":2,"k":{"x":[1,2]}}"#,
            r#"{"name":"ab","qty":2,"k":{"x":[1,3]}}"#,
            r#"{"name":"ab","qty":2,"other":1}"#,
            r#"{"name":"ab"}"#,
            r#"{"name":"ab","qty":2,"name":"toolong"}"#,
            r#"[1]"#,
        ] {
            let d = Data::parse(text.as_bytes()).unwrap();
            let v: Value = serde_json::from_str(text).unwrap();
            assert_eq!(ours.is_valid(&d), theirs.is_valid(&v), "{text}");
            let mut a: Vec<(String, String)> = ours
                .iter_errors(&d)
                .map(|e| (e.instance_path().to_string(), e.masked().to_string()))
                .collect();
            let mut b: Vec<(String, String)> = theirs
                .iter_errors(&v)
                .map(|e| (e.instance_path().to_string(), e.masked().to_string()))
                .collect();
            a.sort();
            b.sort();
            assert_eq!(a, b, "{text}");
        }
    }
}
