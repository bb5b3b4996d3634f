//! The buffer's contract, on a real sled database in a temp directory.

use std::time::Duration;

use edgefleet_buffer::{
    AnchorOutcome, AppendBatch, Buffer, BufferError, BufferOptions, CommitObserver, DedupeKey,
    FullPolicy, Incoming, Outcome,
};
use edgefleet_proto::batch_zstd::BatchCompressor;
use edgefleet_proto::{RawPayload, Record};

// The cross-process tests' tmpfs, compiled in here: this crate cannot
// depend on theirs, which depends on it.
#[path = "../../../tests/src/small_disk.rs"]
mod small_disk;
use small_disk::SmallDisk;

fn record(device: &str, payload: &[u8]) -> Incoming {
    Record {
        seq: 0,
        source: "test".into(),
        device_id: device.into(),
        timestamp_ns: 1,
        value: Some(edgefleet_proto::record::Value::Raw(RawPayload {
            data: payload.to_vec(),
            content_type: "application/octet-stream".into(),
        })),
    }
    .into()
}

/// `len` bytes zstd cannot shrink, different on every call: tests of the
/// byte cap count segments at their stored size, which for compressible
/// payloads depends on zstd's ratio.
fn noise(len: usize) -> Vec<u8> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEED: AtomicU64 = AtomicU64::new(0x9e37_79b9_7f4a_7c15);
    let mut state = SEED.fetch_add(0x6a09_e667_f3bc_c909, Ordering::Relaxed) | 1;
    (0..len)
        .map(|_| {
            // xorshift64*
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            (state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}

fn options(dir: &std::path::Path) -> BufferOptions {
    let mut options = BufferOptions::new(dir);
    options.flush_max_delay = Duration::from_millis(1);
    options
}

/// A 64 KiB buffer under `DropOldest`: about 100 of [`append_groups`]'s records.
fn drop_oldest_options(dir: &std::path::Path) -> BufferOptions {
    let mut opts = options(dir);
    opts.max_bytes = 64 * 1024;
    opts.when_full = FullPolicy::DropOldest;
    opts
}

/// Appends `groups` groups of ten ~640 byte records (one segment each: under
/// `segment::MAX_BYTES`); returns how many it offered.
async fn append_groups(buffer: &Buffer, groups: usize) -> u64 {
    for _ in 0..groups {
        buffer
            .append(
                (0..10)
                    .map(|_| record("d", &noise(600)))
                    .collect::<AppendBatch>(),
            )
            .await
            .unwrap();
    }
    groups as u64 * 10
}

fn stored(outcomes: &[Outcome]) -> Vec<u64> {
    outcomes
        .iter()
        .filter_map(|o| match o {
            Outcome::Stored(seq) => Some(*seq),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn appends_are_numbered_readable_acked_and_resumed_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (buffer, report) = Buffer::open(options(dir.path())).unwrap();
    assert!(report.created && report.quarantined.is_none());
    let outcomes = buffer
        .append((0..10).map(|i| record("d1", &[i])).collect::<AppendBatch>())
        .await
        .unwrap();
    assert_eq!(stored(&outcomes), (1..=10).collect::<Vec<_>>());
    let read = buffer.read_from(1, 4, 1 << 20).unwrap();
    assert_eq!(read.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2, 3, 4]);
    buffer.ack(4).await.unwrap();
    let stats = buffer.stats();
    assert_eq!((stats.records, stats.first_seq, stats.next_seq), (6, 5, 11));
    let epoch = stats.epoch;
    buffer.close().await.unwrap();
    drop(buffer);

    let (buffer, report) = Buffer::open(options(dir.path())).unwrap();
    assert!(!report.created);
    assert_eq!(report.resumed_records, 6);
    let stats = buffer.stats();
    assert_eq!(
        (stats.first_seq, stats.next_seq, stats.epoch),
        (5, 11, epoch)
    );
    assert_eq!(stats.durable_through, 10);
    let read = buffer.read_from(5, 100, 1 << 20).unwrap();
    assert_eq!(read.len(), 6);
    assert_eq!(read[0].device_id, "d1");
    let outcomes = buffer.append(vec![record("d1", b"x")]).await.unwrap();
    assert_eq!(outcomes, [Outcome::Stored(11)]);
}

#[tokio::test]
async fn drop_oldest_counts_exactly_and_spares_what_may_have_been_sent() {
    let dir = tempfile::tempdir().unwrap();
    let (buffer, _) = Buffer::open(drop_oldest_options(dir.path())).unwrap();
    let payload = noise(1000);
    buffer
        .append(
            (0..10)
                .map(|_| record("d", &payload))
                .collect::<AppendBatch>(),
        )
        .await
        .unwrap();
    // Records 1..=10 are handed to the network (reserved as possibly sent).
    buffer.before_send(10).await.unwrap();
    let mut appended = 10u64;
    for _ in 0..200 {
        buffer.append(vec![record("d", &payload)]).await.unwrap();
        appended += 1;
    }
    let stats = buffer.stats();
    assert!(stats.bytes <= 64 * 1024, "{stats:?}");
    // Everything is accounted for: kept + dropped = appended.
    assert_eq!(
        stats.records + stats.dropped_full_total,
        appended,
        "{stats:?}"
    );
    assert!(stats.dropped_full_total > 100);
    // The possibly-sent records 1..=10 were not dropped.
    let kept = buffer.read_from(1, 1000, usize::MAX).unwrap();
    let seqs: Vec<u64> = kept.iter().map(|r| r.seq).collect();
    assert_eq!(&seqs[..10], &(1..=10).collect::<Vec<_>>()[..]);
    assert_eq!(seqs.len() as u64, stats.records);
    // The newest record is always kept.
    assert_eq!(*seqs.last().unwrap(), appended);
}

#[tokio::test]
async fn block_waits_for_an_ack_to_make_room() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(dir.path());
    opts.max_bytes = 20 * 1024;
    opts.when_full = FullPolicy::Block;
    let (buffer, _) = Buffer::open(opts).unwrap();
    let payload = noise(1000);
    let mut n = 0;
    while buffer.stats().bytes + 1100 < 20 * 1024 {
        buffer.append(vec![record("d", &payload)]).await.unwrap();
        n += 1;
    }
    let blocked = {
        let buffer = buffer.clone();
        let payload = payload.clone();
        tokio::spawn(async move { buffer.append(vec![record("d", &payload)]).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !blocked.is_finished(),
        "append must wait while the buffer is full"
    );
    buffer.ack(5).await.unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(5), blocked)
        .await
        .expect("append resumes after the ack")
        .unwrap()
        .unwrap();
    assert_eq!(outcome, [Outcome::Stored(n + 1)]);
    assert_eq!(buffer.stats().dropped_full_total, 0);
}

/// An append that spans several segments is measured with every segment's
/// header, uncompressed: under `Block` it is stored whole when that fits
/// exactly, and when it is one byte over, refused whole, never stored in
/// part with its tail dropped.
#[tokio::test]
async fn block_counts_an_append_over_several_segments_whole() {
    let records = || -> AppendBatch { (0..100).map(|_| record("d", &noise(600))).collect() };
    let exact = Buffer::append_size(&records());
    let dir = tempfile::tempdir().unwrap();
    let (buffer, _) = Buffer::open(options(&dir.path().join("measure"))).unwrap();
    buffer.append(records()).await.unwrap();
    // Stored, the segments are at most that (zstd finds the repeated
    // fields): the cap is never judged on a ratio not yet known.
    let stored_bytes = buffer.stats().bytes;
    assert!(stored_bytes <= exact, "{stored_bytes} > {exact}");
    buffer.close().await.unwrap();

    for (cap, fits) in [(exact, true), (exact - 1, false)] {
        let mut opts = options(&dir.path().join(format!("cap-{cap}")));
        opts.max_bytes = cap;
        opts.when_full = FullPolicy::Block;
        let (buffer, _) = Buffer::open(opts).unwrap();
        let result = buffer.append(records()).await;
        let stats = buffer.stats();
        assert_eq!(stats.dropped_full_total, 0, "cap {cap}: {stats:?}");
        if fits {
            assert_eq!(stored(&result.unwrap()).len(), 100);
            assert!(stats.bytes <= exact, "{stats:?}");
        } else {
            assert!(
                matches!(result, Err(BufferError::TooLarge { .. })),
                "cap {cap}: {result:?}"
            );
            assert_eq!(stats.records, 0);
        }
    }
}

#[tokio::test]
async fn a_redelivery_is_recognised_by_key_and_fingerprint() {
    let dir = tempfile::tempdir().unwrap();
    let (buffer, _) = Buffer::open(options(dir.path())).unwrap();
    let with_key = |buffer: &Buffer, payload: &[u8], fp: u8, redelivery: bool| {
        let mut incoming = record("d", payload);
        incoming.dedupe = Some(DedupeKey {
            scope: buffer.dedupe_scope("mqtt/"),
            id: 7,
            fingerprint: [fp; 16],
            redelivery,
            earlier_fingerprint: None,
        });
        incoming
    };
    let first = buffer
        .append(vec![with_key(&buffer, b"a", 1, false)])
        .await
        .unwrap();
    assert_eq!(first, [Outcome::Stored(1)]);
    // Same packet id and content, flagged as a redelivery: not stored twice.
    let again = buffer
        .append(vec![with_key(&buffer, b"a", 1, true)])
        .await
        .unwrap();
    assert_eq!(again, [Outcome::Duplicate]);
    // Same packet id reused for new content: stored.
    let new = buffer
        .append(vec![with_key(&buffer, b"b", 2, true)])
        .await
        .unwrap();
    assert_eq!(new, [Outcome::Stored(2)]);
    // Identical content not flagged as redelivery (a new message): stored.
    let fresh = buffer
        .append(vec![with_key(&buffer, b"b", 2, false)])
        .await
        .unwrap();
    assert_eq!(fresh, [Outcome::Stored(3)]);
    // Survives reopening.
    buffer.close().await.unwrap();
    drop(buffer);
    let (buffer, _) = Buffer::open(options(dir.path())).unwrap();
    let after = buffer
        .append(vec![with_key(&buffer, b"b", 2, true)])
        .await
        .unwrap();
    assert_eq!(after, [Outcome::Duplicate]);
    assert_eq!(buffer.stats().duplicates_total, 1);
}

/// An upgrade that changes how the source fingerprints: the memory holds
/// the old fingerprints, the redeliveries after the restart carry the new
/// one and the old one as `earlier_fingerprint`.
#[tokio::test]
async fn a_redelivery_after_a_change_of_fingerprint_matches_the_earlier_one() {
    let dir = tempfile::tempdir().unwrap();
    let with_key = |buffer: &Buffer, id: u8, fp: u8, earlier: Option<u8>, redelivery: bool| {
        let mut incoming = record("d", &[id]);
        incoming.dedupe = Some(DedupeKey {
            scope: buffer.dedupe_scope("mqtt/"),
            id: id.into(),
            fingerprint: [fp; 16],
            redelivery,
            earlier_fingerprint: earlier.map(|e| [e; 16]),
        });
        incoming
    };
    let (buffer, _) = Buffer::open(options(dir.path())).unwrap();
    // Stored by the old version, whose fingerprints were 10 and 11.
    let old = vec![
        with_key(&buffer, 1, 10, None, false),
        with_key(&buffer, 2, 11, None, false),
    ];
    assert_eq!(
        buffer.append(old).await.unwrap(),
        [Outcome::Stored(1), Outcome::Stored(2)]
    );
    buffer.close().await.unwrap();
    drop(buffer);

    let (buffer, _) = Buffer::open(options(dir.path())).unwrap();
    let redelivered = vec![
        // The same message, in the new fingerprint (20) and the old (10).
        with_key(&buffer, 1, 20, Some(10), true),
        // A different message under id 2: neither fingerprint matches.
        with_key(&buffer, 2, 21, Some(12), true),
    ];
    assert_eq!(
        buffer.append(redelivered).await.unwrap(),
        [Outcome::Duplicate, Outcome::Stored(3)]
    );
    // The earlier fingerprint only counts for a redelivery.
    let not_flagged = vec![with_key(&buffer, 1, 30, Some(10), false)];
    assert_eq!(
        buffer.append(not_flagged).await.unwrap(),
        [Outcome::Stored(4)]
    );
    // And what is remembered from now on is the new fingerprint.
    let again = vec![with_key(&buffer, 1, 30, Some(99), true)];
    assert_eq!(buffer.append(again).await.unwrap(), [Outcome::Duplicate]);
    assert_eq!(buffer.stats().duplicates_total, 2);
}

#[tokio::test]
async fn a_fresh_buffer_renumbers_past_what_the_ingest_stored() {
    let dir = tempfile::tempdir().unwrap();
    let (buffer, _) = Buffer::open(options(dir.path())).unwrap();
    buffer
        .append((0..5).map(|i| record("d", &[i])).collect::<AppendBatch>())
        .await
        .unwrap();
    assert!(!buffer.stats().anchored);
    assert_eq!(
        buffer.anchor(100).await.unwrap(),
        AnchorOutcome::Shifted(100)
    );
    let seqs: Vec<u64> = buffer
        .read_from(0, 100, usize::MAX)
        .unwrap()
        .iter()
        .map(|r| r.seq)
        .collect();
    assert_eq!(seqs, [101, 102, 103, 104, 105]);
    let stats = buffer.stats();
    assert!(stats.anchored);
    assert_eq!((stats.first_seq, stats.next_seq), (101, 106));
    let outcomes = buffer.append(vec![record("d", b"n")]).await.unwrap();
    assert_eq!(outcomes, [Outcome::Stored(106)]);
    // Anchored and consistent: nothing changes.
    assert_eq!(buffer.anchor(103).await.unwrap(), AnchorOutcome::Unchanged);
    // The ingest claims more than this buffer ever issued: renumber again.
    assert_eq!(
        buffer.anchor(500).await.unwrap(),
        AnchorOutcome::Shifted(500 + 1 - 101)
    );
    buffer.close().await.unwrap();
    drop(buffer);
    let (buffer, _) = Buffer::open(options(dir.path())).unwrap();
    assert!(buffer.stats().anchored);
    assert_eq!(buffer.stats().first_seq, 501);
}

#[tokio::test]
async fn a_corrupt_buffer_is_quarantined_and_a_fresh_one_started() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (buffer, _) = Buffer::open(options(dir.path())).unwrap();
        buffer
            .append((0..100).map(|i| record("d", &[i])).collect::<AppendBatch>())
            .await
            .unwrap();
        buffer.close().await.unwrap();
    }
    // Overwrite every file of the database with garbage.
    let buffer_dir = dir.path().join("buffer");
    for entry in walk(&buffer_dir) {
        let len = std::fs::metadata(&entry).unwrap().len().max(64) as usize;
        std::fs::write(&entry, vec![0xA5; len]).unwrap();
    }
    let (buffer, report) = Buffer::open(options(dir.path())).unwrap();
    let quarantine = report.quarantined.expect("quarantined");
    assert!(quarantine
        .moved_to
        .starts_with(dir.path().join("quarantine")));
    assert!(quarantine.moved_to.exists());
    assert!(report.created);
    assert_eq!(buffer.stats().records, 0);
    let outcomes = buffer.append(vec![record("d", b"x")]).await.unwrap();
    assert_eq!(outcomes, [Outcome::Stored(1)]);
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

// ---- Segments: a group commit's records, a few KiB per sled value ----

fn seqs(records: &[Record]) -> Vec<u64> {
    records.iter().map(|r| r.seq).collect()
}

#[tokio::test]
async fn a_partly_acked_segment_stays_until_its_last_record_is_acked() {
    let dir = tempfile::tempdir().unwrap();
    let (buffer, _) = Buffer::open(options(dir.path())).unwrap();
    // Sequential appends are separate groups: segments 1..=10 and 11..=20.
    buffer
        .append((0..10).map(|i| record("d", &[i])).collect::<AppendBatch>())
        .await
        .unwrap();
    let first_segment = buffer.stats().bytes;
    buffer
        .append((10..20).map(|i| record("d", &[i])).collect::<AppendBatch>())
        .await
        .unwrap();
    let both = buffer.stats().bytes;
    assert!(both > first_segment && first_segment > 0);

    // Within the first segment: records drop, bytes stay (the segment stays).
    buffer.ack(4).await.unwrap();
    let stats = buffer.stats();
    assert_eq!((stats.records, stats.first_seq, stats.bytes), (16, 5, both));
    // Acked records are never read, though their segment is still there.
    assert_eq!(seqs(&buffer.read_from(1, 100, usize::MAX).unwrap())[0], 5);

    // Across both: the first segment goes, the second stays.
    buffer.ack(15).await.unwrap();
    let stats = buffer.stats();
    assert_eq!(
        (stats.records, stats.first_seq, stats.bytes),
        (5, 16, both - first_segment)
    );
    buffer.close().await.unwrap();
    drop(buffer);

    let (buffer, report) = Buffer::open(options(dir.path())).unwrap();
    assert_eq!(report.resumed_records, 5, "{report:?}");
    let stats = buffer.stats();
    assert_eq!(
        (stats.first_seq, stats.acked_through, stats.bytes),
        (16, 15, both - first_segment)
    );
    let read = buffer.read_from(16, 100, usize::MAX).unwrap();
    assert_eq!(seqs(&read), (16..=20).collect::<Vec<_>>());
    assert_eq!(read[0].value, record("d", &[15]).record.to_record().value);
    // Acking the same range again changes nothing.
    buffer.ack(15).await.unwrap();
    assert_eq!(buffer.stats().records, 5);
    buffer.ack(20).await.unwrap();
    let stats = buffer.stats();
    assert_eq!((stats.records, stats.bytes, stats.first_seq), (0, 0, 0));
    assert!(buffer.read_from(1, 100, usize::MAX).unwrap().is_empty());
}

#[tokio::test]
async fn reads_start_in_the_middle_of_a_segment_and_keep_the_limits() {
    let dir = tempfile::tempdir().unwrap();
    let (buffer, _) = Buffer::open(options(dir.path())).unwrap();
    buffer
        .append(
            (0..20)
                .map(|i| record("d", &[i; 10]))
                .collect::<AppendBatch>(),
        )
        .await
        .unwrap();
    buffer
        .append(
            (20..30)
                .map(|i| record("d", &[i; 10]))
                .collect::<AppendBatch>(),
        )
        .await
        .unwrap();
    let read = buffer.read_from(7, 5, usize::MAX).unwrap();
    assert_eq!(seqs(&read), [7, 8, 9, 10, 11]);
    assert_eq!(
        read[0].value,
        record("d", &[6; 10]).record.to_record().value
    );
    // Running from one segment into the next.
    let read = buffer.read_from(18, 100, usize::MAX).unwrap();
    assert_eq!(seqs(&read), (18..=30).collect::<Vec<_>>());
    assert_eq!(
        read[3].value,
        record("d", &[20; 10]).record.to_record().value
    );
    // At least one record, however small the byte limit.
    assert_eq!(seqs(&buffer.read_from(21, 100, 1).unwrap()), [21]);
    let one = buffer.read_from(21, 1, usize::MAX).unwrap()[0].clone();
    let size = prost::Message::encoded_len(&Record { seq: 0, ..one });
    assert_eq!(
        seqs(&buffer.read_from(21, 100, 3 * size).unwrap()),
        [21, 22, 23]
    );
    assert_eq!(seqs(&buffer.read_from(0, 2, usize::MAX).unwrap()), [1, 2]);
    assert!(buffer.read_from(31, 100, usize::MAX).unwrap().is_empty());
    buffer.ack(12).await.unwrap();
    assert_eq!(
        seqs(&buffer.read_from(13, 2, usize::MAX).unwrap()),
        [13, 14]
    );
    assert_eq!(seqs(&buffer.read_from(3, 2, usize::MAX).unwrap()), [13, 14]);
}

#[tokio::test]
async fn drop_oldest_drops_whole_unsent_segments_and_counts_them_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let opts = drop_oldest_options(dir.path());
    let (buffer, _) = Buffer::open(opts.clone()).unwrap();
    let mut appended = append_groups(&buffer, 2).await;
    // 1..=15 may have been sent: segment 11..=20 straddles the reservation.
    buffer.before_send(15).await.unwrap();
    for _ in 0..30 {
        let outcomes = buffer
            .append(
                (0..10)
                    .map(|_| record("d", &noise(600)))
                    .collect::<AppendBatch>(),
            )
            .await
            .unwrap();
        assert_eq!(stored(&outcomes).len(), 10, "{outcomes:?}");
        appended += 10;
    }
    let stats = buffer.stats();
    assert!(stats.bytes <= 64 * 1024, "{stats:?}");
    assert_eq!(
        stats.records + stats.dropped_full_total,
        appended,
        "{stats:?}"
    );
    assert!(stats.dropped_full_total >= 200, "{stats:?}");
    // Whole segments of ten went.
    assert_eq!(stats.dropped_full_total % 10, 0);
    let kept = seqs(&buffer.read_from(1, 10_000, usize::MAX).unwrap());
    assert_eq!(kept.len() as u64, stats.records);
    // Possibly sent records are all there, and the straddling segment whole.
    assert_eq!(&kept[..20], &(1..=20).collect::<Vec<_>>()[..]);
    assert_eq!(*kept.last().unwrap(), appended);
    // What is kept after them is the newest, contiguous.
    let tail = &kept[20..];
    assert_eq!(
        tail,
        &(appended - tail.len() as u64 + 1..=appended).collect::<Vec<_>>()[..]
    );

    // Acks after drops count nothing twice, and the levels survive a reopen.
    buffer.ack(20).await.unwrap();
    let after_ack = buffer.stats();
    assert_eq!(after_ack.records, stats.records - 20);
    buffer.close().await.unwrap();
    drop(buffer);
    let (buffer, report) = Buffer::open(opts).unwrap();
    assert_eq!(report.resumed_records, after_ack.records);
    assert_eq!(buffer.stats().bytes, after_ack.bytes);
    buffer.ack(appended).await.unwrap();
    let stats = buffer.stats();
    assert_eq!((stats.records, stats.bytes), (0, 0));
}

/// A group can hold more than the cap's free room (on a slow disk many
/// appends gather while one commit is written). `DropOldest` then drops
/// the group's own oldest segments too, so the newest records are kept and
/// no append is turned away.
#[tokio::test]
async fn drop_oldest_keeps_the_newest_records_of_a_group_larger_than_the_room() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = drop_oldest_options(dir.path());
    // Every append below joins one group: it closes only after a pause of
    // a second.
    opts.flush_max_delay = Duration::from_secs(60);
    opts.flush_append_gap = Duration::from_secs(1);
    opts.flush_gap_min_records = 0;
    let (buffer, _) = Buffer::open(opts).unwrap();
    let mut appended = append_groups(&buffer, 3).await;
    buffer.before_send(10).await.unwrap();
    let commits = buffer.stats().commits_total;
    // 12 x 10 records of ~640 bytes, about 77 KB: more than the whole cap.
    let appends: Vec<_> = (0..12)
        .map(|_| {
            let buffer = buffer.clone();
            let records: AppendBatch = (0..10).map(|_| record("d", &noise(600))).collect();
            tokio::spawn(async move { buffer.append(records).await })
        })
        .collect();
    for append in appends {
        let o = append.await.unwrap().unwrap();
        assert_eq!(
            stored(&o).len(),
            10,
            "a record of the group was turned away: {o:?}"
        );
    }
    appended += 120;
    let stats = buffer.stats();
    assert_eq!(
        stats.commits_total,
        commits + 1,
        "the appends must share one group"
    );
    assert!(stats.bytes <= 64 * 1024, "{stats:?}");
    assert_eq!(
        stats.records + stats.dropped_full_total,
        appended,
        "{stats:?}"
    );
    let kept = seqs(&buffer.read_from(1, 10_000, usize::MAX).unwrap());
    assert_eq!(kept.len() as u64, stats.records);
    // What may have been sent stays; after it, the newest, contiguous.
    assert_eq!(&kept[..10], &(1..=10).collect::<Vec<_>>()[..]);
    let tail = &kept[10..];
    assert!(!tail.is_empty() && tail.len() < 110, "{stats:?}");
    assert_eq!(
        tail,
        &(appended - tail.len() as u64 + 1..=appended).collect::<Vec<_>>()[..]
    );
    // And the levels written with the group agree with what is on disk.
    buffer.close().await.unwrap();
    drop(buffer);
    let (buffer, report) = Buffer::open(drop_oldest_options(dir.path())).unwrap();
    assert_eq!(report.resumed_records, stats.records);
    assert_eq!(buffer.stats().bytes, stats.bytes);
}

/// The uplink reserves a window ahead: batches inside it go out without a
/// buffer commit, and `DropOldest` keeps every record of the window.
#[tokio::test]
async fn a_reservation_ahead_covers_later_batches_and_is_never_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let (buffer, _) = Buffer::open(drop_oldest_options(dir.path())).unwrap();
    let mut appended = append_groups(&buffer, 2).await;
    buffer.before_send_ahead(5, 20).await.unwrap();
    let commits = buffer.stats().commits_total;
    // Within the window (up to 25): no commit.
    buffer.before_send_ahead(10, 20).await.unwrap();
    buffer.before_send_ahead(25, 20).await.unwrap();
    assert_eq!(buffer.stats().commits_total, commits);
    appended += append_groups(&buffer, 30).await;
    let stats = buffer.stats();
    assert!(stats.dropped_full_total >= 200, "{stats:?}");
    assert_eq!(stats.records + stats.dropped_full_total, appended);
    let kept = seqs(&buffer.read_from(1, 10_000, usize::MAX).unwrap());
    // 1..=25 reserved; the segment 21..=30 straddles the end and stays whole.
    assert_eq!(&kept[..30], &(1..=30).collect::<Vec<_>>()[..]);
    // Past the window a reservation writes again.
    buffer.before_send_ahead(26, 0).await.unwrap();
    assert!(buffer.stats().commits_total > commits);
}

#[tokio::test]
async fn a_released_reservation_lets_drop_oldest_take_unsent_records_again() {
    let dir = tempfile::tempdir().unwrap();
    let opts = drop_oldest_options(dir.path());
    let (buffer, _) = Buffer::open(opts.clone()).unwrap();
    let mut appended = append_groups(&buffer, 3).await;
    // 1..=10 handed to the network, 11..=30 only reserved ahead; then the
    // link goes down.
    buffer.before_send_ahead(10, 20).await.unwrap();
    buffer.release_unsent(10).await.unwrap();
    appended += append_groups(&buffer, 30).await;
    let stats = buffer.stats();
    assert_eq!(stats.records + stats.dropped_full_total, appended);
    let kept = seqs(&buffer.read_from(1, 10_000, usize::MAX).unwrap());
    // What was handed stays; the oldest unsent went, the newest stayed.
    assert_eq!(&kept[..10], &(1..=10).collect::<Vec<_>>()[..]);
    assert!(kept[10] > 30, "unsent records 11..=30 kept: {kept:?}");
    assert_eq!(*kept.last().unwrap(), appended);
    // A new run never releases below what the last one reserved: it may
    // have handed those records to the network.
    buffer.before_send(kept[15]).await.unwrap();
    buffer.close().await.unwrap();
    drop(buffer);
    let (buffer, _) = Buffer::open(opts).unwrap();
    buffer.release_unsent(0).await.unwrap();
    append_groups(&buffer, 10).await;
    let after = seqs(&buffer.read_from(1, 10_000, usize::MAX).unwrap());
    assert_eq!(&after[..16], &kept[..16]);
}

#[tokio::test]
async fn an_ack_handed_over_without_waiting_is_committed_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (buffer, _) = Buffer::open(options(dir.path())).unwrap();
    let appended = append_groups(&buffer, 3).await;
    buffer.before_send(appended).await.unwrap();
    buffer.ack_soon(20).unwrap();
    // Close is answered after everything sent to the committer before it.
    buffer.close().await.unwrap();
    drop(buffer);
    let (buffer, _) = Buffer::open(options(dir.path())).unwrap();
    let stats = buffer.stats();
    assert_eq!((stats.records, stats.first_seq), (10, 21), "{stats:?}");
    buffer.close().await.unwrap();
    assert!(
        buffer.ack_soon(30).is_err(),
        "an ack after close must say so"
    );
}

/// Appends sent together share one commit, and a group of at least
/// `flush_gap_min_records` is written once they stop coming, long before
/// `flush_max_delay`.
#[tokio::test]
async fn a_group_is_written_once_its_appends_stop_coming() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(dir.path());
    opts.flush_max_delay = Duration::from_secs(60);
    opts.flush_append_gap = Duration::from_millis(200);
    opts.flush_gap_min_records = 40;
    let (buffer, _) = Buffer::open(opts).unwrap();
    let commits = buffer.stats().commits_total;
    let started = std::time::Instant::now();
    let append = || {
        buffer.append(
            (0..10)
                .map(|_| record("d", &noise(600)))
                .collect::<AppendBatch>(),
        )
    };
    let (a, b, c, d) = tokio::join!(append(), append(), append(), append());
    for outcome in [a, b, c, d] {
        assert_eq!(stored(&outcome.unwrap()).len(), 10);
    }
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the group waited for flush_max_delay"
    );
    assert_eq!(buffer.stats().commits_total, commits + 1);
}

/// A group under `flush_gap_min_records` does not close on a pause: it
/// waits for company until `flush_max_delay`, so a source that reads its
/// broker in bursts makes one commit of several bursts, not one each.
#[tokio::test]
async fn a_small_group_waits_for_company_until_the_max_delay() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(dir.path());
    opts.flush_max_delay = Duration::from_millis(400);
    opts.flush_append_gap = Duration::from_millis(5);
    opts.flush_gap_min_records = 1000;
    let (buffer, _) = Buffer::open(opts).unwrap();
    let commits = buffer.stats().commits_total;
    let started = std::time::Instant::now();
    let first = buffer.append(
        (0..10)
            .map(|_| record("d", &noise(100)))
            .collect::<AppendBatch>(),
    );
    let second = async {
        // Well past the gap: without the minimum the first append would
        // have been committed alone by now.
        tokio::time::sleep(Duration::from_millis(100)).await;
        buffer
            .append(
                (0..10)
                    .map(|_| record("d", &noise(100)))
                    .collect::<AppendBatch>(),
            )
            .await
    };
    let (a, b) = tokio::join!(first, second);
    assert_eq!(stored(&a.unwrap()).len(), 10);
    assert_eq!(stored(&b.unwrap()).len(), 10);
    // The deadline is a lower bound whatever the machine's load.
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert_eq!(
        buffer.stats().commits_total,
        commits + 1,
        "one commit for both"
    );
}

/// An ack nobody waits for joins the next group of appends instead of
/// making a commit of its own, and is still applied when no append comes.
#[tokio::test]
async fn an_ack_nobody_waits_for_joins_the_next_commit() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(dir.path());
    // Longer than the test takes: the ack can only commit with the append.
    opts.ack_linger = Duration::from_secs(30);
    let (buffer, _) = Buffer::open(opts).unwrap();
    let appended = append_groups(&buffer, 3).await;
    buffer.before_send(appended).await.unwrap();
    let commits = buffer.stats().commits_total;
    buffer.ack_soon(20).unwrap();
    // Time for the committer to take the ack alone (and, without the
    // linger, commit it).
    tokio::time::sleep(Duration::from_millis(200)).await;
    append_groups(&buffer, 1).await;
    let stats = buffer.stats();
    assert_eq!(stats.commits_total, commits + 1, "{stats:?}");
    assert_eq!((stats.records, stats.first_seq), (20, 21), "{stats:?}");
    buffer.close().await.unwrap();
    drop(buffer);

    let mut opts = options(dir.path());
    opts.ack_linger = Duration::from_millis(50);
    let (buffer, _) = Buffer::open(opts).unwrap();
    buffer.ack_soon(30).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while buffer.stats().first_seq != 31 {
        assert!(
            std::time::Instant::now() < deadline,
            "the ack was never applied"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(buffer.stats().records, 10);
}

#[tokio::test]
async fn an_anchor_renumbers_every_segment() {
    let dir = tempfile::tempdir().unwrap();
    let (buffer, _) = Buffer::open(options(dir.path())).unwrap();
    for s in 0..3u8 {
        buffer
            .append(
                (0..3)
                    .map(|i| record("d", &[s, i]))
                    .collect::<AppendBatch>(),
            )
            .await
            .unwrap();
    }
    let bytes = buffer.stats().bytes;
    assert_eq!(
        buffer.anchor(100).await.unwrap(),
        AnchorOutcome::Shifted(100)
    );
    let read = buffer.read_from(101, 100, usize::MAX).unwrap();
    assert_eq!(seqs(&read), (101..=109).collect::<Vec<_>>());
    assert_eq!(read[4].value, record("d", &[1, 1]).record.to_record().value);
    assert_eq!(buffer.stats().bytes, bytes);
    // Partly ack the middle segment, then the ingest claims more than was
    // ever issued: renumber again, from the first unacked record.
    buffer.before_send(105).await.unwrap();
    buffer.ack(105).await.unwrap();
    assert_eq!(buffer.stats().records, 4);
    assert_eq!(
        buffer.anchor(1000).await.unwrap(),
        AnchorOutcome::Shifted(1001 - 106)
    );
    let stats = buffer.stats();
    assert_eq!(
        (stats.records, stats.first_seq, stats.next_seq),
        (4, 1001, 1005)
    );
    let read = buffer.read_from(1001, 100, usize::MAX).unwrap();
    assert_eq!(seqs(&read), [1001, 1002, 1003, 1004]);
    assert_eq!(read[0].value, record("d", &[1, 2]).record.to_record().value);
    buffer.close().await.unwrap();
    drop(buffer);
    let (buffer, report) = Buffer::open(options(dir.path())).unwrap();
    assert_eq!(report.resumed_records, 4);
    assert_eq!(
        seqs(&buffer.read_from(1001, 100, usize::MAX).unwrap()),
        [1001, 1002, 1003, 1004]
    );
    buffer.ack(1004).await.unwrap();
    assert_eq!((buffer.stats().records, buffer.stats().bytes), (0, 0));
}

#[tokio::test]
async fn a_damaged_segment_is_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (buffer, _) = Buffer::open(options(dir.path())).unwrap();
        for s in 0..3u8 {
            buffer
                .append(
                    (0..5)
                        .map(|i| record("d", &[s, i]))
                        .collect::<AppendBatch>(),
                )
                .await
                .unwrap();
        }
        buffer.close().await.unwrap();
    }
    {
        // Flip one byte inside the middle segment (records 6..=10).
        let db = sled::open(dir.path().join("buffer")).unwrap();
        let segments: Vec<_> = db.scan_prefix(b"r").map(|item| item.unwrap()).collect();
        assert_eq!(segments.len(), 3, "one value per group commit");
        let (key, value) = &segments[1];
        let mut damaged = value.to_vec();
        let at = damaged.len() - 3;
        damaged[at] ^= 0x40;
        db.insert(key, damaged).unwrap();
        db.flush().unwrap();
    }
    let (buffer, report) = Buffer::open(options(dir.path())).unwrap();
    assert!(report.quarantined.is_none());
    let read = buffer.read_from(1, 100, usize::MAX).unwrap();
    assert_eq!(seqs(&read), [1, 2, 3, 4, 5, 11, 12, 13, 14, 15]);
    assert_eq!(buffer.stats().corrupt_skipped_total, 5);
    // Starting inside it skips only what was asked for.
    let read = buffer.read_from(9, 100, usize::MAX).unwrap();
    assert_eq!(seqs(&read)[0], 11);
    assert_eq!(buffer.stats().corrupt_skipped_total, 7);
    // It is still deleted by the ack that covers it.
    buffer.ack(15).await.unwrap();
    assert_eq!((buffer.stats().records, buffer.stats().bytes), (0, 0));
}

/// Writes a buffer the way format 1 did: one key per record, `r` + seq.
fn write_v1_buffer(data_dir: &std::path::Path, records: &[Record], acked: u64) -> u64 {
    use prost::Message;
    let db = sled::open(data_dir.join("buffer")).unwrap();
    let mut batch = sled::Batch::default();
    let mut bytes = 0u64;
    for r in records {
        let mut key = vec![b'r'];
        key.extend_from_slice(&r.seq.to_be_bytes());
        let value = r.encode_to_vec();
        bytes += value.len() as u64;
        batch.insert(key, value);
    }
    let next_seq = records.last().map(|r| r.seq + 1).unwrap_or(1);
    for (key, value) in [
        (&b"m/format"[..], 1u64),
        (b"m/next_seq", next_seq),
        (b"m/records", records.len() as u64),
        (b"m/bytes", bytes),
        (b"m/epoch", 77),
        (b"m/anchored", 1),
        (b"m/acked_through", acked),
        (b"m/sent_reserved", acked),
    ] {
        batch.insert(key, &value.to_be_bytes());
    }
    batch.insert(&b"qmqtt/1"[..], &[9u8; 16]);
    db.apply_batch(batch).unwrap();
    db.flush().unwrap();
    bytes
}

#[tokio::test]
async fn a_format_1_buffer_is_migrated_without_losing_a_record() {
    let dir = tempfile::tempdir().unwrap();
    // More records than one migration step, with gaps (drops in format 1).
    let records: Vec<Record> = (41..=9001u64)
        .filter(|seq| seq % 1000 != 0 && !(5000..5100).contains(seq))
        .map(|seq| {
            let mut r = record(&format!("dev-{}", seq % 13), &seq.to_be_bytes())
                .record
                .to_record();
            r.seq = seq;
            r.timestamp_ns = seq as i64;
            r
        })
        .collect();
    write_v1_buffer(dir.path(), &records, 40);

    let (buffer, report) = Buffer::open(options(dir.path())).unwrap();
    assert!(report.quarantined.is_none() && !report.created);
    assert_eq!(report.resumed_records, records.len() as u64);
    let stats = buffer.stats();
    assert_eq!(
        (
            stats.first_seq,
            stats.next_seq,
            stats.durable_through,
            stats.epoch
        ),
        (41, 9002, 9001, 77)
    );
    assert!(stats.anchored);
    let mut read = Vec::new();
    let mut cursor = 1;
    loop {
        let batch = buffer.read_from(cursor, 777, usize::MAX).unwrap();
        let Some(last) = batch.last() else { break };
        cursor = last.seq + 1;
        read.extend(batch);
    }
    assert_eq!(read, records);
    assert_eq!(buffer.stats().corrupt_skipped_total, 0);
    // The dedupe memory came along.
    let redelivered = buffer
        .append(vec![Incoming {
            // Stored as `mqtt/1`: the scope is all but the last two bytes.
            dedupe: Some(DedupeKey {
                scope: buffer.dedupe_scope("mqtt"),
                id: u16::from_be_bytes(*b"/1"),
                fingerprint: [9; 16],
                redelivery: true,
                earlier_fingerprint: None,
            }),
            ..record("d", b"again")
        }])
        .await
        .unwrap();
    assert_eq!(redelivered, [Outcome::Duplicate]);
    let outcomes = buffer.append(vec![record("d", b"new")]).await.unwrap();
    assert_eq!(outcomes, [Outcome::Stored(9002)]);
    // Levels are exact after the migration: acking everything empties it.
    buffer.ack(4500).await.unwrap();
    assert_eq!(
        buffer.stats().records,
        records.iter().filter(|r| r.seq > 4500).count() as u64 + 1
    );
    buffer.close().await.unwrap();
    drop(buffer);
    let (buffer, report) = Buffer::open(options(dir.path())).unwrap();
    assert!(report.quarantined.is_none());
    assert_eq!(buffer.read_from(4501, 1, usize::MAX).unwrap()[0].seq, 4501);
    buffer.ack(9002).await.unwrap();
    assert_eq!((buffer.stats().records, buffer.stats().bytes), (0, 0));
}

#[tokio::test]
async fn a_buffer_locked_by_another_instance_is_not_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    let (buffer, _) = Buffer::open(options(dir.path())).unwrap();
    buffer.append(vec![record("d", b"x")]).await.unwrap();
    let second = Buffer::open(options(dir.path()));
    assert!(
        second.is_err(),
        "the lock is held: {:?}",
        second.map(|(_, r)| r)
    );
    assert!(!dir.path().join("quarantine").exists());
    assert_eq!(buffer.read_from(1, 10, usize::MAX).unwrap().len(), 1);
}

#[tokio::test]
async fn the_dedupe_memory_survives_snapshots_and_stays_small() {
    let dir = tempfile::tempdir().unwrap();
    let keyed = |buffer: &Buffer, i: u32, redelivery: bool| {
        let mut incoming = record("d", &i.to_be_bytes());
        incoming.dedupe = Some(DedupeKey {
            scope: buffer.dedupe_scope("mqtt/"),
            // Ids 0..1500 until record 60,000, then ids 1500..3000.
            id: (i % 1500 + if i < 60_000 { 0 } else { 1500 }) as u16,
            fingerprint: [i.to_be_bytes(); 4].concat().try_into().unwrap(),
            redelivery,
            earlier_fingerprint: None,
        });
        incoming
    };
    let append_chunks = |buffer: Buffer, chunks: std::ops::Range<u32>| async move {
        for chunk in chunks {
            let outcomes = buffer
                .append(
                    (chunk * 1000..(chunk + 1) * 1000)
                        .map(|i| keyed(&buffer, i, false))
                        .collect::<AppendBatch>(),
                )
                .await
                .unwrap();
            assert_eq!(stored(&outcomes).len(), 1000);
        }
        buffer.close().await.unwrap();
    };
    // One group per append: 78,000 updates of 3,000 keys by the 78th, more
    // than a snapshot pass waits for; it writes the keys in two groups
    // (2,048 per group) along with those groups' own updates.
    let (buffer, _) = Buffer::open(options(dir.path())).unwrap();
    append_chunks(buffer, 0..79).await;
    // Each key's last fingerprint, written while the pass wrote the same
    // keys' older ones, is what a restart remembers.
    let (buffer, _) = Buffer::open(options(dir.path())).unwrap();
    let last_of_each_key: Vec<Incoming> =
        (77_500..79_000).map(|i| keyed(&buffer, i, true)).collect();
    let again = buffer.append(last_of_each_key).await.unwrap();
    assert!(again.iter().all(|o| *o == Outcome::Duplicate), "{again:?}");
    // The groups after the pass delete the entries it superseded, a few
    // hundred per group.
    append_chunks(buffer, 79..84).await;
    {
        let db = sled::open(dir.path().join("buffer")).unwrap();
        // 84,000 updates of about 26 bytes (2.2 MB) were written; after
        // the snapshot pass (the 78th and 79th groups) the log holds the
        // 3,000 keys and the 7 groups of updates since the pass started
        // (about 260 KB), a few KiB per entry (so that sled keeps them in
        // its log, not in blob files).
        let sizes: Vec<usize> = db
            .scan_prefix(b"j")
            .map(|entry| entry.unwrap().1.len())
            .collect();
        let bytes: usize = sizes.iter().sum();
        assert!(
            bytes <= 350_000,
            "{bytes} bytes in {} dedupe log entries after a snapshot",
            sizes.len()
        );
        assert!(sizes.iter().all(|&n| n <= 7 * 1024), "{sizes:?}");
        assert_eq!(db.scan_prefix(b"q").count(), 0);
    }
    let (buffer, _) = Buffer::open(options(dir.path())).unwrap();
    // The last fingerprint of a key, from before and after the snapshot.
    for last in [59_000u32, 59_999, 83_000, 83_999] {
        let again = buffer
            .append(vec![keyed(&buffer, last, true)])
            .await
            .unwrap();
        assert_eq!(again, [Outcome::Duplicate], "{last}");
    }
    // An older fingerprint of the same key is a new message.
    let older = buffer
        .append(vec![keyed(&buffer, 57_499, true)])
        .await
        .unwrap();
    assert_eq!(stored(&older).len(), 1);
    assert_eq!(buffer.stats().duplicates_total, 4);
}

/// An MQTT source's keys: its name and a 2-byte packet id, every id in use
/// (the shape the dedupe memory keeps in a table indexed by id), remembered
/// across a restart and with ids that wrapped around to a new message.
#[tokio::test]
async fn every_packet_id_of_a_source_is_remembered_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let keyed = |buffer: &Buffer, pkid: u16, message: u32, redelivery: bool| {
        let mut incoming = record("d", &message.to_be_bytes());
        incoming.dedupe = Some(DedupeKey {
            scope: buffer.dedupe_scope("broker-a/"),
            id: pkid,
            fingerprint: [message.to_be_bytes(); 4].concat().try_into().unwrap(),
            redelivery,
            earlier_fingerprint: None,
        });
        incoming
    };
    let (buffer, _) = Buffer::open(options(dir.path())).unwrap();
    // Messages 0..70,000 on packet ids 1..=65,535, wrapping as a broker does.
    let pkid = |message: u32| (message % 65_535 + 1) as u16;
    for chunk in (0..70_000u32).collect::<Vec<_>>().chunks(5_000) {
        let outcomes = buffer
            .append(
                chunk
                    .iter()
                    .map(|&m| keyed(&buffer, pkid(m), m, false))
                    .collect::<AppendBatch>(),
            )
            .await
            .unwrap();
        assert_eq!(stored(&outcomes).len(), chunk.len());
    }
    buffer.close().await.unwrap();
    drop(buffer);
    let (buffer, _) = Buffer::open(options(dir.path())).unwrap();
    // The last message on each of these ids, redelivered: recognised.
    // Messages 0..=4,464 had their ids reused by 65,535..=69,999.
    for message in [4_465u32, 30_000, 65_534, 65_535, 69_999] {
        let again = buffer
            .append(vec![keyed(&buffer, pkid(message), message, true)])
            .await
            .unwrap();
        assert_eq!(again, [Outcome::Duplicate], "message {message}");
    }
    // An earlier message on a reused id is not the one remembered.
    for message in [0u32, 4_464] {
        let earlier = buffer
            .append(vec![keyed(&buffer, pkid(message), message, true)])
            .await
            .unwrap();
        assert_eq!(stored(&earlier).len(), 1, "message {message}");
    }
    assert_eq!(buffer.stats().duplicates_total, 5);
}

/// A group of most of a MiB, and its dedupe updates, are stored a few KiB
/// per sled value, so sled keeps it all in its log: no blob file (a file
/// creation, two fsyncs and an unlink each), and it reads back whole and
/// in order, its redeliveries recognised after a restart.
#[tokio::test]
async fn a_large_group_is_stored_in_the_log_without_blob_files() {
    let dir = tempfile::tempdir().unwrap();
    let (buffer, _) = Buffer::open(options(dir.path())).unwrap();
    // As from the MQTT source: each with a dedupe key, so the group's
    // dedupe log updates (27 bytes each) are over 200 KiB too.
    let records: Vec<Incoming> = (0..8_192u32)
        .map(|i| {
            let mut incoming = record("d1", &[i.to_be_bytes(); 25].concat());
            incoming.dedupe = Some(DedupeKey {
                scope: buffer.dedupe_scope("broker-a/"),
                id: i as u16 + 1,
                fingerprint: [i.to_be_bytes(); 4].concat().try_into().unwrap(),
                redelivery: false,
                earlier_fingerprint: None,
            });
            incoming
        })
        .collect();
    let outcomes = buffer.append(records).await.unwrap();
    assert_eq!(stored(&outcomes), (1..=8_192).collect::<Vec<_>>());
    let unsynced = edgefleet_sled_sync::unsynced_files(&dir.path().join("buffer")).unwrap();
    assert_eq!(unsynced.blob_files, 0, "sled wrote blob files");
    let read = buffer.read_from(1, 10_000, usize::MAX).unwrap();
    assert_eq!(seqs(&read), (1..=8_192).collect::<Vec<_>>());
    for (i, record) in read.iter().enumerate() {
        let Some(edgefleet_proto::record::Value::Raw(raw)) = &record.value else {
            panic!("record {i} lost its payload");
        };
        assert_eq!(raw.data, [(i as u32).to_be_bytes(); 25].concat());
    }
    buffer.close().await.unwrap();
    drop(buffer);
    let (buffer, _) = Buffer::open(options(dir.path())).unwrap();
    for i in [0u32, 4_000, 8_191] {
        let mut again = record("d1", &[i.to_be_bytes(); 25].concat());
        again.dedupe = Some(DedupeKey {
            scope: buffer.dedupe_scope("broker-a/"),
            id: i as u16 + 1,
            fingerprint: [i.to_be_bytes(); 4].concat().try_into().unwrap(),
            redelivery: true,
            earlier_fingerprint: None,
        });
        assert_eq!(
            buffer.append(vec![again]).await.unwrap(),
            [Outcome::Duplicate]
        );
    }
}

/// Durable must mean on the disk, not in the page cache: sled writes a page
/// too large for its log to a file of its own and never syncs it, so a power
/// cut would lose records the buffer had reported durable (and the source
/// acknowledged upstream).
#[tokio::test]
async fn what_an_append_reports_durable_is_not_left_dirty_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let (buffer, _) = Buffer::open(options(dir.path())).unwrap();
    // Records of a few KiB (log segments) and one of 300 KiB: a segment of
    // its own, over the quarter of a 512 KiB log segment that sled keeps in
    // its log, so it becomes a blob file.
    let mut records: Vec<Incoming> = (0..2_000).map(|_| record("d1", &noise(200))).collect();
    records.insert(1_000, record("d1", &noise(300 << 10)));
    let outcomes = buffer.append(records).await.unwrap();
    assert_eq!(stored(&outcomes).len(), 2_001);
    let unsynced = edgefleet_sled_sync::unsynced_files(&dir.path().join("buffer")).unwrap();
    assert!(
        unsynced.blob_files > 0,
        "the test needs sled to have written a blob file; it wrote none"
    );
    assert!(
        unsynced.dirty.is_empty(),
        "dirty pages after the append was reported durable: {:?}",
        unsynced.dirty
    );
}

/// The observer hears of every commit that wrote to disk, with its time,
/// and of nothing else.
#[tokio::test]
async fn each_durable_commit_is_reported_with_its_duration() {
    use std::sync::{Arc, Mutex};
    let dir = tempfile::tempdir().unwrap();
    let heard: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let mut opts = options(dir.path());
    opts.on_commit = Some(CommitObserver(Arc::new({
        let heard = heard.clone();
        move |took| heard.lock().unwrap().push(took)
    })));
    let (buffer, _) = Buffer::open(opts).unwrap();
    let before = heard.lock().unwrap().len();
    for i in 0..3u8 {
        buffer.append(vec![record("d1", &[i])]).await.unwrap();
    }
    let after_appends = heard.lock().unwrap().clone();
    assert_eq!(after_appends.len(), before + 3, "{after_appends:?}");
    assert!(after_appends[before..].iter().all(|d| !d.is_zero()));
    // A reservation inside the window commits nothing, so nothing is heard.
    buffer.before_send_ahead(1, 20).await.unwrap();
    let reserved = heard.lock().unwrap().len();
    buffer.before_send_ahead(2, 20).await.unwrap();
    assert_eq!(heard.lock().unwrap().len(), reserved);
}

/// Telemetry repeats its names and shapes: stored, it takes a fraction of
/// what the cap counts it at on the way in (so an offline site keeps that
/// many times more backlog), and it reads back record for record, also
/// after a reopen.
#[tokio::test]
async fn telemetry_is_stored_compressed_and_reads_back_whole() {
    let records: Vec<Record> = (0..1_000u64)
        .map(|i| Record {
            seq: 0,
            source: "mqtt".into(),
            device_id: format!("dev-{:03}", i % 20),
            timestamp_ns: 1_700_000_000_000_000_000 + i as i64 * 1_000_000,
            value: Some(edgefleet_proto::record::Value::Raw(RawPayload {
                data: format!(
                    r#"{{"temp":{:.1},"rpm":{},"mode":"eco"}}"#,
                    20.0 + (i % 50) as f64 / 10.0,
                    1200 + i % 400
                )
                .into_bytes(),
                content_type: "application/json".into(),
            })),
        })
        .collect();
    let incoming: AppendBatch = records.iter().cloned().map(Incoming::from).collect();
    let uncompressed = Buffer::append_size(&incoming);
    let dir = tempfile::tempdir().unwrap();
    let (buffer, _) = Buffer::open(options(dir.path())).unwrap();
    buffer.append(incoming).await.unwrap();
    let stored_bytes = buffer.stats().bytes;
    assert!(
        stored_bytes * 3 < uncompressed,
        "{stored_bytes} bytes stored for {uncompressed} uncompressed"
    );
    let check = |read: Vec<Record>| {
        assert_eq!(read.len(), records.len());
        for (i, (got, want)) in read.into_iter().zip(&records).enumerate() {
            assert_eq!(got.seq, i as u64 + 1);
            assert_eq!(Record { seq: 0, ..got }, *want, "record {}", i + 1);
        }
    };
    check(buffer.read_from(1, 10_000, usize::MAX).unwrap());
    buffer.close().await.unwrap();
    drop(buffer);

    let (buffer, report) = Buffer::open(options(dir.path())).unwrap();
    assert!(report.quarantined.is_none());
    assert_eq!(buffer.stats().bytes, stored_bytes);
    check(buffer.read_from(1, 10_000, usize::MAX).unwrap());
    assert_eq!(buffer.stats().corrupt_skipped_total, 0);
    buffer.ack(1_000).await.unwrap();
    assert_eq!((buffer.stats().records, buffer.stats().bytes), (0, 0));
}

/// Records shaped like the MQTT source's: they compress as telemetry does.
fn telemetry(n: u32) -> Vec<Incoming> {
    (0..n)
        .map(|i| {
            let payload = format!(
                r#"{{"temp":{:.1},"rpm":{},"mode":"eco","n":{i}}}"#,
                20.0 + (i % 50) as f64 / 10.0,
                1200 + i % 400
            );
            record(&format!("dev-{:03}", i % 20), payload.as_bytes())
        })
        .collect()
}

/// A batch as the ingest opens it: each record's `seq` and its bytes
/// without it, and the frames the ingest would store as they came.
fn opened(
    batch: edgefleet_proto::encoded::EncodedBatch,
) -> (
    Vec<(u64, Vec<u8>)>,
    Option<edgefleet_proto::batch_zstd::KeptFrames>,
) {
    let (batch, kept) = edgefleet_proto::batch_zstd::BatchDecompressor::new()
        .unwrap()
        .open_keeping_frames(batch, 64 << 20)
        .unwrap();
    let records = batch
        .records
        .iter()
        .map(|r| {
            let seq = edgefleet_proto::encoded::check_record(r).unwrap();
            let bare = edgefleet_proto::encoded::strip_seq(r, seq).expect("numbered at its end");
            (seq, bare.to_vec())
        })
        .collect();
    (records, kept)
}

/// A fresh buffer holding `n` of [`telemetry`]'s records appended at once
/// (whole segments of 32 KiB), and their bytes.
async fn buffer_of_telemetry(n: u32) -> (tempfile::TempDir, Buffer, Vec<Vec<u8>>) {
    let dir = tempfile::tempdir().unwrap();
    let (buffer, _) = Buffer::open(options(dir.path())).unwrap();
    let appended = telemetry(n);
    let wanted = appended
        .iter()
        .map(|i| i.record.as_bytes().to_vec())
        .collect();
    buffer.append(appended).await.unwrap();
    (dir, buffer, wanted)
}

/// Under load the uplink sends the buffer's compressed segments as they
/// are stored, byte for byte: a batch's frames are the segments' frames,
/// it ends where a segment ends, and it opens to every record, numbered.
#[tokio::test]
async fn a_batch_is_the_stored_segments_frames_and_opens_to_the_numbered_records() {
    let (dir, buffer, wanted) = buffer_of_telemetry(5_000).await;
    let mut compressor = BatchCompressor::default();
    let mut sent = Vec::new();
    let mut frames = Vec::new();
    let mut cursor = 1;
    while let Some(read) = buffer
        .read_batch(cursor, 2_000, 4 << 20, Some(&mut compressor))
        .unwrap()
    {
        assert!(read.batch.records.is_empty(), "sent uncompressed");
        assert!(read.records <= 2_000);
        // Every segment here is over PASS_FRAMES_FROM (the last one holds
        // half of 32 KiB of records).
        assert_eq!(read.framed, read.records);
        frames.extend_from_slice(&read.batch.records_zstd);
        let (records, kept) = opened(read.batch);
        assert_eq!(records.len(), read.records);
        assert_eq!(records.last().unwrap().0, read.last);
        let kept = kept.expect("the ingest can keep the frames");
        assert!(kept.frames.len() > 1);
        sent.extend(records);
        cursor = read.last + 1;
    }
    assert_eq!(
        sent.iter().map(|r| r.0).collect::<Vec<_>>(),
        (1..=5_000).collect::<Vec<_>>()
    );
    assert_eq!(sent.into_iter().map(|r| r.1).collect::<Vec<_>>(), wanted);
    buffer.close().await.unwrap();
    drop(buffer);

    // Byte for byte what is stored after each segment's 13-byte header:
    // nothing was compressed on the way out.
    let db = sled::open(dir.path().join("buffer")).unwrap();
    let stored: Vec<u8> = db
        .scan_prefix(b"r")
        .flat_map(|item| item.unwrap().1[13..].to_vec())
        .collect();
    assert_eq!(stored, frames);
}

/// Records that cannot go as a stored frame (a segment read from its middle,
/// a batch smaller than a segment, segments an anchor renumbered, the few
/// records of light load) are compressed on the way, in order, numbered as
/// the buffer numbers them; without a compressor every batch goes plain.
#[tokio::test]
async fn records_that_cannot_go_as_stored_frames_are_compressed_in_order() {
    let (_dir, buffer, wanted) = buffer_of_telemetry(3_000).await;
    let mut compressor = BatchCompressor::default();
    let read = |from: u64, max_records: usize, compressor: Option<&mut BatchCompressor>| {
        let read = buffer
            .read_batch(from, max_records, 4 << 20, compressor)
            .unwrap()
            .unwrap();
        let plain = !read.batch.records.is_empty();
        let framed = read.framed;
        let (records, _) = opened(read.batch);
        assert_eq!(records.len(), read.records);
        (records, plain, framed)
    };
    let seqs_of = |records: &[(u64, Vec<u8>)]| {
        for (seq, bytes) in records {
            assert_eq!(bytes, &wanted[*seq as usize - 1], "record {seq}");
        }
        records.iter().map(|r| r.0).collect::<Vec<_>>()
    };
    // From the middle of a segment, and fewer records than a segment holds.
    let (records, plain, framed) = read(151, 2_000, Some(&mut compressor));
    assert_eq!(seqs_of(&records)[0], 151);
    assert!(!plain);
    // The rest of the first segment compressed, the next ones as stored.
    assert!(framed > 0 && framed < records.len(), "{framed}");
    let (records, _, framed) = read(7, 100, Some(&mut compressor));
    assert_eq!(seqs_of(&records), (7..107).collect::<Vec<_>>());
    assert_eq!(framed, 0);
    // No compressor: the records themselves, numbered.
    let (records, plain, framed) = read(1, 2_000, None);
    assert!(plain);
    assert_eq!(framed, 0);
    assert_eq!(
        seqs_of(&records),
        (1..=records.len() as u64).collect::<Vec<_>>()
    );
    buffer.ack(3_000).await.unwrap();

    // Light load: a record per group, each its own small segment.
    for i in 0..5u8 {
        buffer.append(vec![record("d", &[i; 40])]).await.unwrap();
    }
    let (records, plain, _) = read(3_001, 2_000, Some(&mut compressor));
    assert_eq!(
        records.iter().map(|r| r.0).collect::<Vec<_>>(),
        (3_001..=3_005).collect::<Vec<_>>()
    );
    assert_eq!(records[4].1, record("d", &[4; 40]).record.as_bytes());
    assert!(plain, "a few hundred bytes go as they are");
    buffer.close().await.unwrap();
    drop(buffer);

    // A fresh buffer anchored behind what the ingest stored: every segment
    // moves to new numbers, and its records go with them.
    let (_dir, buffer, wanted) = buffer_of_telemetry(3_000).await;
    assert_eq!(
        buffer.anchor(10_000).await.unwrap(),
        AnchorOutcome::Shifted(10_000)
    );
    let mut cursor = 10_001;
    let mut sent = Vec::new();
    while let Some(read) = buffer
        .read_batch(cursor, 2_000, 4 << 20, Some(&mut compressor))
        .unwrap()
    {
        cursor = read.last + 1;
        assert_eq!(read.framed, 0, "renumbered records went as stored");
        sent.extend(opened(read.batch).0);
    }
    assert_eq!(
        sent.iter().map(|r| r.0).collect::<Vec<_>>(),
        (10_001..=13_000).collect::<Vec<_>>()
    );
    assert_eq!(sent.into_iter().map(|r| r.1).collect::<Vec<_>>(), wanted);
}

/// A buffer the previous agent wrote (format 2: records without their
/// numbers, segments compressed or not) is read and sent as it is, takes new
/// records in the new kind of segment, and says so in its format marker, so
/// that an agent rolled back to the old version quarantines it (kept on
/// disk) instead of skipping segments it cannot read.
#[tokio::test]
async fn a_format_2_buffer_is_sent_whole_and_then_marked_format_3() {
    use prost::Message;
    let dir = tempfile::tempdir().unwrap();
    let old: Vec<Record> = (1..=300u64)
        .map(|seq| Record {
            seq: 0,
            source: "mqtt".into(),
            device_id: format!("dev-{}", seq % 7),
            timestamp_ns: seq as i64,
            value: Some(edgefleet_proto::record::Value::Signals(
                edgefleet_proto::Signals {
                    signals: vec![edgefleet_proto::Signal::f64("temp", seq as f64 / 4.0)],
                },
            )),
        })
        .collect();
    {
        let db = sled::open(dir.path().join("buffer")).unwrap();
        let mut batch = sled::Batch::default();
        let mut bytes = 0u64;
        for (i, run) in old.chunks(100).enumerate() {
            let mut body = Vec::new();
            for record in run {
                record.encode_length_delimited(&mut body).unwrap();
            }
            // Tags 2 (compressed) and 1 (as it is), as format 2 wrote them.
            let mut stored = Vec::new();
            let tag = if i == 1 {
                stored.extend_from_slice(&body);
                1u8
            } else {
                let mut zstd = edgefleet_proto::stored_zstd::StoredCompressor::default();
                assert!(zstd.compress_into(&body, &mut stored));
                2u8
            };
            let mut value = vec![tag];
            value.extend_from_slice(&crc32fast::hash(&stored).to_le_bytes());
            value.extend_from_slice(&stored);
            bytes += value.len() as u64;
            let first = 1 + 100 * i as u64;
            let mut key = vec![b'r'];
            key.extend_from_slice(&first.to_be_bytes());
            key.extend_from_slice(&(first + 99).to_be_bytes());
            batch.insert(key, value);
        }
        for (key, value) in [
            (&b"m/format"[..], 2u64),
            (b"m/next_seq", 301),
            (b"m/records", 300),
            (b"m/bytes", bytes),
            (b"m/epoch", 77),
            (b"m/anchored", 1),
            (b"m/acked_through", 0),
        ] {
            batch.insert(key, &value.to_be_bytes());
        }
        db.apply_batch(batch).unwrap();
        db.flush().unwrap();
    }
    let (buffer, report) = Buffer::open(options(dir.path())).unwrap();
    assert!(report.quarantined.is_none());
    assert_eq!(report.resumed_records, 300);
    let mut compressor = BatchCompressor::default();
    let read = buffer
        .read_batch(1, 2_000, 4 << 20, Some(&mut compressor))
        .unwrap()
        .unwrap();
    assert_eq!((read.records, read.framed, read.last), (300, 0, 300));
    let (records, _) = opened(read.batch);
    for (i, (seq, bytes)) in records.iter().enumerate() {
        assert_eq!(*seq, i as u64 + 1);
        assert_eq!(Record::decode(bytes.as_slice()).unwrap(), old[i]);
    }
    // New records go into the new segments, and as stored frames.
    buffer.append(telemetry(3_000)).await.unwrap();
    let read = buffer
        .read_batch(301, 2_000, 4 << 20, Some(&mut compressor))
        .unwrap()
        .unwrap();
    assert!(read.framed > 0, "{read:?}");
    buffer.close().await.unwrap();
    drop(buffer);
    let db = sled::open(dir.path().join("buffer")).unwrap();
    assert_eq!(
        db.get(b"m/format").unwrap().unwrap().as_ref(),
        &3u64.to_be_bytes()
    );
}

/// After a write fails (a full disk), sled refuses everything until the
/// database is opened again, which the committer does on its own. A source
/// names its scope once, at start, and keeps it: its redeliveries of
/// messages stored before the failure must still be recognised by the
/// reopened committer, or each would be stored a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scope_named_before_a_failed_write_still_deduplicates_after_the_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let disk = SmallDisk::mount(dir.path(), 16 << 20).unwrap();
    let (buffer, _) = Buffer::open(options(&dir.path().join("buffer"))).unwrap();
    let scope = buffer.dedupe_scope("broker-a/");
    let keyed = |id: u16, payload: &[u8], redelivery: bool| {
        let mut incoming = record("d", payload);
        incoming.dedupe = Some(DedupeKey {
            scope,
            id,
            fingerprint: [payload[0]; 16],
            redelivery,
            earlier_fingerprint: None,
        });
        incoming
    };
    let first = buffer.append(vec![keyed(7, b"a", false)]).await.unwrap();
    assert_eq!(first, [Outcome::Stored(1)]);

    disk.fill(0).unwrap();
    let mut failed = None;
    for _ in 0..100 {
        let group = (0..10)
            .map(|_| record("d", &noise(600)))
            .collect::<AppendBatch>();
        if let Err(e) = buffer.append(group).await {
            failed = Some(e);
            break;
        }
    }
    assert!(
        matches!(failed, Some(BufferError::WriteFailed(_))),
        "no append failed on a full disk: {failed:?}"
    );
    disk.free().unwrap();

    // The committer reopens the database about a second after the failure;
    // appends meanwhile are refused, and a source retries them.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let again = loop {
        match buffer.append(vec![keyed(7, b"a", true)]).await {
            Ok(outcomes) => break outcomes,
            Err(BufferError::WriteFailed(_)) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("the buffer was not usable again: {e}"),
        }
    };
    assert_eq!(again, [Outcome::Duplicate]);
    // The same scope goes on working for new messages.
    let next = buffer.append(vec![keyed(8, b"b", false)]).await.unwrap();
    assert!(matches!(next[..], [Outcome::Stored(_)]), "{next:?}");
    let redelivered = buffer.append(vec![keyed(8, b"b", true)]).await.unwrap();
    assert_eq!(redelivered, [Outcome::Duplicate]);
    let read = buffer.read_from(1, 1, 1 << 20).unwrap();
    assert_eq!(
        read[0].seq, 1,
        "the record stored before the failure is kept"
    );
    assert_eq!(buffer.stats().duplicates_total, 2);
}
