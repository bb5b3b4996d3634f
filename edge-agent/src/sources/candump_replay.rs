//! candump replay source: plays a `candump -L` log through the same
//! decode → reduce → record path as a live CAN interface, for demos, tests
//! and back-filling.
//!
//! * `speed: 1` replays with the recorded timing, `10` ten times faster,
//!   `0` as fast as the buffer takes it.
//! * Timestamps: at `speed: 0` (back-filling) records keep the log's
//!   timestamps, and each further pass of a looping replay is shifted by the
//!   log's span so time keeps increasing. A paced replay stands in for a live
//!   bus, so its records carry the time the frame was replayed.
//! * `source` names the records' source; without it each frame's interface
//!   name from the log is used (a log may hold several interfaces).
//! * Malformed log lines are counted as decode errors and skipped. A DBC that
//!   does not load, or a missing log, keeps the source down (logged with the
//!   file and line) until the file changes; other sources are unaffected.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::sync::Arc;
use std::time::Duration;

use edgefleet_can::candump::{CandumpError, CandumpReader, LogEntry};
use edgefleet_can::replay::{ReplayStream, Speed};
use edgefleet_can::{Decoder, ReduceConfig};
use edgefleet_config::CandumpReplaySource as ReplayConfig;
use edgefleet_proto::EncodedRecord;
use futures::future::BoxFuture;
use futures::StreamExt;

use super::can_records::{self, FrameMapper, Tally};
use super::{Source, SourceContext, SourceError};

/// Frames taken into one append at most.
const MAX_FRAMES_PER_APPEND: usize = 2048;
/// How long a batch waits for more frames before it is appended. Short, so
/// a paced replay stays close to real time; the buffer's group commit then
/// shares one fsync among every source's appends.
const BATCH_WINDOW: Duration = Duration::from_millis(5);
/// Malformed lines logged per pass (all are counted).
const MAX_LOGGED_BAD_LINES: u32 = 10;

pub struct CandumpReplaySource {
    config: ReplayConfig,
    name: String,
}

impl CandumpReplaySource {
    pub fn new(config: ReplayConfig) -> Self {
        let name = config
            .source
            .clone()
            .unwrap_or_else(|| format!("candump:{}", config.file));
        Self { config, name }
    }
}

impl Source for CandumpReplaySource {
    fn name(&self) -> &str {
        &self.name
    }

    fn run(self: Box<Self>, ctx: SourceContext) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(run(self.config, self.name, ctx))
    }
}

async fn run(config: ReplayConfig, name: String, ctx: SourceContext) -> Result<(), SourceError> {
    let Some((decoder, reduction)) =
        can_records::decoder_and_reduction(&ctx, &name, &config.dbc, &config.reduction).await
    else {
        return Ok(());
    };
    let mut replay = Replay {
        config: &config,
        name: &name,
        ctx: &ctx,
        decoder,
        reduction,
        mappers: HashMap::new(),
        tally: Tally::default(),
        shift_ns: 0,
    };
    let mut pass = 0u64;
    loop {
        let file = match File::open(&config.file) {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(source = %name, file = %config.file, error = %e, "cannot open the candump log; the source stays down until it appears");
                ctx.metrics.source_up(&name, false);
                if !can_records::wait_for_change(std::slice::from_ref(&config.file), &ctx.shutdown)
                    .await
                {
                    return Ok(());
                }
                continue;
            }
        };
        ctx.metrics.source_up(&name, true);
        let span = match replay.pass(BufReader::new(file)).await {
            PassEnd::Finished(span) => span,
            PassEnd::Cancelled => break,
        };
        pass += 1;
        if !config.repeat {
            tracing::info!(source = %name, file = %config.file, "candump replay finished");
            break;
        }
        // Next pass starts one millisecond after this one ended.
        replay.shift_ns += span.unwrap_or(0) + 1_000_000;
        tracing::debug!(source = %name, pass, "candump replay looping");
    }
    ctx.metrics.source_up(&name, false);
    // The trait's contract: return on shutdown. A finished replay just idles.
    ctx.shutdown.cancelled().await;
    Ok(())
}

enum PassEnd {
    /// The log ended; the span between its first and last timestamp (ns).
    Finished(Option<i64>),
    Cancelled,
}

struct Replay<'a> {
    config: &'a ReplayConfig,
    name: &'a str,
    ctx: &'a SourceContext,
    decoder: Arc<Decoder>,
    reduction: ReduceConfig,
    /// One mapper (and so one reduction state) per record source name.
    mappers: HashMap<Arc<str>, FrameMapper>,
    tally: Tally,
    /// Added to recorded timestamps (looping back-fill).
    shift_ns: i64,
}

impl Replay<'_> {
    async fn pass(&mut self, reader: BufReader<File>) -> PassEnd {
        let speed = if self.config.speed > 0.0 && self.config.speed.is_finite() {
            Speed::Factor(self.config.speed)
        } else {
            Speed::Max
        };
        let paced = matches!(speed, Speed::Factor(_));
        let mut bad_lines = 0u32;
        let mut stream = ReplayStream::new(CandumpReader::new(reader), speed);
        let mut first_last: Option<(i64, i64)> = None;
        let mut batch: Vec<(i64, LogEntry)> = Vec::with_capacity(MAX_FRAMES_PER_APPEND);
        let mut ended = false;
        while !ended {
            let item = tokio::select! {
                _ = self.ctx.shutdown.cancelled() => return PassEnd::Cancelled,
                item = stream.next() => item,
            };
            let mut take = |item: Option<Result<LogEntry, CandumpError>>,
                            batch: &mut Vec<(i64, LogEntry)>|
             -> bool {
                match item {
                    None => false,
                    Some(Ok(entry)) => {
                        let recorded = entry.timestamp.as_duration().as_nanos() as i64;
                        first_last = Some(match first_last {
                            None => (recorded, recorded),
                            Some((f, _)) => (f, recorded),
                        });
                        let t = if paced {
                            crate::now_ns()
                        } else {
                            recorded + self.shift_ns
                        };
                        batch.push((t, entry));
                        true
                    }
                    Some(Err(e)) => {
                        bad_lines += 1;
                        self.ctx.metrics.decode_error(self.name);
                        if bad_lines <= MAX_LOGGED_BAD_LINES {
                            tracing::warn!(source = %self.name, file = %self.config.file, error = %e, "skipping a malformed candump line");
                        }
                        true
                    }
                }
            };
            if !take(item, &mut batch) {
                break;
            }
            let deadline = tokio::time::Instant::now() + BATCH_WINDOW;
            while batch.len() < MAX_FRAMES_PER_APPEND {
                let item = tokio::select! {
                    biased;
                    item = stream.next() => item,
                    _ = tokio::time::sleep_until(deadline) => break,
                };
                if !take(item, &mut batch) {
                    ended = true;
                    break;
                }
            }
            if !self.append(&mut batch).await {
                return PassEnd::Cancelled;
            }
        }
        PassEnd::Finished(first_last.map(|(f, l)| l - f))
    }

    /// Maps and appends a batch; false if the buffer is gone.
    async fn append(&mut self, batch: &mut Vec<(i64, LogEntry)>) -> bool {
        let mut records: Vec<EncodedRecord> = Vec::with_capacity(batch.len());
        for (t, entry) in batch.drain(..) {
            let source: Arc<str> = match &self.config.source {
                Some(s) => Arc::from(s.as_str()),
                None => entry.iface.clone(),
            };
            let mapper = self.mappers.entry(source.clone()).or_insert_with(|| {
                FrameMapper::new(
                    source.to_string(),
                    self.decoder.clone(),
                    self.reduction.clone(),
                    self.config.unknown_frames,
                )
            });
            let outcome = mapper.map(&entry.frame, t, &mut records);
            self.tally.add(outcome);
        }
        self.tally.flush(&self.ctx.metrics, self.name);
        can_records::append(self.ctx, self.name, records).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use edgefleet_buffer::{Buffer, BufferOptions};
    use edgefleet_config::UnknownFrames;
    use edgefleet_proto::Record;
    use edgefleet_proto::{record, signal};
    use tokio_util::sync::CancellationToken;

    const DBC: &str = "VERSION \"\"\n\nNS_ :\n\nBS_:\n\nBU_: ECU\n\n\
        BO_ 256 Engine: 8 ECU\n SG_ Rpm : 0|16@1+ (0.25,0) [0|16383.75] \"rpm\" ECU\n \
        SG_ Gear : 16|8@1+ (1,0) [0|5] \"\" ECU\n\n\
        VAL_ 256 Gear 0 \"Park\" 1 \"Drive\" ;\n";

    /// Three Engine frames on can0, one on can1, an unknown id, a remote
    /// frame and a malformed line.
    const LOG: &str = "\
(1700000000.000000) can0 100#401F000000000000
(1700000000.100000) can0 100#803E010000000000
(1700000000.150000) can0 7AB#DEADBEEF
(1700000000.200000) can0 100#803E010000000000
(1700000000.250000) can0 100#R
this is not candump
(1700000000.300000) can1 100#0000000000000000
";

    struct Setup {
        _dir: tempfile::TempDir,
        buffer: Buffer,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
        config: ReplayConfig,
    }

    fn setup(speed: f64, repeat: bool, source: Option<&str>) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let dbc = dir.path().join("engine.dbc");
        std::fs::write(&dbc, DBC).unwrap();
        let log = dir.path().join("bus.log");
        std::fs::write(&log, LOG).unwrap();
        let (buffer, _) = Buffer::open(BufferOptions::new(dir.path().join("data"))).unwrap();
        let config = ReplayConfig {
            file: log.display().to_string(),
            source: source.map(str::to_string),
            dbc: vec![dbc.display().to_string()],
            speed,
            repeat,
            unknown_frames: UnknownFrames::Raw,
            reduction: Default::default(),
        };
        Setup {
            _dir: dir,
            buffer,
            metrics: Arc::new(Metrics::new()),
            shutdown: CancellationToken::new(),
            config,
        }
    }

    /// Runs the source until `n` records are durable, then stops it.
    async fn replay(s: &Setup, n: u64) -> Vec<Record> {
        let source = Box::new(CandumpReplaySource::new(s.config.clone()));
        let ctx = SourceContext {
            buffer: s.buffer.clone(),
            metrics: s.metrics.clone(),
            shutdown: s.shutdown.clone(),
        };
        let task = tokio::spawn(source.run(ctx));
        tokio::time::timeout(Duration::from_secs(20), s.buffer.wait_for(n))
            .await
            .expect("records did not arrive in time")
            .unwrap();
        s.shutdown.cancel();
        task.await.unwrap().unwrap();
        s.buffer.read_from(1, 100_000, usize::MAX).unwrap()
    }

    /// (name, value, label) of one signal, or (content type, None, hex) of raw bytes.
    type SignalSummary = (String, Option<signal::Value>, String);

    fn summary(r: &Record) -> (String, String, i64, Vec<SignalSummary>) {
        let signals = match &r.value {
            Some(record::Value::Signals(s)) => s
                .signals
                .iter()
                .map(|s| (s.name.clone(), s.value.clone(), s.label.clone()))
                .collect(),
            Some(record::Value::Raw(raw)) => vec![(
                raw.content_type.clone(),
                None,
                raw.data.iter().map(|b| format!("{b:02x}")).collect(),
            )],
            None => vec![],
        };
        (
            r.source.clone(),
            r.device_id.clone(),
            r.timestamp_ns,
            signals,
        )
    }

    #[tokio::test]
    async fn replay_as_fast_as_possible_keeps_log_time_and_interfaces() {
        let s = setup(0.0, false, None);
        let records = replay(&s, 5).await;
        let got: Vec<_> = records.iter().map(summary).collect();
        let t0 = 1_700_000_000_000_000_000i64;
        let ms = 1_000_000i64;
        let engine = |rpm: f64, gear: i64, label: &str| {
            vec![
                (
                    "Rpm".to_string(),
                    Some(signal::Value::F64(rpm)),
                    String::new(),
                ),
                (
                    "Gear".to_string(),
                    Some(signal::Value::I64(gear)),
                    label.to_string(),
                ),
            ]
        };
        let raw = vec![(
            "application/x-can-frame".to_string(),
            None,
            "000007abdeadbeef".to_string(),
        )];
        let want = vec![
            (
                "can0".to_string(),
                "Engine".to_string(),
                t0,
                engine(2000.0, 0, "Park"),
            ),
            (
                "can0".into(),
                "Engine".into(),
                t0 + 100 * ms,
                engine(4000.0, 1, "Drive"),
            ),
            ("can0".into(), "0x7AB".into(), t0 + 150 * ms, raw),
            (
                "can0".into(),
                "Engine".into(),
                t0 + 200 * ms,
                engine(4000.0, 1, "Drive"),
            ),
            (
                "can1".into(),
                "Engine".into(),
                t0 + 300 * ms,
                engine(0.0, 0, "Park"),
            ),
        ];
        assert_eq!(got, want);
        let metrics = s.metrics.encode();
        for line in [
            "edge_decode_errors_total{source=\"candump:",
            "edge_can_frames_total{source=\"candump:",
        ] {
            assert!(metrics.contains(line), "{line} missing in\n{metrics}");
        }
        assert!(metrics.contains("kind=\"remote\"} 1"), "{metrics}");
        assert!(metrics.contains("kind=\"unknown\"} 1"), "{metrics}");
        assert!(metrics.contains("kind=\"decoded\"} 4"), "{metrics}");
    }

    #[tokio::test]
    async fn looping_replay_shifts_each_pass_past_the_previous() {
        let s = setup(0.0, true, Some("replayed"));
        let records = replay(&s, 15).await;
        assert!(records.iter().all(|r| r.source == "replayed"));
        // Five records per pass; the log spans 300 ms, passes are 1 ms apart.
        let shift = 301_000_000i64;
        for i in 0..10 {
            assert_eq!(
                records[i + 5].timestamp_ns - records[i].timestamp_ns,
                shift,
                "record {i}"
            );
            assert_eq!(records[i + 5].device_id, records[i].device_id);
        }
    }

    #[tokio::test]
    async fn paced_replay_takes_the_recorded_time_and_stamps_replay_time() {
        // The log spans 300 ms; at double speed that is 150 ms.
        let s = setup(2.0, false, None);
        let before = crate::now_ns();
        let started = std::time::Instant::now();
        let records = replay(&s, 5).await;
        let elapsed = started.elapsed();
        assert!(
            elapsed >= Duration::from_millis(140),
            "replayed in {elapsed:?}"
        );
        assert!(elapsed < Duration::from_secs(5), "replayed in {elapsed:?}");
        let first = records.first().unwrap().timestamp_ns;
        let last = records.last().unwrap().timestamp_ns;
        assert!(first >= before, "paced records carry replay time");
        assert!(
            last - first >= 140_000_000,
            "spacing kept: {}",
            last - first
        );
    }

    #[tokio::test]
    async fn bad_dbc_keeps_the_source_down_until_the_file_is_fixed() {
        let s = setup(0.0, false, None);
        std::fs::write(&s.config.dbc[0], "VERSION \"\"\n\nBO_ oops\n").unwrap();
        let source = Box::new(CandumpReplaySource::new(s.config.clone()));
        let ctx = SourceContext {
            buffer: s.buffer.clone(),
            metrics: s.metrics.clone(),
            shutdown: s.shutdown.clone(),
        };
        let task = tokio::spawn(source.run(ctx));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!task.is_finished(), "a bad DBC must not end the source");
        assert_eq!(s.buffer.stats().appended_total, 0);
        // Fixing the file brings the source up without a restart.
        std::fs::write(&s.config.dbc[0], DBC).unwrap();
        tokio::time::timeout(Duration::from_secs(10), s.buffer.wait_for(5))
            .await
            .expect("the source did not recover after the DBC was fixed")
            .unwrap();
        s.shutdown.cancel();
        task.await.unwrap().unwrap();
    }
}
