//! Replaying a candump log with its recorded timing.
//!
//! [`schedule`] turns log entries into "due at offset X after the start"
//! without waiting; [`BlockingReplay`] sleeps the thread until each is due and
//! [`ReplayStream`] (feature `tokio`) does the same with tokio timers. Offsets
//! are measured from the start of the replay, not from the previous frame, so
//! sleeping overhead does not accumulate into drift.

use std::time::{Duration, Instant};

use crate::candump::LogEntry;

/// How fast to replay.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Speed {
    /// Recorded timing divided by this factor: 1.0 is real time, 10.0 ten
    /// times faster. Zero, negative or non-finite factors behave as `Max`.
    Factor(f64),
    /// No waiting at all.
    Max,
}

impl Speed {
    fn scale(self, d: Duration) -> Option<Duration> {
        match self {
            Speed::Factor(f) if f.is_finite() && f > 0.0 => {
                Some(Duration::from_secs_f64((d.as_secs_f64() / f).min(1.0e12)))
            }
            _ => None,
        }
    }
}

/// Iterator adapter yielding `(offset from replay start, entry)`.
pub struct Schedule<I> {
    entries: I,
    speed: Speed,
    first: Option<Duration>,
    last: Duration,
}

/// Attaches due offsets to log entries. Timestamps that go backwards (a
/// clock step in the recording) are due immediately after the previous
/// entry rather than in the past. Errors pass through unchanged.
pub fn schedule<I, E>(entries: I, speed: Speed) -> Schedule<I::IntoIter>
where
    I: IntoIterator<Item = Result<LogEntry, E>>,
{
    Schedule {
        entries: entries.into_iter(),
        speed,
        first: None,
        last: Duration::ZERO,
    }
}

impl<I, E> Iterator for Schedule<I>
where
    I: Iterator<Item = Result<LogEntry, E>>,
{
    type Item = Result<(Duration, LogEntry), E>;

    fn next(&mut self) -> Option<Self::Item> {
        let entry = match self.entries.next()? {
            Ok(e) => e,
            Err(e) => return Some(Err(e)),
        };
        let t = entry.timestamp.as_duration();
        let first = *self.first.get_or_insert(t);
        let offset = match self.speed.scale(t.saturating_sub(first)) {
            Some(o) => o.max(self.last),
            None => Duration::ZERO,
        };
        self.last = offset;
        Some(Ok((offset, entry)))
    }
}

/// Sleeps the current thread until `start + offset` (returns at once if
/// that moment has passed).
pub fn sleep_until(start: Instant, offset: Duration) {
    let due = start + offset;
    let now = Instant::now();
    if due > now {
        std::thread::sleep(due - now);
    }
}

/// Blocking replay: each `next()` returns when the entry is due.
pub struct BlockingReplay<I> {
    schedule: Schedule<I>,
    start: Option<Instant>,
}

impl<I, E> BlockingReplay<I>
where
    I: Iterator<Item = Result<LogEntry, E>>,
{
    pub fn new(
        entries: impl IntoIterator<IntoIter = I, Item = Result<LogEntry, E>>,
        speed: Speed,
    ) -> Self {
        Self {
            schedule: schedule(entries, speed),
            start: None,
        }
    }
}

impl<I, E> Iterator for BlockingReplay<I>
where
    I: Iterator<Item = Result<LogEntry, E>>,
{
    type Item = Result<LogEntry, E>;

    fn next(&mut self) -> Option<Self::Item> {
        let (offset, entry) = match self.schedule.next()? {
            Ok(x) => x,
            Err(e) => return Some(Err(e)),
        };
        let start = *self.start.get_or_insert_with(Instant::now);
        sleep_until(start, offset);
        Some(Ok(entry))
    }
}

#[cfg(feature = "tokio")]
pub use stream::ReplayStream;

#[cfg(feature = "tokio")]
mod stream {
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use futures_core::Stream;
    use tokio::time::{Instant, Sleep};

    use super::{schedule, Schedule, Speed};
    use crate::candump::LogEntry;

    /// Async replay as a [`Stream`]: each item is yielded when due, using
    /// tokio's timer (so it needs a tokio runtime with time enabled). The
    /// wrapped iterator is polled inline; a file-backed reader blocks briefly
    /// per line, which is fine for replay but worth knowing.
    pub struct ReplayStream<I> {
        schedule: Schedule<I>,
        start: Option<Instant>,
        pending: Option<LogEntry>,
        /// One timer reused for every frame instead of a new one each time.
        sleep: Option<Pin<Box<Sleep>>>,
        waiting: bool,
    }

    impl<I, E> ReplayStream<I>
    where
        I: Iterator<Item = Result<LogEntry, E>>,
    {
        pub fn new(
            entries: impl IntoIterator<IntoIter = I, Item = Result<LogEntry, E>>,
            speed: Speed,
        ) -> Self {
            Self {
                schedule: schedule(entries, speed),
                start: None,
                pending: None,
                sleep: None,
                waiting: false,
            }
        }
    }

    impl<I, E> Stream for ReplayStream<I>
    where
        I: Iterator<Item = Result<LogEntry, E>> + Unpin,
    {
        type Item = Result<LogEntry, E>;

        fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            let this = self.get_mut();
            if this.waiting {
                if let Some(sleep) = this.sleep.as_mut() {
                    if sleep.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                }
                this.waiting = false;
                return Poll::Ready(this.pending.take().map(Ok));
            }
            let (offset, entry) = match this.schedule.next() {
                None => return Poll::Ready(None),
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                Some(Ok(x)) => x,
            };
            let start = *this.start.get_or_insert_with(Instant::now);
            let due = start + offset;
            if due <= Instant::now() {
                return Poll::Ready(Some(Ok(entry)));
            }
            match this.sleep.as_mut() {
                Some(s) => s.as_mut().reset(due),
                None => this.sleep = Some(Box::pin(tokio::time::sleep_until(due))),
            }
            this.pending = Some(entry);
            this.waiting = true;
            // Poll the timer now so it registers the waker.
            Pin::new(this).poll_next(cx)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::candump::parse_line;

    fn log(times: &[&str]) -> Vec<Result<LogEntry, ()>> {
        times
            .iter()
            .map(|t| Ok(parse_line(&format!("({t}) can0 123#00")).unwrap()))
            .collect()
    }

    #[test]
    fn offsets_scale_with_speed_and_never_go_back() {
        let entries = log(&["10.000000", "10.500000", "10.250000", "12.000000"]);
        let offs: Vec<Duration> = schedule(entries.clone(), Speed::Factor(2.0))
            .map(|r| r.unwrap().0)
            .collect();
        assert_eq!(
            offs,
            vec![
                Duration::ZERO,
                Duration::from_millis(250),
                Duration::from_millis(250),
                Duration::from_millis(1000)
            ]
        );
        let max: Vec<Duration> = schedule(entries, Speed::Max)
            .map(|r| r.unwrap().0)
            .collect();
        assert!(max.iter().all(|d| d.is_zero()));
    }

    #[test]
    fn blocking_replay_waits() {
        let entries = log(&["1.000000", "1.040000"]);
        let t = Instant::now();
        assert_eq!(BlockingReplay::new(entries, Speed::Factor(1.0)).count(), 2);
        assert!(t.elapsed() >= Duration::from_millis(40));
    }
}
