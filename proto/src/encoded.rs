//! The same wire contract, with each batch's records left encoded.
//!
//! Protobuf encodes an embedded message and a `bytes` field identically, so
//! [`AgentFrame`] is `AgentMessage` read with `RecordBatch.records` as
//! `repeated bytes`. The agent sends records straight from its buffer's
//! segments, and the ingest checks each one ([`check_record`]) and stores it
//! as it arrived: neither side decodes and re-encodes every record, which
//! was most of the cost of the path. [`telemetry_client`] and
//! [`telemetry_server`] speak it on the same route as the generated
//! `Telemetry` service, so either side can talk to a peer that uses the
//! generated types (tests below check both directions).

use prost::bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::{Goodbye, Heartbeat, Hello};

include!(concat!(
    env!("OUT_DIR"),
    "/edgefleet.telemetry.v1.Telemetry.rs"
));

/// `AgentMessage`, with a batch's records still encoded.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AgentFrame {
    #[prost(oneof = "AgentFrameKind", tags = "1, 2, 3, 4")]
    pub kind: Option<AgentFrameKind>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum AgentFrameKind {
    #[prost(message, tag = "1")]
    Hello(Hello),
    #[prost(message, tag = "2")]
    Batch(EncodedBatch),
    #[prost(message, tag = "3")]
    Heartbeat(Heartbeat),
    #[prost(message, tag = "4")]
    Goodbye(Goodbye),
}

/// `RecordBatch`: each element is one encoded `Record`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EncodedBatch {
    #[prost(bytes = "bytes", repeated, tag = "1")]
    pub records: Vec<Bytes>,
    /// `records`, compressed by the sender (see [`crate::batch_zstd`]).
    #[prost(bytes = "bytes", tag = "2")]
    pub records_zstd: Bytes,
}

impl AgentFrame {
    pub fn new(kind: AgentFrameKind) -> Self {
        AgentFrame { kind: Some(kind) }
    }
}

/// Builds an [`EncodedBatch`] from records encoded without their sequence
/// number (as the agent's buffer stores them), numbering each one.
///
/// The number is appended after the record's bytes: protobuf keeps the last
/// value of a repeated scalar field, so it wins over any `seq` the stored
/// bytes may carry.
#[derive(Debug, Default)]
pub struct BatchBuilder {
    buf: BytesMut,
    ends: Vec<usize>,
}

impl BatchBuilder {
    pub fn with_capacity(records: usize, bytes: usize) -> Self {
        BatchBuilder {
            buf: BytesMut::with_capacity(bytes + records * 11),
            ends: Vec::with_capacity(records),
        }
    }

    pub fn push(&mut self, encoded_without_seq: &[u8], seq: u64) {
        self.buf.put_slice(encoded_without_seq);
        self.buf.put_u8(SEQ_KEY);
        prost::encoding::encode_varint(seq, &mut self.buf);
        self.ends.push(self.buf.len());
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Bytes of the records so far.
    pub fn bytes(&self) -> usize {
        self.buf.len()
    }

    pub fn finish(self) -> EncodedBatch {
        // One allocation for the whole batch; each record is a view into it.
        let all = self.buf.freeze();
        let mut start = 0;
        let records = self
            .ends
            .into_iter()
            .map(|end| {
                let record = all.slice(start..end);
                start = end;
                record
            })
            .collect();
        EncodedBatch {
            records,
            records_zstd: Bytes::new(),
        }
    }
}

/// Field 1 (`Record.seq`), wire type varint.
const SEQ_KEY: u8 = 1 << 3;
/// Field 1 (`RecordBatch.records`), wire type length-delimited.
const RECORDS_KEY: u8 = (1 << 3) | 2;

/// Bytes `seq` takes when [`BatchBuilder`] or [`write_entry`] numbers a record.
pub fn seq_len(seq: u64) -> usize {
    1 + prost::encoding::encoded_len_varint(seq)
}

/// Appends one `RecordBatch.records` entry to `out`: the record encoded
/// without its `seq`, numbered as [`BatchBuilder`] numbers it. A run of
/// these is a `RecordBatch`'s encoding, which is what the agent buffer's
/// segments hold, so a segment compressed on disk is a frame of
/// `RecordBatch.records_zstd` as it is ([`crate::batch_zstd`]).
pub fn write_entry(out: &mut Vec<u8>, encoded_without_seq: &[u8], seq: u64) {
    out.push(RECORDS_KEY);
    prost::encoding::encode_varint((encoded_without_seq.len() + seq_len(seq)) as u64, out);
    out.extend_from_slice(encoded_without_seq);
    out.push(SEQ_KEY);
    prost::encoding::encode_varint(seq, out);
}

/// The bytes [`write_entry`] writes for a record of `encoded_len` bytes
/// numbered `seq`.
pub fn entry_len(encoded_len: usize, seq: u64) -> usize {
    let len = encoded_len + seq_len(seq);
    1 + prost::encoding::encoded_len_varint(len as u64) + len
}

/// The record in an entry written by [`write_entry`] with `seq`, without
/// its number; `None` when the entry does not end in that number.
pub fn strip_seq(record: &[u8], seq: u64) -> Option<&[u8]> {
    let body = record.len().checked_sub(seq_len(seq))?;
    let mut tail = &record[body..];
    if tail.first() != Some(&SEQ_KEY) {
        return None;
    }
    tail = &tail[1..];
    (prost::encoding::decode_varint(&mut tail).ok() == Some(seq) && tail.is_empty())
        .then(|| &record[..body])
}

/// What is wrong with an encoded record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Record.{path}: {problem}")]
pub struct RecordError {
    /// The field below `Record`, as `signals.signals[3].name`.
    pub path: String,
    pub problem: &'static str,
}

/// Checks that `encoded` decodes as a `Record` (every field of the schema
/// with its wire type, strings valid UTF-8, lengths within the record) and
/// returns its `seq`, without allocating. Unknown fields are skipped, as
/// `prost` does; groups, which no edgefleet message uses, are refused.
///
/// Whatever this accepts, `Record::decode` accepts: the ingest stores what
/// it checked here and decodes it only when it is read back.
pub fn check_record(encoded: &[u8]) -> Result<u64, RecordError> {
    if let Some(seq) = quick::record(encoded) {
        return Ok(seq);
    }
    // Unknown fields, long varints or a damaged record: the general walk,
    // which also names what is wrong.
    walk_record(encoded).map_err(|(path, problem)| RecordError { path, problem })
}

/// The general walk over a `Record`; returns its `seq` (the last one, as
/// protobuf decodes it).
fn walk_record(encoded: &[u8]) -> Result<u64, WalkError> {
    let mut seq = 0;
    walk(encoded, Schema::Record, &mut |path, field| {
        if let (Schema::Record, 1, Field::Varint(v)) = (path, field.number, field.value) {
            seq = v;
        }
    })?;
    Ok(seq)
}

/// The check for the records every agent sends: only the fields of the
/// schema, one-byte keys. It runs for every record on both sides of the
/// stream (the agent's `read_batch`, the ingest's session), where the
/// general [`walk`] with its visitor and error paths was the top of the
/// profile. `None` means "not sure": the caller
/// falls back to the walk, so this may refuse more than the walk but must
/// never accept anything the walk refuses (tested below).
mod quick {
    #[inline(always)]
    fn varint(buf: &mut &[u8]) -> Option<u64> {
        let (&first, rest) = buf.split_first()?;
        if first < 0x80 {
            *buf = rest;
            return Some(u64::from(first));
        }
        long_varint(buf)
    }

    #[inline(never)]
    fn long_varint(buf: &mut &[u8]) -> Option<u64> {
        let mut value = 0u64;
        for (i, &byte) in buf.iter().take(10).enumerate() {
            // The tenth byte holds the 64th bit only; prost refuses more.
            if i == 9 && byte > 1 {
                return None;
            }
            value |= u64::from(byte & 0x7F) << (7 * i);
            if byte < 0x80 {
                *buf = &buf[i + 1..];
                return Some(value);
            }
        }
        None
    }

    #[inline(always)]
    fn delimited<'a>(buf: &mut &'a [u8]) -> Option<&'a [u8]> {
        let len = varint(buf)?;
        if len > buf.len() as u64 {
            return None;
        }
        let (body, rest) = buf.split_at(len as usize);
        *buf = rest;
        Some(body)
    }

    #[inline(always)]
    fn utf8(text: &[u8]) -> Option<()> {
        (text.is_ascii() || std::str::from_utf8(text).is_ok()).then_some(())
    }

    /// Returns the record's `seq` (the last one, as protobuf decodes it).
    pub(super) fn record(mut buf: &[u8]) -> Option<u64> {
        let mut seq = 0;
        while let Some((&key, rest)) = buf.split_first() {
            buf = rest;
            match key {
                0x08 => seq = varint(&mut buf)?,            // seq
                0x12 | 0x1A => utf8(delimited(&mut buf)?)?, // source, device_id
                0x20 => drop(varint(&mut buf)?),            // timestamp_ns
                0x2A => signals(delimited(&mut buf)?)?,
                0x32 => raw(delimited(&mut buf)?)?,
                _ => return None,
            }
        }
        Some(seq)
    }

    fn signals(mut buf: &[u8]) -> Option<()> {
        while let Some((&key, rest)) = buf.split_first() {
            buf = rest;
            match key {
                0x0A => signal(delimited(&mut buf)?)?,
                _ => return None,
            }
        }
        Some(())
    }

    #[inline(always)]
    fn signal(mut buf: &[u8]) -> Option<()> {
        while let Some((&key, rest)) = buf.split_first() {
            buf = rest;
            match key {
                // name, str, unit, label
                0x0A | 0x2A | 0x32 | 0x3A => utf8(delimited(&mut buf)?)?,
                // f64 (fixed64)
                0x11 => buf = buf.get(8..)?,
                // i64, bool
                0x18 | 0x20 => drop(varint(&mut buf)?),
                _ => return None,
            }
        }
        Some(())
    }

    fn raw(mut buf: &[u8]) -> Option<()> {
        while let Some((&key, rest)) = buf.split_first() {
            buf = rest;
            match key {
                0x0A => drop(delimited(&mut buf)?),  // data
                0x12 => utf8(delimited(&mut buf)?)?, // content_type
                _ => return None,
            }
        }
        Some(())
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Schema {
    Record,
    Signals,
    Signal,
    RawPayload,
}

#[derive(Clone, Copy)]
enum Field {
    Varint(u64),
    Fixed,
    Bytes,
}

struct Visited {
    number: u32,
    value: Field,
}

/// What a known field must be.
enum Expect {
    Varint,
    Fixed64,
    Utf8,
    Bytes,
    Message(Schema),
}

fn expect(schema: Schema, number: u32) -> Option<(&'static str, Expect)> {
    use Expect::*;
    Some(match (schema, number) {
        (Schema::Record, 1) => ("seq", Varint),
        (Schema::Record, 2) => ("source", Utf8),
        (Schema::Record, 3) => ("device_id", Utf8),
        (Schema::Record, 4) => ("timestamp_ns", Varint),
        (Schema::Record, 5) => ("signals", Message(Schema::Signals)),
        (Schema::Record, 6) => ("raw", Message(Schema::RawPayload)),
        (Schema::Signals, 1) => ("signals", Message(Schema::Signal)),
        (Schema::Signal, 1) => ("name", Utf8),
        (Schema::Signal, 2) => ("f64", Fixed64),
        (Schema::Signal, 3) => ("i64", Varint),
        (Schema::Signal, 4) => ("bool", Varint),
        (Schema::Signal, 5) => ("str", Utf8),
        (Schema::Signal, 6) => ("unit", Utf8),
        (Schema::Signal, 7) => ("label", Utf8),
        (Schema::RawPayload, 1) => ("data", Bytes),
        (Schema::RawPayload, 2) => ("content_type", Utf8),
        _ => return None,
    })
}

/// (path of the field below the message walked, what is wrong).
type WalkError = (String, &'static str);

fn walk(
    mut buf: &[u8],
    schema: Schema,
    visit: &mut dyn FnMut(Schema, Visited),
) -> Result<(), WalkError> {
    let fail = |name: &str, problem| Err((name.to_string(), problem));
    // Elements of a repeated message field, for error paths.
    let mut index = 0usize;
    while buf.has_remaining() {
        let Ok(key) = prost::encoding::decode_varint(&mut buf) else {
            return fail("(field key)", "malformed field key");
        };
        let (number, wire_type) = ((key >> 3) as u32, (key & 7) as u8);
        if number == 0 || key > u64::from(u32::MAX) {
            return fail("(field key)", "invalid field number");
        }
        let known = expect(schema, number);
        let name = known.as_ref().map_or("(unknown field)", |(n, _)| *n);
        let value = match wire_type {
            0 => match prost::encoding::decode_varint(&mut buf) {
                Ok(v) => Field::Varint(v),
                Err(_) => return fail(name, "bad varint"),
            },
            1 | 5 => {
                let width = if wire_type == 1 { 8 } else { 4 };
                if buf.len() < width {
                    return fail(name, "truncated");
                }
                buf.advance(width);
                Field::Fixed
            }
            2 => {
                let Ok(len) = prost::encoding::decode_varint(&mut buf) else {
                    return fail(name, "bad length");
                };
                if len > buf.len() as u64 {
                    return fail(name, "length runs past the end");
                }
                let (body, rest) = buf.split_at(len as usize);
                buf = rest;
                match &known {
                    Some((_, Expect::Utf8)) if std::str::from_utf8(body).is_err() => {
                        return fail(name, "not valid UTF-8");
                    }
                    Some((_, Expect::Message(inner))) => {
                        let element = index;
                        if *inner == Schema::Signal {
                            index += 1;
                        }
                        // The path is built only on failure: this runs for
                        // every signal of every record.
                        walk(body, *inner, visit).map_err(|(path, problem)| {
                            let element = if *inner == Schema::Signal {
                                format!("{name}[{element}]")
                            } else {
                                name.to_string()
                            };
                            (format!("{element}.{path}"), problem)
                        })?;
                    }
                    _ => {}
                }
                Field::Bytes
            }
            _ => return fail(name, "unsupported wire type (groups are not used)"),
        };
        if let Some((_, want)) = &known {
            let matches = matches!(
                (want, value, wire_type),
                (Expect::Varint, Field::Varint(_), _)
                    | (Expect::Fixed64, Field::Fixed, 1)
                    | (
                        Expect::Utf8 | Expect::Bytes | Expect::Message(_),
                        Field::Bytes,
                        _
                    )
            );
            if !matches {
                return fail(name, "wrong wire type");
            }
        }
        visit(schema, Visited { number, value });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{record, signal, AgentMessage, RawPayload, Record, RecordBatch, Signal, Signals};
    use proptest::prelude::*;
    use prost::Message;

    fn sample(seq: u64) -> Record {
        Record {
            seq,
            source: "mqtt".into(),
            device_id: "dev-00042".into(),
            timestamp_ns: 1_700_000_000_000_000_000,
            value: Some(record::Value::Signals(Signals {
                signals: vec![
                    Signal::f64("temp", 21.5),
                    Signal::i64("count", -7),
                    Signal::bool("door", true),
                    Signal::str("mode", "eco"),
                ],
            })),
        }
    }

    #[test]
    fn a_built_batch_decodes_as_a_record_batch_with_the_new_numbers() {
        let mut builder = BatchBuilder::default();
        // Stored without seq, and (as migrated buffers hold) with an old one.
        builder.push(&sample(0).encode_to_vec(), 41);
        builder.push(&sample(7).encode_to_vec(), 42);
        let frame = AgentFrame::new(AgentFrameKind::Batch(builder.finish()));
        let decoded = AgentMessage::decode(frame.encode_to_vec().as_slice()).unwrap();
        let Some(crate::agent_message::Kind::Batch(RecordBatch { records, .. })) = decoded.kind
        else {
            panic!("not a batch: {decoded:?}");
        };
        assert_eq!(records, vec![sample(41), sample(42)]);
    }

    #[test]
    fn a_generated_message_reads_as_a_frame_and_every_record_checks() {
        let message = AgentMessage {
            kind: Some(crate::agent_message::Kind::Batch(RecordBatch {
                records: vec![sample(1), sample(2)],
                ..Default::default()
            })),
        };
        let frame = AgentFrame::decode(message.encode_to_vec().as_slice()).unwrap();
        let Some(AgentFrameKind::Batch(batch)) = frame.kind else {
            panic!("not a batch");
        };
        let seqs: Vec<u64> = batch
            .records
            .iter()
            .map(|r| check_record(r).unwrap())
            .collect();
        assert_eq!(seqs, vec![1, 2]);
        assert_eq!(Record::decode(batch.records[1].clone()).unwrap(), sample(2));
    }

    #[test]
    fn problems_are_named_by_field_path() {
        let mut bad_name = sample(3);
        if let Some(record::Value::Signals(s)) = &mut bad_name.value {
            s.signals[2].name = "\u{FFFF}x".into();
        }
        let mut bytes = bad_name.encode_to_vec();
        // Replace the valid U+FFFF (EF BF BF) with an invalid UTF-8 sequence.
        let at = bytes
            .windows(3)
            .position(|w| w == [0xEF, 0xBF, 0xBF])
            .unwrap();
        bytes[at] = 0xFF;
        let err = check_record(&bytes).unwrap_err();
        assert_eq!(err.path, "signals.signals[2].name");
        assert_eq!(err.problem, "not valid UTF-8");

        let err = check_record(&[0x08]).unwrap_err();
        assert_eq!((err.path.as_str(), err.problem), ("seq", "bad varint"));
        let err = check_record(&[0x1A, 0x05, b'a']).unwrap_err();
        assert_eq!(err.problem, "length runs past the end");
        // seq sent as a string.
        let err = check_record(&[0x0A, 0x01, b'a']).unwrap_err();
        assert_eq!((err.path.as_str(), err.problem), ("seq", "wrong wire type"));
        assert!(check_record(&[0x00]).is_err(), "field number 0");
    }

    #[test]
    fn unknown_fields_are_skipped_like_prost_does() {
        let mut bytes = sample(9).encode_to_vec();
        // Field 15, length-delimited, 2 bytes; and field 16 as a varint.
        bytes.extend_from_slice(&[0x7A, 0x02, 0xFF, 0xFF, 0x80, 0x01, 0x05]);
        assert_eq!(check_record(&bytes).unwrap(), 9);
        assert_eq!(Record::decode(bytes.as_slice()).unwrap().seq, 9);
        let raw = Record {
            seq: 4,
            value: Some(record::Value::Raw(RawPayload {
                data: vec![0xFF, 0x00],
                content_type: "application/octet-stream".into(),
            })),
            ..Record::default()
        };
        assert_eq!(check_record(&raw.encode_to_vec()).unwrap(), 4);
    }

    fn arb_record() -> impl Strategy<Value = Record> {
        let signal = (
            ".{0,8}",
            prop_oneof![
                any::<f64>().prop_map(signal::Value::F64),
                any::<i64>().prop_map(signal::Value::I64),
                any::<bool>().prop_map(signal::Value::Bool),
                ".{0,8}".prop_map(signal::Value::Str),
            ],
            ".{0,4}",
        )
            .prop_map(|(name, value, unit)| Signal {
                name,
                value: Some(value),
                unit,
                label: String::new(),
            });
        (
            any::<u64>(),
            ".{0,6}",
            any::<i64>(),
            prop::collection::vec(signal, 0..6),
        )
            .prop_map(|(seq, device_id, timestamp_ns, signals)| Record {
                seq,
                source: "mqtt".into(),
                device_id,
                timestamp_ns,
                value: Some(record::Value::Signals(Signals { signals })),
            })
    }

    /// Encoded records with a few bytes overwritten, then cut somewhere.
    fn arb_damaged_record() -> impl Strategy<Value = Vec<u8>> {
        (
            arb_record(),
            prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
            any::<prop::sample::Index>(),
        )
            .prop_map(|(record, flips, cut)| {
                let mut bytes = record.encode_to_vec();
                if !bytes.is_empty() {
                    for (at, value) in flips {
                        let i = at.index(bytes.len());
                        bytes[i] = value;
                    }
                }
                bytes.truncate(cut.index(bytes.len() + 1));
                bytes
            })
    }

    proptest! {
        #[test]
        fn every_encoded_record_checks_with_its_seq(record in arb_record()) {
            prop_assert_eq!(check_record(&record.encode_to_vec()), Ok(record.seq));
        }

        /// The quick check takes every record an agent makes, so the walk
        /// is only the fallback.
        #[test]
        fn the_quick_check_takes_every_well_formed_record(record in arb_record()) {
            prop_assert_eq!(quick::record(&record.encode_to_vec()), Some(record.seq));
        }

        /// The quick check never accepts what the general walk refuses, and
        /// reads the same `seq` (damaged records as below).
        #[test]
        fn the_quick_check_accepts_nothing_the_walk_refuses(bytes in arb_damaged_record()) {
            if let Some(seq) = quick::record(&bytes) {
                prop_assert_eq!(walk_record(&bytes), Ok(seq), "quick accepted");
            }
        }

        /// The promise the ingest relies on: what the check accepts, prost
        /// decodes (damaged records from flipped and cut bytes).
        #[test]
        fn whatever_checks_decodes(bytes in arb_damaged_record()) {
            if let Ok(seq) = check_record(&bytes) {
                let decoded = Record::decode(bytes.as_slice());
                prop_assert!(decoded.is_ok(), "checked but does not decode: {:?}", decoded);
                prop_assert_eq!(decoded.unwrap().seq, seq);
            }
        }
    }
}
