//! JSON payloads → signals.

use std::fmt::{self, Write};

use edgefleet_proto::{RecordWriter, SignalValue};
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PayloadError {
    #[error("invalid JSON at line {line}, column {column}: {message}")]
    Syntax {
        line: usize,
        column: usize,
        message: String,
    },
    #[error("expected a JSON object, got {0}")]
    NotAnObject(&'static str),
    #[error("field `{0}` must be a number of milliseconds (ts) or nanoseconds (timestamp_ns) since the epoch")]
    BadTimestamp(String),
    #[error("no signals in the object")]
    Empty,
}

/// Reads JSON payloads into signals. One reader serves many payloads: it
/// keeps the buffer it builds signal names in, so a payload's names cost
/// no allocation (a new buffer per payload was a malloc and a realloc per
/// message at full load).
#[derive(Debug, Default)]
pub struct JsonReader {
    name: String,
}

impl JsonReader {
    /// Writes the payload's signals to `signals` and returns the device's
    /// own timestamp, if it gave one. On an error nothing is left in
    /// `signals`.
    ///
    /// Numbers, bools and strings become signals, in the payload's order;
    /// nested objects are flattened to dotted names and arrays to indexed
    /// ones (`cells.0`); nulls are skipped. A numeric top-level `ts`
    /// (milliseconds) or `timestamp_ns` sets the time.
    ///
    /// The payload is read in one pass straight into `signals`: building a
    /// `serde_json::Value` first (a map and a string per key) was a
    /// twentieth of the agent's CPU at full load (BENCHMARKS.md, "Nagle in
    /// the harness").
    pub fn decode_into(
        &mut self,
        payload: &[u8],
        signals: &mut RecordWriter,
    ) -> Result<Option<i64>, PayloadError> {
        let result = self.write_signals(payload, signals);
        if result.is_err() {
            signals.clear();
        }
        result
    }

    fn write_signals(
        &mut self,
        payload: &[u8],
        signals: &mut RecordWriter,
    ) -> Result<Option<i64>, PayloadError> {
        let first = payload.iter().find(|b| !b.is_ascii_whitespace());
        if first.is_some() && first != Some(&b'{') {
            // Valid JSON of another kind is named; anything else is a
            // syntax error with its place.
            serde_json::from_slice::<serde::de::IgnoredAny>(payload).map_err(syntax)?;
            return Err(PayloadError::NotAnObject(kind_of(first)));
        }
        self.name.clear();
        let mut top = TopLevel {
            out: signals,
            name: &mut self.name,
            timestamp_ns: None,
            bad_timestamp: None,
        };
        let mut deserializer = serde_json::Deserializer::from_slice(payload);
        let read = serde::de::DeserializeSeed::deserialize(&mut top, &mut deserializer)
            .and_then(|()| deserializer.end());
        if let Some(key) = top.bad_timestamp {
            return Err(PayloadError::BadTimestamp(key));
        }
        read.map_err(syntax)?;
        if top.out.is_empty() {
            return Err(PayloadError::Empty);
        }
        Ok(top.timestamp_ns)
    }
}

fn syntax(e: serde_json::Error) -> PayloadError {
    PayloadError::Syntax {
        line: e.line(),
        column: e.column(),
        message: e
            .to_string()
            .split(" at line")
            .next()
            .unwrap_or_default()
            .to_string(),
    }
}

/// The kind of JSON value that starts with `first`.
fn kind_of(first: Option<&u8>) -> &'static str {
    match first {
        Some(b'[') => "an array",
        Some(b'"') => "a string",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        _ => "a number",
    }
}

/// The payload's object: its keys, with `ts` and `timestamp_ns` taken as
/// the time and the rest flattened into signals.
struct TopLevel<'w> {
    out: &'w mut RecordWriter,
    /// One name buffer for the whole payload (the reader's): nested names
    /// are built in it and cut back, not allocated per signal.
    name: &'w mut String,
    timestamp_ns: Option<i64>,
    /// The key of a timestamp that is not one.
    bad_timestamp: Option<String>,
}

impl<'de> DeserializeSeed<'de> for &mut TopLevel<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for &mut TopLevel<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        loop {
            self.name.clear();
            if map.next_key_seed(KeyInto(&mut *self.name))?.is_none() {
                return Ok(());
            }
            match self.name.as_str() {
                "ts" | "timestamp_ns" => {
                    let ns = match (self.name.as_str(), map.next_value::<Number>()?) {
                        // Integer milliseconds stay exact; f64 would round
                        // at ns scale.
                        ("ts", Number::Int(ms)) if ms >= 0 => i64::try_from(ms)
                            .ok()
                            .and_then(|ms| ms.checked_mul(1_000_000)),
                        ("ts", Number::Float(ms)) => Some(ms)
                            .filter(|v| v.is_finite() && *v >= 0.0 && *v < 9.2e12)
                            .map(|ms| (ms * 1e6) as i64),
                        ("timestamp_ns", Number::Int(ns)) => i64::try_from(ns).ok(),
                        _ => None,
                    };
                    match ns {
                        Some(ns) => self.timestamp_ns = Some(ns),
                        None => {
                            self.bad_timestamp = Some(self.name.clone());
                            return Err(de::Error::custom("bad timestamp"));
                        }
                    }
                }
                _ => map.next_value_seed(Flatten {
                    name: &mut *self.name,
                    out: self.out,
                })?,
            }
        }
    }
}

/// A key, appended to the name being built (escapes and all, as serde_json
/// reads them).
struct KeyInto<'n>(&'n mut String);

impl<'de> DeserializeSeed<'de> for KeyInto<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeyInto<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<(), E> {
        self.0.push_str(key);
        Ok(())
    }
}

/// A value under the name built so far: a signal, or the signals of what
/// it nests.
struct Flatten<'a, 'w> {
    name: &'a mut String,
    out: &'w mut RecordWriter,
}

impl<'de> DeserializeSeed<'de> for Flatten<'_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Flatten<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        self.out.signal(self.name, SignalValue::Bool(v));
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.out.signal(self.name, SignalValue::I64(v));
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        let value = match i64::try_from(v) {
            Ok(v) => SignalValue::I64(v),
            Err(_) => SignalValue::F64(v as f64),
        };
        self.out.signal(self.name, value);
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.out.signal(self.name, SignalValue::F64(v));
        Ok(())
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.out.signal(self.name, SignalValue::Str(v));
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<(), A::Error> {
        let parent = self.name.len();
        for i in 0.. {
            let _ = write!(self.name, ".{i}");
            let item = items.next_element_seed(Flatten {
                name: &mut *self.name,
                out: &mut *self.out,
            })?;
            self.name.truncate(parent);
            if item.is_none() {
                return Ok(());
            }
        }
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let parent = self.name.len();
        loop {
            self.name.push('.');
            if map.next_key_seed(KeyInto(&mut *self.name))?.is_none() {
                self.name.truncate(parent);
                return Ok(());
            }
            map.next_value_seed(Flatten {
                name: &mut *self.name,
                out: &mut *self.out,
            })?;
            self.name.truncate(parent);
        }
    }
}

/// A timestamp's number, as serde_json reads it.
enum Number {
    Int(i128),
    Float(f64),
    Other,
}

impl<'de> de::Deserialize<'de> for Number {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NumberVisitor;
        impl<'de> Visitor<'de> for NumberVisitor {
            type Value = Number;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Number, E> {
                Ok(Number::Int(v.into()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Number, E> {
                Ok(Number::Int(v.into()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Number, E> {
                Ok(Number::Float(v))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Number, E> {
                Ok(Number::Other)
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Number, E> {
                Ok(Number::Other)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Number, E> {
                Ok(Number::Other)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<Number, A::Error> {
                while items.next_element::<de::IgnoredAny>()?.is_some() {}
                Ok(Number::Other)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Number, A::Error> {
                while map
                    .next_entry::<de::IgnoredAny, de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(Number::Other)
            }
        }
        deserializer.deserialize_any(NumberVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgefleet_proto::{record, signal, Signal};

    /// Decodes a payload and reads back the record it wrote.
    fn decode(payload: &[u8]) -> Result<(Vec<Signal>, Option<i64>), PayloadError> {
        let mut writer = RecordWriter::new();
        let timestamp_ns = JsonReader::default().decode_into(payload, &mut writer)?;
        let record = writer.finish("mqtt", "dev", 1).to_record();
        let Some(record::Value::Signals(signals)) = record.value else {
            panic!("not signals: {record:?}");
        };
        Ok((signals.signals, timestamp_ns))
    }

    fn names(signals: &[Signal]) -> Vec<(&str, &signal::Value)> {
        signals
            .iter()
            .map(|s| (s.name.as_str(), s.value.as_ref().unwrap()))
            .collect()
    }

    #[test]
    fn flattens_nested_objects_and_keeps_types() {
        let (signals, timestamp_ns) = decode(br#"{"ts": 1700000000123, "temp": 21.5, "count": 3, "on": true, "mode": "eco", "motor": {"rpm": 1200, "i": [1.5, 2]}, "gone": null}"#).unwrap();
        assert_eq!(timestamp_ns, Some(1_700_000_000_123_000_000));
        assert_eq!(
            names(&signals),
            // In the payload's order.
            [
                ("temp", &signal::Value::F64(21.5)),
                ("count", &signal::Value::I64(3)),
                ("on", &signal::Value::Bool(true)),
                ("mode", &signal::Value::Str("eco".into())),
                ("motor.rpm", &signal::Value::I64(1200)),
                ("motor.i.0", &signal::Value::F64(1.5)),
                ("motor.i.1", &signal::Value::I64(2)),
            ]
        );
    }

    #[test]
    fn names_values_and_timestamps_at_their_edges() {
        let (signals, timestamp_ns) = decode(
            br#"{"a\"b": 1, "\u00e9t\u00e9": "x\ny", "cells": [{"v": 3.5}, [true]], "big": 18446744073709551615, "neg": -7, "timestamp_ns": -5}"#,
        )
        .unwrap();
        assert_eq!(timestamp_ns, Some(-5));
        assert_eq!(
            names(&signals),
            [
                ("a\"b", &signal::Value::I64(1)),
                ("été", &signal::Value::Str("x\ny".into())),
                ("cells.0.v", &signal::Value::F64(3.5)),
                ("cells.1.0", &signal::Value::Bool(true)),
                ("big", &signal::Value::F64(u64::MAX as f64)),
                ("neg", &signal::Value::I64(-7)),
            ]
        );
        let time = |payload: &[u8]| decode(payload).map(|(_, ts)| ts);
        assert_eq!(time(br#"{"ts": 1.5, "a": 1}"#), Ok(Some(1_500_000)));
        for bad in [
            &br#"{"ts": -1, "a": 1}"#[..],
            br#"{"ts": 9300000000000, "a": 1}"#,
            br#"{"ts": 18446744073709551615, "a": 1}"#,
            br#"{"timestamp_ns": 1.5, "a": 1}"#,
            br#"{"a": 1, "timestamp_ns": [1]}"#,
        ] {
            let key = if bad.starts_with(b"{\"ts") {
                "ts"
            } else {
                "timestamp_ns"
            };
            assert_eq!(
                time(bad),
                Err(PayloadError::BadTimestamp(key.into())),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    /// The signals the decoder writes are those of the payload's
    /// `serde_json::Value`, flattened (the decoder's definition before it
    /// read payloads in one pass), whatever the payload.
    mod against_value {
        use super::*;
        use proptest::prelude::*;
        use serde_json::Value;

        fn flatten(name: &str, value: &Value, out: &mut Vec<(String, signal::Value)>) {
            let leaf = match value {
                Value::Null => return,
                Value::Bool(b) => signal::Value::Bool(*b),
                Value::Number(n) => match n.as_i64() {
                    Some(i) => signal::Value::I64(i),
                    None => signal::Value::F64(n.as_f64().unwrap()),
                },
                Value::String(s) => signal::Value::Str(s.clone()),
                Value::Array(items) => {
                    for (i, item) in items.iter().enumerate() {
                        flatten(&format!("{name}.{i}"), item, out);
                    }
                    return;
                }
                Value::Object(map) => {
                    for (key, item) in map {
                        flatten(&format!("{name}.{key}"), item, out);
                    }
                    return;
                }
            };
            out.push((name.to_string(), leaf));
        }

        fn arb_value() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(Value::from),
                any::<u64>().prop_map(Value::from),
                (-1e12f64..1e12).prop_map(Value::from),
                r#"[a-z"\\\n é]{0,8}"#.prop_map(Value::String),
            ];
            leaf.prop_recursive(3, 24, 4, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                    prop::collection::btree_map("[a-z\"é.]{1,4}", inner, 0..4)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        proptest! {
            #[test]
            fn the_same_signals_as_the_flattened_value(
                fields in prop::collection::btree_map("[a-z]{1,6}", arb_value(), 1..6)
            ) {
                let object: serde_json::Map<String, Value> = fields
                    .into_iter()
                    .filter(|(key, _)| key != "ts")
                    .collect();
                let payload = serde_json::to_vec(&Value::Object(object)).unwrap();
                // Read back as the decoder reads it: serde_json's float
                // parsing is not exact to the last bit.
                let Value::Object(read) = serde_json::from_slice(&payload).unwrap() else {
                    unreachable!("an object was written");
                };
                let mut want = Vec::new();
                for (key, value) in &read {
                    flatten(key, value, &mut want);
                }
                match decode(&payload) {
                    Ok((signals, None)) => {
                        let mut got: Vec<(String, signal::Value)> = signals
                            .into_iter()
                            .map(|s| (s.name, s.value.unwrap()))
                            .collect();
                        let key = |s: &(String, signal::Value)| format!("{s:?}");
                        got.sort_by_key(key);
                        want.sort_by_key(key);
                        prop_assert_eq!(got, want);
                    }
                    Err(PayloadError::Empty) => prop_assert!(want.is_empty()),
                    other => prop_assert!(false, "{other:?} for {}", String::from_utf8_lossy(&payload)),
                }
            }
        }
    }

    #[test]
    fn malformed_payloads_say_what_and_where() {
        assert_eq!(
            decode(b"{\"a\": 1,\n \"b\": }"),
            Err(PayloadError::Syntax {
                line: 2,
                column: 7,
                message: "expected value".into()
            })
        );
        assert_eq!(decode(b"[1,2]"), Err(PayloadError::NotAnObject("an array")));
        assert_eq!(decode(b"{}"), Err(PayloadError::Empty));
        assert_eq!(
            decode(br#"{"ts": "yesterday", "a": 1}"#),
            Err(PayloadError::BadTimestamp("ts".into()))
        );
        assert!(decode(&[0xff, 0xfe]).is_err());
    }

    #[test]
    fn a_refused_payload_leaves_nothing_behind_for_the_next_one() {
        let mut writer = RecordWriter::new();
        let mut reader = JsonReader::default();
        // `a` is written before `ts` is found bad.
        assert!(reader
            .decode_into(br#"{"a": 1, "ts": "soon"}"#, &mut writer)
            .is_err());
        assert!(writer.is_empty());
        reader.decode_into(br#"{"b": 2}"#, &mut writer).unwrap();
        let record = writer.finish("mqtt", "dev", 1).to_record();
        let Some(record::Value::Signals(signals)) = record.value else {
            panic!("not signals");
        };
        assert_eq!(signals.signals, vec![Signal::i64("b", 2)]);
    }
}
