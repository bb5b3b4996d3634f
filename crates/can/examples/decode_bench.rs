//! Frames decoded per second on one core for testdata/vehicle.dbc.
//!
//! The frame mix is what the simulator puts on the bus in 20 s (each message
//! at its GenMsgCycleTime: fast powertrain frames dominate, as on a real
//! bus), plus 5 % frames with ids not in the DBC.
//!
//!     cargo run --release -p edgefleet-can --example decode_bench [seconds-per-variant]

use std::hint::black_box;
use std::time::{Duration, Instant};

use edgefleet_can::candump::{CandumpReader, CandumpWriter, Timestamp};
use edgefleet_can::simulate::{SimConfig, Simulator};
use edgefleet_can::{CanFrame, DecodedFrame, Decoder};

/// Nanoseconds this thread has spent on a CPU (Linux), so that a busy
/// machine (other builds on the other core) does not distort the figure.
fn thread_cpu_ns() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    s.split_whitespace().next()?.parse().ok()
}

fn measure(
    name: &str,
    frames: &[CanFrame],
    budget: Duration,
    mut f: impl FnMut(&CanFrame) -> usize,
) -> f64 {
    // Warm up caches and the branch predictor.
    for fr in frames.iter().take(10_000) {
        black_box(f(fr));
    }
    let mut decoded = 0u64;
    let mut signals = 0u64;
    let cpu0 = thread_cpu_ns();
    let start = Instant::now();
    while start.elapsed() < budget {
        for fr in frames {
            signals += f(black_box(fr)) as u64;
        }
        decoded += frames.len() as u64;
    }
    let wall = start.elapsed().as_secs_f64();
    // Prefer on-CPU time; fall back to wall time where it is not available.
    let secs = match (cpu0, thread_cpu_ns()) {
        (Some(a), Some(b)) if b > a => (b - a) as f64 / 1e9,
        _ => wall,
    };
    let rate = decoded as f64 / secs;
    println!(
        "{name:<34} {:>11.0} frames/s {:>7.1} ns/frame {:>11.0} signals/s  (cpu {:.2}s of {:.2}s wall)",
        rate,
        1e9 / rate,
        signals as f64 / secs,
        secs,
        wall
    );
    rate
}

fn main() {
    let budget = Duration::from_secs_f64(
        std::env::args()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(2.0),
    );
    let dbc = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/vehicle.dbc");
    let decoder = Decoder::from_files(&[dbc]).expect("load vehicle.dbc");

    let cfg = SimConfig {
        seed: 2024,
        ..SimConfig::default()
    };
    let mut frames: Vec<CanFrame> = Simulator::new(&decoder, &cfg)
        .until(Duration::from_secs(20))
        .map(|s| s.frame)
        .collect();
    // Every 20th frame: an id no DBC defines (the caller counts/forwards those).
    for (i, f) in frames.iter_mut().enumerate() {
        if i % 20 == 0 {
            *f = CanFrame::new(
                0x7E0 + (i % 8) as u32,
                false,
                f.data().get(..8).unwrap_or(&[]),
            )
            .unwrap();
        }
    }
    let avg_signals: f64 = frames
        .iter()
        .filter_map(|f| decoder.decode(f).ok())
        .map(|d| d.signals.len() as f64)
        .sum::<f64>()
        / frames.len() as f64;
    println!(
        "vehicle.dbc: {} messages; mix of {} frames, {:.1} signals per frame on average",
        decoder.messages().len(),
        frames.len(),
        avg_signals
    );

    let mut out = DecodedFrame::default();
    let main_rate = measure(
        "decode_into (reused DecodedFrame)",
        &frames,
        budget,
        |f| match decoder.decode_into(f, &mut out) {
            Ok(()) => out.signals.len(),
            Err(_) => 0,
        },
    );
    measure("decode_with (callback, no Arc)", &frames, budget, |f| {
        let mut n = 0;
        let _ = decoder.decode_with(f, |_, v, _| {
            black_box(v);
            n += 1;
        });
        n
    });
    measure("decode (new DecodedFrame each)", &frames, budget, |f| {
        decoder.decode(f).map(|d| d.signals.len()).unwrap_or(0)
    });

    // candump text -> frames, for the replay and `decode` command path.
    let mut w = CandumpWriter::new(Vec::new());
    for (i, f) in frames.iter().enumerate() {
        let t = Timestamp::from_duration(Duration::from_micros(
            1_700_000_000_000_000 + i as u64 * 250,
        ));
        w.write_frame(t, "can0", f).unwrap();
    }
    let text = w.into_inner();
    let cpu0 = thread_cpu_ns();
    let start = Instant::now();
    let mut lines = 0u64;
    while start.elapsed() < budget {
        lines += CandumpReader::new(&text[..]).filter(|r| r.is_ok()).count() as u64;
    }
    let secs = match (cpu0, thread_cpu_ns()) {
        (Some(a), Some(b)) if b > a => (b - a) as f64 / 1e9,
        _ => start.elapsed().as_secs_f64(),
    };
    println!(
        "{:<34} {:>11.0} lines/s",
        "candump parse",
        lines as f64 / secs
    );
    println!("RESULT decode_into: {main_rate:.0} frames/s per CPU-second on one core");
}
