//! JSON payloads decoded into records per second: the MQTT source's
//! `JsonReader::decode_into` on payloads shaped like the benchmark devices'
//! (six fields: a counter, a timestamp, two numbers, a bool, a string).
//!
//! `cargo run --release -p edge-agent --example json_decode_bench`

use std::time::Instant;

fn main() {
    let payloads: Vec<String> = (0..1000u64)
        .map(|n| {
            format!(
                "{{\"n\":{n},\"timestamp_ns\":{},\"temp\":{:.2},\"rpm\":{},\"ok\":{},\"mode\":\"{}\"}}",
                1_765_000_000_000_000_000u64 + n,
                20.0 + (n % 100) as f64 / 10.0,
                1200 + n % 400,
                !n.is_multiple_of(7),
                if n % 100 < 50 { "eco" } else { "boost" }
            )
        })
        .collect();
    let mut writer = edgefleet_proto::RecordWriter::new();
    let mut reader = edge_agent::sources::json::JsonReader::default();
    for round in 1..=3 {
        let started = Instant::now();
        for _ in 0..1000 {
            for payload in &payloads {
                writer.clear();
                reader
                    .decode_into(payload.as_bytes(), &mut writer)
                    .expect("a valid payload");
            }
        }
        let nanos = started.elapsed().as_nanos() as f64 / 1e6;
        println!("round {round}: {nanos:.0} ns per payload");
    }
}
