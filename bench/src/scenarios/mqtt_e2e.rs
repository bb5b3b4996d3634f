//! `mqtt-e2e`: devices publish QoS 1 to a real Mosquitto as fast as it takes
//! them; the real edge-agent (durable buffer, default flush policy, broker
//! acks after durability) streams over mTLS to the real cloud-ingest with its
//! embedded store. In the same run, the broker's ceiling: the same
//! publishers with a subscriber that only counts, before the agent's phases
//! and again after them (the share is taken against the mean); and the
//! broker's own latency at half that rate, against which the agent's
//! half-load latency is read.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use cloud_ingest::query::{Query, RecordSource};
use edgefleet_tests::{AgentOptions, Fleet};

use super::{
    histogram, latency_figures, longest_flat, mib, rate_series, time_reaching, value_at,
    wait_until, Sampler,
};
use crate::mqtt::{self, Counter};
use crate::report::{ScenarioResult, Series};
use crate::sys;
use crate::Ctx;

const PUBLISHERS: usize = 2;
const DEVICES: u32 = 100;

/// Publishes as fast as the broker takes it under `root` for `phase` and
/// returns the rate at which `counter` (subscribed under `root`) got it all.
async fn ceiling_phase(
    counter: &Counter,
    root: &str,
    port: u16,
    phase: Duration,
) -> anyhow::Result<f64> {
    let already = counter.count();
    let started = Instant::now();
    let published = mqtt::publish(root, port, PUBLISHERS, DEVICES, phase, None, "ceiling").await?;
    wait_until(Duration::from_secs(60), || {
        counter.count() - already >= published.messages
    })
    .await;
    Ok((counter.count() - already) as f64 / started.elapsed().as_secs_f64())
}

/// The pause between the full and the half phase.
const SETTLE: Duration = Duration::from_secs(3);

/// Where the second ceiling phase publishes: as long as `devices`.
const CEILING_ROOT: &str = "ceiling";

pub async fn run(ctx: &Ctx) -> anyhow::Result<ScenarioResult> {
    let mut result = ctx.result("mqtt-e2e");
    let phase = ctx.phase();
    let mut fleet = Fleet::new(&["bench-agent"])?;
    let port = fleet.mqtt.port;

    // The broker's ceiling: the same publishers, a subscriber that only
    // counts. Measured again after the agent's phases (below).
    let counter = Counter::start(port, mqtt::DEVICES_ROOT).await?;
    let broker_pid = fleet.mqtt.proc.pid();
    let ceiling_cpu0 = CpuUse::now(broker_pid, None);
    let ceiling_before = ceiling_phase(&counter, mqtt::DEVICES_ROOT, port, phase).await?;
    let ceiling_cpu = CpuUse::now(broker_pid, None).since(&ceiling_cpu0);
    let ceiling_messages = counter.count() as f64;
    // The broker's own latency at half its ceiling: what the agent's
    // half-load latency would be with an agent that cost nothing.
    counter.take_latency();
    let delivered = counter.count();
    let broker_half = mqtt::publish(
        mqtt::DEVICES_ROOT,
        port,
        PUBLISHERS,
        DEVICES,
        phase,
        Some(ceiling_before / 2.0),
        "broker-half",
    )
    .await?;
    wait_until(Duration::from_secs(60), || {
        counter.count() >= delivered + broker_half.messages
    })
    .await;
    let h_broker_half = counter.take_latency();
    counter.stop().await;

    // The spine.
    fleet.start_ingest()?;
    let mut options = AgentOptions::new("bench-agent");
    options.max_bytes = "2GiB".into();
    let mut agent = fleet.start_agent(&options)?;
    let ingest_pid = fleet.ingest.as_ref().map(|p| p.pid()).unwrap_or(0);
    let agent_pid = agent.pid();
    let metrics_port = fleet.ingest_metrics_port;
    // Warm-up: until a record comes through, the agent's subscription is not in place.
    let warm = Instant::now();
    while fleet.stored() == 0 {
        mqtt::publish(
            mqtt::DEVICES_ROOT,
            port,
            1,
            1,
            Duration::from_millis(1),
            None,
            "warmup",
        )
        .await?;
        anyhow::ensure!(
            warm.elapsed() < Duration::from_secs(60),
            "no record stored within 60 s; see {}",
            fleet.dir.path().display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let baseline = fleet.stored();

    let origin = Instant::now();
    let origin_ns = mqtt::now_ns();
    let sampler = Sampler::start(origin, Duration::from_millis(250), move || {
        super::stored(metrics_port) as f64
    });

    // Where a tail or a stall may come from: each side's group commits
    // (write and fsync), which every record waits for twice.
    let commit_histograms = || {
        (
            super::histogram_buckets(options.metrics_port, "edge_buffer_commit_seconds"),
            super::histogram_buckets(metrics_port, "ingest_commit_seconds"),
        )
    };
    // Full load.
    let commits_before_full = commit_histograms();
    let cpu0 = CpuUse::now(broker_pid, Some((agent_pid, ingest_pid)));
    let full_start_ns = mqtt::now_ns();
    let full = mqtt::publish(
        mqtt::DEVICES_ROOT,
        port,
        PUBLISHERS,
        DEVICES,
        phase,
        None,
        "full",
    )
    .await?;
    let full_end_ns = mqtt::now_ns();
    let target = baseline + full.messages;
    let all_stored = wait_until(Duration::from_secs(600), || fleet.stored() >= target).await;
    anyhow::ensure!(
        all_stored,
        "full load: only {} of {target} stored",
        fleet.stored()
    );
    let full_done = origin.elapsed().as_secs_f64();
    let commits_after_full = commit_histograms();
    let full_cpu = CpuUse::now(broker_pid, Some((agent_pid, ingest_pid))).since(&cpu0);
    let samples = sampler.samples();
    // Sustained: from 20 % into the phase until the last record was stored
    // (the broker holds whatever the agent has not taken yet, so the agent
    // runs at its own pace all along).
    let from = phase.as_secs_f64() * 0.2;
    let sustained =
        (full.messages as f64 + baseline as f64 - value_at(&samples, from)) / (full_done - from);

    // Half load, from a settled broker: when the publishers outran it, the
    // full phase ends with a backlog delivered in a burst, and Mosquitto
    // stays busy for a second or two after the last record is stored.
    tokio::time::sleep(SETTLE).await;
    let half_rate = (sustained / 2.0).max(1.0);
    let commits_before_half = commit_histograms();
    let half_start_ns = mqtt::now_ns();
    let half = mqtt::publish(
        mqtt::DEVICES_ROOT,
        port,
        PUBLISHERS,
        DEVICES,
        phase,
        Some(half_rate),
        "half",
    )
    .await?;
    let half_end_ns = mqtt::now_ns();
    let target = target + half.messages;
    wait_until(Duration::from_secs(300), || fleet.stored() >= target).await;
    let commits_after_half = commit_histograms();
    let samples = sampler.stop();

    let agent_peak = sys::peak_rss(agent_pid);
    let ingest_peak = sys::peak_rss(ingest_pid);
    agent.terminate(Duration::from_secs(30))?;
    if let Some(mut ingest) = fleet.ingest.take() {
        ingest.terminate(Duration::from_secs(60))?;
    }

    // The ceiling again, the agent and the ingest stopped: the share is
    // taken against the mean of both, so a machine that slowed down or sped
    // up during the run does not tilt it. Under another root of the same
    // length: the broker keeps the agent's persistent session and would
    // queue for it every message under `devices/`.
    let counter = Counter::start(port, CEILING_ROOT).await?;
    let ceiling_after = ceiling_phase(&counter, CEILING_ROOT, port, phase).await?;
    counter.stop().await;
    let ceiling = (ceiling_before + ceiling_after) / 2.0;

    // Publish → stored latency: the payload's timestamp (the record's time)
    // against the commit time the store indexes each record by.
    let store = cloud_ingest::sink::EmbeddedStore::open_existing(&fleet.store)?;
    let mut published_at: HashMap<u64, i64> = HashMap::new();
    store.query(
        &Query {
            agent: None,
            device: None,
            since_ns: None,
            limit: None,
        },
        &mut |_, record| {
            published_at.insert(record.seq, record.timestamp_ns);
            true
        },
    )?;
    let (mut h_full, mut h_half) = (histogram(), histogram());
    let mut per_second: std::collections::BTreeMap<i64, hdrhistogram::Histogram<u64>> =
        Default::default();
    store.ingest_times(|ingest_ns, _, seq| {
        let Some(&ts) = published_at.get(&seq) else {
            return;
        };
        let micros = ((ingest_ns as i64 - ts) / 1000).max(1) as u64;
        if (full_start_ns..=full_end_ns).contains(&ts) {
            let _ = h_full.record(micros);
        } else if (half_start_ns..=half_end_ns).contains(&ts) {
            let _ = h_half.record(micros);
        } else {
            return;
        }
        let second = (ts - origin_ns) / 1_000_000_000;
        let _ = per_second
            .entry(second)
            .or_insert_with(histogram)
            .record(micros);
    })?;

    let records = (full.messages) as f64;
    result.target(
        "stored records/s, sustained (full load)",
        sustained,
        "rec/s",
        "≥ 90 % of the broker's ceiling",
        sustained >= 0.9 * ceiling,
    );
    result.figure(
        "broker ceiling (counting subscriber), mean of before and after",
        ceiling,
        "msg/s",
    );
    result.figure(
        "broker ceiling before the agent's phases",
        ceiling_before,
        "msg/s",
    );
    result.figure(
        "broker ceiling after the agent's phases",
        ceiling_after,
        "msg/s",
    );
    result.target(
        "agent rate / broker ceiling",
        100.0 * sustained / ceiling,
        "%",
        "≥ 90 %",
        sustained >= 0.9 * ceiling,
    );
    result.figure(
        "publish rate offered (full load)",
        full.messages as f64 / full.seconds,
        "msg/s",
    );
    for f in latency_figures("latency publish→stored, full load,", &h_full) {
        result.figures.push(f);
    }
    // From the first record of the phase stored to the last.
    let first_stored = time_reaching(&samples, baseline as f64 + 1.0).unwrap_or(0.0);
    result.figure(
        "full load: longest stretch with nothing stored",
        longest_flat(&samples, first_stored, full_done),
        "s",
    );
    result.figure(
        "half load rate",
        half.messages as f64 / half.seconds,
        "msg/s",
    );
    let half_figures = latency_figures("latency publish→stored, half load,", &h_half);
    for f in half_figures {
        if f.name.ends_with("p99") {
            let met = f.value < 20.0;
            result.target(&f.name, f.value, "ms", "< 20 ms", met);
        } else {
            result.figures.push(f);
        }
    }
    for (load, before, after) in [
        ("half load", &commits_before_half, &commits_after_half),
        ("full load", &commits_before_full, &commits_after_full),
    ] {
        commit_figures(&mut result, load, before, after);
    }
    result.figure(
        "broker alone at half its ceiling: rate",
        broker_half.messages as f64 / broker_half.seconds,
        "msg/s",
    );
    for f in latency_figures(
        "broker alone at half its ceiling: latency publish→subscriber,",
        &h_broker_half,
    ) {
        result.figures.push(f);
    }
    // Where the cores went in each phase: what the agent and the ingest
    // cost in the full-load phase is what the counting subscriber did not.
    let ceiling_messages = ceiling_messages.max(1.0);
    for (name, cpu_seconds, messages) in [
        ("agent CPU per million records", full_cpu.agent, records),
        ("ingest CPU per million records", full_cpu.ingest, records),
        ("full load: broker CPU per million records", full_cpu.broker, records),
        (
            "full load: bench process (publishers) CPU per million records",
            full_cpu.bench,
            records,
        ),
        (
            "ceiling phase: broker CPU per million messages",
            ceiling_cpu.broker,
            ceiling_messages,
        ),
        (
            "ceiling phase: bench process (publishers, counting subscriber) CPU per million messages",
            ceiling_cpu.bench,
            ceiling_messages,
        ),
    ] {
        result.figure(name, cpu_seconds / messages * 1e6, "CPU s");
    }
    result.figure(
        "full load: machine busy (all cores)",
        100.0 * full_cpu.busy / full_cpu.total.max(f64::MIN_POSITIVE),
        "%",
    );
    result.figure(
        "ceiling phase: machine busy (all cores)",
        100.0 * ceiling_cpu.busy / ceiling_cpu.total.max(f64::MIN_POSITIVE),
        "%",
    );
    result.figure("agent peak RSS", mib(agent_peak), "MiB");
    result.figure("ingest peak RSS", mib(ingest_peak), "MiB");
    result.figure("records (full load)", records, "");
    result.note(format!(
        "{PUBLISHERS} publisher connections over {DEVICES} device topics, ~{} byte JSON payloads, QoS 1; Mosquitto with max_inflight_messages 1000; agent with the default flush policy; phases of {:.0} s.",
        full.payload_bytes / full.messages.max(1),
        phase.as_secs_f64()
    ));
    result.note(format!(
        "The half phase starts {} s after the last record of the full phase was stored.",
        SETTLE.as_secs()
    ));
    result.note("The broker's ceiling is measured before the agent's phases and again after them (the agent and the ingest stopped, topics under `ceiling/` so that the agent's persistent session gets none); the share is taken against the mean of the two. The ceiling phase's CPU figures are the first phase's.");
    result.note("Stored time is the commit's timestamp in the store's time index, taken just before the commit's write and fsync; publish time is the timestamp the publisher put in the payload (same clock).");
    result.note(format!(
        "The machine has {} cores shared by the broker, the bench process (publishers, and in the ceiling phase the counting subscriber), the agent and the ingest; \"machine busy\" counts all of them, idle and I/O wait not.",
        ctx.machine.cores
    ));
    result
        .throughput
        .push(rate_series("stored rec/s", "rec/s", &samples));
    let p99: Vec<(f64, f64)> = per_second
        .iter()
        .map(|(s, h)| (*s as f64, h.value_at_quantile(0.99) as f64 / 1000.0))
        .collect();
    let p50: Vec<(f64, f64)> = per_second
        .iter()
        .map(|(s, h)| (*s as f64, h.value_at_quantile(0.5) as f64 / 1000.0))
        .collect();
    result.latency.push(Series {
        name: "p50 publish→stored (by publish second)".into(),
        unit: "ms".into(),
        points: p50,
    });
    result.latency.push(Series {
        name: "p99".into(),
        unit: "ms".into(),
        points: p99,
    });
    drop(store);
    Ok(result)
}

/// CPU seconds so far of the processes that share the machine in this
/// scenario, and of the machine itself.
struct CpuUse {
    broker: f64,
    bench: f64,
    agent: f64,
    ingest: f64,
    busy: f64,
    total: f64,
}

impl CpuUse {
    fn now(broker: i32, agent_and_ingest: Option<(i32, i32)>) -> Self {
        let (busy, total) = sys::machine_cpu_seconds();
        let (agent, ingest) = agent_and_ingest.map_or((0.0, 0.0), |(agent, ingest)| {
            (sys::cpu_seconds(agent), sys::cpu_seconds(ingest))
        });
        CpuUse {
            broker: sys::cpu_seconds(broker),
            // pid 0 reads /proc/self: this process, publishers and all.
            bench: sys::cpu_seconds(0),
            agent,
            ingest,
            busy,
            total,
        }
    }

    fn since(&self, earlier: &CpuUse) -> CpuUse {
        CpuUse {
            broker: self.broker - earlier.broker,
            bench: self.bench - earlier.bench,
            agent: self.agent - earlier.agent,
            ingest: self.ingest - earlier.ingest,
            busy: self.busy - earlier.busy,
            total: self.total - earlier.total,
        }
    }
}

type CommitHistograms = (Vec<(f64, f64)>, Vec<(f64, f64)>);

/// Each side's group commits in one phase: how many, their p99 and slowest
/// (as bucket bounds), and how many took over 12.8 ms.
fn commit_figures(
    result: &mut ScenarioResult,
    load: &str,
    before: &CommitHistograms,
    after: &CommitHistograms,
) {
    // 12.8 ms: a bucket bound of both histograms, and more than half the
    // half-load latency target spent in one commit.
    const SLOW_COMMIT: f64 = 0.0128;
    for (side, before, after) in [
        ("agent buffer", &before.0, &after.0),
        ("ingest store", &before.1, &after.1),
    ] {
        let tail = super::CommitTail::between(before, after, SLOW_COMMIT);
        result.figure(
            &format!("{load}: {side} group commits"),
            tail.commits,
            "commits",
        );
        result.figure(
            &format!("{load}: {side} group commit p99 at most"),
            tail.p99_at_most * 1000.0,
            "ms",
        );
        result.figure(
            &format!("{load}: {side} group commits over 12.8 ms"),
            tail.slower,
            "commits",
        );
        result.figure(
            &format!("{load}: {side} slowest group commit at most"),
            tail.max_at_most * 1000.0,
            "ms",
        );
    }
}
