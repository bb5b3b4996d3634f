//! The default sink: an embedded sled store in one directory.
//!
//! Everything lives in one sled tree so that one `apply_batch` covers the
//! records, the high-water marks and the bookkeeping of a commit atomically.
//! Keys start with a one-byte kind:
//!
//! | key                                     | value                         |
//! |-----------------------------------------|-------------------------------|
//! | `B` agent 0x00 first_seq(u64 BE)        | a block: one agent's records of one commit |
//! | `T` ingest_ns(u64 BE) agent 0x00 first_seq | bytes the block accounts for, records in it (u64 BE each) |
//! | `H` agent                               | high-water mark (u64 BE)      |
//! | `C` agent                               | records stored now (u64 BE)   |
//! | `M` `bytes`                             | bytes of all stored records   |
//! | `R` agent 0x00 seq(u64 BE)              | one encoded `Record` (stores written before blocks; read, never written) |
//!
//! A block's value is one of:
//!
//! - [`BLOCK_FORMAT`] followed by `(varint length, encoded Record)*`, each
//!   record exactly as the agent sent it (with its `seq`);
//! - [`BLOCK_FORMAT_ZSTD`] followed by one zstd frame of that body, when
//!   that is smaller: telemetry repeats its names and shrinks about
//!   sixfold, and sled writes and copies every value's bytes several times
//!   over (leaf rewrites and splits), so fewer bytes per block is less disk
//!   and less CPU per record (BENCHMARKS.md, "Compressed segments");
//! - [`BLOCK_FORMAT_BATCH_ZSTD`] followed by one of the agent's own
//!   compressed frames of a batch (part of `RecordBatch.records_zstd`, a
//!   run of whole records checked to read back to exactly those:
//!   `edgefleet_proto::batch_zstd::KeptFrames`), when none of the batch's
//!   records was a duplicate. Compressing the records again would cost the
//!   ingest as much CPU as the agent spent.
//!
//! One sled value per agent per commit (or per agent's frame) instead of two
//! entries per record is what lets the store keep up with the network:
//! sled copies a leaf on every insert, so its cost grows with the number of
//! keys written, not their size.
//!
//! Agent ids contain no 0x00 (see `edgefleet_pki::check_agent_id`), so `B`
//! keys sort by agent, then seq; `T` keys sort oldest ingest first, which is
//! the order retention deletes in (whole blocks; an old store's `T` entries
//! have an 8-byte value and name one `R` record).
//!
//! Writers (commits and retention) take `write_lock`, which makes the
//! read-modify-write of counters safe; sled's own lock keeps other processes out.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use edgefleet_proto::batch_zstd::frame_records;
use edgefleet_proto::encoded::check_record;
use edgefleet_proto::stored_zstd::{decompress_into, StoredCompressor};
use edgefleet_proto::Record;
use edgefleet_sled_sync::DiskSync;
use prost::bytes::Bytes;
use prost::Message;

use super::{AgentRecords, EncodedRecord, Sink, SinkError};
use crate::config::Retention;
use crate::query::{AgentStats, Query, RecordSource, Stats};

const BLOCK: u8 = b'B';
const BLOCK_FORMAT: u8 = 1;
const BLOCK_FORMAT_ZSTD: u8 = 2;
const BLOCK_FORMAT_BATCH_ZSTD: u8 = 3;
const LEGACY_RECORD: u8 = b'R';
const BY_TIME: u8 = b'T';
const HIGH_WATER: u8 = b'H';
const COUNT: u8 = b'C';
const META_BYTES: &[u8] = b"Mbytes";

/// A file next to sled's own naming the running server's admin URL, so that
/// `cloud-ingest query --store` can point at it when the store is locked.
const ADMIN_URL_FILE: &str = "cloud-ingest.admin-url";

/// Retention deletes at most this many records per write batch, so commits
/// waiting on `write_lock` are not held up by a large purge.
const RETENTION_CHUNK: usize = 5_000;

pub struct EmbeddedStore {
    path: PathBuf,
    /// The open database. sled refuses every operation after one write of
    /// its log failed (a full disk, an I/O error) until it is opened again,
    /// and what it holds in memory may then be ahead of what reached the
    /// disk; so a failed write or sync marks the store `broken`, and the
    /// next caller reopens it ([`EmbeddedStore::opened`]): sled recovers
    /// what is on disk, as after a crash, and nobody is told a record is
    /// stored that a restart would not find.
    opened: RwLock<Option<Arc<Opened>>>,
    broken: AtomicBool,
    /// When the last reopen was tried: at most one a second while the
    /// disk stays full.
    last_reopen: Mutex<Option<Instant>>,
    /// Held by writers (commits, retention and reopening); holds the
    /// commit's block compressor, so one zstd context serves every commit.
    write_lock: Mutex<BlockPacker>,
}

/// One opening of the sled database.
struct Opened {
    db: sled::Db,
    /// What sled's flush leaves unsynced (see `edgefleet_sled_sync`).
    disk: DiskSync,
    tree: sled::Tree,
}

/// What one retention pass deleted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RetentionReport {
    pub deleted_records: u64,
    pub deleted_bytes: u64,
}

impl EmbeddedStore {
    /// Opens the store in `dir`, creating it if needed (for the server).
    pub fn open(dir: &Path) -> Result<Self, SinkError> {
        std::fs::create_dir_all(dir).map_err(|e| SinkError::Open {
            path: dir.to_path_buf(),
            source: sled::Error::Io(e),
        })?;
        Self::open_inner(dir)
    }

    /// Opens an existing store (for `query` and `stats`): a missing store is
    /// an error rather than a new empty one.
    pub fn open_existing(dir: &Path) -> Result<Self, SinkError> {
        if !dir.join("db").is_file() {
            return Err(SinkError::NoStore {
                path: dir.to_path_buf(),
            });
        }
        Self::open_inner(dir)
    }

    fn open_inner(dir: &Path) -> Result<Self, SinkError> {
        Ok(Self {
            path: dir.to_path_buf(),
            opened: RwLock::new(Some(Arc::new(Opened::open(dir)?))),
            broken: AtomicBool::new(false),
            last_reopen: Mutex::new(None),
            write_lock: Mutex::new(BlockPacker::default()),
        })
    }

    /// The open database, reopened first if a write failed since.
    fn opened(&self) -> Result<Arc<Opened>, SinkError> {
        if self.broken.load(Ordering::Acquire) {
            let _writer = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
            self.reopen_locked()?;
        }
        self.current()
    }

    /// [`EmbeddedStore::opened`] for a caller that holds `write_lock`.
    fn opened_locked(&self) -> Result<Arc<Opened>, SinkError> {
        if self.broken.load(Ordering::Acquire) {
            self.reopen_locked()?;
        }
        self.current()
    }

    fn current(&self) -> Result<Arc<Opened>, SinkError> {
        self.opened
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| SinkError::Unavailable {
                path: self.path.clone(),
                reason: "a write failed and the store could not be reopened yet".into(),
            })
    }

    /// Marks the store for reopening after `source` failed a write or a
    /// sync, and returns it as the caller's error.
    fn failed_write(&self, source: sled::Error) -> SinkError {
        let error = self.io(source);
        if !self.broken.swap(true, Ordering::AcqRel) {
            tracing::error!(store = %self.path.display(), %error, "a store write failed; the store will be reopened from what is on disk");
        }
        error
    }

    /// Called with `write_lock` held, so no write runs meanwhile.
    fn reopen_locked(&self) -> Result<(), SinkError> {
        if !self.broken.load(Ordering::Acquire) {
            return Ok(()); // Another caller did it.
        }
        {
            let mut last = self.last_reopen.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|at| at.elapsed() < Duration::from_secs(1)) {
                return Err(SinkError::Unavailable {
                    path: self.path.clone(),
                    reason: "a write failed and reopening failed less than a second ago".into(),
                });
            }
            *last = Some(Instant::now());
        }
        let mut opened = self.opened.write().unwrap_or_else(|p| p.into_inner());
        // sled admits one opening of a directory at a time: the old one must
        // be gone (readers hold it only while they read).
        let deadline = Instant::now() + Duration::from_secs(10);
        while opened
            .as_ref()
            .is_some_and(|old| Arc::strong_count(old) > 1)
        {
            if Instant::now() > deadline {
                return Err(SinkError::Unavailable {
                    path: self.path.clone(),
                    reason: "a write failed, and a reader still holds the store".into(),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(opened.take());
        match Opened::open(&self.path) {
            Ok(fresh) => {
                *opened = Some(Arc::new(fresh));
                self.broken.store(false, Ordering::Release);
                tracing::info!(store = %self.path.display(), "store reopened after a failed write");
                Ok(())
            }
            Err(e) => {
                tracing::warn!(store = %self.path.display(), error = %e, "cannot reopen the store yet");
                Err(e)
            }
        }
    }
}

impl Opened {
    fn open(dir: &Path) -> Result<Self, SinkError> {
        edgefleet_sled_sync::remove_unfinished_snapshots(dir).map_err(|e| SinkError::Open {
            path: dir.to_path_buf(),
            source: sled::Error::Io(e),
        })?;
        // Commits flush explicitly; sled's periodic flusher would only add a
        // thread that keeps the store open a little past drop.
        let db = sled::Config::new()
            .path(dir)
            .flush_every_ms(None)
            .open()
            .map_err(|source| open_error(dir, source))?;
        let tree = db
            .open_tree("telemetry")
            .map_err(|source| SinkError::Open {
                path: dir.to_path_buf(),
                source,
            })?;
        let disk = DiskSync::open(dir).map_err(|e| SinkError::Open {
            path: dir.to_path_buf(),
            source: sled::Error::Io(e),
        })?;
        Ok(Opened { db, disk, tree })
    }
}

impl EmbeddedStore {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records where the running server's admin endpoint is (best effort:
    /// it only improves an error message).
    pub fn advertise_admin_url(&self, url: Option<&str>) {
        let file = self.path.join(ADMIN_URL_FILE);
        match url {
            Some(url) => {
                if let Err(e) = std::fs::write(&file, url) {
                    tracing::debug!(file = %file.display(), error = %e, "cannot write the admin URL hint");
                }
            }
            None => {
                let _ = std::fs::remove_file(&file);
            }
        }
    }

    /// Makes everything written so far durable, across a power cut too.
    pub fn flush(&self) -> Result<(), SinkError> {
        let _guard = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.flush_locked()
    }

    /// `flush` for a caller that holds `write_lock`: `DiskSync` must not
    /// list sled's blob files while another writer may be writing one.
    fn flush_locked(&self) -> Result<(), SinkError> {
        let opened = self.opened_locked()?;
        opened.db.flush().map_err(|e| self.failed_write(e))?;
        opened
            .disk
            .sync()
            .map_err(|e| self.failed_write(sled::Error::Io(e)))
    }

    /// When each record was committed: `(ingest_ns, agent, seq)` in commit
    /// order (the `T` index). `ingest_ns` is taken when the commit starts,
    /// just before its write and fsync.
    pub fn ingest_times(&self, mut emit: impl FnMut(u64, &str, u64)) -> Result<(), SinkError> {
        // Decompressed blocks, one buffer for all of them.
        let mut scratch = Vec::new();
        let opened = self.opened()?;
        for entry in opened.tree.scan_prefix([BY_TIME]) {
            let (key, value) = entry.map_err(|e| self.io(e))?;
            let (ingest_ns, agent, seq) = self.parse_time_key(&key)?;
            let ingest_ns = ingest_ns as u64;
            if value.len() == 8 {
                emit(ingest_ns, agent, seq);
                continue;
            }
            let Some(block) = opened
                .tree
                .get(agent_seq_key(BLOCK, agent, seq))
                .map_err(|e| self.io(e))?
            else {
                continue;
            };
            for encoded in self.block_records(&block, &mut scratch, agent, seq) {
                let seq = check_record(encoded?).map_err(|e| {
                    self.corrupt(
                        format!("block agent={agent} first seq={seq}"),
                        e.to_string(),
                    )
                })?;
                emit(ingest_ns, agent, seq);
            }
        }
        Ok(())
    }

    /// Bytes of all stored records as retention counts them.
    pub fn stored_bytes(&self) -> Result<u64, SinkError> {
        self.read_u64(&self.opened()?.tree, META_BYTES)
    }

    /// Deletes the oldest records (by ingest time) that are older than
    /// `retention.max_age` or that take the store over `retention.max_bytes`,
    /// a whole block (one agent's records of one commit) at a time.
    pub fn enforce_retention(
        &self,
        retention: &Retention,
        now: SystemTime,
    ) -> Result<RetentionReport, SinkError> {
        let cutoff_ns = retention
            .max_age
            .map(|age| unix_ns(now.checked_sub(age).unwrap_or(UNIX_EPOCH)));
        let mut report = RetentionReport::default();
        if cutoff_ns.is_none() && retention.max_bytes.is_none() {
            return Ok(report);
        }
        loop {
            let _guard = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
            let opened = self.opened_locked()?;
            let tree = &opened.tree;
            let mut total = self.read_u64(tree, META_BYTES)?;
            let mut batch = sled::Batch::default();
            let mut counts: HashMap<String, u64> = HashMap::new();
            let mut deleted = 0usize;
            let mut exhausted = true;
            for entry in tree.scan_prefix([BY_TIME]) {
                let (key, value) = entry.map_err(|e| self.io(e))?;
                let (ingest_ns, agent, seq) = self.parse_time_key(&key)?;
                let too_old = cutoff_ns.is_some_and(|cutoff| ingest_ns < cutoff);
                let too_big = retention.max_bytes.is_some_and(|max| total > max);
                if !too_old && !too_big {
                    break;
                }
                if deleted == RETENTION_CHUNK {
                    exhausted = false;
                    break;
                }
                let what = || format!("time index of {agent}/{seq}");
                let (size, records, data_key) = if value.len() == 8 {
                    let size = self.parse_u64(&value, what)?;
                    (size, 1, agent_seq_key(LEGACY_RECORD, agent, seq))
                } else {
                    let (size, records) = value.split_at(value.len().min(8));
                    let size = self.parse_u64(size, what)?;
                    let records = self.parse_u64(records, what)?;
                    (size, records, agent_seq_key(BLOCK, agent, seq))
                };
                batch.remove(key.as_ref());
                batch.remove(data_key);
                total = total.saturating_sub(size);
                let count = match counts.entry(agent.to_string()) {
                    Entry::Occupied(e) => e.into_mut(),
                    Entry::Vacant(e) => e.insert(self.read_u64(tree, &agent_key(COUNT, agent))?),
                };
                *count = count.saturating_sub(records);
                report.deleted_records += records;
                report.deleted_bytes += size;
                deleted += 1;
            }
            if deleted == 0 {
                break;
            }
            for (agent, count) in &counts {
                batch.insert(agent_key(COUNT, agent), &count.to_be_bytes());
            }
            batch.insert(META_BYTES, &total.to_be_bytes());
            tree.apply_batch(batch).map_err(|e| self.failed_write(e))?;
            if exhausted {
                break;
            }
        }
        if report.deleted_records > 0 {
            self.flush()?;
        }
        Ok(report)
    }

    /// The encoded records of the block `B agent first_seq`; a compressed
    /// block is decompressed into `scratch`.
    fn block_records<'v>(
        &self,
        value: &'v [u8],
        scratch: &'v mut Vec<u8>,
        agent: &str,
        first_seq: u64,
    ) -> Box<dyn Iterator<Item = Result<&'v [u8], SinkError>> + 'v> {
        let what = format!("block agent={agent} first seq={first_seq}");
        let path = self.path.clone();
        let corrupt = move |reason: String| SinkError::Corrupt {
            path: path.clone(),
            what: what.clone(),
            reason,
        };
        let format = value.first().copied();
        let body: &'v [u8] = match format {
            Some(BLOCK_FORMAT) => &value[1..],
            Some(BLOCK_FORMAT_ZSTD | BLOCK_FORMAT_BATCH_ZSTD) => {
                if let Err(e) = decompress_into(&value[1..], scratch) {
                    let e = corrupt(format!("compressed block: {e}"));
                    return Box::new(std::iter::once(Err(e)));
                }
                let scratch: &'v Vec<u8> = scratch;
                scratch
            }
            other => {
                let e = corrupt(format!(
                    "unknown block format {other:?} (expected {BLOCK_FORMAT}, {BLOCK_FORMAT_ZSTD} or {BLOCK_FORMAT_BATCH_ZSTD})"
                ));
                return Box::new(std::iter::once(Err(e)));
            }
        };
        if format == Some(BLOCK_FORMAT_BATCH_ZSTD) {
            return Box::new(
                frame_records(body)
                    .map(move |record| record.map_err(|e| corrupt(format!("agent's frame: {e}")))),
            );
        }
        let mut rest = body;
        let mut failed = false;
        Box::new(std::iter::from_fn(move || {
            if failed || rest.is_empty() {
                return None;
            }
            let len = match prost::encoding::decode_varint(&mut rest) {
                Ok(len) if len <= rest.len() as u64 => len as usize,
                _ => {
                    failed = true;
                    return Some(Err(corrupt(
                        "record length runs past the end of the block".into(),
                    )));
                }
            };
            let (record, tail) = rest.split_at(len);
            rest = tail;
            Some(Ok(record))
        }))
    }

    fn read_u64(&self, tree: &sled::Tree, key: &[u8]) -> Result<u64, SinkError> {
        match tree.get(key).map_err(|e| self.io(e))? {
            None => Ok(0),
            Some(value) => self.parse_u64(&value, || String::from_utf8_lossy(key).into_owned()),
        }
    }

    /// The tree, for tests that look at or damage entries directly.
    #[cfg(test)]
    fn tree(&self) -> sled::Tree {
        self.current().expect("store open").tree.clone()
    }

    fn parse_u64(&self, value: &[u8], what: impl FnOnce() -> String) -> Result<u64, SinkError> {
        <[u8; 8]>::try_from(value)
            .map(u64::from_be_bytes)
            .map_err(|_| self.corrupt(what(), format!("expected 8 bytes, found {}", value.len())))
    }

    fn parse_time_key<'k>(&self, key: &'k [u8]) -> Result<(i64, &'k str, u64), SinkError> {
        let bad = || self.corrupt(format!("time index key {key:?}"), "malformed key".into());
        if key.len() < 1 + 8 + 1 + 8 {
            return Err(bad());
        }
        let ingest_ns = u64::from_be_bytes(key[1..9].try_into().map_err(|_| bad())?) as i64;
        let (agent, seq) = split_agent_seq(&key[9..]).ok_or_else(bad)?;
        Ok((ingest_ns, agent, seq))
    }

    fn io(&self, source: sled::Error) -> SinkError {
        SinkError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn corrupt(&self, what: String, reason: String) -> SinkError {
        SinkError::Corrupt {
            path: self.path.clone(),
            what,
            reason,
        }
    }
}

impl Sink for EmbeddedStore {
    fn stored_through(&self, agent: &str) -> Result<u64, SinkError> {
        self.read_u64(&self.opened()?.tree, &agent_key(HIGH_WATER, agent))
    }

    fn commit(&self, batches: &[AgentRecords]) -> Result<(), SinkError> {
        let mut packer = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let ingest_ns = unix_ns(SystemTime::now()) as u64;
        let opened = self.opened_locked()?;
        let tree = &opened.tree;
        let mut total = self.read_u64(tree, META_BYTES)?;
        // Per agent: (high-water mark, record count), read once per commit.
        let mut agents: HashMap<&str, (u64, u64)> = HashMap::new();
        let mut batch = sled::Batch::default();
        for AgentRecords {
            agent,
            records,
            kept,
        } in batches
        {
            let state = match agents.entry(agent.as_str()) {
                Entry::Occupied(e) => e.into_mut(),
                Entry::Vacant(e) => {
                    let high = self.read_u64(tree, &agent_key(HIGH_WATER, agent))?;
                    let count = self.read_u64(tree, &agent_key(COUNT, agent))?;
                    e.insert((high, count))
                }
            };
            let Some(last) = records.last() else {
                continue;
            };
            let mut insert_block = |block: &[EncodedRecord], value: Vec<u8>| {
                let first = block[0].seq;
                let key = agent_seq_key(BLOCK, agent, first);
                let time_key = time_key(ingest_ns, agent, first);
                let size = (key.len() + value.len() + time_key.len() + 16) as u64;
                let mut time_value = [0u8; 16];
                time_value[..8].copy_from_slice(&size.to_be_bytes());
                time_value[8..].copy_from_slice(&(block.len() as u64).to_be_bytes());
                batch.insert(key, value);
                batch.insert(time_key, &time_value[..]);
                total += size;
            };
            // Runs of records with the agent's frame of each, or one run
            // with none.
            let whole = [(Bytes::new(), records.len())];
            let runs = match kept {
                Some(kept) if kept.frames.iter().map(|f| f.1).sum::<usize>() == records.len() => {
                    &kept.frames[..]
                }
                _ => &whole[..],
            };
            let mut rest = &records[..];
            for (frame, count) in runs {
                let (run, after) = rest.split_at(*count);
                rest = after;
                if !frame.is_empty() && frame.len() <= KEPT_FRAME_MAX_BYTES {
                    let mut value = Vec::with_capacity(1 + frame.len());
                    value.push(BLOCK_FORMAT_BATCH_ZSTD);
                    value.extend_from_slice(frame);
                    insert_block(run, value);
                } else {
                    for (block, block_bytes) in blocks(run) {
                        insert_block(block, packer.pack(block, block_bytes));
                    }
                }
            }
            state.0 = state.0.max(last.seq);
            state.1 += records.len() as u64;
        }
        for (agent, (high, count)) in agents {
            batch.insert(agent_key(HIGH_WATER, agent), &high.to_be_bytes());
            batch.insert(agent_key(COUNT, agent), &count.to_be_bytes());
        }
        batch.insert(META_BYTES, &total.to_be_bytes());
        tree.apply_batch(batch).map_err(|e| self.failed_write(e))?;
        self.flush_locked()
    }
}

/// A block closes before a record would take it past this size. sled
/// writes any page over a quarter of its 512 KiB log segment to a file of
/// its own, which costs a file creation, two fsyncs and an unlink when
/// freed, and a leaf page holds up to 17 values before it splits: at 7 KiB
/// even a full leaf stays in the log. (A batch used to be one block of up
/// to several hundred KiB.)
const BLOCK_MAX_BYTES: usize = 7 * 1024;

/// The largest agent's frame stored as it came, as one block: the same
/// bound as [`BLOCK_MAX_BYTES`], on the stored bytes. The agent ends a frame
/// every 32 KiB of records (`batch_zstd::FRAME_PLAIN_BYTES`), a few KiB
/// compressed; a larger frame (records that barely compress) is repacked.
const KEPT_FRAME_MAX_BYTES: usize = BLOCK_MAX_BYTES;

/// Builds block values, compressed when that makes them smaller
/// ([`edgefleet_proto::stored_zstd`]), with one zstd context and one body
/// buffer for all commits.
#[derive(Default)]
struct BlockPacker {
    body: Vec<u8>,
    zstd: StoredCompressor,
}

impl BlockPacker {
    /// The value of a block of `records`, `block_bytes` long uncompressed.
    fn pack(&mut self, records: &[EncodedRecord], block_bytes: usize) -> Vec<u8> {
        self.body.clear();
        self.body.reserve(block_bytes);
        self.body.push(BLOCK_FORMAT);
        for record in records {
            prost::encoding::encode_varint(record.encoded.len() as u64, &mut self.body);
            self.body.extend_from_slice(&record.encoded);
        }
        let mut value = vec![BLOCK_FORMAT_ZSTD];
        if self.zstd.compress_into(&self.body[1..], &mut value) {
            value
        } else {
            self.body.clone()
        }
    }
}

/// Splits one agent's batch into the runs of records stored as one block
/// each (every run holds at least one record), with the bytes of the
/// block's value.
fn blocks(records: &[EncodedRecord]) -> impl Iterator<Item = (&[EncodedRecord], usize)> {
    let mut rest = records;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut bytes = 1;
        let mut n = 0;
        for record in rest {
            let stored = prost::encoding::encoded_len_varint(record.encoded.len() as u64)
                + record.encoded.len();
            if n > 0 && bytes + stored > BLOCK_MAX_BYTES {
                break;
            }
            bytes += stored;
            n += 1;
        }
        let (block, after) = rest.split_at(n);
        rest = after;
        Some((block, bytes))
    })
}

impl RecordSource for EmbeddedStore {
    fn query(
        &self,
        query: &Query,
        emit: &mut dyn FnMut(&str, Record) -> bool,
    ) -> Result<(), SinkError> {
        let mut emitted = 0usize;
        // An agent's records in an old store's `R` entries precede its
        // blocks; across agents, those come first.
        // Decompressed blocks, one buffer for all of them.
        let mut scratch = Vec::new();
        let opened = self.opened()?;
        for kind in [LEGACY_RECORD, BLOCK] {
            let mut prefix = vec![kind];
            if let Some(agent) = &query.agent {
                prefix.extend_from_slice(agent.as_bytes());
                prefix.push(0);
            }
            for entry in opened.tree.scan_prefix(prefix) {
                let (key, value) = entry.map_err(|e| self.io(e))?;
                let (agent, seq) = split_agent_seq(&key[1..]).ok_or_else(|| {
                    self.corrupt(
                        format!("record key {:?}", key.as_ref()),
                        "malformed key".into(),
                    )
                })?;
                let records: Box<dyn Iterator<Item = Result<&[u8], SinkError>>> = if kind == BLOCK {
                    Box::new(self.block_records(&value, &mut scratch, agent, seq))
                } else {
                    Box::new(std::iter::once(Ok(value.as_ref())))
                };
                for encoded in records {
                    if query.limit.is_some_and(|limit| emitted >= limit) {
                        return Ok(());
                    }
                    let record = Record::decode(encoded?).map_err(|e| {
                        self.corrupt(format!("record agent={agent} seq={seq}"), e.to_string())
                    })?;
                    if query.matches(&record) {
                        emitted += 1;
                        if !emit(agent, record) {
                            return Ok(());
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn stats(&self) -> Result<Stats, SinkError> {
        let opened = self.opened()?;
        let mut stats = Stats {
            stored_bytes: self.read_u64(&opened.tree, META_BYTES)?,
            ..Stats::default()
        };
        for (kind, is_count) in [(HIGH_WATER, false), (COUNT, true)] {
            for entry in opened.tree.scan_prefix([kind]) {
                let (key, value) = entry.map_err(|e| self.io(e))?;
                let agent = std::str::from_utf8(&key[1..]).map_err(|_| {
                    self.corrupt(
                        format!("agent key {:?}", key.as_ref()),
                        "agent id is not UTF-8".into(),
                    )
                })?;
                let n = self.parse_u64(&value, || format!("agent entry for {agent}"))?;
                let entry: &mut AgentStats = stats.agents.entry(agent.to_string()).or_default();
                if is_count {
                    entry.records = n;
                    stats.total_records += n;
                } else {
                    entry.stored_through = n;
                }
            }
        }
        Ok(stats)
    }
}

fn open_error(dir: &Path, source: sled::Error) -> SinkError {
    // sled reports a held lock only as an `Other` I/O error with this text.
    let locked =
        matches!(&source, sled::Error::Io(e) if e.to_string().contains("could not acquire lock"));
    if !locked {
        return SinkError::Open {
            path: dir.to_path_buf(),
            source,
        };
    }
    let url = std::fs::read_to_string(dir.join(ADMIN_URL_FILE))
        .ok()
        .map(|u| u.trim().to_string())
        .filter(|u| !u.is_empty());
    let hint = match url {
        Some(url) => format!(
            "use `--url {url}` instead of `--store` (the server's --metrics-listen address)"
        ),
        None => {
            "use `--url http://<its --metrics-listen address>` instead of `--store`".to_string()
        }
    };
    SinkError::Locked {
        path: dir.to_path_buf(),
        hint,
    }
}

fn agent_key(kind: u8, agent: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + agent.len());
    key.push(kind);
    key.extend_from_slice(agent.as_bytes());
    key
}

fn agent_seq_key(kind: u8, agent: &str, seq: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + agent.len() + 1 + 8);
    key.push(kind);
    key.extend_from_slice(agent.as_bytes());
    key.push(0);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

fn time_key(ingest_ns: u64, agent: &str, seq: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + 8 + agent.len() + 1 + 8);
    key.push(BY_TIME);
    key.extend_from_slice(&ingest_ns.to_be_bytes());
    key.extend_from_slice(agent.as_bytes());
    key.push(0);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// `agent 0x00 seq(8 bytes)` → (agent, seq).
fn split_agent_seq(bytes: &[u8]) -> Option<(&str, u64)> {
    let (agent, rest) = bytes.split_at(bytes.len().checked_sub(9)?);
    if rest[0] != 0 {
        return None;
    }
    let seq = u64::from_be_bytes(rest[1..].try_into().ok()?);
    Some((std::str::from_utf8(agent).ok()?, seq))
}

fn unix_ns(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_nanos()
        .min(i64::MAX as u128) as i64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::EncodedRecord;
    use edgefleet_proto::{record, Signal, Signals};

    fn rec(seq: u64, device: &str) -> Record {
        Record {
            seq,
            source: "mqtt".into(),
            device_id: device.into(),
            timestamp_ns: 1_700_000_000_000_000_000 + seq as i64,
            value: Some(record::Value::Signals(Signals {
                signals: vec![Signal::f64("temp", seq as f64)],
            })),
        }
    }

    fn enc(seq: u64, device: &str) -> EncodedRecord {
        EncodedRecord {
            seq,
            encoded: rec(seq, device).encode_to_vec().into(),
        }
    }

    /// Every block's value, in key order.
    fn stored_blocks(store: &EmbeddedStore) -> Vec<sled::IVec> {
        store
            .tree()
            .scan_prefix([BLOCK])
            .map(|item| item.unwrap().1)
            .collect()
    }

    /// What reading every record fails with.
    fn query_error(store: &EmbeddedStore) -> String {
        store
            .query(&Query::default(), &mut |_, _| true)
            .unwrap_err()
            .to_string()
    }

    fn all(store: &EmbeddedStore, query: &Query) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        store
            .query(query, &mut |agent, r| {
                out.push((agent.to_string(), r.seq));
                true
            })
            .unwrap();
        out
    }

    #[test]
    fn commits_order_by_agent_then_seq_and_keep_high_water_marks() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        store
            .commit(&[
                AgentRecords {
                    agent: "b".into(),
                    records: vec![enc(1, "d1"), enc(2, "d2")],
                    kept: None,
                },
                AgentRecords {
                    agent: "a".into(),
                    records: vec![enc(7, "d1")],
                    kept: None,
                },
                AgentRecords {
                    agent: "a-long".into(),
                    records: vec![enc(3, "d1")],
                    kept: None,
                },
                AgentRecords {
                    agent: "b".into(),
                    records: vec![enc(300, "d1")],
                    kept: None,
                },
            ])
            .unwrap();
        assert_eq!(store.stored_through("a").unwrap(), 7);
        assert_eq!(store.stored_through("b").unwrap(), 300);
        assert_eq!(store.stored_through("nobody").unwrap(), 0);
        let rows = all(&store, &Query::default());
        let expect: Vec<(String, u64)> = [("a", 7), ("a-long", 3), ("b", 1), ("b", 2), ("b", 300)]
            .iter()
            .map(|(a, s)| (a.to_string(), *s))
            .collect();
        assert_eq!(rows, expect);
        let only_a = Query {
            agent: Some("a".into()),
            ..Query::default()
        };
        assert_eq!(all(&store, &only_a), vec![("a".to_string(), 7)]);
        let d2 = Query {
            device: Some("d2".into()),
            ..Query::default()
        };
        assert_eq!(all(&store, &d2), vec![("b".to_string(), 2)]);
        let limited = Query {
            limit: Some(2),
            ..Query::default()
        };
        assert_eq!(all(&store, &limited).len(), 2);

        let stats = store.stats().unwrap();
        assert_eq!(stats.total_records, 5);
        assert_eq!(stats.agents["b"].records, 3);
        assert_eq!(stats.agents["b"].stored_through, 300);
    }

    /// A batch of thousands of records is stored a few KiB per sled value,
    /// so sled keeps it in its log (no blob file to create, sync and delete),
    /// and reads back whole and in order, with the store's counts exact.
    #[test]
    fn a_large_batch_is_stored_in_the_log_without_blob_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        store
            .commit(&[AgentRecords {
                agent: "a".into(),
                records: (1..=5_000).map(|seq| enc(seq, "device-0001")).collect(),
                kept: None,
            }])
            .unwrap();
        let unsynced = edgefleet_sled_sync::unsynced_files(dir.path()).unwrap();
        assert_eq!(unsynced.blob_files, 0, "sled wrote blob files");
        let seqs: Vec<u64> = all(&store, &Query::default())
            .into_iter()
            .map(|(_, s)| s)
            .collect();
        assert_eq!(seqs, (1..=5_000).collect::<Vec<_>>());
        let stats = store.stats().unwrap();
        assert_eq!(stats.total_records, 5_000);
        assert_eq!(stats.agents["a"].stored_through, 5_000);
    }

    /// A commit is acked to agents as durable: nothing of it may be left
    /// dirty in the page cache (sled leaves a large block's blob file so).
    #[test]
    fn what_a_commit_stored_is_not_left_dirty_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        // Blocks of a few KiB (sled's log) and one record of 300 KiB: a block
        // of its own, over the log's limit, so a blob file in sled.
        let mut records: Vec<EncodedRecord> =
            (1..=5_000).map(|seq| enc(seq, "device-0001")).collect();
        // Random letters: zstd takes a quarter off at most, so compressed
        // the block is still well over the log's limit.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let letters: String = (0..300 << 10)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                char::from(b'a' + (state % 26) as u8)
            })
            .collect();
        records.push(enc(5_001, &letters));
        store
            .commit(&[AgentRecords {
                agent: "a".into(),
                records,
                kept: None,
            }])
            .unwrap();
        let unsynced = edgefleet_sled_sync::unsynced_files(dir.path()).unwrap();
        assert!(
            unsynced.blob_files > 0,
            "the test needs a blob file; sled wrote none"
        );
        assert!(
            unsynced.dirty.is_empty(),
            "dirty after the commit: {:?}",
            unsynced.dirty
        );
    }

    #[test]
    fn a_second_open_reports_the_lock_and_a_missing_store_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let err = EmbeddedStore::open_existing(&missing)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("no store at") && err.contains("nope"), "{err}");

        let store = EmbeddedStore::open(dir.path()).unwrap();
        store.advertise_admin_url(Some("http://127.0.0.1:9465"));
        let err = EmbeddedStore::open_existing(dir.path()).err().unwrap();
        assert!(matches!(err, SinkError::Locked { .. }), "{err}");
        assert!(
            err.to_string().contains("--url http://127.0.0.1:9465"),
            "{err}"
        );
    }

    #[test]
    fn a_corrupt_record_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        store
            .commit(&[AgentRecords {
                agent: "gw".into(),
                records: vec![enc(1, "d")],
                kept: None,
            }])
            .unwrap();
        store
            .tree()
            .insert(
                agent_seq_key(LEGACY_RECORD, "gw", 2),
                &[0xff, 0xff, 0xff][..],
            )
            .unwrap();
        let err = query_error(&store);
        assert!(err.contains("agent=gw seq=2"), "{err}");
    }

    #[test]
    fn a_damaged_block_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        store
            .commit(&[AgentRecords {
                agent: "gw".into(),
                records: vec![enc(5, "d"), enc(6, "d")],
                kept: None,
            }])
            .unwrap();
        let key = agent_seq_key(BLOCK, "gw", 5);
        let mut block = store.tree().get(&key).unwrap().unwrap().to_vec();
        block.truncate(block.len() - 3);
        store.tree().insert(&key, block).unwrap();
        let err = query_error(&store);
        assert!(err.contains("block agent=gw first seq=5"), "{err}");
        store.tree().insert(&key, &[9u8][..]).unwrap();
        let err = store.ingest_times(|_, _, _| {}).unwrap_err().to_string();
        assert!(err.contains("unknown block format"), "{err}");
    }

    /// Telemetry blocks are stored compressed, in a fraction of their size,
    /// and every reader (query, the ingest-time index that retention and the
    /// latency report use) gets the records back exactly, after a reopen too.
    #[test]
    fn telemetry_blocks_are_stored_compressed_and_read_back_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let records: Vec<EncodedRecord> = (1..=2_000)
            .map(|seq| enc(seq, &format!("device-{:04}", seq % 40)))
            .collect();
        let uncompressed: usize = records.iter().map(|r| r.encoded.len() + 1).sum();
        {
            let store = EmbeddedStore::open(dir.path()).unwrap();
            store
                .commit(&[AgentRecords {
                    agent: "gw".into(),
                    records: records.clone(),
                    kept: None,
                }])
                .unwrap();
            let blocks = stored_blocks(&store);
            assert!(blocks.iter().all(|b| b[0] == BLOCK_FORMAT_ZSTD));
            let stored: usize = blocks.iter().map(|b| b.len()).sum();
            assert!(
                stored * 3 < uncompressed,
                "{stored} bytes stored for {uncompressed}"
            );
        }
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let mut read = Vec::new();
        store
            .query(&Query::default(), &mut |agent, record| {
                assert_eq!(agent, "gw");
                read.push(record);
                true
            })
            .unwrap();
        let want: Vec<Record> = records
            .iter()
            .map(|r| Record::decode(&r.encoded[..]).unwrap())
            .collect();
        assert_eq!(read, want);
        let mut indexed = Vec::new();
        store.ingest_times(|_, _, seq| indexed.push(seq)).unwrap();
        assert_eq!(indexed, (1..=2_000).collect::<Vec<_>>());
    }

    /// `n` records from `first` on, as an agent compresses them and the
    /// session opens them: with the agent's frame kept.
    fn kept_batch(agent: &str, first: u64, n: u64) -> AgentRecords {
        use edgefleet_proto::batch_zstd::{BatchCompressor, BatchDecompressor};
        use edgefleet_proto::encoded::EncodedBatch;
        // Five signals per record, as the MQTT source makes of the JSON
        // payloads of the `spine` benchmark: about 90 bytes each.
        let records: Vec<EncodedRecord> = (first..first + n)
            .map(|seq| {
                let mut record = rec(seq, &format!("device-{:04}", seq % 100));
                record.value = Some(record::Value::Signals(Signals {
                    signals: vec![
                        Signal::i64("n", seq as i64),
                        Signal::f64("temp", 20.0 + (seq % 100) as f64 / 10.0),
                        Signal::i64("rpm", 1200 + (seq % 400) as i64),
                        Signal::bool("ok", seq % 7 != 0),
                        Signal::str("mode", if seq % 100 < 50 { "eco" } else { "boost" }),
                    ],
                }));
                EncodedRecord {
                    seq,
                    encoded: record.encode_to_vec().into(),
                }
            })
            .collect();
        let sent = BatchCompressor::default()
            .compress(EncodedBatch {
                records: records.iter().map(|r| r.encoded.clone()).collect(),
                records_zstd: Default::default(),
            })
            .unwrap();
        let (opened, kept) = BatchDecompressor::new()
            .unwrap()
            .open_keeping_frames(sent, 16 << 20)
            .unwrap();
        assert_eq!(opened.records.len() as u64, n);
        assert!(kept.is_some(), "the frames of {n} records were not kept");
        AgentRecords {
            agent: agent.into(),
            records,
            kept,
        }
    }

    /// The agent's frames are stored as they came, one block each, in
    /// sled's log (no blob files), nothing of them left dirty in memory
    /// after a commit; they read back to exactly the records.
    #[test]
    fn an_agents_frames_are_stored_as_they_came_and_read_back_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let batches: Vec<AgentRecords> = (0..30)
            .map(|i| kept_batch("gw", 1 + i * 4_000, 4_000))
            .collect();
        {
            let store = EmbeddedStore::open(dir.path()).unwrap();
            for batch in batches.chunks(3) {
                store.commit(batch).unwrap();
                let unsynced = edgefleet_sled_sync::unsynced_files(dir.path()).unwrap();
                assert!(unsynced.dirty.is_empty(), "dirty: {:?}", unsynced.dirty);
            }
            let blocks = stored_blocks(&store);
            let frames: Vec<&Bytes> = batches
                .iter()
                .flat_map(|b| &b.kept.as_ref().unwrap().frames)
                .map(|(frame, _)| frame)
                .collect();
            assert!(frames.len() > batches.len(), "one frame per batch");
            assert_eq!(blocks.len(), frames.len());
            for (block, frame) in blocks.iter().zip(frames) {
                assert_eq!(block[0], BLOCK_FORMAT_BATCH_ZSTD);
                assert_eq!(&block[1..], &frame[..]);
            }
            let unsynced = edgefleet_sled_sync::unsynced_files(dir.path()).unwrap();
            assert_eq!(unsynced.blob_files, 0, "sled wrote blob files");
        }
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let mut read = Vec::new();
        store
            .query(&Query::default(), &mut |_, record| {
                read.push(record);
                true
            })
            .unwrap();
        let want: Vec<Record> = batches
            .iter()
            .flat_map(|b| &b.records)
            .map(|r| Record::decode(&r.encoded[..]).unwrap())
            .collect();
        assert_eq!(read, want);
        let stats = store.stats().unwrap();
        assert_eq!(stats.total_records, 120_000);
        assert_eq!(stats.agents["gw"].stored_through, 120_000);
        let report = store
            .enforce_retention(
                &Retention {
                    max_bytes: Some(1),
                    ..Retention::default()
                },
                SystemTime::now(),
            )
            .unwrap();
        assert_eq!(report.deleted_records, 120_000);
    }

    /// A kept frame that is damaged on disk is an error naming its block.
    #[test]
    fn a_damaged_agents_frame_is_an_error_naming_its_block() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        store.commit(&[kept_batch("gw", 5, 500)]).unwrap();
        let key = agent_seq_key(BLOCK, "gw", 5);
        let good = store.tree().get(&key).unwrap().unwrap();
        let mut content = Vec::new();
        decompress_into(&good[1..], &mut content).unwrap();
        let compressed = |body: &[u8]| {
            let mut value = vec![BLOCK_FORMAT_BATCH_ZSTD];
            assert!(StoredCompressor::default().compress_into(body, &mut value));
            value
        };
        let mut not_records = content.clone();
        not_records[0] = 0x12;
        let mut cut = content.clone();
        cut.truncate(content.len() - 3);
        for (value, says) in [
            (good[..good.len() / 2].to_vec(), "compressed block"),
            (
                compressed(&not_records),
                "byte 0 of a stored batch: not a RecordBatch.records entry",
            ),
            (compressed(&cut), "record length runs past the end"),
        ] {
            store.tree().insert(&key, value).unwrap();
            let err = query_error(&store);
            assert!(err.contains("block agent=gw first seq=5"), "{err}");
            assert!(err.contains(says), "{err}");
        }
    }

    /// A compressed block that does not decompress is an error naming the
    /// block, never a panic or a wrong record.
    #[test]
    fn a_damaged_compressed_block_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        store
            .commit(&[AgentRecords {
                agent: "gw".into(),
                records: (5..=100).map(|seq| enc(seq, "d")).collect(),
                kept: None,
            }])
            .unwrap();
        let key = agent_seq_key(BLOCK, "gw", 5);
        let block = store.tree().get(&key).unwrap().unwrap().to_vec();
        assert_eq!(block[0], BLOCK_FORMAT_ZSTD);
        for damaged in [
            block[..block.len() / 2].to_vec(),
            vec![BLOCK_FORMAT_ZSTD, 0x28, 0xb5, 0x2f, 0xfd, 1, 2, 3],
            vec![BLOCK_FORMAT_ZSTD],
        ] {
            store.tree().insert(&key, damaged).unwrap();
            let err = query_error(&store);
            assert!(err.contains("block agent=gw first seq=5"), "{err}");
            assert!(err.contains("compressed block"), "{err}");
            let err = store.ingest_times(|_, _, _| {}).unwrap_err().to_string();
            assert!(err.contains("compressed block"), "{err}");
        }
    }

    /// A store written before blocks (one `R` entry and one 8-byte `T`
    /// entry per record) stays readable, and retention deletes from it.
    #[test]
    fn a_store_of_single_record_entries_is_read_and_retained_alongside_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let old_ns = 1_000u64;
        for seq in 1..=3u64 {
            let value = rec(seq, "old").encode_to_vec();
            let size = 100u64;
            store
                .tree()
                .insert(agent_seq_key(LEGACY_RECORD, "gw", seq), value)
                .unwrap();
            store
                .tree()
                .insert(time_key(old_ns, "gw", seq), &size.to_be_bytes())
                .unwrap();
        }
        store
            .tree()
            .insert(agent_key(HIGH_WATER, "gw"), &3u64.to_be_bytes())
            .unwrap();
        store
            .tree()
            .insert(agent_key(COUNT, "gw"), &3u64.to_be_bytes())
            .unwrap();
        store
            .tree()
            .insert(META_BYTES, &300u64.to_be_bytes())
            .unwrap();
        store
            .commit(&[AgentRecords {
                agent: "gw".into(),
                records: vec![enc(4, "new"), enc(5, "new")],
                kept: None,
            }])
            .unwrap();
        let seqs = |store: &EmbeddedStore| -> Vec<u64> {
            all(store, &Query::default())
                .into_iter()
                .map(|(_, s)| s)
                .collect()
        };
        assert_eq!(seqs(&store), vec![1, 2, 3, 4, 5]);
        let mut times = Vec::new();
        store
            .ingest_times(|ns, _, seq| times.push((ns == old_ns, seq)))
            .unwrap();
        assert_eq!(
            times,
            vec![(true, 1), (true, 2), (true, 3), (false, 4), (false, 5)]
        );
        assert_eq!(store.stats().unwrap().total_records, 5);
        // Everything older than a second before now: the three old records.
        let retention = Retention {
            max_age: Some(Duration::from_secs(1)),
            ..Retention::default()
        };
        let report = store
            .enforce_retention(&retention, SystemTime::now())
            .unwrap();
        assert_eq!(report.deleted_records, 3);
        assert_eq!(report.deleted_bytes, 300);
        assert_eq!(seqs(&store), vec![4, 5]);
        assert_eq!(store.stats().unwrap().agents["gw"].records, 2);
    }

    #[test]
    fn retention_by_age_deletes_what_was_ingested_before_the_cutoff() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let commit = |seqs: std::ops::RangeInclusive<u64>| {
            let records = seqs.map(|s| enc(s, "d")).collect();
            store
                .commit(&[AgentRecords {
                    agent: "gw".into(),
                    records,
                    kept: None,
                }])
                .unwrap();
        };
        commit(1..=3);
        let between = SystemTime::now();
        std::thread::sleep(Duration::from_millis(5));
        commit(4..=5);
        let retention = Retention {
            max_age: Some(Duration::from_secs(3600)),
            ..Retention::default()
        };
        // An hour before "now" is `between`: records 1..=3 are older.
        let now = between + Duration::from_secs(3600);
        let report = store.enforce_retention(&retention, now).unwrap();
        assert_eq!(report.deleted_records, 3);
        let seqs: Vec<u64> = all(&store, &Query::default())
            .into_iter()
            .map(|(_, s)| s)
            .collect();
        assert_eq!(seqs, vec![4, 5]);
        // Nothing more to do on a second pass.
        assert_eq!(
            store
                .enforce_retention(&retention, now)
                .unwrap()
                .deleted_records,
            0
        );
    }

    #[test]
    fn retention_by_size_deletes_oldest_first_and_keeps_high_water_marks() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        for seq in 1..=10 {
            store
                .commit(&[AgentRecords {
                    agent: "gw".into(),
                    records: vec![enc(seq, "d")],
                    kept: None,
                }])
                .unwrap();
        }
        let per_record = store.stored_bytes().unwrap() / 10;
        let retention = Retention {
            max_bytes: Some(per_record * 4),
            ..Retention::default()
        };
        let report = store
            .enforce_retention(&retention, SystemTime::now())
            .unwrap();
        assert_eq!(report.deleted_records, 6);
        let seqs: Vec<u64> = all(&store, &Query::default())
            .into_iter()
            .map(|(_, s)| s)
            .collect();
        assert_eq!(seqs, vec![7, 8, 9, 10]);
        assert_eq!(store.stored_through("gw").unwrap(), 10);
        assert_eq!(store.stats().unwrap().agents["gw"].records, 4);
    }
}
