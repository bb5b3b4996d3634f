//! A bus simulator: every DBC message at its own rate, every signal following
//! a pattern, encoded with the real encoder. Deterministic for a given DBC,
//! configuration and seed (it uses its own small PRNG rather than a crate
//! whose stream might change between versions).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::f64::consts::TAU;
use std::io::{self, Write};
use std::time::{Duration, Instant};

use crate::candump::{CandumpWriter, Timestamp};
use crate::frame::CanFrame;
use crate::plan::{MessagePlan, SignalPlan, SignalValue, ValueKind};
use crate::Decoder;

/// How one signal's physical value evolves. Ranges are the signal's DBC
/// `[min|max]` (or its raw range when the DBC gives `[0|0]`).
#[derive(Debug, Clone, PartialEq)]
pub enum Pattern {
    Constant(f64),
    /// Sine across the range; `phase` is a fraction of the period (0..1).
    Sine {
        period: Duration,
        phase: f64,
    },
    /// Linear from min to max over `period`, then back to min.
    Ramp {
        period: Duration,
    },
    /// Each emission moves by a random step of at most `step` times the
    /// range, staying inside the range.
    RandomWalk {
        step: f64,
    },
    /// Steps through `values`, holding each for `dwell` (zero: one value
    /// per emission).
    Cycle {
        values: Vec<f64>,
        dwell: Duration,
    },
}

/// Simulator settings. Signal patterns are looked up as `"Message.Signal"`,
/// then `"Signal"`; anything not configured gets a default: multiplexors cycle
/// through the values their message uses (one per frame), signals with a
/// value table cycle through its entries (one per second), everything else
/// is a sine with a period and phase derived from the seed.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub seed: u64,
    /// Period for messages without a `GenMsgCycleTime`.
    pub default_period: Duration,
    /// Per-message period overrides, by message name.
    pub periods: HashMap<String, Duration>,
    pub patterns: HashMap<String, Pattern>,
    /// Only simulate these messages (by name); empty means all.
    pub only: Vec<String>,
    /// Timestamp of the simulation's t = 0 (e.g. time since the epoch).
    pub start: Duration,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            seed: 1,
            default_period: Duration::from_millis(100),
            periods: HashMap::new(),
            patterns: HashMap::new(),
            only: Vec::new(),
            start: Duration::from_secs(1_700_000_000),
        }
    }
}

/// SplitMix64: tiny, fast, and its output is fixed forever.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[derive(Debug, Clone)]
struct SignalState {
    pattern: Pattern,
    lo: f64,
    hi: f64,
    walk: f64,
    step: usize,
}

#[derive(Debug)]
struct MessageState<'a> {
    plan: &'a MessagePlan,
    period_ns: u64,
    signals: Vec<SignalState>,
}

/// One simulated frame and when it is sent (`SimConfig::start` + elapsed).
#[derive(Debug, Clone, PartialEq)]
pub struct SimFrame {
    pub at: Duration,
    pub frame: CanFrame,
}

/// Iterator of simulated frames in time order (endless; bound it with
/// [`Simulator::until`] or `take`).
pub struct Simulator<'a> {
    messages: Vec<MessageState<'a>>,
    queue: BinaryHeap<Reverse<(u64, usize)>>,
    rng: Rng,
    start: Duration,
}

fn range_of(s: &SignalPlan) -> (f64, f64) {
    if s.min < s.max {
        return (s.min, s.max);
    }
    match s.kind {
        ValueKind::Float32 | ValueKind::Float64 => (-100.0, 100.0),
        _ => s.representable_range(),
    }
}

fn default_pattern(plan: &MessagePlan, index: usize, rng: &mut Rng) -> Pattern {
    let s = &plan.signals[index];
    if s.is_multiplexor() {
        // Every selector value some signal listens to, so all pages appear.
        let mut values: Vec<u64> = plan
            .signals
            .iter()
            .filter_map(|t| t.mux.as_ref())
            .filter(|m| m.multiplexor == index)
            .flat_map(|m| m.ranges.iter().map(|r| r.0))
            .collect();
        values.sort_unstable();
        values.dedup();
        if !values.is_empty() {
            let values = values
                .into_iter()
                .map(|raw| raw as f64 * s.factor + s.offset)
                .collect();
            return Pattern::Cycle {
                values,
                dwell: Duration::ZERO,
            };
        }
    }
    if !s.labels.is_empty() {
        let values = s
            .labels
            .iter()
            .map(|(raw, _)| *raw as f64 * s.factor + s.offset)
            .collect();
        return Pattern::Cycle {
            values,
            dwell: Duration::from_secs(1),
        };
    }
    Pattern::Sine {
        period: Duration::from_millis(2_000 + rng.next_u64() % 18_000),
        phase: rng.unit(),
    }
}

impl<'a> Simulator<'a> {
    pub fn new(decoder: &'a Decoder, config: &SimConfig) -> Self {
        let mut rng = Rng(config.seed);
        let mut messages = Vec::new();
        let mut queue = BinaryHeap::new();
        for plan in decoder.messages() {
            if !config.only.is_empty() && !config.only.iter().any(|n| **n == *plan.name) {
                continue;
            }
            let period = config
                .periods
                .get(&*plan.name)
                .copied()
                .or(plan.cycle_time)
                .unwrap_or(config.default_period)
                .max(Duration::from_micros(100));
            let signals = (0..plan.signals.len())
                .map(|i| {
                    let s = &plan.signals[i];
                    let pattern = config
                        .patterns
                        .get(&format!("{}.{}", plan.name, s.name))
                        .or_else(|| config.patterns.get(&*s.name))
                        .cloned()
                        .unwrap_or_else(|| default_pattern(plan, i, &mut rng));
                    let (lo, hi) = range_of(s);
                    SignalState {
                        pattern,
                        lo,
                        hi,
                        walk: lo + (hi - lo) * rng.unit(),
                        step: 0,
                    }
                })
                .collect();
            let period_ns = period.as_nanos().min(u128::from(u64::MAX)) as u64;
            // Stagger first transmissions within one period, as real ECUs do.
            let first = rng.next_u64() % period_ns;
            queue.push(Reverse((first, messages.len())));
            messages.push(MessageState {
                plan,
                period_ns,
                signals,
            });
        }
        Self {
            messages,
            queue,
            rng,
            start: config.start,
        }
    }

    /// Frames up to `start + duration`.
    pub fn until(self, duration: Duration) -> impl Iterator<Item = SimFrame> + 'a {
        let end = self.start + duration;
        self.take_while(move |f| f.at < end)
    }
}

fn value_at(state: &mut SignalState, t: f64, rng: &mut Rng) -> f64 {
    let (lo, hi) = (state.lo, state.hi);
    let v = match &state.pattern {
        Pattern::Constant(v) => *v,
        Pattern::Sine { period, phase } => {
            let p = period.as_secs_f64().max(1e-6);
            let x = (TAU * (t / p + phase)).sin();
            lo + (hi - lo) * (x + 1.0) / 2.0
        }
        Pattern::Ramp { period } => {
            let p = period.as_secs_f64().max(1e-6);
            lo + (hi - lo) * (t / p).fract()
        }
        Pattern::RandomWalk { step } => {
            let delta = (rng.unit() * 2.0 - 1.0) * step * (hi - lo);
            state.walk = (state.walk + delta).clamp(lo, hi);
            state.walk
        }
        Pattern::Cycle { values, dwell } => {
            if values.is_empty() {
                lo
            } else {
                let i = if dwell.is_zero() {
                    let i = state.step;
                    state.step = state.step.wrapping_add(1);
                    i
                } else {
                    (t / dwell.as_secs_f64()) as usize
                };
                values[i % values.len()]
            }
        }
    };
    if v.is_finite() {
        v
    } else {
        lo
    }
}

/// Clamps into what the signal can encode, so encoding never fails.
fn encodable(s: &SignalPlan, v: f64) -> SignalValue {
    let (lo, hi) = s.representable_range();
    let v = v.clamp(lo, hi);
    if s.is_integer() {
        // Snap to the raw grid in integers to stay exact for wide signals.
        let raw = ((v - s.offset) / s.factor).round();
        let (rlo, rhi) = s.raw_range();
        let raw = raw.clamp(rlo, rhi);
        SignalValue::Int(
            (raw as i64)
                .wrapping_mul(s.factor as i64)
                .wrapping_add(s.offset as i64),
        )
    } else {
        SignalValue::Float(v)
    }
}

impl Iterator for Simulator<'_> {
    type Item = SimFrame;

    fn next(&mut self) -> Option<SimFrame> {
        loop {
            let Reverse((due, idx)) = self.queue.pop()?;
            let state = &mut self.messages[idx];
            self.queue
                .push(Reverse((due.saturating_add(state.period_ns), idx)));
            let t = due as f64 / 1e9;
            let rng = &mut self.rng;
            let plan = state.plan;
            let signals = &mut state.signals;
            let encoded =
                plan.encode_with(|i, s| Some(encodable(s, value_at(&mut signals[i], t, rng))));
            if let Ok(frame) = encoded {
                return Some(SimFrame {
                    at: self.start + Duration::from_nanos(due),
                    frame,
                });
            }
            // Unreachable with clamped values; skip rather than stop the bus.
        }
    }
}

/// Where simulated (or replayed) frames go: a candump file, a SocketCAN
/// socket, a test vector.
pub trait FrameSink {
    type Error;
    /// `at` is the frame's simulated send time.
    fn send(&mut self, at: Duration, frame: &CanFrame) -> Result<(), Self::Error>;
}

impl<F, E> FrameSink for F
where
    F: FnMut(Duration, &CanFrame) -> Result<(), E>,
{
    type Error = E;
    fn send(&mut self, at: Duration, frame: &CanFrame) -> Result<(), E> {
        self(at, frame)
    }
}

/// Writes frames as `candump -L` lines on one interface name.
pub struct CandumpSink<W> {
    writer: CandumpWriter<W>,
    iface: String,
}

impl<W: Write> CandumpSink<W> {
    pub fn new(out: W, iface: &str) -> Self {
        Self {
            writer: CandumpWriter::new(out),
            iface: iface.to_string(),
        }
    }
    pub fn into_inner(self) -> W {
        self.writer.into_inner()
    }
}

impl<W: Write> FrameSink for CandumpSink<W> {
    type Error = io::Error;
    fn send(&mut self, at: Duration, frame: &CanFrame) -> io::Result<()> {
        self.writer
            .write_frame(Timestamp::from_duration(at), &self.iface, frame)
    }
}

/// Forwards to another sink in real time: waits until each frame's send
/// time (relative to the first frame) has come on the wall clock. Wrap a
/// SocketCAN sink in this; a file sink wants no pacing.
pub struct Paced<S> {
    inner: S,
    origin: Option<(Instant, Duration)>,
}

impl<S> Paced<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            origin: None,
        }
    }
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: FrameSink> FrameSink for Paced<S> {
    type Error = S::Error;
    fn send(&mut self, at: Duration, frame: &CanFrame) -> Result<(), S::Error> {
        let (wall, sim) = *self.origin.get_or_insert((Instant::now(), at));
        crate::replay::sleep_until(wall, at.saturating_sub(sim));
        self.inner.send(at, frame)
    }
}

/// Runs the simulation for `duration` of simulated time into `sink`;
/// returns the number of frames sent.
pub fn run<S: FrameSink>(
    decoder: &Decoder,
    config: &SimConfig,
    duration: Duration,
    sink: &mut S,
) -> Result<u64, S::Error> {
    let mut n = 0;
    for f in Simulator::new(decoder, config).until(duration) {
        sink.send(f.at, &f.frame)?;
        n += 1;
    }
    Ok(n)
}

/// Writes `duration` of simulated traffic as a candump log.
pub fn simulate_to_candump<W: Write>(
    decoder: &Decoder,
    config: &SimConfig,
    duration: Duration,
    out: W,
    iface: &str,
) -> io::Result<u64> {
    let mut sink = CandumpSink::new(out, iface);
    let n = run(decoder, config, duration, &mut sink)?;
    sink.writer.flush()?;
    Ok(n)
}
