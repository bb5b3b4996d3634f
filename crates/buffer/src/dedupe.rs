//! The buffer's memory of the last fingerprint committed per dedupe key, and
//! the encoding of its entries in the dedupe log (see `committer`).
//!
//! A key is a scope and a 16-bit id: the MQTT source's scope is its name
//! and `/`, its ids the messages' packet ids, so one source has at most
//! 65,535 keys, and all of them are in use after as many messages. Held as
//! a `HashMap<Vec<u8>, [u8; 16]>`, those took 131,072 buckets of 40 bytes
//! plus an allocation per key: over 6 MiB of an agent whose budget under
//! load is 32 MiB, kept for as long as the agent runs (BENCHMARKS.md,
//! "Memory"). So each scope keeps its ids in a small map until a table
//! indexed by id (1 MiB) is the smaller of the two. Keys are kept exactly:
//! nothing is hashed away.
//!
//! A scope is named once and then known by a number ([`ScopeNames`]): a
//! key as a `Vec` of name and id, made for every message and moved through
//! two hash maps, was a fifth of the committer thread in `mqtt-e2e`. On
//! disk a key is the name's bytes and the id's, as it always was.
//!
//! The maps hash with foldhash, not std's SipHash: keys are source names
//! and packet ids, which no device chooses, and SipHash on them was a tenth
//! of the committer thread in `mqtt-e2e`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use foldhash::HashMap;

/// Ids a scope holds in a map before it moves them into a table: the map
/// would soon pass the table's size (its next growth doubles it to 65,536
/// buckets of 18 bytes).
const DENSE_AT: usize = 16_384;
const IDS: usize = 1 << 16;

/// A place in [`DedupeMemory::visit_from`]'s order: a scope's name and an
/// id in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Position(Box<[u8]>, u16);

/// One key as the committer holds it: the number its scope's name was
/// given ([`ScopeNames`]) and the id. A source gives the committer these
/// rather than bytes, so a message's key costs no allocation and hashes as
/// one word.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct DedupeId {
    pub scope: u32,
    pub id: u16,
}

/// The names of dedupe scopes and the numbers they were given, shared by the
/// buffer's handles (sources name their scope once, [`crate::Buffer::dedupe_scope`])
/// and its committer (which names the scopes it finds on disk, and writes a
/// scope's name with each of its keys). Numbers live as long as the
/// [`crate::Buffer`]; only names reach the disk.
#[derive(Debug)]
pub(crate) struct ScopeNames {
    id: u64,
    names: Mutex<Names>,
}

impl Default for ScopeNames {
    fn default() -> Self {
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        ScopeNames {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            names: Mutex::default(),
        }
    }
}

#[derive(Debug, Default)]
struct Names {
    numbers: HashMap<Arc<[u8]>, u32>,
    names: Vec<Arc<[u8]>>,
}

impl ScopeNames {
    /// Which of the process's sets of names this is.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The number of scope `name`, given now if it has none.
    pub fn number(&self, name: &[u8]) -> u32 {
        let mut names = self.names.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(&number) = names.numbers.get(name) {
            return number;
        }
        let number = u32::try_from(names.names.len()).expect("fewer than 2^32 dedupe scopes");
        let name: Arc<[u8]> = name.into();
        names.names.push(name.clone());
        names.numbers.insert(name, number);
        number
    }

    /// The names numbered `from` and up, in order.
    fn names_from(&self, from: usize) -> Vec<Arc<[u8]>> {
        let names = self.names.lock().unwrap_or_else(|p| p.into_inner());
        names.names.get(from..).unwrap_or_default().to_vec()
    }
}

pub(crate) struct DedupeMemory {
    names: Arc<ScopeNames>,
    /// By scope number, up to the highest number seen; a scope without ids
    /// yet holds an empty map, which allocates nothing.
    scopes: Vec<ScopeIds>,
    len: usize,
}

struct ScopeIds {
    name: Arc<[u8]>,
    ids: Scope,
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

/// A key's bytes as the log stores them: the scope's name, then the id
/// big-endian.
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
    pub fn new(names: Arc<ScopeNames>) -> Self {
        DedupeMemory {
            names,
            scopes: Vec::new(),
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether `scope` is one of these names, learning the names given
    /// since the last call: a key of a scope of another buffer cannot be
    /// remembered.
    pub fn knows(&mut self, scope: crate::DedupeScope) -> bool {
        scope.names == self.names.id() && self.has_number(scope.number)
    }

    /// Whether a scope numbered `number` has its place here, taking in the
    /// scopes named since the last call when it is past them.
    fn has_number(&mut self, number: u32) -> bool {
        let number = number as usize;
        if number >= self.scopes.len() {
            self.learn_names();
        }
        number < self.scopes.len()
    }

    /// Takes in the scopes named since the last call.
    fn learn_names(&mut self) {
        let known = self.scopes.len();
        self.scopes.extend(
            self.names
                .names_from(known)
                .into_iter()
                .map(|name| ScopeIds {
                    name,
                    ids: Scope::Sparse(HashMap::default()),
                }),
        );
    }

    /// The names these scopes are numbered by.
    pub fn scope_names(&self) -> &Arc<ScopeNames> {
        &self.names
    }

    /// The name of a scope [`Self::knows`].
    pub fn name(&self, scope: u32) -> &[u8] {
        &self.scopes[scope as usize].name
    }

    pub fn get(&self, key: DedupeId) -> Option<&[u8; 16]> {
        self.scopes.get(key.scope as usize)?.ids.get(key.id)
    }

    pub fn contains(&self, key: DedupeId) -> bool {
        self.get(key).is_some()
    }

    /// Remembers `fingerprint` for a key of a scope [`Self::knows`].
    pub fn insert(&mut self, key: DedupeId, fingerprint: [u8; 16]) {
        let new = self.scopes[key.scope as usize]
            .ids
            .insert(key.id, fingerprint);
        self.len += usize::from(new);
    }

    /// Remembers `fingerprint` for a key as the log stores it. Returns
    /// false for a key too short to hold an id, which no source can give
    /// and so is not kept.
    pub fn insert_stored(&mut self, key: &[u8], fingerprint: [u8; 16]) -> bool {
        let Some((name, id)) = split(key) else {
            return false;
        };
        let scope = self.names.number(name);
        // Numbered just now by these names, so never past them once taken in.
        let known = self.has_number(scope);
        debug_assert!(known);
        self.insert(DedupeId { scope, id }, fingerprint);
        true
    }

    /// Calls `f` with up to `limit` keys (scope name, id) and their
    /// fingerprints, from `from` on (`None`: the first key) in a fixed
    /// order: scopes by their names' bytes, ids ascending. Returns the first
    /// key left unvisited, or `None` when it visited the last.
    ///
    /// This is how a snapshot is written a slice per group: a key inserted
    /// behind the position is not visited, which is right for a snapshot
    /// whose writer logs every insert anyway.
    pub fn visit_from(
        &self,
        from: Option<&Position>,
        limit: usize,
        mut f: impl FnMut(&[u8], u16, &[u8; 16]),
    ) -> Option<Position> {
        let mut left = limit;
        let mut scopes: Vec<&ScopeIds> = self.scopes.iter().collect();
        scopes.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        for scope in scopes {
            let first_id = match from {
                None => 0,
                Some(Position(at, id)) => match (*scope.name).cmp(at) {
                    std::cmp::Ordering::Less => continue,
                    std::cmp::Ordering::Equal => *id,
                    std::cmp::Ordering::Greater => 0,
                },
            };
            let stopped = scope
                .ids
                .visit_from(first_id, &mut left, |id, fingerprint| {
                    f(&scope.name, id, fingerprint)
                });
            if let Some(id) = stopped {
                return Some(Position(scope.name.as_ref().into(), id));
            }
        }
        None
    }
}

/// Appends one entry of the dedupe log's encoding:
/// `(varint key length, key, 16-byte fingerprint)`, the key being the
/// scope's name and the id big-endian.
pub(crate) fn encode_entry(out: &mut Vec<u8>, scope: &[u8], id: u16, fingerprint: &[u8; 16]) {
    prost::encoding::encode_varint(scope.len() as u64 + 2, out);
    out.extend_from_slice(scope);
    out.extend_from_slice(&id.to_be_bytes());
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

    pub fn push(&mut self, scope: &[u8], id: u16, fingerprint: &[u8; 16]) {
        let key_len = scope.len() + 2;
        let entry_len =
            prost::encoding::encoded_len_varint(key_len as u64) + key_len + fingerprint.len();
        if !self.value.is_empty() && self.value.len() + entry_len > crate::segment::MAX_BYTES {
            self.close();
        }
        encode_entry(&mut self.value, scope, id, fingerprint);
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
/// Keys too short to hold an id are read past and counted, not kept.
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
        into.insert_stored(key, fingerprint.try_into().expect("16 bytes"));
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

    fn memory() -> DedupeMemory {
        DedupeMemory::new(Arc::new(ScopeNames::default()))
    }

    /// A key as the log stores it, looked up as the committer does: by its
    /// scope's number.
    fn get<'m>(memory: &'m mut DedupeMemory, key: &[u8]) -> Option<&'m [u8; 16]> {
        let (name, id) = split(key)?;
        let scope = crate::DedupeScope {
            names: memory.names.id(),
            number: memory.names.number(name),
        };
        assert!(memory.knows(scope));
        memory.get(DedupeId {
            scope: scope.number,
            id,
        })
    }

    fn scope<'m>(memory: &'m DedupeMemory, name: &str) -> &'m Scope {
        &memory
            .scopes
            .iter()
            .find(|s| *s.name == *name.as_bytes())
            .unwrap()
            .ids
    }

    fn contents(memory: &DedupeMemory) -> BTreeMap<Vec<u8>, [u8; 16]> {
        let mut all = BTreeMap::new();
        let end = memory.visit_from(None, usize::MAX, |name, id, fp| {
            let key = [name, &id.to_be_bytes()].concat();
            assert!(all.insert(key.clone(), *fp).is_none(), "{key:?} twice");
        });
        assert_eq!(end, None);
        all
    }

    /// Every key of two scopes, one past the switch to a table and one not,
    /// overwritten and read back, against a plain map doing the same; keys
    /// too short to hold an id are not kept.
    #[test]
    fn holds_exactly_what_a_map_would_across_the_switch_to_a_table() {
        let mut memory = memory();
        let mut expected = BTreeMap::new();
        let mut put = |memory: &mut DedupeMemory, key: Vec<u8>, fp: [u8; 16]| {
            assert!(memory.insert_stored(&key, fp));
            expected.insert(key, fp);
        };
        for id in 0..=u16::MAX {
            put(&mut memory, key("mqtt", id), fingerprint(id.into()));
        }
        for id in (0..DENSE_AT as u16 - 1).step_by(3) {
            put(&mut memory, key("other", id), fingerprint(id as u64 + 7));
        }
        for short in [&b""[..], b"a"] {
            assert!(!memory.insert_stored(short, fingerprint(99)));
        }
        // Overwrites, in the table and in a map.
        put(&mut memory, key("mqtt", 17), fingerprint(1_000));
        put(&mut memory, key("other", 3), fingerprint(1_001));

        assert!(matches!(scope(&memory, "mqtt/"), Scope::Dense { .. }));
        assert!(matches!(scope(&memory, "other/"), Scope::Sparse(_)));
        assert_eq!(memory.len(), expected.len());
        assert_eq!(contents(&memory), expected);
        for (key, fp) in &expected {
            assert_eq!(get(&mut memory, key), Some(fp), "{key:?}");
        }
        assert_eq!(get(&mut memory, &key("other", 1)), None);
        assert_eq!(get(&mut memory, &key("absent", 1)), None);
    }

    /// A scope is one buffer's: its number means nothing to another
    /// buffer's memory, even where that number is in use.
    #[test]
    fn a_scope_of_other_names_is_not_known() {
        let mut memory = memory();
        assert!(memory.insert_stored(&key("mqtt", 1), fingerprint(1)));
        let here = crate::DedupeScope {
            names: memory.names.id(),
            number: memory.names.number(b"mqtt/"),
        };
        let elsewhere = ScopeNames::default();
        let there = crate::DedupeScope {
            names: elsewhere.id(),
            number: elsewhere.number(b"mqtt/"),
        };
        assert_eq!(here.number, there.number);
        assert!(memory.knows(here));
        assert!(!memory.knows(there));
        // Named after the memory was made: known from then on.
        let later = crate::DedupeScope {
            names: memory.names.id(),
            number: memory.names.number(b"later/"),
        };
        assert!(memory.knows(later));
        assert_eq!(memory.name(later.number), b"later/");
    }

    /// A snapshot pass writes the memory a slice per group while groups
    /// keep adding keys: whatever the slice, every key there at the start
    /// is visited exactly once, in the documented order.
    #[test]
    fn slices_visit_every_key_there_at_the_start_once_while_keys_are_added() {
        for slice in [1, 7, 1_000, 100_000] {
            let mut memory = memory();
            // Even ids of a table scope, and of two map scopes, one of
            // them named before the others (numbers are not the order).
            for id in 0..100u16 {
                memory.insert_stored(&key("z", id), fingerprint(3));
            }
            for id in (0..40_000u16).step_by(2) {
                memory.insert_stored(&key("mqtt", id), fingerprint(id.into()));
            }
            for id in 0..100u16 {
                memory.insert_stored(&key("a", id), fingerprint(1));
            }
            assert!(matches!(scope(&memory, "mqtt/"), Scope::Dense { .. }));
            let at_start: Vec<Vec<u8>> = contents(&memory).into_keys().collect();

            let mut seen = Vec::new();
            let mut position = None;
            let mut odd = 1u16;
            loop {
                position = memory.visit_from(position.as_ref(), slice, |name, id, _| {
                    seen.push([name, &id.to_be_bytes()].concat())
                });
                if position.is_none() {
                    break;
                }
                // New odd ids, behind the position and ahead of it.
                memory.insert_stored(&key("mqtt", odd), fingerprint(5));
                memory.insert_stored(&key("mqtt", 39_999 - odd), fingerprint(5));
                odd = (odd + 2) % 39_999;
            }
            // The order: scopes by their bytes ("a/" < "mqtt/" < "z/"),
            // ids ascending (big-endian, so byte order too).
            let mut expected = at_start.clone();
            expected.sort();
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
        let entries = [(key("s", 1), fingerprint(1)), (key("t", 2), fingerprint(2))];
        let mut value = Vec::new();
        for (key, fp) in &entries {
            let (name, id) = split(key).unwrap();
            encode_entry(&mut value, name, id, fp);
        }
        // A key too short to hold an id, as only a damaged or foreign log
        // has: read past, not kept.
        prost::encoding::encode_varint(1, &mut value);
        value.push(b'x');
        value.extend_from_slice(&fingerprint(3));
        let mut memory = memory();
        assert_eq!(decode_into(&value, &mut memory), (3, true));
        assert_eq!(contents(&memory), entries.iter().cloned().collect());

        let mut memory = self::memory();
        // Cut inside the second entry.
        let first_len = 1 + key("s", 1).len() + 16;
        assert_eq!(
            decode_into(&value[..first_len + 5], &mut memory),
            (1, false)
        );
        assert_eq!(get(&mut memory, &key("s", 1)), Some(&fingerprint(1)));
        assert_eq!(memory.len(), 1);
    }
}
