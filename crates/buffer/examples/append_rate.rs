//! Throughput of the durable buffer alone: several appenders push batches of
//! MQTT-shaped records (8 signals, device id, source, dedupe key) while one
//! reader reads, reserves and acks like the uplink does.
//!
//! ```text
//! cargo run --release -p edgefleet-buffer --example append_rate
//! APPEND_RATE_SECS=10 APPEND_RATE_APPENDERS=4 APPEND_RATE_BATCH=100 APPEND_RATE_DEDUPE=1
//! APPEND_RATE_TOTAL=200000   # stop after this many records instead (for callgrind)
//! ```
//!
//! Prints records/s appended, read and acked, and the process's CPU seconds.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgefleet_buffer::{Buffer, BufferOptions, DedupeKey, FullPolicy, Incoming};
use edgefleet_proto::record::Value;
use edgefleet_proto::{signal, EncodedRecord, Record, Signal, Signals};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A record like the MQTT source makes of a small JSON payload.
fn sample(n: u64, device: u64) -> Record {
    let sig = |name: &str, value: signal::Value| Signal {
        name: name.into(),
        value: Some(value),
        unit: String::new(),
        label: String::new(),
    };
    let signals = vec![
        sig("n", signal::Value::I64(n as i64)),
        sig("temp", signal::Value::F64(20.0 + (n % 100) as f64 / 10.0)),
        sig("rpm", signal::Value::I64(1200 + (n % 400) as i64)),
        sig("ok", signal::Value::Bool(!n.is_multiple_of(7))),
        sig(
            "mode",
            signal::Value::Str(if n % 100 < 50 { "eco" } else { "boost" }.into()),
        ),
        sig("volt", signal::Value::F64(12.0 + (n % 13) as f64 / 7.0)),
        sig("amp", signal::Value::F64(3.0 + (n % 11) as f64 / 3.0)),
        sig("hum", signal::Value::I64((n % 90) as i64)),
    ];
    Record {
        seq: 0,
        source: "mqtt".into(),
        device_id: format!("dev-{device:05}"),
        timestamp_ns: 1_700_000_000_000_000_000 + n as i64 * 1000,
        value: Some(Value::Signals(Signals { signals })),
    }
}

/// User + system CPU seconds of this process (Linux, 100 ticks per second).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Fields 14 and 15 of /proc/pid/stat; `after` starts at field 3.
    (ticks(11) + ticks(12)) / 100.0
}

fn main() {
    let secs = env("APPEND_RATE_SECS", 10);
    let total = env("APPEND_RATE_TOTAL", 0);
    let appenders = env("APPEND_RATE_APPENDERS", 4);
    let batch = env("APPEND_RATE_BATCH", 100) as usize;
    let dedupe = env("APPEND_RATE_DEDUPE", 1) == 1;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run(secs, total, appenders, batch, dedupe));
}

async fn run(secs: u64, total: u64, appenders: u64, batch: usize, dedupe: bool) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut options = BufferOptions::new(dir.path());
    options.max_bytes = 1 << 30;
    options.when_full = FullPolicy::Block;
    let (buffer, _) = Buffer::open(options).expect("open");
    let templates: Vec<EncodedRecord> = (0..1000)
        .map(|i| EncodedRecord::from(sample(i, i % 100)))
        .collect();
    let size = templates.iter().map(EncodedRecord::len).sum::<usize>() / templates.len();
    println!(
        "append_rate: {appenders} appenders x {batch} records/append, ~{size} bytes/record, dedupe={dedupe}, {}",
        if total > 0 {
            format!("{total} records")
        } else {
            format!("{secs} s")
        }
    );

    let appended = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let cpu0 = cpu_seconds();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for a in 0..appenders {
        let (buffer, appended, stop) = (buffer.clone(), appended.clone(), stop.clone());
        let templates = templates.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = a as usize * 7919;
            let scope = buffer.dedupe_scope(format!("mqtt-{a}/"));
            let mut pkid: u16 = 0;
            while !stop.load(Ordering::Relaxed) {
                let chunk: Vec<Incoming> = (0..batch)
                    .map(|k| {
                        pkid = pkid.checked_add(1).unwrap_or(1);
                        let record = templates[(i + k) % templates.len()].clone();
                        let dedupe = dedupe.then(|| DedupeKey {
                            scope,
                            id: pkid,
                            fingerprint: [(i + k) as u8; 16],
                            redelivery: false,
                            earlier_fingerprint: None,
                        });
                        Incoming { record, dedupe }
                    })
                    .collect();
                i += batch;
                if buffer.append(chunk).await.is_err() {
                    break;
                }
                let now = appended.fetch_add(batch as u64, Ordering::Relaxed) + batch as u64;
                if total > 0 && now >= total {
                    stop.store(true, Ordering::Relaxed);
                }
            }
        }));
    }

    // The reader: like the uplink, read from a cursor, reserve, "send", and
    // ack a few batches later.
    let reader = {
        let (buffer, stop) = (buffer.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut cursor, mut read, mut acked) = (1u64, 0u64, 0u64);
            let mut inflight = std::collections::VecDeque::new();
            loop {
                let wait = tokio::time::timeout(Duration::from_millis(50), buffer.wait_for(cursor));
                if wait.await.is_err() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    continue;
                }
                let records = buffer.read_from(cursor, 2000, 1 << 20).expect("read");
                let Some(last) = records.last().map(|r| r.seq) else {
                    cursor = buffer.stats().durable_through + 1;
                    continue;
                };
                buffer.before_send(last).await.expect("reserve");
                read += records.len() as u64;
                inflight.push_back((last, records.len() as u64));
                cursor = last + 1;
                if inflight.len() > 4 {
                    let (through, n) = inflight.pop_front().unwrap();
                    buffer.ack(through).await.expect("ack");
                    acked += n;
                }
            }
            for (through, n) in inflight {
                buffer.ack(through).await.expect("ack");
                acked += n;
            }
            (read, acked)
        })
    };

    if total == 0 {
        tokio::time::sleep(Duration::from_secs(secs)).await;
        stop.store(true, Ordering::Relaxed);
    }
    for t in tasks {
        let _ = t.await;
    }
    let (read, acked) = reader.await.expect("reader");
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    let appended = appended.load(Ordering::Relaxed);
    let stats = buffer.stats();
    buffer.close().await.expect("close");
    println!(
        "appended {appended} read {read} acked {acked} in {elapsed:.2} s: {:.0} rec/s appended, {:.0} rec/s acked; cpu {cpu:.2} s ({:.2} us cpu/record); commits {}; left {} records {} bytes",
        appended as f64 / elapsed,
        acked as f64 / elapsed,
        cpu * 1e6 / appended.max(1) as f64,
        stats.commits_total,
        stats.records,
        stats.bytes,
    );
}
