//! The buffer's memory of the last fingerprint committed per dedupe key, and
//! the encoding of its entries in the dedupe log (see `committer`).
//!
//! A key is a scope followed by an id: the MQTT source's are its name, `/`
//! and the message's 2-byte packet id, so one source has at most 65,535
//! keys, and all of them are in use after as many messages. Held as a
//! `HashMap<Vec<u8>, [u8; 16]>`, those took 131,072 buckets of 40 bytes plus
//! an allocation per key: over 6 MiB of an agent whose budget under load is
//! 32 MiB, kept for as long as the agent runs (BENCHMARKS.md, "Memory").
//!
//! So a key is split into its scope (all but its last two bytes) and a
//! 16-bit id. Each scope keeps its ids in a small map until a table indexed
//! by id (1 MiB) is the smaller of the two. Keys are kept exactly: nothing is
//! hashed away, and what is written to disk is the same bytes as before.
//!
//! The maps hash with foldhash, not std's SipHash: keys are source names
//! and packet ids, which no device chooses, and SipHash on them was a tenth
//! of the committer thread in `mqtt-e2e`.

use foldhash::HashMap;

/// Ids a scope holds in a map before it moves them into a table: the map
/// would soon pass the table's size (its next growth doubles it to 65,536
/// buckets of 18 bytes).
const DENSE_AT: usize = 16_384;
const IDS: usize = 1 << 16;

/// A place in [`DedupeMemory::visit_from`]'s order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Position {
    Scoped(Box<[u8]>, u16),
    Short(Box<[u8]>),
}

#[derive(Default)]
pub(crate) struct DedupeMemory {
    scopes: HashMap<Box<[u8]>, Scope>,
    /// Keys too short to carry an id (no source makes these today).
    short: HashMap<Box<[u8]>, [u8; 16]>,
    len: usize,
}

enum Scope {
    Sparse(HashMap<u16, [u8; 16]>),
    Dense {
        present: Box<[u64]>,
        fingerprints: Box<[[u8; 16]]>,
    },
}

/// Where id `id`'s bit is in a dense scope's `present`: word and mask.
fn bit(id: usize) -> (usize, u64) {
    (id / 64, 1 << (id % 64))
}

fn split(key: &[u8]) -> Option<(&[u8], u16)> {
    let at = key.len().checked_sub(2)?;
    Some((&key[..at], u16::from_be_bytes([key[at], key[at + 1]])))
}

impl Scope {
    fn get(&self, id: u16) -> Option<&[u8; 16]> {
        match self {
            Scope::Sparse(map) => map.get(&id),
            Scope::Dense {
                present,
                fingerprints,
            } => {
                let i = usize::from(id);
                let (word, mask) = bit(i);
                (present[word] & mask != 0).then(|| &fingerprints[i])
            }
        }
    }

    /// Returns whether `id` is new to this scope.
    fn insert(&mut self, id: u16, fingerprint: [u8; 16]) -> bool {
        match self {
            Scope::Sparse(map) => {
                let new = map.insert(id, fingerprint).is_none();
                if map.len() >= DENSE_AT {
                    let mut present = vec![0u64; IDS / 64].into_boxed_slice();
                    let mut fingerprints = vec![[0u8; 16]; IDS].into_boxed_slice();
                    for (&id, &fingerprint) in map.iter() {
                        let i = usize::from(id);
                        let (word, mask) = bit(i);
                        present[word] |= mask;
                        fingerprints[i] = fingerprint;
                    }
                    *self = Scope::Dense {
                        present,
                        fingerprints,
                    };
                }
                new
            }
            Scope::Dense {
                present,
                fingerprints,
            } => {
                let i = usize::from(id);
                let (word, mask) = bit(i);
                let new = present[word] & mask == 0;
                present[word] |= mask;
                fingerprints[i] = fingerprint;
                new
            }
        }
    }

    /// Visits ids from `from` on in ascending order while `left` lasts;
    /// returns the first id left unvisited when `left` ran out.
    fn visit_from(
        &self,
        from: u16,
        left: &mut usize,
        mut f: impl FnMut(u16, &[u8; 16]),
    ) -> Option<u16> {
        match self {
            Scope::Sparse(map) => {
                let mut ids: Vec<u16> = map.keys().copied().filter(|&id| id >= from).collect();
                ids.sort_unstable();
                for id in ids {
                    if *left == 0 {
                        return Some(id);
                    }
                    f(id, &map[&id]);
                    *left -= 1;
                }
                None
            }
            Scope::Dense {
                present,
                fingerprints,
            } => {
                for i in usize::from(from)..IDS {
                    let (word, mask) = bit(i);
                    if present[word] & mask == 0 {
                        continue;
                    }
                    if *left == 0 {
                        return Some(i as u16);
                    }
                    f(i as u16, &fingerprints[i]);
                    *left -= 1;
                }
                None
            }
        }
    }
}

impl DedupeMemory {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn get(&self, key: &[u8]) -> Option<&[u8; 16]> {
        match split(key) {
            Some((scope, id)) => self.scopes.get(scope)?.get(id),
            None => self.short.get(key),
        }
    }

    pub fn contains_key(&self, key: &[u8]) -> bool {
        self.get(key).is_some()
    }

    pub fn insert(&mut self, key: &[u8], fingerprint: [u8; 16]) {
        let new = match split(key) {
            Some((scope, id)) => match self.scopes.get_mut(scope) {
                Some(ids) => ids.insert(id, fingerprint),
                None => {
                    let ids = HashMap::from_iter([(id, fingerprint)]);
                    self.scopes.insert(scope.into(), Scope::Sparse(ids));
                    true
                }
            },
            None => self.short.insert(key.into(), fingerprint).is_none(),
        };
        self.len += usize::from(new);
    }

    /// Calls `f` with up to `limit` keys and their fingerprints, from
    /// `from` on (`None`: the first key) in a fixed order: scopes by their
    /// bytes and ids ascending, then the short keys by their bytes. Returns
    /// the first key left unvisited, or `None` when it visited the last.
    ///
    /// This is how a snapshot is written a slice per group: a key inserted
    /// behind the position is not visited, which is right for a snapshot
    /// whose writer logs every insert anyway.
    pub fn visit_from(
        &self,
        from: Option<&Position>,
        limit: usize,
        mut f: impl FnMut(&[u8], &[u8; 16]),
    ) -> Option<Position> {
        let mut left = limit;
        let mut key = Vec::new();
        let mut scopes: Vec<&[u8]> = self.scopes.keys().map(|s| &**s).collect();
        scopes.sort_unstable();
        for scope in scopes {
            let first_id = match from {
                None => 0,
                Some(Position::Scoped(at, id)) => match scope.cmp(at) {
                    std::cmp::Ordering::Less => continue,
                    std::cmp::Ordering::Equal => *id,
                    std::cmp::Ordering::Greater => 0,
                },
                Some(Position::Short(_)) => break,
            };
            let stopped = self.scopes[scope].visit_from(first_id, &mut left, |id, fingerprint| {
                key.clear();
                key.extend_from_slice(scope);
                key.extend_from_slice(&id.to_be_bytes());
                f(&key, fingerprint);
            });
            if let Some(id) = stopped {
                return Some(Position::Scoped(scope.into(), id));
            }
        }
        let mut short: Vec<(&[u8], &[u8; 16])> = self
            .short
            .iter()
            .map(|(k, fp)| (&**k, fp))
            .filter(|(k, _)| match from {
                Some(Position::Short(at)) => *k >= &**at,
                _ => true,
            })
            .collect();
        short.sort_unstable();
        for (k, fingerprint) in short {
            if left == 0 {
                return Some(Position::Short(k.into()));
            }
            f(k, fingerprint);
            left -= 1;
        }
        None
    }
}

/// Appends one entry of the dedupe log's encoding:
/// `(varint key length, key, 16-byte fingerprint)`.
pub(crate) fn encode_entry(out: &mut Vec<u8>, key: &[u8], fingerprint: &[u8; 16]) {
    prost::encoding::encode_varint(key.len() as u64, out);
    out.extend_from_slice(key);
    out.extend_from_slice(fingerprint);
}

/// Writes a group's dedupe updates into its batch as log entries numbered
/// from `*next`, each closed before it passes `segment::MAX_BYTES`: a group
/// of 8,192 MQTT messages makes 221 KB of updates, and a snapshot of 65,535
/// keys 1.7 MB, which as one value sled would write to a blob file of its
/// own (see `segment::MAX_BYTES`).
pub(crate) struct LogEntries<'a> {
    batch: &'a mut sled::Batch,
    next: &'a mut u64,
    value: Vec<u8>,
}

impl<'a> LogEntries<'a> {
    pub fn new(batch: &'a mut sled::Batch, next: &'a mut u64) -> Self {
        LogEntries {
            batch,
            next,
            value: Vec::new(),
        }
    }

    pub fn push(&mut self, key: &[u8], fingerprint: &[u8; 16]) {
        let entry_len =
            prost::encoding::encoded_len_varint(key.len() as u64) + key.len() + fingerprint.len();
        if !self.value.is_empty() && self.value.len() + entry_len > crate::segment::MAX_BYTES {
            self.close();
        }
        encode_entry(&mut self.value, key, fingerprint);
    }

    fn close(&mut self) {
        self.batch.insert(
            &crate::keys::dedupe_log(*self.next),
            std::mem::take(&mut self.value),
        );
        *self.next += 1;
    }

    /// Writes what is still open (an empty group writes no entry).
    pub fn finish(mut self) {
        if !self.value.is_empty() {
            self.close();
        }
    }
}

/// Replays one log entry into `into`: the number of updates read, and false
/// if the entry is damaged (the intact part before the damage is kept).
pub(crate) fn decode_into(mut value: &[u8], into: &mut DedupeMemory) -> (u64, bool) {
    let mut n = 0;
    while !value.is_empty() {
        let Ok(len) = prost::encoding::decode_varint(&mut value) else {
            return (n, false);
        };
        let len = len as usize;
        if value.len() < len.saturating_add(16) {
            return (n, false);
        }
        let (key, rest) = value.split_at(len);
        let (fingerprint, rest) = rest.split_at(16);
        into.insert(key, fingerprint.try_into().expect("16 bytes"));
        value = rest;
        n += 1;
    }
    (n, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn key(scope: &str, id: u16) -> Vec<u8> {
        [scope.as_bytes(), b"/", &id.to_be_bytes()].concat()
    }

    fn fingerprint(n: u64) -> [u8; 16] {
        let mut fp = [0u8; 16];
        fp[..8].copy_from_slice(&n.to_le_bytes());
        fp[8..].copy_from_slice(&(!n).to_le_bytes());
        fp
    }

    fn contents(memory: &DedupeMemory) -> BTreeMap<Vec<u8>, [u8; 16]> {
        let mut all = BTreeMap::new();
        let end = memory.visit_from(None, usize::MAX, |key, fp| {
            assert!(all.insert(key.to_vec(), *fp).is_none(), "{key:?} twice");
        });
        assert_eq!(end, None);
        all
    }

    /// Every key of two scopes, one past the switch to a table and one not,
    /// plus keys too short to split, overwritten and read back, against a
    /// plain map doing the same.
    #[test]
    fn holds_exactly_what_a_map_would_across_the_switch_to_a_table() {
        let mut memory = DedupeMemory::default();
        let mut expected = BTreeMap::new();
        let mut put = |memory: &mut DedupeMemory, key: Vec<u8>, fp: [u8; 16]| {
            memory.insert(&key, fp);
            expected.insert(key, fp);
        };
        for id in 0..=u16::MAX {
            put(&mut memory, key("mqtt", id), fingerprint(id.into()));
        }
        for id in (0..DENSE_AT as u16 - 1).step_by(3) {
            put(&mut memory, key("other", id), fingerprint(id as u64 + 7));
        }
        for short in [&b""[..], b"a"] {
            put(&mut memory, short.to_vec(), fingerprint(99));
        }
        // Overwrites, in the table and in a map.
        put(&mut memory, key("mqtt", 17), fingerprint(1_000));
        put(&mut memory, key("other", 3), fingerprint(1_001));
        put(&mut memory, b"a".to_vec(), fingerprint(1_002));

        assert!(matches!(memory.scopes[&b"mqtt/"[..]], Scope::Dense { .. }));
        assert!(matches!(memory.scopes[&b"other/"[..]], Scope::Sparse(_)));
        assert_eq!(memory.len(), expected.len());
        assert_eq!(contents(&memory), expected);
        for (key, fp) in &expected {
            assert_eq!(memory.get(key), Some(fp), "{key:?}");
        }
        assert_eq!(memory.get(&key("other", 1)), None);
        assert_eq!(memory.get(&key("absent", 1)), None);
        assert_eq!(memory.get(b"b"), None);
        assert!(!memory.contains_key(b"mqtt"));
    }

    /// A snapshot pass writes the memory a slice per group while groups
    /// keep adding keys: whatever the slice, every key there at the start
    /// is visited exactly once, in the documented order.
    #[test]
    fn slices_visit_every_key_there_at_the_start_once_while_keys_are_added() {
        for slice in [1, 7, 1_000, 100_000] {
            let mut memory = DedupeMemory::default();
            // Even ids of a table scope, a map scope, and a short key.
            for id in (0..40_000u16).step_by(2) {
                memory.insert(&key("mqtt", id), fingerprint(id.into()));
            }
            for id in 0..100u16 {
                memory.insert(&key("a", id), fingerprint(1));
            }
            memory.insert(b"z", fingerprint(2));
            assert!(matches!(memory.scopes[&b"mqtt/"[..]], Scope::Dense { .. }));
            let at_start: Vec<Vec<u8>> = contents(&memory).into_keys().collect();

            let mut seen = Vec::new();
            let mut position = None;
            let mut odd = 1u16;
            loop {
                position =
                    memory.visit_from(position.as_ref(), slice, |k, _| seen.push(k.to_vec()));
                if position.is_none() {
                    break;
                }
                // New odd ids, behind the position and ahead of it.
                memory.insert(&key("mqtt", odd), fingerprint(5));
                memory.insert(&key("mqtt", 39_999 - odd), fingerprint(5));
                odd = (odd + 2) % 39_999;
            }
            let mut expected = at_start.clone();
            // The order: scopes by their bytes ("a/" < "mqtt/"), ids
            // ascending (big-endian, so byte order too), short keys last.
            expected.sort_by_key(|k| (k.len() < 3, k.clone()));
            let visited_of_start: Vec<Vec<u8>> = seen
                .iter()
                .filter(|k| at_start.binary_search(k).is_ok())
                .cloned()
                .collect();
            assert_eq!(visited_of_start, expected, "slice {slice}");
            let mut unique = seen.clone();
            unique.sort();
            unique.dedup();
            assert_eq!(
                unique.len(),
                seen.len(),
                "a key visited twice (slice {slice})"
            );
        }
    }

    #[test]
    fn a_log_entry_decodes_into_what_was_encoded_and_damage_keeps_the_intact_part() {
        let entries = [
            (key("s", 1), fingerprint(1)),
            (b"x".to_vec(), fingerprint(2)),
        ];
        let mut value = Vec::new();
        for (key, fp) in &entries {
            encode_entry(&mut value, key, fp);
        }
        let mut memory = DedupeMemory::default();
        assert_eq!(decode_into(&value, &mut memory), (2, true));
        assert_eq!(contents(&memory), entries.iter().cloned().collect());

        let mut memory = DedupeMemory::default();
        assert_eq!(
            decode_into(&value[..value.len() - 1], &mut memory),
            (1, false)
        );
        assert_eq!(memory.get(&key("s", 1)), Some(&fingerprint(1)));
        assert_eq!(memory.len(), 1);
    }
}
