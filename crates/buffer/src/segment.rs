//! The value of a segment: the records of one group commit.
//!
//! ```text
//! [tag = 1] [crc32 of the body, u32 LE] [body: (varint length, Record)*]
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

use edgefleet_proto::Record;
use prost::bytes::Buf;
use prost::Message;

pub const TAG: u8 = 1;
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
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Damage::Header => "bad segment header",
            Damage::Checksum => "segment checksum mismatch",
            Damage::Framing => "segment record framing does not match its key",
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

/// Checks a segment that should hold `count` records and returns them, still
/// encoded, in order.
pub fn records(value: &[u8], count: u64) -> Result<Vec<&[u8]>, Damage> {
    if value.len() < HEADER_LEN || value[0] != TAG {
        return Err(Damage::Header);
    }
    let crc = u32::from_le_bytes(value[1..HEADER_LEN].try_into().expect("4 bytes"));
    let body = &value[HEADER_LEN..];
    if crc32fast::hash(body) != crc {
        return Err(Damage::Checksum);
    }
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
