//! The buffer's contract, on a real sled database in a temp directory.

use std::time::Duration;

use edgefleet_buffer::{
    AnchorOutcome, Buffer, BufferOptions, DedupeKey, FullPolicy, Incoming, Outcome,
};
use edgefleet_proto::{RawPayload, Record};

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

fn options(dir: &std::path::Path) -> BufferOptions {
    let mut options = BufferOptions::new(dir);
    options.flush_max_delay = Duration::from_millis(1);
    options
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
        .append((0..10).map(|i| record("d1", &[i])).collect())
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
    let mut opts = options(dir.path());
    opts.max_bytes = 64 * 1024;
    opts.when_full = FullPolicy::DropOldest;
    let (buffer, _) = Buffer::open(opts).unwrap();
    let payload = vec![7u8; 1000];
    buffer
        .append((0..10).map(|_| record("d", &payload)).collect())
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
    let payload = vec![1u8; 1000];
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

#[tokio::test]
async fn a_redelivery_is_recognised_by_key_and_fingerprint() {
    let dir = tempfile::tempdir().unwrap();
    let (buffer, _) = Buffer::open(options(dir.path())).unwrap();
    let with_key = |payload: &[u8], fp: u8, redelivery: bool| {
        let mut incoming = record("d", payload);
        incoming.dedupe = Some(DedupeKey {
            key: b"mqtt/7".to_vec(),
            fingerprint: [fp; 16],
            redelivery,
        });
        incoming
    };
    let first = buffer.append(vec![with_key(b"a", 1, false)]).await.unwrap();
    assert_eq!(first, [Outcome::Stored(1)]);
    // Same packet id and content, flagged as a redelivery: not stored twice.
    let again = buffer.append(vec![with_key(b"a", 1, true)]).await.unwrap();
    assert_eq!(again, [Outcome::Duplicate]);
    // Same packet id reused for new content: stored.
    let new = buffer.append(vec![with_key(b"b", 2, true)]).await.unwrap();
    assert_eq!(new, [Outcome::Stored(2)]);
    // Identical content not flagged as redelivery (a new message): stored.
    let fresh = buffer.append(vec![with_key(b"b", 2, false)]).await.unwrap();
    assert_eq!(fresh, [Outcome::Stored(3)]);
    // Survives reopening.
    buffer.close().await.unwrap();
    drop(buffer);
    let (buffer, _) = Buffer::open(options(dir.path())).unwrap();
    let after = buffer.append(vec![with_key(b"b", 2, true)]).await.unwrap();
    assert_eq!(after, [Outcome::Duplicate]);
    assert_eq!(buffer.stats().duplicates_total, 1);
}

#[tokio::test]
async fn a_fresh_buffer_renumbers_past_what_the_ingest_stored() {
    let dir = tempfile::tempdir().unwrap();
    let (buffer, _) = Buffer::open(options(dir.path())).unwrap();
    buffer
        .append((0..5).map(|i| record("d", &[i])).collect())
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
            .append((0..100).map(|i| record("d", &[i])).collect())
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

#[tokio::test]
async fn a_buffer_locked_by_another_instance_is_not_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    let (buffer, _) = Buffer::open(options(dir.path())).unwrap();
    buffer.append(vec![record("d", b"x")]).await.unwrap();
    let second = Buffer::open(options(dir.path()));
    assert!(second.is_err(), "the lock is held: {:?}", second.map(|(_, r)| r));
    assert!(!dir.path().join("quarantine").exists());
    assert_eq!(buffer.read_from(1, 10, usize::MAX).unwrap().len(), 1);
}
