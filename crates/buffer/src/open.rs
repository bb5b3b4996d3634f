//! Opening the buffer, and what to do when it cannot be opened.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use crate::keys::{self, u64_value};
use crate::segment;
use crate::{BufferError, BufferOptions, DeadLetter, Levels};

/// What [`crate::Buffer::open`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenReport {
    /// Set when the existing buffer could not be opened and was moved aside.
    pub quarantined: Option<Quarantine>,
    /// A new, empty buffer was created (first start or after quarantine).
    pub created: bool,
    /// Records found on disk and resumed.
    pub resumed_records: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantine {
    pub moved_to: PathBuf,
    pub reason: String,
}

enum OpenFailure {
    /// The files are damaged or not a buffer: quarantine them.
    Corrupt(String),
    /// The files may be fine but cannot be used now (permissions, a full
    /// disk, another agent holding the lock): never quarantine on these.
    Unavailable(BufferError),
}

pub(crate) fn open_or_quarantine(
    options: &BufferOptions,
) -> Result<(sled::Db, OpenReport, Levels), BufferError> {
    let dir = options.buffer_dir();
    std::fs::create_dir_all(&options.data_dir).map_err(|source| BufferError::Io {
        dir: options.data_dir.clone(),
        source,
    })?;
    // sled and our own checks may panic on garbage; a panic here must become
    // a quarantine, not a crash loop.
    // A lock still held by a buffer this process just closed is released
    // within moments (sled's background threads let go of it); wait a little
    // before reporting it.
    let mut attempt = catch_unwind(AssertUnwindSafe(|| try_open(&dir)));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while matches!(&attempt, Ok(Err(e)) if is_lock_held(e)) && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(20));
        attempt = catch_unwind(AssertUnwindSafe(|| try_open(&dir)));
    }
    let reason = match attempt {
        Ok(Ok((db, levels, created))) => {
            let report = OpenReport {
                quarantined: None,
                created,
                resumed_records: levels.records,
            };
            return Ok((db, report, levels));
        }
        Ok(Err(OpenFailure::Unavailable(err))) => return Err(err),
        Ok(Err(OpenFailure::Corrupt(reason))) => reason,
        Err(panic) => format!("opening panicked: {}", panic_text(&panic)),
    };
    let moved_to = quarantine(options, &dir)?;
    tracing::error!(
        buffer = %dir.display(),
        moved_to = %moved_to.display(),
        %reason,
        "BUFFER CORRUPT: moved it aside and started a fresh, empty buffer; records in it were not sent"
    );
    match catch_unwind(AssertUnwindSafe(|| try_open(&dir))) {
        Ok(Ok((db, levels, _))) => Ok((
            db,
            OpenReport {
                quarantined: Some(Quarantine { moved_to, reason }),
                created: true,
                resumed_records: 0,
            },
            levels,
        )),
        Ok(Err(OpenFailure::Unavailable(err))) => Err(err),
        Ok(Err(OpenFailure::Corrupt(reason))) => Err(BufferError::WriteFailed(format!(
            "a fresh buffer in {} is unusable too: {reason}",
            dir.display()
        ))),
        Err(panic) => Err(BufferError::WriteFailed(format!(
            "a fresh buffer in {} panicked on open: {}",
            dir.display(),
            panic_text(&panic)
        ))),
    }
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}

fn quarantine(options: &BufferOptions, dir: &Path) -> Result<PathBuf, BufferError> {
    let qdir = options.data_dir.join("quarantine");
    std::fs::create_dir_all(&qdir).map_err(|source| BufferError::Io {
        dir: qdir.clone(),
        source,
    })?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    let target = qdir.join(format!("buffer-{stamp}"));
    std::fs::rename(dir, &target).map_err(|source| BufferError::Io {
        dir: dir.to_path_buf(),
        source,
    })?;
    Ok(target)
}

fn sled_config(dir: &Path) -> sled::Config {
    sled::Config::new()
        .path(dir)
        .mode(sled::Mode::HighThroughput)
        // sled's page cache, most of the agent's memory under load. The
        // uplink reads segments soon after they are written, one sled value
        // each, and what the cache misses is in the OS page cache: 32 MiB
        // here alone was the whole RSS budget of a small gateway
        // (BENCHMARKS.md, footprint).
        .cache_capacity(8 << 20)
        // We fsync on our own schedule (group commit); a background flusher
        // would only add fsyncs.
        .flush_every_ms(None)
}

/// sled reports a held lock as an `Other` I/O error with this text.
fn is_lock_held(err: &OpenFailure) -> bool {
    matches!(err, OpenFailure::Unavailable(BufferError::Storage { source: sled::Error::Io(io), .. })
        if io.kind() == std::io::ErrorKind::WouldBlock || io.to_string().contains("could not acquire lock"))
}

fn classify(dir: &Path, err: sled::Error) -> OpenFailure {
    match err {
        // Another agent (or a buffer of this process not yet fully closed)
        // holds the lock: the files are fine, never quarantine them.
        sled::Error::Io(io)
            if io.kind() == std::io::ErrorKind::Other
                && io.to_string().contains("could not acquire lock") =>
        {
            OpenFailure::Unavailable(BufferError::Storage {
                dir: dir.to_path_buf(),
                source: sled::Error::Io(io),
            })
        }
        sled::Error::Io(io)
            if matches!(
                io.kind(),
                std::io::ErrorKind::PermissionDenied
                    | std::io::ErrorKind::WouldBlock
                    | std::io::ErrorKind::StorageFull
                    | std::io::ErrorKind::ReadOnlyFilesystem
                    | std::io::ErrorKind::OutOfMemory
            ) =>
        {
            OpenFailure::Unavailable(BufferError::Storage {
                dir: dir.to_path_buf(),
                source: sled::Error::Io(io),
            })
        }
        other => OpenFailure::Corrupt(other.to_string()),
    }
}

fn try_open(dir: &Path) -> Result<(sled::Db, Levels, bool), OpenFailure> {
    // What a full disk leaves behind would otherwise read as corruption and
    // quarantine the buffer with its backlog.
    edgefleet_sled_sync::remove_unfinished_snapshots(dir)
        .map_err(|e| classify(dir, sled::Error::Io(e)))?;
    let db = sled_config(dir).open().map_err(|e| classify(dir, e))?;
    let meta = |key: &[u8]| -> Result<Option<u64>, OpenFailure> {
        match db.get(key).map_err(|e| classify(dir, e))? {
            None => Ok(None),
            Some(v) => u64_value(&v).map(Some).ok_or_else(|| {
                OpenFailure::Corrupt(format!(
                    "bookkeeping entry {:?} is damaged",
                    String::from_utf8_lossy(key)
                ))
            }),
        }
    };
    let Some(format) = meta(keys::META_FORMAT)? else {
        if db.first().map_err(|e| classify(dir, e))?.is_some() {
            return Err(OpenFailure::Corrupt(
                "the buffer has data but no format marker".into(),
            ));
        }
        return init_fresh(dir, db);
    };
    if format == keys::FORMAT_V1 {
        migrate_v1(dir, &db)?;
    } else if format == keys::FORMAT_V2 {
        db.insert(keys::META_FORMAT, &keys::FORMAT_VERSION.to_be_bytes())
            .and_then(|_| db.flush())
            .map_err(|e| classify(dir, e))?;
    } else if format != keys::FORMAT_VERSION {
        return Err(OpenFailure::Corrupt(format!(
            "unknown buffer format {format} (this agent writes {})",
            keys::FORMAT_VERSION
        )));
    }
    let need = |key: &[u8]| -> Result<u64, OpenFailure> {
        meta(key)?.ok_or_else(|| {
            OpenFailure::Corrupt(format!(
                "bookkeeping entry {:?} is missing",
                String::from_utf8_lossy(key)
            ))
        })
    };
    let next_seq = need(keys::META_NEXT_SEQ)?;
    let records = need(keys::META_RECORDS)?;
    let bytes = need(keys::META_BYTES)?;
    let epoch = need(keys::META_EPOCH)?;
    let anchored = need(keys::META_ANCHORED)? == 1;
    let acked_through = meta(keys::META_ACKED)?.unwrap_or(0);

    // Cheap consistency checks: the first and last segments are intact,
    // their first records decode, and they agree with the bookkeeping. A full
    // scan would make start-up O(buffer).
    let mut range = db.range(keys::records_start()..keys::records_end());
    let first = range.next().transpose().map_err(|e| classify(dir, e))?;
    let last = range
        .next_back()
        .transpose()
        .map_err(|e| classify(dir, e))?;
    let last = last.or_else(|| first.clone());
    let mut first_seq = 0;
    let mut last_seq = next_seq.saturating_sub(1);
    if let (Some((first_key, first_value)), Some((last_key, last_value))) = (&first, &last) {
        let mut spans = [(0, 0); 2];
        for (i, (key, value)) in [(first_key, first_value), (last_key, last_value)]
            .into_iter()
            .enumerate()
        {
            let (first, last) = keys::span_of(key)
                .ok_or_else(|| OpenFailure::Corrupt("a segment key is damaged".into()))?;
            let mut scratch = Vec::new();
            let records =
                segment::records(value, last - first + 1, &mut scratch).map_err(|damage| {
                    OpenFailure::Corrupt(format!("segment {first}..={last}: {damage}"))
                })?;
            segment::decode(records[0], first).map_err(|e| {
                OpenFailure::Corrupt(format!("record {first} does not decode: {e}"))
            })?;
            spans[i] = (first, last);
        }
        first_seq = spans[0].0.max(acked_through + 1);
        last_seq = spans[1].1;
        if last_seq >= next_seq {
            return Err(OpenFailure::Corrupt(format!(
                "record {last_seq} is beyond the next sequence number {next_seq}"
            )));
        }
        if records == 0 {
            return Err(OpenFailure::Corrupt(
                "records on disk but the record count is 0".into(),
            ));
        }
    } else if records != 0 {
        return Err(OpenFailure::Corrupt(format!(
            "the record count is {records} but no record is on disk"
        )));
    }
    let levels = Levels {
        records,
        bytes,
        next_seq,
        first_seq,
        durable_through: last_seq.max(acked_through),
        acked_through,
        epoch,
        anchored,
        sent_reserved: 0,
    };
    Ok((db, levels, false))
}

fn init_fresh(dir: &Path, db: sled::Db) -> Result<(sled::Db, Levels, bool), OpenFailure> {
    let epoch: u64 = rand::random::<u64>() | 1;
    let mut batch = sled::Batch::default();
    let put = |batch: &mut sled::Batch, k: &[u8], v: u64| batch.insert(k, &v.to_be_bytes());
    put(&mut batch, keys::META_FORMAT, keys::FORMAT_VERSION);
    put(&mut batch, keys::META_NEXT_SEQ, 1);
    put(&mut batch, keys::META_RECORDS, 0);
    put(&mut batch, keys::META_BYTES, 0);
    put(&mut batch, keys::META_EPOCH, epoch);
    put(&mut batch, keys::META_ANCHORED, 0);
    put(&mut batch, keys::META_ACKED, 0);
    db.apply_batch(batch).map_err(|e| classify(dir, e))?;
    db.flush().map_err(|e| classify(dir, e))?;
    let levels = Levels {
        next_seq: 1,
        epoch,
        ..Levels::default()
    };
    Ok((db, levels, true))
}

pub(crate) fn read_dead_letters(db: &sled::Db) -> Result<Vec<DeadLetter>, sled::Error> {
    let mut out = Vec::new();
    for item in db.scan_prefix([keys::DEAD]) {
        let (_, value) = item?;
        if let Ok(letter) = serde_json::from_slice(&value) {
            out.push(letter);
        }
    }
    Ok(out)
}

/// Converts a format 1 buffer (one key per record) into segments, in bounded
/// steps. Each step is one atomic batch that replaces some format 1 records
/// by segments holding the same bytes and corrects the byte count; format 1
/// and segment keys differ in length, so a buffer interrupted between steps
/// (SIGKILL, power loss) is simply migrated further on the next start. The
/// format marker changes only in the last step, when no format 1 key is
/// left. Records, sequence numbers and every other entry stay as they are.
fn migrate_v1(dir: &Path, db: &sled::Db) -> Result<(), OpenFailure> {
    const STEP_RECORDS: usize = 4096;
    const STEP_BYTES: usize = 4 << 20;
    let mut migrated = 0u64;
    let mut open = segment::OpenSegment::default();
    let mut sealer = segment::Sealer::default();
    loop {
        let bytes = db
            .get(keys::META_BYTES)
            .map_err(|e| classify(dir, e))?
            .and_then(|v| u64_value(&v))
            .unwrap_or(0);
        let mut batch = sled::Batch::default();
        let (mut old_bytes, mut new_bytes) = (0u64, 0u64);
        let mut seal = |open: &mut segment::OpenSegment, batch: &mut sled::Batch| {
            if let Some((first, records, entries)) = open.take() {
                sealer.seal(entries, first, records, |first, last, value| {
                    batch.insert(&keys::segment(first, last), value);
                    new_bytes += value.len() as u64;
                });
            }
        };
        // The last record of the open segment: a segment is a run of
        // consecutive records.
        let mut run_last = None;
        let mut step_records = 0usize;
        let mut done = true;
        for item in db.range(keys::records_start()..keys::records_end()) {
            let (key, record) = item.map_err(|e| classify(dir, e))?;
            let Some(seq) = keys::v1_seq_of(&key) else {
                // Already a segment (an interrupted migration).
                continue;
            };
            if step_records >= STEP_RECORDS || old_bytes >= STEP_BYTES as u64 {
                done = false;
                break;
            }
            if run_last.map(|last: u64| last + 1) != Some(seq)
                || segment::starts_new(open.measure(), record.len())
            {
                seal(&mut open, &mut batch);
                open.start(seq);
            }
            // The record is kept as it was stored, its own `seq` included:
            // the number written after it is the same and wins.
            open.push(&record);
            run_last = Some(seq);
            batch.remove(key);
            old_bytes += record.len() as u64;
            step_records += 1;
        }
        seal(&mut open, &mut batch);
        let bytes = (bytes + new_bytes).saturating_sub(old_bytes);
        batch.insert(keys::META_BYTES, &bytes.to_be_bytes());
        if done {
            batch.insert(keys::META_FORMAT, &keys::FORMAT_VERSION.to_be_bytes());
        }
        db.apply_batch(batch).map_err(|e| classify(dir, e))?;
        migrated += step_records as u64;
        if done {
            db.flush().map_err(|e| classify(dir, e))?;
            tracing::info!(
                records = migrated,
                "migrated the buffer from one key per record (format 1) to segments"
            );
            return Ok(());
        }
    }
}
