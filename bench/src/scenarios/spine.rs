//! `spine`: a synthetic source at full speed (no broker) through the durable
//! buffer, the uplink and the real cloud-ingest into its store; and, in the
//! same run, the transport alone: the same batches over the same mTLS
//! stream into a cloud-ingest that stores nothing (`--discard`), with no
//! buffer on the sending side.
//!
//! The source, buffer and uplink are the agent's own library parts, run in
//! this process (the agent binary has no synthetic source).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgefleet_buffer::{AppendBatch, Buffer, BufferOptions};
use edgefleet_proto::EncodedRecord;

use super::{histogram, mib, rate_series, start_ingest, value_at, Sampler};
use crate::grpc::{sample_encoded, AgentStream};
use crate::report::ScenarioResult;
use crate::sys;
use crate::Ctx;

/// The uplink's default batch size (`uplink.batch.maxRecords`).
const BATCH: usize = 2000;
/// Records per `Buffer::append` from the synthetic source, and how many
/// appends are in flight at once: the MQTT source's own limits (messages
/// awaiting their ack, one record each).
const APPEND_CHUNK: usize = edge_agent::sources::mqtt::MAX_MESSAGES_PER_APPEND;
const PRODUCERS: usize = edge_agent::sources::mqtt::MAX_APPENDS_IN_FLIGHT;

/// What the MQTT source hands the buffer for [`BATCH`] messages of 100
/// devices: records already in their wire form.
pub fn templates() -> Vec<EncodedRecord> {
    (0..BATCH as u64)
        .map(|i| sample_encoded((i % 100) as u32, i))
        .collect()
}

pub async fn run(ctx: &Ctx) -> anyhow::Result<ScenarioResult> {
    let mut result = ctx.result("spine");
    // `all` runs other scenarios in this process first.
    sys::reset_own_peak_rss();
    let phase = ctx.phase();
    let dir = tempfile::tempdir()?;
    let pki = edgefleet_pki::dev::init(
        &dir.path().join("pki"),
        &["spine-agent".into(), "transport-agent".into()],
        &["localhost".into(), "127.0.0.1".into()],
    )?;
    let templates = templates();
    let payload_bytes: usize = (0..100u64)
        .map(|n| crate::mqtt::payload(n, 1, crate::mqtt::now_ns()).len())
        .sum::<usize>()
        / 100;

    // Transport alone.
    let ingest = start_ingest(dir.path(), &pki, None, "ingest-discard")?;
    let origin = Instant::now();
    let mut stream = AgentStream::connect(
        ingest.port,
        &pki.ca_cert(),
        &pki.agent_cert("transport-agent"),
        &pki.agent_key("transport-agent"),
        "transport-agent",
    )
    .await?;
    let acked = Arc::new(AtomicU64::new(0));
    let sampler = {
        let acked = acked.clone();
        Sampler::start(origin, Duration::from_millis(250), move || {
            acked.load(Ordering::Relaxed) as f64
        })
    };
    let cpu0 = (sys::cpu_seconds(0), sys::cpu_seconds(ingest.pid()));
    let wire0 = super::bytes_received(ingest.metrics_port);
    let start = Instant::now();
    let mut ack_latency = histogram();
    while start.elapsed() < phase || stream.inflight() > 0 {
        if stream.can_send() && start.elapsed() < phase {
            stream.send(&templates).await?;
            continue;
        }
        for l in stream.next_ack().await? {
            let _ = ack_latency.record(l.as_micros().max(1) as u64);
        }
        acked.store(stream.acked_records, Ordering::Relaxed);
    }
    let transport_secs = start.elapsed().as_secs_f64();
    let transport_records = stream.acked_records;
    let transport_rate = transport_records as f64 / transport_secs;
    let cpu1 = (sys::cpu_seconds(0), sys::cpu_seconds(ingest.pid()));
    let transport_wire = super::bytes_received(ingest.metrics_port) - wire0;
    let transport_samples = sampler.stop();
    drop(stream);
    drop(ingest);

    // The spine: synthetic source → buffer → uplink → ingest → store.
    let store = dir.path().join("store");
    let ingest = start_ingest(dir.path(), &pki, Some(&store), "ingest-store")?;
    let mut options = BufferOptions::new(dir.path().join("agent"));
    options.max_bytes = 4 << 30;
    // The buffer's commits that wrote to disk: (count, total µs).
    let buffer_commits = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
    options.on_commit = Some(edgefleet_buffer::CommitObserver(Arc::new({
        let commits = buffer_commits.clone();
        move |took: Duration| {
            commits.0.fetch_add(1, Ordering::Relaxed);
            commits
                .1
                .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        }
    })));
    let (buffer, _) = Buffer::open(options)?;
    let uplink_config: edgefleet_config::UplinkConfig =
        serde_json::from_value(serde_json::json!({
            "endpoint": format!("https://127.0.0.1:{}", ingest.port),
            "serverName": "localhost",
            "caFile": pki.ca_cert(),
            "certFile": pki.agent_cert("spine-agent"),
            "keyFile": pki.agent_key("spine-agent"),
        }))?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let metrics = Arc::new(edge_agent::metrics::Metrics::new());
    let uplink = edge_agent::uplink::Uplink {
        config: uplink_config,
        buffer: buffer.clone(),
        metrics,
        config_hash: "bench".into(),
        node: "bench".into(),
        expected_identity: None,
    };
    let uplink_task = tokio::spawn(uplink.run(shutdown.clone()));
    let origin2 = Instant::now();
    let metrics_port = ingest.metrics_port;
    let sampler = Sampler::start(origin2, Duration::from_millis(250), move || {
        super::stored(metrics_port) as f64
    });
    let appended = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let cpu2 = (sys::cpu_seconds(0), sys::cpu_seconds(ingest.pid()));
    let written2 = (sys::written_bytes(0), sys::written_bytes(ingest.pid()));
    let commits0 = super::commit_totals(ingest.metrics_port);
    let buffer_commits0 = (
        buffer_commits.0.load(Ordering::Relaxed),
        buffer_commits.1.load(Ordering::Relaxed),
    );
    let wire2 = super::bytes_received(ingest.metrics_port);
    let start = Instant::now();
    let mut producers = Vec::new();
    for p in 0..PRODUCERS {
        let (buffer, appended, stop) = (buffer.clone(), appended.clone(), stop.clone());
        let templates = templates.clone();
        producers.push(tokio::spawn(async move {
            let mut i = p * APPEND_CHUNK;
            while !stop.load(Ordering::Relaxed) {
                // What the MQTT source does for each message: the record
                // written at the end of the append's one buffer.
                let mut chunk = AppendBatch::with_capacity(APPEND_CHUNK, APPEND_CHUNK * 96);
                for k in 0..APPEND_CHUNK {
                    chunk.push(&templates[(i + k) % templates.len()], None);
                }
                i += APPEND_CHUNK;
                if buffer.append(chunk).await.is_err() {
                    break;
                }
                appended.fetch_add(APPEND_CHUNK as u64, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(phase).await;
    let stored_at_end = ingest.stored();
    let secs = start.elapsed().as_secs_f64();
    let cpu3 = (sys::cpu_seconds(0), sys::cpu_seconds(ingest.pid()));
    let written3 = (sys::written_bytes(0), sys::written_bytes(ingest.pid()));
    let appended_at_end = appended.load(Ordering::Relaxed);
    let commits1 = super::commit_totals(ingest.metrics_port);
    let buffer_commits1 = (
        buffer_commits.0.load(Ordering::Relaxed),
        buffer_commits.1.load(Ordering::Relaxed),
    );
    let wire3 = super::bytes_received(ingest.metrics_port);
    stop.store(true, Ordering::Relaxed);
    for p in producers {
        let _ = p.await;
    }
    let samples = sampler.stop();
    let from = phase.as_secs_f64() * 0.2;
    let spine_rate = (stored_at_end as f64 - value_at(&samples, from)) / (secs - from);
    let appended_rate = appended.load(Ordering::Relaxed) as f64 / secs;
    let agent_peak = sys::peak_rss(0);
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), uplink_task).await;
    let _ = buffer.close().await;

    result.target(
        "spine: stored records/s (durable buffer, uplink, ingest, store)",
        spine_rate,
        "rec/s",
        "≥ 1,000,000 rec/s",
        spine_rate >= 1e6,
    );
    let commits = (commits1.0 - commits0.0).max(1.0);
    result.figure(
        "spine: ingest group commit (write + fsync), mean",
        1e3 * (commits1.1 - commits0.1) / commits,
        "ms",
    );
    let buffer_commit_count = buffer_commits1.0.saturating_sub(buffer_commits0.0).max(1);
    result.figure(
        "spine: buffer group commit (write + fsync), mean",
        (buffer_commits1.1 - buffer_commits0.1) as f64 / 1e3 / buffer_commit_count as f64,
        "ms",
    );
    result.figure(
        "spine: buffer group commits per second",
        buffer_commit_count as f64 / secs,
        "commits/s",
    );
    result.figure(
        "spine: ingest batches per group commit",
        (commits1.2 - commits0.2) / commits,
        "batches",
    );
    result.figure(
        "transport alone: acknowledged records/s",
        transport_rate,
        "rec/s",
    );
    result.target(
        "spine / transport alone",
        100.0 * spine_rate / transport_rate,
        "%",
        "≥ 70 %",
        spine_rate >= 0.7 * transport_rate,
    );
    result.figure(
        "synthetic source: appended records/s",
        appended_rate,
        "rec/s",
    );
    let stored_in_phase = (stored_at_end as f64).max(1.0);
    result.figure(
        "spine: bench process (source, buffer, uplink) CPU per million records",
        (cpu3.0 - cpu2.0) / stored_in_phase * 1e6,
        "CPU s",
    );
    result.figure(
        "spine: ingest CPU per million records",
        (cpu3.1 - cpu2.1) / stored_in_phase * 1e6,
        "CPU s",
    );
    // The disk is the other resource the spine uses up: both sides write
    // every record, and sled rewrites pages as it goes.
    let record_bytes =
        templates.iter().map(EncodedRecord::len).sum::<usize>() as f64 / templates.len() as f64;
    result.figure(
        "record as the buffer stores it (encoded, no seq)",
        record_bytes,
        "bytes",
    );
    result.figure(
        "spine: bench process (buffer) bytes written to disk per appended record",
        written3.0.saturating_sub(written2.0) as f64 / (appended_at_end.max(1) as f64),
        "bytes",
    );
    result.figure(
        "spine: ingest (store) bytes written to disk per stored record",
        written3.1.saturating_sub(written2.1) as f64 / stored_in_phase,
        "bytes",
    );
    // Both compress on the way: the transport each batch at the uplink's
    // level, the spine once, when the buffer stores a segment.
    result.figure(
        "spine: bytes on the link per stored record (TLS, compressed)",
        (wire3 - wire2) / stored_in_phase,
        "bytes",
    );
    result.figure(
        "transport: bytes on the link per record (TLS, compressed)",
        transport_wire / (transport_records.max(1) as f64),
        "bytes",
    );
    result.figure(
        "transport: sender CPU per million records",
        (cpu1.0 - cpu0.0) / (transport_records.max(1) as f64) * 1e6,
        "CPU s",
    );
    result.figure(
        "transport: ingest CPU per million records",
        (cpu1.1 - cpu0.1) / (transport_records.max(1) as f64) * 1e6,
        "CPU s",
    );
    if !ack_latency.is_empty() {
        result.figure(
            "transport: batch ack latency p99",
            ack_latency.value_at_quantile(0.99) as f64 / 1000.0,
            "ms",
        );
    }
    result.figure("bench process peak RSS", mib(agent_peak), "MiB");
    result.note(format!(
        "Records are what the MQTT source makes of a ~{payload_bytes} byte JSON payload (5 signals); batches of {BATCH} (the uplink's default); {PRODUCERS} concurrent appends of {APPEND_CHUNK} records; default flush policy; {:.0} s per phase; rates from 20 % into the phase to its end.",
        phase.as_secs_f64()
    ));
    result.note("Transport alone: the same records in the same batches, one stream, within the ingest's credit, into `cloud-ingest serve --discard` (TLS, gRPC, session and committer, no store).");
    result
        .throughput
        .push(rate_series("spine: stored rec/s", "rec/s", &samples));
    result.throughput.push(rate_series(
        "transport alone: acked rec/s",
        "rec/s",
        &transport_samples,
    ));
    Ok(result)
}
