//! The value of a segment: a run of records of one group commit.
//!
//! ```text
//! [tag = 3] [crc32 of the rest, u32 LE] [first seq as written, u64 LE] [one zstd frame of the entries]
//! [tag = 4] [crc32 of the rest, u32 LE] [first seq as written, u64 LE] [the entries]
//! [tag = 1] [crc32 of the body, u32 LE] [body: (varint length, Record)*]   (earlier agents)
//! [tag = 2] [crc32 of the frame, u32 LE] [one zstd frame of a tag-1 body]  (earlier agents)
//! ```
//!
//! The entries are `RecordBatch.records` entries, each record numbered at
//! its end ([`edgefleet_proto::encoded::write_entry`]): a compressed
//! segment is a frame of the wire's `RecordBatch.records_zstd` as it is,
//! which the uplink sends without decompressing or compressing anything
//! (`Buffer::read_batch`). Compressing every record again on its way out
//! cost as much CPU as the rest of the agent's path together
//! (BENCHMARKS.md, "Segments sent as stored").
//!
//! A record's sequence number is its position: the segment key's first
//! sequence number plus its index. The number written into the entries is
//! the one the record had when it was written; an anchor renumbers a
//! segment by moving it to a new key without touching the value, and a
//! reader then strips the written numbers and numbers the records by the
//! key. Tags 1 and 2 (records without numbers) are read, never written.
//!
//! The checksum: sequence numbers are implicit, so a damaged length prefix
//! would shift every later record onto the wrong number, or a flipped bit
//! would decode into a plausible, wrong record; the CRC (crc32fast, already
//! linked through sled) turns both into a detected, skipped segment, and
//! keeps a damaged frame from reaching the ingest, which would refuse its
//! batch every time it was sent.
//!
//! Compression: telemetry records repeat their signal names, source and
//! device, and a segment of them shrinks about sixfold with zstd's fastest
//! levels. Every byte of a value is written several times over by sled
//! (each insert rewrites its leaf, and a leaf splits at 17 values whatever
//! their size) and copied in memory on each insert, so a smaller value is
//! less disk bandwidth, less CPU in sled, and a buffer that holds more
//! records under the same byte cap, the backlog an offline site keeps
//! (BENCHMARKS.md, "Compressed segments"). A segment that does not shrink
//! is stored as tag 4. The zstd library is the one tonic already links.

use edgefleet_proto::batch_zstd::FRAME_PLAIN_BYTES;
use edgefleet_proto::encoded::{strip_seq, write_entry};
use edgefleet_proto::stored_zstd::{content_size, decompress_into, StoredCompressor};
use edgefleet_proto::Record;
use prost::bytes::Buf;
use prost::Message;

pub const TAG_V1: u8 = 1;
pub const TAG_V1_ZSTD: u8 = 2;
pub const TAG_ZSTD: u8 = 3;
pub const TAG_PLAIN: u8 = 4;
const V1_HEADER_LEN: usize = 5;
pub const HEADER_LEN: usize = 13;

/// The largest value a segment is stored as (unless one record is larger).
///
/// sled writes any page over a quarter of its 512 KiB log segment to a file
/// of its own (a blob), which then costs a file creation, two fsyncs (the
/// file and its directory) and an unlink when freed; and a leaf page holds
/// up to 17 values before it splits. Values of 7 KiB keep even a full leaf
/// in the log. With one segment per group (up to 8,192 records, most of a
/// MiB) every commit made a blob: a quarter of the buffer thread's time
/// went to creating, listing and deleting them (BENCHMARKS.md, "spine").
pub const MAX_BYTES: usize = 7 * 1024;

/// A new record starts a new segment rather than take one past this many
/// bytes uncompressed (as [`measured_len`] counts them, header included):
/// the size of the frames the uplink sends, which compressed come to a few
/// KiB, under [`MAX_BYTES`]. A run that compresses less is stored in
/// pieces ([`Sealer`]).
pub const MAX_PLAIN: usize = FRAME_PLAIN_BYTES;

/// What a record's sequence number can take at most in an entry: its key
/// and a ten-byte varint.
const MAX_SEQ_LEN: usize = 11;

/// What a record of `encoded_len` bytes counts against the byte cap until
/// its segment is sealed: its entry with the longest sequence number, so
/// the count does not depend on the number it gets.
pub fn measured_len(encoded_len: usize) -> usize {
    let len = encoded_len + MAX_SEQ_LEN;
    1 + prost::encoding::encoded_len_varint(len as u64) + len
}

/// What records of `encoded_lens` count when added to a segment now
/// measuring `open` (0: none open), headers of the segments they start
/// included: the same boundaries as the committer draws.
pub fn measured_total(mut open: usize, encoded_lens: &[usize]) -> u64 {
    let mut total = 0u64;
    for &len in encoded_lens {
        if starts_new(open, len) {
            total += HEADER_LEN as u64;
            open = HEADER_LEN;
        }
        open += measured_len(len);
        total += measured_len(len) as u64;
    }
    total
}

/// Whether a record of `encoded_len` starts a new segment, the one open
/// measuring `open` (0: none open).
pub fn starts_new(open: usize, encoded_len: usize) -> bool {
    open == 0 || open + measured_len(encoded_len) > MAX_PLAIN
}

/// What a damaged segment looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Damage {
    Header,
    Checksum,
    /// The lengths do not add up to the number of records the key names.
    Framing,
    /// A compressed segment whose frame does not decompress.
    Decompress,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Damage::Header => "bad segment header",
            Damage::Checksum => "segment checksum mismatch",
            Damage::Framing => "segment record framing does not match its key",
            Damage::Decompress => "compressed segment does not decompress",
        })
    }
}

/// The segment a group is building, its buffer reused across groups.
#[derive(Debug, Default)]
pub struct OpenSegment {
    entries: Vec<u8>,
    first: u64,
    records: u64,
    measure: usize,
}

impl OpenSegment {
    /// Starts a segment whose first record will be numbered `first`.
    pub fn start(&mut self, first: u64) {
        if self.entries.capacity() > 16 << 20 {
            // One huge record must not pin its memory forever.
            self.entries = Vec::new();
        }
        self.entries.clear();
        self.first = first;
        self.records = 0;
        self.measure = HEADER_LEN;
    }

    /// Appends the next record, numbered `first` + the records before it;
    /// returns what it counts ([`measured_len`]).
    pub fn push(&mut self, encoded: &[u8]) -> usize {
        write_entry(&mut self.entries, encoded, self.first + self.records);
        self.records += 1;
        let measured = measured_len(encoded.len());
        self.measure += measured;
        measured
    }

    /// What the segment counts so far, header included (0: none open).
    pub fn measure(&self) -> usize {
        if self.records == 0 {
            0
        } else {
            self.measure
        }
    }

    /// Closes the segment: the next push needs a [`start`](Self::start).
    pub fn take(&mut self) -> Option<(u64, u64, &[u8])> {
        if self.records == 0 {
            return None;
        }
        let records = std::mem::take(&mut self.records);
        Some((self.first, records, &self.entries))
    }
}

/// Turns runs of entries into the values to store: one value, or pieces
/// of at most [`MAX_BYTES`] when the run compresses too little for one.
/// Keeps its zstd context and output buffer across segments.
#[derive(Default)]
pub struct Sealer {
    zstd: StoredCompressor,
    packed: Vec<u8>,
    /// Runs still to be cut into pieces before compressing: a run that had
    /// to be is likely followed by more of its kind, and compressing each
    /// twice would double the cost of records that barely compress.
    pieces_for: u32,
}

/// Runs sealed in pieces after one that did not fit whole.
const PIECES_AFTER_MISS: u32 = 64;

impl Sealer {
    /// Seals `records` entries numbered from `first`; `put(first, last,
    /// value)` receives each value to store, in order.
    pub fn seal(
        &mut self,
        entries: &[u8],
        first: u64,
        records: u64,
        mut put: impl FnMut(u64, u64, &[u8]),
    ) {
        if self.pieces_for == 0 || records == 1 {
            self.pack(entries, first);
            if self.packed.len() <= MAX_BYTES || records == 1 {
                put(first, first + records - 1, &self.packed);
                return;
            }
            self.pieces_for = PIECES_AFTER_MISS;
        } else {
            self.pieces_for -= 1;
        }
        // Pieces of at most MAX_BYTES uncompressed: whatever the ratio, each
        // value stays under it (what zstd cannot shrink is stored as it is).
        let (mut piece_start, mut piece_first) = (0, first);
        let (mut previous_end, mut seq) = (0, first);
        for end in entry_ends(entries) {
            if seq > piece_first && end - piece_start + HEADER_LEN > MAX_BYTES {
                self.pack(&entries[piece_start..previous_end], piece_first);
                put(piece_first, seq - 1, &self.packed);
                (piece_start, piece_first) = (previous_end, seq);
            }
            previous_end = end;
            seq += 1;
        }
        self.pack(&entries[piece_start..], piece_first);
        put(piece_first, first + records - 1, &self.packed);
    }

    /// The value of a run of entries numbered from `first`, into `packed`.
    fn pack(&mut self, entries: &[u8], first: u64) {
        self.packed.clear();
        self.packed.extend_from_slice(&[TAG_ZSTD, 0, 0, 0, 0]);
        self.packed.extend_from_slice(&first.to_le_bytes());
        if !self.zstd.compress_into(entries, &mut self.packed) {
            self.packed[0] = TAG_PLAIN;
            self.packed.extend_from_slice(entries);
        }
        let crc = crc32fast::hash(&self.packed[V1_HEADER_LEN..]);
        self.packed[1..V1_HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
    }
}

/// Where each entry of a run written by [`write_entry`] ends.
fn entry_ends(entries: &[u8]) -> impl Iterator<Item = usize> + '_ {
    let mut rest = entries;
    std::iter::from_fn(move || {
        let (_key, mut after_key) = rest.split_first()?;
        let len = prost::encoding::decode_varint(&mut after_key).ok()? as usize;
        rest = after_key.get(len..)?;
        Some(entries.len() - rest.len())
    })
}

/// A compressed segment as a frame of `RecordBatch.records_zstd`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredFrame<'a> {
    /// The sequence number its first record was written with.
    pub written_first: u64,
    pub frame: &'a [u8],
    /// Its entries' bytes, decompressed.
    pub plain_len: usize,
}

/// The frame of a compressed segment (tag 3), checksum checked; `None` for
/// a segment of another kind, which [`records`] reads.
pub fn stored_frame(value: &[u8]) -> Result<Option<StoredFrame<'_>>, Damage> {
    if value.first() != Some(&TAG_ZSTD) {
        return Ok(None);
    }
    let rest = checked(value, HEADER_LEN)?;
    let frame = &value[HEADER_LEN..];
    let plain_len = content_size(frame).ok_or(Damage::Decompress)? as usize;
    Ok(Some(StoredFrame {
        written_first: u64::from_le_bytes(rest[..8].try_into().expect("8 bytes")),
        frame,
        plain_len,
    }))
}

/// `value` after its tag and checksum, once the checksum matches.
fn checked(value: &[u8], header_len: usize) -> Result<&[u8], Damage> {
    if value.len() < header_len {
        return Err(Damage::Header);
    }
    let crc = u32::from_le_bytes(value[1..V1_HEADER_LEN].try_into().expect("4 bytes"));
    let rest = &value[V1_HEADER_LEN..];
    if crc32fast::hash(rest) != crc {
        return Err(Damage::Checksum);
    }
    Ok(rest)
}

/// Checks a segment that should hold `count` records and returns them
/// encoded without their sequence numbers, in order; a compressed segment
/// is decompressed into `scratch`.
pub fn records<'a>(
    value: &'a [u8],
    count: u64,
    scratch: &'a mut Vec<u8>,
) -> Result<Vec<&'a [u8]>, Damage> {
    let tag = *value.first().ok_or(Damage::Header)?;
    let header_len = match tag {
        TAG_V1 | TAG_V1_ZSTD => V1_HEADER_LEN,
        TAG_ZSTD | TAG_PLAIN => HEADER_LEN,
        _ => return Err(Damage::Header),
    };
    let rest = checked(value, header_len)?;
    let stored = &value[header_len..];
    let body: &'a [u8] = if matches!(tag, TAG_V1_ZSTD | TAG_ZSTD) {
        decompress_into(stored, scratch).map_err(|_| Damage::Decompress)?;
        scratch
    } else {
        stored
    };
    let mut out = Vec::with_capacity(count.min(1 << 16) as usize);
    let mut rest_body = body;
    if header_len == HEADER_LEN {
        let written_first = u64::from_le_bytes(rest[..8].try_into().expect("8 bytes"));
        let mut start = 0;
        for end in entry_ends(body) {
            let entry = &body[start..end];
            start = end;
            let mut record = &entry[1..];
            let len = prost::encoding::decode_varint(&mut record).map_err(|_| Damage::Framing)?;
            if entry[0] != 0x0A || len != record.len() as u64 {
                return Err(Damage::Framing);
            }
            let seq = written_first + out.len() as u64;
            out.push(strip_seq(record, seq).ok_or(Damage::Framing)?);
        }
        rest_body = &body[start..];
    } else {
        while rest_body.has_remaining() {
            let len =
                prost::encoding::decode_varint(&mut rest_body).map_err(|_| Damage::Framing)?;
            if len > rest_body.len() as u64 {
                return Err(Damage::Framing);
            }
            let (record, tail) = rest_body.split_at(len as usize);
            out.push(record);
            rest_body = tail;
        }
    }
    if !rest_body.is_empty() || out.len() as u64 != count {
        return Err(Damage::Framing);
    }
    Ok(out)
}

/// Decodes one record of a segment, numbering it.
pub fn decode(encoded: &[u8], seq: u64) -> Result<Record, prost::DecodeError> {
    let mut record = Record::decode(encoded)?;
    record.seq = seq;
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgefleet_proto::encoded::EncodedBatch;

    /// Telemetry-like records, as sources hand them over (no `seq`).
    fn telemetry(n: usize) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| {
                format!(
                    "dev-{:03} temp={:.1} rpm={} mode=eco",
                    i % 20,
                    20.0 + (i % 50) as f64 / 10.0,
                    1200 + i % 400
                )
                .into_bytes()
            })
            .collect()
    }

    fn noise(len: usize, mut state: u64) -> Vec<u8> {
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    }

    /// The values `records` are sealed into, numbered from `first`, with
    /// their spans.
    fn sealed(sealer: &mut Sealer, records: &[Vec<u8>], first: u64) -> Vec<(u64, u64, Vec<u8>)> {
        let mut open = OpenSegment::default();
        open.start(first);
        for record in records {
            open.push(record);
        }
        let (first, count, entries) = open.take().unwrap();
        let mut values = Vec::new();
        sealer.seal(entries, first, count, |first, last, value| {
            values.push((first, last, value.to_vec()))
        });
        values
    }

    fn with_crc(tag: u8, stored: &[u8]) -> Vec<u8> {
        let mut value = vec![tag];
        value.extend_from_slice(&crc32fast::hash(stored).to_le_bytes());
        value.extend_from_slice(stored);
        value
    }

    #[test]
    fn a_compressible_run_is_one_frame_of_numbered_batch_entries() {
        let wanted = telemetry(300);
        let mut sealer = Sealer::default();
        let values = sealed(&mut sealer, &wanted, 41);
        assert_eq!(values.len(), 1);
        let (first, last, value) = &values[0];
        assert_eq!((*first, *last), (41, 340));
        assert_eq!(value[0], TAG_ZSTD);
        let raw: usize = wanted.iter().map(Vec::len).sum();
        assert!(value.len() * 3 < raw, "{} of {raw}", value.len());
        let mut scratch = Vec::new();
        let read = records(value, 300, &mut scratch).unwrap();
        assert_eq!(read, wanted.iter().map(Vec::as_slice).collect::<Vec<_>>());

        // The frame is part of a batch's `records_zstd` as it is: the
        // records, numbered from the key's first sequence number.
        let frame = stored_frame(value).unwrap().unwrap();
        assert_eq!(frame.written_first, 41);
        decompress_into(frame.frame, &mut scratch).unwrap();
        assert_eq!(frame.plain_len, scratch.len());
        let batch = <EncodedBatch as Message>::decode(scratch.as_slice()).unwrap();
        assert_eq!(batch.records.len(), 300);
        for (i, record) in batch.records.iter().enumerate() {
            assert_eq!(strip_seq(record, 41 + i as u64).unwrap(), &wanted[i][..]);
        }
    }

    #[test]
    fn small_and_incompressible_runs_are_stored_as_they_are() {
        let mut sealer = Sealer::default();
        let small = telemetry(3);
        let values = sealed(&mut sealer, &small, 1);
        assert_eq!(values[0].2[0], TAG_PLAIN);
        assert_eq!(stored_frame(&values[0].2), Ok(None));
        let mut scratch = Vec::new();
        assert_eq!(records(&values[0].2, 3, &mut scratch).unwrap(), small);

        let one = [noise(4000, 7)];
        let values = sealed(&mut sealer, &one, 9);
        assert_eq!(values.len(), 1);
        assert_eq!(values[0].2[0], TAG_PLAIN);
        assert_eq!(
            records(&values[0].2, 1, &mut scratch).unwrap(),
            [&one[0][..]]
        );
    }

    /// A run that compresses too little for one value of at most MAX_BYTES
    /// is stored in pieces that cover it in order, each under it; later
    /// runs go to pieces without trying whole first.
    #[test]
    fn a_run_that_barely_compresses_is_stored_in_pieces_under_the_value_limit() {
        let mut sealer = Sealer::default();
        let wanted: Vec<Vec<u8>> = (0..50).map(|i| noise(600, i + 1)).collect();
        for round in 0..2 {
            let values = sealed(&mut sealer, &wanted, 100);
            assert!(values.len() >= 4, "round {round}: {} values", values.len());
            let mut next = 100;
            let mut read = Vec::new();
            let mut scratch = Vec::new();
            for (first, last, value) in &values {
                assert_eq!(*first, next);
                assert!(value.len() <= MAX_BYTES, "{}", value.len());
                read.extend(
                    records(value, last - first + 1, &mut scratch)
                        .unwrap()
                        .into_iter()
                        .map(<[u8]>::to_vec),
                );
                next = last + 1;
            }
            assert_eq!(next, 150);
            assert_eq!(read, wanted);
        }
        assert!(sealer.pieces_for > 0);
    }

    /// An anchor moves a segment to a key with other numbers: the records
    /// read back without the numbers they were written with.
    #[test]
    fn a_segment_under_another_key_reads_back_without_its_written_numbers() {
        let wanted = telemetry(200);
        let values = sealed(&mut Sealer::default(), &wanted, 1);
        let value = &values[0].2;
        let mut scratch = Vec::new();
        // The count comes from the key: the same records, whatever it says
        // their numbers are now.
        assert_eq!(records(value, 200, &mut scratch).unwrap().len(), 200);
        assert_eq!(records(value, 199, &mut scratch), Err(Damage::Framing));
        assert_eq!(stored_frame(value).unwrap().unwrap().written_first, 1);
    }

    #[test]
    fn segments_of_earlier_agents_still_read_back() {
        let wanted = telemetry(20);
        let mut body = Vec::new();
        for record in &wanted {
            prost::encoding::encode_varint(record.len() as u64, &mut body);
            body.extend_from_slice(record);
        }
        let mut scratch = Vec::new();
        let v1 = with_crc(TAG_V1, &body);
        assert_eq!(records(&v1, 20, &mut scratch).unwrap(), wanted);
        let mut frame = Vec::new();
        assert!(StoredCompressor::default().compress_into(&body, &mut frame));
        let v1_zstd = with_crc(TAG_V1_ZSTD, &frame);
        assert_eq!(records(&v1_zstd, 20, &mut scratch).unwrap(), wanted);
        assert_eq!(stored_frame(&v1_zstd), Ok(None));
    }

    #[test]
    fn a_compressed_segment_that_does_not_decompress_is_damage_not_a_panic() {
        let values = sealed(&mut Sealer::default(), &telemetry(100), 1);
        let value = &values[0].2;
        let (seq, frame) = value[V1_HEADER_LEN..].split_at(8);
        let mut scratch = Vec::new();
        // Damage the checksum does not see (a bug, not the disk): a cut
        // frame, a frame of garbage.
        let cut = with_crc(TAG_ZSTD, &[seq, &frame[..frame.len() / 2]].concat());
        assert_eq!(records(&cut, 100, &mut scratch), Err(Damage::Decompress));
        let garbage = with_crc(
            TAG_ZSTD,
            &[seq, &[0x28, 0xb5, 0x2f, 0xfd, 1, 2, 3, 4, 5, 6]].concat(),
        );
        assert_eq!(
            records(&garbage, 100, &mut scratch),
            Err(Damage::Decompress)
        );
        // And the disk's damage is the checksum's, for readers and for
        // the uplink's frames alike.
        let mut flipped = value.clone();
        let at = flipped.len() - 2;
        flipped[at] ^= 0x10;
        assert_eq!(records(&flipped, 100, &mut scratch), Err(Damage::Checksum));
        assert_eq!(stored_frame(&flipped), Err(Damage::Checksum));
        assert_eq!(records(&value[..8], 100, &mut scratch), Err(Damage::Header));
        // The thread's decompressor still works after all of that.
        assert_eq!(records(value, 100, &mut scratch).unwrap().len(), 100);
    }
}
