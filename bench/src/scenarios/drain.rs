//! `drain`: a backlog of records in the agent's buffer (written while the
//! ingest was away) is drained by the real edge-agent while live data keeps
//! arriving through Mosquitto; and the buffer's bytes on disk per payload byte.

use std::time::{Duration, Instant};

use edgefleet_buffer::{Buffer, BufferOptions, Incoming};
use edgefleet_tests::{AgentOptions, Fleet};

use super::{rate_series, time_reaching, Sampler};
use crate::grpc::sample_encoded;
use crate::mqtt;
use crate::report::ScenarioResult;
use crate::sys;
use crate::Ctx;

pub async fn run(ctx: &Ctx) -> anyhow::Result<ScenarioResult> {
    let mut result = ctx.result("drain");
    let live_rate: f64 = if ctx.quick { 500.0 } else { 2000.0 };
    let mut fleet = Fleet::new(&["drain-agent"])?;
    let port = fleet.mqtt.port;

    // The backlog: what the MQTT source would have written while the ingest
    // was unreachable, written with the agent's buffer library.
    let data_dir = fleet.agent_data_dir("drain-agent");
    let mut options = BufferOptions::new(&data_dir);
    options.max_bytes = 8 << 30;
    let (buffer, _) = Buffer::open(options)?;
    let mut payload_bytes = 0u64;
    let chunk = 5000u64;
    let mut written = 0u64;
    let fill_started = Instant::now();
    while written < ctx.backlog {
        let n = chunk.min(ctx.backlog - written);
        let records: Vec<Incoming> = (written..written + n)
            .map(|i| {
                let device = (i % 100) as u32;
                payload_bytes += mqtt::payload(i, device, mqtt::now_ns()).len() as u64;
                Incoming::from(sample_encoded(device, i))
            })
            .collect();
        buffer.append(records).await?;
        written += n;
    }
    let fill_secs = fill_started.elapsed().as_secs_f64();
    buffer.close().await?;
    drop(buffer);
    let on_disk = sys::disk_usage(&data_dir.join("buffer"));

    fleet.start_ingest()?;
    let mut options = AgentOptions::new("drain-agent");
    options.max_bytes = "8GiB".into();
    let origin = Instant::now();
    let metrics_port = fleet.ingest_metrics_port;
    let sampler = Sampler::start(origin, Duration::from_millis(250), move || {
        super::stored(metrics_port) as f64
    });
    let mut agent = fleet.start_agent(&options)?;
    // Live devices from the agent's start on (the agent subscribes at start;
    // messages before its subscription are not counted as delivered anyway,
    // only what the broker acknowledged and the store holds).
    let live_for = Duration::from_secs(if ctx.quick { 6 } else { 120 });
    let live = tokio::spawn(mqtt::publish(
        mqtt::DEVICES_ROOT,
        port,
        1,
        10,
        live_for,
        Some(live_rate),
        "live",
    ));
    let done = super::wait_until(live_for, || fleet.stored() >= ctx.backlog).await;
    let drained_at = origin.elapsed().as_secs_f64();
    let published = live.await??;
    let samples = sampler.stop();
    let peak = sys::peak_rss(agent.pid());
    agent.terminate(Duration::from_secs(30))?;

    let started_at = time_reaching(&samples, 1.0).unwrap_or(0.0);
    let drain_secs = (drained_at - started_at).max(1e-3);
    let drain_rate = ctx.backlog as f64 / drain_secs;
    if !done {
        result.note(format!(
            "the backlog was not drained within {:.0} s; the rate is a lower bound",
            live_for.as_secs_f64()
        ));
    }
    result.target(
        "drain rate / live rate",
        drain_rate / live_rate,
        "×",
        "≥ 20×",
        drain_rate >= 20.0 * live_rate,
    );
    result.figure("backlog drain rate", drain_rate, "rec/s");
    result.figure("live rate", live_rate, "msg/s");
    result.figure("backlog", ctx.backlog as f64, "records");
    result.figure("time to drain the backlog", drain_secs, "s");
    result.figure(
        "buffer bytes on disk per payload byte",
        on_disk as f64 / payload_bytes as f64,
        "",
    );
    result.figure("buffer on disk", super::mib(on_disk), "MiB");
    result.figure(
        "backlog written into the buffer at",
        ctx.backlog as f64 / fill_secs,
        "rec/s",
    );
    result.figure("agent peak RSS while draining", super::mib(peak), "MiB");
    result.figure(
        "live messages acknowledged by the broker",
        published.messages as f64,
        "",
    );
    result.note(format!(
        "Backlog: records as the MQTT source makes them of ~{} byte JSON payloads, appended with the agent's buffer library before the agent starts; drain time from the first record stored to the backlog's last. Live data arrives through Mosquitto during the drain (and queues behind the backlog: the uplink is FIFO).",
        payload_bytes / ctx.backlog.max(1)
    ));
    result
        .throughput
        .push(rate_series("stored rec/s", "rec/s", &samples));
    Ok(result)
}
