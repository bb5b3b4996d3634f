//! Records written straight to their wire form.
//!
//! A source that built a `Record` (a `String` per name, a `Vec` of signals)
//! only for the buffer to encode and free it again paid for three passes
//! over every record; in the `spine` profile encoding and freeing them was
//! most of the buffer's committer thread. [`RecordWriter`] writes the bytes
//! `prost` would write for the same record, from borrowed names and values,
//! and [`EncodedRecord`] carries them to the buffer, which stores them as
//! they are.

use prost::Message;

use crate::encoded::{check_record, RecordError};
use crate::Record;

/// A `Record` in its wire form, without `seq` (the buffer numbers records
/// by position; see `edgefleet_buffer`). Always a valid record: it can only
/// be made by encoding a `Record`, by a [`RecordWriter`], or from bytes that
/// pass [`check_record`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedRecord(Vec<u8>);

impl EncodedRecord {
    /// Checks bytes from elsewhere (a file, a peer) before they are taken
    /// as a record.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, RecordError> {
        check_record(&bytes)?;
        Ok(EncodedRecord(bytes))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The record as generated types (for tests and tools; the data path
    /// never decodes).
    pub fn to_record(&self) -> Record {
        Record::decode(self.0.as_slice()).expect("an EncodedRecord is always a valid Record")
    }
}

impl From<Record> for EncodedRecord {
    fn from(mut record: Record) -> Self {
        record.seq = 0;
        EncodedRecord(record.encode_to_vec())
    }
}

impl AsRef<[u8]> for EncodedRecord {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// The value of one signal (`Signal.value`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SignalValue<'a> {
    F64(f64),
    I64(i64),
    Bool(bool),
    Str(&'a str),
}

/// Writes records of signals. The signals of one record are written first
/// (their total length goes before them), then [`RecordWriter::finish`]
/// writes the record around them; the writer keeps its allocation for the
/// next record.
#[derive(Debug, Default)]
pub struct RecordWriter {
    /// `Signals.signals` entries of the record being written.
    signals: Vec<u8>,
    /// Whether any signal was written since the last `finish`.
    any: bool,
}

// Keys (field number << 3 | wire type) of the fields written here; every
// field number is below 16, so each key is one byte.
const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const fn key(field: u8, wire_type: u8) -> u8 {
    field << 3 | wire_type
}

impl RecordWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a signal with neither unit nor label.
    pub fn signal(&mut self, name: &str, value: SignalValue<'_>) {
        self.signal_with(name, value, "", "");
    }

    pub fn signal_with(&mut self, name: &str, value: SignalValue<'_>, unit: &str, label: &str) {
        let value_len = match value {
            SignalValue::F64(_) => 1 + 8,
            SignalValue::I64(v) => 1 + varint_len(zigzag(v)),
            SignalValue::Bool(_) => 2,
            SignalValue::Str(s) => delimited_len(s.len()),
        };
        let len = optional_delimited_len(name.len())
            + value_len
            + optional_delimited_len(unit.len())
            + optional_delimited_len(label.len());
        let out = &mut self.signals;
        out.reserve(1 + varint_len(len as u64) + len);
        out.push(key(1, LEN));
        put_varint(out, len as u64);
        put_optional_bytes(out, 1, name.as_bytes());
        match value {
            SignalValue::F64(v) => {
                out.push(key(2, FIXED64));
                out.extend_from_slice(&v.to_le_bytes());
            }
            SignalValue::I64(v) => {
                out.push(key(3, VARINT));
                put_varint(out, zigzag(v));
            }
            SignalValue::Bool(v) => out.extend_from_slice(&[key(4, VARINT), u8::from(v)]),
            SignalValue::Str(s) => put_bytes(out, 5, s.as_bytes()),
        }
        put_optional_bytes(out, 6, unit.as_bytes());
        put_optional_bytes(out, 7, label.as_bytes());
        self.any = true;
    }

    /// Forgets the signals written since the last `finish`.
    pub fn clear(&mut self) {
        self.signals.clear();
        self.any = false;
    }

    /// Whether no signal was written since the last `finish`.
    pub fn is_empty(&self) -> bool {
        !self.any
    }

    /// The record of the signals written since the last `finish` (a record
    /// with an empty `Signals` when there were none).
    pub fn finish(&mut self, source: &str, device_id: &str, timestamp_ns: i64) -> EncodedRecord {
        let mut out = Vec::with_capacity(self.finished_len(source, device_id, timestamp_ns));
        self.write_finished(&mut out, source, device_id, timestamp_ns);
        EncodedRecord(out)
    }

    /// [`RecordWriter::finish`], the record written at the end of `records`
    /// instead of into an allocation of its own.
    pub fn finish_to(
        &mut self,
        records: &mut EncodedRecords,
        source: &str,
        device_id: &str,
        timestamp_ns: i64,
    ) {
        records
            .bytes
            .reserve(self.finished_len(source, device_id, timestamp_ns));
        self.write_finished(&mut records.bytes, source, device_id, timestamp_ns);
        records.close_record();
    }

    fn finished_len(&self, source: &str, device_id: &str, timestamp_ns: i64) -> usize {
        head_len(source, device_id, timestamp_ns) + delimited_len(self.signals.len())
    }

    fn write_finished(
        &mut self,
        out: &mut Vec<u8>,
        source: &str,
        device_id: &str,
        timestamp_ns: i64,
    ) {
        put_head(out, source, device_id, timestamp_ns);
        out.push(key(5, LEN));
        put_varint(out, self.signals.len() as u64);
        out.extend_from_slice(&self.signals);
        self.clear();
    }

    /// A record of a payload kept as it came (`RawPayload`).
    pub fn raw(
        source: &str,
        device_id: &str,
        timestamp_ns: i64,
        data: &[u8],
        content_type: &str,
    ) -> EncodedRecord {
        let mut out = Vec::new();
        write_raw(
            &mut out,
            source,
            device_id,
            timestamp_ns,
            data,
            content_type,
        );
        EncodedRecord(out)
    }

    /// [`RecordWriter::raw`], the record written at the end of `records`.
    pub fn raw_to(
        records: &mut EncodedRecords,
        source: &str,
        device_id: &str,
        timestamp_ns: i64,
        data: &[u8],
        content_type: &str,
    ) {
        write_raw(
            &mut records.bytes,
            source,
            device_id,
            timestamp_ns,
            data,
            content_type,
        );
        records.close_record();
    }
}

fn write_raw(
    out: &mut Vec<u8>,
    source: &str,
    device_id: &str,
    timestamp_ns: i64,
    data: &[u8],
    content_type: &str,
) {
    let raw_len = optional_delimited_len(data.len()) + optional_delimited_len(content_type.len());
    out.reserve(head_len(source, device_id, timestamp_ns) + delimited_len(raw_len));
    put_head(out, source, device_id, timestamp_ns);
    out.push(key(6, LEN));
    put_varint(out, raw_len as u64);
    put_optional_bytes(out, 1, data);
    put_optional_bytes(out, 2, content_type.as_bytes());
}

/// Records in their wire form packed back to back in one buffer: what a
/// source hands the buffer for one append. A record in an allocation of its
/// own is allocated on the source's thread and freed on the buffer's
/// committer thread, and glibc takes an arena lock for each such free; in
/// the `spine` profile that was a fifth of the committer thread and half of
/// the source's (BENCHMARKS.md, "One allocation per append"). Every record
/// in it is valid, for the same reasons as an [`EncodedRecord`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EncodedRecords {
    bytes: Vec<u8>,
    /// Where each record ends in `bytes`.
    ends: Vec<usize>,
}

impl EncodedRecords {
    pub fn new() -> Self {
        Self::default()
    }

    /// Room for `records` records of `bytes` bytes in all.
    pub fn with_capacity(records: usize, bytes: usize) -> Self {
        EncodedRecords {
            bytes: Vec::with_capacity(bytes),
            ends: Vec::with_capacity(records),
        }
    }

    pub fn push(&mut self, record: &EncodedRecord) {
        self.bytes.extend_from_slice(record.as_bytes());
        self.close_record();
    }

    fn close_record(&mut self) {
        self.ends.push(self.bytes.len());
    }

    /// How many records.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The records' bytes together.
    pub fn total_bytes(&self) -> usize {
        self.bytes.len()
    }

    /// The `index`th record's wire form.
    pub fn get(&self, index: usize) -> Option<&[u8]> {
        (index < self.len()).then(|| self.record(index))
    }

    /// Each record's wire form, in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = &[u8]> + '_ {
        (0..self.len()).map(|index| self.record(index))
    }

    /// Record `index`, which must be below `len()`.
    fn record(&self, index: usize) -> &[u8] {
        let start = index.checked_sub(1).map_or(0, |before| self.ends[before]);
        &self.bytes[start..self.ends[index]]
    }
}

impl From<&EncodedRecord> for EncodedRecords {
    fn from(record: &EncodedRecord) -> Self {
        let mut records = EncodedRecords::with_capacity(1, record.len());
        records.push(record);
        records
    }
}

impl<'a> FromIterator<&'a EncodedRecord> for EncodedRecords {
    fn from_iter<I: IntoIterator<Item = &'a EncodedRecord>>(iter: I) -> Self {
        let mut records = EncodedRecords::new();
        for record in iter {
            records.push(record);
        }
        records
    }
}

/// `Record` fields 2 to 4, each left out when it has its default value, as
/// proto3 (and `prost`) does.
fn put_head(out: &mut Vec<u8>, source: &str, device_id: &str, timestamp_ns: i64) {
    put_optional_bytes(out, 2, source.as_bytes());
    put_optional_bytes(out, 3, device_id.as_bytes());
    if timestamp_ns != 0 {
        out.push(key(4, VARINT));
        // int64: two's complement, so a negative time takes ten bytes.
        put_varint(out, timestamp_ns as u64);
    }
}

fn head_len(source: &str, device_id: &str, timestamp_ns: i64) -> usize {
    optional_delimited_len(source.len())
        + optional_delimited_len(device_id.len())
        + if timestamp_ns != 0 {
            1 + varint_len(timestamp_ns as u64)
        } else {
            0
        }
}

fn put_bytes(out: &mut Vec<u8>, field: u8, bytes: &[u8]) {
    out.push(key(field, LEN));
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn put_optional_bytes(out: &mut Vec<u8>, field: u8, bytes: &[u8]) {
    if !bytes.is_empty() {
        put_bytes(out, field, bytes);
    }
}

fn put_varint(out: &mut Vec<u8>, value: u64) {
    prost::encoding::encode_varint(value, out);
}

fn varint_len(value: u64) -> usize {
    prost::encoding::encoded_len_varint(value)
}

/// Key, length and body of a length-delimited field.
fn delimited_len(len: usize) -> usize {
    1 + varint_len(len as u64) + len
}

fn optional_delimited_len(len: usize) -> usize {
    if len == 0 {
        0
    } else {
        delimited_len(len)
    }
}

/// `sint64`'s encoding.
fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{record, signal, RawPayload, Signal, Signals};
    use proptest::prelude::*;

    fn value_of(v: &signal::Value) -> SignalValue<'_> {
        match v {
            signal::Value::F64(v) => SignalValue::F64(*v),
            signal::Value::I64(v) => SignalValue::I64(*v),
            signal::Value::Bool(v) => SignalValue::Bool(*v),
            signal::Value::Str(v) => SignalValue::Str(v),
        }
    }

    fn arb_value() -> impl Strategy<Value = signal::Value> {
        prop_oneof![
            any::<f64>().prop_map(signal::Value::F64),
            any::<i64>().prop_map(signal::Value::I64),
            any::<bool>().prop_map(signal::Value::Bool),
            ".{0,20}".prop_map(signal::Value::Str),
        ]
    }

    fn arb_signal() -> impl Strategy<Value = Signal> {
        (".{0,12}", arb_value(), "[a-z%/]{0,4}", "[a-z ]{0,6}").prop_map(
            |(name, value, unit, label)| Signal {
                name,
                value: Some(value),
                unit,
                label,
            },
        )
    }

    proptest! {
        /// The writer's bytes are exactly prost's for the same record: the
        /// ingest and every reader decode them with prost, and a stored
        /// record's size must not depend on which path wrote it.
        #[test]
        fn signals_are_written_exactly_as_prost_encodes_them(
            source in ".{0,10}",
            device in ".{0,24}",
            timestamp_ns in prop_oneof![Just(0i64), any::<i64>()],
            signals in proptest::collection::vec(arb_signal(), 0..8),
        ) {
            let mut writer = RecordWriter::new();
            for s in &signals {
                writer.signal_with(&s.name, value_of(s.value.as_ref().unwrap()), &s.unit, &s.label);
            }
            let written = writer.finish(&source, &device, timestamp_ns);
            let record = Record {
                seq: 0,
                source,
                device_id: device,
                timestamp_ns,
                value: Some(record::Value::Signals(Signals { signals })),
            };
            prop_assert_eq!(written.as_bytes().to_vec(), record.encode_to_vec());
            prop_assert!(check_record(written.as_bytes()).is_ok());
            prop_assert!(writer.is_empty());
        }

        #[test]
        fn raw_payloads_are_written_exactly_as_prost_encodes_them(
            data in proptest::collection::vec(any::<u8>(), 0..300),
            content_type in "[a-z/]{0,16}",
            timestamp_ns in any::<i64>(),
        ) {
            let written = RecordWriter::raw("mqtt", "d", timestamp_ns, &data, &content_type);
            let record = Record {
                seq: 0,
                source: "mqtt".into(),
                device_id: "d".into(),
                timestamp_ns,
                value: Some(record::Value::Raw(RawPayload { data, content_type })),
            };
            prop_assert_eq!(written.as_bytes().to_vec(), record.encode_to_vec());
        }

        /// Records written into one packed run, by every way there is to
        /// put one there, read back as the same bytes, one by one and in
        /// order, as records written each into its own allocation.
        #[test]
        fn packed_records_are_the_records_written_one_by_one(
            records in proptest::collection::vec(
                (".{0,12}", 0..3u8, proptest::collection::vec(arb_signal(), 0..4),
                 proptest::collection::vec(any::<u8>(), 0..40)),
                0..12,
            ),
        ) {
            let mut packed = EncodedRecords::new();
            let mut alone = Vec::new();
            let mut writer = RecordWriter::new();
            for (i, (device, how, signals, data)) in records.iter().enumerate() {
                let record = match how {
                    0 => {
                        for s in signals {
                            writer.signal_with(&s.name, value_of(s.value.as_ref().unwrap()), &s.unit, &s.label);
                        }
                        writer.finish_to(&mut packed, "can", device, i as i64);
                        for s in signals {
                            writer.signal_with(&s.name, value_of(s.value.as_ref().unwrap()), &s.unit, &s.label);
                        }
                        writer.finish("can", device, i as i64)
                    }
                    1 => {
                        RecordWriter::raw_to(&mut packed, "mqtt", device, 7, data, "x/y");
                        RecordWriter::raw("mqtt", device, 7, data, "x/y")
                    }
                    _ => {
                        let record = RecordWriter::raw("mqtt", device, 0, data, "");
                        packed.push(&record);
                        record
                    }
                };
                alone.push(record);
            }
            prop_assert_eq!(packed.len(), alone.len());
            prop_assert_eq!(packed.is_empty(), alone.is_empty());
            prop_assert_eq!(packed.total_bytes(), alone.iter().map(EncodedRecord::len).sum::<usize>());
            let read: Vec<&[u8]> = packed.iter().collect();
            let expected: Vec<&[u8]> = alone.iter().map(EncodedRecord::as_bytes).collect();
            prop_assert_eq!(&read, &expected);
            for (i, record) in alone.iter().enumerate() {
                prop_assert_eq!(packed.get(i), Some(record.as_bytes()));
            }
            prop_assert_eq!(packed.get(alone.len()), None);
            prop_assert_eq!(EncodedRecords::from_iter(&alone), packed);
        }
    }

    #[test]
    fn the_writer_starts_each_record_afresh() {
        let mut writer = RecordWriter::new();
        writer.signal("a", SignalValue::I64(1));
        let first = writer.finish("s", "d", 5);
        writer.signal("b", SignalValue::Bool(false));
        let second = writer.finish("s", "d", 6).to_record();
        let Some(record::Value::Signals(s)) = second.value else {
            panic!("no signals: {second:?}");
        };
        assert_eq!(s.signals, vec![Signal::bool("b", false)]);
        assert_eq!(first.to_record().timestamp_ns, 5);
    }

    #[test]
    fn bytes_from_elsewhere_are_checked_and_the_seq_is_left_out_of_records() {
        assert!(EncodedRecord::from_bytes(vec![0x2A, 0x05, 0x0A]).is_err());
        let record = Record {
            seq: 99,
            source: "can0".into(),
            ..Default::default()
        };
        let encoded = EncodedRecord::from(record);
        assert_eq!(encoded.to_record().seq, 0);
        assert_eq!(
            EncodedRecord::from_bytes(encoded.as_bytes().to_vec()).unwrap(),
            encoded
        );
    }
}
