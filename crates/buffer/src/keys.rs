//! Key layout of the buffer's single sled tree. One tree, so that one batch
//! changes records and bookkeeping atomically.
//!
//! | prefix | key                          | value                          |
//! |--------|------------------------------|--------------------------------|
//! | `r`    | first seq + last seq (u64 BE)| a segment ([`crate::segment`]) |
//! | `m`    | name                         | u64 BE / bytes (bookkeeping)   |
//! | `q`    | dedupe key                   | 16-byte fingerprint (format 1) |
//! | `j`    | entry number (u64 BE)        | dedupe updates of one group    |
//! | `x`    | time (i64 BE) + n            | JSON `DeadLetter`              |
//!
//! A segment holds the records of one group commit, whose sequence numbers
//! are contiguous; its key names the first and the last, so that acks, drops
//! and the level bookkeeping never need to look inside a value. Keys sort by
//! first sequence number. Format 1 stored one record per key (`r` + seq,
//! 9 bytes); [`crate::open`] migrates such buffers.

pub const RECORD: u8 = b'r';
pub const DEDUPE: u8 = b'q';
pub const DEDUPE_LOG: u8 = b'j';
pub const DEAD: u8 = b'x';

/// The key of the segment holding `first..=last`.
pub fn segment(first: u64, last: u64) -> [u8; 17] {
    let mut key = [0u8; 17];
    key[0] = RECORD;
    key[1..9].copy_from_slice(&first.to_be_bytes());
    key[9..].copy_from_slice(&last.to_be_bytes());
    key
}

/// `(first, last)` of a segment key.
pub fn span_of(key: &[u8]) -> Option<(u64, u64)> {
    if key.len() != 17 || key[0] != RECORD {
        return None;
    }
    let first = u64::from_be_bytes(key[1..9].try_into().unwrap());
    let last = u64::from_be_bytes(key[9..].try_into().unwrap());
    (first <= last).then_some((first, last))
}

/// A bound below every segment whose first sequence number is `>= seq` and
/// above every segment starting before it: `range(..seq_bound(s))` ends with
/// the segment that may contain `s - 1`'s successor, `range(seq_bound(s)..)`
/// starts at the first segment starting at or after `s`.
pub fn seq_bound(seq: u64) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = RECORD;
    key[1..].copy_from_slice(&seq.to_be_bytes());
    key
}

/// Format 1: the key of a single record.
pub fn v1_seq_of(key: &[u8]) -> Option<u64> {
    (key.len() == 9 && key[0] == RECORD).then(|| u64::from_be_bytes(key[1..].try_into().unwrap()))
}

pub fn records_start() -> &'static [u8] {
    &[RECORD]
}

/// Above every record key.
pub fn records_end() -> &'static [u8] {
    &[RECORD + 1]
}

pub fn dedupe_log(n: u64) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = DEDUPE_LOG;
    key[1..].copy_from_slice(&n.to_be_bytes());
    key
}

pub fn dedupe_log_number(key: &[u8]) -> Option<u64> {
    (key.len() == 9 && key[0] == DEDUPE_LOG)
        .then(|| u64::from_be_bytes(key[1..].try_into().unwrap()))
}

pub fn dead(time_ns: i64, n: u64) -> [u8; 17] {
    let mut key = [0u8; 17];
    key[0] = DEAD;
    key[1..9].copy_from_slice(&(time_ns as u64).to_be_bytes());
    key[9..].copy_from_slice(&n.to_be_bytes());
    key
}

pub const META_NEXT_SEQ: &[u8] = b"m/next_seq";
pub const META_ACKED: &[u8] = b"m/acked_through";
pub const META_RECORDS: &[u8] = b"m/records";
pub const META_BYTES: &[u8] = b"m/bytes";
pub const META_EPOCH: &[u8] = b"m/epoch";
pub const META_ANCHORED: &[u8] = b"m/anchored";
pub const META_SENT_RESERVED: &[u8] = b"m/sent_reserved";
pub const META_FORMAT: &[u8] = b"m/format";
/// Dedupe log entries numbered below this were superseded by a finished
/// snapshot pass: not replayed, and deleted a few per group. A buffer
/// without it (or an older agent reading it) replays every entry, which
/// gives the same memory.
pub const META_DEDUPE_FIRST: &[u8] = b"m/dedupe_first";

/// Bumped when what an older agent would misread is written.
/// 1: one key per record. 2: one key per segment (group commit).
/// 3: segments of numbered entries (tags 3 and 4, see `segment`), which an
/// agent that knows only 2 would skip as damaged; with the marker it
/// quarantines the buffer instead, keeping it on disk.
pub const FORMAT_VERSION: u64 = 3;
pub const FORMAT_V1: u64 = 1;
/// Format 2's segments are all still read: opening one only moves its
/// marker on.
pub const FORMAT_V2: u64 = 2;

pub fn u64_value(value: &[u8]) -> Option<u64> {
    value.try_into().ok().map(u64::from_be_bytes)
}
