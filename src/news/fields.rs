//! A JSON object's members as written, so that fields bearwatch does not know pass through exactly.

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::ser::{SerializeMap, Serializer};
use serde_json::Value;
use serde_json::value::RawValue;

/// The members of a JSON object, each value kept as its JSON text (whitespace outside strings
/// removed), in order; a repeated key keeps its last value in its first place, as serde_json's
/// maps do. An integer beyond 64 bits or a long decimal stays what it was, where a parsed `Value`
/// would have turned it into a float.
#[derive(Debug, Clone, Default)]
pub struct Fields(Vec<(String, Box<RawValue>)>);

/// Why bytes are not a JSON object.
#[derive(Debug)]
pub enum NotFields {
    Json(String),
    NotAnObject,
}

impl Fields {
    pub fn parse(bytes: &[u8]) -> Result<Fields, NotFields> {
        match serde_json::from_slice::<Parsed>(bytes) {
            Ok(Parsed::Object(fields)) => Ok(fields),
            Ok(Parsed::Other) => Err(NotFields::NotAnObject),
            Err(e) => Err(NotFields::Json(e.to_string())),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The bytes of its keys and JSON values.
    pub fn bytes(&self) -> usize {
        self.0.iter().map(|(k, v)| k.len() + v.get().len()).sum()
    }

    /// The value of `key`, parsed (for the few fields bearwatch reads).
    pub fn get(&self, key: &str) -> Option<Value> {
        self.0.iter().find(|(k, _)| k == key).and_then(|(_, v)| serde_json::from_str(v.get()).ok())
    }

    /// Takes `key` out, parsed.
    pub fn take(&mut self, key: &str) -> Option<Value> {
        let index = self.0.iter().position(|(k, _)| k == key)?;
        serde_json::from_str(self.0.remove(index).1.get()).ok()
    }

    /// Sets `key` to `value`: in its place if it is there, else at the end.
    pub fn set(&mut self, key: &str, value: &Value) {
        let raw = RawValue::from_string(value.to_string()).expect("a Value serializes as valid JSON");
        self.insert(key.to_string(), raw);
    }

    /// The object as compact JSON text.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("raw JSON values serialize")
    }

    /// In its place if `key` is there, else at the end.
    fn insert(&mut self, key: String, value: Box<RawValue>) {
        match self.0.iter_mut().find(|(k, _)| *k == key) {
            Some((_, slot)) => *slot = value,
            None => self.0.push((key, value)),
        }
    }
}

impl PartialEq for Fields {
    fn eq(&self, other: &Fields) -> bool {
        self.0.len() == other.0.len() && self.0.iter().zip(&other.0).all(|((a, x), (b, y))| a == b && x.get() == y.get())
    }
}

impl serde::Serialize for Fields {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (key, value) in &self.0 {
            map.serialize_entry(key, value)?;
        }
        map.end()
    }
}

/// A JSON document that is an object, or anything else.
enum Parsed {
    Object(Fields),
    Other,
}

impl<'de> serde::Deserialize<'de> for Parsed {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Parsed, D::Error> {
        deserializer.deserialize_any(ParsedVisitor)
    }
}

struct ParsedVisitor;

impl<'de> Visitor<'de> for ParsedVisitor {
    type Value = Parsed;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Parsed, A::Error> {
        let mut fields = Fields::default();
        // Where each key is: looking each one up in the members would make a message of n
        // distinct keys cost n² comparisons (20,000 keys in the default 256 KiB: seconds a message).
        let mut places: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
        while let Some(key) = map.next_key::<String>()? {
            let raw: Box<RawValue> = map.next_value()?;
            let compact = RawValue::from_string(compact(raw.get())).map_err(de::Error::custom)?;
            match places.get(&key) {
                Some(&place) => fields.0[place].1 = compact,
                None => {
                    places.insert(key.clone(), fields.0.len());
                    fields.0.push((key, compact));
                }
            }
        }
        Ok(Parsed::Object(fields))
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Parsed, A::Error> {
        while seq.next_element::<de::IgnoredAny>()?.is_some() {}
        Ok(Parsed::Other)
    }

    fn visit_bool<E>(self, _: bool) -> Result<Parsed, E> {
        Ok(Parsed::Other)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Parsed, E> {
        Ok(Parsed::Other)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Parsed, E> {
        Ok(Parsed::Other)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Parsed, E> {
        Ok(Parsed::Other)
    }
    fn visit_str<E>(self, _: &str) -> Result<Parsed, E> {
        Ok(Parsed::Other)
    }
    fn visit_unit<E>(self) -> Result<Parsed, E> {
        Ok(Parsed::Other)
    }
}

/// `json` without the whitespace outside its strings: what serde_json writes for a parsed value,
/// with numbers and escapes left exactly as they were.
fn compact(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    let (mut in_string, mut escaped) = (false, false);
    for c in json.chars() {
        if in_string {
            out.push(c);
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
        } else if !c.is_ascii_whitespace() {
            in_string = c == '"';
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_pass_through_exactly_and_compactly() {
        let text = r#"{"big": 123456789012345678901234567890, "dec": 0.1000000000000000055511151231257827,
            "nested": {"a" : [1, 2 ,"x y"]}, "s": "tab\t\"q\" \u00e9", "big": -99999999999999999999}"#;
        let fields = Fields::parse(text.as_bytes()).unwrap();
        assert_eq!(
            fields.to_json(),
            r#"{"big":-99999999999999999999,"dec":0.1000000000000000055511151231257827,"nested":{"a":[1,2,"x y"]},"s":"tab\t\"q\" \u00e9"}"#
        );
        assert_eq!(fields.get("s"), Some(Value::String("tab\t\"q\" é".into())));
    }

    /// A message of many distinct keys (what a 4 MiB `max_message_bytes` holds): each key was
    /// looked up among all before it, and one such message held the pipeline for minutes.
    #[test]
    fn many_keys_keep_their_order_and_a_repeat_its_first_place() {
        let members: Vec<String> = (0..300_000).map(|i| format!("\"k{i}\":{i}")).collect();
        let text = format!("{{{},\"k7\":\"last\"}}", members.join(","));
        let fields = Fields::parse(text.as_bytes()).unwrap();
        assert_eq!(fields.0.len(), 300_000);
        assert!(fields.0.iter().enumerate().all(|(i, (key, _))| *key == format!("k{i}")));
        assert_eq!(fields.get("k7"), Some(Value::from("last")));
    }

    #[test]
    fn only_objects_are_fields() {
        assert!(matches!(Fields::parse(b"[1, {\"a\": 2}]"), Err(NotFields::NotAnObject)));
        assert!(matches!(Fields::parse(b"\"x\""), Err(NotFields::NotAnObject)));
        assert!(matches!(Fields::parse(b"{\"a\": }"), Err(NotFields::Json(_))));
        assert!(matches!(Fields::parse(b"{} x"), Err(NotFields::Json(_))));
    }

    #[test]
    fn set_replaces_in_place_and_take_removes() {
        let mut fields = Fields::parse(br#"{"a":1,"b":2}"#).unwrap();
        fields.set("a", &Value::from("x"));
        fields.set("c", &Value::from(3));
        assert_eq!(fields.to_json(), r#"{"a":"x","b":2,"c":3}"#);
        assert_eq!(fields.take("b"), Some(Value::from(2)));
        assert_eq!(fields.to_json(), r#"{"a":"x","c":3}"#);
    }
}
