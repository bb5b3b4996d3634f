//! The value of a segment: the records of one group commit.
//!
//! ```text
//! [tag = 1] [crc32 of the body, u32 LE] [body: (varint length, Record)*]
//! [tag = 2] [crc32 of the frame, u32 LE] [one zstd frame of a tag-1 body]
//! ```
//!
//! Records are stored length-delimited, one after the other. A record's
//! sequence number is its position: the segment key's first sequence number
//! plus its index. New records are stored with `seq` unset (0), which keeps
//! them smaller and lets an anchor renumber a segment by moving it to a new
//! key without touching the value; records migrated from format 1 carry their
//! old `seq`, which is overwritten on reading like any other.
//!
//! The checksum: sequence numbers are implicit, so a damaged length prefix
//! would shift every later record onto the wrong number, or a flipped bit
//! would decode into a plausible, wrong record; the CRC (crc32fast, already
//! linked through sled) turns both into a detected, skipped segment.
//!
//! Compression (tag 2): telemetry records repeat their signal names, source
//! and device, and a segment of them shrinks about sixfold with zstd's
//! fastest levels. Every byte of a value is written several times over by
//! sled (each insert rewrites its leaf, and a leaf splits at 17 values
//! whatever their size) and copied in memory on each insert, so a smaller
//! value is less disk bandwidth, less CPU in sled, and a buffer that holds
//! more records under the same byte cap, the backlog an offline site keeps
//! (BENCHMARKS.md, "Compressed segments"). A segment that does not shrink
//! is stored as tag 1. The zstd library is the one tonic already links.

use edgefleet_proto::stored_zstd::{decompress_into, StoredCompressor};
use edgefleet_proto::Record;
use prost::bytes::Buf;
use prost::Message;

pub const TAG: u8 = 1;
pub const TAG_ZSTD: u8 = 2;
pub const HEADER_LEN: usize = 5;

/// A new record starts a new segment rather than take one past this size.
///
/// sled writes any page over a quarter of its 512 KiB log segment to a file
/// of its own (a blob), which then costs a file creation, two fsyncs (the
/// file and its directory) and an unlink when freed; and a leaf page holds
/// up to 17 values before it splits. Segments of 7 KiB keep even a full
/// leaf in the log. With one segment per group (up to 8,192 records, most
/// of a MiB) every commit made a blob: a quarter of the buffer thread's
/// time went to creating, listing and deleting them (BENCHMARKS.md,
/// "spine").
pub const MAX_BYTES: usize = 7 * 1024;

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

/// Starts a segment in `buf` (kept across commits to reuse its allocation).
pub fn start(buf: &mut Vec<u8>) {
    buf.clear();
    buf.extend_from_slice(&[TAG, 0, 0, 0, 0]);
}

/// Bytes a record of `encoded_len` takes in a segment.
pub fn stored_len(encoded_len: usize) -> usize {
    prost::encoding::encoded_len_varint(encoded_len as u64) + encoded_len
}

/// Bytes that records of `encoded_lens` take when added to a segment now
/// `open_len` bytes long (0: none open), headers of the segments they start
/// included: the same boundaries as the committer draws with [`MAX_BYTES`].
pub fn stored_total(mut open_len: usize, encoded_lens: &[usize]) -> u64 {
    let mut total = 0u64;
    for &len in encoded_lens {
        if starts_new(open_len, len) {
            total += HEADER_LEN as u64;
            open_len = HEADER_LEN;
        }
        open_len += stored_len(len);
        total += stored_len(len) as u64;
    }
    total
}

/// Whether a record of `encoded_len` starts a new segment, the one open
/// being `open_len` bytes long (0: none open).
pub fn starts_new(open_len: usize, encoded_len: usize) -> bool {
    open_len == 0 || open_len + stored_len(encoded_len) > MAX_BYTES
}

/// Appends an already encoded record; returns the bytes it took.
pub fn push_encoded(buf: &mut Vec<u8>, encoded: &[u8]) -> usize {
    let before = buf.len();
    prost::encoding::encode_varint(encoded.len() as u64, buf);
    buf.extend_from_slice(encoded);
    buf.len() - before
}

/// Seals a segment started with [`start`]: fills in the checksum.
pub fn finish(buf: &mut [u8]) {
    let crc = crc32fast::hash(&buf[HEADER_LEN..]);
    buf[1..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
}

/// Turns segments built with [`start`] and [`push_encoded`] into the values
/// to store, compressed when that makes them smaller
/// ([`edgefleet_proto::stored_zstd`]). Keeps its zstd context and output
/// buffer across segments.
#[derive(Default)]
pub struct Sealer {
    zstd: StoredCompressor,
    packed: Vec<u8>,
}

impl Sealer {
    /// The value to store for the segment in `buf`.
    pub fn seal<'a>(&'a mut self, buf: &'a mut [u8]) -> &'a [u8] {
        let body = &buf[HEADER_LEN..];
        self.packed.clear();
        self.packed.extend_from_slice(&[TAG_ZSTD, 0, 0, 0, 0]);
        if self.zstd.compress_into(body, &mut self.packed) {
            let crc = crc32fast::hash(&self.packed[HEADER_LEN..]);
            self.packed[1..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
            return &self.packed;
        }
        finish(buf);
        buf
    }
}

/// Checks a segment that should hold `count` records and returns them, still
/// encoded, in order; a compressed segment is decompressed into `scratch`.
pub fn records<'a>(
    value: &'a [u8],
    count: u64,
    scratch: &'a mut Vec<u8>,
) -> Result<Vec<&'a [u8]>, Damage> {
    if value.len() < HEADER_LEN || !matches!(value[0], TAG | TAG_ZSTD) {
        return Err(Damage::Header);
    }
    let crc = u32::from_le_bytes(value[1..HEADER_LEN].try_into().expect("4 bytes"));
    let stored = &value[HEADER_LEN..];
    if crc32fast::hash(stored) != crc {
        return Err(Damage::Checksum);
    }
    let body: &'a [u8] = if value[0] == TAG_ZSTD {
        decompress_into(stored, scratch).map_err(|_| Damage::Decompress)?;
        scratch
    } else {
        stored
    };
    let mut out = Vec::with_capacity(count.min(1 << 16) as usize);
    let mut rest = body;
    while rest.has_remaining() {
        let len = prost::encoding::decode_varint(&mut rest).map_err(|_| Damage::Framing)?;
        if len > rest.len() as u64 {
            return Err(Damage::Framing);
        }
        let (record, tail) = rest.split_at(len as usize);
        out.push(record);
        rest = tail;
    }
    if out.len() as u64 != count {
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

    /// A segment of `n` telemetry-like records, as the committer builds it.
    fn built(n: usize) -> (Vec<u8>, Vec<Vec<u8>>) {
        let records: Vec<Vec<u8>> = (0..n)
            .map(|i| {
                format!(
                    "dev-{:03} temp={:.1} rpm={} mode=eco",
                    i % 20,
                    20.0 + (i % 50) as f64 / 10.0,
                    1200 + i % 400
                )
                .into_bytes()
            })
            .collect();
        let mut buf = Vec::new();
        start(&mut buf);
        for record in &records {
            push_encoded(&mut buf, record);
        }
        (buf, records)
    }

    fn with_crc(tag: u8, stored: &[u8]) -> Vec<u8> {
        let mut value = vec![tag];
        value.extend_from_slice(&crc32fast::hash(stored).to_le_bytes());
        value.extend_from_slice(stored);
        value
    }

    #[test]
    fn a_compressible_segment_is_stored_compressed_and_reads_back_the_same() {
        let (mut buf, wanted) = built(100);
        let raw_len = buf.len();
        let mut sealer = Sealer::default();
        let value = sealer.seal(&mut buf).to_vec();
        assert_eq!(value[0], TAG_ZSTD);
        assert!(value.len() * 3 < raw_len, "{} of {raw_len}", value.len());
        let mut scratch = Vec::new();
        let read = records(&value, 100, &mut scratch).unwrap();
        assert_eq!(read, wanted.iter().map(Vec::as_slice).collect::<Vec<_>>());
        // The context is reused for the next segment.
        let (mut buf, _) = built(50);
        assert_eq!(sealer.seal(&mut buf)[0], TAG_ZSTD);
    }

    #[test]
    fn small_and_incompressible_segments_are_stored_as_they_are() {
        let mut sealer = Sealer::default();
        let (mut small, wanted) = built(3);
        assert!(small.len() < edgefleet_proto::stored_zstd::COMPRESS_FROM);
        let value = sealer.seal(&mut small).to_vec();
        assert_eq!(value[0], TAG);
        let mut scratch = Vec::new();
        assert_eq!(records(&value, 3, &mut scratch).unwrap(), wanted);

        let mut state = 0x2545_f491_4f6c_dd1du64;
        let noise: Vec<u8> = (0..4000)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        let mut buf = Vec::new();
        start(&mut buf);
        push_encoded(&mut buf, &noise);
        let value = sealer.seal(&mut buf).to_vec();
        assert_eq!(value[0], TAG);
        assert_eq!(records(&value, 1, &mut scratch).unwrap(), [&noise[..]]);
    }

    #[test]
    fn a_compressed_segment_that_does_not_decompress_is_damage_not_a_panic() {
        let (mut buf, _) = built(100);
        let value = Sealer::default().seal(&mut buf).to_vec();
        let frame = &value[HEADER_LEN..];
        let mut scratch = Vec::new();
        // Damage the checksum does not see (a bug, not the disk): a cut
        // frame, a frame of garbage.
        let cut = with_crc(TAG_ZSTD, &frame[..frame.len() / 2]);
        assert_eq!(records(&cut, 100, &mut scratch), Err(Damage::Decompress));
        let garbage = with_crc(TAG_ZSTD, &[0x28, 0xb5, 0x2f, 0xfd, 1, 2, 3, 4, 5, 6]);
        assert_eq!(
            records(&garbage, 100, &mut scratch),
            Err(Damage::Decompress)
        );
        // And the disk's damage is the checksum's.
        let mut flipped = value.clone();
        let at = flipped.len() - 2;
        flipped[at] ^= 0x10;
        assert_eq!(records(&flipped, 100, &mut scratch), Err(Damage::Checksum));
        // The thread's decompressor still works after all of that.
        assert_eq!(records(&value, 100, &mut scratch).unwrap().len(), 100);
    }
}
