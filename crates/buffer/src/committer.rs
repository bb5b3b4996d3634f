//! The buffer's single writer. Every change goes through here, in order, so
//! records, counters and bookkeeping never disagree; appends that arrive
//! together share one sled batch and one fsync (group commit), and their
//! records are stored a few KiB at a time, in sled values called segments
//! ([`crate::segment`]).
//!
//! Level bookkeeping with segments:
//! * `records` counts sequence numbers: a segment `first..=last` holds
//!   `last - first + 1` records, minus those at or below `acked_through`.
//! * `bytes` counts the bytes of the segment values on disk, as stored
//!   (compressed, see [`crate::segment`]); the records of the segment being
//!   built count at their uncompressed size until it is sealed, so a record
//!   is never let in on the strength of a ratio not yet known. A partly
//!   acked segment stays (and counts in full) until its last record is
//!   acked, so the byte cap bounds what is really stored.
//! * `DropOldest` drops whole segments, oldest first, that lie entirely
//!   above the send reservation (and the ack floor), so every dropped record
//!   is one the uplink never had and the drop counter stays exact. A segment
//!   that straddles the reservation is never dropped: its unsent tail stays
//!   while newer segments may go, a small departure from strict age order.
//!   When no segment on disk is left to drop, the group being gathered
//!   gives up its own sealed segments, oldest first: a group can hold more
//!   than the cap's free room (a slow disk lets many appends gather), and
//!   without this the newest records were the ones turned away. Their
//!   appends were answered `Stored`, so they count as stored and then
//!   dropped, like any record dropped from disk.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use foldhash::HashMap;
use tokio::sync::{oneshot, watch};

use crate::dedupe::{self, DedupeId, DedupeMemory, Position, ScopeNames};
use crate::{keys, open, segment};
use crate::{
    AppendBatch, BufferError, BufferOptions, Counters, DeadLetter, FullPolicy, Levels, Outcome,
};
use edgefleet_sled_sync::DiskSync;

pub(crate) type Reply<T> = oneshot::Sender<Result<T, BufferError>>;

/// The open database, shared by the committer and the readers.
pub(crate) type SharedDb = Arc<std::sync::RwLock<Option<sled::Db>>>;

pub(crate) enum Op {
    Append {
        records: AppendBatch,
        reply: Reply<Vec<Outcome>>,
    },
    DeadLetter(DeadLetter),
    Ack {
        through: u64,
        /// None for [`crate::Buffer::ack_soon`]: nobody waits for it.
        reply: Option<Reply<()>>,
    },
    Anchor {
        stored_through: u64,
        reply: Reply<AnchorOutcome>,
    },
    ReserveSent {
        last_seq: u64,
        reply: Reply<()>,
    },
    ReleaseUnsent {
        handed_through: u64,
        reply: Reply<()>,
    },
    SetLimits {
        max_bytes: u64,
        when_full: FullPolicy,
    },
    Close {
        reply: oneshot::Sender<()>,
    },
}

/// What [`crate::Buffer::anchor`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnchorOutcome {
    /// The buffer was already aligned with the ingest.
    Unchanged,
    /// Sequence numbers were shifted up by this much (a fresh buffer meeting
    /// an ingest that already stored records of this agent).
    Shifted(u64),
}

/// What the committer shares with the buffer's handles.
pub(crate) struct Handles {
    pub shared: SharedDb,
    pub levels_tx: watch::Sender<Levels>,
    pub counters: Arc<Counters>,
    pub scopes: Arc<ScopeNames>,
}

pub(crate) struct Committer {
    tree: sled::Db,
    /// The database as readers ([`crate::Buffer::read_batch`]) find it;
    /// `None` while it is reopened after a failed write.
    shared: SharedDb,
    /// A write failed: sled refuses everything from then on, so the
    /// committer reopens the database before its next group.
    broken: bool,
    /// What sled's flush leaves unsynced (see `edgefleet_sled_sync`).
    disk: DiskSync,
    options: BufferOptions,
    levels: Levels,
    levels_tx: watch::Sender<Levels>,
    counters: Arc<Counters>,
    sent_reserved: u64,
    /// What a release never goes below: the reservation found at open
    /// (records a previous run may have handed to the network).
    handed_floor: u64,
    dead_count: u64,
    dead_n: u64,
    /// An append waiting for room under the `Block` policy.
    stalled: Option<Op>,
    /// The segment of the current group, reused across groups.
    segment: segment::OpenSegment,
    /// Compresses sealed segments; keeps its zstd context across groups.
    sealer: segment::Sealer,
    /// Encoded lengths of the records of one append, reused.
    lens: Vec<usize>,
    /// The last fingerprint per dedupe key, as committed ([`DedupeLog`]).
    dedupe: DedupeMemory,
    dedupe_log: DedupeLog,
    /// The last group's dedupe map, emptied: a group fills one as large as
    /// the last, and growing it from nothing each time was a rehash per
    /// doubling.
    spare_dedupe: HashMap<DedupeId, [u8; 16]>,
}

/// Where the dedupe memory is stored: each group's updates as values
/// `j` + n of a few KiB each (`dedupe::LogEntries`), replayed in order at
/// start. When the log has grown well past the number of keys, a snapshot
/// pass writes the whole memory again, [`SNAPSHOT_SLICE_KEYS`] keys per
/// group; once it has written the last key, every entry before the pass's
/// first one is superseded, and those are deleted [`STALE_PER_GROUP`] per
/// group. Writing the snapshot (1.7 MB at 65,535 keys) and deleting the
/// old log in one group kept sled's `apply_batch` busy for 25–47 ms, the
/// slowest commits at half load after the file system's own stalls
/// (BENCHMARKS.md, "The half-load tail").
/// Format 1 kept one `q` key per dedupe key; those are read at start and
/// removed when the first pass finishes.
#[derive(Debug, Default)]
struct DedupeLog {
    /// Lowest entry number that is not superseded.
    first: u64,
    next: u64,
    /// Updates in the entries from `first` on (and in the pass's slices).
    updates: u64,
    /// Format 1 `q` entries are still on disk.
    legacy: bool,
    pass: Option<SnapshotPass>,
    /// Superseded entries still on disk.
    stale: std::ops::Range<u64>,
}

#[derive(Debug, Clone)]
struct SnapshotPass {
    /// The pass's first entry.
    start: u64,
    /// The next key to write; `None` until the first slice.
    resume: Option<Position>,
    /// `DedupeLog::updates` when the pass started.
    updates_before: u64,
}

/// A snapshot pass starts when the log holds more updates than this plus
/// four times the number of keys.
const DEDUPE_SNAPSHOT_MIN: u64 = 65_536;
/// Keys a snapshot pass writes per group (about 55 KB): 32 groups for a
/// source with every packet id in use.
const SNAPSHOT_SLICE_KEYS: usize = 2_048;
/// Superseded log entries deleted per group.
const STALE_PER_GROUP: u64 = 256;

/// A counter of the `m/` keys; 0 when absent or unreadable (as a buffer
/// written before the key existed has it).
fn meta_u64(tree: &sled::Db, key: &[u8]) -> u64 {
    tree.get(key)
        .ok()
        .flatten()
        .and_then(|v| keys::u64_value(&v))
        .unwrap_or(0)
}

fn load_dedupe(tree: &sled::Db, scopes: &Arc<ScopeNames>) -> (DedupeMemory, DedupeLog) {
    let mut map = DedupeMemory::new(scopes.clone());
    let mut log = DedupeLog {
        first: 1,
        next: 1,
        ..DedupeLog::default()
    };
    for (key, value) in tree.scan_prefix([keys::DEDUPE]).flatten() {
        if let Ok(fingerprint) = <[u8; 16]>::try_from(value.as_ref()) {
            map.insert_stored(&key[1..], fingerprint);
            log.legacy = true;
        }
    }
    let superseded_below = meta_u64(tree, keys::META_DEDUPE_FIRST);
    let (mut lowest, mut first) = (None, None);
    for (key, value) in tree.scan_prefix([keys::DEDUPE_LOG]).flatten() {
        let Some(n) = keys::dedupe_log_number(&key) else {
            continue;
        };
        lowest.get_or_insert(n);
        log.next = n + 1;
        if n < superseded_below {
            continue;
        }
        first.get_or_insert(n);
        let (updates, intact) = dedupe::decode_into(&value, &mut map);
        log.updates += updates;
        if !intact {
            tracing::error!(
                entry = n,
                "a dedupe log entry is damaged; redeliveries of some messages may be stored twice"
            );
        }
    }
    log.next = log.next.max(superseded_below);
    log.first = first.unwrap_or(log.next);
    if let Some(lowest) = lowest.filter(|&n| n < superseded_below) {
        log.stale = lowest..superseded_below;
    }
    (map, log)
}

#[derive(Default)]
struct Group {
    batch: sled::Batch,
    needs_flush: bool,
    records: usize,
    appended: u64,
    appends: Vec<(Reply<Vec<Outcome>>, Vec<Outcome>)>,
    done: Vec<Reply<()>>,
    dedupe: HashMap<DedupeId, [u8; 16]>,
    /// Records already deleted in this (unapplied) batch, by acks and drops.
    ack_floor: u64,
    /// Segments starting in `drop_start..drop_cursor` were dropped in this
    /// (unapplied) batch; sled still shows them.
    drop_start: u64,
    drop_cursor: u64,
    /// Segments sealed into this (unapplied) batch and still in it, oldest
    /// first: what `DropOldest` may take back out.
    sealed: VecDeque<SealedSegment>,
    dead: Vec<DeadLetter>,
    /// Whether anything in the group has someone waiting for its commit
    /// (everything but [`crate::Buffer::ack_soon`]).
    awaited: bool,
}

/// A segment in a group's batch, not yet on disk.
#[derive(Clone, Copy)]
struct SealedSegment {
    first: u64,
    last: u64,
    bytes: u64,
}

impl Committer {
    pub fn new(
        tree: sled::Db,
        disk: DiskSync,
        options: BufferOptions,
        levels: Levels,
        handles: Handles,
    ) -> Self {
        let Handles {
            shared,
            levels_tx,
            counters,
            scopes,
        } = handles;
        let sent_reserved = meta_u64(&tree, keys::META_SENT_RESERVED);
        let dead_count = tree.scan_prefix([keys::DEAD]).count() as u64;
        let (dedupe, dedupe_log) = load_dedupe(&tree, &scopes);
        Self {
            tree,
            shared,
            broken: false,
            disk,
            options,
            levels,
            levels_tx,
            counters,
            sent_reserved,
            handed_floor: sent_reserved,
            dead_count,
            dead_n: 0,
            stalled: None,
            segment: segment::OpenSegment::default(),
            sealer: segment::Sealer::default(),
            lens: Vec::new(),
            dedupe,
            dedupe_log,
            spare_dedupe: HashMap::default(),
        }
    }

    /// `control` carries acks and bookkeeping, `appends` the sources' records.
    /// They are separate so that acks still get through while an append is
    /// stalled for room under the `Block` policy.
    pub fn run(mut self, control: flume::Receiver<Op>, appends: flume::Receiver<Op>) {
        loop {
            let mut group = Group {
                ack_floor: self.levels.acked_through,
                dedupe: std::mem::take(&mut self.spare_dedupe),
                ..Group::default()
            };
            let mut barrier = None;
            // Wait for work: while stalled only control ops can help.
            let first = if self.stalled.is_some() {
                match control.recv_timeout(Duration::from_millis(100)) {
                    Ok(op) => Some(op),
                    Err(flume::RecvTimeoutError::Timeout) => None,
                    Err(flume::RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match flume::Selector::new()
                    .recv(&control, |r| r)
                    .recv(&appends, |r| r)
                    .wait()
                {
                    Ok(op) => Some(op),
                    Err(_) => break,
                }
            };
            if let Some(op) = first {
                self.route(op, &mut group, &mut barrier);
            }
            while barrier.is_none() {
                match control.try_recv() {
                    Ok(op) => self.route(op, &mut group, &mut barrier),
                    Err(_) => break,
                }
            }
            if barrier.is_none() {
                if let Some(op) = self.stalled.take() {
                    self.process(op, &mut group);
                }
            }
            let gathering_since = Instant::now();
            let mut appends_deadline = None;
            // When the group last grew: appends that belong together (every
            // source's appends in flight) arrive within microseconds, so a
            // pause of `flush_append_gap` means they are all in.
            let mut last_growth = (group.appended, gathering_since);
            let acks_deadline = gathering_since + self.options.ack_linger;
            while barrier.is_none()
                && self.stalled.is_none()
                && group.records < self.options.flush_max_records
            {
                let next = match appends.try_recv() {
                    Ok(op) => op,
                    // A group nobody waits for (acks from `ack_soon`)
                    // waits for appends to join it rather than commit alone.
                    Err(flume::TryRecvError::Empty) if group.appended > 0 || !group.awaited => {
                        let until = if group.appended > 0 {
                            let now = Instant::now();
                            if group.appended != last_growth.0 {
                                last_growth = (group.appended, now);
                            }
                            let deadline = *appends_deadline
                                .get_or_insert_with(|| now + self.options.flush_max_delay);
                            // A small group waits for company: a source
                            // reading a broker in bursts pauses between
                            // them, and closing on each pause made several
                            // small commits, each costing the same wake-ups
                            // and fsync as a large one.
                            if group.records >= self.options.flush_gap_min_records {
                                deadline.min(last_growth.1 + self.options.flush_append_gap)
                            } else {
                                deadline
                            }
                        } else {
                            acks_deadline
                        };
                        match flume::Selector::new()
                            .recv(&control, |r| r)
                            .recv(&appends, |r| r)
                            .wait_deadline(until)
                        {
                            Ok(Ok(op)) => op,
                            _ => break,
                        }
                    }
                    Err(_) => break,
                };
                self.route(next, &mut group, &mut barrier);
            }
            self.commit(group);
            if self.broken {
                self = self.reopen();
            }
            match barrier {
                Some(Op::Close { reply }) => {
                    let _ = self.flush();
                    let _ = reply.send(());
                    return;
                }
                Some(Op::Anchor {
                    stored_through,
                    reply,
                }) => {
                    let _ = reply.send(self.anchor(stored_through));
                }
                _ => {}
            }
        }
        let _ = self.flush();
    }

    /// Reopens the database after a failed write, as the agent would at
    /// start (unfinished snapshots removed, a corrupt database quarantined),
    /// and rebuilds every level and memory from what is on disk, retrying
    /// every second until that works (the disk may still be full).
    /// Sequence numbers the failed groups took may be taken again: none of
    /// them was durable, so none was acknowledged to a source or sent.
    fn reopen(self) -> Committer {
        let Committer {
            tree,
            shared,
            disk,
            options,
            levels_tx,
            counters,
            dedupe,
            ..
        } = self;
        let scopes = dedupe.scope_names().clone();
        // sled admits one opening of a directory: every handle must go.
        drop(tree);
        drop(disk);
        let dir = options.buffer_dir();
        loop {
            std::thread::sleep(Duration::from_secs(1));
            let old = shared.write().unwrap_or_else(|p| p.into_inner()).take();
            drop(old);
            let opened = open::open_or_quarantine(&options).and_then(|(tree, report, levels)| {
                let disk = DiskSync::open(&dir).map_err(|source| BufferError::Io {
                    dir: dir.clone(),
                    source,
                })?;
                Ok((tree, report, levels, disk))
            });
            match opened {
                Ok((tree, report, levels, disk)) => {
                    if let Some(q) = &report.quarantined {
                        tracing::error!(moved_to = %q.moved_to.display(), reason = %q.reason, "buffer could not be reopened and has been quarantined");
                    }
                    tracing::info!(dir = %dir.display(), records = levels.records, "buffer reopened after a failed write");
                    *shared.write().unwrap_or_else(|p| p.into_inner()) = Some(tree.clone());
                    levels_tx.send_replace(levels);
                    let handles = Handles {
                        shared,
                        levels_tx,
                        counters,
                        scopes,
                    };
                    return Committer::new(tree, disk, options, levels, handles);
                }
                // A reader may still hold the old database for a moment.
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot reopen the buffer yet; retrying")
                }
            }
        }
    }

    /// sled's flush, then what it leaves unsynced: what is durable after
    /// this survives a power cut, not only a crash.
    fn flush(&self) -> sled::Result<()> {
        self.tree.flush()?;
        self.disk.sync().map_err(sled::Error::Io)
    }

    /// Close and Anchor end the group (they must see everything before them
    /// committed); everything else joins it.
    fn route(&mut self, op: Op, group: &mut Group, barrier: &mut Option<Op>) {
        match op {
            op @ (Op::Close { .. } | Op::Anchor { .. }) => *barrier = Some(op),
            op => self.process(op, group),
        }
    }

    fn process(&mut self, op: Op, group: &mut Group) {
        if !matches!(op, Op::Ack { reply: None, .. }) {
            group.awaited = true;
        }
        match op {
            Op::Append { records, reply } => self.append(records, reply, group),
            Op::DeadLetter(letter) => group.dead.push(letter),
            Op::Ack { through, reply } => {
                self.ack(through, group);
                group.done.extend(reply);
            }
            Op::ReserveSent { last_seq, reply } => {
                // The write joins the current group's fsync, so under load it
                // costs no extra flush.
                if last_seq > self.sent_reserved {
                    self.sent_reserved = last_seq;
                    group
                        .batch
                        .insert(keys::META_SENT_RESERVED, &self.sent_reserved.to_be_bytes());
                    group.needs_flush = true;
                }
                group.done.push(reply);
            }
            Op::ReleaseUnsent {
                handed_through,
                reply,
            } => {
                // Lowering needs no flush: until it is on disk the higher
                // value stands, which only keeps more records from DropOldest.
                let keep = handed_through.max(self.handed_floor);
                if keep < self.sent_reserved {
                    self.sent_reserved = keep;
                    self.levels.sent_reserved = self.levels.sent_reserved.min(keep);
                    group
                        .batch
                        .insert(keys::META_SENT_RESERVED, &keep.to_be_bytes());
                }
                group.done.push(reply);
            }
            Op::SetLimits {
                max_bytes,
                when_full,
            } => {
                self.options.max_bytes = max_bytes;
                self.options.when_full = when_full;
            }
            Op::Close { reply } => {
                // Only reached if routing changes; never lose the reply.
                let _ = reply.send(());
            }
            Op::Anchor { reply, .. } => {
                let _ = reply.send(Err(BufferError::Closed));
            }
        }
    }

    fn append(&mut self, mut records: AppendBatch, reply: Reply<Vec<Outcome>>, group: &mut Group) {
        // Sizes as counted until sealed: each record's entry with the
        // longest sequence number, and a header per segment.
        let mut lens = std::mem::take(&mut self.lens);
        lens.clear();
        lens.extend(records.records().iter().map(<[u8]>::len));
        // What the append takes on disk at most, with the header of every
        // segment it starts: under `Block` it must fit whole, or a record
        // near the cap would be dropped instead of waiting for room.
        let total = segment::measured_total(self.segment.measure(), &lens);
        if total > self.options.max_bytes {
            let _ = reply.send(Err(BufferError::TooLarge {
                bytes: total,
                cap: self.options.max_bytes,
            }));
            self.lens = lens;
            return;
        }
        if self.options.when_full == FullPolicy::Block
            && self.levels.bytes + total > self.options.max_bytes
        {
            self.stalled = Some(Op::Append { records, reply });
            self.lens = lens;
            return;
        }
        let mut outcomes = Vec::with_capacity(records.len());
        for ((record, dedupe), &len) in records.drain().zip(&lens) {
            // A scope of another buffer has no name here to store its keys
            // under: such a record is stored, and its key forgotten.
            let dedupe = dedupe.filter(|d| {
                let known = self.dedupe.knows(d.scope);
                if !known {
                    tracing::error!(
                        "a dedupe key of a scope another buffer named: the record is stored without it, and a redelivery of it would be stored again"
                    );
                }
                known
            });
            if let Some(d) = dedupe {
                let key = DedupeId {
                    scope: d.scope.number,
                    id: d.id,
                };
                let seen = group.dedupe.get(&key).or_else(|| self.dedupe.get(key));
                let matches = |seen: &[u8; 16]| {
                    *seen == d.fingerprint || Some(*seen) == d.earlier_fingerprint
                };
                if d.redelivery && seen.is_some_and(matches) {
                    self.counters.duplicates.fetch_add(1, Ordering::Relaxed);
                    outcomes.push(Outcome::Duplicate);
                    continue;
                }
                group.dedupe.insert(key, d.fingerprint);
            }
            let starts_segment = segment::starts_new(self.segment.measure(), len);
            if starts_segment {
                self.seal_segment(group);
            }
            let header = if starts_segment {
                segment::HEADER_LEN as u64
            } else {
                0
            };
            let size = segment::measured_len(len) as u64 + header;
            if self.levels.bytes + size > self.options.max_bytes && !self.make_room(size, group) {
                self.counters.dropped_full.fetch_add(1, Ordering::Relaxed);
                outcomes.push(Outcome::Dropped);
                continue;
            }
            // Sequence numbers in a group are contiguous: only stored
            // records take one, so the segment numbers them by position.
            let seq = self.levels.next_seq;
            if starts_segment {
                self.segment.start(seq);
            }
            let pushed = self.segment.push(record) as u64;
            debug_assert_eq!(pushed + header, size);
            self.levels.next_seq += 1;
            self.levels.records += 1;
            self.levels.bytes += size;
            group.records += 1;
            group.appended += 1;
            group.needs_flush = true;
            outcomes.push(Outcome::Stored(seq));
        }
        group.appends.push((reply, outcomes));
        self.lens = lens;
    }

    /// `DropOldest`: deletes the oldest segments that were never handed to
    /// the uplink until `size` more bytes fit. False when that is not enough.
    fn make_room(&mut self, size: u64, group: &mut Group) -> bool {
        // Only segments that start above everything possibly sent (and
        // everything acked, which was sent) are candidates; the segment of
        // the current group is not on disk yet and never dropped.
        let from = self
            .sent_reserved
            .max(group.ack_floor)
            .saturating_add(1)
            .max(group.drop_cursor)
            .max(self.levels.first_seq);
        if group.drop_cursor == 0 {
            group.drop_start = from;
        }
        let mut dropped = 0u64;
        let mut cursor = from;
        for item in self
            .tree
            .range(&keys::seq_bound(from)[..]..keys::records_end())
        {
            if self.levels.bytes + size <= self.options.max_bytes {
                break;
            }
            let Ok((key, value)) = item else { break };
            let Some((first, last)) = keys::span_of(&key) else {
                break;
            };
            group.batch.remove(key);
            self.levels.bytes = self.levels.bytes.saturating_sub(value.len() as u64);
            self.levels.records -= last - first + 1;
            dropped += last - first + 1;
            cursor = last + 1;
        }
        group.drop_cursor = cursor;
        // Then the group's own segments: they are newer than anything on
        // disk, but older than the record that needs the room.
        let floor = self.sent_reserved.max(group.ack_floor);
        while self.levels.bytes + size > self.options.max_bytes {
            // The guard is never true (the uplink reads only what is
            // durable); it keeps the drop counter exact if that ever changes.
            let Some(&s) = group.sealed.front().filter(|s| s.first > floor) else {
                break;
            };
            group.sealed.pop_front();
            group.batch.remove(&keys::segment(s.first, s.last));
            self.levels.bytes = self.levels.bytes.saturating_sub(s.bytes);
            let records = s.last - s.first + 1;
            self.levels.records -= records;
            dropped += records;
        }
        if dropped > 0 {
            self.counters
                .dropped_full
                .fetch_add(dropped, Ordering::Relaxed);
            tracing::warn!(dropped, "buffer full: dropped the oldest unsent records");
        }
        self.levels.bytes + size <= self.options.max_bytes
    }

    fn ack(&mut self, through: u64, group: &mut Group) {
        let through = through.min(self.levels.next_seq.saturating_sub(1));
        if through <= group.ack_floor {
            return;
        }
        let floor = group.ack_floor;
        // The segment that may hold `floor + 1`, then every segment starting
        // at or below `through`.
        let start = self
            .tree
            .range(keys::records_start()..&keys::seq_bound(floor + 1)[..])
            .next_back()
            .and_then(|item| item.ok())
            .map(|(key, _)| key);
        let end = keys::seq_bound(through + 1);
        let start = start.map_or_else(|| keys::seq_bound(floor + 1).to_vec(), |key| key.to_vec());
        let segments = self.tree.range(start.as_slice()..end.as_slice());
        for (key, value) in segments.flatten() {
            let Some((first, last)) = keys::span_of(&key) else {
                continue;
            };
            if last <= floor {
                // Fully acked earlier (deleted in this batch, or a format
                // 1 leftover); counted then.
                continue;
            }
            if group.drop_cursor > 0 && (group.drop_start..group.drop_cursor).contains(&first) {
                // Dropped in this batch. Acked records were sent, so at or
                // below the send reservation, and drops never touch those:
                // this is only a guard against counting twice.
                continue;
            }
            let lo = first.max(floor + 1);
            let hi = last.min(through);
            self.levels.records -= hi - lo + 1;
            if last <= through {
                group.batch.remove(key);
                self.levels.bytes = self.levels.bytes.saturating_sub(value.len() as u64);
            }
        }
        group.ack_floor = through;
        self.levels.acked_through = through;
    }

    /// Puts the segment being built, if any, into the group's batch. Its
    /// records were counted at their size uncompressed (a record must be
    /// judged against the cap before its segment is complete); the level now
    /// takes the real size of the values it is stored as.
    fn seal_segment(&mut self, group: &mut Group) {
        let counted = self.segment.measure() as u64;
        let Some((first, records, entries)) = self.segment.take() else {
            return;
        };
        let mut stored = 0u64;
        let (batch, sealed) = (&mut group.batch, &mut group.sealed);
        self.sealer
            .seal(entries, first, records, |first, last, value| {
                stored += value.len() as u64;
                batch.insert(&keys::segment(first, last), value);
                sealed.push_back(SealedSegment {
                    first,
                    last,
                    bytes: value.len() as u64,
                });
            });
        self.levels.bytes = self.levels.bytes.saturating_sub(counted) + stored;
    }

    fn commit(&mut self, mut group: Group) {
        self.seal_segment(&mut group);
        for letter in std::mem::take(&mut group.dead) {
            if let Ok(json) = serde_json::to_vec(&letter) {
                self.dead_n += 1;
                group
                    .batch
                    .insert(&keys::dead(letter.received_at_ns, self.dead_n), json);
                self.dead_count += 1;
            }
        }
        let mut dedupe_updates = std::mem::take(&mut group.dedupe);
        // The pass as this group leaves it; kept only if the group commits.
        let mut pass = self.dedupe_log.pass.clone();
        if pass.is_none() && !dedupe_updates.is_empty() {
            let new_keys = dedupe_updates
                .keys()
                .filter(|&&key| !self.dedupe.contains(key))
                .count();
            let keys_after = (self.dedupe.len() + new_keys) as u64;
            if self.dedupe_log.updates + dedupe_updates.len() as u64
                > DEDUPE_SNAPSHOT_MIN + 4 * keys_after
            {
                pass = Some(SnapshotPass {
                    start: self.dedupe_log.next,
                    resume: None,
                    updates_before: self.dedupe_log.updates,
                });
            }
        }
        let mut written = dedupe_updates.len() as u64;
        let mut pass_finished = false;
        // Numbers are never reused, even if this batch fails: a failed
        // batch may still reach the disk.
        let mut entries = dedupe::LogEntries::new(&mut group.batch, &mut self.dedupe_log.next);
        if let Some(pass) = &mut pass {
            // The slice goes before the group's own updates: replay keeps a
            // key's last value, and the memory does not hold this group's yet.
            pass.resume = self.dedupe.visit_from(
                pass.resume.as_ref(),
                SNAPSHOT_SLICE_KEYS,
                |scope, id, fingerprint| {
                    entries.push(scope, id, fingerprint);
                    written += 1;
                },
            );
            pass_finished = pass.resume.is_none();
        }
        for (key, fingerprint) in &dedupe_updates {
            entries.push(self.dedupe.name(key.scope), key.id, fingerprint);
        }
        entries.finish();
        let stale = &self.dedupe_log.stale;
        let stale_deleted = stale.start..(stale.start + STALE_PER_GROUP).min(stale.end);
        for old in stale_deleted.clone() {
            group.batch.remove(&keys::dedupe_log(old));
        }
        if let (true, Some(pass)) = (pass_finished, &pass) {
            group
                .batch
                .insert(keys::META_DEDUPE_FIRST, &pass.start.to_be_bytes());
        }
        let legacy_removed = pass_finished && self.dedupe_log.legacy;
        if legacy_removed {
            for (key, _) in self.tree.scan_prefix([keys::DEDUPE]).flatten() {
                group.batch.remove(key);
            }
        }
        let l = self.levels;
        group
            .batch
            .insert(keys::META_NEXT_SEQ, &l.next_seq.to_be_bytes());
        group
            .batch
            .insert(keys::META_RECORDS, &l.records.to_be_bytes());
        group.batch.insert(keys::META_BYTES, &l.bytes.to_be_bytes());
        group
            .batch
            .insert(keys::META_ACKED, &l.acked_through.to_be_bytes());
        let started = Instant::now();
        let result = self.tree.apply_batch(group.batch).and_then(|()| {
            if group.needs_flush {
                self.flush()
            } else {
                Ok(())
            }
        });
        if let (true, Some(observer)) = (group.needs_flush, &self.options.on_commit) {
            (observer.0)(started.elapsed());
        }
        match result {
            Ok(()) => {
                // Only committed fingerprints count: a redelivery of a
                // message whose record was not stored must be stored.
                for (key, fingerprint) in dedupe_updates.drain() {
                    self.dedupe.insert(key, fingerprint);
                }
                let log = &mut self.dedupe_log;
                log.updates += written;
                log.stale.start = stale_deleted.end;
                match pass {
                    Some(done) if pass_finished => {
                        // Every key was written from `done.start` on.
                        let from = if log.stale.is_empty() {
                            log.first
                        } else {
                            log.stale.start
                        };
                        log.stale = from..done.start;
                        log.first = done.start;
                        log.updates -= done.updates_before;
                        log.pass = None;
                        if legacy_removed {
                            log.legacy = false;
                        }
                    }
                    pass => log.pass = pass,
                }
                self.counters.commits.fetch_add(1, Ordering::Relaxed);
                self.counters
                    .appended
                    .fetch_add(group.appended, Ordering::Relaxed);
                if group.needs_flush {
                    self.levels.durable_through = self.levels.next_seq - 1;
                    self.levels.sent_reserved = self.sent_reserved;
                }
                self.levels.first_seq = self.first_seq();
                self.levels_tx.send_replace(self.levels);
                for (reply, outcomes) in group.appends {
                    let _ = reply.send(Ok(outcomes));
                }
                for reply in group.done {
                    let _ = reply.send(Ok(()));
                }
            }
            Err(e) => {
                self.counters.write_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, dir = %self.options.buffer_dir().display(), "buffer write failed (is the disk full?); sources will retry");
                let message = e.to_string();
                for (reply, _) in group.appends {
                    let _ = reply.send(Err(BufferError::WriteFailed(message.clone())));
                }
                for reply in group.done {
                    let _ = reply.send(Err(BufferError::WriteFailed(message.clone())));
                }
                // sled refuses every operation after a failed write until
                // it is opened again; the run loop reopens it before the
                // next group. What reached the disk is then all there is:
                // nothing of this group was acknowledged to anyone.
                self.broken = true;
            }
        }
        dedupe_updates.clear();
        self.spare_dedupe = dedupe_updates;
        self.trim_dead_letters();
    }

    fn first_seq(&self) -> u64 {
        if self.levels.records == 0 {
            return 0;
        }
        first_seq(&self.tree, self.levels.acked_through)
    }

    fn trim_dead_letters(&mut self) {
        while self.dead_count > u64::from(self.options.dead_letter_max) {
            match self.tree.scan_prefix([keys::DEAD]).next() {
                Some(Ok((key, _))) => {
                    let _ = self.tree.remove(key);
                    self.dead_count -= 1;
                }
                _ => break,
            }
        }
    }

    fn anchor(&mut self, stored_through: u64) -> Result<AnchorOutcome, BufferError> {
        let l = self.levels;
        let consistent = l.anchored && stored_through < l.next_seq;
        if consistent {
            return Ok(AnchorOutcome::Unchanged);
        }
        if l.anchored {
            tracing::error!(
                stored_through,
                next_seq = l.next_seq,
                "the ingest has stored sequence numbers this buffer never issued (restored from an old copy, or two agents share one identity?): renumbering so new records are not taken for duplicates"
            );
        }
        let base = if l.records > 0 {
            l.first_seq
        } else {
            l.next_seq
        };
        let shift = (stored_through + 1).saturating_sub(base);
        let mut batch = sled::Batch::default();
        if shift > 0 {
            // Sequence numbers inside a segment are implied by its key, so
            // renumbering moves each value to a shifted key, unchanged.
            // Highest first: each new key is above every old key still to be
            // visited, so inserts and removes in one batch never collide.
            let mut entries: Vec<_> = self
                .tree
                .range(keys::records_start()..keys::records_end())
                .collect::<Result<_, _>>()
                .map_err(|source| BufferError::Storage {
                    dir: self.options.buffer_dir(),
                    source,
                })?;
            entries.reverse();
            for (key, value) in entries {
                let Some((first, last)) = keys::span_of(&key) else {
                    continue;
                };
                batch.insert(&keys::segment(first + shift, last + shift), value);
                batch.remove(key);
            }
        }
        let mut next = self.levels;
        next.next_seq += shift;
        if next.records > 0 {
            next.first_seq += shift;
        }
        next.durable_through = next.next_seq - 1;
        next.acked_through = stored_through;
        next.anchored = true;
        next.sent_reserved = 0;
        batch.insert(keys::META_NEXT_SEQ, &next.next_seq.to_be_bytes());
        batch.insert(keys::META_ANCHORED, &1u64.to_be_bytes());
        batch.insert(keys::META_ACKED, &next.acked_through.to_be_bytes());
        // What was reserved as possibly sent belongs to the old numbering.
        batch.insert(keys::META_SENT_RESERVED, &0u64.to_be_bytes());
        self.tree
            .apply_batch(batch)
            .and_then(|()| self.flush())
            .map_err(|e| BufferError::WriteFailed(e.to_string()))?;
        self.sent_reserved = 0;
        self.handed_floor = 0;
        self.levels = next;
        self.levels_tx.send_replace(self.levels);
        if shift > 0 {
            tracing::warn!(
                shift,
                stored_through,
                "fresh buffer anchored: renumbered buffered records to follow what the ingest already stored"
            );
        }
        Ok(AnchorOutcome::Shifted(shift))
    }
}

/// Lowest buffered sequence number: the start of the first segment, or the
/// record after the ack floor when that segment is partly acked.
pub(crate) fn first_seq(tree: &sled::Db, acked_through: u64) -> u64 {
    tree.range(keys::records_start()..keys::records_end())
        .next()
        .and_then(|item| item.ok())
        .and_then(|(key, _)| keys::span_of(&key))
        .map(|(first, _)| first.max(acked_through + 1))
        .unwrap_or(0)
}
