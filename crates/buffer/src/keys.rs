//! Key layout of the buffer's single sled tree. One tree, so that one batch
//! changes records and bookkeeping atomically.
//!
//! | prefix | key                  | value                         |
//! |--------|----------------------|-------------------------------|
//! | `r`    | seq (u64 BE)         | prost-encoded `Record`        |
//! | `m`    | name                 | u64 BE / bytes (bookkeeping)  |
//! | `q`    | dedupe key           | 16-byte fingerprint           |
//! | `x`    | time (i64 BE) + n    | JSON `DeadLetter`             |

pub const RECORD: u8 = b'r';
pub const DEDUPE: u8 = b'q';
pub const DEAD: u8 = b'x';

pub fn record(seq: u64) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = RECORD;
    key[1..].copy_from_slice(&seq.to_be_bytes());
    key
}

pub fn seq_of(key: &[u8]) -> Option<u64> {
    (key.len() == 9 && key[0] == RECORD).then(|| u64::from_be_bytes(key[1..].try_into().unwrap()))
}

pub fn records_start() -> [u8; 9] {
    record(0)
}

pub fn records_end() -> [u8; 9] {
    record(u64::MAX)
}

pub fn dedupe(key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(key.len() + 1);
    out.push(DEDUPE);
    out.extend_from_slice(key);
    out
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

/// Bumped when the layout changes incompatibly.
pub const FORMAT_VERSION: u64 = 1;

pub fn u64_value(value: &[u8]) -> Option<u64> {
    value.try_into().ok().map(u64::from_be_bytes)
}
