//! Fingerprints per second for the MQTT source's dedupe memory: XXH3-128
//! (what the agent computes for every QoS 1 message) against the SHA-256
//! it computed before (now only for redeliveries), on topics and payloads
//! of about the benchmark devices' size (27–28 and 96–98 bytes).
//!
//! `cargo run --release -p edge-agent --example fingerprint_bench`

use std::hint::black_box;
use std::time::Instant;

use edge_agent::sources::fingerprint::{sha256_v1, Fingerprinter};

const ROUNDS: usize = 2_000;

fn main() {
    let messages: Vec<(String, Vec<u8>)> = (0..1000u32)
        .map(|n| {
            let topic = format!("bench/devices/d-{}/telemetry", n % 100);
            let payload = format!("{{\"n\":{n},\"pad\":\"{}\"}}", "x".repeat(80));
            (topic, payload.into_bytes())
        })
        .collect();
    let per_message =
        |started: Instant| started.elapsed().as_nanos() as f64 / (ROUNDS * messages.len()) as f64;
    let mut fingerprinter = Fingerprinter::default();
    for round in 1..=3 {
        let started = Instant::now();
        for _ in 0..ROUNDS {
            for (topic, payload) in &messages {
                black_box(fingerprinter.of(topic, payload));
            }
        }
        let xxh3 = per_message(started);
        let started = Instant::now();
        for _ in 0..ROUNDS {
            for (topic, payload) in &messages {
                black_box(sha256_v1(topic, payload));
            }
        }
        let sha256 = per_message(started);
        println!("round {round}: XXH3-128 {xxh3:.1} ns, SHA-256 {sha256:.1} ns per message");
    }
}
