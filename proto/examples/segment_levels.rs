//! zstd levels on what the agent's buffer compresses: segments of 32 KiB of
//! numbered `RecordBatch` entries, records shaped like the `spine`
//! benchmark's (five signals of a JSON payload, 100 devices). Prints each
//! level's ratio and speed on one core.
//!
//! `cargo run --release -p edgefleet-proto --example segment_levels`

use std::time::Instant;

use edgefleet_proto::{RecordWriter, SignalValue};

const RECORDS: u64 = 200_000;

fn main() {
    let mut entries = Vec::new();
    let mut segments = Vec::new();
    let mut writer = RecordWriter::new();
    for n in 0..RECORDS {
        let device = (n % 100) as u32;
        writer.clear();
        writer.signal("n", SignalValue::I64(n as i64));
        let temp = 20.0 + (n % 100) as f64 / 10.0 + f64::from(device % 7);
        writer.signal("temp", SignalValue::F64(temp));
        writer.signal("rpm", SignalValue::I64((1200 + n % 400) as i64));
        writer.signal("ok", SignalValue::Bool(!n.is_multiple_of(7)));
        let mode = if n % 100 < 50 { "eco" } else { "boost" };
        writer.signal("mode", SignalValue::Str(mode));
        let timestamp_ns = 1_765_000_000_000_000_000 + n as i64 * 473;
        let record = writer.finish("mqtt", &format!("dev-{device:05}"), timestamp_ns);
        edgefleet_proto::encoded::write_entry(&mut entries, record.as_bytes(), n + 1);
        if entries.len() > edgefleet_proto::batch_zstd::FRAME_PLAIN_BYTES - 200 {
            segments.push(std::mem::take(&mut entries));
        }
    }
    let plain: usize = segments.iter().map(Vec::len).sum();
    let records = RECORDS as f64 * plain as f64 / (plain + entries.len()) as f64;
    println!(
        "{} segments, {:.1} bytes per entry",
        segments.len(),
        plain as f64 / records
    );
    for level in [3, 1, -1, -3] {
        let mut context = zstd::bulk::Compressor::new(level).expect("zstd context");
        let rounds = 5;
        let mut compressed = 0;
        let started = Instant::now();
        for _ in 0..rounds {
            compressed = 0;
            for segment in &segments {
                compressed += context.compress(segment).expect("compress").len();
            }
        }
        let seconds = started.elapsed().as_secs_f64() / f64::from(rounds);
        println!(
            "level {level:>2}: ratio {:.2}, {:.0} MB/s, {:.3} CPU s per million records",
            plain as f64 / compressed as f64,
            plain as f64 / seconds / 1e6,
            seconds / records * 1e6
        );
    }
}
