//! What one `Buffer::append` takes: records packed back to back, and the
//! few that carry a dedupe key.

use edgefleet_proto::{EncodedRecord, EncodedRecords};

use crate::{DedupeKey, Incoming};

/// The records of one append, in one allocation ([`EncodedRecords`]), each
/// optionally marked with a [`DedupeKey`]. Sources write into it directly
/// (`RecordWriter::finish_to`); a `Vec<Incoming>` converts into one.
#[derive(Debug, Clone, Default)]
pub struct AppendBatch {
    records: EncodedRecords,
    /// Sorted by record index; most records of most sources have none, so
    /// they are kept beside the records rather than one slot per record.
    dedupe: Vec<(usize, DedupeKey)>,
}

impl AppendBatch {
    pub fn new() -> Self {
        Self::default()
    }

    /// Room for `records` records of `bytes` bytes in all.
    pub fn with_capacity(records: usize, bytes: usize) -> Self {
        AppendBatch {
            records: EncodedRecords::with_capacity(records, bytes),
            dedupe: Vec::new(),
        }
    }

    pub fn push(&mut self, record: &EncodedRecord, dedupe: Option<DedupeKey>) {
        self.records.push(record);
        if let Some(key) = dedupe {
            self.dedupe_last(key);
        }
    }

    /// Where a source writes its next record
    /// (`RecordWriter::finish_to`, `RecordWriter::raw_to`).
    pub fn records_mut(&mut self) -> &mut EncodedRecords {
        &mut self.records
    }

    /// Marks the record added last as one its source may deliver again.
    /// A second key for the same record replaces the first.
    pub fn dedupe_last(&mut self, key: DedupeKey) {
        let Some(last) = self.records.len().checked_sub(1) else {
            debug_assert!(false, "a dedupe key without a record");
            return;
        };
        match self.dedupe.last_mut() {
            Some((at, earlier)) if *at == last => *earlier = key,
            _ => self.dedupe.push((last, key)),
        }
    }

    pub fn records(&self) -> &EncodedRecords {
        &self.records
    }

    /// How many records.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Each record's bytes with its dedupe key, in order; the keys are
    /// moved out.
    pub(crate) fn drain(&mut self) -> impl Iterator<Item = (&[u8], Option<DedupeKey>)> + '_ {
        let mut keys = self.dedupe.drain(..).peekable();
        self.records.iter().enumerate().map(move |(i, bytes)| {
            let key = keys.next_if(|(at, _)| *at == i).map(|(_, key)| key);
            (bytes, key)
        })
    }
}

impl From<Vec<Incoming>> for AppendBatch {
    fn from(incoming: Vec<Incoming>) -> Self {
        incoming.into_iter().collect()
    }
}

impl FromIterator<Incoming> for AppendBatch {
    fn from_iter<I: IntoIterator<Item = Incoming>>(iter: I) -> Self {
        let mut batch = AppendBatch::new();
        for Incoming { record, dedupe } in iter {
            batch.push(&record, dedupe);
        }
        batch
    }
}

impl From<Vec<EncodedRecord>> for AppendBatch {
    fn from(records: Vec<EncodedRecord>) -> Self {
        AppendBatch {
            records: records.iter().collect(),
            dedupe: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgefleet_proto::RecordWriter;

    fn key(n: u8) -> DedupeKey {
        DedupeKey {
            scope: crate::DedupeScope {
                names: 0,
                number: 0,
            },
            id: n.into(),
            fingerprint: [n; 16],
            earlier_fingerprint: None,
            redelivery: false,
        }
    }

    #[test]
    fn keys_stay_with_their_records() {
        let records: Vec<EncodedRecord> = (0..5)
            .map(|i| RecordWriter::raw("s", &format!("d{i}"), 1, &[i], ""))
            .collect();
        let mut batch = AppendBatch::new();
        batch.push(&records[0], None);
        batch.push(&records[1], Some(key(1)));
        batch.push(&records[2], None);
        RecordWriter::raw_to(batch.records_mut(), "s", "d3", 1, &[3], "");
        batch.dedupe_last(key(9));
        batch.dedupe_last(key(3));
        batch.push(&records[4], Some(key(4)));
        assert_eq!(batch.len(), 5);
        let drained: Vec<(Vec<u8>, Option<DedupeKey>)> = batch
            .drain()
            .map(|(bytes, key)| (bytes.to_vec(), key))
            .collect();
        let expected: Vec<(Vec<u8>, Option<DedupeKey>)> = records
            .iter()
            .zip([None, Some(key(1)), None, Some(key(3)), Some(key(4))])
            .map(|(r, key)| (r.as_bytes().to_vec(), key))
            .collect();
        assert_eq!(drained, expected);
    }

    #[test]
    fn incoming_converts_with_its_keys() {
        let record = RecordWriter::raw("s", "d", 1, b"x", "");
        let batch: AppendBatch = vec![
            Incoming::from(record.clone()),
            Incoming {
                record: record.clone(),
                dedupe: Some(key(7)),
            },
        ]
        .into();
        assert_eq!(batch.dedupe, vec![(1, key(7))]);
        assert_eq!(batch.records().get(1), Some(record.as_bytes()));
    }
}
