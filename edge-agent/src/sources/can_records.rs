//! CAN frame → record mapping shared by the SocketCAN source (`can.rs`) and
//! the candump replay source (`candump_replay.rs`), so a replayed log and a
//! live bus produce identical records.
//!
//! One record per frame:
//!
//! * **decoded frame** (its id is in a DBC): `source` = interface (or the
//!   replay's source name), `device_id` = the DBC message name, signals with
//!   unit and value-table label, after per-signal reduction. The message name
//!   is the device id because a CAN bus has no device addresses the cloud
//!   could use, while the message is what a DBC author names after the ECU
//!   function ("ECM_EngineData"), and queries by device then select one
//!   message's time series. A frame whose signals were all reduced away
//!   produces no record.
//! * **unknown frame** (no DBC entry), with `unknownFrames: raw`: a raw record,
//!   `device_id` = the id in hex (`0x123`, or `0x1ABCDEF0` for extended ids),
//!   content type [`CAN_FRAME_CONTENT_TYPE`] (or [`CANFD_FRAME_CONTENT_TYPE`]
//!   for CAN FD), data = the SocketCAN `can_id` word as 4 bytes big-endian
//!   (bit 31, `CAN_EFF_FLAG`, set for a 29-bit id) followed by the payload.
//!   With `unknownFrames: drop` it is dropped and counted.
//! * **short frame** (in a DBC, but shorter than its message needs): treated
//!   like an unknown frame (raw or dropped) and counted as a decode error, so
//!   the bytes are not lost when a DBC is out of date.
//! * remote frames carry no data and error frames are bus state, not
//!   telemetry: both are counted, never recorded (error frames by class).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use edgefleet_buffer::{AppendBatch, BufferError, Outcome};
use edgefleet_can::{
    CanFrame, DecodeError, DecodedFrame, Decoder, ReduceConfig, ReduceRule, Reducer, SignalValue,
};
use edgefleet_config::{Reduction, ReductionRule, UnknownFrames};
use edgefleet_proto::{EncodedRecord, RecordWriter, SignalValue as WireValue};

use crate::metrics::Metrics;

/// Content type of a raw classical CAN frame record.
pub const CAN_FRAME_CONTENT_TYPE: &str = "application/x-can-frame";
/// Content type of a raw CAN FD frame record (same layout, payload up to 64 bytes).
pub const CANFD_FRAME_CONTENT_TYPE: &str = "application/x-canfd-frame";

/// SocketCAN's flag for a 29-bit identifier in the `can_id` word.
const CAN_EFF_FLAG: u32 = 0x8000_0000;

/// SocketCAN error classes (the `can_id` bits of an error frame,
/// `linux/can/error.h`) and the metric label each is counted under.
pub const ERROR_CLASSES: [(u32, &str); 10] = [
    (0x001, "tx_timeout"),
    (0x002, "lost_arbitration"),
    (0x004, "controller"),
    (0x008, "protocol_violation"),
    (0x010, "transceiver"),
    (0x020, "no_ack"),
    (0x040, "bus_off"),
    (0x080, "bus_error"),
    (0x100, "restarted"),
    (0x200, "error_counters"),
];

/// Bus-off, one of the classes above: logged as well as counted.
pub const CAN_ERR_BUSOFF: u32 = 0x040;

/// What became of one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameOutcome {
    /// Decoded; a record was produced.
    Decoded,
    /// Decoded, but reduction kept none of its signals: no record.
    ReducedAway,
    /// No DBC entry; forwarded as a raw record.
    UnknownRaw,
    /// No DBC entry; dropped per `unknownFrames: drop`.
    UnknownDropped,
    /// Shorter than its DBC message; forwarded raw (`dropped` false) or dropped.
    Short {
        dropped: bool,
    },
    Remote,
    /// Error frame with its class bits.
    Error(u32),
}

/// Per-batch counts, pushed to the metrics once per batch rather than per
/// frame (each metric update hashes its label set).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tally {
    pub decoded: u64,
    pub reduced_away: u64,
    pub unknown_raw: u64,
    pub unknown_dropped: u64,
    pub short_raw: u64,
    pub short_dropped: u64,
    pub remote: u64,
    pub errors: [u64; ERROR_CLASSES.len()],
}

impl Tally {
    pub fn add(&mut self, outcome: FrameOutcome) {
        match outcome {
            FrameOutcome::Decoded => self.decoded += 1,
            FrameOutcome::ReducedAway => self.reduced_away += 1,
            FrameOutcome::UnknownRaw => self.unknown_raw += 1,
            FrameOutcome::UnknownDropped => self.unknown_dropped += 1,
            FrameOutcome::Short { dropped: false } => self.short_raw += 1,
            FrameOutcome::Short { dropped: true } => self.short_dropped += 1,
            FrameOutcome::Remote => self.remote += 1,
            FrameOutcome::Error(class) => {
                for (i, (bit, _)) in ERROR_CLASSES.iter().enumerate() {
                    if class & bit != 0 {
                        self.errors[i] += 1;
                    }
                }
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == Tally::default()
    }

    /// Adds the counts to the metrics and resets them.
    pub fn flush(&mut self, metrics: &Metrics, source: &str) {
        let kinds = [
            ("decoded", self.decoded),
            ("reduced_away", self.reduced_away),
            ("unknown", self.unknown_raw + self.unknown_dropped),
            ("short", self.short_raw + self.short_dropped),
            ("remote", self.remote),
        ];
        for (kind, n) in kinds {
            if n > 0 {
                metrics.can_frames(source, kind, n);
            }
        }
        for (i, n) in self.errors.iter().enumerate() {
            if *n > 0 {
                metrics.can_error_frames(source, ERROR_CLASSES[i].1, *n);
            }
        }
        if self.unknown_dropped > 0 {
            metrics.dropped("can_unknown_frame", self.unknown_dropped);
        }
        if self.short_dropped > 0 {
            metrics.dropped("can_short_frame", self.short_dropped);
        }
        for _ in 0..self.short_raw + self.short_dropped {
            metrics.decode_error(source);
        }
        *self = Tally::default();
    }
}

/// Maps the config's reduction rules onto the decoder library's.
///
/// `signals` keys are either `Message.Signal` or a bare signal name; a bare
/// name applies to that signal in every message of `decoder` that has it
/// (names unknown to the DBC are returned so the caller can warn about
/// typos). `Message.Signal` keys win over bare names.
pub fn reduce_config(reduction: &Reduction, decoder: &Decoder) -> (ReduceConfig, Vec<String>) {
    let mut config = ReduceConfig {
        default: rule(&reduction.default),
        ..Default::default()
    };
    let mut unknown = Vec::new();
    let (dotted, bare): (BTreeMap<_, _>, BTreeMap<_, _>) =
        reduction.signals.iter().partition(|(k, _)| k.contains('.'));
    for (name, r) in bare {
        let mut found = false;
        for m in decoder.messages() {
            if m.signal(name).is_some() {
                config
                    .signals
                    .insert(format!("{}.{}", m.name(), name), rule(r));
                found = true;
            }
        }
        if !found {
            unknown.push(name.clone());
        }
    }
    for (key, r) in dotted {
        let known = key
            .split_once('.')
            .and_then(|(m, s)| decoder.message_by_name(m)?.signal(s))
            .is_some();
        if !known {
            unknown.push(key.clone());
        }
        config.signals.insert(key.clone(), rule(r));
    }
    (config, unknown)
}

fn rule(r: &ReductionRule) -> ReduceRule {
    ReduceRule {
        // A deadband only means something when comparing with the last value.
        on_change: r.on_change || r.deadband.is_some(),
        deadband: r.deadband.unwrap_or(0.0).max(0.0),
        min_interval: Duration::from_millis(r.min_interval_ms.unwrap_or(0)),
        // The config has no heartbeat setting: a signal that never changes
        // is sent once (and again after a restart).
        max_interval: None,
    }
}

/// Turns frames into records for one source.
pub struct FrameMapper {
    source: String,
    decoder: Arc<Decoder>,
    reducer: Reducer,
    unknown: UnknownFrames,
    scratch: DecodedFrame,
    selected: Vec<usize>,
    writer: RecordWriter,
}

impl FrameMapper {
    pub fn new(
        source: impl Into<String>,
        decoder: Arc<Decoder>,
        reduction: ReduceConfig,
        unknown: UnknownFrames,
    ) -> Self {
        Self {
            source: source.into(),
            decoder,
            reducer: Reducer::new(reduction),
            unknown,
            scratch: DecodedFrame::default(),
            selected: Vec::new(),
            writer: RecordWriter::new(),
        }
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Forgets what was sent, so the next value of every signal is sent
    /// (after the bus was away, the cloud should get fresh values).
    pub fn reset_reduction(&mut self) {
        self.reducer.reset();
    }

    /// Maps one frame seen at `timestamp_ns` (since the Unix epoch), pushing
    /// at most one record onto `out`.
    pub fn map(
        &mut self,
        frame: &CanFrame,
        timestamp_ns: i64,
        out: &mut Vec<EncodedRecord>,
    ) -> FrameOutcome {
        match self.decoder.decode_into(frame, &mut self.scratch) {
            Ok(()) => {
                self.selected.clear();
                let t = Duration::from_nanos(timestamp_ns.max(0) as u64);
                self.reducer.filter(&self.scratch, t, &mut self.selected);
                if self.selected.is_empty() {
                    return FrameOutcome::ReducedAway;
                }
                for &i in &self.selected {
                    let s = &self.scratch.signals[i];
                    let value = match s.value {
                        SignalValue::Int(v) => WireValue::I64(v),
                        SignalValue::Float(v) => WireValue::F64(v),
                    };
                    self.writer.signal_with(
                        &s.name,
                        value,
                        &s.unit,
                        s.label.as_deref().unwrap_or_default(),
                    );
                }
                out.push(
                    self.writer
                        .finish(&self.source, &self.scratch.message, timestamp_ns),
                );
                FrameOutcome::Decoded
            }
            Err(DecodeError::NoDbcEntry { .. }) => match self.unknown {
                UnknownFrames::Drop => FrameOutcome::UnknownDropped,
                UnknownFrames::Raw => {
                    out.push(self.raw_record(frame, timestamp_ns));
                    FrameOutcome::UnknownRaw
                }
            },
            Err(DecodeError::ShortFrame { .. }) => match self.unknown {
                UnknownFrames::Drop => FrameOutcome::Short { dropped: true },
                UnknownFrames::Raw => {
                    out.push(self.raw_record(frame, timestamp_ns));
                    FrameOutcome::Short { dropped: false }
                }
            },
            Err(DecodeError::RemoteFrame { .. }) => FrameOutcome::Remote,
            Err(DecodeError::ErrorFrame { class }) => FrameOutcome::Error(class),
        }
    }

    fn raw_record(&self, frame: &CanFrame, timestamp_ns: i64) -> EncodedRecord {
        let content_type = if frame.is_fd() {
            CANFD_FRAME_CONTENT_TYPE
        } else {
            CAN_FRAME_CONTENT_TYPE
        };
        RecordWriter::raw(
            &self.source,
            &device_for_id(frame.id(), frame.is_extended()),
            timestamp_ns,
            &raw_frame_bytes(frame),
            content_type,
        )
    }
}

/// `0x123` for standard ids, `0x1ABCDEF0` (8 digits) for extended ones, as
/// candump writes them.
pub fn device_for_id(id: u32, extended: bool) -> String {
    if extended {
        format!("0x{id:08X}")
    } else {
        format!("0x{id:03X}")
    }
}

/// The raw record layout: `can_id` word (big-endian, `CAN_EFF_FLAG` for
/// extended ids) then the payload.
pub fn raw_frame_bytes(frame: &CanFrame) -> Vec<u8> {
    let word = frame.id() | if frame.is_extended() { CAN_EFF_FLAG } else { 0 };
    let mut data = Vec::with_capacity(4 + frame.len());
    data.extend_from_slice(&word.to_be_bytes());
    data.extend_from_slice(frame.data());
    data
}

/// Appends a source's records in one group. CAN has nobody upstream to
/// acknowledge to, so there is nothing to wait for beyond durability; with
/// the `Block` policy this simply waits for room. Returns false when the
/// buffer is closed (the agent is stopping).
pub async fn append(ctx: &super::SourceContext, name: &str, records: Vec<EncodedRecord>) -> bool {
    if records.is_empty() {
        return true;
    }
    let n = records.len() as u64;
    // Packed here, so the records' own allocations are freed on this
    // thread, which made them, rather than on the buffer's.
    let batch = AppendBatch::from(records);
    match ctx.buffer.append(batch).await {
        Ok(outcomes) => {
            let stored = outcomes
                .iter()
                .filter(|o| matches!(o, Outcome::Stored(_)))
                .count();
            ctx.metrics.records_in(name, stored as u64);
            true
        }
        Err(BufferError::Closed) => false,
        Err(e) => {
            // A bus cannot be asked to resend: the frames are lost. Count them.
            tracing::error!(source = %name, error = %e, records = n, "cannot buffer CAN records; dropping them");
            ctx.metrics.dropped("buffer_error", n);
            true
        }
    }
}

/// A CAN source's decoder and reduction. A DBC that does not load keeps the
/// source down (logged with file and line) until one of its files changes;
/// `None` means shutdown came first.
pub async fn decoder_and_reduction(
    ctx: &super::SourceContext,
    name: &str,
    dbc: &[String],
    reduction: &Reduction,
) -> Option<(Arc<Decoder>, ReduceConfig)> {
    let decoder = loop {
        match load_decoder(dbc.to_vec()).await {
            Ok(d) => break Arc::new(d),
            Err(e) => {
                tracing::error!(source = %name, error = %e, "cannot load the DBC files; the source stays down until they change");
                ctx.metrics.source_up(name, false);
                if !wait_for_change(dbc, &ctx.shutdown).await {
                    return None;
                }
            }
        }
    };
    let (reduction, unknown_keys) = reduce_config(reduction, &decoder);
    if !unknown_keys.is_empty() {
        tracing::warn!(source = %name, signals = ?unknown_keys, "reduction rules name signals that no DBC defines");
    }
    Some((decoder, reduction))
}

/// Loads a source's DBC files off the async runtime (they can be large).
/// The error names the file and line.
pub async fn load_decoder(paths: Vec<String>) -> Result<Decoder, String> {
    tokio::task::spawn_blocking(move || Decoder::from_files(&paths).map_err(|e| e.to_string()))
        .await
        .map_err(|e| format!("DBC loading task failed: {e}"))?
}

/// Waits until one of `paths` changes (modification time or presence), or
/// `shutdown` fires (returns false then). Used by a source whose DBC did not
/// load, so fixing the file brings it back without a restart.
pub async fn wait_for_change(
    paths: &[String],
    shutdown: &tokio_util::sync::CancellationToken,
) -> bool {
    let stamp = |paths: &[String]| -> Vec<Option<std::time::SystemTime>> {
        paths
            .iter()
            .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
            .collect()
    };
    let before = stamp(paths);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return false,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
        if stamp(paths) != before {
            return true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgefleet_proto::{record, signal, Record, Signal};

    const DBC: &str = r#"VERSION ""

NS_ :

BS_:

BU_: ECU

BO_ 256 Engine: 8 ECU
 SG_ Rpm : 0|16@1+ (0.25,0) [0|16383.75] "rpm" ECU
 SG_ Gear : 16|8@1+ (1,0) [0|5] "" ECU
 SG_ Temp : 24|8@1+ (1,-40) [-40|215] "degC" ECU

BO_ 2147484672 Body: 8 ECU
 SG_ Speed : 0|16@1+ (0.01,0) [0|655.35] "km/h" ECU
 SG_ Temp : 16|8@1+ (1,-40) [-40|215] "degC" ECU

VAL_ 256 Gear 0 "Park" 1 "Drive" ;
"#;

    fn decoder() -> Arc<Decoder> {
        Arc::new(Decoder::from_dbc_str("test.dbc", DBC).unwrap())
    }

    fn mapper(reduction: &Reduction, unknown: UnknownFrames) -> FrameMapper {
        let d = decoder();
        let (cfg, unknown_names) = reduce_config(reduction, &d);
        assert!(unknown_names.is_empty(), "{unknown_names:?}");
        FrameMapper::new("can0", d, cfg, unknown)
    }

    fn engine(rpm_raw: u16, gear: u8, temp_raw: u8) -> CanFrame {
        let r = rpm_raw.to_le_bytes();
        CanFrame::new(0x100, false, &[r[0], r[1], gear, temp_raw, 0, 0, 0, 0]).unwrap()
    }

    /// The records a mapper wrote, decoded to check them.
    fn decoded(out: &[EncodedRecord]) -> Vec<Record> {
        out.iter().map(EncodedRecord::to_record).collect()
    }

    fn signals(r: &Record) -> &[Signal] {
        match &r.value {
            Some(record::Value::Signals(s)) => &s.signals,
            other => panic!("not signals: {other:?}"),
        }
    }

    #[test]
    fn decoded_frame_becomes_one_record_with_units_and_labels() {
        let mut m = mapper(&Reduction::default(), UnknownFrames::Raw);
        let mut out = Vec::new();
        let outcome = m.map(&engine(8000, 1, 130), 1_700_000_000_123_000_000, &mut out);
        assert_eq!(outcome, FrameOutcome::Decoded);
        assert_eq!(out.len(), 1);
        let r = &decoded(&out)[0];
        assert_eq!(r.source, "can0");
        assert_eq!(r.device_id, "Engine");
        assert_eq!(r.timestamp_ns, 1_700_000_000_123_000_000);
        let s = signals(r);
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].name, "Rpm");
        assert_eq!(s[0].value, Some(signal::Value::F64(2000.0)));
        assert_eq!(s[0].unit, "rpm");
        assert_eq!(s[1].name, "Gear");
        assert_eq!(s[1].value, Some(signal::Value::I64(1)));
        assert_eq!(s[1].label, "Drive");
        assert_eq!(s[2].value, Some(signal::Value::I64(90)));
        assert_eq!(s[2].unit, "degC");
        assert_eq!(s[2].label, "");
    }

    #[test]
    fn unknown_frames_are_raw_or_dropped_and_always_counted() {
        let std_frame = CanFrame::new(0x7AB, false, &[1, 2, 3]).unwrap();
        let ext_frame = CanFrame::new(0x1234_5678, true, &[9]).unwrap();
        let fd_frame = CanFrame::new_fd(0x42, false, &[7; 12], true, false).unwrap();

        let mut raw = mapper(&Reduction::default(), UnknownFrames::Raw);
        let mut out = Vec::new();
        let mut tally = Tally::default();
        for f in [&std_frame, &ext_frame, &fd_frame] {
            tally.add(raw.map(f, 5, &mut out));
        }
        assert_eq!(tally.unknown_raw, 3);
        let out = decoded(&out);
        assert_eq!(out.len(), 3);
        let raw_of = |r: &Record| match &r.value {
            Some(record::Value::Raw(p)) => p.clone(),
            other => panic!("not raw: {other:?}"),
        };
        assert_eq!(out[0].device_id, "0x7AB");
        assert_eq!(raw_of(&out[0]).data, vec![0, 0, 0x07, 0xAB, 1, 2, 3]);
        assert_eq!(raw_of(&out[0]).content_type, CAN_FRAME_CONTENT_TYPE);
        assert_eq!(out[1].device_id, "0x12345678");
        assert_eq!(raw_of(&out[1]).data, vec![0x92, 0x34, 0x56, 0x78, 9]);
        assert_eq!(raw_of(&out[2]).content_type, CANFD_FRAME_CONTENT_TYPE);
        assert_eq!(raw_of(&out[2]).data.len(), 4 + 12);

        let mut drop = mapper(&Reduction::default(), UnknownFrames::Drop);
        let mut out = Vec::new();
        let mut tally = Tally::default();
        tally.add(drop.map(&std_frame, 5, &mut out));
        // Too short for Engine (needs 4 bytes): not decodable, so dropped too.
        tally.add(drop.map(&CanFrame::new(0x100, false, &[1]).unwrap(), 5, &mut out));
        assert!(out.is_empty());
        assert_eq!(tally.unknown_dropped, 1);
        assert_eq!(tally.short_dropped, 1);
    }

    #[test]
    fn remote_and_error_frames_are_counted_not_recorded() {
        let mut m = mapper(&Reduction::default(), UnknownFrames::Raw);
        let mut out = Vec::new();
        let mut tally = Tally::default();
        tally.add(m.map(&CanFrame::new_remote(0x100, false, 8).unwrap(), 1, &mut out));
        // Bus-off and controller problem in one error frame.
        tally.add(m.map(&CanFrame::new_error(0x044, &[0; 8]).unwrap(), 1, &mut out));
        tally.add(m.map(&CanFrame::new_error(0x020, &[0; 8]).unwrap(), 1, &mut out));
        assert!(out.is_empty());
        assert_eq!(tally.remote, 1);
        let count = |label: &str| {
            let i = ERROR_CLASSES.iter().position(|(_, l)| *l == label).unwrap();
            tally.errors[i]
        };
        assert_eq!(count("bus_off"), 1);
        assert_eq!(count("controller"), 1);
        assert_eq!(count("no_ack"), 1);
        assert_eq!(count("protocol_violation"), 0);
    }

    #[test]
    fn reduction_rules_from_config_are_applied_per_signal() {
        let mut reduction = Reduction {
            default: ReductionRule {
                on_change: true,
                ..Default::default()
            },
            ..Default::default()
        };
        // Bare name: Temp in both messages; dotted: only Engine.Rpm.
        reduction.signals.insert(
            "Temp".into(),
            ReductionRule {
                deadband: Some(2.0),
                ..Default::default()
            },
        );
        reduction.signals.insert(
            "Engine.Rpm".into(),
            ReductionRule {
                min_interval_ms: Some(100),
                ..Default::default()
            },
        );
        let mut m = mapper(&reduction, UnknownFrames::Raw);
        let ms = 1_000_000i64;
        let mut out = Vec::new();
        let names = |out: &Vec<EncodedRecord>| -> Vec<String> {
            out.last()
                .map(|r| {
                    signals(&r.to_record())
                        .iter()
                        .map(|s| s.name.clone())
                        .collect()
                })
                .unwrap_or_default()
        };
        // First frame: everything.
        assert_eq!(
            m.map(&engine(100, 0, 50), 0, &mut out),
            FrameOutcome::Decoded
        );
        assert_eq!(names(&out), ["Rpm", "Gear", "Temp"]);
        // Nothing changed: the whole frame is reduced away, no record.
        assert_eq!(
            m.map(&engine(100, 0, 50), ms, &mut out),
            FrameOutcome::ReducedAway
        );
        assert_eq!(out.len(), 1);
        // Temp moved by 2 (not more than the deadband), Rpm changed but is
        // rate limited to 100 ms, Gear changed (default on-change rule).
        m.map(&engine(200, 1, 52), 2 * ms, &mut out);
        assert_eq!(names(&out), ["Gear"]);
        // Past 100 ms the held-back Rpm change goes; Temp now moved by 3.
        m.map(&engine(200, 1, 53), 150 * ms, &mut out);
        assert_eq!(names(&out), ["Rpm", "Temp"]);
        assert_eq!(out.len(), 3);
    }

    #[test]
    fn misspelt_reduction_keys_are_reported() {
        let mut reduction = Reduction::default();
        for key in ["Tmep", "Engine.Nope", "Nope.Rpm", "Speed"] {
            reduction
                .signals
                .insert(key.into(), ReductionRule::default());
        }
        let (cfg, unknown) = reduce_config(&reduction, &decoder());
        assert_eq!(unknown, ["Tmep", "Engine.Nope", "Nope.Rpm"]);
        assert!(cfg.signals.contains_key("Body.Speed"));
    }

    #[test]
    fn default_reduction_sends_every_sample() {
        let mut m = mapper(&Reduction::default(), UnknownFrames::Raw);
        let mut out = Vec::new();
        for t in 0..5 {
            m.map(&engine(100, 0, 50), t, &mut out);
        }
        assert_eq!(out.len(), 5);
    }
}
