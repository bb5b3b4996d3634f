//! `fan-in`: many simulated agents, each with its own certificate, TLS
//! connection and stream, into one real cloud-ingest with its store. Each
//! sends a batch of 10 records every second and waits for its ack.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use super::{histogram, mib, rate_series, start_ingest, Sampler};
use crate::grpc::{sample_encoded, AgentStream};
use crate::report::{ScenarioResult, Series};
use crate::sys;
use crate::Ctx;

const RECORDS_PER_BATCH: u64 = 10;

pub async fn run(ctx: &Ctx) -> anyhow::Result<ScenarioResult> {
    let mut result = ctx.result("fan-in");
    let n = ctx.agents;
    let dir = tempfile::tempdir()?;
    let ids: Vec<String> = (0..n).map(|i| format!("agent-{i:05}")).collect();
    let pki_started = Instant::now();
    let pki = edgefleet_pki::dev::init(
        &dir.path().join("pki"),
        &ids,
        &["localhost".into(), "127.0.0.1".into()],
    )?;
    let pki_secs = pki_started.elapsed().as_secs_f64();
    let ingest = start_ingest(dir.path(), &pki, Some(&dir.path().join("store")), "ingest")?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = sys::rss(ingest.pid());

    let template: Vec<_> = (0..RECORDS_PER_BATCH)
        .map(|i| sample_encoded(i as u32, i))
        .collect();
    let template = Arc::new(template);
    let connected = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let alive = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let latency = Arc::new(Mutex::new(histogram()));
    let dial = Arc::new(Semaphore::new(32));
    let origin = Instant::now();
    let metrics_port = ingest.metrics_port;
    let sampler = Sampler::start(origin, Duration::from_millis(500), move || {
        super::stored(metrics_port) as f64
    });
    let streams = {
        let connected = connected.clone();
        Sampler::start(origin, Duration::from_millis(250), move || {
            connected.load(Ordering::Relaxed) as f64
        })
    };
    let mut tasks = Vec::with_capacity(n);
    for id in &ids {
        let (cert, key, ca) = (pki.agent_cert(id), pki.agent_key(id), pki.ca_cert());
        let id = id.clone();
        let port = ingest.port;
        let (connected, failed, alive, stop, latency, dial, template) = (
            connected.clone(),
            failed.clone(),
            alive.clone(),
            stop.clone(),
            latency.clone(),
            dial.clone(),
            template.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let permit = dial.acquire_owned().await;
            let stream = AgentStream::connect(port, &ca, &cert, &key, &id).await;
            drop(permit);
            let mut stream = match stream {
                Ok(s) => s,
                Err(e) => {
                    if failed.fetch_add(1, Ordering::Relaxed) == 0 {
                        eprintln!("fan-in: {id}: {e:#}");
                    }
                    return;
                }
            };
            connected.fetch_add(1, Ordering::Relaxed);
            // Spread the agents over the second.
            let offset = Duration::from_millis(rand_offset(&id));
            tokio::time::sleep(offset).await;
            let mut next = tokio::time::Instant::now();
            while !stop.load(Ordering::Relaxed) {
                if stream.send(&template).await.is_err() {
                    break;
                }
                match stream.next_ack().await {
                    Ok(ls) => {
                        let mut h = latency.lock().expect("histogram");
                        for l in ls {
                            let _ = h.record(l.as_micros().max(1) as u64);
                        }
                    }
                    Err(_) => break,
                }
                next += Duration::from_secs(1);
                tokio::time::sleep_until(next).await;
            }
            if !stop.load(Ordering::Relaxed) {
                return;
            }
            alive.fetch_add(1, Ordering::Relaxed);
            // Hold the stream until the end of the measurement.
            tokio::time::sleep(Duration::from_secs(2)).await;
            drop(stream);
        }));
    }
    // Connect everyone (or give up after a while), then measure.
    let connect_deadline = Instant::now() + Duration::from_secs(if ctx.quick { 60 } else { 600 });
    while (connected.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed)) < n as u64
        && Instant::now() < connect_deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let connect_secs = origin.elapsed().as_secs_f64();
    let held = connected.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(2)).await;
    latency.lock().expect("histogram").reset();
    let stored0 = ingest.stored();
    let cpu0 = sys::cpu_seconds(ingest.pid());
    let measure_started = Instant::now();
    tokio::time::sleep(ctx.phase()).await;
    let measured = measure_started.elapsed().as_secs_f64();
    let stored1 = ingest.stored();
    let cpu1 = sys::cpu_seconds(ingest.pid());
    let rss_loaded = sys::rss(ingest.pid());
    let ingest_peak = sys::peak_rss(ingest.pid());
    stop.store(true, Ordering::Relaxed);
    // An agent counts itself alive once its batch in flight is acknowledged,
    // which under saturation takes seconds: read the count only after every
    // agent has finished (bounded, so a hung stream cannot hang the harness).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    for t in tasks {
        let _ = tokio::time::timeout_at(deadline, t).await;
    }
    let still_alive = alive.load(Ordering::Relaxed);
    let samples = sampler.stop();
    let streams = streams.stop();
    let h = latency.lock().expect("histogram").clone();
    let rate = (stored1 - stored0) as f64 / measured;

    result.target(
        "concurrent streams held",
        held as f64,
        "streams",
        "10,000 agents",
        held >= 10_000,
    );
    result.figure("simulated agents", n as f64, "");
    result.figure(
        "streams alive at the end of the measurement",
        still_alive as f64,
        "",
    );
    result.figure(
        "failed to connect",
        failed.load(Ordering::Relaxed) as f64,
        "",
    );
    result.figure("aggregate stored rate", rate, "rec/s");
    result.figure(
        "ack latency p50",
        h.value_at_quantile(0.5) as f64 / 1000.0,
        "ms",
    );
    result.figure(
        "ack latency p99",
        h.value_at_quantile(0.99) as f64 / 1000.0,
        "ms",
    );
    result.figure(
        "ingest memory per connection (RSS growth / streams)",
        (rss_loaded.saturating_sub(rss_before)) as f64 / held.max(1) as f64 / 1024.0,
        "KiB",
    );
    result.figure("ingest RSS with every stream open", mib(rss_loaded), "MiB");
    result.figure("ingest peak RSS", mib(ingest_peak), "MiB");
    result.figure(
        "ingest CPU per second of measurement",
        (cpu1 - cpu0) / measured,
        "CPU s/s",
    );
    result.figure("time to connect every agent", connect_secs, "s");
    result.note(format!(
        "Each agent: its own certificate (dev PKI, {n} issued in {pki_secs:.1} s), its own TLS connection and stream, a batch of {RECORDS_PER_BATCH} records every second, waiting for each ack; at most 32 handshakes at once. All simulated agents run in one process on the same 2 cores as the ingest."
    ));
    result
        .throughput
        .push(rate_series("stored rec/s", "rec/s", &samples));
    result.latency.push(Series {
        name: "streams connected".into(),
        unit: "streams".into(),
        points: streams,
    });
    Ok(result)
}

/// A stable pseudo-random offset in [0, 1000) ms from the agent's id.
fn rand_offset(id: &str) -> u64 {
    id.bytes().fold(1469598103934665603u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(1099511628211)
    }) % 1000
}
