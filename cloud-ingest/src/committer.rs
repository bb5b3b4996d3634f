//! Group commit across streams.
//!
//! One thread owns all writes. It takes every batch waiting in its queue
//! (FIFO across all streams), drops records already stored, writes the rest
//! in one sink commit (one fsync), and completes each batch's oneshot. Many
//! agents thus cost one fsync per group rather than one per batch, and since
//! each stream has at most `credit` batches queued, FIFO order means a busy
//! agent cannot push the others back by more than its window.
//!
//! Deduplication lives here, above the sink, so every sink gets it: the sink's
//! per-agent high-water mark plus this thread being the only writer (and each
//! agent's batches arriving in seq order) make `seq <= high-water` an exact
//! test for "already stored".

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};
use tracing::{debug, error};

use edgefleet_proto::batch_zstd::KeptFrames;

use crate::metrics::Metrics;
use crate::sink::{AgentRecords, EncodedRecord, Sink};

/// Most batches in one group commit, and roughly the most bytes: bounds the
/// latency a group adds for the streams at its end.
const MAX_GROUP_BATCHES: usize = 512;
const MAX_GROUP_BYTES: usize = 64 * 1024 * 1024;

/// The result of committing one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitOutcome {
    pub stored: u32,
    pub duplicates: u32,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum CommitError {
    #[error("store commit failed: {0}")]
    Sink(String),
    #[error("an earlier batch of this stream failed to commit")]
    EarlierFailed,
    #[error("the committer has stopped")]
    Stopped,
}

/// One stream's batch on its way to the store.
pub struct Submission {
    pub agent: Arc<str>,
    pub records: Vec<EncodedRecord>,
    /// The agent's compressed frames of `records`, which the sink may store
    /// as they are while none of the records is a duplicate.
    pub kept: Option<KeptFrames>,
    /// Encoded size, for group sizing.
    pub bytes: usize,
    /// Set when one of this stream's batches fails: later batches of the
    /// stream are then refused without writing, so a failed batch can never
    /// be skipped over by a later one (which would raise the high-water mark
    /// past records that were never stored).
    pub failed: Arc<AtomicBool>,
    /// Holds this batch's share of the global byte budget until it is committed.
    pub permit: Option<OwnedSemaphorePermit>,
    pub done: oneshot::Sender<Result<CommitOutcome, CommitError>>,
}

enum Job {
    Commit(Submission),
    Stop,
}

/// Handle to the committer thread; cheap to clone.
#[derive(Clone)]
pub struct Committer {
    tx: mpsc::UnboundedSender<Job>,
}

/// Joins the committer thread after [`Committer::stop`].
pub struct CommitterThread(JoinHandle<()>);

impl Committer {
    pub fn start(
        sink: Arc<dyn Sink>,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<(Committer, CommitterThread)> {
        // Unbounded is safe: every submission holds byte-budget permits and a
        // slot of its stream's credit window, which bound the queue.
        let (tx, rx) = mpsc::unbounded_channel();
        let handle = std::thread::Builder::new()
            .name("ingest-committer".into())
            .spawn(move || run(rx, sink, metrics))?;
        Ok((Committer { tx }, CommitterThread(handle)))
    }

    /// Queues a batch; the result arrives on `submission.done`.
    pub fn submit(&self, submission: Submission) {
        if let Err(mpsc::error::SendError(Job::Commit(s))) = self.tx.send(Job::Commit(submission)) {
            let _ = s.done.send(Err(CommitError::Stopped));
        }
    }

    /// Asks the thread to finish: it commits everything queued before this
    /// call, then exits.
    pub fn stop(&self) {
        let _ = self.tx.send(Job::Stop);
    }
}

impl CommitterThread {
    pub fn join(self) {
        if self.0.join().is_err() {
            error!("the committer thread panicked");
        }
    }
}

fn run(mut rx: mpsc::UnboundedReceiver<Job>, sink: Arc<dyn Sink>, metrics: Arc<Metrics>) {
    while let Some(job) = rx.blocking_recv() {
        let Job::Commit(first) = job else { break };
        let mut bytes = first.bytes;
        let mut group = vec![first];
        let mut stop = false;
        while group.len() < MAX_GROUP_BATCHES && bytes < MAX_GROUP_BYTES {
            match rx.try_recv() {
                Ok(Job::Commit(s)) => {
                    bytes += s.bytes;
                    group.push(s);
                }
                Ok(Job::Stop) => {
                    stop = true;
                    break;
                }
                Err(_) => break,
            }
        }
        commit_group(sink.as_ref(), &metrics, group);
        if stop {
            break;
        }
    }
    // Anything submitted after Stop is refused when `rx` drops with it.
    debug!("committer stopped");
}

fn commit_group(sink: &dyn Sink, metrics: &Metrics, group: Vec<Submission>) {
    // High-water marks as this group will leave them, read once per agent.
    let mut high: HashMap<Arc<str>, u64> = HashMap::new();
    let mut writes: Vec<AgentRecords> = Vec::new();
    let mut waiting: Vec<(Submission, CommitOutcome)> = Vec::new();
    for mut s in group {
        if s.failed.load(Ordering::Acquire) {
            let _ = s.done.send(Err(CommitError::EarlierFailed));
            continue;
        }
        let h = match high.get(&s.agent) {
            Some(h) => *h,
            None => match sink.stored_through(&s.agent) {
                Ok(h) => *high.entry(s.agent.clone()).or_insert(h),
                Err(e) => {
                    error!(agent = %s.agent, error = %e, "cannot read the high-water mark");
                    s.failed.store(true, Ordering::Release);
                    let _ = s.done.send(Err(CommitError::Sink(e.to_string())));
                    continue;
                }
            },
        };
        let records = std::mem::take(&mut s.records);
        let total = records.len();
        let fresh: Vec<EncodedRecord> = records.into_iter().filter(|r| r.seq > h).collect();
        let outcome = CommitOutcome {
            stored: fresh.len() as u32,
            duplicates: (total - fresh.len()) as u32,
        };
        // The frames hold the duplicates too, so they are kept only without any.
        let kept = s.kept.take().filter(|_| fresh.len() == total);
        if let Some(last) = fresh.last() {
            high.insert(s.agent.clone(), last.seq);
            writes.push(AgentRecords {
                agent: s.agent.to_string(),
                records: fresh,
                kept,
            });
        }
        waiting.push((s, outcome));
    }
    if waiting.is_empty() {
        return;
    }
    let started = Instant::now();
    let result = if writes.is_empty() {
        Ok(())
    } else {
        sink.commit(&writes)
    };
    metrics
        .commit_seconds
        .observe(started.elapsed().as_secs_f64());
    match result {
        Ok(()) => {
            for (s, outcome) in waiting {
                metrics.batches.inc();
                metrics.records_stored.inc_by(outcome.stored.into());
                metrics.duplicates.inc_by(outcome.duplicates.into());
                let _ = s.done.send(Ok(outcome));
            }
        }
        Err(e) => {
            error!(error = %e, batches = waiting.len(), "group commit failed; the streams involved will be closed");
            let message = e.to_string();
            for (s, _) in waiting {
                s.failed.store(true, Ordering::Release);
                let _ = s.done.send(Err(CommitError::Sink(message.clone())));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    use crate::sink::SinkError;

    /// A sink in memory that can be told to fail, to test the committer's
    /// bookkeeping in isolation.
    #[derive(Default)]
    struct MemorySink {
        high: Mutex<HashMap<String, u64>>,
        commits: Mutex<Vec<Vec<AgentRecords>>>,
        fail_next: AtomicBool,
    }

    impl Sink for MemorySink {
        fn stored_through(&self, agent: &str) -> Result<u64, SinkError> {
            Ok(self.high.lock().unwrap().get(agent).copied().unwrap_or(0))
        }
        fn commit(&self, batches: &[AgentRecords]) -> Result<(), SinkError> {
            if self.fail_next.swap(false, Ordering::SeqCst) {
                return Err(SinkError::Corrupt {
                    path: "mem".into(),
                    what: "disk".into(),
                    reason: "simulated failure".into(),
                });
            }
            let mut high = self.high.lock().unwrap();
            for b in batches {
                let h = high.entry(b.agent.clone()).or_default();
                *h = (*h).max(b.records.last().unwrap().seq);
            }
            self.commits.lock().unwrap().push(batches.to_vec());
            Ok(())
        }
    }

    fn submission(
        agent: &str,
        seqs: &[u64],
        failed: &Arc<AtomicBool>,
    ) -> (
        Submission,
        oneshot::Receiver<Result<CommitOutcome, CommitError>>,
    ) {
        let (done, rx) = oneshot::channel();
        let records = seqs
            .iter()
            .map(|&seq| EncodedRecord {
                seq,
                encoded: Default::default(),
            })
            .collect();
        let s = Submission {
            agent: agent.into(),
            records,
            kept: None,
            bytes: 10,
            failed: failed.clone(),
            permit: None,
            done,
        };
        (s, rx)
    }

    /// The agent's frames hold every record of the batch, so they reach the
    /// sink only when none of those records is a duplicate.
    #[test]
    fn the_agents_frames_reach_the_sink_only_without_duplicates() {
        let sink = Arc::new(MemorySink::default());
        sink.high.lock().unwrap().insert("a".into(), 2);
        let flag = Arc::new(AtomicBool::new(false));
        let frames = |n| {
            Some(KeptFrames {
                frames: vec![(prost::bytes::Bytes::from_static(b"frame"), n)],
            })
        };
        let (mut partly_stored, _r1) = submission("a", &[1, 2, 3, 4], &flag);
        partly_stored.kept = frames(4);
        let (mut fresh, _r2) = submission("a", &[5, 6], &flag);
        fresh.kept = frames(2);
        commit_group(sink.as_ref(), &Metrics::new(), vec![partly_stored, fresh]);
        let commits = sink.commits.lock().unwrap();
        let written = &commits[0];
        assert_eq!(written.len(), 2);
        assert_eq!(written[0].records.len(), 2);
        assert_eq!(written[0].kept, None);
        assert_eq!(written[1].kept, frames(2));
    }

    #[test]
    fn one_group_dedupes_within_and_across_batches_and_commits_once() {
        let sink = Arc::new(MemorySink::default());
        sink.high.lock().unwrap().insert("a".into(), 2);
        let metrics = Metrics::new();
        let flag = Arc::new(AtomicBool::new(false));
        let (s1, r1) = submission("a", &[1, 2, 3, 4], &flag);
        let (s2, r2) = submission("a", &[3, 4, 5], &flag);
        let (s3, r3) = submission("b", &[1], &flag);
        commit_group(sink.as_ref(), &metrics, vec![s1, s2, s3]);
        let outcome = |r: oneshot::Receiver<Result<CommitOutcome, CommitError>>| {
            r.blocking_recv().unwrap().unwrap()
        };
        assert_eq!(
            outcome(r1),
            CommitOutcome {
                stored: 2,
                duplicates: 2
            }
        );
        assert_eq!(
            outcome(r2),
            CommitOutcome {
                stored: 1,
                duplicates: 2
            }
        );
        assert_eq!(
            outcome(r3),
            CommitOutcome {
                stored: 1,
                duplicates: 0
            }
        );
        assert_eq!(
            sink.commits.lock().unwrap().len(),
            1,
            "one sink commit for the group"
        );
        assert_eq!(sink.stored_through("a").unwrap(), 5);
        assert_eq!(metrics.duplicates.get(), 4);
    }

    #[test]
    fn after_a_failed_commit_later_batches_of_that_stream_are_refused() {
        let sink = Arc::new(MemorySink::default());
        let metrics = Metrics::new();
        let failed = Arc::new(AtomicBool::new(false));
        let other = Arc::new(AtomicBool::new(false));
        sink.fail_next.store(true, Ordering::SeqCst);
        let (s1, r1) = submission("a", &[1, 2], &failed);
        commit_group(sink.as_ref(), &metrics, vec![s1]);
        assert!(matches!(
            r1.blocking_recv().unwrap(),
            Err(CommitError::Sink(_))
        ));
        let (s2, r2) = submission("a", &[3], &failed);
        let (s3, r3) = submission("b", &[1], &other);
        commit_group(sink.as_ref(), &metrics, vec![s2, s3]);
        assert!(matches!(
            r2.blocking_recv().unwrap(),
            Err(CommitError::EarlierFailed)
        ));
        assert!(r3.blocking_recv().unwrap().is_ok());
        assert_eq!(
            sink.stored_through("a").unwrap(),
            0,
            "seq 3 must not skip over 1 and 2"
        );
    }
}
