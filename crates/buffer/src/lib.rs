//! The edge agent's durable buffer.
//!
//! Every record a source produces is written here before the source
//! acknowledges it (to an MQTT broker, say), and stays until the ingest
//! acknowledges that it stored it. Properties, each relied on elsewhere:
//!
//! * **Durable before acknowledged.** [`Buffer::append`] resolves only after the
//!   record is fsync'd. Appends from all sources are grouped into one write and
//!   one fsync (group commit), which is what makes durability affordable.
//! * **Only durable records are read.** The uplink never sends a record a crash
//!   could still take back, so a resent source message can never turn into a
//!   second stored record.
//! * **Bounded.** A byte cap with a policy when full: `Block` stops appends (so
//!   sources stop acknowledging and the broker keeps the data), `DropOldest`
//!   deletes the oldest records *that were never handed to the uplink*, so the
//!   drop counter counts exactly the records that can never reach the ingest.
//! * **Survives SIGKILL at any point.** One sled tree, one atomic batch per
//!   group: records, counters and bookkeeping change together or not at all.
//!   A group's records are stored together as one value, a segment
//!   ([`segment`]), so appending costs one sled write per group, not one per
//!   record.
//! * **Never crash-loops on corruption.** A buffer that cannot be opened is moved
//!   to `quarantine/` and a fresh one started, and [`OpenReport`] says so.
//!
//! All writes go through one committer thread ([`committer`]); reads run
//! concurrently on sled's lock-free tree.

mod append_batch;
mod committer;
mod dedupe;
mod keys;
mod open;
mod segment;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use edgefleet_proto::batch_zstd::{BatchCompressor, BatchZstdError, FramedBatchBuilder};
use edgefleet_proto::encoded::{check_record, BatchBuilder, EncodedBatch};
use edgefleet_proto::{EncodedRecord, Record};
use tokio::sync::{oneshot, watch};

pub use append_batch::AppendBatch;
pub use committer::AnchorOutcome;
pub use open::{OpenReport, Quarantine};

#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    #[error("buffer storage error in {dir}: {source}")]
    Storage {
        dir: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("cannot prepare buffer directory {dir}: {source}")]
    Io {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("a single append of {bytes} bytes is larger than the buffer cap of {cap} bytes")]
    TooLarge { bytes: u64, cap: u64 },
    #[error("the buffer is closed")]
    Closed,
    #[error("buffer write failed (disk full or failing?): {0}")]
    WriteFailed(String),
    #[error("compressing a batch read from the buffer: {0}")]
    Compress(String),
}

/// What to do when the byte cap is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FullPolicy {
    Block,
    DropOldest,
}

#[derive(Debug, Clone)]
pub struct BufferOptions {
    /// The agent's data directory; the buffer lives in `buffer/` below it and
    /// quarantined buffers in `quarantine/`, so quarantine is a rename within
    /// one file system even when the data directory is a mount point.
    pub data_dir: PathBuf,
    pub max_bytes: u64,
    pub when_full: FullPolicy,
    /// Group commit: the longest an append waits for company before the fsync.
    pub flush_max_delay: Duration,
    /// Group commit: the group is written as soon as no append joined it for
    /// this long, even before `flush_max_delay`. A source's appends in
    /// flight arrive within microseconds of each other; once all of them
    /// are in, waiting on only delays every one of them (and the source,
    /// which can send no more until they are acknowledged).
    pub flush_append_gap: Duration,
    /// Group commit: `flush_append_gap` closes a group early only once it
    /// holds this many records; a smaller one waits up to `flush_max_delay`.
    pub flush_gap_min_records: usize,
    /// Group commit: a group is written at once when it has this many records.
    pub flush_max_records: usize,
    /// How long acks that nobody waits for ([`Buffer::ack_soon`]) wait for
    /// appends to commit with, rather than make a commit of their own: each
    /// commit rewrites the buffer's bookkeeping, and an uplink is acked a
    /// few hundred times a second at full speed.
    pub ack_linger: Duration,
    pub dead_letter_max: u32,
    /// Told how long each group commit that wrote to disk took.
    pub on_commit: Option<CommitObserver>,
}

/// Called on the committer thread with the duration of each group commit
/// that wrote to disk (sled's write and the fsync after it), e.g. to feed a
/// histogram: the commit is where a durable append waits, so it is the
/// first suspect for a latency tail. It must be quick; it delays the
/// commits after it.
#[derive(Clone)]
pub struct CommitObserver(pub Arc<dyn Fn(Duration) + Send + Sync>);

impl std::fmt::Debug for CommitObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CommitObserver")
    }
}

impl BufferOptions {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            max_bytes: 1 << 30,
            when_full: FullPolicy::Block,
            flush_max_delay: Duration::from_millis(4),
            flush_append_gap: Duration::from_micros(100),
            // One full append of the MQTT source.
            flush_gap_min_records: 2048,
            flush_max_records: 50_000,
            ack_linger: Duration::from_millis(20),
            dead_letter_max: 1000,
            on_commit: None,
        }
    }
    pub fn buffer_dir(&self) -> PathBuf {
        self.data_dir.join("buffer")
    }
}

/// Marks a record that its source may deliver more than once (an MQTT QoS 1
/// message redelivered after a reconnect or a crash). The buffer remembers the
/// last `fingerprint` seen per key (`scope` and `id`); a redelivery with the
/// same key and fingerprint is recognised and not stored again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DedupeKey {
    /// The source's scope ([`Buffer::dedupe_scope`]).
    pub scope: DedupeScope,
    /// e.g. the MQTT packet id.
    pub id: u16,
    /// e.g. a hash of topic and payload.
    pub fingerprint: [u8; 16],
    /// The same message's fingerprint as an earlier version of the source
    /// computed it, if that differs: a redelivery matching either is a
    /// duplicate, so a memory written before an upgrade still recognises
    /// the messages the broker redelivers after it. Sources need to set it
    /// only on redeliveries, where it costs nothing in the common case.
    pub earlier_fingerprint: Option<[u8; 16]>,
    /// The source says this is a redelivery (the MQTT DUP flag).
    pub redelivery: bool,
}

/// A namespace of dedupe ids (one per MQTT source), named once with
/// [`Buffer::dedupe_scope`] and valid for that buffer only. The name is what
/// the buffer stores with each key, so it must stay the same across
/// restarts for redeliveries after one to be recognised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DedupeScope {
    /// Which buffer's names ([`dedupe::ScopeNames::id`]): a scope given to
    /// another buffer, or to this directory before it was opened again,
    /// must not be taken for whichever name has its number here.
    pub(crate) names: u64,
    pub(crate) number: u32,
}

/// A record on its way into the buffer. Its `seq` is assigned by the buffer.
///
/// The record comes encoded: sources write their records' wire form
/// directly ([`edgefleet_proto::RecordWriter`]) and the committer thread,
/// which every append passes through, only copies the bytes. A source on
/// the hot path writes into an [`AppendBatch`] instead, which packs the
/// records of an append into one allocation; a `Vec<Incoming>` becomes one.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub record: EncodedRecord,
    pub dedupe: Option<DedupeKey>,
}

impl From<EncodedRecord> for Incoming {
    fn from(record: EncodedRecord) -> Self {
        Incoming {
            record,
            dedupe: None,
        }
    }
}

impl From<Record> for Incoming {
    fn from(record: Record) -> Self {
        Incoming::from(EncodedRecord::from(record))
    }
}

/// What became of each appended record, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Durably stored under this sequence number.
    Stored(u64),
    /// A redelivery of a record already stored.
    Duplicate,
    /// Dropped on arrival: the buffer was full and nothing older could be dropped.
    Dropped,
}

/// A payload a source could not decode, kept (bounded) for inspection.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DeadLetter {
    pub source: String,
    /// Where it came from, e.g. the MQTT topic.
    pub origin: String,
    pub reason: String,
    pub received_at_ns: i64,
    /// The payload, lossily as text, truncated.
    pub payload: String,
}

/// Counters and levels, for metrics and heartbeats.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BufferStats {
    pub records: u64,
    pub bytes: u64,
    pub next_seq: u64,
    /// Lowest sequence number still buffered; 0 when empty.
    pub first_seq: u64,
    /// Highest sequence number that is durable (readable by the uplink).
    pub durable_through: u64,
    pub acked_through: u64,
    pub epoch: u64,
    pub anchored: bool,
    pub appended_total: u64,
    pub dropped_full_total: u64,
    pub duplicates_total: u64,
    pub corrupt_skipped_total: u64,
    pub commits_total: u64,
    pub write_errors_total: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub appended: AtomicU64,
    pub dropped_full: AtomicU64,
    pub duplicates: AtomicU64,
    pub corrupt_skipped: AtomicU64,
    pub commits: AtomicU64,
    pub write_errors: AtomicU64,
}

/// Levels the committer publishes after every commit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Levels {
    pub records: u64,
    pub bytes: u64,
    pub next_seq: u64,
    pub first_seq: u64,
    pub durable_through: u64,
    pub acked_through: u64,
    pub epoch: u64,
    pub anchored: bool,
    /// Highest seq durably reserved as possibly sent (see
    /// [`Buffer::before_send`]); 0 until the first reservation of this run.
    pub sent_reserved: u64,
}

struct Inner {
    /// `None` only while the committer reopens it after a failed write.
    tree: committer::SharedDb,
    control: flume::Sender<committer::Op>,
    appends: flume::Sender<committer::Op>,
    levels: watch::Receiver<Levels>,
    counters: Arc<Counters>,
    scopes: Arc<dedupe::ScopeNames>,
    dir: PathBuf,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// A handle to the buffer; clones share it.
#[derive(Clone)]
pub struct Buffer {
    inner: Arc<Inner>,
}

impl Buffer {
    /// Opens (or creates) the buffer, quarantining one that cannot be opened.
    /// Blocking: call from a blocking context or at start-up.
    pub fn open(options: BufferOptions) -> Result<(Buffer, OpenReport), BufferError> {
        let (tree, report, levels) = open::open_or_quarantine(&options)?;
        let disk =
            edgefleet_sled_sync::DiskSync::open(&options.buffer_dir()).map_err(|source| {
                BufferError::Io {
                    dir: options.buffer_dir(),
                    source,
                }
            })?;
        let counters = Arc::new(Counters::default());
        let (levels_tx, levels_rx) = watch::channel(levels);
        let (control_tx, control_rx) = flume::unbounded();
        // Bounded: when the committer falls behind (or is stalled by the
        // `Block` policy) sources wait here.
        let (appends_tx, appends_rx) = flume::bounded(256);
        let shared: committer::SharedDb = Arc::new(std::sync::RwLock::new(Some(tree.clone())));
        let scopes = Arc::new(dedupe::ScopeNames::default());
        let committer = committer::Committer::new(
            tree,
            disk,
            options.clone(),
            levels,
            committer::Handles {
                shared: shared.clone(),
                levels_tx,
                counters: counters.clone(),
                scopes: scopes.clone(),
            },
        );
        let thread = std::thread::Builder::new()
            .name("buffer-commit".into())
            .spawn(move || committer.run(control_rx, appends_rx))
            .map_err(|source| BufferError::Io {
                dir: options.buffer_dir(),
                source,
            })?;
        let buffer = Buffer {
            inner: Arc::new(Inner {
                tree: shared,
                control: control_tx,
                appends: appends_tx,
                levels: levels_rx,
                counters,
                scopes,
                dir: options.buffer_dir(),
                thread: std::sync::Mutex::new(Some(thread)),
            }),
        };
        Ok((buffer, report))
    }

    /// The scope of dedupe keys named `name`, the same for every call with
    /// that name. A source names its scope once and gives it with each key.
    pub fn dedupe_scope(&self, name: impl AsRef<[u8]>) -> DedupeScope {
        DedupeScope {
            names: self.inner.scopes.id(),
            number: self.inner.scopes.number(name.as_ref()),
        }
    }

    /// What an append of `records` counts against the byte cap before it is
    /// stored, when it starts a segment: their uncompressed size, numbered
    /// (with room for the longest number), with a header per segment. Under
    /// the `Block` policy an append must fit whole by this measure; once
    /// stored, compressed segments count less.
    pub fn append_size(batch: &AppendBatch) -> u64 {
        let lens: Vec<usize> = batch.records().iter().map(<[u8]>::len).collect();
        segment::measured_total(0, &lens)
    }

    /// Appends records; resolves once they are durable (or dropped, or
    /// recognised as duplicates). Under the `Block` policy this waits for room.
    pub async fn append(
        &self,
        records: impl Into<AppendBatch>,
    ) -> Result<Vec<Outcome>, BufferError> {
        let records = records.into();
        let (reply, rx) = oneshot::channel();
        self.inner
            .appends
            .send_async(committer::Op::Append { records, reply })
            .await
            .map_err(|_| BufferError::Closed)?;
        rx.await.map_err(|_| BufferError::Closed)?
    }

    /// Deletes every record up to `through`: the ingest has stored them.
    pub async fn ack(&self, through: u64) -> Result<(), BufferError> {
        self.request(|reply| committer::Op::Ack {
            through,
            reply: Some(reply),
        })
        .await
    }

    /// [`Buffer::ack`] without waiting for the commit that deletes the
    /// records, so the uplink's loop never stalls behind a large group of
    /// appends. Acks are cumulative and only free space: one lost in a crash
    /// costs nothing, since the ingest's `stored_through` moves the cursor
    /// past those records at the next session.
    pub fn ack_soon(&self, through: u64) -> Result<(), BufferError> {
        self.inner
            .control
            .send(committer::Op::Ack {
                through,
                reply: None,
            })
            .map_err(|_| BufferError::Closed)
    }

    /// Aligns the buffer's sequence numbers with the ingest's record of this
    /// agent (see the protocol's "unanchored" buffers). Call with
    /// `HelloAck.stored_through` before reading.
    pub async fn anchor(&self, stored_through: u64) -> Result<AnchorOutcome, BufferError> {
        self.request(|reply| committer::Op::Anchor {
            stored_through,
            reply,
        })
        .await
    }

    /// Must be awaited before records up to `last_seq` are handed to the
    /// network: it durably notes that they may have been sent, so that
    /// `DropOldest` never drops (and counts) a record the ingest may have.
    pub async fn before_send(&self, last_seq: u64) -> Result<(), BufferError> {
        self.before_send_ahead(last_seq, 0).await
    }

    /// [`Buffer::before_send`] that, when it has to write, reserves `ahead`
    /// more sequence numbers, so that the next batches up to there go out
    /// without waiting for a commit of the buffer. The cost: those records
    /// cannot be dropped by `DropOldest` before they are sent (newer ones
    /// go instead), a small departure from strict age order that `ahead`
    /// bounds.
    pub async fn before_send_ahead(&self, last_seq: u64, ahead: u64) -> Result<(), BufferError> {
        if self.inner.levels.borrow().sent_reserved >= last_seq {
            return Ok(());
        }
        self.request(|reply| committer::Op::ReserveSent {
            last_seq: last_seq.saturating_add(ahead),
            reply,
        })
        .await
    }

    /// Gives back what [`Buffer::before_send_ahead`] reserved beyond
    /// `handed_through`, the highest sequence number this run actually
    /// handed to the network: call when a session ends, so that while the
    /// link is down `DropOldest` drops the oldest records again rather than
    /// the newest. Never goes below what a previous run reserved.
    pub async fn release_unsent(&self, handed_through: u64) -> Result<(), BufferError> {
        if self.inner.levels.borrow().sent_reserved <= handed_through {
            return Ok(());
        }
        self.request(|reply| committer::Op::ReleaseUnsent {
            handed_through,
            reply,
        })
        .await
    }

    /// Keeps an undecodable payload for inspection; never waits.
    pub fn dead_letter(&self, letter: DeadLetter) {
        let _ = self
            .inner
            .appends
            .try_send(committer::Op::DeadLetter(letter));
    }

    /// Changes the cap and policy of an open buffer (configuration reload).
    pub async fn set_limits(
        &self,
        max_bytes: u64,
        when_full: FullPolicy,
    ) -> Result<(), BufferError> {
        self.send(committer::Op::SetLimits {
            max_bytes,
            when_full,
        })
        .await
    }

    /// Durable records with `seq >= from`, at most `max_records` and about
    /// `max_bytes` (always at least one record when one is there).
    pub fn read_from(
        &self,
        from: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<Record>, BufferError> {
        let mut out = Vec::new();
        self.visit_from(
            from,
            max_records,
            max_bytes,
            |seq, encoded| match segment::decode(encoded, seq) {
                Ok(record) => out.push(record),
                Err(e) => {
                    self.inner
                        .counters
                        .corrupt_skipped
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::error!(seq, error = %e, "skipping undecodable record in the buffer");
                }
            },
        )?;
        Ok(out)
    }

    /// [`Buffer::read_from`] for sending: the records stay encoded and are
    /// numbered on the way out, so the uplink never decodes and re-encodes
    /// them. With `compressor` (the stream's, when the ingest takes
    /// compressed batches) the batch goes as `records_zstd`: a compressed
    /// segment read whole, from the key it was written under, is one of its
    /// frames as it is stored, and only other records are compressed
    /// ([`FramedBatchBuilder`]). Returns `None` when nothing from `from` on
    /// is durable.
    pub fn read_batch(
        &self,
        from: u64,
        max_records: usize,
        max_bytes: usize,
        compressor: Option<&mut BatchCompressor>,
    ) -> Result<Option<ReadBatch>, BufferError> {
        let mut out = match compressor {
            Some(compressor) => BatchOut::Framed(FramedBatchBuilder::new(compressor)),
            None => BatchOut::Plain(BatchBuilder::with_capacity(
                max_records.min(4096),
                max_bytes.min(4 << 20),
            )),
        };
        let mut last = None;
        let mut failed = None;
        let mut framed_records = 0;
        self.visit_segments(from, |segment| {
            let (count, bytes) = (out.records(), out.bytes());
            if let (BatchOut::Framed(framed), Some(frame)) = (&mut out, segment.whole_frame()) {
                let records = segment.records() as usize;
                if count > 0 && (count + records > max_records || bytes + frame.plain_len > max_bytes) {
                    return Visit::Stop;
                }
                if records <= max_records
                    && frame.plain_len >= PASS_FRAMES_FROM
                    && frame.plain_len <= max_bytes
                {
                    if let Err(e) = framed.push_frame(frame.frame, records, frame.plain_len) {
                        failed = Some(e);
                        return Visit::Stop;
                    }
                    framed_records += records;
                    last = Some(segment.last);
                    return Visit::Next;
                }
            }
            segment.each_record(|seq, encoded| {
                if out.records() > 0 && (out.records() >= max_records || out.bytes() + encoded.len() > max_bytes) {
                    return Visit::Stop;
                }
                last = Some(seq);
                // The segment's checksum catches damage on disk; this
                // catches a record the ingest would refuse, which would
                // otherwise be resent (and refused) forever.
                match check_record(encoded) {
                    Ok(_) => {
                        if let Err(e) = out.push(encoded, seq) {
                            failed = Some(e);
                            return Visit::Stop;
                        }
                    }
                    Err(e) => {
                        self.inner.counters.corrupt_skipped.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(seq, error = %e, "skipping a malformed record in the buffer");
                    }
                }
                Visit::Next
            })
        })?;
        if let Some(e) = failed {
            return Err(BufferError::Compress(e.to_string()));
        }
        let Some(last) = last else {
            return Ok(None);
        };
        let records = out.records();
        let batch = out
            .finish()
            .map_err(|e| BufferError::Compress(e.to_string()))?;
        Ok(Some(ReadBatch {
            batch,
            records,
            framed: framed_records,
            last,
        }))
    }

    /// Calls `take(seq, encoded)` for durable records with `seq >= from`, at
    /// most `max_records` and about `max_bytes` of them (always at least one
    /// when one is there). Damaged segments are skipped and counted.
    fn visit_from(
        &self,
        from: u64,
        max_records: usize,
        max_bytes: usize,
        mut take: impl FnMut(u64, &[u8]),
    ) -> Result<(), BufferError> {
        let (mut bytes, mut records) = (0usize, 0usize);
        self.visit_segments(from, |segment| {
            segment.each_record(|seq, record| {
                if records > 0 && (records >= max_records || bytes + record.len() > max_bytes) {
                    return Visit::Stop;
                }
                bytes += record.len();
                records += 1;
                take(seq, record);
                Visit::Next
            })
        })
    }

    /// Calls `visit` for each segment holding durable records with `seq >=
    /// from`, in order, until it says stop.
    fn visit_segments(
        &self,
        from: u64,
        mut visit: impl FnMut(SegmentView<'_>) -> Visit,
    ) -> Result<(), BufferError> {
        let (durable, acked) = {
            let levels = self.inner.levels.borrow();
            (levels.durable_through, levels.acked_through)
        };
        // A partly acked segment still holds its acked records: never
        // return those.
        let from = from.max(acked.saturating_add(1));
        if from > durable {
            return Ok(());
        }
        let storage = |source| BufferError::Storage {
            dir: self.inner.dir.clone(),
            source,
        };
        let tree = &self.db()?;
        // The segment holding `from` starts at or before it: the last one
        // starting there, then every later one starting while durable.
        let start = tree
            .range(keys::records_start()..&keys::seq_bound(from.saturating_add(1))[..])
            .next_back()
            .transpose()
            .map_err(storage)?
            .map(|(key, _)| key);
        let end = keys::seq_bound(durable.saturating_add(1));
        let start = start.map_or_else(|| keys::seq_bound(from).to_vec(), |key| key.to_vec());
        let mut scratch = Vec::new();
        for item in tree.range(start.as_slice()..end.as_slice()) {
            let (key, value) = item.map_err(storage)?;
            let Some((first, last)) = keys::span_of(&key) else {
                continue;
            };
            if last < from {
                continue;
            }
            let segment = SegmentView {
                first,
                last,
                from,
                durable,
                value: &value,
                scratch: &mut scratch,
                counters: &self.inner.counters,
            };
            if let Visit::Stop = visit(segment) {
                break;
            }
        }
        Ok(())
    }

    /// Waits until a record with `seq >= from` is durable, or the buffer closes.
    pub async fn wait_for(&self, from: u64) -> Result<(), BufferError> {
        let mut levels = self.inner.levels.clone();
        loop {
            if levels.borrow_and_update().durable_through >= from {
                return Ok(());
            }
            levels.changed().await.map_err(|_| BufferError::Closed)?;
        }
    }

    pub fn stats(&self) -> BufferStats {
        let l = *self.inner.levels.borrow();
        let c = &self.inner.counters;
        BufferStats {
            records: l.records,
            bytes: l.bytes,
            next_seq: l.next_seq,
            first_seq: l.first_seq,
            durable_through: l.durable_through,
            acked_through: l.acked_through,
            epoch: l.epoch,
            anchored: l.anchored,
            appended_total: c.appended.load(Ordering::Relaxed),
            dropped_full_total: c.dropped_full.load(Ordering::Relaxed),
            duplicates_total: c.duplicates.load(Ordering::Relaxed),
            corrupt_skipped_total: c.corrupt_skipped.load(Ordering::Relaxed),
            commits_total: c.commits.load(Ordering::Relaxed),
            write_errors_total: c.write_errors.load(Ordering::Relaxed),
        }
    }

    /// The dead letters, oldest first.
    pub fn dead_letters(&self) -> Result<Vec<DeadLetter>, BufferError> {
        open::read_dead_letters(&self.db()?).map_err(|source| BufferError::Storage {
            dir: self.inner.dir.clone(),
            source,
        })
    }

    /// The database as it is now; an error while the committer reopens it
    /// after a failed write (readers hold it only while they read).
    fn db(&self) -> Result<sled::Db, BufferError> {
        self.inner
            .tree
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| {
                BufferError::WriteFailed("the buffer is being reopened after a failed write".into())
            })
    }

    /// Flushes and stops the committer. Appends after this fail with `Closed`.
    pub async fn close(&self) -> Result<(), BufferError> {
        let (reply, rx) = oneshot::channel();
        if self.send(committer::Op::Close { reply }).await.is_ok() {
            let _ = rx.await;
        }
        let thread = self.inner.thread.lock().expect("not poisoned").take();
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        Ok(())
    }

    /// Sends a control operation and waits for the committer's answer.
    async fn request<T>(
        &self,
        op: impl FnOnce(committer::Reply<T>) -> committer::Op,
    ) -> Result<T, BufferError> {
        let (reply, rx) = oneshot::channel();
        self.send(op(reply)).await?;
        rx.await.map_err(|_| BufferError::Closed)?
    }

    async fn send(&self, op: committer::Op) -> Result<(), BufferError> {
        self.inner
            .control
            .send_async(op)
            .await
            .map_err(|_| BufferError::Closed)
    }
}

/// What [`Buffer::read_batch`] read.
#[derive(Debug)]
pub struct ReadBatch {
    pub batch: EncodedBatch,
    /// Records in `batch` (its `records` is empty when they are compressed).
    pub records: usize,
    /// Of those, the records that went as stored frames.
    pub framed: usize,
    /// The last sequence number read, sent or skipped as malformed.
    pub last: u64,
}

/// A compressed segment smaller than this uncompressed is compressed again
/// with its neighbours rather than sent as its own frame: under light load
/// a group holds a few records, and a frame of each would compress poorly
/// and become a block of its own in the ingest's store. Pieces of a run
/// that barely compresses (at most 7 KiB, see `segment::Sealer`) pass.
const PASS_FRAMES_FROM: usize = 4 * 1024;

/// Whether a visitor wants more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Visit {
    Next,
    Stop,
}

/// One segment as the readers meet it.
struct SegmentView<'a> {
    /// The sequence numbers its key gives it.
    first: u64,
    last: u64,
    /// The first record wanted, and the last durable one.
    from: u64,
    durable: u64,
    value: &'a [u8],
    scratch: &'a mut Vec<u8>,
    counters: &'a Counters,
}

impl<'a> SegmentView<'a> {
    fn records(&self) -> u64 {
        self.last - self.first + 1
    }

    /// The segment's stored frame, when every record of it is wanted and
    /// durable and it is still under the key it was written with (an
    /// anchor moves segments, and their records then need new numbers).
    /// A damaged segment has none; [`Self::each_record`] reports it.
    fn whole_frame(&self) -> Option<segment::StoredFrame<'a>> {
        if self.from > self.first || self.last > self.durable {
            return None;
        }
        segment::stored_frame(self.value)
            .ok()
            .flatten()
            .filter(|frame| frame.written_first == self.first)
    }

    /// Calls `take(seq, encoded)` for each wanted durable record, until it
    /// says stop; returns what it said last. A damaged segment is skipped
    /// and counted: it must not stall the uplink forever, and the ingest
    /// sees a gap in the sequence.
    fn each_record(self, mut take: impl FnMut(u64, &[u8]) -> Visit) -> Visit {
        let (first, last) = (self.first, self.last.min(self.durable));
        let encoded = match segment::records(self.value, self.records(), self.scratch) {
            Ok(encoded) => encoded,
            Err(damage) => {
                let skipped = last - first.max(self.from) + 1;
                self.counters
                    .corrupt_skipped
                    .fetch_add(skipped, Ordering::Relaxed);
                tracing::error!(first, last, skipped, %damage, "skipping a damaged segment of the buffer");
                return Visit::Next;
            }
        };
        let skip = self.from.saturating_sub(first) as usize;
        for (seq, record) in (first..=last).zip(encoded).skip(skip) {
            if take(seq, record) == Visit::Stop {
                return Visit::Stop;
            }
        }
        Visit::Next
    }
}

/// Where [`Buffer::read_batch`] puts what it reads.
enum BatchOut<'c> {
    Plain(BatchBuilder),
    Framed(FramedBatchBuilder<'c>),
}

impl BatchOut<'_> {
    fn records(&self) -> usize {
        match self {
            BatchOut::Plain(b) => b.len(),
            BatchOut::Framed(b) => b.records(),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            BatchOut::Plain(b) => b.bytes(),
            BatchOut::Framed(b) => b.plain_bytes(),
        }
    }

    fn push(&mut self, encoded: &[u8], seq: u64) -> Result<(), BatchZstdError> {
        match self {
            BatchOut::Plain(b) => {
                b.push(encoded, seq);
                Ok(())
            }
            BatchOut::Framed(b) => b.push_record(encoded, seq),
        }
    }

    fn finish(self) -> Result<EncodedBatch, BatchZstdError> {
        match self {
            BatchOut::Plain(b) => Ok(b.finish()),
            BatchOut::Framed(b) => b.finish(),
        }
    }
}

/// Reads the dead letters of a buffer that is not open (for the CLI).
pub fn read_dead_letters(data_dir: &Path) -> Result<Vec<DeadLetter>, BufferError> {
    let dir = data_dir.join("buffer");
    edgefleet_sled_sync::remove_unfinished_snapshots(&dir).map_err(|e| BufferError::Storage {
        dir: dir.clone(),
        source: sled::Error::Io(e),
    })?;
    let db = sled::Config::new()
        .path(&dir)
        .open()
        .map_err(|source| BufferError::Storage {
            dir: dir.clone(),
            source,
        })?;
    open::read_dead_letters(&db).map_err(|source| BufferError::Storage { dir, source })
}
