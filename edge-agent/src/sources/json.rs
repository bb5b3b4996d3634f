//! JSON payloads → signals.

use std::fmt::Write;

use edgefleet_proto::{RecordWriter, SignalValue};

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

/// Writes the payload's signals to `signals` and returns the device's own
/// timestamp, if it gave one. On an error nothing is left in `signals`.
///
/// Numbers, bools and strings become signals; nested objects are flattened to
/// dotted names and arrays to indexed ones (`cells.0`); nulls are skipped.
/// A numeric top-level `ts` (milliseconds) or `timestamp_ns` sets the time.
pub fn decode_into(
    payload: &[u8],
    signals: &mut RecordWriter,
) -> Result<Option<i64>, PayloadError> {
    let result = write_signals(payload, signals);
    if result.is_err() {
        signals.clear();
    }
    result
}

fn write_signals(payload: &[u8], signals: &mut RecordWriter) -> Result<Option<i64>, PayloadError> {
    let value: serde_json::Value =
        serde_json::from_slice(payload).map_err(|e| PayloadError::Syntax {
            line: e.line(),
            column: e.column(),
            message: e
                .to_string()
                .split(" at line")
                .next()
                .unwrap_or_default()
                .to_string(),
        })?;
    let serde_json::Value::Object(map) = value else {
        return Err(PayloadError::NotAnObject(kind(&value)));
    };
    let mut timestamp_ns = None;
    // One name buffer for the whole payload: nested names are built in it
    // and cut back, not allocated per signal.
    let mut name = String::new();
    for (key, value) in &map {
        match key.as_str() {
            "ts" => {
                // Integer milliseconds stay exact; f64 would round at ns scale.
                let ns = match value.as_i64() {
                    Some(ms) if ms >= 0 => ms.checked_mul(1_000_000),
                    Some(_) => None,
                    None => value
                        .as_f64()
                        .filter(|v| v.is_finite() && *v >= 0.0 && *v < 9.2e12)
                        .map(|ms| (ms * 1e6) as i64),
                };
                timestamp_ns = Some(ns.ok_or_else(|| PayloadError::BadTimestamp(key.clone()))?);
            }
            "timestamp_ns" => {
                timestamp_ns = Some(
                    value
                        .as_i64()
                        .ok_or_else(|| PayloadError::BadTimestamp(key.clone()))?,
                );
            }
            _ => {
                name.clear();
                name.push_str(key);
                flatten(&mut name, value, signals);
            }
        }
    }
    if signals.is_empty() {
        return Err(PayloadError::Empty);
    }
    Ok(timestamp_ns)
}

fn flatten(name: &mut String, value: &serde_json::Value, out: &mut RecordWriter) {
    use serde_json::Value;
    let v = match value {
        Value::Null => return,
        Value::Bool(b) => SignalValue::Bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => SignalValue::I64(i),
            None => SignalValue::F64(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => SignalValue::Str(s),
        Value::Array(items) => {
            let parent = name.len();
            for (i, item) in items.iter().enumerate() {
                let _ = write!(name, ".{i}");
                flatten(name, item, out);
                name.truncate(parent);
            }
            return;
        }
        Value::Object(map) => {
            let parent = name.len();
            for (key, item) in map {
                name.push('.');
                name.push_str(key);
                flatten(name, item, out);
                name.truncate(parent);
            }
            return;
        }
    };
    out.signal(name, v);
}

fn kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgefleet_proto::{record, signal, Signal};

    /// Decodes a payload and reads back the record it wrote.
    fn decode(payload: &[u8]) -> Result<(Vec<Signal>, Option<i64>), PayloadError> {
        let mut writer = RecordWriter::new();
        let timestamp_ns = decode_into(payload, &mut writer)?;
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
            // Object keys come out sorted (serde_json's map), so the
            // signal order is stable whatever order the device used.
            [
                ("count", &signal::Value::I64(3)),
                ("mode", &signal::Value::Str("eco".into())),
                ("motor.i.0", &signal::Value::F64(1.5)),
                ("motor.i.1", &signal::Value::I64(2)),
                ("motor.rpm", &signal::Value::I64(1200)),
                ("on", &signal::Value::Bool(true)),
                ("temp", &signal::Value::F64(21.5)),
            ]
        );
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
        // `a` is written before `ts` is found bad (keys come sorted).
        assert!(decode_into(br#"{"a": 1, "ts": "soon"}"#, &mut writer).is_err());
        assert!(writer.is_empty());
        decode_into(br#"{"b": 2}"#, &mut writer).unwrap();
        let record = writer.finish("mqtt", "dev", 1).to_record();
        let Some(record::Value::Signals(signals)) = record.value else {
            panic!("not signals");
        };
        assert_eq!(signals.signals, vec![Signal::i64("b", 2)]);
    }
}
